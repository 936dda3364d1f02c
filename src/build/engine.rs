//! The build engine: which thunks of a build run, which are reused, in what order.
//!
//! This is the design notes' iThreads model. A thunk is decided from its traces against the
//! *keystate*: the values that thunks resolved earlier in this build wrote (from their traces,
//! whether they ran or not), and the real file system for every other path. A thunk with a
//! valid trace is not executed: its recorded writes enter the keystate and its recorded child
//! requests are replayed in their recorded order, each child decided the same way. A thunk
//! without one is executed; every child it requests is matched against that child's traces.
//!
//! A replayed thunk is executed after all (a *restart*) when one of its children now ends
//! differently (exit status, output) or leaves something else at a path the thunk read.
//!
//! Files are *made on demand*: the last build's record says which thunk produced each path
//! (its *products*), and a make that runs lists its rules for missing files (see
//! [`Requests::rules`]). A thunk never reads such a path before its producer is done in this
//! build: a running thunk's first lookup of it waits ([`Requests::want`]), and so does the
//! decision of a thunk against its recorded read of it; a producer nobody asked for yet is
//! resolved there and then (reused, replayed or run, as always). So a missing ordering (make
//! -j) neither fails nor reads the last build's file ("time travel"). Who waits for whom is a
//! graph; a wait that would close a cycle is refused with a message naming it, failing the
//! running thunks on the cycle, never a hang. A thunk resolved on demand that its parent then
//! does not ask for is not part of the build: its outputs are deleted like those of a stale
//! thunk, and the build is decided once more.
//!
//! Nothing here touches a file or a process: the [`World`] does (the real one in
//! `coordinator.rs`, a fake one in the tests), so the rebuild logic is tested without root.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use globset::GlobSet;
use parking_lot::{Condvar, Mutex};

use crate::store::model::{
    BuildRecord, BuildThunk, ChildCall, Declared, Digest, FileKind, Input, InputKind, Observed,
    Output, OutputState, StatTuple, StorePath, SyncEvent, ThunkId, ThunkKey, Trace, TraceId,
};
use crate::store::thunk_id;

/// The parent id of a build's root thunk: "requested by the build command itself". It keeps
/// the root's traces apart from a plain `cot run` of the same command, whose key has no parent.
pub const ROOT_PARENT: ThunkId = [0; 32];

/// The parent name of the root's own children: "the build", not the root's command line, so
/// `cot make` and `cot make check` share their recipes' thunks.
pub const BUILD_CHILDREN: ThunkId = [1; 32];

/// A thunk's key and its traces, most recently used first.
pub type Known = (ThunkKey, Vec<(TraceId, Trace)>);

/// A thunk's traces as loaded, and whether they are all of them (see [`Inner::known`]).
type Loaded = (Vec<(TraceId, Trace)>, bool);

/// The occurrence that names the thunk making one make rule's target on demand, under the make
/// that listed the rule (see [`Requests::rules`]): no requester counts that far.
pub const ON_DEMAND: u32 = u32::MAX;

/// Whether a thunk makes a make rule's target on demand (see [`ON_DEMAND`]).
pub fn is_rule_thunk(key: &ThunkKey) -> bool {
    key.parent
        .is_some_and(|(_, occurrence)| occurrence == ON_DEMAND)
}

/// How many recorded inputs the traces loaded with the products may hold in all (about
/// 200 bytes each in memory). Past it, only each thunk's last trace is kept until the thunk is
/// resolved; its others are loaded again if that one no longer holds.
const PRELOAD_INPUTS: usize = 1_000_000;

/// How far up a chain of parents is looked at most (a guard against a malformed record).
const MAX_DEPTH: usize = 256;

const TYPE_BITS: u32 = 0o170000;
const DIRECTORY: u32 = 0o040000;

/// How a build record keeps the `lstat` of a directory that no thunk listed: only its type and
/// mode count (a file created or removed in it changes its times, not what the build read), so
/// every other field is zero — which no real `lstat` gives (inode 0).
fn type_only(stat: StatTuple) -> StatTuple {
    StatTuple {
        dev: 0,
        ino: 0,
        size: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        mode: stat.mode,
    }
}

/// Whether a path is as a build record's snapshot says.
pub fn same_stat(recorded: &Option<StatTuple>, now: &Option<StatTuple>) -> bool {
    match (recorded, now) {
        (Some(r), Some(n)) if r.ino == 0 && r.mode & TYPE_BITS == DIRECTORY => r.mode == n.mode,
        _ => recorded == now,
    }
}

/// What the engine needs of the outside world.
pub trait World: Send + Sync + 'static {
    /// The key and the traces (most recently used first) of a thunk; `None` when unknown.
    fn thunk(&self, id: &ThunkId) -> anyhow::Result<Option<Known>>;
    /// Whether a recorded input of `trace` holds in the real file system now: `None` when it
    /// does, else what changed.
    fn check(&self, input: &Input, trace: &Trace) -> Option<String>;
    /// Whether the real file system has `state` at `path`.
    fn holds(&self, path: &StorePath, state: &OutputState) -> bool;
    /// [`World::holds`] for many paths at once (one round trip to the store where it can).
    fn holds_all(&self, outputs: &[(&StorePath, &OutputState)]) -> Vec<bool> {
        outputs
            .iter()
            .map(|(path, state)| self.holds(path, state))
            .collect()
    }
    /// Puts a recorded output on the real file system (from the content store).
    fn restore(&self, path: &StorePath, state: &OutputState) -> anyhow::Result<()>;
    /// Deletes the output of a stale thunk.
    fn remove(&self, path: &StorePath) -> anyhow::Result<()>;
    /// Runs a thunk for real and records its trace. Its child requests go through `requests`,
    /// and the trace it records lists them (see [`CallLog`]).
    fn execute(
        &self,
        id: &ThunkId,
        key: &ThunkKey,
        requests: &dyn Requests,
    ) -> anyhow::Result<Executed>;
    /// Records `trace` again with every input observed as it is now (`--touch`).
    fn touch(&self, key: &ThunkKey, trace: &Trace) -> anyhow::Result<TraceId>;
    /// Records `trace`, as it is, for `key` too (the same command ran for another parent).
    fn adopt(&self, key: &ThunkKey, trace: &Trace) -> anyhow::Result<TraceId>;
    /// The `lstat` of each path now, for the build record's snapshot.
    fn snapshot(&self, paths: &[StorePath]) -> Vec<(StorePath, Option<StatTuple>)>;
    /// The first path of a snapshot that is no longer as it says, if any (the no-op fast
    /// path).
    fn changed(&self, snapshot: &[(StorePath, Option<StatTuple>)]) -> Option<StorePath> {
        let paths: Vec<StorePath> = snapshot.iter().map(|(p, _)| p.clone()).collect();
        let now = self.snapshot(&paths);
        now.into_iter()
            .zip(snapshot)
            .find(|(now, recorded)| !same_stat(&recorded.1, &now.1))
            .map(|(now, _)| now.0)
    }
    /// The record of the last build of `root`.
    fn record(&self, root: &ThunkId) -> anyhow::Result<Option<BuildRecord>>;
    fn put_record(&self, root: &ThunkId, record: BuildRecord) -> anyhow::Result<()>;
    /// Called for every thunk the engine resolves (progress; printing the output of a thunk
    /// that ran for a replayed parent, see [`Resolved::delivered`]).
    fn resolved(&self, thunk: &Resolved);
    /// A thunk starts executing.
    fn started(&self, key: &ThunkKey);
    /// How many caches beyond the project's store there are (a shared directory, a remote),
    /// asked in order for a thunk none of whose own traces holds.
    fn cache_tiers(&self) -> usize {
        0
    }
    /// What cache `tier` knows of thunk `id`: its key and the traces that may be used here
    /// (each still to be decided). `None` when it knows nothing usable.
    fn cached(&self, _id: &ThunkId, _tier: usize) -> Option<Known> {
        None
    }
    /// How cache `tier` is named in reasons ("the shared cache /var/cache/cot").
    fn cache_name(&self, _tier: usize) -> String {
        String::new()
    }
    /// Makes a trace found by [`World::cached`], and found valid, the project's own: its
    /// contents copied to the project's content store and verified, the trace recorded in its
    /// store. An error means it cannot be used (the thunk is decided without it).
    fn adopt_cached(
        &self,
        _id: &ThunkId,
        _key: &ThunkKey,
        _tier: usize,
        _trace: &Trace,
    ) -> anyhow::Result<TraceId> {
        anyhow::bail!("no cache")
    }
}

/// The running thunk's side of child requests.
pub trait Requests: Sync {
    /// Resolves a child thunk (its key without parent) and returns what it did; blocks.
    /// `skip_if_new`: the requester would not run it by its own rules (make: the target is
    /// newer than its prerequisites), so if it never ran under cot it does not run now, and
    /// succeeds (`cot make` asks make for every recipe, which must not make cot run a recipe
    /// for a file a release ships, e.g. `configure`, that plain make would leave alone).
    fn request(&self, key: ThunkKey, skip_if_new: bool) -> ChildOutcome;
    /// The paths the running thunk waits for before it looks them up: what other thunks of
    /// the build produce, except itself, its ancestors and descendants, and (make) the recipes
    /// of its own target. Asked once, when it starts.
    fn wanted(&self) -> Vec<StorePath>;
    /// The running thunk looks up `path` (one of [`Requests::wanted`]) for the first time:
    /// blocks until the thunk producing it is done in this build, resolving it now if nobody
    /// asked for it yet, and puts it on disk as that thunk left it. An error names the cycle
    /// that waiting would close: the lookup fails, and so must the thunk.
    fn want(&self, path: &StorePath) -> Result<(), String>;
    /// `cot make`: the running thunk runs a make (it says so when make starts, with no
    /// rules, so that it never waits for a rule), and these are its rules for files missing
    /// now. For its recipes, each path is made on demand by resolving its key (make with that
    /// target), named by the requester with the occurrence [`ON_DEMAND`], unless the last
    /// build says who makes it.
    fn rules(&self, rules: Vec<(StorePath, ThunkKey)>);
}

/// What a thunk that ran left, as recorded.
#[derive(Clone, Debug)]
pub struct Executed {
    pub trace_id: TraceId,
    pub trace: Trace,
    /// The sandbox's message when the command did not exit normally, or cot's own failure.
    pub message: Option<String>,
    /// The command was interrupted (the build stops).
    pub interrupted: bool,
}

/// What a requester gets back from a child thunk.
#[derive(Clone, Debug, Default)]
pub struct ChildOutcome {
    pub id: ThunkId,
    pub exit_code: i32,
    pub stdout: Digest,
    pub stderr: Digest,
    /// Everything the child and its descendants wrote, as they left it.
    pub writes: BTreeMap<StorePath, OutputState>,
    /// A one-line explanation when the child did not run to its end (a sandbox failure,
    /// a build that stops).
    pub message: Option<String>,
}

/// How a thunk was decided in this build (the design notes' "Thunk state").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// No trace: it ran for the first time.
    New,
    /// Traces, none valid: it ran.
    Dirty,
    /// A valid trace, its outputs as it left them (or restored).
    Clean,
    /// A valid trace, but an output differs from it and was left alone (nothing needed it).
    Damaged,
    /// In the last build, not requested in this one: its outputs were deleted.
    Stale,
    /// Not run this time (`--skip`, a build interrupted or stopping on a failure of cot
    /// itself, a recipe never run that its requester would not run).
    Skipped,
    /// It ran and failed.
    Failed,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::New => "new",
            State::Dirty => "dirty",
            State::Clean => "clean",
            State::Damaged => "damaged",
            State::Stale => "stale",
            State::Skipped => "skipped",
            State::Failed => "failed",
        }
    }
}

/// One thunk as this build resolved it.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub id: ThunkId,
    pub parent: Option<ThunkId>,
    pub key: ThunkKey,
    pub state: State,
    pub reason: String,
    pub ran: bool,
    pub exit_code: i32,
    /// Since the build started.
    pub started: Duration,
    pub duration: Duration,
    pub trace: Option<Arc<Trace>>,
    pub message: Option<String>,
    /// It ran and its output reached whoever requested it (a running thunk, or the terminal
    /// for the root); else the world prints it.
    pub delivered: bool,
}

/// What kind of build this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Run what must run.
    Build,
    /// Decide, print what would run and why, run nothing (`-n`, `-q`, `cot status`).
    DryRun,
    /// Accept current inputs as up to date: re-record instead of running (`-t`).
    Touch,
}

/// How to build.
#[derive(Clone, Debug)]
pub struct Options {
    pub jobs: usize,
    pub keep_going: bool,
    pub mode: Mode,
    /// Thunks whose command matches run even with a valid trace (`-B`).
    pub rebuild: Option<GlobSet>,
    /// Thunks whose command matches are not run this time (`--skip`).
    pub skip: Option<GlobSet>,
    /// Outputs of stale thunks stay (`--keep-stale`).
    pub keep_stale: bool,
    /// Outputs restored when damaged or missing even if no thunk reads them (`--want`): each
    /// path, everything under it, and the directories on the way to it.
    pub want: Vec<StorePath>,
    /// List every thunk even when nothing changed (for reports and `--explain`).
    pub detail: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            jobs: 1,
            keep_going: false,
            mode: Mode::Build,
            rebuild: None,
            skip: None,
            keep_stale: false,
            want: Vec::new(),
            detail: false,
        }
    }
}

/// The result of a build.
#[derive(Debug)]
pub struct Outcome {
    /// The root thunk's exit status (0 when it succeeded); 130 when interrupted.
    pub exit_code: i32,
    pub interrupted: bool,
    /// Every thunk resolved, in the order they were first requested (the last resolution of
    /// a thunk requested twice), then the stale ones.
    pub thunks: Vec<Resolved>,
    /// Outputs not as their thunk left them, left alone.
    pub damaged: Vec<StorePath>,
    /// Outputs restored from the content store.
    pub restored: Vec<StorePath>,
    /// Outputs of stale thunks deleted.
    pub removed: Vec<StorePath>,
    /// Decided from the build record alone: nothing changed since the last build.
    pub unchanged: bool,
    /// Something would run (`--dry-run`), or ran.
    pub would_run: bool,
    /// Why the build was not decided from its record alone: the first path found changed.
    pub first_change: Option<StorePath>,
}

/// The parent a build's root thunk is named with.
const ROOT_KEY_PARENT: Option<(ThunkId, u32)> = Some((ROOT_PARENT, 0));

/// The id a build's root thunk (and its build record) has, from the key of its command.
pub fn root_id(key: &ThunkKey) -> ThunkId {
    let mut key = key.clone();
    key.parent = ROOT_KEY_PARENT;
    thunk_id(&key)
}

/// A command line for messages and patterns: a recipe line (`sh -c LINE`) is shown as LINE,
/// anything else as its arguments joined with spaces.
pub fn command_of(key: &ThunkKey) -> String {
    let words: Vec<String> = key
        .argv
        .iter()
        .map(|a| crate::engine::key::display_named(a))
        .collect();
    if key.target.is_some() && words.len() == 3 && words[1] == "-c" {
        return words[2].clone();
    }
    words.join(" ")
}

/// The make target of a recipe line, under `cot make`.
pub fn target_of(key: &ThunkKey) -> Option<String> {
    key.target
        .as_ref()
        .map(|t| String::from_utf8_lossy(t).into_owned())
}

/// Whether a recorded observation holds for a value in the keystate: `None` when the keystate
/// cannot say (a directory listing), which falls back to the real file system.
pub fn observed_holds(observed: &Observed, state: &OutputState) -> Option<bool> {
    Some(match (observed, state) {
        (Observed::Listing { .. }, _) => return None,
        (Observed::Absent, OutputState::Deleted) => true,
        (Observed::Absent, _) | (_, OutputState::Deleted) => false,
        (Observed::Content { digest, .. }, OutputState::File { digest: d, .. }) => digest == d,
        (Observed::Link { target }, OutputState::Symlink { target: t }) => target == t,
        (
            Observed::Meta {
                kind, mode, size, ..
            },
            OutputState::File {
                mode: m, size: s, ..
            },
        ) => *kind == FileKind::File && mode & 0o7777 == m & 0o7777 && size == s,
        (Observed::Meta { kind, mode, .. }, OutputState::Dir { mode: m }) => {
            *kind == FileKind::Dir && mode & 0o7777 == m & 0o7777
        }
        (Observed::Meta { kind, link, .. }, OutputState::Symlink { target }) => {
            *kind == FileKind::Symlink && link.as_ref() == Some(target)
        }
        _ => false,
    })
}

/// The child requests of a running thunk, for its trace: [`Trace::children`] and
/// [`Trace::events`] in the order they happened, and what the children wrote (reads of
/// those paths go to [`Trace::internal`], see [`split_internal`]).
#[derive(Default)]
pub struct CallLog {
    inner: Mutex<CallLogInner>,
}

#[derive(Default)]
struct CallLogInner {
    children: Vec<ChildCall>,
    events: Vec<SyncEvent>,
    writes: BTreeMap<StorePath, OutputState>,
}

impl CallLog {
    /// A child is requested (`skip_if_new`: see [`Requests::request`]); returns its index.
    pub fn start(&self, skip_if_new: bool, declared: Option<Declared>) -> u32 {
        let mut inner = self.inner.lock();
        let index = u32::try_from(inner.children.len()).unwrap_or(u32::MAX);
        inner.children.push(ChildCall {
            id: [0; 32],
            exit_code: 0,
            stdout: [0; 32],
            stderr: [0; 32],
            skip_if_new,
            declared,
        });
        inner.events.push(SyncEvent::Start(index));
        index
    }

    /// The child's result reaches the thunk.
    pub fn end(&self, index: u32, outcome: &ChildOutcome) {
        let mut inner = self.inner.lock();
        if let Some(call) = inner.children.get_mut(index as usize) {
            call.id = outcome.id;
            call.exit_code = outcome.exit_code;
            call.stdout = outcome.stdout;
            call.stderr = outcome.stderr;
        }
        inner.events.push(SyncEvent::End(index));
        for (path, state) in &outcome.writes {
            inner.writes.insert(path.clone(), state.clone());
        }
    }

    /// Whether any child was requested.
    pub fn is_empty(&self) -> bool {
        self.inner.lock().children.is_empty()
    }

    /// The children, the events and the paths the children wrote. A child whose result
    /// never reached the thunk (it exited first) gets its End here, so every Start has one.
    pub fn finish(
        &self,
    ) -> (
        Vec<ChildCall>,
        Vec<SyncEvent>,
        BTreeMap<StorePath, OutputState>,
    ) {
        let mut inner = std::mem::take(&mut *self.inner.lock());
        let ended: HashSet<u32> = inner
            .events
            .iter()
            .filter_map(|e| match e {
                SyncEvent::End(i) => Some(*i),
                SyncEvent::Start(_) => None,
            })
            .collect();
        let count = u32::try_from(inner.children.len()).unwrap_or(u32::MAX);
        for i in 0..count {
            if !ended.contains(&i) {
                inner.events.push(SyncEvent::End(i));
            }
        }
        (inner.children, inner.events, inner.writes)
    }
}

/// Splits a thunk's inputs into its own inputs and its reads of paths that its children
/// wrote ([`Trace::internal`]).
pub fn split_internal(
    inputs: Vec<Input>,
    written: &BTreeMap<StorePath, OutputState>,
) -> (Vec<Input>, Vec<Input>) {
    inputs
        .into_iter()
        .partition(|input| !written.contains_key(&input.path))
}

/// A value computed on another thread.
struct Future<T>(Arc<(Mutex<Option<T>>, Condvar)>);

impl<T: Send + 'static> Future<T> {
    fn spawn(f: impl FnOnce() -> T + Send + 'static) -> Future<T> {
        let cell = Arc::new((Mutex::new(None), Condvar::new()));
        let done = cell.clone();
        std::thread::spawn(move || {
            let value = f();
            *done.0.lock() = Some(value);
            done.1.notify_all();
        });
        Future(cell)
    }

    fn wait(self) -> T {
        let mut value = self.0 .0.lock();
        loop {
            if let Some(v) = value.take() {
                return v;
            }
            self.0 .1.wait(&mut value);
        }
    }
}

/// Job slots: at most `jobs` thunks execute at once. A thunk waiting for a child gives its
/// slot back meanwhile, so that `-j1` cannot deadlock on nested thunks.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn acquire(&self) {
        let mut free = self.free.lock();
        while *free == 0 {
            self.freed.wait(&mut free);
        }
        *free -= 1;
    }

    fn release(&self) {
        *self.free.lock() += 1;
        self.freed.notify_one();
    }
}

/// The build's shared state.
#[derive(Default)]
struct Shared {
    /// Values written in this build: path → (state, writer).
    keystate: HashMap<StorePath, (OutputState, ThunkId)>,
    /// Paths whose value a simulated (`--dry-run`) thunk would change, with its command.
    unknown: HashMap<StorePath, String>,
    /// Thunks resolved, by id, with their position in `order`.
    resolved: HashMap<ThunkId, Resolved>,
    order: Vec<ThunkId>,
    ordered: HashSet<ThunkId>,
    /// Traces recorded in this build (a failed one may be reused within the build).
    fresh: HashSet<TraceId>,
    /// Traces this build took from a cache beyond the project's store, with the cache's name.
    from_cache: HashMap<TraceId, String>,
    restored: Vec<StorePath>,
    would_run: bool,
    /// The first path found changed since the last build (why the fast path was not taken).
    first_change: Option<StorePath>,
    /// Paths this build changed on disk by running thunks: a replayed thunk that wrote one of
    /// them puts its version back (it is not damage done by hand).
    touched: HashSet<StorePath>,
    /// The thunks that ran in this build, by their key without parent.
    ran_shapes: HashMap<ThunkId, (TraceId, Arc<Trace>)>,

    // Files made on demand.
    /// What the last build produced.
    products: Arc<Products>,
    /// The key and traces of each thunk of the last build, loaded with the products, until
    /// the thunk is resolved, and whether they are all its traces (see [`PRELOAD_INPUTS`]).
    preloaded: HashMap<ThunkId, (Known, bool)>,
    /// For each thunk running a make that listed its rules ([`Requests::rules`]): the paths
    /// they make, to the thunk making each on demand.
    rules: HashMap<ThunkId, HashMap<StorePath, ThunkId>>,
    rule_thunks: HashMap<ThunkId, Rule>,
    /// Thunks being resolved, with their command (for messages).
    in_flight: HashMap<ThunkId, String>,
    /// Thunks executing: their ids, and their shapes (a thunk with the same command waits).
    running: HashSet<ThunkId>,
    running_shapes: HashMap<ThunkId, ThunkId>,
    /// Each thunk's parent in this build.
    parent_of: HashMap<ThunkId, ThunkId>,
    /// Thunks requested by their parent (the others were resolved on demand only).
    requested: HashSet<ThunkId>,
    /// The wait-for graph: who waits for whom, now.
    waits: HashMap<u64, Wait>,
    next_wait: u64,
}

/// What the last build produced: the thunks of its record and the paths each left.
#[derive(Default)]
struct Products {
    /// Each path that one thunk left (or one command, run for several parents).
    by_path: HashMap<StorePath, ThunkId>,
    thunks: HashMap<ThunkId, Recorded>,
}

/// A thunk of the last build.
struct Recorded {
    parent: Option<ThunkId>,
    key: ThunkKey,
    shape: ThunkId,
}

/// Where a thunk waits for a path (see [`Shared::producer_for`]).
struct Maker {
    /// The thunk that makes the path.
    producer: ThunkId,
    /// The thunk to wait for: the producer, or the ancestor of it to resolve first.
    target: ThunkId,
    /// The target's key and parent, when it is not part of the build yet.
    start: Option<(ThunkKey, ThunkId)>,
}

/// A make rule whose target can be made on demand.
struct Rule {
    key: ThunkKey,
    /// The make that listed it, and is its parent.
    make: ThunkId,
}

/// One edge of the wait-for graph.
struct Wait {
    from: ThunkId,
    to: ThunkId,
    why: Why,
    /// Set when the wait was given up to break a cycle, with the cycle described.
    broken: Option<String>,
}

/// Why one thunk waits for another.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Why {
    /// A requester waits for its child (never given up).
    Child,
    /// A thunk waits for what makes `path`: a running thunk's lookup (`lookup`), or a decision
    /// against a recorded read.
    Path { path: StorePath, lookup: bool },
    /// A thunk waits for a running thunk with the same command, to reuse its run.
    Same,
}

impl Why {
    /// A wait that can be given up to break a cycle (a child request cannot).
    fn breakable(&self) -> bool {
        *self != Why::Child
    }
}

impl Shared {
    /// A thunk's parent: in this build, else in the last one, else the make whose rule it is.
    fn parent(&self, id: &ThunkId) -> Option<ThunkId> {
        if let Some(parent) = self.parent_of.get(id) {
            return Some(*parent);
        }
        if let Some(recorded) = self.products.thunks.get(id) {
            return recorded.parent;
        }
        self.rule_thunks.get(id).map(|rule| rule.make)
    }

    /// Whether `a` is an ancestor of `b`.
    fn is_ancestor(&self, a: &ThunkId, b: &ThunkId) -> bool {
        let mut at = *b;
        for _ in 0..MAX_DEPTH {
            match self.parent(&at) {
                Some(parent) if parent == *a => return true,
                Some(parent) => at = parent,
                None => return false,
            }
        }
        false
    }

    fn key_of(&self, id: &ThunkId) -> Option<&ThunkKey> {
        self.products
            .thunks
            .get(id)
            .map(|r| &r.key)
            .or_else(|| self.rule_thunks.get(id).map(|r| &r.key))
    }

    /// A thunk's command, for messages (a make rule's thunk without cot's directory).
    fn command(&self, id: &ThunkId) -> String {
        let key = self
            .resolved
            .get(id)
            .map(|r| &r.key)
            .or_else(|| self.key_of(id));
        match key {
            Some(key) if is_rule_thunk(key) => {
                let mut key = key.clone();
                if let Some(program) = key.argv.first_mut() {
                    if let Some(slash) = program.iter().rposition(|&b| b == b'/') {
                        program.drain(..=slash);
                    }
                }
                command_of(&key)
            }
            Some(key) => command_of(key),
            None => self
                .in_flight
                .get(id)
                .cloned()
                .unwrap_or_else(|| crate::store::hex(&id[..4])),
        }
    }

    /// Whether `thunk` (with `key` and `shape`) never waits for `producer` for `path`: itself,
    /// an ancestor or a descendant, a thunk with the same command, or (make) a recipe of its
    /// own target (make looks up the target of the recipe it is about to run).
    fn never_waits(
        &self,
        thunk: &ThunkId,
        key: &ThunkKey,
        shape: &ThunkId,
        producer: &ThunkId,
        path: &StorePath,
    ) -> bool {
        if producer == thunk
            || self.is_ancestor(producer, thunk)
            || self.is_ancestor(thunk, producer)
            || target_path(key).as_ref() == Some(path)
        {
            return true;
        }
        self.products.thunks.get(producer).is_some_and(|p| {
            p.shape == *shape
                || (key.target.is_some() && p.key.target == key.target && p.key.cwd == key.cwd)
        })
    }

    /// The rules `thunk` may wait for: those of the make that requested it (a recipe), or,
    /// under a rule's thunk, those of that rule's make. None for a thunk running a make
    /// itself: make looks at its targets before it makes them, its recipes read them.
    fn rules_for(&self, thunk: &ThunkId) -> Option<&HashMap<StorePath, ThunkId>> {
        if self.rules.contains_key(thunk) {
            return None;
        }
        let mut make = self.parent_of.get(thunk)?;
        if let Some(rule) = self.rule_thunks.get(make) {
            make = &rule.make;
        }
        self.rules.get(make)
    }

    /// Who makes `path` for `thunk` in this build: the thunk of the last build that made it;
    /// else, for a lookup (`rules`) of a path no thunk of this build made yet, the rule of its
    /// make. (A decision is made against the last build's reads: a path a rule makes was read
    /// by nothing yet, or the last build knows who makes it.)
    fn producer_of(&self, thunk: &ThunkId, path: &StorePath, rules: bool) -> Option<ThunkId> {
        if let Some(producer) = self.products.by_path.get(path) {
            return Some(*producer);
        }
        if !rules || self.keystate.contains_key(path) {
            return None;
        }
        self.rules_for(thunk)?.get(path).copied()
    }

    /// Where `thunk` waits for `path` (on a lookup, else in its decision): the thunk to wait
    /// for, and, when it is not part of this build yet, its key and parent to resolve it
    /// with. That is the path's producer, or the ancestor of it that hangs from a thunk of this
    /// build (a producer whose parent has not been requested yet is made by resolving that
    /// parent, as it was made last time).
    fn producer_for(
        &self,
        thunk: &ThunkId,
        key: &ThunkKey,
        path: &StorePath,
        lookup: bool,
    ) -> Option<Maker> {
        let producer = self.producer_of(thunk, path, lookup)?;
        if self.never_waits(thunk, key, &shape_of(key), &producer, path) {
            return None;
        }
        let mut at = producer;
        for _ in 0..MAX_DEPTH {
            if self.ordered.contains(&at) {
                return Some(Maker {
                    producer,
                    target: at,
                    start: None,
                });
            }
            let parent = self.parent(&at)?;
            let at_key = self.key_of(&at)?;
            if self.ordered.contains(&parent) {
                return Some(Maker {
                    producer,
                    target: at,
                    start: Some((at_key.clone(), parent)),
                });
            }
            if parent == *thunk || self.is_ancestor(&parent, thunk) {
                return None;
            }
            at = parent;
        }
        None
    }

    /// Notes that `id` is being resolved, as `asked`.
    fn claim(&mut self, id: ThunkId, key: &ThunkKey, asked: &Asked) {
        self.in_flight.insert(id, command_of(key));
        // Reports list thunks in request order, parents before their children.
        if self.ordered.insert(id) {
            self.order.push(id);
        }
        if let Some(parent) = asked.parent {
            self.parent_of.insert(id, parent);
            if !asked.on_demand {
                self.requested.insert(id);
            }
        }
    }

    /// The edges of a chain of waits from `from` to `to`, if there is one.
    fn chain_of_waits(&self, from: ThunkId, to: ThunkId) -> Option<Vec<u64>> {
        let mut edges: HashMap<ThunkId, Vec<(u64, ThunkId)>> = HashMap::new();
        for (id, wait) in &self.waits {
            if wait.broken.is_none() {
                edges.entry(wait.from).or_default().push((*id, wait.to));
            }
        }
        // Depth first, remembering how each thunk was reached.
        let mut reached: HashMap<ThunkId, Option<(u64, ThunkId)>> = HashMap::new();
        reached.insert(from, None);
        let mut stack = vec![from];
        while let Some(at) = stack.pop() {
            if at == to {
                let mut chain = Vec::new();
                let mut node = at;
                while let Some(Some((edge, previous))) = reached.get(&node) {
                    chain.push(*edge);
                    node = *previous;
                }
                chain.reverse();
                return Some(chain);
            }
            for (edge, next) in edges.get(&at).into_iter().flatten() {
                if !reached.contains_key(next) {
                    reached.insert(*next, Some((*edge, at)));
                    stack.push(*next);
                }
            }
        }
        None
    }

    /// A wait, said of its waiter: "needs gen.h, made by `sh gen.sh > gen.h`".
    fn describe_wait(&self, to: &ThunkId, why: &Why) -> String {
        let to = self.command(to);
        match why {
            Why::Child => format!("waits for its child `{to}`"),
            Why::Path { path, .. } => format!("needs {}, made by `{to}`", display_path(path)),
            Why::Same => format!("waits for `{to}` (the same command, for another parent)"),
        }
    }
}

struct Inner<W: World> {
    world: W,
    options: Options,
    started: Instant,
    shared: Mutex<Shared>,
    slots: Slots,
    /// Set when the build is interrupted or cot itself failed for a thunk: nothing more
    /// starts. (A thunk's own failure is its requester's to handle.)
    stopping: AtomicBool,
    interrupted: AtomicBool,
    /// Notified when a thunk's resolution or run ends, or a wait is given up.
    settled: Condvar,
    /// Threads resolving thunks on demand, joined before the build ends.
    on_demand_threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The last pass found thunks made on demand that are not part of the build.
    outsiders: AtomicBool,
    /// See [`PRELOAD_INPUTS`].
    preload_inputs: usize,
}

/// How a thunk is asked for.
#[derive(Clone, Copy, Debug)]
struct Asked {
    /// Its requester (`None`: the root).
    parent: Option<ThunkId>,
    /// Its outputs must be on disk now (its requester is running and may read them).
    materialize: bool,
    /// See [`Requests::request`].
    skip_if_new: bool,
    /// For a thunk that wants what it makes, not by its parent.
    on_demand: bool,
}

impl Asked {
    fn by(parent: ThunkId, materialize: bool, skip_if_new: bool) -> Asked {
        Asked {
            parent: Some(parent),
            materialize,
            skip_if_new,
            on_demand: false,
        }
    }
}

/// A build in progress.
pub struct Build<W: World> {
    inner: Arc<Inner<W>>,
}

enum Decision {
    Valid(TraceId, Arc<Trace>),
    Run(String),
}

impl<W: World> Build<W> {
    pub fn new(world: W, options: Options) -> Build<W> {
        let jobs = options.jobs.max(1);
        Build {
            inner: Arc::new(Inner {
                world,
                options,
                started: Instant::now(),
                shared: Mutex::new(Shared::default()),
                slots: Slots {
                    free: Mutex::new(jobs),
                    freed: Condvar::new(),
                },
                stopping: AtomicBool::new(false),
                interrupted: AtomicBool::new(false),
                settled: Condvar::new(),
                on_demand_threads: Mutex::new(Vec::new()),
                outsiders: AtomicBool::new(false),
                preload_inputs: PRELOAD_INPUTS,
            }),
        }
    }

    /// Keeps no more than `inputs` recorded inputs in the traces loaded with the products
    /// (see [`PRELOAD_INPUTS`]), for the tests.
    #[cfg(test)]
    pub fn preload_inputs(mut self, inputs: usize) -> Build<W> {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.preload_inputs = inputs;
        }
        self
    }

    pub fn world(&self) -> &W {
        &self.inner.world
    }

    /// Builds from the root thunk `key` (its `parent` is set here).
    pub fn run(&self, mut key: ThunkKey) -> anyhow::Result<Outcome> {
        key.parent = ROOT_KEY_PARENT;
        let inner = &self.inner;
        let root = thunk_id(&key);
        let record = inner.world.record(&root)?;
        if let Some(record) = &record {
            if let Some(outcome) = inner.unchanged(record) {
                return Ok(outcome);
            }
        }
        let outcome = inner.resolve_root(root, key.clone(), record.as_ref());
        let first = inner.finish(root, outcome, record)?;
        let outsiders = inner.outsiders.swap(false, Ordering::Relaxed);
        if (first.removed.is_empty() && !outsiders)
            || first.interrupted
            || inner.options.mode == Mode::DryRun
        {
            return Ok(first);
        }
        // Deleting the outputs of stale thunks may have changed what a thunk of this build
        // read (a directory listing, `cc *.o`), and so may a thunk made on demand that is not
        // part of the build after all (what it made was read): decide once more.
        inner.reset();
        let record = inner.world.record(&root)?;
        let outcome = inner.resolve_root(root, key, record.as_ref());
        let mut second = inner.finish(root, outcome, record)?;
        let ran_first: HashMap<ThunkId, Resolved> = first
            .thunks
            .into_iter()
            .filter(|t| t.ran || t.state == State::Stale)
            .map(|t| (t.id, t))
            .collect();
        for thunk in &mut second.thunks {
            if !thunk.ran {
                if let Some(earlier) = ran_first.get(&thunk.id) {
                    *thunk = earlier.clone();
                }
            }
        }
        let listed: HashSet<ThunkId> = second.thunks.iter().map(|t| t.id).collect();
        second.thunks.extend(
            ran_first
                .into_values()
                .filter(|t| t.state == State::Stale && !listed.contains(&t.id)),
        );
        second.removed.extend(first.removed);
        second.restored.extend(first.restored);
        second.would_run |= first.would_run;
        Ok(second)
    }
}

impl<W: World> Inner<W> {
    /// Resolves the root with what the last build produced known, and waits for everything
    /// resolved on demand.
    fn resolve_root(
        self: &Arc<Self>,
        root: ThunkId,
        key: ThunkKey,
        record: Option<&BuildRecord>,
    ) -> ChildOutcome {
        if let Some(record) = record {
            self.load_products(record);
        }
        let outcome = self.resolve_known(
            root,
            key,
            None,
            Asked {
                parent: None,
                materialize: false,
                skip_if_new: false,
                on_demand: false,
            },
        );
        loop {
            let threads = std::mem::take(&mut *self.on_demand_threads.lock());
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
        outcome
    }

    /// Loads the last build's thunks (their keys and traces are kept for their resolution,
    /// within [`PRELOAD_INPUTS`]) and what each produced. A path several thunks wrote is a product only when
    /// they all ran the same command (one run reused by several parents); a file edited in
    /// place by successive steps is not waited for.
    fn load_products(&self, record: &BuildRecord) {
        let threads = self.options.jobs.clamp(2, 8);
        let part = record.thunks.len().div_ceil(threads).max(1);
        let budget = std::sync::atomic::AtomicUsize::new(self.preload_inputs);
        let budget = &budget;
        let loaded: Vec<(&BuildThunk, Known, bool)> = std::thread::scope(|scope| {
            let parts: Vec<_> = record
                .thunks
                .chunks(part)
                .map(|thunks| {
                    scope.spawn(move || {
                        thunks
                            .iter()
                            .filter_map(|t| {
                                let (key, mut traces) = self.world.thunk(&t.id).ok()??;
                                let size: usize = traces.iter().map(|(_, t)| t.inputs.len()).sum();
                                let kept = budget
                                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                                        left.checked_sub(size)
                                    })
                                    .is_ok();
                                if !kept {
                                    traces.retain(|(id, _)| *id == t.trace);
                                }
                                Some((t, (key, traces), kept))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|part| part.join().unwrap_or_default())
                .collect()
        });
        let mut products = Products::default();
        let mut writers: HashMap<&StorePath, Vec<ThunkId>> = HashMap::new();
        for (thunk, (key, traces), _) in &loaded {
            if let Some((_, trace)) = traces.iter().find(|(id, _)| *id == thunk.trace) {
                // Files and links, not directories: a directory is made by whichever step gets
                // there first (libtool's `.libs`), and waiting for the one that did last time
                // can mean waiting for a later pass of the build that waits for this thunk.
                for output in &trace.outputs {
                    if !matches!(output.state, OutputState::Deleted | OutputState::Dir { .. }) {
                        writers.entry(&output.path).or_default().push(thunk.id);
                    }
                }
            }
            products.thunks.insert(
                thunk.id,
                Recorded {
                    parent: thunk.parent,
                    key: key.clone(),
                    shape: shape_of(key),
                },
            );
        }
        for (path, ids) in writers {
            let shape = |id: &ThunkId| products.thunks.get(id).map(|r| r.shape);
            if ids.iter().any(|id| shape(id) != shape(&ids[0])) {
                continue;
            }
            // The one requested by a parent rather than made for a make rule.
            let under_rule = |id: &ThunkId| {
                let mut at = Some(*id);
                for _ in 0..MAX_DEPTH {
                    match at.and_then(|a| products.thunks.get(&a)) {
                        Some(r) if is_rule_thunk(&r.key) => return true,
                        Some(r) => at = r.parent,
                        None => return false,
                    }
                }
                false
            };
            let producer = ids.iter().find(|id| !under_rule(id)).unwrap_or(&ids[0]);
            products.by_path.insert(path.clone(), *producer);
        }
        let mut shared = self.shared.lock();
        shared.products = Arc::new(products);
        // (A thunk whose last trace is gone from the store is loaded whole when resolved.)
        shared.preloaded = loaded
            .into_iter()
            .filter(|(_, (_, traces), complete)| *complete || !traces.is_empty())
            .map(|(thunk, known, complete)| (thunk.id, (known, complete)))
            .collect();
    }

    /// A thunk's key and traces, and whether those are all its traces (see
    /// [`Shared::preloaded`]).
    fn known(&self, id: &ThunkId) -> anyhow::Result<Option<(Known, bool)>> {
        if let Some(loaded) = self.shared.lock().preloaded.remove(id) {
            return Ok(Some(loaded));
        }
        Ok(self.world.thunk(id)?.map(|known| (known, true)))
    }

    /// Forgets everything decided, for another pass over the build.
    fn reset(&self) {
        *self.shared.lock() = Shared::default();
        self.stopping.store(false, Ordering::Relaxed);
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The fast path: when the last build succeeded and no path it read or wrote changed
    /// since (by `lstat`), nothing can run and no trace is loaded.
    fn unchanged(&self, record: &BuildRecord) -> Option<Outcome> {
        let options = &self.options;
        if record.exit_code != 0
            || options.rebuild.is_some()
            || options.mode == Mode::Touch
            || !options.want.is_empty()
        {
            return None;
        }
        if let Some(path) = self.world.changed(&record.snapshot) {
            self.shared.lock().first_change = Some(path);
            return None;
        }
        // Listing the thunks needs their keys: loaded only when asked for (reports).
        let mut thunks = Vec::new();
        if options.detail {
            let damaged: HashSet<&StorePath> = record.damaged.iter().collect();
            for thunk in &record.thunks {
                let Ok(Some((key, traces))) = self.world.thunk(&thunk.id) else {
                    continue;
                };
                let trace = traces
                    .into_iter()
                    .find(|(id, _)| *id == thunk.trace)
                    .map(|(_, t)| Arc::new(t));
                let is_damaged = trace
                    .as_ref()
                    .is_some_and(|t| t.outputs.iter().any(|o| damaged.contains(&o.path)));
                thunks.push(Resolved {
                    id: thunk.id,
                    parent: thunk.parent,
                    key,
                    state: if is_damaged {
                        State::Damaged
                    } else {
                        State::Clean
                    },
                    reason: "no input changed since the last build".into(),
                    ran: false,
                    exit_code: 0,
                    started: Duration::ZERO,
                    duration: Duration::ZERO,
                    trace,
                    message: None,
                    delivered: false,
                });
            }
        }
        Some(Outcome {
            exit_code: 0,
            interrupted: false,
            thunks,
            damaged: record.damaged.clone(),
            restored: Vec::new(),
            removed: Vec::new(),
            unchanged: true,
            would_run: false,
            first_change: None,
        })
    }

    fn matches(globs: &Option<GlobSet>, key: &ThunkKey) -> bool {
        globs.as_ref().is_some_and(|set| {
            set.is_match(command_of(key)) || target_of(key).is_some_and(|t| set.is_match(t))
        })
    }

    /// Decides a thunk from its traces (most recently used first).
    /// A valid trace is taken out of `traces` (no copy on the path of every reused thunk).
    fn decide(
        self: &Arc<Self>,
        id: ThunkId,
        key: &ThunkKey,
        traces: &mut Vec<(TraceId, Trace)>,
    ) -> Decision {
        let mut first_reason = None;
        for (index, (trace_id, trace)) in traces.iter().enumerate() {
            let reason = if trace.exit_code != 0 && !self.shared.lock().fresh.contains(trace_id) {
                Some(format!(
                    "the last run failed (exit status {})",
                    trace.exit_code
                ))
            } else {
                self.invalid_input(id, key, trace)
            };
            match reason {
                None => {
                    let (trace_id, trace) = traces.swap_remove(index);
                    return Decision::Valid(trace_id, Arc::new(trace));
                }
                Some(reason) => {
                    first_reason.get_or_insert(reason);
                }
            }
        }
        Decision::Run(first_reason.unwrap_or_else(|| "new".into()))
    }

    /// The same command (working directory, environment, make target), requested by another
    /// parent, ran earlier in this build and its trace holds: its result is this thunk's too
    /// (a make that runs a directory's make twice, as automake's and libffi's do). When that
    /// command is running now (made on demand), it is waited for first.
    fn same_command_ran(self: &Arc<Self>, id: ThunkId, key: &ThunkKey) -> Option<Decision> {
        let shape = shape_of(key);
        self.wait_for_same_command(id, shape);
        let (trace_id, trace) = self.shared.lock().ran_shapes.get(&shape).cloned()?;
        self.invalid_input(id, key, &trace)
            .is_none()
            .then_some(Decision::Valid(trace_id, trace))
    }

    /// Waits while a thunk with this shape runs (unless that would close a cycle of waits).
    fn wait_for_same_command(&self, id: ThunkId, shape: ThunkId) {
        let mut shared = self.shared.lock();
        let Some(&other) = shared.running_shapes.get(&shape) else {
            return;
        };
        if other == id {
            return;
        }
        let Ok(wait) = self.add_wait(&mut shared, id, other, Why::Same) else {
            return;
        };
        while shared.running_shapes.get(&shape) == Some(&other)
            && shared.waits.get(&wait).is_some_and(|w| w.broken.is_none())
        {
            self.settled.wait(&mut shared);
        }
        shared.waits.remove(&wait);
    }

    /// The first input of `trace` that no longer holds, described, for the thunk `id` being
    /// decided. A path another thunk of the build produces is checked once that thunk is
    /// done in this build.
    fn invalid_input(
        self: &Arc<Self>,
        id: ThunkId,
        key: &ThunkKey,
        trace: &Trace,
    ) -> Option<String> {
        let products = Arc::clone(&self.shared.lock().products);
        for input in &trace.inputs {
            // A path the thunk itself writes: a lookup of it is no input, and finding it as
            // the thunk left it (its own earlier run in this build, before its requester
            // restarted) is no change.
            let (own, probe) = crate::engine::memo::own_output(input, trace);
            if probe {
                continue;
            }
            // A decision waits for the last build's producers only (not for make's rules).
            if own.is_none() && products.by_path.contains_key(&input.path) {
                // Only a lookup waits for a cycle to be broken; a decision goes on.
                let _ = self.await_path(id, key, &input.path, false, &|| ());
            }
            let known = {
                let shared = self.shared.lock();
                if let Some(writer) = shared.unknown.get(&input.path) {
                    return Some(format!(
                        "{} would be rebuilt (by `{writer}`)",
                        display_path(&input.path),
                    ));
                }
                shared.keystate.get(&input.path).and_then(|(state, _)| {
                    if own == Some(state) {
                        Some(true)
                    } else {
                        observed_holds(&input.observed, state)
                    }
                })
            };
            match known {
                Some(true) => {}
                Some(false) => {
                    return Some(format!(
                        "{} changed (rebuilt in this build)",
                        display_path(&input.path)
                    ))
                }
                None => {
                    if let Some(change) = self.world.check(input, trace) {
                        return Some(change);
                    }
                }
            }
        }
        None
    }

    /// Adds "`from` waits for `to`" to the wait-for graph, unless that closes a cycle. Then
    /// the cycle is described, and broken: a decision does not wait (it decides from the
    /// file system); otherwise every lookup waiting on the cycle is refused with the message,
    /// and so is this wait if it is a lookup too (the thunks looking up fail), while a thunk
    /// waiting for the same command, or for its child, goes on waiting, now that the cycle is
    /// broken.
    fn add_wait(
        &self,
        shared: &mut Shared,
        from: ThunkId,
        to: ThunkId,
        why: Why,
    ) -> Result<u64, String> {
        if let Some(chain) = shared.chain_of_waits(to, from) {
            let mut steps = vec![shared.describe_wait(&to, &why)];
            for edge in &chain {
                let wait = &shared.waits[edge];
                steps.push(shared.describe_wait(&wait.to, &wait.why));
            }
            let message = format!(
                "a cycle of waits: `{}` {}, which is where it started",
                shared.command(&from),
                steps.join(", which ")
            );
            if matches!(why, Why::Path { lookup: false, .. }) {
                return Err(message);
            }
            let mut broken = 0;
            for edge in &chain {
                let wait = shared.waits.get_mut(edge).expect("on the chain");
                let lookup = matches!(wait.why, Why::Path { lookup: true, .. });
                if lookup || (why == Why::Child && wait.why.breakable()) {
                    wait.broken = Some(message.clone());
                    broken += 1;
                }
            }
            self.settled.notify_all();
            if matches!(why, Why::Path { .. }) || (why == Why::Same && broken == 0) {
                return Err(message);
            }
        }
        let id = shared.next_wait;
        shared.next_wait += 1;
        shared.waits.insert(
            id,
            Wait {
                from,
                to,
                why,
                broken: None,
            },
        );
        Ok(id)
    }

    /// Waits until what makes `path` for `waiter` (see [`Shared::producer_for`]) is done in
    /// this build, resolving it now if nobody asked for it yet: for a running thunk's first
    /// lookup of `path` (`lookup`), then put on disk as this build left it, or for the decision
    /// of a thunk against its recorded read of `path`. An error names the cycle that waiting
    /// would close (a decision then simply does not wait), or, for a lookup, the maker that
    /// failed in this build. `before_waiting` is called once before it blocks.
    fn await_path(
        self: &Arc<Self>,
        waiter: ThunkId,
        key: &ThunkKey,
        path: &StorePath,
        lookup: bool,
        before_waiting: &dyn Fn(),
    ) -> Result<(), String> {
        let mut shared = self.shared.lock();
        if shared.products.by_path.is_empty() && shared.rules.is_empty() {
            return Ok(());
        }
        let Some(Maker {
            producer,
            target,
            start,
        }) = shared.producer_for(&waiter, key, path, lookup)
        else {
            return Ok(());
        };
        let done = shared.resolved.contains_key(&target) && !shared.in_flight.contains_key(&target);
        if !done {
            let why = Why::Path {
                path: path.clone(),
                lookup,
            };
            let wait = self.add_wait(&mut shared, waiter, target, why)?;
            if let Some((target_key, parent)) = start {
                if !shared.in_flight.contains_key(&target) {
                    self.start_on_demand(&mut shared, target, target_key, parent);
                }
            }
            let mut told = false;
            let broken = loop {
                if let Some(message) = shared.waits.get(&wait).and_then(|w| w.broken.clone()) {
                    break Some(message);
                }
                if !shared.in_flight.contains_key(&target) {
                    break None;
                }
                if !told {
                    // Not under the lock (it may wait for a job slot); then look again.
                    told = true;
                    parking_lot::MutexGuard::unlocked(&mut shared, before_waiting);
                    continue;
                }
                self.settled.wait(&mut shared);
            };
            shared.waits.remove(&wait);
            if let Some(message) = broken {
                return Err(message);
            }
        }
        // A maker that failed in this build left nothing to read (the file on disk, if any,
        // is the last build's).
        if let Some(failed) = shared.resolved.get(&producer).filter(|r| r.exit_code != 0) {
            if lookup && !shared.keystate.contains_key(path) {
                return Err(format!(
                    "its maker `{}` failed (exit status {})",
                    shared.command(&failed.id),
                    failed.exit_code
                ));
            }
        }
        let state = shared.keystate.get(path).map(|(state, _)| state.clone());
        drop(shared);
        if let (true, Mode::Build, Some(state)) = (lookup, self.options.mode, state) {
            self.put_back(path, &state);
        }
        Ok(())
    }

    /// Resolves a thunk of the last build nobody requested yet, for a thunk that wants what
    /// it made, on a thread of its own (its waiters may give up waiting).
    fn start_on_demand(
        self: &Arc<Self>,
        shared: &mut Shared,
        id: ThunkId,
        key: ThunkKey,
        parent: ThunkId,
    ) {
        let asked = Asked {
            parent: Some(parent),
            materialize: true,
            skip_if_new: false,
            on_demand: true,
        };
        shared.claim(id, &key, &asked);
        let me = self.clone();
        let thread = std::thread::spawn(move || {
            me.resolve_claimed(id, key, None, asked);
            me.release(id);
        });
        self.on_demand_threads.lock().push(thread);
    }

    /// Resolves one thunk: reuse, replay or run it.
    fn resolve(self: &Arc<Self>, id: ThunkId, key: ThunkKey, asked: Asked) -> ChildOutcome {
        self.resolve_known(id, key, None, asked)
    }

    /// [`Inner::resolve`] with the thunk's traces when they are loaded already. A thunk being
    /// resolved already (on demand) is waited for, then decided again (its fresh trace holds).
    fn resolve_known(
        self: &Arc<Self>,
        id: ThunkId,
        key: ThunkKey,
        traces: Option<Loaded>,
        asked: Asked,
    ) -> ChildOutcome {
        {
            let mut shared = self.shared.lock();
            while shared.in_flight.contains_key(&id) {
                self.settled.wait(&mut shared);
            }
            shared.claim(id, &key, &asked);
        }
        let outcome = self.resolve_claimed(id, key, traces, asked);
        self.release(id);
        outcome
    }

    /// The resolution of a thunk is over.
    fn release(&self, id: ThunkId) {
        self.shared.lock().in_flight.remove(&id);
        self.settled.notify_all();
    }

    /// [`Inner::resolve_known`] of a thunk claimed by this thread.
    fn resolve_claimed(
        self: &Arc<Self>,
        id: ThunkId,
        key: ThunkKey,
        traces: Option<Loaded>,
        asked: Asked,
    ) -> ChildOutcome {
        let Asked {
            parent,
            materialize,
            skip_if_new,
            on_demand,
        } = asked;
        let started = self.elapsed();
        let (mut traces, complete) = match traces {
            Some(loaded) => loaded,
            None => match self.known(&id) {
                Ok(Some(((_, traces), complete))) => (traces, complete),
                Ok(None) => (Vec::new(), true),
                Err(e) => return self.failed(id, key, parent, started, format!("{e:#}")),
            },
        };
        let skip = Self::matches(&self.options.skip, &key);
        let forced = Self::matches(&self.options.rebuild, &key) && !skip;
        if skip_if_new && traces.is_empty() && !forced {
            self.finish_thunk(Resolved {
                id,
                parent,
                key,
                state: State::Skipped,
                reason: "never ran under cot, and up to date by its requester's rules (make: \
                         the target is newer than its prerequisites)"
                    .into(),
                ran: false,
                exit_code: 0,
                started,
                duration: Duration::ZERO,
                trace: None,
                message: None,
                delivered: false,
            });
            return skipped_outcome(id);
        }
        if !complete && (forced || skip || self.options.mode == Mode::Touch) {
            match self.world.thunk(&id) {
                Ok(found) => traces = found.map(|(_, traces)| traces).unwrap_or_default(),
                Err(e) => return self.failed(id, key, parent, started, format!("{e:#}")),
            }
        }
        let decision = if forced {
            Decision::Run("forced (--rebuild)".into())
        } else {
            let mut decision = self.decide(id, &key, &mut traces);
            if let (false, Decision::Run(reason)) = (complete, &decision) {
                // The last build's trace no longer holds: another one may.
                let reason = reason.clone();
                match self.world.thunk(&id) {
                    Ok(found) => traces = found.map(|(_, traces)| traces).unwrap_or_default(),
                    Err(e) => return self.failed(id, key, parent, started, format!("{e:#}")),
                }
                decision = match self.decide(id, &key, &mut traces) {
                    Decision::Run(_) => Decision::Run(reason),
                    valid => valid,
                };
            }
            match decision {
                Decision::Run(reason) => match self.same_command_ran(id, &key) {
                    // Recorded for this thunk too, so that its requester's replay finds it.
                    Some(Decision::Valid(_, trace)) => match self.world.adopt(&key, &trace) {
                        Ok(trace_id) => Decision::Valid(trace_id, trace),
                        Err(_) => Decision::Run(reason),
                    },
                    // None of its own traces holds: a cache may have one that does.
                    _ if !skip && self.options.mode == Mode::Build => {
                        match self.from_caches(id, &key, &traces) {
                            Ok(valid) => valid,
                            Err(Some(why)) => Decision::Run(format!("{reason}; {why}")),
                            Err(None) => Decision::Run(reason),
                        }
                    }
                    _ => Decision::Run(reason),
                },
                valid => valid,
            }
        };
        match decision {
            Decision::Valid(trace_id, trace) => {
                self.replay(id, key, parent, trace_id, trace, materialize, started)
            }
            Decision::Run(reason) => {
                let latest = traces.first().map(|(tid, t)| (*tid, Arc::new(t.clone())));
                if skip {
                    if let Some((trace_id, trace)) = latest {
                        let reason = format!("skipped (--skip); would run: {reason}");
                        return self.accept(id, key, parent, trace_id, trace, started, reason);
                    }
                    return self.not_run(id, key, parent, started, "skipped (--skip), never ran");
                }
                match self.options.mode {
                    Mode::DryRun => self.simulate(id, key, parent, latest, reason, started),
                    Mode::Touch if latest.is_some() => {
                        let (_, trace) = latest.expect("checked");
                        match self.world.touch(&key, &trace) {
                            Ok(trace_id) => {
                                self.shared.lock().fresh.insert(trace_id);
                                let reason = format!("touched (--touch); would run: {reason}");
                                self.accept(id, key, parent, trace_id, trace, started, reason)
                            }
                            Err(e) => self.failed(id, key, parent, started, format!("{e:#}")),
                        }
                    }
                    _ => {
                        let state = if traces.is_empty() {
                            State::New
                        } else {
                            State::Dirty
                        };
                        // Made on demand, its output reaches its parent when that asks for
                        // it, if that parent is running; else (and for a make rule's
                        // thunk, which nobody asks for) it is printed.
                        let delivered = if on_demand {
                            !is_rule_thunk(&key)
                                && parent.is_some_and(|p| self.shared.lock().running.contains(&p))
                        } else {
                            materialize || parent.is_none()
                        };
                        self.execute(id, key, parent, latest, state, reason, started, delivered)
                    }
                }
            }
        }
    }

    /// The first trace of a cache beyond the project's store (tier by tier) that holds for a
    /// thunk none of whose own traces (`local`) does, made the project's own; else why the
    /// first cache that had one did not do (`None`: no cache knows the thunk).
    fn from_caches(
        self: &Arc<Self>,
        id: ThunkId,
        key: &ThunkKey,
        local: &[(TraceId, Trace)],
    ) -> Result<Decision, Option<String>> {
        let mut why = None;
        for tier in 0..self.world.cache_tiers() {
            let Some((_, found)) = self.world.cached(&id, tier) else {
                continue;
            };
            let mut found: Vec<(TraceId, Trace)> = found
                .into_iter()
                .filter(|(trace_id, _)| !local.iter().any(|(own, _)| own == trace_id))
                .collect();
            // A valid trace whose contents cannot be had is dropped; the next one may do.
            loop {
                match self.decide(id, key, &mut found) {
                    Decision::Valid(_, trace) => {
                        if let Ok(trace_id) = self.world.adopt_cached(&id, key, tier, &trace) {
                            let name = self.world.cache_name(tier);
                            self.shared.lock().from_cache.insert(trace_id, name);
                            return Ok(Decision::Valid(trace_id, trace));
                        }
                        why.get_or_insert_with(|| {
                            format!(
                                "the contents of {}'s trace could not be had",
                                self.world.cache_name(tier)
                            )
                        });
                    }
                    Decision::Run(reason) => {
                        if reason != "new" {
                            why.get_or_insert_with(|| {
                                format!("{}'s trace: {reason}", self.world.cache_name(tier))
                            });
                        }
                        break;
                    }
                }
            }
        }
        Err(why)
    }

    /// Loads a recorded child and resolves it, for its replayed parent.
    fn resolve_id(
        self: &Arc<Self>,
        call: &ChildCall,
        parent: ThunkId,
        materialize: bool,
    ) -> Option<ChildOutcome> {
        let id = call.id;
        let (key, traces) = match self.known(&id) {
            Ok(Some(((key, traces), complete))) => (key, (traces, complete)),
            // Skipped when it was requested (and so never recorded): skipped again.
            Ok(None) if call.skip_if_new => return Some(skipped_outcome(id)),
            // A parent taken from a cache: its children are found there too (its key now,
            // a trace when it is decided).
            Ok(None) if self.options.mode == Mode::Build => {
                let key = (0..self.world.cache_tiers())
                    .find_map(|tier| self.world.cached(&id, tier))
                    .map(|(key, _)| key)?;
                (key, (Vec::new(), true))
            }
            _ => return None,
        };
        let wait = {
            let mut shared = self.shared.lock();
            self.add_wait(&mut shared, parent, id, Why::Child).ok()
        };
        let outcome = self.resolve_known(
            id,
            key,
            Some(traces),
            Asked::by(parent, materialize, call.skip_if_new),
        );
        if let Some(wait) = wait {
            self.shared.lock().waits.remove(&wait);
        }
        Some(outcome)
    }

    /// A thunk with a valid trace: its writes enter the keystate, its children are replayed.
    #[allow(clippy::too_many_arguments)]
    fn replay(
        self: &Arc<Self>,
        id: ThunkId,
        key: ThunkKey,
        parent: Option<ThunkId>,
        trace_id: TraceId,
        trace: Arc<Trace>,
        materialize: bool,
        started: Duration,
    ) -> ChildOutcome {
        // A result taken from a cache arrives in this checkout now, as if it had run here:
        // its outputs are put on disk, not left for whoever needs them.
        let materialize = materialize || self.shared.lock().from_cache.contains_key(&trace_id);
        self.apply(id, &trace);
        let mut writes: BTreeMap<StorePath, OutputState> = own_writes(&trace);
        if !trace.children.is_empty() {
            let results = self.replay_children(id, &trace, materialize);
            if self.stopping() {
                return self.not_run(id, key, parent, started, "not finished: the build stops");
            }
            let mut restart = None;
            for (call, result) in trace.children.iter().zip(&results) {
                match result {
                    None => {
                        restart.get_or_insert_with(|| {
                            format!(
                                "child {} is no longer in the store",
                                crate::store::hex(&call.id[..4])
                            )
                        });
                    }
                    Some(outcome) => {
                        for (path, state) in &outcome.writes {
                            writes.insert(path.clone(), state.clone());
                        }
                        if outcome.exit_code != call.exit_code {
                            restart.get_or_insert_with(|| {
                                format!(
                                    "a child now exits {} (was {})",
                                    outcome.exit_code, call.exit_code
                                )
                            });
                        } else if outcome.stdout != call.stdout || outcome.stderr != call.stderr {
                            restart.get_or_insert_with(|| "a child's output changed".into());
                        }
                    }
                }
            }
            if restart.is_none() {
                restart = self.invalid_internal(&trace);
            }
            if let Some(reason) = restart {
                if self.options.mode == Mode::DryRun {
                    return self.simulate(
                        id,
                        key,
                        parent,
                        Some((trace_id, trace)),
                        reason,
                        started,
                    );
                }
                return self.execute(
                    id,
                    key,
                    parent,
                    Some((trace_id, trace)),
                    State::Dirty,
                    format!("restarted: {reason}"),
                    started,
                    materialize || parent.is_none(),
                );
            }
        }
        if materialize {
            self.materialize(&trace);
        } else {
            // A path that a thunk run in this build changed on disk is put back as this
            // thunk left it (`rm -f lib.a` ran again; the `ar` after it is reused).
            let touched: Vec<&Output> = {
                let shared = self.shared.lock();
                trace
                    .outputs
                    .iter()
                    .filter(|o| shared.touched.contains(&o.path))
                    .collect()
            };
            for output in touched {
                self.put_back(&output.path, &output.state);
            }
        }
        let reason = match self.shared.lock().from_cache.get(&trace_id) {
            Some(cache) => format!(
                "valid trace from {cache}: {} inputs unchanged",
                trace.inputs.len()
            ),
            None => format!("valid trace: {} inputs unchanged", trace.inputs.len()),
        };
        let outcome = recorded_outcome(id, &trace, writes, None);
        self.finish_thunk(Resolved {
            id,
            parent,
            key,
            state: if trace.exit_code == 0 {
                State::Clean
            } else {
                State::Failed
            },
            reason,
            ran: false,
            exit_code: trace.exit_code,
            started,
            duration: self.elapsed().saturating_sub(started),
            trace: Some(trace),
            message: None,
            delivered: false,
        });
        outcome
    }

    /// Replays the recorded child requests in their recorded order: a child starts when the
    /// children whose results the thunk had received before requesting it are done; children
    /// requested together run in parallel.
    fn replay_children(
        self: &Arc<Self>,
        parent: ThunkId,
        trace: &Trace,
        materialize: bool,
    ) -> Vec<Option<ChildOutcome>> {
        let count = trace.children.len();
        let mut pending: Vec<Option<Future<Option<ChildOutcome>>>> =
            (0..count).map(|_| None).collect();
        let mut results: Vec<Option<ChildOutcome>> = vec![None; count];
        // A child that now fails where it succeeded means the requester must run again, and
        // would have stopped there: nothing more is started (unless --keep-going).
        let newly_failed = |i: usize, result: &Option<ChildOutcome>| {
            !self.options.keep_going
                && result.as_ref().is_some_and(|r| {
                    r.exit_code != 0 && trace.children.get(i).is_some_and(|c| c.exit_code == 0)
                })
        };
        let mut failed = false;
        // Threads for children requested together, but not more than this many at once (a
        // replay of make -j8 over ten thousand recipes is not ten thousand threads).
        let most = self.options.jobs.max(1) * 4;
        let mut in_flight: std::collections::VecDeque<usize> = Default::default();
        for (pos, event) in trace.events.iter().enumerate() {
            match *event {
                SyncEvent::Start(_) if self.stopping() || failed => break,
                SyncEvent::Start(i) => {
                    let i = i as usize;
                    let Some(call) = trace.children.get(i) else {
                        continue;
                    };
                    // Requested and waited for before anything else: no thread needed.
                    if trace.events.get(pos + 1) == Some(&SyncEvent::End(i as u32)) {
                        results[i] = self.resolve_id(call, parent, materialize);
                        failed |= newly_failed(i, &results[i]);
                    } else {
                        while in_flight.len() >= most {
                            let oldest = in_flight.pop_front().expect("not empty");
                            if let Some(future) = pending[oldest].take() {
                                results[oldest] = future.wait();
                                failed |= newly_failed(oldest, &results[oldest]);
                            }
                        }
                        let me = self.clone();
                        let call = call.clone();
                        pending[i] = Some(Future::spawn(move || {
                            me.resolve_id(&call, parent, materialize)
                        }));
                        in_flight.push_back(i);
                    }
                }
                SyncEvent::End(i) => {
                    let i = i as usize;
                    if let Some(future) = pending.get_mut(i).and_then(Option::take) {
                        results[i] = future.wait();
                        failed |= newly_failed(i, &results[i]);
                    }
                }
            }
        }
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(future) = slot.take() {
                results[i] = future.wait();
            }
        }
        results
    }

    /// The first read of a path the thunk's children wrote that would now read differently.
    /// A `stat` counts only by type: make looks at its targets' times and sizes but, asked to
    /// consider every target, does the same whatever they are.
    fn invalid_internal(&self, trace: &Trace) -> Option<String> {
        let shared = self.shared.lock();
        for input in &trace.internal {
            let Some((state, _)) = shared.keystate.get(&input.path) else {
                continue;
            };
            let holds = match &input.observed {
                Observed::Meta { kind, .. } => Some(kind_of(state) == Some(*kind)),
                observed => observed_holds(observed, state),
            };
            if holds == Some(false) {
                return Some(format!(
                    "{}, which it read, is now different",
                    display_path(&input.path)
                ));
            }
        }
        None
    }

    /// Enters a trace's outputs into the keystate.
    fn apply(&self, id: ThunkId, trace: &Trace) {
        let mut shared = self.shared.lock();
        for output in &trace.outputs {
            shared.unknown.remove(&output.path);
            shared
                .keystate
                .insert(output.path.clone(), (output.state.clone(), id));
        }
    }

    /// Puts a trace's outputs on disk where they differ.
    fn materialize(&self, trace: &Trace) {
        for output in &trace.outputs {
            self.put_back(&output.path, &output.state);
        }
    }

    /// Puts `state` at `path` on disk unless it is there already; a failure is reported and
    /// left to whoever reads the path.
    fn put_back(&self, path: &StorePath, state: &OutputState) {
        if self.world.holds(path, state) {
            return;
        }
        match self.world.restore(path, state) {
            Ok(()) => {
                let mut shared = self.shared.lock();
                shared.touched.insert(path.clone());
                shared.restored.push(path.clone());
            }
            Err(e) => eprintln!("cot: {e:#}"),
        }
    }

    /// Before a thunk runs: the paths it read last time that this build wrote are put on disk
    /// as the keystate says (a damaged output, or an intermediate version of a path written
    /// more than once).
    fn prepare_inputs(&self, trace: &Trace) {
        let wanted: Vec<(StorePath, OutputState)> = {
            let shared = self.shared.lock();
            trace
                .inputs
                .iter()
                .chain(&trace.internal)
                .filter_map(|input| {
                    shared
                        .keystate
                        .get(&input.path)
                        .map(|(state, _)| (input.path.clone(), state.clone()))
                })
                .collect()
        };
        for (path, state) in wanted {
            self.put_back(&path, &state);
        }
    }

    /// Runs a thunk.
    #[allow(clippy::too_many_arguments)]
    fn execute(
        self: &Arc<Self>,
        id: ThunkId,
        key: ThunkKey,
        parent: Option<ThunkId>,
        latest: Option<(TraceId, Arc<Trace>)>,
        state: State,
        reason: String,
        started: Duration,
        delivered: bool,
    ) -> ChildOutcome {
        if self.stopping() {
            return self.not_run(id, key, parent, started, "not run: the build stops");
        }
        if let Some((_, trace)) = &latest {
            self.prepare_inputs(trace);
        }
        self.slots.acquire();
        if self.stopping() {
            self.slots.release();
            return self.not_run(id, key, parent, started, "not run: the build stops");
        }
        let shape = shape_of(&key);
        {
            let mut shared = self.shared.lock();
            shared.would_run = true;
            shared.running.insert(id);
            shared.running_shapes.insert(shape, id);
        }
        let run_started = self.elapsed();
        self.world.started(&key);
        let requests = Running {
            build: self.clone(),
            id,
            key: key.clone(),
            // The root's children are named as children of the build, not of its command
            // line: `cot make` and `cot make check` share their recipes' thunks.
            name: if parent.is_none() { BUILD_CHILDREN } else { id },
            occurrences: Mutex::new(HashMap::new()),
            waiting: Mutex::new(0),
            refused: Mutex::new(Vec::new()),
        };
        let executed = self.world.execute(&id, &key, &requests);
        self.slots.release();
        let refused = std::mem::take(&mut *requests.refused.lock());
        let not_running = |shared: &mut Shared| {
            shared.running.remove(&id);
            if shared.running_shapes.get(&shape) == Some(&id) {
                shared.running_shapes.remove(&shape);
            }
        };
        let mut executed = match executed {
            Ok(executed) => executed,
            Err(e) => {
                not_running(&mut self.shared.lock());
                self.settled.notify_all();
                self.stopping.store(true, Ordering::Relaxed);
                return self.failed(id, key, parent, started, format!("{e:#}"));
            }
        };
        if !refused.is_empty() {
            // What it could not look up is why it failed.
            let mut said = refused.join("\n");
            if let Some(message) = executed.message.take() {
                said = format!("{message}\n{said}");
            }
            executed.message = Some(said);
        }
        if executed.interrupted {
            self.interrupted.store(true, Ordering::Relaxed);
            self.stopping.store(true, Ordering::Relaxed);
        }
        let trace = Arc::new(executed.trace);
        {
            let mut shared = self.shared.lock();
            shared.fresh.insert(executed.trace_id);
            if trace.exit_code == 0 && !executed.interrupted {
                shared
                    .ran_shapes
                    .insert(shape, (executed.trace_id, trace.clone()));
            }
            not_running(&mut shared);
        }
        self.settled.notify_all();
        // A failure is its requester's to handle (make stops, `if cot run ...` goes on); a
        // replayed requester is run again when a child now fails (see `replay`).
        let failed = trace.exit_code != 0;
        self.apply(id, &trace);
        self.shared
            .lock()
            .touched
            .extend(trace.outputs.iter().map(|o| o.path.clone()));
        let mut writes = own_writes(&trace);
        // The children resolved while it ran wrote too.
        {
            let shared = self.shared.lock();
            for call in &trace.children {
                collect_writes(&shared, call.id, &mut writes);
            }
        }
        let outcome = recorded_outcome(id, &trace, writes, executed.message.clone());
        self.finish_thunk(Resolved {
            id,
            parent,
            key,
            state: if executed.interrupted {
                State::Skipped
            } else if failed {
                State::Failed
            } else {
                state
            },
            reason: if executed.interrupted {
                format!("interrupted while running ({reason})")
            } else {
                reason
            },
            ran: true,
            exit_code: trace.exit_code,
            started: run_started,
            duration: self.elapsed().saturating_sub(run_started),
            trace: Some(trace),
            message: executed.message,
            delivered,
        });
        outcome
    }

    /// `--dry-run`: what would run is reported, its recorded writes marked unknown, and its
    /// recorded children decided as if it requested them again.
    fn simulate(
        self: &Arc<Self>,
        id: ThunkId,
        key: ThunkKey,
        parent: Option<ThunkId>,
        latest: Option<(TraceId, Arc<Trace>)>,
        reason: String,
        started: Duration,
    ) -> ChildOutcome {
        self.shared.lock().would_run = true;
        let state = if latest.is_some() {
            State::Dirty
        } else {
            State::New
        };
        let mut outcome = ChildOutcome {
            id,
            ..ChildOutcome::default()
        };
        if let Some((_, trace)) = &latest {
            {
                let mut shared = self.shared.lock();
                let command = command_of(&key);
                for output in &trace.outputs {
                    shared.unknown.insert(output.path.clone(), command.clone());
                }
            }
            outcome.exit_code = trace.exit_code;
            outcome.stdout = trace.stdout;
            outcome.stderr = trace.stderr;
            outcome.writes = own_writes(trace);
            self.replay_children(id, trace, false);
        }
        self.finish_thunk(Resolved {
            id,
            parent,
            key,
            state,
            reason: format!("would run: {reason}"),
            ran: false,
            exit_code: outcome.exit_code,
            started,
            duration: Duration::ZERO,
            trace: latest.map(|(_, t)| t),
            message: None,
            delivered: false,
        });
        outcome
    }

    /// A trace accepted without checking (`--skip`, `--touch`): like a replay, no restart.
    #[allow(clippy::too_many_arguments)]
    fn accept(
        self: &Arc<Self>,
        id: ThunkId,
        key: ThunkKey,
        parent: Option<ThunkId>,
        _trace_id: TraceId,
        trace: Arc<Trace>,
        started: Duration,
        reason: String,
    ) -> ChildOutcome {
        self.apply(id, &trace);
        let mut writes = own_writes(&trace);
        for outcome in self
            .replay_children(id, &trace, false)
            .into_iter()
            .flatten()
        {
            writes.extend(outcome.writes);
        }
        let outcome = recorded_outcome(id, &trace, writes, None);
        self.finish_thunk(Resolved {
            id,
            parent,
            key,
            state: State::Skipped,
            reason,
            ran: false,
            exit_code: trace.exit_code,
            started,
            duration: Duration::ZERO,
            trace: Some(trace),
            message: None,
            delivered: false,
        });
        outcome
    }

    fn not_run(
        &self,
        id: ThunkId,
        key: ThunkKey,
        parent: Option<ThunkId>,
        started: Duration,
        reason: &str,
    ) -> ChildOutcome {
        self.finish_thunk(Resolved {
            id,
            parent,
            key,
            state: State::Skipped,
            reason: reason.into(),
            ran: false,
            exit_code: 1,
            started,
            duration: Duration::ZERO,
            trace: None,
            message: Some(reason.into()),
            delivered: false,
        });
        ChildOutcome {
            id,
            exit_code: 1,
            message: Some(reason.into()),
            ..ChildOutcome::default()
        }
    }

    /// cot itself failed for this thunk: the build stops.
    fn failed(
        &self,
        id: ThunkId,
        key: ThunkKey,
        parent: Option<ThunkId>,
        started: Duration,
        message: String,
    ) -> ChildOutcome {
        self.stopping.store(true, Ordering::Relaxed);
        self.finish_thunk(Resolved {
            id,
            parent,
            key,
            state: State::Failed,
            reason: format!("cot failed: {message}"),
            ran: false,
            exit_code: 125,
            started,
            duration: Duration::ZERO,
            trace: None,
            message: Some(message.clone()),
            delivered: false,
        });
        ChildOutcome {
            id,
            exit_code: 125,
            message: Some(message),
            ..ChildOutcome::default()
        }
    }

    fn finish_thunk(&self, resolved: Resolved) {
        self.world.resolved(&resolved);
        let mut shared = self.shared.lock();
        if shared.ordered.insert(resolved.id) {
            shared.order.push(resolved.id);
        }
        // A thunk that ran in this build and is then decided again (its requester restarted)
        // is reported as it ran.
        if shared
            .resolved
            .get(&resolved.id)
            .is_some_and(|earlier| earlier.ran && !resolved.ran)
        {
            return;
        }
        shared.resolved.insert(resolved.id, resolved);
    }

    /// Deletes the outputs of `trace` that `doomed` names and that are still as it left them,
    /// deepest first (a directory after its entries); what was deleted goes to `removed`.
    fn remove_outputs(
        &self,
        trace: &Trace,
        removed: &mut Vec<StorePath>,
        doomed: impl Fn(&StorePath) -> bool,
    ) {
        for output in trace.outputs.iter().rev() {
            if !doomed(&output.path)
                || output.state == OutputState::Deleted
                || !self.world.holds(&output.path, &output.state)
            {
                continue;
            }
            match self.world.remove(&output.path) {
                Ok(()) => removed.push(output.path.clone()),
                Err(e) => eprintln!("cot: {e:#}"),
            }
        }
    }

    /// After the root: damaged and wanted outputs, stale thunks, the build record.
    fn finish(
        self: &Arc<Self>,
        root: ThunkId,
        root_outcome: ChildOutcome,
        last: Option<BuildRecord>,
    ) -> anyhow::Result<Outcome> {
        let interrupted = self.interrupted.load(Ordering::Relaxed);
        let mut shared = std::mem::take(&mut *self.shared.lock());
        let dry = self.options.mode == Mode::DryRun;
        let outsiders = outsiders(&shared, root);
        // Every path some thunk of this build read: an output nobody reads is a product of the
        // build, restored when damaged; the others only when a thunk that runs needs them.
        let mut read: HashSet<&StorePath> = HashSet::new();
        for resolved in shared.resolved.values() {
            if let Some(trace) = &resolved.trace {
                // A thunk looking at its own output (a linker probing the file it replaces)
                // does not make that output an intermediate, nor does a parent looking at
                // what its children made (make checking its targets).
                let own: HashSet<&StorePath> = trace.outputs.iter().map(|o| &o.path).collect();
                read.extend(
                    trace
                        .inputs
                        .iter()
                        .map(|i| &i.path)
                        .filter(|p| !own.contains(p)),
                );
            }
        }
        let mut damaged = Vec::new();
        let mut restored = std::mem::take(&mut shared.restored);
        let mut damaged_writers: HashSet<ThunkId> = HashSet::new();
        let mut keystate: Vec<(&StorePath, &(OutputState, ThunkId))> = shared
            .keystate
            .iter()
            .filter(|(path, (_, writer))| {
                !shared.unknown.contains_key(*path) && !outsiders.contains(writer)
            })
            .collect();
        keystate.sort_by(|a, b| a.0.cmp(b.0));
        let pairs: Vec<(&StorePath, &OutputState)> = keystate
            .iter()
            .map(|(path, (state, _))| (*path, state))
            .collect();
        let holding = self.world.holds_all(&pairs);
        for ((path, (state, writer)), holds) in keystate.into_iter().zip(holding) {
            if holds {
                continue;
            }
            let wanted = !read.contains(path) || self.options.want.iter().any(|w| wants(w, path));
            if wanted && !dry && !interrupted {
                match self.world.restore(path, state) {
                    Ok(()) => {
                        restored.push(path.clone());
                        continue;
                    }
                    Err(e) => eprintln!("cot: {e:#}"),
                }
            }
            damaged.push(path.clone());
            damaged_writers.insert(*writer);
        }
        for id in &damaged_writers {
            if let Some(resolved) = shared.resolved.get_mut(id) {
                if resolved.state == State::Clean {
                    resolved.state = State::Damaged;
                }
            }
        }

        // Stale thunks: in the last build, not in this one.
        let mut stale = Vec::new();
        let mut removed = Vec::new();
        // Made on demand, then not asked for: what they made goes, unless a thunk of the build
        // wrote it after them.
        let deleting = !self.options.keep_stale && !dry && !interrupted && !self.stopping();
        if !outsiders.is_empty() && !dry && !interrupted && !self.stopping() {
            self.outsiders.store(true, Ordering::Relaxed);
        }
        for id in shared.order.iter().filter(|id| outsiders.contains(*id)) {
            let Some(resolved) = shared.resolved.get_mut(id) else {
                continue;
            };
            resolved.state = State::Stale;
            resolved.reason = if deleting {
                "made on demand, then not requested by its parent: outputs deleted".into()
            } else {
                "made on demand, then not requested by its parent".into()
            };
            let Some(trace) = resolved.trace.clone().filter(|_| deleting) else {
                continue;
            };
            self.remove_outputs(&trace, &mut removed, |path| {
                let last_writer = shared.keystate.get(path).map(|(_, w)| w);
                last_writer.is_some_and(|w| outsiders.contains(w))
            });
        }
        if let Some(last) = &last {
            for thunk in &last.thunks {
                if shared.resolved.contains_key(&thunk.id) || interrupted || self.stopping() {
                    continue;
                }
                let known = match shared.preloaded.remove(&thunk.id) {
                    Some((known, _)) => Some(known),
                    None => self.world.thunk(&thunk.id).ok().flatten(),
                };
                let Some((key, traces)) = known else {
                    continue;
                };
                let trace = traces
                    .iter()
                    .find(|(tid, _)| *tid == thunk.trace)
                    .map(|(_, t)| t.clone());
                if let Some(trace) = &trace {
                    if !self.options.keep_stale && !dry {
                        self.remove_outputs(trace, &mut removed, |path| {
                            !shared.keystate.contains_key(path)
                        });
                    }
                }
                stale.push(Resolved {
                    id: thunk.id,
                    parent: thunk.parent,
                    key,
                    state: State::Stale,
                    reason: if self.options.keep_stale {
                        "no longer requested; outputs kept (--keep-stale)".into()
                    } else {
                        "no longer requested; outputs deleted".into()
                    },
                    ran: false,
                    exit_code: 0,
                    started: Duration::ZERO,
                    duration: Duration::ZERO,
                    trace: trace.map(Arc::new),
                    message: None,
                    delivered: false,
                });
            }
        }

        let exit_code = if interrupted {
            130
        } else {
            root_outcome.exit_code
        };
        let mut thunks: Vec<Resolved> = shared
            .order
            .iter()
            .filter_map(|id| shared.resolved.remove(id))
            .collect();
        // The record: only of a real build that was not interrupted.
        if !dry && !interrupted {
            let mut paths: HashSet<StorePath> = HashSet::new();
            let mut record_thunks = Vec::new();
            for resolved in &thunks {
                let Some(trace) = &resolved.trace else {
                    continue;
                };
                if outsiders.contains(&resolved.id) && !self.options.keep_stale {
                    continue;
                }
                paths.extend(trace.inputs.iter().map(|i| i.path.clone()));
                paths.extend(trace.outputs.iter().map(|o| o.path.clone()));
                record_thunks.push(BuildThunk {
                    id: resolved.id,
                    trace: crate::store::trace_id(trace),
                    parent: resolved.parent,
                });
            }
            // A stale thunk whose outputs were kept stays stale for the next build.
            if self.options.keep_stale {
                for resolved in &stale {
                    if let Some(trace) = &resolved.trace {
                        record_thunks.push(BuildThunk {
                            id: resolved.id,
                            trace: crate::store::trace_id(trace),
                            parent: resolved.parent,
                        });
                    }
                }
            }
            let mut paths: Vec<StorePath> = paths.into_iter().collect();
            paths.sort();
            let listed: HashSet<&StorePath> = thunks
                .iter()
                .filter_map(|t| t.trace.as_ref())
                .flat_map(|t| t.inputs.iter().chain(&t.internal))
                .filter(|i| i.kind == InputKind::Readdir)
                .map(|i| &i.path)
                .collect();
            let snapshot = self
                .world
                .snapshot(&paths)
                .into_iter()
                .map(|(path, stat)| match stat {
                    Some(stat) if stat.mode & TYPE_BITS == DIRECTORY && !listed.contains(&path) => {
                        (path, Some(type_only(stat)))
                    }
                    other => (path, other),
                })
                .collect();
            self.world.put_record(
                &root,
                BuildRecord {
                    thunks: record_thunks,
                    snapshot,
                    damaged: damaged.clone(),
                    exit_code,
                    ended_ns: crate::engine::memo::now_ns(),
                },
            )?;
        }
        thunks.extend(stale);
        Ok(Outcome {
            exit_code,
            interrupted,
            thunks,
            damaged,
            restored,
            removed,
            unchanged: false,
            would_run: shared.would_run,
            first_change: shared.first_change,
        })
    }
}

/// A running thunk's requests: each child is named from its key, this thunk and how many
/// requests with the same key came before.
struct Running<W: World> {
    build: Arc<Inner<W>>,
    id: ThunkId,
    key: ThunkKey,
    /// The parent name its children get.
    name: ThunkId,
    occurrences: Mutex<HashMap<ThunkKey, u32>>,
    /// Requests and wants in flight; while there are any, the thunk's job slot is lent out.
    waiting: Mutex<usize>,
    /// Why wants failed (cycles), for its failure's message.
    refused: Mutex<Vec<String>>,
}

impl<W: World> Running<W> {
    /// The thunk waits: its job slot is lent out meanwhile.
    fn lend_slot(&self) {
        let mut waiting = self.waiting.lock();
        *waiting += 1;
        if *waiting == 1 {
            self.build.slots.release();
        }
    }

    /// It goes on: its slot is taken back first.
    fn take_slot(&self) {
        let mut waiting = self.waiting.lock();
        if *waiting == 1 {
            self.build.slots.acquire();
        }
        *waiting -= 1;
    }
}

impl<W: World> Requests for Running<W> {
    fn request(&self, mut key: ThunkKey, skip_if_new: bool) -> ChildOutcome {
        let occurrence = {
            let mut occurrences = self.occurrences.lock();
            let n = occurrences.entry(key.clone()).or_insert(0);
            let occurrence = *n;
            *n += 1;
            occurrence
        };
        key.parent = Some((self.name, occurrence));
        let id = thunk_id(&key);
        self.lend_slot();
        let build = &self.build;
        let wait = {
            let mut shared = build.shared.lock();
            build.add_wait(&mut shared, self.id, id, Why::Child).ok()
        };
        let outcome = build.resolve(id, key, Asked::by(self.id, true, skip_if_new));
        if let Some(wait) = wait {
            build.shared.lock().waits.remove(&wait);
        }
        self.take_slot();
        outcome
    }

    fn wanted(&self) -> Vec<StorePath> {
        let shared = self.build.shared.lock();
        let shape = shape_of(&self.key);
        let rules = shared.rules_for(&self.id);
        let paths = shared
            .products
            .by_path
            .keys()
            .chain(rules.into_iter().flat_map(HashMap::keys));
        paths
            .filter(|path| {
                shared
                    .producer_of(&self.id, path, true)
                    .is_some_and(|producer| {
                        !shared.never_waits(&self.id, &self.key, &shape, &producer, path)
                    })
            })
            .cloned()
            .collect()
    }

    fn want(&self, path: &StorePath) -> Result<(), String> {
        // The slot is lent only if the lookup waits.
        let lent = std::cell::Cell::new(false);
        let lend = || {
            if !lent.replace(true) {
                self.lend_slot();
            }
        };
        let result = self.build.await_path(self.id, &self.key, path, true, &lend);
        if lent.get() {
            self.take_slot();
        }
        if let Err(message) = &result {
            self.refused
                .lock()
                .push(format!("cannot wait for {}: {message}", display_path(path)));
        }
        result
    }

    fn rules(&self, rules: Vec<(StorePath, ThunkKey)>) {
        let mut shared = self.build.shared.lock();
        shared.rules.entry(self.id).or_default();
        // A make run on demand lists the rules of the make it stands for again.
        let mut at = Some(self.id);
        for _ in 0..MAX_DEPTH {
            let Some(id) = at else { break };
            if shared.rule_thunks.contains_key(&id) {
                return;
            }
            at = shared.parent(&id);
        }
        for (path, mut key) in rules {
            key.parent = Some((self.name, ON_DEMAND));
            let id = thunk_id(&key);
            shared
                .rules
                .entry(self.id)
                .or_default()
                .entry(path)
                .or_insert(id);
            shared.rule_thunks.insert(id, Rule { key, make: self.id });
        }
    }
}

/// The thunks resolved in this build that are not part of it: made on demand, then not
/// requested by their parent (a make rule's thunk is its make's; a parent that failed keeps
/// them), and everything below one.
fn outsiders(shared: &Shared, root: ThunkId) -> HashSet<ThunkId> {
    let mut member: HashMap<ThunkId, bool> = HashMap::from([(root, true)]);
    for id in shared.resolved.keys() {
        let mut chain = Vec::new();
        let mut at = *id;
        let verdict = loop {
            if let Some(verdict) = member.get(&at) {
                break *verdict;
            }
            if chain.len() > MAX_DEPTH {
                break true;
            }
            chain.push(at);
            let parent = shared.parent_of.get(&at);
            // (A parent that failed might have asked for it had it gone on.)
            let asked = shared.requested.contains(&at)
                || shared
                    .resolved
                    .get(&at)
                    .is_some_and(|r| is_rule_thunk(&r.key))
                || parent
                    .and_then(|p| shared.resolved.get(p))
                    .is_some_and(|p| p.exit_code != 0);
            if !asked {
                break false;
            }
            match parent {
                Some(parent) => at = *parent,
                None => break true,
            }
        };
        for id in chain {
            member.insert(id, verdict);
        }
    }
    member
        .into_iter()
        .filter(|(_, verdict)| !verdict)
        .map(|(id, _)| id)
        .collect()
}

/// What a requester gets from a thunk that ran or was reused, from its trace.
fn recorded_outcome(
    id: ThunkId,
    trace: &Trace,
    writes: BTreeMap<StorePath, OutputState>,
    message: Option<String>,
) -> ChildOutcome {
    ChildOutcome {
        id,
        exit_code: trace.exit_code,
        stdout: trace.stdout,
        stderr: trace.stderr,
        writes,
        message,
    }
}

/// The path a make recipe makes (its target, relative to its working directory).
fn target_path(key: &ThunkKey) -> Option<StorePath> {
    let target = key.target.as_ref()?;
    if target.starts_with(b"/") {
        return None;
    }
    let join = |dir: &[u8]| {
        let mut path = dir.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(target);
        path
    };
    Some(match &key.cwd {
        StorePath::Project(dir) => StorePath::Project(join(dir)),
        StorePath::Absolute(dir) => StorePath::Absolute(join(dir)),
    })
}

/// A thunk's command, working directory, environment and options, whoever requested it.
fn shape_of(key: &ThunkKey) -> ThunkId {
    let mut key = key.clone();
    key.parent = None;
    thunk_id(&key)
}

/// What a requester gets from a child that was not run because it would not have run it:
/// success, and nothing said.
fn skipped_outcome(id: ThunkId) -> ChildOutcome {
    ChildOutcome {
        id,
        stdout: crate::cas::hash_bytes(b""),
        stderr: crate::cas::hash_bytes(b""),
        ..ChildOutcome::default()
    }
}

fn own_writes(trace: &Trace) -> BTreeMap<StorePath, OutputState> {
    trace
        .outputs
        .iter()
        .map(|o| (o.path.clone(), o.state.clone()))
        .collect()
}

/// The writes of a resolved thunk and its descendants, from their traces.
fn collect_writes(shared: &Shared, id: ThunkId, into: &mut BTreeMap<StorePath, OutputState>) {
    let Some(resolved) = shared.resolved.get(&id) else {
        return;
    };
    let Some(trace) = &resolved.trace else {
        return;
    };
    for output in &trace.outputs {
        into.insert(output.path.clone(), output.state.clone());
    }
    for call in &trace.children {
        collect_writes(shared, call.id, into);
    }
}

fn kind_of(state: &OutputState) -> Option<FileKind> {
    match state {
        OutputState::File { .. } => Some(FileKind::File),
        OutputState::Dir { .. } => Some(FileKind::Dir),
        OutputState::Symlink { .. } => Some(FileKind::Symlink),
        OutputState::Deleted => None,
    }
}

/// A stored path for messages: project paths relative, others absolute.
pub fn display_path(path: &StorePath) -> String {
    match path {
        StorePath::Project(p) if p.is_empty() => ".".into(),
        StorePath::Project(p) | StorePath::Absolute(p) => String::from_utf8_lossy(p).into_owned(),
    }
}

/// Whether `--want want` asks for the output at `path`: the path itself, what lies under it
/// (a wanted directory), or a directory on the way to it.
pub(crate) fn wants(want: &StorePath, path: &StorePath) -> bool {
    let ((StorePath::Project(w), StorePath::Project(p))
    | (StorePath::Absolute(w), StorePath::Absolute(p))) = (want, path)
    else {
        return false;
    };
    let under = |inner: &[u8], outer: &[u8]| {
        outer.is_empty()
            || inner == outer
            || inner.starts_with(outer) && inner.get(outer.len()) == Some(&b'/')
    };
    under(p, w) || under(w, p)
}
