//! The `slotlake` binary: parse the command line, run one command, print the error chain.

use std::process::ExitCode;

use clap::Parser;
use slotlake::cli::{Cli, Command, LogFormat};
use slotlake::commands;
use slotlake::pipeline::RunError;
use slotlake::replication::slot::SlotError;
use slotlake::replication::{operator_hint, ClientError};
use slotlake::setup::SetupError;
use slotlake::tail::TailError;
use slotlake::txn::TxnError;

/// Exit codes (README, "Errors and exit codes"). Usage errors exit with clap's 2.
const EXIT_FAILURE: u8 = 1;
/// The source is not set up for slotlake: authentication, privileges, wal_level, publication.
const EXIT_SOURCE_SETUP: u8 = 3;
/// The replication slot does not exist (dropped) or cannot be used.
const EXIT_SLOT: u8 = 4;
/// The stream carried something slotlake cannot represent: malformed message, undecodable
/// value. Nothing past it was confirmed.
const EXIT_BAD_DATA: u8 = 5;
/// `slotlake verify` found the lake different from the source.
const EXIT_VERIFY_DIFFERS: u8 = 6;

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_logging(&cli.log_level, cli.log_format);
    // One thread runs the command and polls the sockets itself; file and object-store I/O go
    // to tokio's blocking pool. A multi-threaded runtime cost `slotlake run` a cross-thread
    // wakeup per socket read: 4.7 s instead of 3.0 s of system CPU per million changes.
    // `compact` and `verify` read Delta logs, table after table: they get a
    // multi-threaded runtime (one worker), because on a current-thread runtime deltalake runs
    // each log read's kernel engine on a new OS thread (`strace -f -c`: 215 threads started
    // by one table's first compaction, 109 by a pass with nothing to do; 5,000 tables, half
    // a million a pass).
    let runtime = if matches!(cli.command, Command::Compact(_) | Command::Verify(_)) {
        slotlake::lake::changelog::one_worker_runtime("slotlake-worker")
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(try_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if let Some(hint) = hint(&err) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(exit_code(&err))
        }
    }
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Slot(cmd) => commands::slot(cmd).await,
        Command::Tail(args) => commands::tail(args).await,
        Command::Run(args) => commands::run(args).await,
        Command::Setup(args) => commands::setup(args).await,
        Command::Compact(args) => commands::compact(args).await,
        Command::Verify(args) => commands::verify(args).await,
        Command::Snapshot(args) => commands::snapshot(args).await,
    }
}

/// The operator hint for the first error in the chain that has one. Wrappers declared
/// `#[error(transparent)]` hide the wrapped error from the chain, so they are unwrapped here.
fn hint(err: &anyhow::Error) -> Option<String> {
    err.chain().find_map(|e| match source_error(e)? {
        SourceError::Client(c) => operator_hint(c, "<user>"),
        SourceError::Slot(s) => slot_hint(s),
    })
}

/// A client or slot error, directly or inside a command's error type.
enum SourceError<'a> {
    Client(&'a ClientError),
    Slot(&'a SlotError),
}

/// The client or slot error `e` is, including the ones `RunError` and `TailError` wrap as
/// `#[error(transparent)]` (which hides them from the chain).
fn source_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<SourceError<'a>> {
    if let Some(c) = e.downcast_ref::<ClientError>() {
        return Some(SourceError::Client(c));
    }
    if let Some(s) = e.downcast_ref::<SlotError>() {
        return Some(SourceError::Slot(s));
    }
    match e.downcast_ref::<RunError>() {
        Some(RunError::Client(c)) => return Some(SourceError::Client(c)),
        Some(RunError::Slot(s)) => return Some(SourceError::Slot(s)),
        _ => {}
    }
    match e.downcast_ref::<TailError>()? {
        TailError::Client(c) => Some(SourceError::Client(c)),
        TailError::Slot(s) => Some(SourceError::Slot(s)),
        _ => None,
    }
}

/// The documented exit code for an error.
fn exit_code(err: &anyhow::Error) -> u8 {
    fn client(c: &ClientError) -> Option<u8> {
        match c.sqlstate()? {
            s if s.starts_with("28") || s == "42501" => Some(EXIT_SOURCE_SETUP),
            _ => None,
        }
    }
    fn slot(s: &SlotError) -> Option<u8> {
        match s {
            SlotError::SlotMissing(_)
            | SlotError::Invalidated(_)
            | SlotError::WrongPlugin { .. }
            | SlotError::WrongDatabase { .. }
            | SlotError::NotLogical { .. } => Some(EXIT_SLOT),
            SlotError::PublicationMissing(_)
            | SlotError::PublicationMismatch { .. }
            | SlotError::WalLevel(_) => Some(EXIT_SOURCE_SETUP),
            SlotError::Client(c) => client(c),
            _ => None,
        }
    }
    err.chain()
        .find_map(|e| {
            match source_error(e) {
                Some(SourceError::Slot(s)) => return slot(s),
                Some(SourceError::Client(c)) => return client(c),
                None => {}
            }
            if e.is::<slotlake::commands::VerifyFailed>() {
                return Some(EXIT_VERIFY_DIFFERS);
            }
            if let Some(SetupError::Prerequisites(_)) = e.downcast_ref::<SetupError>() {
                return Some(EXIT_SOURCE_SETUP);
            }
            if let Some(r) = e.downcast_ref::<RunError>() {
                return match r {
                    RunError::Decode { .. }
                    | RunError::Value { .. }
                    | RunError::Row { .. }
                    | RunError::ColumnCount { .. } => Some(EXIT_BAD_DATA),
                    RunError::Txn { source, .. } => match source {
                        TxnError::Spill { .. } => None,
                        _ => Some(EXIT_BAD_DATA),
                    },
                    _ => None,
                };
            }
            None
        })
        .unwrap_or(EXIT_FAILURE)
}

fn slot_hint(e: &SlotError) -> Option<String> {
    match e {
        SlotError::SlotMissing(_) => Some("create it with `slotlake slot create`".into()),
        SlotError::Invalidated(slot) => Some(format!(
            "the lake misses changes from here on: re-create the slot and re-load the tables — \
             run with `--on-slot-invalidated=resnapshot`, or `slotlake slot drop --slot {slot}` \
             then `slotlake run --create-slot --slot {slot} ...` (either re-loads every table, \
             replacing the lake's contents); raise max_slot_wal_keep_size (or watch \
             slotlake_slot_safe_wal_bytes) so it does not happen again"
        )),
        SlotError::PublicationMissing(_) => Some(
            "create it with `slotlake slot create --create-publication` (or CREATE PUBLICATION)"
                .into(),
        ),
        SlotError::PublicationMismatch { .. } => Some(
            "use another --publication, or change the existing one with ALTER PUBLICATION".into(),
        ),
        SlotError::WalLevel(_) => Some(
            "set wal_level = logical in postgresql.conf and restart the server \
             (RDS/Aurora: rds.logical_replication = 1 in the parameter group, then reboot)"
                .into(),
        ),
        SlotError::Client(c) => operator_hint(c, "<user>"),
        _ => None,
    }
}

fn init_logging(level: &str, format: LogFormat) {
    // The Delta libraries narrate every snapshot at info; keep them at warn unless asked.
    let directives = if level.contains("kernel") || level.contains("deltalake") {
        level.to_string()
    } else {
        format!("{level},buoyant_kernel=warn,buoyant_kernel_engine=warn,deltalake_core=warn")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// glibc gives every thread that allocates concurrently an arena of its own (up to 8 per
/// core) and keeps freed memory in each: compaction's fold workers and writer threads then
/// held 1,078 MiB at peak where two arenas hold 807 MiB, at the same speed
/// (`scripts/bench-compact.sh`). Two arenas bound that without serializing the threads; the
/// ingest rate of `slotlake run` measured the same with them (`scripts/bench-ingest.sh`, a).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
