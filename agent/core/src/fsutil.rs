//! Durable file writes.
//!
//! Owns the one way a record that must survive a crash is written: a temp file in the same
//! directory, fsync, rename over the old file, fsync of the directory (so the rename itself
//! survives). A reader sees the old contents or the new, never a mix. Every durable record
//! (lock state, outbox entries, the CloudWatch shipper's position, the job directory) is
//! written here.

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Ends the name of every temp file [`write_atomic`] makes; clean-up finds leftovers by it.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Replaces `path` with `bytes` atomically and durably; the file gets `mode` (less the umask)
/// when created.
///
/// The temp file is `.<name>.<random>.tmp` in the same directory: hidden from listings that
/// skip dot files, found by clean-up through [`TEMP_SUFFIX`], and unique even when several
/// hosts share the directory (the lock on EFS). If anything fails before the rename, the temp
/// file is deleted.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_replacing(path, bytes, mode, Durability::Durable)
}

/// Whether a replaced file must survive a crash of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync of the file, rename, fsync of the directory: the record outlives a power loss.
    Durable,
    /// Rename only: readers on this boot see the old contents or the new, never a mix, but
    /// a crash may leave either (or no file). For records that die with the process that
    /// writes them, or that a durable record elsewhere already holds.
    ThisBoot,
}

/// Replaces `path` with `bytes` atomically, and durably where `durability` says so; see
/// [`write_atomic`].
pub fn write_replacing(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // An empty parent means the current directory.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(TEMP_SUFFIX)
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    if durability == Durability::ThisBoot {
        return tmp.persist(path).map(drop).map_err(|e| e.error);
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

/// Reads the regular file `path`, never through a symlink, up to `max` bytes: a longer
/// file is [`io::ErrorKind::FileTooLarge`], so a planted or runaway file cannot make the
/// agent allocate what it holds.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::ErrorKind::FileTooLarge.into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_whole_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("record.json");
        write_atomic(&path, b"first, and longer", 0o600).expect("first");
        write_atomic(&path, b"second", 0o600).expect("second");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(names.len(), 1);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_failed_rename_keeps_the_old_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A non-empty directory cannot be replaced by a file: the rename fails.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).expect("mkdir");
        std::fs::write(path.join("inside"), b"x").expect("write");
        write_atomic(&path, b"new", 0o640).expect_err("rename over a directory");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("taken")]);
    }
}
