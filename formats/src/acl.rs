//! POSIX access control lists as Linux stores them in the `system.posix_acl_access` and
//! `system.posix_acl_default` extended attributes, with the semantics of the kernel's
//! `fs/posix_acl.c` and `fs/namei.c` (written from acl(5) and the uapi header
//! `linux/posix_acl_xattr.h`).
//!
//! ```text
//! value  = header entry*             (little endian, no padding)
//! header = a_version u32             always 2
//! entry  = e_tag u16 | e_perm u16 | e_id u32
//! ```
//!
//! Invariants:
//! * An [`Acl`] is either *empty* (what a header-only value decodes to; the kernel reads it
//!   as "no ACL", and setting it removes the attribute) or *valid*: exactly one
//!   `ACL_USER_OBJ`, `ACL_GROUP_OBJ` and `ACL_OTHER`, at most one `ACL_MASK`, a mask
//!   whenever there is an `ACL_USER` or `ACL_GROUP` entry, permissions within `rwx`, no
//!   named entry with the id [`ACL_UNDEFINED_ID`], at most [`MAX_ENTRIES`] entries, and the
//!   entries in canonical order: by tag value, then by id, with no id repeated under a tag.
//!   Every constructor ([`Acl::new`], [`Acl::decode`], [`Acl::from_mode`]) and every
//!   operation returning an `Acl` keeps this; the entries are private so nothing else can
//!   break it.
//! * [`Acl::decode`] never panics and looks at no more than [`MAX_VALUE_SIZE`] bytes
//!   (Linux's `XATTR_SIZE_MAX`); [`Acl::encode`] is its inverse:
//!   `decode(&a.encode()) == Ok(a)` for every `Acl`. The ids of the unnamed entries are
//!   ignored on decode, as the kernel ignores them, and written as [`ACL_UNDEFINED_ID`].
//! * Nothing here applies the kernel's id mapping (user namespaces, idmapped mounts): ids
//!   are the raw `u32` stored in the attribute and the fsuid/fsgid of the request.
//! * The functions taking an `&Acl` treat the empty ACL as "no ACL" (each one says how).
//!
//! Where the kernel's behaviour is surprising this module follows it and says so:
//! an ACL with an `ACL_MASK` entry is never "equivalent to the mode", even without named
//! entries ([`Acl::equiv_mode`]); and [`permission`] ignores the ACL altogether when the
//! mode's group bits are all clear.

use std::fmt;

use thiserror::Error;

use crate::error::FormatError;
use crate::inode::{S_IFLNK, S_IFMT};

/// Name of the access ACL: the permissions of the inode itself.
pub const ACCESS_XATTR: &[u8] = b"system.posix_acl_access";
/// Name of the default ACL of a directory: what its new children inherit.
pub const DEFAULT_XATTR: &[u8] = b"system.posix_acl_default";

/// Tag values (`e_tag`), uapi `linux/posix_acl.h`. Their numeric order is the canonical
/// order of the entries.
pub(crate) const ACL_USER_OBJ: u16 = 0x01;
pub(crate) const ACL_USER: u16 = 0x02;
pub(crate) const ACL_GROUP_OBJ: u16 = 0x04;
pub(crate) const ACL_GROUP: u16 = 0x08;
pub(crate) const ACL_MASK: u16 = 0x10;
pub(crate) const ACL_OTHER: u16 = 0x20;

/// Permission bits (`e_perm`), the same values as the kernel's `MAY_READ`, `MAY_WRITE`,
/// `MAY_EXEC` and as each `rwx` triple of a mode.
pub const READ: u8 = 4;
pub const WRITE: u8 = 2;
pub(crate) const EXECUTE: u8 = 1;
/// All permission bits an entry may carry.
pub(crate) const RWX: u8 = READ | WRITE | EXECUTE;

/// `a_version` of every value (`POSIX_ACL_XATTR_VERSION`).
pub(crate) const ACL_XATTR_VERSION: u32 = 2;
/// The `e_id` of the entries that have no id.
pub(crate) const ACL_UNDEFINED_ID: u32 = u32::MAX;

/// Bytes of the header.
pub const HEADER_SIZE: usize = 4;
/// Bytes of one entry.
pub(crate) const ENTRY_SIZE: usize = 8;
/// Largest value decoded: Linux's `XATTR_SIZE_MAX`, the most any setxattr can pass.
pub(crate) const MAX_VALUE_SIZE: usize = 65536;
/// Most entries an ACL has: as many as fit in [`MAX_VALUE_SIZE`].
pub(crate) const MAX_ENTRIES: usize = (MAX_VALUE_SIZE - HEADER_SIZE) / ENTRY_SIZE;

/// Linux errno values for [`AclError::errno`].
const EINVAL: i32 = 22;
const E2BIG: i32 = 7;
const EOPNOTSUPP: i32 = 95;

/// Mode bits.
const S_IRWXUGO: u32 = 0o777;
const S_IXUGO: u32 = 0o111;

/// Why bytes are not a POSIX ACL value, or entries not a valid ACL.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AclError {
    #[error("POSIX ACL: {len} bytes exceed the {cap}-byte xattr limit")]
    TooLarge { len: usize, cap: usize },
    #[error("POSIX ACL: {len} bytes, shorter than the {HEADER_SIZE}-byte header")]
    Truncated { len: usize },
    #[error("POSIX ACL: unsupported version {found} (expected {ACL_XATTR_VERSION})")]
    Version { found: u32 },
    #[error("POSIX ACL: {len} bytes are not a {HEADER_SIZE}-byte header and whole {ENTRY_SIZE}-byte entries")]
    Length { len: usize },
    #[error("POSIX ACL: entry {index}: unknown tag {tag:#x}")]
    UnknownTag { index: usize, tag: u16 },
    #[error("POSIX ACL: entry {index}: permission bits {perm:#x} beyond rwx")]
    Perm { index: usize, perm: u16 },
    #[error("POSIX ACL: entry {index}: a named entry with the undefined id")]
    UndefinedId { index: usize },
    #[error("POSIX ACL: entry {index}: {tag:?} repeats the entry before it")]
    Duplicate { index: usize, tag: Tag },
    #[error("POSIX ACL: entry {index}: {tag:?} is out of order (by tag, then by id)")]
    OutOfOrder { index: usize, tag: Tag },
    #[error("POSIX ACL: no {0} entry")]
    Missing(&'static str),
    #[error("POSIX ACL: named user or group entries without a mask entry")]
    MaskRequired,
}

impl AclError {
    /// What the kernel answers a setxattr of such a value with: `EOPNOTSUPP` for another
    /// version, `E2BIG` for a value over the xattr size limit, `EINVAL` for the rest.
    pub fn errno(&self) -> i32 {
        match self {
            AclError::Version { .. } => EOPNOTSUPP,
            AclError::TooLarge { .. } => E2BIG,
            _ => EINVAL,
        }
    }
}

/// A stored ACL that does not decode is a damaged image (or, for a version, one this build
/// does not read).
impl From<AclError> for FormatError {
    fn from(e: AclError) -> Self {
        const WHAT: &str = "POSIX ACL";
        match e {
            AclError::Version { found } => FormatError::UnsupportedVersion {
                what: WHAT,
                found,
                supported: ACL_XATTR_VERSION,
            },
            AclError::TooLarge { len, cap } => FormatError::TooLarge {
                what: WHAT,
                len: len as u64,
                cap: cap as u64,
            },
            e => FormatError::corrupted(WHAT, e.to_string()),
        }
    }
}

/// What an entry applies to. The derived order is the canonical order of the entries: by
/// tag value, then by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tag {
    /// The owner of the file.
    UserObj,
    /// The user with this uid.
    User(u32),
    /// The owning group of the file.
    GroupObj,
    /// The group with this gid.
    Group(u32),
    /// The upper bound of what `User`, `GroupObj` and `Group` entries grant.
    Mask,
    /// Everyone else.
    Other,
}

impl Tag {
    /// The `e_tag` value.
    pub fn value(self) -> u16 {
        match self {
            Tag::UserObj => ACL_USER_OBJ,
            Tag::User(_) => ACL_USER,
            Tag::GroupObj => ACL_GROUP_OBJ,
            Tag::Group(_) => ACL_GROUP,
            Tag::Mask => ACL_MASK,
            Tag::Other => ACL_OTHER,
        }
    }

    /// The uid or gid of a named entry.
    pub fn id(self) -> Option<u32> {
        match self {
            Tag::User(id) | Tag::Group(id) => Some(id),
            _ => None,
        }
    }

    /// A named user or group entry (these need a mask and make an ACL extended).
    pub fn is_named(self) -> bool {
        self.id().is_some()
    }

    /// The tag of `e_tag`/`e_id`; the id of an unnamed tag is ignored.
    fn from_raw(tag: u16, id: u32) -> Option<Tag> {
        Some(match tag {
            ACL_USER_OBJ => Tag::UserObj,
            ACL_USER => Tag::User(id),
            ACL_GROUP_OBJ => Tag::GroupObj,
            ACL_GROUP => Tag::Group(id),
            ACL_MASK => Tag::Mask,
            ACL_OTHER => Tag::Other,
            _ => return None,
        })
    }
}

impl fmt::Display for Tag {
    /// The acl(5) text form of the tag and qualifier: `user::`, `user:1000:`, ….
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tag::UserObj => write!(f, "user::"),
            Tag::User(id) => write!(f, "user:{id}:"),
            Tag::GroupObj => write!(f, "group::"),
            Tag::Group(id) => write!(f, "group:{id}:"),
            Tag::Mask => write!(f, "mask::"),
            Tag::Other => write!(f, "other::"),
        }
    }
}

/// One entry: a tag and the `rwx` bits ([`READ`], [`WRITE`], [`EXECUTE`]) it grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    pub tag: Tag,
    pub perm: u8,
}

impl Entry {
    pub const fn new(tag: Tag, perm: u8) -> Entry {
        Entry { tag, perm }
    }
}

impl fmt::Display for Entry {
    /// The acl(5) text form: `user:1000:r-x`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bit = |b: u8, c: char| if self.perm & b != 0 { c } else { '-' };
        write!(
            f,
            "{}{}{}{}",
            self.tag,
            bit(READ, 'r'),
            bit(WRITE, 'w'),
            bit(EXECUTE, 'x')
        )
    }
}

/// A POSIX ACL: empty, or valid and in canonical order (see the module invariants).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    /// The ACL of `entries` in any order: sorted into canonical order, then checked. No
    /// entries gives the empty ACL.
    pub fn new(mut entries: Vec<Entry>) -> Result<Acl, AclError> {
        entries.sort_by_key(|e| e.tag);
        validate(&entries)?;
        Ok(Acl { entries })
    }

    /// The minimal ACL of a mode's permission bits (`posix_acl_from_mode`): owner, owning
    /// group and other.
    pub fn from_mode(mode: u32) -> Acl {
        Acl {
            entries: vec![
                Entry::new(Tag::UserObj, ((mode >> 6) & 7) as u8),
                Entry::new(Tag::GroupObj, ((mode >> 3) & 7) as u8),
                Entry::new(Tag::Other, (mode & 7) as u8),
            ],
        }
    }

    /// The entries in canonical order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The empty ACL: "no ACL".
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The permissions of the entry tagged `tag`.
    pub fn perm(&self, tag: Tag) -> Option<u8> {
        self.entries
            .binary_search_by(|e| e.tag.cmp(&tag))
            .ok()
            .map(|i| self.entries[i].perm)
    }

    /// The permissions of the mask entry.
    pub fn mask(&self) -> Option<u8> {
        self.perm(Tag::Mask)
    }

    /// Has a mask or named entries: what the kernel calls "not equivalent" to a mode.
    pub(crate) fn is_extended(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.tag == Tag::Mask || e.tag.is_named())
    }

    /// The permission bits (`0o777`) the mode shows for this ACL: owner from
    /// `ACL_USER_OBJ`, group from `ACL_MASK` if there is one, else from `ACL_GROUP_OBJ`,
    /// other from `ACL_OTHER`. 0 for the empty ACL.
    pub(crate) fn mode_bits(&self) -> u32 {
        let p = |tag| self.perm(tag).unwrap_or(0) as u32;
        let group = self.mask().map_or_else(|| p(Tag::GroupObj), u32::from);
        (p(Tag::UserObj) << 6) | (group << 3) | p(Tag::Other)
    }

    /// Like `posix_acl_equiv_mode`: the permission bits (`0o777`) this ACL is equivalent
    /// to, or `None` if the mode cannot stand for it. As in the kernel, any `ACL_MASK`
    /// entry makes an ACL non-equivalent, not only named entries: `u::rw-,g::r--,m::rw-,
    /// o::---` is kept as an ACL (its mode shows group `rw-`, from the mask). `None` for the
    /// empty ACL too, which has no bits of its own.
    // The kernel's rule, stated and tested here; the server has no use for it.
    #[cfg(test)]
    pub(crate) fn equiv_mode(&self) -> Option<u32> {
        if self.is_empty() || self.is_extended() {
            None
        } else {
            Some(self.mode_bits())
        }
    }

    /// The ACL after `chmod(mode)` (`__posix_acl_chmod`): `ACL_USER_OBJ`, `ACL_MASK` (or
    /// `ACL_GROUP_OBJ` when there is no mask) and `ACL_OTHER` take the mode's owner, group
    /// and other bits; named entries and, under a mask, `ACL_GROUP_OBJ` keep theirs. The
    /// empty ACL stays empty.
    pub fn chmod(&self, mode: u32) -> Acl {
        let has_mask = self.mask().is_some();
        let mut acl = self.clone();
        for e in &mut acl.entries {
            let bits = match e.tag {
                Tag::UserObj => mode >> 6,
                Tag::Mask => mode >> 3,
                Tag::GroupObj if !has_mask => mode >> 3,
                Tag::Other => mode,
                _ => continue,
            };
            e.perm = (bits & 7) as u8;
        }
        acl
    }

    /// Decodes an attribute value. A header with no entries is the empty ACL. Rejects,
    /// without panicking on any input: more than [`MAX_VALUE_SIZE`] bytes, no header, a
    /// version other than 2, a length that is not header + whole entries, unknown tags,
    /// permission bits beyond `rwx`, and every ACL the module invariants exclude.
    pub fn decode(value: &[u8]) -> Result<Acl, AclError> {
        let len = value.len();
        if len > MAX_VALUE_SIZE {
            return Err(AclError::TooLarge {
                len,
                cap: MAX_VALUE_SIZE,
            });
        }
        let Some((header, body)) = value.split_first_chunk::<HEADER_SIZE>() else {
            return Err(AclError::Truncated { len });
        };
        let found = u32::from_le_bytes(*header);
        if found != ACL_XATTR_VERSION {
            return Err(AclError::Version { found });
        }
        if body.len() % ENTRY_SIZE != 0 {
            return Err(AclError::Length { len });
        }
        let mut entries = Vec::with_capacity(body.len() / ENTRY_SIZE);
        for (index, raw) in body.chunks_exact(ENTRY_SIZE).enumerate() {
            let tag = u16::from_le_bytes([raw[0], raw[1]]);
            let perm = u16::from_le_bytes([raw[2], raw[3]]);
            let id = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
            let tag = Tag::from_raw(tag, id).ok_or(AclError::UnknownTag { index, tag })?;
            if perm & !(RWX as u16) != 0 {
                return Err(AclError::Perm { index, perm });
            }
            entries.push(Entry::new(tag, perm as u8));
        }
        validate(&entries)?;
        Ok(Acl { entries })
    }

    /// What a setxattr of `value` on one of the ACL names asks for: `Ok(None)` to remove
    /// the ACL (a zero-length value, which the kernel never parses, or a header with no
    /// entries), `Ok(Some(acl))` to set it.
    pub fn decode_for_setxattr(value: &[u8]) -> Result<Option<Acl>, AclError> {
        if value.is_empty() {
            return Ok(None);
        }
        let acl = Acl::decode(value)?;
        Ok((!acl.is_empty()).then_some(acl))
    }

    /// Bytes of the encoded value.
    pub(crate) fn encoded_len(&self) -> usize {
        HEADER_SIZE + ENTRY_SIZE * self.entries.len()
    }

    /// The attribute value: the header and the entries in canonical order, the unnamed
    /// entries with the id [`ACL_UNDEFINED_ID`]. Never more than [`MAX_VALUE_SIZE`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&ACL_XATTR_VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.tag.value().to_le_bytes());
            out.extend_from_slice(&u16::from(e.perm).to_le_bytes());
            out.extend_from_slice(&e.tag.id().unwrap_or(ACL_UNDEFINED_ID).to_le_bytes());
        }
        out
    }
}

impl fmt::Display for Acl {
    /// The acl(5) short text form with numeric ids: `user::rw-,user:1000:r--,…`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The module invariants on a list of entries (empty passes).
fn validate(entries: &[Entry]) -> Result<(), AclError> {
    if entries.is_empty() {
        return Ok(());
    }
    if entries.len() > MAX_ENTRIES {
        return Err(AclError::TooLarge {
            len: HEADER_SIZE + ENTRY_SIZE * entries.len(),
            cap: MAX_VALUE_SIZE,
        });
    }
    for (index, e) in entries.iter().enumerate() {
        if e.perm & !RWX != 0 {
            return Err(AclError::Perm {
                index,
                perm: e.perm.into(),
            });
        }
        if e.tag.id() == Some(ACL_UNDEFINED_ID) {
            return Err(AclError::UndefinedId { index });
        }
        if let Some(prev) = index.checked_sub(1).map(|p| entries[p].tag) {
            match prev.cmp(&e.tag) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => return Err(AclError::Duplicate { index, tag: e.tag }),
                std::cmp::Ordering::Greater => {
                    return Err(AclError::OutOfOrder { index, tag: e.tag })
                }
            }
        }
    }
    // Sorted with no repeats: each unnamed tag is there at most once.
    let has = |tag| entries.iter().any(|e| e.tag == tag);
    for (tag, name) in [
        (Tag::UserObj, "ACL_USER_OBJ"),
        (Tag::GroupObj, "ACL_GROUP_OBJ"),
        (Tag::Other, "ACL_OTHER"),
    ] {
        if !has(tag) {
            return Err(AclError::Missing(name));
        }
    }
    if !has(Tag::Mask) && entries.iter().any(|e| e.tag.is_named()) {
        return Err(AclError::MaskRequired);
    }
    Ok(())
}

/// Setting access ACL `acl` on an inode of mode `mode` (`posix_acl_update_mode`): the new
/// mode (its permission bits from [`Acl::mode_bits`], its file type and `S_ISUID`,
/// `S_ISGID`, `S_ISVTX` bits as given) and the ACL to store, `None` when the mode is
/// equivalent to it and the attribute is removed instead.
///
/// The caller then clears `S_ISGID` (`0o2000`) from the mode if
/// [`should_kill_sgid_on_acl_set`] says so. The empty ACL (a removal) leaves the mode as it
/// is, as the kernel does, and that without the `S_ISGID` rule.
pub fn update_mode(acl: &Acl, mode: u32) -> (u32, Option<Acl>) {
    if acl.is_empty() {
        return (mode, None);
    }
    let mode = (mode & !S_IRWXUGO) | acl.mode_bits();
    (mode, acl.is_extended().then(|| acl.clone()))
}

/// Whether setting a (non-empty) access ACL clears `S_ISGID` from the mode, as the kernel's
/// `posix_acl_update_mode` does, like chmod: unless the caller is in the file's owning
/// group (fsgid or a supplementary group: [`Caller::in_group`]) or has `CAP_FSETID`.
// The kernel's rule, stated and tested here; the server has no use for it.
#[cfg(test)]
pub(crate) fn should_kill_sgid_on_acl_set(
    caller_in_owning_group: bool,
    caller_has_cap_fsetid: bool,
) -> bool {
    !caller_in_owning_group && !caller_has_cap_fsetid
}

/// A new inode's mode and access ACL from its parent's default ACL
/// (`posix_acl_create_masq`). `mode` is the mode the create asked for, *before* any umask:
/// a default ACL replaces the umask. The owner, group and other bits of the mode are ANDed
/// with `ACL_USER_OBJ`, with `ACL_MASK` if there is one (else `ACL_GROUP_OBJ`) and with
/// `ACL_OTHER`, and those entries of the returned ACL with the mode's bits; the other
/// entries (named ones, and `ACL_GROUP_OBJ` under a mask) are inherited unchanged. The
/// rest of the mode (file type, set-id and sticky bits) is kept. An empty default ACL gives
/// `(mode, empty)`; [`inherit`] treats it as no default ACL.
pub(crate) fn create_masq(default_acl: &Acl, mode: u32) -> (u32, Acl) {
    if default_acl.is_empty() {
        return (mode, Acl::default());
    }
    let has_mask = default_acl.mask().is_some();
    let mut acl = default_acl.clone();
    for e in &mut acl.entries {
        let bits = match e.tag {
            Tag::UserObj => mode >> 6,
            Tag::Mask => mode >> 3,
            Tag::GroupObj if !has_mask => mode >> 3,
            Tag::Other => mode,
            _ => continue,
        };
        e.perm &= (bits & 7) as u8;
    }
    ((mode & !S_IRWXUGO) | acl.mode_bits(), acl)
}

/// What a new inode starts with ([`inherit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inherited {
    /// The mode to create the inode with.
    pub mode: u32,
    /// The access ACL to store, `None` when the mode is equivalent to it.
    pub access: Option<Acl>,
    /// The default ACL to store (directories inherit their parent's).
    pub default: Option<Acl>,
}

/// The whole of `posix_acl_create` for a new inode of mode `mode` (as asked, before the
/// umask) in a directory whose default ACL is `parent_default`:
/// * no default ACL (or an empty one): the mode less `umask`, no ACLs;
/// * a default ACL: the mode and access ACL of [`create_masq`], the umask ignored; the
///   access ACL stored only if it is extended; a directory (`is_dir`) also gets the
///   parent's default ACL as its own.
///
/// A symbolic link (`mode` of type `S_IFLNK`) gets neither ACLs nor the umask, as in the
/// kernel: its mode is returned unchanged.
pub fn inherit(parent_default: Option<&Acl>, mode: u32, umask: u32, is_dir: bool) -> Inherited {
    if mode & S_IFMT == S_IFLNK {
        return Inherited {
            mode,
            access: None,
            default: None,
        };
    }
    match parent_default.filter(|d| !d.is_empty()) {
        None => Inherited {
            mode: mode & !(umask & S_IRWXUGO),
            access: None,
            default: None,
        },
        Some(d) => {
            let (mode, access) = create_masq(d, mode);
            Inherited {
                mode,
                access: access.is_extended().then_some(access),
                default: is_dir.then(|| d.clone()),
            }
        }
    }
}

/// Who asks: the fsuid/fsgid of the request, the supplementary groups and the
/// capabilities that matter to permission checks, all effective.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller {
    pub uid: u32,
    /// The fsgid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// `CAP_DAC_OVERRIDE`: bypasses read and write checks, and execute checks on files
    /// with some execute bit and on directories.
    pub cap_dac_override: bool,
    /// `CAP_DAC_READ_SEARCH`: bypasses read checks, and read and search checks on
    /// directories.
    pub cap_dac_read_search: bool,
    /// `CAP_FOWNER`: acts as the owner (setting ACLs, chmod).
    pub cap_fowner: bool,
    /// `CAP_FSETID`: keeps `S_ISGID` when not in the owning group.
    pub cap_fsetid: bool,
}

impl Caller {
    /// `in_group_p`: `gid` is the fsgid or one of the supplementary groups.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// `inode_owner_or_capable`: the caller owns an inode owned by `owner_uid` or has
    /// `CAP_FOWNER`; what setting either ACL (and chmod) requires.
    // The kernel's rule, stated and tested here; the server has no use for it.
    #[cfg(test)]
    pub(crate) fn is_owner_or_capable(&self, owner_uid: u32) -> bool {
        self.uid == owner_uid || self.cap_fowner
    }
}

/// Whether `caller` may access an inode with the `rwx` bits `want` ([`READ`], [`WRITE`],
/// [`EXECUTE`]; execute is search on a directory), as the kernel's `generic_permission`
/// decides for an inode of mode `mode` owned by `owner_uid`:`owner_gid` with access ACL
/// `acl` (`None` or empty: no ACL):
/// 1. the owner gets the mode's owner bits (the ACL is not consulted);
/// 2. else, if there is an ACL *and the mode has some group bit set*, the ACL alone decides
///    (`posix_acl_permission`): a named user entry matching the uid, masked; else the
///    owning group and the named groups the caller is in: allowed if one of them, masked,
///    grants all of `want`, denied if none does; else `ACL_OTHER`. With all group bits
///    clear the kernel skips the ACL and step 3 decides, so a named user whose entry is
///    masked to nothing gets the other bits;
/// 3. else the mode's group bits if the caller is in the owning group, the other bits if
///    not;
/// 4. a denial is overridden by `CAP_DAC_READ_SEARCH` for reading a file and for reading
///    or searching a directory, and by `CAP_DAC_OVERRIDE` for anything on a directory and
///    for reading and writing a file, and executing it too if the mode has some execute
///    bit.
///
/// `want == 0` is always allowed.
pub fn permission(
    acl: Option<&Acl>,
    mode: u32,
    owner_uid: u32,
    owner_gid: u32,
    caller: &Caller,
    want: u8,
    is_dir: bool,
) -> bool {
    let want = want & RWX;
    if dac_permits(acl, mode, owner_uid, owner_gid, caller, want) {
        return true;
    }
    if is_dir {
        return (want & WRITE == 0 && caller.cap_dac_read_search) || caller.cap_dac_override;
    }
    if want == READ && caller.cap_dac_read_search {
        return true;
    }
    (want & EXECUTE == 0 || mode & S_IXUGO != 0) && caller.cap_dac_override
}

/// `acl_permission_check`: steps 1 to 3 of [`permission`], no capabilities.
fn dac_permits(
    acl: Option<&Acl>,
    mode: u32,
    owner_uid: u32,
    owner_gid: u32,
    caller: &Caller,
    want: u8,
) -> bool {
    let grants = |bits: u32| want & !((bits & 7) as u8) == 0;
    if caller.uid == owner_uid {
        return grants(mode >> 6);
    }
    if let Some(acl) = acl.filter(|a| !a.is_empty()) {
        if mode & 0o070 != 0 {
            return acl_permits(acl, owner_uid, owner_gid, caller, want);
        }
    }
    if caller.in_group(owner_gid) {
        grants(mode >> 3)
    } else {
        grants(mode)
    }
}

/// `posix_acl_permission` on a valid, non-empty ACL.
fn acl_permits(acl: &Acl, owner_uid: u32, owner_gid: u32, caller: &Caller, want: u8) -> bool {
    let mask = acl.mask().unwrap_or(RWX);
    let has = |perm: u8| perm & want == want;
    let mut in_group_class = false;
    for e in acl.entries() {
        match e.tag {
            Tag::UserObj if caller.uid == owner_uid => return has(e.perm),
            Tag::User(uid) if caller.uid == uid => return has(e.perm & mask),
            Tag::GroupObj | Tag::Group(_) => {
                let gid = e.tag.id().unwrap_or(owner_gid);
                if caller.in_group(gid) {
                    in_group_class = true;
                    // The first matching entry that grants everything decides, masked:
                    // the mask is the same for all, so no later one could do better.
                    if has(e.perm) {
                        return has(e.perm & mask);
                    }
                }
            }
            Tag::Other => return !in_group_class && has(e.perm),
            _ => {}
        }
    }
    // A valid ACL ends with ACL_OTHER; the kernel answers EIO for one that does not.
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;

    /// An ACL from the acl(5) short text form with numeric ids, `u::rw-,u:1000:r--,g::r--,
    /// m::r--,o::---`, in any order.
    fn acl(text: &str) -> Acl {
        try_acl(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn try_acl(text: &str) -> Result<Acl, AclError> {
        Acl::new(entries(text))
    }

    fn entries(text: &str) -> Vec<Entry> {
        text.split(',')
            .map(|e| {
                let parts: Vec<&str> = e.trim().split(':').collect();
                assert_eq!(parts.len(), 3, "{e}");
                let id = || parts[1].parse::<u32>().unwrap();
                let tag = match (parts[0], parts[1].is_empty()) {
                    ("u" | "user", true) => Tag::UserObj,
                    ("u" | "user", false) => Tag::User(id()),
                    ("g" | "group", true) => Tag::GroupObj,
                    ("g" | "group", false) => Tag::Group(id()),
                    ("m" | "mask", true) => Tag::Mask,
                    ("o" | "other", true) => Tag::Other,
                    _ => panic!("{e}"),
                };
                let p = parts[2].as_bytes();
                assert_eq!(p.len(), 3, "{e}");
                let bit = |i: usize, c: u8, b: u8| match p[i] {
                    x if x == c => b,
                    b'-' => 0,
                    _ => panic!("{e}"),
                };
                Entry::new(
                    tag,
                    bit(0, b'r', READ) | bit(1, b'w', WRITE) | bit(2, b'x', EXECUTE),
                )
            })
            .collect()
    }

    /// Raw value bytes: header of `version`, then `(tag, perm, id)` entries.
    fn raw(version: u32, entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut b = version.to_le_bytes().to_vec();
        for &(t, p, i) in entries {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&p.to_le_bytes());
            b.extend_from_slice(&i.to_le_bytes());
        }
        b
    }

    const U: u32 = ACL_UNDEFINED_ID;

    #[test]
    fn the_constants_are_linuxs() {
        assert_eq!(ACCESS_XATTR, b"system.posix_acl_access");
        assert_eq!(DEFAULT_XATTR, b"system.posix_acl_default");
        assert_eq!(
            [
                ACL_USER_OBJ,
                ACL_USER,
                ACL_GROUP_OBJ,
                ACL_GROUP,
                ACL_MASK,
                ACL_OTHER
            ],
            [0x01, 0x02, 0x04, 0x08, 0x10, 0x20]
        );
        assert_eq!((READ, WRITE, EXECUTE), (4, 2, 1));
        assert_eq!(ACL_XATTR_VERSION, 2);
        assert_eq!(ACL_UNDEFINED_ID, 0xFFFF_FFFF);
        assert_eq!(MAX_ENTRIES, 8191);
        // The derived order of tags is the order of their values, then of ids.
        let tags = [
            Tag::UserObj,
            Tag::User(0),
            Tag::User(7),
            Tag::GroupObj,
            Tag::Group(0),
            Tag::Group(7),
            Tag::Mask,
            Tag::Other,
        ];
        for w in tags.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].value() <= w[1].value());
        }
    }

    #[test]
    fn encoding_is_the_documented_bytes_and_round_trips() {
        let a = acl("u::rw-,u:1000:rwx,g::r--,g:50:r-x,m::rwx,o::r--");
        let b = a.encode();
        assert_eq!(
            b,
            raw(
                2,
                &[
                    (0x01, 6, U),
                    (0x02, 7, 1000),
                    (0x04, 4, U),
                    (0x08, 5, 50),
                    (0x10, 7, U),
                    (0x20, 4, U)
                ]
            )
        );
        assert_eq!(b.len(), a.encoded_len());
        assert_eq!(Acl::decode(&b).unwrap(), a);
        assert_eq!(
            a.to_string(),
            "user::rw-,user:1000:rwx,group::r--,group:50:r-x,mask::rwx,other::r--"
        );
        // The ids of unnamed entries are ignored on read and rewritten.
        let odd = raw(2, &[(0x01, 6, 0), (0x04, 4, 1234), (0x20, 0, 9)]);
        let a = Acl::decode(&odd).unwrap();
        assert_eq!(a, Acl::from_mode(0o640));
        assert_eq!(
            a.encode(),
            raw(2, &[(0x01, 6, U), (0x04, 4, U), (0x20, 0, U)])
        );
        // Header only: the empty ACL, and a removal when set.
        let empty = Acl::decode(&raw(2, &[])).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.encode(), raw(2, &[]));
        assert_eq!(Acl::decode_for_setxattr(&raw(2, &[])), Ok(None));
        assert_eq!(Acl::decode_for_setxattr(&[]), Ok(None));
        assert_eq!(
            Acl::decode_for_setxattr(&Acl::from_mode(0o644).encode()),
            Ok(Some(Acl::from_mode(0o644)))
        );
        assert!(Acl::decode_for_setxattr(&[2, 0, 0]).is_err());
    }

    #[test]
    fn every_invalid_form_is_rejected() {
        use AclError::*;
        let base = [(0x01, 6, U), (0x04, 4, U), (0x20, 4, U)];
        let cases: Vec<(Vec<u8>, AclError)> = vec![
            (vec![], Truncated { len: 0 }),
            (vec![2, 0, 0], Truncated { len: 3 }),
            (raw(1, &base), Version { found: 1 }),
            (raw(0, &[]), Version { found: 0 }),
            (raw(0x0200_0000, &base), Version { found: 0x0200_0000 }),
            ([raw(2, &base), vec![0]].concat(), Length { len: 29 }),
            ([raw(2, &base), vec![0; 7]].concat(), Length { len: 35 }),
            (
                vec![0; MAX_VALUE_SIZE + 1],
                TooLarge {
                    len: MAX_VALUE_SIZE + 1,
                    cap: MAX_VALUE_SIZE,
                },
            ),
            (
                raw(2, &[(0x01, 6, U), (0x03, 4, U), (0x20, 4, U)]),
                UnknownTag { index: 1, tag: 3 },
            ),
            (raw(2, &[(0, 0, 0)]), UnknownTag { index: 0, tag: 0 }),
            (
                raw(2, &[(0x01, 6, U), (0x04, 4, U), (0x40, 4, U)]),
                UnknownTag {
                    index: 2,
                    tag: 0x40,
                },
            ),
            (
                raw(2, &[(0x01, 8, U), (0x04, 4, U), (0x20, 4, U)]),
                Perm { index: 0, perm: 8 },
            ),
            (
                raw(2, &[(0x01, 6, U), (0x04, 0x104, U), (0x20, 4, U)]),
                Perm {
                    index: 1,
                    perm: 0x104,
                },
            ),
            (
                raw(
                    2,
                    &[
                        (0x01, 6, U),
                        (0x02, 4, U),
                        (0x04, 4, U),
                        (0x10, 4, U),
                        (0x20, 4, U),
                    ],
                ),
                UndefinedId { index: 1 },
            ),
            (
                raw(
                    2,
                    &[
                        (0x01, 6, U),
                        (0x04, 4, U),
                        (0x08, 4, U),
                        (0x10, 4, U),
                        (0x20, 4, U),
                    ],
                ),
                UndefinedId { index: 2 },
            ),
            (
                raw(2, &[(0x04, 4, U), (0x20, 4, U)]),
                Missing("ACL_USER_OBJ"),
            ),
            (
                raw(2, &[(0x01, 4, U), (0x20, 4, U)]),
                Missing("ACL_GROUP_OBJ"),
            ),
            (raw(2, &[(0x01, 4, U), (0x04, 4, U)]), Missing("ACL_OTHER")),
            (
                raw(2, &[(0x01, 4, U), (0x04, 4, U), (0x10, 4, U)]),
                Missing("ACL_OTHER"),
            ),
            (raw(2, &[(0x20, 4, U)]), Missing("ACL_USER_OBJ")),
            (
                raw(2, &[(0x01, 6, U), (0x01, 6, U), (0x04, 4, U), (0x20, 4, U)]),
                Duplicate {
                    index: 1,
                    tag: Tag::UserObj,
                },
            ),
            (
                raw(2, &[(0x01, 6, U), (0x04, 4, U), (0x04, 4, U), (0x20, 4, U)]),
                Duplicate {
                    index: 2,
                    tag: Tag::GroupObj,
                },
            ),
            (
                raw(
                    2,
                    &[
                        (0x01, 6, U),
                        (0x04, 4, U),
                        (0x10, 4, U),
                        (0x10, 4, U),
                        (0x20, 4, U),
                    ],
                ),
                Duplicate {
                    index: 3,
                    tag: Tag::Mask,
                },
            ),
            (
                raw(2, &[(0x01, 6, U), (0x04, 4, U), (0x20, 4, U), (0x20, 4, U)]),
                Duplicate {
                    index: 3,
                    tag: Tag::Other,
                },
            ),
            (
                raw(
                    2,
                    &[
                        (0x01, 6, U),
                        (0x02, 4, 5),
                        (0x02, 6, 5),
                        (0x04, 4, U),
                        (0x10, 4, U),
                        (0x20, 4, U),
                    ],
                ),
                Duplicate {
                    index: 2,
                    tag: Tag::User(5),
                },
            ),
            (
                raw(
                    2,
                    &[
                        (0x01, 6, U),
                        (0x04, 4, U),
                        (0x08, 4, 5),
                        (0x08, 6, 5),
                        (0x10, 4, U),
                        (0x20, 4, U),
                    ],
                ),
                Duplicate {
                    index: 3,
                    tag: Tag::Group(5),
                },
            ),
            (
                raw(
                    2,
                    &[
                        (0x01, 6, U),
                        (0x02, 4, 9),
                        (0x02, 4, 5),
                        (0x04, 4, U),
                        (0x10, 4, U),
                        (0x20, 4, U),
                    ],
                ),
                OutOfOrder {
                    index: 2,
                    tag: Tag::User(5),
                },
            ),
            (
                raw(
                    2,
                    &[
                        (0x01, 6, U),
                        (0x04, 4, U),
                        (0x08, 4, 9),
                        (0x08, 4, 5),
                        (0x10, 4, U),
                        (0x20, 4, U),
                    ],
                ),
                OutOfOrder {
                    index: 3,
                    tag: Tag::Group(5),
                },
            ),
            (
                raw(2, &[(0x04, 4, U), (0x01, 6, U), (0x20, 4, U)]),
                OutOfOrder {
                    index: 1,
                    tag: Tag::UserObj,
                },
            ),
            (
                raw(2, &[(0x01, 6, U), (0x04, 4, U), (0x20, 4, U), (0x10, 4, U)]),
                OutOfOrder {
                    index: 3,
                    tag: Tag::Mask,
                },
            ),
            (
                raw(
                    2,
                    &[
                        (0x01, 6, U),
                        (0x04, 4, U),
                        (0x02, 4, 5),
                        (0x10, 4, U),
                        (0x20, 4, U),
                    ],
                ),
                OutOfOrder {
                    index: 2,
                    tag: Tag::User(5),
                },
            ),
            (
                raw(
                    2,
                    &[
                        (0x01, 6, U),
                        (0x04, 4, U),
                        (0x10, 4, U),
                        (0x08, 4, 5),
                        (0x20, 4, U),
                    ],
                ),
                OutOfOrder {
                    index: 3,
                    tag: Tag::Group(5),
                },
            ),
            (
                raw(2, &[(0x01, 6, U), (0x02, 4, 5), (0x04, 4, U), (0x20, 4, U)]),
                MaskRequired,
            ),
            (
                raw(2, &[(0x01, 6, U), (0x04, 4, U), (0x08, 4, 5), (0x20, 4, U)]),
                MaskRequired,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(Acl::decode(&bytes), Err(want.clone()), "{bytes:?}");
            assert!(!want.to_string().is_empty());
            let errno = want.errno();
            assert!([EINVAL, EOPNOTSUPP, E2BIG].contains(&errno));
        }
        assert_eq!(Version { found: 1 }.errno(), EOPNOTSUPP);
        assert_eq!(MaskRequired.errno(), EINVAL);
        // The largest value decodes; one more entry is over the cap.
        let mut many = vec![(0x01, 6, U)];
        many.extend((0..MAX_ENTRIES as u32 - 4).map(|id| (0x02, 4, id)));
        many.extend([(0x04, 4, U), (0x10, 4, U), (0x20, 4, U)]);
        let b = raw(2, &many);
        assert_eq!(b.len(), MAX_VALUE_SIZE - 4);
        let a = Acl::decode(&b).unwrap();
        assert_eq!(a.entries().len(), MAX_ENTRIES);
        assert_eq!(a.encode(), b);
        let mut more = a.entries().to_vec();
        more.push(Entry::new(Tag::Group(1), 0));
        assert!(matches!(Acl::new(more), Err(TooLarge { .. })));
        // The constructor sorts, then checks the same rules.
        assert_eq!(
            try_acl("o::r--,u:5:r--,m::r--,g::r--,u::rw-")
                .unwrap()
                .to_string(),
            "user::rw-,user:5:r--,group::r--,mask::r--,other::r--"
        );
        assert_eq!(try_acl("u::rw-,u:5:r--,g::r--,o::r--"), Err(MaskRequired));
        assert_eq!(
            try_acl("u::rw-,u:5:r--,u:5:rw-,g::r--,m::rw-,o::r--"),
            Err(Duplicate {
                index: 2,
                tag: Tag::User(5)
            })
        );
        assert_eq!(
            Acl::new(vec![Entry::new(Tag::UserObj, 8)]),
            Err(Perm { index: 0, perm: 8 })
        );
        assert_eq!(Acl::new(vec![]), Ok(Acl::default()));
        // Into the crate's error: corrupted, except the version.
        assert!(matches!(
            FormatError::from(MaskRequired),
            FormatError::Corrupted { .. }
        ));
        assert!(matches!(
            FormatError::from(Version { found: 3 }),
            FormatError::UnsupportedVersion {
                found: 3,
                supported: 2,
                ..
            }
        ));
    }

    #[test]
    fn equiv_mode_follows_the_kernel() {
        let cases: &[(&str, Option<u32>)] = &[
            // acl(5): a minimal ACL is the mode.
            ("u::rw-,g::r--,o::r--", Some(0o644)),
            ("u::rwx,g::r-x,o::---", Some(0o750)),
            ("u::---,g::---,o::---", Some(0o000)),
            // Any mask is "not equivalent", named entries or not.
            ("u::rw-,g::r--,m::rw-,o::---", None),
            ("u::rw-,g::r--,m::r--,o::---", None),
            ("u::rw-,u:1000:rw-,g::r--,m::rw-,o::---", None),
            ("u::rw-,g::r--,g:10:rwx,m::rwx,o::---", None),
        ];
        for &(text, want) in cases {
            assert_eq!(acl(text).equiv_mode(), want, "{text}");
        }
        assert_eq!(Acl::default().equiv_mode(), None);
        for mode in [0, 0o644, 0o755, 0o777, 0o421] {
            assert_eq!(Acl::from_mode(mode).equiv_mode(), Some(mode));
            assert_eq!(Acl::from_mode(mode | 0o107000).mode_bits(), mode);
        }
        assert_eq!(
            acl("u::rw-,u:1000:rwx,g::r--,m::r-x,o::-w-").mode_bits(),
            0o652
        );
    }

    #[test]
    fn update_mode_follows_the_kernel() {
        const REG: u32 = 0o100000;
        // (ACL set, mode before, mode after, ACL stored?)
        let cases: &[(&str, u32, u32, bool)] = &[
            // setfacl -m u:bob:rwx on a 0644 file: the mask is rwx, ls shows 0674 and a +.
            (
                "u::rw-,u:1000:rwx,g::r--,m::rwx,o::r--",
                REG | 0o644,
                REG | 0o674,
                true,
            ),
            // A minimal ACL only changes the mode; nothing is stored.
            ("u::rwx,g::r-x,o::---", REG | 0o644, REG | 0o750, false),
            ("u::rw-,g::r--,o::r--", REG | 0o777, REG | 0o644, false),
            // The group bits come from the mask, not from the owning group's entry.
            (
                "u::rw-,g::rwx,m::r--,o::---",
                REG | 0o600,
                REG | 0o640,
                true,
            ),
            (
                "u::rw-,g:7:rw-,g::r--,m::---,o::r--",
                REG | 0o664,
                REG | 0o604,
                true,
            ),
            // File type, set-id and sticky bits are kept as given.
            ("u::rwx,g::r-x,o::r-x", REG | 0o6700, REG | 0o6755, false),
            ("u::rwx,g::rwx,o::rwx", 0o041000, 0o041777, false),
        ];
        for &(text, before, after, stored) in cases {
            let a = acl(text);
            let (mode, keep) = update_mode(&a, before);
            assert_eq!(mode, after, "{text}: {mode:o}");
            assert_eq!(keep, stored.then(|| a.clone()), "{text}");
        }
        // Setting the empty ACL is a removal: the mode stays.
        assert_eq!(
            update_mode(&Acl::default(), REG | 0o2751),
            (REG | 0o2751, None)
        );
        assert!(should_kill_sgid_on_acl_set(false, false));
        assert!(!should_kill_sgid_on_acl_set(true, false));
        assert!(!should_kill_sgid_on_acl_set(false, true));
        assert!(!should_kill_sgid_on_acl_set(true, true));
    }

    #[test]
    fn chmod_rewrites_the_mode_entries() {
        let a = acl("u::rw-,u:1000:rwx,g::r-x,g:50:r--,m::rwx,o::r--");
        assert_eq!(
            a.chmod(0o100640).to_string(),
            "user::rw-,user:1000:rwx,group::r-x,group:50:r--,mask::r--,other::---"
        );
        assert_eq!(
            acl("u::rw-,g::r--,o::r--").chmod(0o751),
            Acl::from_mode(0o751)
        );
        assert_eq!(Acl::default().chmod(0o777), Acl::default());
        // After chmod the mode is what the ACL shows.
        for mode in [0o000, 0o640, 0o777, 0o1755] {
            assert_eq!(a.chmod(mode).mode_bits(), mode & 0o777);
            assert_eq!(update_mode(&a.chmod(mode), mode).0, mode);
        }
    }

    #[test]
    fn create_masq_and_inherit_follow_the_kernel() {
        const REG: u32 = 0o100000;
        const DIR: u32 = 0o040000;
        // (parent default ACL, requested mode, new mode, new access ACL)
        let cases: &[(&str, u32, u32, &str)] = &[
            // A minimal default ACL: the mode, ANDed; no umask.
            (
                "u::rwx,g::r-x,o::r-x",
                REG | 0o666,
                REG | 0o644,
                "u::rw-,g::r--,o::r--",
            ),
            (
                "u::rwx,g::r-x,o::r-x",
                DIR | 0o777,
                DIR | 0o755,
                "u::rwx,g::r-x,o::r-x",
            ),
            (
                "u::rwx,g::rwx,o::rwx",
                REG | 0o640,
                REG | 0o640,
                "u::rw-,g::r--,o::---",
            ),
            // acl(5): a named user's rights in a new file are limited by the mask, which
            // the create mode limits: creat(0666) under u:1000:rwx gives user:1000:rwx
            // with an rw- mask (getfacl: #effective:rw-).
            (
                "u::rwx,u:1000:rwx,g::r-x,m::rwx,o::---",
                REG | 0o666,
                REG | 0o660,
                "u::rw-,u:1000:rwx,g::r-x,m::rw-,o::---",
            ),
            // Under a mask, the owning group's entry is kept; the mask is ANDed.
            (
                "u::rwx,g::rwx,g:50:r-x,m::r-x,o::r--",
                DIR | 0o750,
                DIR | 0o750,
                "u::rwx,g::rwx,g:50:r-x,m::r-x,o::---",
            ),
            // Set-id and sticky bits of the request are kept.
            (
                "u::rwx,g::rwx,o::---",
                DIR | 0o3777,
                DIR | 0o3770,
                "u::rwx,g::rwx,o::---",
            ),
        ];
        for &(default, asked, mode, access) in cases {
            let d = acl(default);
            let (m, a) = create_masq(&d, asked);
            assert_eq!(m, mode, "{default} {asked:o}: {m:o}");
            assert_eq!(a, acl(access), "{default} {asked:o}");
            let is_dir = asked & S_IFMT == DIR;
            // The umask is ignored when there is a default ACL.
            for umask in [0, 0o022, 0o077] {
                let i = inherit(Some(&d), asked, umask, is_dir);
                assert_eq!(i.mode, mode);
                assert_eq!(i.access, a.is_extended().then(|| a.clone()));
                assert_eq!(i.default, is_dir.then(|| d.clone()), "directories inherit");
            }
        }
        // No default ACL (or an empty one): the umask, no ACLs.
        for parent in [None, Some(&Acl::default())] {
            for (asked, umask, mode) in [
                (REG | 0o666, 0o022, REG | 0o644),
                (REG | 0o666, 0o077, REG | 0o600),
                (DIR | 0o777, 0o027, DIR | 0o750),
                (DIR | 0o1777, 0o7022, DIR | 0o1755),
            ] {
                let none = Inherited {
                    mode,
                    access: None,
                    default: None,
                };
                assert_eq!(inherit(parent, asked, umask, asked & S_IFMT == DIR), none);
            }
        }
        // Symbolic links: neither ACLs nor the umask.
        let d = acl("u::rwx,u:5:rwx,g::---,m::---,o::---");
        for parent in [None, Some(&d)] {
            assert_eq!(
                inherit(parent, S_IFLNK | 0o777, 0o077, false),
                Inherited {
                    mode: S_IFLNK | 0o777,
                    access: None,
                    default: None
                }
            );
        }
        assert_eq!(create_masq(&Acl::default(), 0o666), (0o666, Acl::default()));
    }

    fn user(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        Caller {
            uid,
            gid,
            groups: groups.to_vec(),
            ..Caller::default()
        }
    }

    fn root() -> Caller {
        Caller {
            cap_dac_override: true,
            cap_dac_read_search: true,
            cap_fowner: true,
            cap_fsetid: true,
            ..user(0, 0, &[])
        }
    }

    const R: u8 = READ;
    const W: u8 = WRITE;
    const X: u8 = EXECUTE;

    #[test]
    fn permission_follows_the_kernel() {
        // File owned by 100:10.
        let (ou, og) = (100, 10);
        let owner = user(ou, og, &[]);
        let bob = user(1000, 20, &[]);
        let lisa = user(1001, 30, &[]);
        let member = user(2000, 10, &[]);
        let staff = user(2001, 40, &[50]);
        let both = user(1000, 20, &[50]);
        let stranger = user(3000, 60, &[]);

        let named = acl("u::rw-,u:1000:rwx,u:1001:r--,g::r--,g:50:rw-,m::r-x,o::---");
        let mode = 0o100000 | named.mode_bits(); // 0650
        assert_eq!(mode & 0o777, 0o650);
        // (who, want, allowed)
        let cases: &[(&Caller, u8, bool)] = &[
            // The owner: the mode's owner bits.
            (&owner, R | W, true),
            (&owner, X, false),
            // A named user: the entry ANDed with the mask (rwx & r-x).
            (&bob, R | X, true),
            (&bob, W, false),
            (&lisa, R, true),
            (&lisa, X, false),
            // The owning group: g::r-- (masked) grants r, not x, and denies rather than
            // falling back to other.
            (&member, R, true),
            (&member, R | X, false),
            // A named group: g:50:rw- masked to r--.
            (&staff, R, true),
            (&staff, W, false),
            // A named user match wins over groups.
            (&both, X, true),
            (&both, W, false),
            // Everyone else: other.
            (&stranger, R, false),
            (&stranger, 0, true),
        ];
        for &(who, want, allowed) in cases {
            assert_eq!(
                permission(Some(&named), mode, ou, og, who, want, false),
                allowed,
                "uid {} want {want}",
                who.uid
            );
        }

        // The group class union: denied only if no matching group entry grants it all.
        let groups = acl("u::rw-,g::r--,g:50:-w-,g:51:rw-,m::rwx,o::r--");
        let gmode = 0o100000 | groups.mode_bits();
        let in_50 = user(5, 50, &[]);
        let in_50_51 = user(5, 50, &[51]);
        let in_10_50 = user(5, 10, &[50]);
        let out = user(5, 99, &[]);
        for (who, want, allowed) in [
            (&in_50, W, true),
            (&in_50, R, false), // matched a group, so not other's r--
            (&in_50_51, R | W, true),
            (&in_10_50, R, true),
            (&in_10_50, W, true),
            (&in_10_50, R | W, false), // no single entry grants rw
            (&out, R, true),
            (&out, W, false),
        ] {
            assert_eq!(
                permission(Some(&groups), gmode, ou, og, who, want, false),
                allowed,
                "groups {:?} want {want}",
                who.groups
            );
        }
        // The mask limits the group class, not other or the owner.
        let masked = acl("u::rw-,g::rw-,g:50:rw-,m::r--,o::rw-");
        let mmode = masked.mode_bits();
        assert!(!permission(Some(&masked), mmode, ou, og, &member, W, false));
        assert!(!permission(Some(&masked), mmode, ou, og, &in_50, W, false));
        assert!(permission(Some(&masked), mmode, ou, og, &out, W, false));
        assert!(permission(Some(&masked), mmode, ou, og, &owner, W, false));

        // The kernel's quirk: with all group bits clear the ACL is not consulted, so a
        // named user masked to nothing gets the other bits.
        let nothing = acl("u::rw-,u:1000:rwx,g::r--,m::---,o::r--");
        let nmode = nothing.mode_bits();
        assert_eq!(nmode, 0o604);
        assert!(permission(Some(&nothing), nmode, ou, og, &bob, R, false));
        assert!(!permission(
            Some(&nothing),
            nmode,
            ou,
            og,
            &member,
            R,
            false
        ));
        assert!(!permission(
            Some(&nothing),
            nmode | 0o010,
            ou,
            og,
            &bob,
            R,
            false
        ));

        // No ACL (or an empty one): the mode bits alone.
        for a in [None, Some(&Acl::default())] {
            let m = 0o100640;
            assert!(permission(a, m, ou, og, &owner, R | W, false));
            assert!(permission(a, m, ou, og, &member, R, false));
            assert!(!permission(a, m, ou, og, &member, W, false));
            assert!(!permission(a, m, ou, og, &stranger, R, false));
            // A supplementary group counts as the owning group.
            assert!(permission(a, m, ou, og, &user(7, 99, &[10]), R, false));
            // The owner gets only the owner bits, even if others get more.
            assert!(!permission(a, 0o100077, ou, og, &owner, R, false));
        }
    }

    #[test]
    fn capabilities_override_as_in_the_kernel() {
        let r = root();
        let read_search = Caller {
            cap_dac_read_search: true,
            ..user(5, 5, &[])
        };
        let dac_override = Caller {
            cap_dac_override: true,
            ..user(5, 5, &[])
        };
        let strict = acl("u::---,u:0:---,u:5:---,g::---,m::---,o::---");
        for a in [None, Some(&strict)] {
            // Files: read and write always; execute only with some execute bit.
            for m in [0o100000, 0o100600] {
                assert!(permission(a, m, 1, 1, &r, R | W, false));
                assert!(!permission(a, m, 1, 1, &r, X, false));
                assert!(!permission(a, m, 1, 1, &dac_override, R | X, false));
                assert!(permission(a, m, 1, 1, &read_search, R, false));
                assert!(!permission(a, m, 1, 1, &read_search, W, false));
                assert!(!permission(a, m, 1, 1, &read_search, R | X, false));
            }
            // (Other bits clear, so only the capabilities can grant.)
            for m in [0o100100, 0o100010, 0o100110] {
                assert!(permission(a, m, 1, 1, &r, X, false));
                assert!(permission(a, m, 1, 1, &dac_override, R | W | X, false));
                assert!(!permission(a, m, 1, 1, &read_search, X, false));
            }
            // Directories: read-search reads and searches, override does everything.
            let d = 0o040000;
            assert!(permission(a, d, 1, 1, &r, R | W | X, true));
            assert!(permission(a, d, 1, 1, &dac_override, R | W | X, true));
            assert!(permission(a, d, 1, 1, &read_search, R | X, true));
            assert!(!permission(a, d, 1, 1, &read_search, W, true));
            assert!(!permission(a, d, 1, 1, &read_search, W | X, true));
            // Without capabilities root is nobody special.
            assert!(!permission(a, d, 1, 1, &user(0, 0, &[]), R, true));
        }
        // Root as owner is checked as the owner first, then overridden.
        assert!(permission(None, 0o100000, 0, 0, &r, R | W, false));
        assert!(!permission(None, 0o100000, 0, 0, &r, X, false));
        assert!(r.is_owner_or_capable(1));
        assert!(user(1, 1, &[]).is_owner_or_capable(1));
        assert!(!user(2, 1, &[]).is_owner_or_capable(1));
        assert!(r.in_group(0) && !r.in_group(1));
    }

    /// acl(5) "ACCESS CHECK ALGORITHM", written from the manual: what the kernel computes
    /// when the mode is in sync with the ACL and has some group bit set.
    fn acl5_access_check(acl: &Acl, owner_uid: u32, owner_gid: u32, c: &Caller, want: u8) -> bool {
        let has = |p: u8| p & want == want;
        let mask = acl.mask();
        if c.uid == owner_uid {
            return has(acl.perm(Tag::UserObj).unwrap());
        }
        if let Some(p) = acl.perm(Tag::User(c.uid)) {
            return has(p & mask.unwrap());
        }
        let matching: Vec<u8> = acl
            .entries()
            .iter()
            .filter(|e| match e.tag {
                Tag::GroupObj => c.in_group(owner_gid),
                Tag::Group(g) => c.in_group(g),
                _ => false,
            })
            .map(|e| e.perm)
            .collect();
        if !matching.is_empty() {
            return match mask {
                Some(m) => has(m) && matching.iter().any(|&p| has(p)),
                None => has(matching[0]),
            };
        }
        has(acl.perm(Tag::Other).unwrap())
    }

    const DOC: &str = include_str!("../../docs/format.md");

    /// The tables of the section on ACL values in `docs/format.md`: header and rows, cells
    /// trimmed and unquoted. (`tests/spec.rs` skips them: their columns are their own.)
    fn doc_tables() -> Vec<(Vec<String>, Vec<Vec<String>>)> {
        let heading = "\n### POSIX ACL xattr values\n";
        let start = DOC.find(heading).expect("docs/format.md: no ACL section") + heading.len();
        let section = &DOC[start..];
        let section = &section[..section.find("\n#").unwrap_or(section.len())];
        let cells = |l: &str| -> Vec<String> {
            let l = l.trim().trim_start_matches('|').trim_end_matches('|');
            l.split('|').map(|c| c.trim().replace('`', "")).collect()
        };
        let mut out = Vec::new();
        let mut lines = section.lines().peekable();
        while let Some(l) = lines.next() {
            if !l.starts_with('|') {
                continue;
            }
            let header = cells(l);
            assert!(lines.next().is_some_and(|s| s.starts_with("|---")));
            let mut rows = Vec::new();
            while let Some(r) = lines.next_if(|r| r.starts_with('|')) {
                let r = cells(r);
                assert_eq!(r.len(), header.len(), "{r:?}");
                rows.push(r);
            }
            out.push((header, rows));
        }
        out
    }

    fn doc_number(cell: &str) -> u64 {
        match cell.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => cell.parse(),
        }
        .unwrap_or_else(|_| panic!("`{cell}` is not a number"))
    }

    #[test]
    fn the_format_doc_describes_these_bytes() {
        let t = doc_tables();
        assert_eq!(t.len(), 3, "header, entry and constants tables");
        let layout = ["at", "size", "field", "type", "meaning"];
        // Header: the version, then the entries.
        let (h, rows) = &t[0];
        assert_eq!(h, &layout);
        assert_eq!(rows.len(), 2);
        assert_eq!(&rows[0][..4], ["0", "4", "a_version", "u32"]);
        assert_eq!(doc_number(&rows[1][0]), HEADER_SIZE as u64);
        assert_eq!(&rows[1][1..4], ["8 × count", "entries", "bytes"]);
        // Entry: where the encoder writes each field.
        let (h, rows) = &t[1];
        assert_eq!(h, &layout);
        let fields: Vec<(u64, u64, &str, &str)> = rows
            .iter()
            .map(|r| (doc_number(&r[0]), doc_number(&r[1]), &*r[2], &*r[3]))
            .collect();
        assert_eq!(
            fields,
            [
                (0, 2, "e_tag", "u16"),
                (2, 2, "e_perm", "u16"),
                (4, 4, "e_id", "u32")
            ]
        );
        assert_eq!(fields.iter().map(|f| f.1).sum::<u64>(), ENTRY_SIZE as u64);
        let a = acl("u::r-x,u:4660:rw-,g::r--,m::-wx,o::---");
        let b = a.encode();
        assert_eq!(
            u32::from_le_bytes(b[..4].try_into().unwrap()),
            ACL_XATTR_VERSION
        );
        let second = &b[HEADER_SIZE + ENTRY_SIZE..HEADER_SIZE + 2 * ENTRY_SIZE];
        let field = |i: usize| {
            let (at, size, ..) = fields[i];
            let mut x = [0u8; 8];
            x[..size as usize].copy_from_slice(&second[at as usize..(at + size) as usize]);
            u64::from_le_bytes(x)
        };
        assert_eq!(
            (field(0), field(1), field(2)),
            (ACL_USER as u64, (READ | WRITE) as u64, 4660)
        );
        // Constants, both ways.
        let (h, rows) = &t[2];
        assert_eq!(h, &["constant", "value", "meaning"]);
        let doc: Vec<(&str, u64)> = rows.iter().map(|r| (&*r[0], doc_number(&r[1]))).collect();
        let code: Vec<(&str, u64)> = vec![
            ("ACL_XATTR_VERSION", ACL_XATTR_VERSION.into()),
            ("ACL_UNDEFINED_ID", ACL_UNDEFINED_ID.into()),
            ("ACL_USER_OBJ", ACL_USER_OBJ.into()),
            ("ACL_USER", ACL_USER.into()),
            ("ACL_GROUP_OBJ", ACL_GROUP_OBJ.into()),
            ("ACL_GROUP", ACL_GROUP.into()),
            ("ACL_MASK", ACL_MASK.into()),
            ("ACL_OTHER", ACL_OTHER.into()),
            ("READ", READ.into()),
            ("WRITE", WRITE.into()),
            ("EXECUTE", EXECUTE.into()),
        ];
        assert_eq!(doc, code);
        // The names and the size limit the prose gives.
        let text = std::str::from_utf8(ACCESS_XATTR).unwrap();
        assert!(DOC.contains(&format!("`{text}`")));
        let text = std::str::from_utf8(DEFAULT_XATTR).unwrap();
        assert!(DOC.contains(&format!("`{text}`")));
        assert!(DOC.contains(&format!("at most {MAX_VALUE_SIZE}")));
    }

    fn arb_acl() -> impl Strategy<Value = Acl> {
        let id = 0u32..8; // few ids, so callers match entries often
        (
            btree_map(id.clone(), 0u8..8, 0..4),
            btree_map(id, 0u8..8, 0..4),
            [0u8..8, 0u8..8, 0u8..8],
            proptest::option::of(0u8..8),
            any::<u32>(),
        )
            .prop_map(|(users, groups, [u, g, o], mask, big)| {
                let mut e = vec![
                    Entry::new(Tag::UserObj, u),
                    Entry::new(Tag::GroupObj, g),
                    Entry::new(Tag::Other, o),
                ];
                e.extend(users.iter().map(|(&id, &p)| Entry::new(Tag::User(id), p)));
                e.extend(groups.iter().map(|(&id, &p)| Entry::new(Tag::Group(id), p)));
                // Large ids too, short of the undefined one.
                if big != ACL_UNDEFINED_ID && !users.contains_key(&big) {
                    e.push(Entry::new(Tag::User(big), u));
                }
                let named = e.iter().any(|x| x.tag.is_named());
                if let Some(m) = mask.or(named.then_some(g)) {
                    e.push(Entry::new(Tag::Mask, m));
                }
                Acl::new(e).unwrap()
            })
    }

    fn arb_caller() -> impl Strategy<Value = Caller> {
        (0u32..10, 0u32..10, vec(0u32..10, 0..3)).prop_map(|(uid, gid, groups)| Caller {
            uid,
            gid,
            groups,
            ..Caller::default()
        })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_decoder(b in vec(any::<u8>(), 0..300)) {
            let _ = Acl::decode(&b);
            let _ = Acl::decode_for_setxattr(&b);
        }

        #[test]
        fn near_valid_values_decode_to_valid_acls_or_errors(
            entries in vec(
                (
                    prop_oneof![
                        4 => prop::sample::select(vec![0x01u16, 0x02, 0x04, 0x08, 0x10, 0x20]),
                        1 => any::<u16>(),
                    ],
                    prop_oneof![4 => 0u16..8, 1 => any::<u16>()],
                    prop_oneof![4 => 0u32..4, 1 => Just(ACL_UNDEFINED_ID), 1 => any::<u32>()],
                ),
                0..10,
            ),
            cut in any::<usize>(),
        ) {
            let b = raw(2, &entries);
            if let Ok(a) = Acl::decode(&b) {
                prop_assert_eq!(Acl::new(a.entries().to_vec()), Ok(a.clone()));
                prop_assert_eq!(Acl::decode(&a.encode()), Ok(a));
            }
            let _ = Acl::decode(&b[..cut % (b.len() + 1)]);
        }

        #[test]
        fn decode_inverts_encode(a in arb_acl()) {
            let b = a.encode();
            prop_assert_eq!(b.len(), a.encoded_len());
            prop_assert_eq!(Acl::decode(&b), Ok(a.clone()));
            prop_assert_eq!(Acl::decode_for_setxattr(&b), Ok(Some(a)));
        }

        #[test]
        fn mode_helpers_agree(a in arb_acl(), mode in 0u32..0o10000) {
            let (m, keep) = update_mode(&a, 0o100000 | mode);
            prop_assert_eq!(m, 0o100000 | (mode & 0o7000) | a.mode_bits());
            prop_assert_eq!(keep.is_none(), a.equiv_mode().is_some());
            // Setting the chmodded ACL leaves the mode as chmod made it.
            let c = a.chmod(mode);
            prop_assert_eq!(update_mode(&c, mode).0, mode);
            // A new inode's mode never grants more than asked or than the default ACL.
            let (m, acc) = create_masq(&a, mode);
            prop_assert_eq!(m & !0o777, mode & !0o777);
            prop_assert_eq!(m & 0o777, mode & a.mode_bits());
            prop_assert_eq!(acc.mode_bits(), m & 0o777);
            prop_assert_eq!(Acl::decode(&acc.encode()), Ok(acc));
        }

        #[test]
        fn permission_is_acl5s_algorithm_when_the_mode_is_in_sync(
            a in arb_acl(),
            c in arb_caller(),
            want in 0u8..8,
            owner in (0u32..10, 0u32..10),
        ) {
            let mode = 0o100000 | a.mode_bits();
            let got = permission(Some(&a), mode, owner.0, owner.1, &c, want, false);
            if mode & 0o070 != 0 {
                prop_assert_eq!(got, acl5_access_check(&a, owner.0, owner.1, &c, want));
            } else {
                // All group bits clear: the mode bits alone.
                prop_assert_eq!(got, permission(None, mode, owner.0, owner.1, &c, want, false));
            }
            // A minimal ACL is exactly its mode.
            let m = Acl::from_mode(mode);
            prop_assert_eq!(
                permission(Some(&m), mode, owner.0, owner.1, &c, want, false),
                permission(None, mode, owner.0, owner.1, &c, want, false)
            );
        }
    }
}
