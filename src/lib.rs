//! fedquic: federated learning over QUIC with mutual TLS.
pub use fedquic_aggregator as aggregator;
pub use fedquic_client as client;
pub use fedquic_net as net;
pub use fedquic_privacy as privacy;
pub use fedquic_protocol as protocol;
pub use fedquic_sim as sim;
pub use fedquic_train as train;
