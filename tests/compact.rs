//! Compaction and `slotlake verify` end to end on real parts: a real PostgreSQL with concurrent
//! writers, `slotlake run` into file:// and into a real S3-compatible server (moto) on
//! loopback, `slotlake compact` / background compaction, `slotlake verify` against the live
//! source, and the current tables read back with an independent reader (Python `deltalake`).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::*;

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(s.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// `acct` from the source: id → (owner, balance, sha256(note), tier).
async fn source_acct(db: &TestDb) -> BTreeMap<i64, (String, String, String, String)> {
    db.exec("SELECT id, owner, balance, encode(sha256(convert_to(note, 'UTF8')), 'hex') AS note, coalesce(tier::text, 'null') AS tier FROM acct")
        .await
        .iter()
        .map(|r| {
            (
                r.get("id").unwrap().parse().unwrap(),
                (
                    r.get("owner").unwrap_or("null").to_string(),
                    r.get("balance").unwrap_or("null").to_string(),
                    r.get("note").unwrap_or("null").to_string(),
                    r.get("tier").unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// `acct` from the lake's current table, read by Python `deltalake`.
fn lake_acct(root: &str, s3: Option<&str>) -> BTreeMap<i64, (String, String, String, String)> {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "null".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    read_delta(&format!("{root}/current/public/acct"), s3)
        .iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap(),
                (
                    text(&r["owner"]),
                    text(&r["balance"]),
                    r["note"].as_str().map_or("null".into(), sha256_hex),
                    text(&r["tier"]),
                ),
            )
        })
        .collect()
}

const SCHEMA: &str = "
    CREATE TABLE acct (id int PRIMARY KEY, owner text, balance bigint, note text);
    ALTER TABLE acct ALTER COLUMN note SET STORAGE EXTERNAL;
    CREATE TABLE kv (k text PRIMARY KEY, v int);
    CREATE TABLE events (a int, b text);
    ALTER TABLE events REPLICA IDENTITY FULL;
    CREATE TABLE quiet (id int PRIMARY KEY);
";

/// The schema, and the publication (FOR ALL TABLES needs a superuser).
async fn create_schema(db: &TestDb) {
    db.exec(SCHEMA).await;
    // verify reads the tables as slotlake's user (the database owner here).
    db.grant_select().await;
    db.publish_all("pub").await;
}

/// Inserts, updates that leave the TOASTed `note` unsent, key changes, deletes, re-inserts,
/// a truncate, an added column; `writers` connections at once.
async fn workload(db: &TestDb, rounds: usize) {
    db.exec(
        "INSERT INTO acct SELECT g, 'owner ' || g, g * 10, repeat(md5(g::text), 100) FROM generate_series(1, 3000) g;
         INSERT INTO kv SELECT 'k' || g, g FROM generate_series(1, 500) g;
         INSERT INTO events SELECT g % 50, 'e' || g FROM generate_series(1, 300) g;",
    )
    .await;
    let mut writers = Vec::new();
    for w in 0..2i64 {
        let db_url = db.admin_url();
        writers.push(tokio::spawn(async move {
            let info = slotlake::replication::ConnInfo::parse(&db_url).unwrap();
            let mut c = slotlake::replication::PgConnection::connect(&info, slotlake::replication::SessionKind::Sql)
                .await
                .unwrap();
            for r in 0..rounds as i64 {
                let base = 1 + (r * 37 + w * 500) % 2900;
                c.simple_query(&format!(
                    "BEGIN;
                     UPDATE acct SET balance = balance + 1 WHERE id BETWEEN {base} AND {base} + 40 AND id % 2 = {w};
                     UPDATE acct SET id = id + 100000 WHERE id = {base} + 41 + {w};
                     DELETE FROM acct WHERE id = {base} + 43 + {w};
                     INSERT INTO acct VALUES ({base} + 43 + {w}, 'again', -1, 'short') ON CONFLICT (id) DO NOTHING;
                     UPDATE kv SET v = v * 2 WHERE k = 'k{}';
                     UPDATE events SET b = b || '+' WHERE a = {};
                     COMMIT;",
                    1 + (r + w) % 500,
                    (r + w) % 50
                ))
                .await
                .unwrap();
            }
            c.close().await;
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    db.exec(
        "TRUNCATE kv;
         INSERT INTO kv SELECT 'k' || g, -g FROM generate_series(1, 50) g;
         ALTER TABLE acct ADD COLUMN tier int;
         UPDATE acct SET tier = id % 3 WHERE id % 5 = 0;
         DELETE FROM events WHERE a = 7;",
    )
    .await;
}

fn verify_args<'a>(
    db_url: &'a str,
    slot: &'a str,
    root: &'a str,
    s3: &'a [&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "verify",
        "--source",
        db_url,
        "--slot",
        slot,
        "--publication",
        "pub",
        "--sink",
        root,
        "--bucket-size",
        "64KiB",
        "--wait",
        "60s",
    ];
    v.extend_from_slice(s3);
    v
}

#[tokio::test]
async fn compaction_and_verify_match_the_source_on_file_and_s3() {
    let cluster = Cluster::shared();
    let s3 = s3::S3Server::shared();
    let bucket = s3.new_bucket("compact").await;
    let endpoint = s3.endpoint();
    for label in ["file", "s3"] {
        let db = cluster.create_db(&format!("compact_{label}")).await;
        create_schema(&db).await;
        let dir = tempfile::tempdir().unwrap();
        let (root, s3_flags): (String, Vec<&str>) = if label == "s3" {
            (
                format!("s3://{bucket}/lake"),
                vec!["--s3-endpoint", &endpoint, "--s3-allow-http"],
            )
        } else {
            (
                format!("file://{}", dir.path().join("lake").display()),
                Vec::new(),
            )
        };
        let s3_reader = (label == "s3").then_some(endpoint.as_str());
        let slot = format!("c_{label}");
        let log = dir.path().join("run.log");
        // On file://, compaction also runs in the background of `run`, racing verify's.
        let mut extra = s3_flags.clone();
        if label == "file" {
            extra.extend(["--compact-interval", "1s", "--bucket-size", "64KiB"]);
        } else {
            extra.extend(["--compact-interval", "0"]);
        }
        let run = start_run(&db, &slot, &root, &extra, &log).await;
        // The slot exists before the workload starts.
        caught_up(&db, &slot, &log).await;
        workload(&db, 60).await;
        caught_up(&db, &slot, &log).await;

        let db_url = db.url();
        // On S3, verify's compaction creates the tables with deletion vectors.
        let mut args = verify_args(&db_url, &slot, &root, &s3_flags);
        if label == "s3" {
            args.push("--deletion-vectors");
        }
        let (code, out, err) = run_slotlake(&args, &S3_ENV).await;
        assert_eq!(code, 0, "{label}: verify passes\n{out}\n{err}");
        if label == "s3" {
            // A few more changes (2 % of the rows, some moved to a new key), compacted by a
            // second verify: they patch buckets instead of rewriting them.
            db.exec(
                "UPDATE acct SET balance = balance + 1 WHERE id % 50 = 0;
                 UPDATE acct SET id = id + 200000 WHERE id % 500 = 7;
                 DELETE FROM acct WHERE id % 500 = 9;",
            )
            .await;
            caught_up(&db, &slot, &log).await;
            let (code, out, err) = run_slotlake(&args, &S3_ENV).await;
            assert_eq!(code, 0, "s3: verify after the patch passes\n{out}\n{err}");
        }
        for t in ["public.acct", "public.kv", "public.events", "public.quiet"] {
            assert!(
                out.lines()
                    .any(|l| l.starts_with("OK") && l.contains(&format!("{t}:"))),
                "{label}: {t} verified\n{out}"
            );
        }
        stop(run, &log).await;

        // An independent reader sees exactly the source rows in the current table.
        let want = source_acct(&db).await;
        assert!(want.len() > 2500, "{label}: the workload left rows");
        assert_eq!(lake_acct(&root, s3_reader), want, "{label}: current acct");
        let kv: BTreeMap<String, i64> = read_delta(&format!("{root}/current/public/kv"), s3_reader)
            .iter()
            .map(|r| {
                (
                    r["k"].as_str().unwrap().to_string(),
                    r["v"].as_i64().unwrap(),
                )
            })
            .collect();
        let want_kv: BTreeMap<String, i64> = db
            .exec("SELECT k, v FROM kv")
            .await
            .iter()
            .map(|r| {
                (
                    r.get("k").unwrap().to_string(),
                    r.get("v").unwrap().parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(kv, want_kv, "{label}: current kv after the truncate");
        // History as of the last LSN equals the current table; versions of acct's rows exist.
        let history = read_delta(&format!("{root}/history/public/acct"), s3_reader);
        let open_live = history
            .iter()
            .filter(|r| r["_valid_to_lsn"].is_null() && r["_deleted"] == false)
            .count();
        assert_eq!(
            open_live,
            want.len(),
            "{label}: open history versions = current rows"
        );
        // Failed now and then while `caught_up` let the workload overlap the initial snapshot
        // (a load retried from a later snapshot stamps the final rows, without their history):
        // say what the history held and what the load did.
        let by_deleted =
            |d: serde_json::Value| history.iter().filter(|r| r["_deleted"] == d).count();
        assert!(
            history.iter().any(|r| r["_deleted"] == true),
            "{label}: tombstones for deletes ({} versions: {} closed, _deleted false {} / null {}; \
             history files {:?}; run's snapshot log {:#?})",
            history.len(),
            history.iter().filter(|r| !r["_valid_to_lsn"].is_null()).count(),
            by_deleted(serde_json::Value::Bool(false)),
            by_deleted(serde_json::Value::Null),
            delta_files(&format!("{root}/history/public/acct"), s3_reader),
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("snapshot") || l.contains("backfill"))
                .collect::<Vec<_>>(),
        );

        if label == "s3" {
            // Buckets were patched: the independent reader above applied deletion vectors.
            let marked = s3::read_delta(
                &format!("{root}/current/public/acct"),
                s3_reader,
                &["--marked"],
            )
            .await;
            let marked: u64 = marked.trim().parse().expect("a count");
            assert!(
                marked > 0,
                "s3: acct's current files have rows marked deleted"
            );
        }
        if label == "file" {
            // Several buckets (64KiB each): the table is clustered, not one file.
            let files = parquet_on_disk(&dir.path().join("lake/current/public/acct"));
            assert!(
                files > 2,
                "acct is split into buckets ({files} files written)"
            );
            corrupt_and_verify_fails(&db, &slot, &root, dir.path()).await;
        }
    }
}

/// A row edited in a lake file, then a file removed: verify fails and names the table.
async fn corrupt_and_verify_fails(db: &TestDb, slot: &str, root: &str, dir: &Path) {
    let lake = dir.join("lake");
    // Edit one row of acct's history: the open version of some key gets another balance.
    let script = r#"
import sys, glob, pyarrow.parquet as pq, pyarrow as pa, pyarrow.compute as pc
from deltalake import DeltaTable
# Only files the table references (replaced ones stay on disk until vacuumed).
files = sorted((u[len("file://"):] if u.startswith("file://") else u) for u in DeltaTable(sys.argv[1] + "/history/public/acct").file_uris() if "/open-" in u)
for f in files:
    t = pq.read_table(f)
    if t.num_rows == 0:
        continue
    bal = t.column("balance").to_pylist()
    deleted = t.column("_deleted").to_pylist()
    i = next(i for i in range(len(bal)) if not deleted[i])
    bal[i] = (bal[i] or 0) + 7
    t = t.set_column(t.schema.get_field_index("balance"), t.schema.field("balance"), pa.array(bal, pa.int64()))
    pq.write_table(t, f + ".tmp")
    import os; os.replace(f + ".tmp", f)
    print(t.column("id")[i].as_py())
    break
"#;
    let out = std::process::Command::new(s3::venv_dir().join("bin/python"))
        .args(["-c", script, lake.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let edited_key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!edited_key.is_empty(), "a row was edited");

    // Verify needs a running slot consumer to pass its snapshot point.
    let log = dir.join("run2.log");
    let run = start_run(db, slot, root, &["--compact-interval", "0"], &log).await;
    let db_url = db.url();
    let args = verify_args(&db_url, slot, root, &[]);
    let (code, out, err) = run_slotlake(&args, &[]).await;
    assert_eq!(code, 6, "verify fails on an edited row\n{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.contains("public.acct:"))
        .unwrap_or_default();
    assert!(line.starts_with("FAIL"), "acct named as failing: {out}");
    assert!(
        out.contains(&format!("({edited_key})")),
        "the edited key {edited_key} is named: {out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("OK") && l.contains("public.kv:")),
        "kv still fine: {out}"
    );

    // Remove a data file of kv's current table.
    let kv_dir = lake.join("current/public/kv");
    let victim = std::fs::read_dir(&kv_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "parquet"))
        .expect("a kv file");
    // Only the file the Delta log references counts: remove them all to be sure.
    for e in std::fs::read_dir(&kv_dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "parquet") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let _ = victim;
    let (code, out, err) = run_slotlake(&args, &[]).await;
    assert_eq!(code, 6, "verify fails on a removed file\n{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.contains("public.kv:"))
        .unwrap_or_default();
    assert!(line.starts_with("FAIL"), "kv named as failing: {out}");
    stop(run, &log).await;
}

/// `slotlake compact` killed with SIGKILL at random points, re-run each time: the tables end
/// identical to a clean compaction of the same change logs, and a further run changes nothing.
#[tokio::test]
async fn kill_nine_during_compaction_then_rerun_gives_identical_tables() {
    kill_nine_during_compaction(false).await;
}

/// The same with deletion vectors: the small steps patch buckets, and kills land between a
/// step's history and current commits, whose deletion vectors the re-run repairs.
#[tokio::test]
async fn kill_nine_during_compaction_with_deletion_vectors_gives_identical_tables() {
    kill_nine_during_compaction(true).await;
}

async fn kill_nine_during_compaction(dv: bool) {
    let cluster = Cluster::shared();
    let db = cluster
        .create_db(if dv {
            "compact_kill_dv"
        } else {
            "compact_kill"
        })
        .await;
    create_schema(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let root = format!("file://{}", lake.display());
    let slot = if dv { "c_kill_dv" } else { "c_kill" };
    let log = dir.path().join("run.log");
    let run = start_run(&db, slot, &root, &["--compact-interval", "0"], &log).await;
    caught_up(&db, slot, &log).await;
    workload(&db, 120).await;
    caught_up(&db, slot, &log).await;
    stop(run, &log).await;

    // The reference: a copy of the change logs, compacted without interruption.
    let reference = dir.path().join("reference");
    copy_dir(&lake.join("changes"), &reference.join("changes"));
    let reference_root = format!("file://{}", reference.display());
    // Small steps and buckets: many commits, so kills land between and inside them.
    let mut tuning = vec!["--compact-memory", "256KiB", "--bucket-size", "32KiB"];
    if dv {
        tuning.push("--deletion-vectors");
    }
    let started = std::time::Instant::now();
    let (code, out, err) = run_slotlake(
        &[
            &["compact", "--sink", &reference_root, "--format", "json"][..],
            &tuning,
        ]
        .concat(),
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let clean = started.elapsed();
    // Some steps carry their work to the next, so kills land inside such runs of steps too.
    let (steps, commits) = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .fold((0, 0), |(s, c), r| {
            (
                s + r["steps"].as_u64().unwrap_or(0),
                c + r["commits"].as_u64().unwrap_or(0),
            )
        });
    assert!(
        commits > 1 && commits < steps,
        "{commits} commits of {steps} steps: {out}"
    );

    let mut interrupted = 0;
    let mut attempts = 0;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64;
    while interrupted < 10 {
        attempts += 1;
        assert!(attempts < 200, "could not interrupt compaction 10 times");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % (clean.as_micros() as u64).max(1));
        let mut child = tokio::process::Command::new(slotlake_bin())
            .args(["compact", "--sink", &root])
            .args(&tuning)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::sleep(delay).await;
        if child.try_wait().unwrap().is_none() {
            child.kill().await.unwrap();
            interrupted += 1;
        } else if interrupted < 10 {
            // It finished: start over from the change logs alone, to interrupt again.
            for kind in ["current", "history"] {
                let _ = std::fs::remove_dir_all(lake.join(kind));
            }
        }
    }
    let (code, out, err) =
        run_slotlake(&[&["compact", "--sink", &root][..], &tuning].concat(), &[]).await;
    assert_eq!(code, 0, "the re-run completes\n{out}\n{err}");

    // Vacuum with no retention: the reference keeps exactly the files its logs reference (the
    // comparison below then shows nothing live was deleted).
    let (code, out, err) = run_slotlake(
        &[
            &[
                "compact",
                "--sink",
                &reference_root,
                "--vacuum-retention",
                "0s",
            ][..],
            &tuning,
        ]
        .concat(),
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    for kind in ["current", "history"] {
        let table = reference.join(kind).join("public/acct");
        let on_disk = parquet_on_disk(&table);
        let active = delta_files(table.to_str().unwrap(), None).len();
        assert_eq!(
            on_disk, active,
            "{kind}: replaced files vacuumed, live ones kept"
        );
    }
    if dv {
        for kind in ["current", "history"] {
            let table = format!("{reference_root}/{kind}/public/acct");
            let marked = s3::read_delta(&table, None, &["--marked"]).await;
            assert!(
                marked.trim().parse::<u64>().expect("a count") > 0,
                "{kind}: buckets were patched"
            );
        }
    }
    for kind in ["current", "history"] {
        for t in ["acct", "kv", "events"] {
            let got = read_delta(&format!("{root}/{kind}/public/{t}"), None);
            let want = read_delta(&format!("{reference_root}/{kind}/public/{t}"), None);
            assert!(!want.is_empty(), "{kind} {t} has rows");
            assert_eq!(got, want, "{kind} table of {t} after {interrupted} kills");
        }
    }
    // Once more: nothing to do, nothing committed.
    let versions = |kind: &str| {
        std::fs::read_dir(lake.join(kind).join("public/acct/_delta_log"))
            .unwrap()
            .count()
    };
    let before = (versions("current"), versions("history"));
    let (code, out, _) = run_slotlake(&["compact", "--sink", &root, "--format", "json"], &[]).await;
    assert_eq!(code, 0);
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["changes"], 0, "a second run does nothing: {line}");
    }
    assert_eq!(
        (versions("current"), versions("history")),
        before,
        "no new commits"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A change-log commit larger than the compaction memory (a table's initial load written as
/// several files) is compacted a few files at a time, with the same result as in one step.
#[tokio::test]
async fn a_commit_larger_than_the_memory_budget_is_compacted_in_parts() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("compact_parts").await;
    db.exec(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 200000) g;",
    )
    .await;
    db.grant_select().await;
    db.publish_all("pub").await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let root = format!("file://{}", lake.display());
    let log = dir.path().join("run.log");
    let run = start_run(
        &db,
        "c_parts",
        &root,
        &["--compact-interval", "0", "--target-file-size", "256KiB"],
        &log,
    )
    .await;
    caught_up(&db, "c_parts", &log).await;
    db.exec("UPDATE big SET v = 'updated' WHERE id % 1000 = 0")
        .await;
    caught_up(&db, "c_parts", &log).await;
    stop(run, &log).await;

    let reference = dir.path().join("reference");
    copy_dir(&lake.join("changes"), &reference.join("changes"));
    let reference_root = format!("file://{}", reference.display());
    let (code, out, err) = run_slotlake(&["compact", "--sink", &reference_root], &[]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let report = compact_report(&root, "public.big", &["--compact-memory", "1MiB"]).await;
    assert!(
        report["steps"].as_u64().unwrap() > 2,
        "the load's commit is taken in parts: {report}"
    );
    for kind in ["current", "history"] {
        let got = read_delta(&format!("{root}/{kind}/public/big"), None);
        let want = read_delta(&format!("{reference_root}/{kind}/public/big"), None);
        assert_eq!(got.len(), want.len(), "{kind} rows");
        assert!(
            got == want,
            "{kind} table compacted in parts equals one step"
        );
    }
}

/// Parquet files on disk directly under `dir`.
fn parquet_on_disk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".parquet")
        })
        .count()
}

/// (inserts, updates) in a change log, after checking that no (`_lsn`, `_seq`) repeats.
fn change_counts(rows: &[serde_json::Value]) -> (usize, usize) {
    let ids: std::collections::HashSet<(String, i64)> = rows
        .iter()
        .map(|r| (r["_lsn"].to_string(), r["_seq"].as_i64().unwrap()))
        .collect();
    assert_eq!(ids.len(), rows.len(), "every change once");
    let ops = |op: &str| rows.iter().filter(|r| r["_op"] == op).count();
    (ops("I"), ops("U"))
}

/// Change-log maintenance after compaction: small files merged (rows unchanged, merged inputs
/// deleted by vacuum), then merged in the background while `run` keeps committing, then every
/// compacted file expired by `--changes-retention` — and the current table stays exact, and
/// streaming and compaction go on after each.
#[tokio::test]
async fn change_log_optimize_and_retention_keep_the_lake_exact() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("changes_maint").await;
    create_schema(&db).await;
    db.exec("ALTER TABLE acct ADD COLUMN tier int").await;
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().join("lake").display());
    let on_disk = dir.path().join("lake/changes/public/acct");
    let changes = format!("{root}/changes/public/acct");
    let slot = "maint";
    let log = dir.path().join("run.log");
    let db_url = db.url();

    // 1. One small change-log file per round: the slot confirms each round before the next.
    let run = start_run(&db, slot, &root, &["--compact-interval", "0"], &log).await;
    caught_up(&db, slot, &log).await;
    db.exec("INSERT INTO acct SELECT g, 'o', g, 'n' FROM generate_series(1, 200) g")
        .await;
    let mut updates = 0;
    for r in 0..20 {
        db.exec(&format!(
            "UPDATE acct SET balance = balance + 1 WHERE id % 20 = {r}"
        ))
        .await;
        updates += 10;
        caught_up(&db, slot, &log).await;
    }
    stop(run, &log).await;
    let before_rows = read_delta(&changes, None);
    assert_eq!(change_counts(&before_rows), (200, updates));
    let before_files = delta_files(&changes, None);
    assert!(before_files.len() >= 16, "{} files", before_files.len());

    // `--optimize-file-size 0` compacts and merges nothing (and `--interval 0` runs once: the
    // report comes back).
    let r = compact_report(
        &root,
        "public.acct",
        &["--optimize-file-size", "0", "--interval", "0"],
    )
    .await;
    assert_eq!(r["changelog_files_merged"], 0, "{r}");
    assert!(r["changes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(delta_files(&changes, None).len(), before_files.len());

    let r = compact_report(&root, "public.acct", &["--vacuum-retention", "0s"]).await;
    let merged = r["changelog_files_merged"].as_u64().unwrap() as usize;
    let written = r["changelog_files_written"].as_u64().unwrap() as usize;
    assert!(merged >= 16 && written >= 2 && written < merged, "{r}");
    let after_files = delta_files(&changes, None);
    assert_eq!(after_files.len(), before_files.len() - merged + written);
    assert_eq!(
        read_delta(&changes, None),
        before_rows,
        "optimize keeps every change, once"
    );
    assert_eq!(
        parquet_on_disk(&on_disk),
        after_files.len(),
        "the merged files are vacuumed from storage"
    );
    assert_eq!(lake_acct(&root, None), source_acct(&db).await);

    // 2. Background compaction merges change-log files while `run` commits to them.
    let run = start_run(
        &db,
        slot,
        &root,
        &["--compact-interval", "300ms", "--vacuum-retention", "0s"],
        &log,
    )
    .await;
    for r in 0..30 {
        db.exec(&format!(
            "UPDATE acct SET balance = balance + 1 WHERE id % 20 = {}",
            r % 20
        ))
        .await;
        updates += 10;
        caught_up(&db, slot, &log).await;
    }
    let args = verify_args(&db_url, slot, &root, &[]);
    let (code, out, err) = run_slotlake(&args, &[]).await;
    assert_eq!(code, 0, "verify passes\n{out}\n{err}");
    stop(run, &log).await;
    assert_eq!(change_counts(&read_delta(&changes, None)), (200, updates));
    // 30 more commits, at least one group of 8 merged into one while running.
    let running_files = delta_files(&changes, None).len();
    assert!(
        running_files <= after_files.len() + 30 - 7,
        "merged while running: {running_files} files"
    );

    // 3. Retention: every compacted change-log file leaves the log and storage.
    let r = compact_report(
        &root,
        "public.acct",
        &["--changes-retention", "0s", "--vacuum-retention", "0s"],
    )
    .await;
    assert!(r["changelog_files_expired"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(delta_files(&changes, None), Vec::<String>::new());
    assert_eq!(parquet_on_disk(&on_disk), 0, "expired files vacuumed");
    assert_eq!(lake_acct(&root, None), source_acct(&db).await);

    // Streaming and compaction carry on after the change log was emptied.
    let run = start_run(&db, slot, &root, &["--compact-interval", "0"], &log).await;
    db.exec("UPDATE acct SET balance = balance * 2 WHERE id <= 15; INSERT INTO acct VALUES (999, 'new', 1, 'x')")
        .await;
    caught_up(&db, slot, &log).await;
    let (code, out, err) = run_slotlake(&args, &[]).await;
    assert_eq!(code, 0, "verify passes after retention\n{out}\n{err}");
    stop(run, &log).await;
    assert_eq!(change_counts(&read_delta(&changes, None)), (1, 15));
    assert_eq!(lake_acct(&root, None), source_acct(&db).await);
}
