//! fedquic simulator: an aggregator and many clients in one process, over
//! real QUIC with mutual TLS on 127.0.0.1, driving the same library code
//! paths as the `fedquic-aggregator` and `fedquic-client` binaries.
//!
//! A simulated client is its data partition (a list of indices into shared
//! datasets) plus a connection; its model exists only while it trains, so
//! thousands of clients cost little.

pub mod bench;
pub mod faults;
pub mod flood;
pub mod pki;
pub mod population;
pub mod relay;
pub mod report;
pub mod simulate;
pub mod sweep;

pub use simulate::{SimConfig, SimResult, simulate};
