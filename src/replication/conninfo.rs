//! Connection settings: libpq-style connection strings, environment defaults and `.pgpass`.
//!
//! Operators already have a Postgres connection string for every database; slotlake accepts the
//! same two forms libpq does — a URL (`postgresql://user:pw@host:5432/db?sslmode=verify-full`)
//! and `key=value` pairs (`host=db port=5432 user=app sslmode=require`) — with the same
//! fallbacks: `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`,
//! `PGAPPNAME`, `PGCONNECT_TIMEOUT`, and for the password `PGPASSWORD` then the password file
//! (`PGPASSFILE` or `~/.pgpass`). A password never appears in `Display`: use
//! [`ConnInfo::redacted`] whenever a connection string is logged or printed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use percent_encoding::percent_decode_str;

/// Default connect timeout when none is given.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `sslmode`, as in libpq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// Try TLS, fall back to plain text when the server does not offer it (libpq's default).
    Prefer,
    /// TLS without certificate verification.
    Require,
    /// TLS; the server certificate must chain to the root certificate.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, ConnInfoError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            // libpq's `allow` tries plain text first; treating it as prefer is stricter, never weaker.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConnInfoError::InvalidValue {
                    key: "sslmode".into(),
                    reason: format!(
                        "{other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                    ),
                })
            }
        })
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A directory holding the server's Unix-domain socket (`host=/var/run/postgresql`).
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => f.write_str(h),
            Host::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Parsed, validated connection settings.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub sslmode: SslMode,
    /// `sslrootcert`: a PEM file, or `system` for the platform's trust store.
    pub sslrootcert: Option<String>,
    pub application_name: String,
    pub connect_timeout: Duration,
}

/// A connection string that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnInfoError {
    #[error("invalid connection URL: {0}")]
    InvalidUrl(String),
    #[error("invalid connection string: {0}")]
    InvalidKeyValue(String),
    #[error("invalid value for {key}: {reason}")]
    InvalidValue { key: String, reason: String },
    #[error("unsupported connection parameter {0:?}")]
    UnknownParameter(String),
    #[error("no user name: set it in the connection string, PGUSER or USER")]
    NoUser,
}

/// Environment lookups, injectable so that parsing is testable without touching the process env.
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl ConnInfo {
    /// Parses a URL or `key=value` connection string, filling gaps from the process environment.
    pub fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
        Self::parse_with_env(s, &ProcessEnv)
    }

    pub fn parse_with_env(s: &str, env: &dyn Env) -> Result<ConnInfo, ConnInfoError> {
        let s = s.trim();
        let pairs = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            parse_url(s)?
        } else {
            parse_key_values(s)?
        };
        let mut raw = RawSettings::default();
        for (k, v) in pairs {
            raw.set(&k, v)?;
        }
        raw.finish(env)
    }

    /// The connection string with the password replaced, safe for logs.
    pub fn redacted(&self) -> String {
        let pw = if self.password.is_some() {
            ":********"
        } else {
            ""
        };
        format!(
            "postgresql://{}{}@{}:{}/{}?sslmode={}",
            self.user,
            pw,
            self.host,
            self.port,
            self.dbname,
            match self.sslmode {
                SslMode::Disable => "disable",
                SslMode::Prefer => "prefer",
                SslMode::Require => "require",
                SslMode::VerifyCa => "verify-ca",
                SslMode::VerifyFull => "verify-full",
            }
        )
    }

    /// The same settings for another database on the same server.
    pub fn with_dbname(&self, dbname: &str) -> ConnInfo {
        ConnInfo {
            dbname: dbname.to_string(),
            ..self.clone()
        }
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[derive(Default)]
struct RawSettings {
    host: Option<String>,
    port: Option<String>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    application_name: Option<String>,
    connect_timeout: Option<String>,
    passfile: Option<String>,
}

impl RawSettings {
    fn set(&mut self, key: &str, value: String) -> Result<(), ConnInfoError> {
        let slot = match key {
            "host" | "hostaddr" => &mut self.host,
            "port" => &mut self.port,
            "user" => &mut self.user,
            "password" => &mut self.password,
            "dbname" => &mut self.dbname,
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "application_name" | "fallback_application_name" => &mut self.application_name,
            "connect_timeout" => &mut self.connect_timeout,
            "passfile" => &mut self.passfile,
            // Accepted and ignored: they do not change how slotlake connects.
            "replication"
            | "channel_binding"
            | "gssencmode"
            | "target_session_attrs"
            | "keepalives"
            | "keepalives_idle"
            | "keepalives_interval"
            | "keepalives_count"
            | "options" => return Ok(()),
            other => return Err(ConnInfoError::UnknownParameter(other.to_string())),
        };
        *slot = Some(value);
        Ok(())
    }

    fn finish(self, env: &dyn Env) -> Result<ConnInfo, ConnInfoError> {
        let host_s = self
            .host
            .or_else(|| env.var("PGHOST"))
            .unwrap_or_else(|| "localhost".into());
        if host_s.contains(',') {
            return Err(ConnInfoError::InvalidValue {
                key: "host".into(),
                reason:
                    "multiple hosts are not supported; give one host (use the cluster endpoint)"
                        .into(),
            });
        }
        let host = if host_s.starts_with('/') {
            Host::Unix(PathBuf::from(&host_s))
        } else {
            Host::Tcp(host_s)
        };
        let port_s = self
            .port
            .or_else(|| env.var("PGPORT"))
            .unwrap_or_else(|| "5432".into());
        let port = port_s
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ConnInfoError::InvalidValue {
                key: "port".into(),
                reason: format!("{port_s:?} is not a port number"),
            })?;
        let user = self
            .user
            .or_else(|| env.var("PGUSER"))
            .or_else(|| env.var("USER"))
            .ok_or(ConnInfoError::NoUser)?;
        let dbname = self
            .dbname
            .or_else(|| env.var("PGDATABASE"))
            .unwrap_or_else(|| user.clone());
        let sslmode = match self.sslmode.or_else(|| env.var("PGSSLMODE")) {
            Some(m) => SslMode::parse(&m)?,
            // Unix sockets never use TLS.
            None if matches!(host, Host::Unix(_)) => SslMode::Disable,
            None => SslMode::Prefer,
        };
        let sslrootcert = self.sslrootcert.or_else(|| env.var("PGSSLROOTCERT"));
        let application_name = self
            .application_name
            .or_else(|| env.var("PGAPPNAME"))
            .unwrap_or_else(|| "slotlake".into());
        let connect_timeout = match self
            .connect_timeout
            .or_else(|| env.var("PGCONNECT_TIMEOUT"))
        {
            None => DEFAULT_CONNECT_TIMEOUT,
            Some(t) => {
                let secs = t.parse::<u64>().map_err(|_| ConnInfoError::InvalidValue {
                    key: "connect_timeout".into(),
                    reason: format!("{t:?} is not a number of seconds"),
                })?;
                // libpq: 0 means wait forever; we still bound it, generously.
                Duration::from_secs(if secs == 0 { 3600 } else { secs.max(2) })
            }
        };
        let password = match self.password.or_else(|| env.var("PGPASSWORD")) {
            Some(p) => Some(p),
            None => {
                let file = self
                    .passfile
                    .or_else(|| env.var("PGPASSFILE"))
                    .map(PathBuf::from)
                    .or_else(|| env.var("HOME").map(|h| Path::new(&h).join(".pgpass")));
                file.and_then(|f| std::fs::read_to_string(f).ok())
                    .and_then(|content| {
                        let host_key = match &host {
                            // libpq matches Unix sockets against "localhost".
                            Host::Unix(_) => "localhost".to_string(),
                            Host::Tcp(h) => h.clone(),
                        };
                        pgpass_lookup(&content, &host_key, port, &dbname, &user)
                    })
            }
        };
        Ok(ConnInfo {
            host,
            port,
            user,
            password,
            dbname,
            sslmode,
            sslrootcert,
            application_name,
            connect_timeout,
        })
    }
}

fn parse_url(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let rest = s.split_once("://").map(|(_, r)| r).unwrap_or(s);
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (before_query, None),
    };
    let decode = |v: &str| -> Result<String, ConnInfoError> {
        percent_decode_str(v)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| ConnInfoError::InvalidUrl("percent-encoded text is not UTF-8".into()))
    };
    let mut out = Vec::new();
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hp)) => {
            match userinfo.split_once(':') {
                Some((u, p)) => {
                    if !u.is_empty() {
                        out.push(("user".into(), decode(u)?));
                    }
                    out.push(("password".into(), decode(p)?));
                }
                None if !userinfo.is_empty() => out.push(("user".into(), decode(userinfo)?)),
                None => {}
            }
            hp
        }
        None => authority,
    };
    if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| ConnInfoError::InvalidUrl("unterminated IPv6 address".into()))?;
        out.push(("host".into(), h.to_string()));
        if let Some(p) = after.strip_prefix(':') {
            out.push(("port".into(), p.to_string()));
        }
    } else if !hostport.is_empty() {
        match hostport.rsplit_once(':') {
            Some((h, p)) => {
                if !h.is_empty() {
                    out.push(("host".into(), decode(h)?));
                }
                out.push(("port".into(), p.to_string()));
            }
            None => out.push(("host".into(), decode(hostport)?)),
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".into(), decode(db)?));
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                ConnInfoError::InvalidUrl(format!("query parameter {pair:?} has no value"))
            })?;
            out.push((decode(k)?, decode(v)?));
        }
    }
    Ok(out)
}

fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError::InvalidKeyValue(format!(
                "missing \"=\" after {key:?}"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(ConnInfoError::InvalidKeyValue(format!(
                            "unterminated quoted value for {key:?}"
                        )))
                    }
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(ConnInfoError::InvalidKeyValue("trailing backslash".into()))
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    match chars.next() {
                        Some(e) => value.push(e),
                        None => {
                            return Err(ConnInfoError::InvalidKeyValue("trailing backslash".into()))
                        }
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Finds the password for a connection in `.pgpass` content, as libpq does: the first line whose
/// `host:port:database:user` fields match (each may be `*`), with `\:` and `\\` escapes.
pub fn pgpass_lookup(
    content: &str,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    let port = port.to_string();
    for line in content.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        if fields.len() != 5 {
            continue;
        }
        let matches = |field: &str, want: &str| field == "*" || field == want;
        if matches(&fields[0], host)
            && matches(&fields[1], &port)
            && matches(&fields[2], dbname)
            && matches(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(e), Some(last)) = (chars.next(), fields.last_mut()) {
                    last.push(e);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(last) = fields.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, String>);
    impl Env for MapEnv {
        fn var(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
    }
    fn env(pairs: &[(&'static str, &str)]) -> MapEnv {
        MapEnv(pairs.iter().map(|(k, v)| (*k, v.to_string())).collect())
    }

    #[test]
    fn parses_url_with_everything() {
        let c = ConnInfo::parse_with_env(
            "postgresql://al%40ice:p%3Aw%2Fd@db.example.com:6543/my%20db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.user, "al@ice");
        assert_eq!(c.password.as_deref(), Some("p:w/d"));
        assert_eq!(c.host, Host::Tcp("db.example.com".into()));
        assert_eq!(c.port, 6543);
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert.as_deref(), Some("/ca.pem"));
        assert_eq!(c.application_name, "x");
    }

    #[test]
    fn parses_key_values_with_quotes() {
        let c = ConnInfo::parse_with_env(
            "host=/tmp/sock port = 5433 user=bob password='it''s' dbname='a b' sslmode=disable",
            &env(&[]),
        );
        // '' is not an escape in libpq key/value syntax; a backslash is.
        assert!(c.is_err());
        let c = ConnInfo::parse_with_env(
            r"host=/tmp/sock port = 5433 user=bob password='it\'s' dbname='a b'",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(c.host, Host::Unix("/tmp/sock".into()));
        assert_eq!(c.port, 5433);
        assert_eq!(c.password.as_deref(), Some("it's"));
        assert_eq!(c.dbname, "a b");
        assert_eq!(
            c.sslmode,
            SslMode::Disable,
            "unix sockets default to no TLS"
        );
    }

    #[test]
    fn environment_fills_gaps_and_password_file_is_consulted() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pgpass");
        std::fs::write(
            &pass,
            "# comment\nother:*:*:*:nope\ndb1:5432:*:carol:s\\:cret\n*:*:*:*:fallback\n",
        )
        .unwrap();
        let e = env(&[
            ("PGHOST", "db1"),
            ("PGUSER", "carol"),
            ("PGPASSFILE", pass.to_str().unwrap()),
        ]);
        let c = ConnInfo::parse_with_env("", &e).unwrap();
        assert_eq!(c.host, Host::Tcp("db1".into()));
        assert_eq!(c.dbname, "carol");
        assert_eq!(c.password.as_deref(), Some("s:cret"));
        assert_eq!(c.sslmode, SslMode::Prefer);
        // PGPASSWORD wins over the file.
        let e = env(&[
            ("PGHOST", "db1"),
            ("PGUSER", "carol"),
            ("PGPASSWORD", "envpw"),
            ("PGPASSFILE", pass.to_str().unwrap()),
        ]);
        assert_eq!(
            ConnInfo::parse_with_env("", &e)
                .unwrap()
                .password
                .as_deref(),
            Some("envpw")
        );
        let e = env(&[
            ("PGHOST", "elsewhere"),
            ("PGUSER", "dave"),
            ("PGPASSFILE", pass.to_str().unwrap()),
        ]);
        assert_eq!(
            ConnInfo::parse_with_env("", &e)
                .unwrap()
                .password
                .as_deref(),
            Some("fallback")
        );
    }

    #[test]
    fn redacted_form_hides_the_password() {
        let c = ConnInfo::parse_with_env("postgres://u:hunter2@h/d", &env(&[])).unwrap();
        for shown in [c.redacted(), c.to_string(), format!("{c:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("********"));
        }
    }

    #[test]
    fn rejects_bad_input_with_reasons() {
        let e = env(&[("USER", "x")]);
        assert!(matches!(
            ConnInfo::parse_with_env("port=99999", &e),
            Err(ConnInfoError::InvalidValue { .. })
        ));
        assert!(matches!(
            ConnInfo::parse_with_env("sslmode=maybe", &e),
            Err(ConnInfoError::InvalidValue { .. })
        ));
        assert!(matches!(
            ConnInfo::parse_with_env("bogus=1", &e),
            Err(ConnInfoError::UnknownParameter(_))
        ));
        assert!(matches!(
            ConnInfo::parse_with_env("host", &e),
            Err(ConnInfoError::InvalidKeyValue(_))
        ));
        assert!(matches!(
            ConnInfo::parse_with_env("host=a,b", &e),
            Err(ConnInfoError::InvalidValue { .. })
        ));
        assert_eq!(
            ConnInfo::parse_with_env("", &env(&[])),
            Err(ConnInfoError::NoUser)
        );
    }

    #[test]
    fn ipv6_url() {
        let c = ConnInfo::parse_with_env("postgres://u@[::1]:5433/d", &env(&[])).unwrap();
        assert_eq!(c.host, Host::Tcp("::1".into()));
        assert_eq!(c.port, 5433);
    }
}
