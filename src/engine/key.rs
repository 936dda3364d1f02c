//! What identifies a thunk ([`ThunkKey`]) and how paths are stored ([`StorePath`]).
//!
//! Paths under the project root are stored relative to it, so that a moved or second checkout
//! of the project reuses the traces of the first; other paths are stored as the thunk saw them.
//!
//! A key *names* its roots ([`Names`], Rattle's named relative directories): where the project
//! root or the caller's home appears in an argument or an environment value (`PWD`, `HOME`,
//! `-I/home/u/proj/include`), the key holds a name instead, so that a second checkout, or
//! another user, computes the same key and finds the traces of the first in a shared cache.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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
    names: Names,
}

impl Paths {
    /// The paths of the project at `project_root`, with the caller's home (`HOME`) as the
    /// other named root.
    pub fn new(project_root: &Path) -> Paths {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Paths::with_home(project_root, home.as_deref())
    }

    /// The paths of the project at `project_root` for a caller whose home is `home`.
    pub fn with_home(project_root: &Path, home: Option<&Path>) -> Paths {
        Paths {
            project_root: project_root.to_path_buf(),
            names: Names::new(project_root, home),
        }
    }

    pub fn project_root(&self) -> &Path {
        &self.project_root
    }

    /// The named roots of keys (and of traces in a shared cache).
    pub fn names(&self) -> &Names {
        &self.names
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

/// The name of the project root in keys.
pub const PROJECT_NAME: u8 = b'P';

/// The name of the caller's home in keys.
pub const HOME_NAME: u8 = b'H';

/// Named roots: absolute directories that keys and shared traces name rather than spell.
///
/// A name is the two bytes `0x00` and the root's letter ([`PROJECT_NAME`], [`HOME_NAME`]).
/// Arguments and environment values are C strings, which never hold a NUL byte, so a name
/// can neither be confused with what a command line says nor be forged by one; naming and
/// expanding are exact inverses. A root is named where it appears as a whole path: at the
/// start of a string or after a separator (` :=;,'"(` and the like) or an option's letters
/// (`-I/home/u/proj/include`), and followed by the end, `/` or a separator (so `/home/u/proj2`
/// is not `/home/u/proj`). The longest root is tried first (a project inside the home is the
/// project).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// (letter, absolute path without trailing slash), longest path first.
    roots: Vec<(u8, Vec<u8>)>,
}

impl Names {
    /// The project root and, when it is a usable directory name (absolute, not `/`), the home.
    pub fn new(project_root: &Path, home: Option<&Path>) -> Names {
        let mut roots = Vec::new();
        for (letter, root) in [(PROJECT_NAME, Some(project_root)), (HOME_NAME, home)] {
            let Some(root) = root else { continue };
            let bytes = root.as_os_str().as_bytes();
            let bytes = bytes.strip_suffix(b"/").unwrap_or(bytes);
            if bytes.len() > 1 && bytes.starts_with(b"/") && !bytes.contains(&0) {
                roots.push((letter, bytes.to_vec()));
            }
        }
        roots.sort_by_key(|(_, path)| std::cmp::Reverse(path.len()));
        Names { roots }
    }

    /// The roots, as (letter, absolute path).
    pub fn roots(&self) -> impl Iterator<Item = (u8, &[u8])> {
        self.roots
            .iter()
            .map(|(letter, path)| (*letter, path.as_slice()))
    }

    /// The path of the root named `letter` here.
    pub fn root(&self, letter: u8) -> Option<&[u8]> {
        self.roots
            .iter()
            .find(|(l, _)| *l == letter)
            .map(|(_, path)| path.as_slice())
    }

    /// `text` with every whole-path occurrence of a root replaced by its name.
    pub fn name(&self, text: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            let found = (text[i] == b'/' && starts_path(text, i))
                .then(|| {
                    self.roots.iter().find(|(_, root)| {
                        text[i..].starts_with(root) && ends_path(text.get(i + root.len()))
                    })
                })
                .flatten();
            match found {
                Some((letter, root)) => {
                    out.extend_from_slice(&[0, *letter]);
                    i += root.len();
                }
                None => {
                    out.push(text[i]);
                    i += 1;
                }
            }
        }
        out
    }

    /// `text` with every name replaced by its root here; a name of a root unknown here is
    /// left as it is (nothing can exist there).
    pub fn expand(&self, text: &[u8]) -> Vec<u8> {
        if !text.contains(&0) {
            return text.to_vec();
        }
        let mut out = Vec::with_capacity(text.len() + 64);
        let mut i = 0;
        while i < text.len() {
            if text[i] == 0 {
                if let Some(root) = text.get(i + 1).and_then(|letter| self.root(*letter)) {
                    out.extend_from_slice(root);
                    i += 2;
                    continue;
                }
            }
            out.push(text[i]);
            i += 1;
        }
        out
    }

    /// Whether `text` holds a name.
    pub fn is_named(text: &[u8]) -> bool {
        text.contains(&0)
    }
}

/// `text` with its names shown as `$PROJECT` and `$HOME`, for messages.
pub fn display_named(text: &[u8]) -> String {
    if !Names::is_named(text) {
        return String::from_utf8_lossy(text).into_owned();
    }
    let mut out = Vec::with_capacity(text.len() + 16);
    let mut i = 0;
    while i < text.len() {
        match (text[i], text.get(i + 1)) {
            (0, Some(&PROJECT_NAME)) => {
                out.extend_from_slice(b"$PROJECT");
                i += 2;
            }
            (0, Some(&HOME_NAME)) => {
                out.extend_from_slice(b"$HOME");
                i += 2;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Bytes that end a path inside a string (and may come before one).
fn separator(byte: u8) -> bool {
    matches!(
        byte,
        b' ' | b'\t'
            | b'\n'
            | b':'
            | b'='
            | b';'
            | b','
            | b'\''
            | b'"'
            | b'('
            | b')'
            | b'['
            | b']'
            | b'{'
            | b'}'
            | b'<'
            | b'>'
            | b'|'
            | b'&'
            | b'`'
            | b'@'
    )
}

/// Whether a path may start at `text[i]`: at the start, after a separator, or after the
/// letters of an option (`-I`, `--prefix`).
fn starts_path(text: &[u8], i: usize) -> bool {
    let before = &text[..i];
    let word_start = before
        .iter()
        .rposition(|&b| separator(b))
        .map_or(0, |p| p + 1);
    let word = &before[word_start..];
    word.is_empty()
        || (word[0] == b'-'
            && word
                .iter()
                .all(|&b| b == b'-' || b == b'_' || b.is_ascii_alphanumeric()))
}

/// Whether a path may end before `next`.
fn ends_path(next: Option<&u8>) -> bool {
    next.is_none_or(|&b| b == b'/' || separator(b))
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
        writable: thunk
            .writable
            .iter()
            .map(|w| match paths.to_store(w) {
                StorePath::Absolute(abs) => StorePath::Absolute(paths.names().name(&abs)),
                project => project,
            })
            .collect(),
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

/// The key of a thunk in this project: its arguments and environment values with their roots
/// named (see [`Names`]; [`command_line`] gives them back).
pub fn thunk_key(thunk: &Thunk, paths: &Paths) -> ThunkKey {
    let names = paths.names();
    ThunkKey {
        argv: thunk
            .argv
            .iter()
            .map(|arg| names.name(arg.as_bytes()))
            .collect(),
        cwd: paths.to_store(&thunk.cwd),
        env: thunk
            .env
            .iter()
            .filter(|(name, _)| !name.as_bytes().starts_with(BUILD_ENV_PREFIX))
            .map(|(name, value)| (name.as_bytes().to_vec(), names.name(value.as_bytes())))
            .collect(),
        system_root: thunk.system_root.as_os_str().as_bytes().to_vec(),
        options: options(thunk, paths),
        parent: None,
        target: thunk.target.as_ref().map(|t| t.as_bytes().to_vec()),
    }
}

/// The arguments and environment of a key as the command gets them here (its names
/// expanded with this checkout's roots).
pub fn command_line(key: &ThunkKey, paths: &Paths) -> (Vec<OsString>, Vec<(OsString, OsString)>) {
    let names = paths.names();
    let os = |bytes: Vec<u8>| OsString::from_vec(bytes);
    (
        key.argv.iter().map(|arg| os(names.expand(arg))).collect(),
        key.env
            .iter()
            .map(|(name, value)| (os(name.clone()), os(names.expand(value))))
            .collect(),
    )
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
    fn roots_are_named_where_they_are_whole_paths() {
        let names = Names::new(Path::new("/home/u/proj"), Some(Path::new("/home/u")));
        let name = |s: &str| names.name(s.as_bytes());
        assert_eq!(name("/home/u/proj"), b"\0P");
        assert_eq!(name("PWD=/home/u/proj/sub"), b"PWD=\0P/sub");
        assert_eq!(name("-I/home/u/proj/include"), b"-I\0P/include");
        assert_eq!(name("--prefix=/home/u/.local"), b"--prefix=\0H/.local");
        assert_eq!(
            name("/home/u/bin:/usr/bin:/home/u/proj/bin"),
            b"\0H/bin:/usr/bin:\0P/bin"
        );
        assert_eq!(name("cd '/home/u/proj' && make"), b"cd '\0P' && make");
        // Not the same directory, or not where a path starts.
        for same in ["/home/uv", "x/home/u/proj", "./home/u", "/x/home/u"] {
            assert_eq!(name(same), same.as_bytes(), "{same}");
        }
        assert_eq!(name("/home/u/project"), b"\0H/project");
        // Naming and expanding are inverses, and another checkout expands to its own roots.
        for text in ["-I/home/u/proj/include", "/home/u/bin:/usr/bin", "plain"] {
            assert_eq!(names.expand(&name(text)), text.as_bytes());
        }
        let other = Names::new(Path::new("/srv/ci/proj"), Some(Path::new("/home/v")));
        assert_eq!(
            other.expand(&name("/home/u/bin:/home/u/proj/a.c")),
            b"/home/v/bin:/srv/ci/proj/a.c"
        );
        assert_eq!(
            display_named(&name("/home/u/proj/a:/home/u/b")),
            "$PROJECT/a:$HOME/b"
        );
        // A home of "/" names nothing.
        let root_home = Names::new(Path::new("/p"), Some(Path::new("/")));
        assert_eq!(root_home.name(b"/usr/bin"), b"/usr/bin");
    }

    #[test]
    fn a_second_checkout_and_another_home_compute_the_same_key() {
        let at = |root: &str, home: &str| {
            let paths = Paths::with_home(Path::new(root), Some(Path::new(home)));
            let thunk = Thunk {
                argv: vec![
                    "cc".into(),
                    format!("-I{root}/include").into(),
                    "a.c".into(),
                ],
                env: vec![
                    ("HOME".into(), home.into()),
                    ("PWD".into(), root.into()),
                    ("PATH".into(), format!("{home}/bin:/usr/bin").into()),
                ],
                cwd: root.into(),
                writable: vec![format!("{home}/.cache/x").into()],
                ..thunk()
            };
            (thunk_key(&thunk, &paths), paths, thunk)
        };
        let (a, _, _) = at("/home/u/proj", "/home/u");
        let (b, b_paths, b_thunk) = at("/srv/ci/checkout", "/var/lib/ci");
        assert_eq!(a, b);
        let (argv, env) = command_line(&a, &b_paths);
        assert_eq!(argv, b_thunk.argv);
        assert_eq!(env, b_thunk.env);
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
