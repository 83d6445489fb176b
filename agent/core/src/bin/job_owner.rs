//! `rsql-job-owner --job-dir DIR`: the owner process of one job (see `job_owner`). Started
//! by the agent, never by hand.

fn main() -> std::process::ExitCode {
    rsql_agent_core::job_owner::shim::main(std::env::args())
}
