//! Reading job log files back: parsing records, reassembling a stream, the stderr tail, and
//! rendering raw bytes for humans.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{JobLogError, Stream, MAX_RECORD_LINE, MAX_RECORD_PAYLOAD, TIMESTAMP_LEN};

/// One record of a job log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When the agent read these bytes from the child.
    pub at: SystemTime,
    pub stream: Stream,
    /// `true`: the payload was followed by a newline in the original. `false`: a fragment.
    pub complete: bool,
    /// The child's bytes, exactly.
    pub payload: Vec<u8>,
}

impl Record {
    /// The payload as readable text, see [`display`].
    pub fn text(&self) -> String {
        display(&self.payload)
    }
}

/// Parses one record line (with or without its trailing `\n`). `None` if it is not a
/// well-formed record.
pub fn parse_record(line: &[u8]) -> Option<Record> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() < TIMESTAMP_LEN + " out ".len() || line[TIMESTAMP_LEN] != b' ' {
        return None;
    }
    let stamp = std::str::from_utf8(&line[..TIMESTAMP_LEN]).ok()?;
    let at = humantime::parse_rfc3339(stamp).ok()?;
    let rest = &line[TIMESTAMP_LEN + 1..];
    let space = rest.iter().position(|&b| b == b' ')?;
    let (stream, complete) = match &rest[..space] {
        b"out" => (Stream::Stdout, true),
        b"out+" => (Stream::Stdout, false),
        b"err" => (Stream::Stderr, true),
        b"err+" => (Stream::Stderr, false),
        _ => return None,
    };
    let payload = &rest[space + 1..];
    if payload.len() > MAX_RECORD_PAYLOAD || payload.contains(&b'\n') {
        return None;
    }
    Some(Record {
        at,
        stream,
        complete,
        payload: payload.to_vec(),
    })
}

/// Iterates over the records of a job log.
///
/// A file that is still being written may end in a record without its newline yet: the
/// iterator then returns `None` and keeps the partial bytes, so calling `next` again later
/// continues with whatever was appended meanwhile (the iterator is deliberately not fused).
/// [`RecordReader::offset`] is the byte offset just past the last record returned, which is
/// where a tailing reader should resume after a restart.
#[derive(Debug)]
pub struct RecordReader {
    path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
    line: Vec<u8>,
    failed: bool,
}

impl RecordReader {
    /// Byte offset just past the last record returned.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Iterator for RecordReader {
    type Item = Result<Record, JobLogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let limit = MAX_RECORD_LINE.saturating_sub(self.line.len()) as u64;
        let read = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.line);
        if let Err(source) = read {
            self.failed = true;
            return Some(Err(JobLogError::Read {
                path: self.path.clone(),
                source,
            }));
        }
        if !self.line.ends_with(b"\n") {
            if self.line.len() >= MAX_RECORD_LINE {
                // No record is this long: the file is not a job log, or is corrupt.
                self.failed = true;
                return Some(Err(JobLogError::Malformed {
                    path: self.path.clone(),
                    offset: self.offset,
                }));
            }
            // End of what has been written so far; keep the partial record for later.
            return None;
        }
        let start = self.offset;
        self.offset += self.line.len() as u64;
        let parsed = parse_record(&self.line);
        self.line.clear();
        Some(parsed.ok_or_else(|| JobLogError::Malformed {
            path: self.path.clone(),
            offset: start,
        }))
    }
}

/// Opens a job log for reading from the start.
pub fn read_records(path: &Path) -> Result<RecordReader, JobLogError> {
    read_records_from(path, 0)
}

/// Opens a job log for reading from `offset`, which must be a record boundary (an offset
/// earlier returned by [`RecordReader::offset`]).
pub fn read_records_from(path: &Path, offset: u64) -> Result<RecordReader, JobLogError> {
    let read_err = |source: io::Error| JobLogError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    if offset > 0 {
        file.seek(SeekFrom::Start(offset)).map_err(read_err)?;
    }
    Ok(RecordReader {
        path: path.to_path_buf(),
        reader: BufReader::with_capacity(64 * 1024, file),
        offset,
        line: Vec::new(),
        failed: false,
    })
}

/// The exact bytes the child wrote to `stream`, rebuilt from the file. Holds the whole
/// stream in memory: meant for tests and small logs.
pub fn reassemble(path: &Path, stream: Stream) -> Result<Vec<u8>, JobLogError> {
    let mut out = Vec::new();
    for record in read_records(path)? {
        let record = record?;
        if record.stream == stream {
            out.extend_from_slice(&record.payload);
            if record.complete {
                out.push(b'\n');
            }
        }
    }
    Ok(out)
}

/// Renders bytes as text: valid UTF-8 unchanged, each byte of an invalid sequence as
/// `\xNN` (lower-case hex).
pub fn display(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// The last lines of the job's stderr as readable text, at most `max_bytes` bytes (cut on a
/// character boundary, keeping the end). Whole lines are preferred: a partial first line is
/// dropped unless it is the only one. An unreadable file gives an empty string, because the
/// tail only decorates a report that must still be sent.
pub fn stderr_tail(path: &Path, max_bytes: usize) -> String {
    if max_bytes == 0 {
        return String::new();
    }
    let records = match read_records(path) {
        Ok(records) => records,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no stderr tail");
            return String::new();
        }
    };
    // Raw bytes never render shorter than they are, so the last `max_bytes` raw bytes are
    // enough; compacting only past twice that keeps the copying amortised.
    let mut tail: Vec<u8> = Vec::new();
    let mut cut = false;
    for record in records.flatten() {
        if record.stream != Stream::Stderr {
            continue;
        }
        tail.extend_from_slice(&record.payload);
        if record.complete {
            tail.push(b'\n');
        }
        if tail.len() > 2 * max_bytes + MAX_RECORD_PAYLOAD {
            tail.drain(..tail.len() - max_bytes - 1);
            cut = true;
        }
    }
    while tail.last() == Some(&b'\n') {
        tail.pop();
    }
    if tail.len() > max_bytes {
        tail.drain(..tail.len() - max_bytes);
        cut = true;
    }
    if cut {
        // Do not start inside a multi-byte character.
        let skip = tail
            .iter()
            .take(3)
            .take_while(|&&b| (0x80..0xC0).contains(&b))
            .count();
        tail.drain(..skip);
    }
    let mut text = display(&tail);
    if text.len() > max_bytes {
        let mut start = text.len() - max_bytes;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text.drain(..start);
        cut = true;
    }
    if cut {
        if let Some(newline) = text.find('\n') {
            if newline + 1 < text.len() {
                text.drain(..=newline);
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::joblog::{JobLog, LogName};
    use std::time::Duration;

    fn log_with(stderr: &[&[u8]], stdout: &[&[u8]]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = JobLog::create(
            dir.path(),
            &LogName {
                workflow_execution_id: "w".into(),
                job_name: "j".into(),
                started_at: SystemTime::now(),
                attempt_id: "1".into(),
            },
        )
        .expect("create");
        for chunk in stdout {
            log.append(Stream::Stdout, SystemTime::now(), chunk)
                .expect("append");
        }
        for chunk in stderr {
            log.append(Stream::Stderr, SystemTime::now(), chunk)
                .expect("append");
        }
        log.finish().expect("finish");
        let path = log.path().to_path_buf();
        (dir, path)
    }

    #[test]
    fn parse_record_accepts_only_well_formed_lines() {
        let r = parse_record(b"2026-11-25T19:42:19.123Z err+ a b\r\n").expect("record");
        assert_eq!(r.stream, Stream::Stderr);
        assert!(!r.complete);
        assert_eq!(r.payload, b"a b\r");
        assert_eq!(
            r.at,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_635_739_123)
        );
        let empty = parse_record(b"2026-11-25T19:42:19.123Z out ").expect("record");
        assert!(empty.payload.is_empty() && empty.complete);
        assert!(parse_record(b"2026-11-25T19:42:19.123Z out").is_none());
        assert!(parse_record(b"2026-11-25T19:42:19.123Z bad x").is_none());
        assert!(parse_record(b"2026-13-25T19:42:19.123Z out x").is_none());
        assert!(parse_record(b"not a record at all, not at all").is_none());
        assert!(parse_record(b"").is_none());
    }

    #[test]
    fn display_escapes_only_invalid_bytes() {
        assert_eq!(display(b"caf\xc3\xa9 \xff\xfe end"), "café \\xff\\xfe end");
        assert_eq!(display(b"\xe2\x82"), "\\xe2\\x82");
        assert_eq!(display(b"plain \\x41"), "plain \\x41");
    }

    #[test]
    fn reader_resumes_after_a_partial_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        std::fs::write(&path, b"2026-11-25T19:42:19.123Z out one\n2026-11-25T19:4").expect("write");
        let mut reader = read_records(&path).expect("open");
        assert_eq!(reader.next().expect("one").expect("ok").payload, b"one");
        let after_first = reader.offset();
        assert!(reader.next().is_none());
        assert_eq!(reader.offset(), after_first);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        std::io::Write::write_all(&mut file, b"2:19.200Z err two\n").expect("append");
        let second = reader.next().expect("two").expect("ok");
        assert_eq!(
            (second.stream, second.payload.as_slice()),
            (Stream::Stderr, &b"two"[..])
        );
        let mut resumed = read_records_from(&path, after_first).expect("open");
        assert_eq!(resumed.next().expect("two").expect("ok"), second);
    }

    #[test]
    fn malformed_lines_are_reported_and_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        std::fs::write(&path, b"garbage\n2026-11-25T19:42:19.123Z out ok\n").expect("write");
        let items: Vec<_> = read_records(&path).expect("open").collect();
        assert!(matches!(
            items[0],
            Err(JobLogError::Malformed { offset: 0, .. })
        ));
        assert_eq!(items[1].as_ref().expect("ok").payload, b"ok");
    }

    #[test]
    fn stderr_tail_keeps_the_last_whole_lines() {
        let (_dir, path) = log_with(
            &[b"first line\n", b"second line\n", b"third \xff line\n"],
            &[b"stdout is not in the tail\n"],
        );
        assert_eq!(
            stderr_tail(&path, 4096),
            "first line\nsecond line\nthird \\xff line"
        );
        // "second line\n" plus the rendered last line is 27 bytes; the first line no longer fits.
        assert_eq!(stderr_tail(&path, 30), "second line\nthird \\xff line");
        assert_eq!(stderr_tail(&path, 20), "third \\xff line");
        // A single line longer than the limit keeps its end.
        assert_eq!(stderr_tail(&path, 5), " line");
        assert_eq!(stderr_tail(&path, 0), "");
        assert_eq!(stderr_tail(Path::new("/nonexistent/x.log"), 10), "");
    }

    #[test]
    fn stderr_tail_cuts_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let line = format!("{long}\n");
        let (_dir, path) = log_with(&[line.as_bytes()], &[]);
        let tail = stderr_tail(&path, 101);
        assert!(tail.len() <= 101);
        assert!(tail.chars().all(|c| c == 'é'), "{tail}");
        assert_eq!(tail.len(), 100);
    }
}
