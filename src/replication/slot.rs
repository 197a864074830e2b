//! Slot and publication management: the source-side objects a slotlake instance owns.
//!
//! A logical slot (plugin `pgoutput`) keeps WAL until slotlake confirms it; a publication names
//! the tables whose changes the slot sends. Both are created idempotently: running `slot create`
//! twice with the same definition is a no-op, and a different existing definition is an error
//! that says what differs — never a silent change of what is mirrored.

use std::collections::BTreeSet;

use super::connection::{ClientError, PgConnection, Row};
use super::sql::{quote_ident, quote_literal, TableName};
use crate::lsn::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "invalid slot name {0:?}: slot names may contain only lower-case letters, digits and underscores (at most 63)"
    )]
    InvalidSlotName(String),
    #[error("replication slot {slot:?} exists but uses plugin {plugin:?}, not pgoutput")]
    WrongPlugin { slot: String, plugin: String },
    #[error("replication slot {slot:?} belongs to database {database:?}, not {expected:?}")]
    WrongDatabase {
        slot: String,
        database: String,
        expected: String,
    },
    #[error("replication slot {slot:?} is physical, not logical")]
    NotLogical { slot: String },
    #[error("logical replication needs wal_level = logical, but the server has wal_level = {0}")]
    WalLevel(String),
    #[error("replication slot {0:?} does not exist")]
    SlotMissing(String),
    #[error("replication slot {0:?} was invalidated (wal_status = lost): the server removed WAL it still needed, so changes after its position are gone")]
    Invalidated(String),
    #[error("publication {0:?} does not exist")]
    PublicationMissing(String),
    #[error("publication {name:?} already exists with a different definition: it has {existing}, asked for {wanted}")]
    PublicationMismatch {
        name: String,
        existing: String,
        wanted: String,
    },
    #[error("unexpected answer from the server: {0}")]
    UnexpectedAnswer(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Checks a slot name the way the server does (ReplicationSlotValidateName).
pub fn validate_slot_name(name: &str) -> Result<(), SlotError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SlotError::InvalidSlotName(name.to_string()))
    }
}

/// A row of `pg_replication_slots`, with the WAL it retains.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotInfo {
    pub slot_name: String,
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    pub temporary: bool,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    /// Bytes of WAL between restart_lsn and the current WAL position.
    pub retained_wal_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PG ≥ 13).
    pub wal_status: Option<String>,
    /// Bytes that can still be written before the slot is in danger (PG ≥ 13).
    pub safe_wal_size: Option<i64>,
}

const SLOT_QUERY: &str = "SELECT slot_name, plugin, slot_type, database, temporary::text, active::text, \
     active_pid::text, confirmed_flush_lsn::text, restart_lsn::text, \
     pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END, restart_lsn)::bigint::text AS retained, \
     wal_status, safe_wal_size::text FROM pg_replication_slots";

fn slot_from_row(r: &Row) -> SlotInfo {
    let s = |c: &str| r.get(c).map(str::to_string);
    SlotInfo {
        slot_name: s("slot_name").unwrap_or_default(),
        plugin: s("plugin"),
        slot_type: s("slot_type").unwrap_or_default(),
        database: s("database"),
        temporary: r.get("temporary") == Some("true"),
        active: r.get("active") == Some("true"),
        active_pid: r.get("active_pid").and_then(|v| v.parse().ok()),
        confirmed_flush_lsn: s("confirmed_flush_lsn"),
        restart_lsn: s("restart_lsn"),
        retained_wal_bytes: r.get("retained").and_then(|v| v.parse().ok()),
        wal_status: s("wal_status"),
        safe_wal_size: r.get("safe_wal_size").and_then(|v| v.parse().ok()),
    }
}

/// All replication slots on the server, by name.
pub async fn list_slots(conn: &mut PgConnection) -> Result<Vec<SlotInfo>, SlotError> {
    let rows = conn
        .simple_query(&format!("{SLOT_QUERY} ORDER BY slot_name"))
        .await?;
    Ok(rows.iter().map(slot_from_row).collect())
}

/// One slot, if it exists.
pub async fn slot_info(conn: &mut PgConnection, name: &str) -> Result<Option<SlotInfo>, SlotError> {
    let rows = conn
        .simple_query(&format!(
            "{SLOT_QUERY} WHERE slot_name = {}",
            quote_literal(name)
        ))
        .await?;
    Ok(rows.first().map(slot_from_row))
}

/// What CREATE_REPLICATION_SLOT does with the snapshot at the slot's consistent point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it for other sessions (`SET TRANSACTION SNAPSHOT`), valid until the next command
    /// on this connection; used by the initial load.
    Export,
    /// Don't keep one.
    None,
}

/// The outcome of creating a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub name: String,
    /// LSN from which the slot decodes; absent when the slot already existed.
    pub consistent_point: Option<Lsn>,
    pub snapshot_name: Option<String>,
    pub already_existed: bool,
}

/// Creates a logical pgoutput slot over a replication session, or accepts an existing one that
/// is logical, uses pgoutput and belongs to this database.
pub async fn create_slot(
    repl: &mut PgConnection,
    name: &str,
    snapshot: SnapshotAction,
) -> Result<CreatedSlot, SlotError> {
    validate_slot_name(name)?;
    if let Some(existing) = slot_info(repl, name).await? {
        check_existing(&existing, &repl.info().dbname)?;
        return Ok(CreatedSlot {
            name: name.into(),
            consistent_point: None,
            snapshot_name: None,
            already_existed: true,
        });
    }
    // The pre-15 syntax still works on every supported server (10+).
    let snap = match snapshot {
        SnapshotAction::Export => "EXPORT_SNAPSHOT",
        SnapshotAction::None => "NOEXPORT_SNAPSHOT",
    };
    let result = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {snap}",
            quote_ident(name)
        ))
        .await;
    let rows = match result {
        Ok(rows) => rows,
        // Lost a race with a concurrent creator: accept it if it is what we wanted.
        Err(ClientError::Server(e)) if e.code == "42710" => {
            let existing = slot_info(repl, name)
                .await?
                .ok_or_else(|| SlotError::SlotMissing(name.into()))?;
            check_existing(&existing, &repl.info().dbname)?;
            return Ok(CreatedSlot {
                name: name.into(),
                consistent_point: None,
                snapshot_name: None,
                already_existed: true,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let row = rows.first().ok_or_else(|| {
        SlotError::UnexpectedAnswer("CREATE_REPLICATION_SLOT returned no row".into())
    })?;
    let consistent_point = row
        .get("consistent_point")
        .and_then(|v| v.parse::<Lsn>().ok())
        .ok_or_else(|| {
            SlotError::UnexpectedAnswer(
                "CREATE_REPLICATION_SLOT returned no consistent point".into(),
            )
        })?;
    Ok(CreatedSlot {
        name: name.into(),
        consistent_point: Some(consistent_point),
        snapshot_name: row.get("snapshot_name").map(str::to_string),
        already_existed: false,
    })
}

fn check_existing(existing: &SlotInfo, dbname: &str) -> Result<(), SlotError> {
    if existing.slot_type != "logical" {
        return Err(SlotError::NotLogical {
            slot: existing.slot_name.clone(),
        });
    }
    if existing.plugin.as_deref() != Some("pgoutput") {
        return Err(SlotError::WrongPlugin {
            slot: existing.slot_name.clone(),
            plugin: existing.plugin.clone().unwrap_or_default(),
        });
    }
    if existing.database.as_deref() != Some(dbname) {
        return Err(SlotError::WrongDatabase {
            slot: existing.slot_name.clone(),
            database: existing.database.clone().unwrap_or_default(),
            expected: dbname.to_string(),
        });
    }
    Ok(())
}

/// Drops a slot. Returns false when it did not exist. An active slot is an error (the server
/// names the PID holding it) unless `wait` is set, which waits for it to become inactive.
pub async fn drop_slot(repl: &mut PgConnection, name: &str, wait: bool) -> Result<bool, SlotError> {
    validate_slot_name(name)?;
    let wait = if wait { " WAIT" } else { "" };
    match repl
        .simple_query(&format!(
            "DROP_REPLICATION_SLOT {}{wait}",
            quote_ident(name)
        ))
        .await
    {
        Ok(_) => Ok(true),
        Err(ClientError::Server(e)) if e.code == "42704" => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// IDENTIFY_SYSTEM over a replication session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

pub async fn identify_system(repl: &mut PgConnection) -> Result<SystemIdentity, SlotError> {
    let rows = repl.simple_query("IDENTIFY_SYSTEM").await?;
    let row = rows
        .first()
        .ok_or_else(|| SlotError::UnexpectedAnswer("IDENTIFY_SYSTEM returned no row".into()))?;
    let bad = |what: &str| {
        SlotError::UnexpectedAnswer(format!("IDENTIFY_SYSTEM returned no valid {what}"))
    };
    Ok(SystemIdentity {
        system_id: row
            .get("systemid")
            .ok_or_else(|| bad("systemid"))?
            .to_string(),
        timeline: row
            .get("timeline")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("timeline"))?,
        xlogpos: row
            .get("xlogpos")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("xlogpos"))?,
        dbname: row.get("dbname").map(str::to_string),
    })
}

/// Which tables a publication covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationScope {
    AllTables,
    /// Every table in these schemas, including ones created later (PG ≥ 15).
    Schemas(BTreeSet<String>),
    Tables(BTreeSet<TableName>),
}

impl PublicationScope {
    fn describe(&self) -> String {
        match self {
            PublicationScope::AllTables => "FOR ALL TABLES".into(),
            PublicationScope::Schemas(s) => {
                format!(
                    "FOR TABLES IN SCHEMA {}",
                    s.iter()
                        .map(|s| quote_ident(s))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            PublicationScope::Tables(t) => {
                format!(
                    "FOR TABLE {}",
                    t.iter()
                        .map(TableName::quoted)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        }
    }
}

/// Whether `ensure_publication` created the publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationOutcome {
    Created,
    AlreadyExists,
}

/// Creates the publication, or accepts an existing one with the same scope. Publishes inserts,
/// updates, deletes and truncates.
pub async fn ensure_publication(
    conn: &mut PgConnection,
    name: &str,
    scope: &PublicationScope,
) -> Result<PublicationOutcome, SlotError> {
    if let Some(existing) = publication_scope(conn, name).await? {
        if &existing == scope {
            return Ok(PublicationOutcome::AlreadyExists);
        }
        return Err(SlotError::PublicationMismatch {
            name: name.into(),
            existing: existing.describe(),
            wanted: scope.describe(),
        });
    }
    let sql = format!(
        "CREATE PUBLICATION {} {} WITH (publish = 'insert, update, delete, truncate')",
        quote_ident(name),
        scope.describe()
    );
    match conn.simple_query(&sql).await {
        Ok(_) => Ok(PublicationOutcome::Created),
        // Created concurrently: compare again.
        Err(ClientError::Server(e)) if e.code == "42710" => {
            match publication_scope(conn, name).await? {
                Some(existing) if &existing == scope => Ok(PublicationOutcome::AlreadyExists),
                Some(existing) => Err(SlotError::PublicationMismatch {
                    name: name.into(),
                    existing: existing.describe(),
                    wanted: scope.describe(),
                }),
                None => Err(SlotError::PublicationMissing(name.into())),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The scope of an existing publication, or `None` when there is none of that name.
pub async fn publication_scope(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Option<PublicationScope>, SlotError> {
    let lit = quote_literal(name);
    let rows = conn
        .simple_query(&format!(
            "SELECT oid::text, puballtables::text FROM pg_publication WHERE pubname = {lit}"
        ))
        .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    if row.get("puballtables") == Some("true") {
        return Ok(Some(PublicationScope::AllTables));
    }
    let oid = row.get("oid").unwrap_or("0").to_string();
    let has_schema_catalog = conn.server_version_num() >= 150000;
    let mut schemas = BTreeSet::new();
    if has_schema_catalog {
        let rows = conn
            .simple_query(&format!(
                "SELECT n.nspname FROM pg_publication_namespace pn JOIN pg_namespace n ON n.oid = pn.pnnspid WHERE pn.pnpubid = {oid}"
            ))
            .await?;
        schemas.extend(
            rows.iter()
                .filter_map(|r| r.get("nspname").map(str::to_string)),
        );
    }
    if !schemas.is_empty() {
        return Ok(Some(PublicationScope::Schemas(schemas)));
    }
    let rows = conn
        .simple_query(&format!(
            "SELECT n.nspname, c.relname FROM pg_publication_rel pr JOIN pg_class c ON c.oid = pr.prrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE pr.prpubid = {oid}"
        ))
        .await?;
    let tables = rows
        .iter()
        .filter_map(|r| {
            Some(TableName {
                schema: r.get("nspname")?.to_string(),
                name: r.get("relname")?.to_string(),
            })
        })
        .collect();
    Ok(Some(PublicationScope::Tables(tables)))
}

/// Drops the publication if it exists; returns whether it did.
pub async fn drop_publication(conn: &mut PgConnection, name: &str) -> Result<bool, SlotError> {
    let existed = publication_scope(conn, name).await?.is_some();
    if existed {
        conn.simple_query(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
            .await?;
    }
    Ok(existed)
}

/// Fails with a clear error unless the server's `wal_level` is `logical`.
pub async fn check_logical_wal_level(conn: &mut PgConnection) -> Result<(), SlotError> {
    let rows = conn.simple_query("SHOW wal_level").await?;
    let level = rows
        .first()
        .and_then(|r| r.values().first().cloned().flatten())
        .unwrap_or_default();
    if level == "logical" {
        Ok(())
    } else {
        Err(SlotError::WalLevel(level))
    }
}

/// Errors before streaming are cheaper than errors in the middle of it: checks that the
/// publication exists (pgoutput itself only complains when the first change is decoded).
pub async fn require_publication(conn: &mut PgConnection, name: &str) -> Result<(), SlotError> {
    match publication_scope(conn, name).await? {
        Some(_) => Ok(()),
        None => Err(SlotError::PublicationMissing(name.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names() {
        assert!(validate_slot_name("slotlake_1").is_ok());
        for bad in ["", "Upper", "with space", "dash-ed", &"x".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scope_sql_quotes_names() {
        let s = PublicationScope::Tables(
            [TableName {
                schema: "My S".into(),
                name: "t\"1".into(),
            }]
            .into_iter()
            .collect(),
        );
        assert_eq!(s.describe(), "FOR TABLE \"My S\".\"t\"\"1\"");
    }
}
