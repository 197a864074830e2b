//! Change-log tables: one Delta table per source table at `<sink>/changes/<schema>/<table>/`,
//! and the commit protocol that makes them exactly-once.
//!
//! Data flow: the pipeline appends Arrow batches of changes; the table's Parquet writer
//! streams them to data files under the table (zstd, dictionaries, page statistics). Nothing
//! is visible until [`ChangeLogTable::commit`] writes one Delta log entry that adds those files
//! together with a `txn` action — app id derived from the slot, version = the commit LSN of the
//! last source transaction included. Delta log entries are conditional puts, so a commit is
//! atomic; and because every commit covers whole source transactions, the table's `txn`
//! version says exactly which transactions it already holds: after a restart, Postgres resends
//! from the slot's confirmed LSN and changes with commit LSN ≤ that version are skipped.
//!
//! A commit whose outcome is unknown (the request failed after the server may have applied it)
//! is resolved by re-reading the table's `txn` version — never by committing twice. Data files
//! of a commit that never happened are unreferenced orphans, invisible to readers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::engine::arrow_conversion::{TryIntoArrow, TryIntoKernel};
use deltalake::kernel::transaction::CommitData;
use deltalake::kernel::{Action, Add, Metadata, MetadataExt, Protocol, StructType, Transaction};
use deltalake::logstore::{CommitOrBytes, LogStoreRef};
use deltalake::parquet::basic::{Compression, Encoding, ZstdLevel};
use deltalake::parquet::file::properties::{
    EnabledStatistics, WriterProperties, WriterPropertiesBuilder,
};
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter, WriteMode};
use deltalake::{DeltaTable, DeltaTableError};
use uuid::Uuid;

use super::store::Sink;
use crate::batch::rows::{COMMIT_TS, LSN, OP, SEQ, SPECIAL, UNCHANGED, XID};
use crate::lsn::Lsn;
use crate::replication::sql::TableName;
use crate::types::arrow::LIST_ELEMENT;

/// Rows per Parquet row group of streamed change logs: bounds the writer's in-memory encoding
/// buffer per table, with thousands of tables open at once.
const ROW_GROUP_ROWS: usize = 64 * 1024;
/// Rows per Parquet row group of files written a few at a time ([`writer_properties`]). Each
/// row group starts its dictionaries afresh, and interning values until a unique column's
/// dictionary gives up was a tenth of an initial load's CPU with 64K-row groups.
const BULK_ROW_GROUP_ROWS: usize = 1024 * 1024;
/// Bound on a bulk row group's encoded bytes (wide rows): its pages stay in memory until it
/// is complete.
const BULK_ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Rows a column writer keeps before it encodes them into a page (parquet's default
/// `data_page_row_count_limit`): what a bulk file's open row group holds unencoded.
const PAGE_ROWS: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("change log of {table}: {action} failed")]
    Delta {
        table: String,
        action: &'static str,
        #[source]
        source: Box<DeltaTableError>,
    },
    #[error("change log of {table}: opening it on its thread failed: {message}")]
    OpenTask { table: String, message: String },
    #[error("change log of {table}: commit LSN {lsn} does not fit a Delta txn version")]
    LsnOutOfRange { table: String, lsn: Lsn },
    #[error("change log of {table}: an earlier data-file write failed, so its open files are lost; the run must restart from the slot")]
    WriterFailed { table: String },
    #[error("change log of {table}: another writer committed this slot's transactions up to {version} meanwhile; the run must restart from the slot")]
    Overtaken { table: String, version: i64 },
}

impl LakeError {
    /// A data file could not be written (or another writer committed some of the same
    /// transactions, so the files written cannot be committed without doubling them):
    /// the rows in the writer are gone, so retrying the
    /// commit would lose them. Only restarting from the slot's confirmed position is safe.
    pub fn lost_buffered_rows(&self) -> bool {
        match self {
            LakeError::WriterFailed { .. } | LakeError::Overtaken { .. } => true,
            LakeError::Delta { action, .. } => matches!(*action, "write" | "stage files"),
            LakeError::LsnOutOfRange { .. } | LakeError::OpenTask { .. } => false,
        }
    }
}

/// Parquet settings shared by all of the lake's files.
fn base_properties() -> WriterPropertiesBuilder {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_dictionary_enabled(true)
        // Unique columns (keys, text) give up on the dictionary after 64 KiB instead of 1 MiB:
        // interning every value until then was the top cost of writing snapshot rows. Columns
        // with a few thousand distinct values per row group keep their dictionary.
        .set_dictionary_page_size_limit(64 * 1024)
        .set_column_dictionary_enabled(SEQ.into(), false)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
}

/// Parquet settings for streamed change logs: dictionary, then plain, zstd. Not delta-packed
/// like [`writer_properties`]: each `DELTA_BINARY_PACKED` column writer holds a 1 MiB buffer
/// for as long as its file is open, and thousands of tables stream at once (`bench-ingest.sh`
/// scenario c, 5,000 tables: peak RSS 367 MiB with it, 202 MiB without).
///
/// `_op` (three values, dictionary-encoded) and the TOAST and special lists (almost always
/// empty) are not compressed: zstd gains nothing on their pages, and parquet creates a
/// compression and a decompression context for every compressed column chunk it writes.
/// (`_lsn`, `_xid` and `_commit_ts` are runs when transactions are large, but distinct on
/// every row of single-row transactions, where their dictionary gives up and zstd shrinks the
/// plain values about fourfold.)
pub fn stream_writer_properties() -> WriterProperties {
    let mut builder =
        base_properties().set_column_compression(OP.into(), Compression::UNCOMPRESSED);
    for list in [UNCHANGED, SPECIAL] {
        let leaf = ColumnPath::new(vec![list.into(), "list".into(), LIST_ELEMENT.into()]);
        builder = builder.set_column_compression(leaf, Compression::UNCOMPRESSED);
    }
    builder.build()
}

/// Parquet settings for files written a few at a time — initial loads, current and history
/// tables, merged change-log files — of `schema`. Integer-like columns (ints, dates,
/// timestamps, decimals stored as ints) are `DELTA_BINARY_PACKED` with no dictionary: serial
/// keys, timestamps and the metadata columns (constant over a load) cost a few bits a value.
/// Interning every value of a unique integer column until its dictionary gave up took a tenth
/// of a load's instructions and left a dictionary page per row group in the file; a
/// low-cardinality integer column packs its small deltas instead. Those columns are not
/// compressed: zstd found little in the packed bits (history table of `bench-compact.sh`: 1.7 %
/// larger without it) for 2–3 % of a compaction's CPU. `_op` skips the dictionary too (one
/// value over a load, plain and zstd cost less than hashing it per row). Parquet readers of
/// Delta tables all read the encoding (part of Parquet since format 2.0).
pub fn writer_properties(schema: &Schema) -> WriterProperties {
    let mut builder = base_properties()
        .set_max_row_group_row_count(Some(BULK_ROW_GROUP_ROWS))
        .set_max_row_group_bytes(Some(BULK_ROW_GROUP_BYTES))
        .set_column_dictionary_enabled(OP.into(), false);
    for field in delta_packed(schema) {
        let column = ColumnPath::from(field.name().as_str());
        builder = builder.set_column_encoding(column.clone(), Encoding::DELTA_BINARY_PACKED);
        builder = builder.set_column_compression(column.clone(), Compression::UNCOMPRESSED);
        builder = builder.set_column_dictionary_enabled(column, false);
    }
    builder.build()
}

/// Most columns of one file [`writer_properties`] delta-packs: each such column writer holds
/// [`DELTA_WRITER_BYTES`] while the file is open, so a table with hundreds of bigint columns
/// would hold hundreds of MiB per open file.
const MAX_DELTA_COLUMNS: usize = 16;
/// The buffer a `DELTA_BINARY_PACKED` column writer allocates up front (parquet 59:
/// `DEFAULT_BIT_WRITER_SIZE`).
const DELTA_WRITER_BYTES: usize = 1 << 20;

/// The columns [`writer_properties`] delta-packs: integer-like ones, the metadata columns
/// first, at most [`MAX_DELTA_COLUMNS`].
fn delta_packed(schema: &Schema) -> Vec<&Field> {
    let metadata = |f: &&Field| [LSN, SEQ, XID, COMMIT_TS].contains(&f.name().as_str());
    let fields = schema.fields().iter().map(|f| f.as_ref());
    fields
        .clone()
        .filter(metadata)
        .chain(fields.filter(|f| !metadata(f)))
        .filter(|f| delta_packs(f.data_type()))
        .take(MAX_DELTA_COLUMNS)
        .collect()
}

/// A Delta table's schema as Arrow.
fn arrow_schema(metadata: &Metadata) -> Result<Schema, DeltaTableError> {
    let kernel = metadata.parse_schema()?;
    Ok((&kernel).try_into_arrow()?)
}

/// Arrow types written as Parquet INT32/INT64, which `DELTA_BINARY_PACKED` encodes.
fn delta_packs(ty: &DataType) -> bool {
    match ty {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::Date32
        | DataType::Timestamp(_, _) => true,
        // Decimals of up to 18 digits are stored as INT32/INT64, wider ones as fixed bytes.
        DataType::Decimal128(precision, _) => *precision <= 18,
        _ => false,
    }
}

/// Tag of a change-log file's `add` action: the Arrow size (bytes, without spare capacity) of
/// the rows written to it, what compaction plans its memory by (a Parquet size says little of
/// it when values compress very well: 1 MiB rows of repeated text shrink a thousandfold).
pub const ARROW_BYTES_TAG: &str = "slotlake.arrowBytes";

/// `adds` tagged with [`ARROW_BYTES_TAG`]: `arrow_bytes` of rows shared out by file size.
fn tag_arrow_bytes(mut adds: Vec<Add>, arrow_bytes: usize) -> Vec<Add> {
    let total: u128 = adds.iter().map(|a| a.size.max(0) as u128).sum();
    for add in &mut adds {
        let share = (arrow_bytes as u128 * add.size.max(0) as u128)
            .checked_div(total)
            .unwrap_or(0);
        add.tags
            .get_or_insert_with(HashMap::new)
            .insert(ARROW_BYTES_TAG.to_string(), Some(share.to_string()));
    }
    adds
}

/// The Delta `txn` app id for a slot: one per (source database, slot).
pub fn app_id(slot: &str) -> String {
    format!("slotlake-{slot}")
}

/// Commits between Delta checkpoints of a change log.
pub(crate) const CHECKPOINT_INTERVAL: u64 = 100;

/// Times a commit is retried on top of versions other committers took meanwhile.
const COMMIT_RACES: u32 = 8;

/// One change-log table and its open writer.
///
/// The table's file list is never held in memory: it is loaded once at open (to read the `txn`
/// version) and dropped. Commits are written straight to the Delta log as conditional puts of
/// the next version, so a commit costs one PUT whatever the size of the log — Delta's own
/// commit path re-materialises every file's statistics after each commit, which grows with
/// the table and dominated the ingest profile.
pub struct ChangeLogTable {
    name: TableName,
    log_store: LogStoreRef,
    writer: RecordBatchWriter,
    app_id: String,
    /// Latest Delta version this process knows (its own last commit, or the one it opened).
    version: u64,
    /// The table's metadata as of `version` (schema evolution rewrites it).
    metadata: Metadata,
    /// The table's protocol as of `version` (a `timestamp` column added upgrades it).
    protocol: Protocol,
    /// `txn` version of our app id: every source transaction with commit LSN ≤ this is in.
    committed: Option<Lsn>,
    /// Files written and closed but not yet committed.
    staged: Vec<Add>,
    /// The lowest commit LSN (`_lsn`) of the rows written since the last commit.
    lowest_lsn: Option<i64>,
    /// A checkpoint being written in the background, if any.
    checkpoint: Option<tokio::task::JoinHandle<()>>,
    /// Rows and Arrow bytes handed to the writer since the last stage: the writer's open row
    /// group (not in its `buffer_len`) is estimated from them.
    rows_since_stage: usize,
    arrow_bytes_since_stage: usize,
    /// The bytes those rows' values take (no spare capacity): what reading the files back
    /// decodes, recorded in their `add` actions ([`ARROW_BYTES_TAG`]).
    value_bytes_since_stage: usize,
    /// A data-file write failed: the writer must not be used again (its files are aborted).
    failed: bool,
    /// Memory an open file's column writers hold beyond the data (delta-packed columns).
    open_file_bytes: usize,
    /// Files are written with [`writer_properties`] ([`Self::for_bulk_load`]), not the
    /// streaming settings.
    bulk: bool,
}

impl ChangeLogTable {
    /// Opens the change log of `name`, creating it with `schema` when it does not exist.
    pub async fn open(
        sink: &Sink,
        name: &TableName,
        app_id: &str,
        schema: &SchemaRef,
        target_file_size: u64,
    ) -> Result<ChangeLogTable, LakeError> {
        let opened = Self::open_reading(sink, name, app_id, schema, target_file_size, None).await;
        Ok(opened?.0)
    }

    /// [`Self::open`], also reading the `txn` version of another app id (an initial load's
    /// chunk count, see `crate::snapshot`) from the same load of the log.
    ///
    /// The work runs on [`open_runtime`], whatever runtime the caller is on: opening reads
    /// the Delta log about ten times, and on a current-thread runtime (the stream's, the
    /// CLI's) deltalake runs each read's kernel engine on a new OS thread — about 50,000
    /// threads for 5,000 new tables. A dropped call lets the open finish (it is idempotent).
    pub async fn open_reading(
        sink: &Sink,
        name: &TableName,
        app_id: &str,
        schema: &SchemaRef,
        target_file_size: u64,
        other_app: Option<&str>,
    ) -> Result<(ChangeLogTable, Option<i64>), LakeError> {
        let failed = |message: String| LakeError::OpenTask {
            table: name.to_string(),
            message,
        };
        let task = open_runtime().map_err(failed)?.spawn(Self::open_here(
            sink.clone(),
            name.clone(),
            app_id.to_owned(),
            schema.clone(),
            target_file_size,
            other_app.map(str::to_owned),
        ));
        task.await.map_err(|e| failed(e.to_string()))?
    }

    /// [`Self::open_reading`] on the runtime it is called on (owned arguments: spawned).
    async fn open_here(
        sink: Sink,
        name: TableName,
        app_id: String,
        schema: SchemaRef,
        target_file_size: u64,
        other_app: Option<String>,
    ) -> Result<(ChangeLogTable, Option<i64>), LakeError> {
        let (sink, name, app_id, schema) = (&sink, &name, app_id.as_str(), &schema);
        let other_app = other_app.as_deref();
        let err = |action: &'static str| {
            let table = name.to_string();
            move |source| LakeError::Delta {
                table,
                action,
                source: Box::new(source),
            }
        };
        let path = sink.table_path(&["changes", &name.schema, &name.name]);
        let (log_store, prefixed, _) = sink.table_store(&path);
        // Look before loading: a missing table is the normal first run, not an error to log.
        let exists =
            super::store::has_delta_log(prefixed.as_ref(), &object_store::path::Path::default())
                .await
                .map_err(|e| err("list")(e.into()))?;
        let mut table = DeltaTable::new(log_store.clone());
        if exists {
            table.load().await.map_err(err("open"))?;
        } else {
            let columns: StructType = schema
                .as_ref()
                .try_into_kernel()
                .map_err(|e| err("schema conversion")(e.into()))?;
            let created = deltalake::operations::create::CreateBuilder::new()
                .with_log_store(log_store.clone())
                .with_table_name(name.name.clone())
                .with_comment(format!("slotlake change log of {name}"))
                .with_columns(columns.fields().cloned())
                .await;
            table = match created {
                Ok(t) => t,
                // Created concurrently, or by an earlier attempt whose answer was lost.
                Err(create_err) => {
                    let mut t = DeltaTable::new(log_store.clone());
                    if t.load().await.is_err() {
                        return Err(err("create")(create_err));
                    }
                    t
                }
            };
        }
        let snapshot = table.snapshot().map_err(err("snapshot"))?;
        let committed = snapshot
            .transaction_version(log_store.as_ref(), app_id)
            .await
            .map_err(err("read txn version"))?
            .map(|v| Lsn(v as u64));
        let other = match other_app {
            Some(app) => snapshot
                .transaction_version(log_store.as_ref(), app)
                .await
                .map_err(err("read txn version"))?,
            None => None,
        };
        let version = snapshot.version();
        let metadata = snapshot.metadata().clone();
        let protocol = snapshot.protocol().clone();
        let writer = RecordBatchWriter::for_table(&table)
            .map_err(err("writer"))?
            .with_writer_properties(stream_writer_properties())
            .with_target_file_size(target_file_size);
        let table = ChangeLogTable {
            name: name.clone(),
            log_store,
            writer,
            app_id: app_id.to_string(),
            version,
            metadata,
            protocol,
            committed,
            staged: Vec::new(),
            lowest_lsn: None,
            checkpoint: None,
            rows_since_stage: 0,
            arrow_bytes_since_stage: 0,
            value_bytes_since_stage: 0,
            failed: false,
            open_file_bytes: 0,
            bulk: false,
        };
        Ok((table, other))
    }

    pub fn name(&self) -> &TableName {
        &self.name
    }

    /// The commit LSN of the last source transaction this table holds.
    pub fn committed_lsn(&self) -> Option<Lsn> {
        self.committed
    }

    /// Writes this table's next files with [`writer_properties`] (an initial load's: a few
    /// tables at a time) instead of the streaming settings. Call before writing.
    pub fn for_bulk_load(mut self) -> Result<ChangeLogTable, LakeError> {
        let schema = self.schema()?;
        self.writer = self
            .writer
            .with_writer_properties(writer_properties(&schema));
        self.open_file_bytes = delta_packed(&schema).len() * DELTA_WRITER_BYTES;
        self.bulk = true;
        Ok(self)
    }

    /// The table's current schema (as committed), as Arrow.
    pub fn schema(&self) -> Result<SchemaRef, LakeError> {
        arrow_schema(&self.metadata)
            .map(Arc::new)
            .map_err(|source| LakeError::Delta {
                table: self.name.to_string(),
                action: "schema",
                source: Box::new(source),
            })
    }

    /// Appends a batch. Columns the table does not have yet are added at the next commit;
    /// columns the batch lacks are written as nulls.
    pub async fn write(&mut self, batch: RecordBatch) -> Result<(), LakeError> {
        let table = self.name.to_string();
        if self.failed {
            return Err(LakeError::WriterFailed { table });
        }
        // A column the writer lacks makes it seal its open file and start a wider one. The
        // files are staged first, so that the Arrow bytes a stage records are shared out over
        // files of one schema: narrow rows and wide, very compressible ones (a large text
        // column added) would otherwise split them by Parquet size, and the wide file, whose
        // size says least of its rows, would get the smallest share.
        if self.writer.buffered_record_batch_count() > 0 {
            let current = self.writer.arrow_schema();
            let widens = batch
                .schema()
                .fields()
                .iter()
                .any(|f| current.field_with_name(f.name()).is_err());
            if widens {
                self.stage().await?;
            }
        }
        self.rows_since_stage += batch.num_rows();
        self.arrow_bytes_since_stage += batch.get_array_memory_size();
        self.value_bytes_since_stage += batch
            .columns()
            .iter()
            .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
            .sum::<usize>();
        let lowest = batch
            .column_by_name(crate::batch::rows::LSN)
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<deltalake::arrow::array::Int64Array>()
            })
            .and_then(deltalake::arrow::compute::min);
        self.lowest_lsn = self.lowest_lsn.into_iter().chain(lowest).min();
        let written = self
            .writer
            .write_with_mode(batch, WriteMode::MergeSchema)
            .await;
        self.failed = written.is_err();
        written.map_err(|source| LakeError::Delta {
            table,
            action: "write",
            source: Box::new(source),
        })
    }

    /// Memory the writer holds since the last stage or commit: encoded row groups, plus the
    /// open row group, estimated from the Arrow size of its rows — twice it, because that is
    /// what was measured: with 100 tables × 10,000 open rows, an Arrow size of 220 MB came
    /// with 330 MB of resident memory above the process's base (`scripts/bench-ingest.sh`
    /// scenario a, `FLUSH_INTERVAL=10s`). With many tables, open row groups are most of the
    /// memory, and the Parquet writer does not report their size. A bulk file's writer
    /// encodes a page every [`PAGE_ROWS`] rows, so at most that many count as open.
    pub fn buffered_bytes(&self) -> usize {
        // Rows of the open row group the writer holds unencoded: all of them when streaming (a
        // table's pages rarely fill within a flush), at most a page's in bulk files.
        let open_rows = if self.bulk {
            (self.rows_since_stage % BULK_ROW_GROUP_ROWS).min(PAGE_ROWS)
        } else {
            self.rows_since_stage % ROW_GROUP_ROWS
        };
        let open = self
            .arrow_bytes_since_stage
            .checked_div(self.rows_since_stage)
            .map_or(0, |per_row| 2 * per_row * open_rows);
        let file = if self.writer.buffered_record_batch_count() > 0 {
            self.open_file_bytes
        } else {
            0
        };
        self.writer.buffer_len() + open + file
    }

    /// Closes the files written so far (they stay invisible until the next commit) so that
    /// the writer's buffers are released.
    pub async fn stage(&mut self) -> Result<(), LakeError> {
        let table = self.name.to_string();
        if self.failed {
            return Err(LakeError::WriterFailed { table });
        }
        if self.writer.buffered_record_batch_count() == 0 {
            return Ok(());
        }
        let flushed = self.writer.flush().await;
        self.failed = flushed.is_err();
        let adds = flushed.map_err(|source| LakeError::Delta {
            table,
            action: "stage files",
            source: Box::new(source),
        })?;
        // The flushed writer keeps its (possibly widened) schema for the next files.
        self.staged
            .extend(tag_arrow_bytes(adds, self.value_bytes_since_stage));
        self.rows_since_stage = 0;
        self.arrow_bytes_since_stage = 0;
        self.value_bytes_since_stage = 0;
        Ok(())
    }

    /// Closes what was written and hands over the files: staged, never committed by this
    /// writer (a resumed load's copies, which the stream commits later: see `crate::snapshot`).
    pub async fn take_staged(&mut self) -> Result<Vec<Add>, LakeError> {
        self.stage().await?;
        Ok(std::mem::take(&mut self.staged))
    }

    /// Stages files another writer wrote (see [`Self::take_staged`]), whose rows are at
    /// `lsn` and above, for the next commit (refused like written rows if another writer of
    /// the slot committed past `lsn` meanwhile: [`LakeError::Overtaken`]).
    pub fn adopt(&mut self, adds: Vec<Add>, lsn: i64) {
        self.staged.extend(adds);
        self.lowest_lsn = self.lowest_lsn.into_iter().chain([lsn]).min();
    }

    /// True when there is something to commit.
    pub fn has_pending(&self) -> bool {
        !self.staged.is_empty() || self.writer.buffered_record_batch_count() > 0
    }

    /// Commits everything written so far as the transactions up to `version`. Idempotent: if
    /// an earlier attempt actually landed, it is recognised and not repeated.
    /// Returns the number of data files and their bytes that became visible.
    pub async fn commit(&mut self, version: Lsn) -> Result<(u64, u64), LakeError> {
        self.stage().await?;
        if self.staged.is_empty() {
            return Ok((0, 0));
        }
        let txn = Transaction::new(&self.app_id, self.txn_version(version)?);
        let counted = self.commit_txns(vec![txn]).await?;
        self.committed = Some(version);
        Ok(counted)
    }

    /// Commits everything written so far — even nothing — marked with `progress` as the
    /// version of app id `app` (an initial load's chunks, see `crate::snapshot`), and, with
    /// `done`, as the transactions up to `done` too. Idempotent like [`Self::commit`], by
    /// `app`'s version.
    pub async fn commit_progress(
        &mut self,
        app: &str,
        progress: i64,
        done: Option<Lsn>,
    ) -> Result<(u64, u64), LakeError> {
        self.stage().await?;
        let mut txns = vec![Transaction::new(app, progress)];
        if let Some(lsn) = done {
            txns.push(Transaction::new(&self.app_id, self.txn_version(lsn)?));
        }
        let counted = self.commit_txns(txns).await?;
        if done.is_some() {
            self.committed = done;
        }
        Ok(counted)
    }

    fn txn_version(&self, lsn: Lsn) -> Result<i64, LakeError> {
        i64::try_from(lsn.0).map_err(|_| LakeError::LsnOutOfRange {
            table: self.name.to_string(),
            lsn,
        })
    }

    /// Writes the next log entry: the staged files and `txns`, the first of which tells
    /// whether an attempt whose answer was lost landed after all.
    async fn commit_txns(&mut self, txns: Vec<Transaction>) -> Result<(u64, u64), LakeError> {
        let table_name = self.name.to_string();
        let err = |action: &'static str| {
            let table = table_name.clone();
            move |source| LakeError::Delta {
                table,
                action,
                source: Box::new(source),
            }
        };
        let writer_schema = self.writer.arrow_schema();
        // One writer per slot, but maintenance (change-log optimize, retention, vacuum) may
        // commit too: a version someone else took is retried on top of theirs. Whether an
        // earlier attempt of this very commit landed without us hearing the answer is told
        // by reading the log, never by guessing.
        let mut attempt = 0;
        let new_metadata = loop {
            let (bytes, new_metadata) = self.commit_bytes(&writer_schema, &txns)?;
            let next = self.version + 1;
            let written = self
                .log_store
                .write_commit_entry(next, CommitOrBytes::LogBytes(bytes), Uuid::new_v4())
                .await;
            let e = match written {
                Ok(()) => {
                    self.version = next;
                    break new_metadata;
                }
                Err(e) => e,
            };
            let (landed, overtaken) = self
                .resolve_failed_commit(&txns[0])
                .await
                .map_err(err("read the log after a failed commit"))?;
            if landed {
                break None;
            }
            // Another writer of this slot (a stale one of an earlier run) committed
            // transactions that the files staged here hold too: committing them on top would
            // double those rows.
            if let Some(version) = overtaken.filter(|&v| self.lowest_lsn.is_some_and(|l| l <= v)) {
                return Err(LakeError::Overtaken {
                    table: table_name,
                    version,
                });
            }
            attempt += 1;
            if self.version < next || attempt >= COMMIT_RACES {
                return Err(err("commit")(e.into()));
            }
            tracing::debug!(table = %table_name, version = next, "change-log version taken by another committer; retrying on top");
        };
        if let Some((m, p)) = new_metadata {
            self.metadata = m;
            if let Some(p) = p {
                self.protocol = p;
            }
        }
        let files = self.staged.len() as u64;
        let bytes = self.staged.iter().map(|a| a.size.max(0) as u64).sum();
        self.staged.clear();
        self.lowest_lsn = None;
        if self.version.is_multiple_of(CHECKPOINT_INTERVAL) {
            self.start_checkpoint();
        }
        Ok((files, bytes))
    }

    /// The log entry of a commit of the staged files with `txns`, on top of the version and
    /// metadata this table knows; with the widened metadata when the schema grew.
    fn commit_bytes(
        &self,
        writer_schema: &SchemaRef,
        txns: &[Transaction],
    ) -> Result<(bytes::Bytes, Option<Evolved>), LakeError> {
        let err = |action: &'static str| {
            let table = self.name.to_string();
            move |source| LakeError::Delta {
                table,
                action,
                source: Box::new(source),
            }
        };
        let mut actions: Vec<Action> = self.staged.iter().cloned().map(Action::Add).collect();
        let current = self
            .metadata
            .parse_schema()
            .map_err(|e| err("schema")(e.into()))?;
        let mut new_metadata = None;
        if let Some(widened) = widen(&current, writer_schema).map_err(err("schema evolution"))? {
            let metadata = self
                .metadata
                .clone()
                .with_schema(&widened)
                .map_err(|e| err("schema evolution")(e.into()))?;
            actions.push(Action::Metadata(metadata.clone()));
            let protocol = protocol_upgrade(Some(&self.protocol), &widened, false)
                .map_err(|e| err("schema evolution")(e.into()))?;
            if let Some(p) = &protocol {
                actions.push(Action::Protocol(p.clone()));
            }
            new_metadata = Some((metadata, protocol));
        }
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        let data = CommitData::new(actions, operation, HashMap::new(), txns.to_vec());
        let bytes = data
            .get_bytes()
            .map_err(|e| err("serialize commit")(e.into()))?;
        Ok((bytes, new_metadata))
    }

    /// After a commit attempt failed: reload the table's version, metadata and `txn` version,
    /// so that a commit that did land is recognised (`mark`'s app id has reached its version)
    /// and a retry targets the right version. Also returns our app id's version when another
    /// writer moved it meanwhile: a backfill (its rows are below ours), or a stale writer of
    /// an earlier run still committing (the staged files may hold what it committed).
    async fn resolve_failed_commit(
        &mut self,
        mark: &Transaction,
    ) -> Result<(bool, Option<i64>), DeltaTableError> {
        let before = self.committed;
        let mut table = DeltaTable::new(self.log_store.clone());
        table.load().await?;
        let snapshot = table.snapshot()?;
        let ours = snapshot
            .transaction_version(self.log_store.as_ref(), &self.app_id)
            .await?;
        // Our own lost attempt lands exactly at its version; anything else that moved our
        // version was written by someone else.
        let landed = if mark.app_id == self.app_id {
            ours == Some(mark.version)
        } else {
            snapshot
                .transaction_version(self.log_store.as_ref(), &mark.app_id)
                .await?
                .is_some_and(|v| v >= mark.version)
        };
        self.version = snapshot.version();
        self.metadata = snapshot.metadata().clone();
        self.protocol = snapshot.protocol().clone();
        if let Some(v) = ours {
            if self.committed.is_none_or(|c| (c.0 as i64) < v) {
                self.committed = Some(Lsn(v as u64));
            }
        }
        let overtaken = ours.filter(|&v| before.is_none_or(|c| (c.0 as i64) < v));
        Ok((landed, overtaken))
    }

    /// Writes a Delta checkpoint of the current version in the background, so that readers
    /// and restarts do not replay an ever longer JSON log. A failure only costs a warning:
    /// the next interval tries again.
    fn start_checkpoint(&mut self) {
        if self.checkpoint.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let log_store = self.log_store.clone();
        let name = self.name.to_string();
        let version = self.version;
        self.checkpoint = Some(tokio::spawn(async move {
            if let Err(e) = write_checkpoint(log_store, version).await {
                tracing::warn!(table = %name, version, error = %e, "cannot write a change-log checkpoint");
            }
        }));
    }

    /// Current Delta version (for tests and logs).
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// The runtime change logs are opened on (one worker thread, `slotlake-open`, started on
/// first use and kept for the process): see [`ChangeLogTable::open_reading`].
fn open_runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| one_worker_runtime("slotlake-open"))
        .as_ref()
        .map_err(|e| format!("cannot start the thread that opens change logs: {e}"))
}

/// A multi-threaded tokio runtime with one worker thread.
pub fn one_worker_runtime(name: &str) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// The table schema widened by the fields `batch_schema` adds, or `None` when it adds none.
pub(crate) fn widen(
    table: &StructType,
    batch_schema: &SchemaRef,
) -> Result<Option<StructType>, DeltaTableError> {
    let existing: HashSet<&str> = table.fields().map(|f| f.name().as_str()).collect();
    let new_fields: Vec<Field> = batch_schema
        .fields()
        .iter()
        .filter(|f| !existing.contains(f.name().as_str()))
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    if new_fields.is_empty() {
        return Ok(None);
    }
    let mut fields: Vec<deltalake::kernel::StructField> = table.fields().cloned().collect();
    for f in new_fields {
        let kernel: deltalake::kernel::StructField = (&f).try_into_kernel()?;
        fields.push(kernel);
    }
    Ok(Some(StructType::try_new(fields)?))
}

/// What a schema change commits: the widened metadata, and the protocol when it had to grow.
type Evolved = (Metadata, Option<Protocol>);

/// The protocol a table with `schema` needs when it is `protocol` now (`None`: a table this
/// commit creates), or `None` when it has what it needs: table features `timestampNtz` for a
/// `timestamp_ntz` column (a Postgres `timestamp`), `deletionVectors` when `dv`, each both a
/// reader and a writer feature (reader version 3, writer version 7). Features listed before
/// stay; the legacy writer version 2's implicit `appendOnly` and `invariants` are not listed
/// (slotlake uses neither, and delta-rs refuses to vacuum a table that lists `invariants`).
pub(crate) fn protocol_upgrade(
    protocol: Option<&Protocol>,
    schema: &StructType,
    dv: bool,
) -> Result<Option<Protocol>, serde_json::Error> {
    let mut want = Vec::new();
    if dv {
        want.push("deletionVectors");
    }
    if deltalake::kernel::contains_timestampntz(schema.fields()) {
        want.push("timestampNtz");
    }
    let mut v = match protocol {
        Some(p) => serde_json::to_value(p)?,
        None => serde_json::json!({"minReaderVersion": 1, "minWriterVersion": 2}),
    };
    let missing: Vec<&str> = want.into_iter().filter(|f| !lists_feature(&v, f)).collect();
    if missing.is_empty() {
        return Ok(None);
    }
    v["minReaderVersion"] = 3.into();
    v["minWriterVersion"] = 7.into();
    for list in ["readerFeatures", "writerFeatures"] {
        let mut features = v[list].as_array().cloned().unwrap_or_default();
        for f in &missing {
            if !features.iter().any(|x| x == f) {
                features.push((*f).into());
            }
        }
        v[list] = features.into();
    }
    serde_json::from_value(v).map(Some)
}

/// Whether a protocol (as JSON) lists `feature` as a reader and a writer feature.
fn lists_feature(protocol: &serde_json::Value, feature: &str) -> bool {
    ["readerFeatures", "writerFeatures"].iter().all(|list| {
        protocol[*list]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == feature))
    })
}

/// Whether `protocol` has `feature` as a reader and a writer feature.
pub(crate) fn has_feature(protocol: &Protocol, feature: &str) -> bool {
    [protocol.reader_features(), protocol.writer_features()]
        .iter()
        .all(|list| list.is_some_and(|l| l.iter().any(|f| f.as_ref() == feature)))
}

/// Writes a Delta checkpoint of `version` of the table behind `log_store`.
pub(crate) async fn write_checkpoint(
    log_store: LogStoreRef,
    version: u64,
) -> Result<(), DeltaTableError> {
    let mut table = DeltaTable::new(log_store);
    table.load_version(version).await?;
    deltalake::checkpoints::create_checkpoint(&table, None).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::Int64Array;

    fn batch(schema: &SchemaRef, v: i64) -> RecordBatch {
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![v]))]).unwrap()
    }

    /// A column added mid-flush (a large, very compressible text column) does not leave the
    /// wide rows' file tagged with a share of the flush's Arrow bytes by Parquet size: each
    /// file of the commit records the bytes of its own rows.
    #[tokio::test]
    async fn a_widening_write_tags_each_file_with_its_own_rows_bytes() {
        use deltalake::arrow::array::StringArray;
        let sink = Sink::open("memory://", &Default::default()).unwrap();
        let name = TableName::parse("public.t").unwrap();
        let narrow = Arc::new(Schema::new(vec![Field::new(LSN, DataType::Int64, true)]));
        let mut t = ChangeLogTable::open(&sink, &name, "slotlake-s", &narrow, 1 << 30)
            .await
            .unwrap();
        // 20,000 distinct integers: a file of about their Arrow size.
        let rows = 20_000;
        let lsns = Int64Array::from_iter_values((0..rows).map(|i| i * 7919 % 1_000_003));
        t.write(RecordBatch::try_new(narrow.clone(), vec![Arc::new(lsns)]).unwrap())
            .await
            .unwrap();
        // 100 rows of 64 KiB of one letter: 6.4 MB of Arrow, a few KB of Parquet.
        let wide = Arc::new(Schema::new(vec![
            Field::new(LSN, DataType::Int64, true),
            Field::new("doc", DataType::Utf8, true),
        ]));
        let doc = "x".repeat(64 * 1024);
        let wide_rows = RecordBatch::try_new(
            wide.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..100)),
                Arc::new(StringArray::from_iter_values(
                    (0..100).map(|_| doc.as_str()),
                )),
            ],
        )
        .unwrap();
        t.write(wide_rows).await.unwrap();
        let (files, _) = t.commit(Lsn(10)).await.unwrap();
        assert_eq!(files, 2);

        let entry = t
            .log_store
            .read_commit_entry(t.version())
            .await
            .unwrap()
            .unwrap();
        let mut tags: Vec<(u64, u64)> = Vec::new();
        for line in std::str::from_utf8(&entry).unwrap().lines() {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(add) = action.get("add") {
                let rows =
                    serde_json::from_str::<serde_json::Value>(add["stats"].as_str().unwrap())
                        .unwrap()["numRecords"]
                        .as_u64()
                        .unwrap();
                let bytes = add["tags"][ARROW_BYTES_TAG]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                tags.push((rows, bytes));
            }
        }
        tags.sort_unstable();
        let [(100, wide_bytes), (20_000, narrow_bytes)] = tags[..] else {
            panic!("expected a file of 100 rows and one of 20,000: {tags:?}");
        };
        assert!(wide_bytes >= 100 * 64 * 1024, "{tags:?}");
        assert!((160_000..200_000).contains(&narrow_bytes), "{tags:?}");
    }

    /// Integers and timestamps (metadata or not) are delta-packed from the start, text keeps
    /// dictionary then plain, 100,000 rows make one row group, and the file reads back as
    /// written.
    #[test]
    fn integer_like_columns_are_delta_packed_except_in_streamed_change_logs() {
        use deltalake::arrow::array::{StringArray, TimestampMicrosecondArray};
        use deltalake::arrow::datatypes::TimeUnit;
        use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use deltalake::parquet::arrow::ArrowWriter;
        let n = 100_000i64;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("b", DataType::Utf8, true),
            Field::new("c", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new(LSN, DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..n)),
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("row {i}")),
                )),
                Arc::new(TimestampMicrosecondArray::from_iter_values(
                    (0..n).map(|i| 1_700_000_000_000_000 + i * 1_000_000),
                )),
                Arc::new(Int64Array::from_iter_values((0..n).map(|_| 42))),
            ],
        )
        .unwrap();
        let write = |properties: WriterProperties| {
            let mut file = Vec::new();
            let mut writer =
                ArrowWriter::try_new(&mut file, schema.clone(), Some(properties)).unwrap();
            writer.write(&batch).unwrap();
            writer.close().unwrap();
            ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(file)).unwrap()
        };
        // Streamed change logs stay dictionary-then-plain (memory per open column writer).
        let streamed = write(stream_writer_properties());
        for column in 0..4 {
            let e: Vec<Encoding> = streamed
                .metadata()
                .row_group(0)
                .column(column)
                .encodings()
                .collect();
            assert!(
                !e.contains(&Encoding::DELTA_BINARY_PACKED),
                "column {column}: {e:?}"
            );
        }
        let reader = write(writer_properties(&schema));
        let encodings = |column: usize| -> Vec<Encoding> {
            let group = reader.metadata().row_group(0);
            group.column(column).encodings().collect()
        };
        assert_eq!(reader.metadata().num_row_groups(), 1);
        for column in [0, 2, 3] {
            let e = encodings(column);
            assert!(
                e.contains(&Encoding::DELTA_BINARY_PACKED),
                "column {column}: {e:?}"
            );
            assert!(
                !e.contains(&Encoding::RLE_DICTIONARY),
                "column {column}: {e:?}"
            );
        }
        let text = encodings(1);
        assert!(!text.contains(&Encoding::DELTA_BINARY_PACKED), "{text:?}");
        assert!(text.contains(&Encoding::RLE_DICTIONARY), "{text:?}");
        let read: Vec<RecordBatch> = reader.build().unwrap().map(Result::unwrap).collect();
        assert_eq!(
            deltalake::arrow::compute::concat_batches(&schema, &read).unwrap(),
            batch
        );
    }

    /// Streamed change logs compress the source columns and the metadata columns with zstd,
    /// except `_op` and the TOAST and special lists (a list's settings must name its leaf,
    /// `<name>.list.element`).
    #[test]
    fn streamed_change_logs_compress_all_but_op_and_the_lists() {
        use crate::batch::rows::{changelog_schema, ColumnSpec};
        use crate::types::PgType;
        use deltalake::arrow::array::TimestampMicrosecondArray;
        use deltalake::arrow::array::{new_null_array, ArrayRef, StringArray};
        use deltalake::parquet::arrow::ArrowWriter;
        use deltalake::parquet::file::reader::{FileReader, SerializedFileReader};
        let specs =
            [("id", PgType::Int8, true), ("b", PgType::Text, false)].map(|(name, ty, is_key)| {
                ColumnSpec {
                    name: name.into(),
                    ty,
                    is_key,
                }
            });
        let schema = changelog_schema(&specs);
        let rows = 1000;
        let columns: Vec<ArrayRef> = schema
            .fields()
            .iter()
            .map(|f| -> ArrayRef {
                match f.data_type() {
                    DataType::Int64 => Arc::new(Int64Array::from_iter_values(0..rows)),
                    DataType::Utf8 => Arc::new(StringArray::from_iter_values(
                        (0..rows).map(|i| format!("v{}", i % 7)),
                    )),
                    DataType::Timestamp(_, tz) => Arc::new(
                        TimestampMicrosecondArray::from_iter_values(0..rows)
                            .with_timezone_opt(tz.clone()),
                    ),
                    other => new_null_array(other, rows as usize),
                }
            })
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
        let mut file = Vec::new();
        let mut writer =
            ArrowWriter::try_new(&mut file, schema, Some(stream_writer_properties())).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let reader = SerializedFileReader::new(bytes::Bytes::from(file)).unwrap();
        let group = reader.metadata().row_group(0);
        let compression: HashMap<String, Compression> = group
            .columns()
            .iter()
            .map(|c| (c.column_path().string(), c.compression()))
            .collect();
        let zstd = Compression::ZSTD(ZstdLevel::default());
        for column in ["id", "b", LSN, SEQ, XID, COMMIT_TS, "_old_id"] {
            assert_eq!(
                compression.get(column),
                Some(&zstd),
                "{column}: {compression:?}"
            );
        }
        for column in [OP, "_unchanged.list.element", "_special.list.element"] {
            assert_eq!(
                compression.get(column),
                Some(&Compression::UNCOMPRESSED),
                "{column}: {compression:?}"
            );
        }
    }

    /// At most 16 columns of a file are delta-packed, the metadata columns first.
    #[test]
    fn wide_tables_delta_pack_at_most_sixteen_columns() {
        let mut fields: Vec<Field> = (0..30)
            .map(|i| Field::new(format!("c{i}"), DataType::Int64, true))
            .collect();
        fields.push(Field::new("t", DataType::Utf8, true));
        fields.push(Field::new(LSN, DataType::Int64, false));
        fields.push(Field::new(SEQ, DataType::Int64, false));
        let schema = Schema::new(fields);
        let packed: Vec<&str> = delta_packed(&schema)
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(packed.len(), MAX_DELTA_COLUMNS);
        assert_eq!(&packed[..3], [LSN, SEQ, "c0"]);
        assert!(!packed.contains(&"t"));
    }

    /// A maintenance job (change-log optimize, retention, vacuum) may take the version a
    /// commit was about to use: the commit lands on top of it instead of failing.
    #[tokio::test]
    async fn a_commit_steps_over_a_version_another_committer_took() {
        let sink = Sink::open("memory://", &Default::default()).unwrap();
        let name = TableName::parse("public.t").unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let mut t = ChangeLogTable::open(&sink, &name, "slotlake-s", &schema, 1 << 20)
            .await
            .unwrap();
        t.write(batch(&schema, 1)).await.unwrap();
        t.commit(Lsn(10)).await.unwrap();
        let mine = t.version();

        // Someone else commits the next version (an empty maintenance commit).
        let other = CommitData::new(
            Vec::new(),
            DeltaOperation::Optimize {
                predicate: None,
                target_size: 1,
            },
            HashMap::new(),
            Vec::new(),
        );
        t.log_store
            .write_commit_entry(
                mine + 1,
                CommitOrBytes::LogBytes(other.get_bytes().unwrap()),
                Uuid::new_v4(),
            )
            .await
            .unwrap();

        t.write(batch(&schema, 2)).await.unwrap();
        let (files, _) = t.commit(Lsn(20)).await.unwrap();
        assert_eq!(files, 1);
        assert_eq!(t.version(), mine + 2, "landed after the other commit");
        assert_eq!(t.committed_lsn(), Some(Lsn(20)));

        // A fresh open sees both commits' data and the latest txn version.
        let reopened = ChangeLogTable::open(&sink, &name, "slotlake-s", &schema, 1 << 20)
            .await
            .unwrap();
        assert_eq!(reopened.committed_lsn(), Some(Lsn(20)));
        assert_eq!(reopened.version(), mine + 2);
    }

    /// Two writers of the same slot on one change log (a stale one of an earlier run still
    /// committing): the one whose staged rows include transactions the other committed
    /// refuses to commit them again; one whose rows are all newer (a backfill committed below
    /// them) lands on top.
    #[tokio::test]
    async fn a_commit_overtaken_by_another_writer_of_the_slot_is_refused() {
        let sink = Sink::open("memory://", &Default::default()).unwrap();
        let name = TableName::parse("public.t").unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new(LSN, DataType::Int64, true)]));
        let open = || ChangeLogTable::open(&sink, &name, "slotlake-s", &schema, 1 << 20);
        let mut stale = open().await.unwrap();
        let mut fresh = open().await.unwrap();
        let mut newer = open().await.unwrap();
        for lsn in [10, 20] {
            stale.write(batch(&schema, lsn)).await.unwrap();
        }
        stale.commit(Lsn(20)).await.unwrap();

        for lsn in [10, 20, 30] {
            fresh.write(batch(&schema, lsn)).await.unwrap();
        }
        let refused = fresh.commit(Lsn(30)).await.unwrap_err();
        assert!(
            matches!(refused, LakeError::Overtaken { version: 20, .. }),
            "{refused}"
        );
        assert!(
            refused.lost_buffered_rows(),
            "the run restarts from the slot"
        );

        newer.write(batch(&schema, 40)).await.unwrap();
        newer.commit(Lsn(40)).await.unwrap();
        let reopened = open().await.unwrap();
        assert_eq!(reopened.committed_lsn(), Some(Lsn(40)));
        let mut table = DeltaTable::new(reopened.log_store.clone());
        table.load().await.unwrap();
        let mut rows: Vec<usize> = table
            .snapshot()
            .unwrap()
            .log_data()
            .into_iter()
            .map(|f| f.num_records().unwrap_or(0))
            .collect();
        rows.sort_unstable();
        assert_eq!(
            rows,
            [1, 2],
            "the newer writer's file (40) and the stale one's (10, 20)"
        );
    }
}
