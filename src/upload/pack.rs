//! Packs: many small sealed file versions concatenated into one plaintext
//! and uploaded as one encoded version, so that committing a tree of small
//! files costs n share writes per pack instead of per file. Each file
//! version then names a byte range of its pack ([`crate::codec::FileCap`]).

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use crate::codec::{apply_keystream, Hash, Key};

/// Versions at most this big go into packs; bigger ones are uploaded whole.
pub const MEMBER_MAX: u64 = 1 << 20;
/// A pack is closed once it holds this many bytes of file content...
pub const TARGET_BYTES: u64 = 8 << 20;
/// ...or this many file versions.
pub const MAX_MEMBERS: usize = 4096;

/// Where one file version lies in its pack, the key its bytes there are
/// encrypted under, and its content's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub offset: u64,
    pub len: u64,
    pub key: Key,
    pub sha256: Hash,
}

pub struct Pack {
    pub bytes: Vec<u8>,
    /// One per source, in order: where it lies, or why it could not be read.
    pub members: Vec<io::Result<Member>>,
}

/// Reads each `(source, size, key)` whole, in order, into one pack, each
/// encrypted under its own key (fresh for every pack: a key never meets a
/// second plaintext). A source that cannot be read, or is not exactly
/// `size` bytes long (a sealed version never changes, so its cache was
/// damaged), is left out with its error; the others still go.
pub fn assemble<R: Read>(sources: impl IntoIterator<Item = (R, u64, Key)>) -> Pack {
    let mut pack = Pack {
        bytes: Vec::new(),
        members: Vec::new(),
    };
    for (mut source, size, key) in sources {
        let offset = pack.bytes.len();
        // One read of the whole member (a sealed version's reader checks
        // the very bytes of a whole chunk read at once against its sum),
        // then nothing more may follow.
        pack.bytes.resize(offset + size as usize, 0);
        let read = match source.read_exact(&mut pack.bytes[offset..]) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a sealed version of {size} bytes ended early"),
            )),
            other => other.and_then(|()| source.read(&mut [0u8; 1])),
        };
        let member = match read {
            Err(e) => Err(e),
            Ok(extra) if extra != 0 => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a sealed version of {size} bytes holds more"),
            )),
            Ok(_) => {
                let content = &mut pack.bytes[offset..];
                let sha256 = Sha256::digest(&*content).into();
                apply_keystream(&key, 0, content);
                Ok(Member {
                    offset: offset as u64,
                    len: size,
                    key,
                    sha256,
                })
            }
        };
        if member.is_err() {
            pack.bytes.truncate(offset);
        }
        pack.members.push(member);
    }
    pack
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_lie_end_to_end_each_under_its_own_key() {
        let files: [&[u8]; 3] = [b"first", b"", b"third file"];
        let keys = [[1u8; 16], [2; 16], [3; 16]];
        let pack = assemble(files.iter().zip(keys).map(|(f, k)| (*f, f.len() as u64, k)));
        assert_eq!(pack.bytes.len(), 15);
        let members: Vec<Member> = pack.members.into_iter().map(Result::unwrap).collect();
        let ranges: Vec<(u64, u64)> = members.iter().map(|m| (m.offset, m.len)).collect();
        assert_eq!(ranges, [(0, 5), (5, 0), (5, 10)]);
        for (m, f) in members.iter().zip(files) {
            assert_eq!(m.sha256, <[u8; 32]>::from(Sha256::digest(f)));
            let mut stored = pack.bytes[m.offset as usize..(m.offset + m.len) as usize].to_vec();
            if !f.is_empty() {
                assert_ne!(stored, f, "the pack holds no member's plaintext");
            }
            apply_keystream(&m.key, 0, &mut stored);
            assert_eq!(stored, f, "its own key opens it");
        }
    }

    #[test]
    fn a_source_of_the_wrong_length_is_left_out_and_the_rest_go() {
        let (short, good): (&[u8], &[u8]) = (b"abc", b"good");
        let pack = assemble([(short, 4, [1; 16]), (good, 4, [2; 16]), (short, 2, [3; 16])]);
        assert!(pack.members[0].is_err());
        assert!(pack.members[2].is_err());
        let m = pack.members[1].as_ref().unwrap();
        assert_eq!((m.offset, m.len, pack.bytes.len()), (0, 4, 4));
    }
}
