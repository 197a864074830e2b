//! One Postgres connection: TCP or Unix socket, optional TLS, startup and authentication, simple
//! queries, and the switch into CopyBoth for replication.
//!
//! Mainline tokio-postgres has no CopyBoth (replication) support, so slotlake speaks the wire
//! protocol itself, using `postgres-protocol` for frontend messages and SCRAM/MD5. The same
//! connection type serves both kinds of session: `replication=database` for the walsender
//! (replication commands, and plain SQL, which walsenders accept since PG 10) and ordinary
//! sessions for catalog queries while a stream is running.
//!
//! Every session sets the output formats slotlake's value parsers expect (`DateStyle=ISO`,
//! `IntervalStyle=iso_8601`, `TimeZone=UTC`, `extra_float_digits=3`, `bytea_output=hex`,
//! UTF-8): pgoutput prints text values with the walsender's settings.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::conninfo::{ConnInfo, Host, SslMode};
use super::tls::{self, TlsConfigError};

/// Largest backend message accepted; anything bigger is a protocol error, not an allocation.
const MAX_MESSAGE_LEN: usize = 1 << 30;
/// Initial read buffer size; XLogData messages are usually far smaller.
const READ_BUFFER: usize = 128 * 1024;

/// Session settings that fix the text forms of values (see module docs).
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "iso_8601"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// Which kind of session to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// An ordinary SQL session.
    Sql,
    /// A logical walsender session (`replication=database`).
    Replication,
}

/// An error reported by the server (ErrorResponse). Server messages describe the failure; they
/// are shown to operators as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    /// SQLSTATE, e.g. `42704`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// Anything that can go wrong on a connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {target} timed out after {after:?}")]
    ConnectTimeout { target: String, after: Duration },
    #[error("server {target} does not accept TLS, but sslmode={mode} requires it")]
    TlsNotOffered { target: String, mode: &'static str },
    #[error("TLS handshake with {target} failed")]
    TlsHandshake {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid TLS configuration")]
    TlsConfig(#[from] TlsConfigError),
    #[error("server asked for a password for user {user:?}, but none is set (password in the connection string, PGPASSWORD or ~/.pgpass)")]
    NoPassword { user: String },
    #[error("server asked for authentication method {0}, which slotlake does not support")]
    UnsupportedAuth(String),
    #[error("SCRAM authentication failed")]
    Scram(#[source] io::Error),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("connection lost")]
    Io(#[source] io::Error),
    #[error("server closed the connection")]
    Closed,
}

impl ClientError {
    /// SQLSTATE when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ClientError::Server(e) => Some(&e.code),
            _ => None,
        }
    }

    /// Transient errors go away by themselves (network, restart, failover): reconnect and resume.
    /// Everything else needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::ConnectTimeout { .. }
            | ClientError::Io(_)
            | ClientError::Closed => true,
            ClientError::Server(e) => {
                e.code.starts_with("08") // connection exception
                    || matches!(e.code.as_str(), "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01")
            }
            _ => false,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A result row of a simple query: column names and text values.
#[derive(Debug, Clone)]
pub struct Row {
    columns: Arc<Vec<String>>,
    values: Vec<Option<String>>,
}

impl Row {
    /// The value of the named column (`None` for SQL NULL or an unknown column).
    pub fn get(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.values.get(i)?.as_deref()
    }

    pub fn values(&self) -> &[Option<String>] {
        &self.values
    }
}

/// A raw backend message: tag and body.
pub(crate) struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// An open, authenticated session, idle between commands.
pub struct PgConnection {
    io: Box<dyn Stream>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    parameters: HashMap<String, String>,
    info: ConnInfo,
}

impl fmt::Debug for PgConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnection")
            .field("target", &self.info.redacted())
            .finish()
    }
}

impl PgConnection {
    /// Connects, negotiates TLS per `sslmode`, authenticates, and waits until the session is ready.
    pub async fn connect(info: &ConnInfo, kind: SessionKind) -> Result<PgConnection, ClientError> {
        let target = format!("{}:{}", info.host, info.port);
        match tokio::time::timeout(
            info.connect_timeout,
            Self::connect_inner(info, kind, &target),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ClientError::ConnectTimeout {
                target,
                after: info.connect_timeout,
            }),
        }
    }

    async fn connect_inner(
        info: &ConnInfo,
        kind: SessionKind,
        target: &str,
    ) -> Result<PgConnection, ClientError> {
        let tls_config = tls::client_config(info)?;
        let io: Box<dyn Stream> = match &info.host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", info.port));
                let s =
                    UnixStream::connect(&path)
                        .await
                        .map_err(|source| ClientError::Connect {
                            target: path.display().to_string(),
                            source,
                        })?;
                Box::new(s)
            }
            Host::Tcp(host) => {
                let mut s = TcpStream::connect((host.as_str(), info.port))
                    .await
                    .map_err(|source| ClientError::Connect {
                        target: target.to_string(),
                        source,
                    })?;
                let _ = s.set_nodelay(true);
                match tls_config {
                    None => Box::new(s),
                    Some(config) => {
                        let mut req = BytesMut::new();
                        frontend::ssl_request(&mut req);
                        s.write_all(&req).await.map_err(ClientError::Io)?;
                        let answer = s.read_u8().await.map_err(ClientError::Io)?;
                        match answer {
                            b'S' => {
                                let name = tls::server_name(host).map_err(|e| {
                                    ClientError::TlsHandshake {
                                        target: target.to_string(),
                                        source: io::Error::new(io::ErrorKind::InvalidInput, e),
                                    }
                                })?;
                                let tls = tokio_rustls::TlsConnector::from(config)
                                    .connect(name, s)
                                    .await
                                    .map_err(|source| ClientError::TlsHandshake {
                                        target: target.to_string(),
                                        source,
                                    })?;
                                Box::new(tls)
                            }
                            b'N' if info.sslmode == SslMode::Prefer => Box::new(s),
                            b'N' => {
                                let mode = match info.sslmode {
                                    SslMode::Require => "require",
                                    SslMode::VerifyCa => "verify-ca",
                                    _ => "verify-full",
                                };
                                return Err(ClientError::TlsNotOffered {
                                    target: target.to_string(),
                                    mode,
                                });
                            }
                            // An ErrorResponse here means a pre-3.0 server or a proxy that refused us.
                            other => {
                                return Err(ClientError::Protocol(format!(
                                    "unexpected answer {other:#04x} to SSLRequest"
                                )))
                            }
                        }
                    }
                }
            }
        };
        let mut conn = PgConnection {
            io,
            read_buf: BytesMut::with_capacity(READ_BUFFER),
            write_buf: BytesMut::with_capacity(1024),
            parameters: HashMap::new(),
            info: info.clone(),
        };
        conn.startup(kind).await?;
        Ok(conn)
    }

    async fn startup(&mut self, kind: SessionKind) -> Result<(), ClientError> {
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &self.info.user),
            ("database", &self.info.dbname),
            ("application_name", &self.info.application_name),
        ];
        if kind == SessionKind::Replication {
            params.push(("replication", "database"));
        }
        params.extend_from_slice(SESSION_SETTINGS);
        frontend::startup_message(params, &mut self.write_buf).map_err(ClientError::Io)?;
        self.flush().await?;
        self.authenticate().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'S' => self.record_parameter(frame.body)?,
                b'K' | b'N' => {}
                b'Z' => return Ok(()),
                b'E' => return Err(parse_error_response(frame.body)?.into()),
                other => return Err(unexpected(other, "startup")),
            }
        }
    }

    async fn authenticate(&mut self) -> Result<(), ClientError> {
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'R' => {}
                b'E' => return Err(parse_error_response(frame.body)?.into()),
                other => return Err(unexpected(other, "authentication")),
            }
            let mut body = frame.body;
            let code = get_i32(&mut body, "authentication code")?;
            match code {
                0 => return Ok(()),
                3 => {
                    let pw = self.password()?.to_string();
                    frontend::password_message(pw.as_bytes(), &mut self.write_buf)
                        .map_err(ClientError::Io)?;
                    self.flush().await?;
                }
                5 => {
                    if body.remaining() < 4 {
                        return Err(ClientError::Protocol("MD5 salt truncated".into()));
                    }
                    let salt = [body[0], body[1], body[2], body[3]];
                    let hashed =
                        md5_hash(self.info.user.as_bytes(), self.password()?.as_bytes(), salt);
                    frontend::password_message(hashed.as_bytes(), &mut self.write_buf)
                        .map_err(ClientError::Io)?;
                    self.flush().await?;
                }
                10 => self.scram(body).await?,
                2 => return Err(ClientError::UnsupportedAuth("Kerberos V5".into())),
                7 | 8 => return Err(ClientError::UnsupportedAuth("GSSAPI".into())),
                9 => return Err(ClientError::UnsupportedAuth("SSPI".into())),
                other => return Err(ClientError::UnsupportedAuth(format!("code {other}"))),
            }
        }
    }

    async fn scram(&mut self, mut mechanisms: Bytes) -> Result<(), ClientError> {
        let mut offered = Vec::new();
        loop {
            let m = get_cstr(&mut mechanisms, "SASL mechanism")?;
            if m.is_empty() {
                break;
            }
            offered.push(m);
        }
        if !offered.iter().any(|m| m == SCRAM_SHA_256) {
            return Err(ClientError::UnsupportedAuth(format!(
                "SASL {}",
                offered.join(", ")
            )));
        }
        // Channel binding (SCRAM-SHA-256-PLUS) is not used; "n" tells the server so, which it
        // accepts whether or not it offered PLUS.
        let mut scram =
            ScramSha256::new(self.password()?.as_bytes(), ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut self.write_buf)
            .map_err(ClientError::Io)?;
        self.flush().await?;
        let cont = self.expect_auth(11).await?;
        scram.update(&cont).map_err(ClientError::Scram)?;
        frontend::sasl_response(scram.message(), &mut self.write_buf).map_err(ClientError::Io)?;
        self.flush().await?;
        let fin = self.expect_auth(12).await?;
        scram.finish(&fin).map_err(ClientError::Scram)?;
        Ok(())
    }

    async fn expect_auth(&mut self, want: i32) -> Result<Bytes, ClientError> {
        let frame = self.read_frame().await?;
        match frame.tag {
            b'R' => {
                let mut body = frame.body;
                let code = get_i32(&mut body, "authentication code")?;
                if code != want {
                    return Err(ClientError::Protocol(format!(
                        "expected SASL message {want}, got {code}"
                    )));
                }
                Ok(body)
            }
            b'E' => Err(parse_error_response(frame.body)?.into()),
            other => Err(unexpected(other, "SASL exchange")),
        }
    }

    fn password(&self) -> Result<&str, ClientError> {
        self.info
            .password
            .as_deref()
            .ok_or_else(|| ClientError::NoPassword {
                user: self.info.user.clone(),
            })
    }

    fn record_parameter(&mut self, mut body: Bytes) -> Result<(), ClientError> {
        let k = get_cstr(&mut body, "parameter name")?;
        let v = get_cstr(&mut body, "parameter value")?;
        self.parameters.insert(k, v);
        Ok(())
    }

    /// A server parameter reported at startup (`server_version`, `integer_datetimes`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// `server_version_num`-style number (150004 for 15.4), from the reported `server_version`.
    pub fn server_version_num(&self) -> u32 {
        self.parameter("server_version")
            .map(parse_server_version)
            .unwrap_or(0)
    }

    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// Runs one or more statements with the simple query protocol and returns the rows of all of
    /// them. An error from the server is returned after the session is ready again.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ClientError> {
        frontend::query(sql, &mut self.write_buf).map_err(ClientError::Io)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut columns = Arc::new(Vec::new());
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'T' => columns = Arc::new(parse_row_description(frame.body)?),
                b'D' => rows.push(Row {
                    columns: columns.clone(),
                    values: parse_data_row(frame.body)?,
                }),
                b'C' | b'I' | b'N' | b'S' | b'A' => {}
                b'E' => error = Some(parse_error_response(frame.body)?),
                b'Z' => {
                    return match error {
                        Some(e) => Err(e.into()),
                        None => Ok(rows),
                    }
                }
                b'W' | b'H' | b'G' => {
                    return Err(ClientError::Protocol(
                        "simple_query cannot run COPY or START_REPLICATION".into(),
                    ))
                }
                other => return Err(unexpected(other, "query")),
            }
        }
    }

    /// Starts a `COPY … TO STDOUT`: returns once the server answered with CopyOutResponse.
    /// Then [`Self::copy_data_each`] reads the data until the copy ends.
    pub async fn copy_out(&mut self, sql: &str) -> Result<(), ClientError> {
        self.start_copy(sql, b'H', "COPY TO STDOUT").await
    }

    /// The rows of a `COPY … TO STDOUT` (PostgreSQL sends one per CopyData message): hands
    /// each CopyData payload that has arrived to `each`, in place (no copy, no buffer per
    /// row), until `each` returns false (take no more for now) or no
    /// complete message is left (reading from the socket only when none has been handed over
    /// yet). `Ok(true)` while the copy goes on, `Ok(false)` once it has ended and the session is
    /// ready again; an error from the server mid-copy is returned once the session is ready.
    pub async fn copy_data_each(
        &mut self,
        mut each: impl FnMut(&[u8]) -> bool,
    ) -> Result<bool, ClientError> {
        let mut error = None;
        let mut handed = false;
        loop {
            match self.frame_head()? {
                Some((b'd', len)) if error.is_none() => {
                    let more = each(&self.read_buf[5..len]);
                    self.read_buf.advance(len);
                    handed = true;
                    if !more {
                        return Ok(true);
                    }
                }
                Some(_) => {
                    let Some(frame) = self.try_frame()? else {
                        continue;
                    };
                    match frame.tag {
                        b'd' | b'c' | b'C' | b'N' | b'S' => {}
                        b'E' => error = Some(parse_error_response(frame.body)?),
                        b'Z' => {
                            return match error {
                                Some(e) => Err(e.into()),
                                None => Ok(false),
                            }
                        }
                        other => return Err(unexpected(other, "COPY TO STDOUT")),
                    }
                }
                // Not once an error has come: it is returned with ReadyForQuery, which may
                // still be on its way.
                None if handed && error.is_none() => return Ok(true),
                None => self.fill().await?,
            }
        }
    }

    /// Reads until ReadyForQuery, so the session stays usable after an error.
    async fn until_ready(&mut self) -> Result<(), ClientError> {
        while self.read_frame().await?.tag != b'Z' {}
        Ok(())
    }

    /// Sends a command that answers with CopyBothResponse (START_REPLICATION). Returns once the
    /// server has entered copy-both mode.
    pub(crate) async fn start_copy_both(&mut self, command: &str) -> Result<(), ClientError> {
        self.start_copy(command, b'W', "START_REPLICATION").await
    }

    /// Sends `command` and waits for the copy response `tag` (`H` copy-out, `W` copy-both). An
    /// error from the server is returned once the session is ready again.
    async fn start_copy(&mut self, command: &str, tag: u8, what: &str) -> Result<(), ClientError> {
        frontend::query(command, &mut self.write_buf).map_err(ClientError::Io)?;
        self.flush().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                t if t == tag => return Ok(()),
                b'N' | b'S' => {}
                b'E' => {
                    let e = parse_error_response(frame.body);
                    self.until_ready().await?;
                    return Err(e?.into());
                }
                other => return Err(unexpected(other, what)),
            }
        }
    }

    /// Reads one complete backend message. Cancel-safe: partial input stays in the buffer.
    pub(crate) async fn read_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// Reads what the socket has into the buffer (waiting for at least one byte).
    async fn fill(&mut self) -> Result<(), ClientError> {
        if self.read_buf.capacity() - self.read_buf.len() < 8192 {
            self.read_buf.reserve(READ_BUFFER);
        }
        let n = self
            .io
            .read_buf(&mut self.read_buf)
            .await
            .map_err(ClientError::Io)?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// The tag and length (tag byte included) of the complete message at the start of the
    /// buffer, if one is there ("need more bytes" is `Ok(None)`).
    fn frame_head(&mut self) -> Result<Option<(u8, usize)>, ClientError> {
        if self.read_buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.read_buf[0];
        let len = u32::from_be_bytes([
            self.read_buf[1],
            self.read_buf[2],
            self.read_buf[3],
            self.read_buf[4],
        ]) as usize;
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            return Err(ClientError::Protocol(format!(
                "message {tag:#04x} has invalid length {len}"
            )));
        }
        if self.read_buf.len() < len + 1 {
            self.read_buf.reserve(len + 1 - self.read_buf.len());
            return Ok(None);
        }
        Ok(Some((tag, len + 1)))
    }

    /// A complete message tagged `tag` from the buffer, if the buffer starts with one (no I/O;
    /// anything else stays buffered for [`Self::read_frame`]).
    pub(crate) fn buffered_frame(&mut self, tag: u8) -> Result<Option<Frame>, ClientError> {
        match self.frame_head()? {
            Some((t, _)) if t == tag => self.try_frame(),
            _ => Ok(None),
        }
    }

    /// A complete message from the buffer, if one is there ("need more bytes" is `Ok(None)`).
    fn try_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        let Some((tag, len)) = self.frame_head()? else {
            return Ok(None);
        };
        let mut frame = self.read_buf.split_to(len);
        frame.advance(5);
        Ok(Some(Frame {
            tag,
            body: frame.freeze(),
        }))
    }

    pub(crate) fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    pub(crate) async fn flush(&mut self) -> Result<(), ClientError> {
        self.io
            .write_all(&self.write_buf)
            .await
            .map_err(ClientError::Io)?;
        self.write_buf.clear();
        self.io.flush().await.map_err(ClientError::Io)
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}

fn unexpected(tag: u8, during: &str) -> ClientError {
    ClientError::Protocol(format!(
        "unexpected message {:?} during {during}",
        tag as char
    ))
}

/// Parses `server_version` ("15.4 (Debian 15.4-1)", "16beta1", "9.6.24") into 150004 / 160000 / 90624.
pub fn parse_server_version(v: &str) -> u32 {
    let num: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = num.split('.').filter_map(|p| p.parse::<u32>().ok());
    let major = parts.next().unwrap_or(0);
    let second = parts.next().unwrap_or(0);
    if major >= 10 {
        major * 10000 + second
    } else {
        major * 10000 + second * 100 + parts.next().unwrap_or(0)
    }
}

pub(crate) fn get_i32(b: &mut Bytes, what: &str) -> Result<i32, ClientError> {
    if b.remaining() < 4 {
        return Err(ClientError::Protocol(format!("{what} truncated")));
    }
    Ok(b.get_i32())
}

fn get_i16(b: &mut Bytes, what: &str) -> Result<i16, ClientError> {
    if b.remaining() < 2 {
        return Err(ClientError::Protocol(format!("{what} truncated")));
    }
    Ok(b.get_i16())
}

fn get_cstr(b: &mut Bytes, what: &str) -> Result<String, ClientError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| ClientError::Protocol(format!("{what} is not NUL-terminated")))?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Ok(s)
}

fn parse_row_description(mut body: Bytes) -> Result<Vec<String>, ClientError> {
    let n = get_i16(&mut body, "RowDescription")?;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        cols.push(get_cstr(&mut body, "column name")?);
        if body.remaining() < 18 {
            return Err(ClientError::Protocol("RowDescription truncated".into()));
        }
        body.advance(18);
    }
    Ok(cols)
}

fn parse_data_row(mut body: Bytes) -> Result<Vec<Option<String>>, ClientError> {
    let n = get_i16(&mut body, "DataRow")?;
    let mut vals = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = get_i32(&mut body, "DataRow value length")?;
        if len < 0 {
            vals.push(None);
            continue;
        }
        let len = len as usize;
        if body.remaining() < len {
            return Err(ClientError::Protocol("DataRow truncated".into()));
        }
        let v = body.split_to(len);
        vals.push(Some(String::from_utf8(v.to_vec()).map_err(|_| {
            ClientError::Protocol("DataRow value is not UTF-8".into())
        })?));
    }
    Ok(vals)
}

/// Parses an ErrorResponse (or NoticeResponse) body.
pub(crate) fn parse_error_response(mut body: Bytes) -> Result<ServerError, ClientError> {
    let mut e = ServerError {
        severity: "ERROR".into(),
        code: "XX000".into(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    loop {
        if body.remaining() == 0 {
            return Err(ClientError::Protocol("ErrorResponse not terminated".into()));
        }
        let field = body.get_u8();
        if field == 0 {
            return Ok(e);
        }
        let value = get_cstr(&mut body, "error field")?;
        match field {
            b'V' => e.severity = value,
            b'S' if e.severity == "ERROR" => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server error that comes with rows, its ReadyForQuery later (PostgreSQL flushes the
    /// ErrorResponse at once): the error is returned once the session is ready, not lost as
    /// if the copy had simply ended. The test runtime runs one task at a time, so the server
    /// sends ReadyForQuery only once the client has taken the rows and the error and waits.
    #[tokio::test]
    async fn a_copy_error_sent_with_rows_is_not_lost_while_ready_for_query_is_on_its_way() {
        use tokio::io::AsyncWriteExt;
        fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
            out.push(tag);
            out.extend(((body.len() + 4) as u32).to_be_bytes());
            out.extend(body);
        }
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut conn = PgConnection {
            io: Box::new(client),
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            parameters: HashMap::new(),
            info: ConnInfo::parse("host=localhost user=test").unwrap(),
        };
        let (taken, rows_taken) = tokio::sync::oneshot::channel::<()>();
        let mut first = Vec::new();
        message(&mut first, b'd', b"row 1");
        message(&mut first, b'd', b"row 2");
        message(&mut first, b'E', b"SERROR\0C22012\0Mdivision by zero\0\0");
        let server = tokio::spawn(async move {
            server.write_all(&first).await.unwrap();
            rows_taken.await.unwrap();
            let mut ready = Vec::new();
            message(&mut ready, b'Z', b"T");
            server.write_all(&ready).await.unwrap();
            server
        });
        let mut taken = Some(taken);
        let mut rows = Vec::new();
        let end = loop {
            let step = conn
                .copy_data_each(|row| {
                    rows.push(row.to_vec());
                    if let Some(t) = taken.take() {
                        let _ = t.send(());
                    }
                    true
                })
                .await;
            match step {
                Ok(true) => continue,
                other => break other,
            }
        };
        assert_eq!(rows, [b"row 1".to_vec(), b"row 2".to_vec()]);
        let err = end.expect_err("the server's error").to_string();
        assert!(err.contains("division by zero"), "{err}");
        drop(server.await.unwrap());
    }

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.4 (Debian 15.4-1.pgdg120+1)"),
            150004
        );
        assert_eq!(parse_server_version("16beta1"), 160000);
        assert_eq!(parse_server_version("9.6.24"), 90624);
        assert_eq!(parse_server_version("18.1"), 180001);
    }

    #[test]
    fn error_response_fields_and_truncation() {
        let mut b = BytesMut::new();
        for (f, v) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "password authentication failed"),
            (b'H', "check it"),
        ] {
            b.extend_from_slice(&[f]);
            b.extend_from_slice(v.as_bytes());
            b.extend_from_slice(&[0]);
        }
        let complete = {
            let mut c = b.clone();
            c.extend_from_slice(&[0]);
            c.freeze()
        };
        let e = parse_error_response(complete).unwrap();
        assert_eq!(e.code, "28P01");
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.hint.as_deref(), Some("check it"));
        assert!(parse_error_response(b.freeze()).is_err());
    }

    #[test]
    fn data_row_rejects_truncation() {
        let body = Bytes::from_static(&[0, 1, 0, 0, 0, 5, b'a']);
        assert!(parse_data_row(body).is_err());
        let body = Bytes::from_static(&[0, 2, 255, 255, 255, 255, 0, 0, 0, 1, b'x']);
        assert_eq!(
            parse_data_row(body).unwrap(),
            vec![None, Some("x".to_string())]
        );
    }
}
