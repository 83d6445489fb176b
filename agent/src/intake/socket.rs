//! The local socket intake: `rsql-wrapper submit` (SSM Run Command) hands jobs to the
//! running agent over a Unix stream socket at `[intake.socket] path`.
//!
//! Owns: the socket file (its directory is created, a stale socket from an earlier run is
//! replaced, the file is mode 0660), checking the peer with `SO_PEERCRED`, reading one job per
//! connection (at most [`MAX_MESSAGE_BYTES`], ended by a newline or by the client closing its
//! write side, within [`READ_DEADLINE`]) and the one-line JSON reply:
//! `{"accepted":true,"job_name":..,"token_hash":..}` or
//! `{"accepted":false,"error":"..","retryable":bool}`.
//!
//! The reply comes within a second: the job is validated before the reply, then it runs under
//! the daemon's supervision (a job task of its own), not under the connection.
//!
//! Who may submit:
//! - root and the agent's own uid, always (either could rewrite the agent's config anyway);
//! - any uid in `allowed_uids`;
//! - a peer whose primary gid or any supplementary group (read from
//!   `/proc/<pid>/status`, `Groups:`) is one of `allowed_groups` (names, or numeric gids).
//!
//! Anyone else is refused with the reason, and the refusal is logged with the peer's uid and
//! pid. `SO_PEERCRED` is the gate. The file mode only decides who can connect at all: 0660
//! (the agent's user and group) when `allowed_uids` and `allowed_groups` are both empty, else
//! 0666, so that every listed uid and group can reach the check (a listed uid outside the
//! agent's group would otherwise get EACCES before the agent could say anything).
//!
//! The socket's directory and every directory above it must be writable by nobody but root
//! and the agent's user (see `trust`), or [`SocketIntake::bind`] refuses: whoever can write
//! the directory can rename the socket and listen in its place, and receive task tokens.
//!
//! At most [`max_connections`] connections are served at once (the fd budget: a quarter of
//! the open-file limit, at most [`MAX_CONNECTIONS`]); a connection over the cap is answered
//! `busy` and closed at once, so a flood of idle connections cannot take the fds the SQS
//! intake, the job owners and the log files need.
//!
//! A valid job with no free job slot: the connection waits up to [`BUSY_WAIT`] for one, then
//! is refused with `busy` (`retryable: true`); nothing is queued behind the submitter's back.
//!
//! Must not touch: job parsing rules, locks, running or reporting; the daemon supplies the
//! validation ([`Validate`]) and runs what is accepted.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::config::SocketSettings;
use crate::job::{JobSpec, MAX_MESSAGE_BYTES};

/// The most socket connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// The connection cap: a quarter of the soft open-file limit (the rest is the budget of the
/// SQS intake, the job owners, the log files and the AWS clients), at most
/// [`MAX_CONNECTIONS`], at least 4.
pub fn max_connections() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    ((soft / 4) as usize).clamp(4, MAX_CONNECTIONS)
}

/// How long a client has to send its job.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long a valid job waits for a free slot before it is refused as busy.
pub const BUSY_WAIT: Duration = Duration::from_millis(500);
const BUSY_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create the socket directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("another process is listening on {path}")]
    InUse { path: PathBuf },
    #[error(
        "refusing the socket directory: {0} (whoever can write it can listen in the agent's place)"
    )]
    Untrusted(#[source] crate::trust::Untrusted),
    #[error("cannot bind the socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The process at the other end of a connection, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Turns a job body into a runnable job, or the reason it is not one. Supplied by the
/// daemon, which also reports a broken job that carries a token.
pub type Validate = Arc<dyn Fn(&[u8], &Peer) -> Result<JobSpec, String> + Send + Sync>;

/// A validated job waiting for the daemon to take a slot for it.
#[derive(Debug)]
pub struct Submission {
    pub spec: JobSpec,
    pub peer: Peer,
    pub reply: oneshot::Sender<SubmitReply>,
}

/// The daemon's answer to a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitReply {
    Accepted {
        job_name: String,
        token_hash: String,
    },
    /// No free job slot.
    Busy,
    ShuttingDown,
}

/// The bound socket, ready to [`serve`](SocketIntake::serve).
#[derive(Debug)]
pub struct SocketIntake {
    listener: UnixListener,
    settings: SocketSettings,
}

impl SocketIntake {
    /// Binds the socket at `settings.path`. Must be called inside a Tokio runtime.
    pub fn bind(settings: &SocketSettings) -> Result<SocketIntake, SocketError> {
        let path = &settings.path;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| SocketError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
            crate::trust::check(dir, &crate::trust::trusted_uids())
                .map_err(SocketError::Untrusted)?;
        }
        remove_stale(path)?;
        let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
            path: path.clone(),
            source,
        })?;
        let mode = if settings.allowed_uids.is_empty() && settings.allowed_groups.is_empty() {
            0o660
        } else {
            0o666
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| SocketError::Bind {
                path: path.clone(),
                source,
            },
        )?;
        Ok(SocketIntake {
            listener,
            settings: settings.clone(),
        })
    }

    /// Accepts connections until the task is aborted; each is served by a task of its own.
    pub async fn serve(self, validate: Validate, submit: mpsc::Sender<Submission>) {
        let settings = Arc::new(self.settings);
        let own_uid = nix::unistd::getuid().as_raw();
        let cap = max_connections();
        let slots = Arc::new(tokio::sync::Semaphore::new(cap));
        let mut last_warned: Option<tokio::time::Instant> = None;
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        // Answered and closed here, without a task: the fd is gone at once.
                        // Said at most every 10 s: a flood must not flood the log too.
                        if last_warned.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                            last_warned = Some(tokio::time::Instant::now());
                            tracing::warn!(
                                cap,
                                "refusing socket connections: {cap} are already open"
                            );
                        }
                        let line = format!(
                            "{}\n",
                            rejected(
                                &format!(
                                    "busy: {cap} connections are already open; try again later"
                                ),
                                true
                            )
                        );
                        let _ = stream.try_write(line.as_bytes());
                        drop(stream);
                        continue;
                    };
                    let settings = settings.clone();
                    let validate = validate.clone();
                    let submit = submit.clone();
                    tokio::spawn(async move {
                        connection(stream, &settings, own_uid, validate, submit).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a socket connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Removes a socket file left by an earlier run; refuses to touch anything else, or a socket
/// someone still listens on.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(SocketError::InUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(|source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

async fn connection(
    mut stream: UnixStream,
    settings: &SocketSettings,
    own_uid: u32,
    validate: Validate,
    submit: mpsc::Sender<Submission>,
) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the peer credentials of a socket connection; refusing it");
            reply(
                &mut stream,
                rejected("cannot read the peer credentials", false),
            )
            .await;
            return;
        }
    };
    if let Err(reason) = authorize(&peer, settings, own_uid) {
        tracing::warn!(
            uid = peer.uid,
            gid = peer.gid,
            pid = peer.pid,
            reason = %reason,
            "refused a socket submission from an unauthorized peer"
        );
        reply(
            &mut stream,
            rejected(&format!("not authorized: {reason}"), false),
        )
        .await;
        return;
    }
    let body = match tokio::time::timeout(READ_DEADLINE, read_job(&mut stream)).await {
        Ok(Ok(body)) => body,
        Ok(Err(reason)) => {
            tracing::warn!(uid = peer.uid, pid = peer.pid, reason = %reason, "rejected a socket submission");
            reply(&mut stream, rejected(&reason, false)).await;
            return;
        }
        Err(_) => {
            let reason = format!("no complete job within {}s", READ_DEADLINE.as_secs());
            tracing::warn!(uid = peer.uid, pid = peer.pid, reason = %reason, "rejected a socket submission");
            reply(&mut stream, rejected(&reason, false)).await;
            return;
        }
    };
    let spec = match validate(&body, &peer) {
        Ok(spec) => spec,
        Err(reason) => {
            reply(&mut stream, rejected(&reason, false)).await;
            return;
        }
    };
    let answer = hand_over(spec, peer, &submit).await;
    let line = match answer {
        SubmitReply::Accepted {
            job_name,
            token_hash,
        } => {
            tracing::info!(
                uid = peer.uid,
                pid = peer.pid,
                job_name = %job_name,
                token_hash = %token_hash,
                "accepted a socket submission"
            );
            json!({"accepted": true, "job_name": job_name, "token_hash": token_hash})
        }
        SubmitReply::Busy => {
            tracing::warn!(
                uid = peer.uid,
                pid = peer.pid,
                "refused a socket submission: no free job slot"
            );
            rejected("busy: every job slot is taken; try again later", true)
        }
        SubmitReply::ShuttingDown => rejected("the agent is shutting down", true),
    };
    reply(&mut stream, line).await;
}

/// Offers the job to the daemon until a slot is free or [`BUSY_WAIT`] is over.
async fn hand_over(spec: JobSpec, peer: Peer, submit: &mpsc::Sender<Submission>) -> SubmitReply {
    let deadline = tokio::time::Instant::now() + BUSY_WAIT;
    loop {
        let (tx, rx) = oneshot::channel();
        let submission = Submission {
            spec: spec.clone(),
            peer,
            reply: tx,
        };
        if submit.send(submission).await.is_err() {
            return SubmitReply::ShuttingDown;
        }
        // Always answered: by the main loop, or by its shutdown (which drains what is
        // queued, or drops it). No timeout here, so a job is never both started and
        // reported busy.
        let Ok(answer) = rx.await else {
            return SubmitReply::ShuttingDown;
        };
        if answer != SubmitReply::Busy || tokio::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(BUSY_POLL).await;
    }
}

/// Reads one job: up to the first newline or the end of the stream, at most
/// [`MAX_MESSAGE_BYTES`].
async fn read_job(stream: &mut UnixStream) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let limit = MAX_MESSAGE_BYTES as u64 + 1;
    let mut reader = BufReader::new(&mut *stream).take(limit);
    reader
        .read_until(b'\n', &mut body)
        .await
        .map_err(|e| format!("cannot read the job: {e}"))?;
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "the job is more than the {MAX_MESSAGE_BYTES}-byte limit"
        ));
    }
    while body.last().is_some_and(|b| b.is_ascii_whitespace()) {
        body.pop();
    }
    if body.is_empty() {
        return Err("empty submission: send one JSON job".to_string());
    }
    Ok(body)
}

fn rejected(error: &str, retryable: bool) -> serde_json::Value {
    json!({"accepted": false, "error": error, "retryable": retryable})
}

async fn reply(stream: &mut UnixStream, value: serde_json::Value) {
    let mut line = value.to_string();
    line.push('\n');
    if let Err(e) = stream.write_all(line.as_bytes()).await {
        tracing::debug!(error = %e, "cannot write the reply to a socket submitter");
    }
    let _ = stream.shutdown().await;
}

/// Whether `peer` may submit jobs; the error is the reason it may not.
pub fn authorize(peer: &Peer, settings: &SocketSettings, own_uid: u32) -> Result<(), String> {
    if peer.uid == 0 || peer.uid == own_uid || settings.allowed_uids.contains(&peer.uid) {
        return Ok(());
    }
    let allowed = allowed_gids(&settings.allowed_groups);
    if !allowed.is_empty() {
        let mut groups = vec![peer.gid];
        if let Some(pid) = peer.pid {
            groups.extend(supplementary_groups(pid));
        }
        if groups.iter().any(|g| allowed.contains(g)) {
            return Ok(());
        }
    }
    Err(format!(
        "uid {} (pid {}) is not in [intake.socket] allowed_uids, nor in any of allowed_groups {:?}",
        peer.uid,
        peer.pid.map_or_else(|| "?".to_string(), |p| p.to_string()),
        settings.allowed_groups
    ))
}

/// The gids of `allowed_groups`: names resolved now (so a group created later counts), or
/// numbers as given. An unknown name matches nobody.
fn allowed_gids(names: &[String]) -> HashSet<u32> {
    names
        .iter()
        .filter_map(|name| match name.parse::<u32>() {
            Ok(gid) => Some(gid),
            Err(_) => match nix::unistd::Group::from_name(name) {
                Ok(Some(group)) => Some(group.gid.as_raw()),
                _ => {
                    tracing::debug!(group = %name, "allowed group is not known on this host");
                    None
                }
            },
        })
        .collect()
}

/// The supplementary groups of a process, from `/proc/<pid>/status`.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    parse_groups(&status)
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(uids: Vec<u32>, groups: Vec<&str>) -> SocketSettings {
        SocketSettings {
            path: PathBuf::from("/nonexistent/agent.sock"),
            allowed_uids: uids,
            allowed_groups: groups.into_iter().map(String::from).collect(),
        }
    }

    #[test]
    fn root_own_uid_and_listed_uids_are_allowed() {
        let s = settings(vec![1000], vec![]);
        let peer = |uid| Peer {
            uid,
            gid: 4242,
            pid: None,
        };
        assert!(authorize(&peer(0), &s, 999).is_ok());
        assert!(authorize(&peer(999), &s, 999).is_ok());
        assert!(authorize(&peer(1000), &s, 999).is_ok());
        let err = authorize(&peer(1001), &s, 999).unwrap_err();
        assert!(err.contains("uid 1001"), "{err}");
    }

    #[test]
    fn groups_match_by_primary_gid_or_number() {
        let s = settings(vec![], vec!["4242", "no-such-group-here"]);
        let peer = Peer {
            uid: 5000,
            gid: 4242,
            pid: None,
        };
        assert!(authorize(&peer, &s, 999).is_ok());
        let other = Peer { gid: 1, ..peer };
        assert!(authorize(&other, &s, 999).is_err());
    }

    #[test]
    fn groups_line_is_parsed() {
        let status = "Name:\tbash\nGid:\t0\t0\t0\t0\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27]);
        assert!(parse_groups("Name: x\n").is_empty());
    }
}
