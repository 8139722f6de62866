//! An in-process network between Raft members, with fault injection.
//!
//! Used by tests and by the simulation: every RPC is a direct call into
//! the target's `Raft`, unless the router says the two nodes cannot reach
//! each other (a partition, or a node that is down).

// openraft's error types are large by design and the traits fix them.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::metadata::NodeId;
use super::raft::{open_db, LogStore, Member, MetadataRaft, StateMachine, TypeConfig};

/// A member running on the in-process network.
#[derive(Clone)]
pub struct LocalMember {
    pub raft: MetadataRaft,
    pub machine: StateMachine,
}

impl std::fmt::Debug for LocalMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMember")
            .field("last_applied", &self.machine.last_applied())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct RouterState {
    nodes: BTreeMap<NodeId, MetadataRaft>,
    /// Links that drop every message, both directions.
    cut: BTreeSet<(NodeId, NodeId)>,
}

impl std::fmt::Debug for RouterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterState")
            .field("nodes", &self.nodes.keys().collect::<Vec<_>>())
            .field("cut", &self.cut)
            .finish()
    }
}

/// Connects in-process Raft members. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct Router {
    state: Arc<Mutex<RouterState>>,
}

/// Why an RPC did not reach its target.
#[derive(Debug, thiserror::Error)]
#[error("node {from} cannot reach node {to}")]
pub struct LinkDown {
    from: NodeId,
    to: NodeId,
}

impl Router {
    fn state(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().expect("router lock poisoned")
    }

    /// Makes a member reachable.
    pub fn add(&self, id: NodeId, raft: MetadataRaft) {
        self.state().nodes.insert(id, raft);
    }

    /// Takes a member off the network (it crashed or was stopped).
    pub fn remove(&self, id: NodeId) -> Option<MetadataRaft> {
        self.state().nodes.remove(&id)
    }

    /// Starts member `id` with its storage in `path` (reopening what is
    /// there) and puts it on the network.
    pub async fn start_member(
        &self,
        id: NodeId,
        config: std::sync::Arc<openraft::Config>,
        path: &std::path::Path,
    ) -> Result<LocalMember, String> {
        let db = open_db(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let machine = StateMachine::open(db.clone()).map_err(|e| e.to_string())?;
        let raft = MetadataRaft::new(
            id,
            config,
            LocalNetwork::new(self.clone(), id),
            LogStore::new(db),
            machine.clone(),
        )
        .await
        .map_err(|e| e.to_string())?;
        self.add(id, raft.clone());
        Ok(LocalMember { raft, machine })
    }

    /// Takes member `id` off the network and stops it, as a crash would:
    /// it says nothing to the others.
    pub async fn stop_member(&self, id: NodeId, member: LocalMember) {
        self.remove(id);
        if let Err(error) = member.raft.shutdown().await {
            tracing::warn!(id, %error, "member did not shut down cleanly");
        }
    }

    /// Splits the network: nodes in `side` reach only each other.
    pub fn partition(&self, side: &[NodeId]) {
        let mut state = self.state();
        let all: Vec<NodeId> = state.nodes.keys().copied().collect();
        for &a in side {
            for &b in &all {
                if !side.contains(&b) {
                    state.cut.insert((a.min(b), a.max(b)));
                }
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.state().cut.clear();
    }

    fn target(&self, from: NodeId, to: NodeId) -> Result<MetadataRaft, LinkDown> {
        let state = self.state();
        if state.cut.contains(&(from.min(to), from.max(to))) {
            return Err(LinkDown { from, to });
        }
        state.nodes.get(&to).cloned().ok_or(LinkDown { from, to })
    }
}

/// The network factory of one member.
#[derive(Debug, Clone)]
pub struct LocalNetwork {
    router: Router,
    from: NodeId,
}

impl LocalNetwork {
    /// The network as seen from member `from`.
    pub fn new(router: Router, from: NodeId) -> LocalNetwork {
        LocalNetwork { router, from }
    }
}

/// One member's connection to another.
#[derive(Debug, Clone)]
pub struct LocalConnection {
    router: Router,
    from: NodeId,
    to: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for LocalNetwork {
    type Network = LocalConnection;

    async fn new_client(&mut self, target: NodeId, _node: &Member) -> LocalConnection {
        LocalConnection {
            router: self.router.clone(),
            from: self.from,
            to: target,
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, Member, RaftError<NodeId, E>>>;

impl LocalConnection {
    fn target<E: std::error::Error>(
        &self,
    ) -> Result<MetadataRaft, RPCError<NodeId, Member, RaftError<NodeId, E>>> {
        self.router
            .target(self.from, self.to)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }
}

impl RaftNetwork<TypeConfig> for LocalConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let raft = self.target()?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let raft = self.target()?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let raft = self.target()?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}
