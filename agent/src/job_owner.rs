//! The per-job owner process. The owner itself, its files and its protocol are the core's
//! (`rsql_agent_core::job_owner`, re-exported here whole): the `rsql-job-owner` binary links
//! the core crate alone, so it carries no AWS SDK. The agent's side is here: starting owners
//! ([`launch`]) and talking to them ([`client`]).

pub use rsql_agent_core::job_owner::*;

pub mod client;
pub mod launch;
