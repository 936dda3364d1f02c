//! What the trace store holds: thunk keys, traces and file states, as plain serde types.
//!
//! These types are the store's value encoding (postcard, see `schema.rs`): changing a field's
//! type or order changes the on-disk format and needs a new schema version.

use serde::{Deserialize, Serialize};

/// A blake3 digest.
pub type Digest = [u8; 32];

/// Identifies a thunk: the blake3 digest of its [`ThunkKey`]'s encoding.
pub type ThunkId = Digest;

/// Identifies one trace of a thunk: the blake3 digest of the trace's encoding.
pub type TraceId = Digest;

/// A path as stored: relative to the project root when it lies under it, so that a moved or
/// second checkout reuses traces; absolute (as the thunk saw it) otherwise. Bytes, not strings:
/// Linux paths need not be UTF-8.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StorePath {
    /// Relative to the project root; empty for the root itself. Never starts with `/`.
    Project(Vec<u8>),
    /// Absolute, outside the project.
    Absolute(Vec<u8>),
}

/// The type of a file system object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// Fifo, socket, device.
    Other,
}

/// What `stat` says of a file, for quick change checks: a file whose tuple is unchanged is not
/// hashed again (the seed's "modtime/device/inode" proxy, plus size and ctime).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StatTuple {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub mode: u32,
}

/// What the thunk observed of one input, recorded so that the trace is valid exactly while the
/// same observation would be made again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Observed {
    /// Looked up and not found (`absent`), or hidden (`hidden`): valid while it does not exist.
    Absent,
    /// Opened for reading (`read`): the content digest, plus the stat tuple that lets a check
    /// skip hashing when nothing changed.
    Content { digest: Digest, stat: StatTuple },
    /// Looked up (`stat`): the metadata a program could observe. For directories only the type
    /// and mode count (a directory's size and mtime change with every entry added below it;
    /// its entries are covered by `Listing`).
    Meta {
        kind: FileKind,
        mode: u32,
        size: u64,
        mtime_ns: i64,
        /// The link target, for symlinks.
        link: Option<Vec<u8>>,
    },
    /// Listed (`readdir`): the digest of the sorted entry names with their types.
    Listing { digest: Digest },
    /// Read as a link (`readlink`): the target.
    Link { target: Vec<u8> },
}

/// The kind of access an input was recorded for (the trace's `kind`), kept for `--explain`
/// and `cot show`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InputKind {
    Stat,
    Read,
    Readdir,
    Readlink,
    Absent,
    Hidden,
}

/// One input of a trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    pub path: StorePath,
    pub kind: InputKind,
    pub observed: Observed,
}

/// The final state of one path the thunk changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputState {
    /// A regular file, its content in the content store under `digest`.
    File {
        digest: Digest,
        mode: u32,
        size: u64,
    },
    Symlink {
        target: Vec<u8>,
    },
    Dir {
        mode: u32,
    },
    /// Deleted (or renamed away) by the thunk.
    Deleted,
}

/// One output of a trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub path: StorePath,
    pub state: OutputState,
}

/// One recorded run of a thunk: what it read, what it left, and what it said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// In the order the thunk first made them.
    pub inputs: Vec<Input>,
    /// Sorted by path; parents before children.
    pub outputs: Vec<Output>,
    /// Digests of the captured stdout and stderr in the content store.
    pub stdout: Digest,
    pub stderr: Digest,
    /// The command's exit status as cot reports it (0-255).
    pub exit_code: i32,
    pub duration_ns: u64,
    /// When it ran, nanoseconds since the Unix epoch.
    pub ran_at_ns: i64,
    /// The child thunks it requested (`cot run` inside it, in a build), in request order.
    pub children: Vec<ChildCall>,
    /// Its synchronization operations in the order they happened: when each child was
    /// requested and when its result reached the thunk. A child requested after another's
    /// result arrived depends on it; children whose requests overlapped may run in parallel
    /// (the design notes' `Sequence [[a, b], [c]]`).
    pub events: Vec<SyncEvent>,
    /// Reads of paths that its children (or their descendants) wrote in the same run: not
    /// inputs of the build, but if a child now leaves something else there, the thunk may
    /// behave differently, so it runs again.
    pub internal: Vec<Input>,
}

/// One child thunk requested by a thunk, and what the thunk got back from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildCall {
    pub id: ThunkId,
    pub exit_code: i32,
    /// Digests of what the child said (the requester may have read it, e.g. `$(cot run ...)`).
    pub stdout: Digest,
    pub stderr: Digest,
    /// The requester would not have run it by its own rules (see
    /// `build::engine::Requests::request`): replayed, it is decided the same way.
    pub skip_if_new: bool,
    /// What make declared of the recipe this child is a line of (under `cot make`).
    pub declared: Option<Declared>,
}

/// A make rule's declarations, as make passed them to a recipe line (`$^` and `$|`): paths as
/// make wrote them, relative to the child's working directory. The lint's notion of "ordered"
/// and "declared" under make, and a hermetic recipe's visible inputs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declared {
    /// The normal prerequisites (`$^`): the target depends on them.
    pub prereqs: Vec<Vec<u8>>,
    /// The order-only prerequisites (`$|`): made first, but not dependencies.
    pub order_only: Vec<Vec<u8>>,
}

/// A synchronization operation of a thunk, by index into [`Trace::children`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncEvent {
    /// The child was requested.
    Start(u32),
    /// The child's result was delivered to the thunk.
    End(u32),
}

/// Everything that makes two `cot run`s the same thunk.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ThunkKey {
    pub argv: Vec<Vec<u8>>,
    /// The working directory.
    pub cwd: StorePath,
    /// The environment as passed to the command, sorted by name.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// The system root the view proxies (absolute).
    pub system_root: Vec<u8>,
    /// Sandbox options that change what the thunk can see or do: writable dirs, hidden globs,
    /// rootless mode. Encoded by the engine; compared as bytes.
    pub options: Vec<u8>,
    /// The thunk that requested it in a build (`None` for `cot run` and for a build's root),
    /// and how many requests with the same key that parent made before it: children are
    /// named structurally, so inserting a step does not rename the steps after it.
    pub parent: Option<(ThunkId, u32)>,
    /// The make target whose recipe line this is, under `cot make` (for messages and
    /// `--rebuild`/`--skip` patterns; two targets with the same line are two thunks).
    pub target: Option<Vec<u8>>,
}

#[cfg(test)]
impl ThunkKey {
    /// The key of `argv` run at the project root, with no environment, as tests want it.
    pub fn of_command(argv: &[&str]) -> ThunkKey {
        ThunkKey {
            argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            cwd: StorePath::Project(Vec::new()),
            env: Vec::new(),
            system_root: b"/".to_vec(),
            options: Vec::new(),
            parent: None,
            target: None,
        }
    }
}

/// What the store keeps of the last build of a root thunk: which thunks it used, and a
/// snapshot of every path it read or wrote as the build left them, so that a build in which
/// no path changed is decided without loading any trace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Every thunk of the build, in request order (parents before children), with the trace
    /// it ended with and its parent.
    pub thunks: Vec<BuildThunk>,
    /// Every path the build's thunks read (outside what they wrote) or wrote, with its
    /// `lstat` at the end of the build (`None`: absent).
    pub snapshot: Vec<(StorePath, Option<StatTuple>)>,
    /// Outputs that were damaged (not as their thunk left them) and left alone at the end.
    pub damaged: Vec<StorePath>,
    /// The build's exit status.
    pub exit_code: i32,
    /// When it ended, nanoseconds since the epoch.
    pub ended_ns: i64,
}

/// One thunk of a [`BuildRecord`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildThunk {
    pub id: ThunkId,
    pub trace: TraceId,
    pub parent: Option<ThunkId>,
}

/// What the store keeps about a thunk besides its traces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThunkInfo {
    pub key: ThunkKey,
    /// Trace ids, most recently used first; at most the store's bound.
    pub traces: Vec<TraceId>,
    /// When a trace of this thunk was last recorded or reused (ns since the epoch).
    pub last_used_ns: i64,
}

/// A cached digest of a real file, valid while its stat tuple is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    pub stat: StatTuple,
    pub digest: Digest,
}
