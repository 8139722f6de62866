//! `vmrun`: runs one VM on KVM until the guest powers off.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmrun::vm::{Ended, NicConfig, Vm, VmConfig, VmError};

/// Run a VM on KVM: boot a Linux bzImage (one vCPU), or load a 64-bit ELF
/// program and start it on every vCPU in 64-bit mode; print its serial
/// console, and stop when it powers off (exit 0), halts (exit 0), is
/// stopped through its control socket (exit 0), resets (exit 2) or hits a
/// triple fault (exit 3).
#[derive(Debug, Parser)]
#[command(name = "vmrun", version)]
struct Args {
    /// The VM's definition, a JSON file (kernel, vcpus, memory_bytes,
    /// initramfs, cmdline, disks, nics), instead of the flags below.
    #[arg(long, conflicts_with_all = ["kernel", "memory", "cpus", "cmdline", "initramfs", "disks", "nics"])]
    config: Option<PathBuf>,
    /// The Linux bzImage or 64-bit ELF to boot.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Guest RAM, e.g. 128M or 1G (a multiple of 2 MiB, at least 8 MiB).
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// A Linux bzImage's command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// A Linux bzImage's initramfs.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Where the serial console goes, appended, at most 64 MiB (default:
    /// standard output).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// A vhost-user-blk socket (e.g. a fabricd volume's): a virtio-blk
    /// disk on virtio-mmio at 0xd0000000, the next at +4 KiB. Repeatable.
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// A vhost-user-net socket and the guest's MAC, as
    /// SOCKET,mac=52:54:00:12:34:56 (e.g. a fabricd switch port): a
    /// virtio-net NIC on virtio-mmio after the disks. Repeatable.
    #[arg(long = "nic", value_parser = parse_nic)]
    nics: Vec<NicConfig>,
    /// A unix socket to serve the VM's control on (one JSON object per
    /// line: {"command":"status"|"pause"|"resume"|"stop"}).
    #[arg(long)]
    control: Option<PathBuf>,
    /// A file the runner writes its exit code to as it ends (for a
    /// supervisor that is not its parent).
    #[arg(long)]
    exit_file: Option<PathBuf>,
}

fn parse_nic(text: &str) -> Result<NicConfig, String> {
    let (socket, mac) = text
        .rsplit_once(",mac=")
        .ok_or_else(|| format!("{text:?}: a NIC is SOCKET,mac=52:54:00:12:34:56"))?;
    Ok(NicConfig {
        socket: PathBuf::from(socket),
        mac: vmrun::definition::parse_mac(mac)?,
    })
}

/// A size with an optional K, M or G suffix (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        _ => return Err(format!("{text:?}: the unit must be K, M or G")),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 128M"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => match vmrun::definition::Definition::load(path)
            .and_then(|definition| definition.to_config())
        {
            Ok(config) => config,
            Err(error) => {
                eprintln!("vmrun: {error}");
                return ExitCode::FAILURE;
            }
        },
        None => VmConfig {
            vcpus: args.cpus,
            memory_bytes: args.memory,
            kernel: args.kernel.clone().unwrap_or_default(),
            cmdline: args.cmdline.clone(),
            initramfs: args.initramfs.clone(),
            disks: args.disks.clone(),
            nics: args.nics.clone(),
            dirty_log: vmrun::vm::DirtyLogMode::Off,
        },
    };
    let console: vmrun::devices::Console = match &args.serial_log {
        // Appended to: a restarted VM's console follows the last one's;
        // capped, so a guest cannot fill the disk.
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => {
                let already = file.metadata().map_or(0, |m| m.len());
                Box::new(vmrun::devices::CappedLog::new(
                    file,
                    already,
                    vmrun::devices::CONSOLE_LOG_BYTES_MAX,
                ))
            }
            Err(error) => {
                eprintln!(
                    "vmrun: cannot create the serial log {}: {error}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
        },
        None => Box::new(std::io::stdout()),
    };
    let mut control_socket = None;
    let ended = Vm::new(&config, console).and_then(|vm| {
        if let Some(path) = &args.control {
            let socket =
                vmrun::control::serve(path, vm.control()).map_err(|error| VmError::Exit {
                    vcpu: 0,
                    exit: format!(
                        "cannot serve the control socket {}: {error}",
                        path.display()
                    ),
                })?;
            control_socket = Some(socket);
        }
        vm.run()
    });
    let (code, said) = match ended {
        Ok(Ended::PoweredOff) => (0, "the guest powered off".to_owned()),
        Ok(Ended::Halted) => (0, "every vCPU halted".to_owned()),
        Ok(Ended::Stopped) => (0, "stopped through its control socket".to_owned()),
        Ok(Ended::Reset) => (2, "the guest asked for a reset".to_owned()),
        Ok(Ended::TripleFault { vcpu }) => (3, format!("vCPU {vcpu} hit a triple fault")),
        Err(error) => (1, error.to_string()),
    };
    eprintln!("vmrun: {said}");
    if let Some(path) = &args.exit_file {
        // Written whole and then renamed: a reader sees all or nothing.
        let partial = path.with_extension("partial");
        let written = std::fs::write(&partial, format!("{code}\n"))
            .and_then(|()| std::fs::rename(&partial, path));
        if let Err(error) = written {
            eprintln!("vmrun: cannot write {}: {error}", path.display());
        }
    }
    if let Some(socket) = &control_socket {
        socket.remove_if_ours();
    }
    ExitCode::from(code)
}
