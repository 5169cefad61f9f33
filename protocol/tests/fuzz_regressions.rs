//! Inputs that broke a decoder, found with the cargo-fuzz targets in `fuzz/`
//! (see fuzz/README.md). Each test holds the offending bytes inline.

use fedquic_protocol::*;

/// `FQT1`, header length 23, then a header declaring one f32 tensor of shape
/// [2^31, 2^31, 2] (2^63 values) and a body of 0 bytes.
const HUGE_TENSOR_ZERO_BODY: [u8; 31] = [
    0x46, 0x51, 0x54, 0x31, 0x17, 0x00, 0x00, 0x00, // magic, header length
    0x01, // kind: Update
    0x00, // round 0
    0x00, // task id 0
    0x00, // codec: F32
    0x01, // one tensor
    0x01, 0x77, // name "w"
    0x03, // rank 3
    0x80, 0x80, 0x80, 0x80, 0x08, // 2^31
    0x80, 0x80, 0x80, 0x80, 0x08, // 2^31
    0x02, // 2
    0x00, // dtype: F32
    0x00, // num_examples 0
    0x00, // no metrics
    0x00, // body_len 0
];

fn huge_header(shape: &[usize], body_len: u64) -> TensorHeader {
    TensorHeader {
        kind: StreamKind::Update,
        round: 0,
        task_id: 0,
        codec: Codec::F32,
        tensors: vec![TensorMeta::f32("w", shape)],
        num_examples: 0,
        metrics: Vec::new(),
        body_len,
    }
}

/// With no value limit (`max_values` = u64::MAX), the body length of a
/// 2^63-value header overflowed u64: a panic with overflow checks, and in
/// release builds a wrapped length of 0 that accepted the empty body as a
/// 2^63-value stream. Now the header is refused.
#[test]
fn body_length_overflow_is_refused_not_wrapped() {
    let header = huge_header(&[1 << 31, 1 << 31, 2], 0);
    assert_eq!(encode_header(&header).unwrap(), HUGE_TENSOR_ZERO_BODY);

    let unlimited = TensorLimits::for_model(u64::MAX);
    let err = decode_tensor_stream(&HUGE_TENSOR_ZERO_BODY, &unlimited).unwrap_err();
    assert!(
        matches!(err, ProtocolError::TooManyValues { values, .. } if values == 1 << 63),
        "{err:?}"
    );
    assert!(decode_header(&HUGE_TENSOR_ZERO_BODY[TENSOR_PREFIX_LEN..], &unlimited).is_err());
    // Realistic limits refused it before, and still do.
    assert!(matches!(
        decode_tensor_stream(&HUGE_TENSOR_ZERO_BODY, &TensorLimits::for_model(4096)),
        Err(ProtocolError::TooManyValues { .. })
    ));
}

/// The largest value count whose byte length fits in u64 still decodes as a
/// header; a stream with it and no body is refused as truncated, before any
/// allocation.
#[test]
fn largest_representable_body_length_is_checked_not_wrapped() {
    let unlimited = TensorLimits::for_model(u64::MAX);
    let values = u64::MAX / 4;
    let header = huge_header(&[values as usize], values * 4);
    let bytes = encode_header(&header).unwrap();
    assert_eq!(
        decode_header(&bytes[TENSOR_PREFIX_LEN..], &unlimited).unwrap(),
        header
    );
    assert!(matches!(
        decode_tensor_stream(&bytes, &unlimited),
        Err(ProtocolError::BodyTruncated { got: 0, .. })
    ));
    let one_more = huge_header(&[values as usize + 1], 0);
    let bytes = encode_header(&one_more).unwrap();
    assert!(matches!(
        decode_header(&bytes[TENSOR_PREFIX_LEN..], &unlimited),
        Err(ProtocolError::TooManyValues { .. })
    ));
}
