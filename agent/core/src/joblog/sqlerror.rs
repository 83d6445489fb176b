//! Finding the SQL error a job reported, from its log.
//!
//! Two sources, in order of preference:
//! 1. The script's own marker on stdout. The converted scripts print, after a failed
//!    statement, `Error Code -`, then `:ERRORCODE` (the SQLSTATE) and then
//!    `:LAST_ERROR_MESSAGE` on the following lines. Some print the code on the marker line
//!    itself (`Error Code - 42P01`). Blank lines in between are skipped.
//! 2. The client's `ERROR:` (or `FATAL:`) lines, as the rsql stand-in and psql print them
//!    (`rsql: ERROR: relation "x" does not exist`). The SQLSTATE comes from a prefix
//!    (`ERROR:  42P01: ...`, psql's verbose form), or from a `SQLSTATE 42P01` mention on the
//!    same line or on one of the few lines that follow (`rsql: DETAIL: SQLSTATE 42P01`).
//!    The last such line on stderr wins; stdout's only count when stderr has none (scripts
//!    that redirect `2>&1`).
//!
//! When the marker is present but incomplete, the missing part is taken from the last
//! `ERROR:` line.

use std::path::Path;

use serde::Serialize;

use super::{read_records, Stream};

/// Longest message kept, in bytes (cut on a character boundary). The failure cause sent to
/// Step Functions has room for 32 KiB in total.
pub const MAX_SQL_MESSAGE: usize = 4096;

/// Longest logical line examined; the rest of a longer line is ignored.
const MAX_SCANNED_LINE: usize = 16 * 1024;

/// How many lines after an `ERROR:` line may still name its SQLSTATE.
const SQLSTATE_WINDOW: usize = 8;

/// The SQL error a job reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SqlError {
    pub sql_state: Option<String>,
    pub message: String,
}

/// Reads a job log and returns the SQL error it reports, if any. An unreadable file gives
/// `None`: the error only enriches a report that must be sent anyway.
pub fn extract_sql_error(path: &Path) -> Option<SqlError> {
    let records = match read_records(path) {
        Ok(records) => records,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot scan the job log for SQL errors");
            return None;
        }
    };
    let mut scanner = SqlErrorScanner::new();
    // Fragments are joined back into lines (bounded) before scanning.
    let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    for record in records.flatten() {
        let buf = &mut partial[record.stream.index()];
        let room = MAX_SCANNED_LINE.saturating_sub(buf.len());
        buf.extend_from_slice(&record.payload[..record.payload.len().min(room)]);
        if record.complete {
            scanner.feed_line(record.stream, buf);
            buf.clear();
        }
    }
    for stream in [Stream::Stdout, Stream::Stderr] {
        let buf = &partial[stream.index()];
        if !buf.is_empty() {
            scanner.feed_line(stream, buf);
        }
    }
    scanner.finish()
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Found {
    sql_state: Option<String>,
    message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MarkerState {
    Idle,
    AwaitCode,
    AwaitMessage { sql_state: Option<String> },
}

/// Line-by-line SQL error detection, for callers that already have lines (and for tests).
#[derive(Debug, Clone)]
pub struct SqlErrorScanner {
    marker_state: MarkerState,
    marker: Option<Found>,
    /// The last `ERROR:` line of each stream, and how many lines have passed since.
    errors: [Option<(Found, usize)>; 2],
}

impl Default for SqlErrorScanner {
    fn default() -> Self {
        SqlErrorScanner::new()
    }
}

impl SqlErrorScanner {
    pub fn new() -> SqlErrorScanner {
        SqlErrorScanner {
            marker_state: MarkerState::Idle,
            marker: None,
            errors: [None, None],
        }
    }

    /// Feeds one line of output, without its newline.
    pub fn feed_line(&mut self, stream: Stream, line: &[u8]) {
        let text = super::display(&line[..line.len().min(MAX_SCANNED_LINE)]);
        let text = text.trim();
        if stream == Stream::Stdout {
            self.feed_marker(text);
        }
        self.feed_error(stream, text);
    }

    fn feed_marker(&mut self, text: &str) {
        if let Some(after) = marker_tail(text) {
            self.close_marker();
            self.marker_state = MarkerState::AwaitCode;
            if !after.is_empty() {
                self.feed_code(after);
            }
            return;
        }
        if text.is_empty() {
            return;
        }
        match &self.marker_state {
            MarkerState::Idle => {}
            MarkerState::AwaitCode => self.feed_code(text),
            MarkerState::AwaitMessage { sql_state } => {
                self.marker = Some(Found {
                    sql_state: sql_state.clone(),
                    message: Some(clean_message(text)),
                });
                self.marker_state = MarkerState::Idle;
            }
        }
    }

    /// `text` is what follows the marker: a code, a code and a message, or (when the code
    /// is missing) the message itself.
    fn feed_code(&mut self, text: &str) {
        let (token, rest) = match text.split_once(char::is_whitespace) {
            Some((token, rest)) => (token, rest.trim()),
            None => (text, ""),
        };
        let sql_state = is_sqlstate(token).then(|| token.to_string());
        // A short single token that is not a SQLSTATE is still a code (a client-specific
        // number, say): the message follows on the next line.
        let is_code = sql_state.is_some() || (rest.is_empty() && token.len() <= 10);
        if !is_code {
            self.marker = Some(Found {
                sql_state: None,
                message: Some(clean_message(text)),
            });
            self.marker_state = MarkerState::Idle;
        } else if rest.is_empty() {
            self.marker_state = MarkerState::AwaitMessage { sql_state };
        } else {
            let rest = rest.trim_start_matches(['-', ':']).trim();
            self.marker = Some(Found {
                sql_state,
                message: (!rest.is_empty()).then(|| clean_message(rest)),
            });
            self.marker_state = MarkerState::Idle;
        }
    }

    /// A marker cut short (the output ended, or a new marker began) still counts for what
    /// it has.
    fn close_marker(&mut self) {
        match std::mem::replace(&mut self.marker_state, MarkerState::Idle) {
            MarkerState::Idle => {}
            MarkerState::AwaitCode => {
                self.marker = Some(Found::default());
            }
            MarkerState::AwaitMessage { sql_state } => {
                self.marker = Some(Found {
                    sql_state,
                    message: None,
                });
            }
        }
    }

    fn feed_error(&mut self, stream: Stream, text: &str) {
        let slot = &mut self.errors[stream.index()];
        if let Some(message) = error_tail(text) {
            let (mut sql_state, message) = match leading_sqlstate(message) {
                Some((state, rest)) => (Some(state), rest),
                None => (None, message),
            };
            if sql_state.is_none() {
                sql_state = sqlstate_mention(text);
            }
            *slot = Some((
                Found {
                    sql_state,
                    message: Some(clean_message(message)),
                },
                0,
            ));
        } else if let Some((found, since)) = slot {
            *since += 1;
            if *since <= SQLSTATE_WINDOW && found.sql_state.is_none() {
                found.sql_state = sqlstate_mention(text);
            }
        }
    }

    /// The error the output reported, if any.
    pub fn finish(mut self) -> Option<SqlError> {
        self.close_marker();
        let [stdout_error, stderr_error] = self.errors;
        let error = stderr_error.or(stdout_error).map(|(found, _)| found);
        let found = match (self.marker, error) {
            (Some(marker), error) if marker.sql_state.is_some() || marker.message.is_some() => {
                let error = error.unwrap_or_default();
                Found {
                    sql_state: marker.sql_state.or(error.sql_state),
                    message: marker.message.or(error.message),
                }
            }
            (_, Some(error)) => error,
            (_, None) => return None,
        };
        let message = match (found.message, &found.sql_state) {
            (Some(message), _) => message,
            (None, Some(state)) => format!("Error Code - {state}"),
            (None, None) => return None,
        };
        Some(SqlError {
            sql_state: found.sql_state,
            message,
        })
    }
}

/// The text after `Error Code -` (or `Error Code:`, any case), trimmed.
fn marker_tail(text: &str) -> Option<&str> {
    const MARKER: &str = "error code";
    let lower = text.to_ascii_lowercase();
    let at = lower.find(MARKER)?;
    // ASCII lower-casing keeps byte offsets, so `at` indexes `text` as well.
    let after = text[at + MARKER.len()..].trim_start();
    if after.is_empty() {
        return Some("");
    }
    let after = after.strip_prefix(['-', ':'])?;
    Some(after.trim())
}

/// The message after the first `ERROR:` or `FATAL:` on the line.
fn error_tail(text: &str) -> Option<&str> {
    let at = ["ERROR:", "FATAL:"]
        .iter()
        .filter_map(|needle| text.find(needle))
        .min()?;
    Some(text[at + "ERROR:".len()..].trim())
}

/// psql's verbose form: `42P01: relation "x" does not exist`.
fn leading_sqlstate(message: &str) -> Option<(String, &str)> {
    let (token, rest) = message.split_once(':')?;
    is_sqlstate(token).then(|| (token.to_string(), rest.trim()))
}

/// A `SQLSTATE 42P01` / `SQLSTATE: 42P01` / `sqlstate=42P01` mention anywhere in the line.
fn sqlstate_mention(text: &str) -> Option<String> {
    const NEEDLE: &str = "sqlstate";
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(found) = lower[from..].find(NEEDLE) {
        let start = from + found + NEEDLE.len();
        let candidate = text[start..].trim_start_matches([' ', ':', '=', '[', '(', '\t']);
        let code: String = candidate.chars().take(5).collect();
        let next = candidate.chars().nth(5);
        if is_sqlstate(&code) && !next.is_some_and(|c| c.is_ascii_alphanumeric()) {
            return Some(code);
        }
        from = start;
    }
    None
}

/// Five characters of `[0-9A-Z]` with at least one digit: every SQLSTATE has one, and the
/// digit keeps words such as `ERROR` or `FATAL` from passing as codes.
fn is_sqlstate(token: &str) -> bool {
    token.len() == 5
        && token
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        && token.bytes().any(|b| b.is_ascii_digit())
}

fn clean_message(text: &str) -> String {
    let text = text.trim();
    let text = text
        .strip_prefix("ERROR:")
        .map(str::trim_start)
        .unwrap_or(text);
    let mut end = text.len().min(MAX_SQL_MESSAGE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::joblog::{JobLog, LogName};
    use std::time::SystemTime;

    fn scan(stdout: &[&str], stderr: &[&str]) -> Option<SqlError> {
        let mut scanner = SqlErrorScanner::new();
        for line in stdout {
            scanner.feed_line(Stream::Stdout, line.as_bytes());
        }
        for line in stderr {
            scanner.feed_line(Stream::Stderr, line.as_bytes());
        }
        scanner.finish()
    }

    fn err(state: Option<&str>, message: &str) -> Option<SqlError> {
        Some(SqlError {
            sql_state: state.map(str::to_string),
            message: message.to_string(),
        })
    }

    #[test]
    fn the_scripts_marker_wins() {
        assert_eq!(
            scan(
                &[
                    "Creating table",
                    "Error Code -",
                    "42P01",
                    "relation \"rsql_blog.missing\" does not exist",
                ],
                &[
                    "rsql: ERROR: relation \"rsql_blog.missing\" does not exist",
                    "rsql: DETAIL: SQLSTATE 42P01",
                ],
            ),
            err(
                Some("42P01"),
                "relation \"rsql_blog.missing\" does not exist"
            )
        );
    }

    #[test]
    fn marker_variants() {
        // Code on the marker line.
        assert_eq!(
            scan(&["Error Code - 23505", "duplicate key value"], &[]),
            err(Some("23505"), "duplicate key value")
        );
        // Blank lines between the parts, and a message that repeats the ERROR: prefix.
        assert_eq!(
            scan(
                &["Error Code -", "", "08006", "", "ERROR: connection lost"],
                &[]
            ),
            err(Some("08006"), "connection lost")
        );
        // Everything on one line.
        assert_eq!(
            scan(
                &["Error Code - 42601 - syntax error at or near \"SELEC\""],
                &[]
            ),
            err(Some("42601"), "syntax error at or near \"SELEC\"")
        );
        // A code that is not a SQLSTATE still takes the code's place.
        assert_eq!(
            scan(&["Error Code - -1", "client failed"], &[]),
            err(None, "client failed")
        );
        // The marker cut short: the message comes from stderr.
        assert_eq!(
            scan(
                &["Error Code -", "42P01"],
                &["rsql: ERROR: relation \"x\" does not exist"]
            ),
            err(Some("42P01"), "relation \"x\" does not exist")
        );
        // Without the code the state comes from stderr.
        assert_eq!(
            scan(
                &["Error Code -", "", "relation \"x\" does not exist"],
                &[
                    "rsql: ERROR: relation \"x\" does not exist",
                    "SQLSTATE: 42P01"
                ],
            ),
            err(Some("42P01"), "relation \"x\" does not exist")
        );
        // The last marker wins.
        assert_eq!(
            scan(
                &[
                    "Error Code -",
                    "42P01",
                    "first",
                    "Error Code -",
                    "23505",
                    "second"
                ],
                &[]
            ),
            err(Some("23505"), "second")
        );
    }

    #[test]
    fn error_lines_without_a_marker() {
        assert_eq!(
            scan(
                &["INSERT 0 1"],
                &[
                    "rsql: ERROR: permission denied for schema x",
                    "rsql: ERROR: relation \"rsql_blog.missing\" does not exist",
                    "rsql: DETAIL: SQLSTATE 42P01",
                ],
            ),
            err(
                Some("42P01"),
                "relation \"rsql_blog.missing\" does not exist"
            )
        );
        // psql's verbose form carries the state as a prefix.
        assert_eq!(
            scan(
                &[],
                &["psql:x.sql:3: ERROR:  42P01: relation \"x\" does not exist"]
            ),
            err(Some("42P01"), "relation \"x\" does not exist")
        );
        // Connection failures are FATAL.
        assert_eq!(
            scan(
                &[],
                &["rsql: FATAL: password authentication failed (SQLSTATE 28P01)"]
            ),
            err(
                Some("28P01"),
                "password authentication failed (SQLSTATE 28P01)"
            )
        );
        // A later error's state is not borrowed by an earlier one.
        assert_eq!(
            scan(&[], &["rsql: ERROR: first", "rsql: ERROR: second", "noise"]),
            err(None, "second")
        );
        // stdout ERROR lines count only when stderr has none.
        assert_eq!(scan(&["ERROR: from stdout"], &[]), err(None, "from stdout"));
        assert_eq!(
            scan(&["ERROR: from stdout"], &["rsql: ERROR: from stderr"]),
            err(None, "from stderr")
        );
    }

    #[test]
    fn nothing_to_report() {
        assert_eq!(scan(&["all good", "ERRORCODE 00000"], &["notice: x"]), None);
        assert_eq!(scan(&["Error Code -"], &[]), None);
        // Words are not SQLSTATEs.
        assert!(!is_sqlstate("ERROR"));
        assert!(!is_sqlstate("42p01"));
        assert!(is_sqlstate("XX000"));
        assert_eq!(sqlstate_mention("SQLSTATE 42P01x"), None);
        assert_eq!(sqlstate_mention("x sqlstate=57014."), Some("57014".into()));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = format!("rsql: ERROR: {}", "é".repeat(MAX_SQL_MESSAGE));
        let found = scan(&[], &[&long]).expect("error");
        assert!(found.message.len() <= MAX_SQL_MESSAGE);
        assert!(found.message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn from_a_log_file_with_fragments_and_invalid_bytes() {
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
        let now = SystemTime::now();
        log.append(Stream::Stdout, now, b"Error Code -\n42P")
            .expect("append");
        log.append(Stream::Stdout, now, b"01\nrelation \xff does not exist\n")
            .expect("append");
        log.append(
            Stream::Stderr,
            now,
            b"rsql: ERROR: relation \xff does not exist\n",
        )
        .expect("append");
        log.finish().expect("finish");
        assert_eq!(
            extract_sql_error(log.path()),
            err(Some("42P01"), "relation \\xff does not exist")
        );
        assert_eq!(extract_sql_error(Path::new("/nonexistent.log")), None);
    }
}
