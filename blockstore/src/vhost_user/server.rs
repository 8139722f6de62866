//! Serving a volume on a vhost-user socket, one frontend at a time, for as
//! long as the volume stays attached.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::device::BlkBackend;

/// How long the worker threads of a closed connection may take to stop.
const WORKER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of a block server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on vhost-user socket {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
    #[error("cannot start the server thread: {0}")]
    Thread(#[source] std::io::Error),
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    connected: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stop", &self.stop)
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

/// A volume served on a vhost-user socket. The socket accepts one frontend
/// at a time; when it disconnects (or is killed) the socket accepts the
/// next one, so QEMU can be restarted without touching `fabricd`.
#[derive(Debug)]
pub struct BlkServer {
    path: PathBuf,
    backend: BlkBackend,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BlkServer {
    /// Creates the socket (replacing a stale one) and starts serving.
    pub fn start(backend: BlkBackend, path: &Path) -> Result<BlkServer, ServerError> {
        let listener = Listener::new(path, true).map_err(|e| ServerError::Listen {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let shared = Arc::new(Shared::default());
        let thread = {
            let backend = backend.clone();
            let shared = shared.clone();
            let name = format!("vhost-blk-{}", backend.name());
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || serve(name, backend, listener, &shared))
                .map_err(ServerError::Thread)?
        };
        Ok(BlkServer {
            path: path.to_owned(),
            backend,
            shared,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backend, for counters.
    pub fn backend(&self) -> &BlkBackend {
        &self.backend
    }

    /// Whether a frontend is connected now.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Disconnects the frontend if any, stops accepting and removes the
    /// socket. Requests in flight finish their I/O first.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(handle) = self.shared.connection.lock().expect("lock").as_ref() {
            handle.shutdown();
        }
        // Wake the accept() the server thread may be blocked in.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for BlkServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn serve(name: String, backend: BlkBackend, mut listener: Listener, shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.clone(), backend.clone(), memory) {
            Ok(daemon) => daemon,
            Err(error) => {
                tracing::error!(%name, %error, "cannot set up a vhost-user connection handler");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        for (handler, (fd, token)) in daemon
            .get_epoll_handlers()
            .iter()
            .zip(backend.completion_fds())
        {
            if let Err(error) = handler.register_listener(fd, EventSet::IN, u64::from(token)) {
                tracing::error!(%name, %error, "cannot watch the I/O completion queue");
            }
        }
        if let Err(error) = daemon.start(&mut listener) {
            tracing::warn!(%name, %error, "accepting a vhost-user frontend failed");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if shared.stop.load(Ordering::Acquire) {
            daemon.request_shutdown();
        } else {
            tracing::info!(%name, "vhost-user frontend connected");
            shared.connected.store(true, Ordering::Release);
            *shared.connection.lock().expect("lock") = daemon.shutdown_handle();
        }
        match daemon.wait() {
            Ok(()) => tracing::info!(%name, "vhost-user frontend disconnected"),
            Err(error) => {
                tracing::warn!(%name, %error, "vhost-user connection ended with an error")
            }
        }
        shared.connected.store(false, Ordering::Release);
        *shared.connection.lock().expect("lock") = None;
        // Stop this connection's worker threads and wait until they are
        // gone: the completion eventfds are shared with the next
        // connection's workers, and a late event on an old thread would
        // complete requests into the old connection's rings.
        let handlers = daemon.get_epoll_handlers();
        for (handler, (fd, token)) in handlers.iter().zip(backend.completion_fds()) {
            let _ = handler.unregister_listener(fd, EventSet::IN, u64::from(token));
            handler.send_exit_event();
        }
        drop(daemon);
        let deadline = Instant::now() + WORKER_EXIT_TIMEOUT;
        while handlers
            .iter()
            .any(|handler| Arc::strong_count(handler) > 1)
        {
            if Instant::now() > deadline {
                tracing::error!(%name, "vhost-user worker threads did not stop; not accepting a new frontend");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(handlers);
        backend.reset_after_disconnect();
    }
}
