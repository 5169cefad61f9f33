//! Memory per bound in-memory socket: binds 100,000 sockets on a
//! `MemNetwork` (unshaped, then behind a shaped link) and reads the
//! process's resident set size before and after, then drops them all.
//!
//! `cargo run --release -p fedquic-net --example mem_sockets`

use std::time::Duration;

use fedquic_net::mem::{LinkShape, MemNetwork};

const SOCKETS: usize = 100_000;

/// VmRSS of this process in bytes (Linux), 0 where unknown.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn measure(net: &MemNetwork, link: Option<LinkShape>, label: &str) {
    let before = rss();
    let sockets: Vec<_> = (0..SOCKETS)
        .map(|_| net.socket(None, link).expect("bind"))
        .collect();
    let bound = rss();
    let per_socket = bound.saturating_sub(before) as f64 / SOCKETS as f64;
    println!(
        "{label}: {SOCKETS} sockets bound, VmRSS {:.1} MiB -> {:.1} MiB: {per_socket:.0} bytes per socket",
        before as f64 / (1 << 20) as f64,
        bound as f64 / (1 << 20) as f64,
    );
    drop(sockets);
    let after = rss();
    println!(
        "{label}: all dropped, {} bound, VmRSS {:.1} MiB",
        net.bound(),
        after as f64 / (1 << 20) as f64,
    );
}

fn main() {
    let net = MemNetwork::new(0);
    println!(
        "size_of::<MemSocket>() = {} bytes (plus the Arc header, the address-map entry and allocator overhead)",
        std::mem::size_of::<fedquic_net::mem::MemSocket>()
    );
    measure(&net, None, "unshaped");
    let link = LinkShape {
        latency: Duration::from_millis(20),
        bandwidth_bytes_per_sec: Some(1_000_000),
        loss: 0.01,
    };
    measure(&net, Some(link), "shaped");
}
