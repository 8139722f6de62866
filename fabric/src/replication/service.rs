//! The replica side: replication streams from frontends, applied to this
//! node's replica volumes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use blockstore::replication::replica_volume::ReplicaVolume;
use blockstore::replication::wire::{decode_request, encode_reply};

use super::{read_frame, write_frame};

/// Finds (or creates) this node's replica of the volume with a cluster id.
pub type Resolve = Arc<dyn Fn(u64) -> Result<ReplicaVolume, String> + Send + Sync>;

/// This node's replicas, shared by every stream that reaches them.
#[derive(Clone)]
pub struct ReplicaService {
    resolve: Resolve,
    replicas: Arc<Mutex<HashMap<u64, Arc<Mutex<ReplicaVolume>>>>>,
}

impl std::fmt::Debug for ReplicaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaService").finish_non_exhaustive()
    }
}

impl ReplicaService {
    pub fn new(resolve: Resolve) -> ReplicaService {
        ReplicaService {
            resolve,
            replicas: Arc::default(),
        }
    }

    /// This node's replica of `volume`, shared by every stream and by a
    /// frontend on this node.
    pub fn replica(&self, volume: u64) -> Result<Arc<Mutex<ReplicaVolume>>, String> {
        let mut replicas = self.replicas.lock().expect("replica table poisoned");
        if let Some(replica) = replicas.get(&volume) {
            return Ok(replica.clone());
        }
        let replica = Arc::new(Mutex::new((self.resolve)(volume)?));
        replicas.insert(volume, replica.clone());
        Ok(replica)
    }

    /// Serves one replication stream until the frontend closes it. A frame
    /// that does not decode, names a volume this node has no replica of,
    /// or cannot be applied ends the stream with a logged reason; the
    /// frontend then treats the replica as failed.
    pub async fn serve_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        remote: SocketAddr,
    ) {
        let refuse = |send: &mut quinn::SendStream, reason: &dyn std::fmt::Display| {
            tracing::warn!(%remote, %reason, "closed a replication stream");
            let _ = send.reset(1u32.into());
        };
        loop {
            let frame = match read_frame(&mut recv).await {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    let _ = send.finish();
                    return;
                }
                Err(error) => return refuse(&mut send, &error),
            };
            let (volume, request) = match decode_request(frame) {
                Ok(decoded) => decoded,
                Err(error) => return refuse(&mut send, &error),
            };
            let replica = match self.replica(volume) {
                Ok(replica) => replica,
                Err(reason) => return refuse(&mut send, &reason),
            };
            let replies = match handle(replica, request).await {
                Ok(replies) => replies,
                Err(error) => return refuse(&mut send, &error),
            };
            for reply in replies {
                if let Err(error) = write_frame(&mut send, &encode_reply(volume, &reply)).await {
                    return refuse(&mut send, &error);
                }
            }
        }
    }
}

/// Whether a request can run on an async task: anything but a FLUSH or a
/// scrub's VERIFY (which reads a whole region from disk), when no FLUSH is
/// held (a write could release one, which syncs).
pub fn quick(
    replica: &Mutex<ReplicaVolume>,
    request: &blockstore::replication::Request<blockstore::replication::wire::Blocks>,
) -> bool {
    !matches!(
        request,
        blockstore::replication::Request::Flush { .. }
            | blockstore::replication::Request::Verify { .. }
    ) && !replica
        .lock()
        .expect("replica volume poisoned")
        .holds_flushes()
}

/// Applies a request to a replica. Writes, reads and copies of a few MiB
/// into the page cache take microseconds and run here; a FLUSH (which
/// syncs the data file) and any request that may release one (a write
/// completing a held FLUSH) go to a blocking thread.
pub async fn handle(
    replica: Arc<Mutex<ReplicaVolume>>,
    request: blockstore::replication::Request<blockstore::replication::wire::Blocks>,
) -> Result<Vec<blockstore::replication::Reply<blockstore::replication::wire::Blocks>>, String> {
    if quick(&replica, &request) {
        return replica
            .lock()
            .expect("replica volume poisoned")
            .handle(request)
            .map_err(|e| e.to_string());
    }
    tokio::task::spawn_blocking(move || {
        replica
            .lock()
            .expect("replica volume poisoned")
            .handle(request)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}
