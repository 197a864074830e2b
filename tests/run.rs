//! `slotlake run` end to end on real parts: a real PostgreSQL, the change logs written to
//! file:// and to a real S3-compatible server (moto) on loopback, read back with an independent
//! reader (Python `deltalake`), and compared with an oracle: a `test_decoding` slot created at
//! the same moment and drained through SQL.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::*;

fn venv() -> PathBuf {
    s3::venv_dir()
}

/// (op, id) per table, in commit order, from a `test_decoding` slot.
async fn oracle(db: &TestDb, slot: &str) -> BTreeMap<String, Vec<(String, i64)>> {
    let rows = db
        .exec(&format!(
            "SELECT data FROM pg_logical_slot_get_changes('{slot}', NULL, NULL)"
        ))
        .await;
    let mut out: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    for r in rows {
        let line = r.get("data").unwrap();
        let Some(rest) = line.strip_prefix("table ") else {
            continue;
        };
        let (table, rest) = rest.split_once(": ").unwrap();
        let (op, rest) = rest.split_once(':').unwrap();
        let table = table.replace("public.", "");
        let op = match op {
            "INSERT" => "I",
            "UPDATE" => "U",
            "DELETE" => "D",
            "TRUNCATE" => {
                out.entry(table).or_default().push(("T".into(), 0));
                continue;
            }
            other => panic!("unexpected op {other}"),
        };
        // For key-changing updates the new tuple follows "new-tuple:".
        let tuple = rest
            .rsplit_once("new-tuple:")
            .map(|(_, t)| t)
            .unwrap_or(rest);
        let id = tuple
            .split_whitespace()
            .find_map(|f| f.strip_prefix("id[integer]:"))
            .unwrap_or_else(|| panic!("no id in {line}"))
            .parse()
            .unwrap();
        out.entry(table).or_default().push((op.to_string(), id));
    }
    out
}

/// (op, id) per table from the change logs, ordered by (_lsn, _seq).
fn lake(root: &str, tables: &[String], s3: Option<&str>) -> BTreeMap<String, Vec<(String, i64)>> {
    let mut out = BTreeMap::new();
    for t in tables {
        let rows = read_delta(&format!("{root}/changes/public/{t}"), s3);
        let mut seen = std::collections::HashSet::new();
        for r in &rows {
            let identity = (r["_lsn"].to_string(), r["_seq"].as_i64().unwrap());
            assert!(
                seen.insert(identity.clone()),
                "duplicate change {identity:?} in {t}"
            );
        }
        let ops: Vec<(String, i64)> = rows
            .iter()
            .map(|r| {
                let op = r["_op"].as_str().unwrap().to_string();
                let id = if op == "T" {
                    0
                } else {
                    r["id"].as_i64().unwrap()
                };
                (op, id)
            })
            .collect();
        if !ops.is_empty() {
            out.insert(t.clone(), ops);
        }
    }
    out
}

/// Slots are per cluster, databases per test: name the slots after the database.
fn lake_slot(db: &TestDb) -> String {
    format!("l_{}", db.name)
}

fn oracle_slot(db: &TestDb) -> String {
    format!("o_{}", db.name)
}

struct Runner {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Runner {
    fn start(db: &TestDb, sink: &str, extra: &[&str], log: &Path) -> Runner {
        Runner::start_from(db, &db.url(), sink, extra, log)
    }

    fn start_from(db: &TestDb, source: &str, sink: &str, extra: &[&str], log: &Path) -> Runner {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = tokio::process::Command::new(slotlake_bin())
            .args([
                "run",
                "--source",
                source,
                "--slot",
                &lake_slot(db),
                "--publication",
                "pub",
                "--sink",
                sink,
            ])
            .args(if extra.contains(&"--flush-interval") {
                &["--status-interval", "1s"][..]
            } else {
                &["--flush-interval", "200ms", "--status-interval", "1s"][..]
            })
            .args(if extra.contains(&"--metrics-addr") {
                &[][..]
            } else {
                &["--metrics-addr", "127.0.0.1:0"][..]
            })
            .args(extra)
            .env("SLOTLAKE_LOG_LEVEL", "info")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .stdout(Stdio::null())
            .stderr(logf)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Runner {
            child,
            log: log.to_path_buf(),
        }
    }

    async fn kill9(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// SIGTERM and wait: a clean stop exits 0.
    async fn stop(mut self) {
        let pid = self.child.id().unwrap();
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("stop in time")
            .unwrap();
        assert!(
            status.success(),
            "exit {status:?}\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

/// Waits until the marker table's change log holds a row with id `marker`.
async fn wait_for_marker(root: &str, s3: Option<&str>, marker: i64, runner_log: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let uri = format!("{root}/changes/public/marker");
        let has = {
            let mut c = std::process::Command::new(venv().join("bin/python"));
            c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lib/read_delta.py"))
                .arg(&uri);
            if let Some(ep) = s3 {
                c.arg("--s3-endpoint").arg(ep);
            }
            let out = c.output().unwrap();
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"] == marker)
        };
        if has {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "marker {marker} never reached the lake\n{}",
            std::fs::read_to_string(runner_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn setup(db: &TestDb, tables: usize) -> Vec<String> {
    let mut sql = String::from("CREATE TABLE marker (id int PRIMARY KEY);");
    let names: Vec<String> = (0..tables).map(|i| format!("t{i:03}")).collect();
    for t in &names {
        sql.push_str(&format!("CREATE TABLE {t} (id int PRIMARY KEY, v text, n numeric(10,2), ts timestamptz DEFAULT now());"));
    }
    db.exec(&sql).await;
    db.publish_all("pub").await;
    let mut admin = db.admin().await;
    // The oracle slot and slotlake's slot start at (nearly) the same point; both before any change.
    admin
        .simple_query(&format!(
            "SELECT pg_create_logical_replication_slot('{}', 'test_decoding')",
            oracle_slot(db)
        ))
        .await
        .unwrap();
    admin.close().await;
    let info = slotlake::replication::ConnInfo::parse(&db.url()).unwrap();
    let mut repl = slotlake::replication::PgConnection::connect(
        &info,
        slotlake::replication::SessionKind::Replication,
    )
    .await
    .unwrap();
    slotlake::replication::slot::create_slot(
        &mut repl,
        &lake_slot(db),
        slotlake::replication::slot::SnapshotAction::None,
    )
    .await
    .unwrap();
    repl.close().await;
    names
}

/// A mixed workload: inserts, updates (incl. key changes), deletes, truncates, a big
/// transaction, a streamed one with aborted subtransactions, and schema changes.
async fn workload(db: &TestDb, tables: &[String], big_rows: usize) {
    let mut admin = db.admin().await;
    for (i, t) in tables.iter().enumerate() {
        admin
            .simple_query(&format!(
                "INSERT INTO {t} (id, v, n) SELECT g, 'v' || g, g * 1.5 FROM generate_series(1, {}) g;",
                5 + i % 7
            ))
            .await
            .unwrap();
    }
    let t0 = &tables[0];
    let t1 = &tables[1 % tables.len()];
    let t2 = &tables[2 % tables.len()];
    admin
        .simple_query(&format!(
            "UPDATE {t0} SET v = 'updated' WHERE id <= 3;
             UPDATE {t0} SET id = id + 1000 WHERE id = 4;
             DELETE FROM {t1} WHERE id = 2;
             TRUNCATE {t2};
             INSERT INTO {t2} (id, v) VALUES (1, 'after truncate');
             ALTER TABLE {t0} ADD COLUMN extra int;
             INSERT INTO {t0} (id, v, extra) VALUES (5000, 'with extra', 42);
             ALTER TABLE {t1} DROP COLUMN n;
             INSERT INTO {t1} (id, v) VALUES (5000, 'without n');
             BEGIN;
             INSERT INTO {t0} (id, v) SELECT g, repeat('s', 50) FROM generate_series(10000, 12999) g;
             SAVEPOINT a;
             INSERT INTO {t0} (id, v) SELECT g, 'aborted' FROM generate_series(20000, 21999) g;
             ROLLBACK TO SAVEPOINT a;
             INSERT INTO {t1} (id, v) SELECT g, 'kept' FROM generate_series(30000, 30999) g;
             COMMIT;
             BEGIN; INSERT INTO {t2} (id, v) SELECT g, 'rolled back' FROM generate_series(40000, 44999) g; ROLLBACK;
             INSERT INTO {t2} (id, v) SELECT g, 'big' FROM generate_series(100000, {}) g;",
            100000 + big_rows - 1
        ))
        .await
        .unwrap();
    admin.close().await;
}

#[tokio::test]
async fn mixed_workload_lands_exactly_once_on_file_and_s3() {
    let cluster = Cluster::shared();
    let big: usize = std::env::var("SLOTLAKE_TEST_BIG_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let s3 = s3::S3Server::shared();
    let bucket = s3.new_bucket("mixed").await;
    for (label, root, endpoint) in [
        ("file", None, None),
        (
            "s3",
            Some(format!("s3://{bucket}/lake")),
            Some(s3.endpoint()),
        ),
    ] {
        let db = cluster.create_db(&format!("mixed_{label}")).await;
        let tables = setup(&db, 200).await;
        let dir = tempfile::tempdir().unwrap();
        let root = root.unwrap_or_else(|| format!("file://{}", dir.path().join("lake").display()));
        let mut extra: Vec<&str> = Vec::new();
        let ep = endpoint.clone().unwrap_or_default();
        if endpoint.is_some() {
            extra.extend(["--s3-endpoint", &ep, "--s3-allow-http"]);
        } else {
            // A small budget on file://: the big streamed transaction goes through spill files
            // and its replay through early-staged files.
            extra.extend(["--memory-budget", "4MiB"]);
        }
        let log = dir.path().join("run.log");
        let runner = Runner::start(&db, &root, &extra, &log);
        workload(&db, &tables, big).await;
        db.exec("INSERT INTO marker VALUES (1)").await;
        wait_for_marker(&root, endpoint.as_deref(), 1, &log).await;
        runner.stop().await;
        if endpoint.is_none() {
            let log = std::fs::read_to_string(&log).unwrap();
            let stopped = log
                .lines()
                .find(|l| l.contains("stopped"))
                .unwrap_or_default();
            assert!(
                !stopped.contains("spilled_bytes=0") && stopped.contains("spilled_bytes="),
                "the streamed transaction was spilled: {stopped}"
            );
        }

        let mut want = oracle(&db, &oracle_slot(&db)).await;
        want.remove("marker");
        let got = lake(&root, &tables, endpoint.as_deref());
        assert_eq!(got.len(), want.len(), "{label}: tables with changes");
        for (t, ops) in &want {
            assert_eq!(got.get(t), Some(ops), "{label}: change log of {t}");
        }
        // Schema evolution: the added column is there with its value.
        let t0 = read_delta(
            &format!("{root}/changes/public/{}", tables[0]),
            endpoint.as_deref(),
        );
        assert!(
            t0.iter().any(|r| r["id"] == 5000 && r["extra"] == 42),
            "{label}: added column"
        );
        // The slot was confirmed past everything.
        let slot = db.exec(&format!("SELECT confirmed_flush_lsn::text AS c, pg_current_wal_lsn()::text AS w FROM pg_replication_slots WHERE slot_name = '{}'", lake_slot(&db))).await;
        let c: slotlake::lsn::Lsn = slot[0].get("c").unwrap().parse().unwrap();
        let marker_lsn: slotlake::lsn::Lsn = read_delta(
            &format!("{root}/changes/public/marker"),
            endpoint.as_deref(),
        )[0]["_lsn"]
            .to_string()
            .trim_matches('"')
            .parse::<u64>()
            .map(slotlake::lsn::Lsn)
            .unwrap();
        assert!(
            c > marker_lsn,
            "{label}: confirmed {c} past the marker's commit {marker_lsn}"
        );
    }
}

#[tokio::test]
async fn kill_nine_at_random_points_loses_and_duplicates_nothing() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("kill9").await;
    let tables = setup(&db, 20).await;
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().join("lake").display());
    let log = dir.path().join("run.log");
    // The workload runs while slotlake is killed and restarted.
    let admin_url = db.admin_url();
    let load_tables = tables.clone();
    let load = tokio::spawn(async move {
        let info = slotlake::replication::ConnInfo::parse(&admin_url).unwrap();
        let mut c = slotlake::replication::PgConnection::connect(
            &info,
            slotlake::replication::SessionKind::Sql,
        )
        .await
        .unwrap();
        for round in 0..60i64 {
            let t = &load_tables[(round as usize) % load_tables.len()];
            let base = 100_000 + round * 1000;
            c.simple_query(&format!(
                "BEGIN; INSERT INTO {t} (id, v) SELECT g, 'r{round}' FROM generate_series({base}, {base} + {}) g;
                 UPDATE {t} SET v = 'u' WHERE id = {base}; DELETE FROM {t} WHERE id = {base} + 1; COMMIT;",
                // Every tenth transaction is big enough to be streamed and spilled.
                if round % 10 == 9 { 5000 } else { (round * 37) % 400 }
            ))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        c.close().await;
    });
    let mut seed: u64 = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut rand = move |lo: u64, hi: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        lo + seed % (hi - lo)
    };
    // A small budget: streamed transactions go through spill files, so kills land in the
    // middle of spilling and of replaying them too.
    let small = ["--memory-budget", "256KiB"];
    for _ in 0..20 {
        let mut r = Runner::start(&db, &root, &small, &log);
        tokio::time::sleep(Duration::from_millis(rand(100, 700))).await;
        r.kill9().await;
    }
    load.await.unwrap();
    db.exec("INSERT INTO marker VALUES (7)").await;
    let r = Runner::start(&db, &root, &small, &log);
    wait_for_marker(&root, None, 7, &log).await;
    r.stop().await;
    let mut want = oracle(&db, &oracle_slot(&db)).await;
    want.remove("marker");
    let got = lake(&root, &tables, None);
    for (t, ops) in &want {
        assert_eq!(
            got.get(t).map(Vec::len),
            Some(ops.len()),
            "change count of {t}"
        );
        assert_eq!(got.get(t), Some(ops), "change log of {t}");
    }
}

/// Waits (up to 120 s) until `retries` of the scraped metrics reaches `at_least` — slotlake
/// failing to write — then checks the lake's slot is confirmed short of `written_up_to`.
async fn retried_without_confirming(
    db: &TestDb,
    metrics_port: u16,
    retries: impl Fn(&str) -> f64,
    at_least: f64,
    written_up_to: slotlake::lsn::Lsn,
    log: &Path,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let m = scrape(metrics_port).await;
        if retries(&m) >= at_least {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The stream goes on meanwhile (the commits retry on another thread): a transaction with
    // nothing for the lake (a transactional logical message) is read, and a status update
    // goes out after it — and still confirms nothing that could not be written.
    db.exec("SET synchronous_commit = on; SELECT pg_logical_emit_message(true, 'slotlake-test', 'outage')")
        .await;
    let message_end = last_commit_end(db).await;
    loop {
        let received = metric(&scrape(metrics_port).await, "slotlake_received_lsn");
        if received >= message_end.0 as f64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slotlake did not read on during the {what}: received {received}, the message ends at {message_end}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let read_at = db.exec("SELECT now()::text AS t").await[0]
        .get("t")
        .unwrap()
        .to_string();
    let status_after = format!(
        "SELECT coalesce(bool_or(r.reply_time > '{read_at}'), false)::text AS after FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = '{}'",
        lake_slot(db)
    );
    while db.exec(&status_after).await[0].get("after") != Some("true") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no status update after the {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = confirmed_lsn(db, &lake_slot(db)).await;
    assert!(
        during < written_up_to,
        "confirmed {during} past data that could not be written (WAL at {written_up_to})"
    );
}

/// Checks every change log against the oracle (the marker table aside) and returns the
/// oracle's changes.
async fn assert_lake_is_oracle(
    db: &TestDb,
    root: &str,
    s3: Option<&str>,
) -> BTreeMap<String, Vec<(String, i64)>> {
    let mut want = oracle(db, &oracle_slot(db)).await;
    want.remove("marker");
    let changed: Vec<String> = want.keys().cloned().collect();
    let got = lake(root, &changed, s3);
    for (t, ops) in &want {
        assert_eq!(got.get(t), Some(ops), "change log of {t}");
    }
    want
}

/// The end of the commit record of the last transaction the oracle slot has (not consumed):
/// confirming at or past it says that transaction is in the lake.
async fn last_commit_end(db: &TestDb) -> slotlake::lsn::Lsn {
    db.exec(&format!(
        "SELECT max(lsn)::text AS w FROM pg_logical_slot_peek_changes('{}', NULL, NULL) WHERE data LIKE 'COMMIT%'",
        oracle_slot(db)
    ))
    .await[0]
    .get("w")
    .unwrap()
    .parse()
    .unwrap()
}

async fn confirmed_lsn(db: &TestDb, slot: &str) -> slotlake::lsn::Lsn {
    let rows = db.exec(&format!("SELECT confirmed_flush_lsn::text AS c FROM pg_replication_slots WHERE slot_name = '{slot}'")).await;
    rows[0].get("c").unwrap().parse().unwrap()
}

async fn scrape(port: u16) -> String {
    http_get(port, "/metrics").await
}

/// The whole HTTP response (status line, headers, body) to `GET path`; empty when nothing
/// listens.
async fn http_get(port: u16, path: &str) -> String {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    match s3::http_request(addr, "GET", path, &[], b"").await {
        Ok(r) => format!("{}\r\n\r\n{}", r.head, r.body),
        Err(_) => String::new(),
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// Multi-threaded: the proxy's tasks must run while the test blocks on the reader process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_confirms_nothing_unwritten_and_recovers() {
    let cluster = Cluster::shared();
    let s3 = s3::S3Server::shared();
    let bucket = s3.new_bucket("outage").await;
    let proxy = s3::TcpProxy::start(s3.addr());
    let endpoint = proxy.endpoint();
    let db = cluster.create_db("outage").await;
    let tables = setup(&db, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.log");
    let root = format!("s3://{bucket}/lake");
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let runner = Runner::start(
        &db,
        &root,
        &[
            "--s3-endpoint",
            &endpoint,
            "--s3-allow-http",
            "--metrics-addr",
            &metrics_addr,
        ],
        &log,
    );
    db.exec(&format!(
        "INSERT INTO {} (id) SELECT generate_series(1, 100); INSERT INTO marker VALUES (1)",
        tables[0]
    ))
    .await;
    wait_for_marker(&root, Some(&endpoint), 1, &log).await;

    proxy.set_down(true);
    db.exec(&format!(
        "SET synchronous_commit = on; INSERT INTO {} (id) SELECT generate_series(1, 500); INSERT INTO marker VALUES (2)",
        tables[1]
    ))
    .await;
    // (synchronous_commit = on above: the cluster runs with it off, and only flushed WAL is
    // decoded, by the oracle and by the walsender alike.)
    // The end of the commit record of the transaction written during the outage (the oracle
    // slot reports it): confirming at or past it would tell Postgres that it is in the lake.
    // Anything before it is fine, even inside that transaction's WAL, since it is resent whole.
    let written_up_to = last_commit_end(&db).await;
    // Wait until slotlake has failed to commit a few times, then check it confirmed nothing new.
    retried_without_confirming(
        &db,
        metrics_port,
        |m| metric(m, "slotlake_retries_total"),
        3.0,
        written_up_to,
        &log,
        "commit retries during the outage",
    )
    .await;

    proxy.set_down(false);
    wait_for_marker(&root, Some(&endpoint), 2, &log).await;
    runner.stop().await;
    assert_lake_is_oracle(&db, &root, Some(&endpoint)).await;
    assert!(confirmed_lsn(&db, &lake_slot(&db)).await >= written_up_to);
}

#[tokio::test]
async fn idle_database_slot_keeps_advancing_while_another_database_writes() {
    // Keepalives every ~1 s instead of every 30 s, so the test does not wait long.
    let cluster = std::sync::Arc::new(Cluster::start(&["wal_sender_timeout = 2s"]));
    let idle = cluster.create_db("idle").await;
    let busy = cluster.create_db("busy").await;
    setup(&idle, 1).await;
    busy.exec("CREATE TABLE churn (id int PRIMARY KEY, v text)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.log");
    let root = format!("file://{}", dir.path().join("lake").display());
    // Heartbeats off: this is about keepalives alone.
    let runner = Runner::start(&idle, &root, &["--heartbeat-interval", "0"], &log);
    let before = confirmed_lsn(&idle, &lake_slot(&idle)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    loop {
        busy.exec(&format!(
            "INSERT INTO churn SELECT g, repeat('x', 100) FROM generate_series({0}, {0} + 999) g",
            round * 1000
        ))
        .await;
        round += 1;
        let now = confirmed_lsn(&idle, &lake_slot(&idle)).await;
        if now.checked_sub(before).unwrap_or(0) > 1 << 20 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle slot stuck at {now} (started at {before})\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    runner.stop().await;
}

/// Inserts `rows` rows into each table in one transaction per table.
async fn load_rows(db: &TestDb, tables: &[String], base: i64, rows: i64) {
    let mut sql = String::new();
    for t in tables {
        sql.push_str(&format!(
            "INSERT INTO {t} (id, v) SELECT g, 'x' FROM generate_series({base}, {}) g;
             UPDATE {t} SET v = 'y' WHERE id = {base};",
            base + rows - 1
        ));
    }
    db.exec(&sql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_cut_connection_and_a_server_restart_and_loses_nothing() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("reconnect").await;
    let tables = setup(&db, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().join("lake").display());
    let log = dir.path().join("run.log");
    // slotlake reaches Postgres through a proxy that can cut every connection.
    let proxy = s3::TcpProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], cluster.port())));
    let source = db.url().replace(
        &format!(":{}/", cluster.port()),
        &format!(":{}/", proxy.port()),
    );
    let mut runner = Runner::start_from(&db, &source, &root, &[], &log);

    load_rows(&db, &tables, 1_000, 2_000).await;
    db.exec("INSERT INTO marker VALUES (1)").await;
    wait_for_marker(&root, None, 1, &log).await;

    // 1. The connection is cut (RST) while changes are in flight.
    load_rows(&db, &tables, 10_000, 5_000).await;
    proxy.set_down(true);
    // Down until the server has seen the cut: the walsender is gone and the slot inactive.
    let slot = lake_slot(&db);
    loop {
        let rows = db
            .exec(&format!(
                "SELECT active::text AS a FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ))
            .await;
        if rows[0].get("a") == Some("false") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.set_down(false);
    load_rows(&db, &tables, 20_000, 1_000).await;
    db.exec("INSERT INTO marker VALUES (2)").await;
    wait_for_marker(&root, None, 2, &log).await;

    // 2. The server restarts (fast shutdown terminates the walsender) while changes are in
    //    flight.
    load_rows(&db, &tables, 30_000, 5_000).await;
    cluster.restart();
    load_rows(&db, &tables, 40_000, 1_000).await;
    db.exec("INSERT INTO marker VALUES (3)").await;
    wait_for_marker(&root, None, 3, &log).await;

    assert!(
        runner.child.try_wait().unwrap().is_none(),
        "slotlake stayed up through both outages\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    runner.stop().await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.matches("reconnecting from the confirmed position")
            .count()
            >= 2,
        "one reconnect per outage:\n{text}"
    );
    // Connection errors, reconnects and the source URL were all logged: never the password.
    assert!(text.contains("********"), "the URL is logged redacted");
    assert!(
        !text.contains(SCRAM_PASSWORD) && !text.contains(&urlencode(SCRAM_PASSWORD)),
        "password leaked into the log"
    );
    let mut want = oracle(&db, &oracle_slot(&db)).await;
    want.remove("marker");
    let got = lake(&root, &tables, None);
    assert_eq!(got.len(), want.len());
    for (t, ops) in &want {
        assert_eq!(got.get(t), Some(ops), "change log of {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_a_definite_error_with_its_exit_code() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("dropped").await;
    let tables = setup(&db, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().join("lake").display());
    let log = dir.path().join("run.log");
    let mut runner = Runner::start(&db, &root, &[], &log);
    load_rows(&db, &tables, 1, 10).await;
    db.exec("INSERT INTO marker VALUES (1)").await;
    wait_for_marker(&root, None, 1, &log).await;
    // Terminate the walsender and drop the slot before slotlake takes it again.
    let slot = lake_slot(&db);
    let dropped_at = loop {
        let mut admin = db.admin().await;
        let dropped = admin
            .simple_query(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                 WHERE slot_name = '{slot}' AND active_pid IS NOT NULL;
                 SELECT pg_drop_replication_slot('{slot}');"
            ))
            .await;
        admin.close().await;
        if dropped.is_ok() {
            break tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = tokio::time::timeout(Duration::from_secs(10), runner.child.wait())
        .await
        .expect("slotlake exits within 10 s of the slot being dropped")
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        status.code(),
        Some(4),
        "exit code for a missing slot\n{text}"
    );
    assert!(
        text.contains("does not exist") && text.contains("slotlake slot create"),
        "names the slot and the fix:\n{text}"
    );
    assert!(dropped_at.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn heartbeats_advance_the_slot_of_a_server_without_writes() {
    // A server of its own: nothing else writes WAL, so only heartbeats can move the slot.
    let cluster = std::sync::Arc::new(Cluster::start(&["wal_sender_timeout = 2s"]));
    let db = cluster.create_db("heartbeat").await;
    setup(&db, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("run.log");
    let root = format!("file://{}", dir.path().join("lake").display());
    let runner = Runner::start(&db, &root, &["--heartbeat-interval", "300ms"], &log);
    let slot = lake_slot(&db);
    let mut seen = vec![confirmed_lsn(&db, &slot).await];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 4 {
        let now = confirmed_lsn(&db, &slot).await;
        if now > *seen.last().unwrap() {
            seen.push(now);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot advanced only through {seen:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    runner.stop().await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("write a heartbeat"),
        "no heartbeat failures: {text}"
    );
}

#[tokio::test]
async fn readyz_is_unready_while_lag_exceeds_the_limit_and_ready_after_catching_up() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("readyz").await;
    let tables = setup(&db, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().join("lake").display());
    let log = dir.path().join("run.log");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Changes wait up to 3 s before being committed: long enough to see the lag.
    let runner = Runner::start(
        &db,
        &root,
        &[
            "--metrics-addr",
            &addr,
            "--ready-max-lag",
            "256KiB",
            "--flush-interval",
            "3s",
        ],
        &log,
    );
    let wait_for = |want: &'static str, why: &'static str| {
        let log = log.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let r = http_get(port, "/readyz").await;
                if r.starts_with(want) {
                    return r;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{why}: last answer {r:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for("HTTP/1.1 200", "ready once streaming").await;
    load_rows(&db, &tables, 1, 20_000).await;
    let unready = wait_for("HTTP/1.1 503", "unready while 20,000 changes wait").await;
    assert!(unready.contains("replication lag"), "{unready}");
    wait_for("HTTP/1.1 200", "ready again after the commit").await;
    runner.stop().await;
}

#[tokio::test]
async fn an_invalidated_slot_is_a_definite_error_naming_the_recovery() {
    // Slots may hold at most 1 MB of WAL: easy to invalidate.
    let cluster = std::sync::Arc::new(Cluster::start(&["max_slot_wal_keep_size = 1MB"]));
    let db = cluster.create_db("lost").await;
    let tables = setup(&db, 1).await;
    let slot = lake_slot(&db);
    let table = tables[0].clone();
    db.write_until_slot_lost(&slot, |round| {
        let base = round * 2_000;
        format!(
            "INSERT INTO {table} (id, v) SELECT g, 'x' FROM generate_series({base}, {}) g",
            base + 1_999
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().join("lake").display());
    let log = dir.path().join("run.log");
    let mut runner = Runner::start(&db, &root, &[], &log);
    let status = tokio::time::timeout(Duration::from_secs(30), runner.child.wait())
        .await
        .expect("slotlake exits")
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(4), "{text}");
    assert!(
        text.contains("invalidated") && text.contains("slotlake slot drop"),
        "names the cause and the recovery:\n{text}"
    );
}

#[tokio::test]
async fn source_columns_named_like_metadata_columns_are_kept_apart() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("names").await;
    setup(&db, 0).await;
    db.exec(
        r#"CREATE TABLE odd (id int PRIMARY KEY, "_op" text, "_lsn" bigint, "_old_id" int);
           INSERT INTO odd VALUES (1, 'mine', 42, 7);
           UPDATE odd SET id = 2 WHERE id = 1;"#,
    )
    .await;
    db.exec("INSERT INTO marker VALUES (1)").await;
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().join("lake").display());
    let log = dir.path().join("run.log");
    let runner = Runner::start(&db, &root, &[], &log);
    wait_for_marker(&root, None, 1, &log).await;
    runner.stop().await;
    let rows = read_delta(&format!("{root}/changes/public/odd"), None);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let insert = rows.iter().find(|r| r["_op"] == "I").expect("the insert");
    assert_eq!(insert["_op__source"], "mine");
    assert_eq!(insert["_lsn__source"], 42);
    assert_eq!(insert["_old_id__source"], 7);
    let update = rows.iter().find(|r| r["_op"] == "U").expect("the update");
    assert_eq!(update["id"], 2);
    assert_eq!(
        update["_old_id"], 1,
        "the old key of the key-changing update"
    );
    assert_eq!(update["_old_id__source"], 7);
}

/// Rows of 1 MiB: `--memory-budget` bounds what a run holds however wide the rows, in one
/// big (streamed, spilled, replayed) transaction and over many small ones; compaction sizes
/// its steps by the rows' Arrow size, not their (tiny) Parquet size. The budget used
/// to be checked against a measurement taken every 1,024 changes, and a replayed
/// transaction was handled 4,096 changes at a time: a 16 MiB budget held hundreds of MiB.
#[tokio::test(flavor = "multi_thread")]
async fn wide_rows_stay_within_the_memory_budget() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("wide_rows").await;
    setup(&db, 0).await;
    db.exec("CREATE TABLE wide (id int PRIMARY KEY, doc text); ALTER TABLE wide ALTER doc SET STORAGE EXTERNAL")
        .await;
    let row = |i: i64| format!("({i}, repeat(md5('{i}'), 32768))");
    let rows: Vec<String> = (1..=100).map(row).collect();
    db.exec(&format!("INSERT INTO wide VALUES {}", rows.join(",")))
        .await;
    for i in 101..=200 {
        db.exec(&format!("INSERT INTO wide VALUES {}", row(i)))
            .await;
    }
    let stop = db.wal_insert_lsn().await.to_string();
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().join("lake").display());
    let log = dir.path().join("run.log");
    let logf = std::fs::File::create(&log).unwrap();
    let url = db.url();
    let slot = lake_slot(&db);
    // A flush interval past the run's length: only the budget bounds what is buffered.
    #[rustfmt::skip]
    let args = [
        "run", "--source", &url, "--slot", &slot, "--publication", "pub", "--sink", &root,
        "--memory-budget", "16MiB", "--flush-interval", "1h", "--metrics-addr", "127.0.0.1:0",
        "--stop-at", &stop,
    ];
    // Reaped with `wait4` below, for its peak RSS.
    #[allow(clippy::zombie_processes)]
    let child = std::process::Command::new(slotlake_bin())
        .args(args)
        .env("SLOTLAKE_LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let reaped = tokio::task::spawn_blocking(move || {
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(reaped, pid, "wait4");
        (status, usage)
    });
    let Ok(reaped) = tokio::time::timeout(Duration::from_secs(180), reaped).await else {
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!(
            "run did not stop at --stop-at within 180 s\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    let (status, rusage) = reaped.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "run exits 0 at --stop-at\n{text}"
    );
    let peak_mib = rusage.ru_maxrss / 1024;
    assert!(
        peak_mib < 150,
        "peak RSS {peak_mib} MiB with a 16 MiB budget and 200 MiB of rows\n{text}"
    );
    assert_eq!(
        delta_count(&format!("{root}/changes/public/wide"), None),
        200,
        "{text}"
    );
    // Compaction plans its steps by the Arrow size the change log's writer recorded: the
    // 200 MiB of repeated text are ~100 KB of Parquet, which at 4x would be one step.
    let report = compact_report(&root, "public.wide", &["--compact-memory", "64MiB"]).await;
    assert!(
        report["steps"].as_u64().unwrap() >= 4,
        "steps of at most 32 MiB of rows: {report}"
    );
    assert_eq!(
        delta_count(&format!("{root}/current/public/wide"), None),
        200,
        "{report}"
    );
}

/// `--stop-at`: run streams until the stream passes the LSN, then commits, confirms and exits
/// 0 by itself, with every transaction that committed before the LSN in the lake.
#[tokio::test]
async fn stop_at_commits_everything_before_the_lsn_and_exits_by_itself() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("stop_at").await;
    let tables = setup(&db, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let root = format!("file://{}", dir.path().join("lake").display());
    let log = dir.path().join("run.log");
    load_rows(&db, &tables, 1, 50).await;
    db.exec("INSERT INTO marker VALUES (1)").await;
    // 48 MiB ahead of the WAL: only this test's segment switches get there (other databases
    // of a cluster shared by tests write a few MiB at most).
    let now = db.wal_insert_lsn().await;
    let stop = slotlake::lsn::Lsn(now.0 + (48 << 20));
    let stop_text = stop.to_string();
    let extra = ["--stop-at", &stop_text, "--heartbeat-interval", "0"];
    let mut runner = Runner::start(&db, &root, &extra, &log);
    wait_for_marker(&root, None, 1, &log).await;
    assert!(
        runner.child.try_wait().unwrap().is_none(),
        "run keeps going short of --stop-at\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    load_rows(&db, &tables, 51, 50).await;
    // Each switch ends the current 16 MiB segment (the insert before it writes WAL into it):
    // four of them take the WAL past `stop`.
    for m in 2..6 {
        db.exec(&format!(
            "INSERT INTO marker VALUES ({m}); SELECT pg_switch_wal();"
        ))
        .await;
    }
    db.exec("INSERT INTO marker VALUES (6)").await;
    let status = tokio::time::timeout(Duration::from_secs(60), runner.child.wait())
        .await
        .expect("run stops by itself once past --stop-at")
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("reached --stop-at"), "{text}");
    assert!(
        confirmed_lsn(&db, &lake_slot(&db)).await >= stop,
        "the slot is confirmed past --stop-at\n{text}"
    );
    // Both loads (committed before `stop`) are in the change log, each row once.
    let rows = read_delta(&format!("{root}/changes/public/{}", tables[0]), None);
    let mut inserted: Vec<i64> = rows
        .iter()
        .filter(|r| r["_op"] == "I")
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    inserted.sort_unstable();
    assert_eq!(inserted, (1..=100).collect::<Vec<i64>>(), "{text}");
}

/// A tmpfs of `size` mounted at `dir` (needs root), unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    /// `None` when this environment cannot mount one (not root, or no `CAP_SYS_ADMIN`).
    fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk {
                dir: dir.to_path_buf(),
            }),
            Ok(o) => {
                eprintln!(
                    "cannot mount a tmpfs: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("cannot run mount: {e}");
                None
            }
        }
    }
}

impl SmallDisk {
    /// Fills the disk: a file grows until the filesystem refuses more. Returns the file (remove
    /// it to make room again).
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.dir.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// The lake's disk fills up mid-run: commits fail and are retried, nothing written during it is
/// confirmed, and once space is freed the run catches up with nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_confirms_nothing_unwritten_and_recovers() {
    // Mounting a small filesystem needs root with CAP_SYS_ADMIN, which CI has; elsewhere the
    // test says it did not run.
    let dir = tempfile::tempdir().unwrap();
    let disk = if is_root() {
        SmallDisk::mount(&dir.path().join("disk"), "16m")
    } else {
        None
    };
    let Some(disk) = disk else {
        eprintln!("SKIPPED a_full_disk_confirms_nothing_unwritten_and_recovers: cannot mount a tmpfs here");
        return;
    };
    let cluster = Cluster::shared();
    let db = cluster.create_db("fulldisk").await;
    let tables = setup(&db, 5).await;
    let lake_dir = disk.dir.join("lake");
    let root = format!("file://{}", lake_dir.display());
    let log = dir.path().join("run.log");
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let runner = Runner::start(&db, &root, &["--metrics-addr", &metrics_addr], &log);
    db.exec(&format!(
        "INSERT INTO {} (id) SELECT generate_series(1, 100); INSERT INTO marker VALUES (1)",
        tables[0]
    ))
    .await;
    wait_for_marker(&root, None, 1, &log).await;

    let filler = disk.fill();
    // Retries of writes to the lake only: commits, and opening (creating) a change log —
    // other stages retry for other reasons.
    let lake_retries = |m: &str| {
        metric(m, r#"slotlake_retries_total{stage="commit"}"#)
            + metric(m, r#"slotlake_retries_total{stage="open"}"#)
    };
    let retries_before = lake_retries(&scrape(metrics_port).await);
    // Into a table whose change log is open (its commits fail) and one whose change log is
    // yet to be created (creating it fails).
    db.exec(&format!(
        "SET synchronous_commit = on; INSERT INTO {} (id) SELECT generate_series(101, 400); INSERT INTO {} (id) SELECT generate_series(1, 500); INSERT INTO marker VALUES (2)",
        tables[0], tables[1]
    ))
    .await;
    let written_up_to = last_commit_end(&db).await;
    retried_without_confirming(
        &db,
        metrics_port,
        lake_retries,
        retries_before + 3.0,
        written_up_to,
        &log,
        "retries while the disk is full",
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("No space left on device"),
        "the log names the cause\n{text}"
    );

    std::fs::remove_file(&filler).unwrap();
    wait_for_marker(&root, None, 2, &log).await;
    runner.stop().await;
    assert_lake_is_oracle(&db, &root, None).await;
    assert!(confirmed_lsn(&db, &lake_slot(&db)).await >= written_up_to);
    drop(disk);
}

/// The spill directory fills up while a streamed transaction is spilled: the run stops with an
/// error naming the cause (an operator's matter, not retried), confirms nothing of the
/// transaction, and a restart once space is freed lands it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spill_disk_stops_the_run_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = if is_root() {
        SmallDisk::mount(&dir.path().join("spill"), "32m")
    } else {
        None
    };
    let Some(disk) = disk else {
        eprintln!(
            "SKIPPED a_full_spill_disk_stops_the_run_and_loses_nothing: cannot mount a tmpfs here"
        );
        return;
    };
    let cluster = Cluster::shared();
    let db = cluster.create_db("fullspill").await;
    let tables = setup(&db, 2).await;
    let root = format!("file://{}", dir.path().join("lake").display());
    let log = dir.path().join("run.log");
    let spill = disk.dir.display().to_string();
    let flags = ["--memory-budget", "4MiB", "--spill-dir", &spill];
    let mut runner = Runner::start(&db, &root, &flags, &log);
    db.exec(&format!(
        "INSERT INTO {} (id) SELECT generate_series(1, 10); INSERT INTO marker VALUES (1)",
        tables[0]
    ))
    .await;
    wait_for_marker(&root, None, 1, &log).await;

    let filler = disk.fill();
    // A transaction far larger than logical_decoding_work_mem (64kB here): streamed, and
    // spilled past a quarter of the 4 MiB budget.
    db.exec(&format!(
        "SET synchronous_commit = on; INSERT INTO {} (id, v) SELECT g, repeat('s', 200) FROM generate_series(100, 30099) g; INSERT INTO marker VALUES (2)",
        tables[1]
    ))
    .await;
    let written_up_to = last_commit_end(&db).await;
    let status = tokio::time::timeout(Duration::from_secs(120), runner.child.wait())
        .await
        .expect("run stops on a full spill disk")
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "exits with an error\n{text}");
    assert!(
        text.contains("cannot write the spill file") && text.contains("No space left on device"),
        "the error names the spill file and the cause\n{text}"
    );
    let confirmed = confirmed_lsn(&db, &lake_slot(&db)).await;
    assert!(
        confirmed < written_up_to,
        "confirmed {confirmed} past the transaction it could not spill ({written_up_to})"
    );

    std::fs::remove_file(&filler).unwrap();
    let runner = Runner::start(&db, &root, &flags, &log);
    wait_for_marker(&root, None, 2, &log).await;
    runner.stop().await;
    let want = assert_lake_is_oracle(&db, &root, None).await;
    assert_eq!(want[&tables[1]].len(), 30_000);
    let stopped = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        stopped
            .lines()
            .filter(|l| l.contains("stopped"))
            .any(|l| !l.contains("spilled_bytes=0") && l.contains("spilled_bytes=")),
        "the restarted run spilled the transaction\n{stopped}"
    );
    drop(disk);
}
