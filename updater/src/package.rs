//! The package file (`.lup`): a signed manifest and the files it lists
//! (`docs/live-update.md`, "Package format"). All integers are little endian.
//!
//! ```text
//! 0    8  magic "MOLTLUP\0"
//! 8    4  format version (1)
//! 12  32  ed25519 public key of the signer
//! 44  64  ed25519 signature of b"molt-lup-v1" || manifest bytes
//! 108  4  manifest_len
//! 112  .. manifest (UTF-8 TOML), then the payload section to the end of the file:
//!         repeated { name_len u16 | name (UTF-8) | len u64 | bytes }
//! ```
//!
//! The header is read with plain byte arithmetic so that nothing signed is interpreted
//! before the signer is known and the signature checks; the payload is bound to the
//! signature through the sizes and SHA-256 digests that the manifest lists.

use std::ops::Range;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::keyring::{fingerprint, Keyring, TrustedKey};
use crate::manifest::{check_path, ComponentName, Manifest, MAX_NAME};
use formats::bytes::get_u32 as u32_at;
use formats::hex;

pub const MAGIC: [u8; 8] = *b"MOLTLUP\0";
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Prefix of every signed message: binds a signature to this use and format version.
pub(crate) const SIGNING_CONTEXT: &[u8] = b"molt-lup-v1";

pub(crate) const MAGIC_OFF: usize = 0;
pub(crate) const VERSION_OFF: usize = MAGIC_OFF + MAGIC.len();
pub(crate) const KEY_OFF: usize = VERSION_OFF + 4;
pub(crate) const SIGNATURE_OFF: usize = KEY_OFF + 32;
pub(crate) const MANIFEST_LEN_OFF: usize = SIGNATURE_OFF + 64;
/// Bytes before the manifest.
pub const HEADER_LEN: usize = MANIFEST_LEN_OFF + 4;

/// Default cap on a whole package, bytes.
pub const DEFAULT_MAX_PACKAGE: u64 = 512 << 20;
/// Default cap on the manifest, bytes.
pub(crate) const DEFAULT_MAX_MANIFEST: u32 = 64 << 10;

/// Caps applied before anything is read or allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_package: u64,
    pub max_manifest: u32,
    /// Longest payload file name, bytes.
    pub max_name: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_package: DEFAULT_MAX_PACKAGE,
            max_manifest: DEFAULT_MAX_MANIFEST,
            max_name: MAX_NAME,
        }
    }
}

/// Why a package was refused. The variants follow the verification order, and tell a
/// damaged file (`Malformed`, `HashMismatch`, …) from one nobody trusted signed
/// (`UntrustedKey`, `BadSignature`) and from a well-signed package that says something
/// wrong (`BadManifest`) or stale (`Expired`).
#[derive(Debug, Error)]
pub enum PackageError {
    #[error("{what} is {len} bytes, more than the cap of {cap}")]
    TooLarge {
        what: &'static str,
        len: u64,
        cap: u64,
    },
    #[error("malformed package: {0}")]
    Malformed(String),
    #[error("package format version {found} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("package signed by key {} ({fingerprint}), which is not in the keyring", hex::encode(.key))]
    UntrustedKey { key: [u8; 32], fingerprint: String },
    #[error("bad signature")]
    BadSignature,
    #[error("bad manifest: {0}")]
    BadManifest(String),
    #[error("file {file:?}: size {found}, manifest says {listed}")]
    SizeMismatch {
        file: String,
        listed: u64,
        found: u64,
    },
    #[error("file {file:?}: SHA-256 does not match the manifest")]
    HashMismatch { file: String },
    #[error("file {file:?} is listed in the manifest but not in the package")]
    MissingFile { file: String },
    #[error("file {file:?} is in the package but not listed in the manifest")]
    UnexpectedFile { file: String },
    #[error("package expired at {expires_unix} (now {now_unix})")]
    Expired { expires_unix: u64, now_unix: u64 },
    /// Reading a file while packing.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn malformed(detail: impl Into<String>) -> PackageError {
    PackageError::Malformed(detail.into())
}

/// A package whose header has the right shape; nothing in it is trusted yet.
#[derive(Debug, Clone, Copy)]
pub struct Package<'a> {
    pub signer: [u8; 32],
    pub signature: [u8; 64],
    /// The signed manifest bytes (not yet known to be UTF-8).
    pub manifest: &'a [u8],
    payload: &'a [u8],
    /// Offset of `payload` in the package.
    payload_off: usize,
    max_name: usize,
}

/// One entry of the payload section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadFile {
    pub name: String,
    /// Byte range of the contents within the package.
    pub range: Range<usize>,
}

impl<'a> Package<'a> {
    /// Checks the caps and the header: size, magic, version, manifest length. Reads nothing
    /// past the header except to bound the manifest.
    pub fn parse(bytes: &'a [u8], limits: &Limits) -> Result<Package<'a>, PackageError> {
        if bytes.len() as u64 > limits.max_package {
            return Err(PackageError::TooLarge {
                what: "package",
                len: bytes.len() as u64,
                cap: limits.max_package,
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(malformed(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        if bytes[MAGIC_OFF..VERSION_OFF] != MAGIC {
            return Err(malformed("bad magic (not a Molt update package)"));
        }
        let version = u32_at(bytes, VERSION_OFF);
        if version != FORMAT_VERSION {
            return Err(PackageError::UnsupportedVersion { found: version });
        }
        let manifest_len = u32_at(bytes, MANIFEST_LEN_OFF);
        if manifest_len > limits.max_manifest {
            return Err(PackageError::TooLarge {
                what: "manifest",
                len: manifest_len.into(),
                cap: limits.max_manifest.into(),
            });
        }
        let rest = bytes.len() - HEADER_LEN;
        let manifest_len = manifest_len as usize;
        if manifest_len > rest {
            return Err(malformed(format!(
                "manifest length {manifest_len} but only {rest} bytes follow the header"
            )));
        }
        let payload_off = HEADER_LEN + manifest_len;
        Ok(Package {
            signer: bytes[KEY_OFF..SIGNATURE_OFF].try_into().expect("32 bytes"),
            signature: bytes[SIGNATURE_OFF..MANIFEST_LEN_OFF]
                .try_into()
                .expect("64 bytes"),
            manifest: &bytes[HEADER_LEN..payload_off],
            payload: &bytes[payload_off..],
            payload_off,
            max_name: limits.max_name,
        })
    }

    /// Whether the signature verifies under `key` (strict: no malleable signatures, no
    /// weak keys).
    pub(crate) fn signature_valid_for(&self, key: &VerifyingKey) -> bool {
        let sig = Signature::from_bytes(&self.signature);
        key.verify_strict(&signed_message(self.manifest), &sig)
            .is_ok()
    }

    /// The key the package names as its signer, if it is a valid ed25519 key.
    pub fn signer_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.signer).ok()
    }

    /// Whether the signature verifies under the key the package itself names. Says the
    /// package is intact, not that anyone trusted made it.
    pub fn self_signature_valid(&self) -> bool {
        self.signer_key()
            .is_some_and(|k| self.signature_valid_for(&k))
    }

    /// Splits the payload section. Every length is checked against what remains; names
    /// must be plain relative paths, at most `max_name` bytes, and unique.
    pub fn files(&self) -> Result<Vec<PayloadFile>, PackageError> {
        let p = self.payload;
        let mut files: Vec<PayloadFile> = Vec::new();
        let mut pos = 0usize;
        while pos < p.len() {
            let take = |pos: usize, n: usize, what: &str| -> Result<Range<usize>, PackageError> {
                if p.len() - pos < n {
                    return Err(malformed(format!(
                        "payload entry at offset {}: {what} needs {n} bytes, {} remain",
                        self.payload_off + pos,
                        p.len() - pos
                    )));
                }
                Ok(pos..pos + n)
            };
            let r = take(pos, 2, "name length")?;
            let name_len = u16::from_le_bytes(p[r.clone()].try_into().expect("2 bytes")) as usize;
            pos = r.end;
            if name_len > self.max_name {
                return Err(PackageError::TooLarge {
                    what: "payload file name",
                    len: name_len as u64,
                    cap: self.max_name as u64,
                });
            }
            let r = take(pos, name_len, "name")?;
            let name = std::str::from_utf8(&p[r.clone()])
                .map_err(|_| malformed("payload file name is not UTF-8"))?;
            check_path(name).map_err(malformed)?;
            pos = r.end;
            let r = take(pos, 8, "file length")?;
            let len = u64::from_le_bytes(p[r.clone()].try_into().expect("8 bytes"));
            pos = r.end;
            let len = usize::try_from(len)
                .ok()
                .filter(|&l| l <= p.len() - pos)
                .ok_or_else(|| {
                    malformed(format!(
                        "payload file {name:?}: length {len} but only {} bytes remain",
                        p.len() - pos
                    ))
                })?;
            if files.iter().any(|f| f.name == name) {
                return Err(malformed(format!("payload file {name:?} appears twice")));
            }
            files.push(PayloadFile {
                name: name.to_string(),
                range: self.payload_off + pos..self.payload_off + pos + len,
            });
            pos += len;
        }
        Ok(files)
    }

    /// Verifies with the default limits and the current time.
    pub fn verify(bytes: Vec<u8>, keyring: &Keyring) -> Result<VerifiedPackage, PackageError> {
        Package::verify_with(bytes, keyring, &Limits::default(), now_unix())
    }

    /// The whole verification, in this order: caps and header shape; the signer is in the
    /// keyring; the signature; only then the manifest is parsed; the payload files match
    /// the manifest's list exactly (names, sizes, SHA-256); the manifest's semantic rules;
    /// the expiry against `now_unix`.
    pub(crate) fn verify_with(
        bytes: Vec<u8>,
        keyring: &Keyring,
        limits: &Limits,
        now_unix: u64,
    ) -> Result<VerifiedPackage, PackageError> {
        let pkg = Package::parse(&bytes, limits)?;
        let signer = keyring
            .get(&pkg.signer)
            .ok_or_else(|| PackageError::UntrustedKey {
                key: pkg.signer,
                fingerprint: fingerprint(&pkg.signer),
            })?
            .clone();
        if !pkg.signature_valid_for(&signer.key) {
            return Err(PackageError::BadSignature);
        }
        let text = std::str::from_utf8(pkg.manifest)
            .map_err(|_| PackageError::BadManifest("not UTF-8".into()))?;
        let manifest = Manifest::parse(text).map_err(PackageError::BadManifest)?;
        let files = pkg.files()?;
        match_files(&manifest, &files, &bytes)?;
        manifest.validate().map_err(PackageError::BadManifest)?;
        if now_unix > manifest.package.expires_unix {
            return Err(PackageError::Expired {
                expires_unix: manifest.package.expires_unix,
                now_unix,
            });
        }
        let manifest_text = text.to_string();
        Ok(VerifiedPackage {
            manifest,
            manifest_text,
            signer,
            files,
            bytes,
        })
    }
}

/// Every payload file is listed with its size and digest, and every listed file is present.
fn match_files(
    manifest: &Manifest,
    files: &[PayloadFile],
    bytes: &[u8],
) -> Result<(), PackageError> {
    for f in files {
        if manifest.file(&f.name).is_none() {
            return Err(PackageError::UnexpectedFile {
                file: f.name.clone(),
            });
        }
    }
    for listed in &manifest.files {
        let f = files
            .iter()
            .find(|f| f.name == listed.path)
            .ok_or_else(|| PackageError::MissingFile {
                file: listed.path.clone(),
            })?;
        let found = f.range.len() as u64;
        if found != listed.size {
            return Err(PackageError::SizeMismatch {
                file: listed.path.clone(),
                listed: listed.size,
                found,
            });
        }
        if sha256_hex(&bytes[f.range.clone()]) != listed.sha256 {
            return Err(PackageError::HashMismatch {
                file: listed.path.clone(),
            });
        }
    }
    Ok(())
}

/// A package that passed [`Package::verify`]: its signer is trusted and its payload is
/// what the manifest says.
#[derive(Debug)]
pub struct VerifiedPackage {
    pub manifest: Manifest,
    /// The manifest exactly as signed.
    pub manifest_text: String,
    pub signer: TrustedKey,
    files: Vec<PayloadFile>,
    bytes: Vec<u8>,
}

impl VerifiedPackage {
    /// Contents of the payload file at `path`.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|f| f.name == path)
            .map(|f| &self.bytes[f.range.clone()])
    }

    /// Every payload file, in package order.
    pub fn files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files
            .iter()
            .map(|f| (f.name.as_str(), &self.bytes[f.range.clone()]))
    }

    /// The new binary of `component`, if the package replaces it.
    pub fn binary(&self, component: ComponentName) -> Option<&[u8]> {
        self.file(&self.manifest.component(component)?.binary)
    }

    /// Why this package must not be applied live, if it says so.
    pub fn not_live_reason(&self) -> Option<&str> {
        let p = &self.manifest.package;
        (!p.live || p.nature == crate::manifest::Nature::NotLive)
            .then(|| p.reason.as_deref().unwrap_or("no reason given"))
    }

    /// The package bytes, as received.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes))
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + manifest.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(manifest);
    m
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Builds a signed package. Fills in each listed file's `sha256` and `size` from `files`
/// (so authors need not), requires `files` to hold exactly the listed paths, validates the
/// result and applies the default caps. Returns the manifest as signed and the package.
pub fn pack(
    manifest: &Manifest,
    files: &[(String, Vec<u8>)],
    key: &SigningKey,
) -> Result<(Manifest, Vec<u8>), PackageError> {
    let limits = Limits::default();
    let mut manifest = manifest.clone();
    for (name, _) in files {
        if manifest.file(name).is_none() {
            return Err(PackageError::UnexpectedFile { file: name.clone() });
        }
    }
    for entry in &mut manifest.files {
        let (_, data) = files
            .iter()
            .find(|(n, _)| *n == entry.path)
            .ok_or_else(|| PackageError::MissingFile {
                file: entry.path.clone(),
            })?;
        entry.size = data.len() as u64;
        entry.sha256 = sha256_hex(data);
    }
    manifest.validate().map_err(PackageError::BadManifest)?;
    let text = manifest.to_toml();
    if text.len() as u64 > limits.max_manifest as u64 {
        return Err(PackageError::TooLarge {
            what: "manifest",
            len: text.len() as u64,
            cap: limits.max_manifest.into(),
        });
    }
    let total = HEADER_LEN as u64
        + text.len() as u64
        + files
            .iter()
            .map(|(n, d)| 2 + n.len() as u64 + 8 + d.len() as u64)
            .sum::<u64>();
    if total > limits.max_package {
        return Err(PackageError::TooLarge {
            what: "package",
            len: total,
            cap: limits.max_package,
        });
    }
    let signature = key.sign(&signed_message(text.as_bytes()));
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(key.verifying_key().as_bytes());
    out.extend_from_slice(&signature.to_bytes());
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    // Payload in manifest order, so that a package is a function of its inputs.
    for entry in &manifest.files {
        let (name, data) = files
            .iter()
            .find(|(n, _)| *n == entry.path)
            .expect("checked above");
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(data);
    }
    debug_assert_eq!(out.len() as u64, total);
    Ok((manifest, out))
}

/// `updater pack`: reads the manifest at `path`, loads each listed file relative to the
/// manifest's directory, and packs.
pub fn pack_manifest_file(
    path: &Path,
    key: &SigningKey,
) -> Result<(Manifest, Vec<u8>), PackageError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| PackageError::Io { path: p, source }
    };
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.len() > DEFAULT_MAX_MANIFEST as u64 {
        return Err(PackageError::TooLarge {
            what: "manifest",
            len: meta.len(),
            cap: DEFAULT_MAX_MANIFEST.into(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let manifest = Manifest::parse(&text).map_err(PackageError::BadManifest)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut files = Vec::with_capacity(manifest.files.len());
    let mut total = 0u64;
    for f in &manifest.files {
        check_path(&f.path).map_err(PackageError::BadManifest)?;
        let p = base.join(&f.path);
        total = total.saturating_add(std::fs::metadata(&p).map_err(io(&p))?.len());
        if total > DEFAULT_MAX_PACKAGE {
            return Err(PackageError::TooLarge {
                what: "package payload",
                len: total,
                cap: DEFAULT_MAX_PACKAGE,
            });
        }
        files.push((f.path.clone(), std::fs::read(&p).map_err(io(&p))?));
    }
    pack(&manifest, &files, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::generate;
    use crate::manifest::tests::sample;
    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000;

    fn binary() -> Vec<u8> {
        (0..3000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn build(key: &SigningKey) -> Vec<u8> {
        let m = Manifest::parse(&sample()).unwrap();
        pack(&m, &[("bin/blockdev".into(), binary())], key)
            .unwrap()
            .1
    }

    fn ring(key: &SigningKey) -> Keyring {
        Keyring::from_keys([TrustedKey {
            name: "test".into(),
            key: key.verifying_key(),
        }])
    }

    fn verify(bytes: &[u8], ring: &Keyring) -> Result<VerifiedPackage, PackageError> {
        Package::verify_with(bytes.to_vec(), ring, &Limits::default(), NOW)
    }

    /// A key and a package it signed, made once (signing is not what these tests time).
    fn fixture() -> &'static (SigningKey, Vec<u8>) {
        static F: std::sync::OnceLock<(SigningKey, Vec<u8>)> = std::sync::OnceLock::new();
        F.get_or_init(|| {
            let k = generate();
            let b = build(&k);
            (k, b)
        })
    }

    #[test]
    fn header_offsets_are_as_documented() {
        assert_eq!(
            (
                VERSION_OFF,
                KEY_OFF,
                SIGNATURE_OFF,
                MANIFEST_LEN_OFF,
                HEADER_LEN
            ),
            (8, 12, 44, 108, 112)
        );
    }

    #[test]
    fn round_trip() {
        let (key, bytes) = fixture();
        let v = verify(bytes, &ring(key)).unwrap();
        assert_eq!(v.manifest.package.name, "blockdev-counters-u64");
        assert_eq!(v.binary(ComponentName::Blockdev).unwrap(), &binary()[..]);
        assert!(v.binary(ComponentName::Fsd).is_none());
        assert_eq!(v.manifest.files[0].size, 3000);
        assert_eq!(v.manifest.files[0].sha256, sha256_hex(&binary()));
        assert_eq!(v.files().count(), 1);
        assert_eq!(v.signer.name, "test");
        assert!(v.not_live_reason().is_none());
        assert_eq!(Manifest::parse(&v.manifest_text).unwrap(), v.manifest);
        assert_eq!(v.into_bytes(), *bytes);
    }

    #[test]
    fn untrusted_key_is_refused_before_the_signature() {
        let (_, bytes) = fixture();
        let other = generate();
        assert!(matches!(
            verify(bytes, &ring(&other)),
            Err(PackageError::UntrustedKey { .. })
        ));
        assert!(matches!(
            verify(bytes, &Keyring::default()),
            Err(PackageError::UntrustedKey { .. })
        ));
        // Re-signed by another key but naming the trusted one: bad signature.
        let (key, _) = fixture();
        let mut forged = build(&other);
        forged[KEY_OFF..SIGNATURE_OFF].copy_from_slice(key.verifying_key().as_bytes());
        assert!(matches!(
            verify(&forged, &ring(key)),
            Err(PackageError::BadSignature)
        ));
    }

    #[test]
    fn tampered_payload_is_a_hash_mismatch() {
        let (key, bytes) = fixture();
        let mut b = bytes.clone();
        let last = b.len() - 1;
        b[last] ^= 0x40;
        match verify(&b, &ring(key)) {
            Err(PackageError::HashMismatch { file }) => assert_eq!(file, "bin/blockdev"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn payload_not_matching_the_list() {
        let (key, bytes) = fixture();
        let r = ring(key);
        // An extra file appended.
        let mut b = bytes.clone();
        b.extend_from_slice(&3u16.to_le_bytes());
        b.extend_from_slice(b"evl");
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(0);
        assert!(matches!(
            verify(&b, &r),
            Err(PackageError::UnexpectedFile { file }) if file == "evl"
        ));
        // The payload removed.
        let manifest_len = u32_at(bytes, MANIFEST_LEN_OFF) as usize;
        let b = bytes[..HEADER_LEN + manifest_len].to_vec();
        assert!(matches!(
            verify(&b, &r),
            Err(PackageError::MissingFile { file }) if file == "bin/blockdev"
        ));
        // A file of another size, entry well-formed.
        let mut b = bytes[..HEADER_LEN + manifest_len].to_vec();
        b.extend_from_slice(&12u16.to_le_bytes());
        b.extend_from_slice(b"bin/blockdev");
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(b"hi");
        assert!(matches!(
            verify(&b, &r),
            Err(PackageError::SizeMismatch {
                listed: 3000,
                found: 2,
                ..
            })
        ));
    }

    #[test]
    fn truncated_packages_are_errors() {
        let (key, bytes) = fixture();
        let r = ring(key);
        let manifest_end = HEADER_LEN + u32_at(bytes, MANIFEST_LEN_OFF) as usize;
        let edges = [
            HEADER_LEN - 1,
            HEADER_LEN,
            manifest_end - 1,
            manifest_end,
            manifest_end + 1,
        ];
        let edges = edges.into_iter().chain(manifest_end + 2..manifest_end + 24);
        for n in (0..bytes.len())
            .step_by(31)
            .chain(edges)
            .chain([bytes.len() - 1])
        {
            assert!(verify(&bytes[..n], &r).is_err(), "truncated to {n}");
        }
    }

    #[test]
    fn caps_come_before_reading() {
        let (key, bytes) = fixture();
        let r = ring(key);
        let small = Limits {
            max_package: 100,
            ..Limits::default()
        };
        assert!(matches!(
            Package::verify_with(bytes.clone(), &r, &small, NOW),
            Err(PackageError::TooLarge {
                what: "package",
                ..
            })
        ));
        let mut b = bytes.clone();
        b[MANIFEST_LEN_OFF..HEADER_LEN].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            verify(&b, &r),
            Err(PackageError::TooLarge {
                what: "manifest",
                ..
            })
        ));
        let mut b = bytes.clone();
        b[VERSION_OFF] = 2;
        assert!(matches!(
            verify(&b, &r),
            Err(PackageError::UnsupportedVersion { found: 2 })
        ));
        // A file name over the cap.
        let p = Package::parse(
            bytes,
            &Limits {
                max_name: 4,
                ..Limits::default()
            },
        )
        .unwrap();
        assert!(matches!(
            p.files(),
            Err(PackageError::TooLarge {
                what: "payload file name",
                ..
            })
        ));
    }

    #[test]
    fn expired_package_is_refused() {
        let (key, bytes) = fixture();
        assert!(matches!(
            Package::verify_with(bytes.clone(), &ring(key), &Limits::default(), 1_830_000_001),
            Err(PackageError::Expired {
                expires_unix: 1_830_000_000,
                ..
            })
        ));
    }

    #[test]
    fn signed_but_semantically_wrong_manifest_is_bad_manifest() {
        let key = generate();
        let mut m = Manifest::parse(&sample()).unwrap();
        m.package.nature = crate::manifest::Nature::Interaction;
        // `pack` refuses it; sign it by hand to reach the verifier.
        assert!(matches!(
            pack(&m, &[("bin/blockdev".into(), binary())], &key),
            Err(PackageError::BadManifest(_))
        ));
        m.files[0].size = 3000;
        m.files[0].sha256 = sha256_hex(&binary());
        let text = m.to_toml();
        let sig = key.sign(&signed_message(text.as_bytes()));
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(key.verifying_key().as_bytes());
        b.extend_from_slice(&sig.to_bytes());
        b.extend_from_slice(&(text.len() as u32).to_le_bytes());
        b.extend_from_slice(text.as_bytes());
        b.extend_from_slice(&12u16.to_le_bytes());
        b.extend_from_slice(b"bin/blockdev");
        b.extend_from_slice(&3000u64.to_le_bytes());
        b.extend_from_slice(&binary());
        match verify(&b, &ring(&key)) {
            Err(PackageError::BadManifest(msg)) => assert!(msg.contains("both"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pack_requires_exactly_the_listed_files() {
        let key = generate();
        let m = Manifest::parse(&sample()).unwrap();
        assert!(matches!(
            pack(&m, &[], &key),
            Err(PackageError::MissingFile { .. })
        ));
        assert!(matches!(
            pack(
                &m,
                &[("bin/blockdev".into(), vec![]), ("x".into(), vec![])],
                &key
            ),
            Err(PackageError::UnexpectedFile { .. })
        ));
    }

    #[test]
    fn pack_from_disk_fills_in_hashes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/blockdev"), binary()).unwrap();
        // The author leaves sha256 and size out.
        let text: String = sample()
            .lines()
            .filter(|l| !l.starts_with("sha256") && !l.starts_with("size"))
            .map(|l| format!("{l}\n"))
            .collect();
        let path = dir.path().join("manifest.toml");
        std::fs::write(&path, text).unwrap();
        let key = generate();
        let (m, bytes) = pack_manifest_file(&path, &key).unwrap();
        assert_eq!(m.files[0].size, 3000);
        let v = verify(&bytes, &ring(&key)).unwrap();
        assert_eq!(v.manifest, m);
        assert!(matches!(
            pack_manifest_file(&dir.path().join("none.toml"), &key),
            Err(PackageError::Io { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every byte of a package is covered: changing any one is an error, never a panic.
        #[test]
        fn any_single_byte_change_is_an_error(pos in 0usize..1 << 20, delta in 1u8..=255) {
            let (key, bytes) = fixture();
            let mut b = bytes.clone();
            // Bias toward the header and manifest, where the interesting structure is.
            let i = if pos % 2 == 0 { pos % (HEADER_LEN + 1024).min(b.len()) } else { pos % b.len() };
            b[i] = b[i].wrapping_add(delta);
            prop_assert!(verify(&b, &ring(key)).is_err(), "byte {} changed", i);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (key, _) = fixture();
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&data);
            let _ = verify(&b, &ring(key));
            let _ = verify(&data, &ring(key));
            if let Ok(p) = Package::parse(&b, &Limits::default()) {
                let _ = p.files();
                let _ = p.self_signature_valid();
            }
        }
    }

    #[test]
    fn every_single_byte_change_at_the_structural_offsets_is_an_error() {
        // Exhaustive over the header, the manifest's ends and the first payload entry's
        // header; the proptest samples the rest.
        let (key, bytes) = fixture();
        let r = ring(key);
        let manifest_end = HEADER_LEN + u32_at(bytes, MANIFEST_LEN_OFF) as usize;
        let positions =
            (0..HEADER_LEN + 16).chain(manifest_end - 16..manifest_end + 2 + 12 + 8 + 4);
        for i in positions {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(verify(&b, &r).is_err(), "byte {i}");
        }
    }
}
