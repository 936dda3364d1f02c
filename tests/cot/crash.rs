//! SIGKILL of cot at any moment of a run and of its commit leaves the project either as it was
//! or as a complete run leaves it, and the next run always ends with a complete run's files.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{machine_shared, Project};
use crate::require_sandbox;

/// A build-like command (it reads its inputs and replaces its own outputs, so running it again
/// on its own results gives them again) whose commit has many steps: 200 new files, an
/// overwrite, a rename, and a deletion.
const SCRIPT: &str = "mkdir -p out; for i in $(seq 1 200); do echo $i > out/f$i; done; \
                      cat data > copy.tmp; mv copy.tmp copy; echo new > prev; rm -f stale";

fn set_up(p: &Project) {
    p.write("prev", "previous output");
    p.write("stale", "a stale output");
    p.write("data", &"line\n".repeat(100));
}

/// Every file, directory and symlink of the project but cot's own state, with contents.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == ".cot" {
                continue;
            }
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                all.insert(rel, "<dir>".into());
                stack.push(path);
            } else {
                all.insert(rel, std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    all
}

#[test]
fn sigkill_at_any_moment_leaves_a_complete_run_or_none() {
    require_sandbox!();
    let _machine = machine_shared();
    // The reference: the tree before, and after a complete run, and how long a run takes.
    let reference = Project::new();
    set_up(&reference);
    let before = snapshot(reference.root());
    let started = Instant::now();
    reference.run(&[], &["sh", "-c", SCRIPT]).ok();
    let full = started.elapsed();
    let after = snapshot(reference.root());
    assert_ne!(before, after);

    const TRIALS: u32 = 50;
    let mut outcomes = BTreeMap::<&str, u32>::new();
    for trial in 0..TRIALS {
        let p = Project::new();
        set_up(&p);
        // Moments spread over the whole run and commit (and a little past it), with jitter.
        let jitter = u64::from(std::process::id().wrapping_mul(trial + 1) % 7);
        let at = full.mul_f64(f64::from(trial) * 1.2 / f64::from(TRIALS))
            + Duration::from_millis(jitter);
        let mut child = p
            .command(&[], &["sh", "-c", SCRIPT])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        let _ = child.kill();
        child.wait().unwrap();

        // Any later cot settles the dead run first: as it was, or complete.
        p.run(&["--no-cache"], &["true"]).ok();
        let settled = snapshot(p.root());
        let outcome = if settled == before {
            "untouched"
        } else if settled == after {
            "complete"
        } else {
            let differing: Vec<_> = after
                .keys()
                .chain(before.keys())
                .filter(|k| settled.get(*k) != after.get(*k))
                .take(5)
                .collect();
            panic!("trial {trial} (killed after {at:?}): a partial run: {differing:?}");
        };
        *outcomes.entry(outcome).or_default() += 1;

        // And the next run of the command ends with exactly a complete run's files.
        p.run(&[], &["sh", "-c", SCRIPT]).ok();
        assert_eq!(
            snapshot(p.root()),
            after,
            "trial {trial}: rerun after {outcome}"
        );
    }
    eprintln!("sigkill trials: {outcomes:?}");
    assert_eq!(outcomes.values().sum::<u32>(), TRIALS);
}
