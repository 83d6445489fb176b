//! The agent under test: a release-like `rsql-agent run` the figures measure.

use super::*;

/// A release-like `rsql-agent run`: default log level, long polling, audit table, and
/// `[logs.cloudwatch]` when `ship` (the shipper, when built, then runs as in production).
#[derive(Debug)]
pub(super) struct BenchAgent {
    pub(super) child: Option<Child>,
    pub(super) log_path: PathBuf,
    pub(super) _dir: tempfile::TempDir,
}

impl BenchAgent {
    pub(super) fn start(world: &World, proxy: &TimingProxy, ship: bool) -> BenchAgent {
        let dir = tempfile::Builder::new()
            .prefix("rsql-bench-agent-")
            .tempdir()
            .expect("agent dir");
        let state = dir.path().join("state");
        let mut config = format!(
            "[agent]\nstate_dir = \"{state}\"\nmax_concurrent_jobs = 4\ninstance_id = \"i-0bench\"\n\
             shutdown_grace = \"30s\"\n\
             [jobs]\nscript_dir = \"{scripts}\"\nlog_dir = \"{state}/jobs\"\ndefault_timeout = \"10m\"\n\
             kill_grace = \"2s\"\nheartbeat_interval = \"20s\"\n\
             [intake.sqs]\nqueue_url = \"{queue}\"\nwait_time = \"20s\"\nvisibility_timeout = \"120s\"\n\
             [lock]\ndir = \"{locks}\"\n\
             [report.audit]\njob_table = \"{table}\"\n",
            state = state.display(),
            scripts = world.scripts.display(),
            queue = world.agent_queue,
            locks = dir.path().join("locks").display(),
            table = world.table,
        );
        if ship {
            config.push_str(&format!(
                "[logs.cloudwatch]\nlog_group = \"{LOG_GROUP}\"\ncreate_group = true\n"
            ));
        }
        let config_path = dir.path().join("agent.toml");
        std::fs::write(&config_path, config).expect("write agent config");
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod agent config");
        let log_path = dir.path().join("agent.log");
        let log = File::create(&log_path).expect("agent log");
        let child = Command::new(bins::agent())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .envs(moto::aws_env(&proxy.url()))
            .env_remove("RSQL_AGENT_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start rsql-agent");
        BenchAgent {
            child: Some(child),
            log_path,
            _dir: dir,
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub(super) fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the agent exited ({status}):\n{}", self.log());
            }
        }
    }

    pub(super) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        self.stop();
    }
}
