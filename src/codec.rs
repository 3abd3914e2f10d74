//! The share format, version 1: encryption, erasure coding and hash trees.
//!
//! Pure code: no I/O, no clocks, no randomness. The uploader feeds plaintext
//! segments to a [`VersionEncoder`] and ships the blocks it returns; the
//! downloader checks trailers and blocks with a [`VersionDecoder`]. The byte
//! layout is specified in docs/FORMAT.md; keep the two in step.

use std::fmt;
use std::str::FromStr;

use aes::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use reed_solomon_erasure::galois_8::ReedSolomon;
use sha2::{Digest, Sha256};

pub const FORMAT_VERSION: u8 = 1;
/// Every share starts with these bytes.
pub const SHARE_MAGIC: &[u8; 8] = b"CAIRNSH1";
/// Every share ends with a 24-byte footer ending in these bytes.
pub const FOOTER_MAGIC: &[u8; 8] = b"CAIRNEND";
pub const FOOTER_LEN: u64 = 24;
/// Galois field GF(2^8) limits data + parity shards to 256.
pub const MAX_SHARES: u16 = 256;
/// Largest segment: a segment and its blocks are held in memory.
pub const MAX_SEGMENT_SIZE: u32 = 64 << 20;
/// Most segments a version may have: every share's trailer holds 32 bytes
/// per segment and is read whole (128 MiB at most; with 1 MiB segments,
/// versions of up to 4 TiB).
pub const MAX_SEGMENTS: u64 = 1 << 22;

pub type Hash = [u8; 32];
pub type Key = [u8; 16];

type Aes128Ctr = ctr::Ctr128BE<aes::Aes128>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("invalid parameters: {0}")]
    Params(String),
    #[error("invalid capability: {0}")]
    Capability(String),
    #[error("share {share}: {what}")]
    CorruptShare { share: u16, what: String },
    #[error("segment {segment}: {what}")]
    Segment { segment: u64, what: String },
    #[error("plaintext hash mismatch after decoding: the shares do not belong together")]
    PlaintextMismatch,
}

/// Encoding parameters: any `needed` of `total` shares rebuild a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub needed: u16,
    pub total: u16,
    pub segment_size: u32,
}

impl Params {
    pub fn new(needed: u16, total: u16, segment_size: u32) -> Result<Self, CodecError> {
        if needed == 0 {
            return Err(CodecError::Params("needed (k) must be at least 1".into()));
        }
        if total < needed {
            return Err(CodecError::Params(format!(
                "total (n = {total}) must be at least needed (k = {needed})"
            )));
        }
        if total > MAX_SHARES {
            return Err(CodecError::Params(format!(
                "total (n = {total}) must be at most {MAX_SHARES}"
            )));
        }
        if segment_size == 0 || !segment_size.is_multiple_of(16) || segment_size > MAX_SEGMENT_SIZE {
            return Err(CodecError::Params(format!(
                "segment size {segment_size} must be a positive multiple of 16, at most {MAX_SEGMENT_SIZE}"
            )));
        }
        Ok(Params {
            needed,
            total,
            segment_size,
        })
    }
}

/// Where every byte of a version and of each of its shares lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub params: Params,
    pub size: u64,
}

impl Layout {
    /// A version's layout, refused if it has more than [`MAX_SEGMENTS`]
    /// segments: every offset and length below then fits with room to spare.
    pub fn new(params: Params, size: u64) -> Result<Layout, CodecError> {
        let layout = Layout { params, size };
        if layout.num_segments() > MAX_SEGMENTS {
            return Err(CodecError::Params(format!(
                "{size} bytes in segments of {} is more than {MAX_SEGMENTS} segments",
                params.segment_size
            )));
        }
        Ok(layout)
    }

    pub fn num_segments(&self) -> u64 {
        self.size.div_ceil(self.params.segment_size as u64)
    }
    pub fn segment_offset(&self, segment: u64) -> u64 {
        segment * self.params.segment_size as u64
    }
    pub fn segment_len(&self, segment: u64) -> usize {
        let start = self.segment_offset(segment);
        (self.size - start).min(self.params.segment_size as u64) as usize
    }
    pub fn block_len(&self, segment: u64) -> usize {
        self.segment_len(segment).div_ceil(self.params.needed as usize)
    }
    fn full_block_len(&self) -> u64 {
        (self.params.segment_size as u64).div_ceil(self.params.needed as u64)
    }
    /// Offset of a block inside its share file.
    pub fn block_offset(&self, segment: u64) -> u64 {
        SHARE_MAGIC.len() as u64 + segment * self.full_block_len()
    }
    /// Offset of the trailer (header, share number, block hashes) in a share.
    pub fn trailer_offset(&self) -> u64 {
        match self.num_segments() {
            0 => SHARE_MAGIC.len() as u64,
            m => self.block_offset(m - 1) + self.block_len(m - 1) as u64,
        }
    }
    pub fn header_len(&self) -> u64 {
        HEADER_FIXED_LEN + 32 * self.params.total as u64
    }
    pub fn trailer_len(&self) -> u64 {
        self.header_len() + 2 + 32 * self.num_segments()
    }
    pub fn share_len(&self) -> u64 {
        self.trailer_offset() + self.trailer_len() + FOOTER_LEN
    }
}

const HEADER_FIXED_LEN: u64 = 8 + 1 + 2 + 2 + 4 + 8 + 32;
const HEADER_MAGIC: &[u8; 8] = b"CAIRNHD1";

/// What every share of a version carries identically. Its tagged hash is the
/// integrity root held in the capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub layout: Layout,
    /// SHA-256 of the plaintext, masked with a key-derived pad so servers
    /// cannot confirm a guessed file.
    pub masked_plaintext_hash: Hash,
    /// Root of each share's block hash tree, by share number.
    pub share_roots: Vec<Hash>,
}

impl Header {
    pub fn to_bytes(&self) -> Vec<u8> {
        let p = self.layout.params;
        let mut out = Vec::with_capacity(self.layout.header_len() as usize);
        out.extend_from_slice(HEADER_MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&p.needed.to_le_bytes());
        out.extend_from_slice(&p.total.to_le_bytes());
        out.extend_from_slice(&p.segment_size.to_le_bytes());
        out.extend_from_slice(&self.layout.size.to_le_bytes());
        out.extend_from_slice(&self.masked_plaintext_hash);
        for root in &self.share_roots {
            out.extend_from_slice(root);
        }
        out
    }

    pub fn root(&self) -> Hash {
        tagged_hash(b"cairn-v1-header", &[&self.to_bytes()])
    }
}

/// The read capability: everything a reader needs besides the servers.
#[derive(Clone, PartialEq, Eq)]
pub struct Capability {
    pub key: Key,
    pub root: Hash,
    pub layout: Layout,
}

impl fmt::Debug for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key in debug output or logs.
        f.debug_struct("Capability")
            .field("storage_index", &self.storage_index().to_string())
            .field("layout", &self.layout)
            .finish()
    }
}

const CAP_PREFIX: &str = "cairn:chk1:";

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.layout.params;
        write!(
            f,
            "{CAP_PREFIX}{}:{}:{}:{}:{}:{}",
            b32(&self.key),
            b32(&self.root),
            p.needed,
            p.total,
            self.layout.size,
            p.segment_size
        )
    }
}

impl FromStr for Capability {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, CodecError> {
        let bad =
            |what: &str| CodecError::Capability(format!("{what} (expected {CAP_PREFIX}KEY:ROOT:K:N:SIZE:SEGSIZE)"));
        let rest = s.trim().strip_prefix(CAP_PREFIX).ok_or_else(|| bad("unknown prefix"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        if parts.len() != 6 {
            return Err(bad("wrong number of fields"));
        }
        let key: Key = unb32(parts[0])
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("bad key"))?;
        let root: Hash = unb32(parts[1])
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("bad root"))?;
        let num = |i: usize, what: &str| parts[i].parse::<u64>().map_err(|_| bad(what));
        let needed = u16::try_from(num(2, "bad k")?).map_err(|_| bad("bad k"))?;
        let total = u16::try_from(num(3, "bad n")?).map_err(|_| bad("bad n"))?;
        let size = num(4, "bad size")?;
        let segment_size = u32::try_from(num(5, "bad segment size")?).map_err(|_| bad("bad segment size"))?;
        let params = Params::new(needed, total, segment_size).map_err(|e| CodecError::Capability(e.to_string()))?;
        let layout = Layout::new(params, size).map_err(|e| CodecError::Capability(e.to_string()))?;
        Ok(Capability { key, root, layout })
    }
}

/// What a file version's record names: a whole encoded version of its own,
/// or a byte range of a pack (one encoded version holding many small file
/// versions, so that a small file does not cost n share writes). A packed
/// version's bytes are verified as the pack's blocks are.
///
/// Since `pack2`, each member's bytes in the pack are encrypted under the
/// member's own key (`member_key`): the pack's key, which every member's
/// capability carries, then opens only other members' ciphertexts. `pack1`
/// members (`member_key: None`) lie in the pack as plaintext; they stay
/// readable.
///
/// `map1` (a `Mapped` version) is a list of segments, each held by some
/// encoded version: the segments that changed since the version it was
/// made from are in its own encoded version (`own`), followed there by
/// the manifest (`crate::manifest`) at `manifest_at`, which names where
/// every other segment lies. `own`'s root pins the manifest, and the
/// manifest pins every other object's root and every segment's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCap {
    Whole(Capability),
    Packed {
        pack: Capability,
        offset: u64,
        len: u64,
        member_key: Option<Key>,
    },
    Mapped {
        size: u64,
        manifest_at: u64,
        own: Capability,
    },
}

const PACK1_PREFIX: &str = "cairn:pack1:";
const PACK2_PREFIX: &str = "cairn:pack2:";
const MAP1_PREFIX: &str = "cairn:map1:";

impl FileCap {
    /// The encoded version on the grid that holds the bytes.
    pub fn stored(&self) -> &Capability {
        match self {
            FileCap::Whole(cap) | FileCap::Packed { pack: cap, .. } | FileCap::Mapped { own: cap, .. } => cap,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            FileCap::Whole(cap) => cap.layout.size,
            FileCap::Packed { len, .. } => *len,
            FileCap::Mapped { size, .. } => *size,
        }
    }

    /// Where the file's bytes `[from, from + len)` lie in the stored
    /// version's plaintext (`None` for a mapped version: its manifest says).
    pub fn stored_range(&self, from: u64, len: u64) -> Option<(u64, u64)> {
        let size = self.size();
        let from = from.min(size);
        let len = len.min(size - from);
        match self {
            FileCap::Whole(_) => Some((from, len)),
            FileCap::Packed { offset, .. } => Some((offset + from, len)),
            FileCap::Mapped { .. } => None,
        }
    }

    /// Turns bytes read from the stored version's plaintext at
    /// `stored_offset` (inside [`FileCap::stored_range`]) into the file's own.
    pub fn open_stored(&self, stored_offset: u64, bytes: &mut [u8]) {
        if let FileCap::Packed {
            offset,
            member_key: Some(key),
            ..
        } = self
        {
            apply_keystream(key, stored_offset - offset, bytes);
        }
    }
}

impl fmt::Display for FileCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileCap::Whole(cap) => write!(f, "{cap}"),
            FileCap::Packed {
                pack,
                offset,
                len,
                member_key: None,
            } => write!(f, "{PACK1_PREFIX}{offset}:{len}:{pack}"),
            FileCap::Packed {
                pack,
                offset,
                len,
                member_key: Some(key),
            } => write!(f, "{PACK2_PREFIX}{offset}:{len}:{}:{pack}", b32(key)),
            FileCap::Mapped { size, manifest_at, own } => write!(f, "{MAP1_PREFIX}{size}:{manifest_at}:{own}"),
        }
    }
}

impl FromStr for FileCap {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, CodecError> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix(MAP1_PREFIX) {
            return parse_mapped(rest);
        }
        let (rest, version) = match (s.strip_prefix(PACK1_PREFIX), s.strip_prefix(PACK2_PREFIX)) {
            (Some(rest), _) => (rest, 1),
            (_, Some(rest)) => (rest, 2),
            _ => return Ok(FileCap::Whole(s.parse()?)),
        };
        let bad = |what: &str| {
            let key = if version == 2 { "MEMBER-KEY:" } else { "" };
            CodecError::Capability(format!(
                "{what} (expected cairn:pack{version}:OFFSET:LEN:{key}PACK-CAP)"
            ))
        };
        let mut parts = rest.splitn(if version == 2 { 4 } else { 3 }, ':');
        let offset = next_num(&mut parts, || bad("bad offset"))?;
        let len = next_num(&mut parts, || bad("bad length"))?;
        let member_key = match version {
            2 => Some(
                parts
                    .next()
                    .and_then(unb32)
                    .and_then(|k| Key::try_from(k).ok())
                    .ok_or_else(|| bad("bad member key"))?,
            ),
            _ => None,
        };
        let pack: Capability = parts.next().ok_or_else(|| bad("no pack capability"))?.parse()?;
        if offset.checked_add(len).is_none_or(|end| end > pack.layout.size) {
            return Err(bad("range outside the pack"));
        }
        Ok(FileCap::Packed {
            pack,
            offset,
            len,
            member_key,
        })
    }
}

/// The next `:`-separated field of a capability, as a decimal number.
fn next_num<'a>(
    parts: &mut impl Iterator<Item = &'a str>,
    bad: impl FnOnce() -> CodecError,
) -> Result<u64, CodecError> {
    parts.next().and_then(|p| p.parse::<u64>().ok()).ok_or_else(bad)
}

fn parse_mapped(rest: &str) -> Result<FileCap, CodecError> {
    let bad = |what: &str| CodecError::Capability(format!("{what} (expected {MAP1_PREFIX}SIZE:MANIFEST-AT:CAP)"));
    let mut parts = rest.splitn(3, ':');
    let size = next_num(&mut parts, || bad("bad size"))?;
    let manifest_at = next_num(&mut parts, || bad("bad manifest offset"))?;
    let own: Capability = parts.next().ok_or_else(|| bad("no capability"))?.parse()?;
    if manifest_at >= own.layout.size {
        return Err(bad("manifest outside the version"));
    }
    if size.div_ceil(own.layout.params.segment_size as u64) > MAX_SEGMENTS {
        return Err(bad("too many segments"));
    }
    Ok(FileCap::Mapped { size, manifest_at, own })
}

/// Names a version's shares on servers. Derived from the key by a one-way
/// hash, so it reveals neither the key nor the file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageIndex(pub [u8; 16]);

impl fmt::Display for StorageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for StorageIndex {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let bytes = data_encoding::HEXLOWER.decode(s.as_bytes()).map_err(|_| ())?;
        Ok(StorageIndex(bytes.try_into().map_err(|_| ())?))
    }
}

impl Capability {
    pub fn storage_index(&self) -> StorageIndex {
        storage_index_for(&self.key)
    }
}

pub fn storage_index_for(key: &Key) -> StorageIndex {
    let h = tagged_hash(b"cairn-v1-storage-index", &[key]);
    StorageIndex(h[..16].try_into().expect("16 bytes"))
}

fn b32(bytes: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(bytes).to_ascii_lowercase()
}

fn unb32(s: &str) -> Option<Vec<u8>> {
    data_encoding::BASE32_NOPAD
        .decode(s.to_ascii_uppercase().as_bytes())
        .ok()
}

/// SHA-256 over a domain tag and the parts, each length-prefixed so no two
/// different inputs share an encoding.
pub fn tagged_hash(tag: &[u8], parts: &[&[u8]]) -> Hash {
    let mut h = Sha256::new();
    h.update((tag.len() as u64).to_le_bytes());
    h.update(tag);
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// Leaf of a share's block hash tree. Binds the block to its share number
/// and segment so blocks cannot be swapped between positions.
pub fn block_hash(share: u16, segment: u64, block: &[u8]) -> Hash {
    tagged_hash(
        b"cairn-v1-block",
        &[&share.to_le_bytes(), &segment.to_le_bytes(), block],
    )
}

/// Root of a binary Merkle tree over `leaves`. An odd node at the end of a
/// level is carried up unchanged.
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    if leaves.is_empty() {
        return tagged_hash(b"cairn-v1-empty-tree", &[]);
    }
    let mut level: Vec<Hash> = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => tagged_hash(b"cairn-v1-node", &[l, r]),
                [single] => *single,
                _ => unreachable!("chunks(2)"),
            })
            .collect();
    }
    level[0]
}

fn plaintext_hash_mask(key: &Key) -> Hash {
    tagged_hash(b"cairn-v1-plaintext-hash-mask", &[key])
}

fn xor32(a: &Hash, b: &Hash) -> Hash {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Encrypts or decrypts in place: AES-128-CTR over the whole version as one
/// stream, `offset` being the position of `data` in the plaintext. The key is
/// used for exactly one version, so a zero IV is safe.
pub fn apply_keystream(key: &Key, offset: u64, data: &mut [u8]) {
    let mut cipher = Aes128Ctr::new(key.into(), &[0u8; 16].into());
    cipher.seek(offset);
    cipher.apply_keystream(data);
}

/// Reed-Solomon over GF(2^8). `None` when total == needed: the blocks are then
/// the data shards alone (the crate refuses zero parity shards).
fn reed_solomon(params: Params) -> Option<ReedSolomon> {
    let parity = (params.total - params.needed) as usize;
    (parity > 0).then(|| ReedSolomon::new(params.needed as usize, parity).expect("params validated"))
}

/// Streams one version into `total` shares, a segment at a time.
pub struct VersionEncoder {
    layout: Layout,
    key: Key,
    rs: Option<ReedSolomon>,
    next_segment: u64,
    plaintext: Sha256,
    leaves: Vec<Vec<Hash>>,
}

/// The encoded version once every segment went through the encoder.
pub struct EncodedVersion {
    pub cap: Capability,
    pub plaintext_sha256: Hash,
    /// Per share: trailer and footer, to append after the last block.
    pub tails: Vec<Vec<u8>>,
}

impl VersionEncoder {
    pub fn new(params: Params, key: Key, size: u64) -> Self {
        let layout = Layout { params, size };
        let m = layout.num_segments() as usize;
        VersionEncoder {
            layout,
            key,
            rs: reed_solomon(params),
            next_segment: 0,
            plaintext: Sha256::new(),
            leaves: vec![Vec::with_capacity(m); params.total as usize],
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn storage_index(&self) -> StorageIndex {
        storage_index_for(&self.key)
    }

    /// Encodes the next segment; returns one block per share, by share number.
    pub fn encode_segment(&mut self, plaintext: &[u8]) -> Result<Vec<Vec<u8>>, CodecError> {
        let segment = self.next_segment;
        if segment >= self.layout.num_segments() || plaintext.len() != self.layout.segment_len(segment) {
            return Err(CodecError::Segment {
                segment,
                what: format!("unexpected length {}", plaintext.len()),
            });
        }
        let (blocks, hashes) = encode_and_hash(self, segment, plaintext);
        for (leaves, h) in self.leaves.iter_mut().zip(hashes) {
            leaves.push(h);
        }
        self.next_segment += 1;
        Ok(blocks)
    }

    pub fn finish(self) -> Result<EncodedVersion, CodecError> {
        if self.next_segment != self.layout.num_segments() {
            return Err(CodecError::Segment {
                segment: self.next_segment,
                what: "version finished before its last segment".into(),
            });
        }
        let plaintext_sha256: Hash = self.plaintext.finalize().into();
        let header = Header {
            layout: self.layout,
            masked_plaintext_hash: xor32(&plaintext_sha256, &plaintext_hash_mask(&self.key)),
            share_roots: self.leaves.iter().map(|l| merkle_root(l)).collect(),
        };
        let header_bytes = header.to_bytes();
        let tails = self
            .leaves
            .iter()
            .enumerate()
            .map(|(share, leaves)| {
                let mut t = Vec::with_capacity((self.layout.trailer_len() + FOOTER_LEN) as usize);
                t.extend_from_slice(&header_bytes);
                t.extend_from_slice(&(share as u16).to_le_bytes());
                for h in leaves {
                    t.extend_from_slice(h);
                }
                t.extend_from_slice(&footer_bytes(self.layout));
                t
            })
            .collect();
        Ok(EncodedVersion {
            cap: Capability {
                key: self.key,
                root: header.root(),
                layout: self.layout,
            },
            plaintext_sha256,
            tails,
        })
    }
}

fn encode_blocks(layout: Layout, rs: Option<&ReedSolomon>, key: &Key, segment: u64, plaintext: &[u8]) -> Vec<Vec<u8>> {
    let n = layout.params.total as usize;
    let block_len = layout.block_len(segment);
    let offset = layout.segment_offset(segment);
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(n);
    // Data blocks: plaintext slices, zero-padded, encrypted in place.
    for i in 0..layout.params.needed as usize {
        let start = (i * block_len).min(plaintext.len());
        let end = ((i + 1) * block_len).min(plaintext.len());
        let mut block = Vec::with_capacity(block_len);
        block.extend_from_slice(&plaintext[start..end]);
        apply_keystream(key, offset + start as u64, &mut block);
        block.resize(block_len, 0);
        blocks.push(block);
    }
    blocks.resize_with(n, || vec![0u8; block_len]);
    if let Some(rs) = rs {
        rs.encode(&mut blocks).expect("shard sizes are equal");
    }
    blocks
}

/// Encodes a segment and hashes the plaintext (into the running file hash)
/// and every block (into its leaf). SHA-256 is the codec's most expensive
/// step, so with enough work a helper thread hashes the plaintext while this
/// one encodes, then both take blocks to hash from a shared counter.
fn encode_and_hash(enc: &mut VersionEncoder, segment: u64, plaintext: &[u8]) -> (Vec<Vec<u8>>, Vec<Hash>) {
    let (layout, rs, key) = (enc.layout, enc.rs.as_ref(), &enc.key);
    let n = layout.params.total as usize;
    if plaintext.len() < 128 * 1024 {
        enc.plaintext.update(plaintext);
        let blocks = encode_blocks(layout, rs, key, segment, plaintext);
        let hashes = (0..n).map(|i| block_hash(i as u16, segment, &blocks[i])).collect();
        return (blocks, hashes);
    }
    let ready = std::sync::OnceLock::<Vec<Vec<u8>>>::new();
    let (signal, wait) = std::sync::mpsc::channel::<()>();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let take_blocks = |blocks: &Vec<Vec<u8>>| {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= n {
                return done;
            }
            done.push((i, block_hash(i as u16, segment, &blocks[i])));
        }
    };
    let file_hash = &mut enc.plaintext;
    let (ready_ref, take_ref) = (&ready, &take_blocks);
    let (mut found, helper_found) = std::thread::scope(|s| {
        let helper = s.spawn(move || {
            file_hash.update(plaintext);
            // A closed channel means the encoder panicked; that panic wins.
            wait.recv()
                .ok()
                .map(|()| take_ref(ready_ref.get().expect("set before signal")))
        });
        let blocks = ready.get_or_init(|| encode_blocks(layout, rs, key, segment, plaintext));
        let _ = signal.send(());
        let found = take_blocks(blocks);
        (found, helper.join().expect("hash thread").unwrap_or_default())
    });
    found.extend(helper_found);
    found.sort_by_key(|(i, _)| *i);
    let blocks = ready.into_inner().expect("encoded");
    (blocks, found.into_iter().map(|(_, h)| h).collect())
}

/// Checks trailers and blocks against a capability, and decodes segments.
pub struct VersionDecoder {
    cap: Capability,
    rs: Option<ReedSolomon>,
    header: Option<Header>,
    /// Verified block hashes, per share number, once its trailer checked out.
    leaves: Vec<Option<Vec<Hash>>>,
}

impl VersionDecoder {
    pub fn new(cap: Capability) -> Self {
        let n = cap.layout.params.total as usize;
        VersionDecoder {
            rs: reed_solomon(cap.layout.params),
            cap,
            header: None,
            leaves: vec![None; n],
        }
    }

    pub fn layout(&self) -> Layout {
        self.cap.layout
    }

    pub fn has_trailer(&self, share: u16) -> bool {
        self.leaves.get(share as usize).is_some_and(Option::is_some)
    }

    /// Checks the trailer of `share` (without the footer) against the
    /// capability's root and remembers its block hashes.
    pub fn accept_trailer(&mut self, share: u16, trailer: &[u8]) -> Result<(), CodecError> {
        let layout = self.cap.layout;
        let corrupt = |what: &str| CodecError::CorruptShare {
            share,
            what: what.to_string(),
        };
        if share >= layout.params.total {
            return Err(corrupt("share number out of range"));
        }
        if trailer.len() as u64 != layout.trailer_len() {
            return Err(corrupt("trailer has the wrong length"));
        }
        let header_len = layout.header_len() as usize;
        let header_bytes = &trailer[..header_len];
        if tagged_hash(b"cairn-v1-header", &[header_bytes]) != self.cap.root {
            return Err(corrupt("header does not match the capability's integrity root"));
        }
        let stored_share = u16::from_le_bytes([trailer[header_len], trailer[header_len + 1]]);
        if stored_share != share {
            return Err(corrupt("share number in the trailer differs from its name"));
        }
        let header = self.header.get_or_insert_with(|| parse_header(layout, header_bytes));
        let leaves: Vec<Hash> = trailer[header_len + 2..]
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        if merkle_root(&leaves) != header.share_roots[share as usize] {
            return Err(corrupt("block hashes do not match the share's root"));
        }
        self.leaves[share as usize] = Some(leaves);
        Ok(())
    }

    pub fn verify_block(&self, share: u16, segment: u64, block: &[u8]) -> Result<(), CodecError> {
        let leaves = self.leaves[share as usize].as_ref().ok_or(CodecError::CorruptShare {
            share,
            what: "trailer not verified".into(),
        })?;
        let ok = block.len() == self.cap.layout.block_len(segment)
            && leaves.get(segment as usize) == Some(&block_hash(share, segment, block));
        if ok {
            Ok(())
        } else {
            Err(CodecError::CorruptShare {
                share,
                what: format!("block {segment} does not match its hash"),
            })
        }
    }

    /// Checks only that a block has its segment's block length, for a
    /// caller that checks the decoded segment against a hash of its own.
    pub fn check_block_len(&self, share: u16, segment: u64, block: &[u8]) -> Result<(), CodecError> {
        let want = self.cap.layout.block_len(segment);
        match block.len() == want {
            true => Ok(()),
            false => Err(CodecError::CorruptShare {
                share,
                what: format!("block {segment} is {} bytes, not {want}", block.len()),
            }),
        }
    }

    /// Rebuilds one plaintext segment from blocks, indexed by share
    /// number; at least `needed` must be present, each of the block length
    /// (verified, or the caller checks what comes out). The blocks given
    /// stay where they are (missing data blocks are rebuilt beside them),
    /// so a caller that checks the plaintext can check them after.
    pub fn decode_segment(&self, segment: u64, blocks: &mut [Option<Vec<u8>>]) -> Result<Vec<u8>, CodecError> {
        let layout = self.cap.layout;
        let k = layout.params.needed as usize;
        let present = blocks.iter().filter(|b| b.is_some()).count();
        if present < k {
            return Err(CodecError::Segment {
                segment,
                what: format!("{present} blocks, {k} needed"),
            });
        }
        if blocks[..k].iter().any(Option::is_none) {
            let rs = self.rs.as_ref().expect("missing data shards imply parity exists");
            rs.reconstruct_data(blocks).map_err(|e| CodecError::Segment {
                segment,
                what: format!("reconstruction failed: {e:?}"),
            })?;
        }
        let seg_len = layout.segment_len(segment);
        let mut out = Vec::with_capacity(seg_len);
        for b in blocks.iter().take(k) {
            out.extend_from_slice(b.as_deref().expect("reconstructed"));
        }
        out.truncate(seg_len);
        apply_keystream(&self.cap.key, layout.segment_offset(segment), &mut out);
        Ok(out)
    }

    /// The plaintext SHA-256 the uploader recorded, once a trailer was accepted.
    pub fn plaintext_sha256(&self) -> Option<Hash> {
        self.header
            .as_ref()
            .map(|h| xor32(&h.masked_plaintext_hash, &plaintext_hash_mask(&self.cap.key)))
    }
}

fn parse_header(layout: Layout, bytes: &[u8]) -> Header {
    // Only called on bytes whose hash matched the capability, so they were
    // produced by `Header::to_bytes` for this layout.
    let fixed = HEADER_FIXED_LEN as usize;
    Header {
        layout,
        masked_plaintext_hash: bytes[fixed - 32..fixed].try_into().expect("32 bytes"),
        share_roots: bytes[fixed..]
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect(),
    }
}

/// The last bytes of every share: where its trailer is, and a magic.
pub fn footer_bytes(layout: Layout) -> [u8; FOOTER_LEN as usize] {
    let mut footer = [0u8; FOOTER_LEN as usize];
    footer[..8].copy_from_slice(&layout.trailer_offset().to_le_bytes());
    footer[8..16].copy_from_slice(&layout.trailer_len().to_le_bytes());
    footer[16..].copy_from_slice(FOOTER_MAGIC);
    footer
}

/// Splits a complete share file into (trailer, per-segment blocks), checking
/// the framing (magic and footer); blocks and trailer are checked by hash. Used by whole-share checks and by tests.
pub fn split_share(layout: Layout, share: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    if share.len() as u64 != layout.share_len() || &share[..8] != SHARE_MAGIC {
        return None;
    }
    let blocks = (0..layout.num_segments())
        .map(|j| {
            let off = layout.block_offset(j) as usize;
            &share[off..off + layout.block_len(j)]
        })
        .collect();
    let t = layout.trailer_offset() as usize;
    let trailer = &share[t..t + layout.trailer_len() as usize];
    (share[share.len() - FOOTER_LEN as usize..] == footer_bytes(layout)[..]).then_some((trailer, blocks))
}

/// Encodes a whole in-memory version into complete share files.
pub fn encode_all(params: Params, key: Key, data: &[u8]) -> (Capability, Vec<Vec<u8>>) {
    let mut enc = VersionEncoder::new(params, key, data.len() as u64);
    let layout = enc.layout();
    let mut shares: Vec<Vec<u8>> = vec![SHARE_MAGIC.to_vec(); params.total as usize];
    for j in 0..layout.num_segments() {
        let off = layout.segment_offset(j) as usize;
        let blocks = enc
            .encode_segment(&data[off..off + layout.segment_len(j)])
            .expect("lengths follow the layout");
        for (s, b) in shares.iter_mut().zip(blocks) {
            s.extend_from_slice(&b);
        }
    }
    let done = enc.finish().expect("all segments encoded");
    for (s, t) in shares.iter_mut().zip(done.tails) {
        s.extend_from_slice(&t);
    }
    (done.cap, shares)
}

/// Decodes a whole version from complete share files (`None` = missing),
/// skipping shares that fail verification.
pub fn decode_all(cap: &Capability, shares: &[Option<&[u8]>]) -> Result<Vec<u8>, CodecError> {
    let layout = cap.layout;
    let mut dec = VersionDecoder::new(cap.clone());
    let mut usable: Vec<(u16, Vec<&[u8]>)> = Vec::new();
    for (i, share) in shares.iter().enumerate() {
        let Some(share) = share else { continue };
        let Some((trailer, blocks)) = split_share(layout, share) else {
            continue;
        };
        if dec.accept_trailer(i as u16, trailer).is_ok() {
            usable.push((i as u16, blocks));
        }
    }
    let mut out = Vec::with_capacity(layout.size as usize);
    for j in 0..layout.num_segments() {
        let mut blocks = vec![None; layout.params.total as usize];
        let mut have = 0;
        for (i, share_blocks) in &usable {
            if have == layout.params.needed {
                break;
            }
            let b = share_blocks[j as usize];
            if dec.verify_block(*i, j, b).is_ok() {
                blocks[*i as usize] = Some(b.to_vec());
                have += 1;
            }
        }
        out.extend_from_slice(&dec.decode_segment(j, &mut blocks)?);
    }
    // A version with no segments still has trailers to check.
    let expected = dec.plaintext_sha256().ok_or(CodecError::Segment {
        segment: 0,
        what: "no share with a valid trailer".into(),
    })?;
    if Sha256::digest(&out).as_slice() != expected {
        return Err(CodecError::PlaintextMismatch);
    }
    Ok(out)
}
