//! `rsql-agent scripts check DIR`: the migration linter. It reads a folder of job scripts
//! (written for the replaced SSM framework, or converted from BTEQ) and says, one finding a
//! line, what would make a job fail under the agent and how to fix it.
//!
//! Owns: the checks and their wording. Errors (the job would fail, or be reported as
//! something it is not):
//! - CRLF line endings (the agent refuses such a job as `Rsql.InvalidJob`, with the same text);
//! - a script that is not executable and whose shebang names an interpreter other than
//!   `[jobs] interpreter`, or that is not text at all;
//! - an executable script whose shebang interpreter is missing;
//! - `source $1/...` or `$2` on a sourced line, which needs the legacy arguments, when
//!   `[jobs.legacy]` is not configured (or its `instance_code_dir` lacks the sourced file);
//! - `\exit N` with a code the agent or the shell gives a meaning of its own.
//!
//! Warnings: `rsql` backslash commands the local `rsql` stand-in does not know (real RSQL may).
//!
//! Must not touch: anything but reading the folder. It runs nothing and needs no AWS.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::legacy::{first_crlf_line, LegacySettings, CRLF_HELP};

/// The backslash commands the `rsql` stand-in runs (tests/src/bin/rsql).
pub const STAND_IN_COMMANDS: &[&str] = &[
    "if", "elseif", "elif", "else", "endif", "label", "goto", "exit", "quit", "q", "echo",
    "remark", "qecho", "warn", "set", "unset", "timing",
];

/// The largest script read; the rest of a longer one is not checked.
const MAX_SCRIPT_BYTES: u64 = 4 << 20;

/// What the checks need from the agent's config.
#[derive(Debug, Clone)]
pub struct CheckSettings {
    /// `[jobs] interpreter`.
    pub interpreter: PathBuf,
    /// `[jobs.legacy]`, when configured.
    pub legacy: Option<LegacySettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding: where, what, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub file: PathBuf,
    /// 1-based; `None` for the file as a whole.
    pub line: Option<usize>,
    pub severity: Severity,
    pub what: String,
    pub fix: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": {severity}: {}; fix: {}", self.what, self.fix)
    }
}

/// What a check of a folder found.
#[derive(Debug, Default)]
pub struct Report {
    pub scripts: usize,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks every script under `dir` (recursively; hidden entries skipped). A script is a
/// file named `*.sh`, an executable file, or a file that starts with `#!`.
pub fn check_dir(dir: &Path, settings: &CheckSettings) -> Result<Report, CheckError> {
    let mut found = Found::default();
    collect(dir, &mut found)?;
    let mut files = found.real_files();
    files.sort();
    let mut report = Report::default();
    for path in files {
        let meta = std::fs::metadata(&path).map_err(|source| CheckError::Read {
            path: path.clone(),
            source,
        })?;
        let text = read_head(&path)?;
        let executable = meta.permissions().mode() & 0o111 != 0;
        let is_script =
            path.extension().is_some_and(|e| e == "sh") || executable || text.starts_with(b"#!");
        if !is_script {
            continue;
        }
        report.scripts += 1;
        let shown = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
        check_script(&shown, &text, executable, settings, &mut report.findings);
    }
    Ok(report)
}

/// What [`collect`] found: each directory and file by its identity (device and inode), so
/// that a symlink loop (`ln -s . loop`) or a second name for a file is walked once.
#[derive(Default)]
struct Found {
    dirs: std::collections::HashSet<(u64, u64)>,
    /// Every path found to a regular file, with the file's identity.
    files: Vec<(PathBuf, (u64, u64))>,
}

impl Found {
    /// One path per real file: the shortest (then the first in order), so a script is shown
    /// by its own name rather than through a symlink to a directory above it.
    fn real_files(mut self) -> Vec<PathBuf> {
        self.files.sort_by(|(a, _), (b, _)| {
            (a.components().count(), a).cmp(&(b.components().count(), b))
        });
        let mut seen = std::collections::HashSet::new();
        self.files
            .into_iter()
            .filter(|(_, id)| seen.insert(*id))
            .map(|(path, _)| path)
            .collect()
    }
}

fn collect(dir: &Path, found: &mut Found) -> Result<(), CheckError> {
    use std::os::unix::fs::MetadataExt;
    let read = |source| CheckError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(dir).map_err(read)?;
    if !found.dirs.insert((meta.dev(), meta.ino())) {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(read)?;
    for entry in entries {
        let entry = entry.map_err(read)?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks, as the agent does when it resolves a job's script.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => collect(&path, found)?,
            Ok(meta) if meta.is_file() => found.files.push((path, (meta.dev(), meta.ino()))),
            _ => {}
        }
    }
    Ok(())
}

fn read_head(path: &Path) -> Result<Vec<u8>, CheckError> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SCRIPT_BYTES).read_to_end(&mut text))
        .map_err(|source| CheckError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(text)
}

/// All checks of one script; `file` is the name findings show.
pub fn check_script(
    file: &Path,
    text: &[u8],
    executable: bool,
    settings: &CheckSettings,
    findings: &mut Vec<Finding>,
) {
    let mut found = |line: Option<usize>, severity: Severity, what: String, fix: String| {
        findings.push(Finding {
            file: file.to_path_buf(),
            line,
            severity,
            what,
            fix,
        })
    };
    if let Some(line) = first_crlf_line(text) {
        let (what, fix) = CRLF_HELP
            .split_once("; convert")
            .map(|(what, fix)| (what.to_string(), format!("convert{fix}")))
            .unwrap_or((CRLF_HELP.to_string(), String::new()));
        found(
            Some(line),
            Severity::Error,
            format!("CRLF line ending: {what}"),
            fix,
        );
    }
    let head_len = text.len().min(512);
    if text[..head_len].contains(&0) {
        found(
            None,
            Severity::Error,
            "not a text script (it holds NUL bytes)".to_string(),
            "give the job a shell script that runs the program".to_string(),
        );
        return;
    }
    let text = String::from_utf8_lossy(text);
    let shebang = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("#!"))
        .map(|l| l.trim_end_matches('\r').trim().to_string());
    check_interpreter(shebang.as_deref(), executable, settings, &mut found);
    check_lines(&text, settings, &mut found);
}

fn check_interpreter(
    shebang: Option<&str>,
    executable: bool,
    settings: &CheckSettings,
    found: &mut impl FnMut(Option<usize>, Severity, String, String),
) {
    let configured = &settings.interpreter;
    let Some(shebang) = shebang else {
        if !executable && !is_executable_file(configured) {
            found(
                None,
                Severity::Error,
                format!(
                    "not executable, and [jobs] interpreter {} is missing",
                    configured.display()
                ),
                "install the interpreter, or set [jobs] interpreter to one that exists".to_string(),
            );
        }
        return;
    };
    let mut words = shebang.split_whitespace();
    let program = words.next().unwrap_or_default();
    // `#!/usr/bin/env bash`: the program is found on PATH.
    let (program, wanted) = if Path::new(program).file_name().is_some_and(|n| n == "env") {
        let name = words.find(|w| !w.starts_with('-')).unwrap_or_default();
        (find_on_path(name), name.to_string())
    } else {
        let path = PathBuf::from(program);
        (
            Some(path).filter(|p| is_executable_file(p)),
            program.to_string(),
        )
    };
    if executable {
        if program.is_none() {
            found(
                Some(1),
                Severity::Error,
                format!("the shebang's interpreter {wanted} is missing on this host"),
                "install it, or change the shebang (e.g. #!/bin/bash)".to_string(),
            );
        }
        return;
    }
    let name = |p: &str| {
        Path::new(p)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let wanted_name = name(&wanted);
    let configured_name = name(&configured.to_string_lossy());
    let compatible = wanted_name == configured_name
        || (wanted_name == "sh" && matches!(configured_name.as_str(), "bash" | "dash" | "sh"));
    if !compatible {
        found(
            None,
            Severity::Error,
            format!(
                "not executable, so the agent runs it with [jobs] interpreter {}, but its \
                 shebang asks for {wanted}",
                configured.display()
            ),
            "chmod +x the script so that its shebang decides".to_string(),
        );
    }
}

fn check_lines(
    text: &str,
    settings: &CheckSettings,
    found: &mut impl FnMut(Option<usize>, Severity, String, String),
) {
    // The delimiter of the rsql heredoc being read, if any.
    let mut heredoc: Option<(String, bool)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim_end_matches('\r');
        if let Some((delimiter, tabs)) = &heredoc {
            let end = if *tabs { line.trim_start() } else { line };
            if end == delimiter {
                heredoc = None;
                continue;
            }
            check_rsql_line(line.trim(), line_no, found);
            continue;
        }
        let code = line.trim();
        if code.starts_with('#') {
            continue;
        }
        if let Some(sourced) = sources_legacy_argument(code) {
            legacy_source(sourced, line_no, settings, found);
        }
        if code.contains("rsql") {
            heredoc = heredoc_delimiter(code);
        }
    }
}

/// For `source $1/x.sh $2` (or `. ...`): the sourced path's text, when the line uses `$1` or
/// `$2`.
fn sources_legacy_argument(code: &str) -> Option<&str> {
    let rest = code
        .strip_prefix("source ")
        .or_else(|| code.strip_prefix(". "))?
        .trim();
    let uses = ["$1", "${1}", "$2", "${2}", "\"$1", "\"${1}"]
        .iter()
        .any(|a| rest.contains(a));
    uses.then(|| rest.split_whitespace().next().unwrap_or_default())
}

fn legacy_source(
    sourced: &str,
    line_no: usize,
    settings: &CheckSettings,
    found: &mut impl FnMut(Option<usize>, Severity, String, String),
) {
    let Some(legacy) = &settings.legacy else {
        found(
            Some(line_no),
            Severity::Error,
            format!(
                "sources {sourced} from the legacy arguments ($1 instance code dir, $2 secret \
                 id), and no [jobs.legacy] is configured: $1 and $2 are empty"
            ),
            "add [jobs.legacy] to the agent config (instance_code_dir = \
             \"/usr/libexec/rsql-agent/legacy\" for the drop-in get_redshift_creds.sh), or \
             call the job through the 11-argument rsql_trigger.sh form"
                .to_string(),
        );
        return;
    };
    let file = sourced
        .trim_matches('"')
        .trim_start_matches("${1}")
        .trim_start_matches("$1")
        .trim_start_matches('/');
    if file.is_empty() || file.contains('$') {
        return;
    }
    let path = legacy.instance_code_dir.join(file);
    if !path.is_file() {
        found(
            Some(line_no),
            Severity::Error,
            format!(
                "sources {sourced}, but [jobs.legacy] instance_code_dir has no {}",
                path.display()
            ),
            "point instance_code_dir at the folder that holds it (the packages install \
             get_redshift_creds.sh in /usr/libexec/rsql-agent/legacy)"
                .to_string(),
        );
    }
}

/// `rsql ... << EOF`, `<<'EOF'`, `<<-EOF`: the delimiter, and whether tabs may precede it.
fn heredoc_delimiter(code: &str) -> Option<(String, bool)> {
    let at = code.find("<<")?;
    let rest = &code[at + 2..];
    if rest.starts_with('<') {
        return None; // a here-string
    }
    let (rest, tabs) = match rest.strip_prefix('-') {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let word: String = rest
        .trim_start()
        .chars()
        .take_while(|c| !c.is_whitespace() && !matches!(c, ';' | '|' | '&' | ')'))
        .filter(|c| !matches!(c, '\'' | '"' | '\\'))
        .collect();
    (!word.is_empty()).then_some((word, tabs))
}

fn check_rsql_line(
    line: &str,
    line_no: usize,
    found: &mut impl FnMut(Option<usize>, Severity, String, String),
) {
    let Some(command) = line.strip_prefix('\\') else {
        return;
    };
    let name: String = command
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect::<String>()
        .to_ascii_lowercase();
    if name.is_empty() {
        return;
    }
    if !STAND_IN_COMMANDS.contains(&name.as_str()) {
        found(
            Some(line_no),
            Severity::Warning,
            format!("\\{name} is not a command the local rsql stand-in knows (it reports an error and goes on)"),
            format!(
                "fine on Redshift RSQL if it knows it; to test locally, use one of \\{}",
                STAND_IN_COMMANDS.join(" \\")
            ),
        );
        return;
    }
    if matches!(name.as_str(), "exit" | "quit" | "q") {
        let arg = command[name.len()..].split_whitespace().next();
        if let Some(code) = arg.and_then(|a| a.parse::<i64>().ok()) {
            if let Some(meaning) = reserved_exit(code) {
                found(
                    Some(line_no),
                    Severity::Error,
                    format!("\\{name} {code} collides with {meaning}"),
                    "use a code from 4 to 125 (the samples use 11 and up, one per script)"
                        .to_string(),
                );
            }
        }
    }
}

/// What an exit code already means, when it means something to the shell or the agent.
pub fn reserved_exit(code: i64) -> Option<&'static str> {
    match code {
        126 => Some("the shell's \"found but cannot run\""),
        127 => Some("the shell's \"command not found\""),
        137 => Some("a command killed by SIGKILL, which the agent reports as Rsql.Killed"),
        128..=255 => Some("the shell's \"killed by signal (code - 128)\""),
        _ if !(0..=255).contains(&code) => {
            Some("nothing: exit codes are taken modulo 256 (256 is success)")
        }
        _ => None,
    }
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    if name.is_empty() {
        return None;
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| crate::supervisor::DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable_file(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, executable: bool, legacy: Option<LegacySettings>) -> Vec<Finding> {
        let mut findings = Vec::new();
        let settings = CheckSettings {
            interpreter: PathBuf::from("/bin/bash"),
            legacy,
        };
        check_script(
            Path::new("job.sh"),
            text.as_bytes(),
            executable,
            &settings,
            &mut findings,
        );
        findings
    }

    /// `ln -s . loop` once reported each script 41 times, and two loops (`a -> .`,
    /// `b -> .`) never ended.
    #[test]
    fn symlink_loops_and_second_names_are_walked_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("job.sh"), "#!/bin/bash\necho one\n").expect("write");
        std::fs::write(root.join("sub/other.sh"), "#!/bin/bash\necho two\n").expect("write");
        for (name, target) in [("loop", "."), ("a", "."), ("b", "."), ("sub/up", "..")] {
            std::os::unix::fs::symlink(target, root.join(name)).expect("symlink");
        }
        std::os::unix::fs::symlink("job.sh", root.join("alias.sh")).expect("symlink");
        let settings = CheckSettings {
            interpreter: PathBuf::from("/bin/bash"),
            legacy: None,
        };
        let (done, report) = std::sync::mpsc::channel();
        let walked = root.to_path_buf();
        std::thread::spawn(move || {
            let _ = done.send(check_dir(&walked, &settings).map(|r| r.scripts));
        });
        let scripts = report
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("scripts check must end on symlink loops")
            .expect("check_dir");
        assert_eq!(scripts, 2, "each real script once");
    }

    #[test]
    fn a_clean_script_has_no_findings() {
        let text = "#!/bin/bash\nrsql -h h <<'RSQL'\n\\remark hi\n\\if :ERROR <> 0\n\\exit 11\n\\endif\nRSQL\n";
        assert_eq!(check(text, true, None), vec![]);
    }

    #[test]
    fn each_problem_is_found_on_its_line() {
        let text = "source $1/get_redshift_creds.sh $2\nrsql -h $HOST << EOF\n\\gset\n\\exit 137\nEOF\n\\exit 137\n";
        let findings = check(text, false, None);
        let lines: Vec<_> = findings.iter().map(|f| (f.line, f.severity)).collect();
        assert_eq!(
            lines,
            vec![
                (Some(1), Severity::Error),
                (Some(3), Severity::Warning),
                (Some(4), Severity::Error)
            ],
            "{findings:#?}"
        );
        assert!(findings[0].fix.contains("[jobs.legacy]"));
        assert!(findings[2].what.contains("Rsql.Killed"));
    }

    #[test]
    fn crlf_and_shebangs() {
        let crlf = check("#!/bin/bash\r\necho hi\r\n", true, None);
        assert_eq!(crlf.len(), 1, "{crlf:#?}");
        assert_eq!(crlf[0].line, Some(1));
        assert!(crlf[0].to_string().contains("numeric argument required"));
        let missing = check("#!/opt/none/bin/ksh93\necho hi\n", true, None);
        assert!(
            missing[0].what.contains("/opt/none/bin/ksh93"),
            "{missing:#?}"
        );
        let python = check("#!/usr/bin/env python3\nprint(1)\n", false, None);
        assert!(python[0].what.contains("python3"), "{python:#?}");
        assert!(check("#!/bin/sh\necho hi\n", false, None).is_empty());
    }

    #[test]
    fn legacy_settings_silence_the_source_finding_when_the_file_is_there() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("get_redshift_creds.sh"), "true\n").unwrap();
        let legacy = |d: &Path| LegacySettings {
            instance_code_dir: d.to_path_buf(),
            secret_id: None,
            workflows: None,
        };
        let text = "source $1/get_redshift_creds.sh $2\n";
        assert!(check(text, false, Some(legacy(dir.path()))).is_empty());
        let elsewhere = check(text, false, Some(legacy(&dir.path().join("none"))));
        assert_eq!(elsewhere.len(), 1);
        assert!(elsewhere[0].what.contains("has no"), "{elsewhere:#?}");
    }

    #[test]
    fn reserved_exit_codes() {
        for code in [126, 127, 137, 130, 255, 256, -1] {
            assert!(reserved_exit(code).is_some(), "{code}");
        }
        for code in [0, 1, 11, 21, 125] {
            assert!(reserved_exit(code).is_none(), "{code}");
        }
    }
}
