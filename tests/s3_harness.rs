//! The S3 test harness itself: moto starts and honours conditional puts, the TCP proxy forwards,
//! fails like an outage and recovers without moto losing its objects, and `read_delta.py` reads
//! a Delta table from moto.

mod support;

use std::time::Duration;

use support::s3::{http_request, read_delta, venv_dir, S3Server, TcpProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn conditional_put_creates_an_object_once() {
    let s3 = S3Server::shared();
    let bucket = s3.new_bucket("conditional").await;
    let key = format!("/{bucket}/_delta_log/00000000000000000000.json");
    let if_none_match = [("If-None-Match", "*")];

    let first = http_request(s3.addr(), "PUT", &key, &if_none_match, b"first")
        .await
        .unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    let second = http_request(s3.addr(), "PUT", &key, &if_none_match, b"second")
        .await
        .unwrap();
    assert_eq!(second.status, 412, "{second:?}");
    assert!(second.body.contains("PreconditionFailed"), "{second:?}");

    let get = http_request(s3.addr(), "GET", &key, &[], b"")
        .await
        .unwrap();
    assert_eq!((get.status, get.body.as_str()), (200, "first"));
}

#[tokio::test]
async fn proxy_outage_cuts_connections_and_keeps_server_state() {
    let s3 = S3Server::shared();
    let proxy = TcpProxy::start(s3.addr());
    assert_ne!(proxy.port(), s3.addr().port());
    let bucket = s3.new_bucket("outage").await;
    let key = format!("/{bucket}/before");

    // Up: requests pass through.
    let put = http_request(proxy.addr(), "PUT", &key, &[], b"kept")
        .await
        .unwrap();
    assert_eq!(put.status, 200, "{put:?}");

    // A connection open when the outage starts is cut.
    let mut idle = TcpStream::connect(proxy.addr()).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    proxy.set_down(true);
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("an open connection must be closed when the proxy goes down");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "got data through a down proxy: {read:?}"
    );

    // Down: new connections are accepted and dropped, so every request fails.
    for _ in 0..3 {
        let failed = http_request(proxy.addr(), "GET", &key, &[], b"").await;
        assert!(
            failed.is_err(),
            "request went through a down proxy: {failed:?}"
        );
    }
    // The server itself is fine.
    let direct = http_request(s3.addr(), "GET", &key, &[], b"")
        .await
        .unwrap();
    assert_eq!(direct.status, 200);

    // Up again: forwarding resumes and moto kept its objects.
    proxy.set_down(false);
    let get = http_request(proxy.addr(), "GET", &key, &[], b"")
        .await
        .unwrap();
    assert_eq!((get.status, get.body.as_str()), (200, "kept"));
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections() {
    let s3 = S3Server::shared();
    let proxy = TcpProxy::start(s3.addr());
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    open.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    drop(proxy);
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), open.read(&mut buf))
        .await
        .expect("a connection must be closed when its proxy is dropped");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn own_server_stops_on_drop() {
    let s3 = S3Server::start();
    let addr = s3.addr();
    s3.create_bucket("own-server").await;
    let running_on = format!("Running on {}", s3.endpoint());
    assert!(s3.log().contains(&running_on), "{}", s3.log());
    drop(s3);
    // Drop kills and reaps the process, so its port refuses at once.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn read_delta_reads_a_table_from_s3() {
    let s3 = S3Server::shared();
    let bucket = s3.new_bucket("read-delta").await;
    let uri = format!("s3://{bucket}/t");
    // Written by delta-rs's Python binding: this only tests the reader and its S3 settings.
    let write = r#"
import os, sys, pyarrow as pa
from deltalake import write_deltalake
opts = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP", "AWS_REGION",
                                   "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
table = pa.table({"_lsn": ["0/10", "0/9"], "_seq": [0, 0], "v": ["b", "a"]})
write_deltalake(sys.argv[1], table, storage_options=opts)
write_deltalake(sys.argv[1], table.slice(0, 1), storage_options=opts, mode="append")
os._exit(0)  # skip finalization, which can abort (see read_delta.py)
"#;
    let out = tokio::process::Command::new(venv_dir().join("bin/python"))
        .arg("-c")
        .arg(write)
        .arg(&uri)
        .envs(s3.client_env())
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let endpoint = s3.endpoint();
    let rows = read_delta(&uri, Some(&endpoint), &[]).await;
    assert_eq!(
        rows,
        "{\"_lsn\":\"0/9\",\"_seq\":0,\"v\":\"a\"}\n\
         {\"_lsn\":\"0/10\",\"_seq\":0,\"v\":\"b\"}\n\
         {\"_lsn\":\"0/10\",\"_seq\":0,\"v\":\"b\"}\n"
    );
    assert_eq!(read_delta(&uri, Some(&endpoint), &["--count"]).await, "3\n");
    assert_eq!(
        read_delta(&uri, Some(&endpoint), &["--version"]).await,
        "1\n"
    );
}
