//! Harness for Fabric's multi-process tests.

pub mod fabricd;
pub mod guest;
pub mod vhost_blk;
pub mod blk_workload;
pub mod latency;
pub mod storage_daemon;
