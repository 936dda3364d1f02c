//! Applying the layer to the real filesystem, crash-safely.
//!
//! Commit makes every real path the layer touched equal to the merged view. It first plans
//! the whole change as a list of operations, reading the layer and the real trees:
//!
//! 1. deletions, deepest first: each whiteout deletes its real path (recursively), unless the
//!    layer puts something there again. A directory deleted and made again keeps its real
//!    directory, whose old entries are deleted one by one (recursing into the ones the layer
//!    has again); a non-directory put in place replaces whatever is there when it is moved;
//! 2. directories the real trees lack, parents first (a non-directory in the way is removed);
//! 3. files, symlinks, fifos and sockets moved from the layer with `rename(2)`, each replacing
//!    its destination atomically (a directory in the way is removed first). Across file
//!    systems a file is copied to a temporary name beside its destination, made durable and
//!    renamed over it;
//! 4. mode, times and (as root) owner of the directories made or cleared, and of those whose
//!    attributes the thunk set, deepest first, after the moves that change directory times.
//!
//! Only paths under the writable roots are applied: upper directories outside them exist only
//! as parents of what lies below. The list is written as a journal beside the layer before
//! the first operation (see the `journal` module for the format and why replaying it is
//! safe), so a commit cut short at any instant is finished by [`crate::recover`].

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, Stat};

use crate::config::{upper_rel, Config};
use crate::journal::{self, DirMeta, Journal, Op, Place, Trees};
use crate::layer::{is_absent, LayerState};
use crate::real;
use crate::{CommitSummary, Error};

fn commit_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Commit {
        path: path.to_path_buf(),
        source,
    }
}

/// Plans the commit, writes its journal and applies it: all of it, then cleans up (the
/// journal and the layer directory go), or (`stop`) only the first `n` operations, leaving
/// everything as a killed process would. Returns the summary and the number of operations.
pub(crate) fn commit(
    cfg: &Config,
    state: &LayerState,
    stop: Option<usize>,
) -> Result<(CommitSummary, usize), Error> {
    let (journal, binds) = Planner::new(cfg, state).plan()?;
    let count = journal.ops.len();
    if count == 0 {
        if stop.is_none() {
            journal::remove_layer(&cfg.layer_dir)?;
        }
        return Ok((journal.summary, 0));
    }
    // The moves rename the layer's files: their data and names must be durable before the
    // journal says to move them. One syncfs costs far less than an fsync per file and
    // directory of a large layer.
    real::open_beneath(
        cfg.layer_fd.as_fd(),
        Path::new("."),
        OFlags::RDONLY | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .and_then(|fd| Ok(rustix::fs::syncfs(fd)?))
    .map_err(commit_err(&cfg.layer_dir))?;
    journal::write(&cfg.layer_dir, &journal)?;
    let dup = |fd: BorrowedFd<'_>, path: &Path| fd.try_clone_to_owned().map_err(commit_err(path));
    let trees = Trees {
        layer_dir: cfg.layer_dir.clone(),
        layer: dup(cfg.layer_fd.as_fd(), &cfg.layer_dir)?,
        roots: binds
            .iter()
            .map(|&i| dup(cfg.binds[i].fd.as_fd(), &cfg.binds[i].real))
            .collect::<Result<_, _>>()?,
    };
    journal::run(&journal, &trees, stop)?;
    Ok((journal.summary, count))
}

struct Planner<'a> {
    cfg: &'a Config,
    state: &'a LayerState,
    /// The upper entries to apply, parents first, with their view paths.
    upper: Vec<(PathBuf, Stat)>,
    index: HashMap<PathBuf, usize>,
    /// Indexes into `cfg.binds` of the journal's roots, in order.
    binds: Vec<usize>,
    journal: Journal,
}

impl<'a> Planner<'a> {
    fn new(cfg: &'a Config, state: &'a LayerState) -> Planner<'a> {
        Planner {
            cfg,
            state,
            upper: Vec::new(),
            index: HashMap::new(),
            binds: Vec::new(),
            journal: Journal::default(),
        }
    }

    fn plan(mut self) -> Result<(Journal, Vec<usize>), Error> {
        let root = real::open_beneath(
            self.cfg.layer_fd.as_fd(),
            Path::new("."),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .map_err(commit_err(&self.cfg.layer_dir))?;
        self.collect(root.as_fd(), Path::new("/"))?;

        // Deletions.
        let mut deletes = BTreeSet::new();
        let mut cleared = HashSet::new();
        for view in &self.state.whiteouts {
            if !self.cfg.is_writable(view) {
                continue;
            }
            if self.index.contains_key(view) {
                self.clear(view, &mut deletes, &mut cleared)?;
            } else {
                deletes.insert(view.clone());
            }
        }
        // What a deleted directory holds goes with it, and so does what lies under a path a
        // non-directory is moved to.
        let mut deletes: Vec<&PathBuf> = deletes
            .iter()
            .filter(|d| {
                !d.ancestors()
                    .skip(1)
                    .any(|a| deletes.contains(a) || self.replaced(a))
            })
            .collect();
        deletes.sort_by_key(|d| (Reverse(d.components().count()), *d));
        for view in deletes {
            let count = self.real_count(view)?;
            if count > 0 {
                self.journal.summary.deleted += count;
                let place = self.place(view, false)?;
                self.journal.ops.push(Op::Delete(place));
            }
        }

        // Directories, then moves, then directory metadata.
        let upper = std::mem::take(&mut self.upper);
        let mut metas = Vec::new();
        for (view, st) in &upper {
            if !real::is_dir(st) {
                continue;
            }
            let real_st = self.real_stat(view)?;
            let exists = real_st.as_ref().is_some_and(real::is_dir);
            if !exists {
                self.journal.summary.deleted += usize::from(real_st.is_some());
                self.journal.summary.dirs += 1;
                let place = self.place(view, false)?;
                self.journal.ops.push(Op::Mkdir(place));
            }
            if !exists || cleared.contains(view) || self.state.dirty_dirs.contains(view) {
                metas.push((view, st));
            }
        }
        for (view, st) in &upper {
            if real::is_dir(st) {
                continue;
            }
            if self.real_stat(view)?.as_ref().is_some_and(real::is_dir) {
                self.journal.summary.deleted += self.real_count(view)?;
            }
            let summary = &mut self.journal.summary;
            match st.st_mode & libc::S_IFMT {
                libc::S_IFLNK => summary.symlinks += 1,
                libc::S_IFREG => {
                    summary.files += 1;
                    summary.bytes += u64::try_from(st.st_size).unwrap_or(0);
                }
                _ => summary.files += 1,
            }
            let dst = self.place(view, false)?;
            let src = upper_rel(view).to_path_buf();
            self.journal.ops.push(Op::Move { src, dst });
        }
        metas.sort_by_key(|(view, _)| Reverse(view.components().count()));
        for (view, st) in metas {
            let meta = DirMeta {
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
                atime: (st.st_atime, st.st_atime_nsec as i64),
                mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            };
            let place = self.place(view, true)?;
            self.journal.ops.push(Op::Meta(place, meta));
        }
        Ok((self.journal, self.binds))
    }

    /// Records the upper entries under the upper directory `upper` (view path `view`).
    fn collect(&mut self, upper: BorrowedFd<'_>, view: &Path) -> Result<(), Error> {
        let upper_path = self.cfg.layer_dir.join(upper_rel(view));
        let mut names = list_names(upper).map_err(commit_err(&upper_path))?;
        names.sort();
        for name in names {
            let child = view.join(&name);
            let st = real::stat_at(upper, &name).map_err(commit_err(&upper_path.join(&name)))?;
            if self.cfg.is_writable(&child) && !self.cfg.is_internal(&child) {
                self.index.insert(child.clone(), self.upper.len());
                self.upper.push((child.clone(), st));
            }
            if real::is_dir(&st) {
                let sub = rustix::fs::openat(
                    upper,
                    &name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| commit_err(&upper_path.join(&name))(e.into()))?;
                self.collect(sub.as_fd(), &child)?;
            }
        }
        Ok(())
    }

    /// Whether a non-directory is moved to `view` (replacing whatever the real tree has there).
    fn replaced(&self, view: &Path) -> bool {
        self.index
            .get(view)
            .is_some_and(|&i| !real::is_dir(&self.upper[i].1))
    }

    /// For the whited-out `view` that the layer has again: when it is a directory, the real
    /// entries under it the layer lacks are deleted, and those it has are cleared in turn.
    fn clear(
        &self,
        view: &Path,
        deletes: &mut BTreeSet<PathBuf>,
        cleared: &mut HashSet<PathBuf>,
    ) -> Result<(), Error> {
        if self.replaced(view) || !cleared.insert(view.to_path_buf()) {
            return Ok(());
        }
        if !self.real_stat(view)?.as_ref().is_some_and(real::is_dir) {
            return Ok(());
        }
        let (bind, rel) = self.cfg.lower(view);
        let names =
            real::list_dir(bind.fd.as_fd(), rel).map_err(commit_err(&self.cfg.real_path(view)))?;
        for (name, _) in names {
            let child = view.join(&name);
            // Never a mount point, a bind or an internal path (none lies under a whiteout).
            if self.cfg.is_pinned(&child) {
                continue;
            }
            if self.index.contains_key(&child) {
                self.clear(&child, deletes, cleared)?;
            } else {
                deletes.insert(child);
            }
        }
        Ok(())
    }

    /// The real entry `view` maps to (`lstat`), `None` when absent.
    fn real_stat(&self, view: &Path) -> Result<Option<Stat>, Error> {
        let (bind, rel) = self.cfg.lower(view);
        let path = self.cfg.real_path(view);
        let err = commit_err(&path);
        if rel == Path::new(".") {
            return real::fstat(&bind.fd).map(Some).map_err(err);
        }
        let (prel, name) = real::split(rel).map_err(err)?;
        let found =
            real::open_dir(bind.fd.as_fd(), prel).and_then(|dir| real::stat_at(dir.as_fd(), name));
        match found {
            Ok(st) => Ok(Some(st)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(commit_err(&path)(e)),
        }
    }

    /// How many real entries deleting `view` removes.
    fn real_count(&self, view: &Path) -> Result<usize, Error> {
        let (bind, rel) = self.cfg.lower(view);
        let path = self.cfg.real_path(view);
        let err = commit_err(&path);
        if rel == Path::new(".") {
            return Err(err(io::Error::from_raw_os_error(libc::EBUSY)));
        }
        let (prel, name) = real::split(rel).map_err(err)?;
        let counted = real::open_dir(bind.fd.as_fd(), prel)
            .and_then(|dir| real::count_tree_at(dir.as_fd(), name));
        match counted {
            Ok(n) => Ok(n),
            // The parent went away already (a deleted ancestor): nothing left to delete.
            Err(e) if is_absent(&e) => Ok(0),
            Err(e) => Err(commit_err(&path)(e)),
        }
    }

    /// Where `view` lies in the journal's roots. Only metadata (`root_ok`) may be set at the
    /// root of a bind: its parent lies outside the mapped trees.
    fn place(&mut self, view: &Path, root_ok: bool) -> Result<Place, Error> {
        let (bind, rel) = self.cfg.lower_index(view);
        let real = &self.cfg.binds[bind].real;
        if rel == Path::new(".") && !root_ok {
            return Err(commit_err(real)(io::Error::from_raw_os_error(libc::EBUSY)));
        }
        let root = match self.binds.iter().position(|&b| b == bind) {
            Some(root) => root,
            None => {
                let path = std::path::absolute(real).map_err(commit_err(real))?;
                self.binds.push(bind);
                self.journal.roots.push(path);
                self.binds.len() - 1
            }
        };
        Ok(Place {
            root,
            rel: rel.to_path_buf(),
        })
    }
}

fn list_names(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut d = rustix::fs::Dir::read_from(dir)?;
    let mut names = Vec::new();
    while let Some(entry) = d.read() {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(names)
}
