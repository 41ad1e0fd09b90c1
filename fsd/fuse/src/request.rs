//! Decoding of the requests the kernel sends. Nothing in a request is trusted: the
//! header's length must be the buffer's, every argument structure must fit in what is
//! left, every name must end with a NUL inside the request, and every length the request
//! states (write data, xattr value, forget count) is checked against the bytes present.
//! A request that fails a check is answered with EINVAL (or EIO for a header that
//! contradicts its buffer) by the session; one too short for a header cannot be answered
//! and ends the connection.

use zerocopy::FromBytes;

use crate::abi::{self, opcode, InHeader};

/// One decoded request: its header and its operation, borrowing from the read buffer.
#[derive(Debug)]
pub struct Request<'a> {
    pub header: InHeader,
    pub op: Operation<'a>,
}

/// The operations Molt serves, with their arguments. Names are the bytes before the NUL.
#[derive(Debug)]
pub enum Operation<'a> {
    Init(abi::InitIn),
    Destroy,
    Lookup {
        name: &'a [u8],
    },
    Forget {
        nlookup: u64,
    },
    BatchForget {
        nodes: Vec<abi::ForgetOne>,
    },
    Getattr {
        fh: Option<u64>,
    },
    Statx(abi::StatxIn),
    Setattr(abi::SetattrIn),
    Readlink,
    Symlink {
        name: &'a [u8],
        target: &'a [u8],
    },
    Mknod {
        arg: abi::MknodIn,
        name: &'a [u8],
    },
    Mkdir {
        arg: abi::MkdirIn,
        name: &'a [u8],
    },
    Unlink {
        name: &'a [u8],
    },
    Rmdir {
        name: &'a [u8],
    },
    /// RENAME and RENAME2 (RENAME has `flags` 0).
    Rename {
        newdir: u64,
        flags: u32,
        name: &'a [u8],
        newname: &'a [u8],
    },
    Link {
        oldnodeid: u64,
        name: &'a [u8],
    },
    Open(abi::OpenIn),
    Opendir(abi::OpenIn),
    Create {
        arg: abi::CreateIn,
        name: &'a [u8],
    },
    Read(abi::ReadIn),
    Readdir(abi::ReadIn),
    Readdirplus(abi::ReadIn),
    Write {
        arg: abi::WriteIn,
        data: &'a [u8],
    },
    Flush(abi::FlushIn),
    Release(abi::ReleaseIn),
    Releasedir(abi::ReleaseIn),
    Fsync(abi::FsyncIn),
    Fsyncdir(abi::FsyncIn),
    Statfs,
    Setxattr {
        arg: abi::SetxattrIn,
        name: &'a [u8],
        value: &'a [u8],
    },
    Getxattr {
        size: u32,
        name: &'a [u8],
    },
    Listxattr {
        size: u32,
    },
    Removexattr {
        name: &'a [u8],
    },
    Access {
        mask: u32,
    },
    Fallocate(abi::FallocateIn),
    Lseek(abi::LseekIn),
    Syncfs,
    Interrupt {
        unique: u64,
    },
    /// The kernel's answer to a retrieve Molt never asks for: dropped, no reply.
    NotifyReply,
    /// A valid request Molt does not implement (answered ENOSYS).
    Unsupported(u32),
}

/// Why a request could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than a header: there is no `unique` to answer.
    NoHeader(usize),
    /// The header is readable; the request is malformed. Answered with `errno`.
    Malformed {
        unique: u64,
        opcode: u32,
        errno: i32,
        what: &'static str,
    },
}

/// A cursor over a request's argument bytes that never reads past them.
struct Args<'a> {
    rest: &'a [u8],
}

type Step<T> = Result<T, &'static str>;

impl<'a> Args<'a> {
    /// An argument structure; fails if fewer bytes than its size remain.
    fn get<T: FromBytes>(&mut self, what: &'static str) -> Step<T> {
        let (v, rest) = T::read_from_prefix(self.rest).map_err(|_| what)?;
        self.rest = rest;
        Ok(v)
    }

    /// An argument structure that older kernels send shorter: the bytes present (at least
    /// `min`, at most the structure) and zeros for the rest.
    fn get_prefix<T: FromBytes + zerocopy::IntoBytes>(
        &mut self,
        min: usize,
        what: &'static str,
    ) -> Step<T> {
        let size = core::mem::size_of::<T>();
        let n = self.rest.len().min(size);
        if n < min {
            return Err(what);
        }
        let mut v = T::new_zeroed();
        v.as_mut_bytes()[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Ok(v)
    }

    /// Exactly `n` bytes.
    fn bytes(&mut self, n: u64, what: &'static str) -> Step<&'a [u8]> {
        if n > self.rest.len() as u64 {
            return Err(what);
        }
        let (b, rest) = self.rest.split_at(n as usize);
        self.rest = rest;
        Ok(b)
    }

    /// A NUL-terminated name (without its NUL).
    fn name(&mut self, what: &'static str) -> Step<&'a [u8]> {
        let end = self.rest.iter().position(|&b| b == 0).ok_or(what)?;
        let name = &self.rest[..end];
        self.rest = &self.rest[end + 1..];
        Ok(name)
    }
}

/// Decodes one request. `setxattr_ext`: the connection negotiated SETXATTR_EXT, so
/// SETXATTR carries the extended argument.
pub fn decode(buf: &[u8], setxattr_ext: bool) -> Result<Request<'_>, DecodeError> {
    let (header, body) =
        InHeader::read_from_prefix(buf).map_err(|_| DecodeError::NoHeader(buf.len()))?;
    let malformed = |errno: i32, what: &'static str| DecodeError::Malformed {
        unique: header.unique,
        opcode: header.opcode,
        errno,
        what,
    };
    if header.len as usize != buf.len() {
        return Err(malformed(
            libc::EIO,
            "header length differs from the request's",
        ));
    }
    // Extensions (security context, supplementary groups) follow the arguments; Molt
    // negotiates none, so a request carrying them is accepted with them ignored.
    let ext = header.total_extlen as usize * 8;
    if ext > body.len() {
        return Err(malformed(
            libc::EINVAL,
            "extensions longer than the request",
        ));
    }
    let args = Args {
        rest: &body[..body.len() - ext],
    };
    let op =
        operation(header.opcode, args, setxattr_ext).map_err(|w| malformed(libc::EINVAL, w))?;
    Ok(Request { header, op })
}

fn operation(op: u32, mut a: Args<'_>, setxattr_ext: bool) -> Step<Operation<'_>> {
    use Operation as O;
    Ok(match op {
        opcode::INIT => O::Init(a.get_prefix(abi::COMPAT_INIT_IN_SIZE, "short INIT")?),
        opcode::DESTROY => O::Destroy,
        opcode::LOOKUP => O::Lookup {
            name: a.name("LOOKUP name")?,
        },
        opcode::FORGET => O::Forget {
            nlookup: a.get::<abi::ForgetIn>("short FORGET")?.nlookup,
        },
        opcode::BATCH_FORGET => {
            let head: abi::BatchForgetIn = a.get("short BATCH_FORGET")?;
            let n = head.count as u64;
            let raw = a.bytes(n * 16, "BATCH_FORGET count beyond the request")?;
            let nodes = raw
                .chunks_exact(16)
                .map(|c| abi::ForgetOne::read_from_bytes(c).map_err(|_| "forget entry"))
                .collect::<Step<Vec<_>>>()?;
            O::BatchForget { nodes }
        }
        opcode::GETATTR => {
            let g: abi::GetattrIn = a.get("short GETATTR")?;
            O::Getattr {
                fh: (g.getattr_flags & abi::GETATTR_FH != 0).then_some(g.fh),
            }
        }
        opcode::STATX => O::Statx(a.get("short STATX")?),
        opcode::SETATTR => O::Setattr(a.get("short SETATTR")?),
        opcode::READLINK => O::Readlink,
        opcode::SYMLINK => {
            let name = a.name("SYMLINK name")?;
            let target = a.name("SYMLINK target")?;
            O::Symlink { name, target }
        }
        opcode::MKNOD => {
            let arg = a.get("short MKNOD")?;
            O::Mknod {
                arg,
                name: a.name("MKNOD name")?,
            }
        }
        opcode::MKDIR => {
            let arg = a.get("short MKDIR")?;
            O::Mkdir {
                arg,
                name: a.name("MKDIR name")?,
            }
        }
        opcode::UNLINK => O::Unlink {
            name: a.name("UNLINK name")?,
        },
        opcode::RMDIR => O::Rmdir {
            name: a.name("RMDIR name")?,
        },
        opcode::RENAME | opcode::RENAME2 => {
            let (newdir, flags) = if op == opcode::RENAME {
                (a.get::<abi::RenameIn>("short RENAME")?.newdir, 0)
            } else {
                let r: abi::Rename2In = a.get("short RENAME2")?;
                (r.newdir, r.flags)
            };
            let name = a.name("RENAME name")?;
            let newname = a.name("RENAME new name")?;
            O::Rename {
                newdir,
                flags,
                name,
                newname,
            }
        }
        opcode::LINK => {
            let l: abi::LinkIn = a.get("short LINK")?;
            O::Link {
                oldnodeid: l.oldnodeid,
                name: a.name("LINK name")?,
            }
        }
        opcode::OPEN => O::Open(a.get("short OPEN")?),
        opcode::OPENDIR => O::Opendir(a.get("short OPENDIR")?),
        opcode::CREATE => {
            let arg = a.get("short CREATE")?;
            O::Create {
                arg,
                name: a.name("CREATE name")?,
            }
        }
        opcode::READ => O::Read(a.get("short READ")?),
        opcode::READDIR => O::Readdir(a.get("short READDIR")?),
        opcode::READDIRPLUS => O::Readdirplus(a.get("short READDIRPLUS")?),
        opcode::WRITE => {
            let arg: abi::WriteIn = a.get("short WRITE")?;
            let data = a.bytes(arg.size as u64, "WRITE size beyond the request")?;
            O::Write { arg, data }
        }
        opcode::FLUSH => O::Flush(a.get("short FLUSH")?),
        opcode::RELEASE => O::Release(a.get("short RELEASE")?),
        opcode::RELEASEDIR => O::Releasedir(a.get("short RELEASEDIR")?),
        opcode::FSYNC => O::Fsync(a.get("short FSYNC")?),
        opcode::FSYNCDIR => O::Fsyncdir(a.get("short FSYNCDIR")?),
        opcode::STATFS => O::Statfs,
        opcode::SETXATTR => {
            let arg: abi::SetxattrIn = if setxattr_ext {
                a.get("short SETXATTR")?
            } else {
                let compat = a.bytes(abi::COMPAT_SETXATTR_IN_SIZE as u64, "short SETXATTR")?;
                let mut arg = abi::SetxattrIn::default();
                zerocopy::IntoBytes::as_mut_bytes(&mut arg)[..compat.len()].copy_from_slice(compat);
                arg
            };
            let name = a.name("SETXATTR name")?;
            let value = a.bytes(arg.size as u64, "SETXATTR size beyond the request")?;
            O::Setxattr { arg, name, value }
        }
        opcode::GETXATTR => {
            let g: abi::GetxattrIn = a.get("short GETXATTR")?;
            O::Getxattr {
                size: g.size,
                name: a.name("GETXATTR name")?,
            }
        }
        opcode::LISTXATTR => O::Listxattr {
            size: a.get::<abi::GetxattrIn>("short LISTXATTR")?.size,
        },
        opcode::REMOVEXATTR => O::Removexattr {
            name: a.name("REMOVEXATTR name")?,
        },
        opcode::ACCESS => O::Access {
            mask: a.get::<abi::AccessIn>("short ACCESS")?.mask,
        },
        opcode::FALLOCATE => O::Fallocate(a.get("short FALLOCATE")?),
        opcode::LSEEK => O::Lseek(a.get("short LSEEK")?),
        opcode::SYNCFS => O::Syncfs,
        opcode::INTERRUPT => O::Interrupt {
            unique: a.get::<abi::InterruptIn>("short INTERRUPT")?.unique,
        },
        opcode::NOTIFY_REPLY => O::NotifyReply,
        other => O::Unsupported(other),
    })
}
