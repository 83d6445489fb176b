//! One job with no intake at all: [`Daemon::run_one`], for `rsql-wrapper run` on hosts
//! without the daemon.

use crate::lock::{self};
use crate::signals::{Control, Controls};
use std::time::Duration;
use tokio::sync::watch;
use tracing::Instrument;

use super::delivery::Step;
use super::live::run_delivery;
use super::validate::fail_invalid;
use super::{job_span, Daemon, DaemonError, JobStop, OneJob, Source};
use crate::outcome::Outcome;
use crate::stop::StopLevel;

impl Daemon {
    /// Runs one job the way the daemon runs a socket job (lock, supervision, heartbeats,
    /// logs, outbox), then delivers the outbox until it is empty or `report_timeout` has
    /// passed. `body` is a job message (see `job`); an invalid one that carries a token has
    /// its task failed with `Rsql.InvalidJob`. A stop request from `controls` stops the job
    /// at once (SIGTERM, `kill_grace`, SIGKILL) and reports it `Rsql.Interrupted`; a second
    /// one kills it.
    ///
    /// Entries left in the outbox by an earlier run go out in the same drain.
    pub async fn run_one(
        self,
        body: &[u8],
        mut controls: Controls,
        report_timeout: Duration,
    ) -> Result<OneJob, DaemonError> {
        let shared = self.shared.clone();
        let spec = match shared.parse_job(body) {
            Ok(spec) => spec,
            Err(invalid) => {
                let reason = invalid.error.to_string();
                let failed_task = match invalid.task_token {
                    Some(token) => {
                        tracing::warn!(
                            token_hash = %lock::token_hash(&token),
                            reason = %reason,
                            "rejected the job: failing its task with Rsql.InvalidJob"
                        );
                        fail_invalid(&shared, token, &reason)?;
                        true
                    }
                    None => {
                        tracing::warn!(reason = %reason, "rejected the job; it has no usable task token");
                        false
                    }
                };
                let delivered = self.deliver(report_timeout).await;
                return Ok(OneJob::Rejected {
                    reason,
                    failed_task,
                    delivered,
                });
            }
        };
        let Some(token) = spec.task_token.clone() else {
            return Ok(OneJob::Rejected {
                reason: "the job has no task token".into(),
                failed_task: false,
                delivered: true,
            });
        };
        let token_hash = lock::token_hash(&token);
        let span = job_span(&spec, &token_hash);
        let (stop_tx, stop_rx) = watch::channel(JobStop::Run);
        let stop_probe = stop_tx.subscribe();
        let forward_stops = async move {
            while let Some(control) = controls.recv().await {
                let level = match control {
                    Control::Stop(level) => level,
                    Control::Reload => {
                        tracing::info!("a standalone run does not reload its config");
                        continue;
                    }
                };
                // The first stop request stops the job (there is no drain for one job);
                // the next one kills it.
                let next = match *stop_tx.borrow() {
                    JobStop::Run => level,
                    _ => StopLevel::Kill,
                };
                let _ = stop_tx.send(JobStop::Stop(next));
            }
            std::future::pending::<()>().await
        };
        let run =
            run_delivery(shared, Source::Local, spec, token, token_hash, stop_rx).instrument(span);
        let delivered = tokio::select! {
            d = run => d,
            _ = forward_stops => unreachable!("the stop forwarder never ends"),
        };
        Ok(match delivered {
            // A closed task is acknowledged with nothing to report.
            Step::Acknowledged(outcome) => OneJob::Finished {
                outcome: outcome.unwrap_or(Outcome::Cancelled {
                    message: "nothing to report".into(),
                }),
                stopped: *stop_probe.borrow() != JobStop::Run,
                delivered: self.deliver(report_timeout).await,
            },
            Step::Elsewhere(holder) => OneJob::RunningElsewhere { holder },
            // A delivery ends in one of the states above; anything else stored nothing.
            _ => OneJob::NotStored,
        })
    }

    /// Delivers the outbox until it is empty (true) or `timeout` has passed (false: what is
    /// left goes out after the next start).
    async fn deliver(&self, timeout: Duration) -> bool {
        let shared = &self.shared;
        let exit = shared
            .outbox
            .drain(
                &shared.sfn,
                shared.audit_table.as_ref(),
                &self.policy,
                tokio::time::sleep(timeout),
            )
            .await;
        if exit.pending > 0 {
            tracing::warn!(
                pending = exit.pending,
                timeout_secs = timeout.as_secs(),
                outbox = %shared.outbox.dir().display(),
                "reports not delivered in time; they stay in the outbox and go out after the next start"
            );
        }
        exit.pending == 0
    }
}
