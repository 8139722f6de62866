//! Boots a small Linux guest under QEMU (TCG) with vhost-user-blk disks and
//! runs a shell script inside it.
//!
//! The guest is built by `integration/guest/build.sh` (Debian's kernel, a
//! busybox initramfs, and a read-only tools disk holding `fio`). Each run
//! appends a cpio archive holding `/test.sh` to the base initramfs, boots
//! QEMU, and collects the serial console. The guest's `/init` prints marker
//! lines that this module parses:
//!
//! - `FABRIC-GUEST: boot ok uptime=SECONDS disks=... tools=...`
//! - `FABRIC-GUEST: test exit N uptime=SECONDS`
//!
//! Inside the script these variables are set:
//!
//! - `DISK`: the first vhost-user-blk disk (`/dev/vdX`), `DISK0`, `DISK1`, ...
//!   each disk in the order of [`GuestConfig::vhost_user_blk_sockets`],
//!   `DISKS` all of them separated by spaces, `NDISKS` their number;
//! - `TOOLS_DISK`: the tools disk, mounted read-only on `/tools`; `fio` is on
//!   `PATH` (`/tools/bin`).
//!
//! The disks are told apart by PCI address: vhost-user disk `i` sits in PCI
//! slot `0x08 + i`, the tools disk in slot `0x1f`, and the guest sorts its
//! `/sys/block/vd*` devices by the address of their PCI function.
//!
//! Environment: `FABRIC_CACHE` (image cache, default `~/.cache/fabric`),
//! `FABRIC_QEMU` (QEMU binary, default `qemu-system-x86_64`),
//! `FABRIC_GUEST_ECHO=1` (copy the serial console to stderr while it runs).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Marker printed by the guest's `/init` once the disks are ready.
pub const BOOT_MARKER: &str = "FABRIC-GUEST: boot ok";
/// Marker printed by the guest's `/init` after `/test.sh` returned, followed by its status.
pub const EXIT_MARKER: &str = "FABRIC-GUEST: test exit ";

/// Most vhost-user-blk disks one guest can have (PCI slots 0x08..=0x1e).
pub const MAX_DISKS: usize = 23;
/// Most vhost-user-net NICs one guest can have (PCI slots 0x04..=0x07).
pub const MAX_NICS: usize = 4;
const FIRST_NIC_SLOT: usize = 0x04;
const FIRST_DISK_SLOT: usize = 0x08;
const TOOLS_SLOT: usize = 0x1f;

/// Lines of serial output quoted in error messages.
const TAIL_LINES: usize = 40;

/// The built guest: kernel, initramfs and tools disk, in the cache directory.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Directory holding the files below.
    pub dir: PathBuf,
    /// Uncompressed kernel (ELF with a PVH entry point), booted with `-kernel`.
    pub vmlinux: PathBuf,
    /// The same kernel as a bzImage (slower to boot under TCG; kept for manual use).
    pub bzimage: PathBuf,
    /// Base initramfs (gzip'd cpio) without `/test.sh`.
    pub initramfs: PathBuf,
    /// Read-only ext2 image with fio and its libraries.
    pub tools_disk: PathBuf,
}

impl GuestImage {
    /// Builds the guest if needed (see `integration/guest/build.sh`) into
    /// `${FABRIC_CACHE:-$HOME/.cache/fabric}/guest` and returns its paths.
    /// The build script runs once per process; later calls return the same result.
    pub fn ensure() -> Result<GuestImage> {
        static BUILT: OnceLock<std::result::Result<GuestImage, String>> = OnceLock::new();
        BUILT
            .get_or_init(|| Self::ensure_in(&default_cache_dir()?).map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(|e| anyhow!(e))
    }

    /// Like [`GuestImage::ensure`], with an explicit output directory.
    pub fn ensure_in(dir: &Path) -> Result<GuestImage> {
        let script = build_script();
        let output = Command::new("bash")
            .arg(&script)
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!(
                "{} {} failed ({}):\n{}{}",
                script.display(),
                dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let image = GuestImage {
            dir: dir.to_path_buf(),
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
            tools_disk: dir.join("tools.ext2"),
        };
        for f in [
            &image.vmlinux,
            &image.bzimage,
            &image.initramfs,
            &image.tools_disk,
        ] {
            if !f.is_file() {
                bail!("{} did not produce {}", script.display(), f.display());
            }
        }
        Ok(image)
    }
}

fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh")
}

fn default_cache_dir() -> std::result::Result<PathBuf, String> {
    let base = match std::env::var_os("FABRIC_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").ok_or("neither FABRIC_CACHE nor HOME is set")?;
            PathBuf::from(home).join(".cache/fabric")
        }
    };
    Ok(base.join("guest"))
}

/// What to boot and run.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// One vhost-user-blk-pci device per socket (the backend listens on it).
    pub vhost_user_blk_sockets: Vec<PathBuf>,
    /// One virtio-net-pci NIC per (socket, MAC), on a vhost-user-net
    /// backend; the guest sees them as eth0, eth1, ... in this order.
    pub vhost_user_net: Vec<(PathBuf, String)>,
    /// Shell script run by busybox `sh` as `/test.sh`; its status becomes
    /// [`GuestRun::exit_code`]. Its output goes to the serial console.
    pub script: String,
    /// Guest memory (shared memfd, so the backends can map it).
    pub memory_mib: u32,
    /// Guest CPUs (`-smp`).
    pub vcpus: u32,
    /// `num-queues` of each vhost-user-blk-pci device; `None` leaves QEMU's default.
    pub num_queues: Option<u16>,
    /// Queue pairs of each virtio-net NIC (MQ, with QEMU's control
    /// queue); `None`: one pair.
    pub net_queue_pairs: Option<u16>,
    /// Wall-clock limit for the whole run, boot included; QEMU is killed after it.
    pub timeout: Duration,
    /// If set, QEMU reconnects to a vhost-user socket whose backend went away,
    /// retrying every this many seconds (`-chardev socket,...,reconnect=N`).
    pub reconnect_secs: Option<u32>,
    /// If set, QEMU serves QMP on this unix socket (see [`qmp`]).
    pub qmp_socket: Option<PathBuf>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            vhost_user_blk_sockets: Vec::new(),
            vhost_user_net: Vec::new(),
            script: String::new(),
            memory_mib: 256,
            vcpus: 1,
            num_queues: None,
            net_queue_pairs: None,
            timeout: Duration::from_secs(180),
            reconnect_secs: None,
            qmp_socket: None,
        }
    }
}

/// The outcome of a guest that ran its script to the end.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Everything the guest printed on its serial console (`\r` removed).
    pub serial: String,
    /// Exit status of `/test.sh`, from the `FABRIC-GUEST: test exit N` line.
    pub exit_code: i32,
    /// Wall-clock time from starting QEMU to its exit.
    pub elapsed: Duration,
    /// Wall-clock time from starting QEMU to the `FABRIC-GUEST: boot ok` line.
    pub boot_time: Option<Duration>,
}

impl GuestRun {
    /// Serial console lines.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.serial.lines()
    }

    /// Whether some serial line contains `needle`.
    pub fn has_line(&self, needle: &str) -> bool {
        self.lines().any(|l| l.contains(needle))
    }

    /// The last `n` serial lines, for messages.
    pub fn tail(&self, n: usize) -> String {
        tail_lines(&self.serial, n)
    }
}

/// Namespace for starting guests.
#[derive(Debug)]
pub struct Guest;

impl Guest {
    /// Boots the guest, runs `config.script`, waits for QEMU to exit and
    /// returns the serial log and the script's exit status. Fails if QEMU
    /// cannot start, exits without the exit marker, or exceeds `config.timeout`
    /// (it is then killed); the error quotes the end of the serial log.
    pub fn run(image: &GuestImage, config: &GuestConfig) -> Result<GuestRun> {
        Self::spawn(image, config)?.wait()
    }

    /// Starts QEMU and returns at once; the guest runs in the background.
    pub fn spawn(image: &GuestImage, config: &GuestConfig) -> Result<RunningGuest> {
        if config.vhost_user_blk_sockets.len() > MAX_DISKS {
            bail!("at most {MAX_DISKS} vhost-user-blk disks per guest");
        }
        if config.vhost_user_net.len() > MAX_NICS {
            bail!("at most {MAX_NICS} vhost-user-net NICs per guest");
        }
        if config.memory_mib == 0 || config.vcpus == 0 {
            bail!("memory_mib and vcpus must be positive");
        }
        let dir = tempfile::Builder::new()
            .prefix("fabric-guest-run.")
            .tempdir()
            .context("creating the run directory")?;
        let initrd = dir.path().join("initramfs.cpio.gz");
        write_initramfs(&image.initramfs, &config.script, &initrd)?;

        let qemu = std::env::var("FABRIC_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
        let args = qemu_args(image, config, &initrd);
        let started = Instant::now();
        let mut child = Command::new(&qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {qemu}"))?;

        let echo = std::env::var_os("FABRIC_GUEST_ECHO").is_some_and(|v| v != "0");
        let serial = Arc::new(Mutex::new(SerialLog::default()));
        let stdout = child.stdout.take().context("QEMU stdout")?;
        let stderr = child.stderr.take().context("QEMU stderr")?;
        let serial_reader = {
            let serial = Arc::clone(&serial);
            std::thread::spawn(move || read_serial(stdout, &serial, started, echo))
        };
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut stderr = stderr;
            let _ = stderr.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        });

        Ok(RunningGuest {
            child,
            serial,
            serial_reader: Some(serial_reader),
            stderr_reader: Some(stderr_reader),
            stderr: String::new(),
            status: None,
            started,
            deadline: started + config.timeout,
            timeout: config.timeout,
            qemu_command: shell_words(&qemu, &args),
            _dir: dir,
        })
    }
}

fn qemu_args(image: &GuestImage, config: &GuestConfig, initrd: &Path) -> Vec<String> {
    let mem = config.memory_mib;
    let mut args: Vec<String> = [
        "-accel",
        "tcg",
        "-nographic",
        "-nodefaults",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut push = |a: &str, b: String| {
        args.push(a.to_string());
        args.push(b);
    };
    push("-m", format!("{mem}M"));
    push("-smp", config.vcpus.to_string());
    if let Some(socket) = &config.qmp_socket {
        push(
            "-qmp",
            format!("unix:{},server=on,wait=off", opt_path(socket)),
        );
    }
    push(
        "-object",
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
    );
    push("-numa", "node,memdev=mem".into());
    push("-kernel", image.vmlinux.display().to_string());
    push("-initrd", initrd.display().to_string());
    push(
        "-append",
        format!(
            "console=ttyS0 quiet panic=-1 fabric.disks={} fabric.tools=0000:00:{TOOLS_SLOT:02x}.0",
            config.vhost_user_blk_sockets.len()
        ),
    );
    for (i, sock) in config.vhost_user_blk_sockets.iter().enumerate() {
        let mut chardev = format!("socket,id=vub{i},path={}", opt_path(sock));
        if let Some(secs) = config.reconnect_secs {
            chardev.push_str(&format!(",reconnect={secs}"));
        }
        push("-chardev", chardev);
        let mut device = format!(
            "vhost-user-blk-pci,chardev=vub{i},addr=0x{:02x}",
            FIRST_DISK_SLOT + i
        );
        if let Some(q) = config.num_queues {
            device.push_str(&format!(",num-queues={q}"));
        }
        push("-device", device);
    }
    for (i, (sock, mac)) in config.vhost_user_net.iter().enumerate() {
        let mut chardev = format!("socket,id=vun{i},path={}", opt_path(sock));
        if let Some(secs) = config.reconnect_secs {
            chardev.push_str(&format!(",reconnect={secs}"));
        }
        push("-chardev", chardev);
        let (queues, mq) = match config.net_queue_pairs {
            Some(pairs) => (format!(",queues={pairs}"), ",mq=on"),
            None => (String::new(), ""),
        };
        push(
            "-netdev",
            format!("vhost-user,chardev=vun{i},id=net{i}{queues}"),
        );
        push(
            "-device",
            format!(
                // INTx rather than MSI-X: QEMU 10 under TCG crashes in
                // vhost_net_start setting up MSI-X vector notifiers for a
                // vhost-user NIC (it has no irqfd there).
                "virtio-net-pci,netdev=net{i},mac={mac},addr=0x{:02x},vectors=0{mq}",
                FIRST_NIC_SLOT + i
            ),
        );
    }
    push(
        "-drive",
        format!(
            "file={},if=none,id=tools,format=raw,readonly=on",
            opt_path(&image.tools_disk)
        ),
    );
    push(
        "-device",
        format!("virtio-blk-pci,drive=tools,serial=fabric-tools,addr=0x{TOOLS_SLOT:02x}"),
    );
    args
}

/// A path inside a QEMU option value (`,` is doubled there).
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The command line as a shell would take it, for messages.
fn shell_words(program: &str, args: &[String]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        if a.contains([' ', '\'', '"']) {
            s.push_str(&format!("'{}'", a.replace('\'', r"'\''")));
        } else {
            s.push_str(a);
        }
    }
    s
}

/// Copies the base initramfs and appends an uncompressed newc cpio archive
/// holding `/test.sh`. The kernel unpacks concatenated archives in order; zero
/// bytes between them are skipped, and an uncompressed archive must start at a
/// multiple of 4 bytes, hence the padding.
fn write_initramfs(base: &Path, script: &str, out: &Path) -> Result<()> {
    let mut data = fs::read(base).with_context(|| format!("reading {}", base.display()))?;
    while data.len() % 4 != 0 {
        data.push(0);
    }
    let mut cpio = CpioWriter::default();
    cpio.file("test.sh", 0o100755, script.as_bytes());
    data.extend_from_slice(&cpio.finish());
    fs::write(out, &data).with_context(|| format!("writing {}", out.display()))
}

/// Minimal writer of the "newc" cpio format that the kernel's initramfs unpacker reads.
#[derive(Debug, Default)]
struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
}

impl CpioWriter {
    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        self.entry(name, mode, data);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            u32::try_from(data.len()).expect("cpio member below 4 GiB"),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            u32::try_from(name.len() + 1).expect("short cpio name"),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

#[derive(Debug, Default)]
struct SerialLog {
    bytes: Vec<u8>,
    boot_time: Option<Duration>,
}

fn read_serial(mut out: impl Read, log: &Mutex<SerialLog>, started: Instant, echo: bool) {
    let mut chunk = [0u8; 4096];
    loop {
        let n = match out.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if echo {
            let _ = std::io::stderr().write_all(&chunk[..n]);
        }
        let mut log = lock(log);
        let scan_from = log.bytes.len().saturating_sub(BOOT_MARKER.len());
        log.bytes.extend_from_slice(&chunk[..n]);
        if log.boot_time.is_none() && find(&log.bytes[scan_from..], BOOT_MARKER.as_bytes()) {
            log.boot_time = Some(started.elapsed());
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn clean_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\r', "")
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Parses the status from the `FABRIC-GUEST: test exit N` line. The marker may
/// follow other output on the same line (the console is shared with the kernel).
fn parse_exit_code(serial: &str) -> Option<i32> {
    serial.lines().rev().find_map(|line| {
        let rest = &line[line.find(EXIT_MARKER)? + EXIT_MARKER.len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// A QEMU process running a guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct RunningGuest {
    child: Child,
    serial: Arc<Mutex<SerialLog>>,
    serial_reader: Option<JoinHandle<()>>,
    stderr_reader: Option<JoinHandle<String>>,
    stderr: String,
    status: Option<ExitStatus>,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    qemu_command: String,
    // Holds the per-run initramfs; removed when the guest is dropped.
    _dir: tempfile::TempDir,
}

impl RunningGuest {
    /// Process id of QEMU.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The QEMU command line, for messages.
    pub fn qemu_command(&self) -> &str {
        &self.qemu_command
    }

    /// Serial output so far (`\r` removed).
    pub fn serial(&self) -> String {
        clean_text(&lock(&self.serial).bytes)
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        self.poll()?;
        Ok(self.status.is_none())
    }

    /// Waits until the serial output contains `needle`. Fails if QEMU exits
    /// first or `timeout` passes (QEMU is left running then).
    pub fn wait_for_serial(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        loop {
            if find(&lock(&self.serial).bytes, needle.as_bytes()) {
                return Ok(());
            }
            if !self.is_running()? {
                self.join_readers();
                if find(&lock(&self.serial).bytes, needle.as_bytes()) {
                    return Ok(());
                }
                bail!(
                    "QEMU exited ({}) before the guest printed {needle:?}\n{}",
                    self.status_text(),
                    self.context_for_error()
                );
            }
            if Instant::now() >= until {
                bail!(
                    "the guest did not print {needle:?} within {timeout:?}\n{}",
                    self.context_for_error()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills QEMU with SIGKILL (as `kill -9` would), reaps it and returns the
    /// serial output up to that point. Does nothing more if it already exited.
    pub fn kill(&mut self) -> Result<String> {
        self.poll()?;
        if self.status.is_none() {
            self.child.kill().context("killing QEMU")?;
            self.status = Some(self.child.wait().context("reaping QEMU")?);
        }
        self.join_readers();
        Ok(self.serial())
    }

    /// Waits for QEMU to exit (killing it at the configured timeout) and
    /// returns the run's outcome; fails if the guest did not print its exit marker.
    pub fn wait(mut self) -> Result<GuestRun> {
        loop {
            self.poll()?;
            if self.status.is_some() {
                break;
            }
            if Instant::now() >= self.deadline {
                let _ = self.kill();
                bail!(
                    "guest timed out after {:?}; QEMU killed\n{}",
                    self.timeout,
                    self.context_for_error()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let elapsed = self.started.elapsed();
        self.join_readers();
        let serial = self.serial();
        let Some(exit_code) = parse_exit_code(&serial) else {
            bail!(
                "QEMU exited ({}) without the guest's {EXIT_MARKER:?} line\n{}",
                self.status_text(),
                self.context_for_error()
            );
        };
        Ok(GuestRun {
            serial,
            exit_code,
            elapsed,
            boot_time: lock(&self.serial).boot_time,
        })
    }

    fn poll(&mut self) -> Result<()> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("waiting for QEMU")?;
        }
        Ok(())
    }

    fn join_readers(&mut self) {
        if let Some(h) = self.serial_reader.take() {
            let _ = h.join();
        }
        if let Some(h) = self.stderr_reader.take() {
            self.stderr = h.join().unwrap_or_default();
        }
    }

    fn status_text(&self) -> String {
        self.status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "still running".into())
    }

    fn context_for_error(&self) -> String {
        let mut s = format!(
            "--- last {TAIL_LINES} lines of the serial console ---\n{}\n",
            tail_lines(&self.serial(), TAIL_LINES)
        );
        if !self.stderr.trim().is_empty() {
            s.push_str(&format!(
                "--- QEMU stderr ---\n{}\n",
                self.stderr.trim_end()
            ));
        }
        s.push_str(&format!("--- QEMU command ---\n{}", self.qemu_command));
        s
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Builds the runner's guest program `name` (`vmrun/guest/NAME.c`, with
/// `vmrun/guest/build.sh`) into `dir`; returns the ELF's path.
pub fn vmrun_program(dir: &Path, name: &str) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmrun/guest/build.sh");
    let out = dir.join(format!("{name}.elf"));
    let status = Command::new("bash")
        .arg(&script)
        .arg(name)
        .arg(&out)
        .status()
        .context("running vmrun/guest/build.sh")?;
    anyhow::ensure!(status.success(), "building guest program {name}: {status}");
    Ok(out)
}

/// Runs one QMP command on QEMU's QMP socket (`GuestConfig::qmp_socket`)
/// and returns its `return` value; an `error` answer is an error.
pub fn qmp(socket: &Path, command: &serde_json::Value) -> Result<serde_json::Value> {
    use std::io::BufRead;
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to QMP at {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = std::io::BufReader::new(stream);
    let mut answer = |writer: &mut std::os::unix::net::UnixStream,
                      command: Option<&serde_json::Value>|
     -> Result<serde_json::Value> {
        if let Some(command) = command {
            writeln!(writer, "{command}")?;
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                bail!("QMP closed the connection");
            }
            let value: serde_json::Value =
                serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))?;
            // Events come in between; the greeting and answers are what count.
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    };
    answer(&mut writer, None)?;
    answer(
        &mut writer,
        Some(&serde_json::json!({"execute": "qmp_capabilities"})),
    )?;
    let reply = answer(&mut writer, Some(command))?;
    match reply.get("return") {
        Some(value) => Ok(value.clone()),
        None => bail!("QMP refused {command}: {reply}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_marker_is_found_after_other_output() {
        let log =
            "x\nBooting from ROM..FABRIC-GUEST: boot ok\nFABRIC-GUEST: test exit 3 uptime=1.0\n";
        assert_eq!(parse_exit_code(log), Some(3));
        assert_eq!(parse_exit_code("FABRIC-GUEST: test start\n"), None);
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut w = CpioWriter::default();
        w.file("test.sh", 0o100755, b"echo hi\n");
        let buf = w.finish();
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
        assert!(find(&buf, b"TRAILER!!!"));
    }
}
