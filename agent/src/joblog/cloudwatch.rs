//! The CloudWatch Logs shipper: tails one job attempt's local log file from a byte offset and
//! sends its records, as events, to one log stream of `[logs.cloudwatch] log_group`.
//!
//! Owns: the stream's name ([`stream_name`]), creating the stream (and the group when
//! `create_group = true`), turning records into events, cutting batches within the
//! `PutLogEvents` limits, when a batch is sent, retrying it under the one
//! [`RetryPolicy`], and the shipping state in `<state_dir>/shipper/` (where each shipment
//! stands, so a restart resumes it).
//!
//! Must not touch: the log file itself (it only reads it, so a slow or absent CloudWatch can
//! never hold up the child or the writer), the job, or its outcome. The daemon decides when a
//! shipment starts and how long the final flush may take.
//!
//! # Records → events
//!
//! Each record (see the [record format](super)) becomes one event: the message is
//! [`display`] of the payload (valid UTF-8; invalid bytes as `\xNN`) without the newline, the
//! timestamp is the record's. A message longer than [`MAX_MESSAGE_BYTES`] (a 256 KiB payload
//! can grow under escaping) becomes consecutive events, cut on character boundaries. A
//! fragment record (`out+`/`err+`, a line longer than 256 KiB or a last line without a
//! newline) is an event like any other: CloudWatch shows a long line as consecutive events,
//! and nothing marks where it ends. An empty line is sent as a single space, because
//! CloudWatch refuses empty messages. stdout and stderr go to the same stream, in file order.
//!
//! # Where shipping stands
//!
//! `<state_dir>/shipper/<sha256(log file)[..16]>.json` holds the log file, group, stream and
//! the [`Position`] acknowledged so far: every record before `offset`, plus the first `skip`
//! events of the record at `offset` (a record whose events spread over two batches). It is
//! written (temp file, fsync, rename) after every acknowledged batch, and removed once the
//! job has ended and everything up to the end of the file is acknowledged. The directory is
//! the index of unfinished shipments: [`Shipper::resume_all`] restarts each one at daemon
//! start. A batch acknowledged by CloudWatch but not yet recorded when the agent is killed is
//! sent again after the restart (CloudWatch has no idempotency key); every other line is
//! sent exactly once.

use std::collections::HashSet;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatchlogs::types::InputLogEvent;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use super::{display, read_records_from, JobLogError, Record, RecordReader};
use crate::config::CloudWatchSettings;
use crate::report::retry::{classify, ErrorClass, RetryPolicy};

/// What CloudWatch counts on top of each message's UTF-8 bytes, per event.
pub const EVENT_OVERHEAD: usize = 26;
/// The largest event CloudWatch takes, overhead included.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// The longest message of one event.
pub const MAX_MESSAGE_BYTES: usize = MAX_EVENT_BYTES - EVENT_OVERHEAD;
/// The largest `PutLogEvents` batch, counting [`EVENT_OVERHEAD`] per event.
pub const MAX_BATCH_BYTES: usize = 1_048_576;
/// The most events in one `PutLogEvents` batch.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// The events of one batch must lie within less than this many milliseconds.
pub const MAX_BATCH_SPAN_MS: i64 = 24 * 3600 * 1000;

/// Longest stream name components; the whole name stays under CloudWatch's 512 characters.
const MAX_STREAM_COMPONENT: usize = 200;
const MAX_ATTEMPT_COMPONENT: usize = 64;

/// How often a shipment looks for new records at most; new records are sent within
/// `flush_interval` of being read from the child in any case.
const MAX_POLL: Duration = Duration::from_millis(250);
const MIN_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum ShipperError {
    #[error("cannot create the shipper state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the shipping state {path}")]
    SaveState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the shipping state {path}")]
    ReadState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the shipping state {path} is not valid")]
    BadState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Log(#[from] JobLogError),
}

/// The log stream of one job attempt:
/// `<workflow_execution_id>/<job_name>/<UTC start YYYYMMDDTHHMMSSZ>/<attempt_id>`.
///
/// In each component `:`, `*` (CloudWatch refuses them), `/` (so the components stay
/// apart) and control characters become `_`; an empty one becomes `_`; a component over 200
/// bytes (64 for the attempt) is cut and ends in `-` and 8 hex digits of its SHA-256, so
/// distinct names stay distinct. A person finds a job's streams by the prefix
/// `<workflow_execution_id>/<job_name>/`.
pub fn stream_name(
    workflow_execution_id: &str,
    job_name: &str,
    started_at: SystemTime,
    attempt_id: &str,
) -> String {
    format!(
        "{}/{}/{}/{}",
        stream_component(workflow_execution_id, MAX_STREAM_COMPONENT),
        stream_component(job_name, MAX_STREAM_COMPONENT),
        super::compact_utc(started_at),
        stream_component(attempt_id, MAX_ATTEMPT_COMPONENT),
    )
}

fn stream_component(raw: &str, max: usize) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c == ':' || c == '*' || c == '/' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    if out.len() > max {
        let digest = hex::encode(Sha256::digest(raw.as_bytes()));
        let mut cut = max - 9;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('-');
        out.push_str(&digest[..8]);
    }
    out
}

/// Cuts `text` into pieces of at most `max` bytes, on character boundaries, in order. An
/// empty text gives no pieces.
pub fn split_message(text: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = piece_end(rest, max);
        let (piece, tail) = rest.split_at(end);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// The length of the next piece of `rest`: at most `max` bytes, on a char boundary, and never
/// zero (a `max` below one character's width still makes progress).
fn piece_end(rest: &str, max: usize) -> usize {
    if rest.len() <= max {
        return rest.len();
    }
    let mut end = max;
    while end > 0 && !rest.is_char_boundary(end) {
        end -= 1;
    }
    if end == 0 {
        end = rest.chars().next().map_or(rest.len(), char::len_utf8);
    }
    end
}

/// How far shipping has got: every record before `offset` is acknowledged, and so are the
/// first `skip` events of the record that starts at `offset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub offset: u64,
    #[serde(default)]
    pub skip: u32,
}

/// One event, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub timestamp_ms: i64,
    pub message: String,
}

/// A batch being filled; always within the `PutLogEvents` limits.
#[derive(Debug, Default)]
pub struct Batch {
    events: Vec<Event>,
    /// Message bytes plus [`EVENT_OVERHEAD`] per event.
    bytes: usize,
    /// Where shipping stands once this batch is acknowledged.
    end: Position,
}

impl Batch {
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Bytes as CloudWatch counts them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn end(&self) -> Position {
        self.end
    }

    /// Whether one more event with this message length and timestamp stays within the
    /// limits. Any single event fits an empty batch: messages are already cut to size.
    fn fits(&self, message_len: usize, timestamp_ms: i64) -> bool {
        let Some(first) = self.events.first() else {
            return true;
        };
        self.events.len() < MAX_BATCH_EVENTS
            && self.bytes + message_len + EVENT_OVERHEAD <= MAX_BATCH_BYTES
            && timestamp_ms - first.timestamp_ms < MAX_BATCH_SPAN_MS
    }

    fn push(&mut self, event: Event, end: Position) {
        self.bytes += event.message.len() + EVENT_OVERHEAD;
        self.events.push(event);
        self.end = end;
    }

    fn clear(&mut self) {
        self.events.clear();
        self.bytes = 0;
    }
}

/// A record being cut into events.
#[derive(Debug)]
struct Pending {
    timestamp_ms: i64,
    text: String,
    /// Byte index in `text` of the next piece.
    cursor: usize,
    /// Index of the next piece among the record's events.
    index: u32,
    /// The record's first byte and the byte just past it in the file.
    start: u64,
    end: u64,
}

impl Pending {
    fn new(record: &Record, start: u64, end: u64, timestamp_ms: i64) -> Pending {
        let mut text = display(&record.payload);
        if text.is_empty() {
            // CloudWatch refuses empty messages; a blank line still counts as a line.
            text.push(' ');
        }
        Pending {
            timestamp_ms,
            text,
            cursor: 0,
            index: 0,
            start,
            end,
        }
    }

    fn next_len(&self) -> Option<usize> {
        let rest = &self.text[self.cursor..];
        (!rest.is_empty()).then(|| piece_end(rest, MAX_MESSAGE_BYTES))
    }

    /// Takes the next piece as an event, with the position once it is acknowledged.
    fn take(&mut self, len: usize) -> (Event, Position) {
        let message = self.text[self.cursor..self.cursor + len].to_string();
        self.cursor += len;
        self.index += 1;
        let after = if self.cursor >= self.text.len() {
            Position {
                offset: self.end,
                skip: 0,
            }
        } else {
            Position {
                offset: self.start,
                skip: self.index,
            }
        };
        (
            Event {
                timestamp_ms: self.timestamp_ms,
                message,
            },
            after,
        )
    }
}

/// Why [`Tail::fill`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The next event does not fit: send the batch.
    Full,
    /// No complete record is left in the file for now.
    Drained,
}

/// The reading side of a shipment: the file from a [`Position`], and the record being cut
/// into events. Blocking file reads: run it off the async threads.
#[derive(Debug)]
pub struct Tail {
    reader: RecordReader,
    pending: Option<Pending>,
    /// Events of the record at `resume.offset` already acknowledged before a restart.
    resume: Position,
    /// The last timestamp handed out; CloudWatch wants events in order, and the file's own
    /// guarantee is kept here too in case a file was appended to across a clock step.
    last_ms: i64,
}

impl Tail {
    pub fn open(path: &Path, from: Position) -> Result<Tail, JobLogError> {
        Ok(Tail {
            reader: read_records_from(path, from.offset)?,
            pending: None,
            resume: from,
            last_ms: i64::MIN,
        })
    }

    /// Opens the file again where the last complete record ended (after a read error).
    fn reopen(&mut self) -> Result<(), JobLogError> {
        let offset = self.reader.offset();
        let path = self.reader.path().to_path_buf();
        self.reader = read_records_from(&path, offset)?;
        Ok(())
    }

    /// Moves events into `batch` until the next one does not fit or the file has no more
    /// complete records. Memory stays bounded: one record waits here, the rest stays in the
    /// file.
    pub fn fill(&mut self, batch: &mut Batch) -> Result<Filled, JobLogError> {
        loop {
            if self.pending.is_none() {
                let start = self.reader.offset();
                let record = match self.reader.next() {
                    None => return Ok(Filled::Drained),
                    Some(Ok(record)) => record,
                    Some(Err(JobLogError::Malformed { path, offset })) => {
                        // Not written by the agent; it stays in the local file.
                        tracing::warn!(path = %path.display(), offset, "skipping a malformed record of the job log");
                        continue;
                    }
                    Some(Err(e)) => return Err(e),
                };
                let ms = record
                    .at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                    .unwrap_or(0);
                self.last_ms = self.last_ms.max(ms);
                let mut pending = Pending::new(&record, start, self.reader.offset(), self.last_ms);
                if start == self.resume.offset && self.resume.skip > 0 {
                    for _ in 0..self.resume.skip {
                        match pending.next_len() {
                            Some(len) => {
                                pending.take(len);
                            }
                            None => break,
                        }
                    }
                    self.resume.skip = 0;
                }
                self.pending = Some(pending);
            }
            if let Some(pending) = self.pending.as_mut() {
                while let Some(len) = pending.next_len() {
                    if !batch.fits(len, pending.timestamp_ms) {
                        return Ok(Filled::Full);
                    }
                    let (event, after) = pending.take(len);
                    batch.push(event, after);
                }
            }
            self.pending = None;
        }
    }
}

/// What `<state_dir>/shipper/<id>.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ShipState {
    log_file: PathBuf,
    log_group: String,
    log_stream: String,
    #[serde(flatten)]
    position: Position,
    /// The batch being sent, recorded before the send: if the process dies before the new
    /// position is saved, the next start asks CloudWatch whether that batch arrived instead
    /// of sending it twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    in_flight: Option<InFlight>,
}

/// What identifies a batch sent but not yet recorded as acknowledged: where shipping stands
/// after it, and its last event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InFlight {
    end: Position,
    last_timestamp_ms: i64,
    last_message: String,
}

fn save_state(path: &Path, state: &ShipState) -> Result<(), ShipperError> {
    let err = |source| ShipperError::SaveState {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_vec(state)
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    // A host crash leaves the old state or the new, never a torn one.
    crate::fsutil::write_atomic(path, &text, 0o640).map_err(err)
}

fn load_state(path: &Path) -> Result<ShipState, ShipperError> {
    let text = fs::read(path).map_err(|source| ShipperError::ReadState {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| ShipperError::BadState {
        path: path.to_path_buf(),
        source,
    })
}

/// Ships job logs to one log group; built once per daemon, cheap to clone.
#[derive(Debug, Clone)]
pub struct Shipper {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: aws_sdk_cloudwatchlogs::Client,
    log_group: String,
    create_group: bool,
    flush_interval: Duration,
    policy: RetryPolicy,
    state_dir: PathBuf,
    /// Log files with a shipment running in this process, so none is shipped twice at once.
    active: Mutex<HashSet<PathBuf>>,
}

impl Inner {
    fn active(&self) -> MutexGuard<'_, HashSet<PathBuf>> {
        // Every update is a single insert or remove: a poisoned set is still consistent.
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }
}

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

impl Shipper {
    /// `state_dir` is `[agent] state_dir`; the shipments live in its `shipper/`.
    pub fn new(
        client: aws_sdk_cloudwatchlogs::Client,
        settings: &CloudWatchSettings,
        state_dir: &Path,
    ) -> Result<Shipper, ShipperError> {
        let dir = state_dir.join("shipper");
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&dir)
            .map_err(|source| ShipperError::StateDir {
                path: dir.clone(),
                source,
            })?;
        Ok(Shipper {
            inner: Arc::new(Inner {
                client,
                log_group: settings.log_group.clone(),
                create_group: settings.create_group,
                flush_interval: settings.flush_interval,
                // Capped low enough that shipping resumes within seconds of an outage's end.
                policy: RetryPolicy {
                    max: Duration::from_secs(10),
                    ..RetryPolicy::default()
                },
                state_dir: dir,
                active: Mutex::new(HashSet::new()),
            }),
        })
    }

    pub fn log_group(&self) -> &str {
        &self.inner.log_group
    }

    fn state_path(&self, log_file: &Path) -> PathBuf {
        let digest = hex::encode(Sha256::digest(log_file.as_os_str().as_encoded_bytes()));
        self.inner.state_dir.join(format!("{}.json", &digest[..16]))
    }

    /// Starts shipping a running job's log file to `log_stream`, from its beginning. Must be
    /// called inside the tokio runtime. The shipment is recorded on disk first, so a restart
    /// resumes it.
    pub fn start(&self, log_file: &Path, log_stream: &str) -> Result<Shipment, ShipperError> {
        let state = ShipState {
            log_file: log_file.to_path_buf(),
            log_group: self.inner.log_group.clone(),
            log_stream: log_stream.to_string(),
            position: Position::default(),
            in_flight: None,
        };
        let path = self.state_path(log_file);
        save_state(&path, &state)?;
        Ok(self.spawn(path, state, false))
    }

    /// Resumes the shipment of a job that is still running (adopted after an agent restart)
    /// from the position saved on disk; starts it from the beginning when none was saved.
    pub fn resume(&self, log_file: &Path, log_stream: &str) -> Result<Shipment, ShipperError> {
        let path = self.state_path(log_file);
        match load_state(&path) {
            Ok(state) if state.log_stream == log_stream => {
                tracing::info!(log_file = %state.log_file.display(), log_stream = %state.log_stream, offset = state.position.offset, "resuming log shipment of a running job");
                Ok(self.spawn(path, state, false))
            }
            _ => self.start(log_file, log_stream),
        }
    }

    /// Resumes every shipment an earlier run left unfinished whose job has ended, that is
    /// every one but those of `running` (log files of jobs still running under their owners,
    /// which [`Shipper::resume`] takes up). Returns how many were resumed. Call once at
    /// start, before old logs are cleaned up.
    pub fn resume_all(&self, running: &HashSet<PathBuf>) -> usize {
        let entries = match fs::read_dir(&self.inner.state_dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %self.inner.state_dir.display(), error = %e, "cannot list unfinished log shipments");
                return 0;
            }
        };
        let mut resumed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let state = match load_state(&path) {
                Ok(state) => state,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an unreadable log shipment state");
                    continue;
                }
            };
            if running.contains(&state.log_file) {
                continue;
            }
            if !state.log_file.exists() {
                tracing::warn!(log_file = %state.log_file.display(), log_stream = %state.log_stream, "the log file of an unfinished shipment is gone; forgetting it");
                let _ = fs::remove_file(&path);
                continue;
            }
            tracing::info!(log_file = %state.log_file.display(), log_stream = %state.log_stream, offset = state.position.offset, "resuming log shipment");
            // Nothing waits for it: dropping the handle marks the job as ended.
            drop(self.spawn(path, state, true));
            resumed += 1;
        }
        resumed
    }

    fn spawn(&self, state_path: PathBuf, state: ShipState, job_ended: bool) -> Shipment {
        let (ended_tx, ended_rx) = watch::channel(job_ended);
        let (caught_tx, caught_rx) = watch::channel(false);
        let log_stream = state.log_stream.clone();
        let fresh = self.inner.active().insert(state.log_file.clone());
        if fresh {
            // Pinned now, before any cleanup can run, and for as long as the task lives.
            let pin = match super::pin(&state.log_file) {
                Ok(pin) => Some(pin),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot pin the job log against cleanup");
                    None
                }
            };
            let inner = self.inner.clone();
            let span = tracing::info_span!("ship", log_stream = %state.log_stream);
            tokio::spawn(
                async move {
                    let log_file = state.log_file.clone();
                    run_shipment(&inner, state_path, state, ended_rx, caught_tx).await;
                    inner.active().remove(&log_file);
                    drop(pin);
                }
                .instrument(span),
            );
        } else {
            tracing::warn!(log_file = %state.log_file.display(), "this log file is already being shipped");
        }
        Shipment {
            log_stream,
            job_ended: ended_tx,
            caught_up: caught_rx,
        }
    }
}

/// The life of one shipment: make sure the stream exists, then read, batch, send and record
/// the position until the job has ended and the file is shipped to its end.
async fn run_shipment(
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

/// Sends one batch until CloudWatch acknowledges it.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::io::Write;

    const T0: &str = "2026-11-25T19:42:19.123Z";

    fn log_file(lines: &[Vec<u8>]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        let mut file = File::create(&path).expect("create");
        for line in lines {
            file.write_all(line).expect("write");
        }
        (dir, path)
    }

    fn record(stamp: &str, tag: &str, payload: &[u8]) -> Vec<u8> {
        let mut line = format!("{stamp} {tag} ").into_bytes();
        line.extend_from_slice(payload);
        line.push(b'\n');
        line
    }

    /// Every batch the file makes, checked against the limits on the way.
    fn batches(path: &Path, from: Position) -> Vec<Batch> {
        let mut tail = Tail::open(path, from).expect("open");
        let mut out = Vec::new();
        loop {
            let mut batch = Batch::default();
            let filled = tail.fill(&mut batch).expect("fill");
            assert!(batch.events.len() <= MAX_BATCH_EVENTS);
            let bytes: usize = batch
                .events
                .iter()
                .map(|e| e.message.len() + EVENT_OVERHEAD)
                .sum();
            assert_eq!(bytes, batch.bytes());
            assert!(bytes <= MAX_BATCH_BYTES, "{bytes}");
            for pair in batch.events.windows(2) {
                assert!(pair[0].timestamp_ms <= pair[1].timestamp_ms);
            }
            if let (Some(first), Some(last)) = (batch.events.first(), batch.events.last()) {
                assert!(last.timestamp_ms - first.timestamp_ms < MAX_BATCH_SPAN_MS);
            }
            for e in &batch.events {
                assert!(!e.message.is_empty() && e.message.len() <= MAX_MESSAGE_BYTES);
            }
            if !batch.is_empty() {
                out.push(batch);
            }
            if filled == Filled::Drained {
                break;
            }
        }
        out
    }

    fn messages(batches: &[Batch]) -> Vec<String> {
        batches
            .iter()
            .flat_map(|b| b.events.iter().map(|e| e.message.clone()))
            .collect()
    }

    #[test]
    fn stream_names_are_findable_and_valid() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_635_739_123);
        assert_eq!(
            stream_name("demo_test_26", "rsql_blog_script_1.sh", at, "abcd12341"),
            "demo_test_26/rsql_blog_script_1.sh/20261125T194219Z/abcd12341"
        );
        let odd = stream_name("a:b*c", "etl/x.sh", at, "");
        assert_eq!(odd, "a_b_c/etl_x.sh/20261125T194219Z/_");
        let long_a = stream_name(&"é".repeat(300), &"j".repeat(600), at, &"9".repeat(99));
        let long_b = stream_name(&format!("{}x", "é".repeat(300)), "j", at, "1");
        assert!(long_a.len() <= 512, "{}", long_a.len());
        assert!(!long_a.contains(':') && !long_a.contains('*'));
        assert_eq!(long_a.split('/').count(), 4);
        assert_ne!(long_a.split('/').next(), long_b.split('/').next());
    }

    #[test]
    fn split_message_cuts_on_char_boundaries() {
        assert!(split_message("", 5).is_empty());
        assert_eq!(split_message("abcdef", 4), vec!["abcd", "ef"]);
        // 'é' is two bytes: a cut at 3 falls inside the second one.
        assert_eq!(split_message("ééé", 3), vec!["é", "é", "é"]);
        assert_eq!(split_message("€", 1), vec!["€"]);
        let text = "aé€😀".repeat(100_000);
        let pieces = split_message(&text, MAX_MESSAGE_BYTES);
        assert!(pieces.iter().all(|p| p.len() <= MAX_MESSAGE_BYTES));
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn one_record_one_event_with_its_timestamp_and_blank_lines_as_a_space() {
        let (_dir, path) = log_file(&[
            record(T0, "out", b"hello"),
            record(T0, "err", b"caf\xc3\xa9 \xff"),
            record(T0, "out", b""),
            record(T0, "out+", b"no newline"),
        ]);
        let all = batches(&path, Position::default());
        assert_eq!(all.len(), 1);
        assert_eq!(
            messages(&all),
            vec!["hello", "café \\xff", " ", "no newline"]
        );
        assert!(all[0]
            .events
            .iter()
            .all(|e| e.timestamp_ms == 1_795_635_739_123));
        assert_eq!(
            all[0].end(),
            Position {
                offset: std::fs::metadata(&path).expect("meta").len(),
                skip: 0
            }
        );
    }

    #[test]
    fn escaping_that_grows_a_record_splits_it_and_batches_stay_within_one_mebibyte() {
        // 256 KiB of invalid bytes renders as 1 MiB of `\xff`: five events, more than one
        // batch can hold with the overhead.
        let (_dir, path) = log_file(&[
            record(T0, "out", b"before"),
            record(T0, "out", &vec![0xff; super::super::MAX_RECORD_PAYLOAD]),
            record(T0, "out", b"after"),
        ]);
        let all = batches(&path, Position::default());
        let msgs = messages(&all);
        assert_eq!(msgs.first().map(String::as_str), Some("before"));
        assert_eq!(msgs.last().map(String::as_str), Some("after"));
        assert_eq!(msgs.len(), 2 + 5);
        assert_eq!(
            msgs[1..6].concat(),
            "\\xff".repeat(super::super::MAX_RECORD_PAYLOAD)
        );
        assert!(all.len() >= 2);
        // The first batch ends inside the big record: its position says how many of that
        // record's events are done, and resuming from it repeats nothing.
        let first_end = all[0].end();
        assert!(first_end.skip > 0, "{first_end:?}");
        let rest = batches(&path, first_end);
        assert_eq!(messages(&rest), msgs[all[0].events.len()..].to_vec());
    }

    #[test]
    fn batches_cut_at_ten_thousand_events() {
        let lines: Vec<Vec<u8>> = (0..25_001)
            .map(|i| record(T0, "out", format!("line {i}").as_bytes()))
            .collect();
        let (_dir, path) = log_file(&lines);
        let all = batches(&path, Position::default());
        let sizes: Vec<usize> = all.iter().map(|b| b.events.len()).collect();
        assert_eq!(sizes, vec![10_000, 10_000, 5_001]);
        let msgs = messages(&all);
        assert_eq!(msgs.len(), 25_001);
        assert!(msgs
            .iter()
            .enumerate()
            .all(|(i, m)| *m == format!("line {i}")));
    }

    #[test]
    fn batches_cut_at_one_mebibyte_counting_the_overhead() {
        // 200,000-byte lines: five fit (5 x 200,026 = 1,000,130), six do not.
        let lines: Vec<Vec<u8>> = (0..12)
            .map(|_| record(T0, "out", &vec![b'x'; 200_000]))
            .collect();
        let (_dir, path) = log_file(&lines);
        let all = batches(&path, Position::default());
        let sizes: Vec<usize> = all.iter().map(|b| b.events.len()).collect();
        assert_eq!(sizes, vec![5, 5, 2]);
        // Exactly on the limit: four largest events make 1 MiB with their overhead.
        let (_dir, path) = log_file(&[
            record(T0, "out", &vec![b'a'; MAX_MESSAGE_BYTES]),
            record(T0, "out", &vec![b'b'; MAX_MESSAGE_BYTES]),
            record(T0, "out", &vec![b'c'; MAX_MESSAGE_BYTES]),
            record(T0, "out", &vec![b'd'; MAX_MESSAGE_BYTES]),
            record(T0, "out", b"e"),
        ]);
        let all = batches(&path, Position::default());
        assert_eq!(all[0].bytes(), MAX_BATCH_BYTES);
        let sizes: Vec<usize> = all.iter().map(|b| b.events.len()).collect();
        assert_eq!(sizes, vec![4, 1]);
    }

    #[test]
    fn a_full_size_record_is_cut_into_two_events() {
        let (_dir, path) = log_file(&[record(
            T0,
            "out+",
            &vec![b'z'; super::super::MAX_RECORD_PAYLOAD],
        )]);
        let msgs = messages(&batches(&path, Position::default()));
        let lens: Vec<usize> = msgs.iter().map(String::len).collect();
        assert_eq!(
            lens,
            vec![
                MAX_MESSAGE_BYTES,
                super::super::MAX_RECORD_PAYLOAD - MAX_MESSAGE_BYTES
            ]
        );
    }

    #[test]
    fn batches_span_less_than_a_day() {
        let (_dir, path) = log_file(&[
            record("2026-11-25T00:00:00.000Z", "out", b"a"),
            record("2026-11-25T23:59:59.999Z", "out", b"b"),
            record("2026-11-26T00:00:00.000Z", "out", b"c"),
            record("2026-11-26T00:00:01.000Z", "out", b"d"),
        ]);
        let all = batches(&path, Position::default());
        let groups: Vec<Vec<String>> = all
            .iter()
            .map(|b| b.events.iter().map(|e| e.message.clone()).collect())
            .collect();
        assert_eq!(groups, vec![vec!["a", "b"], vec!["c", "d"]]);
    }

    #[test]
    fn tailing_picks_up_appended_records_and_skips_malformed_ones() {
        let (_dir, path) = log_file(&[record(T0, "out", b"one"), b"garbage\n".to_vec()]);
        let mut tail = Tail::open(&path, Position::default()).expect("open");
        let mut batch = Batch::default();
        assert_eq!(tail.fill(&mut batch).expect("fill"), Filled::Drained);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(b"2026-11-25T19:42:19.200Z err tw")
            .expect("write");
        assert_eq!(tail.fill(&mut batch).expect("fill"), Filled::Drained);
        assert_eq!(batch.events().len(), 1);
        file.write_all(b"o\n").expect("write");
        assert_eq!(tail.fill(&mut batch).expect("fill"), Filled::Drained);
        let msgs: Vec<&str> = batch.events().iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, vec!["one", "two"]);
        assert_eq!(
            batch.end().offset,
            std::fs::metadata(&path).expect("meta").len()
        );
    }

    #[test]
    fn state_round_trips_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.json");
        let state = ShipState {
            log_file: "/var/log/x.log".into(),
            log_group: "/ops/rsql-logs/".into(),
            log_stream: "w/j/20261125T194219Z/a1".into(),
            position: Position {
                offset: 42,
                skip: 3,
            },
            in_flight: Some(InFlight {
                end: Position {
                    offset: 4096,
                    skip: 0,
                },
                last_timestamp_ms: 1_764_460_000_123,
                last_message: "line 7".into(),
            }),
        };
        save_state(&path, &state).expect("save");
        assert_eq!(load_state(&path).expect("load"), state);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s.json")]);
    }
}
