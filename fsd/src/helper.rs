//! The mount(8) and umount(8) helpers: `fsd` installed (or linked) as `mount.fuse.molt`
//! and `umount.fuse.molt`, or run as `fsd mount-helper` / `fsd umount-helper`.
//!
//! mount(8) runs `mount.fuse.molt IMAGE MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTIONS]
//! [-t fuse.molt]` for `mount -t fuse.molt` and for an fstab line of that type; the helper
//! mounts as `fsd mount` does (a detached supervisor; it returns once the mount answers).
//! umount(8) runs `umount.fuse.molt MOUNTPOINT [-n] [-l] [-f] [-v] [-r]` for a mount of
//! that type; the helper unmounts and waits until the image is clean, as `fsd unmount`.

use std::path::PathBuf;
use std::process::ExitCode;

use update_manager::options::{self, ParsedOptions};
use update_manager::supervisor::{self, MountOptions};

/// The names mount(8) and umount(8) look for (`mount.<type>` for type `fuse.molt`).
pub const MOUNT_HELPER: &str = "mount.fuse.molt";
pub const UMOUNT_HELPER: &str = "umount.fuse.molt";

/// The filesystem types the helpers serve (`-t`).
const TYPES: [&str; 2] = ["fuse.molt", "molt"];

/// What `mount.fuse.molt` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    /// Every `-o` list, joined.
    pub options: String,
    /// `-s`: tolerate options this version does not know.
    pub sloppy: bool,
    /// `-f`: check everything, mount nothing.
    pub fake: bool,
    /// `-v`: say what is done.
    pub verbose: bool,
}

/// What `umount.fuse.molt` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UmountRequest {
    pub mountpoint: PathBuf,
    /// `-l`: detach now; the image is made clean when the last open file closes.
    pub lazy: bool,
    pub verbose: bool,
}

/// A helper's flags (with their values, for those that take one) and its positionals.
type SplitArgs = (Vec<(char, Option<String>)>, Vec<String>);

/// Splits helper arguments into flags (each letter of a `-abc` cluster), option values
/// and positionals. `with_value` are the flags that take a value (`-o X` or `-oX`).
fn split_args(args: &[String], with_value: &[char]) -> Result<SplitArgs, String> {
    let mut flags = Vec::new();
    let mut positionals = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            positionals.extend(it.by_ref().cloned());
            break;
        }
        let Some(cluster) = a.strip_prefix('-').filter(|c| !c.is_empty()) else {
            positionals.push(a.clone());
            continue;
        };
        if cluster.starts_with('-') {
            return Err(format!("unknown argument {a:?}"));
        }
        for (i, c) in cluster.char_indices() {
            if with_value.contains(&c) {
                let rest = &cluster[i + c.len_utf8()..];
                let value = if rest.is_empty() {
                    it.next()
                        .cloned()
                        .ok_or_else(|| format!("-{c} needs a value"))?
                } else {
                    rest.to_string()
                };
                flags.push((c, Some(value)));
                break;
            }
            flags.push((c, None));
        }
    }
    Ok((flags, positionals))
}

fn check_type(t: &str) -> Result<(), String> {
    if TYPES.contains(&t) {
        Ok(())
    } else {
        Err(format!("filesystem type {t:?} is not Molt's (fuse.molt)"))
    }
}

/// Parses `mount.fuse.molt`'s arguments.
pub fn parse_mount_args(args: &[String]) -> Result<MountRequest, String> {
    let (flags, positionals) = split_args(args, &['o', 't', 'N'])?;
    let [image, mountpoint] = positionals.as_slice() else {
        return Err(format!(
            "expected IMAGE MOUNTPOINT, got {} arguments",
            positionals.len()
        ));
    };
    let mut r = MountRequest {
        image: PathBuf::from(image),
        mountpoint: PathBuf::from(mountpoint),
        options: String::new(),
        sloppy: false,
        fake: false,
        verbose: false,
    };
    let mut lists = Vec::new();
    for (flag, value) in flags {
        match (flag, value) {
            ('o', Some(v)) => lists.push(v),
            ('t', Some(t)) => check_type(&t)?,
            ('N', Some(_)) => {
                return Err("-N (mounting in another mount namespace) is not supported".into())
            }
            ('s', None) => r.sloppy = true,
            ('f', None) => r.fake = true,
            ('v', None) => r.verbose = true,
            // There is no /etc/mtab to leave alone.
            ('n', None) => {}
            (c, _) => return Err(format!("unknown flag -{c}")),
        }
    }
    r.options = lists.join(",");
    Ok(r)
}

/// Parses `umount.fuse.molt`'s arguments.
pub fn parse_umount_args(args: &[String]) -> Result<UmountRequest, String> {
    let (flags, positionals) = split_args(args, &['t', 'N'])?;
    let [mountpoint] = positionals.as_slice() else {
        return Err(format!(
            "expected MOUNTPOINT, got {} arguments",
            positionals.len()
        ));
    };
    let mut r = UmountRequest {
        mountpoint: PathBuf::from(mountpoint),
        lazy: false,
        verbose: false,
    };
    for (flag, value) in flags {
        match (flag, value) {
            ('t', Some(t)) => check_type(&t)?,
            ('N', Some(_)) => {
                return Err("-N (unmounting in another mount namespace) is not supported".into())
            }
            ('l', None) => r.lazy = true,
            ('v', None) => r.verbose = true,
            // No mtab; a forced unmount would abort the FUSE connection and leave the
            // image to be recovered, so -f unmounts as usual; -r has nothing to fall
            // back to (a remount read-only is not offered).
            ('n' | 'f' | 'r', None) => {}
            (c, _) => return Err(format!("unknown flag -{c}")),
        }
    }
    Ok(r)
}

/// The `fsd mount` flags given on the command line, which win over the same options in
/// `-o`.
pub struct Given {
    pub threads: Option<usize>,
    pub transport: Option<fsd_server::serve::TransportChoice>,
    pub engine: Option<blockdev::engine::EngineKind>,
    pub keyring: Option<PathBuf>,
    pub allowed_uids: Vec<u32>,
}

impl Given {
    fn none() -> Given {
        Given {
            threads: None,
            transport: None,
            engine: None,
            keyring: None,
            allowed_uids: Vec::new(),
        }
    }
}

/// The supervisor's options from parsed `-o` options and the flags given beside them.
pub fn mount_options(
    image: PathBuf,
    mountpoint: PathBuf,
    parsed: ParsedOptions,
    given: Given,
) -> MountOptions {
    let mut allowed_uids = parsed.allowed_uids;
    allowed_uids.extend(given.allowed_uids);
    allowed_uids.sort_unstable();
    allowed_uids.dedup();
    MountOptions {
        image,
        mountpoint,
        threads: given.threads.or(parsed.threads).unwrap_or(4),
        transport: given.transport.or(parsed.transport).unwrap_or_default(),
        engine: given
            .engine
            .or(parsed.engine)
            .unwrap_or(blockdev::engine::EngineKind::Uring),
        keyring: given
            .keyring
            .or(parsed.keyring)
            .unwrap_or_else(|| PathBuf::from(supervisor::DEFAULT_KEYRING)),
        allowed_uids,
        flags: parsed.flags,
    }
}

/// `mount.fuse.molt`: exit 0 once the mount answers; 1 (with the reason on stderr) if
/// it was refused or failed. mount(8) prints nothing of its own for a helper's failure.
pub fn mount_main(name: &str, args: &[String]) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        molt_sys::errln!("{name}: {e}");
        ExitCode::from(1)
    };
    let r = match parse_mount_args(args) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let parsed = match options::parse(&r.options, r.sloppy) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    for u in &parsed.unknown {
        molt_sys::errln!("{name}: ignoring unknown mount option {u:?} (-s)");
    }
    let opts = mount_options(r.image, r.mountpoint, parsed, Given::none());
    if r.verbose {
        molt_sys::outln!(
            "{name}: mounting {} on {} ({})",
            opts.image.display(),
            opts.mountpoint.display(),
            opts.flags.to_options()
        );
    }
    if r.fake {
        return match supervisor::check_mount(&opts) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("fsd"));
    match supervisor::mount_daemon(&opts, &exe) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// `umount.fuse.molt`: exit 0 once the mount is gone and (unless `-l`) the stack has made
/// the image clean and exited.
pub fn umount_main(name: &str, args: &[String]) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        molt_sys::errln!("{name}: {e}");
        ExitCode::from(1)
    };
    let r = match parse_umount_args(args) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if r.verbose {
        molt_sys::outln!("{name}: unmounting {}", r.mountpoint.display());
    }
    let done = if r.lazy {
        fsd_server::serve::unmount(&r.mountpoint, true)
            .map_err(|e| supervisor::MountError::Os("detaching the mount", e))
    } else {
        supervisor::unmount(&r.mountpoint)
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn mount_arguments_as_mount8_passes_them() {
        let r = parse_mount_args(&args("/srv/m.img /mnt/m -n -o rw,nofail -t fuse.molt")).unwrap();
        assert_eq!(r.image, PathBuf::from("/srv/m.img"));
        assert_eq!(r.mountpoint, PathBuf::from("/mnt/m"));
        assert_eq!(r.options, "rw,nofail");
        assert!(!r.sloppy && !r.fake && !r.verbose);
        let r = parse_mount_args(&args("-sfv -oro,threads=2 img mnt -o noatime")).unwrap();
        assert!(r.sloppy && r.fake && r.verbose);
        assert_eq!(r.options, "ro,threads=2,noatime");
        let r = parse_mount_args(&args("img mnt -- -o")).unwrap_err();
        assert!(r.contains("3 arguments"), "{r}");
    }

    #[test]
    fn mount_argument_errors_say_what_is_wrong() {
        for (a, want) in [
            ("img", "expected IMAGE MOUNTPOINT"),
            ("img mnt extra", "expected IMAGE MOUNTPOINT"),
            ("img mnt -o", "-o needs a value"),
            ("img mnt -t ext4", "\"ext4\""),
            ("img mnt -x", "-x"),
            ("img mnt --bogus", "--bogus"),
            ("img mnt -N /proc/1/ns/mnt", "-N"),
        ] {
            let e = parse_mount_args(&args(a)).unwrap_err();
            assert!(e.contains(want), "{a}: {e}");
        }
    }

    #[test]
    fn umount_arguments() {
        let r = parse_umount_args(&args("/mnt/m -n -v")).unwrap();
        assert_eq!(r.mountpoint, PathBuf::from("/mnt/m"));
        assert!(!r.lazy && r.verbose);
        assert!(
            parse_umount_args(&args("-l /mnt/m -t fuse.molt"))
                .unwrap()
                .lazy
        );
        assert!(parse_umount_args(&args("/a /b")).is_err());
        assert!(parse_umount_args(&args("/a -q")).is_err());
    }

    #[test]
    fn flags_given_win_over_options_and_uids_add_up() {
        let parsed = options::parse("threads=8,engine=sync,allow_uid=5,ro", false).unwrap();
        let given = Given {
            threads: Some(2),
            transport: None,
            engine: None,
            keyring: None,
            allowed_uids: vec![7, 5],
        };
        let o = mount_options("i".into(), "m".into(), parsed, given);
        assert_eq!(o.threads, 2);
        assert_eq!(o.engine, blockdev::engine::EngineKind::Sync);
        assert_eq!(o.allowed_uids, vec![5, 7]);
        assert!(o.flags.read_only);
        assert_eq!(o.keyring, PathBuf::from(supervisor::DEFAULT_KEYRING));
        let o = mount_options(
            "i".into(),
            "m".into(),
            options::parse("", false).unwrap(),
            Given::none(),
        );
        assert_eq!(o.threads, 4);
        assert_eq!(o.transport, fsd_server::serve::TransportChoice::Dev);
        assert_eq!(o.engine, blockdev::engine::EngineKind::Uring);
    }
}
