//! The content store: every file a thunk writes, and its captured stdout and stderr, kept by
//! blake3 digest so that a cache hit can restore outputs without running anything.
//!
//! [`Cas`] is one store, named by its root directory; objects are named by their [`Digest`];
//! [`hash_file`] and [`hash_bytes`] compute digests without storing anything; [`Error`] is the
//! module's one error type.
//!
//! # On-disk format, version 1
//!
//! ```text
//! <root>/VERSION                    "1\n"; any other content is refused (Error::Version)
//! <root>/objects/<2 hex>/<62 hex>   one object: the bytes whose blake3 digest, in lowercase hex,
//!                                   is the directory name followed by the file name; mode 0444
//! <root>/tmp/<unique>               an object being written
//! <root>/corrupt/<64 hex>           an object that failed verification, never served again
//! ```
//!
//! The fan-out directories under `objects/` are created on demand and never removed. When the
//! root is group-writable (a cache shared by the users of a group: `chgrp team DIR; chmod 2775
//! DIR`), every directory the store creates gets the root's permission bits (setgid included),
//! whatever the umask of the user who creates it.
//!
//! # Invariants
//!
//! - An object file is never written in place. Its content is read once and hashed on the
//!   way into a fresh file in `tmp/` (copied, or reflinked then read back and hashed; a small
//!   file goes through memory and is written only if its object is absent), which is made
//!   read-only, fsynced and renamed to its object path. Renaming onto an existing object
//!   replaces it with the same bytes, so any number of writers (threads, cot processes,
//!   projects sharing one `--cache DIR`, users when the directories are group or world
//!   writable) never corrupt it.
//! - Nothing is trusted on the way out: [`Cas::read`], [`Cas::restore`] and [`Cas::import`]
//!   hash what they hand back and refuse (Error::Corrupt) content that does not match its
//!   digest. The offending object is moved to `corrupt/`, so the next put of that content
//!   stores a good copy. Nothing is trusted on the way in from elsewhere either: an object
//!   copied from another store ([`Cas::import`]) or written by a [`Writer`] (a download) is
//!   hashed as it lands and installed only when it has the digest it was asked for.
//! - Restored files are copies (or reflinks, which are copy-on-write), never hard links: editing
//!   a restored output in place cannot change the object it came from.
//!
//! # What an interruption leaves behind
//!
//! A crash at any instant leaves at most a stray file in `tmp/` (removed by [`Cas::gc`] once it
//! is an hour old) and, during [`Cas::restore`], a stray `.cot-restore-*` file next to the
//! destination. After a power loss, an object whose rename was not yet durable is missing
//! (read and restore then fail with a not-found [`Error::Io`]); callers treat that like a
//! corrupt object and run the thunk again.
//!
//! # Not done here
//!
//! [`Cas::gc`] trusts its `keep` set: an object stored by a writer whose trace is not yet
//! committed is not in it, so gc must not run concurrently with such writers. Sharing a store
//! between users relies on the directories' own permissions (a group-writable, setgid root);
//! who may write to it is the file system's business, what is read from it is checked here.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tempfile::NamedTempFile;

#[cfg(test)]
mod tests;

/// A blake3 digest: names an object (the same type as `crate::store::model::Digest`).
pub type Digest = [u8; 32];

/// The content of `<root>/VERSION` this code reads and writes.
const VERSION: &str = "1\n";

/// Read and copy buffer: large enough that blake3 hashes many chunks per call with SIMD.
const BUF_SIZE: usize = 256 * 1024;

/// Files in `tmp/` older than this belong to writers that died; younger ones may be in use.
const STRAY_AGE: Duration = Duration::from_secs(3600);

/// Mode of every object file.
const OBJECT_MODE: u32 = 0o444;

/// What went wrong in the content store; every variant names the path, and the digest where
/// there is one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation on this path failed. A missing object is reported this way,
    /// with the object's path and `io::ErrorKind::NotFound`.
    #[error("{path:?}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },

    /// An object's content does not match its digest. It has been moved to `<root>/corrupt/`.
    #[error("content object {digest} at {path:?} is corrupt: its content has another digest")]
    Corrupt {
        /// The digest the object is stored under, in hex.
        digest: String,
        /// Where the object was.
        path: PathBuf,
    },

    /// A file given to [`Cas::put_file_known`] no longer has the content its caller expected.
    #[error("{path:?} changed: expected content {expected}, found {found}")]
    Changed {
        /// The file.
        path: PathBuf,
        /// The digest the caller expected, in hex.
        expected: String,
        /// The digest of what the file holds now, in hex.
        found: String,
    },

    /// Content that arrived from elsewhere (another store, a download) does not have the digest
    /// it was asked for; nothing was stored.
    #[error("{origin}: expected content {expected}, received content {found}")]
    Mismatch {
        /// Where it came from.
        origin: String,
        /// The digest asked for, in hex.
        expected: String,
        /// The digest of what arrived, in hex.
        found: String,
    },

    /// `<root>/VERSION` names a format this code does not read.
    #[error("content store {path:?} has format version {found:?}; this cot reads version 1 only")]
    Version {
        /// The `VERSION` file.
        path: PathBuf,
        /// What it holds (at most 64 bytes of it, lossily decoded), without the trailing newline.
        found: String,
    },
}

/// The digest in lowercase hex, as used in object paths and error messages.
pub fn hex(d: &Digest) -> String {
    blake3::Hash::from_bytes(*d).to_hex().to_string()
}

/// The digest of `data`.
pub fn hash_bytes(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

/// The digest and size of a regular file's content, read once in large blocks.
pub fn hash_file(path: &Path) -> Result<(Digest, u64), Error> {
    let (mut file, size) = open_regular(path)?;
    stream(&mut file, path, None, size)
}

/// A content store rooted at one directory. Holds only paths: `Send + Sync`, cheap to clone,
/// and any number of `Cas` values (in any number of processes) may use one root at once.
#[derive(Clone, Debug)]
pub struct Cas {
    root: PathBuf,
    objects: PathBuf,
    tmp: PathBuf,
    corrupt: PathBuf,
    /// The root's permission bits when it is group-writable: given to every directory made.
    shared_mode: Option<u32>,
    /// Opened to read only ([`Cas::open_existing`]): an object found corrupt is left where it
    /// is (it fails verification again on every read).
    read_only: bool,
}

/// What [`Cas::gc`] freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Objects removed.
    pub objects: usize,
    /// Bytes removed: those objects plus stray files in `tmp/` and `corrupt/`.
    pub bytes: u64,
}

impl Cas {
    /// Opens the store at `root`, creating it (directories and `VERSION`) if needed. Refuses a
    /// store of another format version.
    pub fn open(root: &Path) -> Result<Cas, Error> {
        fs::create_dir_all(root).map_err(io_error(root))?;
        let mut cas = Cas::at(root);
        cas.shared_mode = fs::metadata(root)
            .ok()
            .map(|m| m.permissions().mode() & 0o7777)
            .filter(|mode| mode & 0o020 != 0);
        for dir in [&cas.objects, &cas.tmp, &cas.corrupt] {
            cas.make_dir(dir)?;
        }
        cas.check_version()?;
        Ok(cas)
    }

    /// Opens an existing store at `root` without creating or writing anything (a store the
    /// caller may only read). Refuses a missing store or one of another format version.
    pub fn open_existing(root: &Path) -> Result<Cas, Error> {
        let cas = Cas {
            read_only: true,
            ..Cas::at(root)
        };
        let path = root.join("VERSION");
        let found = fs::read(&path).map_err(io_error(&path))?;
        if found != VERSION.as_bytes() {
            let found = String::from_utf8_lossy(&found[..found.len().min(64)]);
            return Err(Error::Version {
                path,
                found: found.trim_end_matches('\n').to_owned(),
            });
        }
        Ok(cas)
    }

    fn at(root: &Path) -> Cas {
        Cas {
            root: root.to_owned(),
            objects: root.join("objects"),
            tmp: root.join("tmp"),
            corrupt: root.join("corrupt"),
            shared_mode: None,
            read_only: false,
        }
    }

    /// Creates a directory of the store unless it exists, with the root's permission bits when
    /// the store is shared.
    fn make_dir(&self, dir: &Path) -> Result<(), Error> {
        make_dir(dir, self.shared_mode)
    }

    /// The permission bits of the root when it is shared by a group (see the module
    /// documentation), for directories kept beside the store.
    pub fn shared_mode(&self) -> Option<u32> {
        self.shared_mode
    }

    /// The directory the store was opened at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether an object with this digest is stored (one stat; the content is not checked).
    pub fn contains(&self, d: &Digest) -> bool {
        fs::symlink_metadata(self.object_path(d)).is_ok()
    }

    /// Stores the file's current content; returns its digest and size. Reads the file once
    /// (hash while copying). If an object with that digest exists already, the copy is dropped.
    /// A file smaller than 256 KiB is read into memory instead, and written to the store only
    /// if its object is absent. Anything but a regular file is refused (Error::Io).
    pub fn put_file(&self, path: &Path) -> Result<(Digest, u64), Error> {
        let (digest, size, content) = self.take_in(path)?;
        self.install(content, &digest)?;
        Ok((digest, size))
    }

    /// Stores a file whose digest the caller already knows (e.g. from a stat-tuple cache):
    /// if the object exists this is one stat and nothing is read; else like put_file, and if
    /// the content's digest differs from `expected` -> Error::Changed (the file changed).
    pub fn put_file_known(&self, path: &Path, expected: &Digest) -> Result<(), Error> {
        if self.contains(expected) {
            return Ok(());
        }
        let (digest, _, content) = self.take_in(path)?;
        if digest != *expected {
            return Err(Error::Changed {
                path: path.to_owned(),
                expected: hex(expected),
                found: hex(&digest),
            });
        }
        self.install(content, &digest)
    }

    /// Stores `data`; returns its digest. Nothing is written if the object exists already.
    pub fn put_bytes(&self, data: &[u8]) -> Result<Digest, Error> {
        let digest = hash_bytes(data);
        self.install(Content::Memory(Cow::Borrowed(data)), &digest)?;
        Ok(digest)
    }

    /// Reads an object, verified against its digest (Error::Corrupt if not, and the corrupt
    /// object is moved to <root>/corrupt/ so it is not served again).
    pub fn read(&self, d: &Digest) -> Result<Vec<u8>, Error> {
        let path = self.object_path(d);
        let (mut file, size) = open_regular(&path)?;
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.read_to_end(&mut data).map_err(io_error(&path))?;
        if hash_bytes(&data) != *d {
            return Err(self.corrupt(d, path));
        }
        Ok(data)
    }

    /// Opens an object for reading as it is, unverified: for looking through its bytes (a
    /// content that is used is read with [`Cas::read`] or [`Cas::restore`]).
    pub fn open_object(&self, d: &Digest) -> Result<File, Error> {
        open_regular(&self.object_path(d)).map(|(file, _)| file)
    }

    /// Writes the object's content to `dest` atomically (temp file in dest's directory, then
    /// rename over dest), with `mode` (permission bits), never as a hard link. Reflink (FICLONE)
    /// where the filesystem can, else copy; either way the content is verified against the
    /// digest (hash while copying, or hash the clone) before the rename; corrupt -> Error::Corrupt,
    /// dest untouched. Missing parent directories are not created: the caller does that.
    ///
    /// `mode` is masked to `0o7777`. The new file is fsynced before the rename, so after a
    /// power loss `dest` holds either its old content or all of the new. A `dest` that is a
    /// symbolic link is replaced, not followed.
    pub fn restore(&self, d: &Digest, dest: &Path, mode: u32) -> Result<(), Error> {
        let path = self.object_path(d);
        let (mut object, size) = open_regular(&path)?;
        let dir = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".cot-restore-")
            .tempfile_in(dir)
            .map_err(io_error(dir))?;
        let (digest, _) = fill(&mut object, &path, &mut tmp, size, ficlone)?;
        if digest != *d {
            return Err(self.corrupt(d, path));
        }
        finish(&tmp, mode & 0o7777)?;
        tmp.persist(dest).map_err(|e| Error::Io {
            path: dest.to_owned(),
            source: e.error,
        })?;
        Ok(())
    }

    /// Copies object `d` from the store `from` into this one (a reflink where the file system
    /// can), unless it is here already; returns its size. The copy is hashed as it lands: an
    /// object of `from` that does not match its digest is refused (Error::Corrupt, and moved
    /// to `from`'s `corrupt/` when `from` can be written), and nothing is stored here.
    pub fn import(&self, from: &Cas, d: &Digest) -> Result<u64, Error> {
        let here = self.object_path(d);
        if let Ok(meta) = fs::symlink_metadata(&here) {
            return Ok(meta.len());
        }
        let path = from.object_path(d);
        let (mut object, size) = open_regular(&path)?;
        let mut tmp = self.tmp_file()?;
        let (digest, size) = fill(&mut object, &path, &mut tmp, size, ficlone)?;
        if digest != *d {
            return Err(from.corrupt(d, path));
        }
        self.install(Content::Tmp(tmp), d)?;
        Ok(size)
    }

    /// A writer of one object whose digest the caller knows (content arriving from elsewhere):
    /// see [`Writer`].
    pub fn writer(&self) -> Result<Writer, Error> {
        Ok(Writer {
            cas: self.clone(),
            tmp: self.tmp_file()?,
            hasher: blake3::Hasher::new(),
            size: 0,
        })
    }

    /// Removes objects not in `keep`, stray files in `tmp/` older than an hour, and everything
    /// in `corrupt/`; returns what was freed. Files under `objects/` whose names are not object
    /// names are left alone.
    pub fn gc(&self, keep: &HashSet<Digest>) -> Result<GcReport, Error> {
        let mut report = GcReport::default();
        for fan_out in read_dir(&self.objects)? {
            let fan_out_name = fan_out.file_name();
            let Some(prefix) = fan_out_name.to_str().filter(|n| is_lower_hex(n, 2)) else {
                continue;
            };
            let fan_out_path = fan_out.path();
            if !fan_out.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for entry in read_dir(&fan_out_path)? {
                let name = entry.file_name();
                let Some(rest) = name.to_str().filter(|n| is_lower_hex(n, 62)) else {
                    continue;
                };
                let Ok(hash) = blake3::Hash::from_hex(format!("{prefix}{rest}")) else {
                    continue;
                };
                if keep.contains(hash.as_bytes()) {
                    continue;
                }
                if let Some(bytes) = remove(&entry)? {
                    report.objects += 1;
                    report.bytes += bytes;
                }
            }
        }
        let now = SystemTime::now();
        for entry in read_dir(&self.tmp)? {
            let stray = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > STRAY_AGE));
            if stray {
                report.bytes += remove(&entry)?.unwrap_or(0);
            }
        }
        for entry in read_dir(&self.corrupt)? {
            report.bytes += remove(&entry)?.unwrap_or(0);
        }
        Ok(report)
    }

    fn object_path(&self, d: &Digest) -> PathBuf {
        let h = hex(d);
        let mut path = self.objects.join(&h[..2]);
        path.push(&h[2..]);
        path
    }

    fn check_version(&self) -> Result<(), Error> {
        let path = self.root.join("VERSION");
        match fs::read(&path) {
            Ok(found) if found == VERSION.as_bytes() => Ok(()),
            Ok(found) => {
                let found = String::from_utf8_lossy(&found[..found.len().min(64)]);
                Err(Error::Version {
                    path,
                    found: found.trim_end_matches('\n').to_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Written whole, then renamed: a concurrent open never reads a partial VERSION.
                let mut tmp = self.tmp_file()?;
                tmp.write_all(VERSION.as_bytes())
                    .map_err(io_error(tmp.path()))?;
                finish(&tmp, OBJECT_MODE)?;
                tmp.persist(&path).map_err(|e| Error::Io {
                    path: path.clone(),
                    source: e.error,
                })?;
                Ok(())
            }
            Err(e) => Err(Error::Io { path, source: e }),
        }
    }

    fn write_tmp(&self, data: &[u8]) -> Result<NamedTempFile, Error> {
        let mut tmp = self.tmp_file()?;
        tmp.write_all(data).map_err(io_error(tmp.path()))?;
        Ok(tmp)
    }

    fn tmp_file(&self) -> Result<NamedTempFile, Error> {
        tempfile::Builder::new()
            .prefix("obj-")
            .tempfile_in(&self.tmp)
            .map_err(io_error(&self.tmp))
    }

    /// Reads the file at `path` once, hashing it: into memory if it is small, else into a new
    /// file in `tmp/`. Returns the digest and size of what was read, and the content.
    fn take_in<'a>(&self, path: &Path) -> Result<(Digest, u64, Content<'a>), Error> {
        let (mut src, size) = open_regular(path)?;
        if size < BUF_SIZE as u64 {
            let mut data = Vec::with_capacity(BUF_SIZE.min(size as usize + 1));
            src.read_to_end(&mut data).map_err(io_error(path))?;
            let digest = hash_bytes(&data);
            return Ok((digest, data.len() as u64, Content::Memory(Cow::Owned(data))));
        }
        let mut tmp = self.tmp_file()?;
        let (digest, size) = fill(&mut src, path, &mut tmp, size, ficlone)?;
        Ok((digest, size, Content::Tmp(tmp)))
    }

    /// Makes `content`, whose digest is `d`, the object `d`, unless that object exists already.
    fn install(&self, content: Content<'_>, d: &Digest) -> Result<(), Error> {
        if self.contains(d) {
            return Ok(());
        }
        let tmp = match content {
            Content::Tmp(tmp) => tmp,
            Content::Memory(data) => self.write_tmp(&data)?,
        };
        finish(&tmp, OBJECT_MODE)?;
        let dest = self.object_path(d);
        let error = match tmp.persist(&dest) {
            Ok(_) => return Ok(()),
            Err(e) if e.error.kind() == io::ErrorKind::NotFound => {
                let dir = dest.parent().unwrap_or(&self.objects);
                self.make_dir(dir)?;
                match e.file.persist(&dest) {
                    Ok(_) => return Ok(()),
                    Err(e) => e.error,
                }
            }
            Err(e) => e.error,
        };
        // Someone else's object may not be replaceable (a sticky directory shared between
        // users); it has the same content, so it will do.
        if self.contains(d) {
            return Ok(());
        }
        Err(Error::Io {
            path: dest,
            source: error,
        })
    }

    /// The error for object `d` at `path` found corrupt, after moving the object out of the way
    /// (or, failing that, removing it).
    fn corrupt(&self, d: &Digest, path: PathBuf) -> Error {
        let digest = hex(d);
        if self.read_only {
            return Error::Corrupt { digest, path };
        }
        if fs::rename(&path, self.corrupt.join(&digest)).is_err() {
            // Best effort: if this fails too, the next read detects the corruption again.
            let _ = fs::remove_file(&path);
        }
        Error::Corrupt { digest, path }
    }
}

/// Content arriving in pieces (a download), hashed as it is written to a file in `tmp/`, and
/// stored by [`Writer::finish`] only if it has the digest it was asked for.
pub struct Writer {
    cas: Cas,
    tmp: NamedTempFile,
    hasher: blake3::Hasher,
    size: u64,
}

impl Writer {
    /// Appends `data`.
    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.tmp.write_all(data).map_err(io_error(&self.cas.tmp))
    }

    /// Stores what was written as object `expected`, or refuses it (Error::Mismatch, naming
    /// `origin`) when it has another digest. Returns its size.
    pub fn finish(self, expected: &Digest, origin: &str) -> Result<u64, Error> {
        let found = *self.hasher.finalize().as_bytes();
        if found != *expected {
            return Err(Error::Mismatch {
                origin: origin.to_owned(),
                expected: hex(expected),
                found: hex(&found),
            });
        }
        self.cas.install(Content::Tmp(self.tmp), expected)?;
        Ok(self.size)
    }
}

/// Creates `dir` unless it exists; a directory created gets `mode` when one is given (the
/// permission bits of a store shared by a group).
pub fn make_dir(dir: &Path, mode: Option<u32>) -> Result<(), Error> {
    match fs::create_dir(dir) {
        Ok(()) => {
            if let Some(mode) = mode {
                // Through a descriptor of the directory itself, never a symlink put in its
                // place (the parent is writable by the group).
                let opened = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(dir)
                    .map_err(io_error(dir))?;
                opened
                    .set_permissions(Permissions::from_mode(mode))
                    .map_err(io_error(dir))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Io {
            path: dir.to_owned(),
            source: e,
        }),
    }
}

/// Content on its way into the store.
enum Content<'a> {
    Memory(Cow<'a, [u8]>),
    /// Already written to a file in `tmp/`.
    Tmp(NamedTempFile),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Opens a regular file for reading; returns it and its size. Anything else is refused
/// before it is read (a FIFO or a device could block or never end).
fn open_regular(path: &Path) -> Result<(File, u64), Error> {
    let file = OpenOptions::new()
        .read(true)
        // Opening a FIFO must not block until a writer appears; no effect on regular files.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_error(path))?;
    let meta = file.metadata().map_err(io_error(path))?;
    if !meta.is_file() {
        return Err(Error::Io {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    Ok((file, meta.len()))
}

/// Reads `src` from its current offset to its end, hashing it and, if `dst` is given, writing
/// it there. `size` is a hint for the buffer size. Returns the digest and the length read.
fn stream(
    src: &mut File,
    src_path: &Path,
    mut dst: Option<&mut NamedTempFile>,
    size: u64,
) -> Result<(Digest, u64), Error> {
    let len = usize::try_from(size)
        .unwrap_or(usize::MAX)
        .saturating_add(1)
        .clamp(4096, BUF_SIZE);
    let mut buf = vec![0u8; len];
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(src_path)(e)),
        };
        hasher.update(&buf[..n]);
        if let Some(dst) = dst.as_mut() {
            dst.write_all(&buf[..n]).map_err(io_error(dst.path()))?;
        }
        total += n as u64;
    }
    Ok((*hasher.finalize().as_bytes(), total))
}

/// How [`fill`] tries to share `src`'s data with `dst` without copying; tests substitute it.
type CloneFn = fn(dst: &File, src: &File) -> io::Result<()>;

fn ficlone(dst: &File, src: &File) -> io::Result<()> {
    rustix::fs::ioctl_ficlone(dst.as_fd(), src.as_fd()).map_err(io::Error::from)
}

/// Gives the empty file `dst` the content of `src` and returns the digest and size of what
/// `dst` now holds: a reflink read back and hashed where the file system can clone, else a
/// copy hashed on the way. Either way the digest is of the bytes in `dst`, never assumed.
fn fill(
    src: &mut File,
    src_path: &Path,
    dst: &mut NamedTempFile,
    size: u64,
    clone: CloneFn,
) -> Result<(Digest, u64), Error> {
    // FICLONE fails without side effects where it is not supported (EOPNOTSUPP, EXDEV, EINVAL),
    // and leaves both file offsets alone.
    if clone(dst.as_file(), src).is_ok() {
        let dst_path = dst.path().to_owned();
        return stream(dst.as_file_mut(), &dst_path, None, size);
    }
    stream(src, src_path, Some(dst), size)
}

/// Sets a written temporary file's mode and makes its content durable before it is renamed.
fn finish(tmp: &NamedTempFile, mode: u32) -> Result<(), Error> {
    let file = tmp.as_file();
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(io_error(tmp.path()))?;
    file.sync_all().map_err(io_error(tmp.path()))
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, Error> {
    fs::read_dir(dir)
        .and_then(|entries| entries.collect())
        .map_err(io_error(dir))
}

/// Removes a directory entry's file; returns its size, or None if it was already gone or is
/// not a file (nothing here makes directories; one someone else made is left alone).
fn remove(entry: &fs::DirEntry) -> Result<Option<u64>, Error> {
    if entry.file_type().is_ok_and(|t| t.is_dir()) {
        return Ok(None);
    }
    let path = entry.path();
    let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
    match fs::remove_file(&path) {
        Ok(()) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io { path, source: e }),
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
