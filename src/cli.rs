//! Command-line interface: every flag has a long name, an environment variable and `--help` text.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{parse_duration, parse_size};
use crate::lsn::Lsn;

/// Default slot and publication name.
pub const DEFAULT_SLOT: &str = "slotlake";
pub const DEFAULT_PUBLICATION: &str = "slotlake";
/// How often `tail` sends a standby status update when the server does not ask for one.
pub const DEFAULT_STATUS_INTERVAL: &str = "10s";

#[derive(Debug, Parser)]
#[command(
    name = "slotlake",
    version,
    about = "Mirror PostgreSQL into a lakehouse over logical replication (pgoutput)"
)]
pub struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a tracing directive list.
    #[arg(
        long,
        env = "SLOTLAKE_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "info",
        global = true
    )]
    pub log_level: String,

    /// Log format.
    #[arg(
        long,
        env = "SLOTLAKE_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What `run` does when its slot is invalidated (`wal_status = lost`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnSlotInvalidated {
    /// Stop with exit code 4 and the recovery steps.
    Fail,
    /// Drop and re-create the slot, then re-load every published table from its snapshot,
    /// replacing what the lake held.
    Resnapshot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SnapshotMode {
    /// Load existing rows when `run` creates the slot.
    Initial,
    /// Stream changes only.
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the replication slot and publication.
    #[command(subcommand)]
    Slot(SlotCommand),
    /// Print decoded changes as JSON lines (debugging; does not advance the slot unless --confirm).
    Tail(TailArgs),
    /// Stream the slot into exactly-once Delta change logs on object storage.
    Run(RunArgs),
    /// Check the source's prerequisites and apply slotlake's SQL migrations (idempotent).
    Setup(SetupArgs),
    /// Fold change logs into current-state (SCD1) and history (SCD2) Delta tables, once or
    /// every --interval.
    Compact(CompactArgs),
    /// Re-load chosen tables: the running `slotlake run` of --slot backfills them at its next
    /// publication check.
    Snapshot(SnapshotArgs),
    /// Compare the lake with the live source: the history table as of a snapshot of the
    /// source, and the current table with the history table. Exit 6 on any difference.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub sink: SinkArgs,
    #[command(flatten)]
    pub slot: SlotArgs,
    /// A table to re-load (schema.table; repeatable).
    #[arg(long = "table", value_name = "SCHEMA.TABLE", required = true)]
    pub tables: Vec<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub slot: SlotArgs,
    #[command(flatten)]
    pub publication: PublicationArgs,
    #[command(flatten)]
    pub sink: SinkArgs,
    /// Verify only these tables (schema.table; repeatable). Default: the publication's tables.
    #[arg(long = "table", value_name = "SCHEMA.TABLE")]
    pub tables: Vec<String>,
    /// How long to wait for the slot (`slotlake run`) to pass the verification snapshot.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub wait: Duration,
    /// Differing keys printed per table.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub max_keys: usize,
    #[command(flatten)]
    pub tuning: CompactTuning,
    /// Report format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
}

/// How compaction runs (shared by `compact` and `run --compact-interval`).
#[derive(Debug, Args, Clone)]
pub struct CompactTuning {
    /// Memory for compaction (the changes a step reads and the buckets they touch), shared by
    /// the tables compacted at the same time.
    #[arg(long, env = "SLOTLAKE_COMPACT_MEMORY", value_name = "SIZE", default_value = "512MiB", value_parser = parse_size)]
    pub compact_memory: u64,
    /// Tables compacted at the same time. Each takes a share of --compact-memory for its
    /// changes and buckets; a table needing all of it runs alone.
    #[arg(long, env = "SLOTLAKE_COMPACT_CONCURRENCY", value_name = "N", default_value_t = crate::compact::TABLES_AT_ONCE)]
    pub compact_concurrency: usize,
    /// A bucket of the current table (one file) splits in two above this many bytes of rows
    /// in memory (about 4× their Parquet size).
    #[arg(long, env = "SLOTLAKE_BUCKET_SIZE", value_name = "SIZE", default_value = "128MiB", value_parser = parse_size)]
    pub bucket_size: u64,
    /// Delete the files compaction replaced (old buckets) this long after; readers of older
    /// table versions keep working meanwhile. `off` keeps them.
    #[arg(long, env = "SLOTLAKE_VACUUM_RETENTION", value_name = "DURATION", default_value = "168h", value_parser = parse_optional_duration)]
    pub vacuum_retention: OptionalDuration,
    /// Change-log files smaller than an eighth of this, once compacted, are merged (size-tiered, 8 at
    /// a time) into files of up to this size, and so are the history table's closed-version
    /// files; `0` or `off` turns both off.
    #[arg(long, env = "SLOTLAKE_OPTIMIZE_FILE_SIZE", value_name = "SIZE", default_value = "64MiB", value_parser = crate::config::parse_size_or_off)]
    pub optimize_file_size: u64,
    /// Change-log files written this long ago, once compacted, leave the change log (and are
    /// deleted --vacuum-retention later). `off` keeps the change log whole.
    #[arg(long, env = "SLOTLAKE_CHANGES_RETENTION", value_name = "DURATION", default_value = "off", value_parser = parse_optional_duration)]
    pub changes_retention: OptionalDuration,
    /// Tombstones (the history versions deletes open) older than this leave the open
    /// versions, which buckets rewrite: a table that deletes a lot (a queue) then costs what
    /// its live rows cost, not what it ever deleted. A key that comes back later than this
    /// after its delete leaves its tombstone open (`_valid_to` null) instead of closing it.
    /// `off` keeps every tombstone open until its key comes back.
    #[arg(long, env = "SLOTLAKE_TOMBSTONE_RETENTION", value_name = "DURATION", default_value = "off", value_parser = parse_optional_duration)]
    pub tombstone_retention: OptionalDuration,
    /// Current and history tables with deletion vectors (Delta reader version 3): a bucket
    /// with few changed keys gets a small file of their new versions, and its old versions
    /// are marked deleted, instead of being rewritten. Needs a reader that applies deletion
    /// vectors (Spark, Databricks, DuckDB's delta extension, delta-rs's QueryBuilder).
    /// Existing tables are switched on with their next commit; a table keeps them.
    #[arg(long, env = "SLOTLAKE_DELETION_VECTORS")]
    pub deletion_vectors: bool,
}

/// A duration, or `off`.
#[derive(Debug, Clone, Copy)]
pub struct OptionalDuration(pub Option<Duration>);

fn parse_optional_duration(s: &str) -> Result<OptionalDuration, String> {
    if s == "off" {
        Ok(OptionalDuration(None))
    } else {
        parse_duration(s).map(|d| OptionalDuration(Some(d)))
    }
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    #[command(flatten)]
    pub sink: SinkArgs,
    /// Compact only these tables (schema.table; repeatable). Default: every change log.
    #[arg(long = "table", value_name = "SCHEMA.TABLE")]
    pub tables: Vec<String>,
    /// Run again this long after each pass, until SIGTERM/SIGINT; default (or `0`): once.
    #[arg(long, env = "SLOTLAKE_COMPACT_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub interval: Option<Duration>,
    #[command(flatten)]
    pub tuning: CompactTuning,
    /// Report format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Print the checks and the SQL that would run; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Where the source database is.
#[derive(Debug, Args, Clone)]
pub struct SourceArgs {
    /// Source database: a libpq URL (postgresql://user@host:5432/db?sslmode=verify-full) or
    /// key=value string. The password may instead come from PGPASSWORD or ~/.pgpass.
    #[arg(
        long,
        env = "SLOTLAKE_SOURCE",
        value_name = "URL",
        hide_env_values = true
    )]
    pub source: String,
}

#[derive(Debug, Args, Clone)]
pub struct SlotArgs {
    /// Logical replication slot name (lower-case letters, digits, underscores).
    #[arg(long, env = "SLOTLAKE_SLOT", value_name = "NAME", default_value = DEFAULT_SLOT)]
    pub slot: String,
}

#[derive(Debug, Args, Clone)]
pub struct PublicationArgs {
    /// Publication whose tables are streamed.
    #[arg(long, env = "SLOTLAKE_PUBLICATION", value_name = "NAME", default_value = DEFAULT_PUBLICATION)]
    pub publication: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum SlotCommand {
    /// Create the slot (and with --create-publication the publication); a no-op when they
    /// already exist with the same definition.
    Create(SlotCreateArgs),
    /// Drop the slot (and with --drop-publication the publication).
    Drop(SlotDropArgs),
    /// List all replication slots on the server with the WAL they retain.
    List(SlotListArgs),
    /// Show one slot: position, activity, retained WAL, wal_status.
    Status(SlotStatusArgs),
}

#[derive(Debug, Args)]
pub struct SlotCreateArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub slot: SlotArgs,
    #[command(flatten)]
    pub publication: PublicationArgs,
    /// Also create the publication: for all tables, or for --schema / --table when given.
    #[arg(long, env = "SLOTLAKE_CREATE_PUBLICATION")]
    pub create_publication: bool,
    /// Publish every table in this schema, including tables created later (repeatable; PG ≥ 15).
    #[arg(
        long = "schema",
        env = "SLOTLAKE_SCHEMAS",
        value_name = "SCHEMA",
        value_delimiter = ',',
        conflicts_with = "tables"
    )]
    pub schemas: Vec<String>,
    /// Publish this table, as schema.table (repeatable; quote names as in SQL: '"My Schema"."T"').
    #[arg(
        long = "table",
        env = "SLOTLAKE_TABLES",
        value_name = "SCHEMA.TABLE",
        value_delimiter = ','
    )]
    pub tables: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SlotDropArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub slot: SlotArgs,
    #[command(flatten)]
    pub publication: PublicationArgs,
    /// Also drop the publication.
    #[arg(long, env = "SLOTLAKE_DROP_PUBLICATION")]
    pub drop_publication: bool,
    /// Wait for an active slot to be released instead of failing.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct SlotListArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Output format.
    #[arg(long, value_name = "FORMAT", default_value = "table")]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct SlotStatusArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub slot: SlotArgs,
    /// Output format.
    #[arg(long, value_name = "FORMAT", default_value = "table")]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub slot: SlotArgs,
    #[command(flatten)]
    pub publication: PublicationArgs,
    /// Stop after this many changes.
    #[arg(long, env = "SLOTLAKE_TAIL_LIMIT", value_name = "N")]
    pub limit: Option<u64>,
    /// Advance the slot past what was printed (by default tail only reads).
    #[arg(long, env = "SLOTLAKE_TAIL_CONFIRM")]
    pub confirm: bool,
    /// Ask the server for values in binary form (PG ≥ 14).
    #[arg(long, env = "SLOTLAKE_BINARY")]
    pub binary: bool,
    /// Also print pg_logical_emit_message messages.
    #[arg(long)]
    pub messages: bool,
    /// Decode every value but print nothing (for measuring decode speed).
    #[arg(long)]
    pub discard: bool,
    /// Start position; by default the slot's confirmed position.
    #[arg(long, value_name = "LSN", default_value = "0/0")]
    pub start_lsn: Lsn,
    /// Interval between standby status updates.
    #[arg(long, env = "SLOTLAKE_STATUS_INTERVAL", value_name = "DURATION", default_value = DEFAULT_STATUS_INTERVAL, value_parser = crate::config::parse_period)]
    pub status_interval: Duration,
}

/// Default flush settings (see the flush policy in `pipeline.rs` and the README).
pub const DEFAULT_TARGET_FILE_SIZE: &str = "64MiB";
pub const DEFAULT_FLUSH_INTERVAL: &str = "10s";
pub const DEFAULT_MEMORY_BUDGET: &str = "256MiB";
pub const DEFAULT_SHUTDOWN_TIMEOUT: &str = "60s";

/// Where the lake is.
#[derive(Debug, Args, Clone)]
pub struct SinkArgs {
    /// Lake root: file:///path, s3://bucket/prefix, or memory:// (tests). Change logs go to
    /// <sink>/changes/<schema>/<table>/.
    #[arg(long, env = "SLOTLAKE_SINK", value_name = "URL")]
    pub sink: String,
    /// S3-compatible endpoint (MinIO, moto, ...); AWS when unset. Credentials come from the
    /// AWS chain (AWS_ACCESS_KEY_ID/…, web identity, ECS/EC2 metadata).
    #[arg(long, env = "SLOTLAKE_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Allow plain HTTP to the S3 endpoint.
    #[arg(long, env = "SLOTLAKE_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
    /// S3 region (default AWS_REGION, else us-east-1).
    #[arg(long, env = "SLOTLAKE_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub slot: SlotArgs,
    #[command(flatten)]
    pub publication: PublicationArgs,
    #[command(flatten)]
    pub sink: SinkArgs,
    /// Create the slot when it does not exist.
    #[arg(long, env = "SLOTLAKE_CREATE_SLOT")]
    pub create_slot: bool,
    /// Create the publication (for all tables) when it does not exist.
    #[arg(long, env = "SLOTLAKE_CREATE_PUBLICATION")]
    pub create_publication: bool,
    /// Roll a table's data file over at this size.
    #[arg(long, env = "SLOTLAKE_TARGET_FILE_SIZE", value_name = "SIZE", default_value = DEFAULT_TARGET_FILE_SIZE, value_parser = parse_size)]
    pub target_file_size: u64,
    /// Commit buffered changes when the oldest is this old.
    #[arg(long, env = "SLOTLAKE_FLUSH_INTERVAL", value_name = "DURATION", default_value = DEFAULT_FLUSH_INTERVAL, value_parser = crate::config::parse_period)]
    pub flush_interval: Duration,
    /// Memory for buffered changes; above it, the largest tables are written out early.
    #[arg(long, env = "SLOTLAKE_MEMORY_BUDGET", value_name = "SIZE", default_value = DEFAULT_MEMORY_BUDGET, value_parser = parse_size)]
    pub memory_budget: u64,
    /// Directory for spill files of large streamed transactions (anonymous files, gone when
    /// the process exits). A quarter of --memory-budget holds streamed changes in memory;
    /// beyond it they go here. Default: the system temporary directory.
    #[arg(long, env = "SLOTLAKE_SPILL_DIR", value_name = "DIR")]
    pub spill_dir: Option<std::path::PathBuf>,
    /// Write a heartbeat (pg_logical_emit_message) to the source this often, so the slot of a
    /// database without writes keeps advancing; 0 turns it off.
    #[arg(long, env = "SLOTLAKE_HEARTBEAT_INTERVAL", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Check the slot's health (retained WAL, safe_wal_size, invalidation) this often; 0 turns
    /// it off.
    #[arg(long, env = "SLOTLAKE_SLOT_CHECK_INTERVAL", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub slot_check_interval: Duration,
    /// When the slot is invalidated: fail (exit 4 with the recovery steps), or resnapshot
    /// (re-create the slot and re-load every table, replacing the lake's contents).
    #[arg(
        long,
        env = "SLOTLAKE_ON_SLOT_INVALIDATED",
        value_enum,
        default_value = "fail"
    )]
    pub on_slot_invalidated: OnSlotInvalidated,
    /// /readyz is unready while the replication lag (WAL received but not yet committed and
    /// confirmed) is above this; `0` or `off`: no limit.
    #[arg(long, env = "SLOTLAKE_READY_MAX_LAG", value_name = "SIZE", default_value = "1GiB", value_parser = crate::config::parse_size_or_off)]
    pub ready_max_lag: u64,
    /// Initial snapshot: `initial` loads every published table's existing rows when run
    /// creates the slot (and finishes a load a crash interrupted); `never` streams only.
    #[arg(long, env = "SLOTLAKE_SNAPSHOT", value_enum, default_value = "initial")]
    pub snapshot: SnapshotMode,
    /// Connections reading the initial snapshot in parallel.
    #[arg(
        long,
        env = "SLOTLAKE_SNAPSHOT_WORKERS",
        value_name = "N",
        default_value_t = 4
    )]
    pub snapshot_workers: usize,
    /// Tables are read in chunks of this much heap (ctid ranges), so a large table uses every
    /// worker.
    #[arg(long, env = "SLOTLAKE_SNAPSHOT_CHUNK_SIZE", value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub snapshot_chunk_size: u64,
    /// Check the publication for tables that joined it this often and backfill their
    /// existing rows (streaming pauses while they load); 0 turns it off. Needs --snapshot
    /// initial.
    #[arg(long, env = "SLOTLAKE_PUBLICATION_CHECK_INTERVAL", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub publication_check_interval: Duration,
    /// Compact the change logs into current and history tables this often, in a thread of
    /// its own; 0 turns it off (then run `slotlake compact` elsewhere).
    #[arg(long, env = "SLOTLAKE_COMPACT_INTERVAL", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub compact_interval: Duration,
    #[command(flatten)]
    pub compact: CompactTuning,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SLOTLAKE_METRICS_ADDR", value_name = "ADDR", default_value = crate::metrics::DEFAULT_METRICS_ADDR)]
    pub metrics_addr: std::net::SocketAddr,
    /// Interval between standby status updates.
    #[arg(long, env = "SLOTLAKE_STATUS_INTERVAL", value_name = "DURATION", default_value = DEFAULT_STATUS_INTERVAL, value_parser = crate::config::parse_period)]
    pub status_interval: Duration,
    /// On SIGTERM/SIGINT, give up committing after this long (nothing is lost: uncommitted
    /// changes are read again from the slot next time).
    #[arg(long, env = "SLOTLAKE_SHUTDOWN_TIMEOUT", value_name = "DURATION", default_value = DEFAULT_SHUTDOWN_TIMEOUT, value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Stop once the stream has passed this LSN (like pg_recvlogical --endpos): every
    /// transaction that committed before it is committed in the lake and confirmed, then
    /// exit 0. For catch-up jobs run on a schedule, and benchmarks. By default run never
    /// stops by itself.
    #[arg(long, env = "SLOTLAKE_STOP_AT", value_name = "LSN")]
    pub stop_at: Option<Lsn>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `slotlake run` command line with the required flags.
    const RUN: [&str; 10] = [
        "slotlake",
        "run",
        "--source",
        "postgresql://localhost/db",
        "--slot",
        "s",
        "--publication",
        "p",
        "--sink",
        "memory://",
    ];

    /// Flags documented as "`0` or `off` turns it off" accept both.
    #[test]
    fn size_flags_that_can_be_off_accept_zero_and_off() {
        for off in ["0", "off"] {
            let args = RUN
                .into_iter()
                .chain(["--ready-max-lag", off, "--optimize-file-size", off]);
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{off}: {e}"));
            let Command::Run(run) = cli.command else {
                panic!("run");
            };
            assert_eq!(run.ready_max_lag, 0);
            assert_eq!(run.compact.optimize_file_size, 0);
        }
    }

    /// Periods that drive a timer are refused at 0 (a zero-period timer panics).
    #[test]
    fn zero_periods_are_refused() {
        for flag in ["--status-interval", "--flush-interval"] {
            let args = RUN.into_iter().chain([flag, "0"]);
            let err = Cli::try_parse_from(args).expect_err(flag).to_string();
            assert!(err.contains("must be more than 0"), "{flag}: {err}");
        }
        assert!(Cli::try_parse_from(RUN).is_ok());
    }
}
