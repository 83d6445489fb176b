//! The database side: connecting, running one statement, and what came back.
//!
//! Owns the PostgreSQL connection (the `postgres` crate's sync client) and turns its answers
//! into [`Reply`] values. Does not print and does not touch script variables; the interpreter
//! does both, which lets its tests use a fake [`Database`].

use std::time::Duration;

use postgres::{Client, NoTls, SimpleQueryMessage};

/// One row of text values; `None` is NULL.
pub type Row = Vec<Option<String>>;

/// One result of a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A row-returning statement: column names, rows (`None` is NULL) and the row count.
    Rows {
        columns: Vec<String>,
        rows: Vec<Row>,
        count: u64,
    },
    /// Any other command: its tag as psql prints it (`INSERT 0 1`) and the rows affected.
    Command { tag: String, count: u64 },
}

/// An error reported by the server (or by the client library for a lost connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    pub sqlstate: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// The outcome of sending one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Executed {
    Done(Vec<Reply>),
    Failed(SqlError),
    /// The connection is gone; nothing more can run.
    Lost(SqlError),
}

/// Something that runs SQL text and says what came back.
pub trait Database {
    fn execute(&mut self, sql: &str) -> Executed;
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<String>,
    pub connect_timeout: Duration,
}

/// Why connecting failed: a message in the words of `could not connect ...`, and the SQLSTATE
/// the server sent, or `08001` (SQL client unable to establish connection) when it sent none.
#[derive(Debug, Clone)]
pub struct ConnectError {
    pub message: String,
    pub sqlstate: String,
}

/// The transaction state as far as this client can tell; the `postgres` crate does not show
/// the server's own (ReadyForQuery) status. Used only to print `ROLLBACK` for a `COMMIT` of a
/// failed transaction, as the server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tx {
    Idle,
    Open,
    Failed,
}

/// A live connection.
pub struct PgDatabase {
    client: Client,
    tx: Tx,
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDatabase").field("tx", &self.tx).finish()
    }
}

impl PgDatabase {
    /// Connects without TLS. Server notices and warnings go to stderr as `rsql: NOTICE: ...`.
    pub fn connect(target: &Target) -> Result<PgDatabase, ConnectError> {
        let mut config = postgres::Config::new();
        config
            .host(&target.host)
            .port(target.port)
            .user(&target.user)
            .dbname(&target.dbname)
            .application_name("rsql")
            .connect_timeout(target.connect_timeout)
            .notice_callback(|notice| {
                eprintln!("rsql: {}: {}", notice.severity(), notice.message());
            });
        if let Some(password) = &target.password {
            config.password(password);
        }
        match config.connect(NoTls) {
            Ok(client) => Ok(PgDatabase {
                client,
                tx: Tx::Idle,
            }),
            Err(e) => {
                let (cause, sqlstate) = match e.as_db_error() {
                    Some(db) => (db.message().to_string(), db.code().code().to_string()),
                    None => (
                        std::error::Error::source(&e)
                            .map_or_else(|| e.to_string(), |s| s.to_string()),
                        "08001".to_string(),
                    ),
                };
                Err(ConnectError {
                    message: format!(
                        "could not connect to server at \"{}\", port {}, as user \"{}\" to database \"{}\": {cause}",
                        target.host, target.port, target.user, target.dbname
                    ),
                    sqlstate,
                })
            }
        }
    }
}

impl Database for PgDatabase {
    fn execute(&mut self, sql: &str) -> Executed {
        let words = top_level_words(sql);
        let first = words.first().map(String::as_str).unwrap_or("");
        if first == "COPY" && words.iter().any(|w| w == "STDIN" || w == "STDOUT") {
            // The simple-query API has no COPY sub-protocol (Redshift has no COPY FROM STDIN
            // either: it copies from S3). Refused here rather than breaking the session.
            return Executed::Failed(SqlError {
                sqlstate: "0A000".to_string(),
                message: "COPY to or from the client is not supported by this rsql".to_string(),
                detail: None,
                hint: None,
            });
        }
        match self.client.simple_query(sql) {
            Ok(messages) => {
                let replies = replies(messages, &words, self.tx == Tx::Failed);
                self.tx = next_tx(self.tx, &words);
                Executed::Done(replies)
            }
            Err(e) => {
                // A FATAL error ends the session even before the client notices the close.
                let fatal = e
                    .as_db_error()
                    .is_some_and(|db| matches!(db.severity(), "FATAL" | "PANIC"));
                let closed = self.client.is_closed() || fatal;
                let error = sql_error(&e, closed);
                if closed {
                    return Executed::Lost(error);
                }
                // A failing COMMIT/ROLLBACK still ends the transaction; anything else inside
                // one aborts it.
                self.tx = match (self.tx, first) {
                    (Tx::Idle, _) => Tx::Idle,
                    (_, "COMMIT" | "END" | "ROLLBACK" | "ABORT") => Tx::Idle,
                    _ => Tx::Failed,
                };
                Executed::Failed(error)
            }
        }
    }
}

fn sql_error(e: &postgres::Error, closed: bool) -> SqlError {
    match e.as_db_error() {
        Some(db) => SqlError {
            sqlstate: db.code().code().to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
        },
        // connection_failure: the server went away.
        None if closed => SqlError {
            sqlstate: "08006".to_string(),
            message: format!("connection to server was lost: {e}"),
            detail: None,
            hint: None,
        },
        // A client-side failure on a live connection (an unexpected protocol message).
        None => SqlError {
            sqlstate: "XX000".to_string(),
            message: e.to_string(),
            detail: None,
            hint: None,
        },
    }
}

fn replies(messages: Vec<SimpleQueryMessage>, words: &[String], tx_failed: bool) -> Vec<Reply> {
    let mut out = Vec::new();
    let mut table: Option<(Vec<String>, Vec<Row>)> = None;
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(columns) => {
                let names = columns.iter().map(|c| c.name().to_string()).collect();
                table = Some((names, Vec::new()));
            }
            SimpleQueryMessage::Row(row) => {
                let values = (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect();
                match &mut table {
                    Some((_, rows)) => rows.push(values),
                    None => {
                        let names = row.columns().iter().map(|c| c.name().to_string()).collect();
                        table = Some((names, vec![values]));
                    }
                }
            }
            SimpleQueryMessage::CommandComplete(count) => match table.take() {
                Some((columns, rows)) => out.push(Reply::Rows {
                    columns,
                    rows,
                    count,
                }),
                None => out.push(Reply::Command {
                    tag: command_tag(words, count, tx_failed),
                    count,
                }),
            },
            _ => {}
        }
    }
    out
}

fn next_tx(tx: Tx, words: &[String]) -> Tx {
    let second = words.get(1).map(String::as_str);
    match words.first().map(String::as_str) {
        Some("BEGIN" | "START") => Tx::Open,
        Some("ROLLBACK") if second == Some("TO") => Tx::Open, // back to a savepoint
        Some("COMMIT" | "ROLLBACK") if second == Some("PREPARED") => tx,
        Some("COMMIT" | "END" | "ROLLBACK" | "ABORT") => Tx::Idle,
        _ => tx,
    }
}

/// The command tag psql would print. The `postgres` crate hands over only the row count of a
/// CommandComplete message, not its tag, so the tag is rebuilt from the statement's leading
/// keywords; for the statements scripts use (DML, DDL, transaction control, SET) it matches
/// what the server sends.
pub fn command_tag(words: &[String], count: u64, tx_failed: bool) -> String {
    let word = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    match word(0) {
        "INSERT" => format!("INSERT 0 {count}"),
        "UPDATE" | "DELETE" | "MERGE" | "COPY" | "FETCH" | "MOVE" | "SELECT" => {
            format!("{} {count}", word(0))
        }
        "WITH" => {
            // The tag is that of the main statement after the WITH list.
            match words[1..].iter().position(|w| {
                ["INSERT", "UPDATE", "DELETE", "MERGE", "SELECT"].contains(&w.as_str())
            }) {
                Some(i) => command_tag(&words[1 + i..], count, tx_failed),
                None => "WITH".to_string(),
            }
        }
        "CREATE" | "DROP" | "ALTER" => {
            const MODIFIERS: &[&str] = &[
                "OR",
                "REPLACE",
                "TEMP",
                "TEMPORARY",
                "UNLOGGED",
                "GLOBAL",
                "LOCAL",
                "UNIQUE",
                "RECURSIVE",
                "TRUSTED",
                "PROCEDURAL",
                "DEFAULT",
            ];
            let rest: Vec<&str> = words[1..]
                .iter()
                .map(String::as_str)
                .skip_while(|w| MODIFIERS.contains(w))
                .collect();
            let object = match rest.as_slice() {
                ["MATERIALIZED", "VIEW", ..] => "MATERIALIZED VIEW".to_string(),
                ["FOREIGN", "TABLE", ..] => "FOREIGN TABLE".to_string(),
                ["EVENT", "TRIGGER", ..] => "EVENT TRIGGER".to_string(),
                ["TEXT", "SEARCH", kind, ..] => format!("TEXT SEARCH {kind}"),
                [first, ..] => first.to_string(),
                [] => String::new(),
            };
            if word(0) == "CREATE" && object == "TABLE" && rest.contains(&"AS") {
                // CREATE TABLE ... AS SELECT reports the rows it wrote.
                format!("SELECT {count}")
            } else {
                format!("{} {object}", word(0)).trim_end().to_string()
            }
        }
        "START" => "START TRANSACTION".to_string(),
        "COMMIT" | "END" if word(1) != "PREPARED" && tx_failed => "ROLLBACK".to_string(),
        "END" => "COMMIT".to_string(),
        "ABORT" => "ROLLBACK".to_string(),
        "TRUNCATE" => "TRUNCATE TABLE".to_string(),
        "LOCK" => "LOCK TABLE".to_string(),
        "REFRESH" => "REFRESH MATERIALIZED VIEW".to_string(),
        "DISCARD" => format!("DISCARD {}", word(1)),
        "COMMIT" | "ROLLBACK" if word(1) == "PREPARED" => format!("{} PREPARED", word(0)),
        other => other.to_string(),
    }
}

/// The words of `sql` outside quotes, comments and parentheses, in upper case. A word is
/// a run of letters, digits and `_` starting with a letter or `_`.
pub fn top_level_words(sql: &str) -> Vec<String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut words = Vec::new();
    let mut depth = 0u32;
    let mut i = 0;
    let find = |from: usize, pat: &[char]| {
        (from..chars.len())
            .find(|&j| chars[j..].starts_with(pat))
            .map_or(chars.len(), |j| j + pat.len())
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\'' | '"' => {
                // Doubled quotes just restart the scan at the next quote: harmless here.
                i = find(i + 1, &[c]);
            }
            '-' if chars.get(i + 1) == Some(&'-') => i = find(i, &['\n']),
            '/' if chars.get(i + 1) == Some(&'*') => {
                let mut nest = 0u32;
                while i < chars.len() {
                    if chars[i..].starts_with(&['/', '*']) {
                        nest += 1;
                        i += 2;
                    } else if chars[i..].starts_with(&['*', '/']) {
                        nest -= 1;
                        i += 2;
                        if nest == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            '$' => {
                let tag_end = (i + 1..chars.len())
                    .find(|&j| !(chars[j].is_alphanumeric() || chars[j] == '_'))
                    .filter(|&j| {
                        chars[j] == '$'
                            && !chars[i + 1..j].first().is_some_and(char::is_ascii_digit)
                    });
                match tag_end {
                    Some(j) => {
                        let delimiter: Vec<char> = chars[i..=j].to_vec();
                        i = find(j + 1, &delimiter);
                    }
                    None => i += 1,
                }
            }
            '(' => {
                depth += 1;
                i += 1;
            }
            ')' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$')
                {
                    i += 1;
                }
                if depth == 0 {
                    words.push(chars[start..i].iter().collect::<String>().to_uppercase());
                }
            }
            _ => i += 1,
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(sql: &str, count: u64) -> String {
        command_tag(&top_level_words(sql), count, false)
    }

    #[test]
    fn words_skip_quotes_comments_and_parentheses() {
        assert_eq!(
            top_level_words("/* x */ -- y\ninsert into t (a, b) select 'as', $$ as $$ from \"AS\""),
            ["INSERT", "INTO", "T", "SELECT", "FROM"]
        );
    }

    #[test]
    fn tags_match_what_the_server_sends() {
        assert_eq!(tag("insert into t values (1), (2);", 2), "INSERT 0 2");
        assert_eq!(tag("UPDATE t SET a = 1", 5), "UPDATE 5");
        assert_eq!(tag("delete from t", 0), "DELETE 0");
        assert_eq!(tag("create table t (a int)", 0), "CREATE TABLE");
        assert_eq!(tag("create temp table t as select 1", 1), "SELECT 1");
        assert_eq!(
            tag("CREATE SCHEMA IF NOT EXISTS rsql_blog", 0),
            "CREATE SCHEMA"
        );
        assert_eq!(
            tag("create or replace view v as select 1", 0),
            "CREATE VIEW"
        );
        assert_eq!(tag("create unique index i on t (a)", 0), "CREATE INDEX");
        assert_eq!(tag("drop materialized view v", 0), "DROP MATERIALIZED VIEW");
        assert_eq!(tag("alter table t add column b int", 0), "ALTER TABLE");
        assert_eq!(tag("begin", 0), "BEGIN");
        assert_eq!(tag("start transaction", 0), "START TRANSACTION");
        assert_eq!(tag("end", 0), "COMMIT");
        assert_eq!(tag("truncate t", 0), "TRUNCATE TABLE");
        assert_eq!(tag("set search_path to x", 0), "SET");
        assert_eq!(
            tag("with x as (select 1) insert into t select * from x", 1),
            "INSERT 0 1"
        );
        assert_eq!(tag("grant select on t to public", 0), "GRANT");
    }

    #[test]
    fn commit_of_a_failed_transaction_reports_rollback() {
        assert_eq!(command_tag(&top_level_words("commit"), 0, true), "ROLLBACK");
        assert_eq!(command_tag(&top_level_words("commit"), 0, false), "COMMIT");
    }
}
