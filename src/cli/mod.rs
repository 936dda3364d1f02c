//! The command line: parse, dispatch one function per subcommand, map errors to exit codes.
//!
//! Exit codes: the command's own status for `cot run`; 125 when cot itself failed; 126 when the
//! command cannot be executed; 127 when it is not found; 2 for usage errors (clap's own).

mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status when cot itself failed, as opposed to the command it ran.
pub const EXIT_COT_FAILED: u8 = 125;

#[derive(Debug, Parser)]
#[command(
    name = "cot",
    version,
    about = "A build sandbox for Linux that records every file access exactly",
    long_about = "cot runs each build step (a thunk: one command line) in its own namespaces, \
                  with a FUSE filesystem proxying the real system as its root. Every lookup, \
                  stat, open, readdir, readlink, write, rename and unlink passes through cot, so \
                  cot knows exactly what the command read (including files it looked for and did \
                  not find) and wrote. Writes are kept aside and committed only when the command \
                  succeeds."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::RunArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("cot: {error:#}");
            ExitCode::from(EXIT_COT_FAILED)
        }
    }
}
