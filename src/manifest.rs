//! Versions that cost what changed (`map1`, docs/FORMAT.md "Mapped
//! versions"): a file version is a list of segments, each one a byte
//! range of some encoded version on the grid (a *segment object*). An
//! upload stores only the segments that differ from the file's previous
//! version, then the manifest, in one new encoded version under a fresh
//! key; every other segment names the object that already holds it.
//!
//! This module is the format and the rule of which segments to share,
//! with no I/O.

pub use crate::codec::Hash;
use crate::codec::{Capability, CodecError, MAX_SEGMENTS};

// A manifest is read whole into memory: at most `MAX_SEGMENTS` entries
// (as a whole version: 4 TiB in 1 MiB segments), so about 185 MB.

pub const MAGIC: &[u8; 8] = b"CAIRNMF1";
/// The same layout, with no SHA-256 of the whole file (all zeros): written
/// when the uploader never held every byte (an edit of a file not in the
/// cache). Each segment is still checked by its own hash.
pub const MAGIC_NO_WHOLE: &[u8; 8] = b"CAIRNMF2";
/// Fixed part: magic, size, segment size, SHA-256, object count.
pub const FIXED_LEN: usize = 8 + 8 + 4 + 32 + 4;
const ENTRY_LEN: usize = 4 + 8 + 32;
const MAX_CAP_LEN: usize = 512;

/// Where segment `j` of the file lies: `object` 0 is the version's own
/// encoded version (the one whose plaintext ends with this manifest),
/// `object` i ≥ 1 is `objects[i - 1]`; `offset` is the byte offset in
/// that object's plaintext. `sha256` is the segment's plaintext hash:
/// what lets the next upload find the segments it need not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub object: u32,
    pub offset: u64,
    pub sha256: Hash,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub size: u64,
    pub segment_size: u32,
    /// SHA-256 of the whole file, when the version was made with every
    /// byte at hand.
    pub sha256: Option<Hash>,
    /// Earlier encoded versions this one takes segments from.
    pub objects: Vec<Capability>,
    pub segments: Vec<Entry>,
}

fn bad(what: impl Into<String>) -> CodecError {
    CodecError::Capability(format!("manifest: {}", what.into()))
}

/// The most bytes a manifest whose fixed part is `fixed` can take: read
/// before the rest, so a capability naming a huge "manifest" is refused
/// before it is fetched.
pub fn max_len(fixed: &[u8]) -> Result<u64, CodecError> {
    let mut r = Reader { bytes: fixed, at: 0 };
    r.magic()?;
    let size = r.u64()?;
    let segment_size = r.u32()?;
    if segment_size == 0 {
        return Err(bad("bad segment size"));
    }
    let count = size.div_ceil(segment_size as u64).min(MAX_SEGMENTS);
    r.take(32)?;
    let objects = (r.u32()? as u64).min(count);
    Ok(FIXED_LEN as u64 + objects * (2 + MAX_CAP_LEN as u64) + count * ENTRY_LEN as u64)
}

impl Manifest {
    pub fn segment_len(&self, j: u64) -> u64 {
        let s = self.segment_size as u64;
        self.size.saturating_sub(j * s).min(s)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + self.segments.len() * ENTRY_LEN);
        out.extend_from_slice(if self.sha256.is_some() { MAGIC } else { MAGIC_NO_WHOLE });
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.segment_size.to_le_bytes());
        out.extend_from_slice(&self.sha256.unwrap_or_default());
        out.extend_from_slice(&(self.objects.len() as u32).to_le_bytes());
        for cap in &self.objects {
            let cap = cap.to_string();
            out.extend_from_slice(&(cap.len() as u16).to_le_bytes());
            out.extend_from_slice(cap.as_bytes());
        }
        for e in &self.segments {
            out.extend_from_slice(&e.object.to_le_bytes());
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.sha256);
        }
        out
    }

    /// Parses and checks a manifest read from the encoded version `own`,
    /// which holds it at `own_data_len` (every segment stored in `own`
    /// lies before that). Every segment's range must lie inside its
    /// object, so nothing read through a manifest can be out of bounds.
    pub fn parse(bytes: &[u8], own: &Capability, own_data_len: u64) -> Result<Manifest, CodecError> {
        let mut r = Reader { bytes, at: 0 };
        let whole = r.magic()?;
        let size = r.u64()?;
        let segment_size = r.u32()?;
        if segment_size == 0 || segment_size > crate::codec::MAX_SEGMENT_SIZE {
            return Err(bad("bad segment size"));
        }
        let count = size.div_ceil(segment_size as u64);
        if count > MAX_SEGMENTS {
            return Err(bad("too many segments"));
        }
        let sha256: Hash = r.take(32)?.try_into().expect("32 bytes");
        let sha256 = whole.then_some(sha256);
        let n_objects = r.u32()? as u64;
        if n_objects > count {
            return Err(bad("more objects than segments"));
        }
        let mut objects = Vec::with_capacity((n_objects as usize).min(1024));
        for _ in 0..n_objects {
            let len = r.u16()? as usize;
            if len > MAX_CAP_LEN {
                return Err(bad("object capability too long"));
            }
            let text = std::str::from_utf8(r.take(len)?).map_err(|_| bad("object capability not UTF-8"))?;
            objects.push(text.parse::<Capability>()?);
        }
        if (r.bytes.len() - r.at) as u64 != count * ENTRY_LEN as u64 {
            return Err(bad("wrong length for its segments"));
        }
        let mut m = Manifest {
            size,
            segment_size,
            sha256,
            objects,
            segments: Vec::with_capacity(count as usize),
        };
        for j in 0..count {
            let e = Entry {
                object: r.u32()?,
                offset: r.u64()?,
                sha256: r.take(32)?.try_into().expect("32 bytes"),
            };
            let object_len = match e.object {
                0 => own_data_len,
                i => {
                    m.objects
                        .get(i as usize - 1)
                        .ok_or_else(|| bad(format!("segment {j} names object {i} of {n_objects}")))?
                        .layout
                        .size
                }
            };
            if e.offset
                .checked_add(m.segment_len(j))
                .is_none_or(|end| end > object_len)
            {
                return Err(bad(format!("segment {j} lies outside its object")));
            }
            m.segments.push(e);
        }
        if own_data_len > own.layout.size {
            return Err(bad("data past the version's end"));
        }
        Ok(m)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Reads the magic: whether the manifest holds the whole file's SHA-256.
    fn magic(&mut self) -> Result<bool, CodecError> {
        match self.take(8)? {
            m if m == MAGIC => Ok(true),
            m if m == MAGIC_NO_WHOLE => Ok(false),
            _ => Err(bad("bad magic")),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| bad("truncated"))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

/// What an upload stores: `fresh` lists the file's segments to put in the
/// new encoded version, in order; every other segment is taken from
/// `base` (the previous version's manifest, already checked) as it is.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub fresh: Vec<u64>,
}

/// Which segments of a new version, of `size` bytes with per-segment
/// hashes `sums`, differ from `base` (same index, same length, same
/// hash: shared; anything else: fresh). Pure.
pub fn plan(size: u64, segment_size: u32, sums: &[Hash], base: Option<&Manifest>) -> Plan {
    let base = base.filter(|b| b.segment_size == segment_size);
    let len = |size: u64, j: u64| size.saturating_sub(j * segment_size as u64).min(segment_size as u64);
    let fresh = (0..sums.len() as u64)
        .filter(
            |&j| match base.and_then(|b| b.segments.get(j as usize).map(|e| (b, e))) {
                Some((b, e)) => e.sha256 != sums[j as usize] || b.segment_len(j) != len(size, j),
                None => true,
            },
        )
        .collect();
    Plan { fresh }
}

/// The new version's manifest: fresh segments at their offsets in the
/// new encoded version (in order, packed end to end), shared ones as
/// `base` has them (its own object becoming one of the new one's
/// `objects`, named by `base_own`). Objects no segment uses are left out.
pub fn build(
    size: u64,
    segment_size: u32,
    sha256: Option<Hash>,
    sums: &[Hash],
    plan: &Plan,
    base: Option<(&Manifest, &Capability)>,
) -> Manifest {
    let seg_len = |j: u64| size.saturating_sub(j * segment_size as u64).min(segment_size as u64);
    let mut objects: Vec<Capability> = Vec::new();
    // Base object index (0 = the base's own) to this manifest's index.
    let mut renumbered: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    let mut fresh = plan.fresh.iter().peekable();
    let mut at = 0;
    let mut segments = Vec::with_capacity(sums.len());
    for j in 0..sums.len() as u64 {
        if fresh.peek() == Some(&&j) {
            fresh.next();
            segments.push(Entry {
                object: 0,
                offset: at,
                sha256: sums[j as usize],
            });
            at += seg_len(j);
            continue;
        }
        let (b, b_own) = base.expect("a shared segment has a base");
        let e = b.segments[j as usize];
        let object = *renumbered.entry(e.object).or_insert_with(|| {
            objects.push(match e.object {
                0 => b_own.clone(),
                i => b.objects[i as usize - 1].clone(),
            });
            objects.len() as u32
        });
        segments.push(Entry { object, ..e });
    }
    Manifest {
        size,
        segment_size,
        sha256,
        objects,
        segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_all, Params};
    use sha2::Digest;

    fn cap(size: u64, seed: u8) -> Capability {
        let params = Params::new(1, 1, 16).unwrap();
        encode_all(params, [seed; 16], &vec![seed; size as usize]).0
    }

    fn sums(bytes: &[u8], s: usize) -> Vec<Hash> {
        bytes.chunks(s).map(|c| sha2::Sha256::digest(c).into()).collect()
    }

    #[test]
    fn a_manifest_reads_back_as_written() {
        let own = cap(40, 1);
        let m = Manifest {
            size: 10,
            segment_size: 4,
            sha256: Some([7; 32]),
            objects: vec![cap(8, 2)],
            segments: vec![
                Entry {
                    object: 1,
                    offset: 4,
                    sha256: [1; 32],
                },
                Entry {
                    object: 0,
                    offset: 0,
                    sha256: [2; 32],
                },
                Entry {
                    object: 0,
                    offset: 4,
                    sha256: [3; 32],
                },
            ],
        };
        let bytes = m.to_bytes();
        assert_eq!(Manifest::parse(&bytes, &own, 6).unwrap(), m);
        // Its fixed part bounds it, before the rest is fetched.
        let bound = max_len(&bytes[..FIXED_LEN]).unwrap();
        assert!(bytes.len() as u64 <= bound && bound < 1024, "{bound}");
        assert!(max_len(&bytes[..FIXED_LEN - 1]).is_err());
        // Made without every byte at hand: no whole SHA-256, said by its magic.
        let no_whole = Manifest { sha256: None, ..m };
        let bytes = no_whole.to_bytes();
        assert_eq!(&bytes[..8], MAGIC_NO_WHOLE);
        assert_eq!(Manifest::parse(&bytes, &own, 6).unwrap(), no_whole);
        assert!(max_len(&bytes[..FIXED_LEN]).is_ok());
    }

    #[test]
    fn a_manifest_pointing_outside_its_objects_or_cut_short_is_refused() {
        let own = cap(40, 1);
        let entry = |object, offset| Entry {
            object,
            offset,
            sha256: [0; 32],
        };
        let m = |segments| Manifest {
            size: 8,
            segment_size: 4,
            sha256: Some([0; 32]),
            objects: vec![cap(8, 2)],
            segments,
        };
        for (segments, data) in [
            (vec![entry(1, 5), entry(0, 0)], 4), // past object 1's end
            (vec![entry(0, 0), entry(0, 4)], 6), // past the own data
            (vec![entry(2, 0), entry(0, 0)], 4), // no object 2
            (vec![entry(0, u64::MAX), entry(0, 0)], 4),
        ] {
            assert!(Manifest::parse(&m(segments).to_bytes(), &own, data).is_err());
        }
        let good = m(vec![entry(1, 4), entry(0, 0)]).to_bytes();
        assert!(Manifest::parse(&good, &own, 4).is_ok());
        for cut in [0, 7, 20, good.len() - 1] {
            assert!(Manifest::parse(&good[..cut], &own, 4).is_err(), "{cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(Manifest::parse(&longer, &own, 4).is_err());
    }

    #[test]
    fn only_changed_segments_are_fresh_and_the_rest_point_where_the_base_does() {
        let s = 4;
        let v1 = b"aaaabbbbccccdd".to_vec();
        let first = plan(v1.len() as u64, s, &sums(&v1, 4), None);
        assert_eq!(first.fresh, vec![0, 1, 2, 3]);
        let own1 = cap(100, 1);
        let m1 = build(14, s, Some([1; 32]), &sums(&v1, 4), &first, None);
        assert!(m1.objects.is_empty());

        // One byte changed in segment 1; the file grew by a byte (the last
        // segment changed length).
        let v2 = b"aaaabXbbccccddd".to_vec();
        let p2 = plan(v2.len() as u64, s, &sums(&v2, 4), Some(&m1));
        assert_eq!(p2.fresh, vec![1, 3]);
        let m2 = build(15, s, None, &sums(&v2, 4), &p2, Some((&m1, &own1)));
        assert_eq!(m2.objects, vec![own1.clone()]);
        assert_eq!(
            m2.segments[0],
            Entry {
                object: 1,
                ..m1.segments[0]
            }
        );
        assert_eq!(
            m2.segments[1],
            Entry {
                object: 0,
                offset: 0,
                sha256: sums(&v2, 4)[1]
            }
        );
        assert_eq!(
            m2.segments[2],
            Entry {
                object: 1,
                ..m1.segments[2]
            }
        );
        assert_eq!(
            m2.segments[3],
            Entry {
                object: 0,
                offset: 4,
                sha256: sums(&v2, 4)[3]
            }
        );

        // The next edit takes segments from both earlier objects, renumbered.
        let own2 = cap(100, 2);
        let v3 = b"aaaabXbbCcccddd".to_vec();
        let p3 = plan(v3.len() as u64, s, &sums(&v3, 4), Some(&m2));
        assert_eq!(p3.fresh, vec![2]);
        let m3 = build(15, s, Some([3; 32]), &sums(&v3, 4), &p3, Some((&m2, &own2)));
        assert_eq!(m3.objects, vec![own1, own2]);
        assert_eq!(
            m3.segments[1],
            Entry {
                object: 2,
                ..m2.segments[1]
            }
        );
        assert_eq!(m3.segments[2].object, 0);

        // Another segment size shares nothing.
        assert_eq!(plan(15, 8, &sums(&v3, 8), Some(&m2)).fresh, vec![0, 1]);
    }
}
