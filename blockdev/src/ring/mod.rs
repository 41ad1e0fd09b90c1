//! Ring protocol v1 between a block client and the driver: a shared-memory region (a
//! sealed memfd) holding a header, a submission queue, a completion queue and the data
//! slots. `blockdev/RING.md` is the normative byte-level description.

pub mod codec;
pub mod layout;
mod shm;

pub use codec::{Completion, Op, ProtocolVersion, Request};
pub use layout::RingGeometry;
pub use shm::{DriverPhase, RingRegion};

/// Errors setting up or validating a ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("bad ring geometry: {0}")]
    Geometry(String),
    #[error("not a Molt ring (magic {0:#018x})")]
    BadMagic(u64),
    #[error("unsupported ring protocol version {0}")]
    UnsupportedVersion(u32),
    #[error("ring region is corrupted: {0}")]
    Corrupted(String),
    #[error("block address {0} does not fit protocol version {1}")]
    LbaTooWide(u64, u32),
    #[error("ring I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of a request as carried in a completion: 0 or a negative errno-like code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    /// The image failed the I/O.
    Io = -libc::EIO,
    /// Bad data slot index (out of range or already in use by a request in flight).
    BadSlot = -libc::EFAULT,
    /// A malformed request: bad count, non-zero reserved field, fields that the op forbids.
    Invalid = -libc::EINVAL,
    /// The image is out of space.
    NoSpace = -libc::ENOSPC,
    /// The block range is past the end of the device.
    OutOfRange = -libc::ERANGE,
    /// The entry's crc32 does not match: it was corrupted in shared memory.
    Corrupt = -libc::EBADMSG,
    /// Unknown op code.
    Unsupported = -libc::EOPNOTSUPP,
    /// An earlier write or flush failed; writes, flushes and discards fail until the image
    /// is reopened.
    Latched = -libc::ENOTRECOVERABLE,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::Io,
        Status::BadSlot,
        Status::Invalid,
        Status::NoSpace,
        Status::OutOfRange,
        Status::Corrupt,
        Status::Unsupported,
        Status::Latched,
    ];

    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn from_code(code: i32) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.code() == code)
    }

    /// Maps an errno from the image to the status reported to the client.
    pub fn from_errno(errno: i32) -> Status {
        match errno {
            libc::ENOSPC | libc::EDQUOT => Status::NoSpace,
            libc::ERANGE => Status::OutOfRange,
            libc::EINVAL => Status::Invalid,
            libc::EFAULT => Status::BadSlot,
            _ => Status::Io,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Status::Ok => "ok",
            Status::Io => "I/O error",
            Status::BadSlot => "bad data slot",
            Status::Invalid => "invalid request",
            Status::NoSpace => "no space on image",
            Status::OutOfRange => "out of range",
            Status::Corrupt => "corrupted entry",
            Status::Unsupported => "unsupported op",
            Status::Latched => "earlier write error latched",
        };
        write!(f, "{name} ({})", self.code())
    }
}

/// Signals a ring doorbell eventfd (adds 1 to its counter).
pub fn ring_doorbell(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    crate::sys::eventfd_signal(fd)
}
