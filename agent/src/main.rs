//! `rsql-agent`: the resident daemon and its command-line tools.
//!
//! Exit codes: the table in [`rsql_agent::exit`], shared with `rsql-wrapper`. This file
//! and the wrapper's `main` are the only places that turn an error into an exit code, each
//! through that table's `From` impls.
//!
//! Why one file of about 900 lines: it is the command table, clap's definitions followed by
//! one short function per command, each ending in an exit code. Every command's work lives
//! in the library; split up, this table would only be harder to read against `--help`.

// No function over 120 lines of code (threshold in clippy.toml); the test code is exempt.
#![warn(clippy::too_many_lines)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use rsql_agent::attempt::AttemptContext;
use rsql_agent::config::{Config, DEFAULT_CONFIG_PATH};
use rsql_agent::error_chain;
use rsql_agent::exit::Exit;
use rsql_agent::signals::Controls;
use rsql_agent::supervisor::Supervisor;
use rsql_agent::workflow::{
    self, terminal_text, Progress, RunOptions, Runner, WorkflowConfig, WorkflowReport,
};

#[derive(Debug, Parser)]
#[command(
    name = "rsql-agent",
    version,
    about = "Runs Amazon Redshift RSQL jobs for AWS Step Functions"
)]
struct Cli {
    /// Log format on stderr: text or json.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the resident agent: take jobs from SQS, run them, report the results.
    Run {
        /// The config file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a config file without starting anything.
    CheckConfig {
        /// The config file.
        #[arg(default_value = DEFAULT_CONFIG_PATH)]
        path: PathBuf,
    },
    /// Stop intake on the running agent (an ASG scale-in lifecycle hook): messages not yet
    /// started go back to the queue; running jobs go on and are reported.
    Drain {
        /// The running agent's config file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Return only when no job runs and every report is delivered.
        #[arg(long)]
        wait: bool,
    },
    /// Workflows: run one on this host with no AWS at all, or drive the generic state
    /// machine (packaging/aws/workflow.asl.json) on AWS.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Job scripts: check a folder of them before a migration.
    #[command(subcommand)]
    Scripts(ScriptsCommand),
}

#[derive(Debug, Subcommand)]
enum ScriptsCommand {
    /// Check every script in DIR for what would fail under the agent (CRLF endings, an
    /// interpreter that is missing or not the one that would run it, legacy arguments that
    /// are not configured, rsql commands the stand-in lacks, reserved \exit codes). One line a
    /// finding: FILE:LINE: error|warning: what; fix: how. Exits 1 when any error is found.
    Check {
        /// The folder of scripts (searched recursively).
        dir: PathBuf,
        /// The agent config whose [jobs] interpreter and [jobs.legacy] apply; without it,
        /// /bin/bash and no legacy arguments.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum WorkflowCommand {
    /// Run a legacy workflow config (workflow_stages[]) locally and print a summary.
    /// Ctrl-C (or SIGTERM) stops the running jobs (SIGTERM, then SIGKILL after kill_grace),
    /// reports them Rsql.Interrupted and exits 130; a second one kills them at once; a third
    /// ends rsql-agent at once.
    Run {
        /// The workflow config (JSON).
        file: PathBuf,
        /// Agent config; without it, defaults under ~/.local/state/rsql-agent and scripts
        /// next to the workflow file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Use this execution id instead of a generated one.
        #[arg(long, conflicts_with = "resume")]
        execution_id: Option<String>,
        /// Resume this execution: run only the jobs that did not complete.
        #[arg(long, value_name = "EXECUTION_ID")]
        resume: Option<String>,
    },
    /// Write a legacy workflow config (JSON) as its item in the DynamoDB config table.
    PutConfig {
        /// The workflow config (JSON).
        file: PathBuf,
        /// The config table (keyed by workflow_id).
        #[arg(long)]
        table: String,
    },
    /// Start an execution of the generic state machine for a workflow; prints its ARN.
    Start {
        /// The workflow_id of a config loaded with put-config.
        workflow_id: String,
        /// The execution id (also the execution's name); generated when absent.
        #[arg(long)]
        execution_id: Option<String>,
        /// The state machine's ARN.
        #[arg(long)]
        state_machine: String,
        /// The config table; by default the one the state machine reads.
        #[arg(long)]
        config_table: Option<String>,
    },
    /// Print the per-job status of an execution, from the audit tables and Step Functions.
    Status {
        /// The execution id (the execution's name).
        execution_id: String,
        /// The state machine's ARN.
        #[arg(long)]
        state_machine: String,
        /// The job audit table (the agents' `[report.audit] job_table`).
        #[arg(long)]
        job_table: String,
        /// The workflow audit table; by default the one the state machine writes.
        #[arg(long)]
        workflow_table: Option<String>,
    },
    /// Write a timeline of one execution: every job attempt on a time axis, grouped by
    /// stage, with queue waits, retries and the critical path. With --state-machine, an
    /// execution on AWS (its history and the job audit table); without, a local
    /// `workflow run` execution (the local audit under the config's state_dir).
    Report {
        /// The execution id: on AWS the execution's name or its full ARN.
        execution_id: String,
        /// The state machine's ARN (AWS executions).
        #[arg(long, requires = "job_table", conflicts_with = "config")]
        state_machine: Option<String>,
        /// The job audit table (the agents' `[report.audit] job_table`).
        #[arg(long, requires = "state_machine")]
        job_table: Option<String>,
        /// The workflow audit table; by default the one the state machine writes.
        #[arg(long, requires = "state_machine")]
        workflow_table: Option<String>,
        /// Agent config of a local run (its state_dir holds the audit); without it, the
        /// defaults `workflow run` uses without one.
        #[arg(long)]
        config: Option<PathBuf>,
        /// html (one self-contained file) or text.
        #[arg(long, default_value = "html", value_parser = ["html", "text"])]
        format: String,
        /// Write here; without it, to standard output.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Run { .. } => "info",
        _ => "warn",
    };
    init_tracing(&cli.log_format, default_level);
    let code = match cli.command {
        Command::Run { config } => daemon_run(&config),
        Command::CheckConfig { path } => check_config(&path),
        Command::Drain { config, wait } => drain(&config, wait),
        Command::Workflow(WorkflowCommand::Run {
            file,
            config,
            execution_id,
            resume,
        }) => workflow_run(
            &file,
            config.as_deref(),
            RunOptions {
                execution_id,
                resume,
            },
        ),
        Command::Scripts(ScriptsCommand::Check { dir, config }) => {
            scripts_check(&dir, config.as_deref())
        }
        Command::Workflow(WorkflowCommand::PutConfig { file, table }) => {
            orchestrate::put_config(&file, &table)
        }
        Command::Workflow(WorkflowCommand::Start {
            workflow_id,
            execution_id,
            state_machine,
            config_table,
        }) => orchestrate::start(
            &workflow_id,
            execution_id,
            &state_machine,
            config_table.as_deref(),
        ),
        Command::Workflow(WorkflowCommand::Status {
            execution_id,
            state_machine,
            job_table,
            workflow_table,
        }) => orchestrate::status(
            &execution_id,
            &state_machine,
            &job_table,
            workflow_table.as_deref(),
        ),
        Command::Workflow(WorkflowCommand::Report {
            execution_id,
            state_machine,
            job_table,
            workflow_table,
            config,
            format,
            output,
        }) => workflow_report(
            &execution_id,
            match (state_machine, job_table) {
                (Some(sm), Some(jt)) => ReportSource::Aws {
                    state_machine: sm,
                    job_table: jt,
                    workflow_table,
                },
                _ => ReportSource::Local { config },
            },
            &format,
            output.as_deref(),
        ),
    };
    code.into()
}

fn init_tracing(format: &str, default_level: &str) {
    // The journal natively under systemd (JOURNAL_STREAM is stderr), else text or JSON.
    rsql_agent::logging::init(format, default_level);
}

/// Says what went wrong on stderr and gives its exit code (see [`rsql_agent::exit`]).
fn fail<E>(e: &E) -> Exit
where
    E: std::error::Error,
    for<'a> Exit: From<&'a E>,
{
    // An error can quote a database, AWS or a job: escaped for the terminal.
    eprintln!("rsql-agent: {}", terminal_text(&error_chain(e)));
    Exit::from(e)
}

fn check_config(path: &Path) -> Exit {
    match Config::load(path) {
        Ok(config) => {
            println!("{}: OK", path.display());
            for warning in &config.warnings {
                println!("  warning:    {warning}");
            }
            println!("  script_dir: {}", config.jobs.script_dir.display());
            println!("  state_dir:  {}", config.agent.state_dir.display());
            println!("  lock dir:   {}", config.lock.dir.display());
            println!(
                "  intake:     {}",
                config
                    .sqs
                    .as_ref()
                    .map(|s| format!("SQS {}", s.queue_url))
                    .unwrap_or_else(|| "no SQS".into())
            );
            if let Some(socket) = &config.socket {
                println!("  socket:     {}", socket.path.display());
            }
            // What jobs would get from cgroups, for owners started the way `run` would
            // start them from here (under systemd's ExecStartPre: as units).
            let launcher = rsql_agent::job_owner::launch::Launcher::choose(config.jobs.launcher);
            println!(
                "  cgroups:    {} (job owners started by: {})",
                launcher.cgroup_capability(&config.jobs).describe(),
                launcher.name()
            );
            match launcher.job_user(config.jobs.user.as_deref()) {
                Ok(Some(user)) => println!(
                    "  jobs run as: {} (uid {}, gid {})",
                    user.name, user.uid, user.gid
                ),
                Ok(None) => println!(
                    "  jobs run as: the agent's own user (no [jobs] user; a job could then control the agent and other jobs)"
                ),
                Err(e) => {
                    eprintln!("rsql-agent: {e}");
                    return Exit::Config;
                }
            }
            if let Some(runtime) = runtime() {
                let detected = runtime.block_on(rsql_agent::fleet::detect(&config.fleet));
                println!("  fleet:      {detected}");
            }
            Exit::Ok
        }
        Err(e) => fail(&e),
    }
}

/// `rsql-agent drain`: exit 0 once intake is stopped (with `--wait`: once no job runs and
/// the outbox is empty), 69 when the agent cannot be reached or whoever listens on its socket
/// is not root, this user or the agent's user (nothing is sent then), 78 for a bad config.
fn drain(path: &Path, wait: bool) -> Exit {
    use rsql_agent::daemon::control::{ask, ControlRequest};
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let Some(runtime) = runtime() else {
        return Exit::Software;
    };
    let state_dir = config.agent.state_dir.clone();
    runtime.block_on(async move {
        let mut reply = match ask(&state_dir, ControlRequest::Drain).await {
            Ok(reply) => reply,
            Err(e) => return fail(&e),
        };
        println!(
            "draining: intake stopped; {} job(s) running, {} report(s) in the outbox",
            reply.running, reply.outbox
        );
        if !wait {
            return Exit::Ok;
        }
        let mut last = (reply.running, reply.outbox);
        while reply.running > 0 || reply.outbox > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            reply = match ask(&state_dir, ControlRequest::Status).await {
                Ok(reply) => reply,
                Err(e) => return fail(&e),
            };
            if (reply.running, reply.outbox) != last {
                last = (reply.running, reply.outbox);
                println!(
                    "{} job(s) running, {} report(s) in the outbox",
                    reply.running, reply.outbox
                );
            }
        }
        println!("drained: no job runs and every report is delivered");
        Exit::Ok
    })
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("rsql-agent: cannot start the async runtime: {e}");
            None
        }
    }
}

fn daemon_run(path: &Path) -> Exit {
    let config = match Config::load(path) {
        Ok(c) => Arc::new(c),
        Err(e) => return fail(&e),
    };
    // Read while this process has one thread, then removed from its environment: nothing
    // the agent starts may talk to systemd in its name (systemd would log "reception only
    // permitted for main PID" at every job start).
    let notifier = rsql_agent::notify::Notifier::from_env();
    rsql_agent::notify::forget_env();
    let Some(runtime) = runtime() else {
        return Exit::Software;
    };
    runtime.block_on(async move {
        let parts = match rsql_agent::startup::open(&config).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot start");
                return Exit::from(&e);
            }
        };
        let (controls, clients, attempts, instance_id, source) = (
            parts.controls,
            parts.clients,
            parts.attempts,
            parts.instance_id,
            parts.instance_id_source,
        );
        let daemon = match rsql_agent::daemon::Daemon::new(config.clone(), attempts, &clients) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot start");
                return Exit::from(&e);
            }
        };
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            instance_id = %instance_id,
            instance_id_source = ?source,
            config = %path.display(),
            "rsql-agent started"
        );
        for warning in &config.warnings {
            tracing::warn!(config = %path.display(), "{warning}");
        }
        match daemon.with_notifier(notifier).run(controls).await {
            Ok(()) => {
                tracing::info!("rsql-agent stopped");
                Exit::Ok
            }
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "rsql-agent failed");
                Exit::from(&e)
            }
        }
    })
}

/// `rsql-agent scripts check`: findings on stdout, one a line, then a summary.
fn scripts_check(dir: &Path, config_path: Option<&Path>) -> Exit {
    use rsql_agent::scripts_check::{check_dir, CheckSettings};
    let settings = match config_path {
        None => CheckSettings {
            interpreter: PathBuf::from("/bin/bash"),
            legacy: None,
        },
        Some(path) => match Config::load(path) {
            Ok(config) => CheckSettings {
                interpreter: config.jobs.interpreter.clone(),
                legacy: config.jobs.legacy.clone(),
            },
            Err(e) => return fail(&e),
        },
    };
    let report = match check_dir(dir, &settings) {
        Ok(report) => report,
        Err(e) => return fail(&e),
    };
    for finding in &report.findings {
        // A file's name is anyone's choice: escaped for the terminal.
        println!("{}", terminal_text(&finding.to_string()));
    }
    let errors = report.errors();
    println!(
        "{} script(s) checked in {}: {errors} error(s), {} warning(s)",
        report.scripts,
        dir.display(),
        report.findings.len() - errors
    );
    if errors > 0 {
        Exit::JobFailed
    } else {
        Exit::Ok
    }
}

/// `rsql-agent workflow run`: 0 when every job completed, 1 when one failed, 130 when a
/// signal stopped the run (see [`workflow::Runner::run`] for what each signal does).
fn workflow_run(file: &Path, config_path: Option<&Path>, options: RunOptions) -> Exit {
    let (workflow, config) = match workflow_inputs(file, config_path) {
        Ok(inputs) => inputs,
        Err(code) => return code,
    };
    let Some(runtime) = runtime() else {
        return Exit::Software;
    };
    runtime.block_on(async move {
        // First, so that a Ctrl-C while the runner is being set up is kept, not lost.
        let controls = match Controls::install() {
            Ok(c) => c,
            Err(e) => return fail(&e),
        };
        let runner = match workflow_runner(config).await {
            Ok(r) => r,
            Err(code) => return code,
        };
        match runner.run(&workflow, &options, controls).await {
            Ok(report) => print_summary(file, &report),
            Err(e) => fail(&e),
        }
    })
}

/// The workflow file, and the agent config (the given file, or the per-user defaults with
/// the scripts next to the workflow file).
fn workflow_inputs(
    file: &Path,
    config_path: Option<&Path>,
) -> Result<(WorkflowConfig, Arc<Config>), Exit> {
    let workflow = WorkflowConfig::load(file).map_err(|e| fail(&e))?;
    let config = match config_path {
        Some(path) => Config::load(path),
        None => {
            let dir = file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            Config::defaults_for_user(dir)
        }
    };
    let config = config.map_err(|e| fail(&e))?;
    Ok((workflow, Arc::new(config)))
}

/// A runner on this host: its own supervisor, the attempt context, the local audit and,
/// with `[database] secret_id`, the database credentials resolved once from Secrets
/// Manager, as the daemon does.
async fn workflow_runner(config: Arc<Config>) -> Result<Runner, Exit> {
    let supervisor = Supervisor::new().map_err(|e| fail(&e))?;
    let instance_id = config
        .agent
        .instance_id
        .clone()
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "localhost".to_string());
    let attempts =
        AttemptContext::new(config.clone(), Some(supervisor), instance_id).map_err(|e| fail(&e))?;
    let runner = Runner::new(config.clone(), Arc::new(attempts), Arc::new(print_progress))
        .map_err(|e| fail(&e))?;
    if config.database.secret_id.is_none() {
        return Ok(runner);
    }
    let sdk = rsql_agent::aws::load_config().await;
    let database = rsql_agent::secrets::DatabaseEnv::new(
        config.database.clone(),
        Some(rsql_agent::aws::AwsClients::new(&sdk).secrets),
    );
    let env = database.job_env().await.map_err(|e| fail(&e))?;
    Ok(runner.with_database_env(env))
}

/// Prints the summary table and the verdict (with how to resume), and gives the exit code.
fn print_summary(file: &Path, report: &WorkflowReport) -> Exit {
    println!();
    print!("{}", report.table());
    println!();
    let code = if report.interrupted {
        Exit::Interrupted
    } else if report.succeeded() {
        Exit::Ok
    } else {
        Exit::JobFailed
    };
    let done = report
        .jobs
        .iter()
        .filter(|j| {
            matches!(
                j.status,
                workflow::JobStatus::Completed | workflow::JobStatus::CompletedEarlier
            )
        })
        .count();
    let verdict = format!(
        "workflow {} execution {}: {} ({done}/{} jobs completed)",
        report.workflow_id,
        report.workflow_execution_id,
        match code {
            Exit::Ok => "completed",
            Exit::Interrupted => "INTERRUPTED",
            _ => "FAILED",
        },
        report.jobs.len()
    );
    println!("{}", terminal_text(&verdict));
    if code != Exit::Ok {
        let resume = format!(
            "resume with: rsql-agent workflow run {} --resume {}",
            file.display(),
            report.workflow_execution_id
        );
        println!("{}", terminal_text(&resume));
    }
    code
}

enum ReportSource {
    Aws {
        state_machine: String,
        job_table: String,
        workflow_table: Option<String>,
    },
    Local {
        config: Option<PathBuf>,
    },
}

/// `rsql-agent workflow report`: 0 when written; 69 when the execution is unknown; 66/78 for
/// a bad config; 74 when the file cannot be written; 76 for a failed AWS call.
fn workflow_report(
    execution_id: &str,
    source: ReportSource,
    format: &str,
    output: Option<&Path>,
) -> Exit {
    use rsql_agent::workflow::report;
    let timeline = match source {
        ReportSource::Aws {
            state_machine,
            job_table,
            workflow_table,
        } => match orchestrate::timeline(
            execution_id,
            &state_machine,
            &job_table,
            workflow_table.as_deref(),
        ) {
            Ok(t) => t,
            Err(code) => return code,
        },
        ReportSource::Local { config } => {
            let config = match config {
                Some(path) => Config::load(&path),
                None => Config::defaults_for_user(Path::new(".")),
            };
            let config = match config {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            match report::local::load(&config.agent.state_dir, execution_id) {
                Ok(t) => t,
                Err(e) => return fail(&e),
            }
        }
    };
    let rendered = match format {
        "text" => report::text::render(&timeline),
        _ => report::html::render(&timeline),
    };
    match output {
        None => {
            print!("{rendered}");
            Exit::Ok
        }
        Some(path) => match std::fs::write(path, rendered) {
            Ok(()) => {
                let (done, total) = timeline.completed_jobs();
                let wrote = format!(
                    "wrote {}: workflow {}, execution {}, {}, {done}/{total} jobs completed",
                    path.display(),
                    timeline.workflow_id,
                    timeline.execution_id,
                    timeline.status
                );
                eprintln!("{}", terminal_text(&wrote));
                Exit::Ok
            }
            Err(e) => {
                eprintln!("rsql-agent: cannot write {}: {e}", path.display());
                Exit::Io
            }
        },
    }
}

fn clock() -> String {
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    // 2026-11-25T19:42:19.123Z -> 19:42:19.123
    now.get(11..23).unwrap_or(&now).to_string()
}

/// Prints one progress event; names, ids and error text come from the workflow file and the
/// jobs, so each line is escaped for the terminal.
fn print_progress(event: Progress) {
    let (line, to_stderr) = progress_line(event);
    if to_stderr {
        eprintln!("{}", terminal_text(&line));
    } else {
        println!("{}", terminal_text(&line));
    }
}

fn progress_line(event: Progress) -> (String, bool) {
    match event {
        Progress::Started {
            workflow_id,
            workflow_execution_id,
            resumed,
        } => (
            format!(
                "{} workflow {workflow_id}, execution {workflow_execution_id}",
                if resumed { "resuming" } else { "running" }
            ),
            false,
        ),
        Progress::Stage {
            stage,
            of,
            description,
            execution_type,
            enabled,
        } => (
            format!(
                "\nstage {stage}/{of}: {description} ({}){}",
                match execution_type {
                    workflow::ExecutionType::Sequential => "sequential",
                    workflow::ExecutionType::Parallel => "parallel",
                },
                if enabled {
                    ""
                } else {
                    " — disabled, execution_flag is not \"y\""
                }
            ),
            false,
        ),
        Progress::JobStarted {
            job_name, log_file, ..
        } => (
            format!(
                "  {}  start      {job_name}  (log {})",
                clock(),
                log_file.display()
            ),
            false,
        ),
        Progress::JobFinished(report) => {
            let duration = report
                .duration
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_default();
            let exit = report
                .exit_code
                .map(|c| format!("exit {c}"))
                .unwrap_or_else(|| "no exit code".into());
            let line = format!(
                "  {}  {:<9}  {}  {exit}, {duration}{}",
                clock(),
                report.status.as_str(),
                report.job_name,
                report
                    .error_message
                    .map(|m| format!("\n      {m}"))
                    .unwrap_or_default()
            );
            (line, false)
        }
        Progress::JobSkipped(report) => (
            format!(
                "  {}  skipped    {}  ({})",
                clock(),
                report.job_name,
                report.status.as_str()
            ),
            false,
        ),
        // On stderr, as the signal's answer; stdout stays the run's record.
        Progress::Stopping { now: false } => (
            "rsql-agent: interrupted: stopping the running jobs (SIGTERM, then SIGKILL after \
             kill_grace); they are reported Rsql.Interrupted and nothing more starts. \
             Interrupt again to kill them now."
                .to_string(),
            true,
        ),
        Progress::Stopping { now: true } => (
            "rsql-agent: interrupted again: killing the running jobs now (they are still \
             reported). A third interrupt ends rsql-agent at once."
                .to_string(),
            true,
        ),
    }
}

/// `workflow put-config | start | status`: the AWS side of workflows.
mod orchestrate {
    use std::path::Path;

    use rsql_agent::exit::Exit;
    use rsql_agent::workflow::aws::{OrchestrateError, Orchestrator};
    use rsql_agent::workflow::{self, WorkflowConfig};

    use super::{fail, runtime};

    fn run<T>(
        work: impl std::future::Future<Output = Result<T, OrchestrateError>>,
    ) -> Result<T, Exit> {
        let Some(rt) = runtime() else {
            return Err(Exit::Software);
        };
        rt.block_on(work).map_err(|e| fail(&e))
    }

    pub fn put_config(file: &Path, table: &str) -> Exit {
        let result = run(async {
            let config = WorkflowConfig::load(file)?;
            Orchestrator::from_env()
                .await
                .put_config(table, &config)
                .await?;
            Ok(config)
        });
        match result {
            Ok(config) => {
                let jobs: usize = config.workflow_stages.iter().map(|s| s.scripts.len()).sum();
                println!(
                    "workflow {} ({} stages, {jobs} jobs) written to {table}",
                    config.workflow_id,
                    config.workflow_stages.len()
                );
                Exit::Ok
            }
            Err(code) => code,
        }
    }

    pub fn start(
        workflow_id: &str,
        execution_id: Option<String>,
        state_machine: &str,
        config_table: Option<&str>,
    ) -> Exit {
        let execution_id = execution_id.unwrap_or_else(|| workflow::new_execution_id(workflow_id));
        let result = run(async {
            Orchestrator::from_env()
                .await
                .start(state_machine, workflow_id, &execution_id, config_table)
                .await
        });
        match result {
            Ok(arn) => {
                let started = format!("started workflow {workflow_id}, execution {execution_id}");
                eprintln!("{}", super::terminal_text(&started));
                println!("{}", super::terminal_text(&arn));
                Exit::Ok
            }
            Err(code) => code,
        }
    }

    pub fn timeline(
        execution_id: &str,
        state_machine: &str,
        job_table: &str,
        workflow_table: Option<&str>,
    ) -> Result<rsql_agent::workflow::report::Timeline, Exit> {
        run(async {
            Orchestrator::from_env()
                .await
                .timeline(state_machine, execution_id, job_table, workflow_table)
                .await
        })
    }

    pub fn status(
        execution_id: &str,
        state_machine: &str,
        job_table: &str,
        workflow_table: Option<&str>,
    ) -> Exit {
        let result = run(async {
            Orchestrator::from_env()
                .await
                .status(state_machine, execution_id, job_table, workflow_table)
                .await
        });
        match result {
            Ok(report) => {
                print!("{}", super::terminal_text(&report.render()));
                Exit::Ok
            }
            Err(code) => code,
        }
    }
}
