//! Controlling a running VM: pause, resume, stop and status, from any
//! thread ([`VmControl`]) or from another process through a unix socket
//! ([`serve`]) that speaks one JSON object per line:
//!
//! ```text
//! > {"command":"pause"}
//! < {"ok":true,"state":"paused",...}
//! > {"command":"reboot"}
//! < {"ok":false,"error":"unknown command \"reboot\": expected status, pause, resume or stop"}
//! ```
//!
//! Pausing takes every vCPU out of KVM_RUN and parks it; guest RAM and
//! device state stay as they are, and the backends keep serving what the
//! guest had already queued.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::SIGRTMIN;

use crate::vm::MmioBus;

/// How long a pause waits for the vCPUs to leave the guest.
const PAUSE_WAIT: Duration = Duration::from_secs(3);
/// How long a stop waits for the vCPUs to leave.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// Longest request line taken from the control socket.
const REQUEST_BYTES_MAX: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("the VM has ended")]
    Ended,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the vCPUs did not leave the guest within {PAUSE_WAIT:?}; the VM stays paused")]
    Stuck,
}

/// What a VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Built, vCPUs not started yet.
    Created,
    Running,
    Paused,
    Ended,
}

/// A device as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// "disk" or "nic".
    pub kind: String,
    pub socket: String,
    /// The guest's driver started the device.
    pub driver_ok: bool,
    /// A backend is connected (false while one is awaited).
    pub backend_connected: bool,
    /// How many times the backend came back.
    pub reconnects: u32,
}

/// A VM's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: RunState,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub uptime_ms: u64,
    pub devices: Vec<DeviceStatus>,
}

#[derive(Debug)]
struct Runs {
    state: RunState,
    /// vCPU threads running (not ended).
    live: usize,
    /// vCPU threads parked by a pause.
    parked: usize,
    /// The threads to signal out of KVM_RUN; emptied before they are
    /// joined, so a handle is never used after its thread is gone.
    threads: Vec<libc::pthread_t>,
}

/// The shared control of one VM: its vCPU threads check it between runs.
#[derive(Debug)]
pub struct VmControl {
    /// The VM is ending: every vCPU leaves.
    stop: AtomicBool,
    /// The end was asked for (not the guest's).
    stop_requested: AtomicBool,
    runs: Mutex<Runs>,
    changed: Condvar,
    started: Instant,
    vcpus: u8,
    memory_bytes: u64,
    mmio: Arc<MmioBus>,
}

impl VmControl {
    pub(crate) fn new(vcpus: u8, memory_bytes: u64, mmio: Arc<MmioBus>) -> Arc<VmControl> {
        Arc::new(VmControl {
            stop: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            runs: Mutex::new(Runs {
                state: RunState::Created,
                live: 0,
                parked: 0,
                threads: Vec::new(),
            }),
            changed: Condvar::new(),
            started: Instant::now(),
            vcpus,
            memory_bytes,
            mmio,
        })
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.runs.lock().expect("VM control poisoned")
    }

    /// Whether the VM is ending.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Whether the end was asked for through [`Self::stop`].
    pub fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::Acquire)
    }

    /// Ends the VM (a vCPU ended it, or it was asked to).
    pub(crate) fn end(&self) {
        // Under the lock, so a vCPU about to wait in `park_if_paused`
        // either sees the flag or gets the wake-up.
        let _runs = self.runs();
        self.stop.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// `count` vCPU threads are about to start (each ends with
    /// [`Self::vcpu_ended`], even one that ends at once).
    pub(crate) fn starting(&self, count: usize) {
        self.runs().live = count;
    }

    /// The vCPU threads are running (`threads`: their handles, for kicks).
    pub(crate) fn started(&self, threads: Vec<libc::pthread_t>) {
        let mut runs = self.runs();
        runs.threads = threads;
        if runs.state == RunState::Created {
            runs.state = RunState::Running;
        }
    }

    /// A vCPU thread ended.
    pub(crate) fn vcpu_ended(&self) {
        let mut runs = self.runs();
        runs.live = runs.live.saturating_sub(1);
        drop(runs);
        self.changed.notify_all();
    }

    /// Signals every vCPU thread out of KVM_RUN (it re-checks its state).
    pub(crate) fn kick(&self) {
        for &thread in &self.runs().threads {
            // SAFETY: a thread in the list has not been joined (the list
            // is emptied first), so its handle is valid; the signal has a
            // handler that only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(thread, SIGRTMIN()) };
        }
    }

    /// The vCPU threads are about to be joined.
    pub(crate) fn finished(&self) {
        let mut runs = self.runs();
        runs.threads.clear();
        runs.state = RunState::Ended;
        drop(runs);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread between runs: waits while the VM is paused.
    pub(crate) fn park_if_paused(&self) {
        let mut runs = self.runs();
        if runs.state != RunState::Paused {
            return;
        }
        runs.parked += 1;
        self.changed.notify_all();
        while runs.state == RunState::Paused && !self.stopping() {
            runs = self.changed.wait(runs).expect("VM control poisoned");
        }
        runs.parked -= 1;
    }

    /// Pauses the VM: returns once every vCPU is out of the guest (or the
    /// VM was resumed or ended meanwhile); fails if they are not out
    /// within [`PAUSE_WAIT`].
    pub fn pause(&self) -> Result<(), ControlError> {
        {
            let mut runs = self.runs();
            match runs.state {
                RunState::Ended => return Err(ControlError::Ended),
                RunState::Paused => {}
                RunState::Created | RunState::Running => runs.state = RunState::Paused,
            }
        }
        // Kicks are repeated: one that lands just before a vCPU enters
        // KVM_RUN is lost.
        let deadline = Instant::now() + PAUSE_WAIT;
        loop {
            self.kick();
            let runs = self.runs();
            let (runs, _) = self
                .changed
                .wait_timeout(runs, Duration::from_millis(10))
                .expect("VM control poisoned");
            if runs.parked >= runs.live || runs.state != RunState::Paused || self.stopping() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ControlError::Stuck);
            }
        }
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<(), ControlError> {
        let mut runs = self.runs();
        match runs.state {
            RunState::Ended => return Err(ControlError::Ended),
            RunState::Paused => runs.state = RunState::Running,
            RunState::Created | RunState::Running => return Err(ControlError::NotPaused),
        }
        drop(runs);
        self.changed.notify_all();
        Ok(())
    }

    /// Ends the VM as if it had powered off; returns once its vCPUs are
    /// out (or after [`STOP_WAIT`] if the VM's runner is not running them).
    pub fn stop(&self) -> Result<(), ControlError> {
        if self.runs().state == RunState::Ended {
            return Err(ControlError::Ended);
        }
        self.stop_requested.store(true, Ordering::Release);
        self.end();
        let deadline = Instant::now() + STOP_WAIT;
        let mut runs = self.runs();
        while runs.state != RunState::Ended && Instant::now() < deadline {
            drop(runs);
            self.kick();
            runs = self.runs();
            runs = self
                .changed
                .wait_timeout(runs, Duration::from_millis(10))
                .expect("VM control poisoned")
                .0;
        }
        Ok(())
    }

    pub fn status(&self) -> Status {
        let state = self.runs().state;
        Status {
            state,
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            devices: self.mmio.status(),
        }
    }
}

/// A request on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    Stop,
}

/// Parses one request line, with an error that says what is expected.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| format!("a request is one JSON object per line: {e}"))?;
    let command = value
        .get("command")
        .and_then(|c| c.as_str())
        .ok_or("a request needs a \"command\" string")?
        .to_owned();
    if let Some(extra) = value
        .as_object()
        .and_then(|fields| fields.keys().find(|key| *key != "command"))
    {
        return Err(format!(
            "unknown field {extra:?}: a request has only \"command\""
        ));
    }
    serde_json::from_value(value)
        .map_err(|_| format!("unknown command {command:?}: expected status, pause, resume or stop"))
}

/// Answers one request line.
pub fn answer(control: &VmControl, line: &str) -> serde_json::Value {
    let done = parse_request(line).and_then(|request| {
        match request {
            Request::Status => Ok(()),
            Request::Pause => control.pause(),
            Request::Resume => control.resume(),
            Request::Stop => control.stop(),
        }
        .map_err(|e| e.to_string())
    });
    match done {
        Ok(()) => {
            let mut reply = serde_json::to_value(control.status()).unwrap_or_default();
            reply["ok"] = true.into();
            reply
        }
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    }
}

/// A control socket this process serves.
#[derive(Debug)]
pub struct ControlSocket {
    path: std::path::PathBuf,
    /// The socket file's device and inode, to know it is still ours.
    identity: (u64, u64),
}

impl ControlSocket {
    /// Removes the socket file, unless another process has bound one at
    /// the same path since (a runner started after this one).
    pub fn remove_if_ours(&self) {
        use std::os::unix::fs::MetadataExt;
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves the control socket at `path` (replacing a stale one; owner
/// only) on its own thread, for as long as the process lives.
pub fn serve(path: &Path, control: Arc<VmControl>) -> std::io::Result<ControlSocket> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let metadata = std::fs::symlink_metadata(path)?;
    let socket = ControlSocket {
        path: path.to_path_buf(),
        identity: (metadata.dev(), metadata.ino()),
    };
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let control = control.clone();
                let _ = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || client(stream, &control));
            }
        })?;
    Ok(socket)
}

fn client(stream: UnixStream, control: &VmControl) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(std::io::Read::take(stream, u64::MAX));
    loop {
        let mut line = String::new();
        reader.get_mut().set_limit(REQUEST_BYTES_MAX);
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && reader.get_ref().limit() == 0 {
            let _ = writeln!(
                out,
                "{}",
                serde_json::json!({"ok": false, "error": format!("a request line is at most {REQUEST_BYTES_MAX} bytes")})
            );
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = answer(control, line.trim());
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

/// Sends one request to the control socket at `path` and returns the
/// reply (for tools and tests).
pub fn request(
    path: &Path,
    command: &str,
    timeout: Duration,
) -> std::io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    writeln!(stream, "{}", serde_json::json!({ "command": command }))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_say_what_is_expected() {
        assert_eq!(parse_request(r#"{"command":"pause"}"#), Ok(Request::Pause));
        assert_eq!(
            parse_request(r#"{"command":"status"}"#),
            Ok(Request::Status)
        );
        let cases = [
            ("pause", "one JSON object per line"),
            ("{}", "needs a \"command\""),
            (r#"{"command":7}"#, "needs a \"command\""),
            (r#"{"command":"reboot"}"#, "unknown command \"reboot\""),
            (r#"{"command":"stop","now":true}"#, "unknown field \"now\""),
        ];
        for (line, expected) in cases {
            let error = parse_request(line).unwrap_err();
            assert!(error.contains(expected), "{line}: {error}");
        }
    }
}
