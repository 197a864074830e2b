//! Compaction: each table's change log folded into a current-state table (SCD1) at
//! `<sink>/current/<schema>/<table>/` and a history table (SCD2) at
//! `<sink>/history/<schema>/<table>/`.
//!
//! **Incremental.** Both targets carry a Delta `txn` action (app id [`APP_ID`]) recording how
//! far compaction got: `next << 20 | files` — change-log versions before `next` are compacted,
//! and the first `files` data files of `next` (a commit too large for one step is compacted a
//! few files at a time). A run reads only what comes after, in steps that fit the memory
//! budget. A step's open versions are carried to the next step in memory while they fit (see
//! [`Carry`]); a commit writes them and commits the history table, then the current table, at
//! the end of the run and whenever the carried work reaches its bounds. A crash between the
//! two is repaired by the next run before anything else: the current table is a pure function
//! of the history table's open versions (each current file is derived from one open-history
//! file with the same id, and its deletion vector from that file's), so it is rebuilt from them.
//!
//! **Buckets.** Open versions are clustered by a hash of the key ([`fold::key_hash`]) into
//! buckets, each one file of the current table and one "open" file of the history table,
//! named after the hash range they hold (`b<lo>-<hi>-<id>.parquet`,
//! `open-<key signature>-<lo>-<hi>-<id>.parquet`). A step rewrites only the buckets its
//! changes touch; a bucket that grows past the bucket size splits in two. Versions closed by a
//! step are appended to the history table as `closed-<id>.parquet` and never rewritten. A small
//! table is one bucket: one file in each target. A truncate touches every bucket; a
//! key-changing update whose old and new keys hash to different buckets merges those two into
//! one unit of work (values of unchanged TOAST columns travel with the row).
//!
//! **Deletion vectors.** Tables compacted with [`CompactOptions::deletion_vectors`] get the
//! Delta `deletionVectors` feature (and keep it), and a bucket may hold several file pairs
//! (same range, own ids). A step *patches* a unit when it can: the open versions of the keys
//! its changes touch are marked deleted in their files' (inline, [`dv`]) vectors, the fold runs
//! on those versions alone, and its output is one new file pair per bucket. It rewrites the
//! unit into one pair per bucket instead on a truncate, on re-bucketing, when a bucket has
//! [`MAX_BUCKET_FILES`] pairs, or when the touched keys and the rows already marked are more
//! than 1 row in [`MARKED_DENOMINATOR`]. A current file holds its open file's live rows in
//! order, so its vector follows from the open file's ([`current_marks`]); the repair after a
//! crash rebuilds it the same way.
//!
//! **Order.** Within a step, changes are applied in (`_lsn`, `_seq`) order whatever the file
//! order; steps follow the change-log versions, which are in commit-LSN order.

pub mod dv;
pub mod fold;
mod maintain;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use deltalake::arrow::array::{new_null_array, ArrayRef, AsArray, RecordBatch};
use deltalake::arrow::compute::{cast, concat_batches};
use deltalake::arrow::datatypes::{Field, Schema, SchemaRef};
use deltalake::kernel::engine::arrow_conversion::{TryIntoArrow, TryIntoKernel};
use deltalake::kernel::transaction::CommitData;
use deltalake::kernel::{
    Action, Add, DeletionVectorDescriptor, Metadata, MetadataExt, Remove, StructType, Transaction,
};
use deltalake::logstore::{CommitOrBytes, LogStoreRef};
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::parquet::arrow::async_writer::AsyncArrowWriter;
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::DeltaTable;
use futures::StreamExt as _;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use uuid::Uuid;

use crate::batch::rows::{COMMIT_TS, LSN, OLD_PREFIX, OP, SEQ, UNCHANGED};
use crate::lake::changelog::writer_properties;
use crate::lake::store::{has_delta_log, Sink};
use crate::replication::sql::TableName;
use fold::{FoldError, KeyNames, Layout, OpenRows};

/// The `txn` app id compaction records in the current and history tables.
pub const APP_ID: &str = "slotlake-compact";

/// App id of the history table's second `txn` action, with `--tombstone-retention`: the
/// watermark of commit times compacted so far (see [`fold::Retire`]), in microseconds.
pub const CLOCK_APP_ID: &str = "slotlake-compact-clock";

/// Commits between Delta checkpoints of the compacted tables.
const CHECKPOINT_INTERVAL: u64 = 50;

/// Rows per batch when reading Parquet.
const READ_BATCH_ROWS: usize = 64 * 1024;
/// Change-log files a step reads ahead of the one it routes (each decoded on its own thread).
const READ_AHEAD_FILES: usize = 2;

/// The least retention with which vacuum takes a file that no log entry names for an orphan
/// (left by a crash between writing and committing) and deletes it: far longer than any
/// compaction step takes from writing its files to committing them.
const ORPHAN_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long checkpoints keep `remove` actions: Delta's default
/// `delta.deletedFileRetentionDuration`, which slotlake's tables keep. A replaced file whose
/// `remove` a checkpoint dropped looks like an orphan to a full vacuum.
const TOMBSTONE_RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Arrow bytes per byte of change-log Parquet, to size steps before reading them (measured on
/// the bench workload: zstd Parquet of integer and short text columns expands ~4×), unless
/// the file's writer recorded more ([`crate::lake::changelog::ARROW_BYTES_TAG`]).
const PARQUET_EXPANSION: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("compaction of {table}: {action} failed")]
    Failed {
        table: String,
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "compaction of {table}: {target} table changed underneath (another compactor?); retry"
    )]
    Conflict { table: String, target: &'static str },
    #[error("compaction of {table}: the change log at version {version} is not readable any more (vacuumed before it was compacted?)")]
    MissingCommit { table: String, version: u64 },
}

/// Compaction settings.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Memory for one step's changes and the buckets they touch.
    pub memory_budget: u64,
    /// Arrow bytes of open versions above which a bucket splits.
    pub bucket_bytes: u64,
    /// Files the current and history tables replaced are deleted this long after (Delta
    /// vacuum: readers of older versions keep working meanwhile); `None`: never.
    pub vacuum_retention: Option<std::time::Duration>,
    /// Compacted change-log files smaller than an eighth of this are merged into files of about this
    /// size (0: never).
    pub optimize_file_size: u64,
    /// Compacted change-log files written this long ago leave the change log; `None`: never.
    pub changes_retention: Option<std::time::Duration>,
    /// Threads that fold a step's changes.
    pub fold_threads: usize,
    /// Current and history tables get deletion vectors (new ones at creation, others with
    /// their next commit): a bucket with few changed keys gets a small file of their new
    /// versions and its old versions marked deleted, instead of being rewritten (see the
    /// module docs). A table that has them keeps them.
    pub deletion_vectors: bool,
    /// A committing run sweeps orphans (see [`compact_table`]) when its commits take the
    /// history table's version past a multiple of this: each sweep lists the tables'
    /// directories, which grow with every commit.
    pub orphan_sweep_versions: u64,
    /// Tables a pass compacts at the same time (see [`compact_all_again`]); they share
    /// `memory_budget`.
    pub tables_at_once: usize,
    /// Tombstones older than this (by commit time) leave the open versions (see
    /// [`fold::Retire`]); `None`: they stay until their key comes back.
    pub tombstone_retention: Option<std::time::Duration>,
}

impl CompactOptions {
    /// A fold's retirement (with a retention), by a step's watermarks.
    fn retire<'a>(&self, clocks: &'a fold::Watermarks) -> Option<fold::Retire<'a>> {
        self.tombstone_retention.map(|d| fold::Retire {
            after: i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            clocks,
        })
    }
}

/// One fold thread per core.
pub fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            memory_budget: 512 << 20,
            bucket_bytes: 128 << 20,
            vacuum_retention: Some(std::time::Duration::from_secs(7 * 24 * 3600)),
            optimize_file_size: 64 << 20,
            changes_retention: None,
            fold_threads: all_cores(),
            deletion_vectors: false,
            orphan_sweep_versions: ORPHAN_SWEEP_VERSIONS,
            tables_at_once: TABLES_AT_ONCE,
            tombstone_retention: None,
        }
    }
}

/// Default of [`CompactOptions::tables_at_once`]: most tables of a pass are small, and their
/// compaction waits on storage round trips far more than it computes.
pub const TABLES_AT_ONCE: usize = 8;

/// The memory budget of a pass (counted in MiB), shared by the tables it compacts at the same
/// time. A table takes its share before its first step (see [`step_share`]) and gives it
/// back when its steps are done; change-log merges take theirs apart. A share is at most the
/// whole budget, so a table that needs all of it runs alone. No task holds two shares at
/// once, so none waits for another while holding one. It also counts the tables a pass has
/// in hand (see [`MemoryShare::alone`]) and lets one fold at a time run off its task.
pub struct MemoryShare {
    permits: tokio::sync::Semaphore,
    total: u32,
    tables: std::sync::atomic::AtomicUsize,
    /// One fold at a time off the pass's task (see `step`): each folds on every core.
    folds: tokio::sync::Semaphore,
}

/// A table compacting under a [`MemoryShare`], until dropped.
struct Compacting<'a>(&'a MemoryShare);

impl Drop for Compacting<'_> {
    fn drop(&mut self) {
        self.0
            .tables
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl MemoryShare {
    pub fn new(budget: u64) -> MemoryShare {
        let total = (budget >> 20).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        MemoryShare {
            permits: tokio::sync::Semaphore::new(total as usize),
            total,
            tables: std::sync::atomic::AtomicUsize::new(0),
            folds: tokio::sync::Semaphore::new(1),
        }
    }

    fn enter(&self) -> Compacting<'_> {
        self.tables
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Compacting(self)
    }

    /// Whether a pass has a single table in hand now: its folds may then run in the pass's
    /// task, which no other table's work shares.
    fn alone(&self) -> bool {
        self.tables.load(std::sync::atomic::Ordering::Relaxed) <= 1
    }

    /// `bytes` as a share: MiB, at least 1, at most all of the budget.
    fn mib(&self, bytes: u64) -> u32 {
        bytes.div_ceil(1 << 20).clamp(1, u64::from(self.total)) as u32
    }

    /// Waits for a share of `bytes` ([`MemoryShare::mib`]). (`None` only if the semaphore
    /// were closed, which it never is.)
    async fn take(&self, bytes: u64) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.permits.acquire_many(self.mib(bytes)).await.ok()
    }

    /// Whether `held` is a smaller share than `bytes` needs.
    fn short(&self, held: &tokio::sync::SemaphorePermit<'_>, bytes: u64) -> bool {
        held.num_permits() < self.mib(bytes) as usize
    }

    /// MiB of the budget not taken.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

/// What a table's steps may hold at once, for a step of `step` bytes of changes: twice that (a
/// step reads at most half the budget; versions carried from step to step take as much
/// again) and the open versions of its buckets (about four times the current table's Parquet
/// bytes). At most the whole budget is taken ([`MemoryShare::mib`]); a few changes to a small
/// table take little.
fn step_share(step: u64, current_bytes: u64) -> u64 {
    step.saturating_mul(2)
        .saturating_add(current_bytes.saturating_mul(PARQUET_EXPANSION))
}

/// Default of [`CompactOptions::orphan_sweep_versions`]: as often as checkpoints.
pub const ORPHAN_SWEEP_VERSIONS: u64 = CHECKPOINT_INTERVAL;

/// What one table's compaction did.
#[derive(Debug, Default, Clone)]
pub struct TableReport {
    pub table: String,
    /// Change-log version compacted through, before and after.
    pub from_version: Option<u64>,
    pub to_version: Option<u64>,
    pub steps: u64,
    /// Steps that committed (the others carried their work to the next).
    pub commits: u64,
    pub changes: u64,
    /// Current-table buckets rewritten and their bytes, of the table's total after the run
    /// (bytes rewritten include the files of new versions that patched buckets got).
    pub buckets_rewritten: u64,
    /// Buckets patched with deletion vectors instead of rewritten.
    pub buckets_patched: u64,
    pub buckets_total: u64,
    pub current_bytes_rewritten: u64,
    pub current_bytes_total: u64,
    /// Versions the history table got a `_valid_to` for.
    pub history_versions_closed: u64,
    /// Tombstones written to the history table open and dropped from the open versions (see
    /// [`CompactOptions::tombstone_retention`]).
    pub history_tombstones_retired: u64,
    /// Replaced files deleted by vacuum (of the current, history and change-log tables).
    pub files_vacuumed: u64,
    /// Small change-log files merged by optimize, and the files they became.
    pub changelog_files_merged: u64,
    pub changelog_files_written: u64,
    /// Small closed-version files of the history table merged, and the files they became.
    pub history_files_merged: u64,
    pub history_files_written: u64,
    /// Change-log files removed for being older than the change-log retention.
    pub changelog_files_expired: u64,
    /// An initial load of the table had committed some of its chunks, not all: those commits
    /// were left for a later pass.
    pub load_in_progress: bool,
    /// Skipped: neither the change log nor the history table had a new version since this
    /// process last compacted the table (see [`Memo`]).
    pub unchanged: bool,
    /// Change-log maintenance failed (logged; the next full pass tries again).
    pub maintenance_failed: bool,
}

/// Longest an unchanged table goes without a full compaction in a process that compacts pass
/// after pass: vacuum and the change-log retention act on time, not on new versions.
const IDLE_RECHECK: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a compactor that runs pass after pass (`slotlake compact --interval`, the background
/// compaction of `slotlake run`) remembers of each table: the latest commits of its change
/// log and history table (version and file, see [`LogMark`]) after its last full compaction.
/// A table whose two logs have not moved since is skipped for a listing of each — a full
/// compaction of a table with nothing to do loads its three Delta tables, about 13 ms of CPU
/// a table, a minute a pass at 5,000 tables — until [`IDLE_RECHECK`] (or a shorter
/// retention) has passed. Anything that can change a compaction's outcome moves one of the
/// two logs: new changes or change-log maintenance the change log, another compactor's
/// commit the history table (and a crash between its history and current commits, which the
/// next full run repairs, leaves the history table moved). The versions are listed before
/// each full compaction, so changes committed while it runs make the next pass a full one.
/// The current table is not watched: a current table deleted by hand is rebuilt by the next
/// full pass (within the recheck). Tables a pass over the whole lake no longer finds are
/// forgotten.
#[derive(Debug, Default)]
pub struct Memo {
    tables: HashMap<TableName, Seen>,
}

#[derive(Debug, Clone)]
struct Seen {
    changes: Option<LogMark>,
    history: Option<LogMark>,
    at: std::time::Instant,
    report: TableReport,
}

/// A Delta log's latest commit: its version, and what the store says of the commit's file,
/// so that a log deleted and written again up to the same version (a table dropped and
/// mirrored again) is not taken for the one seen before.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LogMark {
    version: u64,
    e_tag: Option<String>,
    modified: chrono::DateTime<chrono::Utc>,
}

/// The latest commits of `table`'s change log and history table, listed from `known`'s.
async fn log_versions(
    sink: &Sink,
    table: &TableName,
    known: Option<&Seen>,
) -> Result<(Option<LogMark>, Option<LogMark>), object_store::Error> {
    let changes = sink.table_path(&["changes", &table.schema, &table.name]);
    let history = sink.table_path(&["history", &table.schema, &table.name]);
    let root = sink.root().as_ref();
    Ok((
        latest_log_version(root, &changes, known.and_then(|s| s.changes.as_ref())).await?,
        latest_log_version(root, &history, known.and_then(|s| s.history.as_ref())).await?,
    ))
}

/// The latest commit in the Delta log of the table at `table` (`None`: no log). With `known`
/// (a commit seen before), only the names from its version on are listed; if there is no such
/// version (the log was replaced), the whole log is. (A log replaced up to the same version
/// has the same latest version in another file: its mark differs.)
async fn latest_log_version(
    store: &dyn ObjectStore,
    table: &Path,
    known: Option<&LogMark>,
) -> Result<Option<LogMark>, object_store::Error> {
    let log = table.clone().join("_delta_log");
    let mut known = known;
    loop {
        let mut listing = match known.and_then(|k| k.version.checked_sub(1)) {
            // Names sort by version: from the commit before the known one, its own is listed.
            Some(before) => {
                store.list_with_offset(Some(&log), &log.clone().join(format!("{before:020}.json")))
            }
            None => store.list(Some(&log)),
        };
        let (mut latest, mut saw_known) = (None::<LogMark>, known.is_none());
        while let Some(meta) = listing.next().await {
            let meta = match meta {
                Ok(m) => m,
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(e),
            };
            let Some(version) = meta
                .location
                .filename()
                .and_then(|name| name.strip_suffix(".json"))
                .filter(|v| v.len() == 20)
                .and_then(|v| v.parse::<u64>().ok())
            else {
                continue;
            };
            let mark = LogMark {
                version,
                e_tag: meta.e_tag,
                modified: meta.last_modified,
            };
            saw_known |= known.is_some_and(|k| k.version == version);
            if latest.as_ref().is_none_or(|l| l.version < version) {
                latest = Some(mark);
            }
        }
        if saw_known {
            return Ok(latest);
        }
        known = None;
    }
}

/// Tables that have a change log under `sink`.
pub async fn list_tables(sink: &Sink) -> Result<Vec<TableName>, CompactError> {
    let err = |source: object_store::Error| CompactError::Failed {
        table: "*".into(),
        action: "list change logs",
        source: Box::new(source),
    };
    let root = sink.table_path(&["changes"]);
    let store = sink.root();
    let schemas = store.list_with_delimiter(Some(&root)).await.map_err(err)?;
    let mut tables = Vec::new();
    for schema_dir in schemas.common_prefixes {
        let listing = store
            .list_with_delimiter(Some(&schema_dir))
            .await
            .map_err(err)?;
        for table_dir in listing.common_prefixes {
            let (Some(schema), Some(table)) = (schema_dir.filename(), table_dir.filename()) else {
                continue;
            };
            if has_delta_log(store.as_ref(), &table_dir)
                .await
                .map_err(err)?
            {
                tables.push(TableName {
                    schema: decode(schema),
                    name: decode(table),
                });
            }
        }
    }
    tables.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    Ok(tables)
}

/// True when `name` has a change log (at least one commit).
pub async fn has_change_log(sink: &Sink, name: &TableName) -> Result<bool, CompactError> {
    let path = sink.table_path(&["changes", &name.schema, &name.name]);
    has_delta_log(sink.root().as_ref(), &path)
        .await
        .map_err(|e| CompactError::Failed {
            table: name.to_string(),
            action: "list change log",
            source: Box::new(e),
        })
}

fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// One compacted table (current or history) as this run sees it.
struct Target {
    kind: &'static str,
    log_store: LogStoreRef,
    store: Arc<dyn ObjectStore>,
    /// `None` until the table exists.
    version: Option<u64>,
    metadata: Option<Metadata>,
    protocol: Option<deltalake::kernel::Protocol>,
    /// Change-log version compacted through.
    txn: Option<u64>,
    /// The commit-time watermark (see [`CLOCK_APP_ID`]), written with the next commit.
    clock: Option<i64>,
    /// Data files: path → size and deletion vector.
    files: BTreeMap<String, FileEntry>,
    /// The table as loaded (vacuum starts from it while `version` is still its version).
    loaded: Option<DeltaTable>,
}

impl Target {
    /// Deletion vectors enabled: the table property, and the feature in the protocol.
    fn dv_ready(&self) -> bool {
        match (&self.metadata, &self.protocol) {
            (Some(m), Some(p)) => dv_enabled(m, p),
            _ => false,
        }
    }
}

/// A data file of a current or history table.
#[derive(Debug, Clone)]
struct FileEntry {
    size: i64,
    dv: Option<DeletionVectorDescriptor>,
}

/// The table property that enables deletion vectors.
const DV_PROPERTY: &str = "delta.enableDeletionVectors";

struct Ctx<'a> {
    sink: &'a Sink,
    name: &'a TableName,
    table: String,
    /// The pass's memory budget, shared with the tables compacted at the same time.
    memory: &'a MemoryShare,
    /// Give the current and history tables deletion vectors (at creation, or with their next
    /// commit).
    deletion_vectors: bool,
}

impl Ctx<'_> {
    /// For a Parquet read that failed (already boxed).
    fn read_failed(&self) -> impl FnOnce(BoxError) -> CompactError + '_ {
        move |source| CompactError::Failed {
            table: self.table.clone(),
            action: "read Parquet",
            source,
        }
    }

    fn fail<E: std::error::Error + Send + Sync + 'static>(
        &self,
        action: &'static str,
    ) -> impl FnOnce(E) -> CompactError + '_ {
        move |source| CompactError::Failed {
            table: self.table.clone(),
            action,
            source: Box::new(source),
        }
    }

    async fn load(&self, kind: &'static str) -> Result<Target, CompactError> {
        let path = self
            .sink
            .table_path(&[kind, &self.name.schema, &self.name.name]);
        let (log_store, store, _) = self.sink.table_store(&path);
        let mut target = Target {
            kind,
            log_store: log_store.clone(),
            store: store.clone(),
            version: None,
            metadata: None,
            protocol: None,
            txn: None,
            clock: None,
            files: BTreeMap::new(),
            loaded: None,
        };
        if !has_delta_log(store.as_ref(), &Path::default())
            .await
            .map_err(self.fail("list"))?
        {
            return Ok(target);
        }
        let table = self.load_delta(&log_store, "load").await?;
        let snapshot = table.snapshot().map_err(self.fail("load"))?;
        target.version = Some(snapshot.version());
        target.metadata = Some(snapshot.metadata().clone());
        target.protocol = Some(snapshot.protocol().clone());
        target.txn = snapshot
            .transaction_version(log_store.as_ref(), APP_ID)
            .await
            .map_err(self.fail("read txn version"))?
            .map(|v| v as u64);
        for f in snapshot.log_data().iter() {
            target.files.insert(
                f.path().into_owned(),
                FileEntry {
                    size: f.size(),
                    dv: f.deletion_vector_descriptor(),
                },
            );
        }
        target.loaded = Some(table);
        Ok(target)
    }

    /// Commits `adds`/`removes` with `txn` to `target`, creating it (with `schema`) first if
    /// needed and widening its schema when `schema` has new columns.
    async fn commit(
        &self,
        target: &mut Target,
        schema: &SchemaRef,
        adds: Vec<Add>,
        removes: Vec<Remove>,
        txn: u64,
    ) -> Result<(), CompactError> {
        let write = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        self.commit_as(target, schema, adds, removes, txn, write)
            .await
    }

    /// [`Ctx::commit`] recorded in the table's history as `operation`.
    async fn commit_as(
        &self,
        target: &mut Target,
        schema: &SchemaRef,
        adds: Vec<Add>,
        removes: Vec<Remove>,
        txn: u64,
        operation: DeltaOperation,
    ) -> Result<(), CompactError> {
        let kernel: StructType = schema
            .as_ref()
            .try_into_kernel()
            .map_err(self.fail("schema conversion"))?;
        let mut actions: Vec<Action> = Vec::with_capacity(adds.len() + removes.len() + 3);
        let mut created = None;
        if target.version.is_none() && self.deletion_vectors {
            // Created by this commit (version 0), with the features it needs listed by hand:
            // delta-rs's create lists `invariants` as well, which its own writer then refuses
            // to vacuum without datafusion.
            let protocol = crate::lake::changelog::protocol_upgrade(None, &kernel, true)
                .map_err(self.fail("create"))?
                .ok_or_else(|| {
                    self.fail("create")(FoldError::Inconsistent("no table features to list"))
                })?;
            let metadata = deltalake::kernel::new_metadata(
                &kernel,
                Vec::<String>::new(),
                [(DV_PROPERTY, "true")],
            )
            .and_then(|m| m.with_name(self.name.name.clone()))
            .and_then(|m| {
                m.with_description(format!("slotlake {} table of {}", target.kind, self.name))
            })
            .map_err(self.fail("create"))?;
            actions.push(Action::Protocol(protocol.clone()));
            actions.push(Action::Metadata(metadata.clone()));
            created = Some((metadata, protocol));
        } else if target.version.is_none() {
            let made = deltalake::operations::create::CreateBuilder::new()
                .with_log_store(target.log_store.clone())
                .with_table_name(self.name.name.clone())
                .with_comment(format!("slotlake {} table of {}", target.kind, self.name))
                .with_columns(kernel.fields().cloned())
                .await;
            match made {
                Ok(t) => {
                    let snapshot = t.snapshot().map_err(self.fail("create"))?;
                    target.version = Some(snapshot.version());
                    target.metadata = Some(snapshot.metadata().clone());
                    target.protocol = Some(snapshot.protocol().clone());
                }
                Err(_) => {
                    return Err(CompactError::Conflict {
                        table: self.table.clone(),
                        target: target.kind,
                    })
                }
            }
        }
        let (next, metadata) = match (&created, target.version, target.metadata.clone()) {
            (Some((m, _)), _, _) => (0, m.clone()),
            (None, Some(version), Some(m)) => (version + 1, m),
            _ => {
                return Err(CompactError::Conflict {
                    table: self.table.clone(),
                    target: target.kind,
                })
            }
        };
        let current = metadata.parse_schema().map_err(self.fail("schema"))?;
        let (mut new_metadata, mut new_protocol) = (None, None);
        let widened = crate::lake::changelog::widen(&current, schema)
            .map_err(self.fail("schema evolution"))?;
        // A table created without deletion vectors gets them with its next commit when they
        // are asked for (that commit still rewrites; later ones patch).
        let enable_dv = self.deletion_vectors && created.is_none() && !target.dv_ready();
        if widened.is_some() || enable_dv {
            let mut m = metadata.clone();
            if let Some(w) = &widened {
                m = m.with_schema(w).map_err(self.fail("schema evolution"))?;
            }
            if enable_dv {
                m = m
                    .add_config_key(DV_PROPERTY.to_string(), "true".to_string())
                    .map_err(self.fail("enable deletion vectors"))?;
            }
            new_protocol = crate::lake::changelog::protocol_upgrade(
                target.protocol.as_ref(),
                widened.as_ref().unwrap_or(&current),
                enable_dv,
            )
            .map_err(self.fail("schema evolution"))?;
            actions.push(Action::Metadata(m.clone()));
            if let Some(p) = &new_protocol {
                actions.push(Action::Protocol(p.clone()));
            }
            new_metadata = Some(m);
        }
        // The file list follows once the commit is written.
        let removed: Vec<String> = removes.iter().map(|r| r.path.clone()).collect();
        let added: Vec<(String, FileEntry)> = adds
            .iter()
            .map(|a| {
                let entry = FileEntry {
                    size: a.size,
                    dv: a.deletion_vector.clone(),
                };
                (a.path.clone(), entry)
            })
            .collect();
        actions.extend(removes.into_iter().map(Action::Remove));
        actions.extend(adds.into_iter().map(Action::Add));
        let data = CommitData::new(
            actions,
            operation,
            HashMap::new(),
            std::iter::once(Transaction::new(APP_ID, txn as i64))
                .chain(target.clock.map(|c| Transaction::new(CLOCK_APP_ID, c)))
                .collect(),
        );
        let bytes = data.get_bytes().map_err(self.fail("serialize commit"))?;
        target
            .log_store
            .write_commit_entry(next, CommitOrBytes::LogBytes(bytes), Uuid::new_v4())
            .await
            .map_err(|e| match e {
                deltalake::kernel::transaction::TransactionError::VersionAlreadyExists(_) => {
                    CompactError::Conflict {
                        table: self.table.clone(),
                        target: target.kind,
                    }
                }
                other => CompactError::Failed {
                    table: self.table.clone(),
                    action: "commit",
                    source: Box::new(other),
                },
            })?;
        target.version = Some(next);
        for path in removed {
            target.files.remove(&path);
        }
        target.files.extend(added);
        if let Some((m, p)) = created {
            target.metadata = Some(m);
            target.protocol = Some(p);
        }
        if let Some(p) = new_protocol {
            target.protocol = Some(p);
        }
        if let Some(m) = new_metadata {
            target.metadata = Some(m);
        }
        target.txn = Some(txn);
        if next > 0 && next.is_multiple_of(CHECKPOINT_INTERVAL) {
            if let Err(e) =
                crate::lake::changelog::write_checkpoint(target.log_store.clone(), next).await
            {
                tracing::warn!(table = %self.table, target = target.kind, error = %e, "cannot write a checkpoint");
            }
        }
        Ok(())
    }

    /// The Delta table behind `log_store`, loaded (`action` names a failure).
    async fn load_delta(
        &self,
        log_store: &LogStoreRef,
        action: &'static str,
    ) -> Result<DeltaTable, CompactError> {
        let mut table = DeltaTable::new(log_store.clone());
        table.load().await.map_err(self.fail(action))?;
        Ok(table)
    }

    /// Change-log version `v`'s log entry; an error when it cannot be read (never skipped:
    /// it may add files compaction needs).
    async fn read_commit(
        &self,
        log_store: &LogStoreRef,
        v: u64,
    ) -> Result<bytes::Bytes, CompactError> {
        log_store
            .read_commit_entry(v)
            .await
            .map_err(self.fail("read change-log commit"))?
            .ok_or(CompactError::MissingCommit {
                table: self.table.clone(),
                version: v,
            })
    }

    /// Deletes files the table behind `log_store` removed from its log more than `retention`
    /// ago (Delta vacuum, lite mode: only files named by expired `remove` actions); with
    /// `orphans`, also the files no log entry names that were written more than `retention`
    /// ago (full mode: lists the table's directory), as a crash between writing files and
    /// committing them leaves. Starts from `loaded`, the table as this pass loaded it, when
    /// the pass committed nothing to it since (an idle table's pass then reads each log once
    /// less; a commit of another writer since only leaves its removes to the next vacuum, and
    /// a vacuum whose commit that one's conflicts with is done again from the latest); orphan
    /// sweeps always load it again, as a file committed since would look like an orphan.
    async fn vacuum(
        &self,
        log_store: &LogStoreRef,
        loaded: Option<&DeltaTable>,
        retention: std::time::Duration,
        orphans: bool,
    ) -> Result<u64, CompactError> {
        use deltalake::operations::vacuum::VacuumMode;
        let retention = chrono::Duration::from_std(retention)
            .unwrap_or_else(|_| chrono::Duration::days(36_500));
        let run = async |table: DeltaTable| {
            table
                .vacuum()
                .with_retention_period(retention)
                .with_enforce_retention_duration(false)
                .with_mode(if orphans {
                    VacuumMode::Full
                } else {
                    VacuumMode::Lite
                })
                // Never let delta-rs drop old log entries: compaction reads change logs by
                // version.
                .with_commit_properties(
                    deltalake::kernel::transaction::CommitProperties::default()
                        .with_cleanup_expired_logs(Some(false)),
                )
                .await
        };
        let metrics = match loaded.filter(|_| !orphans) {
            // A vacuum commits (VACUUM START and END): from the pass's snapshot, that commit
            // conflicts with a schema change `run` made since (`MetadataChanged`). It is then
            // done again from the table as it is now.
            Some(table) => match run(table.clone()).await {
                Ok((_, metrics)) => metrics,
                Err(e) => {
                    tracing::debug!(
                        table = %self.table,
                        error = %e,
                        "vacuum from the pass's snapshot failed; again from the latest"
                    );
                    let table = self.load_delta(log_store, "vacuum").await?;
                    run(table).await.map_err(self.fail("vacuum"))?.1
                }
            },
            None => {
                let table = self.load_delta(log_store, "vacuum").await?;
                run(table).await.map_err(self.fail("vacuum"))?.1
            }
        };
        Ok(metrics.files_deleted.len() as u64)
    }

    async fn read_parquet(
        &self,
        store: &Arc<dyn ObjectStore>,
        path: &str,
        schema: &SchemaRef,
    ) -> Result<Vec<RecordBatch>, CompactError> {
        read_parquet_file(store.as_ref(), path, schema)
            .await
            .map_err(self.read_failed())
    }

    /// The batches of a read started with [`spawn_read`], once it has finished.
    fn joined(
        &self,
        read: Result<Result<Vec<RecordBatch>, BoxError>, tokio::task::JoinError>,
    ) -> Result<Vec<RecordBatch>, CompactError> {
        match read {
            Ok(batches) => batches.map_err(self.read_failed()),
            Err(e) => Err(self.fail("read Parquet")(e)),
        }
    }

    /// Writes `batch` as one Parquet file of `target`.
    async fn write_parquet(
        &self,
        target: &Target,
        file: String,
        batch: &RecordBatch,
    ) -> Result<Add, CompactError> {
        let bytes = encode_parquet(batch).map_err(self.fail("write Parquet"))?;
        self.put_file(target, file, batch.num_rows(), bytes).await
    }

    /// Writes a bucket's two files, each (table, file name, rows): encoded at once on two
    /// threads (a bucket is bounded by the bucket size, so each file fits in memory), then
    /// stored with one put each.
    async fn write_bucket(
        &self,
        a: (&Target, String, &RecordBatch),
        b: (&Target, String, &RecordBatch),
    ) -> Result<(Add, Add), CompactError> {
        let (encoded_a, encoded_b) = std::thread::scope(|s| {
            let other = s.spawn(|| encode_parquet(b.2));
            let first = encode_parquet(a.2);
            (
                first,
                other
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
            )
        });
        let encoded_a = encoded_a.map_err(self.fail("write Parquet"))?;
        let encoded_b = encoded_b.map_err(self.fail("write Parquet"))?;
        Ok((
            self.put_file(a.0, a.1, a.2.num_rows(), encoded_a).await?,
            self.put_file(b.0, b.1, b.2.num_rows(), encoded_b).await?,
        ))
    }

    /// Stores an encoded Parquet file of `rows` rows in `target` (one put).
    async fn put_file(
        &self,
        target: &Target,
        file: String,
        rows: usize,
        bytes: Vec<u8>,
    ) -> Result<Add, CompactError> {
        let size = bytes.len() as i64;
        target
            .store
            .put(&Path::from(file.as_str()), PutPayload::from(bytes))
            .await
            .map_err(self.fail("write Parquet"))?;
        Ok(new_add(file, size, rows))
    }
}

/// Name prefix of the history table's closed-version files (append-only; see the module docs).
const CLOSED_PREFIX: &str = "closed-";

/// A new closed-version file of the history table: its path, and a writer streaming it to
/// `store`.
fn closed_file(
    store: &Arc<dyn ObjectStore>,
    schema: &SchemaRef,
) -> Result<(String, AsyncArrowWriter<BufWriter>), deltalake::parquet::errors::ParquetError> {
    let path = format!("{CLOSED_PREFIX}{}.parquet", Uuid::new_v4());
    let writer = AsyncArrowWriter::try_new(
        BufWriter::new(store.clone(), Path::from(path.as_str())),
        schema.clone(),
        Some(writer_properties(schema)),
    )?;
    Ok((path, writer))
}

/// A batch encoded as one Parquet file in memory.
fn encode_parquet(
    batch: &RecordBatch,
) -> Result<Vec<u8>, deltalake::parquet::errors::ParquetError> {
    let schema = batch.schema();
    let mut w = deltalake::parquet::arrow::ArrowWriter::try_new(
        Vec::new(),
        schema.clone(),
        Some(writer_properties(&schema)),
    )?;
    w.write(batch)?;
    w.into_inner()
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The `add` action of a data file we wrote (stats: the row count).
fn new_add(path: String, size: i64, rows: usize) -> Add {
    Add {
        path,
        partition_values: HashMap::new(),
        size,
        modification_time: now_millis(),
        data_change: true,
        stats: Some(format!("{{\"numRecords\":{rows}}}")),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    }
}

/// [`new_add`] of a file we wrote before, with rows of it marked deleted by `dv`.
fn add_with_dv(path: &str, entry: &FileEntry, rows: usize, dv: DeletionVectorDescriptor) -> Add {
    Add {
        deletion_vector: Some(dv),
        ..new_add(path.to_string(), entry.size, rows)
    }
}

/// The `remove` action of a file of a current or history table (with its deletion vector:
/// a file is identified by its path and deletion vector).
fn remove_file(path: &str, entry: &FileEntry) -> Remove {
    Remove {
        deletion_vector: entry.dv.clone(),
        ..remove_of(path, entry.size)
    }
}

/// Whether a table has deletion vectors: the table property set and the feature in the
/// protocol (both reader and writer), so that no vector goes to a table readers could take for
/// one without.
fn dv_enabled(metadata: &Metadata, protocol: &deltalake::kernel::Protocol) -> bool {
    metadata
        .configuration()
        .get(DV_PROPERTY)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        && crate::lake::changelog::has_feature(protocol, "deletionVectors")
}

fn remove_of(path: &str, size: i64) -> Remove {
    Remove {
        path: path.to_string(),
        data_change: true,
        deletion_timestamp: Some(now_millis()),
        extended_file_metadata: Some(true),
        partition_values: Some(HashMap::new()),
        size: Some(size),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
    }
}

/// `batch` with exactly `schema`'s columns: missing ones null, others cast by name.
pub fn conform(
    batch: &RecordBatch,
    schema: &SchemaRef,
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    let cols = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => cast(c, f.data_type()),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<ArrayRef>, _>>()?;
    RecordBatch::try_new_with_options(
        schema.clone(),
        cols,
        &deltalake::arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
}

/// The change columns the fold needs, in the layout's types.
fn change_schema(layout: &Layout, changelog: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = layout
        .source
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    for name in [OP, LSN, SEQ, COMMIT_TS, UNCHANGED] {
        if let Ok(f) = changelog.field_with_name(name) {
            fields.push(f.clone());
        }
    }
    for &k in &layout.key {
        let f = layout.source.field(k);
        fields.push(Field::new(
            format!("{OLD_PREFIX}{}", f.name()),
            f.data_type().clone(),
            true,
        ));
    }
    Arc::new(Schema::new(fields))
}

/// A bucket: an inclusive key-hash range and, when it exists on storage, its files.
#[derive(Debug, Clone)]
struct Bucket {
    lo: u64,
    hi: u64,
    /// Its file pairs, largest open-history file first. A bucket is one pair after a rewrite;
    /// with deletion vectors, each step that patches it adds a pair.
    members: Vec<Member>,
    /// Key signature the bucket was hashed with.
    signature: String,
}

/// One open-history file and the current file derived from it (same id).
#[derive(Debug, Clone)]
struct Member {
    open: (String, FileEntry),
    current: Option<(String, FileEntry)>,
}

fn signature_tag(layout: &Layout) -> String {
    format!(
        "{:08x}",
        fold::key_hash(layout.key_signature().as_bytes()) as u32
    )
}

fn open_name(sig: &str, lo: u64, hi: u64, id: &str) -> String {
    format!("open-{sig}-{lo:016x}-{hi:016x}-{id}.parquet")
}

fn current_name(lo: u64, hi: u64, id: &str) -> String {
    format!("b{lo:016x}-{hi:016x}-{id}.parquet")
}

/// Parses `open-<sig>-<lo>-<hi>-<id>.parquet` into (sig, lo, hi, id).
fn parse_open(path: &str) -> Option<(String, u64, u64, String)> {
    let rest = path.strip_prefix("open-")?.strip_suffix(".parquet")?;
    let mut parts = rest.splitn(4, '-');
    let sig = parts.next()?.to_string();
    let lo = u64::from_str_radix(parts.next()?, 16).ok()?;
    let hi = u64::from_str_radix(parts.next()?, 16).ok()?;
    Some((sig, lo, hi, parts.next()?.to_string()))
}

fn find(parent: &mut [usize], mut x: usize) -> usize {
    while parent[x] != x {
        parent[x] = parent[parent[x]];
        x = parent[x];
    }
    x
}

/// Compacts one table through the change log's latest version.
pub async fn compact_table(
    sink: &Sink,
    name: &TableName,
    options: &CompactOptions,
) -> Result<TableReport, CompactError> {
    compact_table_sharing(
        sink,
        name,
        options,
        &MemoryShare::new(options.memory_budget),
    )
    .await
}

/// [`compact_table`] with a share of `memory` (see [`MemoryShare`]).
async fn compact_table_sharing(
    sink: &Sink,
    name: &TableName,
    options: &CompactOptions,
    memory: &MemoryShare,
) -> Result<TableReport, CompactError> {
    let ctx = Ctx {
        sink,
        name,
        table: name.to_string(),
        memory,
        deletion_vectors: options.deletion_vectors,
    };
    let mut report = TableReport {
        table: ctx.table.clone(),
        ..Default::default()
    };
    let changes_path = sink.table_path(&["changes", &name.schema, &name.name]);
    let (changes_log, changes_store, _) = sink.table_store(&changes_path);
    let changes_table = ctx.load_delta(&changes_log, "load change log").await?;
    let snapshot = changes_table
        .snapshot()
        .map_err(ctx.fail("load change log"))?;
    let latest = snapshot.version();
    let kernel_schema = snapshot.schema();
    let changelog_schema: Schema = kernel_schema
        .as_ref()
        .try_into_arrow()
        .map_err(ctx.fail("change-log schema"))?;
    let layout = Layout::from_changelog(&changelog_schema);
    let change_schema = change_schema(&layout, &changelog_schema);
    let history_schema = layout.history_schema();
    let current_schema = layout.current_schema();

    // Current first: history is committed before current, so a concurrent compactor can only
    // make what we read of history newer than what we read of current, never older.
    let mut current = ctx.load("current").await?;
    let mut history = ctx.load("history").await?;
    if options.tombstone_retention.is_some() {
        // (Read only when needed: each `txn` lookup reads the latest commits again.)
        if let Some(table) = &history.loaded {
            let snapshot = table.snapshot().map_err(ctx.fail("load"))?;
            history.clock = snapshot
                .transaction_version(history.log_store.as_ref(), CLOCK_APP_ID)
                .await
                .map_err(ctx.fail("read txn version"))?;
        }
    }
    let sweep_period = |v: Option<u64>| v.map(|v| v / options.orphan_sweep_versions.max(1));
    let period_before = sweep_period(history.version);
    // A target created now (the first run, or after one was deleted) gets deletion vectors
    // when the other one has them: a repair copies the history table's vectors.
    let ctx = Ctx {
        deletion_vectors: ctx.deletion_vectors || history.dv_ready() || current.dv_ready(),
        ..ctx
    };
    report.from_version = through(history.txn);
    repair_current(&ctx, &layout, &history, &mut current).await?;

    let (mut next, mut skip) = progress(history.txn);
    // An initial load commits a table chunk by chunk; until its last chunk the table is
    // incomplete (and a re-load's truncate would empty it), so those commits wait. Looking
    // back from the end over commits without a `txn` (change-log maintenance, which may land
    // on top of a load's chunks) and load chunks, to the last commit that marks source
    // transactions: compaction stops before the first load chunk after it.
    // (The entries read on the way are kept for the steps below.)
    let mut latest = latest;
    let mut walked: HashMap<u64, bytes::Bytes> = HashMap::new();
    let mut v = latest;
    while v >= next {
        let bytes = ctx.read_commit(&changes_log, v).await?;
        let marks = commit_marks(&bytes);
        walked.insert(v, bytes);
        match marks {
            Marks::Transactions => break,
            Marks::LoadChunk => {
                report.load_in_progress = true;
                latest = v.saturating_sub(1);
            }
            Marks::None => {}
        }
        match v.checked_sub(1) {
            Some(p) => v = p,
            None => break,
        }
    }
    if report.load_in_progress {
        tracing::info!(table = %ctx.table, "initial load of the table in progress; its chunks are compacted once it is done");
    }
    let budget = options.memory_budget / 2;
    let mut carry = Carry::new();
    let current_bytes: u64 = current.files.values().map(|f| f.size.max(0) as u64).sum();
    // The tables as loaded serve an idle table's vacuum and maintenance (see `Ctx::vacuum`);
    // a table with changes to fold does not hold them through its steps (a change log's
    // snapshot grows with its files), and its commits would leave them behind anyway.
    let mut changes_table = Some(changes_table);
    if next <= latest {
        changes_table = None;
        current.loaded = None;
        history.loaded = None;
    }
    let mut share = None;
    while next <= latest {
        // Gather the commits of one step; a commit larger than the budget on its own (an
        // initial load, a huge transaction) is taken a few files at a time, in file order,
        // which is the order its writer wrote the rows in.
        let mut files: Vec<(String, i64)> = Vec::new();
        let mut estimate: u64 = 0;
        let mut end = (next, 0usize);
        let mut v = next;
        while v <= latest {
            let bytes = match walked.remove(&v) {
                Some(bytes) => bytes,
                None => ctx.read_commit(&changes_log, v).await?,
            };
            let mut adds = commit_adds(&bytes).map_err(ctx.fail("parse change-log commit"))?;
            if v == next {
                adds.drain(..skip.min(adds.len()));
            }
            let wanted: u64 = adds.iter().map(|a| a.2).sum();
            if v > next && estimate + wanted > budget {
                break;
            }
            let file = |(path, size, _): (String, i64, u64)| (path, size);
            if v == next && wanted > budget && adds.len() > 1 {
                let mut taken = 0;
                for a in &adds {
                    if taken > 0 && estimate + a.2 > budget {
                        break;
                    }
                    estimate += a.2;
                    taken += 1;
                }
                let whole = taken == adds.len();
                files.extend(adds.into_iter().take(taken).map(file));
                end = if whole { (v + 1, 0) } else { (v, skip + taken) };
                break;
            }
            estimate += wanted;
            files.extend(adds.into_iter().map(file));
            end = (v + 1, 0);
            v += 1;
        }
        let carry_allowed = carry.allowed(end.0 <= latest);
        // A later step may need more than the first (a small commit, then a large one): the
        // share grows, taken again whole (never a second share while holding one).
        let want = step_share(estimate, current_bytes);
        if share
            .as_ref()
            .is_none_or(|held| ctx.memory.short(held, want))
        {
            drop(share.take());
            share = ctx.memory.take(want).await;
        }
        let stepped = step(
            &ctx,
            &layout,
            &change_schema,
            &history_schema,
            &current_schema,
            &changes_store,
            files,
            encode_progress(end.0, end.1),
            &mut history,
            &mut current,
            options,
            &mut carry,
            carry_allowed,
        )
        .await?;
        report.steps += 1;
        report.commits += u64::from(stepped.committed);
        report.changes += stepped.changes;
        report.buckets_rewritten += stepped.buckets_rewritten;
        report.buckets_patched += stepped.buckets_patched;
        report.current_bytes_rewritten += stepped.bytes_rewritten;
        report.history_versions_closed += stepped.closed;
        report.history_tombstones_retired += stepped.retired;
        (next, skip) = end;
    }
    if !carry.open.is_empty() || carry.closed.is_some() {
        // The last step always commits.
        return Err(ctx.fail("compaction steps")(FoldError::Inconsistent(
            "work carried past the last step",
        )));
    }
    report.to_version = through(history.txn);
    if let Some(retention) = options.vacuum_retention {
        // A run that committed past a multiple of `orphan_sweep_versions` also sweeps
        // orphans: files a crash left written but never committed (a carried run's closed
        // versions, a bucket). Only with a retention of at least ORPHAN_MIN_AGE, so that
        // another compactor's files between its write and its commit are never taken for
        // orphans; and at most TOMBSTONE_RETENTION, past which checkpoints forget the
        // `remove` actions that tell a replaced file from an orphan.
        let sweep = report.commits > 0
            && sweep_period(history.version) != period_before
            && (ORPHAN_MIN_AGE..=TOMBSTONE_RETENTION).contains(&retention);
        for target in [&history, &current] {
            if target.version.is_some() {
                let loaded = target
                    .loaded
                    .as_ref()
                    .filter(|t| t.version() == target.version);
                report.files_vacuumed += ctx
                    .vacuum(&target.log_store, loaded, retention, sweep)
                    .await?;
            }
        }
    }
    // The steps' memory is free again (maintenance takes its own share: never two at once).
    drop(share);
    // Maintenance failing (a lost race, storage trouble) leaves the compaction done; the next
    // pass tries again (both the history's small files and the change log's maintenance).
    match maintain::history(&ctx, &mut history, &history_schema, options).await {
        Ok((merged, written)) => {
            report.history_files_merged = merged;
            report.history_files_written = written;
        }
        Err(e) => {
            report.maintenance_failed = true;
            tracing::warn!(
                table = %ctx.table,
                error = %crate::pipeline::error_chain(&e),
                "merging the history table's small files failed; the next compaction tries again"
            )
        }
    }
    match maintain::changelog(
        &ctx,
        changes_table,
        &changes_log,
        &changes_store,
        report.to_version,
        options,
    )
    .await
    {
        Ok(maintained) => {
            report.changelog_files_merged = maintained.files_merged;
            report.changelog_files_written = maintained.files_written;
            report.changelog_files_expired = maintained.files_expired;
            report.files_vacuumed += maintained.files_vacuumed;
        }
        Err(e) => {
            report.maintenance_failed = true;
            tracing::warn!(
                table = %ctx.table,
                error = %crate::pipeline::error_chain(&e),
                "change-log maintenance failed; the next compaction tries again"
            )
        }
    }
    report.buckets_total = buckets(&history, &current).len() as u64;
    report.current_bytes_total = current.files.values().map(|f| f.size.max(0) as u64).sum();
    Ok(report)
}

/// Bits of the `txn` version that count the files of a partly compacted change-log commit.
const PART_BITS: u32 = 20;

/// The `txn` version for "change-log versions before `next` are compacted, and the first
/// `files` data files of `next`": `next << 20 | files`. Steps normally end on a whole commit
/// (`files` = 0); a commit too large for one step is compacted a few files at a time.
fn encode_progress(next: u64, files: usize) -> u64 {
    (next << PART_BITS) | files as u64
}

/// (first change-log version not wholly compacted, files of it already compacted).
fn progress(txn: Option<u64>) -> (u64, usize) {
    txn.map_or((0, 0), |t| {
        (t >> PART_BITS, (t & ((1 << PART_BITS) - 1)) as usize)
    })
}

/// What the `txn` actions of a change-log commit say.
#[derive(Debug, PartialEq, Eq)]
enum Marks {
    /// None: change-log maintenance.
    None,
    /// Initial-load progress only (`slotlake-<slot>-load-<lsn>`; slot names have no `-`): a
    /// chunk of a load other than its table's last.
    LoadChunk,
    /// Source transactions (the stream's commits, a load's last chunk).
    Transactions,
}

fn commit_marks(commit: &[u8]) -> Marks {
    let mut marks = Marks::None;
    for line in commit.split(|b| *b == b'\n') {
        if !line.starts_with(b"{\"txn\"") {
            continue;
        }
        let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        match action["txn"]["appId"].as_str() {
            Some(app) if app.contains("-load-") => marks = Marks::LoadChunk,
            Some(_) => return Marks::Transactions,
            None => {}
        }
    }
    marks
}

/// The last change-log version wholly compacted.
fn through(txn: Option<u64>) -> Option<u64> {
    progress(txn).0.checked_sub(1)
}

/// A data file a change-log commit adds.
struct CommitAdd {
    path: String,
    size: i64,
    data_change: bool,
    /// The Arrow size its writer recorded ([`crate::lake::changelog::ARROW_BYTES_TAG`]).
    arrow_bytes: Option<u64>,
}

/// Every data file a change-log commit adds.
fn commit_actions(bytes: &[u8]) -> Result<Vec<CommitAdd>, serde_json::Error> {
    let mut adds = Vec::new();
    for line in bytes.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(line)?;
        if let Some(add) = v.get("add") {
            if let Some(path) = add.get("path").and_then(|p| p.as_str()) {
                adds.push(CommitAdd {
                    path: path.to_string(),
                    size: add.get("size").and_then(|s| s.as_i64()).unwrap_or(0),
                    data_change: add.get("dataChange").and_then(|d| d.as_bool()) != Some(false),
                    arrow_bytes: add
                        .get("tags")
                        .and_then(|t| t.get(crate::lake::changelog::ARROW_BYTES_TAG))
                        .and_then(|b| b.as_str())
                        .and_then(|b| b.parse().ok()),
                });
            }
        }
    }
    Ok(adds)
}

/// Data files a change-log commit adds (path, size, estimated Arrow size), skipping rewrites
/// (`dataChange: false`: change-log optimize, whose rows were compacted from the files it
/// replaced). The estimate is [`PARQUET_EXPANSION`] times the size, or the Arrow size the
/// writer recorded when that is more.
fn commit_adds(bytes: &[u8]) -> Result<Vec<(String, i64, u64)>, serde_json::Error> {
    Ok(commit_actions(bytes)?
        .into_iter()
        .filter(|a| a.data_change)
        .map(|a| {
            let estimate = (a.size.max(0) as u64).saturating_mul(PARQUET_EXPANSION);
            // (Capped at 1 TiB a file, so that sums cannot overflow whatever a writer put
            // in its tags.)
            let estimate = estimate.max(a.arrow_bytes.unwrap_or(0)).min(1 << 40);
            (a.path, a.size, estimate)
        })
        .collect())
}

/// The buckets of a table, from its history files.
fn buckets(history: &Target, current: &Target) -> Vec<Bucket> {
    let mut current_by_id: HashMap<String, (String, FileEntry)> = HashMap::new();
    for (path, entry) in &current.files {
        // b<lo>-<hi>-<id>: the id (a uuid) has dashes of its own.
        if let Some(rest) = path
            .strip_prefix('b')
            .and_then(|p| p.strip_suffix(".parquet"))
        {
            if let Some(id) = rest.splitn(3, '-').nth(2) {
                current_by_id.insert(id.to_string(), (path.clone(), entry.clone()));
            }
        }
    }
    let mut by_range: BTreeMap<(u64, u64, String), Vec<Member>> = BTreeMap::new();
    for (path, entry) in &history.files {
        let Some((sig, lo, hi, id)) = parse_open(path) else {
            continue;
        };
        by_range.entry((lo, hi, sig)).or_default().push(Member {
            open: (path.clone(), entry.clone()),
            current: current_by_id.get(&id).cloned(),
        });
    }
    by_range
        .into_iter()
        .map(|((lo, hi, signature), mut members)| {
            members.sort_by_key(|m| std::cmp::Reverse(m.open.1.size));
            Bucket {
                lo,
                hi,
                members,
                signature,
            }
        })
        .collect()
}

/// The rows of `entry`'s file that its deletion vector marks (empty without one).
fn marked(ctx: &Ctx<'_>, entry: &FileEntry) -> Result<roaring::RoaringTreemap, CompactError> {
    entry
        .dv
        .as_ref()
        .map_or(Ok(roaring::RoaringTreemap::new()), dv::decode)
        .map_err(ctx.fail("read deletion vector"))
}

/// A current file's deletion vector for its open-history file's `marked` rows: the current
/// file holds the open file's rows that are not tombstones, in the same order, so a marked
/// live row at position p of the open file is at position (live rows before p) in the current
/// file. Returns the vector and the current file's rows.
fn current_marks(
    open: &[RecordBatch],
    marked: &roaring::RoaringTreemap,
) -> Result<(roaring::RoaringTreemap, usize), FoldError> {
    let mut out = roaring::RoaringTreemap::new();
    let (mut pos, mut live) = (0u64, 0u64);
    for batch in open {
        let deleted = batch
            .column_by_name(fold::DELETED)
            .and_then(|c| c.as_boolean_opt())
            .ok_or_else(|| FoldError::MissingColumn(fold::DELETED.into()))?;
        for i in 0..batch.num_rows() {
            if !deleted.value(i) {
                if marked.contains(pos) {
                    out.insert(live);
                }
                live += 1;
            }
            pos += 1;
        }
    }
    Ok((out, live as usize))
}

/// `batches` (a whole file, in order) without the rows `marked` marks.
fn drop_marked(
    batches: Vec<RecordBatch>,
    marked: &roaring::RoaringTreemap,
) -> Result<Vec<RecordBatch>, BoxError> {
    if marked.is_empty() {
        return Ok(batches);
    }
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let live = dv::live_mask(marked, rows)?;
    let mut out = Vec::with_capacity(batches.len());
    let mut offset = 0;
    for batch in batches {
        let n = batch.num_rows();
        let mask = live.slice(offset, n);
        offset += n;
        out.push(deltalake::arrow::compute::filter_record_batch(
            &batch, &mask,
        )?);
    }
    Ok(out)
}

/// Makes the current table match the history table's open versions, when a crash came
/// between the history commit and the current commit of a step.
async fn repair_current(
    ctx: &Ctx<'_>,
    layout: &Layout,
    history: &Target,
    current: &mut Target,
) -> Result<(), CompactError> {
    let Some(txn) = history.txn else {
        return Ok(());
    };
    if current.txn == Some(txn) {
        return Ok(());
    }
    if current.txn > Some(txn) {
        // Another compactor committed between our two loads.
        return Err(CompactError::Conflict {
            table: ctx.table.clone(),
            target: "current",
        });
    }
    tracing::info!(table = %ctx.table, "repairing the current table from the history table after an interrupted compaction");
    let all = buckets(history, current);
    let keep: std::collections::HashSet<&str> = all
        .iter()
        .flat_map(|b| &b.members)
        .filter_map(|m| m.current.as_ref().map(|c| c.0.as_str()))
        .collect();
    let mut removes: Vec<Remove> = current
        .files
        .iter()
        .filter(|(p, _)| !keep.contains(p.as_str()))
        .map(|(p, e)| remove_file(p, e))
        .collect();
    let mut adds = Vec::new();
    let history_schema = layout.history_schema();
    for m in all.iter().flat_map(|b| &b.members) {
        let (open_path, open_entry) = &m.open;
        // A current file exists for this open file and no deletion vector is involved: it
        // is right (files are never rewritten in place).
        if m.current.as_ref().is_some_and(|c| c.1.dv.is_none()) && open_entry.dv.is_none() {
            continue;
        }
        let Some((_, lo, hi, id)) = parse_open(open_path) else {
            continue;
        };
        let open = ctx
            .read_parquet(&history.store, open_path, &history_schema)
            .await?;
        let (want, live) =
            current_marks(&open, &marked(ctx, open_entry)?).map_err(ctx.fail("current rows"))?;
        match &m.current {
            Some((path, entry)) => {
                if marked(ctx, entry)? != want {
                    removes.push(remove_file(path, entry));
                    adds.push(add_with_dv(path, entry, live, dv::encode(&want)));
                }
            }
            None => {
                let open = concat_batches(&history_schema, &open).map_err(ctx.fail("concat"))?;
                let rows = fold::current_rows(layout, &open).map_err(ctx.fail("current rows"))?;
                let mut add = ctx
                    .write_parquet(current, current_name(lo, hi, &id), &rows)
                    .await?;
                if !want.is_empty() {
                    add.deletion_vector = Some(dv::encode(&want));
                }
                adds.push(add);
            }
        }
    }
    ctx.commit(current, &layout.current_schema(), adds, removes, txn)
        .await
}

struct StepReport {
    changes: u64,
    buckets_rewritten: u64,
    buckets_patched: u64,
    bytes_rewritten: u64,
    closed: u64,
    retired: u64,
    /// The step committed (else it carried its work to the next).
    committed: bool,
}

#[allow(clippy::too_many_arguments)]
async fn step(
    ctx: &Ctx<'_>,
    layout: &Layout,
    change_schema: &SchemaRef,
    history_schema: &SchemaRef,
    current_schema: &SchemaRef,
    changes_store: &Arc<dyn ObjectStore>,
    files: Vec<(String, i64)>,
    txn: u64,
    history: &mut Target,
    current: &mut Target,
    options: &CompactOptions,
    carry: &mut Carry,
    carry_allowed: bool,
) -> Result<StepReport, CompactError> {
    let sig = signature_tag(layout);
    let mut bucket_list = buckets(history, current);
    let rebucket = bucket_list.iter().any(|b| b.signature != sig);
    if bucket_list.is_empty() {
        bucket_list.push(Bucket {
            lo: 0,
            hi: u64::MAX,
            members: Vec::new(),
            signature: sig.clone(),
        });
    }
    // The ranges tile the hash space (a rewrite keeps a file for a bucket it empties, a split
    // writes both halves): a hole means a bucket's files left the tables, and the rows of its
    // range would be routed to a neighbour. Checked before anything is folded, as a carried
    // step's versions are not checked against their ranges until they are written.
    let whole = bucket_list.first().is_some_and(|b| b.lo == 0)
        && bucket_list.last().is_some_and(|b| b.hi == u64::MAX)
        && bucket_list
            .windows(2)
            .all(|w| w[0].hi.checked_add(1) == Some(w[1].lo));
    if !rebucket && !whole {
        return Err(ctx.fail("bucket ranges")(FoldError::BucketGap));
    }
    let nb = bucket_list.len();
    let started = std::time::Instant::now();
    let (mut fold_time, mut write_time) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    let bucket_of = |h: u64| -> usize { bucket_list.partition_point(|b| b.hi < h).min(nb - 1) };

    // Route the changes to buckets.
    let mut routed: Vec<Vec<RecordBatch>> = vec![Vec::new(); nb];
    let mut parent: Vec<usize> = (0..nb).collect();
    let mut touched = vec![rebucket; nb];
    let mut changes: u64 = 0;
    // The open versions a unit of buckets folds onto are read in the background: the next
    // unit's while one folds, and a one-bucket table's while its changes are read.
    // (Buckets an earlier step carried are in memory: their files were read then.)
    let carried: std::collections::HashSet<usize> = carry.open.keys().copied().collect();
    let read_bases = |members: &[usize]| -> Vec<_> {
        members
            .iter()
            .filter(|b| !carried.contains(b))
            .flat_map(|&b| &bucket_list[b].members)
            .map(|m| {
                spawn_read(
                    history.store.clone(),
                    m.open.0.clone(),
                    history_schema.clone(),
                )
            })
            .collect()
    };
    let mut next_bases: Option<(usize, Vec<_>)> = (nb == 1).then(|| (0, read_bases(&[0])));
    // Change-log files are read a few at a time, decoded on the blocking pool, in order.
    let mut reads =
        futures::stream::iter(files.iter().map(|(path, _)| {
            spawn_read(changes_store.clone(), path.clone(), change_schema.clone())
        }))
        .buffered(READ_AHEAD_FILES);
    // With a tombstone retention: (_lsn, _seq, commit time) of every change, for the
    // watermarks every unit's fold goes by.
    let mut stamps: Vec<(i64, i64, i64)> = Vec::new();
    while let Some(read) = reads.next().await {
        let batches = ctx.joined(read)?;
        for batch in batches {
            changes += batch.num_rows() as u64;
            if options.tombstone_retention.is_some() {
                stamps.extend(fold::stamps(&batch).map_err(ctx.fail("read commit times"))?);
            }
            if nb == 1 {
                // One bucket (every small table): every change goes to it; no key to hash.
                touched[0] = true;
                routed[0].push(batch);
                continue;
            }
            let keys = layout
                .key_rows(&batch, KeyNames::Row)
                .map_err(ctx.fail("key"))?;
            let old = layout
                .key_rows(&batch, KeyNames::Old)
                .map_err(ctx.fail("key"))?;
            let old_present: Vec<bool> = {
                let cols: Vec<&ArrayRef> = layout
                    .key
                    .iter()
                    .filter_map(|&k| {
                        batch.column_by_name(&format!(
                            "{OLD_PREFIX}{}",
                            layout.source.field(k).name()
                        ))
                    })
                    .collect();
                (0..batch.num_rows())
                    .map(|i| cols.iter().any(|c| c.is_valid(i)))
                    .collect()
            };
            let ops = batch
                .column_by_name(OP)
                .and_then(|c| {
                    c.as_any()
                        .downcast_ref::<deltalake::arrow::array::StringArray>()
                })
                .ok_or_else(|| ctx.fail("read _op")(FoldError::MissingColumn(OP.into())))?;
            let mut idx: Vec<Vec<u32>> = vec![Vec::new(); nb];
            for (i, &moved) in old_present.iter().enumerate() {
                if ops.value(i) == "T" {
                    for (b, list) in idx.iter_mut().enumerate() {
                        list.push(i as u32);
                        touched[b] = true;
                    }
                    continue;
                }
                let b = bucket_of(fold::key_hash(keys.row(i).as_ref()));
                idx[b].push(i as u32);
                touched[b] = true;
                if moved {
                    let ob = bucket_of(fold::key_hash(old.row(i).as_ref()));
                    if ob != b {
                        let (x, y) = (find(&mut parent, ob), find(&mut parent, b));
                        parent[x] = y;
                        idx[ob].push(i as u32);
                        touched[ob] = true;
                    }
                }
            }
            for (b, list) in idx.into_iter().enumerate() {
                if list.len() == batch.num_rows() {
                    // Every row to one bucket (always, for a one-bucket table): no copy.
                    routed[b].push(batch.clone());
                } else if !list.is_empty() {
                    routed[b].push(take_indices(&batch, &list).map_err(ctx.fail("route"))?);
                }
            }
        }
    }
    if rebucket {
        for b in 0..nb {
            let (x, y) = (find(&mut parent, b), find(&mut parent, 0));
            parent[x] = y;
        }
    }

    // Units of work: touched buckets joined by key moves.
    let mut units: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (b, &t) in touched.iter().enumerate() {
        if t {
            units.entry(find(&mut parent, b)).or_default().push(b);
        }
    }

    let mut history_adds = Vec::new();
    let mut current_adds = Vec::new();
    let mut report = StepReport {
        changes,
        buckets_rewritten: 0,
        buckets_patched: 0,
        bytes_rewritten: 0,
        closed: 0,
        retired: 0,
        committed: false,
    };
    let mut closed_writer = match carry.closed.take() {
        Some(writer) => writer,
        None => ClosedWriter::start(history.store.clone(), history_schema.clone())
            .map_err(ctx.fail("start the closed-version writer"))?,
    };
    // The step ends with a commit once a unit is written: when carrying is not allowed, a
    // unit is patched, or the carried versions would outgrow the memory budget.
    let mut write = !carry_allowed || rebucket;
    let read_time = started.elapsed();
    let mut watermarks = fold::Watermarks::new(history.clock.unwrap_or(i64::MIN), stamps);
    let unit_list: Vec<&Vec<usize>> = units.values().collect();
    for (u, members) in unit_list.iter().enumerate() {
        let fold_started = std::time::Instant::now();
        let bases = match next_bases.take() {
            Some((first, reads)) if first == members[0] => reads,
            _ => read_bases(members),
        };
        if let Some(next) = unit_list.get(u + 1) {
            next_bases = Some((next[0], read_bases(next)));
        }
        // The unit's files, in the order `read_bases` started them.
        let mut files = Vec::with_capacity(bases.len());
        let pairs = members
            .iter()
            .filter(|b| !carried.contains(b))
            .flat_map(|&b| bucket_list[b].members.iter().map(move |m| (b, m)));
        for ((b, member), read) in pairs.zip(bases) {
            files.push(BaseFile {
                lo: bucket_list[b].lo,
                member,
                marked: marked(ctx, &member.open.1)?,
                batches: ctx.joined(read.await)?,
            });
        }
        let mut unit_changes = Vec::new();
        for &b in members.iter() {
            unit_changes.append(&mut routed[b]);
        }
        // Buckets (by first hash) a patch gave new versions or marks.
        let mut patched = std::collections::HashSet::new();
        // A change routed to several buckets of one unit (a key move, a truncate) is applied once.
        if members.len() > 1 {
            unit_changes = dedup_changes(unit_changes).map_err(ctx.fail("dedup"))?;
        }
        let mut patch =
            if carried.is_empty() && patchable(history, current, &bucket_list, members, rebucket) {
                patch_plan(layout, &files, &unit_changes).map_err(ctx.fail("key"))?
            } else {
                None
            };
        let base: Vec<RecordBatch> = match &mut patch {
            Some(plan) => {
                write = true;
                std::mem::take(&mut plan.base)
            }
            None => {
                let mut base = Vec::new();
                for f in &mut files {
                    let batches = std::mem::take(&mut f.batches);
                    base.extend(drop_marked(batches, &f.marked).map_err(ctx.read_failed())?);
                    let (path, entry) = &f.member.open;
                    carry.history_removes.push(remove_file(path, entry));
                    if let Some((path, entry)) = &f.member.current {
                        carry.current_removes.push(remove_file(path, entry));
                    }
                }
                for b in members.iter() {
                    base.extend(carry.open.remove(b).into_iter().flat_map(|c| c.open));
                }
                base
            }
        };
        // A unit of one bucket that may end the step without a commit keeps its versions in
        // any order (the next fold re-groups them anyway; sorted by hash only if they are
        // written after all). A unit of several buckets is cut into them by hash either way.
        let order = if write || members.len() > 1 {
            OpenRows::ByHash
        } else {
            OpenRows::Any
        };
        // With other tables in hand, on a blocking thread: their futures share the pass's
        // task, and go on listing, reading and writing meanwhile (a fold in the task held all
        // of them up). One such fold at a time: each runs on every core (the background
        // compactor's leave one to the replication stream), and the others wait their turn
        // without blocking anything. Alone, in the task: the blocking thread's fresh allocator
        // arena cost 5 % more page faults, 1–3 % of a large compaction's time.
        #[cfg(test)]
        tests::fold_gate_arrive(&ctx.table);
        let fold_job = {
            let (layout, options) = (layout.clone(), options.clone());
            let writer = closed_writer;
            #[cfg(test)]
            let table = ctx.table.clone();
            move || {
                #[cfg(test)]
                tests::fold_gate_hold(&table);
                let folded = fold::fold(
                    &layout,
                    &base,
                    unit_changes,
                    &mut |batch| writer.send(batch),
                    options.fold_threads,
                    order,
                    options.retire(&watermarks),
                );
                drop(base);
                (folded, writer, watermarks)
            }
        };
        let folded;
        (folded, closed_writer, watermarks) = if ctx.memory.alone() {
            fold_job()
        } else {
            let _turn = ctx
                .memory
                .folds
                .acquire()
                .await
                .map_err(ctx.fail("wait for a fold's turn"))?;
            match tokio::task::spawn_blocking(fold_job).await {
                Ok(done) => done,
                Err(e) => match e.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    Err(e) => return Err(ctx.fail("fold")(e)),
                },
            }
        };
        let mut out = match folded {
            Ok(out) => out,
            Err(FoldError::OutputClosed) => {
                return Err(ctx.fail("write closed versions")(closed_writer.failure()));
            }
            Err(e) => return Err(ctx.fail("fold")(e)),
        };
        // Built and encoded by the writer while the step goes on.
        if closed_writer
            .send_parts(std::mem::take(&mut out.closed_parts), write)
            .is_err()
        {
            return Err(ctx.fail("write closed versions")(closed_writer.failure()));
        }
        fold_time += fold_started.elapsed();
        report.closed += (out.closed_rows - out.retired_rows) as u64;
        report.retired += out.retired_rows as u64;
        let rows_out = out.open.iter().map(|b| b.num_rows()).sum::<usize>().max(1) as u64;
        let bytes = out
            .open
            .iter()
            .map(|b| b.get_array_memory_size() as u64)
            .sum::<u64>();
        if !write && carry.bytes() + bytes <= options.memory_budget / 2 {
            if let [b] = members[..] {
                carry.open.insert(
                    b,
                    Carried {
                        hashes: out.open_hashes,
                        open: out.open,
                        bytes,
                    },
                );
                continue;
            }
            // Carried, a slice per bucket (never split: one piece per range, in order); the
            // fold gave them in hash order.
            let ranges: Vec<(u64, u64)> = members
                .iter()
                .map(|&b| (bucket_list[b].lo, bucket_list[b].hi))
                .collect();
            let (hashes, open) = hash_ordered(ctx, layout, out.open_hashes, out.open)?;
            let slices = pieces(ctx, &ranges, (&hashes, &open), u64::MAX)?;
            for (&b, (_, _, start, len)) in members.iter().zip(slices) {
                // Each bucket is copied apart: a slice would keep the whole output alive
                // after its siblings are folded again.
                let rows: Vec<u32> = (0..len as u32).collect();
                carry.open.insert(
                    b,
                    Carried {
                        hashes: Some(hashes[start..start + len].to_vec()),
                        open: vec![take_indices(&open.slice(start, len), &rows)
                            .map_err(ctx.fail("carry"))?],
                        bytes: bytes * len as u64 / rows_out,
                    },
                );
            }
            continue;
        }
        write = true;
        let write_started = std::time::Instant::now();
        // Output ranges: the unit's buckets (all of the hash space when re-bucketing). A
        // patch adds one file pair per bucket that has new versions; a rewrite splits a bucket
        // grown past the bucket size.
        let ranges: Vec<(u64, u64)> = if rebucket {
            vec![(0, u64::MAX)]
        } else {
            members
                .iter()
                .map(|&b| (bucket_list[b].lo, bucket_list[b].hi))
                .collect()
        };
        let (hashes, open) = hash_ordered(ctx, layout, out.open_hashes, out.open)?;
        let written = write_buckets(
            ctx,
            layout,
            &sig,
            (history, current),
            &ranges,
            (&hashes, &open),
            patch.is_some(),
            options.bucket_bytes,
        )
        .await?;
        for (lo, open_add, add) in written {
            history_adds.push(open_add);
            if patch.is_some() {
                patched.insert(lo);
            } else {
                report.buckets_rewritten += 1;
            }
            report.bytes_rewritten += add.size.max(0) as u64;
            current_adds.push(add);
        }
        if let Some(plan) = patch {
            // The old versions of the changed keys are marked deleted where they were.
            for (f, hits) in files.iter().zip(plan.hits) {
                if hits.is_empty() {
                    continue;
                }
                patched.insert(f.lo);
                let Some((cpath, centry)) = &f.member.current else {
                    return Err(ctx.fail("patch")(FoldError::Inconsistent(
                        "an open-history file without its current file",
                    )));
                };
                let (path, entry) = &f.member.open;
                let rows: usize = f.batches.iter().map(|b| b.num_rows()).sum();
                let mut all = f.marked.clone();
                all.extend(hits.iter());
                let (current_hits, live) =
                    current_marks(&f.batches, &hits).map_err(ctx.fail("patch"))?;
                carry.history_removes.push(remove_file(path, entry));
                history_adds.push(add_with_dv(path, entry, rows, dv::encode(&all)));
                // (Newly hit rows were not marked before: the current file's vector changes
                // exactly when some of them are live.)
                if !current_hits.is_empty() {
                    let mut current_all = marked(ctx, centry)?;
                    current_all.extend(current_hits.iter());
                    carry.current_removes.push(remove_file(cpath, centry));
                    current_adds.push(add_with_dv(cpath, centry, live, dv::encode(&current_all)));
                }
            }
            report.buckets_patched += patched.len() as u64;
        }
        write_time += write_started.elapsed();
    }
    if options.tombstone_retention.is_some() {
        // Committed with the history table (now or with a later step that commits).
        history.clock = Some(watermarks.after());
    }
    if !write {
        // Nothing is committed: the next step folds onto the carried versions.
        carry.closed = Some(closed_writer);
        carry.steps += 1;
        tracing::debug!(
            table = %ctx.table,
            changes,
            read_ms = read_time.as_millis() as u64,
            base_and_fold_ms = fold_time.as_millis() as u64,
            carried_bytes = carry.bytes(),
            total_ms = started.elapsed().as_millis() as u64,
            "compaction step (carried)"
        );
        return Ok(report);
    }
    // Buckets carried from earlier steps that this step did not touch.
    let write_started = std::time::Instant::now();
    for (b, c) in std::mem::take(&mut carry.open) {
        let range = [(bucket_list[b].lo, bucket_list[b].hi)];
        let (hashes, open) = hash_ordered(ctx, layout, c.hashes, c.open)?;
        let written = write_buckets(
            ctx,
            layout,
            &sig,
            (history, current),
            &range,
            (&hashes, &open),
            false,
            options.bucket_bytes,
        )
        .await?;
        for (_, open_add, add) in written {
            history_adds.push(open_add);
            report.buckets_rewritten += 1;
            report.bytes_rewritten += add.size.max(0) as u64;
            current_adds.push(add);
        }
    }
    write_time += write_started.elapsed();
    let closed_started = std::time::Instant::now();
    history_adds.extend(
        closed_writer
            .finish()
            .map_err(ctx.fail("write closed versions"))?,
    );
    let closed_wait = closed_started.elapsed();
    let history_removes = std::mem::take(&mut carry.history_removes);
    let current_removes = std::mem::take(&mut carry.current_removes);
    ctx.commit(history, history_schema, history_adds, history_removes, txn)
        .await?;
    ctx.commit(current, current_schema, current_adds, current_removes, txn)
        .await?;
    carry.steps = 0;
    carry.since = std::time::Instant::now();
    report.committed = true;
    tracing::debug!(
        table = %ctx.table,
        changes,
        read_ms = read_time.as_millis() as u64,
        base_and_fold_ms = fold_time.as_millis() as u64,
        write_ms = write_time.as_millis() as u64,
        closed_wait_ms = closed_wait.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "compaction step"
    );
    Ok(report)
}

/// Open versions in hash order, in one batch, with their hashes: as they are when `hashes`
/// says they are in that order, else sorted (see [`fold::OpenRows`]).
fn hash_ordered(
    ctx: &Ctx<'_>,
    layout: &Layout,
    hashes: Option<Vec<u64>>,
    mut open: Vec<RecordBatch>,
) -> Result<(Vec<u64>, RecordBatch), CompactError> {
    let open = match open.len() {
        1 => open.remove(0),
        _ => concat_batches(&layout.history_schema(), &open)
            .map_err(ctx.fail("concatenate open versions"))?,
    };
    match hashes {
        Some(hashes) => Ok((hashes, open)),
        None => fold::by_hash(layout, &open).map_err(ctx.fail("sort open versions")),
    }
}

/// Writes open versions (sorted by key hash) as bucket file pairs: one per range of `ranges`
/// (which must cover every row's hash), a range split while its rows are over `max_bytes`;
/// with `patch`, ranges without rows get no files. Returns (range start, open-history add,
/// current add) per pair.
#[allow(clippy::too_many_arguments)]
async fn write_buckets(
    ctx: &Ctx<'_>,
    layout: &Layout,
    sig: &str,
    (history, current): (&Target, &Target),
    ranges: &[(u64, u64)],
    (hashes, open): (&[u64], &RecordBatch),
    patch: bool,
    bucket_bytes: u64,
) -> Result<Vec<(u64, Add, Add)>, CompactError> {
    let max_bytes = if patch { u64::MAX } else { bucket_bytes };
    let pieces = pieces(ctx, ranges, (hashes, open), max_bytes)?;
    let mut written = Vec::with_capacity(pieces.len());
    for (lo, hi, start, len) in pieces {
        if len == 0 && patch {
            continue;
        }
        let piece = open.slice(start, len);
        // An empty bucket still owns its range: it keeps a file so the ranges stay whole.
        let id = Uuid::new_v4().to_string();
        let rows = fold::current_rows(layout, &piece).map_err(ctx.fail("current rows"))?;
        let (open_add, add) = ctx
            .write_bucket(
                (history, open_name(sig, lo, hi, &id), &piece),
                (current, current_name(lo, hi, &id), &rows),
            )
            .await?;
        written.push((lo, open_add, add));
    }
    Ok(written)
}

/// Most steps one compaction run folds without committing (see [`Carry`]).
const MAX_CARRIED_STEPS: usize = 16;
/// Longest a run folds without committing.
const MAX_CARRY_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// What a step leaves to the next instead of committing: the open versions of the buckets it
/// folded, the files they replace, and the writer of the versions it closed. A run of steps
/// over a backlog then reads and writes each bucket once instead of once per step; it
/// commits when the versions would outgrow half the memory budget, every
/// [`MAX_CARRIED_STEPS`] steps or [`MAX_CARRY_AGE`], and at its end. A crash in between
/// loses only work the next run redoes the same way.
struct Carry {
    open: BTreeMap<usize, Carried>,
    history_removes: Vec<Remove>,
    current_removes: Vec<Remove>,
    closed: Option<ClosedWriter>,
    steps: usize,
    since: std::time::Instant,
}

/// A bucket's open versions, carried.
struct Carried {
    /// Their key hashes when `open` is one batch in hash order (else any order).
    hashes: Option<Vec<u64>>,
    open: Vec<RecordBatch>,
    /// Its share of the memory of the fold output it is a slice of.
    bytes: u64,
}

impl Carry {
    fn new() -> Carry {
        Carry {
            open: BTreeMap::new(),
            history_removes: Vec::new(),
            current_removes: Vec::new(),
            closed: None,
            steps: 0,
            since: std::time::Instant::now(),
        }
    }

    fn bytes(&self) -> u64 {
        self.open.values().map(|c| c.bytes).sum()
    }

    /// Whether the next step may end without a commit.
    fn allowed(&self, more: bool) -> bool {
        more && self.steps + 1 < MAX_CARRIED_STEPS && self.since.elapsed() < MAX_CARRY_AGE
    }
}

/// Files a bucket may have before a step rewrites it into one (deletion vectors).
const MAX_BUCKET_FILES: usize = 8;

/// A patch may leave at most 1 row in this many of a unit's files marked deleted (touched keys
/// counted, which bounds the rows marked); past that the unit is rewritten (readers skip
/// marked rows, but still read them).
const MARKED_DENOMINATOR: u64 = 5;

/// An open-history file of a unit, read whole.
struct BaseFile<'a> {
    /// Its bucket's first hash.
    lo: u64,
    member: &'a Member,
    /// Rows its deletion vector marks.
    marked: roaring::RoaringTreemap,
    batches: Vec<RecordBatch>,
}

/// How a unit is patched: the open versions of the keys its changes touch (the fold's base),
/// and per file, the rows they are at.
struct PatchPlan {
    base: Vec<RecordBatch>,
    hits: Vec<roaring::RoaringTreemap>,
}

/// Whether a unit's buckets may be patched rather than rewritten: the table has deletion
/// vectors, nothing is re-bucketed, and every bucket has files (each with its current file)
/// and room for one more pair.
fn patchable(
    history: &Target,
    current: &Target,
    buckets: &[Bucket],
    members: &[usize],
    rebucket: bool,
) -> bool {
    history.dv_ready()
        && current.dv_ready()
        && !rebucket
        && members.iter().all(|&b| {
            let bucket = &buckets[b];
            !bucket.members.is_empty()
                && bucket.members.len() < MAX_BUCKET_FILES
                && bucket.members.iter().all(|m| m.current.is_some())
        })
}

/// The patch of a unit, or `None` when it is to be rewritten: a truncate, or more keys touched
/// than 1 row in [`MARKED_DENOMINATOR`] of its files, counting the rows already marked (the
/// keys are counted before their rows are looked for, so that a step that changes much of a
/// bucket gives up early, not after a pass over the bucket).
///
/// A key's open version is touched when a change has it as its key or its old key; the fold
/// then gives the new open versions of exactly those keys (every other key's version stays as
/// it is), so the touched versions are marked deleted and the fold's output is added.
fn patch_plan(
    layout: &Layout,
    files: &[BaseFile<'_>],
    changes: &[RecordBatch],
) -> Result<Option<PatchPlan>, FoldError> {
    let total: u64 = files
        .iter()
        .flat_map(|f| &f.batches)
        .map(|b| b.num_rows() as u64)
        .sum();
    let already: u64 = files.iter().map(|f| f.marked.len()).sum();
    let allowed = (total / MARKED_DENOMINATOR).saturating_sub(already) as usize;
    let mut keys: std::collections::HashSet<Box<[u8]>> = std::collections::HashSet::new();
    for batch in changes {
        let ops = batch
            .column_by_name(OP)
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| FoldError::MissingColumn(OP.into()))?;
        if ops.iter().any(|op| op == Some("T")) {
            return Ok(None);
        }
        for names in [KeyNames::Row, KeyNames::Old] {
            for key in layout.key_rows(batch, names)?.iter() {
                keys.insert(key.as_ref().into());
                if keys.len() > allowed {
                    return Ok(None);
                }
            }
        }
    }
    let mut base = Vec::new();
    let mut hits = Vec::with_capacity(files.len());
    for f in files {
        let mut file_hits = roaring::RoaringTreemap::new();
        let mut pos = 0u64;
        for batch in &f.batches {
            let rows = layout.key_rows(batch, KeyNames::Row)?;
            let mut take = Vec::new();
            for i in 0..batch.num_rows() {
                let p = pos + i as u64;
                if keys.contains(rows.row(i).as_ref()) && !f.marked.contains(p) {
                    take.push(i as u32);
                    file_hits.insert(p);
                }
            }
            if !take.is_empty() {
                base.push(take_indices(batch, &take)?);
            }
            pos += batch.num_rows() as u64;
        }
        hits.push(file_hits);
    }
    Ok(Some(PatchPlan { base, hits }))
}

/// The pieces `(lo, hi, start, len)` of `open` (in `hashes` order) that each of `ranges`
/// holds, those above `max_bytes` split in halves (see [`split`]). The ranges must cover every
/// hash the rows have: a gap would lose rows.
fn pieces(
    ctx: &Ctx<'_>,
    ranges: &[(u64, u64)],
    (hashes, open): (&[u64], &RecordBatch),
    max_bytes: u64,
) -> Result<Vec<(u64, u64, usize, usize)>, CompactError> {
    let mut pieces = Vec::with_capacity(ranges.len());
    for &(lo, hi) in ranges {
        split((hashes, open), lo, hi, max_bytes, &mut pieces);
    }
    if pieces.iter().map(|p| p.3).sum::<usize>() != open.num_rows() {
        return Err(ctx.fail("bucket ranges")(FoldError::BucketGap));
    }
    Ok(pieces)
}

/// Rows of `open` (sorted by key hash, `hashes`) in [lo, hi] as (lo, hi, start, len) pieces, halving the range while a
/// piece is over `max_bytes`.
fn split(
    (hashes, open): (&[u64], &RecordBatch),
    lo: u64,
    hi: u64,
    max_bytes: u64,
    pieces: &mut Vec<(u64, u64, usize, usize)>,
) {
    let start = hashes.partition_point(|&h| h < lo);
    let end = hashes.partition_point(|&h| h <= hi);
    let len = end - start;
    let bytes = if open.num_rows() == 0 {
        0
    } else {
        open.get_array_memory_size() as u64 * len as u64 / open.num_rows() as u64
    };
    if bytes > max_bytes && hi > lo && len > 1 {
        let mid = lo + (hi - lo) / 2;
        split((hashes, open), lo, mid, max_bytes, pieces);
        split((hashes, open), mid + 1, hi, max_bytes, pieces);
    } else {
        pieces.push((lo, hi, start, len));
    }
}

/// Drops repeated change rows (same `_lsn`, `_seq`): a key move or a truncate routed to
/// several buckets appears once per bucket in a unit that holds them.
fn dedup_changes(batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, FoldError> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(batches.len());
    for batch in batches {
        let int64 = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| {
                    c.as_any()
                        .downcast_ref::<deltalake::arrow::array::Int64Array>()
                })
                .cloned()
                .ok_or_else(|| FoldError::MissingColumn(name.into()))
        };
        let (lsn, seq) = (int64(LSN)?, int64(SEQ)?);
        let keep: Vec<u32> = (0..batch.num_rows())
            .filter(|&i| seen.insert((lsn.value(i), seq.value(i))))
            .map(|i| i as u32)
            .collect();
        if keep.len() == batch.num_rows() {
            out.push(batch);
        } else if !keep.is_empty() {
            out.push(take_indices(&batch, &keep)?);
        }
    }
    Ok(out)
}

/// Attempts of a table's compaction that lost a race with another compactor.
const CONFLICT_RETRIES: u32 = 6;

/// Each table of a compaction pass with its outcome.
pub type Pass = Vec<(TableName, Result<TableReport, CompactError>)>;

/// Compacts `tables` (every change log when empty), [`CompactOptions::tables_at_once`] at a
/// time. A table that fails does not stop the others; its error is in its slot of the result.
pub async fn compact_all(
    sink: &Sink,
    tables: &[TableName],
    options: &CompactOptions,
) -> Result<Pass, CompactError> {
    compact_all_again(sink, tables, options, &mut Memo::default()).await
}

/// [`compact_all`] for one pass of several: tables unchanged since `memo` saw them are
/// skipped (see [`Memo`]).
///
/// Tables are compacted [`CompactOptions::tables_at_once`] at a time, sharing the memory
/// budget (see [`MemoryShare`]): a pass over thousands of tables, most of them with a few
/// changes or none, waits on storage round trips (listings, Delta log reads, commits) far
/// more than it computes. Results come in the order of `tables`.
pub async fn compact_all_again(
    sink: &Sink,
    tables: &[TableName],
    options: &CompactOptions,
    memo: &mut Memo,
) -> Result<Pass, CompactError> {
    let recheck = [options.vacuum_retention, options.changes_retention]
        .into_iter()
        .flatten()
        .fold(IDLE_RECHECK, std::cmp::min);
    let tables = if tables.is_empty() {
        let listed = list_tables(sink).await?;
        // Tables gone from the lake (dropped) are forgotten.
        let names: std::collections::HashSet<&TableName> = listed.iter().collect();
        memo.tables.retain(|name, _| names.contains(name));
        listed
    } else {
        // A table named twice is compacted once (two runs at once would race each other).
        let mut seen = std::collections::HashSet::new();
        tables.iter().filter(|t| seen.insert(*t)).cloned().collect()
    };
    let memory = MemoryShare::new(options.memory_budget);
    let runs = tables.into_iter().enumerate().map(|(i, name)| {
        let known = memo
            .tables
            .get(&name)
            .filter(|s| s.at.elapsed() < recheck)
            .cloned();
        let run = compact_known(sink, name, options, &memory, known);
        async move { (i, run.await) }
    });
    // (Started as the stream reaches them: at most `tables_at_once` at a time, a finished one
    // replaced at once, whatever the others do. They share this task: their requests
    // interleave; a fold runs on a blocking thread while other tables compact, see `step`.)
    let mut done: Vec<_> = futures::stream::iter(runs)
        .buffer_unordered(options.tables_at_once.max(1))
        .collect()
        .await;
    done.sort_unstable_by_key(|(i, _)| *i);
    let mut out = Vec::with_capacity(done.len());
    for (_, (name, result, remember)) in done {
        match remember {
            Remember::Keep => {}
            Remember::Forget => {
                memo.tables.remove(&name);
            }
            Remember::Seen(seen) => {
                memo.tables.insert(name.clone(), *seen);
            }
        }
        out.push((name, result));
    }
    Ok(out)
}

/// What a pass's memo keeps of a table once it is done.
enum Remember {
    /// As it was (the table was skipped).
    Keep,
    Forget,
    Seen(Box<Seen>),
}

/// One table of [`compact_all_again`]: skipped when its logs have not moved since `known`,
/// else compacted (retried after races lost to another compactor).
async fn compact_known(
    sink: &Sink,
    name: TableName,
    options: &CompactOptions,
    memory: &MemoryShare,
    known: Option<Seen>,
) -> (TableName, Result<TableReport, CompactError>, Remember) {
    let _in_hand = memory.enter();
    let started = std::time::Instant::now();
    // Listed before any run: changes committed while it folds make the next pass a full
    // one (the run's own commits do too, once). A failed listing only costs the skip.
    let before = log_versions(sink, &name, known.as_ref()).await;
    if let (Some(seen), Ok(versions)) = (&known, &before) {
        if versions.0 == seen.changes && versions.1 == seen.history {
            let report = seen.report.clone();
            return (name, Ok(report), Remember::Keep);
        }
    }
    let mut result = compact_table_sharing(sink, &name, options, memory).await;
    // A lost race (another compactor: `run`'s background one and `compact` or `verify`)
    // is retried against the new state, a few times, after a short random pause.
    for attempt in 1..CONFLICT_RETRIES {
        if !matches!(result, Err(CompactError::Conflict { .. })) {
            break;
        }
        let pause = std::time::Duration::from_millis(50 * attempt as u64);
        tokio::time::sleep(crate::pipeline::jitter(pause)).await;
        result = compact_table_sharing(sink, &name, options, memory).await;
    }
    match &result {
        Ok(r) if r.changes > 0 || r.steps > 0 => tracing::info!(
            table = %name,
            changes = r.changes,
            steps = r.steps,
            buckets_rewritten = r.buckets_rewritten,
            buckets_patched = r.buckets_patched,
            buckets = r.buckets_total,
            versions_closed = r.history_versions_closed,
            tombstones_retired = r.history_tombstones_retired,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compacted"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(table = %name, error = %crate::pipeline::error_chain(e), "compaction failed")
        }
    }
    let remember = match (&result, before) {
        (Ok(r), Ok((changes, history))) if !r.load_in_progress && !r.maintenance_failed => {
            // What a skipped pass reports.
            let report = TableReport {
                table: r.table.clone(),
                from_version: r.to_version,
                to_version: r.to_version,
                buckets_total: r.buckets_total,
                current_bytes_total: r.current_bytes_total,
                unchanged: true,
                ..Default::default()
            };
            Remember::Seen(Box::new(Seen {
                changes,
                history,
                at: started,
                report,
            }))
        }
        _ => Remember::Forget,
    };
    (name, result, remember)
}

/// Compaction every `interval` in a thread of its own (its own runtime), so that folding
/// never blocks the replication stream's reads and status updates; it folds on one core
/// fewer than there are (at least one), leaving one to the stream. Stops when `stop` is set;
/// an interrupted pass is safe (see the module doc).
pub fn spawn_background(
    sink: Sink,
    interval: std::time::Duration,
    options: CompactOptions,
    metrics: Arc<crate::metrics::Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("slotlake-compact".into())
        .spawn(move || {
            let options = CompactOptions {
                fold_threads: all_cores().saturating_sub(1).max(1),
                ..options
            };
            // Multi-threaded (one worker): on a current-thread runtime deltalake starts an OS
            // thread for each Delta log read (see `main`).
            let runtime = match crate::lake::changelog::one_worker_runtime("slotlake-compact-io") {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the compaction thread");
                    return;
                }
            };
            runtime.block_on(async move {
                let mut stop = stop;
                let mut memo = Memo::default();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    let started = std::time::Instant::now();
                    let pass = tokio::select! {
                        r = compact_all_again(&sink, &[], &options, &mut memo) => r,
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    record(&metrics, &pass, started.elapsed());
                }
            });
        })
}

/// Compaction metrics of one pass.
pub fn record(
    metrics: &crate::metrics::Metrics,
    pass: &Result<Pass, CompactError>,
    elapsed: std::time::Duration,
) {
    metrics.compaction_duration.observe(elapsed.as_secs_f64());
    match pass {
        Ok(tables) => {
            for (_, r) in tables {
                match r {
                    Ok(r) if r.unchanged => {
                        metrics.compactions.with_label_values(&["unchanged"]).inc();
                    }
                    Ok(r) => {
                        metrics.compactions.with_label_values(&["ok"]).inc();
                        metrics.compacted_changes.inc_by(r.changes);
                        for (action, n) in [
                            ("merged", r.changelog_files_merged + r.history_files_merged),
                            (
                                "written",
                                r.changelog_files_written + r.history_files_written,
                            ),
                            ("expired", r.changelog_files_expired),
                            ("vacuumed", r.files_vacuumed),
                        ] {
                            metrics
                                .maintenance_files
                                .with_label_values(&[action])
                                .inc_by(n);
                        }
                    }
                    Err(_) => metrics.compactions.with_label_values(&["error"]).inc(),
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %crate::pipeline::error_chain(e), "compaction pass failed");
            metrics.compactions.with_label_values(&["error"]).inc();
        }
    }
}

/// The runtime closed-version writers drive their uploads on: one for the process, never
/// dropped, because pooled HTTP connections (S3) stay bound to the runtime that opened them and
/// other runtimes reuse them.
fn writer_runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("slotlake-upload")
        .enable_all()
        .build()?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// Closed versions of a committing step from which they are split between two writers (tests
/// split tiny steps, so that their tables have two closed files).
#[cfg(not(test))]
const SPLIT_CLOSED_ROWS: usize = 256 * 1024;
#[cfg(test)]
const SPLIT_CLOSED_ROWS: usize = 8;

/// Writes the versions the steps up to a commit close to a `closed-<id>.parquet` of the
/// history table, in a thread of its own (with its own runtime), so that encoding them overlaps
/// the fold, the bucket rewrites and the next step on the caller's thread. A hand-over waits
/// until the writer is done with the one before: a step's parts hold its change batches, and
/// at most two steps' are held. A step that commits splits its parts between two writers
/// (two files) when they are many: one would encode them alone after everything else is done,
/// the other core idle (44–188 ms of a 10M-change compaction).
struct ClosedWriter {
    store: Arc<dyn ObjectStore>,
    schema: SchemaRef,
    writers: Vec<ClosedFile>,
}

/// One writer thread of a [`ClosedWriter`] and its file.
struct ClosedFile {
    tx: Option<std::sync::mpsc::SyncSender<ClosedBatches>>,
    thread: Option<std::thread::JoinHandle<Result<Option<Add>, ClosedWriteError>>>,
}

#[derive(Debug, thiserror::Error)]
enum ClosedWriteError {
    #[error("writing closed versions")]
    Parquet(#[from] deltalake::parquet::errors::ParquetError),
    #[error("the closed-version writer stopped")]
    Stopped,
    #[error("starting the closed-version writer")]
    Io(#[from] std::io::Error),
    #[error("building closed versions")]
    Fold(#[from] FoldError),
}

/// What the closed-version writer is handed: versions the fold gathered, or the rows of its
/// input it closed (built by the writer).
enum ClosedBatches {
    Gathered(RecordBatch),
    Parts(Vec<fold::ClosedPart>),
}

impl ClosedFile {
    fn start(
        store: Arc<dyn ObjectStore>,
        schema: SchemaRef,
    ) -> Result<ClosedFile, ClosedWriteError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<ClosedBatches>(0);
        let thread = std::thread::Builder::new()
            .name("slotlake-closed".into())
            .spawn(move || -> Result<Option<Add>, ClosedWriteError> {
                let runtime = writer_runtime()?;
                let mut writer: Option<(String, AsyncArrowWriter<BufWriter>)> = None;
                let mut rows = 0usize;
                while let Ok(received) = rx.recv() {
                    let batches: Box<dyn Iterator<Item = Result<RecordBatch, FoldError>>> =
                        match received {
                            ClosedBatches::Gathered(batch) => Box::new(std::iter::once(Ok(batch))),
                            ClosedBatches::Parts(parts) => {
                                Box::new(parts.into_iter().map(fold::ClosedPart::build))
                            }
                        };
                    for batch in batches {
                        let batch = batch?;
                        if writer.is_none() {
                            writer = Some(closed_file(&store, &schema)?);
                        }
                        if let Some((_, w)) = writer.as_mut() {
                            rows += batch.num_rows();
                            runtime.block_on(w.write(&batch))?;
                        }
                    }
                }
                let Some((file, mut w)) = writer else {
                    return Ok(None);
                };
                runtime.block_on(w.finish())?;
                Ok(Some(new_add(file, w.bytes_written() as i64, rows)))
            })?;
        Ok(ClosedFile {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Waits for the file; `None` when nothing was written to it.
    fn finish(&mut self) -> Result<Option<Add>, ClosedWriteError> {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            _ => Err(ClosedWriteError::Stopped),
        }
    }
}

impl ClosedWriter {
    fn start(
        store: Arc<dyn ObjectStore>,
        schema: SchemaRef,
    ) -> Result<ClosedWriter, ClosedWriteError> {
        let first = ClosedFile::start(store.clone(), schema.clone())?;
        Ok(ClosedWriter {
            store,
            schema,
            writers: vec![first],
        })
    }

    fn send(&self, batch: RecordBatch) -> Result<(), FoldError> {
        self.hand(0, ClosedBatches::Gathered(batch))
    }

    /// Hands over the closed parts of a fold. Those of a step that commits (`last`), when
    /// there are [`SPLIT_CLOSED_ROWS`] or more, are split between two writers by rows.
    fn send_parts(
        &mut self,
        mut parts: Vec<fold::ClosedPart>,
        last: bool,
    ) -> Result<(), FoldError> {
        if parts.is_empty() {
            return Ok(());
        }
        let rows: usize = parts.iter().map(fold::ClosedPart::rows).sum();
        if last && parts.len() > 1 && rows >= SPLIT_CLOSED_ROWS {
            if self.writers.len() < 2 {
                match ClosedFile::start(self.store.clone(), self.schema.clone()) {
                    Ok(w) => self.writers.push(w),
                    Err(e) => tracing::debug!(error = %e, "no second closed-version writer"),
                }
            }
            if self.writers.len() > 1 {
                let mut taken = 0;
                let half = parts
                    .iter()
                    .position(|p| {
                        taken += p.rows();
                        taken * 2 >= rows
                    })
                    .map_or(parts.len(), |i| i + 1)
                    .min(parts.len() - 1);
                let second = parts.split_off(half);
                self.hand(1, ClosedBatches::Parts(second))?;
            }
        }
        self.hand(0, ClosedBatches::Parts(parts))
    }

    fn hand(&self, writer: usize, batches: ClosedBatches) -> Result<(), FoldError> {
        let tx = self.writers.get(writer).and_then(|w| w.tx.as_ref());
        match tx.map(|tx| tx.send(batches)) {
            Some(Ok(())) => Ok(()),
            // The writer failed; its error comes out of `finish`.
            _ => Err(FoldError::OutputClosed),
        }
    }

    /// Why a writer stopped taking batches (its own error says).
    fn failure(self) -> ClosedWriteError {
        self.finish().err().unwrap_or(ClosedWriteError::Stopped)
    }

    /// Waits for the files (none when nothing was closed); the first error if any failed.
    fn finish(mut self) -> Result<Vec<Add>, ClosedWriteError> {
        for w in &mut self.writers {
            w.tx = None;
        }
        // Every writer joined before the first error is returned.
        let done: Vec<_> = self.writers.iter_mut().map(ClosedFile::finish).collect();
        let files = done.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(files.into_iter().flatten().collect())
    }
}

/// Rows `indices` of `batch` (Arrow's take, for every column).
fn take_indices(batch: &RecordBatch, indices: &[u32]) -> Result<RecordBatch, FoldError> {
    let idx = deltalake::arrow::array::UInt32Array::from(indices.to_vec());
    Ok(deltalake::arrow::compute::take_record_batch(batch, &idx)?)
}

/// A data file read whole (one GET: files are bounded by the bucket or target file size, and
/// one request beats many ranged ones on S3), its batches conformed to `schema`.
pub async fn read_parquet_file(
    store: &dyn ObjectStore,
    path: &str,
    schema: &SchemaRef,
) -> Result<Vec<RecordBatch>, BoxError> {
    let location = Path::parse(path)?;
    let bytes = store.get(&location).await?.bytes().await?;
    decode_parquet(bytes, schema)
}

/// The rows of a current or history table's data file: [`read_parquet_file`] without the rows
/// its deletion vector marks.
pub async fn read_table_file(
    store: &dyn ObjectStore,
    path: &str,
    dv: Option<&DeletionVectorDescriptor>,
    schema: &SchemaRef,
) -> Result<Vec<RecordBatch>, BoxError> {
    let batches = read_parquet_file(store, path, schema).await?;
    match dv {
        Some(dv) => drop_marked(batches, &dv::decode(dv)?),
        None => Ok(batches),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The record batches of a whole Parquet file, conformed to `schema`; only the columns it
/// names are decoded (not a change log's `_xid` and `_special`, which compaction does not use).
fn decode_parquet(bytes: bytes::Bytes, schema: &SchemaRef) -> Result<Vec<RecordBatch>, BoxError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let wanted = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| schema.field_with_name(f.name()).is_ok())
        .map(|(i, _)| i);
    let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(READ_BATCH_ROWS)
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        out.push(conform(&batch?, schema)?);
    }
    Ok(out)
}

/// [`read_parquet_file`] in the background, decoding on the blocking pool: several files
/// decode at once, and a file is read while the caller works on another.
fn spawn_read(
    store: Arc<dyn ObjectStore>,
    path: String,
    schema: SchemaRef,
) -> tokio::task::JoinHandle<Result<Vec<RecordBatch>, BoxError>> {
    tokio::spawn(async move {
        let location = Path::parse(&path)?;
        let bytes = store.get(&location).await?.bytes().await?;
        tokio::task::spawn_blocking(move || decode_parquet(bytes, &schema)).await?
    })
}
