//! Control-stream decoders: `decode_message` on raw payloads and
//! `FrameDecoder` on a framed stream pushed in fuzz-chosen chunks.
//!
//! Checks, besides "no panic, no sanitizer report":
//! - every decoded message re-encodes (`encode_message`), its canonical frame
//!   is no longer than what was decoded, and it decodes back to the same
//!   message (compared by re-encoded bytes, so NaN floats compare too);
//! - pushing the stream in chunks yields exactly the messages (and the error,
//!   if any) that pushing it in one piece yields.

#![no_main]

use fedquic_fuzz::{ChunkPlan, split_chunk_plan};
use fedquic_protocol::frame::MAX_DECODER_BUFFER;
use fedquic_protocol::{
    FrameDecoder, MAX_CONTROL_FRAME, Message, decode_message, encode_message, frame_len,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (plan, wire) = split_chunk_plan(data);

    // The bytes as one frame payload, and (for framed inputs) without the prefix.
    check_payload(wire);
    if let Some(payload) = wire.get(4..) {
        check_payload(payload);
    }

    // The bytes as a control stream. (Pushed whole, more than the decoder's
    // buffer is refused by design, so the comparison needs a smaller input.)
    if wire.len() > MAX_DECODER_BUFFER {
        return;
    }
    let whole = drain_stream(wire, None);
    let chunked = drain_stream(wire, Some(plan));
    assert_eq!(whole, chunked, "chunked and whole-stream decoding disagree");
});

/// Decodes `payload` as one message; if it decodes, checks the round trip.
fn check_payload(payload: &[u8]) {
    if let Ok(msg) = decode_message(payload) {
        let frame = round_trip(&msg);
        assert!(
            frame.len() - 4 <= payload.len(),
            "canonical encoding ({}) longer than the decoded payload ({})",
            frame.len() - 4,
            payload.len()
        );
    }
}

/// Re-encodes `msg`, checks it decodes to the same message, returns the frame.
fn round_trip(msg: &Message) -> Vec<u8> {
    let frame = match encode_message(msg) {
        Ok(frame) => frame,
        // Only a payload larger than any frame may fail to re-encode.
        Err(e) => panic!("decoded message does not re-encode: {e}: {msg:?}"),
    };
    let prefix: [u8; 4] = frame[..4].try_into().unwrap();
    let len = frame_len(prefix).expect("an encoded frame has a valid prefix");
    assert_eq!(len, frame.len() - 4);
    assert!(len <= MAX_CONTROL_FRAME);
    let again = decode_message(&frame[4..]).expect("an encoded message decodes");
    let frame2 = encode_message(&again).expect("re-encodes");
    assert_eq!(frame, frame2, "round trip changed the message");
    // Equal bytes already imply equal values; this also covers PartialEq
    // wherever no NaN is involved.
    assert!(again == *msg || format!("{again:?}") == format!("{msg:?}"));
    frame
}

/// What a control stream decoded to: each message's canonical frame, then
/// whether the stream ended in an error.
#[derive(Debug, PartialEq)]
struct Drained {
    frames: Vec<Vec<u8>>,
    failed: bool,
}

/// Pushes `wire` through a `FrameDecoder` (in one piece, or in the planned
/// chunks) and drains it after each push, until `None` or the first error.
fn drain_stream(wire: &[u8], plan: Option<ChunkPlan<'_>>) -> Drained {
    let mut out = Drained {
        frames: Vec::new(),
        failed: false,
    };
    let mut dec = FrameDecoder::new();
    let chunks: Box<dyn Iterator<Item = &[u8]>> = match plan {
        Some(plan) => Box::new(plan.chunks(wire)),
        None => Box::new(std::iter::once(wire).filter(|w| !w.is_empty())),
    };
    for chunk in chunks {
        if dec.push(chunk).is_err() {
            out.failed = true;
            return out;
        }
        loop {
            match dec.next_message() {
                Ok(Some(msg)) => out.frames.push(round_trip(&msg)),
                Ok(None) => break,
                Err(_) => {
                    out.failed = true;
                    return out;
                }
            }
        }
        assert!(
            dec.buffered() < 4 + MAX_CONTROL_FRAME,
            "decoder holds more than one partial frame after draining"
        );
    }
    out
}
