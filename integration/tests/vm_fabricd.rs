//! VMs run by `fabricd` through `fabctl vm`: a VM with a volume as its disk
//! runs a guest program to its power-off and its console shows the disk
//! work; a runner killed with SIGKILL is started again; bad definitions
//! and wrong orders are refused with clear errors; a VM pauses and
//! resumes; a VM keeps running across a fabricd crash (the new fabricd
//! takes its runner over and the disk's backend comes back under it); a
//! hung runner is killed by the next fabricd; a guest that reboots starts
//! again; VMs are defined on and driven from any node of a cluster.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use integration::fabricd::{start_cluster, Fabricd};

/// Waits up to 30 s for `check` on `vm show NAME`.
fn wait_vm(
    node: &Fabricd,
    name: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let mut shown = serde_json::Value::Null;
    for _ in 0..300 {
        shown = node.fabctl_json(&["vm", "show", name])?;
        if check(&shown) {
            return Ok(shown);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("VM {name} never {what}: {shown}")
}

#[test]
fn fabricd_runs_vms_with_volumes_and_restarts_a_killed_runner() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let blk = integration::guest::vmrun_program(dir.path(), "blk")?;
    let spin = integration::guest::vmrun_program(dir.path(), "spin")?;
    let (blk, spin) = (
        blk.to_str().context("path")?,
        spin.to_str().context("path")?,
    );
    let nodes = start_cluster(dir.path(), 1, "")?;
    let node = &nodes[0].node;
    node.create_attached_volume("disk1", "64M")?;
    node.fabctl(&["volume", "create", "disk2", "--size", "64M"])?;

    // A VM whose disk is a fabricd volume runs to its power-off.
    node.fabctl(&[
        "vm", "create", "vm1", "--kernel", blk, "--memory", "16M", "--volume", "disk1",
    ])?;
    node.fabctl(&["vm", "start", "vm1"])?;
    wait_vm(node, "vm1", "stopped", |v| {
        v["runner"]["state"].as_str() == Some("stopped")
    })?;
    let console = node.fabctl(&["vm", "console", "vm1"])?;
    ensure!(
        console.contains("blk: wrote, read back and flushed 8 sectors: ok"),
        "console:\n{console}\nfabricd:\n{}",
        node.log_text()
    );
    let listed = node.fabctl(&["vm", "list"])?;
    ensure!(
        listed.contains("vm1") && listed.contains("stopped"),
        "{listed}"
    );

    // A bzImage (its header's magic is all the runner looks at) boots as
    // Linux, so it has at most 17 devices, with or without a command line.
    let bzimage = dir.path().join("bzImage");
    let mut header = vec![0u8; 0x400];
    header[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&bzimage, header)?;
    let bzimage = bzimage.to_str().context("path")?;
    let mut too_many = vec!["vm", "create", "x", "--kernel", bzimage];
    let volumes: Vec<String> = (0..18).map(|i| format!("v{i}")).collect();
    for volume in &volumes {
        too_many.extend(["--volume", volume.as_str()]);
    }

    // Bad definitions.
    let cases: [(Vec<&str>, &str); 9] = [
        (
            too_many,
            "at most 17 volumes and ports together when it boots Linux",
        ),
        (
            vec!["vm", "create", "x", "--kernel", "/nonexistent/k"],
            "no kernel file at /nonexistent/k",
        ),
        (
            vec!["vm", "create", "x", "--kernel", "k.elf"],
            "must be absolute",
        ),
        (
            vec!["vm", "create", "x", "--kernel", blk, "--memory", "9M"],
            "not a multiple of 2 MiB",
        ),
        (
            vec!["vm", "create", "x", "--kernel", blk, "--vcpus", "0"],
            "1 to 32 vCPUs",
        ),
        (
            vec!["vm", "create", "x", "--kernel", blk, "--volume", "nope"],
            "volume \"nope\" does not exist",
        ),
        (
            vec!["vm", "create", "x", "--kernel", blk, "--volume", "disk1"],
            "already a disk of VM \"vm1\"",
        ),
        (vec!["vm", "create", "vm1", "--kernel", blk], "exists"),
        (
            vec![
                "vm",
                "create",
                "x",
                "--kernel",
                blk,
                "--initramfs",
                "initrd",
            ],
            "initramfs must be an absolute path",
        ),
    ];
    for (args, expected) in cases {
        let error = node.fabctl_fails(&args)?;
        ensure!(error.contains(expected), "{args:?}: {error}");
    }
    // A disk that is not attached here is named before anything runs.
    node.fabctl(&[
        "vm", "create", "vm3", "--kernel", blk, "--memory", "16M", "--volume", "disk2",
    ])?;
    let unattached = node.fabctl_fails(&["vm", "start", "vm3"])?;
    ensure!(
        unattached.contains("not attached on this node"),
        "{unattached}"
    );
    let unknown = node.fabctl_fails(&["vm", "start", "nope"])?;
    ensure!(unknown.contains("no VM \"nope\""), "{unknown}");

    // A runner killed with SIGKILL is started again.
    node.fabctl(&["vm", "create", "vm2", "--kernel", spin, "--memory", "16M"])?;
    node.fabctl(&["vm", "start", "vm2"])?;
    let running = wait_vm(node, "vm2", "ran", |v| {
        v["runner"]["pid"].as_u64().is_some()
    })?;
    let pid = running["runner"]["pid"].as_u64().context("a pid")?;
    let twice = node.fabctl_fails(&["vm", "start", "vm2"])?;
    ensure!(twice.contains("already running"), "{twice}");
    let busy = node.fabctl_fails(&["vm", "delete", "vm2"])?;
    ensure!(busy.contains("is running"), "{busy}");
    // SAFETY: kill(2) on the runner's pid, read above, with SIGKILL.
    let killed = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    ensure!(killed == 0, "cannot kill runner {pid}");
    let restarted = wait_vm(node, "vm2", "restarted", |v| {
        v["runner"]["restarts"].as_u64() == Some(1) && v["runner"]["pid"].as_u64().is_some()
    })?;
    ensure!(
        restarted["runner"]["pid"].as_u64() != Some(pid),
        "{restarted}"
    );
    ensure!(
        restarted["runner"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("signal")),
        "{restarted}"
    );
    wait_vm(node, "vm2", "came up again", |_| {
        node.fabctl(&["vm", "console", "vm2"])
            .is_ok_and(|c| c.contains("spin: up"))
    })?;
    node.fabctl(&["vm", "stop", "vm2"])?;
    wait_vm(node, "vm2", "stopped", |v| {
        v["runner"]["state"].as_str() == Some("stopped")
    })?;

    // A runner that hangs (stopped with SIGSTOP, so it cannot answer on
    // its control socket) while fabricd is killed: the next fabricd kills
    // it instead of taking it over, and the VM can be started again.
    node.fabctl(&["vm", "start", "vm2"])?;
    let running = wait_vm(node, "vm2", "ran", |v| {
        v["runner"]["pid"].as_u64().is_some()
    })?;
    let orphan = running["runner"]["pid"].as_u64().context("a pid")?;
    let mut nodes = nodes;
    let node = &mut nodes[0].node;
    // SAFETY: kill(2) on the runner's pid, read above.
    ensure!(unsafe { libc::kill(orphan as i32, libc::SIGSTOP) } == 0);
    node.kill9()?;
    ensure!(
        Path::new(&format!("/proc/{orphan}")).exists(),
        "the runner outlives a killed fabricd"
    );
    node.restart()?;
    let mut gone = false;
    for _ in 0..200 {
        // A zombie (reaped by init later) counts as gone.
        let state = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default();
        if state.is_empty() || state.contains(") Z") {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(gone, "hung runner {orphan} survived the new fabricd");
    let node = &nodes[0].node;
    wait_vm(node, "vm2", "answered", |v| v["name"] == "vm2")?;
    node.fabctl(&["vm", "start", "vm2"])?;
    wait_vm(node, "vm2", "ran again", |v| {
        v["runner"]["pid"].as_u64().is_some()
    })?;
    node.fabctl(&["vm", "stop", "vm2"])?;
    for vm in ["vm1", "vm2", "vm3"] {
        node.fabctl(&["vm", "delete", vm])?;
    }
    let listed = node.fabctl_json(&["vm", "list"])?;
    ensure!(listed.as_array().is_some_and(Vec::is_empty), "{listed}");
    Ok(())
}

/// The highest "blkloop: round N ok" in a console.
fn last_round(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("blkloop: round ")?.strip_suffix(" ok"))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_vm_pauses_resumes_and_keeps_its_disk_across_a_fabricd_crash() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let blkloop = integration::guest::vmrun_program(dir.path(), "blkloop")?;
    let blkloop = blkloop.to_str().context("path")?;
    let mut nodes = start_cluster(dir.path(), 1, "")?;
    let node = &nodes[0].node;
    node.create_attached_volume("disk1", "64M")?;
    node.fabctl(&[
        "vm", "create", "vm1", "--kernel", blkloop, "--memory", "16M", "--volume", "disk1",
    ])?;
    node.fabctl(&["vm", "start", "vm1"])?;
    let console = |node: &Fabricd| node.fabctl(&["vm", "console", "vm1"]).unwrap_or_default();
    wait_vm(node, "vm1", "wrote its disk", |_| {
        last_round(&console(node)) >= 3
    })?;

    // Paused: no round completes; resumed: they go on.
    node.fabctl(&["vm", "pause", "vm1"])?;
    let paused = wait_vm(node, "vm1", "paused", |v| v["runner"]["state"] == "paused")?;
    let disk = &paused["runner"]["devices"][0];
    ensure!(
        disk["kind"] == "disk" && disk["driver_ok"] == true && disk["backend_connected"] == true,
        "{paused}"
    );
    let before = last_round(&console(node));
    std::thread::sleep(Duration::from_millis(1500));
    let still = last_round(&console(node));
    ensure!(
        still == before,
        "rounds went on while paused: {before} -> {still}"
    );
    let again = node.fabctl_fails(&["vm", "resume", "nope"])?;
    ensure!(again.contains("no VM \"nope\""), "{again}");
    node.fabctl(&["vm", "resume", "vm1"])?;
    wait_vm(node, "vm1", "resumed", |v| {
        v["runner"]["state"] == "running" && last_round(&console(node)) > still
    })?;
    let not_paused = node.fabctl_fails(&["vm", "resume", "vm1"])?;
    ensure!(not_paused.contains("not paused"), "{not_paused}");

    // fabricd dies mid-write; the runner and its guest live on, waiting
    // for the disk. The next fabricd takes the runner over and serves the
    // volume again; the runner reconnects and the rounds go on.
    let pid = node.fabctl_json(&["vm", "show", "vm1"])?["runner"]["pid"]
        .as_u64()
        .context("a pid")?;
    let node = &mut nodes[0].node;
    node.kill9()?;
    let at_crash = last_round(&std::fs::read_to_string(
        node.data_dir.join("vms/vm1.console"),
    )?);
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the runner outlives a killed fabricd"
    );
    node.restart()?;
    let node = &nodes[0].node;
    let back = wait_vm(node, "vm1", "came back", |v| {
        v["runner"]["devices"][0]["reconnects"].as_u64() >= Some(1)
            && v["runner"]["devices"][0]["backend_connected"] == true
            && last_round(&console(node)) > at_crash + 2
    })?;
    ensure!(
        back["runner"]["pid"].as_u64() == Some(pid),
        "not taken over: {back}"
    );
    ensure!(back["runner"]["state"] == "running", "{back}");
    let text = console(node);
    ensure!(
        !text.contains("MISMATCH") && !text.contains("failed"),
        "{text}"
    );
    let log = std::fs::read_to_string(node.data_dir.join("vms/vm1.vmrun.log"))?;
    ensure!(
        log.contains("went away") && log.contains("is back"),
        "{log}"
    );

    // Stopped through its control socket: a clean end.
    node.fabctl(&["vm", "stop", "vm1"])?;
    let stopped = wait_vm(node, "vm1", "stopped", |v| {
        v["runner"]["state"] == "stopped"
    })?;
    ensure!(stopped["runner"]["last_error"].is_null(), "{stopped}");
    ensure!(
        !Path::new(&format!("/proc/{pid}/exe")).exists(),
        "runner {pid} still runs"
    );
    let not_running = node.fabctl_fails(&["vm", "pause", "vm1"])?;
    ensure!(not_running.contains("not running"), "{not_running}");
    Ok(())
}

#[test]
fn a_rebooting_guest_starts_again_and_vms_are_managed_from_any_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let reboot = integration::guest::vmrun_program(dir.path(), "reboot")?;
    let spin = integration::guest::vmrun_program(dir.path(), "spin")?;
    let (reboot, spin) = (
        reboot.to_str().context("path")?,
        spin.to_str().context("path")?,
    );
    let nodes = start_cluster(dir.path(), 2, "")?;
    let (n1, n2) = (&nodes[0].node, &nodes[1].node);

    // A guest reboot starts the VM again: not a failure, not a stop.
    n1.fabctl(&["vm", "create", "rb", "--kernel", reboot, "--memory", "16M"])?;
    n1.fabctl(&["vm", "start", "rb"])?;
    let rebooted = wait_vm(n1, "rb", "rebooted twice", |v| {
        v["runner"]["reboots"].as_u64() >= Some(2)
    })?;
    ensure!(
        rebooted["runner"]["restarts"] == 0 && rebooted["runner"]["last_error"].is_null(),
        "{rebooted}"
    );
    let console = n1.fabctl(&["vm", "console", "rb"])?;
    ensure!(console.matches("reboot: up").count() >= 2, "{console}");
    // One that resets for ever (a kernel that panics at boot) is failed
    // after the sixth reset within a minute.
    let looping = wait_vm(n1, "rb", "failed as a reboot loop", |v| {
        v["runner"]["state"] == "failed"
    })?;
    ensure!(
        looping["runner"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("reboot loop"))
            && looping["runner"]["reboots"] == 5,
        "{looping}"
    );

    // Defined on n2 through n1, and driven from n1: each request goes to
    // the VM's node.
    n1.fabctl(&[
        "vm", "create", "far", "--node", "n2", "--kernel", spin, "--memory", "16M",
    ])?;
    n1.fabctl(&["vm", "start", "far"])?;
    let running = wait_vm(n1, "far", "ran on n2", |v| {
        v["runner"]["pid"].as_u64().is_some()
    })?;
    let on_n2 = n2.fabctl_json(&["vm", "show", "far"])?;
    ensure!(
        on_n2["runner"]["pid"] == running["runner"]["pid"] && on_n2["node"] == running["node"],
        "{running}\n{on_n2}"
    );
    wait_vm(n1, "far", "said it is up", |_| {
        n1.fabctl(&["vm", "console", "far"])
            .is_ok_and(|c| c.contains("spin: up"))
    })?;
    n1.fabctl(&["vm", "pause", "far"])?;
    wait_vm(n2, "far", "paused", |v| v["runner"]["state"] == "paused")?;
    let busy = n1.fabctl_fails(&["vm", "delete", "far"])?;
    ensure!(busy.contains("is running"), "{busy}");
    n1.fabctl(&["vm", "stop", "far"])?;
    wait_vm(n1, "far", "stopped", |v| v["runner"]["state"] == "stopped")?;
    n1.fabctl(&["vm", "delete", "far"])?;
    let gone = n2.fabctl_fails(&["vm", "show", "far"])?;
    ensure!(gone.contains("no VM \"far\""), "{gone}");
    let nowhere = n1.fabctl_fails(&["vm", "create", "x", "--node", "n9", "--kernel", spin])?;
    ensure!(nowhere.contains("n9"), "{nowhere}");
    Ok(())
}
