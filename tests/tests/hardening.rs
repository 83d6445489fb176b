//! The operator side under attack and under damage, with real processes: a throwaway local
//! user (`useradd`) for what another user on the host can do, small tmpfs mounts for a full
//! disk, the real `rsql-agent`, `rsql-wrapper` and moto's executing state machines.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use rsql_agent_tests::agent::{wait_until, write_script, Agent, AgentConfig};
use rsql_agent_tests::bins;
use rsql_agent_tests::host::{TestUser, Tmpfs};
use rsql_agent_tests::moto;
use rsql_agent_tests::world::{self, World, WAIT};
use serde_json::{json, Value};

const PASSWORD: &str = "s3cr3t-Hunter2-pw";

/// moto, the job queue and an empty script directory.
async fn world() -> World {
    World::builder("hardening").build().await
}

/// Runs `job` through a state machine to its end; returns the execution's output.
async fn run_job(world: &World, execution_id: &str, job: &str) -> Value {
    run_job_with(world, execution_id, job, json!({})).await
}

/// [`run_job`] with `extra` fields in the job message.
async fn run_job_with(world: &World, execution_id: &str, job: &str, extra: Value) -> Value {
    let mut body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_id": "hardening",
        "workflow_execution_id.$": "$.execution_id",
        "job_name.$": "$.job_name",
        "timeout_seconds": 300,
        "heartbeat_seconds": 60
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let task = moto::JobTask::new(&world.queue_url, body, 60);
    let sm = moto::create_state_machine(
        &world.sdk,
        &moto::unique_name("hardening"),
        &task.definition(),
    )
    .await;
    let input = json!({"execution_id": execution_id, "job_name": job});
    let exec = moto::start_execution(&world.sdk, &sm, &input.to_string()).await;
    let out = world.wait_execution(&exec).await;
    moto::execution_output(&out)
}

async fn audit_json(world: &World, table: &str, job: &str, execution_id: &str) -> Value {
    let item = world::audit_item(&world.sdk, table, job, execution_id)
        .await
        .unwrap_or_default();
    let mut out = serde_json::Map::new();
    for (k, v) in item {
        let value = match v {
            AttributeValue::S(s) => json!(s),
            AttributeValue::N(n) => json!(n),
            AttributeValue::Bool(b) => json!(b),
            other => json!(format!("{other:?}")),
        };
        out.insert(k, value);
    }
    Value::Object(out)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn check_config(path: &Path) -> Output {
    Command::new(bins::agent())
        .arg("check-config")
        .arg(path)
        .output()
        .expect("rsql-agent check-config")
}

/// A config file with `[jobs] script_dir` and `body` appended; mode 0600.
fn config_file(dir: &Path, scripts: &Path, body: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nstate_dir = \"{state}\"\n[jobs]\nscript_dir = \"{}\"\n{body}",
            scripts.display(),
            state = dir.join("state").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn refused(out: &Output, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "stderr: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }
}

fn scripts_dir(root: &Path) -> PathBuf {
    let scripts = root.join("scripts");
    std::fs::create_dir(&scripts).unwrap();
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755)).unwrap();
    write_script(&scripts, "ok.sh", "echo ok");
    scripts
}

#[test]
fn check_config_refuses_relative_paths_bad_durations_a_missing_interpreter_and_proc() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = scripts_dir(dir.path());
    let cases: [(&str, &[&str]); 6] = [
        (
            "log_dir = \"logs/jobs\"\n",
            &["jobs.log_dir", "must be absolute", "agent.toml"],
        ),
        (
            "interpreter = \"/nonexistent/bin/bash\"\n",
            &["jobs.interpreter", "/nonexistent/bin/bash"],
        ),
        (
            "heartbeat_interval = \"1000y\"\n",
            &["jobs.heartbeat_interval", "expire"],
        ),
        (
            "log_dir = \"/proc/rsql-agent\"\n",
            &["jobs.log_dir", "pseudo filesystem"],
        ),
        (
            "[lock]\nretention = \"0s\"\n",
            &["lock.retention", "redelivery"],
        ),
        (
            "[database]\nhost = \"h\"\npassword = hunter2-unquoted\n",
            &["line", "not shown"],
        ),
    ];
    for (body, needles) in cases {
        let file = config_file(dir.path(), &scripts, body);
        let out = check_config(&file);
        refused(&out, needles);
        assert!(
            !text(&out.stderr).contains("hunter2"),
            "a secret reached the output: {}",
            text(&out.stderr)
        );
    }
    // And the same file with sane values passes.
    let file = config_file(dir.path(), &scripts, "heartbeat_interval = \"20s\"\n");
    let out = check_config(&file);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn check_config_refuses_scripts_another_user_can_change_and_says_how_to_fix_it() {
    let user = TestUser::new();
    let dir = tempfile::tempdir().unwrap();
    let scripts = scripts_dir(dir.path());
    let file = config_file(dir.path(), &scripts, "");
    let ok = scripts.join("ok.sh");

    // A script the other user owns: they can rewrite it.
    user.chown(&ok);
    refused(
        &check_config(&file),
        &[
            "jobs.script_dir",
            ok.to_str().unwrap(),
            &format!("uid {}", user.uid),
            "chown",
        ],
    );
    nix::unistd::chown(&ok, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();

    // A script anyone can write (0777): the planted `id > PWNED` case.
    std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused(&check_config(&file), &[ok.to_str().unwrap(), "chmod o-w"]);
    std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o755)).unwrap();

    // A world-writable subdirectory, and a sticky world-writable script_dir.
    let sub = scripts.join("etl");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused(
        &check_config(&file),
        &[sub.to_str().unwrap(), "writable by every user"],
    );
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o1777)).unwrap();
    refused(
        &check_config(&file),
        &[scripts.to_str().unwrap(), "chmod o-w"],
    );
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755)).unwrap();

    // A POSIX ACL that lets the other user write the directory: its mode then reads 775 with
    // group root, which the group rule alone would let through.
    let setfacl = std::process::Command::new("setfacl")
        .args(["-m", &format!("u:{}:rwx", user.uid)])
        .arg(&scripts)
        .output()
        .expect("setfacl (Debian package acl; .ci/install-deps installs it)");
    assert!(setfacl.status.success(), "{}", text(&setfacl.stderr));
    refused(
        &check_config(&file),
        &[scripts.to_str().unwrap(), "POSIX ACL", "setfacl -b"],
    );
    let cleared = std::process::Command::new("setfacl")
        .arg("-b")
        .arg(&scripts)
        .status()
        .expect("setfacl -b");
    assert!(cleared.success());
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755)).unwrap();

    let out = check_config(&file);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_another_user_took_over_after_start_is_refused_as_invalid_job() {
    let world = world().await;
    let user = TestUser::new();
    let ran = world.scripts.join("ran");
    write_script(
        &world.scripts,
        "job.sh",
        &format!("echo ran > {}", ran.display()),
    );
    let agent = Agent::start(world.config(), &world.moto.endpoint());
    agent.wait_for_log("receiving jobs", WAIT);
    // Checked at start; now another user takes the script over.
    user.chown(&world.scripts.join("job.sh"));
    let out = run_job(&world, "takeover_1", "job.sh").await;
    assert_eq!(
        out["error"]["Error"],
        "Rsql.InvalidJob",
        "{out}\n{}",
        agent.log()
    );
    let cause = out["error"]["Cause"].as_str().unwrap_or_default();
    assert!(cause.contains("job.sh"), "{cause}");
    assert!(cause.contains(&format!("uid {}", user.uid)), "{cause}");
    assert!(!ran.exists(), "the taken-over script ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_arguments_naming_a_directory_another_user_owns_are_refused() {
    let world = world().await;
    let user = TestUser::new();
    let ran = world.scripts.join("planted-ran");
    // An old-framework script: it sources code from its first argument.
    write_script(
        &world.scripts,
        "legacy.sh",
        "source $1/get_redshift_creds.sh $2\necho legacy ran",
    );
    // Another user's directory, with their own get_redshift_creds.sh in it.
    let planted = tempfile::tempdir().unwrap();
    std::fs::set_permissions(planted.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        planted.path().join("get_redshift_creds.sh"),
        format!("echo planted > {}\n", ran.display()),
    )
    .unwrap();
    user.chown(&planted.path().join("get_redshift_creds.sh"));
    user.chown(planted.path());
    let agent = Agent::start(world.config(), &world.moto.endpoint());
    agent.wait_for_log("receiving jobs", WAIT);
    let out = run_job_with(
        &world,
        "planted_1",
        "legacy.sh",
        json!({"legacy_args": [planted.path().display().to_string(), "secret"]}),
    )
    .await;
    assert_eq!(
        out["error"]["Error"],
        "Rsql.InvalidJob",
        "{out}\n{}",
        agent.log()
    );
    let cause = out["error"]["Cause"].as_str().unwrap_or_default();
    assert!(cause.contains("instance_code_dir"), "{cause}");
    assert!(cause.contains(&format!("uid {}", user.uid)), "{cause}");
    assert!(!ran.exists(), "the planted code ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_refuses_a_socket_directory_another_user_can_write() {
    let world = world().await;
    let user = TestUser::new();
    let run = tempfile::tempdir().unwrap();
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cases = [("open", 0o777, false), ("owned", 0o755, true)];
    for (name, mode, owned_by_user) in cases {
        let dir = run.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        if owned_by_user {
            user.chown(&dir);
        }
        let mut config = world.config();
        config.extra.push_str(&format!(
            "[intake.socket]\npath = \"{}/agent.sock\"\n",
            dir.display()
        ));
        let mut agent = Agent::start(config, &world.moto.endpoint());
        let status = agent.wait_exit(WAIT);
        assert!(!status.success(), "{}", agent.log());
        let log = agent.log();
        assert!(log.contains(dir.to_str().unwrap()), "{log}");
        assert!(log.contains("listen in the agent's place"), "{log}");
        assert!(!dir.join("agent.sock").exists());
    }
}

/// A fake agent: listens on `socket` as `user`, records what it received in `got`, answers
/// "accepted".
fn impostor(user: &TestUser, socket: &Path, got: &Path) -> std::process::Child {
    let program = format!(
        "import socket, os\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.bind({socket:?})\n\
         s.listen(1)\n\
         open({ready:?}, 'w').close()\n\
         c, _ = s.accept()\n\
         c.settimeout(3)\n\
         data = b''\n\
         try:\n    data = c.recv(65536)\nexcept Exception:\n    pass\n\
         open({got:?}, 'wb').write(data)\n\
         c.sendall(b'{{\"accepted\":true,\"job_name\":\"x\",\"token_hash\":\"y\"}}\\n')\n",
        socket = socket.display().to_string(),
        ready = format!("{}.ready", socket.display()),
        got = got.display().to_string(),
    );
    user.command("/usr/bin/python3")
        .arg("-c")
        .arg(program)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 as the test user")
}

#[test]
fn submit_sends_nothing_to_a_listener_that_is_not_the_agent() {
    let user = TestUser::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let hijacked = dir.path().join("run");
    std::fs::create_dir(&hijacked).unwrap();
    user.chown(&hijacked);
    let socket = hijacked.join("agent.sock");
    let got = hijacked.join("got");
    let mut fake = impostor(&user, &socket, &got);
    wait_until("the impostor listens", WAIT, || {
        PathBuf::from(format!("{}.ready", socket.display())).exists()
    });
    let out = Command::new(bins::wrapper())
        .args([
            "submit",
            "--task-token",
            "secret-task-token-AAAA",
            "--workflow-id",
            "w",
            "--workflow-execution-id",
            "e",
            "--job-name",
            "ok.sh",
            "--socket",
            socket.to_str().unwrap(),
        ])
        .output()
        .expect("rsql-wrapper submit");
    wait_until("the impostor's connection ends", WAIT, || got.exists());
    let _ = fake.kill();
    let _ = fake.wait();
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(69),
        "stdout {} stderr {stderr}",
        text(&out.stdout)
    );
    assert!(stderr.contains(&format!("uid {}", user.uid)), "{stderr}");
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    let received = std::fs::read(&got).unwrap();
    assert!(
        received.is_empty(),
        "the impostor got {:?}",
        text(&received)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listed_uid_outside_the_agents_group_can_submit() {
    let world = world().await;
    let user = TestUser::new();
    write_script(&world.scripts, "ok.sh", "echo ok");
    let run = tempfile::tempdir().unwrap();
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = run.path().join("run").join("agent.sock");
    // A socket-only agent: the state machine's message goes to the queue, the test takes the
    // token from there and submits it as the listed user.
    let mut config = AgentConfig::new("", &world.scripts);
    config.extra.push_str(&format!(
        "[intake.socket]\npath = \"{}\"\nallowed_uids = [{}]\n",
        socket.display(),
        user.uid
    ));
    let agent = Agent::start(config, &world.moto.endpoint());
    wait_until("the agent's socket", WAIT, || socket.exists());
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_execution_id.$": "$.execution_id"
    });
    let task = moto::JobTask::new(&world.queue_url, body, 60);
    let sm =
        moto::create_state_machine(&world.sdk, &moto::unique_name("uid"), &task.definition()).await;
    let exec = moto::start_execution(
        &world.sdk,
        &sm,
        &json!({"execution_id": "uid_1"}).to_string(),
    )
    .await;
    let message = moto::receive_one(&world.sdk, &world.queue_url, WAIT).await;
    let sent: Value = serde_json::from_str(message.body().unwrap()).unwrap();
    let token = sent["task_token"].as_str().unwrap().to_string();
    let out = user
        .command(bins::wrapper())
        .args([
            "submit",
            "--task-token",
            &token,
            "--workflow-id",
            "w",
            "--workflow-execution-id",
            "uid_1",
            "--job-name",
            "ok.sh",
            "--socket",
            socket.to_str().unwrap(),
        ])
        .output()
        .expect("rsql-wrapper as the listed user");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {} stderr {}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        agent.log()
    );
    let done = world.wait_execution(&exec).await;
    let output = moto::execution_output(&done);
    assert_eq!(output["status"], "completed", "{output}");
}

/// A connection that never waits: `None` when the listener's backlog is full.
fn connect_nonblocking(path: &Path) -> Option<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    let addr = UnixAddr::new(path).ok()?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).ok()?;
    Some(UnixStream::from(fd))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_idle_socket_connections_does_not_stop_sqs_jobs() {
    let world = world().await;
    write_script(&world.scripts, "ok.sh", "echo ok");
    let run = tempfile::tempdir().unwrap();
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = run.path().join("agent.sock");
    let mut config = world.config();
    config.open_files = Some(256);
    config.extra.push_str(&format!(
        "[intake.socket]\npath = \"{}\"\n",
        socket.display()
    ));
    let agent = Agent::start(config, &world.moto.endpoint());
    wait_until("the agent's socket", WAIT, || socket.exists());
    // This test process needs the fds for the flood itself.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        hard.min(4096),
        hard,
    )
    .expect("raise the test's own fd limit");
    // Idle connections, held open, re-opened as the agent closes them, while a job runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut held: Vec<UnixStream> = Vec::new();
            let mut refused_busy = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                held.retain(|c| {
                    let mut buf = [0u8; 256];
                    match (&*c).read(&mut buf) {
                        Ok(0) => false,
                        Ok(n) => {
                            if String::from_utf8_lossy(&buf[..n]).contains("busy") {
                                refused_busy += 1;
                            }
                            false
                        }
                        Err(_) => true,
                    }
                });
                while held.len() < 1000 {
                    match connect_nonblocking(&socket) {
                        Some(c) => held.push(c),
                        None => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            refused_busy
        })
    };
    let out = run_job(&world, "flood_1", "ok.sh").await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let busy = flooder.join().expect("flooder");
    assert_eq!(out["status"], "completed", "{out}\n{}", agent.log());
    assert!(busy > 0, "no connection was refused as busy");
    // And a real submission gets through once the flood is over.
    let mut c = UnixStream::connect(&socket).expect("connect after the flood");
    c.write_all(b"{}\n").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("\"accepted\":false"), "{reply}");
    assert!(!reply.contains("busy"), "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_masked_everywhere_but_the_jobs_own_log() {
    let world = world().await;
    let table = moto::unique_name("rsql-job-audit");
    moto::create_job_audit_table(&world.sdk, &table).await;
    write_script(
        &world.scripts,
        "leak.sh",
        "echo \"connecting with $RSPASSWORD\"\necho \"ERROR: bad password $RSPASSWORD\" >&2\nexit 3",
    );
    let mut config = world.config();
    config.job_table = Some(table.clone());
    config.extra.push_str(&format!(
        "[database]\nhost = \"localhost\"\nuser = \"etl\"\ndbname = \"dev\"\npassword = \"{PASSWORD}\"\n"
    ));
    // Trace everything: the SDK's own dumps of requests and responses included.
    config.env.push(("RSQL_AGENT_LOG".into(), "trace".into()));
    let agent = Agent::start(config, &world.moto.endpoint());
    let out = run_job(&world, "leak_1", "leak.sh").await;
    assert_eq!(out["error"]["Error"], "Rsql.ScriptFailed", "{out}");
    let cause = out["error"]["Cause"].as_str().unwrap_or_default();
    assert!(!cause.contains(PASSWORD), "{cause}");
    assert!(cause.contains("***"), "{cause}");
    let item = wait_for(|| {
        let item = futures_block(audit_json(&world, &table, "leak.sh", "leak_1"));
        (item["execution_status"] == "failed").then_some(item)
    });
    let message = item["error_message"].as_str().unwrap_or_default();
    assert!(
        message.contains("***") && !message.contains(PASSWORD),
        "{item}"
    );
    let local = agent.local_audit();
    assert!(!local.is_empty());
    assert!(!format!("{local:?}").contains(PASSWORD), "{local:?}");
    for entry in rsql_agent_tests::agent::files_under(&agent.lock_dir) {
        let content = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !text(&content).contains(PASSWORD),
            "{} holds the password",
            entry.display()
        );
    }
    let log = agent.log();
    assert!(!log.contains(PASSWORD), "the agent log holds the password");
    // The SDK's request dumps would carry the whole message body, token included.
    assert!(log.contains("TRACE"), "not at trace level");
    for line in log.lines() {
        assert!(
            !line.contains("taskToken") && !line.contains("task_token\\\":"),
            "an SDK body reached the log: {line}"
        );
    }
    // The job's own log is the script's output, kept as it printed it.
    let job_log = rsql_agent_tests::agent::files_under(&agent.state_dir.join("jobs"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("the job log");
    assert!(text(&std::fs::read(job_log).unwrap()).contains(PASSWORD));
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let mut found = None;
    wait_until("the condition", WAIT, || {
        found = f();
        found.is_some()
    });
    found.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_log_hit_a_full_disk_says_its_log_is_incomplete() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("jobs")).unwrap();
    // The job log directory (`state/jobs`) is a 1 MiB disk; the rest of the state is not.
    let disk = Tmpfs::at(&state.join("jobs"), "1m");
    // 4 MiB of output into a 1 MiB log directory; then exit 0 or 5.
    write_script(
        &world.scripts,
        "big.sh",
        "head -c 4194304 /dev/zero | tr '\\0' 'x' | fold -w 1000\nexit \"${1:-0}\"",
    );
    write_script(
        &world.scripts,
        "bigfail.sh",
        &format!("{}/big.sh 5", world.scripts.display()),
    );
    let mut config = world.config();
    config.state_dir = Some(state.clone());
    let table = moto::unique_name("rsql-job-audit");
    moto::create_job_audit_table(&world.sdk, &table).await;
    config.job_table = Some(table.clone());
    let agent = Agent::start(config, &world.moto.endpoint());
    let out = run_job(&world, "full_1", "big.sh").await;
    assert_eq!(out["status"], "completed", "{out}\n{}", agent.log());
    assert_eq!(out["log_complete"], false, "{out}");
    let item = wait_for(|| {
        let item = futures_block(audit_json(&world, &table, "big.sh", "full_1"));
        (item["execution_status"] == "completed").then_some(item)
    });
    assert_eq!(item["log_complete"], false, "{item}");
    let local = agent.local_audit();
    assert!(
        local
            .iter()
            .any(|r| r["job_name"] == "big.sh" && r["log_complete"] == false),
        "{local:?}"
    );
    // Free the disk for the second job's log file to open, then fill it again.
    for f in rsql_agent_tests::agent::files_under(&disk.path()) {
        let _ = std::fs::remove_file(f);
    }
    let out = run_job(&world, "full_2", "bigfail.sh").await;
    assert_eq!(out["error"]["Error"], "Rsql.ScriptFailed", "{out}");
    let cause: Value =
        serde_json::from_str(out["error"]["Cause"].as_str().unwrap_or("{}")).unwrap();
    assert_eq!(cause["log_complete"], false, "{cause}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_interpreter_is_named_in_the_cause() {
    let world = world().await;
    let script = world.scripts.join("py.sh");
    std::fs::write(&script, "#!/nonexistent/python3\nprint('hi')\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = Agent::start(world.config(), &world.moto.endpoint());
    let out = run_job(&world, "nointerp_1", "py.sh").await;
    let cause = out["error"]["Cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("/nonexistent/python3"),
        "{out}\n{}",
        agent.log()
    );
    assert!(cause.contains("No such file or directory"), "{cause}");
    assert!(
        agent.log().contains("/nonexistent/python3"),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outbox_entry_whose_id_is_not_its_name_is_quarantined() {
    let world = world().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let outbox = state.join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let file = outbox.join("20260101T000000000Z-aaaa.json");
    std::fs::write(
        &file,
        json!({"id": "20260101T000000000Z-bbbb", "created_at": "2026-01-01T00:00:00.000Z"})
            .to_string(),
    )
    .unwrap();
    let mut config = world.config();
    config.state_dir = Some(state);
    let agent = Agent::start(config, &world.moto.endpoint());
    agent.wait_for_log("does not match its file name", WAIT);
    wait_until("the entry moved aside", WAIT, || !file.exists());
    assert!(outbox.join("20260101T000000000Z-aaaa.json.bad").exists());
    assert!(agent.log().contains("20260101T000000000Z-aaaa.json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn control_characters_in_a_field_cannot_forge_a_log_line() {
    let world = world().await;
    write_script(&world.scripts, "ok.sh", "echo ok");
    let forged = "x\nFORGED INFO rsql_agent: job ended\u{1b}[7;35m";
    for format in ["text", "json"] {
        let mut config = world.config();
        config.log_format = Some(format.to_string());
        let agent = Agent::start(config, &world.moto.endpoint());
        let out = run_job(&world, forged, "ok.sh").await;
        assert_eq!(out["status"], "completed", "{out}");
        agent.wait_for_log("FORGED", WAIT);
        let log = agent.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("FORGED")).collect();
        assert!(!lines.is_empty(), "{log}");
        for line in lines {
            assert!(
                !line.starts_with("FORGED"),
                "a forged line in the {format} log: {line}"
            );
            assert!(
                !line.contains('\u{1b}'),
                "a raw escape in the {format} log: {line:?}"
            );
            if format == "json" {
                serde_json::from_str::<Value>(line)
                    .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
            } else {
                assert!(line.contains("\\n"), "the newline is not escaped: {line}");
            }
        }
    }
}
