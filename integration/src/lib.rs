//! Harness for Fabric's multi-process tests.

pub mod blk_workload;
pub mod cpu;
pub mod fabricd;
pub mod guest;
pub mod latency;
pub mod netns;
pub mod stats;
pub mod storage_daemon;
pub mod testpmd;
pub mod vhost_blk;
