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
/// refuses a snapshot of a version it does not know.
pub const SCHEMA_VERSION: u32 = 1;

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
}

/// Everything the cluster agrees on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub volumes: BTreeMap<String, VolumeMeta>,
}

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
                if self.volumes.remove(name).is_none() {
                    return Response::rejected(format!("volume {name:?} does not exist"));
                }
                Response::Applied
            }
        }
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
        if version.schema_version != SCHEMA_VERSION {
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
        VolumeMeta {
            id: format!("{:016x}", name.len()),
            name: name.into(),
            size_bytes: 1 << 30,
            replicas,
            created_unix: 0,
        }
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
            .replace("\"schema_version\":1", "\"schema_version\":99");
        let error = Metadata::from_snapshot(future.as_bytes()).expect_err("future version");
        assert!(error.to_string().contains("schema version 99"), "{error}");
        assert!(Metadata::from_snapshot(b"garbage").is_err());
    }

    #[test]
    fn commands_serialize_as_tagged_json() {
        let text =
            serde_json::to_string(&Command::DeleteVolume { name: "x".into() }).expect("json");
        assert_eq!(text, r#"{"command":"delete_volume","name":"x"}"#);
    }
}
