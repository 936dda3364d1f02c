//! Tests of the content store on the real file system, each in its own temporary directory.

use super::*;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use tempfile::TempDir;

/// A fresh store in `<tmp>/cas`, and `<tmp>/work` for source and destination files.
struct Fixture {
    _dir: TempDir,
    cas: Cas,
    work: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cas = Cas::open(&dir.path().join("cas")).unwrap();
    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    Fixture {
        _dir: dir,
        cas,
        work,
    }
}

impl Fixture {
    fn write(&self, name: &str, content: &[u8]) -> PathBuf {
        let path = self.work.join(name);
        fs::write(&path, content).unwrap();
        path
    }

    /// Every object file in the store, by digest.
    fn objects(&self) -> Vec<Digest> {
        let mut found = Vec::new();
        for fan_out in fs::read_dir(&self.cas.objects).unwrap() {
            let fan_out = fan_out.unwrap();
            if !fan_out.file_type().unwrap().is_dir() {
                continue;
            }
            for entry in fs::read_dir(fan_out.path()).unwrap() {
                let name = format!(
                    "{}{}",
                    fan_out.file_name().to_str().unwrap(),
                    entry.unwrap().file_name().to_str().unwrap()
                );
                found.push(*blake3::Hash::from_hex(name).unwrap().as_bytes());
            }
        }
        found.sort();
        found
    }

    fn entries(&self, dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Damages the first byte of an object of another store.
    fn damage_in(&self, cas: &Cas, d: &Digest) {
        damage_object(cas, d, 0);
    }

    /// Overwrites one byte of a stored object in place, as a disk or a stray program might.
    fn damage(&self, d: &Digest, offset: u64) {
        damage_object(&self.cas, d, offset);
    }
}

/// Overwrites one byte of an object in place.
fn damage_object(cas: &Cas, d: &Digest, offset: u64) {
    let path = cas.object_path(d);
    fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], offset).unwrap();
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn cas_is_send_and_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Cas>();
}

#[test]
fn hex_is_lowercase_and_object_paths_fan_out_on_two_digits() {
    let f = fixture();
    let d = hash_bytes(b"hello");
    let h = hex(&d);
    assert_eq!(h, blake3::hash(b"hello").to_hex().as_str());
    assert_eq!(h.len(), 64);
    assert!(is_lower_hex(&h, 64));
    assert_eq!(
        f.cas.object_path(&d),
        f.cas.root().join("objects").join(&h[..2]).join(&h[2..])
    );
}

#[test]
fn hash_file_matches_hash_bytes_across_buffer_boundaries() {
    let f = fixture();
    for len in [
        0,
        1,
        4095,
        4096,
        BUF_SIZE - 1,
        BUF_SIZE,
        BUF_SIZE + 1,
        3 * BUF_SIZE + 17,
    ] {
        let data = content(len, 7);
        let path = f.write("file", &data);
        assert_eq!(
            hash_file(&path).unwrap(),
            (hash_bytes(&data), len as u64),
            "{len}"
        );
    }
}

#[test]
fn put_bytes_then_read_round_trips() {
    let f = fixture();
    for data in [&b""[..], b"x", &content(BUF_SIZE + 3, 1)] {
        let d = f.cas.put_bytes(data).unwrap();
        assert_eq!(d, hash_bytes(data));
        assert!(f.cas.contains(&d));
        assert_eq!(f.cas.read(&d).unwrap(), data);
    }
}

#[test]
fn put_file_then_read_round_trips() {
    let f = fixture();
    let data = content(2 * BUF_SIZE + 5, 2);
    let path = f.write("out.o", &data);
    let (d, size) = f.cas.put_file(&path).unwrap();
    assert_eq!((d, size), (hash_bytes(&data), data.len() as u64));
    assert_eq!(f.cas.read(&d).unwrap(), data);
    assert_eq!(f.objects(), vec![d]);
}

#[test]
fn objects_are_read_only_and_tmp_is_left_empty() {
    let f = fixture();
    let d = f.cas.put_file(&f.write("a", b"a")).unwrap().0;
    let e = f.cas.put_bytes(b"b").unwrap();
    for d in [d, e] {
        let meta = fs::metadata(f.cas.object_path(&d)).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o444);
    }
    assert!(f.entries(&f.cas.tmp).is_empty());
}

#[test]
fn identical_content_is_stored_once() {
    // Small files go through memory, large ones through a file in tmp/.
    for len in [4, BUF_SIZE + 4] {
        let f = fixture();
        let same = content(len, 6);
        let a = f.cas.put_file(&f.write("a", &same)).unwrap();
        let b = f.cas.put_file(&f.write("b", &same)).unwrap();
        let c = f.cas.put_bytes(&same).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.0, c);
        assert_eq!(f.objects(), vec![c]);
        assert!(f.entries(&f.cas.tmp).is_empty());
    }
}

#[test]
fn put_file_known_reads_nothing_when_the_object_is_present() {
    let f = fixture();
    let path = f.write("out", b"built");
    let (d, _) = f.cas.put_file(&path).unwrap();

    // Unreadable for anyone but root, and for root too once it is gone.
    fs::set_permissions(&path, Permissions::from_mode(0o000)).unwrap();
    f.cas.put_file_known(&path, &d).unwrap();
    fs::remove_file(&path).unwrap();
    f.cas.put_file_known(&path, &d).unwrap();
}

#[test]
fn put_file_known_stores_what_is_absent() {
    let f = fixture();
    let path = f.write("out", b"built");
    let d = hash_bytes(b"built");
    f.cas.put_file_known(&path, &d).unwrap();
    assert_eq!(f.cas.read(&d).unwrap(), b"built");
}

#[test]
fn put_file_known_detects_a_changed_file() {
    for len in [10, BUF_SIZE + 10] {
        let f = fixture();
        let now = content(len, 8);
        let path = f.write("out", &now);
        let expected = hash_bytes(b"built");
        let err = f.cas.put_file_known(&path, &expected).unwrap_err();
        match &err {
            Error::Changed {
                path: p,
                expected: e,
                found,
            } => {
                assert_eq!(p, &path);
                assert_eq!(e, &hex(&expected));
                assert_eq!(found, &hex(&hash_bytes(&now)));
            }
            other => panic!("expected Changed, got {other:?}"),
        }
        assert!(err.to_string().contains(&hex(&expected)), "{err}");
        assert!(f.objects().is_empty(), "what changed is not stored");
        assert!(f.entries(&f.cas.tmp).is_empty());
    }
}

#[test]
fn put_refuses_what_is_not_a_regular_file() {
    let f = fixture();
    let fifo = f.work.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for path in [f.work.clone(), fifo, f.work.join("missing")] {
        for err in [
            f.cas.put_file(&path).unwrap_err(),
            hash_file(&path).map(|_| ()).unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::Io { path: p, .. } if p == &path),
                "{err:?}"
            );
        }
    }
    assert!(f.objects().is_empty());
}

#[test]
fn restore_writes_exact_content_with_the_mode() {
    let f = fixture();
    let data = content(BUF_SIZE + 99, 3);
    let d = f.cas.put_bytes(&data).unwrap();
    for mode in [0o755, 0o644, 0o600, 0o400] {
        let dest = f.work.join(format!("restored-{mode:o}"));
        f.cas.restore(&d, &dest, mode).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), data);
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, mode);
    }
    assert_eq!(f.entries(&f.work).len(), 4, "no temporary files left");
}

#[test]
fn restore_replaces_an_existing_file_atomically() {
    let f = fixture();
    let dest = f.write("out", b"old content");
    let old_ino = fs::metadata(&dest).unwrap().ino();
    let reader = File::open(&dest).unwrap();

    let d = f.cas.put_bytes(b"new content").unwrap();
    f.cas.restore(&d, &dest, 0o644).unwrap();

    assert_eq!(fs::read(&dest).unwrap(), b"new content");
    assert_ne!(fs::metadata(&dest).unwrap().ino(), old_ino);
    // Renamed over, never truncated and rewritten: an open reader still sees the old file.
    let mut old = String::new();
    (&reader).read_to_string(&mut old).unwrap();
    assert_eq!(old, "old content");
    assert_eq!(f.entries(&f.work), vec!["out"]);
}

#[test]
fn restore_is_not_a_hard_link() {
    let f = fixture();
    let d = f.cas.put_bytes(b"output").unwrap();
    let dest = f.work.join("out");
    f.cas.restore(&d, &dest, 0o644).unwrap();

    let restored = fs::metadata(&dest).unwrap();
    let object = fs::metadata(f.cas.object_path(&d)).unwrap();
    assert_eq!(restored.nlink(), 1);
    assert_eq!(object.nlink(), 1);
    assert_ne!(
        (restored.dev(), restored.ino()),
        (object.dev(), object.ino())
    );

    // Editing the restored file in place leaves the object alone.
    OpenOptions::new()
        .write(true)
        .open(&dest)
        .unwrap()
        .write_all_at(b"OUT", 0)
        .unwrap();
    assert_eq!(f.cas.read(&d).unwrap(), b"output");
}

#[test]
fn restore_replaces_a_symlink_not_its_target() {
    let f = fixture();
    let target = f.write("target", b"precious");
    let dest = f.work.join("link");
    std::os::unix::fs::symlink(&target, &dest).unwrap();

    let d = f.cas.put_bytes(b"output").unwrap();
    f.cas.restore(&d, &dest, 0o644).unwrap();

    assert!(fs::symlink_metadata(&dest).unwrap().is_file());
    assert_eq!(fs::read(&dest).unwrap(), b"output");
    assert_eq!(fs::read(&target).unwrap(), b"precious");
}

#[test]
fn restore_into_a_missing_directory_fails_without_creating_it() {
    let f = fixture();
    let d = f.cas.put_bytes(b"output").unwrap();
    let dest = f.work.join("no-such-dir").join("out");
    let err = f.cas.restore(&d, &dest, 0o644).unwrap_err();
    assert!(matches!(&err, Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound));
    assert!(!f.work.join("no-such-dir").exists());
}

#[test]
fn missing_object_is_a_not_found_error_naming_the_object() {
    let f = fixture();
    let d = hash_bytes(b"never stored");
    assert!(!f.cas.contains(&d));
    let object = f.cas.object_path(&d);
    let dest = f.work.join("out");
    for err in [
        f.cas.read(&d).unwrap_err(),
        f.cas.restore(&d, &dest, 0o644).unwrap_err(),
    ] {
        match &err {
            Error::Io { path, source } => {
                assert_eq!(path, &object);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }
    assert!(!dest.exists());
}

#[test]
fn corrupt_object_is_refused_by_read_and_moved_aside() {
    let f = fixture();
    let data = content(3 * BUF_SIZE, 4);
    let d = f.cas.put_bytes(&data).unwrap();
    f.damage(&d, 2 * BUF_SIZE as u64 + 10);

    let err = f.cas.read(&d).unwrap_err();
    match &err {
        Error::Corrupt { digest, path } => {
            assert_eq!(digest, &hex(&d));
            assert_eq!(path, &f.cas.object_path(&d));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(err.to_string().contains(&hex(&d)), "{err}");
    assert!(!f.cas.contains(&d), "a corrupt object is not served again");
    assert_eq!(f.entries(&f.cas.corrupt), vec![hex(&d)]);

    // The next put of the same content stores a good copy.
    assert_eq!(f.cas.put_bytes(&data).unwrap(), d);
    assert_eq!(f.cas.read(&d).unwrap(), data);
}

#[test]
fn corrupt_object_is_refused_by_restore_and_dest_is_untouched() {
    let f = fixture();
    let d = f.cas.put_bytes(b"the real output").unwrap();
    f.damage(&d, 4);
    let dest = f.write("out", b"what was there");
    let before = fs::metadata(&dest).unwrap();

    let err = f.cas.restore(&d, &dest, 0o755).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { digest, .. } if digest == &hex(&d)),
        "{err:?}"
    );

    let after = fs::metadata(&dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), b"what was there");
    assert_eq!((after.ino(), after.mode()), (before.ino(), before.mode()));
    assert_eq!(f.entries(&f.work), vec!["out"], "no temporary file left");
    assert!(!f.cas.contains(&d));
    assert_eq!(f.entries(&f.cas.corrupt), vec![hex(&d)]);
}

#[test]
fn truncated_object_is_corrupt() {
    // What a power loss before the content reached the disk could leave.
    let f = fixture();
    let d = f.cas.put_bytes(b"complete content").unwrap();
    let path = f.cas.object_path(&d);
    fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
    File::create(&path).unwrap();
    assert!(matches!(f.cas.read(&d), Err(Error::Corrupt { .. })));
}

/// A stand-in for FICLONE that "clones" the wrong bytes, without moving either offset.
fn bad_clone(dst: &File, src: &File) -> io::Result<()> {
    let mut data = Vec::new();
    let mut offset = 0;
    let mut buf = [0u8; 4096];
    loop {
        let n = src.read_at(&mut buf, offset)?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
        offset += n as u64;
    }
    data[0] ^= 0xff;
    dst.write_all_at(&data, 0)
}

fn good_clone(dst: &File, src: &File) -> io::Result<()> {
    let mut data = vec![0u8; src.metadata()?.len() as usize];
    src.read_exact_at(&mut data, 0)?;
    dst.write_all_at(&data, 0)
}

fn no_clone(_: &File, _: &File) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

#[test]
fn fill_hashes_the_clone_rather_than_trusting_it() {
    let f = fixture();
    let data = content(BUF_SIZE + 1, 5);
    let src_path = f.write("src", &data);
    for (clone, expect) in [
        (good_clone as CloneFn, hash_bytes(&data)),
        (no_clone, hash_bytes(&data)),
        (bad_clone, {
            let mut bad = data.clone();
            bad[0] ^= 0xff;
            hash_bytes(&bad)
        }),
    ] {
        let mut src = File::open(&src_path).unwrap();
        let mut dst = tempfile::NamedTempFile::new_in(&f.work).unwrap();
        let (d, size) = fill(&mut src, &src_path, &mut dst, data.len() as u64, clone).unwrap();
        assert_eq!((d, size), (expect, data.len() as u64));
        assert_eq!(hash_bytes(&fs::read(dst.path()).unwrap()), expect);
    }
}

#[test]
fn concurrent_puts_from_8_threads() {
    let f = fixture();
    let shared = content(BUF_SIZE + 7, 9);
    let shared_path = f.write("shared", &shared);
    let own: Vec<(PathBuf, Vec<u8>)> = (0..8u8)
        .map(|i| {
            let data = content(1000 + 5000 * usize::from(i), i);
            (f.write(&format!("own-{i}"), &data), data)
        })
        .collect();

    std::thread::scope(|scope| {
        for (i, (path, data)) in own.iter().enumerate() {
            let (cas, shared, shared_path) = (f.cas.clone(), &shared, &shared_path);
            scope.spawn(move || {
                for round in 0..20 {
                    let copy = shared_path.with_file_name(format!("shared-copy-{i}"));
                    if round % 2 == 0 {
                        assert_eq!(cas.put_file(shared_path).unwrap().0, hash_bytes(shared));
                    } else {
                        fs::write(&copy, shared).unwrap();
                        cas.put_file_known(&copy, &hash_bytes(shared)).unwrap();
                    }
                    assert_eq!(cas.put_bytes(shared).unwrap(), hash_bytes(shared));
                    assert_eq!(cas.put_file(path).unwrap().0, hash_bytes(data));
                    assert_eq!(cas.read(&hash_bytes(shared)).unwrap(), *shared);
                }
            });
        }
    });

    let mut expected: Vec<Digest> = own.iter().map(|(_, data)| hash_bytes(data)).collect();
    expected.push(hash_bytes(&shared));
    expected.sort();
    assert_eq!(f.objects(), expected);
    assert!(f.entries(&f.cas.tmp).is_empty());
    for d in expected {
        f.cas.read(&d).unwrap();
    }
}

#[test]
fn gc_removes_only_unkept_objects_and_old_stray_files() {
    let f = fixture();
    let kept = f.cas.put_bytes(b"kept").unwrap();
    let dropped = [
        f.cas.put_bytes(b"dropped").unwrap(),
        f.cas.put_bytes(&content(10_000, 1)).unwrap(),
    ];
    let old = f.cas.tmp.join("obj-old");
    let fresh = f.cas.tmp.join("obj-fresh");
    fs::write(&old, b"12345").unwrap();
    fs::write(&fresh, b"123").unwrap();
    let unrelated = f.cas.objects.join("README");
    fs::write(&unrelated, b"not an object").unwrap();
    let odd_dir = f.cas.tmp.join("a-directory");
    fs::create_dir(&odd_dir).unwrap();
    for stale in [&old, &odd_dir] {
        File::open(stale)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(2 * 3600))
            .unwrap();
    }

    let report = f.cas.gc(&HashSet::from([kept])).unwrap();
    assert_eq!(
        report,
        GcReport {
            objects: 2,
            bytes: 7 + 10_000 + 5,
        }
    );
    assert_eq!(f.objects(), vec![kept]);
    assert!(dropped.iter().all(|d| !f.cas.contains(d)));
    assert!(!old.exists());
    assert!(fresh.exists());
    assert!(unrelated.exists());
    assert!(odd_dir.is_dir());

    assert_eq!(
        f.cas.gc(&HashSet::from([kept])).unwrap(),
        GcReport::default()
    );
    assert_eq!(f.cas.read(&kept).unwrap(), b"kept");
}

#[test]
fn open_creates_the_layout_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("a").join("cache");
    let cas = Cas::open(&root).unwrap();
    assert_eq!(cas.root(), root);
    assert_eq!(fs::read(root.join("VERSION")).unwrap(), b"1\n");
    for sub in ["objects", "tmp", "corrupt"] {
        assert!(root.join(sub).is_dir(), "{sub}");
    }
    let d = cas.put_bytes(b"x").unwrap();
    let again = Cas::open(&root).unwrap();
    assert_eq!(again.read(&d).unwrap(), b"x");
}

#[test]
fn version_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cas");
    Cas::open(&root).unwrap();
    let version = root.join("VERSION");
    for found in [&b"2\n"[..], b"", b"1", b"\xff garbage"] {
        fs::set_permissions(&version, Permissions::from_mode(0o644)).unwrap();
        fs::write(&version, found).unwrap();
        let err = Cas::open(&root).unwrap_err();
        assert!(
            matches!(&err, Error::Version { path, .. } if path == &version),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("VERSION") && message.contains("version 1"),
            "{message}"
        );
    }
    fs::write(&version, b"2\n").unwrap();
    assert_eq!(
        Cas::open(&root).unwrap_err().to_string(),
        format!(
            "content store {version:?} has format version \"2\"; this cot reads version 1 only"
        )
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn random_contents_round_trip(
        len in prop_oneof![4 => 0..5000usize, 1 => BUF_SIZE - 2..BUF_SIZE + 3000],
        seed in any::<u64>(),
        mode in prop_oneof![Just(0o644u32), Just(0o755), Just(0o600)],
    ) {
        // Expanded from a seed: a vec strategy of a quarter million bytes is slow to generate.
        let mut data = vec![0u8; len];
        blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut data);
        let f = fixture();
        let path = f.write("src", &data);
        let (d, size) = f.cas.put_file(&path).unwrap();
        prop_assert_eq!(d, hash_bytes(&data));
        prop_assert_eq!(size, data.len() as u64);
        prop_assert_eq!(hash_file(&path).unwrap(), (d, size));
        prop_assert_eq!(f.cas.put_bytes(&data).unwrap(), d);
        prop_assert_eq!(f.cas.read(&d).unwrap(), data.clone());

        let dest = f.work.join("dest");
        f.cas.restore(&d, &dest, mode).unwrap();
        prop_assert_eq!(fs::read(&dest).unwrap(), data);
        prop_assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, mode);
        prop_assert_eq!(f.objects(), vec![d]);
    }
}

#[test]
fn import_copies_a_verified_object_from_another_store() {
    let f = fixture();
    let other = Cas::open(&f.work.join("other")).unwrap();
    let data = content(300_000, 3);
    let d = other.put_bytes(&data).unwrap();
    assert_eq!(f.cas.import(&other, &d).unwrap(), data.len() as u64);
    assert_eq!(f.cas.read(&d).unwrap(), data);
    // Present already: nothing is read from the other store.
    f.damage_in(&other, &d);
    assert_eq!(f.cas.import(&other, &d).unwrap(), data.len() as u64);
}

#[test]
fn import_refuses_a_corrupt_object_and_stores_nothing() {
    let f = fixture();
    let other = Cas::open(&f.work.join("other")).unwrap();
    let d = other.put_bytes(&content(5000, 4)).unwrap();
    f.damage_in(&other, &d);
    match f.cas.import(&other, &d) {
        Err(Error::Corrupt { digest, .. }) => assert_eq!(digest, hex(&d)),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(!f.cas.contains(&d));
    assert!(!other.contains(&d), "moved aside in the store it came from");
    assert!(f.entries(&f.cas.tmp).is_empty());
}

#[test]
fn a_writer_stores_only_the_content_it_was_asked_for() {
    let f = fixture();
    let data = content(100_000, 5);
    let d = hash_bytes(&data);
    let mut writer = f.cas.writer().unwrap();
    for chunk in data.chunks(7000) {
        writer.write(chunk).unwrap();
    }
    assert_eq!(writer.finish(&d, "test").unwrap(), data.len() as u64);
    assert_eq!(f.cas.read(&d).unwrap(), data);

    let mut writer = f.cas.writer().unwrap();
    writer.write(b"something else").unwrap();
    let wanted = hash_bytes(b"what was asked for");
    match writer.finish(&wanted, "remote blob") {
        Err(Error::Mismatch { origin, .. }) => assert_eq!(origin, "remote blob"),
        other => panic!("expected Mismatch, got {other:?}"),
    }
    assert!(!f.cas.contains(&wanted));
    assert!(f.entries(&f.cas.tmp).is_empty(), "nothing left behind");
}

#[test]
fn a_group_writable_root_gives_its_mode_to_every_directory_made() {
    let f = fixture();
    let root = f.work.join("shared");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, Permissions::from_mode(0o2775)).unwrap();
    // Whatever the umask of the user who creates them.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let opened = Cas::open(&root).and_then(|cas| cas.put_bytes(b"x").map(|d| (cas, d)));
    nix::sys::stat::umask(old);
    let (cas, d) = opened.unwrap();
    let fan_out = cas.object_path(&d).parent().unwrap().to_path_buf();
    for dir in [
        cas.objects.clone(),
        cas.tmp.clone(),
        cas.corrupt.clone(),
        fan_out,
    ] {
        let mode = fs::metadata(&dir).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o2775, "{}", dir.display());
    }
    // A private root stays private.
    let private = Cas::open(&f.work.join("private")).unwrap();
    assert_eq!(private.shared_mode(), None);
}

#[test]
fn open_existing_creates_nothing() {
    let f = fixture();
    let missing = f.work.join("missing");
    assert!(Cas::open_existing(&missing).is_err());
    assert!(!missing.exists());
    let d = f.cas.put_bytes(b"y").unwrap();
    let reader = Cas::open_existing(f.cas.root()).unwrap();
    assert_eq!(reader.read(&d).unwrap(), b"y");
    // A store opened to read changes nothing, not even to move a corrupt object aside.
    f.damage(&d, 0);
    assert!(matches!(reader.read(&d), Err(Error::Corrupt { .. })));
    let local = Cas::open(&f.work.join("local")).unwrap();
    assert!(matches!(
        local.import(&reader, &d),
        Err(Error::Corrupt { .. })
    ));
    assert!(f.cas.object_path(&d).exists());
    assert!(f.entries(&f.cas.corrupt).is_empty());
}
