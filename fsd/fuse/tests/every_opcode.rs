//! Every opcode the kernel can send, each with a well-formed body, answered as the
//! kernel expects: one reply to the request's `unique` (none for FORGET, BATCH_FORGET
//! and NOTIFY_REPLY), a valid errno, and a payload of the size the kernel reads. Then
//! the protocol's own bookkeeping: INIT negotiation, xattr size probes, directory entry
//! packing, panics, INTERRUPT and the two SETXATTR layouts.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use molt_fuse::abi::{self, init, opcode};
use molt_fuse::{DirBuf, InitPolicy, Negotiated, Served};
use proptest::prelude::*;
use zerocopy::{FromBytes, IntoBytes};

/// Checks a READDIR (or READDIRPLUS) reply's layout and returns its entries: each starts
/// 8-aligned, its padding is zero, and it lies wholly inside the reply.
fn dirents(buf: &[u8], plus: bool) -> Vec<(Option<abi::EntryOut>, abi::Dirent, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        assert_eq!(off % 8, 0, "entry at {off} is not 8-aligned");
        let start = off;
        let e = plus.then(|| {
            let (e, _) = abi::EntryOut::read_from_prefix(&buf[off..]).expect("entry_out");
            off += core::mem::size_of::<abi::EntryOut>();
            e
        });
        let (d, _) = abi::Dirent::read_from_prefix(&buf[off..]).expect("dirent");
        off += core::mem::size_of::<abi::Dirent>();
        let name = buf[off..off + d.namelen as usize].to_vec();
        off += name.len();
        let end = start + abi::dirent_align(off - start);
        assert!(end <= buf.len(), "entry at {start} runs past the reply");
        assert!(buf[off..end].iter().all(|&b| b == 0), "padding is not zero");
        off = end;
        out.push((e, d, name));
    }
    out
}

/// The bytes entry `name` takes in a listing.
fn dirent_len(name: &[u8], plus: bool) -> usize {
    let head = core::mem::size_of::<abi::Dirent>()
        + if plus {
            core::mem::size_of::<abi::EntryOut>()
        } else {
            0
        };
    abi::dirent_align(head + name.len())
}

fn assert_valid_error(op: u32, error: i32) {
    assert!(
        error == 0 || (-4095..=-1).contains(&error),
        "opcode {op}: error {error} is neither 0 nor a negated errno"
    );
}

fn readdir_in(offset: u64, size: u32) -> abi::ReadIn {
    abi::ReadIn {
        fh: 200 + DIR,
        offset,
        size,
        ..Default::default()
    }
}

#[test]
fn every_opcode_gets_the_answer_the_kernel_expects() {
    let mut h = Harness::initialized();
    assert!(
        h.session.negotiated().unwrap().has(init::SETXATTR_EXT),
        "the bodies here use the extended SETXATTR"
    );
    // DESTROY goes last, as the kernel sends it.
    let order = opcode::ALL
        .iter()
        .copied()
        .filter(|&op| op != opcode::DESTROY)
        .chain([opcode::DESTROY]);
    let mut seen = 0;
    for op in order {
        seen += 1;
        let (node, body, expect) = well_formed(op);
        assert_eq!(
            expect == Expect::None,
            !opcode::has_reply(op),
            "opcode {op}: the table and has_reply disagree"
        );
        let (unique, served, replies) = h.call(op, node, &[&body]);
        if !opcode::has_reply(op) {
            assert_eq!(served, Served::NoReply, "opcode {op}");
            assert!(
                replies.is_empty(),
                "opcode {op} takes no reply: {replies:?}"
            );
            continue;
        }
        let expected_served = if op == opcode::DESTROY {
            Served::Destroyed
        } else {
            Served::Replied
        };
        assert_eq!(served, expected_served, "opcode {op}");
        assert_eq!(replies.len(), 1, "opcode {op}: {replies:?}");
        let r = &replies[0];
        assert_eq!(r.unique, unique, "opcode {op}: the reply's unique");
        assert_valid_error(op, r.error);
        match expect {
            Expect::Ok(size) => {
                assert_eq!(r.error, 0, "opcode {op}");
                assert_eq!(r.payload.len(), size, "opcode {op}: payload size");
            }
            Expect::Listing => {
                assert_eq!(r.error, 0, "opcode {op}");
                let plus = op == opcode::READDIRPLUS;
                let all = listing();
                let got = dirents(&r.payload, plus);
                assert_eq!(got.len(), all.len(), "opcode {op}: the whole listing fits");
                let want: usize = all.iter().map(|(n, _, _)| dirent_len(n, plus)).sum();
                assert_eq!(r.payload.len(), want, "opcode {op}");
            }
            Expect::Errno(e) => {
                assert_eq!(r.error, -e, "opcode {op}");
                assert!(r.payload.is_empty(), "opcode {op}: an error has no payload");
            }
            Expect::None => unreachable!(),
        }
    }
    assert_eq!(seen, opcode::ALL.len());
    let fs = h.fs();
    assert_eq!(fs.destroyed.load(Ordering::SeqCst), 1);
    assert_eq!(
        *fs.forgets.lock().unwrap(),
        [(FILE, 3), (FILE, 1), (DIR, 2)],
        "FORGET and BATCH_FORGET reach the filesystem"
    );
    assert_eq!(*fs.writes.lock().unwrap(), [b"hello".to_vec()]);
    // Every request served (INIT and the opcodes, less the second INIT, which is refused
    // before the filesystem sees it) was bracketed by begin and end.
    assert_eq!(fs.begins.load(Ordering::SeqCst), opcode::ALL.len());
    assert_eq!(fs.ends.load(Ordering::SeqCst), opcode::ALL.len());
}

#[test]
fn replies_carry_what_the_filesystem_returned() {
    let mut h = Harness::initialized();

    let r = h.one(opcode::LOOKUP, ROOT, &[&cname("file")]);
    let e: abi::EntryOut = parse(&r.payload);
    assert_eq!((e.nodeid, e.generation), (FILE, 7));
    assert_eq!((e.entry_valid, e.entry_valid_nsec), (1, 500_000_000));
    assert_eq!((e.attr_valid, e.attr_valid_nsec), (3, 0));
    assert_eq!(e.attr, attr(FILE));
    h.expect_errno(opcode::LOOKUP, ROOT, &[&cname("missing")], libc::ENOENT);

    let g = abi::GetattrIn::default();
    let r = h.one(opcode::GETATTR, DIR, &[g.as_bytes()]);
    let a: abi::AttrOut = parse(&r.payload);
    assert_eq!((a.attr_valid, a.attr_valid_nsec), (1, 500_000_000));
    assert_eq!(a.attr, attr(DIR));

    let s = abi::StatxIn {
        sx_mask: libc::STATX_BTIME,
        ..Default::default()
    };
    let r = h.one(opcode::STATX, FILE, &[s.as_bytes()]);
    let sx: abi::StatxOut = parse(&r.payload);
    assert_eq!(sx.stat.mask, libc::STATX_BTIME);
    assert_eq!(sx.stat.btime.tv_sec, 1_600_000_000);
    assert_eq!(sx.stat.ino, FILE);

    let r = h.one(opcode::STATFS, ROOT, &[]);
    let st: abi::StatfsOut = parse(&r.payload);
    assert_eq!((st.st.bsize, st.st.namelen), (4096, 255));

    let o = abi::OpenIn::default();
    let r = h.one(opcode::OPEN, FILE, &[o.as_bytes()]);
    let out: abi::OpenOut = parse(&r.payload);
    assert_eq!(
        (out.fh, out.open_flags, out.backing_id),
        (100 + FILE, abi::fopen::KEEP_CACHE, 0)
    );

    let c = abi::CreateIn::default();
    let r = h.one(opcode::CREATE, ROOT, &[c.as_bytes(), &cname("new")]);
    assert_eq!(r.payload.len(), 144);
    let e: abi::EntryOut = parse(&r.payload[..128]);
    let o: abi::OpenOut = parse(&r.payload[128..]);
    assert_eq!((e.nodeid, o.fh), (CREATED, 100 + CREATED));

    let l = abi::LseekIn {
        offset: 12345,
        ..Default::default()
    };
    let r = h.one(opcode::LSEEK, FILE, &[l.as_bytes()]);
    assert_eq!(parse::<abi::LseekOut>(&r.payload).offset, 12345);
}

#[test]
fn read_and_write_replies_never_exceed_the_request() {
    let mut h = Harness::initialized();
    let read = |offset, size| abi::ReadIn {
        fh: 100 + FILE,
        offset,
        size,
        ..Default::default()
    };
    let r = h.one(opcode::READ, FILE, &[read(4, 5).as_bytes()]);
    assert_eq!(r.payload, &FILE_DATA[4..9]);
    let r = h.one(opcode::READ, FILE, &[read(40, 100).as_bytes()]);
    assert_eq!(
        r.payload,
        &FILE_DATA[40..],
        "a short read at the end of the file"
    );
    let r = h.one(opcode::READ, FILE, &[read(1 << 40, 100).as_bytes()]);
    assert_eq!(
        (r.error, r.payload.len()),
        (0, 0),
        "a read past the end is empty"
    );
    // A filesystem that returns more than was asked for is cut to the size asked.
    let r = h.one(opcode::READ, GREEDY, &[read(0, 10).as_bytes()]);
    assert_eq!(r.payload, &FILE_DATA[..10]);

    let w = abi::WriteIn {
        size: 4,
        ..Default::default()
    };
    let r = h.one(opcode::WRITE, BOASTFUL, &[w.as_bytes(), b"data"]);
    assert_eq!(
        parse::<abi::WriteOut>(&r.payload).size,
        4,
        "a write never claims more than it was given"
    );
    // WRITE's data is exactly `size` bytes, even with more after it.
    let r = h.one(opcode::WRITE, FILE, &[w.as_bytes(), b"datamore"]);
    assert_eq!(parse::<abi::WriteOut>(&r.payload).size, 4);
    assert_eq!(h.fs().writes.lock().unwrap().last().unwrap(), b"data");
}

#[test]
fn a_request_before_init_gets_eio() {
    for &op in opcode::ALL {
        if op == opcode::INIT {
            continue;
        }
        let mut h = Harness::new(InitPolicy::new(InitPolicy::LOCAL_FILESYSTEM));
        // Before INIT nothing is negotiated: SETXATTR has its compatible layout.
        let (node, body, _) = if op == opcode::SETXATTR {
            let s = abi::SetxattrIn {
                size: 1,
                ..Default::default()
            };
            let body = [&s.as_bytes()[..8], &cname("user.a"), b"v"].concat();
            (FILE, body, Expect::Ok(0))
        } else {
            well_formed(op)
        };
        let (unique, served, replies) = h.call(op, node, &[&body]);
        if opcode::has_reply(op) {
            assert_eq!(served, Served::Replied, "opcode {op}");
            assert_eq!(replies.len(), 1, "opcode {op}");
            assert_eq!(
                (replies[0].unique, replies[0].error),
                (unique, -libc::EIO),
                "opcode {op}"
            );
            assert!(replies[0].payload.is_empty());
        } else {
            assert_eq!(served, Served::NoReply, "opcode {op}");
            assert!(replies.is_empty(), "opcode {op}: {replies:?}");
        }
        assert_eq!(
            h.fs().begins.load(Ordering::SeqCst),
            0,
            "opcode {op} reached the filesystem"
        );
        assert!(h.session.negotiated().is_none());
        // INIT still works afterwards.
        let r = h.one(opcode::INIT, 0, &[kernel_init_in().as_bytes()]);
        assert_eq!(r.error, 0, "opcode {op}");
    }
}

#[test]
fn a_second_init_gets_eio_and_changes_nothing() {
    let mut h = Harness::initialized();
    let before = h.session.negotiated().unwrap();
    let other = init_in(40, init::ASYNC_READ);
    h.expect_errno(opcode::INIT, 0, &[other.as_bytes()], libc::EIO);
    h.expect_errno(opcode::INIT, 0, &[kernel_init_in().as_bytes()], libc::EIO);
    assert_eq!(h.session.negotiated(), Some(before));
    assert_eq!(
        h.fs().inits.lock().unwrap().len(),
        1,
        "the filesystem is told once"
    );
}

/// Sends INIT `k` to a fresh session with `wanted`; returns the reply and the session.
fn negotiate(k: &abi::InitIn, wanted: u64) -> (Reply, Harness) {
    let mut h = Harness::new(InitPolicy::new(wanted));
    let r = h.one(opcode::INIT, 0, &[k.as_bytes()]);
    (r, h)
}

#[test]
fn init_reply_is_the_kernels_offer_and_the_policys_wants() {
    let (r, h) = negotiate(&kernel_init_in(), InitPolicy::LOCAL_FILESYSTEM);
    assert_eq!(r.error, 0);
    let out: abi::InitOut = parse(&r.payload);
    let n = h.session.negotiated().unwrap();
    let want = KERNEL_OFFER & InitPolicy::LOCAL_FILESYSTEM;
    assert_eq!(n.flags, want);
    assert_eq!(kernel_view(&out), want);
    assert_eq!(out.flags as u64, want & 0xffff_ffff);
    assert_eq!(out.flags2 as u64, want >> 32);
    assert!(n.has(init::HAS_RESEND | init::HAS_EXPIRE_ONLY | init::INIT_EXT));
    let p = InitPolicy::new(InitPolicy::LOCAL_FILESYSTEM);
    assert_eq!((out.major, out.minor), (7, 44));
    assert_eq!(
        out.max_readahead,
        128 << 10,
        "the kernel's readahead is kept"
    );
    assert_eq!((out.max_write, out.max_pages), (p.max_write, p.max_pages));
    assert_eq!(
        (out.max_background, out.congestion_threshold),
        (p.max_background, p.congestion_threshold)
    );
    assert_eq!(out.time_gran, 1);
    assert_eq!(*h.fs().inits.lock().unwrap(), [n]);

    // A policy that wants what the kernel does not offer gets only what it does.
    let wanted = init::ASYNC_READ | init::PASSTHROUGH | init::OVER_IO_URING | init::INIT_EXT;
    let (r, h) = negotiate(&kernel_init_in(), wanted);
    let out: abi::InitOut = parse(&r.payload);
    assert_eq!(
        h.session.negotiated().unwrap().flags,
        init::ASYNC_READ | init::INIT_EXT
    );
    assert_eq!(kernel_view(&out), init::ASYNC_READ | init::INIT_EXT);
}

#[test]
fn init_flags2_counts_only_with_init_ext() {
    // A kernel that fills flags2 but does not set INIT_EXT: flags2 means nothing.
    let k = init_in(44, KERNEL_OFFER & !init::INIT_EXT);
    assert_ne!(k.flags2, 0);
    let (r, h) = negotiate(&k, InitPolicy::LOCAL_FILESYSTEM);
    let out: abi::InitOut = parse(&r.payload);
    let n = h.session.negotiated().unwrap();
    assert_eq!(n.flags >> 32, 0);
    assert_eq!(out.flags2, 0);
    assert_eq!(
        n.flags,
        KERNEL_OFFER & InitPolicy::LOCAL_FILESYSTEM & 0xffff_ffff & !init::INIT_EXT
    );
    assert!(!n.has(init::HAS_RESEND));
    assert!(n.has(init::SETXATTR_EXT), "a low flag is unaffected");

    // A policy that does not want INIT_EXT cannot have the flags that need it: the
    // kernel would not read flags2 from a reply without INIT_EXT.
    let wanted = init::ASYNC_READ | init::HAS_RESEND;
    let (r, h) = negotiate(&kernel_init_in(), wanted);
    let out: abi::InitOut = parse(&r.payload);
    let n = h.session.negotiated().unwrap();
    assert_eq!(
        kernel_view(&out),
        n.flags,
        "the session and the kernel agree"
    );
    assert_eq!(n.flags, init::ASYNC_READ);
}

#[test]
fn init_minor_is_the_smaller_of_the_two() {
    for (kernel, expect) in [(31, 31), (36, 36), (40, 40), (44, 44), (45, 44), (1000, 44)] {
        let (r, h) = negotiate(&init_in(kernel, KERNEL_OFFER), InitPolicy::LOCAL_FILESYSTEM);
        assert_eq!(r.error, 0, "kernel 7.{kernel}");
        let out: abi::InitOut = parse(&r.payload);
        assert_eq!((out.major, out.minor), (7, expect), "kernel 7.{kernel}");
        assert_eq!(h.session.negotiated().unwrap().minor, expect);
    }
}

/// A kernel of a newer major version gets this layer's version and nothing else, as the
/// protocol says, and then sends INIT again in version 7.
#[test]
fn init_from_a_newer_major_version_answers_ours() {
    for major in [8, u32::MAX] {
        let k = abi::InitIn {
            major,
            ..kernel_init_in()
        };
        let (r, mut h) = negotiate(&k, InitPolicy::LOCAL_FILESYSTEM);
        assert_eq!(r.error, 0, "{k:?}");
        let out: abi::InitOut = parse(&r.payload);
        assert_eq!((out.major, out.minor), (7, abi::KERNEL_MINOR_VERSION));
        assert_eq!(out.flags, 0);
        assert!(h.session.negotiated().is_none(), "{k:?}");
        let r = h.one(opcode::INIT, 0, &[kernel_init_in().as_bytes()]);
        assert_eq!(r.error, 0);
        assert!(h.session.negotiated().is_some());
    }
}

#[test]
fn init_from_an_incompatible_kernel_is_refused() {
    let mut bad = Vec::new();
    for major in [0, 6] {
        bad.push(abi::InitIn {
            major,
            ..kernel_init_in()
        });
    }
    for minor in [0, 12, abi::OLDEST_MINOR - 1] {
        bad.push(init_in(minor, KERNEL_OFFER));
    }
    for k in bad {
        let (r, mut h) = negotiate(&k, InitPolicy::LOCAL_FILESYSTEM);
        assert_eq!(r.error, -libc::EPROTO, "{k:?}");
        assert!(r.payload.is_empty());
        assert!(h.session.negotiated().is_none(), "{k:?}");
        assert!(h.fs().inits.lock().unwrap().is_empty());
        // Nothing else is served; a compatible INIT still is.
        h.expect_errno(
            opcode::GETATTR,
            FILE,
            &[abi::GetattrIn::default().as_bytes()],
            libc::EIO,
        );
        let r = h.one(opcode::INIT, 0, &[kernel_init_in().as_bytes()]);
        assert_eq!(r.error, 0);
    }
}

#[test]
fn init_from_a_kernel_before_init_ext_is_read_short() {
    // 7.31 to 7.35 send the 16-byte INIT argument.
    let k = init_in(31, KERNEL_OFFER & 0xffff_ffff & !init::INIT_EXT);
    let mut h = Harness::new(InitPolicy::new(InitPolicy::LOCAL_FILESYSTEM));
    let r = h.one(
        opcode::INIT,
        0,
        &[&k.as_bytes()[..abi::COMPAT_INIT_IN_SIZE]],
    );
    assert_eq!(r.error, 0);
    let out: abi::InitOut = parse(&r.payload);
    assert_eq!(out.minor, 31);
    assert_eq!(
        kernel_view(&out),
        k.flags as u64 & InitPolicy::LOCAL_FILESYSTEM
    );
    // Shorter than that is malformed.
    let mut h = Harness::new(InitPolicy::new(InitPolicy::LOCAL_FILESYSTEM));
    h.expect_errno(opcode::INIT, 0, &[&k.as_bytes()[..12]], libc::EINVAL);
    assert!(h.session.negotiated().is_none());
}

proptest! {
    /// Whatever the kernel offers: refused unless it speaks 7.31 or later, else the
    /// reply's flags (as the kernel reads them) are the session's, and within both the
    /// offer (flags2 only with INIT_EXT) and the policy.
    #[test]
    fn init_negotiation(
        major in prop_oneof![Just(7u32), any::<u32>()],
        minor in prop_oneof![25u32..60, any::<u32>()],
        flags in any::<u32>(),
        flags2 in any::<u32>(),
        wanted in prop_oneof![Just(InitPolicy::LOCAL_FILESYSTEM), any::<u64>()],
        short in any::<bool>(),
    ) {
        let k = abi::InitIn {
            major,
            minor,
            max_readahead: 1 << 17,
            flags,
            flags2: if short { 0 } else { flags2 },
            unused: [0; 11],
        };
        let body = if short { &k.as_bytes()[..abi::COMPAT_INIT_IN_SIZE] } else { k.as_bytes() };
        let mut h = Harness::new(InitPolicy::new(wanted));
        let r = h.one(opcode::INIT, 0, &[body]);
        if major > 7 {
            prop_assert_eq!(r.error, 0);
            let out: abi::InitOut = parse(&r.payload);
            prop_assert_eq!((out.major, out.minor), (7, abi::KERNEL_MINOR_VERSION));
            prop_assert!(h.session.negotiated().is_none());
        } else if major != 7 || minor < abi::OLDEST_MINOR {
            prop_assert_eq!(r.error, -libc::EPROTO);
            prop_assert!(h.session.negotiated().is_none());
        } else {
            prop_assert_eq!(r.error, 0);
            let out: abi::InitOut = parse(&r.payload);
            let n = h.session.negotiated().unwrap();
            let mut offered = flags as u64;
            if offered & init::INIT_EXT != 0 {
                offered |= (k.flags2 as u64) << 32;
            }
            prop_assert_eq!(n.flags & !(offered & wanted), 0, "more than offered and wanted");
            prop_assert_eq!(n.flags & 0xffff_ffff, offered & wanted & 0xffff_ffff);
            if n.has(init::INIT_EXT) {
                prop_assert_eq!(n.flags, offered & wanted);
            }
            prop_assert_eq!(kernel_view(&out), n.flags, "the kernel reads other flags");
            prop_assert_eq!(out.major, 7);
            prop_assert_eq!(out.minor, minor.min(abi::KERNEL_MINOR_VERSION));
            prop_assert_eq!(n, Negotiated::from_init(&k, h.session.policy()).unwrap());
        }
    }
}

#[test]
fn getxattr_answers_probes_erange_and_values() {
    let mut h = Harness::initialized();
    let get = |size| abi::GetxattrIn { size, padding: 0 };
    let name = cname("user.test");

    let r = h.one(opcode::GETXATTR, FILE, &[get(0).as_bytes(), &name]);
    assert_eq!(r.error, 0);
    let probe: abi::GetxattrOut = parse(&r.payload);
    assert_eq!(
        probe.size as usize,
        XATTR_VALUE.len(),
        "a size-0 probe gets the length"
    );

    let n = XATTR_VALUE.len() as u32;
    for size in [n, n + 1, 65536] {
        let r = h.one(opcode::GETXATTR, FILE, &[get(size).as_bytes(), &name]);
        assert_eq!(
            (r.error, r.payload.as_slice()),
            (0, XATTR_VALUE),
            "size {size}"
        );
    }
    for size in [1, n - 1] {
        h.expect_errno(
            opcode::GETXATTR,
            FILE,
            &[get(size).as_bytes(), &name],
            libc::ERANGE,
        );
    }

    let empty = cname("user.empty");
    let r = h.one(opcode::GETXATTR, FILE, &[get(0).as_bytes(), &empty]);
    assert_eq!(parse::<abi::GetxattrOut>(&r.payload).size, 0);
    let r = h.one(opcode::GETXATTR, FILE, &[get(10).as_bytes(), &empty]);
    assert_eq!((r.error, r.payload.len()), (0, 0));

    let missing = cname("user.missing");
    h.expect_errno(
        opcode::GETXATTR,
        FILE,
        &[get(0).as_bytes(), &missing],
        libc::ENODATA,
    );
    h.expect_errno(
        opcode::GETXATTR,
        FILE,
        &[get(100).as_bytes(), &missing],
        libc::ENODATA,
    );
}

#[test]
fn listxattr_answers_probes_erange_and_names() {
    let mut h = Harness::initialized();
    let list = |size| abi::GetxattrIn { size, padding: 0 };
    let r = h.one(opcode::LISTXATTR, FILE, &[list(0).as_bytes()]);
    assert_eq!(
        parse::<abi::GetxattrOut>(&r.payload).size as usize,
        XATTR_LIST.len()
    );
    let n = XATTR_LIST.len() as u32;
    let r = h.one(opcode::LISTXATTR, FILE, &[list(n).as_bytes()]);
    assert_eq!((r.error, r.payload.as_slice()), (0, XATTR_LIST));
    h.expect_errno(
        opcode::LISTXATTR,
        FILE,
        &[list(n - 1).as_bytes()],
        libc::ERANGE,
    );
}

#[test]
fn readdir_packs_aligned_entries_while_they_fit() {
    let mut h = Harness::initialized();
    let all = listing();
    let lens: Vec<usize> = all.iter().map(|(n, _, _)| dirent_len(n, false)).collect();
    assert_eq!(lens, [32, 32, 32, 32, 40, 32, 120, 32]);

    // The whole listing.
    let r = h.one(opcode::READDIR, DIR, &[readdir_in(0, 4096).as_bytes()]);
    let got = dirents(&r.payload, false);
    assert_eq!(r.payload.len(), lens.iter().sum::<usize>());
    for (i, ((e, d, name), (want_name, ino, typ))) in got.iter().zip(&all).enumerate() {
        assert!(e.is_none());
        assert_eq!(name.as_slice(), *want_name);
        assert_eq!((d.ino, d.off, d.typ), (*ino, i as u64 + 1, *typ));
    }

    // "nine-char" (40 bytes) does not fit after four entries in 167 bytes: the listing
    // stops there, though the entries after it are smaller.
    let r = h.one(opcode::READDIR, DIR, &[readdir_in(0, 167).as_bytes()]);
    let got = dirents(&r.payload, false);
    assert_eq!(got.len(), 4);
    assert_eq!(r.payload.len(), 128);
    // Exactly full.
    let r = h.one(opcode::READDIR, DIR, &[readdir_in(0, 168).as_bytes()]);
    assert_eq!(dirents(&r.payload, false).len(), 5);
    assert_eq!(r.payload.len(), 168);
    // The next read continues from the last entry's offset.
    let next = got.last().unwrap().1.off;
    let r = h.one(opcode::READDIR, DIR, &[readdir_in(next, 40).as_bytes()]);
    let got = dirents(&r.payload, false);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2, b"nine-char");
    // Too small for any entry: an empty (successful) reply.
    for size in [0, 1, 31] {
        let r = h.one(opcode::READDIR, DIR, &[readdir_in(0, size).as_bytes()]);
        assert_eq!((r.error, r.payload.len()), (0, 0), "size {size}");
    }
    // The end of the directory.
    let r = h.one(
        opcode::READDIR,
        DIR,
        &[readdir_in(all.len() as u64, 4096).as_bytes()],
    );
    assert_eq!((r.error, r.payload.len()), (0, 0));
}

#[test]
fn readdirplus_entries_carry_entry_out() {
    let mut h = Harness::initialized();
    let all = listing();
    let lens: Vec<usize> = all.iter().map(|(n, _, _)| dirent_len(n, true)).collect();
    assert_eq!(lens, [160, 160, 160, 160, 168, 160, 248, 160]);

    let r = h.one(opcode::READDIRPLUS, DIR, &[readdir_in(0, 65536).as_bytes()]);
    let got = dirents(&r.payload, true);
    assert_eq!(r.payload.len(), lens.iter().sum::<usize>());
    assert_eq!(got.len(), all.len());
    for (i, ((e, d, name), (want_name, ino, _))) in got.iter().zip(&all).enumerate() {
        let e = e.as_ref().unwrap();
        assert_eq!(name.as_slice(), *want_name);
        assert_eq!((d.ino, d.off), (*ino, i as u64 + 1));
        if name == b"." || name == b".." {
            assert_eq!(e.nodeid, 0, "no lookup reference for {name:?}");
            assert_eq!(e.attr, abi::Attr::default());
        } else {
            assert_eq!((e.nodeid, e.generation), (*ino, 7));
            assert_eq!(e.attr, attr(*ino));
            assert_eq!((e.entry_valid, e.entry_valid_nsec), (1, 500_000_000));
        }
    }

    for (size, entries) in [(159, 0), (160, 1), (319, 1), (320, 2), (807, 4), (808, 5)] {
        let r = h.one(opcode::READDIRPLUS, DIR, &[readdir_in(0, size).as_bytes()]);
        let got = dirents(&r.payload, true);
        assert_eq!(got.len(), entries, "size {size}");
        assert!(r.payload.len() <= size as usize);
    }
}

#[test]
fn dirbuf_adds_nothing_when_an_entry_does_not_fit() {
    let mut out = Vec::new();
    let mut d = DirBuf::new_for_tests(&mut out, 64, false);
    assert!(d.add(1, 1, libc::DT_DIR as u32, b"."));
    assert!(!d.add(
        2,
        2,
        libc::DT_REG as u32,
        b"a-name-too-long-for-what-is-left"
    ));
    assert!(d.add(3, 3, libc::DT_REG as u32, b"short"));
    assert!(!d.add(4, 4, libc::DT_REG as u32, b"y"));
    assert_eq!(out.len(), 64);
    let got = dirents(&out, false);
    assert_eq!(got.len(), 2);
    assert_eq!((got[1].1.ino, got[1].2.as_slice()), (3, &b"short"[..]));
}

#[test]
fn a_panicking_filesystem_gets_eio_not_a_crash() {
    let mut h = Harness::initialized();
    h.expect_errno(opcode::LOOKUP, ROOT, &[&cname("panic")], libc::EIO);
    h.expect_errno(
        opcode::GETATTR,
        PANICKY,
        &[abi::GetattrIn::default().as_bytes()],
        libc::EIO,
    );
    // Its end still runs, and the session goes on serving.
    let fs = h.fs();
    assert_eq!(
        fs.begins.load(Ordering::SeqCst),
        fs.ends.load(Ordering::SeqCst)
    );
    let r = h.one(opcode::LOOKUP, ROOT, &[&cname("file")]);
    assert_eq!((r.error, r.payload.len()), (0, 128));
}

#[test]
fn an_errno_outside_the_valid_range_becomes_eio() {
    let mut h = Harness::initialized();
    for name in ["errno-zero", "errno-negative", "errno-huge"] {
        h.expect_errno(opcode::LOOKUP, ROOT, &[&cname(name)], libc::EIO);
    }
}

#[test]
fn interrupt_gets_enosys_with_its_own_unique() {
    let mut h = Harness::initialized();
    let target = 1000;
    let unique = target | abi::INT_REQ_BIT;
    let (served, replies) = h.send(&build(
        common::header(opcode::INTERRUPT, unique, 0),
        &[abi::InterruptIn { unique: target }.as_bytes()],
    ));
    assert_eq!(served.unwrap(), Served::Replied);
    assert_eq!(replies.len(), 1);
    assert_eq!(
        (replies[0].unique, replies[0].error),
        (unique, -libc::ENOSYS)
    );
    assert!(replies[0].payload.is_empty());
}

#[test]
fn a_resent_request_is_answered_to_its_marked_unique() {
    let mut h = Harness::initialized();
    let unique = 88 | abi::UNIQUE_RESEND;
    let (_, replies) = h.send(&build(
        common::header(opcode::LOOKUP, unique, ROOT),
        &[&cname("file")],
    ));
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].unique, replies[0].error), (unique, 0));
}

#[test]
fn setxattr_is_decoded_with_and_without_setxattr_ext() {
    let arg = abi::SetxattrIn {
        size: 5,
        flags: libc::XATTR_REPLACE as u32,
        setxattr_flags: abi::SETXATTR_ACL_KILL_SGID,
        padding: 0,
    };
    let name = cname("system.posix_acl_access");

    // Negotiated: the 16-byte argument.
    let mut h = Harness::initialized();
    assert!(h.session.negotiated().unwrap().has(init::SETXATTR_EXT));
    let r = h.one(opcode::SETXATTR, FILE, &[arg.as_bytes(), &name, b"value"]);
    assert_eq!((r.error, r.payload.len()), (0, 0));
    let calls = h.fs().setxattrs.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let (n, v, a) = &calls[0];
    assert_eq!(
        (n.as_slice(), v.as_slice()),
        (&name[..name.len() - 1], &b"value"[..])
    );
    assert_eq!(
        (a.size, a.flags, a.setxattr_flags),
        (5, libc::XATTR_REPLACE as u32, abi::SETXATTR_ACL_KILL_SGID)
    );

    // Not negotiated (the policy does not want it, or the kernel does not offer it): the
    // 8-byte argument, and no setxattr_flags.
    let policies = [
        (
            InitPolicy::LOCAL_FILESYSTEM & !init::SETXATTR_EXT,
            kernel_init_in(),
        ),
        (
            InitPolicy::LOCAL_FILESYSTEM,
            init_in(44, KERNEL_OFFER & !init::SETXATTR_EXT),
        ),
    ];
    for (wanted, k) in policies {
        let mut h = Harness::initialized_with(InitPolicy::new(wanted), k);
        assert!(!h.session.negotiated().unwrap().has(init::SETXATTR_EXT));
        let compat = &arg.as_bytes()[..abi::COMPAT_SETXATTR_IN_SIZE];
        let r = h.one(opcode::SETXATTR, FILE, &[compat, &name, b"value"]);
        assert_eq!((r.error, r.payload.len()), (0, 0));
        let calls = h.fs().setxattrs.lock().unwrap().clone();
        assert_eq!(calls.len(), 1);
        let (n, v, a) = &calls[0];
        assert_eq!(
            (n.as_slice(), v.as_slice()),
            (&name[..name.len() - 1], &b"value"[..])
        );
        assert_eq!(
            (a.size, a.flags, a.setxattr_flags),
            (5, libc::XATTR_REPLACE as u32, 0)
        );
    }
}

#[test]
fn batch_forget_reaches_the_filesystem_node_by_node() {
    let mut h = Harness::initialized();
    let nodes: Vec<abi::ForgetOne> = (0..100)
        .map(|i| abi::ForgetOne {
            nodeid: 10 + i,
            nlookup: i + 1,
        })
        .collect();
    let head = abi::BatchForgetIn {
        count: nodes.len() as u32,
        dummy: 0,
    };
    let (_, served, replies) = h.call(
        opcode::BATCH_FORGET,
        0,
        &[head.as_bytes(), nodes.as_bytes()],
    );
    assert_eq!(served, Served::NoReply);
    assert!(replies.is_empty());
    let forgets = h.fs().forgets.lock().unwrap().clone();
    assert_eq!(
        forgets,
        nodes
            .iter()
            .map(|n| (n.nodeid, n.nlookup))
            .collect::<Vec<_>>()
    );
}
