//! The steps that turn the FUSE root into a usable `/`, as data: the init runs `ROOT_PLAN`
//! in order after the root is served and before `pivot_root`. Reading this list is auditing what
//! of the host the sandbox can reach: nothing but the device nodes of `Step::Device` and, only
//! when the kernel refuses a fresh sysfs, a read-only `/sys` (`Step::Sysfs`).

use nix::mount::MsFlags;

/// The directories the root filesystem must provide (the FUSE filesystem synthesises them), on
/// which the init mounts the sandbox's own `/proc`, `/dev`, `/sys` and `/tmp`. Nothing of the
/// root filesystem below them is visible inside.
pub const MOUNT_POINTS: [&str; 4] = ["/proc", "/dev", "/sys", "/tmp"];

/// Where the command reaches the caller's build socket ([`crate::Spec::socket`]), when there is
/// one.
pub const BUILD_SOCKET: &str = "/dev/cot";

/// One step of completing the root. Every `target` is relative to the new root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Mount a new instance of `fstype` (source name `fstype`) on `target`.
    Mount {
        fstype: &'static str,
        target: &'static str,
        flags: MsFlags,
        data: &'static str,
    },
    /// Mount a fresh read-only sysfs on `target` (showing the sandbox's network namespace);
    /// when the kernel refuses, bind the host's `/sys` recursively read-only instead.
    Sysfs { target: &'static str },
    /// Create an empty file at `target` and bind the host's device node `device` onto it.
    Device {
        device: &'static str,
        target: &'static str,
    },
    /// When the spec names a build socket: create an empty file at `target` and bind the
    /// caller's socket onto it (opened by the init before anything covered the host's paths).
    /// Without one, nothing is created.
    Socket { target: &'static str },
    /// Create a directory (in a tmpfs mounted by an earlier step).
    Dir { target: &'static str, mode: u32 },
    /// Create a symbolic link at `target` pointing to `to`.
    Symlink {
        target: &'static str,
        to: &'static str,
    },
    /// Bind `target` onto itself and make it read-only, when it exists: procfs files that act
    /// on the whole machine and are guarded by file modes only, not by capabilities.
    ReadOnly { target: &'static str },
    /// Make the mount at `target` read-only, keeping `flags`.
    Remount {
        target: &'static str,
        flags: MsFlags,
    },
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The root is completed in this order. `/dev` is made read-only last so the steps before can
/// create its files.
pub(crate) const ROOT_PLAN: &[Step] = &[
    // The sandbox's own pid namespace; nosuid, nodev, noexec as every procfs.
    Step::Mount {
        fstype: "proc",
        target: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    // Writing these as uid 0 needs no capability: `kernel.core_pattern` alone would run a
    // program of our choosing as root on the host.
    Step::ReadOnly { target: "proc/sys" },
    Step::ReadOnly {
        target: "proc/sysrq-trigger",
    },
    Step::ReadOnly { target: "proc/irq" },
    Step::ReadOnly { target: "proc/bus" },
    Step::ReadOnly { target: "proc/fs" },
    Step::ReadOnly {
        target: "proc/acpi",
    },
    Step::ReadOnly {
        target: "proc/scsi",
    },
    Step::ReadOnly {
        target: "proc/dynamic_debug",
    },
    // A tmpfs holding only the usual character devices, bound from the host, so that no other
    // device (disks, /dev/mem, /dev/kmsg...) exists; nodev is safe because each device is a
    // bind mount of its own.
    Step::Mount {
        fstype: "tmpfs",
        target: "dev",
        flags: NOSUID_NODEV_NOEXEC,
        data: "mode=0755",
    },
    Step::Device {
        device: "/dev/null",
        target: "dev/null",
    },
    Step::Device {
        device: "/dev/zero",
        target: "dev/zero",
    },
    Step::Device {
        device: "/dev/full",
        target: "dev/full",
    },
    Step::Device {
        device: "/dev/random",
        target: "dev/random",
    },
    Step::Device {
        device: "/dev/urandom",
        target: "dev/urandom",
    },
    Step::Device {
        device: "/dev/tty",
        target: "dev/tty",
    },
    // A private devpts instance: the sandbox sees only the terminals it opens.
    Step::Dir {
        target: "dev/pts",
        mode: 0o755,
    },
    Step::Mount {
        fstype: "devpts",
        target: "dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "newinstance,ptmxmode=0666,mode=0620",
    },
    Step::Symlink {
        target: "dev/ptmx",
        to: "pts/ptmx",
    },
    Step::Dir {
        target: "dev/shm",
        mode: 0o1777,
    },
    Step::Mount {
        fstype: "tmpfs",
        target: "dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
    Step::Symlink {
        target: "dev/fd",
        to: "/proc/self/fd",
    },
    Step::Symlink {
        target: "dev/stdin",
        to: "/proc/self/fd/0",
    },
    Step::Symlink {
        target: "dev/stdout",
        to: "/proc/self/fd/1",
    },
    Step::Symlink {
        target: "dev/stderr",
        to: "/proc/self/fd/2",
    },
    // The one host object besides the devices: a listening Unix socket of the caller's.
    Step::Socket { target: "dev/cot" },
    Step::Remount {
        target: "dev",
        flags: NOSUID_NODEV_NOEXEC,
    },
    Step::Sysfs { target: "sys" },
    // Private and empty for each sandbox.
    Step::Mount {
        fstype: "tmpfs",
        target: "tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
];

impl Step {
    /// The path the step works on, as seen inside the sandbox.
    pub(crate) fn inside_path(&self) -> String {
        let target = match self {
            Step::Mount { target, .. }
            | Step::Sysfs { target }
            | Step::Device { target, .. }
            | Step::Socket { target }
            | Step::Dir { target, .. }
            | Step::Symlink { target, .. }
            | Step::ReadOnly { target }
            | Step::Remount { target, .. } => target,
        };
        format!("/{target}")
    }

    /// What the step does, for error messages.
    pub(crate) fn stage(&self) -> String {
        match self {
            Step::Mount { fstype, .. } => format!("mount {fstype}"),
            Step::Sysfs { .. } => "mount sysfs".into(),
            Step::Device { device, .. } => format!("bind device {device}"),
            Step::Socket { .. } => "bind the build socket".into(),
            Step::Dir { .. } => "create directory".into(),
            Step::Symlink { to, .. } => format!("create symlink to {to}"),
            Step::ReadOnly { .. } => "make read-only".into(),
            Step::Remount { .. } => "remount read-only".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_usual_character_devices_come_from_the_host() {
        let devices: Vec<&str> = ROOT_PLAN
            .iter()
            .filter_map(|step| match step {
                Step::Device { device, .. } => Some(*device),
                _ => None,
            })
            .collect();
        assert_eq!(
            devices,
            [
                "/dev/null",
                "/dev/zero",
                "/dev/full",
                "/dev/random",
                "/dev/urandom",
                "/dev/tty"
            ]
        );
    }

    #[test]
    fn the_build_socket_is_bound_once_at_its_path_before_dev_is_read_only() {
        let position = |wanted: fn(&Step) -> bool| {
            ROOT_PLAN
                .iter()
                .position(wanted)
                .expect("a step of the plan")
        };
        let sockets: Vec<String> = ROOT_PLAN
            .iter()
            .filter(|step| matches!(step, Step::Socket { .. }))
            .map(Step::inside_path)
            .collect();
        assert_eq!(sockets, [BUILD_SOCKET]);
        let socket = position(|step| matches!(step, Step::Socket { .. }));
        let dev_tmpfs = position(|step| {
            matches!(
                step,
                Step::Mount {
                    fstype: "tmpfs",
                    ..
                }
            ) && step.inside_path() == "/dev"
        });
        let dev_read_only =
            position(|step| matches!(step, Step::Remount { .. }) && step.inside_path() == "/dev");
        assert!(dev_tmpfs < socket && socket < dev_read_only);
    }

    #[test]
    fn every_step_stays_below_a_mount_point() {
        for step in ROOT_PLAN {
            let path = step.inside_path();
            assert!(
                MOUNT_POINTS
                    .iter()
                    .any(|m| path == *m || path.starts_with(&format!("{m}/"))),
                "{step:?} works outside the mount points"
            );
            assert!(!path.contains(".."), "{step:?}");
        }
    }

    #[test]
    fn every_mount_point_gets_a_fresh_filesystem() {
        for point in MOUNT_POINTS {
            assert!(
                ROOT_PLAN.iter().any(|step| matches!(
                    step,
                    Step::Mount { .. } | Step::Sysfs { .. }
                ) && step.inside_path() == point),
                "nothing is mounted on {point}"
            );
        }
    }
}
