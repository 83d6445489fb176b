//! systemd's notification protocol (`sd_notify`), spoken directly over the datagram socket
//! that `NOTIFY_SOCKET` names.
//!
//! Owns: finding the socket (a path, or `@name` in the abstract namespace), the watchdog
//! period (`WATCHDOG_USEC`, checked against `WATCHDOG_PID`), and the messages: `READY=1`,
//! `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1` and `STATUS=`. Without `NOTIFY_SOCKET` every call
//! is a no-op. A send that fails is logged once and otherwise ignored: notification is advice
//! to the service manager, never part of the data path.
//!
//! Must not touch: what the daemon does. It only says what the daemon tells it to say; the
//! daemon decides when it is ready, healthy or stopping.
//!
//! Hand-rolled rather than the `sd-notify` crate: that crate reads `NOTIFY_SOCKET` and opens
//! a socket on every call, while a [`Notifier`] opens one socket once and can be pointed at
//! any address ([`Notifier::for_socket`]), which is how the tests check every message
//! without touching the process environment. The protocol itself is one datagram.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// The watchdog timeout in microseconds, set by systemd when `WatchdogSec=` is on.
pub const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
/// The pid the watchdog is meant for; another process's watchdog is not ours to feed.
pub const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";

/// How often `WATCHDOG=1` and `STATUS=` go out when systemd has not set a watchdog timeout.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{NOTIFY_SOCKET_ENV}={value:?} is not a socket path or @abstract name")]
    BadAddress { value: String },
    #[error("{NOTIFY_SOCKET_ENV}={value:?}: {source}")]
    Address {
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create a socket to notify the service manager")]
    Socket(#[source] std::io::Error),
}

/// What `STATUS=` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Deliveries being handled (jobs running, replays, reports).
    pub running: usize,
    /// Job slots free for new messages.
    pub free: usize,
    /// Outcomes waiting in the outbox.
    pub outbox: usize,
}

impl Status {
    /// The one-line `STATUS=` text.
    pub fn line(&self) -> String {
        format!(
            "{} running, {} free, {} in outbox",
            self.running, self.free, self.outbox
        )
    }
}

#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    socket: UnixDatagram,
}

/// Sends notifications to the service manager, or does nothing when there is none.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
    warned: AtomicBool,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
            warned: AtomicBool::new(false),
        }
    }

    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (then call [`forget_env`]).
    /// A bad value is logged and
    /// leaves the notifier disabled: the agent runs the same without a service manager.
    pub fn from_env() -> Notifier {
        let Some(socket) = std::env::var_os(NOTIFY_SOCKET_ENV).filter(|s| !s.is_empty()) else {
            return Notifier::disabled();
        };
        let socket = socket.to_string_lossy().into_owned();
        let watchdog = watchdog_from(
            std::env::var(WATCHDOG_USEC_ENV).ok().as_deref(),
            std::env::var(WATCHDOG_PID_ENV).ok().as_deref(),
            std::process::id(),
        );
        match Notifier::for_socket(&socket, watchdog) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot notify systemd; running without notifications");
                Notifier::disabled()
            }
        }
    }

    /// Notifies the socket `address` (`/path` or `@abstract`); `watchdog` is the service
    /// manager's watchdog timeout, if it has one.
    pub fn for_socket(address: &str, watchdog: Option<Duration>) -> Result<Notifier, NotifyError> {
        let addr = parse_address(address)?;
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        Ok(Notifier {
            target: Some(Target { addr, socket }),
            watchdog,
            warned: AtomicBool::new(false),
        })
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often the main loop should send `WATCHDOG=1`: half the watchdog timeout, as
    /// systemd advises, else [`DEFAULT_KEEPALIVE`].
    pub fn keepalive_period(&self) -> Duration {
        self.watchdog
            .map(|w| (w / 2).max(Duration::from_millis(10)))
            .unwrap_or(DEFAULT_KEEPALIVE)
    }

    /// `READY=1`: the config is valid, the clients are built, intake starts now.
    pub fn ready(&self, status: &Status) {
        self.send(&format!("READY=1\nSTATUS={}", status.line()));
    }

    /// `RELOADING=1` (with `MONOTONIC_USEC`, as `Type=notify-reload` wants); follow it with
    /// [`Notifier::ready`].
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the config",
            monotonic_usec()
        ));
    }

    /// `STOPPING=1`: intake has stopped and running jobs are draining.
    pub fn stopping(&self, status: &Status) {
        self.send(&format!("STOPPING=1\nSTATUS=stopping: {}", status.line()));
    }

    /// `WATCHDOG=1` with the current `STATUS=`; the main loop sends it while it is healthy.
    pub fn alive(&self, status: &Status) {
        self.send(&format!("WATCHDOG=1\nSTATUS={}", status.line()));
    }

    /// `STATUS=` alone.
    pub fn status(&self, text: &str) {
        // One line: systemd takes the status up to the newline.
        let line = text.lines().next().unwrap_or_default();
        self.send(&format!("STATUS={line}"));
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else { return };
        if let Err(e) = target.socket.send_to_addr(message.as_bytes(), &target.addr) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot notify systemd (further failures are not logged)");
            }
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64) * 1_000_000 + (ts.tv_nsec() as u64) / 1_000,
        Err(_) => 0,
    }
}

/// `/run/systemd/notify` → that path; `@name` → the abstract socket `name`.
fn parse_address(value: &str) -> Result<SocketAddr, NotifyError> {
    let addr = if let Some(name) = value.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if value.starts_with('/') {
        SocketAddr::from_pathname(value)
    } else {
        return Err(NotifyError::BadAddress {
            value: value.to_string(),
        });
    };
    addr.map_err(|source| NotifyError::Address {
        value: value.to_string(),
        source,
    })
}

/// The watchdog timeout, when `WATCHDOG_USEC` is a positive number and `WATCHDOG_PID` is
/// absent or names `pid`.
fn watchdog_from(usec: Option<&str>, watchdog_pid: Option<&str>, pid: u32) -> Option<Duration> {
    if let Some(for_pid) = watchdog_pid {
        if for_pid.trim().parse::<u32>().ok() != Some(pid) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Removes `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from this process's
/// environment, so that no child inherits them. Call it while the process has one thread,
/// after [`Notifier::from_env`].
pub fn forget_env() {
    for name in [NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV] {
        std::env::remove_var(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let notifier = Notifier::for_socket(path.to_str().expect("utf-8"), None).expect("notifier");
        assert!(notifier.is_enabled());
        let status = Status {
            running: 1,
            free: 3,
            outbox: 2,
        };
        notifier.ready(&status);
        assert_eq!(
            receive(&server),
            "READY=1\nSTATUS=1 running, 3 free, 2 in outbox"
        );
        notifier.alive(&status);
        assert!(receive(&server).starts_with("WATCHDOG=1\nSTATUS="));
        notifier.reloading();
        let reloading = receive(&server);
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading}"
        );
        notifier.stopping(&status);
        assert!(receive(&server).starts_with("STOPPING=1\n"));
        notifier.status("two\nlines");
        assert_eq!(receive(&server), "STATUS=two");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("rsql-agent-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let server = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let notifier = Notifier::for_socket(&format!("@{name}"), None).expect("notifier");
        notifier.alive(&Status::default());
        assert!(receive(&server).starts_with("WATCHDOG=1"));
    }

    #[test]
    fn bad_addresses_are_refused_and_disabled_sends_nothing() {
        assert!(matches!(
            Notifier::for_socket("relative/path", None),
            Err(NotifyError::BadAddress { .. })
        ));
        let off = Notifier::disabled();
        assert!(!off.is_enabled());
        off.ready(&Status::default());
        assert_eq!(off.keepalive_period(), DEFAULT_KEEPALIVE);
    }

    #[test]
    fn watchdog_is_half_the_timeout_and_only_for_this_pid() {
        assert_eq!(
            watchdog_from(Some("4000000"), None, 7),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            watchdog_from(Some("4000000"), Some("7"), 7),
            Some(Duration::from_secs(4))
        );
        assert_eq!(watchdog_from(Some("4000000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_from(None, None, 7), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n");
        let _server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::for_socket(path.to_str().expect("utf-8"), Some(Duration::from_secs(4)))
            .expect("notifier");
        assert_eq!(n.keepalive_period(), Duration::from_secs(2));
    }
}
