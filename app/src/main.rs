//! `vm-webapp` binary: parses the command line and hands over to the runtime.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: a `perf` profile of `serve` creating
/// runs on SQLite put about 12% of its CPU in glibc's allocator (arena locks,
/// chunk consolidation) across the Tokio workers and SQLite's thread.
/// Measured with `wrk -t1 -c32` as in `make bench`, three interleaved runs:
/// `POST /api/v2/runs` about 6.0k → 7.1k req/s, liveness about 48k → 51k.
/// Built without transparent huge pages (`no_thp`): with them, the peak RSS
/// of a worker holding 2,500 slow steps doubled (34.8 → 65.0 MB, `make
/// bench`); without, 33–40 MB, as with glibc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    vm_webapp::runtime::run(vm_webapp::cli::Cli::parse()).await
}
