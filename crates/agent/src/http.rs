//! A minimal HTTP/1.1 responder for read-only pages (`GET` only, one
//! request per connection): the metrics endpoint and the dashboard. Not a
//! general web server; enough for Prometheus scrapes and a browser.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

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

/// Serves `GET` requests on `listener` with `handler` until shutdown.
pub async fn serve(listener: TcpListener, handler: Handler, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((mut socket, _)) = accepted else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            // the request line and headers; bodies are not read
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&request);
            let mut parts = head.split_whitespace();
            let reply = match (parts.next(), parts.next()) {
                (Some("GET"), Some(path)) => handler(path.to_owned()).await,
                _ => Reply {
                    status: 405,
                    content_type: "text/plain; charset=utf-8",
                    body: "only GET\n".to_owned(),
                },
            };
            let reason = match reply.status {
                200 => "OK",
                404 => "Not Found",
                _ => "Method Not Allowed",
            };
            let response = format!(
                "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n{}",
                reply.status,
                reply.content_type,
                reply.body.len(),
                reply.body
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}
