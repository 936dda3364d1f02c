//! `cot run [OPTIONS] -- CMD [ARGS...]`

use std::ffi::OsString;
use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::cache::CacheOptions;
use crate::engine::env::{parse_rules, set_var, thunk_env};
use crate::engine::hermetic::{self, ProjectView};
use crate::engine::memo::{self, MemoOptions};
use crate::engine::observe::CheckMode;
use crate::engine::{RunOptions, Thunk};

/// Run one command as a thunk in the sandbox and record every file it accessed
#[derive(Debug, Args)]
#[command(
    long_about = "Run one command as a thunk in the sandbox and record every file it accessed.\n\n\
The command runs in new mount, pid, uts, ipc and network (loopback only, unless --net) \
namespaces, as root directly or, for other users, inside a user namespace mapping the caller's \
uid and gid. Its `/` is cot's FUSE view of the real system (or of --system-root); /proc is its \
own, /dev holds only the usual devices, /sys is read-only and /tmp is private and empty. The working directory, stdin, \
stdout and stderr are the caller's.\n\n\
Only the project directory (the nearest ancestor holding .cot/, else the working directory), the \
private /tmp and --writable directories are writable; elsewhere writes fail with EROFS. Writes are \
kept in a layer and committed to the real filesystem only when the command exits 0.\n\n\
With --hermetic the command sees, inside the project, only its directories and the files \
--allow names; anything else looks absent, and when the command fails cot names the files it \
looked for. Outside the project it sees everything but these (the project and the way to it \
excepted): /home, /root, and anywhere .ssh, .gnupg, .aws, .netrc, .docker/config.json, \
.git-credentials, .config/gh, .kube, .pypirc, .cargo/credentials*; /etc/shadow, /etc/gshadow \
and /etc/ssh/*_key. Its environment is the allow-list (--inherit-env is refused), HOME is an \
empty private directory, and the network is loopback only unless --net.\n\n\
Exit status: the command's own; 128+N when it was killed by signal N; 125 when cot itself failed; \
126 when the command cannot be executed; 127 when it is not found.",
    after_help = "Examples:\n  \
cot run -- make -j2\n  \
cot run --trace-out trace.jsonl -- cc -c main.c\n  \
cot run --hide '/home/*/.ssh/**' --env CC=clang -- ./build.sh\n  \
cot run --hermetic --allow 'src/**' --allow '*.h' -- cc -c src/main.c"
)]
pub struct RunArgs {
    /// Write every access as JSON lines to FILE (one access a line, e.g.
    /// {"kind":"read","path":"/usr/include/stdio.h"}); a path that is not UTF-8 also gets an
    /// exact base64 copy in "path_b64" (and "to_b64")
    #[arg(long, value_name = "FILE")]
    trace_out: Option<PathBuf>,

    #[command(flatten)]
    sandbox: SandboxArgs,

    /// Commit the command's writes even when it fails
    #[arg(long)]
    keep_failed: bool,

    /// Say why the command ran ("ran: src/util.h changed (content)") or why not ("cached: 214
    /// inputs unchanged, restored 2 outputs"), on stderr
    #[arg(long)]
    explain: bool,

    /// Always run the command (its trace is still recorded)
    #[arg(long)]
    no_cache: bool,

    /// Reuse the trace of a run that failed (by default only successful runs are reused)
    #[arg(long)]
    cache_failures: bool,

    /// Report what was recorded and how the view was served, on stderr
    #[arg(short, long)]
    verbose: bool,

    /// Inside a build: start the command as a child thunk without waiting for it (`cot wait`
    /// waits for the started ones)
    #[arg(long)]
    bg: bool,

    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// The options that say what thunks see and where their traces go, shared by `cot run`,
/// `cot build` and `cot make`.
#[derive(Debug, Args, Clone)]
pub struct SandboxArgs {
    /// Pass NAME from the caller's environment, or set NAME=VALUE (repeatable); by default only
    /// PATH, HOME, LANG, LC_*, TERM and TZ pass through
    #[arg(long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<OsString>,

    /// Pass the caller's whole environment (not with --hermetic)
    #[arg(long)]
    pub inherit_env: bool,

    /// Hermetic mode: see only the declared files of the project, and nothing of homes and
    /// credentials
    ///
    /// Inside the project a thunk sees every directory but only the files it declared: a make recipe line its target and prerequisites ($@, $^, $|; a directory with
    /// everything under it), every thunk the --allow globs; the root of a build (the Cotfile,
    /// make itself, and make's sub-makes and $(shell ...)) sees the whole project. Anything else
    /// looks absent: the read fails and the failure names the file. Outside the project a
    /// thunk sees everything but /home, /root, and anywhere .ssh, .gnupg, .aws, .netrc,
    /// .docker/config.json, .git-credentials, .config/gh, .kube, .pypirc and
    /// .cargo/credentials*, and /etc/shadow, /etc/gshadow, /etc/ssh/*_key (never hiding the
    /// project, --writable directories, cot itself or the way to them). The environment is the
    /// allow-list (--inherit-env is refused) and HOME is an empty private directory
    #[arg(long)]
    pub hermetic: bool,

    /// Under --hermetic, show the project's files matching GLOB to every thunk (repeatable).
    /// Relative globs are relative to the project root, absolute ones absolute; `*` stops at
    /// `/`, `**` crosses directories; a glob matching a directory shows everything under it
    #[arg(long, value_name = "GLOB")]
    pub allow: Vec<String>,

    /// Share the host's network (with or without --hermetic); by default thunks have a network
    /// of their own with only a loopback interface
    #[arg(long)]
    pub net: bool,

    /// Make DIR writable too (repeatable)
    #[arg(long, value_name = "DIR")]
    pub writable: Vec<PathBuf>,

    /// Make paths matching GLOB look absent (repeatable); each attempt is recorded as "hidden".
    /// Globs match absolute paths; `*` stops at `/`, `**` crosses directories (see --hermetic
    /// for the paths hidden by default there)
    #[arg(long, value_name = "GLOB")]
    pub hide: Vec<String>,

    /// Proxy DIR as the sandbox's `/` instead of the real system (e.g. a minimal Debian root
    /// for hermetic builds); the project directory stays visible at its own path
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub system_root: PathBuf,

    /// Run in a user namespace even as root (automatic for other users)
    #[arg(long)]
    pub rootless: bool,

    /// Serve file data through cot instead of kernel FUSE passthrough (slower; for comparison)
    #[arg(long)]
    pub no_passthrough: bool,

    /// How to tell that a file changed: its stat tuple (inode, size, mtime, ctime, mode), its
    /// content digest, or the stat tuple first and the digest when that changed
    #[arg(long, value_enum, value_name = "MODE", default_value_t = CheckMode::MtimeThenDigest)]
    pub check: CheckMode,

    /// The trace store directory [default: <project>/.cot/store]
    #[arg(long, value_name = "DIR", env = "COT_STORE")]
    pub store: Option<PathBuf>,

    /// A cache shared by the checkouts and users of this machine: a thunk none of whose own
    /// traces holds is looked up there, and a thunk that runs is written there, so a second
    /// checkout of the project (at another path, of another user) reuses the first's results
    /// [default: `[cache] dir` in cot.toml]
    #[arg(long, value_name = "DIR", env = "COT_CACHE")]
    pub cache: Option<PathBuf>,

    /// Use the shared cache without writing to it (automatic when it is not writable)
    #[arg(long)]
    pub cache_read_only: bool,

    /// A remote cache speaking the Bazel Remote Execution API (ActionCache and CAS over
    /// gRPC: bazel-remote, Buildbarn, BuildGrid), asked after the shared cache; results are
    /// verified by digest before they are used [default: `[cache] remote` in cot.toml]
    #[arg(long, value_name = "grpc://HOST:PORT[/INSTANCE]", env = "COT_REMOTE")]
    pub remote: Option<String>,

    /// Write the results of thunks that run to the remote cache too (off by default: a client
    /// that writes to a team's cache must be trusted by the team)
    #[arg(long)]
    pub remote_upload: bool,

    /// Give up a remote cache that does not answer a call within SECONDS, and build without
    /// it [default: 10]
    #[arg(long, value_name = "SECONDS")]
    pub remote_timeout: Option<f64>,
}

impl SandboxArgs {
    /// The caches to use: these options over cot.toml's `[cache]` of the project.
    pub fn cache_options(&self, project_root: &std::path::Path) -> Result<CacheOptions> {
        let config = crate::cli::build::cache_config(project_root)?;
        // A malformed URL is a mistake to fix, not a cache to do without.
        if let Some(url) = &self.remote {
            crate::remote::parse_url(url).map_err(|e| anyhow::anyhow!("--remote: {e}"))?;
        } else if let Some(url) = &config.remote {
            crate::remote::parse_url(url)
                .map_err(|e| anyhow::anyhow!("cot.toml: [cache] remote: {e}"))?;
        }
        let remote_timeout = match self.remote_timeout.or(config.remote_timeout) {
            None => None,
            Some(seconds) => Some(
                std::time::Duration::try_from_secs_f64(seconds)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "remote timeout: {seconds} is not a usable deadline (seconds, above 0)"
                        )
                    })?,
            ),
        };
        Ok(CacheOptions {
            dir: self
                .cache
                .clone()
                .or_else(|| config.dir.map(|dir| project_root.join(dir))),
            read_only: self.cache_read_only || config.read_only,
            remote: self.remote.clone().or(config.remote),
            remote_upload: self.remote_upload || config.remote_upload,
            remote_timeout,
        })
    }

    /// Refuses what contradicts hermetic mode (`hermetic`: given here or in cot.toml).
    pub fn check_hermetic(&self, hermetic: bool) -> Result<()> {
        if hermetic && self.inherit_env {
            anyhow::bail!(
                "--inherit-env cannot be used with --hermetic: a hermetic thunk's environment is \
                 the allow-list (pass more with --env NAME)"
            );
        }
        if !hermetic && !self.allow.is_empty() {
            anyhow::bail!(
                "--allow applies under --hermetic (without it every file of the project is visible)"
            );
        }
        Ok(())
    }
}

/// For a hermetic `cot run` that failed: which files of the project it looked for in vain.
fn undeclared_reads(thunk: &Thunk, accesses: &[cot_fusefs::Access]) -> Option<String> {
    let project_root = crate::engine::project::find_root(&thunk.cwd);
    let hidden = crate::engine::hide_rule(thunk, &project_root).ok()?;
    let looked_for = accesses
        .iter()
        .filter(|a| a.kind == cot_fusefs::AccessKind::Hidden)
        .map(|a| a.path.as_path());
    let files = hermetic::undeclared(looked_for, &project_root, &hidden, |view| {
        view.to_path_buf()
    });
    (!files.is_empty())
        .then(|| hermetic::undeclared_message(&thunk.to_string(), thunk.target.as_deref(), &files))
}

pub fn run(args: RunArgs) -> Result<u8> {
    if crate::build::client::inside_build() {
        return nested(args);
    }
    if args.bg {
        anyhow::bail!(
            "--bg starts a child thunk of a build: use it inside a build script (`cot build`)"
        );
    }
    let rules = parse_rules(&args.sandbox.env)?;
    args.sandbox.check_hermetic(args.sandbox.hermetic)?;
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let caches = args
        .sandbox
        .cache_options(&crate::engine::project::find_root(&cwd))?;
    let rootless = args.sandbox.rootless || !nix::unistd::geteuid().is_root();
    let mut env = thunk_env(std::env::vars_os(), &rules, args.sandbox.inherit_env);
    // A hermetic thunk that is not the root of a build sees only what --allow names.
    let hermetic = args.sandbox.hermetic.then(|| {
        set_var(&mut env, "HOME", hermetic::HOME);
        ProjectView::Only {
            paths: Vec::new(),
            allow: args.sandbox.allow.clone(),
        }
    });
    let thunk = Thunk {
        argv: args.command,
        env,
        cwd,
        system_root: args.sandbox.system_root,
        writable: args.sandbox.writable,
        hide: args.sandbox.hide,
        rootless,
        target: None,
        net: args.sandbox.net,
        hermetic,
    };
    // Open the trace file before running, so a bad path fails before the command runs.
    let trace_out = match &args.trace_out {
        Some(path) => Some(
            File::create(path)
                .with_context(|| format!("cannot create trace file {}", path.display()))?,
        ),
        None => None,
    };
    let options = RunOptions {
        keep_failed: args.keep_failed,
        no_passthrough: args.sandbox.no_passthrough,
        ..RunOptions::default()
    };
    let memo_options = MemoOptions {
        cas: None,
        caches,
        store: args.sandbox.store,
        check: args.sandbox.check,
        no_cache: args.no_cache,
        cache_failures: args.cache_failures,
    };
    let report = memo::run(&thunk, &options, &memo_options)?;

    if let (Some(file), Some(path)) = (trace_out, &args.trace_out) {
        crate::trace::write_json_lines(&mut BufWriter::new(file), &report.accesses)
            .with_context(|| format!("cannot write trace file {}", path.display()))?;
    }
    if let Some(message) = &report.message {
        eprintln!("cot: {message}");
    }
    if report.exit_code != 0 && thunk.hermetic.is_some() {
        if let Some(message) = undeclared_reads(&thunk, &report.accesses) {
            eprintln!("cot: {message}");
        }
    }
    if args.explain {
        eprintln!("cot: {}", report.explanation);
    }
    if args.verbose {
        let data_path = if report.passthrough {
            "kernel passthrough"
        } else {
            "userspace"
        };
        if report.ran {
            eprintln!(
                "cot: {} accesses recorded, file data served by {data_path}, {:.1} ms",
                report.accesses.len(),
                report.duration.as_secs_f64() * 1000.0
            );
        } else {
            eprintln!(
                "cot: not run: decided in {:.2} ms with {} files hashed, {:.2} ms in all",
                report.decided_in.as_secs_f64() * 1000.0,
                report.hashes,
                report.duration.as_secs_f64() * 1000.0
            );
        }
    }
    Ok(u8::try_from(report.exit_code).unwrap_or(u8::MAX))
}

/// `cot run` inside a thunk of a build: the command becomes a child thunk of the build, with
/// this process's whole environment (the build already filtered the root's) plus `--env`.
fn nested(args: RunArgs) -> Result<u8> {
    let refused = [
        (args.trace_out.is_some(), "--trace-out"),
        (!args.sandbox.writable.is_empty(), "--writable"),
        (!args.sandbox.hide.is_empty(), "--hide"),
        (
            args.sandbox.system_root != std::path::Path::new("/"),
            "--system-root",
        ),
        (args.sandbox.rootless, "--rootless"),
        (args.sandbox.hermetic, "--hermetic"),
        (!args.sandbox.allow.is_empty(), "--allow"),
        (args.sandbox.net, "--net"),
        (args.keep_failed, "--keep-failed"),
        (args.no_cache, "--no-cache"),
        (args.cache_failures, "--cache-failures"),
        (args.sandbox.store.is_some(), "--store"),
        (args.sandbox.cache.is_some(), "--cache"),
        (args.sandbox.cache_read_only, "--cache-read-only"),
        (args.sandbox.remote.is_some(), "--remote"),
        (args.sandbox.remote_upload, "--remote-upload"),
        (args.sandbox.remote_timeout.is_some(), "--remote-timeout"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        anyhow::bail!(
            "{flag} cannot be used inside a build: the thunks of a build share the build's \
             settings (give it to `cot build` instead)"
        );
    }
    let rules = parse_rules(&args.sandbox.env)?;
    let env = thunk_env(crate::build::client::request_env(), &rules, true);
    crate::build::client::run(args.command, env, args.bg)
}
