//! What the benches time with (`rsql-bench`, `rsql-bench-launchers`): a timing proxy (a
//! loopback HTTP/1.1 relay that records each AWS call and when its response was handed back:
//! "acknowledged"), the job scripts' own `$EPOCHREALTIME` stamps, and percentiles.
//!
//! The proxy runs on plain threads of its own, so it works the same from sync code and from
//! any tokio runtime; bytes are forwarded unchanged.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// One request through the proxy, and when its response was handed back.
#[derive(Debug, Clone)]
pub struct Rec {
    pub op: String,
    pub token: Option<String>,
    /// Event message bytes, for PutLogEvents.
    pub event_bytes: u64,
    pub status: u16,
    /// When the request had reached the proxy.
    pub sent: SystemTime,
    pub acked: Option<SystemTime>,
}

#[derive(Debug)]
struct ProxyShared {
    target: SocketAddr,
    recs: Mutex<Vec<Rec>>,
    changed: Condvar,
    stopping: AtomicBool,
}

impl ProxyShared {
    fn lock(&self) -> MutexGuard<'_, Vec<Rec>> {
        self.recs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Shipped {
    pub requests: usize,
    pub bytes: u64,
    pub last_ack: Option<SystemTime>,
}

/// A loopback HTTP/1.1 relay that timestamps each response's last byte.
#[derive(Debug)]
pub struct TimingProxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
}

impl TimingProxy {
    pub fn start(target: SocketAddr) -> TimingProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(ProxyShared {
            target,
            recs: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let shared = accept_shared.clone();
                std::thread::spawn(move || relay(client, shared));
            }
        });
        TimingProxy { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count_requests(&self, op: &str) -> usize {
        self.shared.lock().iter().filter(|r| r.op == op).count()
    }

    /// The round trip of the first `op` request that carried `token`.
    pub fn first_round_trip_ms(&self, op: &str, token: &str) -> Option<f64> {
        self.shared
            .lock()
            .iter()
            .find(|r| r.op == op && r.token.as_deref() == Some(token))
            .and_then(|r| Some(ms_between(r.sent, r.acked?)))
    }

    pub fn count_ok(&self, op: &str) -> usize {
        self.shared
            .lock()
            .iter()
            .filter(|r| r.op == op && r.acked.is_some() && r.status == 200)
            .count()
    }

    pub fn shipped(&self) -> Shipped {
        let recs = self.shared.lock();
        let mut s = Shipped {
            requests: 0,
            bytes: 0,
            last_ack: None,
        };
        for r in recs.iter() {
            if r.op == "PutLogEvents" && r.status == 200 {
                if let Some(at) = r.acked {
                    s.requests += 1;
                    s.bytes += r.event_bytes;
                    s.last_ack = Some(s.last_ack.map_or(at, |l: SystemTime| l.max(at)));
                }
            }
        }
        s
    }

    pub fn wait<T>(&self, timeout: Duration, mut f: impl FnMut(&[Rec]) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut recs = self.shared.lock();
        loop {
            if let Some(v) = f(&recs) {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            recs = self
                .shared
                .changed
                .wait_timeout(recs, left.min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn find_ack(recs: &[Rec], op: &str, token: &str) -> Option<SystemTime> {
        recs.iter()
            .find(|r| r.op == op && r.status == 200 && r.token.as_deref() == Some(token))
            .and_then(|r| r.acked)
    }

    pub fn wait_ack_plain(&self, op: &str, token: &str, timeout: Duration) -> SystemTime {
        self.wait(timeout, |recs| Self::find_ack(recs, op, token))
            .unwrap_or_else(|| panic!("no acknowledged {op} for a job within {timeout:?}"))
    }

    /// When the first successful `op` carrying `token` was acknowledged; waits up to
    /// `timeout`, then panics showing `context()` (the agent's log, say).
    pub fn wait_ack(
        &self,
        op: &str,
        token: &str,
        timeout: Duration,
        context: impl Fn() -> String,
    ) -> SystemTime {
        self.wait(timeout, |recs| Self::find_ack(recs, op, token))
            .unwrap_or_else(|| {
                panic!(
                    "no acknowledged {op} for a job within {timeout:?}; agent log:\n{}",
                    context()
                )
            })
    }

    /// Waits up to `timeout` until `n` successful `op` were acknowledged, then panics showing
    /// `context()`.
    pub fn wait_count(&self, op: &str, n: usize, timeout: Duration, context: impl Fn() -> String) {
        let ok = self.wait(timeout, |recs| {
            let c = recs
                .iter()
                .filter(|r| r.op == op && r.status == 200 && r.acked.is_some())
                .count();
            (c >= n).then_some(())
        });
        if ok.is_none() {
            panic!(
                "only {} of {n} {op} acknowledged within {timeout:?}; agent log:\n{}",
                self.count_ok(op),
                context()
            );
        }
    }
}

impl Drop for TimingProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// One HTTP message as read off the wire: its raw bytes (forwarded unchanged), first line,
/// headers and (de-chunked) body.
#[derive(Debug)]
struct HttpMessage {
    raw: Vec<u8>,
    first_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpMessage {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_line(r: &mut impl BufRead, raw: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    let start = raw.len();
    if r.read_until(b'\n', raw)? == 0 {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&raw[start..])
            .trim_end_matches(['\r', '\n'])
            .to_string(),
    ))
}

/// Reads one message. `None` at a clean end of stream. `until_eof` bodies (a response with
/// neither length nor chunking) are read to the end of the stream.
fn read_message(
    r: &mut impl BufRead,
    response: bool,
    request_method: Option<&str>,
) -> std::io::Result<Option<HttpMessage>> {
    let mut raw = Vec::new();
    let Some(first_line) = read_line(r, &mut raw)? else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut raw)?
            .ok_or_else(|| std::io::Error::other("end of stream inside headers"))?;
        if line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut msg = HttpMessage {
        raw,
        first_line,
        headers,
        body: Vec::new(),
    };
    let status: u16 = if response {
        msg.first_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let no_body = response && ((100..200).contains(&status) || status == 204 || status == 304)
        || request_method == Some("HEAD");
    let chunked = msg
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    let length = msg
        .header("content-length")
        .and_then(|l| l.parse::<usize>().ok());
    if no_body {
    } else if chunked {
        loop {
            let line = read_line(r, &mut msg.raw)?
                .ok_or_else(|| std::io::Error::other("end of stream in chunked body"))?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                while let Some(t) = read_line(r, &mut msg.raw)? {
                    if t.is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            msg.raw.extend_from_slice(&chunk);
            msg.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = length {
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        msg.raw.extend_from_slice(&body);
        msg.body = body;
    } else if response {
        r.read_to_end(&mut msg.body)?;
        msg.raw.extend_from_slice(&msg.body);
    }
    Ok(Some(msg))
}

fn relay(client: TcpStream, shared: Arc<ProxyShared>) {
    let Ok(server) = TcpStream::connect_timeout(&shared.target, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client_w), Ok(server_r)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    // Indexes of requests forwarded and not yet answered, with their methods, in order.
    let pending: Arc<Mutex<VecDeque<(usize, String)>>> = Arc::new(Mutex::new(VecDeque::new()));
    let up = {
        let shared = shared.clone();
        let pending = pending.clone();
        std::thread::spawn(move || {
            let mut from = BufReader::new(client);
            let mut to = server;
            loop {
                match read_message(&mut from, false, None) {
                    Ok(Some(msg)) => {
                        let op = msg
                            .header("x-amz-target")
                            .map(|t| t.rsplit('.').next().unwrap_or(t).to_string())
                            .unwrap_or_else(|| msg.first_line.clone());
                        let json: Option<Value> =
                            if op == "PutLogEvents" || op.starts_with("SendTask") {
                                serde_json::from_slice(&msg.body).ok()
                            } else {
                                None
                            };
                        let token = json
                            .as_ref()
                            .and_then(|j| j["taskToken"].as_str())
                            .map(str::to_string);
                        let event_bytes = json
                            .as_ref()
                            .and_then(|j| j["logEvents"].as_array())
                            .map(|events| {
                                events
                                    .iter()
                                    .map(|e| e["message"].as_str().map_or(0, |m| m.len() as u64))
                                    .sum()
                            })
                            .unwrap_or(0);
                        let method = msg.first_line.split(' ').next().unwrap_or("").to_string();
                        {
                            let mut recs = shared.lock();
                            recs.push(Rec {
                                op,
                                token,
                                event_bytes,
                                status: 0,
                                sent: SystemTime::now(),
                                acked: None,
                            });
                            pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push_back((recs.len() - 1, method));
                            shared.changed.notify_all();
                        }
                        if to.write_all(&msg.raw).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        // Not HTTP we understand: forward the rest unparsed.
                        let _ = std::io::copy(&mut from, &mut to);
                        break;
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })
    };
    let mut from = BufReader::new(server_r);
    let mut to = client_w;
    loop {
        let method = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .front()
            .map(|(_, m)| m.clone());
        match read_message(&mut from, true, method.as_deref()) {
            Ok(Some(msg)) => {
                if to.write_all(&msg.raw).is_err() {
                    break;
                }
                let at = SystemTime::now();
                let status: u16 = msg
                    .first_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if (100..200).contains(&status) {
                    continue;
                }
                let front = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop_front();
                if let Some((i, _)) = front {
                    let mut recs = shared.lock();
                    recs[i].status = status;
                    recs[i].acked = Some(at);
                    shared.changed.notify_all();
                }
            }
            Ok(None) => break,
            Err(_) => {
                let _ = std::io::copy(&mut from, &mut to);
                break;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = up.join();
}

/// A job script's own start and end stamps: `start` and `end` lines with `$EPOCHREALTIME`.
#[derive(Debug, Clone, Copy)]
pub struct Stamps {
    pub start: SystemTime,
    pub end: SystemTime,
}

impl Stamps {
    /// The stamps in the file `marker` (the script appended them); panics without both.
    pub fn read(marker: &Path) -> Stamps {
        let text = std::fs::read_to_string(marker)
            .unwrap_or_else(|e| panic!("job marker {}: {e}", marker.display()));
        Stamps::parse(&text)
            .unwrap_or_else(|| panic!("no start and end stamps in {}: {text:?}", marker.display()))
    }

    /// The first `start STAMP` and `end STAMP` lines of `text` (a marker file, a job log
    /// whose lines may carry a prefix), if both are there.
    pub fn parse(text: &str) -> Option<Stamps> {
        let get = |key: &str| {
            text.lines().find_map(|l| {
                let mut words = l.split_whitespace().skip_while(|w| *w != key);
                words.next()?;
                parse_epoch(words.next()?)
            })
        };
        Some(Stamps {
            start: get("start")?,
            end: get("end")?,
        })
    }
}

/// `$EPOCHREALTIME`: seconds, a locale's decimal point, microseconds.
pub fn parse_epoch(s: &str) -> Option<SystemTime> {
    let (secs, frac) = s.split_once(['.', ','])?;
    let secs: u64 = secs.parse().ok()?;
    let mut micros = frac.to_string();
    micros.truncate(6);
    while micros.len() < 6 {
        micros.push('0');
    }
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.parse().ok()?))
}

/// Milliseconds from `a` to `b` (negative when `b` is earlier).
pub fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

/// Nearest-rank percentiles of real samples.
#[derive(Debug, Clone, Copy)]
pub struct Pcts {
    pub n: usize,
    pub p50: f64,
    pub p95: f64,
    pub min: f64,
    pub max: f64,
}

impl Pcts {
    /// Panics on no samples: a figure without samples is a broken run, not a number.
    pub fn of(samples: &[f64]) -> Pcts {
        assert!(!samples.is_empty(), "no samples");
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let rank = |p: f64| s[((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Pcts {
            n: s.len(),
            p50: rank(50.0),
            p95: rank(95.0),
            min: s[0],
            max: s[s.len() - 1],
        }
    }

    pub fn json(&self) -> Value {
        json!({"n": self.n, "p50": self.p50, "p95": self.p95, "min": self.min, "max": self.max})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_parse_marker_files_and_prefixed_log_lines() {
        let s = Stamps::parse("start 1700000000.123456\nend 1700000000,5\n").unwrap();
        assert_eq!(ms_between(s.start, s.end).round(), 377.0);
        let log =
            "2026-01-01T00:00:00Z out start 1700000001.000001\nx\nout end 1700000001.000002\n";
        let s = Stamps::parse(log).unwrap();
        assert!((ms_between(s.start, s.end) - 0.001).abs() < 1e-9);
        assert!(Stamps::parse("start 1.0\n").is_none());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let p = Pcts::of(&(1..=100).map(f64::from).collect::<Vec<_>>());
        assert_eq!((p.p50, p.p95, p.min, p.max), (50.0, 95.0, 1.0, 100.0));
        assert_eq!(Pcts::of(&[7.0]).p95, 7.0);
    }
}
