//! The store server: one process per trace store that keeps the RocksDB database open, so that
//! every `cot` of a project (e.g. each recipe of a `make -j8` calling `cot run`) can use the
//! store at once while RocksDB allows one writing process.
//!
//! The server is a thin remote interface to [`Store`]: all decisions are made by the client
//! (the `cot` that runs a thunk), which asks for the thunk's traces and a batch of file states,
//! checks the file system itself, runs the command itself, and sends back a trace to record.
//! So commands are never serialised; only store reads and writes pass through the server.
//!
//! - Socket: `<store>/server.sock` (a Unix stream socket, reached through
//!   `/proc/self/fd/N/server.sock` so that deep project paths do not hit the 108-byte limit of
//!   socket addresses; its permissions are the store directory's).
//! - Framing: each message is a little-endian `u32` length and a postcard-encoded
//!   [`Request`] or [`Response`].
//! - Life: the first client that cannot connect starts `cot-store-server <store>` (the
//!   binary beside `cot`'s own executable; a separate one so that `cot` does not load RocksDB)
//!   detached (its own process group, output to `<store>/server.log`). The server holds an exclusive
//!   lock on `<store>/server.lock` for its whole life (a second one exits at once), and exits
//!   after [`IDLE_EXIT`] without connections. A client whose connection fails retries, starting
//!   a server again if needed.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::store::model::{
    BuildRecord, Digest, FileState, StorePath, ThunkId, ThunkInfo, ThunkKey, Trace, TraceId,
};
use crate::store::Store;

pub use crate::store::KnownThunk;

/// A server with no connection for this long exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(60);

/// Overrides [`IDLE_EXIT`], in milliseconds (for tests that watch a server's life).
pub const IDLE_EXIT_ENV: &str = "COT_STORE_IDLE_EXIT_MS";

/// How long a client waits for a server it started to listen. A server that fails is seen at
/// once (it exits); this bounds only one that is alive but slow (a loaded or emulated machine
/// opening a large store), so it is generous.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest message accepted (a trace of a few hundred thousand accesses fits).
const MAX_MESSAGE: u32 = 256 << 20;

/// One request to the store; each maps to one [`Store`] method.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Thunk(ThunkId),
    Traces(ThunkId),
    Record {
        key: Box<ThunkKey>,
        trace: Box<Trace>,
        files: Vec<(Vec<u8>, FileState)>,
    },
    Touch {
        thunk: ThunkId,
        trace: TraceId,
        now_ns: i64,
    },
    FileStates(Vec<Vec<u8>>),
    PutFileStates(Vec<(Vec<u8>, FileState)>),
    Thunks,
    Readers(StorePath),
    Writer(StorePath),
    Gc {
        before_ns: i64,
    },
    ReferencedDigests,
    FindThunk(String),
    BuildRecord(ThunkId),
    Known(ThunkId),
    PutBuildRecord {
        root: ThunkId,
        record: Box<BuildRecord>,
    },
}

/// The answer to a [`Request`]: its value, or the store's error message.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Thunk(Option<ThunkInfo>),
    Traces(Vec<(TraceId, Trace)>),
    Recorded(TraceId),
    Done,
    FileStates(Vec<Option<FileState>>),
    Thunks(Vec<(ThunkId, ThunkInfo)>),
    Readers(Vec<ThunkId>),
    Writer(Option<ThunkId>),
    Gc {
        thunks: usize,
        traces: usize,
        file_states: usize,
    },
    Digests(HashSet<Digest>),
    Found(ThunkId),
    BuildRecord(Option<Box<BuildRecord>>),
    Known(Option<Box<KnownThunk>>),
    Error(String),
}

/// An error talking to the store server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the store server of {}: {source}", store.display())]
    Connect { store: PathBuf, source: io::Error },
    #[error("cannot start the store server of {}: {source}", store.display())]
    Start { store: PathBuf, source: io::Error },
    #[error("the store server of {} did not start within {:?}; see {}", store.display(), START_TIMEOUT, store.join("server.log").display())]
    StartTimeout { store: PathBuf },
    #[error("{message}")]
    ServerFailed { message: String },
    #[error("store {}: {message}", store.display())]
    Store { store: PathBuf, message: String },
    #[error("store server of {} answered {answer} to {request}", store.display())]
    Protocol {
        store: PathBuf,
        request: &'static str,
        answer: String,
    },
}

pub(crate) fn write_message(stream: &mut impl Write, message: &impl Serialize) -> io::Result<()> {
    let bytes = postcard::to_stdvec(message).map_err(io::Error::other)?;
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&n| n <= MAX_MESSAGE)
        .ok_or_else(|| io::Error::other("message too large"))?;
    stream.write_all(&len.to_le_bytes())?;
    stream.write_all(&bytes)?;
    stream.flush()
}

pub(crate) fn read_message<T: for<'de> Deserialize<'de>>(stream: &mut impl Read) -> io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(io::Error::other(format!(
            "message of {len} bytes is too large"
        )));
    }
    let mut bytes = vec![0; len as usize];
    stream.read_exact(&mut bytes)?;
    postcard::from_bytes(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The socket path of a store, short whatever the store's own path (see the module doc).
fn socket_path(dir: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/server.sock", dir.as_raw_fd()))
}

fn handle(store: &Store, request: Request) -> Response {
    let answer = match request {
        Request::Thunk(id) => store.thunk(&id).map(Response::Thunk),
        Request::Traces(id) => store.traces(&id).map(Response::Traces),
        Request::Record { key, trace, files } => {
            store.record(&key, &trace, &files).map(Response::Recorded)
        }
        Request::Touch {
            thunk,
            trace,
            now_ns,
        } => store.touch(&thunk, &trace, now_ns).map(|()| Response::Done),
        Request::FileStates(paths) => paths
            .iter()
            .map(|path| store.file_state(path))
            .collect::<Result<Vec<_>, _>>()
            .map(Response::FileStates),
        Request::PutFileStates(files) => store.put_file_states(&files).map(|()| Response::Done),
        Request::Thunks => store.thunks().map(Response::Thunks),
        Request::Readers(path) => store.readers(&path).map(Response::Readers),
        Request::Writer(path) => store.writer(&path).map(Response::Writer),
        Request::Gc { before_ns } => store.gc(before_ns).map(|r| Response::Gc {
            thunks: r.thunks,
            traces: r.traces,
            file_states: r.file_states,
        }),
        Request::ReferencedDigests => store.referenced_digests().map(Response::Digests),
        Request::FindThunk(prefix) => store.find_thunk(&prefix).map(Response::Found),
        Request::Known(id) => store.known(&id).map(|k| Response::Known(k.map(Box::new))),
        Request::BuildRecord(root) => store
            .build_record(&root)
            .map(|r| Response::BuildRecord(r.map(Box::new))),
        Request::PutBuildRecord { root, record } => store
            .put_build_record(&root, &record)
            .map(|()| Response::Done),
    };
    answer.unwrap_or_else(|e| Response::Error(e.to_string()))
}

/// Runs the server of the store in `dir` until it has been idle for [`IDLE_EXIT`]. Returns at
/// once (Ok) when another server of the store is running.
pub fn serve(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock_path = dir.join("server.lock");
    let lock_file = File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    let Ok(_lock) = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) else {
        return Ok(());
    };
    let store = Arc::new(Store::open(&dir.join("db"))?);
    let dir_file = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    let socket = socket_path(&dir_file);
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", dir.join("server.sock").display()))?;
    listener.set_nonblocking(true)?;
    let idle_exit = std::env::var(IDLE_EXIT_ENV)
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(IDLE_EXIT, Duration::from_millis);
    let active = Arc::new(AtomicUsize::new(0));
    let mut idle_since = Instant::now();
    loop {
        // Wait for a connection (no polling delay on the first request of a client), waking
        // now and then to see whether the server has been idle long enough to exit.
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&listener),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(500u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e).into()),
        }
        match listener.accept() {
            Ok((stream, _)) => {
                idle_since = Instant::now();
                spawn_connection(&store, &active, stream)?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if active.load(Ordering::SeqCst) > 0 {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= idle_exit {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    // No new client can reach us once the socket is gone; one that connected just before is
    // still queued on the listener and is served before the server exits.
    let _ = fs::remove_file(&socket);
    loop {
        match listener.accept() {
            Ok((stream, _)) => spawn_connection(&store, &active, stream)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    while active.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Serves one client on a thread of its own, counted in `active` while it lasts.
fn spawn_connection(
    store: &Arc<Store>,
    active: &Arc<AtomicUsize>,
    stream: UnixStream,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let store = Arc::clone(store);
    let active = Arc::clone(active);
    active.fetch_add(1, Ordering::SeqCst);
    std::thread::spawn(move || {
        let _ = serve_connection(&store, stream);
        active.fetch_sub(1, Ordering::SeqCst);
    });
    Ok(())
}

fn serve_connection(store: &Store, mut stream: UnixStream) -> io::Result<()> {
    loop {
        let request: Request = match read_message(&mut stream) {
            Ok(request) => request,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        write_message(&mut stream, &handle(store, request))?;
    }
}

/// A connection to the server of one store, started on demand.
pub struct Client {
    store: PathBuf,
    stream: UnixStream,
}

impl Client {
    /// Connects to the server of the store in `dir`, starting one if none runs.
    pub fn connect(dir: &Path) -> Result<Client, Error> {
        let connect_error = |source| Error::Connect {
            store: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(connect_error)?;
        let dir_file = File::open(dir).map_err(connect_error)?;
        let socket = socket_path(&dir_file);
        if let Ok(stream) = UnixStream::connect(&socket) {
            return Ok(Client {
                store: dir.to_path_buf(),
                stream,
            });
        }
        let mut server = start_server(dir)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => {
                    return Ok(Client {
                        store: dir.to_path_buf(),
                        stream,
                    })
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                    match server.try_wait() {
                        // It could not open the store: say why, now.
                        Ok(Some(status)) if !status.success() => {
                            return Err(Error::ServerFailed {
                                message: last_line(&dir.join("server.log")).unwrap_or_else(|| {
                                    format!(
                                        "the store server of {} failed ({status})",
                                        dir.display()
                                    )
                                }),
                            });
                        }
                        // Another server held the store (one that was just exiting, or one
                        // that is about to listen): start ours again until one listens.
                        Ok(Some(_)) => server = start_server(dir)?,
                        _ => {}
                    }
                }
                Err(_) => {
                    return Err(Error::StartTimeout {
                        store: dir.to_path_buf(),
                    })
                }
            }
        }
    }

    fn call(&mut self, request: &Request) -> Result<Response, Error> {
        let io_error = |source| Error::Connect {
            store: self.store.clone(),
            source,
        };
        write_message(&mut self.stream, request).map_err(io_error)?;
        let response: Response = read_message(&mut self.stream).map_err(io_error)?;
        match response {
            Response::Error(message) => Err(Error::Store {
                store: self.store.clone(),
                message,
            }),
            other => Ok(other),
        }
    }

    fn unexpected(&self, request: &'static str, answer: Response) -> Error {
        Error::Protocol {
            store: self.store.clone(),
            request,
            answer: format!("{answer:?}").chars().take(80).collect(),
        }
    }
}

/// Generates the typed client methods, each one request and one expected response.
macro_rules! client_methods {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $out:ty = $req:expr => $pat:pat => $val:expr;)*) => {
        impl Client {
            $(
                pub fn $name(&mut self, $($arg: $ty),*) -> Result<$out, Error> {
                    match self.call(&$req)? {
                        $pat => Ok($val),
                        other => Err(self.unexpected(stringify!($name), other)),
                    }
                }
            )*
        }
    };
}

client_methods! {
    thunk(id: ThunkId) -> Option<ThunkInfo> = Request::Thunk(id) => Response::Thunk(v) => v;
    traces(id: ThunkId) -> Vec<(TraceId, Trace)> = Request::Traces(id) => Response::Traces(v) => v;
    record(key: ThunkKey, trace: Trace, files: Vec<(Vec<u8>, FileState)>) -> TraceId
        = Request::Record { key: Box::new(key), trace: Box::new(trace), files }
        => Response::Recorded(v) => v;
    touch(thunk: ThunkId, trace: TraceId, now_ns: i64) -> ()
        = Request::Touch { thunk, trace, now_ns } => Response::Done => ();
    file_states(paths: Vec<Vec<u8>>) -> Vec<Option<FileState>>
        = Request::FileStates(paths) => Response::FileStates(v) => v;
    put_file_states(files: Vec<(Vec<u8>, FileState)>) -> ()
        = Request::PutFileStates(files) => Response::Done => ();
    thunks() -> Vec<(ThunkId, ThunkInfo)> = Request::Thunks => Response::Thunks(v) => v;
    readers(path: StorePath) -> Vec<ThunkId> = Request::Readers(path) => Response::Readers(v) => v;
    writer(path: StorePath) -> Option<ThunkId> = Request::Writer(path) => Response::Writer(v) => v;
    gc(before_ns: i64) -> (usize, usize, usize)
        = Request::Gc { before_ns } => Response::Gc { thunks, traces, file_states } => (thunks, traces, file_states);
    referenced_digests() -> HashSet<Digest>
        = Request::ReferencedDigests => Response::Digests(v) => v;
    find_thunk(prefix: String) -> ThunkId = Request::FindThunk(prefix) => Response::Found(v) => v;
    known(id: ThunkId) -> Option<Box<KnownThunk>> = Request::Known(id) => Response::Known(v) => v;
    build_record(root: ThunkId) -> Option<Box<BuildRecord>>
        = Request::BuildRecord(root) => Response::BuildRecord(v) => v;
    put_build_record(root: ThunkId, record: BuildRecord) -> ()
        = Request::PutBuildRecord { root, record: Box::new(record) } => Response::Done => ();
}

/// The server binary's name; it lives beside the `cot` executable.
pub const SERVER_BINARY: &str = "cot-store-server";

/// The last line of a log, without the server's name prefix.
fn last_line(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    Some(
        line.strip_prefix("cot-store-server: ")
            .unwrap_or(line)
            .to_string(),
    )
}

/// Starts `cot-store-server DIR` detached from this process's terminal and process group.
fn start_server(dir: &Path) -> Result<std::process::Child, Error> {
    let start_error = |source| Error::Start {
        store: dir.to_path_buf(),
        source,
    };
    let exe = std::env::current_exe()
        .map_err(start_error)?
        .with_file_name(SERVER_BINARY);
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .map_err(start_error)?;
    use std::os::unix::process::CommandExt;
    Command::new(&exe)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|source| Error::Start {
            store: dir.to_path_buf(),
            source: std::io::Error::new(source.kind(), format!("{}: {source}", exe.display())),
        })
}
