//! The replication coordinator of an attached volume.
//!
//! [`Frontend`] is a state machine. Its inputs are guest requests
//! ([`Frontend::submit`]), replica replies ([`Frontend::on_reply`]),
//! outcomes of metadata changes ([`Frontend::on_metadata`]) and the time
//! ([`Frontend::tick`]); its outputs are [`Effect`]s, collected with
//! [`Frontend::take_effects`]: requests to send, guest requests to
//! complete, metadata changes to commit. The rules it keeps are those of
//! `docs/replication.md`:
//!
//! - a write or flush completes when every in-sync replica has done it,
//!   and at least `min_replicas` in-sync replicas have;
//! - a replica that fails is marked stale through the metadata before
//!   anything completes without it; the last in-sync replica is never
//!   marked stale;
//! - a stale replica's dirty regions are copied to it in ascending order
//!   from an in-sync replica, and it is marked in sync once none is left;
//! - any sign of a higher generation fences the frontend for good.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::regions::{regions_of, RegionSet};
use super::{Generation, Header, OpId, Reply, Request, Session};

/// A guest request's id, chosen by the caller.
pub type GuestId = u64;

/// Sizes and timings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Volume size, in blocks.
    pub volume_blocks: u64,
    /// Blocks per dirty-tracking region.
    pub region_blocks: u64,
    /// In-sync replicas a write needs, at least.
    pub min_replicas: usize,
    /// How long a replica may take to answer a request.
    pub replica_timeout: Duration,
    /// How long a guest request may wait, all told, before it fails
    /// ([`Failure::Unavailable`]) rather than wait on (for a replica that
    /// cannot store it, a metadata change that cannot commit, too few
    /// in-sync replicas). Longer than `replica_timeout`.
    pub io_timeout: Duration,
    /// How often an unreachable replica is tried again.
    pub probe_interval: Duration,
    /// Most bytes per second copied to each resyncing replica (0: no
    /// limit), so guest I/O keeps priority.
    pub resync_bytes_per_second: u64,
    /// A stale replica unreachable this long is replaced (`None`: only on
    /// request).
    pub replace_after: Option<Duration>,
}

/// A replica's state as recorded in the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    InSync,
    Stale,
}

/// A guest request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestOp<P> {
    Write { lba: u64, blocks: u64, data: P },
    Flush,
    Read { lba: u64, blocks: u64 },
}

/// Why a guest request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Another attachment has a higher generation.
    Fenced,
    /// Writes may have been lost from the only in-sync replica's cache
    /// before this flush could make them durable.
    CacheLost,
    /// The request is outside the volume.
    OutOfRange,
    /// The only in-sync copy of a block read fails its checksum.
    Damaged,
    /// The request could not be done within the I/O timeout: the
    /// replicas it needs did not answer or could not store it. A write
    /// that fails so may have reached some replicas and not others; they
    /// are made the same again (from an in-sync one) before any is read
    /// as in sync.
    Unavailable,
}

/// How a guest request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<P> {
    Written,
    Flushed,
    Read(P),
    Failed(Failure),
}

/// A change to the volume's metadata, to commit through Raft with the
/// frontend's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaChange {
    MarkStale {
        replica: usize,
    },
    MarkInSync {
        replica: usize,
    },
    /// Put the replica on another node (placement picks it): the new copy
    /// starts stale and empty, and gets every region.
    Replace {
        replica: usize,
    },
}

/// What a scrub found: see [`Frontend::scrub`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScrubReport {
    /// Regions in the volume.
    pub regions: u64,
    /// Regions verified on every in-sync replica and compared.
    pub checked: u64,
    /// Stored blocks that failed their checksum, on any replica.
    pub damaged_blocks: u64,
    /// Replica regions whose block map differed from the reference copy.
    pub differing: u64,
    /// Replica regions handed to resync to be copied again.
    pub repairing: u64,
    /// Regions with no copy that verifies: they read as IOERR where
    /// damaged.
    pub unrepairable: u64,
    /// Regions that writes kept busy on every try: not compared.
    pub skipped: u64,
    pub finished: bool,
    /// It stopped before the end: the attachment was fenced.
    pub aborted: bool,
}

/// Regions verified at once.
const SCRUB_WINDOW: usize = 4;
/// Times a region overtaken by guest writes is verified again.
const SCRUB_TRIES: u32 = 8;
/// How long a region may wait for guest writes to leave it alone.
const SCRUB_BUSY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Scrub {
    /// The next region not yet started, in disk order.
    next: u64,
    /// Regions to verify again (writes overtook them, or kept them busy),
    /// with their tries and since when they wait.
    again: BTreeMap<u64, (u32, Instant)>,
    rounds: BTreeMap<u64, ScrubRound>,
    report: ScrubReport,
}

impl Scrub {
    /// Verifies `region` again after its try number `tries`, unless it
    /// has had them all: then it is reported skipped.
    fn again_or_skip(&mut self, region: u64, tries: u32, now: Instant) {
        if tries + 1 < SCRUB_TRIES {
            self.again.insert(region, (tries + 1, now));
        } else {
            self.report.skipped += 1;
        }
    }
}

#[derive(Debug)]
struct ScrubRound {
    tries: u32,
    /// The replicas asked, by the op that asked them.
    asked: BTreeMap<usize, OpId>,
    /// Their answers: the region's digest and its damaged blocks.
    answers: BTreeMap<usize, (u64, Vec<u64>)>,
    /// A guest write touched the region while it was being verified:
    /// the replicas' digests may differ only by that write.
    overtaken: bool,
}

/// What became of a [`MetaChange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaOutcome {
    Committed,
    /// Refused: the volume has a newer generation.
    Fenced,
    /// Not committed (no quorum, timeout): the frontend asks again.
    Retry,
    /// It cannot be made now (no node to put a replica on, say): dropped.
    Refused,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect<P> {
    Send {
        replica: usize,
        request: Request<P>,
    },
    Complete {
        guest: GuestId,
        outcome: Outcome<P>,
    },
    Metadata {
        generation: Generation,
        change: MetaChange,
    },
}

/// Where the frontend is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Opening sessions with the replicas (fencing older generations).
    Opening,
    /// Making the in-sync replicas identical before serving.
    Reconciling,
    Serving,
    /// A higher generation exists; every request fails.
    Fenced,
}

/// A region being copied to a replica.
#[derive(Debug, Clone)]
struct Copy {
    region: u64,
    source: usize,
    /// The read of the region from the source, then its write to the
    /// target: a reply to any other op is not this copy's.
    op: OpId,
    /// A guest write touched the region after the copy began: the copy is
    /// stale and the region stays dirty.
    overtaken: bool,
}

#[derive(Debug)]
struct Track {
    state: ReplicaState,
    session: Option<Session>,
    /// When to try to open it again.
    next_probe: Instant,
    /// Regions it may lack.
    dirty: RegionSet,
    /// Whether `dirty` is known, or must be found by comparing digests.
    dirty_known: bool,
    /// Regions it acknowledged writing since its last acknowledged flush.
    unflushed: RegionSet,
    /// Whether it has acknowledged a flush in its current session. Until
    /// it has, its cache may hold writes from before this frontend (or
    /// session), which `unflushed` does not cover.
    flushed_once: bool,
    /// Writes and copy-ins sent to it in its current session.
    sent_mutations: u64,
    copy: Option<Copy>,
    /// The flush that precedes marking it in sync.
    sync_flush: Option<OpId>,
    /// The comparison round it was asked digests in, and its answer.
    asked_round: Option<u64>,
    digests: Option<(u64, Vec<u64>)>,
    /// In sync, and compared with the source since this frontend began
    /// (its differences are in `dirty`).
    compared: bool,
    /// In sync in the metadata, but failed: being marked stale. It counts
    /// for completions (they wait) but is read from by no one.
    demoting: bool,
    /// Since when it has had no session.
    unreachable_since: Option<Instant>,
    /// Resync bytes it may be sent now (the rate limit's bucket), and when
    /// the bucket was last filled.
    copy_allowance: u64,
    allowance_at: Instant,
}

impl Track {
    fn new(state: ReplicaState, regions: u64, now: Instant) -> Track {
        Track {
            state,
            session: None,
            next_probe: now,
            dirty: RegionSet::new(regions),
            dirty_known: false,
            unflushed: RegionSet::new(regions),
            flushed_once: false,
            sent_mutations: 0,
            copy: None,
            sync_flush: None,
            asked_round: None,
            digests: None,
            compared: false,
            demoting: false,
            unreachable_since: Some(now),
            copy_allowance: 0,
            allowance_at: now,
        }
    }
}

impl Track {
    /// Records that the replica lacks a range: its regions are dirty, and
    /// a copy of one of them in flight no longer clears it.
    fn mark_dirty(&mut self, lba: u64, blocks: u64, region_blocks: u64) {
        for region in regions_of(lba, blocks, region_blocks) {
            self.dirty.insert(region);
            if let Some(copy) = &mut self.copy {
                if copy.region == region {
                    copy.overtaken = true;
                }
            }
        }
    }
}

#[derive(Debug)]
enum OpKind {
    Open,
    Write {
        guest: GuestId,
        lba: u64,
        blocks: u64,
    },
    Flush {
        guest: Option<GuestId>,
        covered: RegionSet,
    },
    Read {
        guest: GuestId,
    },
    Digests {
        round: u64,
    },
    CopyOut {
        target: usize,
        region: u64,
    },
    CopyIn {
        region: u64,
    },
    Verify {
        region: u64,
    },
}

#[derive(Debug)]
struct Op {
    replica: usize,
    kind: OpKind,
    sent: Instant,
}

#[derive(Debug)]
enum Pending<P> {
    Write {
        lba: u64,
        blocks: u64,
        data: P,
        /// Replicas it was sent to and that acknowledged it.
        sent: BTreeSet<usize>,
        acked: BTreeSet<usize>,
    },
    Flush {
        sent: BTreeSet<usize>,
        acked: BTreeSet<usize>,
    },
    Read {
        lba: u64,
        blocks: u64,
        tried: BTreeSet<usize>,
        waiting: bool,
    },
}

/// The coordinator of one attached volume.
#[derive(Debug)]
pub struct Frontend<P> {
    config: Config,
    generation: Generation,
    phase: Phase,
    regions: u64,
    replicas: Vec<Track>,
    next_op: OpId,
    ops: BTreeMap<OpId, Op>,
    pending: BTreeMap<GuestId, Pending<P>>,
    /// When each pending request came (entries of finished ones are
    /// dropped at the next tick).
    arrived: BTreeMap<GuestId, Instant>,
    /// Guest requests not yet started (before serving, or waiting for an
    /// overlapping write to finish), in arrival order, with when each came.
    queued: VecDeque<(GuestId, GuestOp<P>, Instant)>,
    meta_inflight: Option<MetaChange>,
    meta_queue: VecDeque<MetaChange>,
    /// Digest comparison: the replica compared against, the current
    /// round, and whether it is still being answered.
    compare_source: Option<usize>,
    round: u64,
    round_open: bool,
    /// The only in-sync replica lost acknowledged writes from its cache:
    /// the next flush must fail rather than promise them.
    cache_lost: bool,
    /// The scrub running, or the last one.
    scrub: Option<Scrub>,
    effects: Vec<Effect<P>>,
}

/// Block data as the frontend carries it: it checks that a replica's
/// answer holds as many blocks as were asked for.
pub trait Payload: Clone {
    fn blocks(&self) -> u64;
}

impl<P: Payload> Frontend<P> {
    /// A frontend for `generation` (just issued through Raft) over
    /// replicas in the given recorded states. It starts by opening them.
    pub fn new(
        config: Config,
        generation: Generation,
        states: &[ReplicaState],
        now: Instant,
    ) -> Frontend<P> {
        assert!(!states.is_empty() && config.region_blocks > 0);
        let regions = config.volume_blocks.div_ceil(config.region_blocks);
        let replicas = states
            .iter()
            .map(|&state| Track::new(state, regions, now))
            .collect();
        let mut frontend = Frontend {
            config,
            generation,
            phase: Phase::Opening,
            regions,
            replicas,
            next_op: 1,
            ops: BTreeMap::new(),
            pending: BTreeMap::new(),
            arrived: BTreeMap::new(),
            queued: VecDeque::new(),
            meta_inflight: None,
            meta_queue: VecDeque::new(),
            compare_source: None,
            round: 0,
            round_open: false,
            cache_lost: false,
            scrub: None,
            effects: Vec::new(),
        };
        frontend.tick(now);
        frontend
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Each replica's recorded state, as this frontend believes it.
    pub fn states(&self) -> Vec<ReplicaState> {
        self.replicas.iter().map(|track| track.state).collect()
    }

    /// Dirty regions left per replica (resync progress).
    pub fn dirty_counts(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .map(|track| {
                if track.dirty_known || track.state == ReplicaState::InSync {
                    track.dirty.count()
                } else {
                    self.regions
                }
            })
            .collect()
    }

    /// Starts a scrub, unless one is running: every region of every
    /// in-sync replica is read and checked against its checksums, region
    /// by region in disk order, a few at a time, and the replicas' block
    /// maps are compared. A replica with damaged blocks, or whose map
    /// differs from the first replica whose blocks verify, gets that
    /// region copied again by resync (marked stale first). Returns whether
    /// a scrub started.
    pub fn scrub(&mut self, now: Instant) -> bool {
        if self.phase == Phase::Fenced || self.scrub.as_ref().is_some_and(|s| !s.report.finished) {
            return false;
        }
        self.scrub = Some(Scrub {
            report: ScrubReport {
                regions: self.regions,
                ..ScrubReport::default()
            },
            ..Scrub::default()
        });
        self.advance(now);
        true
    }

    /// Asks for `replica` to be replaced by a new, empty copy on another
    /// node (see [`MetaChange::Replace`]). Returns whether it was asked
    /// (not when it already is, or the frontend is fenced).
    pub fn replace(&mut self, replica: usize, now: Instant) -> bool {
        let change = MetaChange::Replace { replica };
        if self.phase == Phase::Fenced || replica >= self.replicas.len() || self.meta_wanted(change)
        {
            return false;
        }
        // An in-sync replica is marked stale first (never the last one,
        // nor while no other in-sync replica answers), so what it held is
        // on another in-sync replica before its copy is dropped.
        if self.replicas[replica].state == ReplicaState::InSync {
            if self.source(&BTreeSet::from([replica])).is_none() {
                return false;
            }
            if !self.replicas[replica].demoting {
                self.replicas[replica].demoting = true;
                self.want_meta(MetaChange::MarkStale { replica });
            }
        }
        self.want_meta(change);
        self.advance(now);
        true
    }

    /// The running scrub's progress, or the last scrub's result.
    pub fn scrub_report(&self) -> Option<ScrubReport> {
        self.scrub.as_ref().map(|scrub| scrub.report.clone())
    }

    /// Guest requests not yet completed.
    pub fn outstanding(&self) -> usize {
        self.pending.len() + self.queued.len()
    }

    /// What to do now.
    pub fn take_effects(&mut self) -> Vec<Effect<P>> {
        std::mem::take(&mut self.effects)
    }

    /// A guest request.
    pub fn submit(&mut self, guest: GuestId, op: GuestOp<P>, now: Instant) {
        if self.phase == Phase::Fenced {
            self.complete(guest, Outcome::Failed(Failure::Fenced));
            return;
        }
        if let GuestOp::Write { lba, blocks, .. } | GuestOp::Read { lba, blocks } = &op {
            let end = lba.checked_add(*blocks);
            if *blocks == 0 || end.is_none_or(|end| end > self.config.volume_blocks) {
                self.complete(guest, Outcome::Failed(Failure::OutOfRange));
                return;
            }
        }
        self.queued.push_back((guest, op, now));
        self.start_queued(now);
    }

    /// The time passed: time out requests, probe unreachable replicas,
    /// move resyncs on.
    pub fn tick(&mut self, now: Instant) {
        let expired: Vec<usize> = self
            .ops
            .values()
            .filter(|op| now.saturating_duration_since(op.sent) >= self.config.replica_timeout)
            .map(|op| op.replica)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for replica in expired {
            self.fail(replica, now);
        }
        if self.phase == Phase::Fenced {
            return;
        }
        self.give_up_late(now);
        if let Some(after) = self.config.replace_after {
            for replica in 0..self.replicas.len() {
                let track = &self.replicas[replica];
                let gone_for = track
                    .unreachable_since
                    .map(|since| now.saturating_duration_since(since));
                if track.state == ReplicaState::Stale && gone_for.is_some_and(|gone| gone >= after)
                {
                    self.replicas[replica].unreachable_since = Some(now);
                    self.want_meta(MetaChange::Replace { replica });
                }
            }
        }
        for replica in 0..self.replicas.len() {
            let track = &self.replicas[replica];
            let opening = self
                .ops
                .values()
                .any(|op| op.replica == replica && matches!(op.kind, OpKind::Open));
            if track.session.is_none() && !opening && now >= track.next_probe {
                self.replicas[replica].next_probe = now + self.config.probe_interval;
                self.send_op(replica, OpKind::Open, now, |_| {
                    unreachable!("an open has no header")
                });
            }
        }
        self.advance(now);
    }

    /// Fails the guest requests that have waited the I/O timeout. What a
    /// failed write sent stays in flight (it still orders later writes to
    /// its blocks, and late answers are ignored); every replica that is not
    /// an in-sync copy takes its blocks from one later, since it may hold
    /// the write where the in-sync ones do not (unless it and every
    /// in-sync copy stored it). An in-sync replica that did not store it
    /// has timed out by now and is on its way to stale.
    fn give_up_late(&mut self, now: Instant) {
        let limit = self.config.io_timeout;
        let late = |since: Instant| now.saturating_duration_since(since) >= limit;
        let pending = &self.pending;
        self.arrived.retain(|guest, _| pending.contains_key(guest));
        let expired: Vec<GuestId> = self
            .arrived
            .iter()
            .filter(|(_, &since)| late(since))
            .map(|(&guest, _)| guest)
            .collect();
        let region_blocks = self.config.region_blocks;
        for guest in expired {
            self.arrived.remove(&guest);
            if let Some(Pending::Write {
                lba, blocks, acked, ..
            }) = self.pending.remove(&guest)
            {
                let copy = |track: &Track| track.state == ReplicaState::InSync && !track.demoting;
                let copies_have_it = self
                    .replicas
                    .iter()
                    .enumerate()
                    .all(|(replica, track)| !copy(track) || acked.contains(&replica));
                for (replica, track) in self.replicas.iter_mut().enumerate() {
                    let has_it = copies_have_it && acked.contains(&replica);
                    if !copy(track) && !has_it {
                        track.mark_dirty(lba, blocks, region_blocks);
                    }
                }
            }
            self.complete(guest, Outcome::Failed(Failure::Unavailable));
        }
        let mut kept = VecDeque::with_capacity(self.queued.len());
        while let Some((guest, op, since)) = self.queued.pop_front() {
            if late(since) {
                self.complete(guest, Outcome::Failed(Failure::Unavailable));
            } else {
                kept.push_back((guest, op, since));
            }
        }
        self.queued = kept;
    }

    /// A replica answered.
    pub fn on_reply(&mut self, replica: usize, reply: Reply<P>, now: Instant) {
        if self.phase == Phase::Fenced || replica >= self.replicas.len() {
            return;
        }
        match reply {
            Reply::Fenced { highest } if highest > self.generation => self.fence(),
            Reply::Fenced { .. } => {}
            Reply::Opened { op, session } => self.on_opened(replica, op, session, now),
            Reply::NotOpen { op } => {
                if self.ops.get(&op).is_some_and(|op| op.replica == replica) {
                    self.fail(replica, now);
                }
            }
            Reply::Done { op } => self.on_done(replica, op, now),
            Reply::Data { op, data } => self.on_data(replica, op, data, now),
            Reply::Digests { op, digests } => self.on_digests(replica, op, digests, now),
            Reply::Damaged { op, lba } => self.on_damaged(replica, op, lba),
            Reply::Verified {
                op,
                digest,
                damaged,
            } => self.on_verified(replica, op, digest, damaged),
        }
        self.advance(now);
    }

    /// A metadata change asked for in an [`Effect::Metadata`] ended.
    pub fn on_metadata(&mut self, outcome: MetaOutcome, now: Instant) {
        let Some(change) = self.meta_inflight.take() else {
            return;
        };
        match outcome {
            MetaOutcome::Fenced => {
                self.fence();
                return;
            }
            MetaOutcome::Retry => self.meta_queue.push_front(change),
            MetaOutcome::Refused => {
                if let MetaChange::Replace { replica } = change {
                    // Asked again once it has been gone that long again.
                    if self.replicas[replica].session.is_none() {
                        self.replicas[replica].unreachable_since = Some(now);
                    }
                }
            }
            MetaOutcome::Committed => match change {
                MetaChange::Replace { replica } => self.replaced(replica, now),
                MetaChange::MarkStale { replica } => {
                    self.replicas[replica].state = ReplicaState::Stale;
                    self.replicas[replica].demoting = false;
                }
                MetaChange::MarkInSync { replica } => {
                    let track = &mut self.replicas[replica];
                    track.state = ReplicaState::InSync;
                    // It failed while the change was committing: it is an
                    // in-sync replica that failed, like any other.
                    if track.session.is_none() || !track.dirty.is_empty() {
                        track.demoting = true;
                        self.want_meta(MetaChange::MarkStale { replica });
                    } else {
                        // Writes and flushes started while it was stale
                        // now wait for it too.
                        self.resend_pending(replica, now);
                    }
                }
            },
        }
        self.advance(now);
    }

    /// `replica` is now a new, empty copy on another node: nothing in
    /// flight to or from the old one counts, and every region is copied.
    fn replaced(&mut self, replica: usize, now: Instant) {
        // What was in flight to or from the old copy ends as for a failed
        // stale replica (recorded stale before its replacement, so the
        // in-sync rules do not apply); then the slot starts afresh.
        self.replicas[replica].state = ReplicaState::Stale;
        self.fail(replica, now);
        let mut track = Track::new(ReplicaState::Stale, self.regions, now);
        track.dirty = RegionSet::full(self.regions);
        track.dirty_known = true;
        self.replicas[replica] = track;
        // A change asked for the old copy does not apply to the new one.
        self.meta_queue.retain(|change| match change {
            MetaChange::MarkStale { replica: r } | MetaChange::MarkInSync { replica: r } => {
                *r != replica
            }
            MetaChange::Replace { .. } => true,
        });
    }

    fn fence(&mut self) {
        self.phase = Phase::Fenced;
        if let Some(scrub) = &mut self.scrub {
            if !scrub.report.finished {
                scrub.report.finished = true;
                scrub.report.aborted = true;
            }
        }
        self.ops.clear();
        self.meta_queue.clear();
        let pending: Vec<GuestId> = self.pending.keys().copied().collect();
        for guest in pending {
            self.pending.remove(&guest);
            self.complete(guest, Outcome::Failed(Failure::Fenced));
        }
        while let Some((guest, _, _)) = self.queued.pop_front() {
            self.complete(guest, Outcome::Failed(Failure::Fenced));
        }
    }

    fn complete(&mut self, guest: GuestId, outcome: Outcome<P>) {
        self.effects.push(Effect::Complete { guest, outcome });
    }

    /// Every op below this one has finished (`op` is about to be sent).
    fn done_below(&self, op: OpId) -> OpId {
        self.ops.keys().next().copied().unwrap_or(op).min(op)
    }

    /// Sends a request to `replica`, built from its header.
    fn send_op(
        &mut self,
        replica: usize,
        kind: OpKind,
        now: Instant,
        build: impl FnOnce(Header) -> Request<P>,
    ) -> OpId {
        let op = self.next_op;
        self.next_op += 1;
        if matches!(kind, OpKind::Write { .. } | OpKind::CopyIn { .. }) {
            self.replicas[replica].sent_mutations += 1;
        }
        let request = match kind {
            OpKind::Open => Request::Open {
                generation: self.generation,
                op,
            },
            _ => build(Header {
                generation: self.generation,
                session: self.replicas[replica]
                    .session
                    .expect("requests go to open replicas"),
                op,
                done_below: self.done_below(op),
            }),
        };
        self.ops.insert(
            op,
            Op {
                replica,
                kind,
                sent: now,
            },
        );
        self.effects.push(Effect::Send { replica, request });
        op
    }

    fn in_sync(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.replicas.len()).filter(|&r| self.replicas[r].state == ReplicaState::InSync)
    }

    /// An in-sync replica with a session, other than `except`, to read
    /// from.
    fn source(&self, except: &BTreeSet<usize>) -> Option<usize> {
        self.in_sync().find(|r| {
            let track = &self.replicas[*r];
            !except.contains(r) && track.session.is_some() && !track.demoting
        })
    }

    /// Whether `replica` is the only in-sync replica not being demoted.
    fn last_in_sync(&self, replica: usize) -> bool {
        self.replicas[replica].state == ReplicaState::InSync
            && self
                .in_sync()
                .all(|r| r == replica || self.replicas[r].demoting)
    }

    fn on_opened(&mut self, replica: usize, id: OpId, session: Session, now: Instant) {
        let opening = self
            .ops
            .get(&id)
            .is_some_and(|op| op.replica == replica && matches!(op.kind, OpKind::Open));
        if !opening {
            return;
        }
        self.ops.remove(&id);
        let track = &mut self.replicas[replica];
        track.session = Some(session);
        track.unreachable_since = None;
        track.flushed_once = false;
        track.sent_mutations = 0;
        track.digests = None;
        track.asked_round = None;
        if self.phase == Phase::Serving {
            // Whatever waits for acknowledgements is sent again: the
            // replica may be (or become) in sync before it completes.
            self.resend_pending(replica, now);
        }
    }

    /// Sends a guest write to `replica`; a copy to it of a region the
    /// write touches no longer clears that region.
    fn send_write(
        &mut self,
        replica: usize,
        guest: GuestId,
        lba: u64,
        blocks: u64,
        data: P,
        now: Instant,
    ) {
        let region_blocks = self.config.region_blocks;
        let touched = regions_of(lba, blocks, region_blocks);
        if let Some(copy) = &mut self.replicas[replica].copy {
            if touched.contains(&copy.region) {
                copy.overtaken = true;
            }
        }
        if let Some(scrub) = &mut self.scrub {
            for region in touched {
                if let Some(round) = scrub.rounds.get_mut(&region) {
                    round.overtaken = true;
                }
            }
        }
        self.send_op(replica, OpKind::Write { guest, lba, blocks }, now, |head| {
            Request::Write {
                head,
                lba,
                blocks,
                data,
            }
        });
    }

    /// Sends a flush to `replica`, after every write and copy sent to it
    /// so far; it covers the regions the replica acknowledged until now.
    fn send_flush(&mut self, replica: usize, guest: Option<GuestId>, now: Instant) -> OpId {
        let covered = self.replicas[replica].unflushed.take();
        let after = self.replicas[replica].sent_mutations;
        self.send_op(replica, OpKind::Flush { guest, covered }, now, |head| {
            Request::Flush { head, after }
        })
    }

    /// Whether `change` is committing or waiting to.
    fn meta_wanted(&self, change: MetaChange) -> bool {
        self.meta_inflight == Some(change) || self.meta_queue.contains(&change)
    }

    /// Asks for `change`, unless it is already asked for.
    fn want_meta(&mut self, change: MetaChange) {
        if !self.meta_wanted(change) {
            self.meta_queue.push_back(change);
        }
    }

    /// Sends `replica` every pending write and flush it has not
    /// acknowledged.
    fn resend_pending(&mut self, replica: usize, now: Instant) {
        let guests: Vec<GuestId> = self.pending.keys().copied().collect();
        for guest in guests {
            match self.pending.get_mut(&guest) {
                Some(Pending::Write {
                    lba,
                    blocks,
                    data,
                    sent,
                    acked,
                }) if !acked.contains(&replica) => {
                    let (lba, blocks, data) = (*lba, *blocks, data.clone());
                    sent.insert(replica);
                    self.send_write(replica, guest, lba, blocks, data, now);
                }
                Some(Pending::Flush { sent, acked }) if !acked.contains(&replica) => {
                    sent.insert(replica);
                    self.send_flush(replica, Some(guest), now);
                }
                _ => {}
            }
        }
    }

    /// A replica failed: it timed out, closed, or lost its session. What
    /// it may have lost becomes dirty; an in-sync replica is marked stale
    /// unless it is the last one.
    fn fail(&mut self, replica: usize, now: Instant) {
        let mut lost = self.replicas[replica].unflushed.take();
        let mine: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, op)| op.replica == replica)
            .map(|(&id, _)| id)
            .collect();
        let mut reads = Vec::new();
        for id in mine {
            let op = self.ops.remove(&id).expect("listed above");
            match op.kind {
                OpKind::Write { lba, blocks, .. } => {
                    for region in regions_of(lba, blocks, self.config.region_blocks) {
                        lost.insert(region);
                    }
                }
                OpKind::Flush { covered, .. } => lost.union_with(&covered),
                OpKind::CopyIn { region } => lost.insert(region),
                OpKind::CopyOut { target, .. } => self.replicas[target].copy = None,
                OpKind::Read { guest } => reads.push(guest),
                OpKind::Open | OpKind::Digests { .. } | OpKind::Verify { .. } => {}
            }
        }
        // Copies from it to others stop; copies to it are lost, and so is
        // the read of their data from the source.
        for track in &mut self.replicas {
            if track.copy.as_ref().is_some_and(|c| c.source == replica) {
                track.copy = None;
            }
        }
        self.ops.retain(
            |_, op| !matches!(op.kind, OpKind::CopyOut { target, .. } if target == replica),
        );
        let last = self.last_in_sync(replica);
        let track = &mut self.replicas[replica];
        // What it may have lost is known only if it has flushed since
        // this session began; otherwise digests must tell.
        let lost_known = track.flushed_once || track.session.is_none();
        track.flushed_once = false;
        let had_session = track.session.take().is_some();
        if had_session {
            track.unreachable_since = Some(now);
        }
        track.copy = None;
        track.sync_flush = None;
        track.digests = None;
        track.asked_round = None;
        track.next_probe = now + self.config.probe_interval;
        // Acknowledgements it gave may be gone with its cache.
        for pending in self.pending.values_mut() {
            if let Pending::Write { acked, sent, .. } | Pending::Flush { acked, sent } = pending {
                acked.remove(&replica);
                sent.remove(&replica);
            }
        }
        if self.replicas[replica].state == ReplicaState::InSync {
            if !last {
                if !lost_known {
                    self.replicas[replica].dirty_known = false;
                }
                self.replicas[replica].dirty.union_with(&lost);
                self.replicas[replica].demoting = true;
                self.want_meta(MetaChange::MarkStale { replica });
            } else {
                // The last in-sync replica: it stays in sync, and what it
                // lost from its cache is what every other copy must take
                // from it again. A flush waiting on it can no longer
                // promise the writes before it.
                for (other, track) in self.replicas.iter_mut().enumerate() {
                    if other != replica {
                        track.dirty.union_with(&lost);
                        if !lost_known {
                            track.dirty_known = false;
                        }
                    }
                }
                if (!lost.is_empty() || !lost_known) && had_session {
                    self.cache_lost = true;
                    let flushes: Vec<GuestId> = self
                        .pending
                        .iter()
                        .filter(|(_, p)| matches!(p, Pending::Flush { .. }))
                        .map(|(&g, _)| g)
                        .collect();
                    for guest in flushes {
                        self.pending.remove(&guest);
                        self.complete(guest, Outcome::Failed(Failure::CacheLost));
                    }
                }
            }
        } else {
            if !lost_known {
                self.replicas[replica].dirty_known = false;
            }
            self.replicas[replica].dirty.union_with(&lost);
        }
        for guest in reads {
            if let Some(Pending::Read { waiting, .. }) = self.pending.get_mut(&guest) {
                *waiting = true;
            }
        }
    }

    fn on_done(&mut self, replica: usize, id: OpId, now: Instant) {
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        if op.replica != replica {
            return;
        }
        let op = self.ops.remove(&id).expect("checked");
        let region_blocks = self.config.region_blocks;
        match op.kind {
            OpKind::Write { guest, lba, blocks } => {
                let track = &mut self.replicas[replica];
                for region in regions_of(lba, blocks, region_blocks) {
                    track.unflushed.insert(region);
                }
                if let Some(Pending::Write { acked, .. }) = self.pending.get_mut(&guest) {
                    acked.insert(replica);
                }
            }
            OpKind::Flush { guest, .. } => {
                self.replicas[replica].flushed_once = true;
                if let Some(guest) = guest {
                    if let Some(Pending::Flush { acked, .. }) = self.pending.get_mut(&guest) {
                        acked.insert(replica);
                    }
                }
                let track = &mut self.replicas[replica];
                if track.sync_flush == Some(id) {
                    track.sync_flush = None;
                    if track.dirty.is_empty()
                        && track.copy.is_none()
                        && track.state == ReplicaState::Stale
                    {
                        self.want_meta(MetaChange::MarkInSync { replica });
                    }
                }
            }
            OpKind::CopyIn { region } => {
                let track = &mut self.replicas[replica];
                if track.copy.as_ref().is_some_and(|copy| copy.op == id) {
                    let copy = track.copy.take().expect("checked");
                    if copy.region == region && !copy.overtaken {
                        track.dirty.remove(region);
                    }
                }
                track.unflushed.insert(region);
            }
            _ => {}
        }
        let _ = now;
    }

    /// A replica's stored copy of block `lba` is damaged: the read goes to
    /// another replica, and this one lacks the block's region (marked
    /// stale and resynced, unless it is the last in-sync replica).
    fn on_damaged(&mut self, replica: usize, id: OpId, lba: u64) {
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        if op.replica != replica {
            return;
        }
        let op = self.ops.remove(&id).expect("checked");
        let last = self.last_in_sync(replica);
        match op.kind {
            OpKind::Read { guest } if last => {
                // No other copy to read it from, or to repair it with.
                if self.pending.remove(&guest).is_some() {
                    self.complete(guest, Outcome::Failed(Failure::Damaged));
                }
                return;
            }
            OpKind::Read { guest } => {
                if let Some(Pending::Read { waiting, .. }) = self.pending.get_mut(&guest) {
                    *waiting = true;
                }
            }
            OpKind::CopyOut { target, .. } => self.replicas[target].copy = None,
            _ => return,
        }
        if lba >= self.config.volume_blocks || last {
            return;
        }
        let region_blocks = self.config.region_blocks;
        let track = &mut self.replicas[replica];
        track.mark_dirty(lba, 1, region_blocks);
        if track.state == ReplicaState::InSync && !track.demoting {
            track.demoting = true;
            self.want_meta(MetaChange::MarkStale { replica });
        }
    }

    fn on_verified(&mut self, replica: usize, id: OpId, digest: u64, damaged: Vec<u64>) {
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        let OpKind::Verify { region } = op.kind else {
            return;
        };
        if op.replica != replica {
            return;
        }
        self.ops.remove(&id);
        let Some(round) = self
            .scrub
            .as_mut()
            .and_then(|scrub| scrub.rounds.get_mut(&region))
        else {
            return;
        };
        if round.asked.get(&replica) == Some(&id) {
            round.answers.insert(replica, (digest, damaged));
        }
    }

    /// Finishes scrub rounds every asked replica has answered (or failed
    /// in), and starts new ones on regions no write is touching.
    fn step_scrub(&mut self, now: Instant) {
        let Some(mut scrub) = self.scrub.take() else {
            return;
        };
        if scrub.report.finished {
            self.scrub = Some(scrub);
            return;
        }
        let answered: Vec<u64> = scrub
            .rounds
            .iter()
            .filter(|(_, round)| {
                round
                    .asked
                    .iter()
                    .all(|(r, op)| round.answers.contains_key(r) || !self.ops.contains_key(op))
            })
            .map(|(&region, _)| region)
            .collect();
        for region in answered {
            let round = scrub.rounds.remove(&region).expect("listed above");
            self.finish_scrub_round(&mut scrub, region, round, now);
        }
        let busy = self.busy_regions(None);
        // A region guest writes keep busy this long is given up on.
        let starved: Vec<u64> = scrub
            .again
            .iter()
            .filter(|(region, (_, since))| {
                busy.contains(region) && now.saturating_duration_since(*since) >= SCRUB_BUSY_MAX
            })
            .map(|(&region, _)| region)
            .collect();
        for region in starved {
            scrub.again.remove(&region);
            scrub.report.skipped += 1;
        }
        while scrub.rounds.len() < SCRUB_WINDOW {
            let candidate = scrub
                .again
                .iter()
                .map(|(&region, &(tries, _))| (region, tries))
                .find(|(region, _)| !busy.contains(region));
            let (region, tries) = match candidate {
                Some((region, tries)) => {
                    scrub.again.remove(&region);
                    (region, tries)
                }
                None if scrub.next < self.regions => {
                    let region = scrub.next;
                    scrub.next += 1;
                    if busy.contains(&region) {
                        scrub.again.insert(region, (0, now));
                        continue;
                    }
                    (region, 0)
                }
                None => break,
            };
            let replicas: Vec<usize> = self
                .in_sync()
                .filter(|&r| self.replicas[r].session.is_some() && !self.replicas[r].demoting)
                .collect();
            if replicas.is_empty() {
                // Nothing to verify against now: try again later.
                scrub.again.insert(region, (tries, now));
                break;
            }
            let mut asked = BTreeMap::new();
            for replica in replicas {
                let op = self.send_op(replica, OpKind::Verify { region }, now, |head| {
                    Request::Verify { head, region }
                });
                asked.insert(replica, op);
            }
            scrub.rounds.insert(
                region,
                ScrubRound {
                    tries,
                    asked,
                    answers: BTreeMap::new(),
                    overtaken: false,
                },
            );
        }
        if scrub.next >= self.regions && scrub.again.is_empty() && scrub.rounds.is_empty() {
            scrub.report.finished = true;
        }
        self.scrub = Some(scrub);
    }

    /// Compares the answers of one region: damaged blocks and differing
    /// maps make that replica's copy of the region dirty.
    fn finish_scrub_round(
        &mut self,
        scrub: &mut Scrub,
        region: u64,
        round: ScrubRound,
        now: Instant,
    ) {
        // Replicas that went stale meanwhile are being resynced anyway.
        let answers: Vec<(usize, u64, Vec<u64>)> = round
            .answers
            .into_iter()
            .filter(|(r, _)| self.replicas[*r].state == ReplicaState::InSync)
            .map(|(r, (digest, damaged))| (r, digest, damaged))
            .collect();
        let damaged: u64 = answers.iter().map(|(_, _, d)| d.len() as u64).sum();
        scrub.report.damaged_blocks += damaged;
        if answers.is_empty() || (round.overtaken && damaged == 0) {
            scrub.again_or_skip(region, round.tries, now);
            return;
        }
        // The reference: the first replica whose blocks all verify.
        let reference = answers
            .iter()
            .find(|(_, _, damaged)| damaged.is_empty())
            .map(|&(_, digest, _)| digest);
        let Some(reference) = reference else {
            scrub.report.unrepairable += 1;
            scrub.report.checked += 1;
            return;
        };
        for (replica, digest, damaged) in answers {
            // A write in flight may explain a difference, not damage.
            let differs = digest != reference && !round.overtaken;
            if differs {
                scrub.report.differing += 1;
            }
            if !differs && damaged.is_empty() {
                continue;
            }
            scrub.report.repairing += 1;
            let region_blocks = self.config.region_blocks;
            let track = &mut self.replicas[replica];
            track.mark_dirty(region * region_blocks, 1, region_blocks);
            if !track.demoting && !self.last_in_sync(replica) {
                self.replicas[replica].demoting = true;
                self.want_meta(MetaChange::MarkStale { replica });
            }
        }
        if round.overtaken {
            // Damage was found and handled; the comparison is redone.
            scrub.again_or_skip(region, round.tries, now);
        } else {
            scrub.report.checked += 1;
        }
    }

    fn on_data(&mut self, replica: usize, id: OpId, data: P, now: Instant) {
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        if op.replica != replica {
            return;
        }
        let expected = match &op.kind {
            OpKind::Read { guest } => match self.pending.get(guest) {
                Some(Pending::Read { blocks, .. }) => Some(*blocks),
                _ => None,
            },
            OpKind::CopyOut { region, .. } => {
                let start = region * self.config.region_blocks;
                Some(
                    self.config
                        .region_blocks
                        .min(self.config.volume_blocks.saturating_sub(start)),
                )
            }
            _ => None,
        };
        if expected.is_some_and(|blocks| blocks != data.blocks()) {
            // A replica that answers with the wrong amount of data is a
            // failed one; the read goes elsewhere.
            self.fail(replica, now);
            return;
        }
        let op = self.ops.remove(&id).expect("checked");
        match op.kind {
            OpKind::Read { guest } if self.pending.remove(&guest).is_some() => {
                self.complete(guest, Outcome::Read(data));
            }
            OpKind::CopyOut { target, region } => {
                let Some(copy) = self.replicas[target].copy.clone() else {
                    return;
                };
                if copy.region != region || copy.source != replica || copy.op != id {
                    return;
                }
                if self.replicas[target].session.is_none() {
                    self.replicas[target].copy = None;
                    return;
                }
                let region = copy.region;
                let op = self.send_op(target, OpKind::CopyIn { region }, now, |head| {
                    Request::CopyIn { head, region, data }
                });
                if let Some(copy) = &mut self.replicas[target].copy {
                    copy.op = op;
                }
            }
            _ => {}
        }
    }

    fn on_digests(&mut self, replica: usize, id: OpId, digests: Vec<u64>, _now: Instant) {
        let Some(op) = self.ops.get(&id) else {
            return;
        };
        let OpKind::Digests { round } = op.kind else {
            return;
        };
        if op.replica != replica {
            return;
        }
        self.ops.remove(&id);
        let track = &mut self.replicas[replica];
        if track.asked_round != Some(round) {
            return;
        }
        if digests.len() as u64 == self.regions {
            track.digests = Some((round, digests));
        } else {
            // A replica that cannot describe the volume is asked again.
            track.asked_round = None;
        }
    }

    /// Moves everything on that can move: phases, metadata changes,
    /// digest comparisons, copies, queued guest requests, completions.
    fn advance(&mut self, now: Instant) {
        if self.phase == Phase::Fenced {
            return;
        }
        // A replacement waits until its replica is recorded stale; if that
        // cannot happen (it became the last in-sync replica), it is dropped.
        if let Some(&MetaChange::Replace { replica }) = self.meta_queue.front() {
            let track = &self.replicas[replica];
            if track.state == ReplicaState::InSync && !track.demoting {
                self.meta_queue.pop_front();
            }
        }
        if self.meta_inflight.is_none() {
            if let Some(change) = self.meta_queue.pop_front() {
                self.meta_inflight = Some(change);
                self.effects.push(Effect::Metadata {
                    generation: self.generation,
                    change,
                });
            }
        }
        match self.phase {
            Phase::Opening => {
                // Every in-sync replica must be open (fenced) or recorded
                // stale before the volume is touched.
                let in_sync: Vec<usize> = self.in_sync().collect();
                let open = in_sync
                    .iter()
                    .filter(|&&r| self.replicas[r].session.is_some())
                    .count();
                if open > 0 && open == in_sync.len() {
                    self.phase = Phase::Reconciling;
                } else if open > 0 {
                    // Mark the unreachable ones stale once they time out
                    // (`fail` queues that); until then, wait.
                }
            }
            Phase::Reconciling | Phase::Serving => {}
            Phase::Fenced => return,
        }
        self.compare_digests(now);
        if self.phase == Phase::Reconciling {
            let source = self.compare_source;
            let settled = self.in_sync().all(|r| {
                let track = &self.replicas[r];
                track.session.is_some()
                    && (track.compared || Some(r) == source)
                    && track.dirty.is_empty()
                    && track.copy.is_none()
            }) && source.is_some()
                && self.meta_inflight.is_none()
                && self.meta_queue.is_empty();
            if settled {
                self.phase = Phase::Serving;
            }
        }
        if self.phase == Phase::Serving {
            // An in-sync replica that lacks regions is demoted before
            // anything copies to it.
            for replica in 0..self.replicas.len() {
                let track = &self.replicas[replica];
                if track.state == ReplicaState::InSync
                    && !track.demoting
                    && !track.dirty.is_empty()
                    && !self.last_in_sync(replica)
                {
                    self.replicas[replica].demoting = true;
                    self.want_meta(MetaChange::MarkStale { replica });
                }
            }
        }
        self.start_copies(now);
        if self.phase == Phase::Serving {
            self.step_scrub(now);
            self.start_queued(now);
            self.retry_reads(now);
            self.finish_pending();
        }
    }

    /// Finds what replicas lack by comparing their region digests with a
    /// source's, asked for in the same round: while reconciling, every
    /// other in-sync replica; later, stale replicas whose dirty regions
    /// are unknown (the frontend began after they went stale).
    fn compare_digests(&mut self, now: Instant) {
        if self.phase == Phase::Opening {
            return;
        }
        let Some(source) = self.source(&BTreeSet::new()) else {
            return;
        };
        let reconciling = self.phase == Phase::Reconciling;
        if self.compare_source != Some(source) {
            // A new source: comparisons with the old one no longer hold.
            self.compare_source = Some(source);
            self.round_open = false;
            for track in &mut self.replicas {
                track.digests = None;
                track.asked_round = None;
                if reconciling && track.state == ReplicaState::InSync {
                    track.compared = false;
                    track.dirty = RegionSet::new(self.regions);
                    track.copy = None;
                }
            }
            self.ops.retain(|_, op| {
                !matches!(op.kind, OpKind::CopyOut { .. } | OpKind::CopyIn { .. }) || !reconciling
            });
        }
        // Stale replicas are compared only once the in-sync ones are
        // identical (serving): before, the source may still change to one
        // that differs from the first.
        let wants = |track: &Track| {
            track.session.is_some()
                && if track.state == ReplicaState::InSync {
                    reconciling && !track.compared
                } else {
                    !reconciling && !track.dirty_known
                }
        };
        if self.round_open && self.replicas[source].asked_round != Some(self.round) {
            // The source failed or reopened mid-round: start over.
            self.round_open = false;
            for track in &mut self.replicas {
                track.asked_round = None;
                track.digests = None;
            }
        }
        if self.round_open {
            let Some((round, reference)) = self.replicas[source].digests.clone() else {
                return;
            };
            debug_assert_eq!(round, self.round);
            for r in 0..self.replicas.len() {
                let track = &mut self.replicas[r];
                if r == source || track.asked_round != Some(round) {
                    continue;
                }
                let Some((answered, digests)) = track.digests.take() else {
                    continue;
                };
                track.asked_round = None;
                if answered != round || !wants(track) {
                    continue;
                }
                for (region, (ours, theirs)) in reference.iter().zip(&digests).enumerate() {
                    if ours != theirs {
                        track.dirty.insert(region as u64);
                    }
                }
                track.dirty_known = true;
                track.compared = true;
            }
            let waiting = (0..self.replicas.len())
                .any(|r| r != source && self.replicas[r].asked_round == Some(round));
            if !waiting {
                self.round_open = false;
                self.replicas[source].digests = None;
                self.replicas[source].asked_round = None;
            }
            return;
        }
        let targets: Vec<usize> = (0..self.replicas.len())
            .filter(|&r| r != source && wants(&self.replicas[r]))
            .collect();
        if targets.is_empty() {
            self.replicas[source].compared = true;
            self.replicas[source].dirty_known = true;
            return;
        }
        self.round += 1;
        self.round_open = true;
        let round = self.round;
        for r in targets.into_iter().chain([source]) {
            let track = &mut self.replicas[r];
            track.asked_round = Some(round);
            track.digests = None;
            self.send_op(r, OpKind::Digests { round }, now, |head| Request::Digests {
                head,
            });
        }
    }

    /// Starts a copy for each open replica with dirty regions and none in
    /// flight, lowest region first, from a region no write is touching.
    fn start_copies(&mut self, now: Instant) {
        if self.phase == Phase::Opening {
            return;
        }
        let serving = self.phase == Phase::Serving;
        for target in 0..self.replicas.len() {
            let track = &self.replicas[target];
            // Once serving, an in-sync replica is never copied to: a copy
            // could land over a newer write it has acknowledged. One that
            // lacks something is marked stale first.
            if (serving && track.state == ReplicaState::InSync)
                || track.session.is_none()
                || track.copy.is_some()
                || !track.dirty_known
                || track.sync_flush.is_some()
            {
                continue;
            }
            let Some(source) = self.source(&BTreeSet::from([target])) else {
                continue;
            };
            if track.dirty.is_empty() {
                let waiting = self.meta_wanted(MetaChange::MarkInSync { replica: target });
                if track.state == ReplicaState::Stale && !waiting && self.phase == Phase::Serving {
                    let op = self.send_flush(target, None, now);
                    self.replicas[target].sync_flush = Some(op);
                }
                continue;
            }
            let busy = self.busy_regions(Some(source));
            let Some(region) = track.dirty.iter().find(|region| !busy.contains(region)) else {
                continue;
            };
            if !self.take_allowance(target, now) {
                continue;
            }
            let op = self.send_op(source, OpKind::CopyOut { target, region }, now, |head| {
                Request::CopyOut { head, region }
            });
            self.replicas[target].copy = Some(Copy {
                region,
                source,
                op,
                overtaken: false,
            });
        }
    }

    /// Whether a region may be copied to `target` now, by the resync rate
    /// limit (a token bucket holding at most a tenth of a second's worth,
    /// and at least one region); takes the region's bytes if so.
    fn take_allowance(&mut self, target: usize, now: Instant) -> bool {
        let rate = self.config.resync_bytes_per_second;
        if rate == 0 {
            return true;
        }
        let region_bytes = self.config.region_blocks * super::wire::BLOCK_BYTES as u64;
        let track = &mut self.replicas[target];
        let elapsed = now.saturating_duration_since(track.allowance_at);
        let earned = (elapsed.as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
        if earned > 0 {
            let cap = (rate / 10).max(region_bytes);
            track.copy_allowance = track.copy_allowance.saturating_add(earned).min(cap);
            track.allowance_at = now;
        }
        if track.copy_allowance < region_bytes {
            return false;
        }
        track.copy_allowance -= region_bytes;
        true
    }

    /// Regions a write in flight touches, and those of pending writes
    /// `source` has not applied yet (every pending write, without one): a
    /// copy from `source` must not start on them (it would miss them), nor
    /// a scrub compare them.
    fn busy_regions(&self, source: Option<usize>) -> BTreeSet<u64> {
        let region_blocks = self.config.region_blocks;
        let in_flight = self.ops.values().filter_map(|op| match op.kind {
            OpKind::Write { lba, blocks, .. } => Some(regions_of(lba, blocks, region_blocks)),
            _ => None,
        });
        let pending = self.pending.values().filter_map(|pending| match pending {
            Pending::Write {
                lba, blocks, acked, ..
            } if source.is_none_or(|source| !acked.contains(&source)) => {
                Some(regions_of(*lba, *blocks, region_blocks))
            }
            _ => None,
        });
        in_flight.chain(pending).flatten().collect()
    }

    /// Starts queued guest requests in order; a write waits while an
    /// earlier pending write overlaps it, so replicas apply overlapping
    /// writes in the same order.
    fn start_queued(&mut self, now: Instant) {
        if self.phase != Phase::Serving {
            return;
        }
        let mut kept = VecDeque::new();
        while let Some((guest, op, since)) = self.queued.pop_front() {
            let blocked = match &op {
                GuestOp::Write { lba, blocks, .. } => {
                    self.overlaps_pending(*lba, *blocks)
                        || kept
                            .iter()
                            .any(|(_, earlier, _): &(GuestId, GuestOp<P>, Instant)| {
                                matches!(earlier, GuestOp::Write { lba: l, blocks: b, .. }
                                if *l < lba + blocks && *lba < l + b)
                            })
                }
                _ => false,
            };
            if blocked {
                kept.push_back((guest, op, since));
            } else {
                self.arrived.insert(guest, since);
                self.start(guest, op, now);
            }
        }
        self.queued = kept;
    }

    /// Whether a pending write overlaps the range, or a write to an
    /// in-sync replica still in flight does (a completed write may still
    /// have a resent copy on its way).
    fn overlaps_pending(&self, lba: u64, blocks: u64) -> bool {
        let pending = self.pending.values().any(|pending| {
            matches!(pending, Pending::Write { lba: l, blocks: b, .. }
                if *l < lba + blocks && lba < l + b)
        });
        pending
            || self.ops.values().any(|op| {
                self.replicas[op.replica].state == ReplicaState::InSync
                    && self.write_overlaps(op, lba, blocks)
            })
    }

    fn write_overlaps(&self, op: &Op, lba: u64, blocks: u64) -> bool {
        matches!(op.kind, OpKind::Write { lba: l, blocks: b, .. } if l < lba + blocks && lba < l + b)
    }

    fn start(&mut self, guest: GuestId, op: GuestOp<P>, now: Instant) {
        match op {
            GuestOp::Write { lba, blocks, data } => {
                let mut sent = BTreeSet::new();
                let region_blocks = self.config.region_blocks;
                for replica in 0..self.replicas.len() {
                    let last = self.last_in_sync(replica);
                    let track = &mut self.replicas[replica];
                    if track.session.is_none() {
                        // The last in-sync replica gets it when it is back
                        // (`resend_pending`); the others copy it later.
                        if !last {
                            track.mark_dirty(lba, blocks, region_blocks);
                        }
                        continue;
                    }
                    // A stale replica still has an overlapping write in
                    // flight: the two could land in either order, so the
                    // range is copied to it later instead.
                    let racing = self
                        .ops
                        .values()
                        .any(|op| op.replica == replica && self.write_overlaps(op, lba, blocks));
                    let track = &mut self.replicas[replica];
                    if racing {
                        track.mark_dirty(lba, blocks, region_blocks);
                        continue;
                    }
                    sent.insert(replica);
                    self.send_write(replica, guest, lba, blocks, data.clone(), now);
                }
                self.pending.insert(
                    guest,
                    Pending::Write {
                        lba,
                        blocks,
                        data,
                        sent,
                        acked: BTreeSet::new(),
                    },
                );
            }
            GuestOp::Flush => {
                if std::mem::take(&mut self.cache_lost) {
                    self.complete(guest, Outcome::Failed(Failure::CacheLost));
                    return;
                }
                let mut sent = BTreeSet::new();
                for replica in self.in_sync().collect::<Vec<_>>() {
                    if self.replicas[replica].session.is_none() {
                        continue;
                    }
                    sent.insert(replica);
                    self.send_flush(replica, Some(guest), now);
                }
                self.pending.insert(
                    guest,
                    Pending::Flush {
                        sent,
                        acked: BTreeSet::new(),
                    },
                );
            }
            GuestOp::Read { lba, blocks } => {
                self.pending.insert(
                    guest,
                    Pending::Read {
                        lba,
                        blocks,
                        tried: BTreeSet::new(),
                        waiting: true,
                    },
                );
            }
        }
    }

    /// Sends reads that have no replica working on them to an in-sync one.
    fn retry_reads(&mut self, now: Instant) {
        let waiting: Vec<GuestId> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p, Pending::Read { waiting: true, .. }))
            .map(|(&g, _)| g)
            .collect();
        for guest in waiting {
            let (lba, blocks, except) = match self.pending.get_mut(&guest) {
                Some(Pending::Read {
                    lba, blocks, tried, ..
                }) => {
                    if tried.len() >= self.replicas.len() {
                        tried.clear();
                    }
                    (*lba, *blocks, tried.clone())
                }
                _ => continue,
            };
            let Some(replica) = self
                .source(&except)
                .or_else(|| self.source(&BTreeSet::new()))
            else {
                continue;
            };
            if let Some(Pending::Read { tried, waiting, .. }) = self.pending.get_mut(&guest) {
                tried.insert(replica);
                *waiting = false;
            }
            self.send_op(replica, OpKind::Read { guest }, now, |head| Request::Read {
                head,
                lba,
                blocks,
            });
        }
    }

    /// Completes writes and flushes that every in-sync replica has done,
    /// if enough in-sync replicas have.
    fn finish_pending(&mut self) {
        let in_sync: Vec<usize> = self.in_sync().collect();
        let needed = self.config.min_replicas.min(self.replicas.len()).max(1);
        let done: Vec<GuestId> = self
            .pending
            .iter()
            .filter_map(|(&guest, pending)| match pending {
                Pending::Write { acked, .. } | Pending::Flush { acked, .. } => {
                    let all = in_sync.iter().all(|r| acked.contains(r));
                    let enough = in_sync.iter().filter(|r| acked.contains(r)).count() >= needed;
                    (all && enough).then_some(guest)
                }
                Pending::Read { .. } => None,
            })
            .collect();
        for guest in done {
            let outcome = match self.pending.remove(&guest) {
                Some(Pending::Write { .. }) => Outcome::Written,
                Some(Pending::Flush { .. }) => Outcome::Flushed,
                _ => continue,
            };
            self.complete(guest, outcome);
        }
    }
}
