//! A vhost-user-blk queue's engine for a replicated volume: requests go to
//! the volume's [`DriverHandle`] and complete when the replicas have them.
//!
//! The vhost worker thread starts requests; a task on the runtime awaits
//! each one and hands the outcome back through a channel, signalling the
//! worker's eventfd, as io_uring does for a local volume.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;

use blockstore::queue::{BlockEngine, Completion, SlotId, REQUEST_BYTES_MAX};
use blockstore::replication::frontend::{Failure, GuestOp, Outcome};
use blockstore::replication::wire::{Blocks, BLOCKS_MAX, BLOCK_BYTES};
use blockstore::{Error, Result};
use bytes::Bytes;

use super::driver::DriverHandle;

/// How long a drain waits for the driver's answers.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Default)]
struct Slot {
    tag: u64,
    in_use: bool,
    lba: u64,
    buf: Vec<u8>,
}

/// One queue's engine over a replication driver.
#[derive(Debug)]
pub struct ReplicatedEngine {
    name: String,
    capacity: u64,
    driver: DriverHandle,
    runtime: tokio::runtime::Handle,
    slots: Vec<Slot>,
    free: Vec<usize>,
    unsubmitted: Vec<(usize, GuestOp<Blocks>)>,
    done_tx: mpsc::Sender<(usize, u64, Outcome<Blocks>)>,
    done_rx: mpsc::Receiver<(usize, u64, Outcome<Blocks>)>,
    eventfd: std::sync::Arc<OwnedFd>,
    in_flight: usize,
    /// Raised when a drain gives up on requests: their late answers carry
    /// the old epoch and are dropped, never matched to newer requests.
    epoch: u64,
}

fn failure(name: &str, outcome: &Outcome<Blocks>) -> Error {
    let reason = match outcome {
        Outcome::Failed(Failure::Fenced) => {
            "fenced: the volume was attached elsewhere; this attachment serves no more I/O".into()
        }
        Outcome::Failed(Failure::CacheLost) => {
            "the only in-sync replica lost writes from its cache before this flush".into()
        }
        Outcome::Failed(Failure::OutOfRange) => "outside the volume".into(),
        Outcome::Failed(Failure::Damaged) => {
            "the only in-sync copy of a block read fails its checksum".into()
        }
        Outcome::Failed(Failure::Unavailable) => {
            "not done within the I/O timeout: the replicas it needs did not answer or could not store it".into()
        }
        other => format!("unexpected outcome {other:?}"),
    };
    Error::Replication {
        volume: name.to_owned(),
        reason,
    }
}

impl ReplicatedEngine {
    /// An engine for a volume of `capacity` bytes with up to `depth`
    /// requests in flight.
    pub fn new(
        name: &str,
        capacity: u64,
        depth: usize,
        driver: DriverHandle,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<ReplicatedEngine> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is
        // checked before it is wrapped.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor owned by nothing else.
        let eventfd = std::sync::Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (done_tx, done_rx) = mpsc::channel();
        Ok(ReplicatedEngine {
            name: name.to_owned(),
            capacity,
            driver,
            runtime,
            slots: (0..depth).map(|_| Slot::default()).collect(),
            free: (0..depth).rev().collect(),
            unsubmitted: Vec::new(),
            done_tx,
            done_rx,
            eventfd,
            in_flight: 0,
            epoch: 0,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let block = BLOCK_BYTES as u64;
        let aligned = offset % block == 0 && len % block == 0 && len > 0;
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.capacity);
        if !aligned || !inside {
            return Err(Error::OutOfRange {
                volume: self.name.clone(),
                offset,
                len,
                capacity: self.capacity,
            });
        }
        if len > REQUEST_BYTES_MAX {
            return Err(Error::TooLarge {
                len,
                max: REQUEST_BYTES_MAX,
            });
        }
        Ok(())
    }

    fn take_slot(&mut self, tag: u64, lba: u64) -> Result<usize> {
        let index = self.free.pop().ok_or(Error::QueueFull(self.slots.len()))?;
        let slot = &mut self.slots[index];
        slot.tag = tag;
        slot.in_use = true;
        slot.lba = lba;
        self.in_flight += 1;
        Ok(index)
    }

    fn collect(&mut self, index: usize, outcome: Outcome<Blocks>, out: &mut Vec<Completion>) {
        let result = match outcome {
            Outcome::Written | Outcome::Flushed => Ok(()),
            Outcome::Read(blocks) => {
                let buf = &mut self.slots[index].buf;
                for (i, block) in blocks.iter().enumerate() {
                    let target = &mut buf[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES];
                    match block {
                        Some((_, bytes)) => target.copy_from_slice(bytes),
                        None => target.fill(0),
                    }
                }
                Ok(())
            }
            failed => Err(failure(&self.name, &failed)),
        };
        self.in_flight -= 1;
        out.push(Completion {
            tag: self.slots[index].tag,
            slot: SlotId::new(index),
            result,
        });
    }

    fn clear_eventfd(&self) {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a local u64 from a descriptor we own;
        // EAGAIN (nothing to read) is fine.
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                8,
            );
        }
    }
}

impl BlockEngine for ReplicatedEngine {
    fn begin_write(&mut self, tag: u64, offset: u64, len: u64) -> Result<(SlotId, &mut [u8])> {
        self.check(offset, len)?;
        let index = self.take_slot(tag, offset / BLOCK_BYTES as u64)?;
        let buf = &mut self.slots[index].buf;
        buf.resize(len as usize, 0);
        Ok((SlotId::new(index), &mut buf[..]))
    }

    fn cancel(&mut self, slot: SlotId) {
        self.in_flight -= 1;
        self.release(slot);
    }

    fn submit_write(&mut self, slot: SlotId) -> Result<()> {
        let index = slot.index();
        let data = Bytes::copy_from_slice(&self.slots[index].buf);
        let op = GuestOp::Write {
            lba: self.slots[index].lba,
            blocks: (data.len() / BLOCK_BYTES) as u64,
            data: Blocks::from_data(data),
        };
        self.unsubmitted.push((index, op));
        Ok(())
    }

    fn submit_read(&mut self, tag: u64, offset: u64, len: u64) -> Result<SlotId> {
        self.check(offset, len)?;
        let lba = offset / BLOCK_BYTES as u64;
        let index = self.take_slot(tag, lba)?;
        self.slots[index].buf.resize(len as usize, 0);
        let blocks = len / BLOCK_BYTES as u64;
        self.unsubmitted
            .push((index, GuestOp::Read { lba, blocks }));
        Ok(SlotId::new(index))
    }

    fn submit_flush(&mut self, tag: u64) -> Result<SlotId> {
        let index = self.take_slot(tag, 0)?;
        self.slots[index].buf.clear();
        self.unsubmitted.push((index, GuestOp::Flush));
        Ok(SlotId::new(index))
    }

    /// Unmaps by writing absent blocks, in pieces the wire carries, and
    /// waits for each: discards are rare, and the guest waits for them.
    fn unmap(&mut self, offset: u64, len: u64) -> Result<()> {
        let block = BLOCK_BYTES as u64;
        if offset % block != 0
            || len % block != 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > self.capacity)
        {
            return Err(Error::OutOfRange {
                volume: self.name.clone(),
                offset,
                len,
                capacity: self.capacity,
            });
        }
        let mut lba = offset / block;
        let end = (offset + len) / block;
        while lba < end {
            let blocks = (end - lba).min(u64::from(BLOCKS_MAX));
            let op = GuestOp::Write {
                lba,
                blocks,
                data: Blocks::new(vec![false; blocks as usize], Vec::new(), Bytes::new()),
            };
            let outcome = self.runtime.block_on(self.driver.submit(op));
            if outcome != Outcome::Written {
                return Err(failure(&self.name, &outcome));
            }
            lba += blocks;
        }
        Ok(())
    }

    fn submit(&mut self) -> Result<()> {
        let epoch = self.epoch;
        for (index, op) in self.unsubmitted.drain(..) {
            let done = self.done_tx.clone();
            let eventfd = self.eventfd.clone();
            self.driver.submit_with(op, move |outcome| {
                if done.send((index, epoch, outcome)).is_ok() {
                    let one = 1u64;
                    // SAFETY: writes 8 bytes from a local u64 to an eventfd
                    // the closure keeps open through its Arc.
                    unsafe {
                        libc::write(eventfd.as_raw_fd(), (&one as *const u64).cast(), 8);
                    }
                }
            });
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.clear_eventfd();
        while let Ok((index, epoch, outcome)) = self.done_rx.try_recv() {
            if epoch == self.epoch {
                self.collect(index, outcome, out);
            }
        }
    }

    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.submit()?;
        self.reap(out);
        while self.in_flight > 0 {
            // The driver answers every request, with a failure at worst; a
            // bound keeps a driver that died from hanging the device.
            match self.done_rx.recv_timeout(DRAIN_WAIT) {
                Ok((index, epoch, outcome)) if epoch == self.epoch => {
                    self.collect(index, outcome, out)
                }
                Ok(_) => {}
                Err(_) => {
                    let abandoned = self.in_flight;
                    // Forget them: their slots are free again, and answers
                    // that come later belong to an epoch that is over.
                    self.epoch += 1;
                    self.in_flight = 0;
                    self.unsubmitted.clear();
                    self.free.clear();
                    for (index, slot) in self.slots.iter_mut().enumerate() {
                        slot.in_use = false;
                        self.free.push(index);
                    }
                    return Err(Error::Replication {
                        volume: self.name.clone(),
                        reason: format!(
                            "{abandoned} requests got no answer from the replication driver within {DRAIN_WAIT:?}"
                        ),
                    });
                }
            }
        }
        self.clear_eventfd();
        Ok(())
    }

    fn data(&self, slot: SlotId) -> &[u8] {
        &self.slots[slot.index()].buf
    }

    fn release(&mut self, slot: SlotId) {
        let slot_ref = &mut self.slots[slot.index()];
        if slot_ref.in_use {
            slot_ref.in_use = false;
            self.free.push(slot.index());
        }
    }

    fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}
