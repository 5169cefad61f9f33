//! Privacy for fedquic: what lets a client's update reach the aggregator
//! without the aggregator learning it, and what bounds what the final model
//! reveals about any one client.
//!
//! Pure like `fedquic-protocol`: no sockets, no clocks, every random choice
//! seeded. The aggregator's engine and the client's session drive it.

pub mod dp;
pub mod secagg;
