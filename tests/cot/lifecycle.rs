//! Exit statuses, the environment, signals, and what is left after cot dies.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::{machine_exclusive, machine_shared, Project};
use crate::require_sandbox;

#[test]
fn exit_statuses() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    assert_eq!(p.sh("exit 3").status, 3);
    assert_eq!(p.sh("exit 0").status, 0);

    let run = p.sh("kill -9 $$");
    assert_eq!(run.status, 128 + 9);
    assert!(run.stderr.contains("SIGKILL"), "{}", run.stderr);

    let run = p.run(&[], &["no-such-command-xyz"]);
    assert_eq!(run.status, 127);
    assert_eq!(
        run.stderr.trim(),
        "cot: no-such-command-xyz: command not found"
    );

    p.write("not-exec", "#!/bin/sh\necho hi\n");
    let run = p.run(&[], &["./not-exec"]);
    assert_eq!(run.status, 126, "{}", run.describe());
    assert_eq!(
        run.stderr.trim(),
        "cot: ./not-exec: cannot execute: Permission denied"
    );
}

#[test]
fn cot_failures_exit_125_with_a_message() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let run = p.run(&["--system-root", "/no/such/root"], &["true"]);
    assert_eq!(run.status, 125);
    assert!(run.stderr.contains("/no/such/root"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);
}

#[test]
fn environment_is_filtered() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let env_of = |flags: &[&str]| {
        let mut cmd = p.command(flags, &["env"]);
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", "/home/nobody")
            .env("LC_ALL", "C")
            .env("SECRET", "s3cret")
            .env("CC", "gcc");
        let output = cmd.output().unwrap();
        assert!(output.status.success());
        let mut lines: Vec<String> = String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(
        env_of(&[]),
        ["HOME=/home/nobody", "LC_ALL=C", "PATH=/usr/bin:/bin"]
    );
    assert_eq!(
        env_of(&["--env", "CC", "--env", "X=1"]),
        [
            "CC=gcc",
            "HOME=/home/nobody",
            "LC_ALL=C",
            "PATH=/usr/bin:/bin",
            "X=1"
        ]
    );
    assert!(env_of(&["--inherit-env"]).contains(&"SECRET=s3cret".to_string()));
}

#[test]
fn stdin_and_cwd_are_the_callers() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("sub/file", "f");
    let mut cmd = p.command(&[], &["sh", "-c", "pwd; cat"]);
    cmd.current_dir(p.root().join("sub"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{}\nfrom stdin", p.path("sub"))
    );
}

/// Starts `cot run` of a script that prints `ready` then sleeps, with a token in its command
/// line so its processes can be found from outside.
fn start_sleeper(p: &Project, token: &str) -> std::process::Child {
    let script = format!("echo out > out; sh -c 'sleep 300 # {token}' & echo ready; wait");
    let mut cmd = p.command(&[], &["sh", "-c", &script]);
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead;
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    child
}

fn processes_with(token: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(token) {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found
}

fn cot_mounts() -> usize {
    // Any mount served by a cot anywhere: scan the mount tables of all live processes.
    let mut count = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(info) = std::fs::read_to_string(entry.path().join("mountinfo")) {
            count += info
                .lines()
                .filter(|l| l.contains(" - fuse.cot ") || l.contains(" - fuse cot "))
                .count();
        }
    }
    count
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_and_sigint_end_the_whole_tree_and_commit_nothing() {
    require_sandbox!();
    let _machine = machine_shared();
    use nix::sys::signal::Signal;
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let p = Project::new();
        let token = format!("cot-{}-{}", signal.as_str(), std::process::id());
        let child = start_sleeper(&p, &token);
        assert!(!processes_with(&token).is_empty());
        // Only cot gets the signal (a terminal's Ctrl-C would reach the command too).
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let output = child.wait_with_output().unwrap();
        assert_eq!(output.status.code(), Some(128 + signal as i32), "{signal}");
        wait_until("the thunk's processes to go", || {
            processes_with(&token).is_empty()
        });
        assert!(!p.exists("out"), "an interrupted thunk commits nothing");
    }
}

#[test]
fn sigkill_of_cot_leaves_no_process_no_mount_and_commits_nothing() {
    require_sandbox!();
    // Exclusive: it counts every cot mount on the machine.
    let _machine = machine_exclusive();
    let p = Project::new();
    let token = format!("cot-sigkill-{}", std::process::id());
    let mut child = start_sleeper(&p, &token);
    assert!(cot_mounts() > 0, "the view is mounted while the thunk runs");
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the thunk's processes to go", || {
        processes_with(&token).is_empty()
    });
    wait_until("the mount to go", || cot_mounts() == 0);
    assert!(!p.exists("out"));
    // The next run sweeps the dead run's layer.
    p.sh("true").ok();
    let leftovers: Vec<_> = std::fs::read_dir(p.root().join(".cot/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "layers left behind: {leftovers:?}");
}

#[test]
fn a_missing_store_server_is_named() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    // cot alone, without cot-store-server beside it.
    let lonely = tempfile::Builder::new()
        .prefix("lonely-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let cot = lonely.path().join("cot");
    std::fs::copy(crate::harness::cot_bin(), &cot).unwrap();
    let output = std::process::Command::new(&cot)
        .args(["run", "--", "true"])
        .current_dir(p.root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("cot-store-server"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

#[test]
fn a_store_that_cannot_be_opened_is_explained_at_once() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    // A file where the database directory should be.
    std::fs::create_dir_all(p.root().join(".cot/store")).unwrap();
    std::fs::write(p.root().join(".cot/store/db"), "not a database").unwrap();
    let run = p.run(&[], &["true"]);
    assert_eq!(run.status, 125, "{}", run.describe());
    assert!(
        run.stderr.contains(".cot/store/db"),
        "names the store: {}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);
    // The server's own reason, as soon as it gave up, not a start-up timeout.
    assert!(!run.stderr.contains("did not start"), "{}", run.stderr);
}
