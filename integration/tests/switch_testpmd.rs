//! Switch ports driven by DPDK `testpmd` (`net_virtio_user`, no VM) at
//! full rate: frames flow both ways between two ports, small and large,
//! with one queue pair or two (MQ); a new testpmd on the same sockets is
//! taken; frames over the largest size
//! are dropped and counted; port security drops what testpmd sends from an
//! address that is not the port's; a port's link set down and up again.
//! No timing is asserted.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use integration::fabricd::{start_cluster, ClusterMember};
use integration::testpmd::{PortStats, Testpmd, TestpmdConfig};

const MAC_A: &str = "52:54:00:00:00:0a";
const MAC_B: &str = "52:54:00:00:00:0b";

/// A one-node cluster with segment `lan` and ports `a` and `b`.
fn two_ports(dir: &std::path::Path, security: bool) -> Result<(Vec<ClusterMember>, TestpmdConfig)> {
    let nodes = start_cluster(dir, 1, "")?;
    let node = &nodes[0].node;
    node.fabctl(&["switch", "segment", "create", "lan"])?;
    let mut ports = Vec::new();
    for (name, mac) in [("a", MAC_A), ("b", MAC_B)] {
        let mut args = vec!["switch", "port", "add", "lan", "--mac", mac, "--name", name];
        if !security {
            args.push("--no-port-security");
        }
        let port = node.fabctl_json(&args)?;
        let socket = port["socket"].as_str().context("a socket")?.to_owned();
        ports.push((socket.into(), mac.to_owned()));
    }
    let config = TestpmdConfig {
        ports,
        mode: "flowgen".into(),
        frame_bytes: 64,
        queues: 1,
    };
    Ok((nodes, config))
}

fn run(config: &TestpmdConfig, seconds: u64) -> Result<Vec<PortStats>> {
    let testpmd = Testpmd::start(config)?;
    std::thread::sleep(Duration::from_secs(seconds));
    testpmd.stop()
}

fn counters(member: &ClusterMember, port: &str) -> Result<serde_json::Value> {
    Ok(member.node.fabctl_json(&["switch", "port", "show", port])?["counters"].clone())
}

#[test]
fn testpmd_floods_two_ports_both_ways_and_reconnects() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (nodes, mut config) = two_ports(dir.path(), false)?;
    let node = &nodes[0];

    // 64-byte frames both ways.
    let stats = run(&config, 3)?;
    ensure!(
        stats
            .iter()
            .all(|p| p.rx_packets > 10_000 && p.tx_packets > 10_000),
        "{stats:?}"
    );
    let a = counters(node, "a")?;
    let b = counters(node, "b")?;
    for (port, c) in [("a", &a), ("b", &b)] {
        ensure!(
            c["rx_packets"].as_u64() > Some(10_000) && c["tx_packets"].as_u64() > Some(10_000),
            "port {port}: {c}"
        );
        for reason in ["malformed", "runt", "oversize", "spoofed"] {
            ensure!(c["drops"][reason] == 0, "port {port} dropped {reason}: {c}");
        }
    }
    // What testpmd received on b is what the switch delivered there.
    ensure!(
        b["tx_packets"].as_u64() >= Some(stats[1].rx_packets),
        "{b} against {stats:?}"
    );

    // A new testpmd on the same sockets, 1500-byte frames.
    config.frame_bytes = 1500;
    let stats = run(&config, 2)?;
    ensure!(
        stats.iter().all(|p| p.rx_packets > 1_000),
        "after a reconnect, 1500-byte frames: {stats:?}"
    );

    // Frames over the switch's largest (1518 bytes) are dropped, counted.
    config.frame_bytes = 1600;
    let before = counters(node, "a")?["drops"]["oversize"]
        .as_u64()
        .unwrap_or(0);
    let stats = run(&config, 2)?;
    ensure!(stats.iter().all(|p| p.rx_packets == 0), "{stats:?}");
    let after = counters(node, "a")?["drops"]["oversize"]
        .as_u64()
        .unwrap_or(0);
    ensure!(after > before, "oversize drops {before} -> {after}");
    Ok(())
}

#[test]
fn port_security_passes_the_ports_address_and_drops_others() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (nodes, mut config) = two_ports(dir.path(), true)?;
    let node = &nodes[0];

    // txonly sends from each port's own address: switched, nothing spoofed.
    config.mode = "txonly".into();
    run(&config, 2)?;
    for port in ["a", "b"] {
        let c = counters(node, port)?;
        ensure!(
            c["rx_packets"].as_u64() > Some(1_000) && c["drops"]["spoofed"] == 0,
            "port {port}: {c}"
        );
    }

    // flowgen sends from an address of its own: every frame is spoofed.
    config.mode = "flowgen".into();
    let stats = run(&config, 2)?;
    ensure!(stats.iter().all(|p| p.rx_packets == 0), "{stats:?}");
    let c = counters(node, "a")?;
    ensure!(c["drops"]["spoofed"].as_u64() > Some(1_000), "{c}");
    Ok(())
}

/// Waits (30 s at most) until port `port`'s counters satisfy `ready`;
/// returns them.
fn wait_for(
    member: &ClusterMember,
    port: &str,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let c = counters(member, port)?;
        if ready(&c) {
            return Ok(c);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "port {port}: {what}: {c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A port's link set down and up again while testpmd stays attached
/// (txonly: each port sends from its own address to the other's). While
/// b's link is down nothing is taken from it or delivered to it: its own
/// frames and those addressed to it are counted as `link_down`. Once it
/// is up, frames flow both ways through it on the same connection, and
/// its counters go on from where they were (the port was not made anew).
#[test]
fn a_ports_link_set_down_stops_its_frames_and_up_brings_them_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (nodes, mut config) = two_ports(dir.path(), false)?;
    let member = &nodes[0];
    let node = &member.node;
    let set = node.fabctl_json(&["switch", "port", "link", "b", "down"])?;
    ensure!(set["link"] == "down", "{set}");

    config.mode = "txonly".into();
    let testpmd = Testpmd::start(&config)?;
    let a = wait_for(member, "a", "a's frames switched", |a| {
        a["rx_packets"].as_u64() > Some(1_000)
    })?;
    // Read after a's: every frame a got in was addressed to b, and counted
    // on b before a's count was read.
    let down = node.fabctl_json(&["switch", "port", "show", "b"])?;
    let b = &down["counters"];
    ensure!(
        down["link"] == "down" && down["connected"] == true,
        "b, its link down: {down}"
    );
    ensure!(
        b["drops"]["link_down"].as_u64() >= a["rx_packets"].as_u64(),
        "frames to b not counted as link_down on it: a {a}, b {b}"
    );
    ensure!(
        b["rx_packets"] == 0 && b["tx_packets"] == 0,
        "b passed frames with its link down: {b}"
    );
    ensure!(a["tx_packets"] == 0, "a got frames from b: {a}");

    node.fabctl(&["switch", "port", "link", "b", "up"])?;
    // testpmd does not empty its receive rings in txonly: a few hundred
    // frames fill them, then further ones find no room.
    let up = wait_for(member, "b", "b's frames flowing again", |b| {
        b["rx_packets"].as_u64() > Some(1_000) && b["tx_packets"].as_u64() > Some(500)
    })?;
    ensure!(
        up["drops"]["link_down"].as_u64() >= b["drops"]["link_down"].as_u64(),
        "b's counters started again: {up}"
    );
    wait_for(member, "a", "frames from b delivered to a", |a| {
        a["tx_packets"].as_u64() > Some(500)
    })?;
    testpmd.stop()?;

    // Bad input: a state that is not one, a port that does not exist.
    let bad = node.fabctl_fails(&["switch", "port", "link", "b", "sideways"])?;
    ensure!(bad.contains("sideways"), "{bad}");
    let missing = node.fabctl_fails(&["switch", "port", "link", "nope", "down"])?;
    ensure!(missing.contains("no port"), "{missing}");
    Ok(())
}

/// Two queue pairs per port (MQ): testpmd sends on both transmit queues
/// of each port, and the switch spreads its flows over both receive
/// queues of the other.
#[test]
fn two_queue_pairs_carry_traffic_on_every_queue() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (nodes, mut config) = two_ports(dir.path(), false)?;
    config.queues = 2;
    let testpmd = Testpmd::start(&config)?;
    std::thread::sleep(Duration::from_secs(3));
    let (stats, queues) = testpmd.stop_with_queues()?;
    ensure!(
        stats
            .iter()
            .all(|p| p.rx_packets > 10_000 && p.tx_packets > 10_000),
        "{stats:?}"
    );
    for port in 0..2 {
        for queue in 0..2 {
            ensure!(
                queues
                    .iter()
                    .any(|q| q.port == port && q.queue == queue && q.rx_packets > 100),
                "port {port} queue {queue} received nothing: {queues:?}"
            );
        }
    }
    let a = counters(&nodes[0], "a")?;
    ensure!(a["drops"]["malformed"] == 0, "{a}");
    Ok(())
}
