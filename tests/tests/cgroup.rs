//! Every job in its own cgroup: whatever a job starts, however it hides (a new session, a
//! new process group, a double fork, an environment without the job's marker), is gone when
//! its outcome is reported, and its CPU time is measured. The real `rsql-agent run` and its
//! job owners, against moto, with a cgroup v2 directory of the test's own delegated to the
//! agent (`[jobs] cgroup_parent`); and, without one, the fallback that says so.
//!
//! Tests that need the cgroup v2 hierarchy fail where there is none (see
//! `rsql_agent_tests::cgroup`); they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aws_sdk_sfn::types::ExecutionStatus;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rsql_agent_tests::agent::{process_alive, script_dir, write_script, Agent, AgentConfig};
use rsql_agent_tests::bins;
use rsql_agent_tests::cgroup::TestCgroup;
use rsql_agent_tests::moto;
use rsql_agent_tests::world::{self, eventually_with, World, WAIT};
use serde_json::json;

/// Bash helpers for the jobs: wait for a pid file to be written, and for a process to have
/// left the job's session or process group, so that a job never ends before its escapee
/// has really escaped.
const HELPERS: &str = r#"
pid_in() { while [ ! -s "$1" ]; do sleep 0.01; done; cat "$1"; }
field() { cut -d' ' -f"$2" "/proc/$1/stat"; }
wait_session_leader() { while [ "$(field "$1" 6)" != "$1" ]; do sleep 0.01; done; }
wait_group_leader() { while [ "$(field "$1" 5)" != "$1" ]; do sleep 0.01; done; }
# pid, process group, session, and how many of the job's marker variables it still has.
describe() { echo "$1 $(field "$1" 5) $(field "$1" 6) $(tr '\0' '\n' < "/proc/$1/environ" | grep -c '^RSQL_AGENT_JOB_ID=')"; }
"#;

/// moto, the job queue and an empty script directory.
async fn world() -> World {
    World::builder("cgroup").build().await
}

/// An agent whose job owners make each job's cgroup under `parent`.
fn cgroup_agent(world: &World, parent: &Path) -> Agent {
    let mut config = AgentConfig::new(&world.queue_url, &world.scripts);
    config.jobs_extra = format!("cgroup_parent = \"{}\"\n", parent.display());
    Agent::start(config, &world.moto.endpoint())
}

/// Runs `job` through a caught one-task state machine; returns how the execution
/// ended, its output (the success output, or `$.error` with the failure) and the job's
/// `workflow_execution_id`.
async fn run(world: &World, job: &str) -> (ExecutionStatus, serde_json::Value, String) {
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_id": "cgroup_test",
        "workflow_execution_id.$": "$.execution_id",
        "job_name": job,
        "timeout_seconds": 300,
        "heartbeat_seconds": 60
    });
    let task = moto::JobTask::new(&world.queue_url, body, 60);
    let sm =
        moto::create_state_machine(&world.sdk, &moto::unique_name("cg"), &task.definition()).await;
    let execution_id = moto::unique_name("cg");
    let input = json!({ "execution_id": execution_id });
    let exec = moto::start_execution(&world.sdk, &sm, &input.to_string()).await;
    let out = world.wait_execution(&exec).await;
    (
        out.status().clone(),
        moto::execution_output(&out),
        execution_id,
    )
}

/// What a job's `describe` wrote: (pid, process group, session, marker variables left).
fn described(path: &Path) -> (i32, i32, i32, u32) {
    let text = std::fs::read_to_string(path).expect("the job described its escapee");
    let fields: Vec<i64> = text
        .split_whitespace()
        .map(|f| f.parse().expect("a number"))
        .collect();
    assert_eq!(fields.len(), 4, "{text:?}");
    (
        fields[0] as i32,
        fields[1] as i32,
        fields[2] as i32,
        fields[3] as u32,
    )
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid")
}

/// Kills a process a failed assertion would otherwise leave running.
fn kill_quietly(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

fn cpu_ms(value: &serde_json::Value) -> u64 {
    value["cpu_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cpu_ms in {value}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setsid_escapee_without_the_marker_is_gone_when_the_outcome_is_reported() {
    let cgroup = TestCgroup::new();
    let world = world().await;
    let (escapee, job) = (
        world.scripts.join("escapee.txt"),
        world.scripts.join("job.pid"),
    );
    write_script(
        &world.scripts,
        "setsid.sh",
        &format!(
            "{HELPERS}\necho $$ > {job}\n\
             env -u RSQL_AGENT_JOB_ID -u RSQL_AGENT_SUPERVISOR setsid sleep 300 &\n\
             wait_session_leader $!\ndescribe $! > {escapee}\necho started",
            job = job.display(),
            escapee = escapee.display()
        ),
    );
    let agent = cgroup_agent(&world, cgroup.path());
    let (status, output, _) = run(&world, "setsid.sh").await;
    let (pid, _, session, markers) = described(&escapee);
    let alive = process_alive(pid);
    kill_quietly(pid);
    assert_eq!(
        status,
        ExecutionStatus::Succeeded,
        "{output}\n{}",
        agent.log()
    );
    // It really hid: a session of its own, and none of the job's marker variables.
    assert_eq!(session, pid);
    assert_ne!(session, read_pid(&job));
    assert_eq!(markers, 0);
    assert!(
        !alive,
        "the escapee {pid} outlived its job:\n{}",
        agent.log()
    );
    assert!(cpu_ms(&output) < 1000, "{output}");
    assert_eq!(
        output.get("max_rss_mb").is_some(),
        cgroup.has_memory(),
        "max_rss_mb is reported exactly where the memory controller is: {output}"
    );
    // The owner removed the job's cgroup before it exited, so before the report.
    assert_eq!(cgroup.job_cgroups(), Vec::<PathBuf>::new());
    agent.wait_for_log("job cgroups: cgroup v2", Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_double_forked_escapee_in_a_process_group_of_its_own_is_gone_too() {
    let cgroup = TestCgroup::new();
    let world = world().await;
    let (escapee, pid_file, job, job_session) = (
        world.scripts.join("escapee.txt"),
        world.scripts.join("escapee.pid"),
        world.scripts.join("job.pid"),
        world.scripts.join("job.sid"),
    );
    // The subshell and `bash -c` exit at once (a double fork: the sleep's parent becomes
    // the owner, a subreaper); `set -m` gives the sleep a process group of its own, in the
    // job's session; `env -u` strips the marker. Then the job fails: nothing may survive
    // whatever the outcome.
    write_script(
        &world.scripts,
        "double.sh",
        &format!(
            "{HELPERS}\necho $$ > {job}\nfield $$ 6 > {job_session}\n\
             ( env -u RSQL_AGENT_JOB_ID -u RSQL_AGENT_SUPERVISOR \
               bash -c 'set -m; sleep 300 & echo $! > \"$0\"' {pid_file} & )\n\
             p=$(pid_in {pid_file})\nwait_group_leader $p\ndescribe $p > {escapee}\n\
             echo started\nexit 4",
            job = job.display(),
            job_session = job_session.display(),
            pid_file = pid_file.display(),
            escapee = escapee.display()
        ),
    );
    let agent = cgroup_agent(&world, cgroup.path());
    let (status, output, _) = run(&world, "double.sh").await;
    let (pid, group, session, markers) = described(&escapee);
    let alive = process_alive(pid);
    kill_quietly(pid);
    let job_pid = read_pid(&job);
    assert_eq!(status, ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(output["error"]["Error"], "Rsql.ScriptFailed", "{output}");
    assert_eq!((group, markers), (pid, 0), "it did not hide");
    assert_ne!(group, job_pid);
    assert_eq!(
        session,
        read_pid(&job_session),
        "it stayed in the job's session"
    );
    assert!(
        !alive,
        "the escapee {pid} outlived its job:\n{}",
        agent.log()
    );
    // The failure's cause carries the job's CPU time too.
    let cause = caught_cause(&output);
    assert!(cpu_ms(&cause) < 1000, "{cause}");
    assert_eq!(cause["exit_code"], 4);
    assert_eq!(cgroup.job_cgroups(), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_busy_for_one_second_of_cpu_reports_about_1000_cpu_ms_everywhere() {
    let cgroup = TestCgroup::new();
    let world = world().await;
    let table = moto::unique_name("cg-audit");
    moto::create_job_audit_table(&world.sdk, &table).await;
    // One second of CPU, not of wall clock (a busy machine must not change the figure),
    // spent in a grandchild: the job's CPU is all of its processes'.
    let place = world.scripts.join("cgroup.txt");
    write_script(
        &world.scripts,
        "busy.sh",
        &format!(
            "grep '^0::' /proc/self/cgroup > {place}\n\
             bash -c \"perl -e '1 while (times)[0] + (times)[1] < 1.0'\"\necho done",
            place = place.display()
        ),
    );
    let mut config = AgentConfig::new(&world.queue_url, &world.scripts);
    config.jobs_extra = format!("cgroup_parent = \"{}\"\n", cgroup.path().display());
    config.job_table = Some(table.clone());
    let agent = Agent::start(config, &world.moto.endpoint());
    let (status, output, execution_id) = run(&world, "busy.sh").await;
    assert_eq!(
        status,
        ExecutionStatus::Succeeded,
        "{output}\n{}",
        agent.log()
    );
    // It ran in the payload leaf of a cgroup of its own under the delegated directory.
    let place = std::fs::read_to_string(&place).expect("the job's cgroup");
    let parent = cgroup.path().file_name().expect("name").to_string_lossy();
    assert!(
        place.contains(&format!("/{parent}/")) && place.trim_end().ends_with("/payload"),
        "{place}"
    );
    let measured = cpu_ms(&output);
    assert!(
        (700..=1500).contains(&measured),
        "cpu_ms {measured} for one second of CPU: {output}"
    );
    // The same figure in the local audit and in DynamoDB's.
    let local = agent
        .local_audit()
        .into_iter()
        .rev()
        .find(|r| r["execution_status"] == "completed")
        .expect("a final local audit record");
    assert_eq!(local["cpu_ms"], measured, "{local}");
    let item = audit_cpu_ms(&world, &table, &execution_id).await;
    assert_eq!(item, Some(measured.to_string()), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_cgroup_the_group_and_marker_sweep_runs_and_says_so() {
    let world = world().await;
    // Not a cgroup: what a host without a delegated hierarchy looks like to the agent.
    let plain = tempfile::tempdir().expect("a plain directory");
    let (escapee, child, hidden) = (
        world.scripts.join("escapee.txt"),
        world.scripts.join("child.pid"),
        world.scripts.join("hidden.txt"),
    );
    // Two leftovers keep the marker; the third hides from it too. The owner, the job's
    // subreaper, finds all three among its own descendants.
    write_script(
        &world.scripts,
        "fallback.sh",
        &format!(
            "{HELPERS}
sleep 300 &
echo $! > {child}
setsid sleep 300 &
             wait_session_leader $!
describe $! > {escapee}
env -u RSQL_AGENT_JOB_ID -u RSQL_AGENT_SUPERVISOR setsid sleep 300 &
             wait_session_leader $!
describe $! > {hidden}
echo started",
            child = child.display(),
            escapee = escapee.display(),
            hidden = hidden.display()
        ),
    );
    let agent = cgroup_agent(&world, plain.path());
    agent.wait_for_log(
        "falling back to the process group and marker sweep",
        Duration::from_secs(30),
    );
    assert!(
        agent.log().contains("is not a cgroup v2 directory"),
        "{}",
        agent.log()
    );
    let (status, output, _) = run(&world, "fallback.sh").await;
    let (pid, _, session, markers) = described(&escapee);
    let (hidden_pid, _, hidden_session, hidden_markers) = described(&hidden);
    let in_group = read_pid(&child);
    let alive = (
        process_alive(pid),
        process_alive(in_group),
        process_alive(hidden_pid),
    );
    kill_quietly(pid);
    kill_quietly(in_group);
    kill_quietly(hidden_pid);
    assert_eq!(
        status,
        ExecutionStatus::Succeeded,
        "{output}\n{}",
        agent.log()
    );
    assert_eq!((session, markers), (pid, 1));
    assert_eq!((hidden_session, hidden_markers), (hidden_pid, 0));
    assert_eq!(alive, (false, false, false), "{}", agent.log());
    // CPU from the processes the owner reaped; no memory figure without a cgroup.
    assert!(output["cpu_ms"].is_u64(), "{output}");
    assert!(output.get("max_rss_mb").is_none(), "{output}");
    // Nothing was made in the directory that is not a cgroup.
    assert_eq!(std::fs::read_dir(plain.path()).expect("dir").count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_owner_takes_its_jobs_escapees_with_it_through_the_cgroup() {
    let cgroup = TestCgroup::new();
    let world = world().await;
    let (escapee, started) = (
        world.scripts.join("escapee.txt"),
        world.scripts.join("started"),
    );
    write_script(
        &world.scripts,
        "orphaned.sh",
        &format!(
            "{HELPERS}
env -u RSQL_AGENT_JOB_ID -u RSQL_AGENT_SUPERVISOR setsid sleep 300 &
             wait_session_leader $!
describe $! > {escapee}
touch {started}
sleep 300",
            escapee = escapee.display(),
            started = started.display()
        ),
    );
    let agent = cgroup_agent(&world, cgroup.path());
    let run = run(&world, "orphaned.sh");
    tokio::pin!(run);
    let owner = tokio::select! {
        _ = &mut run => panic!("the job ended on its own:\n{}", agent.log()),
        owner = wait_for_owner(&agent, &started) => owner,
    };
    kill(Pid::from_raw(owner), Signal::SIGKILL).expect("SIGKILL the owner");
    let (status, output, _) = run.await;
    let (pid, ..) = described(&escapee);
    let alive = process_alive(pid);
    kill_quietly(pid);
    assert_eq!(status, ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(output["error"]["Error"], "Rsql.Interrupted", "{output}");
    assert!(
        !alive,
        "the escapee {pid} outlived its owner:\n{}",
        agent.log()
    );
}

#[test]
fn check_config_says_what_jobs_get_from_cgroups() {
    let cgroup = TestCgroup::new();
    let (_dir, scripts) = script_dir();
    let plain = tempfile::tempdir().expect("a plain directory");
    let check = |parent: &Path| {
        let dir = tempfile::tempdir().expect("config dir");
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[jobs]\nscript_dir = \"{}\"\nlauncher = \"direct\"\ncgroup_parent = \"{}\"\n",
                scripts.display(),
                parent.display()
            ),
        )
        .expect("write config");
        let out = Command::new(bins::agent())
            .arg("check-config")
            .arg(&config)
            .output()
            .expect("rsql-agent check-config");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = check(cgroup.path());
    let level = if cgroup.has_memory() {
        "full cgroup v2"
    } else {
        "cgroup v2 without the memory controller"
    };
    assert!(said.contains(&format!("cgroups:    {level}")), "{said}");
    assert!(
        said.contains(&cgroup.path().display().to_string()),
        "{said}"
    );
    let said = check(plain.path());
    assert!(said.contains("cgroups:    no cgroup"), "{said}");
    assert!(said.contains("not a cgroup v2 directory"), "{said}");
}

/// The owner units systemd starts from `rsql-job-owner.socket` carry `Delegate=yes` and
/// memory and CPU accounting; systemd must know every line of the template and the socket
/// (`verify` prints nothing), or it would ignore the line and the job would run without its
/// cgroup.
#[test]
fn the_owner_units_properties_are_ones_systemd_knows() {
    let units = bins::workspace_root().join("systemd");
    let template = std::fs::read_to_string(units.join("rsql-job-owner@.service"))
        .expect("read the owner template");
    for want in [
        "Delegate=yes",
        "MemoryAccounting=yes",
        "CPUAccounting=yes",
        "Slice=rsql-jobs.slice",
        "After=rsql-agent.service",
        "StandardInput=socket",
    ] {
        assert!(
            template.lines().any(|l| l == want),
            "{want} missing from the owner template"
        );
    }
    let dir = tempfile::tempdir().expect("unit dir");
    // verify wants ExecStart's binary to exist; everything else is the shipped text.
    let instance = template.replace("/usr/libexec/rsql-agent/rsql-job-owner", "/bin/true");
    std::fs::write(dir.path().join("rsql-job-owner@.service"), &instance).expect("write");
    std::fs::write(dir.path().join("rsql-job-owner@check.service"), &instance).expect("write");
    for unit in ["rsql-jobs.slice", "rsql-job-owner.socket"] {
        std::fs::copy(units.join(unit), dir.path().join(unit)).expect("copy a unit");
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("rsql-job-owner@check.service"))
        .arg(dir.path().join("rsql-job-owner.socket"))
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze is needed for this test ({e}); run .ci/install-deps")
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.is_empty(), "{said}");
}

/// The `Cause` of a caught failure, parsed.
fn caught_cause(output: &serde_json::Value) -> serde_json::Value {
    output["error"]["Cause"]
        .as_str()
        .and_then(|c| serde_json::from_str(c).ok())
        .unwrap_or_else(|| panic!("no cause in {output}"))
}

/// The `cpu_ms` of the job audit item of `busy.sh` in execution `name`, once it is final.
async fn audit_cpu_ms(world: &World, table: &str, name: &str) -> Option<String> {
    eventually_with(
        &format!("a final audit item for {name}"),
        WAIT,
        || async move {
            match world::audit_item(&world.sdk, table, "busy.sh", name).await {
                Some(item) if world::attr(&item, "execution_status") == Some("completed") => {
                    Ok(item.get("cpu_ms").and_then(|v| v.as_n().ok()).cloned())
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// The pid of the owner of the agent's one job, once the job has written `started`.
async fn wait_for_owner(agent: &Agent, started: &Path) -> i32 {
    loop {
        if started.exists() {
            if let Some(pid) = agent.owners().first().and_then(|o| o["pid"].as_i64()) {
                return pid as i32;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
