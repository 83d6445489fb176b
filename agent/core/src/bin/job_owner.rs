//! `rsql-job-owner --job-dir DIR`: the owner process of one job (see `job_owner`). Started
//! by the agent, never by hand.

// No function over 120 lines of code (threshold in clippy.toml); the test code is exempt.
#![warn(clippy::too_many_lines)]

fn main() -> std::process::ExitCode {
    rsql_agent_core::job_owner::shim::main(std::env::args())
}
