//! The logical replication stream: `START_REPLICATION ... LOGICAL`, XLogData and keepalives in,
//! standby status updates out, and a clean stop.
//!
//! The stream only moves bytes; what to confirm and when is decided by the caller, which knows
//! what is durable. [`ReplicationStream::next_message`] is cancel-safe, so a caller can
//! `select!` between it and a status-update timer.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};

use super::connection::{parse_error_response, ClientError, PgConnection};
use super::sql::{quote_ident, quote_literal};
use crate::lsn::Lsn;

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// pgoutput options for START_REPLICATION.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub publications: Vec<String>,
    /// pgoutput protocol version; 0 picks 2 on servers ≥ 14 and 1 otherwise.
    pub proto_version: u32,
    /// Receive `pg_logical_emit_message` messages (PG ≥ 14).
    pub messages: bool,
    /// Stream large in-progress transactions (proto ≥ 2, PG ≥ 14).
    pub streaming: bool,
    /// Values in binary form (PG ≥ 14).
    pub binary: bool,
}

impl StreamOptions {
    pub fn new(publications: Vec<String>) -> Self {
        StreamOptions {
            publications,
            proto_version: 0,
            messages: true,
            streaming: true,
            binary: false,
        }
    }
}

/// One message from the server while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: one pgoutput message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// Primary keepalive: the server's current WAL end, and whether it wants a status update now.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// A session in copy-both mode.
pub struct ReplicationStream {
    conn: PgConnection,
    proto_version: u32,
    options: StreamOptions,
}

impl ReplicationStream {
    /// Starts streaming `slot` from `start` (0/0: from the slot's confirmed position).
    pub async fn start(
        mut conn: PgConnection,
        slot: &str,
        start: Lsn,
        mut options: StreamOptions,
    ) -> Result<ReplicationStream, ClientError> {
        let version = conn.server_version_num();
        let modern = version >= 140000;
        if options.proto_version == 0 {
            options.proto_version = if modern { 2 } else { 1 };
        }
        if !modern {
            options.messages = false;
            options.streaming = false;
            options.binary = false;
        }
        if options.proto_version < 2 {
            options.streaming = false;
        }
        let pubs = options
            .publications
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let mut opts = vec![
            format!("proto_version '{}'", options.proto_version),
            format!("publication_names {}", quote_literal(&pubs)),
        ];
        if options.messages {
            opts.push("messages 'true'".into());
        }
        if options.streaming {
            opts.push("streaming 'on'".into());
        }
        if options.binary {
            opts.push("binary 'true'".into());
        }
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            quote_ident(slot),
            start,
            opts.join(", ")
        );
        conn.start_copy_both(&command).await?;
        Ok(ReplicationStream {
            proto_version: options.proto_version,
            conn,
            options,
        })
    }

    /// The pgoutput protocol version in use.
    pub fn proto_version(&self) -> u32 {
        self.proto_version
    }

    pub fn options(&self) -> &StreamOptions {
        &self.options
    }

    /// The next message; `Ok(None)` when the server ended the stream. Cancel-safe.
    pub async fn next_message(&mut self) -> Result<Option<ReplicationMessage>, ClientError> {
        loop {
            let frame = self.conn.read_frame().await?;
            match frame.tag {
                b'd' => return parse_copy_data(frame.body).map(Some),
                // CopyDone; or CommandComplete without one, which is how a walsender ends the
                // stream when its server shuts down (WalSndDone sends "COPY 0" and exits).
                b'c' | b'C' => return Ok(None),
                b'E' => return Err(parse_error_response(frame.body)?.into()),
                b'N' | b'S' => {}
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected message {:?} while streaming",
                        other as char
                    )))
                }
            }
        }
    }

    /// The next message if a whole one is already buffered, without I/O and without waiting
    /// (`Ok(None)`: nothing complete is buffered, or what is needs [`Self::next_message`]).
    pub fn buffered_message(&mut self) -> Result<Option<ReplicationMessage>, ClientError> {
        match self.conn.buffered_frame(b'd')? {
            Some(frame) => parse_copy_data(frame.body).map(Some),
            None => Ok(None),
        }
    }

    /// Sends a standby status update: WAL received (`write`), durably processed (`flush`), and
    /// applied (`apply`). The server may recycle WAL up to `flush`.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ClientError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64 - PG_EPOCH_OFFSET_MICROS)
            .unwrap_or(0);
        let buf = self.conn.write_buf();
        buf.put_u8(b'd');
        buf.put_i32(4 + 1 + 8 + 8 + 8 + 8 + 1);
        buf.put_u8(b'r');
        buf.put_u64(write.0);
        buf.put_u64(flush.0);
        buf.put_u64(apply.0);
        buf.put_i64(now);
        buf.put_u8(u8::from(reply_requested));
        self.conn.flush().await
    }

    /// Ends copy-both mode (CopyDone), drains what the server still sends, and returns the
    /// session, ready for more commands.
    pub async fn stop(mut self) -> Result<PgConnection, ClientError> {
        let buf = self.conn.write_buf();
        buf.put_u8(b'c');
        buf.put_i32(4);
        self.conn.flush().await?;
        let mut error = None;
        loop {
            let frame = self.conn.read_frame().await?;
            match frame.tag {
                b'Z' => break,
                b'E' => error = Some(parse_error_response(frame.body)?),
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e.into()),
            None => Ok(self.conn),
        }
    }
}

fn parse_copy_data(mut body: Bytes) -> Result<ReplicationMessage, ClientError> {
    if body.remaining() < 1 {
        return Err(ClientError::Protocol("empty CopyData".into()));
    }
    match body.get_u8() {
        b'w' => {
            if body.remaining() < 24 {
                return Err(ClientError::Protocol("XLogData header truncated".into()));
            }
            let wal_start = Lsn(body.get_u64());
            let wal_end = Lsn(body.get_u64());
            let _send_time = body.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data: body,
            })
        }
        b'k' => {
            if body.remaining() < 17 {
                return Err(ClientError::Protocol("keepalive truncated".into()));
            }
            let wal_end = Lsn(body.get_u64());
            let _send_time = body.get_i64();
            let reply_requested = body.get_u8() != 0;
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            })
        }
        other => Err(ClientError::Protocol(format!(
            "unknown CopyData message {:?}",
            other as char
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut b = vec![b'w'];
        b.extend_from_slice(&0x10u64.to_be_bytes());
        b.extend_from_slice(&0x20u64.to_be_bytes());
        b.extend_from_slice(&0i64.to_be_bytes());
        b.extend_from_slice(b"Bxyz");
        assert_eq!(
            parse_copy_data(Bytes::from(b)).unwrap(),
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x10),
                wal_end: Lsn(0x20),
                data: Bytes::from_static(b"Bxyz")
            }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x30u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(k.clone())).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(0x30),
                reply_requested: true
            }
        );
        for cut in 0..k.len() {
            assert!(
                parse_copy_data(Bytes::from(k[..cut].to_vec())).is_err(),
                "cut at {cut}"
            );
        }
    }
}
