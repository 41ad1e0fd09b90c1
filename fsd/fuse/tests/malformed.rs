//! Requests that are not what the kernel sends: arbitrary bytes, and valid requests with
//! one thing wrong. Decoding never panics and never reads past the request; the session
//! answers every request that has a header at most once (exactly once for those that
//! take a reply), to the header's `unique`, and one without a header not at all.

mod common;

use std::io;

use common::*;
use molt_fuse::abi::{self, init, opcode, InHeader};
use molt_fuse::request::{decode, DecodeError, Operation};
use molt_fuse::{InitPolicy, ReplySink, Served};
use proptest::prelude::*;
use proptest::sample::Index;
use zerocopy::{FromBytes, IntoBytes};

const HEADER: usize = core::mem::size_of::<InHeader>();

/// Which session a request meets.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Before INIT.
    Fresh,
    /// After a 7.44 kernel's INIT, SETXATTR_EXT negotiated.
    Extended,
    /// After an INIT without SETXATTR_EXT.
    Compat,
}

fn harness(state: State) -> Harness {
    match state {
        State::Fresh => Harness::new(InitPolicy::new(InitPolicy::LOCAL_FILESYSTEM)),
        State::Extended => Harness::initialized(),
        State::Compat => Harness::initialized_with(
            InitPolicy::new(InitPolicy::LOCAL_FILESYSTEM & !init::SETXATTR_EXT),
            kernel_init_in(),
        ),
    }
}

fn state() -> impl Strategy<Value = State> {
    prop_oneof![
        1 => Just(State::Fresh),
        4 => Just(State::Extended),
        2 => Just(State::Compat),
    ]
}

/// One change to a valid request's body.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    Truncate(Index),
    Flip(Vec<(Index, u8)>),
    Append(Vec<u8>),
    Insert(Index, Vec<u8>),
    Replace(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => Just(Mutation::None),
        3 => any::<Index>().prop_map(Mutation::Truncate),
        3 => prop::collection::vec((any::<Index>(), 1..=255u8), 1..4).prop_map(Mutation::Flip),
        2 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Mutation::Replace),
    ]
}

fn mutate(mut body: Vec<u8>, m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::None => {}
        Mutation::Truncate(i) => body.truncate(i.index(body.len() + 1)),
        Mutation::Flip(flips) => {
            if !body.is_empty() {
                for (i, x) in flips {
                    let i = i.index(body.len());
                    body[i] ^= x;
                }
            }
        }
        Mutation::Append(b) => body.extend_from_slice(b),
        Mutation::Insert(i, b) => {
            let at = i.index(body.len() + 1);
            body.splice(at..at, b.iter().copied());
        }
        Mutation::Replace(b) => body = b.clone(),
    }
    body
}

/// How the header's `len` relates to the buffer.
#[derive(Debug, Clone, Copy)]
enum Len {
    Exact,
    Off(i64),
    Any(u32),
}

fn len() -> impl Strategy<Value = Len> {
    prop_oneof![
        8 => Just(Len::Exact),
        1 => (-48i64..48).prop_map(Len::Off),
        1 => any::<u32>().prop_map(Len::Any),
    ]
}

/// A request for the property tests: mostly a valid one with a mutation, sometimes an
/// opcode the kernel never sends, with a header whose `len` and `total_extlen` may lie.
#[derive(Debug, Clone)]
struct Case {
    opcode: u32,
    unique: u64,
    nodeid: u64,
    mutation: Mutation,
    len: Len,
    total_extlen: u16,
}

fn case() -> impl Strategy<Value = Case> {
    let op = prop_oneof![
        9 => prop::sample::select(opcode::ALL),
        1 => any::<u32>(),
    ];
    let nodeid = prop_oneof![
        Just(ROOT),
        Just(FILE),
        Just(DIR),
        Just(GREEDY),
        Just(BOASTFUL),
        Just(PANICKY),
        any::<u64>(),
    ];
    let extlen = prop_oneof![
        6 => Just(0u16),
        3 => 0u16..8,
        1 => any::<u16>(),
    ];
    (op, any::<u64>(), nodeid, mutation(), len(), extlen).prop_map(
        |(opcode, unique, nodeid, mutation, len, total_extlen)| Case {
            opcode,
            unique,
            nodeid,
            mutation,
            len,
            total_extlen,
        },
    )
}

impl Case {
    fn bytes(&self) -> Vec<u8> {
        let body = if opcode::ALL.contains(&self.opcode) {
            well_formed(self.opcode).1
        } else {
            Vec::new()
        };
        let body = mutate(body, &self.mutation);
        let exact = (HEADER + body.len()) as u32;
        let h = InHeader {
            len: match self.len {
                Len::Exact => exact,
                Len::Off(d) => (exact as i64 + d).clamp(0, u32::MAX as i64) as u32,
                Len::Any(n) => n,
            },
            total_extlen: self.total_extlen,
            ..header(self.opcode, self.unique, self.nodeid)
        };
        raw(h, &body)
    }
}

/// The payload a successful reply to `op` has, where the kernel fixes it.
fn fixed_payload(op: u32) -> Option<usize> {
    use opcode::*;
    Some(match op {
        LOOKUP | SYMLINK | MKNOD | MKDIR | LINK => 128,
        GETATTR | SETATTR => 104,
        OPEN | OPENDIR => 16,
        CREATE => 144,
        WRITE | LSEEK => 8,
        STATFS => 80,
        STATX => 288,
        INIT => 64,
        UNLINK | RMDIR | RENAME | RENAME2 | FLUSH | RELEASE | RELEASEDIR | FSYNC | FSYNCDIR
        | SETXATTR | REMOVEXATTR | ACCESS | FALLOCATE | SYNCFS | DESTROY => 0,
        _ => return None,
    })
}

/// Checks what serving `buf` came to against the protocol's rules.
fn check_served(
    buf: &[u8],
    setxattr_ext: bool,
    served: io::Result<Served>,
    replies: &[Reply],
) -> Result<(), TestCaseError> {
    if buf.len() < HEADER {
        prop_assert!(served.is_err(), "a {}-byte request was served", buf.len());
        prop_assert!(
            replies.is_empty(),
            "a request without a header was answered"
        );
        return Ok(());
    }
    let served = served.map_err(|e| TestCaseError::fail(format!("not served: {e}")))?;
    let (h, _) = InHeader::read_from_prefix(buf).unwrap();
    if !opcode::has_reply(h.opcode) {
        prop_assert_eq!(served, Served::NoReply);
        prop_assert!(
            replies.is_empty(),
            "opcode {} answered: {:?}",
            h.opcode,
            replies
        );
        return Ok(());
    }
    prop_assert!(
        matches!(served, Served::Replied | Served::Destroyed),
        "{:?}",
        served
    );
    prop_assert_eq!(replies.len(), 1, "opcode {}: {:?}", h.opcode, replies);
    let r = &replies[0];
    prop_assert_eq!(r.unique, h.unique);
    prop_assert!(
        r.error == 0 || (-4095..=-1).contains(&r.error),
        "error {}",
        r.error
    );
    if r.error != 0 {
        prop_assert!(r.payload.is_empty(), "an error reply with a payload");
        return Ok(());
    }
    // A success: the request was valid, and the payload is the size the kernel expects.
    let req = decode(buf, setxattr_ext);
    prop_assert!(req.is_ok(), "a malformed request succeeded: {:?}", req);
    if let Some(n) = fixed_payload(h.opcode) {
        prop_assert_eq!(r.payload.len(), n, "opcode {}", h.opcode);
    }
    match req.unwrap().op {
        Operation::Read(a) | Operation::Readdir(a) | Operation::Readdirplus(a) => {
            prop_assert!(r.payload.len() <= a.size as usize)
        }
        Operation::Getxattr { size, .. } | Operation::Listxattr { size } => {
            if size == 0 {
                prop_assert_eq!(r.payload.len(), 8);
            } else {
                prop_assert!(r.payload.len() <= size as usize);
            }
        }
        _ => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Arbitrary bytes: decoding never panics; without a header it fails as such; with
    /// one, a failure names the header's unique and opcode, and a success has a header
    /// whose length is the buffer's.
    #[test]
    fn decode_takes_any_bytes(buf in prop::collection::vec(any::<u8>(), 0..400), ext in any::<bool>()) {
        match decode(&buf, ext) {
            Err(DecodeError::NoHeader(n)) => {
                prop_assert!(buf.len() < HEADER);
                prop_assert_eq!(n, buf.len());
            }
            Err(DecodeError::Malformed { unique, opcode, errno, .. }) => {
                let (h, _) = InHeader::read_from_prefix(&buf[..]).unwrap();
                prop_assert_eq!((unique, opcode), (h.unique, h.opcode));
                prop_assert!(errno == libc::EIO || errno == libc::EINVAL);
            }
            Ok(req) => {
                prop_assert_eq!(req.header.len as usize, buf.len());
                prop_assert_eq!(req.header.as_bytes(), &buf[..HEADER]);
            }
        }
    }

    /// Arbitrary bytes behind a header that is right about the length: decode and
    /// handle both cope, and the session answers exactly once (or not at all).
    #[test]
    fn handle_takes_any_body(
        state in state(),
        op in prop_oneof![prop::sample::select(opcode::ALL), any::<u32>()],
        unique in any::<u64>(),
        extlen in prop_oneof![Just(0u16), any::<u16>()],
        body in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut h = harness(state);
        let ext = h.session.negotiated().is_some_and(|n| n.has(init::SETXATTR_EXT));
        let buf = build(InHeader { total_extlen: extlen, ..header(op, unique, FILE) }, &[&body]);
        let (served, replies) = h.send(&buf);
        check_served(&buf, ext, served, &replies)?;
    }

    /// Valid requests with one thing wrong, before and after INIT, with and without
    /// SETXATTR_EXT: exactly one reply to the header's unique for the requests that
    /// take one, none for the others, and a success only with the kernel's sizes.
    #[test]
    fn handle_takes_mutated_requests(state in state(), case in case()) {
        let mut h = harness(state);
        let ext = h.session.negotiated().is_some_and(|n| n.has(init::SETXATTR_EXT));
        let buf = case.bytes();
        let (served, replies) = h.send(&buf);
        check_served(&buf, ext, served, &replies)?;
        // The session is still usable afterwards.
        let (served, replies) = h.send(&build(header(opcode::GETATTR, 77, FILE), &[abi::GetattrIn::default().as_bytes()]));
        prop_assert_eq!(served.unwrap(), Served::Replied);
        prop_assert_eq!(replies.len(), 1);
        prop_assert_eq!(replies[0].unique, 77);
    }

    /// Shorter than a header: an error for the transport, and nothing sent.
    #[test]
    fn a_request_without_a_header_is_an_error(state in state(), buf in prop::collection::vec(any::<u8>(), 0..HEADER)) {
        let mut h = harness(state);
        let (served, replies) = h.send(&buf);
        prop_assert!(served.is_err());
        prop_assert!(replies.is_empty());
    }
}

#[test]
fn every_prefix_of_a_header_is_an_error_with_nothing_sent() {
    let mut h = Harness::initialized();
    let full = build(header(opcode::LOOKUP, 9, ROOT), &[&cname("file")]);
    for n in 0..HEADER {
        let (served, replies) = h.send(&full[..n]);
        let e = served.expect_err("served without a header");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(replies.is_empty(), "{n} bytes: {replies:?}");
        assert_eq!(
            decode(&full[..n], true).unwrap_err(),
            DecodeError::NoHeader(n)
        );
    }
    let fs = h.fs();
    // Only INIT reached the filesystem.
    assert_eq!(fs.begins.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Sends `buf` and checks it is answered with `errno` and no payload, to `unique`.
fn expect_errno_raw(h: &mut Harness, buf: &[u8], errno: i32) {
    let (h_, _) = InHeader::read_from_prefix(buf).unwrap();
    let (served, replies) = h.send(buf);
    assert_eq!(served.unwrap(), Served::Replied, "opcode {}", h_.opcode);
    assert_eq!(replies.len(), 1, "opcode {}: {replies:?}", h_.opcode);
    assert_eq!(
        (
            replies[0].unique,
            replies[0].error,
            replies[0].payload.len()
        ),
        (h_.unique, -errno, 0),
        "opcode {}",
        h_.opcode
    );
}

/// Sends `buf` and checks nothing is sent.
fn expect_silence(h: &mut Harness, buf: &[u8]) {
    let (served, replies) = h.send(buf);
    assert_eq!(served.unwrap(), Served::NoReply);
    assert!(replies.is_empty(), "{replies:?}");
}

#[test]
fn a_header_length_that_is_not_the_buffers_gets_eio() {
    for &op in opcode::ALL {
        let mut h = Harness::initialized();
        let (node, body, _) = well_formed(op);
        let exact = (HEADER + body.len()) as u32;
        let mut lens = vec![0, 1, HEADER as u32, exact + 1, exact + 4096, u32::MAX];
        if exact > 0 {
            lens.push(exact - 1);
        }
        for len in lens {
            if len == exact {
                continue;
            }
            let buf = raw(
                InHeader {
                    len,
                    ..header(op, 31, node)
                },
                &body,
            );
            if opcode::has_reply(op) {
                expect_errno_raw(&mut h, &buf, libc::EIO);
            } else {
                expect_silence(&mut h, &buf);
            }
            match decode(&buf, true) {
                Err(DecodeError::Malformed {
                    unique: 31,
                    opcode,
                    errno,
                    ..
                }) => {
                    assert_eq!((opcode, errno), (op, libc::EIO))
                }
                other => panic!("opcode {op}, len {len}: {other:?}"),
            }
        }
        // Trailing bytes after a request the header describes are as wrong.
        let mut buf = build(header(op, 33, node), &[&body]);
        buf.extend_from_slice(&[0; 8]);
        if opcode::has_reply(op) {
            expect_errno_raw(&mut h, &buf, libc::EIO);
        } else {
            expect_silence(&mut h, &buf);
        }
        assert_eq!(h.fs().forgets.lock().unwrap().len(), 0);
        assert_eq!(h.fs().writes.lock().unwrap().len(), 0);
    }
}

/// The size of the argument structure `op` starts with, where Molt decodes one.
fn argument_size(op: u32, setxattr_ext: bool) -> Option<usize> {
    use core::mem::size_of;
    use opcode::*;
    Some(match op {
        INIT => abi::COMPAT_INIT_IN_SIZE,
        FORGET => size_of::<abi::ForgetIn>(),
        BATCH_FORGET => size_of::<abi::BatchForgetIn>(),
        GETATTR => size_of::<abi::GetattrIn>(),
        STATX => size_of::<abi::StatxIn>(),
        SETATTR => size_of::<abi::SetattrIn>(),
        MKNOD => size_of::<abi::MknodIn>(),
        MKDIR => size_of::<abi::MkdirIn>(),
        RENAME => size_of::<abi::RenameIn>(),
        RENAME2 => size_of::<abi::Rename2In>(),
        LINK => size_of::<abi::LinkIn>(),
        OPEN | OPENDIR => size_of::<abi::OpenIn>(),
        CREATE => size_of::<abi::CreateIn>(),
        READ | READDIR | READDIRPLUS => size_of::<abi::ReadIn>(),
        WRITE => size_of::<abi::WriteIn>(),
        FLUSH => size_of::<abi::FlushIn>(),
        RELEASE | RELEASEDIR => size_of::<abi::ReleaseIn>(),
        FSYNC | FSYNCDIR => size_of::<abi::FsyncIn>(),
        SETXATTR if setxattr_ext => size_of::<abi::SetxattrIn>(),
        SETXATTR => abi::COMPAT_SETXATTR_IN_SIZE,
        GETXATTR | LISTXATTR => size_of::<abi::GetxattrIn>(),
        ACCESS => size_of::<abi::AccessIn>(),
        FALLOCATE => size_of::<abi::FallocateIn>(),
        LSEEK => size_of::<abi::LseekIn>(),
        INTERRUPT => size_of::<abi::InterruptIn>(),
        _ => return None,
    })
}

#[test]
fn truncated_argument_structures_get_einval() {
    let mut decoded = 0;
    for state in [State::Fresh, State::Extended, State::Compat] {
        for &op in opcode::ALL {
            let mut h = harness(state);
            let ext = h
                .session
                .negotiated()
                .is_some_and(|n| n.has(init::SETXATTR_EXT));
            let Some(size) = argument_size(op, ext) else {
                continue;
            };
            decoded += 1;
            let (node, body, _) = if op == opcode::SETXATTR && !ext {
                let s = abi::SetxattrIn {
                    size: 1,
                    ..Default::default()
                };
                (
                    FILE,
                    [&s.as_bytes()[..8], &cname("user.a"), b"v"].concat(),
                    ENOSYS,
                )
            } else {
                well_formed(op)
            };
            assert!(body.len() >= size, "opcode {op}");
            for k in 0..size {
                let buf = build(header(op, 40 + k as u64, node), &[&body[..k]]);
                if opcode::has_reply(op) {
                    expect_errno_raw(&mut h, &buf, libc::EINVAL);
                } else {
                    expect_silence(&mut h, &buf);
                }
                match decode(&buf, ext) {
                    Err(DecodeError::Malformed { errno, .. }) => assert_eq!(errno, libc::EINVAL),
                    other => panic!("opcode {op}, {k} bytes: {other:?}"),
                }
            }
            assert!(h.fs().forgets.lock().unwrap().is_empty());
        }
    }
    assert_eq!(decoded, 3 * 30);
}

#[test]
fn undecoded_opcodes_get_enosys_whatever_their_body() {
    let mut h = Harness::initialized();
    let undecoded = [
        opcode::GETLK,
        opcode::SETLK,
        opcode::SETLKW,
        opcode::BMAP,
        opcode::IOCTL,
        opcode::POLL,
        opcode::COPY_FILE_RANGE,
        opcode::SETUPMAPPING,
        opcode::REMOVEMAPPING,
        opcode::TMPFILE,
        opcode::CUSE_INIT,
        0,
        53,
        1000,
        u32::MAX,
    ];
    for op in undecoded {
        for body in [&b""[..], b"\x01", &[0xff; 300]] {
            expect_errno_raw(&mut h, &build(header(op, 5, FILE), &[body]), libc::ENOSYS);
        }
    }
}

#[test]
fn names_without_a_nul_get_einval() {
    let mut h = Harness::initialized();
    let mknod = abi::MknodIn::default();
    let mkdir = abi::MkdirIn::default();
    let rename = abi::RenameIn { newdir: DIR };
    let rename2 = abi::Rename2In::default();
    let link = abi::LinkIn { oldnodeid: FILE };
    let create = abi::CreateIn::default();
    let getx = abi::GetxattrIn {
        size: 0,
        padding: 0,
    };
    let setx = abi::SetxattrIn {
        size: 3,
        ..Default::default()
    };
    use opcode::*;
    let cases: Vec<(u32, Vec<u8>)> = vec![
        (LOOKUP, b"".to_vec()),
        (LOOKUP, b"file".to_vec()),
        (UNLINK, b"file".to_vec()),
        (RMDIR, b"dir".to_vec()),
        (REMOVEXATTR, b"user.test".to_vec()),
        (SYMLINK, b"link".to_vec()),
        (SYMLINK, [&cname("link")[..], b"target"].concat()),
        (MKNOD, [mknod.as_bytes(), b"fifo"].concat()),
        (MKDIR, [mkdir.as_bytes(), b"newdir"].concat()),
        (RENAME, [rename.as_bytes(), b"file"].concat()),
        (
            RENAME,
            [rename.as_bytes(), &cname("file"), b"moved"].concat(),
        ),
        (
            RENAME2,
            [rename2.as_bytes(), &cname("file"), b"moved"].concat(),
        ),
        (LINK, [link.as_bytes(), b"hardlink"].concat()),
        (CREATE, [create.as_bytes(), b"new"].concat()),
        (GETXATTR, [getx.as_bytes(), b"user.test"].concat()),
        (SETXATTR, [setx.as_bytes(), b"user.new", b"abc"].concat()),
    ];
    for (op, body) in cases {
        let buf = build(header(op, 11, ROOT), &[&body]);
        expect_errno_raw(&mut h, &buf, libc::EINVAL);
        // A NUL that lies only in the extensions does not end the name.
        let mut with_ext = body.clone();
        with_ext.extend_from_slice(&[0; 8]);
        let buf = build(
            InHeader {
                total_extlen: 1,
                ..header(op, 12, ROOT)
            },
            &[&with_ext],
        );
        expect_errno_raw(&mut h, &buf, libc::EINVAL);
    }
    assert!(h.fs().setxattrs.lock().unwrap().is_empty());
}

#[test]
fn write_data_beyond_the_body_gets_einval() {
    let mut h = Harness::initialized();
    for (size, data) in [
        (6, &b"hello"[..]),
        (1, b""),
        (4096, b"hello"),
        (u32::MAX, b"hello"),
    ] {
        let w = abi::WriteIn {
            size,
            ..Default::default()
        };
        let buf = build(header(opcode::WRITE, 13, FILE), &[w.as_bytes(), data]);
        expect_errno_raw(&mut h, &buf, libc::EINVAL);
    }
    // The data is there, but inside the extensions.
    let w = abi::WriteIn {
        size: 8,
        ..Default::default()
    };
    let buf = build(
        InHeader {
            total_extlen: 1,
            ..header(opcode::WRITE, 14, FILE)
        },
        &[w.as_bytes(), b"8 bytes!"],
    );
    expect_errno_raw(&mut h, &buf, libc::EINVAL);
    assert!(h.fs().writes.lock().unwrap().is_empty());
    // The same with the extension after the data is fine.
    let buf = build(
        InHeader {
            total_extlen: 1,
            ..header(opcode::WRITE, 15, FILE)
        },
        &[w.as_bytes(), b"8 bytes!", &[0; 8]],
    );
    let (_, replies) = h.send(&buf);
    assert_eq!((replies[0].error, replies[0].payload.len()), (0, 8));
    assert_eq!(*h.fs().writes.lock().unwrap(), [b"8 bytes!".to_vec()]);
}

#[test]
fn setxattr_values_beyond_the_body_get_einval() {
    for state in [State::Extended, State::Compat] {
        let mut h = harness(state);
        let ext = matches!(state, State::Extended);
        let arg_len = if ext { 16 } else { 8 };
        for size in [4, 100, u32::MAX] {
            let s = abi::SetxattrIn {
                size,
                ..Default::default()
            };
            let buf = build(
                header(opcode::SETXATTR, 16, FILE),
                &[&s.as_bytes()[..arg_len], &cname("user.new"), b"abc"],
            );
            expect_errno_raw(&mut h, &buf, libc::EINVAL);
        }
        // The right size works in this layout.
        let s = abi::SetxattrIn {
            size: 3,
            ..Default::default()
        };
        let buf = build(
            header(opcode::SETXATTR, 17, FILE),
            &[&s.as_bytes()[..arg_len], &cname("user.new"), b"abc"],
        );
        let (_, replies) = h.send(&buf);
        assert_eq!(replies[0].error, 0, "{state:?}");
        let calls = h.fs().setxattrs.lock().unwrap().clone();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].0.as_slice(), calls[0].1.as_slice()),
            (&b"user.new"[..], &b"abc"[..])
        );
    }
}

#[test]
fn batch_forget_counts_beyond_the_body_are_dropped() {
    for state in [State::Fresh, State::Extended] {
        let mut h = harness(state);
        let one = abi::ForgetOne {
            nodeid: FILE,
            nlookup: 1,
        };
        let two = [one, one];
        for (count, entries) in [
            (1, &[][..]),
            (3, &two[..]),
            (u32::MAX, &two[..]),
            (u32::MAX / 16 + 1, &two[..]),
        ] {
            let head = abi::BatchForgetIn { count, dummy: 0 };
            let buf = build(
                header(opcode::BATCH_FORGET, 18, 0),
                &[head.as_bytes(), entries.as_bytes()],
            );
            expect_silence(&mut h, &buf);
        }
        // An entry cut short.
        let head = abi::BatchForgetIn { count: 1, dummy: 0 };
        let buf = build(
            header(opcode::BATCH_FORGET, 19, 0),
            &[head.as_bytes(), &one.as_bytes()[..15]],
        );
        expect_silence(&mut h, &buf);
        assert!(h.fs().forgets.lock().unwrap().is_empty(), "{state:?}");
    }
}

#[test]
fn extensions_beyond_the_body_get_einval() {
    let mut h = Harness::initialized();
    // LOOKUP's 5 bytes cannot hold 8 bytes of extensions.
    for extlen in [1, 2, u16::MAX] {
        let buf = build(
            InHeader {
                total_extlen: extlen,
                ..header(opcode::LOOKUP, 20, ROOT)
            },
            &[&cname("file")],
        );
        expect_errno_raw(&mut h, &buf, libc::EINVAL);
        assert!(matches!(
            decode(&buf, true),
            Err(DecodeError::Malformed {
                errno: libc::EINVAL,
                unique: 20,
                ..
            })
        ));
    }
    // Extensions that take all of GETATTR's body leave its argument short.
    let g = abi::GetattrIn::default();
    for extlen in [2, 3] {
        let buf = build(
            InHeader {
                total_extlen: extlen,
                ..header(opcode::GETATTR, 21, FILE)
            },
            &[g.as_bytes()],
        );
        expect_errno_raw(&mut h, &buf, libc::EINVAL);
    }
    // A bodiless request cannot carry any.
    let buf = build(
        InHeader {
            total_extlen: 1,
            ..header(opcode::STATFS, 22, ROOT)
        },
        &[],
    );
    expect_errno_raw(&mut h, &buf, libc::EINVAL);
    // A request that takes no reply gets none, however wrong.
    let f = abi::ForgetIn { nlookup: 1 };
    let buf = build(
        InHeader {
            total_extlen: 9,
            ..header(opcode::FORGET, 23, FILE)
        },
        &[f.as_bytes()],
    );
    expect_silence(&mut h, &buf);
    assert!(h.fs().forgets.lock().unwrap().is_empty());
    // Extensions that fit are accepted and ignored.
    let buf = build(
        InHeader {
            total_extlen: 2,
            ..header(opcode::LOOKUP, 24, ROOT)
        },
        &[&cname("file"), &[0xee; 16]],
    );
    let (_, replies) = h.send(&buf);
    assert_eq!(
        (
            replies[0].unique,
            replies[0].error,
            replies[0].payload.len()
        ),
        (24, 0, 128)
    );
}

#[test]
fn malformed_requests_before_init_leave_it_to_come() {
    let mut h = Harness::new(InitPolicy::new(InitPolicy::LOCAL_FILESYSTEM));
    let k = kernel_init_in();
    // Too short, a wrong length, extensions beyond it: refused, and not negotiated.
    expect_errno_raw(
        &mut h,
        &build(header(opcode::INIT, 2, 0), &[&k.as_bytes()[..15]]),
        libc::EINVAL,
    );
    expect_errno_raw(
        &mut h,
        &raw(
            InHeader {
                len: 41,
                ..header(opcode::INIT, 3, 0)
            },
            k.as_bytes(),
        ),
        libc::EIO,
    );
    expect_errno_raw(
        &mut h,
        &build(
            InHeader {
                total_extlen: 9,
                ..header(opcode::INIT, 4, 0)
            },
            &[k.as_bytes()],
        ),
        libc::EINVAL,
    );
    assert!(h.session.negotiated().is_none());
    assert!(h.fs().inits.lock().unwrap().is_empty());
    let r = h.one(opcode::INIT, 0, &[k.as_bytes()]);
    assert_eq!(r.error, 0);
}

/// A sink whose connection is gone.
struct Gone;

impl ReplySink for Gone {
    fn send(&mut self, _unique: u64, _error: i32, _payload: &[&[u8]]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENODEV))
    }
}

#[test]
fn a_sink_error_is_returned_not_swallowed() {
    let h = Harness::initialized();
    let mut scratch = Vec::new();
    let good = build(header(opcode::LOOKUP, 25, ROOT), &[&cname("file")]);
    let bad = raw(
        InHeader {
            len: 0,
            ..header(opcode::LOOKUP, 26, ROOT)
        },
        &cname("file"),
    );
    for buf in [good, bad] {
        let e = h.session.handle(&buf, &mut Gone, &mut scratch).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
    }
    // A request that takes no reply never touches the sink.
    let forget = build(
        header(opcode::FORGET, 27, FILE),
        &[abi::ForgetIn { nlookup: 1 }.as_bytes()],
    );
    assert_eq!(
        h.session.handle(&forget, &mut Gone, &mut scratch).unwrap(),
        Served::NoReply
    );
}
