//! What a device writes on the servers (docs/FORMAT.md, "Device logs"):
//! its log, one immutable record per publication; its head, naming its
//! newest record; and the drive's doorbell, rung after each publication
//! so others know to look.
//!
//! A record is encrypted with a key of its own (from the root capability,
//! its device, number and a random nonce), chained to the record before it
//! by hash, and signed by its device's key. So a server can withhold
//! records or serve old heads, but cannot forge, alter, reorder or splice
//! them: a reader checks the signature, that the record is the one its
//! name asks for, and the chain. Names are hashes of the secret, so a
//! server learns neither device ids nor anything of the drive.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::device::{self, Identity, PublicKey, SIGNATURE_LEN};
use super::merge::{DeviceId, Op, Record};
use crate::codec::{apply_keystream, tagged_hash, Key};
use crate::grid::MAX_RECORD;
use crate::namespace::RootCap;

const LOG_MAGIC: &[u8; 8] = b"CAIRNLG1";
const HEAD_MAGIC: &[u8; 8] = b"CAIRNDH1";
const BELL_MAGIC: &[u8; 8] = b"CAIRNBL1";
/// A stub at a long record's name: its length follows.
const STUB_MAGIC: &[u8; 8] = b"CAIRNLS1";
const STUB_LEN: usize = 8 + 8;
const NONCE_LEN: usize = 16;
/// Magic, device, number, link, nonce, length.
const LOG_HEADER: usize = 8 + 16 + 8 + 32 + NONCE_LEN + 4;
/// Magic, device, number, link, time, nonce, length.
const HEAD_HEADER: usize = 8 + 16 + 8 + 32 + 8 + NONCE_LEN + 4;
/// The most a record's payload holds when the record is to fit in one
/// server record; records are filled up to this.
pub const MAX_PAYLOAD: usize = MAX_RECORD as usize - LOG_HEADER - SIGNATURE_LEN;
/// The longest record: one operation alone can need more than
/// [`MAX_PAYLOAD`] (a 64 KiB extended attribute is up to 256 KiB as JSON).
/// Such a record is stored in parts of [`MAX_RECORD`] bytes.
pub const MAX_LONG_RECORD: usize = 4 << 20;
const MAX_LONG_PAYLOAD: usize = MAX_LONG_RECORD - LOG_HEADER - SIGNATURE_LEN;

/// The hash that chains a record to the next (and that heads and other
/// devices' records name it by).
pub type Link = [u8; 32];
/// What record 1 is chained to.
pub const NO_LINK: Link = [0; 32];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("not a {0} (wrong magic or too short)")]
    NotOne(&'static str),
    #[error("signature does not verify (forged or altered)")]
    BadSignature,
    #[error("the record is {found}, not the {asked} its name asks for (moved by the server)")]
    Misplaced { asked: String, found: String },
    #[error("record 1 does not enrol its device with this drive's secret")]
    NotEnrolled,
    #[error("only record 1 enrols a device")]
    LateEnrolment,
    #[error("payload: {0}")]
    Payload(String),
    #[error("payload of {0} bytes, more than a record holds ({MAX_LONG_PAYLOAD})")]
    TooLarge(usize),
    #[error("an operation no machine of this drive logs: {0}")]
    BadOp(String),
}

/// How record 1 makes its device's key known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    pub key: PublicKey,
    /// [`device::enrol`]: proof that a holder of the secret added the key.
    pub mac: [u8; 32],
}

/// Another device's record that the author had merged: its number and
/// link, so a reader who has a different record under that number knows
/// the log was forked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub device: DeviceId,
    pub seq: u64,
    pub link: Link,
}

/// A record's content, JSON inside the encryption.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrol: Option<Enrolment>,
    pub seen: Vec<Seen>,
    /// Each operation with its hybrid time.
    pub ops: Vec<(u64, Op)>,
}

/// A record as read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub record: Record,
    pub payload: Payload,
    /// The record's own link and the one it is chained to.
    pub link: Link,
    pub prev: Link,
}

pub fn link(bytes: &[u8]) -> Link {
    tagged_hash(b"cairn-v1-log-link", &[bytes])
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// The short name of the drive on servers.
fn drive_tag(root: &RootCap) -> String {
    hex(&root.derive(b"cairn-v1-drive-name", &[])[..8])
}

fn device_tag(root: &RootCap, device: DeviceId) -> String {
    hex(&root.derive(b"cairn-v1-device-name", &[&device.to_be_bytes()])[..8])
}

pub fn log_name(root: &RootCap, device: DeviceId, seq: u64) -> String {
    format!("log-{}-{}-{seq:016x}", drive_tag(root), device_tag(root, device))
}

/// Part `i` (from 0) of long record `seq`.
fn part_name(root: &RootCap, device: DeviceId, seq: u64, i: usize) -> String {
    format!(
        "logpart-{}-{}-{seq:016x}-{i:04}",
        drive_tag(root),
        device_tag(root, device)
    )
}

/// What holds record `seq` (sealed `bytes`) on a server, in the order
/// to write it: the record alone at its name if it fits in one server
/// record; else its parts, then (last, so no server has a stub without
/// its parts) a stub at its name saying how long it is. Nothing of a
/// stub or a part is trusted: the reassembled record is checked whole.
pub fn stored_as(root: &RootCap, device: DeviceId, seq: u64, bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let name = log_name(root, device, seq);
    if bytes.len() as u64 <= MAX_RECORD {
        return vec![(name, bytes.to_vec())];
    }
    let mut out: Vec<_> = bytes
        .chunks(MAX_RECORD as usize)
        .enumerate()
        .map(|(i, part)| (part_name(root, device, seq, i), part.to_vec()))
        .collect();
    let mut stub = STUB_MAGIC.to_vec();
    stub.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.push((name, stub));
    out
}

/// If `stored` (read at record `seq`'s name) is a long record's stub: the
/// names and lengths of its parts, in order. A stub naming a length no
/// cairn writes is refused.
pub fn parts(
    root: &RootCap,
    device: DeviceId,
    seq: u64,
    stored: &[u8],
) -> Result<Option<Vec<(String, usize)>>, LogError> {
    if !stored.starts_with(STUB_MAGIC) {
        return Ok(None);
    }
    let len = match stored.get(8..STUB_LEN) {
        Some(b) if stored.len() == STUB_LEN => u64::from_be_bytes(b.try_into().expect("8 bytes")),
        _ => return Err(LogError::NotOne("long record's stub")),
    };
    if len <= MAX_RECORD || len > MAX_LONG_RECORD as u64 {
        return Err(LogError::NotOne("long record's stub"));
    }
    let (len, part) = (len as usize, MAX_RECORD as usize);
    Ok(Some(
        (0..len.div_ceil(part))
            .map(|i| (part_name(root, device, seq, i), part.min(len - i * part)))
            .collect(),
    ))
}

/// The names a record may occupy, for deleting it: its own and, if it was
/// `len` bytes long, its parts'.
pub fn names_of(root: &RootCap, device: DeviceId, seq: u64, len: usize) -> Vec<String> {
    let mut names = vec![log_name(root, device, seq)];
    if len as u64 > MAX_RECORD {
        names.extend((0..len.div_ceil(MAX_RECORD as usize)).map(|i| part_name(root, device, seq, i)));
    }
    names
}

/// The names of every head of this drive start with this.
pub fn head_prefix(root: &RootCap) -> String {
    format!("head-{}-", drive_tag(root))
}

pub fn head_name(root: &RootCap, device: DeviceId) -> String {
    format!("{}{}", head_prefix(root), device_tag(root, device))
}

pub fn bell_name(root: &RootCap) -> String {
    format!("bell-{}", drive_tag(root))
}

fn cipher_key(root: &RootCap, tag: &[u8], device: DeviceId, seq: u64, nonce: &[u8]) -> Key {
    let h = root.derive(tag, &[&device.to_be_bytes(), &seq.to_be_bytes(), nonce]);
    h[..16].try_into().expect("16 bytes")
}

/// Reads big-endian integers and fixed fields from a checked-length slice.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn u128(&mut self) -> u128 {
        u128::from_be_bytes(self.take(16).try_into().expect("16 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take(8).try_into().expect("8 bytes"))
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().expect("4 bytes"))
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        self.take(N).try_into().expect("N bytes")
    }
    /// The rest, after its (already checked) length: decrypted.
    fn decrypt(mut self, key: &Key) -> Vec<u8> {
        self.u32();
        let mut plain = self.0.to_vec();
        apply_keystream(key, 0, &mut plain);
        plain
    }
}

/// Encrypts `plain` after `header` (which ends where its length goes),
/// then signs it all.
fn seal(me: &Identity, mut out: Vec<u8>, key: &Key, mut plain: Vec<u8>) -> Vec<u8> {
    apply_keystream(key, 0, &mut plain);
    out.extend_from_slice(&(plain.len() as u32).to_be_bytes());
    out.extend_from_slice(&plain);
    let signature = me.sign(&out);
    out.extend_from_slice(&signature);
    out
}

/// Splits `bytes` into the signed part and the signature, and checks that
/// the length field (the last 4 bytes of `header` long header) matches.
fn framed<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    header: usize,
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), LogError> {
    if bytes.len() < header + SIGNATURE_LEN || !bytes.starts_with(magic) {
        return Err(LogError::NotOne(what));
    }
    let (signed, signature) = bytes.split_at(bytes.len() - SIGNATURE_LEN);
    let len = u32::from_be_bytes(signed[header - 4..header].try_into().expect("4 bytes")) as usize;
    if len != signed.len() - header {
        return Err(LogError::NotOne(what));
    }
    Ok((signed, signature))
}

/// Record `seq` of `me`'s log, chained to `prev`.
pub fn seal_record(
    root: &RootCap,
    me: &Identity,
    seq: u64,
    prev: &Link,
    payload: &Payload,
) -> Result<Vec<u8>, LogError> {
    let plain = serde_json::to_vec(payload).expect("payloads serialise");
    if plain.len() > MAX_LONG_PAYLOAD {
        return Err(LogError::TooLarge(plain.len()));
    }
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut out = LOG_MAGIC.to_vec();
    out.extend_from_slice(&me.id.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(prev);
    out.extend_from_slice(&nonce);
    let key = cipher_key(root, b"cairn-v1-log-enc", me.id, seq, &nonce);
    Ok(seal(me, out, &key, plain))
}

/// Record `seq` of `device`'s log, checked: signed by `key` (for record 1,
/// by the key it enrols with this drive's secret) and really that record.
/// The caller checks the chain (`prev` against the link it knows).
pub fn open_record(
    root: &RootCap,
    bytes: &[u8],
    device: DeviceId,
    seq: u64,
    key_of_device: Option<&PublicKey>,
) -> Result<Opened, LogError> {
    if bytes.len() > MAX_LONG_RECORD {
        return Err(LogError::NotOne("log record"));
    }
    let (signed, signature) = framed(bytes, LOG_MAGIC, LOG_HEADER, "log record")?;
    let mut f = Fields(&signed[8..]);
    let (found_device, found_seq, prev, nonce) = (f.u128(), f.u64(), f.array::<32>(), f.array::<NONCE_LEN>());
    if (found_device, found_seq) != (device, seq) {
        return Err(LogError::Misplaced {
            asked: format!("record {seq} of {device:032x}"),
            found: format!("record {found_seq} of {found_device:032x}"),
        });
    }
    let plain = f.decrypt(&cipher_key(root, b"cairn-v1-log-enc", device, seq, &nonce));
    // Record 1 names its key, so it is decrypted before its signature can
    // be checked; nothing of it is used until both hold.
    let payload: Result<Payload, _> = serde_json::from_slice(&plain);
    let key = match (seq, key_of_device, payload.as_ref().ok().and_then(|p| p.enrol.as_ref())) {
        (1, _, Some(e)) if device::enrolled(root, device, &e.key, &e.mac) && prev == NO_LINK => e.key,
        (1, _, _) => return Err(LogError::NotEnrolled),
        (_, Some(key), _) => *key,
        (_, None, _) => return Err(LogError::BadSignature),
    };
    if !device::verify(&key, signed, signature) {
        return Err(LogError::BadSignature);
    }
    let payload = payload.map_err(|e| LogError::Payload(e.to_string()))?;
    if seq != 1 && payload.enrol.is_some() {
        return Err(LogError::LateEnrolment);
    }
    for (_, op) in &payload.ops {
        crate::sync::merge::check(op).map_err(LogError::BadOp)?;
    }
    let record = Record {
        device,
        seq,
        seen: payload.seen.iter().map(|s| (s.device, s.seq)).collect(),
        ops: payload.ops.clone(),
    };
    Ok(Opened {
        record,
        payload,
        link: link(bytes),
        prev,
    })
}

/// What a head's encrypted part says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadBody {
    /// The device's newest checkpoint, if any: the state of its own
    /// records up to `seq`, stored as a version (sync::checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// Its older checkpoints still kept (one a day), newest first: for a
    /// machine that must stop before the newest (a revocation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub older: Vec<Checkpoint>,
    /// Its records 2 to `pruned` are gone from the servers (retention):
    /// a machine that has merged fewer reads a checkpoint instead.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pruned: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A checkpoint as its device's head names it: signed there, so its
/// capability (which pins its bytes) is the device's word.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    /// The link of record `seq`, so record `seq + 1` chains on.
    #[serde(with = "hex_link")]
    pub link: Link,
    pub cap: String,
}

/// A link as 64 hex digits (heads, checkpoints).
pub(super) mod hex_link {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(link: &super::Link, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(link))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<super::Link, D::Error> {
        let text = String::deserialize(d)?;
        data_encoding::HEXLOWER
            .decode(text.as_bytes())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("a link is 64 hex digits"))
    }
}

/// A device's newest record, as its head says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub device: DeviceId,
    pub seq: u64,
    pub link: Link,
    pub time_ns: i64,
    pub body: HeadBody,
}

pub fn seal_head(root: &RootCap, me: &Identity, head: &Head) -> Vec<u8> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut out = HEAD_MAGIC.to_vec();
    out.extend_from_slice(&me.id.to_be_bytes());
    out.extend_from_slice(&head.seq.to_be_bytes());
    out.extend_from_slice(&head.link);
    out.extend_from_slice(&head.time_ns.to_be_bytes());
    out.extend_from_slice(&nonce);
    let key = cipher_key(root, b"cairn-v1-head-enc", me.id, head.seq, &nonce);
    seal(me, out, &key, serde_json::to_vec(&head.body).expect("heads serialise"))
}

/// The device a head says it is of, before it is checked: the reader
/// needs it to find the device's key.
pub fn head_device(bytes: &[u8]) -> Result<DeviceId, LogError> {
    let (signed, _) = framed(bytes, HEAD_MAGIC, HEAD_HEADER, "head")?;
    Ok(Fields(&signed[8..]).u128())
}

/// The head of `device`, signed by its `key`.
pub fn open_head(root: &RootCap, bytes: &[u8], device: DeviceId, key: &PublicKey) -> Result<Head, LogError> {
    let (signed, signature) = framed(bytes, HEAD_MAGIC, HEAD_HEADER, "head")?;
    if !device::verify(key, signed, signature) {
        return Err(LogError::BadSignature);
    }
    let mut f = Fields(&signed[8..]);
    let (found, seq, link, time_ns, nonce) = (
        f.u128(),
        f.u64(),
        f.array::<32>(),
        f.u64() as i64,
        f.array::<NONCE_LEN>(),
    );
    if found != device {
        return Err(LogError::Misplaced {
            asked: format!("head of {device:032x}"),
            found: format!("head of {found:032x}"),
        });
    }
    let plain = f.decrypt(&cipher_key(root, b"cairn-v1-head-enc", device, seq, &nonce));
    let body = serde_json::from_slice(&plain).map_err(|e| LogError::Payload(e.to_string()))?;
    Ok(Head {
        device,
        seq,
        link,
        time_ns,
        body,
    })
}

/// What a head says against what this machine has merged of its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum News {
    /// Records `from..=to` are new.
    Ahead {
        from: u64,
        to: u64,
    },
    Nothing,
    /// Older than what was merged: a server serving an old head.
    Stale,
    /// Another record under a number already merged: the device's log
    /// was forked (a copied home) or forged.
    Fork,
}

/// `merged`: the number and link of the device's newest record merged
/// here (none yet: `(0, NO_LINK)`).
pub fn news(merged: (u64, Link), head: &Head) -> News {
    match head.seq.cmp(&merged.0) {
        std::cmp::Ordering::Greater => News::Ahead {
            from: merged.0 + 1,
            to: head.seq,
        },
        std::cmp::Ordering::Equal if head.link == merged.1 => News::Nothing,
        std::cmp::Ordering::Equal => News::Fork,
        std::cmp::Ordering::Less => News::Stale,
    }
}

fn bell_mac(root: &RootCap, body: &[u8]) -> Hmac<Sha256> {
    let key = root.derive(b"cairn-v1-bell-mac", &[]);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("any key length");
    mac.update(body);
    mac
}

/// The doorbell: a random token and the time, with a MAC (anyone with
/// the secret may ring; a server may replay an old ring, which only
/// costs a look).
pub fn seal_bell(root: &RootCap, time_ns: i64) -> Vec<u8> {
    let mut out = BELL_MAGIC.to_vec();
    out.extend_from_slice(&rand::random::<[u8; 16]>());
    out.extend_from_slice(&time_ns.to_be_bytes());
    let mac = bell_mac(root, &out).finalize().into_bytes();
    out.extend_from_slice(&mac);
    out
}

/// Whether `bytes` is a bell rung with this drive's secret.
pub fn bell_rung(root: &RootCap, bytes: &[u8]) -> bool {
    let body = 8 + 16 + 8;
    bytes.len() == body + 32
        && bytes.starts_with(BELL_MAGIC)
        && bell_mac(root, &bytes[..body]).verify_slice(&bytes[body..]).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Kind;
    use crate::sync::merge::{Attrs, Content};

    fn payload(me: &Identity, root: &RootCap, seq: u64) -> Payload {
        Payload {
            enrol: (seq == 1).then(|| Enrolment {
                key: me.public(),
                mac: device::enrol(root, me.id, &me.public()),
            }),
            seen: vec![Seen {
                device: 7,
                seq: 3,
                link: [9; 32],
            }],
            ops: vec![
                (
                    1_000,
                    Op::Create {
                        fid: u128::MAX,
                        kind: Kind::File,
                        parent: 0,
                        name: "report.docx".into(),
                        attrs: Attrs {
                            mode: 0o644,
                            ..Attrs::default()
                        },
                    },
                ),
                (
                    1_001,
                    Op::Version {
                        fid: u128::MAX,
                        vid: 5,
                        base: None,
                        content: Content {
                            cap: "cairn:chk1:x".into(),
                            size: 3,
                            sha256: "ab".into(),
                        },
                    },
                ),
            ],
        }
    }

    #[test]
    fn a_record_opens_as_it_was_sealed_and_chains() {
        let root = RootCap::generate();
        let me = Identity::generate();
        let one = seal_record(&root, &me, 1, &NO_LINK, &payload(&me, &root, 1)).unwrap();
        let opened = open_record(&root, &one, me.id, 1, None).unwrap();
        assert_eq!(opened.payload, payload(&me, &root, 1));
        assert_eq!(opened.record.seen.get(&7), Some(&3));
        assert_eq!(opened.record.ops.len(), 2);
        assert_eq!(opened.prev, NO_LINK);
        let two = seal_record(&root, &me, 2, &opened.link, &payload(&me, &root, 2)).unwrap();
        let second = open_record(&root, &two, me.id, 2, Some(&me.public())).unwrap();
        assert_eq!(second.prev, opened.link);
        // A nonce per record: one payload twice is two ciphertexts.
        let again = seal_record(&root, &me, 2, &opened.link, &payload(&me, &root, 2)).unwrap();
        assert_ne!(again[LOG_HEADER..], two[LOG_HEADER..]);
        // Names say nothing of the device but differ by it.
        assert_ne!(log_name(&root, me.id, 1), log_name(&root, me.id + 1, 1));
        assert!(!log_name(&root, me.id, 1).contains(&format!("{:x}", me.id)));
        assert!(head_name(&root, me.id).starts_with(&head_prefix(&root)));
    }

    #[test]
    fn a_signed_record_with_an_operation_no_machine_logs_is_refused() {
        let root = RootCap::generate();
        let me = Identity::generate();
        let mut p = payload(&me, &root, 2);
        p.ops.push((9, Op::Delete { fid: 5 }));
        let fine = seal_record(&root, &me, 2, &NO_LINK, &p).unwrap();
        assert!(open_record(&root, &fine, me.id, 2, Some(&me.public())).is_ok());
        p.ops.push((
            10,
            Op::Move {
                fid: 5,
                parent: 0,
                name: "../../etc".into(),
                from: (0, "a".into()),
            },
        ));
        let bad = seal_record(&root, &me, 2, &NO_LINK, &p).unwrap();
        assert!(matches!(
            open_record(&root, &bad, me.id, 2, Some(&me.public())),
            Err(LogError::BadOp(_))
        ));
    }

    #[test]
    fn any_changed_byte_of_a_record_is_refused() {
        let root = RootCap::generate();
        let me = Identity::generate();
        for seq in [1, 2] {
            let key = (seq == 2).then(|| me.public());
            let bytes = seal_record(&root, &me, seq, &NO_LINK, &payload(&me, &root, seq)).unwrap();
            for i in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[i] ^= 0x20;
                assert!(
                    open_record(&root, &bad, me.id, seq, key.as_ref()).is_err(),
                    "byte {i} of record {seq}"
                );
            }
            for cut in [0, 10, LOG_HEADER, bytes.len() - 1] {
                assert!(open_record(&root, &bytes[..cut], me.id, seq, key.as_ref()).is_err());
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(open_record(&root, &longer, me.id, seq, key.as_ref()).is_err());
        }
    }

    #[test]
    fn a_record_is_refused_under_another_name_key_or_drive() {
        let root = RootCap::generate();
        let me = Identity::generate();
        let other = Identity::generate();
        let two = seal_record(&root, &me, 2, &NO_LINK, &payload(&me, &root, 2)).unwrap();
        assert!(matches!(
            open_record(&root, &two, me.id, 3, Some(&me.public())),
            Err(LogError::Misplaced { .. })
        ));
        assert!(matches!(
            open_record(&root, &two, other.id, 2, Some(&other.public())),
            Err(LogError::Misplaced { .. })
        ));
        assert_eq!(
            open_record(&root, &two, me.id, 2, Some(&other.public())),
            Err(LogError::BadSignature)
        );
        // Record 1 enrols only with this drive's secret, only as record 1.
        let one = seal_record(&root, &me, 1, &NO_LINK, &payload(&me, &root, 1)).unwrap();
        assert_eq!(
            open_record(&RootCap::generate(), &one, me.id, 1, None),
            Err(LogError::NotEnrolled)
        );
        let unenrolled = seal_record(&root, &me, 1, &NO_LINK, &payload(&me, &root, 2)).unwrap();
        assert_eq!(
            open_record(&root, &unenrolled, me.id, 1, None),
            Err(LogError::NotEnrolled)
        );
        let late = seal_record(&root, &me, 2, &NO_LINK, &payload(&me, &root, 1)).unwrap();
        assert_eq!(
            open_record(&root, &late, me.id, 2, Some(&me.public())),
            Err(LogError::LateEnrolment)
        );
        // A device signing record 1 with a key other than the one it
        // enrols is refused.
        let mut p = payload(&me, &root, 1);
        p.enrol = Some(Enrolment {
            key: other.public(),
            mac: device::enrol(&root, me.id, &other.public()),
        });
        let swapped = seal_record(&root, &me, 1, &NO_LINK, &p).unwrap();
        assert_eq!(
            open_record(&root, &swapped, me.id, 1, None),
            Err(LogError::BadSignature)
        );
    }

    #[test]
    fn a_long_record_is_stored_in_parts_and_one_too_long_is_refused_at_seal() {
        let root = RootCap::generate();
        let me = Identity::generate();
        let mut p = payload(&me, &root, 2);
        // Filled as seal_records fills: one server record.
        p.ops = vec![(1, Op::Delete { fid: 1 }); MAX_PAYLOAD / 40];
        let short = seal_record(&root, &me, 2, &NO_LINK, &p).unwrap();
        assert_eq!(
            stored_as(&root, me.id, 2, &short),
            vec![(log_name(&root, me.id, 2), short.clone())]
        );
        assert_eq!(parts(&root, me.id, 2, &short), Ok(None));
        assert_eq!(names_of(&root, me.id, 2, short.len()).len(), 1);

        // One operation longer than a server record: parts, then the stub.
        p.ops = vec![(
            1,
            Op::Xattr {
                fid: 1,
                name: "user.big".into(),
                value: Some(vec![200; 64 << 10]),
            },
        )];
        let long = seal_record(&root, &me, 2, &NO_LINK, &p).unwrap();
        assert!(long.len() > 3 * MAX_RECORD as usize);
        let stored = stored_as(&root, me.id, 2, &long);
        let (stub_name, stub) = stored.last().unwrap();
        assert_eq!(*stub_name, log_name(&root, me.id, 2));
        let wanted = parts(&root, me.id, 2, stub).unwrap().unwrap();
        assert_eq!(wanted.len(), stored.len() - 1);
        let mut joined = Vec::new();
        for ((name, len), (put_name, bytes)) in wanted.iter().zip(&stored) {
            assert_eq!((name, *len), (put_name, bytes.len()));
            assert!(bytes.len() as u64 <= MAX_RECORD);
            joined.extend_from_slice(bytes);
        }
        assert_eq!(
            open_record(&root, &joined, me.id, 2, Some(&me.public()))
                .unwrap()
                .payload,
            p
        );
        let names = names_of(&root, me.id, 2, long.len());
        assert_eq!(names.len(), stored.len());
        assert!(stored.iter().all(|(n, _)| names.contains(n)));
        // Stubs a server made up are refused.
        for bad in [
            [STUB_MAGIC.as_slice(), &MAX_RECORD.to_be_bytes()].concat(),
            [STUB_MAGIC.as_slice(), &(MAX_LONG_RECORD as u64 + 1).to_be_bytes()].concat(),
            [STUB_MAGIC.as_slice(), &[1; 9]].concat(),
        ] {
            assert!(parts(&root, me.id, 2, &bad).is_err());
        }

        p.ops = vec![(1, Op::Delete { fid: 1 }); MAX_LONG_PAYLOAD / 20];
        assert!(matches!(
            seal_record(&root, &me, 2, &NO_LINK, &p),
            Err(LogError::TooLarge(_))
        ));
    }

    #[test]
    fn heads_open_only_as_signed_and_say_what_is_new() {
        let root = RootCap::generate();
        let me = Identity::generate();
        let head = Head {
            device: me.id,
            seq: 9,
            link: [4; 32],
            time_ns: 1_764_000_000_000_000_000,
            body: HeadBody {
                checkpoint: Some(Checkpoint {
                    seq: 8,
                    link: [3; 32],
                    cap: "cairn:chk:x".into(),
                }),
                older: vec![],
                pruned: 7,
            },
        };
        let bytes = seal_head(&root, &me, &head);
        assert_eq!(head_device(&bytes), Ok(me.id));
        assert_eq!(open_head(&root, &bytes, me.id, &me.public()), Ok(head.clone()));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(open_head(&root, &bad, me.id, &me.public()).is_err(), "byte {i}");
        }
        let other = Identity::generate();
        assert!(open_head(&root, &bytes, other.id, &me.public()).is_err());
        assert!(open_head(&root, &bytes, me.id, &other.public()).is_err());

        assert_eq!(news((0, NO_LINK), &head), News::Ahead { from: 1, to: 9 });
        assert_eq!(news((7, [1; 32]), &head), News::Ahead { from: 8, to: 9 });
        assert_eq!(news((9, [4; 32]), &head), News::Nothing);
        assert_eq!(news((9, [5; 32]), &head), News::Fork);
        assert_eq!(news((10, [5; 32]), &head), News::Stale);
    }

    #[test]
    fn only_the_drives_secret_rings_the_bell() {
        let root = RootCap::generate();
        let bell = seal_bell(&root, 5);
        assert!(bell_rung(&root, &bell));
        assert!(!bell_rung(&RootCap::generate(), &bell));
        for i in 0..bell.len() {
            let mut bad = bell.clone();
            bad[i] ^= 1;
            assert!(!bell_rung(&root, &bad));
        }
        assert_ne!(seal_bell(&root, 5), bell);
    }
}
