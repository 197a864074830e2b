//! Transaction assembly: pgoutput messages in, whole committed transactions out.
//!
//! Data flow: the decoder yields protocol messages; the assembler turns them into domain events
//! ([`Event`]) in commit order, each change stamped with its identity — commit LSN and position
//! in the transaction (`seq`) — because the change's own LSN is not unique (several changes and
//! a BEGIN can share one). Ordinary transactions arrive whole between Begin and Commit, so their
//! changes pass straight through. Streamed (proto 2) transactions arrive in chunks interleaved
//! with other transactions, before their commit LSN is known; their changes are held per
//! top-level xid until Stream Commit, and Stream Abort of a subtransaction discards exactly the
//! changes of that subtransaction.
//!
//! The state machine is explicit and every protocol violation is a typed [`TxnError`]:
//! nothing is guessed. Held streamed changes stay in memory up to a limit and go to local spill
//! files beyond it ([`spill`]); a committed streamed transaction is handed out in slices
//! ([`Assembler::drain_replay`]) so that it never has to be in memory whole.

mod spill;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use spill::{held_size, subxid_of, SpillReader, SpillWriter};

use crate::lsn::Lsn;
use crate::pgoutput::relation::{CachedRelation, RelationCache, SchemaChange};
use crate::pgoutput::{
    Delete, Insert, LogicalMessage, OldTuple, PgOutputMessage, PgTimestamp, RelationId, TupleData,
    Update, Xid,
};

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeOp {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl ChangeOp {
    /// The `_op` code in change logs.
    pub fn code(self) -> &'static str {
        match self {
            ChangeOp::Insert => "I",
            ChangeOp::Update => "U",
            ChangeOp::Delete => "D",
            ChangeOp::Truncate => "T",
        }
    }
}

/// One row change (or a truncate of one table), with the relation definition it was made under.
#[derive(Debug, Clone)]
pub struct Change {
    pub relation: Arc<CachedRelation>,
    pub op: ChangeOp,
    /// New row (insert, update).
    pub new: Option<TupleData>,
    /// Old key or old row (update with key change or REPLICA IDENTITY FULL, delete).
    pub old: Option<OldTuple>,
}

impl Change {
    /// Bytes of the values it carries (new row and old key or row), as sent.
    pub fn value_bytes(&self) -> usize {
        self.new.as_ref().map_or(0, TupleData::value_bytes)
            + self.old.as_ref().map_or(0, |o| o.tuple().value_bytes())
    }
}

/// Commit-order position of a change: the identity that survives replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub seq: u64,
}

/// Metadata of a transaction, known at Begin (or Stream Commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnInfo {
    pub xid: Xid,
    pub commit_lsn: Lsn,
    pub commit_ts: PgTimestamp,
    /// Whether it arrived in streamed chunks.
    pub streamed: bool,
}

/// Output of the assembler.
#[derive(Debug, Clone)]
pub enum Event {
    /// A relation definition arrived (new, re-sent, or changed).
    Relation {
        relation: Arc<CachedRelation>,
        change: SchemaChangeKind,
    },
    Begin(TxnInfo),
    Change {
        txn: TxnInfo,
        position: Position,
        change: Change,
    },
    /// A transactional `pg_logical_emit_message` inside a transaction.
    Message {
        txn: Option<TxnInfo>,
        message: LogicalMessage,
    },
    /// The transaction is complete; `end_lsn` is what to confirm once it is durable.
    Commit {
        txn: TxnInfo,
        end_lsn: Lsn,
        changes: u64,
    },
}

/// How a Relation message relates to what was known before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaChangeKind {
    New,
    Unchanged,
    Changed { previous_version: u32 },
}

/// A protocol violation: the stream does not follow the pgoutput transaction grammar; or a
/// spill file that cannot be written or read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TxnError {
    #[error("cannot {action} the spill file of a streamed transaction: {message}")]
    Spill {
        action: &'static str,
        message: String,
    },
    #[error("spill file of a streamed transaction is corrupt: {0}")]
    SpillCorrupt(&'static str),
    #[error("message received while a committed streamed transaction is still being handed out")]
    ReplayPending,
    #[error("BEGIN of xid {new} while xid {open} is still open")]
    NestedBegin { open: Xid, new: Xid },
    #[error("COMMIT without a transaction")]
    CommitWithoutBegin,
    #[error("COMMIT at {commit} does not match the transaction's final LSN {expected}")]
    CommitLsnMismatch { expected: Lsn, commit: Lsn },
    #[error("{what} outside a transaction")]
    OutsideTransaction { what: &'static str },
    #[error("change for relation {0} before its Relation message")]
    UnknownRelation(RelationId),
    #[error("streamed change without a transaction id")]
    StreamedChangeWithoutXid,
    #[error("stream start for xid {0} inside an open transaction")]
    StreamInsideTransaction(Xid),
    #[error("stream commit for xid {0}, which has no streamed changes")]
    UnknownStream(Xid),
    #[error("stream commit/abort inside a stream block")]
    StreamEndInsideBlock,
}

/// A change of a streamed transaction waiting for its commit.
#[derive(Debug)]
enum Held {
    Change {
        subxid: Xid,
        change: Change,
    },
    Message {
        subxid: Xid,
        message: LogicalMessage,
    },
}

#[derive(Debug, Clone, Copy)]
struct OpenTxn {
    info: TxnInfo,
    next_seq: u64,
}

/// Where and beyond how many bytes held streamed changes go to disk.
#[derive(Debug, Clone)]
pub struct SpillConfig {
    pub dir: PathBuf,
    /// Bytes of held streamed changes kept in memory, over all open streamed transactions.
    pub memory_limit: usize,
}

/// An open streamed transaction: its changes in memory (the newest) and on disk (the oldest).
#[derive(Default)]
struct Stream {
    held: Vec<Held>,
    held_bytes: usize,
    spill: Option<SpillWriter>,
    /// Subtransactions aborted after some of their changes were spilled.
    aborted: HashSet<Xid>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("held", &self.held.len())
            .field("spilled", &self.spill.as_ref().map(|s| s.records))
            .finish()
    }
}

/// A committed streamed transaction being handed out.
struct Replay {
    info: TxnInfo,
    end_lsn: Lsn,
    spilled: Option<SpillReader>,
    held: std::vec::IntoIter<Held>,
    aborted: HashSet<Xid>,
    seq: u64,
}

/// The transaction assembler. Feed every decoded message to [`Assembler::handle`].
#[derive(Default)]
pub struct Assembler {
    relations: RelationCache,
    open: Option<OpenTxn>,
    /// Xid of the stream block we are in, if any.
    stream_block: Option<Xid>,
    streams: HashMap<Xid, Stream, foldhash::fast::RandomState>,
    spill: Option<SpillConfig>,
    /// Bytes held in memory over all streams.
    held_bytes: usize,
    replay: Option<Replay>,
    spilled_bytes: u64,
}

impl std::fmt::Debug for Assembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembler")
            .field("open", &self.open)
            .field("stream_block", &self.stream_block)
            .field("streams", &self.streams)
            .field("held_bytes", &self.held_bytes)
            .field("replaying", &self.replay.is_some())
            .finish()
    }
}

impl Assembler {
    /// An assembler that holds streamed transactions in memory, however large.
    pub fn new() -> Self {
        Self::default()
    }

    /// An assembler that spills held streamed changes beyond `config.memory_limit` to files in
    /// `config.dir`.
    pub fn with_spill(config: SpillConfig) -> Self {
        Assembler {
            spill: Some(config),
            ..Self::default()
        }
    }

    /// Bytes of streamed changes written to spill files so far.
    pub fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes
    }

    pub fn relations(&self) -> &RelationCache {
        &self.relations
    }

    /// True between Begin and Commit of an ordinary transaction (streamed ones are held here
    /// and emitted whole, so they never leave a transaction half-emitted).
    pub fn in_transaction(&self) -> bool {
        self.open.is_some() || self.replay.is_some()
    }

    /// True while a committed streamed transaction is being handed out: call
    /// [`Assembler::drain_replay`] until it returns `false` before handling the next message.
    pub fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// True when no transaction is open and no streamed transaction is pending: everything
    /// received so far has been emitted as complete transactions.
    pub fn is_idle(&self) -> bool {
        self.open.is_none()
            && self.stream_block.is_none()
            && self.streams.is_empty()
            && self.replay.is_none()
    }

    /// Number of changes and messages held for streamed transactions, in memory or spilled.
    pub fn held_changes(&self) -> usize {
        self.streams
            .values()
            .map(|s| s.held.len() + s.spill.as_ref().map_or(0, |w| w.records as usize))
            .sum()
    }

    /// Processes one message and everything it completes, however large (for tests and small
    /// streams; the pipeline uses [`Assembler::handle`] and [`Assembler::drain_replay`]).
    pub fn handle_all(
        &mut self,
        msg: PgOutputMessage,
        out: &mut Vec<Event>,
    ) -> Result<(), TxnError> {
        self.handle(msg, out)?;
        while self.drain_replay(out, usize::MAX, usize::MAX)? {}
        Ok(())
    }

    /// Hands out up to `max` events of the committed streamed transaction being replayed, in
    /// order, ending with its Commit, and no more once their values reach `max_bytes`.
    /// Returns whether more remain.
    pub fn drain_replay(
        &mut self,
        out: &mut Vec<Event>,
        max: usize,
        max_bytes: usize,
    ) -> Result<bool, TxnError> {
        let Some(replay) = self.replay.as_mut() else {
            return Ok(false);
        };
        let (mut emitted, mut bytes) = (0, 0);
        // At least one event per call, whatever the limits: a replay always moves on.
        while emitted == 0 || (emitted < max && bytes < max_bytes) {
            let next = match replay.spilled.as_mut() {
                Some(reader) => match reader.next()? {
                    Some(h) => Some(h),
                    None => {
                        replay.spilled = None;
                        continue;
                    }
                },
                None => replay.held.next(),
            };
            let Some(held) = next else {
                out.push(Event::Commit {
                    txn: replay.info,
                    end_lsn: replay.end_lsn,
                    changes: replay.seq,
                });
                self.replay = None;
                return Ok(false);
            };
            if replay.aborted.contains(&subxid_of(&held)) {
                continue;
            }
            emitted += 1;
            match held {
                Held::Change { change, .. } => {
                    bytes += change.value_bytes();
                    out.push(Event::Change {
                        txn: replay.info,
                        position: Position {
                            commit_lsn: replay.info.commit_lsn,
                            seq: replay.seq,
                        },
                        change,
                    });
                    replay.seq += 1;
                }
                Held::Message { message, .. } => {
                    bytes += message.content.len();
                    out.push(Event::Message {
                        txn: Some(replay.info),
                        message,
                    })
                }
            }
        }
        Ok(true)
    }

    /// Holds a change or message of the streamed transaction `block`, spilling the largest
    /// stream to disk when memory passes the limit.
    fn hold(&mut self, block: Xid, held: Held) -> Result<(), TxnError> {
        let size = held_size(&held);
        let stream = self.streams.entry(block).or_default();
        stream.held.push(held);
        stream.held_bytes += size;
        self.held_bytes += size;
        let Some(config) = &self.spill else {
            return Ok(());
        };
        if self.held_bytes <= config.memory_limit {
            return Ok(());
        }
        let Some((_, largest)) = self.streams.iter_mut().max_by_key(|(_, s)| s.held_bytes) else {
            return Ok(());
        };
        if largest.spill.is_none() {
            largest.spill = Some(SpillWriter::create(&config.dir)?);
        }
        if let Some(writer) = largest.spill.as_mut() {
            let before = writer.bytes;
            for h in largest.held.drain(..) {
                writer.append(&h)?;
            }
            self.spilled_bytes += writer.bytes - before;
        }
        self.held_bytes -= largest.held_bytes;
        largest.held_bytes = 0;
        Ok(())
    }

    /// Processes one message, appending resulting events to `out` in order. After a Stream
    /// Commit, the transaction's changes are handed out by [`Assembler::drain_replay`].
    pub fn handle(&mut self, msg: PgOutputMessage, out: &mut Vec<Event>) -> Result<(), TxnError> {
        if self.replay.is_some() {
            return Err(TxnError::ReplayPending);
        }
        match msg {
            PgOutputMessage::Begin(b) => {
                if let Some(open) = self.open {
                    return Err(TxnError::NestedBegin {
                        open: open.info.xid,
                        new: b.xid,
                    });
                }
                if self.stream_block.is_some() {
                    return Err(TxnError::NestedBegin {
                        open: self.stream_block.unwrap_or(0),
                        new: b.xid,
                    });
                }
                let info = TxnInfo {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    commit_ts: b.commit_ts,
                    streamed: false,
                };
                self.open = Some(OpenTxn { info, next_seq: 0 });
                out.push(Event::Begin(info));
            }
            PgOutputMessage::Commit(c) => {
                let open = self.open.take().ok_or(TxnError::CommitWithoutBegin)?;
                if c.commit_lsn != open.info.commit_lsn {
                    return Err(TxnError::CommitLsnMismatch {
                        expected: open.info.commit_lsn,
                        commit: c.commit_lsn,
                    });
                }
                out.push(Event::Commit {
                    txn: open.info,
                    end_lsn: c.end_lsn,
                    changes: open.next_seq,
                });
            }
            PgOutputMessage::Origin(_) | PgOutputMessage::Type { .. } => {}
            PgOutputMessage::Relation { relation, .. } => {
                let change = match self.relations.apply(relation.clone()) {
                    SchemaChange::New => SchemaChangeKind::New,
                    SchemaChange::Unchanged => SchemaChangeKind::Unchanged,
                    SchemaChange::Changed { previous, .. } => SchemaChangeKind::Changed {
                        previous_version: previous.version,
                    },
                };
                let cached = self.relation(relation.id)?;
                out.push(Event::Relation {
                    relation: cached,
                    change,
                });
            }
            PgOutputMessage::Insert {
                xid,
                insert: Insert { relation, new },
            } => {
                let change = Change {
                    relation: self.relation(relation)?,
                    op: ChangeOp::Insert,
                    new: Some(new),
                    old: None,
                };
                self.change(xid, change, out)?;
            }
            PgOutputMessage::Update {
                xid,
                update: Update { relation, old, new },
            } => {
                let change = Change {
                    relation: self.relation(relation)?,
                    op: ChangeOp::Update,
                    new: Some(new),
                    old,
                };
                self.change(xid, change, out)?;
            }
            PgOutputMessage::Delete {
                xid,
                delete: Delete { relation, old },
            } => {
                let change = Change {
                    relation: self.relation(relation)?,
                    op: ChangeOp::Delete,
                    new: None,
                    old: Some(old),
                };
                self.change(xid, change, out)?;
            }
            PgOutputMessage::Truncate { xid, truncate } => {
                for id in truncate.relations {
                    let change = Change {
                        relation: self.relation(id)?,
                        op: ChangeOp::Truncate,
                        new: None,
                        old: None,
                    };
                    self.change(xid, change, out)?;
                }
            }
            PgOutputMessage::Message { xid, message } => {
                if !message.transactional {
                    out.push(Event::Message { txn: None, message });
                } else if let Some(block) = self.stream_block {
                    let subxid = xid.ok_or(TxnError::StreamedChangeWithoutXid)?;
                    self.hold(block, Held::Message { subxid, message })?;
                } else {
                    let open = self.open.ok_or(TxnError::OutsideTransaction {
                        what: "transactional message",
                    })?;
                    out.push(Event::Message {
                        txn: Some(open.info),
                        message,
                    });
                }
            }
            PgOutputMessage::StreamStart(s) => {
                if self.open.is_some() {
                    return Err(TxnError::StreamInsideTransaction(s.xid));
                }
                self.stream_block = Some(s.xid);
                self.streams.entry(s.xid).or_default();
            }
            PgOutputMessage::StreamStop => self.stream_block = None,
            PgOutputMessage::StreamCommit(c) => {
                if self.stream_block.is_some() {
                    return Err(TxnError::StreamEndInsideBlock);
                }
                let stream = self
                    .streams
                    .remove(&c.xid)
                    .ok_or(TxnError::UnknownStream(c.xid))?;
                self.held_bytes -= stream.held_bytes;
                let info = TxnInfo {
                    xid: c.xid,
                    commit_lsn: c.commit_lsn,
                    commit_ts: c.commit_ts,
                    streamed: true,
                };
                out.push(Event::Begin(info));
                let spilled = match stream.spill {
                    Some(w) => Some(w.into_reader()?),
                    None => None,
                };
                self.replay = Some(Replay {
                    info,
                    end_lsn: c.end_lsn,
                    spilled,
                    held: stream.held.into_iter(),
                    aborted: stream.aborted,
                    seq: 0,
                });
            }
            PgOutputMessage::StreamAbort(a) => {
                if self.stream_block.is_some() {
                    return Err(TxnError::StreamEndInsideBlock);
                }
                if a.xid == a.subxid {
                    if let Some(stream) = self.streams.remove(&a.xid) {
                        self.held_bytes -= stream.held_bytes;
                    }
                } else if let Some(stream) = self.streams.get_mut(&a.xid) {
                    let mut dropped = 0;
                    stream.held.retain(|h| {
                        let keep = subxid_of(h) != a.subxid;
                        if !keep {
                            dropped += held_size(h);
                        }
                        keep
                    });
                    stream.held_bytes -= dropped;
                    self.held_bytes -= dropped;
                    if stream.spill.is_some() {
                        stream.aborted.insert(a.subxid);
                    }
                }
            }
        }
        Ok(())
    }

    fn relation(&self, id: RelationId) -> Result<Arc<CachedRelation>, TxnError> {
        self.relations
            .get(id)
            .cloned()
            .ok_or(TxnError::UnknownRelation(id))
    }

    fn change(
        &mut self,
        xid: Option<Xid>,
        change: Change,
        out: &mut Vec<Event>,
    ) -> Result<(), TxnError> {
        if let Some(block) = self.stream_block {
            let subxid = xid.ok_or(TxnError::StreamedChangeWithoutXid)?;
            return self.hold(block, Held::Change { subxid, change });
        }
        let open = self
            .open
            .as_mut()
            .ok_or(TxnError::OutsideTransaction { what: "change" })?;
        let position = Position {
            commit_lsn: open.info.commit_lsn,
            seq: open.next_seq,
        };
        open.next_seq += 1;
        out.push(Event::Change {
            txn: open.info,
            position,
            change,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::*;
    use bytes::Bytes;

    fn rel(id: u32) -> PgOutputMessage {
        PgOutputMessage::Relation {
            xid: None,
            relation: Relation {
                id,
                namespace: "public".into(),
                name: format!("t{id}"),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![RelationColumn {
                    is_key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                }],
            },
        }
    }
    fn ins(xid: Option<u32>, id: u32, v: &'static str) -> PgOutputMessage {
        PgOutputMessage::Insert {
            xid,
            insert: Insert {
                relation: id,
                new: TupleData {
                    columns: vec![TupleColumn::Text(Bytes::from_static(v.as_bytes()))],
                },
            },
        }
    }
    fn values(events: &[Event]) -> Vec<(u64, u64, String)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Change {
                    position, change, ..
                } => match &change.new.as_ref()?.columns[0] {
                    TupleColumn::Text(b) => Some((
                        position.commit_lsn.0,
                        position.seq,
                        String::from_utf8(b.to_vec()).ok()?,
                    )),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    #[test]
    fn plain_transaction_is_sequenced() {
        let mut a = Assembler::new();
        let mut out = Vec::new();
        a.handle_all(rel(1), &mut out).unwrap();
        a.handle_all(
            PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(100),
                commit_ts: PgTimestamp(0),
                xid: 7,
            }),
            &mut out,
        )
        .unwrap();
        assert!(!a.is_idle());
        a.handle_all(ins(None, 1, "a"), &mut out).unwrap();
        a.handle_all(ins(None, 1, "b"), &mut out).unwrap();
        a.handle_all(
            PgOutputMessage::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(100),
                end_lsn: Lsn(120),
                commit_ts: PgTimestamp(0),
            }),
            &mut out,
        )
        .unwrap();
        assert!(a.is_idle());
        assert_eq!(
            values(&out),
            vec![(100, 0, "a".into()), (100, 1, "b".into())]
        );
        assert!(matches!(
            out.last(),
            Some(Event::Commit {
                end_lsn: Lsn(120),
                changes: 2,
                ..
            })
        ));
    }

    #[test]
    fn streamed_transaction_with_aborted_subtransaction() {
        let mut a = Assembler::new();
        let mut out = Vec::new();
        a.handle_all(rel(1), &mut out).unwrap();
        a.handle_all(
            PgOutputMessage::StreamStart(StreamStart {
                xid: 10,
                first_segment: true,
            }),
            &mut out,
        )
        .unwrap();
        a.handle_all(ins(Some(10), 1, "top1"), &mut out).unwrap();
        a.handle_all(ins(Some(11), 1, "sub-aborted"), &mut out)
            .unwrap();
        a.handle_all(PgOutputMessage::StreamStop, &mut out).unwrap();
        // An unrelated ordinary transaction commits in between.
        a.handle_all(
            PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(50),
                commit_ts: PgTimestamp(0),
                xid: 20,
            }),
            &mut out,
        )
        .unwrap();
        a.handle_all(ins(None, 1, "other"), &mut out).unwrap();
        a.handle_all(
            PgOutputMessage::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(50),
                end_lsn: Lsn(60),
                commit_ts: PgTimestamp(0),
            }),
            &mut out,
        )
        .unwrap();
        a.handle_all(
            PgOutputMessage::StreamStart(StreamStart {
                xid: 10,
                first_segment: false,
            }),
            &mut out,
        )
        .unwrap();
        a.handle_all(ins(Some(12), 1, "sub-kept"), &mut out)
            .unwrap();
        a.handle_all(PgOutputMessage::StreamStop, &mut out).unwrap();
        a.handle_all(
            PgOutputMessage::StreamAbort(StreamAbort {
                xid: 10,
                subxid: 11,
            }),
            &mut out,
        )
        .unwrap();
        assert_eq!(a.held_changes(), 2);
        assert!(!a.is_idle());
        a.handle_all(stream_commit(10, 200, 210), &mut out).unwrap();
        assert!(a.is_idle());
        assert_eq!(
            values(&out),
            vec![
                (50, 0, "other".into()),
                (200, 0, "top1".into()),
                (200, 1, "sub-kept".into())
            ]
        );
    }

    #[test]
    fn whole_stream_abort_discards_everything() {
        let mut a = Assembler::new();
        let mut out = Vec::new();
        a.handle_all(rel(1), &mut out).unwrap();
        a.handle_all(
            PgOutputMessage::StreamStart(StreamStart {
                xid: 10,
                first_segment: true,
            }),
            &mut out,
        )
        .unwrap();
        a.handle_all(ins(Some(10), 1, "x"), &mut out).unwrap();
        a.handle_all(PgOutputMessage::StreamStop, &mut out).unwrap();
        a.handle_all(
            PgOutputMessage::StreamAbort(StreamAbort {
                xid: 10,
                subxid: 10,
            }),
            &mut out,
        )
        .unwrap();
        assert!(a.is_idle());
        assert!(values(&out).is_empty());
    }

    #[test]
    fn protocol_violations_are_typed() {
        let mut a = Assembler::new();
        let mut out = Vec::new();
        assert_eq!(
            a.handle_all(
                PgOutputMessage::Commit(Commit {
                    flags: 0,
                    commit_lsn: Lsn(1),
                    end_lsn: Lsn(2),
                    commit_ts: PgTimestamp(0)
                }),
                &mut out
            ),
            Err(TxnError::CommitWithoutBegin)
        );
        assert_eq!(
            a.handle_all(ins(None, 1, "x"), &mut out),
            Err(TxnError::UnknownRelation(1))
        );
        a.handle_all(rel(1), &mut out).unwrap();
        assert_eq!(
            a.handle_all(ins(None, 1, "x"), &mut out),
            Err(TxnError::OutsideTransaction { what: "change" })
        );
        a.handle_all(
            PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(5),
                commit_ts: PgTimestamp(0),
                xid: 1,
            }),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            a.handle_all(
                PgOutputMessage::Begin(Begin {
                    final_lsn: Lsn(6),
                    commit_ts: PgTimestamp(0),
                    xid: 2
                }),
                &mut out
            ),
            Err(TxnError::NestedBegin { open: 1, new: 2 })
        );
        assert_eq!(
            a.handle_all(
                PgOutputMessage::Commit(Commit {
                    flags: 0,
                    commit_lsn: Lsn(9),
                    end_lsn: Lsn(10),
                    commit_ts: PgTimestamp(0)
                }),
                &mut out
            ),
            Err(TxnError::CommitLsnMismatch {
                expected: Lsn(5),
                commit: Lsn(9)
            })
        );
        let mut b = Assembler::new();
        assert_eq!(
            b.handle_all(stream_commit(3, 1, 2), &mut out),
            Err(TxnError::UnknownStream(3))
        );
    }

    fn stream_commit(xid: u32, commit_lsn: u64, end_lsn: u64) -> PgOutputMessage {
        PgOutputMessage::StreamCommit(StreamCommit {
            xid,
            flags: 0,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(end_lsn),
            commit_ts: PgTimestamp(0),
        })
    }

    fn stream_start(xid: u32) -> PgOutputMessage {
        PgOutputMessage::StreamStart(StreamStart {
            xid,
            first_segment: false,
        })
    }

    /// A workload of two interleaved streamed transactions with subtransaction aborts before
    /// and after spilling, an ordinary transaction in between, and one whole-stream abort.
    fn streamed_workload() -> Vec<PgOutputMessage> {
        let mut m = vec![rel(1)];
        let mut n = 0u32;
        let mut value = |p: &str| -> &'static str {
            n += 1;
            Box::leak(format!("{p}{n}").into_boxed_str())
        };
        for round in 0..6u32 {
            for xid in [10u32, 30] {
                m.push(stream_start(xid));
                for k in 0..5 {
                    m.push(ins(Some(xid), 1, value("top")));
                    m.push(ins(Some(xid + 1 + round), 1, value("sub")));
                    if k == 2 {
                        m.push(PgOutputMessage::Message {
                            xid: Some(xid),
                            message: LogicalMessage {
                                transactional: true,
                                lsn: Lsn(7),
                                prefix: "p".into(),
                                content: Bytes::from_static(b"c"),
                            },
                        });
                    }
                }
                m.push(PgOutputMessage::StreamStop);
                if round % 2 == 1 {
                    m.push(PgOutputMessage::StreamAbort(StreamAbort {
                        xid,
                        subxid: xid + round,
                    }));
                }
            }
            m.push(PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(100 + u64::from(round)),
                commit_ts: PgTimestamp(0),
                xid: 50 + round,
            }));
            m.push(ins(None, 1, value("plain")));
            m.push(PgOutputMessage::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(100 + u64::from(round)),
                end_lsn: Lsn(101 + u64::from(round)),
                commit_ts: PgTimestamp(0),
            }));
        }
        m.push(PgOutputMessage::StreamAbort(StreamAbort {
            xid: 30,
            subxid: 30,
        }));
        m.push(stream_commit(10, 500, 510));
        m
    }

    fn run(mut a: Assembler, messages: &[PgOutputMessage], slice: usize) -> Vec<Event> {
        let mut out = Vec::new();
        for msg in messages {
            a.handle(msg.clone(), &mut out).unwrap();
            // Odd slices also cap the slice's value bytes (0: one change per call).
            let bytes = if slice % 2 == 1 {
                slice / 2
            } else {
                usize::MAX
            };
            while a.drain_replay(&mut out, slice, bytes).unwrap() {}
        }
        assert!(a.is_idle());
        out
    }

    fn messages_of(events: &[Event]) -> usize {
        events
            .iter()
            .filter(|e| matches!(e, Event::Message { .. }))
            .count()
    }

    #[test]
    fn spilled_streams_replay_exactly_like_held_ones() {
        let messages = streamed_workload();
        let expected = run(Assembler::new(), &messages, usize::MAX);
        let kept = values(&expected);
        // Aborted subtransactions (odd rounds) and the aborted stream 30 are gone.
        assert!(kept
            .iter()
            .any(|(lsn, _, v)| *lsn == 500 && v.starts_with("sub")));
        assert!(kept.iter().all(|(lsn, _, _)| *lsn != 0));
        assert_eq!(
            kept.iter().filter(|(lsn, _, _)| *lsn == 500).count(),
            30 + 15
        );
        assert_eq!(messages_of(&expected), 6);
        let dir = tempfile::tempdir().unwrap();
        for limit in [0, 200, 1_000, 5_000] {
            for slice in [1, 7, usize::MAX] {
                let a = Assembler::with_spill(SpillConfig {
                    dir: dir.path().to_path_buf(),
                    memory_limit: limit,
                });
                let got = run(a, &messages, slice);
                assert_eq!(values(&got), kept, "limit {limit}, slice {slice}");
                assert_eq!(messages_of(&got), 6, "limit {limit}, slice {slice}");
                assert!(matches!(
                    got.last(),
                    Some(Event::Commit {
                        end_lsn: Lsn(510),
                        changes: 45,
                        ..
                    })
                ));
            }
        }
    }

    #[test]
    fn a_replay_slice_ends_once_its_values_reach_the_byte_cap() {
        let mut a = Assembler::new();
        let mut out = Vec::new();
        a.handle(rel(1), &mut out).unwrap();
        a.handle(stream_start(10), &mut out).unwrap();
        for _ in 0..10 {
            a.handle(ins(Some(10), 1, "0123456789"), &mut out).unwrap();
        }
        a.handle(PgOutputMessage::StreamStop, &mut out).unwrap();
        a.handle(stream_commit(10, 9, 10), &mut out).unwrap();
        let changes = |out: &[Event]| {
            out.iter()
                .filter(|e| matches!(e, Event::Change { .. }))
                .count()
        };
        let before = changes(&out);
        // 10 bytes a change: a slice ends with the change that brings it to 25 bytes or more.
        assert!(a.drain_replay(&mut out, usize::MAX, 25).unwrap());
        assert_eq!(changes(&out) - before, 3);
        // A cap of nothing still hands out a change per call.
        assert!(a.drain_replay(&mut out, usize::MAX, 0).unwrap());
        assert_eq!(changes(&out) - before, 4);
        while a.drain_replay(&mut out, usize::MAX, 25).unwrap() {}
        assert_eq!(changes(&out) - before, 10);
        assert!(matches!(
            out.last(),
            Some(Event::Commit { changes: 10, .. })
        ));
        assert!(a.is_idle());
    }

    #[test]
    fn spilling_moves_held_changes_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::with_spill(SpillConfig {
            dir: dir.path().to_path_buf(),
            memory_limit: 1_000,
        });
        let mut out = Vec::new();
        a.handle(rel(1), &mut out).unwrap();
        a.handle(stream_start(10), &mut out).unwrap();
        for _ in 0..100 {
            a.handle(ins(Some(10), 1, "0123456789"), &mut out).unwrap();
        }
        assert_eq!(a.held_changes(), 100);
        assert!(a.held_bytes <= 1_000, "{} bytes in memory", a.held_bytes);
        assert!(a.spilled_bytes() > 1_000);
        a.handle(PgOutputMessage::StreamStop, &mut out).unwrap();
        // Nothing else may be handled while the committed stream is handed out.
        a.handle(stream_commit(10, 9, 10), &mut out).unwrap();
        assert!(a.in_transaction());
        assert_eq!(
            a.handle(PgOutputMessage::StreamStop, &mut out),
            Err(TxnError::ReplayPending)
        );
        assert!(a.drain_replay(&mut out, 60, usize::MAX).unwrap());
        assert!(!a.drain_replay(&mut out, 60, usize::MAX).unwrap());
        assert_eq!(values(&out).len(), 100);
        assert!(a.is_idle());
    }

    #[test]
    fn unwritable_spill_directory_is_an_error() {
        let mut a = Assembler::with_spill(SpillConfig {
            dir: "/nonexistent/slotlake-spill".into(),
            memory_limit: 0,
        });
        let mut out = Vec::new();
        a.handle(rel(1), &mut out).unwrap();
        a.handle(stream_start(10), &mut out).unwrap();
        let err = a.handle(ins(Some(10), 1, "x"), &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                TxnError::Spill {
                    action: "create",
                    ..
                }
            ),
            "{err}"
        );
    }
}
