//! A replicated volume across `fabricd` processes, driven at the
//! vhost-user level by our own frontend: a replica killed mid-write goes
//! stale while the writes go on, comes back and resyncs only what it
//! missed; then the frontend's node is killed and the volume, attached on
//! the surviving replica, holds every acknowledged block. A replica whose
//! disk fills up goes stale (or, when it is needed, writes fail with an
//! I/O error) and catches up once there is room.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use integration::fabricd::{placement, start_cluster, Fabricd};
use integration::vhost_blk::{BlkClient, Buffer, ClientConfig, Completion, Request, RequestType};

const WAIT: Duration = Duration::from_secs(30);
const BLOCK: u64 = 4096;
/// Blocks per request.
const CHUNK: u64 = 16;

fn wait_for<T>(
    what: &str,
    seconds: u64,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    for _ in 0..seconds * 10 {
        if let Some(value) = check()? {
            return Ok(value);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("timed out waiting for {what}")
}

/// A block's contents: its lba and a version, then a filler from both.
fn block(lba: u64, version: u8) -> Vec<u8> {
    let mut data = vec![version; BLOCK as usize];
    data[..8].copy_from_slice(&lba.to_le_bytes());
    data
}

fn one(client: &mut BlkClient, request: &Request<'_>) -> Result<Completion> {
    client.submit(request)?;
    let mut done = Vec::new();
    while done.is_empty() {
        client.wait_completions(&mut done, WAIT)?;
    }
    Ok(done[0])
}

/// Writes `blocks` blocks from `lba` at `version`, then flushes; every
/// request must succeed.
fn write_range(
    client: &mut BlkClient,
    buffer: Buffer,
    lba: u64,
    blocks: u64,
    version: u8,
) -> Result<()> {
    for start in (lba..lba + blocks).step_by(CHUNK as usize) {
        let done = write_chunk(client, buffer, start, version)?;
        ensure!(done.is_ok(), "write at block {start}: {done:?}");
    }
    let done = one(
        client,
        &Request {
            kind: RequestType::Flush,
            sector: 0,
            data: &[],
            token: 0,
        },
    )?;
    ensure!(done.is_ok(), "flush: {done:?}");
    Ok(())
}

/// Writes the chunk at block `start` at `version`; how it ended.
fn write_chunk(
    client: &mut BlkClient,
    buffer: Buffer,
    start: u64,
    version: u8,
) -> Result<Completion> {
    let data: Vec<u8> = (start..start + CHUNK)
        .flat_map(|b| block(b, version))
        .collect();
    client.write_data(buffer, &data)?;
    one(
        client,
        &Request {
            kind: RequestType::Out,
            sector: start * BLOCK / 512,
            data: &[buffer],
            token: start,
        },
    )
}

fn check_range(
    client: &mut BlkClient,
    buffer: Buffer,
    lba: u64,
    blocks: u64,
    version: u8,
) -> Result<()> {
    for start in (lba..lba + blocks).step_by(CHUNK as usize) {
        let data = read_chunk(client, buffer, start)?;
        for (i, got) in data.chunks(BLOCK as usize).enumerate() {
            let expected = block(start + i as u64, version);
            ensure!(
                got == expected,
                "block {} does not hold version {version}",
                start + i as u64
            );
        }
    }
    Ok(())
}

/// Flips one byte in each block of `node`'s copy of `volume` that holds
/// `version` of an lba in `lbas`; returns how many it flipped.
fn damage(node: &Fabricd, volume: &str, lbas: std::ops::Range<u64>, version: u8) -> Result<usize> {
    use std::io::{Read, Seek, SeekFrom, Write};

    let id = node.fabctl_json(&["volume", "show", volume])?["id"]
        .as_str()
        .context("an id")?
        .to_owned();
    let path = node.data_dir.join("volumes").join(format!("{id}.data"));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let length = file.metadata()?.len();
    let mut damaged = 0;
    let mut data = vec![0u8; BLOCK as usize];
    for physical in 0..length / BLOCK {
        file.seek(SeekFrom::Start(physical * BLOCK))?;
        file.read_exact(&mut data)?;
        let lba = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        if lbas.contains(&lba) && data == block(lba, version) {
            data[100] ^= 0xff;
            file.seek(SeekFrom::Start(physical * BLOCK))?;
            file.write_all(&data)?;
            damaged += 1;
        }
    }
    file.sync_all()?;
    Ok(damaged)
}

/// Attaches `volume` on `node` (`extra`: more `fabctl volume attach`
/// arguments) and returns its vhost-user socket.
fn attach(node: &Fabricd, volume: &str, extra: &[&str]) -> Result<String> {
    let mut args = vec!["volume", "attach", volume];
    args.extend_from_slice(extra);
    let attached = node.fabctl_json(&args)?;
    Ok(attached["socket"]
        .as_str()
        .context("attach names a socket")?
        .to_owned())
}

/// A vhost-user-blk client on `socket`, with a buffer of one request.
fn connect(socket: &str) -> Result<(BlkClient, Buffer)> {
    let client = BlkClient::connect(socket, &ClientConfig::default())?;
    let buffer = client.data_buffer(0, (CHUNK * BLOCK) as u32)?;
    Ok((client, buffer))
}

fn replication(node: &Fabricd, volume: &str) -> Result<serde_json::Value> {
    let shown = node.fabctl_json(&["volume", "show", volume])?;
    Ok(shown["replication"].clone())
}

#[test]
fn a_killed_replica_resyncs_and_the_volume_fails_over_to_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = start_cluster(dir.path(), 3, "raft_election_min_ms = 500\nraft_election_max_ms = 1000\nraft_heartbeat_ms = 100\nheartbeat_ms = 100\nsuspect_after_ms = 400\ndown_after_ms = 1200\n")?;
    let bad = nodes[0].node.fabctl_output(&[
        "volume",
        "create",
        "bad",
        "--size",
        "64M",
        "--replicas",
        "2",
        "--min-replicas",
        "3",
    ])?;
    ensure!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("min_replicas 3 must be 1 to the replica count"),
        "{bad:?}"
    );
    nodes[0]
        .node
        .fabctl(&["volume", "create", "rv", "--size", "64M", "--replicas", "2"])?;
    let placement = placement(&nodes[0].node, "rv")?;
    ensure!(placement.len() == 2, "{placement:?}");
    let (front, other) = (placement[0], placement[1]);

    // Attach on the first replica: it runs the frontend.
    let socket = attach(&nodes[front].node, "rv", &[])?;
    let shown = replication(&nodes[front].node, "rv")?;
    ensure!(shown["phase"] == "serving", "{shown}");
    ensure!(
        shown["states"] == serde_json::json!(["insync", "insync"]),
        "{shown}"
    );
    ensure!(shown["generation"] == 1, "{shown}");

    let (mut client, buffer) = connect(&socket)?;
    write_range(&mut client, buffer, 0, 256, 1)?;

    // A discard reaches both replicas (it reads back as zeros, and neither
    // replica refuses it); then the blocks are written again.
    let done = one(
        &mut client,
        &Request {
            kind: RequestType::Discard {
                sectors: (CHUNK * BLOCK / 512) as u32,
            },
            sector: 0,
            data: &[],
            token: 7,
        },
    )?;
    ensure!(done.is_ok(), "discard: {done:?}");
    let done = one(
        &mut client,
        &Request {
            kind: RequestType::In,
            sector: 0,
            data: &[buffer],
            token: 8,
        },
    )?;
    ensure!(done.is_ok(), "read after discard: {done:?}");
    let mut data = vec![1u8; (CHUNK * BLOCK) as usize];
    client.read_data(buffer, &mut data)?;
    ensure!(
        data.iter().all(|&b| b == 0),
        "discarded blocks read as zeros"
    );
    let shown = replication(&nodes[front].node, "rv")?;
    ensure!(shown["stale"] == serde_json::json!([]), "{shown}");
    write_range(&mut client, buffer, 0, CHUNK, 1)?;

    // Kill the other replica: the writes go on once it is marked stale.
    nodes[other].node.kill9()?;
    write_range(&mut client, buffer, 10 * 256, 256, 2)?;
    let shown = replication(&nodes[front].node, "rv")?;
    ensure!(
        shown["states"] == serde_json::json!(["insync", "stale"]),
        "{shown}"
    );
    ensure!(
        shown["dirty_regions"] == serde_json::json!([0, 1]),
        "only the region written meanwhile: {shown}"
    );
    ensure!(shown["stale"] == serde_json::json!([other + 1]), "{shown}");

    // Back: it copies that one region and is in sync again.
    nodes[other].node.restart()?;
    wait_for("the replica back in sync", 60, || {
        let shown = replication(&nodes[front].node, "rv")?;
        Ok((shown["states"] == serde_json::json!(["insync", "insync"])
            && shown["stale"] == serde_json::json!([]))
        .then_some(()))
    })?;
    check_range(&mut client, buffer, 0, 256, 1)?;
    check_range(&mut client, buffer, 10 * 256, 256, 2)?;
    drop(client);

    // While the frontend's node is up, attaching elsewhere is refused
    // unless forced.
    let refused = nodes[other]
        .node
        .fabctl_output(&["volume", "attach", "rv"])?;
    ensure!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("--force"),
        "{refused:?}"
    );

    // Round trips over the cluster transport, and bad pings.
    let third = (0..3)
        .find(|i| !placement.contains(i))
        .context("a third node")?;
    let other_name = format!("n{}", other + 1);
    let ping = nodes[third]
        .node
        .fabctl_json(&["node", "ping", &other_name, "--count", "20"])?;
    ensure!(
        ping["count"] == 20 && ping["bytes"] == 4096 && ping["p50_us"].as_f64() > Some(0.0),
        "{ping}"
    );
    let refused =
        nodes[third]
            .node
            .fabctl_output(&["node", "ping", &other_name, "--count", "0"])?;
    ensure!(
        String::from_utf8_lossy(&refused.stderr).contains("count 0 is outside"),
        "{refused:?}"
    );
    let refused = nodes[third].node.fabctl_output(&["node", "ping", "n9"])?;
    ensure!(
        String::from_utf8_lossy(&refused.stderr).contains("no node with id or name \"n9\""),
        "{refused:?}"
    );

    // Kill the frontend's node; attach on the other replica (asked of the
    // third node), which then serves alone: every acknowledged block is
    // there.
    nodes[front].node.kill9()?;
    let refused = nodes[third]
        .node
        .fabctl_output(&["volume", "attach", "rv", "--node", "n9", "--force"])?;
    ensure!(
        String::from_utf8_lossy(&refused.stderr).contains("no node with id or name \"n9\""),
        "{refused:?}"
    );
    let socket = attach(
        &nodes[third].node,
        "rv",
        &["--node", &other_name, "--force"],
    )?;
    ensure!(
        socket.starts_with(&*nodes[other].node.socket_dir.to_string_lossy()),
        "the socket is on the named node: {socket}"
    );
    let shown = wait_for("the new frontend serving", 60, || {
        let shown = replication(&nodes[other].node, "rv")?;
        Ok((shown["phase"] == "serving").then_some(shown))
    })?;
    ensure!(
        shown["generation"] == 2,
        "a new attachment, a new generation: {shown}"
    );
    let (mut client, buffer) = connect(&socket)?;
    check_range(&mut client, buffer, 0, 256, 1)?;
    check_range(&mut client, buffer, 10 * 256, 256, 2)?;
    // Never-written blocks read as zeros.
    let done = one(
        &mut client,
        &Request {
            kind: RequestType::In,
            sector: 256 * BLOCK / 512,
            data: &[buffer],
            token: 1,
        },
    )?;
    ensure!(done.is_ok(), "{done:?}");
    let mut data = vec![1u8; (CHUNK * BLOCK) as usize];
    client.read_data(buffer, &mut data)?;
    ensure!(
        data.iter().all(|&b| b == 0),
        "unwritten blocks read as zeros"
    );
    Ok(())
}

/// The frontend's node is cut off from the cluster while its guest keeps
/// writing. The volume is attached on the other replica (a new
/// generation); when the links heal, the old frontend's replica requests
/// are refused as fenced and its guest sees I/O errors, never a write
/// acknowledged that the new attachment does not have.
#[test]
fn a_partitioned_frontend_is_fenced_by_a_new_attachment() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nodes = start_cluster(dir.path(), 3, "fault_injection = true\nraft_election_min_ms = 500\nraft_election_max_ms = 1000\nraft_heartbeat_ms = 100\nheartbeat_ms = 100\nsuspect_after_ms = 400\ndown_after_ms = 1200\n")?;
    nodes[0]
        .node
        .fabctl(&["volume", "create", "rv", "--size", "64M", "--replicas", "2"])?;
    let placement = placement(&nodes[0].node, "rv")?;
    let (front, other) = (placement[0], placement[1]);
    let socket = attach(&nodes[front].node, "rv", &[])?;
    let (mut client, buffer) = connect(&socket)?;
    write_range(&mut client, buffer, 0, 256, 1)?;

    // Cut the frontend's node off from both others, both ways.
    let addresses: Vec<String> = nodes.iter().map(|member| member.cluster.clone()).collect();
    let mut cut = vec!["cluster", "faults"];
    for (index, address) in addresses.iter().enumerate() {
        if index != front {
            cut.extend(["--block", address.as_str()]);
        }
    }
    nodes[front].node.fabctl(&cut)?;
    for (index, member) in nodes.iter().enumerate() {
        if index != front {
            member
                .node
                .fabctl(&["cluster", "faults", "--block", &addresses[front]])?;
        }
    }
    // The old frontend's guest writes version 9 over region 0: it cannot
    // complete (its replica is unreachable and it cannot commit that).
    let data: Vec<u8> = (0..CHUNK).flat_map(|b| block(b, 9)).collect();
    client.write_data(buffer, &data)?;
    client.submit(&Request {
        kind: RequestType::Out,
        sector: 0,
        data: &[buffer],
        token: 99,
    })?;
    let mut done = Vec::new();
    client.wait_completions(&mut done, Duration::from_secs(5))?;
    ensure!(
        done.is_empty(),
        "a cut-off frontend completed a write: {done:?}"
    );

    // The majority attaches the volume on the other replica.
    let new_socket = attach(&nodes[other].node, "rv", &["--force"])?;
    let shown = wait_for("the new frontend serving", 60, || {
        let shown = replication(&nodes[other].node, "rv")?;
        Ok((shown["phase"] == "serving").then_some(shown))
    })?;
    ensure!(shown["generation"] == 2, "{shown}");

    // Heal: the old frontend's pending write fails; nothing it did lands.
    for member in &nodes {
        member.node.fabctl(&["cluster", "faults"])?;
    }
    while done.is_empty() {
        client.wait_completions(&mut done, WAIT)?;
    }
    ensure!(
        !done[0].is_ok(),
        "the fenced frontend's write must fail: {done:?}"
    );
    let (mut fresh, buffer) = connect(&new_socket)?;
    check_range(&mut fresh, buffer, 0, 256, 1)?;
    write_range(&mut fresh, buffer, 0, CHUNK, 3)?;
    check_range(&mut fresh, buffer, 0, CHUNK, 3)?;
    Ok(())
}

/// A QEMU guest runs fio with crc32c verification on a replicated volume
/// while the replica that is not the frontend is killed: fio sees no
/// error and every block verifies; the replica comes back and resyncs.
#[test]
fn a_guest_keeps_writing_through_the_loss_of_a_replica() -> Result<()> {
    use integration::guest::{Guest, GuestConfig, GuestImage};

    let image = GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let mut nodes = start_cluster(dir.path(), 3, "raft_election_min_ms = 500\nraft_election_max_ms = 1000\nraft_heartbeat_ms = 100\nheartbeat_ms = 100\nsuspect_after_ms = 400\ndown_after_ms = 1200\n")?;
    nodes[0].node.fabctl(&[
        "volume",
        "create",
        "gv",
        "--size",
        "256M",
        "--replicas",
        "2",
    ])?;
    let placement = placement(&nodes[0].node, "gv")?;
    let (front, other) = (placement[0], placement[1]);
    let socket = attach(&nodes[front].node, "gv", &[])?;

    let script = r#"
echo "CHECK start"
fio --name=verify --filename=$DISK --size=24M --rw=randwrite --bs=4k \
    --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --numjobs=1 > /tmp/fio.out 2>&1
status=$?
[ $status -eq 0 ] && grep -q "err= 0" /tmp/fio.out && echo "CHECK fio-verify ok" || { cat /tmp/fio.out; echo "CHECK fio-verify FAILED"; }
"#;
    let guest = GuestConfig {
        vhost_user_blk_sockets: vec![socket.into()],
        script: script.into(),
        vcpus: 1,
        num_queues: Some(1),
        timeout: Duration::from_secs(300),
        ..GuestConfig::default()
    };
    let mut running = Guest::spawn(&image, &guest)?;
    running.wait_for_serial("CHECK start", Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(2));
    nodes[other].node.kill9()?;
    let run = running.wait()?;
    ensure!(
        run.has_line("CHECK fio-verify ok"),
        "fio failed on the guest:\n{}",
        run.tail(40)
    );
    let shown = nodes[front].node.fabctl_json(&["volume", "show", "gv"])?;
    ensure!(
        shown["attachment"]["counters"]["io_errors"] == 0,
        "the guest saw I/O errors: {shown}"
    );
    let stale = replication(&nodes[front].node, "gv")?;
    ensure!(
        stale["states"] == serde_json::json!(["insync", "stale"]),
        "{stale}"
    );

    nodes[other].node.restart()?;
    wait_for("the replica back in sync", 120, || {
        let shown = replication(&nodes[front].node, "gv")?;
        Ok((shown["states"] == serde_json::json!(["insync", "insync"])).then_some(()))
    })?;
    Ok(())
}

/// Bits flip in the data file of the replica reads are served from: the
/// guest still reads what it wrote (from the other replica), the damaged
/// replica is marked stale and resynced. Bits flip in the other replica,
/// where nothing reads them: `fabctl volume scrub` finds and repairs them.
/// Then the first replica serves correct data on its own.
#[test]
fn a_damaged_replica_is_read_around_and_repaired() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = start_cluster(dir.path(), 3, "raft_election_min_ms = 500\nraft_election_max_ms = 1000\nraft_heartbeat_ms = 100\nheartbeat_ms = 100\nsuspect_after_ms = 400\ndown_after_ms = 1200\n")?;
    nodes[0]
        .node
        .fabctl(&["volume", "create", "rv", "--size", "64M", "--replicas", "2"])?;
    let placement = placement(&nodes[0].node, "rv")?;
    let (front, other) = (placement[0], placement[1]);
    let socket = attach(&nodes[front].node, "rv", &[])?;
    let (mut client, buffer) = connect(&socket)?;
    write_range(&mut client, buffer, 0, 256, 1)?;

    // Damage the first MiB of the frontend's own copy, where those blocks
    // landed: one byte of every block.
    let damaged = damage(&nodes[front].node, "rv", 0..256, 1)?;
    ensure!(damaged == 256, "found {damaged} of the 256 blocks written");

    check_range(&mut client, buffer, 0, 256, 1)?;
    // The damaged replica was marked stale and resynced (see the log).
    let stale = format!(
        "MarkStale {{ name: \"rv\", generation: 1, node: {} }}",
        front + 1
    );
    let in_sync = format!(
        "MarkInSync {{ name: \"rv\", generation: 1, node: {} }}",
        front + 1
    );
    wait_for("the damaged replica resynced", 60, || {
        let log = nodes[front].node.log_text();
        let repaired = log
            .find(&stale)
            .is_some_and(|at| log[at..].contains(&in_sync));
        Ok(repaired.then_some(()))
    })?;
    let shown = replication(&nodes[front].node, "rv")?;
    ensure!(
        shown["states"] == serde_json::json!(["insync", "insync"]),
        "{shown}"
    );
    // Bits flip where no guest reads them, in the other replica: a scrub
    // finds the damaged blocks and has the copy repaired; a second scrub
    // finds nothing.
    write_range(&mut client, buffer, 1024, 256, 3)?;
    let damaged = damage(&nodes[other].node, "rv", 1024 + 8..1024 + 12, 3)?;
    ensure!(damaged == 4, "found {damaged} of the 4 blocks to damage");
    let report = nodes[front].node.fabctl_json(&["volume", "scrub", "rv"])?;
    ensure!(
        report["damaged_blocks"] == 4
            && report["repairing"] == 1
            && report["unrepairable"] == 0
            && report["checked"] == report["regions"],
        "{report}"
    );
    let shown = replication(&nodes[front].node, "rv")?;
    ensure!(
        shown["states"] == serde_json::json!(["insync", "insync"]),
        "{shown}"
    );
    let again = nodes[front].node.fabctl_json(&["volume", "scrub", "rv"])?;
    ensure!(
        again["damaged_blocks"] == 0 && again["differing"] == 0 && again["repairing"] == 0,
        "{again}"
    );
    // Scrub runs where the volume is attached; elsewhere it says where.
    let elsewhere = nodes[other].node.fabctl_fails(&["volume", "scrub", "rv"])?;
    ensure!(elsewhere.contains("attached on node"), "{elsewhere}");

    // With the other replica gone, the repaired copy serves alone.
    nodes[other].node.kill9()?;
    write_range(&mut client, buffer, 512, CHUNK, 2)?;
    check_range(&mut client, buffer, 0, 256, 1)?;
    // A detach is recorded: no frontend serves the volume any more.
    drop(client);
    nodes[front]
        .node
        .fabctl(&["volume", "detach", "rv", "--force"])?;
    let shown = replication(&nodes[front].node, "rv")?;
    ensure!(shown["frontend"].is_null(), "{shown}");
    Ok(())
}

/// Replicas move: by hand (`fabctl volume replica replace`), from a live
/// node to one placement picks, and on their own, when a replica's node
/// stays away longer than `replace_after_s`. Each new copy is a full copy;
/// in the end the volume, attached on the last new replica after its first
/// two homes are gone, holds every acknowledged block.
#[test]
fn replicas_are_replaced_by_hand_and_after_a_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = start_cluster(
        dir.path(),
        4,
        "raft_election_min_ms = 500\nraft_election_max_ms = 1000\nraft_heartbeat_ms = 100\nheartbeat_ms = 100\nsuspect_after_ms = 400\ndown_after_ms = 1200\n[replication]\nreplica_timeout_ms = 1000\nretry_ms = 200\nreplace_after_s = 3\n",
    )?;
    nodes[0]
        .node
        .fabctl(&["volume", "create", "mv", "--size", "64M", "--replicas", "2"])?;
    let first = placement(&nodes[0].node, "mv")?;
    let front = first[0];
    let socket = attach(&nodes[front].node, "mv", &[])?;
    let (mut client, buffer) = connect(&socket)?;
    write_range(&mut client, buffer, 0, 512, 1)?;

    // Bad requests say what is wrong and change nothing.
    let not_a_replica = nodes[front].node.fabctl_fails(&[
        "volume",
        "replica",
        "replace",
        "mv",
        &(first[0] + 1).to_string(),
        "--to",
        &(first[1] + 1).to_string(),
    ])?;
    ensure!(
        not_a_replica.contains("already holds a replica"),
        "{not_a_replica}"
    );
    let unknown =
        nodes[front]
            .node
            .fabctl_fails(&["volume", "replica", "replace", "mv", "no-such-node"])?;
    ensure!(unknown.contains("no node"), "{unknown}");

    // By hand: the live second replica moves to a node placement picks,
    // which gets a full copy while the guest keeps writing.
    let moved = nodes[front].node.fabctl_json(&[
        "volume",
        "replica",
        "replace",
        "mv",
        &(first[1] + 1).to_string(),
    ])?;
    let second = placement(&nodes[front].node, "mv")?;
    ensure!(
        second[0] == front && !first.contains(&second[1]),
        "{moved} {second:?}"
    );
    ensure!(
        moved["replication"]["states"] == serde_json::json!(["insync", "insync"]),
        "{moved}"
    );
    write_range(&mut client, buffer, 4 * 256, 256, 2)?;
    // The node it left deletes its copy.
    wait_for("the old copy deleted", 30, || {
        let local = nodes[first[1]].node.fabctl_json(&["volume", "list"])?;
        Ok((!local.to_string().contains("\"mv\"")).then_some(()))
    })?;

    // On its own: the new replica's node dies and stays away; after
    // `replace_after_s` its replica is put on a node placement picks, and
    // copied there in full.
    let gone = second[1];
    nodes[gone].node.kill9()?;
    write_range(&mut client, buffer, 8 * 256, 256, 3)?;
    let third = wait_for("the dead node's replica replaced", 60, || {
        let now = placement(&nodes[front].node, "mv")?;
        Ok((!now.contains(&gone)).then_some(now))
    })?;
    // (Possibly the node the first replacement left: its old copy is
    // overwritten in full.)
    ensure!(
        third[0] == front && third[1] != front && third[1] != gone,
        "{third:?}"
    );
    nodes[front]
        .node
        .fabctl(&["volume", "wait", "mv", "--timeout", "60"])?;
    drop(client);

    // The dead node returns (it holds no replica now, and keeps the
    // cluster's quorum); then the frontend's node dies: the last new
    // replica holds it all.
    nodes[gone].node.restart()?;
    nodes[front].node.kill9()?;
    let last = third[1];
    let attached = wait_for("an attach on the last replica", 60, || {
        let output = nodes[last]
            .node
            .fabctl_output(&["-o", "json", "volume", "attach", "mv"])?;
        Ok(output
            .status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&output.stdout))
            .transpose()?)
    })?;
    let socket = attached["socket"].as_str().context("a socket")?.to_owned();
    wait_for("the new frontend serving", 60, || {
        let shown = replication(&nodes[last].node, "mv")?;
        Ok((shown["phase"] == "serving").then_some(()))
    })?;
    let (mut client, buffer) = connect(&socket)?;
    check_range(&mut client, buffer, 0, 512, 1)?;
    check_range(&mut client, buffer, 4 * 256, 256, 2)?;
    check_range(&mut client, buffer, 8 * 256, 256, 3)?;
    Ok(())
}

/// The frontend's `fabricd` is killed mid-stream and restarted: it attaches
/// the volume again by itself (a new generation), on the same socket; the
/// guest reconnects and finds every acknowledged block.
#[test]
fn a_restarted_frontend_serves_its_volume_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = start_cluster(dir.path(), 3, "raft_election_min_ms = 500\nraft_election_max_ms = 1000\nraft_heartbeat_ms = 100\nheartbeat_ms = 100\nsuspect_after_ms = 400\ndown_after_ms = 1200\n")?;
    nodes[0]
        .node
        .fabctl(&["volume", "create", "fv", "--size", "64M", "--replicas", "2"])?;
    let front = placement(&nodes[0].node, "fv")?[0];
    let socket = attach(&nodes[front].node, "fv", &[])?;
    let (mut client, buffer) = connect(&socket)?;
    write_range(&mut client, buffer, 0, 512, 1)?;
    drop(client);

    nodes[front].node.kill9()?;
    nodes[front].node.restart()?;
    let shown = wait_for("the volume served again", 60, || {
        let shown = nodes[front].node.fabctl_json(&["volume", "show", "fv"])?;
        Ok((shown["replication"]["phase"] == "serving").then_some(shown))
    })?;
    ensure!(
        shown["replication"]["generation"] == 2
            && shown["attachment"]["socket"] == serde_json::json!(socket),
        "{shown}"
    );
    let (mut client, buffer) = connect(&socket)?;
    check_range(&mut client, buffer, 0, 512, 1)?;
    write_range(&mut client, buffer, 512, 256, 2)?;
    check_range(&mut client, buffer, 512, 256, 2)?;
    // A detached volume stays detached across a restart.
    drop(client);
    detach_once_disconnected(&nodes[front].node, "fv")?;
    nodes[front].node.kill9()?;
    nodes[front].node.restart()?;
    std::thread::sleep(Duration::from_secs(3));
    let shown = nodes[front].node.fabctl_json(&["volume", "show", "fv"])?;
    ensure!(
        shown["attachment"].is_null() && shown["replication"]["frontend"].is_null(),
        "{shown}"
    );

    // Deleted from a node that holds no copy: every copy goes, and a new
    // volume of the same name starts empty wherever it is placed.
    let placed = placement(&nodes[0].node, "fv")?;
    let outside = (0..3)
        .find(|i| !placed.contains(i))
        .context("a node without a copy")?;
    nodes[outside].node.fabctl(&["volume", "delete", "fv"])?;
    for &holder in &placed {
        wait_for("the copy deleted", 30, || {
            let local = nodes[holder].node.fabctl_json(&["volume", "list"])?;
            Ok((!local.to_string().contains("\"fv\"")).then_some(()))
        })?;
    }
    nodes[0]
        .node
        .fabctl(&["volume", "create", "fv", "--size", "64M", "--replicas", "2"])?;
    let front = placement(&nodes[0].node, "fv")?[0];
    let socket = attach(&nodes[front].node, "fv", &[])?;
    let (mut client, buffer) = connect(&socket)?;
    check_zeros(&mut client, buffer, 0, 768)?;
    Ok(())
}

/// Detaches `volume` (without `--force`) once `node` has seen its last
/// frontend go: a client that just closed its socket may still count as
/// connected for a moment.
fn detach_once_disconnected(node: &Fabricd, volume: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let output = node.fabctl_output(&["volume", "detach", volume])?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            stderr.contains("in use by a connected frontend")
                && std::time::Instant::now() < deadline,
            "detach {volume}: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads the `CHUNK` blocks from `start`.
fn read_chunk(client: &mut BlkClient, buffer: Buffer, start: u64) -> Result<Vec<u8>> {
    let done = one(
        client,
        &Request {
            kind: RequestType::In,
            sector: start * BLOCK / 512,
            data: &[buffer],
            token: start,
        },
    )?;
    ensure!(done.is_ok(), "read at block {start}: {done:?}");
    let mut data = vec![0xa5u8; (CHUNK * BLOCK) as usize];
    client.read_data(buffer, &mut data)?;
    Ok(data)
}

/// Blocks `lba..lba + blocks` read as zeros.
fn check_zeros(client: &mut BlkClient, buffer: Buffer, lba: u64, blocks: u64) -> Result<()> {
    for start in (lba..lba + blocks).step_by(CHUNK as usize) {
        let data = read_chunk(client, buffer, start)?;
        ensure!(
            data.iter().all(|&b| b == 0),
            "blocks from {start} do not read as zeros"
        );
    }
    Ok(())
}

/// A tmpfs of limited size mounted over a directory (a disk that fills
/// up), unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path, mib: u64) -> Result<SmallDisk> {
        std::fs::create_dir_all(path)?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "fabric-test"])
            .arg(path)
            .status()?;
        ensure!(status.success(), "mounting a tmpfs on {}", path.display());
        Ok(SmallDisk {
            path: path.to_owned(),
        })
    }

    /// Fills what is left with a file; removing it makes room again.
    fn fill(&self) -> Result<std::path::PathBuf> {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler)?;
        let chunk = vec![0x55u8; 1 << 16];
        while file.write_all(&chunk).is_ok() {}
        Ok(filler)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// The disk under one replica fills up (a tmpfs over its node's volume
/// files). With one in-sync replica enough, the writes go on without an
/// error while that replica is stale; given room, it catches up. With two
/// in-sync replicas required, a write that cannot get them fails with an
/// I/O error within the I/O timeout, rather than waiting for good; given
/// room, the replica catches up, writes succeed again and the two copies
/// agree, a scrub says, including where the failed write went.
#[test]
fn a_replica_whose_disk_fills_up_fails_cleanly_and_catches_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nodes = integration::fabricd::start_cluster_with(
        dir.path(),
        2,
        "[replication]\nreplica_timeout_ms = 1000\nio_timeout_ms = 4000\nretry_ms = 200\n",
    )?;
    let (front, full) = (&nodes[0].node, &nodes[1].node);
    let disk = SmallDisk::mount(&full.data_dir.join("volumes"), 4)?;
    for (name, min) in [("loose", "1"), ("strict", "2")] {
        front.fabctl(&[
            "volume",
            "create",
            name,
            "--size",
            "64M",
            "--replicas",
            "2",
            "--min-replicas",
            min,
        ])?;
    }
    let states = |volume: &str| -> Result<serde_json::Value> {
        Ok(replication(front, volume)?["states"].clone())
    };
    let both_in_sync = serde_json::json!(["insync", "insync"]);

    // 16 MiB into a volume whose second replica has 4: every write
    // completes; that replica goes stale.
    let (mut client, buffer) = connect(&attach(front, "loose", &[])?)?;
    write_range(&mut client, buffer, 0, 4096, 1)?;
    ensure!(
        states("loose")? == serde_json::json!(["insync", "stale"]),
        "{}",
        replication(front, "loose")?
    );
    check_range(&mut client, buffer, 0, 4096, 1)?;
    let shown = front.fabctl_json(&["volume", "show", "loose"])?;
    ensure!(
        shown["attachment"]["counters"]["io_errors"] == 0,
        "the guest saw I/O errors: {shown}"
    );
    // Room again: it catches up.
    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&disk.path)
        .status()?;
    ensure!(status.success(), "growing the tmpfs");
    wait_for("the loose volume's replica back in sync", 60, || {
        Ok((states("loose")? == both_in_sync).then_some(()))
    })?;
    drop(client);

    // Full again, and the strict volume needs both replicas: a write fails
    // with an I/O error (not a hang), and nothing reads as written that
    // was not.
    let (mut client, buffer) = connect(&attach(front, "strict", &[])?)?;
    write_range(&mut client, buffer, 0, 64, 1)?;
    let filler = disk.fill()?;
    let mut failed = None;
    for start in (64..64 + 4096).step_by(CHUNK as usize) {
        let done = write_chunk(&mut client, buffer, start, 2)?;
        if !done.is_ok() {
            ensure!(
                done.status == Some(integration::vhost_blk::Status::IoErr),
                "{done:?}"
            );
            failed = Some(start);
            break;
        }
    }
    let failed = failed.context("no write failed on a full replica")?;
    // Room again: the replica catches up and writes succeed.
    std::fs::remove_file(&filler)?;
    wait_for("the strict volume's replica back in sync", 60, || {
        Ok((states("strict")? == both_in_sync).then_some(()))
    })?;
    write_range(&mut client, buffer, 0, 64, 3)?;
    check_range(&mut client, buffer, 0, 64, 3)?;
    check_range(&mut client, buffer, 64, failed - 64, 2)?;
    let data = read_chunk(&mut client, buffer, failed)?;
    for (i, got) in data.chunks(BLOCK as usize).enumerate() {
        let lba = failed + i as u64;
        ensure!(
            got == block(lba, 2) || got.iter().all(|&b| b == 0),
            "block {lba} of the failed write holds neither its old nor its new data"
        );
    }
    drop(client);
    let scrub = front.fabctl_json(&["volume", "scrub", "strict"])?;
    ensure!(
        scrub["differing"] == 0
            && scrub["repairing"] == 0
            && scrub["damaged_blocks"] == 0
            && scrub["checked"] == scrub["regions"],
        "the replicas differ: {scrub}"
    );
    Ok(())
}
