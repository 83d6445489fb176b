//! packaging/aws/stack.yaml's fleet (`CreateFleet`), read as CloudFormation reads it: the user
//! data takes every agent setting from the stack's own resources, through flags
//! packaging/bootstrap.sh accepts; the lock dir is on the stack's EFS, mounted through its
//! access point under the uid the user data gives `rsql`, below a local directory jobs cannot
//! traverse; the group and lifecycle hook the agents are told about (`[fleet]`, through
//! bootstrap.sh's flags) are the stack's own; the lifecycle and protection rights reach that
//! group only; and a stack without the fleet creates none of it.
//!
//! The template's short tags (`!Ref`, `!Sub`, ...) are read by cfn-lint's own loader
//! (`cfnlint.decode`) from the tests' Python environment (`make venv`), which turns them into
//! the long form (`{"Ref": ...}`, `{"Fn::Sub": ...}`). No AWS call is made.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The template in CloudFormation's long form.
fn template() -> Value {
    let python = rsql_agent_tests::moto::venv_dir()
        .join("bin")
        .join("python");
    let script = "import json, sys\n\
                  from cfnlint.decode import decode\n\
                  template, problems = decode(sys.argv[1])\n\
                  if problems:\n\
                  \x20   sys.exit('\\n'.join(str(p) for p in problems))\n\
                  json.dump(template, sys.stdout)\n";
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(repo().join("packaging/aws/stack.yaml"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}): run `make venv` (cfn-lint is pinned in \
                 tests/moto/requirements.txt), or point RSQL_TEST_VENV at a venv that has it",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "cfn-lint's loader refused packaging/aws/stack.yaml (`make venv` installs cfn-lint):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the loader prints JSON")
}

fn resource<'a>(t: &'a Value, name: &str) -> &'a Value {
    t.pointer(&format!("/Resources/{name}"))
        .unwrap_or_else(|| panic!("the stack has no resource {name}"))
}

fn resource_type<'a>(t: &'a Value, name: &str) -> &'a str {
    resource(t, name)["Type"]
        .as_str()
        .expect("a resource has a Type")
}

fn props<'a>(t: &'a Value, name: &str) -> &'a Value {
    &resource(t, name)["Properties"]
}

/// The text of a `!Sub "..."` (the short form, without a variable map).
fn sub_text(v: &Value) -> &str {
    v["Fn::Sub"]
        .as_str()
        .unwrap_or_else(|| panic!("expected a !Sub of a string, found {v}"))
}

/// The launch template's user data script, before substitution.
fn user_data(t: &Value) -> String {
    let data = &props(t, "FleetLaunchTemplate")["LaunchTemplateData"]["UserData"];
    sub_text(&data["Fn::Base64"]).to_string()
}

/// The `${Name}` placeholders of a `!Sub` text (`${!Literal}` is an escaped `${Literal}`).
fn placeholders(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after.find('}').expect("a ${ placeholder is closed");
        if !after.starts_with('!') {
            found.insert(after[..end].to_string());
        }
        rest = &after[end..];
    }
    found
}

/// The user data with every placeholder replaced by a plausible value, as CloudFormation
/// would hand it to the instance.
fn user_data_substituted(t: &Value) -> String {
    let mut text = user_data(t);
    for name in placeholders(&text) {
        let value = match name.as_str() {
            "AWS::Region" => "eu-west-1".to_string(),
            "AWS::StackName" => "rsql".to_string(),
            "AgentPosixId" => "2049".to_string(),
            other => format!("value-of-{}", other.replace(':', "")),
        };
        text = text.replace(&format!("${{{name}}}"), &value);
    }
    text
}

/// The single-quoted or bare value that follows `flag ` in `text`.
fn flag_value<'a>(text: &'a str, flag: &str) -> &'a str {
    let at = text
        .find(&format!("{flag} "))
        .unwrap_or_else(|| panic!("the user data passes no {flag}"));
    let value = text[at + flag.len() + 1..]
        .split_whitespace()
        .next()
        .expect("a flag has a value");
    value.trim_matches('\'')
}

/// The flags packaging/bootstrap.sh's argument loop accepts (`--name)` case arms).
fn bootstrap_flags() -> BTreeSet<String> {
    let script = std::fs::read_to_string(repo().join("packaging/bootstrap.sh"))
        .expect("read packaging/bootstrap.sh");
    script
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split_once(')'))
        .map(|(name, _)| format!("--{name}"))
        .filter(|f| !f.contains(' '))
        .collect()
}

/// A `readonly NAME=value` of packaging/bootstrap.sh.
fn bootstrap_constant(name: &str) -> String {
    let script = std::fs::read_to_string(repo().join("packaging/bootstrap.sh"))
        .expect("read packaging/bootstrap.sh");
    script
        .lines()
        .find_map(|l| l.strip_prefix(&format!("readonly {name}=")))
        .unwrap_or_else(|| panic!("packaging/bootstrap.sh has no readonly {name}"))
        .to_string()
}

/// The value of `Key=` in the agent's systemd unit (the first such line).
fn unit_value(key: &str) -> String {
    let unit = std::fs::read_to_string(repo().join("systemd/rsql-agent.service"))
        .expect("read systemd/rsql-agent.service");
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("systemd/rsql-agent.service has no {key}="))
        .to_string()
}

/// Every IAM statement of the stack, with the logical id of the role or policy holding it.
fn iam_statements(t: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (name, r) in t["Resources"].as_object().expect("Resources") {
        let docs: Vec<&Value> = match r["Type"].as_str() {
            Some("AWS::IAM::Role") => r["Properties"]["Policies"]
                .as_array()
                .map(|ps| ps.iter().map(|p| &p["PolicyDocument"]).collect())
                .unwrap_or_default(),
            Some("AWS::IAM::Policy") => vec![&r["Properties"]["PolicyDocument"]],
            _ => Vec::new(),
        };
        for doc in docs {
            for s in doc["Statement"]
                .as_array()
                .expect("a policy has statements")
            {
                out.push((name.clone(), s.clone()));
            }
        }
    }
    out
}

fn actions(statement: &Value) -> Vec<String> {
    match &statement["Action"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().expect("action").into())
            .collect(),
        other => panic!("unexpected Action {other}"),
    }
}

#[test]
fn user_data_takes_every_agent_setting_from_the_stacks_own_resources() {
    let t = template();
    let data = user_data(&t);

    // Every placeholder names something the stack has: a typo would fail only at deploy.
    for name in placeholders(&data) {
        let known = name.starts_with("AWS::")
            || t["Parameters"].get(&name).is_some()
            || t["Resources"].get(&name).is_some();
        assert!(
            known,
            "the user data's ${{{name}}} is no parameter or resource of the stack"
        );
    }

    // bootstrap.sh writes agent.toml from these flags; each must come from the resource the
    // rest of the stack uses for the same thing, and be a flag bootstrap.sh knows.
    let accepted = bootstrap_flags();
    let expected = [
        ("--queue-url", "${JobQueue}", "AWS::SQS::Queue"),
        ("--log-group", "${JobLogGroup}", "AWS::Logs::LogGroup"),
        ("--job-table", "${JobAuditTable}", "AWS::DynamoDB::Table"),
        (
            "--workflow-table",
            "${WorkflowAuditTable}",
            "AWS::DynamoDB::Table",
        ),
        ("--efs", "${LockFileSystem}", "AWS::EFS::FileSystem"),
    ];
    for (flag, value, kind) in expected {
        assert!(
            accepted.contains(flag),
            "packaging/bootstrap.sh has no {flag}"
        );
        assert_eq!(flag_value(&data, flag), value, "the user data's {flag}");
        let name = &value[2..value.len() - 1];
        assert_eq!(resource_type(&t, name), kind, "{name}");
    }
    for (flag, parameter) in [
        ("--secret-id", "DatabaseSecretArn"),
        ("--fleet", "FleetName"),
    ] {
        assert!(
            accepted.contains(flag),
            "packaging/bootstrap.sh has no {flag}"
        );
        assert_eq!(
            flag_value(&data, flag),
            format!("${{{parameter}}}"),
            "{flag}"
        );
    }
    assert_eq!(flag_value(&data, "--region"), "${AWS::Region}");
    assert_eq!(flag_value(&data, "--package"), "${PackageS3Uri}");

    // The outputs a user with hosts of their own copies into agent.toml name the same
    // resources the fleet's user data uses.
    for (output, name) in [
        ("JobQueueUrl", "JobQueue"),
        ("JobLogGroup", "JobLogGroup"),
        ("JobAuditTable", "JobAuditTable"),
        ("WorkflowAuditTable", "WorkflowAuditTable"),
        ("LockFileSystemId", "LockFileSystem"),
    ] {
        assert_eq!(
            t["Outputs"][output]["Value"],
            json!({"Ref": name}),
            "output {output}"
        );
    }

    // And the agent's role may use exactly those: the queue, the tables, the log group, the
    // secret.
    let statements = iam_statements(&t);
    let agent = |sid: &str| -> Value {
        statements
            .iter()
            .find(|(role, s)| role == "AgentRole" && s["Sid"] == sid)
            .unwrap_or_else(|| panic!("AgentRole has no statement {sid}"))
            .1
            .clone()
    };
    assert_eq!(
        agent("TakeJobs")["Resource"],
        json!({"Fn::GetAtt": ["JobQueue", "Arn"]})
    );
    assert_eq!(
        agent("WriteAudit")["Resource"],
        json!([{"Fn::GetAtt": ["JobAuditTable", "Arn"]}, {"Fn::GetAtt": ["WorkflowAuditTable", "Arn"]}])
    );
    assert!(sub_text(&agent("ShipJobLogs")["Resource"]).contains("${JobLogGroup}"));
    assert_eq!(
        agent("ReadDatabaseSecret")["Resource"],
        json!({"Ref": "DatabaseSecretArn"})
    );

    // The agent handles scale-in itself: no side channel, no drain script of the stack's.
    for gone in ["fleet.env", "rsql-agent-scale-in", "rsql-agent drain"] {
        assert!(!data.contains(gone), "the user data still has {gone}");
    }

    // The script itself parses as bash.
    let substituted = user_data_substituted(&t);
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("user-data.sh");
    std::fs::write(&script, &substituted).expect("write user data");
    let status = Command::new("shellcheck")
        .args(["--shell=bash"])
        .arg(&script)
        .status()
        .expect("shellcheck is missing: run .ci/install-deps (apt-get install shellcheck)");
    assert!(
        status.success(),
        "shellcheck found problems in the stack's user data"
    );
}

#[test]
fn the_lock_dir_is_on_the_stacks_efs_through_its_access_point_as_rsql() {
    let t = template();
    let data = user_data(&t);

    // The fstab line: the stack's file system and access point, at `rsql-agent` below
    // bootstrap.sh's mount point (where bootstrap.sh keeps it) and above its lock dir, with
    // _netdev and none of the local-lock options that would let two instances run one job.
    let parent = bootstrap_constant("MOUNT_POINT");
    let mount_point = format!("{parent}/rsql-agent");
    let lock_dir = bootstrap_constant("LOCK_DIR");
    assert!(
        lock_dir.starts_with(&format!("{mount_point}/")),
        "{lock_dir}"
    );
    // The agent's unit waits for that mount and may write below it.
    assert_eq!(unit_value("RequiresMountsFor"), mount_point);
    assert_eq!(unit_value("ReadWritePaths"), format!("-{mount_point}"));
    let fstab = data
        .lines()
        .find(|l| l.contains(">>/etc/fstab") && l.contains(" efs "))
        .expect("the user data appends an efs line to /etc/fstab");
    let fields: Vec<&str> = fstab
        .trim_start()
        .trim_start_matches("echo '")
        .split_whitespace()
        .collect();
    assert_eq!(fields[0], "${LockFileSystem}:/");
    assert_eq!(fields[1], mount_point);
    assert!(
        data.contains(&format!(
            "grep -qE '^[^#]*[[:space:]]{mount_point}[[:space:]]' /etc/fstab ||"
        )),
        "the fstab line is added once"
    );
    assert_eq!(fields[2], "efs");
    let options: BTreeSet<&str> = fields[3].split(',').collect();
    for required in [
        "_netdev",
        "tls",
        "iam",
        "accesspoint=${LockAccessPoint}",
        "nfsvers=4.1",
        "hard",
    ] {
        assert!(
            options.contains(required),
            "fstab options lack {required}: {fstab}"
        );
    }
    assert!(
        !options
            .iter()
            .any(|o| *o == "nolock" || o.starts_with("local_lock")),
        "{fstab}"
    );
    // The user data mounts before bootstrap.sh runs, so bootstrap finds the mount in place.
    let mount_at = data
        .find(&format!("\n  mount {mount_point} ||"))
        .expect("the user data mounts the access point");
    let bootstrap_at = data
        .find("bash /var/tmp/rsql-agent-bootstrap.sh")
        .expect("the user data runs bootstrap.sh");
    assert!(mount_at < bootstrap_at);

    // The access point makes every local user rsql on EFS, so the server cannot keep a job
    // (rsql-job) out of the lock dir: the local directory above the mount does, traversable by
    // root and rsql only, and made before the mount.
    let guard = data
        .find(&format!("install -d -m 0710 -o root -g rsql {parent}\n"))
        .unwrap_or_else(|| panic!("the user data makes {parent} root:rsql 0710"));
    assert!(guard < mount_at);

    // The access point imposes AgentPosixId, and the user data gives rsql that uid and gid
    // before the package could make rsql with a dynamic one.
    let ap = props(&t, "LockAccessPoint");
    let id = json!({"Ref": "AgentPosixId"});
    assert_eq!(ap["FileSystemId"], json!({"Ref": "LockFileSystem"}));
    assert_eq!(ap["PosixUser"], json!({"Uid": id, "Gid": id}));
    let creation = &ap["RootDirectory"]["CreationInfo"];
    assert_eq!(creation["OwnerUid"], id);
    assert_eq!(creation["OwnerGid"], id);
    assert_eq!(
        creation["Permissions"], "0750",
        "not writable by the group or others"
    );
    assert!(data.contains("posix_id=${AgentPosixId}\n"));
    let groupadd = data
        .find("groupadd --system --gid \"$posix_id\" rsql")
        .expect("groupadd");
    let useradd = data
        .find("useradd --system --uid \"$posix_id\" --gid rsql")
        .expect("useradd");
    assert!(
        groupadd < guard && useradd < guard,
        "rsql exists before {parent} is given to it"
    );

    // Encrypted; NFS reaches it only from the fleet's own security group; and mounting needs
    // TLS and an access point, whoever asks.
    let fs = props(&t, "LockFileSystem");
    assert_eq!(fs["Encrypted"], json!(true));
    let denials: Vec<&Value> = fs["FileSystemPolicy"]["Statement"]
        .as_array()
        .expect("a file system policy")
        .iter()
        .filter(|s| s["Effect"] == "Deny")
        .collect();
    assert!(denials
        .iter()
        .any(|s| s["Condition"]["Bool"]["aws:SecureTransport"] == "false"));
    assert!(denials
        .iter()
        .any(|s| s["Condition"]["Null"]["elasticfilesystem:AccessPointArn"] == "true"));
    let ingress = props(&t, "LockFileSystemSecurityGroup")["SecurityGroupIngress"]
        .as_array()
        .expect("ingress rules");
    assert_eq!(ingress.len(), 1, "NFS from the fleet and nothing else");
    assert_eq!(ingress[0]["FromPort"], json!(2049));
    assert_eq!(ingress[0]["ToPort"], json!(2049));
    assert_eq!(
        ingress[0]["SourceSecurityGroupId"],
        json!({"Ref": "InstanceSecurityGroup"})
    );
    let launch = &props(&t, "FleetLaunchTemplate")["LaunchTemplateData"];
    assert_eq!(
        launch["SecurityGroupIds"],
        json!([{"Ref": "InstanceSecurityGroup"}])
    );
    for target in ["LockMountTarget1", "LockMountTarget2", "LockMountTarget3"] {
        assert_eq!(
            props(&t, target)["FileSystemId"],
            json!({"Ref": "LockFileSystem"})
        );
        assert_eq!(
            props(&t, target)["SecurityGroups"],
            json!([{"Ref": "LockFileSystemSecurityGroup"}])
        );
    }

    // The agent's role mounts through that access point only.
    let efs: Vec<Value> = iam_statements(&t)
        .into_iter()
        .filter(|(_, s)| {
            actions(s)
                .iter()
                .any(|a| a.starts_with("elasticfilesystem:"))
        })
        .map(|(_, s)| s)
        .collect();
    assert!(!efs.is_empty(), "the agent may mount the lock file system");
    for s in efs {
        assert_eq!(
            s["Resource"],
            json!({"Fn::GetAtt": ["LockFileSystem", "Arn"]})
        );
        assert_eq!(
            s["Condition"]["StringEquals"]["elasticfilesystem:AccessPointArn"],
            json!({"Fn::GetAtt": ["LockAccessPoint", "Arn"]}),
            "{s}"
        );
        assert!(!actions(&s).contains(&"elasticfilesystem:ClientRootAccess".to_string()));
    }
}

#[test]
fn the_group_and_hook_the_agents_are_told_about_are_the_stacks_own() {
    let t = template();
    let data = user_data(&t);
    let accepted = bootstrap_flags();
    for flag in ["--auto-scaling-group", "--lifecycle-hook"] {
        assert!(
            accepted.contains(flag),
            "packaging/bootstrap.sh has no {flag}"
        );
    }
    let group = props(&t, "FleetGroup");

    let hooks = group["LifecycleHookSpecificationList"]
        .as_array()
        .expect("the group has lifecycle hooks");
    let terminating: Vec<&Value> = hooks
        .iter()
        .filter(|h| h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING")
        .collect();
    assert_eq!(terminating.len(), 1, "one terminating hook");
    let hook = terminating[0];
    let hook_name = sub_text(&hook["LifecycleHookName"]);
    assert_eq!(flag_value(&data, "--lifecycle-hook"), hook_name);
    assert_eq!(
        sub_text(&t["Outputs"]["LifecycleHookName"]["Value"]),
        hook_name
    );
    assert_eq!(
        hook["HeartbeatTimeout"],
        json!({"Ref": "LifecycleHookHeartbeatSeconds"})
    );
    assert_eq!(hook["DefaultResult"], "CONTINUE");

    let group_name = sub_text(&group["AutoScalingGroupName"]);
    assert_eq!(flag_value(&data, "--auto-scaling-group"), group_name);
    assert_eq!(
        t["Outputs"]["FleetGroupName"]["Value"],
        json!({"Ref": "FleetGroup"})
    );

    // With the names filled in, bootstrap.sh accepts them and writes them to [fleet].
    let substituted = user_data_substituted(&t);
    let group_value = flag_value(&substituted, "--auto-scaling-group");
    let hook_value = flag_value(&substituted, "--lifecycle-hook");
    assert_eq!(group_value, "rsql-fleet");
    assert_eq!(hook_value, "rsql-terminating");
    let out = Command::new("bash")
        .arg(repo().join("packaging/bootstrap.sh"))
        .args(["--dry-run", "--package", "x.rpm", "--queue-url", "q"])
        .args(["--auto-scaling-group", group_value])
        .args(["--lifecycle-hook", hook_value])
        .env(
            "BOOTSTRAP_OS_RELEASE",
            repo().join("tests/fixtures/os-release/amzn-2023"),
        )
        .env("BOOTSTRAP_FSTAB", "/dev/null")
        .output()
        .expect("run bash");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("|   [fleet]\n|   auto_scaling_group = \"rsql-fleet\"\n|   lifecycle_hook = \"rsql-terminating\"\n"), "{err}");
}

#[test]
fn lifecycle_and_protection_rights_reach_only_the_fleets_own_group() {
    let t = template();
    let group_name = sub_text(&props(&t, "FleetGroup")["AutoScalingGroupName"]).to_string();
    let wanted: BTreeSet<String> = [
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:RecordLifecycleActionHeartbeat",
        "autoscaling:SetInstanceProtection",
    ]
    .map(String::from)
    .into();

    // Finding the group and its hook: read-only, and these actions take no resource.
    let lookups: BTreeSet<String> = [
        "autoscaling:DescribeAutoScalingInstances",
        "autoscaling:DescribeLifecycleHooks",
    ]
    .map(String::from)
    .into();

    let mut granted = BTreeSet::new();
    let mut looked_up = BTreeSet::new();
    for (holder, s) in iam_statements(&t) {
        let acts = actions(&s);
        assert!(
            !acts.iter().any(|a| a == "*" || a == "autoscaling:*"),
            "{holder} grants {acts:?}"
        );
        let scaling: Vec<&String> = acts
            .iter()
            .filter(|a| a.starts_with("autoscaling:"))
            .collect();
        if scaling.is_empty() {
            continue;
        }
        assert_eq!(
            holder, "FleetPolicy",
            "only the fleet policy grants Auto Scaling actions"
        );
        assert_eq!(s["Effect"], "Allow");
        if scaling.iter().any(|a| lookups.contains(*a)) {
            assert!(
                scaling.iter().all(|a| lookups.contains(*a)),
                "lookups and actions on the group share a statement: {scaling:?}"
            );
            assert_eq!(s["Resource"], "*");
            looked_up.extend(scaling.into_iter().cloned());
            continue;
        }
        let resource = sub_text(&s["Resource"]);
        assert!(
            resource.starts_with("arn:${AWS::Partition}:autoscaling:${AWS::Region}:${AWS::AccountId}:autoScalingGroup:")
                && resource.ends_with(&format!(":autoScalingGroupName/{group_name}")),
            "the resource is the group's ARN, not {resource}"
        );
        granted.extend(scaling.into_iter().cloned());
    }
    assert_eq!(granted, wanted);
    assert_eq!(looked_up, lookups);

    let policy = resource(&t, "FleetPolicy");
    assert_eq!(policy["Type"], "AWS::IAM::Policy");
    assert_eq!(policy["Properties"]["Roles"], json!([{"Ref": "AgentRole"}]));
    // The instances carry that role.
    let launch = &props(&t, "FleetLaunchTemplate")["LaunchTemplateData"];
    assert_eq!(
        launch["IamInstanceProfile"]["Arn"],
        json!({"Fn::GetAtt": ["AgentInstanceProfile", "Arn"]})
    );
    assert_eq!(
        props(&t, "AgentInstanceProfile")["Roles"],
        json!([{"Ref": "AgentRole"}])
    );
}

#[test]
fn instances_boot_amazon_linux_2023_with_imdsv2_and_scale_on_the_job_backlog() {
    let t = template();
    let launch = &props(&t, "FleetLaunchTemplate")["LaunchTemplateData"];
    assert_eq!(launch["MetadataOptions"]["HttpTokens"], "required");
    assert_eq!(
        launch["ImageId"],
        json!({"Fn::If": ["IsArm64", {"Ref": "AmiArm64"}, {"Ref": "AmiX8664"}]})
    );
    for (parameter, arch) in [("AmiArm64", "arm64"), ("AmiX8664", "x86_64")] {
        let p = &t["Parameters"][parameter];
        assert_eq!(p["Type"], "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>");
        assert_eq!(
            p["Default"],
            format!("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}")
        );
    }
    assert_eq!(
        t["Parameters"]["Architecture"]["AllowedValues"],
        json!(["x86_64", "arm64"])
    );

    let group = props(&t, "FleetGroup");
    assert_eq!(group["MinSize"], json!({"Ref": "FleetMinSize"}));
    assert_eq!(group["MaxSize"], json!({"Ref": "FleetMaxSize"}));
    assert_eq!(
        group["LaunchTemplate"]["LaunchTemplateId"],
        json!({"Ref": "FleetLaunchTemplate"})
    );
    let collected = &group["MetricsCollection"][0]["Metrics"];
    assert!(collected
        .as_array()
        .expect("metrics")
        .contains(&json!("GroupInServiceInstances")));

    // Target tracking on (waiting + in flight) / in service, for this queue and this group.
    let policy = props(&t, "BacklogScalingPolicy");
    assert_eq!(policy["AutoScalingGroupName"], json!({"Ref": "FleetGroup"}));
    assert_eq!(policy["PolicyType"], "TargetTrackingScaling");
    let tracking = &policy["TargetTrackingConfiguration"];
    assert_eq!(
        tracking["TargetValue"],
        json!({"Ref": "BacklogPerInstanceTarget"})
    );
    let metrics = tracking["CustomizedMetricSpecification"]["Metrics"]
        .as_array()
        .expect("metric math");
    let by_id = |id: &str| -> &Value {
        metrics
            .iter()
            .find(|m| m["Id"] == id)
            .unwrap_or_else(|| panic!("no metric {id}"))
    };
    let queue = json!([{"Name": "QueueName", "Value": {"Fn::GetAtt": ["JobQueue", "QueueName"]}}]);
    for (id, name) in [
        ("waiting", "ApproximateNumberOfMessagesVisible"),
        ("inflight", "ApproximateNumberOfMessagesNotVisible"),
    ] {
        let m = &by_id(id)["MetricStat"]["Metric"];
        assert_eq!(m["MetricName"], name);
        assert_eq!(m["Dimensions"], queue);
    }
    let instances = &by_id("instances")["MetricStat"]["Metric"];
    assert_eq!(instances["MetricName"], "GroupInServiceInstances");
    assert_eq!(
        instances["Dimensions"],
        json!([{"Name": "AutoScalingGroupName", "Value": {"Ref": "FleetGroup"}}])
    );
    let returned: Vec<&Value> = metrics.iter().filter(|m| m["ReturnData"] == true).collect();
    assert_eq!(returned.len(), 1);
    assert_eq!(
        returned[0]["Expression"],
        "(waiting + inflight) / instances"
    );
}

#[test]
fn a_stack_without_the_fleet_creates_none_of_it() {
    let t = template();
    // Conditions that hold only when CreateFleet is "true".
    let mut fleet_conditions = BTreeSet::from(["FleetInStack".to_string()]);
    assert_eq!(
        t["Conditions"]["FleetInStack"],
        json!({"Fn::Equals": [{"Ref": "CreateFleet"}, "true"]})
    );
    for (name, c) in t["Conditions"].as_object().expect("Conditions") {
        if let Some(all) = c["Fn::And"].as_array() {
            if all.contains(&json!({"Condition": "FleetInStack"})) {
                fleet_conditions.insert(name.clone());
            }
        }
    }
    assert_eq!(t["Parameters"]["CreateFleet"]["Default"], "false");

    let fleet_types = ["AWS::EFS::", "AWS::EC2::", "AWS::AutoScaling::"];
    let mut fleet = Vec::new();
    for (name, r) in t["Resources"].as_object().expect("Resources") {
        let kind = r["Type"].as_str().expect("Type");
        if fleet_types.iter().any(|p| kind.starts_with(p)) || name == "FleetPolicy" {
            let condition = r["Condition"].as_str().unwrap_or("");
            assert!(
                fleet_conditions.contains(condition),
                "{name} ({kind}) is created without CreateFleet (condition {condition:?})"
            );
            fleet.push(name.clone());
        }
    }
    assert!(fleet.len() >= 9, "the fleet's resources: {fleet:?}");
    for (name, o) in t["Outputs"].as_object().expect("Outputs") {
        let text = o["Value"].to_string();
        if fleet.iter().any(|r| text.contains(&format!("\"{r}\""))) {
            assert_eq!(o["Condition"], "FleetInStack", "output {name}");
        }
    }
}
