//! Tests of the trace store against a real RocksDB in temporary directories.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use proptest::prelude::*;
use tempfile::TempDir;

use super::model::{
    FileKind, FileState, Input, InputKind, Observed, Output, OutputState, StatTuple, StorePath,
    ThunkId, ThunkKey, Trace, TraceId,
};
use super::schema::{self, FILES, META, READERS, THUNKS, TRACES, WRITERS};
use super::{hex, thunk_id, trace_id, Error, GcReport, Store, MAX_TRACES_PER_THUNK};

fn project(path: &str) -> StorePath {
    StorePath::Project(path.as_bytes().to_vec())
}

fn key(command: &str) -> ThunkKey {
    ThunkKey {
        env: vec![(b"PATH".to_vec(), b"/usr/bin".to_vec())],
        ..ThunkKey::of_command(&command.split(' ').collect::<Vec<_>>())
    }
}

fn stat(n: u64) -> StatTuple {
    StatTuple {
        dev: 1,
        ino: n,
        size: n * 10,
        mtime_ns: 1_000 + n as i64,
        ctime_ns: 2_000,
        mode: 0o644,
    }
}

/// A trace that read `inputs` (content seeded by `seed`) and wrote `outputs`.
fn trace(inputs: &[&str], outputs: &[&str], seed: u8) -> Trace {
    Trace {
        inputs: inputs
            .iter()
            .enumerate()
            .map(|(i, path)| Input {
                path: project(path),
                kind: InputKind::Read,
                observed: Observed::Content {
                    digest: [seed; 32],
                    stat: stat(i as u64),
                },
            })
            .collect(),
        outputs: outputs
            .iter()
            .map(|path| Output {
                path: project(path),
                state: OutputState::File {
                    digest: [seed.wrapping_add(100); 32],
                    mode: 0o644,
                    size: 3,
                },
            })
            .collect(),
        stdout: [1; 32],
        stderr: [2; 32],
        exit_code: 0,
        duration_ns: 5,
        ran_at_ns: 1_000 + i64::from(seed),
        children: Vec::new(),
        events: Vec::new(),
        internal: Vec::new(),
    }
}

fn open() -> (TempDir, Store) {
    open_in(tempfile::tempdir().unwrap())
}

fn open_in(dir: TempDir) -> (TempDir, Store) {
    let store = Store::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

fn rows(store: &Store, cf: &'static str) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .db
        .iterator_cf(store.cf(cf).unwrap(), rocksdb::IteratorMode::Start)
        .map(|item| {
            let (k, v) = item.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

fn ids(traces: &[(TraceId, Trace)]) -> Vec<TraceId> {
    traces.iter().map(|(id, _)| *id).collect()
}

/// Checks the invariants of `schema.rs` against the stored traces: `traces` rows are exactly the
/// kept ones, `readers` rows exactly their inputs, and every `writers` row names a thunk that
/// keeps a trace writing the path.
fn check_invariants(store: &Store) {
    let mut kept_rows = BTreeSet::new();
    let mut readers = BTreeSet::new();
    let mut outputs = BTreeSet::new();
    for (thunk, info) in store.thunks().unwrap() {
        assert!(info.traces.len() <= MAX_TRACES_PER_THUNK);
        let unique: BTreeSet<_> = info.traces.iter().collect();
        assert_eq!(unique.len(), info.traces.len(), "duplicate trace ids");
        let traces = store.traces(&thunk).unwrap();
        assert_eq!(ids(&traces), info.traces);
        for (id, trace) in &traces {
            assert_eq!(trace_id(trace), *id);
            kept_rows.insert(schema::trace_key(&thunk, id).to_vec());
            for input in &trace.inputs {
                readers.insert(schema::reader_key(&schema::path_key(&input.path), &thunk));
            }
            for output in &trace.outputs {
                outputs.insert((schema::path_key(&output.path), thunk));
            }
        }
    }
    let trace_rows: BTreeSet<_> = rows(store, TRACES).into_iter().map(|(k, _)| k).collect();
    assert_eq!(trace_rows, kept_rows);
    let reader_rows: BTreeSet<_> = rows(store, READERS).into_iter().map(|(k, _)| k).collect();
    assert_eq!(reader_rows, readers);
    for (path, value) in rows(store, WRITERS) {
        let thunk: ThunkId = value.try_into().unwrap();
        assert!(
            outputs.contains(&(path, thunk)),
            "writers row not backed by a kept trace"
        );
    }
}

#[test]
fn store_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
}

#[test]
fn record_then_read_round_trip() {
    let (_dir, store) = open();
    let k = key("cc -c a.c");
    let id = thunk_id(&k);
    assert_eq!(store.thunk(&id).unwrap(), None);
    assert!(store.traces(&id).unwrap().is_empty());

    let mut t = trace(&["a.c", "a.h"], &["a.o"], 1);
    t.inputs.push(Input {
        path: StorePath::Absolute(b"/usr/include/zlib.h".to_vec()),
        kind: InputKind::Absent,
        observed: Observed::Absent,
    });
    t.inputs.push(Input {
        path: StorePath::Absolute(b"/usr/lib/\xff-not-utf8".to_vec()),
        kind: InputKind::Stat,
        observed: Observed::Meta {
            kind: FileKind::Symlink,
            mode: 0o777,
            size: 4,
            mtime_ns: -3,
            link: Some(b"x".to_vec()),
        },
    });
    t.outputs.push(Output {
        path: project("gone"),
        state: OutputState::Deleted,
    });
    let trace_id_recorded = store.record(&k, &t, &[]).unwrap();
    assert_eq!(trace_id_recorded, trace_id(&t));

    let info = store.thunk(&id).unwrap().unwrap();
    assert_eq!(info.key, k);
    assert_eq!(info.traces, vec![trace_id_recorded]);
    assert_eq!(info.last_used_ns, t.ran_at_ns);
    assert_eq!(
        store.traces(&id).unwrap(),
        vec![(trace_id_recorded, t.clone())]
    );
    assert_eq!(store.thunks().unwrap(), vec![(id, info)]);
    check_invariants(&store);

    // And after reopening.
    let dir = store.path().to_path_buf();
    drop(store);
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.traces(&id).unwrap(), vec![(trace_id_recorded, t)]);
}

#[test]
fn ten_traces_keep_the_eight_most_recent_and_drop_the_rows_of_the_others() {
    let (_dir, store) = open();
    let k = key("gen");
    let id = thunk_id(&k);
    let only: Vec<String> = (0..10).map(|i| format!("only-{i}")).collect();
    let outs: Vec<String> = (0..10).map(|i| format!("out-{i}")).collect();
    let mut recorded = Vec::new();
    for i in 0..10u8 {
        let t = trace(
            &["common", &only[usize::from(i)]],
            &["shared-out", &outs[usize::from(i)]],
            i,
        );
        recorded.push(store.record(&k, &t, &[]).unwrap());
    }
    let expected: Vec<TraceId> = recorded
        .iter()
        .rev()
        .take(MAX_TRACES_PER_THUNK)
        .copied()
        .collect();
    assert_eq!(store.thunk(&id).unwrap().unwrap().traces, expected);
    assert_eq!(ids(&store.traces(&id).unwrap()), expected);
    for dropped in &recorded[..2] {
        assert_eq!(
            store
                .db
                .get_cf(store.cf(TRACES).unwrap(), schema::trace_key(&id, dropped))
                .unwrap(),
            None
        );
    }
    assert_eq!(rows(&store, TRACES).len(), MAX_TRACES_PER_THUNK);
    // Paths only the dropped traces read or wrote lose their index rows; the others keep them.
    for i in 0..2 {
        assert!(
            store.readers(&project(&only[i])).unwrap().is_empty(),
            "{}",
            only[i]
        );
        assert_eq!(
            store.writer(&project(&outs[i])).unwrap(),
            None,
            "{}",
            outs[i]
        );
    }
    for i in 2..10 {
        assert_eq!(store.readers(&project(&only[i])).unwrap(), vec![id]);
        assert_eq!(store.writer(&project(&outs[i])).unwrap(), Some(id));
    }
    assert_eq!(store.readers(&project("common")).unwrap(), vec![id]);
    assert_eq!(store.writer(&project("shared-out")).unwrap(), Some(id));
    check_invariants(&store);
}

#[test]
fn recording_an_identical_trace_moves_it_to_the_front() {
    let (_dir, store) = open();
    let k = key("gen");
    let id = thunk_id(&k);
    let a = store.record(&k, &trace(&["x"], &[], 1), &[]).unwrap();
    let b = store.record(&k, &trace(&["y"], &[], 2), &[]).unwrap();
    let c = store.record(&k, &trace(&["z"], &[], 3), &[]).unwrap();
    assert_eq!(store.thunk(&id).unwrap().unwrap().traces, vec![c, b, a]);
    assert_eq!(store.record(&k, &trace(&["x"], &[], 1), &[]).unwrap(), a);
    assert_eq!(store.thunk(&id).unwrap().unwrap().traces, vec![a, c, b]);
    assert_eq!(rows(&store, TRACES).len(), 3);
    check_invariants(&store);
}

#[test]
fn touch_moves_a_trace_to_the_front_and_updates_last_used() {
    let (_dir, store) = open();
    let k = key("gen");
    let id = thunk_id(&k);
    let a = store.record(&k, &trace(&["x"], &[], 1), &[]).unwrap();
    let b = store.record(&k, &trace(&["y"], &[], 2), &[]).unwrap();
    let c = store.record(&k, &trace(&["z"], &[], 3), &[]).unwrap();
    store.touch(&id, &b, 50_000).unwrap();
    let info = store.thunk(&id).unwrap().unwrap();
    assert_eq!(info.traces, vec![b, c, a]);
    assert_eq!(info.last_used_ns, 50_000);
    // An earlier clock does not move last use back.
    store.touch(&id, &a, 10).unwrap();
    let info = store.thunk(&id).unwrap().unwrap();
    assert_eq!(info.traces, vec![a, b, c]);
    assert_eq!(info.last_used_ns, 50_000);

    let err = store.touch(&id, &[9; 32], 1).unwrap_err();
    assert!(matches!(err, Error::UnknownTrace { .. }), "{err}");
    assert!(err.to_string().contains(&hex(&[9; 32])), "{err}");
    let err = store.touch(&[8; 32], &a, 1).unwrap_err();
    assert!(matches!(err, Error::UnknownThunk { .. }), "{err}");
}

#[test]
fn readers_and_writers_index_paths_across_thunks() {
    let (_dir, store) = open();
    let (cc, ld) = (key("cc"), key("ld"));
    let (cc_id, ld_id) = (thunk_id(&cc), thunk_id(&ld));
    store
        .record(&cc, &trace(&["a.c", "a.h"], &["a.o"], 1), &[])
        .unwrap();
    let mut link = trace(&["a.o"], &["app"], 2);
    link.inputs.push(Input {
        path: StorePath::Absolute(b"a.h".to_vec()),
        kind: InputKind::Absent,
        observed: Observed::Absent,
    });
    store.record(&ld, &link, &[]).unwrap();

    let mut both = vec![cc_id, ld_id];
    both.sort();
    assert_eq!(store.readers(&project("a.c")).unwrap(), vec![cc_id]);
    assert_eq!(store.readers(&project("a.o")).unwrap(), vec![ld_id]);
    // Same bytes, other kind of path: a different key.
    assert_eq!(store.readers(&project("a.h")).unwrap(), vec![cc_id]);
    assert_eq!(
        store
            .readers(&StorePath::Absolute(b"a.h".to_vec()))
            .unwrap(),
        vec![ld_id]
    );
    // A prefix of a read path is not read.
    assert!(store.readers(&project("a")).unwrap().is_empty());
    assert_eq!(store.writer(&project("a.o")).unwrap(), Some(cc_id));
    assert_eq!(store.writer(&project("app")).unwrap(), Some(ld_id));
    assert_eq!(store.writer(&project("a.c")).unwrap(), None);

    // A later writer of the same path takes the row over; both read a.c now.
    store
        .record(&ld, &trace(&["a.c"], &["a.o"], 3), &[])
        .unwrap();
    assert_eq!(store.writer(&project("a.o")).unwrap(), Some(ld_id));
    assert_eq!(store.readers(&project("a.c")).unwrap(), both);
    check_invariants(&store);

    let err = store
        .record(&cc, &trace(&["nul\0byte"], &[], 1), &[])
        .unwrap_err();
    assert!(matches!(err, Error::NulInPath { .. }), "{err}");
}

#[test]
fn file_states_are_stored_with_records_and_alone() {
    let (_dir, store) = open();
    let state = |n: u8| FileState {
        stat: stat(u64::from(n)),
        digest: [n; 32],
    };
    assert_eq!(store.file_state(b"/p/a.c").unwrap(), None);
    store
        .record(
            &key("cc"),
            &trace(&["a.c"], &[], 1),
            &[(b"/p/a.c".to_vec(), state(1))],
        )
        .unwrap();
    assert_eq!(store.file_state(b"/p/a.c").unwrap(), Some(state(1)));
    store
        .put_file_states(&[
            (b"/p/a.c".to_vec(), state(2)),
            (b"/p/b.c".to_vec(), state(3)),
        ])
        .unwrap();
    assert_eq!(store.file_state(b"/p/a.c").unwrap(), Some(state(2)));
    assert_eq!(store.file_state(b"/p/b.c").unwrap(), Some(state(3)));
}

#[test]
fn a_future_schema_version_is_refused_with_a_clear_message() {
    let (_dir, mut store) = open();
    store
        .record(&key("cc"), &trace(&["a.c"], &[], 1), &[])
        .unwrap();
    // Version 5 stores 5 and may add column families.
    store
        .db
        .put_cf(
            store.cf(META).unwrap(),
            schema::VERSION_KEY,
            5u32.to_be_bytes(),
        )
        .unwrap();
    store
        .db
        .create_cf("added_in_v5", &rocksdb::Options::default())
        .unwrap();
    let dir = store.path().to_path_buf();
    drop(store);

    let expected = format!(
        "trace store {0} has schema version 5, this cot understands 4: upgrade cot, or remove {0} \
         to start afresh",
        dir.display()
    );
    let err = Store::open(&dir).unwrap_err();
    assert!(matches!(err, Error::NewerSchema { found: 5, .. }), "{err}");
    assert_eq!(err.to_string(), expected);
    let err = Store::open_read_only(&dir).unwrap_err();
    assert_eq!(err.to_string(), expected);
}

#[test]
fn a_store_with_data_but_no_version_is_refused() {
    let (_dir, store) = open();
    store
        .record(&key("cc"), &trace(&["a.c"], &[], 1), &[])
        .unwrap();
    store
        .db
        .delete_cf(store.cf(META).unwrap(), schema::VERSION_KEY)
        .unwrap();
    let dir = store.path().to_path_buf();
    drop(store);
    let err = Store::open(&dir).unwrap_err();
    assert!(matches!(err, Error::MissingSchema { .. }), "{err}");
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "{err}"
    );
}

#[test]
fn an_empty_store_without_a_version_gets_one() {
    let (_dir, store) = open();
    store
        .db
        .delete_cf(store.cf(META).unwrap(), schema::VERSION_KEY)
        .unwrap();
    let dir = store.path().to_path_buf();
    drop(store);
    let store = Store::open(&dir).unwrap();
    assert_eq!(
        rows(&store, META),
        vec![(
            schema::VERSION_KEY.to_vec(),
            schema::SCHEMA_VERSION.to_be_bytes().to_vec()
        )]
    );
}

#[test]
fn a_version_1_store_is_migrated_keeping_only_file_states() {
    let state = |n: u8| FileState {
        stat: stat(u64::from(n)),
        digest: [n; 32],
    };
    let (_dir, mut store) = open();
    store
        .record(&key("cc"), &trace(&["a.c"], &["a.o"], 1), &[])
        .unwrap();
    store
        .put_file_states(&[(b"/p/a.c".to_vec(), state(2))])
        .unwrap();
    // Version 1 had no `builds` column family.
    store.db.drop_cf(schema::BUILDS).unwrap();
    store
        .db
        .put_cf(
            store.cf(META).unwrap(),
            schema::VERSION_KEY,
            1u32.to_be_bytes(),
        )
        .unwrap();
    let dir = store.path().to_path_buf();
    drop(store);

    let store = Store::open(&dir).unwrap();
    assert!(store.thunks().unwrap().is_empty());
    for cf in [TRACES, READERS, WRITERS] {
        assert!(rows(&store, cf).is_empty(), "{cf} kept rows");
    }
    assert_eq!(store.file_state(b"/p/a.c").unwrap(), Some(state(2)));
    assert_eq!(store.build_record(&[0; 32]).unwrap(), None);
    drop(store);
    // Migrated once: it opens as the current version.
    let store = Store::open(&dir).unwrap();
    assert_eq!(
        rows(&store, META),
        vec![(
            schema::VERSION_KEY.to_vec(),
            schema::SCHEMA_VERSION.to_be_bytes().to_vec()
        )]
    );
}

#[test]
fn an_older_schema_version_is_refused() {
    let (_dir, store) = open();
    store
        .db
        .put_cf(
            store.cf(META).unwrap(),
            schema::VERSION_KEY,
            0u32.to_be_bytes(),
        )
        .unwrap();
    let dir = store.path().to_path_buf();
    drop(store);
    let err = Store::open(&dir).unwrap_err();
    assert!(matches!(err, Error::OlderSchema { found: 0, .. }), "{err}");
}

#[test]
fn opening_a_missing_store_read_only_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none");
    let err = Store::open_read_only(&path).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(!path.exists());
}

#[test]
fn a_corrupt_value_is_an_error_naming_column_family_and_key() {
    let (_dir, store) = open();
    let k = key("cc");
    let id = thunk_id(&k);
    let t = store
        .record(&k, &trace(&["a.c"], &["a.o"], 1), &[])
        .unwrap();

    let trace_key = schema::trace_key(&id, &t);
    store
        .db
        .put_cf(store.cf(TRACES).unwrap(), trace_key, b"\xff\xff\xff")
        .unwrap();
    let err = store.traces(&id).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, Error::Corrupt { cf: TRACES, .. }),
        "{message}"
    );
    assert!(
        message.contains("column family traces") && message.contains(&hex(&trace_key)),
        "{message}"
    );
    assert!(store.referenced_digests().is_err());

    store.db.put_cf(store.cf(THUNKS).unwrap(), id, b"").unwrap();
    let message = store.thunk(&id).unwrap_err().to_string();
    assert!(
        message.contains("column family thunks") && message.contains(&hex(&id)),
        "{message}"
    );
    assert!(store.thunks().is_err());

    // Trailing bytes after a valid value are corruption too.
    let mut value = postcard::to_allocvec(&FileState {
        stat: stat(1),
        digest: [0; 32],
    })
    .unwrap();
    value.push(0);
    store
        .db
        .put_cf(store.cf(FILES).unwrap(), b"/p/x", value)
        .unwrap();
    let message = store.file_state(b"/p/x").unwrap_err().to_string();
    assert!(
        message.contains("column family files") && message.contains(&hex(b"/p/x")),
        "{message}"
    );

    store
        .db
        .put_cf(store.cf(WRITERS).unwrap(), b"Pa.o", b"short")
        .unwrap();
    let message = store.writer(&project("a.o")).unwrap_err().to_string();
    assert!(
        message.contains("column family writers") && message.contains(&hex(b"Pa.o")),
        "{message}"
    );
}

#[test]
fn read_only_store_sees_what_an_open_writer_recorded() {
    let (_dir, store) = open();
    let k = key("cc");
    let t = trace(&["a.c"], &["a.o"], 1);
    let trace = store
        .record(
            &k,
            &t,
            &[(
                b"/p/a.c".to_vec(),
                FileState {
                    stat: stat(1),
                    digest: [1; 32],
                },
            )],
        )
        .unwrap();

    let reader = Store::open_read_only(store.path()).unwrap();
    assert_eq!(
        reader.traces(&thunk_id(&k)).unwrap(),
        vec![(trace, t.clone())]
    );
    assert_eq!(reader.writer(&project("a.o")).unwrap(), Some(thunk_id(&k)));
    assert!(reader.file_state(b"/p/a.c").unwrap().is_some());
    let err = reader.record(&k, &t, &[]).unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
    assert!(matches!(reader.gc(0), Err(Error::ReadOnly { .. })));
}

#[test]
fn a_second_writer_is_told_the_store_is_locked() {
    let (_dir, store) = open();
    let err = Store::open(store.path()).unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
}

#[test]
fn gc_drops_unused_thunks_with_their_rows_and_vanished_file_states() {
    let (dir, store) = open();
    let (old, new) = (key("old"), key("new"));
    let (old_id, new_id) = (thunk_id(&old), thunk_id(&new));
    store
        .record(
            &old,
            &trace(&["shared", "old-only"], &["old-out", "both-out"], 1),
            &[],
        )
        .unwrap();
    store
        .record(&old, &trace(&["shared"], &[], 2), &[])
        .unwrap();
    store
        .record(&new, &trace(&["shared"], &["new-out"], 3), &[])
        .unwrap();
    store
        .record(&new, &trace(&["shared"], &["both-out"], 4), &[])
        .unwrap();
    store
        .touch(
            &new_id,
            &store.thunk(&new_id).unwrap().unwrap().traces[0],
            10_000,
        )
        .unwrap();

    let existing = dir.path().join("exists");
    std::fs::write(&existing, "x").unwrap();
    let existing = existing.as_os_str().as_encoded_bytes().to_vec();
    let missing = dir
        .path()
        .join("missing/file")
        .as_os_str()
        .as_encoded_bytes()
        .to_vec();
    let state = FileState {
        stat: stat(1),
        digest: [1; 32],
    };
    store
        .put_file_states(&[(existing.clone(), state.clone()), (missing.clone(), state)])
        .unwrap();

    let report = store.gc(5_000).unwrap();
    assert_eq!(
        report,
        GcReport {
            thunks: 1,
            traces: 2,
            file_states: 1
        }
    );
    assert_eq!(store.thunk(&old_id).unwrap(), None);
    assert!(store.thunk(&new_id).unwrap().is_some());
    assert_eq!(store.readers(&project("shared")).unwrap(), vec![new_id]);
    assert!(store.readers(&project("old-only")).unwrap().is_empty());
    assert_eq!(store.writer(&project("old-out")).unwrap(), None);
    assert_eq!(store.writer(&project("both-out")).unwrap(), Some(new_id));
    assert!(store.file_state(&existing).unwrap().is_some());
    assert!(store.file_state(&missing).unwrap().is_none());
    check_invariants(&store);

    assert_eq!(store.gc(5_000).unwrap(), GcReport::default());
}

#[test]
fn referenced_digests_are_those_of_kept_traces() {
    let (_dir, store) = open();
    let k = key("gen");
    let mut first = trace(&["a"], &["x", "y"], 1);
    first.outputs[1].state = OutputState::Symlink {
        target: b"x".to_vec(),
    };
    first.stdout = [50; 32];
    store.record(&k, &first, &[]).unwrap();
    for seed in 2..=9 {
        store.record(&k, &trace(&["a"], &["x"], seed), &[]).unwrap();
    }
    let digests = store.referenced_digests().unwrap();
    // The first trace was dropped: neither its stdout nor its output is referenced.
    let mut expected: std::collections::HashSet<_> = (2..=9u8).map(|s| [s + 100; 32]).collect();
    expected.insert([1; 32]);
    expected.insert([2; 32]);
    assert_eq!(digests, expected);
}

#[test]
fn find_thunk_by_hex_prefix() {
    let (_dir, store) = open();
    let keys: Vec<ThunkKey> = (0..40).map(|i| key(&format!("cmd {i}"))).collect();
    for k in &keys {
        store.record(k, &trace(&["a"], &[], 1), &[]).unwrap();
    }
    let id = thunk_id(&keys[0]);
    let full = hex(&id);
    assert_eq!(store.find_thunk(&full).unwrap(), id);
    assert_eq!(store.find_thunk(&full[..12].to_uppercase()).unwrap(), id);
    // 40 ids over 16 first digits: some digit is shared; an odd-length prefix works too.
    let mut by_digit: BTreeMap<char, Vec<ThunkId>> = BTreeMap::new();
    for k in &keys {
        let id = thunk_id(k);
        by_digit
            .entry(hex(&id).chars().next().unwrap())
            .or_default()
            .push(id);
    }
    let (digit, shared) = by_digit.iter().find(|(_, ids)| ids.len() > 1).unwrap();
    match store.find_thunk(&digit.to_string()).unwrap_err() {
        Error::AmbiguousThunk { candidates, .. } => {
            let mut expected: Vec<String> = shared.iter().map(|id| hex(id)).collect();
            expected.sort();
            assert_eq!(candidates, expected);
        }
        err => panic!("{err}"),
    }
    let absent = ('0'..='9')
        .chain('a'..='f')
        .find(|d| !by_digit.contains_key(d));
    if let Some(d) = absent {
        assert!(matches!(
            store.find_thunk(&d.to_string()),
            Err(Error::NoSuchThunk { .. })
        ));
    }
    for bad in ["", "xyz", "12 3", &"0".repeat(65)] {
        assert!(
            matches!(store.find_thunk(bad), Err(Error::BadPrefix { .. })),
            "{bad:?}"
        );
    }
}

/// One step of a random history.
#[derive(Clone, Debug)]
enum Op {
    /// Records, for thunk `thunk`, a trace reading and writing the paths whose bits are set.
    Record {
        thunk: u8,
        inputs: u8,
        outputs: u8,
        content: u8,
    },
    /// Touches the `index`-th trace (modulo the count) of thunk `thunk`.
    Touch { thunk: u8, index: usize },
}

const INPUT_PATHS: [&str; 6] = ["in/a", "in/b", "in/c", "shared", "in/d", "in"];
const OUTPUT_PATHS: [&str; 4] = ["out/x", "out/y", "shared", "out"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u8, 0..64u8, 0..16u8, 0..2u8)
            .prop_map(|(thunk, inputs, outputs, content)| {
                Op::Record { thunk, inputs, outputs, content }
            }),
        1 => (0..3u8, 0..8usize).prop_map(|(thunk, index)| Op::Touch { thunk, index }),
    ]
}

fn chosen<'a>(paths: &[&'a str], bits: u8) -> Vec<&'a str> {
    paths
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, p)| *p)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The store against a model: per thunk an MRU list, and the writer of each path being
    /// the thunk that last recorded it while it keeps a trace that writes it.
    #[test]
    fn random_records_keep_the_indexes_equal_to_the_kept_traces(
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        // Creating a store and recording cost fsyncs; in memory, when there is a /dev/shm, the
        // cases take a fifth of the time.
        let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
        let (_dir, store) = open_in(dir);
        let mut mru: BTreeMap<ThunkId, Vec<TraceId>> = BTreeMap::new();
        let mut writers: BTreeMap<Vec<u8>, ThunkId> = BTreeMap::new();
        let mut outputs_of: BTreeMap<TraceId, Vec<Vec<u8>>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Record { thunk, inputs, outputs, content } => {
                    let k = key(&format!("thunk {thunk}"));
                    let inputs = chosen(&INPUT_PATHS, inputs);
                    let t = trace(&inputs, &chosen(&OUTPUT_PATHS, outputs), content);
                    let id = store.record(&k, &t, &[]).unwrap();
                    let list = mru.entry(thunk_id(&k)).or_default();
                    list.retain(|x| *x != id);
                    list.insert(0, id);
                    list.truncate(MAX_TRACES_PER_THUNK);
                    let outs: Vec<Vec<u8>> =
                        t.outputs.iter().map(|o| schema::path_key(&o.path)).collect();
                    for path in &outs {
                        writers.insert(path.clone(), thunk_id(&k));
                    }
                    outputs_of.insert(id, outs);
                    writers.retain(|path, thunk| {
                        mru[thunk].iter().any(|t| outputs_of[t].contains(path))
                    });
                }
                Op::Touch { thunk, index } => {
                    let id = thunk_id(&key(&format!("thunk {thunk}")));
                    let Some(list) = mru.get_mut(&id) else { continue };
                    let trace = list[index % list.len()];
                    store.touch(&id, &trace, 0).unwrap();
                    list.retain(|x| *x != trace);
                    list.insert(0, trace);
                    // A reused trace makes its thunk the last writer of its outputs.
                    for path in &outputs_of[&trace] {
                        writers.insert(path.clone(), id);
                    }
                }
            }
        }
        check_invariants(&store);
        for (thunk, list) in &mru {
            prop_assert_eq!(&store.thunk(thunk).unwrap().unwrap().traces, list);
        }
        let stored: BTreeMap<Vec<u8>, ThunkId> = rows(&store, WRITERS)
            .into_iter()
            .map(|(k, v)| (k, v.try_into().unwrap()))
            .collect();
        prop_assert_eq!(stored, writers);
    }
}

/// Times the reads that decide a cache hit for a thunk with 200 inputs per trace. Run with
/// `cargo test --release -p cot --lib store::tests::lookup_times -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a test"]
fn lookup_times() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open(&path).unwrap();
    let k = key("cc -O2 -c src/module.c -o build/module.o");
    let id = thunk_id(&k);
    let names: Vec<String> = (0..200)
        .map(|i| format!("/usr/include/x86_64-linux-gnu/sys/header{i}.h"))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let files: Vec<(Vec<u8>, FileState)> = names
        .iter()
        .map(|n| {
            (
                format!("/home/user/project{n}").into_bytes(),
                FileState {
                    stat: stat(1),
                    digest: [3; 32],
                },
            )
        })
        .collect();
    // Filler thunks, so that lookups search a database of realistic size.
    for i in 0..300 {
        store
            .record(
                &key(&format!("filler {i}")),
                &trace(&names[..50], &["o"], 1),
                &[],
            )
            .unwrap();
    }
    for traces in [1u8, MAX_TRACES_PER_THUNK as u8] {
        for seed in 0..traces {
            store
                .record(&k, &trace(&names, &["build/module.o"], seed), &files)
                .unwrap();
        }
        let measure = |store: &Store, label: &str| {
            let rounds = 2_000u32;
            let start = Instant::now();
            for _ in 0..rounds {
                let info = store.thunk(&id).unwrap().unwrap();
                let traces = store.traces(&id).unwrap();
                assert_eq!(info.traces.len(), traces.len());
            }
            let lookup = start.elapsed() / rounds;
            let start = Instant::now();
            for _ in 0..rounds / 10 {
                for (file, _) in &files {
                    assert!(store.file_state(file).unwrap().is_some());
                }
            }
            let file_state = start.elapsed() / (rounds / 10 * files.len() as u32);
            println!(
                "{label}, {traces} trace(s) of 200 inputs: thunk()+traces() {lookup:?}, \
                 file_state() {file_state:?}"
            );
        };
        measure(&store, "memtable");
        store.db.flush_cf(store.cf(THUNKS).unwrap()).unwrap();
        store.db.flush_cf(store.cf(TRACES).unwrap()).unwrap();
        store.db.flush_cf(store.cf(FILES).unwrap()).unwrap();
        measure(&store, "sst files");
    }
    drop(store);
    let start = Instant::now();
    let store = Store::open(&path).unwrap();
    let opened = start.elapsed();
    let start = Instant::now();
    store.traces(&id).unwrap();
    println!(
        "open {opened:?}, first traces() after open {:?}",
        start.elapsed()
    );
}
