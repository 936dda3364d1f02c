//! A cache directory shared by the checkouts and users of one machine (`--cache DIR`).
//!
//! # On-disk format, version 1
//!
//! ```text
//! DIR/VERSION, objects/, tmp/, corrupt/   a content store (crate::cas, format 1): the contents
//!                                         of the traces below
//! DIR/traces/VERSION                      "1\n"; any other content is refused
//! DIR/traces/<2 hex>/<62 hex>/key         postcard(ThunkKey) of one thunk, whose blake3 digest
//!                                         (the thunk id) is the directory's name
//! DIR/traces/<2 hex>/<62 hex>/<64 hex>    postcard(Entry): one trace of the thunk in its shared
//!                                         form, whose blake3 digest is the file's name; its
//!                                         modification time is its last use
//! ```
//!
//! # Invariants
//!
//! - Every file is written whole to `DIR/tmp/` and renamed into place, mode 0444: a reader
//!   sees a complete file or none, and any number of writers (processes, checkouts, users)
//!   never corrupt one another. Contents go in first, then the key, then the trace, so a
//!   trace whose contents are missing is one whose contents someone removed (and is simply
//!   unusable).
//! - Nothing is trusted on the way out: a key or trace whose digest is not its name is
//!   skipped (and removed, when the directory can be written); a whole trace this cot cannot
//!   decode (another version's) is skipped and left; only regular files are read, never
//!   through a symlink; a trace that would write outside the project is refused
//!   ([`super::portable::confined`]); and a content is imported into the project's own store
//!   only through [`crate::cas::Cas::import`], which hashes it. So a torn, corrupt or forged
//!   file costs a run, never a wrong output or a write outside the project.
//! - A thunk keeps at most [`MAX_TRACES`] traces: writing one more removes the least recently
//!   used (by modification time; a use sets it when the directory can be written).
//! - A group-writable `DIR` (`chgrp team DIR; chmod 2775 DIR`) gives its mode to every
//!   directory created in it, so the users of the group can all write; a directory the caller
//!   cannot write (or `--cache-read-only`) is used read-only: nothing in it is created,
//!   changed or removed.
//!
//! # What an interruption leaves behind
//!
//! At most a stray file in `DIR/tmp/`. Nothing collects the directory yet: stray files, and
//! the contents of traces pruned past [`MAX_TRACES`], stay until the directory is removed
//! (every checkout keeps working without it). Traces are not synced: after a power loss one
//! may be missing or empty, and is then skipped as corrupt.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::cas::{self, Cas};
use crate::store::model::{Digest, ThunkId, ThunkKey};
use crate::store::{hex, thunk_id};

use super::portable::Entry;
use super::Error;

/// How many traces a thunk keeps in the shared directory.
pub const MAX_TRACES: usize = 8;

/// The content of `DIR/traces/VERSION`.
const VERSION: &str = "1\n";

/// A shared cache directory, opened for reading and writing or for reading only.
#[derive(Clone, Debug)]
pub struct SharedDir {
    root: PathBuf,
    cas: Cas,
    traces: PathBuf,
    writable: bool,
}

/// What [`SharedDir::known`] found of a thunk.
#[derive(Debug)]
pub struct Known {
    pub key: ThunkKey,
    /// Its traces, most recently used first, each with its digest (its file name).
    pub entries: Vec<(Digest, Entry)>,
    /// Files that failed verification (skipped).
    pub corrupt: usize,
}

impl SharedDir {
    /// Opens the cache at `root`: for writing, creating it if needed, unless `read_only` or
    /// the caller cannot write there; then it must exist.
    pub fn open(root: &Path, read_only: bool) -> Result<SharedDir, Error> {
        if root.exists() && !root.is_dir() {
            return Err(Error::Corrupt {
                path: root.to_path_buf(),
                reason: "not a directory".into(),
            });
        }
        let writable = !read_only && can_write(root);
        let traces = root.join("traces");
        let cas = if writable {
            Cas::open(root)?
        } else {
            Cas::open_existing(root)?
        };
        let dir = SharedDir {
            root: root.to_path_buf(),
            cas,
            traces,
            writable,
        };
        dir.check_version()?;
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether this process may write to the cache.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The cache's content store.
    pub fn cas(&self) -> &Cas {
        &self.cas
    }

    /// The key and traces of thunk `id`, verified; `None` when the cache does not know it (or
    /// its key is corrupt).
    pub fn known(&self, id: &ThunkId) -> Result<Option<Known>, Error> {
        let dir = self.thunk_dir(id);
        let key_path = dir.join("key");
        let bytes = match read_file(&key_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&key_path, e)),
        };
        let key: Option<ThunkKey> = postcard::from_bytes(&bytes).ok();
        let Some(key) = key.filter(|key| thunk_id(key) == *id) else {
            self.remove_corrupt(&key_path);
            return Err(Error::Corrupt {
                path: key_path,
                reason: "not the key of the thunk it is filed under".into(),
            });
        };
        let mut corrupt = 0;
        let mut entries = Vec::new();
        for (digest, path, _) in self.entry_files(&dir)? {
            let Ok(bytes) = read_file(&path) else {
                continue;
            };
            if *blake3::hash(&bytes).as_bytes() != digest {
                corrupt += 1;
                self.remove_corrupt(&path);
                continue;
            }
            // Whole, but not a trace this cot can read: another version's, left to it.
            if let Ok(entry) = postcard::from_bytes::<Entry>(&bytes) {
                entries.push((digest, entry));
            }
        }
        Ok(Some(Known {
            key,
            entries,
            corrupt,
        }))
    }

    /// Copies the contents a trace refers to into the project's store `into`, each verified.
    pub fn fetch(&self, digests: &[Digest], into: &Cas) -> Result<(), Error> {
        for digest in digests {
            into.import(&self.cas, digest)?;
        }
        Ok(())
    }

    /// Marks a trace as just used (best effort: the file may belong to another user).
    pub fn touch(&self, id: &ThunkId, entry: &Digest) {
        if !self.writable {
            return;
        }
        let path = self.thunk_dir(id).join(hex(entry));
        if let Ok(file) = fs::File::open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    /// Adds a trace of thunk `key`: its contents (`digests`, from the project's store
    /// `from`), the key, then the trace; drops the least recently used traces past
    /// [`MAX_TRACES`].
    pub fn put(
        &self,
        key: &ThunkKey,
        entry: &Entry,
        digests: &[Digest],
        from: &Cas,
    ) -> Result<(), Error> {
        if !self.writable {
            return Ok(());
        }
        for digest in digests {
            self.cas.import(from, digest)?;
        }
        let id = thunk_id(key);
        let dir = self.thunk_dir(&id);
        let mode = self.cas.shared_mode();
        cas::make_dir(&self.traces, mode)?;
        cas::make_dir(dir.parent().unwrap_or(&self.traces), mode)?;
        cas::make_dir(&dir, mode)?;
        let key_path = dir.join("key");
        if !key_path.exists() {
            self.write_file(&key_path, &encode(key))?;
        }
        let bytes = encode(entry);
        let digest = *blake3::hash(&bytes).as_bytes();
        let path = dir.join(hex(&digest));
        if path.exists() {
            self.touch(&id, &digest);
        } else {
            self.write_file(&path, &bytes)?;
        }
        for (_, stale, _) in self.entry_files(&dir)?.into_iter().skip(MAX_TRACES) {
            let _ = fs::remove_file(stale);
        }
        Ok(())
    }

    /// The trace files of a thunk's directory, most recently used first.
    fn entry_files(&self, dir: &Path) -> Result<Vec<(Digest, PathBuf, SystemTime)>, Error> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(dir, e)),
        };
        let mut files = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(digest) = name
                .to_str()
                .and_then(|n| blake3::Hash::from_hex(n).ok())
                .map(|h| *h.as_bytes())
            else {
                continue;
            };
            let used = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            files.push((digest, entry.path(), used));
        }
        files.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        Ok(files)
    }

    fn thunk_dir(&self, id: &ThunkId) -> PathBuf {
        let name = hex(id);
        self.traces.join(&name[..2]).join(&name[2..])
    }

    /// Writes `bytes` to `path` through `DIR/tmp/` and a rename, read-only.
    fn write_file(&self, path: &Path, bytes: &[u8]) -> Result<(), Error> {
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::Builder::new()
            .prefix("trace-")
            .tempfile_in(&tmp_dir)
            .map_err(|e| io_error(&tmp_dir, e))?;
        tmp.write_all(bytes).map_err(|e| io_error(tmp.path(), e))?;
        // Through the descriptor: the name in a shared tmp/ may have been replaced.
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o444))
            .map_err(|e| io_error(tmp.path(), e))?;
        tmp.persist(path).map_err(|e| io_error(path, e.error))?;
        Ok(())
    }

    /// Removes a file that failed verification, when the cache can be written.
    fn remove_corrupt(&self, path: &Path) {
        if self.writable {
            let _ = fs::remove_file(path);
        }
    }

    /// Writes `traces/VERSION` if the cache is new, and refuses another format.
    fn check_version(&self) -> Result<(), Error> {
        let path = self.traces.join("VERSION");
        match read_file(&path) {
            Ok(found) if found == VERSION.as_bytes() => Ok(()),
            Ok(found) => Err(Error::Version {
                path,
                found: String::from_utf8_lossy(&found[..found.len().min(64)])
                    .trim_end()
                    .to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.writable {
                    cas::make_dir(&self.traces, self.cas.shared_mode())?;
                    self.write_file(&path, VERSION.as_bytes())?;
                }
                Ok(())
            }
            Err(e) => Err(io_error(&path, e)),
        }
    }
}

/// The largest key, trace or version file read.
const MAX_FILE: u64 = 1 << 30;

/// Reads a file of the cache whole: a regular file of at most [`MAX_FILE`] bytes, not through
/// a symlink. Whatever else a writer of the cache put there (a FIFO, a device, a link to one)
/// is an error, never waited on.
fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file of a plausible size",
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Whether this process can create and write files in `root` (creating it if needed).
fn can_write(root: &Path) -> bool {
    if fs::create_dir_all(root).is_err() {
        return false;
    }
    let dirs = [root.to_path_buf(), root.join("traces"), root.join("tmp")];
    dirs.iter()
        .all(|dir| !dir.exists() || rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_ok())
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // The cache's types are plain structs, enums, integers and vectors.
    postcard::to_allocvec(value).expect("postcard encodes every cache type")
}

fn io_error(path: &Path, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::portable;
    use crate::store::model::{Output, OutputState, StorePath, Trace};

    fn key(n: u8) -> ThunkKey {
        ThunkKey::of_command(&["cc", &n.to_string()])
    }

    /// A trace writing `content` to `out`, its contents in `cas`.
    fn entry(cas: &Cas, content: &[u8], ran_at_ns: i64) -> (Entry, Vec<Digest>) {
        let empty = cas.put_bytes(b"").unwrap();
        let trace = Trace {
            inputs: Vec::new(),
            outputs: vec![Output {
                path: StorePath::Project(b"out".to_vec()),
                state: OutputState::File {
                    digest: cas.put_bytes(content).unwrap(),
                    mode: 0o644,
                    size: content.len() as u64,
                },
            }],
            stdout: empty,
            stderr: empty,
            exit_code: 0,
            duration_ns: 0,
            ran_at_ns,
            children: Vec::new(),
            events: Vec::new(),
            internal: Vec::new(),
        };
        let blobs = portable::blobs(&trace);
        (
            Entry {
                pinned: Vec::new(),
                trace,
            },
            blobs,
        )
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        local: Cas,
        root: PathBuf,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        Fixture {
            local: Cas::open(&tmp.path().join("local")).unwrap(),
            root: tmp.path().join("shared"),
            _tmp: tmp,
        }
    }

    #[test]
    fn a_trace_put_by_one_checkout_is_known_with_its_contents_to_another() {
        let f = fixture();
        let shared = SharedDir::open(&f.root, false).unwrap();
        assert!(shared.writable());
        let (e, blobs) = entry(&f.local, b"object", 1);
        shared.put(&key(1), &e, &blobs, &f.local).unwrap();
        assert!(shared.known(&thunk_id(&key(2))).unwrap().is_none());

        let other = Cas::open(&f.root.with_file_name("other")).unwrap();
        let known = shared.known(&thunk_id(&key(1))).unwrap().unwrap();
        assert_eq!(known.key, key(1));
        assert_eq!(known.entries.len(), 1);
        assert_eq!(known.entries[0].1, e);
        shared.fetch(&blobs, &other).unwrap();
        for digest in &blobs {
            assert!(other.contains(digest));
        }
        // Putting the same trace again changes nothing.
        shared.put(&key(1), &e, &blobs, &f.local).unwrap();
        let known = shared.known(&thunk_id(&key(1))).unwrap().unwrap();
        assert_eq!(known.entries.len(), 1);
    }

    #[test]
    fn a_thunk_keeps_its_most_recent_traces() {
        let f = fixture();
        let shared = SharedDir::open(&f.root, false).unwrap();
        for n in 0..MAX_TRACES + 3 {
            let (e, blobs) = entry(&f.local, format!("v{n}").as_bytes(), n as i64);
            shared.put(&key(1), &e, &blobs, &f.local).unwrap();
            // Distinct modification times, as successive builds have.
            let dir = shared.thunk_dir(&thunk_id(&key(1)));
            let name = hex(blake3::hash(&encode(&e)).as_bytes());
            let when = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + n as u64);
            fs::File::open(dir.join(name))
                .unwrap()
                .set_modified(when)
                .unwrap();
        }
        let known = shared.known(&thunk_id(&key(1))).unwrap().unwrap();
        let kept: Vec<i64> = known
            .entries
            .iter()
            .map(|(_, e)| e.trace.ran_at_ns)
            .collect();
        // The last put was pruned down to the bound before its own time was set.
        assert_eq!(kept.len(), MAX_TRACES);
        assert_eq!(
            kept[0],
            (MAX_TRACES + 2) as i64,
            "most recent first: {kept:?}"
        );
    }

    #[test]
    fn corrupt_traces_and_keys_are_skipped_and_removed() {
        let f = fixture();
        let shared = SharedDir::open(&f.root, false).unwrap();
        let (good, blobs) = entry(&f.local, b"good", 1);
        shared.put(&key(1), &good, &blobs, &f.local).unwrap();
        let dir = shared.thunk_dir(&thunk_id(&key(1)));
        // A trace whose content is not what its name says (a torn or forged file).
        let (forged, _) = entry(&f.local, b"forged", 2);
        let (other, _) = entry(&f.local, b"other", 3);
        let name = hex(blake3::hash(&encode(&other)).as_bytes());
        fs::write(dir.join(&name), encode(&forged)).unwrap();
        let known = shared.known(&thunk_id(&key(1))).unwrap().unwrap();
        assert_eq!(known.corrupt, 1);
        assert_eq!(known.entries.len(), 1);
        assert_eq!(known.entries[0].1, good);
        assert!(!dir.join(&name).exists(), "removed");
        // A whole file that is no trace this cot reads (another version's) is left alone.
        let foreign = b"a trace of another format".to_vec();
        let foreign_name = hex(blake3::hash(&foreign).as_bytes());
        fs::write(dir.join(&foreign_name), &foreign).unwrap();
        // A FIFO, or a link to one, where a trace should be is skipped, never waited on.
        nix::unistd::mkfifo(&dir.join(hex(&[7; 32])), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::os::unix::fs::symlink(dir.join(hex(&[7; 32])), dir.join(hex(&[8; 32]))).unwrap();
        let known = shared.known(&thunk_id(&key(1))).unwrap().unwrap();
        assert_eq!((known.corrupt, known.entries.len()), (0, 1));
        assert!(dir.join(&foreign_name).exists(), "kept");
        // A key filed under another thunk's id.
        fs::set_permissions(dir.join("key"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(dir.join("key"), encode(&key(2))).unwrap();
        assert!(matches!(
            shared.known(&thunk_id(&key(1))),
            Err(Error::Corrupt { .. })
        ));
        assert!(shared.known(&thunk_id(&key(1))).unwrap().is_none());
    }

    /// The cache's formats hold store model types (traces, keys): a change of the model is a
    /// new store schema, and must be a new cache format too.
    #[test]
    fn the_cache_format_follows_the_store_schema() {
        assert_eq!(
            (
                crate::store::schema::SCHEMA_VERSION,
                VERSION,
                crate::remote::SALT
            ),
            (4, "1\n", &b"cot thunk, format 1"[..]),
            "the store schema changed: change the shared cache's VERSION and the remote SALT \
             with it, then this test"
        );
    }

    #[test]
    fn a_read_only_cache_is_read_and_never_written() {
        let f = fixture();
        assert!(
            SharedDir::open(&f.root, true).is_err(),
            "a missing cache cannot be read"
        );
        assert!(!f.root.exists(), "nor is it created");
        let writer = SharedDir::open(&f.root, false).unwrap();
        let (e, blobs) = entry(&f.local, b"object", 1);
        writer.put(&key(1), &e, &blobs, &f.local).unwrap();

        let reader = SharedDir::open(&f.root, true).unwrap();
        assert!(!reader.writable());
        let (e2, blobs2) = entry(&f.local, b"another", 2);
        reader.put(&key(1), &e2, &blobs2, &f.local).unwrap();
        let known = reader.known(&thunk_id(&key(1))).unwrap().unwrap();
        assert_eq!(known.entries.len(), 1, "nothing was added");
        assert!(!reader.cas().contains(&blobs2[0]) || blobs.contains(&blobs2[0]));
    }

    #[test]
    fn a_content_that_fails_verification_is_not_fetched() {
        let f = fixture();
        let shared = SharedDir::open(&f.root, false).unwrap();
        let (e, blobs) = entry(&f.local, b"object content", 1);
        shared.put(&key(1), &e, &blobs, &f.local).unwrap();
        let OutputState::File { digest, .. } = e.trace.outputs[0].state else {
            unreachable!()
        };
        let h = hex(&digest);
        let object = f.root.join("objects").join(&h[..2]).join(&h[2..]);
        fs::set_permissions(&object, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&object, b"object contenT").unwrap();
        let other = Cas::open(&f.root.with_file_name("other")).unwrap();
        assert!(shared.fetch(&blobs, &other).is_err());
        assert!(!other.contains(&digest));
    }
}
