//! S3 for integration tests: a real S3-compatible server on loopback, a TCP proxy in front of it
//! to simulate an outage, and an independent reader for the Delta tables written there.
//!
//! Data flow: code under test → (optionally) [`TcpProxy`] → `moto_server` on 127.0.0.1. moto
//! keeps buckets and objects in memory and implements conditional puts (`If-None-Match: *`
//! answers 412 when the key exists), which Delta commits rely on. Cutting the network with the
//! proxy instead of stopping moto keeps that state, so a test can check what survives an outage.
//! Tables are read back with `scripts/lib/read_delta.py` (delta-rs through Python, not
//! slotlake's own code) — see [`read_delta`].
//!
//! moto and Python come from the venv made by `scripts/lib/venv.sh`, at `$SLOTLAKE_VENV`
//! (default `<repo>/.venv`). Cleanup follows the PostgreSQL harness: the server shared by one
//! test process ([`S3Server::shared`]) is killed by a watchdog once that process exits, however
//! it exits; servers made with [`S3Server::start`] are also killed on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// moto serves any region; this is the one clients should name.
pub const REGION: &str = "us-east-1";
/// moto accepts any credentials; these are the ones tests use.
pub const ACCESS_KEY_ID: &str = "test";
pub const SECRET_ACCESS_KEY: &str = "test";

const START_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// moto treats requests without an `Authorization` header as anonymous, and anonymous requests
/// on existing private objects get 403; it does not check signatures, so any header will do.
const DUMMY_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";

/// The venv with moto, deltalake and pyarrow (`scripts/lib/venv.sh` makes it).
pub fn venv_dir() -> PathBuf {
    match std::env::var_os("SLOTLAKE_VENV") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv"),
    }
}

fn venv_tool(name: &str) -> PathBuf {
    let path = venv_dir().join("bin").join(name);
    assert!(
        path.exists(),
        "{} not found: run scripts/lib/venv.sh to create the Python venv (or set SLOTLAKE_VENV)",
        path.display()
    );
    path
}

/// A running moto S3 server on 127.0.0.1.
pub struct S3Server {
    addr: SocketAddr,
    child: Mutex<Child>,
    dir: tempfile::TempDir,
}

static SHARED: OnceLock<S3Server> = OnceLock::new();
static BUCKET_COUNTER: AtomicU32 = AtomicU32::new(0);

impl S3Server {
    /// The server shared by this test process (started on first use).
    pub fn shared() -> &'static S3Server {
        SHARED.get_or_init(S3Server::start)
    }

    /// Starts a server of its own, killed when dropped. Blocks until it answers HTTP.
    pub fn start() -> S3Server {
        let moto = venv_tool("moto_server");
        let dir = tempfile::Builder::new()
            .prefix("slotlake-s3-")
            .tempdir()
            .expect("temp dir");
        let log_path = dir.path().join("moto.log");
        // The port is free when chosen but not reserved: another process may take it before
        // moto binds, so an "address in use" exit is retried with another port.
        for _attempt in 0..3 {
            let port = super::free_port();
            let log = std::fs::File::create(&log_path).expect("create moto log");
            let mut child = Command::new(&moto)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("PYTHONUNBUFFERED", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", moto.display()));
            spawn_watchdog(child.id(), dir.path());
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if output.contains("Address already in use") {
                        break;
                    }
                    panic!(
                        "moto_server exited ({status}) before answering; is the venv complete? \
                         (run scripts/lib/venv.sh)\n{output}"
                    );
                }
                if answers_http(addr) {
                    return S3Server {
                        addr,
                        child: Mutex::new(child),
                        dir,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "moto_server did not answer on {addr} within {START_TIMEOUT:?}\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!(
            "moto_server could not bind a free port in 3 attempts\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the server printed so far (its request log and any errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// Environment for an S3 client (object_store, delta-rs, boto) to reach this server.
    pub fn client_env(&self) -> Vec<(&'static str, String)> {
        client_env(&self.endpoint())
    }

    /// Creates bucket `name` (`PUT /<name>`); panics if the server refuses.
    pub async fn create_bucket(&self, name: &str) {
        let resp = http_request(self.addr, "PUT", &format!("/{name}"), &[], b"")
            .await
            .unwrap_or_else(|e| panic!("PUT /{name} to moto at {}: {e}", self.addr));
        assert_eq!(
            resp.status, 200,
            "creating bucket {name:?} failed: {}",
            resp.body
        );
    }

    /// Creates a bucket no other test uses and returns its name.
    pub async fn new_bucket(&self, label: &str) -> String {
        let n = BUCKET_COUNTER.fetch_add(1, Ordering::SeqCst);
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(30)
            .collect();
        let name = format!("t-{}-{n}-{label}", std::process::id());
        self.create_bucket(&name).await;
        name
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The environment variables that point an S3 client at `endpoint` (plain HTTP, dummy keys).
pub fn client_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_REGION", REGION.to_string()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]
}

/// One blocking `GET /` with short timeouts: true when something answers HTTP at `addr`.
fn answers_http(addr: SocketAddr) -> bool {
    let short = Duration::from_millis(500);
    let Ok(mut s) = StdTcpStream::connect_timeout(&addr, short) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(short));
    let _ = s.set_write_timeout(Some(short));
    let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut head = [0u8; 8];
    s.write_all(req.as_bytes()).is_ok()
        && s.read_exact(&mut head).is_ok()
        && &head[..7] == b"HTTP/1."
}

/// Kills moto once this process exits, however it exits, and then removes its directory. Also
/// ends when moto is gone already (a dropped [`S3Server`], or a start attempt that failed), so
/// watchdogs do not pile up; the directory is then left to its `TempDir`.
fn spawn_watchdog(moto_pid: u32, dir: &std::path::Path) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null && kill -0 {moto_pid} 2>/dev/null; do sleep 1; done; \
         kill {moto_pid} 2>/dev/null; if ! kill -0 {pid} 2>/dev/null; then rm -rf '{dir}'; fi",
        pid = std::process::id(),
        dir = dir.display()
    );
    super::spawn_detached_sh(&script);
}

/// A response read by [`http_request`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Sends one HTTP/1.1 request to moto (or through a proxy to it) and reads the response to EOF
/// (`Connection: close`). Adds `Host`, `Content-Length`, an octet-stream `Content-Type` (Flask
/// would read other bodies as forms) and a dummy `Authorization`. Times out after 10 s.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Length: {}\r\nContent-Type: application/octet-stream\r\n\
             Authorization: {DUMMY_AUTHORIZATION}\r\n",
            body.len()
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        s.write_all(body).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP request timed out")
        })??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP response: {head:?}"),
            )
        })?;
    Ok(HttpResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// Runs `scripts/lib/read_delta.py <table_uri> [--s3-endpoint …] <args>` and returns its stdout:
/// the rows as canonical JSON lines, or with `--count` / `--version` one number. Panics with the
/// script's stderr if it fails.
pub async fn read_delta(table_uri: &str, s3_endpoint: Option<&str>, args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/lib/read_delta.py");
    let mut c = tokio::process::Command::new(venv_tool("python"));
    c.arg(&script).arg(table_uri).args(args).kill_on_drop(true);
    if let Some(endpoint) = s3_endpoint {
        c.arg("--s3-endpoint").arg(endpoint);
    }
    let out = c.output().await.expect("run read_delta.py");
    assert!(
        out.status.success(),
        "read_delta.py {table_uri} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("read_delta.py prints UTF-8")
}

/// A loopback TCP proxy for fault injection. Each accepted connection is forwarded to the target
/// over a connection of its own. [`set_down(true)`](TcpProxy::set_down) is an outage: every
/// open connection is reset at once and new ones are accepted and reset straight away, until
/// `set_down(false)`. Bytes a client wrote just before the outage may or may not have reached
/// the target, as in a real one. Dropping the proxy stops it and closes its connections.
/// Must be started inside a tokio runtime.
pub struct TcpProxy {
    port: u16,
    down: watch::Sender<bool>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub fn start(target: SocketAddr) -> TcpProxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy port");
        std_listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = std_listener.local_addr().expect("proxy addr").port();
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        let (down, down_rx) = watch::channel(false);
        let accept_loop = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *down_rx.borrow() {
                    reset(inbound);
                    continue;
                }
                let mut down_rx = down_rx.clone();
                tokio::spawn(async move {
                    let mut inbound = inbound;
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        reset(inbound);
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        // Down, or the proxy was dropped (the sender is gone).
                        _ = down_rx.wait_for(|down| *down) => {
                            reset(inbound);
                            reset(outbound);
                        }
                    }
                });
            }
        });
        TcpProxy {
            port,
            down,
            accept_loop,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:<port>`: the target's endpoint as seen through the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Starts (`true`) or ends (`false`) an outage.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
        // Dropping `down` ends every connection task's wait, which closes its sockets.
    }
}

/// Closes with RST rather than FIN, so the peer sees an error, not an orderly end of stream.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
