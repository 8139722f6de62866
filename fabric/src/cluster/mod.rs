//! The cluster layer: metadata agreed by Raft, placement of replicas.
//!
//! - [`metadata`]: the typed metadata and the one function that applies
//!   committed commands to it. Pure: no I/O, no clock.
//! - [`placement`]: which nodes hold a volume's replicas. Pure.

pub mod metadata;
pub mod placement;
