//! One delivery driven for real: the state machine (`delivery`) with its side effects on the
//! lock, Step Functions, SQS and the outbox; a job to run goes on to its owner (`owned`).

use crate::attempt::{Acquired, AttemptError};
use crate::job::JobSpec;
use crate::lock::{Decision, JobLock, LockState};
use crate::outcome::Outcome;
use std::sync::Arc;
use tokio::sync::watch;

use super::ack::{delete, store};
use super::audit::{job_end_metrics, run_record};
use super::delivery::Step;
use super::heartbeat::{keep_alive_for_owner, task_closed};
use super::prepare::prepare;
use super::{delivery, owned};
use super::{JobStop, Shared, Source};

pub(super) async fn run_delivery(
    shared: Arc<Shared>,
    delivery: Source,
    spec: JobSpec,
    token: String,
    token_hash: String,
    shutdown: watch::Receiver<JobStop>,
) -> Step {
    let origin = delivery.origin();
    let mut effects = LiveEffects {
        shared: &shared,
        warm: None,
        delivery: &delivery,
        spec: &spec,
        token: &token,
        token_hash: &token_hash,
        held: None,
        holder: None,
    };
    let first = effects.take_lock();
    let driven = delivery::drive(&mut effects, first, origin).await;
    let warm = effects.warm.take();
    if driven.is_err() {
        // Not run here (closed, elsewhere, replayed, left): the owner started meanwhile
        // goes, having run nothing.
        if let Some(warming) = warm {
            owned::withdraw(warming);
        }
        return ended(driven, &delivery);
    }
    let attempt = driven.unwrap_or_default();
    let Some(held) = effects.held.take() else {
        tracing::error!("a delivery was to run without its lock; leaving it for a retry");
        if let Some(warming) = warm {
            owned::withdraw(warming);
        }
        return Step::Left;
    };
    let locked = owned::Locked {
        spec: spec.clone(),
        token: token.clone(),
        token_hash: token_hash.clone(),
        held,
        attempt,
        warm,
    };
    owned::run(shared.clone(), delivery, locked, shutdown).await
}

/// The step a delivery that did not run here ended at, said once.
fn ended(driven: Result<u32, Step>, delivery: &Source) -> Step {
    match driven {
        Ok(_) => Step::Left,
        Err(delivery::Step::Acknowledged(outcome)) => {
            if matches!(outcome, Some(Outcome::Cancelled { .. })) {
                // Warn: a whole fleet answered "closed" for every task when its region or
                // account did not match the state machine's (Step Functions then says
                // InvalidToken), and an operator must see that at once.
                tracing::warn!(
                    receive_count = delivery.receive_count(),
                    "Step Functions says the task is closed (its execution stopped, or it timed out and was retried; InvalidToken also comes from a token of another region or account): deleted this message without running the job"
                );
            }
            Step::Acknowledged(outcome)
        }
        Err(delivery::Step::Elsewhere(holder)) => Step::Elsewhere(holder),
        Err(step) => {
            if !matches!(step, delivery::Step::Left) {
                tracing::error!(
                    ?step,
                    "a delivery stopped in the middle; leaving it for a retry"
                );
            }
            Step::Left
        }
    }
}

/// The side effects of one delivery's state machine ([`delivery::Effects`]), for real.
pub(super) struct LiveEffects<'a> {
    shared: &'a Arc<Shared>,
    /// The owner started while the task is checked (`Effect::StartOwner`).
    warm: Option<owned::Warming>,
    delivery: &'a Source,
    spec: &'a JobSpec,
    token: &'a str,
    token_hash: &'a str,
    held: Option<JobLock>,
    /// The lock holder's record when the lock was busy.
    holder: Option<LockState>,
}

impl LiveEffects<'_> {
    /// Takes the job's lock and says what it found, as the delivery's next event.
    fn take_lock(&mut self) -> delivery::Event {
        match self.shared.attempts.acquire(self.spec, self.token_hash) {
            Ok(Acquired { held, decision }) => {
                match &decision {
                    Decision::Replay(state) => {
                        tracing::info!(state = ?state.state, "the job already finished: replaying its recorded outcome")
                    }
                    Decision::Interrupted(_) => tracing::warn!(
                        "the job's previous runner died while it ran: reporting Rsql.Interrupted"
                    ),
                    Decision::Run { .. } => {}
                }
                self.held = Some(held);
                delivery::Event::Locked { decision }
            }
            Err(AttemptError::Busy { holder, state, .. }) => {
                // Another runner has it now; this copy comes back soon (heartbeating its
                // task meanwhile) to find it free, or finished and then replays its outcome.
                tracing::info!(holder = %holder, receive_count = self.delivery.receive_count(), "job is running elsewhere; leaving this copy");
                self.holder = state.map(|s| *s);
                delivery::Event::Busy { holder }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot take the job's lock");
                delivery::Event::LockFailed {
                    error: e.to_string(),
                }
            }
        }
    }
}

impl delivery::Effects for LiveEffects<'_> {
    fn relock(&mut self) -> delivery::Event {
        self.take_lock()
    }

    async fn keep_alive_for_owner(&mut self) {
        keep_alive_for_owner(
            self.shared,
            self.delivery,
            (self.token, self.token_hash, self.spec.heartbeat),
            self.holder.as_ref(),
        )
        .await
    }

    async fn task_closed(&mut self) -> bool {
        task_closed(self.shared, self.token).await
    }

    fn start_owner(&mut self, attempt: u32) {
        use tracing::Instrument;
        // Prepared here (the job file and its log file), launched in the background.
        match prepare(
            self.shared,
            self.delivery,
            self.spec,
            self.token,
            self.token_hash,
            attempt,
        ) {
            Ok(job) => {
                let warm_up = owned::warm_up(self.shared.clone(), job);
                self.warm = Some(tokio::spawn(warm_up.in_current_span()));
            }
            // Said again, and reported, if the job is to run: see `owned::run`.
            Err(reason) => {
                tracing::debug!(reason = %reason, "cannot prepare the job's owner while its task is checked")
            }
        }
    }

    fn record_interrupted(&mut self, state: &LockState) {
        if let Some(held) = self.held.as_mut() {
            if let Err(e) = held.write_state(state) {
                tracing::warn!(error = %e, "cannot record the interruption in the lock state");
            }
        }
    }

    async fn store(&mut self, outcome: &Outcome, run: Option<&LockState>) -> bool {
        if run.is_some_and(|r| !r.is_final()) {
            // A run that died with its host ends here, on whichever agent found it.
            job_end_metrics(
                self.shared,
                (
                    &self.spec.workflow_id,
                    &self.spec.workflow_execution_id,
                    &self.spec.job_name,
                ),
                outcome,
                None,
                None,
            );
        }
        let audit = run.map(|previous| run_record(self.shared, self.spec, previous, outcome));
        let token = match outcome {
            Outcome::Cancelled { .. } => None,
            _ => Some(self.token),
        };
        store(self.shared, token, outcome, audit, None)
    }

    async fn delete(&mut self) {
        delete(self.shared, self.delivery).await
    }

    fn release(&mut self) {
        if let Some(held) = self.held.take() {
            if let Err(e) = held.release() {
                tracing::warn!(error = %e, "cannot release the job's lock cleanly");
            }
        }
    }
}
