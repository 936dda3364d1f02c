//! Running one thunk: declare what it may see and write, run it in the sandbox on the FUSE
//! root, commit its writes only when it succeeds, and report exactly what it accessed.
//!
//! The engine composes [`cot_fusefs`] (what the thunk sees, and the log of what it touched) and
//! [`cot_sandbox`] (namespaces, mounts, the process); neither of those knows the other.

pub mod capture;
pub mod env;
pub mod hermetic;
pub mod inspect;
pub mod key;
pub mod memo;
pub mod observe;
pub mod project;

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cot_fusefs::{Access, CommitSummary, HideRule, Options, ProxyFs};
use cot_sandbox::{Outcome, Spec};

/// Where the sandbox's special filesystems are mounted over the FUSE root.
const MOUNTPOINTS: [&str; 4] = cot_sandbox::plan::MOUNT_POINTS;

/// The sandbox's private, empty /tmp.
const PRIVATE_TMP: &str = "/tmp";

/// How long the kernel may cache lookups and attributes inside one thunk's view. Every thunk
/// has its own mount, so nothing another thunk does can make these caches stale; writes of the
/// thunk itself go through the mount and keep them coherent.
const VIEW_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long the FUSE session may take to end once the sandbox is gone.
const SESSION_END_TIMEOUT: Duration = Duration::from_secs(10);

/// One command to run as a thunk, and the sandbox options that change what it can see.
#[derive(Clone, Debug)]
pub struct Thunk {
    pub argv: Vec<OsString>,
    /// The complete environment of the command (see [`env::thunk_env`]).
    pub env: Vec<(OsString, OsString)>,
    /// Working directory, absolute; the same path inside and outside the sandbox.
    pub cwd: PathBuf,
    /// The tree proxied as the sandbox's `/`.
    pub system_root: PathBuf,
    /// Extra writable directories besides the project and the private `/tmp`.
    pub writable: Vec<PathBuf>,
    /// Globs of paths that look absent.
    pub hide: Vec<String>,
    /// Run in a user namespace (forced by `--rootless`, automatic when not root).
    pub rootless: bool,
    /// The make target whose recipe line this is (`cot make`), part of the key.
    pub target: Option<String>,
    /// Share the host's network (`--net`) instead of a network namespace of its own with only
    /// a loopback interface.
    pub net: bool,
    /// `--hermetic`: what the thunk sees of the project (see [`hermetic`]); `None` when it is
    /// not hermetic.
    pub hermetic: Option<hermetic::ProjectView>,
}

/// How to run a thunk, beyond what it is.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Commit the writes of a command that failed, too.
    pub keep_failed: bool,
    /// Never use kernel FUSE passthrough, even where available.
    pub no_passthrough: bool,
    /// Keep the command's output only (for replay, or for a requester), instead of also
    /// copying it to cot's own stdout and stderr.
    pub quiet: bool,
    /// A listening Unix socket the command reaches at `/dev/cot`: the build it belongs to.
    pub socket: Option<PathBuf>,
    /// What the thunk's lookups wait for first (a build: the producers of files it wants).
    pub gate: Option<cot_fusefs::LookupGate>,
    /// View paths (writable) whose writes never reach the real file system: what the thunk
    /// leaves there is read from its layer into the content store and the trace's outputs,
    /// and goes with the layer (`cot install`: the caller puts it in place). A valid trace
    /// leaves them to the caller too.
    pub capture: Vec<PathBuf>,
}

/// The one-line message cot prints for an outcome the command did not print itself.
pub fn outcome_message(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Exited(_) => None,
        Outcome::Interrupted(_) => Some(format!("{outcome}; nothing was committed")),
        other => Some(other.to_string()),
    }
}

/// Failure of cot itself (as opposed to the command): exit status 125.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sandbox(#[from] cot_sandbox::Error),
    #[error(transparent)]
    Fs(#[from] cot_fusefs::Error),
    #[error("cannot prepare the layer for the thunk's writes: {0}")]
    Layer(std::io::Error),
    #[error("{path}: {message}")]
    Path { path: PathBuf, message: String },
    #[error("the filesystem session did not end after the command exited; nothing was committed")]
    SessionStuck,
    #[error(transparent)]
    Store(#[from] crate::server::Error),
    #[error(transparent)]
    Cas(#[from] crate::cas::Error),
}

/// A thunk that ran, with its writes still in its layer: the real file system is as it was
/// before the thunk, until [`Ran::commit`].
pub struct Ran {
    pub outcome: Outcome,
    /// Every access, once per path and kind, in first-seen order.
    pub accesses: Vec<Access>,
    pub project_root: PathBuf,
    pub passthrough: bool,
    pub duration: Duration,
    handle: cot_fusefs::Handle,
    layer: project::LayerSlot,
}

impl Ran {
    /// Where the command's stdout and stderr were kept.
    pub fn output_files(&self) -> (&Path, &Path) {
        (&self.layer.stdout, &self.layer.stderr)
    }

    /// Applies the thunk's writes to the real file system.
    pub fn commit(&self) -> Result<CommitSummary, Error> {
        Ok(self.handle.commit()?)
    }

    /// Applies the thunk's writes except those at and under `kept_out`, which go with the
    /// layer.
    pub fn commit_except(&self, kept_out: &[PathBuf]) -> Result<CommitSummary, Error> {
        Ok(self.handle.commit_except(kept_out)?)
    }

    /// What the thunk left at and under the view path `root`, read from its layer (before
    /// the commit).
    pub fn changes_under(&self, root: &Path) -> Result<cot_fusefs::LayerChanges, Error> {
        Ok(self.handle.changes_under(root)?)
    }

    /// Drops the thunk's writes.
    pub fn discard(&self) -> Result<(), Error> {
        Ok(self.handle.discard()?)
    }

    /// Whether the command succeeded, so that its writes are committed.
    pub fn succeeded(&self) -> bool {
        matches!(self.outcome, Outcome::Exited(0))
    }

    /// Whether its writes are committed under `options`: on success, or when asked to keep
    /// a failed command's (never an interrupted one's).
    pub fn commits(&self, options: &RunOptions) -> bool {
        self.succeeded()
            || (options.keep_failed && !matches!(self.outcome, Outcome::Interrupted(_)))
    }
}

/// Runs one thunk, keeping its writes in its layer and its output in files.
///
/// Must be called while the process is single-threaded (the sandbox forks); the FUSE server
/// threads and the output copying threads are started once the sandbox is cloned.
pub fn execute(thunk: &Thunk, options: &RunOptions) -> Result<Ran, Error> {
    execute_with(thunk, options, |_| ())
}

/// [`execute`], calling `serving` with the filesystem's handle once the command runs (a build
/// starts serving the command's child requests there).
pub fn execute_with(
    thunk: &Thunk,
    options: &RunOptions,
    serving: impl FnOnce(&cot_fusefs::Handle),
) -> Result<Ran, Error> {
    let started = Instant::now();
    let project_root = project::find_root(&thunk.cwd);
    if project_root == Path::new(PRIVATE_TMP) {
        return Err(Error::Path {
            path: project_root,
            message: "the project cannot be /tmp itself, which is private to each thunk; \
                      run cot in a subdirectory"
                .into(),
        });
    }
    let spec = Spec {
        argv: thunk.argv.clone(),
        env: thunk.env.clone(),
        cwd: thunk.cwd.clone(),
        user_namespace: thunk.rootless,
        fuse_fsname: "cot".into(),
        hostname: None,
        tmp_keep: Vec::new(),
        tmp_dirs: thunk
            .hermetic
            .iter()
            .map(|_| PathBuf::from(hermetic::HOME))
            .collect(),
        host_network: thunk.net,
        stdout: None,
        stderr: None,
        socket: options.socket.clone(),
    };
    cot_sandbox::preflight(&spec)?;
    let layer = project::reserve_layer(&project_root).map_err(Error::Layer)?;
    let passthrough =
        !options.no_passthrough && !thunk.rootless && nix::unistd::geteuid().is_root();
    let mut fs_options = fs_options(thunk, &project_root, &layer.dir, passthrough)?;
    fs_options
        .writable
        .extend(options.capture.iter().map(|p| capture_scope(p)));
    let capture = capture::Capture::new(&layer.stdout, &layer.stderr).map_err(Error::Layer)?;
    let (stdout, stderr) = capture.fds();
    let spec = Spec {
        tmp_keep: tmp_keep(&fs_options.writable)?,
        stdout: Some(stdout),
        stderr: Some(stderr),
        ..spec
    };
    let (fs, handle) = ProxyFs::new(fs_options)?;
    if let Some(gate) = &options.gate {
        handle.gate_lookups(gate.clone());
    }
    let mut server = None;
    let sandbox = cot_sandbox::launch(&spec, |fd| {
        // The server holds one descriptor per file the thunk has open. Raised here, after the
        // sandbox was cloned, so the command keeps the caller's own limit.
        raise_open_file_limit();
        server = Some(cot_fusefs::serve(fs, fd, fuse_threads()).map_err(|e| e.to_string())?);
        Ok(())
    });
    let copying = match sandbox {
        Ok(_) => {
            serving(&handle);
            Some(capture.start(!options.quiet).map_err(Error::Layer))
        }
        Err(_) => None,
    };
    let outcome = match sandbox {
        Ok(sandbox) => sandbox.wait(),
        Err(e) => Err(e),
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            let _ = handle.discard();
            return Err(e.into());
        }
    };
    // The session ends once the sandbox's mount namespace is gone; wait for it so that no late
    // request (a release, a flush) is still in flight when the layer is committed.
    if let Some(server) = server.take() {
        if !server.wait_timeout(SESSION_END_TIMEOUT) {
            return Err(Error::SessionStuck);
        }
    }
    if let Some(copying) = copying {
        copying?.finish().map_err(Error::Layer)?;
    }
    Ok(Ran {
        outcome,
        accesses: handle.accesses(),
        project_root,
        passthrough: handle.passthrough_active(),
        duration: started.elapsed(),
        handle,
        layer,
    })
}

fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            // Best effort: at the old limit the thunk can still open as many files as it could.
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn fuse_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores * 2).clamp(2, 8)
}

/// Declares the thunk's view: the system root at `/`, the project and extra writable
/// directories at their own paths (bound separately when the system root is another tree),
/// mount points for the special filesystems, cot's own state hidden, and for a hermetic thunk
/// the default hidden paths and the undeclared files of the project concealed.
fn fs_options(
    thunk: &Thunk,
    project_root: &Path,
    layer_dir: &Path,
    passthrough: bool,
) -> Result<Options, Error> {
    let binds = view_binds(thunk, project_root)?;
    let writable = writable_roots(thunk, project_root)?;
    let mut mountpoints: Vec<PathBuf> = MOUNTPOINTS.iter().map(PathBuf::from).collect();
    // The directories leading to a bound tree must exist in the view even when the system
    // root lacks them.
    for (view, _) in binds.iter().skip(1) {
        for ancestor in view.ancestors().skip(1) {
            if ancestor != Path::new("/") && !mountpoints.iter().any(|m| m == ancestor) {
                mountpoints.push(ancestor.to_path_buf());
            }
        }
    }
    let (hide_elsewhere, unhidden) = hidden_elsewhere(thunk, project_root)?;
    let conceal = thunk
        .hermetic
        .as_ref()
        .and_then(|view| view.visible_globs(project_root))
        .map(|visible| cot_fusefs::Conceal {
            roots: vec![project_root.to_path_buf()],
            visible,
        });
    Ok(Options {
        binds,
        writable,
        hide: thunk.hide.clone(),
        hide_elsewhere,
        unhidden,
        conceal,
        internal: vec![project_root.join(project::STATE_DIR)],
        mountpoints,
        layer_dir: layer_dir.to_path_buf(),
        passthrough,
        ttl: VIEW_TTL,
    })
}

/// What the thunk's view hides (`--hide`, and under `--hermetic` the default hidden paths):
/// the filesystem and the observers of the thunk's inputs agree on it.
pub fn hide_rule(thunk: &Thunk, project_root: &Path) -> Result<HideRule, Error> {
    let (elsewhere, unhidden) = hidden_elsewhere(thunk, project_root)?;
    Ok(HideRule::new(&thunk.hide, &elsewhere, &unhidden)?)
}

/// The default hidden paths of a hermetic thunk, and what they spare: the project, the
/// writable directories and cot itself (make runs it as its shell), with the way to them.
fn hidden_elsewhere(
    thunk: &Thunk,
    project_root: &Path,
) -> Result<(Vec<String>, Vec<PathBuf>), Error> {
    if thunk.hermetic.is_none() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut unhidden = writable_roots(thunk, project_root)?;
    if let Ok(exe) = std::env::current_exe() {
        unhidden.push(exe);
    }
    let hidden = hermetic::HIDDEN.iter().map(|g| g.to_string()).collect();
    Ok((hidden, unhidden))
}

/// The project and the `--writable` directories, canonical. A writable directory that does
/// not exist yet is writable where it would be (the thunk may make it), below its nearest
/// existing ancestor, which must be a directory.
fn writable_roots(thunk: &Thunk, project_root: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut writable = vec![project_root.to_path_buf()];
    for dir in &thunk.writable {
        let dir = canonical_or_missing(dir)?;
        if dir.symlink_metadata().is_ok() && !dir.is_dir() {
            return Err(Error::Path {
                path: dir,
                message: "--writable needs a directory".into(),
            });
        }
        writable.push(dir);
    }
    Ok(writable)
}

/// How the thunk's view maps to real trees: the system root at `/` first, then, when the
/// system root is another tree, the project and writable directories at their own paths.
pub fn view_binds(thunk: &Thunk, project_root: &Path) -> Result<Vec<(PathBuf, PathBuf)>, Error> {
    let system_root = canonical(&thunk.system_root)?;
    let mut binds = vec![(PathBuf::from("/"), system_root.clone())];
    if system_root != Path::new("/") {
        for dir in writable_roots(thunk, project_root)? {
            binds.push((dir.clone(), dir));
        }
    }
    Ok(binds)
}

/// Where a thunk may write to leave something at the captured path `path` (see
/// [`RunOptions::capture`]): `path` itself, or when it does not exist yet, its highest
/// missing ancestor, so that `mkdir -p` can make it. What the thunk writes there outside
/// `path` is refused after the run.
/// What of the host's /tmp the thunk's private /tmp shows: each writable root in /tmp, or for
/// one that does not exist yet (a prefix an installer makes), its nearest existing ancestor
/// below /tmp; none inside another.
fn tmp_keep(writable: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let tmp = Path::new(PRIVATE_TMP);
    let mut keep = Vec::new();
    for dir in writable.iter().filter(|d| d.starts_with(tmp) && *d != tmp) {
        let existing = dir
            .ancestors()
            .find(|a| a.symlink_metadata().is_ok())
            .unwrap_or(tmp);
        if existing == tmp {
            return Err(Error::Path {
                path: dir.clone(),
                message: "does not exist, and a thunk's /tmp is private: of the host's /tmp it \
                          sees only directories that exist (make it first, or use /var/tmp)"
                    .into(),
            });
        }
        keep.push(existing.to_path_buf());
    }
    keep.sort();
    keep.dedup();
    let nested = |d: &PathBuf| keep.iter().any(|k| k != d && d.starts_with(k));
    Ok(keep.iter().filter(|d| !nested(d)).cloned().collect())
}

pub fn capture_scope(path: &Path) -> PathBuf {
    let mut scope = path;
    while let Some(parent) = scope.parent() {
        if parent.symlink_metadata().is_ok() {
            break;
        }
        scope = parent;
    }
    if scope.symlink_metadata().is_ok() {
        path.to_path_buf()
    } else {
        scope.to_path_buf()
    }
}

/// The canonical form of `path`, or, when it does not exist, that of its nearest existing
/// ancestor (a directory) with the missing components after it.
pub fn canonical_or_missing(path: &Path) -> Result<PathBuf, Error> {
    let absolute = std::path::absolute(path).map_err(|e| Error::Path {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut missing = Vec::new();
    let mut existing = absolute.as_path();
    while existing.symlink_metadata().is_err() {
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
            break;
        };
        if name == ".." || name == "." {
            return canonical(path);
        }
        missing.push(name.to_os_string());
        existing = parent;
    }
    let mut found = canonical(existing)?;
    if !missing.is_empty() && !found.is_dir() {
        return Err(Error::Path {
            path: found,
            message: "is not a directory".into(),
        });
    }
    for name in missing.iter().rev() {
        found.push(name);
    }
    Ok(found)
}

fn canonical(path: &Path) -> Result<PathBuf, Error> {
    std::fs::canonicalize(path).map_err(|e| Error::Path {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl fmt::Display for Thunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<String> = self
            .argv
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        write!(f, "{}", words.join(" "))
    }
}
