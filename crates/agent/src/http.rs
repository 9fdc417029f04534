//! A minimal HTTP/1.1 responder for read-only pages (`GET` only, one
//! request per connection): the metrics endpoint and the dashboard. Not a
//! general web server; enough for Prometheus scrapes and a browser.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// A response: status code, content type, body.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: String) -> Reply {
        Reply {
            status: 200,
            content_type,
            body,
        }
    }

    /// 200 with `ok`, or 503 with why not.
    pub fn probe(result: Result<(), String>) -> Reply {
        match result {
            Ok(()) => Reply::ok("text/plain; charset=utf-8", "ok\n".to_owned()),
            Err(why) => Reply {
                status: 503,
                content_type: "text/plain; charset=utf-8",
                body: format!("{why}\n"),
            },
        }
    }

    pub fn not_found() -> Reply {
        Reply {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: "not found\n".to_owned(),
        }
    }
}

/// Answers a request for a path (query string included).
pub type Handler = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// Most connections served at once; more are closed on accept, so idle or
/// slow clients cannot take the agent's file descriptors.
const MAX_CONNECTIONS: usize = 256;
/// Longest wait for a request's head, and for the reply to be taken.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET` requests on `listener` with `handler` until shutdown. With
/// a `token`, only requests carrying `Authorization: Bearer <token>` are
/// answered (401 otherwise).
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    token: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let token = token.map(Arc::new);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let mut socket = match accepted {
            Ok((socket, _)) => socket,
            Err(e) => {
                // out of file descriptors and the like: back off, go on
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let (handler, token) = (handler.clone(), token.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(head) = tokio::time::timeout(IO_TIMEOUT, read_head(&mut socket)).await else {
                return;
            };
            let reply = answer(&head, token.as_deref().map(String::as_str), &handler).await;
            let reason = match reply.status {
                200 => "OK",
                401 => "Unauthorized",
                404 => "Not Found",
                503 => "Service Unavailable",
                _ => "Method Not Allowed",
            };
            let response = format!(
                "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n{}",
                reply.status,
                reply.content_type,
                reply.body.len(),
                reply.body
            );
            let _ = tokio::time::timeout(IO_TIMEOUT, socket.write_all(response.as_bytes())).await;
        });
    }
}

/// The request line and headers (bodies are not read), at most 16 KiB.
async fn read_head(socket: &mut tokio::net::TcpStream) -> String {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&request).into_owned()
}

/// Paths answered without the bearer token: health probes, which carry
/// none (the kubelet's) and say only whether the agent is up and ready.
pub const PROBES: [&str; 2] = ["/healthz", "/readyz"];

async fn answer(head: &str, token: Option<&str>, handler: &Handler) -> Reply {
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next(), parts.next());
    if let Some(token) = token
        && !path.is_some_and(|p| PROBES.contains(&p))
        && !bearer_matches(head, token)
    {
        return Reply {
            status: 401,
            content_type: "text/plain; charset=utf-8",
            body: "a bearer token is required (Authorization: Bearer ...)\n".to_owned(),
        };
    }
    match (method, path) {
        (Some("GET"), Some(path)) => handler(path.to_owned()).await,
        _ => Reply {
            status: 405,
            content_type: "text/plain; charset=utf-8",
            body: "only GET\n".to_owned(),
        },
    }
}

/// Whether the head carries `Authorization: Bearer <token>`, compared in
/// time independent of where the first difference is.
fn bearer_matches(head: &str, token: &str) -> bool {
    let sent = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| value.trim().strip_prefix("Bearer ").map(str::trim))
            .flatten()
    });
    let Some(sent) = sent else { return false };
    sent.len() == token.len()
        && sent
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let head = "GET /metrics HTTP/1.1\r\nHost: x\r\nauthorization: Bearer s3cret\r\n\r\n";
        assert!(bearer_matches(head, "s3cret"));
        assert!(!bearer_matches(head, "s3cre"));
        assert!(!bearer_matches(head, "s3cret!"));
        assert!(!bearer_matches("GET / HTTP/1.1\r\n\r\n", "s3cret"));
        assert!(!bearer_matches(
            "GET / HTTP/1.1\r\nAuthorization: Basic s3cret\r\n\r\n",
            "s3cret"
        ));
    }
}
