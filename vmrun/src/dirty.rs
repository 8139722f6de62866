//! The pages a guest writes: the base of live migration and of streaming
//! a VM to a standby node.
//!
//! Where the kernel offers it (and runs guests natively), each vCPU has a
//! dirty ring (KVM writes the
//! page numbers the vCPU dirties into a ring shared with the runner; the
//! runner collects them and hands the entries back). Otherwise KVM's dirty
//! bitmap of the RAM slot is read and cleared. Either way
//! [`DirtyPages::take`] returns the guest page numbers written since the
//! last call.

use std::collections::BTreeSet;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_dirty_gfn, kvm_enable_cap, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use crate::vm::VmError;

/// Bytes of each vCPU's ring: 4096 entries of 16 bytes.
const RING_BYTES: u32 = 64 << 10;
/// An entry KVM filled and the runner has not collected.
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
/// An entry the runner collected, for KVM to take back.
const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// The exit KVM takes when a vCPU's ring is full.
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

/// Whether dirty rings are used on this host: where the kernel offers
/// rings of [`RING_BYTES`], unless KVM only emulates guests there (its
/// emulator runs on past a full ring's reserve and overwrites entries
/// not yet collected, which the kernel warns about; the bitmap loses
/// nothing).
pub fn rings_usable(kvm: &Kvm) -> bool {
    let offered = kvm.check_extension_int(Cap::DirtyLogRing);
    offered > 0 && offered as u32 >= RING_BYTES && !crate::x86::emulating_kvm()
}

/// How a VM logs the pages its guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// Not at all.
    Off,
    /// Rings where [`rings_usable`], else the bitmap.
    Auto,
    /// Rings wherever the kernel offers them (an error where it does
    /// not): for a guest known to dirty fewer pages between two
    /// collections than a ring's reserve, e.g. in tests.
    Rings,
    /// KVM's bitmap.
    Bitmap,
}

/// Enables dirty rings on `vm` (before any vCPU exists: the ring is a
/// VM-wide choice): where [`rings_usable`], or, if `forced`, wherever the
/// kernel offers them. Returns whether it did.
pub fn enable_rings(kvm: &Kvm, vm: &VmFd, forced: bool) -> Result<bool, VmError> {
    let offered = kvm.check_extension_int(Cap::DirtyLogRing);
    if forced && (offered <= 0 || (offered as u32) < RING_BYTES) {
        return Err(VmError::KvmCall {
            what: "dirty rings (this kernel does not offer them)",
            source: kvm_ioctls::Error::new(libc::ENOTSUP),
        });
    }
    if !forced && !rings_usable(kvm) {
        return Ok(false);
    }
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
        args: [u64::from(RING_BYTES), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|source| VmError::KvmCall {
        what: "a dirty ring",
        source,
    })?;
    Ok(true)
}

/// One vCPU's ring, mapped from its fd.
#[derive(Debug)]
struct Ring {
    entries: *mut kvm_dirty_gfn,
    count: u32,
}

// SAFETY: the ring is shared memory KVM and this process read and write
// through atomics on each entry's flags (acquire/release, as KVM's
// documentation asks); the mapping lives as long as the `Ring`.
unsafe impl Send for Ring {}
// SAFETY: as above; harvesting is serialized by `Rings::harvest`'s lock.
unsafe impl Sync for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Rings::map`, of this size.
        unsafe { libc::munmap(self.entries.cast(), RING_BYTES as usize) };
    }
}

/// Every vCPU's ring, and what has been collected from them.
#[derive(Debug)]
pub struct Rings {
    rings: Vec<Ring>,
    harvest: Mutex<Harvest>,
}

#[derive(Debug, Default)]
struct Harvest {
    /// Each ring's next entry.
    next: Vec<u32>,
    /// Pages collected and not yet taken.
    pages: BTreeSet<u64>,
}

impl Rings {
    /// Maps each vCPU's ring.
    pub fn map(vcpus: &[VcpuFd]) -> Result<Rings, VmError> {
        // SAFETY: sysconf with a valid name.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        let mut rings = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            // SAFETY: a shared mapping of the vCPU fd at KVM's dirty ring
            // offset, of the size the VM was given; checked below.
            let entries = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    RING_BYTES as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    vcpu.as_raw_fd(),
                    i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
                )
            };
            if entries == libc::MAP_FAILED {
                return Err(VmError::KvmCall {
                    what: "a dirty ring's mapping",
                    source: kvm_ioctls::Error::last(),
                });
            }
            rings.push(Ring {
                entries: entries.cast(),
                count: RING_BYTES / std::mem::size_of::<kvm_dirty_gfn>() as u32,
            });
        }
        let next = vec![0; rings.len()];
        Ok(Rings {
            rings,
            harvest: Mutex::new(Harvest {
                next,
                pages: BTreeSet::new(),
            }),
        })
    }

    /// Collects every dirty entry of every ring, hands the entries back
    /// to KVM, and keeps the pages for [`Self::take`].
    pub fn harvest(&self, vm: &VmFd) -> Result<(), VmError> {
        let mut harvest = self.harvest.lock().expect("dirty rings poisoned");
        let Harvest { next, pages } = &mut *harvest;
        for (ring, next) in self.rings.iter().zip(next.iter_mut()) {
            loop {
                // SAFETY: the index is within the ring; the entry is in
                // the mapping. Its flags are read and written atomically.
                let entry = unsafe { ring.entries.add((*next % ring.count) as usize) };
                // SAFETY: `flags` is an aligned u32 in shared memory.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
                if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                    break;
                }
                // SAFETY: KVM wrote the entry before it set DIRTY (acquired).
                let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
                if slot == crate::vm::RAM_SLOT {
                    pages.insert(offset);
                }
                flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
                *next = next.wrapping_add(1);
            }
        }
        // SAFETY: an ioctl on the VM fd without arguments.
        let reset = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
        if reset < 0 {
            return Err(VmError::KvmCall {
                what: "the dirty rings' reset",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// The pages collected so far, and forgets them.
    fn take(&self) -> Vec<u64> {
        let mut harvest = self.harvest.lock().expect("dirty rings poisoned");
        std::mem::take(&mut harvest.pages).into_iter().collect()
    }
}

/// How a VM's dirty pages are found.
#[derive(Debug, Clone)]
pub enum DirtyLog {
    /// Each vCPU's ring.
    Rings(Arc<Rings>),
    /// KVM's bitmap of the RAM slot.
    Bitmap,
}

/// The pages the guest has written, while the VM runs and after.
#[derive(Debug, Clone)]
pub struct DirtyPages {
    pub(crate) fd: Arc<VmFd>,
    pub(crate) bytes: u64,
    pub(crate) log: DirtyLog,
}

impl DirtyPages {
    /// Whether the pages come from dirty rings (else KVM's bitmap).
    pub fn uses_rings(&self) -> bool {
        matches!(self.log, DirtyLog::Rings(_))
    }

    /// Collects what a full ring holds, to be returned by the next
    /// [`Self::take`] (bitmaps need nothing).
    pub(crate) fn collect(&self) -> Result<(), VmError> {
        match &self.log {
            DirtyLog::Rings(rings) => rings.harvest(&self.fd),
            DirtyLog::Bitmap => Ok(()),
        }
    }

    /// The guest page numbers (4 KiB) written since the last call (or
    /// since the VM started), ascending, and clears the log.
    pub fn take(&self) -> Result<Vec<u64>, VmError> {
        match &self.log {
            DirtyLog::Rings(rings) => {
                rings.harvest(&self.fd)?;
                Ok(rings.take())
            }
            DirtyLog::Bitmap => {
                let bitmap = self
                    .fd
                    .get_dirty_log(crate::vm::RAM_SLOT, self.bytes as usize)
                    .map_err(|source| VmError::KvmCall {
                        what: "the dirty log",
                        source,
                    })?;
                let mut pages = Vec::new();
                for (word_index, &word) in bitmap.iter().enumerate() {
                    let mut word = word;
                    while word != 0 {
                        let bit = u64::from(word.trailing_zeros());
                        pages.push(word_index as u64 * 64 + bit);
                        word &= word - 1;
                    }
                }
                Ok(pages)
            }
        }
    }
}
