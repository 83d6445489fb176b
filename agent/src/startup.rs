//! The parts every job-running process builds the same way at start: the signal controls,
//! the AWS clients, the instance id and the attempt context. Shared by `rsql-agent run` and
//! `rsql-wrapper run`, so the two cannot drift apart.

use std::sync::Arc;

use crate::attempt::{AttemptContext, AttemptError};
use crate::aws::{self, AwsClients};
use crate::cgroup::Level;
use crate::config::Config;
use crate::identity;
use crate::job_owner::launch::Launcher;
use crate::signals::{Controls, SignalError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen for signals")]
    Signals(#[source] SignalError),
    #[error("cannot open the state directories")]
    StateDirs(#[source] AttemptError),
}

/// What [`open`] built.
#[derive(Debug)]
pub struct Parts {
    /// What the process's signals ask for (see `signals`).
    pub controls: Controls,
    pub clients: AwsClients,
    pub attempts: Arc<AttemptContext>,
    pub instance_id: String,
    pub instance_id_source: identity::Source,
}

/// Says at start what jobs get from cgroups here (see `cgroup`): nothing, v2 without the
/// memory controller, or all of it; and, where that falls short of the config, what is
/// lost.
fn log_job_cgroups(config: &Config) {
    let launcher = Launcher::choose(config.jobs.launcher);
    let found = launcher.cgroup_capability(&config.jobs);
    let level = found.level();
    let detail = found.describe();
    match level {
        Level::Full => {
            tracing::info!(cgroups = %level, launcher = launcher.name(), "job cgroups: {detail}")
        }
        Level::V2WithoutMemory if config.jobs.memory_max.is_some() => tracing::warn!(
            cgroups = %level,
            launcher = launcher.name(),
            "job cgroups: {detail}; [jobs] memory_max cannot be enforced"
        ),
        Level::V2WithoutMemory => {
            tracing::info!(cgroups = %level, launcher = launcher.name(), "job cgroups: {detail}")
        }
        Level::None => tracing::warn!(
            cgroups = %level,
            launcher = launcher.name(),
            "job cgroups: {detail}; falling back to the process group and marker sweep"
        ),
    }
}

/// Raises the soft open-file limit to the hard one: the socket intake takes a quarter of it
/// at most (`intake::socket::max_connections`), the rest is the budget of everything else.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // glibc's select() and some libraries misbehave above this; systemd uses the same cap.
    let wanted = hard.min(512 * 1024);
    if wanted > soft {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            return;
        }
    }
    tracing::debug!(open_files = wanted.max(soft), "open-file limit");
}

/// Builds the parts for `config`. Must run inside the tokio runtime.
pub async fn open(config: &Arc<Config>) -> Result<Parts, StartError> {
    // First, so a SIGTERM or SIGHUP during start-up is seen by the job runner instead of
    // ending the process.
    let controls = Controls::install().map_err(StartError::Signals)?;
    let sdk = aws::load_config().await;
    let clients = AwsClients::new(&sdk);
    let (instance_id, instance_id_source) =
        identity::instance_id(config.agent.instance_id.as_deref()).await;
    // No supervisor here: this process is not the jobs' parent, and must not be a child
    // subreaper either, or the owners it launches would be re-parented to it.
    let attempts = AttemptContext::new(config.clone(), None, instance_id.clone())
        .map_err(StartError::StateDirs)?;
    log_job_cgroups(config);
    raise_open_file_limit();
    Ok(Parts {
        controls,
        clients,
        attempts: Arc::new(attempts),
        instance_id,
        instance_id_source,
    })
}
