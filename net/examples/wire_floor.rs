//! The physical floor of one aggregation round on this machine: what moving
//! `2 x K x P x 4` bytes (every model down, every update up) over QUIC must
//! cost at the least, from the costs of its parts measured here:
//!
//! - AES-128-GCM (ring) sealing and opening packet-sized records, one core:
//!   the AEAD fedquic's connections negotiate (`fedquic_net::tls` puts
//!   TLS13_AES_128_GCM_SHA256 first, and both ends use that provider);
//! - memory copy bandwidth, one core;
//! - UDP on loopback through quinn's own socket layer (quinn-udp), with and
//!   without GSO/GRO, sender and receiver on their own threads.
//!
//! Every byte is sealed once, opened once, sent and received once as a
//! datagram, and copied at least twice (into the send buffer and out of the
//! receive buffer). With both processes on the machine's cores the work
//! divides over them at best, which is the floor printed for each (K, P).
//!
//! `cargo run --release -p fedquic-net --example wire_floor`

use std::io::IoSliceMut;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fedquic_net::endpoint::MAX_UDP_PAYLOAD;
use quinn::udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// QUIC's smallest datagram payload (its initial MTU).
const MIN_DATAGRAM: usize = 1200;

/// A short header, packet number and AEAD tag: a datagram's bytes that are
/// not record plaintext.
const PACKET_OVERHEAD: usize = 46;

fn main() -> std::io::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!("{cores} cores, {cpu}");

    let copy = memcpy_rate();
    println!("memcpy, 64 MiB, one core: {copy:.2} GB/s");
    // QUIC's minimum datagram, and the largest fedquic sends where the path
    // allows (loopback: MTU discovery climbs to it).
    let mut per_byte = f64::INFINITY;
    for datagram in [MIN_DATAGRAM, MAX_UDP_PAYLOAD as usize] {
        let record = datagram - PACKET_OVERHEAD;
        let (seal, open) = aead_rates(record);
        println!(
            "\n{datagram} B datagrams: AES-128-GCM (ring), {record} B records, one core: \
             seal {seal:.2} GB/s, open {open:.2} GB/s"
        );
        let (plain_rate, plain_dgrams) = udp_rate(false, datagram)?;
        println!(
            "UDP loopback, no GSO/GRO: {plain_rate:.2} GB/s received ({:.0} k datagrams/s)",
            plain_dgrams / 1e3
        );
        let (gso_rate, gso_dgrams) = udp_rate(true, datagram)?;
        println!(
            "UDP loopback, GSO/GRO: {gso_rate:.2} GB/s received ({:.0} k datagrams/s)",
            gso_dgrams / 1e3
        );
        // CPU seconds per byte moved once end to end.
        let udp = gso_rate.max(plain_rate);
        let cost = 1.0 / seal + 1.0 / open + 2.0 / copy + 1.0 / udp;
        println!("per byte: seal + open + 2 copies + UDP = {cost:.3} ns of CPU");
        per_byte = per_byte.min(cost);
    }
    println!("\nFloor at the cheaper size, {per_byte:.3} ns per byte, over {cores} cores:");
    println!(
        "{:>4} {:>10} {:>12} {:>16}",
        "K", "P", "bytes", "floor s/round"
    );
    for (k, p) in [
        (10u64, 1_000_000u64),
        (50, 1_000_000),
        (10, 10_000_000),
        (100, 100_000),
    ] {
        let bytes = 2 * k * p * 4;
        let floor = bytes as f64 * per_byte / 1e9 / cores as f64;
        println!("{k:>4} {p:>10} {bytes:>12} {floor:>16.3}");
    }
    Ok(())
}

/// Seal and open rates (GB/s of plaintext) for records of `len` bytes.
fn aead_rates(len: usize) -> (f64, f64) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).expect("16-byte key"));
    let records = 200_000u64;
    let mut buf = vec![0x5au8; len];
    let nonce = |i: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&i.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let start = Instant::now();
    let mut tags = Vec::with_capacity(records as usize);
    for i in 0..records {
        let tag = key
            .seal_in_place_separate_tag(nonce(i), Aad::from(&[0u8; 16]), &mut buf)
            .expect("seal");
        if i < 1 {
            tags.push(tag);
        }
    }
    let seal = (records as usize * len) as f64 / start.elapsed().as_secs_f64() / 1e9;
    // Open one real record repeatedly (authentic, so the full work is done).
    let mut sealed = vec![0x5au8; len];
    let tag = key
        .seal_in_place_separate_tag(nonce(u64::MAX), Aad::from(&[0u8; 16]), &mut sealed)
        .expect("seal");
    sealed.extend_from_slice(tag.as_ref());
    let mut work = sealed.clone();
    let start = Instant::now();
    for _ in 0..records {
        work.copy_from_slice(&sealed);
        key.open_in_place(nonce(u64::MAX), Aad::from(&[0u8; 16]), &mut work)
            .expect("authentic");
    }
    // The copy back is part of the loop; it is small against AES at this size.
    let open = (records as usize * len) as f64 / start.elapsed().as_secs_f64() / 1e9;
    std::hint::black_box(tags);
    (seal, open)
}

fn memcpy_rate() -> f64 {
    let len = 64 << 20;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src); // fault the pages in
    let reps = 20;
    let start = Instant::now();
    for _ in 0..reps {
        dst.copy_from_slice(std::hint::black_box(&src));
    }
    std::hint::black_box(&dst);
    (reps * len) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// Received GB/s and datagrams/s over one second of a sender blasting
/// `datagram`-byte datagrams at a receiver on loopback (both with 4 MiB
/// buffers). GSO batches stay under the kernel's 64 KiB per send.
fn udp_rate(offload: bool, datagram: usize) -> std::io::Result<(f64, f64)> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    for s in [&rx, &tx] {
        let s2 = socket2::SockRef::from(s);
        s2.set_recv_buffer_size(4 << 20)?;
        s2.set_send_buffer_size(4 << 20)?;
    }
    rx.set_read_timeout(Some(Duration::from_millis(100)))?;
    let to = rx.local_addr()?;
    let rx_state = UdpSocketState::new(UdpSockRef::from(&rx))?;
    let tx_state = UdpSocketState::new(UdpSockRef::from(&tx))?;
    let segments = if offload {
        tx_state.max_gso_segments().clamp(1, 65_000 / datagram)
    } else {
        1
    };
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (stop, received) = (Arc::clone(&stop), Arc::clone(&received));
        std::thread::spawn(move || {
            let gro = if offload {
                rx_state.gro_segments().max(1)
            } else {
                1
            };
            let mut storage = vec![0u8; 65_536 * gro.min(4)];
            while !stop.load(Ordering::Relaxed) {
                let mut bufs = [IoSliceMut::new(&mut storage)];
                let mut meta = [RecvMeta::default()];
                if let Ok(n) = rx_state.recv(UdpSockRef::from(&rx), &mut bufs, &mut meta) {
                    let bytes: usize = meta[..n].iter().map(|m| m.len).sum();
                    received.fetch_add(bytes as u64, Ordering::Relaxed);
                }
            }
        })
    };
    let payload = vec![0xa5u8; datagram * segments];
    let window = Duration::from_secs(1);
    let warmup = Instant::now() + Duration::from_millis(200);
    let mut counted_from = None;
    loop {
        let now = Instant::now();
        if counted_from.is_none() && now >= warmup {
            received.store(0, Ordering::Relaxed);
            counted_from = Some(now);
        }
        if counted_from.is_some_and(|t| now.duration_since(t) >= window) {
            break;
        }
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: &payload,
            segment_size: (segments > 1).then_some(datagram),
            src_ip: None,
        };
        // A full send buffer is backpressure, not an error to report.
        let _ = tx_state.send(UdpSockRef::from(&tx), &transmit);
    }
    let elapsed = counted_from.map_or(window, |t| t.elapsed());
    let bytes = received.load(Ordering::Relaxed) as f64;
    stop.store(true, Ordering::Relaxed);
    let _ = receiver.join();
    let secs = elapsed.as_secs_f64();
    Ok((bytes / secs / 1e9, bytes / datagram as f64 / secs))
}
