//! The commit journal: the complete list of a commit's operations, written before the first
//! one is applied, so that a commit interrupted at any instant (SIGKILL, power loss) can be
//! finished by replaying it.
//!
//! # On-disk format, version 1
//!
//! The journal of the layer directory `L` is the file `L.journal`, a sibling of `L` (no view
//! path can collide with it). It is a header line followed by records:
//!
//! ```text
//! cot-fusefs-journal 1\n
//! <tag>\0<field>\0<field>\0...\n      one record; the tag fixes the number of fields
//! ```
//!
//! Every field is raw bytes up to its NUL, so paths are stored exactly as the kernel gives
//! them (non-UTF-8 bytes and newlines included; only NUL cannot occur in a path). Numbers are
//! ASCII decimal, modes octal. The records, in file order:
//!
//! | tag | fields | meaning |
//! | --- | --- | --- |
//! | `root` | absolute path | a real directory (a bind's tree); roots are numbered from 0 in file order |
//! | `summary` | files, dirs, symlinks, deleted, bytes | the [`CommitSummary`] of the whole commit |
//! | `delete` | root, rel | remove `rel` beneath the root, recursively |
//! | `mkdir` | root, rel | make `rel` a directory (mode 0700), removing a non-directory there |
//! | `move` | src, root, rel | move `src` (relative to `L`) over `rel`, removing a directory there |
//! | `meta` | root, rel, mode, uid, gid, atime s, atime ns, mtime s, mtime ns | set a directory's mode, times and (as root) owner |
//! | `end` | op count, checksum | the last record: the number of `delete`/`mkdir`/`move`/`meta` records and the FNV-1a 64 hash (16 hex digits) of every byte before `end` |
//!
//! `rel` is a relative path (`.` for the root itself, allowed only in `meta`) resolved beneath
//! its root without following symlinks, as everywhere in the crate. Operations are applied in
//! file order: deletions (deepest first), directories (parents first), moves, then directory
//! metadata (deepest first, after the moves that would change their times). A move across file
//! systems copies `src` to `.cot-commit-<hash>-<i>` beside its destination (`hash`: the
//! FNV-1a 64 hash of the whole journal file, 16 hex digits; `i`: the operation's index from 0), fsyncs the copy, renames
//! it over the destination, fsyncs the directory and only then removes `src`; the name is the
//! same on every replay, so a replay replaces a stale copy.
//!
//! # Why replaying is safe
//!
//! Every operation is idempotent, and none undoes a later one, so applying the whole list again
//! after a crash after any prefix (an operation half done included) gives the complete result:
//! a deletion of something absent is done, and no deletion targets a path the commit puts
//! something at or under; an existing directory is done; a move whose source is gone was done
//! (the source goes only with the move: `rename(2)`, or after a copy is durable); metadata is
//! absolute.
//!
//! # Durability and what an interruption leaves behind
//!
//! A commit first flushes the layer's file system (`syncfs`), so every source is durable, then
//! writes the journal to `L.journal.tmp`, fsyncs it, renames it to `L.journal` and fsyncs the
//! parent: the journal exists whole or not at all. Then it applies the operations, fsyncs
//! every directory it changed (once each), deletes the journal (fsyncing the parent) and
//! removes `L`. So after a crash:
//!
//! - no journal: the real trees are untouched, or the commit completed; `L` (if still there)
//!   is garbage, as is a stray `L.journal.tmp`;
//! - a journal: replaying it finishes the commit.
//!
//! A publish (a commit while the filesystem keeps serving) writes and applies the same
//! journal; after deleting it, it empties `L` rather than removing it, and the thunk goes on
//! writing into `L`. The same two cases hold: without a journal `L` holds only what was
//! never published (a filesystem that is gone discards it), and a journal is a publish to
//! finish, during which the thunk changed no name in `L` (the layer's lock was held). Its
//! `move` sources may be copies named `.cot-publish-<i>-<n>` (of files the thunk had open,
//! which stay in `L`), beside the files they copy.
//!
//! A commit with nothing to apply writes no journal.
//!
//! [`crate::recover`] does exactly this. A journal without a complete header line or `end`
//! record, or whose hash does not match, was never renamed into place by a finished write: it is
//! discarded with `L`. A journal whose header names another version (a decimal number) is
//! refused ([`Error::JournalVersion`]), never discarded.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::layer::is_absent;
use crate::real;
use crate::{CommitSummary, Error, Recovery};

const MAGIC: &str = "cot-fusefs-journal";
const VERSION: u32 = 1;

/// Mode, owner and times to give a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DirMeta {
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) atime: (i64, i64),
    pub(crate) mtime: (i64, i64),
}

/// A real path: a root (index into [`Journal::roots`]) and a path relative to it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Place {
    pub(crate) root: usize,
    pub(crate) rel: PathBuf,
}

/// One step of a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Delete(Place),
    Mkdir(Place),
    /// `src` is relative to the layer directory.
    Move {
        src: PathBuf,
        dst: Place,
    },
    Meta(Place, DirMeta),
}

/// A commit, as written to disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Journal {
    pub(crate) roots: Vec<PathBuf>,
    pub(crate) ops: Vec<Op>,
    pub(crate) summary: CommitSummary,
}

/// `L.journal` for the layer directory `L`.
pub(crate) fn journal_path(layer_dir: &Path) -> PathBuf {
    sibling(layer_dir, ".journal")
}

fn tmp_path(layer_dir: &Path) -> PathBuf {
    sibling(layer_dir, ".journal.tmp")
}

fn sibling(layer_dir: &Path, suffix: &str) -> PathBuf {
    let mut name = layer_dir
        .file_name()
        .unwrap_or(layer_dir.as_os_str())
        .to_os_string();
    name.push(suffix);
    layer_dir.with_file_name(name)
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Why a journal could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// Incomplete or inconsistent: a torn write; the commit never started.
    Torn(&'static str),
    /// A complete header of a version this code does not know.
    Version(Vec<u8>),
}

fn record(out: &mut Vec<u8>, tag: &str, fields: &[&[u8]]) {
    out.extend_from_slice(tag.as_bytes());
    out.push(0);
    for f in fields {
        out.extend_from_slice(f);
        out.push(0);
    }
    out.push(b'\n');
}

impl Journal {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = format!("{MAGIC} {VERSION}\n").into_bytes();
        for root in &self.roots {
            record(&mut out, "root", &[root.as_os_str().as_bytes()]);
        }
        let s = &self.summary;
        let nums = [s.files, s.dirs, s.symlinks, s.deleted].map(|n| n.to_string());
        let bytes = s.bytes.to_string();
        let [files, dirs, symlinks, deleted] = nums.each_ref().map(|n| n.as_bytes());
        record(
            &mut out,
            "summary",
            &[files, dirs, symlinks, deleted, bytes.as_bytes()],
        );
        for op in &self.ops {
            let (tag, place) = match op {
                Op::Delete(p) => ("delete", p),
                Op::Mkdir(p) => ("mkdir", p),
                Op::Move { dst, .. } => ("move", dst),
                Op::Meta(p, _) => ("meta", p),
            };
            let root = place.root.to_string();
            let mut fields: Vec<&[u8]> = Vec::new();
            if let Op::Move { src, .. } = op {
                fields.push(src.as_os_str().as_bytes());
            }
            fields.push(root.as_bytes());
            fields.push(place.rel.as_os_str().as_bytes());
            let meta = match op {
                Op::Meta(_, m) => vec![
                    format!("{:o}", m.mode),
                    m.uid.to_string(),
                    m.gid.to_string(),
                    m.atime.0.to_string(),
                    m.atime.1.to_string(),
                    m.mtime.0.to_string(),
                    m.mtime.1.to_string(),
                ],
                _ => Vec::new(),
            };
            fields.extend(meta.iter().map(|n| n.as_bytes()));
            record(&mut out, tag, &fields);
        }
        let count = self.ops.len().to_string();
        let sum = format!("{:016x}", fnv64(&out));
        record(&mut out, "end", &[count.as_bytes(), sum.as_bytes()]);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Journal, Malformed> {
        let nl = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(Malformed::Torn("no header line"))?;
        let version = bytes[..nl]
            .strip_prefix(MAGIC.as_bytes())
            .and_then(|rest| rest.strip_prefix(b" "))
            .ok_or(Malformed::Torn("bad header line"))?;
        if version != VERSION.to_string().as_bytes() {
            // Only a well-formed version number names another format.
            if version.is_empty() || version.len() > 9 || !version.iter().all(u8::is_ascii_digit) {
                return Err(Malformed::Torn("bad header line"));
            }
            return Err(Malformed::Version(version.to_vec()));
        }
        let mut r = Reader { bytes, pos: nl + 1 };
        let mut journal = Journal::default();
        let mut summary = None;
        loop {
            let start = r.pos;
            let tag = r.field()?;
            let arity = match tag {
                b"root" => 1,
                b"delete" | b"mkdir" | b"end" => 2,
                b"move" => 3,
                b"summary" => 5,
                b"meta" => 9,
                _ => return Err(Malformed::Torn("unknown record")),
            };
            let f = (0..arity)
                .map(|_| r.field())
                .collect::<Result<Vec<&[u8]>, _>>()?;
            r.newline()?;
            let place = |i: usize| -> Result<Place, Malformed> {
                let root = num(f[i])?;
                if root >= journal.roots.len() {
                    return Err(Malformed::Torn("unknown root"));
                }
                Ok(Place {
                    root,
                    rel: rel_path(f[i + 1])?,
                })
            };
            let op = match tag {
                b"delete" => Op::Delete(place(0)?),
                b"mkdir" => Op::Mkdir(place(0)?),
                b"move" => Op::Move {
                    src: rel_path(f[0])?,
                    dst: place(1)?,
                },
                b"meta" => {
                    let mode = std::str::from_utf8(f[2])
                        .ok()
                        .and_then(|s| u32::from_str_radix(s, 8).ok())
                        .ok_or(Malformed::Torn("bad mode"))?;
                    let meta = DirMeta {
                        mode,
                        uid: num(f[3])?,
                        gid: num(f[4])?,
                        atime: (num(f[5])?, num(f[6])?),
                        mtime: (num(f[7])?, num(f[8])?),
                    };
                    Op::Meta(place(0)?, meta)
                }
                b"root" => {
                    let root = PathBuf::from(OsStr::from_bytes(f[0]));
                    if !root.is_absolute() {
                        return Err(Malformed::Torn("relative root"));
                    }
                    journal.roots.push(root);
                    continue;
                }
                b"summary" => {
                    summary = Some(CommitSummary {
                        files: num(f[0])?,
                        dirs: num(f[1])?,
                        symlinks: num(f[2])?,
                        deleted: num(f[3])?,
                        bytes: num(f[4])?,
                    });
                    continue;
                }
                _ => {
                    // `end`: the last record; it counts the operations and hashes the rest.
                    if r.pos != bytes.len() {
                        return Err(Malformed::Torn("data after the end record"));
                    }
                    if num::<usize>(f[0])? != journal.ops.len() {
                        return Err(Malformed::Torn("operation count mismatch"));
                    }
                    if f[1] != format!("{:016x}", fnv64(&bytes[..start])).as_bytes() {
                        return Err(Malformed::Torn("checksum mismatch"));
                    }
                    journal.summary = summary.ok_or(Malformed::Torn("no summary record"))?;
                    return Ok(journal);
                }
            };
            journal.ops.push(op);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn field(&mut self) -> Result<&'a [u8], Malformed> {
        let rest = &self.bytes[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(Malformed::Torn("truncated record"))?;
        self.pos += end + 1;
        Ok(&rest[..end])
    }

    fn newline(&mut self) -> Result<(), Malformed> {
        if self.bytes.get(self.pos) == Some(&b'\n') {
            self.pos += 1;
            Ok(())
        } else {
            Err(Malformed::Torn("record without its newline"))
        }
    }
}

fn num<T: std::str::FromStr>(field: &[u8]) -> Result<T, Malformed> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Malformed::Torn("bad number"))
}

/// A relative path that stays beneath its root: not empty, not absolute, no `..`.
fn rel_path(field: &[u8]) -> Result<PathBuf, Malformed> {
    let path = PathBuf::from(OsString::from_vec(field.to_vec()));
    let beneath = path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !field.is_empty() && !field.starts_with(b"/") && beneath {
        Ok(path)
    } else {
        Err(Malformed::Torn("bad relative path"))
    }
}

// ----- writing -----

/// Writes `journal` as `L.journal` atomically and durably (see the module docs).
pub(crate) fn write(layer_dir: &Path, journal: &Journal) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;

    let tmp = tmp_path(layer_dir);
    let path = journal_path(layer_dir);
    let result = (|| -> io::Result<()> {
        let mut file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(&journal.encode())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_parent(&path)
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Journal { path, source }
    })
}

fn sync_parent(path: &Path) -> io::Result<()> {
    File::open(parent_of(path))?.sync_all()
}

// ----- applying -----

/// The directories a journal's operations resolve against.
pub(crate) struct Trees {
    pub(crate) layer_dir: PathBuf,
    /// `O_PATH` descriptor of the layer directory, the anchor of every `move` source.
    pub(crate) layer: OwnedFd,
    /// `O_PATH` descriptors of [`Journal::roots`], in order.
    pub(crate) roots: Vec<OwnedFd>,
}

impl Trees {
    /// Opens the layer directory and the journal's roots by path (trusted: symlinks are
    /// followed, as for the options' binds).
    fn open(layer_dir: &Path, journal: &Journal) -> Result<Trees, Error> {
        let open = |path: &Path| {
            rustix::fs::open(
                path,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io::Error::from)
        };
        let layer = open(layer_dir).map_err(|source| Error::LayerDir {
            path: layer_dir.to_path_buf(),
            source,
        })?;
        let roots = journal
            .roots
            .iter()
            .map(|root| {
                open(root).map_err(|source| Error::Commit {
                    path: root.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Trees {
            layer_dir: layer_dir.to_path_buf(),
            layer,
            roots,
        })
    }
}

impl Journal {
    /// The real path of `place`, for messages.
    fn real_path(&self, place: &Place) -> PathBuf {
        let root = &self.roots[place.root];
        if place.rel == Path::new(".") {
            root.clone()
        } else {
            root.join(&place.rel)
        }
    }
}

/// Applies the journal's operations in order, all of them or (`stop`) only the first `n`
/// without cleaning up, as if the process were killed there. After all of them: makes every
/// changed directory durable, deletes the journal and removes the layer directory.
pub(crate) fn run(journal: &Journal, trees: &Trees, stop: Option<usize>) -> Result<(), Error> {
    apply_ops(journal, trees, stop)?;
    if stop.is_some() {
        return Ok(());
    }
    settle(journal, trees)?;
    remove_layer(&trees.layer_dir)
}

/// Applies the journal's operations in order: all of them, or (`stop`) only the first `n`.
pub(crate) fn apply_ops(
    journal: &Journal,
    trees: &Trees,
    stop: Option<usize>,
) -> Result<(), Error> {
    // Temporary copies get names fixed by the journal, so a replay removes a stale one.
    let id = fnv64(&journal.encode());
    let as_root = rustix::process::geteuid().is_root();
    let n = stop.map_or(journal.ops.len(), |n| n.min(journal.ops.len()));
    for (index, op) in journal.ops[..n].iter().enumerate() {
        let tmp = OsString::from(format!(".cot-commit-{id:016x}-{index}"));
        apply(trees, op, &tmp, as_root).map_err(|source| Error::Commit {
            path: journal.real_path(place_of(op)),
            source,
        })?;
    }
    Ok(())
}

/// After every operation was applied: makes every directory they changed durable, then deletes
/// the journal (durably). From then on the layer directory is garbage to a recovery.
pub(crate) fn settle(journal: &Journal, trees: &Trees) -> Result<(), Error> {
    let mut changed = std::collections::BTreeSet::new();
    for op in &journal.ops {
        match op {
            Op::Meta(p, _) => changed.insert(p.clone()),
            Op::Delete(p) | Op::Mkdir(p) | Op::Move { dst: p, .. } => changed.insert(Place {
                root: p.root,
                rel: parent_of(&p.rel).to_path_buf(),
            }),
        };
    }
    for place in &changed {
        sync_dir(trees.roots[place.root].as_fd(), &place.rel).map_err(|source| Error::Commit {
            path: journal.real_path(place),
            source,
        })?;
    }
    let path = journal_path(&trees.layer_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::Journal { path, source }),
    }
    sync_parent(&path).map_err(|source| Error::Journal { path, source })
}

fn place_of(op: &Op) -> &Place {
    match op {
        Op::Delete(p) | Op::Mkdir(p) | Op::Meta(p, _) | Op::Move { dst: p, .. } => p,
    }
}

/// Whether `e` means the path cannot be reached beneath its root: nothing is there.
fn unreachable_path(e: &io::Error) -> bool {
    is_absent(e) || e.raw_os_error() == Some(libc::ELOOP)
}

fn apply(trees: &Trees, op: &Op, tmp: &OsStr, as_root: bool) -> io::Result<()> {
    match op {
        Op::Delete(p) => {
            let (prel, name) = real::split(&p.rel)?;
            let dir = match real::open_dir(trees.roots[p.root].as_fd(), prel) {
                Ok(dir) => dir,
                Err(e) if unreachable_path(&e) => return Ok(()),
                Err(e) => return Err(e),
            };
            real::remove_tree_at(dir.as_fd(), name)?;
        }
        Op::Mkdir(p) => {
            let (prel, name) = real::split(&p.rel)?;
            let dir = real::open_dir(trees.roots[p.root].as_fd(), prel)?;
            match real::stat_at(dir.as_fd(), name) {
                Ok(st) if real::is_dir(&st) => return Ok(()),
                Ok(_) => {
                    real::remove_tree_at(dir.as_fd(), name)?;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
            match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                // Another thunk's commit made it in between (two `make -j` recipes that both
                // create `.libs`): a directory there is what this operation wants.
                Err(rustix::io::Errno::EXIST)
                    if real::stat_at(dir.as_fd(), name).is_ok_and(|st| real::is_dir(&st)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Op::Move { src, dst } => {
            let (sprel, sname) = real::split(src)?;
            let sdir = match real::open_dir(trees.layer.as_fd(), sprel) {
                Ok(dir) => dir,
                Err(e) if is_absent(&e) => return Ok(()),
                Err(e) => return Err(e),
            };
            let st = match real::stat_at(sdir.as_fd(), sname) {
                Ok(st) => st,
                // The source goes only with the move: it was done.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(e),
            };
            let (prel, name) = real::split(&dst.rel)?;
            let dir = real::open_dir(trees.roots[dst.root].as_fd(), prel)?;
            if let Ok(real_st) = real::stat_at(dir.as_fd(), name) {
                if real::is_dir(&real_st) {
                    real::remove_tree_at(dir.as_fd(), name)?;
                }
            }
            match rustix::fs::renameat(&sdir, sname, &dir, name) {
                Ok(()) => {}
                Err(rustix::io::Errno::XDEV) => {
                    copy_into_place(sdir.as_fd(), sname, &st, dir.as_fd(), name, tmp, as_root)?;
                    // The copy must be durable before its source goes.
                    sync_dir(dir.as_fd(), Path::new("."))?;
                    match rustix::fs::unlinkat(&sdir, sname, AtFlags::empty()) {
                        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Op::Meta(p, m) => {
            let fd = real::open_beneath(
                trees.roots[p.root].as_fd(),
                &p.rel,
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            )?;
            // Owner first: chown clears set-id bits.
            if as_root {
                rustix::fs::fchown(
                    &fd,
                    Some(rustix::fs::Uid::from_raw(m.uid)),
                    Some(rustix::fs::Gid::from_raw(m.gid)),
                )?;
            }
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(m.mode & 0o7777))?;
            let ts = |(tv_sec, nsec): (i64, i64)| rustix::fs::Timespec {
                tv_sec,
                tv_nsec: nsec as _,
            };
            rustix::fs::futimens(
                &fd,
                &rustix::fs::Timestamps {
                    last_access: ts(m.atime),
                    last_modification: ts(m.mtime),
                },
            )?;
        }
    }
    Ok(())
}

/// Copies the layer entry `sname` (in `sdir`) to `tmp` beside its destination, makes the copy
/// durable and renames it over `name`: each destination changes atomically, even across file
/// systems.
fn copy_into_place(
    sdir: BorrowedFd<'_>,
    sname: &OsStr,
    st: &rustix::fs::Stat,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    tmp: &OsStr,
    as_root: bool,
) -> io::Result<()> {
    let owner = as_root.then_some((st.st_uid, st.st_gid));
    match rustix::fs::unlinkat(dir, tmp, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let result = (|| -> io::Result<()> {
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            let src = File::from(rustix::fs::openat(
                sdir,
                sname,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?);
            real::copy_file_at(&src, st, dir, tmp, owner)?.sync_all()?;
        } else {
            let src = rustix::fs::openat(
                sdir,
                sname,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            real::copy_special_at(src.as_fd(), st, dir, tmp, owner)?;
        }
        Ok(rustix::fs::renameat(dir, tmp, dir, name)?)
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
    }
    result
}

/// fsyncs the directory `rel` beneath `root`; one that cannot be reached any more has nothing
/// to make durable.
fn sync_dir(root: BorrowedFd<'_>, rel: &Path) -> io::Result<()> {
    match real::open_beneath(root, rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) {
        Ok(fd) => Ok(rustix::fs::fsync(fd)?),
        Err(e) if unreachable_path(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the layer directory and everything in it; absent is fine.
pub(crate) fn remove_layer(layer_dir: &Path) -> Result<(), Error> {
    let err = |source| Error::RemoveLayer {
        path: layer_dir.to_path_buf(),
        source,
    };
    let name = layer_dir
        .file_name()
        .ok_or_else(|| err(io::Error::from_raw_os_error(libc::EINVAL)))?;
    let dir = match rustix::fs::open(
        parent_of(layer_dir),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(dir) => dir,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(err(e.into())),
    };
    real::remove_tree_at(dir.as_fd(), name).map_err(err)?;
    Ok(())
}

// ----- recovery -----

pub(crate) fn recover(layer_dir: &Path) -> Result<Recovery, Error> {
    let path = journal_path(layer_dir);
    let tmp = tmp_path(layer_dir);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::Journal { path: tmp, source }),
    }
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            remove_layer(layer_dir)?;
            return Ok(Recovery::Discarded);
        }
        Err(source) => return Err(Error::Journal { path, source }),
    };
    match Journal::decode(&bytes) {
        Ok(journal) => {
            let trees = Trees::open(layer_dir, &journal)?;
            run(&journal, &trees, None)?;
            Ok(Recovery::Completed(journal.summary))
        }
        Err(Malformed::Version(version)) => Err(Error::JournalVersion {
            path,
            version: String::from_utf8_lossy(&version).into_owned(),
        }),
        Err(Malformed::Torn(why)) => {
            log::warn!("discarding the unfinished commit journal {path:?}: {why}");
            // The layer first: should this be interrupted, the journal still says to discard.
            remove_layer(layer_dir)?;
            std::fs::remove_file(&path)
                .and_then(|()| sync_parent(&path))
                .map_err(|source| Error::Journal { path, source })?;
            Ok(Recovery::Discarded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Journal {
        let odd = |bytes: &[u8]| PathBuf::from(OsStr::from_bytes(bytes));
        let place = |root, rel: PathBuf| Place { root, rel };
        Journal {
            roots: vec![PathBuf::from("/srv/root"), odd(b"/home/u/pr\xffoj\nx")],
            ops: vec![
                Op::Delete(place(0, odd(b"a/b\nc"))),
                Op::Mkdir(place(1, odd(b"d\xfe"))),
                Op::Move {
                    src: odd(b"home/u/pr\xffoj\nx/d\xfe/f"),
                    dst: place(1, odd(b"d\xfe/f")),
                },
                Op::Meta(
                    place(1, PathBuf::from(".")),
                    DirMeta {
                        mode: 0o2755,
                        uid: 1000,
                        gid: 100,
                        atime: (-5, 999_999_999),
                        mtime: (1_700_000_000, 0),
                    },
                ),
            ],
            summary: CommitSummary {
                files: 1,
                dirs: 1,
                symlinks: 0,
                deleted: 3,
                bytes: 1 << 40,
            },
        }
    }

    #[test]
    fn round_trips_non_utf8_paths_and_newlines() {
        let journal = sample();
        assert_eq!(Journal::decode(&journal.encode()), Ok(journal));
        let empty = Journal::default();
        assert_eq!(Journal::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn every_truncation_is_torn() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                matches!(Journal::decode(&bytes[..len]), Err(Malformed::Torn(_))),
                "a journal cut at {len} of {} bytes must not parse",
                bytes.len()
            );
        }
    }

    #[test]
    fn every_changed_byte_is_caught() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 0x20;
            let result = Journal::decode(&changed);
            assert!(
                matches!(result, Err(Malformed::Torn(_))),
                "byte {i} changed: {result:?}"
            );
        }
    }

    #[test]
    fn another_version_is_not_torn() {
        assert_eq!(
            Journal::decode(b"cot-fusefs-journal 2\nanything"),
            Err(Malformed::Version(b"2".to_vec()))
        );
    }

    #[test]
    fn paths_must_stay_beneath_their_root() {
        for rel in [&b"../x"[..], b"a/../../x", b"/etc", b""] {
            let journal = Journal {
                roots: vec![PathBuf::from("/r")],
                ops: vec![Op::Mkdir(Place {
                    root: 0,
                    rel: PathBuf::from(OsStr::from_bytes(rel)),
                })],
                summary: CommitSummary::default(),
            };
            assert!(
                Journal::decode(&journal.encode()).is_err(),
                "{:?} accepted",
                rel.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn sibling_paths_of_the_layer() {
        assert_eq!(
            journal_path(Path::new("/x/layers/7/")),
            Path::new("/x/layers/7.journal")
        );
        assert_eq!(tmp_path(Path::new("l")), Path::new("l.journal.tmp"));
    }
}
