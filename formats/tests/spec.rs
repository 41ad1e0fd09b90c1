//! Checks `docs/format.md` against the code, so the normative spec and the implementation
//! cannot drift apart.
//!
//! The document follows two table conventions (described in its "Conventions" section):
//! * a *layout table* (header `| offset | size | field | type | meaning |`) sits under a
//!   heading naming the structure; its rows are contiguous and cover the structure;
//! * a *named-value table* (header `| name | value | ... |`) lists values by their name in
//!   this crate.
//!
//! Every layout table and every named value in the document must be known here, and every
//! one known here must be in the document. Offsets are checked against the crate's chained
//! constants, sizes by contiguity, by the width of the documented type and by the end of
//! the structure, and both against the bytes the encoders actually write.

use std::collections::{BTreeMap, BTreeSet};

use formats::bitmap;
use formats::block::{self, BlockAddr, BlockKind, Ino, BLOCK_SIZE, PAYLOAD_SIZE, TAIL_SIZE};
use formats::dir::{self, Bucket, DirEntry, DirHeader};
use formats::extent::{self, Extent, ExtentCodec};
use formats::frame;
use formats::inode::{self, InlineArea, Inode, Timespec, INODE_SIZE};
use formats::journal::{self, JournalSuper};
use formats::superblock::{self as sb, FsState, Geometry, Superblock};
use formats::version::{self, FormatVersion};
use formats::xattr::{self, XattrSet};
use formats::FormatError;

const DOC: &str = include_str!("../../docs/format.md");

// ---------------------------------------------------------------------------------------
// Parsing the document.

#[derive(Debug)]
struct Table {
    heading: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// 1-based line of the header row; row `k` is on line `line + 2 + k`.
    line: usize,
}

fn split_row(line: &str) -> Vec<String> {
    let t = line.trim();
    let t = t.strip_prefix('|').unwrap_or(t);
    let t = t.strip_suffix('|').unwrap_or(t);
    t.split('|').map(|c| c.trim().to_string()).collect()
}

/// Every markdown table outside code fences, with the nearest heading above it.
fn tables(doc: &str) -> Vec<Table> {
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut in_fence = false;
    let lines: Vec<&str> = doc.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if l.trim_start().starts_with("```") {
            in_fence = !in_fence;
            i += 1;
            continue;
        }
        if in_fence {
            i += 1;
            continue;
        }
        if l.starts_with('#') {
            heading = l.trim_start_matches('#').trim().to_string();
            i += 1;
            continue;
        }
        if l.trim_start().starts_with('|') {
            let start = i;
            let header: Vec<String> = split_row(l).iter().map(|c| c.to_lowercase()).collect();
            i += 1;
            assert!(
                i < lines.len() && lines[i].trim_start().starts_with("|---"),
                "line {}: table header without a separator row",
                start + 1
            );
            i += 1;
            let mut rows = Vec::new();
            while i < lines.len() && lines[i].trim_start().starts_with('|') {
                let r = split_row(lines[i]);
                assert_eq!(
                    r.len(),
                    header.len(),
                    "line {}: row has {} cells, header {}",
                    i + 1,
                    r.len(),
                    header.len()
                );
                rows.push(r);
                i += 1;
            }
            out.push(Table {
                heading: heading.clone(),
                header,
                rows,
                line: start + 1,
            });
            continue;
        }
        i += 1;
    }
    assert!(!in_fence, "unterminated code fence");
    out
}

fn unquote(cell: &str) -> String {
    cell.replace('`', "").trim().to_string()
}

/// A cell that is exactly one number: decimal, `0x` hex or `0o` octal. Anything else (an
/// expression such as `3 + name_len`) is not a number.
fn number(cell: &str) -> Option<u64> {
    let w = unquote(cell).replace('_', "");
    if let Some(h) = w.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else if let Some(o) = w.strip_prefix("0o") {
        u64::from_str_radix(o, 8).ok()
    } else {
        w.parse().ok()
    }
}

#[derive(Debug, Clone)]
struct Row {
    offset: Option<u64>,
    size: Option<u64>,
    field: String,
    ty: String,
    offset_text: String,
    size_text: String,
}

#[derive(Debug)]
struct Layout {
    heading: String,
    rows: Vec<Row>,
}

impl Layout {
    /// Offset and size of a fixed-size field.
    fn at(&self, field: &str) -> (usize, usize) {
        let r = self
            .rows
            .iter()
            .find(|r| r.field == field)
            .unwrap_or_else(|| panic!("{}: no field `{field}`", self.heading));
        (
            r.offset
                .unwrap_or_else(|| panic!("{}.{field}: offset not a number", self.heading))
                as usize,
            r.size
                .unwrap_or_else(|| panic!("{}.{field}: size not a number", self.heading))
                as usize,
        )
    }
    fn off(&self, field: &str) -> usize {
        let r = self.rows.iter().find(|r| r.field == field).unwrap();
        r.offset
            .unwrap_or_else(|| panic!("{}.{field}: offset not a number", self.heading))
            as usize
    }
}

fn is_layout(t: &Table) -> bool {
    t.header.len() >= 4 && t.header[..4] == ["offset", "size", "field", "type"]
}

fn is_named(t: &Table) -> bool {
    t.header.len() >= 2 && t.header[..2] == ["name", "value"]
}

fn layouts(doc: &str) -> BTreeMap<String, Layout> {
    let mut out = BTreeMap::new();
    for t in tables(doc).into_iter().filter(is_layout) {
        let rows = t
            .rows
            .iter()
            .map(|r| Row {
                offset: number(&r[0]),
                size: number(&r[1]),
                field: unquote(&r[2]),
                ty: unquote(&r[3]),
                offset_text: unquote(&r[0]),
                size_text: unquote(&r[1]),
            })
            .collect();
        let prev = out.insert(
            t.heading.clone(),
            Layout {
                heading: t.heading.clone(),
                rows,
            },
        );
        assert!(
            prev.is_none(),
            "line {}: a second layout table under heading `{}`",
            t.line,
            t.heading
        );
    }
    out
}

fn layout(name: &str) -> Layout {
    layouts(DOC)
        .remove(name)
        .unwrap_or_else(|| panic!("docs/format.md has no layout table under a heading `{name}`"))
}

/// name -> (value, the whole row)
fn named_values(doc: &str) -> BTreeMap<String, (u64, Vec<String>)> {
    let mut out = BTreeMap::new();
    for t in tables(doc).into_iter().filter(is_named) {
        for r in &t.rows {
            let name = unquote(&r[0]);
            let v = number(&r[1]).unwrap_or_else(|| {
                panic!("line {}: `{name}` value `{}` is not a number", t.line, r[1])
            });
            assert!(
                out.insert(name.clone(), (v, r.clone())).is_none(),
                "`{name}` is listed twice"
            );
        }
    }
    out
}

fn le(b: &[u8], off: usize, size: usize) -> u64 {
    assert!(size <= 8);
    let mut x = [0u8; 8];
    x[..size].copy_from_slice(&b[off..off + size]);
    u64::from_le_bytes(x)
}

// ---------------------------------------------------------------------------------------
// Layout tables against the constants.

/// What the code says a structure looks like: its fields in order with the offset the
/// crate's constant gives (`None` for an offset that depends on a length), where the
/// structure starts, and where its fixed part ends (`None` when it ends in a
/// variable-length part).
struct Expect {
    heading: &'static str,
    start: usize,
    fields: Vec<(&'static str, Option<usize>)>,
    end: Option<usize>,
}

fn expected_layouts() -> Vec<Expect> {
    use block::{TAIL_ADDR, TAIL_CRC, TAIL_KIND, TAIL_OWNER};
    use dir::*;
    use extent::*;
    use inode::*;
    use journal::*;
    let tail = Some(TAIL_KIND);
    let records = ExtentCodec::for_version(FormatVersion::V1);
    let records_end =
        EXTENT_BLOCK_OFF_RECORDS + records.records_per_block() * records.record_size();
    let wide = ExtentCodec::for_version(FormatVersion::V3);
    vec![
        Expect {
            heading: "Block tail",
            start: TAIL_KIND,
            fields: vec![
                ("kind", Some(TAIL_KIND)),
                ("owner", Some(TAIL_OWNER)),
                ("addr", Some(TAIL_ADDR)),
                ("crc", Some(TAIL_CRC)),
            ],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Superblock",
            start: 0,
            fields: vec![
                ("magic", Some(sb::OFF_MAGIC)),
                ("format_version", Some(sb::OFF_FORMAT_VERSION)),
                ("block_size", Some(sb::OFF_BLOCK_SIZE)),
                ("compat", Some(sb::OFF_COMPAT)),
                ("ro_compat", Some(sb::OFF_RO_COMPAT)),
                ("incompat", Some(sb::OFF_INCOMPAT)),
                ("state", Some(sb::OFF_STATE)),
                ("total_blocks", Some(sb::OFF_TOTAL_BLOCKS)),
                ("inode_count", Some(sb::OFF_INODE_COUNT)),
                ("root_ino", Some(sb::OFF_ROOT_INO)),
                ("journal_start", Some(sb::OFF_JOURNAL_START)),
                ("journal_blocks", Some(sb::OFF_JOURNAL_BLOCKS)),
                ("inode_bitmap_blocks", Some(sb::OFF_INODE_BITMAP_BLOCKS)),
                ("inode_bitmap_start", Some(sb::OFF_INODE_BITMAP_START)),
                ("block_bitmap_start", Some(sb::OFF_BLOCK_BITMAP_START)),
                ("block_bitmap_blocks", Some(sb::OFF_BLOCK_BITMAP_BLOCKS)),
                ("inode_table_blocks", Some(sb::OFF_INODE_TABLE_BLOCKS)),
                ("inode_table_start", Some(sb::OFF_INODE_TABLE_START)),
                ("data_start", Some(sb::OFF_DATA_START)),
                ("free_blocks", Some(sb::OFF_FREE_BLOCKS)),
                ("free_inodes", Some(sb::OFF_FREE_INODES)),
                ("mount_count", Some(sb::OFF_MOUNT_COUNT)),
                ("uuid", Some(sb::OFF_UUID)),
                ("created_sec", Some(sb::OFF_CREATED_SEC)),
                ("last_mount_sec", Some(sb::OFF_LAST_MOUNT_SEC)),
                ("conversion_cursor", Some(sb::OFF_CONVERSION_CURSOR)),
                ("conversion_target", Some(sb::OFF_CONVERSION_TARGET)),
                ("reserved", Some(sb::SUPER_FIELDS_END)),
                ("tail", tail),
            ],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Inode",
            start: 0,
            fields: vec![
                ("mode", Some(OFF_MODE)),
                ("uid", Some(OFF_UID)),
                ("gid", Some(OFF_GID)),
                ("nlink", Some(OFF_NLINK)),
                ("flags", Some(OFF_FLAGS)),
                ("generation", Some(OFF_GENERATION)),
                ("size", Some(OFF_SIZE)),
                ("blocks", Some(OFF_BLOCKS)),
                ("atime_sec", Some(OFF_ATIME_SEC)),
                ("atime_nsec", Some(OFF_ATIME_NSEC)),
                ("mtime_nsec", Some(OFF_MTIME_NSEC)),
                ("mtime_sec", Some(OFF_MTIME_SEC)),
                ("ctime_sec", Some(OFF_CTIME_SEC)),
                ("ctime_nsec", Some(OFF_CTIME_NSEC)),
                ("extent_count", Some(OFF_EXTENT_COUNT)),
                ("xattr_block", Some(OFF_XATTR_BLOCK)),
                ("extent_block", Some(OFF_EXTENT_BLOCK)),
                ("rdev", Some(OFF_RDEV)),
                ("reserved0", Some(OFF_RESERVED0)),
                ("inline", Some(OFF_INLINE)),
                ("reserved1", Some(OFF_RESERVED1)),
                ("crc", Some(OFF_CRC)),
            ],
            end: Some(INODE_SIZE),
        },
        Expect {
            heading: "Creation time (v2 and v3 layouts)",
            start: OFF_CRTIME_SEC,
            fields: vec![
                ("crtime_sec", Some(OFF_CRTIME_SEC)),
                ("crtime_nsec", Some(OFF_CRTIME_NSEC)),
                ("crc", Some(OFF_CRC)),
            ],
            end: Some(INODE_SIZE),
        },
        Expect {
            heading: "Wide block pointers (v3 layout)",
            start: OFF_XATTR_BLOCK_HI,
            fields: vec![
                ("xattr_block_hi", Some(OFF_XATTR_BLOCK_HI)),
                ("extent_block_hi", Some(OFF_EXTENT_BLOCK_HI)),
            ],
            end: Some(OFF_INLINE),
        },
        Expect {
            // `block_map_bytes` also checks both records against the codec's bytes.
            heading: "Block-map record",
            start: 0,
            fields: vec![
                ("logical", Some(REC_OFF_LOGICAL)),
                ("physical", Some(REC_V1_OFF_PHYSICAL)),
                ("len", Some(REC_V1_OFF_LEN)),
                ("flags", Some(REC_V1_OFF_FLAGS)),
            ],
            end: Some(records.record_size()),
        },
        Expect {
            heading: "Block-map record (v3)",
            start: 0,
            fields: vec![
                ("logical", Some(REC_OFF_LOGICAL)),
                ("physical", Some(REC_V3_OFF_PHYSICAL)),
                ("len", Some(REC_V3_OFF_LEN)),
                ("flags", Some(REC_V3_OFF_FLAGS)),
            ],
            end: Some(wide.record_size()),
        },
        Expect {
            heading: "Extent block (v3)",
            start: 0,
            fields: vec![
                ("next", Some(EXTENT_BLOCK_V3_OFF_NEXT)),
                ("count", Some(EXTENT_BLOCK_V3_OFF_COUNT)),
                ("reserved", Some(EXTENT_BLOCK_V3_OFF_RESERVED)),
                ("records", Some(EXTENT_BLOCK_V3_OFF_RECORDS)),
                ("tail", tail),
            ],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Extent block",
            start: 0,
            fields: vec![
                ("next", Some(EXTENT_BLOCK_OFF_NEXT)),
                ("count", Some(EXTENT_BLOCK_OFF_COUNT)),
                ("records", Some(EXTENT_BLOCK_OFF_RECORDS)),
                ("reserved", Some(records_end)),
                ("tail", tail),
            ],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Directory header",
            start: 0,
            fields: vec![
                ("version", Some(HDR_OFF_VERSION)),
                ("parent", Some(HDR_OFF_PARENT)),
                ("level", Some(HDR_OFF_LEVEL)),
                ("split", Some(HDR_OFF_SPLIT)),
                ("entry_count", Some(HDR_OFF_ENTRY_COUNT)),
                ("overflow_next", Some(HDR_OFF_OVERFLOW_NEXT)),
                ("reserved", Some(HDR_FIELDS_END)),
                ("tail", tail),
            ],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Directory bucket",
            start: 0,
            fields: vec![
                ("next", Some(BUCKET_OFF_NEXT)),
                ("count", Some(BUCKET_OFF_COUNT)),
                ("used", Some(BUCKET_OFF_USED)),
                ("entries", Some(BUCKET_OFF_ENTRIES)),
                ("tail", Some(BUCKET_OFF_ENTRIES + BUCKET_CAPACITY)),
            ],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Directory entry",
            start: 0,
            fields: vec![
                ("ino", Some(0)),
                ("dtype", Some(4)),
                ("name_len", Some(5)),
                ("name", Some(ENTRY_HEADER)),
            ],
            end: None,
        },
        Expect {
            heading: "Xattr block",
            start: 0,
            fields: vec![
                ("count", Some(xattr::XATTR_OFF_COUNT)),
                ("used", Some(xattr::XATTR_OFF_USED)),
                ("entries", Some(xattr::XATTR_OFF_ENTRIES)),
                (
                    "tail",
                    Some(xattr::XATTR_OFF_ENTRIES + xattr::XATTR_CAPACITY),
                ),
            ],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Xattr entry",
            start: 0,
            fields: vec![
                ("name_len", Some(0)),
                ("value_len", Some(1)),
                ("name", Some(xattr::XATTR_ENTRY_HEADER)),
                ("value", None),
            ],
            end: None,
        },
        Expect {
            heading: "Bitmap block",
            start: 0,
            fields: vec![("bits", Some(0)), ("tail", Some(PAYLOAD_SIZE))],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Journal superblock",
            start: 0,
            fields: vec![
                ("version", Some(JSB_OFF_VERSION)),
                ("blocks", Some(JSB_OFF_BLOCKS)),
                ("sequence", Some(JSB_OFF_SEQUENCE)),
                ("reserved", Some(JSB_FIELDS_END)),
                ("tail", tail),
            ],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Journal descriptor",
            start: 0,
            fields: vec![
                ("sequence", Some(DESC_OFF_SEQUENCE)),
                ("count", Some(DESC_OFF_COUNT)),
                ("reserved", Some(DESC_OFF_RESERVED)),
                ("targets", Some(DESC_OFF_TARGETS)),
                ("tail", Some(DESC_OFF_TARGETS + 8 * MAX_TX_BLOCKS)),
            ],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Journal commit",
            start: 0,
            fields: vec![
                ("sequence", Some(COMMIT_OFF_SEQUENCE)),
                ("count", Some(COMMIT_OFF_COUNT)),
                ("data_crc", Some(COMMIT_OFF_DATA_CRC)),
                ("reserved", Some(COMMIT_FIELDS_END)),
                ("tail", tail),
            ],
            end: Some(BLOCK_SIZE),
        },
        Expect {
            heading: "Frame",
            start: 0,
            fields: vec![
                ("magic", Some(0)),
                ("version", Some(4)),
                ("length", Some(8)),
                ("payload", Some(frame::FRAME_HEADER)),
                ("crc", None),
            ],
            end: None,
        },
    ]
}

/// Bytes of a documented scalar type, `None` for byte strings and composites.
fn type_width(ty: &str) -> Option<u64> {
    match ty {
        "u8" => Some(1),
        "u16" => Some(2),
        "u32" => Some(4),
        "u64" | "i64" => Some(8),
        "tail" => Some(TAIL_SIZE as u64),
        _ => None,
    }
}

macro_rules! ensure {
    ($c:expr, $($t:tt)*) => {
        if !$c {
            return Err(format!($($t)*));
        }
    };
}

/// Every layout table against the constants: same structures, same fields in the same
/// order, offsets equal to the constants, contiguous, sized like their types, ending where
/// the structure ends.
fn check_layout_tables(doc: &str) -> Result<(), String> {
    let docs = layouts(doc);
    let expected = expected_layouts();
    let want: BTreeSet<&str> = expected.iter().map(|e| e.heading).collect();
    let have: BTreeSet<&str> = docs.keys().map(String::as_str).collect();
    ensure!(
        have == want,
        "layout tables in docs/format.md {have:?} vs structures known to the test {want:?}"
    );
    for e in &expected {
        let l = &docs[e.heading];
        let names: Vec<&str> = l.rows.iter().map(|r| r.field.as_str()).collect();
        let want_names: Vec<&str> = e.fields.iter().map(|f| f.0).collect();
        ensure!(
            names == want_names,
            "{}: fields {names:?}, expected {want_names:?}",
            e.heading
        );

        let mut pos = Some(e.start as u64);
        for (r, (name, off)) in l.rows.iter().zip(&e.fields) {
            match (off, r.offset) {
                (Some(o), Some(d)) => ensure!(
                    d == *o as u64,
                    "{}.{name}: the doc says offset {d}, the code {o}",
                    e.heading
                ),
                (Some(o), None) => ensure!(
                    false,
                    "{}.{name}: the doc's offset `{}` is not the number {o}",
                    e.heading,
                    r.offset_text
                ),
                (None, Some(d)) => ensure!(
                    false,
                    "{}.{name}: the doc gives a fixed offset {d} to a variable-offset field",
                    e.heading
                ),
                (None, None) => {}
            }
            // A variable offset follows a fixed-offset field of variable size:
            // `<its offset> + <its size>`; a variable size names a field of the table.
            if r.offset.is_none() {
                let prev = l.rows.iter().take_while(|x| x.field != r.field).last();
                let want = prev.map(|p| format!("{} + {}", p.offset_text, p.size_text));
                ensure!(
                    want.as_deref() == Some(r.offset_text.as_str()),
                    "{}.{name}: offset `{}`, expected {want:?}",
                    e.heading,
                    r.offset_text
                );
            }
            if r.size.is_none() {
                ensure!(
                    l.rows.iter().any(|x| x.field == r.size_text),
                    "{}.{name}: size `{}` names no field",
                    e.heading,
                    r.size_text
                );
            }
            if let (Some(p), Some(d)) = (pos, r.offset) {
                ensure!(
                    d == p,
                    "{}.{name}: starts at {d} but the previous field ends at {p}",
                    e.heading
                );
            }
            if let (Some(w), Some(s)) = (type_width(&r.ty), r.size) {
                ensure!(s == w, "{}.{name}: size {s} for a {}", e.heading, r.ty);
            }
            pos = match (r.offset, r.size) {
                (Some(o), Some(s)) => {
                    ensure!(s > 0, "{}.{name}: size 0", e.heading);
                    Some(o + s)
                }
                _ => {
                    ensure!(!r.size_text.is_empty(), "{}.{name}: empty size", e.heading);
                    None
                }
            };
        }
        if let Some(end) = e.end {
            ensure!(
                pos == Some(end as u64),
                "{}: the fields end at {pos:?}, the structure at {end}",
                e.heading
            );
        }
    }
    Ok(())
}

#[test]
fn every_layout_table_matches_the_constants() {
    check_layout_tables(DOC).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn variable_parts_are_sized_as_documented() {
    let codec = ExtentCodec::for_version(FormatVersion::V1);
    let (_, records) = layout("Extent block").at("records");
    assert_eq!(records, codec.records_per_block() * codec.record_size());
    let v3 = ExtentCodec::for_version(FormatVersion::V3);
    let (_, records) = layout("Extent block (v3)").at("records");
    assert_eq!(records, v3.records_per_block() * v3.record_size());
    assert_eq!(
        layout("Directory bucket").at("entries").1,
        dir::BUCKET_CAPACITY
    );
    assert_eq!(layout("Xattr block").at("entries").1, xattr::XATTR_CAPACITY);
    assert_eq!(layout("Bitmap block").at("bits").1, PAYLOAD_SIZE);
    assert_eq!(
        layout("Journal descriptor").at("targets").1,
        8 * journal::MAX_TX_BLOCKS
    );
    assert_eq!(layout("Inode").at("inline").1, inode::INLINE_SIZE);
    assert_eq!(
        inode::INLINE_EXTENTS * codec.record_size(),
        inode::INLINE_SIZE,
        "the inline area holds whole v1 records"
    );
    let f = layout("Frame");
    let crc = f.rows.iter().find(|r| r.field == "crc").unwrap();
    assert_eq!(crc.size, Some(frame::FRAME_TRAILER as u64));
    assert_eq!(crc.offset_text, format!("{} + length", frame::FRAME_HEADER));
    let payload = f.rows.iter().find(|r| r.field == "payload").unwrap();
    assert_eq!(payload.size_text, "length");
    let x = layout("Xattr entry");
    let value = x.rows.iter().find(|r| r.field == "value").unwrap();
    assert_eq!(
        value.offset_text,
        format!("{} + name_len", xattr::XATTR_ENTRY_HEADER)
    );
    assert_eq!(value.size_text, "value_len");
    let name = x.rows.iter().find(|r| r.field == "name").unwrap();
    assert_eq!(name.size_text, "name_len");
    let d = layout("Directory entry");
    assert_eq!(d.rows.last().unwrap().size_text, "name_len");
}

// ---------------------------------------------------------------------------------------
// Named values.

fn expected_values() -> BTreeMap<&'static str, u64> {
    use dir::*;
    use inode::*;
    let codec = ExtentCodec::for_version(FormatVersion::V1);
    let v3 = ExtentCodec::for_version(FormatVersion::V3);
    let mut m: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut put = |k: &'static str, v: u64| assert!(m.insert(k, v).is_none(), "{k} twice");
    put("block::BLOCK_SIZE", BLOCK_SIZE as u64);
    put("block::TAIL_SIZE", TAIL_SIZE as u64);
    put("block::PAYLOAD_SIZE", PAYLOAD_SIZE as u64);
    put("crc32::check", crc32fast::hash(b"123456789") as u64);
    put("FormatVersion::V1", FormatVersion::V1.0 as u64);
    put("FormatVersion::V2", FormatVersion::V2.0 as u64);
    put("FormatVersion::V3", FormatVersion::V3.0 as u64);
    put("FormatVersion::CURRENT", FormatVersion::CURRENT.0 as u64);
    put("superblock::MIN_BLOCKS", sb::MIN_BLOCKS);
    put("superblock::MAX_BLOCKS_V1", sb::MAX_BLOCKS_V1);
    put("superblock::MAX_BLOCKS_V3", sb::MAX_BLOCKS_V3);
    put("superblock::BYTES_PER_INODE", sb::BYTES_PER_INODE);
    put("superblock::INODES_PER_BLOCK", sb::INODES_PER_BLOCK);
    put(
        "superblock::BITS_PER_BITMAP_BLOCK",
        sb::BITS_PER_BITMAP_BLOCK,
    );
    for k in [
        BlockKind::Superblock,
        BlockKind::JournalSuper,
        BlockKind::JournalDesc,
        BlockKind::JournalCommit,
        BlockKind::InodeBitmap,
        BlockKind::BlockBitmap,
        BlockKind::ExtentBlock,
        BlockKind::DirHeader,
        BlockKind::DirBucket,
        BlockKind::XattrBlock,
    ] {
        let name: &'static str = Box::leak(format!("BlockKind::{k:?}").into_boxed_str());
        put(name, k as u32 as u64);
    }
    put("superblock::SUPER_MAGIC", sb::SUPER_MAGIC);
    put("FsState::Clean", FsState::Clean as u64);
    put("FsState::Mounted", FsState::Mounted as u64);
    put("FsState::Errors", FsState::Errors as u64);
    put("version::INCOMPAT_CRTIME", version::INCOMPAT_CRTIME as u64);
    put("version::INCOMPAT_MAP48", version::INCOMPAT_MAP48 as u64);
    put(
        "version::INCOMPAT_CONVERTING",
        version::INCOMPAT_CONVERTING as u64,
    );
    put(
        "version::INCOMPAT_SUPPORTED",
        version::INCOMPAT_SUPPORTED as u64,
    );
    put(
        "version::RO_COMPAT_SUPPORTED",
        version::RO_COMPAT_SUPPORTED as u64,
    );
    put("inode::INODE_SIZE", INODE_SIZE as u64);
    put("inode::INLINE_SIZE", INLINE_SIZE as u64);
    put("inode::INLINE_EXTENTS", INLINE_EXTENTS as u64);
    put("inode::INODE_FLAG_INLINE", INODE_FLAG_INLINE as u64);
    put("inode::INODE_FLAG_CRTIME", INODE_FLAG_CRTIME as u64);
    put("inode::INODE_FLAG_MAP48", INODE_FLAG_MAP48 as u64);
    put("inode::MODE_MASK", MODE_MASK as u64);
    put("inode::NSEC_PER_SEC", NSEC_PER_SEC as u64);
    put("superblock::ROOT_INO", sb::ROOT_INO.0 as u64);
    put("superblock::ORPHAN_INO", sb::ORPHAN_INO.0 as u64);
    put("superblock::FIRST_FREE_INO", sb::FIRST_FREE_INO as u64);
    put("inode::S_IFMT", S_IFMT as u64);
    put("inode::S_IFSOCK", S_IFSOCK as u64);
    put("inode::S_IFLNK", S_IFLNK as u64);
    put("inode::S_IFREG", S_IFREG as u64);
    put("inode::S_IFBLK", S_IFBLK as u64);
    put("inode::S_IFDIR", S_IFDIR as u64);
    put("inode::S_IFCHR", S_IFCHR as u64);
    put("inode::S_IFIFO", S_IFIFO as u64);
    put(
        "extent::EXTENT_FLAG_UNWRITTEN",
        extent::EXTENT_FLAG_UNWRITTEN as u64,
    );
    for (v, c) in [("V1", codec), ("V3", v3)] {
        let name = |f: &str| -> &'static str {
            Box::leak(format!("ExtentCodec({v})::{f}").into_boxed_str())
        };
        put(name("record_size"), c.record_size() as u64);
        put(name("max_len"), c.max_len() as u64);
        put(name("max_address"), c.max_address());
        put(name("inline_capacity"), c.inline_capacity() as u64);
        put(name("records_per_block"), c.records_per_block() as u64);
    }
    put("dir::DIR_VERSION", DIR_VERSION as u64);
    put("dir::OVERFLOW_BASE", OVERFLOW_BASE);
    put("dir::MAX_OVERFLOW_BLOCKS", MAX_OVERFLOW_BLOCKS);
    put("dir::SPLIT_LOAD", SPLIT_LOAD);
    put("dir::MAX_NAME_LEN", MAX_NAME_LEN as u64);
    put("dir::BUCKET_CAPACITY", BUCKET_CAPACITY as u64);
    put("dir::ENTRY_HEADER", ENTRY_HEADER as u64);
    put("dir::DT_UNKNOWN", DT_UNKNOWN as u64);
    put("dir::DT_FIFO", DT_FIFO as u64);
    put("dir::DT_CHR", DT_CHR as u64);
    put("dir::DT_DIR", DT_DIR as u64);
    put("dir::DT_BLK", DT_BLK as u64);
    put("dir::DT_REG", DT_REG as u64);
    put("dir::DT_LNK", DT_LNK as u64);
    put("dir::DT_SOCK", DT_SOCK as u64);
    put("xattr::XATTR_CAPACITY", xattr::XATTR_CAPACITY as u64);
    put(
        "xattr::XATTR_ENTRY_HEADER",
        xattr::XATTR_ENTRY_HEADER as u64,
    );
    put("xattr::XATTR_NAME_MAX", xattr::XATTR_NAME_MAX as u64);
    put("journal::JOURNAL_VERSION", journal::JOURNAL_VERSION as u64);
    put("journal::MAX_TX_BLOCKS", journal::MAX_TX_BLOCKS as u64);
    put("frame::FRAME_HEADER", frame::FRAME_HEADER as u64);
    put("frame::FRAME_TRAILER", frame::FRAME_TRAILER as u64);
    m
}

/// Every named value against the code, both ways: nothing missing, nothing unknown.
fn check_named_values(doc: &str) -> Result<(), String> {
    let doc = named_values(doc);
    let want = expected_values();
    let have: BTreeSet<&str> = doc.keys().map(String::as_str).collect();
    let known: BTreeSet<&str> = want.keys().copied().collect();
    ensure!(
        have == known,
        "named values only in the doc: {:?}; only in the code: {:?}",
        have.difference(&known).collect::<Vec<_>>(),
        known.difference(&have).collect::<Vec<_>>()
    );
    for (name, v) in &want {
        let (d, _) = &doc[*name];
        ensure!(
            d == v,
            "`{name}`: the doc says {d} ({d:#x}), the code {v} ({v:#x})"
        );
    }
    // Block kinds also show the four bytes they are on disk.
    for (name, (v, row)) in &doc {
        if name.starts_with("BlockKind::") {
            let ascii = String::from_utf8_lossy(&(*v as u32).to_le_bytes()).to_string();
            ensure!(
                unquote(&row[2]) == ascii,
                "`{name}`: bytes on disk are {ascii}"
            );
        }
    }
    Ok(())
}

#[test]
fn every_named_value_matches_the_code() {
    check_named_values(DOC).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sb::SUPER_MAGIC.to_le_bytes(), *b"MOLT-FS\0");
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
}

// ---------------------------------------------------------------------------------------
// Geometry.

/// The derivation exactly as the doc words it, written independently of the crate.
fn doc_geometry(t: u64, version: u32) -> Option<[u64; 11]> {
    let max = if version >= 3 { 1u64 << 46 } else { 1u64 << 32 };
    if !(256..=max).contains(&t) {
        return None;
    }
    let i = (t * 4096 / 16384).clamp(64, u32::MAX as u64 - 16);
    let itb = i.div_ceil(16);
    let inode_count = itb * 16 - 1;
    let jb = (t / 128).clamp(64, 16384);
    let ibb = (inode_count + 1).div_ceil(32640);
    let bbb = t.div_ceil(32640);
    let js = 1;
    let ibs = js + jb;
    let bbs = ibs + ibb;
    let its = bbs + bbb;
    let ds = its + itb;
    if ds + 16 > t {
        return None;
    }
    Some([t, inode_count, js, jb, ibs, ibb, bbs, bbb, its, itb, ds])
}

fn geometry_fields(g: &Geometry) -> [u64; 11] {
    [
        g.total_blocks,
        g.inode_count as u64,
        g.journal_start,
        g.journal_blocks as u64,
        g.inode_bitmap_start,
        g.inode_bitmap_blocks as u64,
        g.block_bitmap_start,
        g.block_bitmap_blocks as u64,
        g.inode_table_start,
        g.inode_table_blocks as u64,
        g.data_start,
    ]
}

#[test]
fn geometry_follows_the_documented_formulas() {
    let mut sizes: Vec<u64> = vec![0, 1, 255, 256, 257, 300, 4095, 4096, 8191, 8192, 8193];
    sizes.extend([(1 << 32) - 1, 1 << 32, (1 << 32) + 1, 1 << 40]);
    // Around every point where a clamp or a rounding changes.
    for b in [64 * 128, 16384 * 128, 32640, 32640 * 16 / 4, 16 * 4] {
        sizes.extend([b - 1, b, b + 1]);
    }
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    sizes.extend([(1 << 46) - 1, 1 << 46, (1 << 46) + 1]);
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sizes.push(x % ((1 << 32) + 100));
        sizes.push(x % ((1 << 46) + 100));
    }
    for t in sizes {
        let code = Geometry::for_blocks(t).ok().map(|g| geometry_fields(&g));
        assert_eq!(code, doc_geometry(t, 1), "geometry of {t} blocks");
        for v in FormatVersion::ALL {
            let code = Geometry::for_version(t, v)
                .ok()
                .map(|g| geometry_fields(&g));
            assert_eq!(
                code,
                doc_geometry(t, v.0),
                "geometry of {t} blocks in v{}",
                v.0
            );
        }
    }
    // Refused sizes are unsupported, not corrupted.
    for t in [0, sb::MIN_BLOCKS - 1, sb::MAX_BLOCKS_V1 + 1, u64::MAX] {
        assert!(matches!(
            Geometry::for_blocks(t),
            Err(FormatError::UnsupportedSize { .. })
        ));
    }
    assert!(matches!(
        Geometry::for_version(sb::MAX_BLOCKS_V3 + 1, FormatVersion::V3),
        Err(FormatError::UnsupportedSize { .. })
    ));
    assert_eq!(sb::MIN_BLOCKS * BLOCK_SIZE as u64, 1 << 20);
    assert_eq!(sb::MAX_BLOCKS_V1 * BLOCK_SIZE as u64, 16 << 40);
    assert_eq!(sb::MAX_BLOCKS_V3 * BLOCK_SIZE as u64, 256 << 50);
}

fn is_examples(t: &Table) -> bool {
    t.header.first().map(String::as_str) == Some("total_blocks")
}

/// The worked examples against `Geometry::for_blocks`.
fn check_geometry_examples(doc: &str) -> Result<(), String> {
    let t = tables(doc)
        .into_iter()
        .find(is_examples)
        .ok_or("no worked geometry examples table")?;
    ensure!(t.rows.len() >= 4, "too few geometry examples");
    let col = |name: &str| {
        t.header
            .iter()
            .position(|h| h == name)
            .ok_or(format!("examples: no column {name}"))
    };
    for r in &t.rows {
        let total = number(&r[0]).ok_or("examples: total_blocks is not a number")?;
        let g = Geometry::for_version(total, FormatVersion::CURRENT).map_err(|e| e.to_string())?;
        let image = unquote(&r[col("image")?]);
        let (n, unit) = image.split_once(' ').ok_or("examples: image size")?;
        let shift = match unit {
            "MiB" => 20,
            "GiB" => 30,
            "TiB" => 40,
            u => return Err(format!("unit {u}")),
        };
        let n: u64 = n.parse().map_err(|_| format!("examples: `{image}`"))?;
        ensure!(n << shift == total * 4096, "{total} blocks are not {image}");
        for (c, v) in [
            ("inode_count", g.inode_count as u64),
            ("journal_blocks", g.journal_blocks as u64),
            ("inode_bitmap_blocks", g.inode_bitmap_blocks as u64),
            ("block_bitmap_blocks", g.block_bitmap_blocks as u64),
            ("inode_table_blocks", g.inode_table_blocks as u64),
            ("data_start", g.data_start),
        ] {
            let d = number(&r[col(c)?]);
            ensure!(
                d == Some(v),
                "{total} blocks: the doc says {c} = {d:?}, the code {v}"
            );
        }
    }
    Ok(())
}

#[test]
fn geometry_examples_in_the_doc_are_right() {
    check_geometry_examples(DOC).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn inode_n_is_slot_n() {
    let g = Geometry::for_blocks(262144).unwrap();
    for n in [1u32, 2, 15, 16, 17, 1000, g.inode_count] {
        let (addr, off) = g.inode_location(Ino(n));
        assert_eq!(addr.0, g.inode_table_start + n as u64 / 16);
        assert_eq!(off, (n as usize % 16) * 256);
    }
    assert!(!g.is_valid_ino(Ino(0)));
    assert!(g.is_valid_ino(Ino(g.inode_count)));
    assert!(!g.is_valid_ino(Ino(g.inode_count + 1)));
}

// ---------------------------------------------------------------------------------------
// Encoders write each field where the doc says; decoders read it back.

fn check_tail(b: &[u8], kind: BlockKind, owner: u32, addr: u32) {
    let t = layout("Block tail");
    let (o, s) = t.at("kind");
    assert_eq!(le(b, o, s), kind as u64);
    let (o, s) = t.at("owner");
    assert_eq!(le(b, o, s), owner as u64);
    let (o, s) = t.at("addr");
    assert_eq!(le(b, o, s), addr as u64);
    let (o, s) = t.at("crc");
    assert_eq!(le(b, o, s), crc32fast::hash(&b[..o]) as u64);
}

/// Asserts that every byte of a documented field range is zero.
fn zero(b: &[u8], l: &Layout, field: &str) {
    let (o, s) = l.at(field);
    assert!(
        b[o..o + s].iter().all(|&x| x == 0),
        "{}.{field} not zero",
        l.heading
    );
}

fn sample_superblock() -> Superblock {
    Superblock {
        format_version: FormatVersion::V1,
        compat: 0x1122_3344,
        ro_compat: 0,
        incompat: 0,
        state: FsState::Mounted,
        geometry: Geometry::for_blocks(2_621_440).unwrap(),
        free_blocks: 0x0102_0304_0506,
        free_inodes: 0x0A0B_0C0D,
        mount_count: 0x7788,
        uuid: *b"0123456789abcdef",
        created_sec: -1_234_567_890,
        last_mount_sec: 1_700_000_123,
        conversion_cursor: 0,
        conversion_target: None,
    }
}

#[test]
fn superblock_bytes() {
    let l = layout("Superblock");
    let s = sample_superblock();
    let b = s.encode();
    let g = &s.geometry;
    let f = |name: &str| {
        let (o, n) = l.at(name);
        le(&b[..], o, n)
    };
    assert_eq!(f("magic"), sb::SUPER_MAGIC);
    assert_eq!(&b[l.off("magic")..l.off("magic") + 8], b"MOLT-FS\0");
    assert_eq!(f("format_version"), 1);
    assert_eq!(f("block_size"), 4096);
    assert_eq!(f("compat"), 0x1122_3344);
    assert_eq!(f("ro_compat"), 0);
    assert_eq!(f("incompat"), 0);
    assert_eq!(f("state"), 2);
    assert_eq!(f("total_blocks"), g.total_blocks);
    assert_eq!(f("inode_count"), g.inode_count as u64);
    assert_eq!(f("root_ino"), 1);
    assert_eq!(f("journal_start"), g.journal_start);
    assert_eq!(f("journal_blocks"), g.journal_blocks as u64);
    assert_eq!(f("inode_bitmap_blocks"), g.inode_bitmap_blocks as u64);
    assert_eq!(f("inode_bitmap_start"), g.inode_bitmap_start);
    assert_eq!(f("block_bitmap_start"), g.block_bitmap_start);
    assert_eq!(f("block_bitmap_blocks"), g.block_bitmap_blocks as u64);
    assert_eq!(f("inode_table_blocks"), g.inode_table_blocks as u64);
    assert_eq!(f("inode_table_start"), g.inode_table_start);
    assert_eq!(f("data_start"), g.data_start);
    assert_eq!(f("free_blocks"), s.free_blocks);
    assert_eq!(f("free_inodes"), s.free_inodes as u64);
    assert_eq!(f("mount_count"), s.mount_count as u64);
    let (o, n) = l.at("uuid");
    assert_eq!(&b[o..o + n], &s.uuid);
    assert_eq!(f("created_sec") as i64, s.created_sec);
    assert_eq!(f("last_mount_sec") as i64, s.last_mount_sec);
    assert_eq!(f("conversion_cursor"), 0);
    assert_eq!(f("conversion_target"), 0);
    zero(&b[..], &l, "reserved");
    check_tail(&b[..], BlockKind::Superblock, 0, 0);
    assert_eq!(Superblock::decode(&b[..]).unwrap(), s);

    // The rejections the doc lists, each with a valid tail so that only the field is wrong.
    let resealed = |field: &str, v: u64| {
        let mut c = b.clone();
        let (o, n) = l.at(field);
        c[o..o + n].copy_from_slice(&v.to_le_bytes()[..n]);
        block::seal(&mut c[..], BlockKind::Superblock, Ino(0), BlockAddr(0));
        Superblock::decode(&c[..])
    };
    assert!(matches!(
        resealed("format_version", 4),
        Err(FormatError::UnsupportedVersion { .. })
    ));
    // A version without its feature bits is damage.
    assert!(matches!(
        resealed("format_version", 2),
        Err(FormatError::Corrupted { .. })
    ));
    assert!(resealed("format_version", 0).is_err());
    // Unknown incompat bits are unsupported, not corrupted; unknown ro_compat bits decode
    // (the mounter then refuses read-write); compat bits mean nothing to a reader.
    assert!(matches!(
        resealed("incompat", 8),
        Err(FormatError::UnsupportedFeatures { bits: 8, .. })
    ));
    assert!(matches!(
        resealed("incompat", version::INCOMPAT_CRTIME as u64),
        Err(FormatError::Corrupted { .. })
    ));
    assert!(resealed("conversion_cursor", 1).is_err());
    assert!(resealed("conversion_target", 2).is_err());
    let ro = resealed("ro_compat", 0x8000_0000).unwrap();
    assert_eq!(ro.unknown_ro_compat(), 0x8000_0000);
    assert_eq!(ro.unknown_incompat(), 0);
    assert_eq!(s.unknown_ro_compat(), 0);
    assert!(resealed("block_size", 8192).is_err());
    assert!(resealed("state", 0).is_err());
    assert!(resealed("state", 4).is_err());
    assert!(resealed("root_ino", 2).is_err());
    assert!(resealed("data_start", g.data_start + 1).is_err());
    assert!(resealed("total_blocks", 255).is_err());
    assert!(resealed("total_blocks", (1 << 32) + 1).is_err());
    let (o, _) = l.at("reserved");
    let mut c = b.clone();
    c[o + 7] = 1;
    block::seal(&mut c[..], BlockKind::Superblock, Ino(0), BlockAddr(0));
    assert!(Superblock::decode(&c[..]).is_err());
    // A foreign file is foreign, not corrupt.
    let mut c = b.clone();
    c[0] ^= 0xFF;
    assert!(matches!(
        Superblock::decode(&c[..]),
        Err(FormatError::BadMagic { .. })
    ));
    for st in [FsState::Clean, FsState::Mounted, FsState::Errors] {
        let s2 = Superblock {
            state: st,
            ..s.clone()
        };
        assert_eq!(Superblock::decode(&s2.encode()[..]).unwrap(), s2);
    }
}

#[test]
fn tail_bytes() {
    let mut b = block::zeroed();
    b[5] = 9;
    block::seal(
        &mut b[..],
        BlockKind::XattrBlock,
        Ino(0xA1B2),
        BlockAddr(0x0102_0304),
    );
    check_tail(&b[..], BlockKind::XattrBlock, 0xA1B2, 0x0102_0304);
    block::verify(
        &b[..],
        BlockKind::XattrBlock,
        Some(Ino(0xA1B2)),
        BlockAddr(0x0102_0304),
    )
    .unwrap();
    assert!(matches!(
        block::verify(&b[..], BlockKind::DirHeader, None, BlockAddr(0x0102_0304)),
        Err(FormatError::BadMagic { .. })
    ));
}

fn t(sec: i64, nsec: u32) -> Timespec {
    Timespec { sec, nsec }
}

#[test]
fn inode_bytes() {
    let l = layout("Inode");
    let r = layout("Block-map record");
    let codec = ExtentCodec::for_version(FormatVersion::V1);
    let ex = vec![
        Extent {
            logical: 0,
            physical: 0x0102_0304,
            len: 0x0506,
            unwritten: false,
        },
        Extent {
            logical: 0x1000,
            physical: 0x0A0B_0C0D,
            len: 7,
            unwritten: true,
        },
    ];
    let i = Inode {
        layout: FormatVersion::V1,
        crtime: None,
        mode: inode::S_IFREG | 0o640,
        uid: 0x1111_2222,
        gid: 0x3333_4444,
        nlink: 3,
        generation: 0x5555_6666,
        size: 0x0001_0203_0405_0607,
        blocks: 0x0809_0A0B,
        atime: t(-5, 999_999_999),
        mtime: t(0x0012_3456_789A, 17),
        ctime: t(42, 0x0BAD_F00D & 0x3FFF_FFFF),
        extent_count: 2,
        xattr_block: 0xFFFF_FFFE,
        extent_block: 0x0707_0707,
        rdev: 0x0808_0808,
        inline: InlineArea::Extents(ex.clone()),
    };
    let ino = Ino(0x0102_0305);
    let mut b = [0u8; INODE_SIZE];
    i.encode(ino, &mut b).unwrap();
    let f = |name: &str| {
        let (o, n) = l.at(name);
        le(&b, o, n)
    };
    assert_eq!(f("mode"), i.mode as u64);
    assert_eq!(f("uid"), i.uid as u64);
    assert_eq!(f("gid"), i.gid as u64);
    assert_eq!(f("nlink"), 3);
    assert_eq!(f("flags"), 0);
    assert_eq!(f("generation"), i.generation as u64);
    assert_eq!(f("size"), i.size);
    assert_eq!(f("blocks"), i.blocks);
    assert_eq!(f("atime_sec") as i64, i.atime.sec);
    assert_eq!(f("atime_nsec"), i.atime.nsec as u64);
    assert_eq!(f("mtime_sec") as i64, i.mtime.sec);
    assert_eq!(f("mtime_nsec"), i.mtime.nsec as u64);
    assert_eq!(f("ctime_sec") as i64, i.ctime.sec);
    assert_eq!(f("ctime_nsec"), i.ctime.nsec as u64);
    assert_eq!(f("extent_count"), 2);
    assert_eq!(f("xattr_block"), i.xattr_block);
    assert_eq!(f("extent_block"), i.extent_block);
    assert_eq!(f("rdev"), i.rdev as u64);
    zero(&b, &l, "reserved0");
    zero(&b, &l, "reserved1");
    // The inline area holds the records packed from its start, then zeros.
    let base = l.off("inline");
    let rs = codec.record_size();
    for (k, e) in ex.iter().enumerate() {
        let rec = &b[base + k * rs..base + (k + 1) * rs];
        let g = |name: &str| {
            let (o, n) = r.at(name);
            le(rec, o, n)
        };
        assert_eq!(g("logical"), e.logical);
        assert_eq!(g("physical"), e.physical);
        assert_eq!(g("len"), e.len as u64);
        assert_eq!(g("flags"), e.unwritten as u64);
    }
    let (io, isz) = l.at("inline");
    assert!(b[io + ex.len() * rs..io + isz].iter().all(|&x| x == 0));
    // The checksum covers the inode number, then bytes 0..crc.
    let (co, _) = l.at("crc");
    let mut h = crc32fast::Hasher::new();
    h.update(&ino.0.to_le_bytes());
    h.update(&b[..co]);
    assert_eq!(f("crc"), h.finalize() as u64);
    assert_eq!(
        Inode::decode(ino, &b, FormatVersion::V1).unwrap(),
        Some(i.clone())
    );
    assert!(
        Inode::decode(Ino(ino.0 + 1), &b, FormatVersion::V1).is_err(),
        "the crc binds the slot"
    );

    // Reserved bytes and unknown flags are rejected even under a valid checksum.
    let reseal = |c: &mut [u8; INODE_SIZE]| {
        let mut h = crc32fast::Hasher::new();
        h.update(&ino.0.to_le_bytes());
        h.update(&c[..co]);
        c[co..co + 4].copy_from_slice(&h.finalize().to_le_bytes());
    };
    for (field, byte) in [("reserved0", 0), ("reserved1", 11), ("flags", 1)] {
        let mut c = b;
        c[l.off(field) + byte] |= 0x40;
        reseal(&mut c);
        assert!(
            Inode::decode(ino, &c, FormatVersion::V1).is_err(),
            "{field}"
        );
    }

    // A never-used slot is all zeros and decodes as no inode.
    assert_eq!(
        Inode::decode(ino, &[0u8; INODE_SIZE], FormatVersion::V1).unwrap(),
        None
    );

    // An inline symlink: flag bit 0, target from the start of the inline area.
    let target = b"../some/where/else".to_vec();
    let mut s = Inode::new(FormatVersion::V1, inode::S_IFLNK | 0o777, 1, 2, t(3, 4));
    s.nlink = 1;
    s.size = target.len() as u64;
    s.inline = InlineArea::Symlink(target.clone());
    let mut b = [0u8; INODE_SIZE];
    s.encode(Ino(9), &mut b).unwrap();
    let (fo, fs) = l.at("flags");
    assert_eq!(le(&b, fo, fs), inode::INODE_FLAG_INLINE as u64);
    assert_eq!(&b[io..io + target.len()], &target[..]);
    assert!(b[io + target.len()..io + isz].iter().all(|&x| x == 0));
    assert_eq!(
        Inode::decode(Ino(9), &b, FormatVersion::V1).unwrap(),
        Some(s.clone())
    );
    // The longest inline target is the whole area.
    s.inline = InlineArea::Symlink(vec![b'x'; inode::INLINE_SIZE]);
    s.size = inode::INLINE_SIZE as u64;
    s.encode(Ino(9), &mut b).unwrap();
    assert_eq!(
        Inode::decode(Ino(9), &b, FormatVersion::V1).unwrap(),
        Some(s.clone())
    );
    s.inline = InlineArea::Symlink(vec![b'x'; inode::INLINE_SIZE + 1]);
    assert!(s.encode(Ino(9), &mut b).is_err());
}

/// The inode rules of the doc that a reader enforces, each under a valid checksum, and
/// the writer refusing the same values.
#[test]
fn inode_rules() {
    let l = layout("Inode");
    let codec = ExtentCodec::for_version(FormatVersion::V1);
    let ino = Ino(77);
    let (co, _) = l.at("crc");
    let decode_edited = |b: &[u8; INODE_SIZE], field: &str, v: u64| {
        let mut c = *b;
        let (o, n) = l.at(field);
        c[o..o + n].copy_from_slice(&v.to_le_bytes()[..n]);
        let mut h = crc32fast::Hasher::new();
        h.update(&ino.0.to_le_bytes());
        h.update(&c[..co]);
        c[co..co + 4].copy_from_slice(&h.finalize().to_le_bytes());
        Inode::decode(ino, &c, FormatVersion::V1)
    };
    let file = Inode::new(FormatVersion::V1, inode::S_IFREG | 0o644, 1, 2, t(3, 4));
    let mut b = [0u8; INODE_SIZE];
    file.encode(ino, &mut b).unwrap();

    // `mode`: one of the seven S_IFMT types plus permission bits, or 0 (a freed slot).
    for ty in [
        inode::S_IFSOCK,
        inode::S_IFLNK,
        inode::S_IFREG,
        inode::S_IFBLK,
        inode::S_IFDIR,
        inode::S_IFCHR,
        inode::S_IFIFO,
    ] {
        let got = decode_edited(&b, "mode", (ty | 0o7777) as u64)
            .unwrap()
            .unwrap();
        assert_eq!(got.file_type(), ty);
    }
    assert_eq!(inode::MODE_MASK, inode::S_IFMT | 0o7777);
    for bad in [
        0o644,
        0o030644,
        0o170644,
        (inode::MODE_MASK + 1) | inode::S_IFREG,
    ] {
        assert!(
            decode_edited(&b, "mode", bad as u64).is_err(),
            "mode {bad:#o}"
        );
        let i = Inode {
            mode: bad,
            ..file.clone()
        };
        assert!(i.encode(ino, &mut [0u8; INODE_SIZE]).is_err());
    }
    // Times: nanoseconds below 10^9.
    for field in ["atime_nsec", "mtime_nsec", "ctime_nsec"] {
        assert!(decode_edited(&b, field, 999_999_999).is_ok());
        assert!(decode_edited(&b, field, inode::NSEC_PER_SEC as u64).is_err());
    }
    let late = Inode {
        ctime: t(0, inode::NSEC_PER_SEC),
        ..file.clone()
    };
    assert!(late.encode(ino, &mut [0u8; INODE_SIZE]).is_err());

    // A freed slot: mode 0, everything 0 but `generation`, checksummed. It decodes as an
    // inode with mode 0 (not as "no inode"), so that the generation survives.
    let freed = Inode::freed(0xA5A5_0001);
    let mut f = [0u8; INODE_SIZE];
    freed.encode(ino, &mut f).unwrap();
    let (go, gs) = l.at("generation");
    for (k, &x) in f[..co].iter().enumerate() {
        assert!(
            x == 0 || (go..go + gs).contains(&k),
            "byte {k} of a freed slot"
        );
    }
    let got = Inode::decode(ino, &f, FormatVersion::V1).unwrap().unwrap();
    assert!(got.is_free());
    assert_eq!(got, freed);
    for field in ["uid", "nlink", "size", "flags", "extent_count", "rdev"] {
        assert!(
            decode_edited(&f, field, 1).is_err(),
            "freed slot with {field}"
        );
    }
    let stale = Inode {
        size: 1,
        ..freed.clone()
    };
    assert!(stale.encode(ino, &mut f).is_err());

    // Without INLINE: the inline area holds min(extent_count, inline capacity) records.
    let cap = codec.inline_capacity();
    assert_eq!(cap, inode::INLINE_EXTENTS);
    let run = |k: u64| Extent {
        logical: 2 * k,
        physical: 900 + k,
        len: 1,
        unwritten: false,
    };
    for (count, n, ok) in [
        (0u32, 0u64, true),
        (5, 5, true),
        (cap as u32, cap as u64, true),
        (1000, cap as u64, true),
        (5, 4, false),
        (4, 5, false),
        (1000, cap as u64 - 1, false),
    ] {
        let i = Inode {
            extent_count: count,
            inline: InlineArea::Extents((0..n).map(run).collect()),
            ..file.clone()
        };
        let mut c = [0u8; INODE_SIZE];
        let enc = i.encode(ino, &mut c);
        assert_eq!(
            enc.is_ok(),
            ok,
            "extent_count {count} with {n} inline records"
        );
        if ok {
            assert_eq!(Inode::decode(ino, &c, FormatVersion::V1).unwrap(), Some(i));
        }
    }

    // With INLINE: a symlink, `size` = target length in 1 ..= 144, `extent_count` 0.
    let link = Inode {
        mode: inode::S_IFLNK | 0o777,
        size: 2,
        inline: InlineArea::Symlink(b"ab".to_vec()),
        ..file.clone()
    };
    let mut c = [0u8; INODE_SIZE];
    link.encode(ino, &mut c).unwrap();
    // The target holds no NUL, so a larger `size` cannot take in the zeros after it.
    assert!(decode_edited(&c, "size", 3).is_err());
    assert!(decode_edited(&c, "size", 0).is_err());
    assert!(decode_edited(&c, "extent_count", 1).is_err());
    assert!(decode_edited(&c, "mode", (inode::S_IFREG | 0o644) as u64).is_err());
    for bad in [
        Inode {
            size: 3,
            ..link.clone()
        },
        Inode {
            extent_count: 1,
            ..link.clone()
        },
        Inode {
            mode: inode::S_IFREG | 0o777,
            ..link.clone()
        },
        Inode {
            inline: InlineArea::Symlink(b"a\0".to_vec()),
            ..link.clone()
        },
    ] {
        assert!(bad.encode(ino, &mut c).is_err(), "{bad:?}");
    }
}

#[test]
fn block_map_bytes() {
    let r = layout("Block-map record");
    let codec = ExtentCodec::for_version(FormatVersion::V1);
    let e = Extent {
        logical: 0x0102_0304,
        physical: 0x0A0B_0C0D,
        len: 0xFFFF,
        unwritten: true,
    };
    let mut rec = vec![0u8; codec.record_size()];
    codec.encode(&e, &mut rec).unwrap();
    let g = |name: &str| {
        let (o, n) = r.at(name);
        le(&rec, o, n)
    };
    assert_eq!(g("logical"), e.logical);
    assert_eq!(g("physical"), e.physical);
    assert_eq!(g("len"), 0xFFFF);
    assert_eq!(g("flags"), extent::EXTENT_FLAG_UNWRITTEN as u64);
    assert_eq!(codec.decode(&rec).unwrap(), e);
    // 32-bit addresses in v1; zero-length and unknown flags are corrupt.
    let wide = Extent {
        physical: 1 << 32,
        ..e
    };
    assert!(codec.encode(&wide, &mut rec).is_err());
    assert!(codec.encode(&Extent { len: 0, ..e }, &mut rec).is_err());
    assert!(codec
        .encode(&Extent { len: 0x1_0000, ..e }, &mut rec)
        .is_err());
    assert_eq!(codec.max_address(), u32::MAX as u64);
    let mut bad = rec.clone();
    let (o, _) = r.at("flags");
    bad[o] |= 2;
    assert!(codec.decode(&bad).is_err());
    let mut bad = rec.clone();
    let (o, n) = r.at("len");
    bad[o..o + n].fill(0);
    assert!(codec.decode(&bad).is_err());
    // A reader rejects runs past 2^32 on either side, as the writer refuses them.
    for field in ["logical", "physical"] {
        let at = |start: u32, len: u16| {
            let mut c = rec.clone();
            let (o, n) = r.at(field);
            c[o..o + n].copy_from_slice(&start.to_le_bytes());
            let (o, n) = r.at("len");
            c[o..o + n].copy_from_slice(&len.to_le_bytes());
            codec.decode(&c)
        };
        let end = |e: Extent| {
            if field == "logical" {
                e.logical_end()
            } else {
                e.physical_end()
            }
        };
        assert_eq!(end(at(u32::MAX - 99, 100).unwrap()), 1 << 32);
        assert!(at(u32::MAX - 99, 101).is_err(), "{field}");
        assert!(at(u32::MAX, 0xFFFF).is_err(), "{field}");
    }
    assert!(codec
        .encode(
            &Extent {
                logical: u32::MAX as u64,
                len: 2,
                ..e
            },
            &mut rec
        )
        .is_err());

    // Extent block.
    let l = layout("Extent block");
    let ex: Vec<Extent> = (0..codec.records_per_block() as u64)
        .map(|k| Extent {
            logical: k * 3,
            physical: 5000 + k * 3,
            len: 2,
            unwritten: k % 3 == 0,
        })
        .collect();
    for n in [0, 1, 3, ex.len()] {
        let b = codec
            .encode_block(Ino(0x0C0D), BlockAddr(0x0E0F), 0x0102_0304, &ex[..n])
            .unwrap();
        let (o, s) = l.at("next");
        assert_eq!(le(&b[..], o, s), 0x0102_0304);
        let (o, s) = l.at("count");
        assert_eq!(le(&b[..], o, s), n as u64);
        let (ro, rsz) = l.at("records");
        let rs = codec.record_size();
        for (k, e) in ex[..n].iter().enumerate() {
            let mut want = vec![0u8; rs];
            codec.encode(e, &mut want).unwrap();
            assert_eq!(&b[ro + k * rs..ro + (k + 1) * rs], &want[..]);
        }
        assert!(b[ro + n * rs..ro + rsz].iter().all(|&x| x == 0));
        zero(&b[..], &l, "reserved");
        check_tail(&b[..], BlockKind::ExtentBlock, 0x0C0D, 0x0E0F);
        assert_eq!(
            codec
                .decode_block(&b[..], Ino(0x0C0D), BlockAddr(0x0E0F))
                .unwrap(),
            (0x0102_0304, ex[..n].to_vec())
        );
    }
    assert!(codec
        .encode_block(
            Ino(1),
            BlockAddr(1),
            0,
            &[ex.clone(), ex[..1].to_vec()].concat()
        )
        .is_err());
}

/// The v2 and v3 inode layouts: flags, creation time, wide pointers and v3 inline
/// records where the doc puts them.
#[test]
fn versioned_inode_bytes() {
    let l = layout("Inode");
    let c = layout("Creation time (v2 and v3 layouts)");
    let w = layout("Wide block pointers (v3 layout)");
    let r3 = layout("Block-map record (v3)");
    let values = named_values(DOC);
    let value = |name: &str| values[name].0;
    let ino = Ino(0x0102_0305);
    let crtime = t(-0x0123_4567_89AB, 0x0BAD_F00D & 0x1FFF_FFFF);
    for (v, flags) in [
        (FormatVersion::V2, value("inode::INODE_FLAG_CRTIME")),
        (
            FormatVersion::V3,
            value("inode::INODE_FLAG_CRTIME") | value("inode::INODE_FLAG_MAP48"),
        ),
    ] {
        let codec = ExtentCodec::for_version(v);
        let cap = codec.inline_capacity();
        let max = codec.max_address();
        let ex: Vec<Extent> = (0..cap as u64)
            .map(|k| Extent {
                logical: 20 * k,
                physical: max - 100 - 2 * k,
                len: 1 + k as u32,
                unwritten: k % 2 == 0,
            })
            .collect();
        let i = Inode {
            extent_count: 1000,
            xattr_block: max,
            extent_block: max - 1,
            inline: InlineArea::Extents(ex.clone()),
            crtime: Some(crtime),
            ..Inode::new(v, inode::S_IFREG | 0o600, 5, 6, t(7, 8))
        };
        let mut b = [0u8; INODE_SIZE];
        i.encode(ino, &mut b).unwrap();
        let f = |l: &Layout, name: &str| {
            let (o, n) = l.at(name);
            le(&b, o, n)
        };
        assert_eq!(f(&l, "flags"), flags, "v{}", v.0);
        assert_eq!(f(&c, "crtime_sec") as i64, crtime.sec);
        assert_eq!(f(&c, "crtime_nsec"), crtime.nsec as u64);
        assert_eq!(f(&l, "xattr_block"), max & 0xFFFF_FFFF);
        assert_eq!(f(&l, "extent_block"), (max - 1) & 0xFFFF_FFFF);
        if v == FormatVersion::V3 {
            assert_eq!(f(&w, "xattr_block_hi"), max >> 32);
            assert_eq!(f(&w, "extent_block_hi"), (max - 1) >> 32);
            assert_eq!(cap, 9);
            let base = l.off("inline");
            for (k, e) in ex.iter().enumerate() {
                let rec = &b[base + 16 * k..base + 16 * (k + 1)];
                let g = |name: &str| {
                    let (o, n) = r3.at(name);
                    le(rec, o, n)
                };
                assert_eq!(
                    (g("logical"), g("physical"), g("len"), g("flags")),
                    (e.logical, e.physical, e.len as u64, e.unwritten as u64)
                );
            }
        } else {
            zero(&b, &l, "reserved0");
            assert_eq!(cap, 12);
        }
        let (co, _) = c.at("crc");
        let mut h = crc32fast::Hasher::new();
        h.update(&ino.0.to_le_bytes());
        h.update(&b[..co]);
        assert_eq!(f(&c, "crc"), h.finalize() as u64);
        assert_eq!(Inode::decode(ino, &b, v).unwrap(), Some(i.clone()));
        assert_eq!(
            Inode::decode(ino, &b, FormatVersion::CURRENT).unwrap(),
            Some(i.clone())
        );
        // An image whose newest layout is older rejects it.
        assert!(Inode::decode(ino, &b, FormatVersion(v.0 - 1)).is_err());
        // One record more than the layout's inline area, or a missing creation time, is
        // refused by the writer.
        let over = Inode {
            inline: InlineArea::Extents(
                (0..=cap as u64)
                    .map(|k| Extent {
                        logical: k,
                        physical: 100 + k * 2,
                        len: 1,
                        unwritten: false,
                    })
                    .collect(),
            ),
            ..i.clone()
        };
        assert!(over.encode(ino, &mut b).is_err());
        let no_crtime = Inode {
            crtime: None,
            ..i.clone()
        };
        assert!(no_crtime.encode(ino, &mut b).is_err());
    }
    // `MAP48` without `CRTIME` names no layout.
    let mut b = [0u8; INODE_SIZE];
    Inode::new(FormatVersion::V1, inode::S_IFREG, 0, 0, t(1, 2))
        .encode(ino, &mut b)
        .unwrap();
    let (fo, _) = l.at("flags");
    b[fo] = value("inode::INODE_FLAG_MAP48") as u8;
    let (co, _) = l.at("crc");
    let mut h = crc32fast::Hasher::new();
    h.update(&ino.0.to_le_bytes());
    h.update(&b[..co]);
    b[co..co + 4].copy_from_slice(&h.finalize().to_le_bytes());
    assert!(Inode::decode(ino, &b, FormatVersion::V3).is_err());
}

#[test]
fn block_map_v3_bytes() {
    let r = layout("Block-map record (v3)");
    let codec = ExtentCodec::for_version(FormatVersion::V3);
    let e = Extent {
        logical: 0x0102_0304,
        physical: 0x0A0B_0C0D_0E0F,
        len: 0xFFFF,
        unwritten: true,
    };
    let mut rec = vec![0u8; codec.record_size()];
    codec.encode(&e, &mut rec).unwrap();
    let g = |name: &str| {
        let (o, n) = r.at(name);
        le(&rec, o, n)
    };
    assert_eq!(g("logical"), e.logical);
    assert_eq!(g("physical"), e.physical);
    assert_eq!(g("len"), 0xFFFF);
    assert_eq!(g("flags"), extent::EXTENT_FLAG_UNWRITTEN as u64);
    assert_eq!(codec.decode(&rec).unwrap(), e);
    assert_eq!(codec.max_address(), (1 << 48) - 1);
    // The run ends at or below 2^48.
    let (po, pn) = r.at("physical");
    let at = |start: u64, len: u16| {
        let mut c = rec.clone();
        c[po..po + pn].copy_from_slice(&start.to_le_bytes());
        let (o, n) = r.at("len");
        c[o..o + n].copy_from_slice(&len.to_le_bytes());
        codec.decode(&c)
    };
    assert_eq!(at((1 << 48) - 100, 100).unwrap().physical_end(), 1 << 48);
    assert!(at((1 << 48) - 100, 101).is_err());
    assert!(at(1 << 63, 1).is_err());
    let mut bad = rec.clone();
    let (o, _) = r.at("flags");
    bad[o] |= 2;
    assert!(codec.decode(&bad).is_err());

    let l = layout("Extent block (v3)");
    let ex: Vec<Extent> = (0..codec.records_per_block() as u64)
        .map(|k| Extent {
            logical: k * 3,
            physical: (1 << 40) + k * 3,
            len: 2,
            unwritten: k % 3 == 0,
        })
        .collect();
    let next = 0x0102_0304_0506;
    for n in [0, 1, 3, ex.len()] {
        let b = codec
            .encode_block(Ino(0x0C0D), BlockAddr(0x0E0F), next, &ex[..n])
            .unwrap();
        let (o, s) = l.at("next");
        assert_eq!(le(&b[..], o, s), next);
        let (o, s) = l.at("count");
        assert_eq!(le(&b[..], o, s), n as u64);
        zero(&b[..], &l, "reserved");
        let (ro, rsz) = l.at("records");
        let rs = codec.record_size();
        for (k, e) in ex[..n].iter().enumerate() {
            let mut want = vec![0u8; rs];
            codec.encode(e, &mut want).unwrap();
            assert_eq!(&b[ro + k * rs..ro + (k + 1) * rs], &want[..]);
        }
        assert!(b[ro + n * rs..ro + rsz].iter().all(|&x| x == 0));
        check_tail(&b[..], BlockKind::ExtentBlock, 0x0C0D, 0x0E0F);
        assert_eq!(
            codec
                .decode_block(&b[..], Ino(0x0C0D), BlockAddr(0x0E0F))
                .unwrap(),
            (next, ex[..n].to_vec())
        );
        let mut c = b.clone();
        c[l.off("reserved")] = 1;
        block::seal(
            &mut c[..],
            BlockKind::ExtentBlock,
            Ino(0x0C0D),
            BlockAddr(0x0E0F),
        );
        assert!(codec
            .decode_block(&c[..], Ino(0x0C0D), BlockAddr(0x0E0F))
            .is_err());
    }
    assert!(codec
        .encode_block(Ino(1), BlockAddr(1), 1 << 48, &ex[..1])
        .is_err());
}

/// A superblock in the middle of a conversion, and one of each version.
#[test]
fn superblock_conversion_bytes() {
    let l = layout("Superblock");
    let values = named_values(DOC);
    let value = |name: &str| values[name].0;
    let converting = Superblock {
        format_version: FormatVersion::V1,
        incompat: (value("version::INCOMPAT_CRTIME")
            | value("version::INCOMPAT_MAP48")
            | value("version::INCOMPAT_CONVERTING")) as u32,
        conversion_cursor: 1234,
        conversion_target: Some(FormatVersion::V3),
        ..sample_superblock()
    };
    let b = converting.encode();
    let f = |name: &str| {
        let (o, n) = l.at(name);
        le(&b[..], o, n)
    };
    assert_eq!(f("format_version"), 1);
    assert_eq!(f("conversion_cursor"), 1234);
    assert_eq!(f("conversion_target"), 3);
    assert_eq!(f("incompat"), 7);
    assert_eq!(Superblock::decode(&b[..]).unwrap(), converting);
    assert_eq!(converting.newest_layout(), FormatVersion::V3);
    for (v, bits) in [
        (FormatVersion::V1, 0),
        (FormatVersion::V2, value("version::INCOMPAT_CRTIME")),
        (
            FormatVersion::V3,
            value("version::INCOMPAT_CRTIME") | value("version::INCOMPAT_MAP48"),
        ),
    ] {
        assert_eq!(v.incompat_features() as u64, bits);
        let s = Superblock {
            format_version: v,
            incompat: bits as u32,
            ..sample_superblock()
        };
        assert_eq!(Superblock::decode(&s.encode()[..]).unwrap(), s);
    }
}

#[test]
fn directory_bytes() {
    let l = layout("Directory header");
    let h = DirHeader {
        parent: Ino(0x0102_0304),
        level: 7,
        split: 100,
        entry_count: 0x0506_0708_090A,
        overflow_next: 0x0B0C,
    };
    let b = h.encode(Ino(33), BlockAddr(0x4455));
    let f = |name: &str| {
        let (o, n) = l.at(name);
        le(&b[..], o, n)
    };
    assert_eq!(f("version"), dir::DIR_VERSION as u64);
    assert_eq!(f("parent"), 0x0102_0304);
    assert_eq!(f("level"), 7);
    assert_eq!(f("split"), 100);
    assert_eq!(f("entry_count"), h.entry_count);
    assert_eq!(f("overflow_next"), 0x0B0C);
    zero(&b[..], &l, "reserved");
    check_tail(&b[..], BlockKind::DirHeader, 33, 0x4455);
    assert_eq!(
        DirHeader::decode(&b[..], Ino(33), BlockAddr(0x4455)).unwrap(),
        h
    );
    // level ≤ 29 and split < 2^level; other versions are unsupported.
    for (lv, sp, ok) in [
        (29, (1 << 29) - 1, true),
        (30, 0, false),
        (3, 8, false),
        (0, 0, true),
        (0, 1, false),
    ] {
        let b = DirHeader {
            level: lv,
            split: sp,
            ..h
        }
        .encode(Ino(33), BlockAddr(1));
        assert_eq!(
            DirHeader::decode(&b[..], Ino(33), BlockAddr(1)).is_ok(),
            ok,
            "level {lv} split {sp}"
        );
    }
    let mut c = b.clone();
    c[l.off("version")] = 2;
    block::seal(&mut c[..], BlockKind::DirHeader, Ino(33), BlockAddr(0x4455));
    assert!(matches!(
        DirHeader::decode(&c[..], Ino(33), BlockAddr(0x4455)),
        Err(FormatError::UnsupportedVersion { .. })
    ));
    // `parent` is never 0; `overflow_next` keeps every overflow block a u32 file block.
    assert_eq!(
        dir::OVERFLOW_BASE + dir::MAX_OVERFLOW_BLOCKS,
        1 << 32,
        "the last overflow index is file block 2^32 - 1"
    );
    for (parent, overflow_next, ok) in [
        (0, 0, false),
        (1, dir::MAX_OVERFLOW_BLOCKS as u32, true),
        (1, dir::MAX_OVERFLOW_BLOCKS as u32 + 1, false),
        (1, u32::MAX, false),
    ] {
        let b = DirHeader {
            parent: Ino(parent),
            overflow_next,
            ..h
        }
        .encode(Ino(33), BlockAddr(1));
        assert_eq!(
            DirHeader::decode(&b[..], Ino(33), BlockAddr(1)).is_ok(),
            ok,
            "parent {parent} overflow_next {overflow_next}"
        );
    }

    // Bucket and entries.
    let l = layout("Directory bucket");
    let el = layout("Directory entry");
    let entries = vec![
        DirEntry {
            ino: Ino(0x0A0B_0C0D),
            dtype: dir::DT_DIR,
            name: b"sub".to_vec(),
        },
        DirEntry {
            ino: Ino(7),
            dtype: dir::DT_REG,
            name: vec![b'n'; 255],
        },
        DirEntry {
            ino: Ino(8),
            dtype: dir::DT_LNK,
            name: b"l".to_vec(),
        },
    ];
    let bk = Bucket {
        next: dir::OVERFLOW_BASE + 5,
        entries: entries.clone(),
    };
    let b = bk.encode(Ino(33), BlockAddr(0x4456)).unwrap();
    let f = |name: &str| {
        let (o, n) = l.at(name);
        le(&b[..], o, n)
    };
    assert_eq!(f("next"), dir::OVERFLOW_BASE + 5);
    assert_eq!(f("count"), 3);
    let used: usize = entries
        .iter()
        .map(|e| dir::ENTRY_HEADER + e.name.len())
        .sum();
    assert_eq!(f("used"), used as u64);
    let mut off = l.off("entries");
    for e in &entries {
        let g = |name: &str| {
            let (o, n) = el.at(name);
            le(&b[..], off + o, n)
        };
        assert_eq!(g("ino"), e.ino.0 as u64);
        assert_eq!(g("dtype"), e.dtype as u64);
        assert_eq!(g("name_len"), e.name.len() as u64);
        let no = off + el.off("name");
        assert_eq!(&b[no..no + e.name.len()], &e.name[..]);
        off = no + e.name.len();
    }
    let (eo, es) = l.at("entries");
    assert!(b[off..eo + es].iter().all(|&x| x == 0));
    check_tail(&b[..], BlockKind::DirBucket, 33, 0x4456);
    assert_eq!(
        Bucket::decode(&b[..], Ino(33), BlockAddr(0x4456)).unwrap(),
        bk
    );
    // A `next` link below the overflow area is corrupt.
    let mut c = b.clone();
    let (o, n) = l.at("next");
    c[o..o + n].copy_from_slice(&5u32.to_le_bytes());
    block::seal(&mut c[..], BlockKind::DirBucket, Ino(33), BlockAddr(0x4456));
    assert!(Bucket::decode(&c[..], Ino(33), BlockAddr(0x4456)).is_err());
    // `.` and `..` are never stored.
    for bad in [&b"."[..], b"..", b"", b"a/b", b"a\0"] {
        assert!(dir::validate_name(bad).is_err());
        // The writer refuses what the reader rejects.
        let e = DirEntry {
            name: bad.to_vec(),
            ..entries[0].clone()
        };
        let bk = Bucket {
            next: 0,
            entries: vec![e],
        };
        assert!(bk.encode(Ino(33), BlockAddr(2)).is_err());
    }
    for (ino, dtype) in [(0, dir::DT_REG), (5, dir::DT_UNKNOWN), (5, 3), (5, 14)] {
        let bk = Bucket {
            next: 0,
            entries: vec![DirEntry {
                ino: Ino(ino),
                dtype,
                name: b"x".to_vec(),
            }],
        };
        assert!(bk.encode(Ino(33), BlockAddr(2)).is_err(), "{ino} {dtype}");
    }
    for next in [1, dir::OVERFLOW_BASE - 1, 1 << 32] {
        let bk = Bucket {
            next,
            entries: vec![],
        };
        assert!(bk.encode(Ino(33), BlockAddr(2)).is_err(), "next {next}");
    }
    assert!(dir::validate_name(&[b'x'; 256]).is_err());
}

#[test]
fn directory_hashing_follows_the_doc() {
    // The name hash is the image CRC over the name bytes.
    for name in [&b"a"[..], b"hello.txt", &[0xFFu8; 255]] {
        assert_eq!(dir::name_hash(name), crc32fast::hash(name));
    }
    // Bucket addressing exactly as worded.
    let doc_bucket = |level: u32, split: u32, h: u32| -> u64 {
        let b = h as u64 % (1u64 << level);
        if b < split as u64 {
            h as u64 % (1u64 << (level + 1))
        } else {
            b
        }
    };
    let mut x: u32 = 0x1234_5678;
    for level in [0u32, 1, 2, 5, 13, 29] {
        for split in [0u32, 1, (1 << level) / 2, (1u32 << level) - 1] {
            if split >= 1 << level {
                continue;
            }
            let h = DirHeader {
                parent: Ino(1),
                level,
                split,
                entry_count: 0,
                overflow_next: 0,
            };
            assert_eq!(h.bucket_count(), (1u64 << level) + split as u64);
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let b = h.bucket_of(x);
                assert_eq!(b, doc_bucket(level, split, x));
                assert!(b < h.bucket_count());
                assert!(DirHeader::bucket_block(b) < dir::OVERFLOW_BASE);
            }
        }
    }
    // Split rule threshold.
    let mut h = DirHeader::new(Ino(1));
    h.entry_count = dir::SPLIT_LOAD;
    assert!(!h.needs_split());
    h.entry_count += 1;
    assert!(h.needs_split());
    assert_eq!(DirHeader::bucket_block(0), 1);
    // Type codes follow the mode.
    assert_eq!(dir::dtype_of_mode(inode::S_IFDIR | 0o755), dir::DT_DIR);
    assert_eq!(dir::dtype_of_mode(inode::S_IFSOCK), dir::DT_SOCK);
}

#[test]
fn xattr_bytes() {
    let l = layout("Xattr block");
    let el = layout("Xattr entry");
    let mut s = XattrSet::default();
    s.set(b"user.zeta", b"").unwrap();
    s.set(b"trusted.x", &[0xAB; 300]).unwrap();
    s.set(b"user.alpha", b"value").unwrap();
    let b = s.encode(Ino(0x0506), BlockAddr(0x0708)).unwrap();
    let (o, n) = l.at("count");
    assert_eq!(le(&b[..], o, n), 3);
    let (o, n) = l.at("used");
    assert_eq!(le(&b[..], o, n), s.used() as u64);
    // Entries sorted by name in byte order.
    let mut off = l.off("entries");
    let mut names = Vec::new();
    for (name, value) in &s.entries {
        let (o, n) = el.at("name_len");
        assert_eq!(le(&b[..], off + o, n), name.len() as u64);
        let (o, n) = el.at("value_len");
        assert_eq!(le(&b[..], off + o, n), value.len() as u64);
        let no = off + el.off("name");
        assert_eq!(&b[no..no + name.len()], &name[..]);
        assert_eq!(
            &b[no + name.len()..no + name.len() + value.len()],
            &value[..]
        );
        off = no + name.len() + value.len();
        names.push(name.clone());
    }
    assert_eq!(
        names,
        vec![
            b"trusted.x".to_vec(),
            b"user.alpha".to_vec(),
            b"user.zeta".to_vec()
        ]
    );
    let (eo, es) = l.at("entries");
    assert!(b[off..eo + es].iter().all(|&x| x == 0));
    check_tail(&b[..], BlockKind::XattrBlock, 0x0506, 0x0708);
    assert_eq!(
        XattrSet::decode(&b[..], Ino(0x0506), BlockAddr(0x0708)).unwrap(),
        s
    );
    // The block is the limit: one entry can fill it exactly, not more.
    let mut s = XattrSet::default();
    let name = b"user.f";
    let fill = xattr::XATTR_CAPACITY - xattr::XATTR_ENTRY_HEADER - name.len();
    s.set(name, &vec![1; fill]).unwrap();
    assert!(s.set(b"user.g", b"").is_err());
    let b = s.encode(Ino(1), BlockAddr(2)).unwrap();
    assert_eq!(XattrSet::decode(&b[..], Ino(1), BlockAddr(2)).unwrap(), s);
    // The writer refuses, never truncates, what the reader would reject.
    let long = vec![b'n'; xattr::XATTR_NAME_MAX + 1];
    let set = |entries: &[(&[u8], usize)]| XattrSet {
        entries: entries
            .iter()
            .map(|(n, v)| (n.to_vec(), vec![7; *v]))
            .collect(),
    };
    for bad in [
        set(&[(&long, 0)]),
        set(&[(b"", 0)]),
        set(&[(b"user.\0", 0)]),
        set(&[(b"user.v", u16::MAX as usize + 1)]),
        set(&[(b"user.b", 0), (b"user.a", 0)]),
        set(&[(b"user.a", 0), (b"user.a", 1)]),
    ] {
        assert!(bad.encode(Ino(1), BlockAddr(2)).is_err());
    }
}

#[test]
fn bitmap_bytes() {
    let l = layout("Bitmap block");
    let mut bits = vec![0u8; PAYLOAD_SIZE];
    for i in [0usize, 9, 17, 32639] {
        bitmap::set_bit(&mut bits, i, true);
    }
    // Least significant bit first.
    assert_eq!(bits[0], 0b0000_0001);
    assert_eq!(bits[1], 0b0000_0010);
    assert_eq!(bits[2], 0b0000_0010);
    assert_eq!(bits[4079], 0b1000_0000);
    for kind in [BlockKind::InodeBitmap, BlockKind::BlockBitmap] {
        let b = bitmap::encode(kind, &bits, BlockAddr(0x99));
        let (o, n) = l.at("bits");
        assert_eq!(&b[o..o + n], &bits[..]);
        check_tail(&b[..], kind, 0, 0x99);
        assert_eq!(
            bitmap::decode(kind, &b[..], BlockAddr(0x99)).unwrap(),
            &bits[..]
        );
        assert!(bitmap::get_bit(&b[..], 9) && !bitmap::get_bit(&b[..], 8));
    }
    assert_eq!(l.at("bits").1 as u64 * 8, sb::BITS_PER_BITMAP_BLOCK);
}

#[test]
fn journal_bytes() {
    let l = layout("Journal superblock");
    let j = JournalSuper {
        blocks: 0x0102_0304,
        sequence: 0x0A0B_0C0D_0E0F_1011,
    };
    let b = j.encode(BlockAddr(1));
    let (o, n) = l.at("version");
    assert_eq!(le(&b[..], o, n), journal::JOURNAL_VERSION as u64);
    let (o, n) = l.at("blocks");
    assert_eq!(le(&b[..], o, n), 0x0102_0304);
    let (o, n) = l.at("sequence");
    assert_eq!(le(&b[..], o, n), j.sequence);
    zero(&b[..], &l, "reserved");
    check_tail(&b[..], BlockKind::JournalSuper, 0, 1);
    assert_eq!(JournalSuper::decode(&b[..], BlockAddr(1)).unwrap(), j);
    let mut c = b.clone();
    c[l.off("reserved")] = 1;
    block::seal(&mut c[..], BlockKind::JournalSuper, Ino(0), BlockAddr(1));
    assert!(JournalSuper::decode(&c[..], BlockAddr(1)).is_err());
    let mut c = b.clone();
    c[l.off("version")] = 2;
    block::seal(&mut c[..], BlockKind::JournalSuper, Ino(0), BlockAddr(1));
    assert!(matches!(
        JournalSuper::decode(&c[..], BlockAddr(1)),
        Err(FormatError::UnsupportedVersion { .. })
    ));
    // A reset torn by a power cut: the new block's first sectors over the old one's last.
    let newer = JournalSuper {
        sequence: j.sequence + 1,
        ..j
    }
    .encode(BlockAddr(1));
    for keep in (512..BLOCK_SIZE).step_by(512) {
        let mut torn = b.clone();
        torn[..keep].copy_from_slice(&newer[..keep]);
        assert!(JournalSuper::decode(&torn[..], BlockAddr(1)).is_err());
        assert_eq!(
            JournalSuper::decode_allowing_torn_reset(&torn[..], BlockAddr(1)).unwrap(),
            JournalSuper {
                sequence: j.sequence + 1,
                ..j
            },
            "torn after {keep} bytes"
        );
    }
    // Anything else that fails its checksum is still refused.
    let mut c = b.clone();
    c[l.off("reserved") + 7] ^= 0x40;
    assert!(JournalSuper::decode_allowing_torn_reset(&c[..], BlockAddr(1)).is_err());
    let mut c = newer.clone();
    c[block::TAIL_KIND] ^= 1;
    assert!(JournalSuper::decode_allowing_torn_reset(&c[..], BlockAddr(1)).is_err());

    let l = layout("Journal descriptor");
    let targets: Vec<u64> = (0..journal::MAX_TX_BLOCKS as u64)
        .map(|k| 0x0001_0000_0000 + k * 3)
        .collect();
    for n in [1, 2, journal::MAX_TX_BLOCKS] {
        let b =
            journal::encode_descriptor(0x5566_7788_99AA, &targets[..n], BlockAddr(0x21)).unwrap();
        let (o, s) = l.at("sequence");
        assert_eq!(le(&b[..], o, s), 0x5566_7788_99AA);
        let (o, s) = l.at("count");
        assert_eq!(le(&b[..], o, s), n as u64);
        zero(&b[..], &l, "reserved");
        let (to, ts) = l.at("targets");
        for (k, tg) in targets[..n].iter().enumerate() {
            assert_eq!(le(&b[..], to + 8 * k, 8), *tg);
        }
        assert!(b[to + 8 * n..to + ts].iter().all(|&x| x == 0));
        check_tail(&b[..], BlockKind::JournalDesc, 0, 0x21);
        assert_eq!(
            journal::decode_descriptor(&b[..], BlockAddr(0x21)).unwrap(),
            (0x5566_7788_99AA, targets[..n].to_vec())
        );
    }
    // The pad, the bytes after the last target and repeated targets are rejected.
    let b = journal::encode_descriptor(7, &targets[..3], BlockAddr(0x21)).unwrap();
    let (to, ts) = l.at("targets");
    let (ro, rs) = l.at("reserved");
    for at in [ro, ro + rs - 1, to + 8 * 3, to + ts - 1] {
        let mut c = b.clone();
        c[at] = 1;
        block::seal(&mut c[..], BlockKind::JournalDesc, Ino(0), BlockAddr(0x21));
        assert!(
            journal::decode_descriptor(&c[..], BlockAddr(0x21)).is_err(),
            "byte {at}"
        );
    }
    let mut c = b.clone();
    c[to + 8..to + 16].copy_from_slice(&targets[0].to_le_bytes());
    block::seal(&mut c[..], BlockKind::JournalDesc, Ino(0), BlockAddr(0x21));
    assert!(journal::decode_descriptor(&c[..], BlockAddr(0x21)).is_err());
    assert!(journal::encode_descriptor(1, &[5, 6, 5], BlockAddr(1)).is_err());
    assert!(journal::encode_descriptor(1, &[], BlockAddr(1)).is_err());
    assert!(
        journal::encode_descriptor(1, &[targets.clone(), vec![7]].concat(), BlockAddr(1)).is_err()
    );

    let l = layout("Journal commit");
    let b = journal::encode_commit(0x5566_7788_99AA, 0x0123, 0xDEAD_BEEF, BlockAddr(0x22));
    let (o, s) = l.at("sequence");
    assert_eq!(le(&b[..], o, s), 0x5566_7788_99AA);
    let (o, s) = l.at("count");
    assert_eq!(le(&b[..], o, s), 0x0123);
    let (o, s) = l.at("data_crc");
    assert_eq!(le(&b[..], o, s), 0xDEAD_BEEF);
    zero(&b[..], &l, "reserved");
    check_tail(&b[..], BlockKind::JournalCommit, 0, 0x22);
    assert_eq!(
        journal::decode_commit(&b[..], BlockAddr(0x22)).unwrap(),
        (0x5566_7788_99AA, 0x0123, 0xDEAD_BEEF)
    );
    let (ro, rs) = l.at("reserved");
    for at in [ro, ro + rs - 1] {
        let mut c = b.clone();
        c[at] = 1;
        block::seal(
            &mut c[..],
            BlockKind::JournalCommit,
            Ino(0),
            BlockAddr(0x22),
        );
        assert!(journal::decode_commit(&c[..], BlockAddr(0x22)).is_err());
    }
    // n images occupy n + 2 journal blocks.
    assert_eq!(journal::tx_footprint(1), 3);
    assert_eq!(
        journal::tx_footprint(journal::MAX_TX_BLOCKS),
        journal::MAX_TX_BLOCKS as u64 + 2
    );
}

#[test]
fn frame_bytes() {
    let l = layout("Frame");
    let payload: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let b = frame::encode(0x4D4F_4C54, 0x0000_0003, &payload);
    let (o, n) = l.at("magic");
    assert_eq!(le(&b, o, n), 0x4D4F_4C54);
    let (o, n) = l.at("version");
    assert_eq!(le(&b, o, n), 3);
    let (o, n) = l.at("length");
    assert_eq!(le(&b, o, n), payload.len() as u64);
    let po = l.off("payload");
    assert_eq!(&b[po..po + payload.len()], &payload[..]);
    let co = po + payload.len();
    assert_eq!(b.len(), co + frame::FRAME_TRAILER);
    assert_eq!(le(&b, co, 4), crc32fast::hash(&b[..co]) as u64);
    let f = frame::decode("spec", &b, 0x4D4F_4C54, 1000).unwrap();
    assert_eq!((f.version, f.payload), (3, &payload[..]));
    // The cap is checked before anything else about the payload.
    assert!(matches!(
        frame::decode("spec", &b, 0x4D4F_4C54, 999),
        Err(FormatError::TooLarge { .. })
    ));
    // In the documented order: fewer than 20 bytes, the magic, the cap, the exact size,
    // the CRC. Each blob below fails several checks and must report the first.
    assert!(matches!(
        frame::decode("spec", &b[..19], 0x4D4F_4C55, 0),
        Err(FormatError::Truncated { need: 20, .. })
    ));
    let (lo, ln) = l.at("length");
    let mut c = b.clone();
    c[lo..lo + ln].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        frame::decode("spec", &c, 0x4D4F_4C55, 0),
        Err(FormatError::BadMagic { .. })
    ));
    assert!(matches!(
        frame::decode("spec", &c, 0x4D4F_4C54, 1 << 20),
        Err(FormatError::TooLarge { .. })
    ));
    // Whatever the cap, no length overflows the size arithmetic.
    assert!(matches!(
        frame::decode("spec", &c, 0x4D4F_4C54, u64::MAX),
        Err(FormatError::Truncated { .. })
    ));
    let mut c = b.clone();
    c.push(0);
    c[po] ^= 1;
    assert!(matches!(
        frame::decode("spec", &c, 0x4D4F_4C54, 1 << 20),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        frame::decode("spec", &b, 0x4D4F_4C55, 1 << 20),
        Err(FormatError::BadMagic { .. })
    ));
    assert!(frame::decode("spec", &b[..b.len() - 1], 0x4D4F_4C54, 1 << 20).is_err());
    let mut c = b.clone();
    c[po + 10] ^= 1;
    assert!(matches!(
        frame::decode("spec", &c, 0x4D4F_4C54, 1 << 20),
        Err(FormatError::Checksum { .. })
    ));
    // Serde payloads round-trip and refuse trailing bytes.
    let v: (u32, String, Vec<u64>) = (7, "state".into(), vec![1, 2, 3]);
    let b = frame::encode_serde(0x1234, 1, &v);
    let f = frame::decode("spec", &b, 0x1234, 1 << 20).unwrap();
    assert_eq!(
        frame::decode_serde::<(u32, String, Vec<u64>)>("spec", f.payload).unwrap(),
        v
    );
    let mut longer = f.payload.to_vec();
    longer.push(0);
    assert!(frame::decode_serde::<(u32, String, Vec<u64>)>("spec", &longer).is_err());
}

fn check_doc(doc: &str) -> Result<(), String> {
    check_layout_tables(doc)?;
    check_named_values(doc)?;
    check_geometry_examples(doc)
}

/// `text` with the number that starts it replaced by `n + 1`, in the same base.
fn bumped(text: &str) -> Option<String> {
    let lead = text.len() - text.trim_start_matches('`').len();
    let body = &text[lead..];
    let end = body
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(body.len());
    let word = &body[..end];
    let v = number(word)?;
    let new = if word.starts_with("0x") {
        format!("0x{:X}", v + 1)
    } else if word.starts_with("0o") {
        format!("0o{:o}", v + 1)
    } else {
        (v + 1).to_string()
    };
    Some(format!("{}{}{}", &text[..lead], new, &body[end..]))
}

/// Mutation check: bumping any single number in any checked table must make the check
/// fail, so no number in those tables is decoration.
#[test]
fn changing_any_number_in_a_checked_table_is_caught() {
    check_doc(DOC).unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<&str> = DOC.lines().collect();
    let mut tried = 0;
    for t in tables(DOC) {
        let columns: Vec<usize> = if is_layout(&t) {
            vec![0, 1]
        } else if is_named(&t) {
            vec![1]
        } else if is_examples(&t) {
            (0..t.header.len()).collect()
        } else {
            continue;
        };
        for (k, row) in t.rows.iter().enumerate() {
            let line = t.line + 1 + k; // 0-based index of the row
            for &c in &columns {
                let Some(new_cell) = bumped(&row[c]) else {
                    continue;
                };
                let mut cells = row.clone();
                cells[c] = new_cell;
                let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                edited[line] = format!("| {} |", cells.join(" | "));
                let edited = edited.join("\n");
                assert!(
                    check_doc(&edited).is_err(),
                    "line {}: changing `{}` to `{}` under `{}` went unnoticed",
                    line + 1,
                    row[c],
                    cells[c],
                    t.heading
                );
                tried += 1;
            }
        }
    }
    eprintln!("{tried} numbers in checked tables mutated, each caught");
    assert!(tried > 300, "only {tried} numbers were mutated");
}
