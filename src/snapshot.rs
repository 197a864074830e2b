//! The initial snapshot: rows that existed before the slot, written to the change logs as
//! `_op = 'R'` rows consistent with the slot's starting point.
//!
//! **Consistency.** A snapshot exported when a logical slot is created sees exactly the
//! transactions whose commit record precedes the slot's consistent point C; the slot streams
//! exactly the others. Snapshot rows get `_lsn = C − 1`, so in (`_lsn`, `_seq`) order they
//! come before every streamed change, and compaction treats them as inserts. Each table's rows
//! are committed in one change-log commit carrying the usual `txn` action with version C − 1.
//!
//! **Parallel.** `--snapshot-workers` connections import the snapshot (`SET TRANSACTION
//! SNAPSHOT`) and read chunks of `--snapshot-chunk-size` by ctid range (TID range scans on
//! PostgreSQL ≥ 14), so one large table keeps every worker busy; `_seq` is
//! `chunk << 32 | row`. Rows go through the same parsers and Arrow builders as streamed
//! changes; the change-log writers stage files early above `--memory-budget`.
//!
//! **Resumable, by chunk.** The chunks of a table commit one by one, in order, each with a
//! `txn` action counting the chunks committed (app id `slotlake-<slot>-load-<lsn>`); the last
//! one also carries the table's usual `txn` version C − 1, which marks the table loaded. The
//! plan (chunk size and count, the table's relfilenode and columns, the snapshot's oldest
//! running transaction id X) is written to `<sink>/_slotlake/snapshot/<slot>.json` before any
//! chunk commits. After a crash the exported snapshot is gone, so a restart reads from a new
//! one — a temporary slot's, at a later consistent point C2 — and:
//!
//! - a table loaded, or whose load had not committed a chunk, is skipped or loaded anew; a new
//!   load's rows get `_lsn = C2 − 1` and `txn` version C2 − 1, and streaming from the slot
//!   (still at C: it is never confirmed during the load) skips their changes up to C2 − 1,
//!   which the newer snapshot holds, through the rule that skips replays after a crash;
//! - a table with k of n chunks committed goes on at chunk k, with the same page ranges, rows
//!   still at `_lsn = C − 1`, so the stream replays every change of the table after C on top
//!   of them. Rows do not stay put between chunks, though: an update writes a new row version
//!   wherever there is room, so a row of an unread chunk can move into a committed one, and
//!   its update — which leaves unchanged TOASTed values out — would then refer to a row the
//!   lake never had. So the first resumed chunk also reads again every row below page
//!   `k × chunk` written by transaction X or later (their raw `xmin`, which survives
//!   freezing): the rows that may have moved in. Every key then has a row from the load, and
//!   the replayed changes bring it to its current state. A table rewritten since (new
//!   relfilenode) or whose columns changed is loaded anew instead.
//!
//! The rows a resumed table reads from the newer snapshot go in twice: at C − 1 with its
//! other chunks (its history starts where the load began), and as they were at C2, at C2 − 1
//! (see [`Restate`]): the replayed changes between C and C2 can refer to rows the lake never
//! had — an update leaving a TOASTed value out on a row of an unread chunk, a key given up by
//! one row and taken by another — and alone would leave such a value null or wrong. The copies
//! are staged, listed in the load record before the table's last chunk commits, and committed
//! by the stream once it reaches C2 (`crate::pipeline`), so that the change log's version
//! order stays its LSN order; compaction adds no version for a copy equal to its key's
//! version. The current tables are exact after a resumed load, and the history from C2 on.
//! Between C and C2 the history of a resumed table is approximate: rows read at C2 stand in
//! for the table as of C, whose snapshot is gone.
//!
//! A load retried in the same process (the sink failed for a while) keeps its snapshot as long
//! as the session that exported it lives (for 15 minutes of failures at most: that session
//! holds back vacuum): it goes on at each table's first unfinished chunk with nothing read
//! again, exactly as if it had not stopped. A table rewritten since (a new relfilenode: an
//! old snapshot reads it as empty) fails the attempt with [`TableRewritten`], and the next one
//! takes a new snapshot.
//!
//! Compaction leaves the chunks of an unfinished load alone, so a current table is never
//! published half loaded. Each worker locks a table before its first chunk (the lock reading
//! takes anyway, held to the end of the load) and fails the load if the table was rewritten
//! since the plan; the next attempt then re-reads it in full.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::batch::rows::changelog_schema;
use crate::lake::changelog::{app_id, ChangeLogTable};
use crate::lake::store::Sink;
use crate::lsn::Lsn;
use crate::replication::sql::{quote_ident, quote_literal, TableName};
use crate::replication::{ConnInfo, PgConnection, SessionKind};
use crate::source::{Cursor, RowStamp, SourceTable};
use crate::types::catalog::TypeCatalog;

/// Snapshot settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub slot: String,
    pub publication: String,
    pub workers: usize,
    /// Bytes of table (heap pages) per chunk.
    pub chunk_bytes: u64,
    pub target_file_size: u64,
    pub memory_budget: u64,
    /// Only these tables (a backfill); all published ones when `None`.
    pub only: Option<Vec<TableName>>,
}

/// A snapshot to load from: its name (for `SET TRANSACTION SNAPSHOT`) and the consistent point
/// of the slot that exported it.
#[derive(Debug, Clone)]
pub struct ExportedSnapshot {
    pub name: String,
    pub point: Lsn,
}

/// The record of a slot's initial load, kept in the lake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadRecord {
    /// The slot's consistent point when the load started.
    pub consistent_point: String,
    /// `loading` or `done`.
    pub state: String,
    /// The tables loaded (`schema.table`); a published table not listed joined the
    /// publication later and is backfilled.
    #[serde(default)]
    pub tables: Vec<String>,
    /// While `loading`: how each table being loaded was split, by `schema.table`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plans: BTreeMap<String, ChunkPlan>,
    /// Copies of rows a resumed load read from a newer snapshot, by `schema.table`: staged
    /// in the change log, committed by the stream once it reaches their snapshot's point.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub restates: BTreeMap<String, Restate>,
}

/// Rows of a table that a load resumed from a newer snapshot (consistent point C2) read, as
/// they were at C2: the files a second writer staged (never committed by the load) with the
/// rows at `_lsn = C2 − 1`. The rows went in at C − 1 as well (the table's load began at C),
/// below the changes between C and C2 that the stream replays — and those can refer to rows
/// the lake never had (a key moved with a TOASTed value left out, then reused). The stream
/// commits the copies after every change below C2 and before any at or after it, so the
/// change log's version order stays its LSN order, which compaction's steps follow; a copy
/// equal to its key's version then adds no version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Restate {
    /// C2 − 1.
    pub lsn: String,
    pub adds: Vec<deltalake::kernel::Add>,
}

/// The app id whose `txn` version (1) marks a table's copies at `lsn` committed.
pub fn restate_app(app: &str, lsn: Lsn) -> String {
    format!("{app}-restate-{lsn}")
}

/// How one table's load is split into chunks, kept in the load record so that an interrupted
/// load resumes with the same chunks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkPlan {
    /// `_lsn` of the table's rows, and the `txn` version its last chunk commits.
    pub lsn: String,
    pub pages_per_chunk: u64,
    pub chunks: u64,
    /// The table's relfilenode when planned. A rewrite (VACUUM FULL, CLUSTER, TRUNCATE, a
    /// rewriting ALTER TABLE) moves rows between pages: a changed one means a full re-load.
    pub filenode: String,
    /// The columns (names and types) when planned; a change means a full re-load.
    pub columns: String,
    /// The snapshot's oldest running transaction id (low 32 bits): rows written by it or any
    /// later transaction may have moved between chunks since.
    pub xmin: u32,
}

impl LoadRecord {
    /// A load about to start, before the slot (and so its consistent point) exists.
    pub fn pending() -> LoadRecord {
        LoadRecord {
            consistent_point: String::new(),
            state: "loading".into(),
            tables: Vec::new(),
            plans: BTreeMap::new(),
            restates: BTreeMap::new(),
        }
    }
}

fn record_path(sink: &Sink, slot: &str) -> Path {
    sink.table_path(&["_slotlake", "snapshot", &format!("{slot}.json")])
}

/// The slot's load record, if a load was ever started for it.
pub async fn read_record(sink: &Sink, slot: &str) -> anyhow::Result<Option<LoadRecord>> {
    match sink.root().get(&record_path(sink, slot)).await {
        Ok(r) => {
            let bytes = r.bytes().await.context("reading the snapshot record")?;
            Ok(Some(
                serde_json::from_slice(&bytes).context("the snapshot record is not valid JSON")?,
            ))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e).context("reading the snapshot record"),
    }
}

/// Changes the slot's load record, if there is one, under a lock: while streaming, `run`
/// updates it from two tasks (a backfill adds its tables, the stream drops copies it
/// committed), each a read-modify-write without a condition (`file://` has none).
pub async fn update_record(
    sink: &Sink,
    slot: &str,
    change: impl FnOnce(&mut LoadRecord),
) -> anyhow::Result<()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _held = LOCK.lock().await;
    let Some(mut record) = read_record(sink, slot).await? else {
        return Ok(());
    };
    change(&mut record);
    write_record(sink, slot, &record).await
}

pub async fn write_record(sink: &Sink, slot: &str, record: &LoadRecord) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(record)?;
    sink.root()
        .put(&record_path(sink, slot), PutPayload::from(bytes))
        .await
        .context("writing the snapshot record")?;
    Ok(())
}

/// Where `slotlake snapshot --table` leaves re-load requests for the slot's `run`, one file
/// each: `run` is the record's only writer, so a request cannot be lost to a concurrent
/// rewrite of the record (read-modify-write without a condition: `file://` has none; `run`'s
/// own tasks go through [`update_record`]).
fn requests_path(sink: &Sink, slot: &str) -> Path {
    sink.table_path(&["_slotlake", "snapshot", &format!("{slot}.requests")])
}

/// A request to re-load tables, as `slotlake snapshot` leaves it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadRequest {
    pub tables: Vec<String>,
}

/// Leaves a request to re-load `tables` for the slot's `run`.
pub async fn request_reload(sink: &Sink, slot: &str, tables: &[TableName]) -> anyhow::Result<()> {
    let request = ReloadRequest {
        tables: tables.iter().map(|t| t.to_string()).collect(),
    };
    let name = format!(
        "{}-{}.json",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        uuid::Uuid::new_v4()
    );
    sink.root()
        .put(
            &requests_path(sink, slot).join(name.as_str()),
            PutPayload::from(serde_json::to_vec(&request)?),
        )
        .await
        .context("writing the re-load request")?;
    Ok(())
}

/// The re-load requests waiting for the slot's `run`: their paths and the tables they name.
pub async fn pending_requests(sink: &Sink, slot: &str) -> anyhow::Result<Vec<(Path, Vec<String>)>> {
    use futures::TryStreamExt;
    let listed: Vec<_> = sink
        .root()
        .list(Some(&requests_path(sink, slot)))
        .try_collect()
        .await
        .context("listing re-load requests")?;
    let mut requests = Vec::new();
    for meta in listed {
        let bytes = match sink.root().get(&meta.location).await {
            Ok(got) => got.bytes().await.context("reading a re-load request")?,
            // Carried out meanwhile.
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e).context("reading a re-load request"),
        };
        // Something else in the directory must not block every later backfill.
        match serde_json::from_slice::<ReloadRequest>(&bytes) {
            Ok(request) => requests.push((meta.location, request.tables)),
            Err(_) => {
                tracing::warn!(object = %meta.location, "ignoring an object that is not a re-load request");
            }
        }
    }
    Ok(requests)
}

/// Removes requests that have been carried out.
pub async fn clear_requests(sink: &Sink, paths: &[Path]) -> anyhow::Result<()> {
    for p in paths {
        match sink.root().delete(p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e).context("removing a carried-out re-load request"),
        }
    }
    Ok(())
}

/// A table was rewritten (VACUUM FULL, CLUSTER, TRUNCATE, a rewriting ALTER TABLE) after its
/// chunks were planned: the load must be planned again.
#[derive(Debug, thiserror::Error)]
#[error("{0} was rewritten (VACUUM FULL, CLUSTER, TRUNCATE or a rewriting ALTER TABLE) since its load was planned; the next attempt loads it again")]
pub struct TableRewritten(pub TableName);

/// Whether a failed load may succeed when tried again from where it stopped: the sink or the
/// source unreachable for a while, a table rewritten under it. Not: missing privileges (on
/// the source or the sink), a value that cannot be read, a publication that is gone.
pub fn retryable(e: &anyhow::Error) -> bool {
    use crate::lake::changelog::LakeError;
    use crate::replication::slot::SlotError;
    use crate::replication::ClientError;
    let definite_store = |e: &object_store::Error| {
        matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
                | object_store::Error::NotImplemented { .. }
                | object_store::Error::InvalidPath { .. }
        )
    };
    if e.chain().any(|c| {
        c.downcast_ref::<object_store::Error>()
            .is_some_and(definite_store)
            || c.is::<crate::lake::store::SinkError>()
            || matches!(
                c.downcast_ref::<LakeError>(),
                Some(LakeError::LsnOutOfRange { .. })
            )
    }) {
        return false;
    }
    e.chain().any(|c| {
        c.is::<TableRewritten>()
            || c.is::<SnapshotGone>()
            || c.is::<LakeError>()
            || c.is::<object_store::Error>()
            || c.downcast_ref::<ClientError>()
                .is_some_and(|c| c.is_transient())
            || matches!(c.downcast_ref::<SlotError>(), Some(SlotError::Client(c)) if c.is_transient())
    })
}

/// What a load did.
#[derive(Debug, Default, Clone)]
pub struct LoadSummary {
    pub tables: usize,
    pub skipped: usize,
    /// Tables whose earlier contents (from a previous slot) the load replaced.
    pub replaced: usize,
    pub rows: u64,
    pub chunks: usize,
    /// Tables whose interrupted load went on from its first unfinished chunk, and the chunks
    /// they did not read again.
    pub resumed: usize,
    pub chunks_skipped: u64,
    /// Every table the load covered (loaded, replaced or already there).
    pub covered: Vec<TableName>,
}

struct Chunk {
    table: usize,
    index: u64,
    /// ctid page range [lo, hi); `None`: to the end.
    lo: u64,
    hi: Option<u64>,
    /// Pages the range held when the load was planned (for progress).
    pages: u64,
    /// `_lsn` of its rows.
    lsn: Lsn,
    /// The first chunk of a resumed load also reads again the rows below this page that
    /// transactions from `xmin` on wrote.
    rescan_below: Option<u64>,
    xmin: u32,
    /// The table's relfilenode in the plan: the chunks' page ranges hold for it only.
    filenode: String,
}

enum Msg {
    Rows(usize, u64, deltalake::arrow::array::RecordBatch),
    /// A chunk of a table is read (its pages).
    ChunkDone(usize, u64, u64),
}

/// `_seq` of rows read again by a resumed load: above every chunk's own rows.
const RESCAN_SEQ: i64 = 1 << 62;

/// The app id whose `txn` version counts the chunks of a table's load (rows at `lsn`)
/// committed so far.
fn progress_app(app: &str, lsn: Lsn) -> String {
    format!("{app}-load-{lsn}")
}

/// One table being loaded.
struct TableLoad {
    source: SourceTable,
    /// `_lsn` of its rows, and the `txn` version its last commit carries.
    lsn: Lsn,
    /// Chunks commit one by one, in order, counted by this app id's `txn` version; `None`:
    /// the whole table commits once (a backfill, whose stream hand-off needs one commit).
    progress: Option<String>,
    /// The chunks this load reads: [first, end).
    first: u64,
    end: u64,
    /// The next chunk to commit.
    next: u64,
    /// Open writers by chunk (only `first`'s when the table commits once).
    writers: BTreeMap<u64, ChangeLogTable>,
    /// A table resumed from a newer snapshot: its rows' copies at this `_lsn` (see
    /// [`Restate`]), and their writer.
    restate: Option<Lsn>,
    copies: Option<ChangeLogTable>,
    /// Chunks read but not committed.
    read: BTreeSet<u64>,
    rows: u64,
    files: u64,
    bytes: u64,
}

impl TableLoad {
    /// The writer of chunk `index`'s rows, opened on first use.
    async fn writer(
        &mut self,
        index: u64,
        sink: &Sink,
        app: &str,
        target_file_size: u64,
    ) -> anyhow::Result<&mut ChangeLogTable> {
        let key = if self.progress.is_some() {
            index
        } else {
            self.first
        };
        if !self.writers.contains_key(&key) {
            let log = bulk_writer(&self.source, sink, app, target_file_size).await?;
            self.writers.insert(key, log);
        }
        self.writers
            .get_mut(&key)
            .context("a chunk writer vanished")
    }

    /// The writer of the copies of its rows (see [`Restate`]), opened on first use.
    async fn copies(
        &mut self,
        sink: &Sink,
        app: &str,
        target_file_size: u64,
    ) -> anyhow::Result<&mut ChangeLogTable> {
        if self.copies.is_none() {
            self.copies = Some(bulk_writer(&self.source, sink, app, target_file_size).await?);
        }
        self.copies.as_mut().context("the copies' writer vanished")
    }

    /// Whether reading chunk `index` lets the table's last chunk commit.
    fn completes(&self, index: u64) -> bool {
        (self.next..self.end).all(|c| c == index || self.read.contains(&c))
    }

    /// Chunk `index` is read: commits what can be committed. True when the table is done.
    async fn chunk_read(
        &mut self,
        index: u64,
        sink: &Sink,
        app: &str,
        target_file_size: u64,
    ) -> anyhow::Result<bool> {
        self.read.insert(index);
        let Some(progress) = self.progress.clone() else {
            if self.read.len() as u64 != self.end - self.first {
                return Ok(false);
            }
            let lsn = self.lsn;
            let (files, bytes) = self
                .writer(self.first, sink, app, target_file_size)
                .await?
                .commit(lsn)
                .await?;
            (self.files, self.bytes) = (files, bytes);
            self.writers.clear();
            return Ok(true);
        };
        while self.read.remove(&self.next) {
            let (next, end, lsn) = (self.next, self.end, self.lsn);
            let done = (next + 1 == end).then_some(lsn);
            let (files, bytes) = self
                .writer(next, sink, app, target_file_size)
                .await?
                .commit_progress(&progress, (next + 1) as i64, done)
                .await?;
            self.files += files;
            self.bytes += bytes;
            self.writers.remove(&next);
            self.next += 1;
        }
        Ok(self.next == self.end)
    }
}

/// Progress of a load, by heap pages read of those planned: log lines every 10 s (rows,
/// percent, rate, ETA) and, when stdout is a terminal, a progress bar.
struct Progress {
    started: Instant,
    total_pages: u64,
    done_pages: u64,
    last_log: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(total_pages: u64) -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total_pages.max(1)),
                indicatif::ProgressDrawTarget::stdout(),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "initial snapshot {bar:40} {percent:>3}% {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Progress {
            started: Instant::now(),
            total_pages,
            done_pages: 0,
            last_log: Instant::now(),
            bar,
        }
    }

    fn percent(&self) -> u64 {
        (self.done_pages * 100)
            .checked_div(self.total_pages)
            .unwrap_or(100)
            .min(100)
    }

    /// Seconds left at the rate so far, once something is done.
    fn eta_secs(&self) -> Option<u64> {
        let left = self.total_pages.saturating_sub(self.done_pages);
        let elapsed = self.started.elapsed().as_secs_f64();
        (self.done_pages > 0).then(|| (elapsed * left as f64 / self.done_pages as f64) as u64)
    }

    fn rows_per_s(&self, rows: u64) -> u64 {
        (rows as f64 / self.started.elapsed().as_secs_f64().max(0.001)) as u64
    }

    fn rows(&mut self, rows: u64, tables_left: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{rows} rows, {}/s", self.rows_per_s(rows)));
        }
        if self.last_log.elapsed() >= Duration::from_secs(10) {
            self.last_log = Instant::now();
            tracing::info!(
                rows,
                percent = self.percent(),
                rows_per_s = self.rows_per_s(rows),
                eta_s = self.eta_secs(),
                tables_remaining = tables_left,
                "initial snapshot: progress"
            );
        }
    }

    fn chunk_done(&mut self, pages: u64) {
        self.done_pages += pages;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done_pages);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Loads every published table whose change log does not hold it yet, from `snapshot`.
/// `since` is C − 1 for the slot's start C: a change log committed at or past it already holds
/// this slot's load; one committed before it holds an earlier slot's data (the slot was
/// re-created, e.g. after it was invalidated) and is replaced — a truncate row (`_seq` −1, so
/// before the snapshot's rows) precedes the rows, and compaction empties the table first.
///
/// With `record` (a slot's initial load), chunks commit as they are read and the plan is kept
/// in the record, so that a load interrupted by a crash goes on from each table's first
/// unfinished chunk (see the module documentation); without (a backfill), each table commits
/// once.
pub async fn load(
    info: &ConnInfo,
    sink: &Sink,
    snapshot: &ExportedSnapshot,
    opts: &LoadOptions,
    since: Lsn,
    metrics: &crate::metrics::Metrics,
    mut record: Option<&mut LoadRecord>,
) -> anyhow::Result<LoadSummary> {
    let started = Instant::now();
    let lsn = Lsn(snapshot.point.0.saturating_sub(1));
    let stamp_ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let app = app_id(&opts.slot);

    // Tables and their chunks, read in the snapshot (the catalog as of the snapshot).
    let mut sql = PgConnection::connect(info, SessionKind::Sql).await?;
    import(&mut sql, &snapshot.name).await?;
    let mut names = crate::source::published_tables(&mut sql, &opts.publication).await?;
    let block = block_size(&mut sql).await?;
    let xmin = snapshot_xmin(&mut sql).await?;
    if let Some(only) = &opts.only {
        names.retain(|n| only.contains(n));
    }
    let mut catalog = TypeCatalog::new();
    let mut catalog_conn = None;
    let mut tables: Vec<TableLoad> = Vec::new();
    let mut summary = LoadSummary::default();
    let mut chunks: VecDeque<Chunk> = VecDeque::new();
    let mut plans = BTreeMap::new();
    let mut anew = Vec::new();
    let mut summary_pages = 0u64;
    for name in &names {
        let table = crate::source::describe(
            &mut sql,
            &mut catalog,
            &mut catalog_conn,
            info,
            name,
            &opts.publication,
        )
        .await?;
        let schema = changelog_schema(&table.specs);
        // An interrupted load's plan, and how many of its chunks the change log holds.
        let earlier = record.as_ref().and_then(|r| r.plans.get(&name.to_string()));
        let earlier_lsn = earlier.and_then(|p| p.lsn.parse::<Lsn>().ok());
        let earlier_app = earlier_lsn.map(|l| progress_app(&app, l));
        let (log, done) = ChangeLogTable::open_reading(
            sink,
            name,
            &app,
            &schema,
            opts.target_file_size,
            earlier_app.as_deref(),
        )
        .await
        .with_context(|| format!("opening the change log of {name}"))?;
        let committed = log.committed_lsn();
        if committed.is_some_and(|c| c >= since) {
            summary.skipped += 1;
            continue;
        }
        let mut log = log.for_bulk_load()?;
        let (bytes, filenode) = relation_layout(&mut sql, name).await?;
        let pages = bytes / block;
        let columns = column_signature(&table);
        // An attempt retried in the snapshot that planned the table: if a TRUNCATE or a
        // rewriting ALTER TABLE gave it a new relfilenode since, this snapshot reads it as
        // empty (those are not MVCC-safe); only a newer snapshot has its rows.
        if earlier.is_some_and(|p| p.filenode != filenode) && earlier_lsn == Some(lsn) {
            return Err(TableRewritten(name.clone()).into());
        }
        // An interrupted load of this table goes on if its rows cannot have moved otherwise
        // than by transactions (no rewrite) and its columns are the same.
        let done = done.unwrap_or(0).max(0) as u64;
        let resume = match (earlier, earlier_lsn) {
            (Some(plan), Some(plan_lsn))
                if plan.filenode == filenode
                    && plan.columns == columns
                    && done > 0
                    && done < plan.chunks =>
            {
                Some((plan.clone(), plan_lsn, done))
            }
            _ => None,
        };
        let (plan, table_lsn, first) = match resume {
            Some((plan, plan_lsn, done)) => {
                tracing::info!(
                    table = %name,
                    chunks_done = done,
                    chunks = plan.chunks,
                    same_snapshot = plan_lsn == lsn,
                    "initial snapshot: resuming a table from its first unfinished chunk"
                );
                summary.resumed += 1;
                summary.chunks_skipped += done;
                (plan, plan_lsn, done)
            }
            None => {
                // Copies a crashed attempt left for this table are older than its new load.
                anew.push(name.to_string());
                // Data from before this slot's start (any app id: also another slot's), or
                // chunks of an interrupted load that cannot go on, is replaced.
                if committed.is_some() || log.version() > 0 {
                    let mut truncate =
                        crate::batch::rows::ChangeBatchBuilder::new(table.specs.clone());
                    truncate.append_truncate(lsn.0 as i64, -1, 0, stamp_ts);
                    log.write(truncate.finish()?).await?;
                    summary.replaced += 1;
                }
                let per_chunk = (opts.chunk_bytes / block).max(1);
                let plan = ChunkPlan {
                    lsn: lsn.to_string(),
                    pages_per_chunk: per_chunk,
                    chunks: pages.div_ceil(per_chunk).max(1),
                    filenode,
                    columns,
                    xmin,
                };
                (plan, lsn, 0)
            }
        };
        let t = tables.len();
        for index in first..plan.chunks {
            let lo = index * plan.pages_per_chunk;
            let hi = (index + 1 < plan.chunks).then_some(lo + plan.pages_per_chunk);
            // Rows move between pages only between snapshots: a load going on in the snapshot
            // that planned it (an attempt retried in the same process) reads no row again.
            let rescan_below = (index == first && first > 0 && table_lsn != lsn).then_some(lo);
            let chunk_pages = hi.unwrap_or(pages).saturating_sub(lo) + rescan_below.unwrap_or(0);
            summary_pages += chunk_pages;
            chunks.push_back(Chunk {
                table: t,
                index,
                lo,
                hi,
                pages: chunk_pages,
                lsn: table_lsn,
                rescan_below,
                xmin: plan.xmin,
                filenode: plan.filenode.clone(),
            });
        }
        tables.push(TableLoad {
            source: table,
            lsn: table_lsn,
            progress: record.is_some().then(|| progress_app(&app, table_lsn)),
            restate: (record.is_some() && table_lsn != lsn).then_some(lsn),
            copies: None,
            first,
            end: plan.chunks,
            next: first,
            writers: BTreeMap::from([(first, log)]),
            read: BTreeSet::new(),
            rows: 0,
            files: 0,
            bytes: 0,
        });
        plans.insert(name.to_string(), plan);
    }
    if let Some(c) = catalog_conn.take() {
        c.close().await;
    }
    let _ = sql.simple_query("COMMIT").await;
    sql.close().await;
    if let Some(record) = record.as_deref_mut() {
        // Before any chunk commits: a restart finds the plan its chunks were committed by.
        record.plans = plans;
        for name in &anew {
            record.restates.remove(name);
        }
        write_record(sink, &opts.slot, record).await?;
    }
    summary.tables = tables.len();
    summary.chunks = chunks.len();
    summary.covered = names.clone();
    metrics.snapshot_tables_remaining.set(tables.len() as i64);
    tracing::info!(
        tables = tables.len(),
        chunks = chunks.len(),
        skipped = summary.skipped,
        replaced = summary.replaced,
        resumed = summary.resumed,
        chunks_skipped = summary.chunks_skipped,
        workers = opts.workers,
        snapshot_lsn = %lsn,
        "initial snapshot: loading"
    );

    // Workers read chunks; this task writes and commits.
    let queue = Arc::new(std::sync::Mutex::new(chunks));
    let specs: Arc<Vec<SourceTable>> = Arc::new(tables.iter().map(|t| t.source.clone()).collect());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Msg>>(8);
    // Workers parse rows on a runtime of their own, so that parsing (on up to two threads)
    // overlaps the Parquet encoding this task does.
    let worker_runtime = RuntimeGuard(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.workers.clamp(1, 2))
            .thread_name("slotlake-snapshot")
            .enable_all()
            .build()
            .context("starting the snapshot workers")?,
    ));
    let mut workers = Vec::new();
    for _ in 0..opts.workers.max(1) {
        let (queue, specs, tx, info, name) = (
            queue.clone(),
            specs.clone(),
            tx.clone(),
            info.clone(),
            snapshot.name.clone(),
        );
        workers.push(worker_runtime.handle().spawn(async move {
            let result = worker(&info, &name, &queue, &specs, stamp_ts, &tx).await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        }));
    }
    drop(tx);
    let mut tables_left = tables.len();
    let mut progress = Progress::new(summary_pages);
    while let Some(msg) = rx.recv().await {
        match msg? {
            Msg::Rows(t, index, batch) => {
                let rows = batch.num_rows() as u64;
                if let Some(at) = tables[t].restate {
                    let copy = restamped(&batch, at)?;
                    let copies = tables[t].copies(sink, &app, opts.target_file_size).await?;
                    copies.write(copy).await?;
                }
                tables[t]
                    .writer(index, sink, &app, opts.target_file_size)
                    .await?
                    .write(batch)
                    .await?;
                tables[t].rows += rows;
                summary.rows += rows;
                metrics.snapshot_rows.inc_by(rows);
                let buffered: usize = tables
                    .iter()
                    .flat_map(|t| t.writers.values().chain(&t.copies))
                    .map(|w| w.buffered_bytes())
                    .sum();
                if buffered as u64 > opts.memory_budget {
                    let writers = tables
                        .iter_mut()
                        .flat_map(|t| t.writers.values_mut().chain(&mut t.copies));
                    if let Some(big) = writers.max_by_key(|w| w.buffered_bytes()) {
                        big.stage().await?;
                    }
                }
                progress.rows(summary.rows, tables_left);
            }
            Msg::ChunkDone(t, index, pages) => {
                progress.chunk_done(pages);
                let table = &mut tables[t];
                if let (Some(at), Some(record)) = (table.restate, record.as_deref_mut()) {
                    if table.completes(index) {
                        // Recorded before the commit that marks the table loaded: after a
                        // crash, the copies are known or the table is resumed again.
                        let adds = match table.copies.as_mut() {
                            Some(copies) => copies.take_staged().await?,
                            None => Vec::new(),
                        };
                        let restate = Restate {
                            lsn: at.to_string(),
                            adds,
                        };
                        record
                            .restates
                            .insert(table.source.name.to_string(), restate);
                        write_record(sink, &opts.slot, record).await?;
                    }
                }
                if table
                    .chunk_read(index, sink, &app, opts.target_file_size)
                    .await?
                {
                    tables_left -= 1;
                    metrics.snapshot_tables_remaining.set(tables_left as i64);
                    tracing::info!(
                        table = %table.source.name,
                        rows = table.rows,
                        files = table.files,
                        bytes = table.bytes,
                        tables_remaining = tables_left,
                        percent = progress.percent(),
                        eta_s = progress.eta_secs(),
                        "initial snapshot: table loaded"
                    );
                }
            }
        }
    }
    for w in workers {
        w.await.context("snapshot worker")?;
    }
    drop(worker_runtime);
    anyhow::ensure!(
        tables_left == 0,
        "the initial snapshot ended with {tables_left} table(s) unfinished"
    );
    let secs = started.elapsed().as_secs_f64().max(0.001);
    tracing::info!(
        tables = summary.tables,
        rows = summary.rows,
        rows_per_s = (summary.rows as f64 / secs) as u64,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "initial snapshot: done"
    );
    Ok(summary)
}

/// Opens a repeatable-read transaction on `snapshot`.
async fn import(conn: &mut PgConnection, snapshot: &str) -> anyhow::Result<()> {
    use crate::replication::ClientError;
    conn.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let imported = conn
        .simple_query(&format!(
            "SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await;
    match imported {
        Ok(_) => Ok(()),
        // 22023: invalid snapshot identifier (its session is gone); 55000: its session ended
        // while this import was under way.
        Err(ClientError::Server(e)) if matches!(e.code.as_str(), "22023" | "55000") => {
            Err(SnapshotGone.into())
        }
        Err(e) => Err(anyhow::Error::new(e).context("importing the exported snapshot")),
    }
}

/// The exported snapshot can no longer be imported: the session that exported it has ended
/// (the source restarted, the connection broke). A load can go on from a newer one.
#[derive(Debug, thiserror::Error)]
#[error("the exported snapshot is gone (the session that exported it has ended)")]
pub struct SnapshotGone;

/// The value in column `v` of the first row `sql` returns.
async fn scalar(conn: &mut PgConnection, sql: &str) -> anyhow::Result<String> {
    let rows = conn.simple_query(sql).await?;
    rows.first()
        .and_then(|r| r.get("v"))
        .map(str::to_string)
        .with_context(|| format!("no value from {sql}"))
}

/// A table's heap size in bytes and its relfilenode (`0` for a partitioned table, which has
/// neither), in one query.
async fn relation_layout(
    conn: &mut PgConnection,
    table: &TableName,
) -> anyhow::Result<(u64, String)> {
    let both = scalar(
        conn,
        &format!(
            "SELECT pg_relation_size(r) || ' ' || coalesce(pg_relation_filenode(r), 0) AS v
               FROM (SELECT {}::regclass AS r) t",
            quote_literal(&table.quoted())
        ),
    )
    .await?;
    let (bytes, filenode) = both.split_once(' ').context("no relation size")?;
    Ok((bytes.parse().unwrap_or(0), filenode.to_string()))
}

/// The low 32 bits of the oldest transaction id running in the current snapshot: a row whose
/// `xmin` is older was written before the snapshot and is in it.
async fn snapshot_xmin(conn: &mut PgConnection) -> anyhow::Result<u32> {
    let sql = "SELECT txid_snapshot_xmin(txid_current_snapshot()) % 4294967296 AS v";
    scalar(conn, sql).await?.parse().context("no snapshot xmin")
}

/// Names and types of the columns and the row filter, to tell whether what is published of a
/// table changed between two attempts.
fn column_signature(table: &SourceTable) -> String {
    let columns: Vec<String> = table
        .specs
        .iter()
        .map(|c| format!("{}:{:?}", c.name, c.ty))
        .collect();
    format!(
        "{} WHERE {}",
        columns.join(","),
        table.row_filter.as_deref().unwrap_or("true")
    )
}

/// An SQL condition true for rows written by transaction `xmin` or later ones (the raw
/// `xmin` stays on a frozen row, and compares modulo 2³²). Rows frozen since before the
/// 9.4 format keep `xmin` 2 and are old; an old row whose id compares as later only costs a
/// row read twice.
fn written_since(xmin: u32) -> String {
    format!(
        "xmin::text::bigint >= 3 AND (xmin::text::bigint - {xmin} + 4294967296) % 4294967296 < 2147483648"
    )
}

async fn block_size(conn: &mut PgConnection) -> anyhow::Result<u64> {
    let size = scalar(conn, "SELECT current_setting('block_size') AS v").await?;
    Ok(size.parse().unwrap_or(8192))
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    info: &ConnInfo,
    snapshot: &str,
    queue: &std::sync::Mutex<VecDeque<Chunk>>,
    tables: &[SourceTable],
    stamp_ts: i64,
    tx: &tokio::sync::mpsc::Sender<anyhow::Result<Msg>>,
) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(info, SessionKind::Sql).await?;
    import(&mut conn, snapshot).await?;
    let mut locked = std::collections::HashSet::new();
    loop {
        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
        let Some(chunk) = next else { break };
        let table = &tables[chunk.table];
        if locked.insert(chunk.table) {
            // The lock reading takes anyway, until the load ends (a query, not LOCK TABLE,
            // which would need SELECT on the whole table, not just the published columns):
            // taken first, it lets us check that no rewrite moved the rows since the chunks
            // were planned, and keeps one from doing so until the load ends.
            conn.simple_query(&format!("SELECT FROM {} LIMIT 0", table.name.quoted()))
                .await?;
            if relation_layout(&mut conn, &table.name).await?.1 != chunk.filenode {
                return Err(TableRewritten(table.name.clone()).into());
            }
        }
        let range = match chunk.hi {
            Some(hi) => format!("ctid >= '({},0)'::tid AND ctid < '({hi},0)'::tid", chunk.lo),
            None => format!("ctid >= '({},0)'::tid", chunk.lo),
        };
        let mut reads = vec![(range, (chunk.index as i64) << 32)];
        if let Some(below) = chunk.rescan_below {
            let again = format!(
                "ctid < '({below},0)'::tid AND {}",
                written_since(chunk.xmin)
            );
            reads.insert(0, (again, RESCAN_SEQ | ((chunk.index as i64) << 32)));
        }
        for (filter, first_seq) in reads {
            let stamp = RowStamp {
                lsn: chunk.lsn.0 as i64,
                first_seq,
                commit_ts_micros: stamp_ts,
            };
            let mut cursor = Cursor::open(&mut conn, table, Some(&filter), stamp)
                .await
                .with_context(|| format!("reading {}", table.name))?;
            while let Some(batch) = cursor.next(&mut conn).await? {
                let rows = Msg::Rows(chunk.table, chunk.index, batch);
                if tx.send(Ok(rows)).await.is_err() {
                    return Ok(());
                }
            }
        }
        let done = Msg::ChunkDone(chunk.table, chunk.index, chunk.pages);
        if tx.send(Ok(done)).await.is_err() {
            return Ok(());
        }
    }
    let _ = conn.simple_query("COMMIT").await;
    conn.close().await;
    Ok(())
}

/// A writer of `table`'s change log for loaded rows.
async fn bulk_writer(
    table: &SourceTable,
    sink: &Sink,
    app: &str,
    target_file_size: u64,
) -> anyhow::Result<ChangeLogTable> {
    let schema = changelog_schema(&table.specs);
    ChangeLogTable::open(sink, &table.name, app, &schema, target_file_size)
        .await
        .and_then(ChangeLogTable::for_bulk_load)
        .with_context(|| format!("opening the change log of {}", table.name))
}

/// `batch` with every row's `_lsn` set to `lsn`.
fn restamped(
    batch: &deltalake::arrow::array::RecordBatch,
    lsn: Lsn,
) -> anyhow::Result<deltalake::arrow::array::RecordBatch> {
    use deltalake::arrow::array::{ArrayRef, Int64Array};
    let index = batch
        .schema()
        .index_of(crate::batch::rows::LSN)
        .context("a loaded batch without _lsn")?;
    let mut columns = batch.columns().to_vec();
    columns[index] = Arc::new(Int64Array::from_value(lsn.0 as i64, batch.num_rows())) as ArrayRef;
    Ok(deltalake::arrow::array::RecordBatch::try_new(
        batch.schema(),
        columns,
    )?)
}

/// A temporary slot whose exported snapshot a load can use when the slot's own is gone (a
/// resumed load, or a load for a slot created elsewhere). The session must stay open and idle
/// while the snapshot is in use; closing it drops the slot.
pub async fn temporary_snapshot(
    info: &ConnInfo,
) -> anyhow::Result<(PgConnection, ExportedSnapshot)> {
    let mut repl = PgConnection::connect(info, SessionKind::Replication).await?;
    let name = format!("slotlake_load_{}", std::process::id());
    let rows = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(&name)
        ))
        .await
        .context("creating a temporary slot for a snapshot")?;
    let row = rows
        .first()
        .context("CREATE_REPLICATION_SLOT returned no row")?;
    let point: Lsn = row
        .get("consistent_point")
        .and_then(|v| v.parse().ok())
        .context("CREATE_REPLICATION_SLOT returned no consistent point")?;
    let snapshot = row
        .get("snapshot_name")
        .context("CREATE_REPLICATION_SLOT exported no snapshot")?
        .to_string();
    Ok((
        repl,
        ExportedSnapshot {
            name: snapshot,
            point,
        },
    ))
}

/// Shuts a runtime down without blocking when dropped (dropping a runtime inside another one's
/// task would panic), on every path out of `load`.
struct RuntimeGuard(Option<tokio::runtime::Runtime>);

impl RuntimeGuard {
    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
