//! Property tests of the fold against a naive model of the source table: random change
//! sequences (inserts, updates with key changes and unchanged TOAST values, deletes,
//! re-inserts, truncates, an added column), split into any number of compaction runs and
//! shuffled within a run.

use std::collections::{BTreeMap, BTreeSet};

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Int64Type, SchemaRef, TimestampMicrosecondType};
use proptest::prelude::*;

use super::conform;
use super::fold::{self, Layout, DELETED, VALID_FROM_LSN, VALID_TO_LSN};
use crate::batch::rows::{ChangeBatchBuilder, ColumnSpec};
use crate::types::{ColumnValue, PgType, Value};

#[derive(Debug, Clone)]
enum Action {
    Insert {
        k: u8,
        a: Option<u8>,
        b: i64,
    },
    /// `a`: `None` = the TOAST column was not sent (unchanged).
    Update {
        pick: usize,
        new_k: Option<u8>,
        a: Option<Option<u8>>,
        b: i64,
    },
    Delete {
        pick: usize,
    },
    Truncate,
    AddColumn,
    Commit,
}

/// Inserts of `keys`, each with `a` = its key mod 5 and `b` = `b(key)`.
fn inserts(
    keys: impl IntoIterator<Item = u8>,
    b: impl Fn(u8) -> i64,
) -> impl Iterator<Item = Action> {
    keys.into_iter().map(move |k| Action::Insert {
        k,
        a: Some(k % 5),
        b: b(k),
    })
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0u8..24, proptest::option::of(0u8..5), any::<i64>()).prop_map(|(k, a, b)| Action::Insert { k, a, b }),
        5 => (any::<usize>(), proptest::option::weighted(0.2, 0u8..24), proptest::option::weighted(0.6, proptest::option::of(0u8..5)), any::<i64>())
            .prop_map(|(pick, new_k, a, b)| Action::Update { pick, new_k, a, b }),
        2 => any::<usize>().prop_map(|pick| Action::Delete { pick }),
        1 => Just(Action::Truncate),
        1 => Just(Action::AddColumn),
        3 => Just(Action::Commit),
    ]
}

type Row = (Option<String>, Option<i64>, Option<i64>);
type Table = BTreeMap<i64, Row>;

/// One change as the change log would hold it.
#[derive(Debug, Clone)]
struct Change {
    op: &'static str,
    row: Vec<ColumnValue>,
    old: Option<Vec<ColumnValue>>,
    lsn: i64,
    seq: i64,
    with_c: bool,
}

/// The changes the source would send for `actions`, and the table after each commit.
fn realize(actions: &[Action]) -> (Vec<Change>, Vec<(i64, Table)>) {
    let mut model = Table::new();
    let mut changes = Vec::new();
    let mut snapshots = Vec::new();
    let mut txn = 1i64;
    let mut seq = 0i64;
    let mut with_c = false;
    let text = |a: Option<u8>| a.map(|v| format!("text-{v}"));
    let val = |v: &Option<String>| {
        v.clone().map_or(ColumnValue::Value(Value::Null), |s| {
            ColumnValue::Value(Value::Text(s))
        })
    };
    let int = |v: Option<i64>| ColumnValue::Value(v.map_or(Value::Null, Value::Int8));
    let push = |changes: &mut Vec<Change>, op, row, old, with_c, seq: &mut i64, txn: i64| {
        changes.push(Change {
            op,
            row,
            old,
            lsn: txn * 100,
            seq: *seq,
            with_c,
        });
        *seq += 1;
    };
    for a in actions {
        let c_of = |b: i64, with_c: bool| with_c.then_some(b.wrapping_mul(3));
        match a {
            Action::Insert { k, a, b } => {
                let id = i64::from(*k);
                let r: Row = (text(*a), Some(*b), c_of(*b, with_c));
                let op = if model.contains_key(&id) { "U" } else { "I" };
                let mut row = vec![int(Some(id)), val(&r.0), int(r.1)];
                if with_c {
                    row.push(int(r.2));
                }
                model.insert(id, r);
                push(&mut changes, op, row, None, with_c, &mut seq, txn);
            }
            Action::Update { pick, new_k, a, b } => {
                if model.is_empty() {
                    continue;
                }
                let old_id = *model.keys().nth(pick % model.len()).unwrap_or(&0);
                let id = new_k.map_or(old_id, i64::from);
                if id != old_id && model.contains_key(&id) {
                    continue; // would violate the primary key
                }
                let prev = model.remove(&old_id).unwrap_or((None, None, None));
                let new_a = match a {
                    Some(v) => text(*v),
                    None => prev.0.clone(),
                };
                let r: Row = (new_a, Some(*b), c_of(*b, with_c));
                let a_col = match a {
                    Some(_) => val(&r.0),
                    None => ColumnValue::UnchangedToast,
                };
                let mut row = vec![int(Some(id)), a_col, int(r.1)];
                if with_c {
                    row.push(int(r.2));
                }
                let old = (id != old_id).then(|| {
                    let mut o = vec![int(Some(old_id)), int(None), int(None)];
                    if with_c {
                        o.push(int(None));
                    }
                    o
                });
                model.insert(id, r);
                push(&mut changes, "U", row, old, with_c, &mut seq, txn);
            }
            Action::Delete { pick } => {
                if model.is_empty() {
                    continue;
                }
                let id = *model.keys().nth(pick % model.len()).unwrap_or(&0);
                let old = model.remove(&id);
                // Half the deletes carry the whole old row (REPLICA IDENTITY FULL): the
                // tombstone keeps only the key all the same.
                let full = old.filter(|_| pick % 2 == 1).unwrap_or_default();
                let mut row = vec![int(Some(id)), val(&full.0), int(full.1)];
                if with_c {
                    row.push(int(full.2));
                }
                push(&mut changes, "D", row, None, with_c, &mut seq, txn);
            }
            Action::Truncate => {
                model.clear();
                push(&mut changes, "T", Vec::new(), None, with_c, &mut seq, txn);
            }
            Action::AddColumn => with_c = true,
            Action::Commit => {
                snapshots.push((txn * 100, model.clone()));
                txn += 1;
                seq = 0;
            }
        }
    }
    snapshots.push((txn * 100, model.clone()));
    (changes, snapshots)
}

fn specs(with_c: bool) -> Vec<ColumnSpec> {
    let mut s = vec![
        ColumnSpec {
            name: "id".into(),
            ty: PgType::Int8,
            is_key: true,
        },
        ColumnSpec {
            name: "a".into(),
            ty: PgType::Text,
            is_key: false,
        },
        ColumnSpec {
            name: "b".into(),
            ty: PgType::Int8,
            is_key: false,
        },
    ];
    if with_c {
        s.push(ColumnSpec {
            name: "c".into(),
            ty: PgType::Int8,
            is_key: false,
        });
    }
    s
}

/// The commit time of the transaction at `lsn` (microseconds): about 1,000 a transaction
/// apart, but stepping back now and then, as commit times do (concurrent commits, a load's rows
/// stamped by slotlake's clock).
fn commit_ts(lsn: i64) -> i64 {
    lsn * 10 - (lsn / 100 % 3) * 1500
}

/// A change-log batch of `changes` (with column `c` when any of them has it), rows reversed
/// when `reverse`: the fold must not depend on row order.
fn batch(changes: &[Change], reverse: bool) -> RecordBatch {
    let with_c = changes.iter().any(|c| c.with_c);
    let mut b = ChangeBatchBuilder::new(specs(with_c));
    let mut list: Vec<&Change> = changes.iter().collect();
    if reverse {
        list.reverse();
    }
    for c in list {
        if c.op == "T" {
            b.append_truncate(c.lsn, c.seq, 1, commit_ts(c.lsn));
            continue;
        }
        let mut row = c.row.clone();
        let mut old = c.old.clone();
        if with_c && !c.with_c {
            row.push(ColumnValue::Value(Value::Null));
            if let Some(o) = old.as_mut() {
                o.push(ColumnValue::Value(Value::Null));
            }
        }
        b.append(
            c.op,
            c.lsn,
            c.seq,
            1,
            commit_ts(c.lsn),
            &row,
            old.as_deref(),
        )
        .expect("valid change");
    }
    b.finish().expect("batch")
}

/// Every row of `batches` (conformed to `schema`), as text, sorted.
fn sorted_rows(batches: &[RecordBatch], schema: &SchemaRef) -> Vec<String> {
    let mut rows = Vec::new();
    for b in batches {
        use deltalake::arrow::util::display::{ArrayFormatter, FormatOptions};
        let b = conform(b, schema).expect("conform");
        let options = FormatOptions::default();
        let columns: Vec<ArrayFormatter> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("formatter"))
            .collect();
        for r in 0..b.num_rows() {
            let values: Vec<String> = columns.iter().map(|c| c.value(r).to_string()).collect();
            rows.push(values.join("|"));
        }
    }
    rows.sort();
    rows
}

/// Runs the fold over `changes` cut at `cuts`; returns the final open versions and every
/// version (open and closed) with its layout applied.
fn compact(changes: &[Change], cuts: &[usize], reverse: bool) -> (RecordBatch, Vec<RecordBatch>) {
    compact_in_groups(changes, cuts, reverse, usize::MAX, None)
}

/// [`compact`] with fold groups of about `group_keys` keys, tombstones retired after
/// `retire_after` microseconds.
fn compact_in_groups(
    changes: &[Change],
    cuts: &[usize],
    reverse: bool,
    group_keys: usize,
    retire_after: Option<i64>,
) -> (RecordBatch, Vec<RecordBatch>) {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (changes.len() + 1)).collect();
    bounds.push(0);
    bounds.push(changes.len());
    bounds.sort_unstable();
    bounds.dedup();
    // The open versions a window hands on: the `Any` fold's batches as they are (the next
    // window folds onto all of them, as a carried step does).
    let mut open: Vec<RecordBatch> = Vec::new();
    let mut closed = Vec::new();
    let mut layout = Layout::from_changelog(&batch(&[], false).schema());
    // The commit-time watermark, carried from window to window as the history table does.
    let mut clock = i64::MIN;
    for w in bounds.windows(2) {
        let part = &changes[w[0]..w[1]];
        let b = batch(part, reverse);
        if part.iter().any(|c| c.with_c) {
            layout = Layout::from_changelog(&b.schema());
        }
        let change_schema = super::change_schema(&layout, &b.schema());
        let b = conform(&b, &change_schema).expect("conform changes");
        let stamps = fold::stamps(&b).expect("stamps").collect();
        let watermarks = fold::Watermarks::new(clock, stamps);
        let retire = retire_after.map(|after| fold::Retire {
            after,
            clocks: &watermarks,
        });
        let history = layout.history_schema();
        let base: Vec<RecordBatch> = open
            .iter()
            .map(|o| conform(o, &history).expect("conform base"))
            .collect();
        closed = closed
            .into_iter()
            .map(|c: RecordBatch| conform(&c, &history).expect("conform closed"))
            .collect();
        // Both orders of open versions; a window before the last hands on the `Any` one (as
        // a step that carries does), the last the hash-ordered one (as a step that writes).
        let run = |rows: fold::OpenRows| {
            let mut chunks = Vec::new();
            let mut out = fold::fold_in_groups(
                &layout,
                &base,
                vec![b.clone()],
                &mut |c| {
                    chunks.push(c);
                    Ok(())
                },
                2,
                rows,
                retire,
                group_keys,
            )
            .expect("fold");
            for part in std::mem::take(&mut out.closed_parts) {
                chunks.push(part.build().expect("build closed versions"));
            }
            assert_eq!(
                chunks.iter().map(|c| c.num_rows()).sum::<usize>(),
                out.closed_rows
            );
            (out, chunks)
        };
        let (sorted, sorted_chunks) = run(fold::OpenRows::ByHash);
        let (any, any_chunks) = run(fold::OpenRows::Any);
        let hashes = sorted
            .open_hashes
            .clone()
            .expect("hashes of a hash-ordered fold");
        assert!(
            hashes.windows(2).all(|w| w[0] <= w[1]),
            "open rows sorted by hash"
        );
        assert!(any.open_hashes.is_none());
        let one = |open: &[RecordBatch]| {
            deltalake::arrow::compute::concat_batches(&layout.history_schema(), open)
                .expect("concat")
        };
        assert_eq!(sorted.open.len(), 1, "one batch in hash order");
        let (any_hashes, any_sorted) = fold::by_hash(&layout, &one(&any.open)).expect("by hash");
        assert_eq!(any_hashes, hashes, "same open keys in both orders");
        assert_eq!(
            any_sorted, sorted.open[0],
            "same open versions in both orders"
        );
        assert_eq!(
            sorted_rows(&any_chunks, &history),
            sorted_rows(&sorted_chunks, &history),
            "same closed versions in both orders"
        );
        let (out, chunks) = if w[1] == changes.len() {
            (sorted, sorted_chunks)
        } else {
            (any, any_chunks)
        };
        closed.extend(chunks);
        open = out.open;
        clock = watermarks.after();
    }
    let history = layout.history_schema();
    let open = deltalake::arrow::compute::concat_batches(&history, &open).expect("concat");
    let mut all: Vec<RecordBatch> = closed
        .into_iter()
        .map(|c| conform(&c, &history).expect("conform"))
        .collect();
    all.push(open.clone());
    (open, all)
}

fn col_i64(b: &RecordBatch, name: &str, i: usize) -> Option<i64> {
    let c = b.column_by_name(name)?;
    let c = c.as_primitive_opt::<Int64Type>()?;
    c.is_valid(i).then(|| c.value(i))
}

fn row_of(b: &RecordBatch, i: usize) -> (i64, Row) {
    let a = b.column_by_name("a").expect("a").as_string::<i32>();
    (
        col_i64(b, "id", i).expect("key"),
        (
            a.is_valid(i).then(|| a.value(i).to_string()),
            col_i64(b, "b", i),
            col_i64(b, "c", i),
        ),
    )
}

/// The table as the current rows of a batch of open versions.
fn scd1(open: &RecordBatch, layout_hint: &RecordBatch) -> Table {
    let _ = layout_hint;
    let deleted = open
        .column_by_name(DELETED)
        .expect("_deleted")
        .as_boolean()
        .clone();
    let mut t = Table::new();
    for i in 0..open.num_rows() {
        if !deleted.value(i) {
            let (k, r) = row_of(open, i);
            assert!(t.insert(k, r).is_none(), "one open version per key");
        }
    }
    t
}

/// The table as of `lsn` from all history versions.
fn as_of(all: &[RecordBatch], lsn: i64) -> Table {
    let mut t = Table::new();
    for b in all {
        let deleted = b.column_by_name(DELETED).expect("_deleted").as_boolean();
        for i in 0..b.num_rows() {
            let from = col_i64(b, VALID_FROM_LSN, i).expect("from");
            let to = col_i64(b, VALID_TO_LSN, i);
            if from <= lsn && to.is_none_or(|t| t > lsn) && !deleted.value(i) {
                let (k, r) = row_of(b, i);
                assert!(
                    t.insert(k, r).is_none(),
                    "two versions of one key valid at {lsn}"
                );
            }
        }
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fold_matches_the_model_in_any_number_of_runs(
        actions in proptest::collection::vec(action(), 0..80),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
        reverse in any::<bool>(),
        group_keys in prop_oneof![Just(1usize), Just(3), Just(usize::MAX)],
        // Commit times are about 1,000 µs a transaction apart ([`commit_ts`]).
        retire in prop_oneof![Just(None), (0i64..4000).prop_map(Some)],
    ) {
        let (changes, snapshots) = realize(&actions);
        let (open, all) = compact_in_groups(&changes, &cuts, reverse, group_keys, retire);
        // The same open versions, in the same order, however the keys were grouped.
        let (one_group, one_group_all) =
            compact_in_groups(&changes, &cuts, reverse, usize::MAX, retire);
        prop_assert_eq!(&open, &one_group);
        let history = open.schema();
        prop_assert_eq!(sorted_rows(&all, &history), sorted_rows(&one_group_all, &history));
        let final_model = &snapshots.last().expect("final snapshot").1;
        prop_assert_eq!(&scd1(&open, &open), final_model);
        for (lsn, model) in &snapshots {
            prop_assert_eq!(&as_of(&all, *lsn), model, "history as of {}", lsn);
        }
        for b in &all {
            let deleted = b.column_by_name(DELETED).expect("_deleted").as_boolean();
            for i in (0..b.num_rows()).filter(|&i| deleted.value(i)) {
                let (_, values) = row_of(b, i);
                prop_assert_eq!(values, (None, None, None), "a tombstone has only its key");
            }
        }
        // One run gives the same tables: every history row the same, whenever tombstones
        // retired.
        let (one_open, one_all) = compact_in_groups(&changes, &[], false, usize::MAX, retire);
        prop_assert_eq!(scd1(&one_open, &one_open), scd1(&open, &open));
        prop_assert_eq!(sorted_rows(&one_all, &history), sorted_rows(&all, &history));
        // A version is current exactly while open; closed ones end at a change's LSN.
        let last_lsn = changes.last().map_or(0, |c| c.lsn);
        for b in &all {
            let current = b.column_by_name(fold::IS_CURRENT).expect("_is_current").as_boolean();
            for i in 0..b.num_rows() {
                let to = col_i64(b, VALID_TO_LSN, i);
                prop_assert_eq!(current.value(i), to.is_none(), "_is_current of row {}", i);
                prop_assert!(to.is_none_or(|to| to <= last_lsn), "ends at {:?}", to);
            }
        }
        // What retiring does: no open version is a tombstone older than the retention (by
        // the last commit's time); a version is open in the history (`_valid_to` null) that
        // a key's comeback closes only within the retention.
        // (The watermark: the latest commit time.)
        let last_ts = changes.iter().map(|c| commit_ts(c.lsn)).max().unwrap_or(0);
        if let Some(after) = retire {
            let deleted = open.column_by_name(DELETED).expect("_deleted").as_boolean();
            let from = open
                .column_by_name(fold::VALID_FROM)
                .expect("_valid_from")
                .as_primitive::<deltalake::arrow::datatypes::TimestampMicrosecondType>();
            for i in (0..open.num_rows()).filter(|&i| deleted.value(i)) {
                prop_assert!(last_ts - from.value(i) <= after, "an old tombstone stayed open");
            }
        }
    }
}

#[test]
fn timestamps_follow_the_commit() {
    let actions = [
        Action::Insert {
            k: 1,
            a: Some(1),
            b: 5,
        },
        Action::Commit,
        Action::Update {
            pick: 0,
            new_k: None,
            a: None,
            b: 6,
        },
    ];
    let (changes, _) = realize(&actions);
    let (open, all) = compact(&changes, &[], false);
    let from = open
        .column_by_name(fold::VALID_FROM)
        .expect("_valid_from")
        .as_primitive::<TimestampMicrosecondType>()
        .value(0);
    assert_eq!(from, commit_ts(200), "the update's commit time");
    let closed = &all[0];
    assert_eq!(col_i64(closed, VALID_TO_LSN, 0), Some(200));
    // The TOAST column kept its value.
    assert_eq!(row_of(&open, 0).1 .0.as_deref(), Some("text-1"));
}

#[test]
fn key_hash_is_pinned() {
    // Buckets on storage depend on these values: a change means existing tables would be
    // re-bucketed wrongly. The Arrow row encoding of an Int64 key and a Utf8 key:
    let layout = Layout::from_changelog(&batch(&[], false).schema());
    let b = batch(
        &[Change {
            op: "I",
            row: vec![
                ColumnValue::Value(Value::Int8(42)),
                ColumnValue::Value(Value::Null),
                ColumnValue::Value(Value::Null),
            ],
            old: None,
            lsn: 1,
            seq: 0,
            with_c: false,
        }],
        false,
    );
    let rows = layout.key_rows(&b, fold::KeyNames::Row).expect("rows");
    assert_eq!(
        fold::key_hash(rows.row(0).as_ref()),
        2_035_672_712_108_122_778
    );
}

/// The `txn` actions of change-log commits as deltalake serializes them: a load's chunk
/// (progress only) waits, its last chunk and the stream's commits mark transactions, a
/// maintenance commit marks nothing.
#[test]
fn commit_marks_tell_load_chunks_from_transactions() {
    use super::{commit_marks, Marks};
    use deltalake::kernel::transaction::CommitData;
    use deltalake::kernel::{Action, Transaction};
    use deltalake::protocol::{DeltaOperation, SaveMode};
    let commit = |txns: Vec<Transaction>| {
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        CommitData::new(Vec::<Action>::new(), operation, Default::default(), txns)
            .get_bytes()
            .unwrap()
    };
    let chunk = Transaction::new("slotlake-s1-load-0/1A2B3C", 3);
    let stream = Transaction::new("slotlake-s1", 1234);
    assert_eq!(commit_marks(&commit(vec![chunk.clone()])), Marks::LoadChunk);
    assert_eq!(
        commit_marks(&commit(vec![chunk, stream.clone()])),
        Marks::Transactions
    );
    assert_eq!(commit_marks(&commit(vec![stream])), Marks::Transactions);
    assert_eq!(commit_marks(&commit(Vec::new())), Marks::None);
}

/// A resumed initial load (see `snapshot`) reads a row at its key as of the restart, K3, and
/// the stream then replays its earlier key changes K1 → K2 → K3, which left its TOAST column
/// out: K1 was never in the lake, so K2 cannot know the value, and K3 keeps the loaded one —
/// in one compaction run or split between runs (where K2's unknown value is stored as null).
#[test]
fn a_key_changed_twice_before_a_resumed_load_keeps_the_loaded_toast_value() {
    let int = |v: i64| ColumnValue::Value(Value::Int8(v));
    let null = || ColumnValue::Value(Value::Null);
    let change = |op, row, old: Option<i64>, lsn| Change {
        op,
        row,
        old: old.map(|k| vec![int(k), null(), null()]),
        lsn,
        seq: 0,
        with_c: false,
    };
    let changes = [
        change(
            "R",
            vec![
                int(3),
                ColumnValue::Value(Value::Text("loaded".into())),
                int(7),
            ],
            None,
            99,
        ),
        change(
            "U",
            vec![int(2), ColumnValue::UnchangedToast, int(8)],
            Some(1),
            200,
        ),
        change(
            "U",
            vec![int(3), ColumnValue::UnchangedToast, int(9)],
            Some(2),
            300,
        ),
    ];
    for cuts in [vec![], vec![1], vec![2], vec![1, 2]] {
        let (open, _) = compact(&changes, &cuts, false);
        let expected = Table::from([(3, (Some("loaded".to_string()), Some(9), None))]);
        assert_eq!(scd1(&open, &open), expected, "runs cut at {cuts:?}");
    }
}

/// A resumed load writes the rows it reads from its newer snapshot a second time, after the
/// changes the stream replays (see `snapshot`): a copy equal to its key's live version adds
/// no version, a different one (a replayed update that could not know a TOAST value) ends
/// that version with the row as read — in one compaction run or split between runs.
#[test]
fn a_row_read_again_adds_a_version_only_when_it_differs() {
    let int = |v: i64| ColumnValue::Value(Value::Int8(v));
    let text = |v: &str| ColumnValue::Value(Value::Text(v.into()));
    let change = |op, row, lsn| Change {
        op,
        row,
        old: None,
        lsn,
        seq: 0,
        with_c: false,
    };
    let changes = [
        change("R", vec![int(1), text("same"), int(7)], 99),
        change("R", vec![int(2), text("kept"), int(1)], 99),
        change("U", vec![int(2), ColumnValue::UnchangedToast, int(2)], 200),
        change("R", vec![int(3), text("gone"), int(5)], 99),
        change("D", vec![int(3), text("gone"), int(5)], 250),
        change("R", vec![int(1), text("same"), int(7)], 300),
        change("R", vec![int(2), text("fixed"), int(2)], 300),
        change("R", vec![int(3), text("back"), int(6)], 300),
    ];
    for cuts in [vec![], vec![3], vec![5], vec![6, 7]] {
        let (open, all) = compact(&changes, &cuts, false);
        let expected = Table::from([
            (1, (Some("same".to_string()), Some(7), None)),
            (2, (Some("fixed".to_string()), Some(2), None)),
            (3, (Some("back".to_string()), Some(6), None)),
        ]);
        assert_eq!(scd1(&open, &open), expected, "runs cut at {cuts:?}");
        let versions = |key: i64| {
            (0..all.len())
                .flat_map(|b| (0..all[b].num_rows()).map(move |i| (b, i)))
                .filter(|&(b, i)| col_i64(&all[b], "id", i) == Some(key))
                .map(|(b, i)| {
                    let from = col_i64(&all[b], VALID_FROM_LSN, i).unwrap_or(-1);
                    let to = col_i64(&all[b], VALID_TO_LSN, i);
                    (from, to)
                })
                .collect::<BTreeSet<_>>()
        };
        // Key 1: one version, from the first read on. Key 2: loaded, updated (its TOAST value
        // carried), then the differing copy. Key 3: loaded, deleted (a tombstone), read again.
        assert_eq!(versions(1), BTreeSet::from([(99, None)]), "cut at {cuts:?}");
        assert_eq!(
            versions(2),
            BTreeSet::from([(99, Some(200)), (200, Some(300)), (300, None)]),
            "cut at {cuts:?}"
        );
        assert_eq!(
            versions(3),
            BTreeSet::from([(99, Some(250)), (250, Some(300)), (300, None)]),
            "cut at {cuts:?}"
        );
    }
}

/// A change-log file gone before it was compacted (a lost object, a file deleted by hand) fails
/// the table's compaction with a read error naming the table, and nothing is committed: the
/// read-ahead must not swallow the error of a file read in the background.
#[tokio::test]
async fn a_missing_change_log_file_fails_compaction_and_commits_nothing() {
    use crate::lsn::Lsn;

    let dir = tempfile::tempdir().unwrap();
    let name = table_t();
    let schema = ChangeBatchBuilder::new(specs(false)).schema();
    let (sink, mut log) = file_lake(dir.path(), &schema).await;
    // Three commits, one file each.
    for txn in 1..=3i64 {
        let mut b = ChangeBatchBuilder::new(specs(false));
        for id in 0..10 {
            let row = [
                ColumnValue::Value(Value::Int8(id)),
                ColumnValue::Value(Value::Text(format!("v{txn}"))),
                ColumnValue::Value(Value::Int8(txn)),
            ];
            let op = if txn == 1 { "I" } else { "U" };
            b.append(op, txn * 100, id, 1, txn * 1000, &row, None)
                .unwrap();
        }
        log.write(b.finish().unwrap()).await.unwrap();
        log.commit(Lsn(txn as u64 * 100)).await.unwrap();
    }
    let changes = dir.path().join("changes/public/t");
    let mut files: Vec<_> = std::fs::read_dir(&changes)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3);
    std::fs::remove_file(&files[1]).unwrap();

    let options = test_options(128 << 20, false);
    let err = super::compact_table(&sink, &name, &options)
        .await
        .expect_err("a change-log file is missing");
    assert!(
        matches!(&err, super::CompactError::Failed { table, action, .. } if table == "public.t" && *action == "read Parquet"),
        "{err}"
    );
    for target in ["current", "history"] {
        let log = dir.path().join(target).join("public/t/_delta_log");
        let commits = std::fs::read_dir(&log).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
            .count()
        });
        assert!(
            commits <= 1,
            "{target}: {commits} commits (creation at most)"
        );
    }
}

/// Every row of a current or history table as compaction left it (deletion vectors applied).
async fn read_target(sink: &crate::lake::store::Sink, kind: &str) -> Vec<RecordBatch> {
    read_target_of(sink, kind, "t").await
}

/// The rows of the `kind` table of `public.<table>`.
async fn read_target_of(
    sink: &crate::lake::store::Sink,
    kind: &str,
    table: &str,
) -> Vec<RecordBatch> {
    read_files_of(sink, kind, table, |_| true).await
}

/// How many rows the current table of `public.<table>` has.
async fn current_rows_of(sink: &crate::lake::store::Sink, table: &str) -> usize {
    let batches = read_target_of(sink, "current", table).await;
    batches.iter().map(|b| b.num_rows()).sum()
}

/// The rows of the files of the `kind` table of `public.<table>` whose paths `keep` keeps.
async fn read_files_of(
    sink: &crate::lake::store::Sink,
    kind: &str,
    table: &str,
    keep: impl Fn(&str) -> bool,
) -> Vec<RecordBatch> {
    use deltalake::kernel::engine::arrow_conversion::TryIntoArrow;
    let path = sink.table_path(&[kind, "public", table]);
    let (log_store, store, _) = sink.table_store(&path);
    let mut table = deltalake::DeltaTable::new(log_store);
    table.load().await.expect("load");
    let snapshot = table.snapshot().expect("snapshot");
    let schema: deltalake::arrow::datatypes::Schema =
        snapshot.schema().as_ref().try_into_arrow().expect("schema");
    let schema = std::sync::Arc::new(schema);
    let mut out = Vec::new();
    for f in snapshot.log_data().iter().filter(|f| keep(&f.path())) {
        let dv = f.deletion_vector_descriptor();
        out.extend(
            super::read_table_file(store.as_ref(), &f.path(), dv.as_ref(), &schema)
                .await
                .expect("read"),
        );
    }
    out
}

/// The table these tests compact, `public.t`.
fn table_t() -> crate::replication::sql::TableName {
    crate::replication::sql::TableName {
        schema: "public".into(),
        name: "t".into(),
    }
}

/// The latest commit file in the Delta log of the table at `table`.
fn latest_commit(table: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(table.join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .max()
        .expect("a commit")
}

/// A file:// sink in `dir` and the change log of `public.t` (app id of slot `s`) in it.
async fn file_lake(
    dir: &std::path::Path,
    schema: &deltalake::arrow::datatypes::SchemaRef,
) -> (
    crate::lake::store::Sink,
    crate::lake::changelog::ChangeLogTable,
) {
    use crate::lake::changelog::{app_id, ChangeLogTable};
    use crate::lake::store::{S3Options, Sink};
    let url = format!("file://{}", dir.display());
    let sink = Sink::open(&url, &S3Options::default()).unwrap();
    let log = ChangeLogTable::open(&sink, &table_t(), &app_id("s"), schema, 64 << 20)
        .await
        .unwrap();
    (sink, log)
}

/// Compaction settings for these tests: buckets of `bucket_bytes`, no vacuum or change-log
/// maintenance, two fold threads.
fn test_options(bucket_bytes: u64, deletion_vectors: bool) -> super::CompactOptions {
    super::CompactOptions {
        memory_budget: 64 << 20,
        bucket_bytes,
        vacuum_retention: None,
        optimize_file_size: 0,
        changes_retention: None,
        fold_threads: 2,
        deletion_vectors,
        orphan_sweep_versions: 1,
        tables_at_once: 4,
        tombstone_retention: None,
    }
}

/// `changes`' source transactions, in commit order (a transaction's changes share `lsn`).
fn transactions(changes: &[Change]) -> Vec<&[Change]> {
    changes.chunk_by(|a, b| a.lsn == b.lsn).collect()
}

/// Checks the compacted `public.t` of `sink` against the model: the current table holds each
/// key once and is the final snapshot, and the history table as of each snapshot's LSN is
/// that snapshot.
async fn assert_model(sink: &crate::lake::store::Sink, snapshots: &[(i64, Table)], what: &str) {
    let mut table = Table::new();
    for b in &read_target(sink, "current").await {
        for i in 0..b.num_rows() {
            let (k, r) = row_of(b, i);
            assert!(table.insert(k, r).is_none(), "{what}: key {k} twice");
        }
    }
    let final_model = &snapshots.last().expect("final snapshot").1;
    assert_eq!(&table, final_model, "{what}: current table");
    let history = read_target(sink, "history").await;
    for (lsn, model) in snapshots {
        assert_eq!(&as_of(&history, *lsn), model, "{what}: history as of {lsn}");
    }
}

/// Random change sequences on a 200-key table, compacted into small buckets with deletion
/// vectors after every few commits (in half the cases, tables created without them and
/// switched on by the next run), with now and then a crash between the history and the
/// current commit (the current commit's log entry removed): the current table is the model
/// and the history table gives the model as of every commit. Buckets get patched, and
/// rewritten once they have too many files or marked rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_with_deletion_vectors_matches_the_model() {
    use crate::lsn::Lsn;
    use proptest::strategy::ValueTree;

    let name = table_t();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut patched, mut rewritten, mut repaired) = (0u64, 0u64, 0u64);
    let mut patched_after_switch = 0u64;
    for case in 0..12 {
        let mut actions: Vec<Action> = inserts(0..200u8, i64::from).collect();
        actions.push(Action::Commit);
        let random = proptest::collection::vec(action(), 100..300)
            .new_tree(&mut runner)
            .expect("actions")
            .current();
        // The change log's schema stays fixed here; schema changes are the fold tests' job.
        actions.extend(
            random
                .into_iter()
                .filter(|a| !matches!(a, Action::AddColumn))
                .filter(|a| case % 3 == 0 || !matches!(a, Action::Truncate)),
        );
        let (changes, snapshots) = realize(&actions);

        let dir = tempfile::tempdir().unwrap();
        let (sink, mut log) = file_lake(dir.path(), &batch(&[], false).schema()).await;
        let txns = transactions(&changes);
        for (i, txn) in txns.iter().enumerate() {
            log.write(batch(txn, false)).await.unwrap();
            log.commit(Lsn(txn[0].lsn as u64)).await.unwrap();
            let (commits, last) = (i + 1, i + 1 == txns.len());
            if commits % 2 == 0 || last {
                // Odd cases create the tables without deletion vectors; the next run turns
                // them on.
                let options = test_options(4 << 10, case % 2 == 0 || commits > 2);
                let r = super::compact_table(&sink, &name, &options)
                    .await
                    .expect("compact");
                patched += r.buckets_patched;
                rewritten += r.buckets_rewritten;
                if case % 2 == 1 {
                    patched_after_switch += r.buckets_patched;
                }
                // Now and then the run "crashes" before its current commit: the next run
                // repairs the current table from the history table.
                // (In odd cases, also the run that switches deletion vectors on.)
                let crash = commits % 6 == 0 || (case % 2 == 1 && commits == 4);
                if r.steps > 0 && crash && !last {
                    let last = latest_commit(&dir.path().join("current/public/t"));
                    std::fs::remove_file(last).unwrap();
                    repaired += 1;
                }
            }
        }
        // Both tables have the feature in their protocol (reader and writer), not only the
        // property.
        for kind in ["current", "history"] {
            let path = sink.table_path(&[kind, "public", "t"]);
            let mut t = deltalake::DeltaTable::new(sink.table_store(&path).0);
            t.load().await.expect("load");
            let snapshot = t.snapshot().expect("snapshot");
            assert!(
                crate::lake::changelog::has_feature(snapshot.protocol(), "deletionVectors"),
                "case {case}: {kind}: {:?}",
                snapshot.protocol()
            );
        }
        assert_model(&sink, &snapshots, &format!("case {case}")).await;
    }
    assert!(patched > 50, "{patched} buckets patched");
    assert!(
        patched_after_switch > 20,
        "{patched_after_switch} buckets patched in tables switched to deletion vectors"
    );
    assert!(rewritten > 10, "{rewritten} buckets rewritten");
    assert!(repaired > 5, "{repaired} repairs");
}

/// `timestamp` columns (Delta `timestamp_ntz`, which needs the `timestampNtz` table feature),
/// from the start or only added later: the change log and both targets stay loadable and
/// vacuum works, with and without deletion vectors.
#[tokio::test]
async fn timestamp_columns_keep_every_table_loadable() {
    use crate::lsn::Lsn;
    use crate::types::Infinite;

    let name = table_t();
    let spec = |name: &str, ty: PgType, is_key: bool| ColumnSpec {
        name: name.into(),
        ty,
        is_key,
    };
    for (dv, from_start) in [(false, true), (true, true), (false, false), (true, false)] {
        let dir = tempfile::tempdir().unwrap();
        let options = super::CompactOptions {
            vacuum_retention: Some(std::time::Duration::ZERO),
            ..test_options(128 << 20, dv)
        };
        let mut specs = vec![spec("id", PgType::Int8, true)];
        if from_start {
            specs.push(spec("at", PgType::Timestamp, false));
        }
        let schema = ChangeBatchBuilder::new(specs.clone()).schema();
        let (sink, mut log) = file_lake(dir.path(), &schema).await;
        for txn in 1..=4i64 {
            if txn == 3 {
                specs.push(spec("later", PgType::Timestamp, false));
            }
            let mut b = ChangeBatchBuilder::new(specs.clone());
            for id in 0..20 {
                let mut row = vec![ColumnValue::Value(Value::Int8(id))];
                for _ in 1..specs.len() {
                    let at = Infinite::Finite(txn * 1_000_000 + id);
                    row.push(ColumnValue::Value(Value::Timestamp(at)));
                }
                let op = if txn == 1 { "I" } else { "U" };
                b.append(op, txn * 100, id, 1, txn * 1000, &row, None)
                    .unwrap();
            }
            log.write(b.finish().unwrap()).await.unwrap();
            log.commit(Lsn(txn as u64 * 100)).await.unwrap();
            let r = super::compact_table(&sink, &name, &options)
                .await
                .unwrap_or_else(|e| panic!("dv {dv} {from_start}, commit {txn}: {e}"));
            assert_eq!(r.changes, 20, "dv {dv} {from_start}, commit {txn}");
        }
        for kind in ["current", "history"] {
            let rows: usize = read_target(&sink, kind)
                .await
                .iter()
                .map(|b| b.num_rows())
                .sum();
            let want = if kind == "current" { 20 } else { 80 };
            assert_eq!(rows, want, "dv {dv} {from_start}: {kind}");
        }
        let changes = sink.table_path(&["changes", "public", "t"]);
        let mut table = deltalake::DeltaTable::new(sink.table_store(&changes).0);
        table.load().await.expect("the change log loads");
    }
}

/// Past a checkpoint (every 50 commits) a table with deletion vectors still reads right: the
/// vectors survive in the checkpoint, and the next compaction, which loads the table from it,
/// patches on top of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_vectors_survive_checkpoints() {
    use crate::lsn::Lsn;

    let name = table_t();
    let options = test_options(128 << 20, true);
    let dir = tempfile::tempdir().unwrap();
    let (sink, mut log) = file_lake(dir.path(), &batch(&[], false).schema()).await;
    // 256 keys, then 60 transactions of 3 updates each (2 of them TOAST-unchanged), each
    // compacted on its own: 61 commits in each target.
    let mut actions: Vec<Action> = inserts(0..=255u8, |_| 0).collect();
    for t in 0..60usize {
        actions.push(Action::Commit);
        for j in 0..3usize {
            actions.push(Action::Update {
                pick: t * 37 + j * 101,
                new_k: None,
                a: (j == 0).then_some(Some((t % 5) as u8)),
                b: (t * 10 + j) as i64,
            });
        }
    }
    let (changes, snapshots) = realize(&actions);
    let mut patched = 0;
    for txn in transactions(&changes) {
        log.write(batch(txn, false)).await.unwrap();
        log.commit(Lsn(txn[0].lsn as u64)).await.unwrap();
        patched += super::compact_table(&sink, &name, &options)
            .await
            .expect("compact")
            .buckets_patched;
    }
    assert!(patched > 40, "{patched} patches");
    for kind in ["current", "history"] {
        let checkpoint = dir
            .path()
            .join(kind)
            .join("public/t/_delta_log/00000000000000000050.checkpoint.parquet");
        assert!(checkpoint.exists(), "{kind}: a checkpoint at version 50");
    }
    assert_model(&sink, &snapshots, "past a checkpoint").await;
}

/// A run over many change-log commits, each a step of its own (a small memory budget), carries
/// the open versions from step to step and commits only every [`super::MAX_CARRIED_STEPS`]
/// steps and at its end (24 keys: the open versions stay small); with a budget too small for
/// them, (nearly) every step commits. Either way the tables are the model's, as of every commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_carry_their_open_versions_to_the_next() {
    use crate::lsn::Lsn;
    use proptest::strategy::ValueTree;

    let mut runner = proptest::test_runner::TestRunner::deterministic();
    // Every key first (the open versions are never empty), then random changes.
    let mut actions: Vec<Action> = inserts(0..24u8, i64::from)
        .chain([Action::Commit])
        .collect();
    actions.extend(
        proptest::collection::vec(action(), 500..600)
            .new_tree(&mut runner)
            .expect("actions")
            .current()
            .into_iter()
            .filter(|a| !matches!(a, Action::AddColumn)),
    );
    let (changes, snapshots) = realize(&actions);
    let txns = transactions(&changes);
    assert!(txns.len() > 20, "{} transactions", txns.len());
    for (budget, carried) in [(64 << 10, true), (256, false)] {
        let dir = tempfile::tempdir().unwrap();
        let (sink, mut log) = file_lake(dir.path(), &batch(&[], false).schema()).await;
        for txn in &txns {
            log.write(batch(txn, false)).await.unwrap();
            log.commit(Lsn(txn[0].lsn as u64)).await.unwrap();
        }
        let options = super::CompactOptions {
            memory_budget: budget,
            ..test_options(1 << 10, false)
        };
        let r = super::compact_table(&sink, &table_t(), &options)
            .await
            .expect("compact");
        assert!(
            r.steps > super::MAX_CARRIED_STEPS as u64,
            "{} steps",
            r.steps
        );
        if carried {
            let commits = r.steps.div_ceil(super::MAX_CARRIED_STEPS as u64);
            assert_eq!(r.commits, commits, "budget {budget}: {} steps", r.steps);
        } else {
            // (A step whose output is empty buckets only still fits.)
            assert!(
                r.commits * 10 >= r.steps * 9,
                "budget {budget}: {} commits of {} steps",
                r.commits,
                r.steps
            );
        }
        assert!(r.buckets_total > 1, "{} buckets", r.buckets_total);
        assert_model(&sink, &snapshots, &format!("budget {budget}")).await;
    }
}

/// A bucket whose file pair left the tables (removed by hand) leaves a gap in the hash ranges.
/// The next run fails (its first step checks that the ranges tile the hash space, and every
/// write checks its rows against their ranges) instead of carrying rows of that range under
/// a neighbour's or dropping them (here the last step, which writes, touches no key of the
/// gap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_buckets_fails_a_carried_step() {
    use crate::lsn::Lsn;

    // Every key inserted, then updated once a round; the last round only `last` keys.
    let rounds = |last: &[u8]| {
        let mut actions: Vec<Action> = Vec::new();
        for round in 0..5i64 {
            let keys: Vec<u8> = if round == 4 {
                last.to_vec()
            } else {
                (0..200).collect()
            };
            actions.extend(inserts(keys, |_| round));
            actions.push(Action::Commit);
        }
        realize(&actions).0
    };
    let first: Vec<Change> = transactions(&rounds(&[]))[0].to_vec();
    let dir = tempfile::tempdir().unwrap();
    let (sink, mut log) = file_lake(dir.path(), &batch(&[], false).schema()).await;
    log.write(batch(&first, false)).await.unwrap();
    log.commit(Lsn(first[0].lsn as u64)).await.unwrap();
    let r = super::compact_table(&sink, &table_t(), &test_options(2 << 10, false))
        .await
        .expect("compact");
    assert!(r.buckets_total > 2, "{} buckets", r.buckets_total);

    // One bucket's pair leaves both tables.
    let (mut id, mut range) = (String::new(), (0, 0));
    for kind in ["history", "current"] {
        let path = sink.table_path(&[kind, "public", "t"]);
        let mut table = deltalake::DeltaTable::new(sink.table_store(&path).0);
        table.load().await.expect("load");
        let snapshot = table.snapshot().expect("snapshot");
        let files: Vec<String> = snapshot
            .log_data()
            .iter()
            .map(|f| f.path().to_string())
            .collect();
        if kind == "history" {
            let open = files
                .iter()
                .find(|f| f.starts_with("open-"))
                .expect("an open file");
            let (_, lo, hi, file_id) = super::parse_open(open).expect("an open file's name");
            (id, range) = (file_id, (lo, hi));
        }
        let file = files.iter().find(|f| f.contains(&id)).expect("the pair");
        let version = snapshot.version() + 1;
        let commit = dir
            .path()
            .join(format!("{kind}/public/t/_delta_log/{version:020}.json"));
        let remove = serde_json::json!({"remove": {"path": file, "deletionTimestamp": 0, "dataChange": true}});
        std::fs::write(commit, format!("{remove}\n")).unwrap();
    }
    // The keys outside the gap.
    let layout = Layout::from_changelog(&batch(&[], false).schema());
    let keys = layout
        .key_rows(&batch(&first, false), fold::KeyNames::Row)
        .expect("keys");
    let outside: Vec<u8> = (0..200u8)
        .filter(|&k| {
            let h = fold::key_hash(keys.row(usize::from(k)).as_ref());
            h < range.0 || h > range.1
        })
        .collect();
    assert!(
        outside.len() < 200,
        "some keys hash into the removed bucket"
    );

    for txn in &transactions(&rounds(&outside))[1..] {
        log.write(batch(txn, false)).await.unwrap();
        log.commit(Lsn(txn[0].lsn as u64)).await.unwrap();
    }
    // A step per commit, and room to carry every bucket.
    let options = super::CompactOptions {
        memory_budget: 64 << 10,
        ..test_options(2 << 10, false)
    };
    let err = super::compact_table(&sink, &table_t(), &options)
        .await
        .expect_err("a gap in the buckets fails the step");
    assert!(
        crate::pipeline::error_chain(&err).contains("do not cover every row"),
        "{}",
        crate::pipeline::error_chain(&err)
    );
}

/// Files that no log entry names (what a crash between writing and committing leaves) are
/// deleted from the history and current tables by a run that commits (past a multiple of the
/// sweep interval), once older than the retention: not by a run that commits nothing or
/// between intervals, not while younger, not with a retention under
/// [`super::ORPHAN_MIN_AGE`] or over [`super::TOMBSTONE_RETENTION`], and never from the change
/// log (whose directory holds the staged files of open transactions). Every file the tables
/// name — live, or removed within the retention — stays, though all are backdated past it;
/// and the tables, patched with deletion vectors, stay the model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committing_run_sweeps_old_orphans_from_the_compacted_tables() {
    use crate::lsn::Lsn;
    use std::time::{Duration, SystemTime};

    async fn compact_next(
        sink: &crate::lake::store::Sink,
        log: &mut crate::lake::changelog::ChangeLogTable,
        txn: &[Change],
        options: &super::CompactOptions,
    ) -> super::TableReport {
        log.write(batch(txn, false)).await.unwrap();
        log.commit(Lsn(txn[0].lsn as u64)).await.unwrap();
        super::compact_table(sink, &table_t(), options)
            .await
            .expect("compact")
    }
    let with_retention = |retention: Duration| super::CompactOptions {
        vacuum_retention: Some(retention),
        ..test_options(128 << 20, true)
    };
    let options = with_retention(super::ORPHAN_MIN_AGE);
    let dir = tempfile::tempdir().unwrap();
    let (sink, mut log) = file_lake(dir.path(), &batch(&[], false).schema()).await;
    let mut actions: Vec<Action> = inserts(0..64u8, |_| 0).collect();
    for t in 0..5usize {
        actions.push(Action::Commit);
        for j in 0..if t == 0 { 48 } else { 1 } {
            actions.push(Action::Update {
                pick: t * 37 + j,
                new_k: None,
                a: Some(Some((t % 5) as u8)),
                b: t as i64,
            });
        }
    }
    let (changes, snapshots) = realize(&actions);
    let txns = transactions(&changes);
    assert!(txns.len() >= 5, "{} transactions", txns.len());
    compact_next(&sink, &mut log, txns[0], &options).await;
    let table_dir = |kind: &str| dir.path().join(kind).join("public/t");
    let files = |kind: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(table_dir(kind))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect()
    };
    let backdate = |path: &std::path::Path, age: Duration| {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    };
    let plant = |kind: &str, name: &str, age: Duration| {
        let path = table_dir(kind).join(name);
        std::fs::copy(&files(kind)[0], &path).unwrap();
        backdate(&path, age);
        path
    };
    let old = super::ORPHAN_MIN_AGE * 2;
    // The tables' own files, all older than the retention from here on.
    let named: Vec<_> = ["history", "current"]
        .iter()
        .flat_map(|k| files(k))
        .collect();
    assert!(named.len() >= 2, "{named:?}");
    for path in &named {
        backdate(path, old);
    }
    let old_orphans: Vec<_> = ["history", "current"]
        .iter()
        .map(|kind| plant(kind, "closed-orphan.parquet", old))
        .collect();
    let young_orphans: Vec<_> = ["history", "current"]
        .iter()
        .map(|kind| plant(kind, "young-orphan.parquet", super::ORPHAN_MIN_AGE / 2))
        .collect();
    let changes_orphan = plant("changes", "staged-orphan.parquet", old);

    // Nothing new to compact: nothing committed, nothing swept.
    let idle = super::compact_table(&sink, &table_t(), &options)
        .await
        .expect("compact");
    assert_eq!(idle.commits, 0);
    assert!(old_orphans.iter().all(|p| p.exists()), "an idle run swept");
    // A retention under the floor: no sweep. The transaction updates too many keys for a
    // patch, so the bucket is rewritten: its old files (backdated) are now named only by
    // `remove` actions within the retention.
    let under = with_retention(super::ORPHAN_MIN_AGE - Duration::from_secs(1));
    let r = compact_next(&sink, &mut log, txns[1], &under).await;
    assert!(r.commits > 0 && r.buckets_rewritten > 0, "{r:?}");
    assert!(
        old_orphans.iter().all(|p| p.exists()),
        "swept under the floor"
    );

    // A commit that does not take the history table past a multiple of the sweep interval:
    // no sweep.
    let rarely = super::CompactOptions {
        orphan_sweep_versions: 1000,
        ..with_retention(super::ORPHAN_MIN_AGE)
    };
    let r = compact_next(&sink, &mut log, txns[2], &rarely).await;
    assert!(r.commits > 0, "{r:?}");
    assert!(
        old_orphans.iter().all(|p| p.exists()),
        "swept between intervals"
    );

    let r = compact_next(&sink, &mut log, txns[3], &options).await;
    assert!(r.commits > 0 && r.buckets_patched > 0, "{r:?}");
    for p in &old_orphans {
        assert!(!p.exists(), "{} left", p.display());
    }
    for p in young_orphans.iter().chain([&changes_orphan]).chain(&named) {
        assert!(p.exists(), "{} deleted", p.display());
    }

    // A retention past the checkpoints' memory of removes: no sweep.
    let long = super::TOMBSTONE_RETENTION + Duration::from_secs(24 * 3600);
    let ancient = plant("history", "ancient-orphan.parquet", long * 2);
    let r = compact_next(&sink, &mut log, txns[4], &with_retention(long)).await;
    assert!(r.commits > 0, "{r:?}");
    assert!(ancient.exists(), "swept past the tombstone retention");
    for txn in &txns[5..] {
        compact_next(&sink, &mut log, txn, &options).await;
    }
    assert_model(&sink, &snapshots, "after sweeps").await;
}

/// A change-log file is planned at 4× its size, or at the Arrow size its writer recorded when
/// that is more; a tag that is not a number is ignored, and none can overflow the sums.
#[test]
fn change_log_files_are_planned_by_their_recorded_arrow_size() {
    let tag = crate::lake::changelog::ARROW_BYTES_TAG;
    let add = |path: &str, size: i64, tags: serde_json::Value| {
        serde_json::json!({"add": {"path": path, "size": size, "dataChange": true, "tags": tags}})
            .to_string()
    };
    let commit = [
        add("small-tag", 100, serde_json::json!({ tag: "10" })),
        add("large-tag", 100, serde_json::json!({ tag: "1000000" })),
        add("no-tags", 100, serde_json::Value::Null),
        add("not-a-number", 100, serde_json::json!({ tag: "lots" })),
        add(
            "huge",
            100,
            serde_json::json!({ tag: u64::MAX.to_string() }),
        ),
        serde_json::json!({"add": {"path": "rewrite", "size": 5, "dataChange": false}}).to_string(),
    ]
    .join("\n");
    let planned: Vec<(String, u64)> = super::commit_adds(commit.as_bytes())
        .unwrap()
        .into_iter()
        .map(|(path, _, estimate)| (path, estimate))
        .collect();
    let want = [
        ("small-tag", 400),
        ("large-tag", 1_000_000),
        ("no-tags", 400),
        ("not-a-number", 400),
        ("huge", 1 << 40),
    ];
    let want: Vec<(String, u64)> = want.iter().map(|&(p, e)| (p.to_string(), e)).collect();
    assert_eq!(planned, want);
}

/// A queue table (rows inserted, then deleted a transaction later), compacted a transaction at
/// a time: without a tombstone retention, the open versions (the `open-*` bucket files every
/// rewrite copies) keep a tombstone of every row ever deleted; with one, only those younger
/// than the retention. The tables hold the same rows either way, and match the model.
#[tokio::test]
async fn a_tombstone_retention_keeps_a_queue_tables_open_versions_to_its_live_rows() {
    use crate::lsn::Lsn;
    let mut actions = Vec::new();
    for round in 0..6u8 {
        actions.extend(inserts(round * 4..round * 4 + 4, i64::from));
        if round > 0 {
            // The previous round's keys: the smallest in the table.
            actions.extend((0..4).map(|_| Action::Delete { pick: 0 }));
        }
        actions.push(Action::Commit);
    }
    let (changes, snapshots) = realize(&actions);
    let txns = transactions(&changes);
    assert_eq!(txns.len(), 6);
    let mut tables = Vec::new();
    for retention in [None, Some(std::time::Duration::ZERO)] {
        let dir = tempfile::tempdir().unwrap();
        let (sink, mut log) = file_lake(dir.path(), &batch(&[], false).schema()).await;
        let options = super::CompactOptions {
            tombstone_retention: retention,
            ..test_options(1 << 20, false)
        };
        let (mut closed, mut retired) = (0, 0);
        for txn in &txns {
            log.write(batch(txn, false)).await.unwrap();
            log.commit(Lsn(txn[0].lsn as u64)).await.unwrap();
            let report = super::compact_table(&sink, &table_t(), &options)
                .await
                .expect("compact");
            closed += report.history_versions_closed;
            retired += report.history_tombstones_retired;
        }
        let what = format!("retention {retention:?}");
        // The 20 deleted rows' versions are closed either way; retired are the tombstones of
        // all but the last transaction's deletes.
        assert_eq!(closed, 20, "{what}: versions closed");
        let expected = if retention.is_some() { 16 } else { 0 };
        assert_eq!(retired, expected, "{what}: tombstones retired");
        assert_model(&sink, &snapshots, &what).await;
        let open: usize = read_files_of(&sink, "history", "t", |p| p.starts_with("open-"))
            .await
            .iter()
            .map(|b| b.num_rows())
            .sum();
        // 4 live rows; tombstones: all 20, or the 4 of the last transaction (as old as the
        // latest change, not older).
        let expected = if retention.is_some() { 4 + 4 } else { 4 + 20 };
        assert_eq!(open, expected, "{what}: open versions");
        let history = read_target(&sink, "history").await;
        let schema = history[0].schema();
        tables.push((sorted_rows(&history, &schema), dir));
    }
    assert_eq!(tables[0].0, tables[1].0, "the same history rows");
}

/// Every compaction that closes versions appends a `closed-*` file to the history table; small
/// ones are merged, 8 of a size tier into one (`dataChange: false`), with the same rows as a
/// twin lake that never merges them, and the tables still match the model.
#[tokio::test]
async fn small_closed_version_files_of_the_history_table_are_merged() {
    use crate::lsn::Lsn;
    let mut actions: Vec<Action> = inserts(0..6u8, i64::from).collect();
    actions.push(Action::Commit);
    for round in 1..=10i64 {
        actions.extend(inserts(0..6u8, move |k| i64::from(k) * 100 + round));
        actions.push(Action::Commit);
    }
    let (changes, snapshots) = realize(&actions);
    let txns = transactions(&changes);
    assert_eq!(txns.len(), 11);
    let closed_files = |sink: &crate::lake::store::Sink| {
        let dir = sink.table_path(&["history", "public", "t"]);
        let (log_store, _, _) = sink.table_store(&dir);
        async move {
            let mut table = deltalake::DeltaTable::new(log_store);
            table.load().await.expect("load");
            let snapshot = table.snapshot().expect("snapshot");
            let paths: Vec<String> = snapshot
                .log_data()
                .iter()
                .map(|f| f.path().into_owned())
                .filter(|p| p.starts_with("closed-"))
                .collect();
            paths.len()
        }
    };
    let mut lakes = Vec::new();
    for optimize in [0u64, 64 << 20] {
        let dir = tempfile::tempdir().unwrap();
        let (sink, mut log) = file_lake(dir.path(), &batch(&[], false).schema()).await;
        let options = super::CompactOptions {
            optimize_file_size: optimize,
            ..test_options(1 << 20, false)
        };
        let mut counts = Vec::new();
        let mut merges = Vec::new();
        for txn in &txns {
            log.write(batch(txn, false)).await.unwrap();
            log.commit(Lsn(txn[0].lsn as u64)).await.unwrap();
            let report = super::compact_table(&sink, &table_t(), &options)
                .await
                .expect("compact");
            assert!(!report.maintenance_failed, "{report:?}");
            merges.push((report.history_files_merged, report.history_files_written));
            counts.push(closed_files(&sink).await);
        }
        let what = format!("optimize {optimize}");
        assert_model(&sink, &snapshots, &what).await;
        if optimize == 0 {
            // A closed file a compaction after the first (inserts close nothing).
            assert_eq!(counts, (0..11).collect::<Vec<usize>>(), "{what}");
            assert!(merges.iter().all(|&m| m == (0, 0)), "{what}: {merges:?}");
        } else {
            // The 8th closed file makes a full tier: the 8 become 1.
            assert_eq!(counts, [0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3], "{what}");
            assert_eq!(merges[8], (8, 1), "{what}: {merges:?}");
            // One commit merged: it only moves rows (`dataChange: false` throughout).
            let log = dir.path().join("history/public/t/_delta_log");
            let merging: Vec<String> = std::fs::read_dir(&log)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .map(|p| std::fs::read_to_string(p).unwrap())
                .filter(|c| c.contains(r#""dataChange":false"#))
                .collect();
            assert_eq!(merging.len(), 1, "{merging:?}");
            assert!(
                !merging[0].contains(r#""dataChange":true"#),
                "{}",
                merging[0]
            );
            assert_eq!(
                merging[0].matches(r#""remove""#).count(),
                8,
                "{}",
                merging[0]
            );
            assert!(
                merging[0].contains(r#""operation":"OPTIMIZE""#),
                "{}",
                merging[0]
            );
        }
        let history = read_target(&sink, "history").await;
        let schema = history[0].schema();
        lakes.push((sorted_rows(&history, &schema), dir));
    }
    assert_eq!(lakes[0].0, lakes[1].0, "the same history rows");
}

/// A compactor that runs pass after pass skips a table whose change log and history table
/// have not moved since it last compacted it, and compacts it again once either moves (new
/// changes, a change log written again, another compactor's history commit); a retention
/// shorter than the recheck interval (here none) turns the skipping off. The tables end up as
/// the model says, and a pass over the whole lake forgets a table that left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_skip_tables_whose_logs_have_not_moved() {
    use crate::lsn::Lsn;
    let actions: Vec<Action> = inserts(0..12u8, i64::from)
        .chain([Action::Commit])
        .chain(inserts(12..24u8, |k| -i64::from(k)))
        .chain([Action::Commit])
        .collect();
    let (changes, snapshots) = realize(&actions);
    let txns = transactions(&changes);
    assert_eq!(txns.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    let (sink, mut log) = file_lake(dir.path(), &batch(&[], false).schema()).await;
    let options = test_options(1 << 20, false);
    let mut memo = super::Memo::default();
    async fn pass_with(
        sink: &crate::lake::store::Sink,
        options: &super::CompactOptions,
        memo: &mut super::Memo,
    ) -> super::TableReport {
        let mut pass = super::compact_all_again(sink, &[table_t()], options, memo)
            .await
            .expect("pass");
        assert_eq!(pass.len(), 1);
        pass.remove(0).1.expect("compacted")
    }
    async fn write(log: &mut crate::lake::changelog::ChangeLogTable, txn: &[Change]) {
        log.write(batch(txn, false)).await.unwrap();
        log.commit(Lsn(txn[0].lsn as u64)).await.unwrap();
    }
    macro_rules! pass {
        ($options:expr) => {
            pass_with(&sink, &$options, &mut memo).await
        };
    }

    write(&mut log, txns[0]).await;
    let first = pass!(options);
    assert!(!first.unchanged && first.changes == 12, "{first:?}");
    // The logs were listed before that run, which committed since: one more full pass.
    let settle = pass!(options);
    assert!(!settle.unchanged && settle.changes == 0, "{settle:?}");
    let again = pass!(options);
    assert!(again.unchanged && again.changes == 0, "{again:?}");
    assert_eq!(again.to_version, first.to_version);
    // Another process (no memo) finds nothing to do and commits nothing: still unchanged.
    let other = pass_with(&sink, &options, &mut super::Memo::default()).await;
    assert!(!other.unchanged && other.changes == 0, "{other:?}");
    assert!(pass!(options).unchanged);

    // New changes move the change log.
    write(&mut log, txns[1]).await;
    let second = pass!(options);
    assert!(!second.unchanged && second.changes == 12, "{second:?}");
    assert!(!pass!(options).unchanged);
    assert!(pass!(options).unchanged);

    // The change log's latest commit written again (a log replaced up to the same version):
    // a full pass, which finds nothing new.
    let latest = latest_commit(&dir.path().join("changes/public/t"));
    let bytes = std::fs::read(&latest).unwrap();
    std::fs::remove_file(&latest).unwrap();
    std::fs::write(&latest, &bytes).unwrap();
    let replaced = pass!(options);
    assert!(!replaced.unchanged && replaced.changes == 0, "{replaced:?}");
    assert!(pass!(options).unchanged);

    // Another compactor's commit to the history table alone (as one that stopped between its
    // history and current commits leaves it): a full pass.
    let latest = latest_commit(&dir.path().join("history/public/t"));
    let version: u64 = latest
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    std::fs::write(
        latest.with_file_name(format!("{:020}.json", version + 1)),
        r#"{"commitInfo":{"timestamp":1,"operation":"another compactor"}}"#,
    )
    .unwrap();
    let moved = pass!(options);
    assert!(!moved.unchanged && moved.changes == 0, "{moved:?}");
    assert!(pass!(options).unchanged);

    // A retention of zero: every pass is a full one.
    let no_wait = super::CompactOptions {
        vacuum_retention: Some(std::time::Duration::ZERO),
        ..options.clone()
    };
    assert!(!pass!(no_wait).unchanged);
    assert_model(&sink, &snapshots, "after skipped passes").await;

    // A pass over the whole lake forgets tables that left it.
    assert!(memo.tables.contains_key(&table_t()));
    std::fs::remove_dir_all(dir.path().join("changes/public/t")).unwrap();
    let pass = super::compact_all_again(&sink, &[], &options, &mut memo)
        .await
        .expect("pass");
    assert!(pass.is_empty());
    assert!(memo.tables.is_empty());
}

/// The latest commit of a Delta log, listed from a known one: `None` without a log; the whole
/// log listed again when the known version is not there (the log was replaced); a commit
/// written again has another mark.
#[tokio::test]
async fn latest_log_version_lists_from_a_known_version() {
    use object_store::{memory::InMemory, path::Path, ObjectStoreExt, PutPayload};
    let store = InMemory::new();
    let table = Path::from("changes/public/t");
    macro_rules! latest {
        ($from:expr) => {
            super::latest_log_version(&store, &table, $from)
                .await
                .unwrap()
        };
    }
    assert_eq!(latest!(None), None);
    let commit = |v: u64| {
        table
            .clone()
            .join("_delta_log")
            .join(format!("{v:020}.json"))
    };
    for v in [0u64, 1, 2, 10] {
        store
            .put(&commit(v), PutPayload::from_static(b"{}"))
            .await
            .unwrap();
    }
    let checkpoint = table
        .clone()
        .join("_delta_log")
        .join(format!("{:020}.checkpoint.parquet", 10));
    store
        .put(&checkpoint, PutPayload::from_static(b""))
        .await
        .unwrap();
    let last = table.clone().join("_delta_log").join("_last_checkpoint");
    store
        .put(&last, PutPayload::from_static(b"{}"))
        .await
        .unwrap();
    let ten = latest!(None).expect("a log");
    assert_eq!(ten.version, 10);
    let mark = |v: u64| {
        let store = &store;
        async move {
            let meta = store.head(&commit(v)).await.unwrap();
            super::LogMark {
                version: v,
                e_tag: meta.e_tag,
                modified: meta.last_modified,
            }
        }
    };
    for v in [0, 1, 2, 10] {
        assert_eq!(latest!(Some(&mark(v).await)).as_ref(), Some(&ten));
    }
    // Version 5 was never written, 11 not yet: not this log; listed whole.
    for v in [5, 11] {
        let unseen = super::LogMark {
            version: v,
            ..ten.clone()
        };
        assert_eq!(latest!(Some(&unseen)).as_ref(), Some(&ten));
    }
    // Version 2 and 10 written again (a replaced log): a new mark, found from either.
    let two = mark(2).await;
    for v in [2, 10] {
        store
            .put(&commit(v), PutPayload::from_static(b"{}"))
            .await
            .unwrap();
    }
    let new_ten = latest!(Some(&ten)).expect("a log");
    assert_eq!(new_ten.version, 10);
    assert_ne!(new_ten, ten);
    assert_eq!(latest!(Some(&two)), Some(new_ten));
}

/// A store that counts the reads of each path, and, once armed, holds back reads of change
/// logs' Delta logs until `tables` tables have asked for one (then lets every read through):
/// a pass that compacts them one after the other never gets there.
#[derive(Debug)]
struct Gate {
    inner: std::sync::Arc<dyn object_store::ObjectStore>,
    armed: std::sync::atomic::AtomicBool,
    tables: usize,
    waiting: std::sync::Mutex<BTreeSet<String>>,
    open: tokio::sync::watch::Sender<bool>,
    reads: std::sync::Mutex<BTreeMap<String, usize>>,
}

impl Gate {
    fn over_memory(tables: usize) -> std::sync::Arc<Gate> {
        std::sync::Arc::new(Gate {
            inner: std::sync::Arc::new(object_store::memory::InMemory::new()),
            armed: false.into(),
            tables,
            waiting: Default::default(),
            open: tokio::sync::watch::channel(false).0,
            reads: Default::default(),
        })
    }

    fn sink(self: &std::sync::Arc<Gate>) -> crate::lake::store::Sink {
        crate::lake::store::Sink::from_store(
            self.clone(),
            "lake",
            url::Url::parse("memory:///").unwrap(),
        )
    }
}

impl std::fmt::Display for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gate({})", self.inner)
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for Gate {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        let path = location.as_ref();
        *self
            .reads
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_default() += 1;
        let log = path
            .split_once("/changes/")
            .and_then(|(_, rest)| rest.split_once("/_delta_log/"));
        if let (Some((table, _)), true) =
            (log, self.armed.load(std::sync::atomic::Ordering::SeqCst))
        {
            let mut open = self.open.subscribe();
            {
                let mut waiting = self.waiting.lock().unwrap();
                waiting.insert(table.to_string());
                if waiting.len() >= self.tables {
                    self.open.send_replace(true);
                }
            }
            open.wait_for(|o| *o).await.expect("gate");
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// Tables `public.<prefix>0`, `public.<prefix>1`, … (`tables` of them) in `sink`, each with a
/// change log of one transaction inserting keys 0 to `keys` - 1.
async fn tables_of_inserts(
    sink: &crate::lake::store::Sink,
    prefix: &str,
    tables: usize,
    keys: u8,
) -> Vec<crate::replication::sql::TableName> {
    use crate::lake::changelog::{app_id, ChangeLogTable};
    use crate::lsn::Lsn;
    let actions: Vec<Action> = inserts(0..keys, i64::from)
        .chain([Action::Commit])
        .collect();
    let (changes, _) = realize(&actions);
    let names: Vec<crate::replication::sql::TableName> = (0..tables)
        .map(|i| crate::replication::sql::TableName {
            schema: "public".into(),
            name: format!("{prefix}{i}"),
        })
        .collect();
    for name in &names {
        let schema = batch(&[], false).schema();
        let mut log = ChangeLogTable::open(sink, name, &app_id("s"), &schema, 64 << 20)
            .await
            .unwrap();
        log.write(batch(&changes, false)).await.unwrap();
        log.commit(Lsn(changes[0].lsn as u64)).await.unwrap();
    }
    names
}

/// A pass compacts several tables at the same time (three of four here: each table's
/// change-log reads are held back until three tables wait, which one table at a time never
/// reaches), and each comes out as the model says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_compacts_tables_at_the_same_time() {
    let gate = Gate::over_memory(3);
    let sink = gate.sink();
    let names = tables_of_inserts(&sink, "t", 4, 12).await;
    gate.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let options = super::CompactOptions {
        tables_at_once: 3,
        ..test_options(1 << 20, false)
    };
    let pass = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        super::compact_all(&sink, &names, &options),
    )
    .await
    .expect("the tables were not compacted at the same time")
    .expect("pass");
    assert_eq!(gate.waiting.lock().unwrap().len(), 4);
    assert_eq!(pass.len(), 4);
    for ((name, result), expected) in pass.iter().zip(&names) {
        assert_eq!(name, expected);
        let report = result.as_ref().expect("compacted");
        assert_eq!(report.changes, 12, "{report:?}");
        let rows = current_rows_of(&sink, &name.name).await;
        assert_eq!(rows, 12, "{name}");
    }
    // A table named twice is compacted once.
    let twice = [names[0].clone(), names[0].clone()];
    let pass = super::compact_all(&sink, &twice, &options)
        .await
        .expect("pass");
    assert_eq!(pass.len(), 1);
}

/// A test's hold on the folds of its tables (names containing `tag`): a fold of theirs starts
/// once `wanted` of them have reached their fold (see [`fold_gate_arrive`]); how many have, and
/// whether a fold gave up waiting. Off while `tag` is `None`.
struct FoldGate {
    tag: Option<&'static str>,
    wanted: usize,
    arrived: usize,
    gave_up: bool,
}

static FOLD_GATE: std::sync::Mutex<FoldGate> = std::sync::Mutex::new(FoldGate {
    tag: None,
    wanted: 0,
    arrived: 0,
    gave_up: false,
});
static FOLD_ARRIVED: std::sync::Condvar = std::sync::Condvar::new();

fn fold_gate() -> std::sync::MutexGuard<'static, FoldGate> {
    FOLD_GATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Called by a step of `table` as a fold of it comes up (before it waits for its turn).
pub(super) fn fold_gate_arrive(table: &str) {
    let mut gate = fold_gate();
    if gate.tag.is_some_and(|tag| table.contains(tag)) {
        gate.arrived += 1;
        FOLD_ARRIVED.notify_all();
    }
}

/// Called by a fold of `table` before it starts: waits (30 s at most) until as many of the
/// gate's tables as it wants have reached a fold.
pub(super) fn fold_gate_hold(table: &str) {
    let mut gate = fold_gate();
    if !gate.tag.is_some_and(|tag| table.contains(tag)) {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while gate.arrived < gate.wanted {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            gate.gave_up = true;
            return;
        }
        gate = FOLD_ARRIVED
            .wait_timeout(gate, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// The fold gate armed for tables named with `tag`, until dropped (also when a test fails).
struct Armed;

impl Armed {
    fn new(tag: &'static str, wanted: usize) -> Armed {
        *fold_gate() = FoldGate {
            tag: Some(tag),
            wanted,
            arrived: 0,
            gave_up: false,
        };
        Armed
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        fold_gate().tag = None;
    }
}

/// A fold does not hold up the other tables of its pass: the first table's fold waits at its
/// start until the second table has read its change log and reached its own fold, which a
/// fold run inside the pass's task (blocking the other table's future) never lets happen; and
/// both tables come out whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fold_leaves_the_other_tables_of_a_pass_going() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let sink = crate::lake::store::Sink::open(&url, &Default::default()).unwrap();
    let names = tables_of_inserts(&sink, "fold_gate_", 2, 40).await;
    let armed = Armed::new("fold_gate_", 2);
    let pass = super::compact_all(&sink, &names, &test_options(1 << 20, false)).await;
    let (arrived, gave_up) = {
        let gate = fold_gate();
        (gate.arrived, gate.gave_up)
    };
    drop(armed);
    assert!(!gave_up, "a fold waited for the other table's in vain");
    assert_eq!(arrived, 2, "folds");
    let pass = pass.expect("pass");
    assert_eq!(pass.len(), 2);
    for (name, result) in &pass {
        let report = result.as_ref().expect("compacted");
        assert_eq!(report.changes, 40, "{name}: {report:?}");
        let rows = current_rows_of(&sink, &name.name).await;
        assert_eq!(rows, 40, "{name}");
    }
}

/// A table's share of the memory budget: a few changes to a small table take a little of it,
/// a large step all of it; a share taken makes a larger one wait until it is given back.
#[tokio::test]
async fn tables_share_the_memory_budget() {
    use futures::FutureExt as _;
    let memory = super::MemoryShare::new(64 << 20);
    assert_eq!(memory.available(), 64);
    let small = memory
        .take(super::step_share(100 << 10, 1 << 20))
        .now_or_never()
        .flatten()
        .expect("room for a small table");
    assert_eq!(memory.available(), 64 - 5);
    // A step of half the budget needs all of it, and waits for the small table.
    assert!(memory
        .take(super::step_share(32 << 20, 1 << 20))
        .now_or_never()
        .is_none());
    // A later, larger step is short of the small share; the same step is not.
    assert!(memory.short(&small, super::step_share(32 << 20, 1 << 20)));
    assert!(!memory.short(&small, super::step_share(100 << 10, 1 << 20)));
    drop(small);
    let large = memory
        .take(super::step_share(32 << 20, 1 << 20))
        .now_or_never()
        .flatten()
        .expect("the whole budget once it is free");
    assert_eq!(memory.available(), 0);
    assert!(memory.take(1).now_or_never().is_none());
    drop(large);
    assert_eq!(memory.available(), 64);
}

/// A pass that finds nothing to do reads each commit of the three Delta logs of a table at
/// most three times, and the latest commit of each target four times (it read them six or
/// seven times when vacuum and change-log maintenance each loaded their table again): vacuum
/// starts from the table as the pass loaded it, and maintenance from the change log
/// compaction read. The files the earlier passes replaced
/// (while vacuum was off) are vacuumed all the same (retention zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pass_reads_each_delta_commit_at_most_four_times() {
    use crate::lake::changelog::{app_id, ChangeLogTable};
    use crate::lsn::Lsn;
    let actions: Vec<Action> = inserts(0..12u8, i64::from)
        .chain([Action::Commit])
        .chain(inserts(0..12u8, |k| -i64::from(k)))
        .chain([Action::Commit])
        .collect();
    let (changes, snapshots) = realize(&actions);
    let gate = Gate::over_memory(usize::MAX);
    let sink = gate.sink();
    let mut log = ChangeLogTable::open(
        &sink,
        &table_t(),
        &app_id("s"),
        &batch(&[], false).schema(),
        64 << 20,
    )
    .await
    .unwrap();
    let options = super::CompactOptions {
        vacuum_retention: Some(std::time::Duration::ZERO),
        optimize_file_size: 64 << 20,
        ..test_options(1 << 20, false)
    };
    let keep_files = super::CompactOptions {
        vacuum_retention: None,
        ..options.clone()
    };
    for txn in transactions(&changes) {
        log.write(batch(txn, false)).await.unwrap();
        log.commit(Lsn(txn[0].lsn as u64)).await.unwrap();
        let report = super::compact_table(&sink, &table_t(), &keep_files)
            .await
            .expect("compacted");
        assert_eq!(report.changes, txn.len() as u64);
    }
    gate.reads.lock().unwrap().clear();
    let idle = super::compact_table(&sink, &table_t(), &options)
        .await
        .expect("compacted");
    assert_eq!((idle.changes, idle.commits), (0, 0), "{idle:?}");
    let reads = gate.reads.lock().unwrap().clone();
    let commits: Vec<(&String, &usize)> = reads
        .iter()
        .filter(|(p, _)| p.contains("/_delta_log/") && p.ends_with(".json"))
        .collect();
    for kind in ["changes", "current", "history"] {
        assert!(
            commits
                .iter()
                .any(|(p, _)| p.contains(&format!("/{kind}/"))),
            "{kind} log read: {commits:?}"
        );
    }
    assert!(commits.iter().all(|(_, &n)| n <= 4), "{commits:?}");
    for kind in ["changes", "current", "history"] {
        let fourth = commits
            .iter()
            .filter(|(p, &n)| p.contains(&format!("/{kind}/")) && n == 4)
            .count();
        assert!(fourth <= 1, "{kind}: {commits:?}");
    }
    // What the earlier passes replaced is gone from storage; the tables are whole.
    assert!(idle.files_vacuumed > 0, "{idle:?}");
    for kind in ["current", "history"] {
        use futures::StreamExt as _;
        let (log_store, store, _) = sink.table_store(&sink.table_path(&[kind, "public", "t"]));
        let on_store: BTreeSet<String> = store
            .list(None)
            .filter_map(|m| async move { m.ok() })
            .map(|m| m.location.to_string())
            .filter(|p| std::future::ready(p.ends_with(".parquet")))
            .collect()
            .await;
        let mut table = deltalake::DeltaTable::new(log_store);
        table.load().await.unwrap();
        let live: BTreeSet<String> = table
            .snapshot()
            .unwrap()
            .log_data()
            .iter()
            .map(|f| f.path().to_string())
            .collect();
        assert!(!live.is_empty());
        assert_eq!(
            on_store, live,
            "{kind}: replaced files vacuumed, live ones kept"
        );
    }
    assert_model(&sink, &snapshots, "after an idle pass").await;
}
