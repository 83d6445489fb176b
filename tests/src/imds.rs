//! A stand-in for the EC2 instance metadata service, IMDSv2 only: a real HTTP/1.1 server on a
//! free loopback port, for the agent's `aws-config` IMDS client
//! (`AWS_EC2_METADATA_SERVICE_ENDPOINT`, see [`Imds::env`]).
//!
//! It follows IMDSv2's rules: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
//! (1 to 21600) answers a token and echoes the TTL header; any other request needs a live
//! token in `X-aws-ec2-metadata-token` (none, unknown or expired: 401); a `PUT` of the token
//! without the TTL header, or with a bad one, is 400; other methods are 405; unknown paths are
//! 404. Every response says `Connection: close`.
//!
//! What it serves, each answer changeable by the test at any time:
//! - `/latest/meta-data/instance-id` ([`Imds::set_instance_id`]);
//! - `/latest/meta-data/placement/region` (always [`crate::moto::REGION`]);
//! - `/latest/meta-data/autoscaling/target-lifecycle-state`, text such as `InService` or
//!   `Terminated`; 404 when the instance is in no Auto Scaling group
//!   ([`Imds::set_lifecycle_state`] with `None`, the start);
//! - `/latest/meta-data/spot/instance-action`, `{"action":"terminate","time":"…"}`; 404 until
//!   a notice is given ([`Imds::set_spot_action`], [`Imds::clear_spot_action`]);
//! - `/latest/meta-data/events/recommendations/rebalance`, `{"noticeTime":"…"}`; 404 until a
//!   recommendation is given ([`Imds::set_rebalance`], [`Imds::clear_rebalance`]).
//!
//! Every request is logged ([`Imds::requests`], [`Imds::count`], [`Imds::wait_for_count`]),
//! so a test can tell that the agent polled a path after it flipped an answer. Like
//! [`crate::proxy::Proxy`] it runs on plain threads of its own (one acceptor, one per
//! connection), so it works the same from sync tests and from any tokio runtime.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// The token path.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// The instance id path.
pub const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";
/// The region path.
pub const REGION_PATH: &str = "/latest/meta-data/placement/region";
/// The Auto Scaling target lifecycle state path.
pub const LIFECYCLE_STATE_PATH: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";
/// The Spot interruption notice path.
pub const SPOT_ACTION_PATH: &str = "/latest/meta-data/spot/instance-action";
/// The rebalance recommendation path.
pub const REBALANCE_PATH: &str = "/latest/meta-data/events/recommendations/rebalance";

/// The instance id served until [`Imds::set_instance_id`] changes it.
pub const DEFAULT_INSTANCE_ID: &str = "i-0123456789abcdef0";

const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// One request the stand-in answered.
#[derive(Debug, Clone)]
pub struct ImdsRequest {
    /// When it was answered.
    pub at: SystemTime,
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// The status it was answered with.
    pub status: u16,
}

#[derive(Debug)]
struct State {
    instance_id: String,
    lifecycle_state: Option<String>,
    spot_action: Option<String>,
    rebalance: Option<String>,
    /// Live tokens and when each expires.
    tokens: HashMap<String, Instant>,
    requests: Vec<ImdsRequest>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled whenever a request is logged.
    logged: Condvar,
    stopping: AtomicBool,
    next_token: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running IMDSv2 stand-in. Dropping it stops it.
#[derive(Debug)]
pub struct Imds {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Imds {
    /// Starts the stand-in on a free loopback port: instance [`DEFAULT_INSTANCE_ID`], in no
    /// Auto Scaling group, no Spot notice, no rebalance recommendation.
    pub fn start() -> Imds {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the IMDS stand-in");
        let addr = listener.local_addr().expect("IMDS stand-in address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                instance_id: DEFAULT_INSTANCE_ID.to_string(),
                lifecycle_state: None,
                spot_action: None,
                rebalance: None,
                tokens: HashMap::new(),
                requests: Vec::new(),
            }),
            logged: Condvar::new(),
            stopping: AtomicBool::new(false),
            next_token: AtomicU64::new(1),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("imds-accept-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn the IMDS acceptor")
        };
        Imds {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`, the value of `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The stand-in's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The environment that points a child's IMDS client here. Apply it after
    /// [`crate::moto::aws_env`], whose `AWS_EC2_METADATA_DISABLED=true` it overrides.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT".to_string(), self.url()),
            ("AWS_EC2_METADATA_DISABLED".to_string(), "false".to_string()),
        ]
    }

    /// The instance id served from now on.
    pub fn set_instance_id(&self, id: &str) {
        self.shared.lock().instance_id = id.to_string();
    }

    /// The Auto Scaling target lifecycle state served from now on, e.g. `InService` or
    /// `Terminated`; `None`: the instance is in no group (404).
    pub fn set_lifecycle_state(&self, state: Option<&str>) {
        self.shared.lock().lifecycle_state = state.map(str::to_string);
    }

    /// A Spot interruption notice from now on: `action` (`terminate`, `stop` or
    /// `hibernate`) at `time` (RFC 3339, e.g. from [`rfc3339_in`]).
    pub fn set_spot_action(&self, action: &str, time: &str) {
        let body = serde_json::json!({"action": action, "time": time}).to_string();
        self.shared.lock().spot_action = Some(body);
    }

    /// No Spot interruption notice from now on (404).
    pub fn clear_spot_action(&self) {
        self.shared.lock().spot_action = None;
    }

    /// A rebalance recommendation from now on, noticed at `notice_time` (RFC 3339).
    pub fn set_rebalance(&self, notice_time: &str) {
        let body = serde_json::json!({"noticeTime": notice_time}).to_string();
        self.shared.lock().rebalance = Some(body);
    }

    /// No rebalance recommendation from now on (404).
    pub fn clear_rebalance(&self) {
        self.shared.lock().rebalance = None;
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<ImdsRequest> {
        self.shared.lock().requests.clone()
    }

    /// How many requests for `path` were answered so far, whatever their status.
    pub fn count(&self, path: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// Waits until at least `n` requests for `path` were answered; false after `timeout`.
    /// To see a poll that came after a change: `let n = imds.count(p); imds.set_…;
    /// imds.wait_for_count(p, n + 1, t)`.
    pub fn wait_for_count(&self, path: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if state.requests.iter().filter(|r| r.path == path).count() >= n {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            state = self
                .shared
                .logged
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the first request for `path` and returns it; `None` after `timeout`.
    pub fn wait_for_request(&self, path: &str, timeout: Duration) -> Option<ImdsRequest> {
        if !self.wait_for_count(path, 1, timeout) {
            return None;
        }
        self.shared
            .lock()
            .requests
            .iter()
            .find(|r| r.path == path)
            .cloned()
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor out of accept(); if that fails, leave it parked rather than hang.
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
            if let Some(acceptor) = self.acceptor.take() {
                let _ = acceptor.join();
            }
        }
    }
}

/// `now + after` in RFC 3339 (UTC, whole seconds), as IMDS writes times: the deadline of a
/// Spot notice given now.
pub fn rfc3339_in(after: Duration) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + after).to_string()
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("imds-conn".to_string())
            .spawn(move || {
                let _ = serve(stream, &shared);
            });
    }
}

/// Reads one request, answers it and closes the connection.
fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return respond(&stream, 400, &[], "");
    };
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    // A body (none is expected) is read and dropped, so the client sees no reset.
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length.min(1 << 20)];
    reader.read_exact(&mut body)?;

    let path = target.split('?').next().unwrap_or_default().to_string();
    let (status, extra, text) = answer(shared, method, &path, &headers);
    {
        let mut state = shared.lock();
        state.requests.push(ImdsRequest {
            at: SystemTime::now(),
            method: method.to_string(),
            path,
            status,
        });
        shared.logged.notify_all();
    }
    let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
    respond(&stream, status, &extra, &text)
}

/// The status, extra headers and body for one request.
fn answer(
    shared: &Shared,
    method: &str,
    path: &str,
    headers: &HashMap<String, String>,
) -> (u16, Vec<(&'static str, String)>, String) {
    if path == TOKEN_PATH {
        if method != "PUT" {
            return (405, Vec::new(), String::new());
        }
        let ttl = headers
            .get(TTL_HEADER)
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|t| (1..=21600).contains(t));
        let Some(ttl) = ttl else {
            return (400, Vec::new(), String::new());
        };
        let token = format!(
            "rsql-imds-token-{}-{}",
            std::process::id(),
            shared.next_token.fetch_add(1, Ordering::SeqCst)
        );
        shared
            .lock()
            .tokens
            .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        return (
            200,
            vec![("X-aws-ec2-metadata-token-ttl-seconds", ttl.to_string())],
            token,
        );
    }
    if method != "GET" {
        return (405, Vec::new(), String::new());
    }
    let state = shared.lock();
    let valid = headers
        .get(TOKEN_HEADER)
        .and_then(|t| state.tokens.get(t))
        .is_some_and(|expiry| Instant::now() < *expiry);
    if !valid {
        return (401, Vec::new(), String::new());
    }
    let body = match path {
        INSTANCE_ID_PATH => Some(state.instance_id.clone()),
        REGION_PATH => Some(crate::moto::REGION.to_string()),
        LIFECYCLE_STATE_PATH => state.lifecycle_state.clone(),
        SPOT_ACTION_PATH => state.spot_action.clone(),
        REBALANCE_PATH => state.rebalance.clone(),
        _ => None,
    };
    match body {
        Some(body) => (200, Vec::new(), body),
        None => (404, Vec::new(), String::new()),
    }
}

fn respond(
    mut stream: &TcpStream,
    status: u16,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}
