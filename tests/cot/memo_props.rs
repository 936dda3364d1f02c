//! Memoization as a property: whatever happens to a project between runs (inputs edited,
//! removed, touched, listed directories changed, links retargeted, outputs damaged), `cot run`
//! of one command leaves the outputs, stdout and stderr that running the command natively
//! gives for the inputs of the moment, whether it ran or restored a recorded run.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::FileFailurePersistence;

use crate::harness::{machine_shared, Project};
use crate::require_sandbox;

/// Reads files, probes a header that may be absent, lists a directory and follows a link; every
/// output depends on what it found. It exits 0 whatever is missing.
const SCRIPT: &str = "cat a b > out1; \
                      if test -e gen.h; then echo yes > out2; else echo no > out2; fi; \
                      ls d > out3; \
                      cat link > out4; \
                      cat c; echo end";

static FILES: [&str; 3] = ["a", "b", "c"];
static ENTRIES: [&str; 3] = ["x", "y", "z"];
static TARGETS: [&str; 4] = ["a", "b", "c", "gone"];
static OUTPUTS: [&str; 4] = ["out1", "out2", "out3", "out4"];
/// What SCRIPT can observe, as names in the project.
static INPUTS: [&str; 6] = ["a", "b", "c", "gen.h", "d", "link"];

/// How many of a thunk's most recently used traces cot is sure to keep (it keeps 8).
const KEPT: usize = 4;

/// One change to the project between two runs.
#[derive(Clone, Debug)]
enum Edit {
    Write(&'static str, String),
    Delete(&'static str),
    /// Rewrites a file with the content it has.
    Touch(&'static str),
    Header(bool),
    Entry(&'static str, bool),
    Retarget(&'static str),
    /// Replaces a file with a symlink to another one (or itself).
    Alias(&'static str, &'static str),
    DeleteOutput(&'static str),
    RewriteOutput(&'static str, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    // Two letters, so that contents often come back to earlier ones.
    let content = || "[xy]{0,2}";
    prop_oneof![
        3 => (select(&FILES[..]), content()).prop_map(|(f, c)| Edit::Write(f, c)),
        1 => select(&FILES[..]).prop_map(Edit::Delete),
        1 => select(&FILES[..]).prop_map(Edit::Touch),
        1 => any::<bool>().prop_map(Edit::Header),
        1 => (select(&ENTRIES[..]), any::<bool>()).prop_map(|(e, add)| Edit::Entry(e, add)),
        1 => select(&TARGETS[..]).prop_map(Edit::Retarget),
        1 => (select(&FILES[..]), select(&FILES[..])).prop_map(|(f, t)| Edit::Alias(f, t)),
        1 => select(&OUTPUTS[..]).prop_map(Edit::DeleteOutput),
        1 => (select(&OUTPUTS[..]), content()).prop_map(|(o, c)| Edit::RewriteOutput(o, c)),
    ]
}

fn remove(path: &Path) {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => panic!("{}: {e}", path.display()),
        _ => {}
    }
}

fn apply(p: &Project, edit: &Edit) {
    let at = |rel: &str| p.root().join(rel);
    match edit {
        Edit::Write(file, content) | Edit::RewriteOutput(file, content) => {
            // Not through a symlink left by Alias, which may loop.
            remove(&at(file));
            p.write(file, content);
        }
        Edit::Delete(file) | Edit::DeleteOutput(file) => remove(&at(file)),
        Edit::Touch(file) => {
            if let Ok(content) = fs::read(at(file)) {
                fs::write(at(file), content).unwrap();
            }
        }
        Edit::Header(true) => p.write("gen.h", ""),
        Edit::Header(false) => remove(&at("gen.h")),
        Edit::Entry(name, true) => p.write(&format!("d/{name}"), ""),
        Edit::Entry(name, false) => remove(&at(&format!("d/{name}"))),
        Edit::Retarget(target) => {
            remove(&at("link"));
            std::os::unix::fs::symlink(target, at("link")).unwrap();
        }
        Edit::Alias(file, target) => {
            remove(&at(file));
            std::os::unix::fs::symlink(target, at(file)).unwrap();
        }
    }
}

/// One of the files SCRIPT reads, as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Missing,
    File(Vec<u8>),
    Link(PathBuf),
}

fn node(path: &Path) -> Node {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Node::Missing,
        Err(e) => panic!("{}: {e}", path.display()),
        Ok(meta) if meta.file_type().is_symlink() => Node::Link(fs::read_link(path).unwrap()),
        Ok(_) => Node::File(fs::read(path).unwrap()),
    }
}

/// Everything SCRIPT can observe, to tell whether the inputs changed between two runs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Inputs {
    files: Vec<Node>,
    header: bool,
    entries: Vec<String>,
    link: PathBuf,
}

fn inputs(p: &Project) -> Inputs {
    let mut entries: Vec<String> = fs::read_dir(p.root().join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    Inputs {
        files: FILES.iter().map(|f| node(&p.root().join(f))).collect(),
        header: p.exists("gen.h"),
        entries,
        link: fs::read_link(p.root().join("link")).unwrap(),
    }
}

/// What SCRIPT gives run natively, outside any sandbox, in a copy of the project's inputs.
struct Native {
    outputs: Vec<Option<String>>,
    stdout: String,
    stderr: String,
}

fn native(p: &Project) -> Native {
    let copy = tempfile::tempdir().unwrap();
    let present: Vec<PathBuf> = INPUTS
        .iter()
        .filter(|name| p.exists(name))
        .map(|name| p.root().join(name))
        .collect();
    let status = Command::new("cp")
        .arg("-a")
        .args(&present)
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let output = Command::new("sh")
        .args(["-c", SCRIPT])
        .current_dir(copy.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    Native {
        outputs: OUTPUTS
            .iter()
            .map(|o| fs::read_to_string(copy.path().join(o)).ok())
            .collect(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// The command's own stderr, without cot's explanation.
fn command_stderr(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("cot: "))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn outputs_always_match_a_native_run_of_the_current_inputs() {
    require_sandbox!();
    let _machine = machine_shared();
    let config = ProptestConfig {
        cases: 24,
        max_shrink_iters: 200,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    };
    proptest!(config, |(steps in vec(vec(edit(), 0..3), 1..12))| {
        let p = Project::new();
        p.write("a", "x");
        p.write("b", "y");
        p.write("c", "xy");
        p.write("d/x", "");
        std::os::unix::fs::symlink("a", p.root().join("link")).unwrap();
        // The inputs of the runs cot keeps a trace of, most recently used first.
        let mut recent: Vec<Inputs> = Vec::new();
        let mut seen: Vec<Inputs> = Vec::new();
        for (step, edits) in steps.iter().enumerate() {
            for edit in edits {
                apply(&p, edit);
            }
            let now = inputs(&p);
            let expected = native(&p);
            let (run, ran) = p.explain(&[], SCRIPT);
            let context = format!("step {step} after {edits:?}:\n{}", run.stderr);
            prop_assert_eq!(run.status, 0, "{}", context);
            for (output, want) in OUTPUTS.iter().zip(&expected.outputs) {
                prop_assert_eq!(&p.read(output), want, "{} {}", output, context);
            }
            prop_assert_eq!(&run.stdout, &expected.stdout, "stdout {}", context);
            prop_assert_eq!(
                command_stderr(&run.stderr),
                expected.stderr.clone(),
                "stderr {}",
                context
            );
            if recent.iter().take(KEPT).any(|r| *r == now) {
                prop_assert!(!ran, "inputs of a kept trace ran again: {}", context);
            }
            if !seen.contains(&now) {
                prop_assert!(ran, "new inputs were a hit: {}", context);
                seen.push(now.clone());
            }
            recent.retain(|r| *r != now);
            recent.insert(0, now);
            recent.truncate(KEPT);
        }
    });
}
