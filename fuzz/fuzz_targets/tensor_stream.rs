//! Tensor-stream decoders: `decode_tensor_stream` on the whole buffer, and the
//! streaming path a receiver takes (`header_len_from_prefix`, `decode_header`,
//! then `BodyDecoder` fed in fuzz-chosen chunks), under limits picked by the
//! input (mostly `TensorLimits::for_model(4096)`).
//!
//! Checks, besides "no panic, no sanitizer report":
//! - the chunked path and the whole-buffer path agree: the same header and
//!   the same values, or both fail;
//! - a decoded stream holds exactly `total_values()` finite values, and its
//!   body length is within its codec's bounds;
//! - a decoded header round-trips through `encode_header` (canonical bytes no
//!   longer than the input's header, same header back), and the whole stream
//!   re-encodes with its codec to one that decodes to the same header and (but
//!   for int8, which re-quantises) the same values.
//!
//! The codec is in the header, so one target covers every codec: f32, f16,
//! bf16, int8 and top-k with each value codec (seeds for each from
//! `make_seeds`).

#![no_main]

use fedquic_fuzz::{ChunkPlan, split_tensor_input};
use fedquic_protocol::{
    BodyDecoder, ProtocolError, TENSOR_PREFIX_LEN, TENSOR_STREAM_MAGIC, TensorHeader, TensorLimits,
    ValueCodec, decode_header, decode_tensor_stream, encode_body, encode_header,
    header_len_from_prefix,
};
use libfuzzer_sys::fuzz_target;

/// The chunked path allocates its output before the body arrives, as a
/// receiver does; above this many values it only runs when the whole body is
/// in the input (so the fuzzer cannot make it allocate gigabytes).
const MAX_PREALLOCATED_VALUES: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let (limits, plan, wire) = split_tensor_input(data);

    let whole = decode_tensor_stream(wire, &limits);
    if let Ok((header, values)) = &whole {
        check_decoded(header, values, &limits);
    }

    match (&whole, chunked(wire, plan, &limits)) {
        (Ok(w), Some(Ok(c))) => assert_eq!(*w, c, "chunked decoding disagrees"),
        (Err(_), Some(Err(_)) | None) => {}
        (Ok(_), None) => panic!("whole-buffer decoding accepted a truncated body"),
        (w, Some(c)) => panic!("whole-buffer {w:?} but chunked {c:?}"),
    }
});

/// The streaming receive path. `None`: skipped (body truncated and too large
/// to preallocate); the whole-buffer path must fail then.
fn chunked(
    wire: &[u8],
    plan: ChunkPlan<'_>,
    limits: &TensorLimits,
) -> Option<Result<(TensorHeader, Vec<f32>), ProtocolError>> {
    let Some(prefix) = wire.get(..TENSOR_PREFIX_LEN) else {
        return Some(Err(ProtocolError::Malformed("short prefix".into())));
    };
    let prefix: &[u8; TENSOR_PREFIX_LEN] = prefix.try_into().unwrap();
    let header_len = match header_len_from_prefix(prefix, limits) {
        Ok(len) => len,
        Err(e) => return Some(Err(e)),
    };
    let Some(header_bytes) = wire.get(TENSOR_PREFIX_LEN..TENSOR_PREFIX_LEN + header_len) else {
        return Some(Err(ProtocolError::Malformed("short header".into())));
    };
    let header = match decode_header(header_bytes, limits) {
        Ok(header) => header,
        Err(e) => return Some(Err(e)),
    };
    check_header_round_trip(&header, header_bytes.len(), limits);
    let body = &wire[TENSOR_PREFIX_LEN + header_len..];

    let mut dec = BodyDecoder::new(&header);
    assert_eq!(Ok(dec.values() as u64), header.total_values());
    if dec.values() > MAX_PREALLOCATED_VALUES && (body.len() as u64) < header.body_len {
        return None;
    }
    let mut out = vec![0f32; dec.values()];
    let mut pushed = 0u64;
    for chunk in plan.chunks(body) {
        if let Err(e) = dec.push(chunk, &mut out) {
            return Some(Err(e));
        }
        pushed += chunk.len() as u64;
        assert_eq!(dec.received(), pushed);
    }
    Some(dec.finish().map(|()| (header, out)))
}

fn check_decoded(header: &TensorHeader, values: &[f32], limits: &TensorLimits) {
    let total = header.total_values().expect("a decoded header has a total");
    assert!(total <= limits.max_values);
    assert_eq!(values.len() as u64, total);
    let (min, max) = header
        .codec
        .body_len_bounds(total)
        .expect("a decoded header's codec has bounds");
    assert!((min..=max).contains(&header.body_len));
    assert!(values.iter().all(|v| v.is_finite()));
    header
        .check_layout(&header.tensors)
        .expect("a header matches its own layout");

    // The whole stream re-encodes (same codec) to one that decodes. Values
    // already on the codec's grid come back exactly; int8 re-quantises.
    let mut body = Vec::new();
    encode_body(header.codec, values, 0, &mut body).expect("decoded values re-encode");
    let again = TensorHeader {
        body_len: body.len() as u64,
        ..header.clone()
    };
    let mut bytes = encode_header(&again).expect("a decoded header re-encodes");
    bytes.extend_from_slice(&body);
    let (h, v) = decode_tensor_stream(&bytes, limits).expect("a re-encoded stream decodes");
    assert_eq!(h, again);
    if header.codec.value_codec() != ValueCodec::Int8 {
        assert_eq!(v, values, "{} does not round-trip its own grid", header.codec);
    }
}

/// `encode_header` gives a canonical encoding that decodes to the same header.
fn check_header_round_trip(header: &TensorHeader, decoded_len: usize, limits: &TensorLimits) {
    let bytes = encode_header(header).expect("a decoded header re-encodes");
    assert_eq!(bytes[..4], TENSOR_STREAM_MAGIC);
    let prefix: &[u8; TENSOR_PREFIX_LEN] = bytes[..TENSOR_PREFIX_LEN].try_into().unwrap();
    let len = header_len_from_prefix(prefix, limits).expect("an encoded prefix is valid");
    assert_eq!(len, bytes.len() - TENSOR_PREFIX_LEN);
    assert!(
        len <= decoded_len,
        "canonical header ({len}) longer than the decoded one ({decoded_len})"
    );
    let again = decode_header(&bytes[TENSOR_PREFIX_LEN..], limits).expect("re-decodes");
    assert_eq!(&again, header);
    let bytes2 = encode_header(&again).expect("re-encodes");
    assert_eq!(bytes, bytes2);
}
