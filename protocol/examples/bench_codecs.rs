//! Codec CPU cost: encode and decode throughput of every codec on one core,
//! in GB/s of model (f32) bytes, and the wire size.
//!
//! `cargo run --release -p fedquic-protocol --example bench_codecs -- [VALUES] [REPS]`
//! (default 1,000,000 values, 20 repetitions). Decoding goes through the
//! streaming `BodyDecoder` in 64 KiB chunks, as a receiver does; values are a
//! trained model's update-like mix of small and a few large magnitudes.

use std::time::Instant;

use fedquic_protocol::{BodyDecoder, Codec, StreamKind, TensorHeader, TensorMeta, encode_body};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let values: Vec<f32> = (0..n)
        .map(|i| {
            let x = ((i as f32) * 0.618).sin() * 1e-3;
            if i % 101 == 0 { x * 40.0 } else { x }
        })
        .collect();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!(
        "{n} values ({:.1} MB as f32), {reps} repetitions, one core: {cpu}",
        n as f64 * 4e-6
    );
    println!(
        "{:<18} {:>12} {:>9} {:>12} {:>12}",
        "codec", "wire bytes", "ratio", "encode GB/s", "decode GB/s"
    );
    for name in [
        "f32",
        "f16",
        "bf16",
        "int8",
        "top-k:0.01",
        "top-k:0.01+int8",
        "top-k:0.1+f16",
    ] {
        let codec: Codec = name.parse().expect("codec");
        let mut body = Vec::new();
        // Warm-up, and the body the decoder reads.
        encode_body(codec, &values, 1, &mut body).expect("encode");
        let t = Instant::now();
        for r in 0..reps {
            body.clear();
            encode_body(codec, &values, r as u64, &mut body).expect("encode");
        }
        let encode = t.elapsed().as_secs_f64() / reps as f64;
        let header = TensorHeader {
            kind: StreamKind::Update,
            round: 1,
            task_id: 1,
            codec,
            tensors: vec![TensorMeta::f32("w", &[n])],
            num_examples: 1,
            metrics: Vec::new(),
            body_len: body.len() as u64,
        };
        let mut out = vec![0f32; n];
        let t = Instant::now();
        for _ in 0..reps {
            let mut dec = BodyDecoder::new(&header);
            for chunk in body.chunks(64 * 1024) {
                dec.push(chunk, &mut out).expect("decode");
            }
            dec.finish().expect("complete");
        }
        let decode = t.elapsed().as_secs_f64() / reps as f64;
        let model_bytes = n as f64 * 4.0;
        println!(
            "{:<18} {:>12} {:>8.1}x {:>12.2} {:>12.2}",
            name,
            body.len(),
            model_bytes / body.len() as f64,
            model_bytes / encode / 1e9,
            model_bytes / decode / 1e9
        );
    }
}
