//! Talking to the source: connections, the logical replication stream, and the slot and
//! publication a slotlake instance owns.
//!
//! Data flow: [`connection::PgConnection`] opens a session (TCP or Unix socket, TLS per
//! `sslmode`, trust/cleartext/MD5/SCRAM-SHA-256); [`stream::ReplicationStream`] turns a
//! `replication=database` session into a stream of XLogData (each one pgoutput message for
//! [`crate::pgoutput`]) and keepalives, and carries standby status updates back;
//! [`slot`] creates, inspects and drops slots and publications.

pub mod connection;
pub mod conninfo;
pub mod slot;
pub mod sql;
pub mod stream;
pub mod tls;

pub use connection::{ClientError, PgConnection, SessionKind};
pub use conninfo::ConnInfo;

/// A sentence an operator can act on for errors whose cause is known, keyed by SQLSTATE or
/// error kind. `user` is the connecting role, used in the suggested commands.
pub fn operator_hint(err: &ClientError, user: &str) -> Option<String> {
    let hint = match err {
        ClientError::Connect { .. } | ClientError::ConnectTimeout { .. } => {
            "check host and port, that the server is running, and its listen_addresses and firewall".to_string()
        }
        ClientError::TlsHandshake { .. } => {
            "the server certificate did not verify: check sslrootcert (the CA that signed the server certificate) \
             and, for sslmode=verify-full, that the certificate names the host you connect to"
                .to_string()
        }
        ClientError::Server(e) => match e.code.as_str() {
            "28P01" | "28000" if e.message.contains("pg_hba") => {
                "the server's pg_hba.conf has no entry for this connection: add one for this user, database \
                 (or `replication` for walsender sessions) and client address"
                    .to_string()
            }
            "28P01" | "28000" => {
                "check the user name and password (connection string, PGPASSWORD or ~/.pgpass)".to_string()
            }
            "42501" if e.message.contains("replication") || e.message.contains("walsender") => format!(
                "the role needs the REPLICATION attribute: ALTER ROLE {} REPLICATION; \
                 on RDS/Aurora: GRANT rds_replication TO {}",
                sql::quote_ident(user),
                sql::quote_ident(user)
            ),
            "55000" if e.message.contains("wal_level") => {
                "set wal_level = logical in postgresql.conf and restart the server \
                 (RDS/Aurora: rds.logical_replication = 1 in the parameter group, then reboot)"
                    .to_string()
            }
            "53400" => "all replication slots are in use: drop unused ones (`slotlake slot list` shows them) \
                        or raise max_replication_slots and restart the server"
                .to_string(),
            "55006" => "another process is using this slot (its PID is in the message): stop it, \
                        or use a different --slot"
                .to_string(),
            "42704" if e.message.contains("replication slot") => {
                "create it with `slotlake slot create` (or `slotlake run --create-slot`)".to_string()
            }
            "42704" if e.message.contains("publication") => {
                "create it with `slotlake slot create --create-publication`".to_string()
            }
            "3D000" => "the database does not exist: check dbname in --source".to_string(),
            _ => return None,
        },
        ClientError::NoPassword { .. } => {
            "set the password in --source, PGPASSWORD, or ~/.pgpass".to_string()
        }
        _ => return None,
    };
    Some(hint)
}
