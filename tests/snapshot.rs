//! The initial snapshot end to end on real parts: tables with rows before the slot, concurrent
//! writers during the load, parallel chunked reads, `kill -9` during the load and resume; the
//! lake is then checked against the live source with `slotlake verify`.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// `big` with `big_rows` rows, six `mid_*` tables of 20,000, `small`, and an empty table,
/// filled before any slot exists; the publication; SELECT for slotlake's role (verify).
async fn create_tables(db: &TestDb, big_rows: u64) {
    let mut sql = format!(
        "CREATE TABLE big (id int PRIMARY KEY, v text, n bigint);
         INSERT INTO big SELECT g, 'v' || g, g * 3 FROM generate_series(1, {big_rows}) g;
         CREATE TABLE small (k text PRIMARY KEY, v int);
         INSERT INTO small SELECT 'k' || g, g FROM generate_series(1, 1000) g;
         CREATE TABLE empty_t (id int PRIMARY KEY);"
    );
    for i in 0..6 {
        sql.push_str(&format!(
            "CREATE TABLE mid_{i} (id int PRIMARY KEY, v text);
             INSERT INTO mid_{i} SELECT g, md5(g::text) FROM generate_series(1, 20000) g;"
        ));
    }
    db.exec(&sql).await;
    db.grant_select().await;
    db.publish_all("pub").await;
}

/// A writer running `round_sql(round)` in a loop until `stop` is set; `rounds` counts the
/// committed rounds. Returns the number of rounds.
fn start_writer(
    db: &TestDb,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    round_sql: fn(u64) -> String,
) -> tokio::task::JoinHandle<u64> {
    let url = db.admin_url();
    tokio::spawn(async move {
        let info = slotlake::replication::ConnInfo::parse(&url).unwrap();
        let mut c = slotlake::replication::PgConnection::connect(
            &info,
            slotlake::replication::SessionKind::Sql,
        )
        .await
        .unwrap();
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            c.simple_query(&round_sql(round)).await.unwrap();
            round += 1;
            rounds.store(round, Ordering::Relaxed);
        }
        c.close().await;
        round
    })
}

/// Writers changing `big`, `small` and `mid_0` until `stop` is set: updates, deletes,
/// inserts, one transaction after the other.
fn start_writers(db: &TestDb, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    start_writer(db, stop, Arc::new(AtomicU64::new(0)), |round| {
        let id = 1 + (round * 7919) % 20000;
        format!(
            "BEGIN;
             UPDATE big SET n = n + 1, v = 'w{round}' WHERE id = {id};
             DELETE FROM big WHERE id = {id} + 1;
             INSERT INTO big VALUES (2000000 + {round}, 'new', 0);
             UPDATE small SET v = v + 1 WHERE k = 'k{}';
             UPDATE mid_0 SET v = 'changed' WHERE id = {id};
             COMMIT;",
            1 + round % 1000
        )
    })
}

/// A temporary directory holding a file:// lake (`root`) and the run's log.
fn file_lake() -> (tempfile::TempDir, String, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().join("lake").display());
    let log = dir.path().join("run.log");
    (dir, root, log)
}

async fn wait_for_log(log: &Path, needle: &str, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle:?} in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn verify_ok(db: &TestDb, slot: &str, root: &str, tables: &[&str]) {
    verify_ok_with(db, slot, root, tables, &[]).await
}

/// `verify_ok` with extra flags (an S3 sink's).
async fn verify_ok_with(db: &TestDb, slot: &str, root: &str, tables: &[&str], extra: &[&str]) {
    let url = db.url();
    let args = [
        "verify",
        "--source",
        &url,
        "--slot",
        slot,
        "--publication",
        "pub",
        "--sink",
        root,
        "--wait",
        "60s",
    ];
    let (code, out, err) = run_slotlake(&[&args[..], extra].concat(), &S3_ENV).await;
    assert_eq!(code, 0, "verify passes\n{out}\n{err}");
    for t in tables {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("public.{t}:")))
            .unwrap_or_default();
        assert!(line.starts_with("OK"), "{t} verified: {out}");
    }
}

#[tokio::test]
async fn initial_snapshot_in_parallel_chunks_with_concurrent_writers_equals_the_source() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("snapshot").await;
    create_tables(&db, 1_000_000).await;
    let (_dir, root, log) = file_lake();
    let stop_writers = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&db, stop_writers.clone());
    let run = start_run(
        &db,
        "s_par",
        &root,
        &[
            "--snapshot-workers",
            "4",
            "--snapshot-chunk-size",
            "8MiB",
            "--compact-interval",
            "0",
        ],
        &log,
    )
    .await;
    wait_for_log(&log, "initial snapshot: done", 300).await;
    stop_writers.store(true, Ordering::Relaxed);
    let rounds = writers.await.unwrap();
    assert!(rounds > 0, "the writers ran during the load");
    caught_up(&db, "s_par", &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let loading = text
        .lines()
        .find(|l| l.contains("initial snapshot: loading"))
        .unwrap();
    let chunks: u64 = loading
        .split_whitespace()
        .find_map(|f| f.strip_prefix("chunks="))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        chunks >= 8,
        "the 1M-row table is split for 4 workers: {loading}"
    );
    // Progress: every table's line says how far the load is; the last one, all of it.
    let text = std::fs::read_to_string(&log).unwrap();
    let percents: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("initial snapshot: table loaded"))
        .map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("percent="))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no percent in {l}"))
        })
        .collect();
    assert_eq!(percents.len(), 9, "one line per table");
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");
    assert_eq!(percents.last(), Some(&100));
    verify_ok(
        &db,
        "s_par",
        &root,
        &["big", "small", "empty_t", "mid_0", "mid_5"],
    )
    .await;
    stop(run, &log).await;
}

#[tokio::test]
async fn kill_nine_during_the_initial_snapshot_resumes_and_loses_nothing() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("snapshot_kill").await;
    create_tables(&db, 600_000).await;
    let (dir, root, log) = file_lake();
    let stop_writers = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&db, stop_writers.clone());
    let args = [
        "--snapshot-workers",
        "2",
        "--snapshot-chunk-size",
        "1MiB",
        "--compact-interval",
        "0",
    ];
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id());
    let mut kills = 0;
    let loading = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("initial snapshot: loading")
            .count()
    };
    // Chunk commits of the load so far, in every table's change log.
    let lake = dir.path().join("lake/changes/public");
    let chunk_commits = move || {
        let logs = std::fs::read_dir(&lake).into_iter().flatten().flatten();
        logs.flat_map(|t| {
            std::fs::read_dir(t.path().join("_delta_log"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .filter(|e| {
            e.path().extension().is_some_and(|x| x == "json")
                && std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("-load-"))
        })
        .count()
    };
    while kills < 10 {
        // Each kill lands a random time after this attempt started reading — every other one
        // after it committed a chunk, so that the load makes progress however slow the
        // machine is, and not so long after that it finishes before the tenth kill.
        let started = loading(&log);
        let committed = chunk_commits();
        let mut run = start_run(&db, "s_kill", &root, &args, &log).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while loading(&log) == started || (kills % 2 == 1 && chunk_commits() == committed) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no load started or no chunk committed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = if kills % 2 == 1 {
            seed % 100
        } else {
            20 + seed % 300
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !text.contains("initial snapshot: done"),
            "the load finished before 10 kills; make it larger\n{text}"
        );
        run.kill().await.unwrap();
        kills += 1;
    }
    let run = start_run(&db, "s_kill", &root, &args, &log).await;
    wait_for_log(&log, "initial snapshot: done", 300).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("resuming an interrupted initial snapshot"),
        "a load was resumed:\n{text}"
    );
    assert!(
        text.contains("resuming a table from its first unfinished chunk"),
        "a table's load went on from a committed chunk:\n{text}"
    );
    stop_writers.store(true, Ordering::Relaxed);
    writers.await.unwrap();
    caught_up(&db, "s_kill", &log).await;
    verify_ok(
        &db,
        "s_kill",
        &root,
        &["big", "small", "empty_t", "mid_0", "mid_3"],
    )
    .await;
    stop(run, &log).await;
}

/// A load killed after its first chunk committed goes on from the second after a restart —
/// while rows moved between chunks meanwhile: updates that leave a TOASTed value out moved
/// rows of the unread chunks into the committed one, and `VACUUM FREEZE` froze them.
#[tokio::test]
async fn a_resumed_load_reads_only_unfinished_chunks_and_the_rows_that_moved() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("snapshot_chunks").await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, n int, doc text);
         ALTER TABLE t ALTER COLUMN doc SET STORAGE EXTERNAL;
         ALTER TABLE t SET (autovacuum_enabled = off);
         INSERT INTO t SELECT g, 0, repeat(md5(g::text), 80) FROM generate_series(1, 6000) g;
         CREATE FUNCTION page_gate(tid) RETURNS bool LANGUAGE plpgsql AS
           $$ BEGIN
                IF ($1::text::point)[0] >= 8 THEN PERFORM pg_advisory_xact_lock_shared(4343); END IF;
                RETURN true;
              END $$;
         ALTER TABLE t ENABLE ROW LEVEL SECURITY;
         CREATE POLICY gate ON t USING (page_gate(ctid));",
    )
    .await;
    db.grant_select().await;
    db.publish_all("pub").await;
    let pages = db.int("SELECT pg_relation_size('t') / 8192 AS v").await;
    assert!(pages > 24, "several 8-page chunks: {pages} pages");
    // Slotlake's reads of pages 8 and above wait while this session holds the lock.
    let mut gate = db.admin().await;
    gate.simple_query("SELECT pg_advisory_lock(4343)")
        .await
        .unwrap();
    let (dir, root, log) = file_lake();
    let args = [
        "--snapshot-workers",
        "1",
        "--snapshot-chunk-size",
        "64KiB",
        "--compact-interval",
        "0",
    ];
    let mut run = start_run(&db, "s_chunks", &root, &args, &log).await;
    // The first chunk (pages 0–7) commits; the second waits at the gate.
    let delta_log = dir.path().join("lake/changes/public/t/_delta_log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !std::fs::read_dir(&delta_log)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            // Commits only: object_store writes the entry to a temporary name first.
            e.path().extension().is_some_and(|x| x == "json")
                && std::fs::read_to_string(e.path())
                    .is_ok_and(|t| t.contains("\"appId\":\"slotlake-s_chunks-load-"))
        })
    {
        assert!(tokio::time::Instant::now() < deadline, "no chunk committed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run.kill().await.unwrap();
    run.wait().await.unwrap();
    // Compaction leaves the chunks of an unfinished load alone: the current table is not
    // published half loaded.
    let (code, out, err) = run_slotlake(&["compact", "--sink", &root], &[]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("public.t: 0 changes") && out.contains("initial load in progress"),
        "{out}"
    );
    // The killed process's reader still waits at the gate, holding its snapshot (which would
    // keep VACUUM from freeing anything) until it next writes to the dead socket: end it.
    db.exec(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
          WHERE pid <> pg_backend_pid() AND usename =
            (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database())",
    )
    .await;
    // Meanwhile: room in the committed pages, then updates of `n` only (the TOASTed `doc` is
    // left out of their WAL) that move rows of unread pages into it; inserts and deletes.
    db.exec("DELETE FROM t WHERE id <= 700").await;
    db.exec("VACUUM t").await;
    db.exec(
        "UPDATE t SET n = 1 WHERE id > 5000;
         INSERT INTO t SELECT g, 2, repeat(md5(g::text), 80) FROM generate_series(7001, 7100) g;
         DELETE FROM t WHERE id BETWEEN 3000 AND 3050;",
    )
    .await;
    // Rows of unread pages whose key changes twice, or three times after the update of `n`,
    // with `doc` left out each time: the lake never had their first keys.
    db.exec("UPDATE t SET id = id + 10000 WHERE id IN (4000, 4001, 5990, 5991)")
        .await;
    db.exec("UPDATE t SET id = id + 10000 WHERE id > 10000")
        .await;
    // Key reuse, `doc` left out each time: a row of the committed chunk gives up its key, and
    // a row of an unread chunk takes it. The replayed updates alone would move the wrong
    // `doc` (or none) around: only the rows as read after the restart can tell.
    let reused = db
        .int("SELECT min(id) AS v FROM t WHERE (ctid::text::point)[0] < 8 AND id < 3000")
        .await;
    let taker = db
        .int("SELECT count(*) AS v FROM t WHERE id = 4500 AND (ctid::text::point)[0] >= 8")
        .await;
    assert_eq!(taker, 1, "row 4500 is in an unread chunk");
    // The first run stops at the end of a transaction of its own (a logical message) past
    // this point, before the key reuse, whatever other WAL comes in between.
    let before_reuse = db.wal_insert_lsn().await;
    db.exec("SELECT pg_logical_emit_message(true, 'slotlake-test', 'split')")
        .await;
    db.exec(&format!(
        "UPDATE t SET id = 30000 + id, n = 3 WHERE id = {reused};
         UPDATE t SET id = {reused}, n = 4 WHERE id = 4500;"
    ))
    .await;
    db.exec("VACUUM FREEZE t").await;
    let moved = db
        .int("SELECT count(*) AS v FROM t WHERE id > 5000 AND (ctid::text::point)[0] < 8")
        .await;
    assert!(moved > 0, "updated rows moved into the committed chunk");
    db.exec("DROP POLICY gate ON t; ALTER TABLE t DISABLE ROW LEVEL SECURITY;")
        .await;
    gate.simple_query("SELECT pg_advisory_unlock(4343)")
        .await
        .unwrap();
    // The resumed run streams only up to the key-reuse updates, and a compaction runs then:
    // their replays come in a later compaction step than the load's rows.
    let stop_at = before_reuse.to_string();
    let stop_at = ["--stop-at", stop_at.as_str()];
    let mut first = start_run(
        &db,
        "s_chunks",
        &root,
        &[&args[..], &stop_at[..]].concat(),
        &log,
    )
    .await;
    let status = tokio::time::timeout(Duration::from_secs(120), first.wait())
        .await
        .expect("the run stops at --stop-at")
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // It stopped before the key reuse, and the copies (at C2 − 1) are not committed yet.
    let table_dir = dir.path().join("lake/changes/public/t");
    let highest =
        |versions: &[Vec<(String, i64)>]| versions.iter().flatten().map(|(_, lsn)| *lsn).max();
    let before = highest(&rows_per_version(&table_dir));
    assert!(
        before.is_some_and(|l| l < before_reuse.0 as i64),
        "the first run committed up to {before:?}, past {before_reuse}"
    );
    let (code, out, err) = run_slotlake(&["compact", "--sink", &root], &[]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let run = start_run(&db, "s_chunks", &root, &args, &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let resumed = text
        .lines()
        .find(|l| l.contains("resuming a table from its first unfinished chunk"))
        .unwrap_or_else(|| panic!("the table's load went on:\n{text}"));
    assert!(resumed.contains("chunks_done=1"), "{resumed}");
    // The restart read the unread pages and the rows written since into the read ones: not
    // the rows of the committed chunk that stayed put.
    let rows_read: i64 = text
        .lines()
        .rfind(|l| l.contains("initial snapshot: done"))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("rows=")))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let total = db.int("SELECT count(*) AS v FROM t").await;
    let unread = db
        .int("SELECT count(*) AS v FROM t WHERE (ctid::text::point)[0] >= 8")
        .await;
    assert!(
        rows_read >= unread + moved && rows_read < total,
        "read {rows_read} rows again; {unread} in unread pages, {moved} moved, {total} in all"
    );
    caught_up(&db, "s_chunks", &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("committed the rows a resumed initial load read again"),
        "{text}"
    );
    verify_ok(&db, "s_chunks", &root, &["t"]).await;
    stop(run, &log).await;
}

/// Stored generated columns: on PostgreSQL ≥ 18 a publication with `publish_generated_columns
/// = stored` streams them, and the snapshot reads them too; otherwise neither has them. Either
/// way the loaded rows and the streamed ones have the same columns. (`scripts/test.sh` runs
/// this on 18 as well as on 15.)
#[tokio::test]
async fn generated_columns_are_in_the_snapshot_exactly_when_published() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("snapshot_generated").await;
    let version = db
        .int("SELECT current_setting('server_version_num')::int AS v")
        .await;
    let published = version >= 180_000;
    db.exec(
        "CREATE TABLE g (id int PRIMARY KEY, a int, twice int GENERATED ALWAYS AS (a * 2) STORED);
         INSERT INTO g SELECT x, x FROM generate_series(1, 1000) x;",
    )
    .await;
    db.grant_select().await;
    if published {
        db.exec("CREATE PUBLICATION pub FOR ALL TABLES WITH (publish_generated_columns = stored)")
            .await;
    } else {
        db.publish_all("pub").await;
    }
    let (_dir, root, log) = file_lake();
    let run = start_run(&db, "s_gen", &root, &["--compact-interval", "0"], &log).await;
    wait_for_log(&log, "initial snapshot: done", 120).await;
    db.exec(
        "INSERT INTO g SELECT x, x FROM generate_series(1001, 1100) x;
         UPDATE g SET a = a + 1 WHERE id <= 10;",
    )
    .await;
    caught_up(&db, "s_gen", &log).await;
    verify_ok(&db, "s_gen", &root, &["g"]).await;
    let rows = read_delta(&format!("{root}/current/public/g"), None);
    assert_eq!(rows.len(), 1100);
    for row in &rows {
        if published {
            assert_eq!(
                row["twice"].as_i64(),
                row["a"].as_i64().map(|a| a * 2),
                "loaded and streamed rows carry the generated column: {row}"
            );
        } else {
            assert!(row.get("twice").is_none(), "not published: {row}");
        }
    }
    stop(run, &log).await;
}

/// The sink unreachable in the middle of the initial load: `run` waits it out and goes on from
/// the committed chunks, in the same process and in the same snapshot — nothing lost, nothing
/// loaded twice, and the changes made meanwhile are in the change log as changes on top of the
/// rows as they were at the slot's start (a newer snapshot would have folded them in).
// Multi-threaded: the proxy's tasks must run while the test waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_during_the_initial_snapshot_is_waited_out_in_the_same_snapshot() {
    s3_outage_during_the_load("snapshot_outage", Meanwhile::Nothing).await;
}

/// As above, but the session that exported the snapshot dies during the outage (a source
/// restart would do that): the next attempt notices and goes on from a new snapshot, still
/// losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_whose_snapshot_died_during_an_s3_outage_goes_on_from_a_new_one() {
    s3_outage_during_the_load("snapshot_outage_lost", Meanwhile::ExporterDies).await;
}

/// As above, but the table the load stopped at is rewritten during the outage (a rewriting
/// ALTER TABLE: the old snapshot would read it as empty): the next attempt notices and reads
/// it from a new snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_rewritten_during_an_s3_outage_is_read_from_a_new_snapshot() {
    s3_outage_during_the_load("snapshot_outage_rewrite", Meanwhile::TableRewritten).await;
}

/// What happens on the source while the sink is down, besides changes to `small`.
#[derive(PartialEq)]
enum Meanwhile {
    Nothing,
    /// The session that exported the snapshot is terminated.
    ExporterDies,
    /// `small` gets a new relfilenode (ADD COLUMN with a volatile default rewrites it).
    TableRewritten,
}

async fn s3_outage_during_the_load(label: &str, meanwhile: Meanwhile) {
    let cluster = Cluster::shared();
    let s3 = s3::S3Server::shared();
    let bucket = s3.new_bucket(label).await;
    let proxy = s3::TcpProxy::start(s3.addr());
    let endpoint = proxy.endpoint();
    let db = cluster.create_db(label).await;
    create_tables(&db, 100_000).await;
    // The load stops at `small`, the last table, until the gate opens.
    let gate = close_gate(&db, "small").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.log");
    let root = format!("s3://{bucket}/lake");
    let s3_flags = ["--s3-endpoint", &endpoint, "--s3-allow-http"];
    let args = [
        &s3_flags[..],
        &[
            "--snapshot-workers",
            "1",
            "--snapshot-chunk-size",
            "1MiB",
            "--compact-interval",
            "0",
        ],
    ]
    .concat();
    let slot = label;
    let run = start_run(&db, slot, &root, &args, &log).await;
    wait_for_log(&log, "table loaded table=public.mid_5", 120).await;
    proxy.set_down(true);
    gate.close().await;
    wait_for_log(&log, "the initial snapshot failed", 180).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("initial snapshot: done"), "{text}");
    // Changes to `small`, which the failed attempt had read but not committed.
    db.exec(
        "UPDATE small SET v = -v WHERE v <= 50;
         DELETE FROM small WHERE k = 'k100';
         INSERT INTO small VALUES ('knew', 7);",
    )
    .await;
    if meanwhile == Meanwhile::TableRewritten {
        db.exec("ALTER TABLE small ADD COLUMN w int DEFAULT (random() * 0)::int")
            .await;
    }
    if meanwhile == Meanwhile::ExporterDies {
        // Before streaming starts, the database's only walsender is the exporting session.
        let killed = db
            .int(
                "SELECT count(pg_terminate_backend(pid)) AS v FROM pg_stat_activity
                 WHERE backend_type = 'walsender' AND datname = current_database()",
            )
            .await;
        assert_eq!(killed, 1, "the exporting session");
    }
    proxy.set_down(false);
    wait_for_log(&log, "initial snapshot: done", 180).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let loading: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("initial snapshot: loading"))
        .collect();
    let resumed = loading.last().unwrap();
    assert!(
        resumed.contains("skipped=8"),
        "the loaded tables were not read again: {resumed}"
    );
    let snapshot_lsn = |line: &str| {
        let at = line
            .find("snapshot_lsn=")
            .expect("snapshot_lsn in the line");
        line[at..].split_whitespace().next().unwrap().to_string()
    };
    let same = snapshot_lsn(loading[0]) == snapshot_lsn(resumed);
    assert_eq!(
        same,
        meanwhile == Meanwhile::Nothing,
        "snapshot of the first and the last attempt:\n{}\n{resumed}",
        loading[0]
    );
    assert_eq!(
        text.contains("the snapshot of the failed attempt is gone"),
        meanwhile == Meanwhile::ExporterDies,
        "{text}"
    );
    assert_eq!(
        text.contains("public.small was rewritten"),
        meanwhile == Meanwhile::TableRewritten,
        "{text}"
    );
    caught_up(&db, slot, &log).await;
    verify_ok_with(&db, slot, &root, &["big", "small", "mid_5"], &s3_flags).await;
    if meanwhile == Meanwhile::Nothing {
        // `small` as of the slot's start, then the changes made during the outage on top.
        let changes = read_delta(&format!("{root}/changes/public/small"), Some(&endpoint));
        let count = |op: &str| changes.iter().filter(|r| r["_op"] == op).count();
        assert_eq!(
            (count("R"), count("U"), count("D"), count("I")),
            (1000, 50, 1, 1),
            "R/U/D/I rows of small"
        );
        let loaded_k1 = changes
            .iter()
            .find(|r| r["_op"] == "R" && r["k"] == "k1")
            .expect("k1 loaded");
        assert_eq!(loaded_k1["v"], 1, "k1 as of the slot's start: {loaded_k1}");
    }
    stop(run, &log).await;
}

/// SIGTERM in the middle of the initial load: `run` exits 0 at once, keeping what it committed,
/// and the next start finishes the load from there.
#[tokio::test]
async fn sigterm_during_the_initial_snapshot_exits_cleanly_and_the_next_start_finishes() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("snapshot_sigterm").await;
    create_tables(&db, 50_000).await;
    // The load stops at `small`, the last table, until the gate opens.
    let gate = close_gate(&db, "small").await;
    let (_dir, root, log) = file_lake();
    let args = ["--snapshot-workers", "1", "--compact-interval", "0"];
    let run = start_run(&db, "s_term", &root, &args, &log).await;
    wait_for_log(&log, "table loaded table=public.mid_5", 120).await;
    // Exit status 0 within the helper's minute, although a reader waits at the gate.
    stop(run, &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("stopped during the initial snapshot") && !text.contains("snapshot: done"),
        "{text}"
    );
    gate.close().await;
    // (The stopped process's reader, parked at the gate, ends once the gate opens and it writes
    // to its closed socket.)
    let run = start_run(&db, "s_term", &root, &args, &log).await;
    wait_for_log(&log, "initial snapshot: done", 120).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let resumed = text
        .lines()
        .rfind(|l| l.contains("initial snapshot: loading"))
        .unwrap();
    assert!(resumed.contains("skipped=8"), "{resumed}");
    caught_up(&db, "s_term", &log).await;
    verify_ok(&db, "s_term", &root, &["big", "small", "mid_5"]).await;
    stop(run, &log).await;
}

/// An invalidated slot with `--on-slot-invalidated=resnapshot`: run re-creates it and re-loads
/// every table, replacing the lake's contents — rows deleted while the slot was lost are gone.
#[tokio::test]
async fn an_invalidated_slot_is_recreated_and_the_tables_reloaded_with_resnapshot() {
    // Slots may hold at most 1 MB of WAL: easy to invalidate.
    let cluster = Arc::new(Cluster::start(&["max_slot_wal_keep_size = 1MB"]));
    let db = cluster.create_db("resnap").await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE TABLE filler (id bigint PRIMARY KEY, pad text);",
    )
    .await;
    db.grant_select().await;
    db.publish_all("pub").await;
    let (_dir, root, log) = file_lake();
    let args = [
        "--compact-interval",
        "0",
        "--on-slot-invalidated",
        "resnapshot",
    ];
    let run = start_run(&db, "s_lost", &root, &args, &log).await;
    caught_up(&db, "s_lost", &log).await;
    db.exec("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
        .await;
    caught_up(&db, "s_lost", &log).await;
    stop(run, &log).await;

    // While slotlake is down: changes, then enough WAL to invalidate the slot.
    db.exec("DELETE FROM t WHERE id <= 10; UPDATE t SET v = 'changed' WHERE id > 90")
        .await;
    db.write_until_slot_lost("s_lost", |round| {
        let base = round * 2000;
        format!(
            "INSERT INTO filler SELECT g, repeat('x', 200) FROM generate_series({base}, {base} + 1999) g"
        )
    })
    .await;

    let run = start_run(&db, "s_lost", &root, &args, &log).await;
    wait_for_log(&log, "re-created the invalidated slot", 60).await;
    wait_for_log(&log, "initial snapshot: done", 120).await;
    db.exec("INSERT INTO t VALUES (1000, 'after')").await;
    caught_up(&db, "s_lost", &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("replaced=2") || text.contains("replaced=1"),
        "tables replaced:\n{text}"
    );
    verify_ok(&db, "s_lost", &root, &["t", "filler"]).await;
    stop(run, &log).await;
}

/// Tables `a` (1,000 rows, published) and `b` (`b_rows` rows, not yet published).
async fn a_published_b_not(db: &TestDb, b_rows: u64) {
    db.exec(&format!(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 1000) g;
         CREATE TABLE b (id int PRIMARY KEY, v text, n bigint);
         INSERT INTO b SELECT g, 'b' || g, g FROM generate_series(1, {b_rows}) g;
         CREATE PUBLICATION pub FOR TABLE a;"
    ))
    .await;
    db.grant_select().await;
}

/// Makes slotlake's reads of `table` (not the owner's writes) wait until the returned session
/// closes: a row-level security policy takes an advisory lock that session holds.
async fn close_gate(db: &TestDb, table: &str) -> slotlake::replication::PgConnection {
    db.exec(&format!(
        "CREATE FUNCTION gate() RETURNS bool LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN true; END $$;
         ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
         CREATE POLICY gate ON {table} USING (gate());"
    ))
    .await;
    let mut gate = db.admin().await;
    gate.simple_query("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    gate
}

/// Per change-log version of a file:// table, in order: (`_op`, `_lsn`) of the rows it adds
/// (as changes: files rewritten by optimize are skipped).
fn rows_per_version(table_dir: &Path) -> Vec<Vec<(String, i64)>> {
    use deltalake::arrow::array::{Array, Int64Array, StringArray};
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = Vec::new();
    for v in 0.. {
        let Ok(text) = std::fs::read_to_string(table_dir.join(format!("_delta_log/{v:020}.json")))
        else {
            break;
        };
        let mut rows = Vec::new();
        for line in text.lines() {
            let j: serde_json::Value = serde_json::from_str(line).unwrap();
            // Files rewritten without a change (change-log optimize) are not new rows.
            let Some(path) = j["add"]["path"].as_str() else {
                continue;
            };
            if j["add"]["dataChange"] == false {
                continue;
            }
            let file = std::fs::File::open(table_dir.join(path)).unwrap();
            for batch in ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap()
            {
                let batch = batch.unwrap();
                let op = batch.column_by_name("_op").unwrap();
                let op = op.as_any().downcast_ref::<StringArray>().unwrap();
                let lsn = batch.column_by_name("_lsn").unwrap();
                let lsn = lsn.as_any().downcast_ref::<Int64Array>().unwrap();
                for i in 0..batch.num_rows() {
                    rows.push((op.value(i).to_string(), lsn.value(i)));
                }
            }
        }
        out.push(rows);
    }
    out
}

/// A table with rows joins the publication while `run` streams, with a writer changing it
/// throughout: its rows are backfilled and the lake equals the source; then a deliberate
/// re-load of it, held up mid-load, while the other table's changes keep reaching the lake.
#[tokio::test]
async fn a_table_added_to_the_publication_is_backfilled_while_it_changes() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("backfill").await;
    a_published_b_not(&db, 50000).await;
    let (dir, root, log) = file_lake();
    let run = start_run(
        &db,
        "s_back",
        &root,
        &[
            "--compact-interval",
            "0",
            "--publication-check-interval",
            "300ms",
        ],
        &log,
    )
    .await;
    wait_for_log(&log, "initial snapshot: done", 60).await;

    // A writer on b (and a) from before it joins until after it is backfilled.
    let stop_writer = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = start_writer(&db, stop_writer.clone(), rounds.clone(), |round| {
        let id = 1 + (round * 7919) % 50000;
        format!(
            "BEGIN;
             UPDATE b SET n = n + 1, v = 'w{round}' WHERE id = {id};
             DELETE FROM b WHERE id = {id} + 1;
             INSERT INTO b VALUES (100000 + {round}, 'new', 0);
             UPDATE a SET v = 'w{round}' WHERE id = {};
             COMMIT;",
            1 + round % 1000
        )
    });
    // b changes before it joins the publication, too.
    while rounds.load(Ordering::Relaxed) < 20 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.exec("ALTER PUBLICATION pub ADD TABLE b").await;
    wait_for_log(&log, "backfill done", 120).await;
    // A deliberate re-load of b, while the writer changes it — and while it loads, a keeps
    // streaming. The load is held up at will: a row-level security policy makes slotlake's
    // reads of b (not the owner's writes) wait for an advisory lock this test holds.
    let gate = close_gate(&db, "b").await;
    let (code, out, err) = run_slotlake(
        &[
            "snapshot", "--sink", &root, "--slot", "s_back", "--table", "public.b",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    wait_for_log(&log, "held until its load commits", 60).await;
    db.exec("UPDATE a SET v = 'probe' WHERE id = 1").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !read_delta(&format!("{root}/changes/public/a"), None)
        .iter()
        .any(|r| r["v"] == "probe")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a's change never reached the lake while b was loading\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backfills_done = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("backfill done")
            .count()
    };
    assert_eq!(
        backfills_done(),
        1,
        "b's re-load is still waiting at the gate"
    );
    // A request made during that backfill is not lost when it records its end: a is
    // re-loaded after b.
    let (code, out, err) = run_slotlake(
        &[
            "snapshot", "--sink", &root, "--slot", "s_back", "--table", "public.a",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let requests = dir.path().join("lake/_slotlake/snapshot/s_back.requests");
    assert_eq!(
        std::fs::read_dir(&requests).unwrap().count(),
        2,
        "b's request (its backfill is under way) and a's wait"
    );
    let truncates = |t: &str| {
        read_delta(&format!("{root}/changes/public/{t}"), None)
            .iter()
            .filter(|r| r["_op"] == "T")
            .count()
    };
    assert_eq!(truncates("a"), 0);
    gate.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while backfills_done() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b and then a were never re-loaded\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        std::fs::read_dir(&requests).map_or(0, |d| d.count()),
        0,
        "carried-out requests are removed"
    );
    assert_eq!(
        truncates("a"),
        1,
        "a was re-loaded (replaced: a truncate row first)"
    );
    stop_writer.store(true, Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    assert!(rounds > 0);
    caught_up(&db, "s_back", &log).await;
    verify_ok(&db, "s_back", &root, &["a", "b"]).await;
    held_changes_follow_the_load(&dir.path().join("lake/changes/public/b"));
    stop(run, &log).await;
}

/// The changes of a table held during its (last) load were committed after the load, never
/// before: in version order, no row after the load's point precedes the load's commit.
fn held_changes_follow_the_load(table_dir: &Path) {
    let versions = rows_per_version(table_dir);
    let (reload, point) = versions
        .iter()
        .enumerate()
        .rev()
        .find_map(|(v, rows)| rows.iter().find(|r| r.0 == "R").map(|r| (v, r.1)))
        .expect("the re-load's rows");
    let held_rows = versions[reload + 1..]
        .iter()
        .flatten()
        .filter(|r| r.1 > point)
        .count();
    assert!(
        held_rows > 0,
        "b changed during and after its re-load: {:?}",
        versions
            .iter()
            .map(|rows| (
                rows.len(),
                rows.iter().filter(|r| r.0 == "R").count(),
                rows.iter().map(|r| r.1).min(),
                rows.iter().map(|r| r.1).max()
            ))
            .collect::<Vec<_>>()
    );
    for (v, rows) in versions[..reload].iter().enumerate() {
        assert!(
            rows.iter().all(|r| r.1 <= point),
            "version {v} holds changes after the re-load's point {point}, committed before it"
        );
    }
}

/// `--snapshot never` (no publication watcher): run streams changes only, and keeps streaming.
#[tokio::test]
async fn without_snapshots_run_streams_and_keeps_running() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("never").await;
    db.exec(
        "CREATE TABLE pre (id int PRIMARY KEY);
         INSERT INTO pre SELECT generate_series(1, 100);",
    )
    .await;
    db.publish_all("pub").await;
    let (_dir, root, log) = file_lake();
    let mut run = start_run(
        &db,
        "s_never",
        &root,
        &["--snapshot", "never", "--compact-interval", "0"],
        &log,
    )
    .await;
    caught_up(&db, "s_never", &log).await;
    db.exec("INSERT INTO pre SELECT generate_series(101, 110)")
        .await;
    caught_up(&db, "s_never", &log).await;
    assert!(
        run.try_wait().unwrap().is_none(),
        "run is still streaming:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("initial snapshot"), "no snapshot:\n{text}");
    // Only the streamed rows are in the change log.
    let rows = read_delta(&format!("{root}/changes/public/pre"), None);
    assert_eq!(rows.len(), 10, "only the 10 streamed inserts");
    stop(run, &log).await;
}

/// A publication with a column list and a row filter (PostgreSQL ≥ 15): the initial snapshot
/// reads only the published columns and rows, as the stream carries them; rows moving in and
/// out of the filter later arrive as inserts and deletes; verify and an independent reader
/// find exactly what is published.
#[tokio::test]
async fn column_lists_and_row_filters_apply_to_the_snapshot() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("pubfilter").await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, a text, secret text, n int);
         INSERT INTO t SELECT g, 'a' || g, 'secret ' || g, g FROM generate_series(1, 1000) g;
         CREATE PUBLICATION pub FOR TABLE t (id, a, n) WHERE (id > 500);",
    )
    .await;
    db.grant_select().await;
    let (_dir, root, log) = file_lake();
    let run = start_run(&db, "s_filter", &root, &["--compact-interval", "0"], &log).await;
    wait_for_log(&log, "initial snapshot: done", 60).await;
    db.exec(
        "INSERT INTO t VALUES (2000, 'new', 's', 2000), (0, 'low', 's', 3);
         UPDATE t SET id = 1500 WHERE id = 10;
         UPDATE t SET id = -5 WHERE id = 900;
         UPDATE t SET a = 'changed', secret = 'x' WHERE id = 700;",
    )
    .await;
    caught_up(&db, "s_filter", &log).await;
    verify_ok(&db, "s_filter", &root, &["t"]).await;
    stop(run, &log).await;

    let changes = read_delta(&format!("{root}/changes/public/t"), None);
    assert!(
        changes.iter().all(|r| r.get("secret").is_none()),
        "the unpublished column never reaches the lake"
    );
    let loaded: std::collections::BTreeSet<i64> = changes
        .iter()
        .filter(|r| r["_op"] == "R")
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        loaded,
        (501..=1000).collect(),
        "the snapshot applies the row filter"
    );
    let current: std::collections::BTreeMap<i64, (String, i64)> =
        read_delta(&format!("{root}/current/public/t"), None)
            .iter()
            .map(|r| {
                (
                    r["id"].as_i64().unwrap(),
                    (
                        r["a"].as_str().unwrap().to_string(),
                        r["n"].as_i64().unwrap(),
                    ),
                )
            })
            .collect();
    let want: std::collections::BTreeMap<i64, (String, i64)> = db
        .exec("SELECT id, a, n FROM t WHERE id > 500")
        .await
        .iter()
        .map(|r| {
            (
                r.get("id").unwrap().parse().unwrap(),
                (
                    r.get("a").unwrap().to_string(),
                    r.get("n").unwrap().parse().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(current, want);
    assert!(current.contains_key(&1500) && !current.contains_key(&900));
}

/// `run` killed while a backfill is held mid-load (by a gate): the restarted `run` backfills
/// the table again, the other table streams throughout, and once the gate opens the lake
/// equals the source, with the held changes committed after the load.
#[tokio::test]
async fn kill_nine_during_a_backfill_then_restart_loses_nothing() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("backfill_kill").await;
    a_published_b_not(&db, 20000).await;
    let gate = close_gate(&db, "b").await;
    let (dir, root, log) = file_lake();
    let args = [
        "--compact-interval",
        "0",
        "--publication-check-interval",
        "300ms",
    ];
    let mut run = start_run(&db, "s_bkill", &root, &args, &log).await;
    wait_for_log(&log, "initial snapshot: done", 60).await;
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = start_writer(
        &db,
        stop_writer.clone(),
        Arc::new(AtomicU64::new(0)),
        |round| {
            let id = 1 + (round * 7919) % 20000;
            format!(
                "BEGIN;
             UPDATE b SET n = n + 1, v = 'w{round}' WHERE id = {id};
             INSERT INTO b VALUES (100000 + {round}, 'new', 0);
             UPDATE a SET v = 'w{round}' WHERE id = {};
             COMMIT;",
                1 + round % 1000
            )
        },
    );
    db.exec("ALTER PUBLICATION pub ADD TABLE b").await;
    wait_for_log(&log, "held until its load commits", 60).await;
    run.kill().await.unwrap();

    let run = start_run(&db, "s_bkill", &root, &args, &log).await;
    let held_twice = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("held until its load commits")
            .count()
            >= 2
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !held_twice() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted run never backfilled b again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gate.close().await;
    wait_for_log(&log, "backfill done", 120).await;
    stop_writer.store(true, Ordering::Relaxed);
    assert!(writer.await.unwrap() > 0);
    caught_up(&db, "s_bkill", &log).await;
    verify_ok(&db, "s_bkill", &root, &["a", "b"]).await;
    held_changes_follow_the_load(&dir.path().join("lake/changes/public/b"));
    stop(run, &log).await;
}
