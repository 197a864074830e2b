//! The replication stream and pgoutput decoder against a real server: every message type,
//! streamed transactions with aborted subtransactions, whole-transaction aborts, and the
//! decoded `tail` output.

mod support;

use std::collections::BTreeSet;

use slotlake::lsn::Lsn;
use slotlake::pgoutput::{Decoder, PgOutputMessage};
use slotlake::replication::slot::{self, PublicationScope, SnapshotAction};
use slotlake::replication::stream::{ReplicationMessage, ReplicationStream, StreamOptions};
use slotlake::replication::{ConnInfo, PgConnection, SessionKind};
use slotlake::tail::{self, TailOptions};
use support::*;

const END_MARKER: &str = "slotlake-test-end";

/// Creates publication `pub` (all tables) and slot `slot` in the test database.
async fn setup_slot(db: &TestDb, slot_name: &str) -> ConnInfo {
    // FOR ALL TABLES needs a superuser; the slot and the stream use the unprivileged SCRAM role.
    let mut admin = db.admin().await;
    slot::ensure_publication(&mut admin, "pub", &PublicationScope::AllTables)
        .await
        .unwrap();
    admin.close().await;
    let info = ConnInfo::parse(&db.url()).unwrap();
    let mut repl = PgConnection::connect(&info, SessionKind::Replication)
        .await
        .unwrap();
    slot::create_slot(&mut repl, slot_name, SnapshotAction::None)
        .await
        .unwrap();
    repl.close().await;
    info
}

/// Emits the end marker (non-transactional logical message) so readers know where to stop.
async fn emit_end(db: &TestDb) {
    db.exec(&format!(
        "SELECT pg_logical_emit_message(false, '{END_MARKER}', 'x')"
    ))
    .await;
}

/// Reads raw decoded messages from the slot until the end marker.
async fn drain(info: &ConnInfo, slot_name: &str, binary: bool) -> Vec<PgOutputMessage> {
    let repl = PgConnection::connect(info, SessionKind::Replication)
        .await
        .unwrap();
    let mut opts = StreamOptions::new(vec!["pub".into()]);
    opts.binary = binary;
    let mut stream = ReplicationStream::start(repl, slot_name, Lsn::INVALID, opts)
        .await
        .unwrap();
    assert_eq!(stream.proto_version(), 2, "proto 2 on PG >= 14");
    let mut decoder = Decoder::new(stream.proto_version());
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(60), stream.next_message())
            .await
            .expect("stream stalled")
            .unwrap()
            .expect("stream ended");
        if let ReplicationMessage::XLogData { data, .. } = msg {
            let m = decoder.decode(&data).unwrap();
            if let PgOutputMessage::Message { message, .. } = &m {
                if message.prefix == END_MARKER {
                    break;
                }
            }
            out.push(m);
        }
    }
    stream.stop().await.unwrap().close().await;
    out
}

fn kind(m: &PgOutputMessage) -> &'static str {
    match m {
        PgOutputMessage::Begin(_) => "Begin",
        PgOutputMessage::Commit(_) => "Commit",
        PgOutputMessage::Origin(_) => "Origin",
        PgOutputMessage::Relation { .. } => "Relation",
        PgOutputMessage::Type { .. } => "Type",
        PgOutputMessage::Insert { .. } => "Insert",
        PgOutputMessage::Update { .. } => "Update",
        PgOutputMessage::Delete { .. } => "Delete",
        PgOutputMessage::Truncate { .. } => "Truncate",
        PgOutputMessage::Message { .. } => "Message",
        PgOutputMessage::StreamStart(_) => "StreamStart",
        PgOutputMessage::StreamStop => "StreamStop",
        PgOutputMessage::StreamCommit(_) => "StreamCommit",
        PgOutputMessage::StreamAbort(_) => "StreamAbort",
    }
}

#[tokio::test]
async fn every_pgoutput_message_type_decodes_from_a_real_server() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("msgs").await;
    db.exec(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE t (id int PRIMARY KEY, v text, m mood);
         CREATE TABLE f (id int, v text); ALTER TABLE f REPLICA IDENTITY FULL;",
    )
    .await;
    let info = setup_slot(&db, "msgs").await;
    db.exec(
        "INSERT INTO t VALUES (1, 'a', 'ok'), (2, 'b', 'sad');
         UPDATE t SET v = 'a2' WHERE id = 1;
         UPDATE t SET id = 10 WHERE id = 2;
         DELETE FROM t WHERE id = 1;
         INSERT INTO f VALUES (1, 'x'); UPDATE f SET v = 'y'; DELETE FROM f;
         TRUNCATE t, f;
         BEGIN; SELECT pg_logical_emit_message(true, 'tx-prefix', 'in a transaction'); INSERT INTO t VALUES (3, 'c', 'happy'); COMMIT;
         SELECT pg_replication_origin_create('test_origin');",
    )
    .await;
    // A transaction replayed under a replication origin carries an Origin message.
    db.exec(
        "SELECT pg_replication_origin_session_setup('test_origin');
         BEGIN; SELECT pg_replication_origin_xact_setup('0/AB', now()); INSERT INTO t VALUES (4, 'd', 'ok'); COMMIT;
         SELECT pg_replication_origin_session_reset();",
    )
    .await;
    // A transaction big enough to be streamed (logical_decoding_work_mem = 64kB in the harness),
    // with a rolled-back subtransaction, and one that aborts as a whole.
    db.exec(
        "BEGIN;
         INSERT INTO t SELECT g, repeat('s', 100), 'ok' FROM generate_series(100, 2099) g;
         SAVEPOINT s1;
         INSERT INTO t SELECT g, repeat('r', 100), 'sad' FROM generate_series(5000, 6999) g;
         ROLLBACK TO SAVEPOINT s1;
         INSERT INTO t SELECT g, repeat('k', 100), 'happy' FROM generate_series(8000, 8999) g;
         COMMIT;
         BEGIN; INSERT INTO t SELECT g, repeat('z', 100), 'ok' FROM generate_series(20000, 23999) g; ROLLBACK;",
    )
    .await;
    emit_end(&db).await;

    let msgs = drain(&info, "msgs", false).await;
    let seen: BTreeSet<&str> = msgs.iter().map(kind).collect();
    let all: BTreeSet<&str> = [
        "Begin",
        "Commit",
        "Origin",
        "Relation",
        "Type",
        "Insert",
        "Update",
        "Delete",
        "Truncate",
        "Message",
        "StreamStart",
        "StreamStop",
        "StreamCommit",
        "StreamAbort",
    ]
    .into_iter()
    .collect();
    assert_eq!(seen, all, "every message type was decoded");

    // Update with key change carries K; REPLICA IDENTITY FULL carries O.
    use slotlake::pgoutput::OldTuple;
    assert!(msgs.iter().any(|m| matches!(m, PgOutputMessage::Update { update, .. } if matches!(update.old, Some(OldTuple::Key(_))))));
    assert!(msgs.iter().any(|m| matches!(m, PgOutputMessage::Update { update, .. } if matches!(update.old, Some(OldTuple::Full(_))))));
    assert!(msgs.iter().any(
        |m| matches!(m, PgOutputMessage::Truncate { truncate, .. } if truncate.relations.len() == 2)
    ));
    // Both a subtransaction abort and a whole-transaction abort were streamed.
    let aborts: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            PgOutputMessage::StreamAbort(a) => Some(a.xid == a.subxid),
            _ => None,
        })
        .collect();
    assert!(
        aborts.contains(&false),
        "a subtransaction abort: {aborts:?}"
    );
    assert!(
        aborts.contains(&true),
        "a whole-transaction abort: {aborts:?}"
    );
}

#[tokio::test]
async fn streamed_transaction_keeps_exactly_the_committed_changes() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("streamed").await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE marker (id int PRIMARY KEY);",
    )
    .await;
    let info = setup_slot(&db, "streamed").await;
    db.exec(
        "BEGIN;
         INSERT INTO t SELECT g, repeat('s', 200) FROM generate_series(1, 3000) g;
         SAVEPOINT a;
         INSERT INTO t SELECT g, 'aborted' FROM generate_series(10001, 12000) g;
         SAVEPOINT b;
         INSERT INTO t SELECT g, 'aborted-nested' FROM generate_series(20001, 21000) g;
         ROLLBACK TO SAVEPOINT a;
         SAVEPOINT c;
         INSERT INTO t SELECT g, 'kept' FROM generate_series(30001, 31000) g;
         RELEASE SAVEPOINT c;
         UPDATE t SET v = 'updated' WHERE id <= 10;
         DELETE FROM t WHERE id > 2990 AND id <= 3000;
         COMMIT;
         BEGIN; INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(40001, 45000) g; ROLLBACK;
         INSERT INTO marker VALUES (1);",
    )
    .await;
    // 3000 inserts + 1000 kept + 10 updates + 10 deletes, then the marker.
    let lines = tail_json(&info, "streamed", "pub", 4021, false, false).await;
    let last = lines.last().unwrap();
    assert_eq!(
        last["table"], "marker",
        "nothing after the streamed transaction but the marker"
    );
    let body = &lines[..4020];
    let ids: Vec<i64> = body
        .iter()
        .filter(|l| l["op"] == "I")
        .map(|l| l["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 4000);
    assert!(
        ids.iter()
            .all(|id| (1..=3000).contains(id) || (30001..=31000).contains(id)),
        "no aborted rows"
    );
    assert_eq!(body.iter().filter(|l| l["op"] == "U").count(), 10);
    assert_eq!(body.iter().filter(|l| l["op"] == "D").count(), 10);
    // One transaction: one commit LSN, seq 0..n in order.
    let lsns: BTreeSet<&str> = body.iter().map(|l| l["lsn"].as_str().unwrap()).collect();
    assert_eq!(lsns.len(), 1);
    let seqs: Vec<u64> = body.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..4020).collect::<Vec<_>>());
}

#[tokio::test]
async fn tail_without_confirm_leaves_the_slot_and_with_confirm_advances_it() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("confirm").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let info = setup_slot(&db, "confirm").await;
    db.exec("INSERT INTO t SELECT generate_series(1, 5)").await;
    let confirmed = |db: &TestDb| {
        let db_admin = db.admin_url();
        async move {
            let mut c =
                PgConnection::connect(&ConnInfo::parse(&db_admin).unwrap(), SessionKind::Sql)
                    .await
                    .unwrap();
            let s = slot::slot_info(&mut c, "confirm").await.unwrap().unwrap();
            s.confirmed_flush_lsn.unwrap().parse::<Lsn>().unwrap()
        }
    };
    let before = confirmed(&db).await;
    let a = tail_json(&info, "confirm", "pub", 5, false, false).await;
    assert_eq!(confirmed(&db).await, before, "plain tail confirms nothing");
    // Read again: the same changes come back.
    let b = tail_json(&info, "confirm", "pub", 5, false, true).await;
    assert_eq!(a, b);
    let after = confirmed(&db).await;
    assert!(
        after > before,
        "--confirm advanced the slot: {before} -> {after}"
    );
    db.exec("INSERT INTO t VALUES (6)").await;
    let c = tail_json(&info, "confirm", "pub", 1, false, false).await;
    assert_eq!(c[0]["new"]["id"], 6, "confirmed changes are not sent again");
}

#[tokio::test]
async fn identifiers_that_need_quoting_survive_everywhere() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("quoting").await;
    db.exec(
        r#"CREATE SCHEMA "My Schema";
           CREATE TABLE "My Schema"."Tä ble ""x""" ("Id Col" int PRIMARY KEY, "ünï" text);"#,
    )
    .await;
    let info = ConnInfo::parse(&db.url()).unwrap();
    let mut repl = db.admin().await;
    let table = slotlake::replication::sql::TableName {
        schema: "My Schema".into(),
        name: "Tä ble \"x\"".into(),
    };
    let scope = PublicationScope::Tables([table].into_iter().collect());
    slot::ensure_publication(&mut repl, "Pub Näme", &scope)
        .await
        .unwrap();
    assert_eq!(
        slot::ensure_publication(&mut repl, "Pub Näme", &scope)
            .await
            .unwrap(),
        slot::PublicationOutcome::AlreadyExists
    );
    repl.close().await;
    let mut repl = PgConnection::connect(&info, SessionKind::Replication)
        .await
        .unwrap();
    slot::create_slot(&mut repl, "quoting", SnapshotAction::None)
        .await
        .unwrap();
    repl.close().await;
    db.exec(r#"INSERT INTO "My Schema"."Tä ble ""x""" VALUES (1, 'ü')"#)
        .await;
    let opts = TailOptions {
        slot: "quoting".into(),
        publication: "Pub Näme".into(),
        limit: Some(1),
        confirm: false,
        binary: false,
        messages: false,
        discard: false,
        start_lsn: Lsn::INVALID,
        status_interval: std::time::Duration::from_secs(10),
    };
    let mut out = Vec::new();
    tail::run(&info, &opts, &mut out, std::future::pending())
        .await
        .unwrap();
    let line: serde_json::Value = serde_json::from_slice(out.trim_ascii_end()).unwrap();
    assert_eq!(line["schema"], "My Schema");
    assert_eq!(line["table"], "Tä ble \"x\"");
    assert_eq!(line["new"]["Id Col"], 1);
    assert_eq!(line["new"]["ünï"], "ü");
}
