//! One delivery as a state machine, start to end: what happens next is a pure function of
//! where the delivery stands and what just happened; doing it (locks, Step Functions, SQS,
//! the outbox, the job's owner) is behind small effect traits, so every rule is a unit test
//! without any AWS at all, under tokio's paused clock where time matters.
//!
//! ```text
//!  parsed ──lock──▶ to run ──unlock, check the task──open──▶ relock ──run──▶ handing over
//!    │  busy: elsewhere │  (and start the owner)└─closed──▶ acknowledged          │
//!    │                  │ replay / interrupted              (never run)            │
//!    ▼                  ▼                                                          ▼
//!  left          finished(outcome) ──store──▶ stored ──unlock, delete──▶ acknowledged
//!                       ▲                                                  watching the owner
//!                       │         found at start (adopt::adopt) ──────────────▶ │
//!                       │                                                        │ stop wish
//!                       └──── the watch ended (ending::settle) ◀──────────── ending::on_stop
//!                                                                  └──hand-off──▶ handed off
//! ```
//!
//! The rules, each with its effects behind a trait and its own unit tests:
//! - this module's [`on`] ([`Effects`]): from a parsed message to its hand-over or its end;
//! - `adopt::adopt` (`AdoptEffects`): a job an earlier agent left, found at start;
//! - `ending::on_stop` and `ending::settle` (`OwnerEffects`): what a watch does with the
//!   agent's wish (watch on, stop, hand off, report), and which outcome an ended watch gets
//!   (exit record, lock state, lost-outcome marker, a dead or overdue owner);
//! - `drain::on`: whether new deliveries start at all (drain, fleet notices, Spot, stop).
//!
//! The owner's start overlaps the task check ([`Effect::StartOwner`], issued with
//! [`Effect::CheckTask`]): launched and connected to, it is asked to start the job only
//! once the task is open and the decision to run is taken again under the lock; otherwise
//! it is withdrawn and exits having run nothing. A job's dispatch then costs the longer of
//! the two, not their sum.
//!
//! No lock is held across a network call: the task check runs unlocked (a copy that only
//! learns its task is closed must not make another copy of the job find the lock busy), and
//! the decision is taken again under the lock afterwards. A delivery's last state is what
//! the daemon gets back: acknowledged, elsewhere, left, or handed off.

use crate::lock::{Decision, LockState, RunState};
use crate::outcome::{ErrorName, Outcome};

use super::failure;

/// Where a delivery stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// The message is valid and has a token; nothing is held yet.
    Parsed,
    /// The decision was to run: with the lock released, ask Step Functions whether this
    /// copy's task is still open first. A task that waited in the queue may have been closed
    /// meanwhile (its execution stopped, or timed out and retried under a new token), and a
    /// job must never start for a closed task.
    CheckingTask,
    /// The task is open: take the lock again and decide again (another copy may have run
    /// the job meanwhile).
    Relocking,
    /// Lock held and the decision is to run this attempt: hand it to an owner process.
    HandingOver { attempt: u32 },
    /// The outcome is known (replayed, interrupted, or an agent-side failure) and must be
    /// made durable before anything is acknowledged.
    Finished(Outcome),
    /// Done: the outcome is durable and the message deleted.
    Acknowledged(Option<Outcome>),
    /// Done: another runner holds the lock; it reports.
    Elsewhere(String),
    /// Done: nothing stored; the message comes back.
    Left,
    /// Done for this agent: it stopped watching (a hand-off at shutdown); the job keeps
    /// running under its owner, and the next agent adopts it and ends the delivery.
    HandedOff,
}

/// What just happened.
#[derive(Debug, Clone, PartialEq)]
// One event at a time, matched at once: boxing the decision would only clutter the callers.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Event {
    /// The lock was taken.
    Locked { decision: Decision },
    /// A live holder has the lock.
    Busy { holder: String },
    /// The lock could not be taken at all (an I/O error on the lock directory).
    LockFailed { error: String },
    /// The answer to [`Effect::CheckTask`].
    TaskClosed(bool),
    /// The outcome was stored durably (or there was nothing to store).
    Stored,
    /// The outcome could not be stored.
    StoreFailed,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Heartbeat the task on the lock holder's behalf if its lease is fresh.
    KeepAliveForOwner,
    /// Start an owner for `attempt` while the task is checked; it is asked nothing yet.
    StartOwner { attempt: u32 },
    /// Ask Step Functions whether the task is closed.
    CheckTask,
    /// Hand the job to a new owner process (it takes the lock), as `attempt`.
    HandOver { attempt: u32 },
    /// Take the lock again; its answer is the next event.
    Relock,
    /// Record this interruption in the lock state (under the lock).
    RecordInterrupted(Box<LockState>, Outcome),
    /// Store the outcome in the outbox, with the final audit record of the run named (a
    /// replayed run, or one that died): every reported outcome ends the job's audit.
    Store(Outcome, Option<Box<LockState>>),
    /// Delete the SQS message.
    Delete,
    /// Release the lock.
    Release,
}

/// Whether the delivery came from SQS (a message that comes back if left) or from a local
/// submitter (which will not send it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Sqs,
    Local,
}

/// The transition: where the delivery goes and what to do, from where it is and what
/// happened. Pure: no clock, no I/O.
pub(crate) fn on(step: &Step, event: Event, origin: Origin) -> (Step, Vec<Effect>) {
    use Effect as E;
    match (step, event) {
        (Step::Parsed, Event::Busy { holder }) => {
            (Step::Elsewhere(holder), vec![E::KeepAliveForOwner])
        }
        (Step::Parsed, Event::LockFailed { error }) => match origin {
            // Nobody would send a socket job again: report the failure now, as the retryable
            // `Rsql.Interrupted` a job that could not be started gets (an SQS copy is simply
            // left, and runs when it comes back). Never `Rsql.ScriptFailed`: no script ran,
            // and workflows do not retry that.
            Origin::Local => {
                let outcome = failure(
                    ErrorName::Interrupted,
                    format!(
                        "the job was not started: the agent could not take the job's lock: {error}"
                    ),
                );
                (
                    Step::Finished(outcome.clone()),
                    vec![E::Store(outcome, None)],
                )
            }
            Origin::Sqs => (Step::Left, vec![]),
        },
        (Step::Parsed, Event::Locked { decision }) => match decision {
            // Every run, first or retry, is preceded by one look at its task: the cost is a
            // SendTaskHeartbeat per job, the gain that a closed task never runs its SQL.
            // The attempt is decided again under the lock, after the check.
            Decision::Run { attempt } => (
                Step::CheckingTask,
                vec![E::Release, E::StartOwner { attempt }, E::CheckTask],
            ),
            Decision::Replay(state) => {
                let outcome = recorded_outcome(&state);
                (
                    Step::Finished(outcome.clone()),
                    vec![E::Store(outcome, Some(Box::new(state)))],
                )
            }
            Decision::Interrupted(previous) => {
                let outcome = interrupted(&previous);
                (
                    Step::Finished(outcome.clone()),
                    vec![
                        E::RecordInterrupted(Box::new(previous.clone()), outcome.clone()),
                        E::Store(outcome, Some(Box::new(previous))),
                    ],
                )
            }
        },
        // A stale copy of a task Step Functions already closed (its execution was stopped,
        // or its attempt timed out and was retried under a new token): never run the job
        // for it, and report nothing (nobody can be told).
        (Step::CheckingTask, Event::TaskClosed(true)) => (
            Step::Acknowledged(Some(Outcome::Cancelled {
                message: "the task was already closed: the job was not run".into(),
            })),
            vec![E::Delete],
        ),
        (Step::CheckingTask, Event::TaskClosed(false)) => (Step::Relocking, vec![E::Relock]),
        (
            Step::Relocking,
            Event::Locked {
                decision: Decision::Run { attempt },
            },
        ) => (Step::HandingOver { attempt }, vec![E::HandOver { attempt }]),
        // Anything else (busy, replay, interrupted) is answered as for a first lock.
        (Step::Relocking, event) => on(&Step::Parsed, event, origin),
        // The lock goes before the (network) delete: the outcome is durable by now.
        (Step::Finished(outcome), Event::Stored) => (
            Step::Acknowledged(Some(outcome.clone())),
            vec![E::Release, E::Delete],
        ),
        (Step::Finished(_), Event::StoreFailed) => (Step::Left, vec![E::Release]),
        // Anything else is a driver bug; stay put and do nothing.
        (step, _) => (step.clone(), vec![]),
    }
}

/// The outcome a finished job recorded in its lock state.
pub(crate) fn recorded_outcome(state: &LockState) -> Outcome {
    let unreadable = match &state.outcome {
        Some(value) => match serde_json::from_value(value.clone()) {
            Ok(outcome) => return outcome,
            Err(e) => {
                tracing::warn!(error = %e, recorded = %value, "the job's recorded outcome cannot be read; replaying it as Rsql.Interrupted");
                format!("cannot be read ({e})")
            }
        },
        None => "was not recorded".to_string(),
    };
    failure(
        ErrorName::Interrupted,
        format!(
            "the job ended as {:?} but its outcome {unreadable}",
            state.state
        ),
    )
}

/// The `Rsql.Interrupted` outcome of a run whose owner died (found `running`, lock free).
pub(crate) fn interrupted(previous: &LockState) -> Outcome {
    failure(
        ErrorName::Interrupted,
        format!(
            "the job's owner process (host {}, pid {}, instance {}) stopped while the job ran; last heartbeat {}",
            previous.host, previous.pid, previous.instance_id, previous.heartbeat_at
        ),
    )
}

/// The interruption as it goes into the lock state.
pub(crate) fn interrupted_state(previous: &LockState, outcome: &Outcome) -> LockState {
    let mut state = previous.clone();
    state.state = RunState::Interrupted;
    state.outcome = serde_json::to_value(outcome).ok();
    state.updated_at = crate::workflow::now_ts();
    state
}

/// The side effects a delivery needs, so the machine runs against fakes in tests.
pub(crate) trait Effects {
    fn keep_alive_for_owner(&mut self) -> impl std::future::Future<Output = ()> + Send;
    fn task_closed(&mut self) -> impl std::future::Future<Output = bool> + Send;
    /// Starts an owner for `attempt` in the background (see [`Effect::StartOwner`]).
    fn start_owner(&mut self, attempt: u32);
    /// Takes the job's lock again (after the task check) and says what it found.
    fn relock(&mut self) -> Event;
    fn record_interrupted(&mut self, state: &LockState);
    /// `run`: the lock state of the run the outcome ends, for its final audit record.
    fn store(
        &mut self,
        outcome: &Outcome,
        run: Option<&LockState>,
    ) -> impl std::future::Future<Output = bool> + Send;
    fn delete(&mut self) -> impl std::future::Future<Output = ()> + Send;
    fn release(&mut self);
}

/// Runs the machine from `first` (the lock's answer) until it is done or must hand the job
/// over. `Ok(attempt)`: hand over as that attempt (the caller owns that part);
/// `Err(step)`: the delivery ended at `step`.
pub(crate) async fn drive(
    effects: &mut impl Effects,
    first: Event,
    origin: Origin,
) -> Result<u32, Step> {
    let mut step = Step::Parsed;
    let mut event = Some(first);
    while let Some(happened) = event.take() {
        let (next, todo) = on(&step, happened, origin);
        step = next;
        for effect in todo {
            match effect {
                Effect::KeepAliveForOwner => effects.keep_alive_for_owner().await,
                Effect::StartOwner { attempt } => effects.start_owner(attempt),
                Effect::CheckTask => event = Some(Event::TaskClosed(effects.task_closed().await)),
                Effect::HandOver { attempt } => return Ok(attempt),
                Effect::Relock => event = Some(effects.relock()),
                Effect::RecordInterrupted(previous, outcome) => {
                    effects.record_interrupted(&interrupted_state(&previous, &outcome));
                }
                Effect::Store(outcome, run) => {
                    event = Some(if effects.store(&outcome, run.as_deref()).await {
                        Event::Stored
                    } else {
                        Event::StoreFailed
                    });
                }
                Effect::Delete => effects.delete().await,
                Effect::Release => effects.release(),
            }
        }
    }
    Err(step)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::token_hash;

    fn state(token: &str, run: RunState, outcome: Option<Outcome>) -> LockState {
        let mut s = LockState::new_running("e/j", "i-1", &token_hash(token), 1);
        s.state = run;
        s.outcome = outcome.and_then(|o| serde_json::to_value(o).ok());
        s
    }

    /// Records what the machine asked for; answers as told.
    #[derive(Default)]
    struct Fake {
        closed: bool,
        store_ok: bool,
        done: Vec<&'static str>,
        stored: Vec<Outcome>,
        audited: Vec<RunState>,
        recorded: Vec<RunState>,
        /// What the lock says when taken again; `None`: run as attempt 1.
        relocked: Option<Event>,
        /// The attempts an owner was started for while the task was checked.
        owners_started: Vec<u32>,
    }

    impl Effects for Fake {
        async fn keep_alive_for_owner(&mut self) {
            self.done.push("keep_alive");
        }
        async fn task_closed(&mut self) -> bool {
            self.done.push("check_task");
            self.closed
        }
        fn start_owner(&mut self, attempt: u32) {
            self.done.push("start_owner");
            self.owners_started.push(attempt);
        }
        fn relock(&mut self) -> Event {
            self.done.push("relock");
            self.relocked.clone().unwrap_or(Event::Locked {
                decision: Decision::Run { attempt: 1 },
            })
        }
        fn record_interrupted(&mut self, state: &LockState) {
            self.done.push("record_interrupted");
            self.recorded.push(state.state);
        }
        async fn store(&mut self, outcome: &Outcome, run: Option<&LockState>) -> bool {
            self.done.push("store");
            self.stored.push(outcome.clone());
            self.audited.extend(run.map(|r| r.state));
            self.store_ok
        }
        async fn delete(&mut self) {
            self.done.push("delete");
        }
        fn release(&mut self) {
            self.done.push("release");
        }
    }

    fn locked(decision: Decision) -> Event {
        Event::Locked { decision }
    }

    #[tokio::test]
    async fn a_first_run_starts_its_owner_while_it_looks_at_its_task_then_is_handed_over() {
        for origin in [Origin::Sqs, Origin::Local] {
            let mut fake = Fake::default();
            let got = drive(&mut fake, locked(Decision::Run { attempt: 1 }), origin).await;
            assert_eq!(got, Ok(1));
            assert_eq!(
                fake.owners_started,
                [1],
                "{origin:?}: the owner starts during the check, never after it"
            );
            assert_eq!(
                fake.done,
                ["release", "start_owner", "check_task", "relock"],
                "{origin:?}: no lock is held across the check"
            );
        }
    }

    #[tokio::test]
    async fn a_first_run_whose_task_closed_while_it_waited_in_the_queue_never_starts() {
        let mut fake = Fake {
            closed: true,
            ..Fake::default()
        };
        let got = drive(&mut fake, locked(Decision::Run { attempt: 1 }), Origin::Sqs).await;
        assert!(matches!(
            got,
            Err(Step::Acknowledged(Some(Outcome::Cancelled { .. })))
        ));
        assert_eq!(
            fake.done,
            ["release", "start_owner", "check_task", "delete"]
        );
        assert!(fake.stored.is_empty(), "nothing is audited as run");
    }

    #[tokio::test]
    async fn a_stale_copy_of_a_closed_task_is_deleted_and_never_run() {
        let mut fake = Fake {
            closed: true,
            ..Fake::default()
        };
        let got = drive(&mut fake, locked(Decision::Run { attempt: 3 }), Origin::Sqs).await;
        assert!(matches!(
            got,
            Err(Step::Acknowledged(Some(Outcome::Cancelled { .. })))
        ));
        assert_eq!(
            fake.done,
            ["release", "start_owner", "check_task", "delete"]
        );
    }

    #[tokio::test]
    async fn a_retry_whose_task_is_open_runs_as_the_next_attempt() {
        let mut fake = Fake {
            relocked: Some(locked(Decision::Run { attempt: 2 })),
            ..Fake::default()
        };
        let got = drive(&mut fake, locked(Decision::Run { attempt: 2 }), Origin::Sqs).await;
        assert_eq!(got, Ok(2));
        assert_eq!(
            fake.done,
            ["release", "start_owner", "check_task", "relock"]
        );
    }

    #[tokio::test]
    async fn a_copy_that_finds_the_job_run_meanwhile_decides_again_under_the_lock() {
        let done = crate::daemon::failure(ErrorName::ScriptFailed, "exit 3".into());
        let previous = state("t", RunState::Failed, Some(done.clone()));
        let mut fake = Fake {
            store_ok: true,
            relocked: Some(locked(Decision::Replay(previous))),
            ..Fake::default()
        };
        let got = drive(&mut fake, locked(Decision::Run { attempt: 1 }), Origin::Sqs).await;
        assert_eq!(got, Err(Step::Acknowledged(Some(done))));
        let mut fake = Fake {
            relocked: Some(Event::Busy { holder: "h".into() }),
            ..Fake::default()
        };
        let got = drive(&mut fake, locked(Decision::Run { attempt: 1 }), Origin::Sqs).await;
        assert_eq!(got, Err(Step::Elsewhere("h".into())));
    }

    #[tokio::test]
    async fn a_finished_job_replays_its_recorded_outcome_then_acknowledges() {
        let done = crate::daemon::failure(ErrorName::ScriptFailed, "exit 3".into());
        let previous = state("t", RunState::Failed, Some(done.clone()));
        let mut fake = Fake {
            store_ok: true,
            ..Fake::default()
        };
        let got = drive(&mut fake, locked(Decision::Replay(previous)), Origin::Sqs).await;
        assert_eq!(got, Err(Step::Acknowledged(Some(done.clone()))));
        assert_eq!(fake.stored, [done]);
        assert_eq!(
            fake.audited,
            [RunState::Failed],
            "the replay ends the audit"
        );
        assert_eq!(fake.done, ["store", "release", "delete"]);
    }

    #[tokio::test]
    async fn a_dead_run_is_recorded_interrupted_before_it_is_reported() {
        let previous = state("t", RunState::Running, None);
        let mut fake = Fake {
            store_ok: true,
            ..Fake::default()
        };
        let got = drive(
            &mut fake,
            locked(Decision::Interrupted(previous)),
            Origin::Sqs,
        )
        .await;
        let Err(Step::Acknowledged(Some(Outcome::Failed(f)))) = got else {
            panic!("{got:?}");
        };
        assert_eq!(f.error, ErrorName::Interrupted);
        assert!(
            f.cause.message.contains("owner process"),
            "{}",
            f.cause.message
        );
        assert_eq!(fake.recorded, [RunState::Interrupted]);
        assert_eq!(
            fake.done,
            ["record_interrupted", "store", "release", "delete"]
        );
    }

    #[tokio::test]
    async fn nothing_is_acknowledged_when_the_outcome_cannot_be_stored() {
        let previous = state("t", RunState::Completed, None);
        let mut fake = Fake::default();
        let got = drive(&mut fake, locked(Decision::Replay(previous)), Origin::Sqs).await;
        assert_eq!(got, Err(Step::Left));
        assert_eq!(fake.done, ["store", "release"]);
    }

    #[tokio::test]
    async fn a_busy_lock_leaves_the_copy_and_keeps_the_owners_task_alive() {
        let mut fake = Fake::default();
        let got = drive(
            &mut fake,
            Event::Busy {
                holder: "host h pid 1".into(),
            },
            Origin::Sqs,
        )
        .await;
        assert_eq!(got, Err(Step::Elsewhere("host h pid 1".into())));
        assert_eq!(fake.done, ["keep_alive"]);
    }

    #[tokio::test]
    async fn a_lock_error_leaves_an_sqs_message_but_fails_a_local_job_at_once() {
        let error = Event::LockFailed {
            error: "EIO".into(),
        };
        let mut fake = Fake {
            store_ok: true,
            ..Fake::default()
        };
        assert_eq!(
            drive(&mut fake, error.clone(), Origin::Sqs).await,
            Err(Step::Left)
        );
        assert!(fake.done.is_empty());
        let got = drive(&mut fake, error, Origin::Local).await;
        let Err(Step::Acknowledged(Some(Outcome::Failed(f)))) = got else {
            panic!("a local job with a lock error must fail at once: {got:?}");
        };
        // Retryable, as the SQS copy's redelivery is: no script ran.
        assert_eq!(f.error, ErrorName::Interrupted, "{f:?}");
        assert!(f.cause.message.contains("not started"), "{f:?}");
        assert_eq!(fake.done, ["store", "release", "delete"]);
    }

    #[test]
    fn events_that_do_not_fit_the_step_change_nothing() {
        let step = Step::HandingOver { attempt: 1 };
        assert_eq!(
            on(&step, Event::Stored, Origin::Sqs),
            (step.clone(), vec![])
        );
    }

    /// A redelivery of a finished job replays what the lock state file holds: the state is
    /// written to the (EFS) file as JSON and read back by another agent.
    #[test]
    fn a_replayed_outcome_is_the_one_the_finished_job_recorded() {
        let completed = Outcome::Completed(crate::outcome::SuccessOutput {
            job_name: "load.sh".into(),
            workflow_execution_id: "ex-1".into(),
            status: "completed".into(),
            exit_code: 0,
            duration_ms: 1200,
            instance_id: "i-1".into(),
            log_group: Some("/rsql".into()),
            log_stream: Some("ex-1/load.sh".into()),
            log_file: Some("/var/log/rsql-agent/jobs/x.log".into()),
            cpu_ms: Some(830),
            max_rss_mb: None,
            log_complete: None,
        });
        let failed = crate::daemon::failure(ErrorName::ScriptFailed, "exit 3".into());
        for (outcome, run_state) in [(completed, RunState::Completed), (failed, RunState::Failed)] {
            let mut state = LockState::new_running("k", "i-1", "h", 1);
            state.state = run_state;
            state.outcome = serde_json::to_value(&outcome).ok();
            let on_disk = serde_json::to_string(&state).unwrap();
            let read: LockState = serde_json::from_str(&on_disk).unwrap();
            assert_eq!(recorded_outcome(&read), outcome, "{on_disk}");
        }
    }
}
