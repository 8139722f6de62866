//! How long one cache line takes to go from one CPU to another and back:
//! two threads, pinned to the two CPUs, take turns writing it, each
//! waiting to see the other's write.
//!
//! On a virtual machine this depends on where the host places the virtual
//! CPUs, and it can change while the machine runs (the benchmark machine
//! measured 55-100 ns at some times and 380-440 ns at others). Everything
//! that hands data from one CPU to the other (a virtqueue's buffers, ring
//! entries and indexes) pays it, so the switch benchmark records it
//! beside each run.
//!
//! ```text
//! linebounce [--first-cpu 0] [--second-cpu 1] [--rounds 500000]
//! ```
//! Prints the median of five measurements, in nanoseconds per round trip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 0)]
    first_cpu: usize,
    #[arg(long, default_value_t = 1)]
    second_cpu: usize,
    /// Round trips per measurement.
    #[arg(long, default_value_t = 500_000)]
    rounds: u64,
}

/// A value alone in its cache line.
#[repr(align(128))]
struct Line(AtomicU64);

fn pin(cpu: usize) -> Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        bail!("CPU {cpu} is beyond what an affinity mask holds");
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside
    // it (the index is checked above); sched_setaffinity reads it.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        bail!(
            "cannot run on CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Nanoseconds per round trip over `rounds`.
fn measure(first: usize, second: usize, rounds: u64) -> Result<f64> {
    let line = Arc::new(Line(AtomicU64::new(0)));
    let other = line.clone();
    let answerer = std::thread::spawn(move || -> Result<()> {
        pin(second)?;
        for round in 1..=rounds {
            while other.0.load(Ordering::Acquire) != 2 * round - 1 {
                std::hint::spin_loop();
            }
            other.0.store(2 * round, Ordering::Release);
        }
        Ok(())
    });
    pin(first)?;
    let start = Instant::now();
    for round in 1..=rounds {
        line.0.store(2 * round - 1, Ordering::Release);
        while line.0.load(Ordering::Acquire) != 2 * round {
            if answerer.is_finished() {
                // It could not pin itself: say why.
                answerer.join().expect("answerer panicked")?;
                bail!("the answering thread ended early");
            }
            std::hint::spin_loop();
        }
    }
    let elapsed = start.elapsed();
    answerer.join().expect("answerer panicked")?;
    Ok(elapsed.as_nanos() as f64 / rounds as f64)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.first_cpu == args.second_cpu {
        bail!("the two CPUs must differ");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let mut samples = (0..5)
        .map(|_| measure(args.first_cpu, args.second_cpu, args.rounds))
        .collect::<Result<Vec<_>>>()?;
    samples.sort_by(f64::total_cmp);
    println!("{:.1}", samples[2]);
    Ok(())
}
