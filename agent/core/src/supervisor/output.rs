//! A job's stdout and stderr: read in chunks by the supervising task, handed to a writer
//! thread behind a small bounded queue, and written to the job's log file.

use std::io;
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Job, READ_CHUNK};
use crate::joblog::{JobLog, JobLogError, Stream};

pub(super) struct Chunk {
    pub(super) stream: Stream,
    pub(super) at: SystemTime,
    pub(super) data: Vec<u8>,
}

/// One of the child's output pipes and the chunk read from it that still waits for room in
/// the log queue.
pub(super) struct Pipe<R> {
    pub(super) reader: Option<R>,
    pub(super) stream: Stream,
    pub(super) buf: Vec<u8>,
    pub(super) pending: Option<Chunk>,
}

impl<R: AsyncRead + Unpin> Pipe<R> {
    pub(super) fn new(reader: Option<R>, stream: Stream) -> Pipe<R> {
        Pipe {
            reader,
            stream,
            buf: vec![0; READ_CHUNK],
            pending: None,
        }
    }

    pub(super) fn can_read(&self) -> bool {
        self.reader.is_some() && self.pending.is_none()
    }

    pub(super) fn is_open(&self) -> bool {
        self.reader.is_some()
    }

    /// Cancel-safe: a read that loses the race in `select!` has consumed nothing.
    pub(super) async fn read(&mut self) -> io::Result<usize> {
        match self.reader.as_mut() {
            Some(reader) => reader.read(&mut self.buf).await,
            None => std::future::pending().await,
        }
    }

    pub(super) fn took(&mut self, result: io::Result<usize>, job_id: &str) {
        match result {
            Ok(0) => self.reader = None,
            Ok(n) => {
                self.pending = Some(Chunk {
                    stream: self.stream,
                    at: SystemTime::now(),
                    data: self.buf[..n].to_vec(),
                });
            }
            Err(e) => {
                tracing::warn!(job_id, stream = ?self.stream, error = %e, "reading the job's output failed; closing the pipe");
                self.reader = None;
            }
        }
    }
}

/// Moves one waiting chunk into the log queue; alternates between streams so neither starves.
pub(super) fn hand_over<A, B>(
    permit: Result<mpsc::Permit<'_, Chunk>, mpsc::error::SendError<()>>,
    out: &mut Pipe<A>,
    err: &mut Pipe<B>,
    prefer_err: &mut bool,
) {
    let chunk = if *prefer_err {
        err.pending.take().or_else(|| out.pending.take())
    } else {
        out.pending.take().or_else(|| err.pending.take())
    };
    *prefer_err = !*prefer_err;
    if let (Ok(permit), Some(chunk)) = (permit, chunk) {
        permit.send(chunk);
    }
    // Without a writer the chunk is dropped: the pipes must keep draining regardless.
}

/// Appends everything from the queue to the log; flushes whenever the queue runs dry so a
/// tailing reader sees output as soon as the child goes quiet; fsyncs at the end.
pub(super) fn write_log(
    mut log: JobLog,
    mut queue: mpsc::Receiver<Chunk>,
) -> Result<(), JobLogError> {
    let mut failed: Option<JobLogError> = None;
    while let Some(chunk) = queue.blocking_recv() {
        if failed.is_some() {
            // Keep consuming so the supervisor never blocks on a dead writer.
            continue;
        }
        let mut step = log.append(chunk.stream, chunk.at, &chunk.data);
        if step.is_ok() && queue.is_empty() {
            step = log.flush();
        }
        if let Err(e) = step {
            failed = Some(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    log.finish()?;
    log.sync()
}

/// The job's output on its way to the log: both pipes, which one goes first next, and the
/// writer's queue. Dropping it closes the queue, which ends the writer.
pub(super) struct Output {
    pub(super) out: Pipe<tokio::process::ChildStdout>,
    pub(super) err: Pipe<tokio::process::ChildStderr>,
    pub(super) prefer_err: bool,
    pub(super) log_tx: mpsc::Sender<Chunk>,
}

impl Output {
    /// A chunk read from a pipe waits for room in the log queue.
    pub(super) fn queued(&self) -> bool {
        self.out.pending.is_some() || self.err.pending.is_some()
    }

    pub(super) fn reading(&self) -> bool {
        self.out.is_open() || self.err.is_open()
    }
}

/// Waits (until `give_up_at`) for the log writer to write, flush and fsync everything;
/// `true` when the log is complete.
pub(super) async fn finish_log(
    job: &Job,
    writer: &mut JoinHandle<Result<(), JobLogError>>,
    give_up_at: Instant,
) -> bool {
    let job_id = job.job_id.as_str();
    match tokio::time::timeout_at(give_up_at.into(), writer).await {
        Ok(Ok(Ok(()))) => true,
        Ok(Ok(Err(e))) => {
            tracing::error!(job_id, path = %job.log_path.display(), error = %crate::error_chain(&e), "the job log is incomplete");
            false
        }
        Ok(Err(e)) => {
            tracing::error!(job_id, error = %e, "the job log writer failed");
            false
        }
        Err(_) => {
            tracing::error!(job_id, "the job log writer did not finish in time");
            false
        }
    }
}
