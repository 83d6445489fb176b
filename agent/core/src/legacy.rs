//! Compatibility with scripts written for the SSM-based orchestration framework rsql-agent
//! replaces: the two leading script arguments that framework's trigger gave every script, and
//! the line-ending check that tells a user why a CRLF script cannot run.
//!
//! The old trigger ran every script as `sh +x SCRIPT INSTANCE_CODE_DIR SECRET_ID [ARGS...]`,
//! and every old script begins with `source $1/get_redshift_creds.sh $2`. A job gets those two
//! arguments when its message carries `legacy_args` (the 11-argument `rsql-wrapper` form
//! sets them from the old call) or when `[jobs.legacy]` applies to its workflow.
//!
//! Owns: [`LegacySettings`] (the validated `[jobs.legacy]`, which `job::script_args` turns
//! into the argv a job's script gets), and CRLF detection ([`first_crlf_line`],
//! [`CRLF_HELP`]), which both the job validation and `rsql-agent scripts check` use.
//!
//! Must not touch: processes, AWS, or the credentials themselves: the drop-in
//! `get_redshift_creds.sh` (packaging/legacy/) reads what the agent already put in the job's
//! environment.

use std::path::{Path, PathBuf};

/// Where the packages install the drop-in `get_redshift_creds.sh`; the default
/// `[jobs.legacy] instance_code_dir`.
pub const DROP_IN_DIR: &str = "/usr/libexec/rsql-agent/legacy";

/// How the agent and the linter explain a CRLF script.
pub const CRLF_HELP: &str = "the script has Windows (CRLF) line endings: the shell reads each \
`\\r` as part of a command, so it fails with errors such as `exit 127\\r: numeric argument \
required`; convert it with `sed -i 's/\\r$//' FILE` (or dos2unix) and keep it LF in git \
(`* text eol=lf` in .gitattributes)";

/// The validated `[jobs.legacy]`: the two leading arguments legacy scripts get when their
/// job did not bring its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacySettings {
    /// `$1`: where the scripts find `get_redshift_creds.sh`.
    pub instance_code_dir: PathBuf,
    /// `$2`: the secret id (`[database] secret_id` when not given); `None`: an empty argument.
    pub secret_id: Option<String>,
    /// The workflows whose jobs get the arguments; `None`: every workflow.
    pub workflows: Option<Vec<String>>,
}

impl LegacySettings {
    /// Whether jobs of `workflow_id` get the legacy arguments.
    pub fn applies_to(&self, workflow_id: &str) -> bool {
        self.workflows
            .as_ref()
            .is_none_or(|list| list.iter().any(|w| w == workflow_id))
    }
}

/// The file every legacy script sources from its `$1`.
pub const CREDS_SCRIPT: &str = "get_redshift_creds.sh";

/// Whether code may be sourced from `dir` (a legacy `instance_code_dir`): the directory, every
/// directory above it, and its `get_redshift_creds.sh` when present, changeable by root or
/// the agent's user only (the rule of [`crate::trust`]).
pub fn check_code_dir(dir: &Path) -> Result<(), crate::trust::Untrusted> {
    let trusted = crate::trust::trusted_uids();
    crate::trust::check(dir, &trusted)?;
    let creds = dir.join(CREDS_SCRIPT);
    if creds.exists() {
        crate::trust::check(&creds, &trusted)?;
    }
    Ok(())
}

/// The 1-based number of the first line that ends in CRLF, if any.
pub fn first_crlf_line(text: &[u8]) -> Option<usize> {
    let at = text.windows(2).position(|w| w == b"\r\n")?;
    Some(text[..at].iter().filter(|&&b| b == b'\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_is_found_on_its_line() {
        assert_eq!(first_crlf_line(b"#!/bin/bash\necho ok\n"), None);
        assert_eq!(first_crlf_line(b"#!/bin/bash\r\necho ok\r\n"), Some(1));
        assert_eq!(first_crlf_line(b"a\nb\nc\r\n"), Some(3));
        // A lone CR inside a line (a literal in SQL, say) is not a line ending.
        assert_eq!(first_crlf_line(b"echo 'a\rb'\n"), None);
    }

    #[test]
    fn workflows_limit_where_the_arguments_apply() {
        let mut legacy = LegacySettings {
            instance_code_dir: PathBuf::from(DROP_IN_DIR),
            secret_id: None,
            workflows: None,
        };
        assert!(legacy.applies_to("anything"));
        legacy.workflows = Some(vec!["blog_test_workflow".into()]);
        assert!(legacy.applies_to("blog_test_workflow"));
        assert!(!legacy.applies_to("new_style"));
    }
}
