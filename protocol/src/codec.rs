//! Update and model codecs: how the values of a tensor stream are encoded.
//!
//! Every codec encodes the stream's values (all tensors, flattened in header
//! order) as a sequence of self-contained blocks of at most [`BLOCK_VALUES`]
//! values, so a receiver decodes block by block as bytes arrive, straight
//! into its output buffer, holding at most one block's bytes
//! ([`MAX_UNIT_BYTES`]) when a block is split across network chunks.
//!
//! - `f32`: little-endian IEEE-754 single precision, 4 bytes a value (lossless).
//! - `f16`, `bf16`: 2 bytes a value, rounded to nearest even; values beyond
//!   the format's range saturate at its largest finite value.
//! - `int8`: per block, an f32 scale `s = max|x| / 127`, then one `i8` per
//!   value, `x ~ q s`. Rounding is stochastic (`q = floor(x / s + u)`,
//!   `u ~ U[0, 1)` from a seeded generator), so `E[q s] = x`: unbiased.
//! - `top-k:FRACTION[+VALUES]`: the `k = ceil(FRACTION n)` values of largest
//!   magnitude (ties: the lower index), as blocks of at most [`BLOCK_VALUES`]
//!   entries. A block is a `u32` byte length, then its indices as LEB128 gaps
//!   (the first index of the stream absolute, each next one as
//!   `index - previous - 1`), then its values in the `VALUES` codec (default
//!   `f32`). Every other value decodes as zero.
//!
//! Decoders trust nothing: the header's body length is checked against the
//! codec's bounds before anything is allocated, indices must increase and stay
//! inside the model, scales and values must be finite, and every block must
//! end exactly where its length says.

use std::fmt;
use std::str::FromStr;

use fedquic_privacy::dp::NormAccumulator;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use serde::{Deserialize, Serialize};

use crate::error::{ProtocolError, Result};

/// Values (or top-k entries) per block.
pub const BLOCK_VALUES: usize = 1024;
/// Parts per million: the resolution of a top-k fraction.
pub const PPM: u32 = 1_000_000;
/// The longest LEB128 encoding of a `u32` gap.
const MAX_VARINT_BYTES: usize = 5;
/// The most bytes any block takes (a top-k block of f32 values with
/// five-byte gaps, length field excluded): the most a decoder stages.
pub const MAX_UNIT_BYTES: usize = BLOCK_VALUES * (MAX_VARINT_BYTES + 4);

/// How the values of a dense block (or of a top-k block's entries) are coded.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueCodec {
    F32,
    F16,
    Bf16,
    Int8,
    /// Secure aggregation's masked integers (mod 2^32), four bytes each,
    /// carried bit for bit in `f32` slots (`f32::from_bits`): they are not
    /// numbers until the masks cancel, so no finiteness check applies.
    Ring32,
}

/// How tensor bodies are encoded on the wire.
///
/// `F32` is variant 0, so a `Hello` offering only `F32` encodes exactly as it
/// did before the other codecs existed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Raw little-endian IEEE-754 f32.
    F32,
    F16,
    Bf16,
    /// Per-block scale, stochastic rounding.
    Int8,
    /// The largest-magnitude `fraction_ppm / 1e6` of the values.
    TopK {
        fraction_ppm: u32,
        values: ValueCodec,
    },
    /// Secure aggregation's masked input (see [`ValueCodec::Ring32`]). Never
    /// negotiated: a fit task with secure aggregation implies it.
    Ring32,
}

impl From<ValueCodec> for Codec {
    fn from(v: ValueCodec) -> Codec {
        match v {
            ValueCodec::F32 => Codec::F32,
            ValueCodec::F16 => Codec::F16,
            ValueCodec::Bf16 => Codec::Bf16,
            ValueCodec::Int8 => Codec::Int8,
            ValueCodec::Ring32 => Codec::Ring32,
        }
    }
}

impl ValueCodec {
    /// Bytes of one block of `len` values.
    pub fn block_bytes(self, len: usize) -> usize {
        match self {
            ValueCodec::F32 | ValueCodec::Ring32 => 4 * len,
            ValueCodec::F16 | ValueCodec::Bf16 => 2 * len,
            ValueCodec::Int8 => 4 + len,
        }
    }

    /// Bytes of `n` values split into blocks of [`BLOCK_VALUES`] (checked).
    fn blocks_bytes(self, n: u64) -> u128 {
        let n = n as u128;
        let blocks = n.div_ceil(BLOCK_VALUES as u128);
        match self {
            ValueCodec::F32 | ValueCodec::Ring32 => 4 * n,
            ValueCodec::F16 | ValueCodec::Bf16 => 2 * n,
            ValueCodec::Int8 => 4 * blocks + n,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ValueCodec::F32 => "f32",
            ValueCodec::F16 => "f16",
            ValueCodec::Bf16 => "bf16",
            ValueCodec::Int8 => "int8",
            ValueCodec::Ring32 => "ring32",
        }
    }

    /// Appends one block (at most [`BLOCK_VALUES`] finite values).
    fn encode_block(self, values: &[f32], rng: &mut SplitMix64, out: &mut Vec<u8>) {
        match self {
            ValueCodec::F32 => {
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            ValueCodec::Ring32 => {
                for v in values {
                    out.extend_from_slice(&v.to_bits().to_le_bytes());
                }
            }
            ValueCodec::F16 => {
                // Slice conversion: F16C instructions where the CPU has them.
                let mut clamped = [0f32; BLOCK_VALUES];
                let clamped = &mut clamped[..values.len()];
                for (c, v) in clamped.iter_mut().zip(values) {
                    *c = v.clamp(-F16_MAX, F16_MAX);
                }
                let mut halves = [half::f16::ZERO; BLOCK_VALUES];
                let halves = &mut halves[..values.len()];
                halves.convert_from_f32_slice(clamped);
                for h in halves.iter() {
                    out.extend_from_slice(&h.to_bits().to_le_bytes());
                }
            }
            ValueCodec::Bf16 => {
                for v in values {
                    let mut b = half::bf16::from_f32(*v);
                    if !b.is_finite() {
                        // Rounded past the largest bf16: saturate.
                        b = if *v > 0.0 {
                            half::bf16::MAX
                        } else {
                            half::bf16::MIN
                        };
                    }
                    out.extend_from_slice(&b.to_bits().to_le_bytes());
                }
            }
            ValueCodec::Int8 => {
                let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = max / 127.0;
                out.extend_from_slice(&scale.to_le_bytes());
                if scale == 0.0 || !scale.is_normal() {
                    // All zeros (or too small to scale): zeros decode exactly.
                    out.extend(std::iter::repeat_n(0u8, values.len()));
                    return;
                }
                let inv = 1.0 / scale;
                for v in values {
                    let q = (v * inv + rng.unit()).floor().clamp(-127.0, 127.0);
                    out.push(q as i8 as u8);
                }
            }
        }
    }

    /// Decodes one block: `bytes.len()` must be `block_bytes(out.len())`.
    /// Returns the index within the block of the first bad value.
    fn decode_block(self, bytes: &[u8], out: &mut [f32]) -> std::result::Result<(), usize> {
        debug_assert_eq!(bytes.len(), self.block_bytes(out.len()));
        match self {
            ValueCodec::F32 => {
                for (d, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            ValueCodec::F16 => {
                let mut bits = [0u16; BLOCK_VALUES];
                let bits = &mut bits[..out.len()];
                for (d, b) in bits.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = u16::from_le_bytes([b[0], b[1]]);
                }
                // Slice conversion: F16C instructions where the CPU has them.
                bits.reinterpret_cast::<half::f16>()
                    .convert_to_f32_slice(out);
            }
            ValueCodec::Bf16 => {
                for (d, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
            ValueCodec::Int8 => {
                let scale = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                // A scale beyond this would make -128 q overflow to infinity.
                if !(scale.is_finite() && (0.0..=f32::MAX / 128.0).contains(&scale)) {
                    return Err(0);
                }
                for (d, q) in out.iter_mut().zip(&bytes[4..]) {
                    *d = f32::from(*q as i8) * scale;
                }
            }
            ValueCodec::Ring32 => {
                for (d, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
                return Ok(());
            }
        }
        // Checked after the vectorisable loops.
        match crate::tensor::first_non_finite(out) {
            Some(i) => Err(i),
            None => Ok(()),
        }
    }
}

const F16_MAX: f32 = 65504.0;

impl Codec {
    /// How values (top-k: the kept values) are coded.
    pub fn value_codec(self) -> ValueCodec {
        match self {
            Codec::F32 => ValueCodec::F32,
            Codec::F16 => ValueCodec::F16,
            Codec::Bf16 => ValueCodec::Bf16,
            Codec::Int8 => ValueCodec::Int8,
            Codec::Ring32 => ValueCodec::Ring32,
            Codec::TopK { values, .. } => values,
        }
    }

    /// The top-k fraction in parts per million, for a top-k codec.
    pub fn top_k_ppm(self) -> Option<u32> {
        match self {
            Codec::TopK { fraction_ppm, .. } => Some(fraction_ppm),
            _ => None,
        }
    }

    /// Whether decoding gives back exactly the values encoded.
    pub fn is_lossless(self) -> bool {
        self == Codec::F32
    }

    /// Whether a top-k codec (or a dense one) of the same family: top-k codecs
    /// with the same value codec match whatever their fraction. A client that
    /// offers top-k accepts the fraction its aggregator chooses.
    pub fn same_family(self, other: Codec) -> bool {
        match (self, other) {
            (Codec::TopK { values: a, .. }, Codec::TopK { values: b, .. }) => a == b,
            (a, b) => a == b,
        }
    }

    /// Checks a codec received from a peer.
    pub fn validate(self) -> Result<()> {
        match self {
            Codec::TopK { fraction_ppm, .. } if fraction_ppm == 0 || fraction_ppm > PPM => {
                Err(ProtocolError::Malformed(format!(
                    "top-k fraction of {fraction_ppm} ppm is outside 1..={PPM}"
                )))
            }
            Codec::TopK {
                values: ValueCodec::Ring32,
                ..
            } => Err(ProtocolError::Malformed(
                "top-k entries cannot be masked ring elements".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The number of entries a top-k stream of `n` values carries:
    /// `ceil(fraction n)`, at least 1 (for a non-empty stream), at most `n`.
    pub fn top_k_count(fraction_ppm: u32, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let k = (n as u128 * fraction_ppm as u128).div_ceil(PPM as u128);
        (k as u64).clamp(1, n)
    }

    /// The smallest and largest body length a stream of `n` values may have
    /// (equal for dense codecs). Fails if `n` is too large for the codec.
    pub fn body_len_bounds(self, n: u64) -> Result<(u64, u64)> {
        self.validate()?;
        let too_many = || ProtocolError::TooManyValues {
            values: n,
            max: u64::from(u32::MAX),
        };
        let (min, max) = match self {
            Codec::TopK {
                fraction_ppm,
                values,
            } => {
                // Indices are u32 gaps.
                if n > u64::from(u32::MAX) {
                    return Err(too_many());
                }
                let k = Codec::top_k_count(fraction_ppm, n);
                let blocks = (k as u128).div_ceil(BLOCK_VALUES as u128);
                let fixed = 4 * blocks + values.blocks_bytes(k);
                (
                    fixed + k as u128,
                    fixed + (MAX_VARINT_BYTES as u128) * k as u128,
                )
            }
            dense => {
                let len = dense.value_codec().blocks_bytes(n);
                (len, len)
            }
        };
        let fit = |v: u128| {
            u64::try_from(v).map_err(|_| ProtocolError::TooManyValues {
                values: n,
                max: u64::MAX / 4,
            })
        };
        Ok((fit(min)?, fit(max)?))
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::TopK {
                fraction_ppm,
                values,
            } => {
                let fraction = *fraction_ppm as f64 / PPM as f64;
                write!(f, "top-k:{fraction}")?;
                if *values != ValueCodec::F32 {
                    write!(f, "+{}", values.name())?;
                }
                Ok(())
            }
            dense => f.write_str(dense.value_codec().name()),
        }
    }
}

impl FromStr for ValueCodec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(ValueCodec::F32),
            "f16" => Ok(ValueCodec::F16),
            "bf16" => Ok(ValueCodec::Bf16),
            "int8" => Ok(ValueCodec::Int8),
            "ring32" => Ok(ValueCodec::Ring32),
            other => Err(format!(
                "unknown value codec '{other}' (expected f32, f16, bf16 or int8)"
            )),
        }
    }
}

impl FromStr for Codec {
    type Err = String;

    /// `f32`, `f16`, `bf16`, `int8`, `top-k:FRACTION` or
    /// `top-k:FRACTION+VALUES` (for example `top-k:0.01+int8`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        let Some(rest) = s.strip_prefix("top-k:") else {
            return s.parse::<ValueCodec>().map(Codec::from).map_err(|_| {
                format!(
                    "unknown codec '{s}' (expected f32, f16, bf16, int8, top-k:FRACTION or top-k:FRACTION+f16|bf16|int8)"
                )
            });
        };
        let (fraction, values) = match rest.split_once('+') {
            Some((f, v)) => (f, v.parse::<ValueCodec>()?),
            None => (rest, ValueCodec::F32),
        };
        let fraction: f64 = fraction
            .parse()
            .map_err(|_| format!("top-k fraction '{fraction}' is not a number"))?;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(format!("top-k fraction {fraction} must be in (0, 1]"));
        }
        let fraction_ppm = (fraction * PPM as f64).round() as u32;
        if fraction_ppm == 0 {
            return Err(format!(
                "top-k fraction {fraction} is below the resolution of 1e-6"
            ));
        }
        Ok(Codec::TopK {
            fraction_ppm,
            values,
        })
    }
}

/// Parses a comma-separated codec list (`"f16,int8,top-k:0.01+int8"`).
pub fn parse_codec_list(s: &str) -> std::result::Result<Vec<Codec>, String> {
    let list = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect::<std::result::Result<Vec<Codec>, String>>()?;
    if list.is_empty() {
        return Err("empty codec list".into());
    }
    Ok(list)
}

/// What a client offers by default: every codec it can encode and decode
/// (its top-k entries stand for any fraction; see [`Codec::same_family`]).
pub fn all_codecs() -> Vec<Codec> {
    let mut all = vec![Codec::F32, Codec::F16, Codec::Bf16, Codec::Int8];
    for values in [
        ValueCodec::F32,
        ValueCodec::F16,
        ValueCodec::Bf16,
        ValueCodec::Int8,
    ] {
        all.push(Codec::TopK {
            fraction_ppm: PPM,
            values,
        });
    }
    all
}

/// The first codec of `preference` (the aggregator's, best first) that the
/// peer offers; a top-k preference matches any offered top-k with the same
/// value codec.
pub fn negotiate_codec(preference: &[Codec], offered: &[Codec]) -> Option<Codec> {
    preference
        .iter()
        .copied()
        .find(|want| offered.iter().any(|o| o.same_family(*want)))
}

/// SplitMix64 (Steele et al. 2014): the stochastic-rounding generator. Its
/// own few lines rather than a crate so the bytes a seed gives never change
/// with a dependency's version.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 24 bits.
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
}

/// Encodes `values` (finite) with `codec`, appending to `out`. `seed` drives
/// int8's stochastic rounding: the same seed gives the same bytes.
pub fn encode_body(codec: Codec, values: &[f32], seed: u64, out: &mut Vec<u8>) -> Result<()> {
    codec.validate()?;
    if codec == Codec::Ring32 {
        out.reserve(4 * values.len());
        for v in values {
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        return Ok(());
    }
    if let Some(index) = crate::tensor::first_non_finite(values) {
        return Err(ProtocolError::NonFinite { index });
    }
    let (min, _) = codec.body_len_bounds(values.len() as u64)?;
    out.reserve(min as usize);
    let mut rng = SplitMix64(seed);
    match codec {
        Codec::TopK {
            fraction_ppm,
            values: value_codec,
        } => {
            let k = Codec::top_k_count(fraction_ppm, values.len() as u64) as usize;
            let kept = top_k_indices(values, k);
            let mut block_values = Vec::with_capacity(BLOCK_VALUES.min(k));
            let mut next = 0u32;
            for block in kept.chunks(BLOCK_VALUES) {
                let start = out.len();
                out.extend_from_slice(&[0; 4]);
                for &i in block {
                    write_varint(i - next, out);
                    next = i + 1;
                }
                block_values.clear();
                block_values.extend(block.iter().map(|&i| values[i as usize]));
                value_codec.encode_block(&block_values, &mut rng, out);
                let len = (out.len() - start - 4) as u32;
                out[start..start + 4].copy_from_slice(&len.to_le_bytes());
            }
        }
        dense => {
            for block in values.chunks(BLOCK_VALUES) {
                dense.value_codec().encode_block(block, &mut rng, out);
            }
        }
    }
    Ok(())
}

/// The indices of the `k` largest-magnitude values, ascending (ties: the
/// lower index wins, so the choice is deterministic). Linear time.
fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            let (va, vb) = (values[a as usize].abs(), values[b as usize].abs());
            vb.total_cmp(&va).then(a.cmp(&b))
        });
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

fn write_varint(mut v: u32, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads one LEB128 `u32` from the front of `bytes`: (value, bytes used).
fn read_varint(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut v = 0u32;
    for (i, &b) in bytes.iter().take(MAX_VARINT_BYTES).enumerate() {
        let part = u32::from(b & 0x7f);
        if i == MAX_VARINT_BYTES - 1 && part > 0x0f {
            return None; // beyond 32 bits
        }
        v |= part << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// What the next bytes of a block-coded body are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    /// A dense block of `min(BLOCK_VALUES, values left)` values.
    Dense,
    /// A top-k block's 4-byte length.
    TopKLength,
    /// A top-k block of this many bytes.
    TopKBlock(usize),
    /// Every value is decoded: any further byte is an error.
    Done,
}

/// Streams a block-coded (non-f32) body into an output buffer. Used by
/// [`crate::tensor::BodyDecoder`]; the header is already validated.
#[derive(Debug)]
pub(crate) struct BlockDecoder {
    codec: Codec,
    /// Values in the stream.
    values: usize,
    /// `out[..written]` is final.
    written: usize,
    /// Top-k entries not yet decoded.
    entries_left: usize,
    unit: Unit,
    /// The bytes of a unit split across chunks (at most [`MAX_UNIT_BYTES`]).
    stage: Vec<u8>,
}

impl BlockDecoder {
    pub(crate) fn new(codec: Codec, values: usize) -> Self {
        let (unit, entries_left) = match codec {
            Codec::TopK { fraction_ppm, .. } => {
                let k = Codec::top_k_count(fraction_ppm, values as u64) as usize;
                (if k == 0 { Unit::Done } else { Unit::TopKLength }, k)
            }
            _ if values == 0 => (Unit::Done, 0),
            _ => (Unit::Dense, 0),
        };
        BlockDecoder {
            codec,
            values,
            written: 0,
            entries_left,
            unit,
            stage: Vec::new(),
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.unit == Unit::Done
    }

    fn unit_len(&self) -> usize {
        match self.unit {
            Unit::Dense => self
                .codec
                .value_codec()
                .block_bytes(BLOCK_VALUES.min(self.values - self.written)),
            Unit::TopKLength => 4,
            Unit::TopKBlock(len) => len,
            Unit::Done => 0,
        }
    }

    /// Decodes `chunk` into `out` (at least `values` long), staging a unit
    /// split across chunks; dense blocks are added to `norm` as they are
    /// decoded.
    pub(crate) fn push(
        &mut self,
        mut chunk: &[u8],
        out: &mut [f32],
        mut norm: Option<&mut NormAccumulator>,
    ) -> Result<()> {
        while !chunk.is_empty() {
            if self.unit == Unit::Done {
                return Err(ProtocolError::Malformed(format!(
                    "{} bytes after the last {} block",
                    chunk.len(),
                    self.codec
                )));
            }
            let need = self.unit_len();
            if self.stage.is_empty() && chunk.len() >= need {
                let (unit, rest) = chunk.split_at(need);
                self.process(unit, out, norm.as_deref_mut())?;
                chunk = rest;
            } else {
                let take = (need - self.stage.len()).min(chunk.len());
                self.stage.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                if self.stage.len() == need {
                    let staged = std::mem::take(&mut self.stage);
                    let result = self.process(&staged, out, norm.as_deref_mut());
                    self.stage = staged;
                    self.stage.clear();
                    result?;
                }
            }
        }
        Ok(())
    }

    fn process(
        &mut self,
        unit: &[u8],
        out: &mut [f32],
        norm: Option<&mut NormAccumulator>,
    ) -> Result<()> {
        let value_codec = self.codec.value_codec();
        match self.unit {
            Unit::Dense => {
                let len = BLOCK_VALUES.min(self.values - self.written);
                let dst = &mut out[self.written..self.written + len];
                value_codec
                    .decode_block(unit, dst)
                    .map_err(|i| ProtocolError::NonFinite {
                        index: self.written + i,
                    })?;
                if let Some(norm) = norm {
                    norm.add(self.written, dst);
                }
                self.written += len;
                if self.written == self.values {
                    self.unit = Unit::Done;
                }
            }
            Unit::TopKLength => {
                let len = u32::from_le_bytes([unit[0], unit[1], unit[2], unit[3]]) as usize;
                let entries = BLOCK_VALUES.min(self.entries_left);
                let values_len = value_codec.block_bytes(entries);
                if len < entries + values_len || len > MAX_VARINT_BYTES * entries + values_len {
                    return Err(ProtocolError::Malformed(format!(
                        "top-k block of {len} bytes cannot hold {entries} entries"
                    )));
                }
                self.unit = Unit::TopKBlock(len);
            }
            Unit::TopKBlock(len) => {
                let entries = BLOCK_VALUES.min(self.entries_left);
                let values_len = value_codec.block_bytes(entries);
                let gaps_len = len - values_len;
                // Pass 1: the gaps must fill exactly their part of the block.
                let gaps = &unit[..gaps_len];
                let mut at = 0;
                for _ in 0..entries {
                    let (_, used) = read_varint(&gaps[at..])
                        .ok_or_else(|| ProtocolError::Malformed("bad top-k index".into()))?;
                    at += used;
                }
                if at != gaps_len {
                    return Err(ProtocolError::Malformed(format!(
                        "top-k block: {} index bytes declared, {at} used",
                        gaps_len
                    )));
                }
                // Pass 2: decode the values into a block-sized scratch on the
                // stack, then place them.
                let mut block = [0f32; BLOCK_VALUES];
                let block = &mut block[..entries];
                value_codec
                    .decode_block(&unit[gaps_len..], block)
                    .map_err(|i| ProtocolError::NonFinite { index: i })?;
                let mut at = 0;
                for v in block.iter() {
                    // Infallible: pass 1 parsed these bytes.
                    let (gap, used) = read_varint(&gaps[at..]).unwrap_or((u32::MAX, 1));
                    at += used;
                    let index = self.written as u64 + u64::from(gap);
                    if index >= self.values as u64 {
                        return Err(ProtocolError::Malformed(format!(
                            "top-k index {index} outside a stream of {} values",
                            self.values
                        )));
                    }
                    let index = index as usize;
                    out[self.written..index].fill(0.0);
                    out[index] = *v;
                    self.written = index + 1;
                }
                self.entries_left -= entries;
                if self.entries_left == 0 {
                    out[self.written..self.values].fill(0.0);
                    self.written = self.values;
                    self.unit = Unit::Done;
                } else {
                    self.unit = Unit::TopKLength;
                }
            }
            Unit::Done => unreachable!("push stops at Done"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_names_round_trip() {
        for s in [
            "f32",
            "f16",
            "bf16",
            "int8",
            "top-k:0.01",
            "top-k:0.01+int8",
            "top-k:0.5+f16",
            "top-k:1+bf16",
        ] {
            let c: Codec = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
        }
        for bad in [
            "f64",
            "top-k:0",
            "top-k:2",
            "top-k:x",
            "top-k:0.1+f64",
            "top-k:1e-9",
            "",
        ] {
            assert!(bad.parse::<Codec>().is_err(), "{bad}");
        }
        assert_eq!(
            parse_codec_list("f16, top-k:0.01+int8").unwrap(),
            vec![
                Codec::F16,
                Codec::TopK {
                    fraction_ppm: 10_000,
                    values: ValueCodec::Int8
                }
            ]
        );
        assert!(parse_codec_list(" , ").is_err());
    }

    #[test]
    fn negotiation_takes_the_aggregators_first_choice_the_client_offers() {
        let topk = |ppm, values| Codec::TopK {
            fraction_ppm: ppm,
            values,
        };
        let pref = [topk(10_000, ValueCodec::Int8), Codec::F16, Codec::F32];
        assert_eq!(
            negotiate_codec(&pref, &all_codecs()),
            Some(topk(10_000, ValueCodec::Int8)),
            "a client offering top-k takes the aggregator's fraction"
        );
        assert_eq!(
            negotiate_codec(&pref, &[Codec::F32, Codec::F16]),
            Some(Codec::F16)
        );
        assert_eq!(
            negotiate_codec(&pref, &[topk(PPM, ValueCodec::F32)]),
            None,
            "top-k with other values is another codec"
        );
    }

    #[test]
    fn top_k_count_rounds_up_and_stays_in_range() {
        assert_eq!(Codec::top_k_count(10_000, 1_000_000), 10_000);
        assert_eq!(Codec::top_k_count(10_000, 150), 2);
        assert_eq!(Codec::top_k_count(1, 10), 1);
        assert_eq!(Codec::top_k_count(PPM, 7), 7);
        assert_eq!(Codec::top_k_count(PPM, 0), 0);
    }

    #[test]
    fn varints_round_trip_and_refuse_overflow() {
        for v in [0, 1, 127, 128, 16_383, 16_384, u32::MAX] {
            let mut b = Vec::new();
            write_varint(v, &mut b);
            assert_eq!(read_varint(&b), Some((v, b.len())));
        }
        assert_eq!(read_varint(&[0xff, 0xff, 0xff, 0xff, 0x1f]), None);
        assert_eq!(read_varint(&[0x80, 0x80]), None, "unterminated");
    }

    #[test]
    fn int8_rounding_is_unbiased() {
        // One value between two grid points, encoded with many seeds: the
        // mean of the decoded values converges to the value.
        let values = [127.0f32, 0.3];
        let mut sum = 0f64;
        let trials = 20_000;
        for seed in 0..trials {
            let mut out = Vec::new();
            encode_body(Codec::Int8, &values, seed, &mut out).unwrap();
            let mut dec = [0f32; 2];
            ValueCodec::Int8.decode_block(&out, &mut dec).unwrap();
            assert_eq!(dec[0], 127.0);
            assert!(dec[1] == 0.0 || dec[1] == 1.0, "{}", dec[1]);
            sum += f64::from(dec[1]);
        }
        let mean = sum / trials as f64;
        // Binomial(20000, 0.3): std of the mean ~0.0032.
        assert!((mean - 0.3).abs() < 0.015, "mean {mean}");
    }

    #[test]
    fn top_k_keeps_the_largest_magnitudes_with_ties_to_the_lower_index() {
        let v = [0.1, -5.0, 3.0, 3.0, -3.0, 0.0];
        assert_eq!(top_k_indices(&v, 3), vec![1, 2, 3]);
        assert_eq!(top_k_indices(&v, 6), vec![0, 1, 2, 3, 4, 5]);
    }
}
