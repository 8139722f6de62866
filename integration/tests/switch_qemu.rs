//! Switch ports served by a real `fabricd` to real QEMU guests (TCG): two
//! guests on one segment ping each other; a guest that changes its MAC
//! address loses its connectivity and its port counts the spoofed frames;
//! a 4 MiB file moves with `nc`, its checksum compared on both sides; the
//! same across two `fabricd` nodes, through their tunnel; guests on
//! different VLANs cannot reach each other, and a trunk port carries both;
//! a host port (a TAP interface, moved into a namespace the test makes)
//! reaches a guest; a guest announces itself when QEMU asks.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use integration::fabricd::start_cluster;
use integration::guest::{Guest, GuestConfig, GuestImage, GuestRun};
use integration::netns::Namespace;

/// Answers pings for as long as the client needs (it sends at least 8
/// frames), then a few seconds more while the client tries a new MAC.
const PING_SERVER: &str = r#"
ip link set lo up
ip link set eth0 up
ip addr add 10.9.0.1/24 dev eth0
echo "CHECK mac $(cat /sys/class/net/eth0/address)"
for i in $(seq 180); do
    [ $(cat /sys/class/net/eth0/statistics/rx_packets) -ge 8 ] && break
    sleep 0.5
done
sleep 10
"#;

const PING_CLIENT: &str = r#"
ip link set lo up
ip link set eth0 up
ip addr add 10.9.0.2/24 dev eth0
ok=0
for i in $(seq 30); do
    if ping -c 1 -W 1 10.9.0.1 > /dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] && echo "CHECK first-ping ok" || { echo "CHECK first-ping FAILED"; cat /proc/net/dev; }
ping -c 3 -W 2 -s 1400 10.9.0.1 | grep -E "packets transmitted"
# A new MAC address: the switch drops what the guest sends.
ip link set eth0 down
ip link set eth0 address 52:54:00:99:99:99
ip link set eth0 up
ping -c 3 -W 1 10.9.0.1 > /dev/null 2>&1 && echo "CHECK spoofed-ping answered" || echo "CHECK spoofed-ping lost"
"#;

const SERVER: &str = r#"
ip link set lo up
ip link set eth0 up
ip addr add 10.9.0.1/24 dev eth0
echo "CHECK mac $(cat /sys/class/net/eth0/address)"
# nc sends what it reads from stdin and quits once the peer's side ends:
# give it a stdin that never ends (a FIFO held open), or it would end the
# connection before the client has sent everything.
mkfifo /tmp/quiet
sleep 600 > /tmp/quiet &
nc -l -p 5000 < /tmp/quiet > /tmp/got
echo "CHECK got-md5 $(md5sum < /tmp/got | cut -d' ' -f1) bytes $(wc -c < /tmp/got)"
"#;

const CLIENT: &str = r#"
ip link set lo up
ip link set eth0 up
ip addr add 10.9.0.2/24 dev eth0
ok=0
for i in $(seq 30); do
    if ping -c 1 -W 1 10.9.0.1 > /dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] && echo "CHECK first-ping ok" || { echo "CHECK first-ping FAILED"; cat /proc/net/dev; }
ping -c 3 -W 2 10.9.0.1 | grep -E "packets transmitted"
dd if=/dev/urandom of=/tmp/sent bs=1M count=4 2>/dev/null
echo "CHECK sent-md5 $(md5sum < /tmp/sent | cut -d' ' -f1)"
sleep 1
nc -w 20 10.9.0.1 5000 < /tmp/sent && echo "CHECK nc ok" || echo "CHECK nc failed $?"

"#;

fn check_line<'a>(run: &'a GuestRun, prefix: &str) -> Result<&'a str> {
    run.lines()
        .find_map(|line| line.trim().strip_prefix(prefix))
        .map(str::trim)
        .with_context(|| {
            format!(
                "guest printed no {prefix:?} line; console tail:\n{}",
                run.tail(40)
            )
        })
}

/// Each port's vhost-user socket and MAC address.
type Ports = Vec<(std::path::PathBuf, String)>;

/// Adds port `name` with `mac` to segment `lan` through `node`, with
/// `extra` arguments; returns its socket and MAC.
fn add_port(
    node: &integration::fabricd::Fabricd,
    name: &str,
    mac: &str,
    extra: &[&str],
) -> Result<(std::path::PathBuf, String)> {
    let mut args = vec!["switch", "port", "add", "lan", "--mac", mac, "--name", name];
    args.extend_from_slice(extra);
    let port = node.fabctl_json(&args)?;
    let socket = port["socket"].as_str().context("a socket")?;
    Ok((socket.into(), mac.to_owned()))
}

/// A one-node cluster with segment `lan` and port `a`.
fn one_port(dir: &std::path::Path) -> Result<(Vec<integration::fabricd::ClusterMember>, Ports)> {
    let nodes = start_cluster(dir, 1, "")?;
    let node = &nodes[0].node;
    node.fabctl(&["switch", "segment", "create", "lan"])?;
    let sockets = vec![add_port(node, "a", "52:54:00:00:00:0a", &[])?];
    Ok((nodes, sockets))
}

/// A one-node cluster with segment `lan` and ports `a` and `b`.
fn two_ports(dir: &std::path::Path) -> Result<(Vec<integration::fabricd::ClusterMember>, Ports)> {
    let (nodes, mut sockets) = one_port(dir)?;
    sockets.push(add_port(&nodes[0].node, "b", "52:54:00:00:00:0b", &[])?);
    Ok((nodes, sockets))
}

/// The client's `nc` ended well and the server got exactly what it sent.
fn check_transfer(client: &GuestRun, server: &GuestRun) -> Result<()> {
    ensure!(
        check_line(client, "CHECK nc")? == "ok",
        "{}",
        client.tail(40)
    );
    let sent = check_line(client, "CHECK sent-md5")?;
    let got = check_line(server, "CHECK got-md5")?;
    ensure!(
        got == format!("{sent} bytes 4194304"),
        "sent {sent}, got {got}; server:\n{}\nclient:\n{}",
        server.tail(14),
        client.tail(14),
    );
    Ok(())
}

fn guest(sockets: &Ports, port: usize, script: &str) -> GuestConfig {
    GuestConfig {
        vhost_user_net: vec![sockets[port].clone()],
        script: script.into(),
        timeout: Duration::from_secs(150),
        ..GuestConfig::default()
    }
}

/// Two guests on one node's segment ping each other (small and 1400-byte
/// payloads); the client then takes another MAC address and loses its
/// connectivity, and its port counts the spoofed frames. Two new guests on
/// the same sockets ping again. Bad ports are refused; a segment with ports
/// cannot be deleted.
#[test]
fn two_guests_on_one_node_ping_and_a_spoofer_is_cut_off() -> Result<()> {
    let image = GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let (nodes, sockets) = two_ports(dir.path())?;
    let node = &nodes[0].node;

    let multicast =
        node.fabctl_fails(&["switch", "port", "add", "lan", "--mac", "01:00:5e:00:00:01"])?;
    ensure!(multicast.contains("multicast"), "{multicast}");
    let no_segment =
        node.fabctl_fails(&["switch", "port", "add", "wan", "--mac", "52:54:00:00:00:0c"])?;
    ensure!(no_segment.contains("does not exist"), "{no_segment}");
    let bad_mac = node.fabctl_fails(&["switch", "port", "add", "lan", "--mac", "52:54:00"])?;
    ensure!(bad_mac.contains("not a MAC address"), "{bad_mac}");
    let zero_rate = node.fabctl_fails(&[
        "switch",
        "port",
        "add",
        "lan",
        "--mac",
        "52:54:00:00:00:0c",
        "--rate-pps",
        "0",
    ])?;
    ensure!(zero_rate.contains("must be above 0"), "{zero_rate}");
    let bad_name = node.fabctl_fails(&[
        "switch",
        "port",
        "add",
        "lan",
        "--mac",
        "52:54:00:00:00:0c",
        "--name",
        "bad/name",
    ])?;
    ensure!(bad_name.contains("invalid port name"), "{bad_name}");
    let taken =
        node.fabctl_fails(&["switch", "port", "add", "lan", "--mac", "52:54:00:00:00:0a"])?;
    ensure!(taken.contains("already uses"), "{taken}");

    let server = Guest::spawn(&image, &guest(&sockets, 0, PING_SERVER))?;
    let client = Guest::spawn(&image, &guest(&sockets, 1, PING_CLIENT))?;
    let client = client.wait()?;
    let server = server
        .wait()
        .with_context(|| format!("the client guest printed:\n{}", client.tail(40)))?;
    ensure!(
        check_line(&client, "CHECK first-ping")? == "ok",
        "{}",
        client.tail(40)
    );
    ensure!(
        client.has_line("3 packets transmitted, 3 packets received"),
        "{}",
        client.tail(40)
    );
    ensure!(
        check_line(&server, "CHECK mac")? == "52:54:00:00:00:0a",
        "{}",
        server.tail(40)
    );
    ensure!(
        check_line(&client, "CHECK spoofed-ping")? == "lost",
        "{}",
        client.tail(40)
    );
    let b = node.fabctl_json(&["switch", "port", "show", "b"])?;
    let counters = &b["counters"];
    ensure!(
        counters["drops"]["spoofed"].as_u64() > Some(0)
            && counters["rx_packets"].as_u64() >= Some(4)
            && counters["tx_packets"].as_u64() >= Some(4),
        "{b}"
    );
    let listed = node.fabctl(&["switch", "port", "list"])?;
    ensure!(listed.contains("52:54:00:00:00:0b"), "{listed}");

    // New guests (new frontends) on the same sockets: the ports take them.
    let server = Guest::spawn(&image, &guest(&sockets, 0, PING_SERVER))?;
    let client = Guest::spawn(&image, &guest(&sockets, 1, PING_CLIENT))?;
    let client = client.wait()?;
    server.wait()?;
    ensure!(
        check_line(&client, "CHECK first-ping")? == "ok",
        "after a reconnect: {}",
        client.tail(40)
    );

    let busy = node.fabctl_fails(&["switch", "segment", "delete", "lan"])?;
    ensure!(busy.contains("delete its ports first"), "{busy}");
    node.fabctl(&["switch", "port", "delete", "a"])?;
    node.fabctl(&["switch", "port", "delete", "b"])?;
    ensure!(!sockets[0].0.exists(), "a deleted port's socket is gone");
    node.fabctl(&["switch", "segment", "delete", "lan"])?;
    Ok(())
}

/// 4 MiB over TCP (busybox `nc`) from one guest to the other, checksums
/// compared on both sides.
///
/// Both guests have two vCPUs and NICs with two queue pairs (MQ), which
/// Linux turns on (it says so in sysfs).
#[test]
fn two_guests_on_one_node_transfer_a_file() -> Result<()> {
    let image = GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let (nodes, sockets) = two_ports(dir.path())?;
    let multiqueue = |port: usize, script: &str| GuestConfig {
        vcpus: 2,
        net_queue_pairs: Some(2),
        ..guest(&sockets, port, &format!("{QUEUES}{script}"))
    };
    let server = Guest::spawn(&image, &multiqueue(0, SERVER))?;
    let client = Guest::spawn(&image, &multiqueue(1, CLIENT))?;
    let client = client.wait()?;
    let server = server.wait().with_context(|| {
        format!(
            "the client guest printed:\n{}\nfabricd's log:\n{}",
            client.tail(40),
            nodes[0].node.log_text()
        )
    })?;
    check_transfer(&client, &server)
        .with_context(|| format!("fabricd's log:\n{}", nodes[0].node.log_text()))?;
    for run in [&client, &server] {
        let queues = check_line(run, "CHECK queues")?;
        ensure!(
            queues == "rx-0 rx-1 tx-0 tx-1",
            "one queue pair only: {queues}"
        );
    }
    Ok(())
}

/// Prints the NIC's queues (Linux sets up one pair per vCPU, up to the
/// NIC's pairs).
const QUEUES: &str = r#"
echo "CHECK queues $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
"#;

/// Two guests on ports of two different nodes (port `b` added on node 2
/// through node 1): they ping each other and move 4 MiB with `nc` through
/// the nodes' tunnel; both tunnels show the traffic.
#[test]
fn two_guests_on_two_nodes_ping_and_transfer_a_file() -> Result<()> {
    let image = GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let nodes = start_cluster(dir.path(), 2, "")?;
    let first = &nodes[0].node;
    first.fabctl(&["switch", "segment", "create", "lan"])?;
    let sockets = vec![
        add_port(first, "a", "52:54:00:00:00:0a", &["--node", "n1"])?,
        add_port(first, "b", "52:54:00:00:00:0b", &["--node", "n2"])?,
    ];
    ensure!(
        sockets[1].0.starts_with(dir.path().join("n2")),
        "port b is served by node 2: {:?}",
        sockets[1].0
    );
    let unknown = first.fabctl_fails(&[
        "switch",
        "port",
        "add",
        "lan",
        "--mac",
        "52:54:00:00:00:0c",
        "--node",
        "n9",
    ])?;
    ensure!(unknown.contains("n9"), "{unknown}");

    let server = Guest::spawn(&image, &guest(&sockets, 0, SERVER))?;
    let client = Guest::spawn(&image, &guest(&sockets, 1, CLIENT))?;
    let client = client.wait()?;
    let logs = || {
        format!(
            "node 1's log:\n{}\nnode 2's log:\n{}",
            nodes[0].node.log_text(),
            nodes[1].node.log_text()
        )
    };
    let server = server
        .wait()
        .with_context(|| format!("the client guest printed:\n{}\n{}", client.tail(40), logs()))?;
    ensure!(
        check_line(&client, "CHECK first-ping")? == "ok",
        "{}\n{}",
        client.tail(40),
        logs()
    );
    ensure!(
        client.has_line("3 packets transmitted, 3 packets received"),
        "{}",
        client.tail(40)
    );
    check_transfer(&client, &server)?;
    for (member, peer) in [(&nodes[0], 2), (&nodes[1], 1)] {
        let tunnels = member.node.fabctl_json(&["switch", "tunnel", "list"])?;
        let tunnel = tunnels["tunnels"]
            .as_array()
            .and_then(|all| all.iter().find(|t| t["node"].as_u64() == Some(peer)))
            .with_context(|| format!("a tunnel to node {peer}: {tunnels}"))?;
        // The file went one way, the acknowledgements the other.
        let counter = |key: &str| tunnel["counters"][key].as_u64().unwrap_or(0);
        ensure!(
            tunnel["connected"].as_bool() == Some(true)
                && counter("rx_packets") > 0
                && counter("tx_packets") > 0
                && counter("rx_bytes") + counter("tx_bytes") > 4 << 20,
            "{tunnels}"
        );
    }
    let listed = first.fabctl(&["switch", "tunnel", "list"])?;
    ensure!(listed.contains("CONNECTED"), "{listed}");
    Ok(())
}

/// Access port on VLAN 10: answers until it has heard from the trunk
/// guest, and 25 s more while the VLAN 20 guest tries to reach it.
const VLAN_10: &str = r#"
ip link set lo up
ip link set eth0 up
ip addr add 10.9.0.1/24 dev eth0
for i in $(seq 240); do
    [ $(cat /sys/class/net/eth0/statistics/rx_packets) -ge 8 ] && break
    sleep 0.5
done
sleep 25
echo "CHECK rx $(cat /sys/class/net/eth0/statistics/rx_packets)"
"#;

/// Trunk port for VLANs 10 and 20: a tagged subinterface on each.
const TRUNK: &str = r#"
ip link set lo up
ip link set eth0 up
ip link add link eth0 name eth0.10 type vlan id 10
ip link add link eth0 name eth0.20 type vlan id 20
ip link set eth0.10 up
ip link set eth0.20 up
ip addr add 10.9.0.2/24 dev eth0.10
ip addr add 10.9.20.2/24 dev eth0.20
ok=0
for i in $(seq 30); do
    if ping -c 1 -W 1 10.9.0.1 > /dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] && echo "CHECK trunk-ping ok" || echo "CHECK trunk-ping FAILED"
ping -c 8 -W 1 10.9.0.1 > /dev/null 2>&1
for i in $(seq 120); do
    [ $(cat /sys/class/net/eth0.20/statistics/rx_packets) -ge 4 ] && break
    sleep 0.5
done
sleep 5
"#;

/// Access port on VLAN 20: reaches the trunk guest's VLAN 20 address, but
/// not the VLAN 10 guest, though it has an address in that subnet too.
const VLAN_20: &str = r#"
ip link set lo up
ip link set eth0 up
ip addr add 10.9.20.3/24 dev eth0
ip addr add 10.9.0.3/24 dev eth0
ok=0
for i in $(seq 30); do
    if ping -c 1 -W 1 10.9.20.2 > /dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] && echo "CHECK vlan20-ping ok" || echo "CHECK vlan20-ping FAILED"
ping -c 4 -W 1 10.9.20.2 > /dev/null 2>&1
ping -c 3 -W 1 10.9.0.1 > /dev/null 2>&1 && echo "CHECK cross-vlan-ping answered" || echo "CHECK cross-vlan-ping lost"
"#;

/// Three guests: access VLAN 10, access VLAN 20, and a trunk for both with
/// a tagged subinterface per VLAN. The trunk guest reaches each access
/// guest on its VLAN; the VLAN 20 guest cannot reach the VLAN 10 guest.
#[test]
fn vlans_isolate_access_ports_and_a_trunk_carries_both() -> Result<()> {
    let image = GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let nodes = start_cluster(dir.path(), 1, "")?;
    let node = &nodes[0].node;
    node.fabctl(&["switch", "segment", "create", "lan"])?;
    let sockets = vec![
        add_port(node, "v10", "52:54:00:00:00:10", &["--vlan", "10"])?,
        add_port(node, "trunk", "52:54:00:00:00:11", &["--trunk", "10,20"])?,
        add_port(node, "v20", "52:54:00:00:00:20", &["--vlan", "20"])?,
    ];
    let both = node.fabctl_fails(&[
        "switch",
        "port",
        "add",
        "lan",
        "--mac",
        "52:54:00:00:00:30",
        "--vlan",
        "10",
        "--trunk",
        "20",
    ])?;
    ensure!(both.contains("cannot be used with"), "{both}");

    let v10 = Guest::spawn(&image, &guest(&sockets, 0, VLAN_10))?;
    let trunk = Guest::spawn(&image, &guest(&sockets, 1, TRUNK))?;
    let v20 = Guest::spawn(&image, &guest(&sockets, 2, VLAN_20))?;
    let v20 = v20.wait()?;
    let trunk = trunk.wait()?;
    let v10 = v10.wait()?;
    ensure!(
        check_line(&trunk, "CHECK trunk-ping")? == "ok",
        "trunk:\n{}\nVLAN 10:\n{}",
        trunk.tail(30),
        v10.tail(10)
    );
    ensure!(
        check_line(&v20, "CHECK vlan20-ping")? == "ok",
        "{}",
        v20.tail(30)
    );
    ensure!(
        check_line(&v20, "CHECK cross-vlan-ping")? == "lost",
        "{}",
        v20.tail(30)
    );
    // The VLAN 10 guest was up while the VLAN 20 guest tried it.
    ensure!(check_line(&v10, "CHECK rx").is_ok(), "{}", v10.tail(30));
    let shown = node.fabctl_json(&["switch", "port", "show", "trunk"])?;
    ensure!(
        shown["counters"]["rx_packets"].as_u64() > Some(8)
            && shown["vlan"]["mode"].as_str() == Some("trunk"),
        "{shown}"
    );
    Ok(())
}

/// The guest end of the host port test: it pings the host, then takes a
/// file with `nc` and prints its checksum.
const HOST_PEER: &str = r#"
ip link set lo up
ip link set eth0 up
ip addr add 10.9.0.1/24 dev eth0
ok=0
for i in $(seq 60); do
    if ping -c 1 -W 1 10.9.0.2 > /dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] && echo "CHECK first-ping ok" || { echo "CHECK first-ping FAILED"; cat /proc/net/dev; }
mkfifo /tmp/quiet
sleep 600 > /tmp/quiet &
nc -l -p 5000 < /tmp/quiet > /tmp/got
echo "CHECK got-md5 $(md5sum < /tmp/got | cut -d' ' -f1) bytes $(wc -c < /tmp/got)"
"#;

/// Runs `command` until it succeeds, at most `tries` times a second apart.
fn until_ok(mut command: impl FnMut() -> std::process::Command, tries: usize) -> Result<()> {
    let mut last = None;
    for _ in 0..tries {
        let output = command().output()?;
        if output.status.success() {
            return Ok(());
        }
        last = Some(output);
        std::thread::sleep(Duration::from_secs(1));
    }
    let last = last.context("no try")?;
    anyhow::bail!(
        "{:?} kept failing: {}{}",
        command(),
        String::from_utf8_lossy(&last.stdout),
        String::from_utf8_lossy(&last.stderr)
    )
}

/// A host port: `fabricd` makes a TAP interface on the segment, which the
/// test moves into a namespace of its own and gives an address. The host
/// and a guest ping each other, and 4 MiB go from the host to the guest
/// with `nc`, checksums compared. Bad interface names, and an interface
/// that cannot be made, are refused with the reason. An interface deleted
/// underneath (with its namespace) is made again; deleting the port
/// removes it.
#[test]
fn a_host_port_reaches_a_guest() -> Result<()> {
    let image = GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let (nodes, sockets) = one_port(dir.path())?;
    let node = &nodes[0].node;

    let port_add = |name: &str, tap: &str| {
        [
            "switch",
            "port",
            "add",
            "lan",
            "--mac",
            "52:54:00:00:00:0b",
            "--name",
            name,
            "--tap",
            tap,
        ]
        .map(str::to_owned)
    };
    fn args(owned: &[String; 10]) -> [&str; 10] {
        owned.each_ref().map(String::as_str)
    }
    let bad = node.fabctl_fails(&args(&port_add("h", "bad/name")))?;
    ensure!(bad.contains("invalid host interface name"), "{bad}");
    let long = node.fabctl_fails(&args(&port_add("h", "sixteen-bytes-xx")))?;
    ensure!(long.contains("longer than 15 bytes"), "{long}");
    // `lo` exists and is not a TAP: the node cannot make it, and the port
    // is not kept.
    let lo = node.fabctl_fails(&args(&port_add("h", "lo")))?;
    ensure!(
        lo.contains("cannot be served") && lo.contains("cannot create host interface lo"),
        "{lo}"
    );
    let ports = node.fabctl_json(&["switch", "port", "list"])?;
    ensure!(
        ports.as_array().map(Vec::len) == Some(1),
        "the refused port was kept: {ports}"
    );

    let tap = format!("fabt{}", std::process::id() % 100_000);
    let host = node.fabctl_json(&args(&port_add("host", &tap)))?;
    ensure!(
        host["tap"] == tap.as_str() && host["socket"].is_null() && host["connected"] == true,
        "{host}"
    );
    let listed = node.fabctl(&["switch", "port", "list"])?;
    ensure!(listed.contains(&format!("tap {tap}")), "{listed}");
    let namespace = Namespace::new(&format!("fabric-tap-{}", std::process::id()))?;
    namespace.take(&tap)?;
    namespace.run(&["ip", "addr", "add", "10.9.0.2/24", "dev", &tap])?;
    namespace.run(&["ip", "link", "set", &tap, "up"])?;

    let peer = Guest::spawn(&image, &guest(&sockets, 0, HOST_PEER))?;
    let reached = until_ok(
        || namespace.command(&["busybox", "ping", "-c", "1", "-W", "1", "10.9.0.1"]),
        150,
    );
    let sent = dir.path().join("sent");
    let transfer = reached.and_then(|()| {
        std::fs::write(
            &sent,
            (0..4u32 << 20)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect::<Vec<u8>>(),
        )?;
        until_ok(
            || {
                let mut nc = namespace.command(&["busybox", "nc", "-w", "20", "10.9.0.1", "5000"]);
                nc.stdin(std::fs::File::open(&sent).expect("the file just written"));
                nc
            },
            60,
        )
    });
    let run = peer.wait()?;
    transfer.with_context(|| format!("guest:\n{}\nfabricd:\n{}", run.tail(30), node.log_text()))?;
    ensure!(
        check_line(&run, "CHECK first-ping")? == "ok",
        "the guest could not ping the host: {}",
        run.tail(40)
    );
    let md5 = std::process::Command::new("md5sum").arg(&sent).output()?;
    let md5 = String::from_utf8_lossy(&md5.stdout);
    let md5 = md5.split_whitespace().next().context("md5sum output")?;
    let got = check_line(&run, "CHECK got-md5")?;
    ensure!(
        got == format!("{md5} bytes 4194304"),
        "sent {md5}, got {got}; guest:\n{}",
        run.tail(14)
    );
    let host = node.fabctl_json(&["switch", "port", "show", "host"])?;
    // The 4 MiB came in from the host (about 3,000 frames); what went out
    // to it is ping replies and TCP acknowledgements (one per several
    // segments, however many the guest's stack sends).
    let counters = &host["counters"];
    ensure!(
        counters["rx_packets"].as_u64() > Some(2800) && counters["tx_packets"].as_u64() > Some(10),
        "{host}"
    );

    // The port's link set down: the host sees the interface lose its
    // carrier; set up: it is back.
    let shown = || -> Result<String> {
        let out = namespace.run(&["ip", "-o", "link", "show", "dev", &tap])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ensure!(!shown()?.contains("NO-CARRIER"), "{}", shown()?);
    node.fabctl(&["switch", "port", "link", "host", "down"])?;
    ensure!(shown()?.contains("NO-CARRIER"), "link down: {}", shown()?);
    node.fabctl(&["switch", "port", "link", "host", "up"])?;
    ensure!(!shown()?.contains("NO-CARRIER"), "link up: {}", shown()?);

    // The interface goes away with its namespace: the node makes it
    // again, in its own namespace.
    drop(namespace);
    let exists = || {
        std::process::Command::new("ip")
            .args(["link", "show", &tap])
            .output()
            .is_ok_and(|output| output.status.success())
    };
    until_ok(
        || {
            let mut check = std::process::Command::new("ip");
            check.args(["link", "show", &tap]);
            check
        },
        15,
    )
    .with_context(|| format!("the interface was not made again:\n{}", node.log_text()))?;
    let again = node.fabctl_json(&["switch", "port", "show", "host"])?;
    ensure!(again["connected"] == true, "{again}");
    let log = node.log_text();
    ensure!(
        log.contains("a host port's interface went away"),
        "the port did not notice its interface go: {log}"
    );

    node.fabctl(&["switch", "port", "delete", "host"])?;
    ensure!(!exists(), "the deleted port's interface is still there");
    Ok(())
}

/// The guest of the announce test: quiet (no IPv6), it says when it is
/// ready and counts what it sends after that.
const ANNOUNCER: &str = r#"
[ -e /proc/sys/net/ipv6/conf/eth0/disable_ipv6 ] && echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6
ip link set lo up
ip link set eth0 up
ip addr add 10.9.0.1/24 dev eth0
echo "CHECK features $(cat /sys/class/net/eth0/device/features)"
sleep 2
before=$(cat /sys/class/net/eth0/statistics/tx_packets)
sleep 2
quiet=$(( $(cat /sys/class/net/eth0/statistics/tx_packets) - before ))
echo "CHECK ready"
for i in $(seq 150); do
    [ $(cat /sys/class/net/eth0/statistics/tx_packets) -gt $(( before + quiet )) ] && break
    sleep 0.2
done
echo "CHECK quiet $quiet announced $(( $(cat /sys/class/net/eth0/statistics/tx_packets) - before - quiet ))"
"#;

/// A port offers GUEST_ANNOUNCE, so QEMU lets its guest announce itself
/// (gratuitous ARP) when asked, as after a migration: the guest, silent
/// until then, sends when QEMU's `announce-self` runs, and the port counts
/// it.
#[test]
fn a_guest_announces_itself_when_its_frontend_asks() -> Result<()> {
    let image = GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let (nodes, sockets) = one_port(dir.path())?;
    let node = &nodes[0].node;
    let qmp_socket = dir.path().join("qmp.sock");
    let config = GuestConfig {
        qmp_socket: Some(qmp_socket.clone()),
        ..guest(&sockets, 0, ANNOUNCER)
    };
    let mut running = Guest::spawn(&image, &config)?;
    running.wait_for_serial("CHECK ready", Duration::from_secs(120))?;
    let received = |node: &integration::fabricd::Fabricd| -> Result<u64> {
        let port = node.fabctl_json(&["switch", "port", "show", "a"])?;
        port["counters"]["rx_packets"]
            .as_u64()
            .with_context(|| format!("no counters: {port}"))
    };
    let before = received(node)?;
    integration::guest::qmp(
        &qmp_socket,
        &serde_json::json!({
            "execute": "announce-self",
            "arguments": {"initial": 50, "max": 550, "rounds": 2, "step": 100}
        }),
    )?;
    let run = running.wait()?;
    let features = check_line(&run, "CHECK features")?;
    ensure!(
        features.as_bytes().get(21) == Some(&b'1'),
        "GUEST_ANNOUNCE (bit 21) not negotiated: {features}"
    );
    let counts: Vec<&str> = check_line(&run, "CHECK quiet")?
        .split_whitespace()
        .collect();
    ensure!(
        counts.len() == 3 && counts[0] == "0" && counts[2].parse::<u64>().is_ok_and(|n| n >= 1),
        "the guest did not announce itself (quiet, then announced): {counts:?}\n{}",
        run.tail(20)
    );
    let after = received(node)?;
    ensure!(
        after > before,
        "the port took nothing: {before} then {after}"
    );
    Ok(())
}
