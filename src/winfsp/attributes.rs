//! DOS attributes and creation time, kept beside a node.
//!
//! READONLY is the node's permission bits (no write bit), so Linux and
//! Windows agree on it. HIDDEN, SYSTEM and ARCHIVE (Word hides its `~$`
//! files, robocopy copies attributes) and the creation time have no POSIX
//! home: they live in the extended attribute [`XATTR`], which the namespace
//! snapshot carries like any other.

use std::time::SystemTime;

use crate::catalog::Kind;

pub const READONLY: u32 = 0x1;
pub const HIDDEN: u32 = 0x2;
pub const SYSTEM: u32 = 0x4;
pub const DIRECTORY: u32 = 0x10;
pub const ARCHIVE: u32 = 0x20;
pub const NORMAL: u32 = 0x80;
/// "Leave the attributes as they are" in SetBasicInfo.
pub const UNCHANGED: u32 = u32::MAX;

/// Attributes stored in [`XATTR`]; others are derived or ignored.
const STORED: u32 = HIDDEN | SYSTEM | ARCHIVE;
pub const XATTR: &str = "user.cairn.windows";

/// What [`XATTR`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    pub attributes: u32,
    /// FILETIME; 0 until Windows sets one (then the change time stands in).
    pub creation: u64,
}

impl Stored {
    pub fn decode(bytes: Option<&[u8]>) -> Stored {
        match bytes {
            Some(b) if b.len() == 12 => Stored {
                attributes: u32::from_le_bytes(b[..4].try_into().expect("4")) & STORED,
                creation: u64::from_le_bytes(b[4..].try_into().expect("8")),
            },
            _ => Stored::default(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = (self.attributes & STORED).to_le_bytes().to_vec();
        out.extend_from_slice(&self.creation.to_le_bytes());
        out
    }
}

/// The attributes Windows sees for a node.
pub fn shown(kind: Kind, perm: u16, stored: Stored) -> u32 {
    let mut attrs = stored.attributes & STORED;
    if kind == Kind::Dir {
        attrs |= DIRECTORY;
    } else if perm & 0o222 == 0 {
        attrs |= READONLY;
    }
    if attrs == 0 {
        NORMAL
    } else {
        attrs
    }
}

/// What a SetBasicInfo attribute request changes: the new permission bits
/// (READONLY), if they change, and the stored attributes.
pub fn apply(requested: u32, kind: Kind, perm: u16, stored: Stored) -> (Option<u16>, Stored) {
    if requested == UNCHANGED {
        return (None, stored);
    }
    let stored = Stored {
        attributes: requested & STORED,
        ..stored
    };
    if kind == Kind::Dir {
        return (None, stored); // READONLY on a directory means nothing (as on NTFS)
    }
    let perm = match (requested & READONLY != 0, perm & 0o222 != 0) {
        (true, true) => Some(perm & !0o222),
        (false, false) => Some(perm | 0o200),
        _ => None,
    };
    (perm, stored)
}

/// Creation time shown: the stored one, else the change time.
pub fn creation(stored: Stored, ctime: SystemTime) -> u64 {
    if stored.creation != 0 {
        stored.creation
    } else {
        super::time::to_filetime(ctime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_file_is_normal_and_directory_is_directory() {
        assert_eq!(shown(Kind::File, 0o644, Stored::default()), NORMAL);
        assert_eq!(shown(Kind::Dir, 0o755, Stored::default()), DIRECTORY);
        assert_eq!(shown(Kind::File, 0o444, Stored::default()), READONLY);
    }

    #[test]
    fn readonly_maps_to_write_bits_both_ways() {
        let s = Stored::default();
        assert_eq!(apply(READONLY, Kind::File, 0o644, s).0, Some(0o444));
        assert_eq!(apply(NORMAL, Kind::File, 0o444, s).0, Some(0o644));
        assert_eq!(apply(NORMAL, Kind::File, 0o644, s).0, None);
        assert_eq!(apply(READONLY, Kind::Dir, 0o755, s).0, None);
    }

    #[test]
    fn hidden_system_archive_persist_and_unchanged_means_unchanged() {
        let (_, s) = apply(
            HIDDEN | ARCHIVE | 0x100, /* TEMPORARY: not kept */
            Kind::File,
            0o644,
            Stored::default(),
        );
        assert_eq!(s.attributes, HIDDEN | ARCHIVE);
        let back = Stored::decode(Some(&s.encode()));
        assert_eq!(back, s);
        assert_eq!(shown(Kind::File, 0o644, back), HIDDEN | ARCHIVE);
        assert_eq!(apply(UNCHANGED, Kind::File, 0o444, back), (None, back));
    }

    #[test]
    fn creation_time_survives_and_defaults_to_change_time() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        assert_eq!(creation(Stored::default(), t), super::super::time::to_filetime(t));
        let s = Stored {
            attributes: 0,
            creation: 42,
        };
        assert_eq!(creation(Stored::decode(Some(&s.encode())), t), 42);
        assert_eq!(Stored::decode(Some(b"short")), Stored::default());
    }
}
