//! The commands behind the CLI: each takes parsed arguments and does one job.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::cli::{
    OutputFormat, RunArgs, SlotCommand, SlotCreateArgs, SlotDropArgs, SlotListArgs, SlotStatusArgs,
    TailArgs,
};
use crate::replication::slot::{
    self, PublicationOutcome, PublicationScope, SlotError, SlotInfo, SnapshotAction,
};
use crate::replication::sql::{parse_ident, TableName};
use crate::replication::{ConnInfo, PgConnection, SessionKind};
use crate::tail::{self, TailOptions};

pub fn source(url: &str) -> Result<ConnInfo> {
    ConnInfo::parse(url).context("invalid --source")
}

pub async fn slot(cmd: SlotCommand) -> Result<()> {
    match cmd {
        SlotCommand::Create(a) => slot_create(a).await,
        SlotCommand::Drop(a) => slot_drop(a).await,
        SlotCommand::List(a) => slot_list(a).await,
        SlotCommand::Status(a) => slot_status(a).await,
    }
}

fn publication_scope(a: &SlotCreateArgs) -> Result<PublicationScope> {
    if !a.schemas.is_empty() {
        let schemas = a
            .schemas
            .iter()
            .map(|s| parse_ident(s).map_err(anyhow::Error::msg))
            .collect::<Result<BTreeSet<_>>>()
            .context("invalid --schema")?;
        return Ok(PublicationScope::Schemas(schemas));
    }
    if !a.tables.is_empty() {
        let tables = a
            .tables
            .iter()
            .map(|t| TableName::parse(t).map_err(anyhow::Error::msg))
            .collect::<Result<BTreeSet<_>>>()
            .context("invalid --table")?;
        return Ok(PublicationScope::Tables(tables));
    }
    Ok(PublicationScope::AllTables)
}

async fn slot_create(a: SlotCreateArgs) -> Result<()> {
    let info = source(&a.source.source)?;
    slot::validate_slot_name(&a.slot.slot)?;
    let scope = publication_scope(&a)?;
    if !a.create_publication && (!a.schemas.is_empty() || !a.tables.is_empty()) {
        anyhow::bail!("--schema and --table describe the publication: add --create-publication");
    }
    let mut repl = PgConnection::connect(&info, SessionKind::Replication).await?;
    // Nothing is created unless everything can be: check what we can up front, and undo the
    // publication if the slot then fails.
    slot::check_logical_wal_level(&mut repl).await?;
    let mut created_publication = false;
    if a.create_publication {
        match slot::ensure_publication(&mut repl, &a.publication.publication, &scope).await? {
            PublicationOutcome::Created => created_publication = true,
            PublicationOutcome::AlreadyExists => {
                println!("publication {} already exists", a.publication.publication)
            }
        }
    }
    let created = match slot::create_slot(&mut repl, &a.slot.slot, SnapshotAction::None).await {
        Ok(c) => c,
        Err(e) => {
            if created_publication {
                if let Err(undo) =
                    slot::drop_publication(&mut repl, &a.publication.publication).await
                {
                    tracing::warn!(error = %undo, "could not drop the publication created by this command");
                }
            }
            return Err(e.into());
        }
    };
    if created_publication {
        println!("created publication {}", a.publication.publication);
    }
    match created.consistent_point {
        Some(lsn) if !created.already_existed => println!("created slot {} at {lsn}", created.name),
        _ => println!("slot {} already exists", created.name),
    }
    repl.close().await;
    Ok(())
}

async fn slot_drop(a: SlotDropArgs) -> Result<()> {
    let info = source(&a.source.source)?;
    let mut repl = PgConnection::connect(&info, SessionKind::Replication).await?;
    if slot::drop_slot(&mut repl, &a.slot.slot, a.wait).await? {
        println!("dropped slot {}", a.slot.slot);
    } else {
        println!("slot {} does not exist", a.slot.slot);
    }
    if a.drop_publication {
        if slot::drop_publication(&mut repl, &a.publication.publication).await? {
            println!("dropped publication {}", a.publication.publication);
        } else {
            println!("publication {} does not exist", a.publication.publication);
        }
    }
    repl.close().await;
    Ok(())
}

async fn slot_list(a: SlotListArgs) -> Result<()> {
    let info = source(&a.source.source)?;
    let mut conn = PgConnection::connect(&info, SessionKind::Sql).await?;
    let slots = slot::list_slots(&mut conn).await?;
    conn.close().await;
    print_slots(&slots, a.format)
}

async fn slot_status(a: SlotStatusArgs) -> Result<()> {
    let info = source(&a.source.source)?;
    let mut conn = PgConnection::connect(&info, SessionKind::Sql).await?;
    let found = slot::slot_info(&mut conn, &a.slot.slot).await?;
    conn.close().await;
    let found = found.ok_or_else(|| SlotError::SlotMissing(a.slot.slot.clone()))?;
    print_slots(&[found], a.format)
}

fn print_slots(slots: &[SlotInfo], format: OutputFormat) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        OutputFormat::Json => {
            for s in slots {
                serde_json::to_writer(&mut out, s)?;
                writeln!(out)?;
            }
        }
        OutputFormat::Table => {
            writeln!(
                out,
                "{:<24} {:<10} {:<9} {:<10} {:<7} {:>8} {:>14} {:>14} {:>14} {:<10}",
                "slot",
                "plugin",
                "type",
                "database",
                "active",
                "pid",
                "confirmed",
                "restart",
                "retained",
                "wal_status"
            )?;
            for s in slots {
                let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                writeln!(
                    out,
                    "{:<24} {:<10} {:<9} {:<10} {:<7} {:>8} {:>14} {:>14} {:>14} {:<10}",
                    s.slot_name,
                    opt(&s.plugin),
                    s.slot_type,
                    opt(&s.database),
                    s.active,
                    s.active_pid
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into()),
                    opt(&s.confirmed_flush_lsn),
                    opt(&s.restart_lsn),
                    s.retained_wal_bytes
                        .map(human_bytes)
                        .unwrap_or_else(|| "-".into()),
                    opt(&s.wal_status),
                )?;
            }
        }
    }
    Ok(())
}

fn human_bytes(b: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub async fn tail(a: TailArgs) -> Result<()> {
    let info = source(&a.source.source)?;
    let opts = TailOptions {
        slot: a.slot.slot,
        publication: a.publication.publication,
        limit: a.limit,
        confirm: a.confirm,
        binary: a.binary,
        messages: a.messages,
        discard: a.discard,
        start_lsn: a.start_lsn,
        status_interval: a.status_interval,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let summary = tail::run(&info, &opts, &mut out, shutdown).await?;
    drop(out);
    tracing::info!(changes = summary.changes, transactions = summary.transactions, confirmed = %summary.confirmed, "tail finished");
    Ok(())
}

pub async fn run(a: RunArgs) -> Result<()> {
    let info = source(&a.source.source)?;
    let s3 = crate::lake::store::S3Options {
        endpoint: a.sink.s3_endpoint.clone(),
        allow_http: a.sink.s3_allow_http,
        region: a.sink.s3_region.clone(),
    };
    let sink = crate::lake::store::Sink::open(&a.sink.sink, &s3).context("invalid --sink")?;
    slot::validate_slot_name(&a.slot.slot)?;
    let mut exported: Option<(PgConnection, crate::snapshot::ExportedSnapshot)> = None;
    if a.create_slot || a.create_publication {
        let mut repl = PgConnection::connect(&info, SessionKind::Replication).await?;
        let mut kept = None;
        slot::check_logical_wal_level(&mut repl).await?;
        if a.create_publication {
            slot::ensure_publication(
                &mut repl,
                &a.publication.publication,
                &PublicationScope::AllTables,
            )
            .await?;
        }
        if a.create_slot {
            let action = match a.snapshot {
                crate::cli::SnapshotMode::Initial => SnapshotAction::Export,
                crate::cli::SnapshotMode::Never => SnapshotAction::None,
            };
            if action == SnapshotAction::Export
                && slot::slot_info(&mut repl, &a.slot.slot).await?.is_none()
            {
                // Recorded before the slot exists: a crash right after creating it still
                // leaves a load to finish, never a slot whose older rows are silently missing.
                crate::snapshot::write_record(
                    &sink,
                    &a.slot.slot,
                    &crate::snapshot::LoadRecord::pending(),
                )
                .await?;
            }
            let created = slot::create_slot(&mut repl, &a.slot.slot, action).await?;
            if let Some(lsn) = created.consistent_point {
                tracing::info!(slot = %created.name, consistent_point = %lsn, "created replication slot");
            }
            if let (Some(point), Some(name)) = (created.consistent_point, created.snapshot_name) {
                kept = Some(crate::snapshot::ExportedSnapshot { name, point });
            }
        }
        // The exported snapshot lives while this session stays open and idle.
        match kept {
            Some(snap) => exported = Some((repl, snap)),
            None => repl.close().await,
        }
    }
    let metrics = crate::metrics::Metrics::new(prometheus::Registry::new()).context("metrics")?;
    metrics
        .ready_max_lag
        .store(a.ready_max_lag, std::sync::atomic::Ordering::Relaxed);
    let (addr, server) = crate::metrics::serve(a.metrics_addr, metrics.clone())
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {}", a.metrics_addr))?;
    let load_opts = crate::snapshot::LoadOptions {
        slot: a.slot.slot.clone(),
        publication: a.publication.publication.clone(),
        workers: a.snapshot_workers,
        chunk_bytes: a.snapshot_chunk_size,
        target_file_size: a.target_file_size,
        memory_budget: a.memory_budget,
        only: None,
    };
    // A load that fails for a reason that goes away (the sink or the source unreachable for a
    // while) goes on from its last committed chunks, as after a restart; SIGTERM/SIGINT
    // during the load keeps what is committed for the next start to go on from.
    let load = async {
        let mut kept = exported.map(|(session, snapshot)| LoadSnapshot {
            start: snapshot.point,
            session,
            snapshot,
        });
        let mut backoff = RECONNECT_MIN;
        let mut failing_since = None;
        loop {
            let loaded =
                initial_snapshot(&load_opts, a.snapshot, &info, &sink, &mut kept, &metrics).await;
            match loaded {
                Ok(()) => return Ok(()),
                Err(e) if crate::snapshot::retryable(&e) => {
                    metrics.retries.with_label_values(&["snapshot"]).inc();
                    // A kept snapshot holds back vacuum on the source: not through a long outage.
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= SNAPSHOT_KEEP_LIMIT {
                        if let Some(k) = kept.take() {
                            tracing::warn!(failing_for = ?since.elapsed(), "releasing the initial snapshot, which holds back vacuum on the source; the load goes on from a new one when it can");
                            k.session.close().await;
                        }
                    }
                    let wait = crate::pipeline::jitter(backoff);
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "the initial snapshot failed; it goes on from its committed chunks");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    };
    tokio::select! {
        loaded = load => loaded?,
        _ = shutdown_signal() => {
            tracing::info!("stopped during the initial snapshot; its committed chunks stay, and the next start goes on from them");
            return Ok(());
        }
    }
    tracing::info!(source = %info.redacted(), sink = %sink, slot = %a.slot.slot, metrics = %addr, "streaming");
    let opts = crate::pipeline::RunOptions {
        slot: a.slot.slot,
        publication: a.publication.publication,
        target_file_size: a.target_file_size,
        flush_interval: a.flush_interval,
        memory_budget: a.memory_budget,
        spill_dir: a.spill_dir.unwrap_or_else(std::env::temp_dir),
        status_interval: a.status_interval,
        heartbeat_interval: a.heartbeat_interval,
        slot_check_interval: a.slot_check_interval,
        shutdown_timeout: a.shutdown_timeout,
        stop_at: a.stop_at,
    };
    // SIGTERM/SIGINT flips this; every attempt of the loop below watches it.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signals = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    if !a.compact_interval.is_zero() {
        crate::compact::spawn_background(
            sink.clone(),
            a.compact_interval,
            compact_options(&a.compact),
            metrics.clone(),
            stop_rx.clone(),
        )
        .context("cannot start the compaction thread")?;
    }
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Transient failures (connection lost, server restart or failover, sink unavailable)
    // reconnect and resume from the slot's confirmed position; definite ones end the run.
    let mut backoff = RECONNECT_MIN;
    // Tables that join the publication later are backfilled while streaming goes on: the
    // watcher raises a request, the backfiller loads them and hands them over to the stream
    // (see `backfill`).
    let (backfill_tx, backfill_rx) = tokio::sync::watch::channel(false);
    let (handoff_tx, handoff_rx) = tokio::sync::watch::channel(crate::pipeline::HandOff::default());
    let handoff_tx = Arc::new(handoff_tx);
    let (paused_tx, paused_rx) = tokio::sync::watch::channel(None);
    let link = crate::pipeline::HandOffLink {
        state: handoff_rx,
        paused: Arc::new(paused_tx),
    };
    let backfills =
        a.snapshot == crate::cli::SnapshotMode::Initial && !a.publication_check_interval.is_zero();
    let spawn_backfiller = || {
        tokio::spawn(backfill_loop(
            load_opts.clone(),
            info.clone(),
            sink.clone(),
            metrics.clone(),
            backfill_rx.clone(),
            handoff_tx.clone(),
            paused_rx.clone(),
            a.publication_check_interval,
        ))
    };
    let watcher = backfills.then(|| {
        tokio::spawn(watch_publication(
            info.clone(),
            sink.clone(),
            load_opts.clone(),
            a.publication_check_interval,
            backfill_tx,
        ))
    });
    let mut backfiller = backfills.then(spawn_backfiller);
    let summary = loop {
        let started = std::time::Instant::now();
        let result = crate::pipeline::run(
            &info,
            &sink,
            &opts,
            metrics.clone(),
            stopped(stop_rx.clone()),
            link.clone(),
        )
        .await;
        match result {
            Err(crate::pipeline::RunError::Slot(slot::SlotError::Invalidated(_)))
                if a.on_slot_invalidated == crate::cli::OnSlotInvalidated::Resnapshot
                    && !*stop_rx.borrow() =>
            {
                metrics.retries.with_label_values(&["resnapshot"]).inc();
                tracing::warn!(slot = %load_opts.slot, "the slot was invalidated; --on-slot-invalidated=resnapshot: re-creating it and re-loading every table");
                // No backfill may commit into the change logs the re-load replaces.
                if let Some(b) = backfiller.as_mut() {
                    b.abort();
                    let _ = b.await;
                }
                handoff_tx.send_replace(crate::pipeline::HandOff::default());
                resnapshot(&load_opts, &info, &sink, &metrics).await?;
                if backfills {
                    backfiller = Some(spawn_backfiller());
                }
            }
            Err(e) if e.is_transient() && !*stop_rx.borrow() => {
                if started.elapsed() > RECONNECT_RESET_AFTER {
                    backoff = RECONNECT_MIN;
                }
                metrics.retries.with_label_values(&["reconnect"]).inc();
                let wait = crate::pipeline::jitter(backoff);
                tracing::warn!(error = %crate::pipeline::error_chain(&e), retry_in = ?wait, "lost the source or the sink; reconnecting from the confirmed position");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped(stop_rx.clone()) => break Ok(crate::pipeline::RunSummary::default()),
                }
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
            other => break other,
        }
    };
    signals.abort();
    server.abort();
    if let Some(w) = watcher {
        w.abort();
    }
    if let Some(b) = backfiller {
        b.abort();
    }
    let summary = summary?;
    tracing::info!(
        changes = summary.changes,
        transactions = summary.transactions,
        skipped_replayed = summary.skipped_replayed,
        spilled_bytes = summary.spilled_bytes,
        confirmed = %summary.confirmed,
        files_written = metrics.files_written.get(),
        "stopped"
    );
    Ok(())
}

fn sink_of(a: &crate::cli::SinkArgs) -> Result<crate::lake::store::Sink> {
    let s3 = crate::lake::store::S3Options {
        endpoint: a.s3_endpoint.clone(),
        allow_http: a.s3_allow_http,
        region: a.s3_region.clone(),
    };
    crate::lake::store::Sink::open(&a.sink, &s3).context("invalid --sink")
}

/// `--table schema.table` arguments.
fn parse_tables(args: &[String]) -> Result<Vec<TableName>> {
    args.iter()
        .map(|t| TableName::parse(t).map_err(|e| anyhow::anyhow!("--table {t:?}: {e}")))
        .collect()
}

fn compact_options(t: &crate::cli::CompactTuning) -> crate::compact::CompactOptions {
    crate::compact::CompactOptions {
        memory_budget: t.compact_memory,
        bucket_bytes: t.bucket_size,
        vacuum_retention: t.vacuum_retention.0,
        optimize_file_size: t.optimize_file_size,
        changes_retention: t.changes_retention.0,
        fold_threads: crate::compact::all_cores(),
        deletion_vectors: t.deletion_vectors,
        orphan_sweep_versions: crate::compact::ORPHAN_SWEEP_VERSIONS,
        tables_at_once: t.compact_concurrency.max(1),
        tombstone_retention: t.tombstone_retention.0,
    }
}

/// `slotlake compact`: one pass over the chosen tables, or one every --interval until a
/// signal. Fails (after finishing the other tables) when a table could not be compacted.
pub async fn compact(a: crate::cli::CompactArgs) -> Result<()> {
    let sink = sink_of(&a.sink)?;
    let tables = parse_tables(&a.tables)?;
    let options = compact_options(&a.tuning);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let signals = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut failed = 0usize;
    let mut memo = crate::compact::Memo::default();
    loop {
        let started = std::time::Instant::now();
        let pass = crate::compact::compact_all_again(&sink, &tables, &options, &mut memo).await?;
        let elapsed = started.elapsed();
        for (name, result) in &pass {
            match result {
                Ok(r) if r.unchanged && matches!(a.format, crate::cli::OutputFormat::Table) => {
                    println!("{name}: unchanged since the last pass");
                }
                Ok(r) => match a.format {
                    crate::cli::OutputFormat::Json => println!(
                        "{}",
                        serde_json::json!({
                            "table": name.to_string(),
                            "from_version": r.from_version,
                            "to_version": r.to_version,
                            "steps": r.steps,
                            "commits": r.commits,
                            "changes": r.changes,
                            "buckets_rewritten": r.buckets_rewritten,
                            "buckets_patched": r.buckets_patched,
                            "buckets": r.buckets_total,
                            "current_bytes_rewritten": r.current_bytes_rewritten,
                            "current_bytes": r.current_bytes_total,
                            "versions_closed": r.history_versions_closed,
                            "tombstones_retired": r.history_tombstones_retired,
                            "files_vacuumed": r.files_vacuumed,
                            "changelog_files_merged": r.changelog_files_merged,
                            "changelog_files_written": r.changelog_files_written,
                            "changelog_files_expired": r.changelog_files_expired,
                            "history_files_merged": r.history_files_merged,
                            "history_files_written": r.history_files_written,
                            "load_in_progress": r.load_in_progress,
                            "unchanged": r.unchanged,
                        })
                    ),
                    crate::cli::OutputFormat::Table => println!(
                        "{name}: {} changes in {} steps ({} commits), {}/{} buckets rewritten, {} patched ({} of {} bytes written), change log through version {}; change-log files: {} merged into {}, {} expired; history files: {} merged into {}; {} files vacuumed{}",
                        r.changes,
                        r.steps,
                        r.commits,
                        r.buckets_rewritten,
                        r.buckets_total,
                        r.buckets_patched,
                        r.current_bytes_rewritten,
                        r.current_bytes_total,
                        r.to_version.map_or("-".to_string(), |v| v.to_string()),
                        r.changelog_files_merged,
                        r.changelog_files_written,
                        r.changelog_files_expired,
                        r.history_files_merged,
                        r.history_files_written,
                        r.files_vacuumed,
                        if r.load_in_progress {
                            "; initial load in progress (its chunks so far wait)"
                        } else {
                            ""
                        },
                    ),
                },
                Err(e) => {
                    failed += 1;
                    eprintln!("{name}: {}", crate::pipeline::error_chain(e));
                }
            }
        }
        tracing::debug!(
            tables = pass.len(),
            elapsed_ms = elapsed.as_millis() as u64,
            "compaction pass"
        );
        // No interval, or 0 (the variable `run --compact-interval` shares: off there): once.
        let Some(interval) = a.interval.filter(|i| !i.is_zero()) else {
            break;
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop_rx.wait_for(|s| *s) => break,
        }
    }
    signals.abort();
    if failed > 0 {
        anyhow::bail!("{failed} table(s) could not be compacted");
    }
    Ok(())
}

/// `slotlake snapshot --table …`: leaves a re-load request for the slot's `run`, which
/// backfills the tables at its next publication check.
pub async fn snapshot(a: crate::cli::SnapshotArgs) -> Result<()> {
    let sink = sink_of(&a.sink)?;
    let tables = parse_tables(&a.tables)?;
    let Some(record) = crate::snapshot::read_record(&sink, &a.slot.slot).await? else {
        anyhow::bail!(
            "slot {:?} has no snapshot record in {sink}: re-loading needs a slot whose initial \
             snapshot `slotlake run --snapshot initial` took",
            a.slot.slot
        );
    };
    if record.state != "done" {
        anyhow::bail!(
            "the initial snapshot of slot {:?} has not finished; `slotlake run` finishes it first",
            a.slot.slot
        );
    }
    crate::snapshot::request_reload(&sink, &a.slot.slot, &tables).await?;
    for t in &tables {
        println!("{t}: re-load requested; `slotlake run --slot {}` backfills it at its next publication check", a.slot.slot);
    }
    Ok(())
}

/// The lake differs from the source (`slotlake verify`): exit code 6.
#[derive(Debug, thiserror::Error)]
#[error("the lake differs from the source in {0} table(s)")]
pub struct VerifyFailed(pub usize);

/// `slotlake verify`: per-table counts and the first differing keys on stdout.
pub async fn verify(a: crate::cli::VerifyArgs) -> Result<()> {
    let info = source(&a.source.source)?;
    let sink = sink_of(&a.sink)?;
    let tables = parse_tables(&a.tables)?;
    let opts = crate::verify::VerifyOptions {
        slot: a.slot.slot,
        publication: a.publication.publication,
        tables,
        wait: a.wait,
        max_keys: a.max_keys,
        compact: compact_options(&a.tuning),
    };
    let v = crate::verify::verify(&info, &sink, &opts).await?;
    let mut failed = 0;
    for t in &v.tables {
        if !t.ok() {
            failed += 1;
        }
        match a.format {
            crate::cli::OutputFormat::Json => println!(
                "{}",
                serde_json::json!({
                    "table": t.table,
                    "as_of_lsn": v.as_of.to_string(),
                    "ok": t.ok(),
                    "source_rows": t.source_rows,
                    "lake_rows": t.lake_rows,
                    "missing": t.missing,
                    "extra": t.extra,
                    "different": t.different,
                    "current_mismatch": t.current_mismatch,
                    "keys": t.keys,
                    "error": t.error,
                })
            ),
            crate::cli::OutputFormat::Table => {
                println!(
                    "{} {}: source {} rows, lake {} rows as of {}; missing {}, extra {}, different {}, current-table mismatches {}",
                    if t.ok() { "OK  " } else { "FAIL" },
                    t.table,
                    t.source_rows,
                    t.lake_rows,
                    v.as_of,
                    t.missing,
                    t.extra,
                    t.different,
                    t.current_mismatch
                );
                if let Some(e) = &t.error {
                    println!("     error: {e}");
                }
                for k in &t.keys {
                    println!("     {k}");
                }
            }
        }
    }
    if failed > 0 {
        return Err(VerifyFailed(failed).into());
    }
    Ok(())
}

/// How long a failing initial load keeps its snapshot for the next attempt: the exporting
/// session holds back the source's xmin horizon (vacuum) while it lives.
const SNAPSHOT_KEEP_LIMIT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// The snapshot an initial load reads, the session that keeps it alive (it must stay open and
/// idle), and the slot's start C the load is for.
struct LoadSnapshot {
    session: PgConnection,
    snapshot: crate::snapshot::ExportedSnapshot,
    start: crate::lsn::Lsn,
}

/// The initial snapshot of `run`: from the new slot's exported snapshot, or — when a load
/// was interrupted — from a temporary slot's (see `crate::snapshot`). The snapshot is kept in
/// `kept` when an attempt fails for a reason that leaves it valid (the sink failing), so that
/// the next attempt goes on in the same snapshot, exactly; it is dropped when the load is
/// done, when a table was rewritten under it, or when importing it found its session gone.
async fn initial_snapshot(
    opts: &crate::snapshot::LoadOptions,
    mode: crate::cli::SnapshotMode,
    info: &ConnInfo,
    sink: &crate::lake::store::Sink,
    kept: &mut Option<LoadSnapshot>,
    metrics: &crate::metrics::Metrics,
) -> Result<()> {
    use crate::snapshot::{read_record, temporary_snapshot, SnapshotGone, TableRewritten};
    if mode == crate::cli::SnapshotMode::Never {
        return Ok(());
    }
    let record = read_record(sink, &opts.slot).await?;
    let loading = record.as_ref().filter(|r| r.state == "loading");
    if kept.is_none() {
        let Some(r) = loading else {
            return Ok(());
        };
        tracing::info!(slot = %opts.slot, "resuming an interrupted initial snapshot from a new snapshot");
        // The slot never confirmed during the load: its position is still its start.
        let start = match r.consistent_point.parse::<crate::lsn::Lsn>() {
            Ok(p) => p,
            Err(_) => {
                let mut repl = PgConnection::connect(info, SessionKind::Replication).await?;
                let slot_info = slot::slot_info(&mut repl, &opts.slot).await?;
                repl.close().await;
                slot_info
                    .and_then(|s| s.confirmed_flush_lsn)
                    .and_then(|l| l.parse().ok())
                    .context("the slot of an interrupted snapshot is gone")?
            }
        };
        let (session, snapshot) = temporary_snapshot(info).await?;
        *kept = Some(LoadSnapshot {
            session,
            snapshot,
            start,
        });
    }
    let Some(k) = kept.as_ref() else {
        return Ok(());
    };
    // The plans of an earlier attempt at this slot's load (none for a slot just created).
    let earlier = loading
        .filter(|r| {
            r.consistent_point.is_empty()
                || r.consistent_point.parse::<crate::lsn::Lsn>().ok() == Some(k.start)
        })
        .map(|r| (r.plans.clone(), r.restates.clone()))
        .unwrap_or_default();
    let loaded = load_recorded(opts, info, sink, &k.snapshot, k.start, earlier, metrics).await;
    // The load's own imports tell when the snapshot is gone (`SnapshotGone`).
    let keep = match &loaded {
        Ok(()) => false,
        Err(e) if e.chain().any(|c| c.is::<SnapshotGone>()) => {
            tracing::info!(slot = %opts.slot, "the snapshot of the failed attempt is gone; the load goes on from a new one");
            false
        }
        Err(e) => !e.chain().any(|c| c.is::<TableRewritten>()),
    };
    if !keep {
        if let Some(k) = kept.take() {
            k.session.close().await;
        }
    }
    loaded
}

/// Runs a load with its record: `loading` (with the slot's start, and the chunk plans of an
/// interrupted attempt, which the load replaces with its own, and the copies it left for the
/// stream, which it keeps) before, `done` after.
async fn load_recorded(
    opts: &crate::snapshot::LoadOptions,
    info: &ConnInfo,
    sink: &crate::lake::store::Sink,
    snapshot: &crate::snapshot::ExportedSnapshot,
    point: crate::lsn::Lsn,
    (plans, restates): (
        std::collections::BTreeMap<String, crate::snapshot::ChunkPlan>,
        std::collections::BTreeMap<String, crate::snapshot::Restate>,
    ),
    metrics: &crate::metrics::Metrics,
) -> Result<()> {
    use crate::snapshot::{load, write_record, LoadRecord};
    let mut record = LoadRecord {
        consistent_point: point.to_string(),
        state: "loading".into(),
        tables: Vec::new(),
        plans,
        restates,
    };
    write_record(sink, &opts.slot, &record).await?;
    let since = crate::lsn::Lsn(point.0.saturating_sub(1));
    let loaded = load(
        info,
        sink,
        snapshot,
        opts,
        since,
        metrics,
        Some(&mut record),
    )
    .await?;
    record.state = "done".into();
    record.tables = loaded.covered.iter().map(|t| t.to_string()).collect();
    record.plans.clear();
    write_record(sink, &opts.slot, &record).await?;
    Ok(())
}

/// Polls the publication; when it has tables the snapshot record does not list, or re-load
/// requests wait, requests a backfill (the flag stays set until the record lists them and the
/// requests are carried out).
async fn watch_publication(
    info: ConnInfo,
    sink: crate::lake::store::Sink,
    opts: crate::snapshot::LoadOptions,
    interval: std::time::Duration,
    request: tokio::sync::watch::Sender<bool>,
) {
    loop {
        tokio::time::sleep(interval).await;
        match new_tables(&info, &sink, &opts).await {
            Ok(new) => {
                let _ = request.send(!new.tables.is_empty());
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot check the publication for new tables");
            }
        }
    }
}

/// Tables to backfill and the re-load requests that asked for some of them.
#[derive(Default)]
struct Pending {
    tables: Vec<TableName>,
    requests: Vec<object_store::path::Path>,
}

/// Published tables the slot's finished load does not list, or that a re-load request names
/// (none while no load finished).
async fn new_tables(
    info: &ConnInfo,
    sink: &crate::lake::store::Sink,
    opts: &crate::snapshot::LoadOptions,
) -> Result<Pending> {
    let Some(record) = crate::snapshot::read_record(sink, &opts.slot).await? else {
        return Ok(Pending::default());
    };
    if record.state != "done" {
        return Ok(Pending::default());
    }
    let requests = crate::snapshot::pending_requests(sink, &opts.slot).await?;
    let mut sql = PgConnection::connect(info, SessionKind::Sql).await?;
    let published = crate::source::published_tables(&mut sql, &opts.publication).await;
    sql.close().await;
    let published: Vec<(TableName, String)> = published?
        .into_iter()
        .map(|t| {
            let s = t.to_string();
            (t, s)
        })
        .collect();
    // A request for tables none of which is published has nothing to do.
    let (useful, useless): (Vec<_>, Vec<_>) = requests
        .into_iter()
        .partition(|r| r.1.iter().any(|t| published.iter().any(|p| &p.1 == t)));
    for (path, tables) in &useless {
        tracing::warn!(request = %path, tables = ?tables, publication = %opts.publication, "dropping a re-load request for tables the publication does not have");
    }
    let useless: Vec<_> = useless.into_iter().map(|r| r.0).collect();
    crate::snapshot::clear_requests(sink, &useless).await?;
    let tables = published
        .into_iter()
        .filter(|(_, s)| !record.tables.contains(s) || useful.iter().any(|r| r.1.contains(s)))
        .map(|(t, _)| t)
        .collect();
    Ok(Pending {
        tables,
        requests: useful.into_iter().map(|r| r.0).collect(),
    })
}

/// Runs a backfill whenever the watcher asks for one, while `run` streams; a failed backfill
/// is tried again after [`BACKFILL_RETRY`] (at least two publication checks).
#[allow(clippy::too_many_arguments)]
async fn backfill_loop(
    opts: crate::snapshot::LoadOptions,
    info: ConnInfo,
    sink: crate::lake::store::Sink,
    metrics: Arc<crate::metrics::Metrics>,
    mut request: tokio::sync::watch::Receiver<bool>,
    handoff: Arc<tokio::sync::watch::Sender<crate::pipeline::HandOff>>,
    mut paused: tokio::sync::watch::Receiver<Option<u64>>,
    check_interval: std::time::Duration,
) {
    for id in 1u64.. {
        if request.wait_for(|b| *b).await.is_err() {
            return;
        }
        match backfill(&opts, &info, &sink, &metrics, &handoff, &mut paused, id).await {
            Ok(()) => {
                // The watcher clears the request once it sees the record list them.
                let _ = tokio::time::timeout(check_interval * 2, request.wait_for(|b| !*b)).await;
            }
            Err(e) => {
                metrics.retries.with_label_values(&["backfill"]).inc();
                let wait = BACKFILL_RETRY.max(check_interval * 2);
                tracing::error!(error = %format!("{e:#}"), retry_in = ?wait, "backfilling tables that joined the publication failed; streaming goes on, the backfill is tried again later");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Loads tables that joined the publication (or that `slotlake snapshot` asked to re-load)
/// while the stream goes on, from a temporary slot's snapshot at C2: their rows at C2 − 1,
/// replacing the changes streamed for them so far.
///
/// The hand-off: (1) the stream pauses with everything committed, so none of these tables'
/// changes at or after C2 is in their change logs; (2) the snapshot is created, the stream
/// resumes, dropping their changes below C2 (the snapshot has them) and holding later ones
/// uncommitted; (3) the load commits; (4) the held changes commit on top of it. The slot is
/// never confirmed past a held change. If the load fails, the tables are released as they are
/// (incomplete, and not recorded as loaded) and loaded again by the next attempt.
#[allow(clippy::too_many_arguments)]
async fn backfill(
    opts: &crate::snapshot::LoadOptions,
    info: &ConnInfo,
    sink: &crate::lake::store::Sink,
    metrics: &crate::metrics::Metrics,
    handoff: &tokio::sync::watch::Sender<crate::pipeline::HandOff>,
    paused: &mut tokio::sync::watch::Receiver<Option<u64>>,
    id: u64,
) -> Result<()> {
    let Pending {
        tables: new,
        requests,
    } = new_tables(info, sink, opts).await?;
    if new.is_empty() {
        return Ok(());
    }
    tracing::info!(
        tables = new.len(),
        "backfilling tables that joined the publication; other tables keep streaming"
    );
    // However this ends (done, failed, cancelled, panicked): pause lifted, tables released.
    let release = Release {
        handoff,
        tables: new.clone(),
        id,
    };
    handoff.send_modify(|h| h.pause = Some(id));
    let snapshot = tokio::time::timeout(BACKFILL_PAUSE_LIMIT, async {
        paused
            .wait_for(|p| *p == Some(id))
            .await
            .context("the stream ended")?;
        crate::snapshot::temporary_snapshot(info).await
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "creating the backfill's snapshot took over {BACKFILL_PAUSE_LIMIT:?} (a long-running transaction on the source?); streaming resumed, the backfill is tried again later"
        )
    })
    .and_then(|r| r);
    let (session, snapshot) = snapshot?;
    let since = crate::lsn::Lsn(snapshot.point.0.saturating_sub(1));
    handoff.send_modify(|h| {
        h.pause = None;
        for t in &new {
            h.floors.insert(t.clone(), since);
            h.held.insert(t.clone());
        }
    });
    tracing::info!(
        tables = new.len(),
        point = %snapshot.point,
        "backfill snapshot created; streaming resumed, the tables' later changes are held until its load commits"
    );
    let mut o = opts.clone();
    o.only = Some(new.clone());
    let loaded = crate::snapshot::load(info, sink, &snapshot, &o, since, metrics, None).await;
    session.close().await;
    drop(release);
    let loaded = loaded?;
    // `run` is the record's only writer (requests are files of their own).
    crate::snapshot::update_record(sink, &opts.slot, |record| {
        for t in &loaded.covered {
            let t = t.to_string();
            if !record.tables.contains(&t) {
                record.tables.push(t);
            }
        }
    })
    .await?;
    // Requests that arrived during the load are not among these: they wait for the next one.
    crate::snapshot::clear_requests(sink, &requests).await?;
    tracing::info!(
        tables = loaded.covered.len(),
        rows = loaded.rows,
        "backfill done"
    );
    Ok(())
}

/// `--on-slot-invalidated=resnapshot`: drop the invalidated slot, create it again and re-load
/// every published table from its exported snapshot, replacing what the lake held.
async fn resnapshot(
    opts: &crate::snapshot::LoadOptions,
    info: &ConnInfo,
    sink: &crate::lake::store::Sink,
    metrics: &crate::metrics::Metrics,
) -> Result<()> {
    let mut repl = PgConnection::connect(info, SessionKind::Replication).await?;
    slot::drop_slot(&mut repl, &opts.slot, true).await?;
    // Recorded before the new slot exists, as in `run --create-slot`.
    crate::snapshot::write_record(sink, &opts.slot, &crate::snapshot::LoadRecord::pending())
        .await?;
    let created = slot::create_slot(&mut repl, &opts.slot, SnapshotAction::Export).await?;
    let (Some(point), Some(name)) = (created.consistent_point, created.snapshot_name) else {
        anyhow::bail!("re-creating slot {:?} exported no snapshot", opts.slot);
    };
    tracing::info!(slot = %opts.slot, consistent_point = %point, "re-created the invalidated slot; re-loading every table");
    let snapshot = crate::snapshot::ExportedSnapshot { name, point };
    // Re-load requests made before are carried out by this re-load of everything.
    let requests: Vec<_> = crate::snapshot::pending_requests(sink, &opts.slot)
        .await?
        .into_iter()
        .map(|r| r.0)
        .collect();
    let plans = Default::default();
    let loaded = load_recorded(opts, info, sink, &snapshot, point, plans, metrics).await;
    repl.close().await;
    loaded?;
    crate::snapshot::clear_requests(sink, &requests).await
}

/// Releases a backfill's tables and lifts its pause request when dropped.
struct Release<'a> {
    handoff: &'a tokio::sync::watch::Sender<crate::pipeline::HandOff>,
    tables: Vec<TableName>,
    id: u64,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.handoff.send_modify(|h| {
            if h.pause == Some(self.id) {
                h.pause = None;
            }
            for t in &self.tables {
                h.held.remove(t);
            }
        });
    }
}

/// Longest the stream stays paused while a backfill creates its snapshot.
const BACKFILL_PAUSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Wait before trying a failed backfill again (at least two publication checks).
const BACKFILL_RETRY: std::time::Duration = std::time::Duration::from_secs(300);

/// First and longest wait before reconnecting after a transient failure.
const RECONNECT_MIN: std::time::Duration = std::time::Duration::from_millis(500);
const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// A run that lasted this long before failing starts the backoff over.
const RECONNECT_RESET_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `slotlake setup`: prerequisites, then pending migrations (or what would be applied).
pub async fn setup(a: crate::cli::SetupArgs) -> Result<()> {
    use crate::setup::{self, SetupError, MIGRATIONS};
    let info = ConnInfo::parse(&a.source.source).context("invalid --source")?;
    let mut conn = PgConnection::connect(&info, SessionKind::Sql).await?;
    let out = &mut std::io::stdout().lock();
    let checks = setup::checks(&mut conn).await?;
    let mut missing = 0;
    for c in &checks {
        let mark = if c.ok { "ok     " } else { "MISSING" };
        writeln!(out, "{mark} {:<22} {}", c.name, c.detail)?;
        if let Some(fix) = &c.fix {
            writeln!(out, "        fix: {fix}")?;
            missing += 1;
        }
    }
    if missing > 0 {
        out.flush()?;
        conn.close().await;
        return Err(SetupError::Prerequisites(missing).into());
    }
    let applied = setup::applied(&mut conn).await?;
    let pending: Vec<_> = MIGRATIONS
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .collect();
    if pending.is_empty() {
        writeln!(
            out,
            "migrations: all {} applied, nothing to do",
            MIGRATIONS.len()
        )?;
    }
    for m in pending {
        if a.dry_run {
            writeln!(
                out,
                "would apply migration {:04} {}:\n{}",
                m.version,
                m.name,
                m.sql.trim_end()
            )?;
        } else {
            setup::apply(&mut conn, m).await?;
            writeln!(out, "applied migration {:04} {}", m.version, m.name)?;
        }
    }
    conn.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However a backfill ends — returned, failed, cancelled, panicked — its tables are
    /// released and its pause lifted; other backfills' state stays.
    #[test]
    fn a_backfill_releases_its_tables_however_it_ends() {
        let (tx, rx) = tokio::sync::watch::channel(crate::pipeline::HandOff::default());
        let a = TableName::parse("public.a").unwrap();
        let b = TableName::parse("public.b").unwrap();
        tx.send_modify(|h| {
            h.held.insert(b.clone());
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _release = Release {
                handoff: &tx,
                tables: vec![a.clone()],
                id: 7,
            };
            tx.send_modify(|h| {
                h.pause = Some(7);
                h.held.insert(a.clone());
            });
            panic!("the load failed badly");
        }));
        assert!(result.is_err());
        let h = rx.borrow();
        assert_eq!(h.pause, None);
        assert!(!h.held.contains(&a));
        assert!(h.held.contains(&b), "another backfill's table stays held");
    }
}
