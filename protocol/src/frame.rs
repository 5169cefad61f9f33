//! Length-prefixed control frames: a u32 little-endian payload length, then a
//! postcard-encoded [`Message`].

use crate::error::{ProtocolError, Result};
use crate::message::Message;

/// Control messages are small; anything larger is hostile or broken.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// The most a [`FrameDecoder`] holds before the caller drains it.
pub const MAX_DECODER_BUFFER: usize = 2 * (4 + MAX_CONTROL_FRAME);

/// Encodes `msg` as one frame, prefix included.
pub fn encode_message(msg: &Message) -> Result<Vec<u8>> {
    let mut out =
        postcard::to_extend(msg, vec![0u8; 4]).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_CONTROL_FRAME {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_CONTROL_FRAME,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Reads a frame's payload length from its prefix, refusing oversized frames
/// before the caller allocates anything.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 {
        return Err(ProtocolError::EmptyFrame);
    }
    if len > MAX_CONTROL_FRAME {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_CONTROL_FRAME,
        });
    }
    Ok(len)
}

/// Decodes one frame's payload (without its prefix). The whole payload must
/// be one message.
pub fn decode_message(payload: &[u8]) -> Result<Message> {
    let (msg, rest) = postcard::take_from_bytes::<Message>(payload)
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::TrailingBytes {
            trailing: rest.len(),
        });
    }
    Ok(msg)
}

/// Push-based decoder for a control stream: feed bytes as they arrive, pull
/// whole messages out. Buffers at most one frame.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. At most [`MAX_DECODER_BUFFER`] bytes are held,
    /// so a peer cannot make us buffer without bound; an oversized frame is
    /// refused as soon as its prefix arrives.
    pub fn push(&mut self, bytes: &[u8]) -> Result<()> {
        if self.buf.len() + bytes.len() > MAX_DECODER_BUFFER {
            return Err(ProtocolError::DecoderFull {
                max: MAX_DECODER_BUFFER,
            });
        }
        self.buf.extend_from_slice(bytes);
        if let Some(prefix) = self.buf.get(..4) {
            let mut p = [0u8; 4];
            p.copy_from_slice(prefix);
            frame_len(p)?;
        }
        Ok(())
    }

    /// Returns the next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>> {
        let Some(prefix) = self.buf.get(..4) else {
            return Ok(None);
        };
        let mut p = [0u8; 4];
        p.copy_from_slice(prefix);
        let len = frame_len(p)?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode_message(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// Bytes received but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}
