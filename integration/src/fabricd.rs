//! Running real `fabricd` processes, and `fabctl` against them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The directory holding the workspace's binaries (`fabricd`, `fabctl`,
/// `blkbench`): the test executable lives in `<target>/<profile>/deps/`.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("FABRIC_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    let deps = exe.parent().expect("test binaries live in a directory");
    let profile = if deps.ends_with("deps") {
        deps.parent().expect("deps has a parent")
    } else {
        deps
    };
    profile.to_owned()
}

/// Path of a workspace binary; fails with a hint when it was not built.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} not found; build the binaries first with `cargo build --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// A `fabricd` process on a private data directory.
#[derive(Debug)]
pub struct Fabricd {
    child: Option<Child>,
    /// Root of the node's files: data, sockets, log.
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub api_socket: PathBuf,
    pub socket_dir: PathBuf,
    pub log: PathBuf,
    extra_args: Vec<String>,
}

impl Fabricd {
    /// Starts a node whose files all live under `root`.
    pub fn start(root: &Path) -> Result<Fabricd> {
        Fabricd::start_with(root, &[])
    }

    /// Starts a node with extra command-line arguments.
    pub fn start_with(root: &Path, extra_args: &[&str]) -> Result<Fabricd> {
        let mut node = Fabricd {
            child: None,
            root: root.to_owned(),
            data_dir: root.join("data"),
            api_socket: root.join("api.sock"),
            socket_dir: root.join("vhost"),
            log: root.join("fabricd.log"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.root)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(binary("fabricd")?)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--api-socket")
            .arg(&self.api_socket)
            .arg("--socket-dir")
            .arg(&self.socket_dir)
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start fabricd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "fabricd exited at start with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if self.fabctl(&["status"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "fabricd did not answer within 20 s; log:\n{}",
            self.log_text()
        )
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `fabctl` against this node; fails with its stderr if it fails.
    pub fn fabctl(&self, args: &[&str]) -> Result<String> {
        let output = self.fabctl_output(args)?;
        if !output.status.success() {
            bail!(
                "fabctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `fabctl` and returns its whole output, success or not.
    pub fn fabctl_output(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(binary("fabctl")?)
            .arg("--api")
            .arg(&self.api_socket)
            .args(args)
            .output()
            .context("cannot run fabctl")
    }

    /// Runs `fabctl`, which must fail; returns its stderr.
    pub fn fabctl_fails(&self, args: &[&str]) -> Result<String> {
        let output = self.fabctl_output(args)?;
        if output.status.success() {
            bail!(
                "fabctl {} succeeded: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    }

    /// Runs `fabctl -o json ...` and parses its output.
    pub fn fabctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let text = self.fabctl(&all)?;
        serde_json::from_str(&text).with_context(|| format!("fabctl printed no JSON: {text}"))
    }

    /// Creates a volume, attaches it and returns its vhost-user socket.
    pub fn create_attached_volume(&self, name: &str, size: &str) -> Result<PathBuf> {
        self.fabctl(&["volume", "create", name, "--size", size])?;
        let attached = self.fabctl_json(&["volume", "attach", name])?;
        let socket = attached["socket"]
            .as_str()
            .context("attach printed no socket")?;
        Ok(PathBuf::from(socket))
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`: no chance to flush or clean up.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit; fails if it does not exit cleanly.
    pub fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on the pid of a child we still own (not yet reaped).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!(
                        "fabricd exited with {status} after SIGTERM; log:\n{}",
                        self.log_text()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                child.kill()?;
                bail!("fabricd did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the node again on the same files.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.terminate()?;
        }
        self.spawn()
    }
}

impl Drop for Fabricd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // VM runners outlive fabricd by design; a test's must not.
        for pid in self.vm_runner_pids() {
            // SAFETY: kill(2) on a runner this node recorded.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Fabricd {
    /// The pids of the VM runners this node has recorded (and that are
    /// still `vmrun` processes).
    pub fn vm_runner_pids(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir(self.data_dir.join("vms")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| {
                let text = std::fs::read_to_string(e.path()).ok()?;
                let record: serde_json::Value = serde_json::from_str(&text).ok()?;
                let pid = i32::try_from(record["pid"].as_u64()?).ok()?;
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
                exe.ends_with("vmrun").then_some(pid)
            })
            .collect()
    }
}

/// A free TCP port on loopback.
pub fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A free UDP port on loopback.
pub fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A `fabricd` started to take part in a cluster on loopback.
#[derive(Debug)]
pub struct ClusterMember {
    pub node: Fabricd,
    /// Its TCP API address (what `cluster join` talks to).
    pub api: String,
    /// Its cluster (QUIC) address.
    pub cluster: String,
}

/// Starts node `name` under `root/name` with a TCP API and a cluster
/// endpoint on loopback, plus `extra_args` (e.g. `--config FILE`).
///
/// The ports are found free, then given to `fabricd`: a test running
/// beside may take one in between. A node that could not listen for that
/// reason is started again (in a clean directory) on other ports.
pub fn start_cluster_member(root: &Path, name: &str, extra_args: &[&str]) -> Result<ClusterMember> {
    const ATTEMPTS: usize = 5;
    let dir = root.join(name);
    let mut attempt = 1;
    loop {
        let api = format!("127.0.0.1:{}", free_tcp_port()?);
        let cluster = format!("127.0.0.1:{}", free_udp_port()?);
        let mut args = vec![
            "--api-tcp",
            &api,
            "--cluster-listen",
            &cluster,
            "--node-name",
            name,
        ];
        args.extend_from_slice(extra_args);
        match Fabricd::start_with(&dir, &args) {
            Ok(node) => return Ok(ClusterMember { node, api, cluster }),
            Err(error)
                if attempt < ATTEMPTS
                    && format!("{error:#}").contains("Address already in use") =>
            {
                std::fs::remove_dir_all(&dir)?;
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Forms a cluster: the first member runs `cluster init`, every other joins
/// through it with a token of its own.
pub fn form_cluster(members: &[ClusterMember]) -> Result<()> {
    let (first, rest) = members.split_first().context("a cluster needs a member")?;
    first.node.fabctl(&["cluster", "init"])?;
    for member in rest {
        let token = first.node.fabctl(&["cluster", "token"])?.trim().to_owned();
        member
            .node
            .fabctl(&["cluster", "join", &first.api, "--token", &token])?;
    }
    Ok(())
}

/// Waits (up to 30 s) until every member sees `count` voters that are up.
pub fn wait_for_voters_up(members: &[ClusterMember], count: usize) -> Result<()> {
    for member in members {
        let mut ready = false;
        for _ in 0..300 {
            let rows = member.node.fabctl_json(&["node", "list"])?;
            let rows = rows.as_array().cloned().unwrap_or_default();
            ready = rows.len() == count
                && rows.iter().all(|n| {
                    n["state"].as_str() == Some("up") && n["voter"].as_bool() == Some(true)
                });
            if ready {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        anyhow::ensure!(ready, "{count} voters that are up were not seen in 30 s");
    }
    Ok(())
}

/// Starts `count` members under `root` with the `[cluster]` settings
/// `cluster_config` (TOML lines), forms the cluster and waits until every
/// member sees them all as voters that are up.
pub fn start_cluster(
    root: &Path,
    count: usize,
    cluster_config: &str,
) -> Result<Vec<ClusterMember>> {
    start_cluster_with(root, count, &format!("[cluster]\n{cluster_config}"))
}

/// [`start_cluster`] with a whole config file's text.
pub fn start_cluster_with(root: &Path, count: usize, text: &str) -> Result<Vec<ClusterMember>> {
    let config = root.join("fabricd.toml");
    std::fs::write(&config, text)?;
    let config = config.to_string_lossy().into_owned();
    let members = (1..=count)
        .map(|i| start_cluster_member(root, &format!("n{i}"), &["--config", &config]))
        .collect::<Result<Vec<_>>>()?;
    form_cluster(&members)?;
    wait_for_voters_up(&members, count)?;
    Ok(members)
}

/// The members holding `volume`'s replicas, in placement order (indexes
/// into the members of a cluster formed by [`form_cluster`], whose node ids
/// are 1, 2, ...), as `node` has applied it.
pub fn placement(node: &Fabricd, volume: &str) -> Result<Vec<usize>> {
    for _ in 0..300 {
        let shown = node.fabctl_json(&["volume", "show", volume])?;
        if let Some(ids) = shown["placement"].as_array() {
            return Ok(ids
                .iter()
                .filter_map(|id| id.as_u64())
                .map(|id| id as usize - 1)
                .collect());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("no placement of volume {volume:?} in 30 s")
}
