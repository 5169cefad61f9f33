use thiserror::Error;

/// Everything that can be wrong with bytes received from a peer.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ProtocolError {
    #[error("control frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("decoder already holds {max} bytes: drain messages before pushing more")]
    DecoderFull { max: usize },
    #[error("empty control frame")]
    EmptyFrame,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{trailing} unexpected bytes after the message")]
    TrailingBytes { trailing: usize },
    #[error("no common protocol version (peer offers {offered:?}, we support {supported:?})")]
    NoCommonVersion {
        offered: Vec<u16>,
        supported: Vec<u16>,
    },
    #[error("not a tensor stream (bad magic {found:02x?})")]
    BadMagic { found: [u8; 4] },
    #[error("tensor header of {len} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge { len: usize, max: usize },
    #[error("tensor stream declares {count} tensors, limit is {max}")]
    TooManyTensors { count: usize, max: usize },
    #[error("tensor '{name}': {reason}")]
    BadTensor { name: String, reason: String },
    #[error(
        "tensor stream declares {declared} body bytes but its tensors and codec need {expected}"
    )]
    BodyLengthMismatch { declared: u64, expected: u64 },
    #[error("tensor stream of {values} values exceeds the limit of {max}")]
    TooManyValues { values: u64, max: u64 },
    #[error("tensor layout mismatch: {0}")]
    LayoutMismatch(String),
    #[error("non-finite value at position {index}")]
    NonFinite { index: usize },
    #[error("tensor body overran its declared length of {declared} bytes")]
    BodyOverrun { declared: u64 },
    #[error("tensor body truncated: got {got} of {declared} bytes")]
    BodyTruncated { got: u64, declared: u64 },
    #[error("output buffer holds {have} values, the stream needs {need}")]
    OutputTooSmall { have: usize, need: usize },
    #[error("could not encode message: {0}")]
    Encode(String),
}

pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;
