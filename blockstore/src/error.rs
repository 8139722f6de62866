//! Errors of the volume store.

use std::io;
use std::path::PathBuf;

/// What can go wrong in the volume store. Each message says what failed and,
/// where the caller can act on it, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metadata database could not be opened.
    #[error("cannot open the metadata database at {path}: {source}")]
    OpenMeta {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// A read or write of the metadata database failed.
    #[error("metadata database error while {context}: {source}")]
    Meta {
        context: &'static str,
        #[source]
        source: rocksdb::Error,
    },
    /// A metadata record could not be decoded; the database is damaged or
    /// was written by an incompatible version.
    #[error("corrupt metadata record {key}: {reason}")]
    CorruptMeta { key: String, reason: String },
    /// A volume data file could not be opened, created or removed.
    #[error("cannot {action} volume data file {path}: {source}")]
    DataFile {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No volume has this name.
    #[error("volume {0:?} does not exist; `fabctl volume list` shows the volumes")]
    NoSuchVolume(String),
    /// The name is used by another volume.
    #[error("a volume named {0:?} already exists; pick another name or delete it first")]
    VolumeExists(String),
    /// The volume name is not acceptable.
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// The volume size is not acceptable.
    #[error("invalid volume size {size} bytes: {reason}")]
    InvalidSize { size: u64, reason: &'static str },
    /// A block failed its checksum: the stored data is damaged.
    #[error("checksum mismatch in volume {volume} at byte offset {offset}: stored data is damaged (expected crc {expected:#010x}, found {found:#010x})")]
    ChecksumMismatch {
        volume: String,
        offset: u64,
        expected: u32,
        found: u32,
    },
    /// A request lies outside the volume or is not aligned to its block size.
    #[error("request at byte offset {offset} length {len} is out of range or unaligned for volume {volume} of {capacity} bytes")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        capacity: u64,
    },
    /// The request is larger than the device accepts in one piece.
    #[error("request of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    /// All request slots of a queue are in use.
    #[error("queue is full ({0} requests in flight)")]
    QueueFull(usize),
    /// I/O on the volume's data file failed.
    #[error("I/O error on volume {volume} at byte offset {offset}: {source}")]
    Io {
        volume: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// A replicated request failed: the replicas could not take it, or a
    /// newer attachment fenced this one.
    #[error("volume {volume}: {reason}")]
    Replication { volume: String, reason: String },
    /// Setting up or driving the io_uring instance failed.
    #[error("io_uring error: {0}")]
    Ring(#[source] io::Error),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
