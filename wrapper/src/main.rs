//! `rsql-wrapper`: the SSM Run Command entry point. It hands one job to the running
//! `rsql-agent` over the agent's Unix socket (`[intake.socket] path`) and returns at once,
//! saying whether the agent accepted it; the job then runs under the agent's supervision,
//! not under the SSM command's.
//!
//! Two forms:
//! - `rsql-wrapper submit --task-token T --workflow-id W --workflow-execution-id E
//!   --job-name S [--ssm-command-id C] [--timeout-seconds N] [--heartbeat-seconds N]
//!   [--socket PATH] [-- ARGS...]`
//! - the legacy form: the 11 positional arguments of the old `rsql_trigger.sh` (token,
//!   workflow id, workflow execution id, script path, instance id, secret id, log path, audit
//!   table, log group, instance code dir, region), then the script's arguments. It submits
//!   the same job: `job_name` is the script path relative to the instance code dir (the
//!   agent's script dir), or the script's file name when it is not under that dir. Arguments
//!   5 to 9 and 11 are accepted and ignored (the agent's config decides them); each is named
//!   on stderr.
//!
//! The socket is `--socket`, else `$RSQL_AGENT_SOCKET`, else `/run/rsql-agent/agent.sock`.
//! There is no standalone `run` mode yet: on a host without the daemon, use `rsql-agent`.
//!
//! Exit codes: see [`exit`].

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Exit codes, documented in the README.
mod exit {
    /// The agent accepted the job; it runs under the agent and reports to Step Functions.
    pub const ACCEPTED: u8 = 0;
    /// Bad arguments; the message names the argument.
    pub const USAGE: u8 = 2;
    /// The agent refused the job (invalid job, or a submitter it does not allow). Sending it
    /// again does not help. A job with a task token has been failed as `Rsql.InvalidJob`.
    pub const REJECTED: u8 = 3;
    /// The agent is busy (every job slot taken) or shutting down: try again later.
    pub const BUSY: u8 = 75;
    /// The agent cannot be reached: no socket, nobody listening, or no reply in time.
    pub const UNREACHABLE: u8 = 69;
}

const DEFAULT_SOCKET: &str = "/run/rsql-agent/agent.sock";
/// The agent answers within a second; this is generous.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The legacy `rsql_trigger.sh` positional arguments, in order.
const LEGACY_ARGS: [&str; 11] = [
    "token",
    "workflow id",
    "workflow execution id",
    "script path",
    "instance id",
    "secret id",
    "log path",
    "audit table",
    "log group",
    "instance code dir",
    "region",
];

#[derive(Debug, Parser)]
#[command(
    name = "rsql-wrapper",
    version,
    about = "Hand an RSQL job to the running rsql-agent (SSM Run Command entry point)",
    after_help = "Legacy form: rsql-wrapper TOKEN WORKFLOW_ID WORKFLOW_EXECUTION_ID SCRIPT_PATH \
INSTANCE_ID SECRET_ID LOG_PATH AUDIT_TABLE LOG_GROUP INSTANCE_CODE_DIR REGION [SCRIPT_ARGS...]\n\n\
Exit codes: 0 accepted, 2 usage, 3 rejected by the agent, 69 agent not reachable, \
75 agent busy or shutting down (retry)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Submit one job to the running agent and say whether it was accepted.
    Submit(Submit),
}

#[derive(Debug, clap::Args)]
struct Submit {
    /// The Step Functions task token.
    #[arg(long, value_name = "T")]
    task_token: String,
    #[arg(long, value_name = "W")]
    workflow_id: String,
    #[arg(long, value_name = "E")]
    workflow_execution_id: String,
    /// The script, relative to the agent's script directory.
    #[arg(long, value_name = "S")]
    job_name: String,
    /// The SSM command id, recorded in the audit.
    #[arg(long, value_name = "C")]
    ssm_command_id: Option<String>,
    /// Kill the job after this many seconds [default: the agent's `[jobs] default_timeout`].
    #[arg(long, value_name = "SECONDS")]
    timeout_seconds: Option<u64>,
    /// The task state's `HeartbeatSeconds`; heartbeats go out at a third of it.
    #[arg(long, value_name = "SECONDS")]
    heartbeat_seconds: Option<u64>,
    /// The agent's socket [default: $RSQL_AGENT_SOCKET, else /run/rsql-agent/agent.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Arguments for the script.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    if let Some(first) = argv.get(1).and_then(|a| a.to_str()) {
        let subcommand = matches!(first, "submit" | "help");
        if !subcommand && !first.starts_with('-') {
            return ExitCode::from(legacy(&argv[1..]));
        }
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Submit(submit) => ExitCode::from(submit_job(submit)),
    }
}

fn usage(message: &str) -> u8 {
    eprintln!("rsql-wrapper: usage error: {message}");
    eprintln!("Run `rsql-wrapper --help` for the forms and exit codes.");
    exit::USAGE
}

/// The legacy `rsql_trigger.sh` form, mapped onto `submit`.
fn legacy(args: &[OsString]) -> u8 {
    let mut text = Vec::with_capacity(args.len());
    for (i, arg) in args.iter().enumerate() {
        match arg.to_str() {
            Some(s) => text.push(s.to_string()),
            None => {
                let name = LEGACY_ARGS.get(i).copied().unwrap_or("script argument");
                return usage(&format!(
                    "legacy argument {} ({name}) is not valid UTF-8",
                    i + 1
                ));
            }
        }
    }
    if text.len() < LEGACY_ARGS.len() {
        let missing = LEGACY_ARGS[text.len()];
        return usage(&format!(
            "unknown subcommand {:?}; as the legacy rsql_trigger.sh form it needs {} positional \
             arguments but got {}: missing argument {} ({missing})",
            text[0],
            LEGACY_ARGS.len(),
            text.len(),
            text.len() + 1
        ));
    }
    for (i, name) in LEGACY_ARGS.iter().enumerate().take(3) {
        if text[i].is_empty() {
            return usage(&format!("legacy argument {} ({name}) is empty", i + 1));
        }
    }
    let job_name = match legacy_job_name(&text[3], &text[9]) {
        Some(name) => name,
        None => {
            return usage(&format!(
                "legacy argument 4 (script path) {:?} names no script",
                text[3]
            ))
        }
    };
    for i in [4usize, 5, 6, 7, 8, 10] {
        eprintln!(
            "rsql-wrapper: legacy argument {} ({}) = {:?} ignored: the agent's config decides it",
            i + 1,
            LEGACY_ARGS[i],
            text[i]
        );
    }
    eprintln!(
        "rsql-wrapper: legacy script path {:?} submitted as job_name {job_name:?}",
        text[3]
    );
    submit_job(Submit {
        task_token: text[0].clone(),
        workflow_id: text[1].clone(),
        workflow_execution_id: text[2].clone(),
        job_name,
        ssm_command_id: None,
        timeout_seconds: None,
        heartbeat_seconds: None,
        socket: None,
        args: text[11..].to_vec(),
    })
}

/// The script path relative to the instance code dir (the agent's script dir); a path
/// elsewhere, or a bare name, gives its file name.
fn legacy_job_name(script: &str, code_dir: &str) -> Option<String> {
    let script_path = Path::new(script);
    let code_dir = Path::new(code_dir);
    if !code_dir.as_os_str().is_empty() {
        if let Ok(rest) = script_path.strip_prefix(code_dir) {
            let rest = rest.to_str()?;
            if !rest.is_empty() {
                return Some(rest.to_string());
            }
        }
    }
    script_path
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
}

fn submit_job(submit: Submit) -> u8 {
    let socket = submit
        .socket
        .or_else(|| std::env::var_os("RSQL_AGENT_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let mut job = json!({
        "task_token": submit.task_token,
        "workflow_id": submit.workflow_id,
        "workflow_execution_id": submit.workflow_execution_id,
        "job_name": submit.job_name,
        "args": submit.args,
    });
    if let Some(id) = submit.ssm_command_id.filter(|id| !id.is_empty()) {
        job["ssm_command_id"] = Value::String(id);
    }
    if let Some(seconds) = submit.timeout_seconds {
        job["timeout_seconds"] = Value::from(seconds);
    }
    if let Some(seconds) = submit.heartbeat_seconds {
        job["heartbeat_seconds"] = Value::from(seconds);
    }
    let reply = match exchange(&socket, &job) {
        Ok(reply) => reply,
        Err(e) => {
            eprintln!(
                "rsql-wrapper: the agent is not reachable at {}: {e}",
                socket.display()
            );
            return exit::UNREACHABLE;
        }
    };
    if reply["accepted"].as_bool() == Some(true) {
        println!(
            "accepted: job {} (task {}) runs under rsql-agent",
            reply["job_name"].as_str().unwrap_or("?"),
            reply["token_hash"].as_str().unwrap_or("?")
        );
        return exit::ACCEPTED;
    }
    let error = reply["error"].as_str().unwrap_or("no reason given");
    eprintln!("rejected: {error}");
    if reply["retryable"].as_bool() == Some(true) {
        exit::BUSY
    } else {
        exit::REJECTED
    }
}

/// Sends the job as one JSON line and reads the agent's one-line reply.
fn exchange(socket: &Path, job: &Value) -> std::io::Result<Value> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = job.to_string();
    line.push('\n');
    // The agent may refuse (and close) before reading: a failed write still has a reply.
    let _ = stream.write_all(line.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    if reply.trim().is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without a reply",
        ));
    }
    serde_json::from_str(&reply).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unreadable reply {:?}: {e}", reply.trim()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_job_name_is_relative_to_the_code_dir_or_the_file_name() {
        assert_eq!(
            legacy_job_name("/opt/rsql/scripts/etl/load.sh", "/opt/rsql/scripts").as_deref(),
            Some("etl/load.sh")
        );
        assert_eq!(
            legacy_job_name("/opt/rsql/scripts/load.sh", "/opt/rsql/scripts/").as_deref(),
            Some("load.sh")
        );
        assert_eq!(
            legacy_job_name("/elsewhere/load.sh", "/opt/rsql/scripts").as_deref(),
            Some("load.sh")
        );
        assert_eq!(
            legacy_job_name("load.sh", "/opt/rsql/scripts").as_deref(),
            Some("load.sh")
        );
        assert_eq!(legacy_job_name("/", "/opt"), None);
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
