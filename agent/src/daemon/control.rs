//! The agent's control socket, `state_dir/agent.sock` (mode 0600: the service user and root
//! only), for `rsql-agent drain`. One JSON request per line, one reply per line:
//!
//! - `{"op":"drain"}`: stop intake now (a message received but not started goes back to the
//!   queue at once); the agent stays up, watching and reporting its jobs, until it is stopped;
//! - `{"op":"status"}`: how many jobs run and how many reports wait in the outbox.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// The socket's name under the state directory.
pub const SOCKET: &str = "agent.sock";

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
                let mut lines = tokio::io::BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
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
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(&request).unwrap_or_default();
    line.push(b'\n');
    write.write_all(&line).await.map_err(unreachable)?;
    let mut lines = tokio::io::BufReader::new(read).lines();
    let text = lines
        .next_line()
        .await
        .map_err(unreachable)?
        .ok_or_else(|| DrainError::BadReply { path: path.clone() })?;
    serde_json::from_str(&text).map_err(|_| DrainError::BadReply { path })
}
