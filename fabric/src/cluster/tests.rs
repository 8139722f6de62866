//! The metadata Raft group in-process: election, replication, partitions
//! and restarts from disk, over the fault-injecting [`Router`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::{Config, ServerState};

use super::local_network::{LocalMember, Router};
use super::metadata::{Command, NodeId, NodeRecord, Resources, Response};
use super::raft::{open_db, LogStore, Member, MetadataRaft, StateMachine};

const WAIT: Duration = Duration::from_secs(10);

struct Cluster {
    _dirs: BTreeMap<NodeId, tempfile::TempDir>,
    paths: BTreeMap<NodeId, std::path::PathBuf>,
    router: Router,
    members: BTreeMap<NodeId, LocalMember>,
    config: Arc<Config>,
}

fn member(id: NodeId) -> Member {
    Member {
        name: format!("n{id}"),
        address: format!("127.0.0.1:{}", 7400 + id),
    }
}

fn node_record(id: NodeId) -> NodeRecord {
    NodeRecord {
        id,
        name: format!("n{id}"),
        cluster_address: member(id).address,
        resources: Resources::default(),
        joined_unix: 0,
        labels: Default::default(),
    }
}

impl Cluster {
    async fn start(size: NodeId) -> Cluster {
        let config = Config {
            heartbeat_interval: 50,
            election_timeout_min: 200,
            election_timeout_max: 400,
            ..Config::default()
        };
        let mut cluster = Cluster {
            _dirs: BTreeMap::new(),
            paths: BTreeMap::new(),
            router: Router::default(),
            members: BTreeMap::new(),
            config: Arc::new(config.validate().expect("valid raft config")),
        };
        for id in 1..=size {
            let dir = tempfile::tempdir().expect("tempdir");
            cluster.paths.insert(id, dir.path().to_owned());
            cluster._dirs.insert(id, dir);
            cluster.boot(id).await;
        }
        let members: BTreeMap<NodeId, Member> = (1..=size).map(|id| (id, member(id))).collect();
        cluster.members[&1]
            .raft
            .initialize(members)
            .await
            .expect("initialize");
        cluster
    }

    async fn boot(&mut self, id: NodeId) {
        let member = self
            .router
            .start_member(id, self.config.clone(), &self.paths[&id])
            .await
            .expect("member starts");
        self.members.insert(id, member);
    }

    async fn crash(&mut self, id: NodeId) {
        if let Some(member) = self.members.remove(&id) {
            self.router.stop_member(id, member).await;
        }
    }

    async fn leader(&self) -> NodeId {
        let any = self.members.values().next().expect("a member");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(leader) = any.raft.current_leader().await {
                let is_leader = self
                    .members
                    .get(&leader)
                    .is_some_and(|m| m.raft.metrics().borrow().state == ServerState::Leader);
                if is_leader {
                    return leader;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no leader elected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn write(&self, on: NodeId, command: Command) -> Result<Response, String> {
        let raft = &self.members[&on].raft;
        match tokio::time::timeout(Duration::from_secs(2), raft.client_write(command)).await {
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Waits until every running member has applied at least what
    /// `reference` has, and checks that they all hold the same metadata.
    async fn converged(&self, reference: NodeId) {
        let target = self.members[&reference].machine.last_applied();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let all = self
                .members
                .values()
                .all(|m| m.machine.last_applied() >= target);
            if all {
                let first = self.members[&reference].machine.metadata();
                for (id, member) in &self.members {
                    assert_eq!(member.machine.metadata(), first, "node {id} disagrees");
                }
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "members did not converge"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_and_survive_leader_loss_partition_and_restart() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    for id in 1..=3 {
        assert_eq!(
            cluster
                .write(
                    leader,
                    Command::AddNode {
                        node: node_record(id)
                    }
                )
                .await,
            Ok(Response::Applied)
        );
    }
    cluster.converged(leader).await;

    // Kill the leader: the other two elect a new one and keep committing.
    cluster.crash(leader).await;
    let second = cluster.leader().await;
    assert_ne!(second, leader);
    let update = Command::UpdateResources {
        id: second,
        resources: Resources {
            cpu_cores: 2,
            ..Resources::default()
        },
    };
    assert_eq!(cluster.write(second, update).await, Ok(Response::Applied));
    // The old leader restarts from disk and catches up.
    cluster.boot(leader).await;
    cluster.converged(second).await;
    assert_eq!(
        cluster.members[&leader].machine.metadata().nodes[&second]
            .resources
            .cpu_cores,
        2
    );

    // A minority cannot commit; the majority can; after healing all agree.
    let current = cluster.leader().await;
    cluster.router.partition(&[current]);
    let lonely = cluster.write(current, Command::RemoveNode { id: 3 }).await;
    assert!(
        lonely.is_err(),
        "an isolated leader must not commit: {lonely:?}"
    );
    let majority: Vec<NodeId> = (1..=3).filter(|&id| id != current).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    let new_leader = loop {
        let mut found = None;
        for &id in &majority {
            if cluster.members[&id].raft.metrics().borrow().state == ServerState::Leader {
                found = Some(id);
            }
        }
        if let Some(id) = found {
            break id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "majority elected no leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let volume = super::metadata::VolumeMeta::new(
        "00000000000000aa".into(),
        "during-partition".into(),
        1 << 30,
        majority.clone(),
        0,
    );
    assert_eq!(
        cluster
            .write(new_leader, Command::CreateVolume { volume })
            .await,
        Ok(Response::Applied)
    );
    cluster.router.heal();
    cluster.converged(new_leader).await;
    let metadata = cluster.members[&current].machine.metadata();
    assert!(metadata.volumes.contains_key("during-partition"));
    assert!(
        metadata.nodes.contains_key(&3),
        "the minority's uncommitted removal must not survive"
    );

    // Restart every member from disk: the same metadata comes back.
    let before = cluster.members[&new_leader].machine.metadata();
    for id in 1..=3 {
        cluster.crash(id).await;
    }
    for id in 1..=3 {
        cluster.boot(id).await;
    }
    let leader = cluster.leader().await;
    // A new leader commits a blank entry, after which everything before
    // it is applied everywhere.
    assert_eq!(
        cluster
            .write(
                leader,
                Command::UpdateResources {
                    id: 1,
                    resources: Resources::default()
                }
            )
            .await,
        Ok(Response::Applied)
    );
    cluster.converged(leader).await;
    let mut after = cluster.members[&leader].machine.metadata();
    after.nodes.get_mut(&1).expect("node 1").resources = before.nodes[&1].resources.clone();
    assert_eq!(after, before);
}

/// The same group over real QUIC on loopback, with mutual TLS; a node
/// with a certificate from another cluster's CA gets nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_over_quic_with_mutual_tls() {
    use super::tls::ClusterCa;
    use super::transport::{bind, serve, QuicNetwork};
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::VoteRequest;
    use openraft::Vote;

    let loopback: std::net::IpAddr = [127, 0, 0, 1].into();
    let ca = ClusterCa::generate("test").expect("CA");
    let config = Arc::new(
        Config {
            heartbeat_interval: 100,
            election_timeout_min: 400,
            election_timeout_max: 800,
            ..Config::default()
        }
        .validate()
        .expect("config"),
    );
    let mut endpoints = BTreeMap::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let identity = ca
            .issue(&format!("n{id}"), &[loopback])
            .expect("node certificate");
        let endpoint = bind("127.0.0.1:0".parse().expect("address"), &identity).expect("bind");
        let address = endpoint.local_addr().expect("local address");
        members.insert(
            id,
            Member {
                name: format!("n{id}"),
                address: address.to_string(),
            },
        );
        endpoints.insert(id, endpoint);
    }
    let mut dirs = Vec::new();
    let mut nodes = BTreeMap::new();
    for (&id, endpoint) in &endpoints {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_db(dir.path()).expect("db");
        let machine = StateMachine::open(db.clone()).expect("state machine");
        let raft = MetadataRaft::new(
            id,
            config.clone(),
            QuicNetwork::new(endpoint.clone(), Arc::default()),
            LogStore::new(db),
            machine.clone(),
        )
        .await
        .expect("raft");
        let network = QuicNetwork::new(endpoint.clone(), Arc::default());
        let slot = Arc::new(super::tls::CaSlot::load(
            &dir.path().join("ca"),
            &ca.cert_pem,
        ));
        let handler = super::transport::Handler {
            raft: raft.clone(),
            health: Arc::default(),
            origin: std::time::Instant::now(),
            faults: Arc::default(),
            admissions: super::runtime::Admissions::new(
                raft.clone(),
                machine.clone(),
                network,
                slot,
            ),
            services: Default::default(),
        };
        tokio::spawn(serve(endpoint.clone(), handler));
        nodes.insert(id, (raft, machine));
        dirs.push(dir);
    }
    nodes[&1]
        .0
        .initialize(members.clone())
        .await
        .expect("initialize");
    let deadline = tokio::time::Instant::now() + WAIT;
    let leader = loop {
        if let Some(leader) = nodes[&1].0.current_leader().await {
            break leader;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader over QUIC"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for id in 1..=3 {
        let written = nodes[&leader]
            .0
            .client_write(Command::AddNode {
                node: node_record(id),
            })
            .await
            .expect("write");
        assert_eq!(written.data, Response::Applied);
    }
    let target = nodes[&leader].1.last_applied();
    let deadline = tokio::time::Instant::now() + WAIT;
    while nodes
        .values()
        .any(|(_, machine)| machine.last_applied() < target)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "followers did not catch up over QUIC"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metadata = nodes[&leader].1.metadata();
    assert_eq!(metadata.nodes.len(), 3);
    for (raft, machine) in nodes.values() {
        assert_eq!(machine.metadata(), metadata);
        let _ = raft;
    }

    // Another cluster's node: its certificate is refused, nothing reaches Raft.
    let foreign = ClusterCa::generate("other")
        .expect("CA")
        .issue("n1", &[loopback])
        .expect("certificate");
    let endpoint = bind("127.0.0.1:0".parse().expect("address"), &foreign).expect("bind");
    let mut intruder = QuicNetwork::new(endpoint, Arc::default())
        .new_client(1, &members[&1])
        .await;
    let vote = VoteRequest {
        vote: Vote::new(1_000, 99),
        last_log_id: None,
    };
    let refused = intruder
        .vote(vote, RPCOption::new(Duration::from_secs(2)))
        .await;
    assert!(
        refused.is_err(),
        "a foreign certificate must be refused: {refused:?}"
    );
    let term_after = nodes[&1].0.metrics().borrow().current_term;
    assert!(term_after < 1_000, "the foreign vote reached Raft");
    for (raft, _) in nodes.into_values() {
        raft.shutdown().await.expect("shutdown");
    }
}
