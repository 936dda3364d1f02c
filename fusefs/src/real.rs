//! Operations on the real trees (the layer directory and the bound real directories).
//!
//! Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to
//! the tree's directory descriptor, so no symlink in a real tree (even one swapped in by a
//! racing process) can make the daemon act outside the mapped trees.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat};

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Opens `rel` beneath `root` without following any symlink; a final symlink is opened
/// itself when `flags` holds `O_PATH`.
pub(crate) fn open_beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
) -> io::Result<OwnedFd> {
    loop {
        match rustix::fs::openat2(
            root,
            rel,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            mode,
            RESOLVE,
        ) {
            // openat2 asks to retry when a rename raced the RESOLVE_BENEATH check.
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => continue,
            other => return Ok(other?),
        }
    }
}

/// An `O_PATH` descriptor of the entry itself.
pub(crate) fn open_path(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    open_beneath(root, rel, OFlags::PATH, Mode::empty())
}

/// An `O_PATH` descriptor of a directory.
pub(crate) fn open_dir(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    open_beneath(root, rel, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
}

/// `rel` split into its parent (`.` for a top-level name) and its last component.
pub(crate) fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let parent = match rel.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((parent, name))
}

pub(crate) fn fstat(fd: impl AsFd) -> io::Result<Stat> {
    Ok(rustix::fs::fstat(fd)?)
}

/// `lstat` of `name` in the directory `dir`.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Stat> {
    Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

pub(crate) fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

pub(crate) fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nsecs = u32::try_from(nsecs).unwrap_or(0);
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nsecs)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs.into())
    }
}

/// The attributes reported for a node: the backing file's, under the node's id.
pub(crate) fn attr(st: &Stat, ino: u64) -> FileAttr {
    let mtime = time(st.st_mtime, st.st_mtime_nsec as i64);
    FileAttr {
        ino: INodeNo(ino),
        size: u64::try_from(st.st_size).unwrap_or(0),
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec as i64),
        mtime,
        ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: mtime,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// Attributes of a directory that exists only because something must be mounted on it.
pub(crate) fn synthetic_dir_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The names and types in the directory `rel` beneath `root`, without `.` and `..`.
pub(crate) fn list_dir(
    root: BorrowedFd<'_>,
    rel: &Path,
) -> io::Result<Vec<(std::ffi::OsString, FileType)>> {
    let fd = open_beneath(root, rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    let mut dir = rustix::fs::Dir::new(fd)?;
    let mut out = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let kind = match entry.file_type() {
            rustix::fs::FileType::Directory => FileType::Directory,
            rustix::fs::FileType::Symlink => FileType::Symlink,
            rustix::fs::FileType::Fifo => FileType::NamedPipe,
            rustix::fs::FileType::Socket => FileType::Socket,
            rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
            rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
            _ => FileType::RegularFile,
        };
        out.push((OsStr::from_bytes(name).to_os_string(), kind));
    }
    Ok(out)
}

/// Removes `name` from `dir`, recursively when it is a directory; absent is fine.
/// Returns how many entries were removed.
pub(crate) fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<usize> {
    let st = match stat_at(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    if is_dir(&st) {
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let names = {
            let mut d = rustix::fs::Dir::read_from(&sub)?;
            let mut names = Vec::new();
            while let Some(entry) = d.read() {
                let entry = entry?;
                let n = entry.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.push(OsStr::from_bytes(n).to_os_string());
                }
            }
            names
        };
        for n in names {
            removed += remove_tree_at(sub.as_fd(), &n)?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(removed + 1)
}

/// How many entries `remove_tree_at` would remove for `name` in `dir` (0 when absent).
pub(crate) fn count_tree_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<usize> {
    let st = match stat_at(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(0),
        Err(e) => return Err(e),
    };
    if !is_dir(&st) {
        return Ok(1);
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut count = 1;
    let mut d = rustix::fs::Dir::read_from(&sub)?;
    while let Some(entry) = d.read() {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            count += count_tree_at(sub.as_fd(), OsStr::from_bytes(n))?;
        }
    }
    Ok(count)
}

/// Copies the regular file `src` into the new file `name` in `dir` with the given metadata.
/// The new file is removed again if anything fails.
pub(crate) fn copy_file_at(
    src: &File,
    st: &Stat,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    owner: Option<(u32, u32)>,
) -> io::Result<File> {
    let out = rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )?;
    let result = (|| -> io::Result<File> {
        let mut out = File::from(out);
        let mut input = src;
        io::copy(&mut input, &mut out)?;
        set_meta(out.as_fd(), st, owner)?;
        Ok(out)
    })();
    if result.is_err() {
        // Best effort: a half-copied file must not be mistaken for the thunk's own.
        let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
    }
    result
}

/// Applies owner, mode and times of `st` to an open file (owner first: chown clears set-id bits).
pub(crate) fn set_meta(fd: BorrowedFd<'_>, st: &Stat, owner: Option<(u32, u32)>) -> io::Result<()> {
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    rustix::fs::futimens(fd, &timestamps(st))?;
    Ok(())
}

pub(crate) fn timestamps(st: &Stat) -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

/// Makes `name` in `dir` a copy of the non-regular, non-directory entry `src` (a symlink, fifo,
/// socket or device) described by `st`.
pub(crate) fn copy_special_at(
    src: BorrowedFd<'_>,
    st: &Stat,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let mode = st.st_mode;
    if mode & libc::S_IFMT == libc::S_IFLNK {
        let target = rustix::fs::readlinkat(src, "", Vec::new())?;
        rustix::fs::symlinkat(OsStr::from_bytes(target.as_bytes()), dir, name)?;
    } else {
        let kind = rustix::fs::FileType::from_raw_mode(mode);
        rustix::fs::mknodat(
            dir,
            name,
            kind,
            Mode::from_raw_mode(mode & 0o7777),
            st.st_rdev,
        )?;
    }
    if let Some((uid, gid)) = owner {
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    rustix::fs::utimensat(dir, name, &timestamps(st), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}
