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
//!   agent's script dir), or the script's file name when it is not under that dir. As the old
//!   trigger did, the script gets the instance code dir and the secret id as `$1` and `$2`,
//!   then the extra arguments (the message's `legacy_args`). Arguments 5, 7 to 9 and 11 are
//!   accepted and ignored (the agent's config decides them); each is named on stderr.
//!   When no agent is reachable, the legacy form runs the job here as `run` does (with
//!   `$RSQL_AGENT_CONFIG`, else the default config); when it cannot even do that, it fails
//!   the task as `Rsql.Interrupted`, so that no execution waits for its timeout.
//! - `rsql-wrapper run [--config PATH] ...` with the 11 legacy positional arguments instead of
//!   the job options: the legacy job, run here.
//!
//! The socket is `--socket`, else `$RSQL_AGENT_SOCKET`, else `/run/rsql-agent/agent.sock`.
//! The config of `run` is `--config`, else `$RSQL_AGENT_CONFIG`, else
//! `/etc/rsql-agent/agent.toml`.
//!
//! Before `submit` sends anything it checks who listens (`SO_PEERCRED`): root, the wrapper's
//! own user, or the agent's service user (`--agent-user`, else `$RSQL_AGENT_USER`, else
//! `rsql` when that user exists). Anyone else gets nothing: a task token handed to an
//! impostor lets it answer for the job.
//!
//! Exit codes: the table in [`rsql_agent::exit`], shared with `rsql-agent`; this file maps
//! how a job ended (and each error, through that table) to its code.

// No function over 120 lines of code (threshold in clippy.toml); the test code is exempt.
#![warn(clippy::too_many_lines)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rsql_agent::config::{Config, DEFAULT_CONFIG_PATH};
use rsql_agent::daemon::{Daemon, DaemonError, OneJob};
use rsql_agent::error_chain;
use rsql_agent::exit::Exit;
use rsql_agent::outcome::{ErrorName, Outcome};
use rsql_agent::state_dir_lock::StateDirLockError;
use serde_json::{json, Value};

mod legacy;
use legacy::{legacy, legacy_run, legacy_run_form};

const DEFAULT_SOCKET: &str = "/run/rsql-agent/agent.sock";
/// The agent answers within a second; this is generous.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
#[derive(Debug, Parser)]
#[command(
    name = "rsql-wrapper",
    version,
    about = "Hand an RSQL job to the running rsql-agent, or run one standalone (SSM Run Command entry point)",
    after_help = "Legacy form: rsql-wrapper TOKEN WORKFLOW_ID WORKFLOW_EXECUTION_ID SCRIPT_PATH \
INSTANCE_ID SECRET_ID LOG_PATH AUDIT_TABLE LOG_GROUP INSTANCE_CODE_DIR REGION [SCRIPT_ARGS...] \
(submits; with no agent reachable, runs the job here or fails its task). The script gets \
INSTANCE_CODE_DIR and SECRET_ID as $1 and $2, then SCRIPT_ARGS. \
`rsql-wrapper run [--config PATH] TOKEN ... REGION [SCRIPT_ARGS...]` runs it here.\n\n\
Exit codes: 0 accepted (submit) or completed (run), 1 job failed (run), 2 usage, \
3 rejected as invalid, 66 config unreadable, 69 agent not reachable, 70 internal error, \
74 state not writable, 75 busy or running elsewhere (retry), 76 AWS calls failed: the \
outcome is stored and goes out later, 78 config invalid, 130 interrupted \
(the table shared with rsql-agent)"
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
    /// database. Any intake it configures is ignored. [default: $RSQL_AGENT_CONFIG, else
    /// /etc/rsql-agent/agent.toml]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// After the job, how long to keep trying to deliver its callback and audit.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    report_timeout_seconds: u64,
    /// Log format on stderr: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// The job, as both `submit` and `run` take it.
#[derive(Debug, Clone, clap::Args)]
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
    /// The legacy form's `[instance_code_dir, secret_id]`, the script's `$1` and `$2`.
    #[arg(skip)]
    legacy_args: Option<[String; 2]>,
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    if let Some(first) = argv.get(1).and_then(|a| a.to_str()) {
        let subcommand = matches!(first, "submit" | "run" | "help");
        if !subcommand && !first.starts_with('-') {
            return legacy(&argv[1..]).into();
        }
        if first == "run" {
            if let Some(form) = legacy_run_form(&argv[2..]) {
                return match form {
                    Ok((options, positional)) => legacy_run(options, &positional),
                    Err(message) => usage(&message),
                }
                .into();
            }
        }
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Submit(submit) => submit_job(submit).code,
        Command::Run(run) => run_job(run).code(),
    }
    .into()
}

fn usage(message: &str) -> Exit {
    eprintln!("rsql-wrapper: usage error: {message}");
    eprintln!("Run `rsql-wrapper --help` for the forms and exit codes.");
    Exit::Usage
}

/// Fails a task nobody will run, so that its execution does not wait for its timeout:
/// `Rsql.Interrupted` (the host's runner is missing; a retry may find it back). One attempt
/// with a bounded wait; whether it worked is said on stderr.
fn fail_unrun_task(token: &str, socket: &Path, reason: &str) {
    let message = format!(
        "the job was not started: no rsql-agent is reachable at {} and it cannot run here \
         standalone: {reason}",
        socket.display()
    );
    let cause = json!({
        "exit_code": null, "signal": null, "sql_state": null,
        "message": message, "stderr_tail": "", "log_group": null, "log_stream": null,
    })
    .to_string();
    let error = ErrorName::Interrupted.as_str();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rsql-wrapper: cannot start the async runtime to fail the task: {e}");
            return;
        }
    };
    let sent = runtime.block_on(async {
        let sdk = rsql_agent::aws::load_config().await;
        let sfn = rsql_agent::report::stepfunctions::StepFunctions::new(
            rsql_agent::aws::AwsClients::new(&sdk).sfn,
        );
        tokio::time::timeout(REPLY_TIMEOUT * 3, sfn.fail(token, error, &cause)).await
    });
    match sent {
        Ok(Ok(())) => eprintln!("rsql-wrapper: the task was failed as {error}: {message}"),
        Ok(Err(e)) => eprintln!(
            "rsql-wrapper: cannot fail the task as {error}: {}",
            rsql_agent::error_chain(&e)
        ),
        Err(_) => eprintln!("rsql-wrapper: cannot fail the task as {error}: no answer in time"),
    }
}

/// `--config`, else `$RSQL_AGENT_CONFIG`, else the default.
fn config_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| {
            std::env::var_os("RSQL_AGENT_CONFIG")
                .filter(|c| !c.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

fn default_socket() -> PathBuf {
    std::env::var_os("RSQL_AGENT_SOCKET")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
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
    if let Some(legacy) = job.legacy_args {
        message["legacy_args"] = json!(legacy);
    }
    message
}

/// Submits the job, to a listener that is the agent (root or its user) only; hands the
/// job back with the exit code, for a fallback.
/// How far a submission got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// Nothing listens on the socket (no file, or the connection was refused): no agent.
    Absent,
    /// Something was in the way before the job was written (permissions, an untrusted
    /// listener, a bad argument): nobody has the job.
    NotSent,
    /// The job was written: the agent answered, or may have it without having answered.
    Sent,
}

/// A submission's exit code and delivery, with the job handed back for a fallback.
struct Submitted {
    code: Exit,
    job: JobArgs,
    delivery: Delivery,
}

/// Submits the job, to a listener that is the agent (root or its user) only.
fn submit_job(submit: Submit) -> Submitted {
    let socket = submit.socket.unwrap_or_else(default_socket);
    let job = job_message(submit.job.clone());
    let done = |code, delivery| Submitted {
        code,
        job: submit.job.clone(),
        delivery,
    };
    let trusted = match trusted_listeners(submit.agent_user.clone()) {
        Ok(uids) => uids,
        Err(message) => return done(usage(&message), Delivery::NotSent),
    };
    let reply = match exchange(&socket, &job, &trusted) {
        Ok(reply) => reply,
        Err(Exchange::Connect(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!(
                "rsql-wrapper: permission denied on the agent's socket {}: {e}; this user \
                 (uid {}) may not connect: the agent's [intake.socket] allowed_uids or \
                 allowed_groups must list it (the socket is then open to the check)",
                socket.display(),
                nix::unistd::getuid()
            );
            return done(Exit::Rejected, Delivery::NotSent);
        }
        Err(e) => {
            eprintln!(
                "rsql-wrapper: the agent is not reachable at {}: {e}",
                socket.display()
            );
            let delivery = match &e {
                Exchange::Connect(io)
                    if matches!(
                        io.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    Delivery::Absent
                }
                Exchange::Connect(_) | Exchange::Untrusted(_) => Delivery::NotSent,
                Exchange::Reply(_) => Delivery::Sent,
            };
            return done(Exit::Unavailable, delivery);
        }
    };
    done(submit_reply(&reply), Delivery::Sent)
}

fn submit_reply(reply: &Value) -> Exit {
    if reply["accepted"].as_bool() == Some(true) {
        println!(
            "accepted: job {} (task {}) runs under rsql-agent",
            reply["job_name"].as_str().unwrap_or("?"),
            reply["token_hash"].as_str().unwrap_or("?")
        );
        return Exit::Ok;
    }
    let error = reply["error"].as_str().unwrap_or("no reason given");
    eprintln!("rejected: {error}");
    if reply["retryable"].as_bool() == Some(true) {
        Exit::Busy
    } else {
        Exit::Rejected
    }
}

/// How a `run` ended: with its task settled (reported, stored for reporting, or another
/// runner's), or with the exit code and the reason nothing was reported.
enum RunEnd {
    Settled(Exit),
    NotSettled(Exit, String),
}

impl RunEnd {
    fn code(&self) -> Exit {
        match self {
            RunEnd::Settled(code) | RunEnd::NotSettled(code, _) => *code,
        }
    }
}

/// `rsql-wrapper run`: the job runs here under the agent's library; reports go out before
/// the process exits.
fn run_job(run: Run) -> RunEnd {
    rsql_agent::logging::init(&run.log_format, "info");
    let config = match Config::load(&config_path(run.config.clone())) {
        Ok(config) => Arc::new(config),
        Err(e) => {
            let reason = error_chain(&e);
            eprintln!("rsql-wrapper: {reason}");
            return RunEnd::NotSettled(Exit::from(&e), reason);
        }
    };
    if let Some(message) = wrong_user(&config.agent.state_dir) {
        return RunEnd::NotSettled(usage(&message), message);
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
            return RunEnd::NotSettled(Exit::Software, format!("no async runtime: {e}"));
        }
    };
    runtime.block_on(async move {
        let parts = match rsql_agent::startup::open(&config).await {
            Ok(p) => p,
            Err(e) => {
                let reason = error_chain(&e);
                tracing::error!(error = %reason, "cannot start");
                return RunEnd::NotSettled(Exit::from(&e), reason);
            }
        };
        let daemon = match Daemon::standalone(
            config.clone(),
            parts.attempts,
            &parts.clients,
            "rsql-wrapper run",
        ) {
            Ok(d) => d,
            Err(e @ DaemonError::Owner(StateDirLockError::InUse { .. })) => {
                tracing::error!(error = %error_chain(&e), "cannot run the job here; with an agent running, use `rsql-wrapper submit`");
                return RunEnd::NotSettled(Exit::from(&e), error_chain(&e));
            }
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot start");
                return RunEnd::NotSettled(Exit::from(&e), error_chain(&e));
            }
        };
        match daemon.run_one(body.as_bytes(), parts.controls, report_timeout).await {
            Ok(OneJob::NotStored) => RunEnd::NotSettled(
                one_job_exit(&OneJob::NotStored),
                "the job's outcome could not be stored".to_string(),
            ),
            Ok(one) => RunEnd::Settled(one_job_exit(&one)),
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot store the job's report");
                RunEnd::NotSettled(Exit::from(&e), error_chain(&e))
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
fn one_job_exit(one: &OneJob) -> Exit {
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
                    Exit::Ok
                }
                Outcome::Failed(failure) => {
                    println!(
                        "failed: {}: {}; {}",
                        failure.error,
                        failure.cause.message,
                        reported(*delivered)
                    );
                    if *stopped && failure.error == ErrorName::Interrupted {
                        Exit::Interrupted
                    } else {
                        Exit::JobFailed
                    }
                }
                Outcome::Cancelled { message } => {
                    println!(
                        "cancelled: {message}; the task was closed upstream, nothing to report"
                    );
                    Exit::JobFailed
                }
            };
            if *delivered {
                code
            } else {
                Exit::Remote
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
            Exit::Rejected
        }
        OneJob::RunningElsewhere { holder } => {
            eprintln!("busy: the job is running elsewhere ({holder}); that runner reports it");
            Exit::Busy
        }
        OneJob::NotStored => {
            eprintln!("error: the job's outcome could not be stored; nothing was reported (see the log above)");
            Exit::Io
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

/// Where an exchange with the agent failed: before anything was written (connecting, or a
/// listener that is not the agent), or after the job was written (no readable reply).
#[derive(Debug)]
enum Exchange {
    Connect(std::io::Error),
    Untrusted(String),
    Reply(std::io::Error),
}

impl std::fmt::Display for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exchange::Connect(e) | Exchange::Reply(e) => write!(f, "{e}"),
            Exchange::Untrusted(message) => f.write_str(message),
        }
    }
}

fn exchange(socket: &Path, job: &Value, trusted: &[u32]) -> Result<Value, Exchange> {
    let mut stream = UnixStream::connect(socket).map_err(Exchange::Connect)?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| Exchange::Connect(std::io::Error::from(e)))?;
    let listener = cred.uid();
    if !trusted.contains(&listener) {
        return Err(Exchange::Untrusted(format!(
            "the process listening there (pid {}) runs as uid {listener}, which is neither root \
             nor the agent's user (trusted uids: {trusted:?}); nothing was sent to it. Someone \
             may have replaced the agent's socket: tell the operator",
            cred.pid()
        )));
    }
    let timeouts = stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)));
    timeouts.map_err(Exchange::Connect)?;
    let mut line = job.to_string();
    line.push('\n');
    // The agent may refuse (and close) before reading: a failed write still has a reply.
    let _ = stream.write_all(line.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(Exchange::Reply)?;
    if reply.trim().is_empty() {
        return Err(Exchange::Reply(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without a reply",
        )));
    }
    serde_json::from_str(&reply).map_err(|e| {
        Exchange::Reply(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unreadable reply {:?}: {e}", reply.trim()),
        ))
    })
}

#[cfg(test)]
mod tests;
