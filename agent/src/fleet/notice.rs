//! What the instance metadata says about this instance's end, read into [`Notice`]s. Pure:
//! the polling is in `fleet`.

use std::time::SystemTime;

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
