//! The filesystem operations as plain functions returning `Result<T, Errno>`.
//!
//! The `fuser::Filesystem` callbacks in `fuse.rs` only call these and reply. Recording happens
//! here, through `record` and `record_node`, after an operation succeeded (lookups also record
//! their failures: absence is a dependency). Lock order: layer, then nodes, then io, then dirs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{BackingId, Errno, FileAttr, FileType, FopenFlags, INodeNo, TimeOrNow};
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use crate::access::{AccessKind, AccessLog};
use crate::config::{normalize, upper_rel, Config};
use crate::layer::{self, is_absent, LayerState, Loc};
use crate::nodes::{Nodes, ROOT};
use crate::real;

/// State shared by the filesystem and the engine's [`crate::Handle`].
pub(crate) struct Inner {
    pub(crate) cfg: Config,
    pub(crate) layer: RwLock<LayerState>,
    pub(crate) log: AccessLog,
    /// Whether file data currently goes through kernel passthrough.
    pub(crate) passthrough_active: AtomicBool,
    pub(crate) stats: Counters,
    /// Here rather than in [`ProxyFs`] because [`crate::Handle::invalidate`] maps view paths
    /// to node ids and [`crate::Handle::publish`] needs the open files.
    nodes: RwLock<Nodes>,
    io: Mutex<IoTable>,
    /// Set by [`crate::serve`] while the session runs: how the handle tells the kernel to drop
    /// what it cached. Cleared when the session ends, so the /dev/fuse descriptor it holds
    /// closes with the session.
    pub(crate) notifier: Mutex<Option<fuser::Notifier>>,
    /// Set once by [`crate::Handle::gate_lookups`]: called before each lookup is resolved.
    pub(crate) gate: std::sync::OnceLock<crate::LookupGate>,
}

impl Inner {
    pub(crate) fn new(cfg: Config) -> Inner {
        Inner {
            cfg,
            layer: RwLock::new(LayerState::new()),
            log: AccessLog::default(),
            passthrough_active: AtomicBool::new(false),
            stats: Counters::default(),
            nodes: RwLock::new(Nodes::new()),
            io: Mutex::new(IoTable::default()),
            notifier: Mutex::new(None),
            gate: std::sync::OnceLock::new(),
        }
    }

    /// The identities (`st_dev`, `st_ino`) of the layer files behind open handles: the files a
    /// publish must leave in the layer, because their descriptors (and the kernel's passthrough
    /// backing files) keep pointing at them.
    pub(crate) fn open_upper_files(&self) -> HashSet<(u64, u64)> {
        let io = self.io.lock();
        io.handles
            .values()
            .filter_map(|handle| {
                let hf = handle.file.read();
                if hf.lower {
                    return None;
                }
                real::fstat(&*hf.file).ok().map(|st| (st.st_dev, st.st_ino))
            })
            .collect()
    }

    /// See [`crate::Handle::invalidate`]. Updates the node table under the locks, then sends
    /// the notifications with no lock held: the kernel may need a FUSE request answered (a
    /// page to write back, a lookup holding the parent's lock) before it can drop an entry.
    pub(crate) fn invalidate(&self, paths: &[PathBuf]) -> Result<(), crate::Error> {
        #[derive(PartialEq, Eq)]
        enum Now {
            /// The thunk's own version, which the change behind its back does not affect.
            Layer,
            Dir,
            /// Anything else, including what could not be resolved.
            Other,
            Absent,
        }
        let mut inodes: BTreeMap<u64, PathBuf> = BTreeMap::new();
        let mut entries: BTreeMap<(u64, OsString), PathBuf> = BTreeMap::new();
        {
            let state = self.layer.read();
            let mut nodes = self.nodes.write();
            let io = self.io.lock();
            let mut not_dirs = HashSet::new();
            for given in paths {
                if !given.is_absolute() {
                    return Err(crate::Error::Invalidate {
                        path: given.clone(),
                        source: io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "not an absolute view path",
                        ),
                    });
                }
                let path = normalize(given);
                if self.cfg.is_internal(&path) {
                    continue;
                }
                let now = match layer::resolve(&self.cfg, &state, &path) {
                    Ok(found) if found.loc == Loc::Upper => Now::Layer,
                    Ok(found) if found.is_dir() => Now::Dir,
                    Ok(_) => Now::Other,
                    Err(e) if is_absent(&e) => Now::Absent,
                    Err(_) => Now::Other,
                };
                // The directory holding the path changed too (times, link count).
                let parent = path.parent().and_then(|p| Some((p, nodes.id_of(p)?)));
                if let Some((p, id)) = parent {
                    inodes.entry(id).or_insert_with(|| p.to_path_buf());
                }
                let Some(ino) = nodes.id_of(&path) else {
                    // The kernel can have at most an absence cached: of the path, or of its
                    // nearest ancestor the filesystem never found.
                    let mut child = path.as_path();
                    while let (Some(up), Some(name)) = (child.parent(), child.file_name()) {
                        if let Some(id) = nodes.id_of(up) {
                            if !self.cfg.is_pinned(child) {
                                entries.insert((id, name.to_os_string()), child.to_path_buf());
                            }
                            break;
                        }
                        child = up;
                    }
                    continue;
                };
                inodes.insert(ino, path.clone());
                let open = io.nodes.contains_key(&ino);
                // A directory keeps its node and its dentry: dropping the dentry would turn
                // it into an unlinked directory for processes working in it (getcwd fails).
                if now == Now::Layer || (now == Now::Dir && !open) {
                    continue;
                }
                if now != Now::Dir {
                    not_dirs.insert(path.clone());
                }
                // Open files keep the old file; later opens must not share the node with them
                // (one kernel page cache and one passthrough backing file per node), so the
                // path gets a fresh node, as a rename over it gives a fresh inode.
                if now == Now::Absent || open {
                    nodes.detach(&path);
                }
                // Never for a mount point or a directory holding one: dropping its dentry
                // would detach the mounts of the sandbox.
                if let (Some((_, id)), Some(name)) = (parent, path.file_name()) {
                    if !self.cfg.is_pinned(&path) {
                        entries.insert((id, name.to_os_string()), path.clone());
                    }
                }
            }
            if !not_dirs.is_empty() {
                nodes.detach_below(&not_dirs);
            }
        }
        self.notify(inodes, true, entries)
    }

    /// After a publish: the kernel refetches the attributes of the directories that were in
    /// the layer and now show their real directories (times, link counts). File data, names
    /// and node ids are unchanged.
    pub(crate) fn refresh_published(&self, dirs: &[PathBuf]) {
        let inodes = {
            let nodes = self.nodes.read();
            dirs.iter()
                .filter_map(|p| Some((nodes.id_of(p)?, p.clone())))
                .collect()
        };
        if let Err(e) = self.notify(inodes, false, BTreeMap::new()) {
            log::warn!("after publishing {:?}: {e}", self.cfg.layer_dir);
        }
    }

    /// Tells the kernel to drop the attributes (and with `data` the page cache) of `inodes`
    /// and the dentries `entries`, when a session runs. Sends them all; returns the first
    /// failure. An answer that the kernel has nothing cached, or no mount any more, is success.
    fn notify(
        &self,
        inodes: BTreeMap<u64, PathBuf>,
        data: bool,
        entries: BTreeMap<(u64, OsString), PathBuf>,
    ) -> Result<(), crate::Error> {
        let Some(notifier) = self.notifier.lock().clone() else {
            return Ok(());
        };
        let mut result = Ok(());
        let mut check = |sent: io::Result<()>, path: PathBuf| {
            let Err(source) = sent else { return };
            // fuser already turns ENOENT (nothing cached) into success.
            let benign = [libc::ENOENT, libc::ENOTDIR, libc::ENODEV, libc::ENOTCONN];
            if source.raw_os_error().is_some_and(|e| benign.contains(&e)) {
                return;
            }
            if result.is_ok() {
                result = Err(crate::Error::Invalidate { path, source });
            }
        };
        let offset = if data { 0 } else { -1 };
        for (ino, path) in inodes {
            check(notifier.inval_inode(INodeNo(ino), offset, 0), path);
        }
        for ((parent, name), path) in entries {
            check(notifier.inval_entry(INodeNo(parent), &name), path);
        }
        result
    }
}

/// Request counters, for tests and benchmarks.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) lookups: AtomicU64,
    pub(crate) opens: AtomicU64,
    pub(crate) passthrough_opens: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) writes: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Creates a kernel backing id for an open file (the reply's `open_backing`).
pub(crate) type Opener<'a> = &'a dyn Fn(BorrowedFd<'_>) -> io::Result<BackingId>;

/// The answer to an open or create.
pub(crate) struct Opened {
    pub(crate) fh: u64,
    pub(crate) flags: FopenFlags,
    /// Set when the kernel should serve the data from this backing file itself.
    pub(crate) backing: Option<Arc<BackingId>>,
}

struct HandleFile {
    file: Arc<File>,
    /// The file is the lower (real) one; a copy-up must move the handle to the upper copy.
    lower: bool,
}

struct OpenHandle {
    node: u64,
    acc: OFlags,
    file: RwLock<HandleFile>,
}

/// Per-node data-path state. The kernel requires every concurrent open of an inode to use the
/// same passthrough backing file, and refuses (EIO) to mix passthrough and cached opens; so a
/// node is either all-passthrough (`backing` set) or all-cached while it has open handles.
#[derive(Default)]
struct NodeIo {
    handles: Vec<u64>,
    backing: Option<Arc<BackingId>>,
}

#[derive(Default)]
struct IoTable {
    handles: HashMap<u64, Arc<OpenHandle>>,
    nodes: HashMap<u64, NodeIo>,
}

/// One listed directory entry.
pub(crate) struct DirEntryOut {
    pub(crate) ino: u64,
    pub(crate) kind: FileType,
    pub(crate) name: OsString,
}

/// The FUSE proxy filesystem. Hand it to [`crate::serve`]; keep the [`crate::Handle`].
pub struct ProxyFs {
    pub(crate) inner: Arc<Inner>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntryOut>>>>,
    next_fh: AtomicU64,
}

pub(crate) fn errno(e: io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO)
}

fn acc_mode(flags: i32) -> OFlags {
    match flags & libc::O_ACCMODE {
        libc::O_WRONLY => OFlags::WRONLY,
        libc::O_RDWR => OFlags::RDWR,
        _ => OFlags::RDONLY,
    }
}

fn timespec(t: Option<TimeOrNow>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: d.subsec_nanos().into(),
            },
            Err(before) => {
                let d = before.duration();
                Timespec {
                    tv_sec: -i64::try_from(d.as_secs()).unwrap_or(i64::MAX) - 1,
                    tv_nsec: (1_000_000_000 - d.subsec_nanos()).into(),
                }
            }
        },
    }
}

/// The attributes `setattr` may change.
pub(crate) struct SetAttr {
    pub(crate) mode: Option<u32>,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    pub(crate) size: Option<u64>,
    pub(crate) atime: Option<TimeOrNow>,
    pub(crate) mtime: Option<TimeOrNow>,
}

impl ProxyFs {
    pub(crate) fn from_inner(inner: Arc<Inner>) -> ProxyFs {
        ProxyFs {
            inner,
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn cfg(&self) -> &Config {
        &self.inner.cfg
    }

    pub(crate) fn ttl(&self) -> std::time::Duration {
        self.inner.cfg.ttl
    }

    fn record(&self, kind: AccessKind, path: &Path, to: Option<&Path>) {
        self.inner.log.record(kind, path, to);
    }

    /// Records `kind` for the node's current path, once per node and path.
    fn record_node(&self, ino: u64, kind: AccessKind) {
        let nodes = self.inner.nodes.read();
        if let Some(node) = nodes.get(ino) {
            if node.first(kind) {
                self.inner.log.record(kind, &node.path, None);
            }
        }
    }

    /// Mount points and the root are the sandbox's scaffolding, not the thunk's dependencies.
    fn recorded(&self, path: &Path) -> bool {
        path != Path::new("/") && !self.cfg().mountpoints.contains(path)
    }

    fn node_path(&self, ino: u64) -> Result<Arc<Path>, Errno> {
        match self.inner.nodes.read().get(ino) {
            Some(node) if node.attached => Ok(node.path.clone()),
            _ => Err(Errno::ENOENT),
        }
    }

    fn child_path(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        if name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return Err(Errno::EINVAL);
        }
        Ok(self.node_path(parent)?.join(name))
    }

    /// Checks a path about to be created or replaced.
    fn check_new(&self, path: &Path) -> Result<(), Errno> {
        if self.cfg().is_internal(path) {
            return Err(Errno::EACCES);
        }
        if self.cfg().is_hidden(path) {
            self.record(AccessKind::Hidden, path, None);
            return Err(Errno::EACCES);
        }
        self.check_writable(path)
    }

    fn check_writable(&self, path: &Path) -> Result<(), Errno> {
        if self.cfg().is_writable(path) {
            Ok(())
        } else {
            Err(Errno::EROFS)
        }
    }

    fn check_sealed(state: &LayerState) -> Result<(), Errno> {
        if state.sealed {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// The owner for a new entry: the requester, or the parent's group under a set-gid parent.
    fn new_owner(&self, parent_st: &rustix::fs::Stat, uid: u32, gid: u32) -> Option<(u32, u32)> {
        if !self.cfg().root {
            return None;
        }
        let gid = if parent_st.st_mode & libc::S_ISGID != 0 {
            parent_st.st_gid
        } else {
            gid
        };
        Some((uid, gid))
    }

    /// Creates the upper parent of `path` and opens it.
    fn upper_parent(
        &self,
        state: &mut LayerState,
        path: &Path,
    ) -> Result<(std::os::fd::OwnedFd, rustix::fs::Stat), Errno> {
        let parent = path.parent().ok_or(Errno::EINVAL)?;
        layer::ensure_upper_dir(self.cfg(), state, parent).map_err(errno)?;
        let pdir = real::open_dir(self.cfg().layer_fd.as_fd(), upper_rel(parent)).map_err(errno)?;
        let st = real::fstat(&pdir).map_err(errno)?;
        Ok((pdir, st))
    }

    fn chown_new(
        &self,
        pdir: BorrowedFd<'_>,
        name: &OsStr,
        owner: Option<(u32, u32)>,
    ) -> Result<(), Errno> {
        if let Some((uid, gid)) = owner {
            rustix::fs::chownat(
                pdir,
                name,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| errno(e.into()))?;
        }
        Ok(())
    }

    /// A fresh node for a newly created path (an old node there may still be cached by the
    /// kernel for another file).
    fn new_node(&self, path: &Path) -> u64 {
        let mut nodes = self.inner.nodes.write();
        nodes.detach(path);
        nodes.lookup(path)
    }

    /// Moves cached handles of lower files under `prefix` to their upper copies. Called with
    /// the layer write lock held, after a copy-up.
    fn retarget(&self, prefix: &Path) -> Result<(), Errno> {
        let nodes = self.inner.nodes.read();
        let io = self.inner.io.lock();
        for (ino, nio) in &io.nodes {
            if nio.backing.is_some() {
                continue;
            }
            let Some(node) = nodes.get(*ino) else {
                continue;
            };
            // A detached node's path names another file now (or none).
            if !node.attached || !node.path.starts_with(prefix) {
                continue;
            }
            for fh in &nio.handles {
                let Some(handle) = io.handles.get(fh) else {
                    continue;
                };
                let mut hf = handle.file.write();
                if !hf.lower {
                    continue;
                }
                let fd = real::open_beneath(
                    self.cfg().layer_fd.as_fd(),
                    upper_rel(&node.path),
                    handle.acc | OFlags::NONBLOCK,
                    Mode::empty(),
                )
                .map_err(errno)?;
                *hf = HandleFile {
                    file: Arc::new(File::from(fd)),
                    lower: false,
                };
            }
        }
        Ok(())
    }

    // ----- lookups and attributes -----

    pub(crate) fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        bump(&self.inner.stats.lookups);
        let path = self.child_path(parent, name)?;
        if self.cfg().is_internal(&path) {
            return Err(Errno::ENOENT);
        }
        // Before the layer's lock: the gate may wait long, and a publish needs that lock.
        if let Some(gate) = self.inner.gate.get() {
            if !self.cfg().is_hidden(&path) {
                (gate.0)(&path).map_err(|_| Errno::EIO)?;
            }
        }
        let state = self.inner.layer.read();
        if self.cfg().is_hidden(&path) {
            self.record(AccessKind::Hidden, &path, None);
            return Err(Errno::ENOENT);
        }
        match layer::resolve(self.cfg(), &state, &path) {
            Ok(found) => {
                let ino = self.inner.nodes.write().lookup(&path);
                if self.recorded(&path) {
                    self.record_node(ino, AccessKind::Stat);
                }
                Ok(found.attr(ino))
            }
            Err(e) if is_absent(&e) => {
                if layer::concealed(self.cfg(), &state, &path) {
                    self.record(AccessKind::Hidden, &path, None);
                } else if self.recorded(&path) {
                    self.record(AccessKind::Absent, &path, None);
                }
                Err(Errno::ENOENT)
            }
            Err(e) => Err(errno(e)),
        }
    }

    pub(crate) fn forget(&self, ino: u64, n: u64) {
        self.inner.nodes.write().forget(ino, n);
    }

    /// A file of an open handle on `ino`, for nodes no path leads to any more, and whether it
    /// is a lower (real) file, which must never be changed.
    fn any_open_file(&self, ino: u64) -> Option<(Arc<File>, bool)> {
        let io = self.inner.io.lock();
        let fh = io.nodes.get(&ino)?.handles.first()?;
        let handle = io.handles.get(fh)?;
        let hf = handle.file.read();
        Some((hf.file.clone(), hf.lower))
    }

    fn handle(&self, fh: u64) -> Result<Arc<OpenHandle>, Errno> {
        self.inner
            .io
            .lock()
            .handles
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn handle_file(&self, fh: u64) -> Result<Arc<File>, Errno> {
        let handle = self.handle(fh)?;
        let file = handle.file.read().file.clone();
        Ok(file)
    }

    pub(crate) fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, Errno> {
        if let Some(fh) = fh {
            if let Ok(file) = self.handle_file(fh) {
                let st = real::fstat(&*file).map_err(errno)?;
                return Ok(real::attr(&st, ino));
            }
        }
        let state = self.inner.layer.read();
        match self.node_path(ino) {
            Ok(path) => {
                let found = layer::resolve(self.cfg(), &state, &path).map_err(errno)?;
                Ok(found.attr(ino))
            }
            Err(e) => {
                drop(state);
                let (file, _) = self.any_open_file(ino).ok_or(e)?;
                let st = real::fstat(&*file).map_err(errno)?;
                Ok(real::attr(&st, ino))
            }
        }
    }

    pub(crate) fn setattr(
        &self,
        ino: u64,
        fh: Option<u64>,
        set: SetAttr,
    ) -> Result<FileAttr, Errno> {
        let path = match self.node_path(ino) {
            Ok(path) => path,
            Err(e) => {
                // Unlinked but still open: change the file behind the handle, unless it is
                // a real file (the thunk deleted it from its view, it cannot change it).
                let given = fh.and_then(|fh| self.handle(fh).ok()).map(|h| {
                    let hf = h.file.read();
                    (hf.file.clone(), hf.lower)
                });
                let (file, lower) = given.or_else(|| self.any_open_file(ino)).ok_or(e)?;
                if lower {
                    return Err(Errno::EROFS);
                }
                return self.setattr_fd(ino, &file, &set);
            }
        };
        self.check_writable(&path)?;
        let mut state = self.inner.layer.write();
        Self::check_sealed(&state)?;
        let found = layer::resolve(self.cfg(), &state, &path).map_err(errno)?;
        match found.loc {
            Loc::Synthetic => return Err(Errno::EPERM),
            Loc::Lower => {
                layer::copy_up(self.cfg(), &mut state, &path).map_err(errno)?;
                self.retarget(&path)?;
            }
            Loc::Upper => {}
        }
        let rel = upper_rel(&path);
        let (prel, name) = real::split(rel).map_err(errno)?;
        let pdir = real::open_dir(self.cfg().layer_fd.as_fd(), prel).map_err(errno)?;
        let st = real::stat_at(pdir.as_fd(), name).map_err(errno)?;
        let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if let Some(size) = set.size {
            if real::is_dir(&st) {
                return Err(Errno::EISDIR);
            }
            let fd = real::open_beneath(
                self.cfg().layer_fd.as_fd(),
                rel,
                OFlags::WRONLY | OFlags::NONBLOCK,
                Mode::empty(),
            )
            .map_err(errno)?;
            rustix::fs::ftruncate(&fd, size).map_err(|e| errno(e.into()))?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            let changes =
                set.uid.is_some_and(|u| u != st.st_uid) || set.gid.is_some_and(|g| g != st.st_gid);
            if changes && !self.cfg().root {
                return Err(Errno::EPERM);
            }
            rustix::fs::chownat(
                &pdir,
                name,
                set.uid.map(rustix::fs::Uid::from_raw),
                set.gid.map(rustix::fs::Gid::from_raw),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| errno(e.into()))?;
        }
        if let Some(mode) = set.mode {
            if !is_link {
                rustix::fs::chmodat(
                    &pdir,
                    name,
                    Mode::from_raw_mode(mode & 0o7777),
                    AtFlags::empty(),
                )
                .map_err(|e| errno(e.into()))?;
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = Timestamps {
                last_access: timespec(set.atime),
                last_modification: timespec(set.mtime),
            };
            rustix::fs::utimensat(&pdir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| errno(e.into()))?;
        }
        if real::is_dir(&st) {
            state.dirty_dirs.insert(path.to_path_buf());
        }
        let st = real::stat_at(pdir.as_fd(), name).map_err(errno)?;
        drop(state);
        self.record_node(ino, AccessKind::Setattr);
        Ok(real::attr(&st, ino))
    }

    fn setattr_fd(&self, ino: u64, file: &File, set: &SetAttr) -> Result<FileAttr, Errno> {
        if let Some(size) = set.size {
            rustix::fs::ftruncate(file, size).map_err(|e| errno(e.into()))?;
        }
        if let Some(mode) = set.mode {
            rustix::fs::fchmod(file, Mode::from_raw_mode(mode & 0o7777))
                .map_err(|e| errno(e.into()))?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            rustix::fs::fchown(
                file,
                set.uid.map(rustix::fs::Uid::from_raw),
                set.gid.map(rustix::fs::Gid::from_raw),
            )
            .map_err(|e| errno(e.into()))?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = Timestamps {
                last_access: timespec(set.atime),
                last_modification: timespec(set.mtime),
            };
            rustix::fs::futimens(file, &times).map_err(|e| errno(e.into()))?;
        }
        let st = real::fstat(file).map_err(errno)?;
        Ok(real::attr(&st, ino))
    }

    pub(crate) fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let state = self.inner.layer.read();
        let path = self.node_path(ino)?;
        let found = layer::resolve(self.cfg(), &state, &path).map_err(errno)?;
        let fd = found.fd.ok_or(Errno::EINVAL)?;
        let target = rustix::fs::readlinkat(&fd, "", Vec::new()).map_err(|e| errno(e.into()))?;
        drop(state);
        self.record_node(ino, AccessKind::Readlink);
        Ok(target.into_bytes())
    }

    // ----- creating and removing names -----

    pub(crate) fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => rustix::fs::FileType::RegularFile,
            libc::S_IFIFO => rustix::fs::FileType::Fifo,
            libc::S_IFSOCK => rustix::fs::FileType::Socket,
            _ => return Err(Errno::EPERM),
        };
        let (path, attr) = self.make_entry(parent, name, uid, gid, |pdir, _| {
            rustix::fs::mknodat(pdir, name, kind, Mode::from_raw_mode(mode & 0o7777), 0)
        })?;
        self.record(AccessKind::Write, &path, None);
        Ok(attr)
    }

    /// Makes a new name in the upper layer, for mknod, mkdir and symlink: checks that the path
    /// may be created and is absent, holds the layer for writing, creates the upper parent,
    /// runs `make` in it (given the parent's metadata), gives the entry its owner, and returns
    /// the path and its attributes on a fresh node.
    fn make_entry(
        &self,
        parent: u64,
        name: &OsStr,
        uid: u32,
        gid: u32,
        make: impl FnOnce(BorrowedFd<'_>, &rustix::fs::Stat) -> rustix::io::Result<()>,
    ) -> Result<(PathBuf, FileAttr), Errno> {
        let path = self.child_path(parent, name)?;
        self.check_new(&path)?;
        let mut state = self.inner.layer.write();
        Self::check_sealed(&state)?;
        self.check_absent(&state, &path)?;
        let (pdir, pst) = self.upper_parent(&mut state, &path)?;
        make(pdir.as_fd(), &pst).map_err(|e| errno(e.into()))?;
        self.chown_new(pdir.as_fd(), name, self.new_owner(&pst, uid, gid))?;
        let st = real::stat_at(pdir.as_fd(), name).map_err(errno)?;
        if real::is_dir(&st) {
            // A directory made by the thunk shows nothing of the lower tree at its path.
            state.upper_dirs.insert(path.clone());
            state.opaque.insert(path.clone());
            state.dirty_dirs.insert(path.clone());
        }
        let ino = self.new_node(&path);
        Ok((path, real::attr(&st, ino)))
    }

    fn check_absent(&self, state: &LayerState, path: &Path) -> Result<(), Errno> {
        match layer::resolve(self.cfg(), state, path) {
            Ok(_) => Err(Errno::EEXIST),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(errno(e)),
        }
    }

    pub(crate) fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        let (path, attr) = self.make_entry(parent, name, uid, gid, |pdir, pst| {
            let mut mode = mode & 0o7777;
            if pst.st_mode & libc::S_ISGID != 0 {
                mode |= libc::S_ISGID;
            }
            rustix::fs::mkdirat(pdir, name, Mode::from_raw_mode(mode))
        })?;
        self.record(AccessKind::Mkdir, &path, None);
        Ok(attr)
    }

    pub(crate) fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &Path,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        let (path, attr) = self.make_entry(parent, name, uid, gid, |pdir, _| {
            rustix::fs::symlinkat(target, pdir, name)
        })?;
        self.record(AccessKind::Symlink, &path, Some(target));
        Ok(attr)
    }

    pub(crate) fn link(
        &self,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
    ) -> Result<FileAttr, Errno> {
        let from = self.node_path(ino)?;
        let to = self.child_path(newparent, newname)?;
        self.check_new(&to)?;
        self.check_writable(&from)?;
        let mut state = self.inner.layer.write();
        Self::check_sealed(&state)?;
        self.check_absent(&state, &to)?;
        let found = layer::resolve(self.cfg(), &state, &from).map_err(errno)?;
        if found.is_dir() {
            return Err(Errno::EPERM);
        }
        if found.loc == Loc::Lower {
            layer::copy_up(self.cfg(), &mut state, &from).map_err(errno)?;
            self.retarget(&from)?;
        }
        let (src_rel, src_name) = real::split(upper_rel(&from)).map_err(errno)?;
        let src_dir = real::open_dir(self.cfg().layer_fd.as_fd(), src_rel).map_err(errno)?;
        let (pdir, _) = self.upper_parent(&mut state, &to)?;
        rustix::fs::linkat(&src_dir, src_name, &pdir, newname, AtFlags::empty())
            .map_err(|e| errno(e.into()))?;
        let st = real::stat_at(pdir.as_fd(), newname).map_err(errno)?;
        let new_ino = self.new_node(&to);
        drop(state);
        self.record(AccessKind::Link, &from, Some(&to));
        Ok(real::attr(&st, new_ino))
    }

    pub(crate) fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.remove(parent, name, false)
    }

    pub(crate) fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let path = self.child_path(parent, name)?;
        if self.cfg().is_internal(&path) || self.cfg().is_hidden(&path) {
            return Err(Errno::ENOENT);
        }
        self.check_writable(&path)?;
        if self.cfg().is_pinned(&path) {
            return Err(Errno::EBUSY);
        }
        let mut state = self.inner.layer.write();
        Self::check_sealed(&state)?;
        let found = layer::resolve(self.cfg(), &state, &path).map_err(errno)?;
        match (dir, found.is_dir()) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            _ => {}
        }
        if dir {
            let entries = layer::merged_list(self.cfg(), &state, &path).map_err(errno)?;
            if !entries.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
        }
        let had_lower = layer::lower_exists(self.cfg(), &state, &path);
        match found.loc {
            Loc::Synthetic => return Err(Errno::EBUSY),
            Loc::Upper => {
                let (prel, _) = real::split(upper_rel(&path)).map_err(errno)?;
                let pdir = real::open_dir(self.cfg().layer_fd.as_fd(), prel).map_err(errno)?;
                let flags = if dir {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                rustix::fs::unlinkat(&pdir, name, flags).map_err(|e| errno(e.into()))?;
                if dir {
                    state.upper_dirs.remove(&path);
                    state.opaque.remove(&path);
                    state.dirty_dirs.remove(&path);
                }
            }
            Loc::Lower => {}
        }
        if had_lower {
            state.whiteouts.insert(path.clone());
        }
        self.inner.nodes.write().detach(&path);
        drop(state);
        let kind = if dir {
            AccessKind::Rmdir
        } else {
            AccessKind::Delete
        };
        self.record(kind, &path, None);
        Ok(())
    }

    pub(crate) fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        let from = self.child_path(parent, name)?;
        let to = self.child_path(newparent, newname)?;
        if self.cfg().is_internal(&from) || self.cfg().is_hidden(&from) {
            return Err(Errno::ENOENT);
        }
        if flags & libc::RENAME_EXCHANGE != 0 || flags & libc::RENAME_WHITEOUT != 0 {
            return Err(Errno::EINVAL);
        }
        self.check_new(&to)?;
        self.check_writable(&from)?;
        if self.cfg().is_pinned(&from) || self.cfg().is_pinned(&to) {
            return Err(Errno::EBUSY);
        }
        let mut state = self.inner.layer.write();
        Self::check_sealed(&state)?;
        let src = layer::resolve(self.cfg(), &state, &from).map_err(errno)?;
        let src_dir = src.is_dir();
        if src_dir && to.starts_with(&from) && to != from {
            return Err(Errno::EINVAL);
        }
        match layer::resolve(self.cfg(), &state, &to) {
            Ok(dst) => {
                if flags & libc::RENAME_NOREPLACE != 0 {
                    return Err(Errno::EEXIST);
                }
                if from == to {
                    return Ok(());
                }
                match (src_dir, dst.is_dir()) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) => {
                        let entries = layer::merged_list(self.cfg(), &state, &to).map_err(errno)?;
                        if !entries.is_empty() {
                            return Err(Errno::ENOTEMPTY);
                        }
                    }
                    (false, false) => {}
                }
            }
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(errno(e)),
        }
        let src_lower = layer::lower_exists(self.cfg(), &state, &from);
        let dst_lower = layer::lower_exists(self.cfg(), &state, &to);
        if src_dir {
            if src_lower {
                layer::materialize(self.cfg(), &mut state, &from).map_err(errno)?;
            }
        } else if src.loc == Loc::Lower {
            layer::copy_up(self.cfg(), &mut state, &from).map_err(errno)?;
        }
        let (src_rel, src_name) = real::split(upper_rel(&from)).map_err(errno)?;
        let src_pdir = real::open_dir(self.cfg().layer_fd.as_fd(), src_rel).map_err(errno)?;
        let (dst_pdir, _) = self.upper_parent(&mut state, &to)?;
        rustix::fs::renameat(&src_pdir, src_name, &dst_pdir, newname)
            .map_err(|e| errno(e.into()))?;
        if src_dir {
            // An upper directory moved over stays only in `upper_dirs` if it was replaced.
            state.upper_dirs.retain(|p| !p.starts_with(&to));
            state.opaque.retain(|p| !p.starts_with(&to));
            state.dirty_dirs.retain(|p| !p.starts_with(&to));
            state.move_marks(&from, &to);
            state.opaque.insert(to.clone());
        }
        if src_lower {
            state.whiteouts.insert(from.clone());
        }
        if dst_lower {
            state.whiteouts.insert(to.clone());
        }
        self.inner.nodes.write().rename(&from, &to, src_dir);
        self.retarget(&to)?;
        drop(state);
        self.record(AccessKind::Rename, &from, Some(&to));
        Ok(())
    }

    // ----- file data -----

    /// Opens the current backing file of `path` for reading.
    fn open_existing(
        &self,
        state: &LayerState,
        path: &Path,
        acc: OFlags,
    ) -> Result<(File, bool), Errno> {
        let flags = acc | OFlags::NONBLOCK;
        if state.upper_may_have(path) {
            match real::open_beneath(
                self.cfg().layer_fd.as_fd(),
                upper_rel(path),
                flags,
                Mode::empty(),
            ) {
                Ok(fd) => return Ok((File::from(fd), false)),
                Err(e) if is_absent(&e) => {}
                Err(e) => return Err(errno(e)),
            }
        }
        if state.lower_masked(path) {
            return Err(Errno::ENOENT);
        }
        let (bind, rel) = self.cfg().lower(path);
        let fd = real::open_beneath(bind.fd.as_fd(), rel, flags, Mode::empty()).map_err(errno)?;
        Ok((File::from(fd), true))
    }

    pub(crate) fn open(&self, ino: u64, flags: i32, opener: Opener<'_>) -> Result<Opened, Errno> {
        let acc = acc_mode(flags);
        let trunc = flags & libc::O_TRUNC != 0;
        let write = acc != OFlags::RDONLY || trunc;
        let path = match self.node_path(ino) {
            Ok(path) => path,
            Err(e) => return self.reopen_detached(ino, acc, e, opener),
        };
        if write {
            self.check_writable(&path)?;
        }
        let (file, lower, state) = if write {
            let mut state = self.inner.layer.write();
            Self::check_sealed(&state)?;
            let found = layer::resolve(self.cfg(), &state, &path).map_err(errno)?;
            if found.is_dir() {
                return Err(Errno::EISDIR);
            }
            if found.loc == Loc::Lower {
                layer::copy_up(self.cfg(), &mut state, &path).map_err(errno)?;
                self.retarget(&path)?;
            }
            let (file, lower) = self.open_existing(&state, &path, acc)?;
            if trunc {
                file.set_len(0).map_err(errno)?;
            }
            (file, lower, RwLockWriteGuard::downgrade(state))
        } else {
            let state = self.inner.layer.read();
            let (file, lower) = self.open_existing(&state, &path, acc)?;
            (file, lower, state)
        };
        // The layer stays locked until the handle is registered: a copy-up must find it to
        // move it, a publish to leave its file in the layer.
        let opened = self.finish_open(ino, &path, file, lower, acc, opener);
        drop(state);
        if acc != OFlags::WRONLY && !trunc {
            self.record_node(ino, AccessKind::Read);
        }
        if write {
            self.record_node(ino, AccessKind::Write);
        }
        Ok(opened)
    }

    /// Opening a node no path names any more (e.g. through /proc/PID/fd of an unlinked file).
    fn reopen_detached(
        &self,
        ino: u64,
        acc: OFlags,
        e: Errno,
        opener: Opener<'_>,
    ) -> Result<Opened, Errno> {
        let (existing, lower) = self.any_open_file(ino).ok_or(e)?;
        if lower && acc != OFlags::RDONLY {
            return Err(Errno::EROFS);
        }
        let proc_path = format!("/proc/self/fd/{}", existing.as_raw_fd());
        let fd = rustix::fs::open(proc_path.as_str(), acc | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| errno(e.into()))?;
        let path = self
            .inner
            .nodes
            .read()
            .get(ino)
            .map(|n| n.path.clone())
            .ok_or(e)?;
        Ok(self.finish_open(ino, &path, File::from(fd), lower, acc, opener))
    }

    /// Registers an open file and chooses its data path (see `NodeIo`). Callers opening a
    /// path keep the layer locked until this returns (see `open`).
    fn finish_open(
        &self,
        ino: u64,
        path: &Path,
        file: File,
        lower: bool,
        acc: OFlags,
        opener: Opener<'_>,
    ) -> Opened {
        let passthrough = self.inner.passthrough_active.load(Ordering::Relaxed);
        // A lower file the thunk may still copy up cannot be pinned as a backing file: the
        // kernel would keep serving the lower file to the handles open before the copy-up.
        let pinnable = !lower || !self.cfg().is_writable(path);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut io = self.inner.io.lock();
        let nio = io.nodes.entry(ino).or_default();
        let backing = match &nio.backing {
            Some(b) => Some(b.clone()),
            None if passthrough && pinnable && nio.handles.is_empty() => {
                match opener(file.as_fd()) {
                    Ok(b) => {
                        let b = Arc::new(b);
                        nio.backing = Some(b.clone());
                        Some(b)
                    }
                    Err(e) => {
                        if e.raw_os_error() == Some(libc::EPERM) {
                            log::warn!(
                                "fuse passthrough refused ({e}); serving file data in userspace"
                            );
                            self.inner
                                .passthrough_active
                                .store(false, Ordering::Relaxed);
                        } else {
                            log::debug!("no passthrough for {path:?}: {e}");
                        }
                        None
                    }
                }
            }
            None => None,
        };
        nio.handles.push(fh);
        bump(&self.inner.stats.opens);
        if backing.is_some() {
            bump(&self.inner.stats.passthrough_opens);
        }
        let mut flags = if backing.is_none() && (lower || !passthrough) {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        if acc == OFlags::RDONLY {
            // Nothing to flush on close of a read-only file: spare the round trip.
            flags |= FopenFlags::FOPEN_NOFLUSH;
        }
        io.handles.insert(
            fh,
            Arc::new(OpenHandle {
                node: ino,
                acc,
                file: RwLock::new(HandleFile {
                    file: Arc::new(file),
                    lower,
                }),
            }),
        );
        Opened { fh, flags, backing }
    }

    #[expect(clippy::too_many_arguments, reason = "mirrors the FUSE create request")]
    pub(crate) fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        uid: u32,
        gid: u32,
        opener: Opener<'_>,
    ) -> Result<(FileAttr, Opened), Errno> {
        let path = self.child_path(parent, name)?;
        self.check_new(&path)?;
        let mut state = self.inner.layer.write();
        Self::check_sealed(&state)?;
        match layer::resolve(self.cfg(), &state, &path) {
            Ok(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
            Ok(_) => {
                // The kernel thought the name absent; open what is there instead.
                drop(state);
                let attr = self.lookup(parent, name)?;
                let opened = self.open(attr.ino.0, flags & !libc::O_CREAT, opener)?;
                return Ok((attr, opened));
            }
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(errno(e)),
        }
        let (pdir, pst) = self.upper_parent(&mut state, &path)?;
        let fd = rustix::fs::openat(
            &pdir,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(mode & 0o7777),
        )
        .map_err(|e| errno(e.into()))?;
        if let Some((uid, gid)) = self.new_owner(&pst, uid, gid) {
            rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| errno(e.into()))?;
        }
        let st = real::fstat(&fd).map_err(errno)?;
        let ino = self.new_node(&path);
        // Registered before the layer is unlocked, so a publish leaves the file in the layer.
        let opened = self.finish_open(ino, &path, File::from(fd), false, acc_mode(flags), opener);
        drop(state);
        self.record(AccessKind::Write, &path, None);
        Ok((real::attr(&st, ino), opened))
    }

    pub(crate) fn release(&self, fh: u64) {
        let mut io = self.inner.io.lock();
        if let Some(handle) = io.handles.remove(&fh) {
            let empty = match io.nodes.get_mut(&handle.node) {
                Some(nio) => {
                    nio.handles.retain(|h| *h != fh);
                    nio.handles.is_empty()
                }
                None => false,
            };
            if empty {
                // Dropping the last reference closes the kernel backing id.
                io.nodes.remove(&handle.node);
            }
        }
    }

    pub(crate) fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        bump(&self.inner.stats.reads);
        let file = self.handle_file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub(crate) fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        bump(&self.inner.stats.writes);
        let file = self.handle_file(fh)?;
        file.write_all_at(data, offset).map_err(errno)?;
        u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
    }

    pub(crate) fn fsync(&self, fh: u64, datasync: bool) -> Result<(), Errno> {
        let file = self.handle_file(fh)?;
        if datasync {
            file.sync_data().map_err(errno)
        } else {
            file.sync_all().map_err(errno)
        }
    }

    pub(crate) fn fallocate(
        &self,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        let file = self.handle_file(fh)?;
        let mode = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
        rustix::fs::fallocate(&*file, mode, offset, length).map_err(|e| errno(e.into()))
    }

    pub(crate) fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64, Errno> {
        let file = self.handle_file(fh)?;
        let pos = match whence {
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
            libc::SEEK_CUR => rustix::fs::SeekFrom::Current(offset),
            libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
            _ => return Err(Errno::EINVAL),
        };
        let at = rustix::fs::seek(&*file, pos).map_err(|e| errno(e.into()))?;
        i64::try_from(at).map_err(|_| Errno::EOVERFLOW)
    }

    pub(crate) fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> Result<u32, Errno> {
        let input = self.handle_file(fh_in)?;
        let output = self.handle_file(fh_out)?;
        let mut off_in = offset_in;
        let mut off_out = offset_out;
        let len = usize::try_from(len.min(u32::MAX as u64)).unwrap_or(usize::MAX);
        let n = rustix::fs::copy_file_range(
            &*input,
            Some(&mut off_in),
            &*output,
            Some(&mut off_out),
            len,
        )
        .map_err(|e| errno(e.into()))?;
        u32::try_from(n).map_err(|_| Errno::EOVERFLOW)
    }

    // ----- directories -----

    pub(crate) fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        self.node_path(ino)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, Arc::new(Vec::new()));
        Ok(fh)
    }

    /// The entries from `offset` on; a listing is taken afresh at offset 0 (also on rewind).
    pub(crate) fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
    ) -> Result<Arc<Vec<DirEntryOut>>, Errno> {
        if offset != 0 {
            return self.dirs.lock().get(&fh).cloned().ok_or(Errno::EBADF);
        }
        let state = self.inner.layer.read();
        let path = self.node_path(ino)?;
        let list = layer::merged_list(self.cfg(), &state, &path).map_err(errno)?;
        let mut entries = Vec::with_capacity(list.len() + 2);
        {
            let mut nodes = self.inner.nodes.write();
            let parent = path.parent().and_then(|p| nodes.id_of(p)).unwrap_or(ROOT);
            entries.push(DirEntryOut {
                ino,
                kind: FileType::Directory,
                name: OsString::from("."),
            });
            entries.push(DirEntryOut {
                ino: parent,
                kind: FileType::Directory,
                name: OsString::from(".."),
            });
            for (name, kind, loc) in list {
                let child = path.join(&name);
                if self.cfg().is_internal(&child) || self.cfg().is_hidden(&child) {
                    continue;
                }
                if loc == Loc::Lower
                    && state.conceals(self.cfg(), &child, kind == FileType::Directory)
                {
                    continue;
                }
                entries.push(DirEntryOut {
                    ino: nodes.id_for(&child),
                    kind,
                    name,
                });
            }
        }
        drop(state);
        let entries = Arc::new(entries);
        self.dirs.lock().insert(fh, entries.clone());
        self.record_node(ino, AccessKind::Readdir);
        Ok(entries)
    }

    pub(crate) fn releasedir(&self, fh: u64) {
        self.dirs.lock().remove(&fh);
    }

    // ----- whole-filesystem queries -----

    pub(crate) fn statfs(&self, ino: u64) -> Result<rustix::fs::StatVfs, Errno> {
        let path = self
            .node_path(ino)
            .unwrap_or_else(|_| Arc::from(Path::new("/")));
        let (bind, _) = self.cfg().lower(&path);
        rustix::fs::fstatvfs(&bind.fd).map_err(|e| errno(e.into()))
    }

    /// Runs `f` on a `/proc/self/fd` path naming the node's backing entry (xattr calls have no
    /// `O_PATH`-descriptor form). Symlinks carry no xattrs here.
    fn with_xattr_path<T>(
        &self,
        ino: u64,
        f: impl FnOnce(&str) -> rustix::io::Result<T>,
    ) -> Result<Option<T>, Errno> {
        let state = self.inner.layer.read();
        let path = self.node_path(ino)?;
        let found = layer::resolve(self.cfg(), &state, &path).map_err(errno)?;
        let Some(fd) = found.fd else {
            return Ok(None);
        };
        if found
            .st
            .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
        {
            return Ok(None);
        }
        let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        match f(&proc_path) {
            Ok(v) => Ok(Some(v)),
            Err(rustix::io::Errno::NOENT) => Err(Errno::ENOTSUP),
            Err(e) => Err(errno(e.into())),
        }
    }

    /// The value of an xattr (`size == 0`: only its length).
    pub(crate) fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<Xattr, Errno> {
        let got = self.with_xattr_path(ino, |p| {
            if size == 0 {
                rustix::fs::getxattr(p, name, &mut [0u8; 0][..]).map(Xattr::Size)
            } else {
                let mut buf = vec![0u8; size as usize];
                let n = rustix::fs::getxattr(p, name, &mut buf[..])?;
                buf.truncate(n);
                Ok(Xattr::Data(buf))
            }
        })?;
        got.ok_or(Errno::ENODATA)
    }

    pub(crate) fn listxattr(&self, ino: u64, size: u32) -> Result<Xattr, Errno> {
        let got = self.with_xattr_path(ino, |p| {
            if size == 0 {
                rustix::fs::listxattr(p, &mut [0u8; 0][..]).map(Xattr::Size)
            } else {
                let mut buf = vec![0u8; size as usize];
                let n = rustix::fs::listxattr(p, &mut buf[..])?;
                buf.truncate(n);
                Ok(Xattr::Data(buf))
            }
        })?;
        Ok(got.unwrap_or(if size == 0 {
            Xattr::Size(0)
        } else {
            Xattr::Data(Vec::new())
        }))
    }

    /// setxattr and removexattr: never stored, but EROFS where nothing may change.
    pub(crate) fn change_xattr(&self, ino: u64) -> Result<(), Errno> {
        let path = self.node_path(ino)?;
        self.check_writable(&path)?;
        Err(Errno::ENOTSUP)
    }
}

/// A getxattr or listxattr answer.
pub(crate) enum Xattr {
    Size(usize),
    Data(Vec<u8>),
}
