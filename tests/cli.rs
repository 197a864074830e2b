//! The `slotlake` binary: slot management end to end, and a clear message, a non-zero exit and
//! no change on the server for every way of getting it wrong.

mod support;

use std::time::Duration;

use support::*;

async fn slotlake(args: &[&str]) -> (i32, String, String) {
    run_slotlake(args, &[]).await
}

async fn slot_names(db: &TestDb) -> Vec<String> {
    db.exec("SELECT slot_name FROM pg_replication_slots ORDER BY 1")
        .await
        .iter()
        .map(|r| r.get("slot_name").unwrap().to_string())
        .collect()
}

async fn publication_names(db: &TestDb) -> Vec<String> {
    db.exec("SELECT pubname FROM pg_publication ORDER BY 1")
        .await
        .iter()
        .map(|r| r.get("pubname").unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn slot_lifecycle_create_list_status_tail_drop() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("lifecycle").await;
    db.exec(r#"CREATE SCHEMA "My Schema"; CREATE TABLE "My Schema"."Tä ble" (id int PRIMARY KEY, v text); CREATE TABLE other (id int PRIMARY KEY);"#)
        .await;
    let url = db.admin_url();
    let table = r#""My Schema"."Tä ble""#;
    let create = [
        "slot",
        "create",
        "--source",
        &url,
        "--slot",
        "life",
        "--publication",
        "Life Pub",
        "--create-publication",
        "--table",
        table,
    ];
    let (code, out, err) = slotlake(&create).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("created publication Life Pub") && out.contains("created slot life at "),
        "{out}"
    );
    // Idempotent.
    let (code, out, err) = slotlake(&create).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("publication Life Pub already exists")
            && out.contains("slot life already exists"),
        "{out}"
    );
    // A different definition is refused, and nothing changes.
    let (code, _, err) = slotlake(&[
        "slot",
        "create",
        "--source",
        &url,
        "--slot",
        "life",
        "--publication",
        "Life Pub",
        "--create-publication",
        "--table",
        "other",
    ])
    .await;
    assert_eq!(code, 3);
    assert!(
        err.contains("different definition") && err.contains("hint:"),
        "{err}"
    );
    let tables = db.exec("SELECT schemaname || '.' || tablename AS t FROM pg_publication_tables WHERE pubname = 'Life Pub'").await;
    assert_eq!(tables.len(), 1);
    assert_eq!(tables[0].get("t"), Some("My Schema.Tä ble"));

    let (code, out, _) = slotlake(&["slot", "list", "--source", &url]).await;
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("life ") && l.contains("pgoutput")),
        "{out}"
    );
    let (code, out, err) = slotlake(&[
        "slot", "status", "--source", &url, "--slot", "life", "--format", "json",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(status["plugin"], "pgoutput");
    assert_eq!(status["active"], false);
    assert_eq!(status["database"], db.name.as_str());
    assert_eq!(status["wal_status"], "reserved");
    assert!(status["retained_wal_bytes"]
        .as_i64()
        .is_some_and(|b| b >= 0));
    assert!(status["confirmed_flush_lsn"]
        .as_str()
        .is_some_and(|l| l.contains('/')));

    db.exec(r#"INSERT INTO "My Schema"."Tä ble" VALUES (1, 'a'), (2, 'b'); INSERT INTO other VALUES (1); UPDATE "My Schema"."Tä ble" SET v = 'c' WHERE id = 2"#).await;
    let (code, out, err) = slotlake(&[
        "tail",
        "--source",
        &url,
        "--slot",
        "life",
        "--publication",
        "Life Pub",
        "--limit",
        "3",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["table"], "Tä ble");
    assert_eq!(lines[0]["schema"], "My Schema");
    assert_eq!(lines[2]["op"], "U");
    assert_eq!(lines[2]["new"], serde_json::json!({"id": 2, "v": "c"}));

    let (code, out, _) = slotlake(&[
        "slot",
        "drop",
        "--source",
        &url,
        "--slot",
        "life",
        "--publication",
        "Life Pub",
        "--drop-publication",
    ])
    .await;
    assert_eq!(code, 0);
    assert!(
        out.contains("dropped slot life") && out.contains("dropped publication Life Pub"),
        "{out}"
    );
    assert!(slot_names(&db).await.is_empty());
    assert!(publication_names(&db).await.is_empty());
    let (code, _, err) = slotlake(&["slot", "status", "--source", &url, "--slot", "life"]).await;
    assert_eq!(code, 4);
    assert!(
        err.contains("does not exist") && err.contains("slotlake slot create"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_password_fails_clearly_and_never_prints_the_password() {
    let cluster = Cluster::shared();
    let secret = "Sup3r-S3cret-Value";
    let url = format!(
        "postgresql://{SCRAM_USER}:{secret}@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port
    );
    for args in [
        vec!["slot", "list", "--source", &url],
        vec!["tail", "--source", &url, "--slot", "x"],
    ] {
        let (code, out, err) = slotlake(&args).await;
        assert_eq!(code, 3);
        assert!(
            err.contains("password authentication failed") && err.contains("28P01"),
            "{err}"
        );
        assert!(
            err.contains("hint: check the user name and password"),
            "{err}"
        );
        assert!(
            !err.contains(secret) && !out.contains(secret),
            "password leaked: {err}"
        );
    }
    // Also when given through the environment and logged at debug level.
    let (code, _, err) = run_slotlake(
        &["slot", "list", "--log-level", "trace"],
        &[("SLOTLAKE_SOURCE", &url)],
    )
    .await;
    assert_eq!(code, 3);
    assert!(!err.contains(secret), "password leaked: {err}");
}

#[tokio::test]
async fn unreachable_host_and_tls_failure() {
    let cluster = Cluster::shared();
    let port = free_port();
    let (code, _, err) = slotlake(&[
        "slot",
        "list",
        "--source",
        &format!("postgresql://x@127.0.0.1:{port}/d?sslmode=disable"),
    ])
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot connect to 127.0.0.1") && err.contains("hint:"),
        "{err}"
    );

    let url = format!(
        "postgresql://{SCRAM_USER}:{}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        urlencode(SCRAM_PASSWORD),
        cluster.port,
        cluster.wrong_ca_pem.display()
    );
    let (code, _, err) = slotlake(&["slot", "list", "--source", &url]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("TLS handshake") && err.contains("sslrootcert"),
        "{err}"
    );
    // And with the right CA it works.
    let url = url.replace(
        &cluster.wrong_ca_pem.display().to_string(),
        &cluster.ca_pem.display().to_string(),
    );
    let (code, _, err) = slotlake(&["slot", "list", "--source", &url]).await;
    assert_eq!(code, 0, "{err}");
}

#[tokio::test]
async fn missing_replication_privilege_changes_nothing() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("norepl").await;
    let url = format!(
        "postgresql://{NOREPL_USER}:{NOREPL_PASSWORD}@127.0.0.1:{}/{}?sslmode=disable",
        cluster.port, db.name
    );
    let (code, _, err) = slotlake(&[
        "slot",
        "create",
        "--source",
        &url,
        "--slot",
        "s",
        "--create-publication",
        "--table",
        "t",
    ])
    .await;
    assert_eq!(code, 3);
    assert!(
        err.contains("42501") && err.contains("ALTER ROLE") && err.contains("REPLICATION"),
        "{err}"
    );
    assert!(slot_names(&db).await.is_empty());
    assert!(publication_names(&db).await.is_empty());
}

#[tokio::test]
async fn wal_level_not_logical_changes_nothing() {
    let cluster = std::sync::Arc::new(Cluster::start(&["wal_level = replica"]));
    let db = cluster.create_db("wal").await;
    let (code, _, err) = slotlake(&[
        "slot",
        "create",
        "--source",
        &db.admin_url(),
        "--slot",
        "s",
        "--create-publication",
    ])
    .await;
    assert_eq!(code, 3);
    assert!(
        err.contains("wal_level = replica") && err.contains("hint: set wal_level = logical"),
        "{err}"
    );
    assert!(slot_names(&db).await.is_empty());
    assert!(publication_names(&db).await.is_empty());
    // `setup` names the missing prerequisite and its exact fix, and applies nothing.
    let (code, out, err) = slotlake(&["setup", "--source", &db.admin_url()]).await;
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.contains("MISSING wal_level") && out.contains("ALTER SYSTEM SET wal_level = logical"),
        "{out}"
    );
    assert!(!schema_exists(&db, "slotlake").await);
}

async fn schema_exists(db: &TestDb, schema: &str) -> bool {
    let rows = db
        .exec(&format!(
            "SELECT count(*)::text AS n FROM pg_namespace WHERE nspname = '{schema}'"
        ))
        .await;
    rows[0].get("n") == Some("1")
}

#[tokio::test]
async fn setup_applies_migrations_once_and_dry_run_changes_nothing() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("setup").await;
    // Dry run: the checks pass, the SQL is printed, nothing is created.
    let (code, out, err) = slotlake(&["setup", "--source", &db.url(), "--dry-run"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok      wal_level") && out.contains("would apply migration 0001"),
        "{out}"
    );
    assert!(
        out.contains("CREATE SCHEMA IF NOT EXISTS slotlake"),
        "{out}"
    );
    assert!(!schema_exists(&db, "slotlake").await);
    // Applied once, recorded, and a second run applies nothing.
    let (code, out, err) = slotlake(&["setup", "--source", &db.url()]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("applied migration 0001 slotlake_schema"),
        "{out}"
    );
    let (code, out, _) = slotlake(&["setup", "--source", &db.url()]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("nothing to do") && !out.contains("applied migration"),
        "{out}"
    );
    let rows = db
        .exec("SELECT count(*)::text AS n FROM slotlake.migrations WHERE version = 1")
        .await;
    assert_eq!(rows[0].get("n"), Some("1"));
    // A role without REPLICATION: the exact GRANT/ALTER to run.
    let norepl = format!(
        "postgresql://{NOREPL_USER}:{NOREPL_PASSWORD}@127.0.0.1:{}/{}?sslmode=disable",
        cluster.port(),
        db.name
    );
    let (code, out, _) = slotlake(&["setup", "--source", &norepl]).await;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("MISSING replication privilege")
            && out.contains(&format!("ALTER ROLE {NOREPL_USER} REPLICATION;")),
        "{out}"
    );
}

#[tokio::test]
async fn exhausted_replication_slots_change_nothing() {
    let cluster = std::sync::Arc::new(Cluster::start(&["max_replication_slots = 1"]));
    let db = cluster.create_db("slots").await;
    let url = db.admin_url();
    let (code, _, err) = slotlake(&["slot", "create", "--source", &url, "--slot", "first"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = slotlake(&[
        "slot",
        "create",
        "--source",
        &url,
        "--slot",
        "second",
        "--publication",
        "p2",
        "--create-publication",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("53400") && err.contains("max_replication_slots"),
        "{err}"
    );
    assert_eq!(slot_names(&db).await, vec!["first".to_string()]);
    assert!(
        publication_names(&db).await.is_empty(),
        "the publication made for the failed slot was undone"
    );
}

#[tokio::test]
async fn active_missing_and_misnamed_slots_and_missing_publication() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("active").await;
    let url = db.admin_url();
    let (code, _, err) = slotlake(&[
        "slot",
        "create",
        "--source",
        &url,
        "--slot",
        "busy",
        "--create-publication",
    ])
    .await;
    assert_eq!(code, 0, "{err}");

    // A first tail holds the slot.
    let mut first = tokio::process::Command::new(slotlake_bin())
        .args(["tail", "--source", &url, "--slot", "busy"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = db
            .exec("SELECT active::text FROM pg_replication_slots WHERE slot_name = 'busy'")
            .await;
        if rows[0].get("active") == Some("true") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "first tail never became active"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _, err) = slotlake(&["tail", "--source", &url, "--slot", "busy"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("is active for PID")
            && err.contains("55006")
            && err.contains("another process"),
        "{err}"
    );
    first.kill().await.unwrap();

    let (code, _, err) = slotlake(&["tail", "--source", &url, "--slot", "nope"]).await;
    assert_eq!(code, 4);
    assert!(
        err.contains("replication slot \"nope\" does not exist")
            && err.contains("slotlake slot create"),
        "{err}"
    );

    let (code, _, err) = slotlake(&[
        "tail",
        "--source",
        &url,
        "--slot",
        "busy",
        "--publication",
        "No Such Pub",
    ])
    .await;
    assert_eq!(code, 3);
    assert!(
        err.contains("publication \"No Such Pub\" does not exist")
            && err.contains("--create-publication"),
        "{err}"
    );

    let (code, _, err) =
        slotlake(&["slot", "create", "--source", &url, "--slot", "Bad Name"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("invalid slot name"), "{err}");
    assert_eq!(slot_names(&db).await, vec!["busy".to_string()]);
}
