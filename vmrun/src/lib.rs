//! Fabric's thin KVM runner.
//!
//! This crate will own the `vmrun` binary: guest memory, vCPU threads, Linux
//! boot, the serial console and the vhost-user frontends that attach a VM to
//! Fabric's volumes and switch ports. It must not serve storage or switch
//! frames itself; those stay in `fabricd`.
//!
//! Nothing is built here yet.
