//! The `s3` back end: a server that is a bucket (and key prefix) of an
//! S3-compatible object store, through the `object_store` crate.
//!
//! Layout: `<prefix>shares/<si>/<share>` for published shares. Writing a
//! share is two-phase like the `dir` back end's: a share larger than one
//! part goes up as a multipart upload, part by part, completed only at
//! `publish`; a smaller one is held until `publish` and stored with one
//! PUT. Either way an object appears whole or not at all. Open multipart
//! uploads are journaled locally (`<state>/multipart/<server>/`), so the
//! ones a crashed process left are aborted at the next start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};

use super::{Block, Server, ServerError, ShareSink};
use crate::codec::StorageIndex;
use crate::config::ServerConfig;

const DEFAULT_PART_SIZE_MIB: u64 = 5;

pub struct S3Server {
    store: Arc<AmazonS3>,
    prefix: String,
    part_size: usize,
    journal: PathBuf,
}

impl From<object_store::Error> for ServerError {
    fn from(e: object_store::Error) -> ServerError {
        match e {
            object_store::Error::NotFound { .. } => ServerError::NotFound,
            other => ServerError::Other(other.to_string()),
        }
    }
}

impl S3Server {
    /// A client for the server entry `s`; requests give up after `timeout`
    /// (the grid's time-out bounds them again from outside).
    pub fn new(s: &ServerConfig, timeout: Duration, state_dir: &std::path::Path) -> anyhow::Result<S3Server> {
        let bucket = s.bucket.clone().expect("validated");
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_region(s.region.clone().unwrap_or_else(|| "us-east-1".into()))
            .with_virtual_hosted_style_request(!s.path_style.unwrap_or(true))
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: timeout,
                ..Default::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(timeout)
                    .with_connect_timeout(timeout)
                    .with_allow_http(s.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"))),
            );
        if let Some(endpoint) = &s.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some((id, secret)) = credentials(s)? {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret);
        }
        let store = builder.build().map_err(|e| anyhow::anyhow!("server {}: {e}", s.name))?;
        let prefix = match s.prefix.as_deref().map(|p| p.trim_matches('/')) {
            Some(p) if !p.is_empty() => format!("{p}/"),
            _ => String::new(),
        };
        Ok(S3Server {
            store: Arc::new(store),
            prefix,
            part_size: (s.part_size_mib.unwrap_or(DEFAULT_PART_SIZE_MIB) << 20) as usize,
            journal: state_dir.join("multipart").join(&s.name),
        })
    }

    fn share_dir(&self, si: StorageIndex) -> ObjectPath {
        ObjectPath::from(format!("{}shares/{si}", self.prefix))
    }

    fn share_path(&self, si: StorageIndex, share: u16) -> ObjectPath {
        ObjectPath::from(format!("{}shares/{si}/{share}", self.prefix))
    }
}

/// The entry's keys, else the environment's (read by the builder), else
/// the credentials file's.
fn credentials(s: &ServerConfig) -> anyhow::Result<Option<(String, String)>> {
    if let (Some(id), Some(secret)) = (&s.access_key_id, &s.secret_access_key) {
        return Ok(Some((id.clone(), secret.clone())));
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        return Ok(None);
    }
    let explicit = s.credentials_file.is_some();
    let file = match &s.credentials_file {
        Some(f) => f.clone(),
        None => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("server {}: credentials file {}: {e}", s.name, file.display()),
    };
    let profile = s
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok())
        .unwrap_or_else(|| "default".into());
    match profile_keys(&text, &profile) {
        Some(keys) => Ok(Some(keys)),
        None => anyhow::bail!(
            "server {}: no aws_access_key_id and aws_secret_access_key for profile [{profile}] in {}",
            s.name,
            file.display()
        ),
    }
}

/// The two keys of `[profile]` in an AWS credentials file (INI).
fn profile_keys(text: &str, profile: &str) -> Option<(String, String)> {
    let (mut id, mut secret, mut inside) = (None, None, false);
    for line in text.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == profile;
        } else if let (true, Some((k, v))) = (inside, line.split_once('=')) {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_string()),
                "aws_secret_access_key" => secret = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    Some((id?, secret?))
}

/// One open multipart upload, as journaled before its first part.
#[derive(Serialize, Deserialize)]
struct OpenUpload {
    path: String,
    id: String,
}

#[async_trait]
impl Server for S3Server {
    async fn create_share(&self, si: StorageIndex, share: u16) -> Result<Box<dyn ShareSink>, ServerError> {
        Ok(Box::new(S3Sink {
            store: self.store.clone(),
            path: self.share_path(si, share),
            part_size: self.part_size,
            buf: Vec::new(),
            held: Vec::new(),
            multipart: None,
            journal: self.journal.clone(),
        }))
    }

    async fn read(&self, si: StorageIndex, share: u16, offset: u64, len: u64) -> Result<Vec<u8>, ServerError> {
        let bytes = self
            .store
            .get_range(&self.share_path(si, share), offset..offset + len)
            .await?;
        if bytes.len() as u64 != len {
            return Err(ServerError::Short {
                offset,
                wanted: len,
                got: bytes.len() as u64,
            });
        }
        Ok(bytes.to_vec())
    }

    async fn share_len(&self, si: StorageIndex, share: u16) -> Result<u64, ServerError> {
        Ok(self.store.head(&self.share_path(si, share)).await?.size)
    }

    async fn shares(&self, si: StorageIndex) -> Result<Vec<u16>, ServerError> {
        let listed: Vec<_> = self.store.list(Some(&self.share_dir(si))).try_collect().await?;
        let mut out: Vec<u16> = listed
            .iter()
            .filter_map(|meta| meta.location.filename().and_then(|n| n.parse().ok()))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn delete(&self, si: StorageIndex, share: u16) -> Result<(), ServerError> {
        Ok(self.store.delete(&self.share_path(si, share)).await?)
    }

    /// `<prefix>records/<name>`: an S3 PUT replaces an object atomically.
    async fn put_record(&self, name: &str, data: Vec<u8>) -> Result<(), ServerError> {
        let path = ObjectPath::from(format!("{}records/{name}", self.prefix));
        self.store.put(&path, PutPayload::from(data)).await?;
        Ok(())
    }

    async fn get_record(&self, name: &str) -> Result<Option<Vec<u8>>, ServerError> {
        let path = ObjectPath::from(format!("{}records/{name}", self.prefix));
        let got = match self.store.get(&path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // Streamed and bounded: a hostile server's huge record is refused
        // after MAX_RECORD bytes, not buffered.
        let mut body = got.into_stream();
        let mut data = Vec::new();
        while let Some(piece) = body.try_next().await? {
            data.extend_from_slice(&piece);
            if data.len() as u64 > super::MAX_RECORD {
                return Err(super::record_too_long(data.len() as u64));
            }
        }
        Ok(Some(data))
    }

    async fn list_records(&self, prefix: &str) -> Result<Vec<String>, ServerError> {
        let dir = format!("{}records/", self.prefix);
        // Listed by the directory (S3 has no partial-name listing through
        // object_store), filtered here.
        let mut listed = self.store.list(Some(&ObjectPath::from(dir.as_str())));
        let mut out = Vec::new();
        while let Some(meta) = listed.try_next().await? {
            let name = meta.location.as_ref().strip_prefix(dir.as_str()).unwrap_or_default();
            if name.starts_with(prefix) && !name.contains('/') {
                if out.len() == super::MAX_LISTED {
                    return Err(super::too_many_records());
                }
                out.push(name.to_string());
            }
        }
        Ok(out)
    }

    async fn delete_record(&self, name: &str) -> Result<(), ServerError> {
        let path = ObjectPath::from(format!("{}records/{name}", self.prefix));
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Aborts the multipart uploads journaled by processes that are gone.
    async fn clean_abandoned(&self) -> Result<usize, ServerError> {
        let Ok(entries) = std::fs::read_dir(&self.journal) else {
            return Ok(0);
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only entries this module wrote: PID.HEX.json.
            let parts: Vec<&str> = name.split('.').collect();
            let ours = matches!(parts.as_slice(), [pid, hex, "json"]
                if pid.parse::<u32>().is_ok() && hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ours {
                continue;
            }
            let pid = parts[0].parse::<u32>().ok();
            if super::process_alive(pid) {
                continue;
            }
            if let Ok(open) = serde_json::from_slice::<OpenUpload>(&std::fs::read(entry.path())?) {
                match self.store.abort_multipart(&ObjectPath::from(open.path), &open.id).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
        Ok(removed)
    }
}

struct Multipart {
    id: String,
    parts: Vec<PartId>,
    journal_entry: PathBuf,
}

struct S3Sink {
    store: Arc<AmazonS3>,
    path: ObjectPath,
    part_size: usize,
    /// Bytes not yet sent: less than one part, or a whole small share.
    buf: Vec<u8>,
    /// The memory budget of the blocks in `buf`.
    held: Vec<tokio::sync::OwnedSemaphorePermit>,
    multipart: Option<Multipart>,
    journal: PathBuf,
}

impl S3Sink {
    async fn start_multipart(&mut self) -> Result<&mut Multipart, ServerError> {
        if self.multipart.is_none() {
            let id = self.store.create_multipart(&self.path).await?;
            std::fs::create_dir_all(&self.journal)?;
            let journal_entry =
                self.journal
                    .join(format!("{}.{:016x}.json", std::process::id(), rand::random::<u64>()));
            let entry = OpenUpload {
                path: self.path.to_string(),
                id: id.clone(),
            };
            std::fs::write(&journal_entry, serde_json::to_vec(&entry).expect("serialises"))?;
            self.multipart = Some(Multipart {
                id,
                parts: Vec::new(),
                journal_entry,
            });
        }
        Ok(self.multipart.as_mut().expect("just set"))
    }

    async fn send_part(&mut self, len: usize) -> Result<(), ServerError> {
        // The part leaves as the buffer itself; only the tail is copied.
        let rest = self.buf.split_off(len);
        let data = std::mem::replace(&mut self.buf, rest);
        // The tail came from the last block written, whose budget stays held.
        let last = self.held.pop();
        let released = std::mem::take(&mut self.held);
        let store = self.store.clone();
        let path = self.path.clone();
        let multipart = self.start_multipart().await?;
        let part = store
            .put_part(&path, &multipart.id, multipart.parts.len(), PutPayload::from(data))
            .await?;
        multipart.parts.push(part);
        drop(released);
        self.held.extend(last.filter(|_| !self.buf.is_empty()));
        Ok(())
    }
}

#[async_trait]
impl ShareSink for S3Sink {
    async fn write(&mut self, block: Block) -> Result<(), ServerError> {
        self.buf.extend_from_slice(&block.data);
        self.held.extend(block.memory);
        while self.buf.len() >= self.part_size {
            self.send_part(self.part_size).await?;
        }
        Ok(())
    }

    async fn seal(&mut self) -> Result<(), ServerError> {
        // A small share stays buffered for one PUT at publish; a large one
        // sends its last part now, leaving only the completion.
        if self.multipart.is_some() && !self.buf.is_empty() {
            self.send_part(self.buf.len()).await?;
        }
        Ok(())
    }

    async fn publish(self: Box<Self>) -> Result<(), ServerError> {
        let S3Sink {
            store,
            path,
            buf,
            multipart,
            ..
        } = *self;
        match multipart {
            None => {
                store.put(&path, PutPayload::from(buf)).await?;
            }
            Some(m) => {
                store.complete_multipart(&path, &m.id, m.parts).await?;
                let _ = std::fs::remove_file(&m.journal_entry);
            }
        }
        Ok(())
    }

    async fn abort(self: Box<Self>) {
        if let Some(m) = self.multipart {
            match self.store.abort_multipart(&self.path, &m.id).await {
                Ok(()) => {
                    let _ = std::fs::remove_file(&m.journal_entry);
                }
                // Left journaled: the next start's cleaner tries again.
                Err(e) => tracing::warn!(path = %self.path, error = %e, "aborting a multipart upload"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::profile_keys;

    #[test]
    fn credentials_file_profiles() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key=B\n\n[other]\naws_access_key_id=C\n";
        assert_eq!(profile_keys(text, "default"), Some(("A".into(), "B".into())));
        assert_eq!(profile_keys(text, "other"), None, "a profile without a secret");
        assert_eq!(profile_keys(text, "missing"), None);
    }
}
