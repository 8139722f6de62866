//! Harness for Fabric's multi-process tests: real `fabricd` processes,
//! QEMU guests and reference peers.

pub mod fabricd;
pub mod guest;
