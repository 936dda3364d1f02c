//! The remote cache (`--remote grpc://...`) against a real server: BuildGrid, run by each test
//! on a port of the loopback interface with a CAS and an ActionCache on disk (scripts/setup
//! installs it in a Python virtual environment; a test that cannot find it skips loudly, or
//! fails under `COT_MUST_WORK=1`). Also a server that is not there, and one that never
//! answers.

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest as _;

use super::{assert_same_checkout, build, cot, Built};
use crate::harness::{files_under, machine_shared, shared_cot_bin, skip, Project, Run};
use crate::require_sandbox;

/// The BuildGrid server's program: `COT_BGD`, else where scripts/setup installs it.
fn bgd() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("COT_BGD") {
        return Some(PathBuf::from(path));
    }
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".cache/cot/buildgrid/bin/bgd");
    path.exists().then_some(path)
}

/// Returns early (skipping loudly) when BuildGrid is not installed.
macro_rules! require_buildgrid {
    () => {
        match bgd() {
            Some(bgd) => bgd,
            None => {
                skip(
                    "BuildGrid is not installed (scripts/setup installs it in \
                     ~/.cache/cot/buildgrid; or set COT_BGD to its bgd)",
                );
                return;
            }
        }
    };
}

/// A BuildGrid server on the loopback interface, stopped (killed) when dropped.
struct BuildGrid {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl BuildGrid {
    fn start(bgd: &Path) -> BuildGrid {
        let dir = tempfile::Builder::new()
            .prefix("buildgrid-")
            .tempdir_in("/var/tmp/cot-tests")
            .unwrap();
        // A free port: the kernel's choice, released just before the server binds it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let storage = dir.path().join("storage");
        fs::create_dir(&storage).unwrap();
        let config = dir.path().join("buildgrid.yml");
        fs::write(
            &config,
            format!(
                "server:\n\
                 \x20 - !channel\n\
                 \x20   address: \"127.0.0.1:{port}\"\n\
                 \x20   insecure-mode: true\n\
                 storages:\n\
                 \x20 - !disk-storage &storage\n\
                 \x20   path: {}\n\
                 caches:\n\
                 \x20 - !lru-action-cache &cache\n\
                 \x20   storage: *storage\n\
                 \x20   max-cached-refs: 100000\n\
                 \x20   allow-updates: true\n\
                 \x20   cache-failed-actions: false\n\
                 instances:\n\
                 \x20 - name: \"\"\n\
                 \x20   services:\n\
                 \x20     - !action-cache\n\
                 \x20       cache: *cache\n\
                 \x20     - !cas\n\
                 \x20       storage: *storage\n\
                 \x20     - !bytestream\n\
                 \x20       storage: *storage\n",
                storage.display()
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(bgd)
            .args(["server", "start"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut server = BuildGrid {
            child: Some(child),
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("BuildGrid exited ({status}):\n{}", server.log());
            }
            assert!(
                Instant::now() < deadline,
                "BuildGrid did not listen within a minute:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn url(&self) -> String {
        format!("grpc://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Kills the server (it was started by this test; nothing else is touched).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The file in which the server keeps the blob with this SHA-256 digest.
    fn blob_file(&self, hash: &str) -> PathBuf {
        let found = files_under(&self.dir.path().join("storage"), &[])
            .into_keys()
            .find(|path| path.replace('/', "").ends_with(hash));
        self.dir
            .path()
            .join("storage")
            .join(found.unwrap_or_else(|| panic!("no blob {hash} on the server")))
    }
}

impl Drop for BuildGrid {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `cot run --explain ARGS -- sh -c SCRIPT` in the project; whether it ran.
fn run_sh(p: &Project, args: &[&str], script: &str) -> (Run, bool) {
    let mut flags = vec!["--explain"];
    flags.extend_from_slice(args);
    let all = super::run_sh(&flags, script);
    let run = cot(p.root(), &all).ok();
    let ran = run.stderr.contains("cot: ran: ");
    (run, ran)
}

/// A project whose Cotfile runs these steps one after the other.
fn steps_project(steps: &[&str]) -> Project {
    let p = Project::new();
    let mut cotfile = format!("#!/bin/sh\nset -e\ncot={}\n", shared_cot_bin().display());
    for step in steps {
        cotfile.push_str(&format!("$cot run -- sh -c '{step}'\n"));
    }
    p.write("Cotfile", &cotfile);
    fs::set_permissions(p.root().join("Cotfile"), fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn a_second_checkout_reuses_what_the_first_uploaded() {
    require_sandbox!();
    let bgd = require_buildgrid!();
    let _machine = machine_shared();
    let server = BuildGrid::start(&bgd);
    let url = server.url();
    let checkout = || {
        let p = super::cotfile_project();
        p.write("data", "some data\n");
        p
    };
    let first = checkout();
    let built = build(
        first.root(),
        &["build", "--remote", &url, "--remote-upload"],
    )
    .ok();
    assert_eq!(built.ran().len(), 5, "{}", built.describe());
    let second = checkout();
    let built: Built = build(second.root(), &["build", "--remote", &url]).ok();
    assert!(built.ran().is_empty(), "{}", built.describe());
    assert_eq!(built.cached(), 5, "{}", built.describe());
    assert!(
        !built.run.stderr.contains("warning"),
        "{}",
        built.describe()
    );
    assert_same_checkout(&first, &second);

    // Without --remote-upload nothing is written: what the second checkout runs stays there.
    second.write(
        "b.c",
        "#include \"util.h\"\nint b(void) { return UNIT + 2; }\n",
    );
    let built = build(second.root(), &["build", "--remote", &url]).ok();
    assert_eq!(built.ran().len(), 2, "{}", built.describe());
    let third = checkout();
    third.write(
        "b.c",
        "#include \"util.h\"\nint b(void) { return UNIT + 2; }\n",
    );
    let built = build(third.root(), &["build", "--remote", &url]).ok();
    assert_eq!(built.ran().len(), 2, "not uploaded: {}", built.describe());
}

/// Blobs above the batch limit go through ByteStream both ways: a 3 MiB output, and cot's
/// record of a trace with 16,000 inputs (over 1 MiB).
#[test]
fn large_outputs_and_records_are_streamed() {
    require_sandbox!();
    let bgd = require_buildgrid!();
    let _machine = machine_shared();
    let server = BuildGrid::start(&bgd);
    let url = server.url();
    let script = "cat inputs/* > all; head -c 3145728 /dev/urandom > big";
    let checkout = || {
        let p = Project::new();
        for i in 0..16_000 {
            p.write(
                &format!("inputs/an-input-file-with-a-long-name-{i:05}"),
                "x",
            );
        }
        p
    };
    let first = checkout();
    let (_, ran) = run_sh(&first, &["--remote", &url, "--remote-upload"], script);
    assert!(ran);
    let second = checkout();
    let (run, ran) = run_sh(&second, &["--remote", &url], script);
    assert!(!ran, "{}", run.describe());
    assert!(run.stderr.contains("cached from"), "{}", run.describe());
    assert!(!run.stderr.contains("warning"), "{}", run.describe());
    let big = fs::read(second.root().join("big")).unwrap();
    assert_eq!(big.len(), 3 << 20);
    assert_eq!(big, fs::read(first.root().join("big")).unwrap());
    assert_eq!(second.read("all").unwrap().len(), 16_000);
}

/// The server is killed while a build that uses it is half done: the rest is built locally,
/// after one warning, and every output is right.
#[test]
fn a_server_stopped_mid_build_leaves_the_rest_to_the_local_build() {
    require_sandbox!();
    let bgd = require_buildgrid!();
    let _machine = machine_shared();
    let mut server = BuildGrid::start(&bgd);
    let url = server.url();
    // The second step reads `gate`, which differs between the checkouts: it runs in the
    // second, and sleeps meanwhile, while the server is stopped.
    let steps = [
        "cat a.in > a.out",
        "sleep 2; cat gate > gate.out",
        "cat b.in > b.out",
        "cat c.in > c.out",
    ];
    let checkout = |gate: &str| {
        let p = steps_project(&steps);
        for name in ["a", "b", "c"] {
            p.write(&format!("{name}.in"), &format!("{name} input\n"));
        }
        p.write("gate", gate);
        p
    };
    let first = checkout("first");
    build(
        first.root(),
        &["build", "--remote", &url, "--remote-upload"],
    )
    .ok();

    let second = checkout("second");
    let mut child = Command::new(shared_cot_bin())
        .current_dir(second.root())
        .args(["build", "--remote", &url])
        .env_clear()
        .env("PATH", super::PATH)
        .env("HOME", super::root_home())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first step's result arrives from the server: now stop it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !second.exists("a.out") {
        assert!(Instant::now() < deadline, "a.out never arrived");
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    server.stop();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("the remote cache {url} is unreachable")),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("unreachable").count(),
        1,
        "warned once: {stderr}"
    );
    for (out, content) in [
        ("a.out", "a input\n"),
        ("gate.out", "second"),
        ("b.out", "b input\n"),
        ("c.out", "c input\n"),
    ] {
        assert_eq!(
            second.read(out).as_deref(),
            Some(content),
            "{out}: {stderr}"
        );
    }
}

/// The server sends a blob that is not what its digest says (its file was damaged on the
/// server's disk): the content is refused, the thunk runs, its output is right. The same for
/// cot's record of the trace.
#[test]
fn a_blob_whose_digest_does_not_match_is_refused() {
    require_sandbox!();
    let bgd = require_buildgrid!();
    let _machine = machine_shared();
    let server = BuildGrid::start(&bgd);
    let url = server.url();
    let content = "the right content, long enough to be told apart\n";
    let script = "cat in > out";
    let checkout = || {
        let p = Project::new();
        p.write("in", content);
        p
    };
    let first = checkout();
    run_sh(&first, &["--remote", &url, "--remote-upload"], script);
    let second = checkout();
    let (run, ran) = run_sh(&second, &["--remote", &url], script);
    assert!(!ran, "a hit before the damage: {}", run.describe());

    // Same length, other bytes.
    let blob = server.blob_file(&sha256(content.as_bytes()));
    let damaged = content.replace("right", "wrong");
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    fs::File::create(&blob)
        .unwrap()
        .write_all(damaged.as_bytes())
        .unwrap();
    let third = checkout();
    let (run, ran) = run_sh(&third, &["--remote", &url], script);
    assert!(ran, "{}", run.describe());
    assert!(run.stderr.contains("warning"), "{}", run.describe());
    assert!(run.stderr.contains("arrived as"), "{}", run.describe());
    assert_eq!(third.read("out").as_deref(), Some(content));
    let cas = third.root().join(".cot/cas/objects");
    assert!(
        !files_under(&cas, &[])
            .values()
            .any(|bytes| bytes == damaged.as_bytes()),
        "nothing of the damaged blob was stored"
    );

    // cot's record of the trace, damaged: the result is not used at all.
    let other = "cat in > out2";
    run_sh(&first, &["--remote", &url, "--remote-upload"], other);
    let records: Vec<PathBuf> = files_under(&server.dir.path().join("storage"), &[])
        .into_iter()
        .filter(|(_, bytes)| {
            bytes.windows(b"out2".len()).any(|w| w == b"out2")
                && bytes.windows(b"cat in".len()).any(|w| w == b"cat in")
        })
        .map(|(path, _)| server.dir.path().join("storage").join(path))
        .collect();
    assert!(!records.is_empty(), "cot's record is on the server");
    for record in records {
        let mut bytes = fs::read(&record).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::set_permissions(&record, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&record, bytes).unwrap();
    }
    let fourth = checkout();
    let (run, ran) = run_sh(&fourth, &["--remote", &url], other);
    assert!(ran, "{}", run.describe());
    assert!(run.stderr.contains("warning"), "{}", run.describe());
    assert_eq!(fourth.read("out2").as_deref(), Some(content));
}

/// A server that is not there, and one that accepts connections but never answers: a build
/// goes on locally after one warning, without waiting a deadline per thunk.
#[test]
fn an_unreachable_or_silent_server_costs_one_warning() {
    require_sandbox!();
    let _machine = machine_shared();
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("grpc://{}", listener.local_addr().unwrap())
    };
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("grpc://{}", silent.local_addr().unwrap());
    for url in [closed, silent_url] {
        let p = super::cotfile_project();
        let started = Instant::now();
        let built = build(
            p.root(),
            &[
                "build",
                "--remote",
                &url,
                "--remote-timeout",
                "1",
                "--remote-upload",
            ],
        )
        .ok();
        assert_eq!(built.ran().len(), 5, "{}", built.describe());
        assert_eq!(
            built.run.stderr.matches("unreachable").count(),
            1,
            "{}",
            built.describe()
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        let prog = Command::new(p.root().join("prog")).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&prog.stdout), "61\n");
    }
    drop(silent);
}
