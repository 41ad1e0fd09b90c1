//! Trusted signers and signing keys.
//!
//! A keyring is a directory of `*.pub` files, each the hex of a 32-byte ed25519 public key.
//! Whoever can write to it decides what runs as root, so [`Keyring::load`] refuses a
//! directory or key file that is not owned by root or that is group- or world-writable, and
//! a key file that is not a regular file (a symlink could point anywhere). A secret key is a
//! file holding the hex of the 32-byte seed, mode 0600.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use thiserror::Error;

use formats::hex;

/// Where the supervisor looks for trusted keys unless told otherwise.
pub const DEFAULT_KEYRING: &str = "/etc/molt/keyring";

/// Largest key file read, bytes (64 hex digits and some whitespace).
const MAX_KEY_FILE: u64 = 4096;

#[derive(Debug, Error)]
pub enum KeyringError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Ownership or permissions that would let someone other than the owner choose keys.
    #[error("{path}: insecure: {detail}")]
    Insecure { path: PathBuf, detail: String },
    #[error("{path}: not a key: {detail}")]
    BadKey { path: PathBuf, detail: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyringError + '_ {
    move |source| KeyringError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A public key the keyring trusts, with the file stem it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub name: String,
    pub key: VerifyingKey,
}

#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: Vec<TrustedKey>,
}

impl Keyring {
    /// Loads a root-owned keyring directory (see the module comment for the checks).
    pub fn load(dir: &Path) -> Result<Keyring, KeyringError> {
        Keyring::load_owned_by(dir, 0)
    }

    /// As [`Keyring::load`], with `owner` as the required owner of the directory and files.
    pub(crate) fn load_owned_by(dir: &Path, owner: u32) -> Result<Keyring, KeyringError> {
        let meta = fs::metadata(dir).map_err(io_err(dir))?;
        if !meta.is_dir() {
            return Err(KeyringError::Insecure {
                path: dir.into(),
                detail: "not a directory".into(),
            });
        }
        check_owner_and_mode(dir, &meta, owner)?;
        let mut paths = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let path = entry.map_err(io_err(dir))?.path();
            if path.extension().is_some_and(|e| e == "pub") {
                paths.push(path);
            }
        }
        paths.sort();
        let mut keys = Vec::with_capacity(paths.len());
        for path in paths {
            let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            if !meta.file_type().is_file() {
                return Err(KeyringError::Insecure {
                    path,
                    detail: "not a regular file".into(),
                });
            }
            check_owner_and_mode(&path, &meta, owner)?;
            let key = read_public_key(&path)?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            keys.push(TrustedKey { name, key });
        }
        Ok(Keyring { keys })
    }

    /// A keyring held in memory (tests, or a supervisor that already has its keys).
    pub fn from_keys(keys: impl IntoIterator<Item = TrustedKey>) -> Keyring {
        Keyring {
            keys: keys.into_iter().collect(),
        }
    }

    /// The trusted key with these bytes, compared byte for byte.
    pub fn get(&self, public: &[u8; 32]) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.key.as_bytes() == public)
    }

    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn check_owner_and_mode(path: &Path, meta: &fs::Metadata, owner: u32) -> Result<(), KeyringError> {
    if meta.uid() != owner {
        return Err(KeyringError::Insecure {
            path: path.into(),
            detail: format!("owned by uid {}, must be owned by uid {owner}", meta.uid()),
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(KeyringError::Insecure {
            path: path.into(),
            detail: format!(
                "mode {:04o} is group- or world-writable",
                meta.mode() & 0o7777
            ),
        });
    }
    Ok(())
}

fn read_small(path: &Path) -> Result<String, KeyringError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if meta.len() > MAX_KEY_FILE {
        return Err(KeyringError::BadKey {
            path: path.into(),
            detail: format!("{} bytes, a key file is at most {MAX_KEY_FILE}", meta.len()),
        });
    }
    let bytes = fs::read(path).map_err(io_err(path))?;
    String::from_utf8(bytes).map_err(|_| KeyringError::BadKey {
        path: path.into(),
        detail: "not UTF-8 text".into(),
    })
}

/// Reads a public key file (hex of 32 bytes). Does not check permissions.
pub(crate) fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyringError> {
    let bad = |detail: String| KeyringError::BadKey {
        path: path.into(),
        detail,
    };
    let bytes = hex::decode_array::<32>(&read_small(path)?).map_err(bad)?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| bad(format!("not an ed25519 point: {e}")))
}

/// Reads a secret key file, refusing one that group or others can read or write.
pub fn read_secret_key(path: &Path) -> Result<SigningKey, KeyringError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if meta.mode() & 0o077 != 0 {
        return Err(KeyringError::Insecure {
            path: path.into(),
            detail: format!("secret key mode {:04o}, must be 0600", meta.mode() & 0o7777),
        });
    }
    let seed =
        hex::decode_array::<32>(&read_small(path)?).map_err(|detail| KeyringError::BadKey {
            path: path.into(),
            detail,
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A fresh signing key from the operating system's random source.
pub fn generate() -> SigningKey {
    SigningKey::generate(&mut rand_core::OsRng)
}

/// Writes `key`'s seed to `path` (created, mode 0600; an existing file is not replaced)
/// and its public key to `path` + ".pub" (mode 0644, likewise).
pub fn write_key_pair(path: &Path, key: &SigningKey) -> Result<PathBuf, KeyringError> {
    let public = public_path(path);
    if public.exists() {
        return Err(KeyringError::Io {
            path: public,
            source: io::Error::new(io::ErrorKind::AlreadyExists, "file exists"),
        });
    }
    write_new(path, 0o600, &hex::encode(key.as_bytes()))?;
    write_new(&public, 0o644, &hex::encode(key.verifying_key().as_bytes()))?;
    Ok(public)
}

/// `KEY` → `KEY.pub`.
pub(crate) fn public_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

fn write_new(path: &Path, mode: u32, text: &str) -> Result<(), KeyringError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(io_err(path))
}

/// Short printable identity of a key: the first 16 hex digits of its bytes.
pub fn fingerprint(key: &[u8; 32]) -> String {
    hex::encode(&key[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn me() -> u32 {
        fs::metadata("/proc/self").unwrap().uid()
    }

    fn set_mode(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A keyring directory (mode 0755) holding one key (mode 0644).
    fn keyring_dir() -> (tempfile::TempDir, SigningKey) {
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o755);
        let key = generate();
        let secret = tempfile::tempdir().unwrap();
        let pubfile = write_key_pair(&secret.path().join("k"), &key).unwrap();
        fs::copy(&pubfile, dir.path().join("release.pub")).unwrap();
        set_mode(&dir.path().join("release.pub"), 0o644);
        fs::write(dir.path().join("README"), "not a key").unwrap();
        (dir, key)
    }

    #[test]
    fn loads_keys_and_finds_them() {
        let (dir, key) = keyring_dir();
        let ring = Keyring::load_owned_by(dir.path(), me()).unwrap();
        assert_eq!(ring.keys().len(), 1);
        let found = ring.get(key.verifying_key().as_bytes()).unwrap();
        assert_eq!(found.name, "release");
        assert!(ring.get(&[7; 32]).is_none());
    }

    #[test]
    fn world_writable_directory_is_refused() {
        let (dir, _) = keyring_dir();
        set_mode(dir.path(), 0o777);
        let e = Keyring::load_owned_by(dir.path(), me()).unwrap_err();
        assert!(matches!(e, KeyringError::Insecure { .. }), "{e}");
        assert!(e.to_string().contains("0777"), "{e}");
        set_mode(dir.path(), 0o775);
        assert!(Keyring::load_owned_by(dir.path(), me()).is_err());
    }

    #[test]
    fn writable_key_file_is_refused() {
        let (dir, _) = keyring_dir();
        set_mode(&dir.path().join("release.pub"), 0o666);
        assert!(matches!(
            Keyring::load_owned_by(dir.path(), me()),
            Err(KeyringError::Insecure { .. })
        ));
    }

    #[test]
    fn wrong_owner_is_refused() {
        let (dir, _) = keyring_dir();
        let other = me().wrapping_add(1);
        let e = Keyring::load_owned_by(dir.path(), other).unwrap_err();
        assert!(e.to_string().contains("owned by uid"), "{e}");
    }

    #[test]
    fn symlinked_key_is_refused() {
        let (dir, _) = keyring_dir();
        std::os::unix::fs::symlink(dir.path().join("release.pub"), dir.path().join("link.pub"))
            .unwrap();
        let e = Keyring::load_owned_by(dir.path(), me()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn malformed_key_is_refused() {
        let (dir, _) = keyring_dir();
        let p = dir.path().join("bad.pub");
        fs::write(&p, "abcd").unwrap();
        set_mode(&p, 0o644);
        assert!(matches!(
            Keyring::load_owned_by(dir.path(), me()),
            Err(KeyringError::BadKey { .. })
        ));
    }

    #[test]
    fn secret_key_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let key = generate();
        write_key_pair(&path, &key).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_secret_key(&path).unwrap().to_bytes(), key.to_bytes());
        assert_eq!(
            read_public_key(&public_path(&path)).unwrap(),
            key.verifying_key()
        );
        // Never overwrites.
        assert!(write_key_pair(&path, &generate()).is_err());
        set_mode(&path, 0o640);
        assert!(matches!(
            read_secret_key(&path),
            Err(KeyringError::Insecure { .. })
        ));
    }
}
