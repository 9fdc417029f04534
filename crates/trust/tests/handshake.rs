//! Handshakes over loopback TCP between the listener and dialer of this
//! crate: who gets in, who is refused and how the refusal is counted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_trust::Identity;
use meridian_trust::certs::{Authority, Validity};
use meridian_trust::net::{self, Limits};
use meridian_trust::tls::{Credentials, Files, Live};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir() -> Dir {
    let d = std::env::temp_dir().join(format!("meridian-trust-{}", uuid()));
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn uuid() -> String {
    use std::time::SystemTime;
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{n}-{:?}", std::thread::current().id()).replace(['(', ')'], "")
}

/// Writes `id`'s certificate from `ca`, with `ca_for_roots` as the trusted
/// bundle, and returns its files.
fn files(
    dir: &Dir,
    stem: &str,
    ca: &Authority,
    roots: &Authority,
    id: &Identity,
    validity: Validity,
) -> Files {
    let (cert, key) = ca.issue(id, validity).unwrap();
    let f = Files {
        ca: dir.0.join(format!("{stem}-ca.pem")),
        cert: dir.0.join(format!("{stem}.pem")),
        key: dir.0.join(format!("{stem}-key.pem")),
    };
    std::fs::write(&f.ca, roots.pem()).unwrap();
    std::fs::write(&f.cert, cert).unwrap();
    std::fs::write(&f.key, key).unwrap();
    f
}

type Refusals = Arc<Mutex<Vec<&'static str>>>;

/// A listener for region eu that answers each connection with one line,
/// the caller's identity, and holds it until the caller closes.
async fn serve(live: Arc<Live>, limits: Limits) -> (String, Refusals) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let refusals: Refusals = Arc::default();
    let seen = refusals.clone();
    let mut conns = net::incoming(
        listener,
        live,
        limits,
        Arc::new(move |r| seen.lock().unwrap().push(r)),
    );
    tokio::spawn(async move {
        while let Some(Ok(mut conn)) = conns.next().await {
            tokio::spawn(async move {
                use tonic::transport::server::Connected;
                let who = conn.connect_info().identity.uri();
                let _ = conn.write_all(format!("{who}\n").as_bytes()).await;
                // hold the connection (and its places) until the client goes
                let mut rest = Vec::new();
                let _ = conn.read_to_end(&mut rest).await;
            });
        }
    });
    (addr, refusals)
}

/// Dials with `client` expecting `expect`; what the server echoed.
async fn call(addr: &str, client: &Credentials, expect: Identity) -> Result<String, String> {
    let config = client.client_config(expect).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("meridian").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tls.read(&mut byte).await.map_err(|e| e.to_string())? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => out.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn refusals_settle(r: &Refusals, n: usize) -> Vec<&'static str> {
    for _ in 0..100 {
        if r.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.lock().unwrap().clone()
}

#[tokio::test]
async fn peers_prove_their_region_both_ways() {
    let d = dir();
    let ca = Authority::new("test").unwrap();
    let eu = Identity::Region("eu".into());
    let na = Identity::Region("na".into());
    let server = Live::load(files(&d, "eu", &ca, &ca, &eu, Validity::default())).unwrap();
    let (addr, refusals) = serve(Arc::new(server), Limits::default()).await;
    let client = Credentials::load(&files(&d, "na", &ca, &ca, &na, Validity::default())).unwrap();
    assert_eq!(client.identity, na);

    // the server reads the client's region from its certificate
    assert_eq!(call(&addr, &client, eu.clone()).await.unwrap(), na.uri());
    // a client expecting apac refuses eu's certificate
    let e = call(&addr, &client, Identity::Region("apac".into()))
        .await
        .unwrap_err();
    assert!(
        e.contains("certificate is for region eu, expected region apac"),
        "{e}"
    );
    assert_eq!(refusals_settle(&refusals, 1).await, vec!["handshake"]);
}

#[tokio::test]
async fn strangers_are_refused_at_the_handshake_and_counted() {
    let d = dir();
    let ca = Authority::new("test").unwrap();
    let other = Authority::new("someone else").unwrap();
    let eu = Identity::Region("eu".into());
    let na = Identity::Region("na".into());
    let server = Live::load(files(&d, "eu", &ca, &ca, &eu, Validity::default())).unwrap();
    let (addr, refusals) = serve(Arc::new(server), Limits::default()).await;

    // a certificate from a CA the server does not trust (the client trusts both)
    let stranger = files(&d, "stranger", &other, &ca, &na, Validity::default());
    let stranger = Credentials::load(&stranger).unwrap();
    assert!(call(&addr, &stranger, eu.clone()).await.is_err());
    // an expired certificate from the right CA
    let old = Validity {
        not_before: (2020, 1, 1),
        not_after: (2021, 1, 1),
    };
    let expired = Credentials::load(&files(&d, "expired", &ca, &ca, &na, old)).unwrap();
    assert!(call(&addr, &expired, eu.clone()).await.is_err());
    // no certificate at all (the client trusts whatever the server shows)
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(TrustAnything))
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("meridian").unwrap();
    let anonymous = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    if let Ok(mut s) = anonymous {
        let mut out = String::new();
        let read = s.read_to_string(&mut out).await;
        assert!(read.is_err() && out.is_empty(), "{read:?} {out}");
    }
    // plain TCP
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    assert!(!String::from_utf8_lossy(&out).contains("spiffe"));

    let mut seen = refusals_settle(&refusals, 4).await;
    seen.sort();
    assert_eq!(seen, ["expired", "no_certificate", "not_tls", "unknown_ca"]);
}

#[tokio::test]
async fn the_connection_cap_and_handshake_timeout_bound_idle_clients() {
    let d = dir();
    let ca = Authority::new("test").unwrap();
    let eu = Identity::Region("eu".into());
    let na = Identity::Region("na".into());
    let server = Live::load(files(&d, "eu", &ca, &ca, &eu, Validity::default())).unwrap();
    let limits = Limits {
        max_connections: 4,
        max_handshakes: 4,
        max_handshakes_per_address: 4,
        handshake_timeout: Duration::from_millis(300),
        max_per_identity: 2,
    };
    let (addr, refusals) = serve(Arc::new(server), limits).await;
    let mut idle = Vec::new();
    for _ in 0..6 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let seen = refusals_settle(&refusals, 6).await;
    assert_eq!(
        seen.iter().filter(|r| **r == "too_many_handshakes").count(),
        2,
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|r| **r == "timeout").count(),
        4,
        "{seen:?}"
    );
    // the idle ones timed out and gave their places back
    let client = Credentials::load(&files(&d, "na", &ca, &ca, &na, Validity::default())).unwrap();
    assert_eq!(call(&addr, &client, eu.clone()).await.unwrap(), na.uri());

    // one identity holds at most two places; others still get in
    let mut held = Vec::new();
    for _ in 0..3 {
        let config = client.client_config(eu.clone()).unwrap();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("meridian").unwrap();
        held.push(
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .unwrap(),
        );
    }
    let seen = refusals_settle(&refusals, 7).await;
    assert_eq!(
        seen.iter()
            .filter(|r| **r == "too_many_from_identity")
            .count(),
        1,
        "{seen:?}"
    );
    let apac = Identity::Region("apac".into());
    let other =
        Credentials::load(&files(&d, "apac", &ca, &ca, &apac, Validity::default())).unwrap();
    assert_eq!(call(&addr, &other, eu).await.unwrap(), apac.uri());
}

#[tokio::test]
async fn rotated_files_are_used_for_new_connections() {
    let d = dir();
    let ca = Authority::new("test").unwrap();
    let next_ca = Authority::new("next").unwrap();
    let eu = Identity::Region("eu".into());
    let na = Identity::Region("na".into());
    let server_files = files(&d, "eu", &ca, &ca, &eu, Validity::default());
    let live = Arc::new(Live::load(server_files.clone()).unwrap());
    let (addr, _) = serve(live.clone(), Limits::default()).await;
    let next_client = Credentials::load(&files(
        &d,
        "na-next",
        &next_ca,
        &next_ca,
        &na,
        Validity::default(),
    ))
    .unwrap();
    assert!(call(&addr, &next_client, eu.clone()).await.is_err());
    assert!(!live.reload_if_changed(false).unwrap());

    // rotate the server to the next CA: a new certificate and bundle
    let (cert, key) = next_ca.issue(&eu, Validity::default()).unwrap();
    std::fs::write(&server_files.ca, next_ca.pem()).unwrap();
    std::fs::write(&server_files.cert, cert).unwrap();
    std::fs::write(&server_files.key, key).unwrap();
    assert!(live.reload_if_changed(true).unwrap());
    assert_eq!(
        call(&addr, &next_client, eu.clone()).await.unwrap(),
        na.uri()
    );

    // a rotation to an expired certificate is refused; the current one stays
    let old = Validity {
        not_before: (2020, 1, 1),
        not_after: (2021, 1, 1),
    };
    let (cert, key) = next_ca.issue(&eu, old).unwrap();
    std::fs::write(&server_files.cert, cert).unwrap();
    std::fs::write(&server_files.key, key).unwrap();
    let e = format!("{:#}", live.reload_if_changed(true).unwrap_err());
    assert!(e.contains("would be refused by peers"), "{e}");
    assert_eq!(
        call(&addr, &next_client, eu.clone()).await.unwrap(),
        na.uri()
    );

    // a rotation to another identity is refused; the old credentials stay
    let (cert, key) = next_ca.issue(&na, Validity::default()).unwrap();
    std::fs::write(&server_files.cert, cert).unwrap();
    std::fs::write(&server_files.key, key).unwrap();
    let e = live.reload_if_changed(true).unwrap_err().to_string();
    assert!(e.contains("is for region na, not region eu"), "{e}");
    assert_eq!(call(&addr, &next_client, eu).await.unwrap(), na.uri());
}

#[test]
fn unusable_files_are_named() {
    let d = dir();
    let ca = Authority::new("test").unwrap();
    let eu = Identity::Region("eu".into());
    let f = files(&d, "eu", &ca, &ca, &eu, Validity::default());
    let missing = Files {
        key: d.0.join("nope.pem"),
        ..f.clone()
    };
    let e = Credentials::load(&missing).err().unwrap().to_string();
    assert!(e.contains("nope.pem") && e.contains("private key"), "{e}");
    std::fs::write(&f.ca, "not pem").unwrap();
    let e = Credentials::load(&f).err().unwrap().to_string();
    assert!(
        e.contains("eu-ca.pem") && e.contains("no PEM certificate"),
        "{e}"
    );
    // a certificate without a SPIFFE ID speaks for no one
    let plain = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let f2 = Files {
        ca: d.0.join("ca2.pem"),
        cert: d.0.join("plain.pem"),
        key: d.0.join("plain-key.pem"),
    };
    std::fs::write(&f2.ca, ca.pem()).unwrap();
    std::fs::write(&f2.cert, plain.cert.pem()).unwrap();
    std::fs::write(&f2.key, plain.signing_key.serialize_pem()).unwrap();
    let e = Credentials::load(&f2).err().unwrap().to_string();
    assert!(e.contains("plain.pem") && e.contains("no SPIFFE ID"), "{e}");
}

#[derive(Debug)]
struct TrustAnything;

impl rustls::client::danger::ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
