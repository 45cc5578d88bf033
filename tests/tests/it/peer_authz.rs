//! The peer port authorizes by identity and membership, not by "signed by the CA"
//! (docs/threat-model.md): a removed node's certificate is refused on every RPC; a member
//! cannot keep another member "up" with heartbeats in its name; a member cannot open a
//! libvirt stream to a host it is not migrating to, nor fetch what no VM of it needs.
//! Each attack is made with a real node's certificate over the real transport, and each
//! is first shown to pass authorization where it should (so the refusals are the checks,
//! not a broken call).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use keel_cluster::local::LocalFiles;
use keel_cluster::transport::{Payload, PeerConnector, PeerRpc, TransportError};
use keel_tests::cluster::TestCluster;
use keel_tests::wait::{millis, secs, wait_until};

use super::{cli_quiet, host_named, FAST_DUTIES};

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A console header for a VM that does not exist: any member passes authorization with it.
const CONSOLE_OF_NO_VM: &[u8] =
    br#"{"duplex":"console","vm_id":"00000000-0000-0000-0000-000000000000","kind":"serial"}"#;

/// A peer client that presents node `i`'s certificate (read from its data directory).
fn connector_of(c: &TestCluster, i: usize) -> Result<PeerConnector> {
    let identity = LocalFiles::new(c.data_dir(i))
        .load_identity()
        .with_context(|| format!("reading the identity of {}", c.name(i)))?
        .ok_or_else(|| anyhow!("{} has no identity", c.name(i)))?;
    Ok(PeerConnector::new(&identity))
}

/// How a call ended: its gRPC code (`Ok` for success) and message.
fn outcome<T>(result: Result<T, TransportError>) -> (tonic::Code, String) {
    match result {
        Ok(_) => (tonic::Code::Ok, String::new()),
        Err(TransportError::Status(s)) => (s.code(), s.message().to_string()),
        Err(e) => (tonic::Code::Unknown, format!("not a peer answer: {e}")),
    }
}

fn code<T>(result: Result<T, TransportError>) -> tonic::Code {
    outcome(result).0
}

/// The transport's refusal of a caller outside the membership.
fn not_a_member(code: tonic::Code, message: &str) -> bool {
    code == tonic::Code::PermissionDenied && message.contains("is not a member of this cluster")
}

fn heartbeat_json(node_id: u64) -> Vec<u8> {
    serde_json::to_vec(&keel_cluster::db::Heartbeat {
        node_id,
        sent_at_ms: 0,
    })
    .unwrap_or_default()
}

type Outcomes = Vec<(&'static str, tonic::Code, String)>;

/// Every peer RPC, each as `caller` to `target` (a garbage body where the body is checked
/// after the caller); how each ended.
async fn every_rpc(
    c: &TestCluster,
    caller: &PeerConnector,
    caller_id: u64,
    target: usize,
) -> Result<Outcomes> {
    let id = c.node_id(target).ok_or_else(|| anyhow!("no id"))?;
    let addr = c.peer_addr(target).to_string();
    let mut out = Vec::new();
    let mut client = caller.client(id, &addr)?;
    let raft = |json: &[u8]| {
        tonic::Request::new(Payload {
            json: json.to_vec(),
        })
    };
    let status_code = |r: Result<tonic::Response<Payload>, tonic::Status>| match r {
        Ok(_) => (tonic::Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    };
    let mut push = |rpc: &'static str, (code, message): (tonic::Code, String)| {
        out.push((rpc, code, message));
    };
    push(
        "append_entries",
        status_code(client.append_entries(raft(b"{}")).await),
    );
    push("vote", status_code(client.vote(raft(b"{}")).await));
    push(
        "install_snapshot",
        status_code(client.install_snapshot(raft(b"{}")).await),
    );
    push(
        "leader",
        outcome(
            caller
                .call(PeerRpc::Leader, id, &addr, b"{}".to_vec(), CALL_TIMEOUT)
                .await,
        ),
    );
    push(
        "heartbeat",
        outcome(
            caller
                .call(
                    PeerRpc::Heartbeat,
                    id,
                    &addr,
                    heartbeat_json(caller_id),
                    CALL_TIMEOUT,
                )
                .await,
        ),
    );
    push(
        "host",
        outcome(
            caller
                .call(PeerRpc::Host, id, &addr, b"{}".to_vec(), CALL_TIMEOUT)
                .await,
        ),
    );
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    push(
        "duplex",
        outcome(
            caller
                .duplex(id, &addr, CONSOLE_OF_NO_VM.to_vec(), rx)
                .await,
        ),
    );
    push(
        "fetch_blob",
        outcome(
            caller
                .fetch_blob(id, &addr, br#"{"blob":"template","id":"x"}"#.to_vec())
                .await,
        ),
    );
    Ok(out)
}

#[tokio::test]
async fn a_removed_nodes_certificate_is_refused_on_every_rpc() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = TestCluster::form(4).await?;
    let leader = c.leader().await?;
    let gone = (0..4)
        .find(|i| *i != leader)
        .ok_or_else(|| anyhow!("no follower"))?;
    let gone_id = c.node_id(gone).ok_or_else(|| anyhow!("no id"))?;
    let as_gone = connector_of(&c, gone)?;

    // While a member, its heartbeat is taken and the other calls get past the membership
    // check (to the body, which is garbage, or to what the host services decide): the
    // refusals below are the membership check.
    let member = every_rpc(&c, &as_gone, gone_id, leader).await?;
    let heartbeat = member.iter().find(|(rpc, _, _)| *rpc == "heartbeat");
    assert_eq!(
        heartbeat.map(|(_, code, _)| *code),
        Some(tonic::Code::Ok),
        "{member:?}"
    );
    assert!(
        member.iter().all(|(_, code, m)| !not_a_member(*code, m)),
        "a member was refused as a non-member: {member:?}"
    );

    cli_quiet(&c, leader, &["node", "remove", c.name(gone)]).await?;
    for target in (0..4).filter(|i| *i != gone) {
        // Refused at once on every node: the removal is in each one's membership as
        // soon as it is appended there.
        let refused = wait_until(
            format!("{} refused by {}", c.name(gone), c.name(target)),
            secs(10),
            millis(100),
            || async {
                let got = every_rpc(&c, &as_gone, gone_id, target).await?;
                Ok(got
                    .iter()
                    .all(|(_, code, m)| not_a_member(*code, m))
                    .then_some(got))
            },
        )
        .await?;
        eprintln!("{} → {}: {refused:?}", c.name(gone), c.name(target));
    }
    Ok(())
}

#[tokio::test]
async fn a_member_cannot_keep_another_member_up() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let (_config, opts) = super::with_config(FAST_DUTIES)?;
    let c = TestCluster::form_with(3, opts).await?;
    let leader = c.leader().await?;
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (forger, victim) = (others[0], others[1]);
    let victim_id = c.node_id(victim).ok_or_else(|| anyhow!("no id"))?;
    let leader_id = c.node_id(leader).ok_or_else(|| anyhow!("no id"))?;
    let leader_addr = c.peer_addr(leader).to_string();
    let as_forger = connector_of(&c, forger)?;

    // A heartbeat in the victim's name is refused outright.
    let forge = move |as_forger: PeerConnector, leader_addr: String| async move {
        as_forger
            .call(
                PeerRpc::Heartbeat,
                leader_id,
                &leader_addr,
                heartbeat_json(victim_id),
                CALL_TIMEOUT,
            )
            .await
    };
    let forged = forge(as_forger.clone(), leader_addr.clone()).await;
    assert_eq!(code(forged), tonic::Code::PermissionDenied);

    // The victim dies while the forger keeps sending heartbeats in its name: the leader
    // still marks it down.
    c.kill(victim).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forging = {
        let (stop, as_forger, leader_addr) = (stop.clone(), as_forger.clone(), leader_addr.clone());
        tokio::spawn(async move {
            let mut refused = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = forge(as_forger.clone(), leader_addr.clone()).await;
                if matches!(&r, Err(TransportError::Status(s)) if s.code() == tonic::Code::PermissionDenied)
                {
                    refused += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            refused
        })
    };
    let down = wait_until(
        format!("{} down", c.name(victim)),
        secs(20),
        millis(200),
        || async {
            let nodes = cli_quiet(&c, leader, &["node", "list"]).await?;
            Ok((host_named(&nodes, c.name(victim))?["health"] == "down").then_some(()))
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = forging.await?;
    down?;
    if refused == 0 {
        bail!("the forged heartbeats were never refused");
    }
    Ok(())
}

#[tokio::test]
async fn a_member_cannot_open_streams_or_fetch_blobs_it_has_no_part_in() -> Result<()> {
    keel_tests::skip_unless_root!(Ok(()));
    let c = TestCluster::form(2).await?;
    let target_id = c.node_id(0).ok_or_else(|| anyhow!("no id"))?;
    let addr = c.peer_addr(0).to_string();
    let as_member = connector_of(&c, 1)?;

    // A member passes authorization for a console (it fails on the VM, which is unknown)…
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let console = as_member
        .duplex(target_id, &addr, CONSOLE_OF_NO_VM.to_vec(), rx)
        .await;
    assert_ne!(code(console), tonic::Code::PermissionDenied);

    // …but no VM moves from it to node 0: no libvirt connection, no migration stream, no
    // disk of a VM, no template.
    let attempts: [(&str, Vec<u8>); 2] = [
        ("libvirt", br#"{"duplex":"libvirt"}"#.to_vec()),
        (
            "migration stream",
            br#"{"duplex":"migration_stream","vm_id":"00000000-0000-0000-0000-000000000000","port":22}"#
                .to_vec(),
        ),
    ];
    for (what, header) in attempts {
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let got = code(as_member.duplex(target_id, &addr, header, rx).await);
        assert_eq!(got, tonic::Code::PermissionDenied, "{what}: {got:?}");
    }
    for (what, json) in [
        ("template", br#"{"blob":"template","id":"t"}"#.to_vec()),
        (
            "VM disk",
            br#"{"blob":"vm_disk","vm_id":"00000000-0000-0000-0000-000000000000","file":"root.qcow2"}"#
                .to_vec(),
        ),
    ] {
        let got = code(as_member.fetch_blob(target_id, &addr, json).await);
        assert_eq!(got, tonic::Code::PermissionDenied, "{what}: {got:?}");
    }
    Ok(())
}
