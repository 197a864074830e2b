//! `slotlake setup`: check the source's prerequisites, then apply versioned SQL migrations.
//!
//! Migrations live in `migrations/NNNN_name.sql` and are compiled into the binary, so the
//! binary and its migrations never disagree. Each pending one is applied in its own
//! transaction together with its row in `slotlake.migrations`; running `setup` again applies
//! nothing. `--dry-run` prints the checks and the SQL it would run, and changes nothing.

use crate::replication::sql::quote_ident;
use crate::replication::{ClientError, PgConnection};

/// One versioned migration.
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "slotlake_schema",
    sql: include_str!("../migrations/0001_slotlake_schema.sql"),
}];

/// The outcome of one prerequisite check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// The exact fix when not ok.
    pub fix: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0} prerequisite(s) missing on the source (the fixes are listed above)")]
    Prerequisites(usize),
    #[error("migration {version:04} {name} failed")]
    Migration {
        version: u32,
        name: &'static str,
        #[source]
        source: ClientError,
    },
}

async fn one(conn: &mut PgConnection, sql: &str) -> Result<Option<String>, ClientError> {
    let rows = conn.simple_query(sql).await?;
    Ok(rows
        .first()
        .and_then(|r| r.values().first().cloned().flatten()))
}

/// Checks what `slotlake run` needs from the source.
pub async fn checks(conn: &mut PgConnection) -> Result<Vec<Check>, ClientError> {
    let rds = one(
        conn,
        "SELECT count(*)::text FROM pg_settings WHERE name = 'rds.logical_replication'",
    )
    .await?
    .as_deref()
        == Some("1");
    let user = one(conn, "SELECT current_user").await?.unwrap_or_default();
    let database = one(conn, "SELECT current_database()")
        .await?
        .unwrap_or_default();
    let mut out = Vec::new();

    let wal_level = one(conn, "SHOW wal_level").await?.unwrap_or_default();
    out.push(Check {
        name: "wal_level",
        ok: wal_level == "logical",
        detail: format!("wal_level = {wal_level}"),
        fix: Some(if rds {
            "set rds.logical_replication = 1 in the DB parameter group, then reboot the instance"
                .into()
        } else {
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".into()
        }),
    });

    let can_replicate = one(
        conn,
        "SELECT (rolreplication OR rolsuper \
         OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication') \
             AND pg_has_role(current_user, 'rds_replication', 'member')))::text \
         FROM pg_roles WHERE rolname = current_user",
    )
    .await?
    .as_deref()
        == Some("true");
    out.push(Check {
        name: "replication privilege",
        ok: can_replicate,
        detail: format!("role {user} may start replication: {can_replicate}"),
        fix: Some(if rds {
            format!("GRANT rds_replication TO {};", quote_ident(&user))
        } else {
            format!("ALTER ROLE {} REPLICATION;", quote_ident(&user))
        }),
    });

    let free_slots: i64 = one(
        conn,
        "SELECT (current_setting('max_replication_slots')::int - \
         (SELECT count(*) FROM pg_replication_slots))::text",
    )
    .await?
    .and_then(|v| v.parse().ok())
    .unwrap_or(0);
    out.push(Check {
        name: "free replication slot",
        ok: free_slots > 0,
        detail: format!("{free_slots} replication slot(s) free"),
        fix: Some(if rds {
            "raise max_replication_slots in the DB parameter group, then reboot".into()
        } else {
            "ALTER SYSTEM SET max_replication_slots = <more>; then restart PostgreSQL".into()
        }),
    });

    let can_create = one(
        conn,
        "SELECT has_database_privilege(current_database(), 'CREATE')::text",
    )
    .await?
    .as_deref()
        == Some("true");
    out.push(Check {
        name: "create privilege",
        ok: can_create,
        detail: format!("role {user} may create schemas in {database}: {can_create}"),
        fix: Some(format!(
            "GRANT CREATE ON DATABASE {} TO {};",
            quote_ident(&database),
            quote_ident(&user)
        )),
    });
    for c in &mut out {
        if c.ok {
            c.fix = None;
        }
    }
    Ok(out)
}

/// Versions already applied (none when the bookkeeping table does not exist yet).
pub async fn applied(conn: &mut PgConnection) -> Result<Vec<u32>, ClientError> {
    if one(conn, "SELECT to_regclass('slotlake.migrations')::text")
        .await?
        .is_none()
    {
        return Ok(Vec::new());
    }
    let rows = conn
        .simple_query("SELECT version::text AS v FROM slotlake.migrations ORDER BY version")
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| r.get("v")?.parse().ok())
        .collect())
}

/// Applies one migration and records it, in one transaction.
pub async fn apply(conn: &mut PgConnection, m: &Migration) -> Result<(), SetupError> {
    let sql = format!(
        "BEGIN;\n{}\nINSERT INTO slotlake.migrations (version, name) VALUES ({}, '{}') \
         ON CONFLICT (version) DO NOTHING;\nCOMMIT;",
        m.sql, m.version, m.name
    );
    if let Err(source) = conn.simple_query(&sql).await {
        let _ = conn.simple_query("ROLLBACK").await;
        return Err(SetupError::Migration {
            version: m.version,
            name: m.name,
            source,
        });
    }
    Ok(())
}
