//! Tensor streams: one model (or one update) on its own unidirectional
//! stream.
//!
//! Layout: `b"FQT1"`, a u32 little-endian header length, a postcard
//! [`TensorHeader`], then the body: every tensor's values in header order,
//! row-major, encoded with the header's [`Codec`] (f32: little-endian, no
//! padding; the others: see [`crate::codec`]). The body may arrive in chunks
//! of any size (even splitting a value or a block); [`BodyDecoder`] decodes it
//! straight into the caller's buffer and checks every value is finite.

use serde::{Deserialize, Serialize};

use fedquic_privacy::dp::NormAccumulator;

use crate::codec::{BlockDecoder, Codec};
use crate::error::{ProtocolError, Result};
use crate::message::Metrics;

pub const TENSOR_STREAM_MAGIC: [u8; 4] = *b"FQT1";
/// Magic plus the header length.
pub const TENSOR_PREFIX_LEN: usize = 8;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// The aggregator's global model, for a fit or evaluate task.
    GlobalModel,
    /// A client's update: the delta `w_local - w_global`.
    Update,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: DType,
}

impl TensorMeta {
    pub fn f32(name: impl Into<String>, shape: &[usize]) -> Self {
        TensorMeta {
            name: name.into(),
            shape: shape.iter().map(|&d| d as u64).collect(),
            dtype: DType::F32,
        }
    }

    /// Number of elements, or `None` on overflow.
    pub fn elements(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TensorHeader {
    pub kind: StreamKind,
    pub round: u64,
    pub task_id: u64,
    pub codec: Codec,
    pub tensors: Vec<TensorMeta>,
    /// Training examples behind an update (its FedAvg weight); 0 for models.
    pub num_examples: u64,
    /// Training metrics of an update (loss, accuracy...); empty for models.
    pub metrics: Metrics,
    /// Exact length of the body in bytes.
    pub body_len: u64,
}

impl TensorHeader {
    /// Total number of values across all tensors (checked).
    pub fn total_values(&self) -> Result<u64> {
        let mut total = 0u64;
        for t in &self.tensors {
            let n = t.elements().ok_or_else(|| ProtocolError::BadTensor {
                name: t.name.clone(),
                reason: "element count overflows".into(),
            })?;
            total = total.checked_add(n).ok_or(ProtocolError::TooManyValues {
                values: u64::MAX,
                max: u64::MAX,
            })?;
        }
        Ok(total)
    }

    /// Checks that the stream carries exactly the expected tensors, in order.
    pub fn check_layout(&self, expected: &[TensorMeta]) -> Result<()> {
        if self.tensors.len() != expected.len() {
            return Err(ProtocolError::LayoutMismatch(format!(
                "{} tensors, expected {}",
                self.tensors.len(),
                expected.len()
            )));
        }
        for (got, want) in self.tensors.iter().zip(expected) {
            if got != want {
                return Err(ProtocolError::LayoutMismatch(format!(
                    "got tensor '{}' {:?} {:?}, expected '{}' {:?} {:?}",
                    truncate(&got.name),
                    &got.shape[..got.shape.len().min(8)],
                    got.dtype,
                    want.name,
                    want.shape,
                    want.dtype
                )));
            }
        }
        Ok(())
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The largest tensor-stream header accepted by default.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Bounds that a receiver enforces on a tensor stream before allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorLimits {
    pub max_header_bytes: usize,
    pub max_tensors: usize,
    pub max_name_bytes: usize,
    pub max_rank: usize,
    /// The largest number of values a stream may carry; set it from the
    /// model spec so a peer cannot make us allocate more than the model.
    pub max_values: u64,
}

impl Default for TensorLimits {
    fn default() -> Self {
        TensorLimits {
            // Real headers are under 1 KiB (a name, shape and dtype per
            // tensor); 64 KiB leaves room for models with hundreds of
            // tensors without letting a peer make us buffer more.
            max_header_bytes: MAX_HEADER_BYTES,
            max_tensors: 4096,
            max_name_bytes: 256,
            max_rank: 8,
            max_values: 1 << 30,
        }
    }
}

impl TensorLimits {
    /// Limits for streams that must carry exactly `values` values.
    pub fn for_model(values: u64) -> Self {
        TensorLimits {
            max_values: values,
            ..Self::default()
        }
    }
}

/// The index of the first NaN or infinity in `values`. Every received value
/// passes through this, so it scans blocks without a branch per value (which
/// vectorises, where `position` branches on each value: the tensor decoder's
/// share of a round's CPU fell 3-4x) and looks for the index only in a block
/// that has one.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    const BLOCK: usize = 1024;
    values
        .chunks(BLOCK)
        .enumerate()
        .find(|(_, block)| any_non_finite(block))
        .and_then(|(b, block)| {
            block
                .iter()
                .position(|v| !v.is_finite())
                .map(|i| b * BLOCK + i)
        })
}

fedquic_simd::avx2_dispatch! {
    /// Eight values per compare with AVX2 instead of the baseline's four: every
    /// value a peer sends passes through here.
    fn any_non_finite(block: &[f32]) -> bool => any_non_finite_portable
}

#[inline(always)]
fn any_non_finite_portable(block: &[f32]) -> bool {
    block.iter().fold(false, |bad, v| bad | !v.is_finite())
}

/// Encodes the stream prefix and header. The body follows as
/// [`encode_f32_body`] or [`crate::codec::encode_body`] output.
pub fn encode_header(header: &TensorHeader) -> Result<Vec<u8>> {
    let mut prefix = Vec::with_capacity(256);
    prefix.extend_from_slice(&TENSOR_STREAM_MAGIC);
    prefix.extend_from_slice(&[0u8; 4]);
    let mut out =
        postcard::to_extend(header, prefix).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    let len = out.len() - TENSOR_PREFIX_LEN;
    let len32 = u32::try_from(len).map_err(|_| ProtocolError::Encode("header too large".into()))?;
    out[4..8].copy_from_slice(&len32.to_le_bytes());
    Ok(out)
}

/// Appends `values` as little-endian f32 bytes.
pub fn encode_f32_body(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Checks the 8-byte prefix and returns the header's length.
pub fn header_len_from_prefix(
    prefix: &[u8; TENSOR_PREFIX_LEN],
    limits: &TensorLimits,
) -> Result<usize> {
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&prefix[..4]);
    if magic != TENSOR_STREAM_MAGIC {
        return Err(ProtocolError::BadMagic { found: magic });
    }
    let len = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]) as usize;
    if len > limits.max_header_bytes {
        return Err(ProtocolError::HeaderTooLarge {
            len,
            max: limits.max_header_bytes,
        });
    }
    if len == 0 {
        return Err(ProtocolError::Malformed("empty tensor header".into()));
    }
    Ok(len)
}

/// Decodes and validates a header (the bytes after the prefix).
pub fn decode_header(bytes: &[u8], limits: &TensorLimits) -> Result<TensorHeader> {
    if bytes.len() > limits.max_header_bytes {
        return Err(ProtocolError::HeaderTooLarge {
            len: bytes.len(),
            max: limits.max_header_bytes,
        });
    }
    let (header, rest) = postcard::take_from_bytes::<TensorHeader>(bytes)
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::TrailingBytes {
            trailing: rest.len(),
        });
    }
    if header.tensors.len() > limits.max_tensors {
        return Err(ProtocolError::TooManyTensors {
            count: header.tensors.len(),
            max: limits.max_tensors,
        });
    }
    for t in &header.tensors {
        let bad = |reason: &str| ProtocolError::BadTensor {
            name: truncate(&t.name).to_string(),
            reason: reason.into(),
        };
        if t.name.is_empty() || t.name.len() > limits.max_name_bytes {
            return Err(bad("name must be 1 to max_name_bytes bytes"));
        }
        if t.shape.len() > limits.max_rank {
            return Err(bad("rank exceeds the limit"));
        }
        if t.shape.contains(&0) {
            return Err(bad("zero-sized dimension"));
        }
    }
    let values = header.total_values()?;
    if values > limits.max_values {
        return Err(ProtocolError::TooManyValues {
            values,
            max: limits.max_values,
        });
    }
    if header.tensors.iter().any(|t| t.dtype != DType::F32) {
        return Err(ProtocolError::Malformed(
            "tensor streams carry f32 tensors (the codec says how they travel)".into(),
        ));
    }
    // Checked arithmetic inside: with a large `max_values` (up to
    // `u64::MAX`) the byte length can overflow, and a wrapped length would
    // let a tiny body pass for a huge model (found with fuzz/ tensor_stream;
    // tests/fuzz_regressions.rs).
    let (min, max) = header.codec.body_len_bounds(values)?;
    if min == max && header.body_len != min {
        return Err(ProtocolError::BodyLengthMismatch {
            declared: header.body_len,
            expected: min,
        });
    }
    if header.body_len < min || header.body_len > max {
        return Err(ProtocolError::Malformed(format!(
            "{} body of {} bytes: {values} values need {min} to {max}",
            header.codec, header.body_len
        )));
    }
    if header.metrics.iter().any(|(_, v)| !v.is_finite()) {
        return Err(ProtocolError::Malformed("non-finite metric".into()));
    }
    Ok(header)
}

/// Reassembles a body from chunks of any size, decoding it straight into
/// the caller's buffer as it arrives: f32 values as soon as their four bytes
/// are in, other codecs block by block (see [`crate::codec`]). Every value is
/// checked finite. Built from a header [`decode_header`] accepted; a header
/// that was not validated fails on the first push.
#[derive(Debug)]
pub struct BodyDecoder {
    declared: u64,
    received: u64,
    values: usize,
    /// Why the header cannot be decoded (unvalidated input).
    invalid: Option<ProtocolError>,
    /// `None`: the f32 fast path below.
    blocks: Option<BlockDecoder>,
    /// Bytes of a float split across chunks.
    carry: [u8; 4],
    carry_len: usize,
    written: usize,
    /// The norm of the values decoded so far ([`Self::with_norm`]).
    norm: Option<NormAccumulator>,
}

impl BodyDecoder {
    pub fn new(header: &TensorHeader) -> Self {
        let checked = header.total_values().and_then(|n| {
            let (min, max) = header.codec.body_len_bounds(n)?;
            let n = usize::try_from(n).map_err(|_| ProtocolError::TooManyValues {
                values: n,
                max: usize::MAX as u64,
            })?;
            if header.body_len < min || header.body_len > max {
                return Err(ProtocolError::BodyLengthMismatch {
                    declared: header.body_len,
                    expected: min,
                });
            }
            Ok(n)
        });
        let (values, invalid) = match checked {
            Ok(n) => (n, None),
            Err(e) => (0, Some(e)),
        };
        BodyDecoder {
            declared: header.body_len,
            received: 0,
            values,
            invalid,
            blocks: (header.codec != Codec::F32).then(|| BlockDecoder::new(header.codec, values)),
            carry: [0; 4],
            carry_len: 0,
            written: 0,
            norm: None,
        }
    }

    /// A decoder that also takes the L2 norm of the values as it decodes
    /// them, while each chunk is still in cache ([`Self::norm`]): the
    /// aggregator needs every update's norm, and a separate pass over a
    /// large update costs more than the decode itself. Only dense value
    /// codecs are tracked: top-k bodies are mostly zeros written out of
    /// order, and secure aggregation's masked words are not values.
    pub fn with_norm(header: &TensorHeader) -> Self {
        let mut decoder = Self::new(header);
        if matches!(
            header.codec,
            Codec::F32 | Codec::F16 | Codec::Bf16 | Codec::Int8
        ) {
            decoder.norm = Some(NormAccumulator::default());
        }
        decoder
    }

    /// The L2 norm of the decoded values, exactly as
    /// [`fedquic_privacy::dp::l2_norm`] computes it over the output buffer,
    /// once [`Self::finish`] succeeded; `None` before, or if not tracked.
    pub fn norm(&self) -> Option<f64> {
        match self.finish() {
            Ok(()) => self.norm.map(|n| n.norm()),
            Err(_) => None,
        }
    }

    /// Number of values needed in the output buffer.
    pub fn values(&self) -> usize {
        self.values
    }

    /// Decodes `chunk` into `out` (which must hold [`Self::values`] values).
    /// Fails on overrun, on malformed blocks, or on any non-finite value.
    pub fn push(&mut self, chunk: &[u8], out: &mut [f32]) -> Result<()> {
        if let Some(e) = &self.invalid {
            return Err(e.clone());
        }
        if out.len() < self.values {
            return Err(ProtocolError::OutputTooSmall {
                have: out.len(),
                need: self.values,
            });
        }
        let remaining = self.declared - self.received;
        if chunk.len() as u64 > remaining {
            return Err(ProtocolError::BodyOverrun {
                declared: self.declared,
            });
        }
        self.received += chunk.len() as u64;
        match &mut self.blocks {
            Some(blocks) => blocks.push(chunk, out, self.norm.as_mut()),
            None => self.push_f32(chunk, out),
        }
    }

    fn push_f32(&mut self, mut chunk: &[u8], out: &mut [f32]) -> Result<()> {
        if self.carry_len > 0 {
            let take = (4 - self.carry_len).min(chunk.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&chunk[..take]);
            self.carry_len += take;
            chunk = &chunk[take..];
            if self.carry_len < 4 {
                return Ok(());
            }
            self.store(f32::from_le_bytes(self.carry), out)?;
            self.carry_len = 0;
        }
        let whole = chunk.len() / 4 * 4;
        let dst = &mut out[self.written..self.written + whole / 4];
        for (d, b) in dst.iter_mut().zip(chunk[..whole].chunks_exact(4)) {
            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        // Checked after the vectorisable copy loop.
        if let Some(i) = first_non_finite(dst) {
            return Err(ProtocolError::NonFinite {
                index: self.written + i,
            });
        }
        if let Some(norm) = &mut self.norm {
            norm.add(self.written, dst);
        }
        self.written += whole / 4;
        let tail = &chunk[whole..];
        self.carry[..tail.len()].copy_from_slice(tail);
        self.carry_len = tail.len();
        Ok(())
    }

    fn store(&mut self, v: f32, out: &mut [f32]) -> Result<()> {
        if !v.is_finite() {
            return Err(ProtocolError::NonFinite {
                index: self.written,
            });
        }
        out[self.written] = v;
        if let Some(norm) = &mut self.norm {
            norm.add(self.written, &[v]);
        }
        self.written += 1;
        Ok(())
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn is_complete(&self) -> bool {
        self.received == self.declared
    }

    /// Fails unless the whole declared body arrived and decoded to every value.
    pub fn finish(&self) -> Result<()> {
        if let Some(e) = &self.invalid {
            return Err(e.clone());
        }
        if !self.is_complete() {
            return Err(ProtocolError::BodyTruncated {
                got: self.received,
                declared: self.declared,
            });
        }
        match &self.blocks {
            Some(blocks) if !blocks.is_done() => Err(ProtocolError::Malformed(
                "body ended before its last block".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Decodes a whole tensor stream held in memory (tests, fuzzing, files).
pub fn decode_tensor_stream(
    bytes: &[u8],
    limits: &TensorLimits,
) -> Result<(TensorHeader, Vec<f32>)> {
    let prefix: &[u8; TENSOR_PREFIX_LEN] = bytes
        .get(..TENSOR_PREFIX_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or(ProtocolError::Malformed(
            "stream shorter than its prefix".into(),
        ))?;
    let header_len = header_len_from_prefix(prefix, limits)?;
    let header_end = TENSOR_PREFIX_LEN + header_len;
    let header_bytes = bytes
        .get(TENSOR_PREFIX_LEN..header_end)
        .ok_or(ProtocolError::Malformed(
            "stream shorter than its header".into(),
        ))?;
    let header = decode_header(header_bytes, limits)?;
    let body = &bytes[header_end..];
    // The body length is known and bounded now; only allocate for what arrived.
    if (body.len() as u64) < header.body_len {
        return Err(ProtocolError::BodyTruncated {
            got: body.len() as u64,
            declared: header.body_len,
        });
    }
    let mut decoder = BodyDecoder::new(&header);
    let mut values = vec![0f32; decoder.values()];
    decoder.push(body, &mut values)?;
    decoder.finish()?;
    Ok((header, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finiteness_check_agrees_on_every_instruction_set() {
        for len in [0usize, 1, 7, 8, 9, 31, 1_024] {
            for bad in [
                None,
                Some(f32::NAN),
                Some(f32::INFINITY),
                Some(f32::NEG_INFINITY),
            ] {
                for at in [0, len / 2, len.saturating_sub(1)] {
                    let mut block = vec![f32::MAX; len];
                    if let (Some(v), true) = (bad, len > 0) {
                        block[at] = v;
                    }
                    let expected = bad.is_some() && len > 0;
                    assert_eq!(any_non_finite_portable(&block), expected);
                    assert_eq!(any_non_finite(&block), expected);
                }
            }
        }
    }
}
