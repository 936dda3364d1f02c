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
//!
//! A publish ([`crate::Handle::publish`]) is the same commit made while the filesystem keeps
//! serving: the same plan and journal, but afterwards the layer directory is emptied instead
//! of removed, and the layer state reset. Layer files the thunk has open stay in the layer:
//! the journal moves a copy of each instead.

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
    kept_out: &[PathBuf],
    stop: Option<usize>,
) -> Result<(CommitSummary, usize), Error> {
    let (journal, binds, _) = Planner::new(cfg, state, kept_out).plan()?;
    let count = journal.ops.len();
    if count == 0 {
        if stop.is_none() {
            journal::remove_layer(&cfg.layer_dir)?;
        }
        return Ok((journal.summary, 0));
    }
    sync_layer(cfg)?;
    journal::write(&cfg.layer_dir, &journal)?;
    journal::run(&journal, &trees(cfg, &binds)?, stop)?;
    Ok((journal.summary, count))
}

/// The moves rename the layer's files: their data and names must be durable before the
/// journal says to move them. One syncfs costs far less than an fsync per file and directory
/// of a large layer.
fn sync_layer(cfg: &Config) -> Result<(), Error> {
    real::open_beneath(
        cfg.layer_fd.as_fd(),
        Path::new("."),
        OFlags::RDONLY | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .and_then(|fd| Ok(rustix::fs::syncfs(fd)?))
    .map_err(commit_err(&cfg.layer_dir))
}

/// The directories the journal's operations resolve against, from the open descriptors.
fn trees(cfg: &Config, binds: &[usize]) -> Result<Trees, Error> {
    let dup = |fd: BorrowedFd<'_>, path: &Path| fd.try_clone_to_owned().map_err(commit_err(path));
    Ok(Trees {
        layer_dir: cfg.layer_dir.clone(),
        layer: dup(cfg.layer_fd.as_fd(), &cfg.layer_dir)?,
        roots: binds
            .iter()
            .map(|&i| dup(cfg.binds[i].fd.as_fd(), &cfg.binds[i].real))
            .collect::<Result<_, _>>()?,
    })
}

/// Applies the layer's changes so far to the real trees while the filesystem keeps serving
/// (see [`crate::Handle::publish`]); the caller holds the layer's write lock. Exactly a
/// commit, journal included, except for what it leaves behind: the layer directory stays
/// (so `cfg.layer_fd` stays valid), emptied but for the files in `open` (the identities of
/// layer files the thunk has open), and `state` is reset to match.
///
/// A file in `open` is published as a copy, made beside it in the layer before the journal
/// is written, whose move the journal holds instead of the file's own: the file stays in the
/// layer, so its open descriptors, and a kernel passthrough backing file, keep writing to the
/// layer, and a later commit or discard applies or drops those writes like any other.
///
/// Failing before the journal is in place changes nothing (the copies are removed). Failing
/// after it seals the layer, as a failed commit does: the journal says what is left to do and
/// only [`crate::recover`] may do it, once the filesystem is gone. So does `stop`, which
/// applies only the first `n` operations, as if the process were killed there. Returns the
/// summary and the number of operations.
pub(crate) fn publish(
    cfg: &Config,
    state: &mut LayerState,
    open: &HashSet<(u64, u64)>,
    stop: Option<usize>,
) -> Result<(CommitSummary, usize), Error> {
    let (mut journal, binds, moved) = Planner::new(cfg, state, &[]).plan()?;
    let count = journal.ops.len();
    if count == 0 && stop.is_some() {
        return Ok((journal.summary, 0));
    }
    let mut staged = Vec::new();
    let kept = match stage_open_files(cfg, &mut journal, open, &mut staged).and_then(|kept| {
        if count > 0 {
            sync_layer(cfg).map(|()| kept)
        } else {
            Ok(kept)
        }
    }) {
        Ok(kept) => kept,
        Err(e) => {
            unstage(cfg, &staged);
            return Err(e);
        }
    };
    if count > 0 {
        if let Err(e) = journal::write(&cfg.layer_dir, &journal) {
            match std::fs::symlink_metadata(journal::journal_path(&cfg.layer_dir)) {
                Err(absent) if absent.kind() == io::ErrorKind::NotFound => unstage(cfg, &staged),
                _ => state.sealed = true,
            }
            return Err(e);
        }
        let applied = trees(cfg, &binds).and_then(|trees| {
            journal::apply_ops(&journal, &trees, stop)?;
            if stop.is_none() {
                journal::settle(&journal, &trees)?;
            }
            Ok(())
        });
        if applied.is_err() || stop.is_some() {
            state.sealed = true;
            applied?;
            return Ok((journal.summary, count));
        }
    }
    // The journal is gone: to a recovery the layer is now garbage, so cleaning it up needs
    // no care. What it fails to remove is directories only (every file was moved), which a
    // later commit finds existing in the real trees already.
    if let Err(e) = clean_layer(cfg, &kept) {
        log::warn!(
            "publish of {:?}: the layer keeps some published directories: {e}",
            cfg.layer_dir
        );
    }
    state.published(&kept, moved);
    Ok((journal.summary, count))
}

/// For every move whose source is one of the `open` files, copies the source to a new name
/// beside it and moves the copy instead (see [`publish`]). Records the copies' layer paths in
/// `staged` as they are made; returns the view paths of the files kept in the layer.
fn stage_open_files(
    cfg: &Config,
    journal: &mut Journal,
    open: &HashSet<(u64, u64)>,
    staged: &mut Vec<PathBuf>,
) -> Result<Vec<PathBuf>, Error> {
    let mut kept = Vec::new();
    if open.is_empty() {
        return Ok(kept);
    }
    for (index, op) in journal.ops.iter_mut().enumerate() {
        let Op::Move { src, .. } = op else {
            continue;
        };
        let path = cfg.layer_dir.join(&*src);
        let (prel, name) = real::split(src).map_err(commit_err(&path))?;
        let dir = real::open_dir(cfg.layer_fd.as_fd(), prel).map_err(commit_err(&path))?;
        let st = real::stat_at(dir.as_fd(), name).map_err(commit_err(&path))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || !open.contains(&(st.st_dev, st.st_ino)) {
            continue;
        }
        let file = rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map(std::fs::File::from)
        .map_err(|e| commit_err(&path)(e.into()))?;
        let owner = cfg.root.then_some((st.st_uid, st.st_gid));
        // The name is free in the layer: nothing changes the layer while the lock is held.
        let mut attempt = 0;
        let copy = loop {
            let copy = OsString::from(format!(".cot-publish-{index}-{attempt}"));
            match real::copy_file_at(&file, &st, dir.as_fd(), &copy, owner) {
                Ok(_) => break copy,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => attempt += 1,
                Err(e) => return Err(commit_err(&cfg.layer_dir.join(prel).join(&copy))(e)),
            }
        };
        let copy = if prel == Path::new(".") {
            PathBuf::from(copy)
        } else {
            prel.join(copy)
        };
        staged.push(copy.clone());
        kept.push(Path::new("/").join(&*src));
        *src = copy;
    }
    Ok(kept)
}

/// Removes the copies [`stage_open_files`] made, best effort: a publish that changed nothing
/// must leave no stray file for a later commit to apply.
fn unstage(cfg: &Config, staged: &[PathBuf]) {
    for copy in staged {
        let removed = real::split(copy).and_then(|(prel, name)| {
            let dir = real::open_dir(cfg.layer_fd.as_fd(), prel)?;
            Ok(rustix::fs::unlinkat(
                &dir,
                name,
                rustix::fs::AtFlags::empty(),
            )?)
        });
        if let Err(e) = removed {
            log::warn!("cannot remove {:?}: {e}", cfg.layer_dir.join(copy));
        }
    }
}

/// Removes everything in the layer directory but the files at the view paths `kept` and the
/// directories holding them.
fn clean_layer(cfg: &Config, kept: &[PathBuf]) -> io::Result<()> {
    let keep: HashSet<&Path> = kept.iter().map(|p| upper_rel(p)).collect();
    let dirs: HashSet<&Path> = keep
        .iter()
        .flat_map(|p| p.ancestors().skip(1))
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    let root = real::open_beneath(
        cfg.layer_fd.as_fd(),
        Path::new("."),
        OFlags::RDONLY | OFlags::DIRECTORY,
        Mode::empty(),
    )?;
    clean_dir(root.as_fd(), Path::new(""), &keep, &dirs)
}

fn clean_dir(
    dir: BorrowedFd<'_>,
    rel: &Path,
    keep: &HashSet<&Path>,
    dirs: &HashSet<&Path>,
) -> io::Result<()> {
    for name in list_names(dir)? {
        let child = rel.join(&name);
        if keep.contains(child.as_path()) {
            continue;
        }
        if dirs.contains(child.as_path()) {
            let sub = rustix::fs::openat(
                dir,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            clean_dir(sub.as_fd(), &child, keep, dirs)?;
        } else {
            real::remove_tree_at(dir, &name)?;
        }
    }
    Ok(())
}

struct Planner<'a> {
    cfg: &'a Config,
    state: &'a LayerState,
    /// View paths whose changes stay in the layer (and go with it): not applied.
    kept_out: &'a [PathBuf],
    /// The upper entries to apply, parents first, with their view paths.
    upper: Vec<(PathBuf, Stat)>,
    index: HashMap<PathBuf, usize>,
    /// Indexes into `cfg.binds` of the journal's roots, in order.
    binds: Vec<usize>,
    journal: Journal,
}

impl<'a> Planner<'a> {
    fn new(cfg: &'a Config, state: &'a LayerState, kept_out: &'a [PathBuf]) -> Planner<'a> {
        Planner {
            cfg,
            state,
            kept_out,
            upper: Vec::new(),
            index: HashMap::new(),
            binds: Vec::new(),
            journal: Journal::default(),
        }
    }

    /// The journal, the indexes into `cfg.binds` of its roots, and the view paths of the
    /// non-directories it puts in place.
    fn plan(mut self) -> Result<(Journal, Vec<usize>, Vec<PathBuf>), Error> {
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
            if !self.applies(view) {
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
        let mut moved = Vec::new();
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
            moved.push(view.clone());
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
        Ok((self.journal, self.binds, moved))
    }

    /// Records the upper entries under the upper directory `upper` (view path `view`).
    fn collect(&mut self, upper: BorrowedFd<'_>, view: &Path) -> Result<(), Error> {
        let upper_path = self.cfg.layer_dir.join(upper_rel(view));
        let mut names = list_names(upper).map_err(commit_err(&upper_path))?;
        names.sort();
        for name in names {
            let child = view.join(&name);
            let st = real::stat_at(upper, &name).map_err(commit_err(&upper_path.join(&name)))?;
            if self.applies(&child) && !self.cfg.is_internal(&child) {
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

    /// Whether the commit applies the layer's change at `view`: under a writable root, and
    /// not kept out.
    fn applies(&self, view: &Path) -> bool {
        self.cfg.is_writable(view) && !self.kept_out.iter().any(|k| view.starts_with(k))
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
