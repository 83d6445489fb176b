//! `rsql-wrapper`: the SSM Run Command entry point.
//!
//! Three forms:
//! - `rsql-wrapper submit --task-token T --workflow-id W --workflow-execution-id E
//!   --job-name S [--ssm-command-id C] [--timeout-seconds N] [--heartbeat-seconds N]
//!   [--socket PATH] [-- ARGS...]` hands one job to the running `rsql-agent` over the
//!   agent's Unix socket (`[intake.socket] path`) and returns at once, saying whether the
//!   agent accepted it; the job then runs under the agent's supervision, not under the SSM
//!   command's.
//! - `rsql-wrapper run` with the same job arguments plus `[--config PATH]
//!   [--report-timeout-seconds N] [--log-format text|json]` runs the job here, standalone,
//!   for hosts without the daemon: the agent's own library supervises it, keeps its log
//!   (and ships it to CloudWatch when configured), heartbeats, and reports the outcome to
//!   Step Functions and the audit table before it exits. It owns the config's state
//!   directory while it runs, so it refuses to start beside a running agent (use `submit`).
//! - the legacy form: the 11 positional arguments of the old `rsql_trigger.sh` (token,
//!   workflow id, workflow execution id, script path, instance id, secret id, log path, audit
//!   table, log group, instance code dir, region), then the script's arguments. It submits
//!   the same job: `job_name` is the script path relative to the instance code dir (the
//!   agent's script dir), or the script's file name when it is not under that dir. Arguments
//!   5 to 9 and 11 are accepted and ignored (the agent's config decides them); each is named
//!   on stderr.
//!
//! The socket is `--socket`, else `$RSQL_AGENT_SOCKET`, else `/run/rsql-agent/agent.sock`.
//!
//! Before `submit` sends anything it checks who listens (`SO_PEERCRED`): root, the wrapper's
//! own user, or the agent's service user (`--agent-user`, else `$RSQL_AGENT_USER`, else
//! `rsql` when that user exists). Anyone else gets nothing: a task token handed to an
//! impostor lets it answer for the job.
//!
//! Exit codes: see [`exit`].

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rsql_agent::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use rsql_agent::daemon::{Daemon, DaemonError, OneJob};
use rsql_agent::error_chain;
use rsql_agent::outcome::{ErrorName, Outcome};
use rsql_agent::owner::OwnerError;
use rsql_agent::startup::StartError;
use serde_json::{json, Value};

/// Exit codes, documented in the README. Only this file maps outcomes and errors to them.
mod exit {
    /// `submit`: the agent accepted the job; it runs under the agent and reports to Step
    /// Functions. `run`: the job completed and its success was reported.
    pub const OK: u8 = 0;
    /// `run`: the job failed (or its task was closed upstream); the failure was reported.
    pub const JOB_FAILED: u8 = 1;
    /// Bad arguments; the message names the argument.
    pub const USAGE: u8 = 2;
    /// The job was refused as invalid (or, for `submit`, the submitter is not allowed).
    /// Sending it again does not help. A job with a task token has been failed as
    /// `Rsql.InvalidJob`.
    pub const REJECTED: u8 = 3;
    /// `run`: the config file does not exist or cannot be read.
    pub const NO_INPUT: u8 = 66;
    /// `submit`: the agent cannot be reached: no socket, nobody listening, or no reply in
    /// time.
    pub const UNREACHABLE: u8 = 69;
    /// `run`: internal error (the async runtime, the signal handlers, the supervisor).
    pub const SOFTWARE: u8 = 70;
    /// `run`: the state, log or outbox directories cannot be written; nothing was reported.
    pub const IO: u8 = 74;
    /// `submit`: the agent is busy (every job slot taken) or shutting down. `run`: the job
    /// is running elsewhere (its lock is held; that runner reports it), or an agent owns the
    /// state directory (use `submit`). Try again later.
    pub const BUSY: u8 = 75;
    /// `run`: the outcome is stored but was not delivered within `--report-timeout-seconds`
    /// (AWS unreachable); it goes out after the next start of the agent or of a `run`.
    pub const NOT_DELIVERED: u8 = 76;
    /// `run`: the config file is invalid (the message names the key).
    pub const CONFIG: u8 = 78;
    /// `run`: stopped by SIGTERM or SIGINT (an SSM cancel); the job was stopped and reported
    /// `Rsql.Interrupted`.
    pub const INTERRUPTED: u8 = 130;
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
    about = "Hand an RSQL job to the running rsql-agent, or run one standalone (SSM Run Command entry point)",
    after_help = "Legacy form: rsql-wrapper TOKEN WORKFLOW_ID WORKFLOW_EXECUTION_ID SCRIPT_PATH \
INSTANCE_ID SECRET_ID LOG_PATH AUDIT_TABLE LOG_GROUP INSTANCE_CODE_DIR REGION [SCRIPT_ARGS...]\n\n\
Exit codes: 0 accepted (submit) or completed (run), 1 job failed (run), 2 usage, \
3 rejected as invalid, 66 config unreadable, 69 agent not reachable, 70 internal error, \
74 state not writable, 75 busy or running elsewhere (retry), 76 outcome not yet delivered, \
78 config invalid, 130 interrupted"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Submit one job to the running agent and say whether it was accepted.
    Submit(Submit),
    /// Run one job here without the daemon: supervise it, log it, report it, then exit.
    Run(Run),
}

#[derive(Debug, clap::Args)]
struct Submit {
    #[command(flatten)]
    job: JobArgs,
    /// The agent's socket [default: $RSQL_AGENT_SOCKET, else /run/rsql-agent/agent.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The user the agent runs as (name or uid); only it or root may be listening
    /// [default: $RSQL_AGENT_USER, else `rsql` when it exists].
    #[arg(long, value_name = "USER")]
    agent_user: Option<String>,
}

#[derive(Debug, clap::Args)]
struct Run {
    #[command(flatten)]
    job: JobArgs,
    /// The agent config: script dir, state and log dirs, lock dir, audit table, CloudWatch,
    /// database. Any intake it configures is ignored.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// After the job, how long to keep trying to deliver its callback and audit.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    report_timeout_seconds: u64,
    /// Log format on stderr: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// The job, as both `submit` and `run` take it.
#[derive(Debug, clap::Args)]
struct JobArgs {
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
    /// Arguments for the script.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    if let Some(first) = argv.get(1).and_then(|a| a.to_str()) {
        let subcommand = matches!(first, "submit" | "run" | "help");
        if !subcommand && !first.starts_with('-') {
            return ExitCode::from(legacy(&argv[1..]));
        }
    }
    let cli = Cli::parse();
    ExitCode::from(match cli.command {
        Command::Submit(submit) => submit_job(submit),
        Command::Run(run) => run_job(run),
    })
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
        job: JobArgs {
            task_token: text[0].clone(),
            workflow_id: text[1].clone(),
            workflow_execution_id: text[2].clone(),
            job_name,
            ssm_command_id: None,
            timeout_seconds: None,
            heartbeat_seconds: None,
            args: text[11..].to_vec(),
        },
        socket: None,
        agent_user: None,
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

/// The job message (the same contract as an SQS message) for these arguments.
fn job_message(job: JobArgs) -> Value {
    let mut message = json!({
        "task_token": job.task_token,
        "workflow_id": job.workflow_id,
        "workflow_execution_id": job.workflow_execution_id,
        "job_name": job.job_name,
        "args": job.args,
    });
    if let Some(id) = job.ssm_command_id.filter(|id| !id.is_empty()) {
        message["ssm_command_id"] = Value::String(id);
    }
    if let Some(seconds) = job.timeout_seconds {
        message["timeout_seconds"] = Value::from(seconds);
    }
    if let Some(seconds) = job.heartbeat_seconds {
        message["heartbeat_seconds"] = Value::from(seconds);
    }
    message
}

fn submit_job(submit: Submit) -> u8 {
    let socket = submit
        .socket
        .or_else(|| std::env::var_os("RSQL_AGENT_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let job = job_message(submit.job);
    let trusted = match trusted_listeners(submit.agent_user) {
        Ok(uids) => uids,
        Err(message) => return usage(&message),
    };
    let reply = match exchange(&socket, &job, &trusted) {
        Ok(reply) => reply,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!(
                "rsql-wrapper: permission denied on the agent's socket {}: {e}; this user \
                 (uid {}) may not connect: the agent's [intake.socket] allowed_uids or \
                 allowed_groups must list it (the socket is then open to the check)",
                socket.display(),
                nix::unistd::getuid()
            );
            return exit::REJECTED;
        }
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
        return exit::OK;
    }
    let error = reply["error"].as_str().unwrap_or("no reason given");
    eprintln!("rejected: {error}");
    if reply["retryable"].as_bool() == Some(true) {
        exit::BUSY
    } else {
        exit::REJECTED
    }
}

/// `rsql-wrapper run`: the job runs here under the agent's library; reports go out before
/// the process exits.
fn run_job(run: Run) -> u8 {
    rsql_agent::logging::init(&run.log_format, "info");
    let config = match Config::load(&run.config) {
        Ok(config) => Arc::new(config),
        Err(e) => {
            eprintln!("rsql-wrapper: {}", error_chain(&e));
            return match e {
                ConfigError::Read { .. } => exit::NO_INPUT,
                ConfigError::Parse { .. } | ConfigError::Invalid { .. } => exit::CONFIG,
            };
        }
    };
    if let Some(message) = wrong_user(&config.agent.state_dir) {
        return usage(&message);
    }
    let body = job_message(run.job).to_string();
    let report_timeout = Duration::from_secs(run.report_timeout_seconds);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rsql-wrapper: cannot start the async runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    runtime.block_on(async move {
        let parts = match rsql_agent::startup::open(&config).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot start");
                return match e {
                    StartError::Signals(_) => exit::SOFTWARE,
                    StartError::StateDirs(_) => exit::IO,
                };
            }
        };
        let daemon = match Daemon::standalone(
            config.clone(),
            parts.attempts,
            &parts.clients,
            "rsql-wrapper run",
        ) {
            Ok(d) => d,
            Err(e @ DaemonError::Owner(OwnerError::InUse { .. })) => {
                tracing::error!(error = %error_chain(&e), "cannot run the job here; with an agent running, use `rsql-wrapper submit`");
                return exit::BUSY;
            }
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot start");
                return exit::IO;
            }
        };
        match daemon.run_one(body.as_bytes(), parts.controls, report_timeout).await {
            Ok(one) => one_job_exit(&one),
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot store the job's report");
                exit::IO
            }
        }
    })
}

/// Root must not write into a state directory that another user (the service's `rsql`)
/// owns: the outbox and job records it left there would be unreadable to the agent later.
fn wrong_user(state_dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(state_dir).ok()?.uid();
    (nix::unistd::geteuid().is_root() && owner != 0).then(|| {
        format!(
            "the state directory {} belongs to uid {owner}, not root: run as that user, e.g. \
             `runuser -u rsql -- rsql-wrapper run ...`",
            state_dir.display()
        )
    })
}

/// Says on stdout (what SSM shows as the command's output) how the job ended, and maps it
/// to the exit code.
fn one_job_exit(one: &OneJob) -> u8 {
    let reported = |delivered: bool| {
        if delivered {
            "reported"
        } else {
            "NOT yet reported: it stays in the outbox and goes out after the next start"
        }
    };
    match one {
        OneJob::Finished {
            outcome,
            delivered,
            stopped,
        } => {
            let code = match outcome {
                Outcome::Completed(out) => {
                    println!(
                        "completed: job {} exit 0 in {} ms; {}",
                        out.job_name,
                        out.duration_ms,
                        reported(*delivered)
                    );
                    exit::OK
                }
                Outcome::Failed(failure) => {
                    println!(
                        "failed: {}: {}; {}",
                        failure.error,
                        failure.cause.message,
                        reported(*delivered)
                    );
                    if *stopped && failure.error == ErrorName::Interrupted {
                        exit::INTERRUPTED
                    } else {
                        exit::JOB_FAILED
                    }
                }
                Outcome::Cancelled { message } => {
                    println!(
                        "cancelled: {message}; the task was closed upstream, nothing to report"
                    );
                    exit::JOB_FAILED
                }
            };
            if *delivered {
                code
            } else {
                exit::NOT_DELIVERED
            }
        }
        OneJob::Rejected {
            reason,
            failed_task,
            delivered,
        } => {
            eprintln!("rejected: {reason}");
            if *failed_task {
                println!(
                    "rejected: the task was failed with Rsql.InvalidJob; {}",
                    reported(*delivered)
                );
            }
            exit::REJECTED
        }
        OneJob::RunningElsewhere { holder } => {
            eprintln!("busy: the job is running elsewhere ({holder}); that runner reports it");
            exit::BUSY
        }
        OneJob::NotStored => {
            eprintln!("error: the job's outcome could not be stored; nothing was reported (see the log above)");
            exit::IO
        }
    }
}

/// Sends the job as one JSON line and reads the agent's one-line reply.
/// The uids that may listen on the agent's socket: root, this process's user, and the agent's
/// user (`--agent-user`, `$RSQL_AGENT_USER`, else `rsql` if it exists).
fn trusted_listeners(agent_user: Option<String>) -> Result<Vec<u32>, String> {
    let mut uids = vec![0, nix::unistd::getuid().as_raw()];
    let named = agent_user.or_else(|| std::env::var("RSQL_AGENT_USER").ok());
    let (name, required) = match named.filter(|n| !n.is_empty()) {
        Some(name) => (name, true),
        None => ("rsql".to_string(), false),
    };
    let uid = match name.parse::<u32>() {
        Ok(uid) => Some(uid),
        Err(_) => nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw()),
    };
    match uid {
        Some(uid) => uids.push(uid),
        None if required => return Err(format!("--agent-user: no user {name:?} on this host")),
        None => {}
    }
    Ok(uids)
}

fn exchange(socket: &Path, job: &Value, trusted: &[u32]) -> std::io::Result<Value> {
    let mut stream = UnixStream::connect(socket)?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    let listener = cred.uid();
    if !trusted.contains(&listener) {
        return Err(std::io::Error::other(format!(
            "the process listening there (pid {}) runs as uid {listener}, which is neither root \
             nor the agent's user (trusted uids: {trusted:?}); nothing was sent to it. Someone \
             may have replaced the agent's socket: tell the operator",
            cred.pid()
        )));
    }
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
