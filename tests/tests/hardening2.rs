//! Hardening, round 2 (issue 22): the state directory, adoption and the operator's tools
//! against another local user and against forged or oversize records, with real processes:
//! the real `rsql-agent` (check-config, run, drain) and its job owners, a throwaway local
//! user (`useradd`), a cgroup v2 directory of the test's own, and moto's executing state
//! machines.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rsql_agent_tests::agent::{process_alive, wait_until, write_script, Agent, AgentConfig};
use rsql_agent_tests::bins;
use rsql_agent_tests::cgroup::TestCgroup;
use rsql_agent_tests::host::TestUser;
use rsql_agent_tests::moto;
use rsql_agent_tests::world::{eventually_with, World, WAIT};
use serde_json::json;

/// moto, the job queue and an empty script directory.
async fn world() -> World {
    World::builder("hardening2").build().await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A directory of the test's own (mode 0755, so a test user can reach what is below it)
/// with a trusted script directory in it.
fn test_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o755);
    let scripts = dir.path().join("scripts");
    std::fs::create_dir(&scripts).expect("mkdir scripts");
    chmod(&scripts, 0o755);
    (dir, scripts)
}

/// `rsql-agent check-config` on `agent.toml` holding `body` after a `[jobs]` table naming
/// `scripts`.
fn check_config(dir: &Path, scripts: &Path, agent: &str, extra: &str) -> Output {
    let path = dir.join("agent.toml");
    let body = format!(
        "[agent]\n{agent}[jobs]\nscript_dir = \"{}\"\n{extra}",
        scripts.display()
    );
    std::fs::write(&path, body).expect("write config");
    chmod(&path, 0o600);
    Command::new(bins::agent())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("rsql-agent check-config")
}

fn refused(out: &Output, key: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}{}", text(&out.stdout));
    assert!(stderr.contains(key), "{stderr}");
}

/// Defects 3, 6 and 9b: a state directory another user can change (world-writable, or
/// owned by someone else), a world-writable lock directory and the cgroup v2 root as
/// `cgroup_parent` are refused, each naming its key; the retired `shutdown_grace` is
/// accepted with a "no longer used" warning.
#[test]
fn check_config_refuses_state_a_stranger_can_change_and_the_cgroup_root() {
    let user = TestUser::new();
    let (dir, scripts) = test_dir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir state");
    let state_key = format!("state_dir = \"{}\"\n", state.display());

    chmod(&state, 0o777);
    let out = check_config(dir.path(), &scripts, &state_key, "");
    refused(&out, "agent.state_dir");
    assert!(
        text(&out.stderr).contains("chmod o-w"),
        "{}",
        text(&out.stderr)
    );

    chmod(&state, 0o755);
    user.chown(&state);
    let out = check_config(dir.path(), &scripts, &state_key, "");
    refused(&out, "agent.state_dir");
    assert!(
        text(&out.stderr).contains(&format!("uid {}", user.uid)),
        "{}",
        text(&out.stderr)
    );
    nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(0)), None).expect("chown back");

    let locks = dir.path().join("locks");
    std::fs::create_dir(&locks).expect("mkdir locks");
    chmod(&locks, 0o777);
    let lock_key = format!("[lock]\ndir = \"{}\"\n", locks.display());
    refused(
        &check_config(dir.path(), &scripts, &state_key, &lock_key),
        "lock.dir",
    );
    chmod(&locks, 0o755);

    let cgroup = TestCgroup::new();
    let root = cgroup.path().parent().expect("the cgroup2 mount");
    let root_parent = format!("cgroup_parent = \"{}\"\n", root.display());
    refused(
        &check_config(dir.path(), &scripts, &state_key, &root_parent),
        "jobs.cgroup_parent",
    );

    let retired = format!("{state_key}shutdown_grace = \"2h\"\n");
    let out = check_config(dir.path(), &scripts, &retired, &lock_key);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("shutdown_grace is no longer used"),
        "{stdout}"
    );
}

/// Defect 3: `owner.lock` planted as a symlink (or a hard link) to another file: the agent
/// refuses to start and the file keeps its contents (it was opened following the link and
/// truncated).
#[tokio::test(flavor = "multi_thread")]
async fn a_planted_owner_lock_link_is_refused_and_its_target_kept() {
    let world = world().await;
    for kind in ["symlink", "hard link"] {
        let state = world
            .dir()
            .join(format!("state-{}", kind.replace(' ', "-")));
        std::fs::create_dir(&state).expect("mkdir state");
        chmod(&state, 0o755);
        let victim = world
            .dir()
            .join(format!("victim-{}", kind.replace(' ', "-")));
        std::fs::write(&victim, "precious contents\n").expect("write victim");
        if kind == "symlink" {
            std::os::unix::fs::symlink(&victim, state.join("owner.lock")).expect("symlink");
        } else {
            std::fs::hard_link(&victim, state.join("owner.lock")).expect("hard link");
        }
        let mut agent = world.agent(|c| c.state_dir = Some(state.clone()));
        let ended =
            |agent: &mut Agent| !agent.is_running() || agent.log().contains("rsql-agent started");
        wait_until("the agent to refuse or start", WAIT, || ended(&mut agent));
        let running = agent.is_running();
        let log = agent.log();
        agent.kill();
        assert!(
            !running,
            "the agent started on a planted owner.lock:\n{log}"
        );
        assert!(log.contains("not the agent's own lock file"), "{log}");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("read victim"),
            "precious contents\n",
            "{kind}"
        );
    }
}

/// A listener run as `user` on `socket` that records what it received in `got` and
/// answers as a drained agent would.
fn impostor(user: &TestUser, socket: &Path, got: &Path, ready: &Path) -> std::process::Child {
    let program = format!(
        "import socket\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.bind({socket:?})\n\
         s.listen(1)\n\
         open({ready:?}, 'w').close()\n\
         c, _ = s.accept()\n\
         c.settimeout(3)\n\
         data = b''\n\
         try:\n    data = c.recv(65536)\nexcept Exception:\n    pass\n\
         open({got:?}, 'wb').write(data)\n\
         c.sendall(b'{{\"ok\":true,\"draining\":true,\"running\":0,\"outbox\":0}}\\n')\n",
        socket = socket.display().to_string(),
        ready = ready.display().to_string(),
        got = got.display().to_string(),
    );
    user.command("/usr/bin/python3")
        .arg("-c")
        .arg(program)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 as the test user")
}

/// Defect 3: `drain` believed whoever answered on `state_dir/agent.sock`. A listener of
/// another user gets nothing, and drain says who it is and exits 69.
#[test]
fn drain_sends_nothing_to_a_listener_of_another_user() {
    let user = TestUser::new();
    let (dir, scripts) = test_dir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir state");
    chmod(&state, 0o755);
    let own = dir.path().join("theirs");
    std::fs::create_dir(&own).expect("mkdir");
    user.chown(&own);
    let (bound, got, ready) = (own.join("s"), own.join("got"), own.join("ready"));
    let mut fake = impostor(&user, &bound, &got, &ready);
    wait_until("the impostor listens", WAIT, || ready.exists());
    // Where it would be had the state directory been open to it (the round-1 setup).
    std::fs::rename(&bound, state.join("agent.sock")).expect("move the socket");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstate_dir = \"{}\"\n[jobs]\nscript_dir = \"{}\"\n",
            state.display(),
            scripts.display()
        ),
    )
    .expect("write config");
    chmod(&config, 0o600);
    let out = Command::new(bins::agent())
        .args(["drain", "--config"])
        .arg(&config)
        .env_remove("RSQL_AGENT_USER")
        .output()
        .expect("rsql-agent drain");
    let _ = fake.kill();
    let _ = fake.wait();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}{}", text(&out.stdout));
    assert!(stderr.contains(&format!("uid {}", user.uid)), "{stderr}");
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    let received = std::fs::read(&got).unwrap_or_default();
    assert!(
        received.is_empty(),
        "the impostor got {:?}",
        text(&received)
    );
}

/// The agent's peak resident memory, in MiB (`VmHWM`).
fn peak_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb / 1024
}

/// One caught job task running `job`; returns the execution's ARN.
async fn start_job(world: &World, job: &str) -> String {
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_id": "hardening2",
        "workflow_execution_id.$": "$.execution_id",
        "job_name": job,
        "timeout_seconds": 300,
        "heartbeat_seconds": 60
    });
    let mut task = world.job_task(body, 60);
    task.catch = true;
    let sm = world.create_state_machine("h2", &task).await;
    world
        .start_execution(&sm, json!({ "execution_id": moto::unique_name("h2") }))
        .await
}

/// Starts a long job, waits until its owner runs, then SIGKILLs the agent and returns the
/// job's owner directory (`state_dir/owners/<job id>`).
async fn job_left_by_a_killed_agent(world: &World, agent: &mut Agent) -> (String, PathBuf) {
    let started = world.scripts.join("long.started");
    write_script(
        &world.scripts,
        "long.sh",
        &format!("touch {}\nsleep 300", started.display()),
    );
    let exec = start_job(world, "long.sh").await;
    let owners = agent.state_dir.join("owners");
    let owner_dir = eventually_with("the job to run under its owner", WAIT, || {
        let found = std::fs::read_dir(&owners).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.join("owner.json").exists())
        });
        let log = agent.log();
        let started = started.exists();
        async move {
            match found {
                Some(dir) if started => Ok(dir),
                _ => Err(log),
            }
        }
    })
    .await;
    agent.kill();
    (exec, owner_dir)
}

/// Defect 5: `owner.json` names a "cgroup" that is a plain directory whose `cgroup.procs`
/// lists an unrelated process. The restarted agent reports the dead owner's job and kills
/// the job's own processes, but not that process (it was SIGKILLed).
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_cgroup_in_an_owner_record_kills_nobody_else() {
    let world = world().await;
    let mut agent = world.agent(|_| {});
    let (exec, owner_dir) = job_left_by_a_killed_agent(&world, &mut agent).await;
    let mut bystander = Command::new("sleep").arg("300").spawn().expect("sleep");
    let fake = world.dir().join("fake-cgroup").join("payload");
    std::fs::create_dir_all(&fake).expect("mkdir");
    std::fs::write(fake.join("cgroup.procs"), format!("{}\n", bystander.id())).expect("write");
    let record = owner_dir.join("owner.json");
    let mut owner: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("owner.json")).expect("json");
    owner["cgroup"] = json!(fake);
    std::fs::write(&record, owner.to_string()).expect("forge owner.json");
    assert_eq!(agent.kill_owners(), 1, "the job's owner");
    agent.restart();
    let out = world.wait_execution(&exec).await;
    let (error, cause) = moto::caught_error(&out);
    let alive = process_alive(bystander.id() as i32);
    let _ = bystander.kill();
    let _ = bystander.wait();
    let log = agent.log();
    assert_eq!(error, "Rsql.Interrupted", "{cause}\n{log}");
    assert!(
        alive,
        "the agent killed a process a forged record named:\n{log}"
    );
    assert!(log.contains("not a cgroup v2 directory"), "{log}");
}

/// Defect 5: a 200 MiB exit record took the agent to 428 MiB, and a 384 MiB line on the
/// control socket to 413 MiB. Both are refused unread past their cap, and the agent stays
/// small.
#[tokio::test(flavor = "multi_thread")]
async fn oversize_records_and_requests_are_refused_without_taking_memory() {
    let world = world().await;
    let mut agent = world.agent(|_| {});
    let (_exec, owner_dir) = job_left_by_a_killed_agent(&world, &mut agent).await;
    agent.kill_owners();
    let exit = std::fs::File::create(owner_dir.join("exit.json")).expect("exit.json");
    exit.set_len(200 << 20).expect("a 200 MiB exit record");
    agent.restart();
    agent.wait_for_log("larger than", WAIT);

    let socket = agent.state_dir.join("agent.sock");
    wait_until("the control socket", WAIT, || socket.exists());
    let mut stream = UnixStream::connect(&socket).expect("connect to agent.sock");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let chunk = vec![b'x'; 1 << 20];
    // The agent closes the connection after its cap: a write then fails, which is the point.
    for _ in 0..256 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    assert!(reply.contains("too long"), "{reply:?}\n{}", agent.log());
    let peak = peak_mib(agent.pid());
    assert!(agent.is_running(), "{}", agent.log());
    agent.kill();
    assert!(peak < 150, "the agent's peak memory was {peak} MiB");
}

/// Defect 6: the owner's clean-up of old empty cgroups under `cgroup_parent` removed one
/// root made there for something else. Now it removes only a leftover marked as a job's.
#[tokio::test(flavor = "multi_thread")]
async fn cgroup_cleanup_removes_only_the_agents_own_leftovers() {
    let world = world().await;
    let parent = TestCgroup::new();
    let foreign = [
        parent.path().join("backup"),
        parent.path().join("0123abcd-0123abcd1"),
    ];
    let leftover = parent.path().join("feedf00d-feedf00d1");
    for dir in foreign.iter().chain([&leftover]) {
        std::fs::create_dir(dir).expect("mkdir cgroup");
    }
    // Made by an earlier owner: marked with its own name. Then all three are 5 min old.
    let setup = format!(
        "import os, time\n\
         os.setxattr({leftover:?}, 'user.rsql-agent.job', b'feedf00d-feedf00d1')\n\
         old = time.time() - 300\n\
         for p in [{a:?}, {b:?}, {leftover:?}]:\n    os.utime(p, (old, old))\n",
        leftover = leftover.display().to_string(),
        a = foreign[0].display().to_string(),
        b = foreign[1].display().to_string(),
    );
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(setup)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", text(&out.stderr));
    write_script(&world.scripts, "ok.sh", "echo ok");
    let mut config = AgentConfig::new(&world.queue_url, &world.scripts);
    config.jobs_extra = format!("cgroup_parent = \"{}\"\n", parent.path().display());
    let agent = Agent::start(config, &world.moto.endpoint());
    let exec = start_job(&world, "ok.sh").await;
    let out = world.wait_execution(&exec).await;
    let output = moto::execution_output(&out);
    assert_eq!(output["status"], "completed", "{output}\n{}", agent.log());
    for dir in &foreign {
        assert!(
            dir.exists(),
            "{} was removed:\n{}",
            dir.display(),
            agent.log()
        );
    }
    assert!(
        !leftover.exists(),
        "the marked leftover stays:\n{}",
        agent.log()
    );
}
