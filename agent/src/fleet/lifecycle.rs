//! The Auto Scaling side of the fleet: this instance's group and terminating hooks,
//! `RecordLifecycleActionHeartbeat` while the group waits on this instance,
//! `CompleteLifecycleAction` (`CONTINUE`) after the last outcome, and scale-in protection.
//!
//! Every call here may take seconds (one attempt of up to 10 s): that is why this is a task
//! of its own, apart from the metadata watcher, so a slow call never delays a notice. A lookup
//! that fails is tried again later, never given up for the life of the agent, and only a
//! successful answer is kept.

use std::time::Duration;

use aws_sdk_autoscaling::error::{DisplayErrorContext, ProvideErrorMetadata};
use tokio::sync::watch;
use tokio::time::Instant;

use super::protection::Protection;
use super::{FleetParts, Load, Pending, Seen};

/// While the last outcomes go out, how often the outbox is looked at.
const DRAINED_CHECK: Duration = Duration::from_millis(50);
/// How long a drained instance waits for its outbox to empty before it lets the group go on
/// anyway, with a warning: longer keeps a terminating instance (and its cost) for an outage
/// of Step Functions or the audit table that the outbox could not outlast anyway.
const OUTBOX_WAIT: Duration = Duration::from_secs(3600);
/// Lookups and completions that failed are tried again within these bounds.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// This instance's place in its group.
#[derive(Debug)]
struct Group {
    name: String,
    /// `ProtectedFromScaleIn` as Auto Scaling reported it.
    protected: Option<bool>,
}

/// A terminating hook and its heartbeat timeout, when known.
#[derive(Debug, Clone)]
struct Hook {
    name: String,
    timeout: Option<Duration>,
}

/// The termination in progress.
#[derive(Debug)]
struct Ending {
    hooks: Option<Vec<Hook>>,
    next_heartbeat: Instant,
    drained_since: Option<Instant>,
    complete_at: Instant,
    complete_failures: u32,
    completed: bool,
}

pub(super) async fn run(
    parts: FleetParts,
    pending: Pending,
    mut load: watch::Receiver<Load>,
    mut seen: watch::Receiver<Seen>,
) {
    if seen.wait_for(|s| s.in_group).await.is_err() {
        return;
    }
    let instance_id = seen
        .borrow()
        .instance_id
        .clone()
        .unwrap_or_else(|| parts.instance_id.clone());
    let group = find_group(&parts, &instance_id).await;
    tracing::info!(auto_scaling_group = %group.name, %instance_id, "fleet: this instance's Auto Scaling group");
    let me = Me {
        parts: &parts,
        instance_id: &instance_id,
        group: &group,
    };
    let s = &parts.settings;
    let mut protection = Protection::new(group.protected, s.unprotect_after_idle, Instant::now());
    let mut ending: Option<Ending> = None;
    let mut seen_open = true;
    loop {
        let now = Instant::now();
        let l = *load.borrow_and_update();
        let seen_now = seen.borrow_and_update().clone();
        if seen_now.terminating && ending.is_none() {
            ending = Some(Ending {
                hooks: None,
                next_heartbeat: now,
                drained_since: None,
                complete_at: now,
                complete_failures: 0,
                completed: false,
            });
        }
        let protecting = s.protect_when_busy && ending.is_none() && !seen_now.interrupted;
        if protecting {
            if let Some(want) = protection.wanted(l.running, now) {
                me.set_protection(want, &mut protection).await;
                continue;
            }
        }
        let mut wake = protection.next_check().filter(|_| protecting);
        if let Some(e) = ending.as_mut().filter(|e| !e.completed) {
            me.ending_step(e, l, &pending).await;
            let next = if e.completed {
                None
            } else if e.drained_since.is_some() {
                Some(Instant::now() + DRAINED_CHECK)
            } else {
                Some(e.next_heartbeat)
            };
            wake = earliest(wake, next.map(|n| n.min(e.next_heartbeat)));
        }
        tokio::select! {
            changed = load.changed() => if changed.is_err() { return },
            // The watcher ends once nothing more can come; what it said stays.
            changed = seen.changed(), if seen_open => seen_open = changed.is_ok(),
            () = sleep_until(wake), if wake.is_some() => {}
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn retry_delay(failures: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1 << failures.min(6))
        .min(RETRY_MAX)
}

/// This instance, for the calls.
struct Me<'a> {
    parts: &'a FleetParts,
    instance_id: &'a str,
    group: &'a Group,
}

/// The group: `[fleet] auto_scaling_group`, else Auto Scaling's answer for this instance,
/// asked until it answers.
async fn find_group(parts: &FleetParts, instance_id: &str) -> Group {
    let mut failures = 0u32;
    loop {
        let asked = parts
            .autoscaling
            .describe_auto_scaling_instances()
            .instance_ids(instance_id)
            .send()
            .await;
        let found = match asked {
            Ok(out) => Ok(out.auto_scaling_instances().first().map(|i| Group {
                name: i.auto_scaling_group_name().unwrap_or_default().to_string(),
                protected: i.protected_from_scale_in(),
            })),
            Err(e) => Err(DisplayErrorContext(&e).to_string()),
        };
        match (&parts.settings.auto_scaling_group, found) {
            (Some(name), Ok(found)) => {
                return Group {
                    name: name.clone(),
                    protected: found.filter(|g| &g.name == name).and_then(|g| g.protected),
                }
            }
            // Without the describe permission, the configured name is enough.
            (Some(name), Err(_)) if failures >= 2 => {
                return Group {
                    name: name.clone(),
                    protected: None,
                }
            }
            (None, Ok(Some(g))) if !g.name.is_empty() => return g,
            (None, Ok(_)) => {
                if failures == 0 {
                    tracing::warn!(%instance_id, "Auto Scaling knows no group of this instance yet; asking again");
                }
            }
            (_, Err(e)) => {
                if failures == 0 {
                    tracing::warn!(%instance_id, error = %e, "cannot ask Auto Scaling about this instance; asking again (set [fleet] auto_scaling_group to skip the lookup)");
                }
            }
        }
        tokio::time::sleep(retry_delay(failures)).await;
        failures = failures.saturating_add(1);
    }
}

impl Me<'_> {
    /// One step of the termination: heartbeats while the group waits, then the completion.
    async fn ending_step(&self, e: &mut Ending, load: Load, pending: &Pending) {
        let now = Instant::now();
        if e.hooks.is_none() && now >= e.next_heartbeat {
            e.hooks = self.find_hooks().await;
        }
        let drained = load.draining && load.running == 0;
        e.drained_since = match (drained, e.drained_since) {
            (false, _) => None,
            (true, None) => Some(now),
            (true, since) => since,
        };
        if let (Some(since), Some(hooks)) = (e.drained_since, &e.hooks) {
            let left = pending();
            let waited = now.saturating_duration_since(since);
            if (left == 0 || waited >= OUTBOX_WAIT) && now >= e.complete_at {
                if left > 0 {
                    tracing::warn!(pending = left, "outcomes are still in the outbox after an hour: completing the lifecycle action anyway; they are lost with this instance");
                }
                if self.complete(hooks).await {
                    e.completed = true;
                    return;
                }
                e.complete_failures = e.complete_failures.saturating_add(1);
                e.complete_at = Instant::now() + retry_delay(e.complete_failures);
            }
        }
        if Instant::now() >= e.next_heartbeat {
            let period = match &e.hooks {
                Some(hooks) => {
                    self.record_heartbeat(hooks).await;
                    heartbeat_period(self.parts.settings.lifecycle_heartbeat, hooks)
                }
                // The hooks are not known yet: ask again soon.
                None => RETRY_MIN * 5,
            };
            e.next_heartbeat = Instant::now() + period;
        }
    }

    /// The terminating hooks: `[fleet] lifecycle_hook`, else each of the group's
    /// `EC2_INSTANCE_TERMINATING` hooks, with their heartbeat timeouts. `None` when Auto
    /// Scaling could not be asked and no hook is configured (asked again later).
    async fn find_hooks(&self) -> Option<Vec<Hook>> {
        let configured = self.parts.settings.lifecycle_hook.clone();
        let mut ask = self
            .parts
            .autoscaling
            .describe_lifecycle_hooks()
            .auto_scaling_group_name(&self.group.name);
        if let Some(hook) = &configured {
            ask = ask.lifecycle_hook_names(hook);
        }
        match ask.send().await {
            Ok(out) => {
                let mut hooks: Vec<Hook> = out
                    .lifecycle_hooks()
                    .iter()
                    .filter(|h| {
                        h.lifecycle_transition() == Some("autoscaling:EC2_INSTANCE_TERMINATING")
                    })
                    .filter_map(|h| {
                        Some(Hook {
                            name: h.lifecycle_hook_name()?.to_string(),
                            timeout: h
                                .heartbeat_timeout()
                                .and_then(|t| u64::try_from(t).ok())
                                .map(Duration::from_secs),
                        })
                    })
                    .collect();
                if let (Some(name), true) = (&configured, hooks.is_empty()) {
                    hooks.push(Hook {
                        name: name.clone(),
                        timeout: None,
                    });
                }
                if hooks.is_empty() {
                    tracing::info!(auto_scaling_group = %self.group.name, "the group has no terminating lifecycle hook: nothing to heartbeat or complete");
                }
                Some(hooks)
            }
            Err(e) => {
                let error = DisplayErrorContext(&e);
                match configured {
                    // The configured name is enough to heartbeat and complete.
                    Some(name) => {
                        tracing::warn!(auto_scaling_group = %self.group.name, %error, "cannot read the lifecycle hook's heartbeat timeout; heartbeating every [fleet] lifecycle_heartbeat");
                        Some(vec![Hook {
                            name,
                            timeout: None,
                        }])
                    }
                    None => {
                        tracing::warn!(auto_scaling_group = %self.group.name, %error, "cannot list the group's lifecycle hooks; asking again (or set [fleet] lifecycle_hook)");
                        None
                    }
                }
            }
        }
    }

    async fn record_heartbeat(&self, hooks: &[Hook]) {
        for hook in hooks {
            let sent = self
                .parts
                .autoscaling
                .record_lifecycle_action_heartbeat()
                .auto_scaling_group_name(&self.group.name)
                .lifecycle_hook_name(&hook.name)
                .instance_id(self.instance_id)
                .send()
                .await;
            match sent {
                Ok(_) => {
                    tracing::debug!(lifecycle_hook = %hook.name, "lifecycle action heartbeat sent")
                }
                Err(e) => tracing::warn!(
                    lifecycle_hook = %hook.name,
                    error = %DisplayErrorContext(&e),
                    "cannot heartbeat the lifecycle action; trying again at the next heartbeat"
                ),
            }
        }
    }

    /// `CompleteLifecycleAction` (`CONTINUE`) for each hook; true once none is left to
    /// complete.
    async fn complete(&self, hooks: &[Hook]) -> bool {
        let mut all = true;
        for hook in hooks {
            let sent = self
                .parts
                .autoscaling
                .complete_lifecycle_action()
                .auto_scaling_group_name(&self.group.name)
                .lifecycle_hook_name(&hook.name)
                .instance_id(self.instance_id)
                .lifecycle_action_result("CONTINUE")
                .send()
                .await;
            match sent {
                Ok(_) => {
                    tracing::info!(lifecycle_hook = %hook.name, "every outcome is delivered: completed the lifecycle action; the group terminates this instance")
                }
                // No action waits on this hook: it timed out, or there was none.
                Err(e) if no_action(&e) => {
                    tracing::info!(lifecycle_hook = %hook.name, error = %DisplayErrorContext(&e), "no lifecycle action to complete")
                }
                Err(e) => {
                    all = false;
                    tracing::warn!(lifecycle_hook = %hook.name, error = %DisplayErrorContext(&e), "cannot complete the lifecycle action; trying again");
                }
            }
        }
        all
    }

    async fn set_protection(&self, want: bool, p: &mut Protection) {
        let sent = self
            .parts
            .autoscaling
            .set_instance_protection()
            .auto_scaling_group_name(&self.group.name)
            .instance_ids(self.instance_id)
            .protected_from_scale_in(want)
            .send()
            .await;
        match sent {
            Ok(_) => {
                p.set(want);
                tracing::info!(
                    protected = want,
                    "{}",
                    if want {
                        "jobs are running: protected this instance from scale-in"
                    } else {
                        "idle: cleared this instance's scale-in protection"
                    }
                );
            }
            Err(e) => {
                p.failed(Instant::now());
                tracing::warn!(protected = want, error = %DisplayErrorContext(&e), "cannot set this instance's scale-in protection; trying again later");
            }
        }
    }
}

/// "No active Lifecycle Action found": nothing is waiting on this hook.
fn no_action<E: ProvideErrorMetadata>(e: &E) -> bool {
    e.code() == Some("ValidationError")
        && e.message()
            .is_some_and(|m| m.contains("No active Lifecycle Action"))
}

/// The heartbeat period: `[fleet] lifecycle_heartbeat`, but at most a third of the shortest
/// hook timeout, so a hook of 30 s is kept alive too.
fn heartbeat_period(configured: Duration, hooks: &[Hook]) -> Duration {
    hooks
        .iter()
        .filter_map(|h| h.timeout)
        .map(|t| (t / 3).max(Duration::from_secs(1)))
        .fold(configured, Duration::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(timeout: Option<u64>) -> Hook {
        Hook {
            name: "h".into(),
            timeout: timeout.map(Duration::from_secs),
        }
    }

    #[test]
    fn the_heartbeat_keeps_the_shortest_hook_alive() {
        let configured = Duration::from_secs(60);
        assert_eq!(heartbeat_period(configured, &[]), configured);
        assert_eq!(heartbeat_period(configured, &[hook(None)]), configured);
        assert_eq!(
            heartbeat_period(configured, &[hook(Some(3600))]),
            configured
        );
        assert_eq!(
            heartbeat_period(configured, &[hook(Some(3600)), hook(Some(30))]),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn retries_back_off_to_a_minute() {
        assert_eq!(retry_delay(0), Duration::from_secs(1));
        assert_eq!(retry_delay(3), Duration::from_secs(8));
        assert_eq!(retry_delay(30), Duration::from_secs(60));
    }
}
