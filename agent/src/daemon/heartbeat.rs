//! Keeping a task alive: the heartbeat period, the heartbeat loop of a watched job, the
//! heartbeat a copy sends while the job's lock is busy, and the task-open check.

use crate::lock::LockState;
use std::time::Duration;

use super::ack::delete_message;
use super::{Shared, Source};

/// Heartbeats go out at a third of the task's `HeartbeatSeconds`, within these bounds.
pub(super) const MIN_TICK: Duration = Duration::from_secs(1);

pub(super) const MAX_TICK: Duration = Duration::from_secs(300);

/// How long to wait before asking again whether a task is really closed.
pub(super) const CLOSED_RECHECK: Duration = Duration::from_secs(2);

/// The heartbeat period for a job: a third of its `heartbeat_seconds`, or the configured
/// interval when the message has none, and never longer than a third of the visibility
/// timeout (the same tick keeps the message hidden).
pub fn tick_for(
    heartbeat: Option<Duration>,
    configured: Duration,
    visibility: Duration,
) -> Duration {
    let tick = match heartbeat {
        Some(hb) => (hb / 3).clamp(MIN_TICK, MAX_TICK),
        None => configured,
    };
    tick.min((visibility / 3).max(MIN_TICK))
}

/// How soon a copy comes back when the lock's holder is not a live job (no state, a
/// finished one, or a stale lease): a mere check, which holds the lock for moments.
pub(super) const BUSY_RECHECK: Duration = Duration::from_secs(2);

/// A copy of a message whose job's lock is busy. Its task must not time out while it waits:
/// one heartbeat now (for the owner of a live job of this very token, on its behalf while
/// its agent is away; for any other copy, its own task waiting its turn), and the copy comes
/// back after one tick of its heartbeat, or at once ([`BUSY_RECHECK`]) when the holder is no
/// live job. A copy whose task is closed is deleted: nobody can report to that task any more.
pub(super) async fn keep_alive_for_owner(
    shared: &Shared,
    delivery: &Source,
    (token, token_hash, heartbeat): (&str, &str, Option<Duration>),
    holder: Option<&LockState>,
) {
    let Source::Sqs(message) = delivery else {
        return;
    };
    let Some(sqs) = &shared.sqs else { return };
    let live = shared.attempts.live();
    let lease = live.jobs.heartbeat_interval;
    let live_job = holder.is_some_and(|h| {
        !h.is_final()
            && h.heartbeat_age(std::time::SystemTime::now())
                .is_some_and(|age| age <= lease * 3)
    });
    let ours = live_job && holder.is_some_and(|h| h.token_hash == token_hash);
    match shared.sfn.heartbeat(token).await {
        Ok(()) if ours => {
            tracing::info!("the job's owner is alive (fresh lease): heartbeat sent on its behalf")
        }
        Ok(()) => tracing::info!(
            live_job,
            "heartbeat sent for this copy's task while it waits for the job's lock"
        ),
        Err(e) if e.is_task_closed() => {
            tracing::info!(reason = %e, "the task of a job running elsewhere is closed: deleting this copy");
            delete_message(shared, message).await;
            return;
        }
        Err(e) => tracing::warn!(error = %e, "heartbeat for a copy waiting for the lock failed"),
    }
    let tick = tick_for(heartbeat, lease, sqs.visibility_timeout());
    let back_in = if live_job {
        tick
    } else {
        tick.min(BUSY_RECHECK)
    };
    if let Err(e) = sqs.release(&message.receipt_handle, back_in).await {
        tracing::warn!(error = %e, "cannot shorten the copy's visibility");
    }
}

/// Whether Step Functions says the task is closed, asked twice a moment apart: an emulator
/// (and perhaps the service) may not know a token in the instant after its message was
/// sent. A failed call (network) counts as open; the heartbeat loop asks again.
pub(super) async fn task_closed(shared: &Shared, token: &str) -> bool {
    for check in 0..2 {
        if check > 0 {
            tokio::time::sleep(CLOSED_RECHECK).await;
        }
        match shared.sfn.heartbeat(token).await {
            Err(e) if e.is_task_closed() => {
                tracing::debug!(reason = %e, check, "the task answers closed");
            }
            _ => return false,
        }
    }
    true
}

/// Every tick: a Step Functions heartbeat (a closed task is said once on `closed`, so the
/// job gets stopped) and another visibility timeout for the message. Never returns.
pub(super) async fn heartbeat_loop(
    shared: &Shared,
    token: &str,
    delivery: &Source,
    tick: Duration,
    closed_tx: tokio::sync::mpsc::Sender<()>,
) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    let mut closed = false;
    loop {
        interval.tick().await;
        if !closed {
            match shared.sfn.heartbeat(token).await {
                Ok(()) => {}
                Err(e) if e.is_task_closed() => {
                    tracing::warn!(reason = %e, "the task is closed upstream: stopping the job");
                    closed = true;
                    let _ = closed_tx.try_send(());
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed; will try again next tick"),
            }
        }
        if let (Source::Sqs(delivery), Some(sqs)) = (delivery, &shared.sqs) {
            if let Err(e) = sqs.keep_hidden(&delivery.receipt_handle).await {
                tracing::warn!(error = %e, "cannot extend the message's visibility");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_tick_is_a_third_and_bounded() {
        let vis = Duration::from_secs(120);
        let cfg = Duration::from_secs(20);
        assert_eq!(
            tick_for(Some(Duration::from_secs(60)), cfg, vis),
            Duration::from_secs(20)
        );
        assert_eq!(
            tick_for(Some(Duration::from_secs(2)), cfg, vis),
            Duration::from_secs(1)
        );
        assert_eq!(tick_for(None, cfg, vis), cfg);
        assert_eq!(
            tick_for(Some(Duration::from_secs(3600)), cfg, vis),
            Duration::from_secs(40)
        );
    }
}
