//! vhost-user-blk: serving a volume to QEMU (or any vhost-user frontend).
//!
//! - [`request`]: the virtio-blk request format and validation, pure.
//! - [`config`]: feature bits and the configuration space.
//! - [`device`]: the [`BlkBackend`], from descriptor chains to queue I/O.
//! - [`server`]: the socket, one frontend at a time, reconnects.

pub mod config;
pub mod device;
pub mod request;
pub mod server;

pub use device::{BlkBackend, BlkCounters, BlkOptions, DeviceInfo};
pub use server::{BlkServer, ServerError};
