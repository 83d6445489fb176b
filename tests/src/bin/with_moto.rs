//! `rsql-with-moto COMMAND [ARG…]`: runs COMMAND with one AWS emulator for all of it.
//!
//! `make test` runs the suite under it, so the system tests share one moto server (their
//! names are their own, as on AWS) instead of starting one each: `Moto::start` finds the
//! server through `RSQL_TEST_MOTO_PORT` and its log through `RSQL_TEST_MOTO_LOG`. Tests that
//! stop or restart the emulator start their own (`Moto::start_private`). The server goes when
//! COMMAND ends, and with this process if it is killed.
//!
//! Exit status: COMMAND's; 2 without a command; 1 when COMMAND cannot be started or ended by
//! a signal.

use std::process::{Command, ExitCode};

use rsql_agent_tests::moto::{Moto, SHARED_LOG_ENV, SHARED_PORT_ENV};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: rsql-with-moto COMMAND [ARG…]");
        return ExitCode::from(2);
    };
    let moto = Moto::start_private();
    eprintln!(
        "rsql-with-moto: one AWS emulator for the run on port {} (log: {})",
        moto.port(),
        moto.log_path().display()
    );
    let status = Command::new(&program)
        .args(args)
        .env(SHARED_PORT_ENV, moto.port().to_string())
        .env(SHARED_LOG_ENV, moto.log_path())
        .status();
    drop(moto);
    match status {
        Ok(status) => ExitCode::from(status.code().map_or(1, |c| c.clamp(0, 255) as u8)),
        Err(e) => {
            eprintln!(
                "rsql-with-moto: cannot run {}: {e}",
                program.to_string_lossy()
            );
            ExitCode::from(1)
        }
    }
}
