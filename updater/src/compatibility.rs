//! Does a verified manifest apply to what is running? Pure: the supervisor describes the
//! running system and gets one [`CheckItem`] per check, to send as `Event::Check` along
//! with the requirement checks.

use crate::manifest::{ComponentName, Manifest, Nature};
use crate::requirements::CheckItem;

/// A running component as the supervisor knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningComponent {
    pub name: ComponentName,
    pub version: String,
    /// State schema version it exports.
    pub state_schema: u32,
    /// Ring protocol version it speaks, where that applies.
    pub ring_protocol: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningSystem {
    pub components: Vec<RunningComponent>,
    /// On-disk format version of the mounted image.
    pub format_version: u32,
    /// Sequence of the last package applied to this installation, if any.
    pub last_sequence: Option<u64>,
    /// How the filesystem server's FUSE connection is served ("dev", "uring"), if known.
    pub fsd_transport: Option<String>,
}

/// Why a filesystem server serving its connection over io_uring is not replaced live.
pub const URING_NOT_LIVE: &str = "the mount is served over FUSE io_uring, and this kernel \
    retires a process's io_uring queue entries only by destroying its ring, which fails \
    requests being handed to them (ECANCELED) or leaves them unanswered; a live update \
    would risk requests (docs/live-update.md, \"FUSE over io_uring\"). Mount with \
    --transport dev to update fsd live";

/// In order: live-updatable; sequence above the last applied; per replaced component, that
/// it runs, that its running version is in `applies_to`, that the new binary reads the
/// running state schema; that every component speaks the same ring protocol after the
/// update; that a format change starts from the image's format.
pub fn check_compatibility(m: &Manifest, sys: &RunningSystem) -> Vec<CheckItem> {
    let mut out = Vec::new();
    let p = &m.package;
    let live = p.live && p.nature != Nature::NotLive;
    out.push(CheckItem::new(
        "live",
        live,
        if live {
            format!("nature {}, live-updatable", p.nature)
        } else {
            format!(
                "not live-updatable: {}",
                p.reason.as_deref().unwrap_or("no reason given")
            )
        },
    ));
    out.push(match sys.last_sequence {
        Some(last) => CheckItem::new(
            "sequence",
            p.sequence > last,
            format!("package sequence {}, last applied {last}", p.sequence),
        ),
        None => CheckItem::new(
            "sequence",
            true,
            format!("package sequence {}, none applied yet", p.sequence),
        ),
    });
    for c in &m.components {
        let Some(run) = sys.components.iter().find(|r| r.name == c.name) else {
            out.push(CheckItem::new(
                format!("{} version", c.name),
                false,
                format!("{} is not running", c.name),
            ));
            continue;
        };
        out.push(CheckItem::new(
            format!("{} version", c.name),
            c.applies_to.contains(&run.version),
            format!(
                "running {}, package replaces {} with {}",
                run.version,
                c.applies_to.join(" or "),
                c.new_version
            ),
        ));
        out.push(CheckItem::new(
            format!("{} state schema", c.name),
            c.state_schema_reads.contains(&run.state_schema),
            format!(
                "running exports schema {}, new version reads {:?}",
                run.state_schema, c.state_schema_reads
            ),
        ));
        if c.name == ComponentName::Fsd {
            if let Some(t) = &sys.fsd_transport {
                let uring = t == "uring";
                let detail = if uring {
                    URING_NOT_LIVE.to_string()
                } else {
                    format!("the mount is served over {t}")
                };
                out.push(CheckItem::new("fsd transport", !uring, detail));
            }
        }
    }
    // Ring protocol after the update: the new binary's where the package says, else the
    // running one's.
    let after: Vec<(ComponentName, u32)> = sys
        .components
        .iter()
        .filter_map(|r| {
            let new = m.component(r.name).and_then(|c| c.ring_protocol);
            new.or(r.ring_protocol).map(|v| (r.name, v))
        })
        .collect();
    if m.components.iter().any(|c| c.ring_protocol.is_some()) {
        let agree = after.windows(2).all(|w| w[0].1 == w[1].1);
        let list: Vec<String> = after.iter().map(|(n, v)| format!("{n} {v}")).collect();
        out.push(CheckItem::new(
            "ring protocol",
            agree,
            format!("after the update: {}", list.join(", ")),
        ));
    }
    if let Some(f) = &m.format {
        out.push(CheckItem::new(
            "format",
            sys.format_version == f.from,
            format!(
                "image is format {}, package converts {} to {}",
                sys.format_version, f.from, f.to
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;

    fn system() -> RunningSystem {
        RunningSystem {
            components: vec![
                RunningComponent {
                    name: ComponentName::Fsd,
                    version: "0.1.0".into(),
                    state_schema: 1,
                    ring_protocol: Some(1),
                },
                RunningComponent {
                    name: ComponentName::Blockdev,
                    version: "0.1.0".into(),
                    state_schema: 1,
                    ring_protocol: Some(1),
                },
            ],
            fsd_transport: None,
            format_version: 1,
            last_sequence: Some(6),
        }
    }

    fn failed(m: &Manifest, s: &RunningSystem) -> Vec<String> {
        check_compatibility(m, s)
            .into_iter()
            .filter(|i| !i.passed)
            .map(|i| i.name)
            .collect()
    }

    #[test]
    fn sample_applies_to_the_running_system() {
        let m = Manifest::parse(&sample()).unwrap();
        let items = check_compatibility(&m, &system());
        assert!(items.iter().all(|i| i.passed), "{items:#?}");
        assert_eq!(items.len(), 4);
    }

    #[test]
    fn each_mismatch_fails_its_item() {
        let m = Manifest::parse(&sample()).unwrap();
        let mut s = system();
        s.last_sequence = Some(7);
        s.components[1].version = "0.0.9".into();
        s.components[1].state_schema = 3;
        assert_eq!(
            failed(&m, &s),
            ["sequence", "blockdev version", "blockdev state schema"]
        );
        s.components.pop();
        assert_eq!(failed(&m, &s), ["sequence", "blockdev version"]);
    }

    #[test]
    fn ring_protocol_must_agree_after_the_update() {
        let mut m = Manifest::parse(&sample()).unwrap();
        m.components[0].ring_protocol = Some(2);
        assert_eq!(failed(&m, &system()), ["ring protocol"]);
        let mut fsd = m.components[0].clone();
        fsd.name = ComponentName::Fsd;
        m.components.push(fsd);
        assert!(failed(&m, &system()).is_empty());
    }

    #[test]
    fn fsd_is_not_replaced_live_over_io_uring() {
        let mut m = Manifest::parse(&sample()).unwrap();
        let mut fsd = m.components[0].clone();
        fsd.name = ComponentName::Fsd;
        m.components = vec![fsd];
        let mut s = system();
        s.fsd_transport = Some("dev".into());
        assert!(failed(&m, &s).is_empty());
        s.fsd_transport = Some("uring".into());
        assert_eq!(failed(&m, &s), ["fsd transport"]);
        let item = check_compatibility(&m, &s)
            .into_iter()
            .find(|i| i.name == "fsd transport")
            .unwrap();
        assert!(item.detail.contains("ECANCELED"), "{}", item.detail);
        // A package that leaves fsd alone is not concerned.
        let m = Manifest::parse(&sample()).unwrap();
        assert!(failed(&m, &s).is_empty());
    }

    #[test]
    fn format_and_liveness() {
        let mut m = Manifest::parse(&sample()).unwrap();
        m.format = Some(crate::manifest::FormatChange { from: 2, to: 3 });
        m.package.live = false;
        m.package.reason = Some("breaks st_ino".into());
        let items = check_compatibility(&m, &system());
        assert_eq!(failed(&m, &system()), ["live", "format"]);
        assert_eq!(items[0].detail, "not live-updatable: breaks st_ino");
    }
}
