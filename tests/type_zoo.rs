//! The type zoo: a table with every type in the mapping, its rows streamed through `tail` in
//! text and in binary form, compared with what `SELECT` returns for the same rows.
//!
//! Two oracles: (1) the server's own text output of every column (`SELECT col::text`), parsed
//! by the text parser, must give the same JSON as the streamed value — in text mode this checks
//! pgoutput decoding end to end, in binary mode it checks the independent binary parser against
//! the text parser; (2) hand-written expectations for the values most likely to go wrong.

mod support;

use std::collections::BTreeMap;

use serde_json::{json, Value as Json};
use slotlake::replication::slot::{self, PublicationScope, SnapshotAction};
use slotlake::replication::sql::TableName;
use slotlake::replication::{ConnInfo, PgConnection, SessionKind};
use slotlake::types::catalog::TypeCatalog;
use slotlake::types::{json as vjson, text};
use support::*;

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'très ☺');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN money2 AS numeric(10,2);
CREATE TABLE zoo (
  id int PRIMARY KEY,
  b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
  n numeric, n102 numeric(10,2), nbig numeric(40,5),
  t text, vc varchar(20), ch char(5), nm name, c1 \"char\",
  by bytea, u uuid, d date, ts timestamp, tstz timestamptz, tm time, tmtz timetz, iv interval,
  j json, jb jsonb,
  ai int[], at text[], a2 int[], an numeric[], ats timestamptz[], ab bool[], au uuid[],
  e mood, ea mood[], dp posint, dm money2, o oid,
  big text
);
CREATE TABLE odd (id int PRIMARY KEY, pt point, rng int4range, inet_ inet);
";

const ROWS: &str = "
INSERT INTO zoo VALUES (1,
  true, 32767, -2147483648, 9223372036854775807, 1.1, 3.141592653589793,
  123.4500, 12.5, -123456789012345678901234567890.12345,
  'hello', 'world', 'ab', 'name', 'x',
  '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '2024-02-29 12:34:56.789',
  '2024-02-29 12:34:56.789+05:30', '23:59:59.999999', '12:00:00+02', '1 year 2 months 3 days 04:05:06.5',
  '{\"a\": [1, 2.50, null], \"b\": \"ü\"}', '{\"z\": 1, \"a\": 12345678901234567890.5}',
  '{1,2,3}', '{\"a\",NULL,\"b c\",\"q\\\"x\",\"NULL\"}', '{{1,2},{3,4}}', '{1.5,NaN,-0.001}',
  '{\"2024-01-01 00:00:00+00\",infinity}', '{t,f,NULL}', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}',
  'happy', '{sad,\"très ☺\"}', 5, 12.5, 4000000000,
  'small');
INSERT INTO zoo (id) VALUES (2);
INSERT INTO zoo VALUES (3,
  false, -32768, 2147483647, -9223372036854775808, '-Infinity', 'NaN',
  'NaN', -0.01, 0,
  'ünïcödé ☺ 𝄞 \"quotes\" and \\backslash', '', '', '', '',
  '\\x', '00000000-0000-0000-0000-000000000000', '0044-03-15 BC', 'infinity',
  '-infinity', '00:00:00', '00:00:00-09:30', '-1 years -2 mons +3 days -04:05:06',
  '[]', 'null',
  '{}', '{}', '{}', '{}', '{}', '{}', '{}',
  'ok', '{}', 1, -99999999.99, 0,
  NULL);
INSERT INTO zoo (id, n, f4, f8, d, ts, tstz) VALUES (4, 'Infinity', 'NaN', '-0', 'infinity', '4713-01-01 00:00:00 BC', '294000-06-30 23:59:59.999999+00');
INSERT INTO odd VALUES (1, '(1.5,2)', '[1,10)', '192.168.0.1/24');
";

async fn column_types(
    conn: &mut PgConnection,
    table: &str,
) -> Vec<(String, slotlake::types::PgType)> {
    let rows = conn
        .simple_query(&format!(
            "SELECT attname, atttypid::int8::text AS oid, atttypmod::text AS typmod FROM pg_attribute \
             WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        ))
        .await
        .unwrap();
    let mut catalog = TypeCatalog::new();
    let mut out = Vec::new();
    for r in rows {
        let oid: u32 = r.get("oid").unwrap().parse().unwrap();
        let typmod: i32 = r.get("typmod").unwrap().parse().unwrap();
        let t = catalog.resolve(conn, oid, typmod).await.unwrap();
        out.push((r.get("attname").unwrap().to_string(), t));
    }
    out
}

/// Every row of `table` as the JSON tail should print, from the server's own text output.
async fn expected_rows(db: &TestDb, table: &str) -> BTreeMap<i64, serde_json::Map<String, Json>> {
    let mut conn = db.admin().await;
    let cols = column_types(&mut conn, table).await;
    let select = cols
        .iter()
        .map(|(c, _)| c.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let rows = conn
        .simple_query(&format!("SELECT {select} FROM {table} ORDER BY id"))
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for r in rows {
        let mut obj = serde_json::Map::new();
        for (i, (name, ty)) in cols.iter().enumerate() {
            let v = match &r.values()[i] {
                None => Json::Null,
                Some(s) => vjson::to_json(
                    &text::parse(ty, s.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}")),
                ),
            };
            obj.insert(name.clone(), v);
        }
        out.insert(obj["id"].as_i64().unwrap(), obj);
    }
    out
}

#[tokio::test]
async fn every_type_streams_as_select_returns_it_in_text_and_binary_form() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("zoo").await;
    db.exec(SCHEMA).await;
    // A 1 MiB incompressible value, stored out of line (TOAST).
    db.exec("CREATE TABLE src AS SELECT string_agg(md5(g::text), '') AS big FROM generate_series(1, 32768) g").await;
    let mut admin = db.admin().await;
    let zoo = TableName::parse("zoo").unwrap();
    slot::ensure_publication(
        &mut admin,
        "zoo_pub",
        &PublicationScope::Tables([zoo].into_iter().collect()),
    )
    .await
    .unwrap();
    slot::ensure_publication(
        &mut admin,
        "odd_pub",
        &PublicationScope::Tables([TableName::parse("odd").unwrap()].into_iter().collect()),
    )
    .await
    .unwrap();
    admin.close().await;
    let info = ConnInfo::parse(&db.url()).unwrap();
    let mut repl = PgConnection::connect(&info, SessionKind::Replication)
        .await
        .unwrap();
    for s in ["zoo_text", "zoo_binary", "odd_text"] {
        slot::create_slot(&mut repl, s, SnapshotAction::None)
            .await
            .unwrap();
    }
    repl.close().await;

    db.exec(ROWS).await;
    db.exec("UPDATE zoo SET big = (SELECT big FROM src) WHERE id = 3")
        .await;
    let expected = expected_rows(&db, "zoo").await;
    // Then an update that leaves the TOASTed value alone: it is not sent.
    db.exec("UPDATE zoo SET i4 = 7 WHERE id = 3").await;

    for (slot_name, binary) in [("zoo_text", false), ("zoo_binary", true)] {
        let lines = tail_json(&info, slot_name, "zoo_pub", 6, binary, false).await;
        let inserts: BTreeMap<i64, &Json> = lines
            .iter()
            .filter(|l| l["op"] == "I")
            .map(|l| (l["new"]["id"].as_i64().unwrap(), &l["new"]))
            .collect();
        assert_eq!(inserts.len(), 4);
        for id in [1, 2, 4] {
            let got = inserts[&id].as_object().unwrap();
            let want = &expected[&id];
            for (col, v) in want {
                assert_eq!(got.get(col), Some(v), "{slot_name}: row {id} column {col}");
            }
            assert_eq!(
                got.len(),
                want.len(),
                "{slot_name}: row {id} has every column"
            );
        }
        // Row 3 as first updated (big set): equals SELECT, big included.
        let upd_big = &lines[4]["new"];
        assert_eq!(lines[4]["op"], "U");
        for (col, v) in &expected[&3] {
            assert_eq!(upd_big.get(col), Some(v), "{slot_name}: row 3 column {col}");
        }
        assert_eq!(upd_big["big"].as_str().unwrap().len(), 1 << 20);
        // The second update did not resend the TOASTed value.
        let upd = &lines[5];
        assert_eq!(upd["op"], "U");
        assert_eq!(upd["unchanged"], json!(["big"]), "{slot_name}");
        assert!(upd["new"].get("big").is_none());
        assert_eq!(upd["new"]["i4"], 7);

        // Independent expectations for the tricky values.
        let r1 = inserts[&1];
        assert_eq!(r1["i8"], json!(9223372036854775807i64));
        assert_eq!(r1["f4"], json!(1.1));
        assert_eq!(r1["f8"], json!(std::f64::consts::PI));
        assert_eq!(r1["n"], "123.4500");
        assert_eq!(r1["nbig"], "-123456789012345678901234567890.12345");
        assert_eq!(r1["ch"], "ab   ");
        assert_eq!(r1["by"], "\\x00ff10");
        assert_eq!(r1["u"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        assert_eq!(r1["d"], "2024-02-29");
        assert_eq!(r1["ts"], "2024-02-29T12:34:56.789");
        assert_eq!(r1["tstz"], "2024-02-29T07:04:56.789Z");
        assert_eq!(r1["tm"], "23:59:59.999999");
        assert_eq!(r1["tmtz"], "12:00:00+02:00");
        assert_eq!(r1["iv"], "P1Y2M3DT4H5M6.5S");
        assert_eq!(r1["jb"], "{\"a\": 12345678901234567890.5, \"z\": 1}");
        assert_eq!(r1["at"], json!(["a", null, "b c", "q\"x", "NULL"]));
        assert_eq!(r1["a2"], json!([[1, 2], [3, 4]]));
        assert_eq!(r1["an"], json!(["1.5", "NaN", "-0.001"]));
        assert_eq!(r1["ats"], json!(["2024-01-01T00:00:00Z", "infinity"]));
        assert_eq!(r1["e"], "happy");
        assert_eq!(r1["ea"], json!(["sad", "très ☺"]));
        assert_eq!(r1["dp"], 5);
        assert_eq!(r1["dm"], "12.50");
        assert_eq!(r1["o"], json!(4000000000u64));
        let r2 = inserts[&2];
        assert!(
            r2.as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| k == "id" || v.is_null()),
            "all NULL"
        );
        let r3 = upd_big;
        assert_eq!(r3["f4"], "-Infinity");
        assert_eq!(r3["f8"], "NaN");
        assert_eq!(r3["n"], "NaN");
        assert_eq!(r3["t"], "ünïcödé ☺ 𝄞 \"quotes\" and \\backslash");
        assert_eq!(r3["d"], "0044-03-15 BC");
        assert_eq!(r3["ts"], "infinity");
        assert_eq!(r3["tstz"], "-infinity");
        assert_eq!(r3["ai"], json!([]));
        assert_eq!(r3["by"], "\\x");
        let r4 = inserts[&4];
        assert_eq!(r4["n"], "Infinity");
        assert_eq!(r4["f8"], json!(-0.0));
        assert_eq!(r4["d"], "infinity");
        assert_eq!(r4["ts"], "4713-01-01T00:00:00 BC");
        assert_eq!(r4["tstz"], "294000-06-30T23:59:59.999999Z");
    }

    // Types without a mapping arrive as their text form.
    let odd = tail_json(&info, "odd_text", "odd_pub", 1, false, false).await;
    assert_eq!(odd[0]["new"]["pt"], "(1.5,2)");
    assert_eq!(odd[0]["new"]["rng"], "[1,10)");
    assert_eq!(odd[0]["new"]["inet_"], "192.168.0.1/24");
}

#[tokio::test]
async fn a_thousand_digit_numeric_is_exact() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("bignum").await;
    db.exec("CREATE TABLE n (id int PRIMARY KEY, v numeric)")
        .await;
    let mut admin = db.admin().await;
    slot::ensure_publication(&mut admin, "p", &PublicationScope::AllTables)
        .await
        .unwrap();
    admin.close().await;
    let info = ConnInfo::parse(&db.url()).unwrap();
    let mut repl = PgConnection::connect(&info, SessionKind::Replication)
        .await
        .unwrap();
    slot::create_slot(&mut repl, "bn_text", SnapshotAction::None)
        .await
        .unwrap();
    slot::create_slot(&mut repl, "bn_bin", SnapshotAction::None)
        .await
        .unwrap();
    repl.close().await;
    db.exec(
        "INSERT INTO n VALUES (1, (repeat('9876543210', 100) || '.' || repeat('0123456789', 50))::numeric),
                              (2, -(repeat('1', 1000))::numeric / 7),
                              (3, 0.000000000000000000001)",
    )
    .await;
    let want = db.exec("SELECT v::text FROM n ORDER BY id").await;
    for (slot_name, binary) in [("bn_text", false), ("bn_bin", true)] {
        let lines = tail_json(&info, slot_name, "p", 3, binary, false).await;
        for (line, row) in lines.iter().zip(&want) {
            let v = line["new"]["v"].as_str().unwrap();
            assert_eq!(Some(v), row.get("v"), "{slot_name}");
        }
        assert!(lines[0]["new"]["v"].as_str().unwrap().len() > 1000);
    }
}

fn copy_stamp() -> slotlake::source::RowStamp {
    slotlake::source::RowStamp {
        lsn: 5,
        first_seq: 0,
        commit_ts_micros: 0,
    }
}

/// `table` described as slotlake describes it, and its rows read through the snapshot's binary
/// `COPY` reader, in the session's current transaction.
async fn copy_table(
    conn: &mut PgConnection,
    info: &ConnInfo,
    catalog: &mut TypeCatalog,
    catalog_conn: &mut Option<PgConnection>,
    table: &str,
) -> (
    slotlake::source::SourceTable,
    Vec<deltalake::arrow::array::RecordBatch>,
) {
    let name = TableName::parse(table).unwrap();
    let described = slotlake::source::describe(conn, catalog, catalog_conn, info, &name, "none")
        .await
        .unwrap();
    let mut cursor = slotlake::source::Cursor::open(conn, &described, None, copy_stamp())
        .await
        .unwrap();
    let mut batches = Vec::new();
    while let Some(b) = cursor.next(conn).await.unwrap() {
        batches.push(b);
    }
    (described, batches)
}

/// The snapshot reader (binary `COPY`, types without a binary parser as `::text`) gives the
/// same Arrow batch as the text form of `SELECT` parsed by the text parser, for every type;
/// and a failed `COPY` leaves the session usable.
#[tokio::test]
async fn binary_copy_reads_every_type_as_its_text_form_does() {
    use slotlake::batch::rows::ChangeBatchBuilder;
    use slotlake::source::{describe, Cursor};
    use slotlake::types::{ColumnValue, Value};

    let cluster = Cluster::shared();
    let db = cluster.create_db("zoo_copy").await;
    db.exec(SCHEMA).await;
    db.grant_select().await;
    db.exec(ROWS).await;
    db.exec("UPDATE zoo SET big = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 32768) g) WHERE id = 3")
        .await;
    let info = ConnInfo::parse(&db.url()).unwrap();
    let mut conn = PgConnection::connect(&info, SessionKind::Sql)
        .await
        .unwrap();
    let mut catalog = TypeCatalog::new();
    let mut catalog_conn = None;
    let stamp = copy_stamp();
    for t in ["zoo", "odd"] {
        conn.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap();
        let (table, got) = copy_table(&mut conn, &info, &mut catalog, &mut catalog_conn, t).await;
        // The oracle: the same rows as text, in the same transaction and scan order.
        let columns = table
            .names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = conn
            .simple_query(&format!("SELECT {columns} FROM {t}"))
            .await
            .unwrap();
        conn.simple_query("COMMIT").await.unwrap();
        let mut builder = ChangeBatchBuilder::new(table.specs.clone());
        for (i, r) in rows.iter().enumerate() {
            let values: Vec<ColumnValue> = r
                .values()
                .iter()
                .zip(&table.types)
                .map(|(v, ty)| {
                    ColumnValue::Value(match v {
                        None => Value::Null,
                        Some(s) => text::parse(ty, s.as_bytes()).unwrap(),
                    })
                })
                .collect();
            builder
                .append("R", 5, i as i64, 0, 0, &values, None)
                .unwrap();
        }
        let want = builder.finish().unwrap();
        let got = slotlake::compact::conform(
            &deltalake::arrow::compute::concat_batches(&want.schema(), &got).unwrap(),
            &want.schema(),
        )
        .unwrap();
        assert!(want.num_rows() > 0);
        assert_eq!(got, want, "{t}: binary COPY = text SELECT");
    }

    // A COPY the server rejects: a clear error, and the session still answers.
    let mut table = describe(
        &mut conn,
        &mut catalog,
        &mut catalog_conn,
        &info,
        &TableName::parse("odd").unwrap(),
        "none",
    )
    .await
    .unwrap();
    table.names[1] = "no_such_column".into();
    let err = match Cursor::open(&mut conn, &table, None, stamp).await {
        Ok(_) => panic!("COPY of a missing column must fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("no_such_column"), "{err}");
    let one = conn.simple_query("SELECT 1 AS one").await.unwrap();
    assert_eq!(one[0].get("one"), Some("1"));

    // A COPY the server stops midway, after sending rows: the server's error (not a truncated
    // copy), and the session still answers.
    conn.simple_query("CREATE TABLE many AS SELECT g AS id FROM generate_series(1, 200000) g")
        .await
        .unwrap();
    let many = describe(
        &mut conn,
        &mut catalog,
        &mut catalog_conn,
        &info,
        &TableName::parse("many").unwrap(),
        "none",
    )
    .await
    .unwrap();
    let mut cursor = Cursor::open(
        &mut conn,
        &many,
        Some("1 / (id - 150000) IS NOT NULL"),
        stamp,
    )
    .await
    .unwrap();
    let mut rows = 0;
    let err = loop {
        match cursor.next(&mut conn).await {
            Ok(Some(batch)) => rows += batch.num_rows(),
            Ok(None) => panic!("the COPY must fail at id 150000"),
            Err(e) => break format!("{e:#}"),
        }
    };
    assert!(rows > 0, "rows came before the error");
    assert!(err.contains("division by zero"), "{err}");
    let one = conn.simple_query("SELECT 1 AS one").await.unwrap();
    assert_eq!(one[0].get("one"), Some("1"));
    conn.close().await;
    if let Some(c) = catalog_conn {
        c.close().await;
    }
}

/// Wide rows end a snapshot batch early: 40 rows of 2 MiB come in batches of at most 16 (a
/// batch holds up to 32 MiB of row data), not in one 80 MiB batch.
#[tokio::test]
async fn wide_rows_come_in_small_batches() {
    let cluster = Cluster::shared();
    let db = cluster.create_db("wide_copy").await;
    db.exec(
        "CREATE TABLE w (id int PRIMARY KEY, v text);
         INSERT INTO w SELECT g, repeat(md5(g::text), 65536) FROM generate_series(1, 40) g;",
    )
    .await;
    db.grant_select().await;
    let info = ConnInfo::parse(&db.url()).unwrap();
    let mut conn = PgConnection::connect(&info, SessionKind::Sql)
        .await
        .unwrap();
    let (_, batches) = copy_table(&mut conn, &info, &mut TypeCatalog::new(), &mut None, "w").await;
    let sizes: Vec<usize> = batches.iter().map(|b| b.num_rows()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 40);
    assert!(sizes.iter().all(|&n| n <= 16), "{sizes:?}");
    conn.close().await;
}
