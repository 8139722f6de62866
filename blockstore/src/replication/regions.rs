//! Sets of a volume's regions, as bitmaps: what a replica may lack.

/// A set of region indexes `0..len`, one bit each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSet {
    words: Vec<u64>,
    len: u64,
}

impl RegionSet {
    /// An empty set over `len` regions.
    pub fn new(len: u64) -> RegionSet {
        RegionSet {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// Every region of `0..len`.
    pub fn full(len: u64) -> RegionSet {
        let mut set = RegionSet::new(len);
        for region in 0..len {
            set.insert(region);
        }
        set
    }

    /// How many regions the set ranges over.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn insert(&mut self, region: u64) {
        assert!(region < self.len, "region {region} of {}", self.len);
        self.words[(region / 64) as usize] |= 1 << (region % 64);
    }

    pub fn remove(&mut self, region: u64) {
        assert!(region < self.len, "region {region} of {}", self.len);
        self.words[(region / 64) as usize] &= !(1 << (region % 64));
    }

    pub fn contains(&self, region: u64) -> bool {
        region < self.len && self.words[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&word| word == 0)
    }

    /// How many regions are in the set.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }

    /// Adds every region of `other`.
    pub fn union_with(&mut self, other: &RegionSet) {
        assert_eq!(self.len, other.len);
        for (word, other) in self.words.iter_mut().zip(&other.words) {
            *word |= other;
        }
    }

    /// Empties the set, returning what it held.
    pub fn take(&mut self) -> RegionSet {
        std::mem::replace(self, RegionSet::new(self.len))
    }

    /// The lowest region in the set at or after `from`, wrapping around.
    pub fn next_from(&self, from: u64) -> Option<u64> {
        let after = (from..self.len).find(|&region| self.contains(region));
        after.or_else(|| (0..from.min(self.len)).find(|&region| self.contains(region)))
    }

    /// The regions in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len).filter(|&region| self.contains(region))
    }
}

/// The regions a range of `blocks` blocks from `lba` touches, with
/// `region_blocks` blocks per region.
pub fn regions_of(lba: u64, blocks: u64, region_blocks: u64) -> std::ops::Range<u64> {
    debug_assert!(blocks > 0 && region_blocks > 0);
    lba / region_blocks..(lba + blocks - 1) / region_blocks + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_insert_remove_union_and_scan_in_order() {
        let mut set = RegionSet::new(130);
        assert!(set.is_empty());
        for region in [0, 63, 64, 129] {
            set.insert(region);
        }
        assert_eq!(set.count(), 4);
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 63, 64, 129]);
        assert_eq!(set.next_from(1), Some(63));
        assert_eq!(set.next_from(65), Some(129));
        set.remove(129);
        assert_eq!(set.next_from(65), Some(0), "wraps around");
        let mut other = RegionSet::new(130);
        other.insert(7);
        set.union_with(&other);
        assert!(set.contains(7) && !set.contains(8) && !set.contains(500));
        let taken = set.take();
        assert!(set.is_empty());
        assert_eq!(taken.count(), 4);
        assert_eq!(RegionSet::full(70).count(), 70);
    }

    #[test]
    fn a_range_maps_to_the_regions_it_touches() {
        assert_eq!(regions_of(0, 1, 256), 0..1);
        assert_eq!(regions_of(255, 2, 256), 0..2);
        assert_eq!(regions_of(256, 256, 256), 1..2);
        assert_eq!(regions_of(300, 1000, 256), 1..6);
    }
}
