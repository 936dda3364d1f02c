//! Memoized thunks: reuse a valid trace instead of running, or run and record a trace.
//!
//! A trace is valid when every input it records would be observed the same way now
//! ([`Observer::check`]); for a path the thunk itself writes, finding it as the thunk left it
//! counts as unchanged. On a hit, outputs that are missing or differ (damaged) are restored
//! from the content store, stdout and stderr are replayed, and the recorded exit status is
//! returned. On a miss the command runs; its inputs are observed after it exits and before its
//! writes are committed (so they are what it saw), its outputs after the commit.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cot_fusefs::{Access, AccessKind};

use crate::cache::{CacheOptions, Caches};
use crate::cas::Cas;
use crate::server::Client;
use crate::store::model::{
    ChildCall, FileState, Input, InputKind, Observed, Output, OutputState, StorePath, SyncEvent,
    Trace, TraceId,
};
use crate::store::thunk_id;

use super::key::{thunk_key, Binds, Paths};
use super::observe::{file_kind, stat_tuple, CheckMode, FileStates, Observer};
use super::{Error, RunOptions, Thunk};
use crate::store::model::FileKind;

/// How to use the store for one `cot run`.
#[derive(Clone, Debug)]
pub struct MemoOptions {
    /// The trace store directory (`--store`, `COT_STORE`; default `<project>/.cot/store`).
    pub store: Option<PathBuf>,
    /// The content store directory (default `<project>/.cot/cas`): set by a caller that keeps
    /// stores of its own beside `store` (`cot install`'s package database).
    pub cas: Option<PathBuf>,
    /// The caches beyond the project's store (`--cache`, `--remote`).
    pub caches: CacheOptions,
    pub check: CheckMode,
    /// Always run (and still record).
    pub no_cache: bool,
    /// Reuse traces of runs that failed.
    pub cache_failures: bool,
}

/// What `cot run` did.
#[derive(Debug)]
pub struct MemoReport {
    pub exit_code: i32,
    /// Why it ran or did not, for `--explain`.
    pub explanation: String,
    /// The outcome's message when the command ran and did not exit normally.
    pub message: Option<String>,
    /// The accesses of the run (empty on a hit), for `--trace-out`.
    pub accesses: Vec<Access>,
    pub ran: bool,
    pub passthrough: bool,
    pub duration: Duration,
    /// Files hashed while deciding (a no-op must hash none that did not change).
    pub hashes: u64,
    /// From the start to the decision (connecting to the store, reading the traces, checking
    /// every input), before any output is restored.
    pub decided_in: Duration,
    /// The thunk's key, and the trace it ended with (the one reused, or the one recorded;
    /// `None` when the run was interrupted).
    pub key: crate::store::model::ThunkKey,
    pub trace: Option<(TraceId, Trace)>,
}

/// Now, in nanoseconds since the Unix epoch, as traces and records keep it.
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// File states asked of the store when needed: only for files whose stat tuple differs from
/// the recorded one, so a no-op asks for none.
struct LazyStates<'c>(std::cell::RefCell<&'c mut Client>);

impl FileStates for LazyStates<'_> {
    fn get(&self, real: &Path) -> Option<FileState> {
        let path = real.as_os_str().as_bytes().to_vec();
        self.0
            .borrow_mut()
            .file_states(vec![path])
            .ok()?
            .pop()
            .flatten()
    }
}

/// Where the store and the content store of a project are. The content store is the
/// project's own (`.cot/cas`, unless the caller keeps one elsewhere): a cache shared with other
/// checkouts is a second level (see [`crate::cache`]).
pub fn store_dirs(project_root: &Path, options: &MemoOptions) -> (PathBuf, PathBuf) {
    let state = project_root.join(super::project::STATE_DIR);
    (
        options.store.clone().unwrap_or_else(|| state.join("store")),
        options.cas.clone().unwrap_or_else(|| state.join("cas")),
    )
}

/// The names that the thunk's own outputs take in each directory, left out of listings.
fn output_names(outputs: &[&StorePath], paths: &Paths) -> HashMap<PathBuf, HashSet<OsString>> {
    let mut names: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
    for path in outputs {
        let view = paths.to_view(path);
        if let (Some(parent), Some(name)) = (view.parent(), view.file_name()) {
            names
                .entry(parent.to_path_buf())
                .or_default()
                .insert(name.to_owned());
        }
    }
    names
}

/// Runs `thunk` unless a valid trace says what it would do.
pub fn run(
    thunk: &Thunk,
    run_options: &RunOptions,
    options: &MemoOptions,
) -> Result<MemoReport, Error> {
    let started = std::time::Instant::now();
    let project_root = super::project::find_root(&thunk.cwd);
    // A run killed while committing is completed before anything is decided from the files.
    super::project::recover_dead_layers(&project_root);
    let paths = Paths::new(&project_root);
    let binds = Binds::new(super::view_binds(thunk, &project_root)?);
    let hidden = super::hide_rule(thunk, &project_root)?;
    let key = thunk_key(thunk, &paths);
    let id = thunk_id(&key);
    let (store_dir, cas_dir) = store_dirs(&project_root, options);
    let mut client = Client::connect(&store_dir)?;
    let cas = Cas::open(&cas_dir)?;

    let mut reason = "--no-cache".to_string();
    let mut hashes = 0;
    let mut decided_in = Duration::ZERO;
    let mut caches = None;
    let mut cache_options = options.caches.clone();
    if !options.no_cache {
        let traces = client.traces(id)?;
        let lazy = LazyStates(std::cell::RefCell::new(&mut client));
        let observer = Observer::new(&paths, &binds, options.check, &lazy, &hidden);
        let decision = decide(&traces, &observer, options.cache_failures);
        decided_in = started.elapsed();
        let mut hit = match decision {
            Ok((trace_id, trace)) => {
                // A content the project's store lacks (collected, or a store shared with
                // --store) may be in the shared cache.
                let blobs = crate::cache::portable::blobs(trace);
                if !cache_options.is_empty() && !blobs.iter().all(|d| cas.contains(d)) {
                    let opened = Caches::open(&cache_options, paths.names());
                    opened.fill(&blobs, &cas);
                    caches = Some(opened);
                }
                match materialize(trace, &cas, &observer, &run_options.capture) {
                    Ok(restored) => Some((Some(trace_id), trace.clone(), restored, None)),
                    Err(e) => {
                        eprintln!("cot: {e}; running the command instead");
                        reason = format!("could not restore the outputs ({e})");
                        None
                    }
                }
            }
            Err(why) => {
                reason = why;
                None
            }
        };
        if hit.is_none() && !cache_options.is_empty() {
            let opened = caches
                .take()
                .unwrap_or_else(|| Caches::open(&cache_options, paths.names()));
            hit = from_caches(&opened, id, &traces, &observer, &cas, run_options);
            caches = Some(opened);
        }
        hashes = observer.hashes();
        let learned = observer.take_learned();
        // The observer borrows the client (through `lazy`) until here.
        drop(observer);
        if !learned.is_empty() {
            client.put_file_states(learned)?;
        }
        if let Some((trace_id, trace, restored, cache)) = hit {
            replay(&cas, &trace)?;
            let trace_id = match trace_id {
                Some(trace_id) => {
                    client.touch(id, trace_id, now_ns())?;
                    trace_id
                }
                // Taken from a cache: now the project's own.
                None => client.record(key.clone(), trace.clone(), Vec::new())?,
            };
            let from = cache.map_or(String::new(), |cache| format!(" from {cache}"));
            return Ok(MemoReport {
                exit_code: trace.exit_code,
                explanation: format!(
                    "cached{from}: {} inputs unchanged, restored {restored} outputs",
                    trace.inputs.len()
                ),
                message: None,
                accesses: Vec::new(),
                ran: false,
                passthrough: false,
                duration: started.elapsed(),
                hashes,
                decided_in,
                key,
                trace: Some((trace_id, trace)),
            });
        }
    }
    // Nothing of a cache stays open while the sandbox is launched (it needs this process
    // single-threaded); it is opened again to take the trace.
    if let Some(caches) = caches {
        cache_options = caches.without_failed(&cache_options);
    }

    let ran = super::execute(thunk, run_options)?;
    let recorded = record_run(
        &ran,
        thunk,
        key.clone(),
        run_options,
        options.check,
        &mut client,
        &cas,
        None,
    )?;
    if let Some((_, trace)) = recorded.as_ref().filter(|(_, t)| t.exit_code == 0) {
        if !cache_options.is_empty() {
            let caches = Caches::open(&cache_options, paths.names());
            caches.export(&key, trace, &cas);
            warn(&caches);
        }
    }
    let message = super::outcome_message(&ran.outcome);
    Ok(MemoReport {
        exit_code: ran.outcome.exit_code(),
        explanation: format!("ran: {reason}"),
        message,
        accesses: ran.accesses.clone(),
        ran: true,
        passthrough: ran.passthrough,
        duration: started.elapsed(),
        hashes,
        decided_in,
        key,
        trace: recorded,
    })
}

/// A trace from a cache that holds, with its contents in the project's content store and its
/// outputs restored; `None` when no cache has one. The trace is not recorded yet.
fn from_caches(
    caches: &Caches,
    id: crate::store::model::ThunkId,
    local: &[(TraceId, Trace)],
    observer: &Observer<'_>,
    cas: &Cas,
    run_options: &RunOptions,
) -> Option<(Option<TraceId>, Trace, usize, Option<String>)> {
    let mut hit = None;
    for tier in caches.tiers() {
        let Some(found) = caches.lookup(&id, tier) else {
            continue;
        };
        let candidates: Vec<(TraceId, Trace)> = found
            .candidates
            .iter()
            .map(|c| (crate::store::trace_id(&c.trace), c.trace.clone()))
            .filter(|(trace_id, _)| !local.iter().any(|(own, _)| own == trace_id))
            .collect();
        let Ok((trace_id, trace)) = decide(&candidates, observer, false) else {
            continue;
        };
        let Some(candidate) = found
            .candidates
            .iter()
            .find(|c| crate::store::trace_id(&c.trace) == trace_id)
        else {
            continue;
        };
        if caches.fetch(&id, candidate, cas).is_err() {
            continue;
        }
        match materialize(trace, cas, observer, &run_options.capture) {
            Ok(restored) => {
                hit = Some((None, trace.clone(), restored, Some(caches.describe(tier))));
                break;
            }
            Err(e) => eprintln!("cot: {e}; running the command instead"),
        }
    }
    warn(caches);
    hit
}

/// Shows the caches' warnings on stderr.
fn warn(caches: &Caches) {
    for message in caches.take_warnings() {
        eprintln!("cot: warning: {message}");
    }
}

/// What a build adds to the trace of a thunk that ran: its child requests and the events of
/// its synchronization operations, and what its children wrote (see
/// [`crate::build::engine::CallLog`]).
pub type ChildRequests = (
    Vec<ChildCall>,
    Vec<SyncEvent>,
    std::collections::BTreeMap<StorePath, OutputState>,
);

/// After a thunk ran: observes its inputs (before its writes are committed, so they are what
/// it saw), commits or discards its layer, stores its outputs and output in the content
/// store, and records the trace. `None` when it was interrupted (nothing is recorded).
#[allow(clippy::too_many_arguments)]
pub fn record_run(
    ran: &super::Ran,
    thunk: &Thunk,
    key: crate::store::model::ThunkKey,
    run_options: &RunOptions,
    check: CheckMode,
    client: &mut Client,
    cas: &Cas,
    children: Option<ChildRequests>,
) -> Result<Option<(TraceId, Trace)>, Error> {
    let project_root = super::project::find_root(&thunk.cwd);
    let paths = Paths::new(&project_root);
    let binds = Binds::new(super::view_binds(thunk, &project_root)?);
    let hidden = super::hide_rule(thunk, &project_root)?;
    // The digests of unchanged files it read are known: one batch from the store.
    let read: Vec<PathBuf> = ran
        .accesses
        .iter()
        .filter(|a| a.kind == AccessKind::Read)
        .map(|a| binds.real(&a.path))
        .collect();
    let states = client.file_states(
        read.iter()
            .map(|p| p.as_os_str().as_bytes().to_vec())
            .collect(),
    )?;
    let known = Known(
        read.into_iter()
            .zip(states)
            .filter_map(|(path, state)| Some((path, state?)))
            .collect(),
    );
    let observer = Observer::new(&paths, &binds, check, &known, &hidden);
    let output_paths = output_paths(&ran.accesses, &project_root, &thunk.writable);
    let (children, events, written) = children.unwrap_or_default();
    // What its children wrote is left out of its listings like its own outputs: deleting a
    // child's output must not make the parent run again (the build restores or rebuilds it).
    let mut unlisted = output_paths.clone();
    unlisted.extend(written.keys().map(|p| paths.to_view(p)));
    let inputs = inputs(&ran.accesses, &observer, &paths, &unlisted);
    let (inputs, mut internal) = crate::build::engine::split_internal(inputs, &written);
    // Those entries are kept as internal lookups, so the check of the listing leaves them out
    // again, and a child that stops writing one makes the parent run again.
    let listed: HashSet<PathBuf> = inputs
        .iter()
        .filter(|i| i.kind == InputKind::Readdir)
        .map(|i| paths.to_view(&i.path))
        .collect();
    for path in written.keys() {
        let view = paths.to_view(path);
        let in_listed = view.parent().is_some_and(|dir| listed.contains(dir));
        if in_listed && !internal.iter().any(|i| &i.path == path) {
            let observed = observer
                .observe(InputKind::Stat, &view, &HashSet::new())
                .unwrap_or(Observed::Absent);
            internal.push(Input {
                path: path.clone(),
                kind: InputKind::Stat,
                observed,
            });
        }
    }
    let commits = ran.commits(run_options);
    let captured = if commits {
        match captured_outputs(ran, &run_options.capture, &paths, cas) {
            Ok(captured) => captured,
            Err(e) => {
                ran.discard()?;
                return Err(e);
            }
        }
    } else {
        Vec::new()
    };
    if !commits {
        ran.discard()?;
    } else if run_options.capture.is_empty() {
        ran.commit()?;
    } else {
        let scopes: Vec<PathBuf> = run_options
            .capture
            .iter()
            .map(|p| super::capture_scope(p))
            .collect();
        ran.commit_except(&scopes)?;
    }
    let outputs = if commits {
        let committed: Vec<PathBuf> = output_paths
            .iter()
            .filter(|p| !captures(&run_options.capture, p))
            .cloned()
            .collect();
        let mut outputs = outputs(&committed, &ran.accesses, &paths, &binds, cas)?;
        outputs.extend(captured);
        outputs.sort_by_key(|o| paths.to_view(&o.path));
        outputs
    } else {
        Vec::new()
    };
    let (stdout_file, stderr_file) = ran.output_files();
    let stdout = cas.put_file(stdout_file)?.0;
    let stderr = cas.put_file(stderr_file)?.0;
    let interrupted = matches!(ran.outcome, cot_sandbox::Outcome::Interrupted(_));
    if interrupted {
        return Ok(None);
    }
    let mut files = observer.take_learned();
    // Captured outputs are not on disk: whatever is at their paths is not what they hold.
    let on_disk: Vec<Output> = outputs
        .iter()
        .filter(|o| !captures(&run_options.capture, &paths.to_view(&o.path)))
        .cloned()
        .collect();
    files.extend(output_states(&on_disk, &paths, &binds));
    let trace = Trace {
        inputs,
        outputs,
        stdout,
        stderr,
        exit_code: ran.outcome.exit_code(),
        duration_ns: u64::try_from(ran.duration.as_nanos()).unwrap_or(u64::MAX),
        ran_at_ns: now_ns(),
        children,
        events,
        internal,
    };
    let trace_id = client.record(key, trace.clone(), files)?;
    Ok(Some((trace_id, trace)))
}

/// File states fetched from the store in one batch.
struct Known(HashMap<PathBuf, FileState>);

impl FileStates for Known {
    fn get(&self, real: &Path) -> Option<FileState> {
        self.0.get(real).cloned()
    }
}

/// The first valid trace, most recently used first, or why there is none.
fn decide<'t>(
    traces: &'t [(TraceId, Trace)],
    observer: &Observer<'_>,
    cache_failures: bool,
) -> Result<(TraceId, &'t Trace), String> {
    let mut first_reason = None;
    for (trace_id, trace) in traces {
        let reason = if trace.exit_code != 0 && !cache_failures {
            Some(format!(
                "the recorded run failed (exit status {}); --cache-failures reuses failed runs",
                trace.exit_code
            ))
        } else {
            invalid_input(trace, observer)
        };
        match reason {
            None => return Ok((*trace_id, trace)),
            Some(reason) => {
                first_reason.get_or_insert(reason);
            }
        }
    }
    Err(first_reason.unwrap_or_else(|| "no earlier trace".into()))
}

/// The first recorded input that no longer holds, described.
fn invalid_input(trace: &Trace, observer: &Observer<'_>) -> Option<String> {
    trace
        .inputs
        .iter()
        .find_map(|input| check_input(input, trace, observer))
}

/// What `trace` left at the path of one of its inputs, when the thunk wrote it, and whether
/// the input is only the probe that comes with writing it. A lookup of a path the thunk then
/// writes is that probe (`cc -o`, `>`, `rm -f`): what was there before does not reach the
/// outputs, and the outputs themselves are restored on a hit. A read of it before rewriting
/// it still counts.
pub fn own_output<'t>(input: &Input, trace: &'t Trace) -> (Option<&'t OutputState>, bool) {
    let left = trace
        .outputs
        .iter()
        .find(|o| o.path == input.path)
        .map(|o| &o.state);
    let probe = left.is_some() && matches!(input.kind, InputKind::Stat | InputKind::Absent);
    (left, probe)
}

/// Whether one recorded input of `trace` still holds: `None` when it does, else what changed.
pub fn check_input(input: &Input, trace: &Trace, observer: &Observer<'_>) -> Option<String> {
    let (left, probe) = own_output(input, trace);
    if probe {
        return None;
    }
    let view = observer.paths.to_view(&input.path);
    let none = HashSet::new();
    let exclude = if input.kind == InputKind::Readdir {
        let output_paths: Vec<&StorePath> = trace
            .outputs
            .iter()
            .map(|o| &o.path)
            .chain(trace.internal.iter().map(|i| &i.path))
            .collect();
        output_names(&output_paths, observer.paths)
            .remove(&view)
            .unwrap_or_default()
    } else {
        none
    };
    observer
        .check(input, &exclude, left)
        .map(|change| change.to_string())
}

/// Whether the output at `view` is one the caller puts in place (see
/// [`RunOptions::capture`]): under a captured path, or a directory on the way to one (made
/// by the thunk to reach a missing path).
fn captures(capture: &[PathBuf], view: &Path) -> bool {
    capture
        .iter()
        .any(|c| view.starts_with(c) || c.starts_with(view))
}

/// What a thunk left under the `capture` roots, read from its layer before the commit: its
/// files stored in the content store, in the trace's output form; a real entry it deleted
/// there is a deletion. A write where the thunk could write to make a missing root (see
/// [`super::capture_scope`]) but outside the root is refused.
fn captured_outputs(
    ran: &super::Ran,
    capture: &[PathBuf],
    paths: &Paths,
    cas: &Cas,
) -> Result<Vec<Output>, Error> {
    let io_error = |path: &Path, e: io::Error| Error::Path {
        path: path.to_path_buf(),
        message: format!("cannot read the thunk's output from its layer: {e}"),
    };
    let mut outputs = Vec::new();
    for root in capture {
        let scope = super::capture_scope(root);
        let changes = ran.changes_under(&scope)?;
        let outside = |view: &Path| !view.starts_with(root) && !root.starts_with(view);
        if let Some(view) = changes
            .upper
            .iter()
            .map(|(view, _)| view)
            .chain(&changes.deleted)
            .find(|view| outside(view))
        {
            return Err(Error::Path {
                path: view.clone(),
                message: format!(
                    "the command wrote here, outside {}, the only directory it may install \
                     into; nothing of the run was kept",
                    root.display()
                ),
            });
        }
        // Entries outside the root are the directories the thunk made on the way to it.
        for (view, layer_file) in changes.upper {
            let meta = fs::symlink_metadata(&layer_file).map_err(|e| io_error(&layer_file, e))?;
            let Some(state) = stored_state(&layer_file, &meta, cas)? else {
                continue;
            };
            outputs.push(Output {
                path: paths.to_store(&view),
                state,
            });
        }
        for view in changes.deleted {
            outputs.push(Output {
                path: paths.to_store(&view),
                state: OutputState::Deleted,
            });
        }
    }
    Ok(outputs)
}

/// Restores the outputs of `trace` that are missing or differ; returns how many. Outputs at
/// and under the `captured` view paths are left to the caller, but their content must be in
/// the content store.
fn materialize(
    trace: &Trace,
    cas: &Cas,
    observer: &Observer<'_>,
    captured: &[PathBuf],
) -> Result<usize, Error> {
    let is_captured = |output: &Output| captures(captured, &observer.paths.to_view(&output.path));
    for output in trace.outputs.iter().filter(|o| is_captured(o)) {
        if let OutputState::File { digest, .. } = &output.state {
            if !cas.contains(digest) {
                return Err(Error::Path {
                    path: observer.paths.to_view(&output.path),
                    message: format!(
                        "content {} is missing from the content store {}",
                        crate::cas::hex(digest),
                        cas.root().display()
                    ),
                });
            }
        }
    }
    let mut restored = 0;
    // Deletions first, deepest first, so that a directory removed by the thunk goes after its
    // entries and before anything is created in its place.
    for output in trace.outputs.iter().rev().filter(|o| !is_captured(o)) {
        if output.state == OutputState::Deleted && restore_output(output, cas, observer)? {
            restored += 1;
        }
    }
    for output in trace.outputs.iter().filter(|o| !is_captured(o)) {
        if output.state != OutputState::Deleted && restore_output(output, cas, observer)? {
            restored += 1;
        }
    }
    Ok(restored)
}

/// Puts one output on the real file system as the thunk left it, unless it already is;
/// returns whether anything changed.
pub fn restore_output(output: &Output, cas: &Cas, observer: &Observer<'_>) -> Result<bool, Error> {
    let io_error = |path: &Path, e: io::Error| Error::Path {
        path: path.to_path_buf(),
        message: format!("cannot restore output: {e}"),
    };
    let view = observer.paths.to_view(&output.path);
    let real = observer.binds.real(&view);
    if matches!(output.path, StorePath::Project(_)) {
        let root = observer.binds.real(observer.paths.project_root());
        if !reached_inside(&real, &root) {
            return Err(Error::Path {
                path: real,
                message: format!(
                    "cannot restore output: a symlink on the way leads out of {}",
                    root.display()
                ),
            });
        }
    }
    if output.state == OutputState::Deleted {
        return match fs::symlink_metadata(&real) {
            Ok(meta) if meta.is_dir() => {
                fs::remove_dir_all(&real).map_err(|e| io_error(&real, e))?;
                Ok(true)
            }
            Ok(_) => {
                fs::remove_file(&real).map_err(|e| io_error(&real, e))?;
                Ok(true)
            }
            Err(_) => Ok(false),
        };
    }
    if observer.output_holds(&view, &output.state).unwrap_or(false) {
        return Ok(false);
    }
    if let Some(parent) = real.parent() {
        fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    }
    let existing = fs::symlink_metadata(&real).ok();
    let is_dir = existing.as_ref().is_some_and(|m| m.is_dir());
    match &output.state {
        OutputState::Dir { mode } => {
            if existing.is_some() && !is_dir {
                fs::remove_file(&real).map_err(|e| io_error(&real, e))?;
            }
            fs::create_dir_all(&real).map_err(|e| io_error(&real, e))?;
            fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(*mode))
                .map_err(|e| io_error(&real, e))?;
        }
        OutputState::File { digest, mode, .. } => {
            if is_dir {
                fs::remove_dir_all(&real).map_err(|e| io_error(&real, e))?;
            }
            cas.restore(digest, &real, *mode)?;
        }
        OutputState::Symlink { target } => {
            if is_dir {
                fs::remove_dir_all(&real).map_err(|e| io_error(&real, e))?;
            } else if existing.is_some() {
                fs::remove_file(&real).map_err(|e| io_error(&real, e))?;
            }
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &real)
                .map_err(|e| io_error(&real, e))?;
        }
        OutputState::Deleted => {}
    }
    Ok(true)
}

/// Whether `path` (under `root`) is reached inside `root`: no symlink among its existing
/// ancestors leads elsewhere. A project path a trace names is restored only so, whoever
/// recorded the trace (a cache's writer may have restored a symlink there before).
fn reached_inside(path: &Path, root: &Path) -> bool {
    let Some(existing) = path
        .parent()
        .into_iter()
        .flat_map(Path::ancestors)
        .find(|a| a.symlink_metadata().is_ok())
    else {
        return false;
    };
    let Ok(existing) = existing.canonicalize() else {
        return false;
    };
    // The root is canonical already when found from the working directory; resolved only if
    // it is not.
    existing.starts_with(root)
        || root
            .canonicalize()
            .is_ok_and(|root| existing.starts_with(root))
}

/// Writes the recorded stdout and stderr of a trace to cot's own.
fn replay(cas: &Cas, trace: &Trace) -> Result<(), Error> {
    let stdout = cas.read(&trace.stdout)?;
    let stderr = cas.read(&trace.stderr)?;
    // A closed stdout (cot piped into `head`) is not cot's failure.
    let _ = io::stdout()
        .lock()
        .write_all(&stdout)
        .and_then(|()| io::stdout().flush());
    let _ = io::stderr().lock().write_all(&stderr);
    Ok(())
}

fn is_write(kind: AccessKind) -> bool {
    !matches!(
        kind,
        AccessKind::Stat
            | AccessKind::Read
            | AccessKind::Readdir
            | AccessKind::Readlink
            | AccessKind::Absent
            | AccessKind::Hidden
    )
}

/// The view paths the thunk changed, in the writable roots, sorted (parents first).
fn output_paths(accesses: &[Access], project_root: &Path, writable: &[PathBuf]) -> Vec<PathBuf> {
    let under_writable =
        |p: &Path| p.starts_with(project_root) || writable.iter().any(|w| p.starts_with(w));
    let mut out: Vec<PathBuf> = Vec::new();
    for access in accesses.iter().filter(|a| is_write(a.kind)) {
        match access.kind {
            // A link's new name is the output; the existing file is unchanged.
            AccessKind::Link => out.extend(access.to.clone()),
            AccessKind::Rename => {
                out.push(access.path.clone());
                out.extend(access.to.clone());
            }
            _ => out.push(access.path.clone()),
        }
    }
    out.retain(|p| under_writable(p));
    out.sort();
    out.dedup();
    out
}

/// The inputs of a run, observed now (after the command, before its commit): accesses that
/// read, in order, except those to paths the thunk had already written.
fn inputs(
    accesses: &[Access],
    observer: &Observer<'_>,
    paths: &Paths,
    output_paths: &[PathBuf],
) -> Vec<Input> {
    let stored: Vec<StorePath> = output_paths.iter().map(|p| paths.to_store(p)).collect();
    let names = output_names(&stored.iter().collect::<Vec<_>>(), paths);
    let none = HashSet::new();
    let mut written: HashSet<&Path> = HashSet::new();
    let mut made_dirs: Vec<&Path> = Vec::new();
    let mut inputs = Vec::new();
    for access in accesses {
        let kind = match access.kind {
            AccessKind::Stat => InputKind::Stat,
            AccessKind::Read => InputKind::Read,
            AccessKind::Readdir => InputKind::Readdir,
            AccessKind::Readlink => InputKind::Readlink,
            AccessKind::Absent => InputKind::Absent,
            AccessKind::Hidden => InputKind::Hidden,
            other => {
                written.insert(&access.path);
                if let Some(to) = &access.to {
                    if other != AccessKind::Symlink {
                        written.insert(to);
                    }
                }
                if matches!(other, AccessKind::Mkdir) {
                    made_dirs.push(&access.path);
                }
                if matches!(other, AccessKind::Rename) {
                    made_dirs.extend(access.to.as_deref());
                }
                continue;
            }
        };
        let path = access.path.as_path();
        if written.contains(path) || made_dirs.iter().any(|dir| path.starts_with(dir)) {
            continue;
        }
        let exclude = names.get(path).unwrap_or(&none);
        let observed = match observer.observe(kind, path, exclude) {
            Ok(observed) => observed,
            // Unreadable now (permissions): record it as absent, so the trace is re-checked
            // (and the command re-run) until it can be observed.
            Err(_) => Observed::Absent,
        };
        inputs.push(Input {
            path: paths.to_store(path),
            kind,
            observed,
        });
    }
    inputs
}

/// The final state of every output, after the commit; file contents go to the content store.
/// A directory the thunk renamed into place counts with everything in it.
fn outputs(
    output_paths: &[PathBuf],
    accesses: &[Access],
    paths: &Paths,
    binds: &Binds,
    cas: &Cas,
) -> Result<Vec<Output>, Error> {
    let renamed_to: HashSet<&Path> = accesses
        .iter()
        .filter(|a| a.kind == AccessKind::Rename)
        .filter_map(|a| a.to.as_deref())
        .collect();
    let mut all: Vec<PathBuf> = output_paths.to_vec();
    for path in output_paths {
        if renamed_to.contains(path.as_path()) {
            walk(&binds.real(path), path, &mut all);
        }
    }
    all.sort();
    all.dedup();
    let mut outputs = Vec::new();
    for view in all {
        let real = binds.real(&view);
        let state = match fs::symlink_metadata(&real) {
            Err(_) => OutputState::Deleted,
            Ok(meta) => match stored_state(&real, &meta, cas)? {
                Some(state) => state,
                None => continue,
            },
        };
        outputs.push(Output {
            path: paths.to_store(&view),
            state,
        });
    }
    Ok(outputs)
}

/// The output state of the file at `path` (whose metadata is `meta`), its content put in the
/// content store; `None` for fifos and sockets, which carry no content to restore.
fn stored_state(path: &Path, meta: &fs::Metadata, cas: &Cas) -> Result<Option<OutputState>, Error> {
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
    Ok(Some(match file_kind(meta) {
        FileKind::File => {
            let (digest, size) = cas.put_file(path)?;
            OutputState::File { digest, mode, size }
        }
        FileKind::Dir => OutputState::Dir { mode },
        FileKind::Symlink => OutputState::Symlink {
            target: fs::read_link(path)
                .map_err(|e| Error::Path {
                    path: path.to_path_buf(),
                    message: format!("cannot read the output link: {e}"),
                })?
                .as_os_str()
                .as_bytes()
                .to_vec(),
        },
        FileKind::Other => return Ok(None),
    }))
}

fn walk(real: &Path, view: &Path, into: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(real) else {
        return;
    };
    for entry in entries.flatten() {
        let child_view = view.join(entry.file_name());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&entry.path(), &child_view, into);
        }
        into.push(child_view);
    }
}

/// File states of the outputs just stored, so the next check does not hash them again.
fn output_states(outputs: &[Output], paths: &Paths, binds: &Binds) -> Vec<(Vec<u8>, FileState)> {
    outputs
        .iter()
        .filter_map(|output| {
            let OutputState::File { digest, .. } = output.state else {
                return None;
            };
            let real = binds.real(&paths.to_view(&output.path));
            let meta = fs::symlink_metadata(&real).ok()?;
            Some((
                real.as_os_str().as_bytes().to_vec(),
                FileState {
                    stat: stat_tuple(&meta),
                    digest,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_reached_inside_its_root_unless_a_symlink_leads_out() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("project");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(root.join("src/deep")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
        std::os::unix::fs::symlink("src", root.join("inner")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", root.join("dangling")).unwrap();
        // The root reached through a symlink of its own is still the root.
        std::os::unix::fs::symlink(&root, tmp.path().join("alias")).unwrap();
        for inside in [
            "file",
            "src/deep/file",
            "src/missing/dir/file",
            "inner/file",
        ] {
            assert!(reached_inside(&root.join(inside), &root), "{inside}");
            let via_alias = tmp.path().join("alias").join(inside);
            assert!(
                reached_inside(&via_alias, &tmp.path().join("alias")),
                "{inside}"
            );
        }
        for out in ["out/file", "out/missing/file", "dangling/file"] {
            assert!(!reached_inside(&root.join(out), &root), "{out}");
        }
    }
}
