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
//! **Resumable.** A table's load is one commit, so a crash leaves each table either loaded
//! (its change log has a `txn` version) or untouched. The load's progress is recorded in
//! `<sink>/_slotlake/snapshot/<slot>.json`; a restart finds it unfinished and loads the
//! remaining tables — the exported snapshot is gone by then, so from a new one: a temporary
//! slot's exported snapshot at a later consistent point C2. Those tables' rows get `_lsn =
//! C2 − 1` and their `txn` version C2 − 1, and streaming from the slot (still at C, it was never
//! confirmed during the load) then skips their changes up to C2 − 1 — exactly the changes the
//! newer snapshot already contains — through the same rule that skips replays after a crash.
//! Finished tables are never read again; an interrupted table is read again in full.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::batch::rows::{changelog_schema, OP_READ};
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoadRecord {
    /// The slot's consistent point when the load started.
    pub consistent_point: String,
    /// `loading` or `done`.
    pub state: String,
    /// The tables loaded (`schema.table`); a published table not listed joined the
    /// publication later and is backfilled.
    #[serde(default)]
    pub tables: Vec<String>,
}

impl LoadRecord {
    /// A load about to start, before the slot (and so its consistent point) exists.
    pub fn pending() -> LoadRecord {
        LoadRecord {
            consistent_point: String::new(),
            state: "loading".into(),
            tables: Vec::new(),
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

pub async fn write_record(sink: &Sink, slot: &str, record: &LoadRecord) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(record)?;
    sink.root()
        .put(&record_path(sink, slot), PutPayload::from(bytes))
        .await
        .context("writing the snapshot record")?;
    Ok(())
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
}

enum Msg {
    Rows(usize, deltalake::arrow::array::RecordBatch),
    /// A chunk of a table is read (its pages).
    ChunkDone(usize, u64),
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
pub async fn load(
    info: &ConnInfo,
    sink: &Sink,
    snapshot: &ExportedSnapshot,
    opts: &LoadOptions,
    since: Lsn,
    metrics: &crate::metrics::Metrics,
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
    if let Some(only) = &opts.only {
        names.retain(|n| only.contains(n));
    }
    let mut catalog = TypeCatalog::new();
    let mut catalog_conn = None;
    let mut tables: Vec<(SourceTable, ChangeLogTable)> = Vec::new();
    let mut summary = LoadSummary::default();
    let mut chunks: VecDeque<Chunk> = VecDeque::new();
    let mut remaining: Vec<u64> = Vec::new();
    let mut loaded_rows: Vec<u64> = Vec::new();
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
        let log = ChangeLogTable::open(sink, name, &app, &schema, opts.target_file_size)
            .await
            .with_context(|| format!("opening the change log of {name}"))?;
        let committed = log.committed_lsn();
        if committed.is_some_and(|c| c >= since) {
            summary.skipped += 1;
            continue;
        }
        let mut log = log;
        // Data from before this slot's start (any app id: also another slot's) is replaced.
        if committed.is_some() || log.version() > 0 {
            let mut truncate = crate::batch::rows::ChangeBatchBuilder::new(table.specs.clone());
            truncate.append_truncate(lsn.0 as i64, -1, 0, stamp_ts);
            log.write(truncate.finish()?).await?;
            summary.replaced += 1;
        }
        let pages = table_bytes(&mut sql, name).await? / block;
        summary_pages += pages;
        let per_chunk = (opts.chunk_bytes / block).max(1);
        let n = pages.div_ceil(per_chunk).max(1);
        let t = tables.len();
        for index in 0..n {
            let lo = index * per_chunk;
            let hi = (index + 1 < n).then_some(lo + per_chunk);
            chunks.push_back(Chunk {
                table: t,
                index,
                lo,
                hi,
                pages: hi.unwrap_or(pages).saturating_sub(lo),
            });
        }
        remaining.push(n);
        loaded_rows.push(0);
        tables.push((table, log));
    }
    if let Some(c) = catalog_conn.take() {
        c.close().await;
    }
    let _ = sql.simple_query("COMMIT").await;
    sql.close().await;
    summary.tables = tables.len();
    summary.chunks = chunks.len();
    summary.covered = names.clone();
    metrics.snapshot_tables_remaining.set(tables.len() as i64);
    if tables.is_empty() {
        return Ok(summary);
    }
    tracing::info!(
        tables = tables.len(),
        chunks = chunks.len(),
        skipped = summary.skipped,
        replaced = summary.replaced,
        workers = opts.workers,
        snapshot_lsn = %lsn,
        "initial snapshot: loading"
    );

    // Workers read chunks; this task writes and commits.
    let queue = Arc::new(std::sync::Mutex::new(chunks));
    let specs: Arc<Vec<SourceTable>> = Arc::new(tables.iter().map(|t| t.0.clone()).collect());
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
            let result = worker(&info, &name, &queue, &specs, lsn, stamp_ts, &tx).await;
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
            Msg::Rows(t, batch) => {
                let rows = batch.num_rows() as u64;
                tables[t].1.write(batch).await?;
                loaded_rows[t] += rows;
                summary.rows += rows;
                metrics.snapshot_rows.inc_by(rows);
                let buffered: usize = tables.iter().map(|t| t.1.buffered_bytes()).sum();
                if buffered as u64 > opts.memory_budget {
                    if let Some(big) = tables.iter_mut().max_by_key(|t| t.1.buffered_bytes()) {
                        big.1.stage().await?;
                    }
                }
                progress.rows(summary.rows, tables_left);
            }
            Msg::ChunkDone(t, pages) => {
                progress.chunk_done(pages);
                remaining[t] -= 1;
                if remaining[t] == 0 {
                    let (files, bytes) = tables[t].1.commit(lsn).await?;
                    tables_left -= 1;
                    metrics.snapshot_tables_remaining.set(tables_left as i64);
                    tracing::info!(
                        table = %tables[t].0.name,
                        rows = loaded_rows[t],
                        files,
                        bytes,
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
    conn.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    conn.simple_query(&format!(
        "SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    ))
    .await
    .context("importing the exported snapshot (is the session that exported it still open?)")?;
    Ok(())
}

async fn table_bytes(conn: &mut PgConnection, table: &TableName) -> anyhow::Result<u64> {
    let rows = conn
        .simple_query(&format!(
            "SELECT pg_relation_size({}::regclass) AS bytes",
            quote_literal(&table.quoted())
        ))
        .await?;
    let bytes: u64 = rows
        .first()
        .and_then(|r| r.get("bytes"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(bytes)
}

async fn block_size(conn: &mut PgConnection) -> anyhow::Result<u64> {
    let rows = conn
        .simple_query("SELECT current_setting('block_size') AS b")
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.get("b"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(8192))
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    info: &ConnInfo,
    snapshot: &str,
    queue: &std::sync::Mutex<VecDeque<Chunk>>,
    tables: &[SourceTable],
    lsn: Lsn,
    stamp_ts: i64,
    tx: &tokio::sync::mpsc::Sender<anyhow::Result<Msg>>,
) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(info, SessionKind::Sql).await?;
    import(&mut conn, snapshot).await?;
    loop {
        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
        let Some(chunk) = next else { break };
        let table = &tables[chunk.table];
        let filter = match chunk.hi {
            Some(hi) => format!("ctid >= '({},0)'::tid AND ctid < '({hi},0)'::tid", chunk.lo),
            None => format!("ctid >= '({},0)'::tid", chunk.lo),
        };
        let stamp = RowStamp {
            op: OP_READ,
            lsn: lsn.0 as i64,
            first_seq: (chunk.index as i64) << 32,
            commit_ts_micros: stamp_ts,
        };
        let mut cursor = Cursor::open(&mut conn, table, Some(&filter), stamp)
            .await
            .with_context(|| format!("reading {}", table.name))?;
        while let Some(batch) = cursor.next(&mut conn).await? {
            if tx.send(Ok(Msg::Rows(chunk.table, batch))).await.is_err() {
                return Ok(());
            }
        }
        if tx
            .send(Ok(Msg::ChunkDone(chunk.table, chunk.pages)))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    let _ = conn.simple_query("COMMIT").await;
    conn.close().await;
    Ok(())
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
