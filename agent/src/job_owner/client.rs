//! The agent's side of the owner protocol: hand a job over, re-attach after a restart, ask
//! for a stop, and learn when the owner is gone.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::AsyncWriteExt;

use super::{ExitRecord, JobDir, Reply, Request, PROTOCOL};
use crate::lock::{JobLock, LockError};

/// How often a connect is retried while a fresh owner is still starting.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the job owner did not open its socket {path} within {waited:?}")]
    NoOwner {
        path: std::path::PathBuf,
        waited: Duration,
    },
    #[error("cannot hand the job's lock over")]
    HandOver(#[source] LockError),
    #[error("cannot talk to the job owner at {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the job owner at {path} refused: {error}")]
    Refused {
        path: std::path::PathBuf,
        error: String,
    },
    #[error("the job owner at {path} answered something that is not a reply: {detail}")]
    BadReply {
        path: std::path::PathBuf,
        detail: String,
    },
}

/// An open connection to a job's owner. It reaches EOF when the owner exits, which it does
/// only after the job's exit is recorded (or it died).
#[derive(Debug)]
pub struct OwnerConn {
    stream: tokio::net::UnixStream,
    /// The job's leader, as the owner said.
    pub job_pid: Option<u32>,
    /// The job's exit record, when the owner already said how it ended.
    exit: Option<ExitRecord>,
}

impl OwnerConn {
    /// Waits until the owner has exited, and returns the exit record it sent last, if any:
    /// the outcome, even when the owner could not write it down. Lines are read into a
    /// bounded buffer: a line longer than [`MAX_EXIT_LINE`] is dropped, never grown.
    pub async fn closed(&mut self) -> Option<ExitRecord> {
        use tokio::io::AsyncReadExt;
        let mut line: Vec<u8> = Vec::new();
        let mut overlong = false;
        let mut chunk = [0u8; 8192];
        while let Ok(n @ 1..) = self.stream.read(&mut chunk).await {
            for part in chunk[..n].split_inclusive(|&b| b == b'\n') {
                let complete = part.last() == Some(&b'\n');
                if !overlong {
                    line.extend_from_slice(part);
                    overlong = line.len() > MAX_EXIT_LINE;
                }
                if complete {
                    if !overlong {
                        if let Ok(Reply {
                            exit: Some(exit), ..
                        }) = serde_json::from_slice(line.trim_ascii())
                        {
                            self.exit = Some(exit);
                        }
                    }
                    line.clear();
                    overlong = false;
                }
            }
        }
        self.exit.take()
    }
}

/// Hands the job to the owner just launched for `dir`: waits (at most `timeout`) for its
/// socket, then sends the start request with the locked file and the secret environment.
/// From the moment the request is sent the lock is the owner's.
pub async fn start(
    dir: &JobDir,
    lock: JobLock,
    env: Vec<(String, String)>,
    timeout: Duration,
) -> Result<OwnerConn, ClientError> {
    let stream = connect(dir, timeout).await?;
    hand_over(stream, lock, env, timeout).await
}

/// Connects to the owner just launched for `dir`, waiting (at most `timeout`) for it to
/// open its socket. Nothing is asked of it yet: an owner whose connection closes before
/// [`hand_over`] exits and runs nothing, so a connection taken while the task is still being
/// checked can be dropped for free.
pub async fn connect(dir: &JobDir, timeout: Duration) -> Result<UnixStream, ClientError> {
    let path = dir.socket();
    blocking(move || {
        let began = Instant::now();
        loop {
            match UnixStream::connect(&path) {
                Ok(stream) => return Ok(stream),
                Err(_) if began.elapsed() < timeout => std::thread::sleep(CONNECT_RETRY),
                Err(_) => {
                    return Err(ClientError::NoOwner {
                        path,
                        waited: timeout,
                    })
                }
            }
        }
    })
    .await
}

/// Sends the start request on `stream` (from [`connect`]) with the locked file and the
/// secret environment, and reads the owner's answer (at most `timeout`). From the moment the
/// request is sent the lock is the owner's.
pub async fn hand_over(
    stream: UnixStream,
    lock: JobLock,
    env: Vec<(String, String)>,
    timeout: Duration,
) -> Result<OwnerConn, ClientError> {
    let (stream, reply) = blocking(move || start_blocking(stream, lock, env, timeout)).await?;
    into_conn(stream, reply)
}

/// Runs blocking socket work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ClientError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => Err(ClientError::Io {
            path: Default::default(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

fn start_blocking(
    stream: UnixStream,
    lock: JobLock,
    env: Vec<(String, String)>,
    timeout: Duration,
) -> Result<(UnixStream, Reply), ClientError> {
    let path = stream
        .peer_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
        .unwrap_or_default();
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let fd: OwnedFd = lock.hand_over().map_err(ClientError::HandOver)?;
    let mut line = serde_json::to_vec(&Request::Start { v: PROTOCOL, env })
        .map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    let fds = [fd.as_raw_fd()];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| io(e.into()))?;
    if sent < line.len() {
        (&stream).write_all(&line[sent..]).map_err(io)?;
    }
    // Our copy goes; the owner's keeps the lock.
    drop(fd);
    let reply = read_reply(&stream, &path)?;
    stream.set_read_timeout(None).map_err(io)?;
    Ok((stream, reply))
}

/// The longest reply line an owner sends (a few hundred bytes); a longer one is refused
/// unread past this.
const MAX_REPLY: u64 = 16 * 1024;
/// The longest last line (an exit record, which holds a failure's cause of at most 32 KiB
/// and its output) that [`OwnerConn::closed`] keeps.
const MAX_EXIT_LINE: usize = 1024 * 1024;

fn read_reply(stream: &UnixStream, path: &std::path::Path) -> Result<Reply, ClientError> {
    // Byte by byte up to the newline: the owner's last line (the exit record) may follow at
    // once, and must stay in the stream for `OwnerConn::closed`.
    let mut text = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = match (&*stream).read(&mut byte) {
            // A signal (a debugger's, a profiler's) interrupted the read; nothing was lost.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            read => read.map_err(|source| ClientError::Io {
                path: path.to_path_buf(),
                source,
            })?,
        };
        if n == 0 || byte[0] == b'\n' {
            break;
        }
        text.push(byte[0]);
        if text.len() as u64 > MAX_REPLY {
            return Err(ClientError::BadReply {
                path: path.to_path_buf(),
                detail: format!("a reply longer than {MAX_REPLY} bytes"),
            });
        }
    }
    parse_reply(text.trim_ascii(), path)
}

/// One reply line (without its newline): the owner's answer, or why it is not one.
fn parse_reply(text: &[u8], path: &std::path::Path) -> Result<Reply, ClientError> {
    let reply: Reply = serde_json::from_slice(text).map_err(|e| ClientError::BadReply {
        path: path.to_path_buf(),
        detail: if text.is_empty() {
            "the connection closed".into()
        } else {
            e.to_string()
        },
    })?;
    if !reply.ok {
        return Err(ClientError::Refused {
            path: path.to_path_buf(),
            error: reply.error.unwrap_or_default(),
        });
    }
    Ok(reply)
}

fn into_conn(stream: UnixStream, reply: Reply) -> Result<OwnerConn, ClientError> {
    let path = stream
        .peer_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
        .unwrap_or_default();
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    stream.set_nonblocking(true).map_err(io)?;
    let stream = tokio::net::UnixStream::from_std(stream).map_err(io)?;
    Ok(OwnerConn {
        stream,
        job_pid: reply.job_pid,
        exit: reply.exit,
    })
}

/// Re-attaches to the owner of `dir` (after an agent restart). `Ok(None)`: nobody listens,
/// the owner is gone.
pub async fn attach(dir: &JobDir) -> Result<Option<OwnerConn>, ClientError> {
    let path = dir.socket();
    let mut stream = match tokio::net::UnixStream::connect(&path).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(source) => return Err(ClientError::Io { path, source }),
    };
    let reply = exchange(&mut stream, &Request::Status { v: PROTOCOL }, &path).await?;
    Ok(Some(OwnerConn {
        stream,
        job_pid: reply.job_pid,
        exit: reply.exit,
    }))
}

/// Sends one request on a connection of its own and returns the reply.
pub async fn request(dir: &JobDir, request: &Request) -> Result<Reply, ClientError> {
    let path = dir.socket();
    let mut stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
    exchange(&mut stream, request, &path).await
}

async fn exchange(
    stream: &mut tokio::net::UnixStream,
    request: &Request,
    path: &std::path::Path,
) -> Result<Reply, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut line = serde_json::to_vec(request).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).await.map_err(io)?;
    // Byte by byte up to the newline, so nothing after the reply is taken from the stream
    // (the caller keeps reading it to learn when the owner exits).
    let mut text = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        use tokio::io::AsyncReadExt;
        let n = stream.read(&mut byte).await.map_err(io)?;
        if n == 0 || byte[0] == b'\n' {
            break;
        }
        if text.len() as u64 >= MAX_REPLY {
            return Err(ClientError::BadReply {
                path: path.to_path_buf(),
                detail: format!("a reply longer than {MAX_REPLY} bytes"),
            });
        }
        text.push(byte[0]);
    }
    parse_reply(&text, path)
}
