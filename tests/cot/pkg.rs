//! `cot install`, `cot uninstall` and `cot pkg`: real packages (bzip2's plain Makefile,
//! libffi's autotools) installed, listed, verified, removed and installed again by
//! substitution; conflicts; installs killed at random points; packages moved between two
//! databases; and `cot build --want` for outputs never materialized.
//!
//! Every test has a package database and prefixes of its own, in its project's directory:
//! nothing is installed on the machine.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{cot_bin, fetch, machine_shared, shared_cot_bin, Project, Run};
use crate::require_sandbox;

/// A project with a package database of its own, outside the project (in a sibling
/// directory, removed with it).
struct Pkgs {
    p: Project,
    db: PathBuf,
}

impl Pkgs {
    fn new() -> Pkgs {
        let p = Project::new();
        let db = PathBuf::from(format!("{}.pkgdb", p.root().display()));
        let _ = fs::remove_dir_all(&db);
        Pkgs { p, db }
    }

    /// `cot ARGS...` with this database, in the project directory `rel`.
    fn cot_in(&self, rel: &str, args: &[&str]) -> Run {
        cot_with(self.p.root(), &self.db, rel, args)
    }

    fn cot(&self, args: &[&str]) -> Run {
        self.cot_in("", args)
    }

    /// A path under the project, as a string.
    fn path(&self, rel: &str) -> String {
        self.p.path(rel)
    }

    /// `cot pkg list` as (name, version, files, where) rows.
    fn list(&self) -> Vec<Vec<String>> {
        let run = self.cot(&["pkg", "list"]).ok();
        run.stdout
            .lines()
            .map(|l| l.split('\t').take(4).map(String::from).collect())
            .collect()
    }
}

impl Drop for Pkgs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.db);
    }
}

/// Every entry under `root` with its kind, mode and content (or link target): what a tree
/// holds, to compare two installs.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    fn walk(dir: &Path, root: &Path, all: &mut BTreeMap<String, String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let what = if meta.file_type().is_symlink() {
                format!("link {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(&path, root, all);
                format!("dir {mode:o}")
            } else {
                let data = fs::read(&path).unwrap();
                format!(
                    "file {mode:o} {}",
                    blake3::hash(&data)
                        .to_hex()
                        .chars()
                        .take(16)
                        .collect::<String>()
                )
            };
            all.insert(rel, what);
        }
    }
    walk(root, root, &mut all);
    all
}

/// A small package: a Makefile whose `install` puts `count` data files, a script and a
/// symlink under `$(PREFIX)`, and one file named `shared` (to make conflicts with).
fn toy(p: &Project, dir: &str, count: usize, shared: &str) {
    let mut makefile = String::from("PREFIX ?= /usr/local\n\ninstall:\n");
    makefile.push_str("\tmkdir -p $(PREFIX)/bin $(PREFIX)/share/DIR/data\n");
    makefile.push_str("\tcp tool.sh $(PREFIX)/bin/TOOL\n\tchmod 755 $(PREFIX)/bin/TOOL\n");
    makefile.push_str("\tln -sf TOOL $(PREFIX)/bin/TOOL-alias\n");
    makefile.push_str("\tcp shared $(PREFIX)/share/shared\n");
    makefile.push_str(&format!(
        "\tfor i in $$(seq 1 {count}); do echo \"DIR file $$i\" > $(PREFIX)/share/DIR/data/f$$i; done\n"
    ));
    let name = dir.split('-').next().unwrap();
    p.write(
        &format!("{dir}/Makefile"),
        &makefile.replace("DIR", name).replace("TOOL", name),
    );
    p.write(
        &format!("{dir}/tool.sh"),
        &format!("#!/bin/sh\necho {name}\n"),
    );
    p.write(&format!("{dir}/shared"), shared);
}

/// `cot install` of the toy in `dir` into `prefix`, with `flags`.
fn install_toy(t: &Pkgs, dir: &str, prefix: &str, flags: &[&str]) -> Run {
    install_toy_with(t.p.root(), &t.db, dir, prefix, flags)
}

/// [`install_toy`] in the project `root` with the database `db`.
fn install_toy_with(root: &Path, db: &Path, dir: &str, prefix: &str, flags: &[&str]) -> Run {
    let make_prefix = format!("PREFIX={prefix}");
    let mut args = vec!["install"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "make", "install", &make_prefix]);
    cot_with(root, db, dir, &args)
}

/// `cot ARGS...` in the directory `rel` of `root`, with the package database `db`.
fn cot_with(root: &Path, db: &Path, rel: &str, args: &[&str]) -> Run {
    let output = Command::new(cot_bin())
        .current_dir(root.join(rel))
        .args(args)
        .env("COT_PKG_DB", db)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::from(output)
}

#[test]
fn toy_package_lifecycle_and_substitution() {
    require_sandbox!();
    let _machine = machine_shared();
    let t = Pkgs::new();
    toy(&t.p, "toy-2.1", 3, "toy's\n");
    // The prefix does not exist yet, nor does its parent: the install makes both.
    let prefix = t.path("root/opt/toy");
    let run = install_toy(&t, "toy-2.1", &prefix, &[]).ok();
    assert!(
        run.stderr.contains("installed toy 2.1 in") && run.stderr.contains("ran the installer"),
        "{}",
        run.describe()
    );
    assert_eq!(t.list(), [["toy", "2.1", "6 files", prefix.as_str()]]);
    let installed = snapshot(Path::new(&prefix));
    assert_eq!(installed.len(), 10, "{installed:#?}");
    assert_eq!(installed["bin/toy-alias"], "link toy");
    assert_eq!(
        fs::read_to_string(format!("{prefix}/share/toy/data/f2")).unwrap(),
        "toy file 2\n"
    );
    let files = t.cot(&["pkg", "files", "toy"]);
    assert!(
        files
            .stdout
            .lines()
            .any(|l| l == format!("{prefix}/bin/toy-alias -> toy")),
        "{}",
        files.describe()
    );
    let owner = t.cot(&["pkg", "owner", &format!("{prefix}/bin/toy"), "/etc/passwd"]);
    assert_eq!(owner.status, 1, "{}", owner.describe());
    assert_eq!(
        owner.stdout,
        format!("{prefix}/bin/toy: toy 2.1\n/etc/passwd: no package\n")
    );
    t.cot(&["pkg", "verify"]).ok();

    // Installing it again while installed: a substitution, and nothing to write.
    let run = install_toy(&t, "toy-2.1", &prefix, &["--explain"]).ok();
    assert!(
        run.stderr
            .contains("nothing to do (substituted from the content store: nothing ran)"),
        "{}",
        run.describe()
    );

    // A changed file: verify says so, uninstall keeps it (and the package) unless --force.
    fs::write(format!("{prefix}/share/toy/data/f1"), "edited\n").unwrap();
    let verify = t.cot(&["pkg", "verify", "toy"]);
    assert_eq!(verify.status, 1, "{}", verify.describe());
    assert_eq!(
        verify.stdout,
        format!("toy: {prefix}/share/toy/data/f1: content changed\n")
    );
    let run = t.cot(&["uninstall", "toy"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.stderr.contains("data/f1: content changed"),
        "{}",
        run.describe()
    );
    assert_eq!(t.list().len(), 1, "still installed");
    assert!(Path::new(&format!("{prefix}/bin/toy")).exists());

    // Someone else's file in a directory the package made: kept, and so is the directory.
    fs::write(format!("{prefix}/bin/mine"), "not the package's\n").unwrap();
    t.cot(&["uninstall", "--force", "toy"]).ok();
    assert!(t.list().is_empty());
    let left: Vec<String> = snapshot(&t.p.root().join("root")).into_keys().collect();
    assert_eq!(
        left,
        ["opt", "opt/toy", "opt/toy/bin", "opt/toy/bin/mine"],
        "exactly the package's files and the directories it made that are empty are gone"
    );
    fs::remove_dir_all(t.p.root().join("root")).unwrap();

    // Installed again after the uninstall: a substitution, the same files.
    let run = install_toy(&t, "toy-2.1", &prefix, &[]).ok();
    assert!(
        run.stderr
            .contains("substituted from the content store: nothing ran"),
        "{}",
        run.describe()
    );
    assert_eq!(snapshot(Path::new(&prefix)), installed);
    t.cot(&["uninstall", "toy"]).ok();
    assert!(
        !t.p.root().join("root").exists(),
        "every directory it made is gone"
    );

    // Into another place (--dest): a substitution too; the paths go under the destination.
    let dest = t.path("image");
    let run = install_toy(&t, "toy-2.1", &prefix, &["--dest", &dest]).ok();
    assert!(run.stderr.contains("nothing ran"), "{}", run.describe());
    assert!(!Path::new(&prefix).exists());
    assert_eq!(
        snapshot(&Path::new(&dest).join(prefix.trim_start_matches('/'))),
        installed
    );
    t.cot(&["pkg", "owner", &format!("{dest}{prefix}/bin/toy")])
        .ok();

    // A new version of the same name replaces it: its files come, the old ones it lacks go.
    toy(&t.p, "toy-2.2", 2, "toy's\n");
    install_toy(&t, "toy-2.2", &prefix, &["--dest", &dest]).ok();
    assert_eq!(
        t.list(),
        [[
            "toy",
            "2.2",
            "5 files",
            format!("{prefix} under {dest}").as_str()
        ]]
    );
    let data = Path::new(&dest)
        .join(prefix.trim_start_matches('/'))
        .join("share/toy/data");
    assert!(data.join("f2").exists() && !data.join("f3").exists());
}

#[test]
fn conflicts_stop_an_install_before_anything_is_written() {
    require_sandbox!();
    let _machine = machine_shared();
    let t = Pkgs::new();
    let prefix = t.path("usr");
    toy(&t.p, "one-1.0", 2, "one's\n");
    toy(&t.p, "two-1.0", 2, "two's\n");
    install_toy(&t, "one-1.0", &prefix, &[]).ok();
    let before = snapshot(Path::new(&prefix));

    // two installs share/shared, which one owns.
    let run = install_toy(&t, "two-1.0", &prefix, &[]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.stderr.contains(&format!(
            "cannot install two 1.0: 1 path conflict, nothing was written:\n  \
             {prefix}/share/shared: belongs to package one\n"
        )),
        "{}",
        run.describe()
    );
    assert_eq!(snapshot(Path::new(&prefix)), before, "nothing was written");
    assert_eq!(t.list().len(), 1);

    // An unmanaged file in the way stops it too (and the installer does not run again).
    fs::write(format!("{prefix}/bin/two"), "mine\n").unwrap();
    let run = install_toy(&t, "two-1.0", &prefix, &["--explain"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.stderr.contains(&format!(
            "{prefix}/bin/two: exists and belongs to no package"
        )),
        "{}",
        run.describe()
    );
    assert!(run.stderr.contains("cot: cached: "), "{}", run.describe());
    assert_eq!(
        fs::read_to_string(format!("{prefix}/bin/two")).unwrap(),
        "mine\n"
    );

    // --force takes both over, and the records say so.
    let run = install_toy(&t, "two-1.0", &prefix, &["--force"]).ok();
    assert!(
        run.stderr
            .contains(&format!("took over {prefix}/share/shared from package one"))
            && run.stderr.contains(&format!(
                "took over {prefix}/bin/two, which belonged to no package"
            )),
        "{}",
        run.describe()
    );
    assert_eq!(
        fs::read_to_string(format!("{prefix}/share/shared")).unwrap(),
        "two's\n"
    );
    let owner = t.cot(&["pkg", "owner", &format!("{prefix}/share/shared")]);
    assert_eq!(owner.stdout, format!("{prefix}/share/shared: two 1.0\n"));
    let list = t.list();
    assert_eq!(list[0][..3], ["one", "1.0", "4 files"]);
    assert_eq!(list[1][..3], ["two", "1.0", "5 files"]);
    t.cot(&["pkg", "verify"]).ok();

    // Removing one leaves what two took from it.
    t.cot(&["uninstall", "one"]).ok();
    assert_eq!(
        fs::read_to_string(format!("{prefix}/share/shared")).unwrap(),
        "two's\n"
    );
    assert!(!Path::new(&format!("{prefix}/bin/one")).exists());
    t.cot(&["uninstall", "two"]).ok();
    assert!(
        !Path::new(&prefix).exists(),
        "{:#?}",
        snapshot(Path::new(&prefix))
    );

    // A directory where the package has a file cannot be forced.
    fs::create_dir_all(format!("{prefix}/bin/one")).unwrap();
    let run = install_toy(&t, "one-1.0", &prefix, &["--force"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.stderr.contains(&format!(
            "{prefix}/bin/one: is a directory, and the package has a file there"
        )),
        "{}",
        run.describe()
    );
    assert!(t.list().is_empty());
}

/// The Python that runs `python3` here, if it has pip: its real executable (a version
/// manager's shim would write outside the prefix).
fn python_with_pip() -> Option<PathBuf> {
    let output = Command::new("python3")
        .args(["-c", "import sys, pip; print(sys.executable)"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(PathBuf::from(String::from_utf8(output.stdout).ok()?.trim()))
}

/// `pip install --prefix` of a wheel as a package: its version read from the wheel's
/// metadata, its files listed and importable, removed whole, and installed again by
/// substitution.
#[test]
fn a_pip_install_is_a_package() {
    require_sandbox!();
    let Some(python) = python_with_pip() else {
        return crate::harness::skip("python3 with pip is not installed");
    };
    let _machine = machine_shared();
    let t = Pkgs::new();
    // A wheel made here, so that nothing is downloaded: a module and its metadata.
    let wheel = t.path("toypy-0.3-py3-none-any.whl");
    let make_wheel = format!(
        "import zipfile\n\
         files = {{'toypy.py': 'ANSWER = 42\\n',\n\
          'toypy-0.3.dist-info/METADATA': 'Metadata-Version: 2.1\\nName: toypy\\nVersion: 0.3\\n',\n\
          'toypy-0.3.dist-info/WHEEL': 'Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n'}}\n\
         files['toypy-0.3.dist-info/RECORD'] = ''.join(n + ',,\\n' for n in files) + 'toypy-0.3.dist-info/RECORD,,\\n'\n\
         with zipfile.ZipFile('{wheel}', 'w') as z:\n\
         \x20   for name, text in files.items(): z.writestr(name, text)\n"
    );
    let made = Command::new(&python)
        .args(["-c", &make_wheel])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let prefix = t.path("py");
    let python = python.to_str().unwrap();
    let install = [
        "install",
        "--name",
        "toypy",
        "--prefix",
        &prefix,
        "--",
        python,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--ignore-installed",
        "--no-compile",
        "--disable-pip-version-check",
        "--prefix",
        &prefix,
        &wheel,
    ];
    let run = t.cot(&install).ok();
    assert!(
        run.stderr.contains("ran the installer"),
        "{}",
        run.describe()
    );
    let listed = t.list();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0][..2], ["toypy", "0.3"], "{listed:?}");
    let files = t.cot(&["pkg", "files", "toypy"]).ok();
    let module = files
        .stdout
        .lines()
        .find(|l| l.ends_with("/site-packages/toypy.py"))
        .unwrap_or_else(|| panic!("{}", files.describe()))
        .to_string();
    let site = Path::new(&module).parent().unwrap();
    let imported = Command::new(python)
        .args(["-c", "import toypy; print(toypy.ANSWER)"])
        .env("PYTHONPATH", site)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&imported.stdout), "42\n");
    t.cot(&["pkg", "verify", "toypy"]).ok();

    t.cot(&["uninstall", "toypy"]).ok();
    assert!(!Path::new(&prefix).exists());
    let run = t.cot(&install).ok();
    assert!(
        run.stderr.contains("substituted from the content store"),
        "{}",
        run.describe()
    );
    assert!(Path::new(&module).exists());
}

/// A prefix in /tmp, which the installer sees through its private /tmp: one to be made in an
/// existing directory is captured and installed; one whose every missing ancestor is directly
/// in /tmp is refused, naming it.
#[test]
fn a_prefix_in_tmp_is_installed_into() {
    require_sandbox!();
    let _machine = machine_shared();
    let t = Pkgs::new();
    toy(&t.p, "tmp-1.0", 2, "tmp's\n");
    let host_tmp = tempfile::Builder::new()
        .prefix("cot-test-")
        .tempdir_in("/tmp")
        .unwrap();
    let prefix = host_tmp.path().join("opt/tmp");
    let prefix = prefix.to_str().unwrap();
    install_toy(&t, "tmp-1.0", prefix, &[]).ok();
    assert_eq!(
        fs::read_to_string(format!("{prefix}/share/shared")).unwrap(),
        "tmp's\n"
    );
    t.cot(&["uninstall", "tmp"]).ok();
    assert!(!host_tmp.path().join("opt").exists());

    let missing = format!("{}-missing/prefix", host_tmp.path().display());
    let run = install_toy(&t, "tmp-1.0", &missing, &[]);
    assert_eq!(run.status, 125, "{}", run.describe());
    assert!(
        run.stderr.contains(&format!("{missing}: does not exist")),
        "{}",
        run.describe()
    );
    assert!(t.list().is_empty());
}

#[test]
fn an_installer_that_fails_or_writes_beside_the_prefix_installs_nothing() {
    require_sandbox!();
    let _machine = machine_shared();
    let t = Pkgs::new();
    t.p.write(
        "bad/Makefile",
        "install:\n\tmkdir -p $(PREFIX)/bin\n\techo x > $(PREFIX)/bin/x\n\tfalse\n",
    );
    let prefix = t.path("gone/prefix");
    let run = t.cot_in(
        "bad",
        &[
            "install",
            "--name",
            "bad",
            "--",
            "make",
            "install",
            &format!("PREFIX={prefix}"),
        ],
    );
    assert_eq!(run.status, 2, "make's own status: {}", run.describe());
    assert!(
        run.stderr.contains("nothing was installed"),
        "{}",
        run.describe()
    );
    assert!(!t.p.root().join("gone").exists());

    // The prefix's parent is missing: the installer may make it, and nothing else there.
    t.p.write(
        "beside/Makefile",
        "install:\n\tmkdir -p $(PREFIX)/bin $(PREFIX)/../elsewhere\n\techo x > $(PREFIX)/bin/x\n",
    );
    let run = t.cot_in(
        "beside",
        &[
            "install",
            "--name",
            "beside",
            "--",
            "make",
            "install",
            &format!("PREFIX={prefix}"),
        ],
    );
    assert_eq!(run.status, 125, "{}", run.describe());
    assert!(
        run.stderr.contains(&format!(
            "{}: the command wrote here, outside {prefix}",
            t.path("gone/elsewhere")
        )),
        "{}",
        run.describe()
    );
    assert!(!t.p.root().join("gone").exists());
    assert!(t.list().is_empty());
}

/// One real package through its whole life: installed (running its installer), listed,
/// verified, working, removed, and installed again by substitution (nothing runs) to the same
/// bytes.
fn real_package_lifecycle(
    t: &Pkgs,
    dir: &str,
    install: &[&str],
    prefix: &str,
    name: &str,
    version: &str,
    works: &dyn Fn(&Path),
) {
    let mut args = vec!["install", "--prefix", prefix, "--"];
    args.extend_from_slice(install);
    let started = Instant::now();
    let run = t.cot_in(dir, &args).ok();
    assert!(
        run.stderr.contains("ran the installer"),
        "{}",
        run.describe()
    );
    eprintln!(
        "{name}: installed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let list = t.list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0][..2], [name, version]);
    assert_eq!(list[0][3], prefix);
    let installed = snapshot(Path::new(prefix));
    t.cot(&["pkg", "verify", name]).ok();
    works(Path::new(prefix));

    t.cot(&["uninstall", name]).ok();
    assert!(t.list().is_empty());
    assert!(
        !Path::new(prefix).exists(),
        "left behind: {:#?}",
        snapshot(Path::new(prefix))
    );

    let started = Instant::now();
    let run = t.cot_in(dir, &args).ok();
    assert!(
        run.stderr
            .contains("substituted from the content store: nothing ran"),
        "{}",
        run.describe()
    );
    eprintln!(
        "{name}: installed again by substitution in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(snapshot(Path::new(prefix)), installed);
    t.cot(&["pkg", "verify", name]).ok();
}

#[test]
fn bzip2_plain_makefile_package() {
    require_sandbox!();
    let _machine = machine_shared();
    let t = Pkgs::new();
    fetch("fetch-bzip2", &t.p.root().join("bzip2-1.0.8"));
    let prefix = t.path("local");
    let make_prefix = format!("PREFIX={prefix}");
    real_package_lifecycle(
        &t,
        "bzip2-1.0.8",
        &["make", "install", &make_prefix],
        &prefix,
        "bzip2",
        "1.0.8",
        &|prefix| {
            let out = Command::new(prefix.join("bin/bzip2"))
                .arg("--help")
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            assert!(fs::read_link(prefix.join("bin/bzegrep")).is_ok());
        },
    );
}

#[test]
fn libffi_autotools_package() {
    require_sandbox!();
    let _machine = machine_shared();
    let t = Pkgs::new();
    fetch("fetch-autotools", &t.p.root().join("libffi"));
    let prefix = t.path("opt/libffi");
    let script =
        format!("./configure --prefix={prefix} --disable-docs && make -j2 && make install");
    // Built once, the package is the library, its headers and its pkg-config file.
    real_package_lifecycle(
        &t,
        "libffi",
        &["sh", "-c", &script],
        &prefix,
        "libffi",
        "3.6.0",
        &|prefix| {
            let pc = fs::read_to_string(prefix.join("lib/pkgconfig/libffi.pc")).unwrap();
            assert!(pc.contains("Version: 3.6.0"), "{pc}");
            assert!(prefix.join("include/ffi.h").is_file());
        },
    );
    let files = t.cot(&["pkg", "files", "libffi"]);
    assert!(
        files.stdout.contains("/lib/pkgconfig/libffi.pc"),
        "{}",
        files.describe()
    );
}

/// SIGKILL at random points of installs (while the installer runs, while files are staged,
/// while they are put in place) and of removals: after the next cot command the package is
/// either installed whole, or not at all and no file or directory of it is left.
#[test]
fn an_install_killed_anywhere_leaves_all_or_nothing() {
    require_sandbox!();
    let _machine = machine_shared();
    let t = Pkgs::new();
    toy(&t.p, "kill-1.0", 40, "kill's\n");
    let prefix = t.path("k/prefix");
    install_toy(&t, "kill-1.0", &prefix, &[]).ok();
    let whole = snapshot(&t.p.root().join("k"));
    assert_eq!(t.cot(&["uninstall", "kill"]).status, 0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = seed | 1;
    let mut next = |bound: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % bound
    };
    // Even rounds kill at a random time from the start; odd ones once the journal appears,
    // while the files are staged, or (every other one) once the journal is rewritten at the
    // commit point, while they are put in place.
    let (mut whole_seen, mut none_seen, mut rolled_back, mut finished) = (0, 0, 0, 0);
    for round in 0..20 {
        let installed_before = !t.list().is_empty();
        // Removals are killed too, from an installed package.
        let removing = round % 6 == 5 && installed_before;
        let mut cmd = Command::new(cot_bin());
        cmd.current_dir(t.p.root().join("kill-1.0"))
            .env("COT_PKG_DB", &t.db)
            .env("COT_PKG_STEP_DELAY_MS", "5")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if removing {
            cmd.args(["uninstall", "kill"]);
        } else {
            let no_cache = if round % 8 == 0 {
                "--no-cache"
            } else {
                "--explain"
            };
            cmd.args([
                "install",
                no_cache,
                "--",
                "make",
                "install",
                &format!("PREFIX={prefix}"),
            ]);
        }
        let mut child = cmd.spawn().unwrap();
        if round % 2 == 0 {
            std::thread::sleep(Duration::from_millis(next(800)));
        } else {
            use std::os::unix::fs::MetadataExt;
            let journal = t.db.join("journal/kill");
            let deadline = Instant::now() + Duration::from_secs(20);
            let alive = |child: &mut std::process::Child| child.try_wait().unwrap().is_none();
            let mut inode = None;
            while inode.is_none() && Instant::now() < deadline && alive(&mut child) {
                inode = fs::metadata(&journal).ok().map(|m| m.ino());
                std::thread::sleep(Duration::from_millis(1));
            }
            if round % 4 == 3 {
                while fs::metadata(&journal).is_ok_and(|m| Some(m.ino()) == inode)
                    && Instant::now() < deadline
                    && alive(&mut child)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            std::thread::sleep(Duration::from_millis(next(60)));
        }
        let _ = child.kill();
        let _ = child.wait();
        // The next cot command settles it.
        let list = t.cot(&["pkg", "list"]).ok();
        rolled_back += list.stderr.matches("rolled back the interrupted").count();
        finished += list.stderr.matches("finished the interrupted").count();
        let now = snapshot(&t.p.root().join("k"));
        if list.stdout.is_empty() {
            assert!(
                now.is_empty(),
                "round {round} (seed {seed}): not installed, yet left {now:#?}\n{}",
                list.describe()
            );
            none_seen += 1;
        } else {
            assert_eq!(
                now,
                whole,
                "round {round} (seed {seed}): installed, not whole\n{}",
                list.describe()
            );
            let verify = t.cot(&["pkg", "verify"]);
            assert_eq!(verify.status, 0, "round {round}: {}", verify.describe());
            whole_seen += 1;
        }
        let leftovers: Vec<_> = fs::read_dir(t.db.join("journal")).unwrap().collect();
        assert!(leftovers.is_empty(), "round {round}: journal left");
        // Installed, it is removed again, but before a round that kills a removal.
        if !list.stdout.is_empty() && round % 6 != 4 {
            assert_eq!(t.cot(&["uninstall", "kill"]).status, 0);
        }
    }
    eprintln!(
        "{whole_seen} rounds ended installed, {none_seen} not; {rolled_back} changes rolled \
         back, {finished} finished"
    );
    assert!(
        rolled_back > 0 && finished > 0,
        "the kills missed the staging ({rolled_back} rolled back) or the placing ({finished} \
         finished)"
    );
}

#[test]
fn a_package_moves_between_two_databases() {
    require_sandbox!();
    let _machine = machine_shared();
    let t = Pkgs::new();
    toy(&t.p, "moving-3.0", 5, "moving's\n");
    let prefix = t.path("from");
    install_toy(&t, "moving-3.0", &prefix, &[]).ok();
    let archive = format!("{}.tar", t.db.display());
    t.cot(&["pkg", "export", "moving", &archive]).ok();

    // Another machine: another database, nothing installed, its own place.
    let other = Pkgs::new();
    let dest = other.path("image");
    let run = other
        .cot(&["pkg", "import", &archive, "--dest", &dest])
        .ok();
    assert!(
        run.stderr.contains("objects verified"),
        "{}",
        run.describe()
    );
    assert_eq!(
        snapshot(&Path::new(&dest).join(prefix.trim_start_matches('/'))),
        snapshot(Path::new(&prefix))
    );
    let list = other.list();
    assert_eq!(list[0][..3], ["moving", "3.0", "8 files"]);
    other.cot(&["pkg", "verify"]).ok();

    // Its trace came along: the same install at the same place is a substitution there.
    other.cot(&["uninstall", "moving"]).ok();
    let run = install_toy_with(
        t.p.root(),
        &other.db,
        "moving-3.0",
        &prefix,
        &["--dest", &dest],
    )
    .ok();
    assert!(run.stderr.contains("nothing ran"), "{}", run.describe());

    // A damaged archive is refused, and nothing of it is installed.
    let mut data = fs::read(&archive).unwrap();
    let at = data.windows(8).position(|w| w == b"moving f").unwrap();
    data[at] = b'M';
    let damaged = format!("{}.damaged.tar", t.db.display());
    fs::write(&damaged, &data).unwrap();
    let third = Pkgs::new();
    let run = third.cot(&["pkg", "import", &damaged, "--dest", &third.path("image")]);
    assert_eq!(run.status, 125, "{}", run.describe());
    assert!(
        run.stderr
            .contains("does not hold the content it is named for"),
        "{}",
        run.describe()
    );
    assert!(third.list().is_empty());
    assert!(!Path::new(&third.path("image")).exists());
    let _ = fs::remove_file(&archive);
    let _ = fs::remove_file(&damaged);
}

/// `cot build --want`: an intermediate output that the build leaves unmaterialized (deleted,
/// or never there: a fresh checkout sharing the stores) is put back from the content store,
/// and nothing runs.
#[test]
fn wanted_files_are_materialized_without_running_anything() {
    require_sandbox!();
    let _machine = machine_shared();
    let cot = shared_cot_bin();
    let cotfile = format!(
        "#!/bin/sh\nset -e\ncot={}\n\
         $cot run -- sh -c 'mkdir -p obj && echo compiled > obj/a.o'\n\
         $cot run -- sh -c 'cat obj/a.o > prog'\n",
        cot.display()
    );
    let checkout = || {
        let p = Project::new();
        p.write("Cotfile", &cotfile);
        fs::set_permissions(p.root().join("Cotfile"), fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    let a = checkout();
    // Every checkout builds with a's stores.
    let store = a.root().join(".cot/store");
    let cas = a.root().join(".cot/cas");
    let build = |p: &Project, extra: &[&str]| {
        let mut args = vec![
            "build",
            "--explain",
            "--store",
            store.to_str().unwrap(),
            "--cache",
            cas.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let run = crate::harness::run_cot(&cot, p.root(), &args).ok();
        run
    };
    // `paths` hold what the build compiled, and the build ran nothing.
    let restored = |p: &Project, paths: &[&str], run: &Run| {
        for path in paths {
            let content = p.read(path);
            assert_eq!(content.as_deref(), Some("compiled\n"), "{}", run.describe());
        }
        let ran = run.stderr.contains(": ran");
        assert!(!ran, "nothing ran:\n{}", run.describe());
    };
    build(&a, &[]);
    assert_eq!(a.read("prog").as_deref(), Some("compiled\n"));

    // Deleted (as an uninstall or a clean would): left damaged, then wanted back.
    fs::remove_dir_all(a.root().join("obj")).unwrap();
    build(&a, &[]);
    assert!(
        !a.exists("obj/a.o"),
        "an intermediate nobody needs stays as it is"
    );
    let run = build(&a, &["--want", "obj/a.o"]);
    restored(&a, &["obj/a.o"], &run);

    // A fresh checkout sharing the stores: nothing there was ever materialized.
    let b = checkout();
    let run = build(&b, &["--want", "obj/a.o"]);
    assert!(
        !run.stderr.contains("damaged"),
        "obj, on the way to obj/a.o, is wanted too:\n{}",
        run.describe()
    );
    restored(&b, &["obj/a.o", "prog"], &run);

    // A wanted directory: everything under it.
    let c = checkout();
    let run = build(&c, &[]);
    assert!(!c.exists("obj"), "never materialized:\n{}", run.describe());
    let run = build(&c, &["--want", "obj"]);
    restored(&c, &["obj/a.o"], &run);
}
