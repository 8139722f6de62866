//! A VM: KVM's VM and vCPUs, guest RAM and the port bus, and the vCPU
//! threads that run it until the guest powers off, resets, faults or every
//! vCPU halts.
//!
//! State is kept apart the way a checkpoint will need it: guest RAM
//! ([`GuestRam`]), per-vCPU register state (in KVM, read and written only
//! through [`crate::x86`]), and device state ([`PortBus`]).

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::acpi;
use crate::control::{DeviceStatus, VmControl};
use crate::devices::{Console, GuestRequest, IrqLine, PortBus};
pub use crate::dirty::DirtyLogMode;
pub use crate::dirty::DirtyPages;
use crate::dirty::{self, DirtyLog};
use crate::memory::{GuestRam, Memory, MemoryError, HIGH_RAM_START};
use crate::vhost_user::{
    VhostUserDevice, VhostUserError, QUEUE_MAX, VIRTIO_ID_BLOCK, VIRTIO_ID_NET,
};
use crate::virtio_mmio::{self, MmioTransport};
use crate::x86;

/// Most vCPUs a VM may have.
pub const VCPUS_MAX: u8 = 32;
/// KVM's TSS area (three pages just below 4 GiB, outside RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Where the stacks of vCPUs other than the first start (downwards, 4 KiB
/// each), for programs that run on every vCPU from the entry.
const SECONDARY_STACKS_TOP: u64 = 0x8_0000;
/// The first virtio-mmio device's window (above RAM, below 4 GiB); the
/// next ones follow every 4 KiB, disks first.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// COM1's interrupt line.
const SERIAL_IRQ: u32 = 4;
/// A Linux guest's command line unless one is given: the console on COM1,
/// with early messages; no PCI to probe (devices are found in ACPI).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 pci=off";
/// virtio-net features that need a control queue (CTRL_VQ, CTRL_RX,
/// CTRL_VLAN, GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR), which the runner's NICs
/// do not have.
const NET_FEATURES_NEEDING_CONTROL_QUEUE: u64 =
    (1 << 17) | (1 << 18) | (1 << 19) | (1 << 21) | (1 << 22) | (1 << 23);
/// Devices (disks and NICs) a VM may have: windows up to 0xd001_ffff.
pub const DEVICES_MAX: usize = 32;

/// What to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// A 64-bit ELF: its entry is called in 64-bit mode on every vCPU,
    /// with the vCPU's index in `rdi`.
    pub kernel: PathBuf,
    /// A Linux bzImage's command line (default [`DEFAULT_CMDLINE`]).
    pub cmdline: Option<String>,
    /// A Linux bzImage's initramfs.
    pub initramfs: Option<PathBuf>,
    /// vhost-user-blk sockets: each a virtio-blk disk (virtio-mmio).
    pub disks: Vec<PathBuf>,
    /// vhost-user-net sockets (e.g. a `fabricd` switch port's), each a
    /// virtio-net NIC with its MAC (virtio-mmio, after the disks).
    pub nics: Vec<NicConfig>,
    /// Whether and how to log the pages the guest writes
    /// ([`Vm::dirty_pages`]).
    pub dirty_log: DirtyLogMode,
}

/// A NIC: its vhost-user-net socket and the MAC the guest is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    pub socket: PathBuf,
    pub mac: [u8; 6],
}

/// Why a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The guest wrote the power-off port.
    PoweredOff,
    /// The guest asked for a reset.
    Reset,
    /// Every vCPU halted with nothing left to wake it.
    Halted,
    /// A vCPU hit a triple fault (KVM shut it down).
    TripleFault { vcpu: u8 },
    /// It was stopped through its control ([`VmControl::stop`]).
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("a VM needs 1 to {VCPUS_MAX} vCPUs, not {0}")]
    Vcpus(u8),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot read the kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a 64-bit ELF this runner can load: {reason}")]
    KernelFormat { path: PathBuf, reason: String },
    #[error("cannot use KVM (/dev/kvm): {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM refused {what}: {source}")]
    KvmCall {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Setup(#[from] x86::SetupError),
    #[error("vCPU {vcpu} stopped on an exit the runner does not handle: {exit}")]
    Exit { vcpu: u8, exit: String },
    #[error("vCPU {vcpu} failed to run: {source}")]
    Run { vcpu: u8, source: kvm_ioctls::Error },
    #[error("disk {index}: {source}")]
    Disk {
        index: usize,
        source: VhostUserError,
    },
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error(transparent)]
    Linux(#[from] crate::linux::LinuxError),
    #[error("cannot read the initramfs {path}: {source}")]
    Initramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a VM has at most {DEVICES_MAX} disks and NICs together, not {0}")]
    Devices(usize),
    #[error("a Linux guest has at most {max} disks and NICs (one interrupt line each), not {count}", max = DEVICE_GSIS.len())]
    LinuxDevices { count: usize },
    #[error("NIC {index}: {source}")]
    Nic {
        index: usize,
        source: VhostUserError,
    },
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

/// A VM ready to run.
#[derive(Debug)]
pub struct Vm {
    // Kept open for the VM's lifetime.
    _kvm: Kvm,
    fd: Arc<VmFd>,
    ram: GuestRam,
    dirty: Option<DirtyLog>,
    vcpus: Vec<VcpuFd>,
    bus: Arc<PortBus>,
    mmio: Arc<MmioBus>,
    control: Arc<VmControl>,
}

/// The interrupt lines (GSIs) of a Linux guest's virtio devices, in
/// window order: the ISA lines COM1, the RTC and the FPU do not use, then
/// the I/O APIC's PCI lines.
pub const DEVICE_GSIS: [u32; 17] = [
    5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
];

/// Whether a guest boots as Linux (interrupt controller, timer, zero
/// page): a bzImage, or an ELF given a command line or an initramfs (a
/// vmlinux). Any other 64-bit ELF is entered directly on every vCPU.
pub fn boots_linux(kernel: &mut File, cmdline: bool, initramfs: bool) -> bool {
    crate::linux::is_bzimage(kernel) || cmdline || initramfs
}

/// The most disks and NICs a guest can have: a Linux guest needs an
/// interrupt line for each.
pub fn devices_max(linux: bool) -> usize {
    if linux {
        DEVICE_GSIS.len()
    } else {
        DEVICES_MAX
    }
}

/// A virtio device on the MMIO bus, served by a vhost-user backend.
#[derive(Debug)]
struct VirtioDevice {
    base: u64,
    transport: MmioTransport,
    backend: VhostUserDevice,
    /// What was last said about its backend not coming back: a backend
    /// refused again and again is said once per reason.
    complaint: Option<String>,
    /// A backend that answered but could not be taken back is tried again
    /// no sooner than this.
    retry_at: Option<Instant>,
}

impl VirtioDevice {
    /// Takes a backend that came back (connected without the lock held);
    /// a device the driver had started is started on it where the
    /// guest's rings are.
    fn reconnected(&mut self, handshake: crate::vhost_user::Handshake, memory: &Memory) {
        if let Err(error) = self
            .backend
            .reconnect(handshake, self.transport.device_features())
        {
            self.complain(format!(
                "vmrun: the device at {:#x} cannot take its backend back: {error}",
                self.base
            ));
            return;
        }
        if self.transport.status() & virtio_mmio::STATUS_DRIVER_OK != 0 {
            let features = self.transport.driver_features();
            let queues = self.transport.queues().to_vec();
            if let Err(error) = self.backend.activate(memory, features, &queues, true) {
                // The backend is let go (activate drops it) and tried again
                // later; the guest's requests wait, as for a backend away.
                self.complain(format!(
                    "vmrun: the device at {:#x} cannot resume: {error}",
                    self.base
                ));
                return;
            }
            self.backend.kick_all();
        }
        self.backend.count_reconnect();
        self.complaint = None;
        self.retry_at = None;
        eprintln!(
            "vmrun: the backend at {} is back",
            self.backend.path().display()
        );
    }

    /// Says `message` unless it was the last thing said about this device,
    /// and waits [`RETRY_AFTER_REFUSAL`] before trying its backend again.
    fn complain(&mut self, message: String) {
        if self.complaint.as_ref() != Some(&message) {
            eprintln!("{message}");
            self.complaint = Some(message);
        }
        self.retry_at = Some(Instant::now() + RETRY_AFTER_REFUSAL);
    }

    fn status(&self) -> DeviceStatus {
        DeviceStatus {
            kind: match self.transport.device_id() {
                VIRTIO_ID_BLOCK => "disk".into(),
                _ => "nic".into(),
            },
            socket: self.backend.path().display().to_string(),
            driver_ok: self.transport.status() & virtio_mmio::STATUS_DRIVER_OK != 0,
            backend_connected: self.backend.connected(),
            reconnects: self.backend.reconnects(),
        }
    }
}

/// The virtio-mmio devices, shared by the vCPU threads.
#[derive(Debug)]
pub struct MmioBus {
    devices: Vec<Mutex<VirtioDevice>>,
    memory: Memory,
}

/// How often the backends' sockets are checked (and a lost backend
/// tried again).
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);

/// How long a backend that answered but could not be taken back (it lacks
/// a feature, or refused to start the queues) is left before the next try.
const RETRY_AFTER_REFUSAL: Duration = Duration::from_secs(2);

impl MmioBus {
    /// Each device's status, in window order.
    pub fn status(&self) -> Vec<DeviceStatus> {
        self.devices
            .iter()
            .map(|device| device.lock().expect("device poisoned").status())
            .collect()
    }

    /// Keeps every device's backend connected until the VM stops: notices
    /// a backend that went away, and connects to it again once it is back
    /// (the handshake without the device's lock, so vCPUs touching the
    /// device wait at most for the queues' restart).
    fn keep_connected(&self, control: &VmControl) {
        while !control.stopping() {
            for device in &self.devices {
                let identity = {
                    let mut device = device.lock().expect("device poisoned");
                    // A backend refused lately waits for its next try.
                    if device.retry_at.is_some_and(|at| Instant::now() < at) {
                        continue;
                    }
                    if device.backend.connected() {
                        if device.backend.hung_up() {
                            eprintln!(
                                "vmrun: the backend at {} went away; waiting for it to come back",
                                device.backend.path().display()
                            );
                        }
                        continue;
                    }
                    device.backend.identity()
                };
                let (path, device_id, queues) = identity;
                if let Ok(handshake) = crate::vhost_user::handshake(&path, device_id, queues) {
                    device
                        .lock()
                        .expect("device poisoned")
                        .reconnected(handshake, &self.memory);
                }
            }
            std::thread::sleep(RECONNECT_INTERVAL);
        }
    }

    fn find(&self, address: u64) -> Option<(&Mutex<VirtioDevice>, u64)> {
        let index = address.checked_sub(MMIO_BASE)? / virtio_mmio::WINDOW_BYTES;
        let device = self.devices.get(index as usize)?;
        Some((device, (address - MMIO_BASE) % virtio_mmio::WINDOW_BYTES))
    }

    /// A guest's read in the device window; nothing there reads as ones.
    pub fn read(&self, address: u64, data: &mut [u8]) {
        match self.find(address) {
            Some((device, offset)) => device
                .lock()
                .expect("device poisoned")
                .transport
                .read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest's write in the device window.
    pub fn write(&self, address: u64, data: &[u8]) {
        let Some((device, offset)) = self.find(address) else {
            return;
        };
        let mut device = device.lock().expect("device poisoned");
        let VirtioDevice {
            base,
            transport,
            backend,
            retry_at,
            ..
        } = &mut *device;
        match transport.write(offset, data) {
            // A backend that is away is started when it is back.
            Some(virtio_mmio::Event::Activate) if !backend.connected() => {}
            Some(virtio_mmio::Event::Activate) => {
                let features = transport.driver_features();
                let queues = transport.queues().to_vec();
                if let Err(error) = backend.activate(&self.memory, features, &queues, false) {
                    // Let go (activate drops the backend) and started when
                    // it answers again, as for a backend that went away.
                    eprintln!("vmrun: the device at {base:#x} cannot start: {error}");
                    *retry_at = Some(Instant::now() + RETRY_AFTER_REFUSAL);
                }
            }
            Some(virtio_mmio::Event::Reset) => backend.reset(transport.queues().len()),
            None => {}
        }
    }
}

/// Checks a definition without touching KVM: what can be wrong with it is
/// said before any VM exists.
pub fn check(config: &VmConfig) -> Result<File, VmError> {
    if config.vcpus == 0 || config.vcpus > VCPUS_MAX {
        return Err(VmError::Vcpus(config.vcpus));
    }
    crate::memory::check_size(config.memory_bytes)?;
    for (index, disk) in config.disks.iter().enumerate() {
        if !disk.exists() {
            return Err(VmError::Disk {
                index,
                source: VhostUserError::NoSocket { path: disk.clone() },
            });
        }
    }
    for (index, nic) in config.nics.iter().enumerate() {
        if !nic.socket.exists() {
            return Err(VmError::Nic {
                index,
                source: VhostUserError::NoSocket {
                    path: nic.socket.clone(),
                },
            });
        }
        if nic.mac[0] & 1 == 1 || nic.mac == [0; 6] {
            return Err(VmError::Nic {
                index,
                source: VhostUserError::Mac(nic.mac),
            });
        }
    }
    let windows = config.disks.len() + config.nics.len();
    if windows > DEVICES_MAX {
        return Err(VmError::Devices(windows));
    }
    File::open(&config.kernel).map_err(|source| VmError::Kernel {
        path: config.kernel.clone(),
        source,
    })
}

impl Vm {
    /// Builds the VM: RAM, the kernel loaded, every vCPU at its entry.
    pub fn new(config: &VmConfig, console: Console) -> Result<Vm, VmError> {
        let mut kernel = check(config)?;
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let fd = kvm.create_vm().map_err(VmError::Kvm)?;
        // Dirty rings are chosen before any vCPU exists.
        let rings = match config.dirty_log {
            DirtyLogMode::Off | DirtyLogMode::Bitmap => false,
            DirtyLogMode::Auto => dirty::enable_rings(&kvm, &fd, false)?,
            DirtyLogMode::Rings => dirty::enable_rings(&kvm, &fd, true)?,
        };
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_call("the TSS address"))?;
        let ram = GuestRam::new(config.memory_bytes)?;
        let host = ram
            .memory()
            .get_host_address(GuestAddress(0))
            .map_err(|error| MemoryError::Map(error.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags: if config.dirty_log != DirtyLogMode::Off {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: ram.bytes(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is RAM this VM owns, mapped for its whole
        // size. The mapping lives as long as any clone of the `Memory`
        // (reference-counted regions): the MMIO bus holds one, and every
        // vCPU thread holds the bus, so the mapping outlives every vCPU
        // that could touch it. A `DirtyPages` handle keeps the VM fd, not
        // the mapping, and only reads KVM's log.
        unsafe { fd.set_user_memory_region(region) }.map_err(kvm_call("guest memory"))?;

        let linux = boots_linux(
            &mut kernel,
            config.cmdline.is_some(),
            config.initramfs.is_some(),
        );
        let windows = config.disks.len() + config.nics.len();
        if windows > devices_max(linux) {
            return Err(VmError::LinuxDevices { count: windows });
        }
        let (entry, boot_params) = if linux {
            // Linux finds its vCPUs, devices and power-off in ACPI.
            let devices: Vec<acpi::MmioDevice> = (0..windows)
                .map(|slot| acpi::MmioDevice {
                    base: MMIO_BASE + slot as u64 * virtio_mmio::WINDOW_BYTES,
                    bytes: virtio_mmio::WINDOW_BYTES,
                    gsi: DEVICE_GSIS[slot],
                })
                .collect();
            let tables = acpi::tables(config.vcpus, &devices)?;
            for (address, bytes) in &tables.blobs {
                ram.memory()
                    .write_slice(bytes, GuestAddress(*address))
                    .map_err(|error| MemoryError::Map(error.to_string()))?;
            }
            let mut initramfs = match &config.initramfs {
                Some(path) => Some(File::open(path).map_err(|source| VmError::Initramfs {
                    path: path.clone(),
                    source,
                })?),
                None => None,
            };
            let mut cmdline = config
                .cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
            if x86::emulating_kvm() {
                // This host's KVM emulates guests and cannot run XRSTOR.
                eprintln!(
                    "vmrun: KVM here emulates guests (kvm_pvm): CMPXCHG16B hidden, noxsave added"
                );
                cmdline.push_str(" noxsave");
            }
            let loaded = crate::linux::load(
                &ram,
                &mut kernel,
                &cmdline,
                initramfs.as_mut(),
                tables.rsdp_address,
            )?;
            (loaded.entry, loaded.boot_params)
        } else {
            let loaded = Elf::load(
                ram.memory(),
                None,
                &mut kernel,
                Some(GuestAddress(HIGH_RAM_START)),
            )
            .map_err(|error| VmError::KernelFormat {
                path: config.kernel.clone(),
                reason: error.to_string(),
            })?;
            (loaded.kernel_load.0, 0)
        };
        let serial_irq = if linux {
            fd.create_irq_chip()
                .map_err(kvm_call("an interrupt controller"))?;
            let pit = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(kvm_call("a PIT"))?;
            let line = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
                VmError::Exit {
                    vcpu: 0,
                    exit: format!("cannot make the serial interrupt's eventfd: {e}"),
                }
            })?;
            fd.register_irqfd(&line, SERIAL_IRQ)
                .map_err(kvm_call("the serial interrupt"))?;
            IrqLine(Some(line))
        } else {
            IrqLine(None)
        };
        x86::write_boot_tables(ram.memory())?;

        // Disks first, then NICs, one window each.
        let specs = config
            .disks
            .iter()
            .enumerate()
            .map(|(index, path)| (path, VIRTIO_ID_BLOCK, None, index))
            .chain(
                config
                    .nics
                    .iter()
                    .enumerate()
                    .map(|(index, nic)| (&nic.socket, VIRTIO_ID_NET, Some(nic.mac), index)),
            );
        let mut devices = Vec::new();
        for (slot, (path, device_id, mac, index)) in specs.enumerate() {
            let device_error = |source| match mac {
                None => VmError::Disk { index, source },
                Some(_) => VmError::Nic { index, source },
            };
            let queues = if device_id == VIRTIO_ID_NET { 2 } else { 1 };
            let backend =
                VhostUserDevice::connect(path, device_id, queues).map_err(device_error)?;
            let base = MMIO_BASE + slot as u64 * virtio_mmio::WINDOW_BYTES;
            // The guest's queue notifications go straight to the backend.
            for queue in 0..queues {
                let kick = backend.kick(queue).ok_or(VmError::Exit {
                    vcpu: 0,
                    exit: "a device without its kick eventfd".into(),
                })?;
                fd.register_ioevent(
                    kick,
                    &IoEventAddress::Mmio(base + virtio_mmio::reg::QUEUE_NOTIFY),
                    queue as u32,
                )
                .map_err(kvm_call("a queue notification address"))?;
                // The backend's "used buffers" signal is the guest's
                // interrupt, without the runner.
                if linux {
                    let call = backend.call(queue).ok_or(VmError::Exit {
                        vcpu: 0,
                        exit: "a device without its call eventfd".into(),
                    })?;
                    fd.register_irqfd(call, DEVICE_GSIS[slot])
                        .map_err(kvm_call("a device interrupt"))?;
                }
            }
            // A NIC's config space is the runner's: its MAC, link up, one
            // queue pair (the switch's ports do not serve config).
            let config_space = match mac {
                Some(mac) => {
                    let mut space = mac.to_vec();
                    space.extend_from_slice(&1u16.to_le_bytes());
                    space.extend_from_slice(&1u16.to_le_bytes());
                    space
                }
                None => backend.config().to_vec(),
            };
            // A NIC has one queue pair and no control queue here: the
            // features that need one are not offered.
            let features = match mac {
                Some(_) => backend.features() & !NET_FEATURES_NEEDING_CONTROL_QUEUE,
                None => backend.features(),
            };
            let transport =
                MmioTransport::new(device_id, features, &vec![QUEUE_MAX; queues], config_space);
            devices.push(Mutex::new(VirtioDevice {
                base,
                transport,
                backend,
                complaint: None,
                retry_at: None,
            }));
        }
        let mmio = Arc::new(MmioBus {
            devices,
            memory: ram.memory().clone(),
        });
        let control = VmControl::new(config.vcpus, config.memory_bytes, mmio.clone());

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_call("a CPUID query"))?;
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let vcpu = fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_call("a vCPU"))?;
            x86::set_cpuid(&vcpu, &supported, index)?;
            if linux {
                x86::set_lint(&vcpu)?;
                x86::set_boot_msrs(&vcpu)?;
                // Linux starts the other vCPUs itself (INIT, SIPI); KVM
                // holds them until then.
                if index == 0 {
                    x86::start_long_mode(&vcpu, entry, boot_params, 0)?;
                }
                vcpus.push(vcpu);
                continue;
            }
            x86::start_long_mode(&vcpu, entry, boot_params, u64::from(index))?;
            if index > 0 {
                let mut regs = vcpu.get_regs().map_err(kvm_call("registers"))?;
                regs.rsp = SECONDARY_STACKS_TOP - (u64::from(index) - 1) * 0x1000;
                regs.rbp = regs.rsp;
                vcpu.set_regs(&regs).map_err(kvm_call("registers"))?;
            }
            vcpus.push(vcpu);
        }
        let dirty = match (config.dirty_log, rings) {
            (DirtyLogMode::Off, _) => None,
            (_, false) => Some(DirtyLog::Bitmap),
            (_, true) => Some(DirtyLog::Rings(Arc::new(dirty::Rings::map(&vcpus)?))),
        };
        Ok(Vm {
            _kvm: kvm,
            fd: Arc::new(fd),
            ram,
            dirty,
            vcpus,
            bus: Arc::new(PortBus::new(console, serial_irq)),
            mmio,
            control,
        })
    }

    /// The VM's control: pause, resume, stop, status, from any thread.
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The guest-written page log, unless the VM was made without one;
    /// usable while the VM runs and after.
    pub fn dirty_pages(&self) -> Option<DirtyPages> {
        self.dirty.clone().map(|log| DirtyPages {
            fd: self.fd.clone(),
            bytes: self.ram.bytes(),
            log,
        })
    }

    /// Runs every vCPU on its own thread until the VM ends, and keeps
    /// the devices' backends connected meanwhile.
    pub fn run(self) -> Result<Ended, VmError> {
        use std::os::unix::thread::JoinHandleExt;
        install_kick_handler()?;
        let dirty = self.dirty_pages();
        let control = self.control;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        let mut spawn_error = None;
        let vcpu_count = self.vcpus.len();
        control.starting(vcpu_count);
        for (index, mut vcpu) in self.vcpus.into_iter().enumerate() {
            let dirty = dirty.clone();
            let bus = self.bus.clone();
            let mmio = self.mmio.clone();
            let thread_control = control.clone();
            let done = done_tx.clone();
            let index = index as u8;
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // Ends the VM and says so even if this thread panics.
                    let _finished = Finished {
                        control: &thread_control,
                        done,
                    };
                    let ran = run_vcpu(
                        index,
                        &mut vcpu,
                        &bus,
                        &mmio,
                        &thread_control,
                        dirty.as_ref(),
                    );
                    // A vCPU that fails ends the VM.
                    if ran.is_err() {
                        thread_control.end();
                    }
                    ran
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    // Stop the vCPUs already running before giving up;
                    // the ones never started will not end by themselves.
                    for _ in usize::from(index)..vcpu_count {
                        control.vcpu_ended();
                    }
                    control.end();
                    spawn_error = Some(VmError::Exit {
                        vcpu: index,
                        exit: format!("cannot start its thread: {error}"),
                    });
                    break;
                }
            }
        }
        drop(done_tx);
        control.started(threads.iter().map(|t| t.as_pthread_t()).collect());
        let monitor = {
            let mmio = self.mmio.clone();
            let control = control.clone();
            std::thread::Builder::new()
                .name("backends".into())
                .spawn(move || mmio.keep_connected(&control))
                .ok()
        };
        // Wait for the first vCPU to end; if it ended the VM, take the
        // others out of KVM_RUN (a signal, repeated until they notice).
        let mut running = threads.len();
        while running > 0 {
            if done_rx.recv().is_err() {
                break;
            }
            running -= 1;
            if control.stopping() {
                break;
            }
        }
        control.end();
        while threads.iter().any(|thread| !thread.is_finished()) {
            control.kick();
            std::thread::sleep(Duration::from_millis(10));
        }
        control.finished();
        if let Some(monitor) = monitor {
            let _ = monitor.join();
        }
        if let Some(error) = spawn_error {
            for thread in threads {
                let _ = thread.join();
            }
            return Err(error);
        }
        let mut ended = if control.stop_requested() {
            Ended::Stopped
        } else {
            Ended::Halted
        };
        for thread in threads {
            let result = thread.join().map_err(|_| VmError::Exit {
                vcpu: 0,
                exit: "a vCPU thread panicked".into(),
            })?;
            match result? {
                Some(Ended::Halted) | None => {}
                Some(other) => ended = other,
            }
        }
        Ok(ended)
    }
}

/// KVM's memory slot for guest RAM.
pub(crate) const RAM_SLOT: u32 = 0;

extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Set when a vCPU thread ends, however it ends (a panic included): the
/// VM stops unless the thread only halted, and the waiting thread hears.
struct Finished<'a> {
    control: &'a VmControl,
    done: std::sync::mpsc::Sender<()>,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.control.end();
        }
        self.control.vcpu_ended();
        let _ = self.done.send(());
    }
}

/// A signal that only interrupts KVM_RUN (EINTR), to stop a vCPU. Without
/// the handler the signal would end the process.
fn install_kick_handler() -> Result<(), VmError> {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(SIGRTMIN(), kick).map_err(|error| error.to_string())
        })
        .clone()
        .map_err(|error| VmError::Exit {
            vcpu: 0,
            exit: format!("cannot install the vCPU kick handler: {error}"),
        })
}

/// Runs one vCPU until it halts or the VM ends (by this vCPU, another
/// one, or its control); parks it while the VM is paused. Returns how it ended the VM, if it did.
fn run_vcpu(
    index: u8,
    vcpu: &mut VcpuFd,
    bus: &PortBus,
    mmio: &MmioBus,
    control: &VmControl,
    dirty: Option<&DirtyPages>,
) -> Result<Option<Ended>, VmError> {
    let end = |ended: Ended| {
        control.end();
        Ok(Some(ended))
    };
    let emulated = x86::emulating_kvm();
    loop {
        control.park_if_paused();
        if control.stopping() {
            return Ok(None);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => match bus.write(port, data) {
                Some(GuestRequest::PowerOff) => return end(Ended::PoweredOff),
                Some(GuestRequest::Reset) => return end(Ended::Reset),
                None => {}
            },
            Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
            Ok(VcpuExit::MmioRead(address, data)) => mmio.read(address, data),
            Ok(VcpuExit::MmioWrite(address, data)) => mmio.write(address, data),
            // This vCPU's dirty ring is full: collect it (kept for the
            // next `take`) and go on.
            Ok(VcpuExit::Unsupported(dirty::KVM_EXIT_DIRTY_RING_FULL)) if dirty.is_some() => {
                if let Some(dirty) = dirty {
                    dirty.collect()?;
                }
            }
            // No interrupt can wake a halted vCPU yet: it is done.
            Ok(VcpuExit::Hlt) => return Ok(Some(Ended::Halted)),
            Ok(VcpuExit::Shutdown) => return end(Ended::TripleFault { vcpu: index }),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return end(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Ended::Reset,
                    _ => Ended::PoweredOff,
                })
            }
            Ok(other) => {
                let internal = matches!(other, VcpuExit::InternalError);
                let exit = format!("{other:?}");
                // Only where KVM emulates guests: what its emulator lacks.
                if internal && emulated && x86::emulate_unsupported(vcpu, &mmio.memory)? {
                    continue;
                }
                control.end();
                // Where the guest was, and the instruction there.
                let at = vcpu
                    .get_regs()
                    .map(|r| {
                        let bytes = x86::instruction_bytes(vcpu, &mmio.memory, r.rip);
                        format!(" at rip {:#x} (bytes {bytes:02x?})", r.rip)
                    })
                    .unwrap_or_default();
                return Err(VmError::Exit {
                    vcpu: index,
                    exit: format!("{exit}{at}"),
                });
            }
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {}
            Err(source) => {
                control.end();
                return Err(VmError::Run {
                    vcpu: index,
                    source,
                });
            }
        }
    }
}
