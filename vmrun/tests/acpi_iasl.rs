//! The runner's ACPI tables as ACPICA's disassembler (`iasl -d`, from the
//! acpica-tools package) reads them: every checksum right, the DSDT's
//! virtio-mmio devices with their windows and interrupts, `\_S5`, the
//! hardware-reduced FADT with its sleep and reset registers, a local
//! APIC per vCPU and the I/O APIC in the MADT.

use std::path::Path;
use std::process::Command;

use vmrun::acpi::{tables, MmioDevice};

/// Disassembles `bytes` with `iasl -d` in `dir`; returns the listing.
fn disassemble(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let table = dir.join(format!("{name}.dat"));
    std::fs::write(&table, bytes).expect("write table");
    let output = Command::new("iasl")
        .arg("-d")
        .arg(&table)
        .current_dir(dir)
        .output()
        .expect("iasl (acpica-tools; scripts/install-deps.sh installs it)");
    let listing = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap_or_default();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "iasl -d {name}: {said}\n{listing}");
    assert!(
        !said.contains("Error") && !said.contains("Warning"),
        "{said}"
    );
    assert!(!listing.contains("Incorrect"), "{name}:\n{listing}");
    listing
}

/// `text` without `//` comments, every run of whitespace made one space.
fn squeeze(text: &str) -> String {
    text.lines()
        .map(|line| line.split_once("//").map_or(line, |(code, _)| code))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The "Address" field of a generic address structure in a listing.
fn address_of(listing: &str, register: &str) -> Option<String> {
    listing
        .lines()
        .skip_while(|line| !line.contains(&format!("{register} :")))
        .find(|line| line.contains("Address :"))
        .and_then(|line| line.rsplit(':').next())
        .map(|value| value.trim().to_owned())
}

#[test]
fn iasl_reads_the_tables_a_linux_guest_gets() {
    let dir = std::env::temp_dir().join(format!("vmrun-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let devices = [
        MmioDevice {
            base: 0xd000_0000,
            bytes: 0x1000,
            gsi: 5,
        },
        MmioDevice {
            base: 0xd000_1000,
            bytes: 0x1000,
            gsi: 16,
        },
    ];
    let built = tables(2, &devices).expect("tables");
    let mut listings = std::collections::HashMap::new();
    for (_, bytes) in &built.blobs[1..] {
        let signature = String::from_utf8_lossy(&bytes[..4]).into_owned();
        listings.insert(signature.clone(), disassemble(&dir, &signature, bytes));
    }

    let dsdt = squeeze(&listings["DSDT"]);
    for expected in [
        "Name (_S5, Package (0x02) { 0x05, 0x05 })",
        "Device (V000) { Name (_HID, \"LNRO0005\")",
        "Name (_UID, One)",
        "Memory32Fixed (ReadWrite, 0xD0000000, 0x00001000, )",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000005, }",
        "Memory32Fixed (ReadWrite, 0xD0001000,",
        "{ 0x00000010, }",
    ] {
        assert!(
            dsdt.contains(expected),
            "DSDT lacks {expected:?}:\n{}",
            listings["DSDT"]
        );
    }

    // The data tables' listings are "[offset] Field : value" lines.
    let fadt = squeeze(&listings["FACP"]);
    for expected in [
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        "CMOS RTC Not Present (V5) : 1",
        "Value to cause reset : 06",
    ] {
        assert!(
            fadt.contains(expected),
            "FADT lacks {expected:?}:\n{}",
            listings["FACP"]
        );
    }
    for (register, port) in [
        ("Reset Register", "0000000000000CF9"),
        ("Sleep Control Register", "0000000000000600"),
        ("Sleep Status Register", "0000000000000601"),
    ] {
        let address = address_of(&listings["FACP"], register);
        assert_eq!(address.as_deref(), Some(port), "{register}");
    }

    let madt = &listings["APIC"];
    assert_eq!(madt.matches("[Processor Local APIC]").count(), 2, "{madt}");
    assert_eq!(madt.matches("[I/O APIC]").count(), 1, "{madt}");
    assert!(squeeze(madt).contains("Interrupt : 00000002"), "{madt}");
    let _ = std::fs::remove_dir_all(&dir);
}
