//! One shipment's life: make sure the stream exists, then read, batch, send (retrying under
//! the one [`RetryPolicy`](crate::aws::retry::RetryPolicy)) and record the position, until the
//! job has ended and its log is shipped to the end.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatchlogs::types::InputLogEvent;
use tokio::sync::watch;
use tokio::time::Instant;

use super::batch::Batch;
use super::state::{save_state, InFlight, ShipState};
use super::tail::{Filled, Tail};
use crate::aws::retry::{classify, ErrorClass, RetryPolicy};
use crate::joblog::JobLogError;

/// How often a shipment looks for new records at most; new records are sent within
/// `flush_interval` of being read from the child in any case.
const MAX_POLL: Duration = Duration::from_millis(250);
const MIN_POLL: Duration = Duration::from_millis(10);

/// One job attempt's shipment, as seen by the job's side: tell it the job has ended and
/// wait (bounded) for it to catch up. Dropping it also says the job has ended; the shipment
/// goes on in the background either way until the file is shipped.
#[derive(Debug)]
pub struct Shipment {
    log_stream: String,
    job_ended: watch::Sender<bool>,
    caught_up: watch::Receiver<bool>,
}

impl Shipment {
    pub fn log_stream(&self) -> &str {
        &self.log_stream
    }

    /// Says the job has ended (its log file is complete) and waits at most `timeout` for
    /// every record to be acknowledged. `true` when it caught up; otherwise the rest keeps
    /// shipping in the background.
    pub async fn finish(self, timeout: Duration) -> bool {
        let _ = self.job_ended.send(true);
        let mut caught_up = self.caught_up;
        let waited = tokio::time::timeout(timeout, caught_up.wait_for(|done| *done)).await;
        matches!(waited, Ok(Ok(_)))
    }
}

impl Shipment {
    pub(super) fn new(
        log_stream: String,
        job_ended: watch::Sender<bool>,
        caught_up: watch::Receiver<bool>,
    ) -> Shipment {
        Shipment {
            log_stream,
            job_ended,
            caught_up,
        }
    }
}

/// What every shipment of one [`Shipper`](super::Shipper) shares: the client, the group, the
/// retry policy and the log files being shipped.
#[derive(Debug)]
pub(super) struct Inner {
    pub(super) client: aws_sdk_cloudwatchlogs::Client,
    pub(super) log_group: String,
    pub(super) create_group: bool,
    pub(super) flush_interval: Duration,
    pub(super) policy: RetryPolicy,
    pub(super) state_dir: PathBuf,
    /// Log files with a shipment running in this process, so none is shipped twice at once.
    pub(super) active: Mutex<HashSet<PathBuf>>,
}

impl Inner {
    pub(super) fn active(&self) -> MutexGuard<'_, HashSet<PathBuf>> {
        // Every update is a single insert or remove: a poisoned set is still consistent.
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The life of one shipment: make sure the stream exists, then read, batch, send and record
/// the position until the job has ended and the file is shipped to its end.
pub(super) async fn run_shipment(
    inner: &Inner,
    state_path: PathBuf,
    mut state: ShipState,
    mut job_ended: watch::Receiver<bool>,
    caught_up: watch::Sender<bool>,
) {
    ensure_stream(inner, &state.log_group, &state.log_stream).await;
    settle_in_flight(inner, &mut state).await;
    let poll = (inner.flush_interval / 4).clamp(MIN_POLL, MAX_POLL);
    let mut tail = open_tail(inner, &state).await;
    let mut batch = Batch::default();
    let mut deadline: Option<Instant> = None;
    let mut ended = *job_ended.borrow();
    let mut read_failures = 0u32;
    while let Some(mut reading) = tail.take() {
        // Read whether the job had ended *before* filling: then a drained file is complete.
        let ended_before_fill = ended;
        let filled = tokio::task::spawn_blocking(move || {
            let mut batch = batch;
            let filled = reading.fill(&mut batch);
            (reading, batch, filled)
        })
        .await;
        let (reading, filled_batch, filled) = match filled {
            Ok(out) => out,
            Err(e) => {
                // A panic in the reader: give up here; the state on disk resumes it at the
                // next start.
                tracing::error!(error = %e, "the log reader failed; shipping stops until the agent restarts");
                return;
            }
        };
        tail = Some(reading);
        batch = filled_batch;
        let full = match filled {
            Ok(Filled::Full) => true,
            Ok(Filled::Drained) => {
                read_failures = 0;
                false
            }
            Err(e) => {
                let delay = inner.policy.delay(read_failures);
                read_failures = read_failures.saturating_add(1);
                tracing::warn!(error = %e, "cannot read the job log; trying again");
                tokio::time::sleep(delay).await;
                if let Some(reading) = tail.as_mut() {
                    if let Err(e) = reading.reopen() {
                        tracing::warn!(error = %e, "cannot reopen the job log");
                    }
                }
                continue;
            }
        };
        let drained = !full;
        if let Some(first) = batch.events().first() {
            if deadline.is_none() {
                // Due `flush_interval` after the line was read from the child, not after we
                // noticed it, so a line is visible within flush_interval plus one request.
                let age = SystemTime::now()
                    .duration_since(
                        SystemTime::UNIX_EPOCH
                            + Duration::from_millis(u64::try_from(first.timestamp_ms).unwrap_or(0)),
                    )
                    .unwrap_or_default();
                deadline = Some(Instant::now() + inner.flush_interval.saturating_sub(age));
            }
        }
        let due = deadline.is_some_and(|d| Instant::now() >= d);
        if !batch.is_empty() && (full || due || (ended_before_fill && drained)) {
            send_batch(inner, &state_path, &mut state, &mut batch).await;
            deadline = None;
            continue;
        }
        if batch.is_empty() && drained && ended_before_fill {
            break;
        }
        let wait = match deadline {
            Some(d) => poll.min(d.saturating_duration_since(Instant::now())),
            None => poll,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = job_ended.changed(), if !ended => {
                // A dropped sender means the job side is gone: the job has ended too.
                ended = changed.is_err() || *job_ended.borrow();
            }
        }
    }
    if let Err(e) = fs::remove_file(&state_path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %state_path.display(), error = %e, "cannot remove the finished shipment's state");
        }
    }
    tracing::debug!(log_stream = %state.log_stream, log_file = %state.log_file.display(), "log shipment finished");
    let _ = caught_up.send(true);
}

/// Creates the stream, and the group when it is missing and `create_group` allows; an
/// existing one is fine. Retries until it succeeds: the log is safe in the file meanwhile.
async fn ensure_stream(inner: &Inner, group: &str, stream: &str) {
    let mut failures = 0u32;
    loop {
        let created = inner
            .client
            .create_log_stream()
            .log_group_name(group)
            .log_stream_name(stream)
            .send()
            .await;
        let failed = match created {
            Ok(_) => return,
            Err(e) => classify(&e),
        };
        match failed.code.as_deref() {
            Some("ResourceAlreadyExistsException") => return,
            Some("ResourceNotFoundException") if inner.create_group => {
                match inner
                    .client
                    .create_log_group()
                    .log_group_name(group)
                    .send()
                    .await
                {
                    Ok(_) => {
                        tracing::info!(log_group = group, "created the log group");
                        continue;
                    }
                    Err(e) => {
                        let failed = classify(&e);
                        if failed.code.as_deref() == Some("ResourceAlreadyExistsException") {
                            continue;
                        }
                        let delay = inner.policy.delay_for(failed.class, failures);
                        failures = failures.saturating_add(1);
                        tracing::warn!(log_group = group, error = %failed.detail, retry_in_ms = delay.as_millis() as u64, "cannot create the log group");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
            code => {
                let class = if code == Some("ResourceNotFoundException") {
                    // The group is missing and we may not create it: an operator has to.
                    ErrorClass::Rejected
                } else {
                    failed.class
                };
                let delay = inner.policy.delay_for(class, failures);
                failures = failures.saturating_add(1);
                tracing::warn!(log_group = group, log_stream = stream, error = %failed.detail, retry_in_ms = delay.as_millis() as u64, "cannot create the log stream");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Asks CloudWatch whether the batch recorded in flight by an earlier run arrived; if it
/// did, shipping resumes after it instead of sending it again.
async fn settle_in_flight(inner: &Inner, state: &mut ShipState) {
    let Some(in_flight) = state.in_flight.take() else {
        return;
    };
    if last_event_is(inner, state, &in_flight).await {
        tracing::info!(
            offset = in_flight.end.offset,
            "the batch in flight when shipping stopped had arrived; not sending it again"
        );
        state.position = in_flight.end;
    }
}

/// Opens the job log at the shipped position, retrying until it can; `None` when the file
/// is gone.
async fn open_tail(inner: &Inner, state: &ShipState) -> Option<Tail> {
    let mut open_failures = 0u32;
    loop {
        match Tail::open(&state.log_file, state.position) {
            Ok(tail) => break Some(tail),
            Err(JobLogError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(log_file = %state.log_file.display(), "the job log is gone; stopping its shipment");
                break None;
            }
            Err(e) => {
                let delay = inner.policy.delay(open_failures);
                open_failures = open_failures.saturating_add(1);
                tracing::warn!(error = %e, "cannot open the job log for shipping; trying again");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Sends one batch: recorded in flight first, then sent, then the new position saved.
async fn send_batch(inner: &Inner, state_path: &Path, state: &mut ShipState, batch: &mut Batch) {
    if let Some(last) = batch.events().last() {
        state.in_flight = Some(InFlight {
            end: batch.end(),
            last_timestamp_ms: last.timestamp_ms,
            last_message: last.message.clone(),
        });
        save_logged(state_path, state, "cannot record the batch in flight").await;
    }
    put(inner, state, batch).await;
    state.position = batch.end();
    state.in_flight = None;
    batch.clear();
    // Shipping goes on if this fails; a restart before the next save resends from the last.
    save_logged(state_path, state, "cannot record the shipped position").await;
}

/// Saves the shipment state on a blocking thread; a failure is logged with `what`.
async fn save_logged(state_path: &Path, state: &ShipState, what: &'static str) {
    let path = state_path.to_path_buf();
    let state = state.clone();
    match tokio::task::spawn_blocking(move || save_state(&path, &state)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "{what}"),
        Err(e) => tracing::warn!(error = %e, "{what}"),
    }
}

/// Whether the stream's newest event is the last event of `in_flight` (then that batch
/// arrived). An error answers `false`: sending a batch twice is better than losing it.
async fn last_event_is(inner: &Inner, state: &ShipState, in_flight: &InFlight) -> bool {
    let newest = inner
        .client
        .get_log_events()
        .log_group_name(&state.log_group)
        .log_stream_name(&state.log_stream)
        .start_from_head(false)
        .limit(1)
        .send()
        .await;
    match newest {
        Ok(out) => out.events().last().is_some_and(|e| {
            e.timestamp() == Some(in_flight.last_timestamp_ms)
                && e.message() == Some(in_flight.last_message.as_str())
        }),
        Err(e) => {
            tracing::warn!(error = %aws_sdk_cloudwatchlogs::error::DisplayErrorContext(&e), "cannot ask CloudWatch whether the last batch arrived; sending it again");
            false
        }
    }
}

/// Sends one batch until CloudWatch acknowledges it.
async fn put(inner: &Inner, state: &ShipState, batch: &Batch) {
    let mut failures = 0u32;
    loop {
        // Built per attempt: the SDK consumes its input, and the batch must survive a failure.
        let events: Vec<InputLogEvent> = batch
            .events()
            .iter()
            // Both required fields are set, so `build` cannot fail.
            .filter_map(|e| {
                InputLogEvent::builder()
                    .timestamp(e.timestamp_ms)
                    .message(e.message.clone())
                    .build()
                    .ok()
            })
            .collect();
        let sent = inner
            .client
            .put_log_events()
            .log_group_name(&state.log_group)
            .log_stream_name(&state.log_stream)
            .set_log_events(Some(events))
            .send()
            .await;
        let failed = match sent {
            Ok(out) => {
                if let Some(rejected) = out.rejected_log_events_info() {
                    // Too old or too new for CloudWatch: only the local file has them.
                    tracing::warn!(log_stream = %state.log_stream, ?rejected, "CloudWatch refused some events of a batch");
                }
                tracing::trace!(
                    events = batch.events().len(),
                    bytes = batch.bytes(),
                    "batch shipped"
                );
                return;
            }
            Err(e) => classify(&e),
        };
        match failed.code.as_deref() {
            // An earlier attempt of this batch got through after all.
            Some("DataAlreadyAcceptedException") => return,
            Some("ResourceNotFoundException") => {
                // Someone deleted the stream or group while we shipped.
                tracing::warn!(log_stream = %state.log_stream, "the log stream is gone; creating it again");
                ensure_stream(inner, &state.log_group, &state.log_stream).await;
                continue;
            }
            _ => {}
        }
        let delay = inner.policy.delay_for(failed.class, failures);
        failures = failures.saturating_add(1);
        tracing::warn!(log_stream = %state.log_stream, error = %failed.detail, attempt = failures, retry_in_ms = delay.as_millis() as u64, "cannot ship log events; the job is not held up, trying again");
        tokio::time::sleep(delay).await;
    }
}
