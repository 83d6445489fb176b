//! The docs name only what exists. A newcomer follows a path or an item name from the README,
//! `docs/` or `packaging/aws/README.md` into the code; a name that was renamed or never
//! existed sends them nowhere.
//!
//! Checked, in every one of those files:
//! - every relative link (`[text](path#anchor)`): the file exists, and an anchor into a
//!   Markdown file names one of its headings;
//! - every repository path written in backticks (`agent/src/daemon/owned.rs`,
//!   `packaging/aws/stack.yaml`): it exists;
//! - every `module::Item` of the agent, in backticks or in a code block (`lock::JobLock`,
//!   `signals::Controls`, `supervisor::Supervisor::start`): the module path is a module of
//!   `agent/src` or of the core crate's `agent/core/src` (one module tree: the agent
//!   re-exports the core's modules at the same paths), and its first item (and a method or
//!   variant after it) is defined there.
//!
//! And the README's architecture section names every module under `agent/src` and
//! `agent/core/src`, and no module that is gone.
//!
//! And docs/configuration.md documents every config key, and only those: the keys are asked
//! of the agent's own config parser (which refuses an unknown key, listing the table's
//! keys), so a table added to the parser is picked up without touching this test. The keys
//! it and docs/operations.md say a SIGHUP applies are `reload::RELOADABLE`.
//!
//! Each test reports every broken reference at once, as `file:line: what`. File reads and
//! the config parser: no network, no binaries.

use std::collections::{BTreeSet, HashSet};
use std::path::{Component, Path, PathBuf};

/// The repository root (this crate is `tests/`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Top-level entries whose paths the docs may name. Anything else (`state_dir/outbox`,
/// `target/debian/...`, `bench/results.json`) is a path on a host or a build output.
const REPO_ROOTS: &[&str] = &[
    "agent",
    "wrapper",
    "tests",
    "packaging",
    "systemd",
    "rsql_scripts",
    "docs",
    ".ci",
    ".config",
];

/// The documents checked, relative to the repository root.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut docs = vec![PathBuf::from("README.md")];
    let mut in_docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| p.strip_prefix(root).expect("under the root").to_path_buf())
        .collect();
    in_docs.sort();
    docs.extend(in_docs);
    docs.push(PathBuf::from("packaging/aws/README.md"));
    docs
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Where a reference sits, for the report.
struct Found {
    line: usize,
    text: String,
}

/// What one Markdown file refers to.
#[derive(Default)]
struct Refs {
    /// Link targets, as written.
    links: Vec<Found>,
    /// Inline code spans.
    spans: Vec<Found>,
    /// Lines inside fenced code blocks.
    code_lines: Vec<Found>,
}

fn is_fence(line: &str) -> bool {
    line.trim_start().starts_with("```")
}

/// Splits a Markdown file into links, inline code spans and fenced code lines, each with its
/// line number. A code span may run across a line break; it counts at its first line.
fn scan(text: &str) -> Refs {
    let mut refs = Refs::default();
    let mut in_fence = false;
    let mut span: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if span.is_none() && is_fence(line) {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            refs.code_lines.push(Found {
                line: number,
                text: line.to_string(),
            });
            continue;
        }
        let mut prose = String::new();
        for c in line.chars() {
            match (&mut span, c) {
                (Some(_), '`') => {
                    let (start, body) = span.take().expect("inside a span");
                    refs.spans.push(Found {
                        line: start,
                        text: body,
                    });
                    prose.push(' ');
                }
                (Some((_, body)), c) => body.push(c),
                (None, '`') => span = Some((number, String::new())),
                (None, c) => prose.push(c),
            }
        }
        if let Some((_, body)) = &mut span {
            body.push(' ');
        }
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            refs.links.push(Found {
                line: number,
                text: after[..end].trim().to_string(),
            });
            rest = &after[end..];
        }
    }
    refs
}

/// The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every anchor of a Markdown file, repeated headings numbered as GitHub numbers them.
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut in_fence = false;
    for line in text.lines() {
        if is_fence(line) {
            in_fence = !in_fence;
            continue;
        }
        if in_fence || !line.starts_with('#') {
            continue;
        }
        let base = slug(line.trim_start_matches('#'));
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// `a/./b/../c` as `a/c`, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn check_link(root: &Path, doc: &Path, target: &str) -> Result<(), String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return Ok(());
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        doc.to_path_buf()
    } else {
        normalize(&doc.parent().unwrap_or(Path::new("")).join(path))
    };
    let full = root.join(&file);
    if !full.exists() {
        return Err(format!(
            "link `{target}`: {} does not exist",
            file.display()
        ));
    }
    if let Some(anchor) = anchor {
        if file.extension().is_some_and(|e| e == "md") && !anchors(&read(&full)).contains(anchor) {
            return Err(format!(
                "link `{target}`: {} has no heading with the anchor #{anchor}",
                file.display()
            ));
        }
    }
    Ok(())
}

/// A code span that is a path inside this repository, or `None` for anything else.
fn repo_path(span: &str) -> Option<&str> {
    let span = span.trim();
    let path = match span.rsplit_once(':') {
        Some((path, line)) if !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()) => path,
        _ => span,
    };
    let plain = path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
    let (first, _) = path.split_once('/')?;
    (plain && REPO_ROOTS.contains(&first)).then_some(path)
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The `module::Item` names in a piece of text whose first segment is a module of the agent
/// crate (`crate::` and `rsql_agent::` prefixes dropped, a trailing `()` ignored).
fn module_paths(text: &str, root: &Path) -> Vec<Vec<String>> {
    text.split(|c: char| !(is_ident(c) || c == ':'))
        .filter(|token| token.contains("::"))
        .filter_map(|token| {
            let token = token
                .trim_start_matches("crate::")
                .trim_start_matches("rsql_agent_core::")
                .trim_start_matches("rsql_agent::")
                .trim_matches(':');
            let segments: Vec<String> = token.split("::").map(str::to_string).collect();
            if segments.len() < 2 || segments.iter().any(|s| s.is_empty()) {
                return None;
            }
            module_files(root, &segments[..1])
                .is_some()
                .then_some(segments)
        })
        .collect()
}

/// Where the agent's modules live: its own crate and the core crate, one module tree (the
/// agent re-exports the core's modules at the same paths).
use rsql_agent_tests::sources::LIBRARY_ROOTS as SOURCE_ROOTS;

/// A module's source in one crate: its file and, when it has one, its directory.
type ModuleFiles = (PathBuf, Option<PathBuf>);

/// The source of a module path in each crate that has it (`joblog` is in both). `None` when
/// the path is a module of neither `agent/src` nor `agent/core/src`.
fn module_files(root: &Path, module: &[String]) -> Option<Vec<ModuleFiles>> {
    if matches!(module, [m] if m == "lib" || m == "main") {
        return None;
    }
    let last = module.last()?;
    let found: Vec<ModuleFiles> = SOURCE_ROOTS
        .iter()
        .filter_map(|source_root| {
            let mut dir = root.join(source_root);
            for part in &module[..module.len() - 1] {
                dir = dir.join(part);
            }
            let file = [
                dir.join(format!("{last}.rs")),
                dir.join(last).join("mod.rs"),
            ]
            .into_iter()
            .find(|f| f.is_file())?;
            let subdir = dir.join(last);
            Some((file, subdir.is_dir().then_some(subdir)))
        })
        .collect();
    (!found.is_empty()).then_some(found)
}

/// Every `.rs` file of a module: its own file and everything under its directory.
fn module_sources(file: &Path, dir: Option<&Path>) -> String {
    let mut text = read(file);
    let mut stack: Vec<PathBuf> = dir.map(Path::to_path_buf).into_iter().collect();
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                text.push('\n');
                text.push_str(&read(&path));
            }
        }
    }
    text
}

const ITEM_KEYWORDS: &[&str] = &[
    "fn", "struct", "enum", "trait", "const", "static", "type", "mod", "union",
];

/// Whether `source` defines `name` as an item (`pub fn name`, `struct name`, ...) or
/// re-exports it (`pub use ...name`).
fn defines_item(source: &str, name: &str) -> bool {
    source.lines().any(|line| {
        let tokens: Vec<&str> = line
            .split(|c: char| !is_ident(c))
            .filter(|t| !t.is_empty())
            .collect();
        let defined = tokens
            .windows(2)
            .any(|w| ITEM_KEYWORDS.contains(&w[0]) && w[1] == name);
        let reexported = line.trim_start().starts_with("pub use") && tokens.contains(&name);
        defined || reexported
    })
}

/// Whether `source` has `name` as a method (`fn name`) or as an enum variant or field (a line
/// that starts with it).
fn defines_member(source: &str, name: &str) -> bool {
    defines_item(source, name)
        || source.lines().any(|line| {
            let line = line.trim_start().trim_start_matches("pub ");
            line.strip_prefix(name)
                .is_some_and(|rest| rest.chars().next().is_none_or(|c| !is_ident(c)))
        })
}

/// Checks one `module::Item` path; the error says what is missing.
fn check_item(root: &Path, segments: &[String]) -> Result<(), String> {
    let written = segments.join("::");
    let mut depth = 1;
    while depth < segments.len() && module_files(root, &segments[..=depth]).is_some() {
        depth += 1;
    }
    let module = &segments[..depth];
    let found = module_files(root, module).expect("the first segment is a module");
    let rest = &segments[depth..];
    let Some(item) = rest.first() else {
        return Ok(());
    };
    let source: String = found
        .iter()
        .map(|(file, dir)| module_sources(file, dir.as_deref()))
        .collect::<Vec<_>>()
        .join("\n");
    let place = found
        .iter()
        .map(|(file, dir)| {
            format!(
                "{}{}",
                file.strip_prefix(root).unwrap_or(file).display(),
                dir.as_ref()
                    .map(|d| format!(" or {}/", d.strip_prefix(root).unwrap_or(d).display()))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(" or ");
    if !defines_item(&source, item) {
        return Err(format!(
            "`{written}`: no item `{item}` in module `{}` ({place})",
            module.join("::")
        ));
    }
    if let Some(member) = rest.get(1) {
        if !defines_member(&source, member) {
            return Err(format!(
                "`{written}`: `{item}` has no method or variant `{member}` in {place}"
            ));
        }
    }
    Ok(())
}

fn report(broken: &[String], what: &str) {
    assert!(
        broken.is_empty(),
        "{} {what}:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn every_path_link_and_item_the_docs_name_exists() {
    let root = repo();
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in documents(&root) {
        let text = read(&root.join(&doc));
        let refs = scan(&text);
        let at = |line: usize| format!("{}:{line}", doc.display());
        for link in &refs.links {
            checked += 1;
            if let Err(e) = check_link(&root, &doc, &link.text) {
                broken.push(format!("{}: {e}", at(link.line)));
            }
        }
        for span in &refs.spans {
            if let Some(path) = repo_path(&span.text) {
                checked += 1;
                if !root.join(path).exists() {
                    broken.push(format!("{}: path `{path}` does not exist", at(span.line)));
                }
            }
        }
        let code = refs.spans.iter().chain(&refs.code_lines);
        for found in code {
            for segments in module_paths(&found.text, &root) {
                checked += 1;
                if let Err(e) = check_item(&root, &segments) {
                    broken.push(format!("{}: {e}", at(found.line)));
                }
            }
        }
    }
    report(&broken, "broken references in the docs");
    // The docs do name things: a scan that found nothing would be broken itself.
    assert!(checked > 50, "only {checked} references found in the docs");
}

/// Module paths of `agent/src` and `agent/core/src`, as `a` or `a/b`: every `.rs` file but
/// the crate roots and the binaries.
fn agent_modules(root: &Path) -> BTreeSet<String> {
    rsql_agent_tests::sources::library_files(root)
        .into_iter()
        .filter(|f| !f.module.is_empty())
        .map(|f| f.module.join("/"))
        .collect()
}

#[test]
fn the_readme_architecture_names_every_module() {
    let root = repo();
    let readme = read(&root.join("README.md"));
    let start = readme
        .find("\n## Architecture")
        .expect("the README has an Architecture section");
    let section = &readme[start + 1..];
    let section = match section[3..].find("\n## ") {
        Some(end) => &section[..end + 3],
        None => section,
    };
    let words: HashSet<&str> = section
        .split(|c: char| !(is_ident(c) || c == '/'))
        .collect();
    let modules = agent_modules(&root);
    assert!(
        modules.len() > 20,
        "found only {modules:?} under agent/src and agent/core/src"
    );
    let missing: Vec<String> = modules
        .iter()
        .filter(|m| !words.contains(m.as_str()))
        .map(|m| {
            format!(
                "README.md: the Architecture section does not name the module `{m}` \
                 (agent/src/{m}.rs or agent/core/src/{m}.rs); add it, as `{m}`, with what it \
                 owns"
            )
        })
        .collect();
    // The other way round: a module path written there (`report/retry`) that is gone.
    let top: HashSet<&str> = modules
        .iter()
        .filter(|m| !m.contains('/'))
        .map(String::as_str)
        .collect();
    let mut stale: Vec<String> = words
        .iter()
        .filter(|w| {
            w.split_once('/')
                .is_some_and(|(first, rest)| top.contains(first) && !rest.is_empty())
        })
        .filter(|w| !modules.contains(**w))
        .map(|w| {
            format!(
                "README.md: the Architecture section names `{w}`, which is not a module under \
                 agent/src or agent/core/src (moved or renamed?)"
            )
        })
        .collect();
    stale.sort();
    let mut broken = missing;
    broken.extend(stale);
    report(
        &broken,
        "differences between the agent's modules and the README's architecture",
    );
}

/// A key no table of the config has; the parser's refusal of it lists the table's keys.
const PROBE_KEY: &str = "no_such_key_the_docs_test_probes";

/// The keys of the config table at `table` (`""`: the top level, `jobs.legacy`), asked of
/// the agent's own parser: an unknown key is an error that lists every key the table takes
/// (serde's "unknown field `x`, expected one of `a`, `b`"). `None` when `table` is no table
/// that refuses unknown keys (a plain value).
fn config_table_keys(table: &str) -> Option<Vec<String>> {
    let text = if table.is_empty() {
        format!("{PROBE_KEY} = 1\n")
    } else {
        format!("[{table}]\n{PROBE_KEY} = 1\n")
    };
    let error = rsql_agent::config::Config::parse(&text, Path::new("/probe/agent.toml"))
        .err()?
        .to_string();
    let refused = format!("unknown field `{PROBE_KEY}`, expected ");
    let listed = &error[error.find(&refused)? + refused.len()..];
    let listed = listed.lines().next().unwrap_or("");
    // "one of `a`, `b`", "`a` or `b`", "`a`", or "there are no fields".
    Some(
        listed
            .split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect(),
    )
}

/// Every key the agent's config parser accepts, as `table.key` (`jobs.legacy.workflows`):
/// the tables' keys, found from the top level down.
fn config_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut tables = vec![String::new()];
    while let Some(table) = tables.pop() {
        let fields = config_table_keys(&table).unwrap_or_else(|| {
            panic!("the config parser does not refuse an unknown key in [{table}]")
        });
        for field in fields {
            let path = if table.is_empty() {
                field
            } else {
                format!("{table}.{field}")
            };
            if config_table_keys(&path).is_some() {
                tables.push(path);
            } else {
                keys.insert(path);
            }
        }
    }
    keys
}

/// The rows of the "Every key" table of docs/configuration.md: the keys of each row's first
/// column, its last column (what SIGHUP does), and its line.
fn documented_key_rows(text: &str) -> Vec<(Vec<String>, String, usize)> {
    let mut rows = Vec::new();
    let mut inside = false;
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("## ") {
            inside = line == "## Every key";
            continue;
        }
        if !inside || !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let keys = cells[0].split('`').skip(1).step_by(2).map(String::from);
        let on_sighup = cells.last().copied().unwrap_or("").to_string();
        rows.push((keys.collect(), on_sighup, n + 1));
    }
    rows
}

#[test]
fn every_config_key_is_documented_and_every_documented_key_exists() {
    let root = repo();
    let doc = "docs/configuration.md";
    let rows = documented_key_rows(&read(&root.join(doc)));
    let code = config_keys();
    assert!(code.len() > 30, "the parser gave only {code:?}");
    let mut broken = Vec::new();
    let mut documented = BTreeSet::new();
    for (keys, _, line) in &rows {
        for key in keys {
            documented.insert(key.clone());
            if !code.contains(key) {
                broken.push(format!(
                    "{doc}:{line}: documents `{key}`, which the config parser does not accept \
                     (renamed or gone? or its table does not refuse unknown keys)"
                ));
            }
        }
    }
    for key in code.difference(&documented) {
        broken.push(format!(
            "{doc}: the config parser accepts `{key}`, which the table under \"Every key\" \
             does not document; add a row"
        ));
    }
    report(
        &broken,
        "differences between the config keys and docs/configuration.md",
    );
}

#[test]
fn the_docs_name_exactly_the_keys_a_reload_applies() {
    let root = repo();
    let reloadable: BTreeSet<String> = rsql_agent::reload::RELOADABLE
        .iter()
        .map(|k| k.to_string())
        .collect();
    let mut broken = Vec::new();
    // docs/configuration.md: the rows whose "on SIGHUP" says "applies".
    let doc = "docs/configuration.md";
    let mut rows = BTreeSet::new();
    for (keys, on_sighup, line) in documented_key_rows(&read(&root.join(doc))) {
        for key in keys {
            let says = on_sighup.starts_with("applies");
            if says != reloadable.contains(&key) {
                broken.push(format!(
                    "{doc}:{line}: `{key}` says \"{on_sighup}\" on SIGHUP, but a reload {} it \
                     (reload::RELOADABLE)",
                    if says { "does not apply" } else { "applies" }
                ));
            }
            rows.insert(key);
        }
    }
    for key in reloadable.difference(&rows) {
        broken.push(format!("{doc}: a reload applies `{key}`, which has no row"));
    }
    // docs/operations.md: the SIGHUP row of the signals table. A bare name (`kill_grace`)
    // belongs to the table of the dotted key before it (`jobs.default_timeout`).
    let doc = "docs/operations.md";
    let text = read(&root.join(doc));
    let (n, row) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.starts_with("| SIGHUP |"))
        .expect("docs/operations.md has a SIGHUP row in its signals table");
    let mut table = String::new();
    let mut named = BTreeSet::new();
    for span in row.split('`').skip(1).step_by(2) {
        let key = match span.rsplit_once('.') {
            Some((t, _)) => {
                table = t.to_string();
                span.to_string()
            }
            None => format!("{table}.{span}"),
        };
        named.insert(key);
    }
    for key in named.symmetric_difference(&reloadable) {
        let what = if named.contains(key) {
            "names as applied by a reload, but reload::RELOADABLE does not have it"
        } else {
            "does not name as applied by a reload, but reload::RELOADABLE has it"
        };
        broken.push(format!("{doc}:{}: the SIGHUP row {what}: `{key}`", n + 1));
    }
    report(
        &broken,
        "differences between the docs and the keys a reload applies",
    );
}
