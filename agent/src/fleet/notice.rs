//! What the instance metadata says about this instance's end, read into [`Notice`]s: the
//! paths, the documents' shapes, and [`Reader`], which reads them once per poll and gives each
//! notice once.

use std::time::{Duration, SystemTime};

use crate::imds::Imds;

/// `/latest/meta-data/autoscaling/target-lifecycle-state`: 404 outside a group.
pub const LIFECYCLE_STATE: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";
/// `/latest/meta-data/spot/instance-action`: 404 until a Spot interruption is scheduled.
pub const SPOT_ACTION: &str = "/latest/meta-data/spot/instance-action";
/// `/latest/meta-data/events/recommendations/rebalance`: 404 until a recommendation.
pub const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";

/// Something that ends this instance's part in the fleet. Every notice drains the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The group is terminating this instance (scale-in, or a replacement): running jobs
    /// finish, then the lifecycle action is completed.
    ScaleIn,
    /// A Spot interruption at `deadline`: jobs still running `spot_stop_margin` before it
    /// are stopped and reported `Rsql.Interrupted`.
    Spot {
        action: String,
        deadline: SystemTime,
    },
    /// A Spot rebalance recommendation: an interruption may follow; take no new work.
    Rebalance,
}

/// The target lifecycle state says the instance is on its way out.
pub fn is_terminating(state: &str) -> bool {
    // `Terminated` is what AWS documents for a scale-in; a warm pool's instances read
    // `Warmed:Terminated`. Both mean this instance will not run jobs again.
    state == "Terminated" || state.ends_with(":Terminated")
}

/// Reads a `spot/instance-action` document: `{"action": "terminate", "time": "…Z"}`.
pub fn spot_action(body: &str) -> Result<Notice, String> {
    #[derive(serde::Deserialize)]
    struct Action {
        action: String,
        time: String,
    }
    let a: Action = serde_json::from_str(body).map_err(|e| {
        format!("spot/instance-action is not the documented JSON ({e}): {body:.200}")
    })?;
    let deadline = humantime::parse_rfc3339_weak(&a.time)
        .map_err(|e| format!("spot/instance-action time {:?}: {e}", a.time))?;
    Ok(Notice::Spot {
        action: a.action,
        deadline,
    })
}

/// Reads the three notices each poll; remembers what it has already given.
#[derive(Debug)]
pub struct Reader {
    terminating: bool,
    spot: bool,
    rebalance: bool,
    failures: u32,
    spot_stop_margin: Duration,
}

/// A run of failed reads this long is worth one warning.
const FAILURES_WORTH_A_LINE: u32 = 10;

impl Reader {
    pub fn new(spot_stop_margin: Duration) -> Reader {
        Reader {
            terminating: false,
            spot: false,
            rebalance: false,
            failures: 0,
            spot_stop_margin,
        }
    }

    /// Nothing more can come: the instance is being terminated and reclaimed.
    pub fn done(&self) -> bool {
        self.terminating && self.spot
    }

    /// One round of reads; the notices not given before.
    pub async fn read(&mut self, imds: &Imds) -> Vec<Notice> {
        let mut new = Vec::new();
        let mut failed = None;
        if !self.terminating {
            match imds.get(LIFECYCLE_STATE).await {
                Ok(Some(state)) if is_terminating(&state) => {
                    self.terminating = true;
                    tracing::warn!(
                        lifecycle_state = %state,
                        "the Auto Scaling group is terminating this instance: draining; running jobs finish, then the lifecycle action is completed"
                    );
                    new.push(Notice::ScaleIn);
                }
                Ok(_) => {}
                Err(e) => failed = Some(e.to_string()),
            }
        }
        if !self.spot {
            match imds.get(SPOT_ACTION).await {
                Ok(Some(body)) => match spot_action(&body) {
                    Ok(n) => {
                        self.spot = true;
                        if let Notice::Spot { action, deadline } = &n {
                            tracing::warn!(
                                %action,
                                deadline = %humantime::format_rfc3339_seconds(*deadline),
                                "Spot interruption notice: draining; jobs still running {} before the deadline are stopped and reported Rsql.Interrupted",
                                humantime::format_duration(self.spot_stop_margin)
                            );
                        }
                        new.push(n);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the Spot interruption notice")
                    }
                },
                Ok(None) => {}
                Err(e) => failed = Some(e.to_string()),
            }
        }
        if !self.rebalance && !self.spot {
            match imds.get(REBALANCE).await {
                Ok(Some(_)) => {
                    self.rebalance = true;
                    tracing::warn!("Spot rebalance recommendation: draining, so that an interruption finds no job running; the instance takes no new job until the agent restarts");
                    new.push(Notice::Rebalance);
                }
                Ok(None) => {}
                Err(e) => failed = Some(e.to_string()),
            }
        }
        match failed {
            None => self.failures = 0,
            Some(e) => {
                self.failures += 1;
                // A lost read is retried at the next poll; only a run of them is worth a line.
                if self.failures == FAILURES_WORTH_A_LINE {
                    tracing::warn!(error = %e, "cannot read the instance metadata; scale-in and Spot notices may be seen late");
                }
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_spot_action_gives_its_deadline() {
        let n = spot_action(r#"{"action": "terminate", "time": "2026-12-07T17:02:00Z"}"#).unwrap();
        let want = humantime::parse_rfc3339("2026-12-07T17:02:00Z").unwrap();
        assert_eq!(
            n,
            Notice::Spot {
                action: "terminate".into(),
                deadline: want
            }
        );
        assert!(want > SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    }

    #[test]
    fn a_malformed_spot_action_says_what_it_got() {
        let e = spot_action("not json").unwrap_err();
        assert!(e.contains("not json"), "{e}");
        let e = spot_action(r#"{"action": "stop", "time": "soon"}"#).unwrap_err();
        assert!(e.contains("\"soon\""), "{e}");
    }

    #[test]
    fn only_terminated_states_are_terminating() {
        assert!(is_terminating("Terminated"));
        assert!(is_terminating("Warmed:Terminated"));
        for s in ["InService", "Standby", "Detached", "Warmed:Stopped", ""] {
            assert!(!is_terminating(s), "{s}");
        }
    }
}
