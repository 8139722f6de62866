//! VMs on the pool: definitions in the cluster metadata, each run by the
//! node that defined it as a `vmrun` process this module starts, watches
//! and restarts, and the `/v1/vms` routes (see `docs/api.md`).
//!
//! A VM's disks are volumes attached on its node (their vhost-user-blk
//! sockets); its NICs are switch ports served by its node (their
//! vhost-user-net sockets and assigned MACs). A `vmrun` that exits with
//! success (the guest powered off, or it was stopped) leaves the VM
//! stopped; one that fails or is killed is started again, up to
//! [`RESTARTS_MAX`] times a minute, then the VM is reported failed with
//! the runner's last words.
//!
//! Runners outlive `fabricd`: each serves a control socket (pause,
//! resume, stop, status) and is recorded in a file with its command
//! line, so a `fabricd` that restarts (after a crash or an upgrade) takes
//! over the runners that answer on their control sockets, and kills those
//! that do not. While `fabricd` is away a runner's backends are gone; the
//! runner reconnects to them when they return, and the guest goes on.

use std::collections::{HashMap, VecDeque};
use std::os::unix::process::CommandExt;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::cluster::metadata::{Command as MetaCommand, Metadata, NodeId, VmMeta};
use crate::cluster_api::ClusterHandle;
use crate::node::Node;
use crate::switch::NodeSwitch;

/// Restarts of a failing VM allowed within [`RESTART_WINDOW`].
pub const RESTARTS_MAX: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How often the runners are checked.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// The tail of a VM's console the API returns.
const CONSOLE_BYTES_MAX: u64 = 64 * 1024;
/// Longest kernel command line taken: the runner's limit, less its NUL
/// and room for what the runner may add (` noxsave`).
const CMDLINE_BYTES_MAX: usize = vmrun::linux::CMDLINE_BYTES_MAX - 64;
/// How long a runner has to answer on its control socket.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a runner left by an earlier daemon has to answer before it
/// is taken for hung and killed (the daemon's start waits for it).
const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stopped runner has to end before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// What a VM is doing on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    Stopped,
    Failed,
}

/// The `vmrun` command line of a VM (without the supervisor's own
/// arguments: console, control socket, exit file).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Launch {
    args: Vec<String>,
}

/// A runner's record on disk: enough to take it over after a restart.
#[derive(Debug, Serialize, Deserialize)]
struct RunnerRecord {
    pid: u32,
    /// When the process started (clock ticks since boot): with the pid,
    /// it names the process even after the pid is reused.
    #[serde(default)]
    start_time: Option<u64>,
    launch: Launch,
}

/// When process `pid` started (clock ticks since boot, /proc/PID/stat's
/// 22nd field), unless it has ended (a zombie has).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the
    // last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // Field 3 is the state; field 22 the start time.
    let state = fields.next()?;
    if state.starts_with('Z') || state.starts_with('X') {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Guest resets allowed within [`RESTART_WINDOW`]; one more is a reboot
/// loop, and the VM is failed.
const REBOOTS_MAX: usize = 5;
/// `vmrun`'s exit code when the guest asked for a reset.
const EXIT_REBOOT: i32 = 2;

/// How a runner ended.
#[derive(Debug)]
enum End {
    /// The guest powered off, or the VM was stopped.
    Clean,
    /// The guest rebooted: the VM starts again at once.
    Reboot,
    /// The runner failed or was killed.
    Failed(String),
}

/// A running `vmrun`: this daemon's child, or one a previous daemon
/// started and this one took over.
#[derive(Debug)]
enum Process {
    Child(Child),
    /// Named by pid and start time, so a reused pid is never taken for it.
    Adopted {
        pid: u32,
        start_time: u64,
    },
}

impl Process {
    fn pid(&self) -> u32 {
        match self {
            Process::Child(child) => child.id(),
            Process::Adopted { pid, .. } => *pid,
        }
    }

    /// How it ended, if it has.
    fn ended(&mut self, exit_file: &FsPath) -> Option<End> {
        match self {
            Process::Child(child) => match child.try_wait() {
                Ok(Some(status)) => Some(match status.code() {
                    Some(0) => End::Clean,
                    Some(EXIT_REBOOT) => End::Reboot,
                    _ => End::Failed(format!("vmrun ended with {status}")),
                }),
                Ok(None) => None,
                Err(error) => {
                    tracing::warn!(%error, "cannot check a VM's runner");
                    None
                }
            },
            Process::Adopted {
                pid,
                start_time: started,
            } => {
                if start_time(*pid) == Some(*started) {
                    return None;
                }
                // Not our child: its exit code is in the file it wrote.
                match std::fs::read_to_string(exit_file).map(|code| code.trim().parse::<i32>()) {
                    Ok(Ok(0)) => Some(End::Clean),
                    Ok(Ok(EXIT_REBOOT)) => Some(End::Reboot),
                    Ok(Ok(code)) => Some(End::Failed(format!("vmrun exited with {code}"))),
                    _ => Some(End::Failed(
                        "vmrun ended without an exit code (killed)".into(),
                    )),
                }
            }
        }
    }

    /// Kills it and waits for it to be gone.
    fn kill(&mut self) {
        match self {
            Process::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Process::Adopted {
                pid,
                start_time: started,
            } => {
                if start_time(*pid) != Some(*started) {
                    return;
                }
                // SAFETY: kill(2) on the process this daemon took over,
                // checked just above to still be it.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                for _ in 0..100 {
                    if start_time(*pid) != Some(*started) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

#[derive(Debug)]
struct Runner {
    launch: Launch,
    process: Option<Process>,
    state: VmState,
    restarts: u32,
    /// Times the guest rebooted (not failures).
    reboots: u32,
    recent_reboots: VecDeque<Instant>,
    recent_failures: VecDeque<Instant>,
    last_error: Option<String>,
    started_unix: u64,
    /// A stop is under way (its runner taken out, not yet gone): the VM
    /// cannot be started until it is over.
    stopping: bool,
}

/// The VMs this node runs.
#[derive(Debug)]
pub struct VmSupervisor {
    vmrun: PathBuf,
    dir: PathBuf,
    runners: Mutex<HashMap<String, Runner>>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VmSupervisor {
    /// VMs run `vmrun` (the binary beside `fabricd` unless given) and keep
    /// their consoles, control sockets and records under `dir`. Runners
    /// a previous daemon left are taken over, or killed if they do not
    /// answer.
    pub fn new(vmrun: PathBuf, dir: PathBuf) -> Arc<VmSupervisor> {
        let supervisor = VmSupervisor {
            vmrun,
            dir,
            runners: Mutex::default(),
        };
        supervisor.take_over_leftovers();
        Arc::new(supervisor)
    }

    fn record(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }

    fn control(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.control"))
    }

    fn exit_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.exit"))
    }

    fn console(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.console"))
    }

    fn stderr(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.vmrun.log"))
    }

    /// Takes over the runners a previous `fabricd` on this data directory
    /// left running. One that is not this runner binary any more is left
    /// alone (its pid was reused); one that does not answer on its
    /// control socket is killed: a VM runs only under this daemon, never
    /// twice on the same sockets.
    fn take_over_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut runners = self.runners.lock().expect("runners poisoned");
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pid") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // An older record is the bare pid.
            let (pid, recorded_start, launch) = match serde_json::from_str::<RunnerRecord>(&text) {
                Ok(record) => (record.pid, record.start_time, Some(record.launch)),
                Err(_) => (text.trim().parse().unwrap_or(0), None, None),
            };
            let Some(started) = start_time(pid).filter(|_| pid != 0) else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            // The recorded process: by its start time, or (an older
            // record) by its binary, even one replaced by an upgrade.
            let same = match recorded_start {
                Some(recorded) => recorded == started,
                None => std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
                    let exe = exe.to_string_lossy();
                    let vmrun = self.vmrun.to_string_lossy();
                    exe == vmrun || exe == format!("{vmrun} (deleted)")
                }),
            };
            if !same {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let status = vmrun::control::request(&self.control(&name), "status", TAKE_OVER_TIMEOUT)
                .ok()
                .filter(|reply| reply["ok"] == true);
            match (launch, status) {
                (Some(launch), Some(status)) => {
                    let state = if status["state"] == "paused" {
                        VmState::Paused
                    } else {
                        VmState::Running
                    };
                    tracing::info!(vm = %name, pid, "took over a VM runner left by an earlier fabricd");
                    let uptime = status["uptime_ms"].as_u64().unwrap_or(0) / 1000;
                    runners.insert(
                        name,
                        Runner {
                            launch,
                            process: Some(Process::Adopted {
                                pid,
                                start_time: started,
                            }),
                            state,
                            restarts: 0,
                            reboots: 0,
                            recent_reboots: VecDeque::new(),
                            recent_failures: VecDeque::new(),
                            last_error: None,
                            started_unix: unix_now().saturating_sub(uptime),
                            stopping: false,
                        },
                    );
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                    // Killed only if it is still the same process (it may
                    // have ended during the wait, and its pid been reused).
                    Process::Adopted {
                        pid,
                        start_time: started,
                    }
                    .kill();
                    tracing::warn!(vm = %name, pid, "killed a VM runner that did not answer on its control socket");
                }
            }
        }
    }

    fn spawn(&self, name: &str, launch: &Launch) -> Result<Child, String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let stderr = std::fs::File::create(self.stderr(name))
            .map_err(|e| format!("cannot create the runner's log: {e}"))?;
        let _ = std::fs::remove_file(self.exit_file(name));
        let child = Command::new(&self.vmrun)
            .args(&launch.args)
            .arg("--serial-log")
            .arg(self.console(name))
            .arg("--control")
            .arg(self.control(name))
            .arg("--exit-file")
            .arg(self.exit_file(name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: a signal to the daemon's group (a
            // terminal's ^C) does not reach the VMs.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.vmrun.display()))?;
        let record = RunnerRecord {
            pid: child.id(),
            start_time: start_time(child.id()),
            launch: launch.clone(),
        };
        let text = serde_json::to_string(&record).unwrap_or_default();
        if let Err(error) = std::fs::write(self.record(name), text) {
            tracing::warn!(vm = name, %error, "cannot record a VM runner");
        }
        Ok(child)
    }

    /// Writes a VM's definition for its runner; the runner's command line.
    fn define(
        &self,
        name: &str,
        definition: &vmrun::definition::Definition,
    ) -> Result<Launch, String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let path = self.dir.join(format!("{name}.json"));
        let text = serde_json::to_string_pretty(definition).map_err(|e| e.to_string())?;
        std::fs::write(&path, text)
            .map_err(|e| format!("cannot write the VM's definition {}: {e}", path.display()))?;
        Ok(Launch {
            args: vec!["--config".into(), path.display().to_string()],
        })
    }

    /// Starts a VM (again, if it had stopped or failed).
    fn start(&self, name: &str, launch: Launch) -> Result<(), String> {
        let mut runners = self.runners.lock().expect("runners poisoned");
        if let Some(runner) = runners.get(name) {
            if runner.stopping {
                return Err(format!("VM {name:?} is stopping; start it once it has"));
            }
            if runner.process.is_some() {
                return Err(format!("VM {name:?} is already running"));
            }
        }
        let child = self.spawn(name, &launch)?;
        tracing::info!(vm = name, pid = child.id(), "started a VM");
        runners.insert(
            name.to_owned(),
            Runner {
                launch,
                process: Some(Process::Child(child)),
                state: VmState::Running,
                restarts: 0,
                reboots: 0,
                recent_reboots: VecDeque::new(),
                recent_failures: VecDeque::new(),
                last_error: None,
                started_unix: unix_now(),
                stopping: false,
            },
        );
        Ok(())
    }

    /// Stops a VM: its runner is asked to stop through its control
    /// socket, and killed if it has not ended within [`STOP_GRACE`]. The
    /// runner is waited for after the lock is let go.
    fn stop(&self, name: &str) -> bool {
        let process = {
            let mut runners = self.runners.lock().expect("runners poisoned");
            let Some(runner) = runners.get_mut(name) else {
                return false;
            };
            runner.state = VmState::Stopped;
            // A stop already under way keeps its runner until it has ended.
            if runner.stopping {
                return true;
            }
            let process = runner.process.take();
            runner.stopping = process.is_some();
            process
        };
        if let Some(mut process) = process {
            let asked = vmrun::control::request(&self.control(name), "stop", CONTROL_TIMEOUT);
            // Asked or not (it may have ended before it could answer), the
            // runner is checked before it is killed: never a signal to a
            // pid that has ended (it may be reused).
            let deadline = Instant::now()
                + if asked.is_ok() {
                    STOP_GRACE
                } else {
                    Duration::ZERO
                };
            let ended = loop {
                if process.ended(&self.exit_file(name)).is_some() {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if !ended {
                process.kill();
            }
            let _ = std::fs::remove_file(self.record(name));
            if let Some(runner) = self.runners.lock().expect("runners poisoned").get_mut(name) {
                runner.stopping = false;
            }
        }
        true
    }

    /// Whether a VM's runner is running (paused or not) or still being
    /// stopped.
    fn running(&self, name: &str) -> bool {
        self.runners
            .lock()
            .expect("runners poisoned")
            .get(name)
            .is_some_and(|r| r.process.is_some() || r.stopping)
    }

    /// Pauses or resumes a running VM through its control socket.
    fn pause(&self, name: &str, pause: bool) -> Result<(), String> {
        let (command, state) = if pause {
            ("pause", VmState::Paused)
        } else {
            ("resume", VmState::Running)
        };
        let serving = self
            .runners
            .lock()
            .expect("runners poisoned")
            .get(name)
            .is_some_and(|r| r.process.is_some());
        if !serving {
            return Err(format!("VM {name:?} is not running"));
        }
        let reply = vmrun::control::request(&self.control(name), command, CONTROL_TIMEOUT)
            .map_err(|e| format!("VM {name:?} does not answer on its control socket: {e}"))?;
        if reply["ok"] != true {
            return Err(format!(
                "VM {name:?}: {}",
                reply["error"].as_str().unwrap_or("the runner refused")
            ));
        }
        if let Some(runner) = self.runners.lock().expect("runners poisoned").get_mut(name) {
            if runner.process.is_some() {
                runner.state = state;
            }
        }
        Ok(())
    }

    fn forget(&self, name: &str) {
        self.stop(name);
        self.runners.lock().expect("runners poisoned").remove(name);
        for path in [
            self.console(name),
            self.stderr(name),
            self.record(name),
            self.exit_file(name),
            self.control(name),
            self.dir.join(format!("{name}.json")),
        ] {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Notices runners that ended: a clean end stops the VM; a failure
    /// restarts it, or after too many marks it failed.
    pub fn watch_once(&self) {
        let mut runners = self.runners.lock().expect("runners poisoned");
        for (name, runner) in runners.iter_mut() {
            let Some(process) = runner.process.as_mut() else {
                continue;
            };
            let Some(ended) = process.ended(&self.exit_file(name)) else {
                continue;
            };
            runner.process = None;
            let _ = std::fs::remove_file(self.record(name));
            let said = last_line(&self.stderr(name));
            let reason = match ended {
                End::Clean => {
                    tracing::info!(vm = %name, said = %said, "a VM ended");
                    runner.state = VmState::Stopped;
                    runner.last_error = None;
                    continue;
                }
                End::Reboot => {
                    // A guest that keeps resetting (a kernel that panics at
                    // boot) is failing, not rebooting.
                    if another_within_window(&mut runner.recent_reboots, REBOOTS_MAX) {
                        let reason = format!(
                            "the guest reset {} times within a minute (a reboot loop); not starting it again",
                            runner.recent_reboots.len()
                        );
                        tracing::error!(vm = %name, %reason, "a VM failed");
                        runner.state = VmState::Failed;
                        runner.last_error = Some(reason);
                        continue;
                    }
                    if self.respawn(name, runner) {
                        tracing::info!(vm = %name, "a VM rebooted");
                        runner.reboots += 1;
                    }
                    continue;
                }
                End::Failed(reason) if said.is_empty() => reason,
                End::Failed(reason) => format!("{reason}: {said}"),
            };
            runner.last_error = Some(reason.clone());
            if another_within_window(&mut runner.recent_failures, RESTARTS_MAX) {
                tracing::error!(vm = %name, %reason, "a VM failed too often; not restarting it");
                runner.state = VmState::Failed;
                continue;
            }
            if self.respawn(name, runner) {
                tracing::warn!(vm = %name, %reason, "restarted a VM");
                runner.restarts += 1;
            }
        }
    }

    /// Starts a runner that ended again; on failure the VM is failed with
    /// the reason. Returns whether it started.
    fn respawn(&self, name: &str, runner: &mut Runner) -> bool {
        match self.spawn(name, &runner.launch) {
            Ok(child) => {
                runner.process = Some(Process::Child(child));
                runner.state = VmState::Running;
                runner.started_unix = unix_now();
                true
            }
            Err(error) => {
                tracing::error!(vm = %name, %error, "cannot start a VM again");
                runner.state = VmState::Failed;
                runner.last_error = Some(error);
                false
            }
        }
    }

    /// The daemon is stopping: runners are left running, to be taken
    /// over by the next `fabricd` (their guests wait for the backends).
    pub fn shutdown(&self) {
        let running = self
            .runners
            .lock()
            .expect("runners poisoned")
            .values()
            .filter(|r| r.process.is_some())
            .count();
        if running > 0 {
            tracing::info!(
                running,
                "VM runners keep running; the next fabricd takes them over"
            );
        }
    }

    /// A VM's runner as the API shows it; its devices are asked of the
    /// runner (blocking, up to a second).
    fn status(&self, name: &str) -> Option<RunnerView> {
        let mut view = {
            let runners = self.runners.lock().expect("runners poisoned");
            let runner = runners.get(name)?;
            RunnerView {
                state: runner.state,
                pid: runner.process.as_ref().map(Process::pid),
                restarts: runner.restarts,
                reboots: runner.reboots,
                last_error: runner.last_error.clone(),
                started_unix: runner.started_unix,
                devices: Vec::new(),
            }
        };
        if view.pid.is_some() {
            let reply =
                vmrun::control::request(&self.control(name), "status", Duration::from_secs(1))
                    .ok()
                    .filter(|reply| reply["ok"] == true);
            if let Some(reply) = reply {
                view.devices = serde_json::from_value(reply["devices"].clone()).unwrap_or_default();
                // The runner knows best whether it is paused.
                let state = match reply["state"].as_str() {
                    Some("paused") => Some(VmState::Paused),
                    Some("running") => Some(VmState::Running),
                    _ => None,
                };
                if let Some(state) = state {
                    view.state = state;
                    let mut runners = self.runners.lock().expect("runners poisoned");
                    if let Some(runner) = runners.get_mut(name).filter(|r| r.process.is_some()) {
                        runner.state = state;
                    }
                }
            }
        }
        Some(view)
    }
}

/// Records one more event now in `recent` (the events of the last
/// [`RESTART_WINDOW`]); whether there are now more than `max`.
fn another_within_window(recent: &mut VecDeque<Instant>, max: usize) -> bool {
    let now = Instant::now();
    recent.retain(|at| now.duration_since(*at) < RESTART_WINDOW);
    recent.push_back(now);
    recent.len() > max
}

/// The last non-empty line of a file.
fn last_line(path: &FsPath) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// Checks the runners every [`WATCH_INTERVAL`].
pub async fn watch(supervisor: Arc<VmSupervisor>) {
    let mut ticker = tokio::time::interval(WATCH_INTERVAL);
    loop {
        ticker.tick().await;
        let supervisor = supervisor.clone();
        let _ = tokio::task::spawn_blocking(move || supervisor.watch_once()).await;
    }
}

#[derive(Clone)]
struct VmApi {
    supervisor: Arc<VmSupervisor>,
    node: Arc<Node>,
    switch: Arc<NodeSwitch>,
    cluster: Arc<ClusterHandle>,
}

/// The VM routes.
pub fn router(
    supervisor: Arc<VmSupervisor>,
    node: Arc<Node>,
    switch: Arc<NodeSwitch>,
    cluster: Arc<ClusterHandle>,
) -> Router {
    Router::new()
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(show_vm).delete(delete_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/pause", post(pause_vm))
        .route("/v1/vms/{name}/resume", post(resume_vm))
        .route("/v1/vms/{name}/console", get(console_vm))
        .with_state(VmApi {
            supervisor,
            node,
            switch,
            cluster,
        })
}

/// What this module keeps in the metadata, for errors outside a cluster.
const VM_METADATA: &str = "VM definitions";

async fn current(cluster: &ClusterHandle) -> Result<(Metadata, NodeId), ApiError> {
    crate::cluster_api::current_metadata(cluster, VM_METADATA).await
}

async fn commit(cluster: &ClusterHandle, command: MetaCommand) -> Result<Metadata, ApiError> {
    crate::cluster_api::commit_metadata(cluster, VM_METADATA, command).await
}

fn vm_not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "vm_not_found",
        format!("no VM {name:?}; `fabctl vm list` shows the VMs"),
    )
}

/// Body of `POST /v1/vms`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVm {
    /// The node to define it on (id or name; default: this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    name: String,
    kernel: String,
    /// A Linux kernel's initramfs, a path on the VM's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initramfs: Option<String>,
    /// A Linux kernel's command line (default: the runner's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    cmdline: String,
    #[serde(default = "one")]
    vcpus: u32,
    memory_bytes: u64,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
}

fn one() -> u32 {
    1
}

async fn create_vm(
    State(api): State<VmApi>,
    body: Result<Json<CreateVm>, JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Json(mut request) = body?;
    if let Some(target) = request.node.take() {
        let body = serde_json::to_value(&request)
            .map_err(|error| ApiError::bad_request(error.to_string()))?;
        if let Some(answer) =
            crate::cluster_api::forward(&api.cluster, &target, "POST", "/v1/vms".into(), Some(body))
                .await?
        {
            return Ok(answer);
        }
    }
    if let Err(blockstore::Error::InvalidName { reason, .. }) =
        blockstore::store::validate_name(&request.name)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            format!("invalid VM name {:?}: {reason}", request.name),
        ));
    }
    if request.vcpus == 0 || request.vcpus > u32::from(vmrun::vm::VCPUS_MAX) {
        return Err(ApiError::bad_request(format!(
            "a VM needs 1 to {} vCPUs, not {}",
            vmrun::vm::VCPUS_MAX,
            request.vcpus
        )));
    }
    vmrun::memory::check_size(request.memory_bytes)
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    let kernel = FsPath::new(&request.kernel);
    if !kernel.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "the kernel path must be absolute (it is opened by fabricd): {:?}",
            request.kernel
        )));
    }
    if !kernel.is_file() {
        return Err(ApiError::bad_request(format!(
            "no kernel file at {} on this node",
            kernel.display()
        )));
    }
    if let Some(initramfs) = &request.initramfs {
        let path = FsPath::new(initramfs);
        if !path.is_absolute() || !path.is_file() {
            return Err(ApiError::bad_request(format!(
                "the initramfs must be an absolute path to a file on this node: {initramfs:?}"
            )));
        }
    }
    if request.cmdline.len() > CMDLINE_BYTES_MAX
        || !request.cmdline.bytes().all(|b| (b' '..=b'~').contains(&b))
    {
        return Err(ApiError::bad_request(format!(
            "a kernel command line is at most {CMDLINE_BYTES_MAX} bytes of printable ASCII"
        )));
    }
    let devices = request.volumes.len() + request.ports.len();
    // The runner's own rule, on the kernel file here (checked above).
    let linux = std::fs::File::open(kernel).is_ok_and(|mut file| {
        vmrun::vm::boots_linux(
            &mut file,
            !request.cmdline.is_empty(),
            request.initramfs.is_some(),
        )
    });
    let devices_max = vmrun::vm::devices_max(linux);
    if devices > devices_max {
        return Err(ApiError::bad_request(format!(
            "a VM has at most {devices_max} volumes and ports together{}, not {devices}",
            if linux {
                " when it boots Linux (one interrupt line each)"
            } else {
                ""
            }
        )));
    }
    let (metadata, me) = current(&api.cluster).await?;
    if metadata.vms.contains_key(&request.name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "vm_exists",
            format!("a VM named {:?} exists", request.name),
        ));
    }
    for port in &request.ports {
        if let Some(meta) = metadata.ports.get(port).filter(|meta| meta.node != me) {
            return Err(ApiError::bad_request(format!(
                "port {port:?} is served by node {}; define the VM on that node",
                meta.node
            )));
        }
    }
    let vm = VmMeta {
        name: request.name.clone(),
        vcpus: request.vcpus,
        memory_bytes: request.memory_bytes,
        kernel: request.kernel,
        initramfs: request.initramfs,
        cmdline: request.cmdline,
        volumes: request.volumes,
        ports: request.ports,
        node: Some(me),
    };
    let metadata = commit(&api.cluster, MetaCommand::DefineVm { vm }).await?;
    let vm = metadata
        .vms
        .get(&request.name)
        .ok_or_else(|| vm_not_found(&request.name))?;
    Ok((StatusCode::CREATED, Json(view(&api, me, vm).await?)).into_response())
}

/// A VM as the API shows it.
#[derive(Debug, Serialize)]
struct VmView {
    #[serde(flatten)]
    meta: VmMeta,
    /// On the node that runs it: what it is doing.
    runner: Option<RunnerView>,
}

#[derive(Debug, Serialize)]
struct RunnerView {
    state: VmState,
    pid: Option<u32>,
    restarts: u32,
    reboots: u32,
    last_error: Option<String>,
    started_unix: u64,
    /// The runner's devices and their backends (while it runs).
    devices: Vec<vmrun::control::DeviceStatus>,
}

/// Where a request about a VM is answered.
enum Owner {
    /// This node runs it: its definition.
    Here(Metadata, VmMeta),
    /// Another node runs it: that node's answer to the same request.
    There(axum::response::Response),
}

/// Finds a VM and, if another node runs it, passes `method path` to that
/// node over the cluster transport.
async fn owner(api: &VmApi, name: &str, method: &str, path: &str) -> Result<Owner, ApiError> {
    let (metadata, me) = current(&api.cluster).await?;
    let vm = metadata
        .vms
        .get(name)
        .ok_or_else(|| vm_not_found(name))?
        .clone();
    match vm.node {
        Some(node) if node == me => Ok(Owner::Here(metadata, vm)),
        Some(node) => {
            match crate::cluster_api::forward(
                &api.cluster,
                &node.to_string(),
                method,
                path.into(),
                None,
            )
            .await?
            {
                Some(answer) => Ok(Owner::There(answer)),
                None => Ok(Owner::Here(metadata, vm)),
            }
        }
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "vm_elsewhere",
            format!("VM {name:?} has no node"),
        )),
    }
}

/// The VM's definition if this node runs it; otherwise the answer of the
/// node that does (`Err(Ok(answer))`).
macro_rules! here_or_forward {
    ($api:expr, $name:expr, $method:expr, $path:expr) => {
        match owner(&$api, &$name, $method, &$path).await? {
            Owner::Here(metadata, vm) => (metadata, vm),
            Owner::There(answer) => return Ok(answer),
        }
    };
}

/// The VMs as the API shows them: this node's with their runners.
async fn views(api: &VmApi, me: NodeId, metas: Vec<VmMeta>) -> Vec<VmView> {
    let supervisor = api.supervisor.clone();
    tokio::task::spawn_blocking(move || {
        metas
            .into_iter()
            .map(|meta| VmView {
                runner: (meta.node == Some(me))
                    .then(|| supervisor.status(&meta.name))
                    .flatten(),
                meta,
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

async fn view(api: &VmApi, me: NodeId, meta: &VmMeta) -> Result<VmView, ApiError> {
    views(api, me, vec![meta.clone()])
        .await
        .pop()
        .ok_or_else(|| vm_not_found(&meta.name))
}

async fn list_vms(State(api): State<VmApi>) -> Result<impl IntoResponse, ApiError> {
    let (metadata, me) = current(&api.cluster).await?;
    Ok(Json(
        views(&api, me, metadata.vms.values().cloned().collect()).await,
    ))
}

async fn show_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    // The node that runs it knows its runner.
    let (_, vm) = here_or_forward!(api, name, "GET", format!("/v1/vms/{name}"));
    let me = vm.node.unwrap_or_default();
    Ok(Json(view(&api, me, &vm).await?).into_response())
}

async fn start_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let (metadata, vm) = here_or_forward!(api, name, "POST", format!("/v1/vms/{name}/start"));
    let mut definition = vmrun::definition::Definition {
        kernel: vm.kernel.clone().into(),
        vcpus: u8::try_from(vm.vcpus).unwrap_or(u8::MAX),
        memory_bytes: vm.memory_bytes,
        initramfs: vm.initramfs.clone().map(Into::into),
        cmdline: (!vm.cmdline.is_empty()).then(|| vm.cmdline.clone()),
        disks: Vec::new(),
        nics: Vec::new(),
    };
    for volume in &vm.volumes {
        let node = api.node.clone();
        let owned = volume.clone();
        let shown = tokio::task::spawn_blocking(move || node.show(&owned))
            .await
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let socket = shown
            .ok()
            .and_then(|v| v.attachment)
            .map(|a| a.socket)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "volume_not_attached",
                    format!(
                        "volume {volume:?} is not attached on this node: `fabctl volume attach {volume}` first"
                    ),
                )
            })?;
        definition.disks.push(socket);
    }
    for port in &vm.ports {
        let meta = metadata
            .ports
            .get(port)
            .ok_or_else(|| ApiError::bad_request(format!("port {port:?} does not exist")))?;
        definition.nics.push(vmrun::definition::NicDefinition {
            socket: api.switch.socket(port),
            mac: meta.mac.to_string(),
        });
    }
    let supervisor = api.supervisor.clone();
    let started = tokio::task::spawn_blocking(move || {
        let launch = supervisor.define(&name, &definition)?;
        supervisor.start(&name, launch)
    })
    .await
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    started.map_err(|reason| ApiError::new(StatusCode::CONFLICT, "vm_not_started", reason))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn stop_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    here_or_forward!(api, name, "POST", format!("/v1/vms/{name}/stop"));
    let supervisor = api.supervisor.clone();
    let _ = tokio::task::spawn_blocking(move || supervisor.stop(&name)).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn pause_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    pause_or_resume(api, name, true).await
}

async fn resume_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    pause_or_resume(api, name, false).await
}

async fn pause_or_resume(
    api: VmApi,
    name: String,
    pause: bool,
) -> Result<axum::response::Response, ApiError> {
    let action = if pause { "pause" } else { "resume" };
    here_or_forward!(api, name, "POST", format!("/v1/vms/{name}/{action}"));
    let supervisor = api.supervisor.clone();
    tokio::task::spawn_blocking(move || supervisor.pause(&name, pause))
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))?
        .map_err(|reason| ApiError::new(StatusCode::CONFLICT, "vm_not_running", reason))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let (_, vm) = here_or_forward!(api, name, "DELETE", format!("/v1/vms/{name}"));
    if api.supervisor.running(&name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "vm_running",
            format!("VM {name:?} is running: `fabctl vm stop {name}` first"),
        ));
    }
    commit(&api.cluster, MetaCommand::DeleteVm { name: vm.name }).await?;
    let supervisor = api.supervisor.clone();
    let _ = tokio::task::spawn_blocking(move || supervisor.forget(&name)).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn console_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    here_or_forward!(api, name, "GET", format!("/v1/vms/{name}/console"));
    let path = api.supervisor.console(&name);
    let text = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_BYTES_MAX)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    })
    .await
    .map_err(|e| ApiError::bad_request(e.to_string()))?
    .map_err(|e| ApiError::bad_request(format!("cannot read the console: {e}")))?;
    Ok(text.into_response())
}
