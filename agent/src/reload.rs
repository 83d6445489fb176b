//! What a config reload (SIGHUP) may change while the daemon runs, and what needs a restart.
//!
//! Owns: the split of config keys into those that are safe to change live (they are read
//! afresh for every new job, by housekeeping, or at shutdown) and those that are not (they
//! were baked into clients, directories or open files at start-up), and the merge of a new
//! file into the running config. Keys of the second kind keep their running values.
//!
//! Must not touch: reading the file or applying the result; the daemon does both.

use crate::config::Config;

/// Keys that take effect on reload: for jobs that start from then on (running jobs keep the
/// settings they started with), for the next housekeeping pass, and for the next shutdown.
pub const RELOADABLE: &[&str] = &[
    "agent.max_concurrent_jobs",
    "jobs.default_timeout",
    "jobs.kill_grace",
    "jobs.interpreter",
    "jobs.heartbeat_interval",
    "jobs.on_interrupted",
    "jobs.log_retention",
    "jobs.log_max_total_mb",
    "jobs.pipe_drain",
    "jobs.cgroup",
    "jobs.cgroup_parent",
    "jobs.memory_max",
    "lock.retention",
];

/// The outcome of comparing the running config with a newly read one.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The config to run with from now on: the new values of reloadable keys, the running
    /// values of everything else.
    pub config: Config,
    /// Reloadable keys whose value changed.
    pub applied: Vec<&'static str>,
    /// Keys that changed but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Compares `running` with `new` and merges what may change live.
pub fn plan(running: &Config, new: &Config) -> Plan {
    let mut config = running.clone();
    let mut applied = Vec::new();
    let mut needs_restart = Vec::new();

    macro_rules! live {
        ($key:literal, $($field:ident).+) => {
            if running.$($field).+ != new.$($field).+ {
                config.$($field).+ = new.$($field).+.clone();
                applied.push($key);
            }
        };
    }
    macro_rules! restart {
        ($key:literal, $($field:ident).+) => {
            if running.$($field).+ != new.$($field).+ {
                needs_restart.push($key);
            }
        };
    }

    live!("agent.max_concurrent_jobs", agent.max_concurrent_jobs);
    live!("jobs.default_timeout", jobs.default_timeout);
    live!("jobs.kill_grace", jobs.kill_grace);
    live!("jobs.interpreter", jobs.interpreter);
    live!("jobs.heartbeat_interval", jobs.heartbeat_interval);
    live!("jobs.on_interrupted", jobs.on_interrupted);
    live!("jobs.log_retention", jobs.log_retention);
    live!("jobs.log_max_total_mb", jobs.log_max_total_bytes);
    live!("jobs.pipe_drain", jobs.pipe_drain);
    live!("jobs.cgroup", jobs.cgroup);
    live!("jobs.cgroup_parent", jobs.cgroup_parent);
    live!("jobs.memory_max", jobs.memory_max);
    live!("lock.retention", lock.retention);

    restart!("agent.state_dir", agent.state_dir);
    restart!("agent.instance_id", agent.instance_id);
    restart!("jobs.script_dir", jobs.script_dir);
    restart!("jobs.log_dir", jobs.log_dir);
    restart!("intake.sqs", sqs);
    restart!("intake.socket", socket);
    restart!("lock.dir", lock.dir);
    restart!("logs.cloudwatch", cloudwatch);
    restart!("report.audit", audit);
    restart!("database", database);
    restart!("fleet", fleet);

    Plan {
        config,
        applied,
        needs_restart,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    fn parse(dir: &Path, extra: &str) -> Config {
        let text = format!(
            "[agent]\nstate_dir = \"/var/lib/x\"\n{extra}\n[jobs]\nscript_dir = \"{}\"\n",
            dir.display()
        );
        Config::parse(&text, Path::new("agent.toml")).expect("valid config")
    }

    #[test]
    fn live_keys_apply_and_restart_keys_keep_their_running_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let running = parse(dir.path(), "max_concurrent_jobs = 4");
        let mut new = parse(dir.path(), "max_concurrent_jobs = 2");
        new.agent.state_dir = "/elsewhere".into();
        new.jobs.kill_grace = Duration::from_secs(9);
        let plan = plan(&running, &new);
        assert_eq!(
            plan.applied,
            vec!["agent.max_concurrent_jobs", "jobs.kill_grace"]
        );
        assert_eq!(plan.needs_restart, vec!["agent.state_dir"]);
        assert_eq!(plan.config.agent.max_concurrent_jobs, 2);
        assert_eq!(plan.config.jobs.kill_grace, Duration::from_secs(9));
        assert_eq!(plan.config.agent.state_dir, Path::new("/var/lib/x"));
        for key in &plan.applied {
            assert!(RELOADABLE.contains(key), "{key}");
        }
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let running = parse(dir.path(), "");
        let plan = plan(&running, &running.clone());
        assert!(plan.applied.is_empty() && plan.needs_restart.is_empty());
    }
}
