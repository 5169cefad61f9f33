//! Every codec through the real stream path: encode, header, chunked
//! decoding, and hostile bodies.

use fedquic_privacy::dp::l2_norm;
use fedquic_protocol::codec::{BLOCK_VALUES, PPM};
use fedquic_protocol::{
    BodyDecoder, Codec, ProtocolError, StreamKind, TensorHeader, TensorLimits, TensorMeta,
    ValueCodec, decode_header, decode_tensor_stream, encode_body, encode_header,
};
use proptest::prelude::*;

fn header(codec: Codec, n: usize, body_len: usize) -> TensorHeader {
    TensorHeader {
        kind: StreamKind::Update,
        round: 1,
        task_id: 2,
        codec,
        tensors: vec![TensorMeta::f32("w", &[n])],
        num_examples: 10,
        metrics: Vec::new(),
        body_len: body_len as u64,
    }
}

fn stream(codec: Codec, values: &[f32], seed: u64) -> (TensorHeader, Vec<u8>) {
    let mut body = Vec::new();
    encode_body(codec, values, seed, &mut body).unwrap();
    let h = header(codec, values.len(), body.len());
    let mut bytes = encode_header(&h).unwrap();
    bytes.extend_from_slice(&body);
    (h, bytes)
}

/// Decodes in chunks of `chunk` bytes, checking that the norm taken on the
/// way is exactly the norm of the result (all but top-k codecs).
fn decode_chunked(h: &TensorHeader, body: &[u8], chunk: usize) -> Result<Vec<f32>, ProtocolError> {
    let mut dec = BodyDecoder::with_norm(h);
    // A pooled buffer holds garbage from its last use: decoding overwrites all of it.
    let mut out = vec![f32::MAX; dec.values()];
    for c in body.chunks(chunk.max(1)) {
        assert_eq!(dec.norm(), None, "no norm before the body is complete");
        dec.push(c, &mut out)?;
    }
    dec.finish()?;
    match (h.codec, dec.norm()) {
        (Codec::TopK { .. } | Codec::Ring32, norm) => assert_eq!(norm, None),
        (codec, norm) => assert_eq!(
            norm.map(f64::to_bits),
            Some(l2_norm(&out).to_bits()),
            "{codec}"
        ),
    }
    Ok(out)
}

fn topk(fraction: f64, values: ValueCodec) -> Codec {
    Codec::TopK {
        fraction_ppm: (fraction * PPM as f64) as u32,
        values,
    }
}

fn all() -> Vec<Codec> {
    let mut v = vec![Codec::F32, Codec::F16, Codec::Bf16, Codec::Int8];
    for values in [
        ValueCodec::F32,
        ValueCodec::F16,
        ValueCodec::Bf16,
        ValueCodec::Int8,
    ] {
        v.push(topk(0.01, values));
        v.push(topk(0.3, values));
    }
    v
}

fn sample(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.37).sin() * 0.01) * if i % 97 == 0 { 50.0 } else { 1.0 })
        .collect()
}

/// The decoded value's allowed error for a value of magnitude `v` in a block
/// whose largest magnitude is `max`.
fn tolerance(codec: ValueCodec, v: f32, max: f32) -> f32 {
    match codec {
        ValueCodec::F32 | ValueCodec::Ring32 => 0.0,
        ValueCodec::F16 => v.abs() / 1024.0 + 6e-8,
        ValueCodec::Bf16 => v.abs() / 128.0,
        ValueCodec::Int8 => max / 127.0 * 1.0001,
    }
}

/// Secure aggregation's masked inputs are arbitrary 32-bit words, NaN and
/// infinity patterns included: they travel bit for bit, in any chunking,
/// and a body of the wrong length is refused.
#[test]
fn ring32_carries_any_bit_pattern_exactly() {
    let n = 2 * BLOCK_VALUES + 77;
    let mut x = 0x9e37_79b9u32;
    let mut words: Vec<u32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        })
        .collect();
    words[0] = f32::NAN.to_bits();
    words[1] = f32::INFINITY.to_bits();
    words[2] = 0xffff_ffff;
    let values: Vec<f32> = words.iter().map(|w| f32::from_bits(*w)).collect();
    let (h, bytes) = stream(Codec::Ring32, &values, 0);
    assert_eq!(h.body_len, 4 * n as u64);
    let body = &bytes[bytes.len() - h.body_len as usize..];
    for chunk in [1, 3, 4096, body.len()] {
        let out = decode_chunked(&h, body, chunk).unwrap();
        let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, words, "chunks of {chunk}");
    }
    let short = header(Codec::Ring32, n, body.len() - 4);
    let mut dec = BodyDecoder::new(&short);
    let mut out = vec![0f32; n];
    assert!(
        dec.push(&body[..body.len() - 4], &mut out)
            .and_then(|()| dec.finish())
            .is_err()
    );
    assert!(
        "top-k:0.1+ring32"
            .parse::<Codec>()
            .map(|c| c.validate().is_err())
            .unwrap_or(true),
        "ring32 is not a top-k value codec"
    );
}

#[test]
fn every_codec_round_trips_through_chunks_of_any_size() {
    // Not a multiple of the block size, so the last block is short.
    let n = 3 * BLOCK_VALUES + 123;
    let values = sample(n);
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    for codec in all() {
        let (h, bytes) = stream(codec, &values, 7);
        let (dh, whole) = decode_tensor_stream(&bytes, &TensorLimits::for_model(n as u64))
            .unwrap_or_else(|e| panic!("{codec}: {e}"));
        assert_eq!(dh, h);
        let body = &bytes[bytes.len() - h.body_len as usize..];
        for chunk in [1, 2, 3, 5, 1000, 4099, body.len()] {
            assert_eq!(
                decode_chunked(&h, body, chunk).unwrap(),
                whole,
                "{codec} chunk {chunk}"
            );
        }
        match codec.top_k_ppm() {
            None => {
                for (v, d) in values.iter().zip(&whole) {
                    assert!(
                        (v - d).abs() <= tolerance(codec.value_codec(), *v, max),
                        "{codec}: {v} -> {d}"
                    );
                }
            }
            Some(ppm) => {
                let k = Codec::top_k_count(ppm, n as u64) as usize;
                let kept: Vec<usize> = (0..n).filter(|&i| whole[i] != 0.0).collect();
                assert!(kept.len() <= k, "{codec}: {} kept of {k}", kept.len());
                // Everything kept is at least as large as everything dropped.
                let smallest_kept = kept
                    .iter()
                    .map(|&i| values[i].abs())
                    .fold(f32::MAX, f32::min);
                let largest_dropped = (0..n)
                    .filter(|i| whole[*i] == 0.0)
                    .map(|i| values[i].abs())
                    .fold(0f32, f32::max);
                let slack = tolerance(codec.value_codec(), largest_dropped, max);
                assert!(
                    largest_dropped <= smallest_kept + slack,
                    "{codec}: dropped {largest_dropped} > kept {smallest_kept}"
                );
            }
        }
    }
}

#[test]
fn compressed_bodies_are_as_small_as_promised() {
    let n = 100_000;
    let values = sample(n);
    let size = |c: Codec| stream(c, &values, 1).0.body_len as f64;
    let f32_bytes = size(Codec::F32);
    assert_eq!(f32_bytes, 4.0 * n as f64);
    assert_eq!(size(Codec::F16), 2.0 * n as f64);
    assert_eq!(size(Codec::Bf16), 2.0 * n as f64);
    assert!(size(Codec::Int8) < 1.01 * n as f64);
    // Top-k 1% with f32 values: at most 9 bytes an entry (gaps of 1-2 bytes).
    let topk1 = size(topk(0.01, ValueCodec::F32));
    assert!(f32_bytes / topk1 > 50.0, "top-k 1%: {topk1} bytes");
    let topk1_int8 = size(topk(0.01, ValueCodec::Int8));
    assert!(
        f32_bytes / topk1_int8 > 100.0,
        "top-k 1% int8: {topk1_int8}"
    );
}

#[test]
fn same_seed_same_bytes() {
    let values = sample(5000);
    for codec in all() {
        assert_eq!(stream(codec, &values, 3).1, stream(codec, &values, 3).1);
    }
    assert_ne!(
        stream(Codec::Int8, &values, 3).1,
        stream(Codec::Int8, &values, 4).1,
        "the seed drives the rounding"
    );
}

#[test]
fn encoders_refuse_non_finite_values_and_saturate_large_ones() {
    let mut body = Vec::new();
    for codec in all() {
        assert_eq!(
            encode_body(codec, &[1.0, f32::NAN], 0, &mut body),
            Err(ProtocolError::NonFinite { index: 1 })
        );
    }
    let (h, bytes) = stream(Codec::F16, &[1e6, -1e6, 3.0], 0);
    let (_, v) = decode_tensor_stream(&bytes, &TensorLimits::default()).unwrap();
    assert_eq!(v, vec![65504.0, -65504.0, 3.0]);
    assert_eq!(h.body_len, 6);
    let (_, bytes) = stream(Codec::Bf16, &[f32::MAX, f32::MIN], 0);
    let (_, v) = decode_tensor_stream(&bytes, &TensorLimits::default()).unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}

/// Decodes a hand-made body under a header of `n` values.
fn decode_body(codec: Codec, n: usize, body: &[u8]) -> Result<Vec<f32>, ProtocolError> {
    let h = header(codec, n, body.len());
    let mut bytes = encode_header(&h)?;
    bytes.extend_from_slice(body);
    let (_, values) = decode_tensor_stream(&bytes, &TensorLimits::for_model(n as u64))?;
    // The chunked path agrees, byte by byte.
    assert_eq!(decode_chunked(&h, body, 1)?, values);
    Ok(values)
}

fn varint(mut v: u32, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A top-k body of one block with the given gaps and f32 values.
fn topk_block(gaps: &[u32], values: &[f32]) -> Vec<u8> {
    let mut block = Vec::new();
    for g in gaps {
        varint(*g, &mut block);
    }
    for v in values {
        block.extend_from_slice(&v.to_le_bytes());
    }
    let mut body = (block.len() as u32).to_le_bytes().to_vec();
    body.extend_from_slice(&block);
    body
}

#[test]
fn hostile_top_k_bodies_are_refused() {
    // 10 values, 30%: k = 3.
    let c = topk(0.3, ValueCodec::F32);
    let ok = decode_body(c, 10, &topk_block(&[1, 0, 5], &[1.0, 2.0, 3.0])).unwrap();
    assert_eq!(ok, vec![0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0]);
    // An index past the end.
    assert!(decode_body(c, 10, &topk_block(&[1, 0, 7], &[1.0, 2.0, 3.0])).is_err());
    // A gap that overflows u32.
    assert!(decode_body(c, 10, &topk_block(&[u32::MAX, 0, 0], &[1.0, 2.0, 3.0])).is_err());
    // A non-finite kept value.
    assert!(decode_body(c, 10, &topk_block(&[0, 0, 0], &[1.0, f32::NAN, 3.0])).is_err());
    // A block length that disagrees with its contents.
    let mut lying = topk_block(&[0, 0, 0], &[1.0, 2.0, 3.0]);
    lying[0] += 1;
    lying.push(0);
    assert!(decode_body(c, 10, &lying).is_err());
    // An unterminated varint eating into the values.
    let mut body = vec![0u8; 4];
    body.extend_from_slice(&[0x80, 0x80, 0x80]);
    body.extend_from_slice(&[0u8; 12]);
    let len = (body.len() - 4) as u32;
    body[..4].copy_from_slice(&len.to_le_bytes());
    assert!(decode_body(c, 10, &body).is_err());
    // Trailing bytes after the last block, and a truncated body.
    let mut long = topk_block(&[0, 0, 0], &[1.0, 2.0, 3.0]);
    long.push(0);
    assert!(decode_body(c, 10, &long).is_err());
    let short = topk_block(&[0, 0, 0], &[1.0, 2.0, 3.0]);
    let h = header(c, 10, short.len());
    let mut dec = BodyDecoder::new(&h);
    let mut out = vec![0f32; 10];
    dec.push(&short[..short.len() - 1], &mut out).unwrap();
    assert!(dec.finish().is_err());
}

#[test]
fn hostile_int8_and_half_bodies_are_refused() {
    // An int8 block whose scale is NaN, infinite, negative or so large that
    // q = -128 overflows.
    for scale in [f32::NAN, f32::INFINITY, -1.0, f32::MAX / 64.0] {
        let mut body = scale.to_le_bytes().to_vec();
        body.extend_from_slice(&[0x80, 1]);
        assert!(decode_body(Codec::Int8, 2, &body).is_err(), "scale {scale}");
    }
    let mut body = f32::MAX.div_euclid(128.0).to_le_bytes().to_vec();
    body.extend_from_slice(&[0x80, 0x7f]);
    assert!(
        decode_body(Codec::Int8, 2, &body).is_ok(),
        "the largest scale"
    );
    // f16 and bf16 infinities and NaNs.
    for bits in [0x7c00u16, 0xfe00] {
        assert!(decode_body(Codec::F16, 1, &bits.to_le_bytes()).is_err());
    }
    for bits in [0x7f80u16, 0xffc1] {
        assert!(decode_body(Codec::Bf16, 1, &bits.to_le_bytes()).is_err());
    }
}

#[test]
fn headers_with_impossible_lengths_are_refused_before_allocation() {
    let limits = TensorLimits::for_model(1 << 20);
    // Dense codecs need an exact length.
    for (codec, n, len) in [
        (Codec::F16, 100, 201),
        (Codec::Int8, 2000, 2000 + 4),
        (Codec::Bf16, 3, 5),
    ] {
        let h = header(codec, n, len);
        assert!(matches!(
            decode_header(&encode_header(&h).unwrap()[8..], &limits),
            Err(ProtocolError::BodyLengthMismatch { .. })
        ));
    }
    // Top-k bodies must fit between the shortest and longest encodings of k entries.
    let c = topk(0.01, ValueCodec::F32);
    // k = ceil(0.01 x 2^20) = 10,486 entries in 11 blocks: 52,474 to 94,418 bytes.
    for len in [0, 52_473, 94_419, usize::MAX / 2] {
        let h = header(c, 1 << 20, len);
        assert!(decode_header(&encode_header(&h).unwrap()[8..], &limits).is_err());
    }
    // A bad fraction is refused.
    for fraction_ppm in [0, PPM + 1] {
        let h = header(
            Codec::TopK {
                fraction_ppm,
                values: ValueCodec::F32,
            },
            10,
            9,
        );
        assert!(decode_header(&encode_header(&h).unwrap()[8..], &limits).is_err());
    }
    // An unvalidated header makes a decoder that refuses every push.
    let h = header(Codec::F16, 4, 7);
    let mut dec = BodyDecoder::new(&h);
    assert!(dec.push(&[0; 7], &mut [0f32; 4]).is_err());
    assert!(dec.finish().is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_values_any_chunks(
        values in prop::collection::vec(-1e3f32..1e3, 1..3000),
        codec_index in 0usize..12,
        chunk in 1usize..700,
        seed in any::<u64>(),
    ) {
        let codec = all()[codec_index];
        let (h, bytes) = stream(codec, &values, seed);
        let body = &bytes[bytes.len() - h.body_len as usize..];
        let whole = decode_tensor_stream(&bytes, &TensorLimits::for_model(values.len() as u64));
        prop_assert!(whole.is_ok(), "{codec}: {:?}", whole.err());
        let (_, whole) = whole.unwrap();
        prop_assert_eq!(decode_chunked(&h, body, chunk).unwrap(), whole);
    }

    #[test]
    fn random_bodies_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..600),
        codec_index in 0usize..12,
        n in 1usize..300,
        chunk in 1usize..64,
    ) {
        let codec = all()[codec_index];
        let h = header(codec, n, body.len());
        let _ = decode_chunked(&h, &body, chunk);
        let mut bytes = encode_header(&h).unwrap();
        bytes.extend_from_slice(&body);
        let _ = decode_tensor_stream(&bytes, &TensorLimits::for_model(n as u64));
    }
}
