//! `cot __thunk`: the process that runs one thunk of a build for the coordinator.
//!
//! The coordinator is multi-threaded, and a sandbox may only be launched by a single-threaded
//! process; so every thunk that runs gets a fresh `cot __thunk` process, whose stdin is a
//! socket to the coordinator. It reads its [`Job`], runs the command in the sandbox with a
//! listening socket bound at `/dev/cot`, and relays the command's child requests (`cot run`,
//! `cot wait` inside it) to the coordinator. Before a child is requested, the thunk's writes so
//! far are published (iThreads' release: the child sees them); after a child ends, the
//! thunk's view is told about the paths the child wrote. The first lookup of a path another
//! thunk of the build produces (the job lists them) waits until the coordinator says that
//! thunk is done; a lookup refused (a cycle) fails with `EIO`, and so does the thunk. When the
//! command ends, the worker records the trace (with the child requests) and reports it.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::Context;
use parking_lot::Mutex;

use super::engine::{CallLog, ChildOutcome};
use super::protocol::{
    path_hash, read_message, write_message, ChildDone, FromClient, FromWorker, Job, ToClient,
    ToWorker,
};
use crate::cas::Cas;
use crate::engine::{memo, RunOptions, Thunk};
use crate::server::Client;
use crate::store::model::Declared;

/// Entry point of `cot __thunk`.
pub fn main() -> anyhow::Result<u8> {
    // Nothing outlives the build: if the coordinator dies (even by SIGKILL), so does this
    // worker, and with it the sandbox (whose init dies with its parent).
    let parent = nix::unistd::getppid();
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("cannot tie the worker to the build")?;
    if nix::unistd::getppid() != parent {
        anyhow::bail!("the build ended before its worker started");
    }
    // The channel to the coordinator arrives as stdin; the command gets /dev/null instead.
    let channel = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot take the coordinator's channel")?;
    let null = std::fs::File::open("/dev/null").context("cannot open /dev/null")?;
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0).context("cannot replace stdin")?;
    drop(null);
    let mut channel = UnixStream::from(channel);
    let job: Job = read_message(&mut channel).context("cannot read the job")?;
    let report = match run(job, &channel) {
        Ok(report) => report,
        Err(e) => FromWorker::Failed {
            message: format!("{e:#}"),
        },
    };
    write_message(&mut &channel, &report).context("cannot report to the coordinator")?;
    Ok(0)
}

fn run(job: Job, channel: &UnixStream) -> anyhow::Result<FromWorker> {
    let thunk = Thunk {
        argv: job.argv,
        env: job.env,
        cwd: job.cwd,
        system_root: job.system_root,
        writable: job.writable,
        hide: job.hide,
        rootless: job.rootless,
        target: job.target,
        net: job.net,
        hermetic: job.hermetic,
    };
    // A short path for the socket (bind() takes at most 107 bytes); it is bound into the
    // sandbox by its real path, which may be long.
    let socket_dir = tempfile::Builder::new()
        .prefix("cot-thunk-")
        .tempdir()
        .context("cannot create a directory for the thunk's socket")?;
    let socket = socket_dir.path().join("cot.sock");
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let relay = Arc::new(Relay {
        channel: Mutex::new(channel.try_clone().context("cannot share the channel")?),
        waiting: Mutex::new(HashMap::new()),
        next: Mutex::new(0),
        calls: CallLog::default(),
        background: Mutex::new(Vec::new()),
        view: Mutex::new(None),
        first_judgment: Mutex::new(HashMap::new()),
        wanted: job.wanted.iter().copied().collect(),
        asked: Mutex::new(HashSet::new()),
        wants: Mutex::new(HashMap::new()),
        refused: Mutex::new(false),
    });
    let gate = (!relay.wanted.is_empty()).then(|| {
        let relay = relay.clone();
        cot_fusefs::LookupGate(Arc::new(move |path| relay.want(path)))
    });
    let options = RunOptions {
        keep_failed: false,
        no_passthrough: job.no_passthrough,
        quiet: !job.show_output,
        socket: Some(socket),
        gate,
        capture: Vec::new(),
    };
    let reader = channel.try_clone().context("cannot share the channel")?;
    // Threads start only once the sandbox is launched (it must be cloned from a
    // single-threaded process).
    let mut ran = crate::engine::execute_with(&thunk, &options, |handle| {
        *relay.view.lock() = Some(handle.clone());
        let dispatcher = relay.clone();
        std::thread::spawn(move || dispatcher.dispatch(reader));
        let server = relay.clone();
        std::thread::spawn(move || server.serve(listener));
    })?;
    // Children still running when the command ended: their results are awaited (and kept in
    // the trace) so nothing the build started is lost.
    relay.wait_background();
    // A lookup it was refused (the coordinator says why) fails it, whatever it made of that.
    if *relay.refused.lock() && ran.outcome == cot_sandbox::Outcome::Exited(0) {
        ran.outcome = cot_sandbox::Outcome::Exited(1);
    }
    let mut client = Client::connect(&job.store)?;
    let cas = Cas::open(&job.cas)?;
    let recorded = memo::record_run(
        &ran,
        &thunk,
        job.key,
        &options,
        job.check,
        &mut client,
        &cas,
        Some(relay.calls.finish()),
    )?;
    Ok(FromWorker::Finished {
        exit_code: ran.outcome.exit_code(),
        recorded: recorded.map(|(id, trace)| (id, Box::new(trace))),
        message: crate::engine::outcome_message(&ran.outcome),
        interrupted: matches!(ran.outcome, cot_sandbox::Outcome::Interrupted(_)),
    })
}

/// Relays the thunk's child requests to the coordinator.
struct Relay {
    channel: Mutex<UnixStream>,
    /// Requests sent, waiting for their [`ChildDone`].
    waiting: Mutex<HashMap<u64, mpsc::Sender<ChildDone>>>,
    next: Mutex<u64>,
    calls: CallLog,
    /// Background children not waited for yet: their index in `calls` and their result.
    background: Mutex<Vec<(u32, mpsc::Receiver<ChildDone>)>>,
    view: Mutex<Option<cot_fusefs::Handle>>,
    /// Per (directory, make target): whether plain make would have skipped its recipe, as
    /// judged at its first line.
    first_judgment: Mutex<HashMap<(PathBuf, String), bool>>,
    /// The paths other thunks produce (by [`path_hash`]), and those asked for already.
    wanted: HashSet<u64>,
    asked: Mutex<HashSet<PathBuf>>,
    /// Wants sent, waiting for their answer.
    wants: Mutex<HashMap<u64, mpsc::Sender<Option<String>>>>,
    /// A want was refused.
    refused: Mutex<bool>,
}

impl Relay {
    /// Reads the coordinator's answers and hands each to its request.
    fn dispatch(&self, mut reader: UnixStream) {
        while let Ok(answer) = read_message::<ToWorker>(&mut reader) {
            match answer {
                ToWorker::Child(done) => {
                    if let Some(sender) = self.waiting.lock().remove(&done.request) {
                        let _ = sender.send(done);
                    }
                }
                ToWorker::Wanted { request, error } => {
                    if let Some(sender) = self.wants.lock().remove(&request) {
                        let _ = sender.send(error);
                    }
                }
            }
        }
        // The coordinator is gone: every waiting request fails.
        self.waiting.lock().clear();
        self.wants.lock().clear();
    }

    /// The gate of the thunk's lookups: the first lookup of a wanted path waits for the
    /// coordinator's answer (on a FUSE thread; the answer comes through `dispatch`).
    fn want(&self, path: &Path) -> io::Result<()> {
        if !self.wanted.contains(&path_hash(path)) || !self.asked.lock().insert(path.into()) {
            return Ok(());
        }
        let request = {
            let mut next = self.next.lock();
            *next += 1;
            *next
        };
        let (sender, receiver) = mpsc::channel();
        self.wants.lock().insert(request, sender);
        let message = FromWorker::Want {
            request,
            path: path.to_path_buf(),
        };
        write_message(&mut *self.channel.lock(), &message)?;
        match receiver.recv() {
            Ok(None) => Ok(()),
            Ok(Some(message)) => {
                *self.refused.lock() = true;
                Err(io::Error::other(message))
            }
            // The build is gone: the lookup goes on, the thunk ends soon anyway.
            Err(_) => Ok(()),
        }
    }

    /// Accepts the clients inside the thunk, one thread each.
    fn serve(self: Arc<Self>, listener: UnixListener) {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let relay = self.clone();
            std::thread::spawn(move || {
                let _ = relay.client(stream);
            });
        }
    }

    fn client(&self, mut stream: UnixStream) -> io::Result<()> {
        let request: FromClient = read_message(&mut stream)?;
        let answer = match request {
            FromClient::Run {
                argv,
                env,
                cwd,
                target,
                declared,
                background,
                up_to_date,
            } => match self.request(argv, env, cwd, target, declared, up_to_date) {
                Err(message) => ToClient::Refused { message },
                Ok((index, receiver)) if background => {
                    self.background.lock().push((index, receiver));
                    ToClient::Started
                }
                Ok((index, receiver)) => self.finish(index, receiver),
            },
            FromClient::Wait => self.wait_background(),
            FromClient::Rules {
                argv,
                env,
                cwd,
                targets,
            } => {
                let message = FromWorker::Rules {
                    argv,
                    env,
                    cwd,
                    targets,
                };
                match write_message(&mut *self.channel.lock(), &message) {
                    Ok(()) => ToClient::Started,
                    Err(e) => ToClient::Refused {
                        message: format!("cannot reach the build: {e}"),
                    },
                }
            }
        };
        write_message(&mut stream, &answer)
    }

    /// Publishes the thunk's writes so far, then sends the request.
    fn request(
        &self,
        argv: Vec<std::ffi::OsString>,
        env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
        cwd: PathBuf,
        target: Option<String>,
        declared: Option<Declared>,
        up_to_date: bool,
    ) -> Result<(u32, mpsc::Receiver<ChildDone>), String> {
        // make runs the lines of a target's recipe one after the other: the first one says
        // whether plain make would have run the recipe (a later line finds the target
        // already rebuilt by an earlier one).
        let skip_if_new = match &target {
            Some(target) => *self
                .first_judgment
                .lock()
                .entry((cwd.clone(), target.clone()))
                .or_insert(up_to_date),
            None => false,
        };
        let view = self.view.lock().clone();
        if let Some(view) = view {
            view.publish()
                .map_err(|e| format!("cannot publish the thunk's writes: {e}"))?;
        }
        let request = {
            let mut next = self.next.lock();
            *next += 1;
            *next
        };
        let (sender, receiver) = mpsc::channel();
        self.waiting.lock().insert(request, sender);
        let index = self.calls.start(skip_if_new, declared.clone());
        let message = FromWorker::Child {
            request,
            argv,
            env,
            cwd,
            target,
            declared,
            skip_if_new,
        };
        write_message(&mut *self.channel.lock(), &message)
            .map_err(|e| format!("cannot reach the build: {e}"))?;
        Ok((index, receiver))
    }

    /// Waits for a child's result, records it and makes the view show what it wrote.
    fn finish(&self, index: u32, receiver: mpsc::Receiver<ChildDone>) -> ToClient {
        let Ok(done) = receiver.recv() else {
            return ToClient::Refused {
                message: "the build ended".into(),
            };
        };
        let outcome = ChildOutcome {
            id: done.id,
            exit_code: done.exit_code,
            stdout: done.stdout_digest,
            stderr: done.stderr_digest,
            writes: done.writes.into_iter().collect(),
            message: done.message.clone(),
        };
        self.calls.end(index, &outcome);
        // Not under the lock: the kernel may wait for a lookup of the thunk (one waiting for
        // a file another thunk makes) before it drops an entry.
        let view = self.view.lock().clone();
        if let Some(view) = view {
            // What the child wrote, the thunk sees, hermetic or not.
            view.reveal(&done.written);
            if let Err(e) = view.invalidate(&done.written) {
                eprintln!("cot: {e}");
            }
        }
        ToClient::Done {
            exit_code: done.exit_code,
            stdout: done.stdout,
            stderr: done.stderr,
            message: done.message,
        }
    }

    /// `cot wait`: every background child so far, in the order they were started. The exit
    /// status is the first non-zero one.
    fn wait_background(&self) -> ToClient {
        let pending = std::mem::take(&mut *self.background.lock());
        let (mut exit_code, mut stdout, mut stderr, mut message) =
            (0, Vec::new(), Vec::new(), None);
        for (index, receiver) in pending {
            if let ToClient::Done {
                exit_code: code,
                stdout: out,
                stderr: err,
                message: m,
            } = self.finish(index, receiver)
            {
                if exit_code == 0 {
                    exit_code = code;
                }
                stdout.extend(out);
                stderr.extend(err);
                message = message.or(m);
            }
        }
        ToClient::Done {
            exit_code,
            stdout,
            stderr,
            message,
        }
    }
}
