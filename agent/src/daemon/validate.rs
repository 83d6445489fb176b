//! What comes in: an SQS message or a socket submission is parsed under the live rules and
//! becomes a delivery, or is rejected (its task failed with `Rsql.InvalidJob` when it
//! carries a token).

use crate::intake::socket::{self};
use crate::intake::sqs::Delivery;
use crate::job::JobSpec;
use crate::lock::{self};
use crate::outcome::ErrorName;
use crate::report::outbox::{Callback, OutboxEntry, OutboxError};
use std::sync::Arc;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::Instrument;

use super::ack::delete_message;
use super::live::run_delivery;
use super::{failure, job_span, JobStop, Shared, Source};

/// Stores the `Rsql.InvalidJob` failure of a job that was rejected but carried its token, so
/// its workflow hears now instead of at its timeout.
pub(super) fn fail_invalid(
    shared: &Shared,
    token: String,
    reason: &str,
) -> Result<(), OutboxError> {
    let outcome = failure(ErrorName::InvalidJob, reason.to_string());
    let entry = OutboxEntry::new(Some(token), Callback::from_outcome(&outcome), None);
    shared.outbox.put(&entry)
}

/// The life of one SQS delivery.
pub(super) async fn handle(
    shared: Arc<Shared>,
    delivery: Delivery,
    shutdown: watch::Receiver<JobStop>,
    _permit: OwnedSemaphorePermit,
) {
    let spec = match shared.parse_job(delivery.body.as_bytes()) {
        Ok(spec) => spec,
        Err(invalid) => {
            let reason = invalid.error.to_string();
            match invalid.task_token {
                Some(token) => {
                    tracing::warn!(
                        message_id = %delivery.message_id,
                        token_hash = %lock::token_hash(&token),
                        reason = %reason,
                        "rejected a job message: failing its task with Rsql.InvalidJob"
                    );
                    if let Err(e) = fail_invalid(&shared, token, &reason) {
                        // Not durable: keep the message so it comes back and is tried again.
                        tracing::error!(error = %e, "cannot store the outcome of a rejected message; leaving it in the queue");
                        return;
                    }
                }
                None => tracing::warn!(
                    message_id = %delivery.message_id,
                    reason = %reason,
                    "rejected a job message with no usable task token: nobody can be told, deleting it"
                ),
            }
            delete_message(&shared, &delivery).await;
            return;
        }
    };
    let Some(token) = spec.task_token.clone() else {
        return;
    };
    let token_hash = lock::token_hash(&token);
    let span = job_span(&spec, &token_hash);
    run_delivery(
        shared,
        Source::Sqs(delivery),
        spec,
        token,
        token_hash,
        shutdown,
    )
    .instrument(span)
    .await;
}

/// Validates a socket submission the way `handle` validates an SQS message. A broken job
/// that carries a token still gets its `Rsql.InvalidJob` callback (through the outbox), so
/// the workflow does not wait for its timeout; the submitter is told why either way.
pub(super) fn socket_validator(shared: &Arc<Shared>) -> socket::Validate {
    let shared = shared.clone();
    Arc::new(
        move |body: &[u8], peer: &socket::Peer| match shared.parse_job(body) {
            Ok(spec) => Ok(spec),
            Err(invalid) => {
                let reason = invalid.error.to_string();
                match invalid.task_token {
                    Some(token) => {
                        tracing::warn!(
                            uid = peer.uid,
                            pid = peer.pid,
                            token_hash = %lock::token_hash(&token),
                            reason = %reason,
                            "rejected a socket job: failing its task with Rsql.InvalidJob"
                        );
                        if let Err(e) = fail_invalid(&shared, token, &reason) {
                            tracing::error!(error = %e, "cannot store the outcome of a rejected socket job");
                        }
                    }
                    None => tracing::warn!(
                        uid = peer.uid,
                        pid = peer.pid,
                        reason = %reason,
                        "rejected a socket job with no usable task token"
                    ),
                }
                Err(reason)
            }
        },
    )
}

/// The life of one accepted socket job: the same path as an SQS delivery, without SQS.
pub(super) async fn handle_submission(
    shared: Arc<Shared>,
    spec: JobSpec,
    shutdown: watch::Receiver<JobStop>,
    _permit: OwnedSemaphorePermit,
) {
    let Some(token) = spec.task_token.clone() else {
        return;
    };
    let token_hash = lock::token_hash(&token);
    let span = job_span(&spec, &token_hash);
    run_delivery(shared, Source::Local, spec, token, token_hash, shutdown)
        .instrument(span)
        .await;
}
