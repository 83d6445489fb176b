//! The end of a delivery, in this order: the outcome made durable in the outbox, then the
//! message deleted and the lock released. A crash anywhere in between leaves a redelivery
//! that replays, never a lost report.

use super::delivery::Step;
use super::{Shared, Source};
use crate::aws::retry::RetryPolicy;
use crate::intake::sqs::Delivery;
use crate::lock::JobLock;
use crate::outcome::Outcome;
use crate::report::audit::JobAuditRecord;
use crate::report::outbox::{Callback, OutboxEntry};

/// Makes the outcome durable, then deletes the message and releases the lock, in that
/// order: a crash anywhere in between leaves a redelivery that replays, never a lost report.
pub(super) async fn finish(
    shared: &Shared,
    delivery: &Source,
    held: Option<JobLock>,
    token: Option<&str>,
    outcome: Outcome,
    audit: Option<JobAuditRecord>,
) -> Step {
    let stored = finish_stored(shared, delivery, token, outcome, audit, None).await;
    if let Some(held) = held {
        if let Err(e) = held.release() {
            tracing::warn!(error = %e, "cannot release the job's lock cleanly");
        }
    }
    stored
}

/// Stores the outcome durably in the outbox (under `outbox_id` when given, so storing it
/// again replaces it), then deletes the message.
pub(super) async fn finish_stored(
    shared: &Shared,
    delivery: &Source,
    token: Option<&str>,
    outcome: Outcome,
    audit: Option<JobAuditRecord>,
    outbox_id: Option<String>,
) -> Step {
    if !store(shared, token, &outcome, audit, outbox_id) {
        return Step::Left;
    }
    delete(shared, delivery).await;
    Step::Acknowledged(Some(outcome))
}

/// Puts the callback (when there is a token) and the audit record in the outbox, durably.
/// `false`: it could not be stored, and the message must be left to come back.
pub(super) fn store(
    shared: &Shared,
    token: Option<&str>,
    outcome: &Outcome,
    audit: Option<JobAuditRecord>,
    outbox_id: Option<String>,
) -> bool {
    let callback = token.and_then(|_| Callback::from_outcome(outcome));
    let audit = audit.filter(|_| shared.audit_table.is_some());
    if callback.is_none() && audit.is_none() {
        return true;
    }
    let mut entry = OutboxEntry::new(token.map(str::to_string), callback, audit);
    if let Some(id) = outbox_id {
        entry.id = id;
    }
    match shared.outbox.put(&entry) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "cannot store the outcome durably; leaving the message to be redelivered and replayed");
            false
        }
    }
}

pub(super) async fn delete(shared: &Shared, source: &Source) {
    if let Source::Sqs(delivery) = source {
        delete_message(shared, delivery).await;
    }
}

pub(super) async fn delete_message(shared: &Shared, delivery: &Delivery) {
    let Some(sqs) = &shared.sqs else {
        return;
    };
    let policy = RetryPolicy::default();
    for attempt in 0..5 {
        match sqs.delete(&delivery.receipt_handle).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "cannot delete the message");
                tokio::time::sleep(policy.delay(attempt)).await;
            }
        }
    }
    // Harmless: the copy comes back and replays the recorded outcome.
    tracing::warn!(message_id = %delivery.message_id, "giving up deleting the message; its redelivery will replay the outcome");
}
