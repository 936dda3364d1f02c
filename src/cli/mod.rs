//! The command line: parse, dispatch one function per subcommand, map errors to exit codes.
//!
//! Exit codes: the command's own status for `cot run`; 125 when cot itself failed; 126 when the
//! command cannot be executed; 127 when it is not found; 2 for usage errors (clap's own).

mod build;
mod inspect;
mod pkg;
pub(crate) mod run;

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
    Build(build::BuildArgs),
    /// Run GNU make with every recipe line as a thunk of a build (see `cot make --help`)
    #[command(disable_help_flag = true)]
    Make {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    Status(build::StatusArgs),
    Lint(build::LintArgs),
    Wait(build::WaitArgs),
    Show(inspect::ShowArgs),
    Query(inspect::QueryArgs),
    Gc(inspect::GcArgs),
    Clean(inspect::CleanArgs),
    Install(pkg::InstallArgs),
    Uninstall(pkg::UninstallArgs),
    Pkg(pkg::PkgArgs),
    /// Runs one thunk for a build (internal)
    #[command(name = "__thunk", hide = true)]
    Thunk,
    /// make's shell under `cot make` (internal)
    #[command(name = "__sh", hide = true, disable_help_flag = true)]
    Sh {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// make under `cot make`, phases and all (internal)
    #[command(name = "__make", hide = true, disable_help_flag = true)]
    MakeDriver {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// cot's commands, as the first argument.
const COMMANDS: [&str; 20] = [
    "lint",
    "run",
    "build",
    "make",
    "status",
    "wait",
    "show",
    "query",
    "gc",
    "clean",
    "install",
    "uninstall",
    "pkg",
    "help",
    "__thunk",
    "__sh",
    "__make",
    "--help",
    "-h",
    "--version",
];

/// Under `cot make`, cot is make's `SHELL`, so a recipe's `$(SHELL) ./libtool ...` or
/// `$(SHELL) -c '...'` runs cot: called like that (not with one of its commands, or with a
/// script file of that name in the working directory), cot becomes the shell that make's environment names
/// in [`crate::build::make::SHELL_ENV`]. Returns only when that is not the case.
fn shell_call() -> Option<ExitCode> {
    let shell = std::env::var_os(crate::build::make::SHELL_ENV).filter(|s| !s.is_empty())?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let is_command = args.first().is_some_and(|first| {
        COMMANDS.iter().any(|c| first == *c) && !std::path::Path::new(first).is_file()
    });
    if is_command {
        return None;
    }
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new(&shell).args(&args).exec();
    eprintln!(
        "cot: cannot run {} as make's shell: {error}",
        std::path::Path::new(&shell).display()
    );
    Some(ExitCode::from(127))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    if let Some(code) = shell_call() {
        return code;
    }
    let cli = Cli::parse();
    // A package change a killed cot left under way is settled before anything else looks at
    // the file system (the package commands do it for the database they are given).
    let settles = !matches!(
        cli.command,
        Command::Thunk
            | Command::Sh { .. }
            | Command::MakeDriver { .. }
            | Command::Install(_)
            | Command::Uninstall(_)
            | Command::Pkg(_)
    );
    if settles && !crate::build::client::inside_build() {
        crate::pkg::db::recover_default();
    }
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Build(args) => build::build(args),
        Command::Make { args } => build::make_main(args),
        Command::Status(args) => build::status(args),
        Command::Lint(args) => build::lint(args),
        Command::Wait(args) => build::wait(args),
        Command::Thunk => crate::build::worker::main(),
        Command::Sh { args } => crate::build::client::sh(&args),
        Command::MakeDriver { args } => build::make_driver(args),
        Command::Show(args) => inspect::show(args),
        Command::Query(args) => inspect::query(args),
        Command::Gc(args) => inspect::gc(args),
        Command::Clean(args) => inspect::clean(args),
        Command::Install(args) => pkg::install(args),
        Command::Uninstall(args) => pkg::uninstall(args),
        Command::Pkg(args) => pkg::pkg(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("cot: {}", one_line(&error));
            ExitCode::from(EXIT_COT_FAILED)
        }
    }
}

/// The error and its causes on one line, each cause once: library errors already include
/// their source's text in their own message, so a cause already said is not repeated.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn causes_are_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = anyhow::Error::new(io).context("cannot create trace file /x/t");
        assert_eq!(
            one_line(&error),
            "cannot create trace file /x/t: no such file"
        );

        #[derive(Debug, thiserror::Error)]
        #[error("pattern \"[\" is invalid: {0}")]
        struct Wrapped(#[source] std::fmt::Error);
        let error = anyhow::Error::new(Wrapped(std::fmt::Error));
        assert_eq!(
            one_line(&error),
            "pattern \"[\" is invalid: an error occurred when formatting an argument"
        );
    }
}
