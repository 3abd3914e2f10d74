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
/// Pointer records, version 1 (written before this version; still read)
/// and 2 (a random nonce in each record keys its encryption, so a sequence
/// number used twice after a failed publication never reuses a keystream;
/// and the publication's time).
const POINTER_MAGIC_V1: &[u8; 8] = b"CAIRNPT1";
const POINTER_MAGIC: &[u8; 8] = b"CAIRNPT2";
const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;
/// Catalog meta keys.
const META_ROOT: &str = "root_cap";
const META_SEQ: &str = "namespace_seq";
const META_DIGEST: &str = "namespace_digest";
/// Set once the last whole-namespace snapshot of a drive that moved to
/// device logs is published.
const META_RETIRED: &str = "namespace_snapshots_retired";

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("not a root capability (expected {ROOT_PREFIX}...)")]
    BadRootCap,
    #[error("no server holds a valid namespace pointer for this root capability. Found: {0}")]
    NoPointer(String),
    #[error("the namespace pointer reached only {placed} servers, {needed} needed")]
    PointerNotHappy { placed: usize, needed: usize },
    #[error(
        "only {answered} servers answered; {needed} must, to be sure the newest namespace is among them \
         (the newest found is {seq}). Bring servers back, or pass --accept-partial to take it anyway"
    )]
    TooFewAnswers { answered: usize, needed: usize, seq: u64 },
    #[error("the newest namespace the servers hold is {seq}, older than --min-seq {min}")]
    TooOld { seq: u64, min: u64 },
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

    /// A hash of the secret for `tag` (a key, a MAC key, a name): the one
    /// way other modules use the secret.
    pub(crate) fn derive(&self, tag: &[u8], parts: &[&[u8]]) -> crate::codec::Hash {
        let mut all: Vec<&[u8]> = vec![&self.0];
        all.extend_from_slice(parts);
        tagged_hash(tag, &all)
    }

    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        let key = tagged_hash(b"cairn-v1-pointer-mac", &[&self.0]);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("any key length");
        mac.update(body);
        mac
    }

    /// The key of a version 1 record: one per sequence number.
    fn cap_key_v1(&self, seq: u64) -> Key {
        let h = tagged_hash(b"cairn-v1-pointer-enc", &[&self.0, &seq.to_be_bytes()]);
        h[..16].try_into().expect("16 bytes")
    }

    /// The key of a version 2 record: one per record, by its nonce.
    fn cap_key(&self, seq: u64, nonce: &[u8]) -> Key {
        let h = tagged_hash(b"cairn-v2-pointer-enc", &[&self.0, &seq.to_be_bytes(), nonce]);
        h[..16].try_into().expect("16 bytes")
    }

    /// The pointer record: magic, sequence number, publication time, a
    /// random nonce, the snapshot's capability encrypted, and a MAC over
    /// all of it.
    pub fn seal_pointer(&self, seq: u64, time_ns: i64, cap: &Capability) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut enc = cap.to_string().into_bytes();
        apply_keystream(&self.cap_key(seq, &nonce), 0, &mut enc);
        let mut out = POINTER_MAGIC.to_vec();
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&time_ns.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&enc);
        let mac = self.mac(&out).finalize().into_bytes();
        out.extend_from_slice(&mac);
        out
    }

    /// What a record says, if it is one this root capability made and
    /// nobody changed.
    pub fn open_pointer(&self, record: &[u8]) -> Result<Pointer, String> {
        let v2 = record.starts_with(POINTER_MAGIC);
        let fixed = POINTER_MAGIC.len() + 8 + if v2 { 8 + NONCE_LEN } else { 0 };
        if record.len() < fixed + MAC_LEN || !(v2 || record.starts_with(POINTER_MAGIC_V1)) {
            return Err("not a pointer record".into());
        }
        let (body, mac) = record.split_at(record.len() - MAC_LEN);
        // verify_slice compares in constant time.
        if self.mac(body).verify_slice(mac).is_err() {
            return Err("authentication failed (forged or altered)".into());
        }
        let seq = u64::from_be_bytes(body[8..16].try_into().expect("8 bytes"));
        let mut cap = body[fixed..].to_vec();
        let time_ns = if v2 {
            apply_keystream(&self.cap_key(seq, &body[24..fixed]), 0, &mut cap);
            Some(i64::from_be_bytes(body[16..24].try_into().expect("8 bytes")))
        } else {
            apply_keystream(&self.cap_key_v1(seq), 0, &mut cap);
            None
        };
        let cap = String::from_utf8(cap).map_err(|_| "bad capability".to_string())?;
        let cap = cap.parse().map_err(|e| format!("bad capability: {e}"))?;
        Ok(Pointer { seq, time_ns, cap })
    }
}

/// What a pointer record names: the snapshot, its sequence number and
/// (version 2 records) when it was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    pub seq: u64,
    pub time_ns: Option<i64>,
    pub cap: Capability,
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
        None => catalog
            .meta_or_insert(META_ROOT, &RootCap::generate().to_string())?
            .parse(),
    }
}

/// Makes `root` this catalog's drive (a machine joining it).
pub fn adopt(catalog: &Catalog, root: &RootCap) -> Result<(), NamespaceError> {
    catalog.set_meta(META_ROOT, &root.to_string())?;
    Ok(())
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
    prepare_from(last_published(catalog)?, catalog)
}

/// What a publication needs from the owner's catalog besides the snapshot:
/// a few short reads.
pub struct LastPublished {
    root: RootCap,
    digest: Option<String>,
    local_seq: u64,
}

pub fn last_published(catalog: &Catalog) -> Result<LastPublished, NamespaceError> {
    Ok(LastPublished {
        root: root_cap(catalog)?,
        digest: catalog.meta(META_DIGEST)?,
        local_seq: catalog.meta(META_SEQ)?.and_then(|s| s.parse().ok()).unwrap_or(0),
    })
}

/// The snapshot to publish, read through `reader` (which may be a second
/// connection to the catalog), unless it is the one last published.
pub fn prepare_from(last: LastPublished, reader: &Catalog) -> Result<Option<Pending>, NamespaceError> {
    let snapshot = serde_json::to_vec(&reader.export()?).expect("serialises");
    let digest = data_encoding::HEXLOWER.encode(&tagged_hash(b"cairn-v1-namespace-digest", &[&snapshot]));
    if last.digest.as_deref() == Some(digest.as_str()) {
        return Ok(None);
    }
    Ok(Some(Pending {
        root: last.root,
        snapshot,
        digest,
        local_seq: last.local_seq,
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
    let created_ns = crate::catalog::now_ns();
    let record = p.root.seal_pointer(seq, created_ns, &report.cap);
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
            created_ns,
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
    up_to_date(catalog)
}

/// Whether whole-namespace snapshots are still published. Once device
/// logs carry the namespace (this machine logged or merged a record) they
/// are not, at any size of change: a drive that had snapshots gets one
/// last one, so an older cairn recovering it gets its state at migration,
/// and a drive that never had one gets none.
pub fn snapshots_due(catalog: &Catalog) -> Result<bool, NamespaceError> {
    if !crate::sync::store::any_record(catalog)? {
        return Ok(true);
    }
    Ok(catalog.meta(META_SEQ)?.is_some() && catalog.meta(META_RETIRED)?.is_none())
}

/// The newest snapshot on the grid is the catalog's namespace: on a drive
/// in device logs, it is the last one.
pub fn up_to_date(catalog: &Catalog) -> Result<(), NamespaceError> {
    if crate::sync::store::any_record(catalog)? {
        catalog.set_meta(META_RETIRED, "1")?;
    }
    Ok(())
}

/// The newest valid pointer of all servers, and what each server said.
#[derive(Debug, Serialize)]
pub struct Latest {
    pub seq: u64,
    /// When it was published (records written before pointer version 2
    /// do not say).
    pub time_ns: Option<i64>,
    #[serde(serialize_with = "as_string")]
    pub cap: Capability,
    pub servers: Vec<(String, String)>,
    /// Servers that answered at all (with a record or with none).
    pub answered: usize,
}

fn as_string<S: serde::Serializer>(c: &Capability, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&c.to_string())
}

pub async fn latest(grid: &Grid, root: &RootCap) -> Result<Latest, NamespaceError> {
    let name = root.pointer_name();
    let reads = grid.servers.iter().map(|s| grid.timed(s.server.get_record(&name)));
    let mut best: Option<Pointer> = None;
    let mut servers = Vec::new();
    let mut answered = 0;
    for (s, got) in grid.servers.iter().zip(futures::future::join_all(reads).await) {
        answered += usize::from(got.is_ok());
        let said = match got {
            Err(e) => format!("unreachable: {e}"),
            Ok(None) => "no pointer".to_string(),
            Ok(Some(bytes)) => match root.open_pointer(&bytes) {
                Ok(p) => {
                    let said = format!("pointer {}", p.seq);
                    if best.as_ref().is_none_or(|b| p.seq > b.seq) {
                        best = Some(p);
                    }
                    said
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
        Some(p) => Ok(Latest {
            seq: p.seq,
            time_ns: p.time_ns,
            cap: p.cap,
            servers,
            answered,
        }),
        None => Err(NamespaceError::NoPointer(
            servers
                .iter()
                .map(|(s, w)| format!("{s}: {w}"))
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}

/// How sure `recover` must be that it found the newest namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecoverRules {
    /// Recover from whatever servers answered, however few.
    pub accept_partial: bool,
    /// Refuse a namespace older than this sequence number.
    pub min_seq: Option<u64>,
}

/// How many servers must answer for one of them to hold the newest
/// pointer: every publication reached at least `happy` of `total` servers,
/// so more than `total - happy` answers always include one of them (unless
/// those servers lie by serving an older record).
pub fn answers_needed(total: usize, happy: usize) -> usize {
    total.saturating_sub(happy) + 1
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
pub async fn recover(
    grid: Arc<Grid>,
    root: &RootCap,
    happy: u16,
    rules: RecoverRules,
    catalog: &mut Catalog,
) -> Result<Latest, NamespaceError> {
    let latest = latest(&grid, root).await?;
    let total = grid.servers.len();
    let needed = answers_needed(total, happy as usize);
    if !rules.accept_partial && latest.answered < needed {
        return Err(NamespaceError::TooFewAnswers {
            answered: latest.answered,
            needed,
            seq: latest.seq,
        });
    }
    if let Some(min) = rules.min_seq.filter(|min| latest.seq < *min) {
        return Err(NamespaceError::TooOld { seq: latest.seq, min });
    }
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
        let record = root.seal_pointer(42, 7, &cap());
        let want = Pointer {
            seq: 42,
            time_ns: Some(7),
            cap: cap(),
        };
        assert_eq!(root.open_pointer(&record).unwrap(), want);
        assert!(RootCap::generate().open_pointer(&record).is_err(), "another root");
        for i in 0..record.len() {
            let mut bad = record.clone();
            bad[i] ^= 1;
            assert!(root.open_pointer(&bad).is_err(), "flipped byte {i} accepted");
        }
        assert!(root.open_pointer(&record[..record.len() - 1]).is_err());
    }

    #[test]
    fn a_sequence_number_used_twice_never_repeats_a_keystream() {
        let root = RootCap::generate();
        let (a, b) = (root.seal_pointer(5, 0, &cap()), root.seal_pointer(5, 0, &cap()));
        assert_ne!(
            a[40..a.len() - MAC_LEN],
            b[40..b.len() - MAC_LEN],
            "same ciphertext twice"
        );
    }

    #[test]
    fn version_1_pointers_still_open() {
        let root = RootCap::generate();
        let mut enc = cap().to_string().into_bytes();
        apply_keystream(&root.cap_key_v1(9), 0, &mut enc);
        let mut record = POINTER_MAGIC_V1.to_vec();
        record.extend_from_slice(&9u64.to_be_bytes());
        record.extend_from_slice(&enc);
        let mac = root.mac(&record).finalize().into_bytes();
        record.extend_from_slice(&mac);
        let p = root.open_pointer(&record).unwrap();
        assert_eq!((p.seq, p.time_ns, p.cap), (9, None, cap()));
    }

    #[test]
    fn recovery_needs_more_answers_than_servers_a_publication_may_miss() {
        // 5 servers, happy 4: a publication may miss 1, so 2 answers suffice.
        assert_eq!(answers_needed(5, 4), 2);
        assert_eq!(answers_needed(5, 3), 3);
        assert_eq!(answers_needed(3, 3), 1);
    }

    #[test]
    fn root_caps_round_trip_and_reject_garbage() {
        let root = RootCap::generate();
        assert_eq!(root.to_string().parse::<RootCap>().unwrap(), root);
        assert!("cairn:root1:abc".parse::<RootCap>().is_err());
        assert!(cap().to_string().parse::<RootCap>().is_err());
    }
}
