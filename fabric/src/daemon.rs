//! The daemon's life cycle: claim the data directory, serve the API, commit
//! periodically, and shut down cleanly on SIGTERM or SIGINT.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

use crate::api;
use crate::cluster::runtime::ClusterRuntime;
use crate::cluster::transport::NodeServices;
use crate::cluster_api::{self, ClusterHandle};
use crate::config::Config;
use crate::node::Node;

/// An exclusive claim on a data directory, held for the daemon's life.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Creates the data directory if needed, checks that it can be written,
/// and takes its lock so that two daemons never share one.
pub fn claim_data_dir(dir: &Path) -> anyhow::Result<DataDirLock> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!("cannot create data directory {}; choose another with --data-dir or `data_dir` in the config file", dir.display())
    })?;
    let path = dir.join("fabricd.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| {
            format!(
                "data directory {} is not writable (cannot open {})",
                dir.display(),
                path.display()
            )
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "data directory {} is in use by another fabricd (pid {}); stop it or use another data directory",
            dir.display(),
            holder.trim()
        );
    }
    file.set_len(0).context("cannot write the lock file")?;
    write!(file, "{}", std::process::id()).context("cannot write the lock file")?;
    Ok(DataDirLock { _file: file })
}

fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create API socket directory {}", dir.display()))?;
    }
    if path.exists() {
        // A live daemon would hold the data directory lock; anything here is
        // left over from a daemon that was killed.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "API socket {} is in use by another process; set api_socket to another path",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale API socket {}", path.display()))?;
    }
    UnixListener::bind(path)
        .with_context(|| format!("cannot listen on API socket {}", path.display()))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A random number that differs at every start of the process: replicas
/// tell frontends they restarted (and lost what they had not committed).
fn incarnation() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into the local buffer.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 4, 0) };
    if filled == 4 {
        u32::from_ne_bytes(bytes)
    } else {
        // Time and pid differ between two starts well enough.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        nanos ^ std::process::id()
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let _lock = claim_data_dir(&config.data_dir)?;
    let node = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Node::start(&config)).await??
    };
    let node = Arc::new(node);
    let settings = config.cluster.settings();
    let handle_slot: Arc<std::sync::OnceLock<std::sync::Weak<ClusterHandle>>> = Arc::default();
    let replication =
        crate::replication::node_service(node.clone(), handle_slot.clone(), incarnation());
    let switch = crate::switch::NodeSwitch::new(config.socket_dir.clone());
    let services = NodeServices {
        replication: Some(replication),
        api: Arc::default(),
        switch: Some(switch.clone()),
    };
    let membership = ClusterRuntime::resume(&config.data_dir, &settings, services.clone()).await?;
    let cluster = Arc::new(ClusterHandle {
        data_dir: config.data_dir.clone(),
        settings,
        runtime: tokio::sync::RwLock::new(membership),
        services: services.clone(),
        replication_settings: config.replication.settings(),
    });
    let _ = handle_slot.set(Arc::downgrade(&cluster));
    tokio::spawn(api::resume_replicated(node.clone(), cluster.clone()));
    tokio::spawn(crate::replication::reclaim(node.clone(), cluster.clone()));
    tokio::spawn(crate::switch::reconcile_loop(
        switch.clone(),
        cluster.clone(),
    ));
    // VMs run `vmrun`, found beside this binary.
    let vmrun = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("vmrun")))
        .unwrap_or_else(|| "vmrun".into());
    // Taking over the runners a previous daemon left may wait on them.
    let vms_dir = config.data_dir.join("vms");
    let vms =
        tokio::task::spawn_blocking(move || crate::vms::VmSupervisor::new(vmrun, vms_dir)).await?;
    tokio::spawn(crate::vms::watch(vms.clone()));
    let router = api::router(node.clone(), cluster.clone())
        .merge(cluster_api::router(cluster.clone()))
        .merge(crate::switch::router(switch.clone(), cluster.clone()))
        .merge(crate::vms::router(
            vms.clone(),
            node.clone(),
            switch,
            cluster.clone(),
        ));
    let _ = services.api.set(router.clone());

    let unix = bind_unix(&config.api_socket)?;
    let _socket_guard = RemoveOnDrop(config.api_socket.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    {
        let router = router.clone();
        let mut stop = stop_rx.clone();
        servers.spawn(async move {
            axum::serve(unix, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        });
    }
    if let Some(address) = config.api_tcp {
        let tcp = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on API address {address}"))?;
        let mut stop = stop_rx.clone();
        servers.spawn(async move {
            axum::serve(tcp, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        });
    }
    tracing::info!(
        data_dir = %config.data_dir.display(),
        api_socket = %config.api_socket.display(),
        api_tcp = ?config.api_tcp,
        socket_dir = %config.socket_dir.display(),
        "fabricd is ready"
    );

    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        Some(result) = servers.join_next() => {
            tracing::error!(?result, "an API server stopped unexpectedly; shutting down");
        }
    }
    let _ = stop_tx.send(true);
    {
        let vms = vms.clone();
        let _ = tokio::task::spawn_blocking(move || vms.shutdown()).await;
    }
    let shutdown = tokio::time::timeout(Duration::from_secs(10), async {
        while servers.join_next().await.is_some() {}
    });
    if shutdown.await.is_err() {
        tracing::warn!("API connections did not close within 10 s; closing them");
    }
    if let Some(runtime) = cluster.runtime.write().await.take() {
        runtime.shutdown().await;
    }
    tokio::task::spawn_blocking(move || node.shutdown()).await??;
    tracing::info!("fabricd stopped; all completed writes are committed");
    Ok(())
}
