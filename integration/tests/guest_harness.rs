//! End-to-end check of the QEMU guest harness against a vhost-user-blk
//! backend that is not ours: qemu-storage-daemon exporting a raw file.
//!
//! The guest writes a pattern, reads it back after dropping its caches,
//! discards a range and reads zeros from it, and runs fio with crc32c
//! verification. The host then checks the same bytes in the backing file.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use integration::guest::{Guest, GuestConfig, GuestImage};

const MIB: u64 = 1024 * 1024;
const DISK_SIZE: u64 = 256 * MIB;
/// Where the guest writes its pattern, and how much.
const PATTERN_OFFSET: u64 = 8 * MIB;
const PATTERN_LEN: u64 = 4 * MIB;
/// The guest fills this range, then discards it.
const DISCARD_OFFSET: u64 = MIB;
const DISCARD_LEN: u64 = MIB;
const PATTERN_WORD: &str = "FABRIC-PATTERN";

/// QEMU under TCG takes a whole core; run one guest at a time so that the
/// timings printed are not skewed by the other tests of this file.
static ONE_GUEST_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serialize() -> MutexGuard<'static, ()> {
    ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// qemu-storage-daemon exporting one file over vhost-user-blk; killed on drop.
struct StorageDaemon {
    child: Child,
}

impl StorageDaemon {
    fn start(image: &Path, socket: &Path) -> Result<Self> {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={},discard=unmap",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .context("starting qemu-storage-daemon (scripts/install-deps.sh installs it)")?;
        let mut daemon = StorageDaemon { child };
        let until = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("qemu-storage-daemon exited early: {status}");
            }
            if Instant::now() >= until {
                bail!("qemu-storage-daemon did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn guest_script() -> String {
    format!(
        r#"
set -u
fail=0
echo "disk $DISK sectors=$(cat /sys/block/${{DISK#/dev/}}/size) discard_max=$(cat /sys/block/${{DISK#/dev/}}/queue/discard_max_bytes)"

# 1. Pattern: write, drop the page cache, read back through the cache and with O_DIRECT.
yes {word} | head -c {plen} > /tmp/pattern
want=$(md5sum < /tmp/pattern | cut -d' ' -f1)
dd if=/tmp/pattern of="$DISK" bs=1M seek={pseek} conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if="$DISK" bs=1M skip={pseek} count={pcount} 2>/dev/null | md5sum | cut -d' ' -f1)
direct=$(dd if="$DISK" bs=1M skip={pseek} count={pcount} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
if [ "$got" = "$want" ] && [ "$direct" = "$want" ]; then
    echo "CHECK pattern ok md5=$got"
else
    echo "CHECK pattern FAIL want=$want cached=$got direct=$direct"; fail=1
fi

# 2. Discard: fill the range, discard it, expect zeros.
yes {word} | head -c {dlen} | dd of="$DISK" bs=1M seek={dseek} conv=fsync 2>/dev/null
zero=$(head -c {dlen} /dev/zero | md5sum | cut -d' ' -f1)
before=$(dd if="$DISK" bs=1M skip={dseek} count={dcount} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
if blkdiscard -o {doff} -l {dlen} "$DISK"; then
    echo 3 > /proc/sys/vm/drop_caches
    after=$(dd if="$DISK" bs=1M skip={dseek} count={dcount} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$before" != "$zero" ] && [ "$after" = "$zero" ]; then
        echo "CHECK discard ok"
    else
        echo "CHECK discard FAIL before=$before after=$after zero=$zero"; fail=1
    fi
else
    echo "CHECK discard FAIL blkdiscard exited $?"; fail=1
fi

# 3. fio with crc32c verification, away from the ranges above.
start=$(cut -d' ' -f1 /proc/uptime)
if fio --name=verify --filename="$DISK" --offset=64M --size=24M --rw=randwrite --bs=4k \
    --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --randrepeat=0 > /tmp/fio.out 2>&1 \
    && ! grep -q 'verify: bad' /tmp/fio.out; then
    echo "CHECK fio ok seconds=$start..$(cut -d' ' -f1 /proc/uptime)"
else
    echo "CHECK fio FAIL"; fail=1
fi
grep -E 'err=|READ:|WRITE:' /tmp/fio.out
exit $fail
"#,
        word = PATTERN_WORD,
        plen = PATTERN_LEN,
        pseek = PATTERN_OFFSET / MIB,
        pcount = PATTERN_LEN / MIB,
        doff = DISCARD_OFFSET,
        dlen = DISCARD_LEN,
        dseek = DISCARD_OFFSET / MIB,
        dcount = DISCARD_LEN / MIB,
    )
}

fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; usize::try_from(len)?];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

fn pattern_bytes(len: u64) -> Vec<u8> {
    let line = format!("{PATTERN_WORD}\n");
    line.bytes()
        .cycle()
        .take(usize::try_from(len).expect("small"))
        .collect()
}

#[test]
fn guest_does_io_through_qemu_storage_daemon() -> Result<()> {
    let _one = serialize();
    let t0 = Instant::now();
    let image = GuestImage::ensure()?;
    eprintln!(
        "guest image ready in {:?}: {}",
        t0.elapsed(),
        image.dir.display()
    );

    let dir = tempfile::tempdir()?;
    let disk: PathBuf = dir.path().join("disk.raw");
    File::create(&disk)?.set_len(DISK_SIZE)?;
    let socket = dir.path().join("vhost-user-blk.sock");
    let _daemon = StorageDaemon::start(&disk, &socket)?;

    let run = Guest::run(
        &image,
        &GuestConfig {
            vhost_user_blk_sockets: vec![socket],
            script: guest_script(),
            memory_mib: 256,
            vcpus: 1,
            num_queues: Some(1),
            timeout: Duration::from_secs(180),
            ..GuestConfig::default()
        },
    )?;
    eprintln!("{}", run.serial);
    eprintln!(
        "guest boot {:?}, whole run {:?}, exit {}",
        run.boot_time, run.elapsed, run.exit_code
    );

    for check in ["CHECK pattern ok", "CHECK discard ok", "CHECK fio ok"] {
        assert!(
            run.has_line(check),
            "missing {check:?}; tail:\n{}",
            run.tail(30)
        );
    }
    assert!(!run.has_line("FAIL"), "a check failed:\n{}", run.tail(30));
    assert!(
        run.has_line("err= 0"),
        "fio reported an error:\n{}",
        run.tail(30)
    );
    assert_eq!(run.exit_code, 0);

    // The same bytes, seen from the host in the backing file.
    assert!(
        read_range(&disk, PATTERN_OFFSET, PATTERN_LEN)? == pattern_bytes(PATTERN_LEN),
        "the backing file does not hold the guest's pattern"
    );
    assert!(
        read_range(&disk, DISCARD_OFFSET, DISCARD_LEN)?
            .iter()
            .all(|&b| b == 0),
        "the discarded range is not zero in the backing file"
    );
    fs::remove_file(&disk)?;
    Ok(())
}

#[test]
fn guest_timeout_kills_qemu_and_quotes_the_console() -> Result<()> {
    let _one = serialize();
    let image = GuestImage::ensure()?;
    let err = Guest::run(
        &image,
        &GuestConfig {
            script: "echo about-to-hang; sleep 1000".into(),
            timeout: Duration::from_secs(15),
            ..GuestConfig::default()
        },
    )
    .expect_err("the guest sleeps past its timeout");
    let msg = format!("{err:#}");
    assert!(msg.contains("timed out"), "{msg}");
    assert!(msg.contains("about-to-hang"), "{msg}");
    Ok(())
}

#[test]
fn guest_can_be_killed_mid_run() -> Result<()> {
    let _one = serialize();
    let image = GuestImage::ensure()?;
    let mut guest = Guest::spawn(
        &image,
        &GuestConfig {
            script: "echo running; fio --version; while :; do sleep 1; done".into(),
            timeout: Duration::from_secs(60),
            ..GuestConfig::default()
        },
    )?;
    guest.wait_for_serial("running", Duration::from_secs(60))?;
    guest.wait_for_serial("fio-", Duration::from_secs(30))?;
    let serial = guest.kill()?;
    assert!(!guest.is_running()?);
    assert!(serial.contains("FABRIC-GUEST: boot ok"), "{serial}");
    assert!(!serial.contains("FABRIC-GUEST: test exit"), "{serial}");
    Ok(())
}

#[test]
fn qemu_errors_are_reported() -> Result<()> {
    let image = GuestImage::ensure()?;
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nobody-listens.sock");
    let err = Guest::run(
        &image,
        &GuestConfig {
            vhost_user_blk_sockets: vec![missing.clone()],
            script: "true".into(),
            timeout: Duration::from_secs(30),
            ..GuestConfig::default()
        },
    )
    .expect_err("QEMU cannot connect to a socket nobody listens on");
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(msg.contains("QEMU exited"), "{msg}");
    assert!(msg.contains("QEMU stderr"), "{msg}");
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    Ok(())
}
