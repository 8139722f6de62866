//! What a port needs of guest memory and its virtqueues beyond what
//! virtio-queue gives, on the per-frame path:
//!
//! - [`RegionCache`]: guest memory that remembers the regions it last
//!   found, so the several accesses a frame makes (ring entries,
//!   descriptors, buffers) do not each search the region table.
//! - [`publish_used`]: puts a run of used buffers on the used ring and
//!   moves the used index once for the run, not once per buffer. The
//!   driver polls that index; every store to it takes its cache line away
//!   from the driver's CPU.
//! - [`needs_signal`]: the event-index check for buffers published that
//!   way (virtio-queue's own check counts only what its `add_used` added).
//! - [`RingView`]: a queue's rings found in guest memory once for a
//!   batch. It reads a chain that is a single descriptor without
//!   virtio-queue's general walk, and asks the processor for the buffers
//!   of the chains offered next before they are walked, so the cache
//!   misses of a batch overlap instead of coming one after another.

use std::cell::Cell;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use std::sync::OnceLock;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, VolatileSlice,
};

/// A port's view of guest memory.
pub type Memory = GuestMemoryMmap<()>;
type Region = GuestRegionMmap<()>;

/// Bytes before the used ring's elements: flags and index.
const USED_HEADER_BYTES: u64 = 4;
/// Bytes of a used element: id and length.
const USED_ELEMENT_BYTES: u64 = 8;
/// Bytes before the available ring's elements: flags and index.
const AVAIL_HEADER_BYTES: u64 = 4;
/// The driver's flag (without EVENT_IDX) that it wants no notification
/// of used buffers.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Bytes of a split ring's descriptor.
const DESCRIPTOR_BYTES: usize = 16;
/// Bytes of the processor's cache line.
const CACHE_LINE_BYTES: usize = 64;

/// Guest memory that remembers the last two regions it found. It offers
/// the same map as the memory it wraps; only the search is skipped.
#[derive(Debug)]
pub struct RegionCache<'m> {
    memory: &'m Memory,
    /// Most recently found first.
    recent: Cell<[Option<&'m Region>; 2]>,
}

impl<'m> RegionCache<'m> {
    pub fn new(memory: &'m Memory) -> RegionCache<'m> {
        RegionCache {
            memory,
            recent: Cell::new([None, None]),
        }
    }
}

fn holds(region: &Region, address: GuestAddress) -> bool {
    address >= region.start_addr() && address <= region.last_addr()
}

impl GuestMemoryBackend for RegionCache<'_> {
    type R = Region;

    fn num_regions(&self) -> usize {
        self.memory.num_regions()
    }

    #[inline]
    fn find_region(&self, address: GuestAddress) -> Option<&Region> {
        let [first, second] = self.recent.get();
        match (first, second) {
            (Some(region), _) if holds(region, address) => Some(region),
            (_, Some(region)) if holds(region, address) => {
                self.recent.set([second, first]);
                Some(region)
            }
            _ => {
                let region = self.memory.find_region(address)?;
                self.recent.set([Some(region), first]);
                Some(region)
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Region> {
        self.memory.iter()
    }
}

/// Puts `used` (head, bytes written) on `queue`'s used ring after the
/// entries already there, then moves the used index past them with one
/// store. Fails (and moves nothing) if the ring is not in guest memory,
/// or its index is not aligned.
pub fn publish_used<M: GuestMemoryBackend>(
    queue: &mut Queue,
    memory: &M,
    used: &[(u16, u32)],
) -> Result<(), vm_memory::GuestMemoryError> {
    if used.is_empty() {
        return Ok(());
    }
    let ring = GuestAddress(queue.used_ring());
    let size = queue.size();
    let mut next = Wrapping(queue.next_used());
    let ring_bytes = USED_HEADER_BYTES + USED_ELEMENT_BYTES * u64::from(size);
    if let Ok(slice) = memory.get_slice(ring, ring_bytes as usize) {
        // The ring in one region (as drivers place it): one bounds check
        // per element, against the ring.
        for &(head, len) in used {
            let slot = u64::from(next.0 % size);
            let at = (USED_HEADER_BYTES + slot * USED_ELEMENT_BYTES) as usize;
            slice.write_obj(used_element(head, len), at)?;
            next += 1;
        }
        // Release: the elements are visible before the index that covers
        // them.
        slice.store(next.0.to_le(), 2, Ordering::Release)?;
        queue.set_next_used(next.0);
        return Ok(());
    }
    for &(head, len) in used {
        let element = used_element(head, len);
        let slot = u64::from(next.0 % size);
        let at = ring
            .checked_add(USED_HEADER_BYTES + slot * USED_ELEMENT_BYTES)
            .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(ring))?;
        memory.write_slice(&element, at)?;
        next += 1;
    }
    let index_at = ring
        .checked_add(2)
        .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(ring))?;
    // Release: the elements are visible before the index that covers them.
    memory.store(next.0.to_le(), index_at, Ordering::Release)?;
    queue.set_next_used(next.0);
    Ok(())
}

/// A used ring element: the chain's head and the bytes written to it.
fn used_element(head: u16, len: u32) -> [u8; USED_ELEMENT_BYTES as usize] {
    let mut element = [0u8; USED_ELEMENT_BYTES as usize];
    element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
    element[4..].copy_from_slice(&len.to_le_bytes());
    element
}

/// Whether the driver wants to hear of the buffers published since the
/// used index was `since` (its used event index falls among them), or,
/// without EVENT_IDX, of any. A ring outside guest memory says yes.
pub fn needs_signal<M: Bytes<GuestAddress>>(
    queue: &Queue,
    memory: &M,
    since: Wrapping<u16>,
) -> bool {
    let now = Wrapping(queue.next_used());
    if now == since {
        return false;
    }
    if !queue.event_idx_enabled() {
        // The driver's flags: VRING_AVAIL_F_NO_INTERRUPT asks for none (a
        // polling driver, such as DPDK's). A ring outside memory says yes.
        fence(Ordering::SeqCst);
        let flags = memory.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Relaxed);
        return flags.map_or(true, |flags| {
            u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
        });
    }
    // The used index stores come before the read of the event index.
    fence(Ordering::SeqCst);
    let at = GuestAddress(queue.avail_ring())
        .checked_add(AVAIL_HEADER_BYTES + 2 * u64::from(queue.size()));
    let event = match at.map(|at| memory.load::<u16>(at, Ordering::Relaxed)) {
        Some(Ok(event)) => Wrapping(u16::from_le(event)),
        _ => return true,
    };
    // As the kernel's vring_need_event: the event index lies in
    // [since, now).
    now - event - Wrapping(1) < now - since
}

/// A queue's available ring and descriptor table, found in guest memory
/// once for a batch (both must each lie in one region).
///
/// - [`RingView::lone`]: the descriptor of a chain that is that one
///   descriptor (most drivers' frames), read with one bounds check instead
///   of virtio-queue's general walk. Other chains are walked by
///   virtio-queue.
/// - [`RingView::prefetch`]: asks the processor for the buffers of the
///   chains offered next, before they are walked. The driver writes those
///   buffers, ring entries and descriptors from its own processor, and
///   each line the device then touches is a cache miss; on a host whose
///   two processors are far apart (a cache line's round trip between them
///   measured at 55-100 ns at some times and 380-440 ns at others on the
///   benchmark machine), a batch whose misses come one after another is
///   bound by them. Prefetching a few chains ahead lets them overlap.
///   Prefetches are only hints: entries it cannot read, descriptors out of
///   the table, indirect chains and buffers outside guest memory are
///   skipped.
pub struct RingView<'a> {
    memory: &'a RegionCache<'a>,
    avail: VolatileSlice<'a>,
    table: VolatileSlice<'a>,
    size: u16,
    /// The ring's next position when the view was made.
    start: Wrapping<u16>,
    /// Chains offered from `start` on (the available index read then).
    offered: u16,
    /// For buffers the device writes (receive queues): fetched to write.
    write: bool,
}

impl<'a> RingView<'a> {
    /// The view for `queue`'s chains from its next position; `None`
    /// if its rings do not each lie in one region of guest memory.
    pub fn new(memory: &'a RegionCache<'a>, queue: &Queue, write: bool) -> Option<RingView<'a>> {
        let size = queue.size();
        let avail = memory
            .get_slice(
                GuestAddress(queue.avail_ring()),
                AVAIL_HEADER_BYTES as usize + 2 * usize::from(size),
            )
            .ok()?;
        let table = memory
            .get_slice(
                GuestAddress(queue.desc_table()),
                DESCRIPTOR_BYTES * usize::from(size),
            )
            .ok()?;
        let start = Wrapping(queue.next_avail());
        let index = Wrapping(u16::from_le(avail.load::<u16>(2, Ordering::Acquire).ok()?));
        // An index that claims more chains than the ring holds offers none.
        let offered = Some((index - start).0).filter(|&offered| offered <= size)?;
        Some(RingView {
            memory,
            avail,
            table,
            size,
            start,
            offered,
            write: write && prefetch_write_supported(),
        })
    }

    /// Whether the ring offered no chain when the view was made.
    pub fn is_empty(&self) -> bool {
        self.offered == 0
    }

    /// Prefetches the buffers of the first `count` chains offered (see
    /// [`RingView::prefetch`]).
    pub fn prefetch_first(&self, count: usize, bytes: usize) {
        for ahead in 0..count {
            self.prefetch(ahead, bytes);
        }
    }

    /// The descriptor at `head`, if it is a whole chain by itself (neither
    /// chained on nor indirect); `None` for any other chain, or a head out
    /// of the table, which virtio-queue's walk then handles (or refuses).
    /// Its buffer is not checked here.
    #[inline]
    pub fn lone(&self, head: u16) -> Option<Descriptor> {
        self.descriptor(head)
            .filter(|d| !d.has_next() && !d.refers_to_indirect_table())
    }

    /// The descriptor at `head`; `None` for a head out of the table.
    #[inline]
    fn descriptor(&self, head: u16) -> Option<Descriptor> {
        if head >= self.size {
            return None;
        }
        self.table
            .read_obj::<Descriptor>(usize::from(head) * DESCRIPTOR_BYTES)
            .ok()
    }

    /// Asks for the first `bytes` of the buffer of the chain `ahead`
    /// positions past the one the view was made at (nothing if that
    /// chain is not offered, or not a plain one in guest memory).
    #[inline]
    pub fn prefetch(&self, ahead: usize, bytes: usize) {
        if ahead >= usize::from(self.offered) {
            return;
        }
        // `ahead` < `offered` <= `size`: the ring is not empty.
        let slot = (usize::from(self.start.0) + ahead) % usize::from(self.size);
        let Ok(head) = self
            .avail
            .load::<u16>(AVAIL_HEADER_BYTES as usize + 2 * slot, Ordering::Relaxed)
        else {
            return;
        };
        let Some(descriptor) = self.descriptor(u16::from_le(head)) else {
            return;
        };
        let len = bytes.min(descriptor.len() as usize);
        if descriptor.refers_to_indirect_table() || len == 0 {
            return;
        }
        let Ok(buffer) = self.memory.get_slice(descriptor.addr(), len) else {
            return;
        };
        let start = buffer.ptr_guard().as_ptr() as usize;
        let first = start & !(CACHE_LINE_BYTES - 1);
        for line in (first..start + len).step_by(CACHE_LINE_BYTES) {
            prefetch_line(line as *const u8, self.write);
        }
    }
}

/// Whether the processor has PREFETCHW (fetch a line to write it).
fn prefetch_write_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid;
            __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Asks the processor to bring the cache line at `line` close, to read it
/// or (`write`) to write it.
#[inline(always)]
fn prefetch_line(line: *const u8, write: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it does not fault whatever the
    // address, and reads or writes nothing the program can see.
    // PREFETCHW is asked for only where CPUID says it exists.
    unsafe {
        if write {
            std::arch::asm!("prefetchw [{}]", in(reg) line, options(nostack, preserves_flags, readonly));
        } else {
            std::arch::asm!("prefetcht0 [{}]", in(reg) line, options(nostack, preserves_flags, readonly));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (line, write);
}

impl std::fmt::Debug for RingView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingView")
            .field("start", &self.start)
            .field("offered", &self.offered)
            .field("write", &self.write)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 8;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn setup() -> (Memory, Queue) {
        let memory =
            Memory::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10000), 0x1000)])
                .unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_size(SIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        (memory, queue)
    }

    #[test]
    fn the_cache_finds_what_the_memory_finds() {
        let memory =
            Memory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x4000), 0x1000)])
                .unwrap();
        let cache = RegionCache::new(&memory);
        for address in [
            0u64, 0x4000, 0xfff, 0x4fff, 0x1000, 0x5000, 0x3fff, 0x10, 0x4010,
        ] {
            let address = GuestAddress(address);
            assert_eq!(
                cache
                    .find_region(address)
                    .map(GuestMemoryRegion::start_addr),
                memory
                    .find_region(address)
                    .map(GuestMemoryRegion::start_addr),
                "{address:?}"
            );
        }
        // Reads through the cache end where a region ends, as the
        // memory's do.
        memory
            .write_slice(&[7u8; 4], GuestAddress(0xffe))
            .unwrap_err();
        let mut out = [0u8; 2];
        cache.read_slice(&mut out, GuestAddress(0x4ffe)).unwrap();
        cache
            .read_slice(&mut out, GuestAddress(0x4fff))
            .unwrap_err();
    }

    #[test]
    fn a_run_is_published_with_one_index_and_wraps_the_ring() {
        let (memory, mut queue) = setup();
        queue.set_next_used(SIZE - 1);
        publish_used(&mut queue, &memory, &[(3, 100), (5, 200)]).unwrap();
        assert_eq!(queue.next_used(), SIZE + 1);
        let index: u16 = memory.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(index, SIZE + 1);
        let element = |slot: u64| -> (u32, u32) {
            let at = GuestAddress(USED + 4 + 8 * slot);
            (
                memory.read_obj(at).unwrap(),
                memory.read_obj(at.unchecked_add(4)).unwrap(),
            )
        };
        assert_eq!(element(u64::from(SIZE) - 1), (3, 100));
        assert_eq!(element(0), (5, 200));
        // Nothing to publish moves nothing.
        publish_used(&mut queue, &memory, &[]).unwrap();
        assert_eq!(queue.next_used(), SIZE + 1);
    }

    #[test]
    fn a_used_ring_outside_memory_is_an_error() {
        let (memory, mut queue) = setup();
        queue.set_used_ring_address(Some(0x8000), Some(0));
        assert!(publish_used(&mut queue, &memory, &[(0, 1)]).is_err());
        assert_eq!(queue.next_used(), 0);
    }

    #[test]
    fn the_view_skips_what_it_cannot_read_and_never_fails() {
        let (memory, mut queue) = setup();
        let cache = RegionCache::new(&memory);
        // Nothing offered yet.
        let view = RingView::new(&cache, &queue, true).unwrap();
        assert_eq!(view.offered, 0);
        view.prefetch(0, 128);
        // Chains at every position of a wrapped ring: a plain one, a head
        // past the table, a buffer outside memory, an indirect one, a
        // buffer that crosses out of its region, and an empty one.
        queue.set_next_avail(u16::MAX - 2);
        let descriptors = [
            Descriptor::new(0x10000, 64, 0, 0),
            Descriptor::new(0x9000_0000, 64, 0, 0),
            Descriptor::new(0x10000, 32, 4, 0),
            Descriptor::new(0x10f00, 0x200, 0, 0),
            Descriptor::new(0x10000, 0, 0, 0),
        ];
        for (index, descriptor) in descriptors.iter().enumerate() {
            memory
                .write_obj(*descriptor, GuestAddress(DESC + 16 * index as u64))
                .unwrap();
        }
        let heads = [0u16, SIZE, 1, 2, 3, 4, 0, 0];
        for (offset, head) in heads.iter().enumerate() {
            let slot = (usize::from(u16::MAX - 2) + offset) % usize::from(SIZE);
            memory
                .write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot as u64))
                .unwrap();
        }
        memory
            .write_obj(5u16.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
        let view = RingView::new(&cache, &queue, false).unwrap();
        assert_eq!(view.offered, 8);
        for ahead in 0..2 * usize::from(SIZE) {
            view.prefetch(ahead, 4096);
        }
        // An index claiming more chains than the ring holds offers none.
        memory
            .write_obj(
                (u16::MAX - 2).wrapping_add(SIZE + 1).to_le(),
                GuestAddress(AVAIL + 2),
            )
            .unwrap();
        assert!(RingView::new(&cache, &queue, true).is_none());
        // Rings outside guest memory have no view.
        queue.set_desc_table_address(Some(0x3ff0), Some(0));
        assert!(RingView::new(&cache, &queue, true).is_none());
    }

    #[test]
    fn a_used_ring_across_two_regions_is_published_the_same() {
        // The used ring's last element and index in different regions:
        // the element-by-element path.
        let memory =
            Memory::from_ranges(&[(GuestAddress(0), 0x3000), (GuestAddress(0x3000), 0x1000)])
                .unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_size(SIZE);
        queue.set_used_ring_address(Some(0x2ff0), Some(0));
        queue.set_ready(true);
        queue.set_next_used(SIZE - 1);
        publish_used(&mut queue, &memory, &[(3, 100), (5, 200)]).unwrap();
        assert_eq!(queue.next_used(), SIZE + 1);
        let index: u16 = memory.read_obj(GuestAddress(0x2ff2)).unwrap();
        assert_eq!(index, SIZE + 1);
        let element = |slot: u64| -> (u32, u32) {
            let at = GuestAddress(0x2ff0 + 4 + 8 * slot);
            (
                memory.read_obj(at).unwrap(),
                memory.read_obj(at.unchecked_add(4)).unwrap(),
            )
        };
        assert_eq!(element(u64::from(SIZE) - 1), (3, 100));
        assert_eq!(element(0), (5, 200));
    }

    #[test]
    fn only_a_chain_of_one_plain_descriptor_is_read_alone() {
        let (memory, queue) = setup();
        let cache = RegionCache::new(&memory);
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        const INDIRECT: u16 = 4;
        let descriptors = [
            Descriptor::new(0x10000, 64, 0, 0),
            Descriptor::new(0x10000, 64, WRITE, 0),
            Descriptor::new(0x10000, 64, NEXT, 0),
            Descriptor::new(0x10000, 64, INDIRECT, 0),
            Descriptor::new(0x10000, 64, NEXT | INDIRECT, 1),
            Descriptor::new(0x9000_0000, 64, 0, 0),
        ];
        for (index, descriptor) in descriptors.iter().enumerate() {
            memory
                .write_obj(*descriptor, GuestAddress(DESC + 16 * index as u64))
                .unwrap();
        }
        let view = RingView::new(&cache, &queue, false).unwrap();
        let lone = |head: u16| view.lone(head).map(|d| (d.addr().0, d.flags()));
        assert_eq!(lone(0), Some((0x10000, 0)));
        // Write-only is still one descriptor: the caller refuses it.
        assert_eq!(lone(1), Some((0x10000, WRITE)));
        assert_eq!(lone(2), None);
        assert_eq!(lone(3), None);
        assert_eq!(lone(4), None);
        // Its buffer is not checked here.
        assert_eq!(lone(5), Some((0x9000_0000, 0)));
        assert_eq!(lone(SIZE), None);
        assert_eq!(lone(u16::MAX), None);
    }

    #[test]
    fn the_event_index_decides_who_is_signalled() {
        let (memory, mut queue) = setup();
        let event_at = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        // Without EVENT_IDX: any new buffer, unless the driver asks for
        // no interrupts.
        publish_used(&mut queue, &memory, &[(0, 1), (1, 1)]).unwrap();
        assert!(needs_signal(&queue, &memory, Wrapping(0)));
        assert!(!needs_signal(&queue, &memory, Wrapping(2)));
        memory.write_obj(1u16.to_le(), GuestAddress(AVAIL)).unwrap();
        assert!(!needs_signal(&queue, &memory, Wrapping(0)));
        memory.write_obj(0u16.to_le(), GuestAddress(AVAIL)).unwrap();
        queue.set_event_idx(true);
        // The driver wants to hear once buffer 3 is used (index 4).
        memory.write_obj(3u16.to_le(), event_at).unwrap();
        publish_used(&mut queue, &memory, &[(2, 1)]).unwrap();
        assert!(!needs_signal(&queue, &memory, Wrapping(2)));
        publish_used(&mut queue, &memory, &[(3, 1), (4, 1)]).unwrap();
        assert!(needs_signal(&queue, &memory, Wrapping(3)));
        // A window that wrapped the 16-bit index.
        queue.set_next_used(u16::MAX - 1);
        memory.write_obj(u16::MAX.to_le(), event_at).unwrap();
        publish_used(&mut queue, &memory, &[(0, 1), (1, 1), (2, 1)]).unwrap();
        assert_eq!(queue.next_used(), 1);
        assert!(needs_signal(&queue, &memory, Wrapping(u16::MAX - 1)));
        assert!(!needs_signal(&queue, &memory, Wrapping(0)));
    }
}
