//! Whether a file or directory can be trusted not to be changed by another local user: the
//! rule sshd's `StrictModes` applies to `~/.ssh` (OpenSSH's `secure_path`), applied to the
//! job scripts, their interpreter, the socket's directory and the state directory.
//!
//! Owns: the rule, and the message that names the offending path and its fix. The rule, for
//! a path and every directory above it up to `/` (each checked both as written and after
//! symlinks are resolved):
//! - it must be owned by root or by a trusted uid (the agent's own user);
//! - it must not be writable by group or others. Group-writable is allowed only when the
//!   group is root's (gid 0), whose members could rewrite the agent anyway;
//! - the one exception is an ancestor directory (never the checked path itself) that is
//!   world-writable *with the sticky bit* and owned by root, like `/tmp`: there nobody can
//!   rename or remove an entry they do not own, so it is safe as long as the entry below it
//!   passes the same rule (owned by root or the agent's user, not group/world-writable);
//! - a symlink on the way is safe only if its owner is trusted (in a sticky directory its
//!   owner can replace it).
//!
//! Must not touch: anything but metadata. It never changes a mode; the operator does, and the
//! message says how.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Why a path cannot be trusted: names the path, what is wrong and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}; {fix}")]
pub struct Untrusted {
    pub path: PathBuf,
    pub problem: String,
    pub fix: String,
}

/// The uids trusted to own files the agent runs or listens through: root and the agent's
/// own user.
pub fn trusted_uids() -> Vec<u32> {
    let own = nix::unistd::geteuid().as_raw();
    if own == 0 {
        vec![0]
    } else {
        vec![0, own]
    }
}

/// The uids trusted to be the agent: root, this process's user, and the agent's service
/// user (`$RSQL_AGENT_USER`, a name or a uid, else `rsql` when that user exists), as
/// `rsql-wrapper submit` trusts them. For what the daemon owns and serves: the state
/// directory (a root operator's `drain` reads the config too) and the control socket's
/// listener.
pub fn agent_uids() -> Vec<u32> {
    let mut uids = vec![0, nix::unistd::geteuid().as_raw()];
    let name = std::env::var("RSQL_AGENT_USER")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "rsql".to_string());
    let uid = name.parse::<u32>().ok().or_else(|| {
        nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    });
    uids.extend(uid);
    uids.sort_unstable();
    uids.dedup();
    uids
}

/// Checks `path` and every directory above it (see the module doc for the rule).
pub fn check(path: &Path, trusted: &[u32]) -> Result<(), Untrusted> {
    if !path.is_absolute() {
        return Err(Untrusted {
            path: path.to_path_buf(),
            problem: "is not an absolute path".into(),
            fix: "give an absolute path".into(),
        });
    }
    // As written: every component, symlinks included (their owner matters).
    let mut prefix = PathBuf::new();
    let mut lexical = Vec::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                prefix.pop();
            }
            Component::CurDir => {}
            other => prefix.push(other),
        }
        lexical.push(prefix.clone());
    }
    let last = lexical.len().saturating_sub(1);
    for (index, step) in lexical.iter().enumerate() {
        let meta = std::fs::symlink_metadata(step).map_err(|e| Untrusted {
            path: step.clone(),
            problem: format!("cannot be examined: {e}"),
            fix: "make sure it exists".into(),
        })?;
        if meta.file_type().is_symlink() {
            if !trusted.contains(&meta.uid()) {
                return Err(owner_problem(step, meta.uid(), trusted));
            }
            continue;
        }
        check_one(step, &meta, index == last, trusted)?;
    }
    // Resolved: the directories actually used.
    let resolved = path.canonicalize().map_err(|e| Untrusted {
        path: path.to_path_buf(),
        problem: format!("cannot be resolved: {e}"),
        fix: "make sure it exists".into(),
    })?;
    let mut current = Some(resolved.as_path());
    let mut is_target = true;
    while let Some(step) = current {
        let meta = std::fs::metadata(step).map_err(|e| Untrusted {
            path: step.to_path_buf(),
            problem: format!("cannot be examined: {e}"),
            fix: "make sure it exists".into(),
        })?;
        check_one(step, &meta, is_target, trusted)?;
        is_target = false;
        current = step.parent();
    }
    Ok(())
}

/// Checks `dir` and everything below it (directories and files), and every directory above
/// it; stops at the first problem. Symlinks inside are followed by [`check`] when a job uses
/// them, so here only their own owner is checked.
pub fn check_tree(dir: &Path, trusted: &[u32]) -> Result<(), Untrusted> {
    check(dir, trusted)?;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = std::fs::read_dir(&current).map_err(|e| Untrusted {
            path: current.clone(),
            problem: format!("cannot be listed: {e}"),
            fix: "make it readable by the agent".into(),
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                if !trusted.contains(&meta.uid()) {
                    return Err(owner_problem(&path, meta.uid(), trusted));
                }
                continue;
            }
            check_one(&path, &meta, true, trusted)?;
            if meta.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(())
}

fn check_one(
    path: &Path,
    meta: &std::fs::Metadata,
    is_target: bool,
    trusted: &[u32],
) -> Result<(), Untrusted> {
    let mode = meta.mode() & 0o7777;
    let sticky_root_dir = meta.is_dir() && mode & 0o1000 != 0 && meta.uid() == 0;
    if mode & 0o002 != 0 && (is_target || !sticky_root_dir) {
        return Err(Untrusted {
            path: path.to_path_buf(),
            problem: format!("is writable by every user (mode {mode:o})"),
            fix: format!("run `chmod o-w {}`", path.display()),
        });
    }
    if !trusted.contains(&meta.uid()) {
        return Err(owner_problem(path, meta.uid(), trusted));
    }
    if mode & 0o020 != 0 && meta.gid() != 0 {
        return Err(Untrusted {
            path: path.to_path_buf(),
            problem: format!(
                "is writable by group {} (mode {mode:o}), whose members are not all trusted",
                meta.gid()
            ),
            fix: format!("run `chmod g-w {}`", path.display()),
        });
    }
    // With a POSIX ACL the group bits are the ACL's mask: `g+w` then means that users and
    // groups named in the ACL may write, whoever owns the group.
    if mode & 0o020 != 0 && has_access_acl(path) {
        return Err(Untrusted {
            path: path.to_path_buf(),
            problem: format!(
                "has a POSIX ACL whose mask allows writing (mode {mode:o}): the users and \
                 groups it names could change it"
            ),
            fix: format!("run `setfacl -b {}`", path.display()),
        });
    }
    Ok(())
}

/// Whether `path` itself (not a symlink's target) carries a POSIX access ACL.
fn has_access_acl(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: both pointers are valid NUL-terminated strings for the call's duration; a null
    // buffer with size 0 only asks for the attribute's size, so nothing is written.
    let size = unsafe {
        libc::lgetxattr(
            c_path.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    size > 0
}

fn owner_problem(path: &Path, uid: u32, trusted: &[u32]) -> Untrusted {
    Untrusted {
        path: path.to_path_buf(),
        problem: format!(
            "is owned by uid {uid}, who could change it (trusted owners: uid {})",
            trusted
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", uid ")
        ),
        fix: format!("run `chown root {}`", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_private_tree_under_a_sticky_tmp_is_trusted_and_open_modes_are_named() {
        let own = trusted_uids();
        let dir = tempfile::tempdir().unwrap();
        let scripts = dir.path().join("scripts");
        std::fs::create_dir(&scripts).unwrap();
        chmod(&scripts, 0o755);
        let script = scripts.join("job.sh");
        std::fs::write(&script, "#!/bin/bash\n").unwrap();
        chmod(&script, 0o755);
        check_tree(&scripts, &own).unwrap();
        check(&script, &own).unwrap();

        chmod(&script, 0o777);
        let err = check_tree(&scripts, &own).unwrap_err();
        assert_eq!(err.path, script);
        assert!(err.to_string().contains("chmod o-w"), "{err}");
        chmod(&script, 0o755);

        // A sticky world-writable directory is never trusted as the checked path itself,
        // and a plain world-writable one not even as an ancestor.
        chmod(&scripts, 0o1777);
        if nix::unistd::geteuid().is_root() {
            check(&script, &own).unwrap();
        }
        let err = check(&scripts, &own).unwrap_err();
        assert_eq!(err.path, scripts);
        chmod(&scripts, 0o777);
        let err = check(&script, &own).unwrap_err();
        assert_eq!(err.path, scripts, "{err}");
        chmod(&scripts, 0o775);
        if nix::unistd::getegid().as_raw() != 0 {
            assert!(check(&script, &own).is_err());
        }
    }

    #[test]
    fn a_path_owned_by_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = check(dir.path(), &[u32::MAX - 1]).unwrap_err();
        assert!(err.problem.contains("owned by uid"), "{err}");
        assert!(check(Path::new("relative"), &[0]).is_err());
    }
}
