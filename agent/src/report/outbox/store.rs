//! The file store: one JSON file per entry in `state_dir/outbox/`, written durably (temp
//! file, fsync, rename, fsync of the directory), read back with a size bound, listed oldest
//! first, removed durably, and quarantined to `*.bad` when a file is not a valid entry.
//!
//! Knows nothing of Step Functions, the audit table or retries: that is `worker`.

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Inner, Outbox, OutboxEntry, OutboxError};
use crate::fsutil::{self, Durability};

/// The largest outbox entry: a success output (at most 262,144 bytes), a cause (32,768) and
/// an audit record, with room to spare.
const MAX_ENTRY_BYTES: u64 = 1 << 20;
const DIR_NAME: &str = "outbox";
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
const ENTRY_SUFFIX: &str = ".json";
const TMP_SUFFIX: &str = fsutil::TEMP_SUFFIX;
const BAD_SUFFIX: &str = ".bad";

/// A temp file this old was left by a crash mid-[`Outbox::put`]; its put never returned, so
/// nobody relies on it.
const STALE_TMP_AGE: Duration = Duration::from_secs(600);

impl Outbox {
    /// Opens (creating when needed) `state_dir/outbox`, tightens its mode to 0700 and clears
    /// temp files that a crash mid-put left behind.
    pub fn open(state_dir: &Path) -> Result<Outbox, OutboxError> {
        let dir = state_dir.join(DIR_NAME);
        let err = |source| OutboxError::Open {
            path: dir.clone(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)
            .map_err(err)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(DIR_MODE)).map_err(err)?;
        sync_dir(state_dir).map_err(err)?;
        let outbox = Outbox {
            inner: Arc::new(Inner {
                dir,
                wake: Notify::new(),
                claims: Mutex::new(HashSet::new()),
            }),
        };
        outbox.remove_stale_tmp();
        Ok(outbox)
    }

    fn path_of(&self, id: &str) -> Result<PathBuf, OutboxError> {
        // Ids become file names; anything but our own alphabet could escape the directory.
        let valid = !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(OutboxError::BadId { id: id.to_string() });
        }
        Ok(self.inner.dir.join(format!("{id}{ENTRY_SUFFIX}")))
    }

    /// Writes `entry` durably, then wakes the worker. When this returns `Ok`, the entry
    /// survives a crash.
    pub fn put(&self, entry: &OutboxEntry) -> Result<(), OutboxError> {
        self.write(entry, Durability::Durable)?;
        self.notify();
        Ok(())
    }

    /// Replaces `entry`'s file with its progress (the callback delivered), atomically but
    /// without an fsync: after a crash the entry may come back as it was [`Self::put`], and
    /// its steps are repeated harmlessly (Step Functions refuses a second callback on a
    /// closed token, which counts as done, and the audit write is conditional). The durable
    /// promise is the `put`; progress only spares a restart the repetition.
    pub fn update(&self, entry: &OutboxEntry) -> Result<(), OutboxError> {
        self.write(entry, Durability::ThisBoot)
    }

    fn write(&self, entry: &OutboxEntry, durability: Durability) -> Result<(), OutboxError> {
        let path = self.path_of(&entry.id)?;
        let json = serde_json::to_vec_pretty(entry).map_err(|source| OutboxError::Encode {
            id: entry.id.clone(),
            source,
        })?;
        // The temp file is dot-prefixed, so a listing never mistakes a half-written file for
        // an entry.
        fsutil::write_replacing(&path, &json, FILE_MODE, durability)
            .map_err(|source| OutboxError::Write { path, source })
    }

    /// Removes an entry, without an fsync: an entry that a crash brings back is delivered
    /// again, which is harmless (Step Functions refuses a second callback on a closed
    /// token, which the worker counts as done, and the audit write is conditional).
    /// Removing an entry that is not there is not an error.
    pub fn remove(&self, id: &str) -> Result<(), OutboxError> {
        let path = self.path_of(id)?;
        let err = |source| OutboxError::Remove {
            path: path.clone(),
            source,
        };
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// Reads one entry; `None` when it is not there (or unreadable, which is logged).
    pub fn load(&self, id: &str) -> Result<Option<OutboxEntry>, OutboxError> {
        let path = self.path_of(id)?;
        Ok(self.read_entry(&path))
    }

    /// Every entry, oldest first. Files that do not parse are renamed to `*.bad` with a
    /// warning and skipped: one corrupt file must not block every report behind it.
    pub fn pending(&self) -> Result<Vec<OutboxEntry>, OutboxError> {
        let mut entries: Vec<OutboxEntry> = self
            .entry_paths()?
            .iter()
            .filter_map(|path| self.read_entry(path))
            .collect();
        entries.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        Ok(entries)
    }

    /// How many entries wait in the outbox.
    pub fn len(&self) -> Result<usize, OutboxError> {
        Ok(self.entry_paths()?.len())
    }

    pub fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self.len()? == 0)
    }
    fn entry_paths(&self) -> Result<Vec<PathBuf>, OutboxError> {
        let err = |source| OutboxError::List {
            path: self.inner.dir.clone(),
            source,
        };
        let mut paths = Vec::new();
        for dirent in fs::read_dir(&self.inner.dir).map_err(err)? {
            let dirent = dirent.map_err(err)?;
            let name = dirent.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with('.') && name.ends_with(ENTRY_SUFFIX) {
                paths.push(dirent.path());
            }
        }
        Ok(paths)
    }

    fn read_entry(&self, path: &Path) -> Option<OutboxEntry> {
        let bytes = match crate::fsutil::read_bounded(path, MAX_ENTRY_BYTES) {
            Ok(bytes) => bytes,
            // Delivered and removed since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
                self.quarantine(
                    path,
                    &format!("it is larger than {MAX_ENTRY_BYTES} bytes, more than any report"),
                );
                return None;
            }
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot read an outbox entry; will try again",
                );
                return None;
            }
        };
        match serde_json::from_slice::<OutboxEntry>(&bytes) {
            // Sent, removed and claimed by its id: an entry whose id is not its file's name
            // could never be removed after delivery, so it would be sent forever, or never.
            Ok(entry)
                if path.file_name().and_then(|n| n.to_str())
                    != Some(format!("{}{ENTRY_SUFFIX}", entry.id).as_str()) =>
            {
                self.quarantine(
                    path,
                    &format!(
                        "its id {:?} does not match its file name (expected {}{ENTRY_SUFFIX})",
                        entry.id, entry.id
                    ),
                );
                None
            }
            Ok(entry) => Some(entry),
            Err(e) => {
                self.quarantine(path, &e);
                None
            }
        }
    }

    fn quarantine(&self, path: &Path, error: &dyn std::fmt::Display) {
        let mut bad = path.as_os_str().to_owned();
        bad.push(BAD_SUFFIX);
        match fs::rename(path, &bad) {
            Ok(()) => {
                let _ = sync_dir(&self.inner.dir);
                tracing::warn!(
                    path = %path.display(),
                    quarantined = %PathBuf::from(&bad).display(),
                    error = %error,
                    "an outbox entry is not valid; moved aside and skipped (its report is lost \
                     unless an operator repairs it and renames it back)"
                );
            }
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "an outbox entry is not valid and cannot be moved aside; skipped"
            ),
        }
    }

    fn remove_stale_tmp(&self) {
        let Ok(dir) = fs::read_dir(&self.inner.dir) else {
            return;
        };
        for dirent in dir.flatten() {
            let name = dirent.file_name();
            let is_tmp = name
                .to_str()
                .is_some_and(|n| n.starts_with('.') && n.ends_with(TMP_SUFFIX));
            let old = dirent
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TMP_AGE);
            if is_tmp && old {
                let _ = fs::remove_file(dirent.path());
            }
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::entry;
    use super::*;

    #[test]
    fn entries_are_durable_ordered_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let first = entry("token-1");
        let second = entry("token-2");
        outbox.put(&second).unwrap();
        outbox.put(&first).unwrap();
        let mode = fs::metadata(outbox.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let file = outbox.dir().join(format!("{}.json", first.id));
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // A reopen (a restart) sees both, oldest first by creation time.
        let reopened = Outbox::open(dir.path()).unwrap();
        let pending = reopened.pending().unwrap();
        let ids: Vec<_> = pending.iter().map(|e| e.id.as_str()).collect();
        let mut expected = [first.clone(), second.clone()];
        expected.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        assert_eq!(
            ids,
            expected.iter().map(|e| e.id.as_str()).collect::<Vec<_>>()
        );
        assert_eq!(pending.iter().find(|e| e.id == first.id), Some(&first));
        assert_eq!(reopened.len().unwrap(), 2);

        let mut updated = first.clone();
        updated.callback_done = true;
        reopened.update(&updated).unwrap();
        assert_eq!(reopened.load(&first.id).unwrap(), Some(updated));

        reopened.remove(&first.id).unwrap();
        reopened.remove(&first.id).unwrap();
        assert_eq!(reopened.len().unwrap(), 1);
        assert!(matches!(
            reopened.remove("../x"),
            Err(OutboxError::BadId { .. })
        ));
    }

    #[test]
    fn an_entry_larger_than_any_report_is_set_aside_unread() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let good = entry("t");
        outbox.put(&good).unwrap();
        let huge = outbox.dir().join("0000000000000-huge.json");
        fs::File::create(&huge)
            .unwrap()
            .set_len(MAX_ENTRY_BYTES + 1)
            .unwrap();
        assert_eq!(outbox.pending().unwrap(), vec![good]);
        assert!(outbox.dir().join("0000000000000-huge.json.bad").exists());
    }

    #[test]
    fn unparseable_files_are_quarantined_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let good = entry("t");
        outbox.put(&good).unwrap();
        fs::write(
            outbox.dir().join("0000000000000-garbage.json"),
            b"{\"id\": 3",
        )
        .unwrap();
        fs::write(outbox.dir().join(".inflight.json.tmp"), b"half").unwrap();
        let pending = outbox.pending().unwrap();
        assert_eq!(pending, vec![good]);
        assert!(outbox.dir().join("0000000000000-garbage.json.bad").exists());
        assert_eq!(outbox.len().unwrap(), 1);
    }
}
