//! The interpreter: runs a script's items in order, keeps the RSQL variables, the `\if` stack
//! and `\goto` skipping, and prints results and errors.
//!
//! Owns everything a user sees on stdout and stderr once connected. Does not own lexing
//! (`split`), expressions (`cond`) or the connection (`db`).

use std::io::Write;
use std::time::Instant;

use crate::cond;
use crate::db::{Database, Executed, Reply, Row, SqlError};
use crate::split::{Item, Lexer};
use crate::vars::{self, Vars};
use crate::{CONNECTION_FAILED, SCRIPT_ERROR};

/// Redshift session settings that PostgreSQL does not know. `SET`/`RESET` of these succeed
/// without reaching the server; every other `SET` runs for real.
const REDSHIFT_ONLY_SETTINGS: &[&str] = &[
    "query_group",
    "enable_result_cache_for_session",
    "analyze_threshold_percent",
    "wlm_query_slot_count",
    "enable_case_sensitive_identifier",
    "describe_field_name_in_uppercase",
    "mv_enable_aqmv_for_session",
];

/// Where one `\if` ... `\endif` block stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Branch {
    /// The current branch runs.
    Active,
    /// No branch has run yet; a later `\elseif` or `\else` may.
    Pending,
    /// A branch has run; the rest are skipped.
    Done,
    /// The whole block sits inside a skipped branch.
    Ignored,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    branch: Branch,
    seen_else: bool,
}

/// Runs scripts against a [`Database`], writing results to `out` and errors to `err`.
#[derive(Debug)]
pub struct Interpreter<D, O, E> {
    db: D,
    vars: Vars,
    out: O,
    err: E,
    frames: Vec<Frame>,
    /// The label a `\goto` is skipping to.
    seeking: Option<String>,
    timing: bool,
    quiet: bool,
}

impl<D: Database, O: Write, E: Write> Interpreter<D, O, E> {
    pub fn new(db: D, vars: Vars, out: O, err: E, quiet: bool) -> Self {
        let mut interpreter = Interpreter {
            db,
            vars,
            out,
            err,
            frames: Vec::new(),
            seeking: None,
            timing: false,
            quiet,
        };
        // Defined before the first statement so that `\if :ERROR <> 0` works anywhere. psql
        // leaves ERROR unset until then; RSQL does not say.
        interpreter.set_success(0);
        interpreter.vars.set("LAST_ERROR_MESSAGE", "");
        interpreter.vars.set("LAST_ERROR_SQLSTATE", "00000");
        interpreter
    }

    /// Runs the whole script and returns the process exit code.
    pub fn run(&mut self, script: &str) -> i32 {
        let mut lexer = Lexer::new(script);
        while let Some(item) = lexer.next_item(&self.vars) {
            let exit = match item {
                Item::Statement(sql) => self.statement(&sql),
                Item::Meta { name, args } => self.meta(&name, &args),
            };
            if let Some(code) = exit {
                let _ = self.out.flush();
                return code;
            }
        }
        let code = if let Some(label) = &self.seeking {
            self.error(&format!("\\goto: label \"{label}\" not found"));
            SCRIPT_ERROR
        } else if !self.frames.is_empty() {
            self.error("reached end of input without finding closing \\endif");
            SCRIPT_ERROR
        } else {
            // Like psql without ON_ERROR_STOP (RSQL does not document this): the end of the
            // script is success, whatever failed on the way. Scripts test :ERROR and \exit.
            0
        };
        let _ = self.out.flush();
        code
    }

    fn active(&self) -> bool {
        self.seeking.is_none()
            && self
                .frames
                .last()
                .is_none_or(|f| f.branch == Branch::Active)
    }

    fn on_error_stop(&self) -> bool {
        self.vars
            .get("ON_ERROR_STOP")
            .is_some_and(|v| cond::evaluate(v, &Vars::default()).unwrap_or(false))
    }

    fn error(&mut self, message: &str) {
        let _ = writeln!(self.err, "rsql: ERROR: {message}");
    }

    fn set_success(&mut self, count: u64) {
        let v = &mut self.vars;
        v.set("ERROR", "0");
        v.set("ERRORCODE", "00000");
        v.set("SQLSTATE", "00000");
        v.set("ACTIVITYCOUNT", count.to_string());
        v.set("ROW_COUNT", count.to_string());
    }

    /// RSQL documents ERRORCODE (the SQLSTATE) but not the value of ERROR. Converted scripts
    /// test `:ERROR <> 0`, so it is 0 after success and 1 after a failure. psql's ERROR is
    /// `true`/`false`; `\if :ERROR` works with both.
    fn set_failure(&mut self, e: &SqlError) {
        let v = &mut self.vars;
        v.set("ERROR", "1");
        v.set("ERRORCODE", e.sqlstate.as_str());
        v.set("SQLSTATE", e.sqlstate.as_str());
        v.set("LAST_ERROR_SQLSTATE", e.sqlstate.as_str());
        v.set("LAST_ERROR_MESSAGE", e.message.as_str());
        v.set("ACTIVITYCOUNT", "0");
        v.set("ROW_COUNT", "0");
    }

    fn report(&mut self, e: &SqlError) {
        let _ = writeln!(self.err, "rsql: ERROR: {}", e.message);
        if let Some(detail) = &e.detail {
            let _ = writeln!(self.err, "rsql: DETAIL: {detail}");
        }
        if let Some(hint) = &e.hint {
            let _ = writeln!(self.err, "rsql: HINT: {hint}");
        }
        let _ = writeln!(self.err, "rsql: SQLSTATE: {}", e.sqlstate);
    }

    fn statement(&mut self, sql: &str) -> Option<i32> {
        if !self.active() {
            return None; // psql discards statements in skipped branches
        }
        let started = Instant::now();
        let executed = match redshift_only_setting(sql) {
            Some(tag) => Executed::Done(vec![Reply::Command {
                tag: tag.to_string(),
                count: 0,
            }]),
            None => self
                .db
                .execute(&crate::ddl::strip_redshift_table_attributes(sql)),
        };
        let elapsed = started.elapsed();
        let exit = match executed {
            Executed::Done(replies) => {
                let count = replies.last().map_or(0, |r| match r {
                    Reply::Rows { count, .. } | Reply::Command { count, .. } => *count,
                });
                let mut text = String::new();
                for reply in &replies {
                    match reply {
                        Reply::Rows { columns, rows, .. } => {
                            text.push_str(&format_table(columns, rows))
                        }
                        Reply::Command { tag, .. } if !self.quiet => {
                            text.push_str(tag);
                            text.push('\n');
                        }
                        Reply::Command { .. } => {}
                    }
                }
                let _ = self.out.write_all(text.as_bytes());
                self.set_success(count);
                None
            }
            Executed::Failed(e) => {
                self.report(&e);
                self.set_failure(&e);
                // psql's ON_ERROR_STOP; psql exits 3 then, which here means a lost connection.
                self.on_error_stop().then_some(SCRIPT_ERROR)
            }
            Executed::Lost(e) => {
                self.report(&e);
                // Say in SQLSTATE terms (class 08) that the connection is gone, whatever the
                // server's last word was (e.g. 57P01 when an administrator ended the session).
                let lost = if e.sqlstate.starts_with("08") {
                    e
                } else {
                    let lost = SqlError {
                        sqlstate: "08006".to_string(),
                        message: "connection to server was lost".to_string(),
                        detail: None,
                        hint: None,
                    };
                    self.report(&lost);
                    lost
                };
                self.set_failure(&lost);
                Some(CONNECTION_FAILED)
            }
        };
        if self.timing {
            let _ = writeln!(self.out, "Time: {:.3} ms", elapsed.as_secs_f64() * 1000.0);
        }
        let _ = self.out.flush();
        exit
    }

    fn meta(&mut self, name: &str, raw_args: &str) -> Option<i32> {
        // RSQL accepts commands in either case; psql's are lower case.
        let name = name.to_ascii_lowercase();
        match name.as_str() {
            "if" | "elseif" | "elif" | "else" | "endif" => {
                self.conditional(&name, raw_args);
                return None;
            }
            "label" => {
                if let Some(seeking) = &self.seeking {
                    let label = vars::meta_args(raw_args, &self.vars);
                    if label
                        .first()
                        .is_some_and(|l| l.eq_ignore_ascii_case(seeking))
                    {
                        self.seeking = None;
                    }
                }
                return None;
            }
            _ => {}
        }
        if !self.active() {
            return None;
        }
        let args = vars::meta_args(raw_args, &self.vars);
        match name.as_str() {
            "goto" => match args.first() {
                // Labels compare without regard to case, as BTEQ labels did.
                Some(label) => self.seeking = Some(label.clone()),
                None => self.error("\\goto: missing label"),
            },
            "exit" | "quit" | "q" => {
                return Some(match args.first() {
                    None => 0,
                    Some(code) => match code.parse::<i32>() {
                        Ok(code) => code,
                        Err(_) => {
                            self.error(&format!("\\{name}: invalid exit code \"{code}\""));
                            SCRIPT_ERROR
                        }
                    },
                });
            }
            // RSQL's \remark prints its text like \echo.
            "echo" | "remark" | "qecho" | "warn" => {
                let (newline, words) = match args.first().map(String::as_str) {
                    Some("-n") => (false, &args[1..]),
                    _ => (true, &args[..]),
                };
                let mut text = words.join(" ");
                if newline {
                    text.push('\n');
                }
                if name == "warn" {
                    let _ = self.err.write_all(text.as_bytes());
                } else {
                    let _ = self.out.write_all(text.as_bytes());
                    let _ = self.out.flush();
                }
            }
            "set" => match args.split_first() {
                None => {
                    let listing: String = self
                        .vars
                        .iter()
                        .map(|(k, v)| format!("{k} = '{v}'\n"))
                        .collect();
                    let _ = self.out.write_all(listing.as_bytes());
                }
                Some((var, _)) if !vars::is_valid_name(var) => {
                    self.error(&format!("\\set: invalid variable name: \"{var}\""));
                }
                // psql joins the values without spaces.
                Some((var, values)) => self.vars.set(var, values.concat()),
            },
            "unset" => match args.first() {
                Some(var) => self.vars.unset(var),
                None => self.error("\\unset: missing required argument"),
            },
            "timing" => {
                self.timing = match args.first().map(|a| a.to_ascii_lowercase()) {
                    None => !self.timing,
                    Some(a) => matches!(a.as_str(), "on" | "true" | "1" | "yes"),
                };
                let state = if self.timing { "on" } else { "off" };
                let _ = writeln!(self.out, "Timing is {state}.");
            }
            // Like psql without ON_ERROR_STOP, an unknown command is reported and skipped.
            _ => self.error(&format!("unknown command \\{name}")),
        }
        None
    }

    fn conditional(&mut self, name: &str, raw_args: &str) {
        if self.seeking.is_some() {
            // Skipping to a label: follow the block structure without evaluating anything, and
            // treat every branch as the one that will run, since the label may be inside it.
            match name {
                "if" => self.frames.push(Frame {
                    branch: Branch::Active,
                    seen_else: false,
                }),
                "endif" => {
                    self.frames.pop();
                }
                _ => {
                    if let Some(frame) = self.frames.last_mut() {
                        frame.branch = Branch::Active;
                    }
                }
            }
            return;
        }
        match name {
            "if" => {
                let branch = if self.active() {
                    if self.evaluate(name, raw_args) {
                        Branch::Active
                    } else {
                        Branch::Pending
                    }
                } else {
                    Branch::Ignored
                };
                self.frames.push(Frame {
                    branch,
                    seen_else: false,
                });
            }
            "elseif" | "elif" | "else" => {
                let Some(frame) = self.frames.last().copied() else {
                    self.error(&format!("\\{name}: no matching \\if"));
                    return;
                };
                if frame.seen_else {
                    self.error(&format!("\\{name}: cannot occur after \\else"));
                    return;
                }
                let branch = match frame.branch {
                    Branch::Active | Branch::Done => Branch::Done,
                    Branch::Ignored => Branch::Ignored,
                    Branch::Pending if name == "else" => Branch::Active,
                    Branch::Pending => {
                        if self.evaluate(name, raw_args) {
                            Branch::Active
                        } else {
                            Branch::Pending
                        }
                    }
                };
                if let Some(top) = self.frames.last_mut() {
                    top.branch = branch;
                    top.seen_else = name == "else";
                }
            }
            _ => {
                if self.frames.pop().is_none() {
                    self.error("\\endif: no matching \\if");
                }
            }
        }
    }

    /// Evaluates a condition; like psql, one that cannot be evaluated is reported and false.
    fn evaluate(&mut self, name: &str, raw_args: &str) -> bool {
        match cond::evaluate(raw_args, &self.vars) {
            Ok(value) => value,
            Err(e) => {
                self.error(&format!("\\{name}: {e}; treated as false"));
                false
            }
        }
    }
}

/// The tag to report for a `SET`/`RESET` of a Redshift-only setting, or `None` when `sql` is
/// anything else.
pub fn redshift_only_setting(sql: &str) -> Option<&'static str> {
    let words = crate::db::top_level_words(sql);
    let (tag, rest) = match words.split_first()? {
        (first, rest) if first == "SET" => ("SET", rest),
        (first, rest) if first == "RESET" => ("RESET", rest),
        _ => return None,
    };
    let name = match rest {
        [scope, name, ..] if scope == "SESSION" || scope == "LOCAL" => name,
        [name, ..] => name,
        [] => return None,
    };
    REDSHIFT_ONLY_SETTINGS
        .iter()
        .any(|s| s.eq_ignore_ascii_case(name))
        .then_some(tag)
}

/// A result table in psql's aligned format, with its `(N rows)` footer and a blank line.
/// Columns whose values are all numbers are right-aligned (psql aligns by type, which the
/// simple-query protocol does not report). A value with line breaks spans several lines, each
/// but the last marked with `+`, as psql marks them.
pub fn format_table(columns: &[String], rows: &[Row]) -> String {
    let width = |s: &str| s.chars().count();
    // Each cell as its lines; NULL prints as nothing.
    let cells: Vec<Vec<Vec<&str>>> = rows
        .iter()
        .map(|row| {
            (0..columns.len())
                .map(|i| match row.get(i) {
                    Some(Some(value)) => value.split('\n').collect(),
                    _ => vec![""],
                })
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = columns.iter().map(|c| width(c)).collect();
    for row in &cells {
        for (w, lines) in widths.iter_mut().zip(row) {
            *w = lines.iter().map(|l| width(l)).fold(*w, usize::max);
        }
    }
    let numeric: Vec<bool> = (0..columns.len())
        .map(|i| {
            let mut values = rows.iter().filter_map(|r| r.get(i)?.as_deref()).peekable();
            values.peek().is_some()
                && values.all(|v| v.parse::<f64>().is_ok() && !v.contains(char::is_alphabetic))
        })
        .collect();

    let mut out = String::new();
    let header: Vec<String> = columns
        .iter()
        .zip(&widths)
        .map(|(name, &w)| {
            let pad = w - width(name);
            let (left, right) = (pad / 2, pad - pad / 2);
            format!(" {}{name}{} ", " ".repeat(left), " ".repeat(right))
        })
        .collect();
    out.push_str(&header.join("|"));
    out.push('\n');
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(w + 2)).collect();
    out.push_str(&rule.join("+"));
    out.push('\n');
    let last = columns.len().saturating_sub(1);
    for row in &cells {
        let height = row.iter().map(Vec::len).max().unwrap_or(1);
        for k in 0..height {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, lines)| {
                    let Some(&text) = lines.get(k) else {
                        // Below a shorter cell: blank, and psql pads only inner columns.
                        let blank = if i == last { 0 } else { widths[i] + 1 };
                        return format!(" {}", " ".repeat(blank));
                    };
                    let pad = " ".repeat(widths[i] - width(text));
                    let more = k + 1 < lines.len();
                    let marker = if more { "+" } else { " " };
                    match (numeric[i], i == last) {
                        (true, true) if !more => format!(" {pad}{text}"),
                        (true, _) => format!(" {pad}{text}{marker}"),
                        (false, true) if !more => format!(" {text}"),
                        (false, _) => format!(" {text}{pad}{marker}"),
                    }
                })
                .collect();
            out.push_str(&line.join("|"));
            out.push('\n');
        }
    }
    let n = rows.len();
    out.push_str(&format!("({n} row{})\n\n", if n == 1 { "" } else { "s" }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers from a script of canned results; records what was sent.
    #[derive(Debug, Default)]
    struct FakeDb {
        sent: Vec<String>,
    }

    impl Database for FakeDb {
        fn execute(&mut self, sql: &str) -> Executed {
            self.sent.push(sql.to_string());
            if sql.contains("missing") {
                Executed::Failed(SqlError {
                    sqlstate: "42P01".to_string(),
                    message: "relation \"missing\" does not exist".to_string(),
                    detail: None,
                    hint: None,
                })
            } else if sql.contains("crash") {
                Executed::Lost(SqlError {
                    sqlstate: "08006".to_string(),
                    message: "connection to server was lost".to_string(),
                    detail: None,
                    hint: None,
                })
            } else if sql.starts_with("select") {
                Executed::Done(vec![Reply::Rows {
                    columns: vec!["n".to_string()],
                    rows: vec![vec![Some("1".to_string())], vec![Some("2".to_string())]],
                    count: 2,
                }])
            } else {
                Executed::Done(vec![Reply::Command {
                    tag: "INSERT 0 1".to_string(),
                    count: 1,
                }])
            }
        }
    }

    struct Ran {
        code: i32,
        out: String,
        err: String,
        sent: Vec<String>,
        vars: Vars,
    }

    fn run(script: &str) -> Ran {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut i = Interpreter::new(
            FakeDb::default(),
            Vars::default(),
            &mut out,
            &mut err,
            false,
        );
        let code = i.run(script);
        let sent = std::mem::take(&mut i.db.sent);
        let vars = i.vars.clone();
        drop(i);
        Ran {
            code,
            out: String::from_utf8(out).unwrap(),
            err: String::from_utf8(err).unwrap(),
            sent,
            vars,
        }
    }

    #[test]
    fn error_variables_follow_the_last_statement() {
        let r = run("select * from missing;\n\\echo :ERROR :ERRORCODE :'LAST_ERROR_MESSAGE'\ninsert into t values (1);\n\\echo :ERROR :ERRORCODE :ACTIVITYCOUNT");
        assert_eq!(
            r.out,
            "1 42P01 'relation \"missing\" does not exist'\nINSERT 0 1\n0 00000 1\n"
        );
        assert_eq!(
            r.err,
            "rsql: ERROR: relation \"missing\" does not exist\nrsql: SQLSTATE: 42P01\n"
        );
        assert_eq!(r.code, 0, "an error does not stop the script");
        assert_eq!(
            r.vars.get("LAST_ERROR_MESSAGE"),
            Some("relation \"missing\" does not exist")
        );
    }

    #[test]
    fn if_elseif_else_pick_one_branch_and_nest() {
        let script = "select 1;\n\
            \\if :ACTIVITYCOUNT = 0\n\\echo none\n\
            \\elseif :ACTIVITYCOUNT = 2\n\\echo two\n\
              \\if :ERROR <> 0\n\\echo inner-bad\n\\else\n\\echo inner-ok\n\\endif\n\
            \\elseif true\n\\echo not-reached\n\
            \\else\n\\echo not-reached\n\\endif\n\\echo after";
        let r = run(script);
        assert_eq!(
            r.out,
            " n \n---\n 1\n 2\n(2 rows)\n\ntwo\ninner-ok\nafter\n"
        );
        assert_eq!(r.err, "");
    }

    #[test]
    fn skipped_branches_send_nothing() {
        let r = run("\\if false\ninsert into skipped values (1);\n\\exit 9\n\\endif\ninsert into kept values (1);");
        assert_eq!(r.sent, ["insert into kept values (1);"]);
        assert_eq!(r.code, 0);
    }

    #[test]
    fn goto_skips_forward_to_its_label() {
        let r = run("\\goto done\ninsert into skipped values (1);\n\\if true\n\\echo no\n\\endif\n\\label DONE\n\\echo yes\n");
        assert_eq!(r.sent, Vec::<String>::new());
        assert_eq!(r.out, "yes\n");
        assert_eq!(r.code, 0);
    }

    #[test]
    fn goto_out_of_and_into_blocks() {
        let r = run("\\if true\n\\goto out\n\\endif\n\\echo no\n\\label out\n\\echo out\n\\goto in\n\\if false\n\\else\n\\label in\n\\echo in\n\\else\n\\echo no\n\\endif\n\\echo end");
        assert_eq!(r.out, "out\nin\nend\n");
        assert_eq!(r.err, "");
    }

    #[test]
    fn a_missing_label_is_an_error() {
        let r = run("\\goto nowhere\n\\echo skipped\n");
        assert_eq!(r.code, SCRIPT_ERROR);
        assert_eq!(r.out, "");
        assert_eq!(r.err, "rsql: ERROR: \\goto: label \"nowhere\" not found\n");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(run("\\exit 21\n\\echo no").code, 21);
        assert_eq!(run("\\EXIT").code, 0);
        assert_eq!(run("\\q").code, 0);
        assert_eq!(run("\\set rc 7\n\\exit :rc").code, 7);
        let bad = run("\\exit soon");
        assert_eq!(bad.code, SCRIPT_ERROR);
        assert!(bad.err.contains("invalid exit code"), "{}", bad.err);
        assert_eq!(run("\\if true\n").code, SCRIPT_ERROR, "unclosed \\if");
        assert_eq!(run("select crash;\n\\echo no").code, CONNECTION_FAILED);
    }

    #[test]
    fn on_error_stop_ends_the_script_at_the_first_failure() {
        let r = run("\\set ON_ERROR_STOP on\nselect * from missing;\ninsert into t values (1);");
        assert_eq!(r.code, SCRIPT_ERROR);
        assert_eq!(r.sent, ["select * from missing;"]);
        let r = run("\\set ON_ERROR_STOP off\nselect * from missing;\ninsert into t values (1);");
        assert_eq!((r.code, r.sent.len()), (0, 2));
    }

    #[test]
    fn unknown_commands_are_reported_and_skipped() {
        let r = run("\\frobnicate now\n\\remark 'still here'\n");
        assert_eq!(r.err, "rsql: ERROR: unknown command \\frobnicate\n");
        assert_eq!(r.out, "still here\n");
        assert_eq!(r.code, 0);
    }

    #[test]
    fn set_and_substitution_into_sql() {
        let r = run("\\set tbl rsql_blog.blog_table\n\\set who 'O''Brien'\ninsert into :tbl values (:'who');");
        assert_eq!(
            r.sent,
            ["insert into rsql_blog.blog_table values ('O''Brien');"]
        );
    }

    #[test]
    fn redshift_only_settings_are_accepted_without_the_server() {
        let r = run("SET query_group TO 'etl';\nreset QUERY_GROUP;\nset session wlm_query_slot_count = 2;\nset search_path to x;");
        assert_eq!(r.sent, ["set search_path to x;"]);
        assert_eq!(r.out, "SET\nRESET\nSET\nINSERT 0 1\n");
        assert_eq!(redshift_only_setting("SET statement_timeout = 0"), None);
        assert_eq!(redshift_only_setting("select 1"), None);
    }

    #[test]
    fn tables_look_like_psql() {
        let cols = vec![
            "a".to_string(),
            "long_column_name".to_string(),
            "n".to_string(),
        ];
        let rows = vec![vec![Some("1".to_string()), Some("xyz".to_string()), None]];
        assert_eq!(
            format_table(&cols, &rows),
            " a | long_column_name | n \n---+------------------+---\n 1 | xyz              | \n(1 row)\n\n"
        );
        let cols = vec!["m".to_string(), "num".to_string()];
        let rows = vec![vec![Some("a\nb".to_string()), Some("12.5".to_string())]];
        assert_eq!(
            format_table(&cols, &rows),
            " m | num  \n---+------\n a+| 12.5\n b | \n(1 row)\n\n"
        );
        assert_eq!(
            format_table(&["x".to_string()], &[]),
            " x \n---\n(0 rows)\n\n"
        );
    }
}
