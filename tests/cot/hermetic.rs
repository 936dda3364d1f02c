//! Hermetic mode (`--hermetic`, `--allow`, `--net`): a thunk sees only what it declared of the
//! project, nothing of the homes and credentials outside it, an empty private HOME, and no
//! network unless asked; an undeclared read fails and the failure names the file.
//!
//! The make project: `prog` from `main.o` (its rule runs it), `main.c` includes `hdr.h` (and
//! `<stdio.h>`, from outside the project). Every build runs the shared copy of the cot binary, as make's shell
//! must be reachable by the rootless user too.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{cot_as_test_user, machine_shared, run_cot, shared_cot_bin, Project, Run};
use crate::require_sandbox;

const MAIN_C: &str = "#include <stdio.h>\n#include \"hdr.h\"\n\
                      int main(void) { printf(\"%d\\n\", ANSWER); return 0; }\n";
const HDR_H: &str = "#define ANSWER 42\n";

/// The Makefile, with or without `hdr.h` among `main.o`'s prerequisites.
fn makefile(declares_header: bool) -> String {
    let header = if declares_header { " hdr.h" } else { "" };
    format!(
        "prog: main.o\n\tcc -o prog main.o\n\t./prog\n\n\
         main.o: main.c{header}\n\tcc -c -o main.o main.c\n"
    )
}

fn make_project(declares_header: bool) -> Project {
    let p = Project::new();
    p.write("main.c", MAIN_C);
    p.write("hdr.h", HDR_H);
    p.write("Makefile", &makefile(declares_header));
    p
}

fn cot(p: &Project, args: &[&str]) -> Run {
    run_cot(&shared_cot_bin(), p.root(), args)
}

#[track_caller]
fn assert_ok(run: &Run, what: &str) {
    assert_eq!(run.status, 0, "{what}:\n{}", run.describe());
}

/// The files a build made in `dir` (everything but the sources and cot's state).
fn products(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let sources = ["main.c", "hdr.h", "Makefile", "cot.toml"];
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|name| !sources.contains(&name.as_str()))
        .map(|name| {
            let bytes = fs::read(dir.join(&name)).unwrap();
            (name, bytes)
        })
        .collect()
}

/// Checks that the output of a `cot make` (`run`) and the project's products are those of a
/// plain `make -s` (cot make's default) of the same sources in a fresh directory.
#[track_caller]
fn assert_like_plain_make(p: &Project, run: &Run, declares_header: bool) {
    let fresh = tempfile::Builder::new()
        .prefix("plain-make-")
        .tempdir_in("/var/tmp")
        .unwrap();
    fs::write(fresh.path().join("main.c"), MAIN_C).unwrap();
    fs::write(fresh.path().join("hdr.h"), HDR_H).unwrap();
    fs::write(fresh.path().join("Makefile"), makefile(declares_header)).unwrap();
    let plain = Command::new("make")
        .arg("-s")
        .current_dir(fresh.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(plain.status.success(), "plain make failed");
    assert_eq!(run.stdout, String::from_utf8_lossy(&plain.stdout));
    assert_eq!(run.stdout, "42\n");
    let ours = products(p.root());
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        ["main.o", "prog"],
        "what cot make made"
    );
    assert!(ours == products(fresh.path()), "not what plain make makes");
}

#[test]
fn an_undeclared_header_fails_the_recipe_and_is_named() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = make_project(false);
    let run = cot(&p, &["make", "--hermetic"]);
    assert_ne!(run.status, 0, "{}", run.describe());
    assert!(
        run.stderr.contains(
            "cot: hermetic: `cc -c -o main.o main.c` (target main.o) looked for hdr.h, which \
             exists but is not declared"
        ),
        "the failure names the header:\n{}",
        run.describe()
    );
    // The compiler was told it is absent.
    assert!(
        run.stderr.contains("hdr.h: No such file"),
        "{}",
        run.describe()
    );
    assert!(!p.exists("main.o") && !p.exists("prog"));
    // Without --hermetic the same Makefile builds: the header is visible.
    assert_ok(&cot(&p, &["make"]), "plain cot make");
    assert!(p.exists("prog"));
}

#[test]
fn a_declared_header_builds_what_plain_make_builds() {
    require_sandbox!();
    let _machine = machine_shared();
    // stdio.h, outside the project, is visible without declaring it.
    let p = make_project(true);
    let run = cot(&p, &["make", "--hermetic"]);
    assert_ok(&run, "hermetic build with the header declared");
    assert_like_plain_make(&p, &run, true);
    // Nothing changed: nothing runs; the hermetic thunks are thunks of their own.
    let again = cot(&p, &["make", "--hermetic"]);
    assert_ok(&again, "hermetic no-op");
    assert!(
        again.stderr.contains("nothing to do"),
        "{}",
        again.describe()
    );
}

#[test]
fn allow_globs_show_undeclared_files_from_the_command_line_and_cot_toml() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = make_project(false);
    let run = cot(&p, &["make", "--hermetic", "--allow", "hdr.h"]);
    assert_ok(&run, "--allow hdr.h");
    assert_like_plain_make(&p, &run, false);

    let q = make_project(false);
    q.write("cot.toml", "hermetic = true\nallow = [\"*.h\"]\n");
    let run = cot(&q, &["make"]);
    assert_ok(&run, "cot.toml hermetic and allow");
    assert_like_plain_make(&q, &run, false);
    // cot.toml's hermetic alone: the header is concealed again.
    let r = make_project(false);
    r.write("cot.toml", "hermetic = true\n");
    let run = cot(&r, &["make"]);
    assert_ne!(run.status, 0, "{}", run.describe());
    assert!(
        run.stderr.contains("looked for hdr.h"),
        "{}",
        run.describe()
    );
    // --allow without hermetic mode is a mistake, said so.
    let run = cot(&p, &["make", "--allow", "hdr.h"]);
    assert_ne!(run.status, 0);
    assert!(
        run.stderr.contains("--allow applies under --hermetic"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_sub_make_reads_its_makefile_and_its_recipes_are_hermetic() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("Makefile", "all:\n\t$(MAKE) -C sub\n");
    p.write(
        "sub/Makefile",
        "out: in\n\tcat in > out\n\nleak: in\n\tcat secret > leak\n",
    );
    p.write("sub/in", "declared\n");
    p.write("sub/secret", "undeclared\n");
    assert_ok(&cot(&p, &["make", "--hermetic"]), "sub-make");
    assert_eq!(p.read("sub/out").as_deref(), Some("declared\n"));
    let run = cot(&p, &["make", "--hermetic", "-C", "sub", "leak"]);
    assert_ne!(run.status, 0, "{}", run.describe());
    assert!(
        run.stderr.contains("(target leak) looked for sub/secret"),
        "{}",
        run.describe()
    );
    assert!(!p.exists("sub/leak"));
}

#[test]
fn directory_and_order_only_prerequisites_and_shell_calls_are_seen() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write(
        "Makefile",
        "VERSION := $(shell cat VERSION)\n\
         out: data | stamp\n\tcat data/deep/x stamp > $@; echo $(VERSION) >> $@\n",
    );
    p.write("VERSION", "1.2\n");
    p.write("data/deep/x", "x\n");
    p.write("stamp", "s\n");
    assert_ok(&cot(&p, &["make", "--hermetic"]), "make");
    assert_eq!(p.read("out").as_deref(), Some("x\ns\n1.2\n"));
}

#[test]
fn a_hermetic_cot_run_sees_only_allowed_files() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("file", "content\n");
    let run = p.run(&["--hermetic"], &["cat", "file"]);
    assert_ne!(run.status, 0, "{}", run.describe());
    assert!(run.stderr.contains("No such file"), "{}", run.describe());
    assert!(
        run.stderr
            .contains("cot: hermetic: `cat file` looked for file, which exists but is not visible"),
        "{}",
        run.describe()
    );
    run.assert_has("hidden", p.path("file"));
    let run = p.run(&["--hermetic", "--allow", "file"], &["cat", "file"]);
    assert_ok(&run, "--allow file");
    assert_eq!(run.stdout, "content\n");
    // What the command writes itself it sees, also at a path it was not allowed.
    let run = p.run(
        &["--hermetic"],
        &["sh", "-c", "echo mine > file && cat file && ls"],
    );
    assert_ok(&run, "writing over a concealed file");
    assert_eq!(run.stdout, "mine\nfile\n");
    assert_eq!(p.read("file").as_deref(), Some("mine\n"));
}

#[test]
fn a_cotfile_sees_the_project_and_its_children_what_is_allowed() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    p.write("data", "data\n");
    let script = format!(
        "#!/bin/sh\ncat data\n{} run -- cat data\n",
        shared_cot_bin().display()
    );
    p.write("Cotfile", &script);
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p.root().join("Cotfile"), fs::Permissions::from_mode(0o755)).unwrap();
    let run = cot(&p, &["build", "--hermetic"]);
    assert_ne!(run.status, 0, "{}", run.describe());
    assert!(
        run.stderr.contains("`cat data` looked for data"),
        "{}",
        run.describe()
    );
    let run = cot(&p, &["build", "--hermetic", "--allow", "data"]);
    assert_ok(&run, "--allow data");
    assert_eq!(run.stdout, "data\ndata\n");
}

/// A TCP listener on the host's loopback that counts the connections it gets.
struct Listener {
    listener: TcpListener,
}

impl Listener {
    fn new() -> Listener {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Listener { listener }
    }

    /// A command that connects and sends a line.
    fn connect(&self) -> String {
        let port = self.listener.local_addr().unwrap().port();
        format!("echo hello > /dev/tcp/127.0.0.1/{port} && echo connected")
    }

    /// Whether a connection came (and said hello).
    fn reached(&self) -> bool {
        match self.listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut text = String::new();
                let _ = stream.read_to_string(&mut text);
                text == "hello\n"
            }
            Err(_) => false,
        }
    }
}

#[test]
fn the_network_is_off_unless_net() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let host = Listener::new();
    let connect = host.connect();
    for flags in [&["--hermetic"][..], &[]] {
        let run = p.run(flags, &["bash", "-c", &connect]);
        assert_ne!(run.status, 0, "{flags:?}: {}", run.describe());
        assert!(!host.reached(), "{flags:?}: reached the host");
    }
    for flags in [&["--hermetic", "--net"][..], &["--net"]] {
        let run = p.run(flags, &["bash", "-c", &connect]);
        assert_ok(&run, &format!("{flags:?}"));
        assert_eq!(run.stdout, "connected\n");
        assert!(host.reached(), "{flags:?}: no connection came");
    }
    // A recipe of a hermetic build, too.
    p.write("Makefile", &format!("all:\n\tbash -c '{connect}'\n"));
    let run = cot(&p, &["make", "--hermetic"]);
    assert_ne!(run.status, 0, "{}", run.describe());
    assert!(!host.reached());
    assert_ok(&cot(&p, &["make", "--hermetic", "--net"]), "make --net");
    assert!(host.reached(), "the recipe did not connect");
}

#[test]
fn rootless_hermetic_build_and_network() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = make_project(true);
    let run = cot_as_test_user(&p, &["make", "--hermetic"]);
    assert_ok(&run, "rootless hermetic make");
    assert_like_plain_make(&p, &run, true);
    let q = make_project(false);
    let run = cot_as_test_user(&q, &["make", "--hermetic"]);
    assert_ne!(run.status, 0, "{}", run.describe());
    assert!(
        run.stderr.contains("looked for hdr.h"),
        "{}",
        run.describe()
    );
    let host = Listener::new();
    let connect = host.connect();
    let run = cot_as_test_user(&p, &["run", "--hermetic", "--", "bash", "-c", &connect]);
    assert_ne!(run.status, 0, "{}", run.describe());
    assert!(!host.reached());
    let run = cot_as_test_user(
        &p,
        &["run", "--hermetic", "--net", "--", "bash", "-c", &connect],
    );
    assert_ok(&run, "rootless --net");
    assert!(host.reached());
}

#[test]
fn home_is_empty_private_and_not_the_callers() {
    require_sandbox!();
    let _machine = machine_shared();
    let p = Project::new();
    let home = tempfile::Builder::new()
        .prefix("fake-home-")
        .tempdir_in("/var/tmp")
        .unwrap();
    fs::write(home.path().join(".profile"), "mine").unwrap();
    let script = "echo \"$HOME\"; ls -A \"$HOME\"; stat -c %a \"$HOME\"; \
                  echo x > \"$HOME/made\" && cat \"$HOME/made\"";
    let output = Command::new(shared_cot_bin())
        .args(["run", "--hermetic", "--", "sh", "-c", script])
        .current_dir(p.root())
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "HOME, its mode and what was made in it: {stdout}"
    );
    assert_ne!(lines[0], home.path().to_str().unwrap());
    assert_eq!(lines[1], "700");
    assert_eq!(lines[2], "x");
    assert!(!home.path().join("made").exists());
    assert_eq!(fs::read_dir(home.path()).unwrap().count(), 1);
}

#[test]
fn homes_root_and_credentials_are_hidden_but_not_the_project() {
    require_sandbox!();
    let _machine = machine_shared();
    if !Path::new("/root").is_dir() {
        crate::harness::skip("/root does not exist: cannot check what hermetic mode hides there");
        return;
    }
    let p = Project::new();
    let outside = tempfile::Builder::new()
        .prefix("creds-")
        .tempdir_in("/var/tmp")
        .unwrap();
    fs::create_dir(outside.path().join(".ssh")).unwrap();
    fs::write(outside.path().join(".ssh/id_ed25519"), "key").unwrap();
    fs::write(outside.path().join("notes"), "notes").unwrap();
    let key = outside.path().join(".ssh/id_ed25519");
    let notes = outside.path().join("notes");
    // Something in /root (not /root itself: it is on the way to cot's own executable when
    // that lives in root's home, and the way to cot stays visible).
    let root_probe = tempfile::Builder::new()
        .prefix("cot-probe-")
        .tempdir_in("/root")
        .unwrap();
    let probe = root_probe.path().display().to_string();
    let script = format!(
        "for f in {probe} /etc/shadow {} {}; do test -e $f && echo \"seen $f\"; done; true",
        key.display(),
        notes.display()
    );
    let plain = p.run(&[], &["sh", "-c", &script]).ok();
    assert!(
        plain.stdout.contains(&format!("seen {probe}\n")),
        "{}",
        plain.describe()
    );
    assert!(plain.stdout.contains("seen /etc/shadow\n"));
    assert!(plain.stdout.contains(&format!("seen {}", key.display())));
    let hermetic = p.run(&["--hermetic"], &["sh", "-c", &script]).ok();
    assert_eq!(
        hermetic.stdout,
        format!("seen {}\n", notes.display()),
        "{}",
        hermetic.describe()
    );
    // The first hidden component is recorded: /root itself, unless cot lives under it.
    assert!(
        hermetic.has("hidden", "/root") || hermetic.has("hidden", &probe),
        "{}",
        hermetic.describe()
    );
    hermetic.assert_has("hidden", "/etc/shadow");

    // A project in a home (here /root) stays reachable, while the rest of the home does not.
    let in_root = tempfile::Builder::new()
        .prefix("cot-hermetic-")
        .tempdir_in("/root")
        .unwrap();
    fs::create_dir(in_root.path().join(".cot")).unwrap();
    fs::write(in_root.path().join("in"), "inside\n").unwrap();
    let output = Command::new(shared_cot_bin())
        .args(["run", "--hermetic", "--allow", "in", "--"])
        .args(["sh", "-c", "cat in; ls /root"])
        .current_dir(in_root.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let name = in_root.path().file_name().unwrap().to_str().unwrap();
    assert_eq!(
        stdout,
        format!("inside\n{name}\n"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn inherit_env_is_refused_under_hermetic() {
    let p = Project::new();
    for args in [
        &["run", "--hermetic", "--inherit-env", "--", "true"][..],
        &["make", "--hermetic", "--inherit-env"],
    ] {
        let run = cot(&p, args);
        assert_ne!(run.status, 0, "{args:?}");
        assert!(
            run.stderr
                .contains("--inherit-env cannot be used with --hermetic"),
            "{args:?}: {}",
            run.stderr
        );
    }
    p.write("cot.toml", "hermetic = true\n");
    let run = cot(&p, &["make", "--inherit-env"]);
    assert!(
        run.stderr.contains("--inherit-env cannot be used"),
        "{}",
        run.stderr
    );
}
