//! Guest RAM: one memfd-backed region from guest address 0, so that
//! vhost-user backends can map the same pages, and the e820 map that
//! describes it to the guest.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Smallest guest: room for the boot structures below 1 MiB and a kernel.
pub const MEMORY_MIN_BYTES: u64 = 8 << 20;
/// Guest RAM comes in whole 2 MiB pages (the boot page tables map 2 MiB
/// pages, and hugepage-backed RAM needs it).
pub const MEMORY_ALIGN_BYTES: u64 = 2 << 20;
/// RAM stays below the 32-bit device hole for now (one region).
pub const MEMORY_MAX_BYTES: u64 = 3 << 30;
/// Start of the legacy hole (EBDA, VGA, BIOS) the e820 map reserves.
const EBDA_START: u64 = 0x9fc00;
/// Where RAM resumes above the legacy hole.
pub const HIGH_RAM_START: u64 = 0x10_0000;

pub type Memory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest memory of {bytes} bytes is too small: at least {MEMORY_MIN_BYTES} bytes (8 MiB)"
    )]
    TooSmall { bytes: u64 },
    #[error("guest memory of {bytes} bytes is not a multiple of 2 MiB")]
    NotAligned { bytes: u64 },
    #[error("guest memory of {bytes} bytes is more than the 3 GiB this runner maps")]
    TooLarge { bytes: u64 },
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot map guest memory: {0}")]
    Map(String),
}

/// A range of the guest's physical address space, as e820 reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub start: u64,
    pub bytes: u64,
    pub kind: E820Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    Ram,
    Reserved,
}

/// The guest's RAM.
#[derive(Debug)]
pub struct GuestRam {
    memory: Memory,
    /// The memfd behind it, to hand to vhost-user backends.
    file: File,
    bytes: u64,
}

/// Checks a requested RAM size.
pub fn check_size(bytes: u64) -> Result<(), MemoryError> {
    if bytes < MEMORY_MIN_BYTES {
        return Err(MemoryError::TooSmall { bytes });
    }
    if bytes % MEMORY_ALIGN_BYTES != 0 {
        return Err(MemoryError::NotAligned { bytes });
    }
    if bytes > MEMORY_MAX_BYTES {
        return Err(MemoryError::TooLarge { bytes });
    }
    Ok(())
}

impl GuestRam {
    pub fn new(bytes: u64) -> Result<GuestRam, MemoryError> {
        check_size(bytes)?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the
        // result is checked before use.
        let fd = unsafe { libc::memfd_create(c"vmrun-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor this function owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(bytes).map_err(MemoryError::Memfd)?;
        let shared = file.try_clone().map_err(MemoryError::Memfd)?;
        let memory = Memory::from_ranges_with_files([(
            GuestAddress(0),
            bytes as usize,
            Some(FileOffset::new(shared, 0)),
        )])
        .map_err(|error| MemoryError::Map(error.to_string()))?;
        Ok(GuestRam {
            memory,
            file,
            bytes,
        })
    }

    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The e820 map: low RAM, the legacy hole, RAM from 1 MiB up.
    pub fn e820(&self) -> Vec<E820Entry> {
        vec![
            E820Entry {
                start: 0,
                bytes: EBDA_START,
                kind: E820Kind::Ram,
            },
            E820Entry {
                start: EBDA_START,
                bytes: HIGH_RAM_START - EBDA_START,
                kind: E820Kind::Reserved,
            },
            E820Entry {
                start: HIGH_RAM_START,
                bytes: self.bytes - HIGH_RAM_START,
                kind: E820Kind::Ram,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(
            check_size(4 << 20),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            check_size((16 << 20) + 4096),
            Err(MemoryError::NotAligned { .. })
        ));
        assert!(matches!(
            check_size(4 << 30),
            Err(MemoryError::TooLarge { .. })
        ));
        assert!(check_size(128 << 20).is_ok());
    }

    #[test]
    fn the_e820_map_covers_ram_around_the_legacy_hole() {
        let ram = GuestRam::new(16 << 20).expect("ram");
        let map = ram.e820();
        assert_eq!(map[0].start, 0);
        assert_eq!(map[1].kind, E820Kind::Reserved);
        let ram_bytes: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.bytes)
            .sum();
        assert_eq!(ram_bytes, (16 << 20) - (HIGH_RAM_START - EBDA_START));
        assert_eq!(map[2].start + map[2].bytes, 16 << 20);
    }
}
