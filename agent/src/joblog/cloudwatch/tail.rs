//! Reading one job log from a [`Position`] into batches.

use std::path::Path;
use std::time::SystemTime;

use super::batch::{Batch, Pending};
use super::state::Position;
use crate::joblog::{read_records_from, JobLogError, RecordReader};

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
    pub(super) fn reopen(&mut self) -> Result<(), JobLogError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::joblog::cloudwatch::limits::*;
    use std::fs::{File, OpenOptions};
    use std::io::Write;
    use std::path::PathBuf;

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
            assert!(batch.events().len() <= MAX_BATCH_EVENTS);
            let bytes: usize = batch
                .events()
                .iter()
                .map(|e| e.message.len() + EVENT_OVERHEAD)
                .sum();
            assert_eq!(bytes, batch.bytes());
            assert!(bytes <= MAX_BATCH_BYTES, "{bytes}");
            for pair in batch.events().windows(2) {
                assert!(pair[0].timestamp_ms <= pair[1].timestamp_ms);
            }
            if let (Some(first), Some(last)) = (batch.events().first(), batch.events().last()) {
                assert!(last.timestamp_ms - first.timestamp_ms < MAX_BATCH_SPAN_MS);
            }
            for e in batch.events() {
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
            .flat_map(|b| b.events().iter().map(|e| e.message.clone()))
            .collect()
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
            .events()
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
            record(T0, "out", &vec![0xff; crate::joblog::MAX_RECORD_PAYLOAD]),
            record(T0, "out", b"after"),
        ]);
        let all = batches(&path, Position::default());
        let msgs = messages(&all);
        assert_eq!(msgs.first().map(String::as_str), Some("before"));
        assert_eq!(msgs.last().map(String::as_str), Some("after"));
        assert_eq!(msgs.len(), 2 + 5);
        assert_eq!(
            msgs[1..6].concat(),
            "\\xff".repeat(crate::joblog::MAX_RECORD_PAYLOAD)
        );
        assert!(all.len() >= 2);
        // The first batch ends inside the big record: its position says how many of that
        // record's events are done, and resuming from it repeats nothing.
        let first_end = all[0].end();
        assert!(first_end.skip > 0, "{first_end:?}");
        let rest = batches(&path, first_end);
        assert_eq!(messages(&rest), msgs[all[0].events().len()..].to_vec());
    }

    #[test]
    fn batches_cut_at_ten_thousand_events() {
        let lines: Vec<Vec<u8>> = (0..25_001)
            .map(|i| record(T0, "out", format!("line {i}").as_bytes()))
            .collect();
        let (_dir, path) = log_file(&lines);
        let all = batches(&path, Position::default());
        let sizes: Vec<usize> = all.iter().map(|b| b.events().len()).collect();
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
        let sizes: Vec<usize> = all.iter().map(|b| b.events().len()).collect();
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
        let sizes: Vec<usize> = all.iter().map(|b| b.events().len()).collect();
        assert_eq!(sizes, vec![4, 1]);
    }

    #[test]
    fn a_full_size_record_is_cut_into_two_events() {
        let (_dir, path) = log_file(&[record(
            T0,
            "out+",
            &vec![b'z'; crate::joblog::MAX_RECORD_PAYLOAD],
        )]);
        let msgs = messages(&batches(&path, Position::default()));
        let lens: Vec<usize> = msgs.iter().map(String::len).collect();
        assert_eq!(
            lens,
            vec![
                MAX_MESSAGE_BYTES,
                crate::joblog::MAX_RECORD_PAYLOAD - MAX_MESSAGE_BYTES
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
            .map(|b| b.events().iter().map(|e| e.message.clone()).collect())
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
}
