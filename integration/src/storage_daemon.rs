//! Child daemons for tests and benchmarks: qemu-storage-daemon as the reference vhost-user-blk
//! peer, and the stop-with-SIGTERM routine every daemon child shares.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for a daemon's socket to appear.
pub const STARTUP_WAIT_MAX: Duration = Duration::from_secs(20);
/// Longest wait for a daemon to exit after SIGTERM before it is killed.
pub const SHUTDOWN_WAIT_MAX: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Errors of starting and stopping daemons.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The image file could not be created or sized.
    #[error("cannot create the image {path}")]
    Image {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The log file could not be created.
    #[error("cannot create the log file {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The program could not be started.
    #[error("cannot start {program}; is it installed and on PATH?")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The daemon exited before it was ready.
    #[error("{program} exited with {status} before {socket} appeared; see {log}")]
    ExitedEarly {
        program: String,
        status: ExitStatus,
        socket: PathBuf,
        log: PathBuf,
    },
    /// The socket did not appear in time.
    #[error("{socket} did not appear within {waited:?}; see {log}")]
    NotReady {
        socket: PathBuf,
        waited: Duration,
        log: PathBuf,
    },
    /// Waiting for or signalling the child failed.
    #[error("cannot {operation} the child process {pid}")]
    Child {
        operation: &'static str,
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Result of daemon operations.
pub type Result<T> = std::result::Result<T, DaemonError>;

/// A running qemu-storage-daemon exporting one raw file over vhost-user-blk; stopped on drop.
#[derive(Debug)]
pub struct QemuStorageDaemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl QemuStorageDaemon {
    /// Creates (or resizes) the raw `image` to `size_bytes` and exports it on `socket` with one
    /// queue, O_DIRECT and io_uring. The daemon's output goes to `log`.
    pub fn start(
        program: &str,
        image: &Path,
        size_bytes: u64,
        socket: &Path,
        log: &Path,
    ) -> Result<Self> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(image)
            .map_err(|source| DaemonError::Image {
                path: image.to_path_buf(),
                source,
            })?;
        file.set_len(size_bytes)
            .map_err(|source| DaemonError::Image {
                path: image.to_path_buf(),
                source,
            })?;
        drop(file);
        let mut command = Command::new(program);
        command
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={},cache.direct=on,aio=io_uring",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=1",
                socket.display()
            ));
        let child = spawn_logged(&mut command, program, log)?;
        let mut daemon = Self {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        if let Some(child) = daemon.child.as_mut() {
            wait_for_path(child, program, socket, log)?;
        }
        Ok(daemon)
    }

    /// The vhost-user-blk socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the daemon with SIGTERM (SIGKILL after [`SHUTDOWN_WAIT_MAX`]).
    pub fn stop(mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .expect("the child is present until stop or drop, and stop consumes self");
        terminate(&mut child)
    }
}

impl Drop for QemuStorageDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Nothing to report to from a destructor; the log file keeps the daemon's view.
            let _ = terminate(&mut child);
        }
    }
}

/// Starts `command` with stdout and stderr going to `log`.
fn spawn_logged(command: &mut Command, program: &str, log: &Path) -> Result<Child> {
    let log_file = File::create(log).map_err(|source| DaemonError::Log {
        path: log.to_path_buf(),
        source,
    })?;
    let log_clone = log_file.try_clone().map_err(|source| DaemonError::Log {
        path: log.to_path_buf(),
        source,
    })?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_clone))
        .stderr(Stdio::from(log_file))
        .spawn()
        .map_err(|source| DaemonError::Spawn {
            program: program.to_string(),
            source,
        })
}

/// Waits until `path` exists, failing early if the child exits and after
/// [`STARTUP_WAIT_MAX`].
fn wait_for_path(child: &mut Child, program: &str, path: &Path, log: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        let pid = child.id();
        if let Some(status) = child.try_wait().map_err(|source| DaemonError::Child {
            operation: "poll",
            pid,
            source,
        })? {
            return Err(DaemonError::ExitedEarly {
                program: program.to_string(),
                status,
                socket: path.to_path_buf(),
                log: log.to_path_buf(),
            });
        }
        if started.elapsed() >= STARTUP_WAIT_MAX {
            return Err(DaemonError::NotReady {
                socket: path.to_path_buf(),
                waited: STARTUP_WAIT_MAX,
                log: log.to_path_buf(),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Sends SIGTERM to `child` and reaps it, escalating to SIGKILL after [`SHUTDOWN_WAIT_MAX`].
pub fn terminate(child: &mut Child) -> Result<ExitStatus> {
    let pid = child.id();
    let child_error = |operation| {
        move |source| DaemonError::Child {
            operation,
            pid,
            source,
        }
    };
    if let Some(status) = child.try_wait().map_err(child_error("poll"))? {
        return Ok(status);
    }
    let raw_pid = libc::pid_t::try_from(pid).map_err(|_| DaemonError::Child {
        operation: "signal",
        pid,
        source: std::io::Error::other("pid out of range"),
    })?;
    // SAFETY: kill(2) has no memory-safety preconditions. `raw_pid` is our own child, which
    // has not been reaped (try_wait above returned None), so the pid cannot have been reused.
    let signalled = unsafe { libc::kill(raw_pid, libc::SIGTERM) };
    if signalled != 0 {
        return Err(child_error("signal")(std::io::Error::last_os_error()));
    }
    let started = Instant::now();
    while started.elapsed() < SHUTDOWN_WAIT_MAX {
        if let Some(status) = child.try_wait().map_err(child_error("poll"))? {
            return Ok(status);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    child.kill().map_err(child_error("kill"))?;
    child.wait().map_err(child_error("wait"))
}
