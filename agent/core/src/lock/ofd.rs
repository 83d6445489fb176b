//! The three `fcntl` calls the lock needs: take a whole-file OFD write lock without blocking,
//! drop it, and ask whether some *other* owner holds a conflicting one.
//!
//! Owns the `struct flock` plumbing and nothing else: no paths, no state files, no policy.

use std::fs::File;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};

/// What a non-blocking lock attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryLock {
    /// The lock is ours now.
    Locked,
    /// Another open file description (here, in another process, or on another NFS client)
    /// holds a conflicting lock.
    Conflict,
}

/// A `struct flock` covering the whole file, now and however it grows.
fn whole_file(l_type: libc::c_int) -> libc::flock {
    // SAFETY: `libc::flock` is a plain C struct of integers (some targets add integer padding
    // fields), so all-zero bytes is a valid value. Zero is also what the OFD commands require
    // of `l_pid`, and starting from zeroed memory keeps any padding fields defined.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    // Length 0 means "to the end of the file, wherever that is", i.e. the whole file.
    fl.l_len = 0;
    fl
}

/// `F_OFD_SETLK` with a write lock on the whole file. Never blocks.
pub fn try_write_lock(file: &File) -> Result<TryLock, Errno> {
    let fl = whole_file(libc::F_WRLCK);
    loop {
        match fcntl(file, FcntlArg::F_OFD_SETLK(&fl)) {
            Ok(_) => return Ok(TryLock::Locked),
            // fcntl(2): a conflicting lock gives EACCES or EAGAIN, depending on the system.
            Err(Errno::EAGAIN | Errno::EACCES) => return Ok(TryLock::Conflict),
            // SETLK does not wait for the lock, but an NFS round trip can still be interrupted.
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `F_OFD_SETLK` with `F_UNLCK` on the whole file.
pub(super) fn unlock(file: &File) -> Result<(), Errno> {
    let fl = whole_file(libc::F_UNLCK);
    loop {
        match fcntl(file, FcntlArg::F_OFD_SETLK(&fl)) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether an owner other than this open file description holds a lock that conflicts with a
/// whole-file write lock.
///
/// A lock never conflicts with its own owner, so on a file we hold this is `false` for as long
/// as we still hold it. It turns `true` when our lock was lost (an NFSv4 lease that expired
/// while this client was cut off) and someone else has taken it since. On NFS the kernel asks
/// the server (`LOCKT`), so the answer is the server's, not a cached belief of this client.
pub(super) fn held_by_other(file: &File) -> Result<bool, Errno> {
    let mut fl = whole_file(libc::F_WRLCK);
    loop {
        match fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)) {
            Ok(_) => return Ok(fl.l_type != libc::F_UNLCK as libc::c_short),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}
