//! The build's lint: what its traces say is wrong with the build description.
//!
//! It reads a finished build — every thunk with the trace it ended with — and reports:
//! - **undeclared input**: a thunk read a file that another thunk of the build writes, and
//!   nothing orders it after that writer; under make, a recipe read a project file that its
//!   target does not depend on (directly or through other rules);
//! - **undeclared output**: under make, a recipe wrote a file other than its target (or what
//!   lies under a target that is a directory);
//! - **race**: two thunks that nothing orders both write a path, or one writes what the other
//!   reads (found from the traces, whatever the timing of this run was);
//! - **time travel**: a thunk read a file that a thunk ordered after it (or itself) writes:
//!   what an earlier build left, or this build's file only because cot made it first, on
//!   demand;
//! - **input overwritten**: a thunk wrote a file that is a source input of the build.
//!
//! *Ordered* means what the build guarantees, not what happened to happen: two children of
//! one thunk are ordered when one's result reached the parent before the other was requested
//! (the trace's synchronization events); two recipes of one make are ordered only when one's
//! target is among the other's prerequisites, directly or transitively (`$^` and `$|` as make
//! passed them: make with `-j` may run any two others at once). A thunk and its ancestors are
//! not compared (a parent's own accesses are not timed against its children's).
//!
//! Only reads of contents (`read`, `readlink`) and failed lookups count as reads: a `stat` or
//! a listing says too little to call it a dependency. Paths matching the ignore list
//! ([`DEFAULT_IGNORE`] plus `cot.toml`'s `[lint] ignore` and `ignore`) are never reported.
//! One finding per defect: an undeclared input is not also reported as the race or time
//! travel it causes, and an overwritten input or a write-write race is not also an
//! undeclared output.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::GlobSet;
use serde::Serialize;

use super::engine::{command_of, display_path, target_of, World};
use crate::engine::key::{lexical, Paths};
use crate::store::model::{
    Declared, Digest, InputKind, Observed, OutputState, StorePath, SyncEvent, ThunkId, ThunkKey,
    Trace,
};

/// Paths that say nothing about a build's description: the kernel's and the system's
/// run-time files, locale and loader caches, name service configuration, byte-code caches.
/// Globs over absolute paths (`**` crosses directories).
pub const DEFAULT_IGNORE: &[&str] = &[
    "/proc/**",
    "/sys/**",
    "/dev/**",
    "/run/**",
    "/tmp/**",
    "/var/tmp/**",
    "/var/cache/**",
    "/etc/ld.so.cache",
    "/etc/ld.so.preload",
    "/etc/localtime",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/passwd",
    "/etc/group",
    "/usr/lib/locale/**",
    "/usr/share/locale/**",
    "/usr/lib/x86_64-linux-gnu/gconv/**",
    "**/__pycache__/**",
    "**/*.pyc",
];

/// The paths the lint never reports: globs over absolute paths for paths outside the
/// project, over project-relative paths inside it (so that `/tmp/**` does not hide a project
/// that lives in /tmp).
pub struct Ignore {
    outside: GlobSet,
    inside: GlobSet,
    /// cot.toml's `ignore` (inputs whose changes never make a thunk run), over view paths.
    inputs: Option<(GlobSet, Paths)>,
}

impl Ignore {
    /// [`DEFAULT_IGNORE`] and `patterns`: absolute ones for paths outside the project,
    /// relative ones for paths inside (`**/` ones for both).
    pub fn new(patterns: &[String], inputs: Option<(GlobSet, Paths)>) -> anyhow::Result<Ignore> {
        let all: Vec<&str> = DEFAULT_IGNORE
            .iter()
            .copied()
            .chain(patterns.iter().map(String::as_str))
            .collect();
        let set = |keep: &dyn Fn(&str) -> bool| {
            let chosen: Vec<String> = all
                .iter()
                .filter(|p| keep(p))
                .map(|p| p.to_string())
                .collect();
            cot_fusefs::glob_set(&chosen)
        };
        Ok(Ignore {
            outside: set(&|p| p.starts_with('/') || p.starts_with("**/"))?,
            inside: set(&|p| !p.starts_with('/'))?,
            inputs,
        })
    }

    pub fn matches(&self, path: &StorePath) -> bool {
        if let Some((set, paths)) = &self.inputs {
            if set.is_match(paths.to_view(path)) {
                return true;
            }
        }
        match path {
            StorePath::Absolute(p) => self.outside.is_match(OsStr::from_bytes(p)),
            StorePath::Project(p) => self.inside.is_match(OsStr::from_bytes(p)),
        }
    }
}

/// One thunk of the build, as the lint reads it.
pub struct LintThunk {
    pub id: ThunkId,
    pub key: ThunkKey,
    pub trace: Trace,
    /// The thunk that requested it (`None` for the root).
    pub parent: Option<ThunkId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    UndeclaredInput,
    UndeclaredOutput,
    Race,
    TimeTravel,
    InputOverwritten,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::UndeclaredInput => "undeclared input",
            Kind::UndeclaredOutput => "undeclared output",
            Kind::Race => "race",
            Kind::TimeTravel => "time travel",
            Kind::InputOverwritten => "input overwritten",
        }
    }
}

/// A thunk named in a finding.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Party {
    /// The command line (a recipe line as written).
    pub command: String,
    /// The make target whose recipe it is.
    pub target: Option<String>,
    /// The working directory, relative to the project root.
    pub cwd: String,
}

impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A long recipe line is shown by its first line.
        let command = match self.command.split_once('\n') {
            Some((first, _)) => format!("{} ...", first.trim_end_matches('\\').trim_end()),
            None => self.command.clone(),
        };
        match &self.target {
            Some(target) => write!(f, "{target} (`{command}`)"),
            None => write!(f, "`{command}`"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    pub kind: Kind,
    /// Relative to the project root when inside it.
    pub path: String,
    pub thunk: Party,
    /// The other thunk involved (the writer, the other writer, the reader).
    pub other: Option<Party>,
    pub message: String,
}

/// What the lint needs besides the traces.
pub struct LintContext<'a> {
    pub paths: &'a Paths,
    /// Paths never reported.
    pub ignore: &'a Ignore,
    /// Whether a digest is in the content store, i.e. some thunk once wrote that content: a
    /// file read with such content was left by a build, not written by a person.
    pub produced: &'a dyn Fn(&Digest) -> bool,
    /// The content of a digest in the content store (dependency files, see
    /// [`Graph::depfiles`]).
    pub content: &'a dyn Fn(&Digest) -> Option<Vec<u8>>,
}

/// The thunks of the recorded build of `root`, each with the trace it ended with.
pub fn load(world: &dyn World, root: &ThunkId) -> anyhow::Result<Vec<LintThunk>> {
    let Some(record) = world.record(root)? else {
        anyhow::bail!(
            "the last build left no record to lint (it was interrupted, or only a dry run)"
        );
    };
    let mut thunks = Vec::with_capacity(record.thunks.len());
    for thunk in record.thunks {
        let Some((key, traces)) = world.thunk(&thunk.id)? else {
            continue;
        };
        if let Some((_, trace)) = traces.into_iter().find(|(id, _)| *id == thunk.trace) {
            thunks.push(LintThunk {
                id: thunk.id,
                key,
                trace,
                parent: thunk.parent,
            });
        }
    }
    Ok(thunks)
}

/// Reads the build and returns its findings, sorted.
pub fn lint(thunks: &[LintThunk], cx: &LintContext<'_>) -> Vec<Finding> {
    let build = Graph::new(thunks, cx);
    let mut findings = Findings::default();
    let ignored = |path: &StorePath| cx.ignore.matches(path);

    // Who reads and who writes each path.
    let mut readers: BTreeMap<&StorePath, Vec<(usize, &Observed)>> = BTreeMap::new();
    let mut writers: BTreeMap<&StorePath, Vec<(usize, &OutputState)>> = BTreeMap::new();
    for (t, thunk) in thunks.iter().enumerate() {
        for input in &thunk.trace.inputs {
            let counts = matches!(
                input.kind,
                InputKind::Read | InputKind::Readlink | InputKind::Absent
            );
            if counts && !ignored(&input.path) {
                readers
                    .entry(&input.path)
                    .or_default()
                    .push((t, &input.observed));
            }
        }
        for output in &thunk.trace.outputs {
            if !matches!(output.state, OutputState::Dir { .. }) && !ignored(&output.path) {
                writers
                    .entry(&output.path)
                    .or_default()
                    .push((t, &output.state));
            }
        }
    }

    // make looks at every target and prerequisite, there or not, to decide what to run:
    // those are not a recipe's reads.
    for list in readers.values_mut() {
        list.retain(|(r, _)| !build.is_make(*r));
    }
    let no_writers = Vec::new();
    let paths: BTreeSet<&StorePath> = readers.keys().chain(writers.keys()).copied().collect();
    for path in paths {
        let path_writers = writers.get(path).unwrap_or(&no_writers);
        let path_readers = readers.get(path).map(Vec::as_slice).unwrap_or(&[]);
        let shown = display_path(path);
        // Write-write races.
        let mut raced: HashSet<usize> = HashSet::new();
        for (i, &(a, _)) in path_writers.iter().enumerate() {
            for &(b, _) in &path_writers[i + 1..] {
                if a != b && !build.same_step(a, b) && !build.ordered(a, b) {
                    raced.extend([a, b]);
                    // Named in a fixed order, whichever ran first.
                    let (first, second) = {
                        let (pa, pb) = (build.party(a), build.party(b));
                        if pa <= pb {
                            (pa, pb)
                        } else {
                            (pb, pa)
                        }
                    };
                    let message =
                        format!("{first} and {second} both write {shown}, and nothing orders them");
                    findings.add(Kind::Race, &shown, first, Some(second), message);
                }
            }
        }
        // Reads against writes.
        let written_here: Vec<&Digest> = path_writers
            .iter()
            .filter_map(|(_, state)| match state {
                OutputState::File { digest, .. } => Some(digest),
                _ => None,
            })
            .collect();
        let is_source = !build.is_target(path);
        let mut overwritten: HashSet<usize> = HashSet::new();
        for &(r, observed) in path_readers {
            let mut undeclared = false;
            let own = build.own_output(r, path);
            // Undeclared inputs. A thunk reading what it writes itself is a race with the other
            // writers, or time travel, not a dependency on them.
            for &(w, _) in path_writers.iter().filter(|(w, _)| *w != r && !own) {
                if build.same_rule(r, w) || build.same_step(r, w) || build.related(r, w) {
                    continue;
                }
                // Ordered the wrong way round: it reads what a later thunk writes. Either it
                // read what an earlier build left, or it read this build's file only because
                // cot made it first, on demand.
                if build.recipe(r).is_none() && build.before(r, w) {
                    undeclared = true;
                    let fresh = matches!(observed, Observed::Content { digest, .. }
                        if written_here.contains(&digest));
                    findings.add(
                        Kind::TimeTravel,
                        &shown,
                        build.party(r),
                        Some(build.party(w)),
                        if fresh {
                            format!(
                                "{} read {shown}, which {} writes after it (cot made it \
                                 first, on demand)",
                                build.party(r),
                                build.party(w)
                            )
                        } else if matches!(observed, Observed::Absent) {
                            format!(
                                "{} looked for {shown}, which {}, ordered after it, makes",
                                build.party(r),
                                build.party(w)
                            )
                        } else {
                            format!(
                                "{} read {shown} as an earlier build left it, then {} \
                                 rewrote it in this build",
                                build.party(r),
                                build.party(w)
                            )
                        },
                    );
                    continue;
                }
                let missing = match build.recipe(r) {
                    Some(rule) if build.makes_file(rule) => {
                        !build.declares(rule, path) && !build.declares_writer(rule, w)
                    }
                    // A rule that makes no file of its name runs every time: what it reads
                    // need not be declared, only ordered.
                    Some(_) => false,
                    None => !build.ordered(r, w),
                };
                if missing {
                    undeclared = true;
                    findings.add(
                        Kind::UndeclaredInput,
                        &shown,
                        build.party(r),
                        Some(build.party(w)),
                        match build.recipe(r) {
                            Some(_) => format!(
                                "{} read {shown}, written by {}, but {} does not depend on it",
                                build.party(r),
                                build.party(w),
                                build.target_name(r)
                            ),
                            None => format!(
                                "{} read {shown}, written by {}, and nothing orders it after \
                                 that",
                                build.party(r),
                                build.party(w)
                            ),
                        },
                    );
                } else if !build.ordered(r, w) {
                    undeclared = true;
                    findings.add(
                        Kind::Race,
                        &shown,
                        build.party(r),
                        Some(build.party(w)),
                        format!(
                            "{} reads {shown}, which {} writes, and nothing orders them",
                            build.party(r),
                            build.party(w)
                        ),
                    );
                }
            }
            // A source file read that the recipe's target does not depend on.
            if path_writers.is_empty() && matches!(path, StorePath::Project(_)) && !own {
                if let (Some(rule), Observed::Content { .. } | Observed::Link { .. }) =
                    (build.recipe(r), observed)
                {
                    if build.makes_file(rule) && !build.declares(rule, path) {
                        undeclared = true;
                        findings.add(
                            Kind::UndeclaredInput,
                            &shown,
                            build.party(r),
                            None,
                            format!(
                                "{} read {shown}, but {} does not depend on it",
                                build.party(r),
                                build.target_name(r)
                            ),
                        );
                    }
                }
            }
            if undeclared {
                continue;
            }
            // Read as an earlier build (or a person) left it, then rewritten in this build.
            let Observed::Content { digest, .. } = observed else {
                continue;
            };
            if written_here.contains(&digest) {
                continue;
            }
            let Some(&(w, _)) = path_writers
                .iter()
                .find(|(w, _)| *w == r || !build.before(*w, r))
            else {
                continue;
            };
            let source = if build.any_recipe() {
                is_source
            } else {
                !(cx.produced)(digest)
            };
            if source {
                overwritten.insert(w);
                let reader = if w == r {
                    "itself".to_string()
                } else {
                    build.party(r).to_string()
                };
                findings.add(
                    Kind::InputOverwritten,
                    &shown,
                    build.party(w),
                    (w != r).then(|| build.party(r)),
                    format!(
                        "{} overwrote {shown}, a source input of the build (read by {reader})",
                        build.party(w)
                    ),
                );
            } else {
                let writer = if w == r {
                    "rewrote it itself".to_string()
                } else {
                    format!("{} rewrote it", build.party(w))
                };
                findings.add(
                    Kind::TimeTravel,
                    &shown,
                    build.party(r),
                    (w != r).then(|| build.party(w)),
                    format!(
                        "{} read {shown} as an earlier build left it, then {writer} in this build",
                        build.party(r)
                    ),
                );
            }
        }
        // Undeclared outputs.
        for &(w, state) in path_writers {
            if raced.contains(&w) || overwritten.contains(&w) {
                continue;
            }
            if matches!(state, OutputState::Deleted) {
                continue;
            }
            let Some(rule) = build.recipe(w) else {
                continue;
            };
            if path == rule
                || build.is_under_target(w, path)
                || build.depfiles.contains(path)
                || libtool_companion(rule, path)
            {
                continue;
            }
            findings.add(
                Kind::UndeclaredOutput,
                &shown,
                build.party(w),
                None,
                format!(
                    "{} wrote {shown}, which is not its target {}",
                    build.party(w),
                    build.target_name(w)
                ),
            );
        }
    }
    findings.into_sorted()
}

#[derive(Default)]
struct Findings {
    seen: HashSet<(Kind, String, Party, Option<Party>)>,
    list: Vec<Finding>,
}

impl Findings {
    fn add(&mut self, kind: Kind, path: &str, thunk: Party, other: Option<Party>, message: String) {
        if self
            .seen
            .insert((kind, path.to_string(), thunk.clone(), other.clone()))
        {
            self.list.push(Finding {
                kind,
                path: path.to_string(),
                thunk,
                other,
                message,
            });
        }
    }

    fn into_sorted(mut self) -> Vec<Finding> {
        self.list.sort();
        self.list
    }
}

/// The build's thunks as a tree, with make's rules.
struct Graph<'a> {
    thunks: &'a [LintThunk],
    parent: Vec<Option<usize>>,
    /// Index of each thunk in its parent's `children`.
    slot: Vec<Option<u32>>,
    /// The target of each recipe line (a thunk with declarations).
    rule: Vec<Option<StorePath>>,
    /// The same for the recipe lines whose own children are not recipes (a line that runs a
    /// sub-make reads as make does: it is not checked as a recipe).
    recipe: Vec<Option<StorePath>>,
    /// Each target's prerequisites (normal and order-only), resolved.
    rules: HashMap<StorePath, BTreeSet<StorePath>>,
    /// Each target's prerequisites, transitively.
    closure: HashMap<StorePath, BTreeSet<StorePath>>,
    /// Targets that are directories (their recipes may write anything under them).
    directories: HashSet<StorePath>,
    /// Targets their recipes write (the others are phony: their recipes run every time).
    made: HashSet<StorePath>,
    /// Files recipes wrote for their make to read: dependency files, declared by nature.
    depfiles: HashSet<StorePath>,
}

impl<'a> Graph<'a> {
    fn new(thunks: &'a [LintThunk], cx: &LintContext<'_>) -> Graph<'a> {
        let paths = cx.paths;
        let index: HashMap<ThunkId, usize> =
            thunks.iter().enumerate().map(|(i, t)| (t.id, i)).collect();
        let parent: Vec<Option<usize>> = thunks
            .iter()
            .map(|t| t.parent.and_then(|p| index.get(&p).copied()))
            .collect();
        let mut slot = vec![None; thunks.len()];
        let mut declared: Vec<Option<&Declared>> = vec![None; thunks.len()];
        for (i, thunk) in thunks.iter().enumerate() {
            let Some(p) = parent[i] else { continue };
            if let Some(n) = thunks[p]
                .trace
                .children
                .iter()
                .position(|c| c.id == thunk.id)
            {
                slot[i] = u32::try_from(n).ok();
                declared[i] = thunks[p].trace.children[n].declared.as_ref();
            }
        }
        let runs_make: Vec<bool> = (0..thunks.len())
            .map(|i| {
                thunks[i]
                    .trace
                    .children
                    .iter()
                    .any(|c| c.declared.is_some())
            })
            .collect();
        let mut rule = vec![None; thunks.len()];
        let mut recipe = vec![None; thunks.len()];
        let mut rules: HashMap<StorePath, BTreeSet<StorePath>> = HashMap::new();
        let mut directories = HashSet::new();
        let mut made = HashSet::new();
        for (i, thunk) in thunks.iter().enumerate() {
            let (Some(declared), Some(target)) = (declared[i], &thunk.key.target) else {
                continue;
            };
            let cwd = paths.to_view(&thunk.key.cwd);
            let resolve = |p: &[u8]| paths.to_store(&lexical(&cwd.join(OsStr::from_bytes(p))));
            let target = resolve(target);
            let prereqs = rules.entry(target.clone()).or_default();
            for p in declared.prereqs.iter().chain(&declared.order_only) {
                prereqs.insert(resolve(p));
            }
            if thunk
                .trace
                .outputs
                .iter()
                .any(|o| o.path == target && matches!(o.state, OutputState::Dir { .. }))
            {
                directories.insert(target.clone());
            }
            if thunk
                .trace
                .outputs
                .iter()
                .any(|o| o.path == target && !matches!(o.state, OutputState::Deleted))
            {
                made.insert(target.clone());
            }
            if !runs_make[i] {
                recipe[i] = Some(target.clone());
            }
            rule[i] = Some(target);
        }
        // Dependency files: what a recipe wrote that its make includes (automake's
        // `.deps/*.Po`, gcc's `-MD` files included by the Makefile once they exist). make knows what they list from the
        // next run on; the lint counts it now, so that a first build is not reported for
        // every header its depfiles will declare.
        let mut depfiles = HashSet::new();
        for (i, thunk) in thunks.iter().enumerate() {
            if recipe[i].is_none() {
                continue;
            }
            let Some(make) = parent[i] else { continue };
            // Included: read as a whole, not only looked at (make stats every target).
            let make_reads = |path: &StorePath| {
                let trace = &thunks[make].trace;
                trace
                    .inputs
                    .iter()
                    .chain(&trace.internal)
                    .any(|i| &i.path == path && i.kind == InputKind::Read)
            };
            let cwd = paths.to_view(&thunks[make].key.cwd);
            for output in &thunk.trace.outputs {
                let OutputState::File { digest, .. } = &output.state else {
                    continue;
                };
                if !make_reads(&output.path) {
                    continue;
                }
                depfiles.insert(output.path.clone());
                let Some(text) = (cx.content)(digest) else {
                    continue;
                };
                for (target, prereqs) in make_rules(&text) {
                    let resolve =
                        |p: &[u8]| paths.to_store(&lexical(&cwd.join(OsStr::from_bytes(p))));
                    let entry = rules.entry(resolve(&target)).or_default();
                    entry.extend(prereqs.iter().map(|p| resolve(p)));
                }
            }
        }
        let mut graph = Graph {
            thunks,
            parent,
            slot,
            rule,
            recipe,
            rules,
            closure: HashMap::new(),
            directories,
            made,
            depfiles,
        };
        let targets: Vec<StorePath> = graph.rules.keys().cloned().collect();
        for target in targets {
            let mut seen = BTreeSet::new();
            let mut stack = vec![target.clone()];
            while let Some(t) = stack.pop() {
                for p in graph.rules.get(&t).into_iter().flatten() {
                    if seen.insert(p.clone()) {
                        stack.push(p.clone());
                    }
                }
            }
            graph.closure.insert(target, seen);
        }
        graph
    }

    fn party(&self, t: usize) -> Party {
        let key = &self.thunks[t].key;
        Party {
            command: command_of(key),
            target: target_of(key),
            cwd: display_path(&key.cwd),
        }
    }

    /// The target of recipe `t` as make named it.
    fn target_name(&self, t: usize) -> String {
        target_of(&self.thunks[t].key).unwrap_or_default()
    }

    /// Whether `t` runs make: its children are recipe lines, or it is cot's make driver.
    fn is_make(&self, t: usize) -> bool {
        let thunk = &self.thunks[t];
        thunk.trace.children.iter().any(|c| c.declared.is_some())
            || thunk.key.argv.get(1).is_some_and(|a| a == b"__make")
    }

    fn recipe(&self, t: usize) -> Option<&StorePath> {
        self.recipe[t].as_ref()
    }

    fn any_recipe(&self) -> bool {
        self.recipe.iter().any(Option::is_some)
    }

    /// Whether `rule`'s recipe writes its target (else it is phony).
    fn makes_file(&self, rule: &StorePath) -> bool {
        self.made.contains(rule)
    }

    /// Whether some rule of the build has `path` as its target.
    fn is_target(&self, path: &StorePath) -> bool {
        self.rules.contains_key(path)
    }

    /// Whether `t` itself wrote `path` (a read of it is of its own, earlier, output).
    fn own_output(&self, t: usize, path: &StorePath) -> bool {
        self.recipe(t) == Some(path) || self.thunks[t].trace.outputs.iter().any(|o| &o.path == path)
    }

    /// Whether `path` lies under `t`'s target, and that target is a directory.
    fn is_under_target(&self, t: usize, path: &StorePath) -> bool {
        match (self.recipe(t), path) {
            (Some(target @ StorePath::Project(dir)), StorePath::Project(p)) => {
                self.directories.contains(target)
                    && p.len() > dir.len()
                    && p.starts_with(dir)
                    && (dir.is_empty() || p[dir.len()] == b'/')
            }
            _ => false,
        }
    }

    /// Whether `rule`'s target depends on `path` (or on a directory holding it).
    fn declares(&self, rule: &StorePath, path: &StorePath) -> bool {
        let Some(closure) = self.closure.get(rule) else {
            return false;
        };
        if closure.contains(path) {
            return true;
        }
        let StorePath::Project(p) = path else {
            return false;
        };
        closure.iter().any(|d| match d {
            StorePath::Project(dir) => {
                p.len() > dir.len()
                    && p.starts_with(dir)
                    && (dir.is_empty() || p[dir.len()] == b'/')
            }
            StorePath::Absolute(_) => false,
        })
    }

    /// Whether `rule`'s target depends on the target of recipe `w`.
    fn declares_writer(&self, rule: &StorePath, w: usize) -> bool {
        self.recipe(w)
            .is_some_and(|target| self.declares(rule, target))
    }

    /// The same command for the same target in the same directory, requested under two
    /// parents (a make run twice, or a file made on demand and then by make): one step.
    fn same_step(&self, a: usize, b: usize) -> bool {
        let (ka, kb) = (&self.thunks[a].key, &self.thunks[b].key);
        ka.argv == kb.argv && ka.cwd == kb.cwd && ka.target == kb.target
    }

    fn same_rule(&self, a: usize, b: usize) -> bool {
        self.recipe(a).is_some() && self.recipe(a) == self.recipe(b)
    }

    /// One is an ancestor of the other.
    fn related(&self, a: usize, b: usize) -> bool {
        self.ancestors(a).contains(&b) || self.ancestors(b).contains(&a)
    }

    fn ancestors(&self, t: usize) -> Vec<usize> {
        let mut chain = vec![t];
        let mut at = t;
        while let Some(p) = self.parent[at] {
            if chain.contains(&p) {
                break;
            }
            chain.push(p);
            at = p;
        }
        chain
    }

    /// Whether the build orders `a` and `b` (either way).
    fn ordered(&self, a: usize, b: usize) -> bool {
        self.before(a, b) || self.before(b, a)
    }

    /// Whether the build makes `a` end before `b` starts. An ancestor and its descendant
    /// count as ordered both ways: they are not compared.
    fn before(&self, a: usize, b: usize) -> bool {
        if a == b {
            return false;
        }
        let up_a = self.ancestors(a);
        let up_b = self.ancestors(b);
        if up_a.contains(&b) || up_b.contains(&a) {
            return true;
        }
        // The lowest common ancestor, and its children on each side.
        let Some((ia, &lca)) = up_a.iter().enumerate().find(|(_, x)| up_b.contains(x)) else {
            return false;
        };
        let ib = up_b.iter().position(|x| *x == lca).unwrap_or(0);
        let (ca, cb) = (up_a[ia - 1], up_b[ib - 1]);
        if let (Some(ra), Some(rb)) = (self.rule_of(ca), self.rule_of(cb)) {
            if ra == rb {
                return self.sequenced(lca, ca, cb);
            }
            if self.declares(rb, ra) {
                return true;
            }
            // Recipes of different makes (a loop of sub-makes in one recipe line) are
            // ordered as the line ran them; of one make, only by declarations.
            if self.thunks[ca].key.cwd == self.thunks[cb].key.cwd {
                return false;
            }
        }
        self.sequenced(lca, ca, cb)
    }

    /// The target `t` (a direct child of a make) is a recipe line of, also for a line that
    /// runs a sub-make.
    fn rule_of(&self, t: usize) -> Option<&StorePath> {
        self.rule[t].as_ref()
    }

    /// Whether `parent`'s trace shows child `a`'s result arriving before `b` was requested.
    fn sequenced(&self, parent: usize, a: usize, b: usize) -> bool {
        let (Some(sa), Some(sb)) = (self.slot[a], self.slot[b]) else {
            return false;
        };
        let events = &self.thunks[parent].trace.events;
        let end_a = events.iter().position(|e| *e == SyncEvent::End(sa));
        let start_b = events.iter().position(|e| *e == SyncEvent::Start(sb));
        matches!((end_a, start_b), (Some(e), Some(s)) if e < s)
    }
}

/// Whether `path` is one of the files libtool makes beside `target` by design: for `X.lo`,
/// the non-PIC object `X.o` and anything in `.libs/` beside it; for `X.la`, anything in
/// `.libs/` beside it (the real libraries the `.la` describes).
fn libtool_companion(target: &StorePath, path: &StorePath) -> bool {
    let (StorePath::Project(target), StorePath::Project(path)) = (target, path) else {
        return false;
    };
    let (target, path) = (
        Path::new(OsStr::from_bytes(target)),
        Path::new(OsStr::from_bytes(path)),
    );
    let extension = target.extension().and_then(OsStr::to_str);
    if !matches!(extension, Some("lo" | "la")) {
        return false;
    }
    let dir = target.parent().unwrap_or(Path::new(""));
    if path.parent() == Some(&dir.join(".libs")) {
        return true;
    }
    extension == Some("lo") && path == target.with_extension("o")
}

/// The rules of a make-syntax dependency file: `TARGETS: PREREQS` lines, with `\`
/// continuations; anything else is skipped.
fn make_rules(text: &[u8]) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    let joined = String::from_utf8_lossy(text).replace("\\\n", " ");
    let mut rules = Vec::new();
    for line in joined.lines() {
        let line = line.split('#').next().unwrap_or("");
        let Some((targets, prereqs)) = line.split_once(':') else {
            continue;
        };
        if prereqs.starts_with('=') || targets.trim().is_empty() {
            continue;
        }
        let prereqs: Vec<Vec<u8>> = prereqs
            .split_whitespace()
            .filter(|p| *p != "|")
            .map(|p| p.as_bytes().to_vec())
            .collect();
        for target in targets.split_whitespace() {
            rules.push((target.as_bytes().to_vec(), prereqs.clone()));
        }
    }
    rules
}

/// The findings as text, one per line.
pub fn render_text(findings: &[Finding]) -> String {
    let mut text = String::new();
    for finding in findings {
        text.push_str(&format!(
            "cot: lint: {}: {}\n",
            finding.kind.name(),
            finding.message
        ));
    }
    text.push_str(&match findings.len() {
        0 => "cot: lint: no findings\n".to_string(),
        1 => "cot: lint: 1 finding\n".to_string(),
        n => format!("cot: lint: {n} findings\n"),
    });
    text
}

/// The findings as one JSON document: `{"findings": [...]}`.
pub fn render_json(findings: &[Finding]) -> String {
    #[derive(Serialize)]
    struct Document<'a> {
        findings: &'a [Finding],
    }
    serde_json::to_string_pretty(&Document { findings }).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(p: &str) -> StorePath {
        StorePath::Project(p.as_bytes().to_vec())
    }

    #[test]
    fn dependency_files_are_read_as_make_reads_them() {
        let text = b"src/a.lo: ../src/a.c \\\n ../include/a.h /usr/include/stdio.h\n\
                     ../include/a.h:\n# comment: x\nVAR := value\n";
        let rules = make_rules(text);
        assert_eq!(
            rules[0],
            (
                b"src/a.lo".to_vec(),
                vec![
                    b"../src/a.c".to_vec(),
                    b"../include/a.h".to_vec(),
                    b"/usr/include/stdio.h".to_vec()
                ]
            )
        );
        assert_eq!(rules[1], (b"../include/a.h".to_vec(), vec![]));
        assert_eq!(rules.len(), 2, "{rules:?}");
    }

    #[test]
    fn libtool_writes_beside_its_targets() {
        let lo = project("b/src/a.lo");
        assert!(libtool_companion(&lo, &project("b/src/a.o")));
        assert!(libtool_companion(&lo, &project("b/src/.libs/a.o")));
        assert!(!libtool_companion(&lo, &project("b/src/b.o")));
        assert!(!libtool_companion(&lo, &project("b/a.o")));
        let la = project("b/libx.la");
        assert!(libtool_companion(&la, &project("b/.libs/libx.so.1")));
        assert!(!libtool_companion(
            &project("b/x.o"),
            &project("b/.libs/x.o")
        ));
    }

    #[test]
    fn paths_are_normalized_lexically() {
        assert_eq!(
            lexical(Path::new("/p/b/../include/./a.h")),
            Path::new("/p/include/a.h")
        );
    }
}
