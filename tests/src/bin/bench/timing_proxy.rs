//! The timing proxy: a loopback HTTP/1.1 relay that records each AWS call and when its
//! response was handed back.

use super::*;

/// One request through the proxy, and when its response was handed back.
#[derive(Debug, Clone)]
pub(super) struct Rec {
    pub(super) op: String,
    pub(super) token: Option<String>,
    /// Event message bytes, for PutLogEvents.
    pub(super) event_bytes: u64,
    pub(super) status: u16,
    /// When the request had reached the proxy.
    pub(super) sent: SystemTime,
    pub(super) acked: Option<SystemTime>,
}

#[derive(Debug)]
pub(super) struct ProxyShared {
    pub(super) target: SocketAddr,
    pub(super) recs: Mutex<Vec<Rec>>,
    pub(super) changed: Condvar,
    pub(super) stopping: AtomicBool,
}

impl ProxyShared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Vec<Rec>> {
        self.recs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Shipped {
    pub(super) requests: usize,
    pub(super) bytes: u64,
    pub(super) last_ack: Option<SystemTime>,
}

/// A loopback HTTP/1.1 relay that timestamps each response's last byte.
#[derive(Debug)]
pub(super) struct TimingProxy {
    pub(super) addr: SocketAddr,
    pub(super) shared: Arc<ProxyShared>,
}

impl TimingProxy {
    pub(super) fn start(target: SocketAddr) -> TimingProxy {
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

    pub(super) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(super) fn count_requests(&self, op: &str) -> usize {
        self.shared.lock().iter().filter(|r| r.op == op).count()
    }

    /// The round trip of the first `op` request that carried `token`.
    pub(super) fn first_round_trip_ms(&self, op: &str, token: &str) -> Option<f64> {
        self.shared
            .lock()
            .iter()
            .find(|r| r.op == op && r.token.as_deref() == Some(token))
            .and_then(|r| Some(ms_between(r.sent, r.acked?)))
    }

    pub(super) fn count_ok(&self, op: &str) -> usize {
        self.shared
            .lock()
            .iter()
            .filter(|r| r.op == op && r.acked.is_some() && r.status == 200)
            .count()
    }

    pub(super) fn shipped(&self) -> Shipped {
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

    pub(super) fn wait<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&[Rec]) -> Option<T>,
    ) -> Option<T> {
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

    pub(super) fn find_ack(recs: &[Rec], op: &str, token: &str) -> Option<SystemTime> {
        recs.iter()
            .find(|r| r.op == op && r.status == 200 && r.token.as_deref() == Some(token))
            .and_then(|r| r.acked)
    }

    pub(super) fn wait_ack_plain(&self, op: &str, token: &str, timeout: Duration) -> SystemTime {
        self.wait(timeout, |recs| Self::find_ack(recs, op, token))
            .unwrap_or_else(|| panic!("no acknowledged {op} for a job within {timeout:?}"))
    }

    pub(super) fn wait_ack(
        &self,
        op: &str,
        token: &str,
        timeout: Duration,
        agent: &BenchAgent,
    ) -> SystemTime {
        self.wait(timeout, |recs| Self::find_ack(recs, op, token))
            .unwrap_or_else(|| {
                panic!(
                    "no acknowledged {op} for a job within {timeout:?}; agent log:\n{}",
                    agent.log()
                )
            })
    }

    pub(super) fn wait_count(&self, op: &str, n: usize, timeout: Duration, agent: &BenchAgent) {
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
                agent.log()
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
pub(super) struct HttpMessage {
    pub(super) raw: Vec<u8>,
    pub(super) first_line: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
}

impl HttpMessage {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub(super) fn read_line(
    r: &mut impl BufRead,
    raw: &mut Vec<u8>,
) -> std::io::Result<Option<String>> {
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
pub(super) fn read_message(
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

pub(super) fn relay(client: TcpStream, shared: Arc<ProxyShared>) {
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
