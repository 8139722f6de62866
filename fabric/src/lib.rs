//! `fabricd`, the Fabric node daemon.
//!
//! This crate owns the process: configuration ([`config`]), the node's
//! resources ([`node`]: the volume store and the vhost-user servers of
//! attached volumes), the HTTP/JSON API ([`api`]) and the daemon's life
//! cycle ([`daemon`]: data-directory lock, signals, periodic commits,
//! clean shutdown), and the cluster layer ([`cluster`]: Raft metadata over
//! QUIC, node health, placement; [`cluster_api`]: its API routes), the
//! replication of volumes ([`replication`]) and the node's switch ports
//! ([`switch`], on `vswitch`).
//!
//! It must not reach into volume data or guest memory itself: that is
//! `blockstore`'s job, behind `Store` and `BlkServer`.

pub mod api;
pub mod cluster;
pub mod cluster_api;
pub mod config;
pub mod daemon;
pub mod node;
pub mod replication;
pub mod switch;
pub mod vms;
