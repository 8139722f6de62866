//! One volume: its data file, its block map and the rules that keep them in
//! agreement across crashes.
//!
//! # Crash consistency
//!
//! Writes are copy-on-write at block granularity. New data always goes to a
//! freshly allocated physical block; the map entry that points at it (with
//! the block's crc32) changes in memory when the data write completes, and
//! reaches RocksDB only in a *commit*, which first makes the data file
//! durable (`fdatasync`) and then writes the map changes in one synced
//! batch. So the durable map only ever points at durable data whose checksum
//! it holds, and a crash at any instant leaves the last committed map, which
//! is consistent with the data file.
//!
//! A physical block that an overwrite or discard frees stays *quarantined*
//! until the commit that unmaps it is durable and no read that might still
//! be using it is in flight; only then is it reused (or punched out of the
//! file, for discards).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::alloc::Allocator;
use crate::error::{Error, Result};
use crate::meta::{Extent, MapUpdate, MetaStore, VolumeRecord};

/// Logical and physical block size: the unit of allocation and checksums.
pub const BLOCK_SIZE: u64 = 4096;

/// Map changes pending after which the background committer is woken,
/// whether or not the guest flushes: 16 384 blocks is 64 MiB of writes.
pub const DIRTY_BLOCKS_COMMIT: usize = 16_384;
/// Map changes pending after which the data path commits itself before it
/// completes more writes: the committer has fallen behind, and memory for
/// pending changes stays bounded. 262 144 blocks is 1 GiB of writes.
pub const DIRTY_BLOCKS_MAX: usize = 262_144;

/// Whether pending map changes call for a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitNeed {
    /// Nothing to do.
    None,
    /// Wake the background committer.
    Soon,
    /// Commit before completing the request.
    Now,
}

impl CommitNeed {
    fn of(dirty: usize) -> CommitNeed {
        if dirty >= DIRTY_BLOCKS_MAX {
            CommitNeed::Now
        } else if dirty >= DIRTY_BLOCKS_COMMIT {
            CommitNeed::Soon
        } else {
            CommitNeed::None
        }
    }
}

/// Wakes the store's background committer. Volumes opened outside a
/// [`crate::Store`] get one that nobody waits on.
#[derive(Debug, Default)]
pub struct CommitSignal {
    requested: Mutex<bool>,
    wake: std::sync::Condvar,
}

impl CommitSignal {
    /// Asks for a commit soon.
    pub fn request(&self) {
        *self.requested.lock().expect("commit signal poisoned") = true;
        self.wake.notify_one();
    }

    /// Waits until a commit is requested or `timeout` passes; clears the
    /// request.
    pub fn wait(&self, timeout: std::time::Duration) {
        let requested = self.requested.lock().expect("commit signal poisoned");
        let (mut requested, _) = self
            .wake
            .wait_timeout_while(requested, timeout, |requested| !*requested)
            .expect("commit signal poisoned");
        *requested = false;
    }
}

#[derive(Debug, Clone, Copy)]
struct Change {
    lba: u64,
    extent: Option<Extent>,
    /// The physical block this change made unreachable, and whether it came
    /// from a discard (whose space goes back to the filesystem).
    freed: Option<(u64, bool)>,
}

#[derive(Debug, Clone, Copy)]
struct Quarantined {
    epoch: u64,
    block: u64,
    punch: bool,
}

#[derive(Debug, Default)]
struct State {
    map: HashMap<u64, Extent>,
    allocator: Allocator,
    /// Map changes since the last commit, in the order they took effect.
    dirty: Vec<Change>,
    /// Sequence number of `dirty[0]`.
    dirty_base: u64,
    /// Incremented by every commit.
    epoch: u64,
    /// Reads in flight, by the epoch they started in.
    reads: BTreeMap<u64, u32>,
    quarantine: VecDeque<Quarantined>,
    /// Size of the data file in blocks (sparse beyond what is written).
    file_blocks: u64,
}

/// How far the data file is extended at a time once allocation passes its
/// end: 64 MiB.
const FILE_GROWTH_BLOCKS: u64 = 16_384;

/// Usage figures of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeUsage {
    /// Logical blocks that hold data (the rest read as zeros).
    pub mapped_blocks: u64,
    /// Size of the data file in blocks, including blocks awaiting reuse.
    pub file_blocks: u64,
    /// Map changes not yet committed.
    pub dirty_blocks: u64,
}

/// An open volume. Shared by all queues that serve it.
#[derive(Debug)]
pub struct Volume {
    record: VolumeRecord,
    id: u64,
    file: File,
    path: PathBuf,
    direct_io: std::sync::atomic::AtomicBool,
    meta: Arc<MetaStore>,
    commit_signal: Arc<CommitSignal>,
    state: Mutex<State>,
    /// Serialises commits so that map changes reach RocksDB in order.
    commit_lock: Mutex<()>,
}

impl Volume {
    /// Opens the data file of `record` under `dir` and loads its map.
    ///
    /// With `direct_io`, the file is opened with O_DIRECT; where the
    /// filesystem refuses that (tmpfs), it falls back to buffered I/O and
    /// says so in the log. Durability is the same either way: commits call
    /// `fdatasync` before they write the map.
    pub fn open(
        record: VolumeRecord,
        dir: &Path,
        meta: Arc<MetaStore>,
        direct_io: bool,
        commit_signal: Arc<CommitSignal>,
    ) -> Result<Volume> {
        let id = record.numeric_id()?;
        let path = dir.join(format!("{}.data", record.id));
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(flags)
                .open(&path)
        };
        let (file, direct_io) = if direct_io {
            match open(libc::O_DIRECT) {
                Ok(file) => (file, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        path = %path.display(),
                        "the filesystem refuses O_DIRECT; volume data goes through the page cache"
                    );
                    (
                        open(0).map_err(|source| data_file_error("open", &path, source))?,
                        false,
                    )
                }
                Err(source) => return Err(data_file_error("open", &path, source)),
            }
        } else {
            (
                open(0).map_err(|source| data_file_error("open", &path, source))?,
                false,
            )
        };
        let entries = meta.load_map(id)?;
        let allocator = Allocator::from_used(entries.iter().map(|(_, e)| e.physical).collect());
        let map: HashMap<u64, Extent> = entries.into_iter().collect();
        let state = State {
            map,
            allocator,
            ..State::default()
        };
        Ok(Volume {
            record,
            id,
            file,
            path,
            direct_io: std::sync::atomic::AtomicBool::new(direct_io),
            meta,
            commit_signal,
            state: Mutex::new(state),
            commit_lock: Mutex::new(()),
        })
    }

    /// The volume's durable record.
    pub fn record(&self) -> &VolumeRecord {
        &self.record
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.record.size_bytes
    }

    /// The data file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Path of the data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether data I/O bypasses the page cache.
    pub fn direct_io(&self) -> bool {
        self.direct_io.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends data I/O through the page cache from now on. For a replica's
    /// copy: it applies writes one at a time, and with O_DIRECT each would
    /// wait for the disk, while the frontend's FLUSH (and every commit)
    /// still makes them durable with `fdatasync`.
    pub fn use_page_cache(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        if !self.direct_io() {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this volume owns; F_GETFL and
        // F_SETFL pass no memory.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(data_file_error(
                "leave O_DIRECT",
                &self.path,
                std::io::Error::last_os_error(),
            ));
        }
        self.direct_io
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock means the map may be half-updated;
        // serving on would risk returning wrong data, so propagate the panic.
        self.state.lock().expect("volume state lock poisoned")
    }

    /// Checks that `[offset, offset + len)` lies inside the volume and is
    /// block aligned, and returns the first logical block and block count.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        let end = offset.checked_add(len);
        if offset % BLOCK_SIZE != 0
            || len % BLOCK_SIZE != 0
            || end.is_none_or(|end| end > self.capacity())
        {
            return Err(Error::OutOfRange {
                volume: self.record.name.clone(),
                offset,
                len,
                capacity: self.capacity(),
            });
        }
        Ok((offset / BLOCK_SIZE, len / BLOCK_SIZE))
    }

    /// Looks up `count` blocks from `lba` into `out` (`None` reads as zeros)
    /// and registers a read in flight. Returns the epoch to pass to
    /// [`Volume::end_read`].
    pub fn begin_read(&self, lba: u64, count: u64, out: &mut Vec<Option<Extent>>) -> u64 {
        let mut state = self.state();
        out.clear();
        out.extend((lba..lba + count).map(|block| state.map.get(&block).copied()));
        let epoch = state.epoch;
        *state.reads.entry(epoch).or_insert(0) += 1;
        epoch
    }

    /// Ends a read registered by [`Volume::begin_read`].
    pub fn end_read(&self, epoch: u64) {
        let mut state = self.state();
        let count = state
            .reads
            .get_mut(&epoch)
            .expect("end_read matches a begin_read");
        *count -= 1;
        if *count == 0 {
            state.reads.remove(&epoch);
        }
    }

    /// Allocates `count` physical blocks for new data.
    pub fn allocate(&self, count: u64, out: &mut Vec<u64>) -> Result<()> {
        let mut state = self.state();
        self.release_quarantined(&mut state);
        state.allocator.allocate(count, out);
        let high_water = state.allocator.high_water();
        if high_water > state.file_blocks {
            // Old block versions awaiting reuse push allocation past the
            // capacity; grow the (sparse) file ahead in large steps.
            let blocks = high_water + FILE_GROWTH_BLOCKS;
            if let Err(source) = self.file.set_len(blocks * BLOCK_SIZE) {
                for &block in out.iter() {
                    state.allocator.release(block);
                }
                return Err(data_file_error("extend", &self.path, source));
            }
            state.file_blocks = blocks;
        }
        Ok(())
    }

    /// Gives back blocks of a write that failed: nothing refers to them.
    pub fn abort_write(&self, blocks: &[u64]) {
        let mut state = self.state();
        for &block in blocks {
            state.allocator.release(block);
        }
    }

    /// Makes a completed write visible: logical blocks from `lba` now map to
    /// `blocks`, whose data have checksums `crcs`. Returns whether enough
    /// changes are pending to call for a commit.
    pub fn finish_write(&self, lba: u64, blocks: &[u64], crcs: &[u32]) -> CommitNeed {
        assert_eq!(blocks.len(), crcs.len());
        let mut state = self.state();
        for (i, (&physical, &crc)) in blocks.iter().zip(crcs).enumerate() {
            let extent = Extent { physical, crc };
            let old = state.map.insert(lba + i as u64, extent);
            state.dirty.push(Change {
                lba: lba + i as u64,
                extent: Some(extent),
                freed: old.map(|old| (old.physical, false)),
            });
        }
        CommitNeed::of(state.dirty.len())
    }

    /// Unmaps `count` blocks from `lba` (DISCARD and WRITE_ZEROES): they read
    /// as zeros from now on and their space goes back to the filesystem once
    /// the change is committed.
    pub fn unmap(&self, lba: u64, count: u64) -> CommitNeed {
        let mut state = self.state();
        for block in lba..lba + count {
            if let Some(old) = state.map.remove(&block) {
                state.dirty.push(Change {
                    lba: block,
                    extent: None,
                    freed: Some((old.physical, true)),
                });
            }
        }
        CommitNeed::of(state.dirty.len())
    }

    /// Acts on a [`CommitNeed`]: wakes the committer, or commits now.
    pub fn handle_commit_need(&self, need: CommitNeed) -> Result<()> {
        match need {
            CommitNeed::None => Ok(()),
            CommitNeed::Soon => {
                self.commit_signal.request();
                Ok(())
            }
            CommitNeed::Now => self.sync_and_commit(),
        }
    }

    /// A mark covering every change made so far; pass it to
    /// [`Volume::commit`] after the data file has been synced.
    pub fn flush_mark(&self) -> u64 {
        let state = self.state();
        state.dirty_base + state.dirty.len() as u64
    }

    /// Writes the map changes up to `mark` to RocksDB, durably.
    ///
    /// The caller must have made the data file durable (fdatasync) *after*
    /// taking `mark`, so every block the committed map points at is on
    /// stable storage.
    pub fn commit(&self, mark: u64) -> Result<()> {
        let _commit = self.commit_lock.lock().expect("commit lock poisoned");
        let changes: Vec<Change> = {
            let mut state = self.state();
            if mark <= state.dirty_base {
                return Ok(());
            }
            let count = (mark - state.dirty_base) as usize;
            state.dirty_base = mark;
            state.dirty.drain(..count).collect()
        };
        let updates: Vec<MapUpdate> = changes
            .iter()
            .map(|change| MapUpdate {
                lba: change.lba,
                extent: change.extent,
            })
            .collect();
        if let Err(error) = self.meta.commit_map(self.id, &updates) {
            // Put the changes back in front, so a later commit retries them
            // in order. No other commit ran meanwhile: we hold commit_lock.
            let mut state = self.state();
            state.dirty_base -= changes.len() as u64;
            state.dirty.splice(0..0, changes);
            return Err(error);
        }
        let mut state = self.state();
        state.epoch += 1;
        let epoch = state.epoch;
        for change in &changes {
            if let Some((block, punch)) = change.freed {
                state.quarantine.push_back(Quarantined {
                    epoch,
                    block,
                    punch,
                });
            }
        }
        self.release_quarantined(&mut state);
        Ok(())
    }

    /// Makes every completed write durable: syncs the data file, then
    /// commits the map. Used for periodic commits and at shutdown; the
    /// guest's FLUSH takes the same two steps through io_uring.
    pub fn sync_and_commit(&self) -> Result<()> {
        let mark = {
            let state = self.state();
            if state.dirty.is_empty() {
                // Everything completed is committed, and every commit
                // synced the data it points at.
                return Ok(());
            }
            state.dirty_base + state.dirty.len() as u64
        };
        self.file
            .sync_data()
            .map_err(|source| data_file_error("sync", &self.path, source))?;
        self.commit(mark)
    }

    /// A digest of each region of `region_blocks` blocks: which blocks are
    /// mapped and their checksums, from the map alone (no data is read).
    /// Equal digests mean equal contents, barring a crc32 collision.
    pub fn region_digests(&self, region_blocks: u64) -> Vec<u64> {
        let regions = (self.capacity() / BLOCK_SIZE).div_ceil(region_blocks);
        let mut digests = vec![0u64; regions as usize];
        let state = self.state();
        for (&lba, extent) in &state.map {
            // Summed, so the map's order does not matter.
            let region = (lba / region_blocks) as usize;
            digests[region] = digests[region].wrapping_add(mix(lba, extent.crc));
        }
        digests
    }

    /// The digest of one region's block map, as in [`Self::region_digests`].
    pub fn region_digest(&self, region: u64, region_blocks: u64) -> u64 {
        let blocks = self.capacity() / BLOCK_SIZE;
        let start = region.saturating_mul(region_blocks).min(blocks);
        let end = start.saturating_add(region_blocks).min(blocks);
        let state = self.state();
        (start..end)
            .filter_map(|lba| state.map.get(&lba).map(|extent| mix(lba, extent.crc)))
            .fold(0u64, u64::wrapping_add)
    }

    /// Usage figures.
    pub fn usage(&self) -> VolumeUsage {
        let state = self.state();
        VolumeUsage {
            mapped_blocks: state.map.len() as u64,
            file_blocks: state.allocator.high_water(),
            dirty_blocks: state.dirty.len() as u64,
        }
    }

    fn release_quarantined(&self, state: &mut State) {
        let oldest_read = state.reads.keys().next().copied();
        while let Some(&entry) = state.quarantine.front() {
            // A read that started before the commit that freed the block may
            // still be reading it.
            if oldest_read.is_some_and(|oldest| oldest < entry.epoch) {
                break;
            }
            state.quarantine.pop_front();
            if entry.punch {
                self.punch_hole(entry.block);
            }
            state.allocator.release(entry.block);
        }
    }

    fn punch_hole(&self, block: u64) {
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (block * BLOCK_SIZE) as libc::off_t,
                BLOCK_SIZE as libc::off_t,
            )
        };
        if rc != 0 {
            // The block is unmapped either way; only the space is not returned.
            tracing::debug!(
                volume = %self.record.name,
                block,
                error = %std::io::Error::last_os_error(),
                "could not punch a hole for a discarded block"
            );
        }
    }
}

pub(crate) fn data_file_error(action: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::DataFile {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A 64-bit hash of a mapped block (SplitMix64 finalizer).
fn mix(lba: u64, crc: u32) -> u64 {
    let mut z = lba.rotate_left(32) ^ u64::from(crc) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_volume(dir: &Path, meta: &Arc<MetaStore>) -> Volume {
        let record = VolumeRecord {
            id: "00000000000000aa".into(),
            name: "v".into(),
            size_bytes: 64 * BLOCK_SIZE,
            created_unix: 0,
            attached_socket: None,
            replica_generation: 0,
            cluster: false,
        };
        Volume::open(record, dir, meta.clone(), false, Arc::default()).expect("open volume")
    }

    #[test]
    fn overwritten_block_is_reused_only_after_commit_and_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = Arc::new(MetaStore::open(&dir.path().join("meta")).expect("meta"));
        let volume = open_volume(dir.path(), &meta);
        let mut blocks = Vec::new();
        volume.allocate(1, &mut blocks).expect("allocate");
        volume.finish_write(3, &blocks, &[1]);
        volume.sync_and_commit().expect("commit");

        // A read of lba 3 starts, then lba 3 is overwritten and committed.
        let mut extents = Vec::new();
        let epoch = volume.begin_read(3, 1, &mut extents);
        assert_eq!(extents[0].map(|e| e.physical), Some(blocks[0]));
        let mut second = Vec::new();
        volume.allocate(1, &mut second).expect("allocate");
        assert_ne!(second, blocks);
        volume.finish_write(3, &second, &[2]);
        volume.sync_and_commit().expect("commit");

        // The old block must not be handed out while the read is in flight.
        let mut third = Vec::new();
        volume.allocate(1, &mut third).expect("allocate");
        assert_ne!(third, blocks);
        volume.end_read(epoch);
        let mut fourth = Vec::new();
        volume.allocate(1, &mut fourth).expect("allocate");
        assert_eq!(fourth, blocks);
    }

    #[test]
    fn only_committed_changes_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = Arc::new(MetaStore::open(&dir.path().join("meta")).expect("meta"));
        {
            let volume = open_volume(dir.path(), &meta);
            let mut blocks = Vec::new();
            volume.allocate(2, &mut blocks).expect("allocate");
            volume.finish_write(0, &blocks[..1], &[10]);
            volume.sync_and_commit().expect("commit");
            volume.finish_write(1, &blocks[1..], &[11]);
            volume.unmap(0, 1);
            // No commit: both of the last changes are lost, as after a crash.
        }
        let volume = open_volume(dir.path(), &meta);
        assert_eq!(volume.usage().mapped_blocks, 1);
        let mut extents = Vec::new();
        let epoch = volume.begin_read(0, 2, &mut extents);
        volume.end_read(epoch);
        assert_eq!(extents[0].map(|e| e.crc), Some(10));
        assert_eq!(extents[1], None);
    }

    #[test]
    fn range_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = Arc::new(MetaStore::open(&dir.path().join("meta")).expect("meta"));
        let volume = open_volume(dir.path(), &meta);
        assert_eq!(volume.check_range(4096, 8192).expect("in range"), (1, 2));
        assert!(volume.check_range(512, 4096).is_err());
        assert!(volume.check_range(63 * BLOCK_SIZE, 2 * BLOCK_SIZE).is_err());
        assert!(volume.check_range(u64::MAX - 4095, 4096).is_err());
    }
}
