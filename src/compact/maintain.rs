//! Change-log maintenance, run by compaction once a table is compacted.
//!
//! **Optimize.** `run` commits a table's change log every flush, so a table that changes a
//! little at a time collects many small files. Compacted files smaller than an eighth of the
//! optimize size are merged (larger ones are left: rewriting them buys readers little), size-tiered: files are grouped by size tier (×8 per tier) and
//! [`FAN_IN`] files of one tier become one file of the next, so every row is rewritten about
//! log₈(optimize size / flush size) times in its life, not once per pass. Merged files keep
//! the rows (conformed to the table's latest schema: columns added since read as null, as
//! Delta readers already show them) and are committed with `dataChange: false`, which
//! compaction skips.
//!
//! **Retention.** Compacted files written more than `--changes-retention` ago leave the
//! change log (a `remove` action). Merged files keep the write time of their newest input, so
//! merging never extends a row's life.
//!
//! **Vacuum.** Files removed by either are deleted from storage `--vacuum-retention` later.
//!
//! **History.** The history table's closed versions are appended a file per committing step
//! and never rewritten, so a table compacted every minute gains a file a minute. Its small
//! closed-version files are merged the same way, size-tiered ([`history`]).
//!
//! Only files of change-log versions the history table's `txn` says are compacted are
//! touched; files of later versions, which compaction has yet to read by path, never are.
//! Maintenance commits take the next log version like `run`'s commits do; whichever loses
//! the race retries on top (neither removes a file the other adds).

use std::collections::HashSet;
use std::sync::Arc;

use deltalake::arrow::datatypes::{Schema, SchemaRef};
use deltalake::kernel::engine::arrow_conversion::TryIntoArrow;
use deltalake::kernel::transaction::CommitData;
use deltalake::kernel::{Action, Add, Remove};
use deltalake::logstore::{CommitOrBytes, LogStoreRef};
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::DeltaTable;
use object_store::{ObjectStore, ObjectStoreExt};
use uuid::Uuid;

use super::{commit_actions, now_millis, CompactError, CompactOptions, Ctx};
use crate::lake::changelog::writer_properties;

/// Files of one size tier merged into one file.
pub const FAN_IN: usize = 8;

/// Attempts of a maintenance commit against `run`'s commits (each one after re-reading the
/// latest version, so this bounds lost races, not versions stepped over).
const COMMIT_RACES: u32 = 8;

/// Files smaller than the optimize size divided by this are merged.
const SMALL_FRACTION: i64 = 8;

/// Size of the smallest tier: files up to this are tier 0.
const TIER_BASE: i64 = 256 * 1024;

/// What maintenance did to one change log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Maintained {
    /// Small files merged, and the files they became.
    pub files_merged: u64,
    pub files_written: u64,
    /// Files past the retention removed from the log.
    pub files_expired: u64,
    /// Removed files deleted from storage.
    pub files_vacuumed: u64,
}

/// A live data file of the change log.
#[derive(Debug, Clone)]
struct LiveFile {
    path: String,
    size: i64,
    modified: i64,
}

/// Size tier of a file: 0 up to [`TIER_BASE`], then one per factor of [`FAN_IN`].
fn tier(size: i64) -> u32 {
    let mut t = 0;
    let mut bound = TIER_BASE;
    while size > bound {
        bound = bound.saturating_mul(FAN_IN as i64);
        t += 1;
    }
    t
}

/// Groups of small files to merge: per tier, oldest first, [`FAN_IN`] files at a time (each
/// is under an eighth of `target`, so a group stays under it); an incomplete group waits for
/// more files.
fn merge_groups(mut files: Vec<LiveFile>, target: i64) -> Vec<Vec<LiveFile>> {
    files.retain(|f| f.size < target / SMALL_FRACTION);
    files.sort_by(|a, b| {
        (tier(a.size), a.modified, &a.path).cmp(&(tier(b.size), b.modified, &b.path))
    });
    let mut groups = Vec::new();
    let mut group: Vec<LiveFile> = Vec::new();
    for f in files {
        if group.first().is_some_and(|g| tier(g.size) != tier(f.size)) {
            group.clear();
        }
        group.push(f);
        if group.len() == FAN_IN {
            groups.push(std::mem::take(&mut group));
        }
    }
    groups
}

/// Optimizes, expires and vacuums the change log behind `log_store` (see the module doc).
/// `through`: the last change-log version wholly compacted; `loaded`: the change log as the
/// pass loaded it, when compaction found nothing to fold (else it is loaded again).
pub(super) async fn changelog(
    ctx: &Ctx<'_>,
    loaded: Option<DeltaTable>,
    log_store: &LogStoreRef,
    store: &Arc<dyn ObjectStore>,
    through: Option<u64>,
    options: &CompactOptions,
) -> Result<Maintained, CompactError> {
    let mut done = Maintained::default();
    let Some(through) = through else {
        return Ok(done);
    };
    // The change log as compaction loaded it (an idle table's pass), else loaded when needed.
    let mut table = loaded;
    // Whether maintenance committed to the change log (then vacuum loads it again).
    let mut committed = false;
    let optimize = options.optimize_file_size > 0;
    if optimize || options.changes_retention.is_some() {
        let loaded = match table.take() {
            Some(loaded) => loaded,
            None => ctx.load_delta(log_store, "load change log").await?,
        };
        let table = &*table.insert(loaded);
        let snapshot = table.snapshot().map_err(ctx.fail("load change log"))?;
        let latest = snapshot.version();
        // Files of versions compaction has not read yet are not ours to touch.
        let mut fresh = HashSet::new();
        for v in through + 1..=latest {
            let bytes = ctx.read_commit(log_store, v).await?;
            let adds = commit_actions(&bytes).map_err(ctx.fail("parse change-log commit"))?;
            fresh.extend(adds.into_iter().map(|a| a.path));
        }
        let mut files: Vec<LiveFile> = snapshot
            .log_data()
            .iter()
            .map(|f| LiveFile {
                path: f.path().into_owned(),
                size: f.size(),
                modified: f.modification_time(),
            })
            .filter(|f| !fresh.contains(&f.path))
            .collect();
        let schema: Schema = snapshot
            .schema()
            .as_ref()
            .try_into_arrow()
            .map_err(ctx.fail("change-log schema"))?;
        let schema = Arc::new(schema);

        if let Some(retention) = options.changes_retention {
            let cutoff = now_millis() - retention.as_millis().min(i64::MAX as u128) as i64;
            let (expired, kept): (Vec<LiveFile>, Vec<LiveFile>) =
                files.into_iter().partition(|f| f.modified < cutoff);
            files = kept;
            if !expired.is_empty() {
                let removes = expired
                    .iter()
                    .map(|f| Action::Remove(remove(&f.path, f.size, true)))
                    .collect();
                let operation = DeltaOperation::Delete {
                    predicate: Some(format!("written more than {retention:?} ago")),
                };
                commit(ctx, log_store, latest, removes, operation).await?;
                committed = true;
                done.files_expired = expired.len() as u64;
            }
        }

        if optimize {
            let target = i64::try_from(options.optimize_file_size).unwrap_or(i64::MAX);
            let groups = merge_groups(files, target);
            if !groups.is_empty() {
                // A group is read a file at a time into one writer of at most the target size.
                let _share = ctx
                    .memory
                    .take(options.optimize_file_size.saturating_mul(2))
                    .await;
                let mut actions = Vec::new();
                let mut written = Vec::new();
                for group in &groups {
                    let adds = merge(
                        ctx,
                        table,
                        store,
                        &schema,
                        group,
                        options.optimize_file_size,
                    )
                    .await?;
                    done.files_merged += group.len() as u64;
                    done.files_written += adds.len() as u64;
                    actions.extend(
                        group
                            .iter()
                            .map(|f| Action::Remove(remove(&f.path, f.size, false))),
                    );
                    written.extend(adds.iter().map(|a| a.path.clone()));
                    actions.extend(adds.into_iter().map(Action::Add));
                }
                let operation = DeltaOperation::Optimize {
                    predicate: None,
                    target_size: target,
                };
                if let Err(e) = commit(ctx, log_store, latest, actions, operation).await {
                    // A conflict never committed: nothing references the merged files, and
                    // vacuum only deletes files the log removed. Delete them now (best
                    // effort). Any other failure may have committed (a timeout after the
                    // write): the files stay (an unreferenced file costs storage; deleting a
                    // referenced one would lose its rows).
                    if !matches!(e, CompactError::Conflict { .. }) {
                        return Err(e);
                    }
                    for path in written {
                        if let Ok(p) = object_store::path::Path::parse(&path) {
                            let _ = store.delete(&p).await;
                        }
                    }
                    return Err(e);
                }
                committed = true;
            }
        }
    }
    if let Some(retention) = options.vacuum_retention {
        // Lite mode only: the change log's directory also holds the staged files of source
        // transactions still open, uncommitted for as long as the transaction runs.
        let loaded = table.as_ref().filter(|_| !committed);
        done.files_vacuumed = ctx.vacuum(log_store, loaded, retention, false).await?;
    }
    Ok(done)
}

/// Merges the history table's small closed-version files (`closed-*`, which no deletion
/// vector marks), size-tiered like the change log's, [`FAN_IN`] of a tier into one
/// `closed-*` file of the next, committed with `dataChange: false` (with the table's `txn`
/// unchanged). Returns the files merged and written. Files written for a commit that did not
/// happen are deleted (best effort; else the orphan sweep takes them).
pub(super) async fn history(
    ctx: &Ctx<'_>,
    history: &mut super::Target,
    schema: &SchemaRef,
    options: &CompactOptions,
) -> Result<(u64, u64), CompactError> {
    let Some(txn) = history.txn.filter(|_| options.optimize_file_size > 0) else {
        return Ok((0, 0));
    };
    let target = i64::try_from(options.optimize_file_size).unwrap_or(i64::MAX);
    let files: Vec<LiveFile> = history
        .files
        .iter()
        .filter(|(path, entry)| path.starts_with(super::CLOSED_PREFIX) && entry.dv.is_none())
        .map(|(path, entry)| LiveFile {
            path: path.clone(),
            size: entry.size,
            modified: 0,
        })
        .collect();
    let groups = merge_groups(files, target);
    if groups.is_empty() {
        return Ok((0, 0));
    }
    // A group is read a file at a time into one writer (its output under the target size).
    let _share = ctx
        .memory
        .take(options.optimize_file_size.saturating_mul(2))
        .await;
    let store = history.store.clone();
    let mut written = Vec::new();
    let merged = async {
        let (mut adds, mut removes) = (Vec::new(), Vec::new());
        for group in &groups {
            let (path, mut writer) =
                super::closed_file(&store, schema).map_err(ctx.fail("merge closed versions"))?;
            written.push(path.clone());
            let mut rows = 0;
            for f in group {
                let batches = ctx.read_parquet(&store, &f.path, schema).await?;
                for b in &batches {
                    rows += b.num_rows();
                    writer
                        .write(b)
                        .await
                        .map_err(ctx.fail("merge closed versions"))?;
                }
                let entry = history.files.get(&f.path).ok_or_else(|| {
                    ctx.fail("merge closed versions")(super::FoldError::Inconsistent(
                        "a file to merge is not in the table",
                    ))
                })?;
                removes.push(Remove {
                    data_change: false,
                    ..super::remove_file(&f.path, entry)
                });
            }
            writer
                .finish()
                .await
                .map_err(ctx.fail("merge closed versions"))?;
            adds.push(Add {
                data_change: false,
                ..super::new_add(path, writer.bytes_written() as i64, rows)
            });
        }
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size: target,
        };
        ctx.commit_as(history, schema, adds, removes, txn, operation)
            .await
    }
    .await;
    if let Err(e) = merged {
        // Not committed (a failure before the commit, or a conflict): nothing names the
        // written files. Any other commit failure may have committed: they stay (the orphan
        // sweep takes them if not).
        let committing = matches!(&e, CompactError::Failed { action, .. } if *action == "commit");
        if committing {
            return Err(e);
        }
        for path in written {
            let _ = store
                .delete(&object_store::path::Path::from(path.as_str()))
                .await;
        }
        return Err(e);
    }
    let merged: usize = groups.iter().map(Vec::len).sum();
    Ok((merged as u64, groups.len() as u64))
}

/// Rewrites `group`'s rows, in order, into one file of the change log (Parquet with
/// statistics, like the files `run` writes), returned as `dataChange: false` adds that keep
/// the newest input's write time.
async fn merge(
    ctx: &Ctx<'_>,
    table: &DeltaTable,
    store: &Arc<dyn ObjectStore>,
    schema: &SchemaRef,
    group: &[LiveFile],
    target_bytes: u64,
) -> Result<Vec<Add>, CompactError> {
    let mut writer = RecordBatchWriter::for_table(table)
        .map_err(ctx.fail("optimize writer"))?
        .with_writer_properties(writer_properties(schema))
        // A group holds at most `target` bytes of input: one output file, without telling the
        // writer to expect an unbounded one.
        .with_target_file_size(target_bytes.saturating_mul(2).max(1 << 20));
    for f in group {
        let batches = super::read_parquet_file(store.as_ref(), &f.path, schema)
            .await
            .map_err(|source| CompactError::Failed {
                table: ctx.table.clone(),
                action: "read change-log file to optimize",
                source,
            })?;
        for b in batches {
            writer.write(b).await.map_err(ctx.fail("optimize write"))?;
        }
    }
    let modified = group.iter().map(|f| f.modified).max().unwrap_or(0);
    let mut adds = writer.flush().await.map_err(ctx.fail("optimize write"))?;
    for a in &mut adds {
        a.data_change = false;
        a.modification_time = modified;
    }
    Ok(adds)
}

fn remove(path: &str, size: i64, data_change: bool) -> Remove {
    Remove {
        data_change,
        ..super::remove_of(path, size)
    }
}

/// Commits `actions` as the next version of the change log after `base`. A version `run`
/// took meanwhile is stepped over, unless a commit in between removed one of the files this
/// one removes (another maintenance pass): then it is a conflict, retried by the caller.
async fn commit(
    ctx: &Ctx<'_>,
    log_store: &LogStoreRef,
    base: u64,
    actions: Vec<Action>,
    operation: DeltaOperation,
) -> Result<u64, CompactError> {
    let ours: HashSet<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove(r) => Some(r.path.clone()),
            _ => None,
        })
        .collect();
    let data = CommitData::new(actions, operation, Default::default(), Vec::new());
    let bytes = data.get_bytes().map_err(ctx.fail("serialize commit"))?;
    let mut seen = base;
    for _ in 0..COMMIT_RACES {
        // Step over what others committed since `seen` (`run`'s appends), unless one of
        // them removed a file this commit removes.
        let latest = log_store
            .get_latest_version(seen)
            .await
            .map_err(ctx.fail("read the change log's version"))?;
        for v in seen + 1..=latest {
            let theirs = ctx.read_commit(log_store, v).await?;
            if removes_any(&theirs, &ours).map_err(ctx.fail("parse change-log commit"))? {
                return Err(conflict(ctx));
            }
        }
        seen = latest;
        let next = latest + 1;
        let written = log_store
            .write_commit_entry(next, CommitOrBytes::LogBytes(bytes.clone()), Uuid::new_v4())
            .await;
        match written {
            Ok(()) => {
                if next.is_multiple_of(crate::lake::changelog::CHECKPOINT_INTERVAL) {
                    if let Err(e) =
                        crate::lake::changelog::write_checkpoint(log_store.clone(), next).await
                    {
                        tracing::warn!(table = %ctx.table, error = %e, "cannot write a change-log checkpoint");
                    }
                }
                return Ok(next);
            }
            Err(deltalake::kernel::transaction::TransactionError::VersionAlreadyExists(_)) => {}
            Err(e) => return Err(ctx.fail("commit change-log maintenance")(e)),
        }
    }
    Err(conflict(ctx))
}

fn conflict(ctx: &Ctx<'_>) -> CompactError {
    CompactError::Conflict {
        table: ctx.table.clone(),
        target: "change log",
    }
}

/// True when the log entry `bytes` removes one of `paths`.
fn removes_any(bytes: &[u8], paths: &HashSet<String>) -> Result<bool, serde_json::Error> {
    for line in bytes.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(line)?;
        let removed = v
            .get("remove")
            .and_then(|r| r.get("path"))
            .and_then(|p| p.as_str());
        if removed.is_some_and(|p| paths.contains(p)) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: i64, modified: i64) -> LiveFile {
        LiveFile {
            path: name.into(),
            size,
            modified,
        }
    }

    #[test]
    fn small_files_merge_fan_in_at_a_time_within_a_tier() {
        let mut files: Vec<LiveFile> = (0..20).map(|i| file(&format!("s{i}"), 1000, i)).collect();
        // A tier-1 file does not join tier-0 groups; files past an eighth of the target stay.
        files.push(file("m", 1 << 20, 5));
        files.push(file("big", 40 << 20, 1));
        let groups = merge_groups(files, 64 << 20);
        let names: Vec<Vec<&str>> = groups
            .iter()
            .map(|g| g.iter().map(|f| f.path.as_str()).collect())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(names[0], ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"]);
        assert_eq!(
            names[1],
            ["s8", "s9", "s10", "s11", "s12", "s13", "s14", "s15"]
        );
    }

    #[test]
    fn tiers_grow_by_the_fan_in() {
        assert_eq!(tier(1), 0);
        assert_eq!(tier(TIER_BASE), 0);
        assert_eq!(tier(TIER_BASE + 1), 1);
        assert_eq!(tier(TIER_BASE * 8), 1);
        assert_eq!(tier(TIER_BASE * 8 + 1), 2);
    }

    /// A change log `public.t` of column `a` on a memory sink, and its log store.
    async fn change_log() -> (
        crate::lake::store::Sink,
        crate::replication::sql::TableName,
        crate::lake::changelog::ChangeLogTable,
        LogStoreRef,
    ) {
        use deltalake::arrow::datatypes::{DataType, Field};

        let sink = crate::lake::store::Sink::open("memory://", &Default::default()).unwrap();
        let name = crate::replication::sql::TableName::parse("public.t").unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let log = crate::lake::changelog::ChangeLogTable::open(
            &sink,
            &name,
            "slotlake-s",
            &schema,
            1 << 20,
        )
        .await
        .unwrap();
        let (log_store, _, _) = sink.table_store(&sink.table_path(&["changes", "public", "t"]));
        (sink, name, log, log_store)
    }

    fn test_ctx<'a>(
        sink: &'a crate::lake::store::Sink,
        name: &'a crate::replication::sql::TableName,
        memory: &'a super::super::MemoryShare,
    ) -> Ctx<'a> {
        Ctx {
            sink,
            name,
            table: name.to_string(),
            memory,
            deletion_vectors: false,
        }
    }

    /// Commits one row of column `a` at each LSN of `lsns`.
    async fn append(log: &mut crate::lake::changelog::ChangeLogTable, lsns: std::ops::Range<u64>) {
        use deltalake::arrow::array::{Int64Array, RecordBatch};
        use deltalake::arrow::datatypes::{DataType, Field};

        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        for lsn in lsns {
            let a = Arc::new(Int64Array::from(vec![lsn as i64]));
            let batch = RecordBatch::try_new(schema.clone(), vec![a]).unwrap();
            log.write(batch).await.unwrap();
            log.commit(crate::lsn::Lsn(lsn)).await.unwrap();
        }
    }

    /// A maintenance commit lands on top of however many appends `run` made since it read the
    /// log, and gives up (a conflict) when one of them removed a file it removes.
    #[tokio::test]
    async fn maintenance_commits_step_over_appends_but_not_over_removes() {
        let (sink, name, mut log, log_store) = change_log().await;
        let base = log.version();
        append(&mut log, 100..120).await;
        let memory = super::super::MemoryShare::new(1 << 30);
        let ctx = test_ctx(&sink, &name, &memory);
        let optimize = || DeltaOperation::Optimize {
            predicate: None,
            target_size: 1,
        };
        let v = commit(&ctx, &log_store, base, Vec::new(), optimize())
            .await
            .unwrap();
        assert_eq!(v, base + 21, "on top of the 20 appends");

        // Someone removes x.parquet; a commit that removes it too, planned before, conflicts.
        let theirs = vec![Action::Remove(remove("x.parquet", 1, false))];
        commit(&ctx, &log_store, v, theirs, optimize())
            .await
            .unwrap();
        let ours = vec![Action::Remove(remove("x.parquet", 1, false))];
        let again = commit(&ctx, &log_store, v, ours, optimize()).await;
        assert!(
            matches!(again, Err(CompactError::Conflict { .. })),
            "{again:?}"
        );
    }

    /// A lite vacuum started from the pass's snapshot of the change log still deletes the
    /// files it should when `run` changed the table's schema since: its VACUUM commit from
    /// the old snapshot conflicts (`MetadataChanged`), and it is done again from the latest.
    #[tokio::test]
    async fn a_vacuum_from_a_snapshot_overtaken_by_a_schema_change_still_deletes() {
        use crate::lake::changelog::ChangeLogTable;
        use crate::lsn::Lsn;
        use deltalake::arrow::array::{Int64Array, RecordBatch};
        use deltalake::arrow::datatypes::{DataType, Field};
        use futures::TryStreamExt;

        let (sink, name, mut log, log_store) = change_log().await;
        append(&mut log, 100..102).await;
        let store = log_store.object_store(None);
        let parquet = || async {
            let mut files: Vec<(String, i64)> = store
                .list(None)
                .map_ok(|m| (m.location.to_string(), m.size as i64))
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
                .into_iter()
                .filter(|(p, _)| p.ends_with(".parquet"))
                .collect();
            files.sort();
            files
        };
        let files = parquet().await;
        assert_eq!(files.len(), 2, "{files:?}");
        let memory = super::super::MemoryShare::new(1 << 30);
        let ctx = test_ctx(&sink, &name, &memory);
        let gone = &files[0];
        let actions = vec![Action::Remove(remove(&gone.0, gone.1, false))];
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size: 1,
        };
        commit(&ctx, &log_store, log.version(), actions, operation)
            .await
            .unwrap();
        let snapshot = ctx.load_delta(&log_store, "load").await.unwrap();

        // `run` adds a column after the pass loaded the table.
        let narrow = log.schema().unwrap();
        let mut log = ChangeLogTable::open(&sink, &name, "slotlake-s", &narrow, 1 << 20)
            .await
            .unwrap();
        let wide = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            wide,
            vec![
                Arc::new(Int64Array::from(vec![7])),
                Arc::new(Int64Array::from(vec![8])),
            ],
        )
        .unwrap();
        log.write(batch).await.unwrap();
        log.commit(Lsn(200)).await.unwrap();
        let latest = ctx.load_delta(&log_store, "load").await.unwrap();
        assert!(
            latest.snapshot().unwrap().schema().field("b").is_some(),
            "the schema was widened"
        );

        let deleted = ctx
            .vacuum(
                &log_store,
                Some(&snapshot),
                std::time::Duration::ZERO,
                false,
            )
            .await
            .unwrap();
        assert_eq!(deleted, 1);
        let left = parquet().await;
        assert_eq!(left.len(), 2, "the live file and the new one: {left:?}");
        assert!(!left.contains(gone), "{left:?}");
    }

    #[test]
    fn a_commit_removing_our_files_is_recognised() {
        let ours: HashSet<String> = ["a.parquet".to_string()].into();
        let theirs = br#"{"commitInfo":{}}
{"remove":{"path":"a.parquet","dataChange":false}}
"#;
        assert!(removes_any(theirs, &ours).unwrap());
        let other = br#"{"add":{"path":"a.parquet","dataChange":true}}
{"remove":{"path":"b.parquet","dataChange":false}}
"#;
        assert!(!removes_any(other, &ours).unwrap());
    }
}
