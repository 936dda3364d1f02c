//! The copy-on-write layer: what the thunk changed, kept apart from the real trees.
//!
//! A view path's state is, in order: the upper entry at `layer_dir/<view path>` if there is
//! one; else absent when the path or an ancestor is whited out (deleted by the thunk) or an
//! ancestor is opaque (a directory the thunk created, or moved as a whole); else the lower
//! entry in the bound real tree, unless the concealment rule hides it (see [`crate::Conceal`]);
//! else a synthetic empty directory when the path is a mount point; else absent. Whiteouts and opaque marks live in memory: the layer directory holds
//! only real files, so it needs no privileges and commit can rename them into place.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use fuser::{FileAttr, FileType};
use rustix::fs::{Mode, OFlags, Stat};

use crate::config::{upper_rel, Config};
use crate::real;

/// Where a view path's current content lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loc {
    Upper,
    Lower,
    Synthetic,
}

/// A resolved view path.
pub(crate) struct Found {
    pub(crate) loc: Loc,
    /// `None` for a synthetic directory.
    pub(crate) st: Option<Stat>,
    /// `O_PATH` descriptor of the backing entry; `None` for a synthetic directory.
    pub(crate) fd: Option<OwnedFd>,
}

impl Found {
    pub(crate) fn attr(&self, ino: u64) -> FileAttr {
        match &self.st {
            Some(st) => real::attr(st, ino),
            None => real::synthetic_dir_attr(ino),
        }
    }

    pub(crate) fn is_dir(&self) -> bool {
        self.st.as_ref().is_none_or(real::is_dir)
    }
}

/// The mutable state of the layer; guarded by one `RwLock` (modifications are serialized).
#[derive(Default)]
pub(crate) struct LayerState {
    /// View paths of the directories that exist in the layer directory (`/` always does).
    pub(crate) upper_dirs: HashSet<PathBuf>,
    /// View paths whose real entry the thunk deleted (or replaced); commit removes them first.
    pub(crate) whiteouts: HashSet<PathBuf>,
    /// Upper directories through which no lower entry shows.
    pub(crate) opaque: HashSet<PathBuf>,
    /// Upper directories whose mode, owner or times the thunk set; commit applies them.
    pub(crate) dirty_dirs: HashSet<PathBuf>,
    /// Set by commit or discard: the layer is gone, further changes fail with EROFS.
    pub(crate) sealed: bool,
    /// Real entries that show although the concealment rule covers them: the thunk's own
    /// files once published, and what [`crate::Handle::reveal`] named. Kept across publishes.
    pub(crate) revealed: HashSet<PathBuf>,
}

pub(crate) fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

pub(crate) fn is_absent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

impl LayerState {
    pub(crate) fn new() -> LayerState {
        let mut state = LayerState::default();
        state.upper_dirs.insert(PathBuf::from("/"));
        state
    }

    /// The state after a publish moved the layer into the real trees, leaving only the files
    /// at the view paths `kept` (and their directories): the real trees now show everything
    /// the whiteouts, opaque marks and directory attributes stood for.
    /// `moved` are the view paths of the files the publish put in place: the thunk's own,
    /// which keep showing when the concealment rule covers them.
    pub(crate) fn published(&mut self, kept: &[PathBuf], moved: Vec<PathBuf>) {
        self.upper_dirs.clear();
        self.upper_dirs.insert(PathBuf::from("/"));
        for path in kept {
            self.upper_dirs
                .extend(path.ancestors().skip(1).map(Path::to_path_buf));
        }
        self.whiteouts.clear();
        self.opaque.clear();
        self.dirty_dirs.clear();
        self.revealed.extend(moved);
    }

    /// Whether a real entry at `path` (a directory or not) is concealed from the thunk.
    pub(crate) fn conceals(&self, cfg: &Config, path: &Path, is_dir: bool) -> bool {
        !is_dir && cfg.conceals(path) && !self.revealed.contains(path)
    }

    /// Whether the lower entry at `path` is hidden by a whiteout or an opaque ancestor.
    pub(crate) fn lower_masked(&self, path: &Path) -> bool {
        if self.whiteouts.is_empty() && self.opaque.is_empty() {
            return false;
        }
        if self.whiteouts.contains(path) {
            return true;
        }
        path.ancestors()
            .skip(1)
            .any(|a| self.whiteouts.contains(a) || self.opaque.contains(a))
    }

    /// Whether the layer directory can hold an entry for `path`.
    pub(crate) fn upper_may_have(&self, path: &Path) -> bool {
        path.parent().is_some_and(|p| self.upper_dirs.contains(p))
    }

    /// Moves every path-keyed mark under `from` to the same place under `to`.
    pub(crate) fn move_marks(&mut self, from: &Path, to: &Path) {
        for set in [&mut self.upper_dirs, &mut self.opaque, &mut self.dirty_dirs] {
            let moved: Vec<PathBuf> = set
                .iter()
                .filter(|p| p.starts_with(from))
                .cloned()
                .collect();
            for old in moved {
                set.remove(&old);
                let new = match old.strip_prefix(from) {
                    Ok(rest) if !rest.as_os_str().is_empty() => to.join(rest),
                    _ => to.to_path_buf(),
                };
                set.insert(new);
            }
        }
    }
}

/// Resolves `path` through the layer (see the module docs).
pub(crate) fn resolve(cfg: &Config, state: &LayerState, path: &Path) -> io::Result<Found> {
    if state.upper_may_have(path) {
        match real::open_path(cfg.layer_fd.as_fd(), upper_rel(path)) {
            Ok(fd) => {
                let st = real::fstat(&fd)?;
                return Ok(Found {
                    loc: Loc::Upper,
                    st: Some(st),
                    fd: Some(fd),
                });
            }
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(e),
        }
    }
    if !state.lower_masked(path) {
        let (bind, rel) = cfg.lower(path);
        match real::open_path(bind.fd.as_fd(), rel) {
            Ok(fd) => {
                let st = real::fstat(&fd)?;
                // A mount point must be a directory whatever the real tree holds there.
                let shown = !cfg.mountpoints.contains(path) || real::is_dir(&st);
                if shown && !state.conceals(cfg, path, real::is_dir(&st)) {
                    return Ok(Found {
                        loc: Loc::Lower,
                        st: Some(st),
                        fd: Some(fd),
                    });
                }
            }
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(e),
        }
    }
    if cfg.mountpoints.contains(path) {
        return Ok(Found {
            loc: Loc::Synthetic,
            st: None,
            fd: None,
        });
    }
    Err(enoent())
}

/// Whether a visible lower entry exists at `path` (so deleting it needs a whiteout).
pub(crate) fn lower_exists(cfg: &Config, state: &LayerState, path: &Path) -> bool {
    if state.lower_masked(path) {
        return false;
    }
    let (bind, rel) = cfg.lower(path);
    match real::open_path(bind.fd.as_fd(), rel) {
        Ok(fd) => {
            !cfg.conceals(path)
                || real::fstat(&fd).is_ok_and(|st| !state.conceals(cfg, path, real::is_dir(&st)))
        }
        Err(_) => false,
    }
}

/// Whether `path` looks absent only because the concealment rule hides the real entry there
/// (which is then recorded as hidden rather than absent).
pub(crate) fn concealed(cfg: &Config, state: &LayerState, path: &Path) -> bool {
    if !cfg.conceals(path) || state.lower_masked(path) {
        return false;
    }
    let (bind, rel) = cfg.lower(path);
    real::open_path(bind.fd.as_fd(), rel)
        .and_then(|fd| real::fstat(&fd))
        .is_ok_and(|st| state.conceals(cfg, path, real::is_dir(&st)))
}

/// The owner to give a copy of `st` (only root can give files away).
fn owner_of(cfg: &Config, st: &Stat) -> Option<(u32, u32)> {
    cfg.root.then_some((st.st_uid, st.st_gid))
}

/// Makes sure the view directory `dir` exists in the layer directory, creating it and its
/// ancestors with the modes and owners of what the view shows there.
pub(crate) fn ensure_upper_dir(cfg: &Config, state: &mut LayerState, dir: &Path) -> io::Result<()> {
    if state.upper_dirs.contains(dir) {
        return Ok(());
    }
    let parent = dir.parent().ok_or_else(enoent)?;
    ensure_upper_dir(cfg, state, parent)?;
    let found = resolve(cfg, state, dir)?;
    if !found.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    let (prel, name) = real::split(upper_rel(dir))?;
    let pdir = real::open_dir(cfg.layer_fd.as_fd(), prel)?;
    let (mode, owner) = match &found.st {
        Some(st) => (st.st_mode & 0o7777, owner_of(cfg, st)),
        None => (0o755, cfg.root.then_some((0, 0))),
    };
    // Without root the daemon must keep write access to the copies it fills.
    let mode = if cfg.root { mode } else { mode | 0o700 };
    match rustix::fs::mkdirat(&pdir, name, Mode::from_raw_mode(mode)) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    if let Some((uid, gid)) = owner {
        rustix::fs::chownat(
            &pdir,
            name,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    // mkdir applies the umask; the copy must carry the real mode.
    rustix::fs::chmodat(
        &pdir,
        name,
        Mode::from_raw_mode(mode),
        rustix::fs::AtFlags::empty(),
    )?;
    state.upper_dirs.insert(dir.to_path_buf());
    Ok(())
}

/// Copies the lower entry at `path` into the layer directory (content, mode, owner, times).
/// A no-op when the path already has an upper entry.
pub(crate) fn copy_up(cfg: &Config, state: &mut LayerState, path: &Path) -> io::Result<()> {
    let found = resolve(cfg, state, path)?;
    match found.loc {
        Loc::Upper => return Ok(()),
        Loc::Synthetic => {
            return ensure_upper_dir(cfg, state, path);
        }
        Loc::Lower => {}
    }
    let st = found.st.ok_or_else(enoent)?;
    if real::is_dir(&st) {
        return ensure_upper_dir(cfg, state, path);
    }
    let parent = path.parent().ok_or_else(enoent)?;
    ensure_upper_dir(cfg, state, parent)?;
    let (prel, name) = real::split(upper_rel(path))?;
    let pdir = real::open_dir(cfg.layer_fd.as_fd(), prel)?;
    let owner = owner_of(cfg, &st);
    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        let (bind, rel) = cfg.lower(path);
        let src = File::from(real::open_beneath(
            bind.fd.as_fd(),
            rel,
            OFlags::RDONLY | OFlags::NONBLOCK,
            Mode::empty(),
        )?);
        real::copy_file_at(&src, &st, pdir.as_fd(), name, owner)?;
    } else {
        let src = found.fd.ok_or_else(enoent)?;
        real::copy_special_at(src.as_fd(), &st, pdir.as_fd(), name, owner)?;
    }
    Ok(())
}

/// The merged entries of the view directory `path`, each with where it comes from: upper
/// entries, then lower entries not shadowed or whited out, then mount points and bind views
/// the real tree lacks (synthetic). Hidden, internal and concealed entries are included;
/// callers filter them.
pub(crate) fn merged_list(
    cfg: &Config,
    state: &LayerState,
    path: &Path,
) -> io::Result<Vec<(OsString, FileType, Loc)>> {
    let mut out = Vec::new();
    let mut seen: HashSet<OsString> = HashSet::new();
    let mut found_any = false;
    if state.upper_dirs.contains(path) {
        match real::list_dir(cfg.layer_fd.as_fd(), upper_rel(path)) {
            Ok(list) => {
                found_any = true;
                for (name, kind) in list {
                    seen.insert(name.clone());
                    out.push((name, kind, Loc::Upper));
                }
            }
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(e),
        }
    }
    if !state.lower_masked(path) && !state.opaque.contains(path) {
        let (bind, rel) = cfg.lower(path);
        match real::list_dir(bind.fd.as_fd(), rel) {
            Ok(list) => {
                found_any = true;
                for (name, kind) in list {
                    if seen.contains(&name) || state.whiteouts.contains(&path.join(&name)) {
                        continue;
                    }
                    seen.insert(name.clone());
                    out.push((name, kind, Loc::Lower));
                }
            }
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(extra) = cfg.extra_children.get(path) {
        found_any = true;
        for name in extra {
            if !seen.contains(name) {
                seen.insert(name.clone());
                out.push((name.clone(), FileType::Directory, Loc::Synthetic));
            }
        }
    }
    if !found_any && !cfg.mountpoints.contains(path) {
        return Err(enoent());
    }
    Ok(out)
}

/// Copies the whole merged subtree at `path` into the layer directory, so that the upper
/// directory alone holds everything the view shows there (before moving it as a whole).
pub(crate) fn materialize(cfg: &Config, state: &mut LayerState, path: &Path) -> io::Result<()> {
    copy_up(cfg, state, path)?;
    for (name, kind, _) in merged_list(cfg, state, path)? {
        let child = path.join(&name);
        if kind == FileType::Directory {
            materialize(cfg, state, &child)?;
        } else {
            copy_up(cfg, state, &child)?;
        }
    }
    Ok(())
}
