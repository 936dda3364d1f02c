//! Exact tracing: every access kind, by every kind of process.

use crate::harness::{machine_shared, Project};

fn canonical(path: &str) -> std::path::PathBuf {
    std::fs::canonicalize(path).unwrap()
}
use crate::require_sandbox;

#[test]
fn each_access_kind_is_recorded_once() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in.txt", "input\n");
    p.write("dir/a", "a");
    p.write("dir/b", "b");
    p.write("old", "old");
    p.write("gone", "gone");
    p.write("mode", "mode");
    p.write("linked", "linked");
    std::fs::create_dir(p.root().join("emptydir")).unwrap();
    std::os::unix::fs::symlink("in.txt", p.root().join("link")).unwrap();

    let run = p
        .sh(
            "stat in.txt >/dev/null; cat in.txt in.txt >/dev/null; ls dir >/dev/null; \
             readlink link >/dev/null; test -e missing.h; echo out > out.txt; \
             rm gone; mv old new; mkdir made; rmdir emptydir; ln -s target sym; \
             ln linked hard; chmod 600 mode",
        )
        .ok();
    run.assert_has("stat", p.path("in.txt"));
    run.assert_has("read", p.path("in.txt"));
    assert_eq!(run.count("read", &p.path("in.txt")), 1, "recorded once");
    run.assert_has("readdir", p.path("dir"));
    run.assert_has("readlink", p.path("link"));
    run.assert_has("absent", p.path("missing.h"));
    run.assert_has("write", p.path("out.txt"));
    run.assert_has("delete", p.path("gone"));
    run.assert_has("rename", p.path("old"));
    let rename = run.trace.iter().find(|l| l.kind == "rename").unwrap();
    assert_eq!(rename.to.as_deref(), Some(p.path("new").as_bytes()));
    run.assert_has("mkdir", p.path("made"));
    run.assert_has("rmdir", p.path("emptydir"));
    run.assert_has("symlink", p.path("sym"));
    run.assert_has("link", p.path("linked"));
    run.assert_has("setattr", p.path("mode"));
    // The shell was read through the view too, at its resolved path.
    run.assert_has("read", canonical("/bin/sh"));
}

#[test]
fn symlinks_are_recorded_as_link_and_target() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("real/file", "x");
    std::os::unix::fs::symlink("real", p.root().join("alias")).unwrap();
    let run = p.sh("cat alias/file >/dev/null").ok();
    run.assert_has("readlink", p.path("alias"));
    run.assert_has("read", p.path("real/file"));
}

#[test]
fn statically_linked_binaries_are_traced() {
    require_sandbox!();
    let _machine = machine_shared();
    let busybox = "/bin/busybox";
    if !std::path::Path::new(busybox).exists() {
        crate::harness::skip("busybox-static is not installed (scripts/setup installs it)");
        return;
    }
    let p = Project::new();
    p.write("data", "static\n");
    let run = p.run(&[], &[busybox, "cat", "data"]).ok();
    assert_eq!(run.stdout, "static\n");
    run.assert_has("read", canonical(busybox));
    run.assert_has("read", p.path("data"));
}

#[test]
fn every_process_of_the_tree_is_traced() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    for name in ["a", "b", "c"] {
        p.write(name, name);
    }
    p.write(
        "Makefile",
        "all: out\nout: a b\n\tcat a > a.tmp & cat b > b.tmp & wait\n\tcat a.tmp b.tmp c > out\n",
    );
    let run = p.run(&[], &["make", "-j2"]).ok();
    assert_eq!(p.read("out").as_deref(), Some("abc"));
    for name in ["a", "b", "c", "Makefile"] {
        run.assert_has("read", p.path(name));
    }
    run.assert_has("write", p.path("out"));
}

#[test]
fn threads_and_vfork_are_traced() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("t1", "1");
    p.write("t2", "2");
    p.write("v", "v");
    p.write(
        "probe.c",
        r#"
#include <pthread.h>
#include <fcntl.h>
#include <unistd.h>
#include <spawn.h>
#include <sys/wait.h>
extern char **environ;
static void *reader(void *name) { int fd = open(name, O_RDONLY); if (fd >= 0) close(fd); return 0; }
int main(void) {
    pthread_t a, b;
    pthread_create(&a, 0, reader, "t1");
    pthread_create(&b, 0, reader, "t2");
    pthread_join(a, 0); pthread_join(b, 0);
    pid_t pid = vfork();
    if (pid == 0) { char *argv[] = {"cat", "v", 0}; execve("/bin/cat", argv, environ); _exit(127); }
    int status; waitpid(pid, &status, 0);
    return WEXITSTATUS(status);
}
"#,
    );
    let build = std::process::Command::new("cc")
        .args(["-O1", "-pthread", "-o", "probe", "probe.c"])
        .current_dir(p.root())
        .status()
        .unwrap();
    assert!(build.success());
    let run = p.run(&[], &["./probe"]).ok();
    assert_eq!(run.stdout, "v");
    run.assert_has("read", p.path("t1"));
    run.assert_has("read", p.path("t2"));
    run.assert_has("read", p.path("v"));
    run.assert_has("read", canonical("/bin/cat"));
}

#[test]
fn hidden_paths_look_absent_and_are_recorded() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("secret/key", "k");
    p.write("visible", "v");
    let glob = format!("{}/secret", p.root().display());
    let run = p.run(
        &["--hide", &glob],
        &[
            "sh",
            "-c",
            "ls; cat secret/key; test -e secret && echo seen; exit 0",
        ],
    );
    assert_eq!(run.status, 0, "{}", run.describe());
    assert!(
        !run.stdout.contains("secret"),
        "listing shows no hidden entry"
    );
    assert!(!run.stdout.contains("seen"));
    assert!(run.stdout.contains("visible"));
    run.assert_has("hidden", p.path("secret"));
    run.assert_not("absent", p.path("secret"));
}

#[test]
fn non_utf8_and_odd_names_round_trip() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let run = p
        .sh("printf x > 'with space'; printf y > \"$(printf 'new\\nline')\"; printf z > \"$(printf 'caf\\351')\"")
        .ok();
    use std::os::unix::ffi::OsStrExt;
    let latin1 = p.root().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    run.assert_has("write", p.path("with space"));
    run.assert_has("write", p.path("new\nline"));
    run.assert_has("write", latin1.as_os_str());
    assert_eq!(std::fs::read(&latin1).unwrap(), b"z");
    assert_eq!(p.read("new\nline").as_deref(), Some("y"));
    assert_eq!(p.read("with space").as_deref(), Some("x"));
    let raw = std::fs::read_to_string(p.trace_path()).unwrap();
    assert!(
        raw.contains("path_b64"),
        "non-UTF-8 path carries its exact bytes"
    );
}
