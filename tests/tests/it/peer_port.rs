//! The peer (raft) port speaks mTLS only: plain TCP and plain HTTP get nothing back, and
//! a TLS client is refused unless it presents a certificate signed by the cluster CA.
//! A client with the node's own certificate gets an HTTP/2 answer, so the refusals are
//! the certificate check and not a broken port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use keel_cluster::tls;
use keel_tests::cluster::TestCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the peer port did with a client.
#[derive(Debug)]
enum Outcome {
    /// It sent application bytes back.
    Answered(Vec<u8>),
    /// It closed the connection without sending anything.
    Closed,
    /// The connection or the TLS session failed (the reason is printed).
    Failed(#[allow(dead_code)] String),
    /// Nothing happened within the timeout.
    Silent,
}

const TIMEOUT: Duration = Duration::from_secs(3);
/// The HTTP/2 connection preface followed by an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

async fn read_some<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Outcome {
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(TIMEOUT, s.read(&mut buf)).await {
        Err(_) => Outcome::Silent,
        Ok(Ok(0)) => Outcome::Closed,
        Ok(Ok(n)) => Outcome::Answered(buf[..n].to_vec()),
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
    }
}

/// Plain TCP: sends `bytes`, reads what comes back.
async fn plain(addr: SocketAddr, bytes: &[u8]) -> Result<Outcome> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    Ok(read_some(&mut s).await)
}

/// A TLS client trusting the cluster CA, presenting `cert` (chain PEM, key PEM) if any,
/// that sends the HTTP/2 preface and reads the answer.
async fn tls_client(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
    cert: Option<(&str, &str)>,
) -> Result<Outcome> {
    let mut roots = rustls::RootCertStore::empty();
    for c in tls::parse_certs(ca_pem, "CA")? {
        roots.add(c)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(tls::parse_certs(chain, "client")?, tls::parse_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
    let mut s = match tokio::time::timeout(TIMEOUT, connector.connect(name, tcp)).await {
        Err(_) => return Ok(Outcome::Silent),
        Ok(Err(e)) => return Ok(Outcome::Failed(format!("handshake: {e}"))),
        Ok(Ok(s)) => s,
    };
    // TLS 1.3: the client finishes its side before the server has checked the client
    // certificate; a refusal shows up as an alert on the first read.
    if let Err(e) = s.write_all(H2_PREFACE).await {
        return Ok(Outcome::Failed(format!("write: {e}")));
    }
    let _ = s.flush().await;
    Ok(read_some(&mut s).await)
}

fn refused(what: &str, o: &Outcome) {
    eprintln!("{what}: {o:?}");
    match o {
        Outcome::Answered(bytes) => panic!(
            "{what}: the peer port answered {:?}",
            String::from_utf8_lossy(bytes)
        ),
        Outcome::Closed | Outcome::Failed(_) | Outcome::Silent => {}
    }
}

#[tokio::test]
async fn the_peer_port_refuses_plain_tcp_http_and_foreign_certificates() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = TestCluster::form(1).await?;
    let init = c.init_output().expect("init ran");
    let addr = c.peer_addr(0);
    let server_name = format!("node-{}.keel", init.node_id);

    // Plain TCP and HTTP/1.1: no application answer (at most a TLS alert record).
    for (what, bytes) in [
        ("plain TCP", &b"hello keel\r\n\r\n"[..]),
        ("HTTP/1.1", &b"GET / HTTP/1.1\r\nHost: keel\r\n\r\n"[..]),
        ("cleartext HTTP/2", H2_PREFACE),
    ] {
        let o = plain(addr, bytes).await?;
        eprintln!("{what}: {o:?}");
        if let Outcome::Answered(b) = &o {
            assert!(!b.starts_with(b"HTTP/"), "{what}: HTTP answer {b:?}");
            assert_eq!(b[0], 0x15, "{what}: not a TLS alert record: {b:?}");
        }
    }

    // The positive control: the node's own certificate is accepted.
    let tls_dir = c.data_dir(0).join("tls");
    let read =
        |f: &str| std::fs::read_to_string(tls_dir.join(f)).with_context(|| format!("read tls/{f}"));
    let (own_chain, own_key) = (read("node.pem")?, read("node.key")?);
    let o = tls_client(
        addr,
        &server_name,
        &init.ca_pem,
        Some((&own_chain, &own_key)),
    )
    .await?;
    assert!(
        matches!(&o, Outcome::Answered(b) if b.len() >= 9 && b[3] == 0x04),
        "a cluster certificate must get an HTTP/2 SETTINGS frame: {o:?}"
    );

    // A certificate from another CA (same node id and address, so only the CA differs).
    let other_ca = tls::generate_ca("other")?;
    let (key, csr) = tls::generate_node_key()?;
    let leaf = tls::sign_node_cert(&other_ca, &csr, init.node_id, &[addr.ip()])?;
    let chain = format!("{leaf}{}", other_ca.cert_pem);
    let o = tls_client(addr, &server_name, &init.ca_pem, Some((&chain, &key))).await?;
    refused("certificate from another CA", &o);
    // No certificate at all.
    let o = tls_client(addr, &server_name, &init.ca_pem, None).await?;
    refused("no client certificate", &o);

    // The node is unharmed.
    c.api(0)?.put_setting("peer-port.after", "ok").await?;
    Ok(())
}
