//! What the thunk can see: its own /proc, a minimal /dev, read-only /sys, loopback only, and no
//! path to the real root.

use crate::harness::{machine_shared, Project};
use crate::require_sandbox;

#[test]
fn proc_shows_only_the_sandbox() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    // Every pid directory in /proc belongs to the sandbox: the init, sh, and ls.
    let run = p
        .sh("ls /proc | grep -c '^[0-9]*$'; cat /proc/1/comm >/dev/null && echo init-visible")
        .ok();
    let count: usize = run.stdout.lines().next().unwrap().trim().parse().unwrap();
    assert!(count <= 4, "too many processes visible: {}", run.describe());
    assert!(run.stdout.contains("init-visible"));
}

#[test]
fn dev_holds_only_the_usual_devices() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let run = p.sh("ls -A /dev | sort | tr '\\n' ' '").ok();
    assert_eq!(
        run.stdout.trim(),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    );
    let run = p
        .sh("echo hi > /dev/null && head -c 4 /dev/urandom | wc -c")
        .ok();
    assert_eq!(run.stdout.trim(), "4");
}

#[test]
fn sys_is_read_only_and_net_is_loopback_only() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let run = p
        .sh("touch /sys/x 2>&1; ls /sys/class/net; cat /sys/class/net/lo/operstate")
        .ok();
    assert!(
        run.stdout.contains("Read-only file system"),
        "{}",
        run.describe()
    );
    let ifaces: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| !l.contains("Read-only"))
        .collect();
    assert_eq!(
        ifaces[0],
        "lo",
        "only the loopback interface: {}",
        run.describe()
    );
    assert_eq!(ifaces.len(), 2);
}

#[test]
fn root_is_the_fuse_view_and_the_mount_table_holds_no_host_filesystem() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let run = p.sh("stat -f -c %T /; cat /proc/self/mountinfo").ok();
    let mut lines = run.stdout.lines();
    let root_type = lines.next().unwrap();
    // GNU stat names FUSE's magic number "fuseblk".
    assert!(
        root_type.starts_with("fuse"),
        "root is not the FUSE view: {root_type}"
    );
    for line in lines {
        // Fields after " - " are: fstype source options.
        let fstype = line
            .split(" - ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .unwrap();
        assert!(
            ["fuse", "fuse.cot", "proc", "tmpfs", "devpts", "sysfs", "devtmpfs"].contains(&fstype),
            "host filesystem visible in the sandbox: {line}"
        );
        if fstype == "devtmpfs" {
            // Only single device files are bound from the host's /dev.
            let mount_point = line.split(' ').nth(4).unwrap();
            assert!(mount_point.starts_with("/dev/"), "{line}");
        }
    }
}

#[test]
fn escape_attempts_fail() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let outside = tempfile::Builder::new()
        .prefix("escape-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = outside.path().display().to_string();
    // Each attempt tries to create a file outside the writable roots through another route;
    // every one must go through the view (and fail with EROFS), none may reach the host.
    let attempts = [
        format!("touch /proc/1/root{dir}/via-proc-root"),
        format!("touch /proc/self/root{dir}/via-self-root"),
        format!("cd /proc/self/cwd && touch ../../../..{dir}/via-cwd"),
        format!("touch /sys/../..{dir}/via-sys-dotdot"),
        format!("touch /dev/../..{dir}/via-dev-dotdot"),
        format!("touch /tmp/../..{dir}/via-tmp-dotdot"),
        format!("touch /real-system{dir}/via-real-system"),
        format!("touch /proc/1/cwd/../../../..{dir}/via-init-cwd"),
        // A symlink the thunk makes in its own project still resolves inside the view.
        format!("ln -s {dir} lnk && touch lnk/via-own-symlink"),
        format!("rm -rf sub && ln -s {dir} sub && mkdir sub/via-replaced-dir"),
    ];
    let script = attempts
        .iter()
        .map(|a| format!("{a} 2>/dev/null && echo ESCAPED: {a}"))
        .collect::<Vec<_>>()
        .join("; ");
    let run = p.sh(&format!(
        "{script}; test -e /real-system && echo REAL-SYSTEM; exit 0"
    ));
    assert_eq!(run.status, 0, "{}", run.describe());
    assert!(!run.stdout.contains("ESCAPED"), "{}", run.stdout);
    assert!(!run.stdout.contains("REAL-SYSTEM"));
    let left: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
    assert!(left.is_empty(), "files reached the host: {left:?}");
    // The root of every process is the view: /proc/self/root/.. is still the view, and the
    // init (undumpable) does not let the command through its /proc entry at all.
    let run = p
        .sh("stat -f -c %T /proc/self/root/.. /proc/self/root/; ls /proc/1/root/ 2>&1; exit 0")
        .ok();
    let mut lines = run.stdout.lines();
    assert!(lines.next().unwrap().starts_with("fuse"), "{}", run.stdout);
    assert!(lines.next().unwrap().starts_with("fuse"), "{}", run.stdout);
    assert!(run.stdout.contains("Permission denied"), "{}", run.stdout);
}

#[test]
fn inherited_descriptors_do_not_lead_out() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    // A directory as stdin would allow openat(0, "..") to the host: it is replaced.
    let host_dir = std::fs::File::open("/etc").unwrap();
    let mut cmd = p.command(
        &[],
        &[
            "sh",
            "-c",
            "ls /proc/self/fd/0/ 2>&1 | head -1; ls /proc/self/fd | wc -l",
        ],
    );
    cmd.stdin(host_dir);
    // An extra inherited descriptor must not reach the command either.
    let run = crate::harness::Run::from_output(cmd.output().unwrap(), &p.trace_path());
    assert_eq!(run.status, 0, "{}", run.describe());
    assert!(run.stdout.contains("Not a directory"), "{}", run.describe());
    let fds: usize = run.stdout.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(
        fds <= 4,
        "only 0, 1, 2 and ls's own directory fd: {}",
        run.stdout
    );
}
