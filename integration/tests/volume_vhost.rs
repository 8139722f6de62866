//! `fabricd` driven at the vhost-user level by our own frontend (no VM):
//! hostile requests, and crash consistency under `kill -9` mid-write.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration::fabricd::Fabricd;
use integration::vhost_blk::{
    BlkClient, Buffer, ClientConfig, Completion, Malformed, Request, RequestType, Status,
};

const WAIT: Duration = Duration::from_secs(10);
const BLOCK: u64 = 4096;

fn complete_one(client: &mut BlkClient, done: &mut Vec<Completion>) -> Result<Completion> {
    done.clear();
    while done.is_empty() {
        client.wait_completions(done, WAIT)?;
    }
    ensure!(
        done.len() == 1,
        "one request in flight, {} completions",
        done.len()
    );
    Ok(done[0])
}

#[test]
fn malformed_requests_get_a_status_and_the_device_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Fabricd::start(dir.path())?;
    let socket = node.create_attached_volume("hostile", "64M")?;
    let mut client = BlkClient::connect(&socket, &ClientConfig::default())?;
    let buffer = client.data_buffer(0, 2 * BLOCK as u32)?;
    let mut done = Vec::new();
    let cases = [
        (Malformed::UnknownType, Some(Status::Unsupp)),
        (Malformed::SectorOutOfRange, Some(Status::IoErr)),
        (Malformed::SectorStraddlesEnd, Some(Status::IoErr)),
        (Malformed::ShortHeader, Some(Status::IoErr)),
        (Malformed::ReadIntoReadable, Some(Status::IoErr)),
        (Malformed::WriteFromWritable, Some(Status::IoErr)),
        (Malformed::AddressOutsideMemory, Some(Status::IoErr)),
        (Malformed::MissingStatus, None),
        (Malformed::HeaderOnly, None),
    ];
    for (token, (kind, expected)) in cases.into_iter().enumerate() {
        client.submit_malformed(kind, buffer, token as u64)?;
        let completion = complete_one(&mut client, &mut done)?;
        match expected {
            Some(status) => assert_eq!(completion.status, Some(status), "{kind:?}"),
            None => assert_eq!(completion.used_len, 0, "{kind:?}: returned unused"),
        }
        // After each one, a normal write and read still work.
        client.write_data(buffer, &[token as u8; 8192])?;
        client.submit(&Request {
            kind: RequestType::Out,
            sector: 0,
            data: &[buffer],
            token: 100,
        })?;
        assert!(
            complete_one(&mut client, &mut done)?.is_ok(),
            "write after {kind:?}"
        );
        client.write_data(buffer, &[0u8; 8192])?;
        client.submit(&Request {
            kind: RequestType::In,
            sector: 0,
            data: &[buffer],
            token: 101,
        })?;
        assert!(
            complete_one(&mut client, &mut done)?.is_ok(),
            "read after {kind:?}"
        );
        let mut back = vec![0u8; 8192];
        client.read_data(buffer, &mut back)?;
        assert!(
            back.iter().all(|&b| b == token as u8),
            "data after {kind:?}"
        );
    }
    let shown = node.fabctl_json(&["volume", "show", "hostile"])?;
    assert_eq!(
        shown["attachment"]["counters"]["invalid_requests"].as_u64(),
        Some(9),
        "{shown}"
    );
    assert_eq!(
        shown["attachment"]["counters"]["io_errors"].as_u64(),
        Some(0),
        "{shown}"
    );
    Ok(())
}

/// A block's contents: which block, which version, a checksum over both
/// and a filler derived from them.
fn block_contents(lba: u64, version: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK as usize];
    data[..8].copy_from_slice(b"FABRICv1");
    data[8..16].copy_from_slice(&lba.to_le_bytes());
    data[16..24].copy_from_slice(&version.to_le_bytes());
    let mut x = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version;
    for chunk in data[28..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let crc = crc32fast::hash(&data[28..]);
    data[24..28].copy_from_slice(&crc.to_le_bytes());
    data
}

/// Decodes a block: `Some(version)` if intact and for `lba`, `None` if all
/// zeros (never written); an error for anything else (torn or foreign).
fn decode_block(lba: u64, data: &[u8]) -> Result<Option<u64>> {
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    ensure!(&data[..8] == b"FABRICv1", "block {lba}: no magic");
    let found_lba = u64::from_le_bytes(data[8..16].try_into()?);
    ensure!(found_lba == lba, "block {lba}: holds block {found_lba}");
    let version = u64::from_le_bytes(data[16..24].try_into()?);
    let crc = u32::from_le_bytes(data[24..28].try_into()?);
    ensure!(
        crc == crc32fast::hash(&data[28..]),
        "block {lba} version {version}: torn contents"
    );
    Ok(Some(version))
}

/// Writes versioned blocks at queue depth 16 with a FLUSH every 64 writes,
/// `kill -9`s fabricd mid-stream, restarts it and reads every block back:
/// each must be intact, and at least as new as the last version a
/// completed FLUSH covered.
#[test]
fn kill9_mid_write_keeps_every_flushed_block() -> Result<()> {
    const BLOCKS: u64 = 2048;
    const DEPTH: usize = 16;
    let dir = tempfile::tempdir()?;
    let mut node = Fabricd::start(dir.path())?;
    let socket = node.create_attached_volume("crash", "16M")?;
    let mut client = BlkClient::connect(&socket, &ClientConfig::default())?;

    // durable[lba]: newest version a completed FLUSH covers.
    // completed[lba]: newest version whose write completed.
    let mut durable: HashMap<u64, u64> = HashMap::new();
    let mut completed: HashMap<u64, u64> = HashMap::new();
    let mut written_max: HashMap<u64, u64> = HashMap::new();
    // In flight: token -> (lba, version) for writes, or the snapshot of
    // completed writes a FLUSH covers.
    let mut writes: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut flushes: HashMap<u64, HashMap<u64, u64>> = HashMap::new();
    let mut slots: Vec<Buffer> = (0..DEPTH)
        .map(|i| client.data_buffer(i as u64 * BLOCK, BLOCK as u32))
        .collect::<Result<_, _>>()?;
    let flush_buffer: [Buffer; 0] = [];
    let mut token = 0u64;
    let mut rng = 0x1234_5678_u64;
    let mut done = Vec::new();
    let mut flushes_completed = 0;
    let started = Instant::now();
    let kill_after = Duration::from_millis(1500);
    let mut free_slots: Vec<Buffer> = std::mem::take(&mut slots);
    let mut slot_of: HashMap<u64, Buffer> = HashMap::new();
    loop {
        while let Some(buffer) = free_slots.pop() {
            token += 1;
            if token % 64 == 0 {
                flushes.insert(token, completed.clone());
                client.submit(&Request {
                    kind: RequestType::Flush,
                    sector: 0,
                    data: &flush_buffer,
                    token,
                })?;
                free_slots.push(buffer);
                continue;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Never two writes to one block at once: virtio leaves their
            // order undefined, so the test could not know which one wins.
            let lba = rng % BLOCKS;
            if writes.values().any(|&(busy, _)| busy == lba) {
                free_slots.push(buffer);
                continue;
            }
            let version = token;
            client.write_data(buffer, &block_contents(lba, version))?;
            client.submit(&Request {
                kind: RequestType::Out,
                sector: lba * 8,
                data: &[buffer],
                token,
            })?;
            writes.insert(token, (lba, version));
            written_max.insert(lba, version);
            slot_of.insert(token, buffer);
        }
        if started.elapsed() > kill_after && flushes_completed >= 3 {
            break;
        }
        done.clear();
        client.wait_completions(&mut done, WAIT)?;
        for completion in &done {
            ensure!(
                completion.is_ok(),
                "request {} failed: {:?}",
                completion.token,
                completion.status
            );
            if let Some((lba, version)) = writes.remove(&completion.token) {
                let newest = completed.entry(lba).or_insert(0);
                *newest = (*newest).max(version);
                free_slots.push(slot_of.remove(&completion.token).context("slot")?);
            } else if let Some(covered) = flushes.remove(&completion.token) {
                for (lba, version) in covered {
                    let floor = durable.entry(lba).or_insert(0);
                    *floor = (*floor).max(version);
                }
                flushes_completed += 1;
            }
        }
    }
    // Requests are still in flight at this moment.
    ensure!(!writes.is_empty(), "the kill must land mid-write");
    node.kill9()?;
    drop(client);
    node.restart()?;

    let mut client = BlkClient::connect(&socket, &ClientConfig::default())?;
    let buffer = client.data_buffer(0, BLOCK as u32)?;
    let mut data = vec![0u8; BLOCK as usize];
    let mut newer_than_flushed = 0;
    for lba in 0..BLOCKS {
        client.submit(&Request {
            kind: RequestType::In,
            sector: lba * 8,
            data: &[buffer],
            token: lba,
        })?;
        let completion = complete_one(&mut client, &mut done)?;
        if !completion.is_ok() {
            bail!(
                "block {lba} unreadable after restart: {:?}",
                completion.status
            );
        }
        client.read_data(buffer, &mut data)?;
        let found = decode_block(lba, &data)?;
        let floor = durable.get(&lba).copied();
        match (found, floor) {
            (None, Some(floor)) => bail!("block {lba}: flushed version {floor} lost"),
            (Some(version), Some(floor)) if version < floor => {
                bail!("block {lba}: version {version} is older than flushed version {floor}")
            }
            (Some(version), _) => {
                ensure!(
                    Some(&version) <= written_max.get(&lba),
                    "block {lba}: version {version} was never written"
                );
                if floor.is_none_or(|floor| version > floor) {
                    newer_than_flushed += 1;
                }
            }
            (None, None) => {}
        }
    }
    eprintln!(
        "{} blocks flushed before the kill, {} read back newer than their flushed version, {flushes_completed} flushes",
        durable.len(),
        newer_than_flushed
    );
    ensure!(
        durable.len() > 100,
        "too few flushed blocks ({}) for a meaningful check",
        durable.len()
    );
    Ok(())
}

/// More reads of never-written blocks in flight than the device takes at
/// once (64 MiB): they finish without any I/O, so no completion event
/// comes for them. Every one still completes, in order, with zeros.
#[test]
fn reads_that_need_no_io_all_complete_past_the_in_flight_limit() -> Result<()> {
    const READ_BYTES: u32 = 1 << 20;
    const READS: u64 = 96;
    let dir = tempfile::tempdir()?;
    let node = Fabricd::start(dir.path())?;
    let socket = node.create_attached_volume("zeros", "128M")?;
    let config = ClientConfig {
        queue_size: 512,
        data_bytes: (READS as usize) * READ_BYTES as usize,
    };
    let mut client = BlkClient::connect(&socket, &config)?;
    let buffers = (0..READS)
        .map(|i| client.data_buffer(i * u64::from(READ_BYTES), READ_BYTES))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, buffer) in buffers.iter().enumerate() {
        client.write_data(*buffer, &vec![0xa5; READ_BYTES as usize])?;
        client.submit(&Request {
            kind: RequestType::In,
            sector: i as u64 * u64::from(READ_BYTES) / 512,
            data: std::slice::from_ref(buffer),
            token: i as u64,
        })?;
    }
    client.notify()?;
    let mut done = Vec::new();
    let deadline = Instant::now() + WAIT;
    while done.len() < READS as usize && Instant::now() < deadline {
        let mut more = Vec::new();
        client.wait_completions(&mut more, Duration::from_secs(1))?;
        done.extend(more);
    }
    ensure!(
        done.len() == READS as usize,
        "{} of {READS} reads completed",
        done.len()
    );
    for (i, completion) in done.iter().enumerate() {
        ensure!(completion.token == i as u64, "out of order: {done:?}");
        ensure!(completion.is_ok(), "read {i}: {completion:?}");
        let mut data = vec![0xffu8; READ_BYTES as usize];
        client.read_data(buffers[i], &mut data)?;
        ensure!(data.iter().all(|&b| b == 0), "read {i} is not zeros");
    }
    Ok(())
}

/// Ring entries naming a head past the queue, or one already in flight,
/// are counted and left unanswered; the requests around them complete and
/// the device keeps serving.
#[test]
fn bare_heads_out_of_range_or_in_flight_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Fabricd::start(dir.path())?;
    let socket = node.create_attached_volume("heads", "64M")?;
    let mut client = BlkClient::connect(&socket, &ClientConfig::default())?;
    let buffer = client.data_buffer(0, BLOCK as u32)?;
    let mut done = Vec::new();
    let size = client.queue_size();
    client.submit_bare_head(size)?;
    client.submit_bare_head(u16::MAX)?;
    // A write, and its own head again right behind it, before the device
    // has answered either.
    let head = client.next_head().context("a free descriptor")?;
    client.write_data(buffer, &[7u8; BLOCK as usize])?;
    client.submit(&Request {
        kind: RequestType::Out,
        sector: 0,
        data: &[buffer],
        token: 1,
    })?;
    client.submit_bare_head(head)?;
    client.notify()?;
    let completion = complete_one(&mut client, &mut done)?;
    ensure!(
        completion.token == 1 && completion.is_ok(),
        "{completion:?}"
    );
    // Nothing else comes back (the client refuses an answer it did not ask
    // for), and a read still works.
    client.write_data(buffer, &[0u8; BLOCK as usize])?;
    client.submit(&Request {
        kind: RequestType::In,
        sector: 0,
        data: &[buffer],
        token: 2,
    })?;
    client.notify()?;
    let completion = complete_one(&mut client, &mut done)?;
    ensure!(
        completion.token == 2 && completion.is_ok(),
        "{completion:?}"
    );
    let mut back = vec![0u8; BLOCK as usize];
    client.read_data(buffer, &mut back)?;
    ensure!(back.iter().all(|&b| b == 7), "the write's data reads back");
    let shown = node.fabctl_json(&["volume", "show", "heads"])?;
    ensure!(
        shown["attachment"]["counters"]["invalid_requests"].as_u64() == Some(3),
        "{shown}"
    );
    Ok(())
}
