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
//! exits.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::lock::ofd::{self, TryLock};

const FILE_NAME: &str = "owner.lock";

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error(
        "the state directory {dir} is in use by another process ({holder}); a state directory \
         has one owner: stop that process, or give this one another [agent] state_dir"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error("cannot lock {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Ownership of a state directory, held until dropped (or the process ends).
#[derive(Debug)]
pub struct StateDirOwner {
    _file: File,
    path: PathBuf,
}

impl StateDirOwner {
    /// Takes the state directory for this process, which `role` names in the lock file (for
    /// the message a refused process prints). Never waits.
    pub fn claim(state_dir: &Path, role: &str) -> Result<StateDirOwner, OwnerError> {
        let path = state_dir.join(FILE_NAME);
        let io = |source: std::io::Error| OwnerError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match ofd::try_write_lock(&file).map_err(|e| io(e.into()))? {
            TryLock::Locked => {}
            TryLock::Conflict => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(OwnerError::InUse {
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
        Ok(StateDirOwner { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StateDirOwner::claim(dir.path(), "rsql-agent run").expect("first claim");
        let refused = StateDirOwner::claim(dir.path(), "rsql-wrapper run")
            .expect_err("a second claim must be refused");
        let text = refused.to_string();
        assert!(
            text.contains(&format!("pid {} (rsql-agent run)", std::process::id())),
            "{text}"
        );
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        drop(first);
        let again = StateDirOwner::claim(dir.path(), "rsql-wrapper run")
            .expect("free again once the first owner is gone");
        assert_eq!(again.path(), dir.path().join(FILE_NAME));
    }
}
