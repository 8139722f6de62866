//! The vhost-user-blk backend: turns descriptor chains into requests on a
//! [`VolumeQueue`], one queue (and one worker thread) per virtqueue.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::BlkConfig;
use super::request::{
    check_segment, classify, device_id, DiscardSegment, Limits, Operation, RequestError,
    RequestHeader, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use crate::queue::{BlockEngine, Completion, VolumeQueue, REQUEST_BYTES_MAX};
use crate::volume::{Volume, BLOCK_SIZE};

type Memory = GuestMemoryMmap<()>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<Memory>>;
type Vring = VringRwLock<GuestMemoryAtomic<Memory>>;

/// Largest virtqueue the device accepts.
pub const QUEUE_SIZE_MAX: usize = 1024;
/// Bytes of data a queue may have in flight before it stops taking new
/// requests from the guest until some complete.
pub const QUEUE_BYTES_IN_FLIGHT_MAX: u64 = 64 << 20;
/// Segments per request the guest may use (SEG_MAX).
pub const SEG_MAX: u32 = 126;
/// Most segments of one DISCARD or WRITE_ZEROES request.
pub const DISCARD_SEGMENTS_MAX: u32 = 16;
/// Largest discard segment: 1 GiB in sectors.
pub const DISCARD_SECTORS_MAX: u32 = 1 << 21;

/// Options of a block device.
#[derive(Clone, Copy, Debug)]
pub struct BlkOptions {
    /// Most virtqueues the frontend may use.
    pub queues_max: u16,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions { queues_max: 4 }
    }
}

/// Counters of one device, for `fabctl volume show`.
#[derive(Debug, Default)]
pub struct BlkCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub unmaps: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests refused for being malformed or out of range.
    pub invalid_requests: AtomicU64,
    /// Requests that failed with an I/O or checksum error.
    pub io_errors: AtomicU64,
}

/// A request waiting for its I/O.
#[derive(Debug)]
struct Pending {
    chain: Chain,
    /// Bytes of data to return to the guest (reads).
    read_len: u64,
    bytes: u64,
}

struct Worker {
    queue: Box<dyn BlockEngine>,
    /// Requests in flight, by descriptor head index.
    pending: Vec<Option<Pending>>,
    completions: Vec<Completion>,
    /// Heads of the requests taken and not yet returned, in the order the
    /// guest made them available. Requests are returned in that order, so
    /// the used index always says how many of the available requests are
    /// done: a frontend whose backend restarted resumes at it exactly.
    order: VecDeque<u16>,
    /// Used lengths of finished requests waiting for those before them,
    /// by head.
    finished: Vec<Option<u32>>,
    bytes_in_flight: u64,
    /// The vring this worker serves on the current connection.
    vring: Option<Vring>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("in_flight", &self.queue.in_flight())
            .field("bytes_in_flight", &self.bytes_in_flight)
            .field("connected", &self.vring.is_some())
            .finish_non_exhaustive()
    }
}

/// What a device shows the guest and the logs about its volume.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// The volume's name (logs, thread names).
    pub name: String,
    /// Capacity in bytes, a multiple of the block size.
    pub capacity: u64,
    /// The serial the guest reads (GET_ID): the volume id.
    pub serial: String,
}

#[derive(Debug)]
struct Inner {
    /// The local volume, when the device serves one directly.
    volume: Option<Arc<Volume>>,
    name: String,
    config: BlkConfig,
    limits: Limits,
    serial: String,
    workers: Vec<Mutex<Worker>>,
    memory: RwLock<Option<GuestMemoryAtomic<Memory>>>,
    event_idx: AtomicBool,
    counters: BlkCounters,
}

/// The vhost-user-blk backend of one volume. Clones share state.
#[derive(Debug, Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

/// Epoll token of the io_uring completion eventfd of each worker: the
/// tokens `0..=num_queues` are reserved by vhost-user-backend.
fn completion_token(queues: usize) -> u16 {
    queues as u16 + 1
}

impl BlkBackend {
    /// Creates the backend of a local volume, with a [`VolumeQueue`] per
    /// virtqueue.
    pub fn new(volume: Arc<Volume>, options: BlkOptions) -> crate::Result<BlkBackend> {
        let queues = usize::from(options.queues_max.clamp(1, 64));
        let engines = (0..queues)
            .map(|_| {
                VolumeQueue::new(volume.clone(), QUEUE_SIZE_MAX)
                    .map(|queue| Box::new(queue) as Box<dyn BlockEngine>)
            })
            .collect::<crate::Result<Vec<_>>>()?;
        let info = DeviceInfo {
            name: volume.name().to_owned(),
            capacity: volume.capacity(),
            serial: volume.record().id.clone(),
        };
        let mut backend = BlkBackend::with_engines(info, engines);
        Arc::get_mut(&mut backend.inner)
            .expect("the backend was just made")
            .volume = Some(volume);
        Ok(backend)
    }

    /// Creates the backend of a volume served by other engines (one per
    /// virtqueue), such as replication.
    pub fn with_engines(info: DeviceInfo, engines: Vec<Box<dyn BlockEngine>>) -> BlkBackend {
        let queues = engines.len().clamp(1, 64);
        assert_eq!(queues, engines.len(), "1 to 64 engines");
        let config = BlkConfig {
            capacity_bytes: info.capacity,
            block_size: BLOCK_SIZE as u32,
            size_max: 1 << 20,
            seg_max: SEG_MAX,
            num_queues: queues as u16,
            discard_sectors_max: DISCARD_SECTORS_MAX,
            discard_segments_max: DISCARD_SEGMENTS_MAX,
        };
        let limits = Limits {
            capacity: info.capacity,
            block_size: BLOCK_SIZE,
            request_bytes_max: REQUEST_BYTES_MAX,
            discard_segments_max: DISCARD_SEGMENTS_MAX,
            discard_sectors_max: DISCARD_SECTORS_MAX,
        };
        let workers = engines
            .into_iter()
            .map(|queue| {
                Mutex::new(Worker {
                    queue,
                    pending: (0..QUEUE_SIZE_MAX).map(|_| None).collect(),
                    completions: Vec::with_capacity(QUEUE_SIZE_MAX),
                    order: VecDeque::with_capacity(QUEUE_SIZE_MAX),
                    finished: vec![None; QUEUE_SIZE_MAX],
                    bytes_in_flight: 0,
                    vring: None,
                })
            })
            .collect();
        let serial = info.serial;
        BlkBackend {
            inner: Arc::new(Inner {
                volume: None,
                name: info.name,
                config,
                limits,
                serial,
                workers,
                memory: RwLock::new(None),
                event_idx: AtomicBool::new(false),
                counters: BlkCounters::default(),
            }),
        }
    }

    /// The local volume served, if the device serves one directly.
    pub fn volume(&self) -> Option<&Arc<Volume>> {
        self.inner.volume.as_ref()
    }

    /// The name of the volume served.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Request counters.
    pub fn counters(&self) -> &BlkCounters {
        &self.inner.counters
    }

    /// The io_uring eventfd of each worker, with the epoll token to
    /// register it under.
    pub(crate) fn completion_fds(&self) -> Vec<(std::os::fd::RawFd, u16)> {
        let token = completion_token(self.inner.workers.len());
        self.inner
            .workers
            .iter()
            .map(|worker| (self.inner.lock(worker).queue.eventfd(), token))
            .collect()
    }

    /// Called when the frontend has gone away: waits for the I/O of every
    /// request still in flight, then forgets those requests. Their writes
    /// may or may not have reached the volume, exactly as for writes that a
    /// guest never saw completed; none of them was acknowledged.
    pub(crate) fn reset_after_disconnect(&self) {
        for worker in &self.inner.workers {
            let mut worker = self.inner.lock(worker);
            let worker = &mut *worker;
            if let Err(error) = worker.queue.drain(&mut worker.completions) {
                tracing::error!(%error, "draining a queue after disconnect failed");
            }
            for completion in worker.completions.drain(..) {
                worker.queue.release(completion.slot);
            }
            worker.pending.iter_mut().for_each(|p| *p = None);
            worker.order.clear();
            worker.finished.iter_mut().for_each(|f| *f = None);
            worker.bytes_in_flight = 0;
            worker.vring = None;
        }
        *self.inner.memory.write().expect("memory lock poisoned") = None;
    }
}

/// What [`Inner::complete`] did.
struct Completed {
    /// Requests finished.
    reaped: bool,
    /// Requests returned to the guest.
    published: bool,
}

/// Returns to the guest the finished requests at the front of the
/// worker's order (none past one still in flight). Returns whether any.
fn publish(worker: &mut Worker, vring: &Vring) -> std::io::Result<bool> {
    let mut any = false;
    while let Some(&head) = worker.order.front() {
        let Some(len) = worker.finished[usize::from(head)] else {
            break;
        };
        // Taken off only once it is on the used ring.
        vring.add_used(head, len).map_err(std::io::Error::other)?;
        worker.finished[usize::from(head)] = None;
        worker.order.pop_front();
        any = true;
    }
    Ok(any)
}

impl Inner {
    fn lock<'a>(&self, worker: &'a Mutex<Worker>) -> MutexGuard<'a, Worker> {
        worker.lock().expect("worker lock poisoned")
    }

    fn memory(&self) -> Option<GuestMemoryLoadGuard<Memory>> {
        self.memory
            .read()
            .expect("memory lock poisoned")
            .as_ref()
            .map(GuestMemoryAtomic::memory)
    }

    /// Takes requests off the virtqueue until it is empty or the queue has
    /// too much data in flight. Returns whether it took any.
    fn process_queue(&self, worker: &mut Worker, vring: &Vring) -> std::io::Result<bool> {
        let Some(memory) = self.memory() else {
            return Ok(false);
        };
        let mut took = false;
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let queue_size = vring.get_ref().get_queue().size();
        let mut used_any = false;
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(std::io::Error::other)?;
            }
            loop {
                if worker.bytes_in_flight >= QUEUE_BYTES_IN_FLIGHT_MAX {
                    break;
                }
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(memory.clone());
                let Some(chain) = chain else { break };
                took = true;
                let head = usize::from(chain.head_index());
                // The head is the guest's word: one past the queue, or one
                // already taken and not yet returned, cannot be answered
                // (the used ring has no place for it); it is counted and
                // left.
                let outstanding = worker.pending.get(head).is_none_or(Option::is_some)
                    || worker.finished.get(head).is_none_or(Option::is_some);
                if head >= usize::from(queue_size) || outstanding {
                    self.counters
                        .invalid_requests
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume = %self.name, head, "a request's head is out of range or already in flight");
                    continue;
                }
                worker.order.push_back(chain.head_index());
                if let Some((head, used_len)) = self.start_request(worker, chain, &memory) {
                    worker.finished[usize::from(head)] = Some(used_len);
                }
            }
            used_any |= publish(worker, vring)?;
            if !event_idx || worker.bytes_in_flight >= QUEUE_BYTES_IN_FLIGHT_MAX {
                break;
            }
            if !vring.enable_notification().map_err(std::io::Error::other)? {
                break;
            }
        }
        worker
            .queue
            .submit()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if used_any {
            self.signal(vring)?;
        }
        Ok(took)
    }

    fn signal(&self, vring: &Vring) -> std::io::Result<()> {
        if self.event_idx.load(Ordering::Acquire) {
            if vring.needs_notification().map_err(std::io::Error::other)? {
                vring.signal_used_queue()?;
            }
        } else {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Validates one chain and starts its request. Returns `(head, used
    /// length)` when the request finished at once.
    fn start_request(
        &self,
        worker: &mut Worker,
        chain: Chain,
        memory: &Memory,
    ) -> Option<(u16, u32)> {
        let head = chain.head_index();
        let counters = &self.counters;
        // The writable part must end with the one-byte status. Without it
        // the guest cannot be told anything; the chain is returned unused.
        let mut writer = match Writer::<()>::new(memory, chain.clone()) {
            Ok(writer) if writer.available_bytes() >= 1 => writer,
            Ok(_) | Err(_) => {
                counters.invalid_requests.fetch_add(1, Ordering::Relaxed);
                return Some((head, fallback_status(&chain, memory)));
            }
        };
        let data_writable = writer.available_bytes() - 1;
        let mut status = match writer.split_at(data_writable) {
            Ok(status) => status,
            Err(_) => return Some((head, 0)),
        };
        let fail = |status: &mut Writer<'_, ()>, code: u8, error: &dyn std::fmt::Display| {
            counters.invalid_requests.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(volume = %self.name, head, %error, "request refused");
            let _ = status.write_all(&[code]);
            Some((head, 1))
        };
        let mut reader = match Reader::<()>::new(memory, chain.clone()) {
            Ok(reader) => reader,
            Err(error) => return fail(&mut status, VIRTIO_BLK_S_IOERR, &error),
        };
        let header: RequestHeader = match reader.read_obj() {
            Ok(header) => header,
            Err(error) => return fail(&mut status, VIRTIO_BLK_S_IOERR, &error),
        };
        let readable = reader.available_bytes() as u64;
        let operation = match classify(&header, readable, data_writable as u64, &self.limits) {
            Ok(operation) => operation,
            Err(error) => return fail(&mut status, error.status(), &error),
        };
        let tag = u64::from(head);
        match operation {
            Operation::Read { offset, len } => match worker.queue.submit_read(tag, offset, len) {
                Ok(_) => {
                    worker.pending[usize::from(head)] = Some(Pending {
                        chain,
                        read_len: len,
                        bytes: len,
                    });
                    worker.bytes_in_flight += len;
                    None
                }
                Err(error) => fail(&mut status, VIRTIO_BLK_S_IOERR, &error),
            },
            Operation::Write { offset, len } => {
                let (slot, buf) = match worker.queue.begin_write(tag, offset, len) {
                    Ok(begun) => begun,
                    Err(error) => return fail(&mut status, VIRTIO_BLK_S_IOERR, &error),
                };
                if let Err(error) = reader.read_exact(buf) {
                    worker.queue.cancel(slot);
                    return fail(&mut status, VIRTIO_BLK_S_IOERR, &error);
                }
                if let Err(error) = worker.queue.submit_write(slot) {
                    return fail(&mut status, VIRTIO_BLK_S_IOERR, &error);
                }
                worker.pending[usize::from(head)] = Some(Pending {
                    chain,
                    read_len: 0,
                    bytes: len,
                });
                worker.bytes_in_flight += len;
                None
            }
            Operation::Flush => match worker.queue.submit_flush(tag) {
                Ok(_) => {
                    worker.pending[usize::from(head)] = Some(Pending {
                        chain,
                        read_len: 0,
                        bytes: 0,
                    });
                    None
                }
                Err(error) => fail(&mut status, VIRTIO_BLK_S_IOERR, &error),
            },
            Operation::GetId => {
                let id = device_id(&self.serial);
                let len = id.len().min(data_writable);
                if let Err(error) = writer.write_all(&id[..len]) {
                    return fail(&mut status, VIRTIO_BLK_S_IOERR, &error);
                }
                let _ = status.write_all(&[VIRTIO_BLK_S_OK]);
                Some((head, len as u32 + 1))
            }
            Operation::Unmap {
                segments,
                write_zeroes,
            } => {
                let mut code = VIRTIO_BLK_S_OK;
                for _ in 0..segments {
                    let result = reader
                        .read_obj::<DiscardSegment>()
                        .map_err(|e| e.to_string())
                        .and_then(|segment| {
                            check_segment(&segment, write_zeroes, &self.limits).map_err(
                                |e: RequestError| {
                                    code = e.status();
                                    e.to_string()
                                },
                            )
                        })
                        .and_then(|(offset, len)| {
                            worker.queue.unmap(offset, len).map_err(|e| e.to_string())
                        });
                    if let Err(error) = result {
                        if code == VIRTIO_BLK_S_OK {
                            code = VIRTIO_BLK_S_IOERR;
                        }
                        return fail(&mut status, code, &error);
                    }
                }
                counters.unmaps.fetch_add(1, Ordering::Relaxed);
                let _ = status.write_all(&[VIRTIO_BLK_S_OK]);
                Some((head, 1))
            }
        }
    }

    /// Finishes requests whose I/O completed: copies read data and status
    /// into guest memory and records their used lengths in `finished`.
    /// Returns whether any finished.
    fn reap(&self, worker: &mut Worker) -> bool {
        worker.queue.reap(&mut worker.completions);
        if worker.completions.is_empty() {
            return false;
        }
        let mut reaped = false;
        let memory = self.memory();
        let mut completions = std::mem::take(&mut worker.completions);
        for completion in completions.drain(..) {
            let head = completion.tag as u16;
            let pending = worker.pending[usize::from(head)].take();
            let data = worker.queue.data(completion.slot);
            if let Some(pending) = pending {
                worker.bytes_in_flight -= pending.bytes;
                self.count(&pending, &completion);
                // Without memory (the frontend is gone) nothing can be
                // written back; the request still leaves the order.
                let len = match memory.as_ref() {
                    Some(memory) => self.finish(memory, pending, &completion, data),
                    None => 0,
                };
                worker.finished[usize::from(head)] = Some(len);
                reaped = true;
            }
            worker.queue.release(completion.slot);
        }
        worker.completions = completions;
        reaped
    }

    /// Finishes requests whose I/O completed and returns to the guest those
    /// whose turn it is.
    fn complete(&self, worker: &mut Worker, vring: &Vring) -> std::io::Result<Completed> {
        let reaped = self.reap(worker);
        Ok(Completed {
            reaped,
            published: publish(worker, vring)?,
        })
    }

    fn count(&self, pending: &Pending, completion: &Completion) {
        let counters = &self.counters;
        if completion.result.is_err() {
            counters.io_errors.fetch_add(1, Ordering::Relaxed);
        } else if pending.read_len > 0 {
            counters.reads.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes_read
                .fetch_add(pending.read_len, Ordering::Relaxed);
        } else if pending.bytes > 0 {
            counters.writes.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes_written
                .fetch_add(pending.bytes, Ordering::Relaxed);
        } else {
            counters.flushes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Copies read data to the guest and writes the status byte. Returns the
    /// number of bytes written into the chain.
    fn finish(
        &self,
        memory: &Memory,
        pending: Pending,
        completion: &Completion,
        data: &[u8],
    ) -> u32 {
        let Ok(mut writer) = Writer::<()>::new(memory, pending.chain) else {
            return 0;
        };
        let data_len = writer.available_bytes().saturating_sub(1);
        let Ok(mut status) = writer.split_at(data_len) else {
            return 0;
        };
        let mut code = VIRTIO_BLK_S_OK;
        let mut written = 0;
        if let Err(error) = &completion.result {
            tracing::error!(volume = %self.name, %error, "request failed");
            code = VIRTIO_BLK_S_IOERR;
        } else if pending.read_len > 0 {
            if writer.write_all(data).is_ok() {
                written = data.len() as u32;
            } else {
                code = VIRTIO_BLK_S_IOERR;
            }
        }
        let _ = status.write_all(&[code]);
        written + 1
    }
}

/// For a chain whose writable buffers are not all in guest memory: writes
/// IOERR into its last descriptor if that one is device-writable and valid,
/// so the guest learns the request failed. Returns the used length (1 with
/// a status, 0 when the chain has nowhere to put one).
fn fallback_status(chain: &Chain, memory: &Memory) -> u32 {
    use vm_memory::{Bytes, GuestAddress};
    let Some(last) = chain.clone().last() else {
        tracing::warn!(
            head = chain.head_index(),
            "empty descriptor chain returned unused"
        );
        return 0;
    };
    let status_at = last
        .addr()
        .0
        .checked_add(u64::from(last.len()))
        .and_then(|end| end.checked_sub(1));
    match status_at {
        Some(address) if last.is_write_only() && last.len() >= 1 => {
            if memory
                .write_obj(VIRTIO_BLK_S_IOERR, GuestAddress(address))
                .is_ok()
            {
                tracing::warn!(
                    head = chain.head_index(),
                    "request with buffers outside guest memory failed"
                );
                return 1;
            }
            tracing::warn!(
                head = chain.head_index(),
                "request without a usable status byte returned unused"
            );
            0
        }
        _ => {
            tracing::warn!(
                head = chain.head_index(),
                "request without a status byte returned unused"
            );
            0
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.inner.workers.len()
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE_MAX
    }

    fn features(&self) -> u64 {
        BlkConfig::features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.inner.config.to_bytes();
        let start = offset as usize;
        let end = start.saturating_add(size as usize);
        if end > space.len() {
            tracing::warn!(offset, size, "frontend read past the config space");
            return Vec::new();
        }
        space[start..end].to_vec()
    }

    fn update_memory(&self, memory: GuestMemoryAtomic<Memory>) -> std::io::Result<()> {
        *self.inner.memory.write().expect("memory lock poisoned") = Some(memory);
        Ok(())
    }

    /// One worker thread per virtqueue: requests of different queues never
    /// wait for each other.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.workers.len())
            .map(|queue| 1u64 << queue)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    /// Completes every request of the queue before the frontend stops it
    /// (GET_VRING_BASE), so none is lost between two runs of the ring.
    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        let Some(worker) = self.inner.workers.get(queue_index as usize) else {
            return Ok(());
        };
        let mut worker = self.inner.lock(worker);
        let worker = &mut *worker;
        let Some(vring) = worker.vring.clone() else {
            return Ok(());
        };
        let mut completions = std::mem::take(&mut worker.completions);
        worker
            .queue
            .drain(&mut completions)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        worker.completions = completions;
        self.inner.complete(worker, &vring)?;
        self.inner.signal(&vring)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected epoll event set {evset:?}"
            )));
        }
        let inner = &self.inner;
        let (Some(worker), Some(vring)) = (inner.workers.get(thread_id), vrings.first()) else {
            return Ok(());
        };
        let mut worker = inner.lock(worker);
        let worker = &mut *worker;
        if worker.vring.is_none() {
            worker.vring = Some(vring.clone());
        }
        if device_event == completion_token(inner.workers.len()) || device_event == 0 {
            // Finish what is done and take new requests until neither
            // moves: a request that needed no I/O (a read of unwritten
            // blocks) finishes without an event of its own, and finished
            // requests make room for ones left on the ring.
            loop {
                let completed = inner.complete(worker, vring)?;
                if completed.published {
                    inner.signal(vring)?;
                }
                let took = inner.process_queue(worker, vring)?;
                if !took && !completed.reaped {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Hostile descriptor chains against the real request path: whatever a
    //! guest puts in its queue, the device answers with a status (or returns
    //! the chain unused), writes nothing outside the chain's device-writable
    //! buffers, and keeps serving.

    use super::*;
    use crate::meta::VolumeRecord;
    use crate::store::Store;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    const MEMORY_BYTES: u64 = 2 << 20;
    /// Guest memory below this holds the virtqueue; buffers live above.
    const BUFFERS_START: u64 = 0x10_0000;
    const VRING_DESC_F_NEXT: u16 = 1;
    const VRING_DESC_F_WRITE: u16 = 2;

    struct Rig {
        _dir: tempfile::TempDir,
        backend: BlkBackend,
        memory: GuestMemoryAtomic<Memory>,
        _record: VolumeRecord,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(
            dir.path(),
            crate::store::StoreOptions {
                direct_io: false,
                commit_interval: None,
            },
        )
        .expect("store");
        let record = store.create("fuzz", 1 << 20).expect("create");
        let volume = store.volume("fuzz").expect("volume");
        let backend = BlkBackend::new(volume, BlkOptions { queues_max: 1 }).expect("backend");
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_BYTES as usize)])
            .expect("memory");
        let memory = GuestMemoryAtomic::new(mmap);
        backend
            .update_memory(memory.clone())
            .expect("update_memory");
        Rig {
            _dir: dir,
            backend,
            memory,
            _record: record,
        }
    }

    #[derive(Debug, Clone)]
    struct Desc {
        addr: u64,
        len: u32,
        writable: bool,
    }

    /// Runs one chain through the device. Returns the used length reported
    /// for it (None if it never completed) and the guest buffer area before
    /// and after.
    fn run_chain(
        rig: &Rig,
        descs: &[Desc],
        header: Option<RequestHeader>,
    ) -> (Option<u32>, Vec<u8>, Vec<u8>) {
        let guard = rig.memory.memory();
        let mem: &Memory = &guard;
        let area = (MEMORY_BYTES - BUFFERS_START) as usize;
        mem.write_slice(&vec![0xaa; area], GuestAddress(BUFFERS_START))
            .expect("fill");
        if let (Some(header), Some(first)) = (header, descs.first()) {
            let _ = mem.write_obj(header, GuestAddress(first.addr));
        }
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, i as u16 + 1))
            })
            .collect();
        let mock = MockSplitQueue::create(mem, GuestAddress(0), 16);
        mock.add_desc_chains(&raw, 0).expect("queue set-up");
        let mut queue: Queue = mock.create_queue().expect("queue");
        let mut before = vec![0u8; area];
        mem.read_slice(&mut before, GuestAddress(BUFFERS_START))
            .expect("snapshot");
        let chain = queue
            .pop_descriptor_chain(rig.memory.memory())
            .expect("one chain");
        let inner = &rig.backend.inner;
        let mut worker = inner.lock(&inner.workers[0]);
        let worker = &mut *worker;
        let chain_head = chain.head_index();
        let mut used_len = inner.start_request(worker, chain, mem).map(|(_, len)| len);
        if used_len.is_none() {
            worker.queue.submit().expect("submit");
            let mut completions = std::mem::take(&mut worker.completions);
            worker.queue.drain(&mut completions).expect("drain");
            worker.completions = completions;
            let head = usize::from(chain_head);
            if inner.reap(worker) {
                used_len = worker.finished[head].take();
            }
        }
        assert_eq!(worker.queue.in_flight(), 0, "a request slot leaked");
        let mut after = vec![0u8; area];
        mem.read_slice(&mut after, GuestAddress(BUFFERS_START))
            .expect("snapshot");
        (used_len, before, after)
    }

    fn status_of(rig: &Rig, descs: &[Desc]) -> u8 {
        let last = descs.last().expect("a chain");
        let mut status = [0u8];
        rig.memory
            .memory()
            .read_slice(
                &mut status,
                GuestAddress(last.addr + u64::from(last.len) - 1),
            )
            .expect("status");
        status[0]
    }

    fn header(request_type: u32, sector: u64) -> RequestHeader {
        RequestHeader {
            request_type,
            ioprio: 0,
            sector,
        }
    }

    fn read_chain(sector_buf: u64, len: u32) -> Vec<Desc> {
        vec![
            Desc {
                addr: BUFFERS_START,
                len: 16,
                writable: false,
            },
            Desc {
                addr: sector_buf,
                len,
                writable: true,
            },
            Desc {
                addr: sector_buf + u64::from(len),
                len: 1,
                writable: true,
            },
        ]
    }

    #[test]
    fn well_formed_write_then_read() {
        let rig = rig();
        let write = vec![
            Desc {
                addr: BUFFERS_START,
                len: 16,
                writable: false,
            },
            Desc {
                addr: BUFFERS_START + 0x1000,
                len: 8192,
                writable: false,
            },
            Desc {
                addr: BUFFERS_START + 0x4000,
                len: 1,
                writable: true,
            },
        ];
        let (used, _, _) = run_chain(&rig, &write, Some(header(VIRTIO_BLK_T_OUT_FOR_TESTS, 8)));
        assert_eq!(used, Some(1));
        assert_eq!(status_of(&rig, &write), VIRTIO_BLK_S_OK);
        let read = read_chain(BUFFERS_START + 0x8000, 8192);
        let (used, _, after) = run_chain(&rig, &read, Some(header(0, 8)));
        assert_eq!(used, Some(8193));
        assert_eq!(status_of(&rig, &read), VIRTIO_BLK_S_OK);
        // The write sent 0xaa (the fill); the read returns it.
        assert!(after[0x8000..0x8000 + 8192].iter().all(|&b| b == 0xaa));
    }

    const VIRTIO_BLK_T_OUT_FOR_TESTS: u32 = super::super::request::VIRTIO_BLK_T_OUT;

    #[test]
    fn named_malformed_chains() {
        let rig = rig();
        let cases: Vec<(&str, Vec<Desc>, RequestHeader, Option<u8>)> = vec![
            (
                "no status byte",
                vec![Desc {
                    addr: BUFFERS_START,
                    len: 16,
                    writable: false,
                }],
                header(0, 0),
                None,
            ),
            (
                "header too short",
                vec![
                    Desc {
                        addr: BUFFERS_START,
                        len: 8,
                        writable: false,
                    },
                    Desc {
                        addr: BUFFERS_START + 0x100,
                        len: 1,
                        writable: true,
                    },
                ],
                header(0, 0),
                Some(VIRTIO_BLK_S_IOERR),
            ),
            (
                "unknown type",
                read_chain(BUFFERS_START + 0x1000, 4096),
                header(77, 0),
                Some(super::super::request::VIRTIO_BLK_S_UNSUPP),
            ),
            (
                "past the end",
                read_chain(BUFFERS_START + 0x1000, 4096),
                header(0, 2048),
                Some(VIRTIO_BLK_S_IOERR),
            ),
            (
                "unaligned length",
                read_chain(BUFFERS_START + 0x1000, 512),
                header(0, 0),
                Some(VIRTIO_BLK_S_IOERR),
            ),
            (
                "data outside guest memory",
                vec![
                    Desc {
                        addr: BUFFERS_START,
                        len: 16,
                        writable: false,
                    },
                    Desc {
                        addr: MEMORY_BYTES - 0x800,
                        len: 4096,
                        writable: true,
                    },
                    Desc {
                        addr: BUFFERS_START + 0x100,
                        len: 1,
                        writable: true,
                    },
                ],
                header(0, 0),
                Some(VIRTIO_BLK_S_IOERR),
            ),
            (
                "read with device-readable data",
                vec![
                    Desc {
                        addr: BUFFERS_START,
                        len: 16,
                        writable: false,
                    },
                    Desc {
                        addr: BUFFERS_START + 0x1000,
                        len: 4096,
                        writable: false,
                    },
                    Desc {
                        addr: BUFFERS_START + 0x100,
                        len: 1,
                        writable: true,
                    },
                ],
                header(0, 0),
                Some(VIRTIO_BLK_S_IOERR),
            ),
        ];
        for (name, descs, header, expected) in cases {
            let (used, before, after) = run_chain(&rig, &descs, Some(header));
            match expected {
                Some(status) => {
                    assert_eq!(used, Some(1), "{name}");
                    assert_eq!(status_of(&rig, &descs), status, "{name}");
                }
                None => assert_eq!(used, Some(0), "{name}: returned unused"),
            }
            let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            assert!(changed <= 1, "{name}: {changed} bytes changed");
        }
        let counted = rig
            .backend
            .counters()
            .invalid_requests
            .load(Ordering::Relaxed);
        assert_eq!(counted, 7);
        // The device still serves.
        let read = read_chain(BUFFERS_START + 0x1000, 4096);
        let (used, _, _) = run_chain(&rig, &read, Some(header(0, 0)));
        assert_eq!(used, Some(4097));
    }

    fn arb_desc() -> impl Strategy<Value = Desc> {
        let addr = prop_oneof![
            4 => BUFFERS_START..MEMORY_BYTES,
            1 => any::<u64>(),
            1 => (MEMORY_BYTES - 0x2000)..(MEMORY_BYTES + 0x2000),
        ];
        let len = prop_oneof![
            4 => 0u32..=16_384,
            1 => prop_oneof![Just(16u32), Just(1), Just(4096), Just(8192)],
            1 => any::<u32>(),
        ];
        (addr, len, any::<bool>()).prop_map(|(addr, len, writable)| Desc {
            addr,
            len,
            writable,
        })
    }

    fn arb_header() -> impl Strategy<Value = RequestHeader> {
        let request_type = prop_oneof![
            Just(0u32),
            Just(1),
            Just(4),
            Just(8),
            Just(11),
            Just(13),
            any::<u32>()
        ];
        let sector = prop_oneof![(0u64..300).prop_map(|s| s * 8), 0u64..4096, any::<u64>()];
        (request_type, sector).prop_map(|(t, s)| header(t, s))
    }

    #[test]
    fn hostile_chains_never_escape_their_buffers() {
        let rig = rig();
        let mut runner = TestRunner::new(Config {
            cases: 300,
            ..Config::default()
        });
        let strategy = (proptest::collection::vec(arb_desc(), 1..6), arb_header());
        runner
            .run(&strategy, |(descs, header)| {
                let (used, before, after) = run_chain(&rig, &descs, Some(header));
                let writable: Vec<(u64, u64)> = descs
                    .iter()
                    .filter(|d| d.writable)
                    .map(|d| (d.addr, d.addr.saturating_add(u64::from(d.len))))
                    .collect();
                for (offset, (a, b)) in before.iter().zip(&after).enumerate() {
                    if a != b {
                        let address = BUFFERS_START + offset as u64;
                        prop_assert!(
                            writable
                                .iter()
                                .any(|&(start, end)| (start..end).contains(&address)),
                            "byte at {address:#x} changed outside the writable buffers"
                        );
                    }
                }
                let writable_total: u64 = writable.iter().map(|(s, e)| e - s).sum();
                prop_assert!(used.is_some(), "every chain completes");
                prop_assert!(u64::from(used.unwrap_or(0)) <= writable_total);
                Ok(())
            })
            .expect("hostile chains");
        // After all that, a well-formed request still works.
        let read = read_chain(BUFFERS_START + 0x1000, 4096);
        let (used, _, _) = run_chain(&rig, &read, Some(header(0, 0)));
        assert_eq!(used, Some(4097));
        assert_eq!(status_of(&rig, &read), VIRTIO_BLK_S_OK);
    }
}
