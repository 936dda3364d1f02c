//! Looking into and tidying the store: `cot show`, `cot query`, `cot gc` and `cot clean`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::harness::{machine_shared, Project, Run};
use crate::require_sandbox;

#[track_caller]
fn json(run: &Run) -> Value {
    assert_eq!(run.status, 0, "{}", run.describe());
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", run.describe()))
}

/// The full ids of the recorded thunks, by their command line (`sh -c SCRIPT` -> SCRIPT).
fn thunk_ids(p: &Project) -> HashMap<String, String> {
    let list = json(&p.cot(&["show", "--json"]));
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let argv = t["argv"].as_array().unwrap();
            let script = argv.last().unwrap().as_str().unwrap().to_string();
            (script, t["thunk"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Every object file in the project's content store, with its size.
fn objects(p: &Project) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    let root = p.root().join(".cot/cas/objects");
    for fan_out in fs::read_dir(&root).into_iter().flatten().flatten() {
        for object in fs::read_dir(fan_out.path()).unwrap().flatten() {
            found.push((object.path(), object.metadata().unwrap().len()));
        }
    }
    found
}

#[test]
fn show_lists_each_thunk_with_its_command_most_recently_used_first() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let empty = p.cot(&["show"]).ok();
    assert_eq!(empty.stdout, "");
    assert!(
        empty.stderr.contains("no thunks recorded"),
        "{}",
        empty.stderr
    );

    p.write("in", "data");
    p.sh("cat in > first").ok();
    p.sh("cat in > second").ok();
    // A hit counts as a use.
    let (run, ran) = p.explain(&[], "cat in > first");
    assert!(!ran, "{}", run.describe());

    let shown = p.cot(&["show"]).ok();
    let lines: Vec<&str> = shown.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", shown.stdout);
    assert!(
        lines[0].ends_with("  sh -c cat in > first"),
        "{}",
        shown.stdout
    );
    assert!(
        lines[1].ends_with("  sh -c cat in > second"),
        "{}",
        shown.stdout
    );
    let ids = thunk_ids(&p);
    for (line, script) in lines.iter().zip(["cat in > first", "cat in > second"]) {
        assert!(line.starts_with(&ids[script][..12]), "{line} for {script}");
        assert!(line.contains(" 1 trace "), "{line}");
    }
}

#[test]
fn show_json_has_the_argv_cwd_and_trace_count() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("sub/in", "data");
    let script = "cat in > out; echo 'two words'";
    let in_sub = || {
        let output = p
            .command(&[], &["sh", "-c", script])
            .current_dir(p.root().join("sub"))
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
    };
    in_sub();
    p.write("sub/in", "other");
    in_sub();

    let list = json(&p.cot(&["show", "--json"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:#?}");
    let thunk = &list[0];
    assert_eq!(thunk["argv"], serde_json::json!(["sh", "-c", script]));
    assert_eq!(thunk["cwd"], "$PROJECT/sub");
    assert_eq!(thunk["system_root"], "/");
    assert_eq!(thunk["traces"], 2);
    let id = thunk["thunk"].as_str().unwrap();
    assert_eq!(id.len(), 64);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert!(thunk["last_used_ns"].as_i64().unwrap() > 0);
}

#[test]
fn show_prefix_prints_the_inputs_and_outputs_of_each_trace() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("src/in", "12345");
    let script = "test -e gen.h; mkdir build; cp src/in build/out; ln -s out build/link";
    p.sh(script).ok();
    let id = thunk_ids(&p)[script].clone();

    let shown = p.cot(&["show", &id[..8]]).ok();
    let text = &shown.stdout;
    assert!(text.starts_with(&format!("thunk {id}\n")), "{text}");
    assert!(
        text.contains(&format!("  command: sh -c {script}\n")),
        "{text}"
    );
    assert!(text.contains("  cwd: $PROJECT\n"), "{text}");
    assert!(text.contains("exit status 0)"), "{text}");
    let has_line = |start: &str, end: &str| {
        text.lines()
            .any(|l| l.starts_with(start) && l.trim_end().ends_with(end))
    };
    assert!(
        has_line("  in  read     $PROJECT/src/in  content ", "(5 bytes)"),
        "{text}"
    );
    assert!(
        has_line("  in  absent   $PROJECT/gen.h", "absent"),
        "{text}"
    );
    assert!(
        has_line("  out $PROJECT/build  directory mode ", ""),
        "{text}"
    );
    assert!(
        has_line("  out $PROJECT/build/out  file ", "(5 bytes)"),
        "{text}"
    );
    assert!(
        has_line("  out $PROJECT/build/link  symlink -> out", ""),
        "{text}"
    );
    // What the thunk wrote is not also one of its inputs.
    assert!(
        !text.contains("  in  read     $PROJECT/build/out"),
        "{text}"
    );

    // The same in JSON, with the full id and any case of prefix.
    let full = json(&p.cot(&["show", "--json", &id[..10].to_uppercase()]));
    assert_eq!(full["thunk"], id.as_str());
    assert_eq!(full["argv"], serde_json::json!(["sh", "-c", script]));
    let traces = full["trace_list"].as_array().unwrap();
    assert_eq!(traces.len(), 1);
    assert_eq!(traces[0]["exit_code"], 0);
    let inputs = traces[0]["inputs"].as_array().unwrap();
    assert!(
        inputs
            .iter()
            .any(|i| i["path"] == "$PROJECT/src/in" && i["kind"] == "read"),
        "{inputs:#?}"
    );
    assert!(
        inputs
            .iter()
            .any(|i| i["path"] == "$PROJECT/gen.h" && i["kind"] == "absent"),
        "{inputs:#?}"
    );
    let outputs: Vec<&str> = traces[0]["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        outputs,
        [
            "$PROJECT/build",
            "$PROJECT/build/link",
            "$PROJECT/build/out"
        ]
    );
}

#[test]
fn an_unknown_ambiguous_or_malformed_prefix_is_refused_naming_it() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    // Record thunks until two ids share their first digit (at most 17, by pigeonhole).
    let mut by_digit: HashMap<char, Vec<String>> = HashMap::new();
    let mut shared = None;
    for i in 0..17 {
        let script = format!("echo {i}");
        p.sh(&script).ok();
        let id = thunk_ids(&p)[&script].clone();
        let digit = id.chars().next().unwrap();
        let ids = by_digit.entry(digit).or_default();
        ids.push(id);
        if ids.len() == 2 {
            shared = Some(digit);
            break;
        }
    }
    let digit = shared.unwrap();

    let ambiguous = p.cot(&["show", &digit.to_string()]);
    assert_eq!(ambiguous.status, 125, "{}", ambiguous.describe());
    assert!(
        ambiguous
            .stderr
            .contains(&format!("thunk id prefix {digit} is ambiguous")),
        "{}",
        ambiguous.stderr
    );
    for id in &by_digit[&digit] {
        assert!(
            ambiguous.stderr.contains(id.as_str()),
            "{}",
            ambiguous.stderr
        );
    }
    assert_eq!(ambiguous.stdout, "");

    let unused = "0123456789abcdef"
        .chars()
        .find(|d| !by_digit.contains_key(d))
        .unwrap();
    let unknown_prefix = format!("{unused}{unused}{unused}");
    let unknown = p.cot(&["show", &unknown_prefix]);
    assert_eq!(unknown.status, 125, "{}", unknown.describe());
    assert!(
        unknown
            .stderr
            .contains(&format!("no thunk id starts with {unknown_prefix}")),
        "{}",
        unknown.stderr
    );

    let malformed = p.cot(&["show", "--json", "not-hex"]);
    assert_eq!(malformed.status, 125, "{}", malformed.describe());
    assert!(
        malformed
            .stderr
            .contains("\"not-hex\" is not a thunk id prefix"),
        "{}",
        malformed.stderr
    );
    assert_eq!(malformed.stdout, "");
}

#[test]
fn query_names_the_command_that_made_a_file_and_its_inputs() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("src/a", "a");
    p.write("src/b", "b");
    let script = "mkdir -p build; cat src/a src/b > build/out";
    p.sh(script).ok();
    let id = thunk_ids(&p)[script].clone();
    let out = p.path("build/out");

    let check = |run: Run| {
        let text = run.ok().stdout;
        assert!(
            text.starts_with(&format!("{out} was made by thunk {}\n", &id[..12])),
            "{text}"
        );
        assert!(
            text.contains(&format!("  command: sh -c {script}\n")),
            "{text}"
        );
        assert!(text.contains("  cwd: $PROJECT\n"), "{text}");
        let inputs = &text[text.find("  inputs:\n").expect(&text)..];
        assert!(inputs.contains("\n    $PROJECT/src/a\n"), "{text}");
        assert!(inputs.contains("\n    $PROJECT/src/b\n"), "{text}");
        assert!(!inputs.contains("build/out"), "{text}");
    };
    check(p.cot(&["query", "build/out"]));
    check(p.cot(&["query", &out]));
    check(p.cot_in("build", &["query", "out"]));
    check(p.cot_in("src", &["query", "../build/out"]));
    // A deleted output is still known.
    fs::remove_file(&out).unwrap();
    check(p.cot(&["query", "build/out"]));
}

#[test]
fn query_of_a_file_no_thunk_wrote_exits_1() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "data");
    p.sh("cat in > out").ok();
    for file in ["in", "never-existed"] {
        let run = p.cot(&["query", file]);
        assert_eq!(run.status, 1, "{}", run.describe());
        assert_eq!(run.stdout, "");
        assert!(
            run.stderr
                .contains(&format!("cot: no recorded thunk wrote {}", p.path(file))),
            "{}",
            run.stderr
        );
    }
    let run = p.cot(&["query", "--json", "in"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert_eq!(run.stdout, "");
}

#[test]
fn query_json_has_the_command_and_the_trace() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "data");
    let script = "cat in > out; test -e gen.h || echo made";
    p.sh(script).ok();

    let value = json(&p.cot(&["query", "--json", "out"]));
    assert_eq!(value["argv"], serde_json::json!(["sh", "-c", script]));
    assert_eq!(value["thunk"], thunk_ids(&p)[script].as_str());
    assert_eq!(value["cwd"], "$PROJECT");
    let trace = &value["trace"];
    assert_eq!(trace["exit_code"], 0);
    let inputs = trace["inputs"].as_array().unwrap();
    assert!(
        inputs
            .iter()
            .any(|i| i["path"] == "$PROJECT/in" && i["kind"] == "read"),
        "{inputs:#?}"
    );
    assert!(
        inputs
            .iter()
            .any(|i| i["path"] == "$PROJECT/gen.h" && i["kind"] == "absent"),
        "{inputs:#?}"
    );
    let outputs = trace["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{outputs:#?}");
    assert_eq!(outputs[0]["path"], "$PROJECT/out");
    assert!(
        outputs[0]["state"].as_str().unwrap().ends_with("(4 bytes)"),
        "{outputs:#?}"
    );
    // The recorded stdout is a content digest.
    assert_eq!(
        trace["stdout"],
        blake3::hash(b"made\n").to_hex().to_string().as_str()
    );
}

#[test]
fn query_names_the_last_command_to_write_a_file() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.sh("echo one > out").ok();
    p.sh("echo two > out").ok();
    let run = p.cot(&["query", "out"]).ok();
    assert!(
        run.stdout.contains("  command: sh -c echo two > out\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn query_names_the_thunk_whose_hit_restored_a_file() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.sh("echo one > out").ok();
    p.sh("echo two > out").ok();
    let (run, ran) = p.explain(&[], "echo one > out");
    assert!(!ran, "{}", run.describe());
    assert_eq!(p.read("out").as_deref(), Some("one\n"));
    let run = p.cot(&["query", "out"]).ok();
    assert!(
        run.stdout.contains("  command: sh -c echo one > out\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn gc_of_everything_frees_the_traces_and_their_content() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "some input");
    let script = "cp in out; echo said; echo warned >&2";
    let (run, ran) = p.explain(&[], script);
    assert!(ran, "{}", run.describe());
    let before = objects(&p);
    // The output, stdout and stderr.
    assert_eq!(before.len(), 3, "{before:?}");

    // Recently used thunks are kept by the default age.
    let kept = p.cot(&["gc"]).ok();
    assert!(
        kept.stdout
            .starts_with("freed 0 thunks (0 traces), 0 file states, 0 content objects (0 bytes)"),
        "{}",
        kept.stdout
    );
    assert_eq!(objects(&p), before);

    let freed = p.cot(&["gc", "--older-than", "0s"]).ok();
    let bytes: u64 = before.iter().map(|(_, size)| size).sum();
    assert!(
        freed.stdout.starts_with("freed 1 thunks (1 traces), ")
            && freed.stdout.ends_with(&format!(
                " file states, 3 content objects ({bytes} bytes)\n"
            )),
        "{}",
        freed.stdout
    );
    assert!(objects(&p).is_empty(), "{:?}", objects(&p));
    for (object, _) in &before {
        assert!(!object.exists(), "{}", object.display());
    }
    let shown = p.cot(&["show"]).ok();
    assert_eq!(shown.stdout, "");

    // Nothing is known any more: the command runs again, and its outputs are untouched.
    assert_eq!(p.read("out").as_deref(), Some("some input"));
    let (run, ran) = p.explain(&[], script);
    assert!(ran, "{}", run.describe());
    assert!(
        run.stderr.contains("cot: ran: no earlier trace"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stdout, "said\n");
    let (run, ran) = p.explain(&[], script);
    assert!(!ran, "{}", run.describe());
}

#[test]
fn gc_keeps_what_recently_used_thunks_refer_to() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "shared content");
    let old = "cp in old-copy; echo old";
    let recent = "cp in new-copy";
    p.sh(old).ok();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    p.sh(recent).ok();

    let freed = p.cot(&["gc", "--older-than", "1s"]).ok();
    assert!(
        freed.stdout.starts_with("freed 1 thunks (1 traces), "),
        "{}",
        freed.stdout
    );
    let ids = thunk_ids(&p);
    assert!(
        ids.contains_key(recent) && !ids.contains_key(old),
        "{ids:?}"
    );
    // The old thunk's stdout is gone; the content both thunks wrote stays.
    let said = blake3::hash(b"old\n").to_hex().to_string();
    let kept = blake3::hash(b"shared content").to_hex().to_string();
    let object = |digest: &str| {
        Path::new(&p.path(".cot/cas/objects"))
            .join(&digest[..2])
            .join(&digest[2..])
    };
    assert!(!object(&said).exists());
    assert!(object(&kept).exists());

    fs::remove_file(p.root().join("new-copy")).unwrap();
    let (run, ran) = p.explain(&[], recent);
    assert!(!ran, "{}", run.describe());
    assert_eq!(p.read("new-copy").as_deref(), Some("shared content"));
    let (run, ran) = p.explain(&[], old);
    assert!(ran, "{}", run.describe());
    assert_eq!(run.stdout, "old\n");
}

#[test]
fn gc_refuses_a_malformed_age() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let run = p.cot(&["gc", "--older-than", "3w"]);
    assert_eq!(run.status, 2, "{}", run.describe());
    assert!(run.stderr.contains("\"3w\""), "{}", run.stderr);
}

#[test]
fn clean_removes_outputs_and_the_directories_made_and_a_hit_restores_them() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("src/in", "input");
    p.write("stale", "old");
    let script = "mkdir -p build/sub; cp src/in build/sub/out; ln -s out build/sub/link; \
                  echo top > top; rm stale; cat src/in";
    let (run, ran) = p.explain(&[], script);
    assert!(ran, "{}", run.describe());

    let cleaned = p.cot(&["clean"]).ok();
    let removed: Vec<&str> = cleaned.stdout.lines().collect();
    let expected: Vec<String> = [
        "build",
        "build/sub",
        "build/sub/link",
        "build/sub/out",
        "top",
    ]
    .iter()
    .map(|rel| format!("removed {}", p.path(rel)))
    .collect();
    assert_eq!(removed, expected, "{}", cleaned.describe());
    assert!(
        cleaned.stderr.contains("cot: removed 5 outputs"),
        "{}",
        cleaned.stderr
    );
    for rel in ["build", "top"] {
        assert!(!p.exists(rel), "{rel}");
    }
    assert_eq!(p.read("src/in").as_deref(), Some("input"));
    assert!(p.exists(".cot"));
    assert!(!p.exists("stale"));

    // Nothing left to clean.
    let again = p.cot(&["clean"]).ok();
    assert_eq!(again.stdout, "");

    let (run, ran) = p.explain(&[], script);
    assert!(!ran, "{}", run.describe());
    assert!(run.stderr.contains("restored 5 outputs"), "{}", run.stderr);
    assert_eq!(run.stdout, "input");
    assert_eq!(p.read("build/sub/out").as_deref(), Some("input"));
    assert_eq!(p.read("top").as_deref(), Some("top\n"));
    assert_eq!(
        fs::read_link(p.root().join("build/sub/link")).unwrap(),
        Path::new("out")
    );
}

#[test]
fn clean_keeps_a_directory_that_holds_other_files() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("in", "input");
    p.sh("mkdir build; cp in build/out").ok();
    p.write("build/mine", "by hand");

    let cleaned = p.cot(&["clean"]).ok();
    assert_eq!(
        cleaned.stdout,
        format!("removed {}\n", p.path("build/out")),
        "{}",
        cleaned.describe()
    );
    assert_eq!(p.read("build/mine").as_deref(), Some("by hand"));
    assert!(!p.exists("build/out"));
    assert_eq!(p.read("in").as_deref(), Some("input"));
}

#[test]
fn gc_leaves_a_cache_shared_with_other_checkouts_alone() {
    require_sandbox!();
    let _machine = machine_shared();
    let shared = tempfile::Builder::new()
        .prefix("shared-cache-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let cache = shared.path().to_str().unwrap();
    let mine = Project::new();
    let theirs = Project::new();
    mine.write("in", "mine");
    theirs.write("in", "theirs");
    mine.run(&["--cache", cache], &["sh", "-c", "cp in out"])
        .ok();
    theirs
        .run(&["--cache", cache], &["sh", "-c", "cp in out"])
        .ok();
    let count = || walk_files(&shared.path().join("objects")).len();
    let before = count();
    assert!(before >= 2, "both projects stored their outputs");
    let run = mine
        .cot(&["gc", "--older-than", "0s", "--cache", cache])
        .ok();
    assert!(run.stderr.contains("was left alone"), "{}", run.stderr);
    assert_eq!(
        count(),
        before,
        "the other project's objects are still there"
    );
    // The other project still restores its own.
    std::fs::remove_file(theirs.root().join("out")).unwrap();
    let (run, ran) = theirs.explain(&["--cache", cache], "cp in out");
    assert!(!ran, "{}", run.describe());
    assert_eq!(theirs.read("out").as_deref(), Some("theirs"));
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            files.extend(walk_files(&entry.path()));
        } else {
            files.push(entry.path());
        }
    }
    files
}
