//! A deterministic, seeded simulation of the replication protocol.
//!
//! One volume, three replicas, a frontend that a new attachment replaces
//! now and then (the old one lives on as a zombie that keeps writing), a
//! metadata service that commits with the generation check Raft applies,
//! and a network that drops, delays, reorders and duplicates messages and
//! partitions links. Replicas crash and lose what they had not committed
//! (a random prefix of it survives, as a background commit would leave it).
//! The time is simulated; the seed decides everything.
//!
//! The checker asserts, during the run:
//! - every read returns, for each block, a version that was written to it
//!   (or zero) and is no older than what a completed flush covered;
//! - no replica applies a write of a lower generation than one it has
//!   seen;
//! - the current frontend is never fenced.
//!
//! And at the end, once faults stop and everything is back in sync:
//! - every replica is in sync and all hold identical blocks;
//! - every block is at least as new as the last completed flush covered.
//!
//! `BLOCKSTORE_SIM_SEED=n` runs one seed (with a trace if
//! `BLOCKSTORE_SIM_VERBOSE=1`); `BLOCKSTORE_SIM_SEEDS=n` runs n seeds from
//! `BLOCKSTORE_SIM_FIRST_SEED` (default 0).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::frontend::{
    Config, Effect, Failure, Frontend, GuestId, GuestOp, MetaChange, MetaOutcome, Outcome,
    ReplicaState,
};
use super::replica::{Admit, Opened, ReplicaGate};
use super::{Generation, Reply, Request};

/// SplitMix64: the simulation's only source of randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

const REPLICAS: usize = 3;
const VOLUME_BLOCKS: u64 = 64;
const REGION_BLOCKS: u64 = 8;
const FAULT_STEPS: u64 = 6_000;
const SETTLE_STEPS: u64 = 60_000;
const STEP: Duration = Duration::from_millis(1);

/// Block contents: a write's version in every block it covers.
type Data = Vec<u64>;

impl super::frontend::Payload for Data {
    fn blocks(&self) -> u64 {
        self.len() as u64
    }
}

#[derive(Debug)]
struct SimReplica {
    up: bool,
    incarnation: u32,
    gate: ReplicaGate,
    /// The highest generation, as stored durably.
    stored_highest: Generation,
    durable: Vec<u64>,
    /// Applied, in order, not yet committed: (first block, contents).
    uncommitted: Vec<(u64, Data)>,
    view: Vec<u64>,
    restart_at: Option<u64>,
    /// Flushes waiting for earlier writes of their session: (op, after).
    held_flushes: Vec<(u64, u64)>,
}

impl SimReplica {
    fn new() -> SimReplica {
        SimReplica {
            up: true,
            incarnation: 1,
            gate: ReplicaGate::new(1, 0),
            stored_highest: 0,
            durable: vec![0; VOLUME_BLOCKS as usize],
            uncommitted: Vec::new(),
            view: vec![0; VOLUME_BLOCKS as usize],
            restart_at: None,
            held_flushes: Vec::new(),
        }
    }

    fn crash(&mut self, rng: &mut Rng, restart_at: u64) {
        // A background commit may have saved a prefix of what was applied.
        let kept = rng.below(self.uncommitted.len() as u64 + 1) as usize;
        for (lba, data) in self.uncommitted.drain(..).take(kept) {
            let start = lba as usize;
            self.durable[start..start + data.len()].copy_from_slice(&data);
        }
        self.view = self.durable.clone();
        self.held_flushes.clear();
        self.up = false;
        self.restart_at = Some(restart_at);
    }

    fn restart(&mut self) {
        self.incarnation += 1;
        self.gate = ReplicaGate::new(self.incarnation, self.stored_highest);
        self.up = true;
        self.restart_at = None;
    }

    fn apply(&mut self, lba: u64, data: Data) {
        let start = lba as usize;
        self.view[start..start + data.len()].copy_from_slice(&data);
        self.uncommitted.push((lba, data));
    }

    /// Handles a request; returns the replies it produces (none for a
    /// flush held back, several when a write releases held flushes).
    fn handle(&mut self, request: Request<Data>) -> Vec<Reply<Data>> {
        let mutates = request.mutates();
        let mut replies = vec![];
        if let Some(reply) = self.handle_one(request) {
            replies.push(reply);
        }
        if mutates {
            let (ready, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held_flushes)
                .into_iter()
                .partition(|&(_, after)| self.gate.flush_ready(after));
            self.held_flushes = held;
            for (op, _) in ready {
                self.flush();
                replies.push(Reply::Done { op });
            }
        }
        replies
    }

    fn flush(&mut self) {
        self.durable = self.view.clone();
        self.uncommitted.clear();
    }

    fn handle_one(&mut self, request: Request<Data>) -> Option<Reply<Data>> {
        let head = match &request {
            Request::Open { generation, op } => {
                self.held_flushes.clear();
                return Some(match self.gate.open(*generation) {
                    Opened::Fenced { highest } => Reply::Fenced { highest },
                    Opened::Session { session, persist } => {
                        if let Some(generation) = persist {
                            self.stored_highest = generation;
                        }
                        Reply::Opened { op: *op, session }
                    }
                });
            }
            other => *other.head().expect("not an open"),
        };
        match self.gate.admit(&head, request.mutates()) {
            Admit::Fenced { highest } => return Some(Reply::Fenced { highest }),
            Admit::NotOpen => return Some(Reply::NotOpen { op: head.op }),
            Admit::Duplicate => return Some(Reply::Done { op: head.op }),
            Admit::Apply => {}
        }
        assert!(
            head.generation >= self.gate.highest(),
            "a replica applied generation {} after seeing {}",
            head.generation,
            self.gate.highest()
        );
        let region = |region: u64| {
            let start = (region * REGION_BLOCKS) as usize;
            start..start + REGION_BLOCKS as usize
        };
        Some(match request {
            Request::Open { .. } => unreachable!("handled above"),
            Request::Write {
                lba, blocks, data, ..
            } => {
                assert_eq!(data.len() as u64, blocks);
                self.apply(lba, data);
                Reply::Done { op: head.op }
            }
            Request::Flush { after, .. } => {
                if !self.gate.flush_ready(after) {
                    self.held_flushes.push((head.op, after));
                    return None;
                }
                self.flush();
                Reply::Done { op: head.op }
            }
            Request::Read { lba, blocks, .. } => Reply::Data {
                op: head.op,
                data: self.view[lba as usize..(lba + blocks) as usize].to_vec(),
            },
            Request::Digests { .. } => Reply::Digests {
                op: head.op,
                digests: (0..VOLUME_BLOCKS / REGION_BLOCKS)
                    .map(|r| digest(&self.view[region(r)]))
                    .collect(),
            },
            Request::CopyOut { region: r, .. } => Reply::Data {
                op: head.op,
                data: self.view[region(r)].to_vec(),
            },
            Request::CopyIn {
                region: r, data, ..
            } => {
                assert_eq!(data.len() as u64, REGION_BLOCKS);
                self.apply(r * REGION_BLOCKS, data);
                Reply::Done { op: head.op }
            }
            Request::Verify { region: r, .. } => Reply::Verified {
                op: head.op,
                digest: digest(&self.view[region(r)]),
                damaged: Vec::new(),
            },
        })
    }
}

/// A region's digest: FNV-1a over its block versions.
fn digest(versions: &[u64]) -> u64 {
    versions.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &v| {
        (hash ^ v).wrapping_mul(0x100_0000_01b3)
    })
}

/// A message in flight between frontend `frontend` and replica `replica`.
#[derive(Debug)]
enum Message {
    ToReplica(Request<Data>),
    ToFrontend(Reply<Data>),
}

#[derive(Debug)]
struct Flight {
    at: u64,
    frontend: usize,
    replica: usize,
    message: Message,
}

/// What the checker knows of guest requests.
#[derive(Debug, Default)]
struct Checker {
    /// Versions written to each block, by anyone.
    written: Vec<BTreeSet<u64>>,
    /// The version of the last completed write to each block.
    completed: Vec<u64>,
    /// What a completed flush guarantees, per block.
    floor: Vec<u64>,
    /// Flushes in flight: what they will guarantee.
    flushes: BTreeMap<GuestId, Vec<u64>>,
    /// Reads in flight: (first block, the floor when issued).
    reads: BTreeMap<GuestId, (u64, Vec<u64>)>,
    /// Writes in flight: (first block, version, blocks).
    writes: BTreeMap<GuestId, (u64, u64, u64)>,
}

struct Sim {
    rng: Rng,
    verbose: bool,
    now: u64,
    base: Instant,
    replicas: Vec<SimReplica>,
    /// Every frontend ever attached; the last is current, the rest are
    /// zombies.
    frontends: Vec<Frontend<Data>>,
    generation: Generation,
    states: Vec<ReplicaState>,
    /// Metadata changes waiting to commit: (when, frontend, generation,
    /// change).
    metadata: VecDeque<(u64, usize, Generation, MetaChange)>,
    flights: Vec<Flight>,
    /// Links cut: (frontend, replica).
    cut: BTreeSet<(usize, usize)>,
    faults: bool,
    next_guest: GuestId,
    next_version: u64,
    checker: Checker,
    /// Guest requests outstanding per frontend.
    outstanding: Vec<usize>,
    /// The flush that ends a run, and whether it succeeded.
    final_flush: Option<(GuestId, bool)>,
    /// Whether the scrub after settling has started.
    final_scrub: bool,
    last_view: String,
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let base = Instant::now();
        let mut sim = Sim {
            rng: Rng(seed),
            verbose,
            now: 0,
            base,
            replicas: (0..REPLICAS).map(|_| SimReplica::new()).collect(),
            frontends: Vec::new(),
            generation: 0,
            states: vec![ReplicaState::InSync; REPLICAS],
            metadata: VecDeque::new(),
            flights: Vec::new(),
            cut: BTreeSet::new(),
            faults: true,
            next_guest: 1,
            next_version: 1,
            checker: Checker {
                written: vec![BTreeSet::new(); VOLUME_BLOCKS as usize],
                completed: vec![0; VOLUME_BLOCKS as usize],
                floor: vec![0; VOLUME_BLOCKS as usize],
                ..Checker::default()
            },
            outstanding: Vec::new(),
            final_flush: None,
            final_scrub: false,
            last_view: String::new(),
        };
        sim.attach();
        sim
    }

    fn instant(&self) -> Instant {
        self.base + STEP * self.now as u32
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.verbose {
            eprintln!("[{:>6}] {}", self.now, what());
        }
    }

    fn config() -> Config {
        Config {
            volume_blocks: VOLUME_BLOCKS,
            region_blocks: REGION_BLOCKS,
            min_replicas: 2,
            replica_timeout: Duration::from_millis(40),
            // Long partitions outlast it: writes then fail rather than wait.
            io_timeout: Duration::from_millis(1500),
            probe_interval: Duration::from_millis(25),
            // A region (32 KiB) every 2 ms: resync paced, not instant.
            resync_bytes_per_second: 16 << 20,
            replace_after: Some(Duration::from_millis(300)),
        }
    }

    /// A new attachment: the generation goes up through the metadata and
    /// a new frontend starts; the old one becomes a zombie.
    fn attach(&mut self) {
        self.generation += 1;
        let now = self.instant();
        self.log(|| format!("attach generation {}", self.generation));
        // A new attachment's guest starts from what is durable: writes the
        // old one completed but never flushed may be gone, as after a
        // power cut.
        self.checker.completed = self.checker.floor.clone();
        self.frontends.push(Frontend::new(
            Self::config(),
            self.generation,
            &self.states,
            now,
        ));
        self.outstanding.push(0);
        self.drain(self.frontends.len() - 1);
    }

    fn current(&self) -> usize {
        self.frontends.len() - 1
    }

    fn send(&mut self, frontend: usize, replica: usize, message: Message) {
        if self.faults {
            if self.cut.contains(&(frontend, replica)) || self.rng.chance(20) {
                return;
            }
            if self.rng.chance(20) {
                let at = self.now + 1 + self.rng.below(12);
                let copy = match &message {
                    Message::ToReplica(r) => Message::ToReplica(r.clone()),
                    Message::ToFrontend(r) => Message::ToFrontend(r.clone()),
                };
                self.flights.push(Flight {
                    at,
                    frontend,
                    replica,
                    message: copy,
                });
            }
        }
        let delay = if self.faults {
            1 + self.rng.below(12)
        } else {
            1 + self.rng.below(3)
        };
        self.flights.push(Flight {
            at: self.now + delay,
            frontend,
            replica,
            message,
        });
    }

    /// Carries out a frontend's effects.
    fn drain(&mut self, frontend: usize) {
        loop {
            let effects = self.frontends[frontend].take_effects();
            if effects.is_empty() {
                return;
            }
            for effect in effects {
                match effect {
                    Effect::Send { replica, request } => {
                        self.send(frontend, replica, Message::ToReplica(request));
                    }
                    Effect::Metadata { generation, change } => {
                        let at = self.now + 1 + self.rng.below(20);
                        self.metadata.push_back((at, frontend, generation, change));
                    }
                    Effect::Complete { guest, outcome } => self.completed(frontend, guest, outcome),
                }
            }
        }
    }

    fn completed(&mut self, frontend: usize, guest: GuestId, outcome: Outcome<Data>) {
        self.outstanding[frontend] -= 1;
        let current = frontend == self.current();
        self.log(|| format!("frontend {frontend} completes {guest}: {outcome:?}"));
        if current {
            assert_ne!(
                outcome,
                Outcome::Failed(Failure::Fenced),
                "the current frontend was fenced"
            );
        }
        if let Some((id, done)) = &mut self.final_flush {
            if *id == guest {
                *done = outcome == Outcome::Flushed;
                if !*done {
                    self.final_flush = None;
                }
            }
        }
        let checker = &mut self.checker;
        match outcome {
            Outcome::Written => {
                let (lba, version, blocks) = checker.writes.remove(&guest).expect("a write");
                if current {
                    for block in lba..lba + blocks {
                        checker.completed[block as usize] = version;
                    }
                }
            }
            Outcome::Flushed => {
                if let Some(covered) = checker.flushes.remove(&guest) {
                    if current {
                        for (floor, covered) in checker.floor.iter_mut().zip(covered) {
                            *floor = (*floor).max(covered);
                        }
                    }
                }
            }
            Outcome::Read(data) => {
                let (lba, floor) = checker.reads.remove(&guest).expect("a read");
                for (i, &version) in data.iter().enumerate() {
                    let block = lba as usize + i;
                    assert!(
                        version == 0 || checker.written[block].contains(&version),
                        "block {block} read version {version}, never written there"
                    );
                    assert!(
                        version >= floor[i],
                        "block {block} read version {version}, older than flushed {}",
                        floor[i]
                    );
                }
            }
            Outcome::Failed(failure) => {
                if current && failure == Failure::CacheLost {
                    // The guest is told its unflushed writes may be gone:
                    // from here a flush guarantees only what follows.
                    checker.completed = checker.floor.clone();
                }
                checker.writes.remove(&guest);
                checker.flushes.remove(&guest);
                checker.reads.remove(&guest);
            }
        }
    }

    fn submit(&mut self, frontend: usize, op: GuestOp<Data>) {
        let guest = self.next_guest;
        self.next_guest += 1;
        match &op {
            GuestOp::Write { lba, blocks, data } => {
                for block in *lba..lba + blocks {
                    self.checker.written[block as usize].insert(data[0]);
                }
                self.checker.writes.insert(guest, (*lba, data[0], *blocks));
            }
            GuestOp::Flush => {
                self.checker
                    .flushes
                    .insert(guest, self.checker.completed.clone());
            }
            GuestOp::Read { lba, blocks } => {
                let floor = self.checker.floor[*lba as usize..(lba + blocks) as usize].to_vec();
                self.checker.reads.insert(guest, (*lba, floor));
            }
        }
        self.log(|| format!("frontend {frontend} submits {guest}: {op:?}"));
        self.outstanding[frontend] += 1;
        let now = self.instant();
        self.frontends[frontend].submit(guest, op, now);
        self.drain(frontend);
    }

    fn random_op(&mut self) -> GuestOp<Data> {
        let kind = self.rng.below(10);
        let lba = self.rng.below(VOLUME_BLOCKS);
        let blocks = 1 + self.rng.below(12.min(VOLUME_BLOCKS - lba));
        match kind {
            0..=5 => {
                let version = self.next_version;
                self.next_version += 1;
                GuestOp::Write {
                    lba,
                    blocks,
                    data: vec![version; blocks as usize],
                }
            }
            6 | 7 => GuestOp::Flush,
            _ => GuestOp::Read { lba, blocks },
        }
    }

    fn step(&mut self) {
        self.now += 1;
        let now = self.instant();
        // Replicas come back.
        for replica in 0..REPLICAS {
            if self.replicas[replica]
                .restart_at
                .is_some_and(|at| at <= self.now)
            {
                self.log(|| format!("replica {replica} restarts"));
                self.replicas[replica].restart();
            }
        }
        // Messages arrive.
        let (due, later): (Vec<Flight>, Vec<Flight>) = std::mem::take(&mut self.flights)
            .into_iter()
            .partition(|flight| flight.at <= self.now);
        self.flights = later;
        for flight in due {
            match flight.message {
                Message::ToReplica(request) => {
                    if !self.replicas[flight.replica].up {
                        continue;
                    }
                    let summary = format!("{request:?}");
                    let replies = self.replicas[flight.replica].handle(request);
                    self.log(|| {
                        format!(
                            "replica {} <- frontend {}: {summary} -> {replies:?}",
                            flight.replica, flight.frontend
                        )
                    });
                    for reply in replies {
                        self.send(flight.frontend, flight.replica, Message::ToFrontend(reply));
                    }
                }
                Message::ToFrontend(reply) => {
                    self.frontends[flight.frontend].on_reply(flight.replica, reply, now);
                    self.drain(flight.frontend);
                }
            }
        }
        // Metadata changes commit, with the generation check.
        while self
            .metadata
            .front()
            .is_some_and(|(at, ..)| *at <= self.now)
        {
            let (_, frontend, generation, change) = self.metadata.pop_front().expect("checked");
            let outcome = if self.faults && self.rng.chance(100) {
                MetaOutcome::Retry
            } else if generation != self.generation {
                MetaOutcome::Fenced
            } else {
                match change {
                    MetaChange::MarkStale { replica } => {
                        self.states[replica] = ReplicaState::Stale;
                        MetaOutcome::Committed
                    }
                    MetaChange::MarkInSync { replica } => {
                        self.states[replica] = ReplicaState::InSync;
                        MetaOutcome::Committed
                    }
                    MetaChange::Replace { replica } => {
                        let others = (0..REPLICAS)
                            .any(|r| r != replica && self.states[r] == ReplicaState::InSync);
                        if others {
                            // A new, empty node takes the slot; the old
                            // one is gone for good.
                            let incarnation = self.replicas[replica].incarnation + 100;
                            let mut fresh = SimReplica::new();
                            fresh.incarnation = incarnation;
                            fresh.gate = ReplicaGate::new(incarnation, 0);
                            self.replicas[replica] = fresh;
                            self.states[replica] = ReplicaState::Stale;
                            MetaOutcome::Committed
                        } else {
                            MetaOutcome::Refused
                        }
                    }
                }
            };
            self.log(|| format!("metadata {change:?} of {frontend}: {outcome:?}"));
            self.frontends[frontend].on_metadata(outcome, now);
            self.drain(frontend);
        }
        if self.faults {
            self.inject();
        }
        // The guest of the current frontend, and the zombies, submit.
        let current = self.current();
        if self.faults && self.outstanding[current] < 6 && self.rng.chance(300) {
            let op = self.random_op();
            self.submit(current, op);
        }
        if self.faults && current > 0 && self.rng.chance(50) {
            let zombie = self.rng.below(current as u64) as usize;
            if let op @ GuestOp::Write { .. } = self.random_op() {
                self.submit(zombie, op);
            }
        }
        // Scrubs run beside everything else; they may only find and
        // repair, never break anything.
        if self.faults && self.rng.chance(2) && self.frontends[current].scrub(now) {
            self.log(|| format!("frontend {current} starts a scrub"));
            self.drain(current);
        }
        for frontend in 0..self.frontends.len() {
            self.frontends[frontend].tick(now);
            self.drain(frontend);
        }
        if self.verbose {
            let view = format!(
                "{:?} {:?} {:?}",
                self.frontends[current].phase(),
                self.frontends[current].states(),
                self.frontends[current].dirty_counts()
            );
            if view != self.last_view {
                self.log(|| format!("frontend {current}: {view}"));
                self.last_view = view;
            }
        }
    }

    fn inject(&mut self) {
        let rng = &mut self.rng;
        if rng.chance(3) {
            let replica = rng.below(REPLICAS as u64) as usize;
            if self.replicas[replica].up {
                let at = self.now + 20 + rng.below(400);
                self.replicas[replica].crash(rng, at);
                self.log(|| format!("replica {replica} crashes"));
            }
        }
        if self.rng.chance(4) {
            let frontend = self.rng.below(self.frontends.len() as u64) as usize;
            let replica = self.rng.below(REPLICAS as u64) as usize;
            self.log(|| format!("cut frontend {frontend} from replica {replica}"));
            self.cut.insert((frontend, replica));
        }
        if self.rng.chance(6) && !self.cut.is_empty() {
            let index = self.rng.below(self.cut.len() as u64) as usize;
            let link = *self.cut.iter().nth(index).expect("in range");
            self.cut.remove(&link);
        }
        if self.rng.chance(1) {
            self.attach();
        }
    }

    /// Stops faults and runs until the current frontend has every replica
    /// in sync and nothing outstanding; then checks the replicas.
    fn settle(&mut self, seed: u64) {
        self.faults = false;
        self.cut.clear();
        for replica in 0..REPLICAS {
            if !self.replicas[replica].up {
                self.replicas[replica].restart();
            }
        }
        let current = self.current();
        for _ in 0..SETTLE_STEPS {
            self.step();
            let frontend = &self.frontends[current];
            let quiet = frontend.outstanding() == 0
                && self.states.iter().all(|&s| s == ReplicaState::InSync)
                && frontend.states().iter().all(|&s| s == ReplicaState::InSync)
                && frontend.dirty_counts().iter().all(|&d| d == 0);
            match self.final_flush {
                Some((_, true)) if quiet && self.outstanding[current] == 0 => {
                    // In-sync replicas are identical: a scrub finds nothing.
                    let report = self.frontends[current].scrub_report();
                    match report {
                        Some(report) if report.finished && self.final_scrub => {
                            assert_eq!(
                                (report.differing, report.damaged_blocks, report.skipped),
                                (0, 0, 0),
                                "seed {seed}: a scrub of settled replicas found {report:?}"
                            );
                            self.check_replicas(seed);
                            return;
                        }
                        _ if !self.final_scrub => {
                            let now = self.instant();
                            if self.frontends[current].scrub(now) {
                                self.final_scrub = true;
                                self.drain(current);
                            }
                        }
                        _ => {}
                    }
                }
                // A flush that failed (a cache was lost) is retried.
                None if quiet => {
                    self.final_flush = Some((self.next_guest, false));
                    self.submit(current, GuestOp::Flush);
                }
                _ => {}
            }
        }
        if self.verbose {
            eprintln!("{:#?}", self.frontends[current]);
        }
        panic!(
            "seed {seed}: no convergence: phase {:?}, states {:?} (metadata {:?}), dirty {:?}, outstanding {}",
            self.frontends[current].phase(),
            self.frontends[current].states(),
            self.states,
            self.frontends[current].dirty_counts(),
            self.frontends[current].outstanding()
        );
    }

    fn check_replicas(&self, seed: u64) {
        let reference = &self.replicas[0].view;
        for (index, replica) in self.replicas.iter().enumerate() {
            assert_eq!(
                &replica.view, reference,
                "seed {seed}: replica {index} differs from replica 0"
            );
            assert_eq!(
                replica.durable, replica.view,
                "seed {seed}: replica {index} is not durable after the last flush"
            );
        }
        for (block, (&version, &floor)) in reference.iter().zip(&self.checker.floor).enumerate() {
            assert!(
                version >= floor,
                "seed {seed}: block {block} holds version {version}, older than flushed {floor}"
            );
            assert!(
                version == 0 || self.checker.written[block].contains(&version),
                "seed {seed}: block {block} holds version {version}, never written there"
            );
        }
    }
}

fn run(seed: u64, verbose: bool) {
    let mut sim = Sim::new(seed, verbose);
    for _ in 0..FAULT_STEPS {
        sim.step();
    }
    sim.settle(seed);
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn replication_survives_seeded_faults() {
    let verbose = std::env::var("BLOCKSTORE_SIM_VERBOSE").is_ok_and(|v| v == "1");
    if let Some(seed) = env_u64("BLOCKSTORE_SIM_SEED") {
        run(seed, verbose);
        return;
    }
    let first = env_u64("BLOCKSTORE_SIM_FIRST_SEED").unwrap_or(0);
    let seeds = env_u64("BLOCKSTORE_SIM_SEEDS").unwrap_or(200);
    for seed in first..first + seeds {
        let outcome = std::panic::catch_unwind(|| run(seed, false));
        if let Err(panic) = outcome {
            eprintln!(
                "replication simulation failed with seed {seed}; rerun it with \
                 BLOCKSTORE_SIM_SEED={seed} BLOCKSTORE_SIM_VERBOSE=1"
            );
            std::panic::resume_unwind(panic);
        }
    }
}
