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
//! - **Retried until delivered or known closed**, under the one [`RetryPolicy`]. A closed
//!   token skips the callback but the audit is still written. Nothing is ever dropped
//!   because a service was down.
//! - **Drained at start-up:** [`Outbox::run_worker`] begins with a pass over everything
//!   pending, then wakes on [`Outbox::put`] (or [`Outbox::notify`]), on the next due retry,
//!   and on a slow periodic rescan.
//!
//! Only one task in the process delivers a given entry at a time (an in-process claim);
//! open one outbox per state directory per process and clone the handle.
//!
//! Must not touch: processes, job logs, the lock, or SQS. The files hold task tokens, so the
//! directory is 0700 and the files 0600, and logs carry only [`crate::lock::token_hash`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, DirBuilder, File};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::audit::dynamodb::{AuditWrite, JobAuditTable};
use super::audit::JobAuditRecord;
use super::stepfunctions::{CallbackError, StepFunctions};
use crate::aws::retry::{ErrorClass, RetryPolicy};
use crate::fsutil;
use crate::outcome::Outcome;

/// The largest outbox entry: a success output (at most 262,144 bytes), a cause (32,768) and
/// an audit record, with room to spare.
const MAX_ENTRY_BYTES: u64 = 1 << 20;
const DIR_NAME: &str = "outbox";
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
const ENTRY_SUFFIX: &str = ".json";
const TMP_SUFFIX: &str = fsutil::TEMP_SUFFIX;
const BAD_SUFFIX: &str = ".bad";

/// Even with no wake-up, the worker looks at the directory this often, to pick up entries
/// that some other handle (or an operator restoring a `.bad` file) put there.
const RESCAN_INTERVAL: Duration = Duration::from_secs(60);

/// A temp file this old was left by a crash mid-[`Outbox::put`]; its put never returned, so
/// nobody relies on it.
const STALE_TMP_AGE: Duration = Duration::from_secs(600);

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

    fn kind(&self) -> &'static str {
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

    fn callback_pending(&self) -> bool {
        self.callback.is_some() && !self.callback_done && self.task_token.is_some()
    }

    fn audit_pending(&self) -> bool {
        self.audit.is_some() && !self.audit_done
    }

    /// Nothing is left to send.
    pub fn is_done(&self) -> bool {
        !self.callback_pending() && !self.audit_pending()
    }
}

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
    /// Opens (creating when needed) `state_dir/outbox`, tightens its mode to 0700 and clears
    /// temp files that a crash mid-put left behind.
    pub fn open(state_dir: &Path) -> Result<Outbox, OutboxError> {
        let dir = state_dir.join(DIR_NAME);
        let err = |source| OutboxError::Open {
            path: dir.clone(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)
            .map_err(err)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(DIR_MODE)).map_err(err)?;
        sync_dir(state_dir).map_err(err)?;
        let outbox = Outbox {
            inner: Arc::new(Inner {
                dir,
                wake: Notify::new(),
                claims: Mutex::new(HashSet::new()),
            }),
        };
        outbox.remove_stale_tmp();
        Ok(outbox)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn path_of(&self, id: &str) -> Result<PathBuf, OutboxError> {
        // Ids become file names; anything but our own alphabet could escape the directory.
        let valid = !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(OutboxError::BadId { id: id.to_string() });
        }
        Ok(self.inner.dir.join(format!("{id}{ENTRY_SUFFIX}")))
    }

    /// Writes `entry` durably, then wakes the worker. When this returns `Ok`, the entry
    /// survives a crash.
    pub fn put(&self, entry: &OutboxEntry) -> Result<(), OutboxError> {
        self.write(entry)?;
        self.notify();
        Ok(())
    }

    /// Replaces `entry`'s file with its new state, durably (same as [`Self::put`] without
    /// the wake-up).
    pub fn update(&self, entry: &OutboxEntry) -> Result<(), OutboxError> {
        self.write(entry)
    }

    fn write(&self, entry: &OutboxEntry) -> Result<(), OutboxError> {
        let path = self.path_of(&entry.id)?;
        let json = serde_json::to_vec_pretty(entry).map_err(|source| OutboxError::Encode {
            id: entry.id.clone(),
            source,
        })?;
        // The temp file is dot-prefixed, so a listing never mistakes a half-written file for
        // an entry.
        fsutil::write_atomic(&path, &json, FILE_MODE)
            .map_err(|source| OutboxError::Write { path, source })
    }

    /// Removes an entry durably. Removing an entry that is not there is not an error.
    pub fn remove(&self, id: &str) -> Result<(), OutboxError> {
        let path = self.path_of(id)?;
        let err = |source| OutboxError::Remove {
            path: path.clone(),
            source,
        };
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.inner.dir).map_err(err),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// Reads one entry; `None` when it is not there (or unreadable, which is logged).
    pub fn load(&self, id: &str) -> Result<Option<OutboxEntry>, OutboxError> {
        let path = self.path_of(id)?;
        Ok(self.read_entry(&path))
    }

    /// Every entry, oldest first. Files that do not parse are renamed to `*.bad` with a
    /// warning and skipped: one corrupt file must not block every report behind it.
    pub fn pending(&self) -> Result<Vec<OutboxEntry>, OutboxError> {
        let mut entries: Vec<OutboxEntry> = self
            .entry_paths()?
            .iter()
            .filter_map(|path| self.read_entry(path))
            .collect();
        entries.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        Ok(entries)
    }

    /// How many entries wait in the outbox.
    pub fn len(&self) -> Result<usize, OutboxError> {
        Ok(self.entry_paths()?.len())
    }

    pub fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self.len()? == 0)
    }

    /// Wakes the worker to look at the directory now.
    pub fn notify(&self) {
        // notify_one keeps a permit when the worker is busy, so a put during its pass is
        // picked up by the next pass instead of waiting for the periodic rescan.
        self.inner.wake.notify_one();
    }

    fn entry_paths(&self) -> Result<Vec<PathBuf>, OutboxError> {
        let err = |source| OutboxError::List {
            path: self.inner.dir.clone(),
            source,
        };
        let mut paths = Vec::new();
        for dirent in fs::read_dir(&self.inner.dir).map_err(err)? {
            let dirent = dirent.map_err(err)?;
            let name = dirent.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with('.') && name.ends_with(ENTRY_SUFFIX) {
                paths.push(dirent.path());
            }
        }
        Ok(paths)
    }

    fn read_entry(&self, path: &Path) -> Option<OutboxEntry> {
        let bytes = match crate::fsutil::read_bounded(path, MAX_ENTRY_BYTES) {
            Ok(bytes) => bytes,
            // Delivered and removed since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
                self.quarantine(
                    path,
                    &format!("it is larger than {MAX_ENTRY_BYTES} bytes, more than any report"),
                );
                return None;
            }
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot read an outbox entry; will try again",
                );
                return None;
            }
        };
        match serde_json::from_slice::<OutboxEntry>(&bytes) {
            // Sent, removed and claimed by its id: an entry whose id is not its file's name
            // could never be removed after delivery, so it would be sent forever, or never.
            Ok(entry)
                if path.file_name().and_then(|n| n.to_str())
                    != Some(format!("{}{ENTRY_SUFFIX}", entry.id).as_str()) =>
            {
                self.quarantine(
                    path,
                    &format!(
                        "its id {:?} does not match its file name (expected {}{ENTRY_SUFFIX})",
                        entry.id, entry.id
                    ),
                );
                None
            }
            Ok(entry) => Some(entry),
            Err(e) => {
                self.quarantine(path, &e);
                None
            }
        }
    }

    fn quarantine(&self, path: &Path, error: &dyn std::fmt::Display) {
        let mut bad = path.as_os_str().to_owned();
        bad.push(BAD_SUFFIX);
        match fs::rename(path, &bad) {
            Ok(()) => {
                let _ = sync_dir(&self.inner.dir);
                tracing::warn!(
                    path = %path.display(),
                    quarantined = %PathBuf::from(&bad).display(),
                    error = %error,
                    "an outbox entry is not valid; moved aside and skipped (its report is lost \
                     unless an operator repairs it and renames it back)"
                );
            }
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "an outbox entry is not valid and cannot be moved aside; skipped"
            ),
        }
    }

    fn remove_stale_tmp(&self) {
        let Ok(dir) = fs::read_dir(&self.inner.dir) else {
            return;
        };
        for dirent in dir.flatten() {
            let name = dirent.file_name();
            let is_tmp = name
                .to_str()
                .is_some_and(|n| n.starts_with('.') && n.ends_with(TMP_SUFFIX));
            let old = dirent
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TMP_AGE);
            if is_tmp && old {
                let _ = fs::remove_file(dirent.path());
            }
        }
    }

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

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::retry::Jitter;

    fn record(status: &str) -> JobAuditRecord {
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

    fn entry(token: &str) -> OutboxEntry {
        OutboxEntry::new(
            Some(token.to_string()),
            Some(Callback::Failure {
                error: "Rsql.ScriptFailed".into(),
                cause: "{\"message\":\"secret-ish details\"}".into(),
            }),
            Some(record("failed")),
        )
    }

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

    #[test]
    fn entries_are_durable_ordered_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let first = entry("token-1");
        let second = entry("token-2");
        outbox.put(&second).unwrap();
        outbox.put(&first).unwrap();
        let mode = fs::metadata(outbox.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let file = outbox.dir().join(format!("{}.json", first.id));
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // A reopen (a restart) sees both, oldest first by creation time.
        let reopened = Outbox::open(dir.path()).unwrap();
        let pending = reopened.pending().unwrap();
        let ids: Vec<_> = pending.iter().map(|e| e.id.as_str()).collect();
        let mut expected = [first.clone(), second.clone()];
        expected.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        assert_eq!(
            ids,
            expected.iter().map(|e| e.id.as_str()).collect::<Vec<_>>()
        );
        assert_eq!(pending.iter().find(|e| e.id == first.id), Some(&first));
        assert_eq!(reopened.len().unwrap(), 2);

        let mut updated = first.clone();
        updated.callback_done = true;
        reopened.update(&updated).unwrap();
        assert_eq!(reopened.load(&first.id).unwrap(), Some(updated));

        reopened.remove(&first.id).unwrap();
        reopened.remove(&first.id).unwrap();
        assert_eq!(reopened.len().unwrap(), 1);
        assert!(matches!(
            reopened.remove("../x"),
            Err(OutboxError::BadId { .. })
        ));
    }

    #[test]
    fn an_entry_larger_than_any_report_is_set_aside_unread() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let good = entry("t");
        outbox.put(&good).unwrap();
        let huge = outbox.dir().join("0000000000000-huge.json");
        fs::File::create(&huge)
            .unwrap()
            .set_len(MAX_ENTRY_BYTES + 1)
            .unwrap();
        assert_eq!(outbox.pending().unwrap(), vec![good]);
        assert!(outbox.dir().join("0000000000000-huge.json.bad").exists());
    }

    #[test]
    fn unparseable_files_are_quarantined_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let good = entry("t");
        outbox.put(&good).unwrap();
        fs::write(
            outbox.dir().join("0000000000000-garbage.json"),
            b"{\"id\": 3",
        )
        .unwrap();
        fs::write(outbox.dir().join(".inflight.json.tmp"), b"half").unwrap();
        let pending = outbox.pending().unwrap();
        assert_eq!(pending, vec![good]);
        assert!(outbox.dir().join("0000000000000-garbage.json.bad").exists());
        assert_eq!(outbox.len().unwrap(), 1);
    }

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
