//! Latency statistics: a mergeable log-linear histogram (for long runs with millions of
//! samples, sent between processes) and exact percentiles over small sample sets.

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two: about 3 % relative precision.
const SUB: u32 = 32;
const SUB_BITS: u32 = 5;
/// Values below this are counted exactly.
const LINEAR: u64 = 2 * SUB as u64;

/// Microsecond histogram with bounded relative error; cheap to merge and to serialize.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let sub = (v >> (e - SUB_BITS)) & u64::from(SUB - 1);
    LINEAR as usize + (e - SUB_BITS - 1) as usize * SUB as usize + sub as usize
}

fn upper_bound(i: usize) -> u64 {
    if (i as u64) < LINEAR {
        return i as u64;
    }
    let k = i - LINEAR as usize;
    let e = (k / SUB as usize) as u32 + SUB_BITS + 1;
    let sub = (k % SUB as usize) as u64;
    ((u64::from(SUB) + sub + 1) << (e - SUB_BITS)) - 1
}

impl Histogram {
    pub fn record(&mut self, micros: u64) {
        let i = index(micros);
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.total += 1;
        self.max = self.max.max(micros);
    }

    pub fn merge(&mut self, other: &Histogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1), in microseconds (bucket upper bound, capped at max).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper_bound(i).min(self.max);
            }
        }
        self.max
    }

    pub fn summary(&self) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: self.total,
            p50_ms: ms(self.quantile(0.5)),
            p90_ms: ms(self.quantile(0.9)),
            p99_ms: ms(self.quantile(0.99)),
            max_ms: ms(self.max),
        }
    }
}

/// Percentiles of one measured quantity, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Exact nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Exact percentiles of `samples_ms`.
pub fn summarize(mut samples_ms: Vec<f64>) -> Latency {
    samples_ms.sort_by(f64::total_cmp);
    Latency {
        count: samples_ms.len() as u64,
        p50_ms: percentile(&samples_ms, 0.5),
        p90_ms: percentile(&samples_ms, 0.9),
        p99_ms: percentile(&samples_ms, 0.99),
        max_ms: samples_ms.last().copied().unwrap_or(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..200_000u64).step_by(7) {
            let i = index(v);
            assert!(i >= last);
            last = i;
            let ub = upper_bound(i);
            assert!(ub >= v, "{v} > {ub}");
            assert!((ub - v) as f64 <= v as f64 * 0.04 + 1.0, "{v} {ub}");
        }
    }

    #[test]
    fn quantiles_and_merge() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for v in 1..=1000 {
            a.record(v);
            b.record(v + 1000);
        }
        a.merge(&b);
        assert_eq!(a.count(), 2000);
        let p50 = a.quantile(0.5);
        assert!((970..=1040).contains(&p50), "{p50}");
        assert_eq!(a.quantile(1.0), 2000);
        let s = summarize(vec![3.0, 1.0, 2.0, 4.0]);
        assert_eq!((s.p50_ms, s.max_ms, s.count), (2.0, 4.0, 4));
    }
}
