//! Headless Chromium, to look at an HTML report the way a person would: render it to a PNG
//! and read back the DOM the browser built (`--dump-dom`).
//!
//! Chromium comes from Debian's `chromium` package, installed by `make deps`
//! (`.ci/install-deps`). Without it the tests fail and say how to install it.
//!
//! Also a small reader for the dumped DOM: the elements of one tag and class with their
//! attributes, which is all the report's tests need (the report puts every fact a test
//! checks into attributes: `data-status`, `data-job`, `fill`, ...).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one Chromium run may take (a loaded CI machine starts it slowly).
const DEADLINE: Duration = Duration::from_secs(120);

/// The Chromium binary, or a panic saying how to install it.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "Chromium is not installed: run `make deps` (or `apt-get install chromium`) so the \
         report can be rendered the way a person sees it"
    );
}

fn run(args: &[String]) -> Vec<u8> {
    let profile = tempfile::tempdir().expect("chromium profile dir");
    let out_file = profile.path().join("stdout");
    let stdout = std::fs::File::create(&out_file).expect("chromium stdout file");
    let mut child = Command::new(binary())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(
        status.success(),
        "chromium {args:?} failed: {status}\n{stderr}"
    );
    std::fs::read(&out_file).expect("read chromium output")
}

fn url(html: &Path) -> String {
    format!(
        "file://{}",
        html.canonicalize().expect("the HTML file exists").display()
    )
}

/// Renders `html` into `png` at `width`×`height` CSS pixels; returns the PNG's size.
pub fn screenshot(html: &Path, png: &Path, width: u32, height: u32) -> (u32, u32) {
    let _ = std::fs::remove_file(png);
    run(&[
        format!("--screenshot={}", png.display()),
        format!("--window-size={width},{height}"),
        url(html),
    ]);
    let bytes = std::fs::read(png)
        .unwrap_or_else(|e| panic!("chromium wrote no screenshot at {}: {e}", png.display()));
    assert!(
        bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR",
        "{} is not a PNG",
        png.display()
    );
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

/// The DOM Chromium built from `html`, serialised.
pub fn dump_dom(html: &Path) -> String {
    String::from_utf8(run(&["--dump-dom".to_string(), url(html)])).expect("the DOM is UTF-8")
}

/// One element of a serialised DOM: its attributes (entities decoded) and the text up to its
/// end tag (for `<title>` children).
#[derive(Debug, Clone)]
pub struct Element {
    pub attrs: HashMap<String, String>,
    pub inner: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> &str {
        self.attrs.get(name).map(String::as_str).unwrap_or("")
    }

    /// The text of the first `<title>` inside the element.
    pub fn title(&self) -> String {
        let Some(start) = self.inner.find("<title>") else {
            return String::new();
        };
        let rest = &self.inner[start + 7..];
        decode(&rest[..rest.find("</title>").unwrap_or(rest.len())])
    }
}

/// Every `<tag ...>` whose `class` attribute holds `class`, in document order.
pub fn elements(dom: &str, tag: &str, class: &str) -> Vec<Element> {
    let open = format!("<{tag} ");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(found) = dom[at..].find(&open) {
        let start = at + found;
        let Some(end_of_tag) = dom[start..].find('>') else {
            break;
        };
        let tag_text = &dom[start + open.len()..start + end_of_tag];
        let attrs = attributes(tag_text);
        at = start + end_of_tag + 1;
        if !attrs
            .get("class")
            .is_some_and(|c| c.split_whitespace().any(|c| c == class))
        {
            continue;
        }
        let inner = if tag_text.ends_with('/') {
            String::new()
        } else {
            dom[at..]
                .find(&close)
                .map(|e| dom[at..at + e].to_string())
                .unwrap_or_default()
        };
        out.push(Element { attrs, inner });
    }
    out
}

fn attributes(tag_text: &str) -> HashMap<String, String> {
    let mut attrs = HashMap::new();
    let mut rest = tag_text.trim();
    while !rest.is_empty() {
        let name_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let name = rest[..name_end].trim_end_matches('/').to_string();
        rest = &rest[name_end..];
        if let Some(after) = rest.strip_prefix("=\"") {
            let value_end = after.find('"').unwrap_or(after.len());
            attrs.insert(name, decode(&after[..value_end]));
            rest = after.get(value_end + 1..).unwrap_or("").trim_start();
        } else {
            if !name.is_empty() {
                attrs.insert(name, String::new());
            }
            rest = rest.trim_start();
        }
    }
    attrs
}

fn decode(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}
