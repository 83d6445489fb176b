//! The package on a real systemd host: the `.deb` from `make package`, installed with
//! `dpkg -i` in a systemd 252 booted as PID 1 of its own namespaces (`tests/src/sandbox.rs`),
//! started with `systemctl enable --now rsql-agent` and the shipped units, with the AWS
//! emulator on the host's loopback. Jobs come over the socket from `rsql-wrapper submit`
//! inside the sandbox, with real task tokens; each test reads the outcome from Step
//! Functions and the evidence the job left in `/share/out`.
//!
//! What a user of the package would notice: jobs run (as `rsql-job`, in their own unit),
//! outlive restarts, stops, upgrades and crashes of the agent, end once and are reported
//! once; escaped and stubborn processes are gone at the end; a hostile job can do nothing to
//! the agent or to another job; a shutdown reports the running job `Rsql.Interrupted`.

use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_sfn::types::ExecutionStatus;
use rsql_agent_tests::moto;
use rsql_agent_tests::sandbox::{package, show, Sandbox};
use rsql_agent_tests::world::{eventually, StateMachine, World, WAIT};

const SCRIPTS: &str = "/opt/rsql/rsql_scripts";
const SOCKET: &str = "/run/rsql-agent/agent.sock";

/// Waits for `/share/out/$RSQL_WORKFLOW_EXECUTION_ID.release`, after leaving who it runs as,
/// its cgroup and one line per start in `/share/out`.
const GATED: &str = r##"#!/bin/bash
out=/share/out/$RSQL_WORKFLOW_EXECUTION_ID
id -un > "$out.user"
cat /proc/self/cgroup > "$out.cgroup"
echo "$$" >> "$out.runs"
while [ ! -e "$out.release" ]; do sleep 0.2; done
echo "released"
"##;

/// Leaves a grandchild in a session of its own with the supervisor's marker variables
/// stripped, and exits 0 at once.
const ESCAPEE: &str = r##"#!/bin/bash
out=/share/out/$RSQL_WORKFLOW_EXECUTION_ID
setsid env -u RSQL_AGENT_JOB_ID -u RSQL_AGENT_SUPERVISOR sh -c "echo \$\$ > $out.escapee.tmp; mv $out.escapee.tmp $out.escapee; exec sleep 300" < /dev/null > /dev/null 2>&1 &
while [ ! -s "$out.escapee" ]; do sleep 0.05; done
echo "left $(cat "$out.escapee") behind"
"##;

/// Ignores SIGTERM and never ends by itself.
const STUBBORN: &str = r##"#!/bin/bash
trap '' TERM
echo "$$" > "/share/out/$RSQL_WORKFLOW_EXECUTION_ID.pid"
while :; do sleep 0.2; done
"##;

/// Tries, as a job, everything a job must not be able to do, and writes one line per try:
/// `denied NAME` or `ALLOWED NAME`. `$1` is a running sibling's owner directory, `$2` the
/// pid of its job.
const HOSTILE: &str = r##"#!/bin/bash
out=/share/out/$RSQL_WORKFLOW_EXECUTION_ID.tries
sib="$1"
try() {
  local name=$1
  shift
  if "$@" >/dev/null 2>&1; then echo "ALLOWED $name" >> "$out"; else echo "denied $name" >> "$out"; fi
}
agent=$(pgrep -o -x rsql-agent)
[ -n "$agent" ] || echo "missing the agent's pid" >> "$out"
env > "/share/out/$RSQL_WORKFLOW_EXECUTION_ID.env"
try drain-the-agent rsql-agent drain --config /etc/rsql-agent/agent.toml
try reach-the-control-socket python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.connect("/var/lib/rsql-agent/agent.sock")'
try submit-a-job rsql-wrapper submit --task-token forged --workflow-id wf --workflow-execution-id forged --job-name gated.sh --socket /run/rsql-agent/agent.sock
try change-the-config sh -c 'echo "# forged" >> /etc/rsql-agent/agent.toml'
try read-the-config cat /etc/rsql-agent/agent.toml
try signal-the-agent kill -HUP "$agent"
try list-the-owners ls /var/lib/rsql-agent/owners
try read-a-task-token cat "$sib/job.json"
try stop-a-sibling python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1] + "/owner.sock"); s.sendall(b"{\"op\":\"stop\",\"v\":1,\"reason\":\"cancelled\"}\n"); sys.exit(0 if s.recv(200) else 1)' "$sib"
try forge-a-sibling-exit sh -c "echo '{}' > '$sib/exit.json'"
try forge-its-own-exit sh -c 'for d in /var/lib/rsql-agent/owners/*/; do echo "{}" > "$d/exit.json"; done'
try kill-its-owner kill -KILL "$PPID"
try read-the-owners-environment cat "/proc/$PPID/environ"
try read-the-agents-environment cat "/proc/$agent/environ"
try read-the-agents-journal sh -c 'journalctl -u rsql-agent --no-pager -q | grep -q .'
try leave-its-cgroup-for-the-root sh -c 'echo $$ > /sys/fs/cgroup/cgroup.procs'
try leave-its-cgroup-for-its-unit sh -c 'cg=$(sed -n "s/^0:://p" /proc/self/cgroup); echo $$ > "/sys/fs/cgroup${cg%/*}/cgroup.procs"'
try become-root-with-systemd-run systemd-run --quiet --wait --property=User=root true
try become-root-with-su su -s /bin/sh -c true root
try become-root-with-setuid python3 -c 'import os; os.setuid(0)'
try hold-a-capability sh -c 'grep -E "^Cap(Inh|Prm|Eff|Amb):" /proc/self/status | grep -vq "0000000000000000"'
try keep-a-socket-of-its-owner sh -c 'ls -l /proc/$$/fd | grep -q socket:'
try trace-a-sibling python3 -c 'import ctypes, sys; sys.exit(0 if ctypes.CDLL(None).ptrace(16, int(sys.argv[1]), 0, 0) == 0 else 1)' "$2"
try read-a-siblings-memory python3 -c 'import ctypes, sys; b = ctypes.create_string_buffer(8); local = (ctypes.c_void_p * 2)(ctypes.addressof(b), 8); start = int(open("/proc/%s/maps" % sys.argv[1]).readline().split("-")[0], 16); remote = (ctypes.c_void_p * 2)(start, 8); sys.exit(0 if ctypes.CDLL(None).process_vm_readv(int(sys.argv[1]), local, 1, remote, 1, 0) > 0 else 1)' "$2"
echo "tried everything"
"##;

/// A socket-only agent on the package's units and paths, the emulator, and the sandbox.
struct Host {
    world: World,
    sandbox: Sandbox,
}

impl Host {
    /// Boots a sandbox, installs the package, writes the config and scripts, and starts
    /// the agent with `systemctl enable --now`, as bootstrap.sh does.
    async fn new(name: &str) -> Host {
        let world = World::builder(name)
            .job_table()
            .socket_only()
            .state_machine(StateMachine::Capture)
            .build()
            .await;
        let sandbox = Sandbox::boot(name);
        sandbox.install(&package());
        let config = format!(
            "[agent]\nstate_dir = \"/var/lib/rsql-agent\"\ninstance_id = \"i-sandbox\"\n\
             [jobs]\nscript_dir = \"{SCRIPTS}\"\nlog_dir = \"/var/log/rsql-agent/jobs\"\n\
             kill_grace = \"2s\"\n\
             [intake.socket]\npath = \"{SOCKET}\"\n\
             [report.audit]\njob_table = \"{}\"\n",
            world.job_table()
        );
        sandbox.configure_agent(&world.moto.endpoint(), &config);
        for (name, text) in [
            ("gated.sh", GATED),
            ("escapee.sh", ESCAPEE),
            ("stubborn.sh", STUBBORN),
            ("hostile.sh", HOSTILE),
        ] {
            sandbox.write(&format!("{SCRIPTS}/{name}"), text, 0o755);
        }
        sandbox.ok(&["systemctl", "enable", "--now", "rsql-agent"]);
        sandbox.wait_active("rsql-agent", WAIT);
        Host { world, sandbox }
    }

    /// Starts an execution for `execution_id` and submits `job` with its token; returns the
    /// execution's ARN.
    async fn start(&self, execution_id: &str, job: &str, timeout: u64, args: &[&str]) -> String {
        let (exec, token) = self.world.execution(execution_id).await;
        let timeout = timeout.to_string();
        let mut argv = vec![
            "rsql-wrapper",
            "submit",
            "--task-token",
            &token,
            "--workflow-id",
            "sandbox_wf",
            "--workflow-execution-id",
            execution_id,
            "--job-name",
            job,
            "--timeout-seconds",
            &timeout,
            "--heartbeat-seconds",
            "60",
            "--socket",
            SOCKET,
            "--",
        ];
        argv.extend_from_slice(args);
        let out = self.sandbox.exec(&argv);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("accepted"),
            "submit of {job} was not accepted:\n{}\n{}",
            show(&out),
            self.sandbox.journal("rsql-agent")
        );
        exec
    }

    fn evidence_path(&self, execution_id: &str, what: &str) -> PathBuf {
        self.sandbox.out().join(format!("{execution_id}.{what}"))
    }

    fn evidence(&self, execution_id: &str, what: &str) -> Option<String> {
        std::fs::read_to_string(self.evidence_path(execution_id, what)).ok()
    }

    async fn wait_evidence(&self, execution_id: &str, what: &str) -> String {
        eventually(&format!("{execution_id}.{what}"), WAIT, || async {
            self.evidence(execution_id, what)
                .filter(|text| !text.trim().is_empty())
        })
        .await
    }

    fn release(&self, execution_id: &str) {
        std::fs::write(self.evidence_path(execution_id, "release"), "").expect("release");
    }

    /// Every process of the jobs' user, as `pgrep -a` lists them ("" when none).
    fn job_processes(&self) -> String {
        String::from_utf8_lossy(&self.sandbox.exec(&["pgrep", "-a", "-u", "rsql-job"]).stdout)
            .trim()
            .to_string()
    }

    fn agent_pid(&self) -> String {
        self.sandbox
            .ok(&[
                "systemctl",
                "show",
                "-p",
                "MainPID",
                "--value",
                "rsql-agent",
            ])
            .trim()
            .to_string()
    }

    /// Waits until the agent runs again with another main pid than `old` (after a restart
    /// or a crash that systemd restarts).
    async fn wait_new_agent(&self, old: &str) {
        eventually("the agent to run again under a new pid", WAIT, || async {
            let pid = self.agent_pid();
            let active = self.sandbox.exec(&["systemctl", "is-active", "rsql-agent"]);
            (pid != old && pid != "0" && String::from_utf8_lossy(&active.stdout).trim() == "active")
                .then_some(())
        })
        .await;
    }

    async fn finished(&self, exec: &str) -> serde_json::Value {
        let done = self.world.wait_execution(exec).await;
        assert_eq!(
            *done.status(),
            ExecutionStatus::Succeeded,
            "{}",
            self.sandbox.journal("rsql-agent")
        );
        moto::execution_output(&done)
    }

    /// How many times the agent's journal says `execution_id`'s job finished.
    fn finish_lines(&self, execution_id: &str) -> usize {
        self.sandbox
            .journal("rsql-agent")
            .lines()
            .filter(|l| l.contains(&format!("({execution_id}): job finished")))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_package_runs_a_job_as_the_job_user_in_a_unit_of_its_own() {
    let host = Host::new("runs").await;
    let exec = host.start("sbx_runs_1", "gated.sh", 120, &[]).await;
    assert_eq!(
        host.wait_evidence("sbx_runs_1", "user").await.trim(),
        "rsql-job"
    );
    let cgroup = host.wait_evidence("sbx_runs_1", "cgroup").await;
    assert!(
        cgroup.contains("/rsql-jobs.slice/rsql-job-owner@"),
        "the job is not in an owner unit of rsql-jobs.slice: {cgroup}"
    );
    host.release("sbx_runs_1");
    let output = host.finished(&exec).await;
    assert_eq!(output["status"], "completed", "{output}");
    assert_eq!(output["exit_code"], 0, "{output}");

    // The journal, read as a person reads it: which job, which execution, what happened.
    let journal = host.sandbox.journal("rsql-agent");
    assert!(
        journal.contains("gated.sh (sbx_runs_1): job started"),
        "{journal}"
    );
    assert!(
        journal.contains("gated.sh (sbx_runs_1): job finished status=completed"),
        "{journal}"
    );
    for noise in ["timeout settings for this operation", "resolving endpoint"] {
        assert!(
            !journal.contains(noise),
            "SDK debug line in the journal: {noise}\n{journal}"
        );
    }
    let system = String::from_utf8_lossy(
        &host
            .sandbox
            .exec(&["journalctl", "--no-pager", "-o", "cat"])
            .stdout,
    )
    .into_owned();
    assert!(
        !system.contains("reception only permitted for main PID"),
        "a child of the agent notified systemd:\n{system}"
    );
    assert_eq!(host.job_processes(), "", "a job process outlived its job");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_upgrade_crash_and_stop_then_start_leave_the_job_running_once() {
    let host = Host::new("lives").await;
    let exec = host.start("sbx_lives_1", "gated.sh", 300, &[]).await;
    host.wait_evidence("sbx_lives_1", "runs").await;

    let pid = host.agent_pid();
    host.sandbox.ok(&["systemctl", "restart", "rsql-agent"]);
    host.wait_new_agent(&pid).await;

    // The same package again: the postinst of an upgrade (try-restart).
    let pid = host.agent_pid();
    host.sandbox.install(&package());
    host.wait_new_agent(&pid).await;

    // A crash: systemd restarts the agent (Restart=on-failure).
    let pid = host.agent_pid();
    host.sandbox
        .ok(&["systemctl", "kill", "--signal=SIGKILL", "rsql-agent"]);
    host.wait_new_agent(&pid).await;

    host.sandbox.ok(&["systemctl", "stop", "rsql-agent"]);
    let alive = host.job_processes();
    assert!(
        alive.contains("gated.sh"),
        "the job did not outlive `systemctl stop rsql-agent`: {alive:?}\n{}",
        host.sandbox.journal_all()
    );
    host.sandbox.ok(&["systemctl", "start", "rsql-agent"]);
    host.sandbox.wait_active("rsql-agent", WAIT);

    host.release("sbx_lives_1");
    let output = host.finished(&exec).await;
    assert_eq!(output["status"], "completed", "{output}");
    let runs = host.evidence("sbx_lives_1", "runs").unwrap_or_default();
    assert_eq!(
        runs.lines().count(),
        1,
        "the job started more than once: {runs}"
    );
    assert_eq!(
        host.finish_lines("sbx_lives_1"),
        1,
        "{}",
        host.sandbox.journal("rsql-agent")
    );
    assert_eq!(host.job_processes(), "", "a job process outlived its job");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setsid_escapee_without_the_markers_is_gone_when_the_job_is_reported() {
    let host = Host::new("escapee").await;
    let exec = host.start("sbx_escapee_1", "escapee.sh", 120, &[]).await;
    let output = host.finished(&exec).await;
    assert_eq!(output["status"], "completed", "{output}");
    let pid = host.wait_evidence("sbx_escapee_1", "escapee").await;
    let alive = host.sandbox.exec(&["kill", "-0", pid.trim()]);
    assert!(
        !alive.status.success(),
        "the escapee {} is still alive: {}",
        pid.trim(),
        host.job_processes()
    );
    assert_eq!(host.job_processes(), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_ignores_sigterm_is_gone_after_its_timeout_and_kill_grace() {
    let host = Host::new("stubborn").await;
    let exec = host.start("sbx_stubborn_1", "stubborn.sh", 3, &[]).await;
    host.wait_evidence("sbx_stubborn_1", "pid").await;
    let done = host.world.wait_execution(&exec).await;
    let output = moto::execution_output(&done);
    assert_eq!(
        output["error"]["Error"],
        "Rsql.Timeout",
        "{output}\n{}",
        host.sandbox.journal_all()
    );
    assert_eq!(
        host.job_processes(),
        "",
        "the stubborn job outlived its kill"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_can_neither_control_the_agent_nor_touch_another_job() {
    let host = Host::new("hostile").await;
    let sibling = host.start("sbx_sibling_1", "gated.sh", 300, &[]).await;
    host.wait_evidence("sbx_sibling_1", "runs").await;
    let owners = host.sandbox.ok(&["ls", "/var/lib/rsql-agent/owners"]);
    let sibling_dir = format!(
        "/var/lib/rsql-agent/owners/{}",
        owners
            .lines()
            .next()
            .expect("the sibling's owner directory")
    );
    let sibling_token = {
        let job = host
            .sandbox
            .ok(&["cat", &format!("{sibling_dir}/job.json")]);
        let job: serde_json::Value = serde_json::from_str(&job).expect("job.json");
        job["task_token"].as_str().expect("a token").to_string()
    };

    let sibling_pid = host
        .evidence("sbx_sibling_1", "runs")
        .unwrap_or_default()
        .trim()
        .to_string();
    let hostile = host
        .start(
            "sbx_hostile_1",
            "hostile.sh",
            120,
            &[&sibling_dir, &sibling_pid],
        )
        .await;
    let output = host.finished(&hostile).await;
    assert_eq!(output["status"], "completed", "{output}");
    let tries = host.evidence("sbx_hostile_1", "tries").unwrap_or_default();
    assert_eq!(tries.lines().count(), 24, "not every try ran:\n{tries}");
    let allowed: Vec<&str> = tries
        .lines()
        .filter(|l| !l.starts_with("denied "))
        .collect();
    assert!(
        allowed.is_empty(),
        "a job could do what it must not:\n{tries}"
    );
    let env = host.evidence("sbx_hostile_1", "env").unwrap_or_default();
    assert!(
        !env.contains(&sibling_token),
        "a job sees a sibling's task token"
    );
    assert!(
        !env.contains("task_token") && !env.contains("TASK_TOKEN"),
        "{env}"
    );

    // The sibling was neither stopped nor reported by anyone else, and the agent still
    // takes jobs: it did not drain.
    host.release("sbx_sibling_1");
    let output = host.finished(&sibling).await;
    assert_eq!(
        output["status"],
        "completed",
        "{output}\n{tries}\n{}",
        host.sandbox.journal_all()
    );
    let after = host.start("sbx_after_1", "escapee.sh", 120, &[]).await;
    let output = host.finished(&after).await;
    assert_eq!(output["status"], "completed", "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shutdown_reports_the_running_job_interrupted_before_the_agent_stops() {
    let mut host = Host::new("shutdown").await;
    let exec = host.start("sbx_shutdown_1", "gated.sh", 300, &[]).await;
    host.wait_evidence("sbx_shutdown_1", "runs").await;
    // Wait for the running audit item: the agent has fully handed the job over.
    host.world
        .wait_audit("gated.sh", "sbx_shutdown_1", "running")
        .await;
    let stopped = host.sandbox.power_off();
    assert!(!stopped.contains("SIGKILL"), "the shutdown hung: {stopped}");
    let done = tokio::time::timeout(Duration::from_secs(60), host.world.wait_execution(&exec))
        .await
        .expect("the execution ended");
    let output = moto::execution_output(&done);
    assert_eq!(output["error"]["Error"], "Rsql.Interrupted", "{output}");
    let runs = host.evidence("sbx_shutdown_1", "runs").unwrap_or_default();
    assert_eq!(runs.lines().count(), 1, "{runs}");
}
