//! Serving a port on its vhost-user socket, one frontend at a time, for as
//! long as the port exists: when QEMU or testpmd goes away (or is killed),
//! the socket takes the next one, and the switch keeps running.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::unix::net::UnixListener;

use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::port::NetBackend;

/// How long the worker thread of a closed connection may take to stop.
const WORKER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of a port's server.
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

/// A port served on a vhost-user socket.
pub struct NetServer {
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NetServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetServer")
            .field("path", &self.path)
            .field("connected", &self.connected())
            .finish_non_exhaustive()
    }
}

impl NetServer {
    /// Creates the socket (replacing a stale one) and starts serving.
    pub fn start(backend: NetBackend, path: &Path) -> Result<NetServer, ServerError> {
        let listen_error = |e: std::io::Error| ServerError::Listen {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(listen_error)?;
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            let name = format!("vhost-net-{}", backend.id());
            std::thread::Builder::new()
                .name(name.clone())
                .spawn({
                    let path = path.to_owned();
                    move || serve(name, backend, &listener, &path, &shared)
                })
                .map_err(ServerError::Thread)?
        };
        Ok(NetServer {
            path: path.to_owned(),
            shared,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a frontend is connected now.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
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

impl Drop for NetServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn serve(name: String, backend: NetBackend, listener: &UnixListener, path: &Path, shared: &Shared) {
    // The vhost crate's handler connects here; the relay joins it to the
    // frontend (see `relay`).
    let inner = path.with_extension("sock.relay");
    while !shared.stop.load(Ordering::Acquire) {
        let frontend = match listener.accept() {
            Ok((frontend, _)) => frontend,
            Err(error) => {
                tracing::warn!(%name, %error, "accepting a vhost-user frontend failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.clone(), backend.clone(), memory) {
            Ok(daemon) => daemon,
            Err(error) => {
                tracing::error!(%name, %error, "cannot set up a vhost-user connection handler");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let _ = std::fs::remove_file(&inner);
        let handler_side = match UnixListener::bind(&inner) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%name, %error, path = %inner.display(), "cannot make the relay socket");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let started = daemon.start_client(&inner.to_string_lossy());
        let accepted = handler_side.accept();
        let _ = std::fs::remove_file(&inner);
        let backend_side = match (started, accepted) {
            (Ok(()), Ok((stream, _))) => stream,
            (Err(error), _) => {
                tracing::warn!(%name, %error, "cannot start the vhost-user handler");
                continue;
            }
            (_, Err(error)) => {
                tracing::warn!(%name, %error, "cannot reach the vhost-user handler");
                continue;
            }
        };
        let relay = std::thread::Builder::new()
            .name(format!("{name}-relay"))
            .spawn(move || crate::relay::relay(frontend, backend_side));
        if let Err(error) = relay {
            tracing::error!(%name, %error, "cannot start the vhost-user relay");
            daemon.request_shutdown();
        }
        if shared.stop.load(Ordering::Acquire) {
            daemon.request_shutdown();
        } else {
            tracing::info!(%name, "vhost-user-net frontend connected");
            shared.connected.store(true, Ordering::Release);
            *shared.connection.lock().expect("lock") = daemon.shutdown_handle();
        }
        match daemon.wait() {
            Ok(()) => tracing::info!(%name, "vhost-user-net frontend disconnected"),
            Err(error) => {
                tracing::warn!(%name, %error, "vhost-user-net connection ended with an error")
            }
        }
        shared.connected.store(false, Ordering::Release);
        *shared.connection.lock().expect("lock") = None;
        // The worker thread must be gone before the next connection: it
        // holds the old connection's rings.
        let handlers = daemon.get_epoll_handlers();
        for handler in &handlers {
            handler.send_exit_event();
        }
        drop(daemon);
        let deadline = Instant::now() + WORKER_EXIT_TIMEOUT;
        while handlers
            .iter()
            .any(|handler| Arc::strong_count(handler) > 1)
        {
            if Instant::now() > deadline {
                tracing::error!(%name, "vhost-user-net worker thread did not stop; not accepting a new frontend");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(handlers);
        backend.reset();
    }
}
