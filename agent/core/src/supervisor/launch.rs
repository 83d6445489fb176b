//! What a job is started as: its program and arguments, its environment, its process
//! group, and (between fork and exec) its cgroup, its user and no capabilities.

use std::io::{self, Read as _};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{SigHandler, Signal};
use nix::unistd::AccessFlags;

use super::{procs, JobUser, DEFAULT_PATH, INHERITED_ENV, JOB_ID_ENV, SUPERVISOR_ENV};
use crate::cgroup::Payload;
use crate::joblog::JobLog;

/// Everything needed to start one job.
///
/// Its `Debug` output names the environment variables but never shows their values (the
/// database password is one of them).
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// Added after [`INHERITED_ENV`]; later entries win. Values are never logged.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub kill_grace: Duration,
    /// How long to keep reading the pipes after the leader exits ([`DEFAULT_PIPE_DRAIN`]).
    pub pipe_drain: Duration,
    pub log: JobLog,
    /// Unique per attempt; becomes the [`JOB_ID_ENV`] marker.
    pub job_id: String,
    /// A descriptor every process of the job inherits (its lock, from the job's owner
    /// process), so the lock lives exactly as long as any process of the job; see
    /// `job_owner`. `None`: nothing is inherited.
    pub inherit_fd: Option<std::os::fd::RawFd>,
    /// The job's own cgroup (see `cgroup`), set up by the job's owner process: the job
    /// starts in it, ends when it is empty, and is killed through it. `None`: the process
    /// group and marker sweep only.
    pub cgroup: Option<Payload>,
    /// The unprivileged user the job runs as (see [`user`]); `None`: this process's own.
    pub user: Option<JobUser>,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("Launch")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("cwd", &self.cwd)
            .field("env_names", &env_names)
            .field("timeout", &self.timeout)
            .field("kill_grace", &self.kill_grace)
            .field("pipe_drain", &self.pipe_drain)
            .field("log", &self.log)
            .field("job_id", &self.job_id)
            .field("inherit_fd", &self.inherit_fd)
            .field("cgroup", &self.cgroup.as_ref().map(Payload::path))
            .finish()
    }
}

/// The program and leading arguments that run `script`: the script itself when it is an
/// executable file that the kernel can run (a `#!` line or an ELF binary), so its shebang
/// picks the interpreter; otherwise `interpreter script`. Job arguments go after these.
pub fn command_for_script(script: &Path, interpreter: &Path) -> (PathBuf, Vec<String>) {
    if runs_directly(script) {
        (script.to_path_buf(), Vec::new())
    } else {
        (
            interpreter.to_path_buf(),
            vec![script.to_string_lossy().into_owned()],
        )
    }
}

pub(super) fn runs_directly(script: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(script) else {
        return false;
    };
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return false;
    }
    if nix::unistd::access(script, AccessFlags::X_OK).is_err() {
        return false;
    }
    // An executable text file without `#!` makes execve fail with ENOEXEC (only shells
    // fall back to running it themselves), so such a file goes through the interpreter.
    let mut head = [0u8; 4];
    let Ok(mut file) = std::fs::File::open(script) else {
        return false;
    };
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    head[..filled].starts_with(b"#!") || head[..filled].starts_with(b"\x7fELF")
}

pub(super) fn build_command(launch: &Launch) -> std::process::Command {
    let mut command = std::process::Command::new(&launch.program);
    command
        .args(&launch.args)
        .current_dir(&launch.cwd)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for name in INHERITED_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    if std::env::var_os("PATH").is_none() {
        command.env("PATH", DEFAULT_PATH);
    }
    if let Some(user) = &launch.user {
        command
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    for (name, value) in &launch.env {
        command.env(name, value);
    }
    // Last, so a job's own env cannot override the markers the sweeps rely on.
    command.env(JOB_ID_ENV, &launch.job_id);
    command.env(SUPERVISOR_ENV, procs::supervisor_identity());

    let agent_pid = std::process::id() as i32;
    let inherit_fd = launch.inherit_fd;
    let cgroup_procs = launch.cgroup.as_ref().map(Payload::procs_fd);
    // Allocated here, before the fork: the child only reads it.
    let run_as = launch
        .user
        .as_ref()
        .map(|u| (u.uid, u.gid, u.groups.clone()));
    let child_setup = move || -> io::Result<()> {
        // Runs in the forked child before exec: only async-signal-safe calls (prctl,
        // getppid, sigaction, the set*id calls) and no allocation.
        if let Some(fd) = cgroup_procs {
            // Into the job's cgroup before exec, so not one instruction of the job runs
            // outside it (what CLONE_INTO_CGROUP does at the clone, which std's Command
            // cannot ask for). `0` means the writing process. Before the drop to the job's
            // user: the cgroup belongs to the owner, and the job may not move itself.
            // SAFETY: write(2) of a static one-byte buffer to a descriptor the parent keeps
            // open until the spawn returns; async-signal-safe, no allocation.
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some((uid, gid, groups)) = &run_as {
            drop_to_user(*uid, *gid, groups)?;
        }
        // After the drop: a change of credentials clears the parent-death signal.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
        // If the agent died between fork and prctl the signal will never come; give up.
        if nix::unistd::getppid().as_raw() != agent_pid {
            return Err(io::Error::from(Errno::ESRCH));
        }
        // Ignored signals survive exec. An agent started under nohup (as the legacy trigger
        // was) or by a shell that ignored SIGINT must not hand that on to its jobs, or
        // SIGTERM would not work as the first stop step.
        for signal in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ] {
            // SAFETY: setting the default disposition installs no handler, and sigaction is
            // async-signal-safe, so this is sound between fork and exec.
            unsafe { nix::sys::signal::signal(signal, SigHandler::SigDfl) }
                .map_err(io::Error::from)?;
        }
        if let Some(fd) = inherit_fd {
            // Clears close-on-exec in this child's descriptor table only (fcntl is
            // async-signal-safe); the owner's own descriptor is untouched.
            // SAFETY: fcntl on an integer descriptor touches no Rust-owned memory.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid,
    // sigaction, fcntl, write, setgroups/setgid/setuid) and does not allocate or take locks,
    // which is what pre_exec requires of code running between fork and exec in a
    // multi-threaded process.
    unsafe {
        command.pre_exec(child_setup);
    }
    command
}

/// `_LINUX_CAPABILITY_VERSION_3` of `<linux/capability.h>`: two 32-bit words per set.
pub(super) const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
pub(super) struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// In the forked child: supplementary groups, gid, then uid of the job's user, then no
/// capabilities at all (ambient, effective, permitted, inheritable). From a non-root owner
/// the kernel keeps all of them across a setuid to another non-root uid, so they are
/// cleared here; with none left and `no_new_privs` (the owner unit's `NoNewPrivileges=yes`),
/// no program the job runs gets any back.
pub(super) fn drop_to_user(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    // SAFETY: setgroups/setgid/setuid/prctl are plain system calls here (a forked child has
    // one thread, so glibc's all-threads set*id broadcast has nobody else to reach); the
    // group list was allocated before the fork and is only read.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) == -1 {
            return Err(io::Error::last_os_error());
        }
        if libc::setgid(gid) == -1 {
            return Err(io::Error::last_os_error());
        }
        if libc::setuid(uid) == -1 {
            return Err(io::Error::last_os_error());
        }
        // EINVAL on kernels before 4.3, which have no ambient set to clear.
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        );
        // A setuid between two non-root uids keeps the permitted, effective and inheritable
        // sets: empty them, or a file-capability program could get them back at exec.
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        if libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        ) == -1
        {
            return Err(io::Error::last_os_error());
        }
    }
    if nix::unistd::getuid().as_raw() != uid || nix::unistd::geteuid().as_raw() != uid {
        return Err(io::Error::from(Errno::EPERM));
    }
    Ok(())
}

/// Says which file an exec error is about when the program itself exists: ENOENT or EACCES
/// for an existing script means the interpreter its `#!` line names is missing or not
/// executable, which the bare OS error ("No such file or directory") hides.
pub fn spawn_detail(program: &Path, error: &io::Error) -> String {
    let errno = error.raw_os_error();
    if !matches!(
        errno,
        Some(libc::ENOENT) | Some(libc::EACCES) | Some(libc::ENOEXEC)
    ) {
        return String::new();
    }
    if !program.exists() {
        return format!(": {} does not exist", program.display());
    }
    let Some(interpreter) = shebang_interpreter(program) else {
        return String::new();
    };
    let problem = match std::fs::metadata(&interpreter) {
        Err(e) => format!("cannot be used: {e}"),
        Ok(meta) if !meta.is_file() => "is not a file".to_string(),
        Ok(_) => "is not executable".to_string(),
    };
    format!(
        ": its interpreter {} (named on its #! line) {problem}",
        interpreter.display()
    )
}

/// The interpreter a script's `#!` line names, if it has one.
pub(super) fn shebang_interpreter(script: &Path) -> Option<PathBuf> {
    let mut head = [0u8; 256];
    let n = std::fs::File::open(script).ok()?.read(&mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = line.split(|b| *b == b'\n').next()?;
    let text = String::from_utf8_lossy(line);
    text.split_whitespace().next().map(PathBuf::from)
}
