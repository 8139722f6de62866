//! Fabric's local volume store and its vhost-user-blk backend.
//!
//! This crate owns everything between a virtio-blk request from a guest and
//! the bytes on this node's disk:
//!
//! - [`Store`]: the volumes of a node (create, list, open, delete), with
//!   metadata in RocksDB ([`meta`]) and one thin data file per volume.
//! - [`Volume`]: a volume's block map, copy-on-write allocation and the
//!   commit rule that keeps data and metadata in agreement across crashes.
//! - [`VolumeQueue`]: the per-queue I/O engine, io_uring underneath,
//!   checksums on every 4 KiB block, verified on every read. It is the
//!   boundary a replication layer will wrap.
//! - [`vhost_user`]: the vhost-user-blk device and its socket server.
//!
//! It must not know about the cluster, the API or the CLI: `fabricd` owns
//! those and hands this crate a data directory and volume names.

pub mod alloc;
pub mod buffer;
pub mod error;
pub mod meta;
pub mod queue;
pub mod replication;
pub mod store;
pub mod vhost_user;
pub mod volume;

pub use error::{Error, Result};
pub use meta::VolumeRecord;
pub use queue::{BlockEngine, Completion, SlotId, VolumeQueue};
pub use store::{Store, StoreOptions};
pub use volume::{Volume, VolumeUsage, BLOCK_SIZE};
