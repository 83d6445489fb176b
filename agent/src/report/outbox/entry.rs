//! What an outbox entry is: the Step Functions callback and/or the job audit record to
//! deliver, and how far its delivery got. How entries are stored is in `store`, how they
//! are sent in `worker`.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::outcome::Outcome;
use crate::report::audit::JobAuditRecord;

/// The callback to send to Step Functions, with its strings already within the limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Callback {
    /// `SendTaskSuccess` with [`crate::outcome::SuccessOutput::output_json`].
    Success { output: String },
    /// `SendTaskFailure` with [`crate::outcome::Failure::error_field`] and
    /// [`crate::outcome::Failure::cause_json`].
    Failure { error: String, cause: String },
}

impl Callback {
    /// The callback an outcome calls for; `None` for a task closed upstream, which wants no
    /// answer (and could not take one).
    pub fn from_outcome(outcome: &Outcome) -> Option<Callback> {
        match outcome {
            Outcome::Completed(out) => Some(Callback::Success {
                output: out.output_json(),
            }),
            Outcome::Failed(failure) => Some(Callback::Failure {
                error: failure.error_field(),
                cause: failure.cause_json(),
            }),
            Outcome::Cancelled { .. } => None,
        }
    }

    pub(super) fn kind(&self) -> &'static str {
        match self {
            Callback::Success { .. } => "success",
            Callback::Failure { .. } => "failure",
        }
    }
}

/// One durable report: a callback and/or an audit record, with its delivery progress.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Unique, and sorts by creation time; also the file name stem.
    pub id: String,
    /// RFC 3339 UTC, milliseconds.
    pub created_at: String,
    /// Stored in full because delivery needs it; never logged (see [`Self::token_hash`]).
    #[serde(default)]
    pub task_token: Option<String>,
    /// [`crate::lock::token_hash`] of the token, for logs.
    #[serde(default)]
    pub token_hash: Option<String>,
    /// For logs; taken from the audit record when there is one.
    #[serde(default)]
    pub job_name: Option<String>,
    #[serde(default)]
    pub workflow_execution_id: Option<String>,
    #[serde(default)]
    pub callback: Option<Callback>,
    #[serde(default)]
    pub callback_done: bool,
    /// Why the callback was skipped: Step Functions said the task was already closed.
    #[serde(default)]
    pub task_closed: Option<String>,
    #[serde(default)]
    pub audit: Option<JobAuditRecord>,
    #[serde(default)]
    pub audit_done: bool,
    /// Failed delivery attempts so far; drives the backoff.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// Written by hand so the token never reaches a log through `{:?}`.
impl fmt::Debug for OutboxEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxEntry")
            .field("id", &self.id)
            .field("created_at", &self.created_at)
            .field(
                "task_token",
                &self.task_token.as_ref().map(|_| "<redacted>"),
            )
            .field("token_hash", &self.token_hash)
            .field("job_name", &self.job_name)
            .field("workflow_execution_id", &self.workflow_execution_id)
            .field("callback", &self.callback.as_ref().map(Callback::kind))
            .field("callback_done", &self.callback_done)
            .field("task_closed", &self.task_closed)
            .field("audit", &self.audit.as_ref().map(|a| &a.execution_status))
            .field("audit_done", &self.audit_done)
            .field("attempts", &self.attempts)
            .field("last_error", &self.last_error)
            .finish()
    }
}

/// A fresh entry id: creation time in milliseconds (so entries sort by age), then 64 random
/// bits.
fn entry_id(millis: u128) -> String {
    format!("{millis:013}-{:016x}", fastrand::u64(..))
}

/// A fresh entry id, for an entry whose id must be fixed before the entry exists (a job's
/// owner directory records it, so that storing the outcome twice replaces it).
pub fn new_entry_id() -> String {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    entry_id(millis)
}

impl OutboxEntry {
    /// A new entry with a fresh id. A callback without a token (a job that did not come
    /// from Step Functions) has nowhere to go and is dropped here, so [`Self::is_done`]
    /// never waits on it.
    pub fn new(
        task_token: Option<String>,
        callback: Option<Callback>,
        audit: Option<JobAuditRecord>,
    ) -> OutboxEntry {
        let now = SystemTime::now();
        let millis = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        OutboxEntry {
            id: entry_id(millis),
            created_at: humantime::format_rfc3339_millis(now).to_string(),
            token_hash: task_token.as_deref().map(crate::lock::token_hash),
            callback: if task_token.is_some() { callback } else { None },
            task_token,
            job_name: audit.as_ref().map(|a| a.job_name.clone()),
            workflow_execution_id: audit.as_ref().map(|a| a.workflow_execution_id.clone()),
            callback_done: false,
            task_closed: None,
            audit,
            audit_done: false,
            attempts: 0,
            last_error: None,
        }
    }

    /// Sets the names used in logs when there is no audit record to take them from.
    pub fn with_labels(
        mut self,
        job_name: impl Into<String>,
        workflow_execution_id: impl Into<String>,
    ) -> OutboxEntry {
        self.job_name = Some(job_name.into());
        self.workflow_execution_id = Some(workflow_execution_id.into());
        self
    }

    pub(super) fn callback_pending(&self) -> bool {
        self.callback.is_some() && !self.callback_done && self.task_token.is_some()
    }

    pub(super) fn audit_pending(&self) -> bool {
        self.audit.is_some() && !self.audit_done
    }

    /// Nothing is left to send.
    pub fn is_done(&self) -> bool {
        !self.callback_pending() && !self.audit_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::entry;
    use super::*;

    #[test]
    fn debug_never_shows_the_token_or_cause() {
        let e = entry("very-secret-token");
        let shown = format!("{e:?}");
        assert!(!shown.contains("very-secret-token"), "{shown}");
        assert!(!shown.contains("secret-ish"), "{shown}");
        assert!(
            shown.contains(&crate::lock::token_hash("very-secret-token")),
            "{shown}"
        );
    }

    #[test]
    fn callback_without_token_is_dropped_and_outcomes_map() {
        let e = OutboxEntry::new(
            None,
            Some(Callback::Success {
                output: "{}".into(),
            }),
            None,
        );
        assert!(e.callback.is_none() && e.is_done());
        assert_eq!(
            Callback::from_outcome(&Outcome::Cancelled {
                message: "x".into()
            }),
            None
        );
    }
}
