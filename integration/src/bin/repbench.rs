//! Replication cost: the same vhost-user-blk workloads on volumes with 1,
//! 2 and 3 replicas of one 3-node Fabric cluster on loopback, in the same
//! run, alternating.
//!
//! The 1-replica volume is served from its node's local store (no
//! replication path); 2 and 3 replicas go through the replication driver,
//! with one replica local to the attaching node and the others over QUIC.
//!
//! ```text
//! repbench [--runs 3] [--seconds 5] [--dir /var/tmp] [--page-cache] [--json FILE] [--resync-mib 256]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use integration::blk_workload::{self, CompletionMode, RunOptions, Workload, WorkloadReport};
use integration::fabricd::{placement, start_cluster_with};
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

const WORKLOADS: [Workload; 3] = [
    Workload::RandWrite4kQd1,
    Workload::RandWrite4kQd32,
    Workload::SeqWrite1mQd4,
];
const SPAN_BYTES: u64 = 256 << 20;

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("repbench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("cannot make a directory in {}", args.dir.display()))?;
    if args.keep {
        eprintln!("repbench: keeping {}", dir.path().display());
    }
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
    for run in 0..args.runs {
        for (index, socket) in sockets.iter().enumerate() {
            let mut client = BlkClient::connect(socket, &ClientConfig::default())?;
            for (w, workload) in WORKLOADS.iter().enumerate() {
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
    }
    println!("{}", markdown(&args, &results));
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
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let resyncs = (0..args.runs)
        .map(|_| resync(&mut nodes, &sockets[1], &two_replicas, args.resync_mib))
        .collect::<Result<Vec<_>>>()?;
    println!("{}", resync_markdown(args.resync_mib, &resyncs));
    drop(nodes);
    if args.keep {
        let _ = dir.keep();
    }
    Ok(())
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

/// Median, min and max.
fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
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
