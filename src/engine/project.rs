//! The project a thunk belongs to, and the scratch space cot keeps in it.
//!
//! The project root is the nearest ancestor of the working directory holding a `.cot/`
//! directory, else the working directory itself. cot keeps its state in `<root>/.cot/`; the
//! thunk never sees that directory. Each running thunk gets a copy-on-write layer
//! `.cot/tmp/layer-<pid>-<n>/` on the project's filesystem, so that committing its outputs is a
//! rename, and a lock file `.cot/tmp/layer-<pid>-<n>.lock` held (flock) for as long as the
//! thunk runs. A layer whose lock is free belongs to a cot that died (SIGKILL, power loss): its
//! commit, if it had begun (its journal exists), is completed by the next run; otherwise the
//! layer is dropped. Either way the real files are those of a complete run or of none.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};

/// The name of cot's state directory at the project root.
pub const STATE_DIR: &str = ".cot";

/// Finds the project root for `cwd`.
pub fn find_root(cwd: &Path) -> PathBuf {
    cwd.ancestors()
        .find(|dir| dir.join(STATE_DIR).is_dir())
        .unwrap_or(cwd)
        .to_path_buf()
}

/// A layer directory reserved for one thunk, with its lock held.
#[derive(Debug)]
pub struct LayerSlot {
    /// Empty directory for the copy-on-write layer (the filesystem removes it on commit/discard).
    pub dir: PathBuf,
    /// Where the thunk's stdout and stderr are kept while it runs.
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
}

impl Drop for LayerSlot {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.stdout);
        let _ = fs::remove_file(&self.stderr);
        // The layer dir itself is removed by commit/discard; if it is still here the thunk never
        // reached either, and the next sweep removes it once our lock is gone.
        if !self.dir.exists() {
            let _ = fs::remove_file(&self.lock_path);
        }
    }
}

/// Reserves a new layer directory under `<root>/.cot/tmp/`, creating `.cot/` if needed, and
/// removes the layers of dead cot processes on the way.
pub fn reserve_layer(root: &Path) -> io::Result<LayerSlot> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = root.join(STATE_DIR).join("tmp");
    fs::create_dir_all(&tmp).map_err(|e| with_path(e, &tmp))?;
    sweep_dead_layers(&tmp);
    let name = format!(
        "layer-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let lock_path = tmp.join(format!("{name}.lock"));
    // Locked under another name first, then renamed into place: a sweep by another cot must
    // never find a layer's lock file before its owner holds it (it would take it for dead).
    let unlocked = tmp.join(format!("{name}.lock-new"));
    let file = File::create(&unlocked).map_err(|e| with_path(e, &unlocked))?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| with_path(io::Error::from(errno), &unlocked))?;
    fs::rename(&unlocked, &lock_path).map_err(|e| with_path(e, &lock_path))?;
    let dir = tmp.join(&name);
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| with_path(e, &dir))?;
    }
    fs::create_dir(&dir).map_err(|e| with_path(e, &dir))?;
    Ok(LayerSlot {
        stdout: tmp.join(format!("{name}.stdout")),
        stderr: tmp.join(format!("{name}.stderr")),
        dir,
        lock_path,
        _lock: lock,
    })
}

/// Settles the layers of dead cot processes in the project: an interrupted commit is
/// completed, an uncommitted layer dropped. Runs before anything looks at the project's files.
pub fn recover_dead_layers(root: &Path) {
    sweep_dead_layers(&root.join(STATE_DIR).join("tmp"));
}

/// Settles every `layer-*` whose lock file is not held by a live cot.
fn sweep_dead_layers(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(ext) = path.extension() else {
            continue;
        };
        if ext == "lock-new" {
            // Left by a cot killed between creating its lock and renaming it into place, a
            // window of microseconds: only an old one can be such a leftover (a young one may
            // be about to be locked by its owner).
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 3600));
            if old {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        if ext != "lock" {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        // Holding the lock proves its owner is gone; keep holding it while we clean up.
        if let Ok(_held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            let layer = path.with_extension("");
            if let Err(e) = cot_fusefs::recover(&layer) {
                // Kept (lock file included) for the next run to retry; say why.
                eprintln!("cot: cannot settle the layer of a dead run: {e}");
                continue;
            }
            let _ = fs::remove_file(path.with_extension("stdout"));
            let _ = fs::remove_file(path.with_extension("stderr"));
            let _ = fs::remove_file(&path);
        }
    }
}

fn with_path(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_nearest_ancestor_with_state_dir() {
        let top = tempfile::tempdir().unwrap();
        let sub = top.path().join("a/b");
        fs::create_dir_all(&sub).unwrap();
        assert_eq!(find_root(&sub), sub);
        fs::create_dir(top.path().join("a").join(STATE_DIR)).unwrap();
        assert_eq!(find_root(&sub), top.path().join("a"));
    }

    #[test]
    fn dead_layers_are_swept_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let live = reserve_layer(root.path()).unwrap();
        fs::write(live.dir.join("output"), "x").unwrap();
        // A layer left by a killed cot: directory and lock file, no lock held.
        let tmp = root.path().join(STATE_DIR).join("tmp");
        fs::create_dir(tmp.join("layer-1-0")).unwrap();
        fs::write(tmp.join("layer-1-0/half-written"), "x").unwrap();
        File::create(tmp.join("layer-1-0.lock")).unwrap();

        let second = reserve_layer(root.path()).unwrap();
        assert!(!tmp.join("layer-1-0").exists(), "dead layer swept");
        assert!(!tmp.join("layer-1-0.lock").exists());
        assert!(live.dir.join("output").exists(), "live layer kept");
        assert_ne!(live.dir, second.dir);
    }
}
