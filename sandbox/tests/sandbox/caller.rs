//! The caller role: what cot does around a sandbox (preflight, launch with a served root,
//! wait), driven by command-line flags, with the result reported on stderr as lines starting
//! with [`REPORT`] and as the exit status (the outcome's, or 125 for an error).

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::process::exit;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cot_sandbox::{launch, preflight, Spec};
use fuser::{Config, Session, SessionACL};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::passthrough::Passthrough;

pub const REPORT: &str = "cot-sandbox-test-report:";

fn report(line: impl std::fmt::Display) {
    eprintln!("{REPORT} {line}");
}

/// Serves the root with the read-only mirror of `/`, handing the session thread to `session`.
fn serve(fd: OwnedFd, session: &mut Option<JoinHandle<std::io::Result<()>>>) -> Result<(), String> {
    let mut config = Config::default();
    config.n_threads = Some(2);
    let handshaken = Session::from_fd(Passthrough::new(), fd, SessionACL::All, config)
        .map_err(|e| format!("fuse handshake: {e}"))?;
    let thread = std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || handshaken.run())
        .map_err(|e| format!("start the fuse session: {e}"))?;
    *session = Some(thread);
    Ok(())
}

/// `--launch [--userns] [--cwd DIR] [--hostname NAME] [--env NAME=VALUE]... [--socket PATH]
/// [--leak-dir-fd] [--spawn-thread] [--fail-serve] [--repeat N] [--time] -- ARGV...`
pub fn main(args: &[OsString]) -> ! {
    let mut spec = Spec {
        argv: Vec::new(),
        env: Vec::new(),
        cwd: "/".into(),
        user_namespace: false,
        fuse_fsname: "cot".into(),
        hostname: None,
        tmp_keep: Vec::new(),
        tmp_dirs: Vec::new(),
        host_network: false,
        stdout: None,
        stderr: None,
        socket: None,
    };
    let mut repeat = 1;
    let mut time = false;
    let mut fail_serve = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().cloned().unwrap_or_default();
        match arg.to_str().unwrap_or("") {
            "--userns" => spec.user_namespace = true,
            "--cwd" => spec.cwd = value().into(),
            "--hostname" => spec.hostname = Some(value().to_string_lossy().into_owned()),
            "--socket" => spec.socket = Some(value().into()),
            "--env" => {
                let pair = value().to_string_lossy().into_owned();
                let (name, value) = pair.split_once('=').unwrap_or((&pair, ""));
                spec.env.push((name.into(), value.into()));
            }
            "--leak-dir-fd" => {
                // A directory descriptor without close-on-exec, as a careless caller could leak.
                match nix::fcntl::open("/", OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
                    .and_then(|fd| nix::unistd::dup2(fd, 37))
                {
                    Ok(_) => {}
                    Err(e) => {
                        report(format!("error leaking a descriptor: {e}"));
                        exit(125);
                    }
                }
            }
            "--spawn-thread" => {
                std::thread::spawn(|| std::thread::sleep(Duration::from_secs(30)));
            }
            "--repeat" => repeat = value().to_string_lossy().parse().unwrap_or(1),
            "--time" => time = true,
            "--fail-serve" => fail_serve = true,
            "--" => {
                spec.argv = args.cloned().collect();
                break;
            }
            other => {
                report(format!("error: unknown flag {other}"));
                exit(125);
            }
        }
    }
    if let Err(e) = preflight(&spec) {
        report(format!("error {e}"));
        exit(125);
    }
    let mut code = 0;
    for _ in 0..repeat {
        let start = Instant::now();
        let mut session = None;
        let sandbox = match launch(&spec, |fd| {
            if fail_serve {
                return Err("refusing to serve, as asked".into());
            }
            serve(fd, &mut session)
        }) {
            Ok(sandbox) => sandbox,
            Err(e) => {
                report(format!("error {e}"));
                exit(125);
            }
        };
        report(format!("pid {}", sandbox.pid()));
        match sandbox.wait() {
            Ok(outcome) => {
                let elapsed = start.elapsed();
                report(format!("outcome {outcome:?}"));
                code = outcome.exit_code();
                // The session ends when the mount goes away with the sandbox's last process;
                // joining it makes this process single-threaded again for the next launch.
                if let Some(Err(e)) = session.map(JoinHandle::join).transpose().ok().flatten() {
                    report(format!("error fuse session: {e}"));
                }
                if time {
                    report(format!("micros {}", elapsed.as_micros()));
                }
            }
            Err(e) => {
                report(format!("error {e}"));
                exit(125);
            }
        }
    }
    exit(code)
}
