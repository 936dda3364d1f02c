//! The messages of a build: between cot's coordinator (`cot build`, `cot make`) and the
//! worker process that runs one thunk (`cot __thunk`, over its stdin, a socket), and between
//! that worker and the `cot run` / `cot wait` clients inside the thunk (over `/dev/cot`).
//!
//! Framing and encoding are the store server's (a little-endian u32 length, then postcard).

use std::ffi::OsString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::engine::observe::CheckMode;
use crate::store::model::{Declared, Digest, ThunkKey, Trace, TraceId};

pub(crate) use crate::server::{read_message, write_message};

/// The coordinator's first message to a worker: what to run and how.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    pub argv: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    pub system_root: PathBuf,
    pub writable: Vec<PathBuf>,
    pub hide: Vec<String>,
    pub rootless: bool,
    pub target: Option<String>,
    pub net: bool,
    pub hermetic: Option<crate::engine::hermetic::ProjectView>,
    /// The key the trace is recorded under (with its parent).
    pub key: ThunkKey,
    pub store: PathBuf,
    pub cas: PathBuf,
    pub check: CheckMode,
    pub no_passthrough: bool,
    /// Copy the command's output to the worker's stdout and stderr as it comes (the root);
    /// else it is only kept, and the coordinator delivers it.
    pub show_output: bool,
    /// The paths (as the thunk sees them, by [`path_hash`]) that other thunks of the build
    /// produce: the first lookup of one waits for its producer ([`FromWorker::Want`]).
    pub wanted: Vec<u64>,
}

/// How a [`Job`] names a wanted path: a hash of the view path, so that the list stays small;
/// a collision only asks the coordinator about a path nobody produces.
pub fn path_hash(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let hash = blake3::hash(path.as_os_str().as_bytes());
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(bytes)
}

/// From a worker to the coordinator.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromWorker {
    /// The thunk requests a child (a `cot run` inside it); `request` numbers it in this worker.
    Child {
        request: u64,
        argv: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: PathBuf,
        target: Option<String>,
        /// The rule's declarations, for a recipe line under `cot make`.
        declared: Option<Declared>,
        /// A recipe that plain make would not run: if it never ran under cot, it is not run
        /// now either (see `Requests::request`).
        skip_if_new: bool,
    },
    /// The thunk looks up a path another thunk of the build produces: answered with
    /// [`ToWorker::Wanted`] once that thunk is done in this build.
    Want { request: u64, path: PathBuf },
    /// `cot make`: make's rules, listed after its makefiles are up to date; each target can
    /// be made on demand by make itself (`argv` with the target added, in `cwd`).
    Rules {
        argv: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: PathBuf,
        /// The target names as make knows them, and their absolute paths.
        targets: Vec<(OsString, PathBuf)>,
    },
    /// The thunk ended and its trace is recorded (`None`: interrupted, nothing recorded).
    Finished {
        recorded: Option<(TraceId, Box<Trace>)>,
        exit_code: i32,
        message: Option<String>,
        interrupted: bool,
    },
    /// cot itself failed running the thunk.
    Failed { message: String },
}

/// From the coordinator to a worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    Child(ChildDone),
    /// The producer of a wanted path is done; `error`: the lookup fails (a cycle, named).
    Wanted {
        request: u64,
        error: Option<String>,
    },
}

/// A child's result.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildDone {
    pub request: u64,
    pub id: Digest,
    pub exit_code: i32,
    pub stdout_digest: Digest,
    pub stderr_digest: Digest,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Paths the child (and its descendants) wrote, as the thunk sees them, so that its view
    /// shows them now.
    pub written: Vec<PathBuf>,
    pub writes: Vec<(
        crate::store::model::StorePath,
        crate::store::model::OutputState,
    )>,
    pub message: Option<String>,
}

/// From a client inside the thunk to its worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromClient {
    /// `cot run [--bg] -- CMD` (or a recipe line through `cot __sh`).
    Run {
        argv: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: PathBuf,
        target: Option<String>,
        /// The rule's prerequisites, for a recipe line under `cot make`.
        declared: Option<Declared>,
        background: bool,
        /// Plain make would not run this recipe: its target is newer than its prerequisites.
        up_to_date: bool,
    },
    /// `cot wait`: every background child started so far.
    Wait,
    /// `cot make`: make's rules (see [`FromWorker::Rules`]); answered with `Started`.
    Rules {
        argv: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        cwd: PathBuf,
        targets: Vec<(OsString, PathBuf)>,
    },
}

/// From a worker to a client.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToClient {
    /// The child's (or, for `Wait`, the background children's) result.
    Done {
        exit_code: i32,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        message: Option<String>,
    },
    /// A background child was requested.
    Started,
    /// The request cannot be served.
    Refused { message: String },
}
