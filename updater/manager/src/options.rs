//! Mount options as mount(8) and fstab spell them (`-o ro,threads=8,nofail`): the one
//! parser behind `fsd mount -o` and the `mount.fuse.molt` helper.
//!
//! Three kinds of option:
//! - the kernel mount's flags (`ro`/`rw`, `dev`/`nodev`, `suid`/`nosuid`,
//!   `exec`/`noexec`, `relatime`/`strictatime`/`noatime`: [`MountFlags::apply`]);
//! - Molt's own, the `fsd mount` flags spelled as options: `threads=N`,
//!   `transport=dev|uring|auto`, `engine=uring|sync`, `keyring=PATH`, `allow_uid=N`
//!   (repeatable);
//! - the ones mount(8) and systemd act on themselves and pass along, accepted and
//!   ignored: `defaults`, `auto`/`noauto`, `nofail`, `_netdev`, `user`/`nouser`, `users`,
//!   `owner`, `group`, `comment=…`, `x-…` (among them `x-systemd.…`).
//!
//! Anything else is refused with its name, unless the parse is sloppy (`mount -s`), which
//! collects it instead. A later option overrides an earlier one.

use std::path::PathBuf;

use blockdev::engine::EngineKind;
use fsd_server::serve::{MountFlags, TransportChoice};

/// The most FUSE worker threads a mount may ask for.
pub const MAX_THREADS: usize = 1024;

/// What an option list says. `None` and empty fields were not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOptions {
    pub flags: MountFlags,
    pub threads: Option<usize>,
    pub transport: Option<TransportChoice>,
    pub engine: Option<EngineKind>,
    pub keyring: Option<PathBuf>,
    pub allowed_uids: Vec<u32>,
    /// Options mount(8) or systemd act on, accepted and ignored.
    pub ignored: Vec<String>,
    /// Unknown options a sloppy parse let through.
    pub unknown: Vec<String>,
}

/// Why an option list was refused; the message names the option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("unknown mount option {0:?}")]
    Unknown(String),
    #[error("mount option {option:?}: {why}")]
    BadValue { option: String, why: String },
}

/// Whether mount(8) or systemd handle `opt` themselves (Molt ignores it).
fn is_mount_tool_option(opt: &str) -> bool {
    matches!(
        opt,
        "defaults"
            | "auto"
            | "noauto"
            | "nofail"
            | "_netdev"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
    ) || opt.starts_with("x-")
        || opt.starts_with("comment=")
}

/// Parses a comma-separated option list (empty items are skipped). `sloppy` collects
/// unknown options in [`ParsedOptions::unknown`] instead of refusing them; a known option
/// with a bad value is refused either way.
pub fn parse(list: &str, sloppy: bool) -> Result<ParsedOptions, OptionError> {
    let mut p = ParsedOptions::default();
    for opt in list.split(',').filter(|o| !o.is_empty()) {
        if p.flags.apply(opt) {
            continue;
        }
        if is_mount_tool_option(opt) {
            p.ignored.push(opt.to_string());
            continue;
        }
        let bad = |why: String| OptionError::BadValue {
            option: opt.to_string(),
            why,
        };
        match opt.split_once('=') {
            Some(("threads", v)) => {
                let n: usize = v
                    .parse()
                    .map_err(|_| bad(format!("{v:?} is not a number")))?;
                if !(1..=MAX_THREADS).contains(&n) {
                    return Err(bad(format!("expected 1 to {MAX_THREADS} threads")));
                }
                p.threads = Some(n);
            }
            Some(("transport", v)) => p.transport = Some(v.parse().map_err(bad)?),
            Some(("engine", v)) => p.engine = Some(v.parse().map_err(bad)?),
            Some(("keyring", v)) => {
                if v.is_empty() {
                    return Err(bad("an empty path".into()));
                }
                p.keyring = Some(PathBuf::from(v));
            }
            Some(("allow_uid", v)) => p.allowed_uids.push(
                v.parse()
                    .map_err(|_| bad(format!("{v:?} is not a user id")))?,
            ),
            _ if sloppy => p.unknown.push(opt.to_string()),
            _ => return Err(OptionError::Unknown(opt.to_string())),
        }
    }
    Ok(p)
}

impl ParsedOptions {
    /// The option list that parses back to these options (without the ignored and the
    /// unknown ones).
    pub fn to_options(&self) -> String {
        let mut out = vec![self.flags.to_options()];
        if let Some(n) = self.threads {
            out.push(format!("threads={n}"));
        }
        if let Some(t) = self.transport {
            out.push(format!("transport={}", t.as_str()));
        }
        if let Some(e) = self.engine {
            out.push(format!("engine={}", e.as_str()));
        }
        if let Some(k) = &self.keyring {
            out.push(format!("keyring={}", k.display()));
        }
        for u in &self.allowed_uids {
            out.push(format!("allow_uid={u}"));
        }
        out.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsd_core::fs::Atime;
    use proptest::prelude::*;

    #[test]
    fn defaults_are_nodev_nosuid_exec_relatime_read_write() {
        let p = parse("", false).unwrap();
        assert_eq!(p, ParsedOptions::default());
        assert_eq!(p.flags, MountFlags::default());
        assert!(!p.flags.read_only);
        assert_eq!(p.flags.to_options(), "rw,nodev,nosuid,exec,relatime");
    }

    #[test]
    fn every_option_is_understood() {
        let p = parse(
            "ro,dev,suid,noexec,noatime,threads=8,transport=uring,engine=sync,\
             keyring=/etc/k,allow_uid=1000,allow_uid=1001",
            false,
        )
        .unwrap();
        assert!(p.flags.read_only && p.flags.dev && p.flags.suid && !p.flags.exec);
        assert_eq!(p.flags.atime, Atime::Never);
        assert_eq!(p.threads, Some(8));
        assert_eq!(p.transport, Some(TransportChoice::Uring));
        assert_eq!(p.engine, Some(EngineKind::Sync));
        assert_eq!(p.keyring, Some(PathBuf::from("/etc/k")));
        assert_eq!(p.allowed_uids, vec![1000, 1001]);
    }

    #[test]
    fn a_later_option_overrides_an_earlier_one() {
        let p = parse("ro,rw,noatime,strictatime,threads=2,threads=3", false).unwrap();
        assert!(!p.flags.read_only);
        assert_eq!(p.flags.atime, Atime::Always);
        assert_eq!(p.threads, Some(3));
    }

    #[test]
    fn mount_tool_options_are_ignored() {
        let list = "defaults,nofail,_netdev,auto,noauto,user,nouser,users,owner,group,\
                    x-systemd.automount,x-systemd.device-timeout=5s,x-gvfs-show,comment=a b";
        let p = parse(list, false).unwrap();
        assert_eq!(p.flags, MountFlags::default());
        assert_eq!(p.ignored.len(), 14);
    }

    #[test]
    fn an_unknown_option_is_refused_with_its_name() {
        let e = parse("ro,frobnicate,nofail", false).unwrap_err();
        assert_eq!(e, OptionError::Unknown("frobnicate".into()));
        assert!(e.to_string().contains("\"frobnicate\""), "{e}");
        // An option that takes no value given one, and the reverse, are unknown too.
        assert!(parse("ro=1", false).is_err());
        assert!(parse("threads", false).is_err());
    }

    #[test]
    fn sloppy_collects_unknown_options() {
        let p = parse("ro,frobnicate,max_read=4096", true).unwrap();
        assert!(p.flags.read_only);
        assert_eq!(p.unknown, vec!["frobnicate", "max_read=4096"]);
    }

    #[test]
    fn bad_values_are_refused_naming_the_option() {
        for bad in [
            "threads=0",
            "threads=-1",
            "threads=lots",
            "threads=100000",
            "transport=tcp",
            "engine=aio",
            "keyring=",
            "allow_uid=root",
            "allow_uid=-5",
        ] {
            let e = parse(bad, true).unwrap_err();
            assert!(
                matches!(&e, OptionError::BadValue { option, .. } if option == bad),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }

    fn option() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "ro",
                "rw",
                "dev",
                "nodev",
                "suid",
                "nosuid",
                "exec",
                "noexec",
                "relatime",
                "strictatime",
                "noatime",
                "defaults",
                "nofail",
                "_netdev",
                "noauto",
                "transport=dev",
                "transport=uring",
                "transport=auto",
                "engine=uring",
                "engine=sync",
                "x-systemd.automount",
            ])
            .prop_map(String::from),
            (1usize..=MAX_THREADS).prop_map(|n| format!("threads={n}")),
            any::<u32>().prop_map(|u| format!("allow_uid={u}")),
            "[a-z/]{1,12}".prop_map(|k| format!("keyring=/{k}")),
        ]
    }

    proptest! {
        /// What a list of valid options means survives printing and parsing again.
        #[test]
        fn known_options_round_trip(opts in prop::collection::vec(option(), 0..12)) {
            let p = parse(&opts.join(","), false).unwrap();
            let again = parse(&p.to_options(), false).unwrap();
            prop_assert_eq!(again.flags, p.flags);
            prop_assert_eq!(again.threads, p.threads);
            prop_assert_eq!(again.transport, p.transport);
            prop_assert_eq!(again.engine, p.engine);
            prop_assert_eq!(&again.keyring, &p.keyring);
            prop_assert_eq!(&again.allowed_uids, &p.allowed_uids);
        }

        /// No input makes the parser panic, and an accepted strict parse has nothing
        /// unknown.
        #[test]
        fn any_input_parses_or_is_refused(list in "[ -~]{0,64}", sloppy in any::<bool>()) {
            if let Ok(p) = parse(&list, sloppy) {
                prop_assert!(sloppy || p.unknown.is_empty());
            }
        }

        /// An option that is not known is refused by name wherever it stands.
        #[test]
        fn an_unknown_option_is_named(
            before in prop::collection::vec(option(), 0..4),
            name in "zz[a-z]{1,8}",
            after in prop::collection::vec(option(), 0..4),
        ) {
            let list = [before, vec![name.clone()], after].concat().join(",");
            prop_assert_eq!(parse(&list, false), Err(OptionError::Unknown(name)));
        }
    }
}
