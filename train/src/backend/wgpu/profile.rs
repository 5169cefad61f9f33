//! Per-dispatch GPU timing, for finding where a training step's device time goes.
//!
//! Off unless `FEDQUIC_WGPU_PROFILE=FILE` is set when a device is opened and the adapter
//! supports timestamp queries. Then every dispatch runs in its own compute pass with
//! timestamps at its start and end, each submission waits for the device (so profiling
//! changes the timing it measures: no overlap between submissions), and after each
//! submission FILE is rewritten with the totals so far, grouped by kernel and shape,
//! largest first. The `span` line compares the summed dispatch times with the device time
//! from a submission's first timestamp to its last: the difference is time between
//! dispatches (barriers, pass switches, uploads).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use super::{Kernel, Params};

/// Timestamps per submission: two per dispatch (wgpu's query set limit is 4096).
pub(super) const MAX_QUERIES: u32 = 4096;

pub(super) struct Profiler {
    path: PathBuf,
    pub(super) query_set: wgpu::QuerySet,
    pub(super) resolve: wgpu::Buffer,
    pub(super) readback: wgpu::Buffer,
    period_ns: f64,
    /// Label -> (dispatches, nanoseconds).
    totals: HashMap<String, (u64, f64)>,
    submissions: u64,
    busy_ns: f64,
    span_ns: f64,
}

impl Profiler {
    /// The profiler `FEDQUIC_WGPU_PROFILE` asks for, if `features` allow timestamps.
    pub(super) fn requested(features: wgpu::Features) -> Option<PathBuf> {
        let path = std::env::var_os("FEDQUIC_WGPU_PROFILE")?;
        if !features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            tracing::warn!("FEDQUIC_WGPU_PROFILE is set but the adapter has no timestamp queries");
            return None;
        }
        Some(PathBuf::from(path))
    }

    pub(super) fn new(device: &wgpu::Device, queue: &wgpu::Queue, path: PathBuf) -> Profiler {
        let bytes = u64::from(MAX_QUERIES) * 8;
        Profiler {
            path,
            query_set: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile"),
                ty: wgpu::QueryType::Timestamp,
                count: MAX_QUERIES,
            }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("profile readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            period_ns: f64::from(queue.get_timestamp_period()),
            totals: HashMap::new(),
            submissions: 0,
            busy_ns: 0.0,
            span_ns: 0.0,
        }
    }

    /// Adds one submission's timestamps (two per entry of `dispatches`) to the totals
    /// and rewrites the report.
    pub(super) fn record(
        &mut self,
        dispatches: &[(Kernel, Params, (u32, u32, u32))],
        ticks: &[u64],
    ) {
        let mut first = u64::MAX;
        let mut last = 0;
        for (index, (kernel, params, groups)) in dispatches.iter().enumerate() {
            let (Some(&begin), Some(&end)) = (ticks.get(2 * index), ticks.get(2 * index + 1))
            else {
                break;
            };
            first = first.min(begin);
            last = last.max(end);
            let ns = end.saturating_sub(begin) as f64 * self.period_ns;
            self.busy_ns += ns;
            let entry = self
                .totals
                .entry(label(*kernel, params, *groups))
                .or_default();
            entry.0 += 1;
            entry.1 += ns;
        }
        if last > first {
            self.span_ns += (last - first) as f64 * self.period_ns;
        }
        self.submissions += 1;
        if let Err(error) = std::fs::write(&self.path, self.report()) {
            tracing::warn!(path = %self.path.display(), %error, "cannot write the wgpu profile");
        }
    }

    fn report(&self) -> String {
        let mut rows: Vec<_> = self.totals.iter().collect();
        rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
        let mut text = format!(
            "submissions {}  dispatch time {:.3} ms  span {:.3} ms (first to last timestamp)\n\
             {:>10} {:>7} {:>10} {:>6}  kernel and shape\n",
            self.submissions,
            self.busy_ns / 1e6,
            self.span_ns / 1e6,
            "total ms",
            "count",
            "mean us",
            "share"
        );
        for (name, (count, ns)) in rows {
            let _ = writeln!(
                text,
                "{:>10.3} {:>7} {:>10.2} {:>5.1}%  {name}",
                ns / 1e6,
                count,
                ns / 1e3 / *count as f64,
                100.0 * ns / self.busy_ns.max(1.0)
            );
        }
        text
    }
}

/// A dispatch's kernel with the sizes that decide its cost.
fn label(kernel: Kernel, params: &Params, groups: (u32, u32, u32)) -> String {
    let w = &params.0;
    match kernel {
        Kernel::Gemm { big, modes } => format!(
            "gemm{} {}{}{} m={} n={} k={} splits={}",
            if big { 64 } else { 32 },
            if modes.trans_a { "At" } else { "A" },
            if modes.trans_b { "Bt" } else { "B" },
            if modes.conv_output { " conv-out" } else { "" },
            w[0],
            w[1],
            w[2],
            groups.2
        ),
        _ => format!(
            "{kernel:?} len={} groups={}",
            w[0],
            u64::from(groups.0) * u64::from(groups.1) * u64::from(groups.2)
        ),
    }
}
