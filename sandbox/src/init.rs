//! The sandbox's init: the cloned child, pid 1 of the new pid namespace. It mounts the FUSE
//! root, hands its descriptor to the caller, completes the root once it is served, pivots into
//! it, starts the command and reaps every process until the command ends.
//!
//! Async-signal-safety: the init is a copy of a single-threaded process (checked by `launch`
//! before cloning), and the command a copy of the single-threaded init, so no lock can be held
//! by a thread that does not exist here: both may allocate and use the standard library. They
//! never return into the caller's code: they end with `_exit`, so no destructor of the
//! caller's objects runs twice.

use std::ffi::CString;
use std::fs;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::Signal;
use nix::sys::socket::{recv, sendmsg, ControlMessage, MsgFlags, UnixAddr};
use nix::sys::stat::{fstat, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, pivot_root, sethostname};

use crate::exec::Program;
use crate::plan::{Step, MOUNT_POINTS, ROOT_PLAN};
use crate::protocol::{Message, MAX_MESSAGE};
use crate::sys::{self, exit as _exit};

/// The init's copy of what to build, converted before cloning.
#[derive(Debug)]
pub(crate) struct InitPlan {
    pub(crate) user_namespace: bool,
    /// The caller's effective uid and gid: mapped to themselves in rootless mode, and the owner
    /// of the FUSE mount in both modes.
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) fsname: String,
    pub(crate) hostname: Option<String>,
    pub(crate) cwd: PathBuf,
    pub(crate) tmp_keep: Vec<PathBuf>,
    /// Directories made empty, mode 0700, in the private /tmp.
    pub(crate) tmp_dirs: Vec<PathBuf>,
    /// The caller's network namespace is shared: there is no loopback of our own to set up.
    pub(crate) host_network: bool,
    pub(crate) stdout: Option<RawFd>,
    pub(crate) stderr: Option<RawFd>,
    /// The caller's build socket, a host path, bound at [`crate::plan::BUILD_SOCKET`].
    pub(crate) socket: Option<PathBuf>,
    pub(crate) program: Program,
}

/// Private to the init's mount namespace; the tmpfs mounted here holds the new root's mount
/// point and disappears with the old root.
const STAGING: &str = "/tmp";
const NEW_ROOT: &str = "/tmp/root";
/// Where the init keeps its end of the control socket; every higher descriptor is closed.
const SOCKET_FD: RawFd = 3;
/// The stage whose failure means `/dev/fuse` is unusable (see `preflight`).
pub(crate) const OPEN_FUSE_STAGE: &str = "open /dev/fuse";

/// Capabilities the command keeps when it runs as uid 0 (those of a Docker container, without
/// MKNOD and NET_RAW). Notably absent: SYS_ADMIN (mounts), DAC_READ_SEARCH
/// (`open_by_handle_at` reaches files outside any root), SYS_PTRACE, SYS_MODULE, SYS_RAWIO,
/// NET_ADMIN, SYS_TIME, SYS_BOOT, BPF, PERFMON, MAC_*, SYSLOG.
const KEPT_CAPABILITIES: u64 = (1 << 0) // CHOWN
    | (1 << 1) // DAC_OVERRIDE
    | (1 << 3) // FOWNER
    | (1 << 4) // FSETID
    | (1 << 5) // KILL
    | (1 << 6) // SETGID
    | (1 << 7) // SETUID
    | (1 << 8) // SETPCAP
    | (1 << 10) // NET_BIND_SERVICE
    | (1 << 18) // SYS_CHROOT
    | (1 << 29) // AUDIT_WRITE
    | (1 << 31); // SETFCAP

/// A failed step, reported to the caller as `Message::SetupFailed`.
struct Failure {
    stage: String,
    path: Option<PathBuf>,
    errno: i32,
}

trait At<T> {
    fn at(self, stage: &str, path: Option<&str>) -> Result<T, Failure>;
}

impl<T> At<T> for nix::Result<T> {
    fn at(self, stage: &str, path: Option<&str>) -> Result<T, Failure> {
        self.map_err(|errno| Failure {
            stage: stage.into(),
            path: path.map(PathBuf::from),
            errno: errno as i32,
        })
    }
}

impl<T> At<T> for io::Result<T> {
    fn at(self, stage: &str, path: Option<&str>) -> Result<T, Failure> {
        self.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
            .map_err(Errno::from_raw)
            .at(stage, path)
    }
}

fn send(socket: &OwnedFd, message: &Message, fd: Option<RawFd>) -> nix::Result<()> {
    let bytes = message.encode();
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let control: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<UnixAddr>(
        socket.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(drop)
}

fn report_failure(socket: &OwnedFd, failure: Failure) -> ! {
    let Failure { stage, path, errno } = failure;
    // Nobody is left to tell if the caller is gone.
    let _ = send(socket, &Message::SetupFailed { stage, path, errno }, None);
    _exit(1)
}

/// The init's whole life. `socket` is its end of the control socket; the caller's end must
/// already be closed in this process.
pub(crate) fn run(plan: &InitPlan, socket: OwnedFd) -> ! {
    // First, so that the caller's death from now on kills us; if it died before, the socket
    // reaches end-of-file and `wait_for_go` ends us.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
        _exit(1);
    }
    // The command's outputs, when the caller gave its own, take their numbers before anything
    // is moved or closed (they are 3 or above, see `Spec::validate`).
    for (given, standard) in [(plan.stdout, 1), (plan.stderr, 2)] {
        if let Some(fd) = given {
            if nix::unistd::dup2(fd, standard).is_err() {
                _exit(1);
            }
        }
    }
    let Ok(socket) = sys::move_fd(socket, SOCKET_FD) else {
        _exit(1)
    };
    if let Err(failure) = prepare_descriptors() {
        report_failure(&socket, failure);
    }
    // Before the staging tmpfs covers the host's /tmp, where the socket may live.
    let build_socket = match open_build_socket(plan) {
        Ok(build_socket) => build_socket,
        Err(failure) => report_failure(&socket, failure),
    };
    let fuse = match mount_root(plan) {
        Ok(fuse) => fuse,
        Err(failure) => report_failure(&socket, failure),
    };
    if send(&socket, &Message::RootMounted, Some(fuse.as_raw_fd())).is_err() {
        _exit(1);
    }
    // The caller holds the only descriptor of the connection from now on, so that its death
    // aborts the filesystem.
    drop(fuse);
    match wait_for_go(&socket) {
        Ok(true) => {}
        Ok(false) => _exit(1),
        Err(failure) => report_failure(&socket, failure),
    }
    if let Err(failure) = complete_root(plan, build_socket.as_ref()) {
        report_failure(&socket, failure);
    }
    // Bound by now; the command must not inherit the descriptor.
    drop(build_socket);
    supervise(plan, &socket)
}

/// Leaves only the control socket and descriptors 0, 1 and 2, none of them a directory (an
/// inherited directory descriptor would lead outside the new root through `openat("..")` or
/// `/proc/*/fd`). A closed standard descriptor becomes `/dev/null`, so that nothing opened
/// later takes its number.
fn prepare_descriptors() -> Result<(), Failure> {
    close_from(SOCKET_FD + 1, false).at("close inherited descriptors", None)?;
    for fd in 0..=2 {
        let replace = match fstat(fd) {
            Ok(stat) => SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR,
            Err(Errno::EBADF) => true,
            Err(errno) => return Err(errno).at("inspect standard descriptors", None),
        };
        if replace {
            let null = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .at("open /dev/null", Some("/dev/null"))?;
            let raw = null.into_raw_fd();
            if raw != fd {
                nix::unistd::dup2(raw, fd).at("replace a standard descriptor", None)?;
                nix::unistd::close(raw).at("replace a standard descriptor", None)?;
            }
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
                .at("replace a standard descriptor", None)?;
        }
    }
    Ok(())
}

/// Closes (or marks close-on-exec) every descriptor from `first` on: `close_range`, or one by
/// one from `/proc/self/fd` on kernels without it (before 5.9, or 5.11 for marking).
fn close_from(first: RawFd, only_mark_cloexec: bool) -> io::Result<()> {
    match sys::close_from(u32::try_from(first).unwrap_or(0), only_mark_cloexec) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) => {}
        other => return other,
    }
    let open: Vec<RawFd> = fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= first)
        .collect();
    // The listing's own descriptor is among them, already closed: EBADF is expected.
    for fd in open {
        let done = if only_mark_cloexec {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
        } else {
            nix::unistd::close(fd)
        };
        match done {
            Ok(()) | Err(Errno::EBADF) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

/// Opens the caller's build socket, if any, as an `O_PATH` descriptor: in this mount namespace
/// (a bind mount's source must belong to it), before anything is mounted over the host's
/// paths. Anything but a socket is refused, so that no other host file can be bound in.
fn open_build_socket(plan: &InitPlan) -> Result<Option<OwnedFd>, Failure> {
    let Some(path) = &plan.socket else {
        return Ok(None);
    };
    let shown = path.to_string_lossy();
    let stage = "open the build socket";
    let fd: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .at(stage, Some(&shown))?
        .into();
    let stat = fstat(fd.as_raw_fd()).at(stage, Some(&shown))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(Errno::ENOTSOCK).at(stage, Some(&shown));
    }
    Ok(Some(fd))
}

/// Maps the ids (rootless mode), makes this mount namespace private, and mounts the FUSE root
/// on the staging tmpfs. Returns the `/dev/fuse` descriptor of the mount.
fn mount_root(plan: &InitPlan) -> Result<OwnedFd, Failure> {
    if plan.user_namespace {
        // Writing gid_map unprivileged needs setgroups denied first.
        fs::write("/proc/self/setgroups", "deny")
            .at("deny setgroups", Some("/proc/self/setgroups"))?;
        fs::write("/proc/self/uid_map", format!("{0} {0} 1\n", plan.uid))
            .at("map the user id", Some("/proc/self/uid_map"))?;
        fs::write("/proc/self/gid_map", format!("{0} {0} 1\n", plan.gid))
            .at("map the group id", Some("/proc/self/gid_map"))?;
    }
    // Nothing mounted from here on may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .at("make every mount private", Some("/"))?;
    let quiet = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some("tmpfs"),
        STAGING,
        Some("tmpfs"),
        quiet,
        Some("mode=0755"),
    )
    .at("mount the staging tmpfs", Some(STAGING))?;
    fs::DirBuilder::new()
        .mode(0o755)
        .create(NEW_ROOT)
        .at("create the root mount point", Some(NEW_ROOT))?;
    let fuse: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .at(OPEN_FUSE_STAGE, Some("/dev/fuse"))?
        .into();
    let options = format!(
        "fd={},rootmode=40000,user_id={},group_id={},allow_other,default_permissions",
        fuse.as_raw_fd(),
        plan.uid,
        plan.gid
    );
    mount(
        Some(plan.fsname.as_str()),
        NEW_ROOT,
        Some("fuse"),
        quiet,
        Some(options.as_str()),
    )
    .at("mount the fuse root", Some("/"))?;
    Ok(fuse)
}

/// `Ok(false)` when the caller closed its end instead of saying go.
fn wait_for_go(socket: &OwnedFd) -> Result<bool, Failure> {
    let mut buffer = [0u8; MAX_MESSAGE];
    loop {
        match recv(socket.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
            Ok(0) => return Ok(false),
            Ok(len) if Message::decode(&buffer[..len]) == Some(Message::Go) => return Ok(true),
            Ok(_) => return Err(Errno::EPROTO).at("wait for the root to be served", None),
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(errno).at("wait for the root to be served", None),
        }
    }
}

/// Runs [`ROOT_PLAN`] in the staged root, makes the private directories of /tmp, pivots into
/// it and enters the working directory, then configures the new network (unless the caller's
/// is shared) and UTS namespaces.
fn complete_root(plan: &InitPlan, build_socket: Option<&OwnedFd>) -> Result<(), Failure> {
    // The root filesystem is cot's own and nothing of the sandbox has run yet, so checking the
    // mount points once is enough: none can be swapped for a symlink afterwards.
    for point in MOUNT_POINTS {
        let staged = format!("{NEW_ROOT}{point}");
        let metadata = fs::symlink_metadata(&staged).at("look up a mount point", Some(point))?;
        if !metadata.is_dir() {
            return Err(Errno::ENOTDIR).at(
                "look up a mount point (the root filesystem must provide a directory)",
                Some(point),
            );
        }
    }
    // Directories kept from the root's /tmp are bound aside before the private tmpfs covers
    // them, then bound back into it at the same path.
    let aside: Vec<String> = (0..plan.tmp_keep.len())
        .map(|i| format!("{STAGING}/keep-{i}"))
        .collect();
    for (keep, aside) in plan.tmp_keep.iter().zip(&aside) {
        let shown = keep.to_string_lossy();
        let staged = format!("{NEW_ROOT}{shown}");
        fs::create_dir(aside).at("keep a directory of /tmp", Some(&shown))?;
        mount(
            Some(staged.as_str()),
            aside.as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .at("keep a directory of /tmp", Some(&shown))?;
    }
    for step in ROOT_PLAN {
        run_step(step, build_socket).at(&step.stage(), Some(&step.inside_path()))?;
    }
    for (keep, aside) in plan.tmp_keep.iter().zip(&aside) {
        let shown = keep.to_string_lossy();
        let staged = format!("{NEW_ROOT}{shown}");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&staged)
            .at("keep a directory of /tmp", Some(&shown))?;
        mount(
            Some(aside.as_str()),
            staged.as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .at("keep a directory of /tmp", Some(&shown))?;
    }
    for dir in &plan.tmp_dirs {
        let shown = dir.to_string_lossy();
        let staged = PathBuf::from(format!("{NEW_ROOT}{shown}"));
        if let Some(parent) = staged.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .at("create a private directory in /tmp", Some(&shown))?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staged)
            .at("create a private directory in /tmp", Some(&shown))?;
    }
    chdir(NEW_ROOT).at("enter the new root", Some("/"))?;
    // The old root ends up stacked on the new one at "."; detaching it leaves no path to it.
    pivot_root(".", ".").at("pivot_root into the new root", Some("/"))?;
    umount2(".", MntFlags::MNT_DETACH).at("detach the old root", None)?;
    let cwd = plan.cwd.to_string_lossy();
    chdir(&plan.cwd).at("enter the working directory", Some(&cwd))?;
    if !plan.host_network {
        sys::loopback_up().at("bring up the loopback interface", None)?;
    }
    if let Some(hostname) = &plan.hostname {
        sethostname(hostname).at("set the host name", None)?;
    }
    Ok(())
}

/// `build_socket`: the `O_PATH` descriptor of the caller's build socket, if any.
fn run_step(step: &Step, build_socket: Option<&OwnedFd>) -> nix::Result<()> {
    let none = None::<&str>;
    let staged = |target: &str| format!("{NEW_ROOT}/{target}");
    let io_errno = |e: io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    match *step {
        Step::Mount {
            fstype,
            target,
            flags,
            data,
        } => {
            let data = (!data.is_empty()).then_some(data);
            mount(
                Some(fstype),
                staged(target).as_str(),
                Some(fstype),
                flags,
                data,
            )
        }
        Step::Sysfs { target } => {
            let target = staged(target);
            let flags =
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            match mount(Some("sysfs"), target.as_str(), Some("sysfs"), flags, none) {
                Err(Errno::EPERM | Errno::EACCES | Errno::ENODEV | Errno::EINVAL) => {
                    mount(
                        Some("/sys"),
                        target.as_str(),
                        none,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        none,
                    )?;
                    let path = CString::new(target.clone()).map_err(|_| Errno::EINVAL)?;
                    match sys::make_tree_read_only(&path) {
                        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => mount(
                            none,
                            target.as_str(),
                            none,
                            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
                            none,
                        ),
                        other => other.map_err(io_errno),
                    }
                }
                other => other,
            }
        }
        Step::Device { device, target } => {
            let target = staged(target);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o666)
                .open(&target)
                .map_err(io_errno)?;
            mount(Some(device), target.as_str(), none, MsFlags::MS_BIND, none)
        }
        Step::Socket { target } => {
            let Some(socket) = build_socket else {
                return Ok(());
            };
            let target = staged(target);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o666)
                .open(&target)
                .map_err(io_errno)?;
            // The host's /proc still: its magic link leads to the socket opened earlier.
            let source = format!("/proc/self/fd/{}", socket.as_raw_fd());
            mount(
                Some(source.as_str()),
                target.as_str(),
                none,
                MsFlags::MS_BIND,
                none,
            )
        }
        Step::Dir { target, mode } => fs::DirBuilder::new()
            .mode(mode)
            .create(staged(target))
            .map_err(io_errno),
        Step::Symlink { target, to } => {
            std::os::unix::fs::symlink(to, staged(target)).map_err(io_errno)
        }
        Step::ReadOnly { target } => {
            let target = staged(target);
            match fs::symlink_metadata(&target) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_errno(e)),
                Ok(_) => {}
            }
            mount(
                Some(target.as_str()),
                target.as_str(),
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )?;
            let flags = MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC;
            mount(none, target.as_str(), none, flags, none)
        }
        Step::Remount { target, flags } => {
            let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags;
            mount(none, staged(target).as_str(), none, flags, none)
        }
    }
}

/// Starts the command and reaps every process of the namespace until it ends; then reports
/// and exits, which makes the kernel kill whatever the command left behind.
fn supervise(plan: &InitPlan, socket: &OwnedFd) -> ! {
    // Best effort: the name only helps people reading `ps`.
    let _ = nix::sys::prctl::set_name(c"cot-init");
    let prepared = nix::sys::prctl::set_dumpable(false)
        .at("make the init undumpable", None)
        .and_then(|()| sys::default_sigchld().at("restore SIGCHLD", None));
    if let Err(failure) = prepared {
        report_failure(socket, failure);
    }
    let command = match sys::fork().at("start the command", None) {
        Ok(Some(pid)) => pid,
        Ok(None) => start_command(plan, socket),
        Err(failure) => report_failure(socket, failure),
    };
    let outcome = loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == command => {
                break Message::Exited(code)
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid.as_raw() == command => {
                break Message::Signaled(signal as i32)
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => report_failure(
                socket,
                Failure {
                    stage: "wait for the command".into(),
                    path: None,
                    errno: errno as i32,
                },
            ),
        }
    };
    let _ = send(socket, &outcome, None);
    _exit(0)
}

/// In the command's process: shed what a command must not inherit, then exec.
fn start_command(plan: &InitPlan, socket: &OwnedFd) -> ! {
    let prepared = sys::reset_signals()
        .at("reset signal handling", None)
        // Always, not only as real root: in a user namespace that maps uid 0 the command
        // would otherwise keep CAP_SYS_ADMIN over its mounts and could uncover /proc/sys.
        .and_then(|()| sys::limit_capabilities(KEPT_CAPABILITIES).at("drop capabilities", None))
        .and_then(|()| sys::join_new_session_keyring().at("join a new session keyring", None))
        .and_then(|()| nix::sys::prctl::set_no_new_privs().at("set no_new_privs", None))
        .and_then(|()| sys::deny_terminal_injection().at("install the seccomp filter", None))
        // Marked, not closed: the socket must survive a failed exec to report it.
        .and_then(|()| close_from(3, true).at("close inherited descriptors", None));
    if let Err(Failure { stage, path, errno }) = prepared {
        let _ = send(socket, &Message::SetupFailed { stage, path, errno }, None);
        _exit(125);
    }
    let (mut program, errno) = plan.program.exec();
    // A name this long failed with ENAMETOOLONG anyway; the message must fit MAX_MESSAGE.
    program.truncate(libc::PATH_MAX as usize);
    let _ = send(
        socket,
        &Message::ExecFailed {
            program,
            errno: errno as i32,
        },
        None,
    );
    _exit(127)
}
