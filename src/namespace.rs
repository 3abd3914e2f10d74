//! The namespace on the grid: a snapshot of the catalog, stored as an
//! encrypted, erasure-coded version like any file, and a small mutable
//! pointer record on every server naming the newest snapshot.
//!
//! One secret, the root capability, opens everything: it names the pointer
//! record, decrypts the snapshot's capability inside it and authenticates
//! it (HMAC-SHA-256). A server can hide a record or serve an old one, but
//! not forge or alter one; a reader takes the newest valid record of all
//! servers, so one server rolling back changes nothing.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use crate::catalog::{Catalog, CatalogError, PublishedNamespace, Snapshot};
use crate::codec::{apply_keystream, tagged_hash, Capability, Key};
use crate::grid::Grid;

const ROOT_PREFIX: &str = "cairn:root1:";
const POINTER_MAGIC: &[u8; 8] = b"CAIRNPT1";
const MAC_LEN: usize = 32;
/// Catalog meta keys.
const META_ROOT: &str = "root_cap";
const META_SEQ: &str = "namespace_seq";
const META_DIGEST: &str = "namespace_digest";

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("not a root capability (expected {ROOT_PREFIX}...)")]
    BadRootCap,
    #[error("no server holds a valid namespace pointer for this root capability. Found: {0}")]
    NoPointer(String),
    #[error("the namespace pointer reached only {placed} servers, {needed} needed")]
    PointerNotHappy { placed: usize, needed: usize },
    #[error("the namespace snapshot does not parse: {0}")]
    BadSnapshot(String),
    #[error("uploading the namespace: {0}")]
    Upload(#[from] crate::upload::UploadError),
    #[error("reading the namespace: {0}")]
    Download(#[from] crate::download::DownloadError),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
}

/// The secret from which the whole drive can be rebuilt.
#[derive(Clone, PartialEq, Eq)]
pub struct RootCap([u8; 32]);

impl RootCap {
    pub fn generate() -> RootCap {
        RootCap(rand::random())
    }

    /// The record name on servers: reveals nothing of the secret.
    pub fn pointer_name(&self) -> String {
        let h = tagged_hash(b"cairn-v1-pointer-name", &[&self.0]);
        format!("namespace-{}", data_encoding::HEXLOWER.encode(&h[..16]))
    }

    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        let key = tagged_hash(b"cairn-v1-pointer-mac", &[&self.0]);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("any key length");
        mac.update(body);
        mac
    }

    /// A key per sequence number, so the counter-mode stream never repeats.
    fn cap_key(&self, seq: u64) -> Key {
        let h = tagged_hash(b"cairn-v1-pointer-enc", &[&self.0, &seq.to_be_bytes()]);
        h[..16].try_into().expect("16 bytes")
    }

    /// The pointer record: magic, sequence number, the snapshot's
    /// capability encrypted, and a MAC over all of it.
    pub fn seal_pointer(&self, seq: u64, cap: &Capability) -> Vec<u8> {
        let mut enc = cap.to_string().into_bytes();
        apply_keystream(&self.cap_key(seq), 0, &mut enc);
        let mut out = POINTER_MAGIC.to_vec();
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&enc);
        let mac = self.mac(&out).finalize().into_bytes();
        out.extend_from_slice(&mac);
        out
    }

    /// The sequence number and capability of a record, if it is one this
    /// root capability made and nobody changed.
    pub fn open_pointer(&self, record: &[u8]) -> Result<(u64, Capability), String> {
        if record.len() < POINTER_MAGIC.len() + 8 + MAC_LEN || !record.starts_with(POINTER_MAGIC) {
            return Err("not a pointer record".into());
        }
        let (body, mac) = record.split_at(record.len() - MAC_LEN);
        // verify_slice compares in constant time.
        if self.mac(body).verify_slice(mac).is_err() {
            return Err("authentication failed (forged or altered)".into());
        }
        let seq = u64::from_be_bytes(body[8..16].try_into().expect("8 bytes"));
        let mut cap = body[16..].to_vec();
        apply_keystream(&self.cap_key(seq), 0, &mut cap);
        let cap = String::from_utf8(cap).map_err(|_| "bad capability".to_string())?;
        Ok((seq, cap.parse().map_err(|e| format!("bad capability: {e}"))?))
    }
}

impl fmt::Display for RootCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{ROOT_PREFIX}{}",
            data_encoding::BASE32_NOPAD.encode(&self.0).to_lowercase()
        )
    }
}

impl fmt::Debug for RootCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootCap(..)")
    }
}

impl FromStr for RootCap {
    type Err = NamespaceError;
    fn from_str(s: &str) -> Result<RootCap, NamespaceError> {
        let b32 = s.trim().strip_prefix(ROOT_PREFIX).ok_or(NamespaceError::BadRootCap)?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(b32.to_uppercase().as_bytes())
            .map_err(|_| NamespaceError::BadRootCap)?;
        Ok(RootCap(bytes.try_into().map_err(|_| NamespaceError::BadRootCap)?))
    }
}

/// This drive's root capability, made on first use.
pub fn root_cap(catalog: &Catalog) -> Result<RootCap, NamespaceError> {
    match catalog.meta(META_ROOT)? {
        Some(s) => s.parse(),
        None => {
            let root = RootCap::generate();
            catalog.set_meta(META_ROOT, &root.to_string())?;
            Ok(root)
        }
    }
}

/// A snapshot ready to publish, taken from the catalog.
pub struct Pending {
    root: RootCap,
    snapshot: Vec<u8>,
    digest: String,
    local_seq: u64,
}

/// The catalog's namespace, unless it is what was published last.
pub fn prepare(catalog: &Catalog) -> Result<Option<Pending>, NamespaceError> {
    let snapshot = serde_json::to_vec(&catalog.export()?).expect("serialises");
    let digest = data_encoding::HEXLOWER.encode(&tagged_hash(b"cairn-v1-namespace-digest", &[&snapshot]));
    if catalog.meta(META_DIGEST)?.as_deref() == Some(digest.as_str()) {
        return Ok(None);
    }
    Ok(Some(Pending {
        root: root_cap(catalog)?,
        snapshot,
        digest,
        local_seq: catalog.meta(META_SEQ)?.and_then(|s| s.parse().ok()).unwrap_or(0),
    }))
}

#[derive(Debug, Clone, Serialize)]
pub struct Published {
    pub namespace: PublishedNamespace,
    pub bytes: usize,
    pub pointer_servers: usize,
    #[serde(skip)]
    digest: String,
}

/// Uploads a snapshot, then points every server at it. The sequence number
/// is one past anything seen here or on the servers, so a reader never
/// takes an older record for the newest.
pub async fn upload(
    grid: &Grid,
    params: crate::codec::Params,
    happy: u16,
    p: Pending,
) -> Result<Published, NamespaceError> {
    let on_servers = latest(grid, &p.root).await.map(|l| l.seq).unwrap_or(0);
    let seq = p.local_seq.max(on_servers) + 1;
    let size = p.snapshot.len() as u64;
    let source = crate::upload::Source {
        reader: Box::new(std::io::Cursor::new(p.snapshot)),
        size,
    };
    let report = crate::upload::upload(grid, params, happy, source, rand::random(), Arc::new(())).await?;
    let record = p.root.seal_pointer(seq, &report.cap);
    let name = p.root.pointer_name();
    let writes = grid
        .servers
        .iter()
        .map(|s| grid.timed(s.server.put_record(&name, record.clone())));
    let placed = futures::future::join_all(writes)
        .await
        .into_iter()
        .filter(Result::is_ok)
        .count();
    if placed < happy as usize {
        return Err(NamespaceError::PointerNotHappy {
            placed,
            needed: happy as usize,
        });
    }
    Ok(Published {
        namespace: PublishedNamespace {
            seq,
            cap: report.cap.to_string(),
            created_ns: crate::catalog::now_ns(),
        },
        bytes: size as usize,
        pointer_servers: placed,
        digest: p.digest,
    })
}

/// Records a publication, so the next one is skipped if nothing changed.
pub fn record(catalog: &Catalog, published: &Published) -> Result<(), NamespaceError> {
    catalog.add_namespace(&published.namespace)?;
    catalog.set_meta(META_SEQ, &published.namespace.seq.to_string())?;
    catalog.set_meta(META_DIGEST, &published.digest)?;
    Ok(())
}

/// The newest valid pointer of all servers, and what each server said.
#[derive(Debug, Serialize)]
pub struct Latest {
    pub seq: u64,
    #[serde(serialize_with = "as_string")]
    pub cap: Capability,
    pub servers: Vec<(String, String)>,
}

fn as_string<S: serde::Serializer>(c: &Capability, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&c.to_string())
}

pub async fn latest(grid: &Grid, root: &RootCap) -> Result<Latest, NamespaceError> {
    let name = root.pointer_name();
    let reads = grid.servers.iter().map(|s| grid.timed(s.server.get_record(&name)));
    let mut best: Option<(u64, Capability)> = None;
    let mut servers = Vec::new();
    for (s, got) in grid.servers.iter().zip(futures::future::join_all(reads).await) {
        let said = match got {
            Err(e) => format!("unreachable: {e}"),
            Ok(None) => "no pointer".to_string(),
            Ok(Some(bytes)) => match root.open_pointer(&bytes) {
                Ok((seq, cap)) => {
                    if best.as_ref().is_none_or(|(b, _)| seq > *b) {
                        best = Some((seq, cap));
                    }
                    format!("pointer {seq}")
                }
                Err(why) => {
                    tracing::warn!(server = %s.name, %why, "ignoring an invalid namespace pointer");
                    format!("invalid pointer: {why}")
                }
            },
        };
        servers.push((s.name.clone(), said));
    }
    match best {
        Some((seq, cap)) => Ok(Latest { seq, cap, servers }),
        None => Err(NamespaceError::NoPointer(
            servers
                .iter()
                .map(|(s, w)| format!("{s}: {w}"))
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}

/// Reads and parses a snapshot.
pub async fn fetch(grid: Arc<Grid>, cap: Capability) -> Result<Snapshot, NamespaceError> {
    let bytes = crate::download::download_to_vec(grid, cap).await?;
    let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| NamespaceError::BadSnapshot(e.to_string()))?;
    if snap.format != crate::catalog::SNAPSHOT_FORMAT {
        return Err(NamespaceError::BadSnapshot(format!("unknown format {}", snap.format)));
    }
    Ok(snap)
}

/// Rebuilds `catalog` from the newest namespace on the grid.
pub async fn recover(grid: Arc<Grid>, root: &RootCap, catalog: &mut Catalog) -> Result<Latest, NamespaceError> {
    let latest = latest(&grid, root).await?;
    let snap = fetch(grid, latest.cap.clone()).await?;
    catalog.import(&snap)?;
    catalog.set_meta(META_ROOT, &root.to_string())?;
    catalog.set_meta(META_SEQ, &latest.seq.to_string())?;
    catalog.add_namespace(&PublishedNamespace {
        seq: latest.seq,
        cap: latest.cap.to_string(),
        created_ns: crate::catalog::now_ns(),
    })?;
    Ok(latest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capability {
        crate::codec::encode_all(crate::codec::Params::new(3, 5, 1024).unwrap(), [7; 16], b"snapshot").0
    }

    #[test]
    fn pointers_open_only_with_their_root_and_unaltered() {
        let root = RootCap::generate();
        let record = root.seal_pointer(42, &cap());
        assert_eq!(root.open_pointer(&record).unwrap(), (42, cap()));
        assert!(RootCap::generate().open_pointer(&record).is_err(), "another root");
        for i in 0..record.len() {
            let mut bad = record.clone();
            bad[i] ^= 1;
            assert!(root.open_pointer(&bad).is_err(), "flipped byte {i} accepted");
        }
        assert!(root.open_pointer(&record[..record.len() - 1]).is_err());
    }

    #[test]
    fn root_caps_round_trip_and_reject_garbage() {
        let root = RootCap::generate();
        assert_eq!(root.to_string().parse::<RootCap>().unwrap(), root);
        assert!("cairn:root1:abc".parse::<RootCap>().is_err());
        assert!(cap().to_string().parse::<RootCap>().is_err());
    }
}
