//! The PKI commands as a user runs them.

use std::process::Command;

fn aggregator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedquic-aggregator"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn certs_init_client_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let ca = dir.path().join("certs-ca");
    let printed = run_ok(
        aggregator()
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .args(["--clients", "2"]),
    );
    assert!(printed.contains("keep it offline"), "{printed}");
    for f in ["ca.pem", "ca.key"] {
        assert!(ca.join(f).exists(), "{f}");
    }
    for f in [
        "ca.pem",
        "server.pem",
        "server.key",
        "clients/client-001/ca.pem",
        "clients/client-001/client-001.pem",
        "clients/client-002/client-002.key",
    ] {
        assert!(certs.join(f).exists(), "{f}");
    }
    assert!(
        !certs.join("ca.key").exists(),
        "the CA key is not deployable"
    );
    run_ok(
        aggregator()
            .args(["certs", "client", "--dir"])
            .arg(&certs)
            .args(["--name", "hospital-7"]),
    );
    let bundle = certs.join("clients/hospital-7");
    assert!(bundle.join("hospital-7.pem").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bundle.join("hospital-7.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    for bad in ["../evil", "crl", "ca"] {
        let err = run_err(
            aggregator()
                .args(["certs", "client", "--dir"])
                .arg(&certs)
                .args(["--name", bad]),
        );
        assert!(err.contains("invalid client name"), "{bad}: {err}");
    }
    assert!(!certs.join("crl.pem").exists());

    run_ok(
        aggregator()
            .args(["certs", "revoke", "--dir"])
            .arg(&certs)
            .args(["--name", "client-002"]),
    );
    assert!(
        std::fs::read_to_string(certs.join("crl.pem"))
            .unwrap()
            .contains("BEGIN X509 CRL")
    );
    let again = run_err(
        aggregator()
            .args(["certs", "revoke", "--dir"])
            .arg(&certs)
            .args(["--name", "client-002"]),
    );
    assert!(again.contains("already revoked"), "{again}");

    // By serial: the current client-001 certificate, spelled as openssl does.
    let pem = std::fs::read_to_string(certs.join("clients/client-001/client-001.pem")).unwrap();
    let serial = fedquic_net::pki::cert_serial(&pem).unwrap();
    let hex: String = serial.iter().map(|b| format!("{b:02X}")).collect();
    let printed = run_ok(
        aggregator()
            .args(["certs", "revoke", "--dir"])
            .arg(&certs)
            .args(["--serial", &hex]),
    );
    assert!(
        printed.contains(&fedquic_net::pki::serial_hex(&serial)),
        "{printed}"
    );
    let again = run_err(
        aggregator()
            .args(["certs", "revoke", "--dir"])
            .arg(&certs)
            .args(["--serial", &hex]),
    );
    assert!(again.contains("already revoked"), "{again}");
    let bad = run_err(
        aggregator()
            .args(["certs", "revoke", "--dir"])
            .arg(&certs)
            .args(["--serial", "not-hex"]),
    );
    assert!(bad.contains("invalid serial"), "{bad}");
    let record = std::fs::read_to_string(ca.join("revoked.txt")).unwrap();
    assert_eq!(record.lines().count(), 2);
}

/// Writes a config that keeps the aggregator waiting for clients (so it
/// runs until killed) on `port`, with certificates from `certs`.
fn waiting_config(dir: &std::path::Path, certs: &std::path::Path, port: u16) -> std::path::PathBuf {
    let config = dir.join("waiting.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\n[certs]\ndir = {certs:?}\n[model]\nspec = \"vector:16\"\n\
             [rounds]\ncount = 1\nmin_available_clients = 100\nmin_fit_clients = 100\n\
             [evaluate]\ntest_data = \"\"\n[state]\ndir = {:?}\n",
            dir.join("state")
        ),
    )
    .unwrap();
    config
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running aggregator process whose stderr goes to a file; killed on drop.
struct Running {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Running {
    fn start(config: &std::path::Path, log: std::path::PathBuf, extra: &[&str]) -> Running {
        let child = aggregator()
            .args(["run", "--config"])
            .arg(config)
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let running = Running { child, log };
        running.wait_for_log("aggregator listening");
        running
    }

    fn wait_for_log(&self, text: &str) {
        let start = std::time::Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(text) {
                return;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "no {text:?} in the aggregator's log:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn aggregator_refuses_a_certs_dir_holding_the_ca_key() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    run_ok(
        aggregator()
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .args(["--clients", "0"]),
    );
    // The old habit: everything in one directory.
    std::fs::copy(dir.path().join("certs-ca/ca.key"), certs.join("ca.key")).unwrap();
    let config = waiting_config(dir.path(), &certs, free_udp_port());
    let err = run_err(aggregator().args(["run", "--config"]).arg(&config));
    assert!(err.contains("CA's private key"), "{err}");
    assert!(err.contains("--allow-ca-key"), "{err}");
    // Told to, it starts.
    let running = Running::start(&config, dir.path().join("allowed.log"), &["--allow-ca-key"]);
    let log = std::fs::read_to_string(&running.log).unwrap();
    assert!(log.contains("--allow-ca-key"), "it warns: {log}");
    drop(running);

    // A crl.pem that holds no CRL (empty, truncated) stops the start too.
    std::fs::remove_file(certs.join("ca.key")).unwrap();
    std::fs::write(certs.join("crl.pem"), "").unwrap();
    let err = run_err(aggregator().args(["run", "--config"]).arg(&config));
    assert!(err.contains("no certificate revocation list"), "{err}");
}

/// A client's open session.
struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// The control stream: dropping it would end the session.
    _control: (quinn::SendStream, quinn::RecvStream),
}

/// A session over QUIC with mutual TLS using a client bundle, once the
/// aggregator answered Hello with Welcome; `None` when it refused.
async fn session(
    addr: std::net::SocketAddr,
    bundle: &std::path::Path,
    name: &str,
) -> Option<Session> {
    use fedquic_net::tls::{self, Identity, TransportSettings};
    use fedquic_protocol::{Codec, Hello, Message, SUPPORTED_VERSIONS};
    let identity = Identity::from_files(
        &bundle.join(format!("{name}.pem")),
        &bundle.join(format!("{name}.key")),
    )
    .unwrap();
    let config = tls::client_config(
        tls::load_ca_file(&bundle.join("ca.pem")).unwrap(),
        Some(identity),
        &TransportSettings::default(),
    )
    .unwrap();
    // A fresh endpoint per attempt: nothing from an earlier session helps.
    let endpoint = fedquic_net::endpoint::client_endpoint_for(addr, config).unwrap();
    let attempt = async {
        let conn = endpoint.connect(addr, "localhost").ok()?.await.ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        let hello = Hello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            codecs: vec![Codec::F32],
            agent: "sighup-test".into(),
            backend: "cpu".into(),
        };
        fedquic_net::io::write_message(&mut send, &Message::Hello(hello))
            .await
            .ok()?;
        let answer = fedquic_net::io::read_message(&mut recv).await.ok()?;
        matches!(answer, Some(Message::Welcome(_))).then_some((conn, (send, recv)))
    };
    let welcomed = tokio::time::timeout(std::time::Duration::from_secs(10), attempt)
        .await
        .expect("the probe ends in time");
    match welcomed {
        Some((conn, control)) => Some(Session {
            endpoint,
            conn,
            _control: control,
        }),
        None => {
            endpoint.wait_idle().await;
            None
        }
    }
}

/// Hello over QUIC with mutual TLS using a client bundle; true when welcomed.
async fn welcomed(addr: std::net::SocketAddr, bundle: &std::path::Path, name: &str) -> bool {
    match session(addr, bundle, name).await {
        Some(session) => {
            session.conn.close(0u32.into(), b"probe done");
            session.endpoint.wait_idle().await;
            true
        }
        None => false,
    }
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_the_crl_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    run_ok(
        aggregator()
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .args(["--clients", "2"]),
    );
    let port = free_udp_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let config = waiting_config(dir.path(), &certs, port);
    let running = Running::start(&config, dir.path().join("aggregator.log"), &[]);
    let bundle = |name: &str| certs.join("clients").join(name);
    assert!(welcomed(addr, &bundle("client-001"), "client-001").await);
    assert!(welcomed(addr, &bundle("client-002"), "client-002").await);
    // Sessions that stay connected across the reload.
    let held1 = session(addr, &bundle("client-001"), "client-001")
        .await
        .expect("client-001 welcomed");
    let held2 = session(addr, &bundle("client-002"), "client-002")
        .await
        .expect("client-002 welcomed");

    run_ok(
        aggregator()
            .args(["certs", "revoke", "--dir"])
            .arg(&certs)
            .args(["--name", "client-001"]),
    );
    // Not applied until the signal: the process still has the old list.
    assert!(welcomed(addr, &bundle("client-001"), "client-001").await);
    let status = Command::new("kill")
        .args(["-HUP", &running.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    running.wait_for_log("certificate revocation list reloaded");
    // The revoked client's open session is closed at the reload, not at its
    // next reconnect; the other one stays.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), held1.conn.closed())
        .await
        .expect("the revoked client's session is closed");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == fedquic_net::revocation::CERTIFICATE_CLOSE_CODE.into()),
        "{closed:?}"
    );
    assert!(
        held2.conn.close_reason().is_none(),
        "the other client was closed too"
    );
    assert!(
        !welcomed(addr, &bundle("client-001"), "client-001").await,
        "the revoked client got in after the reload"
    );
    assert!(welcomed(addr, &bundle("client-002"), "client-002").await);
    // Still the same process: SIGHUP did not restart or kill it.
    let mut child = running;
    assert!(child.child.try_wait().unwrap().is_none());
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[rounds]\ncount = 0\n").unwrap();
    let out = aggregator()
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rounds.count"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&config, "listne = 3\n").unwrap();
    let out = aggregator()
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = aggregator()
        .args(["run", "--certs"])
        .arg(dir.path().join("missing"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
