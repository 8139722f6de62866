//! The frontend side: runs one attached volume's replication coordinator
//! against its replicas, local and remote.
//!
//! [`spawn`] starts a task that owns the
//! [`Frontend`](blockstore::replication::frontend::Frontend) and carries out
//! its effects: requests go to a local replica on a blocking thread, or to
//! a remote one over a replication stream on the cluster's QUIC
//! connection (opened, and opened again after a failure, by a link task
//! per replica); metadata changes go to the given [`MetadataFn`];
//! completions go back to whoever submitted the request through
//! [`DriverHandle::submit`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockstore::replication::frontend::{
    Config, Effect, Frontend, GuestId, GuestOp, MetaChange, MetaOutcome, Outcome, Phase,
    ReplicaState, ScrubReport,
};
use blockstore::replication::replica_volume::ReplicaVolume;
use blockstore::replication::wire::{decode_reply, encode_request, Blocks};
use blockstore::replication::{Generation, Reply, Request};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::read_frame;
use super::service::{push_frame, BATCH_FRAMES_MAX};
use crate::cluster::metadata::NodeId;
use crate::cluster::raft::Member;
use crate::cluster::transport::{QuicConnection, QuicNetwork, KIND_REPLICATION};

/// How often the coordinator's clock moves (timeouts, probes, resync).
const TICK: Duration = Duration::from_millis(10);

/// A change to the volume's replicas in the cluster metadata, by node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaRequest {
    MarkStale {
        node: NodeId,
    },
    MarkInSync {
        node: NodeId,
    },
    /// Put the replica on `old` on another node: `to`, or one placement
    /// picks.
    Replace {
        old: NodeId,
        to: Option<NodeId>,
    },
}

/// How a [`MetaRequest`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaReply {
    Outcome(MetaOutcome),
    /// The replica now lives on `node`, reached at `member`.
    Replaced {
        node: NodeId,
        member: Member,
    },
}

/// Commits a metadata change for the volume and says how it went.
pub type MetadataFn = Arc<
    dyn Fn(Generation, MetaRequest) -> Pin<Box<dyn Future<Output = MetaReply> + Send>>
        + Send
        + Sync,
>;

/// Where a replica is.
pub enum ReplicaEndpoint {
    /// On this node.
    Local {
        node: NodeId,
        replica: Arc<Mutex<ReplicaVolume>>,
    },
    /// On another node, reached over the cluster transport.
    Remote { node: NodeId, member: Member },
}

impl ReplicaEndpoint {
    pub fn node(&self) -> NodeId {
        match self {
            ReplicaEndpoint::Local { node, .. } | ReplicaEndpoint::Remote { node, .. } => *node,
        }
    }
}

impl std::fmt::Debug for ReplicaEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaEndpoint::Local { node, .. } => write!(f, "Local(node {node})"),
            ReplicaEndpoint::Remote { node, member } => {
                write!(f, "Remote(node {node} at {})", member.address)
            }
        }
    }
}

/// What the driver reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverStatus {
    pub phase: Phase,
    pub states: Vec<ReplicaState>,
    /// Dirty regions per replica (resync left to do).
    pub dirty: Vec<u64>,
    /// The running scrub's progress, or the last scrub's result.
    pub scrub: Option<ScrubReport>,
    /// The node of each replica (a replacement changes one).
    pub nodes: Vec<NodeId>,
}

/// Requests about the volume rather than its data.
enum Control {
    /// Start a scrub; answers whether one started (not if one runs), and
    /// the scrub's report.
    Scrub(oneshot::Sender<(bool, Option<ScrubReport>)>),
    /// Replace the replica on `old` (by a node placement picks, or `to`);
    /// answers whether it was asked for.
    Replace {
        old: NodeId,
        to: Option<NodeId>,
        answer: oneshot::Sender<bool>,
    },
}

/// Where a request's outcome goes.
enum Done {
    Channel(oneshot::Sender<Outcome<Blocks>>),
    /// Called on the driver's task: it must not block.
    Callback(Box<dyn FnOnce(Outcome<Blocks>) + Send>),
}

impl Done {
    fn deliver(self, outcome: Outcome<Blocks>) {
        match self {
            Done::Channel(sender) => {
                let _ = sender.send(outcome);
            }
            Done::Callback(callback) => callback(outcome),
        }
    }
}

type GuestRequest = (GuestOp<Blocks>, Done);

/// Submits guest requests to a running driver.
#[derive(Debug, Clone)]
pub struct DriverHandle {
    requests: mpsc::UnboundedSender<GuestRequest>,
    control: mpsc::UnboundedSender<Control>,
    status: watch::Receiver<DriverStatus>,
}

impl DriverHandle {
    /// Runs a guest request to completion. A driver that has stopped
    /// answers as fenced.
    pub async fn submit(&self, op: GuestOp<Blocks>) -> Outcome<Blocks> {
        let (done, outcome) = oneshot::channel();
        if self.requests.send((op, Done::Channel(done))).is_err() {
            return Outcome::Failed(blockstore::replication::frontend::Failure::Fenced);
        }
        outcome.await.unwrap_or(Outcome::Failed(
            blockstore::replication::frontend::Failure::Fenced,
        ))
    }

    /// Starts a guest request; `done` gets its outcome, called on the
    /// driver's task (it must not block). A stopped driver answers as
    /// fenced, at once.
    pub fn submit_with(
        &self,
        op: GuestOp<Blocks>,
        done: impl FnOnce(Outcome<Blocks>) + Send + 'static,
    ) {
        if let Err(mpsc::error::SendError((_, done))) =
            self.requests.send((op, Done::Callback(Box::new(done))))
        {
            done.deliver(Outcome::Failed(
                blockstore::replication::frontend::Failure::Fenced,
            ));
        }
    }

    /// Starts a scrub (see `Frontend::scrub`): whether it started (not
    /// when one is already running), and its report so far; `None` when
    /// the driver has stopped. Progress is in the status.
    pub async fn scrub(&self) -> Option<(bool, Option<ScrubReport>)> {
        let (started, answer) = oneshot::channel();
        self.control.send(Control::Scrub(started)).ok()?;
        answer.await.ok()
    }

    /// Asks for the replica on node `old` to be replaced by a full copy
    /// on `to` (or a node placement picks); the status shows when it is.
    /// False when `old` holds no replica, a replacement of it is already
    /// asked for, or the driver has stopped or is fenced.
    pub async fn replace(&self, old: NodeId, to: Option<NodeId>) -> bool {
        let (answer, answered) = oneshot::channel();
        if self
            .control
            .send(Control::Replace { old, to, answer })
            .is_err()
        {
            return false;
        }
        answered.await.unwrap_or(false)
    }

    /// The latest status.
    pub fn status(&self) -> DriverStatus {
        self.status.borrow().clone()
    }

    /// Waits until `check` holds for the status, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        check: impl Fn(&DriverStatus) -> bool,
    ) -> Result<DriverStatus, DriverStatus> {
        let mut status = self.status.clone();
        let waited = tokio::time::timeout(timeout, status.wait_for(|s| check(s))).await;
        match waited {
            Ok(Ok(found)) => Ok(found.clone()),
            _ => Err(self.status()),
        }
    }
}

/// Starts a driver for the volume with cluster id `volume`, attached at
/// `generation`, over replicas in the recorded `states`. It runs until
/// every [`DriverHandle`] is dropped.
pub fn spawn(
    config: Config,
    volume: u64,
    generation: Generation,
    states: Vec<ReplicaState>,
    endpoints: Vec<ReplicaEndpoint>,
    network: QuicNetwork,
    metadata: MetadataFn,
) -> (DriverHandle, tokio::task::JoinHandle<()>) {
    assert_eq!(states.len(), endpoints.len());
    let (requests, guest_rx) = mpsc::unbounded_channel();
    let (control, control_rx) = mpsc::unbounded_channel();
    let frontend = Frontend::new(config, generation, &states, Instant::now());
    let nodes: Vec<NodeId> = endpoints.iter().map(ReplicaEndpoint::node).collect();
    let (status_tx, status) = watch::channel(status_of(&frontend, &nodes));
    let task = tokio::spawn(run(
        frontend,
        volume,
        endpoints,
        network,
        metadata,
        (guest_rx, control_rx),
        status_tx,
    ));
    (
        DriverHandle {
            requests,
            control,
            status,
        },
        task,
    )
}

fn status_of(frontend: &Frontend<Blocks>, nodes: &[NodeId]) -> DriverStatus {
    DriverStatus {
        phase: frontend.phase(),
        states: frontend.states(),
        dirty: frontend.dirty_counts(),
        scrub: frontend.scrub_report(),
        nodes: nodes.to_vec(),
    }
}

/// How requests reach one replica.
enum Route {
    Local(Arc<Mutex<ReplicaVolume>>),
    Remote(mpsc::UnboundedSender<Request<Blocks>>),
}

async fn run(
    mut frontend: Frontend<Blocks>,
    volume: u64,
    endpoints: Vec<ReplicaEndpoint>,
    network: QuicNetwork,
    metadata: MetadataFn,
    (mut guest_rx, mut control_rx): (
        mpsc::UnboundedReceiver<GuestRequest>,
        mpsc::UnboundedReceiver<Control>,
    ),
    status_tx: watch::Sender<DriverStatus>,
) {
    let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<(usize, Reply<Blocks>)>();
    let (meta_tx, mut meta_rx) = mpsc::unbounded_channel::<(MetaChange, MetaReply)>();
    let mut nodes: Vec<NodeId> = endpoints.iter().map(ReplicaEndpoint::node).collect();
    let route = |index: usize, endpoint: ReplicaEndpoint| match endpoint {
        ReplicaEndpoint::Local { replica, .. } => Route::Local(replica),
        ReplicaEndpoint::Remote { node, member } => {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(link(
                QuicConnection::to(&network, node, member),
                volume,
                index,
                rx,
                reply_tx.clone(),
            ));
            Route::Remote(tx)
        }
    };
    let mut routes: Vec<Route> = endpoints
        .into_iter()
        .enumerate()
        .map(|(index, endpoint)| route(index, endpoint))
        .collect();
    // Where a manual replacement asked a replica to go.
    let mut replace_to: HashMap<usize, NodeId> = HashMap::new();
    let mut waiting: HashMap<GuestId, Done> = HashMap::new();
    let mut next_guest: GuestId = 1;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut completed = Vec::new();
    let failures = Arc::new(super::FailureLog::default());
    loop {
        for effect in frontend.take_effects() {
            match effect {
                Effect::Send { replica, request } => match &routes[replica] {
                    Route::Local(local) => {
                        let local = local.clone();
                        let replies = reply_tx.clone();
                        let failures = failures.clone();
                        tokio::spawn(async move {
                            let op = request.head().map(|head| head.op);
                            match super::service::handle(local, request).await {
                                Ok(answers) => {
                                    for answer in answers {
                                        let _ = replies.send((replica, answer));
                                    }
                                }
                                // Its session ended: the coordinator, told so,
                                // fails the replica at once (an open that
                                // failed gets no answer and times out).
                                Err(error) => {
                                    if let Some(unsaid) = failures.say(volume, &error) {
                                        tracing::error!(volume, %error, earlier_unlogged = unsaid, "the local replica failed a request");
                                    }
                                    if let Some(op) = op {
                                        let _ = replies.send((replica, Reply::NotOpen { op }));
                                    }
                                }
                            }
                        });
                    }
                    Route::Remote(link) => {
                        let _ = link.send(request);
                    }
                },
                Effect::Complete { guest, outcome } => completed.push((guest, outcome)),
                Effect::Metadata { generation, change } => {
                    let request = match change {
                        MetaChange::MarkStale { replica } => MetaRequest::MarkStale {
                            node: nodes[replica],
                        },
                        MetaChange::MarkInSync { replica } => MetaRequest::MarkInSync {
                            node: nodes[replica],
                        },
                        MetaChange::Replace { replica } => MetaRequest::Replace {
                            old: nodes[replica],
                            to: replace_to.get(&replica).copied(),
                        },
                    };
                    let metadata = metadata.clone();
                    let outcomes = meta_tx.clone();
                    tokio::spawn(async move {
                        let _ = outcomes.send((change, metadata(generation, request).await));
                    });
                }
            }
        }
        status_tx.send_if_modified(|status| {
            let now = status_of(&frontend, &nodes);
            let changed = *status != now;
            *status = now;
            changed
        });
        // After the status: whoever sees a completion sees the state that
        // allowed it (a replica marked stale, say).
        for (guest, outcome) in completed.drain(..) {
            if let Some(done) = waiting.remove(&guest) {
                done.deliver(outcome);
            }
        }
        let now = Instant::now();
        tokio::select! {
            request = guest_rx.recv() => match request {
                Some((op, done)) => {
                    let guest = next_guest;
                    next_guest += 1;
                    waiting.insert(guest, done);
                    frontend.submit(guest, op, now);
                }
                None => return,
            },
            Some((replica, reply)) = reply_rx.recv() => frontend.on_reply(replica, reply, now),
            Some((change, reply)) = meta_rx.recv() => match reply {
                MetaReply::Outcome(outcome) => {
                    if let (MetaChange::Replace { replica }, MetaOutcome::Refused) = (change, outcome) {
                        // A refused target is not tried again.
                        replace_to.remove(&replica);
                    }
                    frontend.on_metadata(outcome, now)
                }
                MetaReply::Replaced { node, member } => {
                    let MetaChange::Replace { replica } = change else {
                        unreachable!("only a replacement answers with a new node")
                    };
                    tracing::info!(volume, old = nodes[replica], new = node, "replica replaced");
                    replace_to.remove(&replica);
                    nodes[replica] = node;
                    // The old link ends when its sender is dropped.
                    routes[replica] = route(replica, ReplicaEndpoint::Remote { node, member });
                    frontend.on_metadata(MetaOutcome::Committed, now);
                }
            },
            Some(control) = control_rx.recv() => match control {
                Control::Scrub(answer) => {
                    let started = frontend.scrub(now);
                    // Seen in the status before the caller hears of it.
                    status_tx.send_replace(status_of(&frontend, &nodes));
                    let _ = answer.send((started, frontend.scrub_report()));
                }
                Control::Replace { old, to, answer } => {
                    let asked = match nodes.iter().position(|&node| node == old) {
                        Some(replica) if frontend.replace(replica, now) => {
                            match to {
                                Some(to) => replace_to.insert(replica, to),
                                None => replace_to.remove(&replica),
                            };
                            true
                        }
                        _ => false,
                    };
                    let _ = answer.send(asked);
                }
            },
            _ = tick.tick() => frontend.tick(now),
        }
    }
}

/// Carries requests to one remote replica, opening a replication stream
/// when there is none (the first request, or after the last one failed).
/// Requests that cannot be sent are dropped; the coordinator times them
/// out.
async fn link(
    connection: QuicConnection,
    volume: u64,
    replica: usize,
    mut requests: mpsc::UnboundedReceiver<Request<Blocks>>,
    replies: mpsc::UnboundedSender<(usize, Reply<Blocks>)>,
) {
    // Two streams: guest writes, flushes and their acknowledgements on
    // one; reads, resync copies, digests and scrubs (bulk data, both
    // ways) on the other, so an acknowledgement never waits behind a
    // region of data.
    let mut streams: [Option<quinn::SendStream>; 2] = [None, None];
    let mut chunks: [Vec<Bytes>; 2] = [Vec::new(), Vec::new()];
    let mut opened_before = false;
    while let Some(request) = requests.recv().await {
        // The coordinator opens a session again only after the replica
        // failed to answer: its node may have restarted, and the cached
        // connection (to its former self) would stay silent until it timed
        // out. Connect anew.
        if matches!(request, Request::Open { .. }) && opened_before {
            connection.forget();
            streams = [None, None];
        }
        // Every request already queued goes out in the same write.
        let mut queued = 1;
        let mut next = Some(request);
        while let Some(request) = next.take() {
            let lane = usize::from(bulk(&request));
            push_frame(&mut chunks[lane], encode_request(volume, &request));
            if queued < BATCH_FRAMES_MAX {
                next = requests.try_recv().ok();
                queued += 1;
            }
        }
        for lane in 0..2 {
            if chunks[lane].is_empty() {
                continue;
            }
            if streams[lane].is_none() {
                // Bounded: a dead node's handshake is not waited out; the
                // coordinator's next probe tries again.
                streams[lane] = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    open(&connection, volume, replica, replies.clone()),
                )
                .await
                .ok()
                .flatten();
                opened_before |= streams[lane].is_some();
            }
            let written = match streams[lane].as_mut() {
                Some(send) => send.write_all_chunks(&mut chunks[lane]).await.is_ok(),
                None => false,
            };
            chunks[lane].clear();
            if !written {
                streams[lane] = None;
            }
        }
    }
}

/// How long a link waits to connect to a replica's node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether a request goes on the bulk stream.
fn bulk(request: &Request<Blocks>) -> bool {
    matches!(
        request,
        Request::Read { .. }
            | Request::CopyOut { .. }
            | Request::CopyIn { .. }
            | Request::Digests { .. }
            | Request::Verify { .. }
    )
}

async fn open(
    connection: &QuicConnection,
    volume: u64,
    replica: usize,
    replies: mpsc::UnboundedSender<(usize, Reply<Blocks>)>,
) -> Option<quinn::SendStream> {
    let quic = connection.connection().await.ok()?;
    let (mut send, mut recv) = quic.open_bi().await.ok()?;
    send.write_all(&[KIND_REPLICATION]).await.ok()?;
    tokio::spawn(async move {
        while let Ok(Some(frame)) = read_frame(&mut recv).await {
            match decode_reply(frame) {
                Ok((from, reply)) if from == volume => {
                    if replies.send((replica, reply)).is_err() {
                        return;
                    }
                }
                Ok((from, _)) => {
                    tracing::warn!(volume, from, "a replica answered about another volume");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "a replica sent a malformed frame");
                    return;
                }
            }
        }
    });
    Some(send)
}
