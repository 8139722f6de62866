//! ACPI tables for Linux guests: how a stock kernel, which cannot be told
//! about virtio-mmio devices on its command line, finds them, and how it
//! finds every vCPU and powers off.
//!
//! - RSDP → XSDT → FADT, MADT; FADT → DSDT.
//! - FADT: hardware-reduced ACPI (no PM timer, no SCI, no fixed
//!   registers); the sleep control register is [`SLEEP_CONTROL_PORT`]
//!   (S5 there powers off), the reset register is the 0xcf9 port.
//! - MADT: one local APIC per vCPU, the I/O APIC, IRQ 0 on pin 2.
//! - DSDT (AML): `\_S5` and, under `\_SB`, one `LNRO0005` device per
//!   virtio-mmio window (Linux's virtio_mmio driver binds to that id),
//!   with its window and its interrupt line (edge, active high).
//!
//! The tables are built as bytes by pure functions and written to the
//! legacy BIOS area (reserved in the e820 map), where Linux also scans
//! for the RSDP; its address is in the zero page too.

/// Where the tables go: the BIOS area Linux scans for the RSDP.
pub const TABLES_START: u64 = 0x000e_0000;
/// The end of that area.
pub const TABLES_END: u64 = 0x0010_0000;
/// The 8-bit sleep control register: SLP_EN with SLP_TYP 5 powers off.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The 8-bit sleep status register (reads as 0: never woken).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The sleep type of S5 (soft off) in `\_S5`.
pub const SLP_TYP_S5: u8 = 5;
/// SLP_EN in the sleep control register.
pub const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// The reset register (the reset control port) and what is written.
const RESET_PORT: u64 = 0xcf9;
const RESET_VALUE: u8 = 0x06;
const LOCAL_APIC_ADDRESS: u32 = 0xfee0_0000;
const IO_APIC_ADDRESS: u32 = 0xfec0_0000;
const OEM_ID: &[u8; 6] = b"FABRIC";
const OEM_TABLE_ID: &[u8; 8] = b"VMRUN   ";

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub bytes: u64,
    pub gsi: u32,
}

/// The tables, each at its guest address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub rsdp_address: u64,
    /// (guest address, bytes) of each table, the RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(u64),
}

/// Builds the tables for `vcpus` vCPUs and the given devices.
pub fn tables(vcpus: u8, devices: &[MmioDevice]) -> Result<Tables, AcpiError> {
    let dsdt = dsdt(devices);
    let madt = madt(vcpus);
    // Laid out after the RSDP (36 bytes), 16-byte aligned.
    let align = |address: u64| (address + 15) & !15;
    let xsdt_address = align(TABLES_START + 36);
    let xsdt_bytes = 36 + 8 * 2;
    let fadt_address = align(xsdt_address + xsdt_bytes);
    let dsdt_address = align(fadt_address + FADT_BYTES as u64);
    let madt_address = align(dsdt_address + dsdt.len() as u64);
    let end = madt_address + madt.len() as u64;
    if end > TABLES_END {
        return Err(AcpiError::TooLarge(end - TABLES_START));
    }
    let xsdt = xsdt(&[fadt_address, madt_address]);
    debug_assert_eq!(xsdt.len() as u64, xsdt_bytes);
    Ok(Tables {
        rsdp_address: TABLES_START,
        blobs: vec![
            (TABLES_START, rsdp(xsdt_address)),
            (xsdt_address, xsdt),
            (fadt_address, fadt(dsdt_address)),
            (dsdt_address, dsdt),
            (madt_address, madt),
        ],
    })
}

/// Makes the bytes of a table sum to zero (the checksum at `at`).
fn checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    let sum = bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b));
    bytes[at] = sum.wrapping_neg();
}

/// A table: the 36-byte header, then `body`, length and checksum set.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(36 + body.len());
    bytes.extend_from_slice(signature);
    bytes.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    bytes.push(revision);
    bytes.push(0); // checksum
    bytes.extend_from_slice(OEM_ID);
    bytes.extend_from_slice(OEM_TABLE_ID);
    bytes.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    bytes.extend_from_slice(b"FBRC"); // creator id
    bytes.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    bytes.extend_from_slice(body);
    checksum(&mut bytes, 9);
    bytes
}

/// The RSDP (revision 2: the XSDT's address).
fn rsdp(xsdt_address: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(36);
    bytes.extend_from_slice(b"RSD PTR ");
    bytes.push(0); // checksum of the first 20 bytes
    bytes.extend_from_slice(OEM_ID);
    bytes.push(2); // revision
    bytes.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    bytes.extend_from_slice(&36u32.to_le_bytes());
    bytes.extend_from_slice(&xsdt_address.to_le_bytes());
    bytes.push(0); // extended checksum
    bytes.extend_from_slice(&[0; 3]);
    let mut first = bytes[..20].to_vec();
    checksum(&mut first, 8);
    bytes[8] = first[8];
    checksum(&mut bytes, 32);
    bytes
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|a| a.to_le_bytes()).collect();
    table(b"XSDT", 1, &body)
}

/// Bytes of an ACPI 6 FADT.
const FADT_BYTES: usize = 276;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// A generic address structure for an 8-bit I/O port.
fn io_port_gas(port: u64) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[0] = 1; // system I/O
    gas[1] = 8; // bit width
    gas[3] = 1; // byte access
    gas[4..12].copy_from_slice(&port.to_le_bytes());
    gas
}

fn fadt(dsdt_address: u64) -> Vec<u8> {
    // Offsets are the FADT's, from the table's start.
    let mut bytes = vec![0u8; FADT_BYTES];
    let mut put = |at: usize, value: &[u8]| bytes[at..at + value.len()].copy_from_slice(value);
    put(40, &(dsdt_address as u32).to_le_bytes());
    put(
        109,
        &(IAPC_BOOT_ARCH_VGA_NOT_PRESENT
            | IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED
            | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
            .to_le_bytes(),
    );
    put(
        112,
        &(FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP).to_le_bytes(),
    );
    put(116, &io_port_gas(RESET_PORT));
    put(128, &[RESET_VALUE]);
    put(131, &[3]); // FADT minor version: 6.3
    put(140, &dsdt_address.to_le_bytes());
    put(244, &io_port_gas(u64::from(SLEEP_CONTROL_PORT)));
    put(256, &io_port_gas(u64::from(SLEEP_STATUS_PORT)));
    put(268, b"FABRICVM");
    table(b"FACP", 6, &bytes[36..])
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LOCAL_APIC_ADDRESS.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s too
    for id in 0..vcpus {
        // Processor local APIC: UID, APIC id, enabled.
        body.extend_from_slice(&[0, 8, id, id]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // The I/O APIC: id (KVM's reads 0), address, first GSI.
    body.extend_from_slice(&[1, 12, 0, 0]);
    body.extend_from_slice(&IO_APIC_ADDRESS.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override: ISA IRQ 0 (the PIT) is GSI 2.
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI on LINT1 of every processor.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    table(b"APIC", 5, &body)
}

/// AML, the little of it the DSDT needs.
mod aml {
    pub const ZERO: u8 = 0x00;
    pub const ONE: u8 = 0x01;
    const NAME_OP: u8 = 0x08;
    const BYTE_PREFIX: u8 = 0x0a;
    const WORD_PREFIX: u8 = 0x0b;
    const DWORD_PREFIX: u8 = 0x0c;
    const STRING_PREFIX: u8 = 0x0d;
    const QWORD_PREFIX: u8 = 0x0e;
    const SCOPE_OP: u8 = 0x10;
    const BUFFER_OP: u8 = 0x11;
    const PACKAGE_OP: u8 = 0x12;
    const EXT_OP_PREFIX: u8 = 0x5b;
    const DEVICE_OP: u8 = 0x82;

    /// A PkgLength for `content` bytes that follow it (it counts itself).
    pub fn pkg_length(content: usize) -> Vec<u8> {
        for extra in 0..4usize {
            let total = content + 1 + extra;
            let fits = match extra {
                0 => total < 0x40,
                1 => total < 0x1000,
                2 => total < 0x10_0000,
                _ => total < 0x1000_0000,
            };
            if !fits {
                continue;
            }
            if extra == 0 {
                return vec![total as u8];
            }
            let mut bytes = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                bytes.push((total >> (4 + 8 * i)) as u8);
            }
            return bytes;
        }
        unreachable!("AML objects are far smaller than 256 MiB")
    }

    pub fn integer(value: u64) -> Vec<u8> {
        match value {
            0 => vec![ZERO],
            1 => vec![ONE],
            v if v <= 0xff => vec![BYTE_PREFIX, v as u8],
            v if v <= 0xffff => [&[WORD_PREFIX][..], &(v as u16).to_le_bytes()].concat(),
            v if v <= 0xffff_ffff => [&[DWORD_PREFIX][..], &(v as u32).to_le_bytes()].concat(),
            v => [&[QWORD_PREFIX][..], &v.to_le_bytes()].concat(),
        }
    }

    pub fn string(text: &str) -> Vec<u8> {
        [&[STRING_PREFIX][..], text.as_bytes(), &[0]].concat()
    }

    /// `Name(name, value)`; `name` is a NameString (e.g. `_HID`, `\_S5_`).
    pub fn name(name: &[u8], value: &[u8]) -> Vec<u8> {
        [&[NAME_OP][..], name, value].concat()
    }

    fn with_length(op: &[u8], content: &[u8]) -> Vec<u8> {
        [op, &pkg_length(content.len()), content].concat()
    }

    pub fn scope(name: &[u8], body: &[u8]) -> Vec<u8> {
        with_length(&[SCOPE_OP], &[name, body].concat())
    }

    pub fn device(name: &[u8; 4], body: &[u8]) -> Vec<u8> {
        with_length(&[EXT_OP_PREFIX, DEVICE_OP], &[&name[..], body].concat())
    }

    pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
        let mut content = vec![elements.len() as u8];
        for element in elements {
            content.extend_from_slice(element);
        }
        with_length(&[PACKAGE_OP], &content)
    }

    pub fn buffer(bytes: &[u8]) -> Vec<u8> {
        with_length(
            &[BUFFER_OP],
            &[&integer(bytes.len() as u64)[..], bytes].concat(),
        )
    }

    /// A resource template: the descriptors and the end tag.
    pub fn resources(descriptors: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes: Vec<u8> = descriptors.concat();
        bytes.extend_from_slice(&[0x79, 0]); // end tag, checksum 0 (none)
        buffer(&bytes)
    }

    /// `Memory32Fixed(ReadWrite, base, bytes)`.
    pub fn memory32_fixed(base: u32, bytes: u32) -> Vec<u8> {
        [
            &[0x86, 9, 0, 1][..],
            &base.to_le_bytes(),
            &bytes.to_le_bytes(),
        ]
        .concat()
    }

    /// `Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`.
    pub fn edge_interrupt(gsi: u32) -> Vec<u8> {
        [&[0x89, 6, 0, 0b0011, 1][..], &gsi.to_le_bytes()].concat()
    }
}

fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut body = aml::name(
        b"_S5_",
        &aml::package(&[
            aml::integer(u64::from(SLP_TYP_S5)),
            aml::integer(u64::from(SLP_TYP_S5)),
        ]),
    );
    let mut bus = Vec::new();
    for (index, device) in devices.iter().enumerate() {
        let name = format!("V{index:03}");
        let name: [u8; 4] = name.as_bytes().try_into().expect("four characters");
        let resources = aml::resources(&[
            aml::memory32_fixed(device.base as u32, device.bytes as u32),
            aml::edge_interrupt(device.gsi),
        ]);
        let device_body = [
            aml::name(b"_HID", &aml::string("LNRO0005")),
            aml::name(b"_UID", &aml::integer(index as u64)),
            aml::name(b"_CRS", &resources),
        ]
        .concat();
        bus.extend_from_slice(&aml::device(&name, &device_body));
    }
    body.extend_from_slice(&aml::scope(b"\\_SB_", &bus));
    table(b"DSDT", 2, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    #[test]
    fn pkg_lengths_count_themselves() {
        assert_eq!(aml::pkg_length(0), vec![1]);
        assert_eq!(aml::pkg_length(62), vec![63]);
        // 63 + 2 = 65 = 0x41: two bytes, low nibble 1, then 0x04.
        assert_eq!(aml::pkg_length(63), vec![0x41, 0x04]);
        assert_eq!(aml::pkg_length(4093), vec![0x4f, 0xff]);
        assert_eq!(aml::pkg_length(4094), vec![0x81, 0x00, 0x01]);
    }

    #[test]
    fn every_table_sums_to_zero_and_points_at_the_next() {
        let devices: Vec<MmioDevice> = (0..17)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + i * 0x1000,
                bytes: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        let tables = tables(4, &devices).expect("tables");
        let (address, rsdp) = &tables.blobs[0];
        assert_eq!(*address, TABLES_START);
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(rsdp));
        let xsdt_address = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let find = |address: u64| {
            tables
                .blobs
                .iter()
                .find(|(a, _)| *a == address)
                .map(|(_, b)| b.clone())
                .expect("a table there")
        };
        let xsdt = find(xsdt_address);
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut signatures = Vec::new();
        for entry in xsdt[36..].chunks(8) {
            let table = find(u64::from_le_bytes(entry.try_into().unwrap()));
            assert!(sums_to_zero(&table));
            assert_eq!(
                u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize,
                table.len()
            );
            signatures.push(table[..4].to_vec());
            if &table[..4] == b"FACP" {
                let dsdt = find(u64::from_le_bytes(table[140..148].try_into().unwrap()));
                assert_eq!(&dsdt[..4], b"DSDT");
                assert!(sums_to_zero(&dsdt));
            }
        }
        assert_eq!(signatures, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        for (address, bytes) in &tables.blobs {
            assert!(address + bytes.len() as u64 <= TABLES_END);
        }
    }
}
