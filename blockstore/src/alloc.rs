//! Allocation of physical blocks inside a volume's data file.
//!
//! The allocator is a pure structure: it never touches the file. Free space
//! is kept as extents (`start -> length`), merged on release, so a volume
//! that was written sequentially and then discarded costs a handful of
//! entries, not one per block. A second index by length finds the smallest
//! extent that holds a whole request, so a multi-block write lands in one
//! contiguous run (one I/O) whenever such a run exists.

use std::collections::{BTreeMap, BTreeSet};

/// Hands out physical block numbers. Everything below `high_water` that is
/// not in `free` is in use.
#[derive(Debug, Default)]
pub struct Allocator {
    free: BTreeMap<u64, u64>,
    /// The same extents as `free`, ordered by (length, start).
    by_len: BTreeSet<(u64, u64)>,
    free_total: u64,
    high_water: u64,
}

impl Allocator {
    /// Rebuilds the allocator from the set of blocks in use (in any order).
    pub fn from_used(mut used: Vec<u64>) -> Self {
        used.sort_unstable();
        used.dedup();
        let mut allocator = Allocator::default();
        let mut next = 0u64;
        for block in used {
            if block > next {
                allocator.insert_extent(next, block - next);
            }
            next = block + 1;
        }
        allocator.high_water = next;
        allocator
    }

    /// Number of blocks the data file spans (in use or free).
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Number of free blocks below the high-water mark.
    pub fn free_blocks(&self) -> u64 {
        self.free_total
    }

    /// Allocates `count` blocks and appends them to `out`.
    ///
    /// Policy, in order: the smallest free extent that holds the whole
    /// request (one contiguous run); else, while free space is less than a
    /// quarter of the file, grow the file (also one run); else gather the
    /// request from several free extents, lowest first, so that space is
    /// reused and the file stops growing.
    pub fn allocate(&mut self, count: u64, out: &mut Vec<u64>) {
        if count == 0 {
            return;
        }
        if let Some(&(len, start)) = self.by_len.range((count, 0)..).next() {
            self.remove_extent(start, len);
            if len > count {
                self.insert_extent(start + count, len - count);
            }
            out.extend(start..start + count);
            return;
        }
        if self.free_total < count || self.free_total * 4 < self.high_water {
            out.extend(self.high_water..self.high_water + count);
            self.high_water += count;
            return;
        }
        let mut remaining = count;
        while remaining > 0 {
            let (&start, &len) = self
                .free
                .iter()
                .next()
                .expect("free_total counts blocks that exist in `free`");
            let take = len.min(remaining);
            self.remove_extent(start, len);
            if take < len {
                self.insert_extent(start + take, len - take);
            }
            out.extend(start..start + take);
            remaining -= take;
        }
    }

    fn insert_extent(&mut self, start: u64, len: u64) {
        self.free.insert(start, len);
        self.by_len.insert((len, start));
        self.free_total += len;
    }

    fn remove_extent(&mut self, start: u64, len: u64) {
        self.free.remove(&start);
        self.by_len.remove(&(len, start));
        self.free_total -= len;
    }

    /// Returns a block to the free pool.
    ///
    /// # Panics
    ///
    /// Releasing a block that is already free, or was never handed out, is a
    /// bug in the caller and stops the process: continuing could hand one
    /// block to two owners and corrupt a volume.
    pub fn release(&mut self, block: u64) {
        assert!(
            block < self.high_water,
            "released block {block} was never allocated"
        );
        if let Some((&start, &len)) = self.free.range(..=block).next_back() {
            assert!(block >= start + len, "block {block} released twice");
        }
        let mut start = block;
        let mut len = 1;
        // Merge with the extent that ends right before this block.
        if let Some((&prev_start, &prev_len)) = self.free.range(..block).next_back() {
            if prev_start + prev_len == block {
                self.remove_extent(prev_start, prev_len);
                start = prev_start;
                len += prev_len;
            }
        }
        // Merge with the extent that starts right after it.
        if let Some(&next_len) = self.free.get(&(block + 1)) {
            self.remove_extent(block + 1, next_len);
            len += next_len;
        }
        if start + len == self.high_water {
            // The tail of the file is free: shrink instead of keeping a free extent.
            self.high_water = start;
        } else {
            self.insert_extent(start, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn grows_then_reuses_holes() {
        let mut allocator = Allocator::default();
        let mut out = Vec::new();
        allocator.allocate(4, &mut out);
        assert_eq!(out, vec![0, 1, 2, 3]);
        allocator.release(1);
        allocator.release(2);
        out.clear();
        allocator.allocate(2, &mut out);
        assert_eq!(out, vec![1, 2]);
        out.clear();
        allocator.allocate(3, &mut out);
        assert_eq!(out, vec![4, 5, 6]);
    }

    #[test]
    fn multi_block_requests_stay_contiguous() {
        let mut allocator = Allocator::default();
        let mut out = Vec::new();
        allocator.allocate(100, &mut out);
        // Free every fourth block, plus one run of 8.
        for block in (0..60).step_by(4) {
            allocator.release(block);
        }
        for block in 80..88 {
            allocator.release(block);
        }
        out.clear();
        allocator.allocate(8, &mut out);
        assert_eq!(
            out,
            (80..88).collect::<Vec<_>>(),
            "the run that fits is used"
        );
        out.clear();
        allocator.allocate(4, &mut out);
        assert_eq!(
            out,
            vec![100, 101, 102, 103],
            "no run fits and space is scarce: grow"
        );
        // Once free space is plentiful, fragments are reused.
        for block in (1..60).step_by(4) {
            allocator.release(block);
        }
        let high_water = allocator.high_water();
        out.clear();
        allocator.allocate(3, &mut out);
        assert_eq!(out, vec![0, 1, 4]);
        assert_eq!(allocator.high_water(), high_water);
    }

    #[test]
    fn releasing_the_tail_shrinks_the_file() {
        let mut allocator = Allocator::default();
        let mut out = Vec::new();
        allocator.allocate(3, &mut out);
        allocator.release(2);
        allocator.release(1);
        assert_eq!(allocator.high_water(), 1);
        assert_eq!(allocator.free_blocks(), 0);
    }

    #[test]
    fn rebuild_from_used_blocks() {
        let allocator = Allocator::from_used(vec![5, 1, 2, 9]);
        assert_eq!(allocator.high_water(), 10);
        assert_eq!(allocator.free_blocks(), 6);
    }

    #[test]
    #[should_panic(expected = "released twice")]
    fn double_release_is_a_bug() {
        let mut allocator = Allocator::default();
        let mut out = Vec::new();
        allocator.allocate(3, &mut out);
        allocator.release(1);
        allocator.release(1);
    }

    proptest! {
        /// Every block is owned by at most one holder, and the counts add up.
        #[test]
        fn never_hands_out_a_block_twice(ops in proptest::collection::vec((any::<bool>(), 1u64..40), 1..200)) {
            let mut allocator = Allocator::default();
            let mut held: BTreeSet<u64> = BTreeSet::new();
            for (allocate, n) in ops {
                if allocate {
                    let mut out = Vec::new();
                    allocator.allocate(n, &mut out);
                    prop_assert_eq!(out.len() as u64, n);
                    for block in out {
                        prop_assert!(held.insert(block), "block {} handed out twice", block);
                    }
                } else {
                    for _ in 0..n {
                        let Some(&block) = held.iter().nth((n as usize * 7) % (held.len().max(1))) else { break };
                        held.remove(&block);
                        allocator.release(block);
                    }
                }
                prop_assert_eq!(allocator.high_water() - allocator.free_blocks(), held.len() as u64);
                if let Some(&max) = held.iter().next_back() {
                    prop_assert!(max < allocator.high_water());
                }
            }
        }
    }
}
