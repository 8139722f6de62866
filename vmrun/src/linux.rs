//! Linux's 64-bit boot protocol: a bzImage (loaded at 1 MiB; entered at
//! its 64-bit entry, load address + 0x200, where it decompresses itself)
//! or an uncompressed `vmlinux` ELF (loaded at its physical addresses;
//! entered at `startup_64`), both with `linux-loader`; the command line
//! and initramfs in guest RAM; and the boot parameters ("zero page") with
//! the e820 map, pointed to by `rsi`, in the mode
//! [`crate::x86::start_long_mode`] sets up.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{E820Kind, GuestRam, HIGH_RAM_START};
use crate::x86::ZERO_PAGE_ADDRESS;

/// Where the command line goes.
pub const CMDLINE_ADDRESS: u64 = 0x2_0000;
/// Longest command line (the kernel's limit on x86).
pub const CMDLINE_BYTES_MAX: usize = 2048;
/// The 64-bit entry's offset from the load address.
const ENTRY_64_OFFSET: u64 = 0x200;
/// xloadflags: the kernel has the 64-bit entry.
const XLF_KERNEL_64: u16 = 1;
/// Where a bzImage decompresses itself at the latest (CONFIG_PHYSICAL_START).
const DECOMPRESSED_START: u64 = 0x100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("not a Linux kernel the runner can load: {0}")]
    Kernel(linux_loader::loader::Error),
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot read the initramfs: {0}")]
    Initramfs(std::io::Error),
    #[error("the initramfs ({bytes} bytes) does not fit in guest RAM below {limit:#x}")]
    InitramfsTooLarge { bytes: u64, limit: u64 },
    #[error("cannot write the boot parameters: {0}")]
    BootParams(String),
}

/// Where the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct LinuxEntry {
    pub entry: u64,
    pub boot_params: u64,
}

/// Whether `kernel` is a bzImage (the "HdrS" magic of its setup header).
pub fn is_bzimage(kernel: &mut File) -> bool {
    let mut magic = [0u8; 4];
    let read = kernel
        .seek(SeekFrom::Start(0x202))
        .and_then(|_| kernel.read_exact(&mut magic));
    let _ = kernel.rewind();
    read.is_ok() && &magic == b"HdrS"
}

/// Loads the kernel, command line and initramfs, and writes the zero page.
pub fn load(
    ram: &GuestRam,
    kernel: &mut File,
    cmdline: &str,
    initramfs: Option<&mut File>,
    acpi_rsdp: u64,
) -> Result<LinuxEntry, LinuxError> {
    let memory = ram.memory();
    let (loaded, entry, mut header) = if is_bzimage(kernel) {
        let loaded = BzImage::load(memory, None, kernel, Some(GuestAddress(HIGH_RAM_START)))
            .map_err(LinuxError::Kernel)?;
        let header =
            loaded
                .setup_header
                .ok_or(LinuxError::Kernel(linux_loader::loader::Error::Bzimage(
                    linux_loader::loader::bzimage::Error::InvalidBzImage,
                )))?;
        if header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LinuxError::Kernel(linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::InvalidBzImage,
            )));
        }
        let entry = loaded.kernel_load.0 + ENTRY_64_OFFSET;
        (loaded, entry, header)
    } else {
        let loaded = Elf::load(memory, None, kernel, Some(GuestAddress(HIGH_RAM_START)))
            .map_err(LinuxError::Kernel)?;
        // A vmlinux has no setup header: the runner writes one.
        let header = setup_header {
            initrd_addr_max: u32::MAX,
            ..Default::default()
        };
        let entry = loaded.kernel_load.0;
        (loaded, entry, header)
    };

    let mut line =
        Cmdline::new(CMDLINE_BYTES_MAX).map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    line.insert_str(cmdline)
        .map_err(|e| LinuxError::Cmdline(e.to_string()))?;
    load_cmdline(memory, GuestAddress(CMDLINE_ADDRESS), &line)
        .map_err(|e| LinuxError::Cmdline(e.to_string()))?;

    header.type_of_loader = 0xff;
    header.boot_flag = 0xaa55;
    header.header = 0x5372_6448; // "HdrS"
    header.cmd_line_ptr = CMDLINE_ADDRESS as u32;
    header.cmdline_size = cmdline.len() as u32 + 1;
    header.kernel_alignment = 0x0100_0000;

    if let Some(initramfs) = initramfs {
        let bytes = initramfs.metadata().map_err(LinuxError::Initramfs)?.len();
        // As high as the kernel allows, page-aligned, above what the kernel
        // takes once running: a bzImage decompresses itself to
        // max(pref_address, 16 MiB) and uses init_size bytes from there.
        let limit = ram.bytes().min(u64::from(header.initrd_addr_max) + 1);
        let address = limit.saturating_sub(bytes) & !0xfff;
        let runtime_end = if header.init_size == 0 {
            loaded.kernel_end
        } else {
            let start = header.pref_address.max(DECOMPRESSED_START);
            loaded
                .kernel_end
                .max(start.saturating_add(u64::from(header.init_size)))
        };
        if bytes == 0 || address < runtime_end || limit < bytes {
            return Err(LinuxError::InitramfsTooLarge { bytes, limit });
        }
        memory
            .read_exact_volatile_from(GuestAddress(address), initramfs, bytes as usize)
            .map_err(|e| LinuxError::Initramfs(std::io::Error::other(e.to_string())))?;
        header.ramdisk_image = address as u32;
        header.ramdisk_size = bytes as u32;
    }

    let mut params = boot_params {
        hdr: header,
        acpi_rsdp_addr: acpi_rsdp,
        ..Default::default()
    };
    for (i, entry) in ram.e820().iter().enumerate() {
        params.e820_table[i].addr = entry.start;
        params.e820_table[i].size = entry.bytes;
        params.e820_table[i].r#type = match entry.kind {
            E820Kind::Ram => E820_RAM,
            E820Kind::Reserved => E820_RESERVED,
        };
        params.e820_entries = i as u8 + 1;
    }
    LinuxBootConfigurator::write_bootparams::<crate::memory::Memory>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDRESS)),
        memory,
    )
    .map_err(|e| LinuxError::BootParams(e.to_string()))?;
    Ok(LinuxEntry {
        entry,
        boot_params: ZERO_PAGE_ADDRESS,
    })
}
