//! A job under its own owner process: hand it over, watch it, report it; and adopt the jobs
//! an earlier agent left running.
//!
//! The life of one delivery from the agent's side:
//!
//! ```text
//!  locked ──prepare──▶ handed over ──owner exits──▶ finished ──outbox──▶ stored ──▶ acknowledged
//!                          ▲                            ▲
//!   adopted (at start) ────┘   exit record found ───────┘   (a dead owner: finished as Interrupted)
//! ```
//!
//! The outcome comes from the best record there is: the exit record (its file, or the
//! owner's last line on the socket), the lock state, the owner's "outcome lost" marker. Only
//! with none of them did the owner die. An owner that dies or hangs during the hand-over is
//! killed with everything its job started; one that stops answering past the job's timeout
//! (stopped, hung) is killed too, and the job reported `Rsql.Timeout`.
//!
//! While handed over, the agent only watches: heartbeats to Step Functions, the message kept
//! hidden, the log shipped to CloudWatch, a stop asked of the owner when the task closes. A
//! hand-off at shutdown ([`JobStop::HandOff`]) just stops watching; the next agent adopts.

use std::sync::Arc;

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::ack::{finish, finish_stored};
use super::prepare::{owner_env, prepare, running_record};

use super::adopt::{self, AdoptEffects, Adoption};

use super::audit::job_end_metrics;

use super::ending::{self, Ending, Leftovers, OwnerEffects, WatchAction};

use super::heartbeat::{heartbeat_loop, tick_for};

use super::delivery::Step;
use super::{failure, JobStop, Shared, Source};

use crate::intake::sqs::Delivery;

use crate::job::JobSpec;

use crate::job_owner::client::{self, OwnerConn};

use crate::job_owner::{ExitRecord, JobDir, JobFile, Request, PROTOCOL};
use crate::stop::StopReason;

use crate::joblog::cloudwatch::Shipment;

use crate::joblog::{self};

use crate::lock::{Acquire, JobLock};

use crate::outcome::{ErrorName, Outcome};

use crate::report::audit::JobAuditRecord;

use crate::report::outbox::OutboxEntry;

/// How long a freshly launched owner may take to open its socket.
const OWNER_START_TIMEOUT: Duration = Duration::from_secs(20);

/// After a dead owner's leftovers were killed, how long to wait for its lock to come free so
/// that the interruption can be recorded in the lock state.
const DEAD_OWNER_LOCK_WAIT: Duration = Duration::from_secs(5);

/// A delivery whose lock is held and whose decision is to run, as attempt `attempt`.
#[derive(Debug)]
pub(super) struct Locked {
    pub(super) spec: JobSpec,
    pub(super) token: String,
    pub(super) token_hash: String,
    pub(super) held: JobLock,
    pub(super) attempt: u32,
    /// The owner started while the task was checked ([`warm_up`]), if one was.
    pub(super) warm: Option<Warming>,
}

/// An owner being started for a job that is not decided yet (its task is being checked):
/// launched and connected to, but asked nothing. Whoever ends up not using it withdraws
/// it ([`Warm::withdraw`]): the owner then exits and runs nothing.
pub(super) type Warming = tokio::task::JoinHandle<Result<Warm, WarmError>>;

/// An owner up and listening for a job, not yet asked to start it.
#[derive(Debug)]
pub(super) struct Warm {
    job: JobFile,
    dir: JobDir,
    unit: Option<String>,
    stream: std::os::unix::net::UnixStream,
}

/// Why an owner could not be started, at the step it failed.
#[derive(Debug)]
pub(super) enum WarmError {
    /// Nothing was launched (the job's directory or file could not be written).
    NotStarted(String),
    /// The owner program could not be launched; the directory is removed.
    Launch(Box<JobFile>, String),
    /// The owner was launched but never opened its socket; it is being ended.
    Connect(Box<JobFile>, JobDir, String),
}

impl Warm {
    /// Whether the owner still waits on its connection: it sends nothing before the start
    /// request, so a readable connection means it closed (it gave up waiting, or died).
    fn still_waiting(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd for the call; a zero timeout never blocks.
        unsafe { libc::poll(&mut fd, 1, 0) == 0 }
    }

    /// The owner goes unused: closing its connection makes it exit without running
    /// anything; its directory and the log file made for it go too.
    pub(super) fn withdraw(self) {
        tracing::info!(job_dir = %self.dir.path().display(), "withdrew the owner started while the task was checked; it runs nothing");
        drop(self.stream);
        let _ = std::fs::remove_file(&self.job.log_file);
        self.dir.remove();
    }
}

/// Withdraws a warming owner whenever it is up (see [`discard`]), in the background.
pub(super) fn withdraw(warming: Warming) {
    tokio::spawn(async move { discard(warming.await) });
}

/// Leaves nothing of an owner started early that goes unused: a waiting owner is withdrawn
/// ([`Warm::withdraw`]), one that never opened its socket is killed, and the directory and
/// log file made for it go.
fn discard(warmed: Result<Result<Warm, WarmError>, tokio::task::JoinError>) {
    match warmed {
        Ok(Ok(warm)) => warm.withdraw(),
        Ok(Err(WarmError::Connect(job, dir, _))) => {
            kill_owner(&dir);
            let _ = std::fs::remove_file(&job.log_file);
            dir.remove();
        }
        Ok(Err(WarmError::Launch(job, _))) => {
            let _ = std::fs::remove_file(&job.log_file);
        }
        // Nothing was made (`warm_up` cleaned up), or the task panicked.
        Ok(Err(WarmError::NotStarted(_))) | Err(_) => {}
    }
}

/// Starts the owner of `job` (already prepared, see [`prepare`]): its directory and job
/// file, the launch, the connection to its socket; asks it nothing. Runs while the task
/// is checked, with the lock released: nothing here may be reported before the decision
/// to run is taken again under the lock (a copy that finds the job elsewhere withdraws).
pub(super) async fn warm_up(shared: Arc<Shared>, job: JobFile) -> Result<Warm, WarmError> {
    let dir = JobDir::new(shared.owners.dir.join(&job.launch.job_id));
    if let Err(e) = std::fs::create_dir(dir.path()).and_then(|()| {
        dir.write_job(&job)
            .map_err(|e| std::io::Error::other(crate::error_chain(&e)))
    }) {
        let reason = format!(
            "cannot write the job's owner directory {}: {e}",
            dir.path().display()
        );
        dir.remove();
        let _ = std::fs::remove_file(&job.log_file);
        return Err(WarmError::NotStarted(reason));
    }
    let launched = {
        let launcher = shared.owners.launcher.clone();
        let program = shared.owners.program.clone();
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || launcher.launch(&program, &dir, &owner_env())).await
    };
    let launched = match launched {
        Ok(result) => result.map_err(|e| crate::error_chain(&e)),
        Err(e) => Err(e.to_string()),
    };
    let unit = match launched {
        Ok(unit) => unit,
        Err(reason) => {
            dir.remove();
            return Err(WarmError::Launch(Box::new(job), reason));
        }
    };
    match client::connect(&dir, OWNER_START_TIMEOUT).await {
        Ok(stream) => Ok(Warm {
            job,
            dir,
            unit,
            stream,
        }),
        Err(e) => Err(WarmError::Connect(
            Box::new(job),
            dir,
            crate::error_chain(&e),
        )),
    }
}

/// Runs a job under a new owner, with its lock `held` and the decision to run taken, and
/// reports it. Failures before the job starts are reported as what they are.
pub(super) async fn run(
    shared: Arc<Shared>,
    source: Source,
    locked: Locked,
    shutdown: watch::Receiver<JobStop>,
) -> Step {
    let Locked {
        spec,
        token,
        token_hash,
        held,
        attempt,
        warm,
    } = locked;
    let env = match shared.database.job_env().await {
        Ok(env) => env,
        Err(e) => {
            if let Some(warm) = warm {
                withdraw(warm);
            }
            let outcome = failure(ErrorName::ConnectionFailed, e.to_string());
            tracing::error!(error = %e, "cannot get the database credentials");
            return finish(&shared, &source, Some(held), Some(&token), outcome, None).await;
        }
    };
    // The owner started while the task was checked, if it is for this attempt; otherwise
    // (none, another attempt, or it failed: a failure is only reported from a start made
    // under the lock) one is started now.
    let warm = match warm {
        Some(warming) => match warming.await {
            Ok(Ok(warm)) if warm.job.attempt == attempt && warm.still_waiting() => Some(warm),
            unusable => {
                discard(unusable);
                None
            }
        },
        None => None,
    };
    let warm = match warm {
        Some(warm) => Ok(warm),
        None => match prepare(&shared, &source, &spec, &token, &token_hash, attempt) {
            Ok(job) => warm_up(shared.clone(), job).await,
            Err(reason) => Err(WarmError::NotStarted(reason)),
        },
    };
    let Warm {
        job,
        dir,
        unit,
        stream,
    } = match warm {
        Ok(warm) => warm,
        Err(WarmError::NotStarted(reason)) => {
            return not_started(&shared, &source, held, &token, reason).await
        }
        Err(WarmError::Launch(job, reason)) => {
            return launch_failed(&shared, &source, held, &token, &job, reason).await
        }
        Err(WarmError::Connect(job, dir, reason)) => {
            tracing::error!(error = %reason, "cannot hand the job to its owner process; ending the owner and whatever it started");
            kill_owner(&dir);
            return report(shared, source, dir, *job, None, Ending::StartFailed(reason)).await;
        }
    };
    let record = running_record(&shared, &job);
    if let Err(e) = shared.attempts.audit.record_job(&record) {
        tracing::warn!(error = %e, "cannot write the local audit record");
    }
    let conn = match client::hand_over(stream, held, env, OWNER_START_TIMEOUT).await {
        Ok(conn) => conn,
        Err(e) => {
            // The lock went with the request, or is released with our copy. The owner may
            // have started the job and died (or hang, slower than the timeout): no process of
            // the job may outlive this, nor keep its lock. End the owner, then the job.
            let reason = crate::error_chain(&e);
            tracing::error!(error = %reason, "cannot hand the job to its owner process; ending the owner and whatever it started");
            kill_owner(&dir);
            return report(shared, source, dir, job, None, Ending::StartFailed(reason)).await;
        }
    };
    tracing::info!(
        attempt,
        job_pid = conn.job_pid,
        launcher = shared.owners.launcher.name(),
        unit = unit.as_deref().unwrap_or(""),
        log_file = %job.log_file.display(),
        "job started"
    );
    if let Some(table) = shared.audit_table.clone() {
        let outbox = shared.outbox.clone();
        tokio::spawn(async move {
            if let Err(e) = table.put(&record).await {
                // A late `running` can never overwrite the final status (the write is
                // conditional), so it may go through the outbox.
                tracing::warn!(error = %e, "audit `running` write failed; queued in the outbox");
                let _ = outbox.put(&OutboxEntry::new(None, None, Some(record)));
            }
        });
    }
    watch_job(shared, source, dir, job, Some(conn), shutdown, false).await
}

/// The owner program could not be launched: reported `Rsql.Interrupted` (nothing ran), its
/// audit begun and ended.
async fn launch_failed(
    shared: &Shared,
    source: &Source,
    held: JobLock,
    token: &str,
    job: &JobFile,
    reason: String,
) -> Step {
    let reason = format!("cannot start the job's owner process: {reason}");
    let outcome = failure(
        ErrorName::Interrupted,
        format!("the job was not started: {reason}"),
    );
    tracing::error!(reason = %reason, "the job could not be started");
    let record = final_record(shared, job, &outcome, None);
    if let Err(e) = shared.attempts.audit.record_job(&record) {
        tracing::warn!(error = %e, "cannot write the local audit record");
    }
    finish(
        shared,
        source,
        Some(held),
        Some(token),
        outcome,
        Some(record),
    )
    .await
}

/// A failure before the job started (a full disk, no owner program): reported as
/// `Rsql.Interrupted` (the workflow may retry; nothing ran), with what really happened.
async fn not_started(
    shared: &Shared,
    source: &Source,
    held: JobLock,
    token: &str,
    reason: String,
) -> Step {
    tracing::error!(reason = %reason, "the job could not be started");
    let outcome = failure(
        ErrorName::Interrupted,
        format!("the job was not started: {reason}"),
    );
    finish(shared, source, Some(held), Some(token), outcome, None).await
}

/// What an adopted job's directory says.
pub(super) enum Found {
    /// The owner is running; watch it.
    Running(JobDir, Box<JobFile>, OwnerConn),
    /// The owner is gone (finished or dead); report it.
    Gone(JobDir, Box<JobFile>),
    /// Not a job directory this agent can use (moved aside).
    Unusable,
}

/// Looks at one directory left by an earlier agent (the rule is `adopt::adopt`).
pub(super) async fn inspect(dir: &JobDir) -> Found {
    match adopt::adopt(&mut LiveDir(dir)).await {
        Adoption::Watch(job, conn) => Found::Running(dir.clone(), job, conn),
        Adoption::Report(job) => Found::Gone(dir.clone(), job),
        Adoption::Unusable => Found::Unusable,
    }
}

/// The side effects of adoption ([`AdoptEffects`]), for real.
struct LiveDir<'a>(&'a JobDir);

impl AdoptEffects for LiveDir<'_> {
    type Conn = OwnerConn;

    fn read_job(&mut self) -> Result<JobFile, String> {
        self.0.read_job().map_err(|e| crate::error_chain(&e))
    }

    fn move_aside(&mut self, why: &str) {
        tracing::error!(path = %self.0.path().display(), error = %why, "cannot read a job owner directory; moving it aside");
        let aside = self.0.path().with_extension("unreadable");
        let _ = std::fs::rename(self.0.path(), aside);
    }

    fn exit_recorded(&mut self) -> bool {
        self.0.exit_path().exists()
    }

    async fn attach(&mut self) -> Option<OwnerConn> {
        client::attach(self.0).await.ok().flatten()
    }

    fn owner_starting(&mut self) -> bool {
        self.0
            .read_owner()
            .ok()
            .flatten()
            .is_some_and(|o| o.is_alive() && o.job_pid.is_none())
    }
}

/// The source of an adopted job, rebuilt from its job file.
pub(super) fn source_of(job: &JobFile) -> Source {
    match &job.sqs {
        Some(r) => Source::Sqs(Delivery {
            message_id: r.message_id.clone(),
            receipt_handle: r.receipt_handle.clone(),
            body: String::new(),
            receive_count: r.receive_count,
            sent_at_ms: r.sent_at_ms,
        }),
        None => Source::Local,
    }
}

/// Watches a handed-over job until its owner exits (or, on [`JobStop::HandOff`], until this
/// agent stops watching), then reports it. `conn` is `None` when the owner is already gone.
pub(super) async fn watch_job(
    shared: Arc<Shared>,
    source: Source,
    dir: JobDir,
    job: JobFile,
    conn: Option<OwnerConn>,
    shutdown: watch::Receiver<JobStop>,
    adopted: bool,
) -> Step {
    let shipment = start_shipment(&shared, &job, adopted);
    // The owner writes the log in another process; keep housekeeping away from it here.
    let pin = joblog::pin(&job.log_file).ok();
    let ending = match conn {
        Some(conn) => {
            let ran = adopted.then(|| {
                humantime::parse_rfc3339(&job.started_at)
                    .ok()
                    .and_then(|started| started.elapsed().ok())
                    .unwrap_or_default()
            });
            let overdue = ending::overdue_in(&job, ran, OWNER_START_TIMEOUT);
            match watch_owner(&shared, &source, &dir, &job, conn, shutdown, overdue).await {
                Watched::HandedOff => return Step::HandedOff,
                Watched::Ended(exit) => Ending::Ended(exit),
                Watched::Overdue => Ending::Overdue,
            }
        }
        None => Ending::Ended(None),
    };
    let delivered = report(shared, source, dir, job, shipment, ending).await;
    drop(pin);
    delivered
}

/// Reports a job whose watch has ended: settles its outcome, audits it, stores it, and
/// removes its directory once stored.
async fn report(
    shared: Arc<Shared>,
    source: Source,
    dir: JobDir,
    job: JobFile,
    shipment: Option<Shipment>,
    ending: Ending,
) -> Step {
    let mut live = LiveOwner {
        shared: &shared,
        source: &source,
        dir: &dir,
        job: &job,
    };
    let Some((outcome, exit)) = ending::settle(&mut live, ending).await else {
        return Step::Left;
    };
    if let Some(shipment) = shipment {
        final_flush(&shared, shipment).await;
    }
    tracing::info!(
        status = outcome.status(),
        exit_code = outcome.exit_code(),
        duration_ms = exit.as_ref().map(|e| e.duration_ms),
        error = outcome.error_message(),
        "job finished"
    );
    job_end_metrics(
        &shared,
        (&job.workflow_id, &job.workflow_execution_id, &job.job_name),
        &outcome,
        exit.as_ref().map(|e| e.duration_ms),
        humantime::parse_rfc3339(&job.started_at)
            .ok()
            .and_then(|started| {
                crate::metrics::queue_wait_ms(job.sqs.as_ref().and_then(|r| r.sent_at_ms), started)
            }),
    );
    let record = final_record(&shared, &job, &outcome, exit.as_ref());
    if let Err(e) = shared.attempts.audit.record_job(&record) {
        tracing::warn!(error = %e, "cannot write the local audit record");
    }
    let delivered = store_known(&shared, &source, &job, outcome, record).await;
    if matches!(delivered, Step::Acknowledged(_)) {
        dir.remove();
    }
    delivered
}

/// How long the agent holds a known outcome in memory, trying again, when it cannot store it
/// (a full `state_dir`), before it leaves the message to come back.
const HOLD_IN_MEMORY_FOR: Duration = Duration::from_secs(600);

/// How often it tries again meanwhile (the message kept hidden, the task heartbeated).
const HOLD_RETRY: Duration = Duration::from_secs(2);

/// Stores the job's outcome and deletes its message. When the outbox cannot take it, the
/// outcome may be known nowhere else (the owner could write neither its exit record nor the
/// lock state): hold it here, keeping the message hidden and the task alive, and try again
/// for up to [`HOLD_IN_MEMORY_FOR`], rather than leave a redelivery to call the job
/// interrupted.
async fn store_known(
    shared: &Shared,
    source: &Source,
    job: &JobFile,
    outcome: Outcome,
    record: JobAuditRecord,
) -> Step {
    let token = match outcome {
        Outcome::Cancelled { .. } => None,
        _ => Some(job.task_token.as_str()),
    };
    let until = tokio::time::Instant::now() + HOLD_IN_MEMORY_FOR;
    loop {
        let delivered = finish_stored(
            shared,
            source,
            token,
            outcome.clone(),
            Some(record.clone()),
            Some(job.outbox_id.clone()),
        )
        .await;
        if !matches!(delivered, Step::Left) || tokio::time::Instant::now() >= until {
            return delivered;
        }
        tracing::warn!(
            "the job's outcome cannot be stored yet; holding it in memory and trying again"
        );
        if let Some(token) = token {
            if let Err(e) = shared.sfn.heartbeat(token).await {
                tracing::warn!(error = %e, "heartbeat while holding the outcome failed");
            }
        }
        if let (Source::Sqs(message), Some(sqs)) = (source, &shared.sqs) {
            if let Err(e) = sqs.keep_hidden(&message.receipt_handle).await {
                tracing::warn!(error = %e, "cannot extend the message's visibility");
            }
        }
        tokio::time::sleep(HOLD_RETRY).await;
    }
}

fn read_exit(dir: &JobDir) -> Option<ExitRecord> {
    match dir.read_exit() {
        Ok(exit) => exit,
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "the job's exit record cannot be read");
            None
        }
    }
}

/// The outcome this very attempt recorded in the lock state (the owner writes it there as
/// well as in its exit record), if it did.
fn recorded_in_lock(shared: &Shared, job: &JobFile) -> Option<Outcome> {
    let state = shared.attempts.locks.read_state(&job.lock_key).ok()??;
    (state.is_final()
        && state.token_hash == job.token_hash
        && state.attempt == job.attempt
        && state.outcome.is_some())
    .then(|| super::delivery::recorded_outcome(&state))
}

/// Starts shipping the job's log to CloudWatch (resuming where an earlier agent left off
/// for an adopted job); `None` without CloudWatch or when it cannot start.
fn start_shipment(shared: &Shared, job: &JobFile, adopted: bool) -> Option<Shipment> {
    let (Some(shipper), Some(stream)) = (&shared.shipper, &job.log_stream) else {
        return None;
    };
    let started = if adopted {
        shipper.resume(&job.log_file, stream)
    } else {
        shipper.start(&job.log_file, stream)
    };
    match started {
        Ok(shipment) => Some(shipment),
        Err(e) => {
            tracing::warn!(error = %e, "cannot ship the job's log to CloudWatch");
            None
        }
    }
}

/// `on_interrupted = "rerun"` after the owner died: the lock state still says `running`
/// under this token, so the message, made visible again now, runs the job again once the
/// leftovers are gone and the lock is free.
async fn requeue_for_rerun(shared: &Shared, source: &Source, dir: &JobDir) {
    kill_leftovers(shared, dir).await;
    if let (Source::Sqs(message), Some(sqs)) = (source, &shared.sqs) {
        tracing::warn!(
            "the job's owner process died; running the job again (on_interrupted = \"rerun\")"
        );
        if let Err(e) = sqs.release(&message.receipt_handle, Duration::ZERO).await {
            tracing::warn!(error = %e, "cannot return the message; it comes back after its visibility timeout");
        }
    }
    dir.remove();
}

/// Gives the job's shipment up to `final_flush_timeout` to catch up; the rest keeps shipping
/// in the background.
async fn final_flush(shared: &Shared, shipment: Shipment) {
    let flush = shared
        .config
        .cloudwatch
        .as_ref()
        .map(|c| c.final_flush_timeout)
        .unwrap_or_default();
    if !shipment.finish(flush).await {
        tracing::warn!("the job's log is not all shipped after the final flush timeout; the rest keeps shipping in the background");
    }
}

/// How a watch of a running owner ended.
enum Watched {
    /// The owner exited, with the exit record it sent last, if any.
    Ended(Option<ExitRecord>),
    /// The agent hands the job off to the next agent.
    HandedOff,
    /// The owner is still there past the job's time limit and every grace.
    Overdue,
}

/// Watches a running owner: heartbeats and message visibility every tick, a stop asked of
/// the owner when the task closes or the agent says so, until the owner exits, the agent
/// hands the job off, or the owner is overdue (stopped or hung: time stands still for it).
async fn watch_owner(
    shared: &Arc<Shared>,
    source: &Source,
    dir: &JobDir,
    job: &JobFile,
    mut conn: OwnerConn,
    mut shutdown: watch::Receiver<JobStop>,
    overdue: Duration,
) -> Watched {
    let tick = tick_for(
        job.heartbeat_ms.map(Duration::from_millis),
        shared.attempts.live().jobs.heartbeat_interval,
        match (source, &shared.sqs) {
            (Source::Sqs(_), Some(sqs)) => sqs.visibility_timeout(),
            _ => Duration::MAX,
        },
    );
    let (closed_tx, mut closed_rx) = mpsc::channel::<()>(1);
    let heartbeats = heartbeat_loop(shared, &job.task_token, source, tick, closed_tx);
    tokio::pin!(heartbeats);
    let mut stops_sent = 0u32;
    let mut shutdown_open = true;
    // One future for the whole watch: it keeps what it has read of the owner's last line.
    let closed = conn.closed();
    tokio::pin!(closed);
    let overdue = tokio::time::sleep(overdue);
    tokio::pin!(overdue);
    loop {
        let stop = *shutdown.borrow_and_update();
        let wanted = match ending::on_stop(stop, || matches!(dir.read_exit(), Ok(Some(_)))) {
            WatchAction::Watch { stops } => stops,
            WatchAction::Report => return Watched::Ended(None),
            WatchAction::HandOff => {
                tracing::info!("handing the job off: it keeps running under its owner; the next agent adopts it");
                return Watched::HandedOff;
            }
        };
        while stops_sent < wanted {
            ask_stop(dir, StopReason::Interrupted).await;
            stops_sent += 1;
        }
        tokio::select! {
            exit = &mut closed => return Watched::Ended(exit),
            () = &mut overdue => return Watched::Overdue,
            _ = &mut heartbeats => {}
            Some(()) = closed_rx.recv() => ask_stop(dir, StopReason::Cancelled).await,
            // Nobody can stop this watch any more once the sender is gone; keep watching.
            changed = shutdown.changed(), if shutdown_open => shutdown_open = changed.is_ok(),
        }
    }
}

/// How long a stop request may wait for the owner's answer: a stopped owner never answers,
/// and the watch must go on (its overdue backstop ends the job).
const ASK_STOP_TIMEOUT: Duration = Duration::from_secs(5);

async fn ask_stop(dir: &JobDir, reason: StopReason) {
    let stop = Request::Stop {
        v: PROTOCOL,
        reason,
    };
    match tokio::time::timeout(ASK_STOP_TIMEOUT, client::request(dir, &stop)).await {
        Ok(Ok(_)) => tracing::info!(?reason, "asked the job's owner to stop the job"),
        Ok(Err(e)) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot ask the job's owner to stop the job")
        }
        Err(_) => tracing::warn!(
            waited = ?ASK_STOP_TIMEOUT,
            "the job's owner does not answer a stop request"
        ),
    }
}

/// SIGKILLs the owner of `dir` if it still runs (same pid and start time): an owner that
/// hangs or is stopped gets no say any more.
fn kill_owner(dir: &JobDir) {
    let Some(owner) = dir.read_owner().ok().flatten() else {
        return;
    };
    if owner.is_alive() {
        tracing::warn!(owner_pid = owner.pid, "killing the job's owner process");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(owner.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Records `outcome` in the lock state of this attempt, once the lock is free (the job's
/// leftovers, just killed, keep it until they are gone); a record of another attempt, or
/// one already final, is left alone.
async fn record_under_lock(shared: &Shared, job: &JobFile, outcome: &Outcome) {
    let deadline = tokio::time::Instant::now() + DEAD_OWNER_LOCK_WAIT;
    loop {
        match shared.attempts.locks.try_acquire(&job.lock_key) {
            Ok(Acquire::Acquired(mut held)) => {
                let mut state = match held.previous() {
                    Some(p) if p.token_hash == job.token_hash && !p.is_final() => p.clone(),
                    // Someone else's record (a later attempt), or already final: leave it.
                    _ => break,
                };
                crate::attempt::record_outcome(&mut state, outcome);
                if let Err(e) = held.write_state(&state) {
                    tracing::warn!(error = %e, "cannot record the job's outcome in the lock state");
                }
                let _ = held.release();
                break;
            }
            Ok(Acquire::Busy { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Acquire::Busy { .. }) => {
                tracing::warn!("the job's lock is still held; its leftovers keep it until they die, so no retry can overlap them");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot take the job's lock to record the job's outcome");
                break;
            }
        }
    }
}

/// Kills what is left of a job whose owner died (its processes carry the owner's identity);
/// returns the owner's record and how many processes were killed.
async fn kill_leftovers(
    shared: &Shared,
    dir: &JobDir,
) -> (Option<crate::job_owner::OwnerRecord>, usize) {
    let owner = dir.read_owner().ok().flatten();
    tracing::error!(
        owner_pid = owner.as_ref().map(|o| o.pid),
        "the job's owner process died before recording the job's exit; killing what is left of the job"
    );
    // Its socket closes while the kernel is still tearing the process down; the sweep below
    // spares processes whose owner looks alive, so wait until it no longer does.
    if let Some(owner) = &owner {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while owner.is_alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let leftovers = dir.clone();
    // Only through a cgroup under the configured parent (or the job's unit): see
    // `job_owner::kill_leftovers`.
    let parent = shared.attempts.live().jobs.cgroup_parent.clone();
    let killed = tokio::task::spawn_blocking(move || {
        crate::job_owner::kill_leftovers(&leftovers, parent.as_deref())
    })
    .await
    .unwrap_or(0);
    (owner, killed)
}

/// The side effects of ending a job ([`OwnerEffects`]), for real.
struct LiveOwner<'a> {
    shared: &'a Shared,
    source: &'a Source,
    dir: &'a JobDir,
    job: &'a JobFile,
}

impl OwnerEffects for LiveOwner<'_> {
    fn read_exit(&mut self) -> Option<ExitRecord> {
        read_exit(self.dir)
    }

    fn recorded_in_lock(&mut self) -> Option<Outcome> {
        recorded_in_lock(self.shared, self.job)
    }

    fn outcome_lost(&mut self) -> bool {
        self.dir.outcome_lost()
    }

    fn rerun(&self) -> bool {
        self.shared.attempts.live().jobs.on_interrupted == crate::lock::OnInterrupted::Rerun
            && matches!(self.source, Source::Sqs(_))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.job.launch.timeout_ms)
    }

    async fn kill_leftovers(&mut self) -> Leftovers {
        let (owner, killed) = kill_leftovers(self.shared, self.dir).await;
        Leftovers {
            owner_pid: owner.as_ref().map(|o| o.pid),
            job_started: owner.as_ref().is_some_and(|o| o.job_pid.is_some()),
            killed,
        }
    }

    /// The owner is overdue (stopped or hung, so the job's own timeout never fires): end it
    /// and every process of the job.
    async fn kill_overdue(&mut self) -> usize {
        kill_owner(self.dir);
        kill_leftovers(self.shared, self.dir).await.1
    }

    async fn record_under_lock(&mut self, outcome: &Outcome) {
        record_under_lock(self.shared, self.job, outcome).await
    }

    async fn requeue_for_rerun(&mut self) {
        requeue_for_rerun(self.shared, self.source, self.dir).await
    }
}

fn final_record(
    shared: &Shared,
    job: &JobFile,
    outcome: &Outcome,
    exit: Option<&ExitRecord>,
) -> JobAuditRecord {
    running_record(shared, job).finished(
        outcome,
        exit.map(|e| e.ended_at.clone())
            .unwrap_or_else(crate::workflow::now_ts),
        exit.map(|e| e.duration_ms),
    )
}

/// The token hash of an adopted job, for its log span.
pub(super) fn span_for(job: &JobFile) -> tracing::Span {
    tracing::info_span!(
        "job",
        job_name = %job.job_name,
        workflow_execution_id = %job.workflow_execution_id,
        token_hash = %job.token_hash,
    )
}
