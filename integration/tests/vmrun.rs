//! `vmrun` on KVM with small guest programs the project builds itself
//! (`vmrun/guest/*.c`, freestanding C): a 64-bit guest prints on the serial
//! console and powers off; every vCPU of a 4-vCPU VM reports in; a guest
//! drives a virtio-blk queue served by a real `fabricd` volume; two guests
//! exchange frames through `fabricd`'s switch ports; bad definitions are
//! refused with a clear error before any VM runs.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration::fabricd::{binary, start_cluster, Fabricd};
use integration::vhost_blk::{BlkClient, ClientConfig, RequestType};

/// Runs vmrun with `args`, killed after a minute (a few thousand guest
/// instructions take milliseconds even where KVM is emulated).
fn vmrun(args: &[&str]) -> Result<Output> {
    let child = Command::new(binary("vmrun")?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start vmrun")?;
    wait(child)
}

fn wait(child: std::process::Child) -> Result<Output> {
    wait_for(child, Duration::from_secs(60))
}

fn wait_for(mut child: std::process::Child, limit: Duration) -> Result<Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output()?;
            bail!(
                "vmrun did not end in {limit:?}; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_64_bit_guest_prints_on_the_serial_console_and_powers_off() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hello = integration::guest::vmrun_program(dir.path(), "hello")?;
    let log = dir.path().join("serial.log");
    let output = vmrun(&[
        "--kernel",
        hello.to_str().context("path")?,
        "--memory",
        "16M",
        "--serial-log",
        log.to_str().context("path")?,
    ])?;
    let stderr = text(&output.stderr);
    ensure!(output.status.success(), "{}: {stderr}", output.status);
    ensure!(stderr.contains("the guest powered off"), "{stderr}");
    let console = std::fs::read_to_string(&log)?;
    ensure!(
        console == "hello from a 64-bit guest on vCPU 0\n",
        "console: {console:?}"
    );
    // Without --serial-log, the console is vmrun's standard output.
    let output = vmrun(&[
        "--kernel",
        hello.to_str().context("path")?,
        "--memory",
        "16M",
    ])?;
    ensure!(
        text(&output.stdout).contains("hello from a 64-bit guest"),
        "{}",
        text(&output.stdout)
    );
    Ok(())
}

/// A VM defined in a JSON file runs as one given by flags; a misspelt
/// field, or a definition beside flags, is refused with the reason.
#[test]
fn a_definition_file_runs_a_vm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hello = integration::guest::vmrun_program(dir.path(), "hello")?;
    let definition = dir.path().join("vm.json");
    let write = |text: serde_json::Value| std::fs::write(&definition, text.to_string());
    write(serde_json::json!({
        "kernel": hello, "vcpus": 1, "memory_bytes": 16 << 20,
    }))?;
    let config = definition.to_str().context("path")?;
    let output = vmrun(&["--config", config])?;
    let console = text(&output.stdout);
    ensure!(
        output.status.success() && console.contains("hello from a 64-bit guest"),
        "{}: {console} {}",
        output.status,
        text(&output.stderr)
    );
    write(serde_json::json!({"kernel": hello, "memory_bytes": 16 << 20, "vcpu": 2}))?;
    let output = vmrun(&["--config", config])?;
    let stderr = text(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("unknown field `vcpu`"),
        "{stderr}"
    );
    let output = vmrun(&["--config", config, "--kernel", config])?;
    let stderr = text(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("cannot be used with"),
        "{stderr}"
    );
    Ok(())
}

/// Instructions this host's emulated KVM cannot run (popcnt, fwait; the
/// runner does them there) give the right results either way.
#[test]
fn instructions_an_emulated_kvm_lacks_give_the_right_results() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let program = integration::guest::vmrun_program(dir.path(), "unusual")?;
    let output = vmrun(&[
        "--kernel",
        program.to_str().context("path")?,
        "--memory",
        "16M",
    ])?;
    let console = text(&output.stdout);
    ensure!(
        output.status.success() && console.contains("popcnt: ok") && console.contains("fwait: ok"),
        "{}: {console} {}",
        output.status,
        text(&output.stderr)
    );
    Ok(())
}

#[test]
fn every_vcpu_reports_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let program = integration::guest::vmrun_program(dir.path(), "vcpus")?;
    let output = vmrun(&[
        "--kernel",
        program.to_str().context("path")?,
        "--memory",
        "16M",
        "--cpus",
        "4",
    ])?;
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    ensure!(output.status.success(), "{}: {stderr}", output.status);
    ensure!(stderr.contains("every vCPU halted"), "{stderr}");
    for cpu in 0..4 {
        ensure!(
            stdout
                .lines()
                .any(|line| line == format!("vcpu {cpu} reporting in")),
            "vCPU {cpu} did not report in:\n{stdout}"
        );
    }
    ensure!(stdout.lines().count() == 4, "{stdout}");
    Ok(())
}

/// The guest writes 8 sectors at sector 8 of a fabricd volume through a
/// virtio-blk queue (virtio-mmio, the queue served by fabricd over
/// vhost-user, kicks through KVM's ioeventfd), reads them back, flushes,
/// and is refused a read past the end. The data is then read from the
/// volume by another vhost-user client.
#[test]
fn a_guest_drives_a_virtio_blk_queue_served_by_fabricd() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let program = integration::guest::vmrun_program(dir.path(), "blk")?;
    let node = Fabricd::start(&dir.path().join("node"))?;
    let socket = node.create_attached_volume("disk1", "64M")?;
    let output = vmrun(&[
        "--kernel",
        program.to_str().context("path")?,
        "--memory",
        "16M",
        "--disk",
        socket.to_str().context("path")?,
    ])?;
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    ensure!(
        output.status.success(),
        "{}: {stderr}\n{stdout}",
        output.status
    );
    for line in [
        "blk: capacity 131072 sectors",
        "blk: wrote, read back and flushed 8 sectors: ok",
        "blk: a read past the end is refused",
    ] {
        ensure!(
            stdout.lines().any(|l| l == line),
            "no {line:?} on the console:\n{stdout}\nstderr:\n{stderr}\nfabricd:\n{}",
            node.log_text()
        );
    }

    // What the guest wrote is in the volume.
    let mut client = BlkClient::connect(&socket, &ClientConfig::default())?;
    let buffer = client.data_buffer(0, 4096)?;
    client.submit(&integration::vhost_blk::Request {
        kind: RequestType::In,
        sector: 8,
        data: &[buffer],
        token: 1,
    })?;
    let mut done = Vec::new();
    while done.is_empty() {
        client.wait_completions(&mut done, Duration::from_secs(30))?;
    }
    ensure!(done[0].is_ok(), "{:?}", done[0]);
    let mut data = vec![0u8; 4096];
    client.read_data(buffer, &mut data)?;
    let expected: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    ensure!(
        data == expected,
        "the volume does not hold what the guest wrote"
    );
    Ok(())
}

/// Two VMs, each with a virtio-net NIC on a port of one segment: the
/// first pings the second with raw frames until it answers; both ports
/// count the frames.
#[test]
fn two_guests_exchange_frames_through_switch_ports() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let program = integration::guest::vmrun_program(dir.path(), "net")?;
    let program = program.to_str().context("path")?;
    let nodes = start_cluster(dir.path(), 1, "")?;
    let node = &nodes[0].node;
    node.fabctl(&["switch", "segment", "create", "lan"])?;
    let mut nics = Vec::new();
    for (name, mac) in [("a", "52:54:00:00:00:0a"), ("b", "52:54:00:00:00:0b")] {
        let port =
            node.fabctl_json(&["switch", "port", "add", "lan", "--mac", mac, "--name", name])?;
        let socket = port["socket"].as_str().context("a socket")?;
        nics.push(format!("{socket},mac={mac}"));
    }
    let answering = Command::new(binary("vmrun")?)
        .args(["--kernel", program, "--memory", "16M", "--nic", &nics[1]])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pinging = vmrun(&["--kernel", program, "--memory", "16M", "--nic", &nics[0]])?;
    let answering = wait(answering)?;
    let (a, b) = (text(&pinging.stdout), text(&answering.stdout));
    ensure!(
        a.contains("net: pong from 52:54:00:00:00:0b"),
        "pinging guest:\n{a}{}\nanswering guest:\n{b}{}",
        text(&pinging.stderr),
        text(&answering.stderr)
    );
    ensure!(
        b.contains("net: answered a ping from 52:54:00:00:00:0a"),
        "answering guest:\n{b}"
    );
    for port in ["a", "b"] {
        let counters = &node.fabctl_json(&["switch", "port", "show", port])?["counters"];
        ensure!(
            counters["rx_packets"].as_u64() >= Some(1)
                && counters["tx_packets"].as_u64() >= Some(1),
            "port {port}: {counters}"
        );
    }
    Ok(())
}

#[test]
fn bad_definitions_are_refused_before_any_vm_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hello = integration::guest::vmrun_program(dir.path(), "hello")?;
    let hello = hello.to_str().context("path")?;
    let not_elf = dir.path().join("notes.txt");
    std::fs::write(&not_elf, "not a kernel")?;
    let cases: [(Vec<&str>, &str); 11] = [
        (
            vec!["--kernel", "/nonexistent/vmlinux"],
            "cannot read the kernel /nonexistent/vmlinux",
        ),
        (
            vec!["--kernel", not_elf.to_str().context("path")?],
            "is not a 64-bit ELF",
        ),
        (vec!["--kernel", hello, "--memory", "4M"], "too small"),
        (
            vec!["--kernel", hello, "--memory", "9M"],
            "not a multiple of 2 MiB",
        ),
        (
            vec!["--kernel", hello, "--memory", "8G"],
            "more than the 3 GiB",
        ),
        (
            vec!["--kernel", hello, "--memory", "12Q"],
            "the unit must be K, M or G",
        ),
        (vec!["--kernel", hello, "--cpus", "0"], "1 to 32 vCPUs"),
        (
            vec!["--kernel", hello, "--disk", "/nonexistent/disk.sock"],
            "disk 0: no vhost-user socket at /nonexistent/disk.sock",
        ),
        (
            vec![
                "--kernel",
                hello,
                "--nic",
                "/nonexistent/port.sock,mac=52:54:00:00:00:01",
            ],
            "NIC 0: no vhost-user socket at /nonexistent/port.sock",
        ),
        (
            vec!["--kernel", hello, "--nic", "/tmp/port.sock"],
            "a NIC is SOCKET,mac=",
        ),
        (
            vec!["--kernel", hello, "--nic", "/tmp/port.sock,mac=52:54:00"],
            "is not a MAC address",
        ),
    ];
    for (args, expected) in cases {
        let output = vmrun(&args)?;
        let stderr = text(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains(expected),
            "{args:?}: {} {stderr}",
            output.status
        );
        ensure!(output.stdout.is_empty(), "{args:?} ran a guest");
    }
    Ok(())
}

/// Debian's kernel (the test harness's, uncompressed `vmlinux`) and the
/// busybox initramfs, booted by vmrun with two vCPUs and a fabricd volume
/// as its disk (virtio-mmio, found in the ACPI tables), until the
/// initramfs's /init says it booted with that disk.
/// Opt-in: KVM on the development machines emulates guests at about a
/// million instructions per second, so this takes many minutes there (and
/// well under a second with hardware virtualization):
///
/// ```text
/// cargo build --workspace --bins
/// cargo test -p integration --test vmrun -- --ignored linux_boots
/// ```
#[test]
#[ignore = "boots Linux: minutes where KVM is emulated; run with --ignored"]
fn linux_boots_to_the_initramfs_init() -> Result<()> {
    let image = integration::guest::GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("console.log");
    // Its disk is a fabricd volume, found through ACPI (virtio-mmio).
    let node = Fabricd::start(dir.path())?;
    let socket = node.create_attached_volume("linux-disk", "64M")?;
    let child = Command::new(binary("vmrun")?)
        .arg("--kernel")
        .arg(&image.vmlinux)
        .arg("--initramfs")
        .arg(&image.initramfs)
        .args(["--memory", "256M", "--cpus", "2"])
        .arg("--cmdline")
        .arg("console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 pci=off fabric.disks=1")
        .arg("--disk")
        .arg(&socket)
        .arg("--serial-log")
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Until init says it booted with its disk (then the guest would wait
    // on its shell), the runner ends, or 30 minutes pass.
    let mut child = child;
    let started = Instant::now();
    let booted = |console: &str| {
        console.contains("FABRIC-GUEST: boot ok") && console.contains("disks=/dev/vda")
    };
    let mut console = String::new();
    while started.elapsed() < Duration::from_secs(1800) {
        console = std::fs::read_to_string(&log).unwrap_or_default();
        if booted(&console) || child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let _ = child.kill();
    let output = child.wait_with_output()?;
    eprintln!(
        "after {:?}: {}\n{}",
        started.elapsed(),
        text(&output.stderr),
        console
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        booted(&console),
        "the kernel did not reach init with its disk; console tail above"
    );
    Ok(())
}
