//! The resident daemon: wires intake, locks, the job owners and the reporters together.
//!
//! Owns: the receive loop (only as many messages as there are free job slots), the life of
//! one delivery (parse → lock decision → run with heartbeats → outcome in the outbox →
//! delete the message → unlock), heartbeats and cancellation, and the order of shutdown.
//! A job from the local socket (`intake::socket`) takes a slot in the same loop and runs the
//! same path; only its acknowledgement differs (the reply to its submitter, no SQS calls).
//! [`Daemon::run_one`] runs that same path for one job with no intake at all, and delivers
//! its report before returning: `rsql-wrapper run`, for hosts without the daemon.
//!
//! Its parts, by role:
//!
//! - `receive`: the receive loop ([`Daemon::run`]), slots, drain and the fleet's notices;
//! - `hand_off`: shutdown, a hand-off of the running jobs to the next agent;
//! - `standalone`: [`Daemon::run_one`];
//! - `validate`: a message or a socket submission, valid or rejected;
//! - `live`: one delivery driven for real (the state machine is `delivery`);
//! - `heartbeat`: the heartbeat period, the heartbeat loop, the task-open check;
//! - `ack`: the end of a delivery: outcome stored, message deleted, lock released;
//! - `audit`: the audit record and metrics a job's end writes;
//! - `owned`: a job under its owner process; `control`: the control socket.
//!
//! Must not touch: how a process is supervised, how a log is written, or how a report is
//! retried; those belong to `supervisor`, `joblog` and `report`.

use crate::attempt::{AttemptContext, AttemptError};
use crate::aws::retry::RetryPolicy;
use crate::aws::AwsClients;
use crate::config::Config;
use crate::fleet::FleetParts;
use crate::intake::socket::SocketError;
use crate::intake::sqs::{Delivery, SqsIntake};
use crate::job::{InvalidJob, JobRules, JobSpec};
use crate::joblog::cloudwatch::{Shipper, ShipperError};
use crate::notify::Notifier;
use crate::outcome::{ErrorName, Failure, FailureCause, Outcome};
use crate::report::audit::dynamodb::JobAuditTable;
use crate::report::outbox::{Outbox, OutboxError};
use crate::report::stepfunctions::StepFunctions;
use crate::secrets::DatabaseEnv;
use crate::state_dir_lock::{StateDirLock, StateDirLockError};
use crate::stop::StopLevel;
use std::sync::Arc;
use std::time::Duration;

mod ack;
mod adopt;
mod audit;
pub mod control;
mod delivery;
mod drain;
mod ending;
mod hand_off;
mod heartbeat;
mod live;
mod owned;
mod prepare;
mod receive;
mod standalone;
mod validate;

pub use heartbeat::tick_for;

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
    Owner(#[from] StateDirLockError),
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
    owners: prepare::Owners,
    /// This process's claim on `state_dir`, held for the daemon's life.
    _owner: StateDirLock,
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
        let owner = StateDirLock::claim(&config.agent.state_dir, role)?;
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
        let owners = prepare::Owners::open(&config.agent.state_dir, launcher, job_user).map_err(
            |source| DaemonError::OwnersDir {
                path: config.agent.state_dir.clone(),
                source,
            },
        )?;
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
}

/// What the agent wants of its running jobs, from the signal (or a Spot deadline) to each
/// job's owner process. A stop here is always [`crate::stop::StopReason::Interrupted`]: nothing the
/// agent decides is the job's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobStop {
    /// Let them run.
    Run,
    /// The agent is stopping (SIGTERM): stop watching; the jobs keep running under their
    /// owners and the next agent adopts them.
    HandOff,
    /// Stop the jobs at this level (a standalone run's SIGTERM, a Spot deadline):
    /// reported `Rsql.Interrupted`.
    Stop(StopLevel),
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
    /// Which kind of source this is, for the delivery rules (`delivery::on`).
    fn origin(&self) -> delivery::Origin {
        match self {
            Source::Sqs(_) => delivery::Origin::Sqs,
            Source::Local => delivery::Origin::Local,
        }
    }

    fn receive_count(&self) -> u32 {
        match self {
            Source::Sqs(delivery) => delivery.receive_count,
            Source::Local => 1,
        }
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
