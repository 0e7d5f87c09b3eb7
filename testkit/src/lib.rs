//! Helpers shared by the integration tests (`tests/common`) and the load harness (`bench/`),
//! which both start `agentmeter` stage processes against the real services of
//! `deploy/local/services.sh`. Nothing here is part of the product.
//!
//! * [`free_port`]: loopback ports for the stages' listeners, unique within the process.
//! * [`broker::topic_deletion_is_safe`]: whether the local broker deletes only the topic it is
//!   asked to delete (tansu 0.6.0 from crates.io deletes them all).
//! * [`settings::IsolatedRun`] / [`settings::RunSettings`]: the names, directory, ports and
//!   settings file of one isolated run, and [`settings::tail`] for log excerpts.
//! * [`process`]: `agentmeter` run as a tool or started as a stage with its log.

pub mod broker;
pub mod process;
pub mod settings;

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// A TCP port on loopback that is free now and that no other caller in this process gets.
///
/// Why not bind port 0 and hand that out: the kernel picks port-0 binds from the ephemeral range,
/// the same range every outgoing connection (each Kafka and ClickHouse client) takes its source
/// port from, and a port released by one caller can come back to the next. CI once gave a test's
/// enricher and ingest the same port that way. These ports come from below the ephemeral range
/// (32768+ on Linux), each handed out once per process, starting at an offset derived from the
/// process id so that two processes running at once start far apart.
pub fn free_port() -> u16 {
    const FIRST_PORT: u32 = 20_000;
    const PORT_COUNT: u32 = 12_000;
    static HANDED_OUT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % PORT_COUNT;
    loop {
        let handed_out = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        assert!(
            handed_out < PORT_COUNT,
            "no free port left in {FIRST_PORT}..{}",
            FIRST_PORT + PORT_COUNT
        );
        let port = (FIRST_PORT + (start + handed_out) % PORT_COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::free_port;
    use std::collections::HashSet;

    #[test]
    fn ports_are_unique_within_the_process_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        assert!(ports.iter().all(|port| (20_000..32_000).contains(port)));
    }
}
