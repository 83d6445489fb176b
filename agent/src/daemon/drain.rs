//! Whether the agent takes new work, as rules: what a drain, a fleet notice, a Spot deadline
//! or a stop signal does to intake and to the running jobs ([`on`]). Pure: the clock is
//! passed in, and the receive loop carries the [`Effect`]s out.
//!
//! ```text
//!          drain, scale-in, rebalance              Spot deadline - margin
//!  open ─────────────────────────────▶ draining ───────────────────────▶ draining
//!   │    Spot notice (stop time set)     │  (a later Spot notice only      (jobs told to
//!   │                                    │   brings the stop time nearer)   stop: Interrupted)
//!   └──────────── stop signal ───────────┴──────────▶ stopping (hand-off; a second signal:
//!                                                              do not wait for the outbox)
//! ```
//!
//! Draining is for good: nothing reopens intake but a new agent. Running jobs are never
//! stopped by a drain itself; only a Spot deadline stops them, because the host will not be
//! there to finish them.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::JobStop;
use crate::fleet::Notice;
use crate::stop::StopLevel;

/// Where intake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Intake {
    /// Jobs are taken from every source.
    Open,
    /// Nothing new is taken; running jobs are watched and reported. With a Spot
    /// interruption on its way, the moment the jobs still running are stopped.
    Draining { stop_jobs_at: Option<Instant> },
    /// The agent is stopping: its running jobs are handed off to the next agent. `now`: a
    /// second stop came, so the outbox is not waited for.
    Stopping { now: bool },
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Event {
    /// `rsql-agent drain`.
    DrainAsked,
    /// A notice from the instance metadata (see `fleet`).
    Notice(Notice),
    /// The stop time a Spot notice set has come.
    SpotStopTime,
    /// A stop signal, at its level.
    Stop(StopLevel),
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    /// Stop intake: a receive in flight hands its messages back to the queue, submissions
    /// are refused, and the service status says "draining".
    StopIntake,
    /// Tell every running job's watch.
    TellJobs(JobStop),
}

impl Intake {
    /// Whether new jobs may be taken.
    pub(super) fn is_open(&self) -> bool {
        matches!(self, Intake::Open)
    }

    /// When the jobs still running are to be stopped, if a Spot notice set a time.
    pub(super) fn stop_jobs_at(&self) -> Option<Instant> {
        match self {
            Intake::Draining { stop_jobs_at } => *stop_jobs_at,
            _ => None,
        }
    }
}

/// The clock the rules read: the monotonic one for timers, the wall clock for a Spot
/// notice's deadline (which the metadata gives as a date).
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    pub(super) now: Instant,
    pub(super) wall: SystemTime,
}

impl Clock {
    pub(super) fn now() -> Clock {
        Clock {
            now: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// The transition. `spot_stop_margin` is how long before a Spot deadline running jobs are
/// stopped.
pub(super) fn on(
    intake: Intake,
    event: Event,
    clock: Clock,
    spot_stop_margin: Duration,
) -> (Intake, Vec<Effect>) {
    let stop_time = |deadline: SystemTime| {
        let left = deadline
            .duration_since(clock.wall)
            .unwrap_or_default()
            .saturating_sub(spot_stop_margin);
        clock.now + left
    };
    match (intake, event) {
        (Intake::Stopping { .. }, Event::Stop(_)) => (Intake::Stopping { now: true }, vec![]),
        (Intake::Stopping { .. }, _) => (intake, vec![]),
        (_, Event::Stop(level)) => (
            Intake::Stopping {
                now: level == StopLevel::Kill,
            },
            vec![],
        ),
        (Intake::Open, Event::Notice(Notice::Spot { deadline, .. })) => (
            Intake::Draining {
                stop_jobs_at: Some(stop_time(deadline)),
            },
            vec![Effect::StopIntake],
        ),
        (Intake::Open, Event::DrainAsked | Event::Notice(_)) => (
            Intake::Draining { stop_jobs_at: None },
            vec![Effect::StopIntake],
        ),
        (Intake::Open, Event::SpotStopTime) => (intake, vec![]),
        (Intake::Draining { stop_jobs_at }, Event::Notice(Notice::Spot { deadline, .. })) => {
            let at = stop_time(deadline);
            let nearest = stop_jobs_at.map_or(at, |set| set.min(at));
            (
                Intake::Draining {
                    stop_jobs_at: Some(nearest),
                },
                vec![],
            )
        }
        (Intake::Draining { .. }, Event::DrainAsked | Event::Notice(_)) => (intake, vec![]),
        (Intake::Draining { stop_jobs_at: None }, Event::SpotStopTime) => (intake, vec![]),
        (
            Intake::Draining {
                stop_jobs_at: Some(_),
            },
            Event::SpotStopTime,
        ) => (
            Intake::Draining { stop_jobs_at: None },
            vec![Effect::TellJobs(JobStop::Stop(StopLevel::Graceful))],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARGIN: Duration = Duration::from_secs(45);

    fn spot_in(clock: Clock, secs: u64) -> Event {
        Event::Notice(Notice::Spot {
            action: "terminate".into(),
            deadline: clock.wall + Duration::from_secs(secs),
        })
    }

    /// The wall clock as of the test's start, moved on with the paused monotonic one (the
    /// real wall clock would move on by itself between two readings).
    fn start() -> Clock {
        thread_local! {
            static START: std::cell::Cell<Option<Clock>> = const { std::cell::Cell::new(None) };
        }
        START.with(|start| {
            let clock = start.get().unwrap_or_else(Clock::now);
            start.set(Some(clock));
            clock
        })
    }

    fn clock() -> Clock {
        let start = start();
        let now = Instant::now();
        Clock {
            now,
            wall: start.wall + now.duration_since(start.now),
        }
    }

    /// Feeds `events` in order at the current (paused) time; the last state and every
    /// effect.
    fn feed(mut intake: Intake, events: Vec<Event>) -> (Intake, Vec<Effect>) {
        let mut effects = vec![];
        for event in events {
            let (next, more) = on(intake, event, clock(), MARGIN);
            intake = next;
            effects.extend(more);
        }
        (intake, effects)
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_stops_intake_once_and_lets_the_jobs_run() {
        let (intake, effects) = feed(Intake::Open, vec![Event::DrainAsked, Event::DrainAsked]);
        assert_eq!(intake, Intake::Draining { stop_jobs_at: None });
        assert!(!intake.is_open());
        assert_eq!(
            effects,
            vec![Effect::StopIntake],
            "once, and no job is told anything"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_scale_in_or_a_rebalance_drains_like_an_operator() {
        for notice in [Notice::ScaleIn, Notice::Rebalance] {
            let (intake, effects) = feed(Intake::Open, vec![Event::Notice(notice)]);
            assert_eq!(intake, Intake::Draining { stop_jobs_at: None });
            assert_eq!(effects, vec![Effect::StopIntake]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_spot_notice_stops_the_jobs_its_margin_before_the_deadline() {
        let start = start();
        let (intake, effects) = feed(Intake::Open, vec![spot_in(start, 120)]);
        assert_eq!(effects, vec![Effect::StopIntake]);
        assert_eq!(
            intake.stop_jobs_at(),
            Some(start.now + Duration::from_secs(75))
        );
        // The loop sleeps until then and says so; the jobs are told once.
        tokio::time::sleep_until(intake.stop_jobs_at().unwrap()).await;
        let (intake, effects) = feed(intake, vec![Event::SpotStopTime, Event::SpotStopTime]);
        assert_eq!(
            effects,
            vec![Effect::TellJobs(JobStop::Stop(StopLevel::Graceful))]
        );
        assert_eq!(intake, Intake::Draining { stop_jobs_at: None });
        assert_eq!(start.now.elapsed(), Duration::from_secs(75));
    }

    #[tokio::test(start_paused = true)]
    async fn a_spot_notice_after_a_rebalance_still_sets_the_stop_time() {
        let start = start();
        let (intake, effects) = feed(
            Intake::Open,
            vec![Event::Notice(Notice::Rebalance), spot_in(start, 100)],
        );
        assert_eq!(effects, vec![Effect::StopIntake]);
        assert_eq!(
            intake.stop_jobs_at(),
            Some(start.now + Duration::from_secs(55))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_spot_notice_only_brings_the_stop_time_nearer() {
        let start = start();
        let (later, _) = feed(Intake::Open, vec![spot_in(start, 100), spot_in(start, 300)]);
        assert_eq!(
            later.stop_jobs_at(),
            Some(start.now + Duration::from_secs(55))
        );
        let (nearer, _) = feed(Intake::Open, vec![spot_in(start, 300), spot_in(start, 100)]);
        assert_eq!(
            nearer.stop_jobs_at(),
            Some(start.now + Duration::from_secs(55))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_nearer_than_the_margin_stops_the_jobs_at_once() {
        let start = start();
        let (intake, _) = feed(Intake::Open, vec![spot_in(start, 10)]);
        assert_eq!(intake.stop_jobs_at(), Some(start.now));
        let past = Event::Notice(Notice::Spot {
            action: "stop".into(),
            deadline: start.wall - Duration::from_secs(5),
        });
        let (intake, _) = feed(Intake::Open, vec![past]);
        assert_eq!(intake.stop_jobs_at(), Some(start.now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_hands_off_and_a_second_one_stops_waiting_for_the_outbox() {
        let (intake, effects) = feed(Intake::Open, vec![Event::Stop(StopLevel::Graceful)]);
        assert_eq!(intake, Intake::Stopping { now: false });
        assert!(effects.is_empty(), "the hand-off itself tells the jobs");
        let (intake, _) = feed(intake, vec![Event::Stop(StopLevel::Graceful)]);
        assert_eq!(intake, Intake::Stopping { now: true });
        let (intake, _) = feed(Intake::Open, vec![Event::Stop(StopLevel::Kill)]);
        assert_eq!(intake, Intake::Stopping { now: true });
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_agent_stops_like_any_other_and_a_stopping_one_ignores_notices() {
        let start = start();
        let (intake, effects) = feed(
            Intake::Open,
            vec![
                spot_in(start, 120),
                Event::Stop(StopLevel::Graceful),
                Event::DrainAsked,
                spot_in(start, 60),
                Event::SpotStopTime,
            ],
        );
        assert_eq!(intake, Intake::Stopping { now: false });
        assert_eq!(
            effects,
            vec![Effect::StopIntake],
            "once stopping, nothing reopens, drains or stops the handed-off jobs"
        );
    }
}
