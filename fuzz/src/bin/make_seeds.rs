//! Writes seed inputs (valid messages, frames and tensor streams, in the
//! targets' input layouts) into `corpus/control_frame/` and
//! `corpus/tensor_stream/` next to this crate's Cargo.toml.
//!
//! `cargo run --bin make_seeds` from `fuzz/` (no nightly flags needed).

use std::fs;
use std::path::Path;

use fedquic_fuzz::{
    control_input, sample_coded_stream, sample_messages, sample_stream, tensor_input,
};
use fedquic_protocol::{
    Codec, Message, StreamKind, TensorHeader, TensorMeta, encode_header, encode_message,
};

/// Chunk plans the seeds carry: none, byte by byte, float-splitting sizes.
const PLANS: &[&[u8]] = &[&[], &[0], &[2, 4], &[6, 0, 254]];

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let control = root.join("control_frame");
    let tensor = root.join("tensor_stream");
    fs::create_dir_all(&control)?;
    fs::create_dir_all(&tensor)?;

    let mut n_control = 0;
    let mut write_control = |name: String, bytes: Vec<u8>| {
        n_control += 1;
        fs::write(control.join(name), bytes)
    };
    let messages = sample_messages();
    let frames: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| encode_message(m).expect("sample message encodes"))
        .collect();
    for (i, frame) in frames.iter().enumerate() {
        // A bare payload (what `decode_message` sees) and a one-frame stream.
        write_control(format!("payload-{i:02}"), control_input(&[], &frame[4..]))?;
        let plan = PLANS[i % PLANS.len()];
        write_control(format!("frame-{i:02}"), control_input(plan, frame))?;
    }
    // Whole sessions: every message back to back, under each chunk plan.
    let session: Vec<u8> = frames.concat();
    for (p, plan) in PLANS.iter().enumerate() {
        write_control(format!("session-plan{p}"), control_input(plan, &session))?;
    }
    let hello_bye = [
        encode_message(&messages[0]).unwrap(),
        encode_message(&Message::Heartbeat).unwrap(),
        encode_message(messages.last().unwrap()).unwrap(),
    ]
    .concat();
    write_control(
        "hello-heartbeat-bye".into(),
        control_input(&[1], &hello_bye),
    )?;

    let mut streams: Vec<(String, Vec<u8>)> = vec![
        (
            "model-1x1",
            sample_stream(StreamKind::GlobalModel, &[&[1]], false),
        ),
        (
            "model-mlp",
            sample_stream(
                StreamKind::GlobalModel,
                &[&[4, 3], &[3], &[3, 2], &[2]],
                false,
            ),
        ),
        (
            "update-mlp",
            sample_stream(StreamKind::Update, &[&[4, 3], &[3], &[3, 2], &[2]], true),
        ),
        (
            "update-rank3",
            sample_stream(StreamKind::Update, &[&[2, 3, 4], &[5]], true),
        ),
        (
            "model-256",
            sample_stream(StreamKind::GlobalModel, &[&[16, 16]], false),
        ),
    ]
    .into_iter()
    .map(|(name, bytes)| (name.to_string(), bytes))
    .collect();
    // Every codec, on a stream of more than one block (1,500 values).
    for codec in [
        "f16",
        "bf16",
        "int8",
        "top-k:0.01",
        "top-k:0.3+f16",
        "top-k:0.3+bf16",
        "top-k:0.05+int8",
    ] {
        let codec: Codec = codec.parse().expect("a seed codec parses");
        streams.push((
            format!("update-{}", codec.to_string().replace([':', '+', '.'], "_")),
            sample_coded_stream(StreamKind::Update, &[&[30, 50]], true, codec),
        ));
    }
    let mut n_tensor = 0;
    for (name, stream) in &streams {
        for (p, plan) in PLANS.iter().enumerate() {
            // Mode 0: the small-model limits; 2: defaults; 3: no value limit.
            for mode in [0u8, 2, 3] {
                if mode != 0 && p != 1 {
                    continue;
                }
                n_tensor += 1;
                fs::write(
                    tensor.join(format!("{name}-plan{p}-mode{mode}")),
                    tensor_input(mode, plan, stream),
                )?;
            }
        }
    }

    // Regression inputs (see protocol/tests/fuzz_regressions.rs), so every run
    // starts from what once broke a decoder.
    for (name, input) in regressions() {
        n_tensor += 1;
        fs::write(tensor.join(name), input)?;
    }

    println!(
        "wrote {n_control} seeds to {} and {n_tensor} to {}",
        control.display(),
        tensor.display()
    );
    Ok(())
}

/// Inputs that once broke a decoder, in the `tensor_stream` input layout.
fn regressions() -> Vec<(String, Vec<u8>)> {
    // A header declaring 2^63 values (shape [2^31, 2^31, 2]) with body_len 0,
    // under no value limit (mode 3): its byte length overflowed u64.
    let header = TensorHeader {
        kind: StreamKind::Update,
        round: 0,
        task_id: 0,
        codec: Codec::F32,
        tensors: vec![TensorMeta::f32("w", &[1 << 31, 1 << 31, 2])],
        num_examples: 0,
        metrics: Vec::new(),
        body_len: 0,
    };
    let stream = encode_header(&header).expect("regression header encodes");
    vec![(
        "regress-body-len-overflow".into(),
        tensor_input(3, &[], &stream),
    )]
}
