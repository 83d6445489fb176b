//! The receive loop: takes only as many messages as there are free job slots, watches the
//! running jobs, answers `drain` and the fleet's notices, and reloads the config.

use crate::aws::retry::RetryPolicy;
use crate::config::Config;
use crate::error_chain;
use crate::fleet::{Fleet, Load, Notice};
use crate::intake::socket::{self, Submission, SubmitReply};
use crate::intake::sqs::{Delivery, SqsError, SqsIntake};
use crate::lock::{self};
use crate::notify::{Notifier, Status};
use crate::reload;
use crate::signals::{Control, Controls};
use crate::slots::Slots;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use super::control;
use super::owned;
use super::validate::{handle, handle_submission, socket_validator};
use super::{drain, Daemon, DaemonError, JobStop, Shared};

/// How often old job logs and finished lock entries are cleaned up.
pub(super) const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(3600);

impl Daemon {
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
                    Some(Control::Stop(level)) => {
                        lp.apply(drain::Event::Stop(level), &self.notifier);
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
                notice = next_notice(&mut fleet), if fleet.is_some() => lp.apply(drain::Event::Notice(notice), &self.notifier),
                _ = sleep_until_some(lp.intake.stop_jobs_at()), if lp.intake.stop_jobs_at().is_some() => lp.apply(drain::Event::SpotStopTime, &self.notifier),
                _ = sleep_until_some(lp.retry_at), if lp.retry_at.is_some() => lp.retry_at = None,
                // Wait for a free slot first: never take a message there is no room to run.
                Some(submission) = submit_rx.recv(), if has_socket => lp.on_submission(submission),
                permit = lp.slots.acquire(), if has_sqs && lp.intake.is_open() && lp.receiving.is_none() && lp.retry_at.is_none() => {
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
        let now = matches!(lp.intake, drain::Intake::Stopping { now: true });
        lp.hand_off(HandOff {
            socket_task,
            submit_rx,
            control_task,
            background,
            notifier: &self.notifier,
            controls: &mut controls,
            controls_open,
            now,
        })
        .await;
        self.notifier.status("stopped");
        Ok(())
    }
}

/// The outbox worker and housekeeping, for the daemon's life.
pub(super) struct Background {
    pub(super) worker: JoinHandle<crate::report::outbox::WorkerExit>,
    pub(super) outbox_stop_tx: watch::Sender<bool>,
    pub(super) housekeeping: JoinHandle<()>,
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
pub(super) fn open_metrics(shared: &Shared) {
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

/// Resumes the CloudWatch shipments an earlier run left, except those of jobs still running
/// (their watchers take those up), before housekeeping can clean up old logs.
pub(super) fn resume_shipments(shared: &Shared, found: &[owned::Found]) {
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
pub(super) fn open_socket(
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
pub(super) struct Loop {
    pub(super) shared: Arc<Shared>,
    pub(super) slots: Slots,
    pub(super) jobs: JoinSet<()>,
    pub(super) jobs_stop_tx: watch::Sender<JobStop>,
    pub(super) jobs_stop_rx: watch::Receiver<JobStop>,
    /// The receive in flight, and the slot taken for its first message.
    pub(super) receiving: Option<JoinHandle<Result<Vec<Delivery>, SqsError>>>,
    pub(super) first: Option<OwnedSemaphorePermit>,
    pub(super) retry_at: Option<tokio::time::Instant>,
    pub(super) receive_failures: u32,
    /// Whether new jobs are taken (see `drain`).
    pub(super) intake: drain::Intake,
}

/// What the hand-off at shutdown takes over from the loop.
pub(super) struct HandOff<'a> {
    pub(super) socket_task: Option<JoinHandle<()>>,
    pub(super) submit_rx: tokio::sync::mpsc::Receiver<Submission>,
    pub(super) control_task: Option<JoinHandle<()>>,
    pub(super) background: Background,
    pub(super) notifier: &'a Notifier,
    pub(super) controls: &'a mut Controls,
    pub(super) controls_open: bool,
    /// A second stop came already: exit at once.
    pub(super) now: bool,
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
            intake: drain::Intake::Open,
        }
    }

    pub(super) fn status(&self) -> Status {
        status(&self.shared, &self.jobs, &self.slots)
    }

    pub(super) fn write_gauges(&self) {
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
            self.apply(drain::Event::DrainAsked, notifier);
        }
        let _ = asked.reply.send(control::ControlReply {
            ok: true,
            draining: !self.intake.is_open(),
            running: self.jobs.len(),
            outbox: self.shared.outbox.len().unwrap_or(0),
        });
    }

    /// Takes `event` through the intake rules (`drain::on`) and carries out what they say.
    pub(super) fn apply(&mut self, event: drain::Event, notifier: &Notifier) {
        let margin = self.shared.config.fleet.spot_stop_margin;
        let (intake, effects) = drain::on(self.intake, event, drain::Clock::now(), margin);
        self.intake = intake;
        for effect in effects {
            match effect {
                drain::Effect::StopIntake => self.stop_intake(notifier),
                drain::Effect::TellJobs(stop) => self.tell_jobs(stop),
            }
        }
    }

    /// Stops intake for good: nothing new is received or accepted, a receive in flight hands
    /// its messages back to the queue, and running jobs are watched and reported.
    fn stop_intake(&mut self, notifier: &Notifier) {
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

    /// Tells every running job's watch what the agent wants of it. A stop here comes from a
    /// Spot deadline: each job is stopped (SIGTERM, `kill_grace`, SIGKILL) and reported
    /// `Rsql.Interrupted`, so its Retry can start elsewhere at once, with its lock released.
    fn tell_jobs(&mut self, stop: JobStop) {
        if !self.jobs.is_empty() && matches!(stop, JobStop::Stop(_)) {
            tracing::warn!(
                running = self.jobs.len(),
                "the Spot interruption is near: stopping the running jobs; they are reported Rsql.Interrupted"
            );
        }
        let _ = self.jobs_stop_tx.send(stop);
    }

    fn load(&self) -> Load {
        Load {
            running: self.jobs.len(),
            draining: !self.intake.is_open(),
        }
    }

    fn on_submission(&mut self, submission: Submission) {
        let free = if !self.intake.is_open() {
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
            None if !self.intake.is_open() => SubmitReply::ShuttingDown,
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
}

/// `STATUS=` for the service manager. `free` is how many more jobs could start now (a slot
/// held for a receive in flight still counts as free).
pub(super) fn status<T: 'static>(shared: &Shared, jobs: &JoinSet<T>, slots: &Slots) -> Status {
    Status {
        running: jobs.len(),
        free: slots.size().saturating_sub(jobs.len()),
        outbox: shared.outbox.len().unwrap_or(0),
    }
}

/// Reloads the config file (SIGHUP): applies what is safe to change while running and names
/// every changed key that needs a restart. An invalid file changes nothing.
pub(super) async fn reload(shared: &Shared, slots: &mut Slots) {
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
pub(super) async fn return_unstarted(
    sqs: SqsIntake,
    task: JoinHandle<Result<Vec<Delivery>, SqsError>>,
) {
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

pub(super) async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn next_notice(fleet: &mut Option<Fleet>) -> Notice {
    match fleet {
        Some(fleet) => fleet.notice().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn join_some<T>(
    task: &mut Option<JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// Looks at every job owner directory left by an earlier agent: running owners to watch,
/// finished or dead ones to report. Also kills what is left of jobs whose owner died.
pub(super) async fn adopt_scan(shared: &Shared) -> Vec<owned::Found> {
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
