//! Fabric's software switch.
//!
//! This crate owns the per-segment forwarding state machine (MAC learning
//! with aging, 802.1Q VLANs, port security, rate limits, counters) and the
//! frame handling around it. It must not touch block storage or the
//! cluster's metadata store: `fabricd` hands it segment and port
//! definitions.
//!
//! - [`switch::Switch`]: the forwarding decision, pure (a frame and the time
//!   in, the ports it leaves on out).
//! - [`frame`]: MAC addresses, Ethernet headers, tag rewriting.
//! - [`port::Fabric`]: a node's switch with its ports;
//!   [`port::NetBackend`]: a port's vhost-user-net device;
//!   [`server::NetServer`]: a port served on its unix socket;
//!   [`port::Tunnel`]: the way out to another node's switch;
//!   [`tap::HostPort`]: a port that is a TAP interface on the host.
//! - [`tunnel`]: the header of frames between nodes, and reassembly.
//! - [`ring`]: guest-memory lookups and used-ring updates for the
//!   per-frame path.

pub mod frame;
pub mod port;
pub mod relay;
pub mod ring;
pub mod server;
pub mod switch;
pub mod tap;
pub mod tunnel;
