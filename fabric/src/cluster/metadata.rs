//! The cluster's metadata and the one place that changes it.
//!
//! [`Metadata::apply`] is a pure function of the current state and a
//! [`Command`]: every node applies the same committed commands in the same
//! order and so holds the same metadata. Commands that cannot apply (a name
//! taken, an unknown node) are *rejected* deterministically, with the
//! reason in the [`Response`]; they change nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the metadata layout, recorded in every snapshot. A node
/// reads snapshots of this version and of the older versions it knows how
/// to upgrade ([`SCHEMA_VERSIONS_READ`]), and refuses any other.
///
/// - 1: nodes and volumes.
/// - 2: switch segments and ports, VM definitions (absent in 1: empty).
pub const SCHEMA_VERSION: u32 = 2;

/// Snapshot versions this build reads.
pub const SCHEMA_VERSIONS_READ: std::ops::RangeInclusive<u32> = 1..=SCHEMA_VERSION;

/// A node's id in the cluster (also its Raft id).
pub type NodeId = u64;

/// Health of a node as seen through heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Up,
    Suspect,
    Down,
}

/// What a node offers to the pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    /// Capacity and free space of the filesystem holding the data directory.
    pub disk_bytes: u64,
    pub disk_free_bytes: u64,
    /// Network interfaces (name only; addresses change too often to keep).
    pub interfaces: Vec<String>,
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    /// Where other nodes reach it (QUIC).
    pub cluster_address: String,
    pub resources: Resources,
    pub joined_unix: u64,
    /// Operator labels (zone, rack, ...), for placement and for people.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A volume and where its replicas live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    /// Nodes holding replicas, in placement order.
    pub replicas: Vec<NodeId>,
    pub created_unix: u64,
    /// The attachment generation: raised by every attach; replicas refuse
    /// requests of a lower one (see `docs/replication.md`).
    #[serde(default)]
    pub generation: u64,
    /// The node serving the volume (its frontend), if attached.
    #[serde(default)]
    pub frontend: Option<NodeId>,
    /// Replicas that may lack writes; the others are in sync.
    #[serde(default)]
    pub stale: std::collections::BTreeSet<NodeId>,
    /// In-sync replicas a write needs, at least.
    #[serde(default = "default_min_replicas")]
    pub min_replicas: u32,
}

fn default_min_replicas() -> u32 {
    1
}

/// The default `min_replicas` for `replicas` replicas: 1 of 1 or 2, 2 of 3.
pub fn min_replicas_for(replicas: usize) -> u32 {
    if replicas >= 3 {
        2
    } else {
        1
    }
}

impl VolumeMeta {
    /// A new, detached volume with every replica in sync (a new volume is
    /// all zeros everywhere).
    pub fn new(
        id: String,
        name: String,
        size_bytes: u64,
        replicas: Vec<NodeId>,
        created_unix: u64,
    ) -> VolumeMeta {
        VolumeMeta {
            id,
            name,
            min_replicas: min_replicas_for(replicas.len()),
            size_bytes,
            replicas,
            created_unix,
            generation: 0,
            frontend: None,
            stale: Default::default(),
        }
    }

    /// Replicas recorded in sync, in placement order.
    pub fn in_sync(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicas
            .iter()
            .copied()
            .filter(|node| !self.stale.contains(node))
    }
}

/// MAC addresses and VLAN ids are the switch's own types.
pub use vswitch::frame::Mac;
pub use vswitch::switch::VLAN_ID_MAX;

/// How a switch port treats 802.1Q tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum VlanMode {
    /// Untagged at the port; frames belong to the segment's native
    /// network (no VLAN).
    Native,
    /// Untagged at the port, carried on one VLAN inside the switch.
    Access { vlan: u16 },
    /// Tagged at the port, for the listed VLANs.
    Trunk { vlans: Vec<u16> },
}

impl VlanMode {
    fn check(&self) -> Result<(), String> {
        let valid = |vlan: &u16| (1..=VLAN_ID_MAX).contains(vlan);
        match self {
            VlanMode::Native => Ok(()),
            VlanMode::Access { vlan } if valid(vlan) => Ok(()),
            VlanMode::Trunk { vlans } if !vlans.is_empty() && vlans.iter().all(valid) => Ok(()),
            other => Err(format!(
                "VLAN ids must be 1 to {VLAN_ID_MAX} (a trunk needs at least one): {other:?}"
            )),
        }
    }
}

/// A port's rate limit (token buckets; `None` is unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub packets_per_second: Option<u64>,
    pub bytes_per_second: Option<u64>,
}

/// A virtual L2 network spanning every node with a port in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentMeta {
    pub name: String,
    /// Network identifier carried in encapsulated frames between nodes;
    /// assigned by the metadata, unique among live segments.
    pub vni: u32,
    pub created_unix: u64,
}

/// A vhost-user-net port of a segment, served by one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMeta {
    pub name: String,
    pub segment: String,
    pub node: NodeId,
    /// The port's assigned address: the guest's MAC, and (with port
    /// security) the only source address the switch accepts from it.
    pub mac: Mac,
    pub vlan: VlanMode,
    #[serde(default)]
    pub rate: RateLimit,
    /// Port security (the default): sources other than `mac` are dropped.
    #[serde(default = "port_security_default")]
    pub port_security: bool,
    /// A host port: the TAP interface of this name on `node` (with
    /// `mac`), rather than a vhost-user socket for a guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The port's link as the operator set it (up unless set down).
    #[serde(default)]
    pub link: Link,
}

/// A switch port's link, as the operator sets it: a port whose link is
/// down sends and receives nothing, and its guest stays attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    #[default]
    Up,
    Down,
}

fn port_security_default() -> bool {
    true
}

/// A VM definition: what `vmrun` boots, and with which of the pool's
/// volumes and ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMeta {
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Kernel and initramfs paths on the node that runs the VM.
    pub kernel: String,
    pub initramfs: Option<String>,
    pub cmdline: String,
    /// Volume names, in the order the guest sees its disks.
    pub volumes: Vec<String>,
    /// Port names, in the order the guest sees its NICs.
    pub ports: Vec<String>,
    /// The node that runs it, once placed.
    pub node: Option<NodeId>,
}

/// Everything the cluster agrees on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub volumes: BTreeMap<String, VolumeMeta>,
    #[serde(default)]
    pub segments: BTreeMap<String, SegmentMeta>,
    #[serde(default)]
    pub ports: BTreeMap<String, PortMeta>,
    #[serde(default)]
    pub vms: BTreeMap<String, VmMeta>,
    /// Unused join tokens: SHA-256 of the secret (hex) -> expiry (Unix
    /// seconds). Only digests are kept, so the metadata gives away no
    /// usable token.
    #[serde(default)]
    pub join_tokens: BTreeMap<String, u64>,
    /// Highest node id ever given out: ids are never reused, so a message
    /// from a removed node can never pass for a new one's.
    #[serde(default)]
    pub node_id_high: NodeId,
}

/// Most unused join tokens kept; issuing more drops the one expiring
/// soonest.
pub const JOIN_TOKENS_MAX: usize = 1024;

/// A change to the metadata, as committed to the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// A node joined (or re-registered after a restart).
    AddNode { node: NodeRecord },
    /// A node reports its resources.
    UpdateResources { id: NodeId, resources: Resources },
    /// A node left the cluster.
    RemoveNode { id: NodeId },
    /// Sets (or, with no value, removes) a label of a node.
    SetLabel {
        id: NodeId,
        key: String,
        value: Option<String>,
    },
    /// A volume was created with its placement.
    CreateVolume { volume: VolumeMeta },
    /// A volume was deleted.
    DeleteVolume { name: String },
    /// A switch segment was created; the metadata assigns its VNI.
    CreateSegment { name: String, created_unix: u64 },
    /// A segment with no ports was deleted.
    DeleteSegment { name: String },
    /// A port was added to a segment.
    AddPort { port: PortMeta },
    /// A port not used by any VM was removed.
    RemovePort { name: String },
    /// A port's link was set up or down.
    SetPortLink { name: String, link: Link },
    /// A VM was defined (or its definition replaced).
    DefineVm { vm: VmMeta },
    /// A VM definition was deleted.
    DeleteVm { name: String },
    /// A join token was issued (by its digest). Expired tokens are
    /// dropped as of `issued_unix`.
    IssueToken {
        digest: String,
        issued_unix: u64,
        expires_unix: u64,
    },
    /// A join token is used up: applied once, rejected for a token that
    /// is unknown, used or (as of `now_unix`) expired.
    RedeemToken { digest: String, now_unix: u64 },
    /// A volume is attached on `node`: its generation goes up, fencing
    /// any earlier frontend.
    AttachVolume { name: String, node: NodeId },
    /// The frontend of `generation` lets the volume go.
    DetachVolume { name: String, generation: u64 },
    /// The frontend of `generation` found replica `node` failed.
    MarkStale {
        name: String,
        generation: u64,
        node: NodeId,
    },
    /// The frontend of `generation` resynced replica `node`.
    MarkInSync {
        name: String,
        generation: u64,
        node: NodeId,
    },
    /// Replica `old` is replaced by `new`, which starts stale (a full
    /// copy).
    ReplaceReplica {
        name: String,
        generation: u64,
        old: NodeId,
        new: NodeId,
    },
}

/// The outcome of applying a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Response {
    Applied,
    Rejected { reason: String },
}

impl Response {
    fn rejected(reason: impl Into<String>) -> Response {
        Response::Rejected {
            reason: reason.into(),
        }
    }
}

/// The metadata as stored in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub schema_version: u32,
    pub metadata: Metadata,
}

/// Errors decoding a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is not valid metadata: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("snapshot has schema version {found}; this fabricd understands {expected}")]
    Version { found: u32, expected: u32 },
}

impl Metadata {
    /// The id for the next node to join: never one given out before.
    pub fn next_node_id(&self) -> NodeId {
        let highest = self.nodes.keys().max().copied().unwrap_or(0);
        self.node_id_high.max(highest) + 1
    }

    /// Applies one committed command.
    pub fn apply(&mut self, command: &Command) -> Response {
        match command {
            Command::AddNode { node } => {
                if let Some(other) = self.nodes.values().find(|other| {
                    other.id != node.id
                        && (other.name == node.name
                            || other.cluster_address == node.cluster_address)
                }) {
                    return Response::rejected(format!(
                        "node {} ({}) already uses name {:?} or address {}",
                        other.id, other.name, node.name, node.cluster_address
                    ));
                }
                self.node_id_high = self.node_id_high.max(node.id);
                self.nodes.insert(node.id, node.clone());
                Response::Applied
            }
            Command::UpdateResources { id, resources } => match self.nodes.get_mut(id) {
                Some(node) => {
                    node.resources = resources.clone();
                    Response::Applied
                }
                None => Response::rejected(format!("node {id} is not a member")),
            },
            Command::SetLabel { id, key, value } => match self.nodes.get_mut(id) {
                Some(node) => {
                    match value {
                        Some(value) => node.labels.insert(key.clone(), value.clone()),
                        None => node.labels.remove(key),
                    };
                    Response::Applied
                }
                None => Response::rejected(format!("node {id} is not a member")),
            },
            Command::RemoveNode { id } => {
                if self.nodes.remove(id).is_none() {
                    return Response::rejected(format!("node {id} is not a member"));
                }
                Response::Applied
            }
            Command::CreateVolume { volume } => {
                if self.volumes.contains_key(&volume.name) {
                    return Response::rejected(format!(
                        "a volume named {:?} already exists",
                        volume.name
                    ));
                }
                if let Some(missing) = volume
                    .replicas
                    .iter()
                    .find(|id| !self.nodes.contains_key(id))
                {
                    return Response::rejected(format!("replica node {missing} is not a member"));
                }
                self.volumes.insert(volume.name.clone(), volume.clone());
                Response::Applied
            }
            Command::DeleteVolume { name } => {
                if let Some(vm) = self.vms.values().find(|vm| vm.volumes.contains(name)) {
                    return Response::rejected(format!(
                        "volume {name:?} is a disk of VM {:?}",
                        vm.name
                    ));
                }
                match self.volumes.get(name) {
                    None => Response::rejected(format!("volume {name:?} does not exist")),
                    Some(VolumeMeta {
                        frontend: Some(frontend),
                        ..
                    }) => Response::rejected(format!(
                        "volume {name:?} is attached on node {frontend}; detach it first"
                    )),
                    Some(_) => {
                        self.volumes.remove(name);
                        Response::Applied
                    }
                }
            }
            Command::CreateSegment { name, created_unix } => {
                if self.segments.contains_key(name) {
                    return Response::rejected(format!("a segment named {name:?} already exists"));
                }
                // The lowest VNI not in use: deterministic on every node.
                let used: std::collections::BTreeSet<u32> =
                    self.segments.values().map(|s| s.vni).collect();
                let vni = (1..).find(|vni| !used.contains(vni)).expect("a free VNI");
                self.segments.insert(
                    name.clone(),
                    SegmentMeta {
                        name: name.clone(),
                        vni,
                        created_unix: *created_unix,
                    },
                );
                Response::Applied
            }
            Command::DeleteSegment { name } => {
                if let Some(port) = self.ports.values().find(|p| &p.segment == name) {
                    return Response::rejected(format!(
                        "segment {name:?} still has port {:?}; delete its ports first",
                        port.name
                    ));
                }
                if self.segments.remove(name).is_none() {
                    return Response::rejected(format!("segment {name:?} does not exist"));
                }
                Response::Applied
            }
            Command::AddPort { port } => match self.check_port(port) {
                Ok(()) => {
                    self.ports.insert(port.name.clone(), port.clone());
                    Response::Applied
                }
                Err(reason) => Response::rejected(reason),
            },
            Command::SetPortLink { name, link } => match self.ports.get_mut(name) {
                Some(port) => {
                    port.link = *link;
                    Response::Applied
                }
                None => Response::rejected(format!("port {name:?} does not exist")),
            },
            Command::RemovePort { name } => {
                if let Some(vm) = self.vms.values().find(|vm| vm.ports.contains(name)) {
                    return Response::rejected(format!(
                        "port {name:?} is a NIC of VM {:?}",
                        vm.name
                    ));
                }
                if self.ports.remove(name).is_none() {
                    return Response::rejected(format!("port {name:?} does not exist"));
                }
                Response::Applied
            }
            Command::DefineVm { vm } => match self.check_vm(vm) {
                Ok(()) => {
                    self.vms.insert(vm.name.clone(), vm.clone());
                    Response::Applied
                }
                Err(reason) => Response::rejected(reason),
            },
            Command::DeleteVm { name } => {
                if self.vms.remove(name).is_none() {
                    return Response::rejected(format!("VM {name:?} does not exist"));
                }
                Response::Applied
            }
            Command::IssueToken {
                digest,
                issued_unix,
                expires_unix,
            } => {
                self.join_tokens.retain(|_, expiry| *expiry > *issued_unix);
                while self.join_tokens.len() >= JOIN_TOKENS_MAX {
                    let soonest = self
                        .join_tokens
                        .iter()
                        .min_by_key(|(digest, expiry)| (**expiry, (*digest).clone()))
                        .map(|(digest, _)| digest.clone())
                        .expect("a full table has entries");
                    self.join_tokens.remove(&soonest);
                }
                self.join_tokens.insert(digest.clone(), *expires_unix);
                Response::Applied
            }
            Command::AttachVolume { name, node } => {
                if !self.nodes.contains_key(node) {
                    return Response::rejected(format!("node {node} is not a member"));
                }
                match self.volumes.get_mut(name) {
                    Some(volume) => {
                        volume.generation += 1;
                        volume.frontend = Some(*node);
                        Response::Applied
                    }
                    None => Response::rejected(format!("volume {name:?} does not exist")),
                }
            }
            Command::DetachVolume { name, generation } => {
                match self.current_volume(name, *generation) {
                    Ok(volume) => {
                        volume.frontend = None;
                        Response::Applied
                    }
                    Err(reason) => Response::rejected(reason),
                }
            }
            Command::MarkStale {
                name,
                generation,
                node,
            } => match self.current_volume(name, *generation) {
                Ok(volume) if !volume.replicas.contains(node) => {
                    Response::rejected(format!("node {node} holds no replica of {name:?}"))
                }
                Ok(volume) if volume.in_sync().all(|other| other == *node) => Response::rejected(
                    format!("node {node} holds the last in-sync replica of {name:?}"),
                ),
                Ok(volume) => {
                    volume.stale.insert(*node);
                    Response::Applied
                }
                Err(reason) => Response::rejected(reason),
            },
            Command::MarkInSync {
                name,
                generation,
                node,
            } => match self.current_volume(name, *generation) {
                Ok(volume) if volume.replicas.contains(node) => {
                    volume.stale.remove(node);
                    Response::Applied
                }
                Ok(_) => Response::rejected(format!("node {node} holds no replica of {name:?}")),
                Err(reason) => Response::rejected(reason),
            },
            Command::ReplaceReplica {
                name,
                generation,
                old,
                new,
            } => {
                if !self.nodes.contains_key(new) {
                    return Response::rejected(format!("node {new} is not a member"));
                }
                match self.current_volume(name, *generation) {
                    Ok(volume) if volume.replicas.contains(new) => Response::rejected(format!(
                        "node {new} already holds a replica of {name:?}"
                    )),
                    Ok(volume) => match volume.replicas.iter().position(|n| n == old) {
                        Some(index) if volume.in_sync().any(|n| n != *old) => {
                            volume.replicas[index] = *new;
                            volume.stale.remove(old);
                            volume.stale.insert(*new);
                            Response::Applied
                        }
                        Some(_) => Response::rejected(format!(
                            "node {old} holds the last in-sync replica of {name:?}"
                        )),
                        None => {
                            Response::rejected(format!("node {old} holds no replica of {name:?}"))
                        }
                    },
                    Err(reason) => Response::rejected(reason),
                }
            }
            Command::RedeemToken { digest, now_unix } => match self.join_tokens.remove(digest) {
                Some(expiry) if expiry > *now_unix => Response::Applied,
                // Removed all the same: an expired token is of no use.
                Some(_) => Response::rejected(
                    "the token has expired; issue a new one with `fabctl cluster token`",
                ),
                None => Response::rejected("the token is unknown or was already used"),
            },
        }
    }

    /// The volume, if `generation` is its current one: a change from an
    /// older attachment is refused (it is fenced).
    fn current_volume(&mut self, name: &str, generation: u64) -> Result<&mut VolumeMeta, String> {
        let volume = self
            .volumes
            .get_mut(name)
            .ok_or_else(|| format!("volume {name:?} does not exist"))?;
        if volume.generation != generation {
            return Err(format!(
                "fenced: volume {name:?} is at generation {}, not {generation}",
                volume.generation
            ));
        }
        Ok(volume)
    }

    fn check_port(&self, port: &PortMeta) -> Result<(), String> {
        if self.ports.contains_key(&port.name) {
            return Err(format!("a port named {:?} already exists", port.name));
        }
        if !self.segments.contains_key(&port.segment) {
            return Err(format!("segment {:?} does not exist", port.segment));
        }
        if !self.nodes.contains_key(&port.node) {
            return Err(format!("node {} is not a member", port.node));
        }
        if port.mac.is_group() {
            return Err(format!("{} is a multicast address", port.mac));
        }
        if let Some(other) = self
            .ports
            .values()
            .find(|other| other.segment == port.segment && other.mac == port.mac)
        {
            return Err(format!(
                "port {:?} of segment {:?} already uses {}",
                other.name, port.segment, port.mac
            ));
        }
        if let Some(tap) = &port.tap {
            vswitch::tap::check_interface_name(tap)
                .map_err(|reason| format!("invalid host interface name {tap:?}: {reason}"))?;
            if let Some(other) = self
                .ports
                .values()
                .find(|other| other.node == port.node && other.tap.as_ref() == Some(tap))
            {
                return Err(format!(
                    "port {:?} is already host interface {tap:?} of node {}",
                    other.name, port.node
                ));
            }
        }
        port.vlan.check()
    }

    fn check_vm(&self, vm: &VmMeta) -> Result<(), String> {
        if let Some(missing) = vm.volumes.iter().find(|v| !self.volumes.contains_key(*v)) {
            return Err(format!("volume {missing:?} does not exist"));
        }
        if let Some(missing) = vm.ports.iter().find(|p| !self.ports.contains_key(*p)) {
            return Err(format!("port {missing:?} does not exist"));
        }
        if let Some(host) = vm
            .ports
            .iter()
            .find(|p| self.ports.get(*p).is_some_and(|port| port.tap.is_some()))
        {
            return Err(format!(
                "port {host:?} is a host interface, not a NIC a VM can have"
            ));
        }
        for other in self.vms.values().filter(|other| other.name != vm.name) {
            if let Some(shared) = vm.volumes.iter().find(|v| other.volumes.contains(v)) {
                return Err(format!(
                    "volume {shared:?} is already a disk of VM {:?}",
                    other.name
                ));
            }
            if let Some(shared) = vm.ports.iter().find(|p| other.ports.contains(p)) {
                return Err(format!(
                    "port {shared:?} is already a NIC of VM {:?}",
                    other.name
                ));
            }
        }
        if let Some(node) = vm.node.filter(|node| !self.nodes.contains_key(node)) {
            return Err(format!("node {node} is not a member"));
        }
        Ok(())
    }

    /// Encodes the metadata for a snapshot.
    pub fn to_snapshot(&self) -> Vec<u8> {
        let body = SnapshotBody {
            schema_version: SCHEMA_VERSION,
            metadata: self.clone(),
        };
        serde_json::to_vec(&body).expect("metadata always serializes")
    }

    /// Decodes a snapshot, checking its schema version.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Metadata, SnapshotError> {
        #[derive(Deserialize)]
        struct Version {
            schema_version: u32,
        }
        let version: Version = serde_json::from_slice(bytes)?;
        // Versions before this one lack maps that default to empty.
        if !SCHEMA_VERSIONS_READ.contains(&version.schema_version) {
            return Err(SnapshotError::Version {
                found: version.schema_version,
                expected: SCHEMA_VERSION,
            });
        }
        let body: SnapshotBody = serde_json::from_slice(bytes)?;
        Ok(body.metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId) -> NodeRecord {
        NodeRecord {
            id,
            name: format!("n{id}"),
            cluster_address: format!("127.0.0.1:{}", 7000 + id),
            resources: Resources::default(),
            joined_unix: 0,
            labels: BTreeMap::new(),
        }
    }

    fn volume(name: &str, replicas: Vec<NodeId>) -> VolumeMeta {
        VolumeMeta::new(
            format!("{:016x}", name.len()),
            name.into(),
            1 << 30,
            replicas,
            0,
        )
    }

    #[test]
    fn commands_apply_or_are_rejected_without_change() {
        let mut metadata = Metadata::default();
        let steps: Vec<(Command, bool)> = vec![
            (Command::AddNode { node: node(1) }, true),
            (Command::AddNode { node: node(2) }, true),
            (
                Command::AddNode {
                    node: NodeRecord { id: 3, ..node(2) },
                },
                false,
            ),
            (
                Command::CreateVolume {
                    volume: volume("a", vec![1, 2]),
                },
                true,
            ),
            (
                Command::CreateVolume {
                    volume: volume("a", vec![1]),
                },
                false,
            ),
            (
                Command::CreateVolume {
                    volume: volume("b", vec![9]),
                },
                false,
            ),
            (
                Command::UpdateResources {
                    id: 1,
                    resources: Resources {
                        cpu_cores: 8,
                        ..Resources::default()
                    },
                },
                true,
            ),
            (
                Command::UpdateResources {
                    id: 9,
                    resources: Resources::default(),
                },
                false,
            ),
            (
                Command::SetLabel {
                    id: 1,
                    key: "zone".into(),
                    value: Some("a".into()),
                },
                true,
            ),
            (
                Command::SetLabel {
                    id: 9,
                    key: "zone".into(),
                    value: None,
                },
                false,
            ),
            (Command::DeleteVolume { name: "a".into() }, true),
            (Command::DeleteVolume { name: "a".into() }, false),
            (Command::RemoveNode { id: 2 }, true),
            (Command::RemoveNode { id: 2 }, false),
        ];
        for (command, applies) in steps {
            let before = metadata.clone();
            let response = metadata.apply(&command);
            assert_eq!(
                response == Response::Applied,
                applies,
                "{command:?}: {response:?}"
            );
            if !applies {
                assert_eq!(metadata, before, "a rejected command changed the metadata");
            }
        }
        assert_eq!(metadata.nodes.len(), 1);
        assert_eq!(metadata.nodes[&1].resources.cpu_cores, 8);
        assert_eq!(
            metadata.nodes[&1].labels.get("zone").map(String::as_str),
            Some("a")
        );
        assert!(metadata.volumes.is_empty());
    }

    #[test]
    fn snapshots_round_trip_and_check_their_version() {
        let mut metadata = Metadata::default();
        metadata.apply(&Command::AddNode { node: node(1) });
        metadata.apply(&Command::CreateVolume {
            volume: volume("v", vec![1]),
        });
        let bytes = metadata.to_snapshot();
        assert_eq!(Metadata::from_snapshot(&bytes).expect("decode"), metadata);
        let future = String::from_utf8(bytes)
            .expect("json")
            .replace("\"schema_version\":2", "\"schema_version\":99");
        let error = Metadata::from_snapshot(future.as_bytes()).expect_err("future version");
        assert!(error.to_string().contains("schema version 99"), "{error}");
        assert!(Metadata::from_snapshot(b"garbage").is_err());
    }

    #[test]
    fn version_1_snapshots_upgrade_with_no_network_or_vms() {
        let v1 = br#"{"schema_version":1,"metadata":{"nodes":{},"volumes":{}}}"#;
        assert_eq!(
            Metadata::from_snapshot(v1).expect("version 1 reads"),
            Metadata::default()
        );
    }

    fn port(name: &str, segment: &str, mac: &str) -> PortMeta {
        PortMeta {
            name: name.into(),
            segment: segment.into(),
            node: 1,
            mac: mac.parse().expect("mac"),
            vlan: VlanMode::Native,
            rate: RateLimit::default(),
            port_security: true,
            tap: None,
            link: Link::Up,
        }
    }

    fn vm(name: &str, volumes: &[&str], ports: &[&str]) -> VmMeta {
        VmMeta {
            name: name.into(),
            vcpus: 1,
            memory_bytes: 256 << 20,
            kernel: "/boot/vmlinuz".into(),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
            ports: ports.iter().map(|p| p.to_string()).collect(),
            node: None,
        }
    }

    #[test]
    fn segments_ports_and_vms_keep_their_references_whole() {
        let mut metadata = Metadata::default();
        let segment = |name: &str| Command::CreateSegment {
            name: name.into(),
            created_unix: 0,
        };
        let steps: Vec<(Command, bool)> = vec![
            (Command::AddNode { node: node(1) }, true),
            (segment("s"), true),
            (segment("s"), false),
            (segment("t"), true),
            (
                Command::AddPort {
                    port: port("p1", "s", "52:54:00:00:00:01"),
                },
                true,
            ),
            // Same MAC in another segment is fine; in the same one it is not.
            (
                Command::AddPort {
                    port: port("p2", "t", "52:54:00:00:00:01"),
                },
                true,
            ),
            (
                Command::AddPort {
                    port: port("p3", "s", "52:54:00:00:00:01"),
                },
                false,
            ),
            (
                Command::AddPort {
                    port: port("p3", "nope", "52:54:00:00:00:03"),
                },
                false,
            ),
            (
                Command::AddPort {
                    port: port("p3", "s", "01:00:5e:00:00:01"),
                },
                false,
            ),
            (
                Command::AddPort {
                    port: PortMeta {
                        vlan: VlanMode::Access { vlan: 4095 },
                        ..port("p3", "s", "52:54:00:00:00:03")
                    },
                },
                false,
            ),
            (
                Command::AddPort {
                    port: PortMeta {
                        vlan: VlanMode::Trunk { vlans: vec![] },
                        ..port("p3", "s", "52:54:00:00:00:03")
                    },
                },
                false,
            ),
            (
                Command::AddPort {
                    port: PortMeta {
                        node: 9,
                        ..port("p3", "s", "52:54:00:00:00:03")
                    },
                },
                false,
            ),
            // Host ports: a valid interface name, one port per interface
            // of a node.
            (
                Command::AddPort {
                    port: PortMeta {
                        tap: Some("fab/0".into()),
                        ..port("h1", "s", "52:54:00:00:00:04")
                    },
                },
                false,
            ),
            (
                Command::AddPort {
                    port: PortMeta {
                        tap: Some("fab0".into()),
                        ..port("h1", "s", "52:54:00:00:00:04")
                    },
                },
                true,
            ),
            (
                Command::AddPort {
                    port: PortMeta {
                        tap: Some("fab0".into()),
                        ..port("h2", "t", "52:54:00:00:00:05")
                    },
                },
                false,
            ),
            (
                Command::CreateVolume {
                    volume: volume("d", vec![1]),
                },
                true,
            ),
            // A host port is not a NIC.
            (
                Command::DefineVm {
                    vm: vm("h", &[], &["h1"]),
                },
                false,
            ),
            (
                Command::DefineVm {
                    vm: vm("a", &["d"], &["p1"]),
                },
                true,
            ),
            (
                Command::DefineVm {
                    vm: vm("b", &["d"], &[]),
                },
                false,
            ),
            (
                Command::DefineVm {
                    vm: vm("b", &[], &["p1"]),
                },
                false,
            ),
            (
                Command::DefineVm {
                    vm: vm("b", &["missing"], &[]),
                },
                false,
            ),
            (
                Command::DefineVm {
                    vm: vm("b", &[], &["p2"]),
                },
                true,
            ),
            // Redefining a VM with its own resources is allowed.
            (
                Command::DefineVm {
                    vm: vm("a", &["d"], &["p1"]),
                },
                true,
            ),
            (Command::DeleteVolume { name: "d".into() }, false),
            // A port's link, set down and up again; not for a port that
            // does not exist.
            (
                Command::SetPortLink {
                    name: "p1".into(),
                    link: Link::Down,
                },
                true,
            ),
            (
                Command::SetPortLink {
                    name: "p1".into(),
                    link: Link::Up,
                },
                true,
            ),
            (
                Command::SetPortLink {
                    name: "nope".into(),
                    link: Link::Down,
                },
                false,
            ),
            (Command::RemovePort { name: "p1".into() }, false),
            (Command::DeleteSegment { name: "s".into() }, false),
            (Command::DeleteVm { name: "a".into() }, true),
            (Command::RemovePort { name: "p1".into() }, true),
            (Command::RemovePort { name: "h1".into() }, true),
            (Command::DeleteSegment { name: "s".into() }, true),
            (Command::DeleteSegment { name: "s".into() }, false),
            (segment("u"), true),
        ];
        for (command, applies) in steps {
            let before = metadata.clone();
            let response = metadata.apply(&command);
            assert_eq!(
                response == Response::Applied,
                applies,
                "{command:?}: {response:?}"
            );
            if !applies {
                assert_eq!(metadata, before, "a rejected command changed the metadata");
            }
        }
        // A port recorded before its link was: up.
        let old = r#"{"name":"o","segment":"s","node":1,"mac":"52:54:00:00:00:09","vlan":{"mode":"native"}}"#;
        let old: PortMeta = serde_json::from_str(old).expect("old record");
        assert_eq!(old.link, Link::Up);
        // The freed VNI is reused, lowest first.
        assert_eq!(metadata.segments["t"].vni, 2);
        assert_eq!(metadata.segments["u"].vni, 1);
        let bytes = metadata.to_snapshot();
        assert_eq!(Metadata::from_snapshot(&bytes).expect("decode"), metadata);
    }

    #[test]
    fn join_tokens_are_used_once_expire_and_are_bounded() {
        let mut metadata = Metadata::default();
        let issue = |digest: &str, at: u64| Command::IssueToken {
            digest: digest.into(),
            issued_unix: at,
            expires_unix: at + 100,
        };
        let redeem = |digest: &str, at: u64| Command::RedeemToken {
            digest: digest.into(),
            now_unix: at,
        };
        assert_eq!(metadata.apply(&issue("a", 0)), Response::Applied);
        assert_eq!(metadata.apply(&issue("b", 0)), Response::Applied);
        assert_eq!(metadata.apply(&redeem("a", 50)), Response::Applied);
        let again = metadata.apply(&redeem("a", 50));
        assert!(format!("{again:?}").contains("already used"), "{again:?}");
        let late = metadata.apply(&redeem("b", 100));
        assert!(format!("{late:?}").contains("expired"), "{late:?}");
        assert!(metadata.join_tokens.is_empty());
        for i in 0..JOIN_TOKENS_MAX as u64 + 3 {
            metadata.apply(&Command::IssueToken {
                digest: format!("t{i}"),
                issued_unix: 1000,
                expires_unix: 2000 + i,
            });
        }
        assert_eq!(metadata.join_tokens.len(), JOIN_TOKENS_MAX);
        assert!(!metadata.join_tokens.contains_key("t0"));
        // Issuing drops what has expired by then.
        metadata.apply(&issue("z", 4000));
        assert_eq!(metadata.join_tokens.len(), 1);
    }

    #[test]
    fn attachments_fence_older_generations_and_keep_one_replica_in_sync() {
        let mut metadata = Metadata::default();
        for id in 1..=4 {
            metadata.apply(&Command::AddNode { node: node(id) });
        }
        metadata.apply(&Command::CreateVolume {
            volume: volume("v", vec![1, 2]),
        });
        let name = || "v".to_string();
        let steps: Vec<(Command, bool)> = vec![
            (
                Command::AttachVolume {
                    name: name(),
                    node: 9,
                },
                false,
            ),
            (
                Command::AttachVolume {
                    name: name(),
                    node: 1,
                },
                true,
            ),
            (
                Command::AttachVolume {
                    name: name(),
                    node: 3,
                },
                true,
            ),
            // Generation 1 is fenced by 2.
            (
                Command::MarkStale {
                    name: name(),
                    generation: 1,
                    node: 2,
                },
                false,
            ),
            (
                Command::MarkStale {
                    name: name(),
                    generation: 2,
                    node: 4,
                },
                false,
            ),
            (
                Command::MarkStale {
                    name: name(),
                    generation: 2,
                    node: 2,
                },
                true,
            ),
            // Node 1 is the last in-sync replica.
            (
                Command::MarkStale {
                    name: name(),
                    generation: 2,
                    node: 1,
                },
                false,
            ),
            (
                Command::ReplaceReplica {
                    name: name(),
                    generation: 2,
                    old: 1,
                    new: 4,
                },
                false,
            ),
            (
                Command::ReplaceReplica {
                    name: name(),
                    generation: 2,
                    old: 2,
                    new: 1,
                },
                false,
            ),
            (
                Command::ReplaceReplica {
                    name: name(),
                    generation: 2,
                    old: 2,
                    new: 4,
                },
                true,
            ),
            (
                Command::MarkInSync {
                    name: name(),
                    generation: 1,
                    node: 4,
                },
                false,
            ),
            (
                Command::MarkInSync {
                    name: name(),
                    generation: 2,
                    node: 4,
                },
                true,
            ),
            (
                Command::DetachVolume {
                    name: name(),
                    generation: 1,
                },
                false,
            ),
            (
                Command::DetachVolume {
                    name: name(),
                    generation: 2,
                },
                true,
            ),
        ];
        for (command, applies) in steps {
            let before = metadata.clone();
            let response = metadata.apply(&command);
            assert_eq!(
                response == Response::Applied,
                applies,
                "{command:?}: {response:?}"
            );
            if !applies {
                assert_eq!(metadata, before, "a rejected command changed the metadata");
            }
        }
        let v = &metadata.volumes["v"];
        assert_eq!((v.generation, v.frontend), (2, None));
        assert_eq!(v.replicas, [1, 4]);
        assert!(v.stale.is_empty());
        assert_eq!(v.in_sync().collect::<Vec<_>>(), [1, 4]);
        // A volume recorded before these fields existed reads as detached
        // and in sync.
        let old = r#"{"id":"1","name":"o","size_bytes":4096,"replicas":[1,2,3],"created_unix":0}"#;
        let old: VolumeMeta = serde_json::from_str(old).expect("old record");
        assert_eq!(
            (old.generation, old.frontend, old.stale.len()),
            (0, None, 0)
        );
        assert_eq!(min_replicas_for(3), 2);
    }

    #[test]
    fn macs_parse_strictly() {
        let mac: Mac = "52:54:00:AB:cd:0f".parse().expect("mac");
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5254.00ab.cd0f",
            "52:54:00:ab:cd:g0",
            "52:54:00:ab:cd:0",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn commands_serialize_as_tagged_json() {
        let text =
            serde_json::to_string(&Command::DeleteVolume { name: "x".into() }).expect("json");
        assert_eq!(text, r#"{"command":"delete_volume","name":"x"}"#);
    }
}
