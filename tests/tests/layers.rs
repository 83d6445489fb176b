//! The modules of the agent import each other in one direction: no import cycle, and no
//! import from a lower layer up to a higher one. And the core crate keeps out of the AWS SDKs.
//!
//! The agent is two crates with one module tree: `rsql_agent` (`agent/src`) and the core
//! crate without AWS, `rsql_agent_core` (`agent/core/src`), whose modules the agent
//! re-exports at the same paths (`crate::supervisor` is the core's `supervisor` in both).
//! A module may have a file in each (`joblog`: the file in the core, its CloudWatch shipper in
//! the agent); both files are read as that one module.
//!
//! The graph is read from the source itself (std only, no network, no build): every
//! `use crate::…`/`use super::…`/`use self::…` (use trees included), every such path in code,
//! and every path through a child module a file declares (`mod batch;` then `batch::Batch`).
//! Comments, doc links and string literals do not count. A path is resolved to the module it
//! names, one node per module (`attempt`, `report::audit`, `joblog::cloudwatch::shipper`); an
//! item a module re-exports (`pub use state::Position`) counts as an import of the module
//! that defines it. The crate roots (`lib.rs`: the module lists, the re-exports and
//! `error_chain`) are no node.
//!
//! - **Cycles.** A cycle between modules fails the test, spelled out as `a → b → c → a`, each
//!   step with a `file:line` that makes it. Imports between a module and its own descendants
//!   (`daemon` and `daemon::owned`, or a child's `super::Error`) are a parent using its
//!   parts and are left out of the cycle search; the layer check below still sees them.
//! - **Layers.** [`LAYERS`] orders the modules from the bottom up. A module belongs to the
//!   layer of its longest entry (`joblog` is low, `joblog::cloudwatch` sits higher). A module
//!   may import its own layer and any layer below; an import of a higher layer fails with
//!   its `file:line`. A new module must be given a layer here, and an entry that names no
//!   module fails too.
//! - **No AWS in the core.** `agent/core/Cargo.toml` names no `aws-*` crate and not the
//!   agent, in any dependency table: `rsql-job-owner` is built from that crate alone.
//!
//! The binaries (`main.rs`, `bin/`) are the top and are not checked.
//!
//! Why one file of about 900 lines: the check is a small parser of Rust imports with its own
//! tests of that parser; one file keeps what is checked and how beside each other.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

/// The layers, bottom first: a module may import modules of its own layer and of the layers
/// before it.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "plumbing that knows no job",
        &[
            "fsutil", "trust", "masking", "stop", "secrets", "signals", "notify", "identity",
            "imds", "slots", "logging", "aws",
        ],
    ),
    (
        "a job's parts: lock, cgroup, log file, child process, outcome",
        &[
            "lock",
            "state_dir_lock",
            "cgroup",
            "joblog",
            "legacy",
            "workflow::stage",
            "supervisor",
            "outcome",
            "run",
        ],
    ),
    (
        "what is asked: the config and the job message",
        &["config", "reload", "job"],
    ),
    (
        "in and out: intake, reporting, log shipping, metrics, the fleet's notices",
        &["intake", "report", "joblog::cloudwatch", "metrics", "fleet"],
    ),
    ("one job attempt", &["attempt"]),
    (
        "what runs attempts: the job owner, the local workflow runner, start-up",
        &["job_owner", "workflow", "startup"],
    ),
    (
        "the commands: the daemon, the AWS workflow and the workflow report, the linter",
        &[
            "daemon",
            "workflow::aws",
            "workflow::report",
            "scripts_check",
        ],
    ),
    ("the exit code of every typed error", &["exit"]),
];

/// The repository root (this crate is `tests/`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A module path, `report::audit` as `["report", "audit"]`; the crate root is empty.
type ModPath = Vec<String>;

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".to_string()
    } else {
        module.join("::")
    }
}

/// Every library module with a file of its own, and its files (relative to the repository):
/// one, or one in each crate.
fn library_files(root: &Path) -> BTreeMap<ModPath, Vec<PathBuf>> {
    let mut files: BTreeMap<ModPath, Vec<PathBuf>> = BTreeMap::new();
    for f in rsql_agent_tests::sources::library_files(root) {
        files.entry(f.module).or_default().push(f.file);
    }
    files
}

/// `source` with comments, string literals and char literals blanked to spaces; newlines are
/// kept, so line numbers stay right.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
        } else if c == 'r'
            && matches!(next, Some('"' | '#'))
            && (i == 0 || !ident(chars[i - 1]) || chars[i - 1] == 'b')
            && {
                let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
                chars.get(i + 1 + hashes) == Some(&'"')
            }
        {
            // A raw string: r"…", r#"…"#, br"…".
            let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
            let body = i + 2 + hashes;
            let mut end = body;
            while end < chars.len() {
                if chars[end] == '"' && chars[end + 1..].iter().take(hashes).all(|&h| h == '#') {
                    break;
                }
                end += 1;
            }
            let end = (end + 1 + hashes).min(chars.len());
            for &c in &chars[i..end] {
                blank(&mut out, c);
            }
            i = end;
        } else if c == '"' {
            blank(&mut out, c);
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
                if i < chars.len() {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
            if i < chars.len() {
                blank(&mut out, chars[i]);
                i += 1;
            }
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A char literal ('a', '\n', '\'', '\u{1F600}'); a lifetime ('a) has no closing
            // quote.
            let mut end = if next == Some('\\') { i + 3 } else { i + 2 };
            while end < chars.len() && chars[end] != '\'' {
                end += 1;
            }
            let end = (end + 1).min(chars.len());
            for &c in &chars[i..end] {
                blank(&mut out, c);
            }
            i = end;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
}

/// The tokens of code that went through [`code_only`], each with its 1-based line.
fn tokens(code: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Token::Ident(chars[start..i].iter().collect()), line));
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push((Token::Sep, line));
            i += 2;
        } else {
            out.push((Token::Punct(c), line));
            i += 1;
        }
    }
    out
}

fn is(token: Option<&(Token, usize)>, want: &Token) -> bool {
    token.is_some_and(|(t, _)| t == want)
}

fn ident(token: Option<&(Token, usize)>) -> Option<&str> {
    match token {
        Some((Token::Ident(s), _)) => Some(s),
        _ => None,
    }
}

/// One path a `use` names, with the name it brings in (`as` included); `None` for a glob.
struct UsePath {
    segments: Vec<String>,
    binds: Option<String>,
}

/// Parses the use tree at `toks[i..]` under `prefix` into `out`; returns where it ends.
fn use_tree(
    toks: &[(Token, usize)],
    mut i: usize,
    prefix: &[String],
    out: &mut Vec<UsePath>,
) -> usize {
    let mut path = prefix.to_vec();
    loop {
        match toks.get(i).map(|(t, _)| t) {
            Some(Token::Ident(s)) => {
                path.push(s.clone());
                i += 1;
                if is(toks.get(i), &Token::Sep) {
                    i += 1;
                } else {
                    break;
                }
            }
            Some(Token::Sep) => i += 1,
            Some(Token::Punct('{')) => {
                i += 1;
                while i < toks.len() && !is(toks.get(i), &Token::Punct('}')) {
                    let before = i;
                    i = use_tree(toks, i, &path, out);
                    // Past the comma, or past a token the tree could not read.
                    if is(toks.get(i), &Token::Punct(',')) || i == before {
                        i += 1;
                    }
                }
                return i + 1;
            }
            Some(Token::Punct('*')) => {
                out.push(UsePath {
                    segments: path,
                    binds: None,
                });
                return i + 1;
            }
            _ => break,
        }
    }
    let mut binds = path.last().cloned();
    if ident(toks.get(i)) == Some("as") {
        binds = ident(toks.get(i + 1)).map(str::to_string);
        i += 2;
    }
    if binds.as_deref() == Some("self") {
        path.pop();
        binds = path.last().cloned();
    }
    out.push(UsePath {
        segments: path,
        binds,
    });
    i
}

/// One path in a file that names a module of this crate, as written.
struct Reference {
    line: usize,
    /// The module the path is written in (the file's module plus any inline `mod x { }`).
    scope: ModPath,
    segments: Vec<String>,
}

/// What one file says about modules.
struct Parsed {
    references: Vec<Reference>,
    /// `pub use` at the file's top level: the name it exports → the path it names.
    reexports: Vec<(String, Reference)>,
}

/// Every `crate::`/`super::`/`self::` path in `code`, and every path through one of the
/// file's own child modules; `module` is the file's module.
fn parse(code: &str, module: &ModPath) -> Parsed {
    let toks = tokens(code);
    // Child modules declared in the file (`mod x;`), which paths may start with.
    let mut children = HashSet::new();
    for w in toks.windows(3) {
        if let [(Token::Ident(m), _), (Token::Ident(child), _), (Token::Punct(';'), _)] = w {
            if m == "mod" {
                children.insert(child.clone());
            }
        }
    }
    let mut parsed = Parsed {
        references: Vec::new(),
        reexports: Vec::new(),
    };
    // Inline modules (`mod tests {`) open at a brace depth.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let (token, line) = &toks[i];
        let scope: ModPath = module
            .iter()
            .cloned()
            .chain(inline.iter().map(|(m, _)| m.clone()))
            .collect();
        match token {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Token::Ident(kw) if kw == "mod" => {
                if let (Some(m), true) = (
                    ident(toks.get(i + 1)),
                    is(toks.get(i + 2), &Token::Punct('{')),
                ) {
                    inline.push((m.to_string(), depth + 1));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            Token::Ident(kw) if kw == "use" => {
                let public = i > 0
                    && (ident(toks.get(i - 1)) == Some("pub")
                        || (is(toks.get(i - 1), &Token::Punct(')'))
                            && toks[..i]
                                .iter()
                                .rev()
                                .take(5)
                                .any(|(t, _)| *t == Token::Ident("pub".into()))));
                let mut paths = Vec::new();
                let end = use_tree(&toks, i + 1, &[], &mut paths);
                for path in paths {
                    let first = path.segments.first().map(String::as_str);
                    let ours = matches!(first, Some("crate" | "super" | "self"))
                        || (inline.is_empty() && first.is_some_and(|f| children.contains(f)));
                    if !ours {
                        continue;
                    }
                    let reference = Reference {
                        line: *line,
                        scope: scope.clone(),
                        segments: path.segments,
                    };
                    match (public && inline.is_empty(), path.binds) {
                        (true, Some(binds)) => parsed.reexports.push((binds, reference)),
                        _ => parsed.references.push(reference),
                    }
                }
                i = end.max(i + 1);
                continue;
            }
            Token::Ident(first) => {
                let continues = i > 0 && matches!(toks[i - 1].0, Token::Sep | Token::Punct('$'));
                let ours = matches!(first.as_str(), "crate" | "super" | "self")
                    || (inline.is_empty() && children.contains(first));
                if !continues && ours && is(toks.get(i + 1), &Token::Sep) {
                    let mut segments = vec![first.clone()];
                    let mut j = i + 1;
                    while is(toks.get(j), &Token::Sep) {
                        match ident(toks.get(j + 1)) {
                            Some(s) => segments.push(s.to_string()),
                            None => break,
                        }
                        j += 2;
                    }
                    parsed.references.push(Reference {
                        line: *line,
                        scope,
                        segments,
                    });
                    i = j;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    parsed
}

/// The library's modules and who imports whom.
struct Graph {
    files: BTreeMap<ModPath, Vec<PathBuf>>,
    /// Every import: from, to, and the `file:line` that makes it.
    edges: Vec<(ModPath, ModPath, String)>,
}

/// The path `segments`, written in `scope`, as a path from the crate root.
fn absolute(scope: &[String], segments: &[String]) -> Vec<String> {
    let mut base: Vec<String> = Vec::new();
    let mut rest = segments;
    match segments.first().map(String::as_str) {
        Some("crate") => rest = &segments[1..],
        Some("self" | "super") => {
            base = scope.to_vec();
            while let Some(first) = rest.first() {
                match first.as_str() {
                    "self" => {}
                    "super" => {
                        base.pop();
                    }
                    _ => break,
                }
                rest = &rest[1..];
            }
        }
        // A child module of the scope.
        _ => base = scope.to_vec(),
    }
    base.extend(rest.iter().cloned());
    base
}

/// The module an absolute path names: its longest prefix that is a module with a file, with
/// a re-exported item followed to the module that defines it.
fn module_of(
    path: &[String],
    files: &BTreeMap<ModPath, Vec<PathBuf>>,
    reexports: &HashMap<(ModPath, String), Vec<String>>,
    hops: usize,
) -> ModPath {
    let mut module: ModPath = Vec::new();
    for (n, segment) in path.iter().enumerate() {
        let mut longer = module.clone();
        longer.push(segment.clone());
        if files.contains_key(&longer) {
            module = longer;
            continue;
        }
        if hops < 8 {
            if let Some(target) = reexports.get(&(module.clone(), segment.clone())) {
                let mut followed = target.clone();
                followed.extend(path[n + 1..].iter().cloned());
                return module_of(&followed, files, reexports, hops + 1);
            }
        }
        break;
    }
    module
}

fn graph() -> Graph {
    let root = repo();
    let files = library_files(&root);
    let mut parsed = Vec::new();
    let mut reexports = HashMap::new();
    for (module, module_files) in &files {
        for file in module_files {
            let source = std::fs::read_to_string(root.join(file))
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
            let p = parse(&code_only(&source), module);
            for (binds, reference) in &p.reexports {
                reexports.insert(
                    (module.clone(), binds.clone()),
                    absolute(&reference.scope, &reference.segments),
                );
            }
            parsed.push((module.clone(), file.clone(), p));
        }
    }
    let mut edges = Vec::new();
    for (module, file, p) in &parsed {
        let all = p
            .references
            .iter()
            .chain(p.reexports.iter().map(|(_, r)| r));
        for reference in all {
            let path = absolute(&reference.scope, &reference.segments);
            let to = module_of(&path, &files, &reexports, 0);
            if to != *module && !to.is_empty() {
                let at = format!("{}:{}", file.display(), reference.line);
                edges.push((module.clone(), to, at));
            }
        }
    }
    Graph { files, edges }
}

/// Whether one module is the other's ancestor.
fn related(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Who imports whom, across families, with the first `file:line` of each import.
type Next = BTreeMap<ModPath, BTreeMap<ModPath, String>>;

fn imports<'a>(next: &'a Next, module: &ModPath) -> impl Iterator<Item = &'a ModPath> {
    next.get(module).into_iter().flat_map(BTreeMap::keys)
}

/// Every module `from` reaches through one import or more.
fn reach(from: &ModPath, next: &Next) -> BTreeSet<ModPath> {
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([from.clone()]);
    while let Some(at) = queue.pop_front() {
        for to in imports(next, &at) {
            if seen.insert(to.clone()) {
                queue.push_back(to.clone());
            }
        }
    }
    seen
}

/// A shortest cycle from `start` back to it, spelled out with where each step is made.
fn shortest_cycle(start: &ModPath, next: &Next) -> String {
    let mut came_from: HashMap<ModPath, ModPath> = HashMap::new();
    let mut queue = VecDeque::from([start.clone()]);
    while let Some(at) = queue.pop_front() {
        for to in imports(next, &at) {
            if came_from.contains_key(to) {
                continue;
            }
            came_from.insert(to.clone(), at.clone());
            if to != start {
                queue.push_back(to.clone());
                continue;
            }
            let mut walk = vec![start.clone(), at.clone()];
            while walk.last() != Some(start) {
                let back = came_from[walk.last().expect("not empty")].clone();
                walk.push(back);
            }
            walk.reverse();
            let names: Vec<String> = walk.iter().map(|m| name(m)).collect();
            let steps: Vec<String> = walk
                .windows(2)
                .map(|w| {
                    format!(
                        "  {} → {}: {}",
                        name(&w[0]),
                        name(&w[1]),
                        next[&w[0]][&w[1]]
                    )
                })
                .collect();
            return format!("{}\n{}", names.join(" → "), steps.join("\n"));
        }
    }
    unreachable!("{} reaches itself", name(start))
}

#[test]
fn the_parser_finds_each_kind_of_import_and_nothing_else() {
    // A parser that finds nothing would pass every check below.
    let source = r##"
//! A comment that names crate::commented is no import.
mod child;
use std::fmt;
use crate::report::audit::{self, JobAuditRecord as Record};
use super::{sibling::Thing, other};
pub use child::Item;
/* crate::blocked /* nested */ crate::still_blocked */
fn f<'a>(x: &'a str) -> crate::lock::Lock {
    let s = "crate::quoted \" crate::still_quoted";
    let r = r#"crate::raw "quoted" crate::still_raw"#;
    let c = '"';
    let e = '\'';
    child::go();
    crate::secrets::mask(x);
    $crate::from_a_macro();
    fmt::Debug::fmt(&e, s);
}
#[cfg(test)]
mod tests {
    use super::*;
    fn t() {
        super::super::up::X;
    }
}
"##;
    let module: ModPath = vec!["a".into(), "b".into()];
    let parsed = parse(&code_only(source), &module);
    let found: BTreeSet<String> = parsed
        .references
        .iter()
        .map(|r| format!("{}:{}", absolute(&r.scope, &r.segments).join("::"), r.line))
        .collect();
    let want: BTreeSet<String> = [
        "report::audit:5",
        "report::audit::JobAuditRecord:5",
        "a::sibling::Thing:6",
        "a::other:6",
        "lock::Lock:9",
        "a::b::child::go:14",
        "secrets::mask:15",
        "a::b:21",
        "a::up::X:23",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(found, want);
    let reexports: Vec<String> = parsed
        .reexports
        .iter()
        .map(|(binds, r)| format!("{binds} = {}", absolute(&r.scope, &r.segments).join("::")))
        .collect();
    assert_eq!(reexports, ["Item = a::b::child::Item"]);

    let g = graph();
    assert!(g.files.len() > 40, "found only {} modules", g.files.len());
    assert!(g.edges.len() > 200, "found only {} imports", g.edges.len());
}

#[test]
fn no_module_imports_in_a_cycle() {
    let g = graph();
    let mut next = Next::new();
    for (from, to, at) in &g.edges {
        if !related(from, to) {
            next.entry(from.clone())
                .or_default()
                .entry(to.clone())
                .or_insert_with(|| at.clone());
        }
    }
    let reaches: BTreeMap<&ModPath, BTreeSet<ModPath>> =
        g.files.keys().map(|m| (m, reach(m, &next))).collect();
    let mut reported = BTreeSet::new();
    let mut found = Vec::new();
    for (module, reached) in &reaches {
        if !reached.contains(*module) || reported.contains(*module) {
            continue;
        }
        // The modules on some cycle with this one: it reaches them and they reach it.
        let ring: BTreeSet<&ModPath> = reached
            .iter()
            .filter(|m| reaches[m].contains(*module))
            .collect();
        reported.extend(ring.iter().map(|m| (*m).clone()));
        let members: Vec<String> = ring.iter().map(|m| name(m)).collect();
        found.push(format!(
            "a cycle among {{{}}}:\n{}",
            members.join(", "),
            shortest_cycle(module, &next)
        ));
    }
    assert!(
        found.is_empty(),
        "modules of agent/src import each other in a cycle; move the item that sits on the \
         wrong side down to the lower module:\n\n{}\n",
        found.join("\n\n")
    );
}

/// The layer of `module`: the index and name of its longest entry in [`LAYERS`].
fn layer_of(module: &[String]) -> Option<(usize, &'static str, usize)> {
    let mut best: Option<(usize, &'static str, usize)> = None;
    for (n, (layer, entries)) in LAYERS.iter().enumerate() {
        for entry in *entries {
            let entry: Vec<&str> = entry.split("::").collect();
            let matches =
                module.len() >= entry.len() && module.iter().zip(&entry).all(|(a, b)| a == b);
            if matches && best.is_none_or(|(_, _, len)| entry.len() > len) {
                best = Some((n, layer, entry.len()));
            }
        }
    }
    best
}

#[test]
fn no_module_imports_a_higher_layer() {
    let g = graph();
    let mut broken = Vec::new();
    for module in g.files.keys().filter(|m| !m.is_empty()) {
        if layer_of(module).is_none() {
            broken.push(format!(
                "{}: the module `{}` is in no layer; add it to LAYERS in tests/tests/layers.rs",
                g.files[module][0].display(),
                name(module)
            ));
        }
    }
    for (_, entries) in LAYERS {
        for entry in *entries {
            let path: ModPath = entry.split("::").map(str::to_string).collect();
            if !g.files.contains_key(&path) {
                broken.push(format!(
                    "tests/tests/layers.rs: LAYERS names `{entry}`, which is not a module of agent/src \
                     or agent/core/src"
                ));
            }
        }
    }
    for (from, to, at) in &g.edges {
        let (Some((low, low_name, _)), Some((high, high_name, _))) = (layer_of(from), layer_of(to))
        else {
            continue;
        };
        if high > low {
            broken.push(format!(
                "{at}: `{}` (layer {low}, {low_name}) imports `{}` (layer {high}, {high_name}), \
                 a higher layer",
                name(from),
                name(to)
            ));
        }
    }
    broken.sort();
    broken.dedup();
    assert!(
        broken.is_empty(),
        "{} import(s) against the layers of agent/src (move the item down to the layer that \
         uses it, or the module to its layer in LAYERS):\n{}\n",
        broken.len(),
        broken.join("\n")
    );
}

/// The crates `manifest` depends on, from every dependency table (`[dependencies]`,
/// `[dev-dependencies]`, `[target.'…'.dependencies]`, `[dependencies.name]`), as
/// `(line, crate)`: the key, or the crate a `package = "…"` renames. A line parser, enough for
/// the manifest's plain `name = …` and `name.workspace = true` entries.
fn manifest_dependencies(manifest: &str) -> Vec<(usize, String)> {
    /// Where a line is: outside any dependency table, in one (`[dependencies]`), or in the
    /// table of one dependency (`[dependencies.name]`).
    #[derive(PartialEq)]
    enum Table {
        Other,
        Dependencies,
        One,
    }
    let mut found = Vec::new();
    let mut table = Table::Other;
    for (n, line) in manifest.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_end_matches(']').trim();
            table = match header.rsplit_once("dependencies.") {
                Some((_, name)) => {
                    let name = name.trim_matches(|c| c == '"' || c == '\'');
                    found.push((n + 1, name.to_string()));
                    Table::One
                }
                None if header.ends_with("dependencies") => Table::Dependencies,
                None => Table::Other,
            };
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if table == Table::Other {
            continue;
        }
        // A renamed dependency: `sqs = { package = "aws-sdk-sqs" }` or `package = "…"`.
        let renamed = if key == "package" {
            value.split('"').nth(1)
        } else {
            value
                .split_once("package")
                .and_then(|(_, rest)| rest.split('"').nth(1))
        };
        if let Some(package) = renamed {
            found.push((n + 1, package.to_string()));
        }
        if table == Table::Dependencies {
            let name = key.split('.').next().unwrap_or("").trim_matches('"');
            found.push((n + 1, name.to_string()));
        }
    }
    found
}

#[test]
fn the_core_crate_depends_on_no_aws_crate() {
    let manifest = repo().join("agent/core/Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", manifest.display()));
    let deps = manifest_dependencies(&text);
    let names: BTreeSet<&str> = deps.iter().map(|(_, d)| d.as_str()).collect();
    // The parser does read the manifest: the core's own dependencies are there.
    for expected in ["tokio", "nix", "serde_json"] {
        assert!(
            names.contains(expected),
            "found no `{expected}` among {names:?} in agent/core/Cargo.toml; is the parser broken?"
        );
    }
    let aws: Vec<String> = deps
        .iter()
        .filter(|(_, d)| d.starts_with("aws-") || d.starts_with("aws_") || d == "rsql-agent")
        .map(|(line, d)| format!("agent/core/Cargo.toml:{line}: `{d}`"))
        .collect();
    assert!(
        aws.is_empty(),
        "the core crate must not depend on an AWS crate (nor on the agent, which does): \
         rsql-job-owner is built from it alone. Move the code that needs AWS to the agent:\n{}\n",
        aws.join("\n")
    );
}

#[test]
fn the_manifest_parser_finds_every_kind_of_dependency() {
    let manifest = r#"
[package]
name = "x"
description = "aws-sdk-sqs in a description is no dependency"

[dependencies]
tokio.workspace = true
serde = { version = "1" }
sqs = { package = "aws-sdk-sqs", version = "1" }

[dev-dependencies]
aws-config = "1" # a comment

[target.'cfg(unix)'.dependencies]
libc = "0.2"

[dependencies.aws-sdk-sfn]
version = "1"

[dependencies.sm]
package = "aws-sdk-secretsmanager"

[lints]
workspace = true
"#;
    let found: Vec<String> = manifest_dependencies(manifest)
        .into_iter()
        .map(|(line, d)| format!("{line}:{d}"))
        .collect();
    assert_eq!(
        found,
        [
            "7:tokio",
            "8:serde",
            "9:aws-sdk-sqs",
            "9:sqs",
            "12:aws-config",
            "15:libc",
            "17:aws-sdk-sfn",
            "20:sm",
            "21:aws-sdk-secretsmanager"
        ]
    );
}
