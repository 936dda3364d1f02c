//! The thunk's side of a build: inside a thunk, `cot run`, `cot wait` and `cot __sh` (make's
//! shell under `cot make`) talk to the build through the socket at `/dev/cot` instead of
//! starting a sandbox of their own.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::protocol::{read_message, write_message, FromClient, ToClient};
use crate::store::model::Declared;

/// Where a thunk of a build reaches the build (see `cot_sandbox::BUILD_SOCKET`).
pub const SOCKET: &str = "/dev/cot";

pub use super::make::RECIPE_SHELL;

/// Whether this process runs inside a thunk of a build.
pub fn inside_build() -> bool {
    std::fs::metadata(SOCKET).is_ok_and(|m| m.file_type().is_socket())
}

fn call(request: &FromClient) -> anyhow::Result<ToClient> {
    let mut stream = UnixStream::connect(SOCKET)
        .with_context(|| format!("cannot reach the build at {SOCKET}"))?;
    write_message(&mut stream, request).context("cannot send the request to the build")?;
    read_message(&mut stream).context("the build did not answer")
}

/// The environment of a child request: this process's whole environment (the build already
/// filtered the root's), with make's job-server and `-j` settings left out of `MAKEFLAGS`:
/// they describe descriptors the child cannot use and must not make every recipe a new thunk
/// when `-j` changes.
pub fn request_env() -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .map(|(name, value)| {
            if name == "MAKEFLAGS" || name == "MFLAGS" {
                (name, super::make::sanitize_makeflags(&value))
            } else {
                (name, value)
            }
        })
        .collect();
    env.sort();
    env
}

/// Requests a child thunk and waits for it (unless `background`): its stdout and stderr are
/// written to ours, and its exit status is returned.
pub fn run(
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    background: bool,
) -> anyhow::Result<u8> {
    request(argv, env, None, None, background, false)
}

fn request(
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    target: Option<String>,
    declared: Option<Declared>,
    background: bool,
    up_to_date: bool,
) -> anyhow::Result<u8> {
    let cwd: PathBuf = std::env::current_dir().context("cannot read the working directory")?;
    let answer = call(&FromClient::Run {
        argv,
        env,
        cwd,
        target,
        declared,
        background,
        up_to_date,
    })?;
    deliver(answer)
}

/// `cot make`: tells the build make's rules (see `FromClient::Rules`).
pub fn rules(
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
    targets: Vec<(OsString, PathBuf)>,
) -> anyhow::Result<()> {
    match call(&FromClient::Rules {
        argv,
        env,
        cwd,
        targets,
    })? {
        ToClient::Refused { message } => anyhow::bail!("{message}"),
        _ => Ok(()),
    }
}

/// `cot wait`: waits for every background child this thunk started.
pub fn wait() -> anyhow::Result<u8> {
    deliver(call(&FromClient::Wait)?)
}

fn deliver(answer: ToClient) -> anyhow::Result<u8> {
    match answer {
        ToClient::Started => Ok(0),
        ToClient::Refused { message } => anyhow::bail!("{message}"),
        ToClient::Done {
            exit_code,
            stdout,
            stderr,
            message,
        } => {
            // A closed stdout (the output piped into `head`) is not the build's failure.
            let _ = std::io::stdout().write_all(&stdout);
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().write_all(&stderr);
            if let Some(message) = message {
                eprintln!("cot: {message}");
            }
            Ok(u8::try_from(exit_code).unwrap_or(u8::MAX))
        }
    }
}

/// `cot __sh --target TARGET --prereqs PREREQ... --order-only PREREQ... --end -c LINE`:
/// make's shell under `cot make` (make expands `$@`, `$^` and `$|` in `.SHELLFLAGS`; all are
/// empty for `$(shell ...)`). Inside a build the recipe line becomes a child thunk
/// `sh -c LINE`, with the rule's declarations; outside one it simply runs.
pub fn sh(args: &[OsString]) -> anyhow::Result<u8> {
    let usage = || {
        anyhow::anyhow!(
            "usage: cot __sh --target [TARGET] --prereqs [PREREQ...] [--order-only [PREREQ...]] \
             --end -c LINE (this is make's shell under `cot make`)"
        )
    };
    let mut rest = args;
    let mut target = None;
    let mut declared = Declared::default();
    if rest.first().is_some_and(|a| a == "--target") {
        match rest.get(1) {
            Some(t) if t != "--prereqs" && t != "-c" => {
                target = Some(t.to_string_lossy().into_owned());
                rest = &rest[2..];
            }
            _ => rest = &rest[1..],
        }
    }
    if rest.first().is_some_and(|a| a == "--prereqs") {
        let end = rest.iter().position(|a| a == "--end").ok_or_else(usage)?;
        let words = &rest[1..end];
        let split = words
            .iter()
            .position(|a| a == "--order-only")
            .unwrap_or(words.len());
        let bytes = |a: &OsString| a.as_bytes().to_vec();
        declared.prereqs = words[..split].iter().map(bytes).collect();
        declared.order_only = words[split..].iter().skip(1).map(bytes).collect();
        rest = &rest[end + 1..];
    }
    let line = match rest {
        [flag, line] if flag == "-c" => line.clone(),
        _ => return Err(usage()),
    };
    let argv = vec![OsString::from(RECIPE_SHELL), OsString::from("-c"), line];
    if !inside_build() {
        let status = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .status()
            .with_context(|| format!("cannot run {RECIPE_SHELL}"))?;
        return Ok(status.code().map_or(1, |c| u8::try_from(c).unwrap_or(1)));
    }
    let up_to_date = target.as_deref().is_some_and(|t| {
        let prereqs: Vec<&[u8]> = declared.prereqs.iter().map(Vec::as_slice).collect();
        up_to_date_by_time(Path::new(t), &prereqs)
    });
    let declared = target.is_some().then_some(declared);
    request(argv, request_env(), target, declared, false, up_to_date)
}

/// Whether plain make would find `target` up to date: it exists and no prerequisite is newer
/// (make compares modification times, following symlinks).
fn up_to_date_by_time(target: &Path, prereqs: &[&[u8]]) -> bool {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let Some(target_time) = modified(target) else {
        return false;
    };
    prereqs
        .iter()
        .all(|p| modified(Path::new(OsStr::from_bytes(p))).is_some_and(|time| time <= target_time))
}
