//! Planning and applying package changes on plain directories (no sandbox, no root): what an
//! install writes and records, conflicts, upgrades, removals, and what recovery makes of a
//! change cut short before and after its commit point.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::apply::{self, plan_install, plan_remove};
use super::{Db, Entry, Origin, Package};
use crate::store::model::{OutputState, ThunkKey, Trace};

struct Fixture {
    _tmp: tempfile::TempDir,
    db: Db,
    /// The prefix the packages install into.
    prefix: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let db = Db::open(&tmp.path().join("db")).unwrap();
        let prefix = tmp.path().join("usr/local");
        Fixture {
            _tmp: tmp,
            db,
            prefix,
        }
    }

    /// A package whose files (relative to the prefix, with their contents) are in the content
    /// store; `@target` makes a symlink.
    fn package(&self, name: &str, files: &[(&str, &str)]) -> Package {
        let cas = self.db.cas().unwrap();
        let mut manifest = vec![Entry {
            path: bytes(&self.prefix),
            state: OutputState::Dir { mode: 0o755 },
        }];
        for (rel, content) in files {
            let path = self.prefix.join(rel);
            for dir in path.ancestors().skip(1) {
                if dir == self.prefix {
                    break;
                }
                if !manifest.iter().any(|e| e.path == bytes(dir)) {
                    manifest.push(Entry {
                        path: bytes(dir),
                        state: OutputState::Dir { mode: 0o755 },
                    });
                }
            }
            let state = match content.strip_prefix('@') {
                Some(target) => OutputState::Symlink {
                    target: target.as_bytes().to_vec(),
                },
                None => OutputState::File {
                    digest: cas.put_bytes(content.as_bytes()).unwrap(),
                    mode: 0o644,
                    size: content.len() as u64,
                },
            };
            manifest.push(Entry {
                path: bytes(&path),
                state,
            });
        }
        manifest.sort_by(|a, b| a.path().cmp(b.path()));
        Package {
            name: name.to_string(),
            version: Some("1".into()),
            version_from: "--version".into(),
            prefix: bytes(&self.prefix),
            dest: None,
            manifest,
            created_dirs: Vec::new(),
            taken_over: Vec::new(),
            origin: Origin {
                command: vec![b"make".to_vec(), b"install".to_vec()],
                cwd: b"/src".to_vec(),
                key: ThunkKey::of_command(&["make"]),
                trace_id: [0; 32],
                trace: Trace {
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                    stdout: [0; 32],
                    stderr: [0; 32],
                    exit_code: 0,
                    duration_ns: 0,
                    ran_at_ns: 0,
                    children: Vec::new(),
                    events: Vec::new(),
                    internal: Vec::new(),
                },
            },
            installed_ns: 0,
        }
    }

    fn install(&self, package: Package, force: bool) -> apply::InstallPlan {
        let plan = plan_install(&self.db, package, force).unwrap();
        assert!(plan.conflicts.is_empty(), "{:?}", plan.conflicts);
        apply::apply(&self.db, plan.journal.clone()).unwrap();
        plan
    }

    fn remove(&self, name: &str, force: bool) -> apply::RemovePlan {
        let package = self.db.installed(name).unwrap();
        let plan = plan_remove(&self.db.packages().unwrap(), &package, force).unwrap();
        apply::apply(&self.db, plan.journal.clone()).unwrap();
        plan
    }

    fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.prefix.join(rel)).ok()
    }

    /// Everything under the directory holding the prefix's parent, relative to it.
    fn tree(&self) -> Vec<String> {
        let top = self.prefix.parent().unwrap();
        let mut all = Vec::new();
        walk(top, top, &mut all);
        all.sort();
        all
    }
}

fn walk(dir: &Path, top: &Path, all: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        all.push(path.strip_prefix(top).unwrap().display().to_string());
        if entry.file_type().unwrap().is_dir() {
            walk(&path, top, all);
        }
    }
}

fn bytes(path: &Path) -> Vec<u8> {
    path.as_os_str().as_bytes().to_vec()
}

#[test]
fn install_then_remove_leaves_nothing() {
    let f = Fixture::new();
    let plan = f.install(
        f.package(
            "a",
            &[
                ("bin/a", "#!/bin/sh\n"),
                ("bin/b", "@a"),
                ("share/a/doc", "doc"),
            ],
        ),
        false,
    );
    assert_eq!(
        plan.journal.mkdirs.len(),
        5,
        "usr/local, bin, share, share/a"
    );
    assert_eq!(f.read("bin/a").as_deref(), Some("#!/bin/sh\n"));
    assert_eq!(
        fs::read_link(f.prefix.join("bin/b")).unwrap(),
        Path::new("a")
    );
    assert_eq!(
        fs::metadata(f.prefix.join("bin/a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o644
    );
    let recorded = f.db.installed("a").unwrap();
    assert_eq!(recorded.files().count(), 3);
    assert_eq!(recorded.created_dirs.len(), 5);
    assert!(f.db.journals().unwrap().is_empty());

    let plan = f.remove("a", false);
    assert_eq!(plan.files, 3);
    assert!(f.tree().is_empty(), "{:?}", f.tree());
    assert!(f.db.package("a").unwrap().is_none());
}

#[test]
fn conflicts_are_found_before_anything_is_written() {
    let f = Fixture::new();
    f.install(
        f.package("a", &[("bin/a", "a"), ("share/common", "a's")]),
        false,
    );
    fs::write(f.prefix.join("bin/mine"), "mine").unwrap();
    let before = f.tree();
    let b = f.package(
        "b",
        &[("bin/b", "b"), ("share/common", "b's"), ("bin/mine", "b's")],
    );
    let plan = plan_install(&f.db, b.clone(), false).unwrap();
    let why: Vec<(String, &str, bool)> = plan
        .conflicts
        .iter()
        .map(|c| {
            let rel = c
                .path
                .strip_prefix(&f.prefix)
                .unwrap()
                .display()
                .to_string();
            (rel, c.why.as_str(), c.forceable)
        })
        .collect();
    assert_eq!(
        why,
        [
            ("bin/mine".into(), "exists and belongs to no package", true),
            ("share/common".into(), "belongs to package a", true),
        ]
    );
    assert_eq!(f.tree(), before, "planning writes nothing");

    // Forced: b takes both, a's record loses share/common, and b's says where from.
    let plan = f.install(b, true);
    assert_eq!(plan.taken_over.len(), 2);
    assert_eq!(f.read("share/common").as_deref(), Some("b's"));
    let a = f.db.installed("a").unwrap();
    assert_eq!(a.files().count(), 1);
    let b = f.db.installed("b").unwrap();
    assert_eq!(
        b.taken_over
            .iter()
            .map(|t| t.from.clone())
            .collect::<Vec<_>>(),
        [None, Some("a".to_string())]
    );
    // a made bin/ and share/; b has files there: they pass to b, which removes them last.
    f.remove("a", false);
    assert!(f.prefix.join("bin").is_dir());
    f.remove("b", false);
    assert!(f.tree().is_empty(), "{:?}", f.tree());
}

#[test]
fn a_new_version_replaces_the_old_and_keeps_what_was_changed() {
    let f = Fixture::new();
    f.install(
        f.package(
            "a",
            &[("bin/a", "v1"), ("lib/old", "old"), ("lib/edited", "e")],
        ),
        false,
    );
    fs::write(f.prefix.join("lib/edited"), "mine now").unwrap();
    let plan = f.install(
        f.package("a", &[("bin/a", "v2"), ("lib/new", "new")]),
        false,
    );
    assert_eq!(f.read("bin/a").as_deref(), Some("v2"));
    assert_eq!(f.read("lib/new").as_deref(), Some("new"));
    assert_eq!(
        f.read("lib/old"),
        None,
        "the old version's file it lacks goes"
    );
    assert_eq!(f.read("lib/edited").as_deref(), Some("mine now"));
    assert_eq!(plan.kept.len(), 1);
    assert!(plan.repaired.is_empty(), "an upgrade is no repair");
    // The same again: nothing to do.
    let plan = plan_install(
        &f.db,
        f.package("a", &[("bin/a", "v2"), ("lib/new", "new")]),
        false,
    )
    .unwrap();
    assert!(plan.is_noop());
}

#[test]
fn removal_keeps_changed_files_unless_forced() {
    let f = Fixture::new();
    f.install(f.package("a", &[("bin/a", "a"), ("bin/b", "b")]), false);
    fs::write(f.prefix.join("bin/b"), "changed").unwrap();
    let package = f.db.installed("a").unwrap();
    let plan = plan_remove(&f.db.packages().unwrap(), &package, false).unwrap();
    assert_eq!(plan.kept.len(), 1);
    assert_eq!(plan.kept[0].1, "content changed");
    let plan = plan_remove(&f.db.packages().unwrap(), &package, true).unwrap();
    assert!(plan.kept.is_empty());
    apply::apply(&f.db, plan.journal).unwrap();
    assert!(f.tree().is_empty(), "{:?}", f.tree());
}

#[test]
fn a_change_cut_short_while_staging_is_rolled_back() {
    let f = Fixture::new();
    f.install(f.package("a", &[("bin/a", "v1")]), false);
    let before = f.tree();
    let new = f.package(
        "a",
        &[("bin/a", "v2"), ("share/x/y", "y"), ("share/x/z", "z")],
    );
    // The last file's content is missing from the store: staging fails on it, after the
    // others were staged, as a killed cot would leave them.
    let missing = match &new.manifest.last().unwrap().state {
        OutputState::File { digest, .. } => *digest,
        other => panic!("{other:?}"),
    };
    let object =
        f.db.cas_dir()
            .join("objects")
            .join(&crate::cas::hex(&missing)[..2])
            .join(&crate::cas::hex(&missing)[2..]);
    fs::remove_file(object).unwrap();
    let plan = plan_install(&f.db, new, false).unwrap();
    assert!(apply::apply(&f.db, plan.journal).is_err());
    assert_ne!(f.tree(), before, "staged files and directories are there");
    assert_eq!(f.db.journals().unwrap(), ["a"]);

    let lines = f.db.recover().unwrap();
    assert!(
        lines[0].starts_with("rolled back the interrupted install of a 1"),
        "{lines:?}"
    );
    assert_eq!(f.tree(), before, "nothing of it is left");
    assert_eq!(
        f.read("bin/a").as_deref(),
        Some("v1"),
        "the old version is whole"
    );
    assert!(f.db.journals().unwrap().is_empty());
}

#[test]
fn a_change_cut_short_after_its_commit_point_is_finished() {
    let f = Fixture::new();
    let plan = plan_install(
        &f.db,
        f.package("a", &[("bin/a", "a"), ("bin/b", "b")]),
        false,
    )
    .unwrap();
    apply::stage_and_commit(&f.db, plan.journal.clone()).unwrap();
    assert_eq!(f.read("bin/a"), None, "staged only");
    // Half of it placed, as a killed cot would leave it.
    let first = &plan.journal.place[0];
    fs::rename(
        std::ffi::OsStr::from_bytes(&first.staged),
        std::ffi::OsStr::from_bytes(&first.real),
    )
    .unwrap();
    let lines = f.db.recover().unwrap();
    assert_eq!(lines, ["finished the interrupted install of a 1"]);
    assert_eq!(f.read("bin/a").as_deref(), Some("a"));
    assert_eq!(f.read("bin/b").as_deref(), Some("b"));
    assert_eq!(
        f.tree().iter().filter(|p| p.contains(".cot-pkg-")).count(),
        0
    );
    assert!(f.db.installed("a").is_ok());
    // Recovering again finds nothing to do.
    assert!(f.db.recover().unwrap().is_empty());
}

#[test]
fn records_and_names() {
    let f = Fixture::new();
    assert!(super::check_name("libffi").is_ok());
    assert!(super::check_name("py3-requests_2.0+x").is_ok());
    for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(129)] {
        assert!(super::check_name(bad).is_err(), "{bad:?}");
    }
    let package = f.package("a", &[("bin/a", "a")]);
    f.db.write_package(&package).unwrap();
    assert_eq!(f.db.installed("a").unwrap(), package);
    assert!(matches!(
        f.db.installed("b"),
        Err(super::Error::NotInstalled { .. })
    ));
    fs::write(f.db.root().join("packages/a"), b"garbage").unwrap();
    let error = f.db.installed("a").unwrap_err().to_string();
    assert!(error.contains("packages/a: does not start with"), "{error}");
    fs::write(f.db.root().join("VERSION"), "2\n").unwrap();
    let error = Db::open(f.db.root()).unwrap_err().to_string();
    assert!(error.contains("format version \"2\""), "{error}");
}

#[test]
fn dest_puts_entries_under_it() {
    assert_eq!(
        super::real_path(Some(b"/srv/image"), b"/usr/local/bin/a"),
        Path::new("/srv/image/usr/local/bin/a")
    );
    assert_eq!(
        super::real_path(None, b"/usr/local/bin/a"),
        Path::new("/usr/local/bin/a")
    );
}
