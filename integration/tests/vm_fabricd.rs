//! VMs run by `fabricd` through `fabctl vm`: a VM with a volume as its disk
//! runs a guest program to its power-off and its console shows the disk
//! work; a runner killed with SIGKILL is started again; bad definitions
//! and wrong orders are refused with clear errors.

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

    // Bad definitions.
    let cases: [(Vec<&str>, &str); 7] = [
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

    // fabricd killed while a VM runs: the next fabricd kills the runner
    // it left, and the VM can be started again.
    node.fabctl(&["vm", "start", "vm2"])?;
    let running = wait_vm(node, "vm2", "ran", |v| {
        v["runner"]["pid"].as_u64().is_some()
    })?;
    let orphan = running["runner"]["pid"].as_u64().context("a pid")?;
    let mut nodes = nodes;
    let node = &mut nodes[0].node;
    node.kill9()?;
    ensure!(
        Path::new(&format!("/proc/{orphan}")).exists(),
        "the runner outlives a killed fabricd"
    );
    node.restart()?;
    let mut gone = false;
    for _ in 0..100 {
        // A zombie (reaped by init later) counts as gone.
        let state = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default();
        if state.is_empty() || state.contains(") Z") {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(gone, "runner {orphan} survived the new fabricd");
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
