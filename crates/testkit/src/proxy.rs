//! A TCP proxy that stands in for the WAN between two agents (or a client
//! and a store): it can cut all connections, refuse new ones, corrupt bytes
//! in flight, and swallow replies.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards `127.0.0.1:port` to a target address. Stops on drop.
pub struct TcpProxy {
    port: u16,
    state: Arc<State>,
    stop: watch::Sender<bool>,
}

struct State {
    target: String,
    paused: AtomicBool,
    /// Server->client bytes are dropped (the request arrives, the answer
    /// never does) until the next cut.
    swallow: AtomicBool,
    /// Number of upcoming large client->server chunks to corrupt.
    corrupt: AtomicUsize,
    corrupted: AtomicUsize,
    /// Every byte sent from client to server (up to `CAPTURE_LIMIT`), so
    /// tests can scan what crossed the "WAN".
    captured: Mutex<Vec<u8>>,
    /// Bumped to close every open connection.
    cut: watch::Sender<u64>,
    /// Bumped to freeze every open connection: nothing more crosses it,
    /// and neither end learns when the other closes (a host that vanished
    /// without FIN or RST). New connections are not affected.
    freeze: watch::Sender<u64>,
}

/// Chunks at least this large are payload-heavy: flipping a byte in their
/// middle hits a batch's payload rather than HTTP/2 framing.
const CORRUPTIBLE_CHUNK: usize = 2048;

const CAPTURE_LIMIT: usize = 256 * 1024 * 1024;

impl TcpProxy {
    /// Starts a proxy on a free port of 127.0.0.1.
    pub async fn start(target: &str) -> anyhow::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (stop, mut stopped) = watch::channel(false);
        let state = Arc::new(State {
            target: target.to_owned(),
            paused: AtomicBool::new(false),
            swallow: AtomicBool::new(false),
            corrupt: AtomicUsize::new(0),
            corrupted: AtomicUsize::new(0),
            captured: Mutex::new(Vec::new()),
            cut: watch::channel(0).0,
            freeze: watch::channel(0).0,
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        if s.paused.load(Ordering::SeqCst) {
                            drop(client);
                            continue;
                        }
                        tokio::spawn(forward(s.clone(), client));
                    }
                    _ = stopped.changed() => return,
                }
            }
        });
        Ok(TcpProxy { port, state, stop })
    }

    /// The address to dial instead of the target.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Closes every connection and refuses new ones until [`TcpProxy::resume`].
    pub fn pause(&self) {
        self.state.paused.store(true, Ordering::SeqCst);
        self.cut();
    }

    pub fn resume(&self) {
        self.state.paused.store(false, Ordering::SeqCst);
    }

    /// From now on, drops what servers answer on open and new connections
    /// (requests still arrive) until [`TcpProxy::cut`]: a reply lost on the
    /// way back.
    pub fn swallow_replies(&self) {
        self.state.swallow.store(true, Ordering::SeqCst);
    }

    /// Closes every open connection (new ones are accepted, and replies
    /// flow again).
    pub fn cut(&self) {
        self.state.swallow.store(false, Ordering::SeqCst);
        self.state.cut.send_modify(|n| *n += 1);
    }

    /// Freezes every open connection: bytes stop in both directions and a
    /// close on one side is not passed on, so each end sees a silent peer
    /// (a black-holed network, a host gone without FIN) until
    /// [`TcpProxy::cut`]. New connections pass normally.
    pub fn freeze_open(&self) {
        self.state.freeze.send_modify(|n| *n += 1);
    }

    /// Flips one byte in each of the next `n` large chunks sent from client
    /// to server: the middle byte of a run of at least 32 ASCII letters and
    /// digits when the chunk carries row text, so the corruption lands in a
    /// batch's payload (where its crc32 must catch it), never in the HTTP/2
    /// or gRPC framing; the chunk's middle byte otherwise (a compressed
    /// payload, where framing is a few bytes in 16 KiB).
    pub fn corrupt_next(&self, n: usize) {
        self.state.corrupt.store(n, Ordering::SeqCst);
    }

    /// Every byte that went from client to server so far.
    pub fn captured(&self) -> Vec<u8> {
        self.state.captured.lock().expect("capture lock").clone()
    }

    /// How many chunks were corrupted so far.
    pub fn corrupted(&self) -> usize {
        self.state.corrupted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.cut();
    }
}

/// The middle of the first run of at least 32 ASCII letters and digits.
fn text_run_middle(bytes: &[u8]) -> Option<usize> {
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        if !b.is_ascii_alphanumeric() {
            start = i + 1;
        } else if i + 1 - start >= 32 {
            return Some(start + 16);
        }
    }
    None
}

async fn forward(state: Arc<State>, client: TcpStream) {
    let Ok(server) = TcpStream::connect(&state.target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut cut = state.cut.subscribe();
    let mut freeze = state.freeze.subscribe();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up_state = state.clone();
    // Bytes read after a cut are never passed on, whichever branch of the
    // select below runs first: a request sent after `pause` or `cut`
    // returned must not reach the server.
    let up_cut = state.cut.subscribe();
    let down_cut = state.cut.subscribe();
    // the futures borrow the socket halves, so that a frozen connection
    // keeps its sockets open after the futures are dropped
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if n >= CORRUPTIBLE_CHUNK
                && up_state.corrupt.load(Ordering::SeqCst) > 0
                && let at = text_run_middle(&buf[..n]).unwrap_or(n / 2)
                && up_state
                    .corrupt
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                    .is_ok()
            {
                buf[at] ^= 0x01; // in text, stays ASCII: a changed letter or digit
                up_state.corrupted.fetch_add(1, Ordering::SeqCst);
            }
            if up_cut.has_changed().unwrap_or(true) {
                return Ok(());
            }
            {
                let mut captured = up_state.captured.lock().expect("capture lock");
                if captured.len() + n <= CAPTURE_LIMIT {
                    captured.extend_from_slice(&buf[..n]);
                }
            }
            sw.write_all(&buf[..n]).await?;
        }
    };
    let down_state = state.clone();
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if down_cut.has_changed().unwrap_or(true) {
                return Ok(());
            }
            if !down_state.swallow.load(Ordering::SeqCst) {
                cw.write_all(&buf[..n]).await?;
            }
        }
    };
    let frozen = tokio::select! {
        biased;
        _ = cut.changed() => false,
        _ = freeze.changed() => true,
        _ = up => false,
        _ = down => false,
    };
    if frozen {
        // both sockets stay open, silent, until the next cut
        let _ = cut.changed().await;
    }
}
