//! What the sandbox needs from the machine, checked before cloning ([`preflight`]), and the
//! translation of failures met while building it into the same clear [`Error::Prerequisite`]s.

use std::fs;
use std::io;
use std::path::PathBuf;

use crate::{Error, Spec};

const FUSE_DEVICE: &str = "/dev/fuse";
const CAP_SYS_ADMIN: u32 = 21;

/// Checks what the sandbox of `spec` needs before anything is cloned: without a user namespace
/// `CAP_SYS_ADMIN`, with one that user namespaces are enabled, and in both cases that
/// `/dev/fuse` exists and opens read-write. Each failure is an [`Error::Prerequisite`] saying
/// what is missing and how to fix it. Restrictions that only show when tried (AppArmor's on
/// unprivileged user namespaces, seccomp policies of containers) are reported the same way by
/// [`crate::launch()`].
pub fn preflight(spec: &Spec) -> Result<(), Error> {
    spec.validate()?;
    if spec.user_namespace {
        check_user_namespaces()?;
    } else {
        check_admin()?;
    }
    check_fuse_device()
}

fn prerequisite(what: impl Into<String>, fix: impl Into<String>) -> Error {
    Error::Prerequisite {
        what: what.into(),
        fix: fix.into(),
    }
}

fn read_sysctl(path: &str) -> Option<i64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn check_admin() -> Result<(), Error> {
    let status = fs::read_to_string("/proc/self/status").map_err(|e| {
        Error::setup(
            "read the process status",
            Some("/proc/self/status".as_ref()),
            e,
        )
    })?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & (1 << CAP_SYS_ADMIN) == 0 {
        return Err(prerequisite(
            format!("creating the sandbox's namespaces needs CAP_SYS_ADMIN, which this process (uid {}) lacks", euid()),
            "run as root, or use rootless mode (a user namespace)",
        ));
    }
    Ok(())
}

fn check_user_namespaces() -> Result<(), Error> {
    if fs::symlink_metadata("/proc/self/ns/user").is_err() {
        return Err(prerequisite(
            "this kernel has no user namespaces (/proc/self/ns/user is missing)",
            "use a kernel built with CONFIG_USER_NS, or run as root",
        ));
    }
    if read_sysctl("/proc/sys/user/max_user_namespaces") == Some(0) {
        return Err(disabled_user_namespaces());
    }
    if euid() != 0 && read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        return Err(unprivileged_user_namespaces_disabled());
    }
    Ok(())
}

fn disabled_user_namespaces() -> Error {
    prerequisite(
        "user namespaces are disabled (sysctl user.max_user_namespaces = 0)",
        "enable them with `sysctl -w user.max_user_namespaces=15000` (and in /etc/sysctl.d/ to keep it), or run as root",
    )
}

fn unprivileged_user_namespaces_disabled() -> Error {
    prerequisite(
        "unprivileged user namespaces are disabled (sysctl kernel.unprivileged_userns_clone = 0)",
        "enable them with `sysctl -w kernel.unprivileged_userns_clone=1` (and in /etc/sysctl.d/ to keep it), or run as root",
    )
}

fn check_fuse_device() -> Result<(), Error> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(FUSE_DEVICE)
    {
        Ok(_) => Ok(()),
        Err(e) => Err(fuse_device_error(e.raw_os_error().unwrap_or(libc::EIO))),
    }
}

/// The prerequisite behind a failure to open `/dev/fuse`.
fn fuse_device_error(errno: i32) -> Error {
    match errno {
        libc::ENOENT => prerequisite(
            "/dev/fuse is missing",
            "load the fuse module (modprobe fuse); in a container, pass the device in (e.g. docker run --device /dev/fuse)",
        ),
        libc::EACCES | libc::EPERM => prerequisite(
            format!("/dev/fuse cannot be opened by uid {} (permission denied)", euid()),
            "make it accessible: chmod 0666 /dev/fuse, as most distributions do, or run as root",
        ),
        libc::ENODEV | libc::ENXIO => prerequisite(
            "/dev/fuse exists but no fuse driver answers it",
            "load the fuse module (modprobe fuse)",
        ),
        other => prerequisite(
            format!("/dev/fuse cannot be opened: {}", io::Error::from_raw_os_error(other)),
            "check the device node (character device 10,229, mode 0666)",
        ),
    }
}

/// The error for a failed clone of the init.
pub(crate) fn explain_clone_failure(user_namespace: bool, error: io::Error) -> Error {
    let errno = error.raw_os_error().unwrap_or(0);
    if user_namespace {
        if read_sysctl("/proc/sys/user/max_user_namespaces") == Some(0) {
            return disabled_user_namespaces();
        }
        if euid() != 0 && read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
            return unprivileged_user_namespaces_disabled();
        }
        match errno {
            libc::ENOSPC | libc::EUSERS => {
                return prerequisite(
                    "the limit on user namespaces is reached (sysctl user.max_user_namespaces)",
                    "raise it with `sysctl -w user.max_user_namespaces=15000`",
                )
            }
            libc::EPERM => {
                return prerequisite(
                    "creating a user namespace was refused (EPERM)",
                    "allow user namespaces: containers usually need a seccomp profile permitting clone(CLONE_NEWUSER); or run as root",
                )
            }
            _ => {}
        }
    } else if errno == libc::EPERM {
        return prerequisite(
            format!(
                "creating the sandbox's namespaces was refused (EPERM) for uid {}",
                euid()
            ),
            "run as root with CAP_SYS_ADMIN, or use rootless mode (a user namespace)",
        );
    }
    Error::setup("clone the sandbox's init", None, error)
}

/// The error for a step of the init that failed: a prerequisite when the cause is known.
pub(crate) fn explain_setup_failure(
    user_namespace: bool,
    stage: String,
    path: Option<PathBuf>,
    errno: i32,
) -> Error {
    if stage == crate::init::OPEN_FUSE_STAGE {
        return fuse_device_error(errno);
    }
    let denied = errno == libc::EPERM || errno == libc::EACCES;
    if user_namespace
        && denied
        && read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1)
    {
        return prerequisite(
            format!(
                "AppArmor restricts unprivileged user namespaces (sysctl kernel.apparmor_restrict_unprivileged_userns = 1): {stage} was denied inside the user namespace"
            ),
            "allow it: give cot an AppArmor profile with the `userns,` rule (as Ubuntu does for bwrap in /etc/apparmor.d/), or `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or run as root",
        );
    }
    if user_namespace && denied && stage == "mount proc" {
        return prerequisite(
            "the kernel refuses a new /proc inside a user namespace here, because parts of this machine's /proc are hidden by other mounts (as containers do)",
            "run cot as root, or in a container that leaves /proc unmasked (e.g. docker run --security-opt systempaths=unconfined)",
        );
    }
    Error::Setup {
        stage,
        path,
        source: io::Error::from_raw_os_error(errno),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_device_errors_say_what_to_do() {
        assert!(fuse_device_error(libc::ENOENT)
            .to_string()
            .starts_with("/dev/fuse is missing; load the fuse module"));
        let denied = fuse_device_error(libc::EACCES).to_string();
        assert!(
            denied.contains("(permission denied); make it accessible: chmod 0666 /dev/fuse"),
            "{denied}"
        );
    }

    #[test]
    fn setup_failures_keep_their_stage_and_path() {
        let error = explain_setup_failure(
            false,
            "mount proc".into(),
            Some("/proc".into()),
            libc::EPERM,
        );
        assert_eq!(
            error.to_string(),
            "sandbox setup failed: mount proc on /proc: Operation not permitted (os error 1)"
        );
    }

    #[test]
    fn a_failed_open_of_the_fuse_device_in_the_init_is_a_prerequisite() {
        let error = explain_setup_failure(
            true,
            crate::init::OPEN_FUSE_STAGE.into(),
            None,
            libc::EACCES,
        );
        assert!(matches!(error, Error::Prerequisite { .. }), "{error}");
    }
}
