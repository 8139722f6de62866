//! KVM's dirty log through the runner's API (each vCPU's dirty ring where
//! the kernel offers it): a guest program writes three pages and then 5000
//! more, past what a ring holds; the log names them all, not their
//! neighbours, and is empty once taken.

use std::path::Path;
use std::process::Command;

use vmrun::vm::{Ended, Vm, VmConfig};

#[test]
fn pages_the_guest_writes_show_up_in_the_dirty_log() {
    let dir = std::env::temp_dir().join(format!("vmrun-dirty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let program = dir.join("dirty.elf");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg("dirty")
        .arg(&program)
        .status()
        .expect("run guest/build.sh");
    assert!(status.success(), "building the guest program: {status}");

    let config = VmConfig {
        vcpus: 1,
        memory_bytes: 32 << 20,
        kernel: program,
        cmdline: None,
        initramfs: None,
        disks: Vec::new(),
        nics: Vec::new(),
        dirty_log: true,
    };
    let console = Box::new(std::io::sink());
    let vm = Vm::new(&config, console).expect("a VM");
    let dirty = vm.dirty_pages().expect("dirty logging was asked for");
    // Rings wherever the kernel offers them.
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let offered = kvm.check_extension_int(kvm_ioctls::Cap::DirtyLogRing) >= 64 << 10;
    assert_eq!(dirty.uses_rings(), offered);
    // Nothing ran yet: what the loader wrote is not the guest's doing.
    assert_eq!(dirty.take().expect("log"), Vec::<u64>::new());
    assert_eq!(vm.run().expect("run"), Ended::PoweredOff);
    let pages = dirty.take().expect("log");
    for page in [0x600, 0x605, 0x64d] {
        assert!(
            pages.contains(&page),
            "page {page:#x} missing from {pages:x?}"
        );
    }
    // More pages than a ring holds: the vCPU stopped when its ring was
    // full, and nothing was lost.
    for page in 0x800..0x800 + 5000 {
        assert!(pages.contains(&page), "page {page:#x} missing");
    }
    for page in [0x601, 0x604, 0x64c, 0x64e, 0x800 + 5000] {
        assert!(
            !pages.contains(&page),
            "page {page:#x} was not written: {pages:x?}"
        );
    }
    // Taking the log clears it.
    assert_eq!(dirty.take().expect("log"), Vec::<u64>::new());
    let _ = std::fs::remove_dir_all(&dir);
}
