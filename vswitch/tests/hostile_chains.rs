//! A port's transmit and receive paths against hostile descriptor chains:
//! seeded random chains (bad addresses and lengths, loops, write-only
//! buffers to transmit from, read-only buffers to receive into, broken
//! indirect tables, bad virtio-net headers, runts and giants) mixed with
//! good frames. Nothing panics, every chain goes back to the guest, every
//! bad frame is counted under a drop reason, and every good frame arrives
//! intact. A failing seed is printed and reproduces exactly.

use std::sync::Arc;

use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vswitch::frame::Mac;
use vswitch::port::{Fabric, NetBackend, NET_HEADER_BYTES};
use vswitch::switch::{DropReason, PortConfig, PortCounters, RateLimit, Switch, VlanMode};

type Memory = GuestMemoryMmap<()>;

const MEMORY_BYTES: u64 = 1 << 20;
const QUEUE: u16 = 256;
const A: Mac = Mac([0x52, 0x54, 0, 0, 0, 0xa]);
const B: Mac = Mac([0x52, 0x54, 0, 0, 0, 0xb]);

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Where each queue lives in guest memory: (descriptors, avail, used).
const A_TX: (u64, u64, u64) = (0x1000, 0x2000, 0x3000);
const B_RX: (u64, u64, u64) = (0x5000, 0x6000, 0x7000);
/// Frame data the sender's chains point at.
const TX_DATA: u64 = 0x10000;
/// Indirect tables.
const INDIRECT: u64 = 0x30000;
/// The receiver's buffers.
const RX_DATA: u64 = 0x40000;

/// xorshift64*: reproducible from its seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The driver side of one split virtqueue, written straight into guest
/// memory as a (possibly hostile) guest would.
struct Driver<'a> {
    memory: &'a Memory,
    at: (u64, u64, u64),
    avail_idx: u16,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    /// A driver that has offered nothing yet.
    fn new(memory: &'a Memory, at: (u64, u64, u64)) -> Driver<'a> {
        Driver {
            memory,
            at,
            avail_idx: 0,
            next_desc: 0,
        }
    }

    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = self.at.0 + u64::from(index) * 16;
        self.write_desc(base, addr, len, flags, next);
    }

    fn write_desc(&self, base: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let m = self.memory;
        m.write_obj(addr.to_le(), GuestAddress(base))
            .expect("test setup");
        m.write_obj(len.to_le(), GuestAddress(base + 8))
            .expect("test setup");
        m.write_obj(flags.to_le(), GuestAddress(base + 12))
            .expect("test setup");
        m.write_obj(next.to_le(), GuestAddress(base + 14))
            .expect("test setup");
    }

    /// Takes `count` consecutive descriptor slots (wrapping).
    fn take(&mut self, count: u16) -> u16 {
        let first = self.next_desc;
        self.next_desc = (self.next_desc + count) % QUEUE;
        first
    }

    fn offer(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE);
        self.memory
            .write_obj(head.to_le(), GuestAddress(self.at.1 + 4 + slot * 2))
            .expect("test setup");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.memory
            .write_obj(self.avail_idx.to_le(), GuestAddress(self.at.1 + 2))
            .expect("test setup");
    }

    /// Offers broadcast frame `n` (60 bytes) in one buffer.
    fn offer_broadcast(&mut self, n: u64) {
        let mut frame = good_frame(n, 60);
        frame[NET_HEADER_BYTES..NET_HEADER_BYTES + 6].fill(0xff);
        let data = TX_DATA + n * 2048;
        self.memory
            .write_slice(&frame, GuestAddress(data))
            .expect("test setup");
        let head = self.take(1);
        self.desc(head, data, frame.len() as u32, 0, 0);
        self.offer(head);
    }

    fn used_idx(&self) -> u16 {
        self.memory
            .read_obj(GuestAddress(self.at.2 + 2))
            .expect("test setup")
    }
}

fn vring(memory: &GuestMemoryAtomic<Memory>, at: Option<(u64, u64, u64)>) -> VringRwLock {
    let vring = VringRwLock::new(memory.clone(), QUEUE).expect("test setup");
    if let Some((desc, avail, used)) = at {
        vring.set_queue_size(QUEUE);
        vring.set_queue_info(desc, avail, used).expect("test setup");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
    }
    vring
}

fn port(fabric: &Arc<Fabric>, id: u32, mac: Mac, memory: &GuestMemoryAtomic<Memory>) -> NetBackend {
    let config = PortConfig {
        segment: 1,
        mac: Some(mac),
        security: true,
        vlan: VlanMode::Native,
        rate: RateLimit::default(),
        link_up: true,
    };
    let backend = fabric.add_port(id, config).expect("test setup");
    backend.acked_features(backend.features());
    backend.update_memory(memory.clone()).expect("test setup");
    backend
}

/// A frame from A to B whose payload encodes `n`.
fn good_frame(n: u64, len: usize) -> Vec<u8> {
    let mut frame = vec![0u8; NET_HEADER_BYTES + len];
    let body = &mut frame[NET_HEADER_BYTES..];
    body[..6].copy_from_slice(&B.0);
    body[6..12].copy_from_slice(&A.0);
    body[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    body[14..22].copy_from_slice(&n.to_le_bytes());
    for (i, byte) in body[22..].iter_mut().enumerate() {
        *byte = (n as usize + i) as u8;
    }
    frame
}

/// What one generated chain should come to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Delivered,
    Dropped,
}

/// Writes one chain (good or hostile) into the sender's queue.
fn post_chain(rng: &mut Rng, tx: &mut Driver<'_>, n: u64, data: u64) -> Expect {
    let memory = tx.memory;
    let len = 60 + rng.below(1400) as usize;
    let frame = good_frame(n, len);
    memory
        .write_slice(&frame, GuestAddress(data))
        .expect("test setup");
    let total = frame.len() as u32;
    let split = NET_HEADER_BYTES as u32;
    let head = tx.take(3);
    let (i0, i1, i2) = (head, (head + 1) % QUEUE, (head + 2) % QUEUE);
    // The head the available ring names: the chain's, unless broken below.
    let mut offered = head;
    let expect = match rng.below(16) {
        // A good frame in one buffer, then split after the header.
        0..=4 => {
            tx.desc(i0, data, total, 0, 0);
            Expect::Delivered
        }
        5 | 6 => {
            tx.desc(i0, data, split, VRING_DESC_F_NEXT, i1);
            tx.desc(i1, data + u64::from(split), total - split, 0, 0);
            Expect::Delivered
        }
        // A good frame through an indirect table.
        7 => {
            let table = INDIRECT + u64::from(head) * 64;
            tx.write_desc(table, data, split, VRING_DESC_F_NEXT, 1);
            tx.write_desc(table + 16, data + u64::from(split), total - split, 0, 0);
            tx.desc(i0, table, 32, VRING_DESC_F_INDIRECT, 0);
            Expect::Delivered
        }
        // Outside guest memory, or wrapping the address space.
        8 => {
            let addr = [MEMORY_BYTES - 8, u64::MAX - 4, 0xdead_0000_0000][rng.below(3) as usize];
            tx.desc(i0, addr, total, 0, 0);
            Expect::Dropped
        }
        // A write-only buffer to transmit from.
        9 => {
            tx.desc(i0, data, total, VRING_DESC_F_WRITE, 0);
            Expect::Dropped
        }
        // Runt and giant frames.
        10 => {
            let short = rng.below(NET_HEADER_BYTES as u64 + 14) as u32;
            tx.desc(i0, data, short, 0, 0);
            Expect::Dropped
        }
        11 => {
            tx.desc(
                i0,
                data,
                3000 + rng.below(u32::MAX as u64 - 3000) as u32,
                0,
                0,
            );
            Expect::Dropped
        }
        // A chain that loops on itself, or points past the table: the
        // chain ends where it breaks, and what was read is too short or
        // too long to be a frame. Or a head past the table: nothing to
        // read.
        12 => {
            tx.desc(i0, data, split, VRING_DESC_F_NEXT, i1);
            match rng.below(3) {
                0 => tx.desc(i1, data + u64::from(split), 2, VRING_DESC_F_NEXT, i1),
                1 => tx.desc(i1, data + u64::from(split), 2, VRING_DESC_F_NEXT, QUEUE + 7),
                _ => offered = QUEUE + rng.below(u64::from(u16::MAX - QUEUE)) as u16,
            }
            Expect::Dropped
        }
        // Broken indirect tables: odd length, outside memory, nested.
        13 => {
            let table = INDIRECT + u64::from(head) * 64;
            match rng.below(3) {
                0 => tx.desc(i0, table, 17, VRING_DESC_F_INDIRECT, 0),
                1 => tx.desc(i0, MEMORY_BYTES + 4096, 32, VRING_DESC_F_INDIRECT, 0),
                _ => {
                    tx.write_desc(table, table, 16, VRING_DESC_F_INDIRECT, 0);
                    tx.desc(i0, table, 16, VRING_DESC_F_INDIRECT, 0);
                }
            }
            Expect::Dropped
        }
        // A virtio-net header asking for offloads that were not offered.
        14 => {
            memory
                .write_obj(1u8, GuestAddress(data))
                .expect("test setup");
            tx.desc(i0, data, total, 0, 0);
            Expect::Dropped
        }
        // A spoofed source.
        _ => {
            memory
                .write_slice(&[0x52, 0x54, 0, 0, 0, 0xc], GuestAddress(data + 18))
                .expect("test setup");
            tx.desc(i0, data, total, 0, i2);
            Expect::Dropped
        }
    };
    tx.offer(offered);
    expect
}

/// Offers the receiver `count` buffers, some of them hostile when
/// `hostile`.
fn post_rx(rng: &mut Rng, rx: &mut Driver<'_>, count: u16, hostile: bool) {
    for _ in 0..count {
        let head = rx.take(1);
        let data = RX_DATA + u64::from(head) * 2048;
        match if hostile { rng.below(4) } else { 0 } {
            0 | 1 => rx.desc(head, data, 2048, VRING_DESC_F_WRITE, 0),
            2 => rx.desc(head, data, 2048, 0, 0),
            _ => rx.desc(head, MEMORY_BYTES + 8192, 2048, VRING_DESC_F_WRITE, 0),
        }
        rx.offer(head);
    }
}

/// Guest memory, a switch, and ports A (transmitting on `A_TX`) and B
/// (receiving on `B_RX`, registered) with their rings.
struct Ports {
    memory: Memory,
    fabric: Arc<Fabric>,
    a: NetBackend,
    b: NetBackend,
    a_vrings: [VringRwLock; 2],
    b_vrings: [VringRwLock; 2],
}

fn two_ports() -> Ports {
    let memory: Memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_BYTES as usize)])
        .expect("test setup");
    let atomic = GuestMemoryAtomic::new(memory.clone());
    let fabric = Fabric::new(Switch::default(), vswitch::frame::FRAME_BYTES_MAX_DEFAULT);
    let a = port(&fabric, 1, A, &atomic);
    let b = port(&fabric, 2, B, &atomic);
    let a_vrings = [vring(&atomic, None), vring(&atomic, Some(A_TX))];
    let b_vrings = [vring(&atomic, Some(B_RX)), vring(&atomic, None)];
    // The receiver's queue is registered on its first event.
    b.handle_event(0, EventSet::IN, &b_vrings, 0)
        .expect("test setup");
    Ports {
        memory,
        fabric,
        a,
        b,
        a_vrings,
        b_vrings,
    }
}

fn run_seed(seed: u64) -> PortCounters {
    let mut rng = Rng(seed | 1);
    let Ports {
        memory,
        fabric,
        a,
        b: _b,
        a_vrings,
        b_vrings: _b_vrings,
    } = two_ports();

    let mut tx = Driver::new(&memory, A_TX);
    let mut rx = Driver::new(&memory, B_RX);
    let mut posted = 0u64;
    let mut delivered_total = 0u64;
    let mut rx_seen = 0u16;
    for round in 0..20 {
        // Every other round the receiver's new buffers are partly hostile:
        // a good frame may then find no room and be dropped as such.
        let hostile_rx = round % 2 == 1;
        let outstanding = rx.avail_idx.wrapping_sub(rx.used_idx());
        post_rx(&mut rng, &mut rx, 32 - outstanding, hostile_rx);
        let chains = 1 + rng.below(16);
        let mut good = 0;
        for i in 0..chains {
            let data = TX_DATA + i * 2048;
            if post_chain(&mut rng, &mut tx, posted, data) == Expect::Delivered {
                good += 1;
            }
            posted += 1;
        }
        let before = fabric.counters(2).expect("test setup").tx_packets;
        a.handle_event(1, EventSet::IN, &a_vrings, 0)
            .unwrap_or_else(|e| panic!("seed {seed}: transmit failed: {e}"));
        assert_eq!(
            tx.used_idx(),
            tx.avail_idx,
            "seed {seed}: every chain goes back to the guest"
        );
        let delivered = fabric.counters(2).expect("test setup").tx_packets - before;
        if hostile_rx {
            assert!(delivered <= good, "seed {seed} round {round}");
        } else {
            // At least 16 good buffers were waiting: every good frame fits.
            assert_eq!(delivered, good, "seed {seed} round {round}");
        }
        delivered_total += delivered;
        // Every frame the receiver got is a good one, intact.
        while rx_seen != rx.used_idx() {
            let slot = u64::from(rx_seen % QUEUE);
            let entry = B_RX.2 + 4 + slot * 8;
            let id: u32 = memory.read_obj(GuestAddress(entry)).expect("test setup");
            let len: u32 = memory
                .read_obj(GuestAddress(entry + 4))
                .expect("test setup");
            rx_seen = rx_seen.wrapping_add(1);
            if len == 0 {
                continue; // a hostile buffer, given back empty
            }
            let mut got = vec![0u8; len as usize];
            memory
                .read_slice(&mut got, GuestAddress(RX_DATA + u64::from(id) * 2048))
                .expect("test setup");
            let n = u64::from_le_bytes(
                got[NET_HEADER_BYTES + 14..NET_HEADER_BYTES + 22]
                    .try_into()
                    .expect("test setup"),
            );
            let mut want = good_frame(n, got.len() - NET_HEADER_BYTES);
            want[10] = 1; // num_buffers
            assert_eq!(got, want, "seed {seed}: frame {n} arrived changed");
        }
    }
    let sender = fabric.counters(1).expect("test setup");
    let receiver = fabric.counters(2).expect("test setup");
    let dropped: u64 = sender.all_drops().map(|(_, n)| n).sum();
    assert_eq!(
        sender.rx_packets + dropped,
        posted,
        "seed {seed}: every chain is switched or counted as dropped: {sender:?}"
    );
    assert_eq!(receiver.tx_packets, delivered_total, "seed {seed}");
    assert!(delivered_total > 0, "seed {seed}: some frames arrive");
    sender
}

#[test]
fn hostile_chains_are_dropped_and_counted_and_good_frames_arrive() {
    let mut drops = std::collections::BTreeMap::new();
    for seed in 0..200u64 {
        let sender = run_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed);
        for (reason, count) in sender.all_drops() {
            *drops.entry(reason).or_insert(0) += count;
        }
    }
    // The generator reached every way a chain can be bad.
    for reason in [
        DropReason::Malformed,
        DropReason::Runt,
        DropReason::Oversize,
        DropReason::Spoofed,
    ] {
        assert!(drops[&reason] > 0, "no {reason:?} drops: {drops:?}");
    }
}

/// Adds `tunnel` to the switch as port 3, carrying segment 1 (A's and
/// B's).
fn add_tunnel<T: vswitch::port::Tunnel + 'static>(fabric: &Arc<Fabric>, tunnel: Arc<T>) {
    fabric.add_tunnel(3, tunnel).expect("test setup");
    fabric
        .set_tunnel_segments(3, [1].into_iter().collect())
        .expect("test setup");
}

/// Ports A and B on one switch, B's receive ring holding 8 good buffers,
/// and a tunnel `make_tunnel` builds (given B's receive ring and device)
/// on the same segment: a broadcast from A goes to B and the tunnel.
struct Rig {
    memory: Memory,
    a: NetBackend,
    a_vrings: [VringRwLock; 2],
    tx_avail: u16,
}

impl Rig {
    fn new<T: vswitch::port::Tunnel + 'static>(
        make_tunnel: impl FnOnce(VringRwLock, NetBackend) -> Arc<T>,
    ) -> (Rig, Arc<T>) {
        let Ports {
            memory,
            fabric,
            a,
            b,
            a_vrings,
            b_vrings,
        } = two_ports();
        let tunnel = make_tunnel(b_vrings[0].clone(), b);
        add_tunnel(&fabric, tunnel.clone());
        let mut rx = Driver::new(&memory, B_RX);
        post_rx(&mut Rng(1), &mut rx, 8, false);
        let rig = Rig {
            memory,
            a,
            a_vrings,
            tx_avail: 0,
        };
        (rig, tunnel)
    }

    /// A broadcasts frame `n` for each of `frames`, in one batch.
    fn broadcast(&mut self, frames: std::ops::Range<u64>) {
        let mut tx = Driver {
            memory: &self.memory,
            at: A_TX,
            avail_idx: self.tx_avail,
            next_desc: self.tx_avail % QUEUE,
        };
        for n in frames {
            tx.offer_broadcast(n);
        }
        self.tx_avail = tx.avail_idx;
        self.a
            .handle_event(1, EventSet::IN, &self.a_vrings, 0)
            .expect("transmit");
        assert_eq!(
            tx.used_idx(),
            tx.avail_idx,
            "every chain goes back to the sender"
        );
    }

    fn used(&self, at: (u64, u64, u64)) -> u16 {
        self.memory
            .read_obj(GuestAddress(at.2 + 2))
            .expect("used index")
    }
}

/// A tunnel that does `act` on its first frame, between the runs into B.
struct FirstFrameTunnel {
    act: Box<dyn Fn() + Send + Sync>,
    frames: std::sync::Mutex<usize>,
}

impl std::fmt::Debug for FirstFrameTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstFrameTunnel").finish_non_exhaustive()
    }
}

impl vswitch::port::Tunnel for FirstFrameTunnel {
    fn send(&self, _segment: u32, _vlan: u16, _frame: &[u8]) -> Result<(), DropReason> {
        let mut frames = self.frames.lock().expect("test lock");
        *frames += 1;
        if *frames == 1 {
            (self.act)();
        }
        Ok(())
    }
}

fn first_frame_tunnel(act: impl Fn() + Send + Sync + 'static) -> Arc<FirstFrameTunnel> {
    Arc::new(FirstFrameTunnel {
        act: Box::new(act),
        frames: std::sync::Mutex::new(0),
    })
}

/// A receive ring is held for a whole run of frames, so the frontend
/// disables it (`SET_VRING_ENABLE`) between runs: the frames after that
/// find no room, none of its buffers is lost or used twice, and once it
/// is enabled again the next frame takes the next buffer.
#[test]
fn a_receive_ring_disabled_between_runs_takes_no_frame_and_loses_no_buffer() {
    let ring = std::sync::Mutex::new(None);
    let (mut rig, _tunnel) = Rig::new(|b_ring, _| {
        *ring.lock().expect("test lock") = Some(b_ring.clone());
        first_frame_tunnel(move || b_ring.set_enabled(false))
    });
    // Frame 0 goes to B, then to the tunnel, which disables B's ring;
    // frame 1 then finds B's ring down.
    rig.broadcast(0..2);
    assert_eq!(rig.used(B_RX), 1, "only the frame before the disable");

    // Enabled again: the next frame takes the next buffer.
    let ring = ring.lock().expect("test lock").take().expect("B's ring");
    ring.set_enabled(true);
    rig.broadcast(2..3);
    assert_eq!(rig.used(B_RX), 2);
    let head: u32 = rig
        .memory
        .read_obj(GuestAddress(B_RX.2 + 4 + 8))
        .expect("used element");
    assert_eq!(head, 1, "the buffer after the one used, none skipped");
    let mut received = [0u8; 8];
    rig.memory
        .read_slice(
            &mut received,
            GuestAddress(RX_DATA + 2048 + NET_HEADER_BYTES as u64 + 14),
        )
        .expect("frame");
    assert_eq!(u64::from_le_bytes(received), 2);
}

/// A receive ring stopped from another thread, as the vhost-user handler
/// does for `GET_VRING_BASE` (not ready, then `stop_vring`, then the
/// position), between runs: the position it learns counts exactly the
/// buffers that went on the used ring, and later frames take none.
#[test]
fn a_receive_ring_stopped_between_runs_reports_exactly_the_buffers_used() {
    let stopper = Arc::new(std::sync::Mutex::new(None));
    let (mut rig, _tunnel) = Rig::new(|ring, backend| {
        let stopper = stopper.clone();
        first_frame_tunnel(move || {
            let (ring, backend) = (ring.clone(), backend.clone());
            // From another thread, as the handler does; finished before
            // the next run into B begins.
            let position = std::thread::spawn(move || {
                ring.set_queue_ready(false);
                backend.stop_vring(0).expect("stop");
                ring.queue_next_avail()
            })
            .join()
            .expect("stopping thread");
            *stopper.lock().expect("test lock") = Some(position);
        })
    });
    rig.broadcast(0..3);
    let position = stopper
        .lock()
        .expect("test lock")
        .take()
        .expect("the ring was stopped");
    assert_eq!(position, 1, "the position counts the one buffer used");
    assert_eq!(rig.used(B_RX), 1, "no buffer went on the used ring after");
}

/// Offers `count` receive buffers of `bytes` each, one per chain.
fn offer_rx(rx: &mut Driver<'_>, count: u16, bytes: u32) {
    for _ in 0..count {
        let head = rx.take(1);
        let data = RX_DATA + u64::from(head) * u64::from(bytes);
        rx.desc(head, data, bytes, VRING_DESC_F_WRITE, 0);
        rx.offer(head);
    }
}

/// A sends B frame `n` of `len` bytes; returns it with its header.
fn send_to_b(ports: &Ports, tx: &mut Driver<'_>, n: u64, len: usize) -> Vec<u8> {
    let frame = good_frame(n, len);
    let data = TX_DATA + n * 2048;
    ports
        .memory
        .write_slice(&frame, GuestAddress(data))
        .expect("test setup");
    let head = tx.take(1);
    tx.desc(head, data, frame.len() as u32, 0, 0);
    tx.offer(head);
    ports
        .a
        .handle_event(1, EventSet::IN, &ports.a_vrings, 0)
        .expect("transmit");
    frame
}

/// With MRG_RXBUF a frame spans several receive buffers. One longer than
/// all the buffers offered takes none of them (those it had taken go
/// back, and the ring's position with them) and is dropped as `NoRoom`;
/// once the guest offers more, the next frame spans them in order, with
/// their count in its header.
#[test]
fn a_frame_longer_than_the_buffers_offered_gives_them_back_then_spans_more() {
    let ports = two_ports();
    let memory = &ports.memory;
    let mut rx = Driver::new(memory, B_RX);
    let mut tx = Driver::new(memory, A_TX);
    // Three buffers of 256 bytes: a 1,000-byte frame and its header need
    // four.
    offer_rx(&mut rx, 3, 256);
    send_to_b(&ports, &mut tx, 1, 1000);
    assert_eq!(
        rx.used_idx(),
        0,
        "no buffer goes to a frame that does not fit"
    );
    assert_eq!(ports.b_vrings[0].queue_next_avail(), 0, "all given back");
    let no_room = |counters: PortCounters| {
        counters
            .all_drops()
            .filter(|(reason, _)| *reason == DropReason::NoRoom)
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    assert_eq!(no_room(ports.fabric.counters(2).expect("B")), 1);

    offer_rx(&mut rx, 2, 256);
    let sent = send_to_b(&ports, &mut tx, 2, 1000);
    assert_eq!(rx.used_idx(), 4, "the frame spans four buffers");
    let mut lengths = Vec::new();
    for element in 0..4u64 {
        let at = GuestAddress(B_RX.2 + 4 + 8 * element);
        let head: u32 = memory.read_obj(at).expect("used element");
        let length: u32 = memory
            .read_obj(GuestAddress(B_RX.2 + 8 + 8 * element))
            .expect("used element");
        assert_eq!(head, element as u32, "buffers used in the order offered");
        lengths.push(length);
    }
    assert_eq!(lengths, [256, 256, 256, 1012 - 3 * 256]);
    let mut received = vec![0u8; sent.len()];
    memory
        .read_slice(&mut received, GuestAddress(RX_DATA))
        .expect("frame");
    let mut want = sent;
    want[10..12].copy_from_slice(&4u16.to_le_bytes()); // num_buffers
    assert_eq!(received, want);
    assert_eq!(ports.fabric.counters(2).expect("B").tx_packets, 1);
}

/// Runs port A's transmit path once, as its worker does on a kick; fails
/// if it does not return (a worker that never returns to its events
/// keeps the frontend's next messages waiting for the ring's lock).
fn transmit_returns(ports: &Ports, what: &str) {
    let (done, finished) = std::sync::mpsc::channel();
    let (a, vrings) = (ports.a.clone(), ports.a_vrings.clone());
    // Not a scoped thread: one that never returns must not hold the test.
    std::thread::spawn(move || {
        let result = a.handle_event(1, EventSet::IN, &vrings, 0);
        let _ = done.send(result.map_err(|e| e.to_string()));
    });
    match finished.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(result) => result.unwrap_or_else(|e| panic!("{what}: transmit failed: {e}")),
        Err(_) => panic!("{what}: the transmit path did not return"),
    }
}

/// A transmit queue the frontend stopped with chains still offered, and
/// one whose available index runs further ahead than the ring holds: the
/// worker takes nothing and goes back to its events instead of polling a
/// queue it cannot take from.
#[test]
fn a_transmit_queue_that_cannot_be_taken_from_is_not_polled() {
    let ports = two_ports();
    let mut tx = Driver::new(&ports.memory, A_TX);
    let mut rng = Rng(7);
    post_chain(&mut rng, &mut tx, 0, TX_DATA);
    // Served once, then disabled while a chain is offered: nothing is
    // taken, and the driver may still kick.
    transmit_returns(&ports, "a first chain");
    assert_eq!(tx.used_idx(), 1);
    post_chain(&mut rng, &mut tx, 1, TX_DATA);
    ports.a_vrings[1].set_enabled(false);
    transmit_returns(&ports, "a disabled queue");
    assert_eq!(tx.used_idx(), 1, "a disabled queue is not taken from");
    let used_flags: u16 = ports
        .memory
        .read_obj(GuestAddress(A_TX.2))
        .expect("used flags");
    assert_eq!(used_flags & 1, 0, "NO_NOTIFY left set on a disabled queue");
    ports.a_vrings[1].set_enabled(true);

    ports.a_vrings[1].set_queue_ready(false);
    transmit_returns(&ports, "a stopped queue");
    assert_eq!(tx.used_idx(), 1, "a stopped queue is not taken from");

    ports.a_vrings[1].set_queue_ready(true);
    ports
        .memory
        .write_obj((QUEUE + 5).to_le(), GuestAddress(A_TX.1 + 2))
        .expect("test setup");
    transmit_returns(&ports, "an index out of range");
    assert_eq!(tx.used_idx(), 1, "nothing is taken past a bad index");

    // A good index again: the chain offered is taken.
    ports
        .memory
        .write_obj(2u16.to_le(), GuestAddress(A_TX.1 + 2))
        .expect("test setup");
    transmit_returns(&ports, "a good index");
    assert_eq!(tx.used_idx(), 2);
}

/// A transmit queue disabled (`SET_VRING_ENABLE`) while its worker serves
/// it, between two batches: the worker stops there, leaving the driver
/// free to kick again (NO_NOTIFY cleared), so the queue, once enabled
/// again, is served at the driver's next kick.
#[test]
fn a_transmit_queue_disabled_while_served_is_left_to_kick_again() {
    let ports = two_ports();
    let (memory, a, a_vrings) = (&ports.memory, &ports.a, &ports.a_vrings);
    let tx_ring = a_vrings[1].clone();
    add_tunnel(
        &ports.fabric,
        first_frame_tunnel(move || tx_ring.set_enabled(false)),
    );
    let mut tx = Driver::new(memory, A_TX);
    // More broadcasts than a batch: the first batch reaches the tunnel,
    // which disables the queue before the second.
    const TX_BATCH: u64 = 64; // frames a port takes off a queue at a time
    let frames = TX_BATCH + 8;
    for n in 0..frames {
        tx.offer_broadcast(n);
    }
    a.handle_event(1, EventSet::IN, a_vrings, 0)
        .expect("transmit");
    assert_eq!(
        tx.used_idx(),
        TX_BATCH as u16,
        "one batch, then the queue was disabled"
    );
    let flags: u16 = memory.read_obj(GuestAddress(A_TX.2)).expect("used flags");
    assert_eq!(
        flags & 1,
        0,
        "NO_NOTIFY left set: the driver would not kick"
    );
    // Enabled again and kicked: the rest is taken.
    a_vrings[1].set_enabled(true);
    a.handle_event(1, EventSet::IN, a_vrings, 0)
        .expect("transmit");
    assert_eq!(tx.used_idx(), frames as u16);
}
