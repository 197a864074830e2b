//! `slotlake run`: the slot streamed into exactly-once change logs.
//!
//! Data flow: replication stream → pgoutput decoder → transaction assembler → per-table batch
//! builders (Arrow) → per-table Parquet writers streaming data files to the sink → one Delta
//! commit per table per flush → confirm the slot.
//!
//! Flushes happen only between source transactions, so every table commit holds whole
//! transactions and its `txn` version (the last commit LSN included) says exactly which ones it
//! has. A flush commits every table that has data, and only when all of them are committed does
//! the slot's flush LSN advance to the end of the last transaction processed: guarantee 1 (no
//! loss). After a crash, Postgres resends from the confirmed LSN and each table skips what its
//! `txn` version already covers: guarantee 2 (no duplicates).
//!
//! A flush's commits run on another thread ([`Flight`]) while the stream reads on; the confirm
//! position advances when the flight lands; while one is in the air, nothing it carries (or
//! anything after it) is confirmed.
//!
//! Flush policy (why thousands of tables do not mean thousands of tiny files per second): a
//! flush happens when the oldest uncommitted change is `--flush-interval` old (and the last
//! flush has landed, or is failing), or when buffered data exceeds `--memory-budget`. Each
//! flush writes at most one file per active table (more only when a table passes
//! `--target-file-size`), so the file rate is bounded by `active tables / flush interval`.
//! Between flushes, when memory passes the budget in the middle of a transaction, the largest
//! tables' open files are closed and kept staged (invisible) until the commit that follows.
//!
//! Backfills hand tables over without stopping the stream ([`HandOff`]): a table that joins
//! the publication is loaded from a snapshot at point C while every other table keeps
//! streaming. The stream pauses only while that snapshot is created, with everything
//! committed, so no change of the table at or after C is in its change log yet; from then on
//! its changes before C (in the snapshot) are dropped and later ones are buffered but not
//! committed — and the slot not confirmed past them — until the load has committed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::record_batch::RecordBatch;
use futures::StreamExt;

use crate::batch::rows::{ChangeBatchBuilder, ColumnSpec, RowError};
use crate::lake::changelog::{app_id, ChangeLogTable, LakeError};
use crate::lake::store::Sink;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::pgoutput::relation::CachedRelation;
use crate::pgoutput::{DecodeError, Decoder, OldTuple};
use crate::replication::slot::{self, SlotError};
use crate::replication::sql::TableName;
use crate::replication::stream::{ReplicationMessage, ReplicationStream, StreamOptions};
use crate::replication::{ClientError, ConnInfo, PgConnection, SessionKind};
use crate::txn::{Assembler, ChangeOp, Event, SpillConfig, TxnError};
use crate::types::arrow::lake_type;
use crate::types::catalog::TypeCatalog;
use crate::types::ValueError;

/// Rows a table buffers in Arrow builders before handing them to its Parquet writer.
const BATCH_ROWS: usize = 8192;
/// Changes between two measurements of the buffered bytes (a full measurement walks every
/// column builder of every table, too slow to do per change). In between, each change adds
/// the bytes of its values to the estimate, so that wide rows (a thousand 1 MB documents)
/// cannot pile up far past the budget before the next measurement.
const MEASURE_EVERY: usize = 1024;
/// Events of a committed streamed transaction handled between two memory checks; and at most
/// values of an eighth of `--memory-budget` (the slice is held while it is handled).
const REPLAY_SLICE: usize = 4096;
/// Messages taken from the read buffer in a row before the stream loop looks at its timers,
/// the flight and the shutdown signal again.
const BURST: usize = 64;
/// Tables committed concurrently in one flush.
const COMMIT_CONCURRENCY: usize = 32;
/// Change logs opened (or created) concurrently in the background.
const OPEN_CONCURRENCY: usize = 32;
/// Change logs still opening before the stream waits for the oldest of them: opens run on a
/// thread of their own (`ChangeLogTable::open_reading`), and without a bound the stream would
/// run ahead of them, buffering the rows of thousands of tables it cannot hand to a writer yet.
const MAX_OPENING: usize = 2 * OPEN_CONCURRENCY;
/// How long opening a change log is retried while the sink fails.
const OPEN_RETRY_LIMIT: Duration = Duration::from_secs(45);
/// Upper bound of the retry backoff while the sink fails.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How `run` hands tables over to a backfill while streaming goes on (module doc).
#[derive(Debug, Clone, Default)]
pub struct HandOff {
    /// A backfill asks the stream to pause between transactions, with everything committed,
    /// while it creates its snapshot: the request's id. Acknowledged on [`HandOffLink::paused`].
    pub pause: Option<u64>,
    /// Per table backfilled from a snapshot at point C: C − 1. Its changes at or below are in
    /// the snapshot and are dropped.
    pub floors: HashMap<TableName, Lsn>,
    /// Tables whose load is running: their changes are buffered, not committed, and the slot
    /// is not confirmed past the first of them.
    pub held: HashSet<TableName>,
}

/// The stream's side of the hand-off: the state backfills set, and where a paused stream
/// says so (with the pause request's id).
#[derive(Clone)]
pub struct HandOffLink {
    pub state: tokio::sync::watch::Receiver<HandOff>,
    pub paused: Arc<tokio::sync::watch::Sender<Option<u64>>>,
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub slot: String,
    pub publication: String,
    pub target_file_size: u64,
    pub flush_interval: Duration,
    pub memory_budget: u64,
    /// Where held changes of streamed transactions go beyond a quarter of the budget.
    pub spill_dir: std::path::PathBuf,
    pub status_interval: Duration,
    /// Interval of heartbeat messages written to the source's WAL; zero turns them off.
    pub heartbeat_interval: Duration,
    /// Interval of slot health checks (retained WAL, invalidation); zero turns them off.
    pub slot_check_interval: Duration,
    /// Give up a shutdown that cannot commit (sink down) after this long; nothing is lost,
    /// the slot is simply not confirmed.
    pub shutdown_timeout: Duration,
    /// Stop (as on shutdown: commit, confirm, end) between transactions once the stream has
    /// passed this LSN.
    pub stop_at: Option<Lsn>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Lake(#[from] LakeError),
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
    #[error("cannot decode column {column:?} of {table} in the transaction committed at {lsn}")]
    Value {
        table: String,
        column: String,
        lsn: Lsn,
        #[source]
        source: ValueError,
    },
    #[error("cannot build the change-log row of {table} at {lsn}")]
    Row {
        table: String,
        lsn: Lsn,
        #[source]
        source: RowError,
    },
    #[error("the server sent {got} columns for {table}, whose Relation message has {expected}")]
    ColumnCount {
        table: String,
        expected: usize,
        got: usize,
    },
    #[error("the replication stream ended")]
    StreamEnded,
    #[error("opening the change log of {table} failed: {message}")]
    OpenTask { table: String, message: String },
    #[error("committing to the lake failed: {message}")]
    CommitTask { message: String },
    #[error("the initial load's record: {message}")]
    LoadRecord { message: String },
    #[error("shutdown could not commit buffered changes within {0:?}; they will be read again from the slot")]
    ShutdownTimeout(Duration),
}

impl RunError {
    fn load_record(e: anyhow::Error) -> RunError {
        RunError::LoadRecord {
            message: format!("{e:#}"),
        }
    }

    /// Transient failures go away by themselves — the connection to Postgres lost, the server
    /// restarting or failing over, the sink unavailable for longer than one attempt retries —
    /// and the run resumes from the slot's confirmed position. Everything else (slot or
    /// publication gone, privileges, bad data, a full spill disk) needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::Client(c) | RunError::Slot(SlotError::Client(c)) => c.is_transient(),
            RunError::Lake(_)
            | RunError::StreamEnded
            | RunError::OpenTask { .. }
            | RunError::LoadRecord { .. } => true,
            RunError::Slot(_)
            | RunError::Decode { .. }
            | RunError::Txn { .. }
            | RunError::Value { .. }
            | RunError::Row { .. }
            | RunError::ColumnCount { .. }
            | RunError::CommitTask { .. }
            | RunError::ShutdownTimeout(_) => false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub changes: u64,
    pub transactions: u64,
    pub skipped_replayed: u64,
    pub confirmed: Lsn,
    /// Bytes of streamed-transaction changes that went through local spill files.
    pub spilled_bytes: u64,
}

/// Column layout of one relation version, as written.
struct RelationLayout {
    table: TableName,
    specs: Vec<ColumnSpec>,
    /// The table's index in [`Pipeline::tables`], once it is there: a change then finds its
    /// table without hashing the name.
    slot: std::sync::OnceLock<usize>,
}

/// A change log being opened in the background, open, or lent to the [`Flight`] committing
/// it (with the commit LSN of the last transaction it held when lent).
enum LogSlot {
    Opening(tokio::task::JoinHandle<Result<ChangeLogTable, LakeError>>),
    Open(Box<ChangeLogTable>),
    Lent { committed: Option<Lsn> },
}

/// One source table's change log and what is buffered for it.
///
/// A table seen for the first time starts buffering at once while its change log is opened
/// (or created) in the background: with thousands of tables, opening them one after another
/// on first sight stalled the stream for a minute. Until the open completes the table's `txn`
/// version is unknown, so rows buffered meanwhile are filtered against it afterwards.
struct TableState {
    name: TableName,
    log: LogSlot,
    builder: ChangeBatchBuilder,
    /// (relation id, version) the builder's columns come from.
    layout_key: (u32, u32),
    /// Commit LSN of the last transaction with rows not yet committed.
    pending_lsn: Option<Lsn>,
    /// Rows buffered before the change log's `txn` version was known: the builder's next
    /// batch drops rows at or below this commit LSN (replays of committed transactions).
    filter_at_or_below: Option<Lsn>,
    /// Rows dropped by that filter.
    filtered: u64,
    /// Commit LSN of the first transaction with rows not yet committed.
    first_pending: Option<Lsn>,
    /// Changes at or below this commit LSN are in a backfill's snapshot: dropped.
    floor: Option<Lsn>,
    /// A backfill is loading the table: its rows are not committed yet.
    held: bool,
}

impl TableState {
    /// The change log, waiting for its open to finish if needed.
    async fn log(&mut self) -> Result<&mut ChangeLogTable, RunError> {
        if let LogSlot::Opening(handle) = &mut self.log {
            let log = opened(handle, &self.name).await?;
            if let Some(c) = log.committed_lsn() {
                if !self.builder.is_empty() {
                    self.filter_at_or_below = Some(c);
                }
            }
            self.log = LogSlot::Open(Box::new(log));
        }
        match &mut self.log {
            LogSlot::Open(log) => Ok(log),
            // Callers land the flight first ([`Pipeline::land`]).
            LogSlot::Opening(_) | LogSlot::Lent { .. } => Err(RunError::CommitTask {
                message: format!("the change log of {} is not here", self.name),
            }),
        }
    }

    /// The change log if it is open (no waiting).
    fn open_log(&self) -> Option<&ChangeLogTable> {
        match &self.log {
            LogSlot::Open(log) => Some(log),
            LogSlot::Opening(_) | LogSlot::Lent { .. } => None,
        }
    }

    fn is_lent(&self) -> bool {
        matches!(self.log, LogSlot::Lent { .. })
    }

    /// The commit LSN of the last source transaction the change log holds, if known.
    fn committed_lsn(&self) -> Option<Lsn> {
        match &self.log {
            LogSlot::Open(log) => log.committed_lsn(),
            LogSlot::Lent { committed } => *committed,
            LogSlot::Opening(_) => None,
        }
    }

    /// The rows buffered in the builder as one batch, replays of committed transactions
    /// dropped (the change log must be open).
    fn take_batch(&mut self) -> Result<Option<RecordBatch>, RunError> {
        if self.builder.is_empty() {
            return Ok(None);
        }
        let lsn = self.pending_lsn.unwrap_or_default();
        let batch = self.builder.finish().map_err(|source| RunError::Row {
            table: self.name.to_string(),
            lsn,
            source,
        })?;
        match self.filter_at_or_below.take() {
            Some(c) => without_replays(batch, c, &mut self.filtered, &self.name, lsn),
            None => Ok((batch.num_rows() > 0).then_some(batch)),
        }
    }

    async fn move_rows_to_writer(&mut self) -> Result<(), RunError> {
        self.log().await?;
        if let Some(batch) = self.take_batch()? {
            self.log().await?.write(batch).await?;
        }
        Ok(())
    }

    /// Memory of the rows buffered here (a lent change log's are counted with its flight).
    fn memory_bytes(&self) -> usize {
        self.builder.memory_bytes() + self.open_log().map_or(0, ChangeLogTable::buffered_bytes)
    }
}

/// The change log `open` opened (its `txn` version logged).
async fn opened(
    open: &mut tokio::task::JoinHandle<Result<ChangeLogTable, LakeError>>,
    table: &TableName,
) -> Result<ChangeLogTable, RunError> {
    let log = open.await.map_err(|e| RunError::OpenTask {
        table: table.to_string(),
        message: e.to_string(),
    })??;
    if let Some(c) = log.committed_lsn() {
        tracing::info!(table = %table, committed = %c, "change log holds transactions up to this commit LSN");
    }
    Ok(log)
}

/// `batch` without the rows of transactions at or below `committed` (counted in `dropped`);
/// `None` when nothing is left. `lsn` names the rows in an error.
fn without_replays(
    batch: RecordBatch,
    committed: Lsn,
    dropped: &mut u64,
    table: &TableName,
    lsn: Lsn,
) -> Result<Option<RecordBatch>, RunError> {
    let before = batch.num_rows();
    let kept = drop_replayed(batch, committed).map_err(|e| RunError::Row {
        table: table.to_string(),
        lsn,
        source: RowError::Batch(e),
    })?;
    *dropped += (before - kept.num_rows()) as u64;
    Ok((kept.num_rows() > 0).then_some(kept))
}

/// The rows of `batch` whose `_lsn` is above `committed`.
fn drop_replayed(
    batch: RecordBatch,
    committed: Lsn,
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    use deltalake::arrow::array::{BooleanArray, Int64Array};
    let Some(lsn) = batch
        .column_by_name(crate::batch::rows::LSN)
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
    else {
        return Ok(batch);
    };
    let keep: BooleanArray = lsn
        .iter()
        .map(|v| Some(v.is_none_or(|v| v as u64 > committed.0)))
        .collect();
    deltalake::arrow::compute::filter_record_batch(&batch, &keep)
}

/// Runs until `shutdown` resolves (then flushes, commits and confirms) or an error.
pub async fn run(
    source: &ConnInfo,
    sink: &Sink,
    opts: &RunOptions,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
    handoff: HandOffLink,
) -> Result<RunSummary, RunError> {
    slot::validate_slot_name(&opts.slot)?;
    let restates = pending_restates(sink, &opts.slot).await?;
    let stream = start_stream(source, opts).await?;
    let monitor = tokio::spawn(monitor_source(
        source.clone(),
        opts.slot.clone(),
        opts.heartbeat_interval,
        opts.slot_check_interval,
        metrics.clone(),
    ));
    let op_changes = [
        ChangeOp::Insert,
        ChangeOp::Update,
        ChangeOp::Delete,
        ChangeOp::Truncate,
    ]
    .map(|op| metrics.changes.with_label_values(&[op.code()]));
    let mut p = Pipeline {
        source: source.clone(),
        sink: sink.clone(),
        opts: opts.clone(),
        metrics,
        app_id: app_id(&opts.slot),
        catalog: TypeCatalog::new(),
        catalog_conn: None,
        layouts: HashMap::default(),
        tables: indexmap::IndexMap::default(),
        summary: RunSummary::default(),
        received: Lsn::INVALID,
        last_end: None,
        oldest_pending: None,
        oldest_pending_ts: None,
        buffered: 0,
        since_measure: 0,
        opens: Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY)),
        opening: std::collections::VecDeque::new(),
        last_status: Instant::now(),
        spilled_reported: 0,
        op_changes,
        handoff,
        handed: HandOff::default(),
        flight: None,
        restates,
    };
    p.metrics.streaming.store(true, Ordering::Relaxed);
    let result = p.stream_loop(stream, shutdown).await;
    if let Some(flight) = p.flight.take() {
        // The run ends with a flush in the air (an error, or a shutdown that could not
        // commit): stop it before anything else writes these change logs. Nothing of it
        // is confirmed; the next run reads it again from the slot.
        flight.cancel.send_replace(true);
        let _ = flight.task.await;
    }
    monitor.abort();
    p.metrics.streaming.store(false, Ordering::Relaxed);
    if let Some(c) = p.catalog_conn.take() {
        c.close().await;
    }
    result.map(|()| p.summary)
}

/// Rows a load resumed from a newer snapshot read, as they were at its point + 1 (see
/// [`crate::snapshot::Restate`]): staged files, committed by the stream after every change
/// below that point and before any other.
struct PendingRestate {
    table: TableName,
    lsn: Lsn,
    adds: Vec<deltalake::kernel::Add>,
}

/// The copies the slot's load record says are not committed yet, in LSN order.
async fn pending_restates(sink: &Sink, slot: &str) -> Result<Vec<PendingRestate>, RunError> {
    let record = crate::snapshot::read_record(sink, slot)
        .await
        .map_err(RunError::load_record)?;
    let mut pending = Vec::new();
    for (name, r) in record.map(|r| r.restates).unwrap_or_default() {
        let bad = |what: String| RunError::LoadRecord {
            message: format!("the copies of {name}: {what}"),
        };
        pending.push(PendingRestate {
            table: TableName::parse(&name).map_err(bad)?,
            lsn: r.lsn.parse().map_err(|e| bad(format!("{e}")))?,
            adds: r.adds,
        });
    }
    pending.sort_by_key(|r| r.lsn);
    Ok(pending)
}

/// Side duties on an ordinary SQL connection to the source, next to the stream:
///
/// - every `heartbeat` (unless zero), a non-transactional logical message in the source's WAL,
///   so that the slot of a database without writes of its own still has something to decode
///   and confirm (on Aurora/RDS, WAL from other databases or the service does not reach it);
/// - every `slot_check`, the slot's health from `pg_replication_slots`: retained WAL and
///   `safe_wal_size` as metrics, and a loud error log when it is invalidated (`lost`; the
///   stream then fails and the restart stops with exit code 4).
///
/// Failures only cost a warning and `slotlake_retries_total{stage="heartbeat"|"slot_check"}`.
async fn monitor_source(
    source: ConnInfo,
    slot: String,
    heartbeat: Duration,
    slot_check: Duration,
    metrics: Arc<Metrics>,
) {
    let mut conn: Option<PgConnection> = None;
    let every = |d: Duration| {
        let mut t = tokio::time::interval(if d.is_zero() {
            Duration::from_secs(86_400)
        } else {
            d
        });
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    };
    let mut beat = every(heartbeat);
    let mut check = every(slot_check);
    loop {
        let stage = tokio::select! {
            _ = beat.tick(), if !heartbeat.is_zero() => "heartbeat",
            _ = check.tick(), if !slot_check.is_zero() => "slot_check",
        };
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match PgConnection::connect(&source, SessionKind::Sql).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    metrics.retries.with_label_values(&[stage]).inc();
                    tracing::warn!(error = %error_chain(&e), stage, "cannot connect to the source for a heartbeat or slot check");
                    continue;
                }
            },
        };
        let result = if stage == "heartbeat" {
            let sql = "SELECT pg_logical_emit_message(false, 'slotlake-heartbeat', now()::text)";
            c.simple_query(sql).await.map(|_| ())
        } else {
            match slot::slot_info(c, &slot).await {
                Ok(Some(info)) => {
                    if let Some(r) = info.retained_wal_bytes {
                        metrics.slot_retained_wal_bytes.set(r);
                    }
                    metrics
                        .slot_safe_wal_bytes
                        .set(info.safe_wal_size.unwrap_or(-1));
                    let lost = info.wal_status.as_deref() == Some("lost");
                    metrics.slot_invalidated.set(i64::from(lost));
                    if lost {
                        tracing::error!(slot = %slot, "the replication slot was invalidated (wal_status = lost)");
                    }
                    Ok(())
                }
                Ok(None) => {
                    tracing::error!(slot = %slot, "the replication slot no longer exists");
                    Ok(())
                }
                Err(SlotError::Client(e)) => Err(e),
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "cannot check the replication slot");
                    Ok(())
                }
            }
        };
        if let Err(e) = result {
            metrics.retries.with_label_values(&[stage]).inc();
            tracing::warn!(error = %error_chain(&e), stage, "heartbeat or slot check failed");
            if let Some(c) = conn.take() {
                c.close().await;
            }
        }
    }
}

/// How long a slot still held by a previous (dying) process is waited for.
const SLOT_BUSY_WAIT: Duration = Duration::from_secs(30);

/// Connects and starts streaming. A slot that is still active is retried for a while: after a
/// crash or kill, the server needs a moment to notice that the old connection is gone.
async fn start_stream(source: &ConnInfo, opts: &RunOptions) -> Result<ReplicationStream, RunError> {
    let deadline = Instant::now() + SLOT_BUSY_WAIT;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut repl = PgConnection::connect(source, SessionKind::Replication).await?;
        match slot::slot_info(&mut repl, &opts.slot).await? {
            None => return Err(SlotError::SlotMissing(opts.slot.clone()).into()),
            Some(info) if info.wal_status.as_deref() == Some("lost") => {
                return Err(SlotError::Invalidated(opts.slot.clone()).into());
            }
            Some(info) if info.active && Instant::now() < deadline => {
                tracing::info!(slot = %opts.slot, pid = ?info.active_pid, "slot is still active; waiting for it to be released");
                repl.close().await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Some(_) => {}
        }
        slot::require_publication(&mut repl, &opts.publication).await?;
        let options = StreamOptions::new(vec![opts.publication.clone()]);
        match ReplicationStream::start(repl, &opts.slot, Lsn::INVALID, options).await {
            Err(ClientError::Server(e)) if e.code == "55006" && Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            other => return Ok(other?),
        }
    }
}

struct Pipeline {
    source: ConnInfo,
    sink: Sink,
    opts: RunOptions,
    metrics: Arc<Metrics>,
    app_id: String,
    catalog: TypeCatalog,
    catalog_conn: Option<PgConnection>,
    layouts: HashMap<(u32, u32), Arc<RelationLayout>, foldhash::fast::RandomState>,
    /// Every table seen, in the order first seen. Never removed from, so an index stays valid
    /// ([`RelationLayout::slot`]).
    tables: indexmap::IndexMap<TableName, TableState, foldhash::fast::RandomState>,
    summary: RunSummary,
    received: Lsn,
    /// End LSN of the last complete transaction processed.
    last_end: Option<Lsn>,
    /// When the oldest uncommitted change arrived, and its source commit time (µs since 1970).
    oldest_pending: Option<Instant>,
    oldest_pending_ts: Option<i64>,
    /// Buffered bytes at the last measurement, and changes appended since.
    buffered: usize,
    since_measure: usize,
    /// Bounds change logs opened at the same time.
    opens: Arc<tokio::sync::Semaphore>,
    /// Tables whose change log started opening, oldest first (some may have opened since).
    opening: std::collections::VecDeque<usize>,
    /// When the last standby status update went out.
    last_status: Instant,
    spilled_reported: u64,
    /// `slotlake_changes_total{op}` resolved once per op (indexed by `ChangeOp as usize`),
    /// not looked up per change.
    op_changes: [prometheus::IntCounter; 4],
    /// Backfills' side of the hand-off, and the latest state seen of it.
    handoff: HandOffLink,
    handed: HandOff,
    /// Copies of a resumed load's rows, to commit once the stream reaches their point.
    restates: Vec<PendingRestate>,
    /// The flush being committed in the background, if any.
    flight: Option<Flight>,
}

impl Pipeline {
    async fn stream_loop(
        &mut self,
        mut stream: ReplicationStream,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), RunError> {
        let mut decoder = Decoder::new(stream.proto_version());
        let mut assembler = Assembler::with_spill(SpillConfig {
            dir: self.opts.spill_dir.clone(),
            memory_limit: (self.opts.memory_budget / 4) as usize,
        });
        let mut events = Vec::new();
        let mut status = tokio::time::interval(self.opts.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush_check =
            tokio::time::interval(Duration::from_millis(250).min(self.opts.flush_interval));
        flush_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        let mut burst = 0usize;
        tokio::pin!(shutdown);
        let mut handoff = self.handoff.state.clone();
        let mut handoff_alive = true;
        let initial = handoff.has_changed().map(drop);
        self.take_handoff(initial, &mut handoff, &mut handoff_alive);
        loop {
            if let (Some(id), false, false) =
                (self.handed.pause, stopping, assembler.in_transaction())
            {
                // A backfill creates its snapshot: everything committed, nothing read until
                // it knows the snapshot's point (status updates keep the session alive).
                self.flush_all(&mut stream).await?;
                self.send_status(&mut stream).await?;
                self.handoff.paused.send_replace(Some(id));
                tracing::info!("stream paused while a backfill creates its snapshot");
                while self.handed.pause == Some(id) && !stopping {
                    tokio::select! {
                        r = handoff.changed(), if handoff_alive => {
                            self.take_handoff(r, &mut handoff, &mut handoff_alive);
                        }
                        _ = status.tick() => self.send_status(&mut stream).await?,
                        _ = &mut shutdown => stopping = true,
                    }
                }
                tracing::info!("stream resumed");
                continue;
            }
            if stopping && !assembler.in_transaction() {
                // Between transactions: commit what is buffered, confirm, stop.
                let timeout = self.opts.shutdown_timeout;
                let flushed = tokio::time::timeout(timeout, self.flush_all(&mut stream)).await;
                match flushed {
                    Ok(r) => r?,
                    Err(_) => return Err(RunError::ShutdownTimeout(timeout)),
                }
                self.confirm_all_received(&assembler, self.received);
                self.send_status(&mut stream).await?;
                let conn = stream.stop().await?;
                conn.close().await;
                return Ok(());
            }
            // Messages already buffered are taken without a trip through `select!` (which
            // polls every branch), up to BURST in a row so timers and the flight are still seen.
            let buffered = if burst < BURST {
                stream.buffered_message()?
            } else {
                None
            };
            burst = if buffered.is_some() { burst + 1 } else { 0 };
            let msg = match buffered {
                Some(m) => Some(m),
                None => tokio::select! {
                    m = stream.next_message() => m?,
                    _ = status.tick() => {
                        self.send_status(&mut stream).await?;
                        continue;
                    }
                    _ = flush_check.tick() => {
                        if self.flush_if_due(assembler.in_transaction(), &mut stream).await? {
                            self.send_status(&mut stream).await?;
                        }
                        continue;
                    }
                    landed = flight_landing(&mut self.flight) => {
                        self.landed(landed)?;
                        // A flush that came due while this one was in the air starts now.
                        self.flush_if_due(assembler.in_transaction(), &mut stream).await?;
                        self.send_status(&mut stream).await?;
                        continue;
                    }
                    _ = &mut shutdown, if !stopping => {
                        tracing::info!("shutting down: finishing the current transaction, then committing");
                        stopping = true;
                        continue;
                    }
                    r = handoff.changed(), if handoff_alive => {
                        self.take_handoff(r, &mut handoff, &mut handoff_alive);
                        continue;
                    }
                },
            };
            let Some(msg) = msg else {
                return Err(RunError::StreamEnded);
            };
            match msg {
                ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                } => {
                    self.note_received(wal_end);
                    if assembler.is_idle() {
                        self.commit_restates(wal_end, &mut stream).await?;
                    }
                    stopping = stopping || self.passed_stop_at(assembler.in_transaction());
                    // Nothing buffered: everything before wal_end is in the lake.
                    let advanced = self.confirm_all_received(&assembler, wal_end);
                    if advanced || reply_requested {
                        self.send_status(&mut stream).await?;
                    }
                }
                ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    data,
                } => {
                    self.note_received(wal_end.max(wal_start));
                    self.metrics.received_bytes.inc_by(data.len() as u64);
                    let message = decoder.decode(&data).map_err(|source| RunError::Decode {
                        lsn: wal_start,
                        source,
                    })?;
                    assembler
                        .handle(message, &mut events)
                        .map_err(|source| RunError::Txn {
                            lsn: wal_start,
                            source,
                        })?;
                    loop {
                        for event in events.drain(..) {
                            self.handle_event(event, &mut stream).await?;
                        }
                        if !assembler.replaying() {
                            break;
                        }
                        // A committed streamed transaction, handed out slice by slice: memory
                        // stays bounded and the server keeps hearing from us.
                        assembler
                            .drain_replay(
                                &mut events,
                                REPLAY_SLICE,
                                (self.opts.memory_budget / 8) as usize,
                            )
                            .map_err(|source| RunError::Txn {
                                lsn: wal_start,
                                source,
                            })?;
                        if self.buffered_estimate() as u64 > self.opts.memory_budget {
                            self.relieve_memory(&mut stream).await?;
                        }
                        if self.last_status.elapsed() >= self.opts.status_interval {
                            self.send_status(&mut stream).await?;
                        }
                    }
                    let spilled = assembler.spilled_bytes();
                    if spilled > self.spilled_reported {
                        self.metrics
                            .spilled_bytes
                            .inc_by(spilled - self.spilled_reported);
                        self.spilled_reported = spilled;
                        self.summary.spilled_bytes = spilled;
                    }
                    if self
                        .flush_if_due(assembler.in_transaction(), &mut stream)
                        .await?
                    {
                        self.send_status(&mut stream).await?;
                    } else if self.buffered_estimate() as u64 > self.opts.memory_budget {
                        self.relieve_memory(&mut stream).await?;
                    }
                    stopping = stopping || self.passed_stop_at(assembler.in_transaction());
                }
            }
        }
    }

    /// Takes in the hand-off state after `changed` said it changed (or, `Err`, that its
    /// sender is gone: a backfill task that is gone holds nothing): the pause request, and per
    /// table its floor and whether it is held.
    fn take_handoff<E>(
        &mut self,
        changed: Result<(), E>,
        rx: &mut tokio::sync::watch::Receiver<HandOff>,
        alive: &mut bool,
    ) {
        self.handed = match changed {
            Ok(()) => rx.borrow_and_update().clone(),
            Err(_) => {
                *alive = false;
                HandOff::default()
            }
        };
        for t in self.tables.values_mut() {
            t.floor = self.handed.floors.get(&t.name).copied();
            t.held = self.handed.held.contains(&t.name);
        }
    }

    /// Confirms up to `received` (everything received so far, or a keepalive's WAL end) when
    /// nothing is buffered or held and no transaction is open: then all of it is in the lake.
    /// True when the confirmed position moved.
    fn confirm_all_received(&mut self, assembler: &Assembler, received: Lsn) -> bool {
        let advance =
            assembler.is_idle() && !self.has_pending() && received > self.summary.confirmed;
        if advance {
            self.summary.confirmed = received;
        }
        advance
    }

    /// Whether `--stop-at` is reached: between transactions, with the stream at or past it.
    /// Messages come in commit order, a transaction's all together, and a keepalive's WAL
    /// end is how far decoding got: once something at or past the LSN arrived, every
    /// transaction that committed before it is here.
    fn passed_stop_at(&self, in_transaction: bool) -> bool {
        let passed = self.opts.stop_at.is_some_and(|s| self.received >= s);
        if passed && !in_transaction {
            tracing::info!(stop_at = %self.opts.stop_at.unwrap_or_default(), received = %self.received, "reached --stop-at; committing and stopping");
        }
        passed && !in_transaction
    }

    fn note_received(&mut self, lsn: Lsn) {
        self.received = self.received.max(lsn);
        self.metrics.received_lsn.set(self.received.0 as i64);
        self.metrics
            .server_wal_end
            .fetch_max(lsn.0, Ordering::Relaxed);
        self.metrics.replication_lag_bytes.set(
            self.received
                .checked_sub(self.summary.confirmed)
                .unwrap_or(0) as i64,
        );
    }

    async fn send_status(&mut self, stream: &mut ReplicationStream) -> Result<(), RunError> {
        // Copies still to commit at C2 − 1 keep the slot below C2: a restart must see the
        // stream reach C2 again.
        let c = match self.restates.first() {
            Some(r) => self.summary.confirmed.min(r.lsn),
            None => self.summary.confirmed,
        };
        self.metrics.confirmed_flush_lsn.set(c.0 as i64);
        stream.send_status(self.received, c, c, false).await?;
        self.last_status = Instant::now();
        Ok(())
    }

    /// Whether any table has rows not yet committed: exactly when the oldest such row's
    /// arrival is recorded (set with the first row, cleared by a flush) or a flush is in the
    /// air, so no table walk.
    fn has_pending(&self) -> bool {
        self.oldest_pending.is_some() || self.flight.is_some()
    }

    /// Measures the bytes buffered in builders and writers of every table, and in the air.
    fn measure(&mut self) -> usize {
        self.buffered = self
            .tables
            .values()
            .map(TableState::memory_bytes)
            .sum::<usize>()
            + self.flight.as_ref().map_or(0, |f| f.bytes);
        self.since_measure = 0;
        self.metrics.buffered_bytes.set(self.buffered as i64);
        self.buffered
    }

    /// The buffered bytes, measured again every [`MEASURE_EVERY`] changes, and whenever the
    /// estimate (the last measurement plus the bytes of the values since) passes the budget.
    fn buffered_estimate(&mut self) -> usize {
        if self.since_measure >= MEASURE_EVERY || self.buffered as u64 > self.opts.memory_budget {
            self.measure()
        } else {
            self.buffered
        }
    }

    /// Starts a flush in the background if one is due and no transaction is open (flushes hold
    /// whole transactions); whether it did.
    async fn flush_if_due(
        &mut self,
        in_transaction: bool,
        stream: &mut ReplicationStream,
    ) -> Result<bool, RunError> {
        if in_transaction || !self.flush_due() {
            return Ok(false);
        }
        self.flush_in_background(stream).await?;
        Ok(true)
    }

    /// Whether to flush now (waiting first for the flush in the air, if any): buffered data
    /// over the memory budget, or the oldest uncommitted change `--flush-interval` old and no
    /// flush in the air, or one whose commits are being retried. A flight that is merely slow
    /// (a far sink, a big flush) does not stop the stream: the changes go with the next flush,
    /// started when it lands. A failing sink does, as before, so that an outage does not go
    /// on buffering up to the memory budget (and opening change logs it cannot open).
    fn flush_due(&mut self) -> bool {
        match self.oldest_pending {
            None => false,
            Some(t) => {
                let failing = |f: &Flight| f.retrying.load(Ordering::Relaxed);
                (t.elapsed() >= self.opts.flush_interval
                    && self.flight.as_ref().is_none_or(failing))
                    || self.buffered_estimate() as u64 > self.opts.memory_budget
            }
        }
    }

    async fn handle_event(
        &mut self,
        event: Event,
        stream: &mut ReplicationStream,
    ) -> Result<(), RunError> {
        match event {
            Event::Relation { relation, .. } => {
                self.layout(&relation, stream).await?;
            }
            Event::Change {
                txn,
                position,
                change,
            } => {
                let layout = self.layout(&change.relation, stream).await?;
                let key = (change.relation.relation.id, change.relation.version);
                // (An index `ensure_table` just gave: tables are never removed.)
                let slot = self.ensure_table(&layout, key).await?;
                let mut state = &mut self.tables[slot];
                if state.is_lent() && state.layout_key != key {
                    // Its rows so far must go to its change log, which is in the air.
                    self.land(stream).await?;
                    state = &mut self.tables[slot];
                }
                if state
                    .committed_lsn()
                    .is_some_and(|c| position.commit_lsn <= c)
                {
                    self.summary.skipped_replayed += 1;
                    return Ok(());
                }
                if state.floor.is_some_and(|f| position.commit_lsn <= f) {
                    // In the snapshot a backfill loads.
                    self.summary.skipped_replayed += 1;
                    return Ok(());
                }
                if state.layout_key != key {
                    // The relation changed: rows so far go out with the old columns.
                    state.move_rows_to_writer().await?;
                    state.builder = ChangeBatchBuilder::new(layout.specs.clone());
                    state.layout_key = key;
                }
                let lsn = position.commit_lsn;
                let commit_ts = txn.commit_ts.unix_micros();
                let (seq, xid) = (position.seq as i64, i64::from(txn.xid));
                match change.op {
                    ChangeOp::Truncate => {
                        state
                            .builder
                            .append_truncate(lsn.0 as i64, seq, xid, commit_ts)
                    }
                    op => {
                        // A delete carries only the old key or row: it goes in the source columns.
                        let (row, old) = match (&change.new, &change.old) {
                            (Some(new), old) => (new, old.as_ref().map(OldTuple::tuple)),
                            (None, Some(old)) => (old.tuple(), None),
                            (None, None) => return Ok(()),
                        };
                        state
                            .builder
                            .append_change(
                                op.code(),
                                lsn.0 as i64,
                                seq,
                                xid,
                                commit_ts,
                                &row.columns,
                                old.map(|t| t.columns.as_slice()),
                            )
                            .map_err(|e| match e {
                                RowError::Parse { column, source } => RunError::Value {
                                    table: layout.table.to_string(),
                                    column,
                                    lsn,
                                    source,
                                },
                                RowError::ColumnCount { expected, got }
                                | RowError::OldColumnCount { expected, got } => {
                                    RunError::ColumnCount {
                                        table: layout.table.to_string(),
                                        expected,
                                        got,
                                    }
                                }
                                source => RunError::Row {
                                    table: layout.table.to_string(),
                                    lsn,
                                    source,
                                },
                            })?;
                    }
                }
                self.op_changes[change.op as usize].inc();
                self.summary.changes += 1;
                self.since_measure += 1;
                self.buffered += change.value_bytes();
                if state.pending_lsn.is_none() {
                    state.first_pending = Some(lsn);
                }
                state.pending_lsn = Some(lsn);
                // (A table whose change log is in the air keeps its rows until it lands.)
                if state.builder.len() >= BATCH_ROWS && !state.is_lent() {
                    state.move_rows_to_writer().await?;
                }
                if self.oldest_pending.is_none() {
                    self.oldest_pending = Some(Instant::now());
                    self.oldest_pending_ts = Some(commit_ts);
                }
            }
            Event::Commit { end_lsn, .. } => {
                self.summary.transactions += 1;
                self.metrics.transactions.inc();
                self.last_end = Some(end_lsn);
                if !self.has_pending() {
                    // A transaction that wrote nothing new (filtered or replayed): confirmable.
                    self.summary.confirmed = self.summary.confirmed.max(end_lsn);
                }
            }
            Event::Begin(txn) => self.commit_restates(txn.commit_lsn, stream).await?,
            Event::Message { .. } => {}
        }
        Ok(())
    }

    /// Commits the copies of a resumed load's rows (see [`PendingRestate`]) whose point is
    /// below `lsn` — the commit LSN of the next transaction, or how far decoding got —
    /// after everything buffered, which is all below it.
    async fn commit_restates(
        &mut self,
        lsn: Lsn,
        stream: &mut ReplicationStream,
    ) -> Result<(), RunError> {
        if self.restates.first().is_none_or(|r| r.lsn >= lsn) {
            return Ok(());
        }
        self.flush_all(stream).await?;
        while self.restates.first().is_some_and(|r| r.lsn < lsn) {
            let r = self.restates.remove(0);
            let app = crate::snapshot::restate_app(&self.app_id, r.lsn);
            // The table exists (its load committed); the schema is only for creating one.
            let schema = Arc::new(deltalake::arrow::datatypes::Schema::empty());
            let (mut log, done) = ChangeLogTable::open_reading(
                &self.sink,
                &r.table,
                &self.app_id,
                &schema,
                self.opts.target_file_size,
                Some(&app),
            )
            .await?;
            // Committed already by a run that stopped before it could update the record; or
            // superseded: the table was loaded again since, at a later point (`slotlake
            // snapshot --table` while the stream caught up; only a re-load moves its `txn`
            // version past C2 − 1 before the stream reaches C2).
            // (A re-load committing between this check and the commit makes the commit fail
            // as overtaken; the run restarts and checks again.)
            let reloaded = log.committed_lsn().is_some_and(|c| c > r.lsn);
            if done.is_none() && !reloaded {
                log.adopt(r.adds, r.lsn.0 as i64);
                log.commit_progress(&app, 1, None).await?;
            }
            let name = r.table.to_string();
            crate::snapshot::update_record(&self.sink, &self.opts.slot, |record| {
                record.restates.remove(&name);
            })
            .await
            .map_err(RunError::load_record)?;
            tracing::info!(table = %r.table, lsn = %r.lsn, "committed the rows a resumed initial load read again, after the changes before them");
        }
        self.send_status(stream).await
    }

    /// The layout of a relation version, resolving its column types once.
    async fn layout(
        &mut self,
        relation: &CachedRelation,
        stream: &mut ReplicationStream,
    ) -> Result<Arc<RelationLayout>, RunError> {
        let key = (relation.relation.id, relation.version);
        if let Some(l) = self.layouts.get(&key) {
            return Ok(l.clone());
        }
        let rel = &relation.relation;
        let table = TableName {
            schema: if rel.namespace.is_empty() {
                "pg_catalog".into()
            } else {
                rel.namespace.clone()
            },
            name: rel.name.clone(),
        };
        if self.tables.get(&table).is_some_and(TableState::is_lent) {
            // A new version of a table compares with its change log's schema, in the air.
            self.land(stream).await?;
        }
        let types = self
            .catalog
            .resolve_relation(rel, &mut self.catalog_conn, &self.source)
            .await?;
        // Type-change rule: a column whose lake type differs from the one already in the
        // change log is written under `<name>__<pgtype>`; the old column keeps its history.
        let existing = match self.tables.get_mut(&table) {
            Some(t) => Some(t.log().await?.schema()?),
            None => None,
        };
        let specs = rel
            .columns
            .iter()
            .zip(&types)
            .map(|(c, t)| {
                let mut name = crate::batch::rows::lake_column_name(&c.name);
                if let Some(schema) = &existing {
                    if let Ok(field) = schema.field_with_name(&name) {
                        if !crate::types::arrow::same_lake_type(field.data_type(), &lake_type(t)) {
                            name = format!(
                                "{name}__{}",
                                t.name().replace(['(', ')', ',', '[', ']'], "_")
                            );
                        }
                    }
                }
                ColumnSpec {
                    name,
                    ty: t.clone(),
                    is_key: c.is_key,
                }
            })
            .collect();
        let layout = Arc::new(RelationLayout {
            table,
            specs,
            slot: std::sync::OnceLock::new(),
        });
        self.layouts.insert(key, layout.clone());
        Ok(layout)
    }

    /// The index of the layout's table in [`Self::tables`], which starts opening its change
    /// log the first time.
    async fn ensure_table(
        &mut self,
        layout: &RelationLayout,
        key: (u32, u32),
    ) -> Result<usize, RunError> {
        if let Some(&slot) = layout.slot.get() {
            return Ok(slot);
        }
        if let Some(slot) = self.tables.get_index_of(&layout.table) {
            let _ = layout.slot.set(slot);
            return Ok(slot);
        }
        let builder = ChangeBatchBuilder::new(layout.specs.clone());
        let (sink, table, app_id, schema, metrics) = (
            self.sink.clone(),
            layout.table.clone(),
            self.app_id.clone(),
            builder.schema(),
            self.metrics.clone(),
        );
        let target_file_size = self.opts.target_file_size;
        let opens = self.opens.clone();
        // (The open itself runs on a thread of its own, see `ChangeLogTable::open_reading`.)
        let open = tokio::spawn(async move {
            let _permit = opens.acquire_owned().await;
            // The sink may be down: retry, but not for longer than the server waits for
            // our status updates (wal_sender_timeout, 60 s by default); then fail and
            // restart.
            let deadline = Instant::now() + OPEN_RETRY_LIMIT;
            let mut backoff = Duration::from_millis(200);
            loop {
                let opened =
                    ChangeLogTable::open(&sink, &table, &app_id, &schema, target_file_size).await;
                match opened {
                    Ok(log) => return Ok(log),
                    Err(e) if Instant::now() + backoff < deadline => {
                        metrics.retries.with_label_values(&["open"]).inc();
                        tracing::warn!(table = %table, error = %error_chain(&e), retry_in = ?backoff, "cannot open the change log; retrying");
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => return Err(e),
                }
            }
        });
        let (slot, _) = self.tables.insert_full(
            layout.table.clone(),
            TableState {
                name: layout.table.clone(),
                log: LogSlot::Opening(open),
                builder,
                layout_key: key,
                pending_lsn: None,
                filter_at_or_below: None,
                filtered: 0,
                first_pending: None,
                floor: self.handed.floors.get(&layout.table).copied(),
                held: self.handed.held.contains(&layout.table),
            },
        );
        let _ = layout.slot.set(slot);
        self.metrics.tables_active.set(self.tables.len() as i64);
        self.opening.push_back(slot);
        while self.opening.len() > MAX_OPENING {
            if let Some(oldest) = self.opening.pop_front() {
                let t = &mut self.tables[oldest];
                if matches!(t.log, LogSlot::Opening(_)) {
                    t.log().await?;
                }
            }
        }
        Ok(slot)
    }

    /// Memory above the budget in the middle of a transaction: hand rows to the writers and
    /// close the largest tables' open files (staged, committed with the next flush).
    async fn relieve_memory(&mut self, stream: &mut ReplicationStream) -> Result<(), RunError> {
        // A flush in the air holds memory too, and the change logs it lent.
        self.land(stream).await?;
        let budget = self.opts.memory_budget as usize;
        // Each table measured once (a measurement walks its builders): 5,000 tables.
        let mut by_size: Vec<(usize, &mut TableState)> = self
            .tables
            .values_mut()
            .map(|t| (t.memory_bytes(), t))
            .collect();
        by_size.sort_by_key(|&(bytes, _)| std::cmp::Reverse(bytes));
        let mut total: usize = by_size.iter().map(|&(bytes, _)| bytes).sum();
        for (before, t) in by_size {
            if total <= budget / 2 {
                break;
            }
            t.move_rows_to_writer().await?;
            t.log().await?.stage().await?;
            total = total.saturating_sub(before.saturating_sub(t.memory_bytes()));
        }
        self.measure();
        Ok(())
    }

    /// Commits every table with buffered rows and advances the confirm position, waiting for
    /// it (status updates keep flowing while the sink fails and the commits retry). The work
    /// is shared by two threads: the stream waits anyway.
    async fn flush_all(&mut self, stream: &mut ReplicationStream) -> Result<(), RunError> {
        self.land(stream).await?;
        self.start_flight(FLUSH_THREADS).await?;
        self.land(stream).await
    }

    /// Starts committing every table with buffered rows on another thread while the stream
    /// goes on: the tables' rows and change logs are lent to a [`Flight`], and the confirm
    /// position advances when it lands. A flight still in the air is waited for first.
    async fn flush_in_background(
        &mut self,
        stream: &mut ReplicationStream,
    ) -> Result<(), RunError> {
        self.land(stream).await?;
        self.start_flight(1).await
    }

    /// Tables a backfill is loading are not committed; the slot is not confirmed past the
    /// first change they buffer: that change's LSN − 1, if any.
    fn held_cap(&self) -> Option<Lsn> {
        self.tables
            .values()
            .filter(|t| t.held)
            .filter_map(|t| t.first_pending)
            .min()
            .map(|first| Lsn(first.0.saturating_sub(1)))
    }

    /// Lends the rows and change log of every table with buffered rows (not held) to a new
    /// [`Flight`] of `threads` flush threads. There must be none in the air.
    async fn start_flight(&mut self, threads: usize) -> Result<(), RunError> {
        let cap = self.held_cap();
        if !self.has_pending() {
            if let Some(end) = self.last_end {
                self.summary.confirmed = self.summary.confirmed.max(confirmable(end, cap));
            }
            return Ok(());
        }
        let started = Instant::now();
        let mut outgoing = Vec::new();
        let mut bytes = 0;
        for t in self.tables.values_mut() {
            let Some(lsn) = t.pending_lsn.filter(|_| !t.held) else {
                continue;
            };
            bytes += t.memory_bytes();
            // (A change log still being opened goes too: the flight waits for it, and drops
            // the replays among the rows once it knows the log's `txn` version.)
            let batch = t.take_batch()?;
            let lent = LogSlot::Lent {
                committed: t.committed_lsn(),
            };
            outgoing.push(Outgoing {
                name: t.name.clone(),
                log: std::mem::replace(&mut t.log, lent),
                batch,
                lsn,
                filtered: 0,
                opened: false,
            });
            t.pending_lsn = None;
            t.first_pending = None;
        }
        for t in self.tables.values_mut() {
            self.summary.skipped_replayed += std::mem::take(&mut t.filtered);
        }
        // Held rows stay pending (and keep later transactions from being confirmed one by
        // one); the age restarts so that they do not make every check a flush.
        self.oldest_pending = cap.map(|_| Instant::now());
        let oldest_ts = self.oldest_pending_ts.take();
        let tables = outgoing.len();
        let cancel = Arc::new(tokio::sync::watch::Sender::new(false));
        let retrying = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(commit_in_threads(
            outgoing,
            threads,
            self.metrics.clone(),
            cancel.clone(),
            retrying.clone(),
        ));
        self.flight = Some(Flight {
            task,
            cancel,
            end: self.last_end,
            cap,
            started,
            oldest_ts,
            bytes,
            tables,
            retrying,
        });
        self.measure();
        Ok(())
    }

    /// Waits for the flight in the air, if any, sending status updates meanwhile; gives the
    /// change logs back to their tables and advances the confirm position.
    async fn land(&mut self, stream: &mut ReplicationStream) -> Result<(), RunError> {
        if self.flight.is_none() {
            return Ok(());
        }
        let mut status = tokio::time::interval(self.opts.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        status.reset();
        let landed = loop {
            tokio::select! {
                r = flight_landing(&mut self.flight) => break r,
                _ = status.tick() => self.send_status(stream).await?,
            }
        };
        self.landed(landed)
    }

    /// Takes in a flight that came down: `landed` is its task's outcome.
    fn landed(
        &mut self,
        landed: Result<Result<Vec<Outgoing>, RunError>, tokio::task::JoinError>,
    ) -> Result<(), RunError> {
        let Some(flight) = self.flight.take() else {
            return Ok(());
        };
        let logs = landed.map_err(|e| RunError::CommitTask {
            message: e.to_string(),
        })??;
        for o in logs {
            let Some(t) = self.tables.get_mut(&o.name) else {
                continue;
            };
            if o.opened && !t.builder.is_empty() {
                // Rows that came while it was being opened may be replays.
                if let LogSlot::Open(log) = &o.log {
                    t.filter_at_or_below = log.committed_lsn();
                }
            }
            t.log = o.log;
            self.summary.skipped_replayed += o.filtered;
        }
        let elapsed = flight.started.elapsed();
        self.metrics.flush_duration.observe(elapsed.as_secs_f64());
        tracing::debug!(
            tables = flight.tables,
            buffered_bytes = flight.bytes,
            elapsed_ms = elapsed.as_millis() as u64,
            "flush committed"
        );
        if let Some(ts) = flight.oldest_ts {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(ts);
            self.metrics
                .commit_to_durable
                .observe((now - ts).max(0) as f64 / 1e6);
        }
        // Everything up to the flight's start is in the lake; so is every later transaction
        // when nothing new is buffered.
        let end = if self.oldest_pending.is_none() {
            self.last_end
        } else {
            flight.end
        };
        if let Some(end) = end {
            let cap = self.held_cap().into_iter().chain(flight.cap).min();
            self.summary.confirmed = self.summary.confirmed.max(confirmable(end, cap));
        }
        self.measure();
        Ok(())
    }
}

/// The outcome of the flight in the air when it lands; never, without one.
async fn flight_landing(
    flight: &mut Option<Flight>,
) -> Result<Result<Vec<Outgoing>, RunError>, tokio::task::JoinError> {
    match flight {
        Some(f) => (&mut f.task).await,
        None => std::future::pending().await,
    }
}

/// `end`, but not past `cap`.
fn confirmable(end: Lsn, cap: Option<Lsn>) -> Lsn {
    cap.map_or(end, |c| end.min(c))
}

/// One table's part of a flush: its change log (open, or being opened), the rows to write
/// to it (if its builder had any left), and the commit LSN of the last transaction they hold.
struct Outgoing {
    name: TableName,
    log: LogSlot,
    batch: Option<RecordBatch>,
    lsn: Lsn,
    /// Replayed rows dropped once the log was open.
    filtered: u64,
    /// The log was opened in the flight.
    opened: bool,
}

impl Outgoing {
    async fn commit(&mut self, metrics: &Metrics) -> Result<(), RunError> {
        if let LogSlot::Opening(handle) = &mut self.log {
            let log = opened(handle, &self.name).await?;
            if let Some(c) = log.committed_lsn() {
                if let Some(batch) = self.batch.take() {
                    self.batch =
                        without_replays(batch, c, &mut self.filtered, &self.name, self.lsn)?;
                }
            }
            self.log = LogSlot::Open(Box::new(log));
            self.opened = true;
        }
        let LogSlot::Open(log) = &mut self.log else {
            return Err(RunError::CommitTask {
                message: format!("the change log of {} is not here", self.name),
            });
        };
        if let Some(batch) = self.batch.take() {
            log.write(batch).await?;
        }
        let (files, bytes) = log.commit(self.lsn).await?;
        metrics.files_written.inc_by(files);
        metrics.written_bytes.inc_by(bytes);
        Ok(())
    }
}

/// A flush being committed away from the stream's thread: Parquet encoding and compression
/// are most of a flush's work, and the stream stalled for all of it (180 ms per second of
/// changes in `scripts/bench-ingest.sh` scenario a).
struct Flight {
    task: tokio::task::JoinHandle<Result<Vec<Outgoing>, RunError>>,
    /// Set: its commits stop at their next await (what they wrote stays unconfirmed).
    cancel: Arc<tokio::sync::watch::Sender<bool>>,
    /// End LSN of the last transaction processed when it started: confirmable once it lands.
    end: Option<Lsn>,
    /// The held tables' cap then.
    cap: Option<Lsn>,
    started: Instant,
    /// Source commit time of the oldest change it carries (µs since 1970).
    oldest_ts: Option<i64>,
    /// Memory it holds: counted as buffered until it lands.
    bytes: usize,
    tables: usize,
    /// Set once a commit of it failed and is being retried (the sink is failing).
    retrying: Arc<std::sync::atomic::AtomicBool>,
}

/// Commits `outgoing` on `threads` flush threads (tables spread by size), each running its
/// share concurrently; gives the change logs back. The first failure cancels the other shares.
async fn commit_in_threads(
    mut outgoing: Vec<Outgoing>,
    threads: usize,
    metrics: Arc<Metrics>,
    cancel: Arc<tokio::sync::watch::Sender<bool>>,
    retrying: Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<Outgoing>, RunError> {
    outgoing.sort_by_key(|o| {
        std::cmp::Reverse(
            o.batch
                .as_ref()
                .map_or(0, RecordBatch::get_array_memory_size),
        )
    });
    let threads = threads.clamp(1, FLUSH_THREADS);
    let mut shares: Vec<Vec<Outgoing>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, o) in outgoing.into_iter().enumerate() {
        shares[i % threads].push(o);
    }
    let runtimes = (0..threads)
        .map(flush_runtime)
        .collect::<Result<Vec<_>, _>>()?;
    let mut jobs: futures::stream::FuturesUnordered<_> = shares
        .into_iter()
        .zip(runtimes)
        .filter(|(share, _)| !share.is_empty())
        .map(|(share, runtime)| {
            let (metrics, cancel, retrying) =
                (metrics.clone(), cancel.subscribe(), retrying.clone());
            runtime.spawn(async move { commit_share(share, &metrics, cancel, &retrying).await })
        })
        .collect();
    let mut logs = Vec::new();
    let mut failure = None;
    while let Some(job) = jobs.next().await {
        let share = job.map_err(|e| RunError::CommitTask {
            message: e.to_string(),
        });
        match share.and_then(|s| s) {
            Ok(share) => logs.extend(share),
            Err(e) => {
                cancel.send_replace(true);
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        None => Ok(logs),
        Some(e) => Err(e),
    }
}

/// Flush threads: background flushes use one, shutdown and a backfill's pause all of them.
const FLUSH_THREADS: usize = 2;

/// The runtime of flush thread `i` (one worker thread each, started on first use, kept for the
/// process). Flights do not commit on the stream's runtime: a change log's writer finishes
/// each file (encoding and compressing its last row group) in a task it spawns, and on the
/// stream's single-threaded runtime that task would run on the stream's thread.
fn flush_runtime(i: usize) -> Result<&'static tokio::runtime::Runtime, RunError> {
    static RUNTIMES: [std::sync::OnceLock<Result<tokio::runtime::Runtime, String>>; FLUSH_THREADS] =
        [const { std::sync::OnceLock::new() }; FLUSH_THREADS];
    let runtime = RUNTIMES[i % FLUSH_THREADS]
        .get_or_init(|| crate::lake::changelog::one_worker_runtime("slotlake-flush"));
    runtime.as_ref().map_err(|e| RunError::CommitTask {
        message: format!("cannot start a flush thread: {e}"),
    })
}

/// Commits every table of `share`, [`COMMIT_CONCURRENCY`] at a time, retrying with backoff
/// while the sink fails (nothing is confirmed meanwhile; `retrying` is set). Rows lost with a
/// failed data file end it: only a restart from the slot's confirmed position brings them back.
async fn commit_share(
    mut todo: Vec<Outgoing>,
    metrics: &Metrics,
    mut cancel: tokio::sync::watch::Receiver<bool>,
    retrying: &std::sync::atomic::AtomicBool,
) -> Result<Vec<Outgoing>, RunError> {
    let cancelled = || RunError::CommitTask {
        message: "cancelled".into(),
    };
    let mut done = Vec::with_capacity(todo.len());
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = futures::stream::iter(todo.drain(..))
            .map(|mut o| async move {
                let r = o.commit(metrics).await;
                (o, r)
            })
            .buffer_unordered(COMMIT_CONCURRENCY)
            .collect::<Vec<_>>();
        let results = tokio::select! {
            r = attempt => r,
            _ = cancel.wait_for(|c| *c) => return Err(cancelled()),
        };
        let mut failure = None;
        for (o, r) in results {
            match r {
                Ok(()) => done.push(o),
                // A commit that failed with its log open and its rows in the writer is tried
                // again; the rest (a failed open, which retried already, rows lost with a
                // failed data file) ends the run's attempt.
                Err(RunError::Lake(e))
                    if !e.lost_buffered_rows() && matches!(o.log, LogSlot::Open(_)) =>
                {
                    todo.push(o);
                    failure.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        let Some(e) = failure else {
            return Ok(done);
        };
        metrics.retries.with_label_values(&["commit"]).inc();
        retrying.store(true, Ordering::Relaxed);
        tracing::warn!(error = %error_chain(&e), retry_in = ?backoff, "commit to the lake failed; nothing confirmed, retrying");
        tokio::select! {
            _ = tokio::time::sleep(jitter(backoff)) => {}
            _ = cancel.wait_for(|c| *c) => return Err(cancelled()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// ±25 % jitter so that many instances do not retry in lockstep.
pub fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.75 + (nanos % 1000) as f64 / 2000.0;
    d.mul_f64(factor)
}

/// An error and its causes on one line, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::PgType;

    #[test]
    fn replays_buffered_before_the_open_are_dropped_by_commit_lsn() {
        let mut b = ChangeBatchBuilder::new(vec![ColumnSpec {
            name: "id".into(),
            ty: PgType::Int4,
            is_key: true,
        }]);
        for lsn in [5, 10, 10, 15] {
            b.append_truncate(lsn, 0, 1, 0);
        }
        let batch = b.finish().unwrap();
        let kept = drop_replayed(batch.clone(), Lsn(10)).unwrap();
        let lsns = kept
            .column_by_name(crate::batch::rows::LSN)
            .unwrap()
            .as_any()
            .downcast_ref::<deltalake::arrow::array::Int64Array>()
            .unwrap()
            .values()
            .to_vec();
        assert_eq!(lsns, vec![15]);
        assert_eq!(drop_replayed(batch, Lsn(0)).unwrap().num_rows(), 4);
    }
}
