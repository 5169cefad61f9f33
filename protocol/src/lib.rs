//! The `fedquic/1` wire protocol, with no I/O: typed control messages on a
//! length-prefixed stream, and tensor streams (a header, then a body in the
//! negotiated codec: f32, f16, bf16, int8 or top-k, that may arrive in
//! chunks of any size).
//!
//! Everything here treats its input as hostile: lengths are checked before
//! anything is allocated, unknown tags and versions are typed errors, and no
//! decode path can panic.

pub mod codec;
pub mod error;
pub mod frame;
pub mod message;
pub mod tensor;

pub use codec::{Codec, ValueCodec, all_codecs, encode_body, negotiate_codec, parse_codec_list};
pub use error::{ProtocolError, Result};
pub use frame::{FrameDecoder, MAX_CONTROL_FRAME, decode_message, encode_message, frame_len};
pub use message::{
    CONTROL_PREFIX, ClientNoise, EvalResult, EvaluateTask, FitInstructions, FitTask, Hello,
    INITIAL_LOSS_METRIC, Message, Metrics, OptimizerConfig, PROTOCOL_VERSION, Reject,
    SECAGG_EXTRA_VALUES, SUPPORTED_VERSIONS, ScaffoldTask, SecAggStep, SecAggTask, Welcome,
    negotiate_version, validate_run_id, with_control_layout, with_secagg_layout,
};
pub use tensor::{
    BodyDecoder, DType, StreamKind, TENSOR_PREFIX_LEN, TENSOR_STREAM_MAGIC, TensorHeader,
    TensorLimits, TensorMeta, decode_header, decode_tensor_stream, encode_f32_body, encode_header,
    first_non_finite, header_len_from_prefix,
};
