//! When to set and clear scale-in protection: set while any job runs, cleared once the
//! instance has been idle for `unprotect_after_idle`, so the group scales in idle instances
//! and an instance between two jobs of a stage keeps its protection. A call is made only
//! when the wanted state differs from the known one, so a busy host makes one call per busy
//! spell, never one per job. Pure: `fleet` makes the calls.

use std::time::Duration;

use tokio::time::Instant;

/// After a failed call, wait this long (doubling, up to the ceiling) before the next one.
const BACKOFF: Duration = Duration::from_secs(30);
const BACKOFF_CEILING: Duration = Duration::from_secs(900);

#[derive(Debug)]
pub struct Protection {
    /// What Auto Scaling holds, as last seen or set; `None`: unknown.
    protected: Option<bool>,
    idle_since: Option<Instant>,
    after_idle: Duration,
    failures: u32,
    retry_at: Option<Instant>,
}

impl Protection {
    pub fn new(protected: Option<bool>, after_idle: Duration, now: Instant) -> Protection {
        Protection {
            protected,
            // An agent that starts idle counts its idle time from its start.
            idle_since: Some(now),
            after_idle,
            failures: 0,
            retry_at: None,
        }
    }

    /// The call to make now, if any: `Some(true)` to protect, `Some(false)` to clear.
    pub fn wanted(&mut self, running: usize, now: Instant) -> Option<bool> {
        let want = if running > 0 {
            self.idle_since = None;
            true
        } else {
            let since = *self.idle_since.get_or_insert(now);
            if now.saturating_duration_since(since) < self.after_idle {
                return None;
            }
            false
        };
        if self.protected == Some(want) || self.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        Some(want)
    }

    /// The call for `value` succeeded.
    pub fn set(&mut self, value: bool) {
        self.protected = Some(value);
        self.failures = 0;
        self.retry_at = None;
    }

    /// The call failed: the state is unknown and the next call waits.
    pub fn failed(&mut self, now: Instant) {
        let backoff = BACKOFF
            .saturating_mul(1 << self.failures.min(5))
            .min(BACKOFF_CEILING);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + backoff);
    }

    /// When [`Protection::wanted`] may next have something to say with no change in load.
    pub fn next_check(&self) -> Option<Instant> {
        match self.idle_since {
            // Busy: only a failed protect call is waiting to be made again.
            None if self.protected != Some(true) => self.retry_at,
            None => None,
            Some(_) if self.protected == Some(false) => None,
            Some(since) => {
                let due = since + self.after_idle;
                Some(self.retry_at.map_or(due, |at| at.max(due)))
            }
        }
    }

    pub fn protected(&self) -> Option<bool> {
        self.protected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(300);

    #[test]
    fn a_busy_spell_of_many_jobs_costs_one_call_each_way() {
        let t0 = Instant::now();
        let mut p = Protection::new(Some(false), IDLE, t0);
        assert_eq!(p.wanted(1, t0), Some(true));
        p.set(true);
        // Jobs come and go; short idle gaps between them keep protection, with no calls.
        for i in 0..100u64 {
            let t = t0 + Duration::from_secs(i * 10);
            assert_eq!(p.wanted((i % 3) as usize, t), None, "at job {i}");
        }
        let last_busy = t0 + Duration::from_secs(990);
        assert_eq!(p.wanted(1, last_busy), None);
        assert_eq!(p.wanted(0, last_busy + Duration::from_secs(1)), None);
        assert_eq!(
            p.next_check(),
            Some(last_busy + Duration::from_secs(1) + IDLE)
        );
        assert_eq!(p.wanted(0, last_busy + IDLE), None);
        assert_eq!(
            p.wanted(0, last_busy + Duration::from_secs(1) + IDLE),
            Some(false)
        );
        p.set(false);
        assert_eq!(p.next_check(), None);
        assert_eq!(p.wanted(0, last_busy + IDLE * 5), None);
    }

    #[test]
    fn an_unknown_state_at_start_is_cleared_after_the_idle_time() {
        let t0 = Instant::now();
        let mut p = Protection::new(None, IDLE, t0);
        assert_eq!(p.wanted(0, t0), None);
        assert_eq!(p.next_check(), Some(t0 + IDLE));
        assert_eq!(p.wanted(0, t0 + IDLE), Some(false));
    }

    #[test]
    fn a_failed_call_backs_off_instead_of_hammering() {
        let t0 = Instant::now();
        let mut p = Protection::new(Some(false), IDLE, t0);
        assert_eq!(p.wanted(2, t0), Some(true));
        p.failed(t0);
        assert_eq!(p.wanted(2, t0 + Duration::from_secs(1)), None);
        assert_eq!(p.wanted(2, t0 + BACKOFF), Some(true));
        p.failed(t0 + BACKOFF);
        assert_eq!(p.wanted(2, t0 + BACKOFF * 2), None);
        assert_eq!(p.wanted(2, t0 + BACKOFF * 3), Some(true));
        p.set(true);
        assert_eq!(p.protected(), Some(true));
    }
}
