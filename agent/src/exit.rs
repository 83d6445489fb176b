//! The exit codes of `rsql-agent` and `rsql-wrapper`: one table for both binaries, one
//! meaning a code, and every typed error mapped to its code once, here.
//!
//! | code | [`Exit`] | meaning |
//! |---|---|---|
//! | 0   | `Ok`          | success: the config is valid, every job of the workflow completed, the job completed and was reported (`rsql-wrapper run`), the job was accepted (`rsql-wrapper submit`), or the daemon stopped cleanly |
//! | 1   | `JobFailed`   | a job failed (or its task was closed upstream) and that was reported; `scripts check` found errors |
//! | 2   | `Usage`       | bad command-line usage; the message names the argument |
//! | 3   | `Rejected`    | the job was refused as invalid, or the submitter is not allowed; sending it again does not help (a job with a token had its task failed as `Rsql.InvalidJob`) |
//! | 65  | `Data`        | the workflow file or the workflow item is not a valid workflow config, or names a job that cannot run |
//! | 66  | `NoInput`     | an input file (workflow, config, scripts folder) does not exist or cannot be read |
//! | 69  | `Unavailable` | what the command names is not there: a table, a workflow in the config table, the state machine, the execution (on AWS or in the local audit), or the running agent (no socket, nobody trusted listening, no reply) |
//! | 70  | `Software`    | internal error (a bug: please report it with the log) |
//! | 74  | `Io`          | the state, audit, log or outbox directories cannot be written, or the output file |
//! | 75  | `Busy`        | try again later: the job is running elsewhere (its lock is held), another process owns the state directory, or the agent is busy or shutting down |
//! | 76  | `Remote`      | an AWS call failed (network, credentials, permissions, throttling); the message says which. For `rsql-wrapper run`: the outcome is stored but was not delivered in time, and goes out after the next start |
//! | 78  | `Config`      | the configuration is invalid: the config file (the message names the key), no intake configured, or a database secret that is not the Redshift JSON shape |
//! | 130 | `Interrupted` | stopped by SIGINT or SIGTERM; the running jobs were stopped and reported `Rsql.Interrupted` |
//!
//! Owns: the codes and the error-to-code mapping. Must not touch: printing; the binaries say
//! what went wrong (with [`crate::error_chain`]) and return the code.

use crate::attempt::AttemptError;
use crate::config::ConfigError;
use crate::daemon::control::DrainError;
use crate::daemon::DaemonError;
use crate::scripts_check::CheckError;
use crate::secrets::SecretError;
use crate::signals::SignalError;
use crate::startup::StartError;
use crate::state_dir_lock::StateDirLockError;
use crate::supervisor::SupervisorError;
use crate::workflow::aws::OrchestrateError;
use crate::workflow::report::local::LocalReportError;
use crate::workflow::WorkflowError;

/// How a command ended, as its exit code (the discriminant). See the module's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    JobFailed = 1,
    Usage = 2,
    Rejected = 3,
    Data = 65,
    NoInput = 66,
    Unavailable = 69,
    Software = 70,
    Io = 74,
    Busy = 75,
    Remote = 76,
    Config = 78,
    Interrupted = 130,
}

impl Exit {
    /// Every code, in the table's order.
    pub const ALL: [Exit; 13] = [
        Exit::Ok,
        Exit::JobFailed,
        Exit::Usage,
        Exit::Rejected,
        Exit::Data,
        Exit::NoInput,
        Exit::Unavailable,
        Exit::Software,
        Exit::Io,
        Exit::Busy,
        Exit::Remote,
        Exit::Config,
        Exit::Interrupted,
    ];

    pub const fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

impl From<&ConfigError> for Exit {
    fn from(e: &ConfigError) -> Exit {
        match e {
            ConfigError::Read { .. } => Exit::NoInput,
            ConfigError::Parse { .. } | ConfigError::Invalid { .. } => Exit::Config,
        }
    }
}

impl From<&SignalError> for Exit {
    fn from(_: &SignalError) -> Exit {
        Exit::Software
    }
}

impl From<&SupervisorError> for Exit {
    /// Only [`crate::supervisor::Supervisor::new`] fails before a job exists: the subreaper
    /// or the spawner thread, both internal.
    fn from(_: &SupervisorError) -> Exit {
        Exit::Software
    }
}

impl From<&StartError> for Exit {
    fn from(e: &StartError) -> Exit {
        match e {
            StartError::Signals(e) => e.into(),
            StartError::StateDirs(_) => Exit::Io,
        }
    }
}

impl From<&AttemptError> for Exit {
    fn from(e: &AttemptError) -> Exit {
        match e {
            AttemptError::Busy { .. } => Exit::Busy,
            AttemptError::Panicked(_) | AttemptError::NoSupervisor => Exit::Software,
            AttemptError::Lock { .. }
            | AttemptError::Log { .. }
            | AttemptError::Supervisor { .. }
            | AttemptError::Audit(_) => Exit::Io,
        }
    }
}

impl From<&DaemonError> for Exit {
    fn from(e: &DaemonError) -> Exit {
        match e {
            DaemonError::NoIntake | DaemonError::JobUser(_) => Exit::Config,
            DaemonError::Owner(StateDirLockError::InUse { .. }) => Exit::Busy,
            DaemonError::Attempt(e) => e.into(),
            DaemonError::Socket(_)
            | DaemonError::Outbox(_)
            | DaemonError::Shipper(_)
            | DaemonError::Owner(_)
            | DaemonError::OwnersDir { .. } => Exit::Io,
        }
    }
}

impl From<&DrainError> for Exit {
    fn from(_: &DrainError) -> Exit {
        Exit::Unavailable
    }
}

impl From<&WorkflowError> for Exit {
    fn from(e: &WorkflowError) -> Exit {
        match e {
            WorkflowError::Read { .. } => Exit::NoInput,
            WorkflowError::Parse { .. }
            | WorkflowError::Invalid { .. }
            | WorkflowError::Job { .. }
            | WorkflowError::NothingToResume { .. } => Exit::Data,
            WorkflowError::Audit(_) => Exit::Io,
            WorkflowError::Attempt(e) => e.into(),
        }
    }
}

impl From<&OrchestrateError> for Exit {
    fn from(e: &OrchestrateError) -> Exit {
        match e {
            OrchestrateError::Config(e) => e.into(),
            OrchestrateError::BadItem { .. }
            | OrchestrateError::ExecutionExists { .. }
            | OrchestrateError::Invalid { .. }
            | OrchestrateError::Missing { .. } => Exit::Data,
            OrchestrateError::NoTable { .. }
            | OrchestrateError::UnknownWorkflow { .. }
            | OrchestrateError::NoStateMachine { .. }
            | OrchestrateError::NoExecution { .. } => Exit::Unavailable,
            OrchestrateError::Aws { .. } => Exit::Remote,
        }
    }
}

impl From<&LocalReportError> for Exit {
    fn from(e: &LocalReportError) -> Exit {
        match e {
            LocalReportError::NoExecution { .. } => Exit::Unavailable,
            LocalReportError::Audit(_) => Exit::Io,
        }
    }
}

impl From<&SecretError> for Exit {
    fn from(e: &SecretError) -> Exit {
        match e {
            SecretError::Fetch { .. } => Exit::Remote,
            SecretError::NoString { .. } | SecretError::Shape { .. } => Exit::Config,
        }
    }
}

impl From<&CheckError> for Exit {
    fn from(e: &CheckError) -> Exit {
        match e {
            CheckError::Read { .. } => Exit::NoInput,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_means_one_thing_and_the_table_lists_each_once() {
        let mut codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Exit::ALL.len());
        let doc = include_str!("exit.rs");
        for exit in Exit::ALL {
            let row = format!("//! | {:<3} | `{exit:?}`", exit.code());
            assert_eq!(doc.matches(&row).count(), 1, "the table's row for {exit:?}");
        }
    }

    #[test]
    fn a_missing_file_and_a_bad_one_are_told_apart() {
        let missing = ConfigError::Read {
            path: "/nonexistent/agent.toml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(Exit::from(&missing), Exit::NoInput);
        let busy = WorkflowError::Attempt(AttemptError::Busy {
            job_name: "a.sh".into(),
            lock_key: "e/a.sh".into(),
            holder: "pid 1".into(),
            state: None,
        });
        assert_eq!(Exit::from(&busy), Exit::Busy);
    }
}
