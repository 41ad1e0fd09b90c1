use thiserror::Error;

/// Why a structure could not be decoded (or, for encoders, why a value cannot be written).
/// *Corrupted* is kept apart from the *unsupported* cases (version, feature bits, image
/// size) and from *needs conversion*, so callers can tell "run fsck" from "upgrade".
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("{what}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{what}: bad magic {found:#x}")]
    BadMagic { what: &'static str, found: u64 },
    #[error("{what}: corrupted: {detail}")]
    Corrupted { what: &'static str, detail: String },
    #[error("{what}: unsupported version {found} (this build reads up to {supported})")]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    /// Feature bits this build does not understand (for example unknown `incompat` bits).
    #[error("{what}: feature bits {bits:#x} are not supported by this build")]
    UnsupportedFeatures { what: &'static str, bits: u32 },
    /// An image size this format version or build cannot lay out.
    #[error("{what}: unsupported size: {detail}")]
    UnsupportedSize { what: &'static str, detail: String },
    #[error("{what}: image needs conversion from format {from} to {to}")]
    NeedsConversion {
        what: &'static str,
        from: u32,
        to: u32,
    },
    #[error("{what}: length {len} exceeds cap {cap}")]
    TooLarge {
        what: &'static str,
        len: u64,
        cap: u64,
    },
    #[error("{what}: truncated ({len} bytes, need {need})")]
    Truncated {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("{what}: no space left in block")]
    Full { what: &'static str },
}

impl FormatError {
    pub fn corrupted(what: &'static str, detail: impl Into<String>) -> Self {
        FormatError::Corrupted {
            what,
            detail: detail.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, FormatError>;
