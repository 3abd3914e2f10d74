//! Packs: many small sealed file versions concatenated into one plaintext
//! and uploaded as one encoded version, so that committing a tree of small
//! files costs n share writes per pack instead of per file. Each file
//! version then names a byte range of its pack ([`crate::codec::FileCap`]).

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use crate::codec::Hash;

/// Versions at most this big go into packs; bigger ones are uploaded whole.
pub const MEMBER_MAX: u64 = 1 << 20;
/// A pack is closed once it holds this many bytes of file content...
pub const TARGET_BYTES: u64 = 8 << 20;
/// ...or this many file versions.
pub const MAX_MEMBERS: usize = 4096;

/// Where one file version lies in its pack, and its content's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub offset: u64,
    pub len: u64,
    pub sha256: Hash,
}

pub struct Pack {
    pub bytes: Vec<u8>,
    pub members: Vec<Member>,
}

/// Reads each `(source, size)` whole, in order, into one pack. A source
/// that is not exactly `size` bytes long is an error: a sealed version
/// never changes, so its cache was damaged.
pub fn assemble<R: Read>(sources: impl IntoIterator<Item = (R, u64)>) -> io::Result<Pack> {
    let mut pack = Pack {
        bytes: Vec::new(),
        members: Vec::new(),
    };
    for (source, size) in sources {
        let offset = pack.bytes.len() as u64;
        source.take(size + 1).read_to_end(&mut pack.bytes)?;
        let content = &pack.bytes[offset as usize..];
        if content.len() as u64 != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a sealed version of {size} bytes read as {}", content.len()),
            ));
        }
        pack.members.push(Member {
            offset,
            len: size,
            sha256: Sha256::digest(content).into(),
        });
    }
    Ok(pack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_lie_end_to_end_with_their_hashes() {
        let files: [&[u8]; 3] = [b"first", b"", b"third file"];
        let pack = assemble(files.iter().map(|f| (*f, f.len() as u64))).unwrap();
        assert_eq!(pack.bytes, b"firstthird file");
        let ranges: Vec<(u64, u64)> = pack.members.iter().map(|m| (m.offset, m.len)).collect();
        assert_eq!(ranges, [(0, 5), (5, 0), (5, 10)]);
        for (m, f) in pack.members.iter().zip(files) {
            assert_eq!(m.sha256, <[u8; 32]>::from(Sha256::digest(f)));
        }
    }

    #[test]
    fn a_source_of_the_wrong_length_is_refused() {
        let short: &[u8] = b"abc";
        assert!(assemble([(short, 4)]).is_err());
        assert!(assemble([(short, 2)]).is_err());
    }
}
