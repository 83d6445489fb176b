//! The old `rsql_trigger.sh` form: its 11 positional arguments, turned into the same job
//! `submit` hands over, or into a standalone run.

use super::*;

/// How long the legacy form keeps asking a busy agent before it fails the task: the old
/// trigger ran every job at once, and its invoke Lambda never retries.
pub(super) const LEGACY_BUSY_WAIT: Duration = Duration::from_secs(12 * 3600);

/// The legacy `rsql_trigger.sh` positional arguments, in order.
pub(super) const LEGACY_ARGS: [&str; 11] = [
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

/// The legacy `rsql_trigger.sh` form, mapped onto `submit`; with no agent reachable, onto
/// `run`, and failing that, onto a failed task.
pub(super) fn legacy(args: &[OsString]) -> Exit {
    let mut job = match legacy_job(args) {
        Ok(job) => job,
        Err(code) => return code,
    };
    let socket = default_socket();
    // The old invoke Lambda never retries, so a task this call does not settle waits for its
    // timeout: a busy agent is asked again, and a job nothing could be handed to fails its
    // task at once.
    let busy_until = std::time::Instant::now() + LEGACY_BUSY_WAIT;
    let mut pause = Duration::from_secs(1);
    let reason = loop {
        let sent = submit_job(Submit {
            job,
            socket: Some(socket.clone()),
            agent_user: None,
        });
        job = sent.job;
        match (sent.code, sent.delivery) {
            (Exit::Busy, _) if std::time::Instant::now() < busy_until => {
                eprintln!("rsql-wrapper: the agent is busy; asking again in {pause:?}");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(30));
            }
            (Exit::Busy, _) => {
                break format!("every job slot of the agent stayed busy for {LEGACY_BUSY_WAIT:?}")
            }
            // Nothing listens: no agent on this host. Run the job here.
            (_, Delivery::Absent) => return legacy_standalone(job, &socket),
            // Handed over (accepted, or refused by the agent, which fails an invalid job's
            // task itself), or perhaps handed over (no reply): the agent reports it. Never
            // run it a second time here.
            (code, Delivery::Sent) => return code,
            (code, Delivery::NotSent) => {
                break format!(
                    "the job could not be handed to the agent (exit {})",
                    code.code()
                )
            }
        }
    };
    fail_unrun_task(&job.task_token, &socket, &reason);
    Exit::Unavailable
}

/// The legacy form with no agent on the host: the job runs here, standalone; if even that
/// cannot start, its task is failed at once.
pub(super) fn legacy_standalone(job: JobArgs, socket: &Path) -> Exit {
    eprintln!(
        "rsql-wrapper: no agent at {}: running the job here, standalone, with {}",
        socket.display(),
        config_path(None).display()
    );
    let token = job.task_token.clone();
    let run = Run {
        job,
        config: None,
        report_timeout_seconds: 300,
        log_format: "text".to_string(),
    };
    match run_job(run) {
        RunEnd::Settled(code) => code,
        RunEnd::NotSettled(_, reason) => {
            fail_unrun_task(&token, socket, &reason);
            Exit::Unavailable
        }
    }
}

/// `rsql-wrapper run [OPTIONS] TOKEN ... REGION [SCRIPT_ARGS...]`: `None` when `args` (after
/// `run`) is the option form; else the options and the positional arguments.
#[allow(clippy::type_complexity)]
pub(super) fn legacy_run_form(
    args: &[OsString],
) -> Option<Result<(RunOptions, Vec<OsString>), String>> {
    let mut options = RunOptions::default();
    let mut i = 0;
    while i < args.len() {
        let Some(arg) = args[i].to_str() else {
            break;
        };
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value.to_string())),
            _ => (arg, None),
        };
        if !matches!(
            name,
            "--config" | "--report-timeout-seconds" | "--log-format"
        ) {
            break;
        }
        let value = match inline {
            Some(value) => value,
            None => {
                i += 1;
                match args.get(i).and_then(|v| v.to_str()) {
                    Some(value) => value.to_string(),
                    None => return Some(Err(format!("{name} needs a value"))),
                }
            }
        };
        match name {
            "--config" => options.config = Some(PathBuf::from(value)),
            "--report-timeout-seconds" => match value.parse() {
                Ok(n) => options.report_timeout_seconds = Some(n),
                Err(_) => {
                    return Some(Err(format!(
                        "--report-timeout-seconds {value:?} is not a whole number"
                    )))
                }
            },
            _ if value == "text" || value == "json" => options.log_format = Some(value),
            _ => return Some(Err(format!("--log-format {value:?}: give text or json"))),
        }
        i += 1;
    }
    let rest = &args[i..];
    let first = rest.first()?.to_str().unwrap_or("x");
    if first.starts_with('-') {
        return None;
    }
    Some(Ok((options, rest.to_vec())))
}

/// The options `run` takes before the legacy positional arguments.
#[derive(Debug, Default)]
pub(super) struct RunOptions {
    pub(super) config: Option<PathBuf>,
    pub(super) report_timeout_seconds: Option<u64>,
    pub(super) log_format: Option<String>,
}

/// `rsql-wrapper run` with the legacy positional arguments.
pub(super) fn legacy_run(options: RunOptions, args: &[OsString]) -> Exit {
    let job = match legacy_job(args) {
        Ok(job) => job,
        Err(code) => return code,
    };
    let run = Run {
        job,
        config: options.config,
        report_timeout_seconds: options.report_timeout_seconds.unwrap_or(300),
        log_format: options.log_format.unwrap_or_else(|| "text".to_string()),
    };
    match run_job(run) {
        RunEnd::Settled(code) | RunEnd::NotSettled(code, _) => code,
    }
}

/// The job the legacy positional arguments describe, or the usage error's exit code.
pub(super) fn legacy_job(args: &[OsString]) -> Result<JobArgs, Exit> {
    let mut text = Vec::with_capacity(args.len());
    for (i, arg) in args.iter().enumerate() {
        match arg.to_str() {
            Some(s) => text.push(s.to_string()),
            None => {
                let name = LEGACY_ARGS.get(i).copied().unwrap_or("script argument");
                return Err(usage(&format!(
                    "legacy argument {} ({name}) is not valid UTF-8",
                    i + 1
                )));
            }
        }
    }
    if text.len() < LEGACY_ARGS.len() {
        let missing = LEGACY_ARGS[text.len()];
        return Err(usage(&format!(
            "unknown subcommand {}; as the legacy rsql_trigger.sh form it needs {} positional \
             arguments but got {}: missing argument {} ({missing})",
            // The legacy form's first argument is a task token: never print one.
            if text[0].len() > 40 {
                format!("({} characters)", text[0].len())
            } else {
                format!("{:?}", text[0])
            },
            LEGACY_ARGS.len(),
            text.len(),
            text.len() + 1
        )));
    }
    for (i, name) in LEGACY_ARGS.iter().enumerate().take(3) {
        if text[i].is_empty() {
            return Err(usage(&format!(
                "legacy argument {} ({name}) is empty",
                i + 1
            )));
        }
    }
    let job_name = match legacy_job_name(&text[3], &text[9]) {
        Some(name) => name,
        None => {
            return Err(usage(&format!(
                "legacy argument 4 (script path) {:?} names no script",
                text[3]
            )))
        }
    };
    for i in [4usize, 6, 7, 8, 10] {
        eprintln!(
            "rsql-wrapper: legacy argument {} ({}) = {:?} ignored: the agent's config decides it",
            i + 1,
            LEGACY_ARGS[i],
            text[i]
        );
    }
    eprintln!(
        "rsql-wrapper: legacy script path {:?} is job_name {job_name:?}; the script gets \
         legacy arguments 10 (instance code dir) {:?} and 6 (secret id) {:?} as $1 and $2",
        text[3], text[9], text[5]
    );
    Ok(JobArgs {
        task_token: text[0].clone(),
        workflow_id: text[1].clone(),
        workflow_execution_id: text[2].clone(),
        job_name,
        ssm_command_id: None,
        timeout_seconds: None,
        heartbeat_seconds: None,
        args: text[11..].to_vec(),
        legacy_args: Some([text[9].clone(), text[5].clone()]),
    })
}

/// The script path relative to the instance code dir (the agent's script dir); a path
/// elsewhere, or a bare name, gives its file name.
pub(super) fn legacy_job_name(script: &str, code_dir: &str) -> Option<String> {
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
