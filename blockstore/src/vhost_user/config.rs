//! The virtio-blk configuration space and feature bits we offer.

use super::request::SECTOR_SIZE;

/// Feature bits (virtio 1.2, 5.2.3).
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 2;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 10;
pub const VIRTIO_BLK_F_MQ: u64 = 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 14;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 29;
pub const VIRTIO_F_VERSION_1: u64 = 32;

/// Size of `struct virtio_blk_config` up to and including the write-zeroes
/// fields.
pub const CONFIG_SPACE_BYTES: usize = 60;

/// The values that go into the configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    pub capacity_bytes: u64,
    pub block_size: u32,
    pub size_max: u32,
    pub seg_max: u32,
    pub num_queues: u16,
    pub discard_sectors_max: u32,
    pub discard_segments_max: u32,
}

impl BlkConfig {
    /// Feature bits offered for this configuration. FLUSH is offered because
    /// the device has a volatile write cache: a completed write is durable
    /// only after a FLUSH completes.
    pub fn features() -> u64 {
        [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_F_VERSION_1,
        ]
        .iter()
        .fold(0, |bits, bit| bits | (1 << bit))
    }

    /// The configuration space, little-endian as virtio 1.x requires.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_BYTES] {
        let mut space = [0u8; CONFIG_SPACE_BYTES];
        let mut put = |offset: usize, bytes: &[u8]| {
            space[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &(self.capacity_bytes / SECTOR_SIZE).to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16..20: geometry, unused.
        put(20, &self.block_size.to_le_bytes());
        // Topology, in logical blocks: one logical block per physical block,
        // aligned at 0, minimum I/O one block, no preferred optimal size.
        put(24, &[0]);
        put(25, &[0]);
        put(26, &1u16.to_le_bytes());
        put(28, &0u32.to_le_bytes());
        // 32: writeback (CONFIG_WCE not offered), 33: unused.
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.discard_sectors_max.to_le_bytes());
        put(40, &self.discard_segments_max.to_le_bytes());
        put(44, &(self.block_size / SECTOR_SIZE as u32).to_le_bytes());
        put(48, &self.discard_sectors_max.to_le_bytes());
        put(52, &self.discard_segments_max.to_le_bytes());
        // Unmapping is how zeroes are written, so it is always allowed.
        put(56, &[1]);
        space
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_specification() {
        let config = BlkConfig {
            capacity_bytes: 10 << 30,
            block_size: 4096,
            size_max: 1 << 20,
            seg_max: 126,
            num_queues: 4,
            discard_sectors_max: 1 << 21,
            discard_segments_max: 16,
        };
        let space = config.to_bytes();
        assert_eq!(
            u64::from_le_bytes(space[0..8].try_into().unwrap()),
            (10 << 30) / 512
        );
        assert_eq!(
            u32::from_le_bytes(space[8..12].try_into().unwrap()),
            1 << 20
        );
        assert_eq!(u32::from_le_bytes(space[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(space[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(space[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(space[40..44].try_into().unwrap()), 16);
        assert_eq!(u32::from_le_bytes(space[44..48].try_into().unwrap()), 8);
        assert_eq!(space[56], 1);
        let features = BlkConfig::features();
        assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
    }
}
