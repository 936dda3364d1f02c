//! Real-mount tests of the proxy filesystem.
//!
//! The binary owns its `main`: it first moves into a mount namespace of its own (so no mount
//! can outlive it, even when it is killed), then mounts one `ProxyFs` per test on a temporary
//! directory, with the real tree of the test bound as the view's `/`. View paths in the access
//! log are therefore relative to the mount point: the file `<mnt>/src/a.c` is `/src/a.c`.
//!
//! Needs root and /dev/fuse. Without them it prints `SKIP: <reason>` and passes, unless
//! `COT_MUST_WORK=1`, in which case it fails. Arguments are substring filters on test names.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cot_fusefs::{AccessKind, Conceal, Handle, Options, ProxyFs, Recovery, Server};

// ----- harness -----

type Test = (&'static str, fn());

macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), $name as fn())),*]
    };
}

fn main() {
    let tests: &[Test] = tests![
        records_each_access_kind_once,
        absent_and_hidden_lookups,
        concealed_files_look_absent_until_the_thunk_writes_them,
        hide_spares_the_unhidden_and_the_way_to_them,
        internal_paths_are_never_recorded,
        mountpoints_are_synthetic_and_unrecorded,
        writes_outside_writable_fail_erofs,
        copy_on_write_keeps_real_tree_untouched,
        commit_applies_the_merged_view,
        commit_replaces_changed_types,
        commit_except_keeps_a_subtree_in_the_layer,
        discard_leaves_real_tree_untouched,
        rename_of_lower_directory_moves_subtree,
        odd_names_round_trip,
        unlinked_open_file_keeps_working,
        data_path_userspace,
        data_path_passthrough,
        copy_up_while_reader_open_userspace,
        copy_up_while_reader_open_passthrough,
        concurrent_opens_share_one_backing,
        exec_and_mmap_through_the_view,
        handle_is_shareable,
        binds_map_view_subtrees,
        parallel_writers_commit_consistently,
        invalidate_shows_changes_behind_the_mount,
        invalidate_shows_replaced_content_userspace,
        invalidate_shows_replaced_content_passthrough,
        invalidate_without_session_updates_nodes,
        publish_then_discard_keeps_the_published,
        publish_then_commit_applies_both,
        publish_then_commit_applies_both_across_file_systems,
        publish_keeps_open_files_in_the_layer_userspace,
        publish_keeps_open_files_in_the_layer_passthrough,
        commit_interrupted_anywhere_is_recovered,
        commit_interrupted_anywhere_is_recovered_across_file_systems,
        publish_interrupted_anywhere_is_recovered,
        recover_discards_a_layer_without_journal,
        recover_discards_a_torn_journal,
        recover_refuses_an_unknown_journal_version,
    ];
    if let Err(reason) = environment() {
        if std::env::var("COT_MUST_WORK").as_deref() == Ok("1") {
            panic!("COT_MUST_WORK=1 but the fusefs tests cannot run: {reason}");
        }
        eprintln!("SKIP: fusefs tests need root and /dev/fuse: {reason}");
        return;
    }
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, test) in tests {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let t = Instant::now();
        let result = std::panic::catch_unwind(test);
        let ms = t.elapsed().as_millis();
        match result {
            Ok(()) => println!("test {name} ... ok ({ms} ms)"),
            Err(_) => {
                println!("test {name} ... FAILED ({ms} ms)");
                failed.push(*name);
            }
        }
    }
    println!(
        "\n{} passed, {} failed, in {:.1} s",
        ran - failed.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        println!("failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}

/// Moves into a private mount namespace; fails with the reason when the tests cannot run.
fn environment() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not running as root".into());
    }
    File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("cannot open /dev/fuse: {e}"))?;
    #[expect(deprecated, reason = "safe here: the process is still single-threaded")]
    rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS)
        .map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )
    .map_err(|e| format!("making mounts private: {e}"))?;
    Ok(())
}

// ----- fixture -----

struct Fixture {
    _tmp: tempfile::TempDir,
    real: PathBuf,
    mnt: PathBuf,
    layer: PathBuf,
    handle: Handle,
    server: Option<Server>,
}

impl Fixture {
    /// Builds the real tree with `populate`, then mounts the view of it.
    fn new(populate: impl FnOnce(&Path), configure: impl FnOnce(&mut Options)) -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let real = tmp.path().join("real");
        let mnt = tmp.path().join("mnt");
        let layer = tmp.path().join("layer");
        for d in [&real, &mnt, &layer] {
            fs::create_dir(d).expect("create fixture dir");
        }
        populate(&real);
        let mut opts = Options::new(&real, &layer);
        opts.ttl = Duration::from_secs(3600);
        configure(&mut opts);
        let layer = opts.layer_dir.clone();
        let (fs, handle) = ProxyFs::new(opts).expect("ProxyFs::new");
        let fd: OwnedFd = File::options()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .expect("open /dev/fuse")
            .into();
        let data = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
            fd.as_raw_fd()
        ))
        .expect("mount data");
        rustix::mount::mount(
            "cot",
            &mnt,
            "fuse",
            rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
            Some(data.as_c_str()),
        )
        .expect("mount fuse");
        let mut fixture = Fixture {
            _tmp: tmp,
            real,
            mnt,
            layer,
            handle,
            server: None,
        };
        fixture.server = Some(cot_fusefs::serve(fs, fd, 4).expect("serve"));
        fixture
    }

    /// The host path of a view path.
    fn v(&self, view: &str) -> PathBuf {
        self.mnt.join(view.trim_start_matches('/'))
    }

    fn r(&self, rel: &str) -> PathBuf {
        self.real.join(rel.trim_start_matches('/'))
    }

    fn log(&self) -> Vec<(AccessKind, PathBuf, Option<PathBuf>)> {
        self.handle
            .accesses()
            .into_iter()
            .map(|a| (a.kind, a.path, a.to))
            .collect()
    }

    fn count(&self, kind: AccessKind, path: &str) -> usize {
        self.log()
            .iter()
            .filter(|(k, p, _)| *k == kind && p == Path::new(path))
            .count()
    }

    #[track_caller]
    fn expect(&self, kind: AccessKind, path: &str) {
        let n = self.count(kind, path);
        assert_eq!(
            n,
            1,
            "{kind} {path} recorded {n} times; log: {:#?}",
            self.log()
        );
    }

    #[track_caller]
    fn expect_none(&self, path: &str) {
        let hits: Vec<_> = self
            .log()
            .into_iter()
            .filter(|(_, p, to)| {
                p.starts_with(path) || to.as_deref().is_some_and(|t| t.starts_with(path))
            })
            .collect();
        assert!(
            hits.is_empty(),
            "{path} must not be recorded, got {hits:#?}"
        );
    }

    /// Unmounts and waits for the session to end.
    fn unmount(&mut self) {
        let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
        if let Some(server) = self.server.take() {
            assert!(
                server.wait_timeout(Duration::from_secs(10)),
                "session did not end after unmount"
            );
            server.join().expect("session ended with an error");
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
    }
}

fn write(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create parent");
    }
    fs::write(path, data).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {path:?}: {e}"))
}

fn names(dir: &Path) -> BTreeSet<OsString> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {dir:?}: {e}"))
        .map(|e| e.expect("dir entry").file_name())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<OsString> {
    items.iter().map(OsString::from).collect()
}

#[track_caller]
fn errno_of(result: std::io::Result<impl Sized>) -> i32 {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().expect("an OS error"),
    }
}

/// A file of `len` bytes whose content depends on `seed` and the offset.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn tree(real: &Path) {
    write(&real.join("src/a.c"), b"int a;\n");
    write(&real.join("src/b.c"), b"int b;\n");
    write(&real.join("src/sub/c.h"), b"#define C\n");
    symlink("a.c", real.join("src/link")).expect("symlink");
    write(&real.join("etc/conf"), b"conf\n");
}

fn project(opts: &mut Options) {
    opts.writable.push(PathBuf::from("/src"));
}

// ----- access recording -----

fn records_each_access_kind_once() {
    let f = Fixture::new(tree, project);
    use AccessKind::*;
    // stat, twice: recorded once.
    fs::metadata(f.v("/src/a.c")).expect("stat");
    fs::metadata(f.v("/src/a.c")).expect("stat again");
    f.expect(Stat, "/src");
    f.expect(Stat, "/src/a.c");
    // read, twice.
    assert_eq!(read(&f.v("/src/a.c")), b"int a;\n");
    assert_eq!(read(&f.v("/src/a.c")), b"int a;\n");
    f.expect(Read, "/src/a.c");
    // readdir, twice.
    assert_eq!(names(&f.v("/src")), set(&["a.c", "b.c", "sub", "link"]));
    names(&f.v("/src"));
    f.expect(Readdir, "/src");
    // readlink and the target, resolved inside the view.
    assert_eq!(
        fs::read_link(f.v("/src/link")).expect("readlink"),
        Path::new("a.c")
    );
    assert_eq!(read(&f.v("/src/link")), b"int a;\n");
    f.expect(Readlink, "/src/link");
    f.expect(Stat, "/src/link");
    // absent.
    assert!(fs::metadata(f.v("/src/nope.h")).is_err());
    assert!(fs::metadata(f.v("/src/nope.h")).is_err());
    f.expect(Absent, "/src/nope.h");
    // write (create), then O_RDWR of an existing file: read and write.
    write(&f.v("/src/new.o"), b"obj");
    f.expect(Write, "/src/new.o");
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.v("/src/b.c"))
        .expect("open rdwr");
    f.expect(Read, "/src/b.c");
    f.expect(Write, "/src/b.c");
    // mkdir, rmdir.
    fs::create_dir(f.v("/src/d")).expect("mkdir");
    f.expect(Mkdir, "/src/d");
    fs::remove_dir(f.v("/src/d")).expect("rmdir");
    f.expect(Rmdir, "/src/d");
    // symlink: path is the link, to its text.
    symlink("../etc/conf", f.v("/src/sl")).expect("symlink");
    assert!(f.log().contains(&(
        Symlink,
        PathBuf::from("/src/sl"),
        Some(PathBuf::from("../etc/conf"))
    )));
    // link: path is the existing file, to the new name.
    fs::hard_link(f.v("/src/a.c"), f.v("/src/a2.c")).expect("link");
    assert!(f.log().contains(&(
        Link,
        PathBuf::from("/src/a.c"),
        Some(PathBuf::from("/src/a2.c"))
    )));
    // rename: from, to.
    fs::rename(f.v("/src/new.o"), f.v("/src/final.o")).expect("rename");
    assert!(f.log().contains(&(
        Rename,
        PathBuf::from("/src/new.o"),
        Some(PathBuf::from("/src/final.o"))
    )));
    // setattr.
    fs::set_permissions(f.v("/src/final.o"), fs::Permissions::from_mode(0o640)).expect("chmod");
    f.expect(Setattr, "/src/final.o");
    // delete.
    fs::remove_file(f.v("/src/final.o")).expect("unlink");
    f.expect(Delete, "/src/final.o");
    // O_TRUNC is a write without a read.
    File::create(f.v("/src/sub/c.h")).expect("truncate");
    f.expect(Write, "/src/sub/c.h");
    assert_eq!(f.count(Read, "/src/sub/c.h"), 0);
    // Nothing is recorded twice.
    let log = f.log();
    let unique: BTreeSet<_> = log.iter().cloned().collect();
    assert_eq!(unique.len(), log.len(), "duplicates in {log:#?}");
    // The root is never recorded.
    assert!(log.iter().all(|(_, p, _)| p != Path::new("/")));
}

fn absent_and_hidden_lookups() {
    let f = Fixture::new(
        |real| {
            tree(real);
            write(&real.join("src/secret/key"), b"k");
            write(&real.join("src/x.swp"), b"s");
        },
        |opts| {
            project(opts);
            opts.hide.push("/src/secret".into());
            opts.hide.push("/src/*.swp".into());
        },
    );
    use AccessKind::*;
    assert_eq!(errno_of(fs::metadata(f.v("/src/secret"))), libc::ENOENT);
    assert_eq!(errno_of(fs::metadata(f.v("/src/secret/key"))), libc::ENOENT);
    assert_eq!(errno_of(File::open(f.v("/src/x.swp"))), libc::ENOENT);
    f.expect(Hidden, "/src/secret");
    f.expect(Hidden, "/src/x.swp");
    assert_eq!(f.count(Stat, "/src/secret"), 0);
    assert_eq!(names(&f.v("/src")), set(&["a.c", "b.c", "sub", "link"]));
    // Creating a hidden name is refused and recorded as a hidden access.
    assert_eq!(errno_of(fs::write(f.v("/src/y.swp"), b"")), libc::EACCES);
    f.expect(Hidden, "/src/y.swp");
    assert!(f.r("/src/secret/key").exists());
    // Plain absence.
    assert_eq!(
        errno_of(fs::metadata(f.v("/usr/include/none.h"))),
        libc::ENOENT
    );
    f.expect(Absent, "/usr");
}

fn concealed_files_look_absent_until_the_thunk_writes_them() {
    let mut f = Fixture::new(tree, |opts| {
        project(opts);
        opts.conceal = Some(Conceal {
            roots: vec!["/src".into()],
            visible: vec!["/src/a.c".into(), "/src/gen/**".into()],
        });
    });
    use AccessKind::*;
    // Visible: the declared file, directories, everything outside the roots.
    assert_eq!(read(&f.v("/src/a.c")), b"int a;\n");
    assert!(fs::metadata(f.v("/src/sub")).expect("sub").is_dir());
    assert_eq!(read(&f.v("/etc/conf")), b"conf\n");
    // Concealed: other files (a symlink too), recorded as hidden, never as stat or absent.
    assert_eq!(errno_of(fs::read(f.v("/src/b.c"))), libc::ENOENT);
    assert_eq!(errno_of(fs::metadata(f.v("/src/sub/c.h"))), libc::ENOENT);
    assert_eq!(
        errno_of(fs::symlink_metadata(f.v("/src/link"))),
        libc::ENOENT
    );
    f.expect(Hidden, "/src/b.c");
    f.expect(Hidden, "/src/sub/c.h");
    f.expect(Hidden, "/src/link");
    assert_eq!(f.count(Stat, "/src/b.c") + f.count(Absent, "/src/b.c"), 0);
    assert_eq!(names(&f.v("/src")), set(&["a.c", "sub"]));
    assert!(names(&f.v("/src/sub")).is_empty());
    // Plain absence stays absence.
    assert_eq!(errno_of(fs::metadata(f.v("/src/none.h"))), libc::ENOENT);
    f.expect(Absent, "/src/none.h");
    // What is concealed cannot be deleted, nor the directory holding it.
    assert_eq!(errno_of(fs::remove_file(f.v("/src/sub/c.h"))), libc::ENOENT);
    assert_eq!(errno_of(fs::remove_dir(f.v("/src/sub"))), libc::ENOTEMPTY);
    // The thunk may write at a concealed path: its file shows, the real one is untouched.
    fs::write(f.v("/src/b.c"), b"mine").expect("create over a concealed file");
    assert_eq!(read(&f.v("/src/b.c")), b"mine");
    write(&f.v("/src/gen/out.h"), b"gen");
    assert_eq!(names(&f.v("/src")), set(&["a.c", "b.c", "gen", "sub"]));
    assert_eq!(read(&f.r("/src/b.c")), b"int b;\n");
    // Published, its files are real ones, and still its own.
    f.handle.publish().expect("publish");
    assert_eq!(read(&f.r("/src/b.c")), b"mine");
    assert_eq!(read(&f.v("/src/b.c")), b"mine");
    assert_eq!(names(&f.v("/src")), set(&["a.c", "b.c", "gen", "sub"]));
    // A file another process wrote on the thunk's behalf shows once revealed.
    write(&f.r("/src/sub/child.o"), b"child");
    assert_eq!(
        errno_of(fs::metadata(f.v("/src/sub/child.o"))),
        libc::ENOENT
    );
    invalidate(&f, &["/src/sub/child.o"]);
    assert_eq!(
        errno_of(fs::metadata(f.v("/src/sub/child.o"))),
        libc::ENOENT
    );
    f.handle.reveal(&[PathBuf::from("/src/sub/child.o")]);
    invalidate(&f, &["/src/sub/child.o"]);
    assert_eq!(read(&f.v("/src/sub/child.o")), b"child");
    assert_eq!(names(&f.v("/src/sub")), set(&["child.o"]));
    // The commit puts the thunk's files in place and leaves the concealed ones alone.
    fs::write(f.v("/src/sub/c.h"), b"over").expect("create over a concealed file");
    f.unmount();
    f.handle.commit().expect("commit");
    assert_eq!(read(&f.r("/src/sub/c.h")), b"over");
    assert_eq!(read(&f.r("/src/b.c")), b"mine");
    assert_eq!(read(&f.r("/src/link")), b"int a;\n");
    assert_eq!(read(&f.r("/src/gen/out.h")), b"gen");
}

fn hide_spares_the_unhidden_and_the_way_to_them() {
    let f = Fixture::new(
        |real| {
            tree(real);
            write(&real.join("home/u/proj/main.c"), b"int main;\n");
            write(&real.join("home/u/.ssh/id"), b"key");
            write(&real.join("home/v/notes"), b"notes");
        },
        |opts| {
            project(opts);
            opts.hide_elsewhere = vec!["/home".into(), "/home/**".into(), "**/.ssh".into()];
            opts.unhidden = vec!["/home/u/proj".into()];
        },
    );
    assert_eq!(read(&f.v("/home/u/proj/main.c")), b"int main;\n");
    assert_eq!(names(&f.v("/home")), set(&["u"]));
    assert_eq!(names(&f.v("/home/u")), set(&["proj"]));
    assert_eq!(errno_of(fs::metadata(f.v("/home/u/.ssh"))), libc::ENOENT);
    assert_eq!(errno_of(fs::metadata(f.v("/home/v"))), libc::ENOENT);
    f.expect(AccessKind::Hidden, "/home/u/.ssh");
    f.expect(AccessKind::Hidden, "/home/v");
}

fn internal_paths_are_never_recorded() {
    let f = Fixture::new(
        |real| {
            tree(real);
            write(&real.join("src/.cot/db"), b"state");
        },
        |opts| {
            project(opts);
            opts.internal.push("/src/.cot".into());
        },
    );
    assert_eq!(errno_of(fs::metadata(f.v("/src/.cot"))), libc::ENOENT);
    assert_eq!(errno_of(fs::read(f.v("/src/.cot/db"))), libc::ENOENT);
    assert_eq!(errno_of(fs::create_dir(f.v("/src/.cot"))), libc::EACCES);
    assert!(!names(&f.v("/src")).contains(OsStr::new(".cot")));
    // The directory holding it cannot be removed or moved away.
    fs::remove_file(f.v("/src/a.c")).expect("unlink");
    assert_eq!(errno_of(fs::rename(f.v("/src"), f.v("/src2"))), libc::EROFS);
    f.expect_none("/src/.cot");
}

fn mountpoints_are_synthetic_and_unrecorded() {
    let f = Fixture::new(tree, |opts| {
        project(opts);
        opts.mountpoints = vec!["/proc".into(), "/dev/pts".into(), "/etc".into()];
    });
    let root = names(&f.v("/"));
    for n in ["proc", "dev", "etc", "src"] {
        assert!(root.contains(OsStr::new(n)), "{n} missing from {root:?}");
    }
    let md = fs::metadata(f.v("/dev/pts")).expect("synthetic dir");
    assert!(md.is_dir());
    assert_eq!(md.mode() & 0o7777, 0o755);
    assert!(fs::metadata(f.v("/proc")).expect("proc").is_dir());
    // A real directory listed as a mount point is served as is.
    assert!(names(&f.v("/etc")).contains(OsStr::new("conf")));
    fs::metadata(f.v("/etc/conf")).expect("stat conf");
    f.expect_none("/proc");
    f.expect_none("/dev");
    assert_eq!(f.count(AccessKind::Stat, "/etc"), 0);
    f.expect(AccessKind::Stat, "/etc/conf");
}

fn writes_outside_writable_fail_erofs() {
    let f = Fixture::new(tree, project);
    let erofs = libc::EROFS;
    assert_eq!(errno_of(fs::write(f.v("/etc/new"), b"x")), erofs);
    assert_eq!(
        errno_of(OpenOptions::new().append(true).open(f.v("/etc/conf"))),
        erofs
    );
    assert_eq!(errno_of(fs::remove_file(f.v("/etc/conf"))), erofs);
    assert_eq!(errno_of(fs::create_dir(f.v("/etc/d"))), erofs);
    assert_eq!(
        errno_of(fs::rename(f.v("/etc/conf"), f.v("/src/conf"))),
        erofs
    );
    assert_eq!(
        errno_of(fs::rename(f.v("/src/a.c"), f.v("/etc/a.c"))),
        erofs
    );
    assert_eq!(
        errno_of(fs::hard_link(f.v("/etc/conf"), f.v("/src/conf"))),
        erofs
    );
    assert_eq!(
        errno_of(fs::set_permissions(
            f.v("/etc/conf"),
            fs::Permissions::from_mode(0o600)
        )),
        erofs
    );
    assert_eq!(errno_of(symlink("x", f.v("/etc/sl"))), erofs);
    assert_eq!(read(&f.r("/etc/conf")), b"conf\n");
    assert!(!f.r("/etc/new").exists());
    assert_eq!(
        fs::read_dir(&f.layer).expect("layer").count(),
        0,
        "nothing copied up"
    );
}

fn copy_on_write_keeps_real_tree_untouched() {
    let f = Fixture::new(tree, project);
    write(&f.v("/src/a.c"), b"int a = 2;\n");
    write(&f.v("/src/new/deep/x.o"), b"x");
    fs::remove_file(f.v("/src/b.c")).expect("unlink");
    fs::rename(f.v("/src/sub/c.h"), f.v("/src/c.h")).expect("rename");
    OpenOptions::new()
        .append(true)
        .open(f.v("/src/c.h"))
        .expect("append")
        .write_all(b"more\n")
        .expect("append write");
    // The thunk sees its changes at once, listings included.
    assert_eq!(read(&f.v("/src/a.c")), b"int a = 2;\n");
    assert_eq!(read(&f.v("/src/c.h")), b"#define C\nmore\n");
    assert_eq!(
        names(&f.v("/src")),
        set(&["a.c", "c.h", "link", "new", "sub"])
    );
    assert!(names(&f.v("/src/sub")).is_empty());
    assert_eq!(errno_of(fs::metadata(f.v("/src/b.c"))), libc::ENOENT);
    assert_eq!(read(&f.v("/src/new/deep/x.o")), b"x");
    // A deleted name can be created again.
    write(&f.v("/src/b.c"), b"again");
    assert_eq!(read(&f.v("/src/b.c")), b"again");
    // The real tree is untouched.
    assert_eq!(read(&f.r("/src/a.c")), b"int a;\n");
    assert_eq!(read(&f.r("/src/b.c")), b"int b;\n");
    assert_eq!(read(&f.r("/src/sub/c.h")), b"#define C\n");
    assert!(!f.r("/src/c.h").exists());
    assert!(!f.r("/src/new").exists());
}

fn commit_applies_the_merged_view() {
    let mut f = Fixture::new(
        |real| {
            tree(real);
            write(&real.join("src/old/x"), b"x");
            write(&real.join("src/old/y/z"), b"z");
        },
        project,
    );
    write(&f.v("/src/a.c"), b"changed");
    write(&f.v("/src/gen/out.o"), b"object");
    fs::set_permissions(f.v("/src/gen/out.o"), fs::Permissions::from_mode(0o751)).expect("chmod");
    fs::set_permissions(f.v("/src/b.c"), fs::Permissions::from_mode(0o600)).expect("chmod lower");
    fs::remove_dir_all(f.v("/src/old")).expect("rm -r");
    fs::rename(f.v("/src/sub/c.h"), f.v("/src/c2.h")).expect("rename");
    symlink("gen/out.o", f.v("/src/latest")).expect("symlink");
    fs::create_dir(f.v("/src/empty")).expect("mkdir");
    fs::set_permissions(f.v("/src/empty"), fs::Permissions::from_mode(0o711)).expect("chmod dir");
    let summary = f.handle.commit().expect("commit");
    // Later changes are refused: the layer is gone.
    assert_eq!(errno_of(fs::write(f.v("/src/late"), b"")), libc::EROFS);
    f.unmount();
    assert_eq!(read(&f.r("/src/a.c")), b"changed");
    assert_eq!(read(&f.r("/src/gen/out.o")), b"object");
    assert_eq!(
        fs::metadata(f.r("/src/gen/out.o")).expect("out.o").mode() & 0o7777,
        0o751
    );
    assert_eq!(
        fs::metadata(f.r("/src/b.c")).expect("b.c").mode() & 0o7777,
        0o600
    );
    assert_eq!(read(&f.r("/src/b.c")), b"int b;\n");
    assert!(!f.r("/src/old").exists());
    assert!(!f.r("/src/sub/c.h").exists());
    assert_eq!(read(&f.r("/src/c2.h")), b"#define C\n");
    assert_eq!(
        fs::read_link(f.r("/src/latest")).expect("link"),
        Path::new("gen/out.o")
    );
    assert_eq!(
        fs::metadata(f.r("/src/empty")).expect("empty").mode() & 0o7777,
        0o711
    );
    assert!(!f.layer.exists(), "layer dir removed");
    assert_eq!(summary.symlinks, 1);
    assert!(summary.files >= 4, "{summary:?}");
    assert!(summary.dirs >= 2, "{summary:?}");
    assert!(summary.deleted >= 4, "{summary:?}");
    assert!(f.handle.commit().is_err(), "a second commit is refused");
}

/// An installer's writes under its prefix are read from the layer and left out of the commit;
/// the rest of the layer is applied as usual.
fn commit_except_keeps_a_subtree_in_the_layer() {
    let mut f = Fixture::new(
        |real| {
            tree(real);
            write(&real.join("prefix/bin/old"), b"old");
            write(&real.join("prefix/keep"), b"keep");
        },
        |opts| {
            opts.writable.push(PathBuf::from("/src"));
            opts.writable.push(PathBuf::from("/prefix"));
            opts.writable.push(PathBuf::from("/missing/prefix"));
        },
    );
    write(&f.v("/src/built.o"), b"object");
    write(&f.v("/prefix/bin/tool"), b"tool");
    fs::set_permissions(f.v("/prefix/bin/tool"), fs::Permissions::from_mode(0o755)).expect("chmod");
    symlink("tool", f.v("/prefix/bin/alias")).expect("symlink");
    fs::create_dir_all(f.v("/prefix/share/doc")).expect("mkdir");
    fs::remove_file(f.v("/prefix/bin/old")).expect("rm");
    assert_eq!(
        errno_of(fs::create_dir(f.v("/missing"))),
        libc::EROFS,
        "only the prefix itself is writable"
    );
    f.unmount();
    let changes = f
        .handle
        .changes_under(Path::new("/prefix"))
        .expect("changes");
    let views: Vec<&Path> = changes.upper.iter().map(|(v, _)| v.as_path()).collect();
    assert_eq!(
        views,
        [
            "/prefix",
            "/prefix/bin",
            "/prefix/bin/alias",
            "/prefix/bin/tool",
            "/prefix/share",
            "/prefix/share/doc"
        ]
        .map(Path::new)
    );
    let tool = &changes.upper[3].1;
    assert_eq!(read(tool), b"tool");
    assert_eq!(fs::metadata(tool).expect("tool").mode() & 0o7777, 0o755);
    assert_eq!(
        fs::read_link(&changes.upper[2].1).expect("alias"),
        Path::new("tool")
    );
    assert_eq!(changes.deleted, [PathBuf::from("/prefix/bin/old")]);
    assert_eq!(
        f.handle
            .changes_under(Path::new("/missing/prefix"))
            .expect("none"),
        cot_fusefs::LayerChanges::default()
    );
    f.handle
        .commit_except(&[PathBuf::from("/prefix")])
        .expect("commit");
    assert_eq!(read(&f.r("/src/built.o")), b"object", "the rest is applied");
    assert!(
        !f.r("/prefix/bin/tool").exists(),
        "the prefix is left alone"
    );
    assert!(!f.r("/prefix/bin/alias").exists());
    assert!(!f.r("/prefix/share").exists());
    assert_eq!(read(&f.r("/prefix/bin/old")), b"old");
    assert!(
        !f.layer.exists(),
        "the layer goes, kept-out changes with it"
    );
}

fn commit_replaces_changed_types() {
    let mut f = Fixture::new(
        |real| {
            write(&real.join("w/file_to_dir"), b"f");
            write(&real.join("w/dir_to_file/inner"), b"i");
            write(&real.join("w/dir_to_link/inner"), b"i");
        },
        |opts| opts.writable.push("/w".into()),
    );
    fs::remove_file(f.v("/w/file_to_dir")).expect("unlink");
    fs::create_dir(f.v("/w/file_to_dir")).expect("mkdir");
    write(&f.v("/w/file_to_dir/now"), b"n");
    fs::remove_dir_all(f.v("/w/dir_to_file")).expect("rm -r");
    write(&f.v("/w/dir_to_file"), b"file now");
    fs::remove_dir_all(f.v("/w/dir_to_link")).expect("rm -r");
    symlink("file_to_dir", f.v("/w/dir_to_link")).expect("symlink");
    // The re-created directory shows none of the old content.
    assert_eq!(names(&f.v("/w/file_to_dir")), set(&["now"]));
    f.handle.commit().expect("commit");
    f.unmount();
    assert_eq!(read(&f.r("/w/file_to_dir/now")), b"n");
    assert_eq!(read(&f.r("/w/dir_to_file")), b"file now");
    assert_eq!(
        fs::read_link(f.r("/w/dir_to_link")).expect("link"),
        Path::new("file_to_dir")
    );
}

fn discard_leaves_real_tree_untouched() {
    let mut f = Fixture::new(tree, project);
    write(&f.v("/src/a.c"), b"changed");
    fs::remove_dir_all(f.v("/src/sub")).expect("rm -r");
    write(&f.v("/src/n"), b"n");
    f.handle.discard().expect("discard");
    f.unmount();
    assert_eq!(read(&f.r("/src/a.c")), b"int a;\n");
    assert_eq!(read(&f.r("/src/sub/c.h")), b"#define C\n");
    assert!(!f.r("/src/n").exists());
    assert!(!f.layer.exists());
}

fn rename_of_lower_directory_moves_subtree() {
    let mut f = Fixture::new(
        |real| {
            write(&real.join("w/d/one"), b"1");
            write(&real.join("w/d/sub/two"), b"2");
            write(&real.join("w/d/gone"), b"g");
        },
        |opts| opts.writable.push("/w".into()),
    );
    // An open reader of a file in the moved directory keeps seeing the right file.
    let mut reader = File::open(f.v("/w/d/one")).expect("open one");
    fs::remove_file(f.v("/w/d/gone")).expect("unlink");
    write(&f.v("/w/d/sub/three"), b"3");
    fs::rename(f.v("/w/d"), f.v("/w/e")).expect("rename dir");
    assert_eq!(errno_of(fs::metadata(f.v("/w/d"))), libc::ENOENT);
    assert_eq!(names(&f.v("/w/e")), set(&["one", "sub"]));
    assert_eq!(names(&f.v("/w/e/sub")), set(&["two", "three"]));
    assert_eq!(read(&f.v("/w/e/sub/two")), b"2");
    write(&f.v("/w/e/one"), b"1 changed");
    let mut got = Vec::new();
    reader.read_to_end(&mut got).expect("read moved");
    assert_eq!(got, b"1 changed");
    drop(reader);
    // A new directory at the old name is empty.
    fs::create_dir(f.v("/w/d")).expect("mkdir again");
    assert!(names(&f.v("/w/d")).is_empty());
    f.handle.commit().expect("commit");
    f.unmount();
    assert!(f.r("/w/d").is_dir());
    assert!(names(&f.r("/w/d")).is_empty());
    assert_eq!(read(&f.r("/w/e/one")), b"1 changed");
    assert_eq!(read(&f.r("/w/e/sub/two")), b"2");
    assert_eq!(read(&f.r("/w/e/sub/three")), b"3");
    assert!(!f.r("/w/e/gone").exists());
}

fn odd_names_round_trip() {
    let bad = OsString::from_vec(b"bad\xff\xfe name".to_vec());
    let newline = OsString::from("new\nline");
    let mut f = Fixture::new(
        |real| {
            write(&real.join("w").join(&bad), b"bytes");
            write(&real.join("w/with space"), b"space");
        },
        |opts| opts.writable.push("/w".into()),
    );
    let w = f.v("/w");
    assert_eq!(
        names(&w),
        [bad.clone(), OsString::from("with space")]
            .into_iter()
            .collect()
    );
    assert_eq!(read(&w.join(&bad)), b"bytes");
    write(&w.join(&newline), b"nl");
    let bad2 = OsString::from_vec(b"\x80\x81".to_vec());
    fs::rename(w.join(&bad), w.join(&bad2)).expect("rename odd");
    let view_bad = PathBuf::from("/w").join(&bad);
    assert!(f
        .log()
        .iter()
        .any(|(k, p, _)| *k == AccessKind::Read && *p == view_bad));
    assert!(f
        .log()
        .iter()
        .any(|(k, p, _)| *k == AccessKind::Write && *p == Path::new("/w/new\nline")));
    f.handle.commit().expect("commit");
    f.unmount();
    assert_eq!(read(&f.r("/w").join(&bad2)), b"bytes");
    assert_eq!(read(&f.r("/w").join(&newline)), b"nl");
    assert!(!f.r("/w").join(&bad).exists());
}

fn unlinked_open_file_keeps_working() {
    let f = Fixture::new(tree, project);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(f.v("/src/tmp"))
        .expect("create");
    file.write_all(b"hello").expect("write");
    fs::remove_file(f.v("/src/tmp")).expect("unlink");
    assert_eq!(file.metadata().expect("fstat").len(), 5);
    file.seek(SeekFrom::Start(0)).expect("seek");
    let mut got = String::new();
    file.read_to_string(&mut got).expect("read");
    assert_eq!(got, "hello");
    // The name is free for a new, different file.
    write(&f.v("/src/tmp"), b"other");
    assert_eq!(read(&f.v("/src/tmp")), b"other");
    assert_eq!(file.metadata().expect("fstat").len(), 5);
    // A deleted real file still open for reading cannot be reopened for writing.
    let reader = File::open(f.v("/src/b.c")).expect("open b.c");
    fs::remove_file(f.v("/src/b.c")).expect("unlink b.c");
    let proc_fd = format!("/proc/self/fd/{}", reader.as_raw_fd());
    assert_eq!(
        errno_of(OpenOptions::new().write(true).open(&proc_fd)),
        libc::EROFS
    );
    assert_eq!(read(Path::new(&proc_fd)), b"int b;\n");
    assert_eq!(read(&f.r("/src/b.c")), b"int b;\n");
}

fn handle_is_shareable() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    fn check_send<T: Send + 'static>() {}
    check::<Handle>();
    check_send::<ProxyFs>();
    check_send::<Server>();
}

// ----- data paths -----

fn data_paths(passthrough: bool) {
    const BIG: usize = 9 * 1024 * 1024 + 123;
    let lower = pattern(BIG, 1);
    let lower2 = lower.clone();
    let f = Fixture::new(
        move |real| {
            write(&real.join("ro/big"), &lower2);
            write(&real.join("w/big"), &lower2);
        },
        move |opts| {
            opts.writable.push("/w".into());
            opts.passthrough = passthrough;
        },
    );
    assert_eq!(f.handle.passthrough_active(), passthrough);
    assert_eq!(read(&f.v("/ro/big")), lower);
    let stats = f.handle.stats();
    if passthrough {
        assert_eq!(
            stats.reads, 0,
            "passthrough reads reached the daemon: {stats:?}"
        );
        assert_eq!(stats.passthrough_opens, stats.opens, "{stats:?}");
    } else {
        assert!(stats.reads > 0, "{stats:?}");
    }
    // Positioned reads across the file.
    let mut file = File::open(f.v("/ro/big")).expect("open");
    for off in [0u64, 4095, 1 << 20, BIG as u64 - 10] {
        file.seek(SeekFrom::Start(off)).expect("seek");
        let mut buf = [0u8; 10];
        file.read_exact(&mut buf).expect("read");
        assert_eq!(&buf[..], &lower[off as usize..off as usize + 10]);
    }
    // Rewrite part of a lower file: copy-up, then partial writes.
    let mut w = OpenOptions::new()
        .write(true)
        .open(f.v("/w/big"))
        .expect("open w");
    w.seek(SeekFrom::Start(5 << 20)).expect("seek");
    w.write_all(&[7u8; 100_000]).expect("write");
    w.seek(SeekFrom::End(0)).expect("seek end");
    w.write_all(b"tail").expect("append");
    drop(w);
    let mut expected = lower.clone();
    expected[5 << 20..(5 << 20) + 100_000].fill(7);
    expected.extend_from_slice(b"tail");
    assert_eq!(read(&f.v("/w/big")), expected);
    assert_eq!(
        fs::metadata(f.v("/w/big")).expect("stat").len(),
        expected.len() as u64
    );
    assert_eq!(read(&f.r("/w/big")), lower, "real file untouched");
    // A new big file, written and read back.
    let fresh = pattern(3 << 20, 9);
    write(&f.v("/w/new"), &fresh);
    assert_eq!(read(&f.v("/w/new")), fresh);
    // Truncate through the open file and by path.
    let t = OpenOptions::new()
        .write(true)
        .open(f.v("/w/new"))
        .expect("open");
    t.set_len(1000).expect("ftruncate");
    drop(t);
    assert_eq!(read(&f.v("/w/new")), &fresh[..1000]);
    if passthrough {
        let stats = f.handle.stats();
        assert_eq!(stats.reads + stats.writes, 0, "{stats:?}");
        assert_eq!(stats.passthrough_opens, stats.opens, "{stats:?}");
    }
    // mmap, shared and writable, when python3 is there to do it.
    if let Some(python) = python3() {
        let mut head = OpenOptions::new()
            .write(true)
            .open(f.v("/w/new"))
            .expect("open");
        head.write_all(b"abcd").expect("write head");
        drop(head);
        let status = Command::new(python)
            .arg("-c")
            .arg(
                "import mmap,sys\n\
                 f=open(sys.argv[1],'r+b'); m=mmap.mmap(f.fileno(),0)\n\
                 assert m[0:4]==b'abcd', m[0:4]\n\
                 m[0:4]=b'MMAP'; m.flush(); m.close(); f.close()",
            )
            .arg(f.v("/w/new"))
            .status()
            .expect("run python3");
        assert!(status.success(), "mmap through the view failed");
        assert_eq!(&read(&f.v("/w/new"))[..4], b"MMAP");
    } else {
        eprintln!("note: python3 not found, shared mmap not exercised");
    }
}

fn python3() -> Option<&'static str> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

fn data_path_userspace() {
    data_paths(false);
}

fn data_path_passthrough() {
    data_paths(true);
}

fn copy_up_while_reader_open(passthrough: bool) {
    let f = Fixture::new(
        |real| write(&real.join("w/f"), b"old content\n"),
        move |opts| {
            opts.writable.push("/w".into());
            opts.passthrough = passthrough;
        },
    );
    let mut reader = File::open(f.v("/w/f")).expect("open reader");
    let mut buf = [0u8; 4];
    reader.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"old ");
    // Opening for writing copies the file up while the reader is open.
    let mut writer = OpenOptions::new()
        .write(true)
        .open(f.v("/w/f"))
        .expect("open writer");
    writer.write_all(b"NEW content\n").expect("write");
    drop(writer);
    let mut rest = Vec::new();
    reader.seek(SeekFrom::Start(0)).expect("rewind");
    reader.read_to_end(&mut rest).expect("read rest");
    assert_eq!(
        rest, b"NEW content\n",
        "the open reader sees the thunk's write"
    );
    // A second reader and writer at once.
    let r2 = File::open(f.v("/w/f")).expect("second reader");
    let mut w2 = OpenOptions::new()
        .append(true)
        .open(f.v("/w/f"))
        .expect("second writer");
    w2.write_all(b"more\n").expect("append");
    drop((r2, w2));
    assert_eq!(read(&f.v("/w/f")), b"NEW content\nmore\n");
    assert_eq!(read(&f.r("/w/f")), b"old content\n");
}

fn copy_up_while_reader_open_userspace() {
    copy_up_while_reader_open(false);
}

fn copy_up_while_reader_open_passthrough() {
    copy_up_while_reader_open(true);
}

fn concurrent_opens_share_one_backing() {
    let f = Fixture::new(
        |real| {
            write(&real.join("ro/f"), b"read only");
            write(&real.join("w/g"), b"gee");
        },
        |opts| {
            opts.writable.push("/w".into());
            opts.passthrough = true;
        },
    );
    // Many threads opening the same files at once, readers and writers mixed.
    let ro = f.v("/ro/f");
    let g = f.v("/w/g");
    write(&g, b"upper now");
    std::thread::scope(|s| {
        for i in 0..8 {
            let ro = ro.clone();
            let g = g.clone();
            s.spawn(move || {
                for _ in 0..50 {
                    assert_eq!(read(&ro), b"read only");
                    if i % 2 == 0 {
                        let file = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(&g)
                            .expect("rw");
                        drop(file);
                    } else {
                        assert_eq!(read(&g), b"upper now");
                    }
                }
            });
        }
    });
}

fn exec_and_mmap_through_the_view() {
    let bin = ["/usr/bin/true", "/bin/true"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a true binary");
    for passthrough in [false, true] {
        let f = Fixture::new(
            |real| {
                fs::create_dir_all(real.join("bin")).expect("bin");
                fs::copy(bin, real.join("bin/true")).expect("copy true");
            },
            move |opts| opts.passthrough = passthrough,
        );
        let status = Command::new(f.v("/bin/true"))
            .status()
            .expect("exec from the view");
        assert!(status.success());
        f.expect(AccessKind::Read, "/bin/true");
    }
}

fn binds_map_view_subtrees() {
    let other = tempfile::tempdir().expect("tempdir");
    let proj = other.path().join("proj");
    write(&proj.join("main.c"), b"int main;");
    write(&proj.join("sub/x.h"), b"x");
    let proj2 = proj.clone();
    let mut f = Fixture::new(
        |real| write(&real.join("usr/include/stdio.h"), b"stdio"),
        move |opts| {
            opts.binds.push(("/home/u/proj".into(), proj2));
            opts.writable.push("/home/u/proj".into());
        },
    );
    // The ancestors the real root lacks are synthetic, unrecorded directories.
    assert!(names(&f.v("/")).contains(OsStr::new("home")));
    assert_eq!(names(&f.v("/home/u")), set(&["proj"]));
    assert_eq!(read(&f.v("/home/u/proj/main.c")), b"int main;");
    assert_eq!(read(&f.v("/usr/include/stdio.h")), b"stdio");
    f.expect(AccessKind::Read, "/home/u/proj/main.c");
    f.expect_none("/home/u/proj/sub");
    assert_eq!(f.count(AccessKind::Stat, "/home"), 0);
    // Writes land in the bound directory at commit.
    write(&f.v("/home/u/proj/out/main.o"), b"obj");
    fs::remove_file(f.v("/home/u/proj/sub/x.h")).expect("unlink");
    assert_eq!(errno_of(fs::remove_dir(f.v("/home/u/proj"))), libc::EBUSY);
    assert_eq!(errno_of(fs::write(f.v("/home/u/other"), b"")), libc::EROFS);
    f.handle.commit().expect("commit");
    f.unmount();
    assert_eq!(read(&proj.join("out/main.o")), b"obj");
    assert!(!proj.join("sub/x.h").exists());
    assert!(!f.r("/home").exists());
}

fn parallel_writers_commit_consistently() {
    let mut f = Fixture::new(
        |real| {
            for t in 0..4 {
                write(&real.join(format!("w/t{t}/old")), b"old");
            }
        },
        |opts| {
            opts.writable.push("/w".into());
            opts.passthrough = true;
        },
    );
    std::thread::scope(|s| {
        for t in 0..4 {
            let dir = f.v(&format!("/w/t{t}"));
            s.spawn(move || {
                for j in 0..40 {
                    let tmp = dir.join(format!("tmp{j}"));
                    write(&tmp, format!("{t}-{j}").as_bytes());
                    fs::rename(&tmp, dir.join(format!("f{j}"))).expect("rename");
                    if j % 4 == 0 {
                        fs::remove_file(dir.join(format!("f{j}"))).expect("unlink");
                    }
                }
                fs::remove_file(dir.join("old")).expect("unlink old");
                fs::create_dir(dir.join("d")).expect("mkdir");
            });
        }
    });
    let expected: BTreeSet<OsString> = (0..40)
        .filter(|j| j % 4 != 0)
        .map(|j| OsString::from(format!("f{j}")))
        .chain([OsString::from("d")])
        .collect();
    for t in 0..4 {
        assert_eq!(names(&f.v(&format!("/w/t{t}"))), expected);
    }
    f.handle.commit().expect("commit");
    f.unmount();
    for t in 0..4 {
        assert_eq!(names(&f.r(&format!("/w/t{t}"))), expected);
        assert_eq!(
            read(&f.r(&format!("/w/t{t}/f5"))),
            format!("{t}-5").as_bytes()
        );
    }
}

// ----- nested thunks: invalidate and publish -----

/// Replaces the real file at `path` as a commit does: a new file renamed over it.
fn replace(path: &Path, data: &[u8]) {
    let tmp = path.with_file_name(".replacing");
    write(&tmp, data);
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename over {path:?}: {e}"));
}

fn invalidate(f: &Fixture, paths: &[&str]) {
    let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    f.handle.invalidate(&paths).expect("invalidate");
}

fn invalidate_shows_changes_behind_the_mount() {
    let f = Fixture::new(
        |real| {
            tree(real);
            write(&real.join("src/doomed/x"), b"x");
        },
        project,
    );
    // A name looked up as absent, then created behind the mount's back: the kernel keeps
    // the absence for the entry timeout, until invalidated.
    assert_eq!(errno_of(fs::metadata(f.v("/src/late.h"))), libc::ENOENT);
    write(&f.r("/src/late.h"), b"late");
    assert_eq!(
        errno_of(fs::metadata(f.v("/src/late.h"))),
        libc::ENOENT,
        "the kernel caches the absence"
    );
    invalidate(&f, &["/src/late.h"]);
    assert_eq!(read(&f.v("/src/late.h")), b"late");
    // The directory holding it shows its new times.
    assert_eq!(
        fs::metadata(f.v("/src")).expect("src").mtime_nsec(),
        fs::metadata(f.r("/src")).expect("real src").mtime_nsec()
    );
    // A new directory whose name was looked up as absent: naming the file in it is enough.
    assert_eq!(errno_of(fs::metadata(f.v("/src/gen/out.h"))), libc::ENOENT);
    write(&f.r("/src/gen/out.h"), b"out");
    invalidate(&f, &["/src/gen/out.h"]);
    assert_eq!(read(&f.v("/src/gen/out.h")), b"out");
    assert_eq!(names(&f.v("/src/gen")), set(&["out.h"]));
    // A file deleted, a symlink retargeted (the kernel caches symlink targets) and a
    // directory removed with its files.
    assert_eq!(read(&f.v("/src/b.c")), b"int b;\n");
    assert_eq!(read(&f.v("/src/link")), b"int a;\n");
    assert_eq!(read(&f.v("/src/doomed/x")), b"x");
    fs::remove_file(f.r("/src/b.c")).expect("rm b.c");
    fs::remove_file(f.r("/src/link")).expect("rm link");
    symlink("sub/c.h", f.r("/src/link")).expect("symlink");
    fs::remove_dir_all(f.r("/src/doomed")).expect("rm -r doomed");
    invalidate(&f, &["/src/b.c", "/src/link", "/src/doomed"]);
    assert_eq!(errno_of(fs::metadata(f.v("/src/b.c"))), libc::ENOENT);
    assert_eq!(
        fs::read_link(f.v("/src/link")).expect("readlink"),
        Path::new("sub/c.h")
    );
    assert_eq!(read(&f.v("/src/link")), b"#define C\n");
    assert_eq!(errno_of(fs::metadata(f.v("/src/doomed/x"))), libc::ENOENT);
    assert_eq!(errno_of(fs::metadata(f.v("/src/doomed"))), libc::ENOENT);
    // The name can come back, as something else.
    write(&f.r("/src/doomed"), b"a file now");
    invalidate(&f, &["/src/doomed"]);
    assert_eq!(read(&f.v("/src/doomed")), b"a file now");
    // What the thunk wrote itself keeps showing the layer's version.
    write(&f.v("/src/a.c"), b"mine");
    replace(&f.r("/src/a.c"), b"theirs");
    invalidate(&f, &["/src/a.c"]);
    assert_eq!(read(&f.v("/src/a.c")), b"mine");
    // Paths the filesystem never saw, the root, internal ones: nothing to do.
    invalidate(&f, &["/nowhere/at/all", "/", "/src/./sub"]);
    assert!(f.handle.invalidate(&[PathBuf::from("relative")]).is_err());
    // Every access went through the filesystem and was recorded once.
    f.expect(AccessKind::Stat, "/src/late.h");
    f.expect(AccessKind::Absent, "/src/late.h");
}

fn invalidate_shows_replaced_content(passthrough: bool) {
    let f = Fixture::new(
        |real| {
            write(&real.join("ro/f"), b"old content\n");
            write(&real.join("w/g"), b"old content\n");
        },
        move |opts| {
            opts.writable.push("/w".into());
            opts.passthrough = passthrough;
        },
    );
    // Replacements of the same size: the kernel keeps the pages it has (and with passthrough
    // the open node keeps its backing file). A change of size the kernel may notice by itself
    // (a read past the cached end of file refetches the size and drops the pages).
    let same = b"NEW CONTENT\n";
    let longer = b"new and longer content\n";
    let again = b"NEW AND LONGER CONTENT\n";
    // A read-only file (passed through when passthrough is on) and a writable one (never a
    // backing file while it may be copied up).
    for view in ["/ro/f", "/w/g"] {
        assert_eq!(read(&f.v(view)), b"old content\n");
        let mut held = File::open(f.v(view)).expect("open held");
        replace(&f.r(view), same);
        assert_eq!(read(&f.v(view)), b"old content\n", "{view}: cached");
        invalidate(&f, &[view]);
        assert_eq!(read(&f.v(view)), same, "{view}");
        // The reader opened before keeps the old file, as after a rename over it on a real
        // file system; opens after the invalidation get the new one while it is open.
        let mut got = Vec::new();
        held.read_to_end(&mut got).expect("read held");
        assert_eq!(got, b"old content\n", "{view}: the held reader");
        drop(held);
        // Another size, no file open.
        replace(&f.r(view), longer);
        invalidate(&f, &[view]);
        assert_eq!(
            fs::metadata(f.v(view)).expect("stat").len(),
            longer.len() as u64,
            "{view}"
        );
        assert_eq!(read(&f.v(view)), longer, "{view}");
        // The same size again, no file open: the node stays, its pages go.
        replace(&f.r(view), again);
        // Pages are cached unless the data is passed through (no file open: a fresh
        // backing file).
        if !(passthrough && view == "/ro/f") {
            assert_eq!(read(&f.v(view)), longer, "{view}: cached");
        }
        invalidate(&f, &[view]);
        assert_eq!(read(&f.v(view)), again, "{view}");
    }
    // The writable file, changed behind the mount's back, then written through it: the
    // copy-up starts from the new version and the real file stays as the other process left
    // it.
    OpenOptions::new()
        .append(true)
        .open(f.v("/w/g"))
        .expect("append")
        .write_all(b"more\n")
        .expect("write");
    let mut expected = again.to_vec();
    assert_eq!(read(&f.r("/w/g")), expected);
    expected.extend_from_slice(b"more\n");
    assert_eq!(read(&f.v("/w/g")), expected);
}

fn invalidate_shows_replaced_content_userspace() {
    invalidate_shows_replaced_content(false);
}

fn invalidate_shows_replaced_content_passthrough() {
    invalidate_shows_replaced_content(true);
}

fn invalidate_without_session_updates_nodes() {
    let mut f = Fixture::new(tree, project);
    fs::metadata(f.v("/src/a.c")).expect("stat");
    f.unmount();
    // No session: only the filesystem's own state changes, and nothing fails.
    fs::remove_file(f.r("/src/a.c")).expect("rm");
    invalidate(&f, &["/src/a.c", "/src/sub", "/src/new"]);
}

fn publish_then_discard_keeps_the_published() {
    let mut f = Fixture::new(
        |real| {
            tree(real);
            write(&real.join("src/old/x"), b"x");
        },
        project,
    );
    write(&f.v("/src/a.c"), b"published");
    write(&f.v("/src/gen/out.o"), b"object");
    fs::create_dir(f.v("/src/empty")).expect("mkdir");
    fs::remove_file(f.v("/src/b.c")).expect("unlink");
    fs::remove_dir_all(f.v("/src/old")).expect("rm -r");
    fs::rename(f.v("/src/sub/c.h"), f.v("/src/c.h")).expect("rename");
    let summary = f.handle.publish().expect("publish");
    assert!(summary.files >= 3 && summary.dirs >= 2, "{summary:?}");
    assert!(summary.deleted >= 3, "{summary:?}");
    // The real tree has everything; the layer is empty again; the view is unchanged.
    assert_eq!(read(&f.r("/src/a.c")), b"published");
    assert_eq!(read(&f.r("/src/gen/out.o")), b"object");
    assert!(f.r("/src/empty").is_dir());
    assert!(!f.r("/src/b.c").exists() && !f.r("/src/old").exists());
    assert!(!f.r("/src/sub/c.h").exists());
    assert_eq!(read(&f.r("/src/c.h")), b"#define C\n");
    assert_eq!(fs::read_dir(&f.layer).expect("layer").count(), 0);
    assert!(!journal_of(&f.layer).exists());
    assert_eq!(read(&f.v("/src/a.c")), b"published");
    assert_eq!(
        names(&f.v("/src")),
        set(&["a.c", "c.h", "empty", "gen", "link", "sub"])
    );
    assert!(names(&f.v("/src/sub")).is_empty());
    // Later changes go to the layer, also for the published files.
    write(&f.v("/src/a.c"), b"later");
    write(&f.v("/src/late.c"), b"late");
    write(&f.v("/src/gen/more.o"), b"more");
    fs::remove_file(f.v("/src/gen/out.o")).expect("unlink published");
    fs::remove_dir(f.v("/src/empty")).expect("rmdir published");
    assert_eq!(read(&f.v("/src/a.c")), b"later");
    assert_eq!(names(&f.v("/src/gen")), set(&["more.o"]));
    assert_eq!(read(&f.r("/src/a.c")), b"published");
    f.handle.discard().expect("discard");
    f.unmount();
    assert_eq!(read(&f.r("/src/a.c")), b"published");
    assert_eq!(read(&f.r("/src/gen/out.o")), b"object");
    assert!(f.r("/src/empty").is_dir());
    assert!(!f.r("/src/late.c").exists() && !f.r("/src/gen/more.o").exists());
    assert!(!f.layer.exists());
    // The access log is the thunk's whole story.
    f.expect(AccessKind::Write, "/src/gen/out.o");
    f.expect(AccessKind::Delete, "/src/gen/out.o");
}

fn publish_then_commit(layer_fs: Option<&Path>) {
    let mut f = Fixture::new(tree, |opts| {
        project(opts);
        if let Some(dir) = layer_fs {
            opts.layer_dir = dir.join("layer");
            fs::create_dir(&opts.layer_dir).expect("layer dir");
        }
    });
    write(&f.v("/src/a.c"), b"first");
    write(&f.v("/src/gen/one.o"), b"one");
    fs::remove_file(f.v("/src/b.c")).expect("unlink");
    f.handle.publish().expect("publish");
    assert_eq!(read(&f.r("/src/gen/one.o")), b"one");
    assert!(!f.r("/src/b.c").exists());
    // A second round, touching what the first published.
    write(&f.v("/src/gen/two.o"), b"two");
    write(&f.v("/src/b.c"), b"b again");
    fs::rename(f.v("/src/gen"), f.v("/src/out")).expect("rename published dir");
    let second = f.handle.publish().expect("second publish");
    assert!(second.files >= 3, "{second:?}");
    assert_eq!(read(&f.r("/src/out/one.o")), b"one");
    assert!(!f.r("/src/gen").exists());
    // A publish with nothing to do.
    assert_eq!(
        f.handle.publish().expect("empty publish"),
        cot_fusefs::CommitSummary::default()
    );
    // The last round, committed.
    write(&f.v("/src/a.c"), b"last");
    fs::remove_file(f.v("/src/out/two.o")).expect("unlink");
    fs::create_dir(f.v("/src/out/sub")).expect("mkdir");
    write(&f.v("/src/out/sub/three.o"), b"three");
    symlink("out/one.o", f.v("/src/latest")).expect("symlink");
    assert_eq!(read(&f.r("/src/a.c")), b"first");
    f.handle.commit().expect("commit");
    assert!(f.handle.publish().is_err(), "no publish after commit");
    f.unmount();
    assert_eq!(read(&f.r("/src/a.c")), b"last");
    assert_eq!(read(&f.r("/src/b.c")), b"b again");
    assert_eq!(names(&f.r("/src/out")), set(&["one.o", "sub"]));
    assert_eq!(read(&f.r("/src/out/sub/three.o")), b"three");
    assert_eq!(
        fs::read_link(f.r("/src/latest")).expect("link"),
        Path::new("out/one.o")
    );
    assert!(!f.layer.exists());
}

fn publish_then_commit_applies_both() {
    publish_then_commit(None);
}

fn publish_then_commit_applies_both_across_file_systems() {
    let dir = tempfile::tempdir().expect("tempdir");
    rustix::mount::mount(
        "cot-test",
        dir.path(),
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .expect("mount tmpfs");
    let _guard = MountGuard(dir.path().to_path_buf());
    publish_then_commit(Some(dir.path()));
}

/// A file the thunk holds open across a publish: published as it was, and the writes through
/// the open descriptor after it go to the layer, applied by commit and dropped by discard.
fn publish_keeps_open_files_in_the_layer(passthrough: bool) {
    for commit in [false, true] {
        let mut f = Fixture::new(
            |real| write(&real.join("w/lower"), b"lower\n"),
            move |opts| {
                opts.writable.push("/w".into());
                opts.passthrough = passthrough;
            },
        );
        let mut log = OpenOptions::new()
            .append(true)
            .create(true)
            .open(f.v("/w/log"))
            .expect("create log");
        log.write_all(b"one\n").expect("write");
        let mut lower = OpenOptions::new()
            .append(true)
            .open(f.v("/w/lower"))
            .expect("open lower");
        lower.write_all(b"copied up\n").expect("write");
        let reader = File::open(f.v("/w/log")).expect("reader");
        f.handle.publish().expect("publish");
        assert_eq!(read(&f.r("/w/log")), b"one\n");
        assert_eq!(read(&f.r("/w/lower")), b"lower\ncopied up\n");
        assert_eq!(
            names(&f.layer.join("w")),
            set(&["log", "lower"]),
            "open files stay in the layer"
        );
        log.write_all(b"two\n").expect("write after publish");
        lower.write_all(b"later\n").expect("write after publish");
        // A new open while the old ones are open sees the same file.
        OpenOptions::new()
            .append(true)
            .open(f.v("/w/log"))
            .expect("reopen")
            .write_all(b"three\n")
            .expect("write");
        drop(reader);
        assert_eq!(read(&f.v("/w/log")), b"one\ntwo\nthree\n");
        assert_eq!(read(&f.v("/w/lower")), b"lower\ncopied up\nlater\n");
        assert_eq!(
            read(&f.r("/w/log")),
            b"one\n",
            "later writes stay in the layer"
        );
        drop((log, lower));
        if commit {
            f.handle.commit().expect("commit");
        } else {
            f.handle.discard().expect("discard");
        }
        f.unmount();
        let (log, lower): (&[u8], &[u8]) = if commit {
            (b"one\ntwo\nthree\n", b"lower\ncopied up\nlater\n")
        } else {
            (b"one\n", b"lower\ncopied up\n")
        };
        assert_eq!(read(&f.r("/w/log")), log, "commit: {commit}");
        assert_eq!(read(&f.r("/w/lower")), lower, "commit: {commit}");
        assert_eq!(names(&f.r("/w")), set(&["log", "lower"]), "no stray copies");
    }
}

fn publish_keeps_open_files_in_the_layer_userspace() {
    publish_keeps_open_files_in_the_layer(false);
}

fn publish_keeps_open_files_in_the_layer_passthrough() {
    publish_keeps_open_files_in_the_layer(true);
}

// ----- crash safety of commit -----

/// The real tree the crash tests change.
fn crash_tree(real: &Path) {
    write(&real.join("w/keep"), b"keep");
    write(&real.join("w/over"), b"old content");
    write(&real.join("w/gone"), b"gone");
    write(&real.join("w/olddir/a"), b"a");
    write(&real.join("w/olddir/sub/b"), b"b");
    write(&real.join("w/mv/one"), b"1");
    write(&real.join("w/mv/sub/two"), b"2");
    write(&real.join("w/f2d"), b"a file for now");
    write(&real.join("w/d2f/x"), b"x");
    write(&real.join("w/rec/c1"), b"c1");
    write(&real.join("w/rec/c2/deep"), b"deep");
    write(&real.join("w/same/old"), b"old");
    write(&real.join("w").join(OsStr::from_bytes(b"bad\xff")), b"bad");
    fs::set_permissions(real.join("w/same"), fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// What the thunk does: creates, overwrites, deletes (files and non-empty directories),
/// renames a directory with children, makes a symlink, changes types both ways, re-creates a
/// deleted directory with part of its old names, changes modes and uses non-UTF-8 names.
fn crash_changes(f: &Fixture) {
    write(&f.v("/w/created"), b"created");
    write(&f.v("/w/new/deep/x.o"), &pattern(100_000, 7));
    write(&f.v("/w/over"), b"new content");
    fs::remove_file(f.v("/w/gone")).expect("unlink");
    fs::remove_dir_all(f.v("/w/olddir")).expect("rm -r");
    fs::rename(f.v("/w/mv"), f.v("/w/moved")).expect("rename dir");
    write(&f.v("/w/moved/sub/three"), b"3");
    symlink("moved/one", f.v("/w/link")).expect("symlink");
    fs::remove_file(f.v("/w/f2d")).expect("unlink");
    fs::create_dir(f.v("/w/f2d")).expect("mkdir");
    write(&f.v("/w/f2d/inner"), b"inner");
    fs::set_permissions(f.v("/w/f2d"), fs::Permissions::from_mode(0o750)).expect("chmod");
    fs::remove_dir_all(f.v("/w/d2f")).expect("rm -r");
    write(&f.v("/w/d2f"), b"a file now");
    fs::remove_dir_all(f.v("/w/rec")).expect("rm -r");
    fs::create_dir_all(f.v("/w/rec/c2")).expect("mkdir");
    write(&f.v("/w/rec/c2/fresh"), b"fresh");
    write(&f.v("/w/same/added"), b"added");
    fs::set_permissions(f.v("/w/same"), fs::Permissions::from_mode(0o705)).expect("chmod");
    fs::set_permissions(f.v("/w/keep"), fs::Permissions::from_mode(0o600)).expect("chmod");
    write(&f.v("/w").join(OsStr::from_bytes(b"\xfe\xfdnew")), b"odd");
    write(
        &f.v("/w").join(OsStr::from_bytes(b"bad\xff")),
        b"bad, changed",
    );
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    /// `data` is the content, escaped, or its size and hash when longer than 64 bytes.
    File {
        mode: u32,
        owner: (u32, u32),
        data: String,
    },
    Dir {
        mode: u32,
        owner: (u32, u32),
    },
    Symlink {
        target: PathBuf,
    },
    Other {
        mode: u32,
    },
}

/// Every entry under `root` (relative path as bytes) with its type, mode, owner, and content
/// or link target.
fn listing(root: &Path) -> BTreeMap<Vec<u8>, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, Entry>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {dir:?}: {e}")) {
            let path = entry.expect("dir entry").path();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let rel = path.strip_prefix(root).expect("beneath root");
            let mode = meta.mode() & 0o7777;
            let owner = (meta.uid(), meta.gid());
            let kind = meta.file_type();
            let entry = if kind.is_dir() {
                walk(root, &path, out);
                Entry::Dir { mode, owner }
            } else if kind.is_symlink() {
                Entry::Symlink {
                    target: fs::read_link(&path).expect("readlink"),
                }
            } else if kind.is_file() {
                let data = read(&path);
                let data = if data.len() <= 64 {
                    data.escape_ascii().to_string()
                } else {
                    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
                    });
                    format!("{} bytes, FNV-1a {hash:016x}", data.len())
                };
                Entry::File { mode, owner, data }
            } else {
                Entry::Other { mode: meta.mode() }
            };
            out.insert(rel.as_os_str().as_bytes().to_vec(), entry);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn journal_of(layer: &Path) -> PathBuf {
    let mut name = layer.file_name().expect("layer name").to_os_string();
    name.push(".journal");
    layer.with_file_name(name)
}

/// Unmounts a file system when dropped.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

/// For every `n` up to the number of operations of the commit of [`crash_changes`]: stops the
/// commit after `n` operations, recovers, and compares the real tree with the one a complete
/// commit gives. `layer_fs` holds the layers (a file system of its own when given).
fn check_commit_interrupted_anywhere(layer_fs: Option<&Path>) {
    let layer_of = |name: String| {
        move |opts: &mut Options| {
            opts.writable.push("/w".into());
            if let Some(dir) = layer_fs {
                let layer = dir.join(name);
                fs::create_dir(&layer).expect("layer dir");
                opts.layer_dir = layer;
            }
        }
    };
    let mut f = Fixture::new(crash_tree, layer_of("complete".into()));
    crash_changes(&f);
    let summary = f.handle.commit().expect("commit");
    f.unmount();
    let expected = listing(&f.real);
    // A sample of what the complete commit does, checked by the tests above in detail.
    assert!(
        matches!(&expected[&b"w/moved/sub/three"[..]], Entry::File { data, .. } if data == "3")
    );
    assert!(matches!(
        &expected[&b"w/rec/c2/fresh"[..]],
        Entry::File { .. }
    ));
    assert!(!expected.contains_key(&b"w/rec/c1"[..]) && !expected.contains_key(&b"w/mv"[..]));
    assert!(matches!(
        &expected[&b"w/f2d"[..]],
        Entry::Dir { mode: 0o750, .. }
    ));
    assert!(matches!(
        &expected[&b"w/same"[..]],
        Entry::Dir { mode: 0o705, .. }
    ));
    assert!(matches!(
        &expected[&b"w/\xfe\xfdnew"[..]],
        Entry::File { .. }
    ));
    assert!(!f.layer.exists() && !journal_of(&f.layer).exists());

    let mut n = 0;
    loop {
        let mut f = Fixture::new(crash_tree, layer_of(format!("layer{n}")));
        crash_changes(&f);
        let total = f
            .handle
            .commit_interrupted_after(n)
            .expect("interrupted commit");
        assert!(total > 20, "the commit has {total} operations");
        f.unmount();
        assert!(
            journal_of(&f.layer).exists(),
            "journal kept after {n} of {total}"
        );
        let recovered = cot_fusefs::recover(&f.layer).expect("recover");
        assert_eq!(
            recovered,
            Recovery::Completed(summary),
            "after {n} of {total}"
        );
        assert_eq!(
            listing(&f.real),
            expected,
            "real tree after recovering from a stop after {n} of {total} operations"
        );
        assert!(!f.layer.exists(), "layer removed");
        assert!(!journal_of(&f.layer).exists(), "journal removed");
        // Recovering again finds nothing to do.
        assert_eq!(
            cot_fusefs::recover(&f.layer).expect("recover again"),
            Recovery::Discarded
        );
        assert_eq!(listing(&f.real), expected);
        if n >= total {
            break;
        }
        n += 1;
    }
}

fn commit_interrupted_anywhere_is_recovered() {
    check_commit_interrupted_anywhere(None);
}

fn commit_interrupted_anywhere_is_recovered_across_file_systems() {
    let dir = tempfile::tempdir().expect("tempdir");
    rustix::mount::mount(
        "cot-test",
        dir.path(),
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .expect("mount tmpfs");
    let _guard = MountGuard(dir.path().to_path_buf());
    check_commit_interrupted_anywhere(Some(dir.path()));
}

/// Like [`check_commit_interrupted_anywhere`] for a publish, with a file held open across it
/// (published as a copy): the real tree must end up as a complete commit leaves it.
fn publish_interrupted_anywhere_is_recovered() {
    let writable = |opts: &mut Options| opts.writable.push("/w".into());
    let mut f = Fixture::new(crash_tree, writable);
    crash_changes(&f);
    let summary = f.handle.commit().expect("commit");
    f.unmount();
    let expected = listing(&f.real);
    // A complete publish changes the real tree exactly as the commit did.
    let mut f = Fixture::new(crash_tree, writable);
    crash_changes(&f);
    let held = OpenOptions::new()
        .append(true)
        .open(f.v("/w/created"))
        .expect("open");
    assert_eq!(f.handle.publish().expect("publish"), summary);
    assert_eq!(listing(&f.real), expected);
    drop(held);
    f.handle.discard().expect("discard");
    f.unmount();
    assert_eq!(listing(&f.real), expected);

    let mut n = 0;
    loop {
        let mut f = Fixture::new(crash_tree, writable);
        crash_changes(&f);
        let held = OpenOptions::new()
            .append(true)
            .open(f.v("/w/created"))
            .expect("open");
        let total = f
            .handle
            .publish_interrupted_after(n)
            .expect("interrupted publish");
        assert!(total > 20, "the publish has {total} operations");
        assert_eq!(
            errno_of(fs::write(f.v("/w/late"), b"")),
            libc::EROFS,
            "an interrupted publish seals the layer"
        );
        drop(held);
        f.unmount();
        assert!(
            journal_of(&f.layer).exists(),
            "journal kept after {n} of {total}"
        );
        assert_eq!(
            cot_fusefs::recover(&f.layer).expect("recover"),
            Recovery::Completed(summary),
            "after {n} of {total}"
        );
        assert_eq!(
            listing(&f.real),
            expected,
            "real tree after recovering from a publish stopped after {n} of {total} operations"
        );
        assert!(!f.layer.exists() && !journal_of(&f.layer).exists());
        if n >= total {
            break;
        }
        n += 1;
    }
}

fn recover_discards_a_layer_without_journal() {
    let mut f = Fixture::new(crash_tree, |opts| opts.writable.push("/w".into()));
    let before = listing(&f.real);
    crash_changes(&f);
    // The process dies before committing: the layer holds the changes, there is no journal.
    f.unmount();
    assert!(fs::read_dir(&f.layer).expect("layer").count() > 0);
    assert_eq!(
        cot_fusefs::recover(&f.layer).expect("recover"),
        Recovery::Discarded
    );
    assert_eq!(listing(&f.real), before);
    assert!(!f.layer.exists());
}

fn recover_discards_a_torn_journal() {
    let mut f = Fixture::new(crash_tree, |opts| opts.writable.push("/w".into()));
    let before = listing(&f.real);
    crash_changes(&f);
    f.handle
        .commit_interrupted_after(0)
        .expect("interrupted commit");
    f.unmount();
    let journal = journal_of(&f.layer);
    let bytes = read(&journal);
    fs::write(&journal, &bytes[..bytes.len() / 2]).expect("truncate journal");
    let mut tmp = journal.clone().into_os_string();
    tmp.push(".tmp");
    fs::write(&tmp, &bytes[..10]).expect("stray temporary journal");
    assert_eq!(
        cot_fusefs::recover(&f.layer).expect("recover"),
        Recovery::Discarded
    );
    assert_eq!(listing(&f.real), before);
    assert!(!f.layer.exists());
    assert!(!journal.exists());
    assert!(!Path::new(&tmp).exists());
}

fn recover_refuses_an_unknown_journal_version() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let layer = tmp.path().join("layer");
    write(&layer.join("w/file"), b"from the layer");
    let journal = journal_of(&layer);
    fs::write(
        &journal,
        b"cot-fusefs-journal 99\nwhatever a later version writes",
    )
    .expect("journal");
    let err = cot_fusefs::recover(&layer).expect_err("an unknown version is refused");
    assert!(
        matches!(err, cot_fusefs::Error::JournalVersion { ref version, .. } if version == "99"),
        "{err}"
    );
    assert!(
        journal.exists() && layer.join("w/file").exists(),
        "both are kept"
    );
}
