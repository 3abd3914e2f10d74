//! Core errors to NTSTATUS: the one place that decides them.

use crate::vfs::VfsError;

pub type NtStatus = i32;

/// The NTSTATUS values the adapter returns (ntstatus.h). Kept here so the
/// mapping is testable off Windows; a Windows test checks them against
/// `windows-sys`.
pub mod code {
    use super::NtStatus;
    const fn nt(v: u32) -> NtStatus {
        v as NtStatus
    }
    pub const SUCCESS: NtStatus = 0;
    pub const INVALID_HANDLE: NtStatus = nt(0xC000_0008);
    pub const INVALID_PARAMETER: NtStatus = nt(0xC000_000D);
    pub const END_OF_FILE: NtStatus = nt(0xC000_0011);
    pub const ACCESS_DENIED: NtStatus = nt(0xC000_0022);
    pub const OBJECT_NAME_INVALID: NtStatus = nt(0xC000_0033);
    pub const OBJECT_NAME_NOT_FOUND: NtStatus = nt(0xC000_0034);
    pub const OBJECT_NAME_COLLISION: NtStatus = nt(0xC000_0035);
    pub const OBJECT_PATH_NOT_FOUND: NtStatus = nt(0xC000_003A);
    pub const SHARING_VIOLATION: NtStatus = nt(0xC000_0043);
    pub const DISK_FULL: NtStatus = nt(0xC000_007F);
    pub const INSUFFICIENT_RESOURCES: NtStatus = nt(0xC000_009A);
    pub const MEDIA_WRITE_PROTECTED: NtStatus = nt(0xC000_00A2);
    pub const FILE_IS_A_DIRECTORY: NtStatus = nt(0xC000_00BA);
    pub const IO_TIMEOUT: NtStatus = nt(0xC000_00B5);
    pub const NOT_SUPPORTED: NtStatus = nt(0xC000_00BB);
    pub const DIRECTORY_NOT_EMPTY: NtStatus = nt(0xC000_0101);
    pub const FILE_CORRUPT_ERROR: NtStatus = nt(0xC000_0102);
    pub const NOT_A_DIRECTORY: NtStatus = nt(0xC000_0103);
    pub const CANNOT_DELETE: NtStatus = nt(0xC000_0121);
    pub const IO_DEVICE_ERROR: NtStatus = nt(0xC000_0185);
}

/// The single mapping from core errors to NTSTATUS.
pub fn ntstatus(e: &VfsError) -> NtStatus {
    use crate::vfs::ErrorKind as K;
    match e.kind() {
        K::NotFound => code::OBJECT_NAME_NOT_FOUND,
        K::Exists => code::OBJECT_NAME_COLLISION,
        K::NotDir => code::NOT_A_DIRECTORY,
        K::IsDir => code::FILE_IS_A_DIRECTORY,
        K::NotEmpty => code::DIRECTORY_NOT_EMPTY,
        K::Invalid => code::INVALID_PARAMETER,
        K::NameTooLong => code::OBJECT_NAME_INVALID,
        K::ReadOnly => code::MEDIA_WRITE_PROTECTED,
        K::NotPermitted | K::AccessDenied => code::ACCESS_DENIED,
        K::NoAttr | K::NotSupported => code::NOT_SUPPORTED,
        K::Busy => code::SHARING_VIOLATION,
        K::BadHandle => code::INVALID_HANDLE,
        K::DiskFull => code::DISK_FULL,
        K::Os { kind, .. } => io_status(kind),
        K::Catalog => code::IO_DEVICE_ERROR,
        // The grid could not give verified data: never content, an error.
        K::Grid => code::FILE_CORRUPT_ERROR,
    }
}

fn io_status(kind: std::io::ErrorKind) -> NtStatus {
    use std::io::ErrorKind;
    match kind {
        ErrorKind::NotFound => code::OBJECT_NAME_NOT_FOUND,
        ErrorKind::PermissionDenied => code::ACCESS_DENIED,
        ErrorKind::AlreadyExists => code::OBJECT_NAME_COLLISION,
        ErrorKind::TimedOut => code::IO_TIMEOUT,
        ErrorKind::InvalidData => code::FILE_CORRUPT_ERROR,
        ErrorKind::OutOfMemory => code::INSUFFICIENT_RESOURCES,
        ErrorKind::UnexpectedEof => code::END_OF_FILE,
        _ => code::IO_DEVICE_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::GridError;

    #[test]
    fn every_core_error_has_a_status() {
        let cases = [
            (VfsError::NotFound, code::OBJECT_NAME_NOT_FOUND),
            (VfsError::Exists, code::OBJECT_NAME_COLLISION),
            (VfsError::NotDir, code::NOT_A_DIRECTORY),
            (VfsError::IsDir, code::FILE_IS_A_DIRECTORY),
            (VfsError::NotEmpty, code::DIRECTORY_NOT_EMPTY),
            (VfsError::NameTooLong, code::OBJECT_NAME_INVALID),
            (VfsError::ReadOnly, code::MEDIA_WRITE_PROTECTED),
            (VfsError::NotPermitted, code::ACCESS_DENIED),
            (VfsError::Busy, code::SHARING_VIOLATION),
            (VfsError::BadHandle, code::INVALID_HANDLE),
            (
                VfsError::Grid(GridError::Download(crate::download::DownloadError::PlaintextMismatch)),
                code::FILE_CORRUPT_ERROR,
            ),
            (VfsError::Io(crate::sys::disk_full()), code::DISK_FULL),
            (VfsError::Io(std::io::ErrorKind::TimedOut.into()), code::IO_TIMEOUT),
            (VfsError::Io(std::io::Error::other("boom")), code::IO_DEVICE_ERROR),
        ];
        for (e, want) in cases {
            assert_eq!(ntstatus(&e), want, "{e:?}");
        }
    }

    #[test]
    fn statuses_are_errors() {
        // Severity bits 11: every mapped status is an error, never success.
        for e in [VfsError::NotFound, VfsError::Invalid, VfsError::NoAttr] {
            assert!((ntstatus(&e) as u32) >> 30 == 3);
        }
    }

    #[cfg(windows)]
    #[test]
    fn codes_match_windows_sys() {
        use windows_sys::Win32::Foundation as f;
        assert_eq!(code::OBJECT_NAME_NOT_FOUND, f::STATUS_OBJECT_NAME_NOT_FOUND);
        assert_eq!(code::OBJECT_NAME_COLLISION, f::STATUS_OBJECT_NAME_COLLISION);
        assert_eq!(code::OBJECT_PATH_NOT_FOUND, f::STATUS_OBJECT_PATH_NOT_FOUND);
        assert_eq!(code::DIRECTORY_NOT_EMPTY, f::STATUS_DIRECTORY_NOT_EMPTY);
        assert_eq!(code::FILE_IS_A_DIRECTORY, f::STATUS_FILE_IS_A_DIRECTORY);
        assert_eq!(code::NOT_A_DIRECTORY, f::STATUS_NOT_A_DIRECTORY);
        assert_eq!(code::DISK_FULL, f::STATUS_DISK_FULL);
        assert_eq!(code::ACCESS_DENIED, f::STATUS_ACCESS_DENIED);
        assert_eq!(code::MEDIA_WRITE_PROTECTED, f::STATUS_MEDIA_WRITE_PROTECTED);
        assert_eq!(code::FILE_CORRUPT_ERROR, f::STATUS_FILE_CORRUPT_ERROR);
        assert_eq!(code::CANNOT_DELETE, f::STATUS_CANNOT_DELETE);
        assert_eq!(code::END_OF_FILE, f::STATUS_END_OF_FILE);
        assert_eq!(code::IO_DEVICE_ERROR, f::STATUS_IO_DEVICE_ERROR);
    }
}
