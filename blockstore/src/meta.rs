//! Volume and extent metadata, kept in RocksDB.
//!
//! Key space:
//!
//! | column family | key                                    | value                               |
//! |---------------|----------------------------------------|-------------------------------------|
//! | default       | `schema`                               | the schema version, ASCII           |
//! | default       | `vol:` name                            | [`VolumeRecord`] as JSON            |
//! | `map`         | `map:` id (8 bytes BE) lba (8 bytes BE)| [`Extent`]: physical block u64 LE, crc32 u32 LE |
//!
//! The block maps are written far more than anything else (one entry per
//! 4 KiB block written) and read only when a volume is opened, so their
//! column family uses a vector memtable (appends, sorted once at flush)
//! and no compression; volume records stay in an ordinary skip-list
//! memtable because the API reads them.
//!
//! Big-endian ids and block numbers make a volume's map one contiguous,
//! ordered key range, so a volume is loaded with one scan and deleted with
//! one range deletion.

use std::path::Path;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction, Env, IteratorMode,
    MemtableFactory, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const SCHEMA_KEY: &[u8] = b"schema";
const SCHEMA_VERSION: &[u8] = b"1";
const VOLUME_PREFIX: &[u8] = b"vol:";
const MAP_PREFIX: &[u8] = b"map:";
const MAP_FAMILY: &str = "map";

/// Where a logical block lives in the data file, and the checksum of its
/// 4 KiB of data. A logical block without an extent reads as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Physical block number in the volume's data file.
    pub physical: u64,
    /// crc32 of the block's 4096 bytes.
    pub crc: u32,
}

impl Extent {
    fn encode(self) -> [u8; 12] {
        let mut value = [0u8; 12];
        value[..8].copy_from_slice(&self.physical.to_le_bytes());
        value[8..].copy_from_slice(&self.crc.to_le_bytes());
        value
    }

    fn decode(value: &[u8]) -> Option<Extent> {
        let physical = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
        let crc = u32::from_le_bytes(value.get(8..12)?.try_into().ok()?);
        (value.len() == 12).then_some(Extent { physical, crc })
    }
}

/// The durable description of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Stable identifier, 16 lowercase hex digits. It is also the serial the
    /// guest sees (VIRTIO_BLK_T_GET_ID).
    pub id: String,
    /// Operator-chosen name, unique on this node.
    pub name: String,
    /// Capacity in bytes, a multiple of the 4 KiB block size.
    pub size_bytes: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The vhost-user socket the volume is served on, while attached.
    #[serde(default)]
    pub attached_socket: Option<std::path::PathBuf>,
    /// As a replica: the highest attachment generation seen. Requests of
    /// a lower one are refused (see `docs/replication.md`).
    #[serde(default)]
    pub replica_generation: u64,
    /// The volume belongs to the cluster metadata (created through it, or
    /// this node's copy of a replicated volume, with the cluster's id): it
    /// is deleted here once the metadata no longer places it on this node.
    /// A volume created outside a cluster never is.
    #[serde(default)]
    pub cluster: bool,
}

impl VolumeRecord {
    /// The numeric form of [`VolumeRecord::id`], used in map keys.
    pub fn numeric_id(&self) -> Result<u64> {
        u64::from_str_radix(&self.id, 16).map_err(|_| Error::CorruptMeta {
            key: format!("vol:{}", self.name),
            reason: format!("volume id {:?} is not 16 hex digits", self.id),
        })
    }
}

/// One change to a volume's block map.
#[derive(Clone, Copy, Debug)]
pub struct MapUpdate {
    pub lba: u64,
    pub extent: Option<Extent>,
}

/// The metadata database of one node's volume store.
#[derive(Debug)]
pub struct MetaStore {
    db: DB,
}

fn map_key(volume_id: u64, lba: u64) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..4].copy_from_slice(MAP_PREFIX);
    key[4..12].copy_from_slice(&volume_id.to_be_bytes());
    key[12..].copy_from_slice(&lba.to_be_bytes());
    key
}

fn volume_key(name: &str) -> Vec<u8> {
    [VOLUME_PREFIX, name.as_bytes()].concat()
}

fn sync_options() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

impl MetaStore {
    /// Opens (or creates) the database in `path`.
    pub fn open(path: &Path) -> Result<MetaStore> {
        let mut options = Options::default();
        options.create_if_missing(true);
        // Map commits are synced WAL batches; memtable flushes and
        // compactions run in the background at lower CPU priority, so that
        // on a small machine they yield to the I/O threads.
        let mut env = Env::new().map_err(|source| Error::OpenMeta {
            path: path.to_owned(),
            source,
        })?;
        env.set_background_threads(1);
        env.set_high_priority_background_threads(1);
        env.lower_thread_pool_cpu_priority();
        env.lower_high_priority_thread_pool_cpu_priority();
        options.set_env(&env);
        options.set_max_background_jobs(2);
        options.set_keep_log_file_num(4);
        options.create_missing_column_families(true);
        let mut map_options = Options::default();
        map_options.set_memtable_factory(MemtableFactory::Vector);
        map_options.set_allow_concurrent_memtable_write(false);
        map_options.set_compression_type(DBCompressionType::None);
        map_options.set_write_buffer_size(128 << 20);
        map_options.set_max_write_buffer_number(3);
        // Vector memtables cannot take concurrent writers; commits are
        // serialised per volume, and this is the DB-wide switch.
        options.set_allow_concurrent_memtable_write(false);
        let families = vec![
            ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, Options::default()),
            ColumnFamilyDescriptor::new(MAP_FAMILY, map_options),
        ];
        let db = DB::open_cf_descriptors(&options, path, families).map_err(|source| {
            Error::OpenMeta {
                path: path.to_owned(),
                source,
            }
        })?;
        match db.get(SCHEMA_KEY).map_err(|source| Error::Meta {
            context: "reading the schema version",
            source,
        })? {
            None => db
                .put_opt(SCHEMA_KEY, SCHEMA_VERSION, &sync_options())
                .map_err(|source| Error::Meta {
                    context: "writing the schema version",
                    source,
                })?,
            Some(version) if version == SCHEMA_VERSION => {}
            Some(version) => {
                return Err(Error::CorruptMeta {
                    key: "schema".into(),
                    reason: format!(
                        "schema version {:?} is not supported by this fabricd (expects {:?})",
                        String::from_utf8_lossy(&version),
                        String::from_utf8_lossy(SCHEMA_VERSION)
                    ),
                })
            }
        }
        Ok(MetaStore { db })
    }

    fn map_family(&self) -> &ColumnFamily {
        self.db
            .cf_handle(MAP_FAMILY)
            .expect("the map column family is created at open")
    }

    /// All volume records, ordered by name.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let mut records = Vec::new();
        let iter = self
            .db
            .iterator(IteratorMode::From(VOLUME_PREFIX, Direction::Forward));
        for item in iter {
            let (key, value) = item.map_err(|source| Error::Meta {
                context: "listing volumes",
                source,
            })?;
            if !key.starts_with(VOLUME_PREFIX) {
                break;
            }
            records.push(decode_record(&key, &value)?);
        }
        Ok(records)
    }

    /// The record of the volume called `name`, if any.
    pub fn volume(&self, name: &str) -> Result<Option<VolumeRecord>> {
        let key = volume_key(name);
        let value = self.db.get(&key).map_err(|source| Error::Meta {
            context: "reading a volume record",
            source,
        })?;
        value.map(|value| decode_record(&key, &value)).transpose()
    }

    /// Writes a volume record durably.
    pub fn put_volume(&self, record: &VolumeRecord) -> Result<()> {
        let value = serde_json::to_vec(record).expect("a volume record always serializes");
        self.db
            .put_opt(volume_key(&record.name), value, &sync_options())
            .map_err(|source| Error::Meta {
                context: "writing a volume record",
                source,
            })
    }

    /// Removes a volume record and its whole block map in one durable batch.
    pub fn delete_volume(&self, record: &VolumeRecord) -> Result<()> {
        let id = record.numeric_id()?;
        let mut batch = WriteBatch::default();
        batch.delete(volume_key(&record.name));
        batch.delete_range_cf(self.map_family(), map_key(id, 0), map_key(id + 1, 0));
        self.db
            .write_opt(batch, &sync_options())
            .map_err(|source| Error::Meta {
                context: "deleting a volume",
                source,
            })
    }

    /// Loads the block map of a volume: `(lba, extent)` in lba order.
    pub fn load_map(&self, volume_id: u64) -> Result<Vec<(u64, Extent)>> {
        let start = map_key(volume_id, 0);
        let mut entries = Vec::new();
        let iter = self.db.iterator_cf(
            self.map_family(),
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in iter {
            let (key, value) = item.map_err(|source| Error::Meta {
                context: "loading a block map",
                source,
            })?;
            if key.len() != 20 || key[..12] != start[..12] {
                break;
            }
            let lba = u64::from_be_bytes(key[12..].try_into().expect("key length checked"));
            let extent = Extent::decode(&value).ok_or_else(|| Error::CorruptMeta {
                key: format!("map:{volume_id:016x}:{lba}"),
                reason: format!("extent value has {} bytes, expected 12", value.len()),
            })?;
            entries.push((lba, extent));
        }
        Ok(entries)
    }

    /// Applies map updates in order, in one batch, and waits until the
    /// batch is on stable storage.
    pub fn commit_map(&self, volume_id: u64, updates: &[MapUpdate]) -> Result<()> {
        let family = self.map_family();
        let mut batch = WriteBatch::default();
        for update in updates {
            let key = map_key(volume_id, update.lba);
            match update.extent {
                Some(extent) => batch.put_cf(family, key, extent.encode()),
                None => batch.delete_cf(family, key),
            }
        }
        self.db
            .write_opt(batch, &sync_options())
            .map_err(|source| Error::Meta {
                context: "committing block map updates",
                source,
            })
    }
}

fn decode_record(key: &[u8], value: &[u8]) -> Result<VolumeRecord> {
    serde_json::from_slice(value).map_err(|e| Error::CorruptMeta {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, id: u64) -> VolumeRecord {
        VolumeRecord {
            id: format!("{id:016x}"),
            name: name.into(),
            size_bytes: 1 << 20,
            created_unix: 0,
            attached_socket: None,
            replica_generation: 0,
            cluster: false,
        }
    }

    #[test]
    fn map_survives_reopen_and_delete_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let meta = MetaStore::open(dir.path()).expect("open");
            meta.put_volume(&record("a", 7)).expect("put");
            meta.put_volume(&record("b", 8)).expect("put");
            let extent = Extent {
                physical: 3,
                crc: 0xdead_beef,
            };
            meta.commit_map(
                7,
                &[MapUpdate {
                    lba: 5,
                    extent: Some(extent),
                }],
            )
            .expect("commit");
            meta.commit_map(
                8,
                &[MapUpdate {
                    lba: 1,
                    extent: Some(extent),
                }],
            )
            .expect("commit");
        }
        let meta = MetaStore::open(dir.path()).expect("reopen");
        assert_eq!(meta.volumes().expect("list").len(), 2);
        assert_eq!(
            meta.load_map(7).expect("load"),
            vec![(
                5,
                Extent {
                    physical: 3,
                    crc: 0xdead_beef
                }
            )]
        );
        meta.delete_volume(&record("a", 7)).expect("delete");
        assert!(meta.load_map(7).expect("load").is_empty());
        assert_eq!(meta.load_map(8).expect("load").len(), 1);
        assert!(meta.volume("a").expect("get").is_none());
    }
}
