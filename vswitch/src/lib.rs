//! Fabric's software switch.
//!
//! This crate will own the vhost-user-net ports, the per-segment forwarding
//! state machine (MAC learning, VLANs, port security, rate limits) and the
//! encapsulation that joins the switches of all nodes into one L2 fabric.
//! It must not touch block storage or the cluster's metadata store directly;
//! `fabricd` hands it segment and port definitions.
//!
//! Nothing is built here yet.
