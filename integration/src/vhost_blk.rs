//! A vhost-user-blk frontend that drives one split virtqueue from this process, without a VM.
//!
//! [`BlkClient`] plays the part a VMM and a guest driver play together: it connects to a
//! vhost-user-blk backend, negotiates features, reads the virtio-blk configuration space, shares
//! a memfd as "guest memory" and then places descriptor chains on a split virtqueue that lives
//! in that memory. Many requests can be in flight at once; completions are reaped by polling the
//! used ring or by waiting on the call eventfd.
//!
//! The client also builds chains a well-behaved driver never sends ([`Malformed`],
//! [`BlkClient::submit_chain`]) so that tests can check a backend answers hostile input with an
//! error status and keeps serving.
//!
//! ```no_run
//! use integration::vhost_blk::{BlkClient, ClientConfig, Request, RequestType};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), integration::vhost_blk::Error> {
//! let mut client = BlkClient::connect("/run/fabric/bench.sock", &ClientConfig::default())?;
//! let buffer = client.data_buffer(0, 4096)?;
//! client.write_data(buffer, &[0xa5; 4096])?;
//! client.submit(&Request { kind: RequestType::Out, sector: 0, data: &[buffer], token: 1 })?;
//! let mut done = Vec::new();
//! client.wait_completions(&mut done, Duration::from_secs(5))?;
//! assert!(done[0].is_ok());
//! # Ok(())
//! # }
//! ```
//!
//! Memory layout (guest physical addresses, one region starting at 0):
//!
//! | what                         | where                              |
//! |------------------------------|------------------------------------|
//! | descriptor table             | 0                                  |
//! | available ring               | right after the descriptor table   |
//! | used ring                    | next page                          |
//! | request slots (header, discard segment, status), one per descriptor | next page |
//! | data area (caller's buffers) | next page, `data_bytes` long        |
//!
//! A request's header and status live in the slot of its head descriptor, so no allocation
//! happens per request.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Bytes in a virtio-blk sector; request headers count in these regardless of `blk_size`.
pub const SECTOR_BYTES: u64 = 512;
/// Queue size used unless [`ClientConfig::queue_size`] says otherwise.
pub const QUEUE_SIZE_DEFAULT: u16 = 256;
/// Largest queue size the client accepts (the limit of split rings in common backends).
pub const QUEUE_SIZE_MAX: u16 = 1024;
/// Largest number of requests in flight at once.
pub const QUEUE_DEPTH_MAX: usize = 128;
/// Size of the data area unless [`ClientConfig::data_bytes`] says otherwise.
pub const DATA_BYTES_DEFAULT: usize = 16 << 20;
/// Largest data area the client creates.
pub const DATA_BYTES_MAX: usize = 1 << 30;
/// Largest number of descriptors in one chain built by the client.
pub const CHAIN_DESCRIPTORS_MAX: usize = 64;
/// Value the status byte holds until the device writes it; no valid status has this value.
pub const STATUS_UNWRITTEN: u8 = 0xff;
/// Length of the identifier returned by `VIRTIO_BLK_T_GET_ID`.
pub const DEVICE_ID_BYTES: u32 = virtio_blk::VIRTIO_BLK_ID_BYTES;
/// Length of a request header (`struct virtio_blk_outhdr`).
pub const HEADER_BYTES: u32 = 16;

/// Bytes of configuration space read: `struct virtio_blk_config` up to `write_zeroes_may_unmap`
/// and its padding, which every backend that offers discard and write-zeroes provides.
pub const CONFIG_SPACE_BYTES: usize = 60;
const PAGE_BYTES: u64 = 4096;
const SLOT_BYTES: u64 = 64;
const SLOT_SEGMENT_OFFSET: u64 = 16;
const SLOT_STATUS_OFFSET: u64 = 32;
const DISCARD_SEGMENT_BYTES: u32 = 16;

/// virtio-blk feature bits the client understands and acknowledges when offered.
const BLK_FEATURES_ACCEPTED: &[u32] = &[
    virtio_blk::VIRTIO_BLK_F_SIZE_MAX,
    virtio_blk::VIRTIO_BLK_F_SEG_MAX,
    virtio_blk::VIRTIO_BLK_F_GEOMETRY,
    virtio_blk::VIRTIO_BLK_F_RO,
    virtio_blk::VIRTIO_BLK_F_BLK_SIZE,
    virtio_blk::VIRTIO_BLK_F_FLUSH,
    virtio_blk::VIRTIO_BLK_F_TOPOLOGY,
    virtio_blk::VIRTIO_BLK_F_MQ,
    virtio_blk::VIRTIO_BLK_F_DISCARD,
    virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES,
];

/// Errors of the vhost-user-blk client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be connected.
    #[error("cannot connect to the vhost-user socket {path}; is the backend running?")]
    Connect {
        path: PathBuf,
        #[source]
        source: vhost::Error,
    },
    /// A vhost-user message failed or was refused.
    #[error("vhost-user {request} failed")]
    Protocol {
        request: &'static str,
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks a virtio feature the client needs.
    #[error("the backend does not offer {name} (offered features {offered:#x})")]
    MissingFeature { name: &'static str, offered: u64 },
    /// The backend lacks a vhost-user protocol feature the client needs.
    #[error(
        "the backend does not offer the vhost-user protocol feature {name} (offered {offered:#x})"
    )]
    MissingProtocolFeature { name: &'static str, offered: u64 },
    /// The backend reported a number of queues the client cannot use.
    #[error("the backend reports {queues} queues; at least one is needed")]
    NoQueues { queues: u64 },
    /// The configuration passed to [`BlkClient::connect`] is out of range.
    #[error("queue size {queue_size} is not a power of two in 2..={QUEUE_SIZE_MAX}")]
    QueueSize { queue_size: u16 },
    /// The configuration passed to [`BlkClient::connect`] is out of range.
    #[error(
        "data area of {bytes} bytes is not a non-zero multiple of 4096 up to {DATA_BYTES_MAX}"
    )]
    DataBytes { bytes: usize },
    /// The memfd backing the shared memory could not be created or sized.
    #[error("cannot create the shared memory file")]
    SharedMemory(#[source] std::io::Error),
    /// The shared memory could not be mapped.
    #[error("cannot map the shared memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// An access to the shared memory failed; this is a bug in the client's address arithmetic.
    #[error("access to shared memory at {addr:#x} failed")]
    MemoryAccess {
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
    /// An eventfd could not be created, written or read.
    #[error("eventfd {operation} failed")]
    EventFd {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the call eventfd failed.
    #[error("poll on the call eventfd failed")]
    Poll(#[source] std::io::Error),
    /// The backend closed the vhost-user socket.
    #[error("the backend closed the vhost-user connection")]
    Disconnected,
    /// A buffer passed to a request does not lie inside the data area.
    #[error("buffer at {addr:#x} of {len} bytes lies outside the data area {start:#x}..{end:#x}")]
    BufferOutsideData {
        addr: u64,
        len: u32,
        start: u64,
        end: u64,
    },
    /// A request of a type that carries no data was given data buffers.
    #[error("{kind:?} requests carry no data buffers; use submit_chain to send such a chain")]
    UnexpectedData { kind: RequestType },
    /// A buffer of zero bytes was passed.
    #[error("a data buffer of zero bytes cannot be described by a descriptor")]
    EmptyBuffer,
    /// The chain needs more descriptors than the limit or the device's `seg_max`.
    #[error("the chain needs {needed} descriptors, more than the limit {limit}")]
    ChainTooLong { needed: usize, limit: usize },
    /// The chain has no descriptors at all.
    #[error("a chain needs at least one descriptor")]
    EmptyChain,
    /// Not enough free descriptors for the chain.
    #[error("the chain needs {needed} descriptors but only {free} are free")]
    QueueFull { needed: usize, free: usize },
    /// Already [`QUEUE_DEPTH_MAX`] requests in flight.
    #[error("{QUEUE_DEPTH_MAX} requests are already in flight")]
    QueueDepth,
    /// The device put an id on the used ring that is not the head of an in-flight chain.
    #[error("the device completed descriptor {id}, which heads no in-flight chain")]
    UnknownUsedId { id: u32 },
    /// The device moved the used index past the number of requests in flight.
    #[error("the device advanced the used index by {advance} with {in_flight} requests in flight")]
    UsedIndexJump { advance: u16, in_flight: usize },
}

/// Result of client operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Settings for [`BlkClient::connect`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Descriptors in the virtqueue: a power of two up to [`QUEUE_SIZE_MAX`].
    ///
    /// A plain request uses three descriptors, so a queue of 256 holds 85 of them at once; use
    /// 512 for the full [`QUEUE_DEPTH_MAX`].
    pub queue_size: u16,
    /// Bytes of shared memory set aside for the caller's data buffers.
    pub data_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            queue_size: QUEUE_SIZE_DEFAULT,
            data_bytes: DATA_BYTES_DEFAULT,
        }
    }
}

/// The virtio-blk configuration space, as read with `GET_CONFIG`.
///
/// Fields whose feature was not negotiated keep the backend's raw value; use the accessor
/// methods on [`BlkClient`] for values that account for negotiation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceConfig {
    pub capacity_sectors: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl DeviceConfig {
    /// Decodes the little-endian configuration space.
    pub fn parse(bytes: &[u8; CONFIG_SPACE_BYTES]) -> Self {
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
        Self {
            capacity_sectors: u64_at(0),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            physical_block_exp: bytes[24],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: bytes[56],
        }
    }
}

/// Request types of virtio-blk, plus any raw type value for testing unknown types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read (`VIRTIO_BLK_T_IN`); data buffers are device-writable.
    In,
    /// Write (`VIRTIO_BLK_T_OUT`); data buffers are device-readable.
    Out,
    /// Flush (`VIRTIO_BLK_T_FLUSH`); no data.
    Flush,
    /// Discard `sectors` sectors from the request's sector; the segment is built by the client.
    Discard { sectors: u32 },
    /// Write zeroes over `sectors` sectors; `unmap` sets `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
    WriteZeroes { sectors: u32, unmap: bool },
    /// Device identifier (`VIRTIO_BLK_T_GET_ID`); one device-writable buffer of 20 bytes.
    GetId,
    /// Any type value, sent with device-readable data buffers.
    Raw(u32),
}

impl RequestType {
    /// The `type` field of the request header.
    pub fn code(self) -> u32 {
        match self {
            Self::In => virtio_blk::VIRTIO_BLK_T_IN,
            Self::Out => virtio_blk::VIRTIO_BLK_T_OUT,
            Self::Flush => virtio_blk::VIRTIO_BLK_T_FLUSH,
            Self::Discard { .. } => virtio_blk::VIRTIO_BLK_T_DISCARD,
            Self::WriteZeroes { .. } => virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES,
            Self::GetId => virtio_blk::VIRTIO_BLK_T_GET_ID,
            Self::Raw(code) => code,
        }
    }

    fn data_device_writable(self) -> bool {
        matches!(self, Self::In | Self::GetId)
    }

    fn carries_data(self) -> bool {
        matches!(self, Self::In | Self::Out | Self::GetId | Self::Raw(_))
    }
}

/// A byte range of shared memory, named by guest physical address.
///
/// Buffers for [`BlkClient::submit`] come from [`BlkClient::data_buffer`]; raw chains may name
/// any address, including ones outside the shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
}

/// A well-formed virtio-blk request.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub kind: RequestType,
    /// First sector (512 bytes each) the request addresses.
    pub sector: u64,
    /// Data buffers, in order; empty for flush, discard and write-zeroes.
    pub data: &'a [Buffer],
    /// Caller's tag, returned in the [`Completion`].
    pub token: u64,
}

/// One descriptor of a raw chain built with [`BlkClient::submit_chain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// A request header in the chain's slot, device-readable, whose descriptor claims `len`
    /// bytes (16 for a well-formed header; shorter to test truncated headers).
    Header { code: u32, sector: u64, len: u32 },
    /// Device-readable bytes at any guest address.
    Readable(Buffer),
    /// Device-writable bytes at any guest address.
    Writable(Buffer),
    /// The chain's one-byte status in its slot, device-writable.
    Status,
}

/// Chains that break the virtio-blk request format, for hostile-input tests.
///
/// Each one carries one data buffer (from [`BlkClient::data_buffer`]) where the shape needs one.
/// A robust backend answers `IOERR` or `UNSUPP` where it can write a status, and goes on serving
/// later requests. Some backends (QEMU's among them) instead drop chains they cannot parse
/// without completing them, or stop the queue; the test decides which answer it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// A write whose chain ends after the data: there is nowhere to put a status.
    MissingStatus,
    /// A read whose data buffer is device-readable, so the device cannot fill it.
    ReadIntoReadable,
    /// A write whose data buffer is device-writable.
    WriteFromWritable,
    /// A read whose header descriptor is 8 bytes instead of 16.
    ShortHeader,
    /// A read at the first sector past the end of the device (well-formed chain; `IOERR`).
    /// Aligned to the device block when the capacity is.
    SectorOutOfRange,
    /// A read of two device blocks starting at the last block, so it ends past the end of the
    /// device (well-formed chain; `IOERR`). The descriptor covers two blocks from the data
    /// buffer's start, so the buffer should hold that much.
    SectorStraddlesEnd,
    /// A read whose data descriptor points past the end of the shared memory.
    AddressOutsideMemory,
    /// A request with type 0xff, which virtio-blk does not define (well-formed chain; `UNSUPP`).
    UnknownType,
    /// A chain of only the header: no data, no status.
    HeaderOnly,
}

/// The device's answer in the status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
    /// Any other value the device wrote.
    Other(u8),
}

impl From<u8> for Status {
    fn from(value: u8) -> Self {
        match u32::from(value) {
            virtio_blk::VIRTIO_BLK_S_OK => Self::Ok,
            virtio_blk::VIRTIO_BLK_S_IOERR => Self::IoErr,
            virtio_blk::VIRTIO_BLK_S_UNSUPP => Self::Unsupp,
            _ => Self::Other(value),
        }
    }
}

/// A request the device put on the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The token given at submission.
    pub token: u64,
    /// The `len` the device wrote into the used ring element.
    pub used_len: u32,
    /// The status byte, or `None` if it still holds [`STATUS_UNWRITTEN`] (the chain had no
    /// status descriptor or the device did not write it).
    pub status: Option<Status>,
    /// Time from submission until the client saw the completion.
    pub latency: Duration,
}

impl Completion {
    /// Whether the device answered `VIRTIO_BLK_S_OK`.
    pub fn is_ok(&self) -> bool {
        self.status == Some(Status::Ok)
    }
}

/// Addresses of the rings and areas in the shared memory.
#[derive(Clone, Copy, Debug)]
struct Layout {
    queue_size: u16,
    desc_table: u64,
    avail: u64,
    used: u64,
    slots: u64,
    data: u64,
    data_bytes: u64,
    total_bytes: u64,
}

impl Layout {
    fn new(queue_size: u16, data_bytes: usize) -> Self {
        let size = u64::from(queue_size);
        let desc_table = 0;
        let avail = desc_table + 16 * size;
        let used = align_up(avail + 6 + 2 * size, PAGE_BYTES);
        let slots = align_up(used + 6 + 8 * size, PAGE_BYTES);
        let data = align_up(slots + SLOT_BYTES * size, PAGE_BYTES);
        let data_bytes = data_bytes as u64;
        Self {
            queue_size,
            desc_table,
            avail,
            used,
            slots,
            data,
            data_bytes,
            total_bytes: data + data_bytes,
        }
    }

    fn descriptor(&self, index: u16) -> u64 {
        self.desc_table + 16 * u64::from(index)
    }

    fn avail_entry(&self, position: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(position % self.queue_size)
    }

    fn used_entry(&self, position: u16) -> u64 {
        self.used + 4 + 8 * u64::from(position % self.queue_size)
    }

    fn slot(&self, head: u16) -> u64 {
        self.slots + SLOT_BYTES * u64::from(head)
    }

    fn status(&self, head: u16) -> u64 {
        self.slot(head) + SLOT_STATUS_OFFSET
    }
}

fn align_up(value: u64, alignment: u64) -> u64 {
    value.div_ceil(alignment) * alignment
}

/// A chain the device holds.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    token: u64,
    descriptors: u16,
    submitted: Instant,
}

/// One descriptor before it is written to the table.
#[derive(Clone, Copy, Debug)]
struct PendingDescriptor {
    addr: u64,
    len: u32,
    device_writable: bool,
}

/// A vhost-user-blk frontend with one split virtqueue; see the module documentation.
pub struct BlkClient {
    frontend: Frontend,
    memory: GuestMemoryMmap,
    layout: Layout,
    kick: EventFd,
    call: EventFd,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    config: DeviceConfig,
    /// Free descriptor indices, used as a stack.
    free: Vec<u16>,
    /// The client's own copy of each descriptor's `next` link, so that freeing a chain never
    /// trusts memory the device can write.
    next: Vec<u16>,
    /// In-flight chains, indexed by head descriptor.
    in_flight: Vec<Option<InFlight>>,
    in_flight_count: usize,
    avail_index: u16,
    used_index: u16,
    notify_pending: bool,
    /// Scratch space for building a chain, kept to avoid allocating per request.
    scratch: Vec<PendingDescriptor>,
}

impl fmt::Debug for BlkClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlkClient")
            .field("layout", &self.layout)
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("protocol_features", &self.protocol_features)
            .field("config", &self.config)
            .field("in_flight", &self.in_flight_count)
            .field("avail_index", &self.avail_index)
            .field("used_index", &self.used_index)
            .finish_non_exhaustive()
    }
}

fn protocol(request: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Protocol { request, source }
}

impl BlkClient {
    /// Connects to a vhost-user-blk backend and sets up queue 0, ready for requests.
    pub fn connect(path: impl AsRef<Path>, config: &ClientConfig) -> Result<Self> {
        let queue_size = config.queue_size;
        if !queue_size.is_power_of_two() || !(2..=QUEUE_SIZE_MAX).contains(&queue_size) {
            return Err(Error::QueueSize { queue_size });
        }
        let data_bytes = config.data_bytes;
        if data_bytes == 0 || data_bytes % PAGE_BYTES as usize != 0 || data_bytes > DATA_BYTES_MAX {
            return Err(Error::DataBytes { bytes: data_bytes });
        }
        let path = path.as_ref();
        let mut frontend = Frontend::connect(path, 1).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;

        frontend.set_owner().map_err(protocol("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(protocol("GET_FEATURES"))?;
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        if offered & version_1 == 0 {
            return Err(Error::MissingFeature {
                name: "VIRTIO_F_VERSION_1",
                offered,
            });
        }
        let protocol_features_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & protocol_features_bit == 0 {
            return Err(Error::MissingFeature {
                name: "VHOST_USER_F_PROTOCOL_FEATURES",
                offered,
            });
        }

        let protocol_offered = frontend
            .get_protocol_features()
            .map_err(protocol("GET_PROTOCOL_FEATURES"))?;
        if !protocol_offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::MissingProtocolFeature {
                name: "CONFIG",
                offered: protocol_offered.bits(),
            });
        }
        let protocol_features = protocol_offered
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK);
        frontend
            .set_protocol_features(protocol_features)
            .map_err(protocol("SET_PROTOCOL_FEATURES"))?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request that has no reply of its own gets an acknowledgement, so a
            // backend that refuses the memory table or a ring address says so here rather than
            // by never completing a request.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let queues = frontend
                .get_queue_num()
                .map_err(protocol("GET_QUEUE_NUM"))?;
            if queues == 0 {
                return Err(Error::NoQueues { queues });
            }
        }

        let blank = [0u8; CONFIG_SPACE_BYTES];
        let (_, payload) = frontend
            .get_config(
                0,
                CONFIG_SPACE_BYTES as u32,
                VhostUserConfigFlags::empty(),
                &blank,
            )
            .map_err(protocol("GET_CONFIG"))?;
        let mut raw = [0u8; CONFIG_SPACE_BYTES];
        // The frontend checks that the reply has the requested size.
        raw.copy_from_slice(&payload[..CONFIG_SPACE_BYTES]);
        let device_config = DeviceConfig::parse(&raw);

        let blk_features = BLK_FEATURES_ACCEPTED
            .iter()
            .fold(0u64, |mask, bit| mask | (1u64 << bit));
        let acked_features = offered & (version_1 | protocol_features_bit | blk_features);
        frontend
            .set_features(acked_features)
            .map_err(protocol("SET_FEATURES"))?;

        let layout = Layout::new(queue_size, data_bytes);
        let memory = create_shared_memory(layout.total_bytes)?;
        let region = memory
            .find_region(GuestAddress(0))
            .expect("the memory was created with one region at address 0");
        let region_info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(protocol("SET_MEM_TABLE"))?;
        frontend
            .set_mem_table(&[region_info])
            .map_err(protocol("SET_MEM_TABLE"))?;

        let host_address = |gpa: u64| -> Result<u64> {
            memory
                .get_host_address(GuestAddress(gpa))
                .map(|pointer| pointer as u64)
                .map_err(|source| Error::MemoryAccess { addr: gpa, source })
        };
        // vhost-user ring addresses are in the frontend's address space, not guest addresses.
        let vring = VringConfigData {
            queue_max_size: queue_size,
            queue_size,
            flags: 0,
            desc_table_addr: host_address(layout.desc_table)?,
            used_ring_addr: host_address(layout.used)?,
            avail_ring_addr: host_address(layout.avail)?,
            log_addr: None,
        };
        let kick = new_eventfd()?;
        let call = new_eventfd()?;
        frontend
            .set_vring_num(0, queue_size)
            .map_err(protocol("SET_VRING_NUM"))?;
        frontend
            .set_vring_base(0, 0)
            .map_err(protocol("SET_VRING_BASE"))?;
        frontend
            .set_vring_addr(0, &vring)
            .map_err(protocol("SET_VRING_ADDR"))?;
        frontend
            .set_vring_call(0, &call)
            .map_err(protocol("SET_VRING_CALL"))?;
        frontend
            .set_vring_kick(0, &kick)
            .map_err(protocol("SET_VRING_KICK"))?;
        frontend
            .set_vring_enable(0, true)
            .map_err(protocol("SET_VRING_ENABLE"))?;

        let queue_slots = usize::from(queue_size);
        Ok(Self {
            frontend,
            memory,
            layout,
            kick,
            call,
            acked_features,
            protocol_features,
            config: device_config,
            // Reversed so that descriptor 0 is handed out first, which makes traces easier to read.
            free: (0..queue_size).rev().collect(),
            next: vec![0; queue_slots],
            in_flight: vec![None; queue_slots],
            in_flight_count: 0,
            avail_index: 0,
            used_index: 0,
            notify_pending: false,
            scratch: Vec::with_capacity(CHAIN_DESCRIPTORS_MAX),
        })
    }

    /// The configuration space read at connection time.
    pub fn device_config(&self) -> &DeviceConfig {
        &self.config
    }

    /// Device capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.config.capacity_sectors
    }

    /// Device capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity_sectors.saturating_mul(SECTOR_BYTES)
    }

    /// The device's logical block size: `blk_size` if offered, else 512.
    pub fn block_size(&self) -> u32 {
        if self.has_feature(virtio_blk::VIRTIO_BLK_F_BLK_SIZE) && self.config.blk_size != 0 {
            self.config.blk_size
        } else {
            SECTOR_BYTES as u32
        }
    }

    /// The virtio features both sides agreed on.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether virtio feature `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.acked_features & (1u64 << bit) != 0
    }

    /// The vhost-user protocol features both sides agreed on.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Whether the device is read-only (`VIRTIO_BLK_F_RO`).
    pub fn is_read_only(&self) -> bool {
        self.has_feature(virtio_blk::VIRTIO_BLK_F_RO)
    }

    /// The queue size in descriptors.
    pub fn queue_size(&self) -> u16 {
        self.layout.queue_size
    }

    /// Number of requests the device holds.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }

    /// Number of free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Length of the data area in bytes.
    pub fn data_bytes(&self) -> u64 {
        self.layout.data_bytes
    }

    /// Guest address one past the end of the shared memory.
    pub fn memory_end(&self) -> u64 {
        self.layout.total_bytes
    }

    /// A buffer of `len` bytes at `offset` into the data area.
    pub fn data_buffer(&self, offset: u64, len: u32) -> Result<Buffer> {
        let buffer = Buffer {
            addr: self.layout.data.saturating_add(offset),
            len,
        };
        self.check_data_buffer(buffer)?;
        Ok(buffer)
    }

    /// Copies `bytes` into the start of `buffer`.
    pub fn write_data(&self, buffer: Buffer, bytes: &[u8]) -> Result<()> {
        self.check_data_buffer(buffer)?;
        let len = bytes.len().min(buffer.len as usize);
        self.memory
            .write_slice(&bytes[..len], GuestAddress(buffer.addr))
            .map_err(|source| Error::MemoryAccess {
                addr: buffer.addr,
                source,
            })
    }

    /// Copies the start of `buffer` into `bytes`.
    pub fn read_data(&self, buffer: Buffer, bytes: &mut [u8]) -> Result<()> {
        self.check_data_buffer(buffer)?;
        let len = bytes.len().min(buffer.len as usize);
        self.memory
            .read_slice(&mut bytes[..len], GuestAddress(buffer.addr))
            .map_err(|source| Error::MemoryAccess {
                addr: buffer.addr,
                source,
            })
    }

    fn check_data_buffer(&self, buffer: Buffer) -> Result<()> {
        let start = self.layout.data;
        let end = self.layout.total_bytes;
        let inside = buffer.addr >= start
            && buffer
                .addr
                .checked_add(u64::from(buffer.len))
                .is_some_and(|buffer_end| buffer_end <= end);
        if inside {
            Ok(())
        } else {
            Err(Error::BufferOutsideData {
                addr: buffer.addr,
                len: buffer.len,
                start,
                end,
            })
        }
    }

    /// Places a well-formed request on the available ring.
    ///
    /// Data buffers longer than the device's `size_max` are split into several descriptors.
    /// The device is notified by [`notify`](Self::notify), or by the next poll or wait.
    pub fn submit(&mut self, request: &Request<'_>) -> Result<()> {
        if !request.kind.carries_data() && !request.data.is_empty() {
            return Err(Error::UnexpectedData { kind: request.kind });
        }
        let head = self.reserve_head()?;
        let slot = self.layout.slot(head);
        self.write_header(slot, request.kind.code(), request.sector)?;

        self.scratch.clear();
        self.scratch.push(PendingDescriptor {
            addr: slot,
            len: HEADER_BYTES,
            device_writable: false,
        });
        let mut data_descriptors = 0usize;
        match request.kind {
            RequestType::Discard { sectors } | RequestType::WriteZeroes { sectors, .. } => {
                let flags = match request.kind {
                    RequestType::WriteZeroes { unmap: true, .. } => {
                        virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    }
                    _ => 0,
                };
                let segment = slot + SLOT_SEGMENT_OFFSET;
                self.write_discard_segment(segment, request.sector, sectors, flags)?;
                self.scratch.push(PendingDescriptor {
                    addr: segment,
                    len: DISCARD_SEGMENT_BYTES,
                    device_writable: false,
                });
            }
            _ => {
                let piece_max = self.descriptor_bytes_max();
                let device_writable = request.kind.data_device_writable();
                for buffer in request.data {
                    self.check_data_buffer(*buffer)?;
                    if buffer.len == 0 {
                        return Err(Error::EmptyBuffer);
                    }
                    let mut offset = 0u32;
                    while offset < buffer.len {
                        let len = (buffer.len - offset).min(piece_max);
                        if self.scratch.len() + 1 >= CHAIN_DESCRIPTORS_MAX {
                            return Err(Error::ChainTooLong {
                                needed: self.scratch.len() + 2,
                                limit: CHAIN_DESCRIPTORS_MAX,
                            });
                        }
                        self.scratch.push(PendingDescriptor {
                            addr: buffer.addr + u64::from(offset),
                            len,
                            device_writable,
                        });
                        data_descriptors += 1;
                        offset += len;
                    }
                }
            }
        }
        if self.has_feature(virtio_blk::VIRTIO_BLK_F_SEG_MAX)
            && self.config.seg_max != 0
            && data_descriptors > self.config.seg_max as usize
        {
            return Err(Error::ChainTooLong {
                needed: data_descriptors,
                limit: self.config.seg_max as usize,
            });
        }
        self.scratch.push(PendingDescriptor {
            addr: self.layout.status(head),
            len: 1,
            device_writable: true,
        });
        self.publish_scratch(head, request.token)
    }

    /// Places an arbitrary chain on the available ring, without any checks on its shape or
    /// addresses. Header and status segments use the chain's own slot.
    pub fn submit_chain(&mut self, segments: &[Segment], token: u64) -> Result<()> {
        if segments.is_empty() {
            return Err(Error::EmptyChain);
        }
        if segments.len() > CHAIN_DESCRIPTORS_MAX {
            return Err(Error::ChainTooLong {
                needed: segments.len(),
                limit: CHAIN_DESCRIPTORS_MAX,
            });
        }
        let head = self.reserve_head()?;
        let slot = self.layout.slot(head);
        self.scratch.clear();
        for segment in segments {
            let descriptor = match *segment {
                Segment::Header { code, sector, len } => {
                    self.write_header(slot, code, sector)?;
                    PendingDescriptor {
                        addr: slot,
                        len,
                        device_writable: false,
                    }
                }
                Segment::Readable(buffer) => PendingDescriptor {
                    addr: buffer.addr,
                    len: buffer.len,
                    device_writable: false,
                },
                Segment::Writable(buffer) => PendingDescriptor {
                    addr: buffer.addr,
                    len: buffer.len,
                    device_writable: true,
                },
                Segment::Status => PendingDescriptor {
                    addr: self.layout.status(head),
                    len: 1,
                    device_writable: true,
                },
            };
            self.scratch.push(descriptor);
        }
        self.publish_scratch(head, token)
    }

    /// Places one of the [`Malformed`] chains on the available ring. `data` is the data
    /// buffer for shapes that carry one (at least 512 bytes, from [`data_buffer`](Self::data_buffer)).
    pub fn submit_malformed(&mut self, kind: Malformed, data: Buffer, token: u64) -> Result<()> {
        let read = virtio_blk::VIRTIO_BLK_T_IN;
        let write = virtio_blk::VIRTIO_BLK_T_OUT;
        let header = |code, sector| Segment::Header {
            code,
            sector,
            len: HEADER_BYTES,
        };
        let capacity = self.config.capacity_sectors;
        let segments: [Option<Segment>; 3] = match kind {
            Malformed::MissingStatus => {
                [Some(header(write, 0)), Some(Segment::Readable(data)), None]
            }
            Malformed::ReadIntoReadable => [
                Some(header(read, 0)),
                Some(Segment::Readable(data)),
                Some(Segment::Status),
            ],
            Malformed::WriteFromWritable => [
                Some(header(write, 0)),
                Some(Segment::Writable(data)),
                Some(Segment::Status),
            ],
            Malformed::ShortHeader => [
                Some(Segment::Header {
                    code: read,
                    sector: 0,
                    len: 8,
                }),
                Some(Segment::Writable(data)),
                Some(Segment::Status),
            ],
            Malformed::SectorOutOfRange => [
                Some(header(read, capacity)),
                Some(Segment::Writable(data)),
                Some(Segment::Status),
            ],
            Malformed::SectorStraddlesEnd => {
                // Two device blocks from the start of the last one: aligned, but half past the end.
                let block = self.block_size();
                let block_sectors = u64::from(block) / SECTOR_BYTES;
                [
                    Some(header(read, capacity.saturating_sub(block_sectors))),
                    Some(Segment::Writable(Buffer {
                        addr: data.addr,
                        len: data.len.max(2 * block),
                    })),
                    Some(Segment::Status),
                ]
            }
            Malformed::AddressOutsideMemory => [
                Some(header(read, 0)),
                Some(Segment::Writable(Buffer {
                    addr: self.layout.total_bytes + (1 << 20),
                    len: data.len,
                })),
                Some(Segment::Status),
            ],
            Malformed::UnknownType => [
                Some(header(0xff, 0)),
                Some(Segment::Readable(data)),
                Some(Segment::Status),
            ],
            Malformed::HeaderOnly => [Some(header(read, 0)), None, None],
        };
        let mut chain = [Segment::Status; 3];
        let mut len = 0;
        for segment in segments.into_iter().flatten() {
            chain[len] = segment;
            len += 1;
        }
        self.submit_chain(&chain[..len], token)
    }

    /// The head the next submitted request will take, if a descriptor is free.
    pub fn next_head(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Places `head` on the available ring with no chain of this client's behind it, as a
    /// hostile or broken driver would: a head past the queue, or one already in flight. The
    /// device must neither answer it nor stop serving.
    pub fn submit_bare_head(&mut self, head: u16) -> Result<()> {
        let entry = self.layout.avail_entry(self.avail_index);
        self.store(entry, head.to_le(), Ordering::Relaxed)?;
        self.avail_index = self.avail_index.wrapping_add(1);
        self.store(
            self.layout.avail + 2,
            self.avail_index.to_le(),
            Ordering::Release,
        )?;
        self.notify_pending = true;
        Ok(())
    }

    /// Kicks the device if requests were submitted since the last kick and the device has not
    /// asked to go without notifications. Returns whether the eventfd was written.
    pub fn notify(&mut self) -> Result<bool> {
        if !self.notify_pending {
            return Ok(false);
        }
        self.notify_pending = false;
        // The available index store must be visible before the device's flags are read, or the
        // device could go to sleep between our read and its check of the index.
        fence(Ordering::SeqCst);
        let flags: u16 = self.load(self.layout.used, Ordering::Acquire)?;
        if u16::from_le(flags) & VRING_USED_F_NO_NOTIFY as u16 != 0 {
            return Ok(false);
        }
        self.kick.write(1).map_err(|source| Error::EventFd {
            operation: "write (kick)",
            source,
        })?;
        Ok(true)
    }

    /// Asks the device to signal the call eventfd on completions (`true`, the default) or not.
    /// With interrupts off only [`poll_completions`](Self::poll_completions) sees completions.
    pub fn set_interrupts(&mut self, enabled: bool) -> Result<()> {
        let flags: u16 = if enabled {
            0
        } else {
            VRING_AVAIL_F_NO_INTERRUPT as u16
        };
        self.store(self.layout.avail, flags.to_le(), Ordering::Release)
    }

    /// Appends every completion on the used ring to `out` without blocking; returns how many.
    pub fn poll_completions(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        self.notify()?;
        let device_index = u16::from_le(self.load(self.layout.used + 2, Ordering::Acquire)?);
        let advance = device_index.wrapping_sub(self.used_index);
        if usize::from(advance) > self.in_flight_count {
            return Err(Error::UsedIndexJump {
                advance,
                in_flight: self.in_flight_count,
            });
        }
        let now = Instant::now();
        for _ in 0..advance {
            let entry = self.layout.used_entry(self.used_index);
            let id = u32::from_le(self.read_obj(entry)?);
            let used_len = u32::from_le(self.read_obj(entry + 4)?);
            let head = u16::try_from(id)
                .ok()
                .filter(|head| *head < self.layout.queue_size)
                .ok_or(Error::UnknownUsedId { id })?;
            let request = self.in_flight[usize::from(head)]
                .take()
                .ok_or(Error::UnknownUsedId { id })?;
            let status_byte: u8 = self.read_obj(self.layout.status(head))?;
            let status = (status_byte != STATUS_UNWRITTEN).then(|| Status::from(status_byte));
            self.release_chain(head, request.descriptors);
            self.in_flight_count -= 1;
            self.used_index = self.used_index.wrapping_add(1);
            out.push(Completion {
                token: request.token,
                used_len,
                status,
                latency: now.saturating_duration_since(request.submitted),
            });
        }
        Ok(usize::from(advance))
    }

    /// Like [`poll_completions`](Self::poll_completions), but if none are ready and requests are
    /// in flight, sleeps on the call eventfd for up to `timeout`. Returns 0 on timeout or when
    /// nothing is in flight.
    pub fn wait_completions(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let reaped = self.poll_completions(out)?;
            if reaped > 0 || self.in_flight_count == 0 {
                return Ok(reaped);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(0);
            }
            if !self.wait_call(remaining)? {
                continue;
            }
            // Clear the counter; a completion that lands after this read signals again.
            match self.call.read() {
                Ok(_) => {}
                Err(source) if source.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(source) => {
                    return Err(Error::EventFd {
                        operation: "read (call)",
                        source,
                    })
                }
            }
        }
    }

    /// Sleeps until the call eventfd is readable or `timeout` passes; fails if the backend hung
    /// up the vhost-user socket meanwhile.
    fn wait_call(&self, timeout: Duration) -> Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.frontend.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        let timeout_ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a live, writable array of two pollfd structures and the length passed
        // matches it; both descriptors are owned by `self` and stay open during the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(Error::Poll(error));
        }
        if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(Error::Disconnected);
        }
        Ok(fds[0].revents & libc::POLLIN != 0)
    }

    fn descriptor_bytes_max(&self) -> u32 {
        if self.has_feature(virtio_blk::VIRTIO_BLK_F_SIZE_MAX) && self.config.size_max != 0 {
            self.config.size_max
        } else {
            u32::MAX
        }
    }

    /// Returns the head descriptor the next chain will use (the top of the free stack) after
    /// checking the depth limit, and resets that head's status byte. The descriptors are taken
    /// off the stack in `publish_scratch`, once the chain length is known.
    fn reserve_head(&mut self) -> Result<u16> {
        if self.in_flight_count >= QUEUE_DEPTH_MAX {
            return Err(Error::QueueDepth);
        }
        let head = *self
            .free
            .last()
            .ok_or(Error::QueueFull { needed: 1, free: 0 })?;
        self.store(
            self.layout.status(head),
            STATUS_UNWRITTEN,
            Ordering::Relaxed,
        )?;
        Ok(head)
    }

    /// Writes the chain in `scratch` to the descriptor table starting at `head` (the top of the
    /// free stack) and makes it available to the device.
    fn publish_scratch(&mut self, head: u16, token: u64) -> Result<()> {
        let needed = self.scratch.len();
        if needed > self.free.len() {
            return Err(Error::QueueFull {
                needed,
                free: self.free.len(),
            });
        }
        let split_at = self.free.len() - needed;
        // The top of the stack is the head whose slot already holds the header and status.
        let mut indices = [0u16; CHAIN_DESCRIPTORS_MAX];
        for (position, index) in self.free[split_at..].iter().rev().enumerate() {
            indices[position] = *index;
        }
        assert_eq!(
            indices[0], head,
            "the head must be the top of the free stack"
        );
        for position in 0..needed {
            let pending = self.scratch[position];
            let index = indices[position];
            let has_next = position + 1 < needed;
            let next = if has_next { indices[position + 1] } else { 0 };
            let mut flags = 0u16;
            if has_next {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            if pending.device_writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let descriptor = Descriptor::new(pending.addr, pending.len, flags, next);
            let addr = self.layout.descriptor(index);
            self.memory
                .write_obj(descriptor, GuestAddress(addr))
                .map_err(|source| Error::MemoryAccess { addr, source })?;
            self.next[usize::from(index)] = next;
        }
        self.free.truncate(split_at);
        self.in_flight[usize::from(head)] = Some(InFlight {
            token,
            descriptors: needed as u16,
            submitted: Instant::now(),
        });
        self.in_flight_count += 1;

        let entry = self.layout.avail_entry(self.avail_index);
        self.store(entry, head.to_le(), Ordering::Relaxed)?;
        self.avail_index = self.avail_index.wrapping_add(1);
        // Release orders the descriptors and the ring entry before the index the device reads.
        self.store(
            self.layout.avail + 2,
            self.avail_index.to_le(),
            Ordering::Release,
        )?;
        self.notify_pending = true;
        Ok(())
    }

    fn release_chain(&mut self, head: u16, descriptors: u16) {
        let mut index = head;
        for position in 0..descriptors {
            self.free.push(index);
            if position + 1 < descriptors {
                index = self.next[usize::from(index)];
            }
        }
    }

    fn write_header(&self, slot: u64, code: u32, sector: u64) -> Result<()> {
        let mut header = [0u8; HEADER_BYTES as usize];
        header[0..4].copy_from_slice(&code.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.memory
            .write_slice(&header, GuestAddress(slot))
            .map_err(|source| Error::MemoryAccess { addr: slot, source })
    }

    fn write_discard_segment(
        &self,
        addr: u64,
        sector: u64,
        sectors: u32,
        flags: u32,
    ) -> Result<()> {
        let mut segment = [0u8; DISCARD_SEGMENT_BYTES as usize];
        segment[0..8].copy_from_slice(&sector.to_le_bytes());
        segment[8..12].copy_from_slice(&sectors.to_le_bytes());
        segment[12..16].copy_from_slice(&flags.to_le_bytes());
        self.memory
            .write_slice(&segment, GuestAddress(addr))
            .map_err(|source| Error::MemoryAccess { addr, source })
    }

    fn load<T: vm_memory::AtomicAccess>(&self, addr: u64, order: Ordering) -> Result<T> {
        self.memory
            .load(GuestAddress(addr), order)
            .map_err(|source| Error::MemoryAccess { addr, source })
    }

    fn store<T: vm_memory::AtomicAccess>(
        &self,
        addr: u64,
        value: T,
        order: Ordering,
    ) -> Result<()> {
        self.memory
            .store(value, GuestAddress(addr), order)
            .map_err(|source| Error::MemoryAccess { addr, source })
    }

    fn read_obj<T: vm_memory::ByteValued>(&self, addr: u64) -> Result<T> {
        self.memory
            .read_obj(GuestAddress(addr))
            .map_err(|source| Error::MemoryAccess { addr, source })
    }
}

fn new_eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(|source| Error::EventFd {
        operation: "create",
        source,
    })
}

/// Creates `bytes` of memfd-backed memory mapped shared, so that the backend's mapping of the
/// same file sees every write.
fn create_shared_memory(bytes: u64) -> Result<GuestMemoryMmap> {
    let name = c"fabric-blk-client";
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call, and the flags are
    // valid memfd_create flags; the call has no other memory-safety preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::SharedMemory(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bytes).map_err(Error::SharedMemory)?;
    let length = usize::try_from(bytes).map_err(|_| {
        Error::SharedMemory(std::io::Error::other("shared memory size exceeds usize"))
    })?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        length,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(Error::Map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keeps_areas_apart_and_page_aligned() {
        for queue_size in [2u16, 256, 1024] {
            let layout = Layout::new(queue_size, 1 << 20);
            let size = u64::from(queue_size);
            assert!(layout.avail >= layout.desc_table + 16 * size);
            assert!(layout.used >= layout.avail + 6 + 2 * size);
            assert_eq!(layout.used % 4, 0);
            assert!(layout.slots >= layout.used + 6 + 8 * size);
            assert!(layout.data >= layout.slots + SLOT_BYTES * size);
            assert_eq!(layout.data % PAGE_BYTES, 0);
            assert_eq!(layout.total_bytes, layout.data + (1 << 20));
            assert_eq!(layout.avail_entry(queue_size), layout.avail_entry(0));
            assert_eq!(layout.used_entry(queue_size + 1), layout.used_entry(1));
        }
    }

    #[test]
    fn config_space_decodes_little_endian_fields() {
        let mut raw = [0u8; CONFIG_SPACE_BYTES];
        raw[0..8].copy_from_slice(&(4u64 << 21).to_le_bytes());
        raw[12..16].copy_from_slice(&254u32.to_le_bytes());
        raw[20..24].copy_from_slice(&4096u32.to_le_bytes());
        raw[34..36].copy_from_slice(&1u16.to_le_bytes());
        raw[48..52].copy_from_slice(&8192u32.to_le_bytes());
        raw[56] = 1;
        let config = DeviceConfig::parse(&raw);
        assert_eq!(config.capacity_sectors, 4 << 21);
        assert_eq!(config.seg_max, 254);
        assert_eq!(config.blk_size, 4096);
        assert_eq!(config.num_queues, 1);
        assert_eq!(config.max_write_zeroes_sectors, 8192);
        assert_eq!(config.write_zeroes_may_unmap, 1);
    }

    #[test]
    fn status_bytes_map_to_names() {
        assert_eq!(Status::from(0), Status::Ok);
        assert_eq!(Status::from(1), Status::IoErr);
        assert_eq!(Status::from(2), Status::Unsupp);
        assert_eq!(Status::from(7), Status::Other(7));
    }

    #[test]
    fn shared_memory_is_file_backed() {
        let memory = create_shared_memory(1 << 20).expect("memfd");
        let region = memory.find_region(GuestAddress(0)).expect("region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("file offset");
        assert_eq!(info.memory_size, 1 << 20);
        assert!(info.mmap_handle >= 0);
    }
}
