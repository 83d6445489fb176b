//! `rsql-wrapper`: the SSM Run Command entry point (submit a job to the running agent, or
//! run one standalone). Not built yet: it refuses to run rather than pretend.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "rsql-wrapper: not implemented yet; use `rsql-agent run` with an SQS queue, \
         or `rsql-agent workflow run` for local workflows"
    );
    ExitCode::from(69)
}
