//! A volume replicated to a local and a remote replica over real QUIC
//! (mutual TLS on loopback) and real stores: writes reach both; a
//! partitioned replica is marked stale and the writes go on; when it is
//! back it gets only the region it missed and is in sync again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockstore::replication::frontend::{
    Config, Failure, GuestOp, MetaOutcome, Outcome, Phase, ReplicaState,
};
use blockstore::replication::replica_volume::ReplicaVolume;
use blockstore::replication::wire::{Blocks, BLOCK_BYTES};
use blockstore::replication::{Header, Reply, Request};
use blockstore::{Store, StoreOptions};
use bytes::Bytes;

use super::driver::{spawn, MetaReply, MetaRequest, MetadataFn, ReplicaEndpoint};
use super::service::ReplicaService;
use crate::cluster::raft::Member;
use crate::cluster::tls::ClusterCa;
use crate::cluster::transport::{bind, QuicNetwork, KIND_REPLICATION};

const VOLUME_ID: u64 = 7;
const REGION_BLOCKS: u64 = 256;
const VOLUME_BLOCKS: u64 = 16 * REGION_BLOCKS;

fn store(dir: &std::path::Path) -> Arc<Store> {
    let store = Store::open(
        dir,
        StoreOptions {
            direct_io: false,
            commit_interval: None,
        },
    )
    .expect("store");
    store
        .create("v", VOLUME_BLOCKS * BLOCK_BYTES as u64)
        .expect("volume");
    Arc::new(store)
}

fn replica(store: &Arc<Store>, incarnation: u32) -> ReplicaVolume {
    let record = store.get("v").expect("record");
    let volume = store.volume("v").expect("open");
    let keeper = store.clone();
    ReplicaVolume::new(
        volume,
        record.replica_generation,
        incarnation,
        REGION_BLOCKS,
        Box::new(move |generation| keeper.set_replica_generation("v", generation).map(|_| ())),
    )
}

/// Serves replication streams on `endpoint` until it closes.
fn serve(endpoint: quinn::Endpoint, service: ReplicaService) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                let remote = connection.remote_address();
                while let Ok((send, mut recv)) = connection.accept_bi().await {
                    let service = service.clone();
                    tokio::spawn(async move {
                        let mut kind = [0u8; 1];
                        if recv.read_exact(&mut kind).await.is_ok() && kind[0] == KIND_REPLICATION {
                            service.serve_stream(send, recv, remote).await;
                        }
                    });
                }
            });
        }
    })
}

fn remote_service(store: &Arc<Store>, incarnation: u32) -> ReplicaService {
    let store = store.clone();
    ReplicaService::new(Arc::new(move |volume| {
        if volume == VOLUME_ID {
            Ok(replica(&store, incarnation))
        } else {
            Err(format!("no replica of volume {volume}"))
        }
    }))
}

fn pattern(blocks: usize, fill: u8) -> Blocks {
    Blocks::from_data(Bytes::from(vec![fill; blocks * BLOCK_BYTES]))
}

/// The bytes of a store's volume, read through a fresh replica session
/// with a generation above any the test uses.
fn contents(store: &Arc<Store>, lba: u64, blocks: u64) -> Vec<u8> {
    let mut reader = replica(store, 99);
    let Reply::Opened { session, .. } = reader
        .handle(Request::Open {
            generation: 1000,
            op: 1,
        })
        .expect("open")
        .remove(0)
    else {
        panic!("the reader opens");
    };
    let head = Header {
        generation: 1000,
        session,
        op: 2,
        done_below: 0,
    };
    match reader
        .handle(Request::Read { head, lba, blocks })
        .expect("read")
        .remove(0)
    {
        Reply::Data { data, .. } => data
            .iter()
            .flat_map(|block| block.map_or(vec![0; BLOCK_BYTES], |(_, bytes)| bytes.to_vec()))
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_replica_goes_stale_and_resyncs_only_what_it_missed() {
    let loopback: std::net::IpAddr = [127, 0, 0, 1].into();
    let ca = ClusterCa::generate("test").expect("CA");
    let identity = |name: &str| ca.issue(name, &[loopback]).expect("certificate");
    let frontend_endpoint =
        bind("127.0.0.1:0".parse().expect("address"), &identity("n1")).expect("bind n1");
    let remote_identity = identity("n2");
    let remote_endpoint =
        bind("127.0.0.1:0".parse().expect("address"), &remote_identity).expect("bind n2");
    let remote_address: SocketAddr = remote_endpoint.local_addr().expect("address");

    let dirs = [
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    ];
    let local_store = store(dirs[0].path());
    let remote_store = store(dirs[1].path());
    let server = serve(remote_endpoint.clone(), remote_service(&remote_store, 1));

    let changes: Arc<Mutex<Vec<MetaRequest>>> = Arc::default();
    let recorded = changes.clone();
    // While false, metadata changes do not commit (as when the cluster's
    // store cannot write): the frontend is told to try again.
    let committing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let commits = committing.clone();
    let metadata: MetadataFn = Arc::new(move |_generation, change| {
        let commits = commits.load(std::sync::atomic::Ordering::SeqCst);
        if commits {
            recorded.lock().expect("lock").push(change);
        }
        Box::pin(async move {
            if commits {
                MetaReply::Outcome(MetaOutcome::Committed)
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                MetaReply::Outcome(MetaOutcome::Retry)
            }
        })
    });
    let config = Config {
        volume_blocks: VOLUME_BLOCKS,
        region_blocks: REGION_BLOCKS,
        min_replicas: 1,
        replica_timeout: Duration::from_millis(500),
        io_timeout: Duration::from_secs(2),
        probe_interval: Duration::from_millis(200),
        resync_bytes_per_second: 0,
        replace_after: None,
    };
    let (driver, _task) = spawn(
        config,
        VOLUME_ID,
        1,
        vec![ReplicaState::InSync, ReplicaState::InSync],
        vec![
            ReplicaEndpoint::Local {
                node: 1,
                replica: Arc::new(Mutex::new(replica(&local_store, 1))),
            },
            ReplicaEndpoint::Remote {
                node: 2,
                member: Member {
                    name: "n2".into(),
                    address: remote_address.to_string(),
                },
            },
        ],
        QuicNetwork::new(frontend_endpoint.clone(), Arc::default()),
        metadata,
    );
    driver
        .wait_for(Duration::from_secs(10), |s| s.phase == Phase::Serving)
        .await
        .expect("serving");

    let write = |lba, blocks, fill| GuestOp::Write {
        lba,
        blocks,
        data: pattern(blocks as usize, fill),
    };
    assert_eq!(driver.submit(write(0, 64, 0xa1)).await, Outcome::Written);
    assert_eq!(driver.submit(GuestOp::Flush).await, Outcome::Flushed);
    match driver.submit(GuestOp::Read { lba: 0, blocks: 2 }).await {
        Outcome::Read(data) => assert!(data
            .iter()
            .all(|b| b.is_some_and(|(_, bytes)| bytes[0] == 0xa1))),
        other => panic!("{other:?}"),
    }

    // Cut the remote replica off: the write waits for it to be marked
    // stale, then completes on the local replica alone.
    server.abort();
    remote_endpoint.close(0u32.into(), b"partitioned");
    remote_endpoint.wait_idle().await;
    drop(remote_endpoint);
    let region = 4;
    assert_eq!(
        driver.submit(write(region * REGION_BLOCKS, 64, 0xb2)).await,
        Outcome::Written
    );
    assert!(changes
        .lock()
        .expect("lock")
        .contains(&MetaRequest::MarkStale { node: 2 }));
    assert_eq!(driver.status().states[1], ReplicaState::Stale);
    assert_eq!(
        driver.status().dirty[1],
        1,
        "only the region written meanwhile"
    );

    // Back (a restarted process: a new incarnation on the same address):
    // it gets the one region and is in sync again.
    let remote_endpoint = bind(remote_address, &remote_identity).expect("rebind n2");
    let _server = serve(remote_endpoint.clone(), remote_service(&remote_store, 2));
    driver
        .wait_for(Duration::from_secs(20), |s| {
            s.states == [ReplicaState::InSync, ReplicaState::InSync]
        })
        .await
        .expect("in sync again");
    assert!(changes
        .lock()
        .expect("lock")
        .contains(&MetaRequest::MarkInSync { node: 2 }));

    // Cut off again, and the metadata cannot record it: a write may not
    // complete without the replica, and fails with an error within the
    // I/O timeout instead of waiting for good.
    committing.store(false, std::sync::atomic::Ordering::SeqCst);
    let (old_server, old_endpoint) = (_server, remote_endpoint);
    old_server.abort();
    old_endpoint.close(0u32.into(), b"partitioned");
    old_endpoint.wait_idle().await;
    drop(old_endpoint);
    let late_region = 8;
    let failed = tokio::time::timeout(
        Duration::from_secs(30),
        driver.submit(write(late_region * REGION_BLOCKS, 64, 0xc3)),
    )
    .await
    .expect("the write ends, it does not wait for good");
    assert_eq!(failed, Outcome::Failed(Failure::Unavailable));

    // The metadata works again and the replica comes back: writes complete,
    // and the two copies agree on the failed write's blocks (whichever
    // data they hold).
    committing.store(true, std::sync::atomic::Ordering::SeqCst);
    let remote_endpoint = bind(remote_address, &remote_identity).expect("rebind n2");
    let _server = serve(remote_endpoint.clone(), remote_service(&remote_store, 3));
    assert_eq!(driver.submit(write(0, 8, 0xd4)).await, Outcome::Written);
    // (A replica being marked stale still shows as in sync: nothing left
    // to copy is what says it caught up.)
    driver
        .wait_for(Duration::from_secs(20), |s| {
            s.states == [ReplicaState::InSync, ReplicaState::InSync] && s.dirty == [0, 0]
        })
        .await
        .expect("in sync again");

    // Both stores hold every completed write (read last: reading opens
    // the stores with a higher generation, which fences the frontend).
    assert_eq!(driver.submit(GuestOp::Flush).await, Outcome::Flushed);
    for store in [&local_store, &remote_store] {
        assert!(contents(store, region * REGION_BLOCKS, 64)
            .iter()
            .all(|&b| b == 0xb2));
        assert!(contents(store, 8, 56).iter().all(|&b| b == 0xa1));
        assert!(contents(store, 0, 8).iter().all(|&b| b == 0xd4));
        assert!(contents(store, 64, 64).iter().all(|&b| b == 0));
    }
    let late = contents(&local_store, late_region * REGION_BLOCKS, 64);
    assert_eq!(
        contents(&remote_store, late_region * REGION_BLOCKS, 64),
        late,
        "the replicas differ where a write failed"
    );
    assert!(late.iter().all(|&b| b == 0xc3) || late.iter().all(|&b| b == 0));
}

#[test]
fn a_failure_repeated_is_said_once_with_what_went_unsaid() {
    let log = super::FailureLog::default();
    assert_eq!(log.say(1, "no space left on device"), Some(0));
    assert_eq!(log.say(1, "no space left on device"), None);
    // The same reason for another op is the same failure.
    assert_eq!(log.say(1, "no space left on device"), None);
    assert_eq!(log.say(3, "block 1 of op 17 fails its checksum"), Some(0));
    assert_eq!(log.say(3, "block 1 of op 18 fails its checksum"), None);
    // Another volume, or another reason, is said at once.
    assert_eq!(log.say(2, "no space left on device"), Some(0));
    assert_eq!(log.say(1, "checksum"), Some(2));
}
