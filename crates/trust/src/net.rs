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

/// Bounds on what unauthenticated clients can hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most connections open at once (handshaking or established).
    pub max_connections: usize,
    /// Longest a client may take to finish the TLS handshake.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 512,
            handshake_timeout: Duration::from_secs(10),
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
        Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::InvalidMessage(_) | Error::InappropriateHandshakeMessage { .. } => "not_tls",
        _ => "handshake",
    }
}

/// Accepts connections on `listener`, handshakes each with the current
/// credentials of `live` (a client certificate is required), and yields
/// those whose certificate carries a Meridian identity. Every refusal is
/// passed to `refused` with its [`refusal_reason`] (or `too_many_connections`,
/// `timeout`, `no_identity`); the loop ends when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    live: Arc<Live>,
    limits: Limits,
    refused: Arc<dyn Fn(&'static str) + Send + Sync>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
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
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                refused("too_many_connections");
                continue; // dropped: closed at once
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(live.current().server_config());
            let (tx, refused) = (tx.clone(), refused.clone());
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let reason = refusal_reason(&e);
                        tracing::warn!(%remote, reason, error = %e, "TLS handshake refused");
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
                        tracing::warn!(%remote, error = %e, "connection refused: no identity");
                        return refused("no_identity");
                    }
                    None => return refused("no_certificate"),
                };
                let conn = Conn {
                    stream,
                    peer: Peer {
                        identity,
                        remote: Some(remote),
                    },
                    _permit: permit,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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
