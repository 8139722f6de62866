//! KVM's dirty log through the runner's API (each vCPU's dirty ring where
//! the kernel offers it): a guest program writes three pages and then 5000
//! more, past what a ring holds; the log names them all, not their
//! neighbours, and is empty once taken.

use std::path::Path;
use std::process::Command;

use vmrun::vm::{DirtyLogMode, Ended, Vm, VmConfig};

/// Builds `vmrun/guest/NAME.c` into a temporary directory.
fn program(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("vmrun-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let program = dir.join(format!("{name}.elf"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(name)
        .arg(&program)
        .status()
        .expect("run guest/build.sh");
    assert!(status.success(), "building the guest program: {status}");
    (dir, program)
}

fn config(program: std::path::PathBuf, memory_bytes: u64, dirty_log: DirtyLogMode) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_bytes,
        kernel: program,
        cmdline: None,
        initramfs: None,
        disks: Vec::new(),
        nics: Vec::new(),
        dirty_log,
    }
}

/// Runs the VM to its power-off and takes the log, which must name the
/// three pages every `dirty` program writes.
fn run_and_take(vm: Vm, dirty: &vmrun::vm::DirtyPages) -> Vec<u64> {
    assert_eq!(vm.run().expect("run"), Ended::PoweredOff);
    let pages = dirty.take().expect("log");
    for page in [0x600, 0x605, 0x64d] {
        assert!(
            pages.contains(&page),
            "page {page:#x} missing from {pages:x?}"
        );
    }
    pages
}

#[test]
fn pages_the_guest_writes_show_up_in_the_dirty_log() {
    let (dir, program) = program("dirty");
    let config = config(program, 32 << 20, DirtyLogMode::Auto);
    let console = Box::new(std::io::sink());
    let vm = Vm::new(&config, console).expect("a VM");
    let dirty = vm.dirty_pages().expect("dirty logging was asked for");
    // Rings wherever the kernel offers them and runs guests natively.
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    assert_eq!(dirty.uses_rings(), vmrun::dirty::rings_usable(&kvm));
    // Nothing ran yet: what the loader wrote is not the guest's doing.
    assert_eq!(dirty.take().expect("log"), Vec::<u64>::new());
    let pages = run_and_take(vm, &dirty);
    // More pages than a ring holds (with rings: the vCPU stopped when its
    // ring was full), and nothing was lost.
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

/// Dirty rings asked for explicitly, with a guest that writes fewer pages
/// than a ring's reserve: each vCPU's ring is mapped, collected and handed
/// back, on any host whose kernel offers rings (and refused with the
/// reason where it does not).
#[test]
fn dirty_rings_collect_the_pages_a_vcpu_writes() {
    let (dir, program) = program("dirtyfew");
    let config = config(program, 16 << 20, DirtyLogMode::Rings);
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    if kvm.check_extension_int(kvm_ioctls::Cap::DirtyLogRing) < 64 << 10 {
        let error = Vm::new(&config, Box::new(std::io::sink())).unwrap_err();
        assert!(error.to_string().contains("does not offer"), "{error}");
        return;
    }
    let vm = Vm::new(&config, Box::new(std::io::sink())).expect("a VM");
    let dirty = vm.dirty_pages().expect("dirty logging was asked for");
    assert!(dirty.uses_rings());
    assert_eq!(dirty.take().expect("log"), Vec::<u64>::new());
    let pages = run_and_take(vm, &dirty);
    for page in [0x601, 0x604, 0x64c, 0x64e, 0x800] {
        assert!(
            !pages.contains(&page),
            "page {page:#x} was not written: {pages:x?}"
        );
    }
    assert_eq!(dirty.take().expect("log"), Vec::<u64>::new());
    let _ = std::fs::remove_dir_all(&dir);
}
