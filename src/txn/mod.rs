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
//! nothing is guessed. Held streamed changes live in memory here; bounded spilling belongs to
//! the sink that consumes them.

use std::collections::HashMap;
use std::sync::Arc;

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

/// A protocol violation: the stream does not follow the pgoutput transaction grammar.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TxnError {
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

/// The transaction assembler. Feed every decoded message to [`Assembler::handle`].
#[derive(Debug, Default)]
pub struct Assembler {
    relations: RelationCache,
    open: Option<OpenTxn>,
    /// Xid of the stream block we are in, if any.
    stream_block: Option<Xid>,
    streams: HashMap<Xid, Vec<Held>>,
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn relations(&self) -> &RelationCache {
        &self.relations
    }

    /// True between Begin and Commit of an ordinary transaction (streamed ones are held here
    /// and emitted whole, so they never leave a transaction half-emitted).
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// True when no transaction is open and no streamed transaction is pending: everything
    /// received so far has been emitted as complete transactions.
    pub fn is_idle(&self) -> bool {
        self.open.is_none() && self.stream_block.is_none() && self.streams.is_empty()
    }

    /// Number of changes held for streamed transactions.
    pub fn held_changes(&self) -> usize {
        self.streams.values().map(Vec::len).sum()
    }

    /// Processes one message, appending resulting events to `out` in order.
    pub fn handle(&mut self, msg: PgOutputMessage, out: &mut Vec<Event>) -> Result<(), TxnError> {
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
                    self.streams
                        .entry(block)
                        .or_default()
                        .push(Held::Message { subxid, message });
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
                let held = self
                    .streams
                    .remove(&c.xid)
                    .ok_or(TxnError::UnknownStream(c.xid))?;
                let info = TxnInfo {
                    xid: c.xid,
                    commit_lsn: c.commit_lsn,
                    commit_ts: c.commit_ts,
                    streamed: true,
                };
                out.push(Event::Begin(info));
                let mut seq = 0;
                for h in held {
                    match h {
                        Held::Change { change, .. } => {
                            out.push(Event::Change {
                                txn: info,
                                position: Position {
                                    commit_lsn: info.commit_lsn,
                                    seq,
                                },
                                change,
                            });
                            seq += 1;
                        }
                        Held::Message { message, .. } => out.push(Event::Message {
                            txn: Some(info),
                            message,
                        }),
                    }
                }
                out.push(Event::Commit {
                    txn: info,
                    end_lsn: c.end_lsn,
                    changes: seq,
                });
            }
            PgOutputMessage::StreamAbort(a) => {
                if self.stream_block.is_some() {
                    return Err(TxnError::StreamEndInsideBlock);
                }
                if a.xid == a.subxid {
                    self.streams.remove(&a.xid);
                } else if let Some(held) = self.streams.get_mut(&a.xid) {
                    held.retain(|h| match h {
                        Held::Change { subxid, .. } | Held::Message { subxid, .. } => {
                            *subxid != a.subxid
                        }
                    });
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
            self.streams
                .entry(block)
                .or_default()
                .push(Held::Change { subxid, change });
            return Ok(());
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
        a.handle(rel(1), &mut out).unwrap();
        a.handle(
            PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(100),
                commit_ts: PgTimestamp(0),
                xid: 7,
            }),
            &mut out,
        )
        .unwrap();
        assert!(!a.is_idle());
        a.handle(ins(None, 1, "a"), &mut out).unwrap();
        a.handle(ins(None, 1, "b"), &mut out).unwrap();
        a.handle(
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
        a.handle(rel(1), &mut out).unwrap();
        a.handle(
            PgOutputMessage::StreamStart(StreamStart {
                xid: 10,
                first_segment: true,
            }),
            &mut out,
        )
        .unwrap();
        a.handle(ins(Some(10), 1, "top1"), &mut out).unwrap();
        a.handle(ins(Some(11), 1, "sub-aborted"), &mut out).unwrap();
        a.handle(PgOutputMessage::StreamStop, &mut out).unwrap();
        // An unrelated ordinary transaction commits in between.
        a.handle(
            PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(50),
                commit_ts: PgTimestamp(0),
                xid: 20,
            }),
            &mut out,
        )
        .unwrap();
        a.handle(ins(None, 1, "other"), &mut out).unwrap();
        a.handle(
            PgOutputMessage::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(50),
                end_lsn: Lsn(60),
                commit_ts: PgTimestamp(0),
            }),
            &mut out,
        )
        .unwrap();
        a.handle(
            PgOutputMessage::StreamStart(StreamStart {
                xid: 10,
                first_segment: false,
            }),
            &mut out,
        )
        .unwrap();
        a.handle(ins(Some(12), 1, "sub-kept"), &mut out).unwrap();
        a.handle(PgOutputMessage::StreamStop, &mut out).unwrap();
        a.handle(
            PgOutputMessage::StreamAbort(StreamAbort {
                xid: 10,
                subxid: 11,
            }),
            &mut out,
        )
        .unwrap();
        assert_eq!(a.held_changes(), 2);
        assert!(!a.is_idle());
        a.handle(
            PgOutputMessage::StreamCommit(StreamCommit {
                xid: 10,
                flags: 0,
                commit_lsn: Lsn(200),
                end_lsn: Lsn(210),
                commit_ts: PgTimestamp(0),
            }),
            &mut out,
        )
        .unwrap();
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
        a.handle(rel(1), &mut out).unwrap();
        a.handle(
            PgOutputMessage::StreamStart(StreamStart {
                xid: 10,
                first_segment: true,
            }),
            &mut out,
        )
        .unwrap();
        a.handle(ins(Some(10), 1, "x"), &mut out).unwrap();
        a.handle(PgOutputMessage::StreamStop, &mut out).unwrap();
        a.handle(
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
            a.handle(
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
            a.handle(ins(None, 1, "x"), &mut out),
            Err(TxnError::UnknownRelation(1))
        );
        a.handle(rel(1), &mut out).unwrap();
        assert_eq!(
            a.handle(ins(None, 1, "x"), &mut out),
            Err(TxnError::OutsideTransaction { what: "change" })
        );
        a.handle(
            PgOutputMessage::Begin(Begin {
                final_lsn: Lsn(5),
                commit_ts: PgTimestamp(0),
                xid: 1,
            }),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            a.handle(
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
            a.handle(
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
            b.handle(
                PgOutputMessage::StreamCommit(StreamCommit {
                    xid: 3,
                    flags: 0,
                    commit_lsn: Lsn(1),
                    end_lsn: Lsn(2),
                    commit_ts: PgTimestamp(0)
                }),
                &mut out
            ),
            Err(TxnError::UnknownStream(3))
        );
    }
}
