//! The access log: what the thunk did to which view path, each `(kind, path, to)` once, in
//! first-seen order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

/// The kind of one recorded access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccessKind {
    /// The path was looked up and found.
    Stat,
    /// A file was opened for reading.
    Read,
    /// A directory was listed.
    Readdir,
    /// A symlink was read.
    Readlink,
    /// The path was looked up and not found: the absence is a dependency too.
    Absent,
    /// The path matched a `hide` pattern and was made to look absent.
    Hidden,
    /// A file was created, opened for writing or truncated.
    Write,
    /// A non-directory was unlinked.
    Delete,
    /// The path was renamed to `to`.
    Rename,
    /// A directory was created.
    Mkdir,
    /// A directory was removed.
    Rmdir,
    /// A symlink was created at the path; `to` is its target text.
    Symlink,
    /// The existing file at the path got a new name `to`.
    Link,
    /// Mode, owner, size or times were changed.
    Setattr,
}

impl AccessKind {
    /// Every kind, in declaration order.
    pub const ALL: [AccessKind; 14] = [
        AccessKind::Stat,
        AccessKind::Read,
        AccessKind::Readdir,
        AccessKind::Readlink,
        AccessKind::Absent,
        AccessKind::Hidden,
        AccessKind::Write,
        AccessKind::Delete,
        AccessKind::Rename,
        AccessKind::Mkdir,
        AccessKind::Rmdir,
        AccessKind::Symlink,
        AccessKind::Link,
        AccessKind::Setattr,
    ];

    /// The lowercase name used in trace files, e.g. `"readdir"`.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessKind::Stat => "stat",
            AccessKind::Read => "read",
            AccessKind::Readdir => "readdir",
            AccessKind::Readlink => "readlink",
            AccessKind::Absent => "absent",
            AccessKind::Hidden => "hidden",
            AccessKind::Write => "write",
            AccessKind::Delete => "delete",
            AccessKind::Rename => "rename",
            AccessKind::Mkdir => "mkdir",
            AccessKind::Rmdir => "rmdir",
            AccessKind::Symlink => "symlink",
            AccessKind::Link => "link",
            AccessKind::Setattr => "setattr",
        }
    }

    /// The kind named `name` (the inverse of [`AccessKind::as_str`]).
    pub fn from_name(name: &str) -> Option<AccessKind> {
        AccessKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// A bit per kind, for the per-node "already recorded" masks.
    pub(crate) fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl std::fmt::Display for AccessKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One recorded access. Paths are absolute view paths (as the thunk saw them) and may hold any
/// bytes but NUL.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// What happened.
    pub kind: AccessKind,
    /// The view path it happened to.
    pub path: PathBuf,
    /// The second path of `Rename` and `Link`, the target text of `Symlink`; `None` otherwise.
    pub to: Option<PathBuf>,
}

/// The deduplicating log shared by the filesystem and its [`crate::Handle`].
#[derive(Default)]
pub(crate) struct AccessLog {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    seen: HashSet<Access>,
    order: Vec<Access>,
}

impl AccessLog {
    /// Appends the access unless the same `(kind, path, to)` was recorded before.
    pub(crate) fn record(&self, kind: AccessKind, path: &Path, to: Option<&Path>) {
        let access = Access {
            kind,
            path: path.to_path_buf(),
            to: to.map(Path::to_path_buf),
        };
        let mut inner = self.inner.lock();
        if !inner.seen.contains(&access) {
            inner.seen.insert(access.clone());
            inner.order.push(access);
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<Access> {
        self.inner.lock().order.clone()
    }
}
