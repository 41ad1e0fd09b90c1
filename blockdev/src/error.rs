use crate::ring::{RingError, Status};

/// Errors returned to users of the block layer ([`crate::Client`]).
///
/// The variants keep apart what a caller handles differently: a failed I/O on the image,
/// a request the device cannot serve, a driver that is gone, and a broken protocol.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image reported an I/O error (or an earlier write/flush error is latched).
    #[error("I/O error on the image: {0}")]
    Io(Status),
    /// The request touches blocks past the end of the device.
    #[error("blocks {lba}..+{nblocks} are out of range (device has {num_blocks} blocks)")]
    OutOfRange {
        lba: u64,
        nblocks: u64,
        num_blocks: u64,
    },
    /// A buffer whose length is not a whole number of blocks.
    #[error("buffer length {0} is not a multiple of the block size")]
    Misaligned(usize),
    /// The driver process exited, or stopped answering within the configured timeout.
    #[error("block driver is gone: {0}")]
    DriverGone(String),
    /// The peer broke the ring protocol (or the driver rejected a request as malformed).
    #[error("ring protocol error: {0}")]
    Protocol(String),
    /// Setting up the ring or the driver process failed.
    #[error("setup failed: {0}")]
    Setup(#[from] RingError),
    /// An operating-system error while setting up or talking to the driver.
    #[error("system error: {0}")]
    Os(#[from] std::io::Error),
}

impl BlockError {
    /// Maps a non-zero completion status to the error a caller sees.
    pub(crate) fn from_status(status: Status, lba: u64, nblocks: u64, num_blocks: u64) -> Self {
        match status {
            Status::OutOfRange => BlockError::OutOfRange {
                lba,
                nblocks,
                num_blocks,
            },
            Status::Io | Status::NoSpace | Status::Latched => BlockError::Io(status),
            other => BlockError::Protocol(format!("driver rejected request: {other}")),
        }
    }
}
