//! The lint (`cot make --lint`, `cot build --lint`, `cot lint`) on small real projects with one
//! known defect each: the lint must report exactly that defect, and nothing on the same
//! project fixed. Real make, real gcc, real FUSE mounts.

use serde_json::Value;

use crate::harness::{files_under, machine_shared, shared_cot_bin, Project, Run};
use crate::require_sandbox;

fn cot(project: &Project, args: &[&str]) -> Run {
    crate::harness::run_cot(&shared_cot_bin(), project.root(), args)
}

const MAIN_C: &str = "#include \"util.h\"\nint main(void) { return util(); }\n";
const UTIL_C: &str = "#include \"util.h\"\nint util(void) { return 0; }\n";
const UTIL_H: &str = "int util(void);\n";

/// One finding, as compared: kind, path, the thunk's target (or command), the other's.
type Found = (String, String, String, Option<String>);

fn findings(project: &Project) -> Vec<Found> {
    let run = cot(project, &["lint", "--format", "json"]);
    assert_eq!(run.status, 0, "cot lint failed:\n{}", run.stderr);
    let document: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "cot lint --format json printed no JSON ({e}):\n{}",
            run.stdout
        )
    });
    let name = |party: &Value| -> Option<String> {
        if party.is_null() {
            return None;
        }
        Some(
            party["target"]
                .as_str()
                .or(party["command"].as_str())
                .unwrap_or_default()
                .to_string(),
        )
    };
    document["findings"]
        .as_array()
        .expect("a findings array")
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap_or_default().to_string(),
                f["path"].as_str().unwrap_or_default().to_string(),
                name(&f["thunk"]).unwrap_or_default(),
                name(&f["other"]),
            )
        })
        .collect()
}

fn found(kind: &str, path: &str, thunk: &str, other: Option<&str>) -> Found {
    (
        kind.to_string(),
        path.to_string(),
        thunk.to_string(),
        other.map(str::to_string),
    )
}

/// A project made of `files`, built with `cot make JOBS` once, then once per entry of `edits`
/// (the edit applied before that build).
fn build(files: &[(&str, &str)], edits: &[(&str, &str)], jobs: &str) -> Project {
    let project = Project::new();
    for (path, content) in files {
        project.write(path, content);
    }
    let make = |project: &Project| {
        let run = cot(project, &["make", jobs]);
        assert_eq!(
            run.status, 0,
            "cot make failed:\n{}{}",
            run.stdout, run.stderr
        );
    };
    make(&project);
    for (path, content) in edits {
        project.write(path, content);
        make(&project);
    }
    project
}

/// Each defective Makefile, and the same fixed: (name, files, edits, expected, fixed files).
#[derive(Clone)]
struct Case {
    name: &'static str,
    files: Vec<(&'static str, &'static str)>,
    edits: Vec<(&'static str, &'static str)>,
    expected: Vec<Found>,
    fixed: Vec<(&'static str, &'static str)>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "missing header dependency",
            files: vec![
                (
                    "Makefile",
                    "prog: main.o util.o\n\tcc -o prog main.o util.o\n\
                     main.o: main.c\n\tcc -c main.c\n\
                     util.o: util.c util.h\n\tcc -c util.c\n",
                ),
                ("main.c", MAIN_C),
                ("util.c", UTIL_C),
                ("util.h", UTIL_H),
            ],
            edits: vec![],
            expected: vec![found("undeclared-input", "util.h", "main.o", None)],
            fixed: vec![(
                "Makefile",
                "prog: main.o util.o\n\tcc -o prog main.o util.o\n\
                 main.o: main.c util.h\n\tcc -c main.c\n\
                 util.o: util.c util.h\n\tcc -c util.c\n",
            )],
        },
        Case {
            name: "generated header not ordered",
            files: vec![
                (
                    "Makefile",
                    "all: version.h prog\n\
                     prog: main.o\n\tcc -o prog main.o\n\
                     main.o: main.c\n\tcc -c main.c\n\
                     version.h: version.in\n\techo \"#define VERSION $$(cat version.in)\" > version.h\n",
                ),
                (
                    "main.c",
                    "#include \"version.h\"\nint main(void) { return VERSION - VERSION; }\n",
                ),
                ("version.in", "1\n"),
            ],
            edits: vec![],
            expected: vec![found(
                "undeclared-input",
                "version.h",
                "main.o",
                Some("version.h"),
            )],
            fixed: vec![(
                "Makefile",
                "all: version.h prog\n\
                 prog: main.o\n\tcc -o prog main.o\n\
                 main.o: main.c version.h\n\tcc -c main.c\n\
                 version.h: version.in\n\techo \"#define VERSION $$(cat version.in)\" > version.h\n",
            )],
        },
        Case {
            name: "undeclared second output",
            files: vec![
                (
                    "Makefile",
                    "all: table.c\n\
                     table.c: table.in\n\tcp table.in table.c\n\techo '#define N 1' > table.h\n",
                ),
                ("table.in", "int table[1];\n"),
            ],
            edits: vec![],
            expected: vec![found("undeclared-output", "table.h", "table.c", None)],
            fixed: vec![(
                "Makefile",
                "all: table.c table.h\n\
                 table.c: table.in\n\tcp table.in table.c\n\
                 table.h: table.in\n\techo '#define N 1' > table.h\n",
            )],
        },
        Case {
            name: "two rules writing one file",
            files: vec![(
                "Makefile",
                "all: a b\n\
                 a:\n\techo a > a\n\techo a > stamp\n\
                 b:\n\techo b > b\n\techo b > stamp\n",
            )],
            edits: vec![],
            expected: vec![found("race", "stamp", "a", Some("b"))],
            fixed: vec![(
                "Makefile",
                "all: a b\n\
                 a: stamp\n\techo a > a\n\
                 b: stamp\n\techo b > b\n\
                 stamp:\n\techo s > stamp\n",
            )],
        },
        Case {
            name: "a rule reading its own stale output",
            files: vec![
                (
                    "Makefile",
                    "log: entry\n\
                     \tif [ -f log ]; then cat log entry > log.new; else cat entry > log.new; fi; \
                     mv log.new log\n",
                ),
                ("entry", "one\n"),
            ],
            // The first build finds no log; the second reads the one the first left.
            edits: vec![("entry", "two\n")],
            expected: vec![found("time-travel", "log", "log", None)],
            fixed: vec![(
                "Makefile",
                "log: entry\n\tcat entry > log.new; mv log.new log\n",
            )],
        },
        Case {
            name: "a rule overwriting a source",
            files: vec![
                (
                    "Makefile",
                    "out: in\n\tcat in > out\n\techo rewritten > in\n",
                ),
                ("in", "original\n"),
            ],
            edits: vec![],
            expected: vec![found("input-overwritten", "in", "out", Some("out"))],
            fixed: vec![("Makefile", "out: in\n\tcat in > out\n")],
        },
    ]
}

#[test]
fn each_defective_makefile_reports_exactly_its_defect_and_fixed_nothing() {
    require_sandbox!();
    let _machine = machine_shared();
    // With -j4 a missing ordering is made up for by making files on demand: the build is
    // right, and the traces still show the undeclared read.
    for (case, jobs) in cases()
        .into_iter()
        .flat_map(|case| [(case.clone(), "-j1"), (case, "-j4")])
    {
        let project = build(&case.files, &case.edits, jobs);
        assert_eq!(
            findings(&project),
            case.expected,
            "{} ({jobs}): the lint must report exactly the defect",
            case.name
        );
        let mut files = case.files.clone();
        for (path, content) in &case.fixed {
            files.retain(|(p, _)| p != path);
            files.push((path, content));
        }
        let fixed = build(&files, &case.edits, jobs);
        assert_eq!(
            findings(&fixed),
            Vec::<Found>::new(),
            "{} ({jobs}), fixed: the lint must report nothing",
            case.name
        );
    }
}

#[test]
fn lint_during_a_build_prints_findings_and_error_mode_fails_the_build() {
    require_sandbox!();
    let _machine = machine_shared();
    let case = &cases()[0];
    let project = Project::new();
    for (path, content) in &case.files {
        project.write(path, content);
    }
    let run = cot(&project, &["make", "--lint"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "cot: lint: undeclared input: main.o (`cc -c main.c`) read util.h, but main.o does \
             not depend on it"
        ),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("cot: lint: 1 finding"),
        "{}",
        run.stderr
    );
    // Nothing runs the second time; the lint reads the same traces.
    let run = cot(&project, &["make", "--lint=error"]);
    assert_eq!(
        run.status, 1,
        "--lint=error with findings exits 1:\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("read util.h"), "{}", run.stderr);
    let run = cot(&project, &["lint", "--error"]);
    assert_eq!(run.status, 1, "{}", run.stderr);
    // JSON on stdout, for tools.
    let run = cot(&project, &["make", "--lint", "--lint-format", "json"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    let document: Value = serde_json::from_str(&run.stdout).expect("JSON on stdout");
    let finding = &document["findings"][0];
    assert_eq!(finding["kind"], "undeclared-input");
    assert_eq!(finding["thunk"]["target"], "main.o");
    assert_eq!(finding["thunk"]["command"], "cc -c main.c");
    // Ignored by cot.toml.
    project.write("cot.toml", "[lint]\nignore = [\"util.h\"]\n");
    assert_eq!(findings(&project), Vec::<Found>::new());
}

#[test]
fn cotfile_children_that_nothing_orders() {
    require_sandbox!();
    let _machine = machine_shared();
    let cot_path = shared_cot_bin().to_str().unwrap().to_string();
    let script = |wait_between: bool| {
        format!(
            "#!/bin/sh\nset -e\n\
             {cot_path} run --bg -- sh -c 'echo data > gen.txt'\n\
             {wait}\
             {cot_path} run --bg -- sh -c 'cat gen.txt > copy.txt 2>/dev/null; true'\n\
             {cot_path} wait\n",
            wait = if wait_between {
                format!("{cot_path} wait\n")
            } else {
                String::new()
            }
        )
    };
    for wait_between in [false, true] {
        let project = Project::new();
        project.write("Cotfile", &script(wait_between));
        std::fs::set_permissions(
            project.root().join("Cotfile"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let run = cot(&project, &["build", "-j2"]);
        assert_eq!(run.status, 0, "{}{}", run.stdout, run.stderr);
        let expected = if wait_between {
            vec![]
        } else {
            vec![found(
                "undeclared-input",
                "gen.txt",
                "cat gen.txt > copy.txt 2>/dev/null; true",
                Some("echo data > gen.txt"),
            )]
        };
        let got: Vec<Found> = findings(&project)
            .into_iter()
            .map(|(k, p, t, o)| {
                let strip = |s: String| s.trim_start_matches("sh -c ").to_string();
                (k, p, strip(t), o.map(strip))
            })
            .collect();
        assert_eq!(got, expected, "wait between: {wait_between}");
    }
}

/// bzip2 1.0.8 (a real plain Makefile, in the project's `bzip2/`) under `cot make -j2 --lint`:
/// the same files as plain `make -j2` at the same path (gcc -g records the directory), and
/// exactly the findings
/// reviewed: its object rules list no headers (`bzlib.h`, `bzlib_private.h`), `blocksort.o`'s
/// recipe prints `words0`, and the phony `test` leaves scratch files no rule declares. Its
/// `test` reads the samples and `./bzip2` undeclared, which is not reported: a rule that makes
/// no file of its name runs every time.
#[test]
fn bzip2_under_cot_make_lint() {
    require_sandbox!();
    let _machine = machine_shared();
    let project = Project::new();
    let tree = project.root().join("bzip2");
    let fetch = || crate::harness::fetch("fetch-bzip2", &tree);
    fetch();
    let status = std::process::Command::new("make")
        .args(["-s", "-j2"])
        .current_dir(&tree)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "plain make of bzip2 failed");
    let plain = files_under(&tree, &[]);
    std::fs::remove_dir_all(&tree).unwrap();
    fetch();
    let run = crate::harness::run_cot(&shared_cot_bin(), &tree, &["make", "-j2", "--lint"]);
    assert_eq!(run.status, 0, "{}{}", run.stdout, run.stderr);
    let built = files_under(&tree, &[]);
    assert_eq!(
        built.keys().collect::<Vec<_>>(),
        plain.keys().collect::<Vec<_>>(),
        "the same files as plain make"
    );
    for (path, bytes) in &plain {
        assert!(built[path] == *bytes, "{path} differs from plain make's");
    }

    let mut expected: Vec<(String, String)> = Vec::new();
    let objects = [
        "blocksort",
        "huffman",
        "crctable",
        "randtable",
        "compress",
        "decompress",
        "bzlib",
    ];
    for object in objects {
        expected.push((
            "undeclared-input".into(),
            format!("{object}.o: bzip2/bzlib.h"),
        ));
        expected.push((
            "undeclared-input".into(),
            format!("{object}.o: bzip2/bzlib_private.h"),
        ));
    }
    expected.push(("undeclared-input".into(), "bzip2.o: bzip2/bzlib.h".into()));
    expected.push((
        "undeclared-input".into(),
        "blocksort.o: bzip2/words0".into(),
    ));
    for n in 1..=3 {
        for suffix in ["rb2", "tst"] {
            expected.push((
                "undeclared-output".into(),
                format!("test: bzip2/sample{n}.{suffix}"),
            ));
        }
    }
    expected.sort();
    let run = crate::harness::run_cot(&shared_cot_bin(), &tree, &["lint", "--format", "json"]);
    let document: Value = serde_json::from_str(&run.stdout).expect("JSON");
    let mut got: Vec<(String, String)> = document["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_string(),
                format!(
                    "{}: {}",
                    f["thunk"]["target"].as_str().unwrap_or("?"),
                    f["path"].as_str().unwrap()
                ),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, expected);
}

/// A Cotfile that reads a file before the step that writes it: after an edit, the reader sees
/// what the earlier build left, and the writer rewrites it later in the same build.
#[test]
fn cotfile_time_travel() {
    require_sandbox!();
    let _machine = machine_shared();
    let cot_path = shared_cot_bin().to_str().unwrap().to_string();
    let project = Project::new();
    project.write(
        "Cotfile",
        &format!(
            "#!/bin/sh\nset -e\n\
             {cot_path} run -- sh -c 'cat gen.txt > copy.txt 2>/dev/null; true'\n\
             {cot_path} run -- sh -c 'cat src > gen.txt'\n"
        ),
    );
    std::fs::set_permissions(
        project.root().join("Cotfile"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    project.write("src", "one\n");
    for content in ["one\n", "two\n"] {
        project.write("src", content);
        let run = cot(&project, &["build"]);
        assert_eq!(run.status, 0, "{}{}", run.stdout, run.stderr);
    }
    assert_eq!(
        findings(&project),
        vec![found(
            "time-travel",
            "gen.txt",
            "sh -c cat gen.txt > copy.txt 2>/dev/null; true",
            Some("sh -c cat src > gen.txt"),
        )]
    );
}
