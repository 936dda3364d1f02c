//! What to run ([`Spec`]) and how it ended ([`Outcome`]).

use std::ffi::OsString;
use std::fmt;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::Error;

/// What to run in a sandbox and how.
///
/// The root of the sandbox is the FUSE filesystem served by the caller of [`crate::launch()`];
/// `cwd` and every path the command uses are resolved in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The command and its arguments. Unless `argv[0]` contains a `/`, it is searched in the
    /// directories of `PATH` taken from `env` (`/bin:/usr/bin` when `env` has none), inside the
    /// sandbox, as `execvpe(3)` does (without its `/bin/sh` fallback for `ENOEXEC`).
    pub argv: Vec<OsString>,
    /// The complete environment of the command, in order; nothing else is passed.
    pub env: Vec<(OsString, OsString)>,
    /// The working directory of the command: an absolute path, the same inside as outside.
    pub cwd: PathBuf,
    /// Rootless mode: run in a new user namespace that maps the caller's uid and gid to
    /// themselves. Without it the caller must hold `CAP_SYS_ADMIN` (be root).
    pub user_namespace: bool,
    /// The source of the root filesystem as shown in `/proc/mounts`, e.g. `cot`.
    pub fuse_fsname: String,
    /// The host name inside the sandbox; `None` keeps the host's (in a new UTS namespace).
    pub hostname: Option<String>,
    /// Directories strictly under `/tmp` of the root filesystem that stay visible inside the
    /// sandbox's private `/tmp` (e.g. a project that lives in `/tmp`). They are bound from the
    /// root filesystem itself, never from the host, and everything else in `/tmp` is still
    /// private and empty.
    pub tmp_keep: Vec<PathBuf>,
    /// Directories strictly under `/tmp` created empty in the sandbox's private `/tmp` (with
    /// their parents, mode 0755) before the command starts, mode 0700 and owned by the
    /// command's user: e.g. a private, empty `HOME`.
    pub tmp_dirs: Vec<PathBuf>,
    /// Share the caller's network namespace (its interfaces, routes and listening sockets)
    /// instead of a new one holding only a loopback interface.
    pub host_network: bool,
    /// Descriptors (open in the caller, numbered 3 or above) that become the command's
    /// standard output and standard error instead of the caller's own; e.g. pipes that the
    /// caller copies on while it keeps what the command said. `None` passes the caller's.
    pub stdout: Option<RawFd>,
    pub stderr: Option<RawFd>,
    /// The build socket: the absolute path, on the host, of a listening Unix socket that the
    /// command reaches at [`crate::BUILD_SOCKET`] (`/dev/cot`), bound there like the device
    /// nodes. It is the only host object besides them that the sandbox sees; `None` leaves
    /// `/dev/cot` absent.
    pub socket: Option<PathBuf>,
}

impl Spec {
    /// Rejects what the kernel could not take: an empty `argv`, NUL bytes, a relative `cwd` or
    /// build socket, malformed environment names, an over-long host name.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |what: String| Err(Error::InvalidSpec(what));
        let Some(program) = self.argv.first() else {
            return invalid("argv is empty".into());
        };
        if program.is_empty() {
            return invalid("argv[0] is empty".into());
        }
        if let Some(arg) = self.argv.iter().find(|a| a.as_bytes().contains(&0)) {
            return invalid(format!("argument {arg:?} contains a NUL byte"));
        }
        for (name, value) in &self.env {
            let name_bytes = name.as_bytes();
            if name_bytes.is_empty() || name_bytes.contains(&b'=') || name_bytes.contains(&0) {
                return invalid(format!(
                    "environment variable name {name:?} is empty or contains '=' or NUL"
                ));
            }
            if value.as_bytes().contains(&0) {
                return invalid(format!(
                    "environment variable {name:?} has a NUL byte in its value"
                ));
            }
        }
        if !self.cwd.is_absolute() || self.cwd.as_os_str().as_bytes().contains(&0) {
            return invalid(format!(
                "working directory {:?} is not an absolute path without NUL",
                self.cwd
            ));
        }
        if self.fuse_fsname.is_empty() || self.fuse_fsname.contains('\0') {
            return invalid(format!(
                "filesystem name {:?} is empty or contains NUL",
                self.fuse_fsname
            ));
        }
        for fd in [self.stdout, self.stderr].into_iter().flatten() {
            if fd < 3 {
                return invalid(format!(
                    "descriptor {fd} for the command's output must be 3 or above"
                ));
            }
        }
        for keep in self.tmp_keep.iter().chain(&self.tmp_dirs) {
            let under_tmp = keep.strip_prefix("/tmp").is_ok_and(|rest| {
                !rest.as_os_str().is_empty()
                    && rest
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)))
            });
            if !under_tmp || keep.as_os_str().as_bytes().contains(&0) {
                return invalid(format!(
                    "{keep:?} is not a directory strictly under /tmp (absolute, without ..)"
                ));
            }
        }
        if let Some(socket) = &self.socket {
            if !socket.is_absolute() || socket.as_os_str().as_bytes().contains(&0) {
                return invalid(format!(
                    "build socket {socket:?} is not an absolute path without NUL"
                ));
            }
        }
        if let Some(name) = &self.hostname {
            if name.is_empty() || name.len() > 64 || name.contains('\0') {
                return invalid(format!(
                    "host name {name:?} must be 1 to 64 bytes without NUL"
                ));
            }
        }
        Ok(())
    }
}

/// How the command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command exited with this status.
    Exited(i32),
    /// The command was killed by this signal.
    Signaled(i32),
    /// `argv[0]` was not found in `PATH` (or, when it contains a `/`, does not exist).
    NotFound(OsString),
    /// The program was found but could not be executed (`EACCES`, `ENOEXEC`, ...).
    CannotExecute {
        /// The path that failed, as tried inside the sandbox.
        program: OsString,
        /// The `errno` of the failed `execve`.
        errno: i32,
    },
    /// The caller received this signal (`SIGINT`, `SIGTERM`, `SIGHUP` or `SIGQUIT`) while
    /// waiting; the whole process tree of the sandbox was killed.
    Interrupted(i32),
}

impl Outcome {
    /// The exit status a shell reports for this outcome: the command's own, 128+N for signal
    /// N, 127 when not found and 126 when not executable.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Exited(code) => *code,
            Outcome::Signaled(signal) | Outcome::Interrupted(signal) => 128 + signal,
            Outcome::NotFound(_) => 127,
            Outcome::CannotExecute { .. } => 126,
        }
    }
}

fn signal_name(signal: i32) -> String {
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(known) => format!("{signal} ({})", known.as_str()),
        Err(_) => signal.to_string(),
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(code) => write!(f, "the command exited with status {code}"),
            Outcome::Signaled(signal) => {
                write!(
                    f,
                    "the command was killed by signal {}",
                    signal_name(*signal)
                )
            }
            Outcome::NotFound(program) => {
                write!(f, "{}: command not found", program.to_string_lossy())
            }
            Outcome::CannotExecute { program, errno } => write!(
                f,
                "{}: cannot execute: {}",
                program.to_string_lossy(),
                nix::errno::Errno::from_raw(*errno).desc()
            ),
            Outcome::Interrupted(signal) => write!(
                f,
                "interrupted by signal {}; the sandbox was killed",
                signal_name(*signal)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            argv: vec!["true".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
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
        }
    }

    #[test]
    fn a_plain_spec_is_valid() {
        assert!(spec().validate().is_ok());
        let mut keeping = spec();
        keeping.tmp_keep.push("/tmp/project/sub".into());
        assert!(keeping.validate().is_ok());
        let mut serving = spec();
        serving.socket = Some("/run/cot/build.sock".into());
        assert!(serving.validate().is_ok());
    }

    #[test]
    fn malformed_specs_are_rejected_naming_the_input() {
        type Edit = Box<dyn Fn(&mut Spec)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|s| s.argv.clear()), "argv is empty"),
            (Box::new(|s| s.argv[0] = "".into()), "argv[0] is empty"),
            (Box::new(|s| s.argv.push("a\0b".into())), "a\\0b"),
            (
                Box::new(|s| s.env.push(("A=B".into(), "c".into()))),
                "\"A=B\"",
            ),
            (Box::new(|s| s.cwd = "relative".into()), "\"relative\""),
            (Box::new(|s| s.hostname = Some("x".repeat(65))), "host name"),
            (Box::new(|s| s.tmp_keep.push("/tmp".into())), "\"/tmp\""),
            (Box::new(|s| s.tmp_keep.push("/var/x".into())), "\"/var/x\""),
            (
                Box::new(|s| s.tmp_keep.push("/tmp/../etc".into())),
                "\"/tmp/../etc\"",
            ),
            (Box::new(|s| s.tmp_keep.push("tmp/x".into())), "\"tmp/x\""),
            (
                Box::new(|s| s.tmp_dirs.push("/home/u".into())),
                "\"/home/u\"",
            ),
            (
                Box::new(|s| s.socket = Some("build.sock".into())),
                "build socket \"build.sock\"",
            ),
            (
                Box::new(|s| s.socket = Some("/run/a\0b".into())),
                "build socket \"/run/a\\0b\"",
            ),
        ];
        for (edit, expected) in cases {
            let mut s = spec();
            edit(&mut s);
            let message = s.validate().expect_err(expected).to_string();
            assert!(
                message.contains(expected),
                "{message:?} should name {expected:?}"
            );
        }
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(Outcome::Exited(3).exit_code(), 3);
        assert_eq!(Outcome::Signaled(9).exit_code(), 137);
        assert_eq!(Outcome::Interrupted(15).exit_code(), 143);
        assert_eq!(Outcome::NotFound("x".into()).exit_code(), 127);
        let cannot = Outcome::CannotExecute {
            program: "/x".into(),
            errno: libc::EACCES,
        };
        assert_eq!(cannot.exit_code(), 126);
        assert_eq!(cannot.to_string(), "/x: cannot execute: Permission denied");
        assert_eq!(
            Outcome::Signaled(9).to_string(),
            "the command was killed by signal 9 (SIGKILL)"
        );
    }
}
