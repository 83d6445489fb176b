//! The resident daemon: wires intake, locks, the supervisor and the reporters together.
//!
//! Owns: the receive loop (only as many messages as there are free job slots), the life of
//! one delivery (parse → lock decision → run with heartbeats → outcome in the outbox →
//! delete the message → unlock), heartbeats and cancellation, and the order of shutdown.
//! A job from the local socket (`intake::socket`) takes a slot in the same loop and runs the
//! same path; only its acknowledgement differs (the reply to its submitter, no SQS calls).
//! [`Daemon::run_one`] runs that same path for one job with no intake at all, and delivers
//! its report before returning: `rsql-wrapper run`, for hosts without the daemon.
//!
//! Must not touch: how a process is supervised, how a log is written, or how a report is
//! retried; those belong to `supervisor`, `joblog` and `report`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

pub mod control;
mod delivery;
mod owned;

use crate::attempt::{Acquired, AttemptContext, AttemptError};
use crate::aws::retry::RetryPolicy;
use crate::aws::AwsClients;
use crate::config::Config;
use crate::error_chain;
use crate::fleet::{Fleet, FleetParts, Load, Notice};
use crate::intake::socket::{self, SocketError, Submission, SubmitReply};
use crate::intake::sqs::{Delivery, SqsError, SqsIntake};
use crate::job::{InvalidJob, JobRules, JobSpec};
use crate::joblog::cloudwatch::{Shipper, ShipperError};
use crate::lock::{self, Decision, JobLock, LockState};
use crate::notify::{Notifier, Status};
use crate::outcome::{ErrorName, Failure, FailureCause, Outcome};
use crate::owner::{OwnerError, StateDirOwner};
use crate::reload;
use crate::report::audit::dynamodb::JobAuditTable;
use crate::report::audit::JobAuditRecord;
use crate::report::outbox::{Callback, Outbox, OutboxEntry, OutboxError};
use crate::report::stepfunctions::StepFunctions;
use crate::secrets::DatabaseEnv;
use crate::signals::{Control, Controls};
use crate::slots::Slots;

/// Heartbeats go out at a third of the task's `HeartbeatSeconds`, within these bounds.
const MIN_TICK: Duration = Duration::from_secs(1);
const MAX_TICK: Duration = Duration::from_secs(300);
/// How often old job logs and finished lock entries are cleaned up.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(3600);
/// How long to wait before asking again whether a task is really closed.
const CLOSED_RECHECK: Duration = Duration::from_secs(2);
/// A stop (SIGTERM) ends the process within this bound: jobs are handed off, the outbox
/// gets what time is left, and what it could not deliver goes out after the next start.
pub const HAND_OFF_BOUND: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no intake is configured: set [intake.sqs] queue_url or [intake.socket]")]
    NoIntake,
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Attempt(#[from] AttemptError),
    #[error(transparent)]
    Shipper(#[from] ShipperError),
    #[error(transparent)]
    Owner(#[from] OwnerError),
    #[error("jobs cannot run as [jobs] user")]
    JobUser(#[source] crate::supervisor::JobUserError),
    #[error("cannot create the job owners' directory under {path}")]
    OwnersDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`Daemon::run_one`] did with its job.
// One per job, moved a handful of times: an `Outcome` by value costs nothing measurable.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum OneJob {
    /// The job ran, or its recorded outcome was replayed, and this is the outcome.
    /// `delivered`: its callback and audit went out before the report timeout; when not, they
    /// stay in the outbox and go out after the next start of the agent or of a standalone run.
    /// `stopped`: a stop request (a signal) arrived while it ran.
    Finished {
        outcome: Outcome,
        delivered: bool,
        stopped: bool,
    },
    /// The job was not valid. When it carried a task token its task was failed with
    /// `Rsql.InvalidJob` (`delivered` says whether that callback went out in time).
    Rejected {
        reason: String,
        failed_task: bool,
        delivered: bool,
    },
    /// Another runner holds the job's lock; that runner reports it.
    RunningElsewhere { holder: String },
    /// The outcome could not be stored durably (the log says why); nothing was reported.
    NotStored,
}

/// What became of one delivery, for [`Daemon::run_one`]; the loop does not need it.
// As for `OneJob`: one per job.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Delivered {
    /// The outcome is durable: in the outbox when there was anything to send.
    Stored(Outcome),
    /// Another runner holds the job's lock.
    Elsewhere(String),
    /// Nothing was stored: an SQS message is left to come back; the log says why.
    Left,
    /// The job keeps running under its owner process; the next agent adopts it.
    HandedOff,
}

/// Everything one delivery needs; shared by all job tasks.
#[derive(Debug)]
struct Shared {
    config: Arc<Config>,
    attempts: Arc<AttemptContext>,
    sfn: StepFunctions,
    audit_table: Option<JobAuditTable>,
    outbox: Outbox,
    /// `None` when the agent takes jobs from its socket only.
    sqs: Option<SqsIntake>,
    database: DatabaseEnv,
    /// Ships job logs to CloudWatch; `None` without `[logs.cloudwatch]`.
    shipper: Option<Shipper>,
    /// Where job owner processes keep their files, and how they are started.
    owners: owned::Owners,
    /// This process's claim on `state_dir`, held for the daemon's life.
    _owner: StateDirOwner,
    /// Job-end and gauge metrics; set by [`Daemon::run`] when `[logs.cloudwatch]` is set
    /// and `[metrics] enabled` (a standalone run writes none).
    metrics: std::sync::OnceLock<crate::metrics::Metrics>,
}

impl Shared {
    /// Parses a job message under the live rules; every intake parses the same way.
    fn parse_job(&self, body: &[u8]) -> Result<JobSpec, InvalidJob> {
        let rules = JobRules {
            script_dir: &self.config.jobs.script_dir,
            default_timeout: self.attempts.live().jobs.default_timeout,
            require_token: true,
        };
        JobSpec::parse(body, &rules)
    }
}

/// The daemon, built once: clients, outbox and context are reused by every job.
#[derive(Debug)]
pub struct Daemon {
    shared: Arc<Shared>,
    policy: RetryPolicy,
    notifier: Notifier,
    /// Scale-in and Spot handling; only the resident daemon has it.
    fleet: Option<FleetParts>,
}

/// The heartbeat period for a job: a third of its `heartbeat_seconds`, or the configured
/// interval when the message has none, and never longer than a third of the visibility
/// timeout (the same tick keeps the message hidden).
pub fn tick_for(
    heartbeat: Option<Duration>,
    configured: Duration,
    visibility: Duration,
) -> Duration {
    let tick = match heartbeat {
        Some(hb) => (hb / 3).clamp(MIN_TICK, MAX_TICK),
        None => configured,
    };
    tick.min((visibility / 3).max(MIN_TICK))
}

impl Daemon {
    /// The resident daemon: needs an intake (SQS, the socket, or both).
    pub fn new(
        config: Arc<Config>,
        attempts: Arc<AttemptContext>,
        clients: &AwsClients,
    ) -> Result<Daemon, DaemonError> {
        if config.sqs.is_none() && config.socket.is_none() {
            return Err(DaemonError::NoIntake);
        }
        let fleet = FleetParts {
            settings: config.fleet.clone(),
            instance_id: attempts.instance_id.clone(),
            autoscaling: clients.autoscaling.clone(),
        };
        let mut daemon = Daemon::standalone(config, attempts, clients, "rsql-agent run")?;
        daemon.fleet = Some(fleet);
        Ok(daemon)
    }

    /// For [`Daemon::run_one`]: the same parts, with no intake needed (any configured one
    /// is ignored). `role` names this process in the state directory's owner lock.
    pub fn standalone(
        config: Arc<Config>,
        attempts: Arc<AttemptContext>,
        clients: &AwsClients,
        role: &str,
    ) -> Result<Daemon, DaemonError> {
        // First: a second process on the same state directory must change nothing in it.
        let owner = StateDirOwner::claim(&config.agent.state_dir, role)?;
        let sqs = config.sqs.clone();
        let outbox = Outbox::open(&config.agent.state_dir)?;
        let audit_table = config.audit.job_table.as_ref().map(|t| {
            JobAuditTable::new(clients.dynamodb.clone(), t.clone()).with_format(config.audit.format)
        });
        let shipper = match &config.cloudwatch {
            Some(settings) => Some(Shipper::new(
                clients.logs.clone(),
                settings,
                &config.agent.state_dir,
            )?),
            None => None,
        };
        let database = DatabaseEnv::new(
            config.database.clone(),
            config
                .database
                .secret_id
                .as_ref()
                .map(|_| clients.secrets.clone()),
        );
        let launcher = crate::job_owner::launch::Launcher::choose(config.jobs.launcher);
        let job_user = launcher
            .job_user(config.jobs.user.as_deref())
            .map_err(DaemonError::JobUser)?;
        let owners =
            owned::Owners::open(&config.agent.state_dir, launcher, job_user).map_err(|source| {
                DaemonError::OwnersDir {
                    path: config.agent.state_dir.clone(),
                    source,
                }
            })?;
        Ok(Daemon {
            shared: Arc::new(Shared {
                owners,
                config,
                attempts,
                sfn: StepFunctions::new(clients.sfn.clone()),
                audit_table,
                outbox,
                sqs: sqs.map(|s| SqsIntake::new(clients.sqs.clone(), s)),
                database,
                shipper,
                _owner: owner,
                metrics: std::sync::OnceLock::new(),
            }),
            policy: RetryPolicy {
                max: Duration::from_secs(10),
                ..RetryPolicy::default()
            },
            notifier: Notifier::disabled(),
            fleet: None,
        })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.shared.outbox
    }

    /// Sends systemd notifications (readiness, watchdog, status) through `notifier`.
    pub fn with_notifier(mut self, notifier: Notifier) -> Daemon {
        self.notifier = notifier;
        self
    }

    /// Adopts the jobs an earlier agent left under their owners, then runs until `controls`
    /// says stop (see `signals`). A stop is a hand-off: intake stops, the running jobs keep
    /// running under their owners (the next agent adopts them), the outbox gets a short last
    /// chance to deliver, and the process exits within [`HAND_OFF_BOUND`]. A second stop
    /// exits at once. A reload applies what may change while running (see `reload`).
    pub async fn run(self, mut controls: Controls) -> Result<(), DaemonError> {
        let shared = self.shared.clone();
        // First, before READY and before housekeeping: what the last agent left running.
        let found = adopt_scan(&shared).await;
        resume_shipments(&shared, &found);
        let pending = shared.outbox.len()?;
        if pending > 0 {
            tracing::info!(
                pending,
                "delivering outcomes left in the outbox by an earlier run"
            );
        }
        open_metrics(&shared);
        let mut metrics_tick = tokio::time::interval(
            shared
                .metrics
                .get()
                .map_or(Duration::from_secs(3600), |m| m.interval()),
        );
        metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let background = Background::start(&shared, self.policy);
        let mut fleet = self.fleet.clone().and_then(|parts| {
            let outbox = shared.outbox.clone();
            // An outbox that cannot be read is not known to be empty.
            Fleet::start(parts, Arc::new(move || outbox.len().unwrap_or(1)))
        });
        let (socket_task, mut submit_rx) = open_socket(&shared)?;
        let has_socket = socket_task.is_some();
        let mut lp = Loop::new(shared.clone());
        lp.adopt(found);
        let has_sqs = shared.sqs.is_some();
        let mut keepalive = tokio::time::interval(self.notifier.keepalive_period());
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive.tick().await;
        let mut controls_open = true;
        let mut stop = JobStop::Run;
        // `rsql-agent drain`: requests from the control socket, answered by this loop.
        let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel::<control::Asked>(8);
        let control_task = match control::serve(&shared.config.agent.state_dir, ctl_tx) {
            Ok(task) => Some(task),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the control socket; `rsql-agent drain` will not reach this agent");
                None
            }
        };
        tracing::info!(
            queue_url = shared.sqs.as_ref().map_or("-", |s| s.queue_url()),
            socket = has_socket,
            max_concurrent_jobs = shared.config.agent.max_concurrent_jobs,
            "receiving jobs"
        );
        self.notifier.ready(&lp.status());
        loop {
            while lp.jobs.try_join_next().is_some() {}
            if let Some(fleet) = &fleet {
                fleet.publish(lp.load());
            }
            tokio::select! {
                control = controls.recv(), if controls_open => match control {
                    Some(Control::Stop) => break,
                    Some(Control::StopNow) => {
                        stop = JobStop::Kill;
                        break;
                    }
                    Some(Control::Reload) => {
                        self.notifier.reloading();
                        reload(&shared, &mut lp.slots).await;
                        self.notifier.ready(&lp.status());
                    }
                    None => controls_open = false,
                },
                // From the main loop itself, so a wedged loop stops feeding the watchdog.
                _ = keepalive.tick() => self.notifier.alive(&lp.status()),
                _ = metrics_tick.tick(), if shared.metrics.get().is_some() => lp.write_gauges(),
                Some(_) = lp.jobs.join_next(), if !lp.jobs.is_empty() => {}
                Some(asked) = ctl_rx.recv() => lp.on_control(asked, &self.notifier),
                notice = next_notice(&mut fleet), if fleet.is_some() => lp.on_notice(notice, &self.notifier),
                _ = sleep_until_some(lp.stop_jobs_at), if lp.stop_jobs_at.is_some() => lp.stop_for_spot(),
                _ = sleep_until_some(lp.retry_at), if lp.retry_at.is_some() => lp.retry_at = None,
                // Wait for a free slot first: never take a message there is no room to run.
                Some(submission) = submit_rx.recv(), if has_socket => lp.on_submission(submission),
                permit = lp.slots.acquire(), if has_sqs && !lp.draining && lp.receiving.is_none() && lp.retry_at.is_none() => {
                    let Some(permit) = permit else { break };
                    lp.start_receive(permit);
                }
                received = join_some(&mut lp.receiving), if lp.receiving.is_some() => {
                    lp.receiving = None;
                    lp.on_received(received, &self.policy);
                }
            }
        }
        if let Some(fleet) = fleet {
            fleet.stop();
        }
        lp.hand_off(HandOff {
            socket_task,
            submit_rx,
            control_task,
            background,
            notifier: &self.notifier,
            controls: &mut controls,
            controls_open,
            now: stop == JobStop::Kill,
        })
        .await;
        self.notifier.status("stopped");
        Ok(())
    }
}

/// The outbox worker and housekeeping, for the daemon's life.
struct Background {
    worker: JoinHandle<crate::report::outbox::WorkerExit>,
    outbox_stop_tx: watch::Sender<bool>,
    housekeeping: JoinHandle<()>,
}

impl Background {
    fn start(shared: &Arc<Shared>, policy: RetryPolicy) -> Background {
        let (outbox_stop_tx, mut outbox_stop_rx) = watch::channel(false);
        let worker = tokio::spawn(shared.outbox.clone().run_worker(
            shared.sfn.clone(),
            shared.audit_table.clone(),
            policy,
            async move {
                let _ = outbox_stop_rx.wait_for(|stop| *stop).await;
            },
        ));
        let attempts = shared.attempts.clone();
        let housekeeping = tokio::spawn(async move {
            let mut every = tokio::time::interval(HOUSEKEEPING_INTERVAL);
            loop {
                every.tick().await;
                let attempts = attempts.clone();
                let _ = tokio::task::spawn_blocking(move || attempts.housekeeping()).await;
            }
        });
        Background {
            worker,
            outbox_stop_tx,
            housekeeping,
        }
    }
}

/// Starts the metrics file and its shipment, when there is a log group to ship to and
/// `[metrics] enabled`. A failure costs the metrics, never the jobs.
fn open_metrics(shared: &Shared) {
    let (Some(shipper), true) = (&shared.shipper, shared.config.metrics.enabled) else {
        return;
    };
    match crate::metrics::Metrics::open(
        &shared.config.metrics,
        &shared.config.agent.state_dir,
        &shared.attempts.instance_id,
        shipper,
    ) {
        Ok(metrics) => {
            let _ = shared.metrics.set(metrics);
        }
        Err(e) => tracing::warn!(error = %e, "cannot write metrics; jobs run without them"),
    }
}

/// Writes a job's end to the metrics (when they are on).
fn job_end_metrics(
    shared: &Shared,
    spec: (&str, &str, &str),
    outcome: &Outcome,
    duration_ms: Option<u64>,
    queue_wait_ms: Option<u64>,
) {
    let Some(metrics) = shared.metrics.get() else {
        return;
    };
    let (workflow_id, workflow_execution_id, job_name) = spec;
    let status = match outcome {
        Outcome::Completed(_) => crate::metrics::JobStatus::Completed,
        Outcome::Failed(f) => crate::metrics::JobStatus::Failed(f.error.as_str()),
        Outcome::Cancelled { .. } => crate::metrics::JobStatus::Cancelled,
    };
    metrics.job_end(&crate::metrics::JobEnd {
        workflow_id,
        workflow_execution_id,
        job_name,
        status,
        duration_ms,
        queue_wait_ms,
    });
}

/// Resumes the CloudWatch shipments an earlier run left, except those of jobs still running
/// (their watchers take those up), before housekeeping can clean up old logs.
fn resume_shipments(shared: &Shared, found: &[owned::Found]) {
    let Some(shipper) = &shared.shipper else {
        return;
    };
    let running: std::collections::HashSet<std::path::PathBuf> = found
        .iter()
        .filter_map(|f| match f {
            owned::Found::Running(_, job, _) => Some(job.log_file.clone()),
            _ => None,
        })
        .collect();
    let resumed = shipper.resume_all(&running);
    if resumed > 0 {
        tracing::info!(resumed, "resuming log shipments left by an earlier run");
    }
}

/// The socket intake: connections are validated by their own tasks; a valid job comes to the
/// loop to take a slot and join its jobs, so it is watched and handed off like an SQS job.
#[allow(clippy::type_complexity)]
fn open_socket(
    shared: &Arc<Shared>,
) -> Result<
    (
        Option<JoinHandle<()>>,
        tokio::sync::mpsc::Receiver<Submission>,
    ),
    DaemonError,
> {
    let (submit_tx, submit_rx) = tokio::sync::mpsc::channel::<Submission>(16);
    let task = match &shared.config.socket {
        Some(settings) => {
            let intake = socket::SocketIntake::bind(settings)?;
            tracing::info!(path = %settings.path.display(), "listening for jobs on the local socket");
            Some(tokio::spawn(
                intake.serve(socket_validator(shared), submit_tx),
            ))
        }
        None => None,
    };
    Ok((task, submit_rx))
}

/// The receive loop's state: slots, the jobs being watched, the receive in flight.
struct Loop {
    shared: Arc<Shared>,
    slots: Slots,
    jobs: JoinSet<()>,
    jobs_stop_tx: watch::Sender<JobStop>,
    jobs_stop_rx: watch::Receiver<JobStop>,
    /// The receive in flight, and the slot taken for its first message.
    receiving: Option<JoinHandle<Result<Vec<Delivery>, SqsError>>>,
    first: Option<OwnedSemaphorePermit>,
    retry_at: Option<tokio::time::Instant>,
    receive_failures: u32,
    draining: bool,
    /// A Spot interruption's deadline less `spot_stop_margin`: running jobs are stopped then.
    stop_jobs_at: Option<tokio::time::Instant>,
}

/// What the hand-off at shutdown takes over from the loop.
struct HandOff<'a> {
    socket_task: Option<JoinHandle<()>>,
    submit_rx: tokio::sync::mpsc::Receiver<Submission>,
    control_task: Option<JoinHandle<()>>,
    background: Background,
    notifier: &'a Notifier,
    controls: &'a mut Controls,
    controls_open: bool,
    /// A second stop came already: exit at once.
    now: bool,
}

impl Loop {
    fn new(shared: Arc<Shared>) -> Loop {
        let (jobs_stop_tx, jobs_stop_rx) = watch::channel(JobStop::Run);
        Loop {
            slots: Slots::new(shared.config.agent.max_concurrent_jobs),
            shared,
            jobs: JoinSet::new(),
            jobs_stop_tx,
            jobs_stop_rx,
            receiving: None,
            first: None,
            retry_at: None,
            receive_failures: 0,
            draining: false,
            stop_jobs_at: None,
        }
    }

    fn status(&self) -> Status {
        status(&self.shared, &self.jobs, &self.slots)
    }

    fn write_gauges(&self) {
        if let Some(metrics) = self.shared.metrics.get() {
            let status = self.status();
            metrics.gauges(&crate::metrics::Gauges {
                running_jobs: status.running,
                free_slots: status.free,
                outbox_depth: status.outbox,
            });
        }
    }

    /// Watches the jobs an earlier agent left (see `adopt_scan`).
    fn adopt(&mut self, found: Vec<owned::Found>) {
        for found in found {
            let (dir, job, conn) = match found {
                owned::Found::Running(dir, job, conn) => (dir, job, Some(conn)),
                owned::Found::Gone(dir, job) => (dir, job, None),
                owned::Found::Unusable => continue,
            };
            // Adopted jobs take slots like any other; after a config change that shrank
            // them, they run over the limit rather than be left unwatched.
            let permit = self.slots.try_acquire();
            let shared = self.shared.clone();
            let stop = self.jobs_stop_rx.clone();
            let span = owned::span_for(&job);
            tracing::info!(
                parent: &span,
                job_id = %job.launch.job_id,
                running = conn.is_some(),
                "adopting a job left by an earlier agent"
            );
            self.jobs.spawn(
                async move {
                    let _permit = permit;
                    let source = owned::source_of(&job);
                    owned::watch_job(shared, source, dir, *job, conn, stop, true).await;
                }
                .instrument(span),
            );
        }
    }

    /// `rsql-agent drain` and its status queries.
    fn on_control(&mut self, asked: control::Asked, notifier: &Notifier) {
        if asked.request == control::ControlRequest::Drain {
            self.drain(notifier);
        }
        let _ = asked.reply.send(control::ControlReply {
            ok: true,
            draining: self.draining,
            running: self.jobs.len(),
            outbox: self.shared.outbox.len().unwrap_or(0),
        });
    }

    /// Stops intake for good: nothing new is received or accepted, a receive in flight hands
    /// its messages back to the queue, and running jobs are watched and reported.
    fn drain(&mut self, notifier: &Notifier) {
        if self.draining {
            return;
        }
        self.draining = true;
        tracing::warn!(running = self.jobs.len(), "draining: intake stopped; running jobs are watched and reported until the agent is stopped");
        self.first = None;
        if let Some(task) = self.receiving.take() {
            if let Some(sqs) = self.shared.sqs.clone() {
                // Watched like a job, so a drained instance is not let go (or reported idle)
                // while the messages are still on their way back to the queue.
                self.jobs.spawn(return_unstarted(sqs, task));
            }
        }
        notifier.status("draining");
    }

    /// A scale-in, Spot interruption or rebalance notice (see `fleet`): drain; for a Spot
    /// interruption, stop what still runs `spot_stop_margin` before the deadline.
    fn on_notice(&mut self, notice: Notice, notifier: &Notifier) {
        self.drain(notifier);
        if let Notice::Spot { deadline, .. } = notice {
            let margin = self.shared.config.fleet.spot_stop_margin;
            let left = deadline
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
                .saturating_sub(margin);
            self.stop_jobs_at = Some(tokio::time::Instant::now() + left);
        }
    }

    /// The Spot deadline less the margin has come: every running job is stopped (SIGTERM,
    /// `kill_grace`, SIGKILL) and reported `Rsql.Interrupted`, so its Retry can start
    /// elsewhere at once, with its lock released.
    fn stop_for_spot(&mut self) {
        self.stop_jobs_at = None;
        if !self.jobs.is_empty() {
            tracing::warn!(
                running = self.jobs.len(),
                "the Spot interruption is near: stopping the running jobs; they are reported Rsql.Interrupted"
            );
        }
        let _ = self.jobs_stop_tx.send(JobStop::Stop);
    }

    fn load(&self) -> Load {
        Load {
            running: self.jobs.len(),
            draining: self.draining,
        }
    }

    fn on_submission(&mut self, submission: Submission) {
        let free = if self.draining {
            None
        } else {
            self.slots.try_acquire()
        };
        let reply = match free {
            Some(permit) => {
                let reply = SubmitReply::Accepted {
                    job_name: submission.spec.job_name.clone(),
                    token_hash: submission
                        .spec
                        .task_token
                        .as_deref()
                        .map(lock::token_hash)
                        .unwrap_or_default(),
                };
                let shared = self.shared.clone();
                let stop = self.jobs_stop_rx.clone();
                self.jobs.spawn(async move {
                    handle_submission(shared, submission.spec, stop, permit).await;
                });
                reply
            }
            None if self.draining => SubmitReply::ShuttingDown,
            None => SubmitReply::Busy,
        };
        let _ = submission.reply.send(reply);
    }

    fn start_receive(&mut self, permit: OwnedSemaphorePermit) {
        let Some(sqs) = self.shared.sqs.clone() else {
            return;
        };
        let free = 1 + self.slots.available();
        self.first = Some(permit);
        self.receiving = Some(tokio::spawn(async move { sqs.receive(free).await }));
    }

    fn on_received(
        &mut self,
        received: Result<Result<Vec<Delivery>, SqsError>, tokio::task::JoinError>,
        policy: &RetryPolicy,
    ) {
        let deliveries = match received {
            Ok(Ok(d)) => {
                self.receive_failures = 0;
                d
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("the receive task failed: {e}"),
                    Ok(Ok(_)) => String::new(),
                };
                let delay = policy.delay(self.receive_failures);
                self.receive_failures = self.receive_failures.saturating_add(1);
                tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "cannot receive jobs");
                self.first = None;
                self.retry_at = Some(tokio::time::Instant::now() + delay);
                return;
            }
        };
        for delivery in deliveries {
            let permit = match self.first.take().or_else(|| self.slots.try_acquire()) {
                Some(p) => p,
                // Only after a reload shrank the slots mid-receive: the message is left to
                // become visible again.
                None => continue,
            };
            let shared = self.shared.clone();
            let stop = self.jobs_stop_rx.clone();
            self.jobs.spawn(async move {
                handle(shared, delivery, stop, permit).await;
            });
        }
        self.first = None;
    }

    /// Shutdown: a hand-off (see [`Daemon::run`]).
    async fn hand_off(mut self, h: HandOff<'_>) {
        let HandOff {
            socket_task,
            mut submit_rx,
            control_task,
            background,
            notifier,
            controls,
            mut controls_open,
            mut now,
        } = h;
        let shared = self.shared.clone();
        // Shutdown: a hand-off. Intake stops here: nothing new is received from now on. A
        // receive still in flight may yet hand us messages; they go straight back to the
        // queue, for another agent.
        let began = tokio::time::Instant::now();
        self.first = None;
        if let Some(task) = socket_task {
            task.abort();
            let _ = task.await;
        }
        submit_rx.close();
        while let Ok(submission) = submit_rx.try_recv() {
            let _ = submission.reply.send(SubmitReply::ShuttingDown);
        }
        if let Some(settings) = &shared.config.socket {
            let _ = std::fs::remove_file(&settings.path);
        }
        let returning = self.receiving.take().and_then(|task| {
            let sqs = shared.sqs.clone()?;
            Some(tokio::spawn(return_unstarted(sqs, task)))
        });
        tracing::info!(
            running = self.jobs.len(),
            "shutting down: intake stopped; running jobs keep running under their owners and the next agent adopts them"
        );
        notifier.stopping(&self.status());
        let _ = self.jobs_stop_tx.send(JobStop::HandOff);
        let deadline = began + HAND_OFF_BOUND;
        // The watchers return at once; a job in the middle of its hand-over finishes that
        // first (a few milliseconds), so none is left half started.
        let watchers_done = deadline - Duration::from_secs(2);
        while !self.jobs.is_empty() && !now {
            tokio::select! {
                _ = self.jobs.join_next() => {}
                _ = tokio::time::sleep_until(watchers_done) => break,
                control = controls.recv(), if controls_open => match control {
                    Some(Control::Stop | Control::StopNow) => now = true,
                    Some(Control::Reload) => {
                        tracing::info!("not reloading the config: the agent is shutting down")
                    }
                    None => controls_open = false,
                },
            }
        }
        self.jobs.abort_all();
        // The final outcomes are in the outbox; give delivery a bounded last chance.
        while !now
            && shared.outbox.len().unwrap_or(0) > 0
            && tokio::time::Instant::now() + Duration::from_millis(500) < deadline
        {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                control = controls.recv(), if controls_open => match control {
                    Some(Control::Stop | Control::StopNow) => now = true,
                    Some(Control::Reload) => {}
                    None => controls_open = false,
                },
            }
        }
        if let Some(task) = returning {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), task).await;
        }
        background.housekeeping.abort();
        if let Some(metrics) = shared.metrics.get() {
            self.write_gauges();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            metrics.finish(left.min(Duration::from_millis(500))).await;
        }
        if let Some(task) = control_task {
            task.abort();
        }
        let _ = std::fs::remove_file(shared.config.agent.state_dir.join(control::SOCKET));
        let _ = background.outbox_stop_tx.send(true);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Ok(Ok(exit)) = tokio::time::timeout(left, background.worker).await {
            if exit.pending > 0 {
                tracing::warn!(
                    pending = exit.pending,
                    "outcomes left in the outbox; they are delivered after the next start"
                );
            }
        }
    }
}

impl Daemon {
    /// Runs one job the way the daemon runs a socket job (lock, supervision, heartbeats,
    /// logs, outbox), then delivers the outbox until it is empty or `report_timeout` has
    /// passed. `body` is a job message (see `job`); an invalid one that carries a token has
    /// its task failed with `Rsql.InvalidJob`. A stop request from `controls` stops the job
    /// at once (SIGTERM, `kill_grace`, SIGKILL) and reports it `Rsql.Interrupted`; a second
    /// one kills it.
    ///
    /// Entries left in the outbox by an earlier run go out in the same drain.
    pub async fn run_one(
        self,
        body: &[u8],
        mut controls: Controls,
        report_timeout: Duration,
    ) -> Result<OneJob, DaemonError> {
        let shared = self.shared.clone();
        let spec = match shared.parse_job(body) {
            Ok(spec) => spec,
            Err(invalid) => {
                let reason = invalid.error.to_string();
                let failed_task = match invalid.task_token {
                    Some(token) => {
                        tracing::warn!(
                            token_hash = %lock::token_hash(&token),
                            reason = %reason,
                            "rejected the job: failing its task with Rsql.InvalidJob"
                        );
                        fail_invalid(&shared, token, &reason)?;
                        true
                    }
                    None => {
                        tracing::warn!(reason = %reason, "rejected the job; it has no usable task token");
                        false
                    }
                };
                let delivered = self.deliver(report_timeout).await;
                return Ok(OneJob::Rejected {
                    reason,
                    failed_task,
                    delivered,
                });
            }
        };
        let Some(token) = spec.task_token.clone() else {
            return Ok(OneJob::Rejected {
                reason: "the job has no task token".into(),
                failed_task: false,
                delivered: true,
            });
        };
        let token_hash = lock::token_hash(&token);
        let span = job_span(&spec, &token_hash);
        let (stop_tx, stop_rx) = watch::channel(JobStop::Run);
        let stop_probe = stop_tx.subscribe();
        let forward_stops = async move {
            while let Some(control) = controls.recv().await {
                let level = match control {
                    Control::Stop => JobStop::Stop,
                    Control::StopNow => JobStop::Kill,
                    Control::Reload => {
                        tracing::info!("a standalone run does not reload its config");
                        continue;
                    }
                };
                // The first stop request stops the job (there is no drain for one job);
                // the next one kills it.
                let next = match *stop_tx.borrow() {
                    JobStop::Run => level,
                    _ => JobStop::Kill,
                };
                let _ = stop_tx.send(next);
            }
            std::future::pending::<()>().await
        };
        let run =
            run_delivery(shared, Source::Local, spec, token, token_hash, stop_rx).instrument(span);
        let delivered = tokio::select! {
            d = run => d,
            _ = forward_stops => unreachable!("the stop forwarder never ends"),
        };
        Ok(match delivered {
            Delivered::Stored(outcome) => OneJob::Finished {
                outcome,
                stopped: *stop_probe.borrow() != JobStop::Run,
                delivered: self.deliver(report_timeout).await,
            },
            Delivered::Elsewhere(holder) => OneJob::RunningElsewhere { holder },
            Delivered::Left | Delivered::HandedOff => OneJob::NotStored,
        })
    }

    /// Delivers the outbox until it is empty (true) or `timeout` has passed (false: what is
    /// left goes out after the next start).
    async fn deliver(&self, timeout: Duration) -> bool {
        let shared = &self.shared;
        let exit = shared
            .outbox
            .drain(
                &shared.sfn,
                shared.audit_table.as_ref(),
                &self.policy,
                tokio::time::sleep(timeout),
            )
            .await;
        if exit.pending > 0 {
            tracing::warn!(
                pending = exit.pending,
                timeout_secs = timeout.as_secs(),
                outbox = %shared.outbox.dir().display(),
                "reports not delivered in time; they stay in the outbox and go out after the next start"
            );
        }
        exit.pending == 0
    }
}

/// What the agent wants of its running jobs: the one stop type from the signal to the
/// job's owner process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobStop {
    /// Let them run.
    Run,
    /// The agent is stopping (SIGTERM): stop watching; the jobs keep running under their
    /// owners and the next agent adopts them.
    HandOff,
    /// Stop the job (a standalone run's SIGTERM): SIGTERM, `kill_grace`, SIGKILL;
    /// reported `Rsql.Interrupted`.
    Stop,
    /// Kill the job now (a second stop request).
    Kill,
}

/// `STATUS=` for the service manager. `free` is how many more jobs could start now (a slot
/// held for a receive in flight still counts as free).
fn status<T: 'static>(shared: &Shared, jobs: &JoinSet<T>, slots: &Slots) -> Status {
    Status {
        running: jobs.len(),
        free: slots.size().saturating_sub(jobs.len()),
        outbox: shared.outbox.len().unwrap_or(0),
    }
}

/// Reloads the config file (SIGHUP): applies what is safe to change while running and names
/// every changed key that needs a restart. An invalid file changes nothing.
async fn reload(shared: &Shared, slots: &mut Slots) {
    let Some(path) = shared.config.source.clone() else {
        tracing::warn!("SIGHUP: the agent runs on built-in defaults; there is no file to reload");
        return;
    };
    let new = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "SIGHUP: the config file is not valid; still running with the previous config");
            return;
        }
    };
    let plan = reload::plan(&shared.attempts.live(), &new);
    for key in &plan.needs_restart {
        tracing::warn!(key = %key, "SIGHUP: `{key}` changed; it takes effect only after a restart");
    }
    slots.resize(plan.config.agent.max_concurrent_jobs).await;
    shared.attempts.set_live(Arc::new(plan.config));
    tracing::info!(
        applied = ?plan.applied,
        needs_restart = ?plan.needs_restart,
        max_concurrent_jobs = slots.size(),
        "SIGHUP: config reloaded"
    );
}

/// Makes the messages of a receive that completes after shutdown visible again at once, so
/// another agent takes them without waiting out the visibility timeout.
async fn return_unstarted(sqs: SqsIntake, task: JoinHandle<Result<Vec<Delivery>, SqsError>>) {
    let Ok(Ok(deliveries)) = task.await else {
        return;
    };
    for delivery in deliveries {
        tracing::info!(message_id = %delivery.message_id, "shutting down: returning a message received too late to the queue");
        if let Err(e) = sqs.release(&delivery.receipt_handle, Duration::ZERO).await {
            tracing::warn!(error = %e, "cannot return the message; it comes back after its visibility timeout");
        }
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_notice(fleet: &mut Option<Fleet>) -> Notice {
    match fleet {
        Some(fleet) => fleet.notice().await,
        None => std::future::pending().await,
    }
}

async fn join_some<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// A job-ending failure the agent itself produces (not from a script run).
fn failure(error: ErrorName, message: String) -> Outcome {
    Outcome::Failed(Failure {
        error,
        cause: FailureCause {
            message,
            ..FailureCause::default()
        },
    })
}

/// Stores the `Rsql.InvalidJob` failure of a job that was rejected but carried its token, so
/// its workflow hears now instead of at its timeout.
fn fail_invalid(shared: &Shared, token: String, reason: &str) -> Result<(), OutboxError> {
    let outcome = failure(ErrorName::InvalidJob, reason.to_string());
    let entry = OutboxEntry::new(Some(token), Callback::from_outcome(&outcome), None);
    shared.outbox.put(&entry)
}

/// The span every log line of one job carries (and the journal's `JOB_NAME`,
/// `WORKFLOW_EXECUTION_ID` and `TOKEN_HASH` fields come from).
fn job_span(spec: &JobSpec, token_hash: &str) -> tracing::Span {
    tracing::info_span!(
        "job",
        job_name = %spec.job_name,
        workflow_execution_id = %spec.workflow_execution_id,
        token_hash = %token_hash,
    )
}

/// The life of one SQS delivery.
async fn handle(
    shared: Arc<Shared>,
    delivery: Delivery,
    shutdown: watch::Receiver<JobStop>,
    _permit: OwnedSemaphorePermit,
) {
    let spec = match shared.parse_job(delivery.body.as_bytes()) {
        Ok(spec) => spec,
        Err(invalid) => {
            let reason = invalid.error.to_string();
            match invalid.task_token {
                Some(token) => {
                    tracing::warn!(
                        message_id = %delivery.message_id,
                        token_hash = %lock::token_hash(&token),
                        reason = %reason,
                        "rejected a job message: failing its task with Rsql.InvalidJob"
                    );
                    if let Err(e) = fail_invalid(&shared, token, &reason) {
                        // Not durable: keep the message so it comes back and is tried again.
                        tracing::error!(error = %e, "cannot store the outcome of a rejected message; leaving it in the queue");
                        return;
                    }
                }
                None => tracing::warn!(
                    message_id = %delivery.message_id,
                    reason = %reason,
                    "rejected a job message with no usable task token: nobody can be told, deleting it"
                ),
            }
            delete_message(&shared, &delivery).await;
            return;
        }
    };
    let Some(token) = spec.task_token.clone() else {
        return;
    };
    let token_hash = lock::token_hash(&token);
    let span = job_span(&spec, &token_hash);
    run_delivery(
        shared,
        Source::Sqs(delivery),
        spec,
        token,
        token_hash,
        shutdown,
    )
    .instrument(span)
    .await;
}

/// Where a running job came from, and so how it is acknowledged: an SQS message is kept
/// hidden while the job runs and deleted once its outcome is durable; a local job (from the
/// socket, or a standalone run) was acknowledged to whoever handed it over and needs
/// nothing more.
#[derive(Debug)]
enum Source {
    Sqs(Delivery),
    Local,
}

impl Source {
    fn receive_count(&self) -> u32 {
        match self {
            Source::Sqs(delivery) => delivery.receive_count,
            Source::Local => 1,
        }
    }
}

/// Validates a socket submission the way `handle` validates an SQS message. A broken job
/// that carries a token still gets its `Rsql.InvalidJob` callback (through the outbox), so
/// the workflow does not wait for its timeout; the submitter is told why either way.
fn socket_validator(shared: &Arc<Shared>) -> socket::Validate {
    let shared = shared.clone();
    Arc::new(
        move |body: &[u8], peer: &socket::Peer| match shared.parse_job(body) {
            Ok(spec) => Ok(spec),
            Err(invalid) => {
                let reason = invalid.error.to_string();
                match invalid.task_token {
                    Some(token) => {
                        tracing::warn!(
                            uid = peer.uid,
                            pid = peer.pid,
                            token_hash = %lock::token_hash(&token),
                            reason = %reason,
                            "rejected a socket job: failing its task with Rsql.InvalidJob"
                        );
                        if let Err(e) = fail_invalid(&shared, token, &reason) {
                            tracing::error!(error = %e, "cannot store the outcome of a rejected socket job");
                        }
                    }
                    None => tracing::warn!(
                        uid = peer.uid,
                        pid = peer.pid,
                        reason = %reason,
                        "rejected a socket job with no usable task token"
                    ),
                }
                Err(reason)
            }
        },
    )
}

/// The life of one accepted socket job: the same path as an SQS delivery, without SQS.
async fn handle_submission(
    shared: Arc<Shared>,
    spec: JobSpec,
    shutdown: watch::Receiver<JobStop>,
    _permit: OwnedSemaphorePermit,
) {
    let Some(token) = spec.task_token.clone() else {
        return;
    };
    let token_hash = lock::token_hash(&token);
    let span = job_span(&spec, &token_hash);
    run_delivery(shared, Source::Local, spec, token, token_hash, shutdown)
        .instrument(span)
        .await;
}

async fn run_delivery(
    shared: Arc<Shared>,
    delivery: Source,
    spec: JobSpec,
    token: String,
    token_hash: String,
    shutdown: watch::Receiver<JobStop>,
) -> Delivered {
    let origin = match delivery {
        Source::Sqs(_) => delivery::Origin::Sqs,
        Source::Local => delivery::Origin::Local,
    };
    let mut effects = LiveEffects {
        shared: &shared,
        delivery: &delivery,
        spec: &spec,
        token: &token,
        token_hash: &token_hash,
        held: None,
        holder: None,
    };
    let first = effects.take_lock();
    let attempt = match delivery::drive(&mut effects, first, origin).await {
        Ok(attempt) => attempt,
        Err(delivery::Step::Acknowledged(outcome)) => {
            if matches!(outcome, Some(Outcome::Cancelled { .. })) {
                // Warn: a whole fleet answered "closed" for every task when its region or
                // account did not match the state machine's (Step Functions then says
                // InvalidToken), and an operator must see that at once.
                tracing::warn!(
                    receive_count = delivery.receive_count(),
                    "Step Functions says the task is closed (its execution stopped, or it timed out and was retried; InvalidToken also comes from a token of another region or account): deleted this message without running the job"
                );
            }
            return Delivered::Stored(outcome.unwrap_or(Outcome::Cancelled {
                message: "nothing to report".into(),
            }));
        }
        Err(delivery::Step::Elsewhere(holder)) => return Delivered::Elsewhere(holder),
        Err(step) => {
            if !matches!(step, delivery::Step::Left) {
                tracing::error!(
                    ?step,
                    "a delivery stopped in the middle; leaving it for a retry"
                );
            }
            return Delivered::Left;
        }
    };
    let Some(held) = effects.held.take() else {
        tracing::error!("a delivery was to run without its lock; leaving it for a retry");
        return Delivered::Left;
    };
    let locked = owned::Locked {
        spec: spec.clone(),
        token: token.clone(),
        token_hash: token_hash.clone(),
        held,
        attempt,
    };
    owned::run(shared.clone(), delivery, locked, shutdown).await
}

/// The side effects of one delivery's state machine ([`delivery::Effects`]), for real.
struct LiveEffects<'a> {
    shared: &'a Shared,
    delivery: &'a Source,
    spec: &'a JobSpec,
    token: &'a str,
    token_hash: &'a str,
    held: Option<JobLock>,
    /// The lock holder's record when the lock was busy.
    holder: Option<LockState>,
}

impl LiveEffects<'_> {
    /// Takes the job's lock and says what it found, as the delivery's next event.
    fn take_lock(&mut self) -> delivery::Event {
        match self.shared.attempts.acquire(self.spec, self.token_hash) {
            Ok(Acquired { held, decision }) => {
                match &decision {
                    Decision::Replay(state) => {
                        tracing::info!(state = ?state.state, "the job already finished: replaying its recorded outcome")
                    }
                    Decision::Interrupted(_) => tracing::warn!(
                        "the job's previous runner died while it ran: reporting Rsql.Interrupted"
                    ),
                    Decision::Run { .. } => {}
                }
                self.held = Some(held);
                delivery::Event::Locked { decision }
            }
            Err(AttemptError::Busy { holder, state, .. }) => {
                // Another runner has it now; this copy comes back soon (heartbeating its
                // task meanwhile) to find it free, or finished and then replays its outcome.
                tracing::info!(holder = %holder, receive_count = self.delivery.receive_count(), "job is running elsewhere; leaving this copy");
                self.holder = state.map(|s| *s);
                delivery::Event::Busy { holder }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot take the job's lock");
                delivery::Event::LockFailed {
                    error: e.to_string(),
                }
            }
        }
    }
}

impl delivery::Effects for LiveEffects<'_> {
    fn relock(&mut self) -> delivery::Event {
        self.take_lock()
    }

    async fn keep_alive_for_owner(&mut self) {
        keep_alive_for_owner(
            self.shared,
            self.delivery,
            (self.token, self.token_hash, self.spec.heartbeat),
            self.holder.as_ref(),
        )
        .await
    }

    async fn task_closed(&mut self) -> bool {
        task_closed(self.shared, self.token).await
    }

    fn record_interrupted(&mut self, state: &LockState) {
        if let Some(held) = self.held.as_mut() {
            if let Err(e) = held.write_state(state) {
                tracing::warn!(error = %e, "cannot record the interruption in the lock state");
            }
        }
    }

    async fn store(&mut self, outcome: &Outcome, run: Option<&LockState>) -> bool {
        if run.is_some_and(|r| !r.is_final()) {
            // A run that died with its host ends here, on whichever agent found it.
            job_end_metrics(
                self.shared,
                (
                    &self.spec.workflow_id,
                    &self.spec.workflow_execution_id,
                    &self.spec.job_name,
                ),
                outcome,
                None,
                None,
            );
        }
        let audit = run.map(|previous| run_record(self.shared, self.spec, previous, outcome));
        let token = match outcome {
            Outcome::Cancelled { .. } => None,
            _ => Some(self.token),
        };
        store(self.shared, token, outcome, audit, None)
    }

    async fn delete(&mut self) {
        delete(self.shared, self.delivery).await
    }

    fn release(&mut self) {
        if let Some(held) = self.held.take() {
            if let Err(e) = held.release() {
                tracing::warn!(error = %e, "cannot release the job's lock cleanly");
            }
        }
    }
}

/// Looks at every job owner directory left by an earlier agent: running owners to watch,
/// finished or dead ones to report. Also kills what is left of jobs whose owner died.
async fn adopt_scan(shared: &Shared) -> Vec<owned::Found> {
    let killed = tokio::task::spawn_blocking(crate::supervisor::kill_orphaned_jobs)
        .await
        .unwrap_or(0);
    if killed > 0 {
        tracing::warn!(killed, "killed processes left by jobs whose owner is gone");
    }
    let mut found = Vec::new();
    for dir in shared.owners.scan() {
        found.push(owned::inspect(&dir).await);
    }
    found
}

/// How soon a copy comes back when the lock's holder is not a live job (no state, a
/// finished one, or a stale lease): a mere check, which holds the lock for moments.
const BUSY_RECHECK: Duration = Duration::from_secs(2);

/// A copy of a message whose job's lock is busy. Its task must not time out while it waits:
/// one heartbeat now (for the owner of a live job of this very token, on its behalf while
/// its agent is away; for any other copy, its own task waiting its turn), and the copy comes
/// back after one tick of its heartbeat, or at once ([`BUSY_RECHECK`]) when the holder is no
/// live job. A copy whose task is closed is deleted: nobody can report to that task any more.
async fn keep_alive_for_owner(
    shared: &Shared,
    delivery: &Source,
    (token, token_hash, heartbeat): (&str, &str, Option<Duration>),
    holder: Option<&LockState>,
) {
    let Source::Sqs(message) = delivery else {
        return;
    };
    let Some(sqs) = &shared.sqs else { return };
    let live = shared.attempts.live();
    let lease = live.jobs.heartbeat_interval;
    let live_job = holder.is_some_and(|h| {
        !h.is_final()
            && h.heartbeat_age(std::time::SystemTime::now())
                .is_some_and(|age| age <= lease * 3)
    });
    let ours = live_job && holder.is_some_and(|h| h.token_hash == token_hash);
    match shared.sfn.heartbeat(token).await {
        Ok(()) if ours => {
            tracing::info!("the job's owner is alive (fresh lease): heartbeat sent on its behalf")
        }
        Ok(()) => tracing::info!(
            live_job,
            "heartbeat sent for this copy's task while it waits for the job's lock"
        ),
        Err(e) if e.is_task_closed() => {
            tracing::info!(reason = %e, "the task of a job running elsewhere is closed: deleting this copy");
            delete_message(shared, message).await;
            return;
        }
        Err(e) => tracing::warn!(error = %e, "heartbeat for a copy waiting for the lock failed"),
    }
    let tick = tick_for(heartbeat, lease, sqs.visibility_timeout());
    let back_in = if live_job {
        tick
    } else {
        tick.min(BUSY_RECHECK)
    };
    if let Err(e) = sqs.release(&message.receipt_handle, back_in).await {
        tracing::warn!(error = %e, "cannot shorten the copy's visibility");
    }
}

/// Whether Step Functions says the task is closed, asked twice a moment apart: an emulator
/// (and perhaps the service) may not know a token in the instant after its message was
/// sent. A failed call (network) counts as open; the heartbeat loop asks again.
async fn task_closed(shared: &Shared, token: &str) -> bool {
    for check in 0..2 {
        if check > 0 {
            tokio::time::sleep(CLOSED_RECHECK).await;
        }
        match shared.sfn.heartbeat(token).await {
            Err(e) if e.is_task_closed() => {
                tracing::debug!(reason = %e, check, "the task answers closed");
            }
            _ => return false,
        }
    }
    true
}

/// Every tick: a Step Functions heartbeat (a closed task is said once on `closed`, so the
/// job gets stopped) and another visibility timeout for the message. Never returns.
async fn heartbeat_loop(
    shared: &Shared,
    token: &str,
    delivery: &Source,
    tick: Duration,
    closed_tx: tokio::sync::mpsc::Sender<()>,
) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    let mut closed = false;
    loop {
        interval.tick().await;
        if !closed {
            match shared.sfn.heartbeat(token).await {
                Ok(()) => {}
                Err(e) if e.is_task_closed() => {
                    tracing::warn!(reason = %e, "the task is closed upstream: stopping the job");
                    closed = true;
                    let _ = closed_tx.try_send(());
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed; will try again next tick"),
            }
        }
        if let (Source::Sqs(delivery), Some(sqs)) = (delivery, &shared.sqs) {
            if let Err(e) = sqs.keep_hidden(&delivery.receipt_handle).await {
                tracing::warn!(error = %e, "cannot extend the message's visibility");
            }
        }
    }
}

/// Makes the outcome durable, then deletes the message and releases the lock, in that
/// order: a crash anywhere in between leaves a redelivery that replays, never a lost report.
async fn finish(
    shared: &Shared,
    delivery: &Source,
    held: Option<JobLock>,
    token: Option<&str>,
    outcome: Outcome,
    audit: Option<JobAuditRecord>,
) -> Delivered {
    let stored = finish_stored(shared, delivery, token, outcome, audit, None).await;
    if let Some(held) = held {
        if let Err(e) = held.release() {
            tracing::warn!(error = %e, "cannot release the job's lock cleanly");
        }
    }
    stored
}

/// Stores the outcome durably in the outbox (under `outbox_id` when given, so storing it
/// again replaces it), then deletes the message.
async fn finish_stored(
    shared: &Shared,
    delivery: &Source,
    token: Option<&str>,
    outcome: Outcome,
    audit: Option<JobAuditRecord>,
    outbox_id: Option<String>,
) -> Delivered {
    if !store(shared, token, &outcome, audit, outbox_id) {
        return Delivered::Left;
    }
    delete(shared, delivery).await;
    Delivered::Stored(outcome)
}

/// Puts the callback (when there is a token) and the audit record in the outbox, durably.
/// `false`: it could not be stored, and the message must be left to come back.
fn store(
    shared: &Shared,
    token: Option<&str>,
    outcome: &Outcome,
    audit: Option<JobAuditRecord>,
    outbox_id: Option<String>,
) -> bool {
    let callback = token.and_then(|_| Callback::from_outcome(outcome));
    let audit = audit.filter(|_| shared.audit_table.is_some());
    if callback.is_none() && audit.is_none() {
        return true;
    }
    let mut entry = OutboxEntry::new(token.map(str::to_string), callback, audit);
    if let Some(id) = outbox_id {
        entry.id = id;
    }
    match shared.outbox.put(&entry) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "cannot store the outcome durably; leaving the message to be redelivered and replayed");
            false
        }
    }
}

async fn delete(shared: &Shared, source: &Source) {
    if let Source::Sqs(delivery) = source {
        delete_message(shared, delivery).await;
    }
}

async fn delete_message(shared: &Shared, delivery: &Delivery) {
    let Some(sqs) = &shared.sqs else {
        return;
    };
    let policy = RetryPolicy::default();
    for attempt in 0..5 {
        match sqs.delete(&delivery.receipt_handle).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "cannot delete the message");
                tokio::time::sleep(policy.delay(attempt)).await;
            }
        }
    }
    // Harmless: the copy comes back and replays the recorded outcome.
    tracing::warn!(message_id = %delivery.message_id, "giving up deleting the message; its redelivery will replay the outcome");
}

/// The final audit record of the run `previous` describes, reported by this agent: one that
/// died while it ran (still `running` in the lock state), or one whose recorded outcome is
/// replayed (final: it ended on `previous.instance_id`, perhaps while no agent watched it).
fn run_record(
    shared: &Shared,
    spec: &JobSpec,
    previous: &LockState,
    outcome: &Outcome,
) -> JobAuditRecord {
    let replayed = previous.is_final();
    let (log_group, log_stream, log_file, duration_ms) = match outcome {
        Outcome::Completed(out) => (
            out.log_group.clone(),
            out.log_stream.clone(),
            out.log_file.clone(),
            Some(out.duration_ms),
        ),
        Outcome::Failed(f) => (
            f.cause.log_group.clone(),
            f.cause.log_stream.clone(),
            f.cause.log_file.clone(),
            None,
        ),
        Outcome::Cancelled { .. } => (None, None, None, None),
    };
    JobAuditRecord {
        job_name: spec.job_name.clone(),
        workflow_execution_id: spec.workflow_execution_id.clone(),
        workflow_id: spec.workflow_id.clone(),
        execution_status: outcome.status().to_string(),
        execution_start_ts: previous.started_at.clone(),
        execution_end_ts: Some(if replayed {
            previous.updated_at.clone()
        } else {
            crate::workflow::now_ts()
        }),
        instance_id: if replayed {
            previous.instance_id.clone()
        } else {
            shared.attempts.instance_id.clone()
        },
        exit_code: outcome.exit_code(),
        error_message: outcome.error_message(),
        sql_state: match outcome {
            Outcome::Failed(f) => f.cause.sql_state.clone(),
            _ => None,
        },
        log_group,
        log_stream,
        log_file,
        attempt: previous.attempt,
        duration_ms,
        cpu_ms: outcome.cpu_ms(),
        max_rss_mb: outcome.max_rss_mb(),
        log_complete: outcome.log_complete(),
        ssm_command_id: spec.ssm_command_id.clone(),
        stage: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redelivery of a finished job replays what the lock state file holds: the state is
    /// written to the (EFS) file as JSON and read back by another agent.
    #[test]
    fn a_replayed_outcome_is_the_one_the_finished_job_recorded() {
        let completed = Outcome::Completed(crate::outcome::SuccessOutput {
            job_name: "load.sh".into(),
            workflow_execution_id: "ex-1".into(),
            status: "completed".into(),
            exit_code: 0,
            duration_ms: 1200,
            instance_id: "i-1".into(),
            log_group: Some("/rsql".into()),
            log_stream: Some("ex-1/load.sh".into()),
            log_file: Some("/var/log/rsql-agent/jobs/x.log".into()),
            cpu_ms: Some(830),
            max_rss_mb: None,
            log_complete: None,
        });
        let failed = failure(ErrorName::ScriptFailed, "exit 3".into());
        for (outcome, run_state) in [
            (completed, lock::RunState::Completed),
            (failed, lock::RunState::Failed),
        ] {
            let mut state = LockState::new_running("k", "i-1", "h", 1);
            state.state = run_state;
            state.outcome = serde_json::to_value(&outcome).ok();
            let on_disk = serde_json::to_string(&state).unwrap();
            let read: LockState = serde_json::from_str(&on_disk).unwrap();
            assert_eq!(delivery::recorded_outcome(&read), outcome, "{on_disk}");
        }
    }

    #[test]
    fn heartbeat_tick_is_a_third_and_bounded() {
        let vis = Duration::from_secs(120);
        let cfg = Duration::from_secs(20);
        assert_eq!(
            tick_for(Some(Duration::from_secs(60)), cfg, vis),
            Duration::from_secs(20)
        );
        assert_eq!(
            tick_for(Some(Duration::from_secs(2)), cfg, vis),
            Duration::from_secs(1)
        );
        assert_eq!(tick_for(None, cfg, vis), cfg);
        assert_eq!(
            tick_for(Some(Duration::from_secs(3600)), cfg, vis),
            Duration::from_secs(40)
        );
    }
}
