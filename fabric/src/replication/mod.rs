//! Replication between nodes: the protocol core of
//! `blockstore::replication` carried over the cluster's QUIC connections.
//!
//! - [`service`]: the replica side. A frontend opens one bidirectional
//!   stream per volume; the service applies its frames to the local
//!   `ReplicaVolume` and answers on the same stream.
//! - [`driver`]: the frontend side. It runs a volume's
//!   [`blockstore::replication::frontend::Frontend`]: guest requests in,
//!   requests out to local and remote replicas, replies and metadata
//!   outcomes back in, completions out.
//!
//! Frames (`blockstore::replication::wire`) travel length-prefixed: a u32
//! little-endian length, then the frame.

pub mod driver;
pub mod engine;
pub mod service;

use std::sync::{Arc, OnceLock, Weak};

use blockstore::replication::replica_volume::ReplicaVolume;
use bytes::Bytes;

use crate::cluster::metadata::{Metadata, NodeId, VolumeMeta};
use crate::cluster_api::ClusterHandle;
use crate::node::{Node, NodeError};
use service::ReplicaService;

/// How often the same failure of a replica's request is said again: a full
/// disk fails every try, and a stale replica is tried every `retry_ms`.
const FAILURE_REPEAT: std::time::Duration = std::time::Duration::from_secs(60);

/// Says each volume's replica failures once per reason (the message with
/// its numbers left out: op ids and offsets differ from try to try), and
/// again every [`FAILURE_REPEAT`], with how many were not said meanwhile.
#[derive(Debug, Default)]
pub struct FailureLog {
    said: std::sync::Mutex<std::collections::HashMap<u64, (String, std::time::Instant, u64)>>,
}

impl FailureLog {
    /// Whether to say `error` for `volume` now, and how many of the
    /// volume's failures went unsaid before it.
    pub fn say(&self, volume: u64, error: &str) -> Option<u64> {
        let now = std::time::Instant::now();
        let reason: String = error.chars().filter(|c| !c.is_ascii_digit()).collect();
        let mut said = self.said.lock().expect("failure log poisoned");
        match said.get_mut(&volume) {
            Some((last, at, quiet))
                if *last == reason && now.duration_since(*at) < FAILURE_REPEAT =>
            {
                *quiet += 1;
                None
            }
            entry => {
                let quiet = entry.map_or(0, |(_, _, quiet)| *quiet);
                said.insert(volume, (reason, now, 0));
                Some(quiet)
            }
        }
    }
}

/// Blocks per dirty-tracking region: 1 MiB.
pub const REGION_BLOCKS: u64 = 256;
/// Bytes per region.
pub const REGION_BYTES: u64 = REGION_BLOCKS * blockstore::replication::wire::BLOCK_BYTES as u64;

/// Timings and limits of the replication drivers on this node (the
/// config file's `[replication]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationSettings {
    pub replica_timeout: std::time::Duration,
    /// A guest request waiting this long fails (IOERR) rather than wait on.
    pub io_timeout: std::time::Duration,
    pub retry: std::time::Duration,
    /// 0: no limit.
    pub resync_bytes_per_second: u64,
    pub replace_after: Option<std::time::Duration>,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        crate::config::ReplicationConfig::default().settings()
    }
}

/// A volume's id on the wire (its 16 hex digits).
pub fn volume_id(volume: &VolumeMeta) -> Option<u64> {
    u64::from_str_radix(&volume.id, 16).ok()
}

/// The replica service of this node: a frontend's stream for a volume in
/// the cluster metadata that places a replica here reaches this node's
/// copy, created the first time.
pub fn node_service(
    node: Arc<Node>,
    cluster: Arc<OnceLock<Weak<ClusterHandle>>>,
    incarnation: u32,
) -> ReplicaService {
    ReplicaService::new(Arc::new(move |id| {
        let handle = cluster
            .get()
            .and_then(Weak::upgrade)
            .ok_or("this node is starting")?;
        let guard = handle
            .runtime
            .try_read()
            .map_err(|_| "this node's cluster membership is changing")?;
        let runtime = guard.as_ref().ok_or("this node is not in a cluster")?;
        let metadata = runtime.metadata();
        let volume = metadata
            .volumes
            .values()
            .find(|volume| volume_id(volume) == Some(id))
            .ok_or_else(|| format!("no volume with id {id:016x} in the cluster metadata here"))?;
        if !volume.replicas.contains(&runtime.id()) {
            return Err(format!(
                "this node holds no replica of volume {:?}",
                volume.name
            ));
        }
        let (store_volume, highest) = node
            .replica_volume(&volume.name, &volume.id, volume.size_bytes)
            .map_err(|e| e.to_string())?;
        let name = volume.name.clone();
        let keeper = node.clone();
        Ok(ReplicaVolume::new(
            store_volume,
            highest,
            incarnation,
            REGION_BLOCKS,
            Box::new(move |generation| {
                keeper
                    .set_replica_generation(&name, generation)
                    .map_err(|e| blockstore::Error::Replication {
                        volume: name.clone(),
                        reason: e.to_string(),
                    })
            }),
        ))
    }))
}

/// How often a node looks for copies of volumes that the cluster no
/// longer places on it.
pub const RECLAIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `metadata` keeps this node's copy `(name, id)`: a volume of that
/// name and id places a replica here (a volume of one replica lives on the
/// node that created it).
pub fn keeps(metadata: &Metadata, me: NodeId, name: &str, id: &str) -> bool {
    metadata.volumes.get(name).is_some_and(|volume| {
        volume.id == id && (volume.replicas.len() == 1 || volume.replicas.contains(&me))
    })
}

/// Deletes, every [`RECLAIM_INTERVAL`], this node's copies of cluster
/// volumes that the metadata no longer places here: deleted volumes and
/// replicas moved elsewhere. It decides only on metadata as current as the
/// leader's, and again under the replica table's lock before each delete
/// (a copy is created only when the metadata places it, and metadata only
/// moves forward). A copy that is attached here waits until it is
/// detached.
pub async fn reclaim(node: Arc<Node>, cluster: Arc<ClusterHandle>) {
    let Some(service) = cluster.services.replication.clone() else {
        return;
    };
    let mut ticker = tokio::time::interval(RECLAIM_INTERVAL);
    loop {
        ticker.tick().await;
        let guard = cluster.runtime.read().await;
        let Some(runtime) = guard.as_ref() else {
            continue;
        };
        if runtime
            .read_barrier(crate::cluster::runtime::Consistency::Current)
            .await
            .is_err()
        {
            continue;
        }
        let me = runtime.id();
        let copies = match node.cluster_volumes() {
            Ok(copies) => copies,
            Err(error) => {
                tracing::warn!(%error, "cannot list this node's volumes to reclaim space");
                continue;
            }
        };
        let metadata = runtime.metadata();
        for (name, id) in copies {
            if keeps(&metadata, me, &name, &id) {
                continue;
            }
            let Ok(numeric) = u64::from_str_radix(&id, 16) else {
                continue;
            };
            let deleted = service.retire(numeric, || {
                if keeps(&runtime.metadata(), me, &name, &id) {
                    return Ok(false);
                }
                node.delete(&name).map(|()| true)
            });
            match deleted {
                Ok(true) => tracing::info!(
                    volume = %name,
                    %id,
                    "deleted this node's copy: the cluster no longer places it here"
                ),
                Ok(false) | Err(NodeError::Attached(_)) => {}
                Err(error) => {
                    tracing::warn!(volume = %name, %id, %error, "cannot delete a copy the cluster no longer places here")
                }
            }
        }
    }
}

/// Largest frame accepted: the digest list of an 8 TiB volume (8 Mi
/// regions of 1 MiB, 8 bytes each) with its header; a 4 MiB write with its
/// checksums is far smaller.
pub const FRAME_BYTES_MAX: usize = (64 << 20) + (64 << 10);

/// Largest replicated volume: its digest list fits in one frame.
pub const REPLICATED_BYTES_MAX: u64 = 8 << 40;

/// Reads one length-prefixed frame; `None` at a clean end of stream.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> std::io::Result<Option<Bytes>> {
    let mut length = [0u8; 4];
    match recv.read_exact(&mut length).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(error) => return Err(std::io::Error::other(error)),
    }
    let length = u32::from_le_bytes(length) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(std::io::Error::other(format!(
            "a replication frame of {length} bytes is over the {FRAME_BYTES_MAX}-byte limit"
        )));
    }
    let mut frame = vec![0u8; length];
    recv.read_exact(&mut frame)
        .await
        .map_err(std::io::Error::other)?;
    Ok(Some(Bytes::from(frame)))
}

#[cfg(test)]
mod tests;
