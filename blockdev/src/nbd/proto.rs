//! The NBD wire protocol, client side: the fixed newstyle handshake with `NBD_OPT_GO`, and
//! the transmission phase's requests and simple replies. Numbers are big endian on the
//! wire. Nothing here trusts the server: every magic, length and reply type is checked and
//! a mismatch is an error naming what was wrong.

use std::io::{self, Read, Write};

use super::NbdError;

pub(crate) const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub(crate) const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub(crate) const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_NO_ZEROES: u32 = 1 << 1;

pub(crate) const OPT_GO: u32 = 7;

pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;

pub(crate) const INFO_EXPORT: u16 = 0;

/// Transmission flags of an export (`NBD_INFO_EXPORT`).
pub mod flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
}

/// Commands of the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Cmd {
    Read = 0,
    Write = 1,
    Disconnect = 2,
    Flush = 3,
    Trim = 4,
    WriteZeroes = 6,
}

/// Command flag: the write is durable when its reply arrives.
pub const CMD_FLAG_FUA: u16 = 1 << 0;

/// Longest option reply payload accepted (error messages and infos are short).
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// What `NBD_OPT_GO` told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags ([`flags`]).
    pub flags: u16,
}

impl ExportInfo {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Names an option reply error type as the protocol does.
fn rep_err_name(t: u32) -> &'static str {
    match t & !REP_ERR_BIT {
        1 => "NBD_REP_ERR_UNSUP (option not supported)",
        2 => "NBD_REP_ERR_POLICY (refused by the server's policy)",
        3 => "NBD_REP_ERR_INVALID (invalid request)",
        4 => "NBD_REP_ERR_PLATFORM (not supported on the server's platform)",
        5 => "NBD_REP_ERR_TLS_REQD (the server requires TLS)",
        6 => "NBD_REP_ERR_UNKNOWN (no such export)",
        7 => "NBD_REP_ERR_SHUTDOWN (the server is shutting down)",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD (the server requires block size negotiation)",
        9 => "NBD_REP_ERR_TOO_BIG (request too big)",
        _ => "unknown NBD_REP_ERR",
    }
}

/// Runs the fixed newstyle handshake and `NBD_OPT_GO` for `export` on a fresh
/// connection. Returns the export's size and transmission flags; the stream is then in
/// the transmission phase.
pub(crate) fn handshake(s: &mut (impl Read + Write), export: &str) -> Result<ExportInfo, NbdError> {
    let proto = |why: String| NbdError::Protocol(format!("handshake: {why}"));
    let magic = read_u64(s).map_err(|e| NbdError::io("reading the server greeting", e))?;
    if magic != INIT_MAGIC {
        return Err(proto(format!(
            "bad magic {magic:#018x}: not an NBD server (expected NBDMAGIC)"
        )));
    }
    let magic = read_u64(s).map_err(|e| NbdError::io("reading the server greeting", e))?;
    if magic == OLDSTYLE_MAGIC {
        return Err(proto(
            "the server speaks the oldstyle protocol; only fixed newstyle is supported".into(),
        ));
    }
    if magic != OPTS_MAGIC {
        return Err(proto(format!(
            "bad magic {magic:#018x} after NBDMAGIC (expected IHAVEOPT)"
        )));
    }
    let hflags = read_u16(s).map_err(|e| NbdError::io("reading the handshake flags", e))?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto(
            "the server does not offer fixed newstyle negotiation".into(),
        ));
    }
    let mut cflags = CLIENT_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= CLIENT_NO_ZEROES;
    }
    if export.len() > 4096 {
        return Err(NbdError::Protocol(format!(
            "export name of {} bytes is longer than the protocol's 4096",
            export.len()
        )));
    }
    let mut msg = Vec::with_capacity(32 + export.len());
    msg.extend_from_slice(&cflags.to_be_bytes());
    msg.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(export.len() as u32 + 6).to_be_bytes());
    msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
    msg.extend_from_slice(export.as_bytes());
    // No information requests: the server sends NBD_INFO_EXPORT regardless.
    msg.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&msg)
        .and_then(|()| s.flush())
        .map_err(|e| NbdError::io("sending NBD_OPT_GO", e))?;

    let mut info = None;
    loop {
        let rd = |e| NbdError::io("reading the reply to NBD_OPT_GO", e);
        let magic = read_u64(s).map_err(rd)?;
        if magic != REP_MAGIC {
            return Err(proto(format!(
                "bad option reply magic {magic:#018x} (expected {REP_MAGIC:#x})"
            )));
        }
        let opt = read_u32(s).map_err(rd)?;
        let typ = read_u32(s).map_err(rd)?;
        let len = read_u32(s).map_err(rd)?;
        if opt != OPT_GO {
            return Err(proto(format!(
                "reply for option {opt} while NBD_OPT_GO ({OPT_GO}) was asked"
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(proto(format!(
                "option reply of {len} bytes (at most {MAX_OPTION_REPLY} accepted)"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).map_err(rd)?;
        match typ {
            REP_ACK => {
                return info.ok_or_else(|| {
                    proto("the server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT".into())
                });
            }
            REP_INFO => {
                if data.len() < 2 {
                    return Err(proto(format!("NBD_REP_INFO of {len} bytes")));
                }
                let itype = u16::from_be_bytes([data[0], data[1]]);
                if itype == INFO_EXPORT {
                    if data.len() != 12 {
                        return Err(proto(format!(
                            "NBD_INFO_EXPORT of {len} bytes (expected 12)"
                        )));
                    }
                    let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    info = Some(ExportInfo { size, flags });
                }
                // Other information (name, description, block sizes) is not needed.
            }
            t if t & REP_ERR_BIT != 0 => {
                let message = String::from_utf8_lossy(&data).into_owned();
                return Err(NbdError::Refused {
                    export: export.to_string(),
                    reply: rep_err_name(t),
                    message,
                });
            }
            t => return Err(proto(format!("unexpected reply type {t} to NBD_OPT_GO"))),
        }
    }
}

/// Encodes a transmission request header (the data of a write follows it).
pub(crate) fn encode_request(
    cmd: Cmd,
    cmd_flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&cmd_flags.to_be_bytes());
    b[6..8].copy_from_slice(&(cmd as u16).to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// A simple reply's header: the NBD error (0 for success) and the cookie of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplyHeader {
    pub error: u32,
    pub cookie: u64,
}

/// Reads a simple reply header, refusing any other magic.
pub(crate) fn read_reply_header(r: &mut impl Read) -> Result<ReplyHeader, NbdError> {
    let mut b = [0u8; 16];
    r.read_exact(&mut b)
        .map_err(|e| NbdError::io("reading a reply", e))?;
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic == STRUCTURED_REPLY_MAGIC {
        return Err(NbdError::Protocol(
            "structured reply although none was negotiated".into(),
        ));
    }
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!(
            "bad reply magic {magic:#010x} (expected {SIMPLE_REPLY_MAGIC:#x})"
        )));
    }
    Ok(ReplyHeader {
        error: u32::from_be_bytes(b[4..8].try_into().expect("4 bytes")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
    })
}

/// The errno for an NBD error value. The protocol's values are Linux errno numbers;
/// anything else is EIO.
pub(crate) fn errno_of(nbd_error: u32) -> i32 {
    match nbd_error as i32 {
        e @ (libc::EPERM
        | libc::EIO
        | libc::ENOMEM
        | libc::EINVAL
        | libc::ENOSPC
        | libc::EOVERFLOW
        | libc::ENOTSUP
        | libc::ESHUTDOWN) => e,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A scripted server: reads go to `input`, writes are collected.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting() -> Vec<u8> {
        let mut v = INIT_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
        v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        v
    }

    fn option_reply(typ: u32, data: &[u8]) -> Vec<u8> {
        let mut v = REP_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&OPT_GO.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn export_info(size: u64, flags: u16) -> Vec<u8> {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        option_reply(REP_INFO, &d)
    }

    fn run(input: Vec<u8>) -> (Result<ExportInfo, NbdError>, Vec<u8>) {
        let mut s = Script {
            input: Cursor::new(input),
            output: Vec::new(),
        };
        let r = handshake(&mut s, "disk");
        (r, s.output)
    }

    #[test]
    fn go_returns_the_export_info() {
        let mut input = greeting();
        input.extend(option_reply(REP_INFO, &[0, 1, b'x'])); // NBD_INFO_NAME, ignored
        input.extend(export_info(1 << 30, flags::HAS_FLAGS | flags::SEND_FLUSH));
        input.extend(option_reply(REP_ACK, &[]));
        let (r, out) = run(input);
        assert_eq!(
            r.unwrap(),
            ExportInfo {
                size: 1 << 30,
                flags: flags::HAS_FLAGS | flags::SEND_FLUSH
            }
        );
        // client flags, IHAVEOPT, NBD_OPT_GO, length, name length, name, no infos
        let mut want = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        want.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
        want.extend_from_slice(&OPT_GO.to_be_bytes());
        want.extend_from_slice(&10u32.to_be_bytes());
        want.extend_from_slice(&4u32.to_be_bytes());
        want.extend_from_slice(b"disk");
        want.extend_from_slice(&[0, 0]);
        assert_eq!(out, want);
    }

    #[test]
    fn errors_are_clear() {
        let mut unknown = greeting();
        unknown.extend(option_reply(REP_ERR_BIT | 6, b"export 'disk' not present"));
        let e = run(unknown).0.unwrap_err().to_string();
        assert!(
            e.contains("NBD_REP_ERR_UNKNOWN") && e.contains("not present"),
            "{e}"
        );

        let e = run(b"HTTP/1.1 400 Bad Request\r\n".to_vec()).0.unwrap_err();
        assert!(e.to_string().contains("not an NBD server"), "{e}");

        let e = run(INIT_MAGIC.to_be_bytes()[..5].to_vec()).0.unwrap_err();
        assert!(e.to_string().contains("greeting"), "{e}");

        let mut no_info = greeting();
        no_info.extend(option_reply(REP_ACK, &[]));
        let e = run(no_info).0.unwrap_err().to_string();
        assert!(e.contains("without NBD_INFO_EXPORT"), "{e}");

        let mut short_info = greeting();
        short_info.extend(option_reply(REP_INFO, &[0, 0, 1, 2]));
        let e = run(short_info).0.unwrap_err().to_string();
        assert!(e.contains("expected 12"), "{e}");

        let mut huge = greeting();
        let mut r = REP_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&OPT_GO.to_be_bytes());
        r.extend_from_slice(&REP_INFO.to_be_bytes());
        r.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend(r);
        let e = run(huge).0.unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn reply_headers() {
        let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&5u32.to_be_bytes());
        b.extend_from_slice(&77u64.to_be_bytes());
        assert_eq!(
            read_reply_header(&mut Cursor::new(b)).unwrap(),
            ReplyHeader {
                error: 5,
                cookie: 77
            }
        );
        let mut b = 0xdead_beefu32.to_be_bytes().to_vec();
        b.extend_from_slice(&[0; 12]);
        let e = read_reply_header(&mut Cursor::new(b))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad reply magic"), "{e}");
        let e = read_reply_header(&mut Cursor::new(vec![0x67, 0x44]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reading a reply"), "{e}");
        assert_eq!(errno_of(28), libc::ENOSPC);
        assert_eq!(errno_of(9999), libc::EIO);
    }

    #[test]
    fn request_layout() {
        let b = encode_request(Cmd::Write, CMD_FLAG_FUA, 0x0102, 4096, 8192);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[8..16], &0x0102u64.to_be_bytes());
        assert_eq!(&b[16..24], &4096u64.to_be_bytes());
        assert_eq!(&b[24..28], &8192u32.to_be_bytes());
    }
}
