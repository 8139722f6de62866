//! The replica side: replication streams from frontends, applied to this
//! node's replica volumes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use blockstore::replication::replica_volume::ReplicaVolume;
use blockstore::replication::wire::{decode_request, encode_reply};

use bytes::Bytes;

use super::read_frame;

/// Finds (or creates) this node's replica of the volume with a cluster id.
pub type Resolve = Arc<dyn Fn(u64) -> Result<ReplicaVolume, String> + Send + Sync>;

/// This node's replicas, shared by every stream that reaches them.
#[derive(Clone)]
pub struct ReplicaService {
    resolve: Resolve,
    replicas: Arc<Mutex<HashMap<u64, Arc<Mutex<ReplicaVolume>>>>>,
    failures: Arc<super::FailureLog>,
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
            failures: Arc::default(),
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

    /// Runs `delete` holding the replica table, so no stream opens this
    /// node's replica of `volume` meanwhile, and forgets the replica if
    /// `delete` says it deleted it.
    pub fn retire<E>(
        &self,
        volume: u64,
        delete: impl FnOnce() -> Result<bool, E>,
    ) -> Result<bool, E> {
        let mut replicas = self.replicas.lock().expect("replica table poisoned");
        let deleted = delete()?;
        if deleted {
            replicas.remove(&volume);
        }
        Ok(deleted)
    }

    /// Serves one replication stream until the frontend closes it. A frame
    /// that does not decode or names a volume this node has no replica of
    /// ends the stream with a logged reason; one that cannot be applied is
    /// answered `NotOpen` (for a write, copy or flush the replica ended
    /// its session). Either way the frontend treats the replica as failed.
    pub async fn serve_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        remote: SocketAddr,
    ) {
        // Replies go out from their own task, every reply ready at once in
        // one write, so applying the next request never waits on the
        // network.
        let (replies_tx, mut replies_rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let writer = tokio::spawn(async move {
            let mut chunks = Vec::new();
            while let Some(frame) = replies_rx.recv().await {
                chunks.clear();
                push_frame(&mut chunks, frame);
                while chunks.len() < 2 * BATCH_FRAMES_MAX {
                    match replies_rx.try_recv() {
                        Ok(frame) => push_frame(&mut chunks, frame),
                        Err(_) => break,
                    }
                }
                if let Err(error) = send.write_all_chunks(&mut chunks).await {
                    tracing::warn!(%remote, %error, "cannot answer on a replication stream");
                    return send;
                }
            }
            let _ = send.finish();
            send
        });
        let refused = loop {
            let frame = match read_frame(&mut recv).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break None,
                Err(error) => break Some(error.to_string()),
            };
            let (volume, request) = match decode_request(frame) {
                Ok(decoded) => decoded,
                Err(error) => break Some(error.to_string()),
            };
            let replica = match self.replica(volume) {
                Ok(replica) => replica,
                Err(reason) => break Some(reason),
            };
            let op = request.head().map(|head| head.op);
            let replies = match (handle(replica, request).await, op) {
                (Ok(replies), _) => replies,
                // The replica could not apply it (a full disk, say) and
                // ended its session: the frontend is told, fails this
                // replica at once and opens a new session.
                (Err(error), Some(op)) => {
                    if let Some(unsaid) = self.failures.say(volume, &error) {
                        tracing::warn!(%remote, volume, %error, earlier_unlogged = unsaid, "a replica failed a request");
                    }
                    vec![blockstore::replication::Reply::NotOpen { op }]
                }
                (Err(error), None) => break Some(error),
            };
            let sent = replies
                .iter()
                .all(|reply| replies_tx.send(encode_reply(volume, reply)).is_ok());
            if !sent {
                // The writer stopped: the stream is broken.
                break None;
            }
        };
        drop(replies_tx);
        if let Ok(mut send) = writer.await {
            if let Some(reason) = refused {
                tracing::warn!(%remote, %reason, "closed a replication stream");
                let _ = send.reset(1u32.into());
            }
        }
    }
}

/// Most frames written at once.
pub const BATCH_FRAMES_MAX: usize = 64;

/// Adds a frame, with its length prefix, to a batch of chunks to write.
pub fn push_frame(chunks: &mut Vec<Bytes>, frame: Bytes) {
    let length = u32::try_from(frame.len()).expect("frames are bounded");
    chunks.push(Bytes::copy_from_slice(&length.to_le_bytes()));
    chunks.push(frame);
}

/// Applies a request to a replica. Writes, reads and copies of a few MiB
/// into the page cache take microseconds and run here, if the replica is
/// free; a FLUSH (which syncs the data file), a scrub's VERIFY (which reads
/// a whole region), any request that may release a held FLUSH, and any
/// request while another holds the replica go to a blocking thread, so an
/// async worker never waits on a sync.
pub async fn handle(
    replica: Arc<Mutex<ReplicaVolume>>,
    request: blockstore::replication::Request<blockstore::replication::wire::Blocks>,
) -> Result<Vec<blockstore::replication::Reply<blockstore::replication::wire::Blocks>>, String> {
    use blockstore::replication::Request;
    let slow = matches!(request, Request::Flush { .. } | Request::Verify { .. });
    if !slow {
        if let Ok(mut guard) = replica.try_lock() {
            if !guard.holds_flushes() {
                return guard.handle(request).map_err(|e| e.to_string());
            }
        }
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
