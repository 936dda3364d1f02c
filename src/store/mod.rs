//! The trace store: what cot remembers of every thunk it ran, in a RocksDB database.
//!
//! A [`Store`] maps a thunk, identified by the [`thunk_id`] of its [`ThunkKey`], to a
//! [`ThunkInfo`] and up to [`MAX_TRACES_PER_THUNK`] [`Trace`]s, most recently used first. It
//! keeps two reverse indexes in step with the traces (path -> thunks that read it, path ->
//! thunk that last wrote it) and a cache of [`FileState`]s, the digests of real files valid
//! while their stat tuple is unchanged. [`model`] defines the stored types, [`schema`] the
//! on-disk format and its version. Errors are one enum, [`Error`].
//!
//! This module is the only code in cot that links RocksDB.

pub mod model;
pub mod schema;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rocksdb::{
    Cache, ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, ReadOptions, WriteBatch,
    WriteOptions, DB,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use model::{
    BuildRecord, Digest, FileState, OutputState, StorePath, ThunkId, ThunkInfo, ThunkKey, Trace,
    TraceId,
};
use schema::{BUILDS, FILES, META, READERS, THUNKS, TRACES, WRITERS};

/// How many traces the store keeps per thunk; recording one more drops the least recently
/// used.
pub const MAX_TRACES_PER_THUNK: usize = 8;

/// How many candidates an ambiguous [`Store::find_thunk`] error lists.
const AMBIGUOUS_LISTED: usize = 8;

/// An error of the trace store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create trace store directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open trace store {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("trace store {} is already open for writing", path.display())]
    Locked {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error(
        "trace store {} has schema version {found}, this cot understands {}: upgrade cot, or \
         remove {} to start afresh",
        path.display(),
        schema::SCHEMA_VERSION,
        path.display()
    )]
    NewerSchema { path: PathBuf, found: u32 },
    #[error(
        "trace store {} has schema version {found}, which this cot cannot migrate from: remove \
         {} to start afresh",
        path.display(),
        path.display()
    )]
    OlderSchema { path: PathBuf, found: u32 },
    #[error(
        "trace store {} holds data but no valid schema version (meta key schema_version: \
         {value}): remove {} to start afresh",
        path.display(),
        path.display()
    )]
    MissingSchema { path: PathBuf, value: String },
    #[error("trace store {} has no column family {cf}", path.display())]
    MissingColumnFamily { path: PathBuf, cf: &'static str },
    #[error(
        "cannot read trace store {}, column family {cf}, key {key}: {source}",
        path.display()
    )]
    Read {
        path: PathBuf,
        cf: &'static str,
        key: String,
        source: rocksdb::Error,
    },
    #[error("cannot write to trace store {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("trace store {} is open read-only", path.display())]
    ReadOnly { path: PathBuf },
    #[error(
        "corrupt value in trace store {}, column family {cf}, key {key}: {reason}",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        cf: &'static str,
        key: String,
        reason: String,
    },
    #[error("no thunk {thunk} in trace store {}", path.display())]
    UnknownThunk { path: PathBuf, thunk: String },
    #[error("thunk {thunk} has no trace {trace} in trace store {}", path.display())]
    UnknownTrace {
        path: PathBuf,
        thunk: String,
        trace: String,
    },
    #[error("path {} contains a nul byte", String::from_utf8_lossy(path))]
    NulInPath { path: Vec<u8> },
    #[error("{prefix:?} is not a thunk id prefix (1 to 64 hex digits)")]
    BadPrefix { prefix: String },
    #[error("no thunk id starts with {prefix} in trace store {}", path.display())]
    NoSuchThunk { path: PathBuf, prefix: String },
    #[error("thunk id prefix {prefix} is ambiguous: {}", candidates.join(", "))]
    AmbiguousThunk {
        prefix: String,
        candidates: Vec<String>,
    },
}

/// What [`Store::gc`] dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub thunks: usize,
    pub traces: usize,
    pub file_states: usize,
}

/// The identity of a thunk: the blake3 digest of its key's postcard encoding.
pub fn thunk_id(key: &ThunkKey) -> ThunkId {
    blake3::hash(&encode(key)).into()
}

/// The identity of a trace: the blake3 digest of its postcard encoding.
pub fn trace_id(trace: &Trace) -> TraceId {
    blake3::hash(&encode(trace)).into()
}

/// Lowercase hex, as ids and keys appear in messages and `cot show`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// The postcard encoding of a model value.
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard fails only on types it cannot express (unknown-length sequences, `serialize_any`);
    // the model types are plain structs, enums, integers and vectors.
    postcard::to_allocvec(value).expect("postcard encodes every model type")
}

/// A thunk's key and its kept traces, most recently used first.
pub type KnownThunk = (ThunkKey, Vec<(TraceId, Trace)>);

/// The trace store. One process at a time opens it with [`Store::open`]; within it, any number
/// of threads share it (reads run in parallel, writes are serialized).
pub struct Store {
    db: DB,
    path: PathBuf,
    read_only: bool,
    /// Held by every read-modify-write (record, touch, gc), so that the thunk row each of them
    /// reads is still current when it writes. Blind writes (file states) do not take it.
    write_lock: Mutex<()>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// What `meta` says of the schema version.
enum Version {
    Found(u32),
    /// No `meta` column family or no version key.
    Missing,
    /// A version key that is not 4 bytes.
    Invalid(Vec<u8>),
}

impl Store {
    /// Opens the store in `dir` for reading and writing, creating it if missing, and checks its
    /// schema version.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        Store::open_in_mode(dir, false)
    }

    /// Opens the store in `dir` read-only, also while another process has it open for writing.
    /// It sees what was written up to the moment it opened.
    pub fn open_read_only(dir: &Path) -> Result<Store, Error> {
        Store::open_in_mode(dir, true)
    }

    fn open_in_mode(dir: &Path, read_only: bool) -> Result<Store, Error> {
        let path = dir.to_path_buf();
        let lock_file = format!("{}: ", dir.join("LOCK").display());
        let cache = Cache::new_lru_cache(schema::BLOCK_CACHE_BYTES);
        let mut db_opts = schema::db_options();
        let open_error = |source: rocksdb::Error| {
            // RocksDB names its lock file, whichever process holds it: "While lock file:
            // DIR/LOCK: Resource temporarily unavailable", "lock hold by current process, ...:
            // DIR/LOCK: No locks available".
            if source.to_string().contains(&lock_file) {
                Error::Locked {
                    path: path.clone(),
                    source,
                }
            } else {
                Error::Open {
                    path: path.clone(),
                    source,
                }
            }
        };

        if !read_only && !dir.join("CURRENT").exists() {
            std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                path: path.clone(),
                source,
            })?;
            db_opts.create_if_missing(true);
            db_opts.create_missing_column_families(true);
            // `default` too: rust-rocksdb would otherwise add it with default options.
            let descriptors = [rocksdb::DEFAULT_COLUMN_FAMILY_NAME]
                .iter()
                .chain(&schema::COLUMN_FAMILIES)
                .map(|name| ColumnFamilyDescriptor::new(*name, schema::cf_options(&cache)));
            let db = DB::open_cf_descriptors(&db_opts, dir, descriptors).map_err(open_error)?;
            let store = Store::new(db, path, false);
            store.write_version()?;
            return Ok(store);
        }

        // Open with exactly the column families the database has: a future version may have
        // more (RocksDB refuses to open without all of them), and none is created before the
        // version is known.
        let existing = DB::list_cf(&db_opts, dir).map_err(open_error)?;
        let descriptors = existing
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, schema::cf_options(&cache)));
        let db = if read_only {
            DB::open_cf_descriptors_read_only(&db_opts, dir, descriptors, false)
        } else {
            DB::open_cf_descriptors(&db_opts, dir, descriptors)
        }
        .map_err(open_error)?;
        let mut store = Store::new(db, path, read_only);

        let mut migrate = false;
        let missing_version = match store.read_version()? {
            Version::Found(found) if found == schema::SCHEMA_VERSION => false,
            Version::Found(found) if found > schema::SCHEMA_VERSION => {
                return Err(Error::NewerSchema {
                    path: store.path,
                    found,
                })
            }
            Version::Found(1..=3) if !read_only => {
                migrate = true;
                false
            }
            Version::Found(found) => {
                return Err(Error::OlderSchema {
                    path: store.path,
                    found,
                })
            }
            Version::Invalid(value) => {
                return Err(Error::MissingSchema {
                    path: store.path,
                    value: hex(&value),
                })
            }
            Version::Missing => {
                if !store.is_empty(&existing)? {
                    return Err(Error::MissingSchema {
                        path: store.path,
                        value: "none".into(),
                    });
                }
                true
            }
        };
        let absent: Vec<&'static str> = schema::COLUMN_FAMILIES
            .into_iter()
            .filter(|name| !existing.iter().any(|e| e == name))
            .collect();
        if read_only {
            // An empty database without a version was created and interrupted before the
            // version was written; it reads as empty if its column families exist.
            if let Some(cf) = absent.first().copied() {
                return Err(Error::MissingColumnFamily {
                    path: store.path,
                    cf,
                });
            }
            return Ok(store);
        }
        for name in absent {
            store
                .db
                .create_cf(name, &schema::cf_options(&cache))
                .map_err(|source| Error::Write {
                    path: store.path.clone(),
                    source,
                })?;
        }
        if migrate {
            store.migrate_from_1()?;
        }
        if missing_version {
            store.write_version()?;
        }
        Ok(store)
    }

    /// Versions 1, 2 and 3 → 4: drops every thunk, trace, index and build row (their encoding
    /// changed; the store is a cache), keeps the file states, and writes the new version, in
    /// one synced batch.
    fn migrate_from_1(&self) -> Result<(), Error> {
        let mut batch = WriteBatch::default();
        for name in [THUNKS, TRACES, READERS, WRITERS, BUILDS] {
            let cf = self.cf(name)?;
            for item in self.db.iterator_cf(cf, IteratorMode::Start) {
                let (key, _) = item.map_err(|source| self.read_error(name, &[], source))?;
                batch.delete_cf(cf, key);
            }
        }
        batch.put_cf(
            self.cf(META)?,
            schema::VERSION_KEY,
            schema::SCHEMA_VERSION.to_be_bytes(),
        );
        self.write(batch, true)
    }

    /// The record of the last build whose root thunk is `root`.
    pub fn build_record(&self, root: &ThunkId) -> Result<Option<BuildRecord>, Error> {
        self.get_value(BUILDS, root, &ReadOptions::default())
    }

    /// Stores the record of a build (synced: the next build cleans stale outputs from it).
    pub fn put_build_record(&self, root: &ThunkId, record: &BuildRecord) -> Result<(), Error> {
        self.check_writable()?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(BUILDS)?, root, encode(record));
        self.write(batch, true)
    }

    fn new(db: DB, path: PathBuf, read_only: bool) -> Store {
        Store {
            db,
            path,
            read_only,
            write_lock: Mutex::new(()),
        }
    }

    fn read_version(&self) -> Result<Version, Error> {
        if self.db.cf_handle(META).is_none() {
            return Ok(Version::Missing);
        }
        Ok(
            match self.get_raw(META, schema::VERSION_KEY, &ReadOptions::default())? {
                None => Version::Missing,
                Some(bytes) => match schema::decode_version(&bytes) {
                    Some(version) => Version::Found(version),
                    None => Version::Invalid(bytes),
                },
            },
        )
    }

    fn write_version(&self) -> Result<(), Error> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(META)?,
            schema::VERSION_KEY,
            schema::SCHEMA_VERSION.to_be_bytes(),
        );
        self.write(batch, true)
    }

    /// Whether no column family holds any key.
    fn is_empty(&self, cfs: &[String]) -> Result<bool, Error> {
        for name in cfs {
            let Some(cf) = self.db.cf_handle(name) else {
                continue;
            };
            if let Some(item) = self.db.iterator_cf(cf, IteratorMode::Start).next() {
                item.map_err(|source| Error::Open {
                    path: self.path.clone(),
                    source,
                })?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The thunk's info, if the store knows it.
    pub fn thunk(&self, id: &ThunkId) -> Result<Option<ThunkInfo>, Error> {
        self.get_value(THUNKS, id, &ReadOptions::default())
    }

    /// The thunk's traces, most recently used first.
    pub fn traces(&self, id: &ThunkId) -> Result<Vec<(TraceId, Trace)>, Error> {
        // One snapshot, so that a concurrent record cannot drop a listed trace in between.
        let snapshot = self.db.snapshot();
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snapshot);
        let Some(info) = self.get_value::<ThunkInfo>(THUNKS, id, &opts)? else {
            return Ok(Vec::new());
        };
        let mut traces = Vec::with_capacity(info.traces.len());
        for trace in &info.traces {
            traces.push((*trace, self.kept_trace(id, trace, &opts)?));
        }
        Ok(traces)
    }

    /// A thunk's key and its kept traces, most recently used first, from one snapshot.
    pub fn known(&self, id: &ThunkId) -> Result<Option<KnownThunk>, Error> {
        let snapshot = self.db.snapshot();
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snapshot);
        let Some(info) = self.get_value::<ThunkInfo>(THUNKS, id, &opts)? else {
            return Ok(None);
        };
        let mut traces = Vec::with_capacity(info.traces.len());
        for trace in &info.traces {
            traces.push((*trace, self.kept_trace(id, trace, &opts)?));
        }
        Ok(Some((info.key, traces)))
    }

    /// A trace that the thunk's row lists, which must therefore exist.
    fn kept_trace(
        &self,
        thunk: &ThunkId,
        trace: &TraceId,
        opts: &ReadOptions,
    ) -> Result<Trace, Error> {
        self.get_value(TRACES, &schema::trace_key(thunk, trace), opts)?
            .ok_or_else(|| Error::Corrupt {
                path: self.path.clone(),
                cf: THUNKS,
                key: hex(thunk),
                reason: format!("lists trace {} that has no row in {TRACES}", hex(trace)),
            })
    }

    /// Records a trace in ONE synced WriteBatch: the trace; the ThunkInfo (new trace first in
    /// the MRU list, an identical trace moves to the front instead of duplicating; beyond
    /// [`MAX_TRACES_PER_THUNK`] the least recently used are dropped with their "traces" rows);
    /// "readers" rows for every input path of the kept traces (and removal of rows for paths
    /// no kept trace of this thunk reads any more); "writers" rows for every output path;
    /// and the given file states.
    ///
    /// The thunk's `last_used_ns` becomes the later of its previous value and the trace's
    /// `ran_at_ns`.
    pub fn record(
        &self,
        key: &ThunkKey,
        trace: &Trace,
        files: &[(Vec<u8>, FileState)],
    ) -> Result<TraceId, Error> {
        self.check_writable()?;
        for path in trace
            .inputs
            .iter()
            .map(|i| &i.path)
            .chain(trace.outputs.iter().map(|o| &o.path))
        {
            let (StorePath::Project(bytes) | StorePath::Absolute(bytes)) = path;
            if bytes.contains(&0) {
                return Err(Error::NulInPath {
                    path: bytes.clone(),
                });
            }
        }
        let thunk = thunk_id(key);
        let new_id = trace_id(trace);
        let _guard = self.write_lock.lock();
        let opts = ReadOptions::default();

        let old_info: Option<ThunkInfo> = self.get_value(THUNKS, &thunk, &opts)?;
        let mut old_ids: Vec<TraceId> = Vec::new();
        let mut old_traces: Vec<Trace> = Vec::new();
        if let Some(info) = &old_info {
            for id in &info.traces {
                if !old_ids.contains(id) {
                    old_traces.push(self.kept_trace(&thunk, id, &opts)?);
                    old_ids.push(*id);
                }
            }
        }
        let mut new_ids = vec![new_id];
        new_ids.extend(old_ids.iter().copied().filter(|id| *id != new_id));
        new_ids.truncate(MAX_TRACES_PER_THUNK);
        let kept_old = || {
            old_ids
                .iter()
                .zip(&old_traces)
                .filter(|(id, _)| new_ids.contains(id))
                .map(|(_, t)| t)
        };
        let dropped = || {
            old_ids
                .iter()
                .zip(&old_traces)
                .filter(|(id, _)| !new_ids.contains(id))
        };

        let mut batch = WriteBatch::default();
        let traces_cf = self.cf(TRACES)?;
        if !old_ids.contains(&new_id) {
            batch.put_cf(traces_cf, schema::trace_key(&thunk, &new_id), encode(trace));
        }
        for (id, _) in dropped() {
            batch.delete_cf(traces_cf, schema::trace_key(&thunk, id));
        }

        let readers_cf = self.cf(READERS)?;
        let old_read = input_keys(old_traces.iter());
        let new_read = input_keys(kept_old().chain([trace]));
        for path in old_read.difference(&new_read) {
            batch.delete_cf(readers_cf, schema::reader_key(path, &thunk));
        }
        for path in new_read.difference(&old_read) {
            batch.put_cf(readers_cf, schema::reader_key(path, &thunk), []);
        }

        let writers_cf = self.cf(WRITERS)?;
        for path in output_keys([trace].into_iter()) {
            batch.put_cf(writers_cf, path, thunk);
        }
        let written = output_keys(kept_old().chain([trace]));
        for path in output_keys(dropped().map(|(_, t)| t)).difference(&written) {
            if self.writer_of_key(path, &opts)? == Some(thunk) {
                batch.delete_cf(writers_cf, path);
            }
        }

        let info = ThunkInfo {
            key: old_info
                .as_ref()
                .map_or_else(|| key.clone(), |info| info.key.clone()),
            traces: new_ids,
            last_used_ns: old_info.as_ref().map_or(trace.ran_at_ns, |info| {
                info.last_used_ns.max(trace.ran_at_ns)
            }),
        };
        batch.put_cf(self.cf(THUNKS)?, thunk, encode(&info));
        self.put_files(&mut batch, files)?;
        self.write(batch, true)?;
        Ok(new_id)
    }

    /// Marks a trace as just used: moves it to the front of its thunk's list, sets the
    /// thunk's `last_used_ns` to `now_ns` (unless it is already later), and makes the thunk the
    /// writer of the trace's outputs (a reused trace put them there again).
    pub fn touch(&self, id: &ThunkId, trace: &TraceId, now_ns: i64) -> Result<(), Error> {
        self.check_writable()?;
        let _guard = self.write_lock.lock();
        let mut info: ThunkInfo = self
            .get_value(THUNKS, id, &ReadOptions::default())?
            .ok_or_else(|| Error::UnknownThunk {
                path: self.path.clone(),
                thunk: hex(id),
            })?;
        let Some(position) = info.traces.iter().position(|t| t == trace) else {
            return Err(Error::UnknownTrace {
                path: self.path.clone(),
                thunk: hex(id),
                trace: hex(trace),
            });
        };
        info.traces[..=position].rotate_right(1);
        info.last_used_ns = info.last_used_ns.max(now_ns);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(THUNKS)?, id, encode(&info));
        // A reused trace wrote its outputs again (restored them, or found them as it left
        // them): this thunk is now their last writer.
        let used: Option<Trace> = self.get_value(
            TRACES,
            &schema::trace_key(id, trace),
            &ReadOptions::default(),
        )?;
        if let Some(used) = used {
            let writers_cf = self.cf(WRITERS)?;
            for path in output_keys([&used].into_iter()) {
                batch.put_cf(writers_cf, path, id);
            }
        }
        self.write(batch, false)
    }

    /// The cached state of a real file, if any.
    pub fn file_state(&self, real_path: &[u8]) -> Result<Option<FileState>, Error> {
        self.get_value(FILES, real_path, &ReadOptions::default())
    }

    /// Caches the states of real files (in one unsynced batch: losing it costs a re-hash).
    pub fn put_file_states(&self, files: &[(Vec<u8>, FileState)]) -> Result<(), Error> {
        self.check_writable()?;
        let mut batch = WriteBatch::default();
        self.put_files(&mut batch, files)?;
        self.write(batch, false)
    }

    fn put_files(
        &self,
        batch: &mut WriteBatch,
        files: &[(Vec<u8>, FileState)],
    ) -> Result<(), Error> {
        let files_cf = self.cf(FILES)?;
        for (path, state) in files {
            batch.put_cf(files_cf, path, encode(state));
        }
        Ok(())
    }

    /// Every thunk the store knows, in id order.
    pub fn thunks(&self) -> Result<Vec<(ThunkId, ThunkInfo)>, Error> {
        let mut thunks = Vec::new();
        for item in self.db.iterator_cf(self.cf(THUNKS)?, IteratorMode::Start) {
            let (key, value) = item.map_err(|source| self.read_error(THUNKS, &[], source))?;
            let id = self.id_key(THUNKS, &key)?;
            thunks.push((id, self.decode(THUNKS, &key, &value)?));
        }
        Ok(thunks)
    }

    /// The thunks with a kept trace that read `path`, in id order.
    pub fn readers(&self, path: &StorePath) -> Result<Vec<ThunkId>, Error> {
        let prefix = schema::readers_prefix(&schema::path_key(path));
        let mut thunks = Vec::new();
        let mode = IteratorMode::From(&prefix, Direction::Forward);
        for item in self.db.iterator_cf(self.cf(READERS)?, mode) {
            let (key, _) = item.map_err(|source| self.read_error(READERS, &prefix, source))?;
            let Some(id) = key.strip_prefix(prefix.as_slice()) else {
                break;
            };
            thunks.push(
                self.id_key(READERS, id)
                    .map_err(|_| self.corrupt_key(READERS, &key))?,
            );
        }
        Ok(thunks)
    }

    /// The thunk whose most recent record wrote `path`, while it keeps a trace that does.
    pub fn writer(&self, path: &StorePath) -> Result<Option<ThunkId>, Error> {
        self.writer_of_key(&schema::path_key(path), &ReadOptions::default())
    }

    fn writer_of_key(&self, path_key: &[u8], opts: &ReadOptions) -> Result<Option<ThunkId>, Error> {
        match self.get_raw(WRITERS, path_key, opts)? {
            None => Ok(None),
            Some(value) => schema::id_from_bytes(&value)
                .map(Some)
                .ok_or_else(|| Error::Corrupt {
                    path: self.path.clone(),
                    cf: WRITERS,
                    key: hex(path_key),
                    reason: format!("value of {} bytes is not a thunk id", value.len()),
                }),
        }
    }

    /// Drops thunks not used since `before_ns` (their traces and index rows, atomically per
    /// thunk) and file states of files that no longer exist; returns what it dropped.
    pub fn gc(&self, before_ns: i64) -> Result<GcReport, Error> {
        self.check_writable()?;
        let _guard = self.write_lock.lock();
        let mut report = GcReport::default();
        let opts = ReadOptions::default();
        for (thunk, info) in self.thunks()? {
            if info.last_used_ns >= before_ns {
                continue;
            }
            let mut batch = WriteBatch::default();
            let mut traces = Vec::new();
            for id in &info.traces {
                traces.push(self.kept_trace(&thunk, id, &opts)?);
                batch.delete_cf(self.cf(TRACES)?, schema::trace_key(&thunk, id));
            }
            for path in input_keys(traces.iter()) {
                batch.delete_cf(self.cf(READERS)?, schema::reader_key(&path, &thunk));
            }
            for path in output_keys(traces.iter()) {
                if self.writer_of_key(&path, &opts)? == Some(thunk) {
                    batch.delete_cf(self.cf(WRITERS)?, path);
                }
            }
            batch.delete_cf(self.cf(THUNKS)?, thunk);
            self.write(batch, false)?;
            report.thunks += 1;
            report.traces += info.traces.len();
        }

        let files_cf = self.cf(FILES)?;
        let mut batch = WriteBatch::default();
        for item in self.db.iterator_cf(files_cf, IteratorMode::Start) {
            let (key, _) = item.map_err(|source| self.read_error(FILES, &[], source))?;
            let gone = std::fs::symlink_metadata(OsStr::from_bytes(&key)).is_err_and(|e| {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                )
            });
            if gone {
                batch.delete_cf(files_cf, &key);
                report.file_states += 1;
            }
        }
        self.write(batch, false)?;
        self.db.flush_wal(true).map_err(|source| Error::Write {
            path: self.path.clone(),
            source,
        })?;
        Ok(report)
    }

    /// Every content digest referenced by a kept trace (outputs, stdout, stderr), for the
    /// content store's garbage collection.
    pub fn referenced_digests(&self) -> Result<HashSet<Digest>, Error> {
        let mut digests = HashSet::new();
        for item in self.db.iterator_cf(self.cf(TRACES)?, IteratorMode::Start) {
            let (key, value) = item.map_err(|source| self.read_error(TRACES, &[], source))?;
            let trace: Trace = self.decode(TRACES, &key, &value)?;
            digests.insert(trace.stdout);
            digests.insert(trace.stderr);
            for output in &trace.outputs {
                if let OutputState::File { digest, .. } = &output.state {
                    digests.insert(*digest);
                }
            }
        }
        Ok(digests)
    }

    /// Finds a thunk by a hex prefix of its id (for `cot show ID`); ambiguous -> error listing.
    pub fn find_thunk(&self, hex_prefix: &str) -> Result<ThunkId, Error> {
        let prefix = hex_prefix.to_ascii_lowercase();
        let nibbles: Option<Vec<u8>> = prefix
            .chars()
            .map(|c| c.to_digit(16).and_then(|d| u8::try_from(d).ok()))
            .collect();
        let nibbles = match nibbles {
            Some(n) if !n.is_empty() && n.len() <= 64 => n,
            _ => {
                return Err(Error::BadPrefix {
                    prefix: hex_prefix.to_string(),
                })
            }
        };
        // Keys sort bytewise, hence in the order of their hex: the matches are contiguous,
        // starting at the prefix padded with zero bits.
        let start: Vec<u8> = nibbles
            .chunks(2)
            .map(|pair| (pair[0] << 4) | pair.get(1).copied().unwrap_or(0))
            .collect();
        let mut matches = Vec::new();
        let mut more = 0usize;
        let mode = IteratorMode::From(&start, Direction::Forward);
        for item in self.db.iterator_cf(self.cf(THUNKS)?, mode) {
            let (key, _) = item.map_err(|source| self.read_error(THUNKS, &start, source))?;
            let id = self.id_key(THUNKS, &key)?;
            if !hex(&id).starts_with(&prefix) {
                break;
            }
            if matches.len() < AMBIGUOUS_LISTED {
                matches.push(id);
            } else {
                more += 1;
            }
        }
        match matches.as_slice() {
            [] => Err(Error::NoSuchThunk {
                path: self.path.clone(),
                prefix,
            }),
            [id] => Ok(*id),
            _ => {
                let mut candidates: Vec<String> = matches.iter().map(|id| hex(id)).collect();
                if more > 0 {
                    candidates.push(format!("and {more} more"));
                }
                Err(Error::AmbiguousThunk { prefix, candidates })
            }
        }
    }

    fn check_writable(&self) -> Result<(), Error> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily, Error> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::MissingColumnFamily {
                path: self.path.clone(),
                cf: name,
            })
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), Error> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db
            .write_opt(batch, &opts)
            .map_err(|source| Error::Write {
                path: self.path.clone(),
                source,
            })
    }

    fn get_raw(
        &self,
        cf: &'static str,
        key: &[u8],
        opts: &ReadOptions,
    ) -> Result<Option<Vec<u8>>, Error> {
        let value = self
            .db
            .get_pinned_cf_opt(self.cf(cf)?, key, opts)
            .map_err(|source| self.read_error(cf, key, source))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn get_value<T: DeserializeOwned>(
        &self,
        cf: &'static str,
        key: &[u8],
        opts: &ReadOptions,
    ) -> Result<Option<T>, Error> {
        let value = self
            .db
            .get_pinned_cf_opt(self.cf(cf)?, key, opts)
            .map_err(|source| self.read_error(cf, key, source))?;
        value.map(|bytes| self.decode(cf, key, &bytes)).transpose()
    }

    /// Decodes a value, which must be exactly one postcard value of `T`.
    fn decode<T: DeserializeOwned>(
        &self,
        cf: &'static str,
        key: &[u8],
        bytes: &[u8],
    ) -> Result<T, Error> {
        let corrupt = |reason: String| Error::Corrupt {
            path: self.path.clone(),
            cf,
            key: hex(key),
            reason,
        };
        match postcard::take_from_bytes(bytes) {
            Ok((value, [])) => Ok(value),
            Ok((_, rest)) => Err(corrupt(format!("{} bytes after the value", rest.len()))),
            Err(e) => Err(corrupt(e.to_string())),
        }
    }

    /// A key (or key part) that must be a 32-byte id.
    fn id_key(&self, cf: &'static str, key: &[u8]) -> Result<[u8; 32], Error> {
        schema::id_from_bytes(key).ok_or_else(|| self.corrupt_key(cf, key))
    }

    fn corrupt_key(&self, cf: &'static str, key: &[u8]) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            cf,
            key: hex(key),
            reason: "malformed key".to_string(),
        }
    }

    /// A failed read of `key`, or of a scan from the start of `cf` if `key` is empty.
    fn read_error(&self, cf: &'static str, key: &[u8], source: rocksdb::Error) -> Error {
        Error::Read {
            path: self.path.clone(),
            cf,
            key: if key.is_empty() {
                "(first)".to_string()
            } else {
                hex(key)
            },
            source,
        }
    }
}

/// The path-keys of the inputs of `traces`.
fn input_keys<'a>(traces: impl Iterator<Item = &'a Trace>) -> BTreeSet<Vec<u8>> {
    traces
        .flat_map(|t| &t.inputs)
        .map(|i| schema::path_key(&i.path))
        .collect()
}

/// The path-keys of the outputs of `traces`.
fn output_keys<'a>(traces: impl Iterator<Item = &'a Trace>) -> BTreeSet<Vec<u8>> {
    traces
        .flat_map(|t| &t.outputs)
        .map(|o| schema::path_key(&o.path))
        .collect()
}
