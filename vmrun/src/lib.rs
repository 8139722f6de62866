//! Fabric's thin KVM runner.
//!
//! This crate owns the `vmrun` binary: guest memory, vCPU threads, boot and
//! the serial console; the vhost-user frontends that attach a VM to
//! Fabric's volumes and switch ports; and its control socket. It must not serve storage or switch
//! frames itself; those stay in `fabricd`.
//!
//! - [`memory`]: guest RAM (memfd-backed, shareable with vhost-user
//!   backends) and its e820 map.
//! - [`x86`]: 64-bit mode for a vCPU: GDT, page tables, registers, CPUID.
//! - [`definition`]: a VM's definition as a JSON file.
//! - [`devices`]: the port bus: serial console, power-off and reset ports.
//! - [`acpi`]: the ACPI tables a Linux guest finds its vCPUs, devices
//!   and power-off in.
//! - [`linux`]: Linux's 64-bit boot protocol (bzImage, command line,
//!   initramfs, zero page).
//! - [`virtio_mmio`]: the virtio-mmio transport's registers, pure.
//! - [`vhost_user`]: a virtio device served by a vhost-user backend.
//! - [`dirty`]: the pages the guest writes (dirty rings, or KVM's bitmap).
//! - [`vm`]: the VM, its vCPU threads and its MMIO bus; it keeps the
//!   devices' backends connected (a backend that restarts is resumed).
//! - [`control`]: pause, resume, stop and status, in process and on a
//!   unix socket.

pub mod acpi;
pub mod control;
pub mod definition;
pub mod devices;
pub mod dirty;
pub mod linux;
pub mod memory;
pub mod vhost_user;
pub mod virtio_mmio;
pub mod vm;
pub mod x86;
