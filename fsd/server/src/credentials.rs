//! The credentials of the process a FUSE request comes from, as the kernel's permission
//! rules need them: the filesystem ids in the request header, and the supplementary groups
//! and capabilities only `/proc/<pid>/status` tells.
//!
//! Invariant: a caller whose status cannot be read (it exited, or the request came from
//! the kernel with pid 0) is treated as unprivileged and in no group beyond its fsgid, so
//! every decision taken on missing information is the one that grants least: set-id bits
//! are cleared, access is refused.

use std::io;

use formats::acl::Caller;

/// Capability numbers (linux/capability.h).
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;

/// The credentials of request sender `pid` whose header carried `uid`/`gid` (the fsuid
/// and fsgid the kernel checks with).
pub(crate) fn of_request(pid: u32, uid: u32, gid: u32) -> Caller {
    let unprivileged = Caller {
        uid,
        gid,
        groups: Vec::new(),
        cap_dac_override: false,
        cap_dac_read_search: false,
        cap_fowner: false,
        cap_fsetid: false,
    };
    if pid == 0 {
        return unprivileged;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => parse_status(&status, uid, gid).unwrap_or(unprivileged),
        Err(_) => unprivileged,
    }
}

/// Reads `Groups:` and `CapEff:` of a `/proc/<pid>/status` text. The header's ids win over
/// the status's: they are what the kernel used for this very request.
fn parse_status(status: &str, uid: u32, gid: u32) -> io::Result<Caller> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed /proc status");
    let mut groups = None;
    let mut caps = None;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("Groups:") {
            let list: Result<Vec<u32>, _> = rest.split_whitespace().map(str::parse).collect();
            groups = Some(list.map_err(|_| bad())?);
        } else if let Some(rest) = line.strip_prefix("CapEff:") {
            caps = Some(u64::from_str_radix(rest.trim(), 16).map_err(|_| bad())?);
        }
    }
    let (groups, caps) = (groups.ok_or_else(bad)?, caps.ok_or_else(bad)?);
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    Ok(Caller {
        uid,
        gid,
        groups,
        cap_dac_override: has(CAP_DAC_OVERRIDE),
        cap_dac_read_search: has(CAP_DAC_READ_SEARCH),
        cap_fowner: has(CAP_FOWNER),
        cap_fsetid: has(CAP_FSETID),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\n\
                          Groups:\t24 25 100 \nCapInh:\t0000000000000000\n\
                          CapEff:\t0000000000000010\n";

    #[test]
    fn groups_and_capabilities_come_from_the_status() {
        let c = parse_status(STATUS, 1000, 100).unwrap();
        assert_eq!(c.groups, vec![24, 25, 100]);
        assert!(c.cap_fsetid);
        assert!(!c.cap_dac_override && !c.cap_fowner && !c.cap_dac_read_search);
        assert!(c.in_group(25) && c.in_group(100) && !c.in_group(0));
    }

    #[test]
    fn a_malformed_status_is_refused() {
        assert!(parse_status("Groups:\tx\nCapEff:\t0\n", 1, 1).is_err());
        assert!(parse_status("Groups:\t1\n", 1, 1).is_err());
    }

    #[test]
    fn an_unknown_caller_is_unprivileged() {
        let c = of_request(0, 5, 6);
        assert!(!c.cap_fsetid && c.groups.is_empty() && c.in_group(6) && !c.in_group(7));
        let me = of_request(std::process::id(), 0, 0);
        assert_eq!(me.uid, 0);
    }
}
