//! Molt's integration tests: one binary, one module per area. Tests that mount FUSE need
//! root; every mount is undone by a guard, and every test has a deadline.

#![forbid(unsafe_code)]

mod bench_quick;
mod conventions;
mod convert;
mod crash;
mod fio;
mod layering;
mod live;
mod modules;
mod mount;
mod namespace;
mod nbd;
mod permissions;
mod pjdfstest;
mod posix;
mod supervisor;
mod transport;
