//! DPDK `testpmd` as a vhost-user-net frontend without a VM: one process
//! with a `net_virtio_user` port per socket, in a forwarding mode, stopped
//! after a while with its per-port counts.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// 2 MiB hugepages the harness reserves for testpmd instances, when it can.
const HUGEPAGES: u64 = 1024;

/// What to start.
#[derive(Debug, Clone)]
pub struct TestpmdConfig {
    /// Each port's vhost-user socket and MAC address.
    pub ports: Vec<(PathBuf, String)>,
    /// `flowgen` (send and receive on every port), `txonly`, `rxonly`, `io`...
    pub mode: String,
    /// Length of the frames sent (without the FCS).
    pub frame_bytes: usize,
    /// Queue pairs per port (1: no MQ).
    pub queues: usize,
}

/// Packets a port sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// Packets one port received on one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub port: usize,
    pub queue: usize,
    pub rx_packets: u64,
}

/// Reads the "Forward Stats for RX Port= P/Queue= Q -> ..." blocks.
fn parse_queue_stats(output: &str) -> Vec<QueueStats> {
    let mut streams = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in output.lines() {
        if let Some(at) = line.find("Forward Stats for RX Port=") {
            let rest = &line[at + "Forward Stats for RX Port=".len()..];
            let port = rest.split('/').next().and_then(|p| p.trim().parse().ok());
            let queue = rest
                .split("Queue=")
                .nth(1)
                .and_then(|q| q.split_whitespace().next())
                .and_then(|q| q.parse().ok());
            current = port.zip(queue);
        } else if let (Some((port, queue)), Some(at)) = (current, line.find("RX-packets:")) {
            let packets = line[at + "RX-packets:".len()..]
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            streams.push(QueueStats {
                port,
                queue,
                rx_packets: packets,
            });
            current = None;
        }
    }
    streams
}

/// A running testpmd.
#[derive(Debug)]
pub struct Testpmd {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<Mutex<String>>,
}

/// Reserves hugepages and mounts hugetlbfs if this process may (root);
/// returns testpmd's memory arguments: hugepages, or memfd-backed memory
/// without them.
fn memory_args() -> Vec<&'static str> {
    let reserve = || -> Result<()> {
        let have: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")?
            .trim()
            .parse()?;
        if have < HUGEPAGES {
            std::fs::write("/proc/sys/vm/nr_hugepages", HUGEPAGES.to_string())?;
        }
        let mounts = std::fs::read_to_string("/proc/mounts")?;
        if !mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"))
        {
            std::fs::create_dir_all("/dev/hugepages")?;
            let status = Command::new("mount")
                .args(["-t", "hugetlbfs", "nodev", "/dev/hugepages"])
                .status()?;
            anyhow::ensure!(status.success(), "mount hugetlbfs: {status}");
        }
        let free: u64 =
            std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")?
                .trim()
                .parse()?;
        anyhow::ensure!(free >= 128, "only {free} free hugepages");
        Ok(())
    };
    match reserve() {
        Ok(()) => vec!["-m", "256"],
        Err(_) => vec!["--no-huge", "-m", "512"],
    }
}

impl Testpmd {
    /// Starts testpmd on the given ports; forwarding starts at once.
    pub fn start(config: &TestpmdConfig) -> Result<Testpmd> {
        let prefix = format!(
            "fabric-test-{}-{}",
            std::process::id(),
            config.ports[0].0.display().to_string().len() ^ rand_suffix()
        );
        let mut args: Vec<String> = ["--no-pci", "--single-file-segments"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(memory_args().iter().map(|s| s.to_string()));
        // Two lcores (main and forwarding), on whichever CPU is free.
        args.extend([
            "--file-prefix".into(),
            prefix,
            "--lcores".into(),
            "0@(0-1),1@(0-1)".into(),
        ]);
        for (i, (socket, mac)) in config.ports.iter().enumerate() {
            args.push(format!(
                "--vdev=net_virtio_user{i},path={},queues={},queue_size=1024,mac={mac}",
                socket.display(),
                config.queues
            ));
        }
        args.push("--".into());
        args.push(format!("--forward-mode={}", config.mode));
        args.push("--nb-cores=1".into());
        args.push(format!("--rxq={}", config.queues));
        args.push(format!("--txq={}", config.queues));
        args.push("--total-num-mbufs=16384".into());
        args.push(format!("--txpkts={}", config.frame_bytes));
        let peers = config.ports.len();
        for i in 0..peers {
            // Each port sends to the next one's address.
            args.push(format!(
                "--eth-peer={i},{}",
                config.ports[(i + 1) % peers].1
            ));
        }
        // Line-buffered, so that "Press enter to exit" (forwarding has
        // started) is seen through the pipe.
        let mut child = Command::new("stdbuf")
            .arg("-oL")
            .arg("dpdk-testpmd")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start dpdk-testpmd (package dpdk-dev)")?;
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                    let mut text = output.lock().expect("testpmd output lock");
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        let stdin = child.stdin.take();
        let mut testpmd = Testpmd {
            child,
            stdin,
            output,
        };
        // Forwarding has started once testpmd waits for Enter.
        for _ in 0..300 {
            if testpmd.output().contains("Press enter to exit") {
                return Ok(testpmd);
            }
            if let Some(status) = testpmd.child.try_wait()? {
                bail!("testpmd exited with {status}:\n{}", testpmd.output());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "testpmd did not start forwarding in 30 s:\n{}",
            testpmd.output()
        )
    }

    pub fn output(&self) -> String {
        self.output.lock().expect("testpmd output lock").clone()
    }

    /// Stops forwarding and returns each port's counts.
    pub fn stop(self) -> Result<Vec<PortStats>> {
        self.stop_with_queues().map(|(stats, _)| stats)
    }

    /// Stops forwarding and returns each port's counts, and the packets
    /// received on each (port, queue) that forwarded any (testpmd prints
    /// those per stream when a port has several queues).
    pub fn stop_with_queues(mut self) -> Result<(Vec<PortStats>, Vec<QueueStats>)> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let mut exited = false;
        for _ in 0..300 {
            if self.child.try_wait()?.is_some() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            bail!("testpmd did not exit:\n{}", self.output());
        }
        // Let the readers take the last lines.
        std::thread::sleep(Duration::from_millis(200));
        let output = self.output();
        let stats = parse_stats(&output);
        if stats.is_empty() {
            bail!("no forward statistics from testpmd:\n{output}");
        }
        Ok((stats, parse_queue_stats(&output)))
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rand_suffix() -> usize {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize)
}

/// Reads the "Forward statistics for port N" blocks testpmd prints on exit.
fn parse_stats(output: &str) -> Vec<PortStats> {
    let mut stats: Vec<PortStats> = Vec::new();
    let mut port = None;
    let number = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    for line in output.lines() {
        if let Some(at) = line.find("Forward statistics for port") {
            port = line[at..]
                .split_whitespace()
                .nth(4)
                .and_then(|p| p.parse::<usize>().ok());
            if let Some(p) = port {
                if stats.len() <= p {
                    stats.resize(p + 1, PortStats::default());
                }
            }
            continue;
        }
        if line.contains("Accumulated forward statistics") {
            port = None;
        }
        let Some(p) = port else { continue };
        if let Some(n) = number(line, "RX-packets:") {
            stats[p].rx_packets = n;
        }
        if let Some(n) = number(line, "TX-packets:") {
            stats[p].tx_packets = n;
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_statistics_are_read() {
        let output = "
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 3343144        RX-dropped: 0             RX-total: 3343144
  TX-packets: 3307246        TX-dropped: 62978450      TX-total: 66285696
  ----------------------------------------------------------------------------

  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 5              RX-dropped: 0             RX-total: 5
  TX-packets: 7              TX-dropped: 0             TX-total: 7
  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 6640376        RX-dropped: 0             RX-total: 6640376
";
        assert_eq!(
            parse_stats(output),
            vec![
                PortStats {
                    rx_packets: 3343144,
                    tx_packets: 3307246
                },
                PortStats {
                    rx_packets: 5,
                    tx_packets: 7
                },
            ]
        );
    }
}
