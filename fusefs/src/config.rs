//! `Options` checked and turned into the lookup structures the hot paths use.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use rustix::fs::{Mode, OFlags};

use crate::{Conceal, Error, Options};

/// A view subtree served from a real directory.
pub(crate) struct Bind {
    pub(crate) view: PathBuf,
    pub(crate) real: PathBuf,
    /// `O_PATH` descriptor of `real`, the anchor of every lower access under `view`.
    pub(crate) fd: OwnedFd,
}

/// The immutable part of the filesystem's state.
pub(crate) struct Config {
    /// Longest view path first, so the first match is the longest prefix.
    pub(crate) binds: Vec<Bind>,
    pub(crate) writable: Vec<PathBuf>,
    pub(crate) hide: HideRule,
    pub(crate) internal: Vec<PathBuf>,
    pub(crate) conceal: Option<Concealment>,
    /// The given mount points and all their ancestors (except `/`).
    pub(crate) mountpoints: HashSet<PathBuf>,
    /// Bind views and mount points: renaming or removing them (or a directory holding one, or
    /// an internal path) fails with EBUSY, like a real mount point.
    pub(crate) pinned: Vec<PathBuf>,
    /// Names of mount points and bind views under each directory, listed even when the real
    /// tree lacks them.
    pub(crate) extra_children: HashMap<PathBuf, Vec<OsString>>,
    pub(crate) layer_dir: PathBuf,
    pub(crate) layer_fd: OwnedFd,
    pub(crate) ttl: Duration,
    pub(crate) passthrough: bool,
    /// `max_stack_depth` to request with passthrough: 2 when a backing tree is itself stacked.
    pub(crate) stack_depth: u32,
    /// The daemon runs as root: created files are chowned to the requesting user.
    pub(crate) root: bool,
}

/// `O_PATH` open of a directory given by the caller (trusted: symlinks are followed).
fn open_dir_path(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn check_absolute(path: &Path) -> Result<(), Error> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(Error::NotAbsolute {
            path: path.to_path_buf(),
        })
    }
}

/// `a/./b/` -> `a/b`; `..` is kept (it never matches a real view path).
pub(crate) fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// Whether a file system is itself stacked on another (its files need `max_stack_depth` 2).
fn is_stacked(fd: BorrowedFd<'_>) -> bool {
    const OVERLAYFS: i64 = 0x794c_7630;
    const FUSE: i64 = 0x6573_5546;
    const ECRYPTFS: i64 = 0xf15f;
    match rustix::fs::fstatfs(fd) {
        Ok(st) => {
            #[allow(
                clippy::useless_conversion,
                reason = "f_type is i64 here but i32 or u32 on other architectures"
            )]
            let kind = i64::from(st.f_type);
            kind == OVERLAYFS || kind == FUSE || kind == ECRYPTFS
        }
        Err(_) => false,
    }
}

impl Config {
    pub(crate) fn new(opts: Options) -> Result<Config, Error> {
        let mut binds = Vec::new();
        let mut has_root = false;
        for (view, real) in &opts.binds {
            check_absolute(view)?;
            let view = normalize(view);
            has_root |= view == Path::new("/");
            let fd = open_dir_path(real).map_err(|source| Error::Bind {
                view: view.clone(),
                real: real.clone(),
                source,
            })?;
            binds.push(Bind {
                view,
                real: real.clone(),
                fd,
            });
        }
        if !has_root {
            return Err(Error::NoRootBind);
        }
        binds.sort_by_key(|b| std::cmp::Reverse(b.view.components().count()));

        let mut writable = Vec::new();
        for w in &opts.writable {
            check_absolute(w)?;
            writable.push(normalize(w));
        }
        let mut internal = Vec::new();
        for i in &opts.internal {
            check_absolute(i)?;
            internal.push(normalize(i));
        }

        for u in &opts.unhidden {
            check_absolute(u)?;
        }
        let hide = HideRule::new(&opts.hide, &opts.hide_elsewhere, &opts.unhidden)?;
        let conceal = opts.conceal.as_ref().map(Concealment::new).transpose()?;

        let mut given = Vec::new();
        for m in &opts.mountpoints {
            check_absolute(m)?;
            given.push(normalize(m));
        }
        let bind_views: Vec<PathBuf> = binds.iter().map(|b| b.view.clone()).collect();
        let mut mountpoints = HashSet::new();
        for m in &given {
            mountpoints.extend(m.ancestors().map(Path::to_path_buf));
        }
        for v in &bind_views {
            // A bind view itself is served from its real directory; only its ancestors may
            // need to be synthetic.
            mountpoints.extend(v.ancestors().skip(1).map(Path::to_path_buf));
        }
        mountpoints.remove(Path::new("/"));
        let mut extra_children: HashMap<PathBuf, Vec<OsString>> = HashMap::new();
        for path in mountpoints.iter().chain(bind_views.iter()) {
            if let (Some(parent), Some(name)) = (path.parent(), path.file_name()) {
                let names = extra_children.entry(parent.to_path_buf()).or_default();
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_os_string());
                }
            }
        }
        let pinned: Vec<PathBuf> = given
            .into_iter()
            .chain(bind_views)
            .filter(|p| p != Path::new("/"))
            .collect();

        let layer_fd = open_dir_path(&opts.layer_dir).map_err(|source| Error::LayerDir {
            path: opts.layer_dir.clone(),
            source,
        })?;
        let mut entries = std::fs::read_dir(&opts.layer_dir).map_err(|source| Error::LayerDir {
            path: opts.layer_dir.clone(),
            source,
        })?;
        if entries.next().is_some() {
            return Err(Error::LayerNotEmpty {
                path: opts.layer_dir.clone(),
            });
        }

        let stacked =
            is_stacked(layer_fd.as_fd()) || binds.iter().any(|b| is_stacked(b.fd.as_fd()));
        Ok(Config {
            binds,
            writable,
            hide,
            internal,
            conceal,
            mountpoints,
            pinned,
            extra_children,
            layer_dir: opts.layer_dir,
            layer_fd,
            ttl: opts.ttl,
            passthrough: opts.passthrough,
            stack_depth: if stacked { 2 } else { 1 },
            root: rustix::process::geteuid().is_root(),
        })
    }

    /// The bind serving `view` and the path relative to its real directory (`.` for its root).
    pub(crate) fn lower<'a>(&self, view: &'a Path) -> (&Bind, &'a Path) {
        let (i, rel) = self.lower_index(view);
        (&self.binds[i], rel)
    }

    /// Like [`Config::lower`], with the bind as its index in `binds`.
    pub(crate) fn lower_index<'a>(&self, view: &'a Path) -> (usize, &'a Path) {
        for (i, bind) in self.binds.iter().enumerate() {
            if let Ok(rel) = view.strip_prefix(&bind.view) {
                let rel = if rel.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    rel
                };
                return (i, rel);
            }
        }
        // Unreachable in practice: `/` is always bound and every view path is absolute.
        (self.binds.len() - 1, Path::new("."))
    }

    /// The real path `view` maps to.
    pub(crate) fn real_path(&self, view: &Path) -> PathBuf {
        let (bind, rel) = self.lower(view);
        if rel == Path::new(".") {
            bind.real.clone()
        } else {
            bind.real.join(rel)
        }
    }

    pub(crate) fn is_writable(&self, view: &Path) -> bool {
        self.writable.iter().any(|w| view.starts_with(w))
    }

    pub(crate) fn is_internal(&self, view: &Path) -> bool {
        self.internal.iter().any(|i| view.starts_with(i))
    }

    pub(crate) fn is_hidden(&self, view: &Path) -> bool {
        self.hide.is_hidden(view)
    }

    /// Whether a real entry at `view` that is not a directory is concealed by the rule (the
    /// layer decides whether the thunk's own writes show anyway).
    pub(crate) fn conceals(&self, view: &Path) -> bool {
        self.conceal.as_ref().is_some_and(|c| c.conceals(view))
    }

    /// Whether `view` is a mount point, a bind view, or holds one (or an internal path).
    pub(crate) fn is_pinned(&self, view: &Path) -> bool {
        self.pinned
            .iter()
            .chain(self.internal.iter())
            .any(|p| p.starts_with(view))
    }
}

/// `view` relative to the layer directory (`.` for the root).
pub(crate) fn upper_rel(view: &Path) -> &Path {
    match view.strip_prefix("/") {
        Ok(rel) if !rel.as_os_str().is_empty() => rel,
        _ => Path::new("."),
    }
}

/// [`Conceal`] compiled.
pub(crate) struct Concealment {
    roots: Vec<PathBuf>,
    visible: GlobSet,
}

impl Concealment {
    fn new(rule: &Conceal) -> Result<Concealment, Error> {
        let mut roots = Vec::new();
        for root in &rule.roots {
            check_absolute(root)?;
            roots.push(normalize(root));
        }
        Ok(Concealment {
            roots,
            visible: glob_set(&rule.visible)?,
        })
    }

    fn conceals(&self, view: &Path) -> bool {
        self.roots.iter().any(|r| view.starts_with(r) && view != r) && !self.visible.is_match(view)
    }
}

/// Which view paths look absent: those matching a `hide` glob, and those matching a
/// `hide_elsewhere` glob except the `unhidden` paths, what lies under them and the directories
/// leading to them (see [`crate::Options::hide`]). The caller uses the same rule to leave
/// hidden names out of what it computes from the real tree, so both agree on what the thunk
/// could see.
#[derive(Clone, Debug)]
pub struct HideRule {
    hide: GlobSet,
    elsewhere: GlobSet,
    unhidden: Vec<PathBuf>,
}

impl HideRule {
    /// Compiles the globs (over absolute view paths, `*` stops at `/` and `**` crosses
    /// directories); `unhidden` are absolute view paths.
    pub fn new(
        hide: &[String],
        hide_elsewhere: &[String],
        unhidden: &[PathBuf],
    ) -> Result<HideRule, Error> {
        Ok(HideRule {
            hide: glob_set(hide)?,
            elsewhere: glob_set(hide_elsewhere)?,
            unhidden: unhidden.iter().map(|u| normalize(u)).collect(),
        })
    }

    /// Whether the view path `view` looks absent.
    pub fn is_hidden(&self, view: &Path) -> bool {
        (!self.hide.is_empty() && self.hide.is_match(view))
            || (!self.elsewhere.is_empty()
                && self.elsewhere.is_match(view)
                && !self
                    .unhidden
                    .iter()
                    .any(|u| u.starts_with(view) || view.starts_with(u)))
    }
}

/// Compiles globs as the view matches them: over absolute view paths, `*` stopping at `/`.
pub fn glob_set(patterns: &[String]) -> Result<GlobSet, Error> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|source| Error::Glob {
                pattern: pattern.clone(),
                source,
            })?;
        set.add(glob);
    }
    set.build().map_err(|source| Error::Glob {
        pattern: patterns.join(" "),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(hide: &[&str], elsewhere: &[&str], unhidden: &[&str]) -> HideRule {
        let strings = |globs: &[&str]| globs.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let unhidden: Vec<PathBuf> = unhidden.iter().map(PathBuf::from).collect();
        HideRule::new(&strings(hide), &strings(elsewhere), &unhidden).expect("valid globs")
    }

    #[test]
    fn unhidden_paths_and_the_way_to_them_stay_visible_elsewhere_only() {
        let hide = rule(
            &["/home/u/proj/secret"],
            &["/home", "/home/**", "**/.ssh"],
            &["/home/u/proj"],
        );
        for visible in [
            "/home",
            "/home/u",
            "/home/u/proj",
            "/home/u/proj/.ssh",
            "/usr",
        ] {
            assert!(!hide.is_hidden(Path::new(visible)), "{visible}");
        }
        for hidden in [
            "/home/v",
            "/home/u/.ssh",
            "/home/u/project",
            "/var/x/.ssh",
            "/home/u/proj/secret",
        ] {
            assert!(hide.is_hidden(Path::new(hidden)), "{hidden}");
        }
        let nothing = rule(&[], &[], &[]);
        assert!(!nothing.is_hidden(Path::new("/home")));
    }

    #[test]
    fn concealment_keeps_roots_and_visible_globs() {
        let rule = Conceal {
            roots: vec!["/p".into()],
            visible: vec!["/p/a.c".into(), "/p/inc/**".into(), "/p/*.h".into()],
        };
        let c = Concealment::new(&rule).expect("valid globs");
        for shown in ["/p", "/p/a.c", "/p/inc/x/y.h", "/p/z.h", "/q/secret", "/pa"] {
            assert!(!c.conceals(Path::new(shown)), "{shown}");
        }
        for concealed in ["/p/b.c", "/p/sub/z.h", "/p/a.c.orig"] {
            assert!(c.conceals(Path::new(concealed)), "{concealed}");
        }
    }
}
