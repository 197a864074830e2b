//! Decoding of pgoutput message bytes (stub; see module docs in `mod.rs`).

use super::PgOutputMessage;

/// A malformed or truncated pgoutput message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
}

/// Stateful decoder: tracks whether it is inside a streamed-transaction block.
#[derive(Debug, Default)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one message (the payload of one XLogData).
    pub fn decode(&mut self, buf: &bytes::Bytes) -> Result<PgOutputMessage, DecodeError> {
        let _ = self.in_stream;
        Err(DecodeError::UnknownTag(buf.first().copied().unwrap_or(0)))
    }
}
