//! What identifies a thunk ([`ThunkKey`]) and how paths are stored ([`StorePath`]).
//!
//! Paths under the project root are stored relative to it, so that a moved or second checkout
//! of the project reuses the traces of the first; other paths are stored as the thunk saw them.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::store::model::{StorePath, ThunkKey};

use super::hermetic::ProjectView;
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

/// The options of a thunk that change what it can see or do, as its key holds them.
#[derive(serde::Serialize, serde::Deserialize)]
struct Options {
    writable: Vec<StorePath>,
    hide: Vec<String>,
    rootless: bool,
}

/// `--hermetic` and `--net`, encoded after [`Options`] only when one is set, so that the keys
/// of the other thunks are what they were before these options existed.
#[derive(serde::Serialize, serde::Deserialize)]
struct Isolation {
    hermetic: Option<StoredView>,
    net: bool,
}

/// A [`ProjectView`] as a key holds it: paths under the project relative to it, sorted.
#[derive(serde::Serialize, serde::Deserialize)]
enum StoredView {
    Whole,
    Only {
        paths: Vec<StorePath>,
        allow: Vec<String>,
    },
}

/// The options of a thunk encoded for its key. Writable directories and declared paths under
/// the project are relative, like every stored path.
fn options(thunk: &Thunk, paths: &Paths) -> Vec<u8> {
    let options = Options {
        writable: thunk.writable.iter().map(|w| paths.to_store(w)).collect(),
        hide: thunk.hide.clone(),
        rootless: thunk.rootless,
    };
    // Encoding plain data into a Vec cannot fail.
    let mut bytes = postcard::to_stdvec(&options).unwrap_or_default();
    if thunk.hermetic.is_some() || thunk.net {
        let hermetic = thunk.hermetic.as_ref().map(|view| match view {
            ProjectView::Whole => StoredView::Whole,
            ProjectView::Only {
                paths: shown,
                allow,
            } => {
                let mut stored: Vec<StorePath> = shown.iter().map(|p| paths.to_store(p)).collect();
                stored.sort();
                stored.dedup();
                StoredView::Only {
                    paths: stored,
                    allow: allow.clone(),
                }
            }
        });
        let isolation = Isolation {
            hermetic,
            net: thunk.net,
        };
        bytes.extend(postcard::to_stdvec(&isolation).unwrap_or_default());
    }
    bytes
}

/// What the options of a key say of `--hermetic` and `--net`: the view of the project (`None`
/// when not hermetic) and whether the network is the host's. Every key can be decoded: one
/// that cannot (written by another version) is taken as neither.
pub fn isolation(options: &[u8], paths: &Paths) -> (Option<ProjectView>, bool) {
    let Ok((_, rest)) = postcard::take_from_bytes::<Options>(options) else {
        return (None, false);
    };
    if rest.is_empty() {
        return (None, false);
    }
    let Ok(isolation) = postcard::from_bytes::<Isolation>(rest) else {
        return (None, false);
    };
    let view = isolation.hermetic.map(|stored| match stored {
        StoredView::Whole => ProjectView::Whole,
        StoredView::Only {
            paths: shown,
            allow,
        } => ProjectView::Only {
            paths: shown.iter().map(|p| paths.to_view(p)).collect(),
            allow,
        },
    });
    (view, isolation.net)
}

/// `a/./b/../c` -> `a/c`, without looking at the file system (as make names files).
pub fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
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

    fn thunk() -> Thunk {
        Thunk {
            argv: vec!["cc".into(), "-c".into(), "a.c".into()],
            env: Vec::new(),
            cwd: "/home/u/proj".into(),
            system_root: "/".into(),
            writable: vec!["/home/u/proj/out".into()],
            hide: vec!["/secret".into()],
            rootless: false,
            target: Some("a.o".into()),
            net: false,
            hermetic: None,
        }
    }

    #[test]
    fn options_of_plain_thunks_are_unchanged_by_isolation() {
        let paths = Paths::new(Path::new("/home/u/proj"));
        let plain = thunk_key(&thunk(), &paths);
        // The encoding every key had before --hermetic and --net.
        #[derive(serde::Serialize)]
        struct Before<'a> {
            writable: Vec<StorePath>,
            hide: &'a [String],
            rootless: bool,
        }
        let before = Before {
            writable: vec![StorePath::Project(b"out".to_vec())],
            hide: &["/secret".to_string()],
            rootless: false,
        };
        assert_eq!(plain.options, postcard::to_stdvec(&before).unwrap());
        assert_eq!(isolation(&plain.options, &paths), (None, false));
    }

    #[test]
    fn the_view_and_the_network_round_trip_through_the_key() {
        let paths = Paths::new(Path::new("/home/u/proj"));
        let view = ProjectView::Only {
            paths: vec!["/home/u/proj/b.h".into(), "/home/u/proj/a.c".into()],
            allow: vec!["*.h".into()],
        };
        let hermetic = Thunk {
            hermetic: Some(view),
            net: true,
            ..thunk()
        };
        let key = thunk_key(&hermetic, &paths);
        let sorted = ProjectView::Only {
            paths: vec!["/home/u/proj/a.c".into(), "/home/u/proj/b.h".into()],
            allow: vec!["*.h".into()],
        };
        assert_eq!(isolation(&key.options, &paths), (Some(sorted), true));
        // Another checkout sees its own paths.
        let moved = Paths::new(Path::new("/srv/proj"));
        let (moved_view, _) = isolation(&key.options, &moved);
        assert_eq!(
            moved_view,
            Some(ProjectView::Only {
                paths: vec!["/srv/proj/a.c".into(), "/srv/proj/b.h".into()],
                allow: vec!["*.h".into()],
            })
        );
        // Each of them makes another thunk.
        let whole = Thunk {
            hermetic: Some(ProjectView::Whole),
            ..thunk()
        };
        let net_only = Thunk {
            net: true,
            ..thunk()
        };
        let keys = [
            thunk_key(&thunk(), &paths).options,
            key.options.clone(),
            thunk_key(&whole, &paths).options,
            thunk_key(&net_only, &paths).options,
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(
            isolation(&thunk_key(&whole, &paths).options, &paths),
            (Some(ProjectView::Whole), false)
        );
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
