//! Who gets in: certificates from the CA only, not expired, not revoked,
//! on the allowlist when there is one, and no more than the cap (with a
//! "retry after" answer). An honest client still works throughout.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use fedquic::net::pki::{self, CertAuthority};
use fedquic::net::tls::Identity;
use fedquic::protocol::SUPPORTED_VERSIONS;

fn files(dirs: &pki::PkiDirs, name: &str) -> Identity {
    let [_, cert, key] = dirs.client_files(name);
    Identity::from_files(&cert, &key).unwrap()
}

async fn refusal(
    addr: std::net::SocketAddr,
    ca: &CertAuthority,
    identity: Option<Identity>,
) -> String {
    match open_raw(addr, client_tls(ca, identity), SUPPORTED_VERSIONS.to_vec()).await {
        Opened::Refused(why) => why,
        Opened::Welcome(..) => panic!("this client must be refused"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_valid_unrevoked_allowlisted_clients_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = pki::PkiDirs::new(&dir.path().join("certs"), None);
    pki::init_dir(&dirs, &["localhost".to_string()], 4, false).unwrap();
    let ca = CertAuthority::from_dir(&dirs.ca).unwrap();
    // client-003 is revoked through the CLI's code path (crl.pem).
    let crl_path = pki::revoke(&dirs, "client-003").unwrap();
    assert!(matches!(
        pki::revoke(&dirs, "client-003"),
        Err(pki::PkiError::AlreadyRevoked(_))
    ));
    let crls = fedquic::net::revocation::load_crl_file(&crl_path).unwrap();
    let now = SystemTime::now();
    let expired = ca
        .issue_client_with_validity(
            "client-005",
            now - Duration::from_secs(7 * 24 * 3600),
            now - Duration::from_secs(24 * 3600),
        )
        .unwrap();

    let mut opts = Options::new(engine(1, 1, 1, Duration::from_secs(20)));
    opts.crls = crls;
    opts.allowlist = Some(
        ["client-001", "client-003", "client-005"]
            .into_iter()
            .map(String::from)
            .collect(),
    );
    let agg = start(&ca, opts);

    let why = refusal(agg.addr, &ca, None).await;
    assert!(
        !why.contains("reject"),
        "no certificate fails in TLS: {why}"
    );
    let rogue = CertAuthority::generate("rogue CA")
        .unwrap()
        .issue_client("client-001")
        .unwrap();
    refusal(
        agg.addr,
        &ca,
        Some(Identity::from_pem(&rogue.cert_pem, &rogue.key_pem).unwrap()),
    )
    .await;
    refusal(
        agg.addr,
        &ca,
        Some(Identity::from_pem(&expired.cert_pem, &expired.key_pem).unwrap()),
    )
    .await;
    let why = refusal(agg.addr, &ca, Some(files(&dirs, "client-003"))).await;
    assert!(
        !why.contains("reject"),
        "a revoked certificate fails in TLS: {why}"
    );
    // A real client with a revoked or expired certificate stops with a
    // clear error instead of reconnecting for ever.
    for (identity, why) in [
        (files(&dirs, "client-003"), "certificate revoked"),
        (
            Identity::from_pem(&expired.cert_pem, &expired.key_pem).unwrap(),
            "certificate expired or not yet valid",
        ),
    ] {
        let tls = client_tls(&ca, Some(identity));
        let ended = within(
            20,
            fedquic::client::run_client(options(agg.addr, tls, 1000), DeltaTrainer::new(1.0, 4)),
        )
        .await;
        match ended {
            Err(fedquic::client::ClientError::CertificateRefused(reason)) => {
                assert_eq!(reason, why)
            }
            other => panic!("expected the certificate to be refused ({why}), got {other:?}"),
        }
    }
    let why = refusal(agg.addr, &ca, Some(files(&dirs, "client-002"))).await;
    assert!(
        why.contains("not on the aggregator's allowlist") && why.contains("retry None"),
        "{why}"
    );

    // The honest, allowlisted client is admitted and completes the run.
    let tls = client_tls(&ca, Some(files(&dirs, "client-001")));
    let honest = tokio::spawn(fedquic::client::run_client(
        options(agg.addr, tls, 5),
        DeltaTrainer::new(1.0, 4),
    ));
    let summary = within(30, agg.task).await.unwrap().unwrap();
    assert_eq!(summary.rounds_completed, 1);
    assert_eq!(
        summary.records[0].outcome.clients_selected, 1,
        "nobody else was admitted"
    );
    assert_eq!(within(10, honest).await.unwrap().unwrap().fit_tasks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_aggregator_says_retry_later_and_the_client_gets_in_when_there_is_room() {
    let ca = CertAuthority::generate("cap CA").unwrap();
    let mut opts = Options::new(engine(2, 2, 1, Duration::from_secs(20)));
    opts.max_clients = 1;
    let agg = start(&ca, opts);
    let first = raw_welcome(&ca, agg.addr, "first").await;
    let why = refusal(agg.addr, &ca, Some(identity(&ca, "second"))).await;
    assert!(
        why.contains("aggregator is full") && why.contains("retry Some(5000)"),
        "{why}"
    );
    // Room frees up when the first leaves; a client retrying gets in.
    first.conn.close(0u32.into(), b"leaving");
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    match open_raw(
        agg.addr,
        client_tls(&ca, Some(identity(&ca, "second"))),
        SUPPORTED_VERSIONS.to_vec(),
    )
    .await
    {
        Opened::Welcome(_, w) => assert_eq!(w.client_name, "second"),
        Opened::Refused(why) => panic!("there is room now: {why}"),
    }
    agg.task.abort();
}
