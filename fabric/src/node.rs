//! The node: the volume store and the vhost-user servers of attached
//! volumes. The API calls into it; it knows nothing of HTTP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blockstore::vhost_user::{BlkBackend, BlkOptions, BlkServer};
use blockstore::{Store, StoreOptions, VolumeRecord, BLOCK_SIZE};
use serde::Serialize;

use crate::config::Config;

/// Errors of node operations, each mapped to an API status.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] blockstore::Error),
    #[error("volume {0:?} is attached; detach it first with `fabctl volume detach {0}`")]
    Attached(String),
    #[error(
        "volume {0:?} is in use by a connected frontend; stop the VM first, or detach with --force"
    )]
    InUse(String),
    #[error("volume {0:?} is not attached")]
    NotAttached(String),
    #[error("cannot serve volume {name:?}: {reason}")]
    Serve { name: String, reason: String },
}

/// Space use of a volume, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct UsageView {
    pub allocated_bytes: u64,
    pub file_bytes: u64,
    pub unflushed_bytes: u64,
}

/// Request counters of an attached volume.
#[derive(Debug, Clone, Serialize)]
pub struct CountersView {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub invalid_requests: u64,
    pub io_errors: u64,
}

/// Where and how an attached volume is served.
#[derive(Debug, Clone, Serialize)]
pub struct AttachmentView {
    pub socket: PathBuf,
    pub connected: bool,
    pub queues: u16,
    /// QEMU arguments that attach the volume; the guest's memory must be a
    /// shared memory backend (see `qemu_memory_args`).
    pub qemu_args: Vec<String>,
    pub qemu_memory_args: Vec<String>,
    pub counters: CountersView,
}

/// A volume as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub block_size: u64,
    pub created_unix: u64,
    pub usage: Option<UsageView>,
    pub attachment: Option<AttachmentView>,
}

/// The node's volumes and their servers.
#[derive(Debug)]
pub struct Node {
    store: Store,
    socket_dir: PathBuf,
    options: BlkOptions,
    servers: Mutex<HashMap<String, BlkServer>>,
    /// Replication drivers of replicated volumes attached here.
    drivers: Mutex<HashMap<String, crate::replication::driver::DriverHandle>>,
}

/// The QEMU arguments for a volume served on `socket`.
pub fn qemu_args(name: &str, socket: &Path, queues: u16) -> Vec<String> {
    let chardev = format!("fabric-{name}");
    vec![
        "-chardev".into(),
        format!("socket,id={chardev},path={}", socket.display()),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev={chardev},num-queues={queues}"),
    ]
}

/// The guest-memory arguments vhost-user needs, for a guest of `memory`
/// (QEMU size syntax, e.g. "1G"; `-m` must match).
pub fn qemu_memory_args(memory: &str) -> Vec<String> {
    vec![
        "-m".into(),
        memory.into(),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={memory},share=on"),
        "-numa".into(),
        "node,memdev=mem".into(),
    ]
}

impl Node {
    /// Opens the store and serves every volume that was attached when the
    /// node last stopped.
    pub fn start(config: &Config) -> Result<Node, NodeError> {
        let store = Store::open(
            &config.data_dir,
            StoreOptions {
                direct_io: config.direct_io,
                commit_interval: (config.commit_interval_ms > 0)
                    .then(|| std::time::Duration::from_millis(config.commit_interval_ms)),
            },
        )?;
        let node = Node {
            store,
            socket_dir: config.socket_dir.clone(),
            options: BlkOptions {
                queues_max: config.queues_max,
            },
            servers: Mutex::new(HashMap::new()),
            drivers: Mutex::new(HashMap::new()),
        };
        for record in node.store.list()? {
            if let Some(socket) = &record.attached_socket {
                match node.serve(&record.name, socket) {
                    Ok(()) => {
                        tracing::info!(volume = %record.name, socket = %socket.display(), "volume attached again")
                    }
                    Err(error) => {
                        tracing::error!(volume = %record.name, %error, "cannot re-attach volume")
                    }
                }
            }
        }
        Ok(node)
    }

    fn servers(&self) -> std::sync::MutexGuard<'_, HashMap<String, BlkServer>> {
        self.servers.lock().expect("server table lock poisoned")
    }

    fn view(&self, record: VolumeRecord) -> VolumeView {
        let servers = self.servers();
        let server = servers.get(&record.name);
        // The store hands out one shared Volume per name, the same one an
        // attached volume's server uses.
        let usage = self.store.volume(&record.name).ok().map(|volume| {
            let usage = volume.usage();
            UsageView {
                allocated_bytes: usage.mapped_blocks * BLOCK_SIZE,
                file_bytes: usage.file_blocks * BLOCK_SIZE,
                unflushed_bytes: usage.dirty_blocks * BLOCK_SIZE,
            }
        });
        let attachment = server.map(|server| {
            let c = server.backend().counters();
            let load = |counter: &std::sync::atomic::AtomicU64| {
                counter.load(std::sync::atomic::Ordering::Relaxed)
            };
            AttachmentView {
                socket: server.path().to_owned(),
                connected: server.connected(),
                queues: self.options.queues_max,
                qemu_args: qemu_args(&record.name, server.path(), self.options.queues_max),
                qemu_memory_args: qemu_memory_args("1G"),
                counters: CountersView {
                    reads: load(&c.reads),
                    writes: load(&c.writes),
                    flushes: load(&c.flushes),
                    discards: load(&c.unmaps),
                    bytes_read: load(&c.bytes_read),
                    bytes_written: load(&c.bytes_written),
                    invalid_requests: load(&c.invalid_requests),
                    io_errors: load(&c.io_errors),
                },
            }
        });
        VolumeView {
            id: record.id,
            name: record.name,
            size_bytes: record.size_bytes,
            block_size: BLOCK_SIZE,
            created_unix: record.created_unix,
            usage,
            attachment,
        }
    }

    /// All volumes.
    pub fn list(&self) -> Result<Vec<VolumeView>, NodeError> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .map(|r| self.view(r))
            .collect())
    }

    /// One volume.
    pub fn show(&self, name: &str) -> Result<VolumeView, NodeError> {
        Ok(self.view(self.store.get(name)?))
    }

    /// Creates a volume.
    pub fn create(&self, name: &str, size_bytes: u64) -> Result<VolumeView, NodeError> {
        Ok(self.view(self.store.create(name, size_bytes)?))
    }

    /// Marks a volume as the cluster's, once the metadata records it.
    pub fn set_cluster(&self, name: &str) -> Result<(), NodeError> {
        self.store.set_cluster(name)?;
        Ok(())
    }

    /// The cluster's volumes held here, as (name, id).
    pub fn cluster_volumes(&self) -> Result<Vec<(String, String)>, NodeError> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|record| record.cluster)
            .map(|record| (record.name, record.id))
            .collect())
    }

    /// Deletes a detached volume.
    pub fn delete(&self, name: &str) -> Result<(), NodeError> {
        let record = self.store.get(name)?;
        if record.attached_socket.is_some() || self.servers().contains_key(name) {
            return Err(NodeError::Attached(name.to_owned()));
        }
        Ok(self.store.delete(name)?)
    }

    fn serve(&self, name: &str, socket: &Path) -> Result<(), NodeError> {
        let volume = self.store.volume(name)?;
        let serve_error = |reason: String| NodeError::Serve {
            name: name.to_owned(),
            reason,
        };
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                serve_error(format!(
                    "cannot create socket directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let backend =
            BlkBackend::new(volume, self.options).map_err(|e| serve_error(e.to_string()))?;
        let server = BlkServer::start(backend, socket).map_err(|e| serve_error(e.to_string()))?;
        self.servers().insert(name.to_owned(), server);
        Ok(())
    }

    /// Serves a volume on a vhost-user socket; attaching an attached volume
    /// returns its current attachment.
    pub fn attach(&self, name: &str) -> Result<VolumeView, NodeError> {
        let record = self.store.get(name)?;
        if !self.servers().contains_key(name) {
            let socket = self.socket_dir.join(format!("{name}.sock"));
            self.serve(name, &socket)?;
            if let Err(error) = self.store.set_attachment(name, Some(socket)) {
                if let Some(server) = self.servers().remove(name) {
                    server.stop();
                }
                return Err(error.into());
            }
        }
        self.show(&record.name)
    }

    /// Stops serving a volume. Refused while a frontend is connected,
    /// unless `force`, which disconnects it (its guest sees I/O errors).
    pub fn detach(&self, name: &str, force: bool) -> Result<VolumeView, NodeError> {
        let record = self.store.get(name)?;
        let server = {
            let mut servers = self.servers();
            match servers.get(name) {
                None if record.attached_socket.is_none() => {
                    return Err(NodeError::NotAttached(name.to_owned()))
                }
                Some(server) if server.connected() && !force => {
                    return Err(NodeError::InUse(name.to_owned()))
                }
                _ => {}
            }
            // The driver goes before the server (attach adds them the other
            // way round): `volume show` reads the driver, then the server,
            // so a driver without its server is seen only by a show that
            // read the driver before a detach ran to its end.
            self.drivers().remove(name);
            servers.remove(name)
        };
        if let Some(server) = server {
            let volume = server.backend().volume().cloned();
            server.stop();
            if let Some(volume) = volume {
                volume.sync_and_commit()?;
            }
        }
        self.store.set_attachment(name, None)?;
        self.show(name)
    }

    /// This node's copy of a replicated volume, created (empty, thin) the
    /// first time a frontend reaches it; and the highest generation it has
    /// seen.
    pub fn replica_volume(
        &self,
        name: &str,
        id: &str,
        size_bytes: u64,
    ) -> Result<(std::sync::Arc<blockstore::Volume>, u64), NodeError> {
        let record = match self.store.get(name) {
            Ok(record) if record.id == id => record,
            Ok(record) if !record.cluster => {
                return Err(NodeError::Store(blockstore::Error::Replication {
                    volume: name.to_owned(),
                    reason: format!(
                        "this node has a volume {name:?} of its own (id {}), not the cluster's {id}; rename or delete it",
                        record.id
                    ),
                }))
            }
            Ok(record) => {
                // This node's copy of an earlier volume of the same name,
                // deleted since: never serve its blocks as the new one's.
                tracing::warn!(
                    volume = name,
                    old = %record.id,
                    new = id,
                    "removing this node's copy of an earlier volume of this name"
                );
                self.delete(name)?;
                self.store.create_copy(name, size_bytes, id)?
            }
            Err(blockstore::Error::NoSuchVolume(_)) => {
                tracing::info!(volume = name, size_bytes, "creating this node's replica");
                self.store.create_copy(name, size_bytes, id)?
            }
            Err(error) => return Err(error.into()),
        };
        if record.size_bytes != size_bytes {
            return Err(NodeError::Store(blockstore::Error::InvalidSize {
                size: record.size_bytes,
                reason: "the local volume of this name has another size than the cluster's",
            }));
        }
        let volume = self.store.volume(name)?;
        volume.use_page_cache()?;
        Ok((volume, record.replica_generation))
    }

    /// Records the highest generation a replica has seen, durably.
    pub fn set_replica_generation(&self, name: &str, generation: u64) -> Result<(), NodeError> {
        self.store.set_replica_generation(name, generation)?;
        Ok(())
    }

    /// Serves a replicated volume on `socket` through `backend` (its
    /// queues go to the replication driver). The attachment is not
    /// recorded here: after a restart, the cluster metadata (which names
    /// this node the volume's frontend) has it attached again, with a new
    /// generation (`api::resume_replicated`).
    pub fn attach_replicated(
        &self,
        name: &str,
        backend: BlkBackend,
        driver: crate::replication::driver::DriverHandle,
    ) -> Result<VolumeView, NodeError> {
        let socket = self.socket_dir.join(format!("{name}.sock"));
        let serve_error = |reason: String| NodeError::Serve {
            name: name.to_owned(),
            reason,
        };
        std::fs::create_dir_all(&self.socket_dir).map_err(|e| {
            serve_error(format!(
                "cannot create socket directory {}: {e}",
                self.socket_dir.display()
            ))
        })?;
        {
            let mut servers = self.servers();
            if servers.contains_key(name) {
                return Err(NodeError::Attached(name.to_owned()));
            }
            let server =
                BlkServer::start(backend, &socket).map_err(|e| serve_error(e.to_string()))?;
            servers.insert(name.to_owned(), server);
        }
        // After the server: `volume show` reads the driver first and counts
        // on an attached volume's server being there with it.
        self.drivers().insert(name.to_owned(), driver);
        self.show(name)
    }

    /// Virtqueues each attached volume offers.
    pub fn queues(&self) -> u16 {
        self.options.queues_max
    }

    /// The replication driver of a volume attached here, if replicated.
    pub fn driver(&self, name: &str) -> Option<crate::replication::driver::DriverHandle> {
        self.drivers().get(name).cloned()
    }

    fn drivers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, crate::replication::driver::DriverHandle>> {
        self.drivers.lock().expect("driver table lock poisoned")
    }

    /// Commits completed writes of every open volume.
    pub fn sync_all(&self) -> Result<(), NodeError> {
        Ok(self.store.sync_all()?)
    }

    /// Stops every server (the volumes stay attached in the metadata, so
    /// they are served again at the next start) and commits all volumes.
    pub fn shutdown(&self) -> Result<(), NodeError> {
        let servers: Vec<BlkServer> = self.servers().drain().map(|(_, s)| s).collect();
        for server in servers {
            server.stop();
        }
        self.sync_all()
    }
}
