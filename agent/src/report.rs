//! Reporting results: the audit trail (local JSON lines, and DynamoDB in the daemon), Step
//! Functions callbacks and the durable outbox that makes them reliable.
//!
//! Owns: everything that leaves the agent to say what a job did. Must not touch: processes
//! or job logs; reporters receive finished [`crate::outcome::Outcome`]s.

pub mod audit;
pub mod outbox;
pub mod stepfunctions;
