//! The ring protocol (v1; v2 with the `ring48` feature) between a block client and the driver: a shared-memory region (a
//! sealed memfd) holding a header, a submission queue, a completion queue and the data
//! slots. `blockdev/RING.md` is the normative byte-level description.

pub mod codec;
mod counters;
pub mod layout;
mod shm;

pub use codec::{Completion, Op, ProtocolVersion, Request};
pub use counters::Counters;
pub use layout::RingGeometry;
pub use shm::{DriverEpoch, DriverPhase, RingRegion};

/// Errors setting up or validating a ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("bad ring geometry: {0}")]
    Geometry(String),
    #[error("not a Molt ring (magic {0:#018x})")]
    BadMagic(u64),
    #[error("unsupported ring protocol version {0}")]
    UnsupportedVersion(u32),
    #[error(
        "ring speaks protocol v{ring} but this build speaks v{speaks}: \
         the driver and its clients must be updated together, with the ring drained"
    )]
    ProtocolMismatch { ring: u32, speaks: u32 },
    #[error(
        "ring uses status code table v{ring} but this build uses v{uses}: \
         the driver and its clients must be updated together"
    )]
    StatusTableMismatch { ring: u32, uses: u32 },
    #[error("ring is not quiet: {0}")]
    NotQuiet(String),
    #[error("ring region is corrupted: {0}")]
    Corrupted(String),
    #[error("block address {0} does not fit protocol version {1}")]
    LbaTooWide(u64, u32),
    #[error("ring I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of a request as carried in a completion. The number that stands for each status
/// on the wire is given by the [`StatusTable`] the ring was created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Ok,
    /// The image failed the I/O.
    Io,
    /// Bad data slot index (out of range or already in use by a request in flight).
    BadSlot,
    /// A malformed request: bad count, non-zero reserved field, fields that the op forbids.
    Invalid,
    /// The image is out of space.
    NoSpace,
    /// The block range is past the end of the device.
    OutOfRange,
    /// The entry's crc32 does not match: it was corrupted in shared memory.
    Corrupt,
    /// Unknown op code.
    Unsupported,
    /// An earlier write or flush failed; writes, flushes and discards fail until the image
    /// is reopened.
    Latched,
}

/// Version of the table of completion status codes: data shared by the driver and every
/// client, so both must switch together. The ring header records the table the ring was
/// created with, and each side refuses a ring whose table is not its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusTable(pub u32);

impl StatusTable {
    /// Negative errno values (`-EIO`, `-EINVAL`, …).
    pub const V1: StatusTable = StatusTable(1);
    /// Renumbered: −1 … −8, in the order of [`Status::ALL`].
    pub const V2: StatusTable = StatusTable(2);
    /// The table this build uses.
    #[cfg(not(feature = "errcodes-v2"))]
    pub const CURRENT: StatusTable = StatusTable::V1;
    #[cfg(feature = "errcodes-v2")]
    pub const CURRENT: StatusTable = StatusTable::V2;

    /// Tables this code can translate (whether or not it uses them).
    pub(crate) fn is_known(self) -> bool {
        self == StatusTable::V1 || self == StatusTable::V2
    }

    /// The wire code of `s` in this table. Unknown tables use the current one's codes;
    /// callers check [`StatusTable::is_known`] first.
    pub fn code(self, s: Status) -> i32 {
        if self == StatusTable::V2 {
            let pos = Status::ALL
                .iter()
                .position(|&x| x == s)
                .expect("every status is in ALL");
            return -(pos as i32);
        }
        match s {
            Status::Ok => 0,
            Status::Io => -libc::EIO,
            Status::BadSlot => -libc::EFAULT,
            Status::Invalid => -libc::EINVAL,
            Status::NoSpace => -libc::ENOSPC,
            Status::OutOfRange => -libc::ERANGE,
            Status::Corrupt => -libc::EBADMSG,
            Status::Unsupported => -libc::EOPNOTSUPP,
            Status::Latched => -libc::ENOTRECOVERABLE,
        }
    }

    /// The status a wire code stands for in this table.
    pub fn status(self, code: i32) -> Option<Status> {
        Status::ALL.into_iter().find(|&s| self.code(s) == code)
    }
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

    /// The wire code in this build's table.
    pub fn code(self) -> i32 {
        StatusTable::CURRENT.code(self)
    }

    /// The status of a wire code in this build's table.
    pub fn from_code(code: i32) -> Option<Status> {
        StatusTable::CURRENT.status(code)
    }

    /// Maps an errno from the image to the status reported to the client.
    pub(crate) fn from_errno(errno: i32) -> Status {
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
    molt_sys::eventfd_signal(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_tables_are_bijections_and_differ() {
        for t in [StatusTable::V1, StatusTable::V2] {
            for s in Status::ALL {
                assert_eq!(t.status(t.code(s)), Some(s), "{t:?} {s:?}");
            }
            assert_eq!(t.code(Status::Ok), 0);
        }
        // Every non-ok code means something else (or nothing) in the other table.
        for s in &Status::ALL[1..] {
            let c = StatusTable::V1.code(*s);
            assert_ne!(StatusTable::V2.status(c), Some(*s));
        }
        assert_eq!(StatusTable::V1.code(Status::Io), -5);
        assert_eq!(StatusTable::V2.code(Status::Io), -1);
        assert_eq!(StatusTable::V2.code(Status::Latched), -8);
    }
}
