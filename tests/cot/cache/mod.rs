//! Caches beyond the project's store: a cache directory shared by checkouts and users
//! (`--cache DIR`), and (in `remote.rs`) a remote cache speaking the Remote Execution API,
//! against a real BuildGrid server.
//!
//! Every checkout here is a project at its own path, built by the same copy of cot
//! (`shared_cot_bin`, whose path is in make's keys) with the same `PATH`, so that what differs
//! between two checkouts is their path (and, across users, their home): exactly what keys
//! name rather than spell.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::files_under;
use crate::harness::{fetch, machine_shared, shared_cot_bin, test_user_cot, Project, Run};
use crate::require_sandbox;

mod remote;

/// The `PATH` of every build here: the same for root and the test user, and readable by both.
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A cache directory, removed at the end of the test.
pub struct Cache {
    dir: tempfile::TempDir,
}

impl Cache {
    pub fn new() -> Cache {
        fs::create_dir_all("/var/tmp/cot-tests").unwrap();
        let dir = tempfile::Builder::new()
            .prefix("cache-")
            .tempdir_in("/var/tmp/cot-tests")
            .unwrap();
        // Readable by the test user too.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Cache { dir }
    }

    pub fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    /// `cot run --explain --cache CACHE -- sh -c SCRIPT` as root in `dir`, which must succeed.
    pub fn sh(&self, dir: &Path, script: &str) -> Run {
        cot(dir, &run_sh(&["--explain", "--cache", self.path()], script)).ok()
    }

    /// Every file of the cache (but `tmp/` and `corrupt/`) with its content.
    pub fn files(&self) -> BTreeMap<String, Vec<u8>> {
        files_under(self.dir.path(), &["tmp", "corrupt"])
    }

    /// Checks every file of the cache against its name: objects and traces by their blake3
    /// digest, keys by the thunk id their directory is named after.
    pub fn verify(&self) {
        for (path, bytes) in self.files() {
            let digest = blake3::hash(&bytes).to_hex().to_string();
            let parts: Vec<&str> = path.split('/').collect();
            match parts.as_slice() {
                ["objects", fan_out, rest] => {
                    assert_eq!(format!("{fan_out}{rest}"), digest, "object {path}")
                }
                ["traces", fan_out, rest, "key"] => {
                    assert_eq!(format!("{fan_out}{rest}"), digest, "key {path}")
                }
                ["traces", _, _, name] => assert_eq!(*name, digest, "trace {path}"),
                ["VERSION"] | ["traces", "VERSION"] => assert_eq!(bytes, b"1\n"),
                _ => panic!("unexpected file {path} in the cache"),
            }
        }
    }
}

/// The arguments of `cot run FLAGS -- sh -c SCRIPT`.
pub fn run_sh<'a>(flags: &[&'a str], script: &'a str) -> Vec<&'a str> {
    let mut args = vec!["run"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    args
}

/// A home for builds run as root, outside every checkout (the same for all of them).
fn root_home() -> PathBuf {
    let home = PathBuf::from("/var/tmp/cot-tests/home");
    fs::create_dir_all(&home).unwrap();
    home
}

/// `cot ARGS...` in `dir` as root, with this module's environment.
pub fn cot(dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(shared_cot_bin())
        .current_dir(dir)
        .args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", root_home())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::from(output)
}

/// `cot ARGS...` in the project as the unprivileged test user (its home: the project), after
/// giving the project to that user.
fn cot_as_test_user(project: &Project, args: &[&str]) -> Run {
    let mut command = test_user_cot(project);
    command.args(args).env_clear().env("PATH", PATH);
    Run::from(command.env("HOME", project.root()).output().unwrap())
}

/// A build with `--report`: its run and the report's thunks.
pub struct Built {
    pub run: Run,
    pub thunks: Vec<Value>,
}

impl Built {
    /// The commands of the thunks that ran.
    pub fn ran(&self) -> Vec<String> {
        self.thunks
            .iter()
            .filter(|t| t["ran"] == Value::Bool(true))
            .map(|t| t["command"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    /// How many thunks were taken from a cache (their reason says so).
    pub fn cached(&self) -> usize {
        self.thunks
            .iter()
            .filter(|t| {
                t["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(" from the "))
            })
            .count()
    }

    pub fn describe(&self) -> String {
        let thunks: Vec<String> = self
            .thunks
            .iter()
            .map(|t| {
                format!(
                    "  {} ran={} {}: {}",
                    t["state"], t["ran"], t["command"], t["reason"]
                )
            })
            .collect();
        format!(
            "status {}\nstderr:\n{}\nthunks:\n{}",
            self.run.status,
            self.run.stderr,
            thunks.join("\n")
        )
    }

    #[track_caller]
    pub fn ok(self) -> Built {
        assert_eq!(self.run.status, 0, "{}", self.describe());
        self
    }
}

/// `cot build`/`cot make` ARGS with a report, in `dir`, as root.
pub fn build(dir: &Path, args: &[&str]) -> Built {
    let report = tempfile::Builder::new()
        .prefix("report-")
        .suffix(".json")
        .tempfile_in("/var/tmp/cot-tests")
        .unwrap();
    let report_path = report.path().to_str().unwrap().to_string();
    let mut all = vec![args[0], "--report", &report_path];
    all.extend_from_slice(&args[1..]);
    let run = cot(dir, &all);
    let text = fs::read_to_string(report.path()).unwrap_or_default();
    let thunks = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|r| r["thunks"].as_array().cloned())
        .unwrap_or_default();
    Built { run, thunks }
}

const A_C: &str = "#include \"util.h\"\nint a(void) { return UNIT * 2; }\n";
const B_C: &str = "#include \"util.h\"\nint b(void) { return UNIT + 1; }\n";
const MAIN_C: &str = "#include <stdio.h>\nint a(void); int b(void);\n\
                      int main(void) { printf(\"%d\\n\", a() + b()); return 0; }\n";

/// A small C project built by a Cotfile whose steps run with the checkout's `PWD` in their
/// environment (named in their keys).
fn cotfile_project() -> Project {
    let p = Project::new();
    p.write("util.h", "#define UNIT 20\n");
    p.write("a.c", A_C);
    p.write("b.c", B_C);
    p.write("main.c", MAIN_C);
    let cotfile = format!(
        "#!/bin/sh\nset -e\ncot={}\n\
         $cot run --bg -- cc -c a.c\n$cot run --bg -- cc -c b.c\n$cot run --bg -- cc -c main.c\n\
         $cot wait\n$cot run -- cc -o prog main.o a.o b.o\n",
        shared_cot_bin().display()
    );
    p.write("Cotfile", &cotfile);
    fs::set_permissions(p.root().join("Cotfile"), fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn two_checkouts_of_a_project_share_a_cache_both_ways() {
    require_sandbox!();
    let _machine = machine_shared();
    let cache = Cache::new();
    let first = cotfile_project();
    let built = build(first.root(), &["build", "--cache", cache.path()]).ok();
    assert_eq!(built.ran().len(), 5, "{}", built.describe());

    // A second checkout, at another path: nothing runs, everything is as the first left it.
    let second = cotfile_project();
    assert_ne!(first.root(), second.root());
    let built = build(second.root(), &["build", "--cache", cache.path()]).ok();
    assert!(built.ran().is_empty(), "{}", built.describe());
    assert_eq!(built.cached(), 5, "{}", built.describe());
    assert_same_checkout(&first, &second);
    // Now the second checkout's own: a rebuild there decides from its own store.
    let again = build(second.root(), &["build", "--cache", cache.path()]).ok();
    assert!(again.ran().is_empty(), "{}", again.describe());
    assert_eq!(again.cached(), 0, "{}", again.describe());

    // An edit in the second checkout runs what it changes, and the first gets it back.
    second.write("util.h", "#define UNIT 30\n");
    let built = build(second.root(), &["build", "--cache", cache.path()]).ok();
    let mut ran = built.ran();
    ran.sort();
    assert_eq!(
        ran,
        ["cc -c a.c", "cc -c b.c", "cc -o prog main.o a.o b.o"],
        "{}",
        built.describe()
    );
    first.write("util.h", "#define UNIT 30\n");
    let built = build(first.root(), &["build", "--cache", cache.path()]).ok();
    assert!(built.ran().is_empty(), "{}", built.describe());
    assert_eq!(built.cached(), 3, "{}", built.describe());
    let prog = Command::new(first.root().join("prog")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&prog.stdout), "91\n");
    cache.verify();
}

/// `second` holds what `first` holds, and its program prints what the Cotfile project's prints.
pub fn assert_same_checkout(first: &Project, second: &Project) {
    assert_eq!(
        files_under(second.root(), &[]),
        files_under(first.root(), &[]),
        "the same files"
    );
    let prog = Command::new(second.root().join("prog")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&prog.stdout), "61\n");
}

/// bzip2 1.0.8 under `cot make -j2` in two checkouts at different paths. Its Makefile compiles
/// with `-g`, which writes the working directory into every object: with
/// `-fdebug-prefix-map=$PWD=.` (whose value names the checkout, and so is named in the keys)
/// the objects are the same bytes anywhere, and a second checkout runs nothing.
#[test]
fn a_second_checkout_of_bzip2_runs_nothing() {
    require_sandbox!();
    let _machine = machine_shared();
    let cache = Cache::new();
    let checkout = || {
        let p = Project::new();
        fetch("fetch-bzip2", &p.root().join("bzip2"));
        p
    };
    let make = |p: &Project| {
        let dir = p.root().join("bzip2");
        let cflags = format!(
            "CFLAGS=-Wall -Winline -O2 -g -fdebug-prefix-map={}=. -D_FILE_OFFSET_BITS=64",
            dir.display()
        );
        build(&dir, &["make", "-j2", "--cache", cache.path(), &cflags]).ok()
    };
    let first = checkout();
    let built = make(&first);
    assert!(built.ran().len() > 20, "{}", built.describe());
    let second = checkout();
    let built = make(&second);
    assert!(built.ran().is_empty(), "{}", built.describe());
    assert_eq!(built.cached(), built.thunks.len(), "{}", built.describe());
    let (a, b) = (
        files_under(&first.root().join("bzip2"), &[]),
        files_under(&second.root().join("bzip2"), &[]),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (path, bytes) in &a {
        assert!(b[path] == *bytes, "{path} differs");
    }
    cache.verify();
}

/// `pwd > where` writes the checkout's path into its output: its trace is pinned to that
/// path, so another checkout runs it (and gets its own path), while a checkout at the same
/// path (a fresh clone where the first was) reuses it.
#[test]
fn an_output_that_spells_out_its_checkout_stays_with_it() {
    require_sandbox!();
    let _machine = machine_shared();
    let cache = Cache::new();
    let script = "pwd > where; cat in > copy";
    let run = |p: &Project| {
        let run = cache.sh(p.root(), script);
        let ran = run.stderr.contains("cot: ran: ");
        (run, ran)
    };
    let first = Project::new();
    first.write("in", "x");
    assert!(run(&first).1);
    let second = Project::new();
    second.write("in", "x");
    let (out, ran) = run(&second);
    assert!(ran, "another checkout runs it:\n{}", out.describe());
    assert_eq!(
        second.read("where").unwrap().trim(),
        second.root().to_str().unwrap()
    );
    // A fresh checkout where the first one was: its own store is empty, the cache serves it.
    let place = first.root().to_path_buf();
    fs::remove_dir_all(&place).unwrap();
    fs::create_dir_all(place.join(".cot")).unwrap();
    fs::write(place.join("in"), "x").unwrap();
    let run = cache.sh(&place, script);
    assert!(
        run.stderr.contains("cached from the shared cache"),
        "{}",
        run.describe()
    );
    assert_eq!(
        fs::read_to_string(place.join("where")).unwrap().trim(),
        place.to_str().unwrap()
    );
}

/// A user who may only read the cache (by choice, or because it belongs to someone else)
/// reuses what is there and adds nothing.
#[test]
fn a_read_only_cache_is_used_and_left_as_it_was() {
    require_sandbox!();
    let _machine = machine_shared();
    let cache = Cache::new();
    let script = "cat in > out";
    // Root builds rootless too: a key says whether the thunk ran in a user namespace, and the
    // test user's thunks always do.
    let first = Project::new();
    first.write("in", "shared");
    let flags = ["--rootless", "--cache", cache.path()];
    cot_with_home(first.root(), &run_sh(&flags, script)).ok();
    let before = cache.files();

    // By choice.
    let second = Project::new();
    second.write("in", "shared");
    second.write("other", "mine");
    let flags = [
        "--rootless",
        "--explain",
        "--cache",
        cache.path(),
        "--cache-read-only",
    ];
    let run_in = |p: &Project, script: &str| cot_with_home(p.root(), &run_sh(&flags, script));
    let run = run_in(&second, script);
    assert!(
        run.stderr.contains("cached from the shared cache"),
        "{}",
        run.describe()
    );
    assert_eq!(second.read("out").as_deref(), Some("shared"));
    let run = run_in(&second, "cat other > out2");
    assert!(run.stderr.contains("cot: ran: "), "{}", run.describe());
    assert_eq!(cache.files(), before, "nothing written");

    // Because it belongs to another user: found read-only, used all the same.
    let third = Project::new();
    third.write("in", "shared");
    let flags = ["--explain", "--cache", cache.path()];
    let run = cot_as_test_user(&third, &run_sh(&flags, script)).ok();
    assert!(
        run.stderr.contains("cached from the shared cache"),
        "{}",
        run.describe()
    );
    assert!(!run.stderr.contains("warning"), "{}", run.describe());
    assert_eq!(third.read("out").as_deref(), Some("shared"));
    cot_as_test_user(
        &third,
        &run_sh(&["--cache", cache.path()], "echo new > new"),
    )
    .ok();
    assert_eq!(cache.files(), before, "nothing written");
}

/// `cot ARGS` in `dir` as root, with the checkout itself as home (as the test user has).
fn cot_with_home(dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(shared_cot_bin())
        .current_dir(dir)
        .args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::from(output)
}

/// Eight checkouts write the same thunk (half of them with the same input, so the same trace
/// and contents) to one cache at once: every file of the cache is whole and verifies, and a
/// ninth checkout reuses what they wrote.
#[test]
fn concurrent_writers_never_corrupt_a_shared_cache() {
    require_sandbox!();
    let _machine = machine_shared();
    let cache = Cache::new();
    let script = "cat in > out; cat big > big.copy";
    let big: String = (0..200_000).map(|i| format!("{i}\n")).collect();
    let checkouts: Vec<Project> = (0..8)
        .map(|i| {
            let p = Project::new();
            if i % 2 == 0 {
                p.write("in", "same");
            } else {
                p.write("in", &format!("other {i}"));
            }
            p.write("big", &big);
            p
        })
        .collect();
    let children: Vec<_> = checkouts
        .iter()
        .map(|p| {
            Command::new(shared_cot_bin())
                .current_dir(p.root())
                .args(run_sh(&["--cache", cache.path()], script))
                .env_clear()
                .env("PATH", PATH)
                .env("HOME", root_home())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&output.stderr).contains("warning"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    cache.verify();
    let last = Project::new();
    last.write("in", "same");
    last.write("big", &big);
    let run = cache.sh(last.root(), script);
    assert!(
        run.stderr.contains("cached from the shared cache"),
        "{}",
        run.describe()
    );
    assert_eq!(last.read("big.copy").as_deref(), Some(big.as_str()));
}

/// A content of the cache damaged on disk, and a trace file whose content is not what its
/// name says: each is found out when read, reported, and the thunk runs.
#[test]
fn a_corrupt_shared_cache_costs_a_run_never_a_wrong_output() {
    require_sandbox!();
    let _machine = machine_shared();
    let cache = Cache::new();
    let script = "cat in > out";
    let run = |p: &Project| cache.sh(p.root(), script);
    let first = Project::new();
    first.write("in", "the right content");
    run(&first);
    // Damage the object holding `out` (the only one of that size).
    let object = cache
        .files()
        .into_iter()
        .find(|(path, bytes)| path.starts_with("objects/") && bytes == b"the right content")
        .map(|(path, _)| Path::new(cache.path()).join(path))
        .unwrap();
    fs::set_permissions(&object, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&object, "the wrong content").unwrap();
    let second = Project::new();
    second.write("in", "the right content");
    let out = run(&second);
    assert!(out.stderr.contains("cot: ran: "), "{}", out.describe());
    assert!(out.stderr.contains("warning"), "{}", out.describe());
    assert_eq!(second.read("out").as_deref(), Some("the right content"));
    // The damaged object was moved aside; the run wrote a good one back.
    cache.verify();
    assert_eq!(
        fs::read_dir(Path::new(cache.path()).join("corrupt"))
            .unwrap()
            .count(),
        1
    );

    // Trace files whose content is not what their name says.
    let traces: Vec<PathBuf> = cache
        .files()
        .into_keys()
        .filter(|path| path.starts_with("traces/") && path.rsplit('/').next().unwrap().len() == 64)
        .map(|path| Path::new(cache.path()).join(path))
        .collect();
    assert!(!traces.is_empty());
    for trace in traces {
        let mut bytes = fs::read(&trace).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::set_permissions(&trace, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&trace, bytes).unwrap();
    }
    let third = Project::new();
    third.write("in", "the right content");
    let out = run(&third);
    assert!(out.stderr.contains("cot: ran: "), "{}", out.describe());
    assert!(
        out.stderr.contains("failed verification"),
        "{}",
        out.describe()
    );
    assert_eq!(third.read("out").as_deref(), Some("the right content"));
    cache.verify();
}

/// A malformed remote URL, on the command line or in cot.toml, is an error naming it; a
/// shared cache that cannot be used (a file) is one warning, and the build goes on.
#[test]
fn a_misconfigured_cache_is_named() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let run = cot(p.root(), &["run", "--remote", "http://h:1", "--", "true"]);
    assert_eq!(run.status, 125, "{}", run.describe());
    assert!(
        run.stderr
            .contains("--remote: \"http://h:1\": not a grpc:// URL"),
        "{}",
        run.describe()
    );
    p.write("cot.toml", "[cache]\nremote = \"grpc://cache.example\"\n");
    let run = cot(p.root(), &["run", "--", "true"]);
    assert_eq!(run.status, 125, "{}", run.describe());
    assert!(
        run.stderr
            .contains("[cache] remote: \"grpc://cache.example\": no port"),
        "{}",
        run.describe()
    );
    fs::remove_file(p.root().join("cot.toml")).unwrap();
    p.write("not-a-dir", "");
    let cache = p.root().join("not-a-dir");
    let flags = ["--cache", cache.to_str().unwrap()];
    let run = cot(p.root(), &run_sh(&flags, "echo x > out")).ok();
    assert_eq!(
        run.stderr.matches("cannot use the shared cache").count(),
        1,
        "{}",
        run.describe()
    );
    assert!(run.stderr.contains("not a directory"), "{}", run.describe());
    assert_eq!(p.read("out").as_deref(), Some("x\n"));
}
