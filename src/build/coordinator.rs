//! The real [`World`] of a build: the trace store and content store of the project, the real
//! file system, and a `cot __thunk` worker process for every thunk that runs.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, Context};
use globset::GlobSet;
use parking_lot::Mutex;

use super::engine::{
    command_of, ChildOutcome, Executed, Known, Requests, Resolved, State, World, ROOT_PARENT,
};
use super::progress::Progress;
use super::protocol::{
    path_hash, read_message, write_message, ChildDone, FromWorker, Job, ToWorker,
};
use crate::cache::{Caches, Found};
use crate::cas::Cas;
use crate::engine::hermetic::{self, ProjectView};
use crate::engine::key::{self, thunk_key, Binds, Paths};
use crate::engine::memo;
use crate::engine::observe::{stat_tuple, CheckMode, FileStates, Observer, StatCache};
use crate::engine::Thunk;
use crate::server::Client;
use crate::store::model::{
    BuildRecord, Declared, FileState, Input, InputKind, Output, OutputState, StatTuple, StorePath,
    ThunkId, ThunkKey, Trace, TraceId,
};

/// The environment variable telling the thunks of a build (`cot __make`) how many jobs run.
pub const JOBS_ENV: &str = "COT_BUILD_JOBS";

/// What every thunk of a build shares.
#[derive(Clone, Debug)]
pub struct Settings {
    pub project_root: PathBuf,
    pub system_root: PathBuf,
    pub writable: Vec<PathBuf>,
    pub hide: Vec<String>,
    pub rootless: bool,
    pub store: PathBuf,
    pub cas: PathBuf,
    /// The caches beyond the project's store.
    pub caches: crate::cache::CacheOptions,
    pub check: CheckMode,
    pub no_passthrough: bool,
    pub jobs: usize,
    /// Inputs (absolute view paths, globs) whose changes never make a thunk run (cot.toml's
    /// `ignore`).
    pub ignore: GlobSet,
    /// `cot make`: cot is make's `SHELL` in every thunk (see `crate::build::make::SHELL_ENV`).
    pub make_shell: bool,
    /// `--hermetic`: each thunk sees of the project what it declared (see
    /// `crate::engine::hermetic`).
    pub hermetic: bool,
    /// `--allow` and cot.toml's `allow`: what every hermetic thunk sees of the project.
    pub allow: Vec<String>,
    /// `--net`: thunks share the host's network.
    pub net: bool,
}

impl Settings {
    /// A thunk of this build: the command, with the view every thunk of the build shares, and
    /// what it sees of the project when hermetic.
    fn thunk(
        &self,
        argv: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: PathBuf,
        target: Option<String>,
        hermetic: Option<ProjectView>,
    ) -> Thunk {
        Thunk {
            argv,
            env,
            cwd,
            system_root: self.system_root.clone(),
            writable: self.writable.clone(),
            hide: self.hide.clone(),
            rootless: self.rootless,
            target,
            net: self.net,
            hermetic,
        }
    }
}

/// Store clients, one per thread that needs one at a time.
struct Pool {
    store: PathBuf,
    clients: Mutex<Vec<Client>>,
}

impl Pool {
    fn with<T>(&self, f: impl FnOnce(&mut Client) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let taken = self.clients.lock().pop();
        let mut client = match taken {
            Some(client) => client,
            None => Client::connect(&self.store)?,
        };
        let result = f(&mut client);
        // A client whose call failed may be out of step with its server: drop it.
        if result.is_ok() {
            self.clients.lock().push(client);
        }
        result
    }
}

impl FileStates for Pool {
    fn get(&self, real: &Path) -> Option<FileState> {
        let path = real.as_os_str().as_bytes().to_vec();
        self.with(|c| Ok(c.file_states(vec![path])?))
            .ok()?
            .pop()
            .flatten()
    }
}

/// The real world.
pub struct RealWorld {
    settings: Settings,
    paths: Paths,
    binds: Binds,
    hidden: cot_fusefs::HideRule,
    pool: Pool,
    /// `lstat`s of paths no thunk can change, shared by every check of the build.
    stats: StatCache,
    cas: Cas,
    /// The caches beyond the project's store, and what each said of a thunk (a thunk is
    /// looked up once per build and cache).
    caches: Caches,
    cached: Mutex<HashMap<(ThunkId, usize), Option<Found>>>,
    /// The traces of thunks that ran, on their way to the caches (written by a thread of
    /// their own, off the build's critical path; see [`RealWorld::finish_exports`]).
    exports: Mutex<Option<std::sync::mpsc::Sender<(ThunkKey, Trace)>>>,
    exporter: Mutex<Option<std::thread::JoinHandle<()>>>,
    exe: PathBuf,
    progress: Progress,
    /// Worker processes running, to forward a termination signal to.
    workers: Mutex<HashSet<u32>>,
    interrupted: AtomicBool,
}

impl RealWorld {
    pub fn new(settings: Settings, progress: Progress) -> anyhow::Result<RealWorld> {
        let paths = Paths::new(&settings.project_root);
        let template = settings.thunk(
            Vec::new(),
            Vec::new(),
            settings.project_root.clone(),
            None,
            settings.hermetic.then_some(ProjectView::Whole),
        );
        let binds = Binds::new(crate::engine::view_binds(
            &template,
            &settings.project_root,
        )?);
        let hidden = crate::engine::hide_rule(&template, &settings.project_root)?;
        let cas = Cas::open(&settings.cas)?;
        let exe = std::env::current_exe().context("cannot find cot's own executable")?;
        // What thunks can write: the project and the writable directories (as real paths),
        // and the private /tmp of the view.
        let mut volatile: Vec<PathBuf> = vec![binds.real(&settings.project_root)];
        volatile.extend(settings.writable.iter().map(|w| binds.real(w)));
        let stats = StatCache::new(volatile);
        let caches = Caches::open(&settings.caches, paths.names());
        Ok(RealWorld {
            stats,
            caches,
            cached: Mutex::new(HashMap::new()),
            exports: Mutex::new(None),
            exporter: Mutex::new(None),
            pool: Pool {
                store: settings.store.clone(),
                clients: Mutex::new(Vec::new()),
            },
            settings,
            paths,
            binds,
            hidden,
            cas,
            exe,
            progress,
            workers: Mutex::new(HashSet::new()),
            interrupted: AtomicBool::new(false),
        })
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    pub fn cas(&self) -> &Cas {
        &self.cas
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Stops starting thunks and passes `signal` on to the running workers (their sandboxes
    /// end the commands, nothing of theirs is committed).
    pub fn interrupt(&self, signal: nix::sys::signal::Signal) {
        self.interrupted.store(true, Ordering::Relaxed);
        for pid in self.workers.lock().iter() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(*pid).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    fn observer(&self) -> Observer<'_> {
        Observer::new(
            &self.paths,
            &self.binds,
            self.settings.check,
            &self.pool,
            &self.hidden,
        )
        .with_stat_cache(&self.stats)
    }

    /// Shows the caches' warnings above the progress line.
    fn cache_warnings(&self) {
        for message in self.caches.take_warnings() {
            self.progress.println(&format!("cot: warning: {message}"));
        }
    }

    /// Writes a thunk's trace to the caches that take writes, on the exporting thread
    /// (started on first use).
    fn export(self: &std::sync::Arc<Self>, key: &ThunkKey, trace: &Trace) {
        let mut exports = self.exports.lock();
        if exports.is_none() {
            let (sender, receiver) = std::sync::mpsc::channel::<(ThunkKey, Trace)>();
            let world = std::sync::Arc::clone(self);
            *self.exporter.lock() = Some(std::thread::spawn(move || {
                for (key, trace) in receiver {
                    world.caches.export(&key, &trace, &world.cas);
                    world.cache_warnings();
                }
            }));
            *exports = Some(sender);
        }
        if let Some(sender) = exports.as_ref() {
            let _ = sender.send((key.clone(), trace.clone()));
        }
    }

    /// Waits until every trace on its way to the caches is written. Called once the build
    /// is over.
    pub fn finish_exports(&self) {
        drop(self.exports.lock().take());
        if let Some(exporter) = self.exporter.lock().take() {
            let _ = exporter.join();
        }
    }

    /// What cache `tier` knows of thunk `id` (asked once per build).
    fn cache_lookup(&self, id: &ThunkId, tier: usize) -> Option<Found> {
        if let Some(found) = self.cached.lock().get(&(*id, tier)) {
            return found.clone();
        }
        let found = self
            .caches
            .tiers()
            .get(tier)
            .and_then(|t| self.caches.lookup(id, *t));
        self.cache_warnings();
        self.cached.lock().insert((*id, tier), found.clone());
        found
    }

    /// Saves the digests an observer computed, so the next check does not hash again.
    fn keep_learned(&self, observer: &Observer<'_>) {
        let learned = observer.take_learned();
        if !learned.is_empty() {
            let _ = self.pool.with(|c| Ok(c.put_file_states(learned)?));
        }
    }

    /// The thunk a key describes, as the sandbox runs it.
    fn thunk_of(&self, key: &ThunkKey) -> Thunk {
        let (argv, mut env) = key::command_line(key, &self.paths);
        env.push((JOBS_ENV.into(), self.settings.jobs.to_string().into()));
        if self.settings.make_shell {
            env.push((
                super::make::SHELL_ENV.into(),
                super::make::RECIPE_SHELL.into(),
            ));
        }
        // What the thunk sees and whether it has the network are the key's, not the build's:
        // the engine runs recorded children again from their keys alone.
        let (hermetic, net) = key::isolation(&key.options, &self.paths);
        let thunk = self.settings.thunk(
            argv,
            env,
            self.paths.to_view(&key.cwd),
            key.target
                .as_ref()
                .map(|t| String::from_utf8_lossy(t).into_owned()),
            hermetic,
        );
        Thunk { net, ..thunk }
    }

    /// The key of the root thunk of the build, which sees the whole project.
    pub fn root_key(
        &self,
        argv: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: PathBuf,
    ) -> ThunkKey {
        let hermetic = self.settings.hermetic.then_some(ProjectView::Whole);
        thunk_key(
            &self.settings.thunk(argv, env, cwd, None, hermetic),
            &self.paths,
        )
    }

    /// The key of a child thunk requested with this command line (its parent is set by the
    /// engine), with what it sees of the project when hermetic.
    pub fn key_of(
        &self,
        argv: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: PathBuf,
        target: Option<String>,
        declared: Option<&Declared>,
    ) -> ThunkKey {
        let hermetic = self
            .settings
            .hermetic
            .then(|| self.child_view(&argv, &cwd, target.as_deref(), declared));
        thunk_key(
            &self.settings.thunk(argv, env, cwd, target, hermetic),
            &self.paths,
        )
    }

    /// What a hermetic child thunk sees of the project: a recipe line its declarations, unless
    /// it runs a sub-make; make's `$(shell ...)` and a make run for a target on demand all of
    /// it, as make reads its makefiles; any other child what `--allow` names.
    fn child_view(
        &self,
        argv: &[OsString],
        cwd: &Path,
        target: Option<&str>,
        declared: Option<&Declared>,
    ) -> ProjectView {
        let allow = self.settings.allow.clone();
        let shell_call = self.settings.make_shell
            && argv.len() == 3
            && argv[0] == super::make::RECIPE_SHELL
            && argv[1] == "-c";
        // make itself, run for a target another recipe looks for (see `FromWorker::Rules`).
        let make_call = argv.len() >= 2 && Path::new(&argv[0]) == self.exe && argv[1] == "__make";
        match declared {
            Some(_) if hermetic::runs_sub_make(argv, &self.exe) => ProjectView::Whole,
            Some(declared) => ProjectView::Only {
                paths: hermetic::declared_paths(cwd, target, declared),
                allow,
            },
            None if shell_call || make_call => ProjectView::Whole,
            None => ProjectView::Only {
                paths: Vec::new(),
                allow,
            },
        }
    }

    /// For a hermetic thunk that failed: the files of the project it looked for although it
    /// did not declare them.
    fn undeclared(&self, key: &ThunkKey, trace: &Trace) -> Option<String> {
        let (Some(ProjectView::Only { .. }), _) = key::isolation(&key.options, &self.paths) else {
            return None;
        };
        let looked_for: Vec<PathBuf> = trace
            .inputs
            .iter()
            .filter(|input| input.kind == InputKind::Hidden)
            .map(|input| self.paths.to_view(&input.path))
            .collect();
        let files = hermetic::undeclared(
            looked_for.iter().map(PathBuf::as_path),
            &self.settings.project_root,
            &self.hidden,
            |view| self.binds.real(view),
        );
        (!files.is_empty()).then(|| {
            let target = super::engine::target_of(key);
            hermetic::undeclared_message(&command_of(key), target.as_deref(), &files)
        })
    }

    fn child_done(&self, request: u64, outcome: ChildOutcome) -> ChildDone {
        let read = |digest| self.cas.read(digest).unwrap_or_default();
        ChildDone {
            request,
            id: outcome.id,
            exit_code: outcome.exit_code,
            stdout_digest: outcome.stdout,
            stderr_digest: outcome.stderr,
            stdout: read(&outcome.stdout),
            stderr: read(&outcome.stderr),
            written: outcome
                .writes
                .keys()
                .map(|p| self.paths.to_view(p))
                .collect(),
            writes: outcome.writes.into_iter().collect(),
            message: outcome.message,
        }
    }

    fn spawn_worker(&self) -> anyhow::Result<(std::process::Child, UnixStream)> {
        let (ours, theirs) = UnixStream::pair().context("cannot create a socket pair")?;
        let child = Command::new(&self.exe)
            .arg("__thunk")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .spawn()
            .with_context(|| format!("cannot start {}", self.exe.display()))?;
        Ok((child, ours))
    }
}

/// The trace of a thunk that was interrupted (nothing is recorded for it).
fn interrupted_trace(exit_code: i32) -> Trace {
    Trace {
        inputs: Vec::new(),
        outputs: Vec::new(),
        stdout: crate::cas::hash_bytes(b""),
        stderr: crate::cas::hash_bytes(b""),
        exit_code,
        duration_ns: 0,
        ran_at_ns: 0,
        children: Vec::new(),
        events: Vec::new(),
        internal: Vec::new(),
    }
}

impl World for std::sync::Arc<RealWorld> {
    fn thunk(&self, id: &ThunkId) -> anyhow::Result<Option<Known>> {
        self.pool
            .with(|client| Ok(client.known(*id)?.map(|known| *known)))
    }

    fn check(&self, input: &Input, trace: &Trace) -> Option<String> {
        if !self.settings.ignore.is_empty()
            && self
                .settings
                .ignore
                .is_match(self.paths.to_view(&input.path))
        {
            return None;
        }
        let observer = self.observer();
        let change = memo::check_input(input, trace, &observer);
        self.keep_learned(&observer);
        change
    }

    fn holds(&self, path: &StorePath, state: &OutputState) -> bool {
        let observer = self.observer();
        let holds = observer
            .output_holds(&self.paths.to_view(path), state)
            .unwrap_or(false);
        self.keep_learned(&observer);
        holds
    }

    fn holds_all(&self, outputs: &[(&StorePath, &OutputState)]) -> Vec<bool> {
        // The digests of files whose type, size and mode match come from the store in one
        // batch; only those whose stat tuple is unknown there are hashed.
        let reals: Vec<PathBuf> = outputs
            .iter()
            .map(|(path, _)| self.binds.real(&self.paths.to_view(path)))
            .collect();
        let metas: Vec<Option<fs::Metadata>> =
            reals.iter().map(|r| fs::symlink_metadata(r).ok()).collect();
        let candidates: Vec<usize> = (0..outputs.len())
            .filter(|&i| {
                matches!(
                    (outputs[i].1, &metas[i]),
                    (OutputState::File { size, mode, .. }, Some(meta))
                        if meta.is_file()
                            && meta.len() == *size
                            && std::os::unix::fs::PermissionsExt::mode(&meta.permissions())
                                & 0o7777
                                == mode & 0o7777
                )
            })
            .collect();
        let known = self
            .pool
            .with(|c| {
                Ok(c.file_states(
                    candidates
                        .iter()
                        .map(|&i| reals[i].as_os_str().as_bytes().to_vec())
                        .collect(),
                )?)
            })
            .unwrap_or_default();
        let mut cached: std::collections::HashMap<usize, FileState> = Default::default();
        for (i, state) in candidates.iter().zip(known) {
            if let Some(state) = state {
                cached.insert(*i, state);
            }
        }
        (0..outputs.len())
            .map(|i| match (outputs[i].1, &metas[i], cached.get(&i)) {
                (OutputState::File { digest, .. }, Some(meta), Some(state))
                    if state.stat == stat_tuple(meta) =>
                {
                    state.digest == *digest
                }
                (state, _, _) => self.holds(outputs[i].0, state),
            })
            .collect()
    }

    fn restore(&self, path: &StorePath, state: &OutputState) -> anyhow::Result<()> {
        let observer = self.observer();
        let output = Output {
            path: path.clone(),
            state: state.clone(),
        };
        // A content the project's store lacks (collected, or a store shared with --store) may
        // be in the shared cache.
        if let OutputState::File { digest, .. } = state {
            if !self.cas.contains(digest) {
                self.caches.fill(&[*digest], &self.cas);
            }
        }
        memo::restore_output(&output, &self.cas, &observer)?;
        Ok(())
    }

    fn remove(&self, path: &StorePath) -> anyhow::Result<()> {
        let real = self.binds.real(&self.paths.to_view(path));
        let result = match fs::symlink_metadata(&real) {
            // A directory goes only when empty: something else may live in it now.
            Ok(meta) if meta.is_dir() => fs::remove_dir(&real).or_else(|e| {
                if e.raw_os_error() == Some(libc::ENOTEMPTY) {
                    Ok(())
                } else {
                    Err(e)
                }
            }),
            Ok(_) => fs::remove_file(&real),
            Err(_) => Ok(()),
        };
        result.with_context(|| format!("cannot delete stale output {}", real.display()))
    }

    fn execute(
        &self,
        _id: &ThunkId,
        key: &ThunkKey,
        requests: &dyn Requests,
    ) -> anyhow::Result<Executed> {
        if self.interrupted.load(Ordering::Relaxed) {
            return Ok(Executed {
                trace_id: [0; 32],
                trace: interrupted_trace(130),
                message: Some("not started: the build was interrupted".into()),
                interrupted: true,
            });
        }
        let thunk = self.thunk_of(key);
        let command = command_of(key);
        let (mut child, mut channel) = self.spawn_worker()?;
        let pid = child.id();
        self.workers.lock().insert(pid);
        let job = Job {
            argv: thunk.argv.clone(),
            env: thunk.env.clone(),
            cwd: thunk.cwd.clone(),
            system_root: thunk.system_root.clone(),
            writable: thunk.writable.clone(),
            hide: thunk.hide.clone(),
            rootless: thunk.rootless,
            target: thunk.target.clone(),
            net: thunk.net,
            hermetic: thunk.hermetic.clone(),
            key: key.clone(),
            store: self.settings.store.clone(),
            cas: self.settings.cas.clone(),
            check: self.settings.check,
            no_passthrough: self.settings.no_passthrough,
            show_output: key.parent == Some((ROOT_PARENT, 0)),
            wanted: requests
                .wanted()
                .iter()
                .map(|path| path_hash(&self.paths.to_view(path)))
                .collect(),
        };
        let result = (|| -> anyhow::Result<Executed> {
            write_message(&mut channel, &job).context("cannot send the job to its worker")?;
            let writer = Mutex::new(channel.try_clone().context("cannot share the channel")?);
            std::thread::scope(|scope| loop {
                let message: FromWorker = read_message(&mut channel).map_err(|e| {
                    anyhow!("the process running `{command}` ended without reporting ({e})")
                })?;
                match message {
                    FromWorker::Child {
                        request,
                        argv,
                        env,
                        cwd,
                        target,
                        declared,
                        skip_if_new,
                    } => {
                        let key = self.key_of(argv, env, cwd, target, declared.as_ref());
                        let writer = &writer;
                        scope.spawn(move || {
                            let outcome = requests.request(key, skip_if_new);
                            let done = ToWorker::Child(self.child_done(request, outcome));
                            // The thunk may have ended meanwhile: nobody to tell.
                            let _ = write_message(&mut *writer.lock(), &done);
                        });
                    }
                    FromWorker::Want { request, path } => {
                        let path = self.paths.to_store(&path);
                        let writer = &writer;
                        scope.spawn(move || {
                            let error = requests.want(&path).err();
                            let answer = ToWorker::Wanted { request, error };
                            let _ = write_message(&mut *writer.lock(), &answer);
                        });
                    }
                    // Before any later request of the thunk is read: its recipes know them.
                    FromWorker::Rules {
                        argv,
                        env,
                        cwd,
                        targets,
                    } => {
                        let rules = targets
                            .into_iter()
                            .map(|(target, path)| {
                                let mut argv = argv.clone();
                                argv.push(target);
                                let key = self.key_of(argv, env.clone(), cwd.clone(), None, None);
                                (self.paths.to_store(&path), key)
                            })
                            .collect();
                        requests.rules(rules);
                    }
                    FromWorker::Finished {
                        recorded,
                        exit_code,
                        message,
                        interrupted,
                    } => {
                        if let Some((_, trace)) = recorded.as_ref().filter(|(_, t)| {
                            t.exit_code == 0 && !interrupted && !self.caches.is_empty()
                        }) {
                            self.export(key, trace);
                        }
                        return Ok(match recorded {
                            Some((trace_id, trace)) => Executed {
                                trace_id,
                                trace: *trace,
                                message,
                                interrupted,
                            },
                            None => Executed {
                                trace_id: [0; 32],
                                trace: interrupted_trace(exit_code),
                                message,
                                interrupted: true,
                            },
                        });
                    }
                    FromWorker::Failed { message } => {
                        return Err(anyhow!("{message}"));
                    }
                }
            })
        })();
        let _ = child.wait();
        self.workers.lock().remove(&pid);
        result.with_context(|| format!("cannot run `{command}`"))
    }

    fn touch(&self, key: &ThunkKey, trace: &Trace) -> anyhow::Result<TraceId> {
        let observer = self.observer();
        let mut trace = trace.clone();
        for input in &mut trace.inputs {
            let view = self.paths.to_view(&input.path);
            input.observed = observer
                .observe(input.kind, &view, &HashSet::new())
                .unwrap_or(crate::store::model::Observed::Absent);
        }
        trace.ran_at_ns = crate::engine::memo::now_ns();
        let learned = observer.take_learned();
        self.pool
            .with(|client| Ok(client.record(key.clone(), trace.clone(), learned)?))
    }

    fn adopt(&self, key: &ThunkKey, trace: &Trace) -> anyhow::Result<TraceId> {
        self.pool
            .with(|client| Ok(client.record(key.clone(), trace.clone(), Vec::new())?))
    }

    fn snapshot(&self, paths: &[StorePath]) -> Vec<(StorePath, Option<StatTuple>)> {
        paths
            .iter()
            .map(|path| {
                let real = self.binds.real(&self.paths.to_view(path));
                let stat = fs::symlink_metadata(&real).ok().map(|m| stat_tuple(&m));
                (path.clone(), stat)
            })
            .collect()
    }

    fn changed(&self, snapshot: &[(StorePath, Option<StatTuple>)]) -> Option<StorePath> {
        // Two threads: on a cold cache the lstat calls wait on the disk.
        let half = snapshot.len() / 2;
        let (a, b) = snapshot.split_at(half);
        let first_changed = |part: &[(StorePath, Option<StatTuple>)]| {
            part.iter()
                .find(|(path, stat)| {
                    let real = self.binds.real(&self.paths.to_view(path));
                    let now = fs::symlink_metadata(&real).ok().map(|m| stat_tuple(&m));
                    !super::engine::same_stat(stat, &now)
                })
                .map(|(path, _)| path.clone())
        };
        std::thread::scope(|scope| {
            let other = scope.spawn(|| first_changed(b));
            let first = first_changed(a);
            first.or_else(|| other.join().ok().flatten())
        })
    }

    fn record(&self, root: &ThunkId) -> anyhow::Result<Option<BuildRecord>> {
        self.pool
            .with(|client| Ok(client.build_record(*root)?.map(|r| *r)))
    }

    fn put_record(&self, root: &ThunkId, record: BuildRecord) -> anyhow::Result<()> {
        self.pool
            .with(|client| Ok(client.put_build_record(*root, record.clone())?))
    }

    fn resolved(&self, thunk: &Resolved) {
        if !thunk.ran {
            if let (State::Failed, Some(message)) = (thunk.state, &thunk.message) {
                // cot itself failed for this thunk.
                self.progress.failed(
                    &command_of(&thunk.key),
                    thunk.exit_code,
                    format!("cot: {message}\n").as_bytes(),
                );
            }
            return;
        }
        let command = command_of(&thunk.key);
        if thunk.state == State::Skipped {
            self.progress
                .println(&format!("cot: interrupted: {command}"));
            return;
        }
        let ok = thunk.exit_code == 0;
        self.progress.finished(&command, ok, thunk.duration);
        // Output nobody received (a thunk that ran for a replayed parent) is shown here.
        let output =
            |digest: &crate::store::model::Digest| self.cas.read(digest).unwrap_or_default();
        let (stdout, stderr) = match &thunk.trace {
            Some(trace) if !thunk.delivered => (output(&trace.stdout), output(&trace.stderr)),
            _ => (Vec::new(), Vec::new()),
        };
        if thunk.state == State::Failed {
            let mut said = stdout;
            said.extend(stderr);
            if let Some(message) = &thunk.message {
                said.extend(format!("cot: {message}\n").into_bytes());
            }
            if let Some(message) = thunk
                .trace
                .as_ref()
                .and_then(|t| self.undeclared(&thunk.key, t))
            {
                said.extend(format!("cot: {message}\n").into_bytes());
            }
            self.progress.failed(&command, thunk.exit_code, &said);
        } else {
            for text in [stdout, stderr] {
                if !text.is_empty() {
                    self.progress
                        .println(String::from_utf8_lossy(&text).trim_end_matches('\n'));
                }
            }
        }
    }

    fn started(&self, key: &ThunkKey) {
        self.progress.add_total(1);
        self.progress.started(&command_of(key));
    }

    fn cache_tiers(&self) -> usize {
        self.caches.tiers().len()
    }

    fn cached(&self, id: &ThunkId, tier: usize) -> Option<Known> {
        let found = self.cache_lookup(id, tier)?;
        let traces = found
            .candidates
            .into_iter()
            .map(|c| (crate::store::trace_id(&c.trace), c.trace))
            .collect();
        Some((found.key, traces))
    }

    fn cache_name(&self, tier: usize) -> String {
        self.caches
            .tiers()
            .get(tier)
            .map(|t| self.caches.describe(*t))
            .unwrap_or_default()
    }

    fn adopt_cached(
        &self,
        id: &ThunkId,
        key: &ThunkKey,
        tier: usize,
        trace: &Trace,
    ) -> anyhow::Result<TraceId> {
        let found = self
            .cache_lookup(id, tier)
            .ok_or_else(|| anyhow!("no longer cached"))?;
        let candidate = found
            .candidates
            .iter()
            .find(|c| &c.trace == trace)
            .ok_or_else(|| anyhow!("no longer cached"))?;
        let fetched = self.caches.fetch(id, candidate, &self.cas);
        self.cache_warnings();
        fetched.map_err(|e| anyhow!(e))?;
        self.pool
            .with(|client| Ok(client.record(key.clone(), trace.clone(), Vec::new())?))
    }
}
