//! Shared helpers for the end-to-end tests: an aggregator on 127.0.0.1 with
//! a `vector:N` model (so every expected global model can be computed by
//! hand), deterministic trainers, and raw protocol clients that misbehave.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use fedquic::aggregator::EngineConfig;
use fedquic::aggregator::server::{RunSummary, Server, ServerError, ServerSetup};
use fedquic::client::{
    Backoff, ClientError, ClientOptions, ClientReport, EvalOutcome, FitOutcome, Trainer,
    TrainerError, run_client,
};
use fedquic::net::io::{read_message, read_tensor_body, read_tensor_header, write_message};
use fedquic::net::pki::CertAuthority;
use fedquic::net::tls::{self, Identity, TransportSettings};
use fedquic::protocol::{
    Codec, FitInstructions, FitTask, Hello, Message, SUPPORTED_VERSIONS, TensorHeader,
    TensorLimits, Welcome,
};
use fedquic::train::layout::ParamLayout;
use rustls::pki_types::CertificateRevocationListDer;
use tokio::task::JoinHandle;

pub const PARAMS: usize = 64;

pub async fn within<T>(secs: u64, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .expect("timed out")
}

pub fn engine(clients: usize, min_fit: usize, rounds: u64, deadline: Duration) -> EngineConfig {
    EngineConfig {
        rounds,
        fraction_fit: 1.0,
        min_fit_clients: min_fit,
        max_fit_clients: 1000,
        min_available_clients: clients,
        round_deadline: deadline,
        fit: FitInstructions {
            epochs: 1,
            batch_size: 1,
            learning_rate: 1.0,
            proximal_mu: 0.0,
            seed: 0,
            optimizer: Default::default(),
        },
        fraction_evaluate: 0.0,
        min_evaluate_clients: 0,
        updates: Default::default(),
        strategy: Default::default(),
        max_round_retries: 2,
        seed: 9,
        one_task_per_connection: false,
    }
}

pub struct Options {
    pub engine: EngineConfig,
    pub allowlist: Option<HashSet<String>>,
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    pub max_clients: usize,
    pub transport: TransportSettings,
    /// Changes to the server setup beyond the above (timeouts, pool size).
    pub adjust: fn(&mut ServerSetup),
    pub admission: std::sync::Arc<fedquic::net::admission::Admission>,
}

impl Options {
    pub fn new(engine: EngineConfig) -> Self {
        Options {
            engine,
            allowlist: None,
            crls: Vec::new(),
            max_clients: 1000,
            transport: TransportSettings::aggregator(),
            adjust: |_| {},
            admission: Default::default(),
        }
    }
}

pub struct Aggregator {
    pub addr: SocketAddr,
    pub task: JoinHandle<Result<RunSummary, ServerError>>,
}

pub fn start(ca: &CertAuthority, opts: Options) -> Aggregator {
    start_on(ca, opts, SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// An aggregator on a given address (to restart one where clients expect it).
pub fn start_on(ca: &CertAuthority, opts: Options, listen: SocketAddr) -> Aggregator {
    let server = bind(ca, opts, listen);
    let addr = server.local_addr().unwrap();
    Aggregator {
        addr,
        task: tokio::spawn(server.run(std::future::pending())),
    }
}

/// The server shell driving `coordinator` instead of the round engine.
pub fn start_with(
    ca: &CertAuthority,
    opts: Options,
    coordinator: Box<dyn fedquic::aggregator::Coordinator>,
) -> Aggregator {
    let server = bind(ca, opts, SocketAddr::from(([127, 0, 0, 1], 0)));
    let addr = server.local_addr().unwrap();
    Aggregator {
        addr,
        task: tokio::spawn(server.run_with(coordinator, std::future::pending())),
    }
}

fn bind(ca: &CertAuthority, opts: Options, listen: SocketAddr) -> Server {
    let layout = ParamLayout::Vector(PARAMS);
    let server_cert = ca.issue_server(&["localhost".to_string()]).unwrap();
    let (tls, revocation) = tls::server_config_reloadable(
        tls::load_ca_pem(ca.cert_pem()).unwrap(),
        Identity::from_pem(&server_cert.cert_pem, &server_cert.key_pem).unwrap(),
        opts.crls,
        &opts.transport,
    )
    .unwrap();
    let mut setup = ServerSetup {
        max_clients: opts.max_clients,
        max_inflight_updates: 2,
        handshake_timeout: Duration::from_secs(5),
        allowlist: opts.allowlist,
        admission: opts.admission,
        revocation: Some(revocation),
        ..ServerSetup::new(listen, tls, opts.engine, &layout, vec![0.0; PARAMS])
    };
    (opts.adjust)(&mut setup);
    Server::bind(setup).unwrap()
}

pub fn client_tls(ca: &CertAuthority, identity: Option<Identity>) -> quinn::ClientConfig {
    tls::client_config(
        tls::load_ca_pem(ca.cert_pem()).unwrap(),
        identity,
        &TransportSettings::default(),
    )
    .unwrap()
}

pub fn identity(ca: &CertAuthority, name: &str) -> Identity {
    let issued = ca.issue_client(name).unwrap();
    Identity::from_pem(&issued.cert_pem, &issued.key_pem).unwrap()
}

/// Adds `delta` (or `per_param(i)` to parameter `i`, when set) to every
/// parameter and claims `examples` training examples.
pub struct DeltaTrainer {
    pub delta: f32,
    pub per_param: Option<fn(usize) -> f32>,
    pub examples: u64,
    /// Time "training" takes.
    pub delay: Duration,
    pub params: Vec<f32>,
    /// Local training examples, as a real trainer reports them (None: unknown).
    pub local_examples: Option<usize>,
}

impl DeltaTrainer {
    pub fn new(delta: f32, examples: u64) -> Self {
        DeltaTrainer {
            delta,
            per_param: None,
            examples,
            delay: Duration::ZERO,
            params: Vec::new(),
            local_examples: None,
        }
    }
}

impl Trainer for DeltaTrainer {
    fn prepare(&mut self, _layout: &ParamLayout) -> Result<(), TrainerError> {
        Ok(())
    }
    fn parameters(&self) -> &[f32] {
        &self.params
    }
    fn set_parameters(&mut self, params: &[f32]) -> Result<(), TrainerError> {
        self.params = params.to_vec();
        Ok(())
    }
    fn fit(&mut self, _config: &FitInstructions) -> Result<FitOutcome, TrainerError> {
        std::thread::sleep(self.delay);
        for (i, p) in self.params.iter_mut().enumerate() {
            *p += self.per_param.map_or(self.delta, |f| f(i));
        }
        Ok(FitOutcome {
            examples: self.examples,
            metrics: vec![("loss".into(), 1.0)],
        })
    }
    fn evaluate(&mut self) -> Result<EvalOutcome, TrainerError> {
        Ok(EvalOutcome {
            examples: self.examples,
            loss: 1.0,
            accuracy: 0.5,
        })
    }
    fn training_examples(&self) -> Option<usize> {
        self.local_examples
    }
}

pub fn options(addr: SocketAddr, tls: quinn::ClientConfig, max_attempts: u32) -> ClientOptions {
    ClientOptions {
        server: addr,
        server_name: "localhost".into(),
        tls,
        backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(200), 1),
        max_attempts: Some(max_attempts),
        connect_timeout: Duration::from_secs(5),
        handshake_timeout: fedquic::client::DEFAULT_HANDSHAKE_TIMEOUT,
        training_slots: None,
        endpoint: None,
        limits: Default::default(),
        codecs: Default::default(),
        privacy_seed: None,
        max_fit_tasks: None,
    }
}

pub fn honest(
    ca: &CertAuthority,
    addr: SocketAddr,
    name: &str,
    delta: f32,
    examples: u64,
) -> JoinHandle<Result<ClientReport, ClientError>> {
    slow(ca, addr, name, DeltaTrainer::new(delta, examples))
}

pub fn slow(
    ca: &CertAuthority,
    addr: SocketAddr,
    name: &str,
    trainer: DeltaTrainer,
) -> JoinHandle<Result<ClientReport, ClientError>> {
    let tls = client_tls(ca, Some(identity(ca, name)));
    tokio::spawn(run_client(options(addr, tls, 20), trainer))
}

/// A hand-driven protocol session, for clients that misbehave on purpose.
pub struct Raw {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub endpoint: quinn::Endpoint,
}

pub enum Opened {
    Welcome(Raw, Box<Welcome>),
    Refused(String),
}

pub async fn open_raw(addr: SocketAddr, tls: quinn::ClientConfig, versions: Vec<u16>) -> Opened {
    let endpoint = fedquic::net::endpoint::client_endpoint_for(addr, tls.clone()).unwrap();
    let conn = match endpoint.connect(addr, "localhost").unwrap().await {
        Ok(c) => c,
        Err(e) => return Opened::Refused(format!("handshake: {e}")),
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return Opened::Refused(format!("open: {e}")),
    };
    let hello = Hello {
        versions,
        codecs: vec![Codec::F32],
        agent: "raw-test".into(),
        backend: "cpu".into(),
    };
    if let Err(e) = write_message(&mut send, &Message::Hello(hello)).await {
        return Opened::Refused(format!("write: {e}"));
    }
    match read_message(&mut recv).await {
        Ok(Some(Message::Welcome(w))) => Opened::Welcome(
            Raw {
                conn,
                send,
                recv,
                endpoint,
            },
            Box::new(w),
        ),
        Ok(Some(Message::Reject(r))) => Opened::Refused(format!(
            "reject: {} (retry {:?})",
            r.reason, r.retry_after_ms
        )),
        other => Opened::Refused(format!("read: {other:?}")),
    }
}

pub async fn raw_welcome(ca: &CertAuthority, addr: SocketAddr, name: &str) -> Raw {
    match open_raw(
        addr,
        client_tls(ca, Some(identity(ca, name))),
        SUPPORTED_VERSIONS.to_vec(),
    )
    .await
    {
        Opened::Welcome(raw, _) => raw,
        Opened::Refused(why) => panic!("{name} refused: {why}"),
    }
}

impl Raw {
    /// Waits for the next fit task and reads its global model.
    pub async fn next_fit(&mut self) -> (FitTask, Vec<f32>) {
        loop {
            match read_message(&mut self.recv).await.unwrap() {
                Some(Message::FitTask(task)) => {
                    let mut stream = self.conn.accept_uni().await.unwrap();
                    let header =
                        read_tensor_header(&mut stream, &TensorLimits::for_model(PARAMS as u64))
                            .await
                            .unwrap();
                    let mut model = vec![0f32; PARAMS];
                    read_tensor_body(&mut stream, &header, &mut model)
                        .await
                        .unwrap();
                    return (task, model);
                }
                Some(_) => continue,
                None => panic!("session ended before a fit task"),
            }
        }
    }

    /// The next control message that is not a heartbeat.
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            match read_message(&mut self.recv).await {
                Ok(Some(Message::Heartbeat)) => continue,
                Ok(m) => return m,
                Err(_) => return None,
            }
        }
    }
}

pub fn update_header(task: &FitTask, examples: u64) -> TensorHeader {
    TensorHeader {
        kind: fedquic::protocol::StreamKind::Update,
        round: task.round,
        task_id: task.task_id,
        codec: Codec::F32,
        tensors: ParamLayout::Vector(PARAMS).wire_layout(),
        num_examples: examples,
        metrics: Vec::new(),
        body_len: PARAMS as u64 * 4,
    }
}

/// A server endpoint with a valid aggregator certificate from `ca`.
pub fn hostile_endpoint(ca: &CertAuthority) -> (quinn::Endpoint, SocketAddr) {
    let server = ca.issue_server(&["localhost".to_string()]).unwrap();
    let config = tls::server_config(
        tls::load_ca_pem(ca.cert_pem()).unwrap(),
        Identity::from_pem(&server.cert_pem, &server.key_pem).unwrap(),
        &TransportSettings::default(),
    )
    .unwrap();
    let endpoint =
        fedquic::net::endpoint::server_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), config)
            .unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

/// Tells a client the run is complete (a finished `Bye`) and closes the
/// control stream; the client then leaves.
pub async fn say_the_run_is_over(send: &mut quinn::SendStream) {
    write_message(
        send,
        &Message::Bye {
            reason: "done".into(),
            finished: true,
        },
    )
    .await
    .unwrap();
    let _ = send.finish();
}

/// Accepts one client session: returns its connection and control stream
/// after answering its Hello with a Welcome for `model_spec`.
pub async fn welcome(
    endpoint: &quinn::Endpoint,
    model_spec: &str,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let conn = endpoint.accept().await.unwrap().await.unwrap();
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    assert!(matches!(
        read_message(&mut recv).await.unwrap(),
        Some(Message::Hello(_))
    ));
    let welcome = Welcome {
        version: fedquic::protocol::PROTOCOL_VERSION,
        uplink: Codec::F32,
        downlink: Codec::F32,
        model_spec: model_spec.to_string(),
        client_name: "client-001".into(),
        run: "hostile-run".into(),
    };
    write_message(&mut send, &Message::Welcome(welcome))
        .await
        .unwrap();
    (conn, send, recv)
}
