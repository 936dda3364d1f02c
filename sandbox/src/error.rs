//! The one error type of the crate.

use std::io;
use std::path::{Path, PathBuf};

/// Why a sandbox could not be built or watched. `Display` is one line naming what failed and,
/// for [`Error::Prerequisite`], what to do; it already includes the underlying OS error, so
/// print it with `{}` rather than walking `source()` as well.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The machine lacks something the sandbox needs (a device, a permission, a kernel feature).
    #[error("{what}; {fix}")]
    Prerequisite {
        /// What is missing, e.g. `/dev/fuse is missing`.
        what: String,
        /// What to do about it, e.g. `load the fuse module (modprobe fuse)`.
        fix: String,
    },
    /// A step of building the sandbox failed.
    #[error("sandbox setup failed: {stage}{}: {source}", on_path(path.as_deref()))]
    Setup {
        /// The step, e.g. `mount proc`.
        stage: String,
        /// The path the step worked on, as seen inside the sandbox when it is inside.
        path: Option<PathBuf>,
        /// The OS error.
        source: io::Error,
    },
    /// The caller's `serve` callback failed.
    #[error("serving the sandbox's root filesystem failed: {0}")]
    Serve(String),
    /// The [`crate::Spec`] cannot be run as given.
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    /// `launch` was called while other threads run; cloning then could copy a lock held by one
    /// of them into the sandbox's init.
    #[error("launching a sandbox needs a single-threaded process, but {threads} threads are running; launch before starting any thread")]
    Threaded {
        /// How many threads `/proc/self/status` counted.
        threads: usize,
    },
    /// The sandbox's init died without saying how the command ended (e.g. killed from outside).
    #[error(
        "the sandbox's init (pid {pid}) ended without reporting the command's outcome: {status}"
    )]
    InitLost {
        /// The init's pid, in the caller's pid namespace.
        pid: i32,
        /// How it ended, e.g. `killed by signal 9`.
        status: String,
    },
}

fn on_path(path: Option<&Path>) -> String {
    match path {
        Some(path) => format!(" on {}", path.display()),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn setup(stage: impl Into<String>, path: Option<&Path>, source: io::Error) -> Self {
        Error::Setup {
            stage: stage.into(),
            path: path.map(Path::to_path_buf),
            source,
        }
    }
}
