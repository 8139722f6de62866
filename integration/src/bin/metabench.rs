//! Metadata commit latency and throughput: a 3-node Fabric cluster against
//! a 3-member etcd 3.4 cluster, both on loopback, in the same run.
//!
//! Each operation is one small replicated write over HTTP/1.1 with a kept-
//! alive connection: for Fabric `PUT /v1/nodes/n1/labels/kN` on the
//! leader's TCP API, for etcd `POST /v3/kv/put` on the leader's gRPC
//! gateway. Both commit through their consensus log, synced to disk on a
//! majority, before answering. Keys cycle over 16 names, so neither store
//! grows during the run.
//!
//! ```text
//! metabench [--ops 2000] [--concurrency 16] [--runs 3]
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use integration::fabricd::{form_cluster, free_tcp_port, start_cluster_member, ClusterMember};
use integration::latency::LatencyHistogram;

#[derive(Debug, Parser)]
struct Args {
    /// Writes per measurement.
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    /// Clients writing at once for the throughput measurement.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Measurements per target, alternating targets.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// One HTTP/1.1 connection with keep-alive.
struct Http {
    reader: BufReader<TcpStream>,
    host: String,
}

impl Http {
    fn connect(address: &str) -> Result<Http> {
        let stream = TcpStream::connect(address).with_context(|| format!("connect {address}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Http {
            reader: BufReader::new(stream),
            host: address.to_owned(),
        })
    }

    /// Sends a request with a JSON body and returns (status, body).
    fn request(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, Vec<u8>)> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line)?;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("status line")?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = value.trim().parse::<usize>().ok();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size)?;
                let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
                let mut chunk = vec![0u8; size + 2];
                self.reader.read_exact(&mut chunk)?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            body.resize(length.context("no content-length")?, 0);
            self.reader.read_exact(&mut body)?;
        }
        Ok((status, body))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Fabric,
    Etcd,
}

fn put(http: &mut Http, target: Target, i: usize) -> Result<()> {
    let key = format!("k{}", i % 16);
    let (status, body) = match target {
        Target::Fabric => http.request(
            "PUT",
            &format!("/v1/nodes/n1/labels/{key}"),
            &format!("{{\"value\":\"v{i}\"}}"),
        )?,
        Target::Etcd => {
            use std::fmt::Write as _;
            // base64 of the key and value, for the gRPC gateway.
            let b64 = |text: &str| {
                const TABLE: &[u8] =
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
                let bytes = text.as_bytes();
                let mut out = String::new();
                for chunk in bytes.chunks(3) {
                    let n = chunk
                        .iter()
                        .enumerate()
                        .fold(0u32, |n, (j, &b)| n | u32::from(b) << (16 - 8 * j));
                    for j in 0..4 {
                        if j <= chunk.len() {
                            out.push(TABLE[(n >> (18 - 6 * j) & 63) as usize] as char);
                        } else {
                            out.push('=');
                        }
                    }
                }
                out
            };
            let mut body = String::new();
            let _ = write!(
                body,
                "{{\"key\":\"{}\",\"value\":\"{}\"}}",
                b64(&key),
                b64(&format!("v{i}"))
            );
            http.request("POST", "/v3/kv/put", &body)?
        }
    };
    ensure!(
        status == 200,
        "{target:?} put answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// Sequential writes: per-write latency.
fn latency_run(address: &str, target: Target, ops: usize) -> Result<LatencyHistogram> {
    let mut http = Http::connect(address)?;
    let mut histogram = LatencyHistogram::new();
    for i in 0..ops {
        let start = Instant::now();
        put(&mut http, target, i)?;
        histogram.record(start.elapsed());
    }
    Ok(histogram)
}

/// `concurrency` clients at once: writes per second.
fn throughput_run(address: &str, target: Target, ops: usize, concurrency: usize) -> Result<f64> {
    let start = Instant::now();
    let per_client = ops / concurrency;
    let handles: Vec<_> = (0..concurrency)
        .map(|client| {
            let address = address.to_owned();
            std::thread::spawn(move || -> Result<()> {
                let mut http = Http::connect(&address)?;
                for i in 0..per_client {
                    put(&mut http, target, client * per_client + i)?;
                }
                Ok(())
            })
        })
        .collect();
    for handle in handles {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok((per_client * concurrency) as f64 / start.elapsed().as_secs_f64())
}

/// Starts the Fabric cluster; returns the nodes and the leader's TCP API.
fn start_fabric(dir: &Path) -> Result<(Vec<ClusterMember>, String)> {
    let members = (1..=3)
        .map(|i| start_cluster_member(dir, &format!("n{i}"), &[]))
        .collect::<Result<Vec<_>>>()?;
    form_cluster(&members)?;
    for _ in 0..200 {
        let status = members[0].node.fabctl_json(&["cluster", "status"])?;
        if status["voters"].as_array().map(Vec::len) == Some(3) {
            let leader = status["leader"].as_u64().context("leader")? as usize;
            let api = members[leader - 1].api.clone();
            return Ok((members, api));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the Fabric cluster did not reach three voters")
}

struct Etcd {
    children: Vec<Child>,
    clients: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a 3-member etcd cluster on loopback; returns it with the
/// leader's client address.
fn start_etcd(dir: &Path) -> Result<(Etcd, String)> {
    let peers: Vec<u16> = (0..3).map(|_| free_tcp_port()).collect::<Result<_>>()?;
    let clients: Vec<u16> = (0..3).map(|_| free_tcp_port()).collect::<Result<_>>()?;
    let initial: Vec<String> = (0..3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", peers[i]))
        .collect();
    let mut etcd = Etcd {
        children: Vec::new(),
        clients: Vec::new(),
    };
    for i in 0..3 {
        let data: PathBuf = dir.join(format!("etcd{i}"));
        let log = std::fs::File::create(dir.join(format!("etcd{i}.log")))?;
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", peers[i]),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", peers[i]),
            ])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", clients[i]),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", clients[i]),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "metabench",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start etcd (apt-get install etcd-server)")?;
        etcd.children.push(child);
        etcd.clients.push(format!("127.0.0.1:{}", clients[i]));
    }
    for _ in 0..200 {
        for client in &etcd.clients {
            if let Ok(mut http) = Http::connect(client) {
                if let Ok((200, body)) = http.request("POST", "/v3/maintenance/status", "{}") {
                    let status: serde_json::Value = serde_json::from_slice(&body)?;
                    let member = status["header"]["member_id"].as_str().unwrap_or("");
                    let leader = status["leader"].as_str().unwrap_or("-");
                    if member == leader {
                        let address = client.clone();
                        return Ok((etcd, address));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("etcd did not elect a leader")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (_fabric, fabric_leader) = start_fabric(&dir.path().join("fabric"))?;
    let (_etcd, etcd_leader) = start_etcd(dir.path())?;
    let mut p50 = [Vec::new(), Vec::new()];
    let mut p99 = [Vec::new(), Vec::new()];
    let mut rate = [Vec::new(), Vec::new()];
    for run in 0..args.runs {
        let order = if run % 2 == 0 {
            [Target::Fabric, Target::Etcd]
        } else {
            [Target::Etcd, Target::Fabric]
        };
        for target in order {
            let (slot, address) = match target {
                Target::Fabric => (0, &fabric_leader),
                Target::Etcd => (1, &etcd_leader),
            };
            let histogram = latency_run(address, target, args.ops)?;
            p50[slot].push(histogram.quantile_ns(0.5) as f64 / 1000.0);
            p99[slot].push(histogram.quantile_ns(0.99) as f64 / 1000.0);
            rate[slot].push(throughput_run(address, target, args.ops, args.concurrency)?);
            eprintln!(
                "metabench: run {} of {} on {target:?} done",
                run + 1,
                args.runs
            );
        }
    }
    let spread = |values: &[f64]| {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{min:.0}–{max:.0}")
    };
    println!("## metabench: metadata commits, 3-node Fabric vs 3-member etcd on loopback");
    println!();
    println!(
        "- {} runs, alternating; {} sequential writes for latency, {} writes by {} clients for throughput",
        args.runs, args.ops, args.ops, args.concurrency
    );
    println!(
        "- etcd: {}",
        String::from_utf8_lossy(&Command::new("etcd").arg("--version").output()?.stdout)
            .lines()
            .next()
            .unwrap_or("?")
    );
    println!();
    println!("| measure | Fabric | etcd | Fabric/etcd |");
    println!("|---|---|---|---|");
    let rows = [
        ("p50 latency µs (QD1)", &mut p50),
        ("p99 latency µs (QD1)", &mut p99),
    ];
    for (name, values) in rows {
        let (f, e) = (
            median(&mut values[0].clone()),
            median(&mut values[1].clone()),
        );
        println!(
            "| {name} | {f:.0} ({}) | {e:.0} ({}) | {:.2} |",
            spread(&values[0]),
            spread(&values[1]),
            f / e
        );
    }
    let (f, e) = (median(&mut rate[0].clone()), median(&mut rate[1].clone()));
    println!(
        "| writes/s ({} clients) | {f:.0} ({}) | {e:.0} ({}) | {:.2} |",
        args.concurrency,
        spread(&rate[0]),
        spread(&rate[1]),
        f / e
    );
    println!();
    println!(
        "Cells: median (min–max) over the runs. Lower latency and higher writes/s are better."
    );
    Ok(())
}
