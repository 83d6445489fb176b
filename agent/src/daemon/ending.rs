//! How a handed-over job ends, as rules: what a watch does with the agent's wish
//! ([`on_stop`]: keep watching, hand off, or report), and which outcome a job whose watch
//! ended gets ([`settle`]). Doing it (reading the owner's files, killing what is left of a
//! job, writing the lock state, returning a message) is behind [`OwnerEffects`], so each
//! rule is tested with a fake; `owned` implements it for real.
//!
//! ```text
//!  watch ends ──exit record (file, or the owner's last line)──▶ its outcome (final: nothing
//!     │                                                          overrides what the job recorded)
//!     ├──outcome in the lock state──▶ that outcome
//!     ├──"outcome lost" marker──▶ ScriptFailed, recorded under the lock
//!     ├──rerun (SQS, on_interrupted = "rerun")──▶ requeued, nothing reported
//!     └──none: a dead owner──▶ leftovers killed, Interrupted, recorded under the lock
//!  overdue ──owner and leftovers killed──▶ exit record after all? its outcome : Timeout
//! ```

use std::time::Duration;

use super::{failure, JobStop};
use crate::job_owner::{ExitRecord, JobFile};
use crate::outcome::{ErrorName, Outcome};
use crate::stop::StopLevel;

/// How the agent's watch of an owner ended.
#[derive(Debug)]
pub(super) enum Ending {
    /// The owner exited; with the exit record it sent last, if any.
    Ended(Option<ExitRecord>),
    /// The owner outlived the job's time limit (stopped or hung): the agent ends the job.
    Overdue,
    /// The job could not be handed to its owner (it died or was too slow); the owner is
    /// already killed.
    StartFailed(String),
}

/// What a watch does about the agent's wish for its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WatchAction {
    /// Keep watching, with this many stop requests asked of the owner in all (a second one
    /// kills the job).
    Watch { stops: u32 },
    /// Stop watching: the job keeps running under its owner; the next agent adopts it.
    HandOff,
    /// The owner has already recorded its exit: report it now instead of handing it off.
    Report,
}

/// The rule for the agent's wish `stop`. `exit_recorded` is asked only at a hand-off: at
/// host shutdown systemd stops the job units before the agent, and an owner that has
/// already recorded its exit is reported while the agent can still send it.
pub(super) fn on_stop(stop: JobStop, exit_recorded: impl FnOnce() -> bool) -> WatchAction {
    match stop {
        JobStop::Run => WatchAction::Watch { stops: 0 },
        JobStop::HandOff if exit_recorded() => WatchAction::Report,
        JobStop::HandOff => WatchAction::HandOff,
        // The owner protocol counts stop requests: the second one kills.
        JobStop::Stop(StopLevel::Graceful) => WatchAction::Watch { stops: 1 },
        JobStop::Stop(StopLevel::Kill) => WatchAction::Watch { stops: 2 },
    }
}

/// What was left of a job whose owner died, once killed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Leftovers {
    /// The owner's pid, from its record.
    pub(super) owner_pid: Option<i32>,
    /// The owner's record says it started the job.
    pub(super) job_started: bool,
    /// How many processes of the job were killed.
    pub(super) killed: usize,
}

/// The side effects of ending a job, so [`settle`] runs against a fake in tests.
pub(super) trait OwnerEffects {
    /// The exit record the owner wrote to its directory (an unreadable one counts as none).
    fn read_exit(&mut self) -> Option<ExitRecord>;
    /// The outcome this very attempt recorded in the lock state, if final.
    fn recorded_in_lock(&mut self) -> Option<Outcome>;
    /// The owner's marker: the job ended, and its outcome could be recorded nowhere.
    fn outcome_lost(&mut self) -> bool;
    /// `on_interrupted = "rerun"`, and the job came from SQS (a message that can come back).
    fn rerun(&self) -> bool;
    /// The job's time limit.
    fn timeout(&self) -> Duration;
    /// Kills what is left of the job (its owner died).
    fn kill_leftovers(&mut self) -> impl std::future::Future<Output = Leftovers> + Send;
    /// Kills the owner (stopped or hung) and every process of its job; how many.
    fn kill_overdue(&mut self) -> impl std::future::Future<Output = usize> + Send;
    /// Records `outcome` in the lock state of this attempt, unless it is already final or
    /// another attempt's.
    fn record_under_lock(
        &mut self,
        outcome: &Outcome,
    ) -> impl std::future::Future<Output = ()> + Send;
    /// Kills what is left and makes the message visible again, to run the job again.
    fn requeue_for_rerun(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

/// The job's outcome, from the best record there is: the exit record (the file, or the
/// owner's last reply), the outcome in the lock state, the owner's "outcome lost" marker;
/// only with none of them is the owner dead (or, overdue, the job timed out). `None`: the
/// job is to run again (`on_interrupted = "rerun"`), nothing to report.
pub(super) async fn settle(
    fx: &mut impl OwnerEffects,
    ending: Ending,
) -> Option<(Outcome, Option<ExitRecord>)> {
    let (announced, start_error) = match ending {
        Ending::Ended(exit) => (exit, None),
        Ending::StartFailed(reason) => (None, Some(reason)),
        Ending::Overdue => {
            let timeout = fx.timeout();
            tracing::error!(
                timeout = ?timeout,
                "the job's owner process has not reported long past the job's timeout (stopped or hung): ending the job"
            );
            let killed = fx.kill_overdue().await;
            if let Some(exit) = fx.read_exit() {
                // It ended on its own after all; that outcome is the one to report.
                return Some((outcome_of(&exit), Some(exit)));
            }
            let outcome = overdue_outcome(timeout, killed);
            fx.record_under_lock(&outcome).await;
            return Some((outcome, None));
        }
    };
    if let Some(exit) = fx.read_exit().or(announced) {
        return Some((outcome_of(&exit), Some(exit)));
    }
    if let Some(outcome) = fx.recorded_in_lock() {
        tracing::warn!("the job's exit record is missing, but its outcome is in the lock state: reporting that");
        return Some((outcome, None));
    }
    if fx.outcome_lost() {
        // A redelivery replays this, rather than calling the job interrupted.
        let outcome = lost_outcome();
        fx.record_under_lock(&outcome).await;
        return Some((outcome, None));
    }
    if fx.rerun() {
        fx.requeue_for_rerun().await;
        return None;
    }
    let leftovers = fx.kill_leftovers().await;
    let outcome = dead_owner_outcome(start_error, &leftovers);
    fx.record_under_lock(&outcome).await;
    Some((outcome, None))
}

pub(super) fn outcome_of(exit: &ExitRecord) -> Outcome {
    serde_json::from_value(exit.outcome.clone()).unwrap_or_else(|e| {
        failure(
            ErrorName::Interrupted,
            format!("the job ended but its recorded outcome cannot be read ({e})"),
        )
    })
}

/// The job ended, and its owner could record the outcome nowhere: not run again (it did
/// run), and said as it is.
fn lost_outcome() -> Outcome {
    failure(
        ErrorName::ScriptFailed,
        "the job ended, but its owner process could record its outcome nowhere (no exit \
         record, no lock state: state_dir and the lock dir full or unwritable); it is not run \
         again, since it did run: see its log"
            .to_string(),
    )
}

/// The owner died without recording the job's exit. `start_error`: the job was never
/// confirmed started (why).
fn dead_owner_outcome(start_error: Option<String>, left: &Leftovers) -> Outcome {
    let owner_pid = left
        .owner_pid
        .map_or("unknown".to_string(), |pid| pid.to_string());
    let killed = left.killed;
    let started = killed > 0 || left.job_started;
    let message = match start_error {
        Some(reason) if !started => {
            format!("the job was not started: cannot hand it to its owner process: {reason}")
        }
        Some(reason) => format!(
            "the job's owner process (pid {owner_pid}) died or hung right after starting the job ({reason}); {killed} leftover process(es) killed"
        ),
        None => format!(
            "the job's owner process (pid {owner_pid}) died while the job ran; {killed} leftover process(es) killed"
        ),
    };
    failure(ErrorName::Interrupted, message)
}

/// The owner was overdue and the agent ended the job.
fn overdue_outcome(timeout: Duration, killed: usize) -> Outcome {
    failure(
        ErrorName::Timeout,
        format!(
            "killed after the {}s timeout by the agent: the job's owner process stopped answering, so the agent ended the job; {killed} process(es) killed",
            timeout.as_secs()
        ),
    )
}

/// Past the job's timeout, `kill_grace` and `pipe_drain`, how long an owner may still take
/// to report before the agent ends the job itself.
const OVERDUE_MARGIN: Duration = Duration::from_secs(10);

/// When an owner that has not reported is overdue, from now: the job's timeout, its
/// `kill_grace` and `pipe_drain`, and [`OVERDUE_MARGIN`], counted from now for a job just
/// started, and from its start (plus the owner's start time limit `start_limit`) for an
/// adopted one, which has run `ran` already.
pub(super) fn overdue_in(
    job: &JobFile,
    adopted: Option<Duration>,
    start_limit: Duration,
) -> Duration {
    let plan = &job.launch;
    let budget = Duration::from_millis(plan.timeout_ms + plan.kill_grace_ms + plan.pipe_drain_ms)
        + OVERDUE_MARGIN;
    match adopted {
        None => budget,
        Some(ran) => (budget + start_limit).saturating_sub(ran),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::SuccessOutput;

    fn completed() -> Outcome {
        Outcome::Completed(SuccessOutput {
            job_name: "load.sh".into(),
            workflow_execution_id: "ex".into(),
            status: "completed".into(),
            exit_code: 0,
            duration_ms: 10,
            instance_id: "i-1".into(),
            log_group: None,
            log_stream: None,
            log_file: None,
            cpu_ms: None,
            max_rss_mb: None,
            log_complete: None,
        })
    }

    fn exit(outcome: &Outcome) -> ExitRecord {
        ExitRecord {
            protocol: 1,
            outcome: serde_json::to_value(outcome).unwrap(),
            exit_code: outcome.exit_code(),
            signal: None,
            started_at: "t0".into(),
            ended_at: "t1".into(),
            duration_ms: 10,
            stray_processes_killed: 0,
            pipes_forced_closed: false,
        }
    }

    /// Answers as told; records what the rules asked for.
    #[derive(Default)]
    struct Fake {
        exit: Option<ExitRecord>,
        /// An exit record that appears once the overdue owner is killed.
        exit_after_kill: Option<ExitRecord>,
        in_lock: Option<Outcome>,
        lost: bool,
        rerun: bool,
        leftovers: Leftovers,
        done: Vec<&'static str>,
        recorded: Vec<Outcome>,
    }

    impl OwnerEffects for Fake {
        fn read_exit(&mut self) -> Option<ExitRecord> {
            self.done.push("read_exit");
            self.exit.clone()
        }
        fn recorded_in_lock(&mut self) -> Option<Outcome> {
            self.done.push("read_lock");
            self.in_lock.clone()
        }
        fn outcome_lost(&mut self) -> bool {
            self.done.push("lost?");
            self.lost
        }
        fn rerun(&self) -> bool {
            self.rerun
        }
        fn timeout(&self) -> Duration {
            Duration::from_secs(60)
        }
        async fn kill_leftovers(&mut self) -> Leftovers {
            self.done.push("kill_leftovers");
            self.leftovers.clone()
        }
        async fn kill_overdue(&mut self) -> usize {
            self.done.push("kill_overdue");
            self.exit = self.exit_after_kill.take();
            3
        }
        async fn record_under_lock(&mut self, outcome: &Outcome) {
            self.done.push("record");
            self.recorded.push(outcome.clone());
        }
        async fn requeue_for_rerun(&mut self) {
            self.done.push("requeue");
        }
    }

    fn failed(outcome: &Option<(Outcome, Option<ExitRecord>)>) -> crate::outcome::Failure {
        match outcome {
            Some((Outcome::Failed(f), _)) => f.clone(),
            other => panic!("not a failure: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_exit_record_is_the_outcome_and_nothing_is_killed_or_recorded() {
        let mut fake = Fake {
            exit: Some(exit(&completed())),
            ..Fake::default()
        };
        let got = settle(&mut fake, Ending::Ended(None)).await;
        assert_eq!(got.map(|g| g.0), Some(completed()));
        assert_eq!(fake.done, ["read_exit"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_owners_last_line_counts_when_its_exit_file_is_missing() {
        let mut fake = Fake::default();
        let got = settle(&mut fake, Ending::Ended(Some(exit(&completed())))).await;
        let (outcome, record) = got.unwrap();
        assert_eq!(outcome, completed());
        assert_eq!(record.map(|r| r.duration_ms), Some(10));
        assert!(fake.recorded.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_exit_file_wins_over_the_last_line() {
        let file = failure(ErrorName::ScriptFailed, "exit 3".into());
        let mut fake = Fake {
            exit: Some(exit(&file)),
            ..Fake::default()
        };
        let got = settle(&mut fake, Ending::Ended(Some(exit(&completed())))).await;
        assert_eq!(got.map(|g| g.0), Some(file));
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_in_the_lock_state_is_reported_when_the_exit_record_is_missing() {
        let mut fake = Fake {
            in_lock: Some(completed()),
            ..Fake::default()
        };
        let got = settle(&mut fake, Ending::Ended(None)).await;
        assert_eq!(got, Some((completed(), None)));
        assert_eq!(fake.done, ["read_exit", "read_lock"], "no owner is dead");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_outcome_is_reported_script_failed_and_recorded_for_a_replay() {
        let mut fake = Fake {
            lost: true,
            ..Fake::default()
        };
        let got = settle(&mut fake, Ending::Ended(None)).await;
        let f = failed(&got);
        assert_eq!(f.error, ErrorName::ScriptFailed, "it ran: never run again");
        assert!(f.cause.message.contains("nowhere"), "{f:?}");
        assert_eq!(fake.recorded.len(), 1);
        assert!(!fake.done.contains(&"kill_leftovers"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_owner_under_rerun_requeues_its_message_and_reports_nothing() {
        let mut fake = Fake {
            rerun: true,
            ..Fake::default()
        };
        let got = settle(&mut fake, Ending::Ended(None)).await;
        assert_eq!(got, None);
        assert_eq!(fake.done.last(), Some(&"requeue"));
        assert!(fake.recorded.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_owner_has_its_leftovers_killed_then_is_recorded_interrupted() {
        let mut fake = Fake {
            leftovers: Leftovers {
                owner_pid: Some(42),
                job_started: true,
                killed: 2,
            },
            ..Fake::default()
        };
        let got = settle(&mut fake, Ending::Ended(None)).await;
        let f = failed(&got);
        assert_eq!(f.error, ErrorName::Interrupted);
        assert!(
            f.cause
                .message
                .contains("pid 42) died while the job ran; 2 leftover"),
            "{f:?}"
        );
        assert_eq!(
            fake.done,
            [
                "read_exit",
                "read_lock",
                "lost?",
                "kill_leftovers",
                "record"
            ],
            "the lock comes free only once the leftovers are gone"
        );
        assert_eq!(fake.recorded, [Outcome::Failed(f)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_that_died_before_starting_the_job_reports_it_not_started() {
        let mut fake = Fake::default();
        let got = settle(&mut fake, Ending::StartFailed("timed out".into())).await;
        let f = failed(&got);
        assert_eq!(f.error, ErrorName::Interrupted, "retryable: nothing ran");
        assert!(
            f.cause.message.starts_with("the job was not started"),
            "{f:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_that_died_right_after_starting_the_job_says_so() {
        let mut fake = Fake {
            leftovers: Leftovers {
                owner_pid: None,
                job_started: false,
                killed: 1,
            },
            ..Fake::default()
        };
        let got = settle(&mut fake, Ending::StartFailed("hung".into())).await;
        let f = failed(&got);
        assert!(
            f.cause
                .message
                .contains("pid unknown) died or hung right after starting"),
            "{f:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_overdue_owner_is_killed_and_its_job_reported_timed_out() {
        let mut fake = Fake::default();
        let got = settle(&mut fake, Ending::Overdue).await;
        let f = failed(&got);
        assert_eq!(f.error, ErrorName::Timeout);
        assert!(f.cause.message.contains("60s timeout"), "{f:?}");
        assert!(f.cause.message.contains("3 process(es) killed"), "{f:?}");
        assert_eq!(fake.done, ["kill_overdue", "read_exit", "record"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_overdue_job_that_recorded_its_exit_meanwhile_keeps_that_outcome() {
        let mut fake = Fake {
            exit_after_kill: Some(exit(&completed())),
            ..Fake::default()
        };
        let got = settle(&mut fake, Ending::Overdue).await;
        assert_eq!(got.map(|g| g.0), Some(completed()), "completed is final");
        assert!(fake.recorded.is_empty(), "the lock state is left alone");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_exit_record_is_reported_interrupted() {
        let mut record = exit(&completed());
        record.outcome = serde_json::json!({"not": "an outcome"});
        let mut fake = Fake {
            exit: Some(record),
            ..Fake::default()
        };
        let got = settle(&mut fake, Ending::Ended(None)).await;
        assert_eq!(failed(&got).error, ErrorName::Interrupted);
    }

    #[test]
    fn a_hand_off_stops_watching_and_the_job_keeps_running() {
        assert_eq!(on_stop(JobStop::HandOff, || false), WatchAction::HandOff);
    }

    #[test]
    fn a_hand_off_reports_an_owner_that_already_recorded_its_exit() {
        assert_eq!(on_stop(JobStop::HandOff, || true), WatchAction::Report);
    }

    #[test]
    fn a_running_job_is_watched_and_its_exit_record_not_read() {
        let got = on_stop(JobStop::Run, || panic!("read only at a hand-off"));
        assert_eq!(got, WatchAction::Watch { stops: 0 });
    }

    #[test]
    fn a_stop_asks_the_owner_once_and_a_second_stop_kills() {
        assert_eq!(
            on_stop(JobStop::Stop(StopLevel::Graceful), || false),
            WatchAction::Watch { stops: 1 }
        );
        assert_eq!(
            on_stop(JobStop::Stop(StopLevel::Kill), || false),
            WatchAction::Watch { stops: 2 }
        );
    }

    fn job_of(timeout_ms: u64) -> JobFile {
        let mut job: JobFile = serde_json::from_value(serde_json::json!({
            "protocol": 1, "job_name": "j", "workflow_id": "w", "workflow_execution_id": "e",
            "lock_key": "e/j", "lock_dir": "/l", "task_token": "t", "token_hash": "h",
            "attempt": 1, "instance_id": "i", "lease_interval_ms": 1000,
            "log_file": "/f", "outbox_id": "o", "started_at": "2026-01-01T00:00:00Z",
            "launch": {"program": "/bin/true", "args": [], "cwd": "/", "env": [], "inherited_env": [],
                       "timeout_ms": 0, "kill_grace_ms": 0, "pipe_drain_ms": 0, "job_id": "x"}
        }))
        .expect("a job file");
        job.launch.timeout_ms = timeout_ms;
        job.launch.kill_grace_ms = 5_000;
        job.launch.pipe_drain_ms = 1_000;
        job
    }

    #[test]
    fn a_new_job_is_overdue_after_its_timeout_graces_and_margin() {
        let got = overdue_in(&job_of(60_000), None, Duration::from_secs(20));
        assert_eq!(got, Duration::from_secs(60 + 5 + 1) + OVERDUE_MARGIN);
    }

    #[test]
    fn an_adopted_job_is_overdue_counted_from_its_start() {
        let start_limit = Duration::from_secs(20);
        let budget = Duration::from_secs(66) + OVERDUE_MARGIN + start_limit;
        let job = job_of(60_000);
        assert_eq!(
            overdue_in(&job, Some(Duration::from_secs(30)), start_limit),
            budget - Duration::from_secs(30)
        );
        assert_eq!(
            overdue_in(&job, Some(Duration::from_secs(3600)), start_limit),
            Duration::ZERO,
            "an adopted job long past its limits is overdue at once"
        );
    }
}
