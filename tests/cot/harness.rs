//! One helper per boundary: a [`Project`] directory, `cot run` of a shell script in it, and the
//! parsed result (exit status, output, and the trace as JSON lines).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock, RwLock};

use serde_json::Value;

/// Where test projects live: not under /tmp, which is private inside the sandbox, and readable
/// by the unprivileged test user.
const TEST_ROOT: &str = "/var/tmp/cot-tests";

/// Name of the unprivileged user the rootless tests run as.
pub const TEST_USER: &str = "cot-test";

/// Tests that change machine-wide settings (sysctls, /dev/fuse) take this for writing; every
/// other sandbox test takes it for reading.
pub static MACHINE: RwLock<()> = RwLock::new(());

/// Shares the machine with the other sandbox tests (a failed test does not poison it).
pub fn machine_shared() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Has the machine alone, for a test that changes machine-wide settings or counts mounts.
pub fn machine_exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    MACHINE
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Skips the current test loudly, or fails it when COT_MUST_WORK=1.
pub fn skip(reason: &str) {
    if std::env::var_os("COT_MUST_WORK").is_some_and(|v| v == "1") {
        panic!("COT_MUST_WORK=1 but this test cannot run: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

/// Why the sandbox cannot run here, if it cannot (as root, with /dev/fuse).
pub fn sandbox_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (mounts, namespaces); run the tests as root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing (modprobe fuse)".into());
    }
    None
}

/// Returns early (skipping loudly) from a test when the sandbox cannot run here.
#[macro_export]
macro_rules! require_sandbox {
    () => {
        if let Some(reason) = $crate::harness::sandbox_unavailable() {
            $crate::harness::skip(&reason);
            return;
        }
    };
}

pub fn cot_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cot"))
}

/// A project directory with a `.cot/`, removed at the end of the test.
pub struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Project {
        fs::create_dir_all(TEST_ROOT).unwrap();
        fs::set_permissions(TEST_ROOT, fs::Permissions::from_mode(0o1777)).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("p-")
            .tempdir_in(TEST_ROOT)
            .unwrap();
        fs::create_dir(dir.path().join(".cot")).unwrap();
        Project { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Absolute path of `rel` in the project, as a string (tests compare trace paths).
    pub fn path(&self, rel: &str) -> String {
        self.root().join(rel).to_str().unwrap().to_string()
    }

    pub fn write(&self, rel: &str, content: &str) {
        let path = self.root().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.root().join(rel)).ok()
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.root().join(rel).symlink_metadata().is_ok()
    }

    /// `cot run [flags] -- sh -c SCRIPT` in the project root.
    pub fn sh(&self, script: &str) -> Run {
        self.run(&[], &["sh", "-c", script])
    }

    /// `cot run --trace-out T [flags] -- CMD...` in the project root.
    pub fn run(&self, flags: &[&str], command: &[&str]) -> Run {
        let mut cmd = self.command(flags, command);
        Run::from_output(cmd.output().unwrap(), &self.trace_path())
    }

    /// The `cot run` command line, not started, with a fresh trace file path.
    pub fn command(&self, flags: &[&str], command: &[&str]) -> Command {
        let trace = self.trace_path();
        let _ = fs::remove_file(&trace);
        let mut cmd = Command::new(cot_bin());
        cmd.current_dir(self.root())
            .arg("run")
            .arg("--trace-out")
            .arg(&trace)
            .args(flags)
            .arg("--")
            .args(command)
            .stdin(Stdio::null());
        cmd
    }

    /// `cot run --explain [flags] -- sh -c SCRIPT`, and whether the command ran (else the run
    /// was a hit).
    pub fn explain(&self, flags: &[&str], script: &str) -> (Run, bool) {
        let mut all = vec!["--explain"];
        all.extend_from_slice(flags);
        let run = self.run(&all, &["sh", "-c", script]);
        let ran = if run.stderr.contains("cot: ran: ") {
            true
        } else if run.stderr.contains("cot: cached: ") {
            false
        } else {
            panic!("no explanation:\n{}", run.describe());
        };
        (run, ran)
    }

    /// `cot ARGS...` (show, query, gc, clean) in the project root.
    pub fn cot(&self, args: &[&str]) -> Run {
        self.cot_in("", args)
    }

    /// `cot ARGS...` in the project directory `rel`.
    pub fn cot_in(&self, rel: &str, args: &[&str]) -> Run {
        run_cot(&cot_bin(), &self.root().join(rel), args)
    }

    pub fn trace_path(&self) -> PathBuf {
        // Outside the project: the trace file is cot's output, not the thunk's.
        PathBuf::from(format!("{}.trace.jsonl", self.root().display()))
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.trace_path());
    }
}

/// One access from a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub kind: String,
    pub path: Vec<u8>,
    pub to: Option<Vec<u8>>,
}

/// The result of one `cot run`.
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub trace: Vec<Line>,
}

/// A run without a trace file.
impl From<Output> for Run {
    fn from(output: Output) -> Run {
        Run {
            status: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            trace: Vec::new(),
        }
    }
}

impl Run {
    pub fn from_output(output: Output, trace_path: &Path) -> Run {
        let text = fs::read_to_string(trace_path).unwrap_or_default();
        Run {
            trace: text.lines().map(parse_line).collect(),
            ..Run::from(output)
        }
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.status, 0, "cot failed:\n{}", self.describe());
        self
    }

    pub fn has(&self, kind: &str, path: impl AsRef<OsStr>) -> bool {
        let path = path.as_ref().as_bytes();
        self.trace.iter().any(|l| l.kind == kind && l.path == path)
    }

    #[track_caller]
    pub fn assert_has(&self, kind: &str, path: impl AsRef<OsStr>) {
        let shown = path.as_ref().to_string_lossy().into_owned();
        assert!(
            self.has(kind, path),
            "expected {kind} {shown:?} in the trace:\n{}",
            self.describe()
        );
    }

    #[track_caller]
    pub fn assert_not(&self, kind: &str, path: impl AsRef<OsStr>) {
        let shown = path.as_ref().to_string_lossy().into_owned();
        assert!(
            !self.has(kind, path),
            "unexpected {kind} {shown:?} in the trace:\n{}",
            self.describe()
        );
    }

    pub fn count(&self, kind: &str, path: &str) -> usize {
        self.trace
            .iter()
            .filter(|l| l.kind == kind && l.path == path.as_bytes())
            .count()
    }

    pub fn describe(&self) -> String {
        let mut lines: Vec<String> = self
            .trace
            .iter()
            .map(|l| {
                let mut s = format!("  {} {}", l.kind, String::from_utf8_lossy(&l.path));
                if let Some(to) = &l.to {
                    s.push_str(&format!(" -> {}", String::from_utf8_lossy(to)));
                }
                s
            })
            .collect();
        if lines.len() > 200 {
            lines.truncate(200);
            lines.push("  ...".into());
        }
        format!(
            "status {}\nstdout:\n{}\nstderr:\n{}\ntrace:\n{}",
            self.status,
            self.stdout,
            self.stderr,
            lines.join("\n")
        )
    }
}

fn parse_line(text: &str) -> Line {
    use base64::Engine as _;
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let field = |key: &str| -> Option<Vec<u8>> {
        if let Some(b64) = value.get(format!("{key}_b64")).and_then(Value::as_str) {
            return Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            );
        }
        value
            .get(key)
            .and_then(Value::as_str)
            .map(|s| s.as_bytes().to_vec())
    };
    Line {
        kind: value["kind"].as_str().unwrap().to_string(),
        path: field("path").unwrap(),
        to: field("to"),
    }
}

/// Makes sure the unprivileged test user exists and /dev/fuse is usable by it, as a
/// distribution ships it (mode 0666). Returns the user's uid and gid.
pub fn test_user() -> (u32, u32) {
    static USER: OnceLock<Mutex<(u32, u32)>> = OnceLock::new();
    let ids = USER.get_or_init(|| {
        if nix::unistd::User::from_name(TEST_USER).unwrap().is_none() {
            let status = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/bin/sh",
                    TEST_USER,
                ])
                .status()
                .expect("useradd");
            assert!(status.success(), "useradd {TEST_USER} failed");
        }
        let user = nix::unistd::User::from_name(TEST_USER).unwrap().unwrap();
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();
        Mutex::new((user.uid.as_raw(), user.gid.as_raw()))
    });
    *ids.lock().unwrap()
}

/// A copy of the cot binary that the test user can execute (the build directory may be private
/// to root).
pub fn shared_cot_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = Path::new(TEST_ROOT).join("bin");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(TEST_ROOT, fs::Permissions::from_mode(0o1777)).unwrap();
        // cot starts its store server from its own directory: both go together.
        let dir = dir.join(format!("{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let server = PathBuf::from(env!("CARGO_BIN_EXE_cot-store-server"));
        for (from, name) in [(cot_bin(), "cot"), (server, "cot-store-server")] {
            let target = dir.join(name);
            fs::copy(from, &target).unwrap();
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir.join("cot")
    })
    .clone()
}

/// Runs `cot run --trace-out T [flags] -- CMD...` as the unprivileged test user in `project`.
pub fn run_as_test_user(project: &Project, flags: &[&str], command: &[&str]) -> Run {
    let (uid, gid) = test_user();
    chown_tree(project.root(), uid, gid);
    let trace = project.trace_path();
    let _ = fs::remove_file(&trace);
    let output = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(shared_cot_bin())
        .arg("run")
        .arg("--trace-out")
        .arg(&trace)
        .args(flags)
        .arg("--")
        .args(command)
        .current_dir(project.root())
        .env("HOME", project.root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::from_output(output, &trace)
}

pub fn chown_tree(root: &Path, uid: u32, gid: u32) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(root)
        .status()
        .unwrap();
    assert!(status.success());
}

// ---------------------------------------------------------------------------------------------
// Added for tests/cot/build.rs: any `cot` subcommand (not only `cot run`) as the test user.

/// Runs `cot ARGS...` (the shared copy of the binary) as the unprivileged test user in
/// `project`, after giving the project to that user.
pub fn cot_as_test_user(project: &Project, args: &[&str]) -> Run {
    let output = test_user_cot(project).args(args).output().unwrap();
    Run::from(output)
}

/// The command running the shared copy of cot as the unprivileged test user in `project`
/// (its home), stdin from /dev/null, after giving the project to that user; arguments to add.
pub fn test_user_cot(project: &Project) -> Command {
    let (uid, gid) = test_user();
    chown_tree(project.root(), uid, gid);
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(shared_cot_bin())
        .current_dir(project.root())
        .env("HOME", project.root())
        .stdin(Stdio::null());
    command
}

/// Runs `BIN ARGS...` (a cot binary) in `dir` with stdin from /dev/null, as the caller.
pub fn run_cot(bin: &Path, dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(bin)
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::from(output)
}

/// Every file under `root` (relative path -> content), skipping the top-level `skip`
/// directories and `.cot`.
pub fn files_under(root: &Path, skip: &[&str]) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            if rel == ".cot" || skip.contains(&rel.as_str()) {
                continue;
            }
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                files.insert(rel, fs::read(&path).unwrap());
            } else if kind.is_symlink() {
                let target = fs::read_link(&path).unwrap();
                files.insert(rel, target.as_os_str().as_encoded_bytes().to_vec());
            }
        }
    }
    files
}

/// Copies a real project's sources to `dest` with `scripts/SCRIPT` (fetch-bzip2,
/// fetch-autotools), which downloads them once.
pub fn fetch(script: &str, dest: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let out = Command::new(&script).arg(dest).output().unwrap();
    assert!(
        out.status.success(),
        "{script:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
