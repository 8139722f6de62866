//! What a vCPU needs to start in 64-bit mode: a GDT, identity-mapped page
//! tables for the first 4 GiB (RAM and the device window below 4 GiB), long-mode control registers, and the CPUID
//! the host's KVM supports. The boot structures live below 1 MiB, where
//! the e820 map calls the memory RAM (the kernel reserves it as it boots).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::Memory;

/// The GDT: null, 64-bit code, data, TSS.
pub const GDT_ADDRESS: u64 = 0x500;
/// An empty IDT: any exception before the guest sets its own is a triple
/// fault, which ends the VM with a clear reason.
pub const IDT_ADDRESS: u64 = 0x520;
/// Linux's boot parameters (the "zero page"), pointed to by `rsi`.
pub const ZERO_PAGE_ADDRESS: u64 = 0x7000;
/// Top of the boot stack.
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDRESS: u64 = 0x9000;
const PDPT_ADDRESS: u64 = 0xa000;
/// Four page directories (one per GiB), 0xb000 to 0xefff.
const PD_ADDRESS: u64 = 0xb000;
const MAPPED_GIB: u64 = 4;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 0x10;
const CR0_PG: u64 = 0x8000_0000;
const CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot write the boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused the vCPU's {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SetupError {
    move |source| SetupError::Kvm { what, source }
}

/// A GDT entry from its flags (access byte and granularity nibble), base
/// and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM segment register a GDT entry at `index` loads.
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |at: u32| ((entry >> at) & 1) as u8;
    let granular = bit(55) == 1;
    let limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT's entries.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: 64-bit, present, execute/read
        gdt_entry(0xc093, 0, 0xfffff), // data: present, read/write
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ]
}

/// Writes the GDT, IDT and page tables identity-mapping the first 4 GiB
/// with 2 MiB pages.
pub fn write_boot_tables(memory: &Memory) -> Result<(), SetupError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        memory.write_obj(*entry, GuestAddress(GDT_ADDRESS + i as u64 * 8))?;
    }
    memory.write_obj(0u64, GuestAddress(IDT_ADDRESS))?;
    memory.write_obj(PDPT_ADDRESS | 0x3, GuestAddress(PML4_ADDRESS))?;
    for gib in 0..MAPPED_GIB {
        let directory = PD_ADDRESS + gib * 0x1000;
        memory.write_obj(directory | 0x3, GuestAddress(PDPT_ADDRESS + gib * 8))?;
    }
    for i in 0..512 * MAPPED_GIB {
        // Present, writable, 2 MiB page.
        memory.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDRESS + i * 8))?;
    }
    Ok(())
}

/// Puts `vcpu` in 64-bit mode at `entry`, with `rsi` holding
/// `boot_params` (Linux's zero page; anything for other guests) and `rdi`
/// the vCPU's index.
pub fn start_long_mode(
    vcpu: &VcpuFd,
    entry: u64,
    boot_params: u64,
    index: u64,
) -> Result<(), SetupError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let gdt = boot_gdt();
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.gdt.base = GDT_ADDRESS;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDRESS;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_ADDRESS;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))?;

    let regs = kvm_regs {
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: boot_params,
        rdi: index,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("registers"))?;
    Ok(())
}

/// Wires the local APIC's LINT0 to the PIC (ExtINT) and LINT1 to NMI, as
/// a PC's firmware leaves them, so legacy interrupts reach a Linux guest.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), SetupError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7 << 8;
    const DELIVERY_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    for (offset, mode) in [(LVT_LINT0, DELIVERY_EXTINT), (LVT_LINT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | mode;
        for (i, byte) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *byte as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))
}

/// The MSRs a PC's firmware leaves set, as a Linux guest expects them:
/// fast string operations on, and MTRRs enabled with write-back as the
/// default memory type (else Linux leaves PAT off).
pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), SetupError> {
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_TYPE_WRITE_BACK: u64 = 6;
    let entries = [
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
    .map(|(index, data)| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|_| SetupError::Kvm {
        what: "boot MSRs",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("boot MSRs"))?;
    if set != entries.len() {
        return Err(SetupError::Kvm {
            what: "boot MSRs (some refused)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    Ok(())
}

/// CPUID leaf 1, ECX: CMPXCHG16B.
const CPUID_1_ECX_CX16: u32 = 1 << 13;

/// Whether the host's KVM runs guests by emulation (the `kvm_pvm` module),
/// which cannot execute CMPXCHG16B: Linux stops with an internal error in
/// its allocator unless CPUID hides the instruction.
pub fn emulating_kvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The breakpoint exception's vector.
const BP_VECTOR: u8 = 3;
const RFLAGS_STATUS: u64 = 0x8d5; // CF, PF, AF, ZF, SF, OF
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_AC: u64 = 1 << 18;

/// Where KVM only emulates guests, its emulator stops (an internal error)
/// on a few instructions Linux uses: `int3` in 64-bit mode (it delivers
/// software interrupts only in real mode), `clac`/`stac`, `fwait`, and
/// `popcnt` (which CPUID cannot hide there). If the vCPU stopped on one of these, this does
/// what the instruction does and returns true; otherwise false.
pub fn emulate_unsupported(vcpu: &VcpuFd, memory: &Memory) -> Result<bool, SetupError> {
    let mut regs = vcpu.get_regs().map_err(kvm("registers"))?;
    let bytes = instruction_bytes(vcpu, memory, regs.rip);
    match bytes.as_slice() {
        // int3: the #BP it raises is a trap (the saved RIP is the next
        // instruction). Linux's alternatives self-test and text patching
        // use it.
        [0xcc, ..] => {
            regs.rip += 1;
            vcpu.set_regs(&regs).map_err(kvm("registers"))?;
            let mut events = vcpu.get_vcpu_events().map_err(kvm("vCPU events"))?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.pending = 0;
            events.flags = 0;
            vcpu.set_vcpu_events(&events).map_err(kvm("vCPU events"))?;
            Ok(true)
        }
        // fwait: taken as a no-op (it raises #MF only for a pending,
        // unmasked x87 exception, which the kernels it is met in do not
        // leave).
        [0x9b, ..] => {
            regs.rip += 1;
            vcpu.set_regs(&regs).map_err(kvm("registers"))?;
            Ok(true)
        }
        // clac, stac: RFLAGS.AC (SMAP's user-access window).
        [0x0f, 0x01, op @ (0xca | 0xcb), ..] => {
            if *op == 0xca {
                regs.rflags &= !RFLAGS_AC;
            } else {
                regs.rflags |= RFLAGS_AC;
            }
            regs.rip += 3;
            vcpu.set_regs(&regs).map_err(kvm("registers"))?;
            Ok(true)
        }
        // popcnt r, r (32 or 64 bits, register operands only).
        [0xf3, rest @ ..] => {
            let (rex, rest) = match rest {
                [rex @ 0x40..=0x4f, rest @ ..] => (*rex, rest),
                _ => (0, rest),
            };
            let [0x0f, 0xb8, modrm, ..] = rest else {
                return Ok(false);
            };
            if modrm >> 6 != 0b11 {
                return Ok(false);
            }
            let dst = ((modrm >> 3) & 7) | ((rex & 0x4) << 1);
            let src = (modrm & 7) | ((rex & 0x1) << 3);
            let wide = rex & 0x8 != 0;
            let value = *register(&mut regs, src);
            let value = if wide { value } else { value & 0xffff_ffff };
            *register(&mut regs, dst) = u64::from(value.count_ones());
            regs.rflags &= !RFLAGS_STATUS;
            if value == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
            regs.rip += 1 + u64::from(rex != 0) + 3;
            vcpu.set_regs(&regs).map_err(kvm("registers"))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// A general-purpose register by its encoding (0 rax .. 15 r15).
fn register(regs: &mut kvm_regs, number: u8) -> &mut u64 {
    match number {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// Up to 15 bytes (the longest x86 instruction) at the guest's virtual
/// address `rip`, as the vCPU maps it; fewer where the mapping or RAM
/// ends.
pub fn instruction_bytes(vcpu: &VcpuFd, memory: &Memory, rip: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for offset in 0..15 {
        let Ok(translation) = vcpu.translate_gva(rip + offset) else {
            break;
        };
        if translation.valid == 0 {
            break;
        }
        match memory.read_obj::<u8>(GuestAddress(translation.physical_address)) {
            Ok(byte) => bytes.push(byte),
            Err(_) => break,
        }
    }
    bytes
}

/// Gives `vcpu` the CPUID KVM supports, with its own APIC id in leaf 1.
pub fn set_cpuid(vcpu: &VcpuFd, supported: &CpuId, index: u8) -> Result<(), SetupError> {
    let mut cpuid = supported.clone();
    let emulated = emulating_kvm();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(index) << 24);
                if emulated {
                    entry.ecx &= !CPUID_1_ECX_CX16;
                }
            }
            // The extended topology leaves give the x2APIC id.
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm("CPUID"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_and_decode() {
        let gdt = boot_gdt();
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[3], 0x008f_8b00_0000_ffff);
        let code = segment(gdt[1], 1);
        assert_eq!((code.selector, code.l, code.db, code.present), (8, 1, 0, 1));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment(gdt[2], 2);
        assert_eq!((data.selector, data.type_, data.db), (16, 3, 1));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_map_the_first_4_gib() {
        let memory = Memory::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("memory");
        write_boot_tables(&memory).expect("tables");
        let pml4: u64 = memory.read_obj(GuestAddress(PML4_ADDRESS)).expect("pml4");
        assert_eq!(pml4, PDPT_ADDRESS | 3);
        let last: u64 = memory
            .read_obj(GuestAddress(PD_ADDRESS + 2047 * 8))
            .expect("pd");
        assert_eq!(last, (2047 << 21) | 0x83);
        let fourth: u64 = memory
            .read_obj(GuestAddress(PDPT_ADDRESS + 3 * 8))
            .expect("pdpt");
        assert_eq!(fourth, (PD_ADDRESS + 0x3000) | 3);
    }
}
