//! A remote cache over the Bazel Remote Execution API v2 (`--remote grpc://HOST:PORT`): the
//! ActionCache and ContentAddressableStorage services of a server a team already runs
//! (bazel-remote, Buildbarn, BuildGrid), reached with tonic.
//!
//! # The mapping
//!
//! - A thunk is an *Action*: its *Command*'s arguments are `cot thunk <thunk id>` (the id is
//!   the blake3 digest of the thunk's key, whose roots are named, so every checkout computes
//!   it), its input root the empty Directory, its salt [`SALT`] (the format below). The
//!   Action's SHA-256 digest is the ActionCache key. cot's inputs are discovered at run time,
//!   not declared, so the Action cannot name them: what decides is the trace.
//! - A trace is an *ActionResult*: its exit code, stdout and stderr digests, an output file
//!   for each file the thunk left in the project (path relative to the project root,
//!   executable bit) and an output symlink for each symlink, as any REAPI client would read
//!   them; and one more output file, [`TRACE_PATH`], holding cot's own record: the thunk's key
//!   and its trace in the shared form ([`crate::cache::portable::Entry`]: every input to
//!   check, deletions, directories, child requests). A trace that left anything outside the
//!   project is not uploaded (REAPI paths are relative).
//! - Contents are blobs named by SHA-256, as REAPI wants; cot's content store names them by
//!   blake3. The ActionResult maps one to the other (a trace's output path gives the blake3
//!   digest, the ActionResult's file at that path the SHA-256 one).
//!
//! The ActionCache holds one result per action: the remote keeps the last trace uploaded for
//! a thunk (a shared directory keeps eight).
//!
//! # Trust
//!
//! Nothing from the server is used unverified: the trace blob must have the SHA-256 digest the
//! ActionResult gives and hold the key of the thunk asked for; a content must have its SHA-256
//! digest and size on arrival and its blake3 digest (the trace's) when it lands in the
//! project's content store. The trace is then decided against this checkout's files like any
//! other, and used only once every content it refers to is in the project's store, and only
//! if it writes inside the project alone ([`crate::cache::portable::confined`]). Anything else
//! is a warning and the thunk runs. Uploading is off by default (`--remote-upload`): a client
//! that writes to the ActionCache can poison it for everyone (ARCHITECTURE.md, "What a writer
//! of a cache can do to its readers").
//!
//! # Failure
//!
//! Every call has a deadline (`--remote-timeout`). A server that cannot be reached, or does
//! not answer in time, is given up for the rest of the process after one warning: the build
//! goes on locally. There is no TLS (`grpc://` only).

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream::{
    byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest,
};
use parking_lot::Mutex;
use prost::Message;
use reapi::action_cache_client::ActionCacheClient;
use reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tonic::transport::{Channel, Endpoint};

use crate::cache::portable::Entry;
use crate::cas::Cas;
use crate::store::model::{Digest, OutputState, StorePath, ThunkId, ThunkKey, Trace};
use crate::store::{hex, thunk_id};

/// The output file of an ActionResult that holds cot's record of the trace. The project's
/// `.cot/` is never an output of a thunk, so no real output has this path.
pub const TRACE_PATH: &str = ".cot/trace";

/// The Action's salt: the format of what cot puts in the ActionCache. Another format is
/// another action, so versions never read each other's results.
pub const SALT: &[u8] = b"cot thunk, format 1";

/// The default deadline of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Blobs up to this size travel in batches, larger ones through ByteStream.
const BATCH_BLOB: u64 = 1 << 20;

/// The most bytes of blobs in one batch (servers accept at least 4 MiB per request).
const BATCH_BYTES: u64 = 2 << 20;

/// The size of the pieces of a ByteStream write.
const CHUNK: usize = 64 * 1024;

/// The slowest transfer a server that answers is expected to keep up (bytes per second): a
/// call moving a blob may take this much longer than `--remote-timeout`.
const MIN_RATE: u64 = 1 << 20;

/// What went wrong with the remote cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not `grpc://HOST:PORT[/INSTANCE]`.
    #[error("{0}")]
    Url(String),
    /// The server cannot be reached or does not answer in time: given up for the process.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The server answered a call with an error.
    #[error("{0}")]
    Failed(String),
    /// What the server sent is not what it should be (a digest or size mismatch, an
    /// undecodable record, the record of another thunk).
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Cas(#[from] crate::cas::Error),
}

/// A blob as REAPI names it: its SHA-256 digest (lowercase hex) and size.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Blob {
    pub hash: String,
    pub size: i64,
}

impl Blob {
    fn of(bytes: &[u8]) -> Blob {
        Blob {
            hash: sha256_hex(bytes),
            size: bytes.len() as i64,
        }
    }

    fn digest(&self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hash.clone(),
            size_bytes: self.size,
        }
    }

    fn from_digest(digest: &reapi::Digest) -> Blob {
        Blob {
            hash: digest.hash.clone(),
            size: digest.size_bytes,
        }
    }
}

/// cot's record in the ActionCache (the blob at [`TRACE_PATH`]).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    key: ThunkKey,
    entry: Entry,
}

/// What the remote cache holds for a thunk.
#[derive(Clone, Debug)]
pub struct Found {
    pub key: ThunkKey,
    /// The trace in its shared form.
    pub entry: Entry,
    /// The REAPI blob of every content the trace refers to, by blake3 digest.
    pub blobs: HashMap<Digest, Blob>,
}

/// A remote cache; cheap to share between threads (calls from several threads take turns on
/// one connection).
pub struct Remote {
    url: String,
    address: SocketAddr,
    instance: String,
    timeout: Duration,
    runtime: tokio::runtime::Runtime,
    channel: Mutex<Option<Channel>>,
    /// Why the server was given up, once it was.
    down: Mutex<Option<String>>,
    given_up: AtomicBool,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// The remote cache at `url` (`grpc://HOST:PORT[/INSTANCE]`); nothing is sent yet. The
    /// host is resolved here, so no call needs a thread of its own.
    pub fn new(url: &str, timeout: Duration) -> Result<Remote, Error> {
        let (authority, instance) = parse_url(url)?;
        let address = authority
            .to_socket_addrs()
            .map_err(|e| Error::Unreachable(format!("{authority}: {e}")))?
            .next()
            .ok_or_else(|| Error::Unreachable(format!("{authority}: no address")))?;
        // A runtime on the calling thread: no thread is started (a sandbox is launched only
        // by a single-threaded process).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Url(format!("cannot start the gRPC runtime: {e}")))?;
        Ok(Remote {
            url: url.to_string(),
            address,
            instance: instance.trim_end_matches('/').to_string(),
            timeout,
            runtime,
            channel: Mutex::new(None),
            down: Mutex::new(None),
            given_up: AtomicBool::new(false),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Why the server was given up, if it was.
    pub fn down(&self) -> Option<String> {
        if !self.given_up.load(Ordering::Relaxed) {
            return None;
        }
        self.down.lock().clone()
    }

    /// The ActionCache key of thunk `id`.
    pub fn action_digest(&self, id: &ThunkId) -> reapi::Digest {
        action(id).0.digest()
    }

    /// What the server holds for thunk `id`: `None` when it holds nothing.
    pub fn lookup(&self, id: &ThunkId) -> Result<Option<Found>, Error> {
        let request = reapi::GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(self.action_digest(id)),
            inline_output_files: vec![TRACE_PATH.to_string()],
            ..Default::default()
        };
        let result = self.call("GetActionResult", async |channel| {
            let mut client = ActionCacheClient::new(channel);
            match client.get_action_result(request).await {
                Ok(response) => Ok(Some(response.into_inner())),
                Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
                Err(status) => Err(status.into()),
            }
        })?;
        let Some(result) = result else {
            return Ok(None);
        };
        let file = result
            .output_files
            .iter()
            .find(|f| f.path == TRACE_PATH)
            .ok_or_else(|| {
                Error::Corrupt(format!(
                    "the result of thunk {} has no {TRACE_PATH}",
                    &hex(id)[..12]
                ))
            })?;
        let blob = Blob::from_digest(file.digest.as_ref().ok_or_else(|| {
            Error::Corrupt(format!(
                "{TRACE_PATH} of thunk {} has no digest",
                &hex(id)[..12]
            ))
        })?);
        let bytes = if file.contents.is_empty() {
            self.read_blob(&blob)?
        } else {
            file.contents.clone()
        };
        check_blob(&blob, &bytes)?;
        let record: Record = postcard::from_bytes(&bytes).map_err(|e| {
            Error::Corrupt(format!("{TRACE_PATH} of thunk {}: {e}", &hex(id)[..12]))
        })?;
        if thunk_id(&record.key) != *id {
            return Err(Error::Corrupt(format!(
                "the result filed under thunk {} is another thunk's",
                &hex(id)[..12]
            )));
        }
        let blobs = blob_map(&record.entry.trace, &result)?;
        Ok(Some(Found {
            key: record.key,
            entry: record.entry,
            blobs,
        }))
    }

    /// Downloads the blobs the project's content store lacks into it, each checked on arrival
    /// (SHA-256 and size) and when stored (its blake3 digest).
    pub fn fetch(&self, blobs: &[(Digest, Blob)], cas: &Cas) -> Result<(), Error> {
        let missing: Vec<&(Digest, Blob)> =
            blobs.iter().filter(|(d, _)| !cas.contains(d)).collect();
        let (small, large): (Vec<_>, Vec<_>) = missing
            .into_iter()
            .partition(|(_, blob)| (blob.size as u64) <= BATCH_BLOB);
        for batch in batches(&small) {
            let by_hash: HashMap<&str, &Digest> =
                batch.iter().map(|(d, b)| (b.hash.as_str(), d)).collect();
            let mut received = 0;
            for (blob, data) in self.batch_read(batch.iter().map(|(_, b)| b))? {
                let Some(blake3) = by_hash.get(blob.hash.as_str()) else {
                    continue;
                };
                check_blob(&blob, &data)?;
                let mut writer = cas.writer()?;
                writer.write(&data)?;
                writer.finish(blake3, &format!("{}: blob {}", self.url, blob.hash))?;
                received += 1;
            }
            if received < batch.len() {
                return Err(Error::Failed(format!(
                    "{} of {} blobs were not sent",
                    batch.len() - received,
                    batch.len()
                )));
            }
        }
        for (blake3, blob) in large {
            self.download(blob, blake3, cas)?;
        }
        Ok(())
    }

    /// Uploads a trace the project just recorded: its contents (those the server lacks),
    /// its record and its ActionResult. `false` when the trace cannot be an ActionResult (it
    /// left something outside the project).
    pub fn upload(
        &self,
        key: &ThunkKey,
        entry: &Entry,
        trace: &Trace,
        cas: &Cas,
    ) -> Result<bool, Error> {
        let Some(mut result) = action_result(trace, cas)? else {
            return Ok(false);
        };
        let id = thunk_id(key);
        let record = postcard::to_allocvec(&Record {
            key: key.clone(),
            entry: entry.clone(),
        })
        .map_err(|e| Error::Corrupt(e.to_string()))?;
        let record_blob = Blob::of(&record);
        result.output_files.push(reapi::OutputFile {
            path: TRACE_PATH.to_string(),
            digest: Some(record_blob.digest()),
            ..Default::default()
        });
        let (action_blob, action_bytes, command_bytes) = action(&id);
        // Every blob the result refers to: from memory, or from the content store.
        let mut in_memory: HashMap<Blob, Vec<u8>> = HashMap::new();
        in_memory.insert(record_blob.clone(), record);
        in_memory.insert(Blob::of(&command_bytes), command_bytes);
        in_memory.insert(Blob::of(&EMPTY_DIRECTORY), EMPTY_DIRECTORY.to_vec());
        in_memory.insert(action_blob.clone(), action_bytes);
        let mut stored: HashMap<Blob, Digest> = HashMap::new();
        for (blake3, blob) in content_blobs(trace, &result) {
            stored.insert(blob, blake3);
        }
        let all: Vec<Blob> = in_memory.keys().chain(stored.keys()).cloned().collect();
        let request = reapi::FindMissingBlobsRequest {
            instance_name: self.instance.clone(),
            blob_digests: all.iter().map(Blob::digest).collect(),
            ..Default::default()
        };
        let missing = self.call("FindMissingBlobs", async |channel| {
            let mut client = ContentAddressableStorageClient::new(channel);
            Ok(client
                .find_missing_blobs(request)
                .await?
                .into_inner()
                .missing_blob_digests)
        })?;
        let mut batch: Vec<(Blob, Vec<u8>)> = Vec::new();
        let mut batch_bytes = 0;
        for digest in missing {
            let blob = Blob::from_digest(&digest);
            if (blob.size as u64) > BATCH_BLOB {
                match (stored.get(&blob), in_memory.get(&blob)) {
                    (Some(blake3), _) => self.upload_stored(&blob, blake3, cas)?,
                    (None, Some(bytes)) => {
                        let chunks: Vec<Vec<u8>> =
                            bytes.chunks(CHUNK).map(<[u8]>::to_vec).collect();
                        self.write_stream(&blob, chunks.into_iter())?
                    }
                    (None, None) => continue,
                }
                continue;
            }
            let bytes = match (stored.get(&blob), in_memory.get(&blob)) {
                (Some(blake3), _) => cas.read(blake3)?,
                (None, Some(bytes)) => bytes.clone(),
                (None, None) => continue,
            };
            batch_bytes += bytes.len() as u64;
            batch.push((blob, bytes));
            if batch_bytes >= BATCH_BYTES {
                self.update_blobs(std::mem::take(&mut batch))?;
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.update_blobs(batch)?;
        }
        let request = reapi::UpdateActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action_blob.digest()),
            action_result: Some(result),
            ..Default::default()
        };
        self.call("UpdateActionResult", async |channel| {
            let mut client = ActionCacheClient::new(channel);
            client.update_action_result(request).await?;
            Ok(())
        })?;
        Ok(true)
    }

    fn update_blobs(&self, blobs: Vec<(Blob, Vec<u8>)>) -> Result<(), Error> {
        let request = reapi::BatchUpdateBlobsRequest {
            instance_name: self.instance.clone(),
            requests: blobs
                .into_iter()
                .map(|(blob, data)| reapi::batch_update_blobs_request::Request {
                    digest: Some(blob.digest()),
                    data,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let responses = self.call("BatchUpdateBlobs", async |channel| {
            let mut client = ContentAddressableStorageClient::new(channel);
            Ok(client
                .batch_update_blobs(request)
                .await?
                .into_inner()
                .responses)
        })?;
        for response in responses {
            let code = response.status.map_or(0, |s| s.code);
            if code != 0 {
                return Err(Error::Failed(format!(
                    "blob {} was refused (status {code})",
                    response.digest.unwrap_or_default().hash
                )));
            }
        }
        Ok(())
    }

    /// Uploads a large object of the content store through ByteStream.
    fn upload_stored(&self, blob: &Blob, blake3: &Digest, cas: &Cas) -> Result<(), Error> {
        let mut file = cas.open_object(blake3)?;
        let failed = std::sync::Arc::new(Mutex::new(None));
        let failure = failed.clone();
        // Read as the stream is sent, a chunk at a time: never the whole file in memory.
        let chunks = std::iter::from_fn(move || {
            let mut chunk = vec![0; CHUNK];
            match file.read(&mut chunk) {
                Ok(0) => None,
                Ok(n) => {
                    chunk.truncate(n);
                    Some(chunk)
                }
                Err(e) => {
                    *failure.lock() = Some(e);
                    None
                }
            }
        });
        let sent = self.write_stream(blob, chunks);
        let failure = failed.lock().take();
        match failure {
            Some(e) => Err(Error::Failed(format!(
                "cannot read blob {}: {e}",
                blob.hash
            ))),
            None => sent,
        }
    }

    /// Uploads a blob through ByteStream.Write, its `chunks` taken as they are sent.
    fn write_stream(
        &self,
        blob: &Blob,
        chunks: impl Iterator<Item = Vec<u8>> + Send + 'static,
    ) -> Result<(), Error> {
        let mut resource = Some(format!(
            "{}uploads/{}/blobs/{}/{}",
            self.prefix(),
            upload_id(blob),
            blob.hash,
            blob.size
        ));
        let size = blob.size;
        let mut offset = 0i64;
        let requests = chunks
            .map(move |data| {
                let request = WriteRequest {
                    resource_name: resource.take().unwrap_or_default(),
                    write_offset: offset,
                    finish_write: offset + data.len() as i64 >= size,
                    data,
                };
                offset += request.data.len() as i64;
                request
            })
            // The empty blob is one empty, finishing request.
            .chain((size == 0).then(|| WriteRequest {
                resource_name: String::new(),
                write_offset: 0,
                finish_write: true,
                data: Vec::new(),
            }));
        self.call_sized("ByteStream.Write", blob.size, async |channel| {
            let mut client = ByteStreamClient::new(channel);
            client.write(tokio_stream(requests)).await?;
            Ok(())
        })
    }

    /// Reads a blob whole (a small one, e.g. cot's record), through a batch.
    fn read_blob(&self, blob: &Blob) -> Result<Vec<u8>, Error> {
        if blob.size as u64 > BATCH_BLOB {
            let mut data = Vec::new();
            self.read_stream(blob, |piece| {
                data.extend_from_slice(piece);
                Ok(())
            })?;
            return Ok(data);
        }
        let (_, data) = self
            .batch_read(std::iter::once(blob))?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Failed(format!("blob {} was not sent", blob.hash)))?;
        Ok(data)
    }

    /// Reads small blobs in one BatchReadBlobs call: each blob the server sent, as it names
    /// it, with its data (unchecked). A blob the server says it could not read fails the call.
    fn batch_read<'b>(
        &self,
        blobs: impl Iterator<Item = &'b Blob>,
    ) -> Result<Vec<(Blob, Vec<u8>)>, Error> {
        let request = reapi::BatchReadBlobsRequest {
            instance_name: self.instance.clone(),
            digests: blobs.map(Blob::digest).collect(),
            ..Default::default()
        };
        let responses = self.call("BatchReadBlobs", async |channel| {
            let mut client = ContentAddressableStorageClient::new(channel);
            Ok(client
                .batch_read_blobs(request)
                .await?
                .into_inner()
                .responses)
        })?;
        responses
            .into_iter()
            .map(|response| {
                let blob = Blob::from_digest(&response.digest.unwrap_or_default());
                match response.status.map_or(0, |s| s.code) {
                    0 => Ok((blob, response.data)),
                    code => Err(Error::Failed(format!(
                        "blob {} could not be read (status {code})",
                        blob.hash
                    ))),
                }
            })
            .collect()
    }

    /// Downloads a large blob through ByteStream into the content store.
    fn download(&self, blob: &Blob, blake3: &Digest, cas: &Cas) -> Result<(), Error> {
        let mut writer = cas.writer()?;
        self.read_stream(blob, |piece| Ok(writer.write(piece)?))?;
        writer.finish(blake3, &format!("{}: blob {}", self.url, blob.hash))?;
        Ok(())
    }

    /// Reads a blob through ByteStream.Read, giving each piece to `sink` as it arrives; fails
    /// as soon as the server sends more than the blob's size, and when what it sent is not
    /// the blob (SHA-256 and size).
    fn read_stream(
        &self,
        blob: &Blob,
        mut sink: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let request = ReadRequest {
            resource_name: format!("{}blobs/{}/{}", self.prefix(), blob.hash, blob.size),
            read_offset: 0,
            read_limit: 0,
        };
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        self.call_sized("ByteStream.Read", blob.size, async |channel| {
            let mut client = ByteStreamClient::new(channel);
            let mut stream = client.read(request).await?.into_inner();
            while let Some(piece) = stream.message().await? {
                hasher.update(&piece.data);
                size += piece.data.len() as u64;
                if size > blob.size.max(0) as u64 {
                    return Err(Failure::Cot(mismatch(blob, "(more than its size)", size)));
                }
                sink(&piece.data)?;
            }
            Ok(())
        })?;
        let hash = hex(&hasher.finalize());
        if hash != blob.hash || size as i64 != blob.size {
            return Err(mismatch(blob, &hash, size));
        }
        Ok(())
    }

    /// The instance name as a resource name prefix (`NAME/`, or nothing).
    fn prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }

    /// Runs one call on the connection, within the deadline. A server that cannot be
    /// reached or does not answer in time is given up.
    fn call<T>(
        &self,
        what: &str,
        call: impl AsyncFnOnce(Channel) -> Result<T, Failure>,
    ) -> Result<T, Error> {
        self.call_sized(what, 0, call)
    }

    /// [`Remote::call`] for a call moving `bytes` of a blob: its deadline is longer by the
    /// time that takes at [`MIN_RATE`], so a large blob is not taken for a dead server.
    fn call_sized<T>(
        &self,
        what: &str,
        bytes: i64,
        call: impl AsyncFnOnce(Channel) -> Result<T, Failure>,
    ) -> Result<T, Error> {
        let deadline = self.timeout + Duration::from_secs(bytes.max(0) as u64 / MIN_RATE);
        if let Some(why) = self.down() {
            return Err(Error::Unreachable(why));
        }
        let result = self.runtime.block_on(async {
            let attempt = async {
                let channel = self.channel().await?;
                call(channel).await.map_err(|failure| match failure {
                    Failure::Status(status) => status_error(what, &status),
                    Failure::Cot(error) => error,
                })
            };
            match tokio::time::timeout(deadline, attempt).await {
                Ok(result) => result,
                Err(_) => Err(Error::Unreachable(format!(
                    "{what} got no answer within {deadline:?}"
                ))),
            }
        });
        if let Err(Error::Unreachable(why)) = &result {
            self.down.lock().get_or_insert_with(|| why.clone());
            self.given_up.store(true, Ordering::Relaxed);
        }
        result
    }

    /// The connection, made on first use.
    async fn channel(&self) -> Result<Channel, Error> {
        if let Some(channel) = self.channel.lock().clone() {
            return Ok(channel);
        }
        let endpoint = Endpoint::from_shared(format!("http://{}", self.address))
            .map_err(|e| Error::Url(e.to_string()))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Error::Unreachable(format!("cannot connect to {}: {e}", self.address)))?;
        *self.channel.lock() = Some(channel.clone());
        Ok(channel)
    }
}

/// The serialized empty Directory: every action's input root.
const EMPTY_DIRECTORY: [u8; 0] = [];

/// The Action of thunk `id`: its blob, and the encodings of the Action and its Command.
fn action(id: &ThunkId) -> (Blob, Vec<u8>, Vec<u8>) {
    let command = reapi::Command {
        arguments: vec!["cot".into(), "thunk".into(), hex(id)],
        ..Default::default()
    }
    .encode_to_vec();
    let action = reapi::Action {
        command_digest: Some(Blob::of(&command).digest()),
        input_root_digest: Some(Blob::of(&EMPTY_DIRECTORY).digest()),
        salt: SALT.to_vec(),
        ..Default::default()
    }
    .encode_to_vec();
    (Blob::of(&action), action, command)
}

/// The ActionResult of a trace (without cot's record), or `None` when the trace left
/// something REAPI cannot say: a path outside the project, or one that is not UTF-8.
fn action_result(trace: &Trace, cas: &Cas) -> Result<Option<reapi::ActionResult>, Error> {
    let mut result = reapi::ActionResult {
        exit_code: trace.exit_code,
        stdout_digest: Some(stored_blob(cas, &trace.stdout)?.digest()),
        stderr_digest: Some(stored_blob(cas, &trace.stderr)?.digest()),
        ..Default::default()
    };
    for output in &trace.outputs {
        let path = match &output.path {
            StorePath::Project(rel) if !rel.is_empty() => match std::str::from_utf8(rel) {
                Ok(path) => path.to_string(),
                Err(_) => return Ok(None),
            },
            StorePath::Project(_) => continue,
            StorePath::Absolute(_) => return Ok(None),
        };
        match &output.state {
            OutputState::File { digest, mode, .. } => {
                result.output_files.push(reapi::OutputFile {
                    path,
                    digest: Some(stored_blob(cas, digest)?.digest()),
                    is_executable: mode & 0o111 != 0,
                    ..Default::default()
                });
            }
            OutputState::Symlink { target } => {
                let Ok(target) = String::from_utf8(target.clone()) else {
                    return Ok(None);
                };
                result.output_symlinks.push(reapi::OutputSymlink {
                    path,
                    target,
                    ..Default::default()
                });
            }
            OutputState::Dir { .. } | OutputState::Deleted => {}
        }
    }
    Ok(Some(result))
}

/// The REAPI blob of an object of the content store, hashed from the object (which must
/// have its blake3 digest too: a damaged object is never uploaded).
fn stored_blob(cas: &Cas, digest: &Digest) -> Result<Blob, Error> {
    let mut file = cas.open_object(digest)?;
    let mut sha = Sha256::new();
    let mut blake = blake3::Hasher::new();
    let mut size = 0u64;
    let mut buffer = vec![0; 256 * 1024];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| Error::Failed(format!("content {}: {e}", hex(digest))))?;
        if n == 0 {
            break;
        }
        sha.update(&buffer[..n]);
        blake.update(&buffer[..n]);
        size += n as u64;
    }
    if blake.finalize().as_bytes() != digest {
        return Err(Error::Corrupt(format!(
            "content {} of the project's store is damaged; not uploaded",
            hex(digest)
        )));
    }
    Ok(Blob {
        hash: hex(&sha.finalize()),
        size: size as i64,
    })
}

/// Each content a trace refers to, by blake3 digest, with its blob in `result`.
fn content_blobs(trace: &Trace, result: &reapi::ActionResult) -> Vec<(Digest, Blob)> {
    blob_map(trace, result)
        .map(|map| map.into_iter().collect())
        .unwrap_or_default()
}

/// The REAPI blob of every content a trace refers to, from its ActionResult.
fn blob_map(trace: &Trace, result: &reapi::ActionResult) -> Result<HashMap<Digest, Blob>, Error> {
    let files: HashMap<&str, &reapi::OutputFile> = result
        .output_files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    let mut map = HashMap::new();
    let mut put = |blake3: Digest, digest: Option<&reapi::Digest>, what: &str| match digest {
        Some(digest) => {
            map.insert(blake3, Blob::from_digest(digest));
            Ok(())
        }
        None => Err(Error::Corrupt(format!("the action result has no {what}"))),
    };
    put(trace.stdout, result.stdout_digest.as_ref(), "stdout")?;
    put(trace.stderr, result.stderr_digest.as_ref(), "stderr")?;
    for output in &trace.outputs {
        if let (OutputState::File { digest, .. }, StorePath::Project(rel)) =
            (&output.state, &output.path)
        {
            let path = String::from_utf8_lossy(rel);
            let file = files.get(path.as_ref()).and_then(|f| f.digest.as_ref());
            put(*digest, file, &format!("output file {path}"))?;
        }
    }
    Ok(map)
}

/// Groups small blobs into batches of at most [`BATCH_BYTES`].
fn batches<'a>(blobs: &[&'a (Digest, Blob)]) -> Vec<Vec<&'a (Digest, Blob)>> {
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0u64;
    for blob in blobs {
        if !batch.is_empty() && bytes + blob.1.size as u64 > BATCH_BYTES {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += blob.1.size as u64;
        batch.push(*blob);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// Checks that `bytes` is the blob `blob` (SHA-256 and size).
fn check_blob(blob: &Blob, bytes: &[u8]) -> Result<(), Error> {
    let hash = sha256_hex(bytes);
    if hash != blob.hash || bytes.len() as i64 != blob.size {
        return Err(mismatch(blob, &hash, bytes.len() as u64));
    }
    Ok(())
}

fn mismatch(blob: &Blob, hash: &str, size: u64) -> Error {
    Error::Corrupt(format!(
        "blob {} ({} bytes) arrived as {hash} ({size} bytes)",
        blob.hash, blob.size
    ))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A version-4-shaped UUID for a ByteStream upload, unique to this process, blob and time.
fn upload_id(blob: &Blob) -> String {
    let seed = format!(
        "{}:{}:{:?}",
        std::process::id(),
        blob.hash,
        std::time::SystemTime::now()
    );
    let h = blake3::hash(seed.as_bytes()).to_hex().to_string();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// A stream of the requests of a ByteStream write.
fn tokio_stream(
    requests: impl Iterator<Item = WriteRequest> + Send + 'static,
) -> impl tonic::codegen::tokio_stream::Stream<Item = WriteRequest> + Send + 'static {
    tonic::codegen::tokio_stream::iter(requests)
}

/// How a call fails: the server's status (made an [`Error`] naming the call by
/// [`Remote::call`]), or cot's own error (e.g. storing what arrives).
enum Failure {
    Status(tonic::Status),
    Cot(Error),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        Failure::Status(status)
    }
}

impl<E: Into<Error>> From<E> for Failure {
    fn from(error: E) -> Failure {
        Failure::Cot(error.into())
    }
}

/// The server (`HOST:PORT`) and instance name of a `grpc://HOST:PORT[/INSTANCE]` URL; an
/// error saying what is wrong with any other.
pub fn parse_url(url: &str) -> Result<(&str, &str), Error> {
    let bad = |why: &str| Error::Url(format!("{url:?}: {why} (expected grpc://HOST:PORT)"));
    let rest = match url.split_once("://") {
        Some(("grpc", rest)) => rest,
        Some(("grpcs", _)) => return Err(bad("TLS is not supported")),
        _ => return Err(bad("not a grpc:// URL")),
    };
    let (authority, instance) = rest.split_once('/').unwrap_or((rest, ""));
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok((authority, instance))
        }
        _ => Err(bad("no port")),
    }
}

/// The error of a call the server answered with `status`: a server that is going away or
/// too slow is unreachable; anything else failed.
fn status_error(what: &str, status: &tonic::Status) -> Error {
    let message = format!("{what}: {} ({:?})", status.message(), status.code());
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            Error::Unreachable(message)
        }
        // A connection that broke shows as Unknown, with the transport's error.
        tonic::Code::Unknown if std::error::Error::source(status).is_some() => {
            Error::Unreachable(message)
        }
        _ => Error::Failed(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_grpc_with_an_optional_instance() {
        let remote = Remote::new("grpc://127.0.0.1:9092", DEFAULT_TIMEOUT).unwrap();
        assert_eq!(remote.instance, "");
        assert_eq!(remote.address, "127.0.0.1:9092".parse().unwrap());
        let remote = Remote::new("grpc://[::1]:9092/main/", DEFAULT_TIMEOUT).unwrap();
        assert_eq!(remote.instance, "main");
        for bad in [
            "http://h:1",
            "grpcs://h:1",
            "grpc://nohost",
            "grpc://:1",
            "grpc://h:99999",
            "grpc://h:x/i",
            "127.0.0.1:1",
        ] {
            assert!(matches!(parse_url(bad), Err(Error::Url(_))), "{bad}");
            assert!(Remote::new(bad, DEFAULT_TIMEOUT).is_err(), "{bad}");
        }
        assert_eq!(
            parse_url("grpc://cache.example:443/a").unwrap(),
            ("cache.example:443", "a")
        );
    }

    #[test]
    fn an_action_digest_depends_on_the_thunk_alone() {
        let a = action(&[1; 32]).0;
        assert_eq!(a, action(&[1; 32]).0);
        assert_ne!(a, action(&[2; 32]).0);
        assert_eq!(a.hash.len(), 64);
        // The empty directory's digest is the well-known empty SHA-256.
        assert_eq!(
            Blob::of(&EMPTY_DIRECTORY).hash,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn a_blob_that_is_not_what_it_says_is_refused() {
        let blob = Blob::of(b"content");
        assert!(check_blob(&blob, b"content").is_ok());
        assert!(matches!(
            check_blob(&blob, b"contenT"),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            check_blob(&blob, b"content!"),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn a_server_that_does_not_answer_is_given_up_within_the_deadline() {
        // A listener that accepts and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("grpc://{}", listener.local_addr().unwrap());
        let remote = Remote::new(&url, Duration::from_millis(300)).unwrap();
        let started = std::time::Instant::now();
        assert!(matches!(
            remote.lookup(&[1; 32]),
            Err(Error::Unreachable(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(remote.down().is_some());
        // Given up: the next call does not wait.
        let started = std::time::Instant::now();
        assert!(matches!(
            remote.lookup(&[2; 32]),
            Err(Error::Unreachable(_))
        ));
        assert!(started.elapsed() < Duration::from_millis(100));
        drop(listener);
    }

    #[test]
    fn a_server_that_is_not_there_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("grpc://{}", listener.local_addr().unwrap());
        drop(listener);
        let remote = Remote::new(&url, Duration::from_secs(2)).unwrap();
        assert!(matches!(
            remote.lookup(&[1; 32]),
            Err(Error::Unreachable(_))
        ));
    }
}
