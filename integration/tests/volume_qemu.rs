//! Volumes served by a real `fabricd` to real QEMU guests (TCG).
//!
//! Each test asserts on what the guest printed on its console, not only on
//! its exit status.

use std::time::Duration;

use anyhow::Result;
use integration::fabricd::Fabricd;
use integration::guest::{Guest, GuestConfig, GuestImage, GuestRun};

/// Guest writes 4 MiB of random data at 8 MiB with fsync (a FLUSH), reads
/// it back after dropping caches, discards 1 MiB at 1 MiB and reads zeros,
/// checks the disk serial and queue count, and runs fio with crc32c
/// verification on a range that does not overlap the pattern.
const FIRST_RUN: &str = r#"
set -u
serial=$(cat /sys/block/${DISK#/dev/}/serial)
queues=$(ls /sys/block/${DISK#/dev/}/mq | wc -l)
lbs=$(cat /sys/block/${DISK#/dev/}/queue/logical_block_size)
echo "CHECK serial $serial queues $queues lbs $lbs"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
dd if=/tmp/pattern of=$DISK bs=1M seek=8 count=4 conv=fsync 2>/dev/null || echo "CHECK write FAILED"
echo 3 > /proc/sys/vm/drop_caches
dd if=$DISK of=/tmp/back bs=1M skip=8 count=4 2>/dev/null
want=$(md5sum < /tmp/pattern | cut -d' ' -f1)
got=$(md5sum < /tmp/back | cut -d' ' -f1)
echo "CHECK pattern-md5 $want"
[ "$want" = "$got" ] && echo "CHECK readback ok" || echo "CHECK readback FAILED $got"
dd if=/dev/urandom of=$DISK bs=1M seek=1 count=1 conv=fsync 2>/dev/null
blkdiscard -o 1048576 -l 1048576 $DISK && echo "CHECK blkdiscard ran"
zeros=$(dd if=/dev/zero bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)
echo 3 > /proc/sys/vm/drop_caches
disc=$(dd if=$DISK bs=1M skip=1 count=1 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$zeros" = "$disc" ] && echo "CHECK discard-zeros ok" || echo "CHECK discard-zeros FAILED"
fio --name=verify --filename=$DISK --offset=32M --size=24M --rw=randwrite --bs=4k \
    --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --numjobs=1 --group_reporting > /tmp/fio.out 2>&1
status=$?
grep -E "err=|verify" /tmp/fio.out | head -5
[ $status -eq 0 ] && grep -q "err= 0" /tmp/fio.out && echo "CHECK fio-verify ok" || { cat /tmp/fio.out; echo "CHECK fio-verify FAILED"; }
"#;

/// After `kill -9` of fabricd and a restart: the flushed pattern is intact.
const SECOND_RUN: &str = r#"
dd if=$DISK of=/tmp/back bs=1M skip=8 count=4 2>/dev/null
echo "CHECK after-restart-md5 $(md5sum < /tmp/back | cut -d' ' -f1)"
"#;

fn check_line<'a>(run: &'a GuestRun, prefix: &str) -> &'a str {
    run.lines()
        .find_map(|line| line.trim().strip_prefix(prefix))
        .unwrap_or_else(|| {
            panic!(
                "guest printed no {prefix:?} line; console tail:\n{}",
                run.tail(40)
            )
        })
        .trim()
}

#[test]
fn guest_io_discard_fio_and_kill9_restart() -> Result<()> {
    let image = GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let mut node = Fabricd::start(dir.path())?;
    let socket = node.create_attached_volume("disk1", "256M")?;
    let id = node.fabctl_json(&["volume", "show", "disk1"])?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let config = GuestConfig {
        vhost_user_blk_sockets: vec![socket.clone()],
        script: FIRST_RUN.into(),
        vcpus: 2,
        num_queues: Some(2),
        timeout: Duration::from_secs(240),
        ..GuestConfig::default()
    };
    let first = Guest::run(&image, &config)?;
    assert_eq!(
        check_line(&first, "CHECK serial"),
        format!("{id} queues 2 lbs 4096")
    );
    assert!(first.has_line("CHECK readback ok"), "{}", first.tail(40));
    assert!(first.has_line("CHECK blkdiscard ran"), "{}", first.tail(40));
    assert!(
        first.has_line("CHECK discard-zeros ok"),
        "{}",
        first.tail(40)
    );
    assert!(first.has_line("CHECK fio-verify ok"), "{}", first.tail(40));
    assert!(!first.serial.contains("FAILED"), "{}", first.tail(40));
    let pattern = check_line(&first, "CHECK pattern-md5").to_owned();

    let shown = node.fabctl_json(&["volume", "show", "disk1"])?;
    let counters = &shown["attachment"]["counters"];
    assert!(
        counters["flushes"].as_u64() > Some(0),
        "the guest's fsync must reach us as FLUSH: {shown}"
    );
    assert!(counters["discards"].as_u64() > Some(0), "{shown}");
    assert_eq!(counters["io_errors"].as_u64(), Some(0), "{shown}");
    // Thin: 256 MiB volume, about 4 + 24 MiB written (1 MiB discarded).
    let allocated = shown["usage"]["allocated_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(allocated < 40 << 20, "allocated {allocated} bytes");

    // kill -9: no shutdown, no final commit. Only what was flushed counts.
    node.kill9()?;
    node.restart()?;
    let second = Guest::run(
        &image,
        &GuestConfig {
            script: SECOND_RUN.into(),
            vcpus: 1,
            num_queues: None,
            ..config
        },
    )?;
    assert_eq!(
        check_line(&second, "CHECK after-restart-md5"),
        pattern,
        "flushed data lost across kill -9"
    );
    node.terminate()?;
    Ok(())
}

/// QEMU killed while fio writes: fabricd keeps serving, the socket takes the
/// next QEMU, and that guest reads and writes normally.
#[test]
fn qemu_killed_mid_write_then_new_frontend() -> Result<()> {
    let image = GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let node = Fabricd::start(dir.path())?;
    let socket = node.create_attached_volume("disk2", "128M")?;
    let busy = GuestConfig {
        vhost_user_blk_sockets: vec![socket.clone()],
        script: r#"
echo "CHECK running"
fio --name=w --filename=$DISK --size=64M --rw=randwrite --bs=64k --ioengine=libaio \
    --iodepth=16 --direct=1 --time_based --runtime=60 > /dev/null 2>&1
echo "CHECK fio finished"
"#
        .into(),
        timeout: Duration::from_secs(120),
        ..GuestConfig::default()
    };
    let mut guest = Guest::spawn(&image, &busy)?;
    guest.wait_for_serial("CHECK running", Duration::from_secs(90))?;
    // Killed once fio's writes are reaching the volume (under emulation,
    // on a busy machine, fio may take a while to start).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let shown = loop {
        let shown = node.fabctl_json(&["volume", "show", "disk2"])?;
        let writing = shown["attachment"]["counters"]["writes"].as_u64() > Some(0);
        if writing || std::time::Instant::now() >= deadline {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = guest.kill()?;
    assert!(!console.contains("CHECK fio finished"));
    assert!(
        shown["attachment"]["counters"]["writes"].as_u64() > Some(0),
        "fio wrote nothing: {shown}"
    );

    let fresh = GuestConfig {
        script: r#"
dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
dd if=/tmp/p of=$DISK bs=64k count=16 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=$DISK of=/tmp/b bs=64k count=16 2>/dev/null
cmp /tmp/p /tmp/b && echo "CHECK second-frontend ok"
"#
        .into(),
        ..busy
    };
    let run = Guest::run(&image, &fresh)?;
    assert!(run.has_line("CHECK second-frontend ok"), "{}", run.tail(40));
    let shown = node.fabctl_json(&["volume", "show", "disk2"])?;
    assert_eq!(
        shown["attachment"]["counters"]["io_errors"].as_u64(),
        Some(0),
        "{shown}"
    );
    Ok(())
}
