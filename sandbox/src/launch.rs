//! The caller's side: clone the init, hand the root filesystem to `serve`, say go, and watch the
//! init and the caller's termination signals together until the command ends.

use std::ffi::OsString;
use std::fs;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    recvmsg, send, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};

use crate::exec::Program;
use crate::init::{self, InitPlan};
use crate::preflight::{explain_clone_failure, explain_setup_failure};
use crate::protocol::{Message, MAX_MESSAGE};
use crate::sys::{self, Forked};
use crate::{Error, Outcome, Spec};

/// The signals that end the sandbox instead of the caller while it runs.
const TERMINATION_SIGNALS: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// A running sandbox: its init and the channels to watch it.
///
/// Dropping it before [`Sandbox::wait`] returned kills the whole process tree and reaps it.
#[derive(Debug)]
pub struct Sandbox {
    pid: i32,
    pidfd: OwnedFd,
    socket: OwnedFd,
    signals: SignalFd,
    argv0: OsString,
    user_namespace: bool,
    /// The command's `execve` failure, reported before its exit status.
    exec_failure: Option<(Vec<u8>, i32)>,
    reaped: bool,
}

/// Starts the sandbox of `spec`.
///
/// Must be called while the process is single-threaded (it returns [`Error::Threaded`]
/// otherwise), from the thread that will call [`Sandbox::wait`]: the init is killed when the
/// thread that created it ends (`PR_SET_PDEATHSIG`).
///
/// Blocks SIGINT, SIGTERM, SIGHUP and SIGQUIT in the calling thread first, so that every thread
/// started later (by `serve`, for instance) inherits the mask and the signals wait for
/// [`Sandbox::wait`]. They stay blocked after the sandbox ends, so that what the caller does
/// next (committing the command's writes) cannot be cut in half; unblock them if needed.
///
/// `serve` receives the `/dev/fuse` descriptor of the sandbox's root, already mounted with the
/// kernel's INIT request queued; it must answer it and keep serving from other threads, then
/// return. Nothing of the sandbox touches the root before `serve` returns. The root filesystem
/// must provide the directories of [`crate::plan::MOUNT_POINTS`] and `spec.cwd`.
pub fn launch(
    spec: &Spec,
    serve: impl FnOnce(OwnedFd) -> Result<(), String>,
) -> Result<Sandbox, Error> {
    spec.validate()?;
    let plan = InitPlan {
        user_namespace: spec.user_namespace,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        fsname: spec.fuse_fsname.clone(),
        hostname: spec.hostname.clone(),
        cwd: spec.cwd.clone(),
        tmp_keep: spec.tmp_keep.clone(),
        tmp_dirs: spec.tmp_dirs.clone(),
        host_network: spec.host_network,
        stdout: spec.stdout,
        stderr: spec.stderr,
        socket: spec.socket.clone(),
        program: Program::new(spec)?,
    };
    ensure_single_threaded()?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::setup("create the control socket", None, e.into()))?;
    let signals = block_termination_signals()?;
    let mut namespaces = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWCGROUP;
    if !spec.host_network {
        namespaces |= libc::CLONE_NEWNET;
    }
    if spec.user_namespace {
        namespaces |= libc::CLONE_NEWUSER;
    }
    let (pid, pidfd) = match sys::clone_with_pidfd(namespaces) {
        Err(e) => return Err(explain_clone_failure(spec.user_namespace, e)),
        Ok(Forked::Child) => {
            // The init must see end-of-file when the caller dies, so it must not hold the
            // caller's end. Nothing else of the caller's is dropped here: `init::run` never
            // returns, and its descriptors are closed wholesale.
            drop(ours);
            init::run(&plan, theirs)
        }
        Ok(Forked::Parent { pid, pidfd }) => (pid, pidfd),
    };
    drop(theirs);
    let mut sandbox = Sandbox {
        pid,
        pidfd,
        socket: ours,
        signals,
        argv0: spec.argv.first().cloned().unwrap_or_default(),
        user_namespace: spec.user_namespace,
        exec_failure: None,
        reaped: false,
    };
    let fuse = sandbox.receive_root()?;
    serve(fuse).map_err(Error::Serve)?;
    // A failure means the init is gone; `wait` reports it.
    let _ = send(
        sandbox.socket.as_raw_fd(),
        &Message::Go.encode(),
        MsgFlags::MSG_NOSIGNAL,
    );
    Ok(sandbox)
}

fn ensure_single_threaded() -> Result<(), Error> {
    let path = "/proc/self/status";
    let status = fs::read_to_string(path)
        .map_err(|e| Error::setup("count threads", Some(path.as_ref()), e))?;
    let threads = status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse::<usize>().ok())
        .ok_or_else(|| {
            Error::setup(
                "count threads",
                Some(path.as_ref()),
                io::ErrorKind::InvalidData.into(),
            )
        })?;
    if threads != 1 {
        return Err(Error::Threaded { threads });
    }
    Ok(())
}

fn block_termination_signals() -> Result<SignalFd, Error> {
    let mut mask = SigSet::empty();
    for signal in TERMINATION_SIGNALS {
        mask.add(signal);
    }
    mask.thread_block()
        .map_err(|e| Error::setup("block termination signals", None, e.into()))?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| Error::setup("create a signalfd", None, e.into()))
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("killed by {}", signal.as_str()),
        other => format!("{other:?}"),
    }
}

impl Sandbox {
    /// The pid of the sandbox's init, in the caller's pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits for the command to end and returns how.
    ///
    /// If SIGINT, SIGTERM, SIGHUP or SIGQUIT reaches the caller meanwhile, kills the whole
    /// process tree (SIGKILL to the init ends its pid namespace), reaps it and returns
    /// [`Outcome::Interrupted`]. Either way, when this returns no process of the sandbox is
    /// left; its mount namespace, and with it the FUSE mount, goes with the last of them, which
    /// ends the connection (reads of `/dev/fuse` fail with `ENODEV`) shortly after.
    pub fn wait(mut self) -> Result<Outcome, Error> {
        loop {
            let (report, signal) = {
                let mut fds = [
                    PollFd::new(self.socket.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(Error::setup("watch the sandbox", None, e.into())),
                }
                let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]))
            };
            // Reports first: a command that ended by itself is not turned into an interruption.
            if report {
                match self.receive(MsgFlags::MSG_DONTWAIT) {
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(e) => {
                        return Err(Error::setup("read the sandbox's report", None, e.into()))
                    }
                    Ok(None) => return Err(self.lost()),
                    Ok(Some((message, _))) => {
                        if let Some(result) = self.handle(message) {
                            return result;
                        }
                    }
                }
                continue;
            }
            if signal {
                match self.signals.read_signal() {
                    Ok(Some(info)) => {
                        self.kill_and_reap();
                        return Ok(Outcome::Interrupted(info.ssi_signo as i32));
                    }
                    Ok(None) | Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(e) => {
                        return Err(Error::setup("read a termination signal", None, e.into()))
                    }
                }
            }
        }
    }

    /// `Some` when `message` ends the wait.
    fn handle(&mut self, message: Message) -> Option<Result<Outcome, Error>> {
        match message {
            Message::ExecFailed { program, errno } => {
                self.exec_failure = Some((program, errno));
                None
            }
            Message::Exited(code) => {
                self.reap();
                Some(Ok(match self.exec_failure.take() {
                    Some((_, libc::ENOENT | libc::ENOTDIR)) if code == 127 => {
                        Outcome::NotFound(self.argv0.clone())
                    }
                    Some((program, errno)) if code == 127 => Outcome::CannotExecute {
                        program: OsString::from_vec(program),
                        errno,
                    },
                    _ => Outcome::Exited(code),
                }))
            }
            Message::Signaled(signal) => {
                self.reap();
                Some(Ok(Outcome::Signaled(signal)))
            }
            Message::SetupFailed { stage, path, errno } => {
                self.kill_and_reap();
                Some(Err(explain_setup_failure(
                    self.user_namespace,
                    stage,
                    path,
                    errno,
                )))
            }
            Message::RootMounted | Message::Go => {
                self.kill_and_reap();
                Some(Err(Error::setup(
                    "read the sandbox's report",
                    None,
                    io::ErrorKind::InvalidData.into(),
                )))
            }
        }
    }

    /// Waits for the init to mount the root and returns its `/dev/fuse` descriptor.
    fn receive_root(&mut self) -> Result<OwnedFd, Error> {
        loop {
            match self.receive(MsgFlags::empty()) {
                Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::setup("read the sandbox's report", None, e.into())),
                Ok(None) => return Err(self.lost()),
                Ok(Some((Message::RootMounted, Some(fuse)))) => return Ok(fuse),
                Ok(Some((Message::SetupFailed { stage, path, errno }, _))) => {
                    self.kill_and_reap();
                    return Err(explain_setup_failure(
                        self.user_namespace,
                        stage,
                        path,
                        errno,
                    ));
                }
                Ok(Some(_)) => {
                    self.kill_and_reap();
                    return Err(Error::setup(
                        "receive the root filesystem",
                        None,
                        io::ErrorKind::InvalidData.into(),
                    ));
                }
            }
        }
    }

    /// One message and the descriptor it carried, or `None` at end-of-file (the init and the
    /// command are gone).
    fn receive(&self, flags: MsgFlags) -> nix::Result<Option<(Message, Option<OwnedFd>)>> {
        let mut buffer = vec![0u8; MAX_MESSAGE];
        let mut control = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let (len, fd) = {
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let message = recvmsg::<UnixAddr>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut control),
                flags | MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut fd = None;
            for cmsg in message.cmsgs()? {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    for raw in fds {
                        // Owning every received descriptor closes the unexpected ones.
                        let owned = sys::own_received_fd(raw);
                        fd.get_or_insert(owned);
                    }
                }
            }
            (message.bytes, fd)
        };
        if len == 0 {
            return Ok(None);
        }
        match Message::decode(&buffer[..len]) {
            Some(message) => Ok(Some((message, fd))),
            None => Err(Errno::EPROTO),
        }
    }

    fn lost(&mut self) -> Error {
        let status = self.reap();
        Error::InitLost {
            pid: self.pid,
            status,
        }
    }

    /// Waits for the init to be gone (with it, every process of its pid namespace) and says how
    /// it ended.
    fn reap(&mut self) -> String {
        loop {
            match waitid(Id::PIDFd(self.pidfd.as_fd()), WaitPidFlag::WEXITED) {
                Err(Errno::EINTR) => {}
                Ok(status) => {
                    self.reaped = true;
                    return describe(status);
                }
                Err(errno) => {
                    self.reaped = true;
                    return format!("cannot be waited for: {}", errno.desc());
                }
            }
        }
    }

    fn kill_and_reap(&mut self) {
        // ESRCH only: the init already exited and waits to be reaped.
        let _ = sys::pidfd_kill(self.pidfd.as_fd());
        self.reap();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_and_reap();
        }
    }
}
