//! The outbox: outcomes made durable before they are sent, and the worker that sends them.
//!
//! Owns `state_dir/outbox/`: one JSON file per [`OutboxEntry`] (a Step Functions callback
//! and/or a job audit record), and their delivery. The directory is the queue; nothing is
//! held in memory beyond one listing, so an outage of any length costs disk, never RAM.
//!
//! The rules it keeps:
//! - **Durable before sent.** [`Outbox::put`] returns only after the entry is on disk (temp
//!   file, fsync, rename, fsync of the directory), so a crash after it loses nothing. The
//!   caller may then delete the SQS message.
//! - **Delivered once.** Progress is persisted between the steps (callback, then audit), so a
//!   restart between them never re-sends the callback. A step that was sent but not
//!   recorded (crash or cut connection before the answer) is re-sent; Step Functions then
//!   answers that the task is closed and the audit's conditional write answers "already
//!   newer", so the replay changes nothing.
//! - **Retried until delivered or known closed**, under the one
//!   [`crate::aws::retry::RetryPolicy`]. A closed token skips the callback but the audit is
//!   still written. Nothing is ever dropped because a service was down.
//! - **Drained at start-up:** [`Outbox::run_worker`] begins with a pass over everything
//!   pending, then wakes on [`Outbox::put`] (or [`Outbox::notify`]), on the next due retry,
//!   and on a slow periodic rescan.
//!
//! Only one task in the process delivers a given entry at a time (an in-process claim);
//! open one outbox per state directory per process and clone the handle.
//!
//! Must not touch: processes, job logs, the lock, or SQS. The files hold task tokens, so the
//! directory is 0700 and the files 0600, and logs carry only [`crate::lock::token_hash`].
//!
//! The parts: `entry` (what an entry holds), `store` (the files: durable writes, reads,
//! listing, removal, quarantine) and `worker` (delivery: the callback, then the audit
//! record, under the retry policy). This file holds the [`Outbox`] handle they share and its
//! error.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

mod entry;
mod store;
mod worker;

pub use entry::{new_entry_id, Callback, OutboxEntry};
pub use worker::{Delivery, WorkerExit};

/// A failed outbox file operation.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot create the outbox directory {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the outbox entry {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the outbox directory {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the outbox entry {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode outbox entry {id}: {source}")]
    Encode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{id:?} is not an outbox entry id")]
    BadId { id: String },
    #[error("the outbox file task did not finish: {source}")]
    Task {
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The outbox directory. Cloning is cheap; clones share the wake-up and the claims.
#[derive(Debug, Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    wake: Notify,
    /// Ids being delivered right now by some task of this process.
    claims: Mutex<HashSet<String>>,
}

impl Outbox {
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Wakes the worker to look at the directory now.
    pub fn notify(&self) {
        // notify_one keeps a permit when the worker is busy, so a put during its pass is
        // picked up by the next pass instead of waiting for the periodic rescan.
        self.inner.wake.notify_one();
    }
}

/// Entries the tests of every part use.
#[cfg(test)]
mod fixtures {
    use super::{Callback, OutboxEntry};
    use crate::report::audit::JobAuditRecord;

    pub(super) fn record(status: &str) -> JobAuditRecord {
        JobAuditRecord {
            job_name: "job.sh".into(),
            workflow_execution_id: "ex-1".into(),
            workflow_id: "wf".into(),
            execution_status: status.into(),
            execution_start_ts: "2026-01-01T00:00:00.000Z".into(),
            execution_end_ts: None,
            instance_id: "i-1".into(),
            exit_code: Some(0),
            error_message: None,
            sql_state: None,
            log_group: None,
            log_stream: None,
            log_file: None,
            attempt: 1,
            duration_ms: Some(5),
            cpu_ms: None,
            max_rss_mb: None,
            log_complete: None,
            ssm_command_id: None,
            stage: None,
        }
    }

    pub(super) fn entry(token: &str) -> OutboxEntry {
        OutboxEntry::new(
            Some(token.to_string()),
            Some(Callback::Failure {
                error: "Rsql.ScriptFailed".into(),
                cause: "{\"message\":\"secret-ish details\"}".into(),
            }),
            Some(record("failed")),
        )
    }
}
