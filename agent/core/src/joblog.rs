//! The job log: one local file per job attempt, written by the supervisor as the child
//! prints, and read back by the CloudWatch shipper, the outcome classifier and tests.
//!
//! Owns: the file's name and place under `[jobs] log_dir`, its permissions, the record
//! format below, the bounded per-stream line assembly, reading records back, finding the SQL
//! error a script reported, the stderr tail, and deleting old files.
//!
//! Must not touch: processes (the supervisor feeds bytes in), CloudWatch (the shipper tails
//! the file by byte offset and keeps its own offset), or anything about where a job came
//! from beyond the names that go into the file name.
//!
//! # Where the file lives
//!
//! `<log_dir>/<workflow_execution_id>/<job_name>.<YYYYMMDDTHHMMSSZ>.<attempt_id>.log`, each
//! name component reduced to `[A-Za-z0-9._-]` (never `..`, never a leading dot, long
//! components shortened with a hash suffix so distinct names stay distinct). Directories are
//! created `0750`, the file `0640`. An existing file is appended to, never truncated, so
//! byte offsets a shipper has stored stay valid.
//!
//! # Record format
//!
//! The file is a sequence of records, one per line:
//!
//! ```text
//! <timestamp> <tag> <payload>\n
//! 2026-11-25T19:42:19.123Z out relation "rsql_blog.missing" does not exist
//! ```
//!
//! - `timestamp`: RFC 3339, UTC, milliseconds, always 24 bytes. It is the time the agent read
//!   the bytes from the pipe. Timestamps never decrease within a file (a clock step backwards
//!   repeats the last one), because CloudWatch wants events in order.
//! - `tag`: `out` or `err` for a complete line of stdout or stderr: the child printed the
//!   payload followed by `\n`, and that `\n` is not in the payload. `out+` or `err+` for a
//!   fragment: bytes that were *not* followed by a newline in the original, either because
//!   the line was longer than [`MAX_RECORD_PAYLOAD`] (it continues in the next record of the
//!   same stream) or because the stream ended without a final newline.
//! - `payload`: the child's bytes exactly, never re-encoded (invalid UTF-8 stays as it was),
//!   at most [`MAX_RECORD_PAYLOAD`] bytes. It never contains `\n`; it may contain `\r`, NUL or
//!   anything else. There is always one space after the tag, even when the payload is empty.
//!
//! A stream's original bytes are the concatenation, in file order, of its records' payloads,
//! with `\n` appended after each complete record ([`reassemble`]). A line of exactly
//! [`MAX_RECORD_PAYLOAD`] bytes is one complete record; one byte more makes a fragment of
//! [`MAX_RECORD_PAYLOAD`] bytes followed by a complete record of one byte.
//!
//! The last line of a file that is still being written may be incomplete (no `\n` yet);
//! readers stop before it and pick it up later, see [`RecordReader::offset`].

mod cleanup;
mod read;
mod sqlerror;

use std::collections::HashMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

pub use cleanup::{cleanup, CleanupReport};
pub use read::{
    display, parse_record, read_records, read_records_from, reassemble, stderr_tail, Record,
    RecordReader,
};
pub use sqlerror::{extract_sql_error, SqlError, SqlErrorScanner, MAX_SQL_MESSAGE};

/// Longest payload of one record. Longer lines become consecutive fragment records; this
/// also bounds the memory a stream's unfinished line can take.
pub const MAX_RECORD_PAYLOAD: usize = 256 * 1024;

/// Length of the timestamp at the start of every record.
const TIMESTAMP_LEN: usize = "2026-11-25T19:42:19.123Z".len();

/// Longest possible record line, newline included; readers refuse anything longer.
const MAX_RECORD_LINE: usize = TIMESTAMP_LEN + 1 + "err+".len() + 1 + MAX_RECORD_PAYLOAD + 1;

/// The file is written through a buffer of this size; the supervisor flushes whenever the
/// child goes quiet, so this only batches bursts.
const WRITE_BUFFER: usize = 64 * 1024;

/// Longest sanitized name components; they keep the file name under the usual 255-byte
/// limit with room for the timestamp and the extension.
const MAX_DIR_COMPONENT: usize = 200;
const MAX_JOB_COMPONENT: usize = 120;
const MAX_ATTEMPT_COMPONENT: usize = 64;

/// Which of the child's output streams a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    /// The record tag for this stream; `complete == false` gives the fragment tag.
    pub fn tag(self, complete: bool) -> &'static str {
        match (self, complete) {
            (Stream::Stdout, true) => "out",
            (Stream::Stdout, false) => "out+",
            (Stream::Stderr, true) => "err",
            (Stream::Stderr, false) => "err+",
        }
    }
}

/// What names a job log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogName {
    pub workflow_execution_id: String,
    pub job_name: String,
    pub started_at: SystemTime,
    /// Unique per attempt, so a retry never appends to the previous attempt's file.
    pub attempt_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JobLogError {
    #[error("cannot create the job log directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the job log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the job log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot sync the job log {path} to disk")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the job log {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the job log {path} has a malformed record at byte {offset}")]
    Malformed { path: PathBuf, offset: u64 },
    #[error("cannot list the job log directory {path}")]
    ListDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A job log open for writing.
///
/// The supervisor owns it while the job runs: [`JobLog::append`] takes raw chunks read from
/// the pipes and turns them into records. Each stream keeps its unfinished line (at most
/// [`MAX_RECORD_PAYLOAD`] bytes) until the newline arrives, so memory stays bounded whatever
/// the child prints.
pub struct JobLog {
    path: PathBuf,
    out: BufWriter<File>,
    /// The unfinished line of each stream, indexed by [`Stream::index`].
    carry: [Vec<u8>; 2],
    last_at: SystemTime,
    /// The formatted timestamp for `last_stamp_ms`, so a burst of lines in the same
    /// millisecond formats it once.
    last_stamp_ms: u128,
    last_stamp: String,
    _active: ActiveLog,
}

impl std::fmt::Debug for JobLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the carried bytes: up to 256 KiB each, and job output is not for debug logs.
        f.debug_struct("JobLog")
            .field("path", &self.path)
            .field("carried_stdout", &self.carry[0].len())
            .field("carried_stderr", &self.carry[1].len())
            .finish()
    }
}

impl JobLog {
    /// Creates (or reopens for appending) the log file for one job attempt, creating its
    /// directories as needed.
    pub fn create(log_dir: &Path, name: &LogName) -> Result<JobLog, JobLogError> {
        let dir = log_dir.join(sanitize_component(
            &name.workflow_execution_id,
            MAX_DIR_COMPONENT,
        ));
        let file_name = format!(
            "{}.{}.{}.log",
            sanitize_component(&name.job_name, MAX_JOB_COMPONENT),
            compact_utc(name.started_at),
            sanitize_component(&name.attempt_id, MAX_ATTEMPT_COMPONENT),
        );
        let path = dir.join(file_name);
        JobLog::open_in(&dir, path)
    }

    /// Reopens (or creates) the log file at `path` for appending: for a job's owner process,
    /// which writes the log the agent named and created.
    pub fn open(path: &Path) -> Result<JobLog, JobLogError> {
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        JobLog::open_in(&dir, path.to_path_buf())
    }

    fn open_in(dir: &Path, path: PathBuf) -> Result<JobLog, JobLogError> {
        let dir = dir.to_path_buf();
        // `cleanup` may remove an empty workflow directory between our mkdir and open; one
        // retry after recreating it covers that race without any shared lock.
        let mut attempts = 0;
        let file = loop {
            attempts += 1;
            DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(&dir)
                .map_err(|source| JobLogError::CreateDir {
                    path: dir.clone(),
                    source,
                })?;
            match OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(file) => break file,
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 3 => continue,
                Err(source) => return Err(JobLogError::Open { path, source }),
            }
        };
        let active = ActiveLog::register(&file).map_err(|source| JobLogError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(JobLog {
            path,
            out: BufWriter::with_capacity(WRITE_BUFFER, file),
            carry: [Vec::new(), Vec::new()],
            last_at: SystemTime::UNIX_EPOCH,
            last_stamp_ms: u128::MAX,
            last_stamp: String::new(),
            _active: active,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends bytes the child wrote to `stream`, read at time `at`. Complete lines become
    /// records at once; the unfinished tail is kept (bounded) until its newline arrives or
    /// [`JobLog::finish`] is called.
    pub fn append(
        &mut self,
        stream: Stream,
        at: SystemTime,
        mut data: &[u8],
    ) -> Result<(), JobLogError> {
        let at = self.stamp_time(at);
        while !data.is_empty() {
            let newline = data.iter().position(|&b| b == b'\n');
            let (mut rest, terminated) = match newline {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            data = match newline {
                Some(i) => &data[i + 1..],
                None => &[],
            };
            // Emit full fragments while the line is longer than one record can hold. A line
            // of exactly MAX_RECORD_PAYLOAD bytes waits in the carry: if its newline comes
            // next, it is one complete record instead of a fragment plus an empty record.
            loop {
                let carried = self.carry[stream.index()].len();
                let room = MAX_RECORD_PAYLOAD - carried;
                if rest.len() <= room {
                    break;
                }
                if carried == 0 {
                    let (head, tail) = rest.split_at(MAX_RECORD_PAYLOAD);
                    self.write_record(stream, false, at, &[head])?;
                    rest = tail;
                } else {
                    let (head, tail) = rest.split_at(room);
                    let carry = std::mem::take(&mut self.carry[stream.index()]);
                    let written = self.write_record(stream, false, at, &[&carry, head]);
                    self.carry[stream.index()] = carry;
                    self.carry[stream.index()].clear();
                    written?;
                    rest = tail;
                }
            }
            if terminated {
                let carry = std::mem::take(&mut self.carry[stream.index()]);
                let written = self.write_record(stream, true, at, &[&carry, rest]);
                self.carry[stream.index()] = carry;
                self.carry[stream.index()].clear();
                written?;
            } else {
                self.carry[stream.index()].extend_from_slice(rest);
            }
        }
        Ok(())
    }

    /// Writes out each stream's unfinished line as a fragment record (the child's output
    /// ended without a newline) and flushes. Call once both pipes are closed.
    pub fn finish(&mut self) -> Result<(), JobLogError> {
        let at = self.stamp_time(SystemTime::now());
        for stream in [Stream::Stdout, Stream::Stderr] {
            let carry = std::mem::take(&mut self.carry[stream.index()]);
            if !carry.is_empty() {
                self.write_record(stream, false, at, &[&carry])?;
            }
        }
        self.flush()
    }

    /// Hands buffered records to the kernel so a tailing reader sees them.
    pub fn flush(&mut self) -> Result<(), JobLogError> {
        self.out.flush().map_err(|source| JobLogError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Flushes and fsyncs, so the records survive a crash of the host.
    pub fn sync(&mut self) -> Result<(), JobLogError> {
        self.flush()?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|source| JobLogError::Sync {
                path: self.path.clone(),
                source,
            })
    }

    /// Bytes waiting in a stream's unfinished line (for tests of the memory bound).
    pub fn carried(&self, stream: Stream) -> usize {
        self.carry[stream.index()].len()
    }

    fn stamp_time(&mut self, at: SystemTime) -> SystemTime {
        if at > self.last_at {
            self.last_at = at;
        }
        self.last_at
    }

    fn write_record(
        &mut self,
        stream: Stream,
        complete: bool,
        at: SystemTime,
        parts: &[&[u8]],
    ) -> Result<(), JobLogError> {
        let ms = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        if ms != self.last_stamp_ms {
            self.last_stamp = humantime::format_rfc3339_millis(at).to_string();
            self.last_stamp_ms = ms;
        }
        let result = (|| {
            self.out.write_all(self.last_stamp.as_bytes())?;
            self.out.write_all(b" ")?;
            self.out.write_all(stream.tag(complete).as_bytes())?;
            self.out.write_all(b" ")?;
            for part in parts {
                self.out.write_all(part)?;
            }
            self.out.write_all(b"\n")
        })();
        result.map_err(|source| JobLogError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// `2026-11-25T19:42:19Z` → `20261125T194219Z`.
pub fn compact_utc(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

/// Reduces a caller-supplied name to one safe path component: `[A-Za-z0-9._-]` only, no
/// `..`, no leading dot, never empty, at most `max` bytes (a shortened name ends in a hash
/// of the original so two long names that share a prefix still differ).
fn sanitize_component(raw: &str, max: usize) -> String {
    let mut out = String::with_capacity(raw.len().min(max));
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
            c
        } else {
            '_'
        };
        // A dot right after a dot would form `..`; a leading dot would hide the file.
        let c = if c == '.' && (out.is_empty() || out.ends_with('.')) {
            '_'
        } else {
            c
        };
        out.push(c);
    }
    if out.is_empty() {
        out.push('_');
    }
    if out.len() > max {
        let digest = hex::encode(Sha256::digest(raw.as_bytes()));
        out.truncate(max.saturating_sub(9));
        out.push('-');
        out.push_str(&digest[..8]);
    }
    out
}

/// Files this process has open for writing (or that a reader pinned), by device and inode
/// so spelling of the path does not matter. `cleanup` never deletes them.
static ACTIVE: Mutex<Option<HashMap<(u64, u64), usize>>> = Mutex::new(None);

fn active_set() -> MutexGuard<'static, Option<HashMap<(u64, u64), usize>>> {
    // A panic elsewhere while holding this lock leaves the map consistent (every update
    // is a single insert or remove), so poisoning is safe to ignore.
    ACTIVE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn is_active(dev: u64, ino: u64) -> bool {
    active_set()
        .as_ref()
        .is_some_and(|set| set.contains_key(&(dev, ino)))
}

/// Keeps a log file out of [`cleanup`]'s reach while it is alive.
#[derive(Debug)]
pub struct ActiveLog {
    key: (u64, u64),
}

impl ActiveLog {
    fn register(file: &File) -> io::Result<ActiveLog> {
        let meta = file.metadata()?;
        let key = (meta.dev(), meta.ino());
        *active_set()
            .get_or_insert_with(HashMap::new)
            .entry(key)
            .or_insert(0) += 1;
        Ok(ActiveLog { key })
    }
}

impl Drop for ActiveLog {
    fn drop(&mut self) {
        let mut guard = active_set();
        if let Some(set) = guard.as_mut() {
            if let Some(count) = set.get_mut(&self.key) {
                *count -= 1;
                if *count == 0 {
                    set.remove(&self.key);
                }
            }
        }
    }
}

/// Pins an existing log file (for example while the shipper still has records to send
/// after the job ended), so [`cleanup`] leaves it alone until the guard is dropped.
pub fn pin(path: &Path) -> Result<ActiveLog, JobLogError> {
    let file = File::open(path).map_err(|source| JobLogError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    ActiveLog::register(&file).map_err(|source| JobLogError::Open {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    fn name(wf: &str, job: &str) -> LogName {
        LogName {
            workflow_execution_id: wf.to_string(),
            job_name: job.to_string(),
            // 2026-11-25T19:42:19.123Z
            started_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_635_739_123),
            attempt_id: "a1".to_string(),
        }
    }

    fn records(log: &JobLog) -> Vec<Record> {
        read_records(log.path())
            .expect("open")
            .collect::<Result<Vec<_>, _>>()
            .expect("records")
    }

    #[test]
    fn file_name_and_permissions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = JobLog::create(dir.path(), &name("demo_test_26", "rsql_blog_script_1.sh"))
            .expect("create");
        assert_eq!(
            log.path(),
            dir.path()
                .join("demo_test_26/rsql_blog_script_1.sh.20261125T194219Z.a1.log")
        );
        let file_mode = std::fs::metadata(log.path())
            .expect("meta")
            .permissions()
            .mode();
        let dir_mode = std::fs::metadata(dir.path().join("demo_test_26"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(file_mode & 0o777, 0o640);
        assert_eq!(dir_mode & 0o777, 0o750);
    }

    #[test]
    fn names_cannot_escape_the_log_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log =
            JobLog::create(dir.path(), &name("../../etc", "../x/../../passwd")).expect("create");
        let rel = log.path().strip_prefix(dir.path()).expect("inside log_dir");
        assert_eq!(rel.components().count(), 2);
        assert!(!rel.to_string_lossy().contains(".."), "{rel:?}");
        assert_eq!(sanitize_component("", 10), "_");
        assert_eq!(sanitize_component(".", 10), "_");
        assert_eq!(sanitize_component("...", 10), "_._");
        assert_eq!(sanitize_component("a b/c\u{e9}", 20), "a_b_c_");
        let long_a = sanitize_component(&format!("{}a", "x".repeat(300)), 120);
        let long_b = sanitize_component(&format!("{}b", "x".repeat(300)), 120);
        assert_eq!(long_a.len(), 120);
        assert_ne!(long_a, long_b);
    }

    #[test]
    fn complete_lines_fragments_and_final_partial() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = JobLog::create(dir.path(), &name("w", "j")).expect("create");
        let at = SystemTime::now();
        log.append(Stream::Stdout, at, b"one\ntw").expect("append");
        log.append(Stream::Stderr, at, b"oops\n").expect("append");
        log.append(Stream::Stdout, at, b"o\n\nthree")
            .expect("append");
        log.finish().expect("finish");
        let recs = records(&log);
        let summary: Vec<(Stream, bool, &[u8])> = recs
            .iter()
            .map(|r| (r.stream, r.complete, r.payload.as_slice()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Stream::Stdout, true, &b"one"[..]),
                (Stream::Stderr, true, &b"oops"[..]),
                (Stream::Stdout, true, &b"two"[..]),
                (Stream::Stdout, true, &b""[..]),
                (Stream::Stdout, false, &b"three"[..]),
            ]
        );
        assert_eq!(
            reassemble(log.path(), Stream::Stdout).expect("reassemble"),
            b"one\ntwo\n\nthree"
        );
        let text = std::fs::read(log.path()).expect("read");
        let first = text.split(|&b| b == b'\n').next().expect("line");
        assert_eq!(first.len(), TIMESTAMP_LEN + " out one".len());
        assert!(first.ends_with(b"Z out one"), "{}", display(first));
    }

    #[test]
    fn long_lines_split_at_the_limit_and_memory_stays_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = JobLog::create(dir.path(), &name("w", "j")).expect("create");
        let at = SystemTime::now();
        let mut original = Vec::new();
        // Exactly the limit: one complete record.
        original.extend(std::iter::repeat_n(b'a', MAX_RECORD_PAYLOAD));
        original.push(b'\n');
        // One byte more, fed in small pieces: a fragment then a one-byte record.
        original.extend(std::iter::repeat_n(b'b', MAX_RECORD_PAYLOAD + 1));
        original.push(b'\n');
        // 2.5 limits without a newline at the end.
        original.extend(std::iter::repeat_n(b'c', MAX_RECORD_PAYLOAD * 5 / 2));
        for chunk in original.chunks(7_001) {
            log.append(Stream::Stdout, at, chunk).expect("append");
            assert!(log.carried(Stream::Stdout) <= MAX_RECORD_PAYLOAD);
        }
        log.finish().expect("finish");
        let recs = records(&log);
        let shape: Vec<(bool, usize)> =
            recs.iter().map(|r| (r.complete, r.payload.len())).collect();
        assert_eq!(
            shape,
            vec![
                (true, MAX_RECORD_PAYLOAD),
                (false, MAX_RECORD_PAYLOAD),
                (true, 1),
                (false, MAX_RECORD_PAYLOAD),
                (false, MAX_RECORD_PAYLOAD),
                (false, MAX_RECORD_PAYLOAD / 2),
            ]
        );
        assert_eq!(
            reassemble(log.path(), Stream::Stdout).expect("reassemble"),
            original
        );
    }

    #[test]
    fn timestamps_never_go_backwards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = JobLog::create(dir.path(), &name("w", "j")).expect("create");
        let now = SystemTime::now();
        log.append(Stream::Stdout, now, b"later\n").expect("append");
        log.append(
            Stream::Stdout,
            now - Duration::from_secs(60),
            b"earlier clock\n",
        )
        .expect("append");
        log.finish().expect("finish");
        let recs = records(&log);
        assert_eq!(recs[0].at, recs[1].at);
    }

    #[test]
    fn reopening_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = SystemTime::now();
        let mut first = JobLog::create(dir.path(), &name("w", "j")).expect("create");
        first
            .append(Stream::Stdout, at, b"first\n")
            .expect("append");
        first.sync().expect("sync");
        drop(first);
        let mut second = JobLog::create(dir.path(), &name("w", "j")).expect("create");
        second
            .append(Stream::Stdout, at, b"second\n")
            .expect("append");
        second.sync().expect("sync");
        assert_eq!(
            reassemble(second.path(), Stream::Stdout).expect("reassemble"),
            b"first\nsecond\n"
        );
    }
}
