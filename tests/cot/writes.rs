//! The write layer: visible inside at once, committed only on success, EROFS elsewhere.

use crate::harness::{machine_shared, Project};
use crate::require_sandbox;

#[test]
fn writes_are_visible_inside_immediately() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("keep", "k");
    p.write("drop", "d");
    p.write("dir/x", "x");
    let run = p
        .sh(
            "echo new > made; cat made; ls; rm drop; ls; mv dir moved; ls moved; \
             echo more >> keep; cat keep; mkdir -p deep/er; echo z > deep/er/z; find deep | sort",
        )
        .ok();
    let expected = "new\n\
                    dir\ndrop\nkeep\nmade\n\
                    dir\nkeep\nmade\n\
                    x\n\
                    kmore\n\
                    deep\ndeep/er\ndeep/er/z\n";
    assert_eq!(run.stdout, expected);
    assert_eq!(p.read("made").as_deref(), Some("new\n"));
    assert!(!p.exists("drop"));
    assert!(!p.exists("dir"));
    assert_eq!(p.read("moved/x").as_deref(), Some("x"));
    assert_eq!(p.read("keep").as_deref(), Some("kmore\n"));
    assert_eq!(p.read("deep/er/z").as_deref(), Some("z\n"));
}

#[test]
fn failed_command_commits_nothing() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("input", "original");
    let run = p.sh("echo changed > input; echo new > output; rm -f other; exit 3");
    assert_eq!(run.status, 3, "{}", run.describe());
    assert_eq!(p.read("input").as_deref(), Some("original"));
    assert!(!p.exists("output"));
    // The trace is still written for a failed command.
    run.assert_has("write", p.path("output"));
}

#[test]
fn keep_failed_commits_anyway() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let run = p.run(
        &["--keep-failed"],
        &["sh", "-c", "echo partial > log; exit 1"],
    );
    assert_eq!(run.status, 1);
    assert_eq!(p.read("log").as_deref(), Some("partial\n"));
}

#[test]
fn writes_outside_writable_roots_fail_with_erofs() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let outside = tempfile::Builder::new()
        .prefix("outside-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let target = outside.path().join("file");
    let run = p.sh(&format!(
        "touch {0} 2>&1; mkdir {0}.d 2>&1; touch /etc/cot-should-not-exist 2>&1; exit 0",
        target.display()
    ));
    assert_eq!(run.status, 0);
    assert_eq!(
        run.stdout.matches("Read-only file system").count(),
        3,
        "{}",
        run.describe()
    );
    assert!(!target.exists());
    assert!(!std::path::Path::new("/etc/cot-should-not-exist").exists());

    // --writable DIR makes it writable, and the write is committed there.
    let run = p.run(
        &["--writable", outside.path().to_str().unwrap()],
        &["sh", "-c", &format!("echo yes > {}", target.display())],
    );
    assert_eq!(run.status, 0, "{}", run.describe());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "yes\n");
}

#[test]
fn tmp_is_private_empty_and_discarded() {
    require_sandbox!();
    let _machine = machine_shared();
    let marker = format!("/tmp/cot-host-marker-{}", std::process::id());
    std::fs::write(&marker, "host").unwrap();
    let p = Project::new();
    let run = p
        .sh("ls -A /tmp | wc -l; echo x > /tmp/scratch; cat /tmp/scratch")
        .ok();
    assert_eq!(run.stdout, "0\nx\n");
    assert!(!std::path::Path::new("/tmp/scratch").exists());
    std::fs::remove_file(marker).unwrap();
}

#[test]
fn concurrent_runs_in_one_directory() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let children: Vec<_> = (0..6)
        .map(|i| {
            let mut cmd = p.command(
                &[],
                &[
                    "sh",
                    "-c",
                    &format!("sleep 0.2; echo {i} > out{i}; cat out{i}"),
                ],
            );
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{i}\n"));
    }
    for i in 0..6 {
        assert_eq!(p.read(&format!("out{i}")), Some(format!("{i}\n")));
    }
}

#[test]
fn a_project_under_tmp_stays_visible_in_the_private_tmp() {
    require_sandbox!();
    let _machine = machine_shared();
    let project = tempfile::Builder::new()
        .prefix("cot-in-tmp-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::create_dir(project.path().join(".cot")).unwrap();
    std::fs::write(project.path().join("in"), "in").unwrap();
    let neighbour = format!("/tmp/cot-neighbour-{}", std::process::id());
    std::fs::write(&neighbour, "host").unwrap();
    let output = std::process::Command::new(crate::harness::cot_bin())
        .args(["run", "--", "sh", "-c"])
        .arg(format!(
            "pwd; cat in; echo out > out; ls -A /tmp; test -e {neighbour} && echo LEAK; exit 0"
        ))
        .current_dir(project.path())
        .output()
        .unwrap();
    std::fs::remove_file(&neighbour).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let name = project
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(stdout, format!("{}\nin{name}\n", project.path().display()));
    assert_eq!(
        std::fs::read_to_string(project.path().join("out")).unwrap(),
        "out\n"
    );
}

#[test]
fn the_project_is_the_nearest_ancestor_holding_dot_cot() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("sub/deeper/in", "in");
    let mut cmd = p.command(&[], &["sh", "-c", "echo top > ../../top; echo here > here"]);
    cmd.current_dir(p.root().join("sub/deeper"));
    let run = crate::harness::Run::from_output(cmd.output().unwrap(), &p.trace_path()).ok();
    run.assert_has("write", p.path("top"));
    assert_eq!(p.read("top").as_deref(), Some("top\n"));
    assert_eq!(p.read("sub/deeper/here").as_deref(), Some("here\n"));
}

#[test]
fn each_run_sees_its_own_first_accesses() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "in");
    // A second run must record the read again: the kernel's caches of one run's view are
    // never those of another.
    for _ in 0..2 {
        p.run(&["--no-cache"], &["sh", "-c", "cat in; cat in"])
            .ok()
            .assert_has("read", p.path("in"));
    }
}

#[test]
fn system_root_proxies_another_tree_with_the_project_at_its_own_path() {
    require_sandbox!();
    let _machine = machine_shared();
    let busybox = std::path::Path::new("/bin/busybox");
    if !busybox.exists() {
        crate::harness::skip("busybox-static is not installed (scripts/setup installs it)");
        return;
    }
    let root = tempfile::Builder::new()
        .prefix("sysroot-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::create_dir(root.path().join("bin")).unwrap();
    std::fs::copy(busybox, root.path().join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.path().join("bin/sh")).unwrap();
    std::fs::write(root.path().join("marker"), "from the system root\n").unwrap();
    let p = Project::new();
    p.write("in", "project input\n");
    let run = p.run(
        &[
            "--system-root",
            root.path().to_str().unwrap(),
            "--env",
            "PATH=/bin",
        ],
        &[
            "sh",
            "-c",
            "cat /marker in; test -e /etc/passwd || echo no-etc; echo out > out; busybox ls /",
        ],
    );
    assert_eq!(run.status, 0, "{}", run.describe());
    let mut lines = run.stdout.lines();
    assert_eq!(lines.next(), Some("from the system root"));
    assert_eq!(lines.next(), Some("project input"));
    assert_eq!(
        lines.next(),
        Some("no-etc"),
        "the host's /etc is not visible"
    );
    let listing: Vec<&str> = lines.flat_map(|l| l.split_whitespace()).collect();
    assert_eq!(
        listing,
        ["bin", "dev", "marker", "proc", "sys", "tmp", "var"]
    );
    run.assert_has("read", "/marker");
    run.assert_has("absent", "/etc");
    assert_eq!(p.read("out").as_deref(), Some("out\n"));
}
