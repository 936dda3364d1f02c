//! The runner's side: how a scenario is started (as root or as the unprivileged test user),
//! watched and judged; plus the machine set-up the rootless scenarios need.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::caller::REPORT;

/// The unprivileged user of the rootless scenarios when the tests run as root.
pub const TEST_USER: &str = "cot-test";
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why a test did not pass.
#[derive(Debug)]
pub enum Problem {
    Skip(String),
    Fail(String),
}

pub type Verdict = Result<(), Problem>;

macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err($crate::harness::Problem::Fail(format!($($message)+)));
        }
    };
}
pub(crate) use ensure;

pub fn fail(message: impl Into<String>) -> Problem {
    Problem::Fail(message.into())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn require_root() -> Verdict {
    if is_root() {
        Ok(())
    } else {
        Err(Problem::Skip(
            "needs root (real namespaces without a user namespace)".into(),
        ))
    }
}

/// The two ways cot builds a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As root, namespaces without a user namespace.
    Root,
    /// In a user namespace, as an unprivileged user.
    Rootless,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Root => "root",
            Mode::Rootless => "rootless",
        }
    }
}

/// The unprivileged user's uid and gid, and the binary it can run.
pub struct Unprivileged {
    pub uid: u32,
    pub gid: u32,
    pub exe: PathBuf,
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))?
    })
}

fn traversable_by_others(path: &Path) -> bool {
    path.ancestors()
        .skip(1)
        .all(|dir| fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
        && fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005)
}

/// Set up once, as a distribution would: a user `cot-test` (created with useradd when
/// missing) and `/dev/fuse` mode 0666 (this machine ships it 0600). The binary is copied to a
/// world-readable place when its own path is not traversable by others.
fn set_up_unprivileged() -> Result<Unprivileged, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locate the test binary: {e}"))?;
    if !is_root() {
        let uid = nix::unistd::geteuid().as_raw();
        return Ok(Unprivileged {
            uid,
            gid: nix::unistd::getegid().as_raw(),
            exe,
        });
    }
    if lookup_user(TEST_USER).is_none() {
        // A concurrent run may create it first; the lookup below decides.
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                TEST_USER,
            ])
            .status();
    }
    let (uid, gid) =
        lookup_user(TEST_USER).ok_or(format!("user {TEST_USER} is missing and useradd failed"))?;
    let fuse = Path::new("/dev/fuse");
    let mode = fs::metadata(fuse)
        .map_err(|e| format!("stat /dev/fuse: {e}"))?
        .permissions()
        .mode();
    if mode & 0o006 != 0o006 {
        fs::set_permissions(fuse, fs::Permissions::from_mode(0o666))
            .map_err(|e| format!("chmod 0666 /dev/fuse: {e}"))?;
    }
    if traversable_by_others(&exe) {
        return Ok(Unprivileged { uid, gid, exe });
    }
    // Not under /tmp: some scenarios cover /tmp with a tmpfs before they run the copy.
    let dir = Path::new("/var/tmp").join(format!("cot-sandbox-test-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    let copy = dir.join("sandbox-tests");
    fs::copy(&exe, &copy)
        .map_err(|e| format!("copy the test binary to {}: {e}", copy.display()))?;
    Ok(Unprivileged {
        uid,
        gid,
        exe: copy,
    })
}

static SET_UP: OnceLock<Result<Unprivileged, String>> = OnceLock::new();

pub fn unprivileged() -> Result<&'static Unprivileged, Problem> {
    SET_UP
        .get_or_init(set_up_unprivileged)
        .as_ref()
        .map_err(|e| Problem::Fail(e.clone()))
}

/// Removes the copy of the binary made for the unprivileged user, if any.
pub fn clean_up() {
    if let Some(Ok(unprivileged)) = SET_UP.get() {
        if let Some(dir) = unprivileged.exe.parent() {
            let ours = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cot-sandbox-test-"));
            if ours && dir.starts_with(std::env::temp_dir()) {
                let _ = fs::remove_dir_all(dir);
            }
        }
    }
}

/// One run of the caller role.
#[derive(Debug, Clone)]
pub struct Launch {
    pub mode: Mode,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub hostname: Option<String>,
    pub extra_flags: Vec<String>,
    pub stdin_dir: bool,
    pub stdin_data: Option<String>,
    /// A shell script the caller role is started through (as root): `"$0" "$@"` runs it.
    pub wrapper: Option<String>,
}

/// What a finished run printed and how it ended.
#[derive(Debug)]
pub struct Ran {
    /// The exit status, or 128+N when killed by signal N.
    pub code: i32,
    pub stdout: String,
    /// The command's stderr, without the report lines.
    pub stderr: String,
    pub reports: Vec<String>,
}

impl Ran {
    pub fn report(&self, prefix: &str) -> Option<&str> {
        self.reports.iter().find_map(|r| r.strip_prefix(prefix))
    }

    pub fn outcome(&self) -> &str {
        self.report("outcome ")
            .or_else(|| self.report("error "))
            .unwrap_or("<no outcome>")
    }
}

pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

impl Launch {
    pub fn new(mode: Mode, argv: &[&str]) -> Launch {
        Launch {
            mode,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), PATH.into())],
            cwd: None,
            hostname: None,
            extra_flags: Vec::new(),
            stdin_dir: false,
            stdin_data: None,
            wrapper: None,
        }
    }

    pub fn sh(mode: Mode, script: &str) -> Launch {
        Launch::new(mode, &["/bin/sh", "-c", script])
    }

    fn command(&self) -> Result<Command, Problem> {
        let mut args: Vec<OsString> = Vec::new();
        let exe = match self.mode {
            Mode::Root => {
                require_root()?;
                std::env::current_exe().map_err(|e| fail(format!("locate the test binary: {e}")))?
            }
            Mode::Rootless => {
                let unprivileged = unprivileged()?;
                if is_root() {
                    args.extend(
                        [
                            "setpriv".to_string(),
                            format!("--reuid={}", unprivileged.uid),
                            format!("--regid={}", unprivileged.gid),
                            "--clear-groups".into(),
                            "--".into(),
                        ]
                        .map(OsString::from),
                    );
                }
                unprivileged.exe.clone()
            }
        };
        args.push(exe.into_os_string());
        args.push("--launch".into());
        if self.mode == Mode::Rootless {
            args.push("--userns".into());
        }
        if let Some(cwd) = &self.cwd {
            args.extend(["--cwd".into(), cwd.into()]);
        }
        if let Some(hostname) = &self.hostname {
            args.extend(["--hostname".into(), hostname.into()]);
        }
        for (name, value) in &self.env {
            args.extend(["--env".into(), format!("{name}={value}").into()]);
        }
        args.extend(self.extra_flags.iter().map(OsString::from));
        args.push("--".into());
        args.extend(self.argv.iter().map(OsString::from));
        let mut command = match &self.wrapper {
            Some(script) => {
                let mut command = Command::new("/bin/sh");
                command.arg("-c").arg(script).args(args);
                command
            }
            None => {
                let mut command = Command::new(&args[0]);
                command.args(&args[1..]);
                command
            }
        };
        command
            .current_dir("/")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.stdin_dir {
            command.stdin(fs::File::open("/").map_err(|e| fail(format!("open /: {e}")))?);
        } else if self.stdin_data.is_some() {
            command.stdin(Stdio::piped());
        } else {
            command.stdin(Stdio::null());
        }
        Ok(command)
    }

    /// Starts the caller role and streams its output lines.
    pub fn spawn(&self) -> Result<Running, Problem> {
        let mut child = self
            .command()?
            .spawn()
            .map_err(|e| fail(format!("start the caller role: {e}")))?;
        if let (Some(data), Some(mut stdin)) = (&self.stdin_data, child.stdin.take()) {
            stdin
                .write_all(data.as_bytes())
                .map_err(|e| fail(format!("feed stdin: {e}")))?;
        }
        let (sender, lines) = mpsc::channel();
        for (stream, is_stdout) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                true,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                false,
            ),
        ] {
            let Some(stream) = stream else { continue };
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if sender.send((is_stdout, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Running {
            child,
            lines,
            stdout: String::new(),
            stderr: String::new(),
            reports: Vec::new(),
        })
    }

    pub fn run(&self) -> Result<Ran, Problem> {
        self.spawn()?.finish()
    }
}

/// A caller role still running.
pub struct Running {
    pub child: Child,
    lines: Receiver<(bool, String)>,
    stdout: String,
    stderr: String,
    reports: Vec<String>,
}

impl Running {
    fn take(&mut self, (is_stdout, line): (bool, String)) {
        if is_stdout {
            self.stdout.push_str(&line);
            self.stdout.push('\n');
        } else if let Some(report) = line.strip_prefix(REPORT) {
            self.reports.push(report.trim_start().to_string());
        } else {
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
    }

    /// Waits until a line of stdout equals `stdout_line` and a report starts with `report`.
    pub fn wait_for(&mut self, stdout_line: &str, report: &str) -> Result<String, Problem> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let seen_line = self.stdout.lines().any(|l| l == stdout_line);
            if let Some(found) = self.reports.iter().find_map(|r| r.strip_prefix(report)) {
                if seen_line {
                    return Ok(found.to_string());
                }
            }
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => self.take(line),
                Err(_) => {
                    let _ = self.child.kill();
                    return Err(fail(format!(
                        "timed out waiting for {stdout_line:?} and report {report:?}; stdout {:?}, stderr {:?}, reports {:?}",
                        self.stdout, self.stderr, self.reports
                    )));
                }
            }
        }
    }

    pub fn finish(mut self) -> Result<Ran, Problem> {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(5)) {
                        self.take(line);
                    }
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(fail(format!(
                        "the caller role did not finish in {TIMEOUT:?}; stdout {:?}, stderr {:?}, reports {:?}",
                        self.stdout, self.stderr, self.reports
                    )));
                }
                Err(e) => return Err(fail(format!("wait for the caller role: {e}"))),
            }
        };
        // The readers end when the pipes close, which the exit of every holder ensures.
        loop {
            match self.lines.recv_timeout(Duration::from_secs(5)) {
                Ok(line) => self.take(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(fail("the caller role's output stayed open after it exited"))
                }
            }
        }
        let code = status.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
        });
        Ok(Ran {
            code,
            stdout: self.stdout,
            stderr: self.stderr,
            reports: self.reports,
        })
    }
}

/// `pid` and its descendants, from the parent pids of `/proc/*/stat` (readable for every
/// process, unlike the namespace links of the undumpable init for an unprivileged runner).
pub fn tree(pid: i32) -> Vec<i32> {
    let parent = |child: i32| -> Option<i32> {
        let stat = fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return vec![pid];
    };
    let all: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut tree = vec![pid];
    let mut grew = true;
    while grew {
        grew = false;
        for &candidate in &all {
            if !tree.contains(&candidate) && parent(candidate).is_some_and(|p| tree.contains(&p)) {
                tree.push(candidate);
                grew = true;
            }
        }
    }
    tree
}

/// `readlink /proc/PID/ns/KIND`.
pub fn namespace(pid: i32, kind: &str) -> Result<PathBuf, Problem> {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map_err(|e| fail(format!("read the {kind} namespace of {pid}: {e}")))
}

/// The processes whose namespace of `kind` is `namespace`.
pub fn members(kind: &str, namespace: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/ns/{kind}")).is_ok_and(|ns| ns == namespace)
        })
        .filter(|pid| !is_zombie(*pid))
        .collect()
}

/// A zombie has released everything but its pid; only its parent (for an orphaned init, the
/// host's pid 1, which may reap late) can remove it.
pub fn is_running(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Waits up to 5 s for the namespace to have no process left.
pub fn ensure_empty(kind: &str, namespace: &Path) -> Verdict {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = members(kind, namespace);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(fail(format!(
                "processes {left:?} are still in {}",
                namespace.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
