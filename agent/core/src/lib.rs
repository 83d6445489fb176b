//! # rsql-agent-core
//!
//! The parts of a job's run that know nothing of AWS: the job owner process
//! (`rsql-job-owner`) and everything it runs a job with. The owner links this crate alone,
//! so the compiler keeps the AWS SDKs out of it; the agent (`rsql_agent`) re-exports these
//! modules at the same paths.
//!
//! ```text
//!  job_owner::shim::run ─▶ lock::JobLock (held for the job's whole life, lease renewed)
//!        │                 cgroup::JobCgroup (the job's own cgroup, where there is one)
//!        ▼
//!  supervisor::Supervisor::start ─▶ stdout/stderr ─▶ joblog::JobLog
//!        ▼
//!  run::classify_run (outcome::classify, masked) ─▶ run::record_outcome (the lock state)
//!                                                 ─▶ job_owner::ExitRecord
//! ```

// No function over 120 lines of code (threshold in clippy.toml); the test code is exempt.
#![warn(clippy::too_many_lines)]

pub mod cgroup;
pub mod fsutil;
pub mod job;
pub mod job_owner;
pub mod joblog;
pub mod legacy;
pub mod lock;
pub mod masking;
pub mod outcome;
pub mod run;
pub mod stop;
pub mod supervisor;
pub mod trust;

/// An error and its sources on one line (`outer: inner: root`), each said once: a message
/// that already includes its source's text is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}
