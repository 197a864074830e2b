//! pgoutput: the logical decoding output plugin's message format, decoded without I/O.
//!
//! Data flow: the replication stream hands over the payload of each XLogData message (exactly
//! one pgoutput message per XLogData); [`Decoder::decode`] turns those bytes into a
//! [`PgOutputMessage`]. The decoder keeps the only state the wire format needs: whether it is
//! inside a streamed-transaction block (between Stream Start and Stream Stop, change messages
//! carry an extra xid field). [`relation::RelationCache`] remembers Relation messages so that
//! tuples can be interpreted, and tells the caller when a relation's schema changed.
//!
//! Tuple column values stay as `Bytes` slices of the received buffer (no copy); turning them
//! into typed values is the job of [`crate::types`].
//!
//! Reference: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>

pub mod decode;
pub mod relation;

pub use decode::{DecodeError, Decoder};

use bytes::Bytes;

use crate::lsn::Lsn;

/// Transaction id as sent by pgoutput.
pub type Xid = u32;
/// Relation (table) OID.
pub type RelationId = u32;

/// Microseconds since 2000-01-01 00:00:00 UTC, the Postgres epoch, as sent in Begin/Commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds between 1970-01-01 and 2000-01-01.
    pub const UNIX_OFFSET_MICROS: i64 = 946_684_800_000_000;

    /// Microseconds since the Unix epoch (saturating; commit timestamps are always in range).
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(Self::UNIX_OFFSET_MICROS)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record (the transaction's final LSN).
    pub final_lsn: Lsn,
    pub commit_ts: PgTimestamp,
    pub xid: Xid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End LSN of the transaction: the position to confirm once it is durable.
    pub end_lsn: Lsn,
    pub commit_ts: PgTimestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// `relreplident`: which old values updates and deletes carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelationColumn {
    /// Part of the replica identity (flag bit 1).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Relation {
    pub id: RelationId,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

/// One column of a tuple as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleColumn {
    /// `n`
    Null,
    /// `u`: a TOASTed value that did not change and was not sent.
    UnchangedToast,
    /// `t`: text form.
    Text(Bytes),
    /// `b`: binary form (the `binary` option).
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData {
    pub columns: Vec<TupleColumn>,
}

impl TupleData {
    /// Bytes of the values sent (text or binary forms).
    pub fn value_bytes(&self) -> usize {
        self.columns
            .iter()
            .map(|c| match c {
                TupleColumn::Text(b) | TupleColumn::Binary(b) => b.len(),
                TupleColumn::Null | TupleColumn::UnchangedToast => 0,
            })
            .sum()
    }
}

/// The old row carried by an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity columns (others are Null).
    Key(TupleData),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

impl OldTuple {
    /// The tuple, whichever kind it is.
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation: RelationId,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation: RelationId,
    /// Present when the key changed (`K`) or with REPLICA IDENTITY FULL (`O`).
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation: RelationId,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relations: Vec<RelationId>,
}

/// `pg_logical_emit_message` output (needs the `messages` option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: Xid,
    /// True for the first segment of this transaction's stream.
    pub first_segment: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: Xid,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_ts: PgTimestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// Top-level transaction.
    pub xid: Xid,
    /// The aborted (sub)transaction; equal to `xid` when the whole transaction aborted.
    pub subxid: Xid,
}

/// A decoded pgoutput message. `xid` on change messages is `Some` only inside a streamed block
/// (protocol ≥ 2), where it names the (sub)transaction the change belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation {
        xid: Option<Xid>,
        relation: Relation,
    },
    Type {
        xid: Option<Xid>,
        ty: TypeMessage,
    },
    Insert {
        xid: Option<Xid>,
        insert: Insert,
    },
    Update {
        xid: Option<Xid>,
        update: Update,
    },
    Delete {
        xid: Option<Xid>,
        delete: Delete,
    },
    Truncate {
        xid: Option<Xid>,
        truncate: Truncate,
    },
    Message {
        xid: Option<Xid>,
        message: LogicalMessage,
    },
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
}
