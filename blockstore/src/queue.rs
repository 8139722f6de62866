//! The I/O engine of one queue: requests against a [`Volume`], driven
//! through io_uring.
//!
//! A [`VolumeQueue`] is owned by one thread. Requests are started with the
//! `submit_*` calls and finish asynchronously; completions are collected
//! with [`VolumeQueue::reap`] when the queue's eventfd fires. Each request
//! is identified by a caller-chosen `tag`.
//!
//! This is the boundary a replication layer slots into: it sees whole
//! requests (offset, length, data, checksums) before and after local I/O.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::buffer::{AlignedBuf, BufferPool};
use crate::error::{Error, Result};
use crate::meta::Extent;
use crate::volume::{Volume, BLOCK_SIZE};

/// Largest single request, in bytes.
pub const REQUEST_BYTES_MAX: u64 = 4 << 20;

/// An io_uring entry's user data: the slot index in the low 32 bits, the
/// bytes it transfers in the high 32 (to detect short transfers).
fn user_data(index: usize, bytes: u32) -> u64 {
    (index as u64) | (u64::from(bytes) << 32)
}

fn decode_user_data(user_data: u64) -> (usize, u32) {
    ((user_data & 0xffff_ffff) as usize, (user_data >> 32) as u32)
}

/// Identifies a request slot of a queue until it is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotId(usize);

impl SlotId {
    /// The slot with this index (for [`BlockEngine`]s other than
    /// [`VolumeQueue`]).
    pub fn new(index: usize) -> SlotId {
        SlotId(index)
    }

    pub fn index(self) -> usize {
        self.0
    }
}

/// What a block device's worker drives: requests started with the
/// `submit_*` calls, finished asynchronously, collected with `reap` when
/// `eventfd` is readable. [`VolumeQueue`] does local I/O; replication
/// implements it over the cluster.
pub trait BlockEngine: Send {
    /// Starts a write: returns the slot and the buffer to fill.
    fn begin_write(&mut self, tag: u64, offset: u64, len: u64) -> Result<(SlotId, &mut [u8])>;
    /// Abandons a begun write.
    fn cancel(&mut self, slot: SlotId);
    /// Sends a filled write on its way.
    fn submit_write(&mut self, slot: SlotId) -> Result<()>;
    fn submit_read(&mut self, tag: u64, offset: u64, len: u64) -> Result<SlotId>;
    fn submit_flush(&mut self, tag: u64) -> Result<SlotId>;
    /// Unmaps a range (DISCARD, WRITE_ZEROES), before returning.
    fn unmap(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Pushes started requests to wherever they go.
    fn submit(&mut self) -> Result<()>;
    /// Collects finished requests without waiting.
    fn reap(&mut self, out: &mut Vec<Completion>);
    /// Waits for every request in flight and collects them.
    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()>;
    /// The data of a finished read.
    fn data(&self, slot: SlotId) -> &[u8];
    fn release(&mut self, slot: SlotId);
    /// Readable when completions are waiting.
    fn eventfd(&self) -> RawFd;
    /// Requests started and not yet reaped.
    fn in_flight(&self) -> usize;
}

impl BlockEngine for VolumeQueue {
    fn begin_write(&mut self, tag: u64, offset: u64, len: u64) -> Result<(SlotId, &mut [u8])> {
        VolumeQueue::begin_write(self, tag, offset, len)
    }
    fn cancel(&mut self, slot: SlotId) {
        VolumeQueue::cancel(self, slot)
    }
    fn submit_write(&mut self, slot: SlotId) -> Result<()> {
        VolumeQueue::submit_write(self, slot)
    }
    fn submit_read(&mut self, tag: u64, offset: u64, len: u64) -> Result<SlotId> {
        VolumeQueue::submit_read(self, tag, offset, len)
    }
    fn submit_flush(&mut self, tag: u64) -> Result<SlotId> {
        VolumeQueue::submit_flush(self, tag)
    }
    fn unmap(&mut self, offset: u64, len: u64) -> Result<()> {
        VolumeQueue::unmap(self, offset, len)
    }
    fn submit(&mut self) -> Result<()> {
        VolumeQueue::submit(self)
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        VolumeQueue::reap(self, out)
    }
    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        VolumeQueue::drain(self, out)
    }
    fn data(&self, slot: SlotId) -> &[u8] {
        VolumeQueue::data(self, slot)
    }
    fn release(&mut self, slot: SlotId) {
        VolumeQueue::release(self, slot)
    }
    fn eventfd(&self) -> RawFd {
        VolumeQueue::eventfd(self)
    }
    fn in_flight(&self) -> usize {
        VolumeQueue::in_flight(self)
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The caller's tag.
    pub tag: u64,
    /// The slot, to read data from (reads) and then release.
    pub slot: SlotId,
    /// How it ended.
    pub result: Result<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

#[derive(Debug)]
struct Slot {
    tag: u64,
    kind: Kind,
    in_use: bool,
    lba: u64,
    buf: Option<AlignedBuf>,
    /// Physical blocks of a write.
    blocks: Vec<u64>,
    /// Checksums of a write's blocks.
    crcs: Vec<u32>,
    /// Map lookups of a read.
    extents: Vec<Option<Extent>>,
    read_epoch: u64,
    flush_mark: u64,
    ops_pending: u32,
    error: Option<Error>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            tag: 0,
            kind: Kind::Read,
            in_use: false,
            lba: 0,
            buf: None,
            blocks: Vec::new(),
            crcs: Vec::new(),
            extents: Vec::new(),
            read_epoch: 0,
            flush_mark: 0,
            ops_pending: 0,
            error: None,
        }
    }
}

/// The per-queue I/O engine of a volume.
#[derive(Debug)]
pub struct VolumeQueue {
    volume: Arc<Volume>,
    ring: IoUringDebug,
    eventfd: EventFd,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    pool: BufferPool,
    /// Completions that needed no I/O (holes, errors found at submission).
    ready: Vec<usize>,
    /// Entries of one request, gathered before they are pushed.
    sqes: Vec<io_uring::squeue::Entry>,
    unsubmitted: u32,
    in_flight: usize,
}

/// io_uring's ring does not implement Debug.
struct IoUringDebug(IoUring);

impl std::fmt::Debug for IoUringDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoUring")
    }
}

impl VolumeQueue {
    /// Creates an engine for up to `depth` requests in flight.
    pub fn new(volume: Arc<Volume>, depth: usize) -> Result<VolumeQueue> {
        let entries = (depth * 2).next_power_of_two().clamp(64, 4096) as u32;
        let ring = IoUring::new(entries).map_err(Error::Ring)?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(Error::Ring)?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(Error::Ring)?;
        Ok(VolumeQueue {
            volume,
            ring: IoUringDebug(ring),
            eventfd,
            slots: (0..depth).map(|_| Slot::new()).collect(),
            free_slots: (0..depth).rev().collect(),
            pool: BufferPool::new(REQUEST_BYTES_MAX as usize, depth),
            ready: Vec::with_capacity(depth),
            sqes: Vec::new(),
            unsubmitted: 0,
            in_flight: 0,
        })
    }

    /// The volume this queue serves.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Becomes readable when completions are waiting.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Requests started and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn take_slot(&mut self, tag: u64, kind: Kind) -> Result<usize> {
        let index = self
            .free_slots
            .pop()
            .ok_or(Error::QueueFull(self.slots.len()))?;
        let slot = &mut self.slots[index];
        debug_assert!(!slot.in_use);
        slot.in_use = true;
        slot.tag = tag;
        slot.kind = kind;
        slot.ops_pending = 0;
        slot.error = None;
        self.in_flight += 1;
        Ok(index)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        if len > REQUEST_BYTES_MAX {
            return Err(Error::TooLarge {
                len,
                max: REQUEST_BYTES_MAX,
            });
        }
        self.volume.check_range(offset, len)
    }

    /// Starts a write of `len` bytes at `offset`: returns the slot and the
    /// buffer to fill. Call [`VolumeQueue::submit_write`] once it is filled.
    pub fn begin_write(&mut self, tag: u64, offset: u64, len: u64) -> Result<(SlotId, &mut [u8])> {
        let (lba, _) = self.check(offset, len)?;
        let buf = self.pool.get(len as usize);
        let index = self.take_slot(tag, Kind::Write)?;
        let slot = &mut self.slots[index];
        slot.lba = lba;
        slot.buf = Some(buf);
        let data = slot
            .buf
            .as_mut()
            .expect("buffer was just set")
            .as_mut_slice();
        Ok((SlotId(index), data))
    }

    /// Abandons a write begun with [`VolumeQueue::begin_write`] whose data
    /// could not be gathered.
    pub fn cancel(&mut self, slot: SlotId) {
        self.release(slot);
    }

    /// Checksums the data of a begun write and sends it to disk, copy on
    /// write: the blocks go to newly allocated space.
    pub fn submit_write(&mut self, slot: SlotId) -> Result<()> {
        let index = slot.0;
        let volume = self.volume.clone();
        let slot = &mut self.slots[index];
        assert!(slot.in_use && slot.kind == Kind::Write);
        let data = slot
            .buf
            .as_ref()
            .expect("a begun write has a buffer")
            .as_slice();
        slot.crcs.clear();
        slot.crcs
            .extend(data.chunks_exact(BLOCK_SIZE as usize).map(crc32fast::hash));
        let base = data.as_ptr();
        slot.blocks.clear();
        if let Err(error) = volume.allocate(slot.crcs.len() as u64, &mut slot.blocks) {
            self.release(SlotId(index));
            return Err(error);
        }
        let slot = &mut self.slots[index];
        let fd = types::Fd(volume.file().as_raw_fd());
        // One write per run of consecutive physical blocks.
        let mut start = 0;
        let mut sqes = std::mem::take(&mut self.sqes);
        while start < slot.blocks.len() {
            let mut end = start + 1;
            while end < slot.blocks.len() && slot.blocks[end] == slot.blocks[end - 1] + 1 {
                end += 1;
            }
            let bytes = ((end - start) as u64 * BLOCK_SIZE) as u32;
            // SAFETY (pointer arithmetic): start * BLOCK_SIZE < data.len().
            let ptr = base.wrapping_add(start * BLOCK_SIZE as usize);
            sqes.push(
                opcode::Write::new(fd, ptr, bytes)
                    .offset(slot.blocks[start] * BLOCK_SIZE)
                    .build()
                    .user_data(user_data(index, bytes)),
            );
            start = end;
        }
        slot.ops_pending = sqes.len() as u32;
        let result = sqes.drain(..).try_for_each(|sqe| self.push(sqe));
        self.sqes = sqes;
        result
    }

    /// Starts a read of `len` bytes at `offset`. Unwritten blocks read as
    /// zeros; written ones are checked against their checksums.
    pub fn submit_read(&mut self, tag: u64, offset: u64, len: u64) -> Result<SlotId> {
        let (lba, count) = self.check(offset, len)?;
        let mut buf = self.pool.get(len as usize);
        let index = self.take_slot(tag, Kind::Read)?;
        let volume = self.volume.clone();
        let slot = &mut self.slots[index];
        slot.lba = lba;
        slot.read_epoch = volume.begin_read(lba, count, &mut slot.extents);
        let fd = types::Fd(volume.file().as_raw_fd());
        let data = buf.as_mut_slice();
        let mut sqes = std::mem::take(&mut self.sqes);
        let mut i = 0;
        while i < slot.extents.len() {
            let block = &mut data[i * BLOCK_SIZE as usize..(i + 1) * BLOCK_SIZE as usize];
            let Some(first) = slot.extents[i] else {
                block.fill(0);
                i += 1;
                continue;
            };
            let mut end = i + 1;
            while end < slot.extents.len()
                && slot.extents[end].map(|e| e.physical) == Some(first.physical + (end - i) as u64)
            {
                end += 1;
            }
            let bytes = ((end - i) as u64 * BLOCK_SIZE) as u32;
            sqes.push(
                opcode::Read::new(fd, block.as_mut_ptr(), bytes)
                    .offset(first.physical * BLOCK_SIZE)
                    .build()
                    .user_data(user_data(index, bytes)),
            );
            i = end;
        }
        slot.buf = Some(buf);
        slot.ops_pending = sqes.len() as u32;
        if sqes.is_empty() {
            self.finish(index);
        }
        let result = sqes.drain(..).try_for_each(|sqe| self.push(sqe));
        self.sqes = sqes;
        result.map(|()| SlotId(index))
    }

    /// Starts a flush: every write completed before this call is durable
    /// when it completes.
    pub fn submit_flush(&mut self, tag: u64) -> Result<SlotId> {
        let index = self.take_slot(tag, Kind::Flush)?;
        let mark = self.volume.flush_mark();
        let fd = types::Fd(self.volume.file().as_raw_fd());
        let slot = &mut self.slots[index];
        slot.flush_mark = mark;
        slot.ops_pending = 1;
        let sqe = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(user_data(index, 0));
        self.push(sqe)?;
        Ok(SlotId(index))
    }

    /// Unmaps a range (DISCARD, WRITE_ZEROES): it reads as zeros at once.
    /// Like a write, the change is durable after the next flush.
    pub fn unmap(&mut self, offset: u64, len: u64) -> Result<()> {
        let (lba, count) = self.volume.check_range(offset, len)?;
        let need = self.volume.unmap(lba, count);
        self.volume.handle_commit_need(need)
    }

    fn push(&mut self, sqe: io_uring::squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: every buffer an entry points at lives in a slot's
            // AlignedBuf, which is neither moved out nor freed until the
            // entry's completion has been reaped (see `finish`).
            let pushed = unsafe { self.ring.0.submission().push(&sqe) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Hands queued entries to the kernel.
    pub fn submit(&mut self) -> Result<()> {
        if self.unsubmitted > 0 {
            self.ring.0.submit().map_err(Error::Ring)?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Collects finished requests into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.eventfd.read();
        let mut finished = std::mem::take(&mut self.ready);
        loop {
            // One entry at a time: the completion queue view borrows the ring.
            let next = self.ring.0.completion().next();
            let Some(cqe) = next else { break };
            self.on_cqe(cqe.user_data(), cqe.result(), &mut finished);
        }
        for index in finished.drain(..) {
            let slot = &mut self.slots[index];
            let result = slot.error.take().map_or(Ok(()), Err);
            out.push(Completion {
                tag: slot.tag,
                slot: SlotId(index),
                result,
            });
        }
        self.ready = finished;
    }

    /// Waits until every request in flight has finished its I/O, collecting
    /// the completions into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.submit()?;
        loop {
            self.reap(out);
            if !self
                .slots
                .iter()
                .any(|slot| slot.in_use && slot.ops_pending > 0)
            {
                return Ok(());
            }
            self.ring.0.submit_and_wait(1).map_err(Error::Ring)?;
        }
    }

    fn on_cqe(&mut self, user_data: u64, result: i32, finished: &mut Vec<usize>) {
        let (index, expected) = decode_user_data(user_data);
        let slot = &mut self.slots[index];
        assert!(
            slot.in_use && slot.ops_pending > 0,
            "completion for an idle slot {index}"
        );
        slot.ops_pending -= 1;
        if slot.error.is_none() {
            // A short transfer means the data file ended early or the disk
            // gave up part way; either way the request failed.
            let source = if result < 0 {
                Some(std::io::Error::from_raw_os_error(-result))
            } else if slot.kind != Kind::Flush && result as u32 != expected {
                Some(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {result} of {expected} bytes"),
                ))
            } else {
                None
            };
            if let Some(source) = source {
                slot.error = Some(Error::Io {
                    volume: self.volume.name().to_owned(),
                    offset: slot.lba * BLOCK_SIZE,
                    source,
                });
            }
        }
        if slot.ops_pending == 0 {
            self.finish_into(index, finished);
        }
    }

    fn finish(&mut self, index: usize) {
        let mut ready = std::mem::take(&mut self.ready);
        self.finish_into(index, &mut ready);
        self.ready = ready;
    }

    fn finish_into(&mut self, index: usize, finished: &mut Vec<usize>) {
        let volume = self.volume.clone();
        let slot = &mut self.slots[index];
        match slot.kind {
            Kind::Write => {
                if slot.error.is_some() {
                    volume.abort_write(&slot.blocks);
                } else {
                    let need = volume.finish_write(slot.lba, &slot.blocks, &slot.crcs);
                    if let Err(error) = volume.handle_commit_need(need) {
                        tracing::error!(volume = %volume.name(), %error, "forced commit failed");
                    }
                }
            }
            Kind::Read => {
                volume.end_read(slot.read_epoch);
                if slot.error.is_none() {
                    let data = slot.buf.as_ref().expect("a read has a buffer").as_slice();
                    for (i, extent) in slot.extents.iter().enumerate() {
                        let Some(extent) = extent else { continue };
                        let block = &data[i * BLOCK_SIZE as usize..(i + 1) * BLOCK_SIZE as usize];
                        let found = crc32fast::hash(block);
                        if found != extent.crc {
                            let error = Error::ChecksumMismatch {
                                volume: volume.name().to_owned(),
                                offset: (slot.lba + i as u64) * BLOCK_SIZE,
                                expected: extent.crc,
                                found,
                            };
                            tracing::error!(%error, "read failed its checksum");
                            slot.error = Some(error);
                            break;
                        }
                    }
                }
            }
            Kind::Flush => {
                if slot.error.is_none() {
                    if let Err(error) = volume.commit(slot.flush_mark) {
                        slot.error = Some(error);
                    }
                }
            }
        }
        finished.push(index);
    }

    /// The data of a finished read.
    pub fn data(&self, slot: SlotId) -> &[u8] {
        self.slots[slot.0]
            .buf
            .as_ref()
            .map_or(&[], AlignedBuf::as_slice)
    }

    /// Frees a slot after its completion has been handled.
    pub fn release(&mut self, slot: SlotId) {
        let slot_state = &mut self.slots[slot.0];
        assert!(slot_state.in_use, "slot {} released twice", slot.0);
        assert_eq!(
            slot_state.ops_pending, 0,
            "slot {} released with I/O in flight",
            slot.0
        );
        slot_state.in_use = false;
        if let Some(buf) = slot_state.buf.take() {
            self.pool.put(buf);
        }
        self.free_slots.push(slot.0);
        self.in_flight -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{MetaStore, VolumeRecord};

    fn setup(dir: &std::path::Path) -> VolumeQueue {
        let meta = Arc::new(MetaStore::open(&dir.join("meta")).expect("meta"));
        let record = VolumeRecord {
            id: "0000000000000001".into(),
            name: "q".into(),
            size_bytes: 256 * BLOCK_SIZE,
            created_unix: 0,
            attached_socket: None,
            replica_generation: 0,
            cluster: false,
        };
        let volume =
            Arc::new(Volume::open(record, dir, meta, true, Arc::default()).expect("volume"));
        VolumeQueue::new(volume, 16).expect("queue")
    }

    fn wait_one(queue: &mut VolumeQueue) -> Completion {
        queue.submit().expect("submit");
        let mut out = Vec::new();
        queue.drain(&mut out).expect("drain");
        assert_eq!(out.len(), 1);
        out.pop().expect("one completion")
    }

    #[test]
    fn write_flush_read_round_trip_and_checksum_detection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut queue = setup(dir.path());
        let (slot, buf) = queue.begin_write(1, 8192, 3 * 4096).expect("begin");
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        queue.submit_write(slot).expect("write");
        let done = wait_one(&mut queue);
        assert!(done.result.is_ok());
        queue.release(done.slot);

        let slot = queue.submit_read(2, 4096, 5 * 4096).expect("read");
        let done = wait_one(&mut queue);
        assert_eq!(done.slot, slot);
        assert!(done.result.is_ok());
        let data = queue.data(slot);
        assert!(
            data[..4096].iter().all(|&b| b == 0),
            "unwritten block reads as zeros"
        );
        assert!(data[4096..4 * 4096]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 251) as u8));
        assert!(data[4 * 4096..].iter().all(|&b| b == 0));
        queue.release(slot);

        queue.submit_flush(3).expect("flush");
        let done = wait_one(&mut queue);
        assert!(done.result.is_ok());
        queue.release(done.slot);

        // Damage the data file behind the store's back: the read must fail
        // and name the volume and offset.
        use std::os::unix::fs::FileExt;
        let path = queue.volume().path().to_owned();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.write_at(&[0xff; 16], 4096 + 100).expect("damage");
        let slot = queue.submit_read(4, 8192, 3 * 4096).expect("read");
        let done = wait_one(&mut queue);
        let error = done.result.expect_err("damaged block must not be returned");
        let message = error.to_string();
        assert!(
            message.contains("volume q") && message.contains("offset 12288"),
            "{message}"
        );
        queue.release(slot);
    }

    #[test]
    fn unmap_reads_zeros_and_bad_ranges_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut queue = setup(dir.path());
        let (slot, buf) = queue.begin_write(1, 0, 4096).expect("begin");
        buf.fill(7);
        queue.submit_write(slot).expect("write");
        let done = wait_one(&mut queue);
        queue.release(done.slot);
        queue.unmap(0, 4096).expect("unmap");
        let slot = queue.submit_read(2, 0, 4096).expect("read");
        let done = wait_one(&mut queue);
        assert!(done.result.is_ok());
        assert!(queue.data(slot).iter().all(|&b| b == 0));
        queue.release(slot);

        assert!(queue.submit_read(3, 256 * 4096, 4096).is_err());
        assert!(queue.begin_write(3, 100, 4096).is_err());
        assert!(queue.begin_write(3, 0, REQUEST_BYTES_MAX + 4096).is_err());
        assert_eq!(queue.in_flight(), 0);
    }
}
