//! Files made on demand: `cot make -j4` of Makefiles with a missing ordering (a recipe reads a
//! file another rule makes, without saying so) always leaves what a correct serial build
//! leaves, whether the build knows the file's maker from its last build or from make's rules
//! (a first build); a cycle of such reads fails with a message naming it, never hangs; and a
//! correct Makefile builds as before.
//!
//! The reference is plain `make -j1` of the corrected Makefile on a copy of the sources in
//! another directory (gcc without `-g` embeds no directory in what it makes).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{machine_shared, shared_cot_bin, Project, Run};
use crate::require_sandbox;

/// `gen.h` is made by a slow generator and only `all` asks for it, so make -j4 starts the
/// compile of main.c, which includes it, first.
const DEFECTIVE: &str = "all: prog gen.h\n\
    prog: main.o gen.o\n\tcc -o prog main.o gen.o\n\
    main.o: main.c\n\tcc -c main.c\n\
    gen.o: gen.c\n\tcc -c gen.c\n\
    gen.h: gen.sh\n\tsleep 1; sh gen.sh > gen.h\n";

/// The same with the ordering said.
const CORRECT: &str = "all: prog gen.h\n\
    prog: main.o gen.o\n\tcc -o prog main.o gen.o\n\
    main.o: main.c gen.h\n\tcc -c main.c\n\
    gen.o: gen.c\n\tcc -c gen.c\n\
    gen.h: gen.sh\n\tsleep 1; sh gen.sh > gen.h\n";

fn gen_sh(value: u32) -> String {
    format!("echo '#define VALUE {value}'\n")
}

fn main_c(offset: u32) -> String {
    format!(
        "#include <stdio.h>\n#include \"gen.h\"\nint gen(void);\n\
         int main(void) {{ printf(\"%d\\n\", VALUE + gen() + {offset}); return 0; }}\n"
    )
}

fn gen_c(value: u32) -> String {
    format!("int gen(void) {{ return {value}; }}\n")
}

/// A finished `cot make` and its JSON report.
struct Outcome {
    run: Run,
    report: Value,
}

impl Outcome {
    fn thunks(&self) -> &[Value] {
        self.report["thunks"].as_array().map_or(&[], Vec::as_slice)
    }

    /// Commands of the thunks that ran.
    fn ran(&self) -> BTreeSet<String> {
        self.thunks()
            .iter()
            .filter(|t| t["ran"] == Value::Bool(true))
            .map(|t| t["command"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    fn describe(&self) -> String {
        let thunks: Vec<String> = self
            .thunks()
            .iter()
            .map(|t| {
                format!(
                    "  {:<8} ran={:<5} {}: {}",
                    t["state"].as_str().unwrap_or("?"),
                    t["ran"],
                    t["command"].as_str().unwrap_or("?"),
                    t["reason"].as_str().unwrap_or("?")
                )
            })
            .collect();
        format!(
            "{}\nreport thunks:\n{}",
            self.run.describe(),
            thunks.join("\n")
        )
    }
}

/// `cot make --report R ARGS` in `dir`, killed after `limit` (then `None`).
fn cot_make(dir: &Path, args: &[&str], limit: Duration) -> Option<Outcome> {
    let report = dir.with_extension("report.json");
    let _ = fs::remove_file(&report);
    let mut child = Command::new(shared_cot_bin())
        .current_dir(dir)
        .arg("make")
        .arg("--report")
        .arg(&report)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let _ = fs::remove_file(&report);
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    let text = fs::read_to_string(&report).unwrap_or_default();
    let _ = fs::remove_file(&report);
    Some(Outcome {
        run: Run::from(output),
        report: serde_json::from_str(&text).unwrap_or(Value::Null),
    })
}

const LIMIT: Duration = Duration::from_secs(300);

#[track_caller]
fn build_ok(p: &Project, what: &str) -> Outcome {
    let outcome = cot_make(p.root(), &["-j4"], LIMIT)
        .unwrap_or_else(|| panic!("{what}: cot make did not end within {LIMIT:?}"));
    assert_eq!(outcome.run.status, 0, "{what}:\n{}", outcome.describe());
    outcome
}

/// Plain `make -j1` of `makefile` on a copy of the project's `sources`; returns the files
/// `outputs` it made.
fn reference(p: &Project, makefile: &str, sources: &[&str], outputs: &[&str]) -> Vec<Vec<u8>> {
    let dir = tempfile::Builder::new()
        .prefix("reference-")
        .tempdir_in("/var/tmp/cot-tests")
        .unwrap();
    for source in sources {
        fs::copy(p.root().join(source), dir.path().join(source)).unwrap();
    }
    fs::write(dir.path().join("Makefile"), makefile).unwrap();
    let status = Command::new("make")
        .args(["-s", "-j1"])
        .current_dir(dir.path())
        .env_remove("MAKEFLAGS")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the reference build failed");
    outputs
        .iter()
        .map(|o| fs::read(dir.path().join(o)).unwrap())
        .collect()
}

#[track_caller]
fn assert_as_reference(
    p: &Project,
    makefile: &str,
    sources: &[&str],
    outputs: &[&str],
    what: &str,
) {
    let expected = reference(p, makefile, sources, outputs);
    for (output, expected) in outputs.iter().zip(expected) {
        let got = fs::read(p.root().join(output)).unwrap_or_default();
        assert!(
            got == expected,
            "{what}: {output} differs from a correct serial build's:\n{}\nexpected:\n{}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected)
        );
    }
}

/// Starts over: no outputs, no traces.
fn wipe(p: &Project, outputs: &[&str]) {
    for output in outputs {
        let _ = fs::remove_file(p.root().join(output));
    }
    fs::remove_dir_all(p.root().join(".cot")).unwrap();
    fs::create_dir(p.root().join(".cot")).unwrap();
}

#[test]
fn a_generated_header_without_its_ordering_is_made_before_the_compile_reads_it() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("Makefile", DEFECTIVE);
    let (mut generator, mut offset, mut value) = (1, 10, 100);
    let write_sources = |generator, offset, value| {
        p.write("gen.sh", &gen_sh(generator));
        p.write("main.c", &main_c(offset));
        p.write("gen.c", &gen_c(value));
    };
    write_sources(generator, offset, value);
    let sources = ["gen.sh", "main.c", "gen.c"];
    let outputs = ["gen.h", "main.o", "gen.o", "prog"];
    for round in 0..20 {
        // Every fifth round a first build (make's rules say who makes gen.h); the others edit
        // the generator (so the last build's gen.h is stale), a source, or nothing.
        let what = match round % 5 {
            0 => {
                wipe(&p, &outputs);
                "a first build"
            }
            1 | 3 => {
                generator += 1;
                "the generator edited"
            }
            2 => {
                offset += 1;
                "main.c edited"
            }
            _ => {
                value += 1;
                generator += 1;
                "gen.c and the generator edited"
            }
        };
        write_sources(generator, offset, value);
        let what = format!("round {round}, {what}");
        build_ok(&p, &what);
        assert_as_reference(&p, CORRECT, &sources, &outputs, &what);
        let says = Command::new(p.root().join("prog")).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&says.stdout),
            format!("{}\n", generator + value + offset),
            "{what}"
        );
    }
}

#[test]
fn a_first_build_makes_a_generated_header_by_its_rule() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("Makefile", DEFECTIVE);
    p.write("gen.sh", &gen_sh(1));
    p.write("main.c", &main_c(10));
    p.write("gen.c", &gen_c(100));
    let outcome = build_ok(&p, "the first build");
    // The compile's lookup of gen.h had make make it (make with that target) first.
    assert!(
        outcome.ran().iter().any(|c| c.ends_with("__make -s gen.h")),
        "{}",
        outcome.describe()
    );
    assert_eq!(
        outcome
            .ran()
            .iter()
            .filter(|c| c.contains("sh gen.sh"))
            .count(),
        1,
        "the generator runs once:\n{}",
        outcome.describe()
    );
    assert_as_reference(
        &p,
        CORRECT,
        &["gen.sh", "main.c", "gen.c"],
        &["gen.h", "main.o", "prog"],
        "the first build",
    );
}

/// A rule reads a file another rule writes as a side output (no rule makes it): from the
/// second build on, the build knows who makes it.
#[test]
fn a_side_output_read_without_its_ordering_is_the_one_this_build_makes() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let makefile = "all: a.txt b.txt\n\
        a.txt: a.in\n\tsleep 1; cp a.in a.txt; cp a.in side.txt\n\
        b.txt: b.in\n\tcat side.txt b.in > b.txt\n";
    let correct = "all: a.txt b.txt\n\
        a.txt: a.in\n\tsleep 1; cp a.in a.txt; cp a.in side.txt\n\
        b.txt: b.in a.txt\n\tcat side.txt b.in > b.txt\n";
    p.write("Makefile", makefile);
    p.write("a.in", "a0\n");
    p.write("b.in", "b0\n");
    // The first build is serial: nothing says who makes side.txt yet.
    let first = cot_make(p.root(), &["-j1"], LIMIT).expect("ends");
    assert_eq!(first.run.status, 0, "{}", first.describe());
    let sources = ["a.in", "b.in"];
    let outputs = ["a.txt", "side.txt", "b.txt"];
    for round in 1..=10 {
        // Of another size, make itself runs again (it looks at a.in), and starts both recipes
        // together; of the same size, it is replayed, both recipes decided together.
        let size = if round % 2 == 0 { round } else { 1 };
        p.write("a.in", &format!("a{round}{}\n", "x".repeat(size)));
        if round % 3 == 0 {
            p.write("b.in", &format!("b{round}\n"));
        }
        let what = format!("round {round}");
        build_ok(&p, &what);
        assert_as_reference(&p, correct, &sources, &outputs, &what);
    }
}

#[test]
fn two_rules_reading_each_others_output_fail_naming_the_cycle() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write(
        "Makefile",
        "all: a.out b.out\n\
         a.out: a.in\n\tcat b.out a.in > a.out\n\
         b.out: b.in\n\tcat a.out b.in > b.out\n",
    );
    p.write("a.in", "a\n");
    p.write("b.in", "b\n");
    for what in ["a first build", "a second build"] {
        let outcome = cot_make(p.root(), &["-j4"], LIMIT)
            .unwrap_or_else(|| panic!("{what}: cot make hangs on a cycle"));
        let said = format!("{}{}", outcome.run.stdout, outcome.run.stderr);
        assert_ne!(outcome.run.status, 0, "{what}:\n{}", outcome.describe());
        assert!(
            said.contains("a cycle of waits") && said.contains("a.out") && said.contains("b.out"),
            "{what}: no message naming the cycle:\n{}",
            outcome.describe()
        );
    }
}

/// A recipe reads the file that only the rule depending on it makes.
#[test]
fn a_recipe_reading_what_its_own_dependent_makes_fails_naming_the_cycle() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write(
        "Makefile",
        "all: final\n\
         final: out\n\tcp out final\n\
         out: in\n\tcat in final > out\n",
    );
    p.write("in", "x\n");
    let outcome = cot_make(p.root(), &["-j4"], LIMIT).expect("cot make hangs on a cycle");
    let said = format!("{}{}", outcome.run.stdout, outcome.run.stderr);
    assert_ne!(outcome.run.status, 0, "{}", outcome.describe());
    assert!(
        said.contains("a cycle of waits") && said.contains("final"),
        "no message naming the cycle:\n{}",
        outcome.describe()
    );
}

/// With its orderings said, nothing is made on demand: the same recipes run, once each.
#[test]
fn a_correct_makefile_builds_as_before() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("Makefile", CORRECT);
    p.write("gen.sh", &gen_sh(1));
    p.write("main.c", &main_c(10));
    p.write("gen.c", &gen_c(100));
    let recipes = |outcome: &Outcome| -> Vec<String> {
        let mut ran: Vec<String> = outcome
            .thunks()
            .iter()
            .filter(|t| t["ran"] == Value::Bool(true) && !t["target"].is_null())
            .map(|t| t["command"].as_str().unwrap_or("?").to_string())
            .collect();
        ran.sort();
        ran
    };
    let first = build_ok(&p, "the first build");
    assert_eq!(
        recipes(&first),
        [
            "cc -c gen.c",
            "cc -c main.c",
            "cc -o prog main.o gen.o",
            "sleep 1; sh gen.sh > gen.h"
        ],
        "{}",
        first.describe()
    );
    assert!(
        !first.ran().iter().any(|c| c.contains("__make -s ")),
        "something was made on demand:\n{}",
        first.describe()
    );
    p.write("gen.sh", &gen_sh(2));
    let second = build_ok(&p, "the generator edited");
    assert_eq!(
        recipes(&second),
        [
            "cc -c main.c",
            "cc -o prog main.o gen.o",
            "sleep 1; sh gen.sh > gen.h"
        ],
        "{}",
        second.describe()
    );
    assert_as_reference(
        &p,
        CORRECT,
        &["gen.sh", "main.c", "gen.c"],
        &["gen.h", "main.o", "prog"],
        "the generator edited",
    );
}
