use std::io;

/// Every way a filesystem operation can fail. `errno` is the one place these become
/// POSIX error numbers.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
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
    #[error("no space left on the image")]
    NoSpace,
    #[error("no free inodes left on the image")]
    NoInodes,
    #[error("name too long")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("file too large")]
    TooBig,
    #[error("too many links")]
    TooManyLinks,
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute value does not fit the buffer")]
    Range,
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    #[error("not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("read-only filesystem: {0}")]
    ReadOnly(String),
    #[error("metadata corrupted: {0}; unmount and run fsd fsck")]
    Corrupted(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl From<formats::FormatError> for FsError {
    fn from(e: formats::FormatError) -> Self {
        FsError::Corrupted(e.to_string())
    }
}

impl From<super::journal::JournalError> for FsError {
    fn from(e: super::journal::JournalError) -> Self {
        match e {
            super::journal::JournalError::Io(io) => FsError::Io(io),
            other => FsError::Corrupted(other.to_string()),
        }
    }
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NoSpace | FsError::NoInodes => libc::ENOSPC,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::TooBig => libc::EFBIG,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::Unsupported(_) => libc::EOPNOTSUPP,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::Corrupted(_) => libc::EIO,
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;
