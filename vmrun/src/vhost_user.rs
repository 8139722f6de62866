//! A virtio device whose queues a vhost-user backend serves (`fabricd`'s
//! volumes and switch ports): the runner negotiates with the backend,
//! shares guest RAM with it, and hands it each queue's addresses and its
//! kick and call eventfds. Kicks go from the guest to the backend through
//! KVM (ioeventfd) without the runner; the runner never touches a request.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
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
    #[error("the vhost-user backend at {path} is gone (waiting for it to come back)")]
    Gone { path: PathBuf },
    #[error("cannot make an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A vhost-user device: its socket, the backend while one is connected,
/// and the eventfds that outlive backends (KVM signals the kicks; the
/// calls are the guest's interrupts), so a restarted backend is handed
/// the same ones.
pub struct VhostUserDevice {
    path: PathBuf,
    device_id: u32,
    /// The backend, or none while it is gone (until [`Self::reconnect`]).
    frontend: Option<Frontend>,
    /// Features the backend offers, without the vhost-user bit.
    features: u64,
    protocol_bit: u64,
    config: Vec<u8>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    reconnects: u32,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("path", &self.path)
            .field("features", &format_args!("{:#x}", self.features))
            .field("connected", &self.frontend.is_some())
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

/// How long the runner waits for a backend's answer: a backend that hangs
/// fails its request instead of stalling the vCPU that touched its device.
const BACKEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A backend connected and asked what it offers.
pub struct Handshake {
    frontend: Frontend,
    features: u64,
    config: Vec<u8>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

/// Connects to `path`, takes ownership and learns the device's features
/// and (for a disk) its config space.
pub fn handshake(path: &Path, device_id: u32, queues: usize) -> Result<Handshake, VhostUserError> {
    let protocol = |request: &'static str| refused(path, request);
    let connect_error = |source: std::io::Error| VhostUserError::Connect {
        path: path.to_path_buf(),
        source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketConnect(source)),
    };
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(connect_error)?;
    stream
        .set_read_timeout(Some(BACKEND_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(BACKEND_TIMEOUT)))
        .map_err(connect_error)?;
    let mut frontend = Frontend::from_stream(stream, queues as u64);
    frontend.set_owner().map_err(protocol("SET_OWNER"))?;
    let features = frontend.get_features().map_err(protocol("GET_FEATURES"))?;
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
        return Err(VhostUserError::Missing {
            path: path.to_path_buf(),
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
                path: path.to_path_buf(),
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
    Ok(Handshake {
        frontend,
        features,
        config,
    })
}

impl VhostUserDevice {
    /// Connects to `path` and learns the device's features and config.
    pub fn connect(path: &Path, device_id: u32, queues: usize) -> Result<Self, VhostUserError> {
        let Handshake {
            frontend,
            features,
            config,
        } = handshake(path, device_id, queues)?;
        let eventfds = || {
            (0..queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(VhostUserError::EventFd))
                .collect::<Result<Vec<_>, _>>()
        };
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        Ok(VhostUserDevice {
            path: path.to_path_buf(),
            device_id,
            frontend: Some(frontend),
            features: features & !protocol_bit,
            protocol_bit,
            config,
            kicks: eventfds()?,
            calls: eventfds()?,
            reconnects: 0,
        })
    }

    /// The backend's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a backend is connected.
    pub fn connected(&self) -> bool {
        self.frontend.is_some()
    }

    /// How many times a backend came back.
    pub fn reconnects(&self) -> u32 {
        self.reconnects
    }

    /// Whether the backend hung up (its end of the socket is closed). A
    /// backend never speaks first on this socket, so a readable socket
    /// at end-of-file is a backend gone; on `true` the device forgets it.
    pub fn hung_up(&mut self) -> bool {
        let Some(frontend) = &self.frontend else {
            return false;
        };
        let mut poll = libc::pollfd {
            fd: frontend.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        if ready <= 0 {
            return false;
        }
        let gone = if poll.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
            true
        } else {
            let mut byte = 0u8;
            // SAFETY: a one-byte peek into a local buffer.
            let peeked = unsafe {
                libc::recv(
                    frontend.as_raw_fd(),
                    (&mut byte as *mut u8).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            peeked == 0
        };
        if gone {
            self.frontend = None;
        }
        gone
    }

    /// What [`handshake`] needs to connect to this device's backend again:
    /// its socket, device id and number of queues.
    pub fn identity(&self) -> (PathBuf, u32, usize) {
        (self.path.clone(), self.device_id, self.kicks.len())
    }

    /// Takes a backend that came back on the same socket (connected by
    /// [`handshake`] without the device's lock held). It must offer every
    /// feature of the first one's that the guest was offered (`offered`):
    /// the guest may have them.
    pub fn reconnect(&mut self, handshake: Handshake, offered: u64) -> Result<(), VhostUserError> {
        let Handshake {
            frontend,
            features,
            config,
        } = handshake;
        let features = features & !self.protocol_bit;
        let required = self.features & offered;
        if features & required != required {
            return Err(VhostUserError::Missing {
                path: self.path.clone(),
                what: "features the first backend offered",
            });
        }
        if self.device_id == VIRTIO_ID_BLOCK && config != self.config {
            return Err(VhostUserError::Missing {
                path: self.path.clone(),
                what: "the same disk (its config space changed)",
            });
        }
        self.frontend = Some(frontend);
        Ok(())
    }

    /// Counts a backend that came back and serves the device again.
    pub fn count_reconnect(&mut self) {
        self.reconnects += 1;
    }

    /// Tells the backend to look at every queue (after a reconnect: kicks
    /// the last backend took may never have been served).
    pub fn kick_all(&self) {
        for kick in &self.kicks {
            let _ = kick.write(1);
        }
    }

    /// The eventfd the backend signals when it used buffers of queue
    /// `index`: the guest's interrupt (irqfd).
    pub fn call(&self, index: usize) -> Option<&EventFd> {
        self.calls.get(index)
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

    /// Starts the backend on the queues the driver set up: new queues at
    /// 0; with `resume` (a backend that came back), where the guest's
    /// used ring is, so requests the last backend took but never
    /// completed are served again.
    ///
    /// A backend that fails a request (refuses it, or does not answer in
    /// [`BACKEND_TIMEOUT`]) is let go: a late answer left on the socket
    /// would be read as the answer to the next request. The device then
    /// counts as away, and is connected and started again when the
    /// backend answers a new handshake.
    pub fn activate(
        &mut self,
        memory: &Memory,
        driver_features: u64,
        queues: &[QueueConfig],
        resume: bool,
    ) -> Result<(), VhostUserError> {
        let started = self.start_queues(memory, driver_features, queues, resume);
        if started.is_err() {
            self.frontend = None;
        }
        started
    }

    fn start_queues(
        &mut self,
        memory: &Memory,
        driver_features: u64,
        queues: &[QueueConfig],
        resume: bool,
    ) -> Result<(), VhostUserError> {
        let path = self.path.clone();
        let protocol = |request: &'static str| refused(&path, request);
        let Some(frontend) = self.frontend.as_mut() else {
            return Err(VhostUserError::Gone { path });
        };
        frontend
            .set_features((driver_features & self.features) | self.protocol_bit)
            .map_err(protocol("SET_FEATURES"))?;
        let regions = memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(protocol("SET_MEM_TABLE"))?;
        frontend
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
            frontend
                .set_vring_num(index, queue.size)
                .map_err(protocol("SET_VRING_NUM"))?;
            let base: u16 = if resume {
                memory
                    .read_obj(GuestAddress(queue.used + 2))
                    .map_err(|_| VhostUserError::Address(queue.used))?
            } else {
                0
            };
            frontend
                .set_vring_base(index, base)
                .map_err(protocol("SET_VRING_BASE"))?;
            frontend
                .set_vring_addr(index, &vring)
                .map_err(protocol("SET_VRING_ADDR"))?;
            frontend
                .set_vring_call(index, &self.calls[index])
                .map_err(protocol("SET_VRING_CALL"))?;
            frontend
                .set_vring_kick(index, &self.kicks[index])
                .map_err(protocol("SET_VRING_KICK"))?;
            frontend
                .set_vring_enable(index, true)
                .map_err(protocol("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops the backend's queues (the driver reset the device). A
    /// backend that fails to is let go, as in [`VhostUserDevice::activate`].
    pub fn reset(&mut self, queues: usize) {
        let Some(frontend) = self.frontend.as_mut() else {
            return;
        };
        let stopped = (0..queues).try_for_each(|index| {
            frontend.set_vring_enable(index, false)?;
            frontend.get_vring_base(index).map(drop)
        });
        if stopped.is_err() {
            self.frontend = None;
        }
    }
}
