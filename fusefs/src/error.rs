//! The crate's error type: every variant names the path or input that failed.

use std::io;
use std::path::PathBuf;

/// What went wrong while building or serving a [`crate::ProxyFs`], or committing, discarding or
/// recovering its layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `Options::binds` has no entry for the view root `/`.
    #[error("options: binds must map the view root `/` to a real directory")]
    NoRootBind,

    /// A view path in the options is relative.
    #[error("options: view path {path:?} is not absolute")]
    NotAbsolute {
        /// The offending view path.
        path: PathBuf,
    },

    /// The real directory of a bind cannot be opened.
    #[error("bind {view:?} -> {real:?}: cannot open the real directory: {source}")]
    Bind {
        /// The view side of the bind.
        view: PathBuf,
        /// The real directory.
        real: PathBuf,
        /// Why it failed.
        source: io::Error,
    },

    /// A `hide` pattern is not a valid glob.
    #[error("hide pattern {pattern:?} is invalid: {source}")]
    Glob {
        /// The pattern as given.
        pattern: String,
        /// Why globset refused it.
        source: globset::Error,
    },

    /// The layer directory cannot be used.
    #[error("layer directory {path:?}: {source}")]
    LayerDir {
        /// The layer directory.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },

    /// The layer directory is not empty.
    #[error("layer directory {path:?} is not empty")]
    LayerNotEmpty {
        /// The layer directory.
        path: PathBuf,
    },

    /// The FUSE INIT handshake on the given /dev/fuse descriptor failed.
    #[error("fuse session on the /dev/fuse descriptor: INIT handshake failed: {source}")]
    Handshake {
        /// Why it failed.
        source: io::Error,
    },

    /// The thread running the FUSE session cannot be started.
    #[error("fuse session: cannot start the session thread: {source}")]
    Spawn {
        /// Why it failed.
        source: io::Error,
    },

    /// The FUSE session ended with an error.
    #[error("fuse session: {source}")]
    Session {
        /// What the session loop reported.
        source: io::Error,
    },

    /// Applying the copy-on-write layer to the real filesystem failed at this real path.
    #[error("commit of {path:?}: {source}")]
    Commit {
        /// The real path being changed.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },

    /// The commit journal of a layer cannot be written, read or removed.
    #[error("commit journal {path:?}: {source}")]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },

    /// The commit journal of a layer has a format version this code cannot replay. It is left
    /// in place (with its layer) for a build that can.
    #[error("commit journal {path:?}: unsupported format version {version:?}")]
    JournalVersion {
        /// The journal file.
        path: PathBuf,
        /// The version its header names.
        version: String,
    },

    /// Removing the layer directory failed.
    #[error("removing layer directory {path:?}: {source}")]
    RemoveLayer {
        /// The layer directory.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },

    /// The kernel refused to drop what it cached for a view path ([`crate::Handle::invalidate`]).
    #[error("invalidating view path {path:?} in the kernel's cache: {source}")]
    Invalidate {
        /// The view path.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },

    /// `commit` or `discard` was already called for this layer.
    #[error("layer directory {path:?} was already committed or discarded")]
    Finished {
        /// The layer directory.
        path: PathBuf,
    },
}
