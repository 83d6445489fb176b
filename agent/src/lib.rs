//! # rsql-agent
//!
//! A resident host agent that runs Amazon Redshift RSQL jobs handed to it by AWS Step
//! Functions, supervises them, keeps their logs, and reports every result back.
//!
//! ## Data path
//!
//! ```text
//!  SQS message     intake::sqs::SqsIntake ─────┐
//!  socket submit   intake::socket::SocketIntake┼─▶ job::JobSpec::parse ──bad──▶ Rsql.InvalidJob
//!  local workflow  workflow::Runner ───────────┘        │   (a failure callback when a token exists)
//!                                                       ▼
//!      lock::LockDir::try_acquire, lock::decision::decide ──finished──▶ replay the recorded outcome
//!                                                       │
//!                                                       ▼
//!      job_owner::client::start ─▶ rsql-job-owner (job_owner::shim::run)
//!         │  supervisor::Supervisor::start: own process group and cgroup, timeout, kill_grace
//!         │  once the owner says the job started: audit running
//!         │     (report::audit::dynamodb::JobAuditTable, a conditional write)
//!         │  stdout/stderr ─▶ joblog::JobLog (timestamped, durable)
//!         │                      └─▶ joblog::cloudwatch::Shipper (tails the file)
//!         │  every tick: SendTaskHeartbeat + ChangeMessageVisibility + lock lease
//!         ▼
//!      outcome::classify ─▶ report::outbox::Outbox (fsync)
//!                       ─▶ SendTaskSuccess/Failure + audit: final
//!                                                       │
//!                                                       ▼
//!      delete the SQS message; the owner has released the lock
//! ```
//!
//! Each stage has its own module; the supervisor and the job log know nothing about where a
//! job came from, so the daemon, the socket intake and the local workflow runner share them
//! (a local workflow runs each job in its own process, without an owner). The README has the
//! same picture and what every module owns; docs/contract.md has what goes in and out.

// No function over 120 lines of code (threshold in clippy.toml); the test code is exempt.
#![warn(clippy::too_many_lines)]

// The job's parts that know no AWS live in the core crate, which `rsql-job-owner` links
// alone; re-exported at their old paths, so `crate::supervisor::Supervisor` still names them.
pub use rsql_agent_core::{
    cgroup, error_chain, fsutil, job, legacy, lock, outcome, stop, supervisor, trust,
};

pub mod attempt;
pub mod aws;
pub mod config;
pub mod daemon;
pub mod exit;
pub mod fleet;
pub mod identity;
pub mod imds;
pub mod intake;
pub mod job_owner;
pub mod joblog;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod reload;
pub mod report;
pub mod scripts_check;
pub mod secrets;
pub mod signals;
pub mod slots;
pub mod startup;
pub mod state_dir_lock;
pub mod workflow;
