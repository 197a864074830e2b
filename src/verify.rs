//! `slotlake verify`: the lake compared with the live source (DESIGN.md guarantee 7).
//!
//! 1. A temporary logical slot is created inside a `REPEATABLE READ READ ONLY` transaction
//!    (PostgreSQL 18 insists on read-only) with `USE_SNAPSHOT`: the transaction sees exactly
//!    the transactions whose commit record is before the slot's consistent point C, i.e. the
//!    source "as of LSN C − 1".
//! 2. Once the lake's slot has confirmed past C (everything up to C is in the change logs),
//!    each table is compacted, and its history table as of C − 1 (`_valid_from_lsn <= X AND
//!    (_valid_to_lsn > X OR _valid_to_lsn IS NULL) AND NOT _deleted`) is compared with the
//!    source rows read in that transaction: by key, and by the whole row's encoding.
//! 3. The current table is compared with the history table's open versions (they must be the
//!    same rows), which catches damage to either.
//!
//! Source rows are read with `COPY … (FORMAT binary)` (text for types without a binary parser)
//! into the same Arrow builders as streamed changes, so both sides have identical types; rows
//! are compared through Arrow's row encoding.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Int64Type, Schema, SchemaRef};
use deltalake::arrow::row::{RowConverter, SortField};
use deltalake::arrow::util::display::{ArrayFormatter, FormatOptions};
use deltalake::kernel::engine::arrow_conversion::TryIntoArrow;
use deltalake::DeltaTable;

use crate::batch::rows::ColumnSpec;
use crate::compact::fold::{Layout, DELETED, VALID_FROM_LSN, VALID_TO_LSN};
use crate::compact::{conform, CompactOptions};
use crate::lake::store::Sink;
use crate::lsn::Lsn;
use crate::replication::sql::{quote_ident, quote_literal, TableName};
use crate::replication::{ConnInfo, PgConnection, SessionKind};
use crate::types::catalog::TypeCatalog;

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The slot `slotlake run` streams from: verification waits for it to pass the snapshot.
    pub slot: String,
    pub publication: String,
    /// Only these tables (all published ones when empty).
    pub tables: Vec<TableName>,
    /// How long to wait for the slot to pass the snapshot point.
    pub wait: Duration,
    /// Differing keys printed per table.
    pub max_keys: usize,
    pub compact: CompactOptions,
}

/// The comparison of one table.
#[derive(Debug, Clone, Default)]
pub struct TableVerdict {
    pub table: String,
    pub source_rows: u64,
    pub lake_rows: u64,
    /// Keys in the source but not in the lake, in the lake but not the source, and in both
    /// with different values.
    pub missing: u64,
    pub extra: u64,
    pub different: u64,
    /// Rows of the current table that are not the history table's open versions.
    pub current_mismatch: u64,
    /// The first differing keys, rendered.
    pub keys: Vec<String>,
    /// The lake could not be read (a file is gone, a table is missing).
    pub error: Option<String>,
}

impl TableVerdict {
    pub fn ok(&self) -> bool {
        self.error.is_none()
            && self.missing == 0
            && self.extra == 0
            && self.different == 0
            && self.current_mismatch == 0
    }
}

/// What a verification compared: the snapshot LSN and each table.
#[derive(Debug, Clone)]
pub struct Verification {
    pub as_of: Lsn,
    pub tables: Vec<TableVerdict>,
}

pub async fn verify(
    info: &ConnInfo,
    sink: &Sink,
    opts: &VerifyOptions,
) -> anyhow::Result<Verification> {
    use anyhow::Context;
    let mut sql = PgConnection::connect(info, SessionKind::Sql).await?;
    let mut tables = crate::source::published_tables(&mut sql, &opts.publication).await?;
    if !opts.tables.is_empty() {
        tables.retain(|t| opts.tables.contains(t));
        for t in &opts.tables {
            if !tables.contains(t) {
                anyhow::bail!("--table {t} is not in publication {:?}", opts.publication);
            }
        }
    }

    // The source as of the consistent point of a temporary slot.
    let mut snap = PgConnection::connect(info, SessionKind::Replication).await?;
    snap.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let name = format!("slotlake_verify_{}", std::process::id());
    let rows = snap
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput USE_SNAPSHOT",
            quote_ident(&name)
        ))
        .await
        .context("cannot create the temporary slot that gives verification its snapshot")?;
    let point: Lsn = rows
        .first()
        .and_then(|r| r.get("consistent_point"))
        .and_then(|v| v.parse().ok())
        .context("CREATE_REPLICATION_SLOT returned no consistent point")?;
    let as_of = Lsn(point.0.saturating_sub(1));

    // Everything before the point must be in the change logs.
    let started = Instant::now();
    loop {
        let rows = sql
            .simple_query(&format!(
                "SELECT confirmed_flush_lsn::text AS c FROM pg_replication_slots WHERE slot_name = {}",
                quote_literal(&opts.slot)
            ))
            .await?;
        let confirmed: Option<Lsn> = rows
            .first()
            .and_then(|r| r.get("c"))
            .and_then(|v| v.parse().ok());
        match confirmed {
            None => anyhow::bail!(
                "slot {:?} does not exist: verify compares the lake that `slotlake run --slot {0}` writes",
                opts.slot
            ),
            Some(c) if c >= point => break,
            Some(c) if started.elapsed() >= opts.wait => anyhow::bail!(
                "slot {:?} is at {c}, not past the verification point {point} after {:?}: is `slotlake run` streaming?",
                opts.slot,
                opts.wait
            ),
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }

    let mut catalog = TypeCatalog::new();
    let mut catalog_conn = None;
    let mut verdicts = Vec::with_capacity(tables.len());
    for table in &tables {
        let mut verdict = TableVerdict {
            table: table.to_string(),
            ..Default::default()
        };
        let source_table = crate::source::describe(
            &mut sql,
            &mut catalog,
            &mut catalog_conn,
            info,
            table,
            &opts.publication,
        )
        .await?;
        let specs = source_table.specs.clone();
        let has_log = crate::compact::has_change_log(sink, table)
            .await
            .map_err(|e| anyhow::anyhow!(crate::pipeline::error_chain(&e)))?;
        if has_log {
            // Through compact_all: a race with a background compactor is retried.
            let pass =
                crate::compact::compact_all(sink, std::slice::from_ref(table), &opts.compact)
                    .await
                    .map_err(|e| anyhow::anyhow!(crate::pipeline::error_chain(&e)))?;
            if let Some((_, Err(e))) = pass.first() {
                verdict.error = Some(crate::pipeline::error_chain(e));
                verdicts.push(verdict);
                continue;
            }
        }
        // A table without a change log (no row ever streamed) is compared as empty.
        let (history, current) = if has_log {
            (
                read_table(sink, "history", table).await,
                read_table(sink, "current", table).await,
            )
        } else {
            (Ok(Vec::new()), Ok(Vec::new()))
        };
        let (history, current) = match (history, current) {
            (Ok(h), Ok(c)) => (h, c),
            (Err(e), _) | (_, Err(e)) => {
                verdict.error = Some(e);
                verdicts.push(verdict);
                continue;
            }
        };
        let stamp = crate::source::RowStamp {
            lsn: 0,
            first_seq: 0,
            commit_ts_micros: 0,
        };
        let mut cursor = crate::source::Cursor::open(&mut snap, &source_table, None, stamp).await?;
        let mut source = Vec::new();
        while let Some(batch) = cursor.next(&mut snap).await? {
            source.push(batch);
        }
        compare(
            &mut verdict,
            &specs,
            source,
            history,
            current,
            as_of,
            opts.max_keys,
        )?;
        verdicts.push(verdict);
    }
    if let Some(c) = catalog_conn.take() {
        c.close().await;
    }
    let _ = snap.simple_query("ROLLBACK").await;
    snap.close().await;
    sql.close().await;
    Ok(Verification {
        as_of,
        tables: verdicts,
    })
}

/// Every row of one of the table's compacted tables (`history` or `current`).
async fn read_table(
    sink: &Sink,
    kind: &str,
    table: &TableName,
) -> Result<Vec<RecordBatch>, String> {
    let path = sink.table_path(&[kind, &table.schema, &table.name]);
    let (log_store, store, _) = sink.table_store(&path);
    let mut t = DeltaTable::new(log_store);
    if let Err(e) = t.load().await {
        return Err(format!("{kind} table of {table} cannot be loaded: {e}"));
    }
    let snapshot = t.snapshot().map_err(|e| e.to_string())?;
    let schema: Schema = snapshot
        .schema()
        .as_ref()
        .try_into_arrow()
        .map_err(|e: deltalake::arrow::error::ArrowError| e.to_string())?;
    let schema = Arc::new(schema);
    let files: Vec<_> = snapshot
        .log_data()
        .iter()
        .map(|f| (f.path().into_owned(), f.deletion_vector_descriptor()))
        .collect();
    let mut out = Vec::new();
    for (p, dv) in files {
        let batches = crate::compact::read_table_file(store.as_ref(), &p, dv.as_ref(), &schema)
            .await
            .map_err(|e| format!("{kind} table of {table}: file {p} cannot be read: {e}"))?;
        out.extend(batches);
    }
    Ok(out)
}

/// Key encoding → (row encoding, where the row is: batch and row index).
type RowIndex = HashMap<Vec<u8>, (Vec<u8>, (usize, usize))>;

/// Which rows of a batch an index keeps.
type Keep<'a> = &'a dyn Fn(&RecordBatch) -> Vec<bool>;

/// One pass over `batches` (conformed to `schema`, rows encoded once) filling one index per
/// `keeps` entry: key encoding → row encoding, plus the number of repeated keys.
fn index(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    key: &[usize],
    keeps: &[Keep<'_>],
) -> anyhow::Result<Vec<(RowIndex, u64)>> {
    let all = RowConverter::new(
        schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?;
    let keys = RowConverter::new(
        key.iter()
            .map(|&i| SortField::new(schema.field(i).data_type().clone()))
            .collect(),
    )?;
    let mut out: Vec<(RowIndex, u64)> = keeps.iter().map(|_| (HashMap::new(), 0)).collect();
    for (bi, original) in batches.iter().enumerate() {
        let b = conform(original, schema)?;
        let rows = all.convert_columns(b.columns())?;
        let key_cols: Vec<ArrayRef> = key.iter().map(|&i| b.column(i).clone()).collect();
        let key_rows = keys.convert_columns(&key_cols)?;
        for (keep, (map, duplicates)) in keeps.iter().zip(out.iter_mut()) {
            for (i, _) in keep(original).iter().enumerate().filter(|(_, k)| **k) {
                let entry = (rows.row(i).as_ref().to_vec(), (bi, i));
                if map
                    .insert(key_rows.row(i).as_ref().to_vec(), entry)
                    .is_some()
                {
                    *duplicates += 1;
                }
            }
        }
    }
    Ok(out)
}

/// The key of row `at` of `batches`, rendered for the report (only for differing rows).
fn render_key(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    key: &[usize],
    at: (usize, usize),
) -> String {
    let Some(row) = batches
        .get(at.0)
        .and_then(|b| conform(&b.slice(at.1, 1), schema).ok())
    else {
        return String::from("?");
    };
    key.iter()
        .map(|&i| {
            ArrayFormatter::try_new(row.column(i).as_ref(), &FormatOptions::default())
                .map(|f| f.value(0).to_string())
                .unwrap_or_else(|_| "?".into())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A boolean column of `b` (false where absent or null).
fn flags(b: &RecordBatch, name: &str) -> Vec<bool> {
    match b.column_by_name(name).and_then(|c| c.as_boolean_opt()) {
        Some(c) => (0..b.num_rows())
            .map(|i| c.is_valid(i) && c.value(i))
            .collect(),
        None => vec![false; b.num_rows()],
    }
}

fn compare(
    verdict: &mut TableVerdict,
    specs: &[ColumnSpec],
    source: Vec<RecordBatch>,
    history: Vec<RecordBatch>,
    current: Vec<RecordBatch>,
    as_of: Lsn,
    max_keys: usize,
) -> anyhow::Result<()> {
    let schema = crate::batch::rows::changelog_schema(specs);
    let layout = Layout::from_changelog(&schema);
    let cols: SchemaRef = layout.source.clone();
    let key = &layout.key;
    let x = as_of.0 as i64;
    let all = |b: &RecordBatch| vec![true; b.num_rows()];
    // History rows valid at X that are not tombstones: the source as of X.
    let valid_at = |b: &RecordBatch| -> Vec<bool> {
        let deleted = flags(b, DELETED);
        let lsn = |name| {
            b.column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int64Type>())
                .cloned()
        };
        let (Some(from), Some(to)) = (lsn(VALID_FROM_LSN), lsn(VALID_TO_LSN)) else {
            return vec![false; b.num_rows()];
        };
        (0..b.num_rows())
            .map(|i| !deleted[i] && from.value(i) <= x && (to.is_null(i) || to.value(i) > x))
            .collect()
    };
    // Open versions that are not tombstones: what the current table must hold.
    let open = |b: &RecordBatch| -> Vec<bool> {
        let deleted = flags(b, DELETED);
        match b.column_by_name(VALID_TO_LSN) {
            Some(to) => (0..b.num_rows())
                .map(|i| to.is_null(i) && !deleted[i])
                .collect(),
            None => vec![false; b.num_rows()],
        }
    };
    let mut src = index(&source, &cols, key, &[&all])?;
    let (src, _) = src.remove(0);
    let mut hist = index(&history, &cols, key, &[&valid_at, &open])?;
    let (open_rows, _) = hist.remove(1);
    let (lake, dup) = hist.remove(0);
    let mut cur = index(&current, &cols, key, &[&all])?;
    let (current_rows, current_dup) = cur.remove(0);
    verdict.source_rows = src.len() as u64;
    verdict.lake_rows = lake.len() as u64 + dup;
    verdict.extra += dup;
    let mut keys: Vec<String> = Vec::new();
    let mut note = |what: &str, batches: &[RecordBatch], at| {
        keys.push(format!("{what} ({})", render_key(batches, &cols, key, at)));
    };
    for (k, (row, at)) in &src {
        match lake.get(k) {
            None => {
                verdict.missing += 1;
                note("missing", &source, *at);
            }
            Some((other, _)) if other != row => {
                verdict.different += 1;
                note("different", &source, *at);
            }
            Some(_) => {}
        }
    }
    for (k, (_, at)) in &lake {
        if !src.contains_key(k) {
            verdict.extra += 1;
            note("extra", &history, *at);
        }
    }
    verdict.current_mismatch += current_dup;
    for (k, (row, at)) in &open_rows {
        if current_rows.get(k).map(|r| &r.0) != Some(row) {
            verdict.current_mismatch += 1;
            note("current table differs", &history, *at);
        }
    }
    for (k, (_, at)) in &current_rows {
        if !open_rows.contains_key(k) {
            verdict.current_mismatch += 1;
            note("current table has extra", &current, *at);
        }
    }
    keys.sort();
    keys.truncate(max_keys);
    verdict.keys = keys;
    Ok(())
}
