//! Where the agent's own log goes: natively to the systemd journal when the service manager
//! connected stderr to it, else readable text (or JSON with `--log-format json`) on stderr.
//!
//! Owns: the choice of sink (the documented `JOURNAL_STREAM` check: the variable is set and
//! its `device:inode` is stderr's), and the journal's native protocol, spoken directly over
//! the datagram socket `/run/systemd/journal/socket`. Each event becomes one journal entry with
//! `MESSAGE`, `PRIORITY` (from the level), `SYSLOG_IDENTIFIER=rsql-agent`, `TARGET`,
//! `CODE_FILE`/`CODE_LINE`, the event's own fields and the fields of every span it is in,
//! upper-cased: so the daemon's `job` span gives `JOB_NAME`, `WORKFLOW_EXECUTION_ID` and
//! `TOKEN_HASH`, and `journalctl -u rsql-agent JOB_NAME=...` finds one job's lines.
//!
//! Also owns what no sink may carry, whatever the level:
//! - the AWS SDK's request and response dumps (they hold message bodies, task tokens
//!   included): [`SDK_BODY_TARGETS`] are capped at `debug` even under `RSQL_AGENT_LOG=trace`;
//! - secret values the process knows: every line passes through `secrets::mask`;
//! - control characters in field values and messages of the text format: written as escapes
//!   (`\n`, `\u{1b}`), so a newline or an ANSI sequence in a job's field cannot forge a
//!   line. The JSON format escapes them by itself; the journal keeps each field apart.
//!
//! Must not touch: what is logged. A send that fails is dropped (logging is never part of the
//! data path); the job's own output goes to the job log, not here.
//!
//! The journal layer is hand-rolled rather than `tracing-journald`: that crate writes field
//! values as they come, with no hook to pass them through `secrets::mask`, and names fields
//! differently (an `F_` prefix on event fields by default), which would break the
//! documented `journalctl JOB_NAME=...` lookups.

use std::fmt::Write as _;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The journal's native-protocol socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Set by systemd when stdout/stderr are connected to the journal: `device:inode`.
pub const JOURNAL_STREAM_ENV: &str = "JOURNAL_STREAM";
/// The `SYSLOG_IDENTIFIER` of every entry (`journalctl -t rsql-agent`).
pub const SYSLOG_IDENTIFIER: &str = "rsql-agent";
/// The environment variable holding the log filter (`RSQL_AGENT_LOG=debug`).
pub const FILTER_ENV: &str = "RSQL_AGENT_LOG";

/// Installs the global subscriber: the journal when stderr is the journal (and its socket
/// answers), else `format` (`text` or `json`) on stderr. `default_level` applies when
/// `RSQL_AGENT_LOG` is unset or invalid.
pub fn init(format: &str, default_level: &str) {
    let filter = || filter(std::env::var(FILTER_ENV).ok().as_deref(), default_level);
    let stderr_is_journal = stderr_is_journal(std::env::var(JOURNAL_STREAM_ENV).ok().as_deref());
    if stderr_is_journal {
        if let Ok(layer) = JournalLayer::connect(Path::new(JOURNAL_SOCKET)) {
            tracing_subscriber::registry()
                .with(layer.with_filter(filter()))
                .init();
            return;
        }
    }
    // Colours only for a person at a terminal: in a file they are escape sequences.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(|| MaskingWriter(io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.fmt_fields(escaping_fields()).init();
    }
}

/// The SDK's targets whose `trace` events dump whole HTTP requests, responses and parsed
/// outputs (an SQS message body, a task token, a secret's value).
pub const SDK_BODY_TARGETS: [&str; 6] = [
    "aws_smithy_runtime::client::orchestrator",
    "aws_sigv4",
    "aws_smithy_http_client",
    "hyper",
    "hyper_util",
    "h2",
];

/// The filter from `RSQL_AGENT_LOG` (else `default_level`), with [`SDK_BODY_TARGETS`] capped
/// at `debug` whatever it says: added last, these directives win over the variable's. A cap,
/// never a raise: they are added only when the filter enables `trace` somewhere, so at the
/// default level the SDK's debug lines ("resolving endpoint", "timeout settings for this
/// operation", ten of them per failed call) never reach the journal.
pub fn filter(spec: Option<&str>, default_level: &str) -> EnvFilter {
    let mut filter = spec
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(default_level));
    if filter.max_level_hint() != Some(tracing::level_filters::LevelFilter::TRACE) {
        return filter;
    }
    for target in SDK_BODY_TARGETS {
        if let Ok(directive) = format!("{target}=debug").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Writes each formatted line with the process's known secrets masked.
#[derive(Debug)]
pub struct MaskingWriter<W: io::Write>(pub W);

impl<W: io::Write> io::Write for MaskingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The formatter hands over one whole line per event.
        match std::str::from_utf8(buf) {
            Ok(text) => self.0.write_all(crate::secrets::mask(text).as_bytes())?,
            Err(_) => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The text format's field formatter: `name=value`, the message bare, with control
/// characters escaped.
pub fn escaping_fields(
) -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let raw = format!("{value:?}");
        let text = escape_controls(&raw);
        if field.name() == "message" {
            write!(writer, "{text}")
        } else {
            write!(writer, "{}={text}", field.name())
        }
    })
    .delimited(" ")
}

/// `text` with every control character (newline, carriage return, escape, ...) written as
/// a Rust escape; tabs are kept.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The documented check (systemd.exec(5), `$JOURNAL_STREAM`): the variable is `device:inode`
/// and matches stderr, so a child that inherited the variable but not the stream logs text.
pub fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(parse_journal_stream) else {
        return false;
    };
    match nix::sys::stat::fstat(io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// Parses `JOURNAL_STREAM`'s `device:inode` (both decimal).
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// A `tracing` layer that writes each event as one native journal entry.
#[derive(Debug)]
pub struct JournalLayer {
    socket: UnixDatagram,
    path: PathBuf,
}

impl JournalLayer {
    /// Connects to the journal socket at `path` (the real one is [`JOURNAL_SOCKET`]; tests
    /// bind their own).
    pub fn connect(path: &Path) -> io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        Ok(JournalLayer {
            socket,
            path: path.to_path_buf(),
        })
    }

    fn send(&self, payload: &[u8]) {
        // A send that fails (journald restarting, an entry too large) is dropped: the
        // agent's own log is advice, never part of the data path.
        if self.socket.send(payload).is_err() {
            let _ = self.socket.send_to(payload, &self.path);
        }
    }
}

/// The fields recorded on a span, already encoded as journal fields.
#[derive(Debug, Default)]
struct SpanFields(Vec<(String, String)>);

impl<S> Layer<S> for JournalLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = SpanFields::default();
        attrs.record(&mut FieldVisitor(&mut fields.0));
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(fields) = extensions.get_mut::<SpanFields>() {
            let mut new = Vec::new();
            values.record(&mut FieldVisitor(&mut new));
            for (name, value) in new {
                fields.0.retain(|(n, _)| *n != name);
                fields.0.push((name, value));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields: Vec<(String, String)> = Vec::new();
        // Span fields first (outermost to innermost); an event's own field wins over a span's.
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(span_fields) = span.extensions().get::<SpanFields>() {
                    for (name, value) in &span_fields.0 {
                        fields.retain(|(n, _)| n != name);
                        fields.push((name.clone(), value.clone()));
                    }
                }
            }
        }
        let mut own = Vec::new();
        event.record(&mut FieldVisitor(&mut own));
        let own_names: Vec<String> = own.iter().map(|(n, _)| n.clone()).collect();
        for (name, value) in own {
            fields.retain(|(n, _)| *n != name);
            fields.push((name, value));
        }
        let mut buf = Vec::with_capacity(256);
        put_field(&mut buf, "PRIORITY", priority(meta.level()));
        put_field(&mut buf, "SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER);
        put_field(&mut buf, "TARGET", meta.target());
        if let Some(file) = meta.file() {
            put_field(&mut buf, "CODE_FILE", file);
        }
        if let Some(line) = meta.line() {
            put_field(&mut buf, "CODE_LINE", &line.to_string());
        }
        let message = readable_message(&fields, &own_names, meta.name());
        for (name, value) in &fields {
            if name != "MESSAGE" {
                put_field(&mut buf, name, value);
            }
        }
        put_field(&mut buf, "MESSAGE", &message);
        self.send(&buf);
    }
}

/// The journal's `MESSAGE` as a person reads it in plain `journalctl -u rsql-agent`: which
/// job (`JOB_NAME (WORKFLOW_EXECUTION_ID): `) when the line belongs to one, the message, then
/// the event's own fields as ` name=value` (the reason, the error, the exit code), so that
/// nothing needed to understand the line hides in structured fields alone.
fn readable_message(fields: &[(String, String)], own: &[String], fallback: &str) -> String {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let mut text = String::new();
    if let Some(job) = get("JOB_NAME") {
        text.push_str(job);
        if let Some(execution) = get("WORKFLOW_EXECUTION_ID") {
            let _ = write!(text, " ({execution})");
        }
        text.push_str(": ");
    }
    text.push_str(get("MESSAGE").unwrap_or(fallback));
    for (name, value) in fields {
        if name == "MESSAGE" || !own.contains(name) || value.is_empty() {
            continue;
        }
        let _ = write!(text, " {}={value}", name.to_ascii_lowercase());
    }
    text
}

/// syslog priorities: err 3, warning 4, info 6, debug 7 (`journalctl -p err`).
fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "6",
        _ => "7",
    }
}

/// A journal field name: upper case `A-Z`, `0-9` and `_`, not starting with a digit or `_`
/// (those are trusted fields), at most 64 bytes. `job_name` becomes `JOB_NAME`; `message`
/// becomes `MESSAGE`.
pub fn field_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' => c.to_ascii_uppercase(),
            'A'..='Z' | '0'..='9' => c,
            _ => '_',
        })
        .collect();
    let trimmed = out.trim_start_matches(|c: char| c == '_' || c.is_ascii_digit());
    if trimmed.len() != out.len() {
        out = format!("F_{trimmed}");
    }
    if out.is_empty() || out == "F_" {
        out = "FIELD".to_string();
    }
    out.truncate(64);
    out
}

/// Appends one field in the native protocol: `NAME=value\n`, or, when the value holds a
/// newline, `NAME\n` + little-endian u64 length + value + `\n`.
pub fn put_field(buf: &mut Vec<u8>, name: &str, value: &str) {
    let value = &*crate::secrets::mask(value);
    buf.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

/// Parses a native-protocol datagram back into fields (for tests and diagnostics).
pub fn parse_entry(mut data: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let Some(nl) = data.iter().position(|&b| b == b'\n') else {
            break;
        };
        let line = &data[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            data = &data[nl + 1..];
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let rest = &data[nl + 1..];
            if rest.len() < 8 {
                break;
            }
            let mut len = [0u8; 8];
            len.copy_from_slice(&rest[..8]);
            let len = u64::from_le_bytes(len) as usize;
            let Some(value) = rest.get(8..8 + len) else {
                break;
            };
            out.push((name, String::from_utf8_lossy(value).into_owned()));
            data = rest.get(8 + len + 1..).unwrap_or(&[]);
        }
    }
    out
}

struct FieldVisitor<'a>(&'a mut Vec<(String, String)>);

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field_name(field.name()), value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.0.push((field_name(field.name()), text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn get<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn job_lines_carry_the_job_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.socket");
        let journal = UnixDatagram::bind(&path).unwrap();
        journal
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let layer = JournalLayer::connect(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "job",
                job_name = %"rsql_blog_script_1.sh",
                workflow_execution_id = %"demo_test_26",
                token_hash = %"ab12cd34",
            );
            let _guard = span.enter();
            tracing::error!(exit_code = 3, "job failed:\nsecond line");
        });
        let mut buf = vec![0u8; 65536];
        let n = journal.recv(&mut buf).unwrap();
        let fields = parse_entry(&buf[..n]);
        assert_eq!(get(&fields, "JOB_NAME"), Some("rsql_blog_script_1.sh"));
        assert_eq!(get(&fields, "WORKFLOW_EXECUTION_ID"), Some("demo_test_26"));
        assert_eq!(get(&fields, "TOKEN_HASH"), Some("ab12cd34"));
        assert_eq!(get(&fields, "PRIORITY"), Some("3"));
        assert_eq!(get(&fields, "SYSLOG_IDENTIFIER"), Some("rsql-agent"));
        assert_eq!(get(&fields, "EXIT_CODE"), Some("3"));
        assert_eq!(
            get(&fields, "MESSAGE"),
            Some("rsql_blog_script_1.sh (demo_test_26): job failed:\nsecond line exit_code=3")
        );
    }

    #[test]
    fn lines_outside_a_job_have_no_job_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.socket");
        let journal = UnixDatagram::bind(&path).unwrap();
        journal
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let layer = JournalLayer::connect(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("intake started");
        });
        let mut buf = vec![0u8; 65536];
        let n = journal.recv(&mut buf).unwrap();
        let fields = parse_entry(&buf[..n]);
        assert_eq!(get(&fields, "MESSAGE"), Some("intake started"));
        assert_eq!(get(&fields, "PRIORITY"), Some("6"));
        assert_eq!(get(&fields, "JOB_NAME"), None);
    }

    #[test]
    fn the_default_level_lets_no_sdk_debug_line_through() {
        use tracing::level_filters::LevelFilter;
        assert_eq!(
            filter(None, "info").max_level_hint(),
            Some(LevelFilter::INFO)
        );
        assert_eq!(
            filter(Some("warn"), "info").max_level_hint(),
            Some(LevelFilter::WARN)
        );
        // Under trace the body dumps stay capped at debug: the cap directives are there.
        let traced = filter(Some("trace"), "info").to_string();
        for target in SDK_BODY_TARGETS {
            assert!(traced.contains(&format!("{target}=debug")), "{traced}");
        }
    }

    #[test]
    fn field_names_are_journal_safe() {
        assert_eq!(field_name("job_name"), "JOB_NAME");
        assert_eq!(field_name("message"), "MESSAGE");
        assert_eq!(field_name("a.b-c"), "A_B_C");
        assert_eq!(field_name("_priv"), "F_PRIV");
        assert_eq!(field_name("9x"), "F_X");
    }

    #[test]
    fn journal_stream_must_match_stderr() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("nope"), None);
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("0:0")));
        let st = nix::sys::stat::fstat(io::stderr()).unwrap();
        let matching = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(stderr_is_journal(Some(&matching)));
    }
}
