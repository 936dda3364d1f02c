//! cot's FUSE proxy filesystem: a copy-on-write view of real trees that records every access.
//!
//! One mount serves one thunk (a command and its process tree) as its root `/`. The principal
//! types:
//!
//! - [`Options`]: which real trees the view shows ([`Options::binds`]), where the thunk may
//!   write, what is hidden ([`HideRule`]) or concealed ([`Conceal`]), where the copy-on-write
//!   layer lives.
//! - [`ProxyFs`]: the filesystem (a `fuser::Filesystem`), built with [`ProxyFs::new`] and run
//!   on an already mounted `/dev/fuse` descriptor with [`serve`], which returns a [`Server`].
//! - [`Handle`]: what the caller keeps: the access log ([`Handle::accesses`], a list of
//!   [`Access`] of some [`AccessKind`]) and the layer's fate ([`Handle::commit`] or
//!   [`Handle::discard`]). For nested thunks, [`Handle::publish`] applies the layer so far
//!   while the mount keeps serving, and [`Handle::invalidate`] makes the mount show paths
//!   another process changed in the real trees (and [`Handle::reveal`] lets it see them where
//!   a concealment rule would not), and [`Handle::gate_lookups`] makes lookups wait for the
//!   caller (a build makes a file on demand).
//! - [`recover`]: after a crash, finishes the commit a layer was in (its journal says what
//!   is left to do, see [`Recovery`]) or throws the layer away.
//!
//! Because the mount is per thunk, the kernel may cache everything for a long time
//! ([`Options::ttl`]): the thunk's first access to a path always reaches the filesystem (and
//! is recorded), repeated accesses are served by the kernel. File data goes through kernel
//! FUSE passthrough when the kernel grants it, else through the daemon.
//!
//! The crate knows nothing of thunks, namespaces or trace stores; all its syscalls go through
//! `rustix`, so it has no `unsafe` code of its own.

mod access;
mod commit;
mod config;
mod error;
mod fuse;
mod journal;
mod layer;
mod nodes;
mod ops;
mod real;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::RwLockWriteGuard;

pub use access::{Access, AccessKind};
pub use config::{glob_set, HideRule};
pub use error::Error;
pub use ops::ProxyFs;

use config::Config;
use layer::LayerState;
use ops::Inner;

/// What the view shows and how it may change. All view paths are absolute.
#[derive(Clone, Debug)]
pub struct Options {
    /// Mapping from view paths to real paths; the longest matching view prefix wins.
    /// Always contains ("/", system_root). E.g. `[("/", "/srv/debian-root"),
    /// ("/home/u/proj", "/home/u/proj")]`.
    pub binds: Vec<(PathBuf, PathBuf)>,
    /// View paths under which the thunk may create, modify and delete; elsewhere such
    /// operations fail with EROFS.
    pub writable: Vec<PathBuf>,
    /// Glob patterns (globset, matched against the absolute view path with
    /// `literal_separator(true)`; a pattern matching a directory hides everything under it)
    /// that look absent: lookups fail with ENOENT and are recorded as `Hidden`, listings omit
    /// them, creating them fails with EACCES.
    pub hide: Vec<String>,
    /// Globs like `hide`, that never hide the `unhidden` paths, what lies under them or the
    /// directories leading to them: e.g. `/home/**` while the project lies in a home.
    pub hide_elsewhere: Vec<String>,
    /// View paths that `hide_elsewhere` spares.
    pub unhidden: Vec<PathBuf>,
    /// Limits what the real trees show under some roots (see [`Conceal`]); `None`: no limit.
    pub conceal: Option<Conceal>,
    /// View paths that look absent and are never recorded (cot's own state, e.g.
    /// `<project>/.cot`). Creating them fails with EACCES.
    pub internal: Vec<PathBuf>,
    /// View paths that must exist as directories (mount points: /proc /dev /sys /tmp). Their
    /// ancestors, and the ancestors of bind views, are added. Lookups of these are not
    /// recorded; where the bound real tree lacks them they are synthetic empty directories
    /// (mode 0755, root). Removing or renaming them fails with EBUSY.
    pub mountpoints: Vec<PathBuf>,
    /// An existing empty directory the filesystem owns, holding the upper (copy-on-write)
    /// layer. Put it on the same file system as the writable trees so commit can rename.
    pub layer_dir: PathBuf,
    /// Try kernel FUSE passthrough for file data (needs CAP_SYS_ADMIN in the initial user
    /// namespace). When the kernel refuses at INIT, or an open cannot be passed through, file
    /// data silently goes through the daemon.
    pub passthrough: bool,
    /// How long the kernel may cache entries, absences and attributes.
    pub ttl: Duration,
}

impl Options {
    /// Options showing `system_root` as `/`, read-only, with the layer in `layer_dir`,
    /// passthrough off and a one-day cache timeout.
    pub fn new(system_root: impl Into<PathBuf>, layer_dir: impl Into<PathBuf>) -> Options {
        Options {
            binds: vec![(PathBuf::from("/"), system_root.into())],
            writable: Vec::new(),
            hide: Vec::new(),
            hide_elsewhere: Vec::new(),
            unhidden: Vec::new(),
            conceal: None,
            internal: Vec::new(),
            mountpoints: Vec::new(),
            layer_dir: layer_dir.into(),
            passthrough: false,
            ttl: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// A concealment rule: under `roots`, a real (lower) entry that is not a directory shows only
/// when its view path matches one of the `visible` globs (over absolute view paths, `*` stops
/// at `/`, `**` crosses directories). A concealed entry looks absent: its lookup fails with
/// ENOENT and is recorded as `Hidden`, listings leave it out, and deleting it is impossible (it
/// is not there). Directories always show (they are structure, not content), and so does
/// everything the thunk wrote itself, also once published, and what [`Handle::reveal`] names:
/// the thunk may create a file at a concealed path (its output, a temporary), and the commit
/// puts it in place over the real one as usual. A directory the thunk moves takes its concealed
/// entries along (they must not be lost), and they show at the new place.
#[derive(Clone, Debug, Default)]
pub struct Conceal {
    /// Absolute view paths (e.g. the project directory); the roots themselves always show.
    pub roots: Vec<PathBuf>,
    pub visible: Vec<String>,
}

/// What [`Handle::commit`] changed in the real filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitSummary {
    /// Files (and fifos, sockets) moved or copied into place.
    pub files: usize,
    /// Directories created.
    pub dirs: usize,
    /// Symlinks moved or copied into place.
    pub symlinks: usize,
    /// Real entries deleted (each entry of a deleted tree counts).
    pub deleted: usize,
    /// Bytes of the regular files put in place.
    pub bytes: u64,
}

/// What a thunk changed under one view path, read from its layer before the commit (see
/// [`Handle::changes_under`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerChanges {
    /// (view path, the layer's file for it), sorted by view path (parents first). Each
    /// layer file holds the entry as the thunk left it (type, mode, content, link target).
    pub upper: Vec<(PathBuf, PathBuf)>,
    /// View paths whose real entry the thunk deleted or replaced (whiteouts), sorted.
    pub deleted: Vec<PathBuf>,
}

/// Lists the layer's entries under the layer directory `dir` (view path `view`), sorted.
fn walk_upper(dir: &Path, view: &Path, into: &mut Vec<(PathBuf, PathBuf)>) -> std::io::Result<()> {
    let mut entries: Vec<std::fs::DirEntry> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let child = view.join(entry.file_name());
        into.push((child.clone(), entry.path()));
        if entry.file_type()?.is_dir() {
            walk_upper(&entry.path(), &child, into)?;
        }
    }
    Ok(())
}

/// What [`recover`] did with a layer directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// A commit of the layer had started: it was finished, with this summary, and the layer
    /// removed.
    Completed(CommitSummary),
    /// No commit had started (or no layer was left): the layer, if any, was removed and the
    /// real trees left as they were.
    Discarded,
}

/// Brings the layer directory `layer_dir` of a filesystem that is gone (its process killed,
/// the machine powered off) to a clean end: when its commit journal `<layer_dir>.journal`
/// exists the commit had started, and it is replayed to completion; otherwise the layer is
/// an uncommitted one and is removed, leaving the real trees untouched. A journal cut short
/// before it was complete (impossible unless written by other means: commit writes it to
/// `<layer_dir>.journal.tmp` and renames it) is removed with the layer. Idempotent; it may
/// itself be interrupted and called again. Never call it for a layer whose filesystem is
/// still alive.
pub fn recover(layer_dir: &Path) -> Result<Recovery, Error> {
    journal::recover(layer_dir)
}

/// Counts of requests the filesystem served so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// LOOKUP requests (each a path the kernel had not cached).
    pub lookups: u64,
    /// Files opened or created.
    pub opens: u64,
    /// Of those, opens whose data the kernel serves by passthrough.
    pub passthrough_opens: u64,
    /// READ requests served by the daemon.
    pub reads: u64,
    /// WRITE requests served by the daemon.
    pub writes: u64,
}

/// What a lookup waits for before it is resolved: called with the absolute view path of every
/// lookup that reaches the filesystem (a thunk's first access to a path: the kernel caches the
/// answer), so that the caller can first have the path made in the real trees, by someone
/// else. An error fails the lookup with `EIO`. Internal and hidden paths never reach it. It
/// runs on a FUSE thread: it must not itself wait for this mount's requests (e.g. through
/// [`Handle::invalidate`]).
#[derive(Clone)]
pub struct LookupGate(pub Arc<GateFn>);

/// The function behind a [`LookupGate`].
pub type GateFn = dyn Fn(&Path) -> std::io::Result<()> + Send + Sync;

impl std::fmt::Debug for LookupGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LookupGate")
    }
}

/// The caller's side of a [`ProxyFs`]: the access log, the layer, and the kernel's cache of
/// the mount (through the session [`serve`] runs). Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
}

impl ProxyFs {
    /// Checks `opts`, opens the real trees and the layer directory.
    pub fn new(opts: Options) -> Result<(ProxyFs, Handle), Error> {
        let cfg = Config::new(opts)?;
        let inner = Arc::new(Inner::new(cfg));
        Ok((ProxyFs::from_inner(inner.clone()), Handle { inner }))
    }
}

impl Handle {
    /// The accesses so far, deduplicated, in first-seen order.
    pub fn accesses(&self) -> Vec<Access> {
        self.inner.log.snapshot()
    }

    /// Applies the layer to the real filesystem, then removes the layer directory. Later
    /// changes through the mount fail with EROFS.
    ///
    /// The whole change is written as a journal `<layer_dir>.journal` (a sibling of the layer)
    /// before anything is applied, so if the process dies or the machine loses power midway,
    /// [`recover`] finishes the commit: the real trees end up either untouched or exactly as a
    /// complete commit leaves them. The same holds when this returns an error after the
    /// journal was written: the journal stays, and [`recover`] retries.
    pub fn commit(&self) -> Result<CommitSummary, Error> {
        let state = self.seal()?;
        Ok(commit::commit(&self.inner.cfg, &state, &[], None)?.0)
    }

    /// Commits like [`Handle::commit`], except the changes at and under the view paths
    /// `kept_out`, which stay in the layer and are removed with it: the real trees there are
    /// left as they were. Read them first with [`Handle::changes_under`].
    pub fn commit_except(&self, kept_out: &[PathBuf]) -> Result<CommitSummary, Error> {
        let kept_out: Vec<PathBuf> = kept_out.iter().map(|p| config::normalize(p)).collect();
        let state = self.seal()?;
        Ok(commit::commit(&self.inner.cfg, &state, &kept_out, None)?.0)
    }

    /// What the thunk changed at and under the view path `root`, as the layer holds it:
    /// every entry of the layer there (the files, symlinks and directories it made or
    /// changed, and the directories leading to them), parents first, with the path of the
    /// layer's own copy; and the real entries it deleted. Call it once the command is done
    /// and before the layer is committed or discarded.
    pub fn changes_under(&self, root: &Path) -> Result<LayerChanges, Error> {
        let root = config::normalize(root);
        let state = self.inner.layer.read();
        if state.sealed {
            return Err(Error::Finished {
                path: self.inner.cfg.layer_dir.clone(),
            });
        }
        let mut changes = LayerChanges::default();
        let top = self.inner.cfg.layer_dir.join(config::upper_rel(&root));
        let layer_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Commit { path, source }
        };
        match std::fs::symlink_metadata(&top) {
            Ok(meta) => {
                changes.upper.push((root.clone(), top.clone()));
                if meta.is_dir() {
                    walk_upper(&top, &root, &mut changes.upper).map_err(layer_error(&top))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(layer_error(&top)(e)),
        }
        let mut deleted: Vec<PathBuf> = state
            .whiteouts
            .iter()
            .filter(|w| w.starts_with(&root))
            .cloned()
            .collect();
        deleted.sort();
        changes.deleted = deleted;
        Ok(changes)
    }

    /// For crash tests: commits like [`Handle::commit`] but stops after applying the first
    /// `n` operations of the journal, leaving the journal and the layer as a killed process
    /// would (so [`recover`] must finish). Returns the number of operations in the journal.
    #[doc(hidden)]
    pub fn commit_interrupted_after(&self, n: usize) -> Result<usize, Error> {
        let state = self.seal()?;
        Ok(commit::commit(&self.inner.cfg, &state, &[], Some(n))?.1)
    }

    /// Applies the layer's changes so far to the real trees while the filesystem keeps
    /// serving, so that processes outside the mount (the next nested thunks) see them; a
    /// synchronization point. Returns what it changed, counted as [`Handle::commit`] counts.
    ///
    /// When it returns, the real trees hold everything the thunk wrote until now and the layer
    /// is empty again: the thunk keeps working on a view that shows the same thing, later
    /// writes copy up into the layer as usual, and the final [`Handle::commit`] or
    /// [`Handle::discard`] applies or drops only what was written after the last publish. The
    /// layer's write lock is held throughout, so no request sees a half-published layer; the
    /// access log is unaffected.
    ///
    /// Files the thunk has open that live in the layer stay there: each is published as a copy,
    /// and its open descriptors keep reading and writing the layer's file, whose later content
    /// goes the way of the layer. (Data written through such a descriptor while the publish
    /// copies the file may or may not be in the published copy.)
    ///
    /// Crash-safe exactly like [`Handle::commit`]: the change is journaled first, and
    /// [`recover`] finishes a publish that was interrupted. An error before the journal is
    /// written leaves the layer and the real trees as they were. An error after it seals the
    /// layer as a finished commit does: later changes through the mount fail with EROFS, and
    /// [`recover`], once the filesystem is gone, finishes the publish and removes the layer.
    pub fn publish(&self) -> Result<CommitSummary, Error> {
        Ok(self.publish_until(None)?.0)
    }

    /// For crash tests: publishes like [`Handle::publish`] but stops after applying the first
    /// `n` operations of the journal, leaving the journal and the layer as a killed process
    /// would (the layer is sealed; [`recover`] must finish). Returns the number of operations
    /// in the journal.
    #[doc(hidden)]
    pub fn publish_interrupted_after(&self, n: usize) -> Result<usize, Error> {
        Ok(self.publish_until(Some(n))?.1)
    }

    fn publish_until(&self, stop: Option<usize>) -> Result<(CommitSummary, usize), Error> {
        let (published, dirs) = {
            let mut state = self.inner.layer.write();
            if state.sealed {
                return Err(Error::Finished {
                    path: self.inner.cfg.layer_dir.clone(),
                });
            }
            let open = self.inner.open_upper_files();
            let dirs: Vec<PathBuf> = state.upper_dirs.iter().cloned().collect();
            let published = commit::publish(&self.inner.cfg, &mut state, &open, stop)?;
            (published, dirs)
        };
        if stop.is_none() {
            // Without the lock: the kernel may need requests answered to drop attributes.
            self.inner.refresh_published(&dirs);
        }
        Ok(published)
    }

    /// Makes the mount show the current state of the view paths `paths` (absolute) after
    /// another process changed them in the real trees behind its back (e.g. a nested thunk's
    /// commit). Call it from a thread of the serving process that is not serving a FUSE
    /// request, after the change is complete and before the thunk should see it.
    ///
    /// For each path the filesystem knows: the kernel drops its attributes and page cache
    /// (and a cached symlink target). When the path now holds a non-directory or nothing, the
    /// kernel also drops its dentry, the nodes below it are detached, and if the thunk has it
    /// open or it is gone, the path gets a fresh node (a new `st_ino`): the open descriptors
    /// keep the old file, as after a rename over it on a real file system, and later opens
    /// get the new one. A directory keeps its node and dentry (processes may be working in
    /// it). The directory holding each path gets its attributes refetched. For a path the
    /// filesystem does not know, the kernel drops what it may have cached: an absence of the
    /// path or of its nearest ancestor the filesystem never found. Paths the filesystem never
    /// saw need nothing else: the filesystem caches no attributes, symlink targets or listings
    /// of its own (open handles keep their files, as on a real file system).
    ///
    /// A path the thunk changed itself keeps showing the layer's version: invalidating it is
    /// harmless. Dentries of mount points, and of directories holding one, are never dropped
    /// (that would detach the sandbox's mounts). Internal paths are skipped. Without a
    /// running session only the filesystem's own state is updated. A request racing with this
    /// for the same path (a lookup under way) may leave the old state cached; invalidate
    /// while the thunk waits for the change, as at a synchronization point.
    pub fn invalidate(&self, paths: &[PathBuf]) -> Result<(), Error> {
        self.inner.invalidate(paths)
    }

    /// Makes the real entries at the view paths `paths` (absolute) show even where the
    /// concealment rule ([`Options::conceal`]) would keep them out of the view: what another
    /// process wrote on the thunk's behalf (a nested thunk's outputs) is its own doing. Call it
    /// before [`Handle::invalidate`] of the same paths, so that the kernel forgets their
    /// absence.
    pub fn reveal(&self, paths: &[PathBuf]) {
        if self.inner.cfg.conceal.is_some() {
            let mut state = self.inner.layer.write();
            state
                .revealed
                .extend(paths.iter().map(|p| config::normalize(p)));
        }
    }

    /// Makes every lookup pass through `gate` first (see [`LookupGate`]). Set it before the
    /// mount serves anyone: lookups already answered are cached by the kernel. Only the first
    /// gate set counts.
    pub fn gate_lookups(&self, gate: LookupGate) {
        let _ = self.inner.gate.set(gate);
    }

    /// Marks the layer finished (only one of commit and discard may run, once) and keeps it
    /// locked for the caller.
    fn seal(&self) -> Result<RwLockWriteGuard<'_, LayerState>, Error> {
        let mut state = self.inner.layer.write();
        if state.sealed {
            return Err(Error::Finished {
                path: self.inner.cfg.layer_dir.clone(),
            });
        }
        state.sealed = true;
        Ok(state)
    }

    /// Removes the layer directory; the real filesystem is left untouched.
    pub fn discard(&self) -> Result<(), Error> {
        let _state = self.seal()?;
        journal::remove_layer(&self.inner.cfg.layer_dir)
    }

    /// Request counts so far.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            lookups: get(&c.lookups),
            opens: get(&c.opens),
            passthrough_opens: get(&c.passthrough_opens),
            reads: get(&c.reads),
            writes: get(&c.writes),
        }
    }

    /// Whether file data goes through kernel passthrough: INIT granted it and the kernel has
    /// not refused a backing file with EPERM since.
    pub fn passthrough_active(&self) -> bool {
        self.inner.passthrough_active.load(Ordering::Relaxed)
    }
}

/// A running FUSE session. Dropping it does not wait: the session threads end by themselves
/// when the mount goes away (the kernel then fails their reads of /dev/fuse with ENODEV).
pub struct Server {
    thread: Option<JoinHandle<std::io::Result<()>>>,
    done: mpsc::Receiver<()>,
}

impl Server {
    /// Waits until the session ends, i.e. until the mount is gone.
    pub fn join(mut self) -> Result<(), Error> {
        match self.thread.take() {
            Some(thread) => match thread.join() {
                Ok(result) => result.map_err(|source| Error::Session { source }),
                Err(_) => Err(Error::Session {
                    source: std::io::Error::other("a session thread panicked"),
                }),
            },
            None => Ok(()),
        }
    }

    /// Waits up to `timeout` for the session to end; true when it has.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        match self.done.recv_timeout(timeout) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
            Err(mpsc::RecvTimeoutError::Timeout) => false,
        }
    }

    /// Whether the session has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

/// Serves `fs` on an already mounted /dev/fuse descriptor (`fuser::Session::from_fd`, any user
/// may access the mount: permissions are the kernel's job under `default_permissions`), with
/// `threads` worker threads (at least 1) in the background. Returns once the INIT handshake
/// is done, which reads the INIT request the kernel queued at mount time (so it blocks if the
/// descriptor was never mounted).
///
/// While the session runs, the [`Handle`] can send the kernel cache invalidations
/// ([`Handle::invalidate`]).
///
/// The daemon holds one descriptor per file the thunk has open: raise the soft
/// `RLIMIT_NOFILE` of the serving process if thunks keep many files open.
pub fn serve(fs: ProxyFs, fd: OwnedFd, threads: usize) -> Result<Server, Error> {
    let mut config = fuser::Config::default();
    config.n_threads = Some(threads.max(1));
    config.acl = fuser::SessionACL::All;
    let inner = fs.inner.clone();
    let session = fuser::Session::from_fd(fs, fd, fuser::SessionACL::All, config)
        .map_err(|source| Error::Handshake { source })?;
    *inner.notifier.lock() = Some(session.notifier());
    let (tx, done) = mpsc::channel();
    let ended = inner.clone();
    let thread = std::thread::Builder::new()
        .name("cot-fusefs".into())
        .spawn(move || {
            let result = session.run();
            // The notifier holds the /dev/fuse descriptor: let it close with the session.
            ended.notifier.lock().take();
            let _ = tx.send(());
            result
        })
        .map_err(|source| {
            inner.notifier.lock().take();
            Error::Spawn { source }
        })?;
    Ok(Server {
        thread: Some(thread),
        done,
    })
}
