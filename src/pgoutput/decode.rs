//! Decoding of pgoutput message bytes into [`PgOutputMessage`].
//!
//! Data flow: the replication stream hands over the payload of one XLogData message; it holds
//! exactly one complete pgoutput message, so a short buffer is a malformed message (an error),
//! not "need more bytes". [`Decoder::decode`] reads it with a bounds-checked cursor and returns
//! the typed message; tuple column values are `Bytes::slice`s of the input (no copy).
//!
//! The decoder holds the only state the wire format needs: the negotiated protocol version and
//! whether it is inside a streamed-transaction block (Stream Start .. Stream Stop), where change
//! messages carry a leading xid. Protocol violations (a nested Stream Start, a Stream Stop
//! outside a block, streaming messages in protocol 1) are typed errors, and the state only
//! changes when a message decodes completely.
//!
//! Errors say which message and field were being read and never include the bytes themselves:
//! tuple values and logical-message contents are row data.

use std::fmt;

use bytes::Bytes;

use super::{
    Begin, Commit, Delete, Insert, LogicalMessage, OldTuple, Origin, PgOutputMessage, PgTimestamp,
    Relation, RelationColumn, RelationId, ReplicaIdentity, StreamAbort, StreamCommit, StreamStart,
    Truncate, TupleColumn, TupleData, TypeMessage, Update, Xid,
};
use crate::lsn::Lsn;

/// Highest pgoutput `proto_version` the decoder understands.
pub const MAX_PROTOCOL_VERSION: u32 = 4;

/// Which repeated item of a message a field belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// A column of a tuple or of a Relation message (0-based).
    Column(u32),
    /// An entry of a Truncate message's relation list (0-based).
    Relation(u32),
}

/// Where in a message the decoder was when it failed, e.g. "Insert new tuple column 3 value".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// The message being decoded ("Insert", "Relation", ...).
    pub message: &'static str,
    /// The tuple being read, for tuple data ("new tuple", "old key tuple", "old tuple").
    pub tuple: Option<&'static str>,
    /// The column or list entry being read.
    pub item: Option<Item>,
    /// The field being read ("value length", "namespace", ...).
    pub field: &'static str,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message)?;
        if let Some(tuple) = self.tuple {
            write!(f, " {tuple}")?;
        }
        match self.item {
            Some(Item::Column(i)) => write!(f, " column {i}")?,
            Some(Item::Relation(i)) => write!(f, " relation {i}")?,
            None => {}
        }
        write!(f, " {}", self.field)
    }
}

/// A malformed or truncated pgoutput message, or one that violates the protocol's state rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    #[error(
        "pgoutput {message} messages are not supported (two_phase is not enabled by slotlake)"
    )]
    Unsupported { message: &'static str },
    #[error("pgoutput protocol version {0} is not supported (1 to {MAX_PROTOCOL_VERSION})")]
    UnsupportedProtocolVersion(u32),
    #[error("truncated pgoutput message reading {context}: needed {needed} bytes, {remaining} remaining")]
    Truncated {
        context: Context,
        needed: usize,
        remaining: usize,
    },
    #[error("negative length {length} reading {context}")]
    NegativeLength { context: Context, length: i64 },
    #[error("string not terminated by NUL reading {context}")]
    UnterminatedString { context: Context },
    #[error("invalid UTF-8 after {valid_up_to} bytes reading {context}")]
    InvalidUtf8 {
        context: Context,
        valid_up_to: usize,
    },
    #[error("unexpected byte {byte:#04x} reading {context}")]
    UnexpectedByte { context: Context, byte: u8 },
    #[error("{trailing} unexpected bytes after a complete {message} message")]
    TrailingBytes {
        message: &'static str,
        trailing: usize,
    },
    #[error("{message} message requires streaming, which protocol version {protocol_version} does not have")]
    StreamingNotNegotiated {
        message: &'static str,
        protocol_version: u32,
    },
    #[error("Stream Start for xid {xid} inside the open streamed block of xid {open}")]
    NestedStreamStart { open: Xid, xid: Xid },
    #[error("Stream Stop outside a streamed block")]
    StreamStopOutsideBlock,
    #[error("{message} message inside the streamed block of xid {open}")]
    InsideStreamBlock { message: &'static str, open: Xid },
}

/// Stateful pgoutput decoder: knows the protocol version and whether it is inside a
/// streamed-transaction block. Does no I/O.
#[derive(Debug, Clone)]
pub struct Decoder {
    protocol_version: u32,
    /// The xid of the open streamed block, between Stream Start and Stream Stop.
    open_stream: Option<Xid>,
}

impl Decoder {
    /// A decoder for the `proto_version` the replication was started with (1 to 4).
    /// An unsupported version makes every [`decode`](Self::decode) fail with
    /// [`DecodeError::UnsupportedProtocolVersion`].
    pub fn new(protocol_version: u32) -> Self {
        Decoder {
            protocol_version,
            open_stream: None,
        }
    }

    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    /// The xid of the open streamed block, if the decoder is between Stream Start and Stream Stop.
    pub fn open_stream(&self) -> Option<Xid> {
        self.open_stream
    }

    /// Decodes one message (the payload of one XLogData). On error the decoder's state is
    /// unchanged.
    pub fn decode(&mut self, buf: &Bytes) -> Result<PgOutputMessage, DecodeError> {
        if !(1..=MAX_PROTOCOL_VERSION).contains(&self.protocol_version) {
            return Err(DecodeError::UnsupportedProtocolVersion(
                self.protocol_version,
            ));
        }
        let (&tag, _) = buf.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader::new(buf);
        let message = self.decode_body(tag, &mut r)?;
        r.finish()?;
        match &message {
            PgOutputMessage::StreamStart(start) => self.open_stream = Some(start.xid),
            PgOutputMessage::StreamStop => self.open_stream = None,
            _ => {}
        }
        Ok(message)
    }

    fn decode_body(&self, tag: u8, r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
        Ok(match tag {
            b'B' => {
                r.message = "Begin";
                self.outside_stream("Begin")?;
                PgOutputMessage::Begin(Begin {
                    final_lsn: r.lsn("final LSN")?,
                    commit_ts: r.timestamp("commit timestamp")?,
                    xid: r.u32("xid")?,
                })
            }
            b'C' => {
                r.message = "Commit";
                self.outside_stream("Commit")?;
                PgOutputMessage::Commit(Commit {
                    flags: r.u8("flags")?,
                    commit_lsn: r.lsn("commit LSN")?,
                    end_lsn: r.lsn("end LSN")?,
                    commit_ts: r.timestamp("commit timestamp")?,
                })
            }
            b'O' => {
                // Also sent right after Stream Start, so allowed in both states.
                r.message = "Origin";
                PgOutputMessage::Origin(Origin {
                    commit_lsn: r.lsn("commit LSN")?,
                    name: r.string("name")?,
                })
            }
            b'R' => {
                r.message = "Relation";
                let xid = self.stream_xid(r)?;
                PgOutputMessage::Relation {
                    xid,
                    relation: relation(r)?,
                }
            }
            b'Y' => {
                r.message = "Type";
                let xid = self.stream_xid(r)?;
                PgOutputMessage::Type {
                    xid,
                    ty: TypeMessage {
                        oid: r.u32("type OID")?,
                        namespace: r.string("namespace")?,
                        name: r.string("name")?,
                    },
                }
            }
            b'I' => {
                r.message = "Insert";
                let xid = self.stream_xid(r)?;
                let relation = r.u32("relation OID")?;
                r.expect(b'N', "new tuple marker")?;
                let new = tuple(r, "new tuple")?;
                PgOutputMessage::Insert {
                    xid,
                    insert: Insert { relation, new },
                }
            }
            b'U' => {
                r.message = "Update";
                let xid = self.stream_xid(r)?;
                let relation = r.u32("relation OID")?;
                let (old, marker) = match r.u8("tuple marker")? {
                    b'K' => {
                        let old = OldTuple::Key(tuple(r, "old key tuple")?);
                        (Some(old), r.u8("new tuple marker")?)
                    }
                    b'O' => {
                        let old = OldTuple::Full(tuple(r, "old tuple")?);
                        (Some(old), r.u8("new tuple marker")?)
                    }
                    marker => (None, marker),
                };
                if marker != b'N' {
                    return Err(r.unexpected(marker, "new tuple marker"));
                }
                let new = tuple(r, "new tuple")?;
                PgOutputMessage::Update {
                    xid,
                    update: Update { relation, old, new },
                }
            }
            b'D' => {
                r.message = "Delete";
                let xid = self.stream_xid(r)?;
                let relation = r.u32("relation OID")?;
                let old = match r.u8("old tuple marker")? {
                    b'K' => OldTuple::Key(tuple(r, "old key tuple")?),
                    b'O' => OldTuple::Full(tuple(r, "old tuple")?),
                    marker => return Err(r.unexpected(marker, "old tuple marker")),
                };
                PgOutputMessage::Delete {
                    xid,
                    delete: Delete { relation, old },
                }
            }
            b'T' => {
                r.message = "Truncate";
                let xid = self.stream_xid(r)?;
                let count = r.count_i32("relation count")?;
                let options = r.u8("options")?;
                // Each OID is 4 bytes: never reserve more than the buffer can hold.
                let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
                for i in 0..count {
                    r.item = Some(Item::Relation(index_u32(i)));
                    relations.push(r.u32("OID")?);
                }
                r.item = None;
                PgOutputMessage::Truncate {
                    xid,
                    truncate: Truncate {
                        cascade: options & 1 != 0,
                        restart_identity: options & 2 != 0,
                        relations,
                    },
                }
            }
            b'M' => {
                r.message = "Message";
                let xid = self.stream_xid(r)?;
                let flags = r.u8("flags")?;
                let lsn = r.lsn("LSN")?;
                let prefix = r.string("prefix")?;
                let content = r.length_prefixed("content")?;
                PgOutputMessage::Message {
                    xid,
                    message: LogicalMessage {
                        transactional: flags & 1 != 0,
                        lsn,
                        prefix,
                        content,
                    },
                }
            }
            b'S' => {
                r.message = "Stream Start";
                self.streaming("Stream Start")?;
                let xid = r.u32("xid")?;
                if let Some(open) = self.open_stream {
                    return Err(DecodeError::NestedStreamStart { open, xid });
                }
                // The subscriber treats exactly 1 as "first segment"; do the same.
                let first_segment = r.u8("first segment flag")? == 1;
                PgOutputMessage::StreamStart(StreamStart { xid, first_segment })
            }
            b'E' => {
                r.message = "Stream Stop";
                self.streaming("Stream Stop")?;
                if self.open_stream.is_none() {
                    return Err(DecodeError::StreamStopOutsideBlock);
                }
                PgOutputMessage::StreamStop
            }
            b'c' => {
                r.message = "Stream Commit";
                self.streaming("Stream Commit")?;
                self.outside_stream("Stream Commit")?;
                PgOutputMessage::StreamCommit(StreamCommit {
                    xid: r.u32("xid")?,
                    flags: r.u8("flags")?,
                    commit_lsn: r.lsn("commit LSN")?,
                    end_lsn: r.lsn("end LSN")?,
                    commit_ts: r.timestamp("commit timestamp")?,
                })
            }
            b'A' => {
                r.message = "Stream Abort";
                self.streaming("Stream Abort")?;
                self.outside_stream("Stream Abort")?;
                let abort = StreamAbort {
                    xid: r.u32("xid")?,
                    subxid: r.u32("subxid")?,
                };
                // Protocol 4 adds the abort LSN and timestamp, but only with
                // `streaming = parallel`; accept both shapes and ignore the fields.
                if self.protocol_version >= 4 && r.remaining() > 0 {
                    r.lsn("abort LSN")?;
                    r.timestamp("abort timestamp")?;
                }
                PgOutputMessage::StreamAbort(abort)
            }
            b'b' => return Err(unsupported("Begin Prepare")),
            b'P' => return Err(unsupported("Prepare")),
            b'K' => return Err(unsupported("Commit Prepared")),
            b'r' => return Err(unsupported("Rollback Prepared")),
            b'p' => return Err(unsupported("Stream Prepare")),
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }

    /// The leading xid of a change message: present only inside a streamed block.
    fn stream_xid(&self, r: &mut Reader<'_>) -> Result<Option<Xid>, DecodeError> {
        // Stream Start is refused in protocol 1, so a block is only ever open in protocol ≥ 2.
        match self.open_stream {
            Some(_) => Ok(Some(r.u32("xid")?)),
            None => Ok(None),
        }
    }

    fn streaming(&self, message: &'static str) -> Result<(), DecodeError> {
        if self.protocol_version < 2 {
            return Err(DecodeError::StreamingNotNegotiated {
                message,
                protocol_version: self.protocol_version,
            });
        }
        Ok(())
    }

    fn outside_stream(&self, message: &'static str) -> Result<(), DecodeError> {
        match self.open_stream {
            Some(open) => Err(DecodeError::InsideStreamBlock { message, open }),
            None => Ok(()),
        }
    }
}

fn unsupported(message: &'static str) -> DecodeError {
    DecodeError::Unsupported { message }
}

/// Loop indices come from an `i16`/`i32` count, so they always fit in `u32`.
fn index_u32(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// The body of a Relation message after the optional xid.
fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id: RelationId = r.u32("relation OID")?;
    let namespace = r.string("namespace")?;
    let name = r.string("name")?;
    let replica_identity = match r.u8("replica identity")? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        other => return Err(r.unexpected(other, "replica identity")),
    };
    let count = r.count_i16("column count")?;
    // A column takes at least 10 bytes (flags, empty name, OID, typmod).
    let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
    for i in 0..count {
        r.item = Some(Item::Column(index_u32(i)));
        let flags = r.u8("flags")?;
        columns.push(RelationColumn {
            is_key: flags & 1 != 0,
            name: r.string("name")?,
            type_oid: r.u32("type OID")?,
            type_modifier: r.i32("type modifier")?,
        });
    }
    r.item = None;
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// TupleData: i16 column count, then per column a kind byte and, for `t`/`b`, a value.
fn tuple(r: &mut Reader<'_>, which: &'static str) -> Result<TupleData, DecodeError> {
    r.tuple = Some(which);
    let count = r.count_i16("column count")?;
    // A column takes at least its kind byte.
    let mut columns = Vec::with_capacity(count.min(r.remaining()));
    for i in 0..count {
        r.item = Some(Item::Column(index_u32(i)));
        let column = match r.u8("kind")? {
            b'n' => TupleColumn::Null,
            b'u' => TupleColumn::UnchangedToast,
            b't' => TupleColumn::Text(r.length_prefixed("value")?),
            b'b' => TupleColumn::Binary(r.length_prefixed("value")?),
            other => return Err(r.unexpected(other, "kind")),
        };
        columns.push(column);
    }
    r.item = None;
    r.tuple = None;
    Ok(TupleData { columns })
}

/// A bounds-checked cursor over one message that knows what it is reading, for errors.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    message: &'static str,
    tuple: Option<&'static str>,
    item: Option<Item>,
}

impl<'a> Reader<'a> {
    /// Starts after the tag byte.
    fn new(buf: &'a Bytes) -> Self {
        Reader {
            buf,
            pos: 1,
            message: "message",
            tuple: None,
            item: None,
        }
    }

    fn context(&self, field: &'static str) -> Context {
        Context {
            message: self.message,
            tuple: self.tuple,
            item: self.item,
            field,
        }
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn remaining(&self) -> usize {
        self.rest().len()
    }

    /// The byte range of the next `n` bytes, consumed.
    fn take_range(
        &mut self,
        n: usize,
        field: &'static str,
    ) -> Result<std::ops::Range<usize>, DecodeError> {
        let remaining = self.remaining();
        if n > remaining {
            return Err(DecodeError::Truncated {
                context: self.context(field),
                needed: n,
                remaining,
            });
        }
        let start = self.pos;
        self.pos += n;
        Ok(start..self.pos)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let remaining = self.remaining();
        match self.rest().first_chunk::<N>() {
            Some(bytes) => {
                self.pos += N;
                Ok(*bytes)
            }
            None => Err(DecodeError::Truncated {
                context: self.context(field),
                needed: N,
                remaining,
            }),
        }
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array(field)?)))
    }

    fn timestamp(&mut self, field: &'static str) -> Result<PgTimestamp, DecodeError> {
        Ok(PgTimestamp(i64::from_be_bytes(self.array(field)?)))
    }

    /// A non-negative `i16` count.
    fn count_i16(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let count = self.i16(field)?;
        usize::try_from(count).map_err(|_| DecodeError::NegativeLength {
            context: self.context(field),
            length: i64::from(count),
        })
    }

    /// A non-negative `i32` count or length.
    fn count_i32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let count = self.i32(field)?;
        usize::try_from(count).map_err(|_| DecodeError::NegativeLength {
            context: self.context(field),
            length: i64::from(count),
        })
    }

    /// An `i32` length followed by that many bytes, as a zero-copy slice of the input.
    fn length_prefixed(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.count_i32(field)?;
        let range = self.take_range(len, field)?;
        Ok(self.buf.slice(range))
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = self.rest();
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString {
                context: self.context(field),
            });
        };
        let bytes = rest.get(..nul).unwrap_or_default();
        let s = std::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidUtf8 {
            context: self.context(field),
            valid_up_to: e.valid_up_to(),
        })?;
        self.pos += nul + 1;
        Ok(s.to_owned())
    }

    fn expect(&mut self, want: u8, field: &'static str) -> Result<(), DecodeError> {
        let got = self.u8(field)?;
        if got != want {
            return Err(self.unexpected(got, field));
        }
        Ok(())
    }

    fn unexpected(&self, byte: u8, field: &'static str) -> DecodeError {
        DecodeError::UnexpectedByte {
            context: self.context(field),
            byte,
        }
    }

    /// Checks that the whole message was consumed.
    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            trailing => Err(DecodeError::TrailingBytes {
                message: self.message,
                trailing,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Test-only builder of pgoutput message bytes.
    #[derive(Default, Clone)]
    struct Msg(Vec<u8>);

    impl Msg {
        fn tag(tag: u8) -> Self {
            Msg(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn str(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        /// A tuple of (kind, value) columns.
        fn tuple(mut self, cols: &[(u8, &[u8])]) -> Self {
            self = self.i16(cols.len() as i16);
            for &(kind, value) in cols {
                self = self.u8(kind);
                if kind == b't' || kind == b'b' {
                    self = self.i32(value.len() as i32).raw(value);
                }
            }
            self
        }
        fn bytes(&self) -> Bytes {
            Bytes::from(self.0.clone())
        }
    }

    fn decode(d: &mut Decoder, m: &Msg) -> Result<PgOutputMessage, DecodeError> {
        d.decode(&m.bytes())
    }

    /// A decoder inside the streamed block of `xid` (protocol 2).
    fn streaming_decoder(xid: Xid) -> Decoder {
        let mut d = Decoder::new(2);
        let start = Msg::tag(b'S').u32(xid).u8(1);
        assert!(decode(&mut d, &start).is_ok());
        d
    }

    fn relation_msg(xid: Option<Xid>) -> Msg {
        let mut m = Msg::tag(b'R');
        if let Some(xid) = xid {
            m = m.u32(xid);
        }
        m.u32(16384)
            .str("public")
            .str("Orders")
            .u8(b'f')
            .i16(2)
            .u8(1)
            .str("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .str("amount")
            .u32(1700)
            .i32(((10 << 16) | 2) + 4)
    }

    fn expected_relation() -> Relation {
        Relation {
            id: 16384,
            namespace: "public".into(),
            name: "Orders".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                RelationColumn {
                    is_key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                RelationColumn {
                    is_key: false,
                    name: "amount".into(),
                    type_oid: 1700,
                    type_modifier: ((10 << 16) | 2) + 4,
                },
            ],
        }
    }

    fn insert_msg(xid: Option<Xid>) -> Msg {
        let mut m = Msg::tag(b'I');
        if let Some(xid) = xid {
            m = m.u32(xid);
        }
        m.u32(16384)
            .u8(b'N')
            .tuple(&[(b't', b"42"), (b'n', b""), (b'u', b""), (b'b', b"\0\x01")])
    }

    fn expected_insert_tuple() -> TupleData {
        TupleData {
            columns: vec![
                TupleColumn::Text(Bytes::from_static(b"42")),
                TupleColumn::Null,
                TupleColumn::UnchangedToast,
                TupleColumn::Binary(Bytes::from_static(b"\0\x01")),
            ],
        }
    }

    /// Every kind of message that is valid outside a block in protocol 2, for exhaustive tests.
    fn valid_messages() -> Vec<Msg> {
        vec![
            Msg::tag(b'B').u64(0x16_B374_D848).i64(1234).u32(777),
            Msg::tag(b'C').u8(0).u64(1).u64(2).i64(3),
            Msg::tag(b'O').u64(5).str("origin"),
            relation_msg(None),
            Msg::tag(b'Y').u32(99999).str("public").str("mood"),
            insert_msg(None),
            Msg::tag(b'U')
                .u32(1)
                .u8(b'K')
                .tuple(&[(b't', b"1")])
                .u8(b'N')
                .tuple(&[(b't', b"2")]),
            Msg::tag(b'D')
                .u32(1)
                .u8(b'O')
                .tuple(&[(b't', b"1"), (b'n', b"")]),
            Msg::tag(b'T').i32(2).u8(3).u32(10).u32(11),
            Msg::tag(b'M')
                .u8(1)
                .u64(9)
                .str("slotlake")
                .i32(3)
                .raw(b"hey"),
            Msg::tag(b'S').u32(700).u8(1),
            Msg::tag(b'c').u32(700).u8(0).u64(1).u64(2).i64(3),
            Msg::tag(b'A').u32(700).u32(701),
        ]
    }

    #[test]
    fn begin_commit_origin() {
        let mut d = Decoder::new(1);
        let begin = Msg::tag(b'B').u64(0x16_B374_D848).i64(-5).u32(777);
        assert_eq!(
            decode(&mut d, &begin),
            Ok(PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_ts: PgTimestamp(-5),
                xid: 777,
            }))
        );
        let commit = Msg::tag(b'C').u8(0).u64(10).u64(20).i64(30);
        assert_eq!(
            decode(&mut d, &commit),
            Ok(PgOutputMessage::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(10),
                end_lsn: Lsn(20),
                commit_ts: PgTimestamp(30),
            }))
        );
        let origin = Msg::tag(b'O').u64(7).str("node_a");
        assert_eq!(
            decode(&mut d, &origin),
            Ok(PgOutputMessage::Origin(Origin {
                commit_lsn: Lsn(7),
                name: "node_a".into(),
            }))
        );
    }

    #[test]
    fn relation_and_type() {
        let mut d = Decoder::new(2);
        assert_eq!(
            decode(&mut d, &relation_msg(None)),
            Ok(PgOutputMessage::Relation {
                xid: None,
                relation: expected_relation(),
            })
        );
        let ty = Msg::tag(b'Y').u32(99999).str("public").str("mood");
        assert_eq!(
            decode(&mut d, &ty),
            Ok(PgOutputMessage::Type {
                xid: None,
                ty: TypeMessage {
                    oid: 99999,
                    namespace: "public".into(),
                    name: "mood".into(),
                },
            })
        );
    }

    #[test]
    fn relation_replica_identities() {
        for (byte, want) in [
            (b'd', ReplicaIdentity::Default),
            (b'n', ReplicaIdentity::Nothing),
            (b'f', ReplicaIdentity::Full),
            (b'i', ReplicaIdentity::Index),
        ] {
            let m = Msg::tag(b'R').u32(1).str("s").str("t").u8(byte).i16(0);
            match Decoder::new(1).decode(&m.bytes()) {
                Ok(PgOutputMessage::Relation { relation, .. }) => {
                    assert_eq!(relation.replica_identity, want);
                    assert!(relation.columns.is_empty());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let bad = Msg::tag(b'R').u32(1).str("s").str("t").u8(b'x').i16(0);
        assert!(matches!(
            Decoder::new(1).decode(&bad.bytes()),
            Err(DecodeError::UnexpectedByte { byte: b'x', context }) if context.field == "replica identity"
        ));
    }

    #[test]
    fn insert_tuple_kinds_are_zero_copy() {
        let mut d = Decoder::new(1);
        let bytes = insert_msg(None).bytes();
        let msg = d.decode(&bytes);
        assert_eq!(
            msg,
            Ok(PgOutputMessage::Insert {
                xid: None,
                insert: Insert {
                    relation: 16384,
                    new: expected_insert_tuple(),
                },
            })
        );
        // The text value points into the input buffer.
        if let Ok(PgOutputMessage::Insert { insert, .. }) = msg {
            match insert.new.columns.first() {
                Some(TupleColumn::Text(v)) => {
                    let offset = v.as_ptr() as usize - bytes.as_ptr() as usize;
                    assert!(offset < bytes.len());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn update_without_old_with_key_and_with_full_old() {
        let mut d = Decoder::new(1);
        let plain = Msg::tag(b'U').u32(5).u8(b'N').tuple(&[(b't', b"n")]);
        assert_eq!(
            decode(&mut d, &plain),
            Ok(PgOutputMessage::Update {
                xid: None,
                update: Update {
                    relation: 5,
                    old: None,
                    new: TupleData {
                        columns: vec![TupleColumn::Text(Bytes::from_static(b"n"))]
                    },
                },
            })
        );
        let key = Msg::tag(b'U')
            .u32(5)
            .u8(b'K')
            .tuple(&[(b't', b"k"), (b'n', b"")])
            .u8(b'N')
            .tuple(&[(b't', b"n"), (b't', b"x")]);
        match decode(&mut d, &key) {
            Ok(PgOutputMessage::Update { update, .. }) => {
                assert_eq!(
                    update.old,
                    Some(OldTuple::Key(TupleData {
                        columns: vec![
                            TupleColumn::Text(Bytes::from_static(b"k")),
                            TupleColumn::Null
                        ]
                    }))
                );
                assert_eq!(update.new.columns.len(), 2);
            }
            other => panic!("unexpected {other:?}"),
        }
        let full = Msg::tag(b'U')
            .u32(5)
            .u8(b'O')
            .tuple(&[(b't', b"o")])
            .u8(b'N')
            .tuple(&[(b'u', b"")]);
        match decode(&mut d, &full) {
            Ok(PgOutputMessage::Update { update, .. }) => {
                assert_eq!(
                    update.old,
                    Some(OldTuple::Full(TupleData {
                        columns: vec![TupleColumn::Text(Bytes::from_static(b"o"))]
                    }))
                );
                assert_eq!(update.new.columns, vec![TupleColumn::UnchangedToast]);
            }
            other => panic!("unexpected {other:?}"),
        }
        // An old tuple must be followed by N.
        let missing_new = Msg::tag(b'U')
            .u32(5)
            .u8(b'K')
            .tuple(&[(b't', b"k")])
            .u8(b'K')
            .tuple(&[(b't', b"k")]);
        assert!(matches!(
            decode(&mut d, &missing_new),
            Err(DecodeError::UnexpectedByte { byte: b'K', context }) if context.field == "new tuple marker"
        ));
    }

    #[test]
    fn delete_with_key_and_full() {
        let mut d = Decoder::new(1);
        let key = Msg::tag(b'D').u32(3).u8(b'K').tuple(&[(b't', b"1")]);
        assert_eq!(
            decode(&mut d, &key),
            Ok(PgOutputMessage::Delete {
                xid: None,
                delete: Delete {
                    relation: 3,
                    old: OldTuple::Key(TupleData {
                        columns: vec![TupleColumn::Text(Bytes::from_static(b"1"))]
                    }),
                },
            })
        );
        let full = Msg::tag(b'D').u32(3).u8(b'O').tuple(&[(b'n', b"")]);
        assert!(matches!(
            decode(&mut d, &full),
            Ok(PgOutputMessage::Delete {
                delete: Delete {
                    old: OldTuple::Full(_),
                    ..
                },
                ..
            })
        ));
        let bad = Msg::tag(b'D').u32(3).u8(b'N').tuple(&[(b'n', b"")]);
        assert!(matches!(
            decode(&mut d, &bad),
            Err(DecodeError::UnexpectedByte { byte: b'N', .. })
        ));
    }

    #[test]
    fn truncate_options() {
        let mut d = Decoder::new(1);
        for (options, cascade, restart) in [
            (0, false, false),
            (1, true, false),
            (2, false, true),
            (3, true, true),
        ] {
            let m = Msg::tag(b'T').i32(2).u8(options).u32(10).u32(11);
            assert_eq!(
                decode(&mut d, &m),
                Ok(PgOutputMessage::Truncate {
                    xid: None,
                    truncate: Truncate {
                        cascade,
                        restart_identity: restart,
                        relations: vec![10, 11],
                    },
                })
            );
        }
        let negative = Msg::tag(b'T').i32(-1).u8(0);
        assert!(matches!(
            decode(&mut d, &negative),
            Err(DecodeError::NegativeLength { length: -1, .. })
        ));
        let short = Msg::tag(b'T').i32(3).u8(0).u32(10).u32(11);
        match decode(&mut d, &short) {
            Err(DecodeError::Truncated {
                context,
                needed: 4,
                remaining: 0,
            }) => {
                assert_eq!(context.item, Some(Item::Relation(2)));
                assert_eq!(context.to_string(), "Truncate relation 2 OID");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn logical_message() {
        let mut d = Decoder::new(1);
        let m = Msg::tag(b'M').u8(0).u64(9).str("hb").i32(0);
        assert_eq!(
            decode(&mut d, &m),
            Ok(PgOutputMessage::Message {
                xid: None,
                message: LogicalMessage {
                    transactional: false,
                    lsn: Lsn(9),
                    prefix: "hb".into(),
                    content: Bytes::new(),
                },
            })
        );
        let m = Msg::tag(b'M').u8(1).u64(9).str("hb").i32(3).raw(b"\xff\0x");
        match decode(&mut d, &m) {
            Ok(PgOutputMessage::Message { message, .. }) => {
                assert!(message.transactional);
                assert_eq!(&message.content[..], b"\xff\0x");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn stream_block_carries_xids() {
        let mut d = Decoder::new(2);
        assert_eq!(
            decode(&mut d, &Msg::tag(b'S').u32(700).u8(1)),
            Ok(PgOutputMessage::StreamStart(StreamStart {
                xid: 700,
                first_segment: true
            }))
        );
        assert_eq!(d.open_stream(), Some(700));
        // Origin is sent right after Stream Start, without an xid.
        assert!(matches!(
            decode(&mut d, &Msg::tag(b'O').u64(0).str("o")),
            Ok(PgOutputMessage::Origin(_))
        ));
        assert_eq!(
            decode(&mut d, &relation_msg(Some(700))),
            Ok(PgOutputMessage::Relation {
                xid: Some(700),
                relation: expected_relation(),
            })
        );
        assert_eq!(
            decode(&mut d, &insert_msg(Some(701))),
            Ok(PgOutputMessage::Insert {
                xid: Some(701),
                insert: Insert {
                    relation: 16384,
                    new: expected_insert_tuple(),
                },
            })
        );
        let update = Msg::tag(b'U').u32(701).u32(1).u8(b'N').tuple(&[]);
        assert!(matches!(
            decode(&mut d, &update),
            Ok(PgOutputMessage::Update { xid: Some(701), .. })
        ));
        let delete = Msg::tag(b'D').u32(701).u32(1).u8(b'K').tuple(&[]);
        assert!(matches!(
            decode(&mut d, &delete),
            Ok(PgOutputMessage::Delete { xid: Some(701), .. })
        ));
        let truncate = Msg::tag(b'T').u32(700).i32(1).u8(0).u32(1);
        assert!(matches!(
            decode(&mut d, &truncate),
            Ok(PgOutputMessage::Truncate { xid: Some(700), .. })
        ));
        let ty = Msg::tag(b'Y').u32(700).u32(5).str("s").str("t");
        assert!(matches!(
            decode(&mut d, &ty),
            Ok(PgOutputMessage::Type { xid: Some(700), .. })
        ));
        let message = Msg::tag(b'M').u32(700).u8(1).u64(1).str("p").i32(0);
        assert!(matches!(
            decode(&mut d, &message),
            Ok(PgOutputMessage::Message { xid: Some(700), .. })
        ));
        // Without the xid, the same Insert bytes are misread and rejected.
        assert!(decode(&mut d, &insert_msg(None)).is_err());
        assert_eq!(
            decode(&mut d, &Msg::tag(b'E')),
            Ok(PgOutputMessage::StreamStop)
        );
        assert_eq!(d.open_stream(), None);
        // Outside the block the xid is gone again.
        assert!(matches!(
            decode(&mut d, &insert_msg(None)),
            Ok(PgOutputMessage::Insert { xid: None, .. })
        ));
        assert_eq!(
            decode(&mut d, &Msg::tag(b'S').u32(700).u8(0)),
            Ok(PgOutputMessage::StreamStart(StreamStart {
                xid: 700,
                first_segment: false
            }))
        );
        assert_eq!(
            decode(&mut d, &Msg::tag(b'E')),
            Ok(PgOutputMessage::StreamStop)
        );
        assert_eq!(
            decode(&mut d, &Msg::tag(b'c').u32(700).u8(0).u64(1).u64(2).i64(3)),
            Ok(PgOutputMessage::StreamCommit(StreamCommit {
                xid: 700,
                flags: 0,
                commit_lsn: Lsn(1),
                end_lsn: Lsn(2),
                commit_ts: PgTimestamp(3),
            }))
        );
        assert_eq!(
            decode(&mut d, &Msg::tag(b'A').u32(700).u32(702)),
            Ok(PgOutputMessage::StreamAbort(StreamAbort {
                xid: 700,
                subxid: 702
            }))
        );
    }

    #[test]
    fn stream_protocol_violations() {
        let mut d = streaming_decoder(700);
        assert_eq!(
            decode(&mut d, &Msg::tag(b'S').u32(800).u8(1)),
            Err(DecodeError::NestedStreamStart {
                open: 700,
                xid: 800
            })
        );
        assert_eq!(d.open_stream(), Some(700));
        assert_eq!(
            decode(&mut d, &Msg::tag(b'c').u32(700).u8(0).u64(1).u64(2).i64(3)),
            Err(DecodeError::InsideStreamBlock {
                message: "Stream Commit",
                open: 700
            })
        );
        assert_eq!(
            decode(&mut d, &Msg::tag(b'B').u64(1).i64(2).u32(3)),
            Err(DecodeError::InsideStreamBlock {
                message: "Begin",
                open: 700
            })
        );
        assert_eq!(
            decode(&mut d, &Msg::tag(b'E')),
            Ok(PgOutputMessage::StreamStop)
        );
        assert_eq!(
            decode(&mut d, &Msg::tag(b'E')),
            Err(DecodeError::StreamStopOutsideBlock)
        );

        let mut v1 = Decoder::new(1);
        assert_eq!(
            decode(&mut v1, &Msg::tag(b'S').u32(700).u8(1)),
            Err(DecodeError::StreamingNotNegotiated {
                message: "Stream Start",
                protocol_version: 1
            })
        );
        assert_eq!(v1.open_stream(), None);
        assert!(matches!(
            decode(&mut v1, &Msg::tag(b'A').u32(1).u32(1)),
            Err(DecodeError::StreamingNotNegotiated { .. })
        ));
        // A Stream Start with trailing garbage does not open a block.
        let mut d = Decoder::new(2);
        assert!(matches!(
            decode(&mut d, &Msg::tag(b'S').u32(1).u8(1).u8(0)),
            Err(DecodeError::TrailingBytes {
                message: "Stream Start",
                trailing: 1
            })
        ));
        assert_eq!(d.open_stream(), None);
    }

    #[test]
    fn stream_abort_protocol_4_fields() {
        let short = Msg::tag(b'A').u32(7).u32(8);
        let long = short.clone().u64(100).i64(200);
        let want = Ok(PgOutputMessage::StreamAbort(StreamAbort {
            xid: 7,
            subxid: 8,
        }));
        assert_eq!(decode(&mut Decoder::new(4), &short), want);
        assert_eq!(decode(&mut Decoder::new(4), &long), want);
        // Before protocol 4 the extra fields are trailing garbage.
        assert!(matches!(
            decode(&mut Decoder::new(3), &long),
            Err(DecodeError::TrailingBytes { trailing: 16, .. })
        ));
        // Half of the extra fields is a truncated message.
        assert!(matches!(
            decode(&mut Decoder::new(4), &short.u64(100)),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn protocol_versions() {
        let begin = Msg::tag(b'B').u64(1).i64(2).u32(3);
        for v in 1..=4 {
            assert!(decode(&mut Decoder::new(v), &begin).is_ok(), "version {v}");
        }
        for v in [0, 5] {
            assert_eq!(
                decode(&mut Decoder::new(v), &begin),
                Err(DecodeError::UnsupportedProtocolVersion(v))
            );
        }
    }

    #[test]
    fn garbage_tags_and_empty_input() {
        let mut d = Decoder::new(2);
        assert_eq!(d.decode(&Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            decode(&mut d, &Msg::tag(b'z')),
            Err(DecodeError::UnknownTag(b'z'))
        );
        assert_eq!(
            decode(&mut d, &Msg::tag(0)),
            Err(DecodeError::UnknownTag(0))
        );
        assert_eq!(
            decode(&mut d, &Msg::tag(b'P')),
            Err(DecodeError::Unsupported { message: "Prepare" })
        );
    }

    #[test]
    fn malformed_fields_are_typed_errors() {
        let mut d = Decoder::new(1);
        let bad_kind = Msg::tag(b'I').u32(1).u8(b'N').i16(2).u8(b'n').u8(b'q');
        match decode(&mut d, &bad_kind) {
            Err(DecodeError::UnexpectedByte {
                context,
                byte: b'q',
            }) => {
                assert_eq!(context.to_string(), "Insert new tuple column 1 kind");
            }
            other => panic!("unexpected {other:?}"),
        }
        let negative_len = Msg::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-1);
        assert!(matches!(
            decode(&mut d, &negative_len),
            Err(DecodeError::NegativeLength { length: -1, .. })
        ));
        let negative_cols = Msg::tag(b'I').u32(1).u8(b'N').i16(-2);
        assert!(matches!(
            decode(&mut d, &negative_cols),
            Err(DecodeError::NegativeLength { length: -2, .. })
        ));
        let short_value = Msg::tag(b'I')
            .u32(1)
            .u8(b'N')
            .i16(4)
            .u8(b'n')
            .u8(b'n')
            .u8(b'n')
            .u8(b't')
            .i32(10)
            .raw(b"abc");
        match decode(&mut d, &short_value) {
            Err(e @ DecodeError::Truncated { .. }) => {
                assert_eq!(
                    e.to_string(),
                    "truncated pgoutput message reading Insert new tuple column 3 value: needed 10 bytes, 3 remaining"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let not_insert = Msg::tag(b'I').u32(1).u8(b'X');
        assert!(matches!(
            decode(&mut d, &not_insert),
            Err(DecodeError::UnexpectedByte { byte: b'X', .. })
        ));
        let trailing = Msg::tag(b'C').u8(0).u64(1).u64(2).i64(3).u8(9);
        assert_eq!(
            decode(&mut d, &trailing),
            Err(DecodeError::TrailingBytes {
                message: "Commit",
                trailing: 1
            })
        );
        let unterminated = Msg::tag(b'O').u64(1).raw(b"abc");
        assert!(matches!(
            decode(&mut d, &unterminated),
            Err(DecodeError::UnterminatedString { .. })
        ));
    }

    #[test]
    fn invalid_utf8_is_reported_without_content() {
        let m = Msg::tag(b'O').u64(1).raw(b"ab\xffsecret\0");
        let err = decode(&mut Decoder::new(1), &m);
        match &err {
            Err(e @ DecodeError::InvalidUtf8 { valid_up_to: 2, .. }) => {
                let text = e.to_string();
                assert!(!text.contains("secret"), "{text}");
                assert!(text.contains("Origin name"), "{text}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn every_truncation_of_every_message_is_an_error() {
        let mut all = valid_messages();
        all.push(Msg::tag(b'E'));
        for m in &all {
            let full = m.bytes();
            for cut in 0..full.len() {
                // Stream Stop needs an open block; everything else decodes outside one.
                let mut d = if full.first() == Some(&b'E') {
                    streaming_decoder(1)
                } else {
                    Decoder::new(2)
                };
                let r = d.decode(&full.slice(..cut));
                assert!(
                    r.is_err(),
                    "tag {:?} cut at {cut} decoded: {r:?}",
                    full.first()
                );
            }
        }
        // In-block variants (with xid) too.
        for m in [relation_msg(Some(9)), insert_msg(Some(9))] {
            let full = m.bytes();
            for cut in 0..full.len() {
                let r = streaming_decoder(9).decode(&full.slice(..cut));
                assert!(r.is_err(), "cut at {cut} decoded: {r:?}");
            }
        }
    }

    #[test]
    fn all_valid_messages_decode_and_reject_trailing_bytes() {
        for m in valid_messages() {
            assert!(decode(&mut Decoder::new(2), &m).is_ok(), "{:?}", m.0);
            let longer = m.clone().u8(0);
            assert!(
                matches!(
                    decode(&mut Decoder::new(2), &longer),
                    Err(DecodeError::TrailingBytes { trailing: 1, .. })
                ),
                "{:?}",
                m.0
            );
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), version in 1u32..=4) {
            let buf = Bytes::from(bytes);
            let mut d = Decoder::new(version);
            if d.decode(&buf).is_err() {
                prop_assert_eq!(d.open_stream(), None);
            }
            if version >= 2 {
                let mut d = streaming_decoder(5);
                if d.decode(&buf).is_err() {
                    prop_assert_eq!(d.open_stream(), Some(5));
                }
            }
        }

        #[test]
        fn decode_never_panics_on_valid_prefixes(
            index in 0usize..13,
            tail in proptest::collection::vec(any::<u8>(), 0..40),
            in_stream in any::<bool>(),
        ) {
            // A valid message start followed by arbitrary bytes exercises deeper paths.
            let msgs = valid_messages();
            let base = msgs.get(index).cloned().unwrap_or_default();
            let buf = base.raw(&tail).bytes();
            let mut d = if in_stream { streaming_decoder(5) } else { Decoder::new(2) };
            let before = d.open_stream();
            if d.decode(&buf).is_err() {
                prop_assert_eq!(d.open_stream(), before);
            }
        }

        #[test]
        fn tuple_values_round_trip(values in proptest::collection::vec(
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)), 0..10)
        ) {
            let cols: Vec<(u8, &[u8])> = values
                .iter()
                .map(|v| match v { Some(b) => (b't', b.as_slice()), None => (b'n', &b""[..]) })
                .collect();
            let m = Msg::tag(b'I').u32(1).u8(b'N').tuple(&cols);
            let decoded = decode(&mut Decoder::new(1), &m);
            let want: Vec<TupleColumn> = values
                .iter()
                .map(|v| match v {
                    Some(b) => TupleColumn::Text(Bytes::from(b.clone())),
                    None => TupleColumn::Null,
                })
                .collect();
            prop_assert_eq!(
                decoded,
                Ok(PgOutputMessage::Insert {
                    xid: None,
                    insert: Insert { relation: 1, new: TupleData { columns: want } },
                })
            );
        }
    }
}
