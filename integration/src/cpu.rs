//! CPU time of processes, from `/proc/PID/stat`: what benchmarks charge to
//! a server, and how they wait for one to go idle between measurements.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Clock ticks per second, the unit of the CPU times in `/proc/PID/stat`.
pub fn clock_ticks_per_second() -> Result<u64> {
    // SAFETY: sysconf(3) only reads a configuration value; it has no
    // memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks)
        .ok()
        .filter(|&ticks| ticks > 0)
        .context("sysconf(_SC_CLK_TCK) gave no clock tick rate")
}

/// CPU time of process `pid`, user plus system, summed over all its
/// threads (including threads that have exited), in clock ticks.
pub fn process_cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_cpu_ticks(&text).with_context(|| format!("{path} has no utime and stime fields"))
}

/// Sums utime and stime (fields 14 and 15) of a `/proc/PID/stat` line.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // Field 2 is the command name in parentheses and may itself hold
    // spaces and parentheses; the fields after its closing parenthesis
    // start with field 3.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// How long one look at the processes' CPU use lasts.
const IDLE_WINDOW: Duration = Duration::from_millis(500);

/// Waits until `pids` together use less than `share` of one CPU over half
/// a second (background work a measurement left behind, such as a
/// metadata store flushing what a write workload put in its memory, is
/// done), or `timeout` passes. Returns how long it waited, and whether
/// they went idle.
pub fn wait_until_idle(pids: &[u32], share: f64, timeout: Duration) -> Result<(Duration, bool)> {
    let ticks_per_second = clock_ticks_per_second()?;
    let total = || -> Result<u64> {
        pids.iter()
            .map(|&pid| process_cpu_ticks(pid))
            .sum::<Result<u64>>()
    };
    let start = Instant::now();
    loop {
        let before = total()?;
        std::thread::sleep(IDLE_WINDOW);
        // A process id reused meanwhile may count less than before.
        let used = total()?.saturating_sub(before) as f64 / ticks_per_second as f64;
        if used < share * IDLE_WINDOW.as_secs_f64() {
            return Ok((start.elapsed(), true));
        }
        if start.elapsed() >= timeout {
            return Ok((start.elapsed(), false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_parse_past_odd_command_names() {
        let stat = "4242 (qemu-storage) d) S 1 4242 4242 0 -1 4194560 1385 0 0 0 \
                    170 35 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(205));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1 2"), None);
        let own = process_cpu_ticks(std::process::id()).expect("own stat is readable");
        assert!(own < u64::MAX);
    }

    #[test]
    fn an_idle_process_is_seen_idle_and_a_busy_one_is_not() {
        let mut idle = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let seen = wait_until_idle(&[idle.id()], 0.1, Duration::from_secs(5));
        let _ = idle.kill();
        let _ = idle.wait();
        let (_, went_idle) = seen.expect("sleep's stat is readable");
        assert!(went_idle);
        // This process, spinning on another thread, is not idle within
        // the first window.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let (waited, went_idle) =
            wait_until_idle(&[std::process::id()], 0.1, Duration::from_millis(100)).expect("own");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinner.join().expect("spinner");
        assert!(!went_idle && waited >= IDLE_WINDOW);
    }
}
