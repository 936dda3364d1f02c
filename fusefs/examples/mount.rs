//! Mounts a recording view of a real tree, for manual checks and measurements (needs root).
//!
//! `cargo run --release -p cot-fusefs --example mount -- REAL MNT [--passthrough]
//! [--writable VIEWDIR]... [--threads N]` serves until MNT is unmounted (`umount -l MNT`), then prints the
//! request counts and the number of recorded accesses and discards the layer.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use cot_fusefs::{Options, ProxyFs};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let usage = "usage: mount REAL MNT [--passthrough] [--writable VIEWDIR]... [--threads N]";
    let real = PathBuf::from(args.next().ok_or(usage)?);
    let mnt = PathBuf::from(args.next().ok_or(usage)?);
    let layer = tempfile::tempdir()?;
    let mut opts = Options::new(&real, layer.path().join("layer"));
    std::fs::create_dir(&opts.layer_dir)?;
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--threads") => {
                threads = args
                    .next()
                    .and_then(|t| t.to_str().and_then(|t| t.parse().ok()))
                    .ok_or(usage)?;
            }
            Some("--passthrough") => opts.passthrough = true,
            Some("--writable") => opts.writable.push(PathBuf::from(args.next().ok_or(usage)?)),
            _ => return Err(usage.into()),
        }
    }
    let (fs, handle) = ProxyFs::new(opts)?;
    let fd: OwnedFd = File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")?
        .into();
    let data = CString::new(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        fd.as_raw_fd()
    ))?;
    rustix::mount::mount(
        "cot",
        &mnt,
        "fuse",
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
        Some(data.as_c_str()),
    )?;
    let server = cot_fusefs::serve(fs, fd, threads)?;
    eprintln!(
        "serving {real:?} at {mnt:?} (passthrough {})",
        handle.passthrough_active()
    );
    server.join()?;
    eprintln!(
        "{:?}; {} accesses recorded",
        handle.stats(),
        handle.accesses().len()
    );
    handle.discard()?;
    Ok(())
}
