//! The rebuild logic against a fake world: files are strings in a map, thunks are tiny scripts
//! stored as files (so that editing a script changes what its thunk does), the content store
//! is a map of digests. Each case says: the steps, the edits between builds, and which thunks
//! run (and why) — the design notes' examples included.
//!
//! A script is one step a line: `read P`, `write P = A + B + 3` (the sum of the numbers in
//! files A, B and the constant; reading A and B), `run NAME` (request a child and wait for
//! it), `bg NAME` (request without waiting), `wait` (wait for the background children),
//! `rule P NAME` (make's rule: P is made on demand by the thunk NAME). A read of a path the
//! build produces waits first, as a lookup in the sandbox does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;

use super::engine::{
    command_of, split_internal, Build, CallLog, ChildOutcome, Executed, Known, Mode, Options,
    Requests, Resolved, State, World,
};
use crate::store::model::{
    BuildRecord, Digest, FileKind, Input, InputKind, Observed, Output, OutputState, StatTuple,
    StorePath, ThunkId, ThunkKey, Trace, TraceId,
};
use crate::store::{thunk_id, trace_id};

fn path(p: &str) -> StorePath {
    StorePath::Project(p.as_bytes().to_vec())
}

fn digest(content: &str) -> Digest {
    *blake3::hash(content.as_bytes()).as_bytes()
}

/// The script of thunk NAME lives in this file.
fn script_path(name: &str) -> String {
    format!("scripts/{name}")
}

fn key(name: &str) -> ThunkKey {
    ThunkKey::of_command(&[name])
}

#[derive(Default)]
struct Fake {
    files: Mutex<BTreeMap<String, String>>,
    /// Content store.
    cas: Mutex<HashMap<Digest, String>>,
    thunks: Mutex<HashMap<ThunkId, Known>>,
    records: Mutex<HashMap<ThunkId, BuildRecord>>,
    /// Names of the thunks executed, in order.
    ran: Mutex<Vec<String>>,
    /// A file-change counter standing in for the stat tuple.
    versions: Mutex<HashMap<String, u64>>,
    clock: Mutex<u64>,
    /// A cache beyond the store (a shared directory, a remote): thunks and contents.
    cache: Mutex<HashMap<ThunkId, Known>>,
    cache_cas: Mutex<HashMap<Digest, String>>,
    /// The cache's contents cannot be had (adoption fails).
    cache_broken: Mutex<bool>,
}

impl Fake {
    fn get(&self, p: &str) -> Option<String> {
        self.files.lock().get(p).cloned()
    }

    fn set(&self, p: &str, content: &str) {
        self.files.lock().insert(p.into(), content.into());
        let mut clock = self.clock.lock();
        *clock += 1;
        self.versions.lock().insert(p.into(), *clock);
    }

    fn delete(&self, p: &str) {
        self.files.lock().remove(p);
        let mut clock = self.clock.lock();
        *clock += 1;
        self.versions.lock().insert(p.into(), *clock);
    }

    fn name(p: &StorePath) -> String {
        super::engine::display_path(p)
    }

    fn value(&self, p: &str) -> i64 {
        self.get(p).and_then(|c| c.trim().parse().ok()).unwrap_or(0)
    }

    fn observe(&self, p: &str) -> Observed {
        match self.get(p) {
            None => Observed::Absent,
            Some(content) => Observed::Content {
                digest: digest(&content),
                stat: StatTuple {
                    dev: 0,
                    ino: 0,
                    size: content.len() as u64,
                    mtime_ns: 0,
                    ctime_ns: 0,
                    mode: 0o100644,
                },
            },
        }
    }

    fn output_state(&self, p: &str) -> OutputState {
        match self.get(p) {
            None => OutputState::Deleted,
            Some(content) => {
                let d = digest(&content);
                self.cas.lock().insert(d, content.clone());
                OutputState::File {
                    digest: d,
                    mode: 0o644,
                    size: content.len() as u64,
                }
            }
        }
    }
}

impl World for Arc<Fake> {
    fn thunk(&self, id: &ThunkId) -> anyhow::Result<Option<Known>> {
        Ok(self.thunks.lock().get(id).cloned())
    }

    fn check(&self, input: &Input, _trace: &Trace) -> Option<String> {
        let p = Fake::name(&input.path);
        let now = self.observe(&p);
        let same = match (&input.observed, &now) {
            (Observed::Content { digest: a, .. }, Observed::Content { digest: b, .. }) => a == b,
            (a, b) => a == b,
        };
        (!same).then(|| format!("{p} changed"))
    }

    fn holds(&self, p: &StorePath, state: &OutputState) -> bool {
        self.output_state(&Fake::name(p)) == *state
    }

    fn restore(&self, p: &StorePath, state: &OutputState) -> anyhow::Result<()> {
        let name = Fake::name(p);
        match state {
            OutputState::File { digest, .. } => {
                let content = self.cas.lock().get(digest).cloned().expect("in the cas");
                self.set(&name, &content);
            }
            OutputState::Deleted => self.delete(&name),
            other => anyhow::bail!("fake cannot restore {other:?}"),
        }
        Ok(())
    }

    fn remove(&self, p: &StorePath) -> anyhow::Result<()> {
        self.delete(&Fake::name(p));
        Ok(())
    }

    fn execute(
        &self,
        id: &ThunkId,
        key: &ThunkKey,
        requests: &dyn Requests,
    ) -> anyhow::Result<Executed> {
        let name = command_of(key);
        self.ran.lock().push(name.clone());
        let calls = CallLog::default();
        let mut inputs: Vec<Input> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut written: Vec<String> = Vec::new();
        let mut stdout = String::new();
        let read =
            |p: &str, inputs: &mut Vec<Input>, seen: &mut HashSet<String>, written: &[String]| {
                if !written.iter().any(|w| w == p) && seen.insert(p.to_string()) {
                    inputs.push(Input {
                        path: path(p),
                        kind: InputKind::Read,
                        observed: self.observe(p),
                    });
                }
            };
        let script_file = script_path(&name);
        read(&script_file, &mut inputs, &mut seen, &written);
        let script = self.get(&script_file).unwrap_or_default();
        let mut exit_code = 0;
        // The first lookup of a path another thunk produces waits for it (as the worker's
        // lookup gate does); refused, the read fails and so does the thunk.
        let wanted: HashSet<StorePath> = requests.wanted().into_iter().collect();
        let mut asked: HashSet<String> = HashSet::new();
        let mut refused = None;
        let mut lookup = |p: &str| {
            let store = path(p);
            if wanted.contains(&store) && asked.insert(p.to_string()) {
                if let Err(message) = requests.want(&store) {
                    refused = Some(message);
                    return false;
                }
            }
            true
        };
        std::thread::scope(|scope| {
            let mut background = Vec::new();
            for line in script.lines() {
                let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
                let words: Vec<&str> = match verb {
                    "run" | "bg" | "gated" => vec![verb, rest],
                    _ => line.split_whitespace().collect(),
                };
                match words.as_slice() {
                    ["read", p] => {
                        if !lookup(p) {
                            exit_code = 1;
                            break;
                        }
                        read(p, &mut inputs, &mut seen, &written)
                    }
                    ["write", p, "=", rest @ ..] => {
                        let mut sum = 0;
                        let mut failed = false;
                        for term in rest.iter().filter(|t| **t != "+") {
                            match term.parse::<i64>() {
                                Ok(n) => sum += n,
                                Err(_) => {
                                    if !written.iter().any(|w| w == term) && !lookup(term) {
                                        failed = true;
                                        break;
                                    }
                                    read(term, &mut inputs, &mut seen, &written);
                                    sum += self.value(term);
                                }
                            }
                        }
                        if failed {
                            exit_code = 1;
                            break;
                        }
                        self.set(p, &sum.to_string());
                        written.push(p.to_string());
                    }
                    ["rule", p, thunk] => requests.rules(vec![(path(p), key_for(thunk))]),
                    ["echo", text] => stdout.push_str(text),
                    ["fail"] => exit_code = 1,
                    ["run", child] => {
                        let index = calls.start(false, None);
                        let outcome = requests.request(key_for(child), false);
                        calls.end(index, &outcome);
                        if outcome.exit_code != 0 {
                            exit_code = outcome.exit_code;
                            break;
                        }
                    }
                    ["gated", child] => {
                        let index = calls.start(true, None);
                        let outcome = requests.request(key_for(child), true);
                        calls.end(index, &outcome);
                    }
                    ["bg", child] => {
                        let index = calls.start(false, None);
                        let child = child.to_string();
                        background.push((
                            index,
                            scope.spawn(move || requests.request(key_for(&child), false)),
                        ));
                    }
                    ["wait"] => {
                        for (index, handle) in background.drain(..) {
                            let outcome: ChildOutcome = handle.join().expect("no panic");
                            calls.end(index, &outcome);
                        }
                    }
                    _ => panic!("bad script line {line:?} in {name}"),
                }
            }
            for (index, handle) in background.drain(..) {
                let outcome = handle.join().expect("no panic");
                calls.end(index, &outcome);
            }
        });
        if refused.is_some() {
            exit_code = 1;
        }
        let (children, events, child_writes) = calls.finish();
        let (inputs, internal) = split_internal(inputs, &child_writes);
        // A failed thunk's writes are discarded, as the sandbox does.
        let outputs: Vec<Output> = if exit_code == 0 {
            let mut outs: Vec<String> = written.clone();
            outs.sort();
            outs.dedup();
            outs.iter()
                .map(|p| Output {
                    path: path(p),
                    state: self.output_state(p),
                })
                .collect()
        } else {
            Vec::new()
        };
        let trace = Trace {
            inputs,
            outputs,
            stdout: digest(&stdout),
            stderr: digest(""),
            exit_code,
            duration_ns: 1,
            ran_at_ns: 1,
            children,
            events,
            internal,
        };
        let trace_id = trace_id(&trace);
        let mut thunks = self.thunks.lock();
        let entry = thunks
            .entry(*id)
            .or_insert_with(|| (key.clone(), Vec::new()));
        entry.1.retain(|(t, _)| *t != trace_id);
        entry.1.insert(0, (trace_id, trace.clone()));
        Ok(Executed {
            trace_id,
            trace,
            message: None,
            interrupted: false,
        })
    }

    fn touch(&self, key: &ThunkKey, trace: &Trace) -> anyhow::Result<TraceId> {
        let mut trace = trace.clone();
        for input in &mut trace.inputs {
            input.observed = self.observe(&Fake::name(&input.path));
        }
        let id = thunk_id(key);
        let trace_id = trace_id(&trace);
        let mut thunks = self.thunks.lock();
        let entry = thunks
            .entry(id)
            .or_insert_with(|| (key.clone(), Vec::new()));
        entry.1.insert(0, (trace_id, trace));
        Ok(trace_id)
    }

    fn adopt(&self, key: &ThunkKey, trace: &Trace) -> anyhow::Result<TraceId> {
        let id = thunk_id(key);
        let trace_id = trace_id(trace);
        let mut thunks = self.thunks.lock();
        let entry = thunks
            .entry(id)
            .or_insert_with(|| (key.clone(), Vec::new()));
        entry.1.insert(0, (trace_id, trace.clone()));
        Ok(trace_id)
    }

    fn snapshot(&self, paths: &[StorePath]) -> Vec<(StorePath, Option<StatTuple>)> {
        let versions = self.versions.lock();
        paths
            .iter()
            .map(|p| {
                let name = Fake::name(p);
                let stat = self.get(&name).map(|_| StatTuple {
                    dev: 0,
                    ino: versions.get(&name).copied().unwrap_or(0),
                    size: 0,
                    mtime_ns: 0,
                    ctime_ns: 0,
                    mode: 0,
                });
                (p.clone(), stat)
            })
            .collect()
    }

    fn record(&self, root: &ThunkId) -> anyhow::Result<Option<BuildRecord>> {
        Ok(self.records.lock().get(root).cloned())
    }

    fn put_record(&self, root: &ThunkId, record: BuildRecord) -> anyhow::Result<()> {
        self.records.lock().insert(*root, record);
        Ok(())
    }

    fn resolved(&self, _thunk: &Resolved) {}

    fn started(&self, _key: &ThunkKey) {}

    fn cache_tiers(&self) -> usize {
        usize::from(!self.cache.lock().is_empty())
    }

    fn cached(&self, id: &ThunkId, tier: usize) -> Option<Known> {
        assert_eq!(tier, 0);
        self.cache.lock().get(id).cloned()
    }

    fn cache_name(&self, _tier: usize) -> String {
        "the fake cache".into()
    }

    fn adopt_cached(
        &self,
        id: &ThunkId,
        key: &ThunkKey,
        _tier: usize,
        trace: &Trace,
    ) -> anyhow::Result<TraceId> {
        if *self.cache_broken.lock() {
            anyhow::bail!("the contents cannot be had");
        }
        for output in &trace.outputs {
            if let OutputState::File { digest, .. } = &output.state {
                let content = self.cache_cas.lock().get(digest).cloned();
                self.cas
                    .lock()
                    .insert(*digest, content.expect("the cache has it"));
            }
        }
        let trace_id = trace_id(trace);
        let mut thunks = self.thunks.lock();
        let entry = thunks
            .entry(*id)
            .or_insert_with(|| (key.clone(), Vec::new()));
        entry.1.insert(0, (trace_id, trace.clone()));
        Ok(trace_id)
    }
}

impl Fake {
    /// A second checkout of `first`'s project: the same sources and scripts, nothing built,
    /// an empty store, and `first`'s traces and contents in its cache.
    fn second_checkout(first: &Arc<Fake>, sources: &[&str]) -> Arc<Fake> {
        let second = Arc::new(Fake::default());
        for (p, content) in first.files.lock().iter() {
            if p.starts_with("scripts/") || sources.contains(&p.as_str()) {
                second.set(p, content);
            }
        }
        *second.cache.lock() = first.thunks.lock().clone();
        *second.cache_cas.lock() = first.cas.lock().clone();
        second
    }
}

fn key_for(name: &str) -> ThunkKey {
    key(name)
}

/// A project: scripts and source files.
fn project(scripts: &[(&str, &str)], files: &[(&str, &str)]) -> Arc<Fake> {
    let fake = Arc::new(Fake::default());
    for (name, script) in scripts {
        fake.set(&script_path(name), script);
    }
    for (p, content) in files {
        fake.set(p, content);
    }
    let _ = FileKind::File;
    fake
}

struct Report {
    ran: Vec<String>,
    states: BTreeMap<String, State>,
    reasons: BTreeMap<String, String>,
    /// What cot said of each failed thunk, by command (several for a command run twice).
    messages: BTreeMap<String, Vec<String>>,
    damaged: Vec<String>,
    restored: Vec<String>,
    removed: Vec<String>,
    exit_code: i32,
    unchanged: bool,
}

fn build_with(fake: &Arc<Fake>, root: &str, options: Options) -> Report {
    build_preloading(fake, root, options, usize::MAX)
}

/// [`build_with`], the traces loaded with the last build's products holding at most
/// `preload` inputs.
fn build_preloading(fake: &Arc<Fake>, root: &str, options: Options, preload: usize) -> Report {
    fake.ran.lock().clear();
    let build = Build::new(fake.clone(), options).preload_inputs(preload);
    let outcome = build.run(key(root)).expect("the build runs");
    let mut states = BTreeMap::new();
    let mut reasons = BTreeMap::new();
    let mut messages = BTreeMap::new();
    for thunk in &outcome.thunks {
        states.insert(command_of(&thunk.key), thunk.state);
        reasons.insert(command_of(&thunk.key), thunk.reason.clone());
        if let Some(message) = &thunk.message {
            messages
                .entry(command_of(&thunk.key))
                .or_insert_with(Vec::new)
                .push(message.clone());
        }
    }
    let names = |paths: &[StorePath]| -> Vec<String> {
        let mut v: Vec<String> = paths.iter().map(Fake::name).collect();
        v.sort();
        v
    };
    Report {
        ran: fake.ran.lock().clone(),
        states,
        reasons,
        messages,
        damaged: names(&outcome.damaged),
        restored: names(&outcome.restored),
        removed: names(&outcome.removed),
        exit_code: outcome.exit_code,
        unchanged: outcome.unchanged,
    }
}

fn build(fake: &Arc<Fake>, root: &str) -> Report {
    build_with(
        fake,
        root,
        Options {
            jobs: 2,
            ..Options::default()
        },
    )
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

fn set_of(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// The files a clean build of the same sources leaves.
fn clean_build_files(
    scripts: &[(&str, &str)],
    fake: &Arc<Fake>,
    root: &str,
    sources: &[&str],
) -> BTreeMap<String, String> {
    let files: Vec<(String, String)> = sources
        .iter()
        .filter_map(|s| fake.get(s).map(|c| (s.to_string(), c)))
        .collect();
    let files_ref: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let clean = project(scripts, &files_ref);
    build(&clean, root);
    let all = clean.files.lock().clone();
    all
}

// The yacc/cc/ld build of the design notes ("Model"). Under structural naming, a step
// requested by two parents is two thunks, so the shared `yacc` step is requested once, by the
// root, before the two compiles (`Sequence [[yacc], [cc main, cc parse], [ld]]`).
const YACC: &[(&str, &str)] = &[
    (
        "run prog",
        "run yacc\nbg cc main\nbg cc parse\nwait\nrun ld",
    ),
    (
        "yacc",
        "write parse.h = parse.y + 1\nwrite parse.c = parse.y + 2",
    ),
    ("cc main", "write main.o = main.c + parse.h"),
    ("cc parse", "write parse.o = parse.c + parse.h"),
    ("ld", "write prog = parse.o + main.o"),
];
const YACC_SOURCES: &[(&str, &str)] = &[("parse.y", "1"), ("main.c", "1")];

fn yacc() -> Arc<Fake> {
    let fake = project(YACC, YACC_SOURCES);
    let first = build(&fake, "run prog");
    assert_eq!(first.exit_code, 0);
    assert_eq!(
        sorted(&first.ran),
        set_of(&["run prog", "yacc", "cc main", "cc parse", "ld"])
    );
    assert!(
        first.states.values().all(|s| *s == State::New),
        "{:?}",
        first.states
    );
    fake
}

fn yacc_outputs_are_clean(fake: &Arc<Fake>) {
    let clean = clean_build_files(YACC, fake, "run prog", &["parse.y", "main.c"]);
    for (p, content) in &clean {
        assert_eq!(
            fake.get(p).as_ref(),
            Some(content),
            "{p} differs from a clean build's"
        );
    }
}

#[test]
fn a_second_checkout_takes_every_thunk_from_the_cache_and_leaves_a_clean_builds_files() {
    let first = yacc();
    let second = Fake::second_checkout(&first, &["parse.y", "main.c"]);
    let report = build(&second, "run prog");
    assert_eq!(report.exit_code, 0);
    assert!(report.ran.is_empty(), "{:?}", report.ran);
    for (command, reason) in &report.reasons {
        assert!(
            reason.contains("from the fake cache"),
            "{command}: {reason}"
        );
    }
    // Intermediates too: a result from a cache arrives as if it ran here.
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    yacc_outputs_are_clean(&second);
    // Now its own: the next build decides from the record, the cache unasked.
    let again = build(&second, "run prog");
    assert!(again.unchanged && again.ran.is_empty());
}

#[test]
fn a_second_checkout_with_an_edit_runs_what_it_changes_and_takes_the_rest() {
    let first = yacc();
    let second = Fake::second_checkout(&first, &["parse.y", "main.c"]);
    second.set("main.c", "7");
    let report = build(&second, "run prog");
    assert_eq!(
        sorted(&report.ran),
        set_of(&["cc main", "ld"]),
        "{:?}",
        report.reasons
    );
    // The root is replayed from the cache, its children decided there one by one.
    assert!(report.reasons["run prog"].contains("from the fake cache"));
    assert!(report.reasons["yacc"].contains("from the fake cache"));
    assert!(
        report.reasons["cc main"].contains("the fake cache's trace: main.c changed"),
        "{}",
        report.reasons["cc main"]
    );
    yacc_outputs_are_clean(&second);
}

#[test]
fn a_cache_whose_contents_cannot_be_had_costs_runs_not_results() {
    let first = yacc();
    let second = Fake::second_checkout(&first, &["parse.y", "main.c"]);
    *second.cache_broken.lock() = true;
    let report = build(&second, "run prog");
    assert_eq!(report.exit_code, 0);
    assert_eq!(
        sorted(&report.ran),
        set_of(&["run prog", "yacc", "cc main", "cc parse", "ld"])
    );
    yacc_outputs_are_clean(&second);
}

#[test]
fn yacc_no_change_runs_nothing_and_loads_no_trace() {
    let fake = yacc();
    let report = build(&fake, "run prog");
    assert!(report.ran.is_empty(), "{:?}", report.ran);
    assert!(report.unchanged, "decided from the build record alone");
}

#[test]
fn yacc_editing_main_c_reruns_cc_main_and_ld_only() {
    let fake = yacc();
    fake.set("main.c", "5");
    let report = build(&fake, "run prog");
    assert_eq!(report.ran, set_of(&["cc main", "ld"]));
    assert_eq!(report.states["cc main"], State::Dirty);
    assert_eq!(report.reasons["cc main"], "main.c changed");
    assert_eq!(
        report.reasons["ld"],
        "main.o changed (rebuilt in this build)"
    );
    assert_eq!(report.states["yacc"], State::Clean);
    assert_eq!(report.states["cc parse"], State::Clean);
    assert_eq!(report.states["run prog"], State::Clean);
    yacc_outputs_are_clean(&fake);
}

#[test]
fn yacc_an_edit_that_leaves_main_o_as_it_was_stops_at_cc_main() {
    let fake = yacc();
    fake.set("main.c", "01");
    let report = build(&fake, "run prog");
    assert_eq!(report.ran, set_of(&["cc main"]));
    assert_eq!(report.states["ld"], State::Clean);
}

#[test]
fn yacc_editing_the_grammar_reruns_everything_below_it() {
    let fake = yacc();
    fake.set("parse.y", "7");
    let report = build(&fake, "run prog");
    assert_eq!(
        sorted(&report.ran),
        set_of(&["yacc", "cc main", "cc parse", "ld"])
    );
    yacc_outputs_are_clean(&fake);
}

#[test]
fn yacc_a_deleted_product_is_restored_and_nothing_runs() {
    let fake = yacc();
    let prog = fake.get("prog");
    fake.delete("prog");
    let report = build(&fake, "run prog");
    assert!(report.ran.is_empty(), "{:?}", report.ran);
    assert_eq!(report.restored, set_of(&["prog"]));
    assert_eq!(fake.get("prog"), prog);
}

#[test]
fn yacc_a_deleted_intermediate_is_left_alone_until_a_thunk_that_runs_needs_it() {
    let fake = yacc();
    fake.delete("main.o");
    let report = build(&fake, "run prog");
    assert!(report.ran.is_empty(), "{:?}", report.ran);
    assert_eq!(report.damaged, set_of(&["main.o"]));
    assert_eq!(report.states["cc main"], State::Damaged);
    assert_eq!(fake.get("main.o"), None);
    // The next build still knows (from its record alone).
    let report = build(&fake, "run prog");
    assert!(report.ran.is_empty());
    assert_eq!(report.damaged, set_of(&["main.o"]));

    // ld runs (parse.o changed) and needs main.o: restored first, not rebuilt.
    fake.set("parse.y", "2");
    let report = build(&fake, "run prog");
    assert_eq!(
        sorted(&report.ran),
        set_of(&["yacc", "cc main", "cc parse", "ld"])
    );
    yacc_outputs_are_clean(&fake);

    let fake = yacc();
    fake.delete("main.o");
    build(&fake, "run prog");
    // Only ld runs (its own step changed); main.o comes back from the content store first.
    let ld = "write prog = parse.o + main.o + 1";
    fake.set(&script_path("ld"), ld);
    let report = build(&fake, "run prog");
    assert_eq!(report.ran, set_of(&["ld"]));
    assert_eq!(report.restored, set_of(&["main.o"]));
    assert_eq!(
        fake.value("prog"),
        fake.value("parse.o") + fake.value("main.o") + 1
    );
}

#[test]
fn yacc_wanted_outputs_are_restored() {
    let fake = yacc();
    fake.delete("main.o");
    let report = build_with(
        &fake,
        "run prog",
        Options {
            want: vec![path("main.o")],
            ..Options::default()
        },
    );
    assert!(report.ran.is_empty());
    assert_eq!(report.restored, set_of(&["main.o"]));
}

#[test]
fn yacc_a_removed_step_is_stale_and_its_outputs_are_deleted() {
    let fake = yacc();
    fake.set(
        &script_path("run prog"),
        "run yacc\nbg cc main\nbg cc parse\nwait",
    );
    let report = build(&fake, "run prog");
    assert_eq!(report.ran, set_of(&["run prog"]));
    assert_eq!(report.states["ld"], State::Stale);
    assert_eq!(report.removed, set_of(&["prog"]));
    assert_eq!(fake.get("prog"), None);
    assert_eq!(report.states["cc main"], State::Clean);
    // Kept with --keep-stale.
    let fake = yacc();
    fake.set(&script_path("run prog"), "run yacc");
    let report = build_with(
        &fake,
        "run prog",
        Options {
            keep_stale: true,
            ..Options::default()
        },
    );
    assert!(report.removed.is_empty());
    assert!(fake.get("prog").is_some());
}

#[test]
fn an_inserted_step_does_not_rename_the_steps_after_it() {
    let fake = yacc();
    fake.set(
        &script_path("run prog"),
        "run yacc\nbg cc main\nbg cc parse\nwait\nrun lint\nrun ld",
    );
    fake.set(&script_path("lint"), "read main.c");
    let report = build(&fake, "run prog");
    assert_eq!(sorted(&report.ran), set_of(&["run prog", "lint"]));
    assert_eq!(report.states["lint"], State::New);
    assert_eq!(report.states["ld"], State::Clean);
}

#[test]
fn dry_run_says_what_would_run_and_runs_nothing() {
    let fake = yacc();
    fake.set("main.c", "5");
    let before = fake.files.lock().clone();
    let report = build_with(
        &fake,
        "run prog",
        Options {
            mode: Mode::DryRun,
            ..Options::default()
        },
    );
    assert!(report.ran.is_empty());
    assert_eq!(report.states["cc main"], State::Dirty);
    assert_eq!(report.reasons["cc main"], "would run: main.c changed");
    assert!(
        report.reasons["ld"].starts_with("would run: main.o would be rebuilt"),
        "{}",
        report.reasons["ld"]
    );
    assert_eq!(report.states["cc parse"], State::Clean);
    assert_eq!(*fake.files.lock(), before);
    // And the real build afterwards does exactly that.
    assert_eq!(build(&fake, "run prog").ran, set_of(&["cc main", "ld"]));
}

#[test]
fn touch_accepts_the_current_inputs() {
    let fake = yacc();
    fake.set("main.c", "5");
    let report = build_with(
        &fake,
        "run prog",
        Options {
            mode: Mode::Touch,
            ..Options::default()
        },
    );
    assert!(report.ran.is_empty());
    assert_eq!(report.states["cc main"], State::Skipped);
    assert!(build(&fake, "run prog").ran.is_empty());
}

#[test]
fn rebuild_and_skip_globs() {
    let fake = yacc();
    let report = build_with(
        &fake,
        "run prog",
        Options {
            rebuild: Some(super::globs(&["cc *".to_string()]).unwrap()),
            ..Options::default()
        },
    );
    assert_eq!(sorted(&report.ran), set_of(&["cc main", "cc parse"]));
    fake.set("main.c", "6");
    let report = build_with(
        &fake,
        "run prog",
        Options {
            skip: Some(super::globs(&["ld".to_string()]).unwrap()),
            ..Options::default()
        },
    );
    assert_eq!(report.ran, set_of(&["cc main"]));
    assert_eq!(report.states["ld"], State::Skipped);
}

#[test]
fn a_failing_step_fails_the_build_and_runs_again_next_time() {
    let fake = yacc();
    fake.set(&script_path("ld"), "fail");
    let report = build(&fake, "run prog");
    // ld fails; the root, replayed, now has a child that ends differently, so it runs again:
    // it reuses the failure recorded in this build (ld does not run twice) and stops there,
    // as its script does on a failed `run`. The build's status is the root's.
    assert_eq!(report.exit_code, 1);
    assert_eq!(report.states["ld"], State::Failed);
    assert_eq!(report.states["run prog"], State::Failed);
    assert_eq!(sorted(&report.ran), set_of(&["ld", "run prog"]));
    // A failure is not reused in the next build: ld runs again.
    let report = build(&fake, "run prog");
    assert_eq!(report.exit_code, 1);
    assert!(report.ran.contains(&"ld".to_string()), "{:?}", report.ran);

    // A background child's failure is the script's to look at; this script does not.
    fake.set(&script_path("ld"), "write prog = parse.o + main.o");
    fake.set(&script_path("cc main"), "fail");
    let report = build(&fake, "run prog");
    assert_eq!(report.states["cc main"], State::Failed);
    assert_eq!(report.exit_code, 0);

    // Fixed as it was before: its earlier successful trace is valid again, so the compile is
    // reused; only the root, whose recorded child failed, runs again.
    fake.set(&script_path("cc main"), "write main.o = main.c + parse.h");
    let report = build(&fake, "run prog");
    assert_eq!(report.exit_code, 0);
    assert_eq!(report.ran, set_of(&["run prog"]));
    assert_eq!(report.states["cc main"], State::Clean);
    yacc_outputs_are_clean(&fake);
}

#[test]
fn a_recipe_that_never_ran_is_not_run_when_its_requester_would_not() {
    // Under `cot make`, make asks for every recipe (`gated` here): one that never ran under
    // cot and whose target plain make finds up to date (a file the release ships, like
    // `configure`) is not run; once it has run, its traces decide.
    let fake = project(
        &[("root", "gated gen"), ("gen", "write gen.h = src + 0")],
        &[("src", "1")],
    );
    let report = build(&fake, "root");
    assert_eq!(report.ran, set_of(&["root"]));
    assert_eq!(report.states["gen"], State::Skipped);
    assert_eq!(report.exit_code, 0);
    // Replayed (the script is rewritten as it was: the record cannot decide), it is skipped
    // again.
    fake.set(&script_path("root"), "gated gen");
    let report = build(&fake, "root");
    assert!(report.ran.is_empty(), "{:?}", report.ran);
    assert!(
        !report.states.contains_key("gen"),
        "never recorded: not listed"
    );
    fake.set(&script_path("root"), "run gen");
    assert_eq!(sorted(&build(&fake, "root").ran), set_of(&["gen", "root"]));
    fake.set(&script_path("root"), "gated gen");
    let report = build(&fake, "root");
    // The root's first trace (the same script) is valid again: replayed, and gen, asked for
    // the same way, is decided by its trace now.
    assert!(report.ran.is_empty(), "{:?}", report.ran);
    assert_eq!(report.states["gen"], State::Clean);
    fake.set("src", "2");
    let report = build(&fake, "root");
    assert_eq!(report.states["gen"], State::Dirty);
    assert_eq!(fake.value("gen.h"), 2);
}

// The multi-write example of the design notes ("Damage scratchwork"): at, bt and dt all write
// o. Where the notes re-run a thunk to get back an intermediate version of o, cot restores it
// from the content store (the version a thunk read is in its trace), so fewer thunks run.
const MULTI: &[(&str, &str)] = &[
    ("etm", "run dtm\nrun et"),
    ("dtm", "run ctm\nrun dt"),
    ("ctm", "run btm\nrun ct"),
    ("btm", "run at\nrun bt"),
    ("at", "write o = i + a"),
    ("bt", "write o = o + b"),
    ("ct", "write y = o + c"),
    ("dt", "write o = y + d"),
    ("et", "write ans = o + e"),
];

fn multi() -> Arc<Fake> {
    let sources: Vec<(&str, &str)> = ["i", "a", "b", "c", "d", "e"]
        .iter()
        .map(|s| (*s, "1"))
        .collect();
    let fake = project(MULTI, &sources);
    build(&fake, "etm");
    assert_eq!(
        ["o", "y", "ans"].map(|p| fake.value(p)),
        [5, 4, 6],
        "the notes' first run"
    );
    fake
}

/// One case of the notes: edits, then the thunks that run (and what is damaged).
fn multi_case(edits: &[(&str, &str)], expected_ran: &[&str], expected_damaged: &[&str]) {
    let fake = multi();
    for (p, value) in edits {
        fake.set(p, value);
    }
    let report = build(&fake, "etm");
    assert_eq!(
        sorted(&report.ran),
        set_of(expected_ran),
        "edits {edits:?}: reasons {:?}",
        report.reasons
    );
    assert_eq!(report.damaged, set_of(expected_damaged), "edits {edits:?}");
    // Outputs that are not damaged are what a clean build makes of the same inputs (the
    // hand-edited o and y of the damage cases are outputs, so "the same inputs" leave them
    // out).
    let sources = ["i", "a", "b", "c", "d", "e"];
    let clean = clean_build_files(MULTI, &fake, "etm", &sources);
    for p in ["o", "y", "ans"] {
        if !expected_damaged.contains(&p) {
            assert_eq!(fake.get(p), clean.get(p).cloned(), "{p} after {edits:?}");
        }
    }
}

#[test]
fn multi_write_default_runs_nothing() {
    multi_case(&[], &[], &[]);
}

#[test]
fn multi_write_ans_edited_is_restored_e_edited_reruns_et() {
    // ans is a product of the build (nothing reads it): restored, not rebuilt.
    let fake = multi();
    fake.set("ans", "0");
    let report = build(&fake, "etm");
    assert!(report.ran.is_empty());
    assert_eq!(report.restored, set_of(&["ans"]));
    assert_eq!(fake.value("ans"), 6);
    multi_case(&[("e", "0")], &["et"], &[]);
}

#[test]
fn multi_write_o_edited_is_damage_d_edited_reruns_dt_and_et() {
    // o is read by bt, ct and et: a hand edit is damage, left alone (nothing that runs
    // needs it); the notes re-run dt to regenerate it.
    multi_case(&[("o", "0")], &[], &["o"]);
    // d=0: dt makes o=4, so et runs (o != 5).
    multi_case(&[("d", "0")], &["dt", "et"], &[]);
}

#[test]
fn multi_write_a_b_c_edited() {
    // a=0: at, bt, ct, dt run; o ends 4, so et runs too.
    multi_case(&[("a", "0")], &["at", "bt", "ct", "dt", "et"], &[]);
    // b=0: the notes run at again to get o=2 back; cot restores o=2 from the store.
    multi_case(&[("b", "0")], &["bt", "ct", "dt", "et"], &[]);
    // c=0: o=3 restored for ct.
    multi_case(&[("c", "0")], &["ct", "dt", "et"], &[]);
}

#[test]
fn multi_write_with_o_edited_too() {
    multi_case(&[("b", "0"), ("o", "2")], &["bt", "ct", "dt", "et"], &[]);
    multi_case(&[("c", "0"), ("o", "3")], &["ct", "dt", "et"], &[]);
}

#[test]
fn multi_write_y_edited_is_damage() {
    // y is read by dt: left alone; the notes re-run at and bt to recompute it.
    multi_case(&[("y", "0")], &[], &["y"]);
}

#[test]
fn a_parent_that_reads_what_its_child_writes_runs_again_when_that_changes() {
    let fake = project(
        &[
            ("root", "run gen\nwrite out = gen.h + 0"),
            ("gen", "write gen.h = src + 0"),
        ],
        &[("src", "1")],
    );
    build(&fake, "root");
    assert_eq!(fake.value("out"), 1);
    assert!(build(&fake, "root").ran.is_empty());
    fake.set("src", "2");
    let report = build(&fake, "root");
    assert_eq!(report.ran, vec!["gen".to_string(), "root".to_string()]);
    assert!(
        report.reasons["root"].starts_with("restarted: gen.h, which it read"),
        "{}",
        report.reasons["root"]
    );
    assert_eq!(fake.value("out"), 2);
}

#[test]
fn children_requested_together_run_together_and_output_changes_restart_the_parent() {
    let fake = project(
        &[
            ("root", "bg a\nbg b\nwait"),
            ("a", "echo A\nwrite a.out = x + 0"),
            ("b", "write b.out = y + 0"),
        ],
        &[("x", "1"), ("y", "1")],
    );
    build(&fake, "root");
    fake.set("x", "2");
    let report = build(&fake, "root");
    assert_eq!(report.ran, vec!["a".to_string()]);
    // What a child says reaches its parent: a change of it restarts the parent.
    fake.set(&script_path("a"), "echo B\nwrite a.out = x + 0");
    let report = build(&fake, "root");
    assert_eq!(sorted(&report.ran), set_of(&["a", "root"]));
    assert!(
        report.reasons["root"].contains("output changed"),
        "{}",
        report.reasons["root"]
    );
}

#[test]
fn nested_children_with_one_job_do_not_deadlock() {
    let fake = project(
        &[
            ("root", "run mid"),
            ("mid", "bg l1\nbg l2\nwait"),
            ("l1", "write l1.out = 1"),
            ("l2", "write l2.out = 2"),
        ],
        &[],
    );
    let report = build_with(&fake, "root", Options::default());
    assert_eq!(report.exit_code, 0);
    assert_eq!(fake.value("l2.out"), 2);
}

#[test]
fn deleting_stale_outputs_reruns_what_read_them() {
    let fake = project(
        &[
            ("root", "run a\nrun b\nrun link"),
            ("a", "write a.o = 1"),
            ("b", "write b.o = 2"),
            ("link", "write prog = a.o + b.o"),
        ],
        &[],
    );
    build(&fake, "root");
    assert_eq!(fake.value("prog"), 3);
    fake.set(&script_path("root"), "run a\nrun link");
    let report = build(&fake, "root");
    // b is stale: b.o goes, and the link, which read it, runs again in a second pass.
    assert_eq!(report.removed, set_of(&["b.o"]));
    assert_eq!(report.states["b"], State::Stale);
    assert!(report.ran.contains(&"link".to_string()), "{:?}", report.ran);
    assert_eq!(
        fake.value("prog"),
        1,
        "as a clean build of the new script makes it"
    );
    // And the build after that has nothing to do.
    assert!(build(&fake, "root").ran.is_empty());
}

#[test]
fn the_same_command_under_two_parents_runs_once() {
    // A make that runs a directory's make twice (automake, libffi): the second asks for the
    // same recipes again.
    let fake = project(
        &[
            ("root", "run pass1\nrun pass2"),
            ("pass1", "run gen"),
            ("pass2", "run gen"),
            ("gen", "write gen.h = src + 0"),
        ],
        &[("src", "1")],
    );
    let report = build(&fake, "root");
    assert_eq!(
        fake.ran.lock().iter().filter(|n| *n == "gen").count(),
        1,
        "{:?}",
        report.ran
    );
    // Replayed later, both find their traces (the second was recorded for it too).
    fake.set(&script_path("root"), "run pass1\nrun pass2");
    let report = build(&fake, "root");
    assert!(
        report.ran.is_empty(),
        "{:?} {:?}",
        report.ran,
        report.reasons
    );
    fake.set("src", "2");
    let report = build(&fake, "root");
    assert_eq!(report.ran, set_of(&["gen"]));
    assert_eq!(fake.value("gen.h"), 2);
}

// Files made on demand. The script below has a missing ordering: the compile reads gen.h, which
// the build makes after it. A correct script makes gen.h first.
const MISORDERED: &[(&str, &str)] = &[
    ("root", "run cc\nrun gen"),
    ("cc", "write main.o = gen.h + main.c"),
    ("gen", "write gen.h = gen.sh + 0"),
];
const ORDERED: &[(&str, &str)] = &[
    ("root", "run gen\nrun cc"),
    ("cc", "write main.o = gen.h + main.c"),
    ("gen", "write gen.h = gen.sh + 0"),
];

fn assert_as_ordered(fake: &Arc<Fake>, what: &str) {
    let clean = clean_build_files(ORDERED, fake, "root", &["gen.sh", "main.c"]);
    for p in ["gen.h", "main.o"] {
        assert_eq!(fake.get(p), clean.get(p).cloned(), "{p} after {what}");
    }
}

#[test]
fn a_missing_ordering_reads_what_this_build_makes_not_what_the_last_one_left() {
    let fake = project(MISORDERED, &[("gen.sh", "1"), ("main.c", "10")]);
    // The first build knows nothing of gen.h (without make's rules): the compile reads none.
    build(&fake, "root");
    assert_eq!(fake.value("main.o"), 10);
    for generator in ["2", "3", "4"] {
        // The compile is decided against gen.h as this build makes it: the generator runs
        // first (on demand), then the compile, each once; the root's own request reuses it.
        fake.set("gen.sh", generator);
        let report = build(&fake, "root");
        assert_eq!(report.ran, vec!["gen".to_string(), "cc".to_string()]);
        assert_eq!(report.states["gen"], State::Dirty);
        assert_as_ordered(&fake, &format!("gen.sh = {generator}"));
    }
    fake.set("main.c", "20");
    let report = build(&fake, "root");
    assert_eq!(report.ran, vec!["cc".to_string()]);
    assert_as_ordered(&fake, "main.c = 20");
    assert!(build(&fake, "root").ran.is_empty());
}

#[test]
fn a_running_thunk_waits_for_a_file_the_build_makes() {
    let fake = project(
        &[
            ("root", "run cc\nrun gen"),
            ("cc", "write main.o = main.c + 0"),
            ("gen", "write gen.h = gen.sh + 0"),
        ],
        &[("gen.sh", "1"), ("main.c", "10")],
    );
    build(&fake, "root");
    // The compile now reads gen.h, which it never read: its lookup waits for the generator.
    fake.set(&script_path("cc"), "write main.o = gen.h + main.c");
    fake.set("gen.sh", "5");
    let report = build(&fake, "root");
    assert_eq!(sorted(&report.ran), set_of(&["cc", "gen"]));
    assert_eq!(fake.value("main.o"), 15);
    assert_eq!(report.states["gen"], State::Dirty);
    assert!(build(&fake, "root").ran.is_empty());
}

#[test]
fn a_first_build_makes_a_file_by_its_rule_on_demand() {
    let scripts: &[(&str, &str)] = &[
        ("root", "rule gen.h make-gen\nrun cc\nrun gen"),
        ("make-gen", "run gen"),
        ("cc", "write main.o = gen.h + main.c"),
        ("gen", "write gen.h = gen.sh + 0"),
    ];
    let fake = project(scripts, &[("gen.sh", "1"), ("main.c", "10")]);
    let report = build(&fake, "root");
    // The rule's thunk makes gen.h for the compile; the root's own request of the generator
    // reuses that run.
    assert_eq!(
        report.ran,
        vec!["root", "cc", "make-gen", "gen"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    );
    assert_as_ordered(&fake, "the first build");
    for generator in ["2", "3"] {
        fake.set("gen.sh", generator);
        let report = build(&fake, "root");
        assert_eq!(report.ran, vec!["gen".to_string(), "cc".to_string()]);
        assert_as_ordered(&fake, &format!("gen.sh = {generator}"));
    }
}

#[test]
fn a_cycle_of_waits_fails_with_a_message_naming_it() {
    let fake = project(
        &[
            ("root", "rule a.out make-a\nrule b.out make-b\nrun a\nrun b"),
            ("make-a", "run a"),
            ("make-b", "run b"),
            ("a", "write a.out = b.out + 1"),
            ("b", "write b.out = a.out + 1"),
        ],
        &[],
    );
    let report = build(&fake, "root");
    // Both lookups on the cycle are refused: a fails, the root stops there. (The rule's own
    // run of a, waiting for the root's, goes on once the cycle is broken.)
    assert_eq!(report.exit_code, 1);
    assert_eq!(report.states["root"], State::Failed);
    for name in ["a", "b"] {
        let said = &report.messages[name];
        assert!(
            said.iter()
                .any(|message| message.contains("a cycle of waits")
                    && message.contains("a.out")
                    && message.contains("b.out")),
            "{name}: {said:?}"
        );
    }
}

#[test]
fn a_thunk_made_on_demand_that_its_parent_no_longer_requests_is_stale() {
    let fake = project(MISORDERED, &[("gen.sh", "1"), ("main.c", "10")]);
    build(&fake, "root");
    fake.set("main.c", "2");
    build(&fake, "root");
    assert_eq!(fake.value("main.o"), 3);
    // The generator's step is gone: the compile still finds gen.h made by it in this build,
    // but the generator is no longer part of the build; its gen.h is deleted, and the compile,
    // decided again, makes what a clean build of the new script makes.
    fake.set(&script_path("root"), "run cc");
    fake.set("main.c", "20");
    let report = build(&fake, "root");
    assert_eq!(report.states["gen"], State::Stale);
    assert_eq!(report.removed, set_of(&["gen.h"]));
    assert_eq!(fake.get("gen.h"), None);
    assert_eq!(fake.value("main.o"), 20);
    assert!(build(&fake, "root").ran.is_empty());
}

#[test]
fn a_maker_its_parent_no_longer_asks_for_is_not_what_the_build_reads() {
    let scripts: &[(&str, &str)] = &[
        ("root", "rule gen.h make-gen\nrun cc\nrun gen"),
        ("make-gen", "run gen"),
        ("cc", "write main.o = gen.h + main.c"),
        ("gen", "write gen.h = gen.sh + 0"),
        ("gen2", "write gen.h = gen.sh + 100"),
    ];
    let fake = project(scripts, &[("gen.sh", "1"), ("main.c", "10")]);
    build(&fake, "root");
    assert_eq!(fake.value("main.o"), 11);
    // The makefile now makes gen.h another way. The compile is decided against gen.h as the
    // last build's recipe makes it, but that recipe is not asked for any more: it is not part
    // of the build, and the compile, decided again, reads what the new recipe made.
    fake.set(
        &script_path("root"),
        "rule gen.h make-gen\nrun cc\nrun gen2",
    );
    fake.set(&script_path("make-gen"), "run gen2");
    let report = build(&fake, "root");
    assert_eq!(fake.value("main.o"), 111, "{:?}", report.reasons);
    assert!(!report.ran.contains(&"gen".to_string()), "{:?}", report.ran);
    assert_eq!(
        report.ran.iter().filter(|n| *n == "gen2").count(),
        1,
        "{:?}",
        report.ran
    );
    assert!(build(&fake, "root").ran.is_empty());
}

#[test]
fn a_lookup_of_what_a_failed_maker_did_not_make_fails() {
    let fake = project(MISORDERED, &[("gen.sh", "1"), ("main.c", "10")]);
    build(&fake, "root");
    // The generator now fails: the compile, which must run, is not given the last build's
    // gen.h.
    fake.set(&script_path("gen"), "fail");
    fake.set("main.c", "20");
    let report = build(&fake, "root");
    assert_eq!(report.states["cc"], State::Failed);
    assert!(
        report.messages["cc"]
            .iter()
            .any(|m| m.contains("gen.h: its maker `gen` failed")),
        "{:?}",
        report.messages
    );
    assert_eq!(report.exit_code, 1);
    // The root stops at the compile's failure, before it asks for the generator, which
    // stays part of the build.
    assert_eq!(report.states["gen"], State::Failed);
}

#[test]
fn only_recipes_wait_for_their_makes_rules_never_a_make() {
    // `sub` runs a make (it lists rules): it looks at x.h, which a rule of the root makes,
    // without waiting, as make looks at targets before making them. The root's recipe `cc`
    // reads x.h: made on demand by the rule.
    let fake = project(
        &[
            ("root", "rule x.h make-x\nrun sub\nrun cc"),
            ("sub", "rule y.h make-y\nread x.h"),
            ("cc", "write out = x.h + 0"),
            ("make-x", "write x.h = 5"),
            ("make-y", "write y.h = 6"),
        ],
        &[],
    );
    let report = build(&fake, "root");
    assert_eq!(report.exit_code, 0);
    assert_eq!(
        report.ran,
        ["root", "sub", "cc", "make-x"].map(String::from).to_vec()
    );
    assert_eq!(fake.value("out"), 5);
}

#[test]
fn an_older_trace_is_found_when_only_the_last_one_was_loaded_ahead() {
    let fake = yacc();
    fake.set("main.c", "5");
    build(&fake, "run prog");
    // Back as it was: the compile's and the link's first traces hold again, though only the
    // last ones were loaded with the products.
    fake.set("main.c", "1");
    let options = Options {
        jobs: 2,
        ..Options::default()
    };
    let report = build_preloading(&fake, "run prog", options, 0);
    assert!(report.ran.is_empty(), "{:?}", report.reasons);
    for name in ["cc main", "ld"] {
        assert!(
            report.reasons[name].starts_with("valid trace"),
            "{name}: {}",
            report.reasons[name]
        );
    }
    // The product is put back; main.o, an intermediate nothing that runs needs, is left.
    assert_eq!(report.restored, set_of(&["prog"]));
    assert_eq!(report.damaged, set_of(&["main.o"]));
}

#[test]
fn want_covers_the_path_what_is_under_it_and_the_way_to_it() {
    use super::engine::wants;
    let p = |s: &str| StorePath::Project(s.as_bytes().to_vec());
    assert!(wants(&p("obj/a.o"), &p("obj/a.o")));
    assert!(wants(&p("obj/a.o"), &p("obj")), "the directory on the way");
    assert!(
        wants(&p("obj"), &p("obj/sub/a.o")),
        "what a wanted directory holds"
    );
    assert!(wants(&p(""), &p("prog")), "the whole project");
    assert!(!wants(&p("obj"), &p("objects/a.o")));
    assert!(!wants(&p("obj/a.o"), &p("obj/b.o")));
    assert!(!wants(
        &p("obj"),
        &StorePath::Absolute(b"/tmp/obj".to_vec())
    ));
}
