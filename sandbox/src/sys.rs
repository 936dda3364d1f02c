//! Every system call the sandbox makes that has no safe wrapper in `nix`: the only `unsafe`
//! code of the crate. Each function is a thin shim whose preconditions are stated on its
//! `unsafe` blocks; the callers stay in safe Rust.
//!
//! Async-signal-safety: `clone_with_pidfd` and `fork` duplicate only the calling thread. They are
//! called by `launch`, which first checks that the process has a single thread, and by the
//! sandbox's init, itself such a copy; no other thread can hold a lock (malloc's, stdio's) at
//! that moment, so the child may allocate and use the standard library freely.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// Which side of a fork-like clone the caller is on.
pub(crate) enum Forked {
    Child,
    Parent { pid: i32, pidfd: OwnedFd },
}

/// `struct clone_args` of `clone3(2)` (`CLONE_ARGS_SIZE_VER2`), the same on every architecture.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Creates a child with fork semantics (a copy of the address space, continuing from here on a
/// copy of the stack) in the namespaces of `namespaces` (`CLONE_NEW*` flags), and a pidfd for
/// it. Uses `clone3`, falling back to `clone` where a seccomp policy answers `ENOSYS`.
pub(crate) fn clone_with_pidfd(namespaces: libc::c_int) -> io::Result<Forked> {
    let flags = namespaces | libc::CLONE_PIDFD;
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        // CLONE_* flags and signal numbers are small positive constants.
        flags: flags as u64,
        pidfd: &raw mut pidfd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed and outlives the call; `pidfd`
    // is a valid c_int the kernel writes. A null stack gives fork semantics: the child runs on
    // its own copy of this stack, so returning twice from this frame is sound (the two copies
    // share no memory). The caller guarantees the process is single-threaded (module comment).
    let mut ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            mem::size_of::<CloneArgs>(),
        )
    };
    if ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        // SAFETY: as above; with CLONE_PIDFD the legacy clone writes the pidfd through its
        // `parent_tid` argument, which points to `pidfd`.
        ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (flags | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                &raw mut pidfd,
                0usize,
                0usize,
            )
        };
    }
    match check(ret)? {
        0 => Ok(Forked::Child),
        pid => {
            let pid =
                i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            // SAFETY: on success the kernel stored a new descriptor that nothing else owns.
            let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
            Ok(Forked::Parent { pid, pidfd })
        }
    }
}

/// `fork()` done as a raw `clone(SIGCHLD)`: `Some(pid)` in the parent, `None` in the child.
/// Bypasses glibc's `fork` wrapper so that no atfork handler runs in the init, whose glibc
/// thread descriptor describes a thread of the caller's pid namespace.
pub(crate) fn fork() -> io::Result<Option<i32>> {
    // SAFETY: a null stack gives fork semantics (see `clone_with_pidfd`); the init calling this
    // is single-threaded.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match check(ret)? {
        0 => Ok(None),
        pid => {
            Ok(Some(i32::try_from(pid).map_err(|_| {
                io::Error::from_raw_os_error(libc::EOVERFLOW)
            })?))
        }
    }
}

/// Ends the process at once (`_exit`): no atexit handler, no flush of buffers copied from the
/// caller, no destructor.
pub(crate) fn exit(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it never returns.
    unsafe { libc::_exit(code) }
}

/// Sends SIGKILL to the process of `pidfd`; killing an init ends its whole pid namespace.
pub(crate) fn pidfd_kill(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor; null siginfo means "as kill(2) would".
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    check(ret).map(drop)
}

/// Takes ownership of a descriptor received with `SCM_RIGHTS`.
pub(crate) fn own_received_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `raw` in our table for this message only; nothing else
    // refers to it.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Moves `fd` to descriptor number `target` (close-on-exec), replacing whatever was there.
pub(crate) fn move_fd(fd: OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() == target {
        return Ok(fd);
    }
    let raw = nix::unistd::dup3(fd.as_raw_fd(), target, nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: dup3 made `raw` a new descriptor; any previous owner of that number was
    // implicitly closed, which is the purpose (callers own the whole descriptor table).
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Closes every descriptor from `first` on (`close_range`, Linux 5.9), or only marks them
/// close-on-exec (Linux 5.11). Callers must not hold an `OwnedFd` for any of them when closing.
pub(crate) fn close_from(first: u32, only_mark_cloexec: bool) -> io::Result<()> {
    let flags = if only_mark_cloexec {
        libc::CLOSE_RANGE_CLOEXEC
    } else {
        0
    };
    // SAFETY: affects only the descriptor table; callers own every descriptor in the range.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, flags) };
    check(ret).map(drop)
}

/// Sets `IFF_UP` on `lo` of the current network namespace.
pub(crate) fn loopback_up() -> io::Result<()> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data for which all-zero bytes are valid.
    let mut request: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads `ifr_name` and writes `ifr_flags` of a valid ifreq.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut request) }.into())?;
    // SAFETY: the union member the kernel just wrote.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads a valid ifreq.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const request) }.into())
        .map(drop)
}

/// Restores every signal's default disposition and unblocks all signals, as a freshly
/// started program expects (`SIG_IGN` would otherwise survive `execve`).
pub(crate) fn reset_signals() -> io::Result<()> {
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installs SIG_DFL, which refers to no code of ours. glibc refuses its
        // internal real-time signals with EINVAL, which is fine to ignore.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )?;
    Ok(())
}

/// Makes SIGCHLD's disposition the default, so that children become reapable zombies even
/// when the caller ignored SIGCHLD.
pub(crate) fn default_sigchld() -> io::Result<()> {
    // SAFETY: installs SIG_DFL, which refers to no code of ours.
    if unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives the process a new, empty session keyring, so that the keys of the caller's session
/// (credentials of network filesystems, for instance) are out of reach. Kernels built without
/// keys have nothing to hide.
pub(crate) fn join_new_session_keyring() -> io::Result<()> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_int = 1;
    // SAFETY: a null name asks for an anonymous keyring; no memory is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    match check(ret) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Ok(()),
        other => other.map(drop),
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Limits the bounding, effective, permitted and inheritable sets to `keep` (bit N for
/// capability N) and empties the ambient set, so that no later `execve` regains the others.
pub(crate) fn limit_capabilities(keep: u64) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only. EINVAL means a kernel before ambient
    // capabilities (4.3), which then has none to clear.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if ret < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(io::Error::last_os_error());
    }
    for cap in 0..64u32 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if ret < 0 {
            // EINVAL: past the last capability this kernel knows.
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(io::Error::last_os_error());
        }
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 takes a header and two data structs, all valid for writing.
    check(unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) })?;
    // Truncation is the point: the low and high 32 bits of the mask.
    let halves = [keep as u32, (keep >> 32) as u32];
    for (set, keep) in data.iter_mut().zip(halves) {
        set.permitted &= keep;
        set.effective &= keep;
        set.inheritable = 0;
    }
    // SAFETY: as for capget, reading instead of writing.
    check(unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) }).map(drop)
}

/// Installs the seccomp filter of [`terminal_filter`]. Needs `PR_SET_NO_NEW_PRIVS` first.
pub(crate) fn deny_terminal_injection() -> io::Result<()> {
    let mut filter = terminal_filter();
    let program = libc::sock_fprog {
        len: u16::try_from(filter.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `program` points to `filter`, alive for the call; the kernel copies it.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &raw const program,
        )
    };
    check(ret.into()).map(drop)
}

#[cfg(target_arch = "x86_64")]
const FILTER_ARCHES: (u32, &[u32], u32, u32) = (
    0xC000_003E,                                // AUDIT_ARCH_X86_64
    &[16, 0x4000_0000 | 16, 0x4000_0000 | 514], // ioctl, and ioctl of x32 (both numbers)
    0x4000_0003,                                // AUDIT_ARCH_I386
    54,                                         // ioctl of i386
);
#[cfg(target_arch = "aarch64")]
const FILTER_ARCHES: (u32, &[u32], u32, u32) = (
    0xC000_00B7, // AUDIT_ARCH_AARCH64
    &[29],       // ioctl
    0x4000_0028, // AUDIT_ARCH_ARM
    54,          // ioctl of arm
);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the sandbox's seccomp filter knows the ioctl numbers of x86_64 and aarch64 only");

const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541C;

/// A classic BPF seccomp program failing `ioctl(TIOCSTI)` and `ioctl(TIOCLINUX)` with EPERM for
/// native and compat processes and allowing everything else. The command shares the caller's
/// terminal (and process group, for job control), and both requests push input into that
/// terminal, which the caller's shell reads after cot exits (CVE-2017-5226 against bubblewrap).
pub(crate) fn terminal_filter() -> Vec<libc::sock_filter> {
    const LD_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    // Offsets in struct seccomp_data: nr, arch, then args[] from 16 (the low half of args[1],
    // the ioctl request, at 24 on these little-endian architectures).
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG1_LOW: u32 = 24;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let (native_arch, native_ioctl, compat_arch, compat_ioctl) = FILTER_ARCHES;
    let n = u8::try_from(native_ioctl.len()).unwrap_or(u8::MAX);
    // Layout (indices): 0 ld arch; 1 native?; 2 ld nr; 3.. native ioctl numbers; 3+n compat?;
    // 4+n ld nr; 5+n compat ioctl?; 6+n ld request; 7+n TIOCSTI?; 8+n TIOCLINUX?; 9+n allow;
    // 10+n deny. Jump offsets count from the next instruction.
    let mut program = vec![
        op(LD_ABS, 0, 0, ARCH),
        op(JEQ, 0, n + 1, native_arch),
        op(LD_ABS, 0, 0, NR),
    ];
    for (i, &nr) in (0u8..).zip(native_ioctl) {
        let not_matched = if i + 1 == n { 6 } else { 0 };
        program.push(op(JEQ, n + 2 - i, not_matched, nr));
    }
    program.extend([
        op(JEQ, 0, 5, compat_arch),
        op(LD_ABS, 0, 0, NR),
        op(JEQ, 0, 3, compat_ioctl),
        op(LD_ABS, 0, 0, ARG1_LOW),
        op(JEQ, 2, 0, TIOCSTI),
        op(JEQ, 1, 0, TIOCLINUX),
        op(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
        op(RET, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ]);
    program
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes the mount at `path` and every mount below it read-only, nosuid, nodev and noexec
/// (`mount_setattr` with `AT_RECURSIVE`, Linux 5.12).
pub(crate) fn make_tree_read_only(path: &CStr) -> io::Result<()> {
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    const MOUNT_ATTR_NOEXEC: u64 = 0x8;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is NUL-terminated and `attr` a valid mount_attr of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE,
            &raw const attr,
            mem::size_of::<MountAttr>(),
        )
    };
    check(ret).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program of the shape `terminal_filter` emits (loads, equality jumps,
    /// returns) on one system call.
    fn run(program: &[libc::sock_filter], arch: u32, nr: u32, request: u32) -> u32 {
        let mut pc = 0;
        let mut acc = 0;
        loop {
            let insn = program[pc];
            match insn.code {
                0x20 => {
                    acc = match insn.k {
                        0 => nr,
                        4 => arch,
                        24 => request,
                        k => panic!("load of {k}"),
                    }
                }
                0x15 => pc += usize::from(if acc == insn.k { insn.jt } else { insn.jf }),
                0x06 => return insn.k,
                code => panic!("opcode {code:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn the_terminal_filter_denies_injection_only() {
        let program = terminal_filter();
        let deny = libc::SECCOMP_RET_ERRNO | 1;
        let allow = libc::SECCOMP_RET_ALLOW;
        let (native, native_ioctl, compat, compat_ioctl) = FILTER_ARCHES;
        for &nr in native_ioctl {
            assert_eq!(run(&program, native, nr, TIOCSTI), deny);
            assert_eq!(run(&program, native, nr, TIOCLINUX), deny);
            assert_eq!(
                run(&program, native, nr, 0x5401),
                allow,
                "TCGETS stays allowed"
            );
        }
        assert_eq!(run(&program, compat, compat_ioctl, TIOCSTI), deny);
        assert_eq!(run(&program, compat, compat_ioctl, 0x5401), allow);
        assert_eq!(
            run(&program, native, 1, TIOCSTI),
            allow,
            "other system calls pass"
        );
        assert_eq!(run(&program, compat, 4, TIOCSTI), allow);
        assert_eq!(run(&program, 0x1234, compat_ioctl, TIOCSTI), allow);
    }
}
