//! Replication cost: the same vhost-user-blk workloads on volumes with 1,
//! 2 and 3 replicas of one 3-node Fabric cluster on loopback, in the same
//! run, alternating.
//!
//! The 1-replica volume is served from its node's local store (no
//! replication path); 2 and 3 replicas go through the replication driver,
//! with one replica local to the attaching node and the others over QUIC.
//!
//! ```text
//! repbench [--runs 3] [--seconds 5] [--dir /var/tmp] [--page-cache]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use integration::blk_workload::{self, CompletionMode, RunOptions, Workload, WorkloadReport};
use integration::fabricd::{placement, start_cluster_with};
use integration::vhost_blk::{BlkClient, ClientConfig};

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
    let nodes = start_cluster_with(
        dir.path(),
        3,
        &format!(
            "direct_io = {}\n[cluster]\nheartbeat_ms = 100\nsuspect_after_ms = 400\ndown_after_ms = 1200\n",
            !args.page_cache
        ),
    )?;

    let mut sockets = Vec::new();
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
            *placement(&nodes[0].node, &name)?
                .first()
                .context("a placement")?
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
    Ok(())
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
        let measures: Vec<(&str, Measure)> = match workload {
            Workload::RandWrite4kQd1 => vec![
                ("p50 µs", |r| r.latency_us_p50),
                ("p99 µs", |r| r.latency_us_p99),
            ],
            Workload::SeqWrite1mQd4 => vec![("MiB/s", |r| r.mib_per_s)],
            _ => vec![("IOPS", |r| r.iops)],
        };
        for (label, measure) in measures {
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
