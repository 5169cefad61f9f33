//! The PKI commands as a user runs them.

use std::process::Command;

fn aggregator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedquic-aggregator"))
}

#[test]
fn certs_init_client_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = aggregator()
        .args(["certs", "init", "--dir"])
        .arg(&certs)
        .args(["--clients", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "client-001.pem",
        "client-002.key",
    ] {
        assert!(certs.join(f).exists(), "{f}");
    }
    let out = aggregator()
        .args(["certs", "client", "--dir"])
        .arg(&certs)
        .args(["--name", "hospital-7"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(certs.join("hospital-7.pem").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(certs.join("hospital-7.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let bad = aggregator()
        .args(["certs", "client", "--dir"])
        .arg(&certs)
        .args(["--name", "../evil"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let out = aggregator()
        .args(["certs", "revoke", "--dir"])
        .arg(&certs)
        .args(["--name", "client-002"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_to_string(certs.join("crl.pem"))
            .unwrap()
            .contains("BEGIN X509 CRL")
    );
    let again = aggregator()
        .args(["certs", "revoke", "--dir"])
        .arg(&certs)
        .args(["--name", "client-002"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already revoked"));
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
