//! The agent's control socket, `state_dir/agent.sock` (mode 0600: the service user and root
//! only), for `rsql-agent drain`. One JSON request per line, one reply per line:
//!
//! - `{"op":"drain"}`: stop intake now (a message received but not started goes back to the
//!   queue at once); the agent stays up, watching and reporting its jobs, until it is stopped;
//! - `{"op":"status"}`: how many jobs run and how many reports wait in the outbox.
//!
//! A request line is at most [`MAX_LINE`] bytes; a longer one is refused and the connection
//! closed, so a client cannot make the agent hold an unbounded line. `drain` first checks who
//! listens (`SO_PEERCRED`), as `rsql-wrapper submit` does: root, its own user or the agent's
//! ([`crate::trust::agent_uids`]); anyone else is refused before anything is sent, so an
//! impostor cannot make an operator believe the agent drained.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// The socket's name under the state directory.
pub const SOCKET: &str = "agent.sock";

/// The longest request or reply line: the requests are a few dozen bytes, the replies a few
/// hundred; this leaves room and bounds what one connection can make the agent hold.
pub const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum ControlRequest {
    Drain,
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    pub ok: bool,
    pub draining: bool,
    pub running: usize,
    pub outbox: usize,
}

/// A request on its way to the daemon's loop, which answers it.
#[derive(Debug)]
pub(super) struct Asked {
    pub(super) request: ControlRequest,
    pub(super) reply: oneshot::Sender<ControlReply>,
}

/// Binds the socket (replacing a stale one) and serves it until the task is aborted.
pub(super) fn serve(
    state_dir: &Path,
    to_loop: mpsc::Sender<Asked>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    let path = state_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let to_loop = to_loop.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut read = tokio::io::BufReader::new(read);
                loop {
                    let line = match read_line(&mut read).await {
                        Ok(Some(line)) => line,
                        Ok(None) | Err(LineError::Io(_)) => return,
                        Err(LineError::TooLong) => {
                            tracing::warn!(
                                max = MAX_LINE,
                                "refused an oversize request on the control socket"
                            );
                            let _ = write
                                .write_all(b"{\"ok\":false,\"error\":\"request too long\"}\n")
                                .await;
                            return;
                        }
                    };
                    let Ok(request) = serde_json::from_str::<ControlRequest>(&line) else {
                        let _ = write.write_all(b"{\"ok\":false}\n").await;
                        continue;
                    };
                    let (tx, rx) = oneshot::channel();
                    if to_loop.send(Asked { request, reply: tx }).await.is_err() {
                        return;
                    }
                    let Ok(reply) = rx.await else { return };
                    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                    out.push(b'\n');
                    if write.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    }))
}

/// Why a line could not be read.
#[derive(Debug)]
enum LineError {
    TooLong,
    Io(std::io::Error),
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes (`None` at a clean end of
/// the stream), never holding more than that.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    read: &mut R,
) -> Result<Option<String>, LineError> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    let mut limited = read.take(MAX_LINE as u64 + 1);
    let n = limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(LineError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') && line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("the agent is not reachable at {path} (is it running, and are you root or its user?)")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} closed the connection or answered nonsense")]
    BadReply { path: PathBuf },
    #[error(
        "the process listening on {path} (pid {pid}) runs as uid {uid}, which is neither root, \
         this user nor the agent's user (trusted uids: {trusted:?}); nothing was sent to it. \
         Someone may have replaced the agent's socket: check who can write to the state \
         directory"
    )]
    Untrusted {
        path: PathBuf,
        pid: i32,
        uid: u32,
        trusted: Vec<u32>,
    },
}

/// Sends one request to the agent of `state_dir` and returns its reply (for `rsql-agent
/// drain`).
pub async fn ask(state_dir: &Path, request: ControlRequest) -> Result<ControlReply, DrainError> {
    let path = state_dir.join(SOCKET);
    let unreachable = |source| DrainError::Unreachable {
        path: path.clone(),
        source,
    };
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(unreachable)?;
    let peer = stream.peer_cred().map_err(unreachable)?;
    let trusted = crate::trust::agent_uids();
    if !trusted.contains(&peer.uid()) {
        return Err(DrainError::Untrusted {
            path,
            pid: peer.pid().unwrap_or(0),
            uid: peer.uid(),
            trusted,
        });
    }
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(&request).unwrap_or_default();
    line.push(b'\n');
    write.write_all(&line).await.map_err(unreachable)?;
    let mut read = tokio::io::BufReader::new(read);
    let text = match read_line(&mut read).await {
        Ok(Some(text)) => text,
        Ok(None) | Err(LineError::TooLong) => return Err(DrainError::BadReply { path }),
        Err(LineError::Io(e)) => return Err(unreachable(e)),
    };
    serde_json::from_str(&text).map_err(|_| DrainError::BadReply { path })
}
