//! What the process's signals mean to the daemon, decided in one place.
//!
//! | signal | meaning |
//! |---|---|
//! | first SIGTERM or SIGINT | [`Control::Stop`] ([`StopLevel::Graceful`]): the daemon hands off (intake stops, running jobs keep running under their owners, the next agent adopts them); a foreground run (`workflow run`, one job without a daemon) stops its jobs and reports them |
//! | any later SIGTERM or SIGINT | [`Control::Stop`] ([`StopLevel::Kill`]): the daemon exits at once, without waiting for the outbox (its jobs still run on); a foreground run kills its jobs now and still reports them |
//! | SIGHUP | [`Control::Reload`]: reload the config where that is safe |
//! | third SIGTERM or SIGINT | the process ends at once, by the signal's default action |
//!
//! The third one is handled inside the signal handler itself (with `signal-hook`), not by
//! the runtime: it is the operator's way out of a shutdown that is stuck (an outbox that
//! cannot reach AWS, a wedged runtime) without reaching for SIGKILL. Outcomes already in
//! the outbox are durable and go out after the next start.
//!
//! Owns: the signal handlers and that mapping. Must not touch: what stopping or reloading
//! does; the daemon owns that and only ever sees a [`Control`].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

pub use crate::stop::StopLevel;

/// What the daemon is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop, at this level (the stop vocabulary of [`crate::stop`]).
    ///
    /// [`StopLevel::Graceful`]: stop taking jobs; the daemon hands the running ones off
    /// (they go on under their owner processes); a foreground run stops its jobs gracefully.
    ///
    /// [`StopLevel::Kill`]: the daemon exits without waiting for the outbox (its jobs still
    /// go on under their owners); a foreground run kills its jobs (SIGKILL), reports them
    /// and exits.
    Stop(StopLevel),
    /// Reload the config file.
    Reload,
}

/// A signal the daemon listens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Terminate,
    Interrupt,
    Hangup,
}

/// The mapping itself: `stops_before` is how many stop signals came before this one.
pub fn meaning(signal: Received, stops_before: u32) -> Control {
    match signal {
        Received::Hangup => Control::Reload,
        Received::Terminate | Received::Interrupt if stops_before == 0 => {
            Control::Stop(StopLevel::Graceful)
        }
        Received::Terminate | Received::Interrupt => Control::Stop(StopLevel::Kill),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("cannot install the {signal} handler")]
    Install {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// How many SIGTERM/SIGINT end the process at once.
pub const HARD_EXIT_AFTER: usize = 3;

/// Makes the [`HARD_EXIT_AFTER`]th SIGTERM/SIGINT end the process with the default action,
/// counted in the handler so it works even when nothing else runs any more.
fn install_hard_exit() -> Result<(), SignalError> {
    let count = Arc::new(AtomicUsize::new(0));
    for (signal, name) in [
        (signal_hook::consts::SIGTERM, "SIGTERM"),
        (signal_hook::consts::SIGINT, "SIGINT"),
    ] {
        let count = count.clone();
        let action = move || {
            if count.fetch_add(1, Ordering::SeqCst) + 1 >= HARD_EXIT_AFTER {
                let _ = signal_hook::low_level::emulate_default_handler(signal);
            }
        };
        // SAFETY: the action runs inside a signal handler; it only updates an atomic and
        // calls emulate_default_handler, both async-signal-safe, and allocates nothing.
        unsafe { signal_hook::low_level::register(signal, action) }.map_err(|source| {
            SignalError::Install {
                signal: name,
                source,
            }
        })?;
    }
    Ok(())
}

/// The stream of [`Control`]s the daemon reads.
#[derive(Debug)]
pub struct Controls {
    rx: mpsc::Receiver<Control>,
}

impl Controls {
    /// Installs the handlers for SIGTERM, SIGINT and SIGHUP (from then on they no longer
    /// end the process) and maps what arrives. Must be called within a tokio runtime.
    /// Install it early: a signal that arrives before the daemon reads it is kept.
    pub fn install() -> Result<Controls, SignalError> {
        let listen = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| SignalError::Install {
                signal: name,
                source,
            })
        };
        let mut term = listen(SignalKind::terminate(), "SIGTERM")?;
        let mut int = listen(SignalKind::interrupt(), "SIGINT")?;
        let mut hup = listen(SignalKind::hangup(), "SIGHUP")?;
        install_hard_exit()?;
        let (tx, controls) = Controls::channel();
        tokio::spawn(async move {
            let mut stops = 0u32;
            loop {
                let received = tokio::select! {
                    Some(()) = term.recv() => Received::Terminate,
                    Some(()) = int.recv() => Received::Interrupt,
                    Some(()) = hup.recv() => Received::Hangup,
                    else => return,
                };
                let control = meaning(received, stops);
                tracing::info!(signal = ?received, meaning = ?control, "signal received");
                if control != Control::Reload {
                    stops = stops.saturating_add(1);
                }
                if tx.send(control).await.is_err() {
                    return;
                }
            }
        });
        Ok(controls)
    }

    /// A stream fed by hand, for embedding and tests.
    pub fn channel() -> (mpsc::Sender<Control>, Controls) {
        let (tx, rx) = mpsc::channel(8);
        (tx, Controls { rx })
    }

    /// A stream that says a graceful [`Control::Stop`] once `stop` resolves, and nothing else.
    pub fn stop_on(stop: impl Future<Output = ()> + Send + 'static) -> Controls {
        let (tx, controls) = Controls::channel();
        tokio::spawn(async move {
            stop.await;
            let _ = tx.send(Control::Stop(StopLevel::Graceful)).await;
            // Keep the stream open: a closed stream means "no more controls", not "stop".
            tx.closed().await;
        });
        controls
    }

    /// The next control; `None` once nobody can send any more.
    pub async fn recv(&mut self) -> Option<Control> {
        self.rx.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_stop_hands_off_later_ones_stop_now_and_hup_reloads() {
        let (graceful, kill) = (
            Control::Stop(StopLevel::Graceful),
            Control::Stop(StopLevel::Kill),
        );
        assert_eq!(meaning(Received::Terminate, 0), graceful);
        assert_eq!(meaning(Received::Interrupt, 0), graceful);
        assert_eq!(meaning(Received::Terminate, 1), kill);
        assert_eq!(meaning(Received::Interrupt, 3), kill);
        assert_eq!(meaning(Received::Hangup, 0), Control::Reload);
        assert_eq!(meaning(Received::Hangup, 2), Control::Reload);
    }

    #[tokio::test]
    async fn stop_on_a_future_says_stop_once() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut controls = Controls::stop_on(async move {
            let _ = rx.await;
        });
        let _ = tx.send(());
        assert_eq!(
            controls.recv().await,
            Some(Control::Stop(StopLevel::Graceful))
        );
    }
}
