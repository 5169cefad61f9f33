//! Shared pieces of the fuzz targets: the layout of a fuzz input (a few
//! control bytes, then the wire bytes under test), chunking of the wire bytes
//! into fuzz-chosen sizes, and the valid messages and streams that seed the
//! corpora (written by `src/bin/make_seeds.rs`).
//!
//! Input layouts (every byte string is a valid input; short ones just mean
//! "no chunk plan" or "no wire bytes"):
//!
//! - `control_frame`: `[k] [k chunk-size bytes] [wire bytes...]`
//! - `tensor_stream`: `[limits mode] [k] [k chunk-size bytes] [wire bytes...]`
//!
//! `k` is taken modulo [`MAX_CHUNK_SIZES`]` + 1`; each chunk-size byte `b` means a
//! chunk of `b + 1` bytes, the sizes are used in turn, cyclically, and `k = 0`
//! means one chunk holding everything.

use fedquic_protocol::{
    Codec, EvalResult, EvaluateTask, FitInstructions, FitTask, Hello, Message, Reject, StreamKind,
    TensorHeader, TensorLimits, TensorMeta, Welcome, encode_body, encode_header,
};

/// The most chunk sizes one input can carry.
pub const MAX_CHUNK_SIZES: usize = 16;

/// The model size the tensor target's main limits allow (`TensorLimits::for_model`).
pub const FUZZ_MODEL_VALUES: u64 = 4096;

/// Splits `[k] [k sizes] [rest]` into the chunk plan and the rest.
pub fn split_chunk_plan(data: &[u8]) -> (ChunkPlan<'_>, &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return (ChunkPlan { sizes: &[] }, &[]);
    };
    let k = (k as usize % (MAX_CHUNK_SIZES + 1)).min(rest.len());
    let (sizes, rest) = rest.split_at(k);
    (ChunkPlan { sizes }, rest)
}

/// Splits a `tensor_stream` input into its limits, chunk plan and wire bytes.
pub fn split_tensor_input(data: &[u8]) -> (TensorLimits, ChunkPlan<'_>, &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return (limits_for_mode(0), ChunkPlan { sizes: &[] }, &[]);
    };
    let (plan, rest) = split_chunk_plan(rest);
    (limits_for_mode(mode), plan, rest)
}

/// The receiver limits a `tensor_stream` input runs under. Mostly the small
/// model limits; a quarter each the defaults and no value limit at all (the
/// decoders must stay sound for any limits a caller may configure).
pub fn limits_for_mode(mode: u8) -> TensorLimits {
    match mode % 4 {
        0 | 1 => TensorLimits::for_model(FUZZ_MODEL_VALUES),
        2 => TensorLimits::default(),
        _ => TensorLimits::for_model(u64::MAX),
    }
}

/// How to cut a byte string into chunks.
#[derive(Clone, Copy, Debug)]
pub struct ChunkPlan<'a> {
    sizes: &'a [u8],
}

impl<'a> ChunkPlan<'a> {
    /// Cuts `bytes` into chunks of the planned sizes (cyclically); no chunk is
    /// empty unless `bytes` is, in which case there are no chunks.
    pub fn chunks<'b>(self, bytes: &'b [u8]) -> impl Iterator<Item = &'b [u8]> + use<'a, 'b> {
        let mut rest = bytes;
        let mut i = 0usize;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let n = match self.sizes.get(i % self.sizes.len().max(1)) {
                Some(&b) => b as usize + 1,
                None => rest.len(),
            };
            i += 1;
            let (chunk, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            Some(chunk)
        })
    }
}

/// Builds a `control_frame` input.
pub fn control_input(chunk_sizes: &[u8], wire: &[u8]) -> Vec<u8> {
    assert!(chunk_sizes.len() <= MAX_CHUNK_SIZES);
    let mut out = vec![chunk_sizes.len() as u8];
    out.extend_from_slice(chunk_sizes);
    out.extend_from_slice(wire);
    out
}

/// Builds a `tensor_stream` input.
pub fn tensor_input(mode: u8, chunk_sizes: &[u8], wire: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(&control_input(chunk_sizes, wire));
    out
}

/// One message of every kind, with representative values.
pub fn sample_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            versions: vec![1, 2],
            codecs: vec![Codec::F32],
            agent: "fedquic-client/0.1.0".into(),
            backend: "cpu".into(),
        }),
        Message::Welcome(Welcome {
            version: 1,
            uplink: Codec::F32,
            downlink: Codec::F32,
            model_spec: "mlp:784-200-200-10".into(),
            client_name: "client-001".into(),
            run: "run-1".into(),
        }),
        Message::FitTask(FitTask {
            round: 7,
            task_id: 99,
            config: FitInstructions {
                epochs: 2,
                batch_size: 10,
                learning_rate: 0.05,
                proximal_mu: 0.01,
                seed: 42, optimizer: Default::default() },
            initial_loss: false,
            scaffold: None,
            secagg: None,
        }),
        Message::EvaluateTask(EvaluateTask {
            round: 3,
            task_id: 4,
        }),
        Message::EvalResult(EvalResult {
            round: 3,
            task_id: 4,
            examples: 100,
            loss: 0.5,
            accuracy: 0.9,
        }),
        Message::TaskFailed {
            task_id: 5,
            reason: "no data".into(),
        },
        Message::UpdateAccepted { task_id: 6 },
        Message::UpdateRejected {
            task_id: u64::MAX,
            reason: "stale round".into(),
        },
        Message::Wait { round: 2 },
        Message::Reject(Reject {
            reason: "aggregator full".into(),
            retry_after_ms: Some(1000),
        }),
        Message::Reject(Reject {
            reason: "revoked".into(),
            retry_after_ms: None,
        }),
        Message::Heartbeat,
        Message::Bye {
            reason: "run complete".into(),
            finished: true,
        },
    ]
}

/// A valid f32 tensor stream: header plus body, `shapes` giving each tensor's shape.
pub fn sample_stream(kind: StreamKind, shapes: &[&[usize]], metrics: bool) -> Vec<u8> {
    sample_coded_stream(kind, shapes, metrics, Codec::F32)
}

/// A valid tensor stream in `codec`.
pub fn sample_coded_stream(
    kind: StreamKind,
    shapes: &[&[usize]],
    metrics: bool,
    codec: Codec,
) -> Vec<u8> {
    let tensors: Vec<TensorMeta> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| TensorMeta::f32(format!("layer{i}.weight"), s))
        .collect();
    let values: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let values: Vec<f32> = (0..values)
        .map(|i| ((i as f32) * 0.37).sin() * 0.1)
        .collect();
    let mut body = Vec::new();
    encode_body(codec, &values, 7, &mut body).expect("sample values encode");
    let header = TensorHeader {
        kind,
        round: 12,
        task_id: 345,
        codec,
        tensors,
        num_examples: if metrics { 600 } else { 0 },
        metrics: if metrics {
            vec![("loss".into(), 0.42), ("accuracy".into(), 0.88)]
        } else {
            Vec::new()
        },
        body_len: body.len() as u64,
    };
    let mut bytes = encode_header(&header).expect("sample header encodes");
    bytes.extend_from_slice(&body);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_plans_cover_the_input_exactly() {
        let bytes: Vec<u8> = (0..100).collect();
        for sizes in [&[][..], &[0], &[2, 6], &[255]] {
            let joined: Vec<u8> = ChunkPlan { sizes }
                .chunks(&bytes)
                .flatten()
                .copied()
                .collect();
            assert_eq!(joined, bytes);
        }
        assert_eq!(ChunkPlan { sizes: &[] }.chunks(&[]).count(), 0);
    }

    #[test]
    fn inputs_split_back_into_their_parts() {
        let input = tensor_input(2, &[3, 4], b"wire");
        let (limits, plan, wire) = split_tensor_input(&input);
        assert_eq!(limits, TensorLimits::default());
        assert_eq!(plan.sizes, &[3, 4]);
        assert_eq!(wire, b"wire");
    }
}
