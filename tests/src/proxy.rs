//! A cuttable, recording TCP proxy for fault tests: put it between a client (the agent, or
//! test code) and a server (moto), then cut the link to simulate an outage.
//!
//! It runs on plain threads of its own (one acceptor, two per connection), so it works the
//! same from sync tests and from any tokio runtime. Bytes are forwarded unchanged.
//!
//! Modes (see [`Proxy::cut`], [`Proxy::blackhole`], [`Proxy::restore`]):
//! - **open**: forward.
//! - **cut**: a hard outage that fails fast. Every existing connection is shut down at once
//!   (both directions; an in-flight request fails with "connection closed"/"reset", an idle
//!   pooled connection is seen closed), and every new connection is accepted and reset at
//!   once (`SO_LINGER` 0, so the client gets ECONNRESET on its first read or write). The
//!   listener stays bound so the port, baked into the client's endpoint, survives.
//! - **blackhole**: a silent outage that ends in the client's own timeout. Existing
//!   connections are shut down as in `cut`; new ones are accepted and then never answered
//!   (held open until [`Proxy::restore`] or drop, then reset).
//!
//! If the target refuses (moto stopped), the client's connection is reset the same way.
//!
//! Recording ([`Proxy::set_recording`]) parses the client-to-server stream as HTTP/1.1
//! requests, several per keep-alive connection, bodies framed by `Content-Length` or
//! `Transfer-Encoding: chunked` (de-chunked in the record), and keeps each complete request.
//! Responses are not recorded.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// One HTTP request that went through the proxy while recording was on.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Which client connection carried it (numbered from 1 in accept order).
    pub connection: u64,
    /// When its last byte arrived.
    pub at: SystemTime,
    pub method: String,
    /// The request target as sent, e.g. `/` or `/moto-api/config`.
    pub path: String,
    /// Header names and values as sent, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked when it was sent chunked).
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `X-Amz-Target` of an AWS JSON-protocol call, e.g.
    /// `AWSStepFunctions.SendTaskFailure`, `AmazonSQS.ReceiveMessage`,
    /// `Logs_20140328.PutLogEvents`, `DynamoDB_20120810.PutItem`.
    pub fn amz_target(&self) -> Option<&str> {
        self.header("x-amz-target")
    }

    /// The operation name of an AWS call: for the JSON protocols the part of `X-Amz-Target`
    /// after the dot, e.g. `SendTaskFailure`; for the query protocol (Auto Scaling) the
    /// `Action` of the form body, e.g. `CompleteLifecycleAction`.
    pub fn operation(&self) -> Option<&str> {
        match self.amz_target() {
            Some(t) => Some(t.rsplit_once('.').map_or(t, |(_, op)| op)),
            None => self
                .form_pairs()?
                .find_map(|(k, v)| (k == "Action").then_some(v)),
        }
    }

    /// A parameter of a query-protocol call's form body, percent-decoded, e.g.
    /// `form_param("LifecycleActionResult")` or `form_param("InstanceIds.member.1")`. `None`
    /// when the body is no form or lacks it.
    pub fn form_param(&self, name: &str) -> Option<String> {
        self.form_pairs()?
            .find(|(k, _)| percent_decode(k) == name)
            .map(|(_, v)| percent_decode(v))
    }

    /// The raw `key=value` pairs of an `application/x-www-form-urlencoded` body.
    fn form_pairs(&self) -> Option<impl Iterator<Item = (&str, &str)>> {
        let form = self
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
        let body = std::str::from_utf8(&self.body).ok().filter(|_| form)?;
        Some(
            body.split('&')
                .filter_map(|pair| pair.split_once('=').or(Some((pair, "")))),
        )
    }

    /// The body as text (lossy).
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn body_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Cut,
    Blackhole,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    state: Mutex<State>,
    /// Signalled whenever a request is recorded.
    recorded: Condvar,
    recording: AtomicBool,
    stopping: AtomicBool,
    next_conn: AtomicU64,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    /// Both sockets of every live forwarded connection, by connection number.
    live: HashMap<u64, (TcpStream, TcpStream)>,
    /// Connections accepted in blackhole mode, held unanswered.
    held: Vec<TcpStream>,
    requests: Vec<RecordedRequest>,
    accepted: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking pump thread must not take the whole proxy down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A TCP proxy on `127.0.0.1:<free port>` to a target address. Dropping it closes
/// everything.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts forwarding to `target`, not recording.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target,
            state: Mutex::new(State {
                mode: Mode::Open,
                live: HashMap::new(),
                held: Vec::new(),
                requests: Vec::new(),
                accepted: 0,
            }),
            recorded: Condvar::new(),
            recording: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("proxy-accept-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn the proxy acceptor")
        };
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Starts forwarding to `target` with recording on.
    pub fn start_recording(target: SocketAddr) -> Proxy {
        let proxy = Proxy::start(target);
        proxy.set_recording(true);
        proxy
    }

    /// The proxy's own address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, to use as the client's endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// A hard outage: kill every existing connection and reset every new one at once.
    pub fn cut(&self) {
        self.set_mode(Mode::Cut);
    }

    /// A silent outage: kill every existing connection; accept new ones but never answer.
    pub fn blackhole(&self) {
        self.set_mode(Mode::Blackhole);
    }

    /// Forward again. Connections held by [`Proxy::blackhole`] are reset.
    pub fn restore(&self) {
        self.set_mode(Mode::Open);
    }

    /// Whether the proxy is currently forwarding.
    pub fn is_open(&self) -> bool {
        self.shared.lock().mode == Mode::Open
    }

    fn set_mode(&self, mode: Mode) {
        let mut state = self.shared.lock();
        state.mode = mode;
        if mode != Mode::Open {
            for (_, (client, server)) in state.live.drain() {
                kill(&client);
                kill(&server);
            }
        } else {
            for held in state.held.drain(..) {
                kill(&held);
            }
        }
    }

    /// Turns recording of requests on or off. A request is recorded if recording was on
    /// when its first byte arrived.
    pub fn set_recording(&self, on: bool) {
        self.shared.recording.store(on, Ordering::SeqCst);
    }

    /// The requests recorded so far, in the order they completed.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// The recorded requests whose operation (see [`RecordedRequest::operation`]) is `op`.
    pub fn requests_for(&self, op: &str) -> Vec<RecordedRequest> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.operation() == Some(op))
            .cloned()
            .collect()
    }

    /// Forgets the requests recorded so far.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Waits until a recorded request satisfies `pred` and returns the first that does;
    /// `None` after `timeout`.
    pub fn wait_for_request(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&RecordedRequest) -> bool,
    ) -> Option<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(found) = state.requests.iter().find(|r| pred(r)) {
                return Some(found.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            state = self
                .shared
                .recorded
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// How many client connections the proxy has accepted so far (in any mode).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.lock().accepted
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.set_mode(Mode::Cut);
        self.set_mode(Mode::Open); // drops held connections
                                   // Wake the acceptor out of accept(); if that fails, leave it parked rather than hang.
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
            if let Some(acceptor) = self.acceptor.take() {
                let _ = acceptor.join();
            }
        }
    }
}

/// Shut a socket down in both directions, with `SO_LINGER` 0 so that when its last
/// descriptor closes the peer gets a reset rather than a graceful close.
fn kill(stream: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        stream,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    let _ = stream.shutdown(Shutdown::Both);
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let mut state = shared.lock();
        state.accepted += 1;
        match state.mode {
            Mode::Cut => kill(&client),
            Mode::Blackhole => state.held.push(client),
            Mode::Open => {
                drop(state);
                let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("proxy-conn-{id}"))
                    .spawn(move || connect_and_pump(id, client, shared));
            }
        }
    }
}

fn connect_and_pump(id: u64, client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect_timeout(&shared.target, Duration::from_secs(5)) else {
        kill(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let clones = (|| Some((client.try_clone().ok()?, server.try_clone().ok()?)))();
    let Some((client_reg, server_reg)) = clones else {
        kill(&client);
        kill(&server);
        return;
    };
    {
        let mut state = shared.lock();
        // A cut may have come while we were connecting.
        if state.mode != Mode::Open {
            drop(state);
            kill(&client);
            kill(&server);
            return;
        }
        state.live.insert(id, (client_reg, server_reg));
    }
    let (Ok(client_w), Ok(server_r)) = (client.try_clone(), server.try_clone()) else {
        if let Some((c, s)) = shared.lock().live.remove(&id) {
            kill(&c);
            kill(&s);
        }
        return;
    };
    // server -> client on a thread of its own; client -> server (and recording) here.
    let down = std::thread::Builder::new()
        .name(format!("proxy-down-{id}"))
        .spawn(move || pump(server_r, client_w, None));
    let mut recorder = Recorder::new(id, shared.clone());
    pump(client, server, Some(&mut recorder));
    if let Ok(down) = down {
        let _ = down.join();
    }
    shared.lock().live.remove(&id);
}

/// Copies `from` to `to` until either side ends, then shuts both down so the opposite pump
/// ends too.
fn pump(mut from: TcpStream, mut to: TcpStream, mut recorder: Option<&mut Recorder>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(recorder) = recorder.as_deref_mut() {
            recorder.feed(&buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    // Half-close politely: the peer may still be sending its response.
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Incremental HTTP/1.1 request parser over the client-to-server byte stream.
#[derive(Debug)]
struct Recorder {
    connection: u64,
    shared: Arc<Shared>,
    buf: Vec<u8>,
    phase: Phase,
    /// The request being read, and whether it is to be kept.
    current: Option<(RecordedRequest, bool)>,
}

#[derive(Debug)]
enum Phase {
    Head,
    Body {
        left: usize,
    },
    ChunkSize,
    ChunkData {
        left: usize,
    },
    ChunkDataEnd,
    Trailers,
    /// The stream stopped looking like HTTP/1.1; forward without parsing.
    Lost,
}

impl Recorder {
    fn new(connection: u64, shared: Arc<Shared>) -> Recorder {
        Recorder {
            connection,
            shared,
            buf: Vec::new(),
            phase: Phase::Head,
            current: None,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        if matches!(self.phase, Phase::Lost) {
            return;
        }
        self.buf.extend_from_slice(bytes);
        while self.step() {}
    }

    fn keep(&self) -> bool {
        self.current.as_ref().is_some_and(|(_, keep)| *keep)
    }

    fn body_push(&mut self, n: usize) {
        if self.keep() {
            if let Some((req, _)) = self.current.as_mut() {
                req.body.extend_from_slice(&self.buf[..n]);
            }
        }
        self.buf.drain(..n);
    }

    fn take_line(&mut self) -> Option<String> {
        let end = self.buf.windows(2).position(|w| w == b"\r\n")?;
        let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 2);
        Some(line)
    }

    /// Makes one step of progress; false when more bytes are needed.
    fn step(&mut self) -> bool {
        match self.phase {
            Phase::Lost => false,
            Phase::Head => {
                if self.buf.starts_with(b"\r\n") {
                    // Tolerate a stray CRLF between requests.
                    self.buf.drain(..2);
                    return true;
                }
                let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    if self.buf.len() > 1 << 20 {
                        self.lose();
                    }
                    return false;
                };
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                let mut lines = head.split("\r\n");
                let mut request_line = lines.next().unwrap_or_default().split(' ');
                let (Some(method), Some(path), Some(version)) = (
                    request_line.next(),
                    request_line.next(),
                    request_line.next(),
                ) else {
                    self.lose();
                    return false;
                };
                if !version.starts_with("HTTP/1.") {
                    self.lose();
                    return false;
                }
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                    .collect();
                let req = RecordedRequest {
                    connection: self.connection,
                    at: SystemTime::now(),
                    method: method.to_string(),
                    path: path.to_string(),
                    headers,
                    body: Vec::new(),
                };
                let chunked = req
                    .header("transfer-encoding")
                    .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
                let length = req.header("content-length").map(|l| l.parse::<usize>());
                let keep = self.shared.recording.load(Ordering::SeqCst);
                self.current = Some((req, keep));
                self.phase = match (chunked, length) {
                    (true, _) => Phase::ChunkSize,
                    (false, Some(Ok(left))) => Phase::Body { left },
                    (false, Some(Err(_))) => {
                        self.lose();
                        return false;
                    }
                    (false, None) => Phase::Body { left: 0 },
                };
                true
            }
            Phase::Body { left } => {
                let n = left.min(self.buf.len());
                self.body_push(n);
                if n == left {
                    self.finish();
                    true
                } else {
                    self.phase = Phase::Body { left: left - n };
                    false
                }
            }
            Phase::ChunkSize => {
                let Some(line) = self.take_line() else {
                    return false;
                };
                let size = line.split(';').next().unwrap_or_default().trim();
                match usize::from_str_radix(size, 16) {
                    Ok(0) => self.phase = Phase::Trailers,
                    Ok(left) => self.phase = Phase::ChunkData { left },
                    Err(_) => {
                        self.lose();
                        return false;
                    }
                }
                true
            }
            Phase::ChunkData { left } => {
                let n = left.min(self.buf.len());
                self.body_push(n);
                if n == left {
                    self.phase = Phase::ChunkDataEnd;
                    true
                } else {
                    self.phase = Phase::ChunkData { left: left - n };
                    false
                }
            }
            Phase::ChunkDataEnd => {
                if self.buf.len() < 2 {
                    return false;
                }
                if &self.buf[..2] != b"\r\n" {
                    self.lose();
                    return false;
                }
                self.buf.drain(..2);
                self.phase = Phase::ChunkSize;
                true
            }
            Phase::Trailers => {
                let Some(line) = self.take_line() else {
                    return false;
                };
                if line.is_empty() {
                    self.finish();
                }
                true
            }
        }
    }

    fn finish(&mut self) {
        self.phase = Phase::Head;
        if let Some((mut req, true)) = self.current.take() {
            req.at = SystemTime::now();
            self.shared.lock().requests.push(req);
            self.shared.recorded.notify_all();
        }
    }

    fn lose(&mut self) {
        self.phase = Phase::Lost;
        self.buf = Vec::new();
        self.current = None;
    }
}
