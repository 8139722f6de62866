//! Synchronous replication of a volume: the protocol core.
//!
//! See `docs/replication.md` for the design. Everything here is pure: no
//! sockets, disks or clocks. The caller feeds in guest requests, replica
//! replies, metadata outcomes and the time, and carries out the
//! [`frontend::Effect`]s it gets back.
//!
//! - [`frontend::Frontend`]: the coordinator on the node where a volume is
//!   attached: fans writes out, completes them by the ack rule, marks
//!   failed replicas stale (through the metadata) and resyncs them.
//! - [`replica::ReplicaGate`]: what a replica checks before it applies
//!   anything: generation (fencing), session, duplicates.
//! - [`regions::RegionSet`]: the dirty-region bitmaps.
//! - [`wire`]: the frames that carry requests and replies between nodes,
//!   with [`wire::Blocks`] (data with per-block crc32) as their payload.
//!
//! Blocks are 4 KiB; offsets and lengths here are in blocks.

pub mod frontend;
pub mod regions;
pub mod replica;
pub mod replica_volume;
#[cfg(test)]
mod sim;
pub mod wire;

/// An attachment's generation, issued through Raft; higher fences lower.
pub type Generation = u64;
/// A frontend's request id: unique and increasing within a frontend.
pub type OpId = u64;
/// A replica's session with one frontend, created by `Open`. A replica
/// accepts requests of its current session only; a restart or a new
/// `Open` ends the old one.
pub type Session = u64;

/// What every request after `Open` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub generation: Generation,
    pub session: Session,
    pub op: OpId,
    /// Every op of this frontend below this one has finished: the replica
    /// may forget them (duplicate detection).
    pub done_below: OpId,
}

/// Frontend to replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<P> {
    /// Start a session with `generation`; fences lower generations.
    Open {
        generation: Generation,
        op: OpId,
    },
    /// Apply `data` to `blocks` blocks at `lba` (in the write cache).
    Write {
        head: Header,
        lba: u64,
        blocks: u64,
        data: P,
    },
    /// Make everything applied so far durable, once the first `after`
    /// writes and copy-ins of this session have been applied (requests may
    /// arrive out of order; a flush never overtakes what was sent before
    /// it).
    Flush {
        head: Header,
        after: u64,
    },
    Read {
        head: Header,
        lba: u64,
        blocks: u64,
    },
    /// A digest of every region's block map.
    Digests {
        head: Header,
    },
    /// A region's contents, to copy to another replica.
    CopyOut {
        head: Header,
        region: u64,
    },
    /// Replace a region's contents (mapped and unmapped blocks alike).
    CopyIn {
        head: Header,
        region: u64,
        data: P,
    },
    /// Read every stored block of a region and check it against its
    /// checksum (scrub).
    Verify {
        head: Header,
        region: u64,
    },
}

impl<P> Request<P> {
    /// The header, for every request but `Open`.
    pub fn head(&self) -> Option<&Header> {
        match self {
            Request::Open { .. } => None,
            Request::Write { head, .. }
            | Request::Flush { head, .. }
            | Request::Read { head, .. }
            | Request::Digests { head }
            | Request::CopyOut { head, .. }
            | Request::CopyIn { head, .. }
            | Request::Verify { head, .. } => Some(head),
        }
    }

    /// Whether applying it twice could differ from applying it once.
    pub fn mutates(&self) -> bool {
        matches!(self, Request::Write { .. } | Request::CopyIn { .. })
    }
}

/// Replica to frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<P> {
    Opened {
        op: OpId,
        session: Session,
    },
    /// The replica has seen a higher generation: the sender is fenced.
    Fenced {
        highest: Generation,
    },
    /// `op` belongs to a session the replica no longer has.
    NotOpen {
        op: OpId,
    },
    /// A write, flush or copy-in is done.
    Done {
        op: OpId,
    },
    /// The data of a read or copy-out.
    Data {
        op: OpId,
        data: P,
    },
    Digests {
        op: OpId,
        digests: Vec<u64>,
    },
    /// A read or copy-out found stored data that fails its checksum, at
    /// block `lba`: the frontend reads from another replica and has this
    /// one resynced.
    Damaged {
        op: OpId,
        lba: u64,
    },
    /// A region verified: its block map's digest, and the blocks whose
    /// stored data fails its checksum.
    Verified {
        op: OpId,
        digest: u64,
        damaged: Vec<u64>,
    },
}
