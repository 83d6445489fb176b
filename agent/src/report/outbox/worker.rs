//! The delivery worker: sends each entry's callback, then its audit record, under the one
//! retry policy, persisting progress between the steps, and removes the entry once
//! everything is delivered or known closed. [`Outbox::deliver`] sends one entry at once;
//! [`Outbox::run_worker`] and [`Outbox::drain`] go through the whole directory.
//!
//! Only one task in the process delivers a given entry at a time: it claims the id first,
//! then re-reads the entry, so a step another task finished is not repeated.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::PoisonError;
use std::time::Duration;

use tokio::time::Instant;

use super::entry::Callback;
use super::{Inner, Outbox, OutboxEntry, OutboxError};
use crate::aws::retry::{ErrorClass, RetryPolicy};
use crate::report::audit::dynamodb::{AuditWrite, JobAuditTable};
use crate::report::stepfunctions::{CallbackError, StepFunctions};

/// Even with no wake-up, the worker looks at the directory this often, to pick up entries
/// that some other handle (or an operator restoring a `.bad` file) put there.
const RESCAN_INTERVAL: Duration = Duration::from_secs(60);

/// How [`Outbox::deliver`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Every step is done and the entry is gone from the outbox. `task_closed` says why the
    /// callback was skipped, when Step Functions said the task was already closed (stopped,
    /// timed out, or answered by an earlier attempt whose reply was lost).
    Delivered { task_closed: Option<String> },
    /// The stop signal came first; the entry stays in the outbox for the worker or the next
    /// start.
    Stopped,
    /// Another task of this process is delivering this entry right now.
    Busy,
    /// The entry is not in the outbox: already delivered, or never [`Outbox::put`].
    Gone,
}

/// How [`Outbox::run_worker`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerExit {
    /// Entries still in the outbox when the worker stopped; they go out after the next start.
    pub pending: usize,
}

/// The result of one delivery attempt of one entry.
enum Attempt {
    Done,
    Failed(ErrorClass),
}

/// The Step Functions and audit clients an entry is delivered through.
#[derive(Debug, Clone, Copy)]
struct Targets<'a> {
    sfn: &'a StepFunctions,
    audit: Option<&'a JobAuditTable>,
}

/// Holds an entry's claim; released on drop, however delivery ends.
struct Claim<'a> {
    inner: &'a Inner,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.inner
            .claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

macro_rules! entry_event {
    ($level:expr, $entry:expr, $($rest:tt)+) => {
        tracing::event!(
            $level,
            outbox_id = %$entry.id,
            token_hash = $entry.token_hash.as_deref().unwrap_or("-"),
            job_name = $entry.job_name.as_deref().unwrap_or("-"),
            workflow_execution_id = $entry.workflow_execution_id.as_deref().unwrap_or("-"),
            $($rest)+
        )
    };
}

impl Outbox {
    fn claim(&self, id: &str) -> Option<Claim<'_>> {
        let mut claims = self
            .inner
            .claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        claims.insert(id.to_string()).then(|| Claim {
            inner: &self.inner,
            id: id.to_string(),
        })
    }

    /// Runs a file operation on the blocking pool: fsync can take long on network disks,
    /// and the runtime's threads also drive heartbeats.
    async fn blocking<T, F>(&self, op: F) -> Result<T, OutboxError>
    where
        T: Send + 'static,
        F: FnOnce(&Outbox) -> Result<T, OutboxError> + Send + 'static,
    {
        let outbox = self.clone();
        tokio::task::spawn_blocking(move || op(&outbox))
            .await
            .map_err(|source| OutboxError::Task { source })?
    }

    /// Persists delivery progress. A failure is logged, not returned: the step it records
    /// is already done upstream, and a replay after a crash is answered idempotently
    /// (closed task, already-newer audit), so the delivery is better off continuing.
    async fn record_progress(&self, entry: &OutboxEntry) {
        let snapshot = entry.clone();
        if let Err(e) = self.blocking(move |o| o.update(&snapshot)).await {
            entry_event!(
                tracing::Level::WARN,
                entry,
                error = %e,
                "cannot record outbox progress; a restart would repeat a step harmlessly",
            );
        }
    }

    /// Delivers `entry` (which must have been [`Self::put`]): the callback if any, then the
    /// audit record if any, retrying under `policy` until everything is delivered, the task
    /// is known closed (the callback is skipped, the audit still written), or `stop`
    /// resolves. Progress is persisted between steps; the entry is removed at the end.
    ///
    /// The state on disk is authoritative: the entry is re-read after it is claimed, so a
    /// step that another task finished is not repeated.
    pub async fn deliver(
        &self,
        entry: &OutboxEntry,
        sfn: &StepFunctions,
        audit: Option<&JobAuditTable>,
        policy: &RetryPolicy,
        stop: impl Future<Output = ()>,
    ) -> Result<Delivery, OutboxError> {
        let Some(_claim) = self.claim(&entry.id) else {
            return Ok(Delivery::Busy);
        };
        let id = entry.id.clone();
        let Some(mut entry) = self.blocking(move |o| o.load(&id)).await? else {
            return Ok(Delivery::Gone);
        };
        let targets = Targets { sfn, audit };
        tokio::pin!(stop);
        loop {
            let attempt = tokio::select! {
                biased;
                () = &mut stop => return Ok(Delivery::Stopped),
                attempt = self.attempt(&mut entry, targets) => attempt?,
            };
            match attempt {
                Attempt::Done => {
                    return Ok(Delivery::Delivered {
                        task_closed: entry.task_closed,
                    })
                }
                Attempt::Failed(class) => {
                    let delay = policy.delay_for(class, entry.attempts.saturating_sub(1));
                    tokio::select! {
                        biased;
                        () = &mut stop => return Ok(Delivery::Stopped),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One attempt at every step still pending for `entry`, persisting progress between them.
    /// Removes the entry once nothing is left.
    async fn attempt(
        &self,
        entry: &mut OutboxEntry,
        targets: Targets<'_>,
    ) -> Result<Attempt, OutboxError> {
        if entry.callback_pending() {
            if let Err(failure) = self.send_callback(entry, targets.sfn).await {
                return Ok(self.failed(entry, failure).await);
            }
            // Recorded only when another step follows; otherwise the removal below is the
            // record, and saves an fsync per job.
            if entry.audit_pending() {
                self.record_progress(entry).await;
            }
        }
        if entry.audit_pending() {
            if let Err(failure) = self.write_audit(entry, targets.audit).await {
                return Ok(self.failed(entry, failure).await);
            }
        }
        let id = entry.id.clone();
        self.blocking(move |o| o.remove(&id)).await?;
        entry_event!(
            tracing::Level::DEBUG,
            entry,
            attempts = entry.attempts,
            "outbox entry delivered and removed"
        );
        Ok(Attempt::Done)
    }

    async fn send_callback(
        &self,
        entry: &mut OutboxEntry,
        sfn: &StepFunctions,
    ) -> Result<(), (ErrorClass, String)> {
        let (Some(token), Some(callback)) = (entry.task_token.as_deref(), entry.callback.as_ref())
        else {
            return Ok(());
        };
        let result = match callback {
            Callback::Success { output } => sfn.succeed(token, output).await,
            Callback::Failure { error, cause } => sfn.fail(token, error, cause).await,
        };
        let kind = callback.kind();
        match result {
            Ok(()) => {
                entry.callback_done = true;
                entry_event!(
                    tracing::Level::INFO,
                    entry,
                    callback = kind,
                    attempts = entry.attempts,
                    "task callback delivered"
                );
                Ok(())
            }
            Err(CallbackError::TaskClosed { reason, .. }) => {
                // Stopped or timed out upstream, or our own earlier send got through and only
                // its answer was lost. Either way nobody waits for this callback any more.
                entry_event!(
                    tracing::Level::INFO,
                    entry,
                    callback = kind,
                    reason = %reason,
                    "the task is already closed upstream; callback skipped",
                );
                entry.callback_done = true;
                entry.task_closed = Some(reason);
                Ok(())
            }
            Err(e) => Err((e.class().unwrap_or(ErrorClass::Retryable), e.to_string())),
        }
    }

    async fn write_audit(
        &self,
        entry: &mut OutboxEntry,
        table: Option<&JobAuditTable>,
    ) -> Result<(), (ErrorClass, String)> {
        let Some(record) = entry.audit.as_ref() else {
            return Ok(());
        };
        let Some(table) = table else {
            // Written while a table was configured, delivered after it was removed from the
            // config: there is nowhere left to send it.
            entry_event!(
                tracing::Level::WARN,
                entry,
                status = %record.execution_status,
                "no audit table is configured any more; audit record dropped",
            );
            entry.audit_done = true;
            return Ok(());
        };
        match table.put(record).await {
            Ok(AuditWrite::Written) => {
                entry_event!(
                    tracing::Level::INFO,
                    entry,
                    status = %record.execution_status,
                    attempt = record.attempt,
                    "audit record written",
                );
                entry.audit_done = true;
                Ok(())
            }
            Ok(AuditWrite::AlreadyNewer {
                existing_status,
                existing_attempt,
            }) => {
                entry_event!(
                    tracing::Level::INFO,
                    entry,
                    status = %record.execution_status,
                    attempt = record.attempt,
                    existing_status = existing_status.as_deref().unwrap_or("?"),
                    existing_attempt = existing_attempt,
                    "the audit table already holds a newer state; replayed record not written"
                );
                entry.audit_done = true;
                Ok(())
            }
            Err(e) => Err((e.class(), e.to_string())),
        }
    }

    async fn failed(
        &self,
        entry: &mut OutboxEntry,
        (class, error): (ErrorClass, String),
    ) -> Attempt {
        entry.attempts = entry.attempts.saturating_add(1);
        match class {
            ErrorClass::Retryable => {
                entry_event!(
                    tracing::Level::WARN,
                    entry,
                    attempts = entry.attempts,
                    error = %error,
                    "report delivery failed; will retry",
                )
            }
            ErrorClass::Rejected => {
                entry_event!(
                    tracing::Level::ERROR,
                    entry,
                    attempts = entry.attempts,
                    error = %error,
                    "report rejected by AWS (a bug or missing permissions); will retry slowly",
                )
            }
        }
        entry.last_error = Some(error);
        self.record_progress(entry).await;
        Attempt::Failed(class)
    }

    /// The long-running delivery task the daemon spawns: drains everything pending at
    /// start-up, then delivers each [`Self::put`] promptly, until `stop` resolves.
    ///
    /// Pass as `stop` the moment to give up trying (the end of the shutdown grace), not the
    /// first SIGTERM: the final outcomes of jobs interrupted by a shutdown are written just
    /// before it and should still go out. Whatever is left is delivered after the next
    /// start.
    ///
    /// Entries are tried oldest first, one at a time, each under its own backoff. A
    /// retryable failure (network, throttling, 5xx) ends the pass early: the service is in
    /// trouble, and the oldest entry is the probe for its recovery. A rejected entry only
    /// delays itself, so one poisoned report never holds the rest back.
    pub async fn run_worker(
        self,
        sfn: StepFunctions,
        audit: Option<JobAuditTable>,
        policy: RetryPolicy,
        stop: impl Future<Output = ()>,
    ) -> WorkerExit {
        self.work(
            Targets {
                sfn: &sfn,
                audit: audit.as_ref(),
            },
            &policy,
            stop,
            false,
        )
        .await
    }

    /// Like [`Self::run_worker`] but returns as soon as the outbox is empty: for a process
    /// that must deliver its reports before it exits (the standalone wrapper).
    pub async fn drain(
        &self,
        sfn: &StepFunctions,
        audit: Option<&JobAuditTable>,
        policy: &RetryPolicy,
        stop: impl Future<Output = ()>,
    ) -> WorkerExit {
        self.work(Targets { sfn, audit }, policy, stop, true).await
    }

    async fn work(
        &self,
        targets: Targets<'_>,
        policy: &RetryPolicy,
        stop: impl Future<Output = ()>,
        until_empty: bool,
    ) -> WorkerExit {
        tokio::pin!(stop);
        // When each entry that failed may be tried again; bounded by the directory, since
        // ids no longer listed are forgotten on every pass.
        let mut due: HashMap<String, Instant> = HashMap::new();
        let mut paused_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut next_wake = now + RESCAN_INTERVAL;
            let listing = match paused_until {
                Some(until) if until > now => {
                    next_wake = until;
                    None
                }
                _ => {
                    paused_until = None;
                    Some(self.blocking(|o| o.pending()).await)
                }
            };
            match listing {
                None => {}
                Some(Err(e)) => {
                    tracing::error!(error = %e, "cannot list the outbox; will retry");
                    next_wake = now + policy.rejected_delay();
                }
                Some(Ok(entries)) => {
                    if until_empty && entries.is_empty() {
                        return WorkerExit { pending: 0 };
                    }
                    let listed_ids: HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
                    due.retain(|id, _| listed_ids.contains(id.as_str()));
                    for listed in entries {
                        if let Some(&at) = due.get(&listed.id) {
                            if at > Instant::now() {
                                next_wake = next_wake.min(at);
                                continue;
                            }
                        }
                        let pass = tokio::select! {
                            biased;
                            () = &mut stop => return self.exit(),
                            pass = self.attempt_listed(&listed.id, targets) => pass,
                        };
                        match pass {
                            Ok(None) => {
                                due.remove(&listed.id);
                            }
                            Ok(Some((class, attempts))) => {
                                let at = Instant::now()
                                    + policy.delay_for(class, attempts.saturating_sub(1));
                                due.insert(listed.id.clone(), at);
                                next_wake = next_wake.min(at);
                                if class == ErrorClass::Retryable {
                                    paused_until = Some(at);
                                    break;
                                }
                            }
                            Err(e) => {
                                entry_event!(
                                    tracing::Level::ERROR,
                                    listed,
                                    error = %e,
                                    "outbox file operation failed; will retry",
                                );
                                let at = Instant::now() + policy.rejected_delay();
                                due.insert(listed.id.clone(), at);
                                next_wake = next_wake.min(at);
                            }
                        }
                    }
                }
            }
            tokio::select! {
                biased;
                () = &mut stop => return self.exit(),
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep_until(next_wake) => {}
            }
        }
    }

    /// Claims and re-reads one listed entry, then makes one attempt. `Ok(None)`: delivered,
    /// gone, or busy elsewhere; `Ok(Some(..))`: failed with this class after this many
    /// attempts.
    async fn attempt_listed(
        &self,
        id: &str,
        targets: Targets<'_>,
    ) -> Result<Option<(ErrorClass, u32)>, OutboxError> {
        let Some(_claim) = self.claim(id) else {
            return Ok(None);
        };
        // Re-read under the claim: a deliver() that finished between our listing and our
        // claim has already removed it or recorded its progress.
        let owned = id.to_string();
        let Some(mut entry) = self.blocking(move |o| o.load(&owned)).await? else {
            return Ok(None);
        };
        Ok(match self.attempt(&mut entry, targets).await? {
            Attempt::Done => None,
            Attempt::Failed(class) => Some((class, entry.attempts)),
        })
    }

    fn exit(&self) -> WorkerExit {
        let pending = self.len().unwrap_or(0);
        if pending > 0 {
            tracing::warn!(
                pending,
                "outbox worker stopping with reports still pending; \
                 they are sent after the next start",
            );
        }
        WorkerExit { pending }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{entry, record};
    use super::*;
    use crate::aws::retry::Jitter;

    /// A client for an endpoint where nothing listens: every call is a refused connection.
    fn unreachable_sfn() -> StepFunctions {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let config = aws_sdk_sfn::Config::builder()
            .behavior_version(aws_sdk_sfn::config::BehaviorVersion::latest())
            .region(aws_sdk_sfn::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sfn::config::Credentials::for_tests())
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .retry_config(aws_sdk_sfn::config::retry::RetryConfig::disabled())
            .build();
        StepFunctions::new(aws_sdk_sfn::Client::from_conf(config))
    }

    fn fast_policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            jitter: Jitter::Full,
        }
    }

    #[tokio::test]
    async fn undeliverable_entry_stays_with_its_attempts_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let e = entry("t");
        outbox.put(&e).unwrap();
        let sfn = unreachable_sfn();
        let stop = tokio::time::sleep(Duration::from_millis(500));
        let delivery = outbox
            .deliver(&e, &sfn, None, &fast_policy(), stop)
            .await
            .unwrap();
        assert_eq!(delivery, Delivery::Stopped);
        let stored = outbox.load(&e.id).unwrap().expect("still in the outbox");
        assert!(stored.attempts >= 2, "{stored:?}");
        assert!(!stored.callback_done);
        let last = stored.last_error.expect("last error recorded");
        assert!(last.contains("SendTaskFailure"), "{last}");
    }

    #[tokio::test]
    async fn concurrent_delivery_of_one_entry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let e = entry("t");
        outbox.put(&e).unwrap();
        let sfn = unreachable_sfn();
        let policy = fast_policy();
        let (first, second) = tokio::join!(
            outbox.deliver(
                &e,
                &sfn,
                None,
                &policy,
                tokio::time::sleep(Duration::from_millis(200))
            ),
            async {
                tokio::task::yield_now().await;
                outbox
                    .deliver(&e, &sfn, None, &policy, std::future::pending())
                    .await
            }
        );
        assert_eq!(first.unwrap(), Delivery::Stopped);
        assert_eq!(second.unwrap(), Delivery::Busy);
    }

    #[tokio::test]
    async fn nothing_to_send_is_delivered_at_once_and_worker_drains() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let sfn = unreachable_sfn();
        // Audit only, but no table configured any more: dropped with a warning, not stuck.
        let audit_only = OutboxEntry::new(None, None, Some(record("completed")));
        outbox.put(&audit_only).unwrap();
        let delivery = outbox
            .deliver(
                &audit_only,
                &sfn,
                None,
                &fast_policy(),
                std::future::pending(),
            )
            .await
            .unwrap();
        assert_eq!(delivery, Delivery::Delivered { task_closed: None });
        assert_eq!(
            outbox
                .deliver(
                    &audit_only,
                    &sfn,
                    None,
                    &fast_policy(),
                    std::future::pending()
                )
                .await
                .unwrap(),
            Delivery::Gone
        );

        let mut done_callback = entry("t");
        done_callback.callback_done = true;
        done_callback.audit = None;
        outbox.put(&done_callback).unwrap();
        let exit = tokio::time::timeout(
            Duration::from_secs(5),
            outbox.drain(&sfn, None, &fast_policy(), std::future::pending()),
        )
        .await
        .expect("drain returns once empty");
        assert_eq!(exit, WorkerExit { pending: 0 });
    }
}
