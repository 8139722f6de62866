//! The volume store of one node: which volumes exist, creating and
//! deleting them, and opening them for I/O.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::meta::{MetaStore, VolumeRecord};
use crate::volume::{data_file_error, CommitSignal, Volume, BLOCK_SIZE};

/// Largest volume: 1 PiB.
pub const VOLUME_BYTES_MAX: u64 = 1 << 50;
/// Longest volume name.
pub const VOLUME_NAME_BYTES_MAX: usize = 63;

/// How a store runs.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Open data files with O_DIRECT where the filesystem allows.
    pub direct_io: bool,
    /// Commit completed writes at least this often, whether or not guests
    /// flush; `None` commits only on FLUSH, when many changes are pending,
    /// and at close.
    pub commit_interval: Option<Duration>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            direct_io: true,
            commit_interval: Some(Duration::from_secs(5)),
        }
    }
}

type OpenVolumes = Arc<Mutex<HashMap<String, Arc<Volume>>>>;

/// The volumes of a node, under one data directory.
///
/// A background *committer* thread commits volumes whose pending changes
/// pass [`crate::volume::DIRTY_BLOCKS_COMMIT`], and all volumes every
/// `commit_interval`, so that neither the data path nor memory waits on
/// guests that rarely flush.
#[derive(Debug)]
pub struct Store {
    volumes_dir: PathBuf,
    meta: Arc<MetaStore>,
    direct_io: bool,
    open: OpenVolumes,
    commit_signal: Arc<CommitSignal>,
    stop: Arc<AtomicBool>,
    committer: Option<JoinHandle<()>>,
}

/// Checks that a volume name can be used: 1 to 63 characters from
/// `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > VOLUME_NAME_BYTES_MAX {
        Some("it is longer than 63 characters")
    } else if !name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        Some("it must start with a letter or digit")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Some("only letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks that a volume size can be used.
pub fn validate_size(size: u64) -> Result<()> {
    let reason = if size == 0 {
        Some("a volume needs at least one 4 KiB block")
    } else if size % BLOCK_SIZE != 0 {
        Some("it must be a multiple of 4 KiB (4096 bytes)")
    } else if size > VOLUME_BYTES_MAX {
        Some("the largest volume is 1 PiB")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidSize { size, reason }),
        None => Ok(()),
    }
}

fn new_volume_id() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most bytes.len() bytes into the buffer.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != bytes.len() as isize {
        // The kernel always fills 8 bytes once its pool is initialised; fall
        // back to the clock rather than fail volume creation.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    format!("{:016x}", u64::from_le_bytes(bytes))
}

impl Store {
    /// Opens the store in `data_dir` (metadata in `meta/`, data files in
    /// `volumes/`), creating what is missing, and starts its committer.
    pub fn open(data_dir: &Path, options: StoreOptions) -> Result<Store> {
        let volumes_dir = data_dir.join("volumes");
        std::fs::create_dir_all(&volumes_dir)
            .map_err(|source| data_file_error("create the directory of", &volumes_dir, source))?;
        let meta = Arc::new(MetaStore::open(&data_dir.join("meta"))?);
        let open: OpenVolumes = Arc::default();
        let commit_signal: Arc<CommitSignal> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let committer = {
            let open = open.clone();
            let signal = commit_signal.clone();
            let stop = stop.clone();
            // Without a periodic commit the committer still serves requests
            // from the data path; it then only wakes when asked.
            let interval = options.commit_interval.unwrap_or(Duration::from_secs(3600));
            std::thread::Builder::new()
                .name("committer".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        signal.wait(interval);
                        commit_all(&open);
                    }
                })
                .map_err(|source| data_file_error("start the committer for", data_dir, source))?
        };
        Ok(Store {
            volumes_dir,
            meta,
            direct_io: options.direct_io,
            open,
            commit_signal,
            stop,
            committer: Some(committer),
        })
    }

    /// All volumes, by name.
    pub fn list(&self) -> Result<Vec<VolumeRecord>> {
        self.meta.volumes()
    }

    /// The record of one volume.
    pub fn get(&self, name: &str) -> Result<VolumeRecord> {
        self.meta
            .volume(name)?
            .ok_or_else(|| Error::NoSuchVolume(name.to_owned()))
    }

    /// Creates an empty, thin volume.
    pub fn create(&self, name: &str, size_bytes: u64) -> Result<VolumeRecord> {
        self.create_with(name, size_bytes, new_volume_id(), false)
    }

    /// Creates this node's empty copy of the cluster's volume `id` (16 hex
    /// digits), marked as the cluster's.
    pub fn create_copy(&self, name: &str, size_bytes: u64, id: &str) -> Result<VolumeRecord> {
        let hex = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex {
            return Err(Error::CorruptMeta {
                key: format!("vol:{name}"),
                reason: format!("cluster volume id {id:?} is not 16 hex digits"),
            });
        }
        self.create_with(name, size_bytes, id.to_ascii_lowercase(), true)
    }

    fn create_with(
        &self,
        name: &str,
        size_bytes: u64,
        id: String,
        cluster: bool,
    ) -> Result<VolumeRecord> {
        validate_name(name)?;
        validate_size(size_bytes)?;
        let _open = self.open.lock().expect("store lock poisoned");
        if self.meta.volume(name)?.is_some() {
            return Err(Error::VolumeExists(name.to_owned()));
        }
        let record = VolumeRecord {
            id,
            name: name.to_owned(),
            size_bytes,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            attached_socket: None,
            replica_generation: 0,
            cluster,
        };
        self.meta.put_volume(&record)?;
        Ok(record)
    }

    /// Marks a volume as the cluster's (see [`VolumeRecord::cluster`]),
    /// once the cluster metadata records it.
    pub fn set_cluster(&self, name: &str) -> Result<VolumeRecord> {
        let _open = self.open.lock().expect("store lock poisoned");
        let mut record = self.get(name)?;
        record.cluster = true;
        self.meta.put_volume(&record)?;
        Ok(record)
    }

    /// Opens a volume for I/O; all callers share one [`Volume`].
    pub fn volume(&self, name: &str) -> Result<Arc<Volume>> {
        let mut open = self.open.lock().expect("store lock poisoned");
        if let Some(volume) = open.get(name) {
            return Ok(volume.clone());
        }
        let record = self.get(name)?;
        let volume = Arc::new(Volume::open(
            record,
            &self.volumes_dir,
            self.meta.clone(),
            self.direct_io,
            self.commit_signal.clone(),
        )?);
        open.insert(name.to_owned(), volume.clone());
        Ok(volume)
    }

    /// Records where a volume is served (or that it no longer is).
    pub fn set_attachment(&self, name: &str, socket: Option<PathBuf>) -> Result<VolumeRecord> {
        let _open = self.open.lock().expect("store lock poisoned");
        let mut record = self.get(name)?;
        record.attached_socket = socket;
        self.meta.put_volume(&record)?;
        Ok(record)
    }

    /// Records, durably, the highest generation a replica of `name` has
    /// seen.
    pub fn set_replica_generation(&self, name: &str, generation: u64) -> Result<VolumeRecord> {
        let _open = self.open.lock().expect("store lock poisoned");
        let mut record = self.get(name)?;
        record.replica_generation = generation;
        self.meta.put_volume(&record)?;
        Ok(record)
    }

    /// Deletes a volume and its data. The caller must have detached it.
    pub fn delete(&self, name: &str) -> Result<()> {
        let mut open = self.open.lock().expect("store lock poisoned");
        let record = self.get(name)?;
        open.remove(name);
        self.meta.delete_volume(&record)?;
        let path = self.volumes_dir.join(format!("{}.data", record.id));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(data_file_error("remove", &path, source)),
        }
    }

    /// Commits every open volume.
    pub fn sync_all(&self) -> Result<()> {
        commit_all(&self.open).map_or(Ok(()), Err)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.commit_signal.request();
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
        commit_all(&self.open);
    }
}

/// Commits every open volume; returns the first error (all are logged).
fn commit_all(open: &OpenVolumes) -> Option<Error> {
    let volumes: Vec<Arc<Volume>> = open
        .lock()
        .expect("store lock poisoned")
        .values()
        .cloned()
        .collect();
    let mut first_error = None;
    for volume in volumes {
        if let Err(error) = volume.sync_and_commit() {
            tracing::error!(volume = %volume.name(), %error, "commit failed");
            first_error.get_or_insert(error);
        }
    }
    first_error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sizes() {
        for good in ["a", "vm-01.disk_0", "0abc"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a/b", "a b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_size(4096).is_ok());
        assert!(validate_size(0).is_err());
        assert!(validate_size(4097).is_err());
        assert!(validate_size(VOLUME_BYTES_MAX + 4096).is_err());
    }

    #[test]
    fn create_list_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreOptions::default()).expect("open");
        let record = store.create("disk", 1 << 20).expect("create");
        assert_eq!(record.id.len(), 16);
        assert!(matches!(
            store.create("disk", 1 << 20),
            Err(Error::VolumeExists(_))
        ));
        let volume = store.volume("disk").expect("open volume");
        assert_eq!(volume.capacity(), 1 << 20);
        assert_eq!(store.list().expect("list").len(), 1);
        store.delete("disk").expect("delete");
        assert!(matches!(store.get("disk"), Err(Error::NoSuchVolume(_))));
    }
}
