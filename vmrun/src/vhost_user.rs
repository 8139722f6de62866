//! A virtio device whose queues a vhost-user backend serves (`fabricd`'s
//! volumes and switch ports): the runner negotiates with the backend,
//! shares guest RAM with it, and hands it each queue's addresses and its
//! kick and call eventfds. Kicks go from the guest to the backend through
//! KVM (ioeventfd) without the runner; the runner never touches a request.

use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::Memory;
use crate::virtio_mmio::QueueConfig;

/// virtio-blk's device id.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// virtio-net's device id.
pub const VIRTIO_ID_NET: u32 = 1;
/// Bytes of virtio-blk's config space read from the backend.
const BLK_CONFIG_BYTES: u32 = 60;
/// Largest queue offered to the guest.
pub const QUEUE_MAX: u16 = 256;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("no vhost-user socket at {path}")]
    NoSocket { path: PathBuf },
    #[error("a NIC needs a unicast MAC, not {0:02x?}")]
    Mac([u8; 6]),
    #[error("cannot connect to the vhost-user socket {path}: {source}")]
    Connect { path: PathBuf, source: vhost::Error },
    #[error("the vhost-user backend at {path} refused {request}: {source}")]
    Protocol {
        path: PathBuf,
        request: &'static str,
        source: vhost::Error,
    },
    #[error("the vhost-user backend at {path} lacks {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("queue {index} is not set up (ready, power-of-two size up to {QUEUE_MAX})")]
    Queue { index: usize },
    #[error("a queue at {0:#x} does not lie in guest memory")]
    Address(u64),
    #[error("cannot make an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A vhost-user device, connected, not yet started.
pub struct VhostUserDevice {
    path: PathBuf,
    frontend: Frontend,
    /// Features the backend offers, without the vhost-user bit.
    features: u64,
    protocol_bit: u64,
    config: Vec<u8>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("path", &self.path)
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

/// Maps a failed request to the backend at `path` to a clear error.
fn refused(path: &Path, request: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    let path = path.to_path_buf();
    move |source| VhostUserError::Protocol {
        path,
        request,
        source,
    }
}

impl VhostUserDevice {
    /// Connects to `path` and learns the device's features and config.
    pub fn connect(path: &Path, device_id: u32, queues: usize) -> Result<Self, VhostUserError> {
        let path = path.to_path_buf();
        let protocol = |request: &'static str| refused(&path, request);
        let mut frontend =
            Frontend::connect(&path, queues as u64).map_err(|source| VhostUserError::Connect {
                path: path.clone(),
                source,
            })?;
        frontend.set_owner().map_err(protocol("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(protocol("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & protocol_bit == 0 {
            return Err(VhostUserError::Missing {
                path,
                what: "VHOST_USER_F_PROTOCOL_FEATURES",
            });
        }
        let protocol_offered = frontend
            .get_protocol_features()
            .map_err(protocol("GET_PROTOCOL_FEATURES"))?;
        let wanted = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
        frontend
            .set_protocol_features(protocol_offered & wanted)
            .map_err(protocol("SET_PROTOCOL_FEATURES"))?;
        if protocol_offered.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let config = if device_id == VIRTIO_ID_BLOCK {
            if !protocol_offered.contains(VhostUserProtocolFeatures::CONFIG) {
                return Err(VhostUserError::Missing {
                    path,
                    what: "the CONFIG protocol feature (a disk's capacity)",
                });
            }
            let blank = vec![0u8; BLK_CONFIG_BYTES as usize];
            let (_, payload) = frontend
                .get_config(0, BLK_CONFIG_BYTES, VhostUserConfigFlags::empty(), &blank)
                .map_err(protocol("GET_CONFIG"))?;
            payload
        } else {
            Vec::new()
        };
        let eventfds = || {
            (0..queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(VhostUserError::EventFd))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(VhostUserDevice {
            path,
            frontend,
            features: offered & !protocol_bit,
            protocol_bit,
            config,
            kicks: eventfds()?,
            calls: eventfds()?,
        })
    }

    /// Features to offer the guest.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The device's config space as the backend reported it.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// The eventfd KVM signals when the guest notifies queue `index`.
    pub fn kick(&self, index: usize) -> Option<&EventFd> {
        self.kicks.get(index)
    }

    /// Starts the backend on the queues the driver set up.
    pub fn activate(
        &mut self,
        memory: &Memory,
        driver_features: u64,
        queues: &[QueueConfig],
    ) -> Result<(), VhostUserError> {
        let path = self.path.clone();
        let protocol = |request: &'static str| refused(&path, request);
        self.frontend
            .set_features((driver_features & self.features) | self.protocol_bit)
            .map_err(protocol("SET_FEATURES"))?;
        let regions = memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(protocol("SET_MEM_TABLE"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(protocol("SET_MEM_TABLE"))?;
        // A ring must lie wholly in guest RAM (one region, so its start's
        // host address covers it).
        let host = |gpa: u64, bytes: u64| {
            if !memory.check_range(GuestAddress(gpa), bytes as usize) {
                return Err(VhostUserError::Address(gpa));
            }
            memory
                .get_host_address(GuestAddress(gpa))
                .map(|pointer| pointer as u64)
                .map_err(|_| VhostUserError::Address(gpa))
        };
        for (index, queue) in queues.iter().enumerate() {
            if !queue.is_valid() || queue.size > QUEUE_MAX {
                return Err(VhostUserError::Queue { index });
            }
            let entries = u64::from(queue.size);
            // Ring addresses are in this process's address space.
            let vring = VringConfigData {
                queue_max_size: QUEUE_MAX,
                queue_size: queue.size,
                flags: 0,
                desc_table_addr: host(queue.desc, 16 * entries)?,
                used_ring_addr: host(queue.used, 6 + 8 * entries)?,
                avail_ring_addr: host(queue.avail, 6 + 2 * entries)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, queue.size)
                .map_err(protocol("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_base(index, 0)
                .map_err(protocol("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_addr(index, &vring)
                .map_err(protocol("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_call(index, &self.calls[index])
                .map_err(protocol("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &self.kicks[index])
                .map_err(protocol("SET_VRING_KICK"))?;
            self.frontend
                .set_vring_enable(index, true)
                .map_err(protocol("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops the backend's queues (the driver reset the device).
    pub fn reset(&mut self, queues: usize) {
        for index in 0..queues {
            let _ = self.frontend.set_vring_enable(index, false);
            let _ = self.frontend.get_vring_base(index);
        }
    }
}
