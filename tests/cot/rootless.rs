//! Rootless mode: an ordinary user, through a user namespace.

use crate::harness::{machine_exclusive, machine_shared, run_as_test_user, Project};
use crate::require_sandbox;

#[test]
fn rootless_run_traces_and_commits() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in.c", "int main(void) { return 0; }\n");
    // A directory the user owns outside the project: writable by permissions, but not a
    // writable root of the thunk.
    let outside = tempfile::Builder::new()
        .prefix("rootless-outside-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (uid, gid) = crate::harness::test_user();
    crate::harness::chown_tree(outside.path(), uid, gid);
    let script = format!(
        "id -u; cc -o prog in.c && ./prog && echo built; touch {}/nope 2>&1; exit 0",
        outside.path().display()
    );
    let run = run_as_test_user(&p, &["--verbose"], &["sh", "-c", &script]);
    assert_eq!(run.status, 0, "{}", run.describe());
    let mut lines = run.stdout.lines();
    assert_eq!(
        lines.next(),
        Some(uid.to_string().as_str()),
        "runs as the caller's uid"
    );
    assert!(run.stdout.contains("built"));
    assert!(run.stdout.contains("Read-only file system"));
    assert!(
        run.stderr.contains("userspace"),
        "no passthrough without privileges: {}",
        run.stderr
    );
    run.assert_has("read", p.path("in.c"));
    run.assert_has("write", p.path("prog"));
    assert!(p.exists("prog"));
    assert!(!outside.path().join("nope").exists());
}

#[test]
fn rootless_forced_as_root() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let run = p.run(
        &["--rootless", "--verbose"],
        &["sh", "-c", "echo x > f; id -u"],
    );
    assert_eq!(run.status, 0, "{}", run.describe());
    assert_eq!(
        run.stdout.trim(),
        "0",
        "root mapped to itself in the user namespace"
    );
    assert!(run.stderr.contains("userspace"), "{}", run.stderr);
    assert_eq!(p.read("f").as_deref(), Some("x\n"));
}

#[test]
fn unusable_dev_fuse_is_explained() {
    require_sandbox!();
    // Exclusive: it changes the mode of /dev/fuse for a moment.
    let _machine = machine_exclusive();
    let p = Project::new();
    crate::harness::test_user();
    let set_mode = |mode| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(mode)).unwrap();
    };
    set_mode(0o600);
    let run = run_as_test_user(&p, &[], &["true"]);
    set_mode(0o666);
    assert_eq!(run.status, 125, "{}", run.describe());
    assert!(run.stderr.contains("/dev/fuse"), "{}", run.stderr);
    assert!(
        run.stderr.contains("chmod 0666 /dev/fuse"),
        "says what to do: {}",
        run.stderr
    );
}

#[test]
fn disabled_user_namespaces_are_explained() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    // user.max_user_namespaces is per user namespace: set it to 0 only in a throwaway one, and
    // run cot there, forced to create its own user namespace.
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-U", "-r", "--", "sh", "-c"])
        .arg(r#"echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" run --rootless -- true"#)
        .arg(crate::harness::cot_bin())
        .current_dir(p.root());
    let output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("user.max_user_namespaces"), "{stderr}");
    assert!(stderr.contains("enable them"), "says what to do: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}
