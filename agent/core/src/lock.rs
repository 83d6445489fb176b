//! The fleet-wide job lock, and the record that remembers each job's outcome.
//!
//! For each lock key (by default `workflow_execution_id/job_name`) this module owns two files
//! in the lock directory, which is shared by every agent in the fleet (EFS, NFSv4.1):
//! - `<sha256(lock_key)>.lock`, an empty file carrying an OFD `fcntl` write lock on the whole
//!   file while an agent runs the job;
//! - `<sha256(lock_key)>.state`, a JSON [`LockState`]: owner host, instance, pid, boot id,
//!   token hash, [`RunState`], heartbeat, exit code and the outcome to replay. It is only ever
//!   replaced whole (temp file, fsync, rename, fsync of the directory), so a reader sees the
//!   old record or the new one, never a mix.
//!
//! It also owns the rules that turn "what the state file said when we took the lock" into
//! run, replay or interrupted ([`decide`]). It must not touch anything else: it runs no job,
//! sends no report and reads no configuration. The daemon and the local workflow runner call
//! it with a directory and a key.
//!
//! # Why OFD locks
//!
//! Open file description locks (`F_OFD_SETLK`) belong to the open file, not to the process.
//! Two jobs in one agent process therefore exclude each other exactly as two agents do, which
//! classic POSIX record locks (per process) would not. Closing a process's last descriptor for
//! the file releases the lock, including when the kernel closes it after SIGKILL. The
//! descriptor is opened close-on-exec, so a job's script never inherits it and cannot keep a
//! dead agent's lock alive. A child forked by another thread does share the open file until
//! its `exec`, though. So a lock is always unlocked explicitly (`F_UNLCK`) before its file is
//! closed, on drop as well as on [`JobLock::release`].
//!
//! # How the lock behaves on NFSv4 / EFS
//!
//! - The Linux NFS client has passed OFD locks to the server as NFSv4 byte-range locks since
//!   OFD locks first appeared in Linux 3.15. So the lock holds across instances, not just
//!   within one kernel.
//! - NFSv4 lock state lives on the server under a lease that the client renews while it is
//!   alive. If a process dies but its host stays up, the kernel releases the lock at once.
//!   If the whole client dies (instance terminated, kernel panic), the server keeps the lock
//!   until the client's lease expires. On EFS that is on the order of 90 seconds. After that
//!   the lock is free and the state file still says `running`: the dead-owner case.
//! - A client that is cut off from EFS but still alive also loses its locks once its lease
//!   expires, and it may not notice at once. That is why the owner also keeps a lease of its
//!   own: it refreshes `heartbeat_at` in the state file on every heartbeat tick
//!   ([`JobLock::touch`]). Before each write it asks the server whether someone else now holds
//!   the lock, and if so it fails with [`LockError::Lost`] rather than overwrite that owner's
//!   record.
//! - Readers on other instances see the newest record. NFSv4 opens a file by name on the
//!   server, EFS grants no delegations, and close-to-open consistency revalidates the data on
//!   open. A reader that opened the old file just before the rename may get `ESTALE`, so reads
//!   retry.
//! - Mount EFS with the options AWS recommends:
//!   `nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport` (and
//!   `_netdev` in fstab). Never add `nolock`, `local_lock=posix` or `local_lock=all` (the
//!   default, `local_lock=none`, is right). Each of those keeps `fcntl` locks local to one
//!   instance, and then two instances can run the same job at once.
//!
//! # Clean-up
//!
//! [`LockDir::cleanup`] deletes the files of jobs that finished longer ago than the retention,
//! and only while it holds their lock. A process that opened a `.lock` file just before it was
//! deleted could lock the orphaned file. So after locking, [`LockDir::try_acquire`] checks that
//! the path still names the file it locked, and starts over if not.

mod decision;
pub mod ofd;
mod state;

pub use decision::{decide, Decision, OnInterrupted};
pub use state::{token_hash, LockState, RunState};

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;

use crate::{error_chain, fsutil};
use ofd::TryLock;
use state::{key_stem, timestamp};

/// Mode of the lock directory when this module creates it.
const DIR_MODE: u32 = 0o750;
/// Mode of `.lock` and `.state` files. Agents in one fleet share a uid, and the group may
/// read the records for operations. Nothing in them is secret: tokens are stored hashed.
const FILE_MODE: u32 = 0o640;
/// How often `try_acquire` starts over when clean-up replaces the file under it. More than a
/// couple in a row means something is deleting lock files in a loop.
const MAX_REPLACED: usize = 8;
/// How often a read retries `ESTALE` (a file replaced on the NFS server mid-open).
const MAX_STALE_RETRIES: usize = 3;
/// Temp files left by a writer that crashed before its rename are removed by `cleanup` once
/// they are this old (or older than the retention, if that is longer). The floor keeps a
/// short retention from deleting a temp file a live writer is about to rename.
const TEMP_MIN_AGE: Duration = Duration::from_secs(3600);
const LOCK_EXT: &str = "lock";
const STATE_EXT: &str = "state";
const TEMP_SUFFIX: &str = fsutil::TEMP_SUFFIX;

/// Everything that can go wrong with the lock directory, its locks and its state files.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot create lock directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open lock file {path}")]
    OpenLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("lock file {path} was replaced {attempts} times while it was being locked")]
    Replaced { path: PathBuf, attempts: usize },
    #[error("cannot read state file {path}")]
    ReadState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {path} is not a valid lock state record")]
    ParseState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write state file {path}")]
    WriteState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a state record for lock key {found:?} cannot be written under lock key {held:?}")]
    KeyMismatch { held: String, found: String },
    #[error("no state has been written under lock key {key:?}, so there is no lease to touch")]
    NothingToTouch { key: String },
    #[error("lock {path} was lost: another owner holds it now (NFS lease expired?)")]
    Lost { path: PathBuf },
    #[error("cannot check that lock {path} is still held")]
    CheckHeld {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot unlock {path}")]
    Unlock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot list lock directory {path}")]
    ListDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The lock directory: `<dir>/<sha256(key)>.lock` and `.state` for every lock key.
#[derive(Debug, Clone)]
pub struct LockDir {
    dir: PathBuf,
}

/// The result of [`LockDir::try_acquire`].
#[derive(Debug)]
// One of these exists per job, briefly; boxing the lock would only add an allocation and a
// deref to every caller.
#[allow(clippy::large_enum_variant)]
pub enum Acquire {
    /// The lock is ours. [`JobLock::previous`] gives the state found, if any.
    Acquired(JobLock),
    /// A live holder has the lock right now: another job in this process, another agent on
    /// this host, or another instance. `holder` is the state file as it was just read. It is
    /// the holder's own record once the holder has written one; until then it is its
    /// predecessor's, or `None`.
    Busy { holder: Option<LockState> },
}

/// A held job lock. Dropping it unlocks and closes the file; [`JobLock::release`] does the
/// same and reports errors.
#[derive(Debug)]
pub struct JobLock {
    file: HeldFile,
    key: String,
    dir: PathBuf,
    stem: String,
    previous: Option<LockState>,
    /// The record this holder last wrote, which [`JobLock::touch`] refreshes.
    current: Option<LockState>,
}

impl LockDir {
    /// Opens the lock directory, creating it (mode 0750) and any missing parents.
    pub fn open(dir: &Path) -> Result<LockDir, LockError> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|source| LockError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(LockDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The path of the lock directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `.lock` file for a lock key.
    pub fn path_for(&self, lock_key: &str) -> PathBuf {
        lock_path(&self.dir, &key_stem(lock_key))
    }

    /// The `.state` file for a lock key.
    pub fn state_path_for(&self, lock_key: &str) -> PathBuf {
        state_path(&self.dir, &key_stem(lock_key))
    }

    /// Tries once to take the lock for `lock_key`, without waiting.
    ///
    /// On success the state file found is kept as [`JobLock::previous`]. A state file that
    /// exists but does not parse is an error, not "no previous run". Guessing there could run
    /// a finished job a second time.
    pub fn try_acquire(&self, lock_key: &str) -> Result<Acquire, LockError> {
        let stem = key_stem(lock_key);
        match lock_stem(&self.dir, &stem)? {
            Some(file) => {
                let previous = match read_state_file(&state_path(&self.dir, &stem)) {
                    Ok(previous) => previous,
                    // An unreadable record would block its job for ever (every delivery left
                    // for a retry, no callback sent). Under the lock, set it aside where an
                    // operator can read it, say so, and go on as if there were none.
                    Err(error @ LockError::ParseState { .. }) => {
                        let aside = set_aside(&self.dir, &stem)?;
                        tracing::error!(
                            lock_key,
                            error = %error_chain(&error),
                            moved_to = %aside.display(),
                            "the job's lock state file cannot be read; moved it aside and treating the job as never run"
                        );
                        None
                    }
                    Err(other) => return Err(other),
                };
                Ok(Acquire::Acquired(JobLock {
                    file,
                    key: lock_key.to_owned(),
                    dir: self.dir.clone(),
                    stem,
                    previous,
                    current: None,
                }))
            }
            None => {
                // The holder's record is only a description, so an unreadable one must not
                // hide the fact that the job is busy.
                let holder = match read_state_file(&state_path(&self.dir, &stem)) {
                    Ok(holder) => holder,
                    Err(error) => {
                        tracing::warn!(
                            lock_key,
                            error = %error_chain(&error),
                            "cannot read the lock holder's state"
                        );
                        None
                    }
                };
                Ok(Acquire::Busy { holder })
            }
        }
    }

    /// Reads the state file for `lock_key` without taking the lock. `None` if there is none.
    pub fn read_state(&self, lock_key: &str) -> Result<Option<LockState>, LockError> {
        read_state_file(&self.state_path_for(lock_key))
    }

    /// Deletes the `.lock`/`.state` pairs of jobs whose state is final and whose `updated_at` is
    /// older than `retention`, and returns how many it deleted. It never deletes a lock that is
    /// held: each pair goes only while this call holds its lock, and after the state has been
    /// read again under that lock.
    ///
    /// Also removed, and counted: `.lock` files without a state file, unheld and not modified
    /// for `retention` (a job that failed before it wrote a record). Not counted: temp files
    /// left by a writer that crashed before its rename.
    ///
    /// This is a housekeeping sweep. A file it cannot read or delete is logged and skipped, so
    /// one bad entry does not stop the rest. Only failing to list the directory is an error.
    pub fn cleanup(&self, retention: Duration) -> Result<usize, LockError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| LockError::ListDir {
            path: self.dir.clone(),
            source,
        })?;
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(source) => {
                    return Err(LockError::ListDir {
                        path: self.dir.clone(),
                        source,
                    })
                }
            };
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
                self.remove_stale_temp(&entry.path(), now, retention);
                continue;
            }
            let Some((stem, ext)) = name.rsplit_once('.') else {
                continue;
            };
            if !is_key_stem(stem) {
                continue;
            }
            let done = match ext {
                STATE_EXT => self.remove_if_finished(stem, now, retention),
                // A lock file with a state file is handled through its state file.
                LOCK_EXT if !state_path(&self.dir, stem).exists() => {
                    self.remove_if_orphan_lock(stem, now, retention)
                }
                _ => false,
            };
            removed += usize::from(done);
        }
        Ok(removed)
    }

    /// Removes one final, expired pair, holding its lock. Returns whether it did.
    fn remove_if_finished(&self, stem: &str, now: SystemTime, retention: Duration) -> bool {
        let state_file = state_path(&self.dir, stem);
        let expired = |state: &LockState| {
            state.is_final() && state.updated_age(now).is_some_and(|age| age >= retention)
        };
        // A cheap look without the lock first, so that clean-up does not take (and on NFS,
        // round-trip for) the lock of every running or recent job.
        match read_state_file(&state_file) {
            Ok(Some(state)) if expired(&state) => {}
            Ok(_) => return false,
            Err(error) => {
                tracing::warn!(
                    path = %state_file.display(),
                    error = %error_chain(&error),
                    "clean-up skips an unreadable state file"
                );
                return false;
            }
        }
        let file = match lock_stem(&self.dir, stem) {
            Ok(Some(file)) => file,
            Ok(None) => return false,
            Err(error) => {
                tracing::warn!(
                    path = %state_file.display(),
                    error = %error_chain(&error),
                    "clean-up cannot lock"
                );
                return false;
            }
        };
        // Look again under the lock: a new attempt may have started since the first look.
        match read_state_file(&state_file) {
            Ok(Some(state)) if expired(&state) => {}
            _ => return false,
        }
        // The state file goes first, while the lock file still stands. As long as the lock
        // file exists, nobody else can hold its lock, so nobody can write a new state file
        // that this would delete.
        if !remove_logged(&state_file) {
            return false;
        }
        remove_logged(&lock_path(&self.dir, stem));
        drop(file);
        true
    }

    /// Removes an unheld `.lock` file that never got a state file. Returns whether it did.
    fn remove_if_orphan_lock(&self, stem: &str, now: SystemTime, retention: Duration) -> bool {
        let path = lock_path(&self.dir, stem);
        if !modified_before(&path, now, retention) {
            return false;
        }
        let Ok(Some(file)) = lock_stem(&self.dir, stem) else {
            return false;
        };
        // Under the lock, a state file may have appeared after all.
        if state_path(&self.dir, stem).exists() {
            return false;
        }
        let removed = remove_logged(&path);
        drop(file);
        removed
    }

    fn remove_stale_temp(&self, path: &Path, now: SystemTime, retention: Duration) {
        if modified_before(path, now, retention.max(TEMP_MIN_AGE)) {
            remove_logged(path);
        }
    }
}

impl JobLock {
    /// The lock key this lock was taken for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The state file as it was when the lock was taken, if there was one.
    pub fn previous(&self) -> Option<&LockState> {
        self.previous.as_ref()
    }

    /// Replaces the state file with `state`, atomically and durably.
    ///
    /// `updated_at` and `heartbeat_at` are set to now: writing the record is itself proof of
    /// life, and clean-up must age the record from its real last write. Fails with
    /// [`LockError::Lost`], writing nothing, if another owner holds the lock now.
    pub fn write_state(&mut self, state: &LockState) -> Result<(), LockError> {
        if state.lock_key != self.key {
            return Err(LockError::KeyMismatch {
                held: self.key.clone(),
                found: state.lock_key.clone(),
            });
        }
        self.ensure_held()?;
        let mut state = state.clone();
        let now = timestamp(SystemTime::now());
        state.heartbeat_at = now.clone();
        state.updated_at = now;
        write_state_file(&self.dir, &self.stem, &state)?;
        self.current = Some(state);
        Ok(())
    }

    /// Renews the lease: sets `heartbeat_at` in this holder's record to now (atomically).
    ///
    /// Needs a record written by [`JobLock::write_state`] first. The state file found when the
    /// lock was taken belongs to an earlier owner, and refreshing its heartbeat would be a lie.
    pub fn touch(&mut self) -> Result<(), LockError> {
        self.ensure_held()?;
        let Some(state) = self.current.as_mut() else {
            return Err(LockError::NothingToTouch {
                key: self.key.clone(),
            });
        };
        state.heartbeat_at = timestamp(SystemTime::now());
        write_state_file(&self.dir, &self.stem, state)
    }

    /// Unlocks and closes the lock file, reporting an unlock error that a plain drop would
    /// swallow.
    pub fn release(mut self) -> Result<(), LockError> {
        // Closing (when `self` drops) releases the lock as well, so even a failed unlock
        // leaves nothing held once no forked child shares the file any more.
        self.file.unlock().map_err(|source| LockError::Unlock {
            path: lock_path(&self.dir, &self.stem),
            source,
        })
    }

    /// Gives the held lock away as a descriptor of the same open file description, for a
    /// job's owner process to receive (`job_owner`). This side closes its own descriptor
    /// without unlocking: an OFD lock belongs to the open file description, so it stays held
    /// for as long as the receiver keeps its copy.
    pub fn hand_over(mut self) -> Result<std::os::fd::OwnedFd, LockError> {
        let path = lock_path(&self.dir, &self.stem);
        let copy = self
            .file
            .file
            .try_clone()
            .map_err(|source| LockError::OpenLock { path, source })?;
        // Never unlock on drop now: that would take the lock from the receiver too.
        self.file.unlocked = true;
        Ok(copy.into())
    }

    /// Takes over a lock handed over by [`JobLock::hand_over`] (received as `fd`), with
    /// `current` as the record this holder writes from now on. Fails with
    /// [`LockError::Lost`] when the descriptor does not hold the lock.
    pub fn adopt(
        fd: std::os::fd::OwnedFd,
        lock_dir: &Path,
        lock_key: &str,
        previous: Option<LockState>,
    ) -> Result<JobLock, LockError> {
        let stem = key_stem(lock_key);
        let path = lock_path(lock_dir, &stem);
        let file = File::from(fd);
        // Re-taking a lock the description already holds succeeds at once; a conflict means
        // whoever sent the descriptor had lost it.
        match ofd::try_write_lock(&file) {
            Ok(TryLock::Locked) => {}
            Ok(TryLock::Conflict) => return Err(LockError::Lost { path }),
            Err(source) => return Err(LockError::Lock { path, source }),
        }
        Ok(JobLock {
            file: HeldFile {
                file,
                unlocked: false,
            },
            key: lock_key.to_owned(),
            dir: lock_dir.to_path_buf(),
            stem,
            previous,
            current: None,
        })
    }

    /// The locked file itself, for a job's processes to inherit (see `job_owner`).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.file.file.as_fd()
    }

    /// Fails with [`LockError::Lost`] if another owner holds the lock, i.e. ours was lost.
    fn ensure_held(&self) -> Result<(), LockError> {
        let path = || lock_path(&self.dir, &self.stem);
        match ofd::held_by_other(&self.file.file) {
            Ok(false) => Ok(()),
            Ok(true) => Err(LockError::Lost { path: path() }),
            Err(source) => Err(LockError::CheckHeld {
                path: path(),
                source,
            }),
        }
    }
}

fn lock_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.{LOCK_EXT}"))
}

fn state_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.{STATE_EXT}"))
}

/// Whether `stem` looks like a hex SHA-256, so clean-up leaves files it did not create alone.
fn is_key_stem(stem: &str) -> bool {
    stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A lock file carrying our OFD lock.
///
/// Dropping it unlocks explicitly before it closes. An open file description is shared with
/// every child forked while it is open, until that child's `exec` closes the close-on-exec
/// descriptor. So if another thread is spawning a job process at the moment a lock is
/// dropped, a plain close would leave the lock held on the child's behalf for a moment, and
/// a redelivery in that moment would be told the job is busy. `F_UNLCK` through any
/// descriptor removes the lock from the shared description at once.
#[derive(Debug)]
struct HeldFile {
    file: File,
    unlocked: bool,
}

impl HeldFile {
    fn unlock(&mut self) -> Result<(), Errno> {
        if !self.unlocked {
            ofd::unlock(&self.file)?;
            self.unlocked = true;
        }
        Ok(())
    }
}

impl Drop for HeldFile {
    fn drop(&mut self) {
        // Nothing to report to from here; the close that follows releases the lock anyway.
        let _ = self.unlock();
    }
}

/// Opens (creating if needed) and locks `<stem>.lock`. `Ok(None)` means someone else holds it.
fn lock_stem(dir: &Path, stem: &str) -> Result<Option<HeldFile>, LockError> {
    let path = lock_path(dir, stem);
    for _ in 0..MAX_REPLACED {
        // std opens with O_CLOEXEC, which keeps the lock out of every child we spawn.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            // Never through a name planted in the lock directory.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(&path)
            .map_err(|source| LockError::OpenLock {
                path: path.clone(),
                source,
            })?;
        match ofd::try_write_lock(&file) {
            Ok(TryLock::Locked) => {}
            Ok(TryLock::Conflict) => return Ok(None),
            Err(source) => return Err(LockError::Lock { path, source }),
        }
        let held = HeldFile {
            file,
            unlocked: false,
        };
        if still_named_by(&held.file, &path)? {
            return Ok(Some(held));
        }
        // Clean-up deleted this file between our open and our lock: the lock we hold guards
        // nothing anyone else can see. Drop it and lock whatever the path names now.
    }
    Err(LockError::Replaced {
        path,
        attempts: MAX_REPLACED,
    })
}

/// Whether `path` still names the file `file` has open.
fn still_named_by(file: &File, path: &Path) -> Result<bool, LockError> {
    let open_error = |source| LockError::OpenLock {
        path: path.to_path_buf(),
        source,
    };
    let held = match file.metadata() {
        Ok(meta) => meta,
        // On NFS, a file deleted by another client answers ESTALE to its open descriptor.
        Err(e) if e.raw_os_error() == Some(libc::ESTALE) => return Ok(false),
        Err(e) => return Err(open_error(e)),
    };
    match fs::metadata(path) {
        Ok(named) => Ok(named.dev() == held.dev() && named.ino() == held.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(open_error(e)),
    }
}

/// Renames `<stem>.state` to `<stem>.state.corrupt-<unix millis>` and returns the new path.
fn set_aside(dir: &Path, stem: &str) -> Result<PathBuf, LockError> {
    let from = state_path(dir, stem);
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let to = dir.join(format!("{stem}.{STATE_EXT}.corrupt-{millis}"));
    fs::rename(&from, &to).map_err(|source| LockError::WriteState { path: from, source })?;
    Ok(to)
}

/// The largest lock state file read: a state holds ids, times and a short outcome.
const MAX_STATE_BYTES: u64 = 1 << 20;

/// Reads and parses a state file; `Ok(None)` when there is none.
fn read_state_file(path: &Path) -> Result<Option<LockState>, LockError> {
    let mut tries = 0;
    let bytes = loop {
        match crate::fsutil::read_bounded(path, MAX_STATE_BYTES) {
            Ok(bytes) => break bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            // Nothing this agent writes is that large: a corrupt state, set aside as one.
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
                return Err(LockError::ParseState {
                    path: path.to_path_buf(),
                    source: serde_json::Error::io(e),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) && tries < MAX_STALE_RETRIES => {
                tries += 1;
            }
            Err(source) => {
                return Err(LockError::ReadState {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| LockError::ParseState {
            path: path.to_path_buf(),
            source,
        })
}

/// Replaces `<stem>.state` with `state` durably (see [`fsutil::write_atomic`]); its temp
/// file starts with a dot and ends in TEMP_SUFFIX, so clean-up can find leftovers.
fn write_state_file(dir: &Path, stem: &str, state: &LockState) -> Result<(), LockError> {
    let path = state_path(dir, stem);
    let fail = |source| LockError::WriteState {
        path: path.clone(),
        source,
    };
    let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| fail(io::Error::other(e)))?;
    bytes.push(b'\n');
    fsutil::write_atomic(&path, &bytes, FILE_MODE).map_err(fail)
}

fn modified_before(path: &Path, now: SystemTime, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|at| now.duration_since(at).is_ok_and(|a| a >= age))
}

/// Deletes a file for clean-up; logs and returns `false` if that fails. A file that is
/// already gone counts as deleted.
fn remove_logged(path: &Path) -> bool {
    match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "clean-up cannot delete");
            false
        }
    }
}

#[cfg(test)]
mod tests;
