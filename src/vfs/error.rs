//! The core's errors, and the kinds the platform adapters map to an errno
//! or an NTSTATUS in one place each: whatever part of the core failed (the
//! catalog's SQLite, the staging disk, the grid), an adapter sees a kind of
//! the core's own, never a storage library's error.

use crate::catalog::{CatalogError, Ino};

#[derive(Debug, thiserror::Error)]
pub enum VfsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("name too long")]
    NameTooLong,
    #[error("read-only file system")]
    ReadOnly,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("permission denied")]
    AccessDenied,
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute namespace not supported")]
    NotSupported,
    #[error("file is busy")]
    Busy,
    #[error("bad file handle")]
    BadHandle,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("grid: {0}")]
    Grid(#[from] GridError),
}

/// What kept the core from the grid's data, kept whole for the logs and
/// `cairn` messages; adapters see only [`ErrorKind::Grid`].
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    /// A version the cache no longer holds was never uploaded.
    #[error("version {num} of file {ino} was never uploaded and is no longer in the cache")]
    NotStored { ino: Ino, num: i64 },
    /// The catalog holds a capability that does not parse.
    #[error("version {num} of file {ino}: its capability: {source}")]
    BadCap {
        ino: Ino,
        num: i64,
        source: crate::codec::CodecError,
    },
    #[error("{0}")]
    Download(#[from] crate::download::DownloadError),
    #[error("{0}")]
    Namespace(#[from] crate::namespace::NamespaceError),
    /// Publishing to or merging other devices' logs.
    #[error("several machines: {0}")]
    Sync(String),
}

pub type VfsResult<T> = Result<T, VfsError>;

/// What an error means to a caller of the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    Invalid,
    NameTooLong,
    ReadOnly,
    NotPermitted,
    AccessDenied,
    NoAttr,
    NotSupported,
    Busy,
    BadHandle,
    /// The local disk (staging cache or catalog) is full.
    DiskFull,
    /// A call to the operating system failed: its own code when it gave
    /// one (passed on as it is), and its kind. Damaged local data has no
    /// code: an I/O error, never content.
    Os {
        code: Option<i32>,
        kind: std::io::ErrorKind,
    },
    /// The catalog failed.
    Catalog,
    /// The grid could not give verified data.
    Grid,
}

impl From<crate::stage::recovery::StageError> for VfsError {
    fn from(e: crate::stage::recovery::StageError) -> VfsError {
        match e {
            crate::stage::recovery::StageError::Io(e) => VfsError::Io(e),
            crate::stage::recovery::StageError::Catalog(e) => VfsError::Catalog(e),
        }
    }
}

impl VfsError {
    pub fn kind(&self) -> ErrorKind {
        use ErrorKind as K;
        match self {
            VfsError::NotFound | VfsError::Catalog(CatalogError::NotFound(_)) => K::NotFound,
            VfsError::Exists => K::Exists,
            VfsError::NotDir | VfsError::Catalog(CatalogError::NotADirectory(_)) => K::NotDir,
            VfsError::IsDir | VfsError::Catalog(CatalogError::IsADirectory(_)) => K::IsDir,
            VfsError::NotEmpty => K::NotEmpty,
            VfsError::Invalid | VfsError::Catalog(CatalogError::InvalidPath(_)) => K::Invalid,
            VfsError::NameTooLong => K::NameTooLong,
            VfsError::ReadOnly => K::ReadOnly,
            VfsError::NotPermitted => K::NotPermitted,
            VfsError::AccessDenied => K::AccessDenied,
            VfsError::NoAttr => K::NoAttr,
            VfsError::NotSupported => K::NotSupported,
            VfsError::Busy => K::Busy,
            VfsError::BadHandle => K::BadHandle,
            // std decodes ENOSPC, ERROR_DISK_FULL and ERROR_HANDLE_DISK_FULL
            // as StorageFull.
            VfsError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => K::DiskFull,
            VfsError::Io(io) => K::Os {
                code: io.raw_os_error(),
                kind: io.kind(),
            },
            VfsError::Catalog(CatalogError::Db(rusqlite::Error::SqliteFailure(e, _)))
                if e.code == rusqlite::ErrorCode::DiskFull =>
            {
                K::DiskFull
            }
            VfsError::Catalog(CatalogError::Io(io)) if io.kind() == std::io::ErrorKind::StorageFull => K::DiskFull,
            VfsError::Catalog(CatalogError::Db(_) | CatalogError::Corrupt(_) | CatalogError::Io(_)) => K::Catalog,
            VfsError::Grid(_) => K::Grid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_errors_come_out_as_the_cores_kinds() {
        let path = || "/x".to_string();
        assert_eq!(
            VfsError::Catalog(CatalogError::NotFound(path())).kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            VfsError::Catalog(CatalogError::InvalidPath(path())).kind(),
            ErrorKind::Invalid
        );
        let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
        assert_eq!(VfsError::Catalog(CatalogError::Db(full)).kind(), ErrorKind::DiskFull);
        assert_eq!(VfsError::Io(crate::sys::disk_full()).kind(), ErrorKind::DiskFull);
        // A missing staged chunk is NotFound with no OS code: an I/O error
        // to the caller, never "no such file".
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "chunk 3 is missing");
        assert_eq!(
            VfsError::Io(missing).kind(),
            ErrorKind::Os {
                code: None,
                kind: std::io::ErrorKind::NotFound
            }
        );
    }
}
