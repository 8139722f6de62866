//! VMs on the pool: definitions in the cluster metadata, each run by the
//! node that defined it as a `vmrun` process this module starts, watches
//! and restarts, and the `/v1/vms` routes (see `docs/api.md`).
//!
//! A VM's disks are volumes attached on its node (their vhost-user-blk
//! sockets); its NICs are switch ports served by its node (their
//! vhost-user-net sockets and assigned MACs). A `vmrun` that exits with
//! success (the guest powered off) leaves the VM stopped; one that fails
//! or is killed is started again, up to [`RESTARTS_MAX`] times a minute,
//! then the VM is reported failed with the runner's last words. Runners'
//! pids are kept in files, so that a `fabricd` started after a crash
//! kills the runners its predecessor left.

use std::collections::{HashMap, VecDeque};
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

/// What a VM is doing on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Stopped,
    Failed,
}

/// The `vmrun` command line of a VM.
#[derive(Debug, Clone)]
struct Launch {
    args: Vec<String>,
}

#[derive(Debug)]
struct Runner {
    launch: Launch,
    child: Option<Child>,
    state: VmState,
    restarts: u32,
    recent_failures: VecDeque<Instant>,
    last_error: Option<String>,
    started_unix: u64,
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
    /// their consoles under `dir`.
    pub fn new(vmrun: PathBuf, dir: PathBuf) -> Arc<VmSupervisor> {
        let supervisor = VmSupervisor {
            vmrun,
            dir,
            runners: Mutex::default(),
        };
        supervisor.kill_leftovers();
        Arc::new(supervisor)
    }

    fn pidfile(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }

    /// Kills the runners a previous `fabricd` on this data directory left
    /// (it was killed before it could stop them): a VM runs only when this
    /// daemon started it, never twice on the same sockets.
    fn kill_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pid") {
                continue;
            }
            let pid: Option<i32> = std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| text.trim().parse().ok());
            let _ = std::fs::remove_file(&path);
            let Some(pid) = pid.filter(|&pid| pid > 0) else {
                continue;
            };
            // Only a process that is still this runner binary.
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            if exe.as_deref() != Some(self.vmrun.as_path()) {
                continue;
            }
            // SAFETY: kill(2) with a pid read above and a valid signal.
            let killed = unsafe { libc::kill(pid, libc::SIGKILL) } == 0;
            if killed {
                tracing::warn!(pid, "killed a VM runner left by an earlier fabricd");
            }
        }
    }

    fn console(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.console"))
    }

    fn stderr(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.vmrun.log"))
    }

    fn spawn(&self, name: &str, launch: &Launch) -> Result<Child, String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let stderr = std::fs::File::create(self.stderr(name))
            .map_err(|e| format!("cannot create the runner's log: {e}"))?;
        let child = Command::new(&self.vmrun)
            .args(&launch.args)
            .arg("--serial-log")
            .arg(self.console(name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.vmrun.display()))?;
        if let Err(error) = std::fs::write(self.pidfile(name), child.id().to_string()) {
            tracing::warn!(vm = name, %error, "cannot record a VM runner's pid");
        }
        Ok(child)
    }

    /// Starts a VM (again, if it had stopped or failed).
    fn start(&self, name: &str, launch: Launch) -> Result<(), String> {
        let mut runners = self.runners.lock().expect("runners poisoned");
        if runners
            .get(name)
            .is_some_and(|r| r.state == VmState::Running)
        {
            return Err(format!("VM {name:?} is already running"));
        }
        let child = self.spawn(name, &launch)?;
        tracing::info!(vm = name, pid = child.id(), "started a VM");
        runners.insert(
            name.to_owned(),
            Runner {
                launch,
                child: Some(child),
                state: VmState::Running,
                restarts: 0,
                recent_failures: VecDeque::new(),
                last_error: None,
                started_unix: unix_now(),
            },
        );
        Ok(())
    }

    /// Stops a VM's runner (killing it: the guest is not asked). The
    /// runner is waited for after the lock is let go.
    fn stop(&self, name: &str) -> bool {
        let child = {
            let mut runners = self.runners.lock().expect("runners poisoned");
            let Some(runner) = runners.get_mut(name) else {
                return false;
            };
            runner.state = VmState::Stopped;
            runner.child.take()
        };
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
        true
    }

    fn forget(&self, name: &str) {
        self.stop(name);
        self.runners.lock().expect("runners poisoned").remove(name);
        let _ = std::fs::remove_file(self.console(name));
        let _ = std::fs::remove_file(self.stderr(name));
        let _ = std::fs::remove_file(self.pidfile(name));
    }

    /// Notices runners that ended: a clean end stops the VM; a failure
    /// restarts it, or after too many marks it failed.
    pub fn watch_once(&self) {
        let mut runners = self.runners.lock().expect("runners poisoned");
        for (name, runner) in runners.iter_mut() {
            let Some(child) = runner.child.as_mut() else {
                continue;
            };
            let status = match child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(vm = %name, %error, "cannot check a VM's runner");
                    continue;
                }
            };
            runner.child = None;
            let said = last_line(&self.stderr(name));
            if status.success() {
                tracing::info!(vm = %name, said = %said, "a VM ended");
                runner.state = VmState::Stopped;
                runner.last_error = None;
                continue;
            }
            let reason = if said.is_empty() {
                format!("vmrun ended with {status}")
            } else {
                format!("vmrun ended with {status}: {said}")
            };
            let now = Instant::now();
            runner
                .recent_failures
                .retain(|at| now.duration_since(*at) < RESTART_WINDOW);
            runner.recent_failures.push_back(now);
            runner.last_error = Some(reason.clone());
            if runner.recent_failures.len() > RESTARTS_MAX {
                tracing::error!(vm = %name, %reason, "a VM failed too often; not restarting it");
                runner.state = VmState::Failed;
                continue;
            }
            match self.spawn(name, &runner.launch) {
                Ok(child) => {
                    tracing::warn!(vm = %name, %reason, pid = child.id(), "restarted a VM");
                    runner.child = Some(child);
                    runner.restarts += 1;
                    runner.started_unix = unix_now();
                }
                Err(error) => {
                    tracing::error!(vm = %name, %error, "cannot restart a VM");
                    runner.state = VmState::Failed;
                    runner.last_error = Some(error);
                }
            }
        }
    }

    /// Kills every runner (the daemon is stopping).
    pub fn shutdown(&self) {
        let names: Vec<String> = self
            .runners
            .lock()
            .expect("runners poisoned")
            .keys()
            .cloned()
            .collect();
        for name in names {
            self.stop(&name);
        }
    }

    fn status(&self, name: &str) -> Option<RunnerView> {
        let runners = self.runners.lock().expect("runners poisoned");
        let runner = runners.get(name)?;
        Some(RunnerView {
            state: runner.state,
            pid: runner.child.as_ref().map(Child::id),
            restarts: runner.restarts,
            last_error: runner.last_error.clone(),
            started_unix: runner.started_unix,
        })
    }
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVm {
    name: String,
    kernel: String,
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
) -> Result<impl IntoResponse, ApiError> {
    let Json(request) = body?;
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
        initramfs: None,
        cmdline: String::new(),
        volumes: request.volumes,
        ports: request.ports,
        node: Some(me),
    };
    let metadata = commit(&api.cluster, MetaCommand::DefineVm { vm }).await?;
    let vm = metadata
        .vms
        .get(&request.name)
        .ok_or_else(|| vm_not_found(&request.name))?;
    Ok((StatusCode::CREATED, Json(view(&api, me, vm))))
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
    last_error: Option<String>,
    started_unix: u64,
}

fn view(api: &VmApi, me: NodeId, meta: &VmMeta) -> VmView {
    let runner = (meta.node == Some(me))
        .then(|| api.supervisor.status(&meta.name))
        .flatten();
    VmView {
        meta: meta.clone(),
        runner,
    }
}

async fn list_vms(State(api): State<VmApi>) -> Result<impl IntoResponse, ApiError> {
    let (metadata, me) = current(&api.cluster).await?;
    let vms: Vec<VmView> = metadata.vms.values().map(|vm| view(&api, me, vm)).collect();
    Ok(Json(vms))
}

async fn show_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (metadata, me) = current(&api.cluster).await?;
    let vm = metadata.vms.get(&name).ok_or_else(|| vm_not_found(&name))?;
    Ok(Json(view(&api, me, vm)))
}

/// The VM's definition, if this node runs it.
async fn local_vm(api: &VmApi, name: &str) -> Result<(Metadata, VmMeta), ApiError> {
    let (metadata, me) = current(&api.cluster).await?;
    let vm = metadata
        .vms
        .get(name)
        .ok_or_else(|| vm_not_found(name))?
        .clone();
    if vm.node != Some(me) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "vm_elsewhere",
            format!(
                "VM {name:?} runs on node {}; ask that node (fabctl --api ...)",
                vm.node.map_or("none".into(), |n| n.to_string())
            ),
        ));
    }
    Ok((metadata, vm))
}

async fn start_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (metadata, vm) = local_vm(&api, &name).await?;
    let mut args = vec![
        "--kernel".to_owned(),
        vm.kernel.clone(),
        "--memory".to_owned(),
        vm.memory_bytes.to_string(),
        "--cpus".to_owned(),
        vm.vcpus.to_string(),
    ];
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
        args.push("--disk".into());
        args.push(socket.display().to_string());
    }
    for port in &vm.ports {
        let meta = metadata
            .ports
            .get(port)
            .ok_or_else(|| ApiError::bad_request(format!("port {port:?} does not exist")))?;
        args.push("--nic".into());
        args.push(format!(
            "{},mac={}",
            api.switch.socket(port).display(),
            meta.mac
        ));
    }
    let supervisor = api.supervisor.clone();
    let started = tokio::task::spawn_blocking(move || supervisor.start(&name, Launch { args }))
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    started.map_err(|reason| ApiError::new(StatusCode::CONFLICT, "vm_not_started", reason))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stop_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    local_vm(&api, &name).await?;
    let supervisor = api.supervisor.clone();
    let _ = tokio::task::spawn_blocking(move || supervisor.stop(&name)).await;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (_, vm) = local_vm(&api, &name).await?;
    if api
        .supervisor
        .status(&name)
        .is_some_and(|r| r.state == VmState::Running)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "vm_running",
            format!("VM {name:?} is running: `fabctl vm stop {name}` first"),
        ));
    }
    commit(&api.cluster, MetaCommand::DeleteVm { name: vm.name }).await?;
    let supervisor = api.supervisor.clone();
    let _ = tokio::task::spawn_blocking(move || supervisor.forget(&name)).await;
    Ok(StatusCode::NO_CONTENT)
}

async fn console_vm(
    State(api): State<VmApi>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    local_vm(&api, &name).await?;
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
    Ok(text)
}
