//! Benchmark and verification workloads driven through a [`BlkClient`].
//!
//! Each benchmark workload keeps a fixed number of requests in flight for a fixed time and
//! records the latency of every completion in a [`LatencyHistogram`]. The verify workload writes
//! blocks that describe themselves (offset, version, run, checksum), flushes, reads every block
//! back and fails on the first pass with any mismatch.
//!
//! Random reads need data behind them: [`prefill`] writes the whole span once with sequential
//! 1 MiB writes. `blkbench` runs it before the first random-read workload of a process (unless
//! told not to), and the comparison mode runs it once per target before any timed run.

use std::fmt;
use std::time::{Duration, Instant};

use crate::latency::LatencyHistogram;
use crate::vhost_blk::{self, BlkClient, Buffer, Completion, Request, RequestType, Status};

/// Span of the device the workloads address unless told otherwise (capped at the capacity).
pub const SPAN_BYTES_DEFAULT: u64 = 1 << 30;
/// Longest wait for any completion while requests are in flight before a backend counts as stuck.
pub const COMPLETION_WAIT_MAX: Duration = Duration::from_secs(30);
/// Request size of [`prefill`].
pub const PREFILL_BLOCK_BYTES: u32 = 1 << 20;
/// Requests in flight during [`prefill`].
pub const PREFILL_QUEUE_DEPTH: usize = 4;
/// Block size of the verify workload.
pub const VERIFY_BLOCK_BYTES: u32 = 4096;
/// Requests in flight during the verify workload unless told otherwise.
pub const VERIFY_QUEUE_DEPTH_DEFAULT: usize = 32;
/// Mismatches described in a verification failure; the rest are only counted.
pub const VERIFY_MISMATCHES_REPORTED_MAX: usize = 16;

const VERIFY_MAGIC: u64 = u64::from_le_bytes(*b"FABVRFY1");
const SECTOR_BYTES: u64 = vhost_blk::SECTOR_BYTES;

/// The timed benchmark workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    RandWrite4kQd1,
    RandWrite4kQd32,
    RandRead4kQd1,
    RandRead4kQd32,
    SeqWrite1mQd4,
}

impl Workload {
    /// Every benchmark workload, in the order `all` runs them: writes first, so the span holds
    /// data when the reads start.
    pub const ALL: [Workload; 5] = [
        Workload::RandWrite4kQd1,
        Workload::RandWrite4kQd32,
        Workload::RandRead4kQd1,
        Workload::RandRead4kQd32,
        Workload::SeqWrite1mQd4,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::RandWrite4kQd1 => "randwrite-4k-qd1",
            Self::RandWrite4kQd32 => "randwrite-4k-qd32",
            Self::RandRead4kQd1 => "randread-4k-qd1",
            Self::RandRead4kQd32 => "randread-4k-qd32",
            Self::SeqWrite1mQd4 => "seqwrite-1m-qd4",
        }
    }

    /// The workload called `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|workload| workload.name() == name)
    }

    /// Bytes per request.
    pub fn block_bytes(self) -> u32 {
        match self {
            Self::SeqWrite1mQd4 => 1 << 20,
            _ => 4096,
        }
    }

    /// Requests kept in flight.
    pub fn queue_depth(self) -> usize {
        match self {
            Self::RandWrite4kQd1 | Self::RandRead4kQd1 => 1,
            Self::RandWrite4kQd32 | Self::RandRead4kQd32 => 32,
            Self::SeqWrite1mQd4 => 4,
        }
    }

    /// Whether the workload reads (and so wants a prefilled span).
    pub fn is_read(self) -> bool {
        matches!(self, Self::RandRead4kQd1 | Self::RandRead4kQd32)
    }

    fn is_random(self) -> bool {
        !matches!(self, Self::SeqWrite1mQd4)
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How completions are noticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompletionMode {
    /// Sleep on the call eventfd, as a guest waits for an interrupt.
    Interrupt,
    /// Spin on the used ring with interrupts suppressed, as a polling driver does.
    Poll,
}

/// Settings shared by the benchmark workloads.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// How long to keep submitting; requests in flight at the end are waited for and counted.
    pub duration: Duration,
    /// Bytes from the start of the device that requests address.
    pub span_bytes: u64,
    pub completion: CompletionMode,
    /// Seed of the random offsets and of the data written.
    pub seed: u64,
}

/// Figures of one workload run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct WorkloadReport {
    pub workload: String,
    pub block_bytes: u32,
    pub queue_depth: usize,
    pub span_bytes: u64,
    pub completion: CompletionMode,
    pub ops: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mib_per_s: f64,
    pub latency_us_mean: f64,
    pub latency_us_p50: f64,
    pub latency_us_p99: f64,
    pub latency_us_p999: f64,
    pub latency_us_max: f64,
}

impl WorkloadReport {
    fn new(
        workload: &str,
        block_bytes: u32,
        queue_depth: usize,
        options: &RunOptions,
        ops: u64,
        elapsed: Duration,
        histogram: &LatencyHistogram,
    ) -> Self {
        let seconds = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            workload: workload.to_string(),
            block_bytes,
            queue_depth,
            span_bytes: options.span_bytes,
            completion: options.completion,
            ops,
            seconds,
            iops: ops as f64 / seconds,
            mib_per_s: ops as f64 * f64::from(block_bytes) / seconds / f64::from(1u32 << 20),
            latency_us_mean: us(histogram.mean_ns()),
            latency_us_p50: us(histogram.quantile_ns(0.5)),
            latency_us_p99: us(histogram.quantile_ns(0.99)),
            latency_us_p999: us(histogram.quantile_ns(0.999)),
            latency_us_max: us(histogram.max_ns()),
        }
    }
}

/// Settings of the verify workload.
#[derive(Clone, Copy, Debug)]
pub struct VerifyOptions {
    /// No new pass starts after this much time; the first pass always runs to the end.
    pub duration: Duration,
    pub span_bytes: u64,
    pub completion: CompletionMode,
    /// Seed of the write order. The run identifier written into blocks does not depend on it,
    /// so data left by an earlier run never passes for this one's.
    pub seed: u64,
    pub queue_depth: usize,
}

/// Figures of a verify run that found no mismatch.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VerifyReport {
    pub workload: String,
    pub run_id: u64,
    pub span_bytes: u64,
    pub passes: u32,
    pub blocks_written: u64,
    pub blocks_read: u64,
    pub flushes: u64,
    pub seconds: f64,
}

/// What was wrong with one block read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MismatchKind {
    /// The block reads as zeroes: the write was lost.
    Zeroes,
    /// The block does not start with the verify magic.
    Magic { found: u64 },
    /// The checksum does not match the contents: torn or corrupted data.
    Checksum { stored: u32, computed: u32 },
    /// The block belongs to another offset: a misdirected write or read.
    Offset { found: u64 },
    /// The block was written by another verify run.
    Run { found: u64 },
    /// The block holds another version: a lost or reordered write.
    Version { found: u64 },
}

impl fmt::Display for MismatchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zeroes => write!(f, "block is all zeroes"),
            Self::Magic { found } => write!(f, "no verify magic (found {found:#018x})"),
            Self::Checksum { stored, computed } => {
                write!(
                    f,
                    "checksum {stored:#010x} stored, {computed:#010x} computed"
                )
            }
            Self::Offset { found } => write!(f, "block belongs to offset {found:#x}"),
            Self::Run { found } => write!(f, "block written by run {found:#x}"),
            Self::Version { found } => write!(f, "block holds version {found}"),
        }
    }
}

/// One block that did not read back as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub offset: u64,
    pub expected_version: u64,
    pub kind: MismatchKind,
}

/// The mismatches of a failed verify pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyFailure {
    pub run_id: u64,
    pub pass: u32,
    pub mismatches: u64,
    /// The first [`VERIFY_MISMATCHES_REPORTED_MAX`] mismatches.
    pub details: Vec<Mismatch>,
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} blocks did not read back as written in pass {} of run {:#x}",
            self.mismatches, self.pass, self.run_id
        )?;
        for mismatch in &self.details {
            write!(
                f,
                "\n  offset {:#x} (expected version {}): {}",
                mismatch.offset, mismatch.expected_version, mismatch.kind
            )?;
        }
        if self.mismatches > self.details.len() as u64 {
            write!(f, "\n  ...")?;
        }
        Ok(())
    }
}

/// Errors of the workloads.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Client(#[from] vhost_blk::Error),
    /// The device answered a request with an error status.
    #[error("{operation} at sector {sector} completed with status {status:?}")]
    RequestFailed {
        operation: &'static str,
        sector: u64,
        status: Option<Status>,
    },
    /// No completion arrived in [`COMPLETION_WAIT_MAX`].
    #[error(
        "no completion in {waited:?} with {in_flight} requests in flight; the backend is stuck"
    )]
    Stalled { waited: Duration, in_flight: usize },
    /// The span holds no whole block.
    #[error("a span of {span_bytes} bytes holds no {block_bytes}-byte block (device capacity {capacity_bytes} bytes)")]
    Span {
        span_bytes: u64,
        block_bytes: u32,
        capacity_bytes: u64,
    },
    /// The block size is not a multiple of the device's logical block size.
    #[error(
        "{block_bytes}-byte requests do not fit the device's {device_block_bytes}-byte blocks"
    )]
    BlockSize {
        block_bytes: u32,
        device_block_bytes: u32,
    },
    /// The client's data area cannot hold the buffers of every request in flight.
    #[error("the data area of {have} bytes cannot hold {need} bytes of buffers; raise data_bytes")]
    DataArea { have: u64, need: u64 },
    /// The queue depth is zero or above [`vhost_blk::QUEUE_DEPTH_MAX`].
    #[error(
        "queue depth {queue_depth} is not in 1..={}",
        vhost_blk::QUEUE_DEPTH_MAX
    )]
    QueueDepth { queue_depth: usize },
    /// Writes were asked of a read-only device.
    #[error("the device is read-only")]
    ReadOnly,
    /// Data read back differs from what was written.
    #[error("verification failed: {0}")]
    Verify(VerifyFailure),
}

/// Result of workloads.
pub type Result<T> = std::result::Result<T, WorkloadError>;

/// The span the workloads address: `requested` (default [`SPAN_BYTES_DEFAULT`]) capped at the
/// capacity and rounded down to 1 MiB, so every workload's block size divides it.
pub fn effective_span(client: &BlkClient, requested: Option<u64>) -> u64 {
    let span = requested
        .unwrap_or(SPAN_BYTES_DEFAULT)
        .min(client.capacity_bytes());
    let rounded = span / u64::from(PREFILL_BLOCK_BYTES) * u64::from(PREFILL_BLOCK_BYTES);
    if rounded == 0 {
        // Devices under 1 MiB: keep 4 KiB alignment instead.
        span / 4096 * 4096
    } else {
        rounded
    }
}

/// Runs one benchmark workload for `options.duration`.
pub fn run(
    client: &mut BlkClient,
    workload: Workload,
    options: &RunOptions,
) -> Result<WorkloadReport> {
    let block_bytes = workload.block_bytes();
    let blocks = blocks_in_span(client, options.span_bytes, block_bytes)?;
    let queue_depth = workload.queue_depth();
    let kind = if workload.is_read() {
        RequestType::In
    } else {
        RequestType::Out
    };
    if kind == RequestType::Out && client.is_read_only() {
        return Err(WorkloadError::ReadOnly);
    }
    fill_random(client, queue_depth, block_bytes, options.seed)?;
    let sectors_per_block = u64::from(block_bytes) / SECTOR_BYTES;
    let mut rng = Rng::new(options.seed ^ 0x5eed_0f0f_f5e7);
    let mut next_block = 0u64;
    let random = workload.is_random();
    let mut histogram = LatencyHistogram::new();
    let (ops, elapsed) = drive(
        client,
        &Drive {
            queue_depth,
            block_bytes,
            completion: options.completion,
            deadline: Some(Instant::now() + options.duration),
            operation: workload.name(),
        },
        &mut histogram,
        |_, _, _| {
            let block = if random {
                rng.below(blocks)
            } else {
                let block = next_block;
                next_block = (next_block + 1) % blocks;
                block
            };
            Ok(Some((kind, block * sectors_per_block)))
        },
        |_, _, _| Ok(()),
    )?;
    Ok(WorkloadReport::new(
        workload.name(),
        block_bytes,
        queue_depth,
        options,
        ops,
        elapsed,
        &histogram,
    ))
}

/// Writes the whole span once with sequential 1 MiB writes, so random reads find data.
pub fn prefill(client: &mut BlkClient, options: &RunOptions) -> Result<WorkloadReport> {
    if client.is_read_only() {
        return Err(WorkloadError::ReadOnly);
    }
    let block_bytes =
        PREFILL_BLOCK_BYTES.min(u32::try_from(options.span_bytes).unwrap_or(u32::MAX));
    let block_bytes = (block_bytes / 4096).max(1) * 4096;
    let blocks = blocks_in_span(client, options.span_bytes, block_bytes)?;
    fill_random(client, PREFILL_QUEUE_DEPTH, block_bytes, options.seed)?;
    let sectors_per_block = u64::from(block_bytes) / SECTOR_BYTES;
    let mut next_block = 0u64;
    let mut histogram = LatencyHistogram::new();
    let (ops, elapsed) = drive(
        client,
        &Drive {
            queue_depth: PREFILL_QUEUE_DEPTH,
            block_bytes,
            completion: options.completion,
            deadline: None,
            operation: "prefill",
        },
        &mut histogram,
        |_, _, _| {
            if next_block == blocks {
                return Ok(None);
            }
            let sector = next_block * sectors_per_block;
            next_block += 1;
            Ok(Some((RequestType::Out, sector)))
        },
        |_, _, _| Ok(()),
    )?;
    flush(client, options.completion)?;
    Ok(WorkloadReport::new(
        "prefill",
        block_bytes,
        PREFILL_QUEUE_DEPTH,
        options,
        ops,
        elapsed,
        &histogram,
    ))
}

/// Writes self-describing blocks, flushes, reads everything back and checks it, pass after
/// pass until `options.duration` has passed. Pass 1 writes every block of the span; later passes
/// rewrite a random half with a new version, so stale data shows up as a version mismatch.
pub fn verify(client: &mut BlkClient, options: &VerifyOptions) -> Result<VerifyReport> {
    if client.is_read_only() {
        return Err(WorkloadError::ReadOnly);
    }
    if options.queue_depth == 0 || options.queue_depth > vhost_blk::QUEUE_DEPTH_MAX {
        return Err(WorkloadError::QueueDepth {
            queue_depth: options.queue_depth,
        });
    }
    let block_bytes = VERIFY_BLOCK_BYTES;
    let blocks = blocks_in_span(client, options.span_bytes, block_bytes)?;
    let blocks_len = usize::try_from(blocks).unwrap_or(usize::MAX);
    let run_id = run_id();
    let sectors_per_block = u64::from(block_bytes) / SECTOR_BYTES;
    let mut versions = vec![0u64; blocks_len];
    let mut order: Vec<u64> = (0..blocks).collect();
    let mut rng = Rng::new(options.seed);
    let mut block = vec![0u8; block_bytes as usize];
    let started = Instant::now();
    let deadline = started + options.duration;
    let mut report = VerifyReport {
        workload: "verify".to_string(),
        run_id,
        span_bytes: options.span_bytes,
        passes: 0,
        blocks_written: 0,
        blocks_read: 0,
        flushes: 0,
        seconds: 0.0,
    };
    let mut histogram = LatencyHistogram::new();
    let mut pass = 0u32;
    while pass == 0 || Instant::now() < deadline {
        pass += 1;
        let version = u64::from(pass);
        rng.shuffle(&mut order);
        let count = if pass == 1 {
            blocks_len
        } else {
            (blocks_len / 2).max(1)
        };

        // Write pass: the block content is generated into the request's buffer at submission.
        let mut cursor = 0usize;
        let (written, _) = drive(
            client,
            &Drive {
                queue_depth: options.queue_depth,
                block_bytes,
                completion: options.completion,
                deadline: None,
                operation: "verify write",
            },
            &mut histogram,
            |client, buffer, _| {
                let Some(index) = order[..count].get(cursor) else {
                    return Ok(None);
                };
                cursor += 1;
                let offset = index * u64::from(block_bytes);
                encode_block(&mut block, offset, version, run_id);
                client.write_data(buffer, &block)?;
                Ok(Some((RequestType::Out, index * sectors_per_block)))
            },
            |_, _, sector| {
                versions[(sector / sectors_per_block) as usize] = version;
                Ok(())
            },
        )?;
        report.blocks_written += written;
        if client.has_feature(virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH) {
            flush(client, options.completion)?;
            report.flushes += 1;
        }

        // Read pass over every block, in order, checked as each completes.
        let mut next = 0u64;
        let mut failure = VerifyFailure {
            run_id,
            pass,
            mismatches: 0,
            details: Vec::new(),
        };
        let (read, _) = drive(
            client,
            &Drive {
                queue_depth: options.queue_depth,
                block_bytes,
                completion: options.completion,
                deadline: None,
                operation: "verify read",
            },
            &mut histogram,
            |_, _, _| {
                if next == blocks {
                    return Ok(None);
                }
                let sector = next * sectors_per_block;
                next += 1;
                Ok(Some((RequestType::In, sector)))
            },
            |client, buffer, sector| {
                client.read_data(buffer, &mut block)?;
                let index = sector / sectors_per_block;
                let offset = index * u64::from(block_bytes);
                let expected_version = versions[index as usize];
                if let Err(kind) = check_block(&block, offset, expected_version, run_id) {
                    failure.mismatches += 1;
                    if failure.details.len() < VERIFY_MISMATCHES_REPORTED_MAX {
                        failure.details.push(Mismatch {
                            offset,
                            expected_version,
                            kind,
                        });
                    }
                }
                Ok(())
            },
        )?;
        report.blocks_read += read;
        report.passes = pass;
        if failure.mismatches > 0 {
            failure.details.sort_by_key(|mismatch| mismatch.offset);
            return Err(WorkloadError::Verify(failure));
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Issues one flush and waits for it.
pub fn flush(client: &mut BlkClient, completion: CompletionMode) -> Result<()> {
    client.submit(&Request {
        kind: RequestType::Flush,
        sector: 0,
        data: &[],
        token: u64::MAX,
    })?;
    let mut done = Vec::with_capacity(1);
    loop {
        reap(client, completion, &mut done)?;
        if let Some(found) = done.iter().find(|c| c.token == u64::MAX) {
            if !found.is_ok() {
                return Err(WorkloadError::RequestFailed {
                    operation: "flush",
                    sector: 0,
                    status: found.status,
                });
            }
            return Ok(());
        }
        done.clear();
    }
}

/// Parameters of one [`drive`] loop.
struct Drive {
    queue_depth: usize,
    block_bytes: u32,
    completion: CompletionMode,
    /// No request is submitted after this instant; `None` runs until `next` says stop.
    deadline: Option<Instant>,
    operation: &'static str,
}

/// Keeps up to `queue_depth` requests in flight, each with its own buffer in the data area.
///
/// `next(client, buffer, slot)` names the next request (or `None` to stop); `done(client,
/// buffer, sector)` sees each successful completion while its buffer still holds the data.
/// Returns the number of completed requests and the time from the first submission until the
/// last completion.
fn drive<N, D>(
    client: &mut BlkClient,
    drive: &Drive,
    histogram: &mut LatencyHistogram,
    mut next: N,
    mut done: D,
) -> Result<(u64, Duration)>
where
    N: FnMut(&mut BlkClient, Buffer, usize) -> Result<Option<(RequestType, u64)>>,
    D: FnMut(&mut BlkClient, Buffer, u64) -> Result<()>,
{
    let queue_depth = drive.queue_depth;
    if queue_depth == 0 || queue_depth > vhost_blk::QUEUE_DEPTH_MAX {
        return Err(WorkloadError::QueueDepth { queue_depth });
    }
    let need = queue_depth as u64 * u64::from(drive.block_bytes);
    if need > client.data_bytes() {
        return Err(WorkloadError::DataArea {
            have: client.data_bytes(),
            need,
        });
    }
    let mut buffers = Vec::with_capacity(queue_depth);
    for slot in 0..queue_depth {
        buffers.push(client.data_buffer(
            slot as u64 * u64::from(drive.block_bytes),
            drive.block_bytes,
        )?);
    }
    let mut sectors = vec![0u64; queue_depth];
    let mut free: Vec<usize> = (0..queue_depth).rev().collect();
    let mut completions = Vec::with_capacity(queue_depth);
    if drive.completion == CompletionMode::Poll {
        client.set_interrupts(false)?;
    }
    let started = Instant::now();
    let mut finished = started;
    let mut ops = 0u64;
    let mut exhausted = false;
    let outcome = (|| -> Result<()> {
        loop {
            while !exhausted {
                let Some(&slot) = free.last() else { break };
                if drive
                    .deadline
                    .is_some_and(|deadline| Instant::now() >= deadline)
                {
                    exhausted = true;
                    break;
                }
                let Some((kind, sector)) = next(client, buffers[slot], slot)? else {
                    exhausted = true;
                    break;
                };
                client.submit(&Request {
                    kind,
                    sector,
                    data: std::slice::from_ref(&buffers[slot]),
                    token: slot as u64,
                })?;
                free.pop();
                sectors[slot] = sector;
            }
            client.notify()?;
            if client.in_flight() == 0 {
                return Ok(());
            }
            completions.clear();
            reap(client, drive.completion, &mut completions)?;
            finished = Instant::now();
            for completion in &completions {
                let slot = completion.token as usize;
                if !completion.is_ok() {
                    return Err(WorkloadError::RequestFailed {
                        operation: drive.operation,
                        sector: sectors[slot],
                        status: completion.status,
                    });
                }
                histogram.record(completion.latency);
                done(client, buffers[slot], sectors[slot])?;
                ops += 1;
                free.push(slot);
            }
        }
    })();
    if drive.completion == CompletionMode::Poll {
        client.set_interrupts(true)?;
    }
    outcome?;
    Ok((ops, finished.duration_since(started)))
}

/// Waits for at least one completion; a backend that completes nothing for
/// [`COMPLETION_WAIT_MAX`] is reported as stuck.
fn reap(
    client: &mut BlkClient,
    completion: CompletionMode,
    out: &mut Vec<Completion>,
) -> Result<()> {
    match completion {
        CompletionMode::Interrupt => {
            if client.wait_completions(out, COMPLETION_WAIT_MAX)? == 0 {
                return Err(WorkloadError::Stalled {
                    waited: COMPLETION_WAIT_MAX,
                    in_flight: client.in_flight(),
                });
            }
        }
        CompletionMode::Poll => {
            let mut since: Option<Instant> = None;
            let mut spins = 0u32;
            while client.poll_completions(out)? == 0 {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                // Reading the clock on every spin would dominate the loop.
                if spins % 1024 == 0 {
                    let start = *since.get_or_insert_with(Instant::now);
                    if start.elapsed() >= COMPLETION_WAIT_MAX {
                        return Err(WorkloadError::Stalled {
                            waited: COMPLETION_WAIT_MAX,
                            in_flight: client.in_flight(),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

fn blocks_in_span(client: &BlkClient, span_bytes: u64, block_bytes: u32) -> Result<u64> {
    let device_block_bytes = client.block_size();
    if block_bytes == 0 || block_bytes % device_block_bytes != 0 {
        return Err(WorkloadError::BlockSize {
            block_bytes,
            device_block_bytes,
        });
    }
    let span = span_bytes.min(client.capacity_bytes());
    let blocks = span / u64::from(block_bytes);
    if blocks == 0 {
        return Err(WorkloadError::Span {
            span_bytes,
            block_bytes,
            capacity_bytes: client.capacity_bytes(),
        });
    }
    Ok(blocks)
}

/// Fills the buffers of `queue_depth` requests with pseudo-random bytes, once per run, so that
/// writes carry data no backend can compress or detect as zeroes.
fn fill_random(
    client: &mut BlkClient,
    queue_depth: usize,
    block_bytes: u32,
    seed: u64,
) -> Result<()> {
    let need = queue_depth as u64 * u64::from(block_bytes);
    if need > client.data_bytes() {
        return Err(WorkloadError::DataArea {
            have: client.data_bytes(),
            need,
        });
    }
    let mut rng = Rng::new(seed ^ 0xda7a);
    let mut bytes = vec![0u8; block_bytes as usize];
    for slot in 0..queue_depth {
        for chunk in bytes.chunks_exact_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let buffer = client.data_buffer(slot as u64 * u64::from(block_bytes), block_bytes)?;
        client.write_data(buffer, &bytes)?;
    }
    Ok(())
}

/// A run identifier that differs between runs: time and process id mixed.
fn run_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = Rng::new(nanos ^ (u64::from(std::process::id()) << 32));
    rng.next_u64()
}

/// Layout of a verify block: magic, offset, version and run, then pseudo-random bytes derived
/// from those, then a CRC32 of everything before it in the last four bytes.
fn encode_block(block: &mut [u8], offset: u64, version: u64, run_id: u64) {
    block[0..8].copy_from_slice(&VERIFY_MAGIC.to_le_bytes());
    block[8..16].copy_from_slice(&offset.to_le_bytes());
    block[16..24].copy_from_slice(&version.to_le_bytes());
    block[24..32].copy_from_slice(&run_id.to_le_bytes());
    let body_end = block.len() - 4;
    let mut rng = Rng::new(offset ^ version.rotate_left(32) ^ run_id);
    for chunk in block[32..body_end].chunks_mut(8) {
        let bytes = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let checksum = crc32fast::hash(&block[..body_end]);
    block[body_end..].copy_from_slice(&checksum.to_le_bytes());
}

fn check_block(
    block: &[u8],
    offset: u64,
    version: u64,
    run_id: u64,
) -> std::result::Result<(), MismatchKind> {
    let u64_at = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&block[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    if block.iter().all(|byte| *byte == 0) {
        return Err(MismatchKind::Zeroes);
    }
    let magic = u64_at(0);
    if magic != VERIFY_MAGIC {
        return Err(MismatchKind::Magic { found: magic });
    }
    let body_end = block.len() - 4;
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&block[body_end..]);
    let stored = u32::from_le_bytes(stored);
    let computed = crc32fast::hash(&block[..body_end]);
    if stored != computed {
        return Err(MismatchKind::Checksum { stored, computed });
    }
    let found_offset = u64_at(8);
    if found_offset != offset {
        return Err(MismatchKind::Offset {
            found: found_offset,
        });
    }
    let found_run = u64_at(24);
    if found_run != run_id {
        return Err(MismatchKind::Run { found: found_run });
    }
    let found_version = u64_at(16);
    if found_version != version {
        return Err(MismatchKind::Version {
            found: found_version,
        });
    }
    Ok(())
}

/// xorshift64*: fast, deterministic, good enough for offsets and fill patterns.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // A zero state would stay zero; mix the seed so that nearby seeds diverge at once.
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..bound` (`bound` > 0), by widening multiplication to avoid modulo bias.
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    fn shuffle(&mut self, items: &mut [u64]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_block_round_trips() {
        let mut block = vec![0u8; VERIFY_BLOCK_BYTES as usize];
        encode_block(&mut block, 0x4000, 3, 77);
        assert_eq!(check_block(&block, 0x4000, 3, 77), Ok(()));
    }

    #[test]
    fn verify_block_names_each_mismatch() {
        let mut block = vec![0u8; VERIFY_BLOCK_BYTES as usize];
        assert_eq!(check_block(&block, 0, 1, 7), Err(MismatchKind::Zeroes));
        encode_block(&mut block, 0x4000, 3, 77);
        assert_eq!(
            check_block(&block, 0x5000, 3, 77),
            Err(MismatchKind::Offset { found: 0x4000 })
        );
        assert_eq!(
            check_block(&block, 0x4000, 4, 77),
            Err(MismatchKind::Version { found: 3 })
        );
        assert_eq!(
            check_block(&block, 0x4000, 3, 78),
            Err(MismatchKind::Run { found: 77 })
        );
        block[100] ^= 1;
        assert!(matches!(
            check_block(&block, 0x4000, 3, 77),
            Err(MismatchKind::Checksum { .. })
        ));
        block[0] ^= 1;
        assert!(matches!(
            check_block(&block, 0x4000, 3, 77),
            Err(MismatchKind::Magic { .. })
        ));
    }

    #[test]
    fn workload_names_round_trip() {
        for workload in Workload::ALL {
            assert_eq!(Workload::from_name(workload.name()), Some(workload));
        }
        assert_eq!(Workload::from_name("randread-4k-qd2"), None);
    }

    #[test]
    fn rng_stays_below_bound_and_shuffles_all() {
        let mut rng = Rng::new(0);
        assert!((0..10_000).all(|_| rng.below(7) < 7));
        let mut items: Vec<u64> = (0..100).collect();
        rng.shuffle(&mut items);
        let mut sorted = items.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(items, sorted);
    }
}
