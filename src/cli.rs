//! Command-line interface: every flag has a long name, an environment variable and `--help` text.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::parse_duration;
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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the replication slot and publication.
    #[command(subcommand)]
    Slot(SlotCommand),
    /// Print decoded changes as JSON lines (debugging; does not advance the slot unless --confirm).
    Tail(TailArgs),
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
    #[arg(long, env = "SLOTLAKE_STATUS_INTERVAL", value_name = "DURATION", default_value = DEFAULT_STATUS_INTERVAL, value_parser = parse_duration)]
    pub status_interval: Duration,
}
