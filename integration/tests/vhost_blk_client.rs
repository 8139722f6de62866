//! The vhost-user-blk client against a real peer: qemu-storage-daemon exporting a raw file.
//!
//! These tests need `qemu-storage-daemon` on PATH; without it they fail rather than skip.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::blk_workload::{self, CompletionMode, VerifyOptions};
use integration::storage_daemon::QemuStorageDaemon;
use integration::vhost_blk::{
    BlkClient, ClientConfig, Malformed, Request, RequestType, Status, DEVICE_ID_BYTES,
};

const IMAGE_BYTES: u64 = 256 << 20;
const WAIT: Duration = Duration::from_secs(10);

fn start_peer(dir: &Path) -> QemuStorageDaemon {
    QemuStorageDaemon::start(
        "qemu-storage-daemon",
        &dir.join("disk.raw"),
        IMAGE_BYTES,
        &dir.join("vhost.sock"),
        &dir.join("qsd.log"),
    )
    .expect("qemu-storage-daemon starts and exports the image")
}

/// Submits one request and returns its completion.
fn complete(client: &mut BlkClient, request: &Request<'_>) -> integration::vhost_blk::Completion {
    client.submit(request).expect("submit");
    let mut done = Vec::new();
    client.wait_completions(&mut done, WAIT).expect("wait");
    assert_eq!(done.len(), 1, "exactly the one request completes");
    assert_eq!(done[0].token, request.token);
    done[0]
}

#[test]
fn verify_passes_against_qemu_storage_daemon() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let peer = start_peer(dir.path());
    let mut client =
        BlkClient::connect(peer.socket(), &ClientConfig::default()).expect("client connects");
    assert_eq!(client.capacity_bytes(), IMAGE_BYTES);

    for completion in [CompletionMode::Interrupt, CompletionMode::Poll] {
        let report = blk_workload::verify(
            &mut client,
            &VerifyOptions {
                duration: Duration::from_secs(3),
                span_bytes: 32 << 20,
                completion,
                seed: 7,
                queue_depth: 32,
            },
        )
        .expect("every block reads back as written");
        let blocks = (32 << 20) / 4096;
        assert!(report.passes >= 1);
        assert_eq!(report.blocks_read, u64::from(report.passes) * blocks);
        assert!(report.blocks_written >= blocks);
        assert_eq!(report.flushes, u64::from(report.passes));
    }
    assert_eq!(client.in_flight(), 0);
    peer.stop().expect("qemu-storage-daemon stops on SIGTERM");
}

#[test]
fn blkbench_verify_command_passes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let peer = start_peer(dir.path());
    let output = Command::new(env!("CARGO_BIN_EXE_blkbench"))
        .arg("--socket")
        .arg(peer.socket())
        .args([
            "--workload",
            "verify",
            "--seconds",
            "2",
            "--span",
            "16M",
            "--json",
        ])
        .output()
        .expect("blkbench runs");
    assert!(
        output.status.success(),
        "blkbench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON output");
    let passes = json["verify"][0]["passes"].as_u64().expect("passes field");
    assert!(passes >= 1);
}

#[test]
fn edge_requests_get_the_statuses_the_spec_names() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let peer = start_peer(dir.path());
    let mut client =
        BlkClient::connect(peer.socket(), &ClientConfig::default()).expect("client connects");
    let buffer = client.data_buffer(0, 4096).expect("buffer");
    let capacity = client.capacity_sectors();

    // Well-formed chains the device must refuse, each answered with a status.
    for (kind, want) in [
        (Malformed::UnknownType, Status::Unsupp),
        (Malformed::SectorOutOfRange, Status::IoErr),
        (Malformed::SectorStraddlesEnd, Status::IoErr),
    ] {
        client.submit_malformed(kind, buffer, 9).expect("submit");
        let mut done = Vec::new();
        client.wait_completions(&mut done, WAIT).expect("wait");
        assert_eq!(done.len(), 1, "{kind:?} completes");
        assert_eq!(done[0].status, Some(want), "{kind:?}");
    }
    let read_past_end = complete(
        &mut client,
        &Request {
            kind: RequestType::In,
            sector: capacity - 1,
            data: &[buffer],
            token: 10,
        },
    );
    assert_eq!(read_past_end.status, Some(Status::IoErr));

    // A write, then write-zeroes over it, reads back as zeroes; the device keeps serving.
    client.write_data(buffer, &[0x5a; 4096]).expect("fill");
    let write = complete(
        &mut client,
        &Request {
            kind: RequestType::Out,
            sector: 8,
            data: &[buffer],
            token: 11,
        },
    );
    assert!(write.is_ok());
    let zeroes = complete(
        &mut client,
        &Request {
            kind: RequestType::WriteZeroes {
                sectors: 8,
                unmap: false,
            },
            sector: 8,
            data: &[],
            token: 12,
        },
    );
    assert!(zeroes.is_ok(), "write-zeroes: {:?}", zeroes.status);
    client.write_data(buffer, &[0xff; 4096]).expect("poison");
    let read = complete(
        &mut client,
        &Request {
            kind: RequestType::In,
            sector: 8,
            data: &[buffer],
            token: 13,
        },
    );
    assert!(read.is_ok());
    let mut bytes = vec![0xffu8; 4096];
    client.read_data(buffer, &mut bytes).expect("read back");
    assert!(
        bytes.iter().all(|byte| *byte == 0),
        "write-zeroes left data"
    );

    let discard = complete(
        &mut client,
        &Request {
            kind: RequestType::Discard { sectors: 8 },
            sector: 8,
            data: &[],
            token: 14,
        },
    );
    assert!(discard.is_ok(), "discard: {:?}", discard.status);
    let flush = complete(
        &mut client,
        &Request {
            kind: RequestType::Flush,
            sector: 0,
            data: &[],
            token: 15,
        },
    );
    assert!(flush.is_ok());

    let id_buffer = client
        .data_buffer(8192, DEVICE_ID_BYTES)
        .expect("id buffer");
    let id = complete(
        &mut client,
        &Request {
            kind: RequestType::GetId,
            sector: 0,
            data: &[id_buffer],
            token: 16,
        },
    );
    assert!(id.is_ok());
    let mut serial = [0u8; DEVICE_ID_BYTES as usize];
    client.read_data(id_buffer, &mut serial).expect("id");
    assert!(serial.iter().any(|byte| *byte != 0), "the device has an id");

    assert_eq!(client.in_flight(), 0);
    peer.stop().expect("qemu-storage-daemon stops on SIGTERM");
}

#[test]
fn verify_reports_blocks_changed_behind_its_back() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().expect("temporary directory");
    let peer = start_peer(dir.path());
    let mut client =
        BlkClient::connect(peer.socket(), &ClientConfig::default()).expect("client connects");
    // O_DIRECT like the backend, so the two writers never meet in the page cache (the kernel
    // reports such a collision as an I/O error on the next flush).
    let image = std::fs::File::options()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.path().join("disk.raw"))
        .expect("image opens");
    let staging = vec![0xeeu8; 8192];
    let aligned = staging.as_ptr().align_offset(4096);
    let garbage = &staging[aligned..aligned + 4096];
    let victim = 8u64 << 20;
    let finished = AtomicBool::new(false);

    let outcome = std::thread::scope(|scope| {
        // Overwrite one block of the image directly, again and again, while verify runs.
        scope.spawn(|| {
            while !finished.load(Ordering::Relaxed) {
                image.write_at(garbage, victim).expect("corrupt the image");
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let outcome = blk_workload::verify(
            &mut client,
            &VerifyOptions {
                duration: Duration::from_secs(5),
                span_bytes: 16 << 20,
                completion: CompletionMode::Interrupt,
                seed: 3,
                queue_depth: 8,
            },
        );
        finished.store(true, Ordering::Relaxed);
        outcome
    });

    match outcome {
        Err(blk_workload::WorkloadError::Verify(failure)) => {
            assert!(failure.mismatches >= 1);
            let first = failure.details[0];
            assert_eq!(first.offset, victim, "{failure}");
            assert!(
                matches!(first.kind, blk_workload::MismatchKind::Magic { .. }),
                "{failure}"
            );
        }
        other => panic!("verify must fail on a corrupted block, got {other:?}"),
    }
    peer.stop().expect("qemu-storage-daemon stops on SIGTERM");
}
