//! Adoption at start, as a rule: what the agent does with each job directory an earlier
//! agent left under `state_dir/owners/` ([`adopt`]). Reading the directory and attaching to
//! the owner's socket are behind [`AdoptEffects`], so the rule is tested with a fake; `owned`
//! implements it for real and watches or reports what it finds.
//!
//! ```text
//!  unreadable job file ──▶ moved aside, left alone
//!  exit record on disk ──▶ report (the owner is done)
//!  owner answers ───────▶ watch (heartbeats, visibility, its end reported)
//!  owner still starting ─▶ ask again every 100 ms, for up to 2 s
//!  otherwise ───────────▶ report (a dead owner: see `ending`)
//! ```

use std::time::Duration;

use crate::job_owner::JobFile;

/// How often, and how many times, an owner that is still starting is asked again.
const STARTING_RECHECK: Duration = Duration::from_millis(100);
const STARTING_CHECKS: u32 = 20;

/// What to do with one job directory.
#[derive(Debug)]
pub(super) enum Adoption<C> {
    /// The owner is running: watch it over this connection.
    Watch(Box<JobFile>, C),
    /// The owner is gone (finished or dead): report the job.
    Report(Box<JobFile>),
    /// Not a job directory this agent can use; it was moved aside.
    Unusable,
}

/// The side effects of adoption, so [`adopt`] runs against a fake in tests.
pub(super) trait AdoptEffects {
    /// A connection to a running owner.
    type Conn;
    /// The job file (`job.json`); why not, when it cannot be read.
    fn read_job(&mut self) -> Result<JobFile, String>;
    /// Moves an unusable directory aside, so no later agent trips on it.
    fn move_aside(&mut self, why: &str);
    /// Whether the owner recorded the job's exit.
    fn exit_recorded(&mut self) -> bool;
    /// Attaches to the owner's socket; `None` when nobody answers.
    fn attach(&mut self) -> impl std::future::Future<Output = Option<Self::Conn>> + Send;
    /// The owner is alive and has not started the job yet (it may still open its socket).
    fn owner_starting(&mut self) -> bool;
}

/// The rule for one directory left by an earlier agent.
pub(super) async fn adopt<E: AdoptEffects>(fx: &mut E) -> Adoption<E::Conn> {
    let job = match fx.read_job() {
        Ok(job) => Box::new(job),
        Err(why) => {
            fx.move_aside(&why);
            return Adoption::Unusable;
        }
    };
    if fx.exit_recorded() {
        return Adoption::Report(job);
    }
    // An owner launched just before the agent died may still be opening its socket.
    for _ in 0..STARTING_CHECKS {
        if let Some(conn) = fx.attach().await {
            return Adoption::Watch(job, conn);
        }
        if !fx.owner_starting() {
            break;
        }
        tokio::time::sleep(STARTING_RECHECK).await;
    }
    Adoption::Report(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobFile {
        serde_json::from_value(serde_json::json!({
            "protocol": 1, "job_name": "j", "workflow_id": "w", "workflow_execution_id": "e",
            "lock_key": "e/j", "lock_dir": "/l", "task_token": "t", "token_hash": "h",
            "attempt": 1, "instance_id": "i", "lease_interval_ms": 1000,
            "log_file": "/f", "outbox_id": "o", "started_at": "2026-01-01T00:00:00Z",
            "launch": {"program": "/bin/true", "args": [], "cwd": "/", "env": [],
                       "inherited_env": [], "timeout_ms": 1000, "kill_grace_ms": 0,
                       "pipe_drain_ms": 0, "job_id": "x"}
        }))
        .expect("a job file")
    }

    /// Answers as told; counts what the rule asked.
    struct Fake {
        readable: bool,
        exit: bool,
        /// The owner answers on this attempt to attach (1 = the first); `None`: never.
        answers_on: Option<u32>,
        starting: bool,
        attaches: u32,
        moved_aside: bool,
    }

    impl Default for Fake {
        fn default() -> Fake {
            Fake {
                readable: true,
                exit: false,
                answers_on: None,
                starting: false,
                attaches: 0,
                moved_aside: false,
            }
        }
    }

    impl AdoptEffects for Fake {
        type Conn = u32;
        fn read_job(&mut self) -> Result<JobFile, String> {
            if self.readable {
                Ok(job())
            } else {
                Err("not JSON".into())
            }
        }
        fn move_aside(&mut self, _why: &str) {
            self.moved_aside = true;
        }
        fn exit_recorded(&mut self) -> bool {
            self.exit
        }
        async fn attach(&mut self) -> Option<u32> {
            self.attaches += 1;
            (Some(self.attaches) == self.answers_on).then_some(self.attaches)
        }
        fn owner_starting(&mut self) -> bool {
            self.starting
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_running_owner_is_watched() {
        let mut fake = Fake {
            answers_on: Some(1),
            ..Fake::default()
        };
        assert!(matches!(adopt(&mut fake).await, Adoption::Watch(_, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_that_recorded_its_exit_is_reported_without_attaching() {
        let mut fake = Fake {
            exit: true,
            answers_on: Some(1),
            ..Fake::default()
        };
        assert!(matches!(adopt(&mut fake).await, Adoption::Report(_)));
        assert_eq!(fake.attaches, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_owner_is_reported_after_one_try() {
        let mut fake = Fake::default();
        assert!(matches!(adopt(&mut fake).await, Adoption::Report(_)));
        assert_eq!(fake.attaches, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_still_starting_is_asked_again_until_it_answers() {
        let mut fake = Fake {
            starting: true,
            answers_on: Some(5),
            ..Fake::default()
        };
        let began = tokio::time::Instant::now();
        assert!(matches!(adopt(&mut fake).await, Adoption::Watch(_, 5)));
        assert_eq!(began.elapsed(), STARTING_RECHECK * 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_that_never_opens_its_socket_is_reported_after_two_seconds() {
        let mut fake = Fake {
            starting: true,
            ..Fake::default()
        };
        let began = tokio::time::Instant::now();
        assert!(matches!(adopt(&mut fake).await, Adoption::Report(_)));
        assert_eq!(fake.attaches, STARTING_CHECKS);
        assert_eq!(began.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_job_directory_is_moved_aside_and_left_alone() {
        let mut fake = Fake {
            readable: false,
            answers_on: Some(1),
            ..Fake::default()
        };
        assert!(matches!(adopt(&mut fake).await, Adoption::Unusable));
        assert!(fake.moved_aside);
        assert_eq!(fake.attaches, 0);
    }
}
