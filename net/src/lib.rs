//! fedquic transport: the PKI (certificate generation with rcgen), mutual-TLS
//! configurations for quinn/rustls, UDP endpoints tuned for many connections,
//! and framed I/O of the `fedquic/1` protocol over QUIC streams.
//!
//! The protocol crate stays pure (bytes in, messages out); this crate is the
//! thin async layer that moves those bytes over real connections, shared by
//! the aggregator, the client and the simulator.

pub mod admission;
pub mod cid;
pub mod endpoint;
pub mod files;
pub mod io;
pub mod mem;
pub mod pki;
pub mod revocation;
pub mod tls;
