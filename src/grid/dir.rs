//! The `dir` back end: a server that is a directory on a local or mounted
//! file system.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{Block, Server, ServerError, ShareSink};
use crate::codec::StorageIndex;

/// A server that is a directory: local disk, or any mounted file system.
///
/// Layout: `shares/<si[0..2]>/<si>/<share>` for published shares and
/// `incoming/` for shares being written.
pub struct DirServer {
    pub root: PathBuf,
}

impl DirServer {
    fn share_dir(&self, si: StorageIndex) -> PathBuf {
        let hex = si.to_string();
        self.root.join("shares").join(&hex[..2]).join(hex)
    }

    fn share_path(&self, si: StorageIndex, share: u16) -> PathBuf {
        self.share_dir(si).join(share.to_string())
    }

    /// A server whose directory vanished is down, not empty: creating it
    /// again would silently hide the loss.
    fn check_root(&self) -> Result<(), ServerError> {
        if self.root.is_dir() {
            Ok(())
        } else {
            Err(ServerError::Other(format!(
                "server directory {} is missing",
                self.root.display()
            )))
        }
    }
}

/// `create_dir_all` whose new directories survive a power loss: the entry
/// of each one made is synced in its parent (a synced share in a directory
/// whose own entry was lost is lost with it).
fn create_dir_synced(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_synced(parent)?;
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        crate::sys::sync_dir(parent)?;
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServerError> + Send + 'static,
) -> Result<T, ServerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServerError::Other(format!("I/O task failed: {e}")))?
}

fn not_found_as(e: std::io::Error) -> ServerError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ServerError::NotFound
    } else {
        ServerError::Io(e)
    }
}

#[async_trait]
impl Server for DirServer {
    async fn create_share(&self, si: StorageIndex, share: u16) -> Result<Box<dyn ShareSink>, ServerError> {
        self.check_root()?;
        let incoming = self.root.join("incoming");
        // The writer's PID in the name lets a cleaner tell abandoned files
        // (their process is gone) from ones still being written.
        let staging = incoming.join(format!(
            "{si}.{share}.{}.{:016x}.part",
            std::process::id(),
            rand::random::<u64>()
        ));
        let final_path = self.share_path(si, share);
        let file = blocking({
            let staging = staging.clone();
            move || {
                std::fs::create_dir_all(&incoming)?;
                Ok(std::fs::File::create_new(&staging)?)
            }
        })
        .await?;
        Ok(Box::new(DirSink {
            file: Some(file),
            staging,
            final_path,
        }))
    }

    async fn read(&self, si: StorageIndex, share: u16, offset: u64, len: u64) -> Result<Vec<u8>, ServerError> {
        self.check_root()?;
        let path = self.share_path(si, share);
        blocking(move || {
            let mut f = std::fs::File::open(&path).map_err(not_found_as)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::with_capacity(len as usize);
            f.take(len).read_to_end(&mut buf)?;
            if buf.len() as u64 != len {
                return Err(ServerError::Short {
                    offset,
                    wanted: len,
                    got: buf.len() as u64,
                });
            }
            Ok(buf)
        })
        .await
    }

    async fn share_len(&self, si: StorageIndex, share: u16) -> Result<u64, ServerError> {
        self.check_root()?;
        let path = self.share_path(si, share);
        blocking(move || Ok(std::fs::metadata(&path).map_err(not_found_as)?.len())).await
    }

    async fn shares(&self, si: StorageIndex) -> Result<Vec<u16>, ServerError> {
        self.check_root()?;
        let dir = self.share_dir(si);
        blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for entry in entries {
                if let Some(n) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
                    out.push(n);
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn clean_abandoned(&self) -> Result<usize, ServerError> {
        self.check_root()?;
        let incoming = self.root.join("incoming");
        blocking(move || {
            let Ok(entries) = std::fs::read_dir(&incoming) else {
                return Ok(0);
            };
            let mut removed = 0;
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid = name.split('.').nth(2).and_then(|p| p.parse::<u32>().ok());
                if name.ends_with(".part") && !super::process_alive(pid) {
                    std::fs::remove_file(entry.path())?;
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await
    }

    /// `records/<name>`, replaced by writing a temporary file, fsync and
    /// rename.
    async fn put_record(&self, name: &str, data: Vec<u8>) -> Result<(), ServerError> {
        self.check_root()?;
        let dir = self.root.join("records");
        let path = dir.join(name);
        let tmp = dir.join(format!(
            ".{name}.{}.{:016x}.tmp",
            std::process::id(),
            rand::random::<u64>()
        ));
        blocking(move || {
            create_dir_synced(&dir)?;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            crate::sys::sync_dir(&dir)?;
            Ok(())
        })
        .await
    }

    async fn get_record(&self, name: &str) -> Result<Option<Vec<u8>>, ServerError> {
        self.check_root()?;
        let path = self.root.join("records").join(name);
        blocking(move || {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let mut data = Vec::new();
            file.take(super::MAX_RECORD + 1).read_to_end(&mut data)?;
            if data.len() as u64 > super::MAX_RECORD {
                return Err(super::record_too_long(data.len() as u64));
            }
            Ok(Some(data))
        })
        .await
    }

    async fn list_records(&self, prefix: &str) -> Result<Vec<String>, ServerError> {
        self.check_root()?;
        let dir = self.root.join("records");
        let prefix = prefix.to_string();
        blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for entry in entries {
                let name = entry?.file_name();
                // Temporary files start with a dot; no record does.
                let Some(name) = name.to_str().filter(|n| n.starts_with(&prefix) && !n.starts_with('.')) else {
                    continue;
                };
                if out.len() == super::MAX_LISTED {
                    return Err(super::too_many_records());
                }
                out.push(name.to_string());
            }
            Ok(out)
        })
        .await
    }

    async fn delete_record(&self, name: &str) -> Result<(), ServerError> {
        self.check_root()?;
        let dir = self.root.join("records");
        let path = dir.join(name);
        blocking(move || {
            match std::fs::remove_file(&path) {
                Ok(()) => crate::sys::sync_dir(&dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            Ok(())
        })
        .await
    }

    async fn delete(&self, si: StorageIndex, share: u16) -> Result<(), ServerError> {
        self.check_root()?;
        let path = self.share_path(si, share);
        blocking(move || {
            std::fs::remove_file(&path).map_err(not_found_as)?;
            // The per-version directory goes when its last share goes.
            if let Some(dir) = path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
            Ok(())
        })
        .await
    }
}

struct DirSink {
    /// Taken while a blocking write runs; `None` after a failed or
    /// abandoned write, which makes the sink unusable.
    file: Option<std::fs::File>,
    staging: PathBuf,
    final_path: PathBuf,
}

impl DirSink {
    async fn with_file(
        &mut self,
        f: impl FnOnce(&mut std::fs::File) -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| ServerError::Other("share writer broken by an earlier failure".into()))?;
        let file = blocking(move || {
            f(&mut file)?;
            Ok(file)
        })
        .await?;
        self.file = Some(file);
        Ok(())
    }
}

#[async_trait]
impl ShareSink for DirSink {
    async fn write(&mut self, block: Block) -> Result<(), ServerError> {
        self.with_file(move |f| f.write_all(&block.data)).await
    }

    async fn seal(&mut self) -> Result<(), ServerError> {
        self.with_file(|f| f.sync_all()).await
    }

    async fn publish(self: Box<Self>) -> Result<(), ServerError> {
        let DirSink {
            staging, final_path, ..
        } = *self;
        blocking(move || {
            let dir = final_path.parent().expect("share path has a parent");
            create_dir_synced(dir)?;
            std::fs::rename(&staging, &final_path)?;
            crate::sys::sync_dir(dir)?;
            Ok(())
        })
        .await
    }

    async fn abort(self: Box<Self>) {
        let DirSink { file, staging, .. } = *self;
        drop(file);
        let _ = blocking(move || Ok(std::fs::remove_file(staging)?)).await;
    }
}
