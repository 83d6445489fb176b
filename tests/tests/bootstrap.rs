//! packaging/bootstrap.sh (the EC2 user data): the dry run prints the documented actions
//! (package install, EFS mount with the NFSv4.1 options, fstab, config, systemctl), picks the
//! package and the installer by distribution (the `/etc/os-release` fixtures in
//! `tests/fixtures/os-release/`), the config it writes is a valid agent config, and the
//! scripts are shellcheck-clean.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs the dry run as on the host that `os_release` (a file in tests/fixtures/os-release/)
/// describes, with an empty fstab; returns (exit status ok, stderr) — every dry-run action
/// goes to stderr.
fn dry_run_on(os_release: &str, args: &[&str]) -> (bool, String) {
    dry_run_with_fstab(os_release, std::path::Path::new("/dev/null"), args)
}

/// [`dry_run_on`] with `fstab` as the host's /etc/fstab.
fn dry_run_with_fstab(os_release: &str, fstab: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("bash")
        .arg(repo().join("packaging/bootstrap.sh"))
        .arg("--dry-run")
        .args(args)
        .env(
            "BOOTSTRAP_OS_RELEASE",
            repo().join("tests/fixtures/os-release").join(os_release),
        )
        .env("BOOTSTRAP_FSTAB", fstab)
        .output()
        .expect("run bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The dry run on a Debian 12 host.
fn dry_run(args: &[&str]) -> (bool, String) {
    dry_run_on("debian-12", args)
}

/// What a fleet's user data passes: both packages, for bootstrap to pick from.
const BOTH: [&str; 4] = [
    "--package",
    "https://example.invalid/rsql-agent_0.1.0-1_amd64.deb",
    "--package",
    "https://example.invalid/rsql-agent-0.1.0-1.x86_64.rpm",
];

#[test]
fn dry_run_prints_every_action() {
    // A script dir that exists here, so the config validates as it would on the instance.
    let scripts = repo().join("rsql_scripts");
    let scripts = scripts.to_str().unwrap();
    let (ok, out) = dry_run(&[
        "--script-dir",
        scripts,
        "--package",
        "https://example.invalid/rsql-agent_0.1.0-1_amd64.deb",
        "--region",
        "us-east-1",
        "--efs",
        "fs-12345678",
        "--queue-url",
        "https://sqs.us-east-1.amazonaws.com/123456789012/rsql-jobs",
        "--log-group",
        "/ops/rsql-logs/",
        "--job-table",
        "rsql-job-audit",
        "--secret-id",
        "rsql/redshift",
    ]);
    assert!(ok, "dry run failed:\n{out}");
    let opts = "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport";
    for expected in [
        "+ curl -fsSL --retry 5 -o /var/tmp/rsql-agent_0.1.0-1_amd64.deb https://example.invalid/rsql-agent_0.1.0-1_amd64.deb",
        "apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold /var/tmp/rsql-agent_0.1.0-1_amd64.deb",
        &format!("+ mount -t nfs4 -o {opts} fs-12345678.efs.us-east-1.amazonaws.com:/ /mnt/efs"),
        "+ install -d -m 0750 -o rsql -g rsql /mnt/efs/rsql-agent/locks",
        "+ write /etc/rsql-agent/agent.toml (mode 0640, owner root:rsql):",
        "|   queue_url = \"https://sqs.us-east-1.amazonaws.com/123456789012/rsql-jobs\"",
        "|   dir = \"/mnt/efs/rsql-agent/locks\"",
        &format!("|   script_dir = \"{scripts}\""),
        "|   log_group = \"/ops/rsql-logs/\"",
        "|   job_table = \"rsql-job-audit\"",
        "|   secret_id = \"rsql/redshift\"",
        "+ /usr/bin/rsql-agent check-config /etc/rsql-agent/agent.toml",
        "+ systemctl enable --now rsql-agent",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
    assert!(
        out.contains(&format!(
            "+ append to /dev/null: fs-12345678.efs.us-east-1.amazonaws.com:/ /mnt/efs nfs4 {opts},_netdev 0 0"
        )),
        "no fstab entry in:\n{out}"
    );
    assert!(
        !out.contains("[fleet]"),
        "no fleet flags, no [fleet]:\n{out}"
    );
    assert!(!out.contains("nolock") && !out.contains("local_lock"));

    // The config it would write is a valid agent config.
    let config: String = out
        .lines()
        .filter_map(|l| l.strip_prefix("|   "))
        .collect::<Vec<_>>()
        .join("\n");
    let parsed = rsql_agent::config::Config::parse(&config, std::path::Path::new("agent.toml"));
    assert!(parsed.is_ok(), "{parsed:?}\n{config}");
}

#[test]
fn dry_run_reads_the_config_from_ssm_and_installs_rpms() {
    let (ok, out) = dry_run_on(
        "rhel-8",
        &[
            "--package",
            "/tmp/rsql-agent-0.1.0-1.x86_64.rpm",
            "--config-parameter",
            "/rsql-agent/config",
        ],
    );
    assert!(ok, "dry run failed:\n{out}");
    assert!(
        out.contains("+ dnf install -y -q /tmp/rsql-agent-0.1.0-1.x86_64.rpm"),
        "{out}"
    );
    assert!(
        out.contains("+ aws ssm get-parameter --name /rsql-agent/config --with-decryption"),
        "{out}"
    );
    assert!(!out.contains("mount -t nfs4"), "no --efs, no mount:\n{out}");
    assert!(out.contains("+ systemctl enable --now rsql-agent"), "{out}");
}

#[test]
fn the_package_and_the_installer_follow_the_distribution() {
    let deb = "/var/tmp/rsql-agent_0.1.0-1_amd64.deb";
    let rpm = "/var/tmp/rsql-agent-0.1.0-1.x86_64.rpm";
    // (fixture, the name it prints, the package, the install command): the glibc 2.17
    // packages install on all of them; yum where the distribution has no dnf.
    for (os_release, name, package, install) in [
        ("amzn-2", "Amazon Linux 2", rpm, format!("+ yum install -y -q {rpm}")),
        ("centos-7", "CentOS Linux 7 (Core)", rpm, format!("+ yum install -y -q {rpm}")),
        (
            "rhel-8",
            "Red Hat Enterprise Linux 8.10 (Ootpa)",
            rpm,
            format!("+ dnf install -y -q {rpm}"),
        ),
        ("amzn-2023", "Amazon Linux 2023.6.20250107", rpm, format!("+ dnf install -y -q {rpm}")),
        (
            "debian-12",
            "Debian GNU/Linux 12 (bookworm)",
            deb,
            format!("+ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold {deb}"),
        ),
        (
            "ubuntu-22.04",
            "Ubuntu 22.04.5 LTS",
            deb,
            format!("+ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold {deb}"),
        ),
    ] {
        let mut args = BOTH.to_vec();
        args.extend(["--region", "us-east-1", "--efs", "fs-12345678"]);
        let (ok, out) = dry_run_on(os_release, &args);
        assert!(ok, "{os_release}: dry run failed:\n{out}");
        let url = format!("https://example.invalid/{}", &package["/var/tmp/".len()..]);
        let installer = if package == deb {
            "apt-get"
        } else {
            install.split(' ').nth(1).unwrap()
        };
        assert!(
            out.contains(&format!("+ host: {name}; package: {url}, with {installer}")),
            "{os_release}: {out}"
        );
        assert!(
            out.contains(&format!("+ curl -fsSL --retry 5 -o {package} {url}")),
            "{os_release}: {out}"
        );
        assert!(out.contains(&install), "{os_release}: no `{install}` in:\n{out}");
        let other = if package == deb { rpm } else { deb };
        assert!(!out.contains(other), "{os_release}: the other package too:\n{out}");
        // The NFS client, when this machine lacks one, comes from the same installer.
        if out.contains("nfs-") {
            let nfs = if package == deb {
                "apt-get install -y -q nfs-common"
            } else {
                &format!("+ {installer} install -y -q nfs-utils")
            };
            assert!(out.contains(nfs), "{os_release}: no `{nfs}` in:\n{out}");
        }
        assert!(out.contains("+ systemctl enable --now rsql-agent"), "{os_release}: {out}");
    }
}

#[test]
fn a_package_of_the_wrong_kind_is_refused() {
    let (ok, out) = dry_run_on(
        "amzn-2",
        &["--package", "/tmp/rsql-agent_0.1.0-1_amd64.deb"],
    );
    assert!(!ok);
    assert!(
        out.contains(
            "this host is Amazon Linux 2, which installs .rpm packages: no --package is a .rpm"
        ),
        "{out}"
    );
    assert!(!out.contains("install -y"), "{out}");
    let (ok, out) = dry_run_on(
        "debian-12",
        &["--package", "/tmp/rsql-agent-0.1.0-1.x86_64.rpm"],
    );
    assert!(!ok);
    assert!(out.contains("which installs .deb packages"), "{out}");
    // Two of one kind: which one is meant?
    let (ok, out) = dry_run_on("rhel-8", &["--package", "a.rpm", "--package", "b.rpm"]);
    assert!(!ok);
    assert!(out.contains("more than one .rpm --package"), "{out}");
    // No os-release it knows: one package is installed by its kind, two are refused.
    let (ok, out) = dry_run_on("does-not-exist", &BOTH);
    assert!(!ok);
    assert!(
        out.contains("cannot tell which --package fits this host"),
        "{out}"
    );
}

/// The `[fleet]` lines of a dry run's config, in order.
fn fleet_table(out: &str) -> Vec<&str> {
    out.lines()
        .filter_map(|l| l.strip_prefix("|   "))
        .skip_while(|l| *l != "[fleet]")
        .take_while(|l| *l == "[fleet]" || !l.starts_with('['))
        .collect()
}

#[test]
fn dry_run_writes_the_fleet_table_from_its_flags() {
    let base = ["--package", "x.deb", "--queue-url", "https://sqs.example/q"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend(extra);
        let (ok, out) = dry_run(&args);
        assert!(ok, "dry run failed:\n{out}");
        out
    };
    let out = with(&[
        "--auto-scaling-group",
        "rsql-fleet",
        "--lifecycle-hook",
        "rsql-terminating",
    ]);
    assert_eq!(
        fleet_table(&out),
        [
            "[fleet]",
            "auto_scaling_group = \"rsql-fleet\"",
            "lifecycle_hook = \"rsql-terminating\"",
        ],
        "{out}"
    );
    // Only the keys given: the agent asks Auto Scaling for the rest.
    let out = with(&["--lifecycle-hook", "rsql-terminating"]);
    assert_eq!(
        fleet_table(&out),
        ["[fleet]", "lifecycle_hook = \"rsql-terminating\""],
        "{out}"
    );
    let out = with(&["--auto-scaling-group", "My Fleet (prod)"]);
    assert_eq!(
        fleet_table(&out),
        ["[fleet]", "auto_scaling_group = \"My Fleet (prod)\""],
        "{out}"
    );
    assert!(fleet_table(&with(&[])).is_empty());
    // What bootstrap writes is what the agent reads.
    let scripts = tempfile::tempdir().expect("tempdir");
    let table = fleet_table(&with(&[
        "--auto-scaling-group",
        "rsql-fleet",
        "--lifecycle-hook",
        "rsql-terminating",
    ]))
    .join("\n");
    let text = format!(
        "[jobs]\nscript_dir = \"{}\"\n{table}\n",
        scripts.path().display()
    );
    let parsed = rsql_agent::config::Config::parse(&text, std::path::Path::new("agent.toml"))
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(
        parsed.fleet.auto_scaling_group.as_deref(),
        Some("rsql-fleet")
    );
    assert_eq!(
        parsed.fleet.lifecycle_hook.as_deref(),
        Some("rsql-terminating")
    );

    // Validated like the other values, and against Auto Scaling's own name rules.
    for (args, expected) in [
        (["--auto-scaling-group", "a\"b"], "not allowed"),
        (["--lifecycle-hook", "a\\b"], "not allowed"),
        (
            ["--lifecycle-hook", "no spaces"],
            "--lifecycle-hook must be",
        ),
        (["--lifecycle-hook", "ok;rm"], "--lifecycle-hook must be"),
    ] {
        let mut all = base.to_vec();
        all.extend(args);
        let (ok, out) = dry_run(&all);
        assert!(!ok, "{args:?} accepted:\n{out}");
        assert!(out.contains(expected), "{args:?}: {out}");
    }
    let long = "g".repeat(256);
    let (ok, out) = dry_run(&["--package", "x.deb", "--auto-scaling-group", &long]);
    assert!(!ok && out.contains("longer than 255"), "{out}");
    let (ok, out) = dry_run(&["--package", "x.deb", "--lifecycle-hook"]);
    assert!(
        !ok && out.contains("--lifecycle-hook needs a value"),
        "{out}"
    );
}

#[test]
fn an_efs_mount_already_in_fstab_below_the_mount_point_is_kept_and_mounted() {
    // As the stack's user data leaves it: its access point at /mnt/efs/rsql-agent.
    let dir = tempfile::tempdir().expect("temp dir");
    let fstab = dir.path().join("fstab");
    std::fs::write(
        &fstab,
        "# a comment at /mnt/efs/x\n\
         UUID=1 / ext4 defaults 0 1\n\
         fs-12345678:/ /mnt/efs/rsql-agent efs _netdev,tls,iam,accesspoint=fsap-1,nfsvers=4.1 0 0\n",
    )
    .expect("write fstab");
    let (ok, out) = dry_run_with_fstab(
        "amzn-2023",
        &fstab,
        &[
            "--package",
            "/tmp/rsql-agent-0.1.0-1.x86_64.rpm",
            "--region",
            "us-east-1",
            "--efs",
            "fs-12345678",
        ],
    );
    assert!(ok, "dry run failed:\n{out}");
    assert!(out.contains("+ mount /mnt/efs/rsql-agent\n"), "{out}");
    assert!(!out.contains("append to"), "{out}");
    assert!(!out.contains("mount -t nfs4"), "{out}");
    assert!(!out.contains("nfs-utils"), "{out}");
    assert!(
        out.contains("+ install -d -m 0750 -o rsql -g rsql /mnt/efs/rsql-agent/locks"),
        "{out}"
    );
    assert!(
        out.contains("|   dir = \"/mnt/efs/rsql-agent/locks\""),
        "{out}"
    );
}

#[test]
fn bad_input_is_refused() {
    let (ok, out) = dry_run(&["--package", "x.deb", "--queue-url", "a\"b"]);
    assert!(!ok);
    assert!(out.contains("not allowed"), "{out}");
    let (ok, out) = dry_run(&["--package", "x.tar.gz"]);
    assert!(!ok);
    assert!(out.contains(".deb or .rpm"), "{out}");
    let (ok, _) = dry_run(&[]);
    assert!(!ok, "--package is required");
}

#[test]
fn scripts_are_shellcheck_clean() {
    let status = Command::new("shellcheck")
        .arg(repo().join("packaging/bootstrap.sh"))
        .arg(repo().join("packaging/check-systemd.sh"))
        .arg(repo().join("packaging/check-package.sh"))
        .arg(repo().join("packaging/check-glibc.sh"))
        .arg(repo().join("packaging/fetch-rust-aarch64.sh"))
        .arg(repo().join("packaging/rsql_trigger.sh"))
        .arg(repo().join("packaging/legacy/get_redshift_creds.sh"))
        .args(["postinst", "prerm", "postrm"].map(|f| repo().join("packaging/deb").join(f)))
        .args(
            [
                "pre-install.sh",
                "post-install.sh",
                "pre-uninstall.sh",
                "post-uninstall.sh",
            ]
            .map(|f| repo().join("packaging/rpm").join(f)),
        )
        .status()
        .expect("shellcheck is missing: run .ci/install-deps (apt-get install shellcheck)");
    assert!(status.success(), "shellcheck found problems");
}
