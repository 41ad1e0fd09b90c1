//! Facts about this machine that update requirements are checked against.

/// Names of the io_uring opcodes the running kernel supports, from an io_uring probe.
pub fn io_uring_ops() -> Vec<String> {
    use io_uring::opcode;
    let known: &[(u8, &str)] = &[
        (opcode::Nop::CODE, "nop"),
        (opcode::Readv::CODE, "readv"),
        (opcode::Writev::CODE, "writev"),
        (opcode::Fsync::CODE, "fsync"),
        (opcode::ReadFixed::CODE, "read_fixed"),
        (opcode::WriteFixed::CODE, "write_fixed"),
        (opcode::Fallocate::CODE, "fallocate"),
        (opcode::Read::CODE, "read"),
        (opcode::Write::CODE, "write"),
    ];
    let Ok(ring) = io_uring::IoUring::new(2) else {
        return Vec::new();
    };
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return Vec::new();
    }
    known
        .iter()
        .filter(|(code, _)| probe.is_supported(*code))
        .map(|(_, name)| name.to_string())
        .collect()
}
