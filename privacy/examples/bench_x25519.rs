//! X25519 agreement: the Montgomery ladder (x25519-dalek) against the same
//! product through curve25519-dalek's Edwards arithmetic (AVX2 where present).
use std::time::Instant;

use curve25519_dalek::montgomery::MontgomeryPoint;
use x25519_dalek::{PublicKey, StaticSecret};

fn main() {
    let n = 2000;
    let secrets: Vec<[u8; 32]> = (0..n).map(|i| [i as u8 ^ 0x5a; 32]).collect();
    let peers: Vec<[u8; 32]> = (0..n)
        .map(|i| PublicKey::from(&StaticSecret::from([(i * 7) as u8 ^ 0x33; 32])).to_bytes())
        .collect();
    let t = Instant::now();
    let mut acc = 0u8;
    for (s, p) in secrets.iter().zip(&peers) {
        acc ^= StaticSecret::from(*s)
            .diffie_hellman(&PublicKey::from(*p))
            .to_bytes()[0];
    }
    let ladder = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    let mut acc2 = 0u8;
    for (s, p) in secrets.iter().zip(&peers) {
        let e = MontgomeryPoint(*p).to_edwards(0).unwrap();
        acc2 ^= e.mul_clamped(*s).to_montgomery().to_bytes()[0];
    }
    let edwards = t.elapsed().as_secs_f64() / n as f64;
    assert_eq!(acc, acc2);
    println!(
        "ladder {:.1} us, edwards {:.1} us",
        ladder * 1e6,
        edwards * 1e6
    );
}
