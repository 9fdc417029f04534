//! The replication connection: PostgreSQL's streaming replication protocol in
//! logical mode, decoding `pgoutput` with [`meridian_core::pgoutput`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use meridian_core::pgoutput::{DecodeError, Decoded, Decoder, Keys};
use meridian_core::{Lsn, Transaction};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conninfo::{ConnInfo, SslMode};

/// A connection to the store, in plain TCP or TLS.
trait Socket: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Socket for T {}

/// Connects to the store as libpq would for `sslmode`: `disable` and
/// `allow` in plain TCP; `prefer` with TLS when the server offers it
/// (unverified), else plain; `require` with TLS (checked against
/// `sslrootcert` when one is given, as libpq does); `verify-ca` and
/// `verify-full` with TLS against `sslrootcert`.
async fn connect(info: &ConnInfo) -> Result<Box<dyn Socket>, CaptureError> {
    use meridian_trust::store::Verify;
    let mut tcp = TcpStream::connect((info.host.as_str(), info.port)).await?;
    tcp.set_nodelay(true)?;
    let verify = match info.sslmode {
        SslMode::Disable | SslMode::Allow => return Ok(Box::new(tcp)),
        SslMode::Prefer | SslMode::Require if info.sslrootcert.is_some() => Verify::Chain,
        SslMode::Prefer | SslMode::Require => Verify::Nothing,
        SslMode::VerifyCa => Verify::Chain,
        SslMode::VerifyFull => Verify::ChainAndName,
    };
    let config = meridian_trust::store::client_config(verify, info.sslrootcert.as_deref())
        .map_err(|e| CaptureError::Config(format!("{e:#}")))?;
    // SSLRequest: the server answers S (go on with TLS) or N
    let mut request = BytesMut::new();
    request.put_i32(8);
    request.put_i32(80877103);
    tcp.write_all(&request).await?;
    if tcp.read_u8().await? != b'S' {
        if info.sslmode == SslMode::Prefer {
            return Ok(Box::new(tcp));
        }
        return Err(CaptureError::Config(format!(
            "store {}:{} does not accept TLS, but the store URL asks for sslmode {:?}",
            info.host, info.port, info.sslmode
        )));
    }
    let name = rustls::pki_types::ServerName::try_from(info.host.clone())
        .map_err(|e| CaptureError::Config(format!("store host {:?}: {e}", info.host)))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(Box::new(tls))
}

/// How often the stream reports its confirmed position to the server, also
/// when nothing arrives (the server drops a silent client after
/// `wal_sender_timeout`).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes read from the server at a time, at most.
const READ_CHUNK: usize = 64 * 1024;

/// Replication origins of Meridian's apply sessions: what they wrote is
/// never shipped again (nor decoded past its origin).
const REPLICATED_ORIGINS: &str = "meridian_";

/// Microseconds between the Unix and PostgreSQL (2000-01-01) epochs.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// What went wrong with a replication stream.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("store connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("store refused: {severity} {code}: {message}")]
    Server {
        severity: String,
        code: String,
        message: String,
    },
    #[error("replication protocol error: {0}")]
    Protocol(String),
    #[error("cannot decode pgoutput from the slot: {0}; the slot position is not advanced")]
    Decode(#[from] DecodeError),
    #[error("store query failed: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("{0}")]
    Config(String),
}

impl CaptureError {
    /// Whether retrying later may succeed (connection trouble, a slot still held
    /// by a dying session) rather than needing an operator.
    pub fn is_retryable(&self) -> bool {
        match self {
            CaptureError::Io(_) | CaptureError::Protocol(_) | CaptureError::Sql(_) => true,
            // 55006 object_in_use (slot active for another PID), 57P0x shutdown,
            // 53xxx insufficient resources, 08xxx connection exceptions
            CaptureError::Server { code, .. } => {
                code == "55006"
                    || code.starts_with("57P")
                    || code.starts_with("53")
                    || code.starts_with("08")
            }
            CaptureError::Decode(_) | CaptureError::Config(_) => false,
        }
    }
}

/// One logical replication connection, streaming committed transactions.
///
/// Not cancel-safe across [`ReplicationStream::next`] only in the sense that a
/// dropped call loses nothing: all state lives in `self`.
pub struct ReplicationStream {
    socket: Box<dyn Socket>,
    read: BytesMut,
    decoder: Decoder,
    /// Highest position confirmed as durably applied at the destination,
    /// shared with whoever receives the acknowledgements.
    confirmed: Arc<AtomicU64>,
    /// Highest WAL position the server said it has sent.
    received: Lsn,
    /// The same, shared: WAL the server decoded and sent, so flushed.
    sent: Arc<AtomicU64>,
    last_status: Instant,
}

/// What [`ReplicationStream::next`] returns.
#[derive(Debug)]
pub struct Next {
    pub transaction: Transaction,
    /// The initial-sync chunk whose position this (empty) transaction marks
    /// ([`meridian_core::snapshot`]).
    pub snapshot: Option<meridian_core::snapshot::Mark>,
}

/// A message from the server, framed.
struct Frame {
    tag: u8,
    body: BytesMut,
}

impl ReplicationStream {
    /// Connects with `replication=database` and starts streaming `slot` from
    /// `start` (the server starts no earlier than the slot's confirmed
    /// position), publishing `publication`.
    pub async fn start(
        url: &str,
        slot: &str,
        publication: &str,
        start: Lsn,
        keys: Keys,
    ) -> Result<ReplicationStream, CaptureError> {
        let info = ConnInfo::parse(url).map_err(CaptureError::Config)?;
        let socket = connect(&info).await?;
        let mut stream = ReplicationStream {
            socket,
            read: BytesMut::with_capacity(READ_CHUNK),
            decoder: Decoder::with_keys(keys).skipping_origins(REPLICATED_ORIGINS),
            confirmed: Arc::new(AtomicU64::new(start.0)),
            received: start,
            sent: Arc::new(AtomicU64::new(start.0)),
            last_status: Instant::now(),
        };
        stream.login(&info).await?;
        let command = format!(
            "START_REPLICATION SLOT \"{slot}\" LOGICAL {start} (proto_version '1', publication_names '\"{publication}\"', messages 'true')"
        );
        let mut buf = BytesMut::new();
        frontend::query(&command, &mut buf)?;
        stream.socket.write_all(&buf).await?;
        loop {
            let frame = stream.frame().await?;
            match frame.tag {
                b'W' => break, // CopyBothResponse
                b'N' | b'S' => {}
                tag => return Err(unexpected(tag, "starting replication")),
            }
        }
        Ok(stream)
    }

    async fn login(&mut self, info: &ConnInfo) -> Result<(), CaptureError> {
        let mut buf = BytesMut::new();
        frontend::startup_message(
            [
                ("user", info.user.as_str()),
                ("database", info.database.as_str()),
                ("replication", "database"),
                ("application_name", "meridian-capture"),
                // values in the text forms the agent's other connections
                // (sqlx: initial sync, reselect) read, whatever the
                // server's defaults: a value copied and the same value
                // streamed hash and compare alike, in every region
                ("DateStyle", "ISO, MDY"),
                ("TimeZone", "UTC"),
                ("extra_float_digits", "2"),
                ("client_encoding", "UTF8"),
            ],
            &mut buf,
        )?;
        self.socket.write_all(&buf).await?;
        let password = || {
            info.password.clone().ok_or_else(|| {
                CaptureError::Config(format!(
                    "the store asks user {:?} for a password but the store URL has none",
                    info.user
                ))
            })
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let mut frame = self.frame().await?;
            buf.clear();
            match frame.tag {
                b'R' if frame.body.len() < 4 => return Err(unexpected(b'R', "authentication")),
                b'R' => match frame.body.get_i32() {
                    0 => {}
                    3 => frontend::password_message(password()?.as_bytes(), &mut buf)?,
                    5 if frame.body.len() < 4 => {
                        return Err(unexpected(b'R', "md5 authentication"));
                    }
                    5 => {
                        let salt = [frame.body[0], frame.body[1], frame.body[2], frame.body[3]];
                        let hash = md5_hash(info.user.as_bytes(), password()?.as_bytes(), salt);
                        frontend::password_message(hash.as_bytes(), &mut buf)?;
                    }
                    10 => {
                        let mechanisms = String::from_utf8_lossy(&frame.body).into_owned();
                        if !mechanisms.split('\0').any(|m| m == sasl::SCRAM_SHA_256) {
                            return Err(CaptureError::Protocol(format!(
                                "server offers SASL mechanisms {mechanisms:?}, none of which is SCRAM-SHA-256"
                            )));
                        }
                        let s = sasl::ScramSha256::new(
                            password()?.as_bytes(),
                            sasl::ChannelBinding::unsupported(),
                        );
                        frontend::sasl_initial_response(
                            sasl::SCRAM_SHA_256,
                            s.message(),
                            &mut buf,
                        )?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| unexpected(b'R', "SASL continue"))?;
                        s.update(&frame.body)?;
                        frontend::sasl_response(s.message(), &mut buf)?;
                    }
                    12 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| unexpected(b'R', "SASL final"))?;
                        s.finish(&frame.body)?;
                    }
                    other => {
                        return Err(CaptureError::Protocol(format!(
                            "unsupported authentication method {other}; use trust, password, md5 or scram-sha-256"
                        )));
                    }
                },
                b'Z' => return Ok(()),
                b'S' | b'K' | b'N' => {}
                tag => return Err(unexpected(tag, "logging in")),
            }
            if !buf.is_empty() {
                self.socket.write_all(&buf).await?;
            }
        }
    }

    /// The confirmed position. Raise it (`fetch_max`) once everything up to a
    /// position is durably applied at the destination; the next status report
    /// (at most a second later) lets the server discard that WAL.
    pub fn confirmed(&self) -> Arc<AtomicU64> {
        self.confirmed.clone()
    }

    /// Highest WAL position the server reported sending.
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// [`ReplicationStream::received`], shared and kept current: a position
    /// the source store has flushed (logical decoding reads only flushed
    /// WAL; a commit's message carries its transaction's end).
    pub fn sent(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }

    /// Returns the next committed transaction to ship (with the initial-sync
    /// chunk it marks, if any). Transactions written by Meridian's apply
    /// sessions are skipped. Reports status to the server while waiting.
    pub async fn next(&mut self) -> Result<Next, CaptureError> {
        loop {
            if self.last_status.elapsed() >= STATUS_INTERVAL {
                self.send_status(false).await?;
            }
            // a frame already read needs no timer
            let frame = match self.buffered_frame()? {
                Some(frame) => frame,
                None => match tokio::time::timeout(STATUS_INTERVAL, self.frame()).await {
                    Ok(frame) => frame?,
                    Err(_) => continue,
                },
            };
            match frame.tag {
                b'd' => {}
                b'c' => {
                    return Err(CaptureError::Protocol(
                        "server ended the replication stream".into(),
                    ));
                }
                b'N' => continue,
                tag => return Err(unexpected(tag, "streaming")),
            }
            let mut body = frame.body;
            if body.is_empty() {
                return Err(CaptureError::Protocol("empty CopyData".into()));
            }
            match body.get_u8() {
                b'w' => {
                    if body.len() < 24 {
                        return Err(CaptureError::Protocol("short XLogData".into()));
                    }
                    let _wal_start = body.get_u64();
                    let wal_end = body.get_u64();
                    let _sent = body.get_i64();
                    self.received = self.received.max(Lsn(wal_end));
                    self.sent.fetch_max(wal_end, Ordering::AcqRel);
                    match self.decoder.decode(&body)? {
                        Decoded::Committed {
                            transaction,
                            origin,
                            message,
                            snapshot,
                        } => {
                            let replicated =
                                origin.is_some_and(|o| o.starts_with(REPLICATED_ORIGINS));
                            // empty transactions travel only as heartbeats (and
                            // as the end of a fragmented one)
                            if !replicated && (message || !transaction.changes.is_empty()) {
                                return Ok(Next {
                                    transaction,
                                    snapshot,
                                });
                            }
                        }
                        Decoded::Fragment {
                            transaction,
                            origin,
                        } => {
                            if !origin.is_some_and(|o| o.starts_with(REPLICATED_ORIGINS)) {
                                return Ok(Next {
                                    transaction,
                                    snapshot: None,
                                });
                            }
                        }
                        Decoded::Pending => {}
                    }
                }
                b'k' => {
                    if body.len() < 17 {
                        return Err(CaptureError::Protocol("short keepalive".into()));
                    }
                    let wal_end = body.get_u64();
                    let _sent = body.get_i64();
                    let reply = body.get_u8() == 1;
                    self.received = self.received.max(Lsn(wal_end));
                    self.sent.fetch_max(wal_end, Ordering::AcqRel);
                    if reply {
                        self.send_status(false).await?;
                    }
                }
                other => {
                    return Err(CaptureError::Protocol(format!(
                        "unknown replication message {:?}",
                        other as char
                    )));
                }
            }
        }
    }

    /// Sends a standby status update with the confirmed position as the
    /// written, flushed and applied position.
    pub async fn send_status(&mut self, reply: bool) -> Result<(), CaptureError> {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as i64
            - PG_EPOCH_OFFSET_US;
        let confirmed = self.confirmed.load(Ordering::Acquire);
        let mut status = BytesMut::with_capacity(34);
        status.put_u8(b'r');
        status.put_u64(confirmed);
        status.put_u64(confirmed);
        status.put_u64(confirmed);
        status.put_i64(now_us);
        status.put_u8(reply as u8);
        let mut buf = BytesMut::new();
        frontend::CopyData::new(status.freeze())?.write(&mut buf);
        self.socket.write_all(&buf).await?;
        self.last_status = Instant::now();
        Ok(())
    }

    /// Reads one server message; turns an ErrorResponse into an error.
    /// Cancel-safe: partial reads stay in `self.read`.
    async fn frame(&mut self) -> Result<Frame, CaptureError> {
        loop {
            if let Some(frame) = self.buffered_frame()? {
                return Ok(frame);
            }
            // read in large chunks, not what is left of the last one
            self.read.reserve(READ_CHUNK);
            if self.socket.read_buf(&mut self.read).await? == 0 {
                return Err(CaptureError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// The next message if it has been read whole already.
    fn buffered_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        if self.read.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes(self.read[1..5].try_into().expect("4 bytes"));
        if len < 4 {
            return Err(CaptureError::Protocol(format!(
                "invalid message length {len}"
            )));
        }
        let total = 1 + len as usize;
        if self.read.len() < total {
            self.read.reserve(total - self.read.len());
            return Ok(None);
        }
        let mut msg = self.read.split_to(total);
        let tag = msg[0];
        msg.advance(5);
        if tag == b'E' {
            return Err(server_error(&msg));
        }
        Ok(Some(Frame { tag, body: msg }))
    }
}

fn unexpected(tag: u8, during: &str) -> CaptureError {
    CaptureError::Protocol(format!(
        "unexpected message {:?} while {during}",
        tag as char
    ))
}

/// Parses ErrorResponse fields (type byte, C string; ends with a zero byte).
fn server_error(body: &[u8]) -> CaptureError {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    CaptureError::Server {
        severity,
        code,
        message,
    }
}
