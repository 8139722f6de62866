//! vhost-user-net ports: the device side of a guest's virtio-net NIC, up
//! to [`QUEUE_PAIRS_MAX`] pairs of receive and transmit queues (MQ), joined
//! to the node's [`Fabric`].
//!
//! A frame a guest transmits is read out of its descriptor chain into the
//! port's own buffer (sized when the port is made), switched, and copied
//! into the receive buffers of each port it goes to, by the transmitting
//! port's worker thread. Every chain is checked: one that is not readable
//! guest memory, is shorter than a virtio-net header and an Ethernet
//! header, longer than the largest frame, or asks for offloads the port
//! did not offer is dropped and counted; the chain goes back to the guest
//! and the port keeps working.
//!
//! Frames for other nodes leave through a [`Tunnel`] (the cluster
//! transport, given by `fabricd`); frames from other nodes come in through
//! [`Fabric::receive`].

use std::collections::HashMap;
use std::num::Wrapping;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::frame::{rewrite, Egress, Mac, VLAN_TAG_BYTES};
use crate::ring::{needs_signal, publish_used, Memory, RegionCache, RingView};
use crate::switch::{
    DropReason, PortConfig, PortCounters, PortId, SegmentId, Switch, SwitchError, Switched,
};

type Vring = VringRwLock<GuestMemoryAtomic<Memory>>;

const VIRTIO_NET_F_MAC: u64 = 5;
const VIRTIO_NET_F_MRG_RXBUF: u64 = 15;
const VIRTIO_NET_F_STATUS: u64 = 16;
/// The guest announces itself (gratuitous ARP) when its frontend asks,
/// after a migration: QEMU passes the bit on only if the backend offers
/// it, and keeps the control queue and the status bit itself.
const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 21;
const VIRTIO_NET_F_MQ: u64 = 22;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 29;
const VIRTIO_F_VERSION_1: u64 = 32;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Bytes of the virtio-net header in front of every frame (VERSION_1).
pub const NET_HEADER_BYTES: usize = 12;
/// Largest virtqueue a port accepts.
pub const QUEUE_SIZE_MAX: usize = 1024;
/// Receive buffers a frame may take with MRG_RXBUF.
const RX_BUFFERS_MAX: usize = 64;
/// Frames taken off a transmit queue before the guests they went to are
/// told (and the queue is let go, for a moment).
pub(crate) const TX_BATCH: usize = 64;

/// How many chains ahead of the one being walked the buffers are asked
/// for (see [`RingView`]), and how much of each: the virtio-net header
/// and the frame's headers.
const PREFETCH_AHEAD: usize = 8;
const PREFETCH_BYTES: usize = 128;

/// How long a transmit queue that ran dry is polled for more frames
/// before the worker asks the driver to kick it and sleeps.
const TX_POLL: Duration = Duration::from_micros(20);

/// Batches one transmit queue may take in a turn before the port's other
/// queues get theirs.
const TX_BATCHES_PER_EVENT: usize = 8;

/// Queue pairs a port offers (MQ). Queue `2i` receives and `2i + 1`
/// transmits; the frontend's control queue, if any, is its own.
pub const QUEUE_PAIRS_MAX: usize = 4;

/// The way to another node's switch.
pub trait Tunnel: Send + Sync + std::fmt::Debug {
    /// Sends an untagged frame of `segment` and `vlan` to the other node;
    /// `Unreachable` if it cannot be sent now.
    fn send(&self, segment: SegmentId, vlan: u16, frame: &[u8]) -> Result<(), DropReason>;
}

/// Where a port's frames go.
#[derive(Debug, Clone)]
pub(crate) enum Sink {
    Guest(Arc<Receiver>),
    Tunnel(Arc<dyn Tunnel>),
    /// A host port's interface.
    Host(Arc<crate::tap::Tap>),
}

/// A node's switch and the receiving side of each of its ports.
#[derive(Debug)]
pub struct Fabric {
    switch: Mutex<Switch>,
    receivers: RwLock<HashMap<PortId, Sink>>,
    origin: Instant,
    pub(crate) frame_bytes_max: usize,
}

impl Fabric {
    pub fn new(switch: Switch, frame_bytes_max: usize) -> Arc<Fabric> {
        Arc::new(Fabric {
            switch: Mutex::new(switch),
            receivers: RwLock::default(),
            origin: Instant::now(),
            frame_bytes_max,
        })
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn switch(&self) -> std::sync::MutexGuard<'_, Switch> {
        self.switch.lock().expect("switch poisoned")
    }

    /// Adds a port to the switch and returns its device backend.
    pub fn add_port(
        self: &Arc<Self>,
        id: PortId,
        config: PortConfig,
    ) -> Result<NetBackend, SwitchError> {
        let mac = config.mac;
        let receiver = Arc::new(Receiver::default());
        self.add_sink(id, config, Sink::Guest(receiver.clone()))?;
        Ok(NetBackend {
            inner: Arc::new(Inner {
                id,
                mac: mac.unwrap_or(Mac([0x02, 0, 0, 0, 0, 1])),
                fabric: self.clone(),
                receiver,
                memory: RwLock::default(),
                transmit: Mutex::new(Transmit {
                    batch: Batch::new(self.frame_bytes_max),
                    scratch: self.scratch(),
                }),
            }),
        })
    }

    /// Adds a port to the switch, its frames going to `sink`.
    pub(crate) fn add_sink(
        &self,
        id: PortId,
        config: PortConfig,
        sink: Sink,
    ) -> Result<(), SwitchError> {
        self.switch().add_port(id, config, self.now())?;
        self.receivers
            .write()
            .expect("receivers poisoned")
            .insert(id, sink);
        Ok(())
    }

    /// Buffers for switching frames, sized for this switch: one per
    /// thread that calls [`Fabric::receive`].
    pub fn scratch(&self) -> Scratch {
        Scratch {
            rewritten: vec![0; self.frame_bytes_max + VLAN_TAG_BYTES],
            out: Vec::with_capacity(64),
            results: Vec::with_capacity(64),
            signal: Vec::with_capacity(64),
            switched: Vec::with_capacity(TX_BATCH),
            outs: Vec::with_capacity(4 * TX_BATCH),
        }
    }

    /// Adds a tunnel to another node, carrying no segment yet.
    pub fn add_tunnel(&self, id: PortId, tunnel: Arc<dyn Tunnel>) -> Result<(), SwitchError> {
        self.switch().add_tunnel(id)?;
        self.receivers
            .write()
            .expect("receivers poisoned")
            .insert(id, Sink::Tunnel(tunnel));
        Ok(())
    }

    /// Sets the segments a tunnel carries.
    pub fn set_tunnel_segments(
        &self,
        id: PortId,
        segments: std::collections::BTreeSet<SegmentId>,
    ) -> Result<(), SwitchError> {
        self.switch().set_tunnel_segments(id, segments)
    }

    /// Switches a frame that came through tunnel `from` and delivers it to
    /// the ports here; their guests are told by the next
    /// [`Fabric::signal`] (once for a run of frames).
    pub fn receive(
        &self,
        from: PortId,
        segment: SegmentId,
        vlan: u16,
        frame: &[u8],
        scratch: &mut Scratch,
    ) {
        let switched = self.switch().switch_from_tunnel(
            self.now(),
            from,
            segment,
            vlan,
            frame,
            &mut scratch.out,
        );
        if let Ok(switched) = switched {
            scratch.switched.clear();
            scratch.switched.push(Some(switched));
            scratch.outs.clear();
            scratch
                .outs
                .extend(scratch.out.iter().map(|&(to, egress)| (0, to, egress)));
            self.deliver(|_| frame, scratch);
        }
    }

    /// Removes a port; frames to it are no longer delivered.
    pub fn remove_port(&self, id: PortId) -> Result<PortCounters, SwitchError> {
        self.receivers
            .write()
            .expect("receivers poisoned")
            .remove(&id);
        self.switch().remove_port(id)
    }

    /// Sets a port's link up or down: while down it sends and receives
    /// nothing (counted as `link_down`). A host port's interface loses
    /// its carrier too, so the host sees the link down.
    pub fn set_link(&self, id: PortId, up: bool) -> Result<(), SwitchError> {
        self.switch().set_link(id, up)?;
        let receivers = self.receivers.read().expect("receivers poisoned");
        if let Some(Sink::Host(tap)) = receivers.get(&id) {
            if let Err(error) = tap.set_carrier(up) {
                tracing::warn!(port = id, interface = tap.name(), %error, "cannot set a host port's carrier");
            }
        }
        Ok(())
    }

    pub fn counters(&self, id: PortId) -> Option<PortCounters> {
        self.switch().counters(id).cloned()
    }

    /// Switches a batch of frames from port `from` and delivers them: the
    /// switch is locked once to switch them all and once to count them,
    /// the receivers' table read once. The guests they went to are told by
    /// the next [`Fabric::signal`]. Used by the ports' transmit paths.
    pub(crate) fn forward_batch(&self, from: PortId, batch: &Batch, scratch: &mut Scratch) {
        let now = self.now();
        scratch.switched.clear();
        scratch.outs.clear();
        {
            let mut switch = self.switch();
            for &reason in &batch.refused {
                switch.count_drop(from, reason);
            }
            for index in 0..batch.count {
                match switch.switch(now, from, batch.frame(index), &mut scratch.out) {
                    Ok(switched) => {
                        scratch.switched.push(Some(switched));
                        scratch
                            .outs
                            .extend(scratch.out.iter().map(|&(to, egress)| (index, to, egress)));
                    }
                    Err(_) => scratch.switched.push(None),
                }
            }
        }
        self.deliver(|index| batch.frame(index), scratch);
    }

    /// Delivers switched frames (`frame(index)`; `scratch.switched` and
    /// `scratch.outs` say where each goes), and counts: the receivers'
    /// table is read once, a receiver held once for frames in a row to it,
    /// the switch locked once to count. Guests are told of new frames by
    /// [`Fabric::signal`], once per batch.
    fn deliver<'f>(&self, frame: impl Fn(usize) -> &'f [u8], scratch: &mut Scratch) {
        let Scratch {
            rewritten,
            results,
            signal,
            switched,
            outs,
            ..
        } = scratch;
        results.clear();
        {
            let receivers = self.receivers.read().expect("receivers poisoned");
            // Frames in a row to one port are one run: the table is looked
            // up once, and a receiving guest is held once, for the run.
            let mut rest = &outs[..];
            while let Some(&(_, to, _)) = rest.first() {
                let length = rest.iter().take_while(|&&(_, port, _)| port == to).count();
                let (run, later) = rest.split_at(length);
                rest = later;
                let frames = run.iter().filter_map(|&(index, _, egress)| {
                    switched[index].map(|switched| (index, switched, egress))
                });
                match receivers.get(&to) {
                    Some(Sink::Guest(receiver)) => {
                        // Signalled even when a frame found no room: the
                        // guest may have buffers given back to it unused.
                        if !signal.contains(&to) {
                            signal.push(to);
                        }
                        receiver.deliver_run(to, frames, &frame, rewritten, results);
                    }
                    sink => {
                        for (index, switched, egress) in frames {
                            let frame = egress_frame(frame(index), switched, egress, rewritten);
                            let delivered = match sink {
                                Some(Sink::Tunnel(tunnel)) => {
                                    tunnel.send(switched.segment, switched.vlan, frame)
                                }
                                Some(Sink::Host(tap)) => tap.write(frame),
                                Some(Sink::Guest(_)) | None => Err(DropReason::NoRoom),
                            };
                            results.push((to, delivered.map(|()| frame.len())));
                        }
                    }
                }
            }
        }
        let mut switch = self.switch();
        for &(to, result) in results.iter() {
            match result {
                Ok(len) => switch.count_tx(to, len),
                Err(reason) => switch.count_drop(to, reason),
            }
        }
    }

    /// Tells the guests of the ports frames were delivered to since the
    /// last call (as their event index asks).
    pub fn signal(&self, scratch: &mut Scratch) {
        if scratch.signal.is_empty() {
            return;
        }
        let receivers = self.receivers.read().expect("receivers poisoned");
        for to in scratch.signal.drain(..) {
            if let Some(Sink::Guest(receiver)) = receivers.get(&to) {
                receiver.signal();
            }
        }
    }
}

/// `frame` as it leaves on a port with `egress`: itself, or rewritten
/// into `rewritten` with its VLAN tag added or removed.
fn egress_frame<'a>(
    frame: &'a [u8],
    switched: Switched,
    egress: Egress,
    rewritten: &'a mut [u8],
) -> &'a [u8] {
    let unchanged = match egress {
        Egress::Untagged => !switched.tagged,
        Egress::Tagged(vlan) => switched.tagged && vlan == switched.vlan,
    };
    if unchanged {
        frame
    } else {
        let len = rewrite(frame, switched.tagged, egress, rewritten);
        &rewritten[..len]
    }
}

/// Buffers of a port's transmit path, sized when the port is made.
#[derive(Debug)]
struct Transmit {
    /// The frames read out of the guest's chains.
    batch: Batch,
    scratch: Scratch,
}

/// What switching one frame needs besides the frame.
#[derive(Debug)]
pub struct Scratch {
    /// The frame as it leaves on a port (tag added or removed).
    rewritten: Vec<u8>,
    out: Vec<(PortId, Egress)>,
    results: Vec<(PortId, Result<usize, DropReason>)>,
    /// Ports whose guests have frames they were not told of yet.
    signal: Vec<PortId>,
    /// A batch's frames as switched (`None`: dropped).
    switched: Vec<Option<Switched>>,
    /// A batch's deliveries: (frame, port, egress).
    outs: Vec<(usize, PortId, Egress)>,
}

/// Frames taken off a transmit queue (or read from a host port),
/// switched together.
#[derive(Debug)]
pub(crate) struct Batch {
    /// [`TX_BATCH`] slots of `slot_bytes`: each a virtio-net header and a
    /// frame.
    frames: Vec<u8>,
    slot_bytes: usize,
    lens: [usize; TX_BATCH],
    pub(crate) count: usize,
    /// Chains refused (dropped and counted), by reason.
    pub(crate) refused: Vec<DropReason>,
}

impl Batch {
    pub(crate) fn new(frame_bytes_max: usize) -> Batch {
        let slot_bytes = NET_HEADER_BYTES + frame_bytes_max;
        Batch {
            frames: vec![0; TX_BATCH * slot_bytes],
            slot_bytes,
            lens: [0; TX_BATCH],
            count: 0,
            refused: Vec::with_capacity(TX_BATCH),
        }
    }

    pub(crate) fn clear(&mut self) {
        self.count = 0;
        self.refused.clear();
    }

    /// The next slot, to read a chain into.
    pub(crate) fn slot(&mut self) -> &mut [u8] {
        let start = self.count * self.slot_bytes;
        &mut self.frames[start..start + self.slot_bytes]
    }

    /// Keeps the frame just read into the next slot.
    pub(crate) fn push(&mut self, len: usize) {
        self.lens[self.count] = len;
        self.count += 1;
    }

    /// Frame `index`, without its virtio-net header.
    fn frame(&self, index: usize) -> &[u8] {
        let start = index * self.slot_bytes + NET_HEADER_BYTES;
        &self.frames[start..start + self.lens[index]]
    }
}

/// The receiving side of a port: its receive queue, once the frontend has
/// set it up.
#[derive(Debug, Default)]
pub(crate) struct Receiver {
    state: Mutex<ReceiveState>,
}

#[derive(Default)]
struct ReceiveState {
    /// Each queue pair's receive queue, once the frontend set them up.
    vrings: Vec<Vring>,
    memory: Option<GuestMemoryAtomic<Memory>>,
    merge: bool,
    /// Per pair: buffers filled in the current run and not yet on the used
    /// ring (head, bytes written); published when the run ends.
    pending: [Vec<(u16, u32)>; QUEUE_PAIRS_MAX],
    /// Per pair: the used index before the first buffers the guest was
    /// not told of yet.
    unsignalled: [Option<Wrapping<u16>>; QUEUE_PAIRS_MAX],
}

/// The receive queue a frame goes to among `ready` ones (pair numbers):
/// chosen by a hash of its flow (MACs; for untagged IPv4, the addresses
/// and, for TCP and UDP, the ports), so a flow stays on one queue, in
/// order, and flows spread over the queues.
pub fn receive_queue(frame: &[u8], ready: &[usize]) -> Option<usize> {
    if ready.is_empty() {
        return None;
    }
    let fnv = |hash: u64, bytes: &[u8]| {
        bytes.iter().fold(hash, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let mut hash = fnv(0xcbf2_9ce4_8422_2325, frame.get(..12).unwrap_or(frame));
    const IPV4: [u8; 2] = [0x08, 0x00];
    if frame.get(12..14) == Some(&IPV4[..]) {
        if let Some(ip) = frame.get(14..34) {
            hash = fnv(hash, &ip[12..20]);
            let header = usize::from(ip[0] & 0x0f) * 4;
            let protocol = ip[9];
            if matches!(protocol, 6 | 17) {
                if let Some(ports) = frame.get(14 + header..14 + header + 4) {
                    hash = fnv(hash, ports);
                }
            }
        }
    }
    Some(ready[(hash % ready.len() as u64) as usize])
}

impl std::fmt::Debug for ReceiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveState")
            .field("queues", &self.vrings.len())
            .field("merge", &self.merge)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// Tells the guest of used buffers on the receive queues given frames
    /// since the last call, if its event index asks for it.
    fn signal(&self) {
        let mut state = self.state.lock().expect("receiver poisoned");
        let unsignalled = std::mem::take(&mut state.unsignalled);
        let Some(memory) = state.memory.as_ref().map(GuestMemoryAtomic::memory) else {
            return;
        };
        for (vring, since) in state.vrings.iter().zip(unsignalled) {
            if let Some(since) = since {
                signal(vring, &*memory, since);
            }
        }
    }

    /// Copies a run of frames to this port (`frames`: index, how it was
    /// switched, how it leaves) into the guest's receive buffers, each
    /// after a virtio-net header (several buffers a frame with
    /// MRG_RXBUF), on one of the receive queues that are up, and records
    /// in `results` how each went (`NoRoom` where the guest had not given
    /// enough buffers).
    ///
    /// The receiver's lock, guest memory and each ring that is up are
    /// taken once for the run (the frontend cannot stop or disable a ring
    /// until the run is over), and each ring's available index is read
    /// once, and again only when the buffers it offered run out: the
    /// driver writes that index from its own processor, so every read
    /// can cost a cache miss. The buffers the run filled go on the used
    /// rings when it ends, with one store of each used index; the guest is
    /// told later, by [`Receiver::signal`].
    fn deliver_run<'f>(
        &self,
        to: PortId,
        frames: impl Iterator<Item = (usize, Switched, Egress)> + Clone,
        frame: &impl Fn(usize) -> &'f [u8],
        rewritten: &mut [u8],
        results: &mut Vec<(PortId, Result<usize, DropReason>)>,
    ) {
        let mut state = self.state.lock().expect("receiver poisoned");
        let ReceiveState {
            vrings,
            memory,
            merge,
            pending,
            unsignalled,
        } = &mut *state;
        let memory = memory.as_ref().map(GuestMemoryAtomic::memory);
        let memory = memory.as_deref().map(RegionCache::new);
        let mut rings: [Option<RingHold<'_>>; QUEUE_PAIRS_MAX] = Default::default();
        let mut ready = [0usize; QUEUE_PAIRS_MAX];
        let mut count = 0;
        for (pair, vring) in vrings.iter().enumerate().take(QUEUE_PAIRS_MAX) {
            let ring = vring.get_mut();
            if ring.is_enabled() && ring.get_queue().ready() {
                rings[pair] = Some(ring);
                ready[count] = pair;
                count += 1;
            }
        }
        let Some(memory) = memory.as_ref().filter(|_| count > 0) else {
            results.extend(frames.map(|_| (to, Err(DropReason::NoRoom))));
            return;
        };
        for &pair in &ready[..count] {
            let Some(ring) = rings[pair].as_mut() else {
                continue;
            };
            let queue = ring.get_queue_mut();
            // The switch never waits for receive buffers (a frame that
            // finds none is dropped), so the driver need not kick when it
            // adds them: without EVENT_IDX this sets NO_NOTIFY (with it,
            // the event index is never moved, and the driver kicks at most
            // once per wrap of its index).
            let _ = queue.disable_notification(memory);
            // The ring's view, made where its available index is read: at
            // the pair's first frame, and again when what it offered is
            // used up.
            let mut view: Option<RingView> = None;
            // Frames this ring took since the view was made: about the
            // buffers it used (a hint for prefetching only).
            let mut served = 0;
            // A driver cannot have more chains out than its ring holds; one
            // that moves its index on regardless gets no more in this run.
            let size = usize::from(queue.size());
            let pending = &mut pending[pair];
            // Once per port, for the runs of a well-behaved guest (a ring
            // has at most this many buffers out at once).
            pending.reserve(QUEUE_SIZE_MAX);
            // The available index is read at the pair's first frame (a
            // pair no frame of the run goes to costs nothing). A ring whose
            // index is out of range offers nothing (as a pop would).
            let mut offered = None;
            // Buffers the current frame took: (head, bytes written). Made
            // once per ring, not per frame: zeroing it is 128 stores, and
            // stores queue behind the copies into guest memory.
            let mut used = [(0u16, 0u32); RX_BUFFERS_MAX];
            for (index, switched, egress) in frames.clone() {
                let frame = egress_frame(frame(index), switched, egress, rewritten);
                if count > 1 && receive_queue(frame, &ready[..count]) != Some(pair) {
                    continue;
                }
                if let Some(view) = &view {
                    view.prefetch(served + PREFETCH_AHEAD, PREFETCH_BYTES);
                }
                served += 1;
                let needed = NET_HEADER_BYTES + frame.len();
                let mut taken = 0;
                let mut written = 0usize;
                // Where the first buffer's num_buffers field is.
                let mut num_buffers_at = None;
                let failed = loop {
                    if written == needed {
                        break None;
                    }
                    if taken == RX_BUFFERS_MAX
                        || (taken == 1 && !*merge)
                        || pending.len() + taken >= size
                    {
                        break Some(DropReason::NoRoom);
                    }
                    let mut chain = offered.as_mut().and_then(Iterator::next);
                    if chain.is_none() {
                        // Not read yet, or what it offered is used up:
                        // read it (again), and look ahead from there.
                        view = RingView::new(memory, queue, true);
                        if let Some(view) = &view {
                            view.prefetch_first(PREFETCH_AHEAD, PREFETCH_BYTES);
                        }
                        served = 1;
                        offered = queue.iter(memory).ok();
                        chain = offered.as_mut().and_then(Iterator::next);
                    }
                    let Some(chain) = chain else {
                        break Some(DropReason::NoRoom);
                    };
                    let head = chain.head_index();
                    let first = num_buffers_at.is_none();
                    let mut header = [0u8; NET_HEADER_BYTES];
                    header[10..12].copy_from_slice(&1u16.to_le_bytes());
                    let (header, body): (&[u8], &[u8]) = if first {
                        (&header, frame)
                    } else {
                        (&[], &frame[written - NET_HEADER_BYTES..])
                    };
                    // One descriptor: read through the view (the function
                    // made for `Once` is the one the common case runs).
                    let filled = match view.as_ref().and_then(|view| view.lone(head)) {
                        Some(descriptor) => fill(memory, std::iter::once(descriptor), header, body),
                        None => fill(memory, chain, header, body),
                    };
                    match filled {
                        Ok((length, start)) => {
                            if first {
                                num_buffers_at = Some(start.unchecked_add(10));
                            }
                            written += length;
                            used[taken] = (head, length as u32);
                            taken += 1;
                        }
                        Err(()) if first => {
                            // A buffer that is not writable guest memory
                            // (or too small for a header) goes back to the
                            // guest empty, so it cannot block the queue.
                            pending.push((head, 0));
                        }
                        Err(()) => {
                            taken += 1;
                            break Some(DropReason::NoRoom);
                        }
                    }
                };
                let delivered = match (failed, num_buffers_at) {
                    (None, Some(at)) => {
                        if taken > 1 {
                            let _ = memory.write_obj((taken as u16).to_le(), at);
                        }
                        pending.extend_from_slice(&used[..taken]);
                        Ok(frame.len())
                    }
                    (failed, _) => {
                        // Give back, unused, the buffers this frame took.
                        if taken > 0 {
                            for _ in 0..taken {
                                queue.go_to_previous_position();
                            }
                            offered = None;
                        }
                        Err(failed.unwrap_or(DropReason::NoRoom))
                    }
                };
                results.push((to, delivered));
            }
            if pending.is_empty() {
                continue;
            }
            let since = Wrapping(queue.next_used());
            match publish_used(queue, memory, pending) {
                Ok(()) => {
                    unsignalled[pair].get_or_insert(since);
                }
                Err(error) => {
                    tracing::debug!(%error, pair, "a port's used ring is not in guest memory");
                    // Only this run took buffers off the ring since it
                    // began (a frame that failed gave its own back): the
                    // last ones taken are exactly these.
                    for _ in 0..pending.len() {
                        queue.go_to_previous_position();
                    }
                }
            }
            pending.clear();
        }
    }
}

/// A receive ring held for a run of frames.
type RingHold<'a> =
    std::sync::RwLockWriteGuard<'a, vhost_user_backend::VringState<GuestMemoryAtomic<Memory>>>;

/// Writes `header` then `body` into a receive chain's buffers (its
/// `descriptors`), as far as they go. Returns the bytes written and where
/// the chain starts; `Err` if a buffer is not writable guest memory, or
/// the first is too small for `header` (so it can be patched in place).
fn fill(
    memory: &RegionCache,
    descriptors: impl Iterator<Item = Descriptor>,
    header: &[u8],
    body: &[u8],
) -> Result<(usize, GuestAddress), ()> {
    let mut start = None;
    let mut written = 0;
    let total = header.len() + body.len();
    for descriptor in descriptors {
        if written == total {
            break;
        }
        if !descriptor.is_write_only() {
            return Err(());
        }
        let address = descriptor.addr();
        let room = descriptor.len() as usize;
        if start.is_none() {
            if room < header.len() {
                return Err(());
            }
            start = Some(address);
        }
        let mut at = address;
        let mut left = room;
        // The header fits the first buffer; the body goes where there is room.
        if written < header.len() {
            write_guest(memory, at, header)?;
            at = at.unchecked_add(header.len() as u64);
            left -= header.len();
            written = header.len();
        }
        let from = written - header.len();
        let take = left.min(body.len() - from);
        if take > 0 {
            write_guest(memory, at, &body[from..from + take])?;
            written += take;
        }
    }
    match start {
        Some(start) if written > 0 => Ok((written, start)),
        _ => Err(()),
    }
}

/// Reads a transmitted chain (its `descriptors`: virtio-net header, then
/// the frame) into `buffer`; returns the frame's length.
fn read_frame(
    memory: &RegionCache,
    descriptors: impl Iterator<Item = Descriptor>,
    buffer: &mut [u8],
) -> Result<usize, DropReason> {
    let mut total = 0usize;
    for descriptor in descriptors {
        if descriptor.is_write_only() {
            return Err(DropReason::Malformed);
        }
        let end = total.saturating_add(descriptor.len() as usize);
        if end > buffer.len() {
            return Err(DropReason::Oversize);
        }
        read_guest(memory, descriptor.addr(), &mut buffer[total..end])
            .map_err(|()| DropReason::Malformed)?;
        total = end;
    }
    if total < NET_HEADER_BYTES + crate::frame::ETHERNET_HEADER_BYTES {
        return Err(DropReason::Runt);
    }
    // No offloads were offered: a header asking for checksum or
    // segmentation work is not one this port can honour.
    let (flags, gso_type) = (buffer[0], buffer[1]);
    if flags != 0 || gso_type != 0 {
        return Err(DropReason::Malformed);
    }
    Ok(total - NET_HEADER_BYTES)
}

/// Copies guest memory at `address` into `out`: directly when it lies in
/// one region (the common case), else region by region.
fn read_guest(memory: &RegionCache, address: GuestAddress, out: &mut [u8]) -> Result<(), ()> {
    match memory.get_slice(address, out.len()) {
        Ok(slice) => {
            slice.copy_to(out);
            Ok(())
        }
        Err(_) => memory.read_slice(out, address).map_err(|_| ()),
    }
}

/// Copies `data` into guest memory at `address` (see [`read_guest`]).
fn write_guest(memory: &RegionCache, address: GuestAddress, data: &[u8]) -> Result<(), ()> {
    match memory.get_slice(address, data.len()) {
        Ok(slice) => {
            slice.copy_from(data);
            Ok(())
        }
        Err(_) => memory.write_slice(data, address).map_err(|_| ()),
    }
}

/// Tells the guest of the buffers used on `vring` since its used index
/// was `since`, if it asks to be told (see [`needs_signal`]).
fn signal<M: Bytes<GuestAddress>>(vring: &Vring, memory: &M, since: Wrapping<u16>) {
    let needed = needs_signal(vring.get_ref().get_queue(), memory, since);
    if needed {
        if let Err(error) = vring.signal_used_queue() {
            tracing::debug!(%error, "cannot signal a port's used queue");
        }
    }
}

/// The vhost-user-net device of one port.
#[derive(Debug, Clone)]
pub struct NetBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: PortId,
    mac: Mac,
    fabric: Arc<Fabric>,
    receiver: Arc<Receiver>,
    memory: RwLock<Option<GuestMemoryAtomic<Memory>>>,
    transmit: Mutex<Transmit>,
}

impl NetBackend {
    pub fn id(&self) -> PortId {
        self.inner.id
    }

    /// Forgets the frontend's queues and memory (it disconnected).
    pub fn reset(&self) {
        let mut state = self.inner.receiver.state.lock().expect("receiver poisoned");
        state.vrings.clear();
        state.unsignalled = Default::default();
        for pending in &mut state.pending {
            pending.clear();
        }
        state.memory = None;
        *self.inner.memory.write().expect("memory lock poisoned") = None;
    }

    fn memory(&self) -> Option<GuestMemoryLoadGuard<Memory>> {
        self.inner
            .memory
            .read()
            .expect("memory lock poisoned")
            .as_ref()
            .map(GuestMemoryAtomic::memory)
    }

    /// Takes the frames off a transmit queue and switches them, in
    /// batches: the queue is held for a batch, and the guests frames went
    /// to are told once per batch. Stops after [`TX_BATCHES_PER_EVENT`]
    /// batches; returns whether frames were left.
    fn transmit(&self, vring: &Vring) -> std::io::Result<bool> {
        let Some(memory) = self.memory() else {
            return Ok(false);
        };
        let memory = &RegionCache::new(&memory);
        let fabric = &self.inner.fabric;
        let mut transmit = self.inner.transmit.lock().expect("transmit poisoned");
        let Transmit { batch, scratch } = &mut *transmit;
        let mut used_any = false;
        let mut batches = 0;
        let mut stopped_early = false;
        // A queue the guest broke (its rings outside memory) ends the
        // worker, after the guests already served are told.
        let mut failed = None;
        // The used index when this call began: the guest is told of what
        // was used since, if it asks to be.
        let mut since = None;
        // Whether the driver may be notifying (kicking) this queue: it may
        // when the call begins, and not from the first batch on until the
        // queue runs dry. A driver that kicks for every burst pays a
        // system call each time, and the worker a wake-up.
        let mut kicks_on = true;
        // When the queue was first seen dry in this call: it is polled a
        // little longer before kicks are turned back on and the worker
        // sleeps, as a driver sending in bursts soon has the next one.
        let mut dry_since: Option<Instant> = None;
        loop {
            let mut guard = vring.get_mut();
            if !guard.is_enabled() || !guard.get_queue().ready() {
                // The frontend stopped or disabled the queue (it may be
                // going away): the worker goes back to its events, where
                // the frontend's next messages and kicks reach it. The
                // driver is left free to kick (NO_NOTIFY cleared, or the
                // event index moved to where the queue stopped), as it
                // would be had the queue run dry: else a queue enabled
                // again, or a driver that goes on with these rings, might
                // never kick it.
                if !kicks_on {
                    let _ = guard.get_queue_mut().enable_notification(memory);
                }
                break;
            }
            let queue = guard.get_queue_mut();
            since.get_or_insert(Wrapping(queue.next_used()));
            if kicks_on {
                // With EVENT_IDX this writes nothing (the driver kicks once
                // per event index); without it, it sets NO_NOTIFY.
                if let Err(error) = queue.disable_notification(memory) {
                    failed = Some(error);
                    break;
                }
                kicks_on = false;
            }
            let mut taken = 0;
            let mut used = [(0u16, 0u32); TX_BATCH];
            batch.clear();
            let view = RingView::new(memory, queue, false);
            if let Some(view) = &view {
                view.prefetch_first(PREFETCH_AHEAD, PREFETCH_BYTES);
            }
            // The available index is read once per batch (by the view, and
            // again by virtio-queue only if there are chains). A queue whose
            // index is out of range offers nothing (as a pop would), and is
            // not polled: the worker waits for its next kick.
            let empty = view.as_ref().is_some_and(RingView::is_empty);
            let chains = if empty { None } else { queue.iter(memory).ok() };
            let broken = !empty && chains.is_none();
            if let Some(chains) = chains {
                for chain in chains.take(TX_BATCH) {
                    if let Some(view) = &view {
                        view.prefetch(taken + PREFETCH_AHEAD, PREFETCH_BYTES);
                    }
                    let head = chain.head_index();
                    used[taken].0 = head;
                    taken += 1;
                    // As on the receive path: one descriptor through the
                    // view, others walked by virtio-queue.
                    let read = match view.as_ref().and_then(|view| view.lone(head)) {
                        Some(descriptor) => {
                            read_frame(memory, std::iter::once(descriptor), batch.slot())
                        }
                        None => read_frame(memory, chain, batch.slot()),
                    };
                    match read {
                        Ok(len) => batch.push(len),
                        Err(reason) => batch.refused.push(reason),
                    }
                }
            }
            used_any |= taken > 0;
            let polling = if taken == TX_BATCH {
                dry_since = None;
                false
            } else {
                let now = Instant::now();
                now.duration_since(*dry_since.get_or_insert(now)) < TX_POLL
            };
            let more = match publish_used(queue, memory, &used[..taken]) {
                Err(error) => Err(virtio_queue::Error::GuestMemory(error)),
                Ok(()) if taken == TX_BATCH || (polling && !broken) => Ok(true),
                Ok(()) => {
                    kicks_on = true;
                    queue
                        .enable_notification(memory)
                        .map(|more| more && !broken)
                }
            };
            drop(guard);
            if taken == 0 && more.as_ref().is_ok_and(|more| *more) {
                // Nothing came: look again without counting a batch.
                std::hint::spin_loop();
                continue;
            }
            // What was read before a queue broke still goes out.
            fabric.forward_batch(self.inner.id, batch, scratch);
            match more {
                Ok(true) => fabric.signal(scratch),
                Ok(false) => break,
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
            batches += 1;
            if batches == TX_BATCHES_PER_EVENT {
                // The port's other queues get their turn first.
                stopped_early = true;
                break;
            }
        }
        fabric.signal(scratch);
        if let (true, Some(since)) = (used_any, since) {
            signal(vring, memory, since);
        }
        match failed {
            Some(error) => Err(std::io::Error::other(error)),
            None => Ok(stopped_early),
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * QUEUE_PAIRS_MAX
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE_MAX
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_GUEST_ANNOUNCE,
            VIRTIO_NET_F_MQ,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_F_VERSION_1,
        ]
        .iter()
        .fold(0, |features, bit| features | 1 << bit)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        let mut state = self.inner.receiver.state.lock().expect("receiver poisoned");
        state.merge = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ
    }

    /// Nothing to keep: vhost-user-backend sets each queue's event index
    /// first, and the port asks the queues.
    fn set_event_idx(&self, _enabled: bool) {}

    /// The config space: MAC, status (link up), queue pairs.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut space = [0u8; 10];
        space[..6].copy_from_slice(&self.inner.mac.0);
        space[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        space[8..10].copy_from_slice(&(QUEUE_PAIRS_MAX as u16).to_le_bytes());
        let start = offset as usize;
        let end = start.saturating_add(size as usize);
        if end > space.len() {
            tracing::warn!(offset, size, "frontend read past a port's config space");
            return Vec::new();
        }
        space[start..end].to_vec()
    }

    fn update_memory(&self, memory: GuestMemoryAtomic<Memory>) -> std::io::Result<()> {
        self.inner
            .receiver
            .state
            .lock()
            .expect("receiver poisoned")
            .memory = Some(memory.clone());
        *self.inner.memory.write().expect("memory lock poisoned") = Some(memory);
        Ok(())
    }

    /// Every queue on one thread: the port's transmit paths and the
    /// bookkeeping of its receive queues.
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << (2 * QUEUE_PAIRS_MAX)) - 1]
    }

    /// A receive ring stops only between runs of frames: the frontend is
    /// told where it stopped once the run in progress has published its
    /// buffers or given them back. Frames published and not yet told of
    /// are told of now, while the ring's call descriptor is still set.
    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        if queue_index % 2 == 0 {
            let pair = queue_index as usize / 2;
            let mut state = self.inner.receiver.state.lock().expect("receiver poisoned");
            let since = state.unsignalled.get_mut(pair).and_then(Option::take);
            let memory = state.memory.as_ref().map(GuestMemoryAtomic::memory);
            if let (Some(since), Some(vring), Some(memory)) =
                (since, state.vrings.get(pair), memory)
            {
                signal(vring, &*memory, since);
            }
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected epoll event set {evset:?}"
            )));
        }
        {
            let mut state = self.inner.receiver.state.lock().expect("receiver poisoned");
            if state.vrings.is_empty() {
                state.vrings = vrings.iter().step_by(2).cloned().collect();
            }
        }
        // Odd queues transmit. The queue that was kicked goes first; then
        // the port's transmit queues take turns, a few batches each, until
        // none has frames left, so a busy queue cannot starve the others.
        if device_event % 2 == 1 {
            let Some(tx) = vrings.get(usize::from(device_event)) else {
                return Ok(());
            };
            let mut more = self.transmit_or_say(tx)?;
            while more {
                more = false;
                for tx in vrings.iter().skip(1).step_by(2) {
                    if tx.get_ref().get_queue().ready() {
                        more |= self.transmit_or_say(tx)?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl NetBackend {
    /// [`NetBackend::transmit`]; a queue that failed ends the worker
    /// thread, which says why first.
    fn transmit_or_say(&self, vring: &Vring) -> std::io::Result<bool> {
        self.transmit(vring).inspect_err(|error| {
            tracing::error!(port = self.inner.id, %error, "a port's transmit queue failed");
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_udp(source: [u8; 4], port: u16) -> Vec<u8> {
        let mut frame = vec![0u8; 64];
        frame[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x0b]);
        frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x0a]);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[23] = 17;
        frame[26..30].copy_from_slice(&source);
        frame[30..34].copy_from_slice(&[10, 0, 0, 2]);
        frame[34..36].copy_from_slice(&port.to_be_bytes());
        frame[36..38].copy_from_slice(&53u16.to_be_bytes());
        frame
    }

    #[test]
    fn flows_keep_their_queue_and_spread_over_the_ready_ones() {
        assert_eq!(receive_queue(&ipv4_udp([10, 0, 0, 1], 1000), &[]), None);
        assert_eq!(receive_queue(&ipv4_udp([10, 0, 0, 1], 1000), &[2]), Some(2));
        let ready = [0, 1, 3];
        let mut seen = [0usize; 4];
        for i in 0..64u8 {
            let frame = ipv4_udp([10, 0, 1, i], 1000 + u16::from(i));
            let queue = receive_queue(&frame, &ready).expect("a queue");
            assert!(ready.contains(&queue));
            // The same flow, the same queue.
            assert_eq!(receive_queue(&frame, &ready), Some(queue));
            seen[queue] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[3] > 0, "{seen:?}");
        assert_eq!(seen[2], 0);
        // Runts and other protocols still get a queue.
        assert!(receive_queue(&[1, 2, 3], &ready).is_some());
    }
}
