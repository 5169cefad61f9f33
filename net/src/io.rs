//! Framed `fedquic/1` I/O over quinn streams: control messages on the
//! bidirectional control stream, tensor streams on unidirectional streams.

use fedquic_protocol::{
    BodyDecoder, Codec, Message, ProtocolError, TENSOR_PREFIX_LEN, TensorHeader, TensorLimits,
    decode_header, decode_message, encode_f32_body, encode_header, encode_message, frame_len,
    header_len_from_prefix,
};
use thiserror::Error;

/// Values per write when sending a tensor body (1 MiB of bytes).
const SEND_CHUNK_VALUES: usize = 256 * 1024;

#[derive(Debug, Error)]
pub enum IoError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream ended in the middle of a {what}")]
    Truncated { what: &'static str },
    #[error("stream already closed")]
    ClosedStream,
}

impl IoError {
    /// The connection's error, when this failure is the connection's end.
    pub fn connection_error(&self) -> Option<&quinn::ConnectionError> {
        match self {
            IoError::Connection(e)
            | IoError::Read(quinn::ReadError::ConnectionLost(e))
            | IoError::Write(quinn::WriteError::ConnectionLost(e)) => Some(e),
            _ => None,
        }
    }
}

/// `read_exact` that names what was cut short when the stream ends early.
async fn read_exact_named(
    recv: &mut quinn::RecvStream,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), IoError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => IoError::Truncated { what },
        quinn::ReadExactError::ReadError(e) => IoError::Read(e),
    })
}

impl From<quinn::ClosedStream> for IoError {
    fn from(_: quinn::ClosedStream) -> Self {
        IoError::ClosedStream
    }
}

/// Writes one control message.
pub async fn write_message(send: &mut quinn::SendStream, msg: &Message) -> Result<(), IoError> {
    let frame = encode_message(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one control message; `Ok(None)` when the peer finished the stream
/// cleanly between messages.
pub async fn read_message(recv: &mut quinn::RecvStream) -> Result<Option<Message>, IoError> {
    Ok(read_message_sized(recv).await?.map(|(msg, _)| msg))
}

/// [`read_message`], with the frame's size on the wire (prefix included),
/// for traffic accounting without encoding the message again.
pub async fn read_message_sized(
    recv: &mut quinn::RecvStream,
) -> Result<Option<(Message, u64)>, IoError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(IoError::Truncated {
                what: "frame prefix",
            });
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    // The length is checked against MAX_CONTROL_FRAME before we allocate.
    let len = frame_len(prefix)?;
    let mut payload = vec![0u8; len];
    read_exact_named(recv, &mut payload, "control frame").await?;
    let size = (prefix.len() + len) as u64;
    Ok(Some((decode_message(&payload)?, size)))
}

/// Sends a tensor stream (header then body) on a new unidirectional stream
/// and finishes it. Returns the bytes written.
pub async fn send_tensors(
    conn: &quinn::Connection,
    header: &TensorHeader,
    values: &[f32],
) -> Result<u64, IoError> {
    let mut send = conn.open_uni().await?;
    let written = write_tensors(&mut send, header, values).await?;
    send.finish()?;
    Ok(written)
}

/// Writes a tensor stream to an open stream, encoding the body in bounded
/// chunks so no second full copy of the model is ever made.
pub async fn write_tensors(
    send: &mut quinn::SendStream,
    header: &TensorHeader,
    values: &[f32],
) -> Result<u64, IoError> {
    if header.codec != Codec::F32 {
        return Err(ProtocolError::Encode(format!(
            "raw values are sent as f32, not {} (encode them and use send_encoded)",
            header.codec
        ))
        .into());
    }
    if header.body_len != values.len() as u64 * 4 {
        return Err(ProtocolError::BodyLengthMismatch {
            declared: header.body_len,
            expected: values.len() as u64 * 4,
        }
        .into());
    }
    let head = encode_header(header)?;
    send.write_all(&head).await?;
    let mut buf = Vec::with_capacity(SEND_CHUNK_VALUES.min(values.len()) * 4);
    for chunk in values.chunks(SEND_CHUNK_VALUES) {
        buf.clear();
        encode_f32_body(chunk, &mut buf);
        send.write_all(&buf).await?;
    }
    Ok(head.len() as u64 + header.body_len)
}

/// Sends a tensor stream whose body is already encoded (a compressing
/// codec) on a new unidirectional stream and finishes it. `body` is shared,
/// not copied: one encoded model can go to many peers. Returns the bytes
/// written.
pub async fn send_encoded(
    conn: &quinn::Connection,
    header: &TensorHeader,
    body: bytes::Bytes,
) -> Result<u64, IoError> {
    if header.body_len != body.len() as u64 {
        return Err(ProtocolError::BodyLengthMismatch {
            declared: header.body_len,
            expected: body.len() as u64,
        }
        .into());
    }
    let mut send = conn.open_uni().await?;
    let head = encode_header(header)?;
    send.write_all(&head).await?;
    send.write_chunk(body).await?;
    send.finish()?;
    Ok(head.len() as u64 + header.body_len)
}

/// The model's bytes, shared without copying: on little-endian machines an
/// f32 slice already is its wire encoding.
#[cfg(target_endian = "little")]
struct SharedModelBytes(std::sync::Arc<Vec<f32>>);

#[cfg(target_endian = "little")]
impl AsRef<[u8]> for SharedModelBytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(self.0.as_slice())
    }
}

/// Sends one model to a peer on a new unidirectional stream, sharing the
/// model's memory with every other transfer of it: sending the global model
/// to a thousand clients holds one copy, not a thousand.
pub async fn send_shared_tensors(
    conn: &quinn::Connection,
    header: &TensorHeader,
    values: std::sync::Arc<Vec<f32>>,
) -> Result<u64, IoError> {
    #[cfg(target_endian = "little")]
    {
        if header.codec != Codec::F32 {
            return Err(ProtocolError::Encode(format!(
                "raw values are sent as f32, not {}",
                header.codec
            ))
            .into());
        }
        if header.body_len != values.len() as u64 * 4 {
            return Err(ProtocolError::BodyLengthMismatch {
                declared: header.body_len,
                expected: values.len() as u64 * 4,
            }
            .into());
        }
        let mut send = conn.open_uni().await?;
        let head = encode_header(header)?;
        send.write_all(&head).await?;
        let body = bytes::Bytes::from_owner(SharedModelBytes(values));
        send.write_chunk(body).await?;
        send.finish()?;
        Ok(head.len() as u64 + header.body_len)
    }
    #[cfg(not(target_endian = "little"))]
    {
        send_tensors(conn, header, &values).await
    }
}

/// Reads and validates a tensor stream's header.
pub async fn read_tensor_header(
    recv: &mut quinn::RecvStream,
    limits: &TensorLimits,
) -> Result<TensorHeader, IoError> {
    let mut prefix = [0u8; TENSOR_PREFIX_LEN];
    read_exact_named(recv, &mut prefix, "tensor header").await?;
    let len = header_len_from_prefix(&prefix, limits)?;
    let mut bytes = vec![0u8; len];
    read_exact_named(recv, &mut bytes, "tensor header").await?;
    Ok(decode_header(&bytes, limits)?)
}

/// Reads a tensor body straight into `out` as chunks arrive, decoding it with
/// the header's codec (no intermediate copy of the whole body), checking
/// length, structure and finiteness. Fails if the
/// stream carries more or fewer bytes than the header declared.
pub async fn read_tensor_body(
    recv: &mut quinn::RecvStream,
    header: &TensorHeader,
    out: &mut [f32],
) -> Result<(), IoError> {
    read_body(recv, BodyDecoder::new(header), out).await?;
    Ok(())
}

/// [`read_tensor_body`], also taking the L2 norm of the values on the way
/// (see [`BodyDecoder::with_norm`]; `None` for top-k bodies).
pub async fn read_tensor_body_with_norm(
    recv: &mut quinn::RecvStream,
    header: &TensorHeader,
    out: &mut [f32],
) -> Result<Option<f64>, IoError> {
    read_body(recv, BodyDecoder::with_norm(header), out).await
}

async fn read_body(
    recv: &mut quinn::RecvStream,
    mut decoder: BodyDecoder,
    out: &mut [f32],
) -> Result<Option<f64>, IoError> {
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        decoder.push(&chunk.bytes, out)?;
    }
    decoder.finish()?;
    Ok(decoder.norm())
}
