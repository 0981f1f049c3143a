//! Tests across real `tidepool` processes: regions, residency and failover on loopback
//! (`regions`), and a scaled-out deployment on several hosts made of network namespaces
//! (`multihost`). One test binary, so the process harness is shared.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test helpers outside #[test] fns fail loudly; each scenario reads top to bottom"
)]

mod harness;
mod multihost;
mod netns;
mod regions;
mod remote_cli;
