//! The virtio-mmio transport (version 2) as a pure state machine: register
//! reads and writes in, the device's state and what to do about it
//! (activate, reset) out. The runner's MMIO exits drive it; the queues it
//! describes are handed to a vhost-user backend on activation.

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// "FBRC".
const VENDOR: u32 = 0x4352_4246;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;
/// INTERRUPT_STATUS: the device used buffers.
pub const INT_VRING: u32 = 1;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Bytes of a device's MMIO window.
pub const WINDOW_BYTES: u64 = 0x1000;

/// One virtqueue as the driver set it up (guest physical addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueConfig {
    pub max: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueConfig {
    /// A queue the device may use: ready, with a power-of-two size within
    /// its maximum.
    pub fn is_valid(&self) -> bool {
        self.ready && self.size.is_power_of_two() && self.size <= self.max
    }
}

/// What a register write asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The driver set DRIVER_OK: start the queues.
    Activate,
    /// The driver wrote 0 to the status: stop and forget the queues.
    Reset,
}

/// A virtio-mmio device's registers.
#[derive(Debug, Clone)]
pub struct MmioTransport {
    device_id: u32,
    device_features: u64,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    status: u32,
    config: Vec<u8>,
}

fn set_half(value: &mut u64, high: bool, half: u32) {
    if high {
        *value = (*value & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *value = (*value & !0xffff_ffff) | u64::from(half);
    }
}

impl MmioTransport {
    pub fn new(device_id: u32, device_features: u64, queue_max: &[u16], config: Vec<u8>) -> Self {
        MmioTransport {
            device_id,
            device_features,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues: queue_max
                .iter()
                .map(|&max| QueueConfig {
                    max,
                    ..QueueConfig::default()
                })
                .collect(),
            status: 0,
            config,
        }
    }

    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The features offered to the driver.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A read of `data.len()` bytes at `offset` into the window. Registers
    /// are 32-bit; anything else reads as zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            let start = (offset - reg::CONFIG) as usize;
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = self.config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let queue = self.queues.get(self.queue_sel as usize);
        let value = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max)),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            // The backend raises a queue's interrupt itself (its call
            // eventfd is the guest's irqfd), so the transport never knows
            // which reason fired: a running device always reports "used
            // buffers", and the driver looks at its queues (finding none
            // is harmless). Config changes are never signalled.
            reg::INTERRUPT_STATUS if self.status & STATUS_DRIVER_OK != 0 => INT_VRING,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A write at `offset`; returns what the device must do, if anything.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<Event> {
        if offset >= reg::CONFIG {
            // Writable config fields are not offered.
            return None;
        }
        let value = match data {
            [a, b, c, d] if offset % 4 == 0 => u32::from_le_bytes([*a, *b, *c, *d]),
            _ => return None,
        };
        // Queue setup is only taken before the driver is running.
        let live = self.status & STATUS_DRIVER_OK != 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => set_half(&mut self.driver_features, false, value),
                    1 => set_half(&mut self.driver_features, true, value),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if !live => {
                if let Some(q) = self.queue() {
                    q.size = value as u16;
                }
            }
            reg::QUEUE_READY if !live => {
                if let Some(q) = self.queue() {
                    q.ready = value == 1;
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if !live => {
                if let Some(q) = self.queue() {
                    set_half(&mut q.desc, offset == reg::QUEUE_DESC_HIGH, value);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH if !live => {
                if let Some(q) = self.queue() {
                    set_half(&mut q.avail, offset == reg::QUEUE_DRIVER_HIGH, value);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH if !live => {
                if let Some(q) = self.queue() {
                    set_half(&mut q.used, offset == reg::QUEUE_DEVICE_HIGH, value);
                }
            }
            reg::STATUS => return self.set_status(value),
            _ => {}
        }
        None
    }

    fn set_status(&mut self, value: u32) -> Option<Event> {
        if value == 0 {
            let queues = self.queues.iter().map(|q| q.max).collect::<Vec<_>>();
            *self = MmioTransport::new(
                self.device_id,
                self.device_features,
                &queues,
                std::mem::take(&mut self.config),
            );
            return Some(Event::Reset);
        }
        // Bits are only ever set (0 resets): a driver clearing DRIVER_OK
        // does not make the queue registers writable again, nor start the
        // backend a second time on rings it is serving.
        let mut value = value | (self.status & !STATUS_NEEDS_RESET);
        // FEATURES_OK only for features the device offered.
        if value & STATUS_FEATURES_OK != 0
            && self.status & STATUS_FEATURES_OK == 0
            && self.driver_features & !self.device_features != 0
        {
            value &= !STATUS_FEATURES_OK;
        }
        let starting = value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = value | (self.status & STATUS_NEEDS_RESET);
        (starting && self.status & STATUS_FEATURES_OK != 0).then_some(Event::Activate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(t: &mut MmioTransport, offset: u64, value: u32) -> Option<Event> {
        t.write(offset, &value.to_le_bytes())
    }

    fn read(t: &MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn a_driver_sets_up_a_queue_and_starts_the_device() {
        let features = (1u64 << 32) | (1 << 9);
        let mut t = MmioTransport::new(2, features, &[256], vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(read(&t, reg::MAGIC), MAGIC);
        assert_eq!(read(&t, reg::VERSION), 2);
        assert_eq!(read(&t, reg::DEVICE_ID), 2);
        write(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&t, reg::DEVICE_FEATURES), 1);
        write(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        write(&mut t, reg::DRIVER_FEATURES, 1);
        write(&mut t, reg::STATUS, 0xb);
        assert_eq!(
            read(&t, reg::STATUS) & STATUS_FEATURES_OK,
            STATUS_FEATURES_OK
        );
        write(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(read(&t, reg::QUEUE_NUM_MAX), 256);
        write(&mut t, reg::QUEUE_NUM, 8);
        write(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        write(&mut t, reg::QUEUE_DESC_HIGH, 1);
        write(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
        write(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
        write(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(read(&t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(write(&mut t, reg::STATUS, 0xf), Some(Event::Activate));
        let q = t.queues()[0];
        assert!(q.is_valid());
        assert_eq!(
            (q.desc, q.avail, q.used, q.size),
            (0x1_0000_1000, 0x2000, 0x3000, 8)
        );
        assert_eq!(t.driver_features(), 1 << 32);
        // Running: every interrupt is a queue's.
        assert_eq!(read(&t, reg::INTERRUPT_STATUS), INT_VRING);
        // Running: queue registers are no longer taken.
        write(&mut t, reg::QUEUE_NUM, 16);
        assert_eq!(t.queues()[0].size, 8);
        // Config space, any width.
        let mut config = [0u8; 2];
        t.read(reg::CONFIG + 6, &mut config);
        assert_eq!(config, [7, 8]);
        // Clearing DRIVER_OK without a reset changes nothing.
        assert_eq!(write(&mut t, reg::STATUS, 0x3), None);
        assert_eq!(read(&t, reg::STATUS), 0xf);
        assert_eq!(write(&mut t, reg::STATUS, 0xf), None);
        assert_eq!(write(&mut t, reg::STATUS, 0), Some(Event::Reset));
        assert_eq!(
            t.queues()[0],
            QueueConfig {
                max: 256,
                ..QueueConfig::default()
            }
        );
    }

    #[test]
    fn features_the_device_did_not_offer_are_refused() {
        let mut t = MmioTransport::new(2, 1 << 32, &[8], Vec::new());
        write(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        write(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        write(&mut t, reg::STATUS, 0xb);
        assert_eq!(read(&t, reg::STATUS) & STATUS_FEATURES_OK, 0);
        // No activation without FEATURES_OK.
        assert_eq!(write(&mut t, reg::STATUS, 0x7), None);
        // Odd widths and offsets are ignored.
        assert_eq!(t.write(reg::STATUS + 1, &[0]), None);
        let mut two = [9u8; 2];
        t.read(reg::MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        let bad_queue = QueueConfig {
            max: 8,
            size: 6,
            ready: true,
            ..QueueConfig::default()
        };
        assert!(!bad_queue.is_valid());
    }
}
