//! One process owns a state directory.
//!
//! The outbox, the log shipments and the job records under `[agent] state_dir` are each
//! delivered by one process; the outbox's claims on its entries are in-process only. So the
//! daemon, and `rsql-wrapper run` (which delivers the outbox itself), first take an OFD lock
//! on `state_dir/owner.lock` and keep it for their whole life. A second agent, or a
//! standalone run while the daemon is up, is refused with the holder's pid instead of
//! sending the same callbacks twice.
//!
//! The lock goes with the process: the file is opened close-on-exec, so a job the agent
//! started never inherits it, and the kernel drops it when the owner exits however it
//! exits. It is opened without following a symlink (`O_NOFOLLOW`, `O_NOCTTY`) and used only
//! if it is a regular file of this process's user: a name planted in the state directory
//! never gets another file truncated.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::lock::ofd::{self, TryLock};

const FILE_NAME: &str = "owner.lock";

#[derive(Debug, thiserror::Error)]
pub enum StateDirLockError {
    #[error(
        "the state directory {dir} is in use by another process ({holder}); a state directory \
         has one owner: stop that process, or give this one another [agent] state_dir"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error(
        "{path} is {what}, not the agent's own lock file; the agent never follows or writes \
         through one: remove it (and check who could write to the state directory)"
    )]
    NotOwnFile { path: PathBuf, what: String },
    #[error("cannot lock {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Ownership of a state directory, held until dropped (or the process ends).
#[derive(Debug)]
pub struct StateDirLock {
    _file: File,
    path: PathBuf,
}

impl StateDirLock {
    /// Takes the state directory for this process, which `role` names in the lock file (for
    /// the message a refused process prints). Never waits.
    pub fn claim(state_dir: &Path, role: &str) -> Result<StateDirLock, StateDirLockError> {
        let path = state_dir.join(FILE_NAME);
        let io = |source: std::io::Error| StateDirLockError::Io {
            path: path.clone(),
            source,
        };
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(&path);
        let mut file = match opened {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(StateDirLockError::NotOwnFile {
                    path,
                    what: "a symlink".into(),
                })
            }
            Err(e) => return Err(io(e)),
        };
        check_own_file(&file, &path)?;
        match ofd::try_write_lock(&file).map_err(|e| io(e.into()))? {
            TryLock::Locked => {}
            TryLock::Conflict => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(StateDirLockError::InUse {
                    dir: state_dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "pid unknown".to_string()
                    } else {
                        holder.to_string()
                    },
                });
            }
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "pid {} ({role})", std::process::id()).map_err(io)?;
        Ok(StateDirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The opened lock file is a regular file owned by this process's user (or root), with one
/// name: never a device, a FIFO, or a hard link to a file elsewhere.
fn check_own_file(file: &File, path: &Path) -> Result<(), StateDirLockError> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().map_err(|source| StateDirLockError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let own = nix::unistd::geteuid().as_raw();
    let what = if !meta.is_file() {
        Some("not a regular file".to_string())
    } else if meta.uid() != own && meta.uid() != 0 {
        Some(format!("a file owned by uid {}", meta.uid()))
    } else if meta.nlink() > 1 {
        Some(format!("a file with {} hard links", meta.nlink()))
    } else {
        None
    };
    match what {
        Some(what) => Err(StateDirLockError::NotOwnFile {
            path: path.to_path_buf(),
            what,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StateDirLock::claim(dir.path(), "rsql-agent run").expect("first claim");
        let refused = StateDirLock::claim(dir.path(), "rsql-wrapper run")
            .expect_err("a second claim must be refused");
        let text = refused.to_string();
        assert!(
            text.contains(&format!("pid {} (rsql-agent run)", std::process::id())),
            "{text}"
        );
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        drop(first);
        let again = StateDirLock::claim(dir.path(), "rsql-wrapper run")
            .expect("free again once the first owner is gone");
        assert_eq!(again.path(), dir.path().join(FILE_NAME));
    }

    #[test]
    fn a_planted_symlink_or_hard_link_is_refused_and_its_target_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").expect("write");
        std::os::unix::fs::symlink(&victim, dir.path().join(FILE_NAME)).expect("symlink");
        let err = StateDirLock::claim(dir.path(), "test").expect_err("a symlink");
        assert!(err.to_string().contains("symlink"), "{err}");
        std::fs::remove_file(dir.path().join(FILE_NAME)).expect("rm");
        std::fs::hard_link(&victim, dir.path().join(FILE_NAME)).expect("link");
        let err = StateDirLock::claim(dir.path(), "test").expect_err("a hard link");
        assert!(err.to_string().contains("hard links"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("read"),
            "precious\n"
        );
    }
}
