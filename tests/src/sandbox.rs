//! A real systemd as PID 1, for the tests of the installed package: [`Sandbox::boot`] starts
//! `tests/sandbox/sandbox.sh boot` (systemd 252 from the host's packages, in its own PID,
//! mount, cgroup, UTS and IPC namespaces, on an overlay of the host's `/` whose writes vanish
//! at stop; the host's network, so the agent inside reaches the AWS emulator on loopback),
//! [`Sandbox::install`] installs the `.deb` that `make package` built, and dropping the
//! sandbox powers it off and removes it, whether the test passed or not.
//!
//! The package comes from `RSQL_AGENT_DEB` (the Makefile sets it) or from
//! `target/debian/rsql-agent_*.deb`; without one the test fails saying to run
//! `make package`. Booting needs root and a cgroup2 mount: a test that cannot boot fails, it
//! never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::bins;

/// One booted systemd; powered off and removed on drop.
#[derive(Debug)]
pub struct Sandbox {
    dir: PathBuf,
    stopped: bool,
}

/// The `.deb` under test.
pub fn package() -> PathBuf {
    if let Some(path) = std::env::var_os("RSQL_AGENT_DEB") {
        // Relative to the workspace (the Makefile's view), not to the test's directory.
        let path = bins::workspace_root().join(path);
        assert!(
            path.is_file(),
            "RSQL_AGENT_DEB={} is not a file",
            path.display()
        );
        return path;
    }
    let dir = bins::workspace_root().join("target/debian");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("rsql-agent_") && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    debs.pop().unwrap_or_else(|| {
        panic!(
            "no rsql-agent .deb in {}: run `make package` (or set RSQL_AGENT_DEB)",
            dir.display()
        )
    })
}

fn script() -> PathBuf {
    bins::workspace_root().join("tests/sandbox/sandbox.sh")
}

/// Shows a command's result for an assertion message.
pub fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Sandbox {
    /// Boots a sandbox of its own for `name` (a test's name: one directory per sandbox).
    pub fn boot(name: &str) -> Sandbox {
        assert!(
            nix::unistd::geteuid().is_root(),
            "booting systemd in its own namespaces needs root"
        );
        let dir = std::env::temp_dir().join(format!("rsql-sandbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("share/out")).expect("mkdir sandbox share");
        // The jobs (another user) write their evidence here.
        chmod(&dir.join("share/out"), 0o777);
        let sandbox = Sandbox {
            dir,
            stopped: false,
        };
        let out = Command::new("bash")
            .arg(script())
            .arg("boot")
            .env("SANDBOX_DIR", &sandbox.dir)
            .env("SANDBOX_NET", "host")
            .stdin(Stdio::null())
            .output()
            .expect("run sandbox.sh boot");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("state="),
            "systemd did not boot in {} (needs root, util-linux's unshare/nsenter and a cgroup2 mount):\n{}\nconsole:\n{}",
            sandbox.dir.display(),
            show(&out),
            std::fs::read_to_string(sandbox.dir.join("console.log")).unwrap_or_default()
        );
        sandbox
    }

    /// `/share` inside, seen from the host.
    pub fn share(&self) -> PathBuf {
        self.dir.join("share")
    }

    /// `/share/out` seen from the host: where jobs leave their evidence (world-writable).
    pub fn out(&self) -> PathBuf {
        self.dir.join("share/out")
    }

    /// Runs `args` inside (as root, through nsenter) and returns what it did.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(script())
            .arg("exec")
            .args(args)
            .env("SANDBOX_DIR", &self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run sandbox.sh exec")
    }

    /// [`Sandbox::exec`] that must succeed; returns its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} failed in the sandbox:\n{}",
            show(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sh -c script` inside, which must succeed.
    pub fn sh(&self, script: &str) -> String {
        self.ok(&["sh", "-c", script])
    }

    /// Writes `text` to `path` inside, with `mode`, owned by root.
    pub fn write(&self, path: &str, text: &str, mode: u32) {
        let name = format!("file-{}", fastrand_name());
        let staged = self.share().join(&name);
        std::fs::write(&staged, text).expect("stage a file for the sandbox");
        self.ok(&[
            "install",
            "-D",
            "-m",
            &format!("{mode:o}"),
            &format!("/share/{name}"),
            path,
        ]);
        let _ = std::fs::remove_file(staged);
    }

    /// `dpkg -i` of the package under test.
    pub fn install(&self, deb: &Path) {
        let staged = self.share().join("rsql-agent.deb");
        std::fs::copy(deb, &staged).expect("copy the .deb into the sandbox share");
        self.ok(&["dpkg", "-i", "/share/rsql-agent.deb"]);
    }

    /// Puts the host's file `host` at `path` inside, in place of what is there (a bind mount
    /// in the sandbox's mount namespace, so every unit started afterwards sees it). The file
    /// goes through the share, hard-linked when it can be (release binaries are large),
    /// copied otherwise.
    pub fn bind_file(&self, host: &Path, path: &str) {
        let name = format!("bind-{}", fastrand_name());
        let staged = self.share().join(&name);
        if std::fs::hard_link(host, &staged).is_err() {
            std::fs::copy(host, &staged)
                .unwrap_or_else(|e| panic!("copy {} into the sandbox share: {e}", host.display()));
        }
        self.ok(&["mount", "--bind", &format!("/share/{name}"), path]);
    }

    /// The sandbox's cgroup as the host sees it (its PID 1's `init.scope`, its slices and
    /// services are under it).
    pub fn cgroup(&self) -> PathBuf {
        let path = std::fs::read_to_string(self.dir.join("cgroup"))
            .expect("sandbox.sh boot wrote the sandbox's cgroup");
        PathBuf::from(path.trim())
    }

    /// Points the agent's AWS SDK at `endpoint` (`/etc/rsql-agent/environment`, which the
    /// agent's and the owners' units read) and installs `config` as
    /// `/etc/rsql-agent/agent.toml`, `root:rsql` 0640 as the package ships it.
    pub fn configure_agent(&self, endpoint: &str, config: &str) {
        let env: String = crate::moto::aws_env(endpoint)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        self.write("/etc/rsql-agent/environment", &env, 0o640);
        self.write("/etc/rsql-agent/agent.toml", config, 0o640);
        self.ok(&["chgrp", "rsql", "/etc/rsql-agent/agent.toml"]);
    }

    /// The journal of `unit` (all of it), as `journalctl -u UNIT` shows it.
    pub fn journal(&self, unit: &str) -> String {
        String::from_utf8_lossy(
            &self
                .exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
                .stdout,
        )
        .into_owned()
    }

    /// The whole journal (the agent, the owners, systemd), for a failure message.
    pub fn journal_all(&self) -> String {
        String::from_utf8_lossy(
            &self
                .exec(&["journalctl", "--no-pager", "-o", "short-precise"])
                .stdout,
        )
        .into_owned()
    }

    /// Waits until `systemctl is-active UNIT` says `active`.
    pub fn wait_active(&self, unit: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.exec(&["systemctl", "is-active", unit]);
            if String::from_utf8_lossy(&out.stdout).trim() == "active" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{unit} is not active after {timeout:?}: {}\n{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                self.journal(unit)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Powers the sandbox off the way a host shuts down (SIGRTMIN+4 to its systemd: every
    /// unit stopped in order) and waits for it. Returns what stop printed.
    pub fn power_off(&mut self) -> String {
        self.stopped = true;
        let out = Command::new("bash")
            .arg(script())
            .arg("stop")
            .env("SANDBOX_DIR", &self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run sandbox.sh stop");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !self.stopped {
            self.power_off();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn fastrand_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
