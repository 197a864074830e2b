//! The replication client against a real server: authentication methods, TLS modes, and the
//! errors a person gets for each way of getting it wrong.

mod support;

use slotlake::replication::conninfo::SslMode;
use slotlake::replication::{ClientError, ConnInfo, PgConnection, SessionKind};
use support::*;

async fn connect(s: &str, kind: SessionKind) -> Result<PgConnection, ClientError> {
    PgConnection::connect(&ConnInfo::parse(s).expect("conninfo"), kind).await
}

async fn whoami(c: &mut PgConnection) -> String {
    let rows = c
        .simple_query("SELECT current_user AS u")
        .await
        .expect("query");
    rows[0].get("u").expect("value").to_string()
}

#[tokio::test]
async fn every_password_method_authenticates_for_sql_and_replication() {
    let cluster = Cluster::shared();
    for (user, pw) in [
        (SCRAM_USER, Some(SCRAM_PASSWORD)),
        (MD5_USER, Some(MD5_PASSWORD)),
        (PLAIN_USER, Some(PLAIN_PASSWORD)),
        (TRUST_USER, None),
    ] {
        for kind in [SessionKind::Sql, SessionKind::Replication] {
            let mut c = connect(&cluster.conninfo("postgres", user, pw, ""), kind)
                .await
                .unwrap_or_else(|e| panic!("{user} {kind:?}: {e:?}"));
            assert_eq!(whoami(&mut c).await, user);
            if kind == SessionKind::Replication {
                let rows = c.simple_query("IDENTIFY_SYSTEM").await.expect("identify");
                assert!(rows[0].get("xlogpos").is_some_and(|v| v.contains('/')));
            }
            c.close().await;
        }
    }
}

#[tokio::test]
async fn session_settings_fix_value_formats() {
    let cluster = Cluster::shared();
    let mut c = connect(
        &cluster.conninfo("postgres", TRUST_USER, None, ""),
        SessionKind::Sql,
    )
    .await
    .unwrap();
    let rows = c
        .simple_query("SELECT '1 day 2 hours'::interval::text AS i, '2024-01-02 03:04:05+02'::timestamptz::text AS t, '\\x01'::bytea::text AS b")
        .await
        .unwrap();
    assert_eq!(rows[0].get("i"), Some("P1DT2H"));
    assert_eq!(rows[0].get("t"), Some("2024-01-02 01:04:05+00"));
    assert_eq!(rows[0].get("b"), Some("\\x01"));
}

#[tokio::test]
async fn wrong_password_and_missing_password_are_clear() {
    let cluster = Cluster::shared();
    let err = connect(
        &cluster.conninfo("postgres", SCRAM_USER, Some("nope"), ""),
        SessionKind::Sql,
    )
    .await
    .unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(!err.is_transient());
    let err = connect(
        &cluster.conninfo("postgres", MD5_USER, Some("nope"), ""),
        SessionKind::Sql,
    )
    .await
    .unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    std::env::remove_var("PGPASSWORD");
    let info = ConnInfo::parse(&format!(
        "{} passfile=/nonexistent",
        cluster.conninfo("postgres", SCRAM_USER, None, "")
    ))
    .unwrap();
    let err = PgConnection::connect(&info, SessionKind::Sql)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoPassword { .. }), "{err:?}");
}

#[tokio::test]
async fn unreachable_host_is_a_transient_connect_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = connect(
        &format!("host=127.0.0.1 port={port} user=x sslmode=disable"),
        SessionKind::Sql,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn tls_verify_full_with_the_right_ca_and_failure_with_a_wrong_one() {
    let cluster = Cluster::shared();
    let base = format!(
        "postgresql://{SCRAM_USER}:{}@127.0.0.1:{}/postgres",
        urlencode(SCRAM_PASSWORD),
        cluster.port
    );
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = format!(
            "{base}?sslmode={mode}&sslrootcert={}",
            cluster.ca_pem.display()
        );
        let mut c = connect(&url, SessionKind::Replication)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        let rows = c
            .simple_query("SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .await
            .unwrap();
        assert_eq!(rows[0].get("ssl"), Some("true"), "{mode} is encrypted");
        c.close().await;
    }
    // localhost is also a name in the certificate.
    let url = format!(
        "postgresql://{SCRAM_USER}:{}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        urlencode(SCRAM_PASSWORD),
        cluster.port,
        cluster.ca_pem.display()
    );
    connect(&url, SessionKind::Sql)
        .await
        .expect("verify-full via localhost");

    for mode in ["verify-ca", "verify-full"] {
        let url = format!(
            "{base}?sslmode={mode}&sslrootcert={}",
            cluster.wrong_ca_pem.display()
        );
        let err = connect(&url, SessionKind::Sql).await.unwrap_err();
        assert!(
            matches!(err, ClientError::TlsHandshake { .. }),
            "{mode}: {err:?}"
        );
        assert!(!err.is_transient());
    }
    // verify-full without any root certificate is refused before connecting.
    let info = ConnInfo::parse(&format!("{base}?sslmode=verify-full")).unwrap();
    assert_eq!(info.sslmode, SslMode::VerifyFull);
    let err = PgConnection::connect(&info, SessionKind::Sql)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::TlsConfig(_)), "{err:?}");
}

#[tokio::test]
async fn unix_socket_connection() {
    let cluster = Cluster::shared();
    let s = format!(
        "host={} port={} user={ADMIN} dbname=postgres",
        cluster.socket_dir().display(),
        cluster.port
    );
    let mut c = connect(&s, SessionKind::Replication)
        .await
        .expect("unix socket");
    assert_eq!(whoami(&mut c).await, ADMIN);
}

#[tokio::test]
async fn role_without_replication_privilege_is_refused_with_a_hint() {
    let cluster = Cluster::shared();
    let err = connect(
        &cluster.conninfo("postgres", NOREPL_USER, Some(NOREPL_PASSWORD), ""),
        SessionKind::Replication,
    )
    .await
    .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42501"), "{err}");
    let hint = slotlake::replication::operator_hint(&err, NOREPL_USER).expect("hint");
    assert!(
        hint.contains("REPLICATION") && hint.contains("rds_replication"),
        "{hint}"
    );
    // An ordinary session works for the same role.
    connect(
        &cluster.conninfo("postgres", NOREPL_USER, Some(NOREPL_PASSWORD), ""),
        SessionKind::Sql,
    )
    .await
    .expect("sql");
}
