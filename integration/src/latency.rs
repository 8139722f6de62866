//! A fixed-size latency histogram for benchmarks.
//!
//! Every completion is recorded; nothing is sampled. Values below 128 ns land in exact buckets;
//! above that each power of two is split into 128 buckets, so a reported percentile is within
//! 0.8 % of the true value. The bucket array is allocated once, when the histogram is created,
//! and recording never allocates.

use std::time::Duration;

/// log2 of the number of buckets per power of two.
const SUB_BUCKET_BITS: u32 = 7;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Exact buckets for values below `SUB_BUCKETS`, then `SUB_BUCKETS` per power of two above.
const BUCKETS: usize = (SUB_BUCKETS as usize) * (64 - SUB_BUCKET_BITS as usize + 1);

/// Counts of latencies in nanoseconds.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    counts: Box<[u64]>,
    total: u64,
    max_ns: u64,
    sum_ns: u128,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram, with all of its buckets allocated.
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            max_ns: 0,
            sum_ns: 0,
        }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.record_ns(ns);
    }

    /// Records one latency in nanoseconds.
    pub fn record_ns(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
        self.sum_ns += u128::from(ns);
    }

    /// Adds every count of `other` to this histogram.
    pub fn merge(&mut self, other: &Self) {
        for (count, more) in self.counts.iter_mut().zip(other.counts.iter()) {
            *count += more;
        }
        self.total += other.total;
        self.max_ns = self.max_ns.max(other.max_ns);
        self.sum_ns += other.sum_ns;
    }

    /// Number of recorded latencies.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest recorded latency, exact.
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The mean latency, exact.
    pub fn mean_ns(&self) -> u64 {
        if self.total == 0 {
            return 0;
        }
        u64::try_from(self.sum_ns / u128::from(self.total)).unwrap_or(u64::MAX)
    }

    /// The latency at quantile `q` (0.5 for the median, 0.999 for p99.9): the middle of the
    /// bucket holding the `ceil(q * count)`-th smallest value, never above the maximum.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = bucket_range(bucket);
                return (low + width / 2).min(self.max_ns);
            }
        }
        self.max_ns
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB_BUCKETS {
        return ns as usize;
    }
    let exponent = 63 - u64::from(ns.leading_zeros());
    let shift = exponent - u64::from(SUB_BUCKET_BITS);
    let sub = (ns >> shift) - SUB_BUCKETS;
    (SUB_BUCKETS + shift * SUB_BUCKETS + sub) as usize
}

/// Lowest value and width of a bucket.
fn bucket_range(bucket: usize) -> (u64, u64) {
    let bucket = bucket as u64;
    if bucket < SUB_BUCKETS {
        return (bucket, 1);
    }
    let shift = (bucket - SUB_BUCKETS) / SUB_BUCKETS;
    let sub = (bucket - SUB_BUCKETS) % SUB_BUCKETS;
    ((SUB_BUCKETS + sub) << shift, 1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut previous = 0;
        for ns in (0..100_000u64).chain([u64::MAX / 2, u64::MAX]) {
            let bucket = bucket_of(ns);
            assert!(bucket < BUCKETS);
            assert!(bucket >= previous || ns > 100_000);
            previous = bucket;
            let (low, width) = bucket_range(bucket);
            assert!(low <= ns && ns - low < width, "{ns} not in bucket {bucket}");
        }
    }

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut histogram = LatencyHistogram::new();
        for ns in 1..=100_000u64 {
            histogram.record_ns(ns * 10);
        }
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() / want as f64 <= 0.01;
        assert!(close(histogram.quantile_ns(0.5), 500_000));
        assert!(close(histogram.quantile_ns(0.99), 990_000));
        assert!(close(histogram.quantile_ns(0.999), 999_000));
        assert_eq!(histogram.quantile_ns(1.0), 1_000_000);
        assert_eq!(histogram.max_ns(), 1_000_000);
        assert_eq!(histogram.count(), 100_000);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        a.record_ns(10);
        b.record_ns(1_000);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.max_ns(), 1_000);
        assert_eq!(a.quantile_ns(0.5), 10);
    }
}
