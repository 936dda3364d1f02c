//! What identifies a thunk ([`ThunkKey`]) and how paths are stored ([`StorePath`]).
//!
//! Paths under the project root are stored relative to it, so that a moved or second checkout
//! of the project reuses the traces of the first; other paths are stored as the thunk saw them.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::store::model::{StorePath, ThunkKey};

use super::Thunk;

/// Variables a build sets for its thunks (`COT_BUILD_JOBS`) that are not part of their keys:
/// changing `-j` must not make every thunk new.
pub const BUILD_ENV_PREFIX: &[u8] = b"COT_BUILD_";

/// Maps paths between what a thunk saw (view paths) and what the store keeps.
#[derive(Clone, Debug)]
pub struct Paths {
    project_root: PathBuf,
}

impl Paths {
    pub fn new(project_root: &Path) -> Paths {
        Paths {
            project_root: project_root.to_path_buf(),
        }
    }

    pub fn project_root(&self) -> &Path {
        &self.project_root
    }

    /// The stored form of an absolute view path.
    pub fn to_store(&self, path: &Path) -> StorePath {
        match path.strip_prefix(&self.project_root) {
            Ok(rel) => StorePath::Project(rel.as_os_str().as_bytes().to_vec()),
            Err(_) => StorePath::Absolute(path.as_os_str().as_bytes().to_vec()),
        }
    }

    /// The absolute view path of a stored path, in this checkout.
    pub fn to_view(&self, path: &StorePath) -> PathBuf {
        match path {
            StorePath::Project(rel) if rel.is_empty() => self.project_root.clone(),
            StorePath::Project(rel) => self.project_root.join(OsStr::from_bytes(rel)),
            StorePath::Absolute(abs) => PathBuf::from(OsStr::from_bytes(abs)),
        }
    }
}

/// How the view maps to real paths: the system root at `/`, and the project and writable
/// directories at their own paths when the system root is another tree (the same binds the
/// filesystem gets, see `engine::fs_options`).
#[derive(Clone, Debug)]
pub struct Binds {
    /// (view prefix, real prefix), longest view prefix first.
    binds: Vec<(PathBuf, PathBuf)>,
}

impl Binds {
    pub fn new(mut binds: Vec<(PathBuf, PathBuf)>) -> Binds {
        binds.sort_by_key(|(view, _)| std::cmp::Reverse(view.as_os_str().len()));
        Binds { binds }
    }

    /// The real path behind a view path.
    pub fn real(&self, view: &Path) -> PathBuf {
        for (prefix, real) in &self.binds {
            if let Ok(rest) = view.strip_prefix(prefix) {
                return if rest.as_os_str().is_empty() {
                    real.clone()
                } else {
                    real.join(rest)
                };
            }
        }
        view.to_path_buf()
    }

    pub fn pairs(&self) -> &[(PathBuf, PathBuf)] {
        &self.binds
    }
}

/// The options of a thunk that change what it can see or do, encoded for its key. Writable
/// directories under the project are relative, like every stored path.
fn options(thunk: &Thunk, paths: &Paths) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Options<'a> {
        writable: Vec<StorePath>,
        hide: &'a [String],
        rootless: bool,
    }
    let options = Options {
        writable: thunk.writable.iter().map(|w| paths.to_store(w)).collect(),
        hide: &thunk.hide,
        rootless: thunk.rootless,
    };
    // Encoding plain data into a Vec cannot fail.
    postcard::to_stdvec(&options).unwrap_or_default()
}

/// The key of a thunk in this project.
pub fn thunk_key(thunk: &Thunk, paths: &Paths) -> ThunkKey {
    ThunkKey {
        argv: thunk
            .argv
            .iter()
            .map(|arg| arg.as_bytes().to_vec())
            .collect(),
        cwd: paths.to_store(&thunk.cwd),
        env: thunk
            .env
            .iter()
            .filter(|(name, _)| !name.as_bytes().starts_with(BUILD_ENV_PREFIX))
            .map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec()))
            .collect(),
        system_root: thunk.system_root.as_os_str().as_bytes().to_vec(),
        options: options(thunk, paths),
        parent: None,
        target: thunk.target.as_ref().map(|t| t.as_bytes().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_paths_are_relative_and_round_trip() {
        let paths = Paths::new(Path::new("/home/u/proj"));
        let inside = Path::new("/home/u/proj/src/a.c");
        let stored = paths.to_store(inside);
        assert_eq!(stored, StorePath::Project(b"src/a.c".to_vec()));
        assert_eq!(paths.to_view(&stored), inside);
        assert_eq!(
            paths.to_store(Path::new("/home/u/proj")),
            StorePath::Project(Vec::new())
        );
        assert_eq!(
            paths.to_view(&StorePath::Project(Vec::new())),
            Path::new("/home/u/proj")
        );
        let outside = Path::new("/usr/include/stdio.h");
        assert_eq!(
            paths.to_store(outside),
            StorePath::Absolute(b"/usr/include/stdio.h".to_vec())
        );
        // "/home/u/project" is not under "/home/u/proj".
        assert!(matches!(
            paths.to_store(Path::new("/home/u/project/x")),
            StorePath::Absolute(_)
        ));
        // A second checkout maps the same stored path to its own root.
        let other = Paths::new(Path::new("/srv/ci/proj"));
        assert_eq!(other.to_view(&stored), Path::new("/srv/ci/proj/src/a.c"));
    }

    #[test]
    fn binds_use_the_longest_prefix() {
        let binds = Binds::new(vec![
            ("/".into(), "/srv/root".into()),
            ("/home/u/proj".into(), "/home/u/proj".into()),
        ]);
        assert_eq!(
            binds.real(Path::new("/usr/bin/cc")),
            Path::new("/srv/root/usr/bin/cc")
        );
        assert_eq!(binds.real(Path::new("/")), Path::new("/srv/root"));
        assert_eq!(
            binds.real(Path::new("/home/u/proj/a")),
            Path::new("/home/u/proj/a")
        );
    }
}
