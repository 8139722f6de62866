//! A node's membership in the cluster, running: the Raft group over QUIC,
//! heartbeats, resource reports, and writes forwarded to the leader.
//!
//! Files, under `DATA_DIR/cluster/`:
//!
//! | path        | what |
//! |-------------|------|
//! | `node.json` | this node's id, name and advertised address |
//! | `tls/`      | `ca.pem`, `node.pem`, `node.key` (0600) |
//! | `ca/`       | `ca.pem`, `ca.key`: on the node that created the cluster and on the voters it promoted |
//! | `db/`       | RocksDB: Raft log, vote, snapshots |

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};

use super::health::{Health, HealthTimings};
use super::metadata::{Command, Metadata, NodeId, NodeRecord, NodeState, Response, VolumeMeta};
use super::placement::{place, Candidate};
use super::raft::{open_db, LogStore, Member, MetadataRaft, StateMachine};
use super::resources::local_resources;
use super::tls::{
    fingerprint, CaBundle, CaSlot, ClusterCa, NodeIdentity, PendingIdentity, TlsError,
};
use super::transport::{
    bind, remove_member, serve, Faults, Handler, Heartbeat, NodeServices, QuicConnection,
    QuicNetwork, KIND_ADD_MEMBER, KIND_CLIENT_WRITE, KIND_HEARTBEAT, KIND_INSTALL_CA,
    KIND_READ_INDEX, KIND_REMOVE_NODE,
};

/// How this node takes part in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// This node's name (unique in the cluster; in its certificate).
    pub node_name: String,
    /// Where the cluster endpoint listens (UDP).
    pub listen: SocketAddr,
    /// Where other nodes reach it; the listen address if unset.
    pub advertise: Option<SocketAddr>,
    /// Heartbeat and failure-detection timings.
    pub timings: HealthTimings,
    /// Raft heartbeat and election timeout bounds, in milliseconds.
    pub raft_heartbeat_ms: u64,
    pub raft_election_min_ms: u64,
    pub raft_election_max_ms: u64,
    /// Whether links may be cut through the API (fault tests only).
    pub fault_injection: bool,
}

/// Errors of cluster operations.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("this node already belongs to a cluster (see {0}); it cannot be initialized or joined again")]
    AlreadyMember(PathBuf),
    #[error("the cluster address {0} is unspecified (0.0.0.0 or ::); set `advertise` to an address other nodes can reach")]
    NoAdvertiseAddress(SocketAddr),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Transport(#[from] super::transport::TransportError),
    #[error("cluster storage: {0}")]
    Storage(String),
    #[error("cannot {action} {path}: {source}")]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the metadata change was not committed: {0}")]
    Write(String),
    #[error("the metadata could not be read current: {0}")]
    Read(String),
    #[error("the metadata change was rejected: {0}")]
    Rejected(String),
    #[error("invalid cluster settings: {0}")]
    Settings(String),
    #[error("join refused: {0}")]
    JoinRefused(String),
}

/// How long a metadata change may take to commit.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a current read may wait for the leader and for this node to
/// apply up to the leader's read index.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How current a metadata read must be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Reflects every change committed before the read began (read index
    /// through the leader; see [`ClusterRuntime::read_barrier`]).
    #[default]
    Current,
    /// Whatever this node has applied; may lag the leader. Answers even
    /// when no leader is reachable.
    Local,
}

/// How long a join waits for another membership change to finish.
const MEMBERSHIP_CHANGE_WAIT: Duration = Duration::from_secs(30);

/// Whether a membership change failed only because another is in flight.
fn membership_change_in_progress(
    error: &RaftError<NodeId, ClientWriteError<NodeId, Member>>,
) -> bool {
    matches!(
        error,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            openraft::error::ChangeMembershipError::InProgress(_)
        ))
    )
}

/// How long a join token stays valid.
pub const JOIN_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// What a node asks to join with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub name: String,
    pub address: SocketAddr,
    pub csr_pem: String,
    pub resources: super::metadata::Resources,
}

/// What the cluster answers a successful join with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinGrant {
    pub node_id: NodeId,
    pub ca_pem: String,
    pub cert_pem: String,
}

/// A join token: the CA's fingerprint (so the joiner can check it talks
/// to the right cluster) and a single-use secret.
fn format_token(ca_fingerprint: &str, secret: &str) -> String {
    format!("fbt1-{}-{secret}", &ca_fingerprint[..32])
}

fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("fbt1-")?;
    let (fingerprint, secret) = rest.split_once('-')?;
    (fingerprint.len() == 32 && secret.len() == 32).then_some((fingerprint, secret))
}

fn random_hex(bytes: usize) -> Result<String, ClusterError> {
    let mut buffer = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buffer)
        .map_err(|_| ClusterError::Settings("the system random generator failed".into()))?;
    Ok(buffer.iter().map(|b| format!("{b:02x}")).collect())
}

/// What `node.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NodeFile {
    node_id: NodeId,
    name: String,
    address: SocketAddr,
}

/// A node's row in `fabctl node list`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub record: NodeRecord,
    pub state: NodeState,
    pub voter: bool,
    pub leader: bool,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    pub node_name: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub role: String,
    pub last_applied: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Whether this node holds the cluster CA, and so can issue join
    /// tokens and admit nodes.
    pub holds_ca: bool,
}

/// The running cluster membership of this node.
pub struct ClusterRuntime {
    id: NodeId,
    name: String,
    raft: MetadataRaft,
    machine: StateMachine,
    network: QuicNetwork,
    endpoint: quinn::Endpoint,
    health: Arc<Mutex<Health>>,
    origin: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The cluster CA, on the node that created the cluster and on every
    /// node promoted to voter.
    ca: Arc<CaSlot>,
    /// The leader's half of admissions.
    admissions: Admissions,
    /// Injected link faults (only settable with `fault_injection`).
    faults: Arc<Faults>,
}

impl std::fmt::Debug for ClusterRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRuntime")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn cluster_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("cluster")
}

fn file_error(action: &'static str, path: &Path, source: std::io::Error) -> ClusterError {
    ClusterError::File {
        action,
        path: path.to_owned(),
        source,
    }
}

fn advertised(settings: &ClusterSettings) -> Result<SocketAddr, ClusterError> {
    let address = settings.advertise.unwrap_or(settings.listen);
    if address.ip().is_unspecified() {
        return Err(ClusterError::NoAdvertiseAddress(address));
    }
    Ok(address)
}

impl ClusterRuntime {
    /// Resumes this node's membership if it has one (after a restart).
    pub async fn resume(
        data_dir: &Path,
        settings: &ClusterSettings,
        services: NodeServices,
    ) -> Result<Option<ClusterRuntime>, ClusterError> {
        let path = cluster_dir(data_dir).join("node.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_error("read", &path, e)),
        };
        let node: NodeFile = serde_json::from_str(&text)
            .map_err(|e| ClusterError::Storage(format!("{} is not valid: {e}", path.display())))?;
        let identity = NodeIdentity::load(&cluster_dir(data_dir).join("tls"))?;
        Ok(Some(
            ClusterRuntime::start(data_dir, settings, &node, &identity, services).await?,
        ))
    }

    /// Creates a new cluster with this node as its only member (node 1).
    pub async fn init(
        data_dir: &Path,
        settings: &ClusterSettings,
        services: NodeServices,
    ) -> Result<ClusterRuntime, ClusterError> {
        let dir = cluster_dir(data_dir);
        let node_path = dir.join("node.json");
        if node_path.exists() {
            return Err(ClusterError::AlreadyMember(node_path));
        }
        settings
            .timings
            .validate()
            .map_err(ClusterError::Settings)?;
        let address = advertised(settings)?;
        for sub in ["tls", "ca"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|e| file_error("create", &path, e))?;
        }
        let ca = ClusterCa::generate(&settings.node_name)?;
        ca.save(&dir.join("ca"))?;
        let identity = ca.issue(&settings.node_name, &[address.ip()])?;
        identity.save(&dir.join("tls"))?;
        let node = NodeFile {
            node_id: 1,
            name: settings.node_name.clone(),
            address,
        };
        let runtime = ClusterRuntime::start(data_dir, settings, &node, &identity, services).await?;
        let members = BTreeMap::from([(
            1,
            Member {
                name: node.name.clone(),
                address: address.to_string(),
            },
        )]);
        runtime
            .raft
            .initialize(members)
            .await
            .map_err(|e| ClusterError::Storage(e.to_string()))?;
        // node.json last: a crash before this point leaves no half-member.
        let text = serde_json::to_string_pretty(&node).expect("node file serializes");
        std::fs::write(&node_path, text).map_err(|e| file_error("write", &node_path, e))?;
        let record = NodeRecord {
            id: 1,
            name: node.name.clone(),
            cluster_address: address.to_string(),
            resources: local_resources(data_dir),
            joined_unix: now_unix(),
            labels: Default::default(),
        };
        runtime
            .write_with_retry(Command::AddNode { node: record })
            .await?;
        Ok(runtime)
    }

    /// First half of joining: a key and signing request for this node,
    /// kept in `cluster/pending.key` until the cluster answers.
    pub fn prepare_join(
        data_dir: &Path,
        settings: &ClusterSettings,
    ) -> Result<JoinRequest, ClusterError> {
        let dir = cluster_dir(data_dir);
        let node_path = dir.join("node.json");
        if node_path.exists() {
            return Err(ClusterError::AlreadyMember(node_path));
        }
        let address = advertised(settings)?;
        std::fs::create_dir_all(&dir).map_err(|e| file_error("create", &dir, e))?;
        let pending = PendingIdentity::generate(&settings.node_name, address.ip())?;
        let key_path = dir.join("pending.key");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key_path)
                .map_err(|e| file_error("create", &key_path, e))?;
            file.write_all(pending.key_pem.as_bytes())
                .map_err(|e| file_error("write", &key_path, e))?;
        }
        Ok(JoinRequest {
            token: String::new(),
            name: settings.node_name.clone(),
            address,
            csr_pem: pending.csr_pem,
            resources: local_resources(data_dir),
        })
    }

    /// Second half of joining: checks that the grant comes from the cluster
    /// the token names, stores the identity and starts as a learner.
    pub async fn complete_join(
        data_dir: &Path,
        settings: &ClusterSettings,
        services: NodeServices,
        token: &str,
        grant: JoinGrant,
    ) -> Result<ClusterRuntime, ClusterError> {
        let dir = cluster_dir(data_dir);
        let node_path = dir.join("node.json");
        if node_path.exists() {
            return Err(ClusterError::AlreadyMember(node_path));
        }
        let (expected, _) = parse_token(token)
            .ok_or_else(|| ClusterError::JoinRefused("the token is malformed".into()))?;
        let actual = fingerprint(&grant.ca_pem).unwrap_or_default();
        if !actual.starts_with(expected) {
            return Err(ClusterError::JoinRefused(
                "the answer came from a different cluster than the token names (CA fingerprint mismatch)".into(),
            ));
        }
        let key_path = dir.join("pending.key");
        let key_pem =
            std::fs::read_to_string(&key_path).map_err(|e| file_error("read", &key_path, e))?;
        let identity = PendingIdentity {
            csr_pem: String::new(),
            key_pem,
        }
        .complete(grant.ca_pem, grant.cert_pem);
        identity.save(&dir.join("tls"))?;
        let node = NodeFile {
            node_id: grant.node_id,
            name: settings.node_name.clone(),
            address: advertised(settings)?,
        };
        let runtime = ClusterRuntime::start(data_dir, settings, &node, &identity, services).await?;
        let text = serde_json::to_string_pretty(&node).expect("node file serializes");
        std::fs::write(&node_path, text).map_err(|e| file_error("write", &node_path, e))?;
        let _ = std::fs::remove_file(&key_path);
        Ok(runtime)
    }

    async fn start(
        data_dir: &Path,
        settings: &ClusterSettings,
        node: &NodeFile,
        identity: &NodeIdentity,
        services: NodeServices,
    ) -> Result<ClusterRuntime, ClusterError> {
        let config = openraft::Config {
            cluster_name: "fabric".into(),
            heartbeat_interval: settings.raft_heartbeat_ms,
            election_timeout_min: settings.raft_election_min_ms,
            election_timeout_max: settings.raft_election_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
            ..openraft::Config::default()
        };
        let config = Arc::new(
            config
                .validate()
                .map_err(|e| ClusterError::Settings(e.to_string()))?,
        );
        let endpoint = bind(settings.listen, identity)?;
        let db_path = cluster_dir(data_dir).join("db");
        let db = open_db_released(&db_path).await?;
        let machine =
            StateMachine::open(db.clone()).map_err(|e| ClusterError::Storage(e.to_string()))?;
        let faults: Arc<Faults> = Arc::default();
        let network = QuicNetwork::new(endpoint.clone(), faults.clone());
        let log_store = LogStore::new(db);
        let raft = MetadataRaft::new(
            node.node_id,
            config,
            network.clone(),
            log_store,
            machine.clone(),
        )
        .await
        .map_err(|e| ClusterError::Storage(e.to_string()))?;
        let health = Arc::new(Mutex::new(Health::new(settings.timings)));
        let origin = Instant::now();
        let ca = Arc::new(CaSlot::load(
            &cluster_dir(data_dir).join("ca"),
            &identity.ca_pem,
        ));
        let admissions =
            Admissions::new(raft.clone(), machine.clone(), network.clone(), ca.clone());
        let handler = Handler {
            raft: raft.clone(),
            health: health.clone(),
            origin,
            faults: faults.clone(),
            admissions: admissions.clone(),
            services,
        };
        let mut runtime = ClusterRuntime {
            id: node.node_id,
            name: node.name.clone(),
            raft,
            machine,
            network,
            endpoint: endpoint.clone(),
            health,
            origin,
            tasks: Vec::new(),
            ca,
            admissions: admissions.clone(),
            faults,
        };
        runtime.tasks.push(tokio::spawn(serve(endpoint, handler)));
        runtime.tasks.push(tokio::spawn(heartbeats(
            node.node_id,
            runtime.machine.clone(),
            runtime.network.clone(),
            settings.timings.heartbeat,
        )));
        tracing::info!(node = node.node_id, name = %node.name, address = %node.address, "cluster member started");
        Ok(runtime)
    }

    /// Makes a single-use join token, valid for [`JOIN_TOKEN_LIFETIME`].
    /// Any node holding the cluster CA can; the token's digest is
    /// committed to the metadata before the token is handed out, so any
    /// such node can accept it, once.
    pub async fn issue_token(&self) -> Result<(String, u64), ClusterError> {
        let ca = self.ca.get().ok_or_else(|| {
            ClusterError::JoinRefused(
                "this node does not hold the cluster CA (voters do); issue tokens on a voter"
                    .into(),
            )
        })?;
        let fingerprint = fingerprint(&ca.cert_pem)
            .ok_or_else(|| ClusterError::Storage("the CA certificate is unreadable".into()))?;
        let secret = random_hex(16)?;
        let issued_unix = now_unix();
        let expires_unix = issued_unix + JOIN_TOKEN_LIFETIME.as_secs();
        self.write_with_retry(Command::IssueToken {
            digest: token_digest(&secret),
            issued_unix,
            expires_unix,
        })
        .await?;
        Ok((format_token(&fingerprint, &secret), expires_unix))
    }

    /// Admits a node: checks and uses up its token, signs its
    /// certificate, and has the leader add it as a learner and promote it
    /// to voter once it has caught up (see [`Admissions::add_member`]).
    /// Any node holding the CA can admit; the membership change itself
    /// is forwarded to the leader.
    pub async fn admit(&self, request: JoinRequest) -> Result<JoinGrant, ClusterError> {
        let refused = |reason: String| ClusterError::JoinRefused(reason);
        let ca = self.ca.get().ok_or_else(|| {
            refused("this node does not hold the cluster CA; join through a voter".into())
        })?;
        let (_, secret) =
            parse_token(&request.token).ok_or_else(|| refused("the token is malformed".into()))?;
        let name_ok = !request.name.is_empty()
            && request.name.len() <= 63
            && request
                .name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && request
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
        if !name_ok {
            return Err(refused(format!(
                "node name {:?} must be 1 to 63 letters, digits, '.' or '-', starting with a letter or digit",
                request.name
            )));
        }
        let redeem = Command::RedeemToken {
            digest: token_digest(secret),
            now_unix: now_unix(),
        };
        if let Response::Rejected { reason } = self.write(redeem).await? {
            return Err(refused(reason));
        }
        // Refuse a taken name or address before signing anything; the
        // leader checks again, authoritatively.
        if let Some(reason) =
            name_or_address_taken(&self.metadata(), &request.name, request.address)
        {
            return Err(refused(reason));
        }
        let cert_pem = ca.sign_request(&request.csr_pem, &request.name)?;
        let new = NewMember {
            name: request.name.clone(),
            address: request.address,
            resources: request.resources.clone(),
        };
        let metrics = self.raft.metrics().borrow().clone();
        let node_id = if metrics.current_leader == Some(self.id) {
            self.admissions.add_member(new).await
        } else {
            let (leader, member) = self.leader()?;
            let link = QuicConnection::to(&self.network, leader, member);
            link.request::<_, Result<NodeId, String>>(KIND_ADD_MEMBER, &new)
                .await
                .map_err(|e| ClusterError::Write(e.to_string()))?
        }
        .map_err(refused)?;
        Ok(JoinGrant {
            node_id,
            ca_pem: ca.cert_pem.clone(),
            cert_pem,
        })
    }

    /// The current leader and its address.
    fn leader(&self) -> Result<(NodeId, Member), ClusterError> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader.ok_or_else(|| {
            ClusterError::Write("no leader is elected right now; retry shortly".into())
        })?;
        let member = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()
            .ok_or_else(|| ClusterError::Write(format!("the leader {leader} has no address")))?;
        Ok((leader, member))
    }

    /// Removes node `id` from the cluster (Raft membership and metadata),
    /// through the leader. A dead node is replaced by removing it and
    /// joining a new one.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), ClusterError> {
        if id == self.id {
            return Err(ClusterError::Rejected(
                "a node cannot remove itself; run `fabctl node remove` on another node".into(),
            ));
        }
        let metrics = self.raft.metrics().borrow().clone();
        let result = if metrics.current_leader == Some(self.id) {
            remove_member(&self.raft, id).await
        } else {
            let (leader, member) = self.leader()?;
            let link = QuicConnection::to(&self.network, leader, member);
            link.request::<_, Result<(), String>>(KIND_REMOVE_NODE, &id)
                .await
                .map_err(|e| ClusterError::Write(e.to_string()))?
        };
        result.map_err(ClusterError::Rejected)?;
        self.health.lock().expect("health lock poisoned").forget(id);
        Ok(())
    }

    /// Chooses nodes for a new volume's replicas (see [`place`]); refuses a
    /// name already used in the cluster. Free space per node is its
    /// reported free disk less the volumes already placed on it.
    pub fn place_volume(
        &self,
        name: &str,
        size_bytes: u64,
        replicas: usize,
    ) -> Result<Vec<NodeId>, ClusterError> {
        let metadata = self.metadata();
        if metadata.volumes.contains_key(name) {
            return Err(ClusterError::Rejected(format!(
                "a volume named {name:?} already exists in the cluster"
            )));
        }
        let candidates = self.candidates(&metadata);
        place(&candidates, replicas, size_bytes).map_err(|e| ClusterError::Rejected(e.to_string()))
    }

    /// Picks a node for a new replica of volume `name`, on none of the
    /// nodes holding one now.
    pub fn place_replacement(&self, name: &str) -> Result<NodeId, ClusterError> {
        let metadata = self.metadata();
        let volume = metadata
            .volumes
            .get(name)
            .ok_or_else(|| ClusterError::Rejected(format!("no volume named {name:?}")))?;
        let candidates: Vec<Candidate> = self
            .candidates(&metadata)
            .into_iter()
            .filter(|candidate| !volume.replicas.contains(&candidate.id))
            .collect();
        place(&candidates, 1, volume.size_bytes)
            .map(|nodes| nodes[0])
            .map_err(|e| {
                ClusterError::Rejected(format!("no node can take a new replica of {name:?}: {e}"))
            })
    }

    /// Every node as a placement candidate: its state and the free space
    /// not yet claimed by the volumes placed on it.
    fn candidates(&self, metadata: &Metadata) -> Vec<Candidate> {
        self.nodes()
            .into_iter()
            .map(|node| {
                let claimed: u64 = metadata
                    .volumes
                    .values()
                    .filter(|volume| volume.replicas.contains(&node.record.id))
                    .map(|volume| volume.size_bytes)
                    .sum();
                Candidate {
                    id: node.record.id,
                    state: node.state,
                    free_bytes: node
                        .record
                        .resources
                        .disk_free_bytes
                        .saturating_sub(claimed),
                }
            })
            .collect()
    }

    /// Records a created volume and its placement in the cluster metadata.
    pub async fn record_volume(&self, volume: VolumeMeta) -> Result<(), ClusterError> {
        match self.write(Command::CreateVolume { volume }).await? {
            Response::Applied => Ok(()),
            Response::Rejected { reason } => Err(ClusterError::Rejected(reason)),
        }
    }

    /// Removes a deleted volume from the cluster metadata.
    pub async fn forget_volume(&self, name: &str) -> Result<(), ClusterError> {
        match self
            .write(Command::DeleteVolume {
                name: name.to_owned(),
            })
            .await?
        {
            Response::Applied => Ok(()),
            Response::Rejected { reason } => Err(ClusterError::Rejected(reason)),
        }
    }

    /// Cuts the links to `peers` (and only those), for fault tests.
    pub fn cut_links(&self, peers: Vec<SocketAddr>) {
        tracing::warn!(?peers, "fault injection: links cut");
        self.faults.block(peers);
    }

    /// The cluster transport's view of the other members.
    pub fn network(&self) -> &QuicNetwork {
        &self.network
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The metadata as applied here (a follower may lag the leader).
    pub fn metadata(&self) -> Metadata {
        self.machine.metadata()
    }

    /// The metadata as applied here, with the log index it reflects.
    pub fn metadata_at(&self) -> (Metadata, u64) {
        self.machine.metadata_at()
    }

    /// Returns once this node's metadata reflects every change committed
    /// before the call: the read-index protocol. The leader confirms with
    /// a quorum that it still leads (openraft's `ensure_linearizable`) and
    /// names its commit index; a follower asks the leader for that index
    /// over QUIC and waits until it has applied up to it. No clock is
    /// trusted, so a paused or drifting leader cannot serve a stale read.
    pub async fn read_barrier(&self, consistency: Consistency) -> Result<(), ClusterError> {
        if consistency == Consistency::Local {
            return Ok(());
        }
        tokio::time::timeout(READ_TIMEOUT, self.read_barrier_once())
            .await
            .map_err(|_| {
                ClusterError::Read(format!(
                    "no current read within {READ_TIMEOUT:?}: is a majority of the voters reachable? \
                     (a local, possibly stale read does not need one)"
                ))
            })?
    }

    async fn read_barrier_once(&self) -> Result<(), ClusterError> {
        loop {
            let (leader, member) = match self.raft.ensure_linearizable().await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                    match (forward.leader_id, forward.leader_node) {
                        (Some(leader), Some(member)) => (leader, member),
                        // An election is under way: wait for its outcome.
                        _ => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                // Not confirmed by a quorum yet (a member just joined, or
                // one is slow): ask again until the outer timeout.
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(error))) => {
                    tracing::debug!(%error, "no quorum confirmed leadership yet; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(error) => return Err(ClusterError::Read(error.to_string())),
            };
            // The leader this node knows of may be gone: bound the attempt
            // and ask again (the outer timeout bounds the whole read).
            let link = QuicConnection::to(&self.network, leader, member);
            let asked = tokio::time::timeout(
                Duration::from_secs(1),
                link.request::<_, Result<Option<u64>, String>>(KIND_READ_INDEX, &()),
            )
            .await;
            let index = match asked {
                Ok(Ok(Ok(index))) => index,
                Ok(Ok(Err(reason))) => {
                    tracing::debug!(%reason, "the leader refused a read index; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Ok(Err(_)) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.raft
                .wait(None)
                .applied_index_at_least(index, "read index")
                .await
                .map_err(|e| ClusterError::Read(e.to_string()))?;
            return Ok(());
        }
    }

    /// Commits a metadata change, forwarding it to the leader if this
    /// node is not the leader.
    pub async fn write(&self, command: Command) -> Result<Response, ClusterError> {
        tokio::time::timeout(WRITE_TIMEOUT, self.write_once(command))
            .await
            .map_err(|_| ClusterError::Write(format!("not committed within {WRITE_TIMEOUT:?}: is a majority of the voters reachable?")))?
    }

    async fn write_once(&self, command: Command) -> Result<Response, ClusterError> {
        match self.raft.client_write(command.clone()).await {
            Ok(written) => Ok(written.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                let (Some(leader), Some(member)) = (forward.leader_id, forward.leader_node) else {
                    return Err(ClusterError::Write(
                        "no leader is elected right now; retry shortly".into(),
                    ));
                };
                let link = QuicConnection::to(&self.network, leader, member);
                let reply: Result<Response, String> = link
                    .request(KIND_CLIENT_WRITE, &command)
                    .await
                    .map_err(|e| ClusterError::Write(e.to_string()))?;
                reply.map_err(ClusterError::Write)
            }
            Err(error) => Err(ClusterError::Write(error.to_string())),
        }
    }

    /// Commits a metadata change, retrying for up to 10 s while no leader
    /// can take it (an election, a leader that just died).
    pub async fn write_retrying(&self, command: Command) -> Result<Response, ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.write(command.clone()).await {
                Ok(response) => return Ok(response),
                Err(error) if Instant::now() > deadline => return Err(error),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// [`ClusterRuntime::write_retrying`], with a rejection as an error.
    async fn write_with_retry(&self, command: Command) -> Result<(), ClusterError> {
        match self.write_retrying(command).await? {
            Response::Applied => Ok(()),
            Response::Rejected { reason } => Err(ClusterError::Rejected(reason)),
        }
    }

    /// The nodes with their health as seen from here.
    pub fn nodes(&self) -> Vec<NodeView> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let now = self.origin.elapsed();
        let health = self.health.lock().expect("health lock poisoned");
        self.machine
            .metadata()
            .nodes
            .into_values()
            .map(|record| {
                let state = if record.id == self.id {
                    NodeState::Up
                } else {
                    health.state(record.id, now)
                };
                NodeView {
                    voter: voters.contains(&record.id),
                    leader: metrics.current_leader == Some(record.id),
                    state,
                    record,
                }
            })
            .collect()
    }

    /// Raft's view: leader, term, role, membership.
    pub fn status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        ClusterStatus {
            node_id: self.id,
            node_name: self.name.clone(),
            leader: metrics.current_leader,
            term: metrics.current_term,
            role: format!("{:?}", metrics.state).to_lowercase(),
            last_applied: metrics.last_applied.map(|log_id| log_id.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            holds_ca: self.ca.get().is_some(),
        }
    }

    /// Stops Raft and the endpoint, and waits until nothing holds the
    /// cluster database any more, so that it can be opened again.
    pub async fn shutdown(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // An aborted task drops what it holds (the state machine, and with
        // it the database) only when it is next polled: wait for that.
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "raft did not stop cleanly");
        }
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

/// Opens the cluster database. A runtime that stopped in this process may
/// still be releasing it: its aborted tasks (connection handlers holding
/// the state machine) drop their handles only when next polled, and
/// RocksDB refuses a second open while one is live ("lock hold by current
/// process"). That case is waited out, up to [`DB_RELEASE_WAIT`]; any other
/// error is returned at once.
async fn open_db_released(path: &std::path::Path) -> Result<Arc<rocksdb::DB>, ClusterError> {
    let deadline = Instant::now() + DB_RELEASE_WAIT;
    loop {
        match open_db(path) {
            Ok(db) => return Ok(db),
            Err(error)
                if error.to_string().contains("lock hold by current process")
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => {
                return Err(ClusterError::Storage(format!(
                    "{}: {error}",
                    path.display()
                )))
            }
        }
    }
}

/// How long a restart in the same process waits for the old runtime to
/// let go of the database.
const DB_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// A node to add, as the admitting node asks the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewMember {
    pub name: String,
    pub address: SocketAddr,
    pub resources: super::metadata::Resources,
}

/// Why `name` or `address` cannot join, if either is taken.
fn name_or_address_taken(metadata: &Metadata, name: &str, address: SocketAddr) -> Option<String> {
    metadata
        .nodes
        .values()
        .find(|n| n.name == name || n.cluster_address == address.to_string())
        .map(|other| {
            format!(
                "node {} already uses name {name:?} or address {address}",
                other.id
            )
        })
}

/// The leader's half of admitting a node, shared by the runtime and the
/// transport handler (for admissions forwarded by other voters).
#[derive(Clone)]
pub struct Admissions {
    raft: MetadataRaft,
    machine: StateMachine,
    network: QuicNetwork,
    pub ca: Arc<CaSlot>,
    /// Serialises admissions, so two joins never get the same node id.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Admissions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admissions")
            .field("holds_ca", &self.ca.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Admissions {
    pub fn new(
        raft: MetadataRaft,
        machine: StateMachine,
        network: QuicNetwork,
        ca: Arc<CaSlot>,
    ) -> Admissions {
        Admissions {
            raft,
            machine,
            network,
            ca,
            lock: Arc::default(),
        }
    }

    /// On the leader: gives the node the next id, adds it as a learner,
    /// records it in the metadata, and promotes it to voter (handing it
    /// the CA) once it has caught up. Returns its id.
    pub async fn add_member(&self, new: NewMember) -> Result<NodeId, String> {
        let _admitting = self.lock.lock().await;
        let metadata = self.machine.metadata();
        if let Some(reason) = name_or_address_taken(&metadata, &new.name, new.address) {
            return Err(reason);
        }
        let node_id = metadata.next_node_id();
        let member = Member {
            name: new.name.clone(),
            address: new.address.to_string(),
        };
        // One membership change at a time: wait out a promotion in flight.
        let deadline = Instant::now() + MEMBERSHIP_CHANGE_WAIT;
        loop {
            match self.raft.add_learner(node_id, member.clone(), false).await {
                Ok(_) => break,
                Err(error)
                    if membership_change_in_progress(&error) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error.to_string()),
            }
        }
        let record = NodeRecord {
            id: node_id,
            name: new.name.clone(),
            cluster_address: new.address.to_string(),
            resources: new.resources,
            joined_unix: now_unix(),
            labels: Default::default(),
        };
        match self
            .raft
            .client_write(Command::AddNode { node: record })
            .await
        {
            Ok(written) => match written.data {
                Response::Applied => {}
                Response::Rejected { reason } => return Err(reason),
            },
            Err(error) => return Err(error.to_string()),
        }
        let this = self.clone();
        tokio::spawn(async move { this.promote(node_id, member).await });
        Ok(node_id)
    }

    /// Promotes a learner to voter once it has caught up with the log,
    /// then hands it the CA.
    async fn promote(&self, node_id: NodeId, member: Member) {
        // The learner starts once it has its certificate.
        for _ in 0..600 {
            let metrics = self.raft.metrics().borrow().clone();
            let leader_last = metrics.last_log_index;
            let caught_up = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&node_id).cloned().flatten())
                .is_some_and(|matched| Some(matched.index) >= leader_last);
            if caught_up {
                // Add this one voter, rather than replacing the voter set
                // with one computed from metrics that another promotion
                // may have made stale.
                let change =
                    openraft::ChangeMembers::AddVoterIds(std::collections::BTreeSet::from([
                        node_id,
                    ]));
                match self.raft.change_membership(change, false).await {
                    Ok(_) => {
                        tracing::info!(node = node_id, "node promoted to voter");
                        if let Some(ca) = self.ca.get() {
                            hand_over_ca(&self.network, node_id, member, ca.bundle()).await;
                        }
                        return;
                    }
                    // Another change (a join) is in flight: try again.
                    Err(error) if membership_change_in_progress(&error) => {}
                    Err(error) => {
                        tracing::error!(node = node_id, %error, "could not promote node to voter");
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(
            node = node_id,
            "joined node did not catch up within 60 s; it stays a learner"
        );
    }
}

/// SHA-256 of a token's secret, as kept in the metadata.
fn token_digest(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Gives a new voter the cluster CA over the cluster transport, so that it
/// can admit nodes too. Retried for a minute; a voter that never gets it
/// can still serve everything but admissions.
async fn hand_over_ca(network: &QuicNetwork, id: NodeId, member: Member, bundle: CaBundle) {
    let link = QuicConnection::to(network, id, member);
    for _ in 0..60 {
        let reply: Result<Result<bool, String>, _> = link.request(KIND_INSTALL_CA, &bundle).await;
        match reply {
            Ok(Ok(_)) => {
                tracing::info!(node = id, "cluster CA handed to the new voter");
                return;
            }
            Ok(Err(reason)) => {
                tracing::error!(node = id, %reason, "the new voter refused the cluster CA");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    tracing::warn!(node = id, "could not hand the cluster CA to the new voter");
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sends a heartbeat to every other member, every `interval`.
async fn heartbeats(id: NodeId, machine: StateMachine, network: QuicNetwork, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        for node in machine
            .metadata()
            .nodes
            .into_values()
            .filter(|node| node.id != id)
        {
            let link = QuicConnection::to(&network, node.id, Member::from(&node));
            tokio::spawn(async move {
                let sent: Result<(), _> =
                    link.request(KIND_HEARTBEAT, &Heartbeat { from: id }).await;
                if let Err(error) = sent {
                    tracing::debug!(to = node.id, %error, "heartbeat not delivered");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(name: &str) -> ClusterSettings {
        ClusterSettings {
            node_name: name.into(),
            listen: "127.0.0.1:0".parse().expect("address"),
            advertise: None,
            timings: HealthTimings::default(),
            raft_heartbeat_ms: 100,
            raft_election_min_ms: 500,
            raft_election_max_ms: 1000,
            fault_injection: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn init_then_resume_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Port 0 is fine for a single node: only other nodes use the port.
        let runtime = ClusterRuntime::init(dir.path(), &settings("alpha"), NodeServices::default())
            .await
            .expect("init");
        let nodes = runtime.nodes();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].record.name, "alpha");
        assert_eq!(nodes[0].state, NodeState::Up);
        assert!(nodes[0].record.resources.cpu_cores >= 1);
        assert!(nodes[0].voter && nodes[0].leader);
        let again =
            ClusterRuntime::init(dir.path(), &settings("alpha"), NodeServices::default()).await;
        assert!(
            matches!(again, Err(ClusterError::AlreadyMember(_))),
            "{again:?}"
        );
        runtime.shutdown().await;

        let resumed =
            ClusterRuntime::resume(dir.path(), &settings("alpha"), NodeServices::default())
                .await
                .expect("resume")
                .expect("member");
        let deadline = Instant::now() + Duration::from_secs(10);
        while resumed.status().leader != Some(1) {
            assert!(
                Instant::now() < deadline,
                "the single node did not lead again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(resumed.metadata().nodes.len(), 1);
        resumed.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unspecified_address_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wildcard = ClusterSettings {
            listen: "0.0.0.0:0".parse().expect("address"),
            ..settings("b")
        };
        let error = ClusterRuntime::init(dir.path(), &wildcard, NodeServices::default())
            .await
            .expect_err("no advertise address");
        assert!(error.to_string().contains("advertise"), "{error}");
    }
}
