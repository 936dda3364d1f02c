//! Hermetic mode (`--hermetic`): what a thunk sees of its project and of the machine.
//!
//! Inside the project, a hermetic thunk sees every directory (they are structure) but only the
//! files it declared ([`ProjectView`]): a make recipe line its target and its prerequisites
//! (`$@`, `$^`, `$|`; a directory with everything under it), every thunk the `--allow` globs
//! (and cot.toml's `allow`). The root thunk of a build sees the whole project, as it reads the
//! build description; so do make's `$(shell ...)` calls and a recipe line that runs a sub-make
//! (`$(MAKE)`), whose own recipes are hermetic again. Anything else looks absent: the read
//! fails, the lookup is recorded as hidden, and when the thunk fails the build names the files
//! it looked for in vain ([`undeclared`], [`undeclared_message`]). What the thunk writes
//! itself, and what its child thunks wrote, it sees.
//!
//! Outside the project it sees everything but [`HIDDEN`]: homes, `/root`, and ssh keys and
//! credentials wherever they are, never the project itself nor the way to it. Its `HOME` is
//! [`HOME`], an empty directory of its private `/tmp`; its environment is the allow-list only
//! (`--inherit-env` is refused); and it has no network but loopback unless `--net`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::model::Declared;

/// The hermetic thunk's `HOME`: created empty, mode 0700, in its private `/tmp`.
pub const HOME: &str = "/tmp/cot-home";

/// What a hermetic thunk never sees outside the project (globs over absolute paths, `*` stops
/// at `/`, `**` crosses directories). The project, the `--writable` directories, cot itself
/// and the directories leading to them stay visible even when they lie in a home.
pub const HIDDEN: &[&str] = &[
    "/home",
    "/home/**",
    "/root",
    "/root/**",
    "**/.ssh",
    "**/.gnupg",
    "**/.aws",
    "**/.netrc",
    "**/.docker/config.json",
    "**/.git-credentials",
    "**/.config/gh",
    "**/.kube",
    "**/.pypirc",
    "**/.cargo/credentials*",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/ssh/*_key",
];

/// What a hermetic thunk sees of its project.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProjectView {
    /// All of it: the root of a build, a sub-make, a `$(shell ...)`.
    Whole,
    /// Its directories, and the files that `paths` name (absolute; a directory with
    /// everything under it) or that an `allow` glob matches (relative to the project root,
    /// or absolute; one matching a directory shows everything under it).
    Only {
        paths: Vec<PathBuf>,
        allow: Vec<String>,
    },
}

impl ProjectView {
    /// The globs of the files this view shows, as the filesystem matches them; `None` for the
    /// whole project. The real tree is read for symlinks on the way to a declared path: the
    /// kernel looks up their targets, which show too.
    pub fn visible_globs(&self, project_root: &Path) -> Option<Vec<String>> {
        let ProjectView::Only { paths, allow } = self else {
            return None;
        };
        let mut globs = Vec::new();
        let mut add = |path: &Path| {
            let glob = globset::escape(&path.to_string_lossy());
            globs.push(format!("{glob}/**"));
            globs.push(glob);
        };
        for path in paths {
            add(path);
            for ancestor in path.ancestors().skip(1) {
                if !ancestor.starts_with(project_root) || ancestor == project_root {
                    break;
                }
                if ancestor.symlink_metadata().is_ok_and(|m| m.is_symlink()) {
                    add(ancestor);
                }
            }
            if let Ok(real) = std::fs::canonicalize(path) {
                if real != *path {
                    add(&real);
                }
            }
        }
        let root = globset::escape(&project_root.to_string_lossy());
        for glob in allow {
            let glob = if glob.starts_with('/') {
                glob.clone()
            } else {
                format!("{root}/{}", glob.trim_start_matches("./"))
            };
            globs.push(format!("{glob}/**"));
            globs.push(glob);
        }
        Some(globs)
    }
}

/// The paths a make recipe line declared: its target and prerequisites, as make wrote them
/// (relative to the recipe's working directory `cwd`, or absolute), made absolute, sorted.
pub fn declared_paths(cwd: &Path, target: Option<&str>, declared: &Declared) -> Vec<PathBuf> {
    let words = declared
        .prereqs
        .iter()
        .chain(&declared.order_only)
        .map(|word| std::ffi::OsStr::from_bytes(word))
        .chain(target.map(std::ffi::OsStr::new));
    let mut paths: Vec<PathBuf> = words
        .filter(|word| !word.is_empty())
        .map(|word| crate::engine::key::lexical(&cwd.join(word)))
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Whether a recipe line (`argv` is `sh -c LINE`) runs a sub-make: make's `$(MAKE)`, which
/// under `cot make` is `<cot> __make`.
pub fn runs_sub_make(argv: &[OsString], cot_exe: &Path) -> bool {
    let mut call = cot_exe.as_os_str().as_bytes().to_vec();
    call.extend_from_slice(b" __make");
    argv.last().is_some_and(|line| {
        line.as_bytes()
            .windows(call.len())
            .any(|window| window == call)
    })
}

/// Of the paths a thunk looked up and found hidden (view paths), the files of the project that
/// exist, project-relative: what a hermetic thunk looked for without declaring it. `hidden`
/// tells the paths `--hide` hides (those are not for declaring); `real` maps a view path to
/// the real one.
pub fn undeclared<'a>(
    looked_for: impl IntoIterator<Item = &'a Path>,
    project_root: &Path,
    hidden: &cot_fusefs::HideRule,
    real: impl Fn(&Path) -> PathBuf,
) -> Vec<String> {
    let mut files: Vec<String> = looked_for
        .into_iter()
        .filter(|view| view.starts_with(project_root) && *view != project_root)
        .filter(|view| !hidden.is_hidden(view))
        .filter(|view| std::fs::symlink_metadata(real(view)).is_ok_and(|m| !m.file_type().is_dir()))
        .filter_map(|view| view.strip_prefix(project_root).ok())
        .map(|rel| rel.to_string_lossy().into_owned())
        .collect();
    files.sort();
    files.dedup();
    files
}

/// How many undeclared files a message names.
const NAMED: usize = 10;

/// The message for a hermetic thunk that failed after looking for `files` (see
/// [`undeclared`]), which must not be empty: `command` is its command line, `target` its
/// make target, if any.
pub fn undeclared_message(command: &str, target: Option<&str>, files: &[String]) -> String {
    let mut named = files
        .iter()
        .take(NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if files.len() > NAMED {
        named.push_str(&format!(" and {} more", files.len() - NAMED));
    }
    let (exist, it) = if files.len() == 1 {
        ("exists", "it")
    } else {
        ("exist", "them")
    };
    let is = if files.len() == 1 { "is" } else { "are" };
    match target {
        Some(target) => format!(
            "hermetic: `{command}` (target {target}) looked for {named}, which {exist} but \
             {is} not declared: add {it} to the rule's prerequisites, or --allow {it}"
        ),
        None => format!(
            "hermetic: `{command}` looked for {named}, which {exist} but {is} not visible: \
             --allow {it} (or list {it} in cot.toml's allow)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_are_absolute_and_lexical() {
        let declared = Declared {
            prereqs: vec![
                b"main.c".to_vec(),
                b"./inc/../hdr.h".to_vec(),
                b"main.c".to_vec(),
            ],
            order_only: vec![b"/abs/dir".to_vec(), Vec::new()],
        };
        let paths = declared_paths(Path::new("/p/sub"), Some("main.o"), &declared);
        let expected: Vec<PathBuf> = ["/abs/dir", "/p/sub/hdr.h", "/p/sub/main.c", "/p/sub/main.o"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(paths, expected);
    }

    #[test]
    fn visible_globs_escape_paths_and_anchor_relative_allows() {
        let view = ProjectView::Only {
            paths: vec!["/p/a[1].c".into()],
            allow: vec!["*.h".into(), "./inc".into(), "/opt/x".into()],
        };
        let globs = view.visible_globs(Path::new("/p")).expect("a limited view");
        let set = cot_fusefs::HideRule::new(&globs, &[], &[]).expect("valid globs");
        for shown in ["/p/a[1].c", "/p/hdr.h", "/p/inc/deep/x.h", "/opt/x"] {
            assert!(set.is_hidden(Path::new(shown)), "{shown} should match");
        }
        for concealed in ["/p/a1.c", "/p/sub/hdr.h", "/p/main.c"] {
            assert!(
                !set.is_hidden(Path::new(concealed)),
                "{concealed} should not match"
            );
        }
        assert_eq!(ProjectView::Whole.visible_globs(Path::new("/p")), None);
    }

    #[test]
    fn a_sub_make_is_cot_make_called_by_the_line() {
        let cot = Path::new("/usr/bin/cot");
        let line = |l: &str| vec![OsString::from("/bin/sh"), "-c".into(), l.into()];
        assert!(runs_sub_make(&line("/usr/bin/cot __make -C lib all"), cot));
        assert!(!runs_sub_make(&line("make -C lib"), cot));
        assert!(!runs_sub_make(&line("/usr/bin/cot __sh -c x"), cot));
    }

    #[test]
    fn the_message_names_the_files_and_what_to_do() {
        let one = undeclared_message("cc -c main.c", Some("main.o"), &["hdr.h".into()]);
        assert_eq!(
            one,
            "hermetic: `cc -c main.c` (target main.o) looked for hdr.h, which exists but is not \
             declared: add it to the rule's prerequisites, or --allow it"
        );
        let many: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
        let text = undeclared_message("cat", None, &many);
        assert!(
            text.contains("f9 and 2 more, which exist but are not visible"),
            "{text}"
        );
    }
}
