//! The [`Shipper`]: one per daemon; starts, resumes and keeps track of shipments.

use std::collections::HashSet;
use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::Instrument;

use super::shipment::{run_shipment, Inner, Shipment};
use super::state::{load_state, save_state, Position, ShipState};
use super::ShipperError;
use crate::aws::retry::RetryPolicy;
use crate::config::CloudWatchSettings;

/// Ships job logs to one log group; built once per daemon, cheap to clone.
#[derive(Debug, Clone)]
pub struct Shipper {
    inner: Arc<Inner>,
}

impl Shipper {
    /// `state_dir` is `[agent] state_dir`; the shipments live in its `shipper/`.
    pub fn new(
        client: aws_sdk_cloudwatchlogs::Client,
        settings: &CloudWatchSettings,
        state_dir: &Path,
    ) -> Result<Shipper, ShipperError> {
        let dir = state_dir.join("shipper");
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&dir)
            .map_err(|source| ShipperError::StateDir {
                path: dir.clone(),
                source,
            })?;
        Ok(Shipper {
            inner: Arc::new(Inner {
                client,
                log_group: settings.log_group.clone(),
                create_group: settings.create_group,
                flush_interval: settings.flush_interval,
                // Capped low enough that shipping resumes within seconds of an outage's end.
                policy: RetryPolicy {
                    max: Duration::from_secs(10),
                    ..RetryPolicy::default()
                },
                state_dir: dir,
                active: Mutex::new(HashSet::new()),
            }),
        })
    }

    pub fn log_group(&self) -> &str {
        &self.inner.log_group
    }

    fn state_path(&self, log_file: &Path) -> PathBuf {
        let digest = hex::encode(Sha256::digest(log_file.as_os_str().as_encoded_bytes()));
        self.inner.state_dir.join(format!("{}.json", &digest[..16]))
    }

    /// Starts shipping a running job's log file to `log_stream`, from its beginning. Must be
    /// called inside the tokio runtime. The shipment is recorded on disk first, so a restart
    /// resumes it.
    pub fn start(&self, log_file: &Path, log_stream: &str) -> Result<Shipment, ShipperError> {
        let state = ShipState {
            log_file: log_file.to_path_buf(),
            log_group: self.inner.log_group.clone(),
            log_stream: log_stream.to_string(),
            position: Position::default(),
            in_flight: None,
        };
        let path = self.state_path(log_file);
        save_state(&path, &state)?;
        Ok(self.spawn(path, state, false))
    }

    /// Resumes the shipment of a job that is still running (adopted after an agent restart)
    /// from the position saved on disk; starts it from the beginning when none was saved.
    pub fn resume(&self, log_file: &Path, log_stream: &str) -> Result<Shipment, ShipperError> {
        let path = self.state_path(log_file);
        match load_state(&path) {
            Ok(state) if state.log_stream == log_stream => {
                tracing::info!(log_file = %state.log_file.display(), log_stream = %state.log_stream, offset = state.position.offset, "resuming log shipment of a running job");
                Ok(self.spawn(path, state, false))
            }
            _ => self.start(log_file, log_stream),
        }
    }

    /// Resumes every shipment an earlier run left unfinished whose job has ended, that is
    /// every one but those of `running` (log files of jobs still running under their owners,
    /// which [`Shipper::resume`] takes up). Returns how many were resumed. Call once at
    /// start, before old logs are cleaned up.
    pub fn resume_all(&self, running: &HashSet<PathBuf>) -> usize {
        let entries = match fs::read_dir(&self.inner.state_dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %self.inner.state_dir.display(), error = %e, "cannot list unfinished log shipments");
                return 0;
            }
        };
        let mut resumed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let state = match load_state(&path) {
                Ok(state) => state,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an unreadable log shipment state");
                    continue;
                }
            };
            if running.contains(&state.log_file) {
                continue;
            }
            if !state.log_file.exists() {
                tracing::warn!(log_file = %state.log_file.display(), log_stream = %state.log_stream, "the log file of an unfinished shipment is gone; forgetting it");
                let _ = fs::remove_file(&path);
                continue;
            }
            tracing::info!(log_file = %state.log_file.display(), log_stream = %state.log_stream, offset = state.position.offset, "resuming log shipment");
            // Nothing waits for it: dropping the handle marks the job as ended.
            drop(self.spawn(path, state, true));
            resumed += 1;
        }
        resumed
    }

    fn spawn(&self, state_path: PathBuf, state: ShipState, job_ended: bool) -> Shipment {
        let (ended_tx, ended_rx) = watch::channel(job_ended);
        let (caught_tx, caught_rx) = watch::channel(false);
        let log_stream = state.log_stream.clone();
        let fresh = self.inner.active().insert(state.log_file.clone());
        if fresh {
            // Pinned now, before any cleanup can run, and for as long as the task lives.
            let pin = match crate::joblog::pin(&state.log_file) {
                Ok(pin) => Some(pin),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot pin the job log against cleanup");
                    None
                }
            };
            let inner = self.inner.clone();
            let span = tracing::info_span!("ship", log_stream = %state.log_stream);
            tokio::spawn(
                async move {
                    let log_file = state.log_file.clone();
                    run_shipment(&inner, state_path, state, ended_rx, caught_tx).await;
                    inner.active().remove(&log_file);
                    drop(pin);
                }
                .instrument(span),
            );
        } else {
            tracing::warn!(log_file = %state.log_file.display(), "this log file is already being shipped");
        }
        Shipment::new(log_stream, ended_tx, caught_rx)
    }
}
