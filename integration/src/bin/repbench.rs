//! Replication cost: the same vhost-user-blk workloads on volumes with 1,
//! 2 and 3 replicas of one 3-node Fabric cluster on loopback, in the same
//! run, alternating.
//!
//! The 1-replica volume is served from its node's local store (no
//! replication path); 2 and 3 replicas go through the replication driver,
//! with one replica local to the attaching node and the others over QUIC.
//! Before each measurement it waits for the nodes to go idle, so that no
//! workload pays for background work the one before it left.
//!
//! ```text
//! repbench [--runs 3] [--seconds 5] [--dir /var/tmp] [--page-cache] [--json FILE] [--resync-mib 256]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use integration::blk_workload::{self, CompletionMode, RunOptions, Workload, WorkloadReport};
use integration::cpu::wait_until_idle;
use integration::fabricd::{placement, start_cluster_with};
use integration::stats::Spread;
use integration::vhost_blk::{BlkClient, ClientConfig, Request, RequestType};

#[derive(Debug, Parser)]
struct Args {
    /// Measurements per volume and workload, alternating volumes.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Where the nodes keep their data (a real filesystem, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Write volume data through the page cache rather than O_DIRECT, to
    /// see the replication path without the disk.
    #[arg(long)]
    page_cache: bool,
    /// Also write every run's figures here, as JSON: {"r1": {workload:
    /// {measure: [runs]}}, "r2": ..., "r3": ...}.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the nodes' directories (logs, data) when done.
    #[arg(long)]
    keep: bool,
    /// MiB written while a replica is away, then resynced (per run).
    #[arg(long, default_value_t = 256)]
    resync_mib: u64,
    /// Internal: answer TCP pings on a listener inherited as stdin (the
    /// other process of the TCP round-trip measurement).
    #[arg(long, hide = true)]
    tcp_echo: bool,
}

/// One resync: how many 1 MiB regions were copied, how long the copying
/// took (first region copied to in sync), and how long from the
/// replica's restart to in sync.
#[derive(Debug)]
struct Resync {
    regions: u64,
    copy_seconds: f64,
    restart_seconds: f64,
}

/// Kills the second replica of the 2-replica volume, writes `mib` MiB
/// (sequential 1 MiB writes from offset 0), restarts it and times the
/// resync, polling the frontend's `volume show`.
fn resync(
    nodes: &mut [integration::fabricd::ClusterMember],
    socket: &str,
    placed: &[usize],
    mib: u64,
) -> Result<Resync> {
    let (front, away) = (placed[0], placed[1]);
    let dirty_of = |nodes: &[integration::fabricd::ClusterMember]| -> Result<(u64, bool)> {
        let shown = nodes[front].node.fabctl_json(&["volume", "show", "r2"])?;
        let r = &shown["replication"];
        let dirty = r["dirty_regions"][1].as_u64().context("dirty regions")?;
        let in_sync = r["states"] == serde_json::json!(["insync", "insync"]);
        Ok((dirty, in_sync))
    };
    // A FLUSH first: the frontend then knows exactly what the replica
    // misses (what is written while it is away), with no digest pass.
    let mut client = BlkClient::connect(socket, &ClientConfig::default())?;
    client.submit(&Request {
        kind: RequestType::Flush,
        sector: 0,
        data: &[],
        token: 1,
    })?;
    let mut done = Vec::new();
    while done.is_empty() {
        client.wait_completions(&mut done, Duration::from_secs(30))?;
    }
    anyhow::ensure!(done[0].is_ok(), "flush: {:?}", done[0]);
    nodes[away].node.kill9()?;
    blk_workload::prefill(
        &mut client,
        &RunOptions {
            duration: Duration::from_secs(60),
            span_bytes: mib << 20,
            completion: CompletionMode::Interrupt,
            seed: 7,
        },
    )?;
    drop(client);
    let (regions, _) = dirty_of(nodes)?;
    nodes[away].node.restart()?;
    let restarted = std::time::Instant::now();
    let mut first_copy = None;
    let deadline = restarted + Duration::from_secs(300);
    loop {
        let (dirty, in_sync) = dirty_of(nodes)?;
        let now = std::time::Instant::now();
        if dirty < regions && first_copy.is_none() {
            first_copy = Some(now);
        }
        if in_sync && dirty == 0 {
            return Ok(Resync {
                regions,
                copy_seconds: first_copy
                    .map_or(0.0, |first| now.duration_since(first).as_secs_f64()),
                restart_seconds: now.duration_since(restarted).as_secs_f64(),
            });
        }
        anyhow::ensure!(now < deadline, "no resync within 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn resync_markdown(mib: u64, resyncs: &[Resync]) -> String {
    let mut rates: Vec<f64> = resyncs
        .iter()
        .filter(|r| r.copy_seconds > 0.0)
        .map(|r| r.regions as f64 / r.copy_seconds)
        .collect();
    let mut totals: Vec<f64> = resyncs.iter().map(|r| r.restart_seconds).collect();
    let mut out = format!(
        "### Resync\n\n{mib} MiB written while one replica of the 2-replica volume was away (killed), then it was restarted; no rate limit.\n\n| measure | median (min–max) | runs |\n|---|---|---|\n"
    );
    if !rates.is_empty() {
        let (median, min, max) = spread(&mut rates);
        out.push_str(&format!(
            "| copy rate, MiB/s (first region copied to in sync) | {median:.0} ({min:.0}–{max:.0}) | {} |\n",
            rates.len()
        ));
    }
    let (median, min, max) = spread(&mut totals);
    out.push_str(&format!(
        "| restart to in sync, s | {median:.2} ({min:.2}–{max:.2}) | {} |\n",
        totals.len()
    ));
    out.push_str(&format!(
        "| regions copied per run | {} | |\n",
        resyncs
            .iter()
            .map(|r| r.regions.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out
}

/// Round trips timed per run: 4 KiB out, 4 bytes back, one at a time.
const ROUND_TRIPS: usize = 2000;

/// Median round-trip time of each run, µs.
#[derive(Debug, Default)]
struct RoundTrips {
    /// `fabctl node ping` from the 2-replica volume's frontend to its other
    /// replica: fabricd to fabricd over the cluster's QUIC connection.
    quic: Vec<f64>,
    /// TCP on loopback to a process of this program (TCP_NODELAY).
    tcp: Vec<f64>,
}

/// Answers TCP pings: one connection on the listener that is stdin, each
/// 4 KiB message answered with 4 bytes, until it closes.
fn tcp_echo() -> Result<()> {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    // SAFETY: the parent passes a listening socket as stdin and nothing
    // else in this process uses fd 0.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(0) };
    let (mut stream, _) = listener.accept()?;
    stream.set_nodelay(true)?;
    let mut message = vec![0u8; 4096];
    while stream.read_exact(&mut message).is_ok() {
        stream.write_all(&4096u32.to_le_bytes())?;
    }
    Ok(())
}

/// The median of `count` TCP round trips of the ping's shape, to another
/// process (this program with `--tcp-echo`), as QUIC's are fabricd to
/// fabricd.
fn tcp_round_trip_p50_us(count: usize) -> Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let mut echo = std::process::Command::new(std::env::current_exe()?)
        .arg("--tcp-echo")
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            listener,
        )))
        .spawn()
        .context("cannot start the TCP echo process")?;
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_nodelay(true)?;
    let message = vec![0x5au8; 4096];
    let mut answer = [0u8; 4];
    let mut times = Vec::with_capacity(count);
    for round in 0..=count {
        let start = std::time::Instant::now();
        stream.write_all(&message)?;
        stream.read_exact(&mut answer)?;
        if round > 0 {
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(stream);
    let status = echo.wait()?;
    anyhow::ensure!(status.success(), "the TCP echo process failed: {status}");
    Ok(spread(&mut times).0)
}

fn round_trip_markdown(results: &[Vec<Vec<WorkloadReport>>], trips: &mut RoundTrips) -> String {
    let (quic, quic_min, quic_max) = spread(&mut trips.quic);
    let (tcp, tcp_min, tcp_max) = spread(&mut trips.tcp);
    let qd1 = WORKLOADS
        .iter()
        .position(|w| *w == Workload::RandWrite4kQd1)
        .expect("QD1 is measured");
    let p50 = |replicas: usize| {
        let mut values: Vec<f64> = results[replicas - 1][qd1]
            .iter()
            .map(|r| r.latency_us_p50)
            .collect();
        spread(&mut values).0
    };
    let overhead = p50(2) - p50(1);
    format!(
        "### Round trips

Median of {ROUND_TRIPS} round trips per run (4 KiB out, 4 bytes back), median (min–max) over the runs.

| path | µs |
|---|---|
| QUIC, fabricd to fabricd (`fabctl node ping`) | {quic:.0} ({quic_min:.0}–{quic_max:.0}) |
| TCP, process to process (TCP_NODELAY) | {tcp:.0} ({tcp_min:.0}–{tcp_max:.0}) |

Replication overhead at QD1 (2-replica p50 less 1-replica p50): {overhead:.0} µs, {:.2} QUIC round trips.
",
        overhead / quic
    )
}

const WORKLOADS: [Workload; 3] = [
    Workload::RandWrite4kQd1,
    Workload::RandWrite4kQd32,
    Workload::SeqWrite1mQd4,
];
const SPAN_BYTES: u64 = 256 << 20;
/// The nodes count as idle below this share of one CPU (together), as
/// Ceph's daemons do in `integration/bench/ceph-rbd.sh`.
const IDLE_SHARE: f64 = 0.25;
/// Longest wait for the nodes to go idle before a measurement.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    let args = Args::parse();
    if args.tcp_echo {
        return tcp_echo();
    }
    let dir = tempfile::Builder::new()
        .prefix("repbench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("cannot make a directory in {}", args.dir.display()))?;
    // Kept from the start, so a failed run leaves its logs too.
    let dir = if args.keep {
        let kept = dir.keep();
        eprintln!("repbench: keeping {}", kept.display());
        Kept::Path(kept)
    } else {
        Kept::Temp(dir)
    };
    let mut nodes = start_cluster_with(
        dir.path(),
        3,
        &format!(
            "direct_io = {}\n[cluster]\nheartbeat_ms = 100\nsuspect_after_ms = 400\ndown_after_ms = 1200\n[replication]\nreplica_timeout_ms = 1000\nretry_ms = 100\nresync_bytes_per_second = 0\n",
            !args.page_cache
        ),
    )?;

    let mut sockets = Vec::new();
    let mut two_replicas = Vec::new();
    for replicas in 1..=3usize {
        let name = format!("r{replicas}");
        nodes[0].node.fabctl(&[
            "volume",
            "create",
            &name,
            "--size",
            "1G",
            "--replicas",
            &replicas.to_string(),
        ])?;
        // Attach where a replica is (for 1 replica: the creating node's
        // local volume).
        let on = if replicas == 1 {
            0
        } else {
            let placed = placement(&nodes[0].node, &name)?;
            if replicas == 2 {
                two_replicas = placed.clone();
            }
            *placed.first().context("a placement")?
        };
        let attached = nodes[on].node.fabctl_json(&["volume", "attach", &name])?;
        let socket = attached["socket"].as_str().context("a socket")?.to_owned();
        sockets.push(socket);
    }

    let options = RunOptions {
        duration: Duration::from_secs_f64(args.seconds),
        span_bytes: SPAN_BYTES,
        completion: CompletionMode::Interrupt,
        seed: 1,
    };
    // results[replicas - 1][workload] = reports of each run.
    let mut results: Vec<Vec<Vec<WorkloadReport>>> =
        vec![vec![Vec::new(); WORKLOADS.len()]; sockets.len()];
    let mut trips = RoundTrips::default();
    let pids: Vec<u32> = nodes
        .iter()
        .map(|member| member.node.pid().context("a running node"))
        .collect::<Result<_>>()?;
    let other_name = format!("n{}", two_replicas[1] + 1);
    for run in 0..args.runs {
        for (index, socket) in sockets.iter().enumerate() {
            let mut client = BlkClient::connect(socket, &ClientConfig::default())?;
            for (w, workload) in WORKLOADS.iter().enumerate() {
                // What the last workload left the nodes to do in the
                // background (flushing the block maps' metadata after 1
                // MiB writes, say) is done before the next is measured.
                let (waited, idle) = wait_until_idle(&pids, IDLE_SHARE, IDLE_TIMEOUT)?;
                if !idle {
                    eprintln!(
                        "repbench: the nodes were still busy after {waited:.1?}; measuring anyway"
                    );
                }
                let report = blk_workload::run(&mut client, *workload, &options)
                    .with_context(|| format!("{workload} on {} replicas", index + 1))?;
                results[index][w].push(report);
            }
            eprintln!(
                "repbench: run {} of {} on {} replicas done",
                run + 1,
                args.runs,
                index + 1
            );
        }
        let ping = nodes[two_replicas[0]].node.fabctl_json(&[
            "node",
            "ping",
            &other_name,
            "--count",
            &ROUND_TRIPS.to_string(),
        ])?;
        trips
            .quic
            .push(ping["p50_us"].as_f64().context("a ping median")?);
        trips.tcp.push(tcp_round_trip_p50_us(ROUND_TRIPS)?);
    }
    println!("{}", markdown(&args, &results));
    println!("{}", round_trip_markdown(&results, &mut trips));
    if let Some(path) = &args.json {
        let mut all = serde_json::Map::new();
        for (index, per_volume) in results.iter().enumerate() {
            let mut volume = serde_json::Map::new();
            for (w, workload) in WORKLOADS.iter().enumerate() {
                let mut figures = serde_json::Map::new();
                for (key, measure) in measures(*workload) {
                    let values: Vec<f64> = per_volume[w].iter().map(measure).collect();
                    figures.insert(key.to_owned(), serde_json::json!(values));
                }
                volume.insert(workload.to_string(), serde_json::Value::Object(figures));
            }
            all.insert(format!("r{}", index + 1), serde_json::Value::Object(volume));
        }
        all.insert(
            "round_trips".into(),
            serde_json::json!({ "quic_p50_us": trips.quic, "tcp_p50_us": trips.tcp }),
        );
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let resyncs = (0..args.runs)
        .map(|_| resync(&mut nodes, &sockets[1], &two_replicas, args.resync_mib))
        .collect::<Result<Vec<_>>>()?;
    println!("{}", resync_markdown(args.resync_mib, &resyncs));
    drop(nodes);
    drop(dir);
    Ok(())
}

/// The nodes' directory: removed when done, or kept (`--keep`).
enum Kept {
    Temp(tempfile::TempDir),
    Path(PathBuf),
}

impl Kept {
    fn path(&self) -> &std::path::Path {
        match self {
            Kept::Temp(dir) => dir.path(),
            Kept::Path(path) => path,
        }
    }
}

/// The figures reported for a workload: (JSON key, measure).
fn measures(workload: Workload) -> Vec<(&'static str, Measure)> {
    match workload {
        Workload::RandWrite4kQd1 => vec![
            ("p50_us", |r| r.latency_us_p50),
            ("p99_us", |r| r.latency_us_p99),
            ("iops", |r| r.iops),
        ],
        Workload::SeqWrite1mQd4 => vec![("mib_s", |r| r.mib_per_s)],
        _ => vec![("iops", |r| r.iops)],
    }
}

/// A figure taken from a report.
type Measure = fn(&WorkloadReport) -> f64;

/// Median, min and max (all 0 for no values).
fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    Spread::of(values.to_vec()).map_or((0.0, 0.0, 0.0), |s| (s.median, s.min, s.max))
}

fn markdown(args: &Args, results: &[Vec<Vec<WorkloadReport>>]) -> String {
    let mut out = format!(
        "## repbench: 1, 2 and 3 replicas on a 3-node loopback cluster\n\n- {} runs of {} s per volume and workload, alternating; 1 GiB volumes, {} MiB span\n\n",
        args.runs,
        args.seconds,
        SPAN_BYTES >> 20
    );
    out.push_str("| workload | measure | 1 replica | 2 replicas | 3 replicas | 2/1 | 3/1 |\n|---|---|---|---|---|---|---|\n");
    for (w, workload) in WORKLOADS.iter().enumerate() {
        for (key, measure) in measures(*workload) {
            let label = match key {
                "p50_us" => "p50 µs",
                "p99_us" => "p99 µs",
                "mib_s" => "MiB/s",
                _ => "IOPS",
            };
            let cells: Vec<(f64, f64, f64)> = results
                .iter()
                .map(|per_volume| {
                    let mut values: Vec<f64> = per_volume[w].iter().map(measure).collect();
                    spread(&mut values)
                })
                .collect();
            let cell =
                |(median, min, max): (f64, f64, f64)| format!("{median:.0} ({min:.0}–{max:.0})");
            out.push_str(&format!(
                "| {workload} | {label} | {} | {} | {} | {:.2} | {:.2} |\n",
                cell(cells[0]),
                cell(cells[1]),
                cell(cells[2]),
                cells[1].0 / cells[0].0,
                cells[2].0 / cells[0].0,
            ));
        }
    }
    out.push_str("\nCells: median (min–max) over the runs.\n");
    out
}
