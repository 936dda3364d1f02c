//! The sandbox checked from the inside, with real namespaces and a real FUSE root.
//!
//! This binary owns its `main`: `launch` refuses multi-threaded processes and libtest runs each
//! test on a thread of its own, so every scenario runs in a fresh process: this binary
//! re-executed with `--launch` (the caller role, `caller.rs`), which serves the sandbox's root
//! with a read-only mirror of `/` (`passthrough.rs`) and runs a probe command inside. The
//! runner (this `main`) starts the scenarios in order, as root or, for rootless mode, as the
//! unprivileged user `cot-test`, and prints results as libtest does.
//!
//! Usage: `cargo test -p cot-sandbox --test sandbox [-- FILTER]`. Scenarios needing what the
//! machine lacks print `SKIP: <reason>`; with `COT_MUST_WORK=1` they fail instead.

mod caller;
mod harness;
mod passthrough;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{
    ensure, ensure_empty, fail, namespace, require_root, Launch, Mode, Problem, Verdict, PATH,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A probe: a shell script run inside and the exact stdout it must print, in each mode.
struct Probe {
    name: &'static str,
    script: &'static str,
    root: &'static str,
    rootless: &'static str,
}

const SAME: &str = "<same as root>";

const PROBES: &[Probe] = &[
    Probe {
        name: "proc_shows_only_the_sandbox_processes",
        script: r#"for p in /proc/[0-9]*; do echo "${p#/proc/}"; done; cat /proc/1/comm"#,
        root: "1\n2\ncot-init\n",
        rootless: SAME,
    },
    Probe {
        name: "dev_holds_only_the_usual_devices",
        script: "ls -A /dev | tr '\\n' ' '; echo; ls -A /dev/pts; echo x > /dev/null && echo null-writable; \
                 head -c 4 /dev/zero | wc -c; test -c /dev/urandom && echo urandom-is-a-device; \
                 echo x > /dev/shm/probe && echo shm-writable; touch /dev/new 2>&1 | sed 's/.*: //'",
        root: "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero \nptmx\nnull-writable\n4\n\
               urandom-is-a-device\nshm-writable\nRead-only file system\n",
        rootless: SAME,
    },
    Probe {
        name: "sys_is_read_only_and_the_network_only_loopback",
        script: "ls /sys/class/net; cat /sys/class/net/lo/flags; touch /sys/kernel/probe 2>&1 | sed 's/.*: //'; \
                 grep -c : /proc/net/dev; awk '$5 == \"/sys\" {print $5, substr($6, 1, 2)}' /proc/self/mountinfo",
        root: "lo\n0x9\nRead-only file system\n1\n/sys ro\n",
        rootless: SAME,
    },
    Probe {
        name: "tmp_is_private_empty_and_writable",
        script: "ls -A /tmp | wc -l; echo data > /tmp/cot-sandbox-private-probe && cat /tmp/cot-sandbox-private-probe",
        root: "0\ndata\n",
        rootless: SAME,
    },
    Probe {
        name: "writes_outside_tmp_reach_the_root_filesystem_which_refuses",
        script: "touch /var/tmp/cot-probe 2>&1 | sed 's/.*: //'; mkdir /var/tmp/cot-probe 2>&1 | sed 's/.*: //'",
        root: "Read-only file system\nRead-only file system\n",
        // /var/tmp (1777) belongs to root, unmapped in the user namespace: the kernel refuses
        // writes into directories with an unmapped owner before asking the filesystem.
        rootless: "Permission denied\nPermission denied\n",
    },
    Probe {
        name: "no_path_leads_to_the_real_root",
        script: r#"root=$(stat -L -c %d:%i /)
            [ "$root" = "$HOST_ROOT" ] && echo "/ is the host root" || echo "/ is not the host root"
            for p in /.. /proc/self/root /proc/self/cwd/.. /proc/$$/root /proc/1/root /proc/1/cwd /proc/1/fd/0; do
              if x=$(stat -L -c %d:%i "$p" 2>/dev/null); then
                if [ "$x" = "$root" ]; then echo "$p: the sandbox root"; else echo "$p: $x"; fi
              else echo "$p: unreachable"; fi
            done
            awk '$5 == "/" {print $8, $9}' /proc/self/mountinfo
            awk '{print $5}' /proc/self/mountinfo | grep -v -E '^/(dev|proc|sys|tmp)(/|$)'"#,
        root: "/ is not the host root\n/..: the sandbox root\n/proc/self/root: the sandbox root\n\
               /proc/self/cwd/..: the sandbox root\n/proc/2/root: the sandbox root\n/proc/1/root: unreachable\n\
               /proc/1/cwd: unreachable\n/proc/1/fd/0: unreachable\nfuse cot\n/\n",
        rootless: SAME,
    },
    Probe {
        name: "capabilities_are_limited_and_privileges_frozen",
        script: "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status | tr '\\t' ' '",
        root: "CapInh: 0000000000000000\nCapPrm: 00000000a00405fb\nCapEff: 00000000a00405fb\n\
               CapBnd: 00000000a00405fb\nCapAmb: 0000000000000000\nNoNewPrivs: 1\nSeccomp: 2\n",
        rootless: "CapInh: 0000000000000000\nCapPrm: 0000000000000000\nCapEff: 0000000000000000\n\
                   CapBnd: 00000000a00405fb\nCapAmb: 0000000000000000\nNoNewPrivs: 1\nSeccomp: 2\n",
    },
    Probe {
        name: "machine_wide_proc_files_are_read_only",
        script: r#"v=$(cat /proc/sys/kernel/core_pattern)
            if (printf '%s\n' "$v" > /proc/sys/kernel/core_pattern) 2>/dev/null; then echo WRITTEN; else echo refused; fi
            for f in /proc/sys /proc/sysrq-trigger /proc/irq /proc/bus; do
              if [ ! -e $f ] || awk -v f=$f '$5 == f {print substr($6, 1, 3)}' /proc/self/mountinfo | grep -q '^ro,'
              then echo "$f: read-only or absent"; else echo "$f: WRITABLE"; fi
            done"#,
        root: "refused\n/proc/sys: read-only or absent\n/proc/sysrq-trigger: read-only or absent\n\
               /proc/irq: read-only or absent\n/proc/bus: read-only or absent\n",
        rootless: SAME,
    },
    Probe {
        name: "mounts_cannot_be_changed",
        script: "unshare -m true 2>&1 | sed 's/.*: //'; umount /proc/sys 2>/dev/null && echo UNMOUNTED || echo refused",
        root: "Operation not permitted\nrefused\n",
        rootless: SAME,
    },
    Probe {
        name: "the_callers_session_keyring_is_out_of_reach",
        script: r#"perl -e 'require "syscall.ph"; my $id = syscall(&SYS_keyctl, 0, -3, 0);
            print $id == $ENV{CALLER_KEYRING} ? "the caller'"'"'s\n" : "a new one\n"'"#,
        root: "a new one\n",
        rootless: SAME,
    },
    Probe {
        name: "terminal_input_cannot_be_injected",
        script: r#"perl -e 'my $c = "x"; print ioctl(STDIN, 0x5412, $c) ? "allowed\n" : "denied: $!\n"'"#,
        root: "denied: Operation not permitted\n",
        rootless: SAME,
    },
];

fn host_root() -> Result<String, Problem> {
    let root = std::fs::metadata("/").map_err(|e| fail(format!("stat /: {e}")))?;
    Ok(format!("{}:{}", root.dev(), root.ino()))
}

/// The session keyring of this process, which the caller role inherits.
fn session_keyring() -> Result<String, Problem> {
    let output = std::process::Command::new("perl")
        .args([
            "-e",
            r#"require "syscall.ph"; print syscall(&SYS_keyctl, 0, -3, 0)"#,
        ])
        .output()
        .map_err(|e| fail(format!("run perl: {e}")))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn probe(mode: Mode, probe: &Probe) -> Verdict {
    let mut launch = Launch::sh(mode, probe.script);
    launch.env.push(("HOST_ROOT".into(), host_root()?));
    launch
        .env
        .push(("CALLER_KEYRING".into(), session_keyring()?));
    let ran = launch.run()?;
    let expected = match (mode, probe.rootless) {
        (Mode::Rootless, rootless) if rootless != SAME => rootless,
        _ => probe.root,
    };
    ensure!(
        ran.stdout == expected,
        "stdout {:?}, expected {expected:?}; stderr {:?}, outcome {}",
        ran.stdout,
        ran.stderr,
        ran.outcome()
    );
    ensure!(
        ran.code == 0 && ran.outcome() == "Exited(0)",
        "ended with {} ({}); stderr {:?}",
        ran.code,
        ran.outcome(),
        ran.stderr
    );
    if probe.name == "tmp_is_private_empty_and_writable" {
        ensure!(
            !std::path::Path::new("/tmp/cot-sandbox-private-probe").exists(),
            "the sandbox's /tmp reached the host's"
        );
    }
    Ok(())
}

/// Runs `argv` and checks the reported outcome and the exit status.
fn outcome(mode: Mode, argv: &[&str], outcome: &str, code: i32) -> Verdict {
    let ran = Launch::new(mode, argv).run()?;
    ensure!(
        ran.outcome() == outcome,
        "outcome {}, expected {outcome}; stderr {:?}",
        ran.outcome(),
        ran.stderr
    );
    ensure!(
        ran.code == code,
        "exit status {}, expected {code}",
        ran.code
    );
    Ok(())
}

fn environment_is_exactly_the_specs(mode: Mode) -> Verdict {
    let mut launch = Launch::new(mode, &["env"]);
    launch.env.push(("SPACED".into(), "a b  c".into()));
    launch.env.push(("EMPTY".into(), String::new()));
    let ran = launch.run()?;
    ensure!(
        ran.stdout == format!("PATH={PATH}\nSPACED=a b  c\nEMPTY=\n"),
        "env printed {:?}",
        ran.stdout
    );
    Ok(())
}

fn stdio_is_the_callers(mode: Mode) -> Verdict {
    let mut launch = Launch::sh(mode, "cat; echo to-stderr >&2");
    launch.stdin_data = Some("from the caller's stdin\n".into());
    let ran = launch.run()?;
    ensure!(
        ran.stdout == "from the caller's stdin\n",
        "stdout {:?}",
        ran.stdout
    );
    ensure!(ran.stderr == "to-stderr\n", "stderr {:?}", ran.stderr);
    Ok(())
}

fn directory_descriptors_do_not_leak_in(mode: Mode) -> Verdict {
    let mut launch = Launch::sh(
        mode,
        "stat -L -c %F /proc/self/fd/0; ls /proc/self/fd/0/ 2>/dev/null | head -1; \
         [ -e /proc/$$/fd/37 ] && echo fd-37-open || echo fd-37-closed",
    );
    launch.stdin_dir = true;
    launch.extra_flags.push("--leak-dir-fd".into());
    let ran = launch.run()?;
    ensure!(
        ran.stdout == "character special file\nfd-37-closed\n",
        "stdout {:?}; stderr {:?}",
        ran.stdout,
        ran.stderr
    );
    Ok(())
}

fn working_directory_and_hostname_are_the_specs(mode: Mode) -> Verdict {
    let mut launch = Launch::sh(mode, "pwd -P; cat /proc/sys/kernel/hostname");
    launch.cwd = Some("/usr/share".into());
    launch.hostname = Some("cot-sandbox-test".into());
    let ran = launch.run()?;
    ensure!(
        ran.stdout == "/usr/share\ncot-sandbox-test\n",
        "stdout {:?}; outcome {}",
        ran.stdout,
        ran.outcome()
    );
    Ok(())
}

fn a_missing_working_directory_is_a_setup_error(mode: Mode) -> Verdict {
    let mut launch = Launch::new(mode, &["true"]);
    launch.cwd = Some("/no/such/dir".into());
    let ran = launch.run()?;
    ensure!(ran.code == 125, "exit status {}", ran.code);
    let expected = "sandbox setup failed: enter the working directory on /no/such/dir: No such file or directory";
    ensure!(
        ran.outcome().starts_with(expected),
        "reported {:?}",
        ran.outcome()
    );
    Ok(())
}

/// Kills the caller role with `signal` while the command and a background child run, then checks
/// that no process of the sandbox's pid or mount namespace is left.
fn signal_to_the_caller(mode: Mode, signal: Signal) -> Verdict {
    let mut running = Launch::sh(mode, "sleep 60 & sleep 60 & echo ready; wait").spawn()?;
    let pid: i32 = running
        .wait_for("ready", "pid ")?
        .parse()
        .map_err(|e| fail(format!("pid: {e}")))?;
    let tree = harness::tree(pid);
    ensure!(
        tree.len() >= 4,
        "expected the init, sh and two sleeps, found {tree:?}"
    );
    // The init is undumpable: an unprivileged runner reads the namespaces of its children.
    let member = *tree.last().unwrap_or(&pid);
    let pid_ns = namespace(member, "pid")?;
    let mnt_ns = namespace(member, "mnt")?;
    let caller = i32::try_from(running.child.id()).map_err(|e| fail(e.to_string()))?;
    kill(Pid::from_raw(caller), signal).map_err(|e| fail(format!("kill the caller: {e}")))?;
    let ran = running.finish()?;
    match signal {
        Signal::SIGKILL => ensure!(ran.code == 128 + 9, "the caller ended with {}", ran.code),
        other => {
            let expected = format!("Interrupted({})", other as i32);
            ensure!(
                ran.outcome() == expected,
                "outcome {}, expected {expected}",
                ran.outcome()
            );
            ensure!(ran.code == 128 + other as i32, "exit status {}", ran.code);
        }
    }
    ensure_empty("pid", &pid_ns)?;
    ensure_empty("mnt", &mnt_ns)?;
    let left: Vec<i32> = tree
        .into_iter()
        .filter(|p| harness::is_running(*p))
        .collect();
    ensure!(
        left.is_empty(),
        "processes {left:?} of the sandbox are left"
    );
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| fail(e.to_string()))?;
    ensure!(
        !mounts.contains(" - fuse cot "),
        "a cot fuse mount is visible on the host:\n{mounts}"
    );
    Ok(())
}

fn launches_follow_each_other_in_one_process(mode: Mode) -> Verdict {
    let mut launch = Launch::new(mode, &["true"]);
    launch.extra_flags.extend(["--repeat".into(), "3".into()]);
    let ran = launch.run()?;
    let outcomes = ran
        .reports
        .iter()
        .filter(|r| *r == "outcome Exited(0)")
        .count();
    ensure!(outcomes == 3 && ran.code == 0, "reports {:?}", ran.reports);
    Ok(())
}

fn concurrent_sandboxes_do_not_interfere(mode: Mode) -> Verdict {
    let runs: Vec<_> = (0..4)
        .map(|i| {
            let script = format!("echo {i} > /tmp/mine; sleep 0.2; ls /tmp; cat /tmp/mine");
            Launch::sh(mode, &script).spawn()
        })
        .collect::<Result<_, _>>()?;
    for (i, running) in runs.into_iter().enumerate() {
        let ran = running.finish()?;
        ensure!(
            ran.stdout == format!("mine\n{i}\n"),
            "sandbox {i} printed {:?}; outcome {}",
            ran.stdout,
            ran.outcome()
        );
    }
    Ok(())
}

fn a_failing_serve_is_reported_and_leaves_nothing(mode: Mode) -> Verdict {
    let mut launch = Launch::new(mode, &["true"]);
    launch.extra_flags.push("--fail-serve".into());
    let ran = launch.run()?;
    ensure!(ran.code == 125, "exit status {}", ran.code);
    ensure!(
        ran.outcome()
            == "serving the sandbox's root filesystem failed: refusing to serve, as asked",
        "reported {}",
        ran.outcome()
    );
    Ok(())
}

fn an_unprivileged_caller_without_user_namespace_is_told_what_to_do() -> Verdict {
    require_root()?;
    let user = harness::unprivileged()?;
    let mut launch = Launch::new(Mode::Root, &["true"]);
    launch.wrapper = Some(format!(
        r#"exec setpriv --reuid={0} --regid={1} --clear-groups -- "{2}" "$@""#,
        user.uid,
        user.gid,
        user.exe.display()
    ));
    let ran = launch.run()?;
    ensure!(ran.code == 125, "exit status {}", ran.code);
    let expected = format!(
        "creating the sandbox's namespaces needs CAP_SYS_ADMIN, which this process (uid {}) lacks; run as root, or use rootless mode (a user namespace)",
        user.uid
    );
    ensure!(ran.outcome() == expected, "reported {}", ran.outcome());
    Ok(())
}

fn a_threaded_caller_is_refused() -> Verdict {
    let mut launch = Launch::new(Mode::Root, &["true"]);
    launch.extra_flags.push("--spawn-thread".into());
    let ran = launch.run()?;
    ensure!(ran.code == 125, "exit status {}", ran.code);
    ensure!(
        ran.outcome()
            .contains("needs a single-threaded process, but 2 threads are running"),
        "reported {}",
        ran.outcome()
    );
    Ok(())
}

/// A listening Unix socket of the runner's in a fresh directory of the host's `/tmp`, which
/// the sandbox's private `/tmp` hides: the init must reach it before covering `/tmp`. The
/// directory is searchable and the socket writable by the unprivileged test user. Removed on
/// drop.
struct HostSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: UnixListener,
}

impl HostSocket {
    fn new() -> Result<HostSocket, Problem> {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(format!(
            "/tmp/cot-sandbox-socket-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| fail(format!("create {}: {e}", dir.display())))?;
        let socket = HostSocket {
            path: dir.join("build.sock"),
            listener: UnixListener::bind(dir.join("build.sock"))
                .map_err(|e| fail(format!("bind a socket in {}: {e}", dir.display())))?,
            dir,
        };
        for (path, mode) in [(&socket.dir, 0o755), (&socket.path, 0o666)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| fail(format!("chmod {}: {e}", path.display())))?;
        }
        Ok(socket)
    }

    /// Accepts one connection (until `stop` is set), reads a line and answers `ack: LINE`.
    /// Returns the line read.
    fn serve_one(&self, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<String, String>> {
        let listener = self.listener.try_clone();
        std::thread::spawn(move || {
            let listener = listener.map_err(|e| format!("clone the listener: {e}"))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("make the listener non-blocking: {e}"))?;
            let stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if stop.load(Ordering::Relaxed) {
                            return Err("nobody connected".into());
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(format!("accept: {e}")),
                }
            };
            stream
                .set_nonblocking(false)
                .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(10))))
                .map_err(|e| format!("set up the connection: {e}"))?;
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .map_err(|e| format!("read from the connection: {e}"))?;
            (&stream)
                .write_all(format!("ack: {line}").as_bytes())
                .map_err(|e| format!("answer: {e}"))?;
            Ok(line)
        })
    }
}

impl Drop for HostSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The command connects to `/dev/cot`, writes a line and prints the runner's answer.
fn the_build_socket_reaches_the_callers_listener(mode: Mode) -> Verdict {
    let socket = HostSocket::new()?;
    let mut launch = Launch::sh(
        mode,
        r#"stat -c %F /dev/cot
        perl -MIO::Socket::UNIX -e '
            my $s = IO::Socket::UNIX->new(Peer => "/dev/cot") or die "connect /dev/cot: $!\n";
            print $s "hello from the sandbox\n";
            $s->flush;
            print scalar <$s>;'
        touch /dev/new 2>&1 | sed 's/.*: //'"#,
    );
    launch.extra_flags.extend([
        "--socket".into(),
        socket.path.to_string_lossy().into_owned(),
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let server = socket.serve_one(stop.clone());
    let ran = launch.run();
    stop.store(true, Ordering::Relaxed);
    let served = server
        .join()
        .map_err(|_| fail("the socket's server panicked"))?;
    let ran = ran?;
    ensure!(
        ran.stdout == "socket\nack: hello from the sandbox\nRead-only file system\n",
        "stdout {:?}; stderr {:?}; outcome {}; server {served:?}",
        ran.stdout,
        ran.stderr,
        ran.outcome()
    );
    ensure!(
        served.as_deref() == Ok("hello from the sandbox\n"),
        "the server got {served:?}"
    );
    ensure!(ran.code == 0, "exit status {}", ran.code);
    Ok(())
}

fn without_a_build_socket_dev_cot_does_not_exist(mode: Mode) -> Verdict {
    let ran = Launch::sh(
        mode,
        "if [ -e /dev/cot ] || [ -L /dev/cot ]; then echo present; else echo absent; fi",
    )
    .run()?;
    ensure!(
        ran.stdout == "absent\n" && ran.code == 0,
        "stdout {:?}; outcome {}",
        ran.stdout,
        ran.outcome()
    );
    Ok(())
}

/// Only a socket is bound in: another host file named as the socket is a setup error.
fn a_build_socket_must_be_an_existing_socket(mode: Mode) -> Verdict {
    for (path, error) in [
        ("/etc/passwd", "Socket operation on non-socket"),
        ("/no/such/build.sock", "No such file or directory"),
    ] {
        let mut launch = Launch::new(mode, &["true"]);
        launch
            .extra_flags
            .extend(["--socket".into(), path.to_string()]);
        let ran = launch.run()?;
        ensure!(ran.code == 125, "{path}: exit status {}", ran.code);
        let expected = format!("sandbox setup failed: open the build socket on {path}: {error}");
        ensure!(
            ran.outcome().starts_with(&expected),
            "reported {:?}, expected {expected:?}",
            ran.outcome()
        );
    }
    Ok(())
}

/// The prerequisite messages, provoked for real in a private mount namespace (or user
/// namespace) of the caller role, so nothing changes for the rest of the machine.
fn missing_fuse_device_is_explained() -> Verdict {
    require_root()?;
    let mut launch = Launch::new(Mode::Root, &["true"]);
    launch.wrapper = Some(
        r#"unshare -m -- sh -c 'mount -t tmpfs tmpfs /dev && exec "$0" "$@"' "$0" "$@""#.into(),
    );
    let ran = launch.run()?;
    ensure!(
        ran.code == 125,
        "exit status {}, outcome {}",
        ran.code,
        ran.outcome()
    );
    ensure!(
        ran.outcome() == "/dev/fuse is missing; load the fuse module (modprobe fuse); in a container, pass the device in (e.g. docker run --device /dev/fuse)",
        "reported {}",
        ran.outcome()
    );
    Ok(())
}

fn unopenable_fuse_device_is_explained() -> Verdict {
    require_root()?;
    let user = harness::unprivileged()?;
    let mut launch = Launch::new(Mode::Root, &["true"]);
    launch.extra_flags.push("--userns".into());
    // A second node of the same device, mode 0600, over /dev/fuse: what this machine ships.
    // The node is made on a scratch tmpfs over /dev/shm, where no test binary ever lives (one
    // over /tmp would hide a binary built under /tmp).
    launch.wrapper = Some(format!(
        r#"unshare -m -- sh -c 'mount -t tmpfs tmpfs /dev/shm && mknod -m 0600 /dev/shm/fuse c 10 229 && mount --bind /dev/shm/fuse /dev/fuse && exec setpriv --reuid={0} --regid={1} --clear-groups -- "$0" "$@"' "{2}" "$@""#,
        user.uid,
        user.gid,
        user.exe.display()
    ));
    let ran = launch.run()?;
    ensure!(
        ran.code == 125,
        "exit status {}, outcome {}",
        ran.code,
        ran.outcome()
    );
    let expected = format!(
        "/dev/fuse cannot be opened by uid {} (permission denied); make it accessible: chmod 0666 /dev/fuse, as most distributions do, or run as root",
        user.uid
    );
    ensure!(ran.outcome() == expected, "reported {}", ran.outcome());
    Ok(())
}

fn disabled_user_namespaces_are_explained() -> Verdict {
    let mut launch = Launch::new(Mode::Root, &["true"]);
    launch.extra_flags.push("--userns".into());
    // user.max_user_namespaces is per user namespace: set to 0 only in a throw-away one.
    launch.wrapper = Some(
        r#"unshare -U -r -- sh -c 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" "$@"' "$0" "$@""#.into(),
    );
    let ran = launch.run()?;
    ensure!(
        ran.code == 125,
        "exit status {}, outcome {}",
        ran.code,
        ran.outcome()
    );
    ensure!(
        ran.outcome().starts_with(
            "user namespaces are disabled (sysctl user.max_user_namespaces = 0); enable them with"
        ),
        "reported {}",
        ran.outcome()
    );
    Ok(())
}

type Test = (String, Box<dyn Fn() -> Verdict>);
type ModeTest = fn(Mode) -> Verdict;
type MachineTest = fn() -> Verdict;

fn tests() -> Vec<Test> {
    let mut tests: Vec<Test> = Vec::new();
    for mode in [Mode::Root, Mode::Rootless] {
        let name = |test: &str| format!("{}::{test}", mode.name());
        for p in PROBES {
            tests.push((name(p.name), Box::new(move || probe(mode, p))));
        }
        let outcomes: [(&str, &[&str], &str, i32); 6] = [
            (
                "the_commands_exit_status_is_reported",
                &["sh", "-c", "exit 3"],
                "Exited(3)",
                3,
            ),
            (
                "a_command_killed_by_a_signal_is_reported",
                &["sh", "-c", "kill -9 $$"],
                "Signaled(9)",
                137,
            ),
            (
                "a_program_missing_from_path_is_not_found",
                &["cot-no-such-program"],
                "NotFound(\"cot-no-such-program\")",
                127,
            ),
            (
                "a_missing_path_is_not_found",
                &["/no/such/program"],
                "NotFound(\"/no/such/program\")",
                127,
            ),
            (
                "a_file_without_execute_permission_cannot_execute",
                &["/etc/passwd"],
                "CannotExecute { program: \"/etc/passwd\", errno: 13 }",
                126,
            ),
            (
                "a_directory_cannot_execute",
                &["/usr/bin/"],
                "CannotExecute { program: \"/usr/bin/\", errno: 13 }",
                126,
            ),
        ];
        for (test, argv, expected, code) in outcomes {
            tests.push((
                name(test),
                Box::new(move || outcome(mode, argv, expected, code)),
            ));
        }
        let more: [(&str, ModeTest); 12] = [
            (
                "concurrent_sandboxes_do_not_interfere",
                concurrent_sandboxes_do_not_interfere,
            ),
            (
                "a_failing_serve_is_reported_and_leaves_nothing",
                a_failing_serve_is_reported_and_leaves_nothing,
            ),
            (
                "environment_is_exactly_the_specs",
                environment_is_exactly_the_specs,
            ),
            ("stdio_is_the_callers", stdio_is_the_callers),
            (
                "directory_descriptors_do_not_leak_in",
                directory_descriptors_do_not_leak_in,
            ),
            (
                "working_directory_and_hostname_are_the_specs",
                working_directory_and_hostname_are_the_specs,
            ),
            (
                "a_missing_working_directory_is_a_setup_error",
                a_missing_working_directory_is_a_setup_error,
            ),
            (
                "launches_follow_each_other_in_one_process",
                launches_follow_each_other_in_one_process,
            ),
            (
                "the_build_socket_reaches_the_callers_listener",
                the_build_socket_reaches_the_callers_listener,
            ),
            (
                "without_a_build_socket_dev_cot_does_not_exist",
                without_a_build_socket_dev_cot_does_not_exist,
            ),
            (
                "a_build_socket_must_be_an_existing_socket",
                a_build_socket_must_be_an_existing_socket,
            ),
            ("sigterm_to_the_caller_kills_the_tree", |mode| {
                signal_to_the_caller(mode, Signal::SIGTERM)
            }),
        ];
        for (test, run) in more {
            tests.push((name(test), Box::new(move || run(mode))));
        }
        tests.push((
            name("sigkill_of_the_caller_leaves_no_process_and_no_mount"),
            Box::new(move || signal_to_the_caller(mode, Signal::SIGKILL)),
        ));
    }
    let machine: [(&str, MachineTest); 5] = [
        ("a_threaded_caller_is_refused", a_threaded_caller_is_refused),
        (
            "an_unprivileged_caller_without_user_namespace_is_told_what_to_do",
            an_unprivileged_caller_without_user_namespace_is_told_what_to_do,
        ),
        (
            "missing_fuse_device_is_explained",
            missing_fuse_device_is_explained,
        ),
        (
            "unopenable_fuse_device_is_explained",
            unopenable_fuse_device_is_explained,
        ),
        (
            "disabled_user_namespaces_are_explained",
            disabled_user_namespaces_are_explained,
        ),
    ];
    for (test, run) in machine {
        tests.push((test.into(), Box::new(run)));
    }
    tests
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "--launch") {
        caller::main(&args[1..]);
    }
    let must_work = std::env::var_os("COT_MUST_WORK").is_some_and(|v| v == "1");
    // libtest's flags (--nocapture, --test-threads=N...) are accepted and ignored.
    let filters: Vec<String> = args
        .iter()
        .filter_map(|a| a.to_str())
        .filter(|a| !a.starts_with("--"))
        .map(String::from)
        .collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in tests() {
            println!("{name}: test");
        }
        return;
    }
    let selected: Vec<Test> = tests()
        .into_iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f)))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let start = Instant::now();
    let (mut passed, mut failed, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for (name, run) in selected {
        let began = Instant::now();
        let verdict = run();
        let took = began.elapsed().as_millis();
        match verdict {
            Ok(()) => {
                println!("test {name} ... ok ({took} ms)");
                passed.push(name);
            }
            Err(Problem::Skip(reason)) if !must_work => {
                eprintln!("SKIP: {name}: {reason}");
                println!("test {name} ... skipped");
                skipped.push(name);
            }
            Err(Problem::Skip(reason)) => {
                println!("test {name} ... FAILED\n    cannot run, and COT_MUST_WORK=1: {reason}");
                failed.push(name);
            }
            Err(Problem::Fail(message)) => {
                println!("test {name} ... FAILED\n    {message}");
                failed.push(name);
            }
        }
    }
    harness::clean_up();
    let result = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {result}. {} passed; {} failed; {} skipped; finished in {:.2}s\n",
        passed.len(),
        failed.len(),
        skipped.len(),
        start.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        println!("failures:\n    {}", failed.join("\n    "));
        std::process::exit(1);
    }
}
