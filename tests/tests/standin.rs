//! The stand-ins tests run against: the `rsql` stand-in against a real, throwaway
//! PostgreSQL (what a script's author sees on stdout and stderr, the exit code, and what ends
//! up in the tables), and the EC2 instance metadata stand-in (`tests/src/imds.rs`) spoken to
//! in plain HTTP, as IMDSv2 rules have it.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rsql_agent_tests::pg::TestPg;

const RSQL: &str = env!("CARGO_BIN_EXE_rsql");
/// No script here takes more than a second or two; this only stops a hang from hanging CI.
const DEADLINE: Duration = Duration::from_secs(60);

/// What one run of a command produced.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with `stdin` as its input, killing it if it outlives [`DEADLINE`].
fn run_with_input(mut cmd: Command, stdin: &str) -> Ran {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_string();
    // A writer thread, so a child that does not read cannot block us on a full pipe.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output: Output = match rx.recv_timeout(DEADLINE) {
        Ok(output) => output.expect("wait"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{cmd:?} did not finish within {DEADLINE:?}");
        }
    };
    writer.join().expect("writer");
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `rsql` with nothing from the test's own environment, and the job environment the agent
/// would give it.
fn rsql_cmd(env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(RSQL);
    cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// Runs a script the way the sample jobs do: `rsql -h $RSQL_HOST -U $RSQL_USER -d $RSQL_DB
/// -p $RSQL_PORT` with the script on stdin.
fn rsql(pg: &TestPg, script: &str) -> Ran {
    let mut cmd = rsql_cmd(&pg.env());
    cmd.args(["-h", pg.host(), "-U", pg.user(), "-d", pg.database(), "-p"])
        .arg(pg.port().to_string());
    run_with_input(cmd, script)
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[test]
fn a_failing_statement_sets_the_error_variables_and_the_script_goes_on() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "select * from no_such_table;\n\
         \\echo ERROR=:ERROR ERRORCODE=:ERRORCODE ACTIVITYCOUNT=:ACTIVITYCOUNT\n\
         \\echo LAST_ERROR_MESSAGE=:LAST_ERROR_MESSAGE\n\
         \\echo still running\n",
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(
        lines(&ran.stdout),
        [
            "ERROR=1 ERRORCODE=42P01 ACTIVITYCOUNT=0",
            "LAST_ERROR_MESSAGE=relation \"no_such_table\" does not exist",
            "still running",
        ],
        "{ran:?}"
    );
    assert_eq!(
        lines(&ran.stderr),
        [
            "rsql: ERROR: relation \"no_such_table\" does not exist",
            "rsql: SQLSTATE: 42P01",
        ],
        "{ran:?}"
    );
}

#[test]
fn a_succeeding_statement_clears_error_and_counts_rows() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "select * from no_such_table;\n\
         create table t (id int, name text);\n\
         insert into t values (1, 'a'), (2, 'b'), (3, 'c');\n\
         \\echo after insert: ERROR=:ERROR ERRORCODE=:ERRORCODE ACTIVITYCOUNT=:ACTIVITYCOUNT\n\
         update t set name = 'z' where id > 1;\n\
         \\echo after update: ACTIVITYCOUNT=:ACTIVITYCOUNT\n\
         select id, name from t order by id;\n\
         \\echo after select: ACTIVITYCOUNT=:ACTIVITYCOUNT\n",
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(
        lines(&ran.stdout),
        [
            "CREATE TABLE",
            "INSERT 0 3",
            "after insert: ERROR=0 ERRORCODE=00000 ACTIVITYCOUNT=3",
            "UPDATE 2",
            "after update: ACTIVITYCOUNT=2",
            " id | name ",
            "----+------",
            "  1 | a",
            "  2 | z",
            "  3 | z",
            "(3 rows)",
            "",
            "after select: ACTIVITYCOUNT=3",
        ],
        "{ran:?}"
    );
    assert_eq!(pg.query_i64("select count(*) from t where name = 'z'"), 2);
}

/// The shape of the converted sample jobs: test `:ERROR` after each statement, print the error
/// code and message, and `\exit` with a script-specific code.
#[test]
fn if_on_error_and_activitycount_takes_the_right_branches() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "create table t (a int);\n\
         select a from t where a > 0;\n\
         \\if :ACTIVITYCOUNT = 0\n\
           \\remark 'no rows yet'\n\
         \\else\n\
           \\remark 'not reached'\n\
         \\endif\n\
         insert into t values (1);\n\
         \\if :ERROR <> 0\n\
           \\echo 'not reached'\n\
         \\elseif :ACTIVITYCOUNT = 1 AND :ERRORCODE = 0\n\
           \\echo 'one row inserted'\n\
         \\endif\n\
         insert into missing_table values (1);\n\
         \\if :ERROR <> 0\n\
           \\echo 'Error Code -'\n\
           \\echo :ERRORCODE\n\
           \\remark :LAST_ERROR_MESSAGE\n\
           \\exit 5\n\
         \\endif\n\
         \\echo 'not reached'\n",
    );
    assert_eq!(ran.code, 5, "{ran:?}");
    assert_eq!(
        lines(&ran.stdout),
        [
            "CREATE TABLE",
            " a ",
            "---",
            "(0 rows)",
            "",
            "no rows yet",
            "INSERT 0 1",
            "one row inserted",
            "Error Code -",
            "42P01",
            "relation \"missing_table\" does not exist",
        ],
        "{ran:?}"
    );
}

#[test]
fn goto_skips_forward_to_its_label() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "create table g (a int);\n\
         \\goto load_two\n\
         insert into g values (1);\n\
         \\echo 'skipped'\n\
         \\label load_two\n\
         insert into g values (2);\n",
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(
        lines(&ran.stdout),
        ["CREATE TABLE", "INSERT 0 1"],
        "{ran:?}"
    );
    assert_eq!(pg.query_i64("select coalesce(sum(a), 0) from g"), 2);
}

#[test]
fn goto_to_a_missing_label_fails_without_running_the_rest() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "create table g (a int);\n\\goto nowhere\ninsert into g values (1);\n",
    );
    assert_eq!(ran.code, 1, "{ran:?}");
    assert_eq!(
        ran.stderr, "rsql: ERROR: \\goto: label \"nowhere\" not found\n",
        "{ran:?}"
    );
    assert_eq!(pg.query_i64("select count(*) from g"), 0);
}

#[test]
fn exit_n_sets_the_exit_code_and_stops() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "create table e (a int);\n\\exit 21\ninsert into e values (1);\n",
    );
    assert_eq!(ran.code, 21, "{ran:?}");
    assert_eq!(pg.query_i64("select count(*) from e"), 0);

    let ran = rsql(&pg, "\\set rc 0\n\\exit :rc\n");
    assert_eq!(ran.code, 0, "{ran:?}");
    let ran = rsql(&pg, "select 1;\n\\q\nselect 2;\n");
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(!ran.stdout.contains('2'), "{ran:?}");
}

#[test]
fn a_transaction_rolled_back_after_an_error_leaves_no_rows() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "create table tx (a int);\n\
         begin;\n\
         insert into tx values (1);\n\
         insert into tx values ('not a number');\n\
         \\echo first error: :ERRORCODE\n\
         insert into tx values (2);\n\
         \\echo while aborted: :ERRORCODE\n\
         \\if :ERROR <> 0\n\
           rollback;\n\
         \\endif\n\
         begin;\n\
         insert into tx values (3);\n\
         select 1/0;\n\
         commit;\n",
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(
        lines(&ran.stdout),
        [
            "CREATE TABLE",
            "BEGIN",
            "INSERT 0 1",
            "first error: 22P02",
            "while aborted: 25P02",
            "ROLLBACK",
            "BEGIN",
            "INSERT 0 1",
            // The server turns COMMIT of a failed transaction into a rollback and says so.
            "ROLLBACK",
        ],
        "{ran:?}"
    );
    assert_eq!(pg.query_i64("select count(*) from tx"), 0);
}

#[test]
fn statements_split_like_psql_against_a_real_server() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "-- a comment; with a semicolon\n\
         create function add_one(i int) returns int language plpgsql as $body$\n\
         begin\n  return i + 1; -- inside the body; not a split\nend;\n$body$;\n\
         /* a block comment; /* nested; */ still comment */\n\
         create table s (note text);\n\
         insert into s values ('semi;colon'), ($$dollar; quoted$$), (E'esc\\';aped');\n\
         select add_one(41) as answer;\n\
         do $$ begin insert into s values ('from do'); end $$;\n\
         select count(*) from s",
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(ran.stderr, "", "{ran:?}");
    assert!(
        ran.stdout
            .contains(" answer \n--------\n     42\n(1 row)\n"),
        "{ran:?}"
    );
    assert!(ran.stdout.contains("INSERT 0 3\n"), "{ran:?}");
    assert!(
        ran.stdout
            .ends_with(" count \n-------\n     4\n(1 row)\n\n"),
        "the last statement runs without a semicolon: {ran:?}"
    );
    assert_eq!(
        pg.query_i64("select count(*) from s where note like '%;%'"),
        3
    );
}

#[test]
fn variables_reach_sql_quoted_as_literals() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "\\set tbl people\n\
         \\set who 'O''Brien'\n\
         create table :tbl (name text);\n\
         insert into :tbl values (:'who');\n\
         select count(*) as n from :\"tbl\" where name = :'who';\n",
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.contains(" n \n---\n 1\n(1 row)\n"), "{ran:?}");
    assert_eq!(
        pg.query_i64("select count(*) from people where name = 'O''Brien'"),
        1
    );
}

#[test]
fn redshift_only_settings_are_no_ops_and_real_settings_apply() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "SET query_group TO 'nightly_etl';\n\
         set enable_result_cache_for_session to off;\n\
         RESET query_group;\n\
         \\echo :ERROR\n\
         create schema rsql_blog;\n\
         set search_path to rsql_blog;\n\
         create table blog_table (a int);\n\
         set statement_timeout = '1ms';\n\
         select pg_sleep(1);\n\
         \\echo :ERRORCODE\n",
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(
        lines(&ran.stdout),
        [
            "SET",
            "SET",
            "RESET",
            "0",
            "CREATE SCHEMA",
            "SET",
            "CREATE TABLE",
            "SET",
            "57014"
        ],
        "{ran:?}"
    );
    assert!(
        ran.stderr
            .starts_with("rsql: ERROR: canceling statement due to statement timeout\n"),
        "{ran:?}"
    );
    assert_eq!(
        pg.query_i64("select count(*) from pg_tables where schemaname = 'rsql_blog' and tablename = 'blog_table'"),
        1
    );
}

#[test]
fn unknown_backslash_commands_are_reported_and_skipped() {
    let pg = TestPg::start();
    let ran = rsql(&pg, "\\rset rformat on\n\\echo next\n");
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(ran.stdout, "next\n", "{ran:?}");
    assert_eq!(
        ran.stderr, "rsql: ERROR: unknown command \\rset\n",
        "{ran:?}"
    );
}

/// The sample jobs are shell scripts that feed rsql a heredoc, with the connection taken from
/// the job's environment.
#[test]
fn a_shell_heredoc_script_runs_with_the_job_environment() {
    let pg = TestPg::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("rsql_job.sh");
    std::fs::write(
        &job,
        "#!/bin/bash\n\
         rsql -h $RSQL_HOST -U $RSQL_USER -d $RSQL_DB -p $RSQL_PORT <<EOF\n\
         \\set ON_ERROR_STOP off\n\
         create table if not exists heredoc (a int);\n\
         insert into heredoc values (1), (2);\n\
         \\if :ERROR <> 0\n\
           \\echo 'Error Code -'\n\
           \\echo :ERRORCODE\n\
           \\exit 11\n\
         \\else\n\
           \\remark '**** inserted :ACTIVITYCOUNT rows ****'\n\
         \\endif\n\
         \\exit 0\n\
         EOF\n",
    )
    .expect("write job");
    let rsql_dir = Path::new(RSQL).parent().expect("rsql dir");
    let mut cmd = Command::new("/bin/bash");
    cmd.arg(&job)
        .env_clear()
        .envs(pg.env())
        .env("PATH", format!("{}:/usr/bin:/bin", rsql_dir.display()));
    let ran = run_with_input(cmd, "");
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(
        lines(&ran.stdout),
        [
            "CREATE TABLE",
            "INSERT 0 2",
            "**** inserted :ACTIVITYCOUNT rows ****"
        ],
        "inside quotes a variable is not substituted, as in psql: {ran:?}"
    );
    assert_eq!(pg.query_i64("select count(*) from heredoc"), 2);
}

#[test]
fn connection_settings_come_from_the_environment_alone() {
    let pg = TestPg::start();
    // No options at all: RSQL_* from the environment, the script from -f.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("job.sql");
    std::fs::write(
        &file,
        "select current_user as who, current_database() as db;\n",
    )
    .expect("write");
    let mut cmd = rsql_cmd(&pg.env());
    cmd.arg("-f").arg(&file);
    let ran = run_with_input(cmd, "");
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(
        ran.stdout.contains(" rsql_test | rsql_test\n(1 row)"),
        "{ran:?}"
    );
}

#[test]
fn an_unreachable_server_is_a_connection_failure() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe")
        .port();
    let env = [
        ("RSQL_HOST", "127.0.0.1".to_string()),
        ("RSQL_PORT", port.to_string()),
        ("RSQL_USER", "nobody".to_string()),
        ("RSQL_DB", "nothing".to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v));
    let ran = run_with_input(rsql_cmd(&env), "\\echo never\n");
    assert_eq!(ran.code, 3, "{ran:?}");
    assert_eq!(ran.stdout, "", "{ran:?}");
    let err = lines(&ran.stderr);
    assert!(
        err[0].starts_with("rsql: ERROR: could not connect to server"),
        "{ran:?}"
    );
    assert_eq!(err[1], "rsql: SQLSTATE: 08001", "{ran:?}");
}

#[test]
fn a_wrong_password_is_a_connection_failure() {
    let pg = TestPg::start();
    let mut env = pg.env();
    for (k, v) in &mut env {
        if k == "RSPASSWORD" {
            *v = "wrong".to_string();
        }
    }
    let ran = run_with_input(rsql_cmd(&env), "\\echo never\n");
    assert_eq!(ran.code, 3, "{ran:?}");
    assert!(
        ran.stderr
            .starts_with("rsql: ERROR: could not connect to server")
            && ran.stderr.contains("password authentication failed")
            && ran.stderr.contains("rsql: SQLSTATE: 28P01"),
        "{ran:?}"
    );
}

#[test]
fn a_connection_lost_mid_script_stops_it_as_a_connection_failure() {
    let pg = TestPg::start();
    let ran = rsql(
        &pg,
        "select pg_terminate_backend(pg_backend_pid());\n\\echo not reached\n",
    );
    assert_eq!(ran.code, 3, "{ran:?}");
    assert_eq!(ran.stdout, "", "{ran:?}");
    // Whether the server's FATAL message arrives before the close is a race; either way the
    // last word is that the connection was lost, as SQLSTATE class 08.
    let err = lines(&ran.stderr);
    assert!(err.len() >= 2, "{ran:?}");
    assert!(
        err[err.len() - 2].starts_with("rsql: ERROR: connection to server was lost"),
        "{ran:?}"
    );
    assert_eq!(err[err.len() - 1], "rsql: SQLSTATE: 08006", "{ran:?}");
}

#[test]
fn a_bad_command_line_is_a_usage_error() {
    // No server needed: the command line is rejected before connecting.
    let mut cmd = rsql_cmd(&[]);
    cmd.arg("--no-such-option");
    let ran = run_with_input(cmd, "");
    assert_eq!(ran.code, 2, "{ran:?}");
    assert!(ran.stderr.contains("unknown option"), "{ran:?}");

    let mut cmd = rsql_cmd(&[]);
    cmd.arg("--help");
    let ran = run_with_input(cmd, "");
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(
        ran.stdout.starts_with("rsql: run an RSQL script"),
        "{ran:?}"
    );
}

#[test]
fn two_test_servers_run_side_by_side_and_vanish_when_dropped() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(TestPg::start);
        let b = s.spawn(TestPg::start);
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert_ne!(a.port(), b.port());
    assert_ne!(a.password(), b.password());
    a.client()
        .batch_execute("create table only_in_a (x int); insert into only_in_a values (1)")
        .expect("create in a");
    assert_eq!(a.query_i64("select count(*) from only_in_a"), 1);
    assert_eq!(
        b.query_i64("select count(*) from pg_tables where tablename = 'only_in_a'"),
        0
    );

    let mut held = a.client();
    drop(a);
    assert!(
        held.simple_query("select 1").is_err(),
        "the server of a dropped TestPg still answers"
    );
    assert_eq!(
        b.query_i64("select 1"),
        1,
        "dropping one leaves the other running"
    );
}

/// One plain HTTP/1.1 request to the IMDS stand-in; returns (status, headers, body).
fn imds_call(
    imds: &rsql_agent_tests::imds::Imds,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect_timeout(&imds.addr(), Duration::from_secs(2))
        .expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", imds.addr());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn the_imds_stand_in_follows_imdsv2_and_serves_what_the_test_sets() {
    use rsql_agent_tests::imds::{self, Imds};
    let imds = Imds::start();
    assert!(imds.url().starts_with("http://127.0.0.1:"));
    let env = imds.env();
    assert!(env.contains(&("AWS_EC2_METADATA_SERVICE_ENDPOINT".to_string(), imds.url())));

    // A token needs a PUT with a TTL within 1..=21600; its TTL comes back in a header.
    let put = |ttl: Option<&str>| {
        let headers: Vec<(&str, &str)> = ttl
            .map(|t| vec![("X-aws-ec2-metadata-token-ttl-seconds", t)])
            .unwrap_or_default();
        imds_call(&imds, "PUT", imds::TOKEN_PATH, &headers)
    };
    assert_eq!(put(None).0, 400);
    assert_eq!(put(Some("0")).0, 400);
    assert_eq!(put(Some("21601")).0, 400);
    assert_eq!(imds_call(&imds, "GET", imds::TOKEN_PATH, &[]).0, 405);
    let (status, head, token) = put(Some("60"));
    assert_eq!(status, 200);
    assert!(
        head.contains("x-aws-ec2-metadata-token-ttl-seconds: 60"),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert!(!token.is_empty());

    // Without a valid token: 401, whatever the path (IMDSv1 is off).
    let get = |path: &str, token: &str| {
        let (status, _, body) =
            imds_call(&imds, "GET", path, &[("X-aws-ec2-metadata-token", token)]);
        (status, body)
    };
    assert_eq!(imds_call(&imds, "GET", imds::INSTANCE_ID_PATH, &[]).0, 401);
    assert_eq!(get(imds::INSTANCE_ID_PATH, "not-a-token").0, 401);

    assert_eq!(
        get(imds::INSTANCE_ID_PATH, &token),
        (200, imds::DEFAULT_INSTANCE_ID.to_string())
    );
    assert_eq!(
        get(imds::REGION_PATH, &token),
        (200, "us-east-1".to_string())
    );
    assert_eq!(get("/latest/meta-data/no-such-thing", &token).0, 404);
    // In no group, no notice, no recommendation: 404 until the test says otherwise.
    for path in [
        imds::LIFECYCLE_STATE_PATH,
        imds::SPOT_ACTION_PATH,
        imds::REBALANCE_PATH,
    ] {
        assert_eq!(get(path, &token).0, 404, "{path}");
    }

    imds.set_instance_id("i-0fleet00000000001");
    imds.set_lifecycle_state(Some("InService"));
    assert_eq!(get(imds::INSTANCE_ID_PATH, &token).1, "i-0fleet00000000001");
    assert_eq!(
        get(imds::LIFECYCLE_STATE_PATH, &token),
        (200, "InService".to_string())
    );
    imds.set_lifecycle_state(Some("Terminated"));
    assert_eq!(get(imds::LIFECYCLE_STATE_PATH, &token).1, "Terminated");
    imds.set_lifecycle_state(None);
    assert_eq!(get(imds::LIFECYCLE_STATE_PATH, &token).0, 404);

    let deadline = imds::rfc3339_in(Duration::from_secs(120));
    assert!(
        deadline.ends_with('Z') && deadline.len() == 20,
        "{deadline}"
    );
    imds.set_spot_action("terminate", &deadline);
    let (status, body) = get(imds::SPOT_ACTION_PATH, &token);
    assert_eq!(status, 200);
    let notice: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        notice,
        serde_json::json!({"action": "terminate", "time": deadline})
    );
    imds.clear_spot_action();
    assert_eq!(get(imds::SPOT_ACTION_PATH, &token).0, 404);

    imds.set_rebalance("2026-12-07T17:00:00Z");
    let (status, body) = get(imds::REBALANCE_PATH, &token);
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"noticeTime":"2026-12-07T17:00:00Z"}"#);
    imds.clear_rebalance();
    assert_eq!(get(imds::REBALANCE_PATH, &token).0, 404);

    // A token works until its TTL is over, and not a moment longer.
    let token = put(Some("1")).2;
    assert_eq!(get(imds::INSTANCE_ID_PATH, &token).0, 200);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(get(imds::INSTANCE_ID_PATH, &token).0, 401);

    // Every request is logged with its status; waiting sees a later poll.
    let log = imds.requests();
    assert!(log
        .iter()
        .any(|r| r.path == imds::SPOT_ACTION_PATH && r.status == 200));
    assert!(log
        .iter()
        .any(|r| r.path == imds::SPOT_ACTION_PATH && r.status == 404));
    let polls = imds.count(imds::LIFECYCLE_STATE_PATH);
    assert_eq!(polls, 4);
    assert!(!imds.wait_for_count(
        imds::LIFECYCLE_STATE_PATH,
        polls + 1,
        Duration::from_millis(100)
    ));
    let poller = {
        let url = imds.addr();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let mut s = std::net::TcpStream::connect(url).expect("connect");
            s.write_all(
                format!(
                    "GET {} HTTP/1.1\r\nHost: x\r\n\r\n",
                    imds::LIFECYCLE_STATE_PATH
                )
                .as_bytes(),
            )
            .expect("send");
            let mut sink = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut sink);
        })
    };
    assert!(imds.wait_for_count(
        imds::LIFECYCLE_STATE_PATH,
        polls + 1,
        Duration::from_secs(10)
    ));
    poller.join().expect("poller");
    let first = imds
        .wait_for_request(imds::TOKEN_PATH, Duration::from_secs(1))
        .expect("a token request");
    assert_eq!((first.method.as_str(), first.status), ("PUT", 400));
}

/// The client the agent uses, `aws-config`'s IMDS client, against the stand-in: a token, then
/// the answers the test set; a 404 is an error the client reports, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_imds_stand_in_answers_the_aws_config_client() {
    use rsql_agent_tests::imds::{self, Imds};
    let imds = Imds::start();
    let client = aws_config::imds::Client::builder()
        .endpoint(imds.url())
        .expect("endpoint")
        .build();
    let get = |path: &'static str| {
        let client = client.clone();
        async move { client.get(path).await.map(|v| v.as_ref().to_string()) }
    };
    assert_eq!(
        get(imds::INSTANCE_ID_PATH).await.expect("instance id"),
        imds::DEFAULT_INSTANCE_ID
    );
    assert!(
        get(imds::LIFECYCLE_STATE_PATH).await.is_err(),
        "404 outside a group"
    );
    imds.set_lifecycle_state(Some("Terminated"));
    assert_eq!(
        get(imds::LIFECYCLE_STATE_PATH).await.expect("state"),
        "Terminated"
    );
    imds.set_spot_action("terminate", "2026-12-07T17:00:00Z");
    let notice = get(imds::SPOT_ACTION_PATH).await.expect("notice");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&notice).expect("JSON")["time"],
        "2026-12-07T17:00:00Z"
    );
    // One token for all of it (the client caches it for its TTL).
    assert_eq!(imds.count(imds::TOKEN_PATH), 1);
}
