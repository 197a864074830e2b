//! Prometheus metrics and the small HTTP server that exposes them with the health endpoints.
//!
//! Names follow `slotlake_<name>_<unit>`, counters end in `_total`, and label sets are bounded
//! (`op` has five values; nothing is labelled per table). The registry is created by the caller
//! and passed in, never global.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Default address of the metrics and health server.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9187";

/// Every metric slotlake exports.
pub struct Metrics {
    pub registry: Registry,
    pub changes: IntCounterVec,
    pub transactions: IntCounter,
    pub received_bytes: IntCounter,
    pub files_written: IntCounter,
    pub written_bytes: IntCounter,
    pub flush_duration: Histogram,
    pub buffered_bytes: IntGauge,
    pub spilled_bytes: IntCounter,
    pub received_lsn: IntGauge,
    pub confirmed_flush_lsn: IntGauge,
    pub replication_lag_bytes: IntGauge,
    pub commit_to_durable: Histogram,
    pub tables_active: IntGauge,
    pub retries: IntCounterVec,
    pub compactions: IntCounterVec,
    pub maintenance_files: IntCounterVec,
    pub snapshot_rows: IntCounter,
    pub snapshot_tables_remaining: IntGauge,
    pub compacted_changes: IntCounter,
    pub compaction_duration: Histogram,
    pub slot_retained_wal_bytes: IntGauge,
    pub slot_safe_wal_bytes: IntGauge,
    pub slot_invalidated: IntGauge,
    /// Set while streaming (for /readyz).
    pub streaming: AtomicBool,
    /// /readyz answers 503 while `slotlake_replication_lag_bytes` is above this; 0: no limit.
    pub ready_max_lag: AtomicU64,
    /// Last server WAL end seen, for lag.
    pub server_wal_end: AtomicU64,
}

impl Metrics {
    pub fn new(registry: Registry) -> Result<Arc<Metrics>, prometheus::Error> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let changes = IntCounterVec::new(
            Opts::new(
                "slotlake_changes_total",
                "Changes written to change logs, by operation",
            ),
            &["op"],
        )?;
        registry.register(Box::new(changes.clone()))?;
        let retries = IntCounterVec::new(
            Opts::new(
                "slotlake_retries_total",
                "Retried operations after a transient error, by stage",
            ),
            &["stage"],
        )?;
        registry.register(Box::new(retries.clone()))?;
        let compactions = IntCounterVec::new(
            Opts::new(
                "slotlake_compactions_total",
                "Table compactions (change log into current and history tables), by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(compactions.clone()))?;
        let maintenance_files = IntCounterVec::new(
            Opts::new(
                "slotlake_maintenance_files_total",
                "Files handled by lake maintenance, by action: merged (small change-log files \
                 optimized), written (their replacements), expired (change-log files past the \
                 retention), vacuumed (removed files deleted from storage)",
            ),
            &["action"],
        )?;
        registry.register(Box::new(maintenance_files.clone()))?;
        let secs = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ];
        Ok(Arc::new(Metrics {
            changes,
            transactions: counter(
                "slotlake_transactions_total",
                "Source transactions processed",
            )?,
            received_bytes: counter(
                "slotlake_received_bytes_total",
                "Bytes of pgoutput data received",
            )?,
            files_written: counter(
                "slotlake_files_written_total",
                "Data files committed to change logs",
            )?,
            written_bytes: counter(
                "slotlake_written_bytes_total",
                "Bytes of data files committed to change logs",
            )?,
            flush_duration: histogram(
                "slotlake_flush_duration_seconds",
                "Time to write and commit one flush of all tables",
                secs.clone(),
            )?,
            buffered_bytes: gauge(
                "slotlake_buffered_bytes",
                "Bytes held in memory for changes not yet committed",
            )?,
            spilled_bytes: counter(
                "slotlake_spilled_bytes_total",
                "Bytes of streamed-transaction changes written to local spill files",
            )?,
            received_lsn: gauge("slotlake_received_lsn", "Highest WAL position received")?,
            confirmed_flush_lsn: gauge(
                "slotlake_confirmed_flush_lsn",
                "WAL position confirmed to the slot",
            )?,
            replication_lag_bytes: gauge(
                "slotlake_replication_lag_bytes",
                "Server WAL end minus the confirmed position",
            )?,
            commit_to_durable: histogram(
                "slotlake_commit_to_durable_seconds",
                "Source commit timestamp to committed in the lake",
                secs.clone(),
            )?,
            tables_active: gauge("slotlake_tables_active", "Tables with buffered changes")?,
            retries,
            compactions,
            maintenance_files,
            snapshot_rows: counter(
                "slotlake_snapshot_rows_total",
                "Rows read by the initial snapshot and written to change logs",
            )?,
            snapshot_tables_remaining: gauge(
                "slotlake_snapshot_tables_remaining",
                "Tables the initial snapshot has not finished",
            )?,
            compacted_changes: counter(
                "slotlake_compacted_changes_total",
                "Change-log rows folded into current and history tables",
            )?,
            compaction_duration: histogram(
                "slotlake_compaction_duration_seconds",
                "Time of one compaction pass over all tables",
                secs.clone(),
            )?,
            slot_retained_wal_bytes: gauge(
                "slotlake_slot_retained_wal_bytes",
                "WAL the slot holds on the source (current WAL position - restart_lsn)",
            )?,
            slot_safe_wal_bytes: gauge(
                "slotlake_slot_safe_wal_bytes",
                "WAL that can still be written before the slot is invalidated (safe_wal_size; -1 when unlimited)",
            )?,
            slot_invalidated: gauge(
                "slotlake_slot_invalidated",
                "1 when the slot's wal_status is lost (the run then stops with exit code 4)",
            )?,
            streaming: AtomicBool::new(false),
            ready_max_lag: AtomicU64::new(0),
            server_wal_end: AtomicU64::new(0),
            registry,
        }))
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Metrics {
    /// Ready: streaming, and the replication lag within `ready_max_lag`.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.streaming.load(Ordering::Relaxed) {
            return Err("not streaming\n".into());
        }
        let max = self.ready_max_lag.load(Ordering::Relaxed);
        let lag = self.replication_lag_bytes.get().max(0) as u64;
        if max > 0 && lag > max {
            return Err(format!(
                "replication lag {lag} bytes > --ready-max-lag {max}\n"
            ));
        }
        Ok(())
    }
}

/// Serves `/metrics`, `/healthz` (alive) and `/readyz` (streaming, lag under the limit) on `addr` until the task is
/// dropped. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, body, ctype) = match path {
                    "/metrics" => ("200 OK", metrics.render(), "text/plain; version=0.0.4"),
                    "/healthz" => ("200 OK", b"ok\n".to_vec(), "text/plain"),
                    "/readyz" => match metrics.readiness() {
                        Ok(()) => ("200 OK", b"ready\n".to_vec(), "text/plain"),
                        Err(why) => ("503 Service Unavailable", why.into_bytes(), "text/plain"),
                    },
                    _ => ("404 Not Found", b"not found\n".to_vec(), "text/plain"),
                };
                let head = format!("HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((bound, handle))
}
