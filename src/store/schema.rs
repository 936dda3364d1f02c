//! The trace store's on-disk format, version 4.
//!
//! The store is a RocksDB database, in the project's `.cot/` unless the engine is told otherwise.
//! Everything in it is described here; changing any of it needs a new [`SCHEMA_VERSION`].
//!
//! # Column families
//!
//! | CF        | key                                    | value                          |
//! |-----------|----------------------------------------|--------------------------------|
//! | `default` | unused (RocksDB requires it)           |                                |
//! | `meta`    | `b"schema_version"`                    | the version, u32 big-endian    |
//! | `thunks`  | ThunkId (32 bytes)                     | postcard([`ThunkInfo`])        |
//! | `traces`  | ThunkId (32 bytes) ++ TraceId (32)     | postcard([`Trace`])            |
//! | `readers` | path-key ++ `0x00` ++ ThunkId (32)     | empty                          |
//! | `writers` | path-key                               | ThunkId (32 raw bytes)         |
//! | `files`   | real absolute path bytes, as is        | postcard([`FileState`])        |
//! | `builds`  | ThunkId of a build's root (32 bytes)   | postcard([`BuildRecord`])      |
//!
//! - A ThunkId is the blake3 digest of postcard([`ThunkKey`]); a TraceId the blake3 digest of
//!   postcard([`Trace`]) (see [`super::thunk_id`], [`super::trace_id`]). Both are raw bytes in
//!   keys, so all traces of a thunk are one contiguous key range of `traces`.
//! - A path-key encodes a [`StorePath`] (in `readers`, `writers`): byte 0 is `b'P'` for
//!   `StorePath::Project` or `b'A'` for `StorePath::Absolute`, followed by the path's bytes
//!   (relative to the project root, resp. absolute), without terminator. Linux paths never
//!   contain NUL, so in `readers` the `0x00` separator ends the path unambiguously and all
//!   readers of one path are the key range starting with path-key ++ `0x00`; the store refuses
//!   to record a path that contains NUL.
//! - postcard is the `postcard` crate's format 1 (varint integers, length-prefixed sequences,
//!   enum variants by index), applied to the types of [`super::model`] in their declared field
//!   and variant order.
//!
//! # Invariants
//!
//! After every completed write:
//! - `thunks[T].traces` lists at most [`MAX_TRACES_PER_THUNK`] distinct TraceIds, most recently
//!   used first (the LRU bound: recording a ninth trace drops the least recently used one, and
//!   its `traces` row, in the same write). `traces` holds a row `T ++ R` exactly when `R` is in
//!   `thunks[T].traces`: the "kept" traces.
//! - `readers` holds `P ++ 0x00 ++ T` exactly when some kept trace of `T` has an input at `P`.
//! - `writers[P] = T` only when some kept trace of `T` has an output at `P`. It names the thunk
//!   whose most recent record or reuse (`touch`) had an output at `P`; when that thunk keeps
//!   no trace with an
//!   output at `P` any more (dropped by the LRU bound or by garbage collection), the row is
//!   removed rather than falling back to an older writer.
//! - `files` is a cache of digests of real files, valid while their stat tuple matches; a row
//!   may be stale or missing at any time without harm.
//!
//! # Writes and crashes
//!
//! Each record of a trace is ONE RocksDB `WriteBatch` (trace row, thunk row, dropped trace rows,
//! index rows, file states) written with the write-ahead log and `sync`: after a crash or power
//! loss at any instant, recovery replays whole batches only, so the database holds the state
//! before or after the record, never a part of it. Marking a trace as used (`touch`), storing
//! file states, and garbage collection write batches without `sync`: they are still atomic
//! (one batch each, garbage collection one per dropped thunk), but the most recent of them may
//! be lost on power loss, which costs at most an LRU reordering, a re-hash or a later re-drop.
//!
//! # Schema version
//!
//! `meta[b"schema_version"]` is written (synced) when the database is created. On open:
//! - equal to [`SCHEMA_VERSION`]: used;
//! - higher: refused: "trace store DIR has schema version 7, this cot understands 1: upgrade
//!   cot, or remove DIR to start afresh". The database is opened with exactly the column
//!   families it has (RocksDB refuses to open without all of them), and the version is read
//!   before anything else is read, written or created; RocksDB's own bookkeeping (a new
//!   MANIFEST, OPTIONS file and empty log) is all that changes. Every later version must
//!   therefore keep the `meta` column family, with RocksDB's default comparator and this key;
//! - lower: migrated in one synced batch that also writes the new version. From 1 (before
//!   nested thunks), 2 (nested thunks, before make targets in keys and the skip-if-new mark
//!   of child requests) and 3 (before the declared prerequisites of child requests): the rows of `thunks`, `traces`, `readers`,
//!   `writers` and `builds` are deleted (the trace store is a cache: the thunks run again),
//!   `files` is kept, `builds` is created if missing.
//! - missing: a database with no data at all (created, then interrupted before the version was
//!   written) is initialised; a database with data but no version is refused.
//!
//! One process at a time may open the database for writing (RocksDB's `LOCK` file); others can
//! open it read-only for inspection, seeing what was written up to the moment they opened it.
//!
//! # Tuning
//!
//! All reads on the path that decides a cache hit are point lookups (`thunks`, then the at most
//! [`MAX_TRACES_PER_THUNK`] rows of `traces` of one thunk, then `files` rows), served through a
//! shared LRU block cache of [`BLOCK_CACHE_BYTES`] and bloom filters on every column family.
//! Two defaults are changed because they slowed down opening and closing, which every `cot`
//! command does: memtables are [`WRITE_BUFFER_BYTES`] instead of 64 MiB (RocksDB preallocates
//! each write-ahead log to 1.1 times the largest memtable), and table files are opened by one
//! thread instead of up to 16 per column family.

use rocksdb::{BlockBasedOptions, Cache, Options};

#[cfg(doc)]
use super::model::{BuildRecord, FileState, ThunkInfo, ThunkKey, Trace};
use super::model::{StorePath, ThunkId, TraceId};
#[cfg(doc)]
use super::MAX_TRACES_PER_THUNK;

/// The format version this code reads and writes.
pub const SCHEMA_VERSION: u32 = 4;

/// Key of the schema version in [`META`].
pub const VERSION_KEY: &[u8] = b"schema_version";

/// The names of the column families (see the module documentation).
pub const META: &str = "meta";
pub const THUNKS: &str = "thunks";
pub const TRACES: &str = "traces";
pub const READERS: &str = "readers";
pub const WRITERS: &str = "writers";
pub const FILES: &str = "files";
pub const BUILDS: &str = "builds";

/// The column families of this version, besides RocksDB's `default`.
pub const COLUMN_FAMILIES: [&str; 7] = [META, THUNKS, TRACES, READERS, WRITERS, FILES, BUILDS];

/// Size of the block cache shared by all column families.
pub const BLOCK_CACHE_BYTES: usize = 32 << 20;

/// Size of a column family's memtable. RocksDB preallocates each write-ahead log to 1.1 times
/// the largest memtable; with the default 64 MiB, allocating and releasing that made creating
/// a store in tmpfs take 50 to 100 ms instead of 20 to 30, and closing it 15 to 20 ms instead
/// of 2.
pub const WRITE_BUFFER_BYTES: usize = 4 << 20;

/// Separates the path-key from the ThunkId in a `readers` key.
const READER_SEPARATOR: u8 = 0x00;

/// The database-wide options.
pub(crate) fn db_options() -> Options {
    let mut opts = Options::default();
    // RocksDB's info log: keep it from growing without bound in a long-lived `.cot/`.
    opts.set_keep_log_file_num(2);
    opts.set_max_log_file_size(1 << 20);
    // Opening is on the path of every `cot` command: RocksDB would otherwise start up to 16
    // threads per column family to open table files in parallel, for a few small files.
    opts.set_max_file_opening_threads(1);
    opts.set_write_buffer_size(WRITE_BUFFER_BYTES);
    opts
}

/// The options of every column family: a shared LRU block cache and bloom filters, since every
/// hot read is a point lookup.
pub(crate) fn cf_options(cache: &Cache) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    let mut opts = Options::default();
    opts.set_block_based_table_factory(&table);
    opts.set_write_buffer_size(WRITE_BUFFER_BYTES);
    opts
}

/// The path-key of `path` (see the module documentation).
pub(crate) fn path_key(path: &StorePath) -> Vec<u8> {
    let (tag, bytes) = match path {
        StorePath::Project(bytes) => (b'P', bytes),
        StorePath::Absolute(bytes) => (b'A', bytes),
    };
    let mut key = Vec::with_capacity(1 + bytes.len());
    key.push(tag);
    key.extend_from_slice(bytes);
    key
}

/// The `readers` key range of one path: every key that starts with this.
pub(crate) fn readers_prefix(path_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(path_key.len() + 1);
    key.extend_from_slice(path_key);
    key.push(READER_SEPARATOR);
    key
}

/// The `readers` key saying that `thunk` reads the path of `path_key`.
pub(crate) fn reader_key(path_key: &[u8], thunk: &ThunkId) -> Vec<u8> {
    let mut key = readers_prefix(path_key);
    key.extend_from_slice(thunk);
    key
}

/// The `traces` key of one trace.
pub(crate) fn trace_key(thunk: &ThunkId, trace: &TraceId) -> [u8; 64] {
    let mut key = [0; 64];
    key[..32].copy_from_slice(thunk);
    key[32..].copy_from_slice(trace);
    key
}

/// Reads a 32-byte id, or `None` if `bytes` has another length.
pub(crate) fn id_from_bytes(bytes: &[u8]) -> Option<[u8; 32]> {
    bytes.try_into().ok()
}

/// Decodes the schema version value.
pub(crate) fn decode_version(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_keys_are_tagged_and_readers_keys_separated() {
        assert_eq!(
            path_key(&StorePath::Project(b"src/a.c".to_vec())),
            b"Psrc/a.c"
        );
        assert_eq!(path_key(&StorePath::Absolute(b"/usr".to_vec())), b"A/usr");
        assert_eq!(path_key(&StorePath::Project(Vec::new())), b"P");
        let key = reader_key(b"Pa", &[7; 32]);
        assert_eq!(&key[..3], b"Pa\0");
        assert_eq!(&key[3..], &[7; 32]);
        // The reader rows of "a" are not a prefix of those of "a/b" or "ab".
        assert!(!reader_key(b"Pa/b", &[0; 32]).starts_with(&readers_prefix(b"Pa")));
        assert!(!reader_key(b"Pab", &[0; 32]).starts_with(&readers_prefix(b"Pa")));
    }
}
