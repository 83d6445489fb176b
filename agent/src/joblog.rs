//! The job log: the file, its record format and reading it back are the core's
//! (`rsql_agent_core::joblog`, re-exported here whole, so `joblog::JobLog` names the same
//! thing in both crates); shipping it to CloudWatch Logs is the agent's, as it needs the AWS
//! SDK ([`cloudwatch`]).

pub use rsql_agent_core::joblog::*;

pub mod cloudwatch;
