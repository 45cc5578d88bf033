//! Floating IP routes: public addresses from the `network.floating-ip-range` setting,
//! pointed at a VM NIC on an external network — 1:1 NAT, or only some forwarded ports.
//!
//! Validation is the model's (`cluster/src/model/network.rs`); handlers only turn the
//! text of a request into the typed command.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_cluster::db::now_ms;
use keel_cluster::model::compute::Vm;
use keel_cluster::model::network::{
    FloatingIp, ForwardProtocol, Network, NetworkCommand, PortForward,
};
use keel_cluster::model::{self, Command, CommandError, Host};

use super::extract::ApiJson;
use super::handlers::{read, ApiResult};
use super::networks::write_network;
use super::{ApiError, AppState, Principal};
use keel_api_types::{
    ErrorBody, FloatingIpAllocateRequest, FloatingIpAttachRequest, FloatingIpView, PortForwardView,
};

fn parse_ip(text: &str) -> Result<Ipv4Addr, ApiError> {
    text.trim().parse().map_err(|_| {
        ApiError::from(CommandError::Invalid {
            field: "floating IP".into(),
            reason: format!("{text:?} is not an IPv4 address like 192.0.2.10"),
        })
    })
}

/// Parses a forward: `PROTO:PUBLIC:PRIVATE` (or `PROTO:PORT` for the same port).
fn parse_forward(text: &str) -> Result<PortForward, CommandError> {
    let bad = || {
        CommandError::Invalid {
        field: "ports".into(),
        reason: format!(
            "{text:?} is not a port forward like tcp:8080:80 (protocol:public port:VM port) or tcp:22"
        ),
    }
    };
    let mut parts = text.split(':');
    let protocol = match parts.next() {
        Some("tcp") => ForwardProtocol::Tcp,
        Some("udp") => ForwardProtocol::Udp,
        _ => return Err(bad()),
    };
    let port = |p: Option<&str>| -> Result<Option<u16>, CommandError> {
        p.map(|p| p.parse::<u16>().ok().filter(|n| *n > 0).ok_or_else(bad))
            .transpose()
    };
    let public_port = port(parts.next())?.ok_or_else(bad)?;
    let private_port = port(parts.next())?.unwrap_or(public_port);
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(PortForward {
        protocol,
        public_port,
        private_port,
    })
}

pub fn forward_text(f: &PortForward) -> String {
    let proto = match f.protocol {
        ForwardProtocol::Tcp => "tcp",
        ForwardProtocol::Udp => "udp",
    };
    format!("{proto}:{}:{}", f.public_port, f.private_port)
}

fn view(
    fip: &FloatingIp,
    vms: &HashMap<String, Vm>,
    nets: &HashMap<String, Network>,
    hosts: &HashMap<u64, Host>,
) -> FloatingIpView {
    let t = fip.target.as_ref();
    let vm = t.and_then(|t| vms.get(&t.vm_id));
    FloatingIpView {
        ip: fip.ip.to_string(),
        vm_id: t.map(|t| t.vm_id.clone()),
        vm_name: vm.map(|v| v.name.clone()),
        network: t.map(|t| {
            nets.get(&t.network_id)
                .map_or_else(|| t.network_id.clone(), |n| n.name.clone())
        }),
        private_ip: t.map(|t| t.private_ip.to_string()),
        ports: t
            .map(|t| {
                t.ports
                    .iter()
                    .map(|p| PortForwardView {
                        forward: forward_text(p),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        host_name: vm
            .and_then(|v| v.host)
            .and_then(|h| hosts.get(&h))
            .map(|h| h.name.clone()),
        allocated_at_ms: fip.allocated_at_ms,
    }
}

fn views_of(state: &AppState, only: Option<Ipv4Addr>) -> Result<Vec<FloatingIpView>, ApiError> {
    read(state, |c| {
        let fips: Vec<FloatingIp> = model::list(c)?;
        let vms: HashMap<String, Vm> = model::list::<Vm>(c)?
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        let nets: HashMap<String, Network> = model::list::<Network>(c)?
            .into_iter()
            .map(|n| (n.id.clone(), n))
            .collect();
        let hosts: HashMap<u64, Host> = model::list::<Host>(c)?
            .into_iter()
            .map(|h| (h.id, h))
            .collect();
        Ok(fips
            .iter()
            .filter(|f| only.is_none_or(|ip| f.ip == ip))
            .map(|f| view(f, &vms, &nets, &hosts))
            .collect())
    })
}

fn one(state: &AppState, ip: Ipv4Addr) -> Result<FloatingIpView, ApiError> {
    views_of(state, Some(ip))?
        .into_iter()
        .next()
        .ok_or_else(|| CommandError::FloatingIpUnknown { ip: ip.to_string() }.into())
}

#[utoipa::path(get, path = "/api/v1/floating-ips", tag = "floating-ips",
    responses((status = 200, body = [FloatingIpView])), security(("bearer" = [])))]
pub async fn list_floating_ips(State(state): State<AppState>) -> ApiResult<Vec<FloatingIpView>> {
    Ok(Json(views_of(&state, None)?))
}

#[utoipa::path(post, path = "/api/v1/floating-ips", tag = "floating-ips",
    request_body = FloatingIpAllocateRequest,
    responses((status = 201, body = FloatingIpView),
        (status = 400, body = ErrorBody, description = "no range configured, the range is used up, or the address is outside it"),
        (status = 409, body = ErrorBody, description = "the address is already allocated")),
    security(("bearer" = [])))]
pub async fn allocate_floating_ip(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<FloatingIpAllocateRequest>,
) -> Result<(StatusCode, Json<FloatingIpView>), ApiError> {
    let ip = req.ip.as_deref().map(parse_ip).transpose()?;
    tracing::info!(ip = ?ip, principal = ?who, "allocating floating IP");
    let outcome = state
        .db
        .write(Command::Network {
            command: NetworkCommand::AllocateFloatingIp {
                ip,
                now_ms: now_ms(),
            },
        })
        .await?;
    let ip = match outcome {
        model::Outcome::Created { id } => parse_ip(&id)?,
        other => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("unexpected outcome {other:?}"),
            ))
        }
    };
    // This node's replica may apply the entry a moment after the leader.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match one(&state, ip) {
            Ok(v) => return Ok((StatusCode::CREATED, Json(v))),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

#[utoipa::path(get, path = "/api/v1/floating-ips/{ip}", tag = "floating-ips",
    params(("ip" = String, Path, description = "the floating IP")),
    responses((status = 200, body = FloatingIpView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_floating_ip(
    State(state): State<AppState>,
    Path(ip): Path<String>,
) -> ApiResult<FloatingIpView> {
    Ok(Json(one(&state, parse_ip(&ip)?)?))
}

#[utoipa::path(delete, path = "/api/v1/floating-ips/{ip}", tag = "floating-ips",
    params(("ip" = String, Path, description = "the floating IP")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "`in_use`: still attached")),
    security(("bearer" = [])))]
pub async fn release_floating_ip(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(ip): Path<String>,
) -> Result<StatusCode, ApiError> {
    let ip = parse_ip(&ip)?;
    tracing::info!(%ip, principal = ?who, "releasing floating IP");
    write_network(&state, NetworkCommand::ReleaseFloatingIp { ip }).await
}

#[utoipa::path(put, path = "/api/v1/floating-ips/{ip}/target", tag = "floating-ips",
    params(("ip" = String, Path, description = "the floating IP")),
    request_body = FloatingIpAttachRequest,
    responses((status = 200, body = FloatingIpView),
        (status = 400, body = ErrorBody, description = "the VM has no NIC on an external network, or bad ports"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "`in_use`: attached to another VM")),
    security(("bearer" = [])))]
pub async fn attach_floating_ip(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(ip): Path<String>,
    ApiJson(req): ApiJson<FloatingIpAttachRequest>,
) -> ApiResult<FloatingIpView> {
    let ip = parse_ip(&ip)?;
    let ports = req
        .ports
        .iter()
        .map(|p| parse_forward(p))
        .collect::<Result<Vec<_>, _>>()?;
    tracing::info!(%ip, vm = %req.vm, principal = ?who, "attaching floating IP");
    state
        .db
        .write(Command::Network {
            command: NetworkCommand::AttachFloatingIp {
                ip,
                vm: req.vm,
                network: req.network,
                ports,
            },
        })
        .await?;
    Ok(Json(one(&state, ip)?))
}

#[utoipa::path(delete, path = "/api/v1/floating-ips/{ip}/target", tag = "floating-ips",
    params(("ip" = String, Path, description = "the floating IP")),
    responses((status = 204), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn detach_floating_ip(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(ip): Path<String>,
) -> Result<StatusCode, ApiError> {
    let ip = parse_ip(&ip)?;
    tracing::info!(%ip, principal = ?who, "detaching floating IP");
    write_network(&state, NetworkCommand::DetachFloatingIp { ip }).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse() {
        let f = parse_forward("tcp:8080:80").unwrap();
        assert_eq!(
            (f.protocol, f.public_port, f.private_port),
            (ForwardProtocol::Tcp, 8080, 80)
        );
        assert_eq!(parse_forward("udp:53").unwrap().private_port, 53);
        assert_eq!(forward_text(&parse_forward("udp:53").unwrap()), "udp:53:53");
        for bad in [
            "",
            "tcp",
            "icmp:1",
            "tcp:0",
            "tcp:1:2:3",
            "tcp:70000",
            "tcp:x",
        ] {
            assert!(parse_forward(bad).is_err(), "{bad:?} parsed");
        }
    }
}
