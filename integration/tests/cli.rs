//! `fabctl` and `fabricd` as an operator uses them: commands, output
//! formats, and clear errors for bad input.

use std::process::Command;

use anyhow::Result;
use integration::fabricd::{binary, Fabricd};

fn fails_with(node: &Fabricd, args: &[&str], needle: &str) -> Result<()> {
    let output = node.fabctl_output(args)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "fabctl {args:?} should fail");
    assert!(
        stderr.contains(needle),
        "fabctl {args:?}: expected {needle:?} in {stderr:?}"
    );
    Ok(())
}

#[test]
fn volume_life_cycle_and_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut node = Fabricd::start(dir.path())?;

    let empty = node.fabctl(&["volume", "list"])?;
    assert!(empty.contains("no volumes"), "{empty}");
    node.fabctl(&["volume", "create", "alpha", "--size", "10G"])?;
    node.fabctl(&["volume", "create", "beta", "--size", "1048576"])?;
    let table = node.fabctl(&["volume", "list"])?;
    assert!(
        table.lines().next().unwrap_or("").starts_with("NAME"),
        "{table}"
    );
    assert!(
        table.contains("alpha") && table.contains("10 GiB") && table.contains("detached"),
        "{table}"
    );
    let json = node.fabctl_json(&["volume", "list"])?;
    assert_eq!(json.as_array().map(Vec::len), Some(2));
    assert_eq!(json[0]["size_bytes"].as_u64(), Some(10 << 30));

    fails_with(
        &node,
        &["volume", "create", "alpha", "--size", "1G"],
        "already exists",
    )?;
    fails_with(
        &node,
        &["volume", "create", "odd", "--size", "1000"],
        "multiple of 4 KiB",
    )?;
    fails_with(
        &node,
        &["volume", "create", "zero", "--size", "0"],
        "at least one 4 KiB block",
    )?;
    fails_with(
        &node,
        &["volume", "create", "big", "--size", "10Q"],
        "unknown unit",
    )?;
    fails_with(
        &node,
        &["volume", "create", "bad/name", "--size", "1G"],
        "invalid volume name",
    )?;
    fails_with(&node, &["volume", "show", "nope"], "does not exist")?;
    fails_with(&node, &["volume", "delete", "nope"], "does not exist")?;
    fails_with(&node, &["volume", "detach", "alpha"], "not attached")?;

    let attached = node.fabctl(&["volume", "attach", "alpha"])?;
    assert!(
        attached.contains("vhost-user-blk-pci,chardev=fabric-alpha"),
        "{attached}"
    );
    assert!(
        attached.contains("memory-backend-memfd") && attached.contains("share=on"),
        "{attached}"
    );
    let socket = node.socket_dir.join("alpha.sock");
    assert!(socket.exists());
    fails_with(&node, &["volume", "delete", "alpha"], "detach it first")?;

    // Attachments survive a restart of the daemon.
    node.restart()?;
    assert!(socket.exists(), "socket not re-created after restart");
    let shown = node.fabctl_json(&["volume", "show", "alpha"])?;
    assert_eq!(shown["attachment"]["socket"].as_str(), socket.to_str());

    node.fabctl(&["volume", "detach", "alpha"])?;
    assert!(!socket.exists(), "detach must remove the socket");
    node.fabctl(&["volume", "delete", "alpha"])?;
    fails_with(&node, &["volume", "show", "alpha"], "does not exist")?;

    // A clean stop removes the API socket.
    node.terminate()?;
    assert!(!node.api_socket.exists());
    fails_with(&node, &["volume", "list"], "Is fabricd running?")?;
    Ok(())
}

#[test]
fn daemon_refuses_unusable_setups() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fabricd = binary("fabricd")?;

    // The data directory is a file.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x")?;
    let output = Command::new(&fabricd)
        .arg("--data-dir")
        .arg(&file)
        .arg("--api-socket")
        .arg(dir.path().join("a.sock"))
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("cannot create data directory"), "{stderr}");

    // A typo in the config file.
    let config = dir.path().join("fabricd.toml");
    std::fs::write(&config, "data_dri = \"/tmp/x\"\n")?;
    let output = Command::new(&fabricd)
        .arg("--config")
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("unknown field") && stderr.contains("data_dri"),
        "{stderr}"
    );

    // Two daemons on one data directory.
    let node = Fabricd::start(&dir.path().join("node"))?;
    let output = Command::new(&fabricd)
        .arg("--data-dir")
        .arg(&node.data_dir)
        .arg("--api-socket")
        .arg(dir.path().join("other.sock"))
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("in use by another fabricd"), "{stderr}");
    // The first daemon is unaffected.
    node.fabctl(&["volume", "list"])?;
    Ok(())
}
