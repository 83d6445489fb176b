//! What to do with a job once its lock is ours: run it, replay its recorded outcome, or report
//! that its owner died. Owns the rules by which the lock stops a second run and
//! remembers the outcome (docs/operations.md, "The fleet lock on EFS") as one pure function;
//! it touches no file and no clock.

use serde::{Deserialize, Serialize};

use super::LockState;

/// What a job whose lock is free (and now held by us) should do.
#[derive(Debug, Clone, PartialEq)]
// A decision is made once per job and matched right away; boxing the state would only make
// every caller's `match` clumsier.
#[allow(clippy::large_enum_variant)]
pub enum Decision {
    /// Run the job, as this attempt number under the lock key.
    Run { attempt: u32 },
    /// A redelivery of a job that already finished: report this recorded outcome again and
    /// never run the script a second time.
    Replay(LockState),
    /// A redelivery of a job whose owner died mid-run: report `Rsql.Interrupted`.
    Interrupted(LockState),
}

/// What to do when the same task token finds its own earlier run dead in `running`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInterrupted {
    /// Report `Rsql.Interrupted` and let the workflow's Retry decide. The safe default: the
    /// dead run may have done part of its work.
    #[default]
    Fail,
    /// Run the job again under the same token; for scripts known to be idempotent.
    Rerun,
}

/// Decide what to do with a job, given the state file found when its lock was taken.
///
/// `token_hash` is [`super::token_hash`] of this delivery's task token. The rules:
/// - no previous state: the first run, attempt 1;
/// - a different token after a completed run: a new Step Functions attempt of a job that
///   already did its work (its task timed out while the run went on under its owner, say).
///   A completed run is final for its lock key: replay its success, never run it again;
/// - a different token otherwise: a new Step Functions attempt (a Retry). It runs, whatever
///   the earlier attempt left behind, so a dead attempt never poisons its retries;
/// - the same token and a final state: a redelivery of a finished job; replay its outcome;
/// - the same token and `running`: a redelivery after the owner died. `Interrupted`, or with
///   [`OnInterrupted::Rerun`] a new run.
///
/// Every new run after the first gets the previous attempt number plus one, so the audit shows
/// how many times the script actually started under this key.
pub fn decide(
    previous: Option<&LockState>,
    token_hash: &str,
    on_interrupted: OnInterrupted,
) -> Decision {
    let Some(previous) = previous else {
        return Decision::Run { attempt: 1 };
    };
    let next = Decision::Run {
        attempt: previous.attempt.saturating_add(1),
    };
    if previous.token_hash != token_hash {
        if previous.state == super::RunState::Completed {
            return Decision::Replay(previous.clone());
        }
        return next;
    }
    if previous.is_final() {
        return Decision::Replay(previous.clone());
    }
    match on_interrupted {
        OnInterrupted::Fail => Decision::Interrupted(previous.clone()),
        OnInterrupted::Rerun => next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{token_hash, RunState};

    fn previous(token: &str, state: RunState, attempt: u32) -> LockState {
        let mut s = LockState::new_running("exec/job.sh", "i-1", &token_hash(token), attempt);
        s.state = state;
        s
    }

    const FINAL: [RunState; 4] = [
        RunState::Completed,
        RunState::Failed,
        RunState::Interrupted,
        RunState::Cancelled,
    ];

    #[test]
    fn nothing_before_runs_attempt_one() {
        for on in [OnInterrupted::Fail, OnInterrupted::Rerun] {
            assert_eq!(
                decide(None, &token_hash("t"), on),
                Decision::Run { attempt: 1 }
            );
        }
    }

    #[test]
    fn same_token_final_replays_the_record() {
        for state in FINAL {
            let prev = previous("t", state, 3);
            for on in [OnInterrupted::Fail, OnInterrupted::Rerun] {
                assert_eq!(
                    decide(Some(&prev), &token_hash("t"), on),
                    Decision::Replay(prev.clone()),
                    "{state:?} with {on:?}"
                );
            }
        }
    }

    #[test]
    fn same_token_running_is_interrupted_by_default() {
        let prev = previous("t", RunState::Running, 1);
        assert_eq!(
            decide(Some(&prev), &token_hash("t"), OnInterrupted::default()),
            Decision::Interrupted(prev.clone())
        );
    }

    #[test]
    fn same_token_running_reruns_when_asked() {
        let prev = previous("t", RunState::Running, 1);
        assert_eq!(
            decide(Some(&prev), &token_hash("t"), OnInterrupted::Rerun),
            Decision::Run { attempt: 2 }
        );
    }

    #[test]
    fn new_token_after_a_completed_run_replays_its_success() {
        let prev = previous("old", RunState::Completed, 2);
        for on in [OnInterrupted::Fail, OnInterrupted::Rerun] {
            assert_eq!(
                decide(Some(&prev), &token_hash("new"), on),
                Decision::Replay(prev.clone())
            );
        }
    }

    #[test]
    fn new_token_runs_the_next_attempt_after_anything_but_a_completed_run() {
        for state in FINAL
            .into_iter()
            .filter(|s| *s != RunState::Completed)
            .chain([RunState::Running])
        {
            let prev = previous("old", state, 4);
            for on in [OnInterrupted::Fail, OnInterrupted::Rerun] {
                assert_eq!(
                    decide(Some(&prev), &token_hash("new"), on),
                    Decision::Run { attempt: 5 },
                    "{state:?} with {on:?}"
                );
            }
        }
    }

    #[test]
    fn attempt_numbers_saturate() {
        let prev = previous("old", RunState::Failed, u32::MAX);
        assert_eq!(
            decide(Some(&prev), &token_hash("new"), OnInterrupted::Fail),
            Decision::Run { attempt: u32::MAX }
        );
    }

    #[test]
    fn on_interrupted_config_values() {
        assert_eq!(OnInterrupted::default(), OnInterrupted::Fail);
        let fail: OnInterrupted = serde_json::from_str("\"fail\"").expect("fail");
        let rerun: OnInterrupted = serde_json::from_str("\"rerun\"").expect("rerun");
        assert_eq!((fail, rerun), (OnInterrupted::Fail, OnInterrupted::Rerun));
        assert!(serde_json::from_str::<OnInterrupted>("\"Rerun\"").is_err());
    }
}
