//! The Raft group that agrees on [`Metadata`], on openraft, with its log,
//! vote and state-machine snapshots in RocksDB.
//!
//! - [`TypeConfig`]: the openraft types: [`Command`] in, [`Response`] out.
//! - [`LogStore`]: the log and the vote (column families `raft_log`,
//!   `raft_meta`), every write synced before openraft is told it is done.
//! - [`StateMachine`]: the metadata in memory, rebuilt at start from the
//!   last snapshot (kept in `raft_meta`) plus the committed log after it.

// openraft's error types are large by design and the traits fix them.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use super::metadata::{Command, Metadata, NodeId, Response};

/// How another member is reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member's node name.
    pub name: String,
    /// Its cluster (QUIC) address.
    pub address: String,
}

impl From<&super::metadata::NodeRecord> for Member {
    fn from(record: &super::metadata::NodeRecord) -> Member {
        Member {
            name: record.name.clone(),
            address: record.cluster_address.clone(),
        }
    }
}

openraft::declare_raft_types!(
    /// openraft's types for the metadata group.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Member,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The metadata Raft group.
pub type MetadataRaft = openraft::Raft<TypeConfig>;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

const LOG_FAMILY: &str = "raft_log";
const META_FAMILY: &str = "raft_meta";
const VOTE_KEY: &[u8] = b"vote";
const COMMITTED_KEY: &[u8] = b"committed";
const PURGED_KEY: &[u8] = b"last_purged";
const SNAPSHOT_KEY: &[u8] = b"snapshot";

fn io<E: std::error::Error + 'static>(error: E) -> AnyError {
    AnyError::new(&error)
}

/// Opens the cluster database in `path`.
pub fn open_db(path: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let families = [LOG_FAMILY, META_FAMILY]
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    Ok(Arc::new(DB::open_cf_descriptors(&options, path, families)?))
}

fn family<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    db.cf_handle(name)
        .expect("column families are created at open")
}

fn synced() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

fn get_json<T: for<'a> Deserialize<'a>>(db: &DB, key: &[u8]) -> Result<Option<T>, AnyError> {
    match db.get_cf(family(db, META_FAMILY), key).map_err(io)? {
        Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(io)?)),
        None => Ok(None),
    }
}

fn put_json<T: Serialize>(db: &DB, key: &[u8], value: &T, sync: bool) -> Result<(), AnyError> {
    let bytes = serde_json::to_vec(value).map_err(io)?;
    let options = if sync {
        synced()
    } else {
        WriteOptions::default()
    };
    db.put_cf_opt(family(db, META_FAMILY), key, bytes, &options)
        .map_err(io)
}

/// The Raft log and vote.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl LogStore {
    /// The log store in an opened cluster database.
    pub fn new(db: Arc<DB>) -> LogStore {
        LogStore { db }
    }

    fn last_entry(&self) -> StorageResult<Option<Entry<TypeConfig>>> {
        let mut iter = self
            .db
            .iterator_cf(family(&self.db, LOG_FAMILY), IteratorMode::End);
        match iter.next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item.map_err(|e| StorageIOError::read_logs(io(e)))?;
                let entry =
                    serde_json::from_slice(&value).map_err(|e| StorageIOError::read_logs(io(e)))?;
                Ok(Some(entry))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(index) => *index,
            Bound::Excluded(index) => index + 1,
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        let iter = self.db.iterator_cf(
            family(&self.db, LOG_FAMILY),
            IteratorMode::From(&start.to_be_bytes(), Direction::Forward),
        );
        for item in iter {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(io(e)))?;
            let index = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|e| StorageIOError::read_logs(io(e)))?,
            );
            if !range.contains(&index) {
                break;
            }
            entries.push(
                serde_json::from_slice(&value).map_err(|e| StorageIOError::read_logs(io(e)))?,
            );
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> =
            get_json(&self.db, PURGED_KEY).map_err(StorageIOError::read_logs)?;
        let last_log_id = self
            .last_entry()?
            .map(|entry| entry.log_id)
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        put_json(&self.db, VOTE_KEY, vote, true).map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        get_json(&self.db, VOTE_KEY).map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not synced: a committed index lost in a crash is learned again
        // from the leader; it only lets a restarted node apply sooner.
        put_json(&self.db, COMMITTED_KEY, &committed, false)
            .map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(get_json::<Option<LogId<NodeId>>>(&self.db, COMMITTED_KEY)
            .map_err(StorageIOError::read)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let log = family(&self.db, LOG_FAMILY);
        let mut batch = WriteBatch::default();
        for entry in entries {
            let value =
                serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(io(e)))?;
            batch.put_cf(log, entry.log_id.index.to_be_bytes(), value);
        }
        let result = self.db.write_opt(batch, &synced());
        let reported = result
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(reported);
        result.map_err(|e| StorageIOError::write_logs(io(e)).into())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let log = family(&self.db, LOG_FAMILY);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(log, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
        batch.delete_cf(log, u64::MAX.to_be_bytes());
        self.db
            .write_opt(batch, &synced())
            .map_err(|e| StorageIOError::write_logs(io(e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point first: a crash between the two writes then
        // leaves extra entries, never a hole.
        put_json(&self.db, PURGED_KEY, &Some(log_id), true).map_err(StorageIOError::write_logs)?;
        self.db
            .delete_range_cf(
                family(&self.db, LOG_FAMILY),
                0u64.to_be_bytes(),
                (log_id.index + 1).to_be_bytes(),
            )
            .map_err(|e| StorageIOError::write_logs(io(e)).into())
    }
}

/// A snapshot as kept in RocksDB.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct MachineState {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    metadata: Metadata,
}

/// The metadata state machine. Clones share state.
#[derive(Debug, Clone)]
pub struct StateMachine {
    db: Arc<DB>,
    state: Arc<Mutex<MachineState>>,
    snapshots_built: Arc<std::sync::atomic::AtomicU64>,
}

impl StateMachine {
    /// Restores the state machine from the last snapshot in the database;
    /// openraft then applies the committed log after it.
    pub fn open(db: Arc<DB>) -> Result<StateMachine, StorageError<NodeId>> {
        let mut state = MachineState::default();
        if let Some(stored) = get_json::<StoredSnapshot>(&db, SNAPSHOT_KEY)
            .map_err(|e| StorageIOError::read_snapshot(None, e))?
        {
            state.metadata = Metadata::from_snapshot(&stored.data)
                .map_err(|e| StorageIOError::read_snapshot(None, io(e)))?;
            state.last_applied = stored.meta.last_log_id;
            state.membership = stored.meta.last_membership.clone();
        }
        Ok(StateMachine {
            db,
            state: Arc::new(Mutex::new(state)),
            snapshots_built: Arc::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MachineState> {
        self.state.lock().expect("state machine lock poisoned")
    }

    /// A copy of the metadata as applied on this node (possibly stale on
    /// a follower).
    pub fn metadata(&self) -> Metadata {
        self.state().metadata.clone()
    }

    /// The metadata as applied here and the index of the last entry
    /// applied to it (0 before any), read together.
    pub fn metadata_at(&self) -> (Metadata, u64) {
        let state = self.state();
        (
            state.metadata.clone(),
            state.last_applied.map_or(0, |applied| applied.index),
        )
    }

    /// The last log entry applied here.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.state().last_applied
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (data, last_applied, membership) = {
            let state = self.state();
            (
                state.metadata.to_snapshot(),
                state.last_applied,
                state.membership.clone(),
            )
        };
        let sequence = self
            .snapshots_built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(log_id) => format!("{}-{}-{sequence}", log_id.leader_id, log_id.index),
            None => format!("empty-{sequence}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        put_json(&self.db, SNAPSHOT_KEY, &stored, true)
            .map_err(|e| StorageIOError::write_snapshot(None, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>)> {
        let state = self.state();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut state = self.state();
        let mut responses = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response::Applied,
                EntryPayload::Normal(command) => state.metadata.apply(&command),
                EntryPayload::Membership(membership) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Response::Applied
                }
            };
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let metadata = Metadata::from_snapshot(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io(e)))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        put_json(&self.db, SNAPSHOT_KEY, &stored, true)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        let mut state = self.state();
        state.metadata = metadata;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored: Option<StoredSnapshot> =
            get_json(&self.db, SNAPSHOT_KEY).map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

/// The members of a Raft group, for `initialize`.
pub fn members(nodes: &[(NodeId, Member)]) -> BTreeMap<NodeId, Member> {
    nodes.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(io(e)))?;
            let db = open_db(dir.path()).map_err(|e| StorageIOError::write(io(e)))?;
            Ok((dir, LogStore::new(db.clone()), StateMachine::open(db)?))
        }
    }

    /// openraft's own conformance suite for log and state-machine storage.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).expect("storage passes openraft's suite");
    }
}
