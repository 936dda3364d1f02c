//! Installed packages: `cot install`, `cot uninstall` and `cot pkg`.
//!
//! An installer (`make install`, `./configure --prefix=... && make && make install`, `pip
//! install --prefix ...`) runs as a memoized thunk ([`install`]) whose writes under its prefix
//! are captured from its layer instead of being committed (`RunOptions::capture`): they become
//! the package's manifest, a list of [`Entry`] (every file, directory and symlink with digest,
//! mode and size), their contents in the package database's content store. A [`Package`]
//! records the manifest, its name and version ([`guess`]), where it was put, and the thunk and
//! trace that produced it ([`Origin`]).
//!
//! The package database ([`Db`], `db.rs`) is per machine, not per project: installs go to
//! system prefixes. Putting a package's files in place, replacing an older version, and
//! removing one are journaled ([`apply`]): conflicts are found before anything is written, and
//! an interrupted change is finished or rolled back by the next `cot` command, so a package
//! is installed whole or not at all. [`archive`] moves a package to another machine.
//!
//! [`Error`] is the module's one error type; every variant names the package or path.

pub mod apply;
pub mod archive;
pub mod db;
pub mod guess;
pub mod install;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::model::{OutputState, ThunkKey, Trace, TraceId};

pub use db::Db;

/// An error of the package database or of putting packages in place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Path { path: PathBuf, message: String },
    #[error("package {name}: {message}")]
    Package { name: String, message: String },
    #[error("no package {name} is installed (see `cot pkg list`)")]
    NotInstalled { name: String },
    #[error(
        "{name:?} is not a package name: use letters, digits and . _ + - (not first: . or -), \
         at most 128"
    )]
    BadName { name: String },
    #[error("package database {}: {message}", path.display())]
    Db { path: PathBuf, message: String },
    #[error("{} is not a cot package archive: {message}", path.display())]
    Archive { path: PathBuf, message: String },
    #[error(transparent)]
    Cas(#[from] crate::cas::Error),
    #[error(transparent)]
    Engine(#[from] crate::engine::Error),
    #[error(transparent)]
    Store(#[from] crate::server::Error),
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file, directory or symlink of a package: its absolute path as the installer wrote it
/// (under the prefix), and what it is (never [`OutputState::Deleted`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: Vec<u8>,
    pub state: OutputState,
}

impl Entry {
    pub fn path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.path))
    }
}

/// A real path taken over with `--force` from another package, or from no package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakenOver {
    pub path: Vec<u8>,
    /// The package that owned it, `None` when it belonged to none.
    pub from: Option<String>,
}

/// Where a package came from: the installer's thunk and the trace of its run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The installer's command line.
    pub command: Vec<Vec<u8>>,
    /// Its working directory, absolute.
    pub cwd: Vec<u8>,
    /// The thunk's key and the trace that produced the manifest (in the database's trace
    /// store, where a later install of the same thing finds it).
    pub key: ThunkKey,
    pub trace_id: TraceId,
    pub trace: Trace,
}

/// One installed package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: Option<String>,
    /// How the version was found ("--version", "PACKAGE_VERSION in config.log", ...), or why
    /// there is none.
    pub version_from: String,
    /// The installer's prefix, absolute, as it saw it.
    pub prefix: Vec<u8>,
    /// Where the files were put: each entry's own path (`None`), or that path under this
    /// directory (`--dest`, like `DESTDIR`).
    pub dest: Option<Vec<u8>>,
    /// Every entry under the prefix, the prefix included, sorted by path (parents first).
    pub manifest: Vec<Entry>,
    /// Real directories the install made, parents first; uninstall removes those left empty.
    pub created_dirs: Vec<Vec<u8>>,
    /// Real paths it took over (`--force`).
    pub taken_over: Vec<TakenOver>,
    pub origin: Origin,
    /// When it was installed, nanoseconds since the Unix epoch.
    pub installed_ns: i64,
}

impl Package {
    /// The real path of one of its entries.
    pub fn real(&self, entry: &Entry) -> PathBuf {
        real_path(self.dest.as_deref(), &entry.path)
    }

    /// `name version`, or `name (version unknown)`.
    pub fn title(&self) -> String {
        match &self.version {
            Some(version) => format!("{} {version}", self.name),
            None => format!("{} (version unknown)", self.name),
        }
    }

    /// The files and symlinks (what a package owns; directories are shared).
    pub fn files(&self) -> impl Iterator<Item = &Entry> {
        self.manifest
            .iter()
            .filter(|e| !matches!(e.state, OutputState::Dir { .. }))
    }
}

/// Where the entry at the absolute `path` goes: the path itself, or the path under `dest`.
pub fn real_path(dest: Option<&[u8]>, path: &[u8]) -> PathBuf {
    let path = Path::new(OsStr::from_bytes(path));
    match dest {
        None => path.to_path_buf(),
        Some(dest) => {
            let rel = path.strip_prefix("/").unwrap_or(path);
            let dest = Path::new(OsStr::from_bytes(dest));
            if rel.as_os_str().is_empty() {
                dest.to_path_buf()
            } else {
                dest.join(rel)
            }
        }
    }
}

/// Checks a package name: it names a file in the database and appears in messages.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName {
            name: name.to_string(),
        })
    }
}

/// How a path on disk compares with an entry of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// As installed.
    Intact,
    Missing,
    /// Another type of file (a directory where a file was, ...).
    Replaced,
    /// Its content (or symlink target) differs.
    Modified,
    /// Same content, another mode.
    Mode {
        now: u32,
    },
}

impl Status {
    pub fn describe(&self, entry: &Entry) -> String {
        match self {
            Status::Intact => "intact".into(),
            Status::Missing => "missing".into(),
            Status::Replaced => "replaced by another type of file".into(),
            Status::Modified => match entry.state {
                OutputState::Symlink { .. } => "points elsewhere".into(),
                _ => "content changed".into(),
            },
            Status::Mode { now } => match entry.state {
                OutputState::File { mode, .. } | OutputState::Dir { mode } => {
                    format!("mode changed from {mode:o} to {now:o}")
                }
                _ => format!("mode changed to {now:o}"),
            },
        }
    }
}

/// How the real path `real` compares with `state` (a file's content is hashed).
pub fn status(real: &Path, state: &OutputState) -> Result<Status, Error> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::symlink_metadata(real) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Status::Missing),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(Status::Missing),
        Err(e) => return Err(io_error(real)(e)),
    };
    let mode = meta.permissions().mode() & 0o7777;
    Ok(match state {
        OutputState::Dir { .. } if !meta.is_dir() => Status::Replaced,
        OutputState::Dir { .. } => Status::Intact,
        OutputState::Symlink { target } => {
            if !meta.file_type().is_symlink() {
                Status::Replaced
            } else if std::fs::read_link(real)
                .map_err(io_error(real))?
                .as_os_str()
                .as_bytes()
                != target.as_slice()
            {
                Status::Modified
            } else {
                Status::Intact
            }
        }
        OutputState::File {
            digest,
            mode: want,
            size,
        } => {
            if !meta.is_file() {
                Status::Replaced
            } else if meta.len() != *size || crate::cas::hash_file(real)?.0 != *digest {
                Status::Modified
            } else if mode != *want {
                Status::Mode { now: mode }
            } else {
                Status::Intact
            }
        }
        OutputState::Deleted => Status::Replaced,
    })
}

/// A path for messages.
pub fn show(path: &[u8]) -> String {
    Path::new(OsStr::from_bytes(path)).display().to_string()
}

#[cfg(test)]
mod tests;
