//! The compaction fold: change-log rows applied, in (`_lsn`, `_seq`) order, to the open
//! versions of a set of keys. Pure: record batches in, record batches out, no I/O.
//!
//! State is one *version* per key: the key's current row (live) or a tombstone (the key was
//! deleted; its later re-insert closes it). A version does not copy its values: it points at a
//! row of a source batch (the open versions read back from the history table, or the changes),
//! with per-column overrides for TOAST columns that Postgres did not send and that keep the
//! previous version's value. Output columns are gathered with one `interleave` per column,
//! except for versions that are an input row as it stands, when their order does not matter
//! (closed versions, and open ones carried to the next fold): those are filtered out of their
//! input batch.
//!
//! | change                    | effect on the key's open version                               |
//! |---------------------------|----------------------------------------------------------------|
//! | `I`, `R`, `U`             | the open version (live or tombstone) is closed at the change's LSN; the new row opens |
//! | `U` with a different old key | the old key's version is closed and a tombstone opens for it; then as above |
//! | `D`                       | a live version is closed and a tombstone opens                 |
//! | `T`                       | every live version is closed and a tombstone opens for each     |
//!
//! Tombstones carry the key and nulls elsewhere, with `_deleted = true`, so that the history
//! table "as of LSN X" is `_valid_from_lsn <= X AND (_valid_to_lsn > X OR _valid_to_lsn IS
//! NULL) AND NOT _deleted`, and the current table is the open versions that are not tombstones.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use deltalake::arrow::array::BooleanBufferBuilder;
use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, TimestampMicrosecondArray,
    UInt32Array,
};
use deltalake::arrow::buffer::BooleanBuffer;
use deltalake::arrow::compute::{interleave, nullif, FilterBuilder};
use deltalake::arrow::datatypes::{
    DataType, Field, FieldRef, Int64Type, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::row::{RowConverter, Rows, SortField};

use crate::batch::rows::{COMMIT_TS, LSN, OLD_PREFIX, OP, SEQ, UNCHANGED};
use crate::types::arrow::UTC;

pub const VALID_FROM_LSN: &str = "_valid_from_lsn";
pub const VALID_TO_LSN: &str = "_valid_to_lsn";
pub const VALID_FROM: &str = "_valid_from";
pub const VALID_TO: &str = "_valid_to";
pub const IS_CURRENT: &str = "_is_current";
pub const DELETED: &str = "_deleted";

#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("change log column {0:?} is missing")]
    MissingColumn(String),
    #[error("change log column {column:?} has type {found}, expected {expected}")]
    ColumnType {
        column: String,
        found: DataType,
        expected: DataType,
    },
    #[error("unknown change-log operation {0:?}")]
    UnknownOp(String),
    #[error("the writer of closed versions stopped (its error follows)")]
    OutputClosed,
    #[error("the buckets' hash ranges do not cover every row (a bucket file is missing?)")]
    BucketGap,
    #[error("too many rows for one compaction step")]
    TooManyRows,
    #[error("a worker of the fold stopped without the open versions of unit {0}")]
    UnitLost(usize),
    #[error("the table's files are not as compaction left them: {0}")]
    Inconsistent(&'static str),
    #[error(transparent)]
    Arrow(#[from] ArrowError),
}

/// The source columns of a table and which of them form the key.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Source columns, in change-log order, with their lake names and types (all nullable).
    pub source: SchemaRef,
    /// Indices into `source` of the key columns: the primary key or replica identity (the
    /// columns that have an `_old_<k>` column in the change log), or every column when the
    /// table has none.
    pub key: Vec<usize>,
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
}

impl Layout {
    /// Derives the layout from a change-log schema.
    pub fn from_changelog(schema: &Schema) -> Layout {
        let meta = crate::batch::rows::is_metadata_column;
        let source: Vec<Field> = schema
            .fields()
            .iter()
            .filter(|f| !meta(f.name()))
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        let mut key: Vec<usize> = source
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                schema
                    .field_with_name(&format!("{OLD_PREFIX}{}", f.name()))
                    .is_ok()
            })
            .map(|(i, _)| i)
            .collect();
        if key.is_empty() {
            key = (0..source.len()).collect();
        }
        Layout {
            source: Arc::new(Schema::new(source)),
            key,
        }
    }

    /// A stable description of the key (names and types): buckets are hashed from it, so a
    /// change means the table's buckets must be re-hashed.
    pub fn key_signature(&self) -> String {
        self.key
            .iter()
            .map(|&i| {
                let f = self.source.field(i);
                format!("{}:{}", f.name(), f.data_type())
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn source_fields(&self) -> Vec<Field> {
        self.source
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect()
    }

    /// The history table's schema: source columns + validity columns.
    pub fn history_schema(&self) -> SchemaRef {
        let mut fields = self.source_fields();
        fields.extend([
            Field::new(VALID_FROM_LSN, DataType::Int64, false),
            Field::new(VALID_TO_LSN, DataType::Int64, true),
            Field::new(VALID_FROM, ts_type(), false),
            Field::new(VALID_TO, ts_type(), true),
            Field::new(IS_CURRENT, DataType::Boolean, false),
            Field::new(DELETED, DataType::Boolean, false),
        ]);
        Arc::new(Schema::new(fields))
    }

    /// The current table's schema: source columns + `_lsn`, `_commit_ts`.
    pub fn current_schema(&self) -> SchemaRef {
        let mut fields = self.source_fields();
        fields.extend([
            Field::new(LSN, DataType::Int64, false),
            Field::new(COMMIT_TS, ts_type(), false),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn key_converter(&self) -> Result<RowConverter, ArrowError> {
        RowConverter::new(
            self.key
                .iter()
                .map(|&i| SortField::new(self.source.field(i).data_type().clone()))
                .collect(),
        )
    }

    /// The key rows of `batch` (whose first columns are the source columns), for hashing.
    pub fn key_rows(&self, batch: &RecordBatch, names: KeyNames) -> Result<Rows, FoldError> {
        let converter = self.key_converter()?;
        let cols = self.key_columns(batch, names)?;
        Ok(converter.convert_columns(&cols)?)
    }

    fn key_columns(
        &self,
        batch: &RecordBatch,
        names: KeyNames,
    ) -> Result<Vec<ArrayRef>, FoldError> {
        self.key
            .iter()
            .map(|&i| {
                let f = self.source.field(i);
                let name = match names {
                    KeyNames::Row => f.name().clone(),
                    KeyNames::Old => format!("{OLD_PREFIX}{}", f.name()),
                };
                column(batch, &name, f.data_type())
            })
            .collect()
    }
}

/// Which columns hold a key: the row's own, or the `_old_<k>` columns of a change.
#[derive(Debug, Clone, Copy)]
pub enum KeyNames {
    Row,
    Old,
}

fn column(batch: &RecordBatch, name: &str, ty: &DataType) -> Result<ArrayRef, FoldError> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| FoldError::MissingColumn(name.to_string()))?;
    if col.data_type() != ty {
        return Err(FoldError::ColumnType {
            column: name.to_string(),
            found: col.data_type().clone(),
            expected: ty.clone(),
        });
    }
    Ok(col.clone())
}

/// The bucket hash of a key: FNV-1a over the key's Arrow row encoding, then a 64-bit
/// finaliser. Buckets on storage depend on it: `tests` pin known values, so that a change
/// of the row encoding (an Arrow upgrade) cannot silently re-bucket tables.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser: spreads FNV's weak high bits.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

type RowRef = (u32, u32);

/// A key's row encoding, inline when short (the common integer and UUID keys): a state
/// lookup then touches one cache line instead of following a pointer to compare.
#[derive(Clone)]
enum Key {
    Inline { len: u8, bytes: [u8; 22] },
    Heap(Box<[u8]>),
}

impl Key {
    fn new(k: &[u8]) -> Key {
        if k.len() <= 22 {
            let mut bytes = [0u8; 22];
            bytes[..k.len()].copy_from_slice(k);
            Key::Inline {
                len: k.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(k.into())
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Heap(b) => b,
        }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

// Hashes exactly as `[u8]` does, so that lookups by `&[u8]` (`Borrow`) find it.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state)
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Closed versions are handed over in chunks of this many rows.
const CLOSED_CHUNK: usize = 128 * 1024;

/// A version's TOAST columns carried from earlier versions, behind one thin pointer: rare, and
/// a version (a state entry with its key) then fits a cache line.
#[derive(Debug, Clone)]
struct Overrides(Box<[(u32, RowRef)]>);

#[derive(Debug, Clone)]
struct Version {
    src: RowRef,
    /// TOAST columns carried from an earlier version: (column index, where the value is).
    overrides: Option<Box<Overrides>>,
    from_lsn: i64,
    from_ts: i64,
    deleted: bool,
    /// The version is its source row as it stands: an open version read back, the row of an
    /// insert or update (no overrides), or the tombstone of a delete (its row has the key).
    /// Closing it only marks the row (see [`Mark`]); other versions are gathered.
    own: bool,
}

const _: () = assert!(std::mem::size_of::<(Key, Version)>() <= 64);

impl Version {
    /// Ends this (live) version at (`lsn`, `ts`): it becomes a tombstone of the same key from
    /// then on, and the ended version is returned (to be closed).
    fn end_with_tombstone(&mut self, lsn: i64, ts: i64) -> Version {
        let tomb = Version {
            from_lsn: lsn,
            from_ts: ts,
            deleted: true,
            own: false,
            ..self.clone()
        };
        std::mem::replace(self, tomb)
    }

    fn value_ref(&self, col: u32) -> RowRef {
        self.overrides
            .as_ref()
            .and_then(|o| o.0.iter().find(|(c, _)| *c == col).map(|(_, r)| *r))
            .unwrap_or(self.src)
    }
}

struct Closed {
    v: Version,
    /// (`_valid_to_lsn`, `_valid_to`); `None` for a retired tombstone (see [`Retire`]).
    to: Option<(i64, i64)>,
}

/// When tombstones leave the open versions (`--tombstone-retention`). A tombstone (the
/// version a delete, a truncate or a key change opens) normally stays open until its key comes
/// back, so that the comeback can close it; a table that deletes a lot (a queue) then carries
/// every key it ever deleted in its open versions, and rewrites them with their buckets. A
/// tombstone older than `after` microseconds (of commit time) is *retired* instead: written
/// once, as it is (open: `_valid_to` null), with the closed versions, and dropped from the open
/// ones. A key that comes back more than `after` after its delete does not close its
/// tombstone, whether retired yet or not, so that the tables do not depend on when compaction
/// ran. The table as of any LSN reads the same either way (tombstones never match).
///
/// "Now" is a watermark, not a change's own commit time: the latest commit time of all the
/// changes up to it in commit order — of every key, this step's and every earlier step's
/// (kept in the history table). Commit times are not monotone in commit order (a load's rows
/// carry slotlake's clock, concurrent commits' times cross), and a tombstone retired at the
/// end of one run by a time a later change then undercuts would otherwise have been closed by
/// that change in a single run.
#[derive(Debug, Clone, Copy)]
pub struct Retire<'a> {
    pub after: i64,
    /// The watermark at each change of the step, whatever fold (unit of buckets) it goes to:
    /// (`_lsn`, `_seq`, watermark), in commit order (see [`Watermarks`]).
    pub clocks: &'a Watermarks,
}

/// (`_lsn`, `_seq`, `_commit_ts`) of each row of a change batch.
pub fn stamps(
    batch: &RecordBatch,
) -> Result<impl Iterator<Item = (i64, i64, i64)> + '_, FoldError> {
    let (lsn, seq, ts) = (
        int64(batch, LSN)?,
        int64(batch, SEQ)?,
        timestamps(batch, COMMIT_TS)?,
    );
    Ok((0..batch.num_rows()).map(|i| (lsn.value(i), seq.value(i), ts.value(i))))
}

/// The commit-time watermark at each change of a step (see [`Retire`]).
#[derive(Debug, Clone)]
pub struct Watermarks {
    /// The watermark before the step (`i64::MIN`: none yet).
    pub before: i64,
    /// (`_lsn`, `_seq`, watermark at the change), in commit order.
    pub at: Vec<(i64, i64, i64)>,
}

impl Watermarks {
    /// The watermarks of changes `(lsn, seq, commit time)` (any order) after `before`.
    pub fn new(before: i64, mut changes: Vec<(i64, i64, i64)>) -> Watermarks {
        if !changes.is_sorted_by_key(|&(l, s, _)| (l, s)) {
            changes.sort_unstable_by_key(|&(l, s, _)| (l, s));
        }
        let mut clock = before;
        for c in &mut changes {
            clock = clock.max(c.2);
            c.2 = clock;
        }
        Watermarks {
            before,
            at: changes,
        }
    }

    /// The watermark after every change of the step.
    pub fn after(&self) -> i64 {
        self.at.last().map_or(self.before, |c| c.2)
    }

    /// The watermark at each of `changes` (`lsn`, `seq`, own commit time), which come in
    /// commit order (a fold's changes: some of the step's): one walk along both lists. A
    /// change the step does not list (none should be) gets at least its own commit time.
    fn along(&self, changes: impl Iterator<Item = (i64, i64, i64)>) -> Vec<i64> {
        let mut i = 0;
        changes
            .map(|(lsn, seq, ts)| {
                while self.at.get(i).is_some_and(|&(l, s, _)| (l, s) < (lsn, seq)) {
                    i += 1;
                }
                match self.at.get(i) {
                    Some(&(l, s, clock)) if (l, s) == (lsn, seq) => clock,
                    _ => self.before.max(ts),
                }
            })
            .collect()
    }
}

impl Retire<'_> {
    fn due(retire: Option<Retire<'_>>, v: &Version, now: i64) -> bool {
        v.deleted && retire.is_some_and(|r| now.saturating_sub(v.from_ts) > r.after)
    }
}

/// The order a fold puts its open versions in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenRows {
    /// By key hash (then key bytes): what bucket files are cut from.
    ByHash,
    /// Any order: versions carried to the next fold, which only hashes them into its groups.
    /// The versions that are rows of the fold's input as they stand (most of them) are then
    /// copied out of each input batch with a filter, in input order, instead of gathered key
    /// by key from all over the inputs (a cache miss per version and column).
    Any,
}

/// What a fold produces.
pub struct FoldOutput {
    /// The open versions (history schema), in the order asked for: one batch in hash order
    /// ([`OpenRows::ByHash`]), or any number in any order.
    pub open: Vec<RecordBatch>,
    /// The key hash of each row of `open` ([`OpenRows::ByHash`]; `None` for `Any`).
    pub open_hashes: Option<Vec<u64>>,
    /// Versions closed by this fold: those handed to `on_closed` in chunks as they were
    /// produced, and those of `closed_parts`. Retired tombstones are written with them.
    pub closed_rows: usize,
    /// Tombstones retired (see [`Retire`]), among `closed_rows`.
    pub retired_rows: usize,
    /// The closed versions that are rows of the fold's input as they stand, by input batch:
    /// [`ClosedPart::build`] makes their history rows (a filter, not a gather).
    pub closed_parts: Vec<ClosedPart>,
    /// Changes applied.
    pub changes: usize,
}

/// The current table's rows of a batch of open history versions.
pub fn current_rows(layout: &Layout, open: &RecordBatch) -> Result<RecordBatch, FoldError> {
    let deleted = open
        .column_by_name(DELETED)
        .ok_or_else(|| FoldError::MissingColumn(DELETED.into()))?
        .as_boolean_opt()
        .ok_or_else(|| FoldError::MissingColumn(DELETED.into()))?;
    let live = deltalake::arrow::compute::not(deleted)?;
    let kept = deltalake::arrow::compute::filter_record_batch(open, &live)?;
    let n = layout.source.fields().len();
    let mut cols: Vec<ArrayRef> = kept.columns()[..n].to_vec();
    cols.push(kept.column(n).clone()); // _valid_from_lsn → _lsn
    cols.push(kept.column(n + 2).clone()); // _valid_from → _commit_ts
    Ok(RecordBatch::try_new(layout.current_schema(), cols)?)
}

/// Rows (open versions and changes, an upper bound of its keys) a fold group aims at: a
/// group's state (about 100 bytes a key) then stays in the processor's caches, where one state
/// of every key of a large bucket misses them on almost every lookup.
const GROUP_KEYS: usize = 8 * 1024;

/// Rows of open versions keyed at a time (one thread's share of the work). Tests use tiny
/// slices, so that their bases span several.
#[cfg(not(test))]
const BASE_SLICE_ROWS: usize = 64 * 1024;
#[cfg(test)]
const BASE_SLICE_ROWS: usize = 7;

/// Groups a fold splits its keys into, at most. Group numbers, and `MAX_GROUPS` for
/// truncates, are stored as `u16`.
const MAX_GROUPS: usize = 4096;
const _: () = assert!(MAX_GROUPS < u16::MAX as usize);

/// A change as a unit applies it: what the fold reads of its row, copied out in commit order,
/// so that a unit reads its changes from one list instead of from all over the step's
/// batches (which missed the caches on every change).
struct Step {
    lsn: i64,
    ts: i64,
    key: Key,
    /// Position in commit order.
    ord: u32,
    /// Change batch and row.
    b: u32,
    row: u32,
    op: Op,
    /// The key changed (an update with a different old key).
    moved: bool,
    /// Some TOAST columns were left out.
    unchanged: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Upsert,
    /// A row read from the source (`R`): an upsert, except that a row equal to its key's
    /// live version adds no version (a resumed load writes rows again, see `snapshot`).
    Restate,
    Delete,
    Truncate,
}

/// An open version with its key.
type Open = (Key, Version);

/// Open versions in key-hash order: (the key's hash, index into the versions).
type OpenOrder = Vec<(u64, u32)>;

/// A unit's open versions (history schema) and their key hashes, in hash order.
type UnitOpen = (Vec<u64>, RecordBatch);

/// The units a worker folded, by unit.
type UnitsDone = Vec<(usize, UnitOpen)>;

/// Applies `changes` (change-log rows already conformed to `layout`: the source columns, then
/// `_op`, `_lsn`, `_seq`, `_commit_ts`, `_unchanged` and the `_old_<k>` columns, in any order
/// of rows) to `base` (open versions in the history schema).
///
/// Keys are split into groups by the top bits of their hash (so a group is a range of the
/// order the open versions come out in), and each group is folded on its own: a key's
/// changes only touch its own version, a truncate is applied in every group, and a
/// key-changing update joins the groups of its old and new key into one unit of work. Units
/// run on every core. Closed versions are handed to `on_closed` in chunks, in no particular
/// order.
pub fn fold(
    layout: &Layout,
    base: &[RecordBatch],
    changes: Vec<RecordBatch>,
    on_closed: &mut (dyn FnMut(RecordBatch) -> Result<(), FoldError> + Send),
    threads: usize,
    rows: OpenRows,
    retire: Option<Retire<'_>>,
) -> Result<FoldOutput, FoldError> {
    fold_in_groups(
        layout, base, changes, on_closed, threads, rows, retire, GROUP_KEYS,
    )
}

/// [`fold`] with groups of about `group_keys` rows (tests use tiny groups).
#[allow(clippy::too_many_arguments)]
pub(super) fn fold_in_groups(
    layout: &Layout,
    base: &[RecordBatch],
    changes: Vec<RecordBatch>,
    on_closed: &mut (dyn FnMut(RecordBatch) -> Result<(), FoldError> + Send),
    threads: usize,
    rows: OpenRows,
    retire: Option<Retire<'_>>,
    group_keys: usize,
) -> Result<FoldOutput, FoldError> {
    let ncols = layout.source.fields().len();
    let converter = layout.key_converter()?;
    let index = |n: usize| u32::try_from(n).map_err(|_| FoldError::TooManyRows);
    let base_rows: usize = base.iter().map(|b| b.num_rows()).sum();
    let n: usize = changes.iter().map(|b| b.num_rows()).sum();
    let bits = ((base_rows + n) / group_keys.max(1))
        .clamp(1, MAX_GROUPS)
        .next_power_of_two()
        .trailing_zeros();
    let groups = 1usize << bits;
    let group_of = |h: u64| h.checked_shr(64 - bits).unwrap_or(0) as usize;
    let mut sources: Vec<&RecordBatch> = Vec::with_capacity(base.len() + changes.len() + 1);
    sources.extend(base);
    // The open versions, as the state entries a unit starts from, split into groups: a slice
    // of the base at a time on every thread, read in row order (the order of the base need not
    // follow the groups, see `OpenRows::Any`), each group's entries then read in a row by its
    // unit.
    let mut slices: Vec<(u32, usize, RecordBatch)> = Vec::new();
    for (b, batch) in base.iter().enumerate() {
        for offset in (0..batch.num_rows()).step_by(BASE_SLICE_ROWS) {
            let len = BASE_SLICE_ROWS.min(batch.num_rows() - offset);
            slices.push((index(b)?, offset, batch.slice(offset, len)));
        }
    }
    let base_groups = par_map(&slices, threads, |(b, offset, batch)| {
        let keys = converter.convert_columns(&layout.key_columns(batch, KeyNames::Row)?)?;
        let groups_of: Vec<usize> = (0..keys.num_rows())
            .map(|r| group_of(key_hash(keys.row(r).as_ref())))
            .collect();
        let mut sizes = vec![0usize; groups];
        for &g in &groups_of {
            sizes[g] += 1;
        }
        let mut lists: Vec<Vec<Open>> = sizes.iter().map(|&k| Vec::with_capacity(k)).collect();
        let (from_lsn, from_ts) = (
            int64(batch, VALID_FROM_LSN)?,
            timestamps(batch, VALID_FROM)?,
        );
        let deleted = bools(batch, DELETED)?;
        for (r, &g) in groups_of.iter().enumerate() {
            lists[g].push((
                Key::new(keys.row(r).as_ref()),
                Version {
                    src: (*b, index(offset + r)?),
                    overrides: None,
                    from_lsn: from_lsn.value(r),
                    from_ts: from_ts.value(r),
                    deleted: deleted.value(r),
                    own: true,
                },
            ));
        }
        Ok::<_, FoldError>(lists)
    })
    .into_iter()
    .collect::<Result<Vec<Vec<Vec<Open>>>, FoldError>>()?;
    drop(slices);
    let change_views = par_map(&changes, threads, |batch| {
        ChangeView::new(layout, &converter, batch)
    });
    let mut views = Vec::with_capacity(changes.len());
    for (batch, view) in changes.iter().zip(change_views) {
        let src = index(sources.len())?;
        sources.push(batch);
        views.push((src, view?));
    }
    // Commit order: (_lsn, _seq, change batch, row). (_lsn, _seq) is unique, so the order
    // never depends on file order.
    type Change = (i64, i64, u32, u32);
    let mut order: Vec<Change> = Vec::with_capacity(n);
    // Whether the rows come in commit order already (batch and row only grow as they are
    // listed, so (_lsn, _seq) never falling is enough).
    let (mut sorted, mut last) = (true, (i64::MIN, i64::MIN));
    for (b, (_, view)) in views.iter().enumerate() {
        let b = index(b)?;
        let at = view.lsn.values().iter().zip(view.seq.values().iter());
        for (row, (&lsn, &seq)) in at.enumerate() {
            sorted &= (lsn, seq) >= last;
            last = (lsn, seq);
            order.push((lsn, seq, b, index(row)?));
        }
    }
    // Change logs come in commit order but for the odd file or row group (a merged file, a
    // writer that interleaved its output): the stable sort merges the sorted runs it finds,
    // where the unstable one re-sorted a nearly sorted step from scratch (4.5 % of a
    // compaction's CPU, on the thread every other waits for). In order, nothing is sorted: the
    // sort's scan for runs took 12–25 ms of a 2,000,000-change step, on that thread.
    if !sorted {
        order.sort();
    }
    // With a tombstone retention, the watermark at each change, by position in commit order,
    // and after them all.
    let (clocks, horizon) = match retire {
        Some(r) => {
            let at = order
                .iter()
                .map(|&(lsn, seq, b, row)| (lsn, seq, views[b as usize].1.ts.value(row as usize)));
            let clocks = r.clocks.along(at);
            let horizon = clocks.iter().copied().fold(r.clocks.before, i64::max);
            (clocks, horizon)
        }
        None => (Vec::new(), i64::MIN),
    };
    // The steps of each group (truncates: `groups`), in commit order: each thread takes a
    // share of the commit order and files its changes by group, so a group's steps are its
    // lists in the shares' order. Then the groups key moves join.
    let share = n.div_ceil(threads.max(1)).max(1);
    let shares: Vec<(usize, &[Change])> = order
        .chunks(share)
        .enumerate()
        .map(|(t, part)| (t * share, part))
        .collect();
    type Filed = (Vec<Vec<Step>>, Vec<(usize, usize)>);
    let filed = par_map(
        &shares,
        threads,
        |&(first, part)| -> Result<Filed, FoldError> {
            let mut group = Vec::with_capacity(part.len());
            let mut sizes = vec![0usize; groups + 1];
            let mut moves = Vec::new();
            for &(_, _, b, row) in part {
                let (view, i) = (&views[b as usize].1, row as usize);
                let op = match view.ops.value(i) {
                    "I" | "U" => Op::Upsert,
                    "R" => Op::Restate,
                    "D" => Op::Delete,
                    "T" => Op::Truncate,
                    other => return Err(FoldError::UnknownOp(other.to_string())),
                };
                let g = if op == Op::Truncate {
                    groups
                } else {
                    let g = group_of(view.hashes[i]);
                    if view.has_old[i] {
                        let old = group_of(key_hash(view.old_keys.row(i).as_ref()));
                        if old != g {
                            moves.push((old, g));
                        }
                    }
                    g
                };
                sizes[g] += 1;
                group.push((g as u16, op));
            }
            let mut lists: Vec<Vec<Step>> = sizes.iter().map(|&k| Vec::with_capacity(k)).collect();
            for (j, (&(lsn, _, b, row), &(g, op))) in part.iter().zip(&group).enumerate() {
                let g = usize::from(g);
                let (view, i) = (&views[b as usize].1, row as usize);
                let key = view.keys.row(i);
                lists[g].push(Step {
                    lsn,
                    ts: view.ts.value(i),
                    key: Key::new(if op == Op::Truncate {
                        &[]
                    } else {
                        key.as_ref()
                    }),
                    ord: index(first + j)?,
                    b,
                    row,
                    op,
                    moved: view.has_old[i] && view.old_keys.row(i) != key,
                    unchanged: view.unchanged.is_valid(i) && view.unchanged.value_length(i) > 0,
                });
            }
            Ok((lists, moves))
        },
    );
    drop(shares);
    drop(order);
    let mut parent: Vec<usize> = (0..groups).collect();
    let mut lists: Vec<Vec<Vec<Step>>> = Vec::with_capacity(filed.len());
    for part in filed {
        let (part, moves) = part?;
        lists.push(part);
        for (old, g) in moves {
            let (x, y) = (super::find(&mut parent, old), super::find(&mut parent, g));
            parent[x] = y;
        }
    }
    // A group's steps (`groups`: the truncates, which every group applies), in commit order.
    let steps_of = |g: usize| lists.iter().flat_map(move |share| share[g].iter());
    let truncates = lists.iter().any(|share| !share[groups].is_empty());
    // Units: groups joined by key moves, in the order of their first group.
    let mut unit_of = vec![usize::MAX; groups];
    let mut units: Vec<Vec<usize>> = Vec::new();
    for g in 0..groups {
        let root = super::find(&mut parent, g);
        if unit_of[root] == usize::MAX {
            unit_of[root] = units.len();
            units.push(Vec::new());
        }
        units[unit_of[root]].push(g);
    }

    let col_index: HashMap<&str, u32> = layout
        .source
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name().as_str(), i as u32))
        .collect();
    let nulls: Vec<ArrayRef> = layout
        .source
        .fields()
        .iter()
        .map(|f| deltalake::arrow::array::new_null_array(f.data_type(), 1))
        .collect();
    let gather = Gather {
        layout,
        sources: &sources,
        nulls: &nulls,
        null_src: index(sources.len())?,
        ncols,
    };
    let folder = Folder {
        retire,
        clocks: &clocks,
        horizon,
        views: &views,
        gather: &gather,
        col_index: &col_index,
        on_closed: std::sync::Mutex::new(on_closed),
    };
    let work = |unit: &[usize], scratch: &mut Scratch, closed: &mut ClosedChunk| {
        let base: Vec<&[Open]> = unit
            .iter()
            .flat_map(|&g| base_groups.iter().map(move |lists| lists[g].as_slice()))
            .collect();
        let mut steps: Vec<&Step> = unit
            .iter()
            .flat_map(|&g| steps_of(g))
            .chain(steps_of(groups))
            .collect();
        if unit.len() > 1 || truncates {
            steps.sort_unstable_by_key(|s| s.ord);
        }
        let open = folder.unit(&base, &steps, scratch, closed)?;
        if rows == OpenRows::Any {
            // Rows of the input as they stand are filtered out of it afterwards; the others
            // (TOAST values carried, tombstones of truncates and key moves) gathered here.
            let mut others = Vec::new();
            for (_, v) in &open {
                if v.own {
                    closed.marks.keep_open(v.src);
                } else {
                    others.push((v, None));
                }
            }
            return Ok::<UnitOpen, FoldError>((Vec::new(), gather.batch(others.into_iter())?));
        }
        // Sorted by (hash, index): moving 16-byte entries instead of whole versions; equal
        // hashes fall back to the keys.
        let mut order: OpenOrder = Vec::with_capacity(open.len());
        for (i, (k, _)) in open.iter().enumerate() {
            let i = u32::try_from(i).map_err(|_| FoldError::TooManyRows)?;
            order.push((key_hash(k.as_slice()), i));
        }
        order.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| open[a.1 as usize].0.cmp(&open[b.1 as usize].0))
        });
        let batch = gather.batch(order.iter().map(|&(_, i)| (&open[i as usize].1, None)))?;
        Ok::<UnitOpen, FoldError>((order.iter().map(|&(h, _)| h).collect(), batch))
    };
    let threads = threads.clamp(1, units.len().max(1));
    let mut opens: Vec<Option<UnitOpen>> = Vec::with_capacity(units.len());
    opens.resize_with(units.len(), || None);
    let (mut closed_rows, mut retired_rows) = (0usize, 0usize);
    let mut marks = Vec::with_capacity(threads);
    if threads <= 1 {
        let (mut scratch, mut closed) = <(Scratch, ClosedChunk)>::default();
        for (u, unit) in units.iter().enumerate() {
            opens[u] = Some(work(unit, &mut scratch, &mut closed)?);
        }
        folder.flush(&mut closed)?;
        closed_rows = closed.sent;
        retired_rows = closed.retired;
        marks.push(closed.marks);
    } else {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let worker = || -> Result<(UnitsDone, ClosedChunk), FoldError> {
            let (mut scratch, mut closed) = <(Scratch, ClosedChunk)>::default();
            let mut done = Vec::new();
            loop {
                let u = next.fetch_add(1, Relaxed);
                if u >= units.len() || failed.load(Relaxed) {
                    break;
                }
                match work(&units[u], &mut scratch, &mut closed) {
                    Ok(open) => done.push((u, open)),
                    Err(e) => {
                        failed.store(true, Relaxed);
                        return Err(e);
                    }
                }
            }
            if let Err(e) = folder.flush(&mut closed) {
                failed.store(true, Relaxed);
                return Err(e);
            }
            Ok((done, closed))
        };
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        for result in results {
            let (done, closed) = result?;
            closed_rows += closed.sent;
            retired_rows += closed.retired;
            marks.push(closed.marks);
            for (u, open) in done {
                opens[u] = Some(open);
            }
        }
    }

    let shape = Arc::new(PartShape {
        schema: layout.history_schema(),
        key: layout.key.clone(),
        ncols,
    });
    let (closed_parts, mut open) = settle(
        &sources,
        base.len(),
        &shape,
        &marks,
        rows == OpenRows::Any,
        threads,
    )?;
    drop(marks);
    closed_rows += closed_parts.iter().map(ClosedPart::rows).sum::<usize>();

    let mut parts: Vec<UnitOpen> = Vec::with_capacity(units.len());
    for (u, open) in opens.into_iter().enumerate() {
        parts.push(open.ok_or(FoldError::UnitLost(u))?);
    }
    if rows == OpenRows::Any {
        // The rows of the input kept as they stand, as they were filtered out (copying them
        // into one batch took 1–4 % of a compaction), then the units' gathered versions (few:
        // TOAST values carried, tombstones of truncates and key moves) in one batch, so that
        // steps carried one after another do not pile up small ones.
        let others: Vec<RecordBatch> = parts
            .into_iter()
            .map(|(_, batch)| batch)
            .filter(|b| b.num_rows() > 0)
            .collect();
        // (`settle` gives no empty batches.)
        if !others.is_empty() {
            open.push(deltalake::arrow::compute::concat_batches(
                &shape.schema,
                &others,
            )?);
        }
        return Ok(FoldOutput {
            open,
            open_hashes: None,
            closed_rows,
            retired_rows,
            closed_parts,
            changes: n,
        });
    }
    // By key hash (then key bytes, for a deterministic order). Each unit's versions are sorted
    // and a group is a range of hashes: the output is each group's slice of its unit's
    // versions, in group order. These pieces (batch, start, len) of the units' batches are
    // copied a column at a time (each batch's column dropped once copied, so the versions are
    // not held twice).
    let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
    for g in 0..groups {
        let u = unit_of[super::find(&mut parent, g)];
        let hashes = &parts[u].0;
        let start = hashes.partition_point(|&h| group_of(h) < g);
        let end = hashes.partition_point(|&h| group_of(h) <= g);
        if end > start {
            pieces.push((u, start, end - start));
        }
    }
    let open_hashes: Vec<u64> = pieces
        .iter()
        .flat_map(|&(u, start, len)| parts[u].0[start..start + len].iter().copied())
        .collect();
    let batches: Vec<RecordBatch> = parts.into_iter().map(|(_, batch)| batch).collect();
    let schema = layout.history_schema();
    let mut batch_columns: Vec<Vec<ArrayRef>> =
        batches.iter().map(|b| b.columns().to_vec()).collect();
    drop(batches);
    // A column per thread at a time; each batch's columns dropped once copied.
    let fields: Vec<(usize, &FieldRef)> = schema.fields().iter().enumerate().collect();
    let mut columns = Vec::with_capacity(fields.len());
    for round in fields.chunks(threads.max(1)) {
        let copied = par_map(round, threads, |&(c, field)| {
            let slices: Vec<ArrayRef> = pieces
                .iter()
                .map(|&(b, start, len)| batch_columns[b][c].slice(start, len))
                .collect();
            let refs: Vec<&dyn Array> = slices.iter().map(|a| a.as_ref()).collect();
            if refs.is_empty() {
                Ok(deltalake::arrow::array::new_empty_array(field.data_type()))
            } else {
                deltalake::arrow::compute::concat(&refs)
            }
        });
        for column in copied {
            columns.push(column?);
        }
        for &(c, field) in round {
            for cols in &mut batch_columns {
                cols[c] = deltalake::arrow::array::new_empty_array(field.data_type());
            }
        }
    }
    let open_batch = RecordBatch::try_new(schema, columns)?;
    Ok(FoldOutput {
        open: vec![open_batch],
        open_hashes: Some(open_hashes),
        closed_rows,
        retired_rows,
        closed_parts,
        changes: n,
    })
}

/// `open` (open versions in any order, see [`OpenRows::Any`]) by key hash, then key bytes
/// (the order [`OpenRows::ByHash`] gives), with the hashes.
pub fn by_hash(layout: &Layout, open: &RecordBatch) -> Result<(Vec<u64>, RecordBatch), FoldError> {
    let keys = layout.key_rows(open, KeyNames::Row)?;
    let mut order: Vec<(u64, u32)> = Vec::with_capacity(keys.num_rows());
    for r in 0..keys.num_rows() {
        let i = u32::try_from(r).map_err(|_| FoldError::TooManyRows)?;
        order.push((key_hash(keys.row(r).as_ref()), i));
    }
    order.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| keys.row(a.1 as usize).cmp(&keys.row(b.1 as usize)))
    });
    let indices = UInt32Array::from_iter_values(order.iter().map(|&(_, i)| i));
    let sorted = deltalake::arrow::compute::take_record_batch(open, &indices)?;
    Ok((order.into_iter().map(|(h, _)| h).collect(), sorted))
}

/// The buffers of one worker, kept from unit to unit: allocating them anew for every unit
/// (large allocations are fresh pages from the kernel) cost more than the lookups.
#[derive(Default)]
struct Scratch {
    state: HashMap<Key, Version, foldhash::fast::RandomState>,
}

/// Versions closed and not handed over yet, of one worker.
#[derive(Default)]
struct ClosedChunk {
    versions: Vec<Closed>,
    /// Versions handed over so far.
    sent: usize,
    /// Tombstones retired.
    retired: usize,
    /// The worker's marks of own versions.
    marks: Marks,
}

/// What the units of one fold share.
struct Folder<'a, 'f> {
    retire: Option<Retire<'a>>,
    /// The watermark at each change (by `Step::ord`), with a retention.
    clocks: &'a [i64],
    /// The watermark after the fold's changes.
    horizon: i64,
    views: &'a [(u32, ChangeView<'a>)],
    gather: &'a Gather<'a>,
    col_index: &'a HashMap<&'a str, u32>,
    on_closed: std::sync::Mutex<&'f mut (dyn FnMut(RecordBatch) -> Result<(), FoldError> + Send)>,
}

impl Folder<'_, '_> {
    /// Hands the closed versions of `closed` over.
    fn flush(&self, closed: &mut ClosedChunk) -> Result<(), FoldError> {
        if closed.versions.is_empty() {
            return Ok(());
        }
        // Gathered under the lock: while the writer is behind, a worker waits before building
        // its chunk, so that one chunk waits for the writer, not one per worker.
        let mut on_closed = self.on_closed.lock().map_err(|_| FoldError::OutputClosed)?;
        let batch = self.gather.closed(&closed.versions)?;
        closed.sent += closed.versions.len();
        closed.versions.clear();
        (*on_closed)(batch)
    }

    /// Whether every source column of version `v` equals row `row`'s (nulls equal nulls).
    fn same_values(&self, v: &Version, row: RowRef) -> bool {
        let sources = self.gather.sources;
        (0..self.gather.ncols).all(|c| {
            let (a, b) = (v.value_ref(c as u32), row);
            let (Some(x), Some(y)) = (sources.get(a.0 as usize), sources.get(b.0 as usize)) else {
                return false;
            };
            let (x, y) = (x.column(c), y.column(c));
            deltalake::arrow::array::make_comparator(x, y, Default::default())
                .is_ok_and(|cmp| cmp(a.1 as usize, b.1 as usize).is_eq())
        })
    }

    /// Folds `steps` (the unit's changes and every truncate, in commit order) into the open
    /// versions `base` of one unit's keys; returns the unit's open versions.
    fn unit(
        &self,
        base: &[&[Open]],
        steps: &[&Step],
        scratch: &mut Scratch,
        closed: &mut ClosedChunk,
    ) -> Result<Vec<Open>, FoldError> {
        let state = &mut scratch.state;
        let base_rows: usize = base.iter().map(|g| g.len()).sum();
        state.clear();
        state.reserve(base_rows + base_rows / 4);
        for (key, version) in base.iter().flat_map(|g| g.iter()) {
            state.insert(key.clone(), version.clone());
        }
        for step in steps {
            if closed.versions.len() >= CLOSED_CHUNK {
                self.flush(closed)?;
            }
            let (l, t, row) = (step.lsn, step.ts, step.row);
            let now = self.clocks.get(step.ord as usize).copied().unwrap_or(t);
            let close = |v: Version, closed: &mut ClosedChunk| {
                if Retire::due(self.retire, &v, now) {
                    self.retire(v, closed);
                } else if v.own {
                    closed.marks.close(v.src, l, t);
                } else {
                    closed.versions.push(Closed {
                        v,
                        to: Some((l, t)),
                    })
                }
            };
            match step.op {
                Op::Upsert | Op::Restate => {
                    let (src, view) = &self.views[step.b as usize];
                    let i = row as usize;
                    if step.op == Op::Restate
                        && state
                            .get(step.key.as_slice())
                            .is_some_and(|v| !v.deleted && self.same_values(v, (*src, row)))
                    {
                        continue;
                    }
                    let mut carried_from: Option<Version> = None;
                    if step.moved {
                        // The key changed: the old key's row ends here and a tombstone opens.
                        if let Some(prev) = state.get_mut(view.old_keys.row(i).as_ref()) {
                            if !prev.deleted {
                                let ended = prev.end_with_tombstone(l, t);
                                carried_from = Some(ended.clone());
                                close(ended, closed);
                            }
                        }
                    }
                    let mut overrides = Vec::new();
                    let next = |overrides: Vec<(u32, RowRef)>| Version {
                        src: (*src, row),
                        own: overrides.is_empty(),
                        overrides: (!overrides.is_empty())
                            .then(|| Box::new(Overrides(overrides.into()))),
                        from_lsn: l,
                        from_ts: t,
                        deleted: false,
                    };
                    // A TOAST column left out keeps the value of the first of `from` that has
                    // one. Postgres leaves out only TOASTed values, never a null, so a null in
                    // an earlier version means its value was never known: a key changed during
                    // a resumed load by a row the lake did not have yet, whose later version
                    // the load read at its new key (see `snapshot`). No version at all: null.
                    let carry =
                        |from: [Option<&Version>; 2], overrides: &mut Vec<(u32, RowRef)>| {
                            if !step.unchanged {
                                return;
                            }
                            let names = view.unchanged.value(i);
                            for name in names.as_string::<i32>().iter().flatten() {
                                let Some(&c) = self.col_index.get(name) else {
                                    continue;
                                };
                                let known = |&(s, r): &RowRef| {
                                    self.gather.sources[s as usize]
                                        .column(c as usize)
                                        .is_valid(r as usize)
                                };
                                let refs = || from.iter().flatten().map(|v| v.value_ref(c));
                                if let Some(r) = refs().find(known).or_else(|| refs().next()) {
                                    overrides.push((c, r));
                                }
                            }
                        };
                    match state.get_mut(step.key.as_slice()) {
                        Some(prev) => {
                            let live = (!prev.deleted).then_some(&*prev);
                            carry([carried_from.as_ref(), live], &mut overrides);
                            let ended = std::mem::replace(prev, next(overrides));
                            close(ended, closed);
                        }
                        None => {
                            carry([carried_from.as_ref(), None], &mut overrides);
                            state.insert(step.key.clone(), next(overrides));
                        }
                    }
                }
                Op::Delete => {
                    if let Some(prev) = state.get_mut(step.key.as_slice()) {
                        if !prev.deleted {
                            // The tombstone is the delete's row: it has the key, and the
                            // other columns are nulled on output.
                            let tomb = Version {
                                src: (self.views[step.b as usize].0, row),
                                overrides: None,
                                from_lsn: l,
                                from_ts: t,
                                deleted: true,
                                own: true,
                            };
                            let ended = std::mem::replace(prev, tomb);
                            close(ended, closed);
                        }
                    }
                }
                Op::Truncate => {
                    for v in state.values_mut() {
                        if !v.deleted {
                            let ended = v.end_with_tombstone(l, t);
                            close(ended, closed);
                        }
                    }
                }
            }
        }
        let mut open = Vec::with_capacity(state.len());
        for (key, v) in state.drain() {
            if Retire::due(self.retire, &v, self.horizon) {
                self.retire(v, closed);
            } else {
                open.push((key, v));
            }
        }
        Ok(open)
    }

    /// Writes tombstone `v` with the closed versions, open (see [`Retire`]).
    fn retire(&self, v: Version, closed: &mut ClosedChunk) {
        closed.retired += 1;
        if v.own {
            closed.marks.close(v.src, RETIRED, i64::MIN);
        } else {
            closed.versions.push(Closed { v, to: None });
        }
    }
}

/// The columns of one change batch the fold reads.
struct ChangeView<'a> {
    keys: Rows,
    /// [`key_hash`] of each row's key.
    hashes: Vec<u64>,
    old_keys: Rows,
    has_old: Vec<bool>,
    ops: &'a deltalake::arrow::array::StringArray,
    lsn: &'a Int64Array,
    seq: &'a Int64Array,
    ts: &'a TimestampMicrosecondArray,
    unchanged: &'a deltalake::arrow::array::ListArray,
}

impl<'a> ChangeView<'a> {
    fn new(
        layout: &Layout,
        converter: &RowConverter,
        batch: &'a RecordBatch,
    ) -> Result<ChangeView<'a>, FoldError> {
        let old_cols = layout.key_columns(batch, KeyNames::Old)?;
        let keys = converter.convert_columns(&layout.key_columns(batch, KeyNames::Row)?)?;
        let has_old: Vec<bool> = (0..batch.num_rows())
            .map(|i| old_cols.iter().any(|c| c.is_valid(i)))
            .collect();
        // Old keys are read only where there is one; most batches have none.
        let old_keys = if has_old.contains(&true) {
            converter.convert_columns(&old_cols)?
        } else {
            converter.empty_rows(0, 0)
        };
        Ok(ChangeView {
            hashes: (0..keys.num_rows())
                .map(|r| key_hash(keys.row(r).as_ref()))
                .collect(),
            keys,
            old_keys,
            has_old,
            ops: batch
                .column_by_name(OP)
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or_else(|| FoldError::MissingColumn(OP.into()))?,
            lsn: int64(batch, LSN)?,
            seq: int64(batch, SEQ)?,
            ts: timestamps(batch, COMMIT_TS)?,
            unchanged: batch
                .column_by_name(UNCHANGED)
                .and_then(|c| c.as_list_opt::<i32>())
                .ok_or_else(|| FoldError::MissingColumn(UNCHANGED.into()))?,
        })
    }
}

/// `f` of every item, results in the items' order, on up to `threads` threads.
fn par_map<'a, T: Sync, R: Send>(
    items: &'a [T],
    threads: usize,
    f: impl Fn(&'a T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    // Items taken one at a time, in order, by whichever thread is free: items differ in size
    // (a carried base is one batch as large as a step's changes), and fixed shares left one
    // thread idle while the other finished the large one.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    done.sort_unstable_by_key(|&(i, _)| i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// A row of a source batch (open versions, then changes) whose own version (see
/// [`Version::own`]) a worker's fold ended: closed at (`lsn`, `ts`), or [`RETIRED`] (`ts`
/// unused).
#[derive(Clone, Copy)]
struct Mark {
    row: u32,
    lsn: i64,
    ts: i64,
}

/// One worker's [`Mark`]s and the rows whose own versions it kept open ([`OpenRows::Any`]),
/// by source batch, in the order it made them. Appended as the fold goes and applied a source
/// batch at a time afterwards (see [`settle`]): marking each row in place, in arrays for all
/// of a step's rows, was a store to a random place in tens of megabytes per closed version,
/// which missed the caches and the TLB every time (a fifth of a compaction's CPU, measured by
/// leaving the stores out).
#[derive(Default)]
struct Marks {
    closed: Vec<Vec<Mark>>,
    kept: Vec<Vec<u32>>,
}

impl Marks {
    fn close(&mut self, (s, row): RowRef, lsn: i64, ts: i64) {
        debug_assert!(
            lsn != KEPT_OPEN && lsn != i64::MIN,
            "an LSN taken for a mark"
        );
        grown(&mut self.closed, s).push(Mark { row, lsn, ts });
    }

    fn keep_open(&mut self, (s, row): RowRef) {
        grown(&mut self.kept, s).push(row);
    }
}

/// List `s` of `lists`, added if missing.
fn grown<T>(lists: &mut Vec<Vec<T>>, s: u32) -> &mut Vec<T> {
    let s = s as usize;
    if lists.len() <= s {
        lists.resize_with(s + 1, Vec::new);
    }
    &mut lists[s]
}

/// [`settle`]'s mark of a row whose own version is open at the end of the fold (no LSN is that
/// high: Postgres LSNs are below 2^63).
const KEPT_OPEN: i64 = i64::MAX;
/// [`Mark`] of a row whose own version is a retired tombstone (see [`Retire`]): written with
/// the closed versions, open.
const RETIRED: i64 = i64::MAX - 1;

/// The workers' `marks` applied to each source batch (the first `bases` are open versions,
/// the others changes), on every thread: the closed rows of each batch that has any, and
/// (with `open`) the history rows of the rows kept open ([`OpenRows::Any`]), in source order.
/// A row belongs to one unit, so one worker marks it, at most once.
fn settle(
    sources: &[&RecordBatch],
    bases: usize,
    shape: &Arc<PartShape>,
    marks: &[Marks],
    open: bool,
    threads: usize,
) -> Result<(Vec<ClosedPart>, Vec<RecordBatch>), FoldError> {
    let numbered: Vec<usize> = (0..sources.len()).collect();
    let settled = par_map(&numbered, threads, |&s| {
        // A batch no worker marked (none of its versions closed or kept) has nothing to give.
        let unmarked = |w: &Marks| {
            w.closed.get(s).is_none_or(Vec::is_empty) && w.kept.get(s).is_none_or(Vec::is_empty)
        };
        if marks.iter().all(unmarked) {
            return Ok::<_, FoldError>((None, None));
        }
        let batch = sources[s];
        // (`_valid_to_lsn` or a mark, `_valid_to`) by row; `i64::MIN`: not marked.
        let mut to = vec![(i64::MIN, i64::MIN); batch.num_rows()];
        for m in marks.iter().filter_map(|w| w.closed.get(s)).flatten() {
            if let Some(slot) = to.get_mut(m.row as usize) {
                *slot = (m.lsn, m.ts);
            }
        }
        for &row in marks.iter().filter_map(|w| w.kept.get(s)).flatten() {
            if let Some(slot) = to.get_mut(row as usize) {
                slot.0 = KEPT_OPEN;
            }
        }
        let change = s >= bases;
        let kept = if open {
            let mask = BooleanBuffer::collect_bool(to.len(), |i| to[i].0 == KEPT_OPEN);
            let mask = BooleanArray::new(mask, None);
            (mask.true_count() > 0)
                .then(|| own_rows(shape, batch, change, &mask, None))
                .transpose()?
        } else {
            None
        };
        let closed_at = |l: i64| l != i64::MIN && l != KEPT_OPEN;
        // Counted first: grown a push at a time, the two vectors were copied over and over
        // (0.4 % of a compaction's instructions).
        let n = to.iter().filter(|&&(l, _)| closed_at(l)).count();
        if n == 0 {
            return Ok((None, kept));
        }
        let mut mask = BooleanBufferBuilder::new(to.len());
        let (mut to_lsn, mut to_ts) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &(l, t) in &to {
            let closed = closed_at(l);
            mask.append(closed);
            if closed {
                to_lsn.push(l);
                to_ts.push(t);
            }
        }
        let batch = if change {
            // Only what `build` reads: the change's other columns are freed with it.
            let schema = batch.schema();
            let indices: Vec<usize> = (0..shape.ncols)
                .chain(
                    [OP, LSN, COMMIT_TS]
                        .iter()
                        .filter_map(|n| schema.index_of(n).ok()),
                )
                .collect();
            batch.project(&indices)?
        } else {
            batch.clone()
        };
        let part = ClosedPart {
            batch,
            change,
            mask: BooleanArray::new(mask.finish(), None),
            to_lsn,
            to_ts,
            shape: shape.clone(),
        };
        Ok((Some(part), kept))
    });
    let (mut parts, mut kept) = (Vec::new(), Vec::new());
    for r in settled {
        let (part, open) = r?;
        parts.extend(part);
        kept.extend(open);
    }
    Ok((parts, kept))
}

/// What building a [`ClosedPart`] needs of the table.
pub struct PartShape {
    schema: SchemaRef,
    key: Vec<usize>,
    ncols: usize,
}

/// Rows of one input batch of a fold whose own versions it closed, and where.
pub struct ClosedPart {
    batch: RecordBatch,
    /// A change batch (else open versions, in the history schema).
    change: bool,
    mask: BooleanArray,
    to_lsn: Vec<i64>,
    to_ts: Vec<i64>,
    shape: Arc<PartShape>,
}

impl ClosedPart {
    pub fn rows(&self) -> usize {
        self.to_lsn.len()
    }

    /// The history rows of the closed versions.
    pub fn build(self) -> Result<RecordBatch, FoldError> {
        own_rows(
            &self.shape,
            &self.batch,
            self.change,
            &self.mask,
            Some((self.to_lsn, self.to_ts)),
        )
    }
}

/// The history rows of the rows of `batch` (a change batch when `change`, else open versions)
/// that `mask` selects, as their own versions: closed at `to` (`_valid_to_lsn`, `_valid_to`
/// per selected row), or open (`None`).
fn own_rows(
    shape: &PartShape,
    batch: &RecordBatch,
    change: bool,
    mask: &BooleanArray,
    to: Option<(Vec<i64>, Vec<i64>)>,
) -> Result<RecordBatch, FoldError> {
    let filter = FilterBuilder::new(mask).optimize().build();
    let ts = |a: &TimestampMicrosecondArray| -> Result<ArrayRef, FoldError> {
        let kept = filter.filter(a)?;
        Ok(Arc::new(
            kept.as_primitive::<TimestampMicrosecondType>()
                .clone()
                .with_timezone(UTC),
        ))
    };
    let (from_lsn, from_ts, deleted) = if change {
        let ops = filter.filter(
            batch
                .column_by_name(OP)
                .ok_or_else(|| FoldError::MissingColumn(OP.into()))?,
        )?;
        let ops = ops
            .as_string_opt::<i32>()
            .ok_or_else(|| FoldError::MissingColumn(OP.into()))?;
        let deleted: BooleanArray = ops.iter().map(|o| Some(o == Some("D"))).collect();
        (
            filter.filter(int64(batch, LSN)?)?,
            ts(timestamps(batch, COMMIT_TS)?)?,
            deleted,
        )
    } else {
        (
            filter.filter(int64(batch, VALID_FROM_LSN)?)?,
            ts(timestamps(batch, VALID_FROM)?)?,
            filter.filter(bools(batch, DELETED)?)?.as_boolean().clone(),
        )
    };
    // A delete's row may carry every column (REPLICA IDENTITY FULL); its tombstone keeps
    // only the key.
    let null_out = change && deleted.true_count() > 0;
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(shape.schema.fields().len());
    for c in 0..shape.ncols {
        let kept = filter.filter(batch.column(c))?;
        cols.push(if null_out && !shape.key.contains(&c) {
            nullif(&kept, &deleted)?
        } else {
            kept
        });
    }
    let n = filter.count();
    cols.push(from_lsn);
    let current = match to {
        Some((to_lsn, to_ts)) if !to_lsn.contains(&RETIRED) => {
            cols.push(Arc::new(Int64Array::from(to_lsn)));
            cols.push(from_ts);
            cols.push(Arc::new(
                TimestampMicrosecondArray::from(to_ts).with_timezone(UTC),
            ));
            BooleanArray::from(vec![false; n])
        }
        Some((to_lsn, to_ts)) => {
            // Retired tombstones among them: open.
            let closed = |l: &i64| *l != RETIRED;
            cols.push(Arc::new(Int64Array::from_iter(
                to_lsn.iter().map(|l| closed(l).then_some(*l)),
            )));
            cols.push(from_ts);
            cols.push(Arc::new(
                TimestampMicrosecondArray::from_iter(
                    to_lsn
                        .iter()
                        .zip(&to_ts)
                        .map(|(l, t)| closed(l).then_some(*t)),
                )
                .with_timezone(UTC),
            ));
            BooleanArray::from_iter(to_lsn.iter().map(|l| Some(!closed(l))))
        }
        None => {
            cols.push(deltalake::arrow::array::new_null_array(&DataType::Int64, n));
            cols.push(from_ts);
            cols.push(deltalake::arrow::array::new_null_array(&ts_type(), n));
            BooleanArray::from(vec![true; n])
        }
    };
    cols.push(Arc::new(current));
    cols.push(Arc::new(deleted));
    Ok(RecordBatch::try_new(shape.schema.clone(), cols)?)
}

struct Gather<'a> {
    layout: &'a Layout,
    sources: &'a [&'a RecordBatch],
    nulls: &'a [ArrayRef],
    null_src: u32,
    ncols: usize,
}

impl Gather<'_> {
    fn closed(&self, closed: &[Closed]) -> Result<RecordBatch, FoldError> {
        self.batch(closed.iter().map(|c| (&c.v, c.to)))
    }

    /// The history rows of `versions` (`Some((to_lsn, to_ts))` for closed ones).
    fn batch<'v>(
        &self,
        versions: impl Iterator<Item = (&'v Version, Option<(i64, i64)>)> + Clone,
    ) -> Result<RecordBatch, FoldError> {
        let versions: Vec<(&Version, Option<(i64, i64)>)> = versions.collect();
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.ncols + 6);
        for c in 0..self.ncols {
            let is_key = self.layout.key.contains(&c);
            let mut arrays: Vec<&dyn Array> =
                self.sources.iter().map(|b| b.column(c).as_ref()).collect();
            arrays.push(self.nulls[c].as_ref());
            let indices: Vec<(usize, usize)> = versions
                .iter()
                .map(|(v, _)| {
                    let (s, r) = if v.deleted && !is_key {
                        (self.null_src, 0)
                    } else {
                        v.value_ref(c as u32)
                    };
                    (s as usize, r as usize)
                })
                .collect();
            cols.push(interleave(&arrays, &indices)?);
        }
        cols.push(Arc::new(Int64Array::from_iter_values(
            versions.iter().map(|(v, _)| v.from_lsn),
        )));
        cols.push(Arc::new(Int64Array::from_iter(
            versions.iter().map(|(_, to)| to.map(|t| t.0)),
        )));
        cols.push(Arc::new(
            TimestampMicrosecondArray::from_iter_values(versions.iter().map(|(v, _)| v.from_ts))
                .with_timezone(UTC),
        ));
        cols.push(Arc::new(
            TimestampMicrosecondArray::from_iter(versions.iter().map(|(_, to)| to.map(|t| t.1)))
                .with_timezone(UTC),
        ));
        cols.push(Arc::new(BooleanArray::from_iter(
            versions.iter().map(|(_, to)| Some(to.is_none())),
        )));
        cols.push(Arc::new(BooleanArray::from_iter(
            versions.iter().map(|(v, _)| Some(v.deleted)),
        )));
        Ok(RecordBatch::try_new(self.layout.history_schema(), cols)?)
    }
}

fn int64<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a Int64Array, FoldError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| FoldError::MissingColumn(name.into()))
}

fn timestamps<'a>(
    batch: &'a RecordBatch,
    name: &str,
) -> Result<&'a TimestampMicrosecondArray, FoldError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
        .ok_or_else(|| FoldError::MissingColumn(name.into()))
}

fn bools<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a BooleanArray, FoldError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_boolean_opt())
        .ok_or_else(|| FoldError::MissingColumn(name.into()))
}
