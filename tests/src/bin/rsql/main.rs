//! `rsql`: a stand-in for Amazon Redshift RSQL that runs converted BTEQ scripts against
//! PostgreSQL, for the system tests and the demo.
//!
//! The real RSQL is a proprietary ODBC client. This one speaks the PostgreSQL wire protocol
//! (the `postgres` crate, without TLS) and implements the subset that converted scripts use;
//! where RSQL's behaviour is not documented it follows psql, and the code says so.
//!
//! ```text
//! rsql [-h HOST] [-p PORT] [-U USER] [-d DBNAME] [-f FILE] [-v NAME=VALUE]... [DBNAME [USER]]
//! ```
//!
//! - Connection settings default to `RSQL_HOST`, `RSQL_PORT`, `RSQL_USER`, `RSQL_DB`, then to
//!   `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, then to `localhost`, `5432`, `$USER` and the
//!   user name. The password comes from `RSPASSWORD`, else `PGPASSWORD`; there is no prompt.
//!   `PGCONNECT_TIMEOUT` (seconds, default 30) bounds the connection attempt.
//! - The script is read from `-f FILE` (`-` is stdin) or from stdin, e.g. a shell heredoc.
//! - Statements are split as psql splits them (see `split`) and sent one at a time, in
//!   autocommit mode; `BEGIN`/`COMMIT`/`ROLLBACK` work as usual. A failing statement does not
//!   stop the script: it prints `rsql: ERROR: <message>` on stderr, followed by `rsql: DETAIL:`
//!   and `rsql: HINT:` lines when the server sent them and always by `rsql: SQLSTATE: <code>`,
//!   and it sets the variables below. With `\set ON_ERROR_STOP on` the script ends there
//!   instead, with exit code 1.
//! - After every statement: `ERROR` (0, or 1 after a failure), `ERRORCODE` (the SQLSTATE,
//!   `00000` after success), `ACTIVITYCOUNT` (rows affected or returned), and after a failure
//!   `LAST_ERROR_MESSAGE` (kept until the next failure, as psql keeps it). psql's `SQLSTATE`,
//!   `ROW_COUNT` and `LAST_ERROR_SQLSTATE` are set too.
//! - Backslash commands: `\if`, `\elseif`, `\else`, `\endif` (see `cond` for expressions),
//!   `\goto LABEL` / `\label LABEL` (forward only), `\exit [N]`, `\quit [N]`, `\q [N]`,
//!   `\echo`, `\remark`, `\qecho`, `\warn`, `\set`, `\unset`, `\timing`. Names are accepted in
//!   any case, as RSQL accepts them. Any other command prints
//!   `rsql: ERROR: unknown command \name` and the script goes on, as psql does.
//! - `SET`/`RESET` of Redshift-only settings (`query_group`, `wlm_query_slot_count`, ...)
//!   succeed without reaching the server; other `SET`s run for real.
//! - `CREATE TABLE` loses its Redshift-only attributes before it reaches the server
//!   (`ENCODE`, `DISTKEY`, `DISTSTYLE`, `SORTKEY`, `BACKUP NO`; the list is in `ddl`).
//! - Row results print as a psql-style aligned table with a `(N rows)` footer; other commands
//!   print their tag (`INSERT 0 1`), unless `-q`.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | end of the script (even if statements failed, as in psql), `\q`, `\exit` |
//! | N | `\exit N` |
//! | 1 ([`SCRIPT_ERROR`]) | the script could not be read or run to its end: unreadable `-f` file, `\goto` label not found, unclosed `\if`, bad `\exit` argument, a failure under `ON_ERROR_STOP` |
//! | 2 ([`USAGE_ERROR`]) | bad command line |
//! | 3 ([`CONNECTION_FAILED`]) | the database could not be reached or refused the login (`rsql: ERROR: could not connect ...`), or the connection was lost while the script ran |
//!
//! A script may of course `\exit 3` itself; the agent's `Rsql.ConnectionFailed` check also looks
//! at the SQLSTATE printed with the error (class 08 for network failures).

mod cond;
mod db;
mod ddl;
mod run;
mod split;
mod vars;

use std::io::Read;
use std::time::Duration;

use db::{PgDatabase, Target};
use vars::Vars;

/// Exit code when the script cannot be read or run to its end.
pub const SCRIPT_ERROR: i32 = 1;
/// Exit code for a bad command line.
pub const USAGE_ERROR: i32 = 2;
/// Exit code when the database cannot be reached, refuses the login, or the connection drops.
pub const CONNECTION_FAILED: i32 = 3;

const USAGE: &str = "\
rsql: run an RSQL script against PostgreSQL (test stand-in for Amazon Redshift RSQL)

Usage:
  rsql [OPTION]... [DBNAME [USERNAME]]

Options:
  -h, --host=HOST          database server host (default: $RSQL_HOST, $PGHOST, localhost)
  -p, --port=PORT          database server port (default: $RSQL_PORT, $PGPORT, 5432)
  -U, --username=USERNAME  database user name (default: $RSQL_USER, $PGUSER, $USER)
  -d, --dbname=DBNAME      database name (default: $RSQL_DB, $PGDATABASE, the user name)
  -f, --file=FILE          read the script from FILE (default: standard input)
  -v, --set=NAME=VALUE     set script variable NAME to VALUE
  -q, --quiet              do not print command tags
  -w, -X                   accepted for psql compatibility; no effect
      --help               show this help, then exit
      --version            show the version, then exit

The password is taken from $RSPASSWORD (or $PGPASSWORD).

Exit status: 0 at the end of the script, N for \\exit N, 1 when the script cannot be read or
run to its end, 2 for a bad command line, 3 when the database cannot be reached.
";

/// What the command line asks for.
#[derive(Debug, Default)]
struct Options {
    host: Option<String>,
    port: Option<String>,
    user: Option<String>,
    dbname: Option<String>,
    file: Option<String>,
    vars: Vec<(String, String)>,
    quiet: bool,
}

enum Parsed {
    Run(Options),
    Help,
    Version,
}

fn parse_args(args: &[String]) -> Result<Parsed, String> {
    let mut opts = Options::default();
    let mut positional = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            positional.extend(args[i..].iter().cloned());
            break;
        }
        let (key, inline) = if let Some(long) = arg.strip_prefix("--") {
            match long.split_once('=') {
                Some((k, v)) => (format!("--{k}"), Some(v.to_string())),
                None => (arg.clone(), None),
            }
        } else if arg.starts_with('-') && arg.len() > 2 {
            (arg[..2].to_string(), Some(arg[2..].to_string()))
        } else {
            (arg.clone(), None)
        };
        let has_inline = inline.is_some();
        let takes_value = matches!(
            key.as_str(),
            "-h" | "--host"
                | "-p"
                | "--port"
                | "-U"
                | "--username"
                | "-d"
                | "--dbname"
                | "-f"
                | "--file"
                | "-v"
                | "--set"
                | "--variable"
        );
        let value = if takes_value {
            match inline {
                Some(v) => Some(v),
                None => {
                    let v = args
                        .get(i)
                        .cloned()
                        .ok_or_else(|| format!("option {key} requires an argument"))?;
                    i += 1;
                    Some(v)
                }
            }
        } else {
            if has_inline && key.starts_with("--") {
                return Err(format!("option {key} takes no argument"));
            }
            None
        };
        match (key.as_str(), value) {
            ("-h" | "--host", v) => opts.host = v,
            ("-p" | "--port", v) => opts.port = v,
            ("-U" | "--username", v) => opts.user = v,
            ("-d" | "--dbname", v) => opts.dbname = v,
            ("-f" | "--file", v) => opts.file = v,
            ("-v" | "--set" | "--variable", Some(v)) => match v.split_once('=') {
                Some((name, value)) if vars::is_valid_name(name) => {
                    opts.vars.push((name.to_string(), value.to_string()));
                }
                _ => return Err(format!("invalid variable assignment \"{v}\"")),
            },
            ("-q" | "--quiet", _) if !has_inline => opts.quiet = true,
            ("-w" | "--no-password" | "-X" | "--no-psqlrc", _) if !has_inline => {}
            ("--help" | "-?", _) => return Ok(Parsed::Help),
            ("--version" | "-V", _) => return Ok(Parsed::Version),
            _ if arg.starts_with('-') && arg != "-" => {
                return Err(format!("unknown option \"{arg}\""));
            }
            _ => positional.push(arg.clone()),
        }
    }
    let mut positional = positional.into_iter();
    if let Some(db) = positional.next() {
        opts.dbname.get_or_insert(db);
    }
    if let Some(user) = positional.next() {
        opts.user.get_or_insert(user);
    }
    if let Some(extra) = positional.next() {
        return Err(format!("extra command-line argument \"{extra}\""));
    }
    Ok(Parsed::Run(opts))
}

/// The first non-empty value among the option and the environment variables.
fn setting(option: Option<String>, env: &[&str]) -> Option<String> {
    option.filter(|v| !v.is_empty()).or_else(|| {
        env.iter()
            .filter_map(|name| std::env::var(name).ok())
            .find(|v| !v.is_empty())
    })
}

fn target(opts: Options) -> Result<Target, String> {
    let host = setting(opts.host, &["RSQL_HOST", "PGHOST"]).unwrap_or_else(|| "localhost".into());
    let port = match setting(opts.port, &["RSQL_PORT", "PGPORT"]) {
        None => 5432,
        Some(p) => p.parse().map_err(|_| format!("invalid port \"{p}\""))?,
    };
    let user =
        setting(opts.user, &["RSQL_USER", "PGUSER", "USER"]).unwrap_or_else(|| "postgres".into());
    let dbname = setting(opts.dbname, &["RSQL_DB", "PGDATABASE"]).unwrap_or_else(|| user.clone());
    let password = setting(None, &["RSPASSWORD", "PGPASSWORD"]);
    let connect_timeout = std::env::var("PGCONNECT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(Duration::from_secs(30), Duration::from_secs);
    Ok(Target {
        host,
        port,
        user,
        dbname,
        password,
        connect_timeout,
    })
}

fn read_script(file: Option<&str>) -> Result<String, String> {
    let mut bytes = Vec::new();
    match file {
        None | Some("-") => std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| format!("could not read standard input: {e}"))?,
        Some(path) => {
            bytes = std::fs::read(path).map_err(|e| format!("could not read \"{path}\": {e}"))?;
            bytes.len()
        }
    };
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn main() {
    std::process::exit(real_main());
}

fn real_main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(Parsed::Run(opts)) => opts,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return 0;
        }
        Ok(Parsed::Version) => {
            println!(
                "rsql (rsql-agent test stand-in) {}",
                env!("CARGO_PKG_VERSION")
            );
            return 0;
        }
        Err(message) => {
            eprintln!("rsql: {message}\nTry \"rsql --help\" for more information.");
            return USAGE_ERROR;
        }
    };
    let quiet = opts.quiet;
    let file = opts.file.clone();
    let mut script_vars = Vars::default();
    for (name, value) in &opts.vars {
        script_vars.set(name, value.as_str());
    }
    let target = match target(opts) {
        Ok(target) => target,
        Err(message) => {
            eprintln!("rsql: {message}\nTry \"rsql --help\" for more information.");
            return USAGE_ERROR;
        }
    };
    let script = match read_script(file.as_deref()) {
        Ok(script) => script,
        Err(message) => {
            eprintln!("rsql: ERROR: {message}");
            return SCRIPT_ERROR;
        }
    };
    let db = match PgDatabase::connect(&target) {
        Ok(db) => db,
        Err(e) => {
            eprintln!("rsql: ERROR: {}\nrsql: SQLSTATE: {}", e.message, e.sqlstate);
            return CONNECTION_FAILED;
        }
    };
    for (name, value) in [
        ("HOST", target.host.clone()),
        ("PORT", target.port.to_string()),
        ("USER", target.user.clone()),
        ("DBNAME", target.dbname.clone()),
    ] {
        if script_vars.get(name).is_none() {
            script_vars.set(name, value);
        }
    }
    let mut interpreter = run::Interpreter::new(
        db,
        script_vars,
        std::io::stdout().lock(),
        std::io::stderr(),
        quiet,
    );
    interpreter.run(&script)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_in_all_their_spellings() {
        let Ok(Parsed::Run(o)) = parse(&[
            "-h",
            "db.example",
            "-p5439",
            "--username=etl",
            "--dbname",
            "dev",
            "-f",
            "job.sql",
            "-v",
            "x=1",
            "-q",
        ]) else {
            panic!("should parse");
        };
        assert_eq!(o.host.as_deref(), Some("db.example"));
        assert_eq!(o.port.as_deref(), Some("5439"));
        assert_eq!(o.user.as_deref(), Some("etl"));
        assert_eq!(o.dbname.as_deref(), Some("dev"));
        assert_eq!(o.file.as_deref(), Some("job.sql"));
        assert_eq!(o.vars, [("x".to_string(), "1".to_string())]);
        assert!(o.quiet);
    }

    #[test]
    fn positional_database_and_user() {
        let Ok(Parsed::Run(o)) = parse(&["dev", "etl"]) else {
            panic!("should parse");
        };
        assert_eq!(
            (o.dbname.as_deref(), o.user.as_deref()),
            (Some("dev"), Some("etl"))
        );
    }

    #[test]
    fn bad_command_lines_are_errors() {
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["-Z"]).is_err());
        assert!(parse(&["-h"]).is_err());
        assert!(parse(&["-v", "novalue"]).is_err());
        assert!(parse(&["a", "b", "c"]).is_err());
        assert!(matches!(parse(&["--help"]), Ok(Parsed::Help)));
    }
}
