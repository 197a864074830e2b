//! `slotlake tail`: decoded changes as JSON lines — pg_recvlogical, but decoded and typed.
//!
//! Data flow: replication stream → pgoutput decoder → transaction assembler → typed values →
//! one JSON object per change on stdout. By default nothing is confirmed (the slot does not move:
//! tail is a read-only debugging tool); with `--confirm`, a transaction's end LSN is confirmed
//! once its lines are flushed to stdout, and on an idle stream the server's WAL end is confirmed
//! so the slot does not pin WAL.
//!
//! Line format (one per change, in commit order):
//! `{"lsn":"0/16B3748","seq":0,"xid":737,"commit_ts":"2026-01-02T03:04:05.123456Z","schema":"public",
//!   "table":"t","op":"U","new":{"id":1,"v":"x"},"unchanged":["big"],"old_key":{"id":0}}`
//! `op` is I, U, D or T; `old_key` (key columns, when an update changed the key or for a delete)
//! or `old` (the whole old row, REPLICA IDENTITY FULL) appear when the server sent them.
//! Value encodings are those of [`crate::types::json`].

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value as Json};

use crate::lsn::Lsn;
use crate::pgoutput::relation::CachedRelation;
use crate::pgoutput::{DecodeError, Decoder, OldTuple, TupleData};
use crate::replication::slot::{self, SlotError};
use crate::replication::stream::{ReplicationMessage, ReplicationStream, StreamOptions};
use crate::replication::{ClientError, ConnInfo, PgConnection, SessionKind};
use crate::txn::{Assembler, Change, ChangeOp, Event, SpillConfig, TxnError, TxnInfo};

/// Bytes of streamed-transaction changes `tail` holds in memory before spilling to the
/// system temporary directory.
const TAIL_HELD_MEMORY: usize = 64 << 20;
use crate::types::catalog::TypeCatalog;
use crate::types::{calendar, decode_column, json, ColumnValue, PgType, ValueError};

/// What to tail and how.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub slot: String,
    pub publication: String,
    pub limit: Option<u64>,
    pub confirm: bool,
    pub binary: bool,
    pub messages: bool,
    pub discard: bool,
    pub start_lsn: Lsn,
    pub status_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("malformed pgoutput message at {lsn}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: DecodeError,
    },
    #[error("cannot assemble the transactions of the stream at {lsn}")]
    Txn {
        lsn: Lsn,
        #[source]
        source: TxnError,
    },
    #[error("cannot decode column {column:?} of {table} at {lsn}")]
    Value {
        table: String,
        column: String,
        lsn: Lsn,
        #[source]
        source: ValueError,
    },
    #[error("the server sent a tuple with {got} columns for {table}, whose Relation message has {expected}")]
    ColumnCount {
        table: String,
        expected: usize,
        got: usize,
    },
    #[error("cannot write output")]
    Output(#[source] std::io::Error),
}

/// What a tail run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TailSummary {
    pub changes: u64,
    pub transactions: u64,
    /// Highest LSN confirmed to the server (0/0 unless `--confirm`).
    pub confirmed: Lsn,
}

/// Column types of one relation version.
struct TableTypes {
    schema: String,
    table: String,
    types: Vec<PgType>,
}

/// Streams `opts.slot` and writes one JSON line per change to `out` until the limit, the end of
/// the stream, or `shutdown` resolves.
pub async fn run<W: Write>(
    source: &ConnInfo,
    opts: &TailOptions,
    out: &mut W,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<TailSummary, TailError> {
    let mut repl = PgConnection::connect(source, SessionKind::Replication).await?;
    slot::validate_slot_name(&opts.slot)?;
    if slot::slot_info(&mut repl, &opts.slot).await?.is_none() {
        return Err(SlotError::SlotMissing(opts.slot.clone()).into());
    }
    slot::require_publication(&mut repl, &opts.publication).await?;

    let mut options = StreamOptions::new(vec![opts.publication.clone()]);
    options.binary = opts.binary;
    options.messages = opts.messages;
    let mut stream = ReplicationStream::start(repl, &opts.slot, opts.start_lsn, options).await?;
    let mut decoder = Decoder::new(stream.proto_version());
    let mut assembler = Assembler::with_spill(SpillConfig {
        dir: std::env::temp_dir(),
        memory_limit: TAIL_HELD_MEMORY,
    });
    let mut catalog = TypeCatalog::new();
    let mut catalog_conn: Option<PgConnection> = None;
    let mut tables: HashMap<(u32, u32), Arc<TableTypes>> = HashMap::new();
    let mut events = Vec::new();
    let mut summary = TailSummary::default();
    let mut received = Lsn::INVALID;
    // --limit reached; and whether the current transaction had changes left unprinted.
    let mut limit_reached = false;
    let mut txn_cut = false;
    let mut ticker = tokio::time::interval(opts.status_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

    let result: Result<(), TailError> = async {
        loop {
            if limit_reached && assembler.is_idle() {
                return Ok(());
            }
            let msg = tokio::select! {
                m = stream.next_message() => m?,
                _ = ticker.tick() => {
                    stream.send_status(received, summary.confirmed, summary.confirmed, false).await?;
                    continue;
                }
                _ = &mut shutdown => return Ok(()),
            };
            let Some(msg) = msg else { return Ok(()) };
            match msg {
                ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                    received = received.max(wal_end);
                    if opts.confirm && assembler.is_idle() && wal_end > summary.confirmed {
                        // Everything the server decoded before wal_end has been printed.
                        summary.confirmed = wal_end;
                        stream.send_status(received, summary.confirmed, summary.confirmed, false).await?;
                    } else if reply_requested {
                        stream.send_status(received, summary.confirmed, summary.confirmed, false).await?;
                    }
                }
                ReplicationMessage::XLogData { wal_start, wal_end, data } => {
                    received = received.max(wal_end).max(wal_start);
                    let message = decoder.decode(&data).map_err(|source| TailError::Decode { lsn: wal_start, source })?;
                    assembler
                        .handle(message, &mut events)
                        .map_err(|source| TailError::Txn { lsn: wal_start, source })?;
                    loop {
                        for event in events.drain(..) {
                            match event {
                                Event::Relation { relation, .. } => {
                                    let key = (relation.relation.id, relation.version);
                                    if let std::collections::hash_map::Entry::Vacant(slot) = tables.entry(key) {
                                        let t = resolve_types(&relation, &mut catalog, &mut catalog_conn, source).await?;
                                        slot.insert(Arc::new(t));
                                    }
                                }
                                Event::Change { txn, position, change } => {
                                    let key = (change.relation.relation.id, change.relation.version);
                                    let types = match tables.get(&key) {
                                        Some(t) => t.clone(),
                                        None => {
                                            let t = Arc::new(
                                                resolve_types(&change.relation, &mut catalog, &mut catalog_conn, source).await?,
                                            );
                                            tables.insert(key, t.clone());
                                            t
                                        }
                                    };
                                    if limit_reached {
                                        // Past the limit: read on to the commit, print nothing more.
                                        txn_cut = true;
                                        continue;
                                    }
                                    if opts.discard {
                                        // Decode every value as the lake would, build no JSON.
                                        decode_only(&txn, &change, &types)?;
                                    } else {
                                        let line = change_json(&txn, position.seq, &change, &types)?;
                                        serde_json::to_writer(&mut *out, &line).map_err(|e| TailError::Output(e.into()))?;
                                        out.write_all(b"\n").map_err(TailError::Output)?;
                                    }
                                    summary.changes += 1;
                                    limit_reached = opts.limit.is_some_and(|l| summary.changes >= l);
                                }
                                Event::Message { txn, message } => {
                                    if opts.messages && !opts.discard {
                                        let line = serde_json::json!({
                                            "lsn": txn.map(|t| t.commit_lsn).unwrap_or(message.lsn).to_string(),
                                            "op": "M",
                                            "transactional": message.transactional,
                                            "prefix": message.prefix,
                                            "content": String::from_utf8_lossy(&message.content),
                                        });
                                        serde_json::to_writer(&mut *out, &line).map_err(|e| TailError::Output(e.into()))?;
                                        out.write_all(b"\n").map_err(TailError::Output)?;
                                    }
                                }
                                Event::Begin(_) => txn_cut = false,
                                Event::Commit { end_lsn, .. } => {
                                    summary.transactions += 1;
                                    out.flush().map_err(TailError::Output)?;
                                    // A transaction cut short by --limit is not confirmed: the
                                    // next reader gets it whole.
                                    if opts.confirm && !txn_cut {
                                        summary.confirmed = summary.confirmed.max(end_lsn);
                                    }
                                    if limit_reached {
                                        return Ok(());
                                    }
                                }
                            }
                        }
                        if !assembler.replaying() {
                            break;
                        }
                        assembler
                            .drain_replay(&mut events, 4096, 64 << 20)
                            .map_err(|source| TailError::Txn { lsn: wal_start, source })?;
                    }
                }
            }
        }
    }
    .await;
    out.flush().map_err(TailError::Output)?;
    result?;
    // Final status: what was printed completely is confirmed (only with --confirm).
    stream
        .send_status(received, summary.confirmed, summary.confirmed, false)
        .await?;
    let conn = stream.stop().await?;
    conn.close().await;
    if let Some(c) = catalog_conn {
        c.close().await;
    }
    Ok(summary)
}

async fn resolve_types(
    relation: &CachedRelation,
    catalog: &mut TypeCatalog,
    conn: &mut Option<PgConnection>,
    source: &ConnInfo,
) -> Result<TableTypes, TailError> {
    let rel = &relation.relation;
    let types = catalog.resolve_relation(rel, conn, source).await?;
    Ok(TableTypes {
        schema: rel.namespace.clone(),
        table: rel.name.clone(),
        types,
    })
}

fn change_json(
    txn: &TxnInfo,
    seq: u64,
    change: &Change,
    types: &TableTypes,
) -> Result<Json, TailError> {
    let mut line = Map::new();
    line.insert("lsn".into(), Json::String(txn.commit_lsn.to_string()));
    line.insert("seq".into(), Json::from(seq));
    line.insert("xid".into(), Json::from(txn.xid));
    line.insert(
        "commit_ts".into(),
        Json::String(calendar::format_timestamp(
            crate::types::Infinite::Finite(txn.commit_ts.unix_micros()),
            true,
        )),
    );
    line.insert("schema".into(), Json::String(types.schema.clone()));
    line.insert("table".into(), Json::String(types.table.clone()));
    line.insert("op".into(), Json::String(change.op.code().into()));
    let rel = &change.relation.relation;
    if let Some(new) = &change.new {
        let (obj, unchanged) = tuple_json(new, txn, types, rel, false)?;
        line.insert("new".into(), Json::Object(obj));
        if !unchanged.is_empty() {
            line.insert(
                "unchanged".into(),
                Json::Array(unchanged.into_iter().map(Json::String).collect()),
            );
        }
    }
    match &change.old {
        Some(OldTuple::Key(t)) => {
            line.insert(
                "old_key".into(),
                Json::Object(tuple_json(t, txn, types, rel, true)?.0),
            );
        }
        Some(OldTuple::Full(t)) => {
            line.insert(
                "old".into(),
                Json::Object(tuple_json(t, txn, types, rel, false)?.0),
            );
        }
        None => {}
    }
    debug_assert!(change.op != ChangeOp::Truncate || change.new.is_none());
    Ok(Json::Object(line))
}

fn tuple_json(
    tuple: &TupleData,
    txn: &TxnInfo,
    types: &TableTypes,
    rel: &crate::pgoutput::Relation,
    key_only: bool,
) -> Result<(Map<String, Json>, Vec<String>), TailError> {
    if tuple.columns.len() != rel.columns.len() || types.types.len() != rel.columns.len() {
        return Err(TailError::ColumnCount {
            table: format!("{}.{}", rel.namespace, rel.name),
            expected: rel.columns.len(),
            got: tuple.columns.len(),
        });
    }
    let mut obj = Map::new();
    let mut unchanged = Vec::new();
    for ((col, ty), def) in tuple.columns.iter().zip(&types.types).zip(&rel.columns) {
        if key_only && !def.is_key {
            continue;
        }
        match decode_column(ty, col) {
            Ok(ColumnValue::Value(v)) => {
                obj.insert(def.name.clone(), json::to_json(&v));
            }
            Ok(ColumnValue::UnchangedToast) => unchanged.push(def.name.clone()),
            Err(source) => {
                return Err(TailError::Value {
                    table: format!("{}.{}", rel.namespace, rel.name),
                    column: def.name.clone(),
                    lsn: txn.commit_lsn,
                    source,
                })
            }
        }
    }
    Ok((obj, unchanged))
}

/// Decodes every column of a change into its typed value and drops it (`--discard`).
fn decode_only(txn: &TxnInfo, change: &Change, types: &TableTypes) -> Result<(), TailError> {
    let rel = &change.relation.relation;
    let tuples = change
        .new
        .iter()
        .chain(change.old.iter().map(OldTuple::tuple));
    for tuple in tuples {
        if tuple.columns.len() != types.types.len() {
            return Err(TailError::ColumnCount {
                table: format!("{}.{}", rel.namespace, rel.name),
                expected: types.types.len(),
                got: tuple.columns.len(),
            });
        }
        for ((col, ty), def) in tuple.columns.iter().zip(&types.types).zip(&rel.columns) {
            if let Err(source) = decode_column(ty, col) {
                return Err(TailError::Value {
                    table: format!("{}.{}", rel.namespace, rel.name),
                    column: def.name.clone(),
                    lsn: txn.commit_lsn,
                    source,
                });
            }
        }
    }
    Ok(())
}
