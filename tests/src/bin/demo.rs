//! `make demo`: runs the blog workflow through `rsql-agent workflow run` against a throwaway
//! PostgreSQL, with the `rsql` stand-in, then prints the rows the jobs wrote.
//!
//! Nothing is installed or left running: the database lives in a temp directory and is
//! stopped on exit. The agent's state (audit, locks, job logs) is kept under `.demo/` in the
//! workspace so the logs can be read afterwards; it is cleared at the start of each run.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, ExitCode};

use rsql_agent_tests::bins;
use rsql_agent_tests::pg::TestPg;

fn main() -> ExitCode {
    let root = bins::workspace_root();
    let demo = root.join(".demo");
    if demo.exists() {
        if let Err(e) = std::fs::remove_dir_all(&demo) {
            eprintln!("demo: cannot clear {}: {e}", demo.display());
            return ExitCode::FAILURE;
        }
    }
    let state = demo.join("state");
    if let Err(e) = std::fs::create_dir_all(&state) {
        eprintln!("demo: cannot create {}: {e}", state.display());
        return ExitCode::FAILURE;
    }

    println!("demo: starting a throwaway PostgreSQL ...");
    let pg = TestPg::start();
    println!(
        "demo: PostgreSQL is up on {}:{} (database {}, user {})",
        pg.host(),
        pg.port(),
        pg.database(),
        pg.user()
    );

    let config = demo.join("agent.toml");
    let text = format!(
        r#"# Written by `make demo`.
[agent]
state_dir = "{state}"
max_concurrent_jobs = 4
[jobs]
script_dir = "{scripts}"
log_dir = "{state}/jobs"
default_timeout = "10m"
kill_grace = "5s"
[database]
host = "{host}"
port = {port}
user = "{user}"
dbname = "{db}"
password = "{password}"
"#,
        state = state.display(),
        scripts = root.join("rsql_scripts").display(),
        host = pg.host(),
        port = pg.port(),
        user = pg.user(),
        db = pg.database(),
        password = pg.password(),
    );
    // The file holds a password: the agent refuses it if others can read it.
    let written = std::fs::write(&config, text)
        .and_then(|_| std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)));
    if let Err(e) = written {
        eprintln!("demo: cannot write {}: {e}", config.display());
        return ExitCode::FAILURE;
    }

    let workflow = root.join("rsql_scripts/blog_test_workflow.json");
    let path = format!(
        "{}:{}",
        bins::rsql_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    println!(
        "demo: rsql-agent workflow run {} --config {}\n",
        workflow.display(),
        config.display()
    );
    let status = Command::new(bins::agent())
        .arg("workflow")
        .arg("run")
        .arg(&workflow)
        .arg("--config")
        .arg(&config)
        .env("PATH", path)
        .status();
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demo: cannot start rsql-agent: {e}");
            return ExitCode::FAILURE;
        }
    };

    println!("\ndemo: rows in rsql_blog.blog_table:");
    let mut client = pg.client();
    let rows = match client.query(
        "SELECT id, script_name, inserted_at::text FROM rsql_blog.blog_table ORDER BY id",
        &[],
    ) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("demo: cannot read rsql_blog.blog_table: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("  {:>2}  {:<24}  inserted_at", "id", "script_name");
    for row in &rows {
        let id: i32 = row.get(0);
        let script: String = row.get(1);
        let at: String = row.get(2);
        println!("  {id:>2}  {script:<24}  {at}");
    }
    println!("  ({} rows)", rows.len());
    println!("\ndemo: job logs and audit are under {}", state.display());

    if !status.success() {
        eprintln!("demo: the workflow failed ({status})");
        return ExitCode::FAILURE;
    }
    if rows.len() != 4 {
        eprintln!("demo: expected 4 rows, found {}", rows.len());
        return ExitCode::FAILURE;
    }
    println!("demo: OK");
    ExitCode::SUCCESS
}
