//! Real host resources for the operator-side tests: a throwaway local user (`useradd`) and a
//! small tmpfs mount (a disk that fills up). Both are removed when dropped, on success or
//! failure, and both fail loudly, saying what to install, when the host cannot make them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A local user made for one test, with no home and no login shell; `userdel` on drop.
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    /// Creates a user with a unique name and its own primary group `users`-like (no group of
    /// the agent's).
    pub fn new() -> TestUser {
        let name = format!(
            "rsqlt{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/usr/sbin/nologin", &name])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run useradd ({e}): the local-user tests need it, as root \
                     (Debian: apt-get install passwd; .ci/install-deps does)"
                )
            });
        assert!(
            out.status.success(),
            "useradd {name} failed (the tests must run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let user = nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("useradd made no user {name}"));
        TestUser {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    }

    /// `program args...` run as this user (through `runuser`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("runuser");
        command.args(["-u", &self.name, "--"]).arg(program);
        command
    }

    /// Gives `path` to this user.
    pub fn chown(&self, path: &Path) {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.gid)),
        )
        .expect("chown to the test user");
    }
}

impl Default for TestUser {
    fn default() -> Self {
        TestUser::new()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // The tests end the processes they start as this user before it is dropped.
        match Command::new("userdel").arg(&self.name).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "userdel {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run userdel {}: {e}", self.name),
        }
    }
}

/// A tmpfs of a given size mounted on a fresh directory; unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
    _owned: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `"2m"`), mode 0755, on a new
    /// directory.
    pub fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("mount point");
        let mut fs = Tmpfs::at(dir.path(), size);
        fs._owned = Some(dir);
        fs
    }

    /// Mounts a tmpfs of `size` on the existing directory `dir`.
    pub fn at(dir: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run mount ({e}): the full-disk tests need it (Debian: mount)")
            });
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (the full-disk tests need root with CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
            _owned: None,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.clone()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still has a file open there: detach it now, it goes when closed.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}
