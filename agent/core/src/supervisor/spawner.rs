//! The one thread that forks every job, and the registry of the children it forked.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not when the
//! process does. Tokio's blocking pool retires idle threads, and a runtime worker may be the
//! caller, so forking from whatever thread calls `Supervisor::start` would kill jobs at
//! random. Every fork therefore happens on a single std thread that is started once and then
//! lives as long as the process (the sender that feeds it sits in a static and is never
//! dropped). It enters the caller's runtime for the duration of each spawn, so tokio
//! registers the pipes and the child with that runtime's drivers and reaps the child itself.
//!
//! The registry of live children exists for the orphan reaper (see `procs`): as a subreaper
//! the agent inherits zombies of job descendants and must reap those, but must never reap a
//! child tokio is still waiting for. The registry lock is held across the fork, so the
//! reaper can never see a just-forked child before it is registered.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::mpsc;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use tokio::runtime::Handle;

/// Most pids of orphans kept for a later reaping attempt; beyond this they are left to
/// whoever becomes their parent after the agent (init), which is harmless.
const MAX_PENDING_REAP: usize = 4096;

/// How long `spawn` waits for the spawner thread. A fork takes milliseconds; this only
/// bounds the wait if the thread is wedged.
const SPAWN_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Direct children of this process that the supervisor knows about.
#[derive(Debug, Default)]
pub(super) struct Children {
    /// Job leaders forked by the spawner thread that tokio has not reaped yet. The orphan
    /// reaper never touches these.
    pub(super) live: HashSet<i32>,
    /// Job descendants that were still dying when their job's sweep stopped waiting, by pid,
    /// with their start time so that a reused pid is never mistaken for them.
    pub(super) pending_reap: HashMap<i32, u64>,
}

impl Children {
    pub(super) fn add_pending(&mut self, pid: i32, start_time: u64) {
        if self.pending_reap.len() < MAX_PENDING_REAP {
            self.pending_reap.insert(pid, start_time);
        }
    }
}

static CHILDREN: LazyLock<Mutex<Children>> = LazyLock::new(|| Mutex::new(Children::default()));

/// Locks the registry. Every update is a single insert or remove, so a panic while it was
/// held cannot have left it inconsistent, and poisoning is ignored.
pub(super) fn children() -> MutexGuard<'static, Children> {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tokio has reaped this child; its pid may be reused from now on.
pub(super) fn forget_child(pid: i32) {
    children().live.remove(&pid);
}

struct SpawnRequest {
    command: std::process::Command,
    runtime: Handle,
    reply: mpsc::SyncSender<io::Result<tokio::process::Child>>,
}

static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);

fn spawner() -> MutexGuard<'static, Option<mpsc::Sender<SpawnRequest>>> {
    SPAWNER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the spawner thread could not start a child.
#[derive(Debug, thiserror::Error)]
pub enum SpawnerError {
    #[error("cannot start the spawner thread")]
    Thread(#[source] io::Error),
    #[error("the spawner thread is gone")]
    Gone,
    #[error("the spawner thread did not answer within {0:?}")]
    NoReply(Duration),
    #[error("fork/exec failed")]
    Spawn(#[source] io::Error),
}

/// Starts the spawner thread unless it is running.
pub(super) fn ensure_started() -> Result<(), SpawnerError> {
    let mut slot = spawner();
    if slot.is_none() {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("rsql-spawner".into())
            .spawn(move || serve(rx))
            .map_err(SpawnerError::Thread)?;
        *slot = Some(tx);
    }
    Ok(())
}

fn serve(requests: mpsc::Receiver<SpawnRequest>) {
    while let Ok(request) = requests.recv() {
        let _runtime = request.runtime.enter();
        let mut command = tokio::process::Command::from(request.command);
        // A backstop only: the supervising task kills the whole group itself.
        command.kill_on_drop(true);
        let result = {
            let mut registry = children();
            let result = command.spawn();
            if let Ok(child) = &result {
                if let Some(pid) = child.id() {
                    registry.live.insert(pid as i32);
                }
            }
            result
        };
        // The requester may have given up waiting; then dropping the child kills it.
        let _ = request.reply.send(result);
    }
}

/// Forks and execs `command` on the spawner thread, registered with `runtime`.
pub(super) fn spawn(
    command: std::process::Command,
    runtime: Handle,
) -> Result<tokio::process::Child, SpawnerError> {
    ensure_started()?;
    let (reply, answer) = mpsc::sync_channel(1);
    let request = SpawnRequest {
        command,
        runtime,
        reply,
    };
    {
        let mut slot = spawner();
        let sent = slot.as_ref().is_some_and(|tx| tx.send(request).is_ok());
        if !sent {
            // The thread died (it cannot exit otherwise); the next call starts a new one.
            *slot = None;
            return Err(SpawnerError::Gone);
        }
    }
    match answer.recv_timeout(SPAWN_REPLY_TIMEOUT) {
        Ok(result) => result.map_err(SpawnerError::Spawn),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(SpawnerError::NoReply(SPAWN_REPLY_TIMEOUT)),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(SpawnerError::Gone),
    }
}
