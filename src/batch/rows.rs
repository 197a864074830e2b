//! One change-log record batch per source table, built row by row.
//!
//! Data flow: the transaction assembler ([`crate::txn`]) hands over committed changes whose
//! columns are already typed ([`ColumnValue`]); the batcher appends each change here with its
//! identity (commit LSN, position in the transaction, xid, commit time) and, when the memory
//! budget or flush policy says so, [`ChangeBatchBuilder::finish`] yields a [`RecordBatch`] in
//! the change-log layout (DESIGN.md "Change-log columns"), which the lake writer appends to the
//! table's Delta change log:
//!
//! | column             | type                         | nullable | content                                   |
//! |--------------------|------------------------------|----------|-------------------------------------------|
//! | each source column | lake type ([`lake_type`])    | yes      | the new row (the old key for deletes)     |
//! | `_op`              | Utf8                         | no       | `I`, `U`, `D`, `T` (truncate), `R` (snapshot read) |
//! | `_lsn`             | Int64                        | no       | commit LSN                                |
//! | `_seq`             | Int64                        | no       | position within the transaction           |
//! | `_xid`             | Int64                        | no       | transaction id                            |
//! | `_commit_ts`       | Timestamp(µs, "UTC")         | no       | commit time                               |
//! | `_unchanged`       | List<Utf8>                   | yes      | TOAST columns not sent (their value is null here); empty when none |
//! | `_special`         | List<Utf8>                   | yes      | `<column>=<marker>` for stand-in values (`price=NaN`, `grid=dims=2x2`); empty when none |
//! | `_old_<k>` per key column `k` | lake type of `k`  | yes      | the old key, when the change carried an old key or row |
//!
//! A row is checked in full before any builder is touched, so a rejected row leaves the batch as
//! it was. Appending allocates nothing per row beyond what the Arrow builders grow by; the
//! markers of stand-in values (rare) go through one reused scratch vector.

use std::fmt::Write as _;
use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayBuilder, ArrayRef, Int64Builder, ListArray, StringArray, StringBuilder,
    TimestampMicrosecondBuilder,
};
use deltalake::arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use deltalake::arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;

use crate::pgoutput::TupleColumn;
use crate::types::arrow::{lake_type, ArrowValueError, ColumnBuilder, LIST_ELEMENT, UTC};
use crate::types::{ColumnValue, PgType, Value, ValueError};

pub const OP: &str = "_op";
pub const LSN: &str = "_lsn";
pub const SEQ: &str = "_seq";
pub const XID: &str = "_xid";
pub const COMMIT_TS: &str = "_commit_ts";
pub const UNCHANGED: &str = "_unchanged";
pub const SPECIAL: &str = "_special";
/// Prefix of the old-key columns: `_old_<key column>`.
pub const OLD_PREFIX: &str = "_old_";

/// The change-log name of a source column: its own, unless it would collide with a metadata
/// column (`_op`, `_lsn`, `_seq`, `_xid`, `_commit_ts`, `_unchanged`, `_special`, or anything
/// starting with `_old_`), in which case `<name>__source`.
pub fn lake_column_name(source: &str) -> String {
    if is_metadata_column(source) {
        format!("{source}__source")
    } else {
        source.to_string()
    }
}

/// True for the change log's own columns (not source columns): `_op`, `_lsn`, `_seq`, `_xid`,
/// `_commit_ts`, `_unchanged`, `_special` and the `_old_<k>` columns.
pub fn is_metadata_column(name: &str) -> bool {
    [OP, LSN, SEQ, XID, COMMIT_TS, UNCHANGED, SPECIAL].contains(&name)
        || name.starts_with(OLD_PREFIX)
}

/// The `_op` values.
pub const OP_INSERT: &str = "I";
pub const OP_UPDATE: &str = "U";
pub const OP_DELETE: &str = "D";
pub const OP_TRUNCATE: &str = "T";
pub const OP_READ: &str = "R";

/// A source column: its Postgres name, type, and whether it is part of the replica identity key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub name: String,
    pub ty: PgType,
    pub is_key: bool,
}

/// A change that cannot be added to the batch. Never includes row values.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("row has {got} columns but the table has {expected}")]
    ColumnCount { expected: usize, got: usize },
    #[error("old row has {got} columns but the table has {expected}")]
    OldColumnCount { expected: usize, got: usize },
    #[error("unknown change-log operation {op:?} (expected I, U, D, T or R)")]
    UnknownOp { op: String },
    #[error("column {column:?}")]
    Value {
        column: String,
        #[source]
        source: ArrowValueError,
    },
    #[error("column {column:?}")]
    Parse {
        column: String,
        #[source]
        source: ValueError,
    },
    #[error("a row was left half appended by an earlier error; the batch takes no more rows and cannot be finished")]
    Broken,
    #[error("assembling the change-log record batch")]
    Batch(#[source] ArrowError),
}

/// A source column's value as a binary COPY delivers it.
#[derive(Clone, Copy, Debug)]
pub enum WireField<'a> {
    Null,
    /// The type's binary (`typsend`) form.
    Binary(&'a [u8]),
    /// The type's text form (types read as `::text`).
    Text(&'a [u8]),
}

fn utf8_list_field() -> FieldRef {
    Arc::new(Field::new(LIST_ELEMENT, DataType::Utf8, true))
}

fn commit_ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
}

/// The change-log schema of a table with `columns` (see the module doc): all fields nullable
/// except `_op`, `_lsn`, `_seq`, `_xid` and `_commit_ts`.
pub fn changelog_schema(columns: &[ColumnSpec]) -> SchemaRef {
    let keys = columns.iter().filter(|c| c.is_key).count();
    let mut fields = Vec::with_capacity(columns.len() + 7 + keys);
    fields.extend(
        columns
            .iter()
            .map(|c| Field::new(&c.name, lake_type(&c.ty), true)),
    );
    fields.extend([
        Field::new(OP, DataType::Utf8, false),
        Field::new(LSN, DataType::Int64, false),
        Field::new(SEQ, DataType::Int64, false),
        Field::new(XID, DataType::Int64, false),
        Field::new(COMMIT_TS, commit_ts_type(), false),
        Field::new(UNCHANGED, DataType::List(utf8_list_field()), true),
        Field::new(SPECIAL, DataType::List(utf8_list_field()), true),
    ]);
    fields.extend(
        columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| Field::new(format!("{OLD_PREFIX}{}", c.name), lake_type(&c.ty), true)),
    );
    Arc::new(Schema::new(fields))
}

/// An old-key column: the index of its key column and its builder.
struct OldKey {
    index: usize,
    name: String,
    builder: ColumnBuilder,
}

/// Builds one change-log record batch for one source table.
pub struct ChangeBatchBuilder {
    columns: Vec<ColumnSpec>,
    schema: SchemaRef,
    values: Vec<ColumnBuilder>,
    meta: MetaColumns,
    old: Vec<OldKey>,
    /// Markers of one value, reused across values.
    scratch: Vec<String>,
    rows: usize,
    /// Rows of [`Self::append_read`] whose metadata and old-key columns are not appended
    /// yet: they are alike but for `_seq`, so they are appended together.
    reads: Option<ReadRun>,
    /// An error of [`Self::append_read`] left a row half appended.
    broken: bool,
    /// [`Self::finish`] leaves room for a batch like the one it finished.
    keep_capacity: bool,
}

impl ChangeBatchBuilder {
    pub fn new(columns: Vec<ColumnSpec>) -> Self {
        Self::with_capacity(columns, 1024, &[])
    }

    /// A builder whose [`Self::finish`] leaves room for another batch like the one it
    /// finished (the initial load's batches, all alike): the buffers do not grow again from
    /// nothing for every batch.
    pub fn keeping_capacity(columns: Vec<ColumnSpec>) -> Self {
        let mut builder = Self::new(columns);
        builder.keep_capacity = true;
        builder
    }

    /// Room for `rows` rows, and `bytes[i]` bytes of column `i` (text and bytes; `rows` when
    /// not given).
    fn with_capacity(columns: Vec<ColumnSpec>, rows: usize, bytes: &[usize]) -> Self {
        let schema = changelog_schema(&columns);
        let values = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                ColumnBuilder::with_capacity(&c.ty, rows, bytes.get(i).map_or(rows, |b| *b))
            })
            .collect();
        let old = columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(index, c)| OldKey {
                index,
                name: format!("{OLD_PREFIX}{}", c.name),
                builder: ColumnBuilder::with_capacity(&c.ty, rows, rows),
            })
            .collect();
        ChangeBatchBuilder {
            columns,
            schema,
            values,
            meta: MetaColumns::with_capacity(rows),
            old,
            scratch: Vec::new(),
            rows: 0,
            reads: None,
            broken: false,
            keep_capacity: false,
        }
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The source columns, in order.
    pub fn columns(&self) -> &[ColumnSpec] {
        &self.columns
    }

    /// Appends one change. `op` is one of `I`, `U`, `D`, `R` (truncates go through
    /// [`Self::append_truncate`]); `row` holds the source columns in order
    /// ([`ColumnValue::UnchangedToast`] becomes null and is named in `_unchanged`); `old` is the
    /// old row in the same column order when the change carried one (only key columns are
    /// used: they fill `_old_<k>`, which stays null when `old` is `None`). On error nothing is
    /// appended.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        op: &str,
        lsn: i64,
        seq: i64,
        xid: i64,
        commit_ts_micros: i64,
        row: &[ColumnValue],
        old: Option<&[ColumnValue]>,
    ) -> Result<(), RowError> {
        let ops = [OP_INSERT, OP_UPDATE, OP_DELETE, OP_TRUNCATE, OP_READ];
        self.check_shape(&ops, op, row.len(), old.map(<[_]>::len))?;
        self.settle_reads();
        // Check everything first so that a rejected row leaves every builder untouched.
        for ((spec, builder), cv) in self.columns.iter().zip(&self.values).zip(row) {
            if let ColumnValue::Value(v) = cv {
                builder.check(v).map_err(|source| RowError::Value {
                    column: spec.name.clone(),
                    source,
                })?;
            }
        }
        for key in &self.old {
            if let Some(v) = old_value(old, key.index) {
                key.builder.check(v).map_err(|source| RowError::Value {
                    column: key.name.clone(),
                    source,
                })?;
            }
        }

        for ((spec, builder), cv) in self.columns.iter().zip(&mut self.values).zip(row) {
            match cv {
                ColumnValue::Value(v) => {
                    self.scratch.clear();
                    builder
                        .append_checked(v, &mut self.scratch)
                        .map_err(|source| RowError::Value {
                            column: spec.name.clone(),
                            source,
                        })?;
                    push_specials(&mut self.meta.special, &spec.name, &self.scratch);
                }
                ColumnValue::UnchangedToast => {
                    builder.append_null();
                    self.meta.unchanged.values().append_value(&spec.name);
                }
            }
        }
        for key in &mut self.old {
            match old_value(old, key.index) {
                Some(v) => {
                    self.scratch.clear();
                    key.builder
                        .append_checked(v, &mut self.scratch)
                        .map_err(|source| RowError::Value {
                            column: key.name.clone(),
                            source,
                        })?;
                    push_specials(&mut self.meta.special, &key.name, &self.scratch);
                }
                None => key.builder.append_null(),
            }
        }
        self.append_meta(op, lsn, seq, xid, commit_ts_micros);
        Ok(())
    }

    /// A half-appended row stays in the builders: nothing more goes in after it (the columns
    /// would no longer line up).
    fn refuse_if_broken(&self) -> Result<(), RowError> {
        match self.broken {
            true => Err(RowError::Broken),
            false => Ok(()),
        }
    }

    /// That `op` is one of `ops`, and the row (and old row) have a value per column.
    fn check_shape(
        &self,
        ops: &[&str],
        op: &str,
        row: usize,
        old: Option<usize>,
    ) -> Result<(), RowError> {
        if !ops.contains(&op) {
            return Err(RowError::UnknownOp { op: op.to_owned() });
        }
        let expected = self.columns.len();
        if row != expected {
            return Err(RowError::ColumnCount { expected, got: row });
        }
        match old {
            Some(got) if got != expected => Err(RowError::OldColumnCount { expected, got }),
            _ => Ok(()),
        }
    }

    /// Appends one streamed change straight from its pgoutput tuples: `op` is `I`, `U` or `D`
    /// (truncates go through [`Self::append_truncate`]); `row` holds the source columns in
    /// order (a `u` column becomes null and is named in `_unchanged`); `old` is the old key or
    /// row the change carried, whose key columns fill `_old_<k>`. Values whose type has a
    /// direct path ([`ColumnBuilder::append_text_direct`], [`ColumnBuilder::append_binary_direct`])
    /// skip the typed [`Value`]; the rest are parsed and appended as [`Self::append`] does, and
    /// the batch is the same. Like [`Self::append_read`], an error leaves the row half
    /// appended and the batch unusable ([`RowError::Broken`]): a change that cannot be decoded
    /// ends the stream anyway.
    #[allow(clippy::too_many_arguments)]
    pub fn append_change(
        &mut self,
        op: &str,
        lsn: i64,
        seq: i64,
        xid: i64,
        commit_ts_micros: i64,
        row: &[TupleColumn],
        old: Option<&[TupleColumn]>,
    ) -> Result<(), RowError> {
        let ops = [OP_INSERT, OP_UPDATE, OP_DELETE];
        self.check_shape(&ops, op, row.len(), old.map(<[_]>::len))?;
        self.refuse_if_broken()?;
        self.settle_reads();
        self.broken = true;
        for ((spec, builder), column) in self.columns.iter().zip(&mut self.values).zip(row) {
            if let TupleColumn::UnchangedToast = column {
                builder.append_null();
                self.meta.unchanged.values().append_value(&spec.name);
                continue;
            }
            append_wire(
                builder,
                &spec.ty,
                &spec.name,
                column,
                &mut self.scratch,
                &mut self.meta.special,
            )?;
        }
        for key in &mut self.old {
            match old.and_then(|o| o.get(key.index)) {
                Some(column) => append_wire(
                    &mut key.builder,
                    &self.columns[key.index].ty,
                    &key.name,
                    column,
                    &mut self.scratch,
                    &mut self.meta.special,
                )?,
                None => key.builder.append_null(),
            }
        }
        self.append_meta(op, lsn, seq, xid, commit_ts_micros);
        self.broken = false;
        Ok(())
    }

    /// Appends a row read by the initial load (`_op` `R`, no old key, nothing unchanged)
    /// straight from its COPY fields, in column order. Values whose type has a direct path
    /// ([`ColumnBuilder::append_binary_direct`], [`ColumnBuilder::append_text_direct`]) skip
    /// the typed [`Value`]; the rest are parsed and appended like a streamed change's. Unlike
    /// [`Self::append`], an error leaves the row half appended: the batch is then unusable
    /// ([`Self::finish`] fails with [`RowError::Broken`]), as a load that meets a bad value
    /// fails anyway.
    pub fn append_read<'a>(
        &mut self,
        lsn: i64,
        seq: i64,
        commit_ts_micros: i64,
        fields: impl ExactSizeIterator<Item = WireField<'a>>,
    ) -> Result<(), RowError> {
        let expected = self.columns.len();
        if fields.len() != expected {
            return Err(RowError::ColumnCount {
                expected,
                got: fields.len(),
            });
        }
        self.refuse_if_broken()?;
        self.broken = true;
        let mut specials = false;
        let mut fields = fields;
        for (spec, builder) in self.columns.iter().zip(self.values.iter_mut()) {
            let Some(field) = fields.next() else {
                return Err(RowError::ColumnCount {
                    expected,
                    got: fields.len(),
                });
            };
            let (raw, binary) = match field {
                WireField::Null => {
                    builder.append_null();
                    continue;
                }
                WireField::Binary(raw) => (raw, true),
                WireField::Text(raw) => (raw, false),
            };
            append_raw(
                builder,
                &spec.ty,
                &spec.name,
                raw,
                binary,
                &mut self.scratch,
            )?;
            if !self.scratch.is_empty() {
                // This row's `_special` list is not empty: the rows before it get theirs now.
                specials = true;
                if let Some(run) = self.reads.take() {
                    self.meta.settle(&mut self.old, run);
                }
                push_specials(&mut self.meta.special, &spec.name, &self.scratch);
            }
        }
        let row = ReadRun {
            lsn,
            first_seq: seq,
            commit_ts_micros,
            rows: 1,
        };
        if specials {
            self.meta.settle(&mut self.old, row);
        } else if let Some(run) = self.reads.as_mut().filter(|run| run.continued_by(&row)) {
            run.rows += 1;
        } else if let Some(run) = self.reads.replace(row) {
            self.meta.settle(&mut self.old, run);
        }
        self.rows += 1;
        self.broken = false;
        Ok(())
    }

    /// Appends the metadata of the pending [`Self::append_read`] rows.
    fn settle_reads(&mut self) {
        if let Some(run) = self.reads.take() {
            self.meta.settle(&mut self.old, run);
        }
    }

    /// A truncate: all source and old-key columns null.
    pub fn append_truncate(&mut self, lsn: i64, seq: i64, xid: i64, commit_ts_micros: i64) {
        self.settle_reads();
        for builder in &mut self.values {
            builder.append_null();
        }
        for key in &mut self.old {
            key.builder.append_null();
        }
        self.append_meta(OP_TRUNCATE, lsn, seq, xid, commit_ts_micros);
    }

    /// The metadata columns; closes the row's `_unchanged` and `_special` lists.
    fn append_meta(&mut self, op: &str, lsn: i64, seq: i64, xid: i64, commit_ts_micros: i64) {
        self.meta.push(op, lsn, seq, xid, commit_ts_micros);
        self.rows += 1;
    }

    /// Rows appended since the last [`Self::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Estimated bytes held by the appended rows (values, offsets, validity), for the memory
    /// budget. Constant time per column.
    pub fn memory_bytes(&self) -> usize {
        let source: usize = self.values.iter().map(ColumnBuilder::memory_bytes).sum();
        let old: usize = self.old.iter().map(|k| k.builder.memory_bytes()).sum();
        source + old + self.meta.memory_bytes(self.rows)
    }

    /// The record batch of everything appended so far; the builder starts empty again.
    pub fn finish(&mut self) -> Result<RecordBatch, RowError> {
        if self.broken {
            return Err(RowError::Broken);
        }
        self.settle_reads();
        let bytes: Vec<usize> = if self.keep_capacity {
            self.values
                .iter()
                .map(ColumnBuilder::memory_bytes)
                .collect()
        } else {
            Vec::new()
        };
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        arrays.extend(self.values.iter_mut().map(ColumnBuilder::finish));
        self.meta.finish(&mut arrays).map_err(RowError::Batch)?;
        arrays.extend(self.old.iter_mut().map(|k| k.builder.finish()));
        if self.keep_capacity {
            *self = ChangeBatchBuilder {
                keep_capacity: true,
                ..Self::with_capacity(std::mem::take(&mut self.columns), self.rows, &bytes)
            };
        }
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), arrays).map_err(RowError::Batch)
    }
}

/// A `List<Utf8>` column whose rows are never null (`_unchanged`, `_special`): its offsets
/// and strings, so that a run of empty lists is one fill.
struct StrLists {
    offsets: Vec<i32>,
    strings: StringBuilder,
}

impl StrLists {
    fn with_capacity(rows: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        StrLists {
            offsets,
            strings: StringBuilder::new(),
        }
    }

    /// Strings of the current row go here.
    fn values(&mut self) -> &mut StringBuilder {
        &mut self.strings
    }

    fn end(&self) -> i32 {
        i32::try_from(ArrayBuilder::len(&self.strings)).unwrap_or(i32::MAX)
    }

    /// Ends the current row.
    fn close_row(&mut self) {
        self.offsets.push(self.end());
    }

    /// Ends the current row and `n - 1` empty ones after it.
    fn close_rows(&mut self, n: usize) {
        let end = self.end();
        self.offsets.resize(self.offsets.len() + n, end);
    }

    fn memory_bytes(&self) -> usize {
        4 * self.offsets.len()
            + self.strings.values_slice().len()
            + 4 * self.strings.offsets_slice().len()
    }

    fn finish(&mut self) -> Result<ListArray, ArrowError> {
        let offsets = std::mem::replace(&mut self.offsets, vec![0]);
        let strings = self.strings.finish();
        ListArray::try_new(
            utf8_list_field(),
            OffsetBuffer::new(ScalarBuffer::from(offsets)),
            Arc::new(strings),
            None,
        )
    }
}

/// The metadata columns of a batch: `_op` (one ASCII letter a row), `_lsn`, `_seq`, `_xid`,
/// `_commit_ts`, `_unchanged`, `_special`.
struct MetaColumns {
    op: Vec<u8>,
    lsn: Int64Builder,
    seq: Int64Builder,
    xid: Int64Builder,
    commit_ts: TimestampMicrosecondBuilder,
    unchanged: StrLists,
    special: StrLists,
}

impl MetaColumns {
    fn with_capacity(rows: usize) -> Self {
        MetaColumns {
            op: Vec::with_capacity(rows),
            lsn: Int64Builder::with_capacity(rows),
            seq: Int64Builder::with_capacity(rows),
            xid: Int64Builder::with_capacity(rows),
            commit_ts: TimestampMicrosecondBuilder::with_capacity(rows).with_timezone(UTC),
            unchanged: StrLists::with_capacity(rows),
            special: StrLists::with_capacity(rows),
        }
    }

    /// One row's metadata; closes its `_unchanged` and `_special` lists.
    fn push(&mut self, op: &str, lsn: i64, seq: i64, xid: i64, commit_ts_micros: i64) {
        // One ASCII letter: callers pass one of the `OP_*`.
        self.op.extend_from_slice(&op.as_bytes()[..1]);
        self.lsn.append_value(lsn);
        self.seq.append_value(seq);
        self.xid.append_value(xid);
        self.commit_ts.append_value(commit_ts_micros);
        self.unchanged.close_row();
        self.special.close_row();
    }

    /// The metadata of the read rows of `run` (`R`, nothing unchanged; their `_special` lists
    /// are closed: only the last row's can have markers, see
    /// [`ChangeBatchBuilder::append_read`]), and their null old keys.
    fn settle(&mut self, old: &mut [OldKey], run: ReadRun) {
        let n = run.rows;
        self.op.resize(self.op.len() + n, OP_READ.as_bytes()[0]);
        self.lsn.append_value_n(run.lsn, n);
        self.seq
            .extend((0..n as i64).map(|i| Some(run.first_seq + i)));
        self.xid.append_value_n(0, n);
        self.commit_ts.append_value_n(run.commit_ts_micros, n);
        self.unchanged.close_rows(n);
        self.special.close_rows(n);
        for key in old {
            key.builder.append_nulls(n);
        }
    }

    /// Estimated bytes held for `rows` rows.
    fn memory_bytes(&self, rows: usize) -> usize {
        (1 + 8 * 4) * rows + self.unchanged.memory_bytes() + self.special.memory_bytes()
    }

    /// Appends the columns, in schema order, and starts empty again.
    fn finish(&mut self, arrays: &mut Vec<ArrayRef>) -> Result<(), ArrowError> {
        let ops = std::mem::take(&mut self.op);
        let offsets = OffsetBuffer::from_lengths(std::iter::repeat_n(1, ops.len()));
        arrays.push(Arc::new(StringArray::try_new(
            offsets,
            Buffer::from_vec(ops),
            None,
        )?));
        arrays.push(Arc::new(self.lsn.finish()));
        arrays.push(Arc::new(self.seq.finish()));
        arrays.push(Arc::new(self.xid.finish()));
        arrays.push(Arc::new(self.commit_ts.finish()));
        arrays.push(Arc::new(self.unchanged.finish()?));
        arrays.push(Arc::new(self.special.finish()?));
        Ok(())
    }
}

/// Rows of [`ChangeBatchBuilder::append_read`] with consecutive `_seq` and the same `_lsn`
/// and `_commit_ts`, whose metadata is still to be appended.
struct ReadRun {
    lsn: i64,
    first_seq: i64,
    commit_ts_micros: i64,
    rows: usize,
}

impl ReadRun {
    /// `next` (one row) is the row after this run's last.
    fn continued_by(&self, next: &ReadRun) -> bool {
        next.lsn == self.lsn
            && next.commit_ts_micros == self.commit_ts_micros
            && next.first_seq == self.first_seq + self.rows as i64
    }
}

/// The old row's value for column `index`, when there is an old row and the value was sent.
fn old_value(old: Option<&[ColumnValue]>, index: usize) -> Option<&Value> {
    match old?.get(index)? {
        ColumnValue::Value(v) => Some(v),
        ColumnValue::UnchangedToast => None,
    }
}

/// One pgoutput value of a change (null and unchanged TOAST append a null), its stand-in
/// markers added to the row's `_special` list.
fn append_wire(
    builder: &mut ColumnBuilder,
    ty: &PgType,
    name: &str,
    column: &TupleColumn,
    scratch: &mut Vec<String>,
    special: &mut StrLists,
) -> Result<(), RowError> {
    let (raw, binary) = match column {
        TupleColumn::Null | TupleColumn::UnchangedToast => {
            builder.append_null();
            return Ok(());
        }
        TupleColumn::Text(raw) => (raw.as_ref(), false),
        TupleColumn::Binary(raw) => (raw.as_ref(), true),
    };
    append_raw(builder, ty, name, raw, binary, scratch)?;
    push_specials(special, name, scratch);
    Ok(())
}

/// One non-null value in its wire form (binary `typsend` or text `typoutput`): straight into
/// the column when its type has a direct path, else parsed into a typed value and appended.
/// `markers` ends up holding the value's stand-in markers (none on the direct path).
fn append_raw(
    builder: &mut ColumnBuilder,
    ty: &PgType,
    name: &str,
    raw: &[u8],
    binary: bool,
    markers: &mut Vec<String>,
) -> Result<(), RowError> {
    markers.clear();
    let direct = match binary {
        true => builder.append_binary_direct(raw),
        false => builder.append_text_direct(raw),
    };
    if direct {
        return Ok(());
    }
    let parsed = match binary {
        true => crate::types::binary::parse(ty, raw),
        false => crate::types::text::parse(ty, raw),
    };
    let value = parsed.map_err(|source| RowError::Parse {
        column: name.to_owned(),
        source,
    })?;
    builder
        .append(&value, markers)
        .map_err(|source| RowError::Value {
            column: name.to_owned(),
            source,
        })
}

/// Adds `<column>=<marker>` to the current row's `_special` list for each marker.
fn push_specials(special: &mut StrLists, column: &str, markers: &[String]) {
    let strings = special.values();
    for marker in markers {
        // Writing to a StringBuilder cannot fail.
        let _ = write!(strings, "{column}={marker}");
        strings.append_value("");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_columns_named_like_metadata_are_renamed() {
        assert_eq!(lake_column_name("id"), "id");
        assert_eq!(lake_column_name("_op"), "_op__source");
        assert_eq!(lake_column_name("_lsn"), "_lsn__source");
        assert_eq!(lake_column_name("_old_id"), "_old_id__source");
        assert_eq!(lake_column_name("_opx"), "_opx");
        assert_eq!(lake_column_name("op"), "op");
    }
    use crate::types::{ArrayDim, ArrayValue, Infinite, Numeric};
    use deltalake::arrow::array::{
        Array, AsArray, Date32Array, Decimal128Array, Int32Array, Int64Array, ListArray,
        StringArray, TimestampMicrosecondArray,
    };
    use proptest::prelude::*;

    fn spec(name: &str, ty: PgType, is_key: bool) -> ColumnSpec {
        ColumnSpec {
            name: name.into(),
            ty,
            is_key,
        }
    }

    fn v(value: Value) -> ColumnValue {
        ColumnValue::Value(value)
    }

    fn text(s: &str) -> ColumnValue {
        v(Value::Text(s.into()))
    }

    fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
        batch
            .column_by_name(name)
            .unwrap_or_else(|| panic!("no column {name}"))
            .as_any()
            .downcast_ref::<T>()
            .unwrap_or_else(|| panic!("column {name} has another type"))
    }

    /// The strings of list row `i`.
    fn list_row(batch: &RecordBatch, name: &str, i: usize) -> Vec<String> {
        let list = column::<ListArray>(batch, name);
        assert!(list.is_valid(i));
        let row = list.value(i);
        row.as_string::<i32>()
            .iter()
            .map(|s| s.unwrap().to_owned())
            .collect()
    }

    fn table() -> Vec<ColumnSpec> {
        vec![
            spec("id", PgType::Int4, true),
            spec("body", PgType::Text, false),
            spec(
                "price",
                PgType::Numeric {
                    precision_scale: Some((10, 2)),
                },
                false,
            ),
            spec("valid_until", PgType::Date, false),
        ]
    }

    #[test]
    fn schema_has_source_meta_and_old_key_columns() {
        let schema = changelog_schema(&table());
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            [
                "id",
                "body",
                "price",
                "valid_until",
                "_op",
                "_lsn",
                "_seq",
                "_xid",
                "_commit_ts",
                "_unchanged",
                "_special",
                "_old_id"
            ]
        );
        for f in schema.fields() {
            let required =
                ["_op", "_lsn", "_seq", "_xid", "_commit_ts"].contains(&f.name().as_str());
            assert_eq!(f.is_nullable(), !required, "{}", f.name());
        }
        assert_eq!(schema.field(2).data_type(), &DataType::Decimal128(10, 2));
        assert_eq!(schema.field(11).data_type(), &DataType::Int32);
        assert_eq!(
            schema.field(8).data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
    }

    #[test]
    fn builds_a_batch_column_by_column() {
        let mut b = ChangeBatchBuilder::new(table());
        let nan = v(Value::Numeric(Numeric::NaN));
        let price = |s: &str| v(Value::Numeric(Numeric::Finite(s.into())));
        let day = |d| v(Value::Date(Infinite::Finite(d)));
        // Insert with NaN and infinity stand-ins.
        b.append(
            "I",
            100,
            0,
            7,
            1_000,
            &[
                v(Value::Int4(1)),
                text("a"),
                nan,
                v(Value::Date(Infinite::PosInfinity)),
            ],
            None,
        )
        .unwrap();
        // Update changing the key (old key carried) with an unchanged TOAST column.
        let new = [
            v(Value::Int4(2)),
            ColumnValue::UnchangedToast,
            price("1.50"),
            day(3),
        ];
        let old = [
            v(Value::Int4(1)),
            v(Value::Null),
            v(Value::Null),
            v(Value::Null),
        ];
        b.append("U", 100, 1, 7, 1_000, &new, Some(&old)).unwrap();
        // Delete: the old key as the row.
        let deleted = [
            v(Value::Int4(2)),
            v(Value::Null),
            v(Value::Null),
            v(Value::Null),
        ];
        b.append("D", 200, 0, 8, 2_000, &deleted, None).unwrap();
        b.append_truncate(300, 0, 9, 3_000);
        assert_eq!(b.len(), 4);
        assert!(b.memory_bytes() > 0);

        let batch = b.finish().unwrap();
        assert_eq!(b.len(), 0);
        assert_eq!(batch.num_rows(), 4);
        assert_eq!(batch.schema(), b.schema());

        let id = column::<Int32Array>(&batch, "id");
        assert_eq!((id.value(0), id.value(1), id.value(2)), (1, 2, 2));
        assert!(id.is_null(3));
        let body = column::<StringArray>(&batch, "body");
        assert_eq!(body.value(0), "a");
        assert!(body.is_null(1) && body.is_null(2) && body.is_null(3));
        let price = column::<Decimal128Array>(&batch, "price");
        assert!(price.is_null(0));
        assert_eq!(price.value(1), 150);
        let until = column::<Date32Array>(&batch, "valid_until");
        assert_eq!(
            (until.value(0), until.value(1)),
            (crate::types::arrow::DATE_MAX, 3)
        );

        let op = column::<StringArray>(&batch, "_op");
        let ops: Vec<&str> = op.iter().map(Option::unwrap).collect();
        assert_eq!(ops, ["I", "U", "D", "T"]);
        assert_eq!(
            &column::<Int64Array>(&batch, "_lsn").values()[..],
            &[100, 100, 200, 300]
        );
        assert_eq!(
            &column::<Int64Array>(&batch, "_seq").values()[..],
            &[0, 1, 0, 0]
        );
        assert_eq!(
            &column::<Int64Array>(&batch, "_xid").values()[..],
            &[7, 7, 8, 9]
        );
        assert_eq!(
            &column::<TimestampMicrosecondArray>(&batch, "_commit_ts").values()[..],
            &[1_000, 1_000, 2_000, 3_000]
        );

        assert_eq!(list_row(&batch, "_unchanged", 0), Vec::<String>::new());
        assert_eq!(list_row(&batch, "_unchanged", 1), ["body"]);
        assert_eq!(list_row(&batch, "_unchanged", 3), Vec::<String>::new());
        assert_eq!(
            list_row(&batch, "_special", 0),
            ["price=NaN", "valid_until=infinity"]
        );
        assert_eq!(list_row(&batch, "_special", 1), Vec::<String>::new());

        let old_id = column::<Int32Array>(&batch, "_old_id");
        assert!(old_id.is_null(0));
        assert_eq!(old_id.value(1), 1);
        assert!(old_id.is_null(2) && old_id.is_null(3));

        // The builder is reusable after finish.
        b.append_truncate(400, 0, 10, 4_000);
        assert_eq!(b.finish().unwrap().num_rows(), 1);
    }

    #[test]
    fn array_specials_are_prefixed_with_the_column() {
        let mut b = ChangeBatchBuilder::new(vec![spec(
            "grid",
            PgType::Array(Box::new(PgType::Int4)),
            false,
        )]);
        let grid = Value::Array(ArrayValue {
            dims: vec![
                ArrayDim {
                    len: 2,
                    lower_bound: 1,
                },
                ArrayDim {
                    len: 2,
                    lower_bound: 1,
                },
            ],
            elements: (1..=4).map(Value::Int4).collect(),
        });
        b.append("I", 1, 0, 1, 0, &[v(grid)], None).unwrap();
        let batch = b.finish().unwrap();
        assert_eq!(list_row(&batch, "_special", 0), ["grid=dims=2x2"]);
    }

    /// Streamed changes appended from their pgoutput tuples give the batch that decoding every
    /// value to its typed form and appending that gives: old keys, unchanged TOAST columns,
    /// stand-ins for values the lake cannot hold, text and binary forms.
    #[test]
    fn changes_from_tuples_build_what_typed_rows_build() {
        use crate::types::decode_column;
        let t = |s: &str| TupleColumn::Text(bytes::Bytes::copy_from_slice(s.as_bytes()));
        let b = |raw: &[u8]| TupleColumn::Binary(bytes::Bytes::copy_from_slice(raw));
        type Change = (&'static str, Vec<TupleColumn>, Option<Vec<TupleColumn>>);
        let changes: Vec<Change> = vec![
            (
                "I",
                vec![t("1"), t("é body"), t("12.50"), t("2024-02-29")],
                None,
            ),
            (
                "I",
                vec![t("2"), TupleColumn::Null, t("NaN"), t("infinity")],
                None,
            ),
            (
                "I",
                vec![
                    b(&3i32.to_be_bytes()),
                    b(b"bin"),
                    t("-0.01"),
                    t("0001-01-01 BC"),
                ],
                None,
            ),
            (
                "U",
                vec![
                    t("4"),
                    TupleColumn::UnchangedToast,
                    t("1"),
                    TupleColumn::Null,
                ],
                Some(vec![
                    t("1"),
                    TupleColumn::Null,
                    TupleColumn::Null,
                    TupleColumn::Null,
                ]),
            ),
            (
                "U",
                vec![t("2"), t("x"), t("Infinity"), t("2000-01-01")],
                None,
            ),
            (
                "D",
                vec![
                    t("4"),
                    TupleColumn::Null,
                    TupleColumn::Null,
                    TupleColumn::Null,
                ],
                None,
            ),
        ];
        let specs = table();
        let mut direct = ChangeBatchBuilder::new(specs.clone());
        let mut typed = ChangeBatchBuilder::new(specs.clone());
        let decode = |row: &[TupleColumn]| -> Vec<ColumnValue> {
            row.iter()
                .zip(&specs)
                .map(|(c, s)| decode_column(&s.ty, c).unwrap())
                .collect()
        };
        for (seq, (op, row, old)) in changes.iter().enumerate() {
            let seq = seq as i64;
            direct
                .append_change(op, 10, seq, 7, 99, row, old.as_deref())
                .unwrap();
            let old = old.as_deref().map(decode);
            typed
                .append(op, 10, seq, 7, 99, &decode(row), old.as_deref())
                .unwrap();
        }
        let (direct, typed) = (direct.finish().unwrap(), typed.finish().unwrap());
        assert_eq!(direct.num_rows(), changes.len());
        assert_eq!(direct, typed);
        assert_eq!(list_row(&direct, UNCHANGED, 3), ["body"]);
        assert_eq!(column::<Int32Array>(&direct, "_old_id").value(3), 1);
        assert!(!list_row(&direct, SPECIAL, 1).is_empty());
    }

    /// A value that cannot be decoded is an error naming the column, and the batch then
    /// refuses to finish rather than hold a half row.
    #[test]
    fn an_undecodable_change_breaks_the_batch() {
        let t = |s: &str| TupleColumn::Text(bytes::Bytes::copy_from_slice(s.as_bytes()));
        let mut builder = ChangeBatchBuilder::new(table());
        builder
            .append_change(
                "I",
                1,
                0,
                1,
                0,
                &[t("1"), t("a"), t("1"), t("2024-01-01")],
                None,
            )
            .unwrap();
        let bad = [t("2"), t("b"), t("not a number"), t("2024-01-01")];
        let err = builder
            .append_change("I", 1, 1, 1, 0, &bad, None)
            .unwrap_err();
        assert!(
            matches!(&err, RowError::Parse { column, .. } if column == "price"),
            "{err}"
        );
        assert!(matches!(builder.finish(), Err(RowError::Broken)));
        let good = [t("3"), t("c"), t("3"), t("2024-01-01")];
        assert!(
            matches!(
                builder.append_change("I", 1, 2, 1, 0, &good, None),
                Err(RowError::Broken)
            ),
            "nothing goes in after a half row"
        );
        let short = [t("3")];
        assert!(matches!(
            builder.append_change("I", 1, 2, 1, 0, &short, None),
            Err(RowError::ColumnCount {
                expected: 4,
                got: 1
            })
        ));
    }

    #[test]
    fn rejected_rows_leave_the_batch_unchanged() {
        let mut b = ChangeBatchBuilder::new(table());
        let good = [v(Value::Int4(1)), text("a"), v(Value::Null), v(Value::Null)];
        b.append("I", 1, 0, 1, 0, &good, None).unwrap();

        let err = b.append("I", 1, 1, 1, 0, &good[..3], None).unwrap_err();
        assert!(matches!(
            err,
            RowError::ColumnCount {
                expected: 4,
                got: 3
            }
        ));
        let err = b
            .append("U", 1, 1, 1, 0, &good, Some(&good[..1]))
            .unwrap_err();
        assert!(matches!(
            err,
            RowError::OldColumnCount {
                expected: 4,
                got: 1
            }
        ));
        let err = b.append("X", 1, 1, 1, 0, &good, None).unwrap_err();
        assert!(matches!(err, RowError::UnknownOp { .. }));

        // The bad value is in the last column: earlier columns must not be appended.
        let bad = [v(Value::Int4(2)), text("b"), v(Value::Null), text("secret")];
        let err = b.append("I", 1, 1, 1, 0, &bad, None).unwrap_err();
        assert!(
            matches!(&err, RowError::Value { column, source: ArrowValueError::TypeMismatch { .. } } if column == "valid_until")
        );
        assert!(!err.to_string().contains("secret"));
        // A bad old key is rejected too.
        let bad_old = [
            text("secret"),
            v(Value::Null),
            v(Value::Null),
            v(Value::Null),
        ];
        let err = b
            .append("U", 1, 1, 1, 0, &good, Some(&bad_old))
            .unwrap_err();
        assert!(matches!(&err, RowError::Value { column, .. } if column == "_old_id"));
        // A numeric too wide for the decimal.
        let wide = [
            v(Value::Int4(3)),
            v(Value::Null),
            v(Value::Numeric(Numeric::Finite("123456789.00".into()))),
            v(Value::Null),
        ];
        let err = b.append("I", 1, 1, 1, 0, &wide, None).unwrap_err();
        assert!(matches!(
            err,
            RowError::Value {
                source: ArrowValueError::Decimal { .. },
                ..
            }
        ));

        assert_eq!(b.len(), 1);
        let batch = b.finish().unwrap();
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(column::<Int32Array>(&batch, "id").len(), 1);
    }

    #[test]
    fn empty_batch_finishes() {
        let mut b = ChangeBatchBuilder::new(table());
        assert!(b.is_empty());
        let batch = b.finish().unwrap();
        assert_eq!(batch.num_rows(), 0);
        assert_eq!(batch.num_columns(), 12);
    }

    type Row = (Option<i64>, Option<String>, Option<i64>);

    proptest! {
        #[test]
        fn rows_round_trip(rows in proptest::collection::vec(
            (
                proptest::option::of(any::<i64>()),
                proptest::option::of(".{0,12}"),
                proptest::option::of(-(10i64.pow(18) - 1)..10i64.pow(18)),
            ),
            0..40,
        )) {
            let rows: Vec<Row> = rows;
            let ty = PgType::Numeric { precision_scale: Some((18, 4)) };
            let mut b = ChangeBatchBuilder::new(vec![
                spec("k", PgType::Int8, true),
                spec("t", PgType::Text, false),
                spec("n", ty, false),
            ]);
            for (i, (k, t, n)) in rows.iter().enumerate() {
                let n = n.map(|n| {
                    let sign = if n < 0 { "-" } else { "" };
                    let abs = n.unsigned_abs();
                    Value::Numeric(Numeric::Finite(format!("{sign}{}.{:04}", abs / 10_000, abs % 10_000)))
                });
                let row = [
                    v(k.map_or(Value::Null, Value::Int8)),
                    v(t.clone().map_or(Value::Null, Value::Text)),
                    v(n.unwrap_or(Value::Null)),
                ];
                b.append("I", 1, i as i64, 1, 0, &row, None).unwrap();
            }
            let batch = b.finish().unwrap();
            prop_assert_eq!(batch.num_rows(), rows.len());
            let ks = column::<Int64Array>(&batch, "k");
            let ts = column::<StringArray>(&batch, "t");
            let ns = column::<Decimal128Array>(&batch, "n");
            for (i, (k, t, n)) in rows.iter().enumerate() {
                prop_assert_eq!(ks.is_valid(i).then(|| ks.value(i)), *k);
                prop_assert_eq!(ts.is_valid(i).then(|| ts.value(i).to_owned()), t.clone());
                prop_assert_eq!(ns.is_valid(i).then(|| ns.value(i)), n.map(i128::from));
            }
            prop_assert_eq!(
                column::<Int64Array>(&batch, "_seq").values().to_vec(),
                (0..rows.len() as i64).collect::<Vec<_>>()
            );
        }
    }

    /// One step of [`read_rows_match_rows_appended_one_by_one`].
    #[derive(Debug, Clone)]
    enum Step {
        /// A read row: `_lsn` choice, a `_seq` jump (0: the next one), the id, the price as
        /// text (`NaN` gives a `_special` marker), a null body or not.
        Read(u8, u8, i32, String, bool),
        Change,
        Truncate,
        Finish,
    }

    fn step() -> impl Strategy<Value = Step> {
        let price = prop_oneof![
            4 => (0u32..100_000).prop_map(|c| format!("{}.{:02}", c / 100, c % 100)),
            1 => Just("NaN".to_owned()),
        ];
        prop_oneof![
            12 => (0u8..2, prop_oneof![6 => Just(0u8), 1 => 1u8..3], any::<i32>(), price, any::<bool>())
                .prop_map(|(l, j, id, p, n)| Step::Read(l, j, id, p, n)),
            1 => Just(Step::Change),
            1 => Just(Step::Truncate),
            1 => Just(Step::Finish),
        ]
    }

    proptest! {
        /// Read rows, whose metadata is appended a run at a time, give the batches that
        /// appending each as an `R` change gives, whatever comes between them (changes,
        /// truncates, stand-in markers, `_seq` or `_lsn` jumps, batch ends).
        #[test]
        fn read_rows_match_rows_appended_one_by_one(steps in proptest::collection::vec(step(), 0..60)) {
            let (mut reads, mut reference) = (
                ChangeBatchBuilder::keeping_capacity(table()),
                ChangeBatchBuilder::new(table()),
            );
            let (mut got, mut want) = (Vec::new(), Vec::new());
            let mut seq = 0i64;
            for step in steps.iter().chain([&Step::Finish]) {
                match step {
                    Step::Read(lsn, jump, id, price, null_body) => {
                        seq += 1 + i64::from(*jump);
                        let lsn = 100 + i64::from(*lsn);
                        let id_bytes = id.to_be_bytes();
                        let body = if *null_body { WireField::Null } else { WireField::Text(b"hello") };
                        let fields = [
                            WireField::Binary(&id_bytes),
                            body,
                            WireField::Text(price.as_bytes()),
                            WireField::Text(b"2026-01-02"),
                        ];
                        reads.append_read(lsn, seq, 77, fields.into_iter()).unwrap();
                        let typed = table()
                            .iter()
                            .zip(&fields)
                            .map(|(spec, f)| match f {
                                WireField::Null => ColumnValue::Value(Value::Null),
                                WireField::Binary(raw) => ColumnValue::Value(
                                    crate::types::binary::parse(&spec.ty, raw).unwrap(),
                                ),
                                WireField::Text(raw) => ColumnValue::Value(
                                    crate::types::text::parse(&spec.ty, raw).unwrap(),
                                ),
                            })
                            .collect::<Vec<_>>();
                        reference.append(OP_READ, lsn, seq, 0, 77, &typed, None).unwrap();
                    }
                    Step::Change => {
                        seq += 1;
                        let row = [v(Value::Int4(7)), text("x"), v(Value::Null), v(Value::Null)];
                        let old = [v(Value::Int4(8)), text("y"), v(Value::Null), v(Value::Null)];
                        for b in [&mut reads, &mut reference] {
                            b.append(OP_UPDATE, 100, seq, 9, 77, &row, Some(&old)).unwrap();
                        }
                    }
                    Step::Truncate => {
                        seq += 1;
                        reads.append_truncate(100, seq, 9, 77);
                        reference.append_truncate(100, seq, 9, 77);
                    }
                    Step::Finish => {
                        prop_assert_eq!(reads.len(), reference.len());
                        got.push(reads.finish().unwrap());
                        want.push(reference.finish().unwrap());
                    }
                }
            }
            prop_assert_eq!(got, want);
        }
    }
}
