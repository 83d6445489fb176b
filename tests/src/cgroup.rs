//! A cgroup v2 directory of a test's own, delegated to the agent as `[jobs] cgroup_parent`,
//! the way an administrator delegates one on a host without systemd.
//!
//! It is made under the host's cgroup2 mount (`/sys/fs/cgroup` on a pure v2 host,
//! `/sys/fs/cgroup/unified` on a hybrid one) and hands down every controller on offer, so
//! that a host with the memory controller exercises it too. Dropping it kills whatever is
//! still inside and removes it. A host without a writable hierarchy fails the test with a
//! message saying what is missing; it never skips.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The test's cgroup; see the module doc.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> TestCgroup {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let mount = mount_point().unwrap_or_else(|| {
            panic!(
                "this test needs a cgroup v2 hierarchy and /proc/self/mountinfo shows no \
                 cgroup2 mount: run it on a cgroup v2 host (Amazon Linux 2023), or mount one \
                 (`mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`)"
            )
        });
        let path = mount.join(format!(
            "rsql-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(e) = std::fs::create_dir(&path) {
            panic!(
                "this test needs to create cgroups under {} ({e}); run the tests as root, or \
                 from inside a cgroup subtree delegated to this user",
                mount.display()
            );
        }
        let control = path.join("cgroup.subtree_control");
        for controller in words(&path.join("cgroup.controllers")) {
            // What the hierarchy does not allow here simply stays off.
            let _ = std::fs::write(&control, format!("+{controller}"));
        }
        TestCgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether jobs under it get the memory controller (a pure v2 host), so that
    /// `max_rss_mb` must be reported.
    pub fn has_memory(&self) -> bool {
        words(&self.path.join("cgroup.subtree_control"))
            .iter()
            .any(|c| c == "memory")
    }

    /// The job cgroups now under it.
    pub fn job_cgroups(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.path)
            .map(|dir| {
                dir.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        TestCgroup::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while populated(&self.path) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        remove_tree(&self.path);
    }
}

fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// `rmdir` deepest first: a cgroup's interface files cannot be removed, only the directory.
fn remove_tree(path: &Path) {
    if let Ok(dir) = std::fs::read_dir(path) {
        for entry in dir.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(path);
}

fn words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
fn mount_point() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
    })
}
