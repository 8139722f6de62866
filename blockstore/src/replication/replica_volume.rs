//! A replica of a volume on this node: requests from a frontend applied
//! to the local store, after the [`ReplicaGate`]'s checks.
//!
//! I/O is synchronous (positional reads and writes on the data file); the
//! caller runs each replica on a thread of its own. Writes go to newly
//! allocated blocks and become visible in the map when written, as the
//! local path does; a FLUSH syncs the data file and commits the map
//! (`Volume::sync_and_commit`), which is what durable means here.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::replica::{Admit, Opened, ReplicaGate};
use super::wire::{Blocks, BLOCK_BYTES};
use super::{Generation, OpId, Reply, Request};
use crate::buffer::BufferPool;
use crate::error::{Error, Result};
use crate::queue::REQUEST_BYTES_MAX;
use crate::volume::{Volume, BLOCK_SIZE};

/// A present block: its checksum and bytes.
type PresentBlock<'a> = (u32, &'a [u8]);

/// Stores the highest generation durably before it is acted on.
pub type PersistGeneration = Box<dyn FnMut(Generation) -> Result<()> + Send>;

/// Why a request could not be applied. For a write, copy or flush the
/// session has ended (the request may be partly applied); the caller
/// answers `NotOpen` for its op either way, so the frontend fails this
/// replica at once and opens a new session.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] Error),
    #[error("block {index} of op {op} fails its checksum on arrival")]
    Checksum { op: OpId, index: usize },
    #[error("op {op} is outside the volume: {reason}")]
    Range { op: OpId, reason: String },
}

/// One volume's replica on this node.
pub struct ReplicaVolume {
    volume: Arc<Volume>,
    gate: ReplicaGate,
    persist: PersistGeneration,
    region_blocks: u64,
    /// Flushes waiting for earlier writes of their session: (op, after).
    held: Vec<(OpId, u64)>,
    pool: BufferPool,
}

impl std::fmt::Debug for ReplicaVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaVolume")
            .field("volume", &self.volume.name())
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

impl ReplicaVolume {
    /// A replica over `volume`, whose highest generation stored is
    /// `highest`; `incarnation` must differ at every start of the process.
    pub fn new(
        volume: Arc<Volume>,
        highest: Generation,
        incarnation: u32,
        region_blocks: u64,
        persist: PersistGeneration,
    ) -> ReplicaVolume {
        ReplicaVolume {
            volume,
            gate: ReplicaGate::new(incarnation, highest),
            persist,
            region_blocks,
            held: Vec::new(),
            pool: BufferPool::new(REQUEST_BYTES_MAX as usize, 2),
        }
    }

    /// Whether flushes are held for earlier writes (a write may then run
    /// one).
    pub fn holds_flushes(&self) -> bool {
        !self.held.is_empty()
    }

    /// Applies one request; returns the replies it produces (none for a
    /// flush held back for earlier writes, more than one when a write
    /// releases held flushes).
    ///
    /// A write, copy or flush that fails (it may have been applied in
    /// part, or cached writes may be lost) ends the session; a failed read
    /// changes nothing and leaves it.
    pub fn handle(
        &mut self,
        request: Request<Blocks>,
    ) -> std::result::Result<Vec<Reply<Blocks>>, ReplicaError> {
        let ends_session = request.mutates() || matches!(request, Request::Flush { .. });
        let handled = self.handle_and_release(request);
        if handled.is_err() && ends_session {
            self.gate.end_session();
            self.held.clear();
        }
        handled
    }

    /// [`ReplicaVolume::handle`], and the held flushes a write releases.
    fn handle_and_release(
        &mut self,
        request: Request<Blocks>,
    ) -> std::result::Result<Vec<Reply<Blocks>>, ReplicaError> {
        let mutates = request.mutates();
        let mut replies = Vec::new();
        if let Some(reply) = self.handle_one(request)? {
            replies.push(reply);
        }
        if mutates {
            let (ready, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|&(_, after)| self.gate.flush_ready(after));
            self.held = held;
            for (op, _) in ready {
                self.volume.sync_and_commit()?;
                replies.push(Reply::Done { op });
            }
        }
        Ok(replies)
    }

    fn handle_one(
        &mut self,
        request: Request<Blocks>,
    ) -> std::result::Result<Option<Reply<Blocks>>, ReplicaError> {
        let head = match &request {
            Request::Open { generation, op } => {
                self.held.clear();
                // Stored before anything changes: a replica that failed to
                // store a new generation must not act on it.
                if *generation > self.gate.highest() {
                    (self.persist)(*generation)?;
                }
                return Ok(Some(match self.gate.open(*generation) {
                    Opened::Fenced { highest } => Reply::Fenced { highest },
                    Opened::Session { session, .. } => Reply::Opened { op: *op, session },
                }));
            }
            other => *other.head().expect("every request but open has a header"),
        };
        match self.gate.admit(&head, request.mutates()) {
            Admit::Fenced { highest } => return Ok(Some(Reply::Fenced { highest })),
            Admit::NotOpen => return Ok(Some(Reply::NotOpen { op: head.op })),
            Admit::Duplicate => return Ok(Some(Reply::Done { op: head.op })),
            Admit::Apply => {}
        }
        let op = head.op;
        Ok(Some(match request {
            Request::Open { .. } => unreachable!("handled above"),
            Request::Write {
                lba, blocks, data, ..
            } => {
                self.check(op, lba, blocks)?;
                if data.len() as u64 != blocks {
                    return Err(ReplicaError::Range {
                        op,
                        reason: format!("{} blocks of data for {blocks}", data.len()),
                    });
                }
                self.write(op, lba, &data)?;
                Reply::Done { op }
            }
            Request::Flush { after, .. } => {
                if !self.gate.flush_ready(after) {
                    self.held.push((op, after));
                    return Ok(None);
                }
                self.volume.sync_and_commit()?;
                Reply::Done { op }
            }
            Request::Read { lba, blocks, .. } => {
                self.check(op, lba, blocks)?;
                self.read_reply(op, lba, blocks)?
            }
            Request::Digests { .. } => Reply::Digests {
                op,
                digests: self.volume.region_digests(self.region_blocks),
            },
            Request::CopyOut { region, .. } => {
                let (lba, blocks) = self.region(op, region)?;
                self.read_reply(op, lba, blocks)?
            }
            Request::CopyIn { region, data, .. } => {
                let (lba, blocks) = self.region(op, region)?;
                if data.len() as u64 != blocks {
                    return Err(ReplicaError::Range {
                        op,
                        reason: format!(
                            "{} blocks of data for a {blocks}-block region",
                            data.len()
                        ),
                    });
                }
                self.copy_in(op, lba, &data)?;
                Reply::Done { op }
            }
            Request::Verify { region, .. } => {
                let (lba, blocks) = self.region(op, region)?;
                Reply::Verified {
                    op,
                    digest: self.volume.region_digest(region, self.region_blocks),
                    damaged: self.verify(lba, blocks)?,
                }
            }
        }))
    }

    fn blocks(&self) -> u64 {
        self.volume.capacity() / BLOCK_SIZE
    }

    fn check(&self, op: OpId, lba: u64, blocks: u64) -> std::result::Result<(), ReplicaError> {
        match lba.checked_add(blocks) {
            Some(end) if blocks > 0 && end <= self.blocks() => Ok(()),
            _ => Err(ReplicaError::Range {
                op,
                reason: format!(
                    "{blocks} blocks at {lba} on a volume of {} blocks",
                    self.blocks()
                ),
            }),
        }
    }

    /// The blocks of `region`: the last region may be short.
    fn region(&self, op: OpId, region: u64) -> std::result::Result<(u64, u64), ReplicaError> {
        let lba = region.saturating_mul(self.region_blocks);
        if lba >= self.blocks() {
            return Err(ReplicaError::Range {
                op,
                reason: format!("region {region} is past the end"),
            });
        }
        Ok((lba, self.region_blocks.min(self.blocks() - lba)))
    }

    /// Writes present blocks to new space and maps them; unmaps absent
    /// ones.
    fn write(
        &mut self,
        op: OpId,
        lba: u64,
        data: &Blocks,
    ) -> std::result::Result<(), ReplicaError> {
        data.verify().map_err(|bad| ReplicaError::Checksum {
            op,
            index: bad.index,
        })?;
        // Runs of consecutive present blocks: (first lba, blocks).
        let mut runs: Vec<(u64, Vec<PresentBlock<'_>>)> = Vec::new();
        for (index, block) in data.iter().enumerate() {
            let block_lba = lba + index as u64;
            match block {
                Some(present) => match runs.last_mut() {
                    Some((start, run)) if *start + run.len() as u64 == block_lba => {
                        run.push(present)
                    }
                    _ => runs.push((block_lba, vec![present])),
                },
                None => {
                    let need = self.volume.unmap(block_lba, 1);
                    self.volume.handle_commit_need(need)?;
                }
            }
        }
        for (start, run) in runs {
            self.write_run(start, &run)?;
        }
        Ok(())
    }

    fn write_run(&mut self, lba: u64, run: &[PresentBlock<'_>]) -> Result<()> {
        let mut physical = Vec::new();
        self.volume.allocate(run.len() as u64, &mut physical)?;
        let mut buf = self.pool.get(run.len() * BLOCK_BYTES);
        for (i, (_, bytes)) in run.iter().enumerate() {
            buf.as_mut_slice()[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES].copy_from_slice(bytes);
        }
        let mut start = 0;
        while start < physical.len() {
            let mut end = start + 1;
            while end < physical.len() && physical[end] == physical[end - 1] + 1 {
                end += 1;
            }
            let bytes = &buf.as_slice()[start * BLOCK_BYTES..end * BLOCK_BYTES];
            if let Err(source) = self
                .volume
                .file()
                .write_all_at(bytes, physical[start] * BLOCK_SIZE)
            {
                self.volume.abort_write(&physical);
                self.pool.put(buf);
                return Err(Error::DataFile {
                    action: "write",
                    path: self.volume.path().to_owned(),
                    source,
                });
            }
            start = end;
        }
        self.pool.put(buf);
        let crcs: Vec<u32> = run.iter().map(|(crc, _)| *crc).collect();
        let need = self.volume.finish_write(lba, &physical, &crcs);
        self.volume.handle_commit_need(need)
    }

    fn copy_in(
        &mut self,
        op: OpId,
        lba: u64,
        data: &Blocks,
    ) -> std::result::Result<(), ReplicaError> {
        self.write(op, lba, data)
    }

    /// The data, or `Damaged` when a stored block fails its checksum (an
    /// error the replica survives: another replica has the data).
    fn read_reply(&mut self, op: OpId, lba: u64, blocks: u64) -> Result<Reply<Blocks>> {
        match self.read(lba, blocks) {
            Ok(data) => Ok(Reply::Data { op, data }),
            Err(Error::ChecksumMismatch {
                volume,
                offset,
                expected,
                found,
            }) => {
                tracing::error!(
                    %volume, offset, expected, found,
                    "a replica block fails its checksum; reading it from another replica"
                );
                Ok(Reply::Damaged {
                    op,
                    lba: offset / BLOCK_SIZE,
                })
            }
            Err(error) => Err(error),
        }
    }

    /// The mapped blocks of a range whose stored data fails its checksum.
    fn verify(&mut self, lba: u64, blocks: u64) -> Result<Vec<u64>> {
        let mut extents = Vec::new();
        let epoch = self.volume.begin_read(lba, blocks, &mut extents);
        let mut buf = self.pool.get(BLOCK_BYTES);
        let volume = &self.volume;
        let result = (|| {
            let mut damaged = Vec::new();
            for (i, extent) in extents.iter().enumerate() {
                let Some(extent) = extent else { continue };
                let block = &mut buf.as_mut_slice()[..BLOCK_BYTES];
                match read_block(volume, lba + i as u64, extent, block) {
                    Ok(()) => {}
                    Err(error @ Error::ChecksumMismatch { .. }) => {
                        tracing::error!(%error, "scrub: a replica block fails its checksum");
                        damaged.push(lba + i as u64);
                    }
                    Err(error) => return Err(error),
                }
            }
            Ok(damaged)
        })();
        self.volume.end_read(epoch);
        self.pool.put(buf);
        result
    }

    /// Reads mapped blocks, checking each against its checksum.
    fn read(&mut self, lba: u64, blocks: u64) -> Result<Blocks> {
        let mut extents = Vec::new();
        let epoch = self.volume.begin_read(lba, blocks, &mut extents);
        let present: Vec<bool> = extents.iter().map(Option::is_some).collect();
        let mapped: Vec<(u64, crate::meta::Extent)> = extents
            .iter()
            .enumerate()
            .filter_map(|(i, extent)| extent.map(|extent| (lba + i as u64, extent)))
            .collect();
        let mut buf = self.pool.get(mapped.len().max(1) * BLOCK_BYTES);
        let volume = &self.volume;
        let result = (|| {
            for (i, (block_lba, extent)) in mapped.iter().enumerate() {
                let block = &mut buf.as_mut_slice()[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES];
                read_block(volume, *block_lba, extent, block)?;
            }
            let crcs = mapped.iter().map(|(_, extent)| extent.crc).collect();
            let data = Bytes::copy_from_slice(&buf.as_slice()[..mapped.len() * BLOCK_BYTES]);
            Ok(Blocks::new(present, crcs, data))
        })();
        self.volume.end_read(epoch);
        self.pool.put(buf);
        result
    }
}

/// Reads the stored block `lba` (at `extent`) into `block` and checks it
/// against its checksum.
fn read_block(
    volume: &crate::Volume,
    lba: u64,
    extent: &crate::meta::Extent,
    block: &mut [u8],
) -> Result<()> {
    volume
        .file()
        .read_exact_at(block, extent.physical * BLOCK_SIZE)
        .map_err(|source| Error::DataFile {
            action: "read",
            path: volume.path().to_owned(),
            source,
        })?;
    let found = crc32fast::hash(block);
    if found != extent.crc {
        return Err(Error::ChecksumMismatch {
            volume: volume.name().to_owned(),
            offset: lba * BLOCK_SIZE,
            expected: extent.crc,
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{MetaStore, VolumeRecord};
    use crate::replication::Header;
    use std::sync::Mutex;

    const REGION: u64 = 8;

    fn open(dir: &std::path::Path, stored: Arc<Mutex<u64>>) -> ReplicaVolume {
        let meta = Arc::new(MetaStore::open(&dir.join("meta")).expect("meta"));
        let record = VolumeRecord {
            id: "0000000000000001".into(),
            name: "r".into(),
            size_bytes: 20 * BLOCK_SIZE,
            created_unix: 0,
            attached_socket: None,
            replica_generation: 0,
            cluster: false,
        };
        let volume =
            Arc::new(Volume::open(record, dir, meta, true, Arc::default()).expect("volume"));
        let highest = *stored.lock().expect("lock");
        let persist: PersistGeneration = Box::new(move |generation| {
            *stored.lock().expect("lock") = generation;
            Ok(())
        });
        ReplicaVolume::new(volume, highest, 1, REGION, persist)
    }

    fn data(blocks: usize, fill: u8) -> Blocks {
        Blocks::from_data(Bytes::from(vec![fill; blocks * BLOCK_BYTES]))
    }

    fn session(replica: &mut ReplicaVolume, generation: u64) -> u64 {
        match replica
            .handle(Request::Open { generation, op: 1 })
            .expect("open")[..]
        {
            [Reply::Opened { session, .. }] => session,
            ref other => panic!("{other:?}"),
        }
    }

    fn head(session: u64, generation: u64, op: u64) -> Header {
        Header {
            generation,
            session,
            op,
            done_below: 0,
        }
    }

    fn read(replica: &mut ReplicaVolume, session: u64, op: u64, lba: u64, blocks: u64) -> Vec<u8> {
        let request = Request::Read {
            head: head(session, replica.gate.highest(), op),
            lba,
            blocks,
        };
        match &replica.handle(request).expect("read")[..] {
            [Reply::Data { data, .. }] => data
                .iter()
                .flat_map(|block| block.map_or(vec![0; BLOCK_BYTES], |(_, bytes)| bytes.to_vec()))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn writes_reads_copies_and_digests_go_through_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stored = Arc::new(Mutex::new(0));
        let mut replica = open(dir.path(), stored.clone());
        let s = session(&mut replica, 1);
        assert_eq!(
            *stored.lock().expect("lock"),
            1,
            "the generation is stored first"
        );
        let write = Request::Write {
            head: head(s, 1, 2),
            lba: 3,
            blocks: 2,
            data: data(2, 0xaa),
        };
        assert_eq!(
            replica.handle(write.clone()).expect("write"),
            [Reply::Done { op: 2 }]
        );
        // A duplicate is acknowledged, not applied again.
        assert_eq!(
            replica.handle(write).expect("again"),
            [Reply::Done { op: 2 }]
        );
        let bytes = read(&mut replica, s, 3, 2, 4);
        assert!(bytes[..BLOCK_BYTES].iter().all(|&b| b == 0));
        assert!(bytes[BLOCK_BYTES..3 * BLOCK_BYTES]
            .iter()
            .all(|&b| b == 0xaa));
        assert!(bytes[3 * BLOCK_BYTES..].iter().all(|&b| b == 0));

        // Digests see the mapped blocks of region 0 only.
        let digests = match &replica
            .handle(Request::Digests {
                head: head(s, 1, 4),
            })
            .expect("digests")[..]
        {
            [Reply::Digests { digests, .. }] => digests.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(digests.len(), 3, "20 blocks in regions of 8");
        assert_ne!(digests[0], 0);
        assert_eq!(&digests[1..], [0, 0]);

        // A region copied out and into another region's place carries
        // mapped and unmapped blocks alike; the short last region works.
        let region = match &replica
            .handle(Request::CopyOut {
                head: head(s, 1, 5),
                region: 0,
            })
            .expect("copy out")[..]
        {
            [Reply::Data { data, .. }] => data.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(region.len(), 8);
        assert_eq!(region.iter().filter(Option::is_some).count(), 2);
        let last = match &replica
            .handle(Request::CopyOut {
                head: head(s, 1, 6),
                region: 2,
            })
            .expect("last region")[..]
        {
            [Reply::Data { data, .. }] => data.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(last.len(), 4);
        replica
            .handle(Request::Write {
                head: head(s, 1, 7),
                lba: 0,
                blocks: 1,
                data: data(1, 0x11),
            })
            .expect("write block 0");
        replica
            .handle(Request::CopyIn {
                head: head(s, 1, 8),
                region: 0,
                data: region,
            })
            .expect("copy in");
        let bytes = read(&mut replica, s, 9, 0, 8);
        assert!(
            bytes[..BLOCK_BYTES].iter().all(|&b| b == 0),
            "copy-in unmapped block 0"
        );
        assert!(bytes[3 * BLOCK_BYTES..5 * BLOCK_BYTES]
            .iter()
            .all(|&b| b == 0xaa));

        // Out of range and damaged data are errors, apply nothing and end
        // the session.
        let far = Request::Write {
            head: head(s, 1, 10),
            lba: 19,
            blocks: 2,
            data: data(2, 1),
        };
        assert!(matches!(
            replica.handle(far),
            Err(ReplicaError::Range { .. })
        ));
        let bad = Blocks::new(
            vec![true],
            vec![0xdead_beef],
            Bytes::from(vec![2u8; BLOCK_BYTES]),
        );
        // (The failed request ended the session.)
        let s = session(&mut replica, 1);
        let damaged = Request::Write {
            head: head(s, 1, 11),
            lba: 0,
            blocks: 1,
            data: bad,
        };
        assert!(matches!(
            replica.handle(damaged),
            Err(ReplicaError::Checksum { .. })
        ));
    }

    /// A request the replica cannot apply ends its session: neither it
    /// (possibly applied in part) nor what follows is taken as done, and
    /// the frontend, told `NotOpen`, opens a new one.
    #[test]
    fn a_request_that_fails_ends_the_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut replica = open(dir.path(), Arc::new(Mutex::new(0)));
        let s = session(&mut replica, 1);
        let write = |op, lba| Request::Write {
            head: head(s, 1, op),
            lba,
            blocks: 2,
            data: data(2, 0xbb),
        };
        assert!(matches!(
            replica.handle(write(2, 1 << 40)),
            Err(ReplicaError::Range { op: 2, .. })
        ));
        assert_eq!(
            replica.handle(write(3, 0)).expect("answered"),
            [Reply::NotOpen { op: 3 }]
        );
        let again = session(&mut replica, 1);
        assert_ne!(again, s);
        let write = Request::Write {
            head: head(again, 1, 2),
            lba: 0,
            blocks: 2,
            data: data(2, 0xcc),
        };
        assert_eq!(
            replica.handle(write).expect("write"),
            [Reply::Done { op: 2 }],
            "op 2 of the new session is applied, not taken as a duplicate"
        );
        assert!(read(&mut replica, again, 3, 0, 2)
            .iter()
            .all(|&b| b == 0xcc));
    }

    #[test]
    fn flushes_wait_for_earlier_writes_and_survive_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stored = Arc::new(Mutex::new(0));
        let mut replica = open(dir.path(), stored.clone());
        let s = session(&mut replica, 1);
        // The flush follows two writes the replica has not seen yet.
        let flush = Request::Flush {
            head: head(s, 1, 4),
            after: 2,
        };
        assert!(replica.handle(flush).expect("held").is_empty());
        let write = |op, lba, fill| Request::Write {
            head: head(s, 1, op),
            lba,
            blocks: 1,
            data: data(1, fill),
        };
        assert_eq!(
            replica.handle(write(3, 1, 0x33)).expect("w"),
            [Reply::Done { op: 3 }]
        );
        assert_eq!(
            replica.handle(write(2, 0, 0x22)).expect("w"),
            [Reply::Done { op: 2 }, Reply::Done { op: 4 }],
            "the second write releases the flush"
        );
        // Not flushed: lost in a crash (the volume is dropped uncommitted).
        replica.handle(write(5, 2, 0x55)).expect("w");
        drop(replica);

        let mut replica = open(dir.path(), stored.clone());
        // Generation 1 was stored: an older one is fenced.
        assert_eq!(
            replica
                .handle(Request::Open {
                    generation: 0,
                    op: 1
                })
                .expect("open"),
            [Reply::Fenced { highest: 1 }]
        );
        let s = session(&mut replica, 2);
        let bytes = read(&mut replica, s, 2, 0, 3);
        let bytes = bytes.chunks(BLOCK_BYTES).map(|b| b[0]).collect::<Vec<_>>();
        assert_eq!(bytes[..2], [0x22, 0x33], "flushed writes survive");
        assert_eq!(bytes[2], 0, "the unflushed write is gone");
    }
}
