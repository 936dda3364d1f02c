//! Applying the layer to the real filesystem, or throwing it away.
//!
//! Commit makes every real path the layer touched equal to the merged view: first each
//! whiteout deletes its real path (recursively, deepest first), then the upper tree is walked
//! top-down, creating directories (a non-directory in the way is removed) and moving files,
//! symlinks, fifos and sockets into place with `rename(2)`, each replacing its destination
//! atomically. Across file systems a file is copied to a temporary name beside its
//! destination and renamed over it. Only paths under the writable roots are applied: upper
//! directories outside them exist only as parents of what lies below.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::config::Config;
use crate::layer::LayerState;
use crate::real;
use crate::{CommitSummary, Error};

/// Where a view path goes in the real filesystem: its parent directory and its name.
struct RealPlace {
    dir: OwnedFd,
    name: OsString,
    path: PathBuf,
}

fn commit_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Commit {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens the real parent directory of `view`, without following symlinks.
fn real_place(cfg: &Config, view: &Path) -> Result<RealPlace, Error> {
    let path = cfg.real_path(view);
    let (bind, rel) = cfg.lower(view);
    if rel == Path::new(".") {
        // The root of a bind: its parent lies outside the mapped trees, named by the caller.
        let (parent, name) = match (bind.real.parent(), bind.real.file_name()) {
            (Some(parent), Some(name)) => (parent, name),
            _ => return Err(commit_err(&path)(io::Error::from_raw_os_error(libc::EBUSY))),
        };
        let dir = rustix::fs::open(
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| commit_err(&path)(e.into()))?;
        return Ok(RealPlace {
            dir,
            name: name.to_os_string(),
            path,
        });
    }
    let (prel, name) = real::split(rel).map_err(commit_err(&path))?;
    let dir = real::open_dir(bind.fd.as_fd(), prel).map_err(commit_err(&path))?;
    Ok(RealPlace {
        dir,
        name: name.to_os_string(),
        path,
    })
}

pub(crate) fn commit(cfg: &Config, state: &LayerState) -> Result<CommitSummary, Error> {
    let mut summary = CommitSummary::default();
    let mut whiteouts: Vec<&PathBuf> = state.whiteouts.iter().collect();
    whiteouts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for view in whiteouts {
        if !cfg.is_writable(view) {
            continue;
        }
        match real_place(cfg, view) {
            Ok(place) => {
                let n = real::remove_tree_at(place.dir.as_fd(), &place.name)
                    .map_err(commit_err(&place.path))?;
                summary.deleted += n;
            }
            // The parent went away already (a deleted ancestor): nothing left to delete.
            Err(Error::Commit { source, .. }) if crate::layer::is_absent(&source) => {}
            Err(e) => return Err(e),
        }
    }
    let root = real::open_beneath(
        cfg.layer_fd.as_fd(),
        Path::new("."),
        OFlags::RDONLY | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .map_err(commit_err(&cfg.layer_dir))?;
    apply_dir(cfg, state, root.as_fd(), Path::new("/"), &mut summary)?;
    Ok(summary)
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

/// Applies the entries of the upper directory `upper` (view path `view`).
fn apply_dir(
    cfg: &Config,
    state: &LayerState,
    upper: BorrowedFd<'_>,
    view: &Path,
    summary: &mut CommitSummary,
) -> Result<(), Error> {
    let upper_path = cfg.layer_dir.join(crate::config::upper_rel(view));
    let names = list_names(upper).map_err(commit_err(&upper_path))?;
    for name in names {
        let child = view.join(&name);
        let st = real::stat_at(upper, &name).map_err(commit_err(&upper_path.join(&name)))?;
        let apply = cfg.is_writable(&child) && !cfg.is_internal(&child);
        if real::is_dir(&st) {
            if apply {
                apply_upper_dir(cfg, state, &child, &st, summary)?;
            }
            let sub = rustix::fs::openat(
                upper,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::Commit {
                path: upper_path.join(&name),
                source: e.into(),
            })?;
            apply_dir(cfg, state, sub.as_fd(), &child, summary)?;
        } else if apply {
            apply_upper_file(cfg, upper, &name, &child, &st, summary)?;
        }
    }
    Ok(())
}

fn apply_upper_dir(
    cfg: &Config,
    state: &LayerState,
    view: &Path,
    st: &rustix::fs::Stat,
    summary: &mut CommitSummary,
) -> Result<(), Error> {
    let place = real_place(cfg, view)?;
    let err = commit_err(&place.path);
    let existing = match real::stat_at(place.dir.as_fd(), &place.name) {
        Ok(real_st) => Some(real_st),
        Err(e) if crate::layer::is_absent(&e) => None,
        Err(e) => return Err(err(e)),
    };
    let created = match existing {
        Some(real_st) if real::is_dir(&real_st) => false,
        Some(_) => {
            real::remove_tree_at(place.dir.as_fd(), &place.name)
                .map_err(commit_err(&place.path))?;
            true
        }
        None => true,
    };
    if created {
        rustix::fs::mkdirat(&place.dir, &place.name, Mode::from_raw_mode(0o700)).map_err(|e| {
            Error::Commit {
                path: place.path.clone(),
                source: e.into(),
            }
        })?;
        summary.dirs += 1;
    }
    if created || state.dirty_dirs.contains(view) {
        let fd = real::open_beneath(
            place.dir.as_fd(),
            Path::new(&place.name),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .map_err(commit_err(&place.path))?;
        let owner = cfg.root.then_some((st.st_uid, st.st_gid));
        real::set_meta(fd.as_fd(), st, owner).map_err(commit_err(&place.path))?;
    }
    Ok(())
}

fn apply_upper_file(
    cfg: &Config,
    upper: BorrowedFd<'_>,
    name: &OsStr,
    view: &Path,
    st: &rustix::fs::Stat,
    summary: &mut CommitSummary,
) -> Result<(), Error> {
    let place = real_place(cfg, view)?;
    if let Ok(real_st) = real::stat_at(place.dir.as_fd(), &place.name) {
        if real::is_dir(&real_st) {
            real::remove_tree_at(place.dir.as_fd(), &place.name)
                .map_err(commit_err(&place.path))?;
        }
    }
    match rustix::fs::renameat(upper, name, &place.dir, &place.name) {
        Ok(()) => {}
        Err(rustix::io::Errno::XDEV) => {
            copy_into_place(cfg, upper, name, &place, st).map_err(commit_err(&place.path))?;
        }
        Err(e) => {
            return Err(Error::Commit {
                path: place.path.clone(),
                source: e.into(),
            })
        }
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFLNK => summary.symlinks += 1,
        libc::S_IFREG => {
            summary.files += 1;
            summary.bytes += u64::try_from(st.st_size).unwrap_or(0);
        }
        _ => summary.files += 1,
    }
    Ok(())
}

/// Copies the upper entry to a temporary name in the destination directory, then renames it
/// over the destination.
fn copy_into_place(
    cfg: &Config,
    upper: BorrowedFd<'_>,
    name: &OsStr,
    place: &RealPlace,
    st: &rustix::fs::Stat,
) -> io::Result<()> {
    let mut tmp = OsString::from(".cot-commit-");
    tmp.push(std::process::id().to_string());
    tmp.push("-");
    tmp.push(&place.name);
    let owner = cfg.root.then_some((st.st_uid, st.st_gid));
    let _ = rustix::fs::unlinkat(&place.dir, &tmp, AtFlags::empty());
    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        let src = File::from(rustix::fs::openat(
            upper,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?);
        real::copy_file_at(&src, st, place.dir.as_fd(), &tmp, owner)?;
    } else {
        let src = rustix::fs::openat(
            upper,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        real::copy_special_at(src.as_fd(), st, place.dir.as_fd(), &tmp, owner)?;
    }
    if let Err(e) = rustix::fs::renameat(&place.dir, &tmp, &place.dir, &place.name) {
        let _ = rustix::fs::unlinkat(&place.dir, &tmp, AtFlags::empty());
        return Err(e.into());
    }
    Ok(())
}

/// Removes the layer directory and everything in it.
pub(crate) fn remove_layer(cfg: &Config) -> Result<(), Error> {
    let err = |source| Error::RemoveLayer {
        path: cfg.layer_dir.clone(),
        source,
    };
    let parent = cfg.layer_dir.parent().ok_or_else(|| err(layer_enoent()))?;
    let name = cfg
        .layer_dir
        .file_name()
        .ok_or_else(|| err(layer_enoent()))?;
    let dir = rustix::fs::open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err(e.into()))?;
    real::remove_tree_at(dir.as_fd(), name).map_err(err)?;
    Ok(())
}

fn layer_enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}
