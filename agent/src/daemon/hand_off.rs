//! Shutdown (SIGTERM) is a hand-off: intake stops, the running jobs keep running under their
//! owners (the next agent adopts them), the outbox gets a short last chance to deliver, and
//! the process exits within [`HAND_OFF_BOUND`].

use crate::intake::socket::SubmitReply;
use crate::signals::Control;
use std::time::Duration;

use super::receive::{return_unstarted, HandOff, Loop};
use super::{control, JobStop, HAND_OFF_BOUND};

impl Loop {
    /// Shutdown: a hand-off (see [`Daemon::run`]).
    pub(super) async fn hand_off(mut self, h: HandOff<'_>) {
        let HandOff {
            socket_task,
            mut submit_rx,
            control_task,
            background,
            notifier,
            controls,
            mut controls_open,
            mut now,
        } = h;
        let shared = self.shared.clone();
        // Shutdown: a hand-off. Intake stops here: nothing new is received from now on. A
        // receive still in flight may yet hand us messages; they go straight back to the
        // queue, for another agent.
        let began = tokio::time::Instant::now();
        self.first = None;
        if let Some(task) = socket_task {
            task.abort();
            let _ = task.await;
        }
        submit_rx.close();
        while let Ok(submission) = submit_rx.try_recv() {
            let _ = submission.reply.send(SubmitReply::ShuttingDown);
        }
        if let Some(settings) = &shared.config.socket {
            let _ = std::fs::remove_file(&settings.path);
        }
        let returning = self.receiving.take().and_then(|task| {
            let sqs = shared.sqs.clone()?;
            Some(tokio::spawn(return_unstarted(sqs, task)))
        });
        tracing::info!(
            running = self.jobs.len(),
            "shutting down: intake stopped; running jobs keep running under their owners and the next agent adopts them"
        );
        notifier.stopping(&self.status());
        let _ = self.jobs_stop_tx.send(JobStop::HandOff);
        let deadline = began + HAND_OFF_BOUND;
        // The watchers return at once; a job in the middle of its hand-over finishes that
        // first (a few milliseconds), so none is left half started.
        let watchers_done = deadline - Duration::from_secs(2);
        while !self.jobs.is_empty() && !now {
            tokio::select! {
                _ = self.jobs.join_next() => {}
                _ = tokio::time::sleep_until(watchers_done) => break,
                control = controls.recv(), if controls_open => match control {
                    Some(Control::Stop(_)) => now = true,
                    Some(Control::Reload) => {
                        tracing::info!("not reloading the config: the agent is shutting down")
                    }
                    None => controls_open = false,
                },
            }
        }
        self.jobs.abort_all();
        // The final outcomes are in the outbox; give delivery a bounded last chance.
        while !now
            && shared.outbox.len().unwrap_or(0) > 0
            && tokio::time::Instant::now() + Duration::from_millis(500) < deadline
        {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                control = controls.recv(), if controls_open => match control {
                    Some(Control::Stop(_)) => now = true,
                    Some(Control::Reload) => {}
                    None => controls_open = false,
                },
            }
        }
        if let Some(task) = returning {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), task).await;
        }
        background.housekeeping.abort();
        if let Some(metrics) = shared.metrics.get() {
            self.write_gauges();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            metrics.finish(left.min(Duration::from_millis(500))).await;
        }
        if let Some(task) = control_task {
            task.abort();
        }
        let _ = std::fs::remove_file(shared.config.agent.state_dir.join(control::SOCKET));
        let _ = background.outbox_stop_tx.send(true);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Ok(Ok(exit)) = tokio::time::timeout(left, background.worker).await {
            if exit.pending > 0 {
                tracing::warn!(
                    pending = exit.pending,
                    "outcomes left in the outbox; they are delivered after the next start"
                );
            }
        }
    }
}
