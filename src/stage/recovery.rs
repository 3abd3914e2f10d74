//! The staging cache's layout on disk, sealing a working copy into it as a
//! recorded version, and putting it back in order after a crash.

use std::path::{Path, PathBuf};

use crate::catalog::{Catalog, CatalogError, Ino, VersionState};
use crate::stage::chunks::{SealedVersion, WorkingCopy};

/// What sealing or recovery can meet: the staging disk's errors and the
/// catalog's.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
}

/// `cache/versions/INO.NUM`: where a sealed version's chunks live.
pub fn version_dir(cache: &Path, ino: Ino, num: i64) -> PathBuf {
    cache.join("versions").join(format!("{ino}.{num}"))
}

/// (ino, version number) of a `cache/versions/INO.NUM` directory.
pub fn version_dir_key(path: &Path) -> Option<(Ino, i64)> {
    let (ino, num) = path.file_name()?.to_str()?.split_once('.')?;
    Some((ino.parse().ok()?, num.parse().ok()?))
}

/// Seals a working copy as the file's next version and records it (state
/// staged). The committed catalog row is the commit point (see
/// [`WorkingCopy::seal`]); a crash on either side of it is resolved by
/// [`recover`]. On failure the working copy comes back unchanged.
pub fn record_sealed(
    cache: &Path,
    catalog: &mut Catalog,
    ino: Ino,
    work: WorkingCopy,
) -> Result<(i64, SealedVersion), Box<(WorkingCopy, StageError)>> {
    let num = match catalog.next_version_num(ino) {
        Ok(num) => num,
        Err(e) => return Err(Box::new((work, e.into()))),
    };
    let origin = work.dir().file_name().map(|n| n.to_string_lossy().into_owned());
    let sealed = work.seal(version_dir(cache, ino, num), |size| -> Result<(), StageError> {
        catalog.add_version(ino, size, "", VersionState::Staged, None, origin.as_deref())?;
        catalog.commit()?;
        Ok(())
    })?;
    Ok((num, sealed))
}

/// Puts the staging cache back in order after a crash (kill -9, power loss):
/// - a version directory without a catalog row was being sealed when the
///   crash came: its working copy is still whole, so it goes;
/// - a working copy whose version row exists was sealed already: it goes;
/// - any other working copy belonged to a file open for writing: every byte
///   that reached it is kept, and it is sealed as the file's next version.
pub fn recover(cache: &Path, catalog: &mut Catalog, chunk_size: u64) -> Result<(), StageError> {
    let known = catalog.version_states()?;
    for entry in std::fs::read_dir(cache.join("versions"))? {
        let path = entry?.path();
        if version_dir_key(&path).is_none_or(|k| !known.contains_key(&k)) {
            tracing::info!(path = %path.display(), "removing a version left half-sealed by a crash");
            std::fs::remove_dir_all(&path)?;
        }
    }
    for entry in std::fs::read_dir(cache.join("work"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ino = name.split_once('-').and_then(|(i, _)| i.parse::<Ino>().ok());
        // (A file named only by hard links is live too.)
        let live = match ino {
            Some(ino) => catalog.is_live(ino)?,
            None => false,
        };
        if let Some((ino, num)) = catalog.sealed_from(&name)? {
            // Sealed and recorded; if the crash came before the copy moved
            // into place, it moves now.
            let dir = version_dir(cache, ino, num);
            if dir.exists() {
                std::fs::remove_dir_all(&path)?;
            } else {
                WorkingCopy::finish_seal(&path, &dir)?;
            }
            continue;
        }
        // A copy over a base killed before it was ready was never written.
        if !live || name.ends_with(crate::stage::chunks::UNFINISHED_SUFFIX) {
            std::fs::remove_dir_all(&path)?;
            continue;
        }
        let ino = ino.expect("live implies a parsed inode");
        // Kept aside, the file keeping its last sealed version: a copy whose
        // state is unreadable (cut short by a power loss: states are not
        // fsynced) or logs what no chunk can hold, or whose seal needs a base chunk the cache lacks (the
        // grid is not at hand here) or holds damaged.
        let set_aside = |catalog: &Catalog, why: &dyn std::fmt::Display| -> Result<(), StageError> {
            let aside = cache.join("quarantine").join(&name);
            std::fs::create_dir_all(cache.join("quarantine"))?;
            std::fs::rename(&path, &aside)?;
            tracing::error!(
                path = %catalog.path_of(ino)?,
                kept = %aside.display(),
                error = %why,
                "a working copy cannot be sealed: its chunk files are kept aside, the file keeps its last sealed version"
            );
            Ok(())
        };
        let work = match WorkingCopy::recover(path.clone(), chunk_size) {
            Ok(work) => work,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                set_aside(catalog, &e)?;
                continue;
            }
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("recovering {}: {e}", path.display())).into()),
        };
        let (num, sealed) = match record_sealed(cache, catalog, ino, work) {
            Ok(done) => done,
            Err(failed) => match failed.1 {
                StageError::Io(e)
                    if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData) =>
                {
                    set_aside(catalog, &e)?;
                    continue;
                }
                other => return Err(other),
            },
        };
        tracing::warn!(
            path = %catalog.path_of(ino)?,
            size = sealed.size,
            version = num,
            "a file open for writing at a crash was recovered as a new version"
        );
    }
    Ok(())
}
