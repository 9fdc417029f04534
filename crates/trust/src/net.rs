//! Connections with mTLS for tonic: a listener that handshakes each
//! accepted connection (bounded in number and time) and hands tonic only
//! those that proved an identity, and a dialer that checks whom it reached.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::Identity;
use crate::tls::Live;

/// What tonic's request extensions hold for a connection accepted with
/// mTLS: read it with [`caller`].
#[derive(Clone, Debug)]
pub struct Peer {
    pub identity: Identity,
    pub remote: Option<std::net::SocketAddr>,
}

/// The verified identity behind a request, if it came over mTLS.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&Identity> {
    request.extensions().get::<Peer>().map(|p| &p.identity)
}

/// An accepted, handshaken connection; holds its place under the
/// connection cap until it closes.
pub struct Conn {
    stream: TlsStream<TcpStream>,
    peer: Peer,
    _permit: OwnedSemaphorePermit,
    _held: Held<Identity>,
}

/// Places held per key (an identity, a client address), so one peer or one
/// address cannot take every place under a cap.
struct Counts<K>(std::sync::Mutex<std::collections::HashMap<K, usize>>);

/// One key's place, given back on drop.
struct Held<K: std::hash::Hash + Eq> {
    counts: Arc<Counts<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Counts<K> {
    fn new() -> Arc<Counts<K>> {
        Arc::new(Counts(Default::default()))
    }

    fn take(self: &Arc<Self>, key: &K, max: usize) -> Option<Held<K>> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Held {
            counts: self.clone(),
            key: key.clone(),
        })
    }
}

impl<K: std::hash::Hash + Eq> Drop for Held<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Bounds on what clients can hold: unauthenticated ones only handshake
/// places (bounded per address too), so they never take an authenticated
/// peer's place.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most authenticated connections open at once.
    pub max_connections: usize,
    /// Most TLS handshakes under way at once.
    pub max_handshakes: usize,
    /// Most TLS handshakes under way from one client address.
    pub max_handshakes_per_address: usize,
    /// Longest a client may take to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Most connections open at once with one identity.
    pub max_per_identity: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 512,
            max_handshakes: 64,
            max_handshakes_per_address: 8,
            handshake_timeout: Duration::from_secs(10),
            max_per_identity: 32,
        }
    }
}

/// Why a connection was refused before reaching any service: a fixed set,
/// so it can label a metric.
pub fn refusal_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return "not_tls";
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => "expired",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::InvalidMessage(_) | Error::InappropriateHandshakeMessage { .. } => "not_tls",
        _ => "handshake",
    }
}

/// Accepts connections on `listener`, handshakes each with the current
/// credentials of `live` (a client certificate is required), and yields
/// those whose certificate carries a Meridian identity. Every refusal is
/// passed to `refused` with its [`refusal_reason`] (or `too_many_handshakes`,
/// `too_many_from_address`, `too_many_connections`, `too_many_from_identity`,
/// `timeout`, `no_identity`); the loop ends when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    live: Arc<Live>,
    limits: Limits,
    refused: Arc<dyn Fn(&'static str) + Send + Sync>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let per_address = Counts::<std::net::IpAddr>::new();
    let per_identity = Counts::<Identity>::new();
    let warn = Arc::new(Throttle::default());
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // out of file descriptors and the like: wait, go on
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            // dropped when refused: closed at once
            let Ok(handshaking) = handshakes.clone().try_acquire_owned() else {
                refused("too_many_handshakes");
                continue;
            };
            let Some(from_address) =
                per_address.take(&remote.ip(), limits.max_handshakes_per_address)
            else {
                refused("too_many_from_address");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(live.current().server_config());
            let (tx, refused) = (tx.clone(), refused.clone());
            let (slots, per_identity, warn) = (slots.clone(), per_identity.clone(), warn.clone());
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
                drop((handshaking, from_address));
                let stream = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let reason = refusal_reason(&e);
                        if warn.due() {
                            tracing::warn!(%remote, reason, error = %e,
                                "TLS handshake refused (further refusals this second are counted, not logged)");
                        }
                        return refused(reason);
                    }
                    Err(_) => return refused("timeout"),
                };
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| Identity::of_certificate(c));
                let identity = match identity {
                    Some(Ok(id)) => id,
                    Some(Err(e)) => {
                        if warn.due() {
                            tracing::warn!(%remote, error = %e, "connection refused: no identity");
                        }
                        return refused("no_identity");
                    }
                    None => return refused("no_certificate"),
                };
                let Ok(permit) = slots.try_acquire_owned() else {
                    return refused("too_many_connections");
                };
                let Some(held) = per_identity.take(&identity, limits.max_per_identity) else {
                    if warn.due() {
                        tracing::warn!(%remote, %identity, "connection refused: too many from this identity");
                    }
                    return refused("too_many_from_identity");
                };
                let conn = Conn {
                    stream,
                    peer: Peer {
                        identity,
                        remote: Some(remote),
                    },
                    _permit: permit,
                    _held: held,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// At most one log line a second for refusals (every one is counted), so a
/// flood of bad clients cannot flood the log.
#[derive(Default)]
struct Throttle(std::sync::Mutex<Option<std::time::Instant>>);

impl Throttle {
    fn due(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(t) if t.elapsed() < Duration::from_secs(1) => false,
            _ => {
                *last = Some(std::time::Instant::now());
                true
            }
        }
    }
}

/// Connects `endpoint` to `addr` over mTLS with `config` (which names the
/// identity the server must prove), or in plain TCP without one.
pub async fn dial(
    endpoint: Endpoint,
    addr: &str,
    config: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let Some(config) = config else {
        return endpoint.connect().await;
    };
    let addr = addr.to_owned();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let (addr, config) = (addr.clone(), config.clone());
        async move {
            let connect = async {
                let tcp = TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                // the server's SPIFFE ID is checked, not this name
                let name = ServerName::try_from("meridian").expect("a valid DNS name");
                tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
            };
            let tls = tokio::time::timeout(timeout, connect).await.map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no TLS connection to {addr} within {timeout:?}"),
                )
            })??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    endpoint.connect_with_connector(connector).await
}
