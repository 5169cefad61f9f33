//! The mask PRG candidates compared on this machine: each keystream added
//! into a 1M-word (4 MB) vector mod 2^32, the way `apply_prg` uses it; best of
//! 5 runs of 64 passes. Run with
//! `cargo run --release -p fedquic-privacy --example bench_prg`.
//!
//! This is how AES-128-CTR was chosen (see `privacy/src/secagg/prg.rs`); the
//! other rows are the alternatives measured: ChaCha with fewer rounds (the
//! same crate), AES-256, other counter layouts and batch sizes, and ring's
//! AES-GCM (the only AES that ring exposes, so its keystream costs a GHASH and
//! a heap buffer).

use std::time::Instant;

use aes::{Aes128, Aes256};
use chacha20::rand_core::SeedableRng;
use chacha20::rand_core::block::Generator;
use chacha20::variants::Legacy;
use chacha20::{ChaChaCore, R8, R12, R20, Rounds};
use ctr::cipher::array::Array;
use ctr::cipher::consts::{U16, U32};
use ctr::cipher::{KeyIvInit, StreamCipherCore};
use fedquic_privacy::secagg::prg::{Sign, apply_prg};

type Prg = fn(&[u8; 32], &mut [u32]);

fn add_words(out: &mut [u32], keystream: &[u8]) {
    for (o, k) in out.iter_mut().zip(keystream.as_chunks::<4>().0) {
        *o = o.wrapping_add(u32::from_le_bytes(*k));
    }
}

fn chacha<R: Rounds>(seed: &[u8; 32], out: &mut [u32]) {
    let mut core = ChaChaCore::<R, Legacy>::from_seed(*seed);
    let mut buf = [0u32; 64];
    for chunk in out.chunks_mut(64) {
        core.generate(&mut buf);
        for (o, k) in chunk.iter_mut().zip(buf.iter()) {
            *o = o.wrapping_add(*k);
        }
    }
}

/// A CTR core's keystream, `BLOCKS` blocks per call (or none added).
fn ctr_add<C: StreamCipherCore<BlockSize = U16>, const BLOCKS: usize>(
    mut core: C,
    out: &mut [u32],
    add: bool,
) {
    let mut buf = [[0u8; 16]; BLOCKS];
    for chunk in out.chunks_mut(BLOCKS * 4) {
        core.write_keystream_blocks(Array::cast_slice_from_core_mut(&mut buf));
        if add {
            add_words(chunk, buf.as_flattened());
        }
    }
    std::hint::black_box(&buf);
}

fn halves(seed: &[u8; 32]) -> (&Array<u8, U16>, &Array<u8, U16>) {
    Array::<u8, U32>::cast_from_core(seed).split_ref::<U16>()
}

fn aes128_ctr128be<const BLOCKS: usize>(seed: &[u8; 32], out: &mut [u32]) {
    let (key, iv) = halves(seed);
    let core = ctr::CtrCore::<Aes128, ctr::flavors::Ctr128BE>::new(key, iv);
    ctr_add::<_, BLOCKS>(core, out, true);
}

fn aes128_ctr64le(seed: &[u8; 32], out: &mut [u32]) {
    let (key, iv) = halves(seed);
    let core = ctr::CtrCore::<Aes128, ctr::flavors::Ctr64LE>::new(key, iv);
    ctr_add::<_, 120>(core, out, true);
}

fn aes128_keystream_only(seed: &[u8; 32], out: &mut [u32]) {
    let (key, iv) = halves(seed);
    let core = ctr::CtrCore::<Aes128, ctr::flavors::Ctr128BE>::new(key, iv);
    ctr_add::<_, 120>(core, out, false);
}

fn aes256_ctr128be(seed: &[u8; 32], out: &mut [u32]) {
    let core = ctr::CtrCore::<Aes256, ctr::flavors::Ctr128BE>::new(
        Array::cast_from_core(seed),
        &Array::from([0u8; 16]),
    );
    ctr_add::<_, 120>(core, out, true);
}

fn ring_aes128_gcm(seed: &[u8; 32], out: &mut [u32]) {
    use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &seed[..16]).expect("key"));
    let nonce = Nonce::try_assume_unique_for_key(&seed[16..28]).expect("nonce");
    let mut buf = vec![0u8; out.len() * 4];
    let _tag = key
        .seal_in_place_separate_tag(nonce, Aad::empty(), &mut buf)
        .expect("seal");
    add_words(out, &buf);
}

fn main() {
    println!("AES hardware acceleration: {}", aes::hardware_accelerated());
    let candidates: [(&str, Prg); 12] = [
        ("ChaCha20 (the PRG before AES-128-CTR)", chacha::<R20>),
        ("ChaCha12", chacha::<R12>),
        ("ChaCha8", chacha::<R8>),
        (
            "AES-128-CTR, 128-bit BE counter, 120 blocks",
            aes128_ctr128be::<120>,
        ),
        (
            "AES-128-CTR, 128-bit BE counter, 30 blocks",
            aes128_ctr128be::<30>,
        ),
        (
            "AES-128-CTR, 128-bit BE counter, 64 blocks",
            aes128_ctr128be::<64>,
        ),
        (
            "AES-128-CTR, 128-bit BE counter, 240 blocks",
            aes128_ctr128be::<240>,
        ),
        ("AES-128-CTR, 64-bit LE counter, 120 blocks", aes128_ctr64le),
        ("AES-256-CTR, zero IV, 120 blocks", aes256_ctr128be),
        ("ring AES-128-GCM sealing zeros", ring_aes128_gcm),
        (
            "AES-128-CTR keystream alone (nothing added)",
            aes128_keystream_only,
        ),
        ("apply_prg (AES-128-CTR, 120 blocks)", |s, v| {
            apply_prg(s, v, Sign::Add)
        }),
    ];
    let mut v = vec![0u32; 1 << 20];
    let reps = 64;
    for (name, prg) in candidates {
        prg(&[6u8; 32], &mut v);
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for r in 0..reps {
                prg(&[r as u8; 32], &mut v);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let gb = (reps * v.len() * 4) as f64 / 1e9;
        println!("{name:46} {:5.2} GB/s", gb / best);
    }
    std::hint::black_box(&v);
}
