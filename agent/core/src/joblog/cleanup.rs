//! Deleting old job logs so `log_dir` does not fill the disk.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{is_active, JobLogError};

/// What [`cleanup`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub files_removed: usize,
    pub bytes_removed: u64,
    pub dirs_removed: usize,
    pub files_kept: usize,
    pub bytes_kept: u64,
    /// Files that are open for writing in this process (or pinned) and so were kept even
    /// though they were old enough or over the budget.
    pub active_kept: usize,
    /// Files or directories that could not be removed (logged at `warn`).
    pub failures: usize,
}

#[derive(Debug)]
struct Candidate {
    path: PathBuf,
    modified: SystemTime,
    size: u64,
    active: bool,
}

/// Deletes job logs (`*.log` files directly in `log_dir` or one directory below it) whose
/// last write is older than `max_age`, then the oldest remaining ones until the total size is
/// at most `max_total_bytes`, then the workflow directories left empty.
///
/// A file this process still has open through a [`super::JobLog`] (or has pinned with
/// [`super::pin`]) is never deleted. Symlinks are never followed and other files are left
/// alone. A missing `log_dir` is not an error: there is nothing to clean.
pub fn cleanup(
    log_dir: &Path,
    max_age: Duration,
    max_total_bytes: u64,
) -> Result<CleanupReport, JobLogError> {
    let mut report = CleanupReport::default();
    let Some(found) = list(log_dir, &mut report)? else {
        return Ok(report);
    };
    remove_files(found.files, max_age, max_total_bytes, &mut report);
    remove_empty_dirs(found.dirs, &mut report);
    Ok(report)
}

/// What [`list`] found under `log_dir`.
struct Listing {
    files: Vec<Candidate>,
    /// The workflow directories, to remove if the file pass leaves them empty.
    dirs: Vec<PathBuf>,
}

/// The job logs under `log_dir` and its workflow directories; `None` when there is no
/// `log_dir`.
fn list(log_dir: &Path, report: &mut CleanupReport) -> Result<Option<Listing>, JobLogError> {
    let top = match fs::read_dir(log_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(JobLogError::ListDir {
                path: log_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for entry in top.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            match fs::read_dir(&path) {
                Ok(inner) => {
                    for inner in inner.flatten() {
                        collect(inner.path(), &mut files);
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot list a job log directory");
                    report.failures += 1;
                }
            }
            dirs.push(path);
        } else {
            collect(path, &mut files);
        }
    }
    Ok(Some(Listing { files, dirs }))
}

/// Removes the logs older than `max_age`, then the oldest until the total is at most
/// `max_total_bytes`; never one that is still active.
fn remove_files(
    mut files: Vec<Candidate>,
    max_age: Duration,
    max_total_bytes: u64,
    report: &mut CleanupReport,
) {
    let now = SystemTime::now();
    let too_old = |c: &Candidate| {
        now.duration_since(c.modified)
            .is_ok_and(|age| age > max_age)
    };
    // Oldest first, so the size pass removes from the front.
    files.sort_by(|a, b| {
        a.modified
            .cmp(&b.modified)
            .then_with(|| a.path.cmp(&b.path))
    });
    let mut total: u64 = files.iter().map(|c| c.size).sum();
    for candidate in &files {
        let wanted = too_old(candidate) || total > max_total_bytes;
        if !wanted {
            report.files_kept += 1;
            report.bytes_kept += candidate.size;
            continue;
        }
        if candidate.active {
            report.active_kept += 1;
            report.files_kept += 1;
            report.bytes_kept += candidate.size;
            continue;
        }
        match fs::remove_file(&candidate.path) {
            Ok(()) => {
                tracing::debug!(path = %candidate.path.display(), bytes = candidate.size, "removed an old job log");
                report.files_removed += 1;
                report.bytes_removed += candidate.size;
                total -= candidate.size;
            }
            // Someone else removed it first; its bytes are gone all the same.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                total -= candidate.size;
            }
            Err(e) => {
                tracing::warn!(path = %candidate.path.display(), error = %e, "cannot remove an old job log");
                report.failures += 1;
                report.files_kept += 1;
                report.bytes_kept += candidate.size;
            }
        }
    }
}

/// Removes the workflow directories the file pass left empty.
fn remove_empty_dirs(dirs: Vec<PathBuf>, report: &mut CleanupReport) {
    for dir in dirs {
        // remove_dir refuses a non-empty directory, which is exactly the check wanted; a
        // JobLog::create racing with this retries its mkdir.
        match fs::remove_dir(&dir) {
            Ok(()) => report.dirs_removed += 1,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTEMPTY) | Some(libc::EEXIST) | Some(libc::ENOENT)
                ) => {}
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove an empty job log directory");
                report.failures += 1;
            }
        }
    }
}

fn collect(path: PathBuf, files: &mut Vec<Candidate>) {
    if path.extension().is_none_or(|ext| ext != "log") {
        return;
    }
    let Ok(meta) = fs::symlink_metadata(&path) else {
        return;
    };
    if !meta.is_file() {
        return;
    }
    files.push(Candidate {
        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        size: meta.len(),
        active: is_active(meta.dev(), meta.ino()),
        path,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::joblog::{pin, JobLog, LogName, Stream};
    use std::fs::File;

    fn write_log(dir: &Path, rel: &str, size: usize, age: Duration) -> PathBuf {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, vec![b'x'; size]).expect("write");
        let file = File::options().write(true).open(&path).expect("open");
        file.set_modified(SystemTime::now() - age).expect("mtime");
        path
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn removes_old_files_then_oldest_until_under_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ancient = write_log(dir.path(), "wf1/a.log", 100, 100 * HOUR);
        let old = write_log(dir.path(), "wf2/b.log", 100, 5 * HOUR);
        let newer = write_log(dir.path(), "wf2/c.log", 100, 4 * HOUR);
        let newest = write_log(dir.path(), "wf2/d.log", 100, HOUR);
        let other = write_log(dir.path(), "wf2/notes.txt", 100, 100 * HOUR);
        let report = cleanup(dir.path(), 48 * HOUR, 250).expect("cleanup");
        assert!(!ancient.exists());
        assert!(!old.exists());
        assert!(newer.exists() && newest.exists() && other.exists());
        assert!(!dir.path().join("wf1").exists(), "empty dir removed");
        assert_eq!(report.files_removed, 2);
        assert_eq!(report.bytes_removed, 200);
        assert_eq!(report.dirs_removed, 1);
        assert_eq!(report.bytes_kept, 200);
        assert_eq!(report.failures, 0);
    }

    #[test]
    fn never_removes_a_log_being_written_or_pinned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = JobLog::create(
            dir.path(),
            &LogName {
                workflow_execution_id: "wf".into(),
                job_name: "j".into(),
                started_at: SystemTime::now(),
                attempt_id: "1".into(),
            },
        )
        .expect("create");
        log.append(Stream::Stdout, SystemTime::now(), b"line\n")
            .expect("append");
        log.flush().expect("flush");
        let pinned = write_log(dir.path(), "wf/pinned.log", 10, 100 * HOUR);
        let guard = pin(&pinned).expect("pin");
        // Spell the directory differently: the registry goes by inode, not by path.
        let spelled = dir.path().join("wf/..");
        let report = cleanup(&spelled, Duration::ZERO, 0).expect("cleanup");
        assert!(log.path().exists());
        assert!(pinned.exists());
        assert_eq!(report.active_kept, 2);
        drop(guard);
        drop(log);
        let report = cleanup(dir.path(), Duration::ZERO, 0).expect("cleanup");
        assert_eq!(report.files_removed, 2);
        assert_eq!(report.dirs_removed, 1);
        assert!(fs::read_dir(dir.path()).expect("list").next().is_none());
    }

    #[test]
    fn missing_dir_is_nothing_to_do() {
        let report = cleanup(Path::new("/nonexistent/rsql-agent-logs"), HOUR, 0).expect("ok");
        assert_eq!(report, CleanupReport::default());
    }
}
