//! End-to-end federated runs over real QUIC on 127.0.0.1 with mutual TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedquic::aggregator::EngineConfig;
use fedquic::aggregator::server::{CentralEval, RunSummary, Server, ServerSetup};
use fedquic::client::{Backoff, ClientError, ClientOptions, LocalTrainer, run_client};
use fedquic::net::pki::CertAuthority;
use fedquic::net::tls::{self, Identity, TransportSettings};
use fedquic::protocol::FitInstructions;
use fedquic::train::layout::ParamLayout;
use fedquic::train::{DataSpec, Dataset, Model, PartitionScheme, partition};

const MODEL: &str = "mlp:784-32-10";

struct Federation {
    ca: CertAuthority,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<Result<RunSummary, fedquic::aggregator::ServerError>>,
    train: Arc<Dataset>,
    test: Arc<Dataset>,
    parts: Vec<Vec<usize>>,
    initial_accuracy: f32,
}

async fn start(clients: usize, rounds: u64) -> Federation {
    let (train, test) = "synthetic:1500/500:3"
        .parse::<DataSpec>()
        .unwrap()
        .load()
        .unwrap();
    let parts = partition(&train.labels, clients, &PartitionScheme::Iid, 1).unwrap();
    let layout: ParamLayout = MODEL.parse().unwrap();
    let spec = layout.model_spec().unwrap().clone();
    let initial = layout.initial_parameters(5).unwrap();
    let mut probe = Model::try_new(spec.clone(), 5).unwrap();
    probe.set_parameters(&initial).unwrap();
    let initial_accuracy = probe.evaluate_all(&test).unwrap().accuracy;

    let ca = CertAuthority::generate("test CA").unwrap();
    let server_cert = ca.issue_server(&["localhost".to_string()]).unwrap();
    let tls = tls::server_config(
        tls::load_ca_pem(ca.cert_pem()).unwrap(),
        Identity::from_pem(&server_cert.cert_pem, &server_cert.key_pem).unwrap(),
        &TransportSettings::default(),
    )
    .unwrap();
    let test = Arc::new(test);
    let engine = EngineConfig {
        rounds,
        fraction_fit: 1.0,
        min_fit_clients: clients,
        max_fit_clients: clients,
        min_available_clients: clients,
        round_deadline: Duration::from_secs(60),
        fit: FitInstructions {
            epochs: 2,
            batch_size: 10,
            learning_rate: 0.1,
            proximal_mu: 0.0,
            seed: 2,
            optimizer: Default::default(),
        },
        fraction_evaluate: 0.0,
        min_evaluate_clients: 0,
        max_round_retries: 0,
        seed: 3,
        one_task_per_connection: false,
        updates: Default::default(),
        strategy: Default::default(),
    };
    let setup = ServerSetup {
        central_eval: Some(CentralEval {
            model: Model::try_new(spec, 0).unwrap(),
            test: Arc::clone(&test),
        }),
        max_clients: 100,
        max_inflight_updates: 2,
        ..ServerSetup::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            tls,
            engine,
            &layout,
            initial,
        )
    };
    let server = Server::bind(setup).unwrap();
    let addr = server.local_addr().unwrap();
    let server = tokio::spawn(server.run(std::future::pending()));
    Federation {
        ca,
        addr,
        server,
        train: Arc::new(train),
        test,
        parts,
        initial_accuracy,
    }
}

fn options(addr: SocketAddr, tls: quinn::ClientConfig, max_attempts: u32) -> ClientOptions {
    ClientOptions {
        server: addr,
        server_name: "localhost".into(),
        tls,
        backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(200), 1),
        max_attempts: Some(max_attempts),
        connect_timeout: Duration::from_secs(10),
        handshake_timeout: fedquic::client::DEFAULT_HANDSHAKE_TIMEOUT,
        training_slots: None,
        endpoint: None,
        limits: Default::default(),
        codecs: Default::default(),
        privacy_seed: None,
        max_fit_tasks: None,
    }
}

impl Federation {
    fn honest_client(
        &self,
        index: usize,
    ) -> tokio::task::JoinHandle<Result<fedquic::client::ClientReport, ClientError>> {
        let issued = self.ca.issue_client(&format!("client-{index:03}")).unwrap();
        let tls = tls::client_config(
            tls::load_ca_pem(self.ca.cert_pem()).unwrap(),
            Some(Identity::from_pem(&issued.cert_pem, &issued.key_pem).unwrap()),
            &TransportSettings::default(),
        )
        .unwrap();
        let trainer = LocalTrainer::new(
            Arc::clone(&self.train),
            self.parts[index - 1].clone(),
            Arc::clone(&self.test),
            (0..self.test.len()).collect(),
        );
        tokio::spawn(run_client(options(self.addr, tls, 10), trainer))
    }

    fn stranger(
        &self,
        identity: Option<Identity>,
    ) -> tokio::task::JoinHandle<Result<fedquic::client::ClientReport, ClientError>> {
        let tls = tls::client_config(
            tls::load_ca_pem(self.ca.cert_pem()).unwrap(),
            identity,
            &TransportSettings::default(),
        )
        .unwrap();
        let trainer = LocalTrainer::new(
            Arc::clone(&self.train),
            vec![0, 1, 2],
            Arc::clone(&self.test),
            vec![0],
        );
        tokio::spawn(run_client(options(self.addr, tls, 3), trainer))
    }
}

async fn within<T>(secs: u64, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .expect("timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_clients_three_rounds_accuracy_rises() {
    let fed = start(5, 3).await;
    let clients: Vec<_> = (1..=5).map(|i| fed.honest_client(i)).collect();
    let summary = within(120, fed.server).await.unwrap().unwrap();
    for c in clients {
        let report = within(30, c).await.unwrap().unwrap();
        assert_eq!(report.fit_tasks, 3, "every client trained every round");
    }
    assert!(summary.finished);
    assert_eq!(summary.rounds_completed, 3);
    let acc: Vec<f64> = summary
        .records
        .iter()
        .map(|r| r.test_accuracy.unwrap())
        .collect();
    assert_eq!(acc.len(), 3);
    for r in &summary.records {
        assert_eq!(r.outcome.clients_answered, 5);
        assert_eq!(r.outcome.clients_dropped, 0);
        assert!(r.bytes_up > 0 && r.bytes_down > 0);
    }
    assert!(
        acc[0] > fed.initial_accuracy as f64 + 0.1 && acc[2] > acc[0],
        "accuracy must rise: initial {} then {acc:?}",
        fed.initial_accuracy
    );
    assert!(
        acc[2] > 0.5,
        "three rounds of FedAvg should learn the synthetic digits: {acc:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_and_honest_clients_finish() {
    let fed = start(2, 2).await;
    // A client with no certificate at all, and one whose certificate comes
    // from another CA, connect while the honest clients work.
    let no_cert = fed.stranger(None);
    let other_ca = CertAuthority::generate("rogue CA").unwrap();
    let rogue = other_ca.issue_client("client-001").unwrap();
    let foreign = fed.stranger(Some(
        Identity::from_pem(&rogue.cert_pem, &rogue.key_pem).unwrap(),
    ));
    let honest: Vec<_> = (1..=2).map(|i| fed.honest_client(i)).collect();

    for (what, handle) in [("no certificate", no_cert), ("foreign CA", foreign)] {
        let result = within(60, handle).await.unwrap();
        match result {
            Err(ClientError::GaveUp { attempts, .. }) => assert_eq!(attempts, 3, "{what}"),
            other => panic!("{what}: the aggregator must refuse this client, got {other:?}"),
        }
    }
    let summary = within(120, fed.server).await.unwrap().unwrap();
    assert!(summary.finished);
    assert_eq!(summary.rounds_completed, 2);
    for r in &summary.records {
        assert_eq!(
            r.outcome.clients_selected, 2,
            "only the honest clients were ever admitted"
        );
        assert_eq!(r.outcome.clients_answered, 2);
    }
    for h in honest {
        assert_eq!(within(30, h).await.unwrap().unwrap().fit_tasks, 2);
    }
}
