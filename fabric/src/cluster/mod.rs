//! The cluster layer: metadata agreed by Raft, placement of replicas.
//!
//! - [`metadata`]: the typed metadata and the one function that applies
//!   committed commands to it. Pure: no I/O, no clock.
//! - [`placement`]: which nodes hold a volume's replicas. Pure.
//! - [`health`]: up, suspect, down from heartbeat times. Pure.
//! - [`resources`]: what this node offers the pool.
//! - [`raft`]: the openraft group that agrees on the metadata, with its
//!   log, vote and snapshots in RocksDB.
//! - [`local_network`]: an in-process network between members with fault
//!   injection (partitions, crashed nodes), for tests and simulation.
//! - [`tls`]: the cluster CA and node certificates (mutual TLS 1.3).
//! - [`transport`]: Raft RPCs over QUIC, one stream per RPC.
//! - [`runtime`]: this node's running membership: init, resume, writes
//!   forwarded to the leader, heartbeats, node list.
//! - `simulation` (tests): seeded fault schedules against the group.

pub mod health;
pub mod local_network;
pub mod metadata;
pub mod placement;
pub mod raft;
pub mod resources;
pub mod runtime;
#[cfg(test)]
pub mod simulation;
pub mod tls;
pub mod transport;

#[cfg(test)]
mod tests;
