use super::legacy::legacy_job_name;
use super::*;

#[test]
fn legacy_job_name_is_relative_to_the_code_dir_or_the_file_name() {
    assert_eq!(
        legacy_job_name("/opt/rsql/scripts/etl/load.sh", "/opt/rsql/scripts").as_deref(),
        Some("etl/load.sh")
    );
    assert_eq!(
        legacy_job_name("/opt/rsql/scripts/load.sh", "/opt/rsql/scripts/").as_deref(),
        Some("load.sh")
    );
    assert_eq!(
        legacy_job_name("/elsewhere/load.sh", "/opt/rsql/scripts").as_deref(),
        Some("load.sh")
    );
    assert_eq!(
        legacy_job_name("load.sh", "/opt/rsql/scripts").as_deref(),
        Some("load.sh")
    );
    assert_eq!(legacy_job_name("/", "/opt"), None);
}

#[test]
fn run_takes_the_legacy_positional_arguments_after_its_options() {
    let os = |args: &[&str]| args.iter().map(OsString::from).collect::<Vec<_>>();
    let (options, positional) = legacy_run_form(&os(&[
        "--config",
        "/etc/a.toml",
        "--report-timeout-seconds=30",
        "tok",
        "wf",
    ]))
    .expect("the legacy form")
    .expect("valid options");
    assert_eq!(options.config.as_deref(), Some(Path::new("/etc/a.toml")));
    assert_eq!(options.report_timeout_seconds, Some(30));
    assert_eq!(positional, os(&["tok", "wf"]));
    // The option form, and help, are clap's.
    assert!(legacy_run_form(&os(&["--config", "c", "--task-token", "t"])).is_none());
    assert!(legacy_run_form(&os(&["--help"])).is_none());
    assert!(legacy_run_form(&os(&[])).is_none());
    let bad = legacy_run_form(&os(&["--log-format", "xml", "tok"])).expect("legacy");
    assert!(bad.unwrap_err().contains("--log-format"));
}

#[test]
fn cli_is_well_formed() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}
