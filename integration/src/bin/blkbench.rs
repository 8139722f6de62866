//! `blkbench`: a vhost-user-blk benchmark and verification client that needs no VM.
//!
//! Run mode drives one backend socket:
//!
//! ```text
//! blkbench --socket /run/fabric/bench.sock --workload all --seconds 10 [--json]
//! blkbench --socket /run/fabric/bench.sock --workload verify --seconds 30 --span 256M
//! ```
//!
//! Compare mode starts Fabric (`fabricd` + `fabctl`, taken from the directory holding
//! `blkbench`, i.e. `${CARGO_TARGET_DIR:-target}/release`, or from `$FABRIC_BIN_DIR`) and
//! qemu-storage-daemon on the same filesystem, runs each workload several times on both,
//! alternating, and prints a markdown table with medians, spreads and ratios:
//!
//! ```text
//! blkbench compare --runs 5 --seconds 10 [--peer-only] [--dir /var/tmp]
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use integration::blk_workload::{
    self, CompletionMode, RunOptions, VerifyOptions, VerifyReport, Workload, WorkloadReport,
};
use integration::cpu::{clock_ticks_per_second, process_cpu_ticks};
use integration::fabricd::{self, Fabricd};
use integration::stats::Spread;
use integration::storage_daemon::QemuStorageDaemon;
use integration::vhost_blk::{BlkClient, ClientConfig, DATA_BYTES_DEFAULT, QUEUE_SIZE_DEFAULT};
use serde::Serialize;

/// Span of the short correctness check compare mode runs on each target before timing anything.
const COMPARE_VERIFY_SPAN_BYTES: u64 = 64 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "blkbench",
    version,
    about = "vhost-user-blk benchmark and verification client (no VM needed)",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Mode>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Start fabricd and qemu-storage-daemon side by side and compare them.
    Compare(CompareArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CompletionArg {
    /// Sleep on the call eventfd, as a guest waits for an interrupt.
    Interrupt,
    /// Spin on the used ring with interrupts suppressed.
    Poll,
}

impl From<CompletionArg> for CompletionMode {
    fn from(value: CompletionArg) -> Self {
        match value {
            CompletionArg::Interrupt => CompletionMode::Interrupt,
            CompletionArg::Poll => CompletionMode::Poll,
        }
    }
}

/// Settings shared by run and compare modes.
#[derive(Debug, Args)]
struct CommonArgs {
    /// Seconds per workload run (verify: no new pass starts after this; one pass always runs).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Bytes from the start of the device to address (K/M/G/T suffixes are powers of 1024);
    /// default 1 GiB or the capacity if smaller.
    #[arg(long, value_parser = parse_size)]
    span: Option<u64>,
    /// How completions are noticed.
    #[arg(long, value_enum, default_value_t = CompletionArg::Interrupt)]
    completion: CompletionArg,
    /// Seed of the random offsets and of the data pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Virtqueue size in descriptors (a power of two up to 1024).
    #[arg(long, default_value_t = QUEUE_SIZE_DEFAULT)]
    queue_size: u16,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The backend's vhost-user-blk socket.
    #[arg(long, required = true)]
    socket: Option<PathBuf>,
    /// Comma-separated workloads: randwrite-4k-qd1, randwrite-4k-qd32, randread-4k-qd1,
    /// randread-4k-qd32, seqwrite-1m-qd4, verify, or all (the five benchmarks, not verify).
    #[arg(long, default_value = "all")]
    workload: String,
    /// Do not write the span before the first random-read workload; reads then find whatever
    /// an earlier run left there (possibly holes, which some backends serve without I/O).
    #[arg(long)]
    no_prefill: bool,
    /// Requests in flight during verify.
    #[arg(long, default_value_t = blk_workload::VERIFY_QUEUE_DEPTH_DEFAULT)]
    verify_queue_depth: usize,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Directory on the filesystem under test; a fresh run directory holding the fabricd data
    /// directory and the qemu-storage-daemon raw file is created inside it.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Volume size for both targets (passed to `fabctl volume create --size` as given).
    #[arg(long, default_value = "2G")]
    size: String,
    /// Runs per workload and target.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Comma-separated benchmark workloads, or all.
    #[arg(long, default_value = "all")]
    workload: String,
    /// Run only the qemu-storage-daemon half.
    #[arg(long)]
    peer_only: bool,
    /// The qemu-storage-daemon program.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: String,
    /// Skip the short verify pass each target gets before timing starts.
    #[arg(long)]
    no_verify: bool,
    /// Keep the run directory (images, data, logs) afterwards.
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Mode::Compare(args)) => compare(&args),
        None => run(&cli.run),
    }
}

/// One item of a `--workload` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selected {
    Bench(Workload),
    Verify,
}

fn parse_workloads(list: &str, allow_verify: bool) -> Result<Vec<Selected>> {
    let mut selected = Vec::new();
    for name in list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        match name {
            "all" => selected.extend(Workload::ALL.map(Selected::Bench)),
            "verify" if allow_verify => selected.push(Selected::Verify),
            _ => match Workload::from_name(name) {
                Some(workload) => selected.push(Selected::Bench(workload)),
                None => bail!(
                    "unknown workload {name:?}; expected one of {}{}, all",
                    Workload::ALL.map(Workload::name).join(", "),
                    if allow_verify { ", verify" } else { "" }
                ),
            },
        }
    }
    ensure!(!selected.is_empty(), "no workload given");
    Ok(selected)
}

/// Parses byte counts such as `4096`, `64K`, `512M`, `2G`, `2GiB`, `1T`.
fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    let number = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &lower[number.len()..];
    let shift = match suffix {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("unknown size suffix in {text:?}")),
    };
    let value: u64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 4096, 64K, 512M or 2G"))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn duration_of(seconds: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(seconds)
        .with_context(|| format!("--seconds {seconds} is not a non-negative number of seconds"))
}

fn connect(socket: &Path, common: &CommonArgs) -> Result<BlkClient> {
    let config = ClientConfig {
        queue_size: common.queue_size,
        data_bytes: DATA_BYTES_DEFAULT,
    };
    BlkClient::connect(socket, &config).with_context(|| {
        format!(
            "cannot set up a vhost-user-blk client on {}",
            socket.display()
        )
    })
}

#[derive(Debug, Serialize)]
struct DeviceSummary {
    socket: PathBuf,
    capacity_bytes: u64,
    block_size: u32,
    acked_features: String,
    span_bytes: u64,
    queue_size: u16,
}

fn device_summary(socket: &Path, client: &BlkClient, span_bytes: u64) -> DeviceSummary {
    DeviceSummary {
        socket: socket.to_path_buf(),
        capacity_bytes: client.capacity_bytes(),
        block_size: client.block_size(),
        acked_features: format!("{:#x}", client.acked_features()),
        span_bytes,
        queue_size: client.queue_size(),
    }
}

#[derive(Debug, Serialize)]
struct RunOutput {
    device: DeviceSummary,
    prefill: Option<WorkloadReport>,
    results: Vec<WorkloadReport>,
    verify: Vec<VerifyReport>,
}

fn run(args: &RunArgs) -> Result<()> {
    let socket = args
        .socket
        .as_deref()
        .context("--socket is required unless a subcommand is given")?;
    let selected = parse_workloads(&args.workload, true)?;
    let common = &args.common;
    let duration = duration_of(common.seconds)?;
    let mut client = connect(socket, common)?;
    let span_bytes = blk_workload::effective_span(&client, common.span);
    let options = RunOptions {
        duration,
        span_bytes,
        completion: common.completion.into(),
        seed: common.seed,
    };
    let mut output = RunOutput {
        device: device_summary(socket, &client, span_bytes),
        prefill: None,
        results: Vec::new(),
        verify: Vec::new(),
    };
    if !common.json {
        print_device(&output.device);
    }
    let mut header_printed = common.json;
    let mut print_report = |report: &WorkloadReport| {
        if !header_printed {
            println!("{}", report_header());
            header_printed = true;
        }
        println!("{}", report_line(report));
    };
    for item in selected {
        match item {
            Selected::Bench(workload) => {
                if workload.is_read() && !args.no_prefill && output.prefill.is_none() {
                    let report = blk_workload::prefill(&mut client, &options)
                        .context("prefill of the span before random reads failed")?;
                    if !common.json {
                        print_report(&report);
                    }
                    output.prefill = Some(report);
                }
                let report = blk_workload::run(&mut client, workload, &options)
                    .with_context(|| format!("workload {workload} failed"))?;
                if !common.json {
                    print_report(&report);
                }
                output.results.push(report);
            }
            Selected::Verify => {
                let report = blk_workload::verify(
                    &mut client,
                    &VerifyOptions {
                        duration,
                        span_bytes,
                        completion: options.completion,
                        seed: common.seed,
                        queue_depth: args.verify_queue_depth,
                    },
                )
                .context("verify workload FAILED")?;
                if !common.json {
                    println!("{}", verify_line(&report));
                }
                output.verify.push(report);
            }
        }
    }
    if common.json {
        println!("{}", serde_json::to_string_pretty(&output)?);
    }
    Ok(())
}

fn print_device(device: &DeviceSummary) {
    println!(
        "device {}: {} bytes, {}-byte blocks, features {}, queue size {}, span {} bytes",
        device.socket.display(),
        device.capacity_bytes,
        device.block_size,
        device.acked_features,
        device.queue_size,
        device.span_bytes
    );
}

fn report_header() -> String {
    format!(
        "{:<18} {:>10} {:>8} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "workload", "ops", "seconds", "IOPS", "MiB/s", "p50 us", "p99 us", "p99.9 us", "max us"
    )
}

fn report_line(report: &WorkloadReport) -> String {
    format!(
        "{:<18} {:>10} {:>8.2} {:>11.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1}",
        report.workload,
        report.ops,
        report.seconds,
        report.iops,
        report.mib_per_s,
        report.latency_us_p50,
        report.latency_us_p99,
        report.latency_us_p999,
        report.latency_us_max
    )
}

fn verify_line(report: &VerifyReport) -> String {
    format!(
        "verify passed: run {:#x}, {} passes over {} bytes, {} blocks written, {} read back, {} flushes, {:.1} s",
        report.run_id,
        report.passes,
        report.span_bytes,
        report.blocks_written,
        report.blocks_read,
        report.flushes,
        report.seconds
    )
}

// ---------------------------------------------------------------------------------------------
// Compare mode
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct HostFacts {
    date: String,
    kernel: String,
    cpu: String,
    cpus: usize,
    directory: PathBuf,
    filesystem: String,
    qemu_storage_daemon: String,
    fabricd: Option<PathBuf>,
    command: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Target {
    Fabric,
    Qsd,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Fabric => "fabric",
            Self::Qsd => "qsd",
        }
    }
}

#[derive(Debug, Serialize)]
struct CompareRun {
    target: Target,
    run: usize,
    report: WorkloadReport,
    /// CPU time (user + system, all threads) the server process used during the run, in clock
    /// ticks (see `clock_ticks_per_second`); a few ticks make a coarse figure.
    server_cpu_ticks: u64,
    /// `server_cpu_ticks` in seconds.
    server_cpu_seconds: f64,
    /// `server_cpu_seconds` per completed request, in microseconds; absent if none completed.
    server_cpu_us_per_op: Option<f64>,
}

#[derive(Debug, Serialize)]
struct TargetSummary {
    iops: Spread,
    latency_us_p50: Spread,
    latency_us_p99: Spread,
    /// Server CPU time per completed request; absent if no run completed a request.
    server_cpu_us_per_op: Option<Spread>,
}

#[derive(Debug, Serialize)]
struct WorkloadSummary {
    workload: String,
    fabric: Option<TargetSummary>,
    qsd: Option<TargetSummary>,
}

#[derive(Debug, Serialize)]
struct CompareOutput {
    host: HostFacts,
    runs_per_workload: usize,
    seconds: f64,
    span_bytes: u64,
    completion: CompletionMode,
    queue_size: u16,
    /// Resolution of the server CPU times: `/proc/PID/stat` counts in these ticks.
    clock_ticks_per_second: u64,
    verify: Vec<(Target, VerifyReport)>,
    prefill: Vec<(Target, WorkloadReport)>,
    summary: Vec<WorkloadSummary>,
    runs: Vec<CompareRun>,
}

/// The run directory; removed on drop unless kept.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("blkbench: kept {}", self.path.display());
        } else if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!("blkbench: cannot remove {}: {error}", self.path.display());
        }
    }
}

fn compare(args: &CompareArgs) -> Result<()> {
    let workloads: Vec<Workload> = parse_workloads(&args.workload, false)?
        .into_iter()
        .filter_map(|item| match item {
            Selected::Bench(workload) => Some(workload),
            Selected::Verify => None,
        })
        .collect();
    ensure!(args.runs > 0, "--runs must be at least 1");
    let common = &args.common;
    let duration = duration_of(common.seconds)?;
    let size_bytes = parse_size(&args.size).map_err(anyhow::Error::msg)?;

    let run_dir = create_run_dir(&args.dir, args.keep)?;
    let work = run_dir.path.clone();
    let host = host_facts(
        &work,
        &args.qsd,
        (!args.peer_only).then(|| fabricd::bin_dir().join("fabricd")),
    );
    eprintln!("blkbench: working in {}", work.display());

    // Fabric first, so a missing fabricd fails before qemu-storage-daemon is started. Its data
    // directory (`work/data`) and the peer's raw file (`work/qsd.raw`) are siblings.
    let mut fabric = None;
    if !args.peer_only {
        let node = Fabricd::start(&work).context("cannot start fabricd")?;
        let socket = node
            .create_attached_volume("bench", &args.size)
            .context("cannot create and attach the bench volume")?;
        let socket = work.join(socket); // An absolute path replaces `work`.
        fabric = Some((node, socket));
    }
    let qsd = QemuStorageDaemon::start(
        &args.qsd,
        &work.join("qsd.raw"),
        size_bytes,
        &work.join("qsd.sock"),
        &work.join("qsd.log"),
    )
    .context("cannot start qemu-storage-daemon")?;

    let clock_ticks_per_second = clock_ticks_per_second()?;
    // Each target with the process id of its server, whose CPU time every timed run samples.
    let mut targets: Vec<(Target, u32, BlkClient)> = Vec::new();
    if let Some((node, socket)) = &fabric {
        let pid = node.pid().context("fabricd has no process id")?;
        targets.push((Target::Fabric, pid, connect(socket, common)?));
    }
    let qsd_pid = qsd.pid().context("qemu-storage-daemon has no process id")?;
    targets.push((Target::Qsd, qsd_pid, connect(qsd.socket(), common)?));

    let span_bytes = targets
        .iter()
        .map(|(_, _, client)| blk_workload::effective_span(client, common.span))
        .min()
        .unwrap_or(0);
    let options = RunOptions {
        duration,
        span_bytes,
        completion: common.completion.into(),
        seed: common.seed,
    };
    let mut output = CompareOutput {
        host,
        runs_per_workload: args.runs,
        seconds: common.seconds,
        span_bytes,
        completion: options.completion,
        queue_size: common.queue_size,
        clock_ticks_per_second,
        verify: Vec::new(),
        prefill: Vec::new(),
        summary: Vec::new(),
        runs: Vec::new(),
    };

    for (target, _, client) in &mut targets {
        if !args.no_verify {
            eprintln!("blkbench: verifying {}", target.name());
            let report = blk_workload::verify(
                client,
                &VerifyOptions {
                    duration: Duration::ZERO,
                    span_bytes: span_bytes.min(COMPARE_VERIFY_SPAN_BYTES),
                    completion: options.completion,
                    seed: common.seed,
                    queue_depth: blk_workload::VERIFY_QUEUE_DEPTH_DEFAULT,
                },
            )
            .with_context(|| format!("verify on {} FAILED", target.name()))?;
            output.verify.push((*target, report));
        }
        if workloads.iter().any(|workload| workload.is_read()) {
            eprintln!(
                "blkbench: prefilling {} bytes on {}",
                span_bytes,
                target.name()
            );
            let report = blk_workload::prefill(client, &options)
                .with_context(|| format!("prefill on {} failed", target.name()))?;
            output.prefill.push((*target, report));
        }
    }

    for workload in &workloads {
        for run in 0..args.runs {
            // Alternate which target goes first, so neither always runs on a cooler or warmer
            // machine.
            let order: Vec<usize> = if run % 2 == 0 {
                (0..targets.len()).collect()
            } else {
                (0..targets.len()).rev().collect()
            };
            for index in order {
                let (target, pid, client) = &mut targets[index];
                eprintln!(
                    "blkbench: {} run {}/{} on {}",
                    workload,
                    run + 1,
                    args.runs,
                    target.name()
                );
                let cpu_before = process_cpu_ticks(*pid)
                    .with_context(|| format!("cannot sample the CPU time of {}", target.name()))?;
                let report = blk_workload::run(client, *workload, &options)
                    .with_context(|| format!("{workload} on {} failed", target.name()))?;
                let cpu_after = process_cpu_ticks(*pid)
                    .with_context(|| format!("cannot sample the CPU time of {}", target.name()))?;
                // Tick counts only grow; saturate anyway rather than trust that blindly.
                let server_cpu_ticks = cpu_after.saturating_sub(cpu_before);
                let server_cpu_seconds = server_cpu_ticks as f64 / clock_ticks_per_second as f64;
                let server_cpu_us_per_op =
                    (report.ops > 0).then(|| server_cpu_seconds * 1e6 / report.ops as f64);
                output.runs.push(CompareRun {
                    target: *target,
                    run,
                    report,
                    server_cpu_ticks,
                    server_cpu_seconds,
                    server_cpu_us_per_op,
                });
            }
        }
        let summarize = |target: Target| {
            let runs: Vec<&CompareRun> = output
                .runs
                .iter()
                .filter(|run| run.target == target && run.report.workload == workload.name())
                .collect();
            let spread = |field: fn(&WorkloadReport) -> f64| {
                Spread::of(runs.iter().map(|run| field(&run.report)).collect())
            };
            Some(TargetSummary {
                iops: spread(|report| report.iops)?,
                latency_us_p50: spread(|report| report.latency_us_p50)?,
                latency_us_p99: spread(|report| report.latency_us_p99)?,
                server_cpu_us_per_op: Spread::of(
                    runs.iter()
                        .filter_map(|run| run.server_cpu_us_per_op)
                        .collect(),
                ),
            })
        };
        let summary = WorkloadSummary {
            workload: workload.name().to_string(),
            fabric: summarize(Target::Fabric),
            qsd: summarize(Target::Qsd),
        };
        output.summary.push(summary);
    }

    drop(targets);
    if let Err(error) = qsd.stop() {
        eprintln!("blkbench: stopping qemu-storage-daemon: {error}");
    }
    if let Some((mut node, _)) = fabric {
        // An unclean exit after a benchmark is a finding of its own; report it, keep the table.
        if let Err(error) = node.terminate() {
            eprintln!("blkbench: fabricd did not stop cleanly: {error:#}");
        }
    }

    if common.json {
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else {
        print!("{}", markdown(&output, args.peer_only));
    }
    drop(run_dir);
    Ok(())
}

fn create_run_dir(parent: &Path, keep: bool) -> Result<RunDir> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let path = parent.join(format!("blkbench-{stamp}-{}", std::process::id()));
    std::fs::create_dir_all(&path)
        .with_context(|| format!("cannot create the run directory {}", path.display()))?;
    Ok(RunDir { path, keep })
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn host_facts(dir: &Path, qsd: &str, fabricd: Option<PathBuf>) -> HostFacts {
    let dir_text = dir.display().to_string();
    let date =
        command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let filesystem = command_line(
        "findmnt",
        &["-n", "-o", "FSTYPE,SOURCE,OPTIONS", "--target", &dir_text],
    )
    .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
    .or_else(|| command_line("stat", &["-f", "-c", "%T", &dir_text]))
    .unwrap_or_else(|| "unknown".into());
    let qemu_storage_daemon = command_line(qsd, &["--version"])
        .and_then(|text| text.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    HostFacts {
        date,
        kernel,
        cpu,
        cpus,
        directory: dir.to_path_buf(),
        filesystem,
        qemu_storage_daemon,
        fabricd,
        command: std::env::args()
            .map(|arg| shell_quote(&arg))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Quotes `arg` for a POSIX shell, so the recorded command line can be pasted back as is.
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn markdown(output: &CompareOutput, peer_only: bool) -> String {
    let mut text = String::new();
    let host = &output.host;
    // Writing to a String cannot fail.
    let _ = writeln!(text, "## blkbench compare\n");
    let _ = writeln!(text, "- date: {}", host.date);
    let _ = writeln!(text, "- command: `{}`", host.command);
    let _ = writeln!(text, "- kernel: {}", host.kernel);
    let _ = writeln!(text, "- cpu: {} × {}", host.cpus, host.cpu);
    let _ = writeln!(
        text,
        "- directory: {} on {}",
        host.directory.display(),
        host.filesystem
    );
    let _ = writeln!(text, "- peer: {}", host.qemu_storage_daemon);
    if let Some(fabricd) = &host.fabricd {
        let _ = writeln!(text, "- fabricd: {}", fabricd.display());
    }
    let _ = writeln!(
        text,
        "- {} runs × {} s per workload and target, alternating; span {} MiB; completion {}; queue size {}",
        output.runs_per_workload,
        output.seconds,
        output.span_bytes >> 20,
        completion_name(output.completion),
        output.queue_size
    );
    for (target, report) in &output.verify {
        let _ = writeln!(
            text,
            "- verify on {}: passed ({} blocks written and read back)",
            target.name(),
            report.blocks_written
        );
    }
    for (target, report) in &output.prefill {
        let _ = writeln!(
            text,
            "- prefill on {}: {:.0} MiB/s",
            target.name(),
            report.mib_per_s
        );
    }
    let _ = writeln!(text, "\nCells are median (min–max) over the runs.\n");
    if peer_only {
        let _ = writeln!(
            text,
            "| workload | qsd IOPS | qsd p50 µs | qsd p99 µs | qsd CPU µs/op |"
        );
        let _ = writeln!(text, "|---|---|---|---|---|");
        for row in &output.summary {
            if let Some(qsd) = &row.qsd {
                let _ = writeln!(
                    text,
                    "| {} | {} | {} | {} | {} |",
                    row.workload,
                    cell(&qsd.iops, 0),
                    cell(&qsd.latency_us_p50, 1),
                    cell(&qsd.latency_us_p99, 1),
                    optional_cell(qsd.server_cpu_us_per_op.as_ref(), 1)
                );
            }
        }
    } else {
        let _ = writeln!(
            text,
            "| workload | fabric IOPS | qsd IOPS | IOPS fabric/qsd | fabric p50 µs | qsd p50 µs | p50 fabric/qsd | fabric p99 µs | qsd p99 µs | p99 fabric/qsd | fabric CPU µs/op | qsd CPU µs/op | CPU/op fabric/qsd |"
        );
        let _ = writeln!(
            text,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for row in &output.summary {
            let (Some(fabric), Some(qsd)) = (&row.fabric, &row.qsd) else {
                continue;
            };
            let _ = writeln!(
                text,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.workload,
                cell(&fabric.iops, 0),
                cell(&qsd.iops, 0),
                ratio(&fabric.iops, &qsd.iops),
                cell(&fabric.latency_us_p50, 1),
                cell(&qsd.latency_us_p50, 1),
                ratio(&fabric.latency_us_p50, &qsd.latency_us_p50),
                cell(&fabric.latency_us_p99, 1),
                cell(&qsd.latency_us_p99, 1),
                ratio(&fabric.latency_us_p99, &qsd.latency_us_p99),
                optional_cell(fabric.server_cpu_us_per_op.as_ref(), 1),
                optional_cell(qsd.server_cpu_us_per_op.as_ref(), 1),
                match (&fabric.server_cpu_us_per_op, &qsd.server_cpu_us_per_op) {
                    (Some(fabric), Some(qsd)) => ratio(fabric, qsd),
                    _ => "n/a".to_string(),
                }
            );
        }
    }
    let _ = writeln!(
        text,
        "\nCPU µs/op: CPU time (user + system, all threads) of the server process during the run, divided by the requests it completed ({} ticks/s from /proc/PID/stat); lower is better.",
        output.clock_ticks_per_second
    );
    text
}

fn completion_name(completion: CompletionMode) -> &'static str {
    match completion {
        CompletionMode::Interrupt => "interrupt",
        CompletionMode::Poll => "poll",
    }
}

fn cell(spread: &Spread, decimals: usize) -> String {
    format!(
        "{:.*} ({:.*}–{:.*})",
        decimals, spread.median, decimals, spread.min, decimals, spread.max
    )
}

fn optional_cell(spread: Option<&Spread>, decimals: usize) -> String {
    spread.map_or_else(|| "n/a".to_string(), |spread| cell(spread, decimals))
}

fn ratio(fabric: &Spread, qsd: &Spread) -> String {
    if qsd.median > 0.0 {
        format!("{:.2}", fabric.median / qsd.median)
    } else {
        "n/a".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("G").is_err());
    }

    #[test]
    fn workload_lists_expand_all() {
        let all = parse_workloads("all", true).expect("all parses");
        assert_eq!(all.len(), Workload::ALL.len());
        assert_eq!(
            parse_workloads("randread-4k-qd1,verify", true).expect("list parses"),
            vec![Selected::Bench(Workload::RandRead4kQd1), Selected::Verify]
        );
        assert!(parse_workloads("verify", false).is_err());
        assert!(parse_workloads("randread", true).is_err());
    }

    #[test]
    fn command_lines_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("--dir=/var/tmp"), "--dir=/var/tmp");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn cli_accepts_both_modes() {
        Cli::try_parse_from([
            "blkbench",
            "--socket",
            "/tmp/s",
            "--workload",
            "all",
            "--seconds",
            "1",
            "--json",
        ])
        .expect("run mode parses");
        Cli::try_parse_from(["blkbench", "compare", "--peer-only", "--runs", "3"])
            .expect("compare mode parses");
        assert!(Cli::try_parse_from(["blkbench", "--workload", "all"]).is_err());
    }
}
