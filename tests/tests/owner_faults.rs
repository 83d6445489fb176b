//! The job owner under faults: a full `state_dir`, an owner killed by its own job right after
//! the start, an owner stopped by its job, an agent SIGKILLed while another agent of the
//! fleet picks the job's message up. Real `rsql-agent run` and `rsql-job-owner` processes,
//! real jobs, a real full filesystem (a small tmpfs), against the moto emulator; each test
//! checks what an operator would see: the execution's status and error, how many times the
//! script ran, which processes are left, and the audit item.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_sfn::types::ExecutionStatus;
use rsql_agent_tests::agent::{process_alive, wait_until, write_script, Agent, AgentConfig};
use rsql_agent_tests::cgroup::TestCgroup;
use rsql_agent_tests::host::Tmpfs;
use rsql_agent_tests::moto;
use rsql_agent_tests::world::{attr, audit_item, eventually_with, World, WAIT};
use serde_json::json;

/// The agents here start owners directly (no systemd as PID 1 in the test host).
const DIRECT: &str = "launcher = \"direct\"\n";

/// One job task whose message carries `timeout_seconds` from the input; `catch`: failures
/// end in a Pass state with the error in `$.error`.
async fn state_machine(world: &World, heartbeat: u64, catch: bool) -> String {
    let body = json!({
        "task_token.$": "$$.Task.Token",
        "workflow_id": "owner_faults",
        "workflow_execution_id.$": "$.execution_id",
        "job_name.$": "$.job_name",
        "timeout_seconds.$": "$.timeout_seconds",
        "heartbeat_seconds": heartbeat
    });
    let mut task = moto::JobTask::new(&world.queue_url, body, heartbeat);
    task.catch = catch;
    moto::create_state_machine(&world.sdk, &moto::unique_name("faults"), &task.definition()).await
}

async fn start(world: &World, sm: &str, execution_id: &str, job: &str, timeout: u64) -> String {
    let input = json!({"execution_id": execution_id, "job_name": job, "timeout_seconds": timeout});
    moto::start_execution(&world.sdk, sm, &input.to_string()).await
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn read_pids(path: &Path) -> Vec<i32> {
    lines(path)
        .iter()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The pid of the one live owner the agent knows of.
async fn live_owner(agent: &Agent) -> i32 {
    eventually_with("a live job owner", WAIT, || async move {
        agent
            .owners()
            .iter()
            .filter_map(|o| o["pid"].as_i64())
            .map(|p| p as i32)
            .find(|&p| process_alive(p))
            .ok_or_else(|| format!("agent log:\n{}", agent.log()))
    })
    .await
}

/// Fills the filesystem of `dir` to the last byte (a file `fill` there); returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("fill");
    let mut file = std::fs::File::create(&path).expect("create the filler");
    let chunk = vec![0u8; 4096];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    // Tail bytes a whole chunk did not fit in.
    while file.write(&[0u8]).is_ok_and(|n| n == 1) {}
    path
}

/// A job on an agent whose `state_dir` (and, with `locks_too`, its lock dir) is on a 1 MiB
/// tmpfs, running: `NAME.sh` records its start in `NAME.runs`, sleeps `secs`, records its end
/// in `NAME.done` and exits 0, as execution `NAME_1` (its task caught when `catch`).
struct OnSmallDisk {
    world: World,
    disk: Tmpfs,
    runs: PathBuf,
    done: PathBuf,
    agent: Agent,
    exec: String,
}

async fn on_a_small_disk(name: &str, secs: u64, locks_too: bool, catch: bool) -> OnSmallDisk {
    let world = World::builder(&format!("{name}-exit")).build().await;
    let disk = Tmpfs::new("1m");
    let runs = world.scripts.join(format!("{name}.runs"));
    let done = world.scripts.join(format!("{name}.done"));
    write_script(
        &world.scripts,
        &format!("{name}.sh"),
        &format!(
            "echo started >> {runs}\nsleep {secs}\necho done >> {done}\nexit 0",
            runs = runs.display(),
            done = done.display()
        ),
    );
    let mut config = world.config();
    config.state_dir = Some(disk.path().join("state"));
    if locks_too {
        config.lock_dir = Some(disk.path().join("locks"));
    }
    config.visibility_timeout = "10s".into();
    config.jobs_extra = DIRECT.into();
    let agent = Agent::start(config, &world.moto.endpoint());
    let sm = state_machine(&world, 30, catch).await;
    let exec = start(&world, &sm, &format!("{name}_1"), &format!("{name}.sh"), 60).await;
    wait_until("the job to start", WAIT, || lines(&runs).len() == 1);
    OnSmallDisk {
        world,
        disk,
        runs,
        done,
        agent,
        exec,
    }
}

/// Defect 1: the owner cannot write its exit record (its `state_dir` is full when the job
/// ends); the job exited 0, and the task must succeed, not come back `Rsql.Interrupted`.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_ended_while_state_dir_was_full_is_reported_as_it_ended() {
    let OnSmallDisk {
        world,
        disk,
        runs,
        done,
        agent,
        exec,
    } = on_a_small_disk("full", 5, false, false).await;
    let owner = live_owner(&agent).await;

    let filler = fill(&disk.path());
    wait_until("the job to end", WAIT, || lines(&done).len() == 1);
    wait_until("the owner to exit", WAIT, || !process_alive(owner));
    assert!(
        !agent
            .state_dir
            .join("owners")
            .read_dir()
            .is_ok_and(|d| { d.flatten().any(|e| e.path().join("exit.json").exists()) }),
        "the exit record was written after all: the disk was not full"
    );
    std::fs::remove_file(filler).expect("free the disk");

    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(lines(&runs).len(), 1, "the script ran more than once");
    let output = moto::execution_output(&out);
    assert_eq!(output["exit_code"], 0, "{output}");
}

/// Defect 1, where only the watching agent knows the outcome: `state_dir` and the lock dir
/// are both full when the job ends, so the owner can write neither its exit record nor the
/// lock state; it tells the agent on its socket. The agent holds the outcome in memory until
/// the disk has room again, and reports what really happened.
#[tokio::test(flavor = "multi_thread")]
async fn an_outcome_only_the_watching_agent_holds_is_reported_as_it_ended() {
    let OnSmallDisk {
        world,
        disk,
        runs,
        done: _,
        agent,
        exec,
    } = on_a_small_disk("memory", 4, true, false).await;
    live_owner(&agent).await;

    let filler = fill(&disk.path());
    agent.wait_for_log("holding it in memory", WAIT);
    std::fs::remove_file(filler).expect("free the disk");

    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(lines(&runs).len(), 1, "the script ran more than once");
    assert_eq!(moto::execution_output(&out)["exit_code"], 0);
}

/// Defect 1, where nothing can hold the outcome: `state_dir` and the lock dir are both full
/// when the job ends, and no agent watches (it was SIGKILLed). The next agent must not call
/// it an interruption (which the workflow retries: the job would run twice): it says the
/// outcome was lost, with a non-retryable error.
#[tokio::test(flavor = "multi_thread")]
async fn an_outcome_that_could_be_recorded_nowhere_is_reported_lost_and_not_retried() {
    let OnSmallDisk {
        world,
        disk,
        runs,
        done,
        mut agent,
        exec,
    } = on_a_small_disk("lost", 4, true, true).await;
    let owner = live_owner(&agent).await;
    agent.kill();

    let filler = fill(&disk.path());
    wait_until("the job to end", WAIT, || lines(&done).len() == 1);
    wait_until("the owner to exit", WAIT, || !process_alive(owner));
    std::fs::remove_file(filler).expect("free the disk");
    agent.restart();

    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    let (error, cause) = moto::caught_error(&out);
    assert_eq!(error, "Rsql.ScriptFailed", "{cause}\n{}", agent.log());
    let message = cause["message"].as_str().unwrap_or_default();
    assert!(message.contains("nowhere"), "{message}");
    assert_eq!(lines(&runs).len(), 1, "the script ran more than once");
}

/// Defect 2: the job SIGKILLs its owner at once, racing the owner's answer to the agent. In
/// every case (whichever wins) nothing of the job survives, and its lock is free: a later
/// run with the same lock key runs.
#[tokio::test(flavor = "multi_thread")]
async fn an_owner_killed_by_its_job_at_the_start_leaves_no_process_and_no_lock() {
    let world = World::builder("owner-race").build().await;
    let agent = world.agent(|c| {
        c.jobs_extra = DIRECT.into();
        c.max_concurrent_jobs = 4;
    });
    let sm = state_machine(&world, 30, true).await;
    // The race goes either way; four at once make the early death (the owner gone before it
    // answers) all but certain in one of them.
    let tries: Vec<(String, PathBuf, PathBuf, PathBuf)> = (0..4)
        .map(|i| {
            let name = format!("race{i}.sh");
            let pids = world.scripts.join(format!("race{i}.pids"));
            let armed = world.scripts.join(format!("race{i}.armed"));
            let ran = world.scripts.join(format!("race{i}.ran"));
            std::fs::write(&armed, "").expect("arm");
            write_script(
                &world.scripts,
                &name,
                &format!(
                    "if [ -e {armed} ]; then rm -f {armed}; sleep 300 & echo $! >> {pids}; kill -9 $PPID; wait; fi\n\
                     echo ran >> {ran}",
                    armed = armed.display(),
                    pids = pids.display(),
                    ran = ran.display()
                ),
            );
            (name, pids, armed, ran)
        })
        .collect();
    let mut first = Vec::new();
    for (i, (name, ..)) in tries.iter().enumerate() {
        first.push(start(&world, &sm, &format!("race_{i}"), name, 60).await);
    }
    for (exec, (_, pids, ..)) in first.iter().zip(&tries) {
        let out = moto::wait_execution(&world.sdk, exec, WAIT).await;
        let (error, cause) = moto::caught_error(&out);
        assert_eq!(error, "Rsql.Interrupted", "{cause}\n{}", agent.log());
        wait_until(
            "the job's processes to be killed",
            Duration::from_secs(10),
            || read_pids(pids).iter().all(|&p| !process_alive(p)),
        );
    }
    // Same execution id and job name: the same lock key. Each runs at once.
    let mut second = Vec::new();
    for (i, (name, ..)) in tries.iter().enumerate() {
        second.push(start(&world, &sm, &format!("race_{i}"), name, 60).await);
    }
    for (exec, (_, _, _, ran)) in second.iter().zip(&tries) {
        let out = moto::wait_execution(&world.sdk, exec, Duration::from_secs(60)).await;
        assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
        let output = moto::execution_output(&out);
        assert!(output.get("error").is_none(), "{output}");
        assert_eq!(lines(ran).len(), 1);
    }
}

/// Defect 4: the owner is stopped (`kill -STOP`, as a job can do to its parent) once the job
/// runs, so the owner's timer stands still. The agent's backstop ends the job past its
/// timeout and reports `Rsql.Timeout`. Without a cgroup, through the marker sweep.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_owner_does_not_stop_time_the_agent_ends_the_job_as_timed_out() {
    stopped_owner_is_overtaken(DIRECT.into()).await;
}

/// Defect 4 with the job in a cgroup of its own: the agent ends the job through it, a
/// `setsid` escapee included.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_owners_job_is_ended_through_its_cgroup() {
    let cgroup = TestCgroup::new();
    stopped_owner_is_overtaken(format!(
        "{DIRECT}cgroup_parent = \"{}\"\n",
        cgroup.path().display()
    ))
    .await;
}

async fn stopped_owner_is_overtaken(jobs_extra: String) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let world = World::builder("owner-stop").build().await;
    let pids = world.scripts.join("stop.pids");
    write_script(
        &world.scripts,
        "stop.sh",
        &format!(
            "sleep 300 &\necho $! >> {pids}\nsetsid sleep 301 &\necho $! >> {pids}\nwait",
            pids = pids.display()
        ),
    );
    let agent = world.agent(|c| c.jobs_extra = jobs_extra);
    let sm = state_machine(&world, 30, true).await;
    let exec = start(&world, &sm, "stop_1", "stop.sh", 3).await;
    wait_until("the job to start", WAIT, || read_pids(&pids).len() == 2);
    // Stopped once the agent has heard the job started (a stop before that is the slow
    // owner of the hand-over, another path).
    agent.wait_for_log("job started", WAIT);
    let owner = live_owner(&agent).await;
    kill(Pid::from_raw(owner), Signal::SIGSTOP).expect("SIGSTOP the owner");
    // 3 s timeout, 2 s kill_grace, 2 s pipe_drain, 10 s margin: well within a minute.
    let out = moto::wait_execution(&world.sdk, &exec, Duration::from_secs(60)).await;
    let outcome = moto::caught_error(&out);
    agent.kill_owners();
    let (error, cause) = outcome;
    assert_eq!(error, "Rsql.Timeout", "{cause}\n{}", agent.log());
    wait_until(
        "the job's processes to be gone",
        Duration::from_secs(5),
        || read_pids(&pids).iter().all(|&p| !process_alive(p)) && !process_alive(owner),
    );
}

/// Defect 10: agent A is SIGKILLed mid-job; the job finishes under its owner; agent B gets
/// the message back and replays the recorded success. The audit item must end `completed`,
/// not stay `running` for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_outcome_ends_the_job_audit() {
    let world = World::builder("replay-audit")
        .job_table()
        .shared_locks()
        .build()
        .await;
    let runs = world.scripts.join("replay.runs");
    let done = world.scripts.join("replay.done");
    write_script(
        &world.scripts,
        "replay.sh",
        &format!(
            "echo started >> {runs}\nsleep 4\necho done >> {done}",
            runs = runs.display(),
            done = done.display()
        ),
    );
    let config = AgentConfig {
        visibility_timeout: "10s".into(),
        jobs_extra: DIRECT.into(),
        ..world.config()
    };
    let mut a = Agent::start(
        AgentConfig {
            instance_id: "i-0a".into(),
            ..config.clone()
        },
        &world.moto.endpoint(),
    );
    let sm = state_machine(&world, 30, false).await;
    let exec = start(&world, &sm, "replay_1", "replay.sh", 60).await;
    wait_until("the job to start", WAIT, || lines(&runs).len() == 1);
    let table = world.job_table().to_string();
    eventually_with("the audit item `running`", WAIT, || {
        let table = table.clone();
        let sdk = world.sdk.clone();
        async move {
            match audit_item(&sdk, &table, "replay.sh", "replay_1").await {
                // A read may meet the item between moto's key write and its attributes.
                Some(item) if attr(&item, "execution_status") == Some("running") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    a.kill();
    wait_until("the job to end under its owner", WAIT, || {
        lines(&done).len() == 1
    });
    let b = Agent::start(
        AgentConfig {
            instance_id: "i-0b".into(),
            ..config
        },
        &world.moto.endpoint(),
    );
    let out = moto::wait_execution(&world.sdk, &exec, WAIT).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", b.log());
    assert_eq!(lines(&runs).len(), 1, "the script ran more than once");
    let b = &b;
    eventually_with("the audit item final", WAIT, || {
        let table = table.clone();
        let sdk = world.sdk.clone();
        async move {
            match audit_item(&sdk, &table, "replay.sh", "replay_1").await {
                Some(item) if attr(&item, "execution_status") == Some("completed") => Ok(item),
                other => Err(format!("{other:?}\nB:\n{}", b.log())),
            }
        }
    })
    .await;
}

/// Defect 11: the job's copy arrives while something that is no live job holds its lock, as
/// an agent does for a moment while it looks at an expiring copy's task. The collision is
/// forced: this test holds the lock, with no state, for longer than the task's
/// HeartbeatSeconds. The waiting copy must keep its task alive and come back soon; then the
/// job runs, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_that_finds_the_lock_held_by_no_live_job_keeps_its_task_and_runs_soon() {
    use rsql_agent::lock::{Acquire, LockDir};
    let world = World::builder("busy-copy").shared_locks().build().await;
    let runs = world.scripts.join("busy.runs");
    write_script(
        &world.scripts,
        "busy.sh",
        &format!("echo ran >> {}", runs.display()),
    );
    let locks = LockDir::open(world.locks()).expect("open the lock dir");
    let Acquire::Acquired(held) = locks.try_acquire("busy_1/busy.sh").expect("take the lock")
    else {
        panic!("the job's lock is busy before the test took it");
    };
    // A left copy used to wait out its whole visibility timeout: far past HeartbeatSeconds.
    let agent = world.agent(|c| {
        c.jobs_extra = DIRECT.into();
        c.visibility_timeout = "60s".into();
    });
    let heartbeat = 6;
    let sm = state_machine(&world, heartbeat, false).await;
    let exec = start(&world, &sm, "busy_1", "busy.sh", 60).await;
    agent.wait_for_log("job is running elsewhere; leaving this copy", WAIT);
    // The fault lasts longer than the task's heartbeat timeout, and meanwhile the copy keeps
    // coming back to the lock and heartbeating its task.
    let fault = Instant::now() + Duration::from_secs(heartbeat + 2);
    wait_until(
        "the copy to come back to the held lock and outlast HeartbeatSeconds",
        WAIT,
        || {
            let log = agent.log();
            Instant::now() >= fault
                && log.matches("leaving this copy").count() >= 3
                && log.contains("heartbeat sent for this copy's task")
        },
    );
    assert!(
        lines(&runs).is_empty(),
        "the job ran while its lock was held"
    );
    held.release().expect("release the lock");

    let out = moto::wait_execution(&world.sdk, &exec, Duration::from_secs(60)).await;
    assert_eq!(*out.status(), ExecutionStatus::Succeeded, "{}", agent.log());
    assert_eq!(lines(&runs).len(), 1);
}
