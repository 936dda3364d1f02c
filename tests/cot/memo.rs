//! Memoized thunks: a second run of an unchanged command is a hit that restores outputs and
//! replays what the command said; any change the command could observe is a miss.

use crate::harness::{machine_shared, Project, Run};
use crate::require_sandbox;

#[track_caller]
fn assert_ran(p: &Project, script: &str, why: &str) -> Run {
    let (run, ran) = p.explain(&[], script);
    assert!(ran, "expected a run ({why}):\n{}", run.describe());
    assert!(
        run.stderr.contains(why),
        "expected {why:?}:\n{}",
        run.describe()
    );
    run
}

#[track_caller]
fn assert_cached(p: &Project, script: &str) -> Run {
    let (run, ran) = p.explain(&[], script);
    assert!(!ran, "expected a hit:\n{}", run.describe());
    run
}

#[test]
fn unchanged_inputs_are_a_hit_that_replays_output_and_status() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "data\n");
    let script = "cat in; echo to-stderr >&2; cp in out";
    let first = assert_ran(&p, script, "no earlier trace").ok();
    let second = assert_cached(&p, script).ok();
    assert_eq!(second.stdout, first.stdout);
    assert!(second.stderr.contains("to-stderr"));
    assert!(second.trace.is_empty(), "nothing ran, nothing traced");
    assert_eq!(p.read("out").as_deref(), Some("data\n"));
}

#[test]
fn each_kind_of_change_is_a_miss() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("src/a.h", "a");
    p.write("dir/x", "x");
    std::os::unix::fs::symlink("src/a.h", p.root().join("link")).unwrap();
    let script = "cat src/a.h >/dev/null; test -e gen.h; ls dir >/dev/null; readlink link >/dev/null; echo ok";
    assert_ran(&p, script, "no earlier trace").ok();
    assert_cached(&p, script).ok();

    p.write("src/a.h", "b");
    assert_ran(&p, script, "src/a.h changed (content)").ok();
    assert_cached(&p, script).ok();

    p.write("gen.h", "");
    assert_ran(&p, script, "gen.h now exists").ok();
    assert_cached(&p, script).ok();

    p.write("dir/y", "y");
    assert_ran(&p, script, "dir changed (directory listing)").ok();
    assert_cached(&p, script).ok();

    std::fs::remove_file(p.root().join("link")).unwrap();
    std::os::unix::fs::symlink("gen.h", p.root().join("link")).unwrap();
    assert_ran(&p, script, "link changed (link target)").ok();
    assert_cached(&p, script).ok();

    // Another command line or environment is another thunk.
    assert_ran(&p, &format!("{script}; true"), "no earlier trace").ok();
    let (run, ran) = p.explain(&["--env", "X=1"], script);
    assert!(ran, "{}", run.describe());
}

#[test]
fn touching_an_input_without_changing_it_is_a_hit() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "same");
    let script = "cat in > out";
    assert_ran(&p, script, "no earlier trace").ok();
    std::thread::sleep(std::time::Duration::from_millis(20));
    p.write("in", "same");
    assert_cached(&p, script).ok();
    // --check mtime trusts timestamps alone.
    std::thread::sleep(std::time::Duration::from_millis(20));
    p.write("in", "same");
    let (run, ran) = p.explain(&["--check", "mtime"], script);
    assert!(ran, "{}", run.describe());
}

#[test]
fn a_switch_back_to_earlier_inputs_is_a_hit() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let script = "cat config > out";
    p.write("config", "debug");
    assert_ran(&p, script, "no earlier trace").ok();
    p.write("config", "release");
    assert_ran(&p, script, "config changed").ok();
    p.write("config", "debug");
    assert_cached(&p, script).ok();
    assert_eq!(p.read("out").as_deref(), Some("debug"));
}

#[test]
fn damaged_outputs_are_restored_without_running() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "data");
    let script = "mkdir -p build; cp in build/out; ln -sf out build/link; rm -f stale";
    p.write("stale", "old");
    assert_ran(&p, script, "no earlier trace").ok();
    std::fs::remove_dir_all(p.root().join("build")).unwrap();
    p.write("stale", "came back");
    let run = assert_cached(&p, script).ok();
    assert!(run.stderr.contains("restored 4 outputs"), "{}", run.stderr);
    assert_eq!(p.read("build/out").as_deref(), Some("data"));
    assert_eq!(
        std::fs::read_link(p.root().join("build/link")).unwrap(),
        std::path::Path::new("out")
    );
    assert!(!p.exists("stale"));
    // Edited by hand: restored too, and not a hard link to the store.
    p.write("build/out", "edited");
    assert_cached(&p, script).ok();
    assert_eq!(p.read("build/out").as_deref(), Some("data"));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(p.root().join("build/out"))
            .unwrap()
            .nlink(),
        1
    );
}

#[test]
fn a_corrupt_object_is_reported_and_the_command_runs() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "precious content");
    let script = "cp in out";
    assert_ran(&p, script, "no earlier trace").ok();
    std::fs::remove_file(p.root().join("out")).unwrap();
    // Flip the object holding the output.
    let digest = blake3::hash(b"precious content").to_hex().to_string();
    let object = p
        .root()
        .join(".cot/cas/objects")
        .join(&digest[..2])
        .join(&digest[2..]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&object, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&object, "precious c0ntent").unwrap();
    let (run, ran) = p.explain(&[], script);
    assert!(ran, "{}", run.describe());
    assert!(run.stderr.contains("corrupt"), "reported: {}", run.stderr);
    assert_eq!(p.read("out").as_deref(), Some("precious content"));
}

#[test]
fn failed_runs_are_not_reused_unless_asked() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let script = "echo failing; exit 3";
    let (run, ran) = p.explain(&[], script);
    assert!(ran && run.status == 3);
    let (run, ran) = p.explain(&[], script);
    assert!(ran && run.status == 3);
    assert!(run.stderr.contains("--cache-failures"), "{}", run.stderr);
    let (run, ran) = p.explain(&["--cache-failures"], script);
    assert!(!ran, "{}", run.describe());
    assert_eq!(run.status, 3);
    assert_eq!(run.stdout, "failing\n");
}

#[test]
fn no_cache_always_runs_and_still_records() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let script = "echo hi > out";
    let (run, ran) = p.explain(&["--no-cache"], script);
    assert!(ran, "{}", run.describe());
    let (run, ran) = p.explain(&["--no-cache"], script);
    assert!(ran, "{}", run.describe());
    assert_cached(&p, script).ok();
}

#[test]
fn concurrent_runs_share_the_store() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    for round in 0..2 {
        let children: Vec<_> = (0..6)
            .map(|i| {
                let mut cmd = p.command(
                    &["--explain"],
                    &["sh", "-c", &format!("echo {i} > out{i}; cat out{i}")],
                );
                cmd.stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (i, child) in children.into_iter().enumerate() {
            let output = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{stderr}");
            assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{i}\n"));
            let expected = if round == 0 {
                "cot: ran:"
            } else {
                "cot: cached:"
            };
            assert!(stderr.contains(expected), "round {round}: {stderr}");
        }
    }
}

#[test]
fn a_moved_checkout_reuses_the_traces() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("src/in", "data");
    let script = "cat src/in > out";
    assert_ran(&p, script, "no earlier trace").ok();
    let moved = Project::new();
    std::fs::remove_dir_all(moved.root()).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-a"])
        .arg(p.root())
        .arg(moved.root())
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_file(moved.root().join("out")).unwrap();
    let run = assert_cached(&moved, script).ok();
    assert!(run.stderr.contains("restored 1 outputs"), "{}", run.stderr);
    assert_eq!(moved.read("out").as_deref(), Some("data"));
}

#[test]
fn a_symlink_made_again_with_the_same_target_is_a_hit() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("target", "data");
    std::os::unix::fs::symlink("target", p.root().join("link")).unwrap();
    let script = "cat link > out";
    assert_ran(&p, script, "no earlier trace").ok();
    // As a checkout switching branches back does.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::remove_file(p.root().join("link")).unwrap();
    std::os::unix::fs::symlink("target", p.root().join("link")).unwrap();
    assert_cached(&p, script).ok();
}

/// Pids of the store servers serving `store`.
fn servers_of(store: &std::path::Path) -> Vec<String> {
    let wanted = store.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| {
                let args: Vec<String> = cmdline
                    .split(|&b| b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.first()
                    .is_some_and(|a| a.ends_with("cot-store-server"))
                    && args.get(1) == Some(&wanted)
            })
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_store_server_with_steady_short_clients_stays_up() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "x");
    let store = p.root().join(".cot/store");
    let run = |p: &Project| {
        let mut cmd = p.command(&[], &["sh", "-c", "cat in > out"]);
        // Idle for 2 s means exit; clients come every 0.7 s (longer than the server's 0.5 s
        // wake-ups, shorter than its idle time), each gone within milliseconds.
        cmd.env("COT_STORE_IDLE_EXIT_MS", "2000");
        let output = cmd.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&p);
    let first = servers_of(&store);
    assert_eq!(first.len(), 1, "one server: {first:?}");
    for _ in 0..7 {
        std::thread::sleep(std::time::Duration::from_millis(700));
        run(&p);
    }
    assert_eq!(
        servers_of(&store),
        first,
        "the same server served every client"
    );
    // And once the clients stop, it goes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !servers_of(&store).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle server did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
