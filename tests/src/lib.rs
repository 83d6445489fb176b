//! Shared harness for the system tests: a throwaway PostgreSQL, the AWS emulator, an EC2
//! instance metadata stand-in, a cuttable TCP proxy, the benches' timing proxy, and the paths
//! of the binaries under test.
//!
//! Every part either starts for real or panics with a message that says how to install it:
//! a system test never skips silently.

pub mod agent;
pub mod bins;
pub mod cgroup;
pub mod chromium;
pub mod host;
pub mod imds;
pub mod moto;
pub mod pg;
pub mod proxy;
pub mod sandbox;
pub mod sources;
pub mod supervised;
pub mod timing;
pub mod world;
