//! Networking routes: guest networks (with their address leases), security groups and
//! their rules, and the roles of each host's interfaces. Attaching and detaching VM NICs
//! lives with the other VM requests (`vms.rs`).
//!
//! Validation is the model's (CIDRs, names, MTUs, ports, whether a network is in use);
//! handlers only turn the text of a request into the typed command.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_cluster::db::now_ms;
use keel_cluster::model::compute::Vm;
use keel_cluster::model::network::{
    self as net, HostNetworks, IpLease, Ipv4Cidr, NetRole, Network, NetworkCommand,
    PhysicalNetwork, RuleRemote, SecurityGroup, SecurityRule,
};
use keel_cluster::model::{self, Command, CommandError, Host};

use super::extract::ApiJson;
use super::handlers::{read, ApiResult};
use super::views;
use super::vms::resolve_host;
use super::{ApiError, AppState, Principal};
use keel_api_types::*;

/// How long a create waits for this node's replica to apply the entry it just committed
/// (a follower applies it a moment after the leader).
const READ_BACK: Duration = Duration::from_secs(3);

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> ApiError {
    CommandError::Invalid {
        field: field.to_string(),
        reason: reason.to_string(),
    }
    .into()
}

fn parse_ip(field: &str, text: &str) -> Result<Ipv4Addr, ApiError> {
    text.trim().parse().map_err(|_| {
        invalid(
            field,
            format!("{text:?} is not an IPv4 address like 10.0.0.1"),
        )
    })
}

/// The record a write just created, from this node's replica; `None` if the replica has
/// not applied it within [`READ_BACK`].
async fn read_back<T>(
    state: &AppState,
    f: impl Fn(&rusqlite::Connection) -> rusqlite::Result<Option<T>>,
) -> Result<Option<T>, ApiError> {
    let deadline = Instant::now() + READ_BACK;
    loop {
        if let Some(found) = read(state, &f)? {
            return Ok(Some(found));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proposes a network command whose success has nothing to show (`204 No Content`).
pub(super) async fn write_network(
    state: &AppState,
    command: NetworkCommand,
) -> Result<StatusCode, ApiError> {
    state.db.write(Command::Network { command }).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- request → command (pure, unit-tested) ----------------------------------------------

/// The command a network create request stands for. The CIDR, name, DNS domain and MTU
/// are checked by the model (which also picks the defaults and the VNI).
pub(crate) fn create_network_command(
    req: NetworkCreateRequest,
    network_id: String,
    now_ms: u64,
) -> Result<NetworkCommand, ApiError> {
    let gateway = req
        .gateway
        .as_deref()
        .map(|g| parse_ip("gateway", g))
        .transpose()?;
    Ok(NetworkCommand::CreateNetwork {
        network_id,
        name: req.name,
        cidr: req.cidr.trim().to_string(),
        gateway,
        dns_domain: req.dns_domain,
        mtu: req.mtu,
        external: req.external,
        now_ms,
    })
}

/// The rule a rule request stands for: exactly one remote, `0.0.0.0/0` when none is
/// given. Ports and the remote group are checked by the model.
pub(crate) fn security_rule(
    req: SecurityRuleCreateRequest,
    rule_id: String,
) -> Result<SecurityRule, ApiError> {
    let remote = match (req.remote_cidr, req.remote_group) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "remote",
                "give remote_cidr or remote_group, not both",
            ))
        }
        (Some(cidr), None) => RuleRemote::Cidr {
            cidr: Ipv4Cidr::parse(cidr.trim(), true).map_err(|r| invalid("remote_cidr", r))?,
        },
        (None, Some(group)) => RuleRemote::Group { group },
        (None, None) => RuleRemote::Cidr {
            cidr: Ipv4Cidr {
                addr: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
            },
        },
    };
    Ok(SecurityRule {
        id: rule_id,
        direction: views::model_direction(req.direction),
        protocol: views::model_protocol(req.protocol),
        port_min: req.port_min,
        port_max: req.port_max,
        remote,
    })
}

/// A role as written in a path: `management`, `storage`, `guest-underlay` or `public`.
pub(crate) fn parse_role(text: &str) -> Result<NetRole, ApiError> {
    NetRole::parse(text).ok_or_else(|| {
        invalid(
            "role",
            format!("{text:?} is not a role: use management, storage, guest-underlay or public"),
        )
    })
}

/// The physical network a set request stands for; whether the host has that interface
/// and address is the model's to check.
pub(crate) fn physical_network(req: HostNetworkSetRequest) -> Result<PhysicalNetwork, ApiError> {
    let address = Ipv4Cidr::parse(req.address.trim(), false).map_err(|r| {
        invalid(
            "address",
            format!("{r}: give the host's address with its prefix, like 192.0.2.10/24"),
        )
    })?;
    let gateway = req
        .gateway
        .as_deref()
        .map(|g| parse_ip("gateway", g))
        .transpose()?;
    Ok(PhysicalNetwork {
        interface: req.interface.trim().to_string(),
        address,
        gateway,
    })
}

// ---- guest networks -----------------------------------------------------------------------

#[utoipa::path(get, path = "/api/v1/networks", tag = "networks",
    responses((status = 200, body = [NetworkView]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_networks(State(state): State<AppState>) -> ApiResult<Vec<NetworkView>> {
    let (networks, leases) = read(&state, |c| {
        Ok((model::list::<Network>(c)?, model::list::<IpLease>(c)?))
    })?;
    Ok(Json(views::network_views(&networks, &leases)))
}

#[utoipa::path(post, path = "/api/v1/networks", tag = "networks",
    request_body = NetworkCreateRequest,
    responses((status = 201, body = NetworkView),
        (status = 400, body = ErrorBody, description = "bad CIDR, gateway, DNS domain or MTU"),
        (status = 409, body = ErrorBody, description = "name taken")),
    security(("bearer" = [])))]
pub async fn create_network(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<NetworkCreateRequest>,
) -> Result<(StatusCode, Json<NetworkView>), ApiError> {
    let (id, now) = (new_id(), now_ms());
    tracing::info!(network = %req.name, network_id = %id, principal = ?who, "creating network");
    let fallback = NetworkView {
        id: id.clone(),
        name: req.name.clone(),
        cidr: req.cidr.clone(),
        gateway: req.gateway.clone().unwrap_or_default(),
        dns_domain: req.dns_domain.clone().unwrap_or_default(),
        vni: 0,
        mtu: req.mtu.unwrap_or(0),
        external: req.external,
        ports: 0,
        created_at_ms: now,
    };
    let command = create_network_command(req, id.clone(), now)?;
    state.db.write(Command::Network { command }).await?;
    let created = read_back(&state, |c| model::get::<Network>(c, &id)).await?;
    let view = created.map_or(fallback, |n| views::network_view(&n, 0));
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(get, path = "/api/v1/networks/{network}", tag = "networks",
    params(("network" = String, Path, description = "network name or id")),
    responses((status = 200, body = NetworkDetailView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_network(
    State(state): State<AppState>,
    Path(network): Path<String>,
) -> ApiResult<NetworkDetailView> {
    let (found, vms, hosts) = read(&state, |c| {
        let found = match net::find_network(c, &network)? {
            Some(n) => {
                let leases = net::network_leases(c, &n.id)?;
                Some((n, leases))
            }
            None => None,
        };
        Ok((found, model::list::<Vm>(c)?, model::list::<Host>(c)?))
    })?;
    let (n, leases) = found.ok_or(CommandError::NetworkUnknown { network })?;
    Ok(Json(views::network_detail_view(&n, &leases, &vms, &hosts)))
}

#[utoipa::path(delete, path = "/api/v1/networks/{network}", tag = "networks",
    params(("network" = String, Path, description = "network name or id")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "`in_use`: VMs still have NICs on it (named in the message)")),
    security(("bearer" = [])))]
pub async fn delete_network(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(network): Path<String>,
) -> Result<StatusCode, ApiError> {
    tracing::info!(network = %network, principal = ?who, "deleting network");
    write_network(&state, NetworkCommand::DeleteNetwork { network }).await
}

// ---- security groups ----------------------------------------------------------------------

#[utoipa::path(get, path = "/api/v1/security-groups", tag = "security-groups",
    responses((status = 200, body = [SecurityGroupView]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_security_groups(
    State(state): State<AppState>,
) -> ApiResult<Vec<SecurityGroupView>> {
    let (groups, vms) = read(&state, |c| {
        Ok((model::list::<SecurityGroup>(c)?, model::list::<Vm>(c)?))
    })?;
    Ok(Json(views::security_group_views(&groups, &groups, &vms)))
}

#[utoipa::path(post, path = "/api/v1/security-groups", tag = "security-groups",
    request_body = SecurityGroupCreateRequest,
    responses((status = 201, body = SecurityGroupView), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "name taken")),
    security(("bearer" = [])))]
pub async fn create_security_group(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<SecurityGroupCreateRequest>,
) -> Result<(StatusCode, Json<SecurityGroupView>), ApiError> {
    let (id, now) = (new_id(), now_ms());
    tracing::info!(group = %req.name, group_id = %id, principal = ?who, "creating security group");
    state
        .db
        .write(Command::Network {
            command: NetworkCommand::CreateSecurityGroup {
                group_id: id.clone(),
                name: req.name.clone(),
                now_ms: now,
            },
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(SecurityGroupView {
            id,
            name: req.name,
            rules: vec![],
            vms: vec![],
            revision: 1,
            created_at_ms: now,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/security-groups/{group}", tag = "security-groups",
    params(("group" = String, Path, description = "security group name or id")),
    responses((status = 200, body = SecurityGroupView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_security_group(
    State(state): State<AppState>,
    Path(group): Path<String>,
) -> ApiResult<SecurityGroupView> {
    let (found, all, vms) = read(&state, |c| {
        Ok((
            net::find_group(c, &group)?,
            model::list::<SecurityGroup>(c)?,
            model::list::<Vm>(c)?,
        ))
    })?;
    let found = found.ok_or(CommandError::SecurityGroupUnknown { group })?;
    let mut views = views::security_group_views(&[found], &all, &vms);
    Ok(Json(views.remove(0)))
}

#[utoipa::path(delete, path = "/api/v1/security-groups/{group}", tag = "security-groups",
    params(("group" = String, Path, description = "security group name or id")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "`in_use`: NICs or other groups' rules refer to it")),
    security(("bearer" = [])))]
pub async fn delete_security_group(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(group): Path<String>,
) -> Result<StatusCode, ApiError> {
    tracing::info!(group = %group, principal = ?who, "deleting security group");
    write_network(&state, NetworkCommand::DeleteSecurityGroup { group }).await
}

#[utoipa::path(post, path = "/api/v1/security-groups/{group}/rules", tag = "security-groups",
    params(("group" = String, Path, description = "security group name or id")),
    request_body = SecurityRuleCreateRequest,
    responses((status = 201, body = SecurityRuleView),
        (status = 400, body = ErrorBody, description = "bad ports or CIDR, or both remotes given"),
        (status = 404, body = ErrorBody, description = "the group or the remote group is unknown"),
        (status = 409, body = ErrorBody, description = "the group already has the same rule")),
    security(("bearer" = [])))]
pub async fn add_security_rule(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(group): Path<String>,
    ApiJson(req): ApiJson<SecurityRuleCreateRequest>,
) -> Result<(StatusCode, Json<SecurityRuleView>), ApiError> {
    let rule = security_rule(req, new_id())?;
    tracing::info!(group = %group, rule_id = %rule.id, principal = ?who, "adding security rule");
    state
        .db
        .write(Command::Network {
            command: NetworkCommand::AddSecurityRule {
                group: group.clone(),
                rule: rule.clone(),
            },
        })
        .await?;
    // The model resolves the remote group to its id and fills in port_max: show its copy.
    let stored = read_back(&state, |c| {
        let Some(g) = net::find_group(c, &group)? else {
            return Ok(None);
        };
        let Some(r) = g.rules.iter().find(|r| r.id == rule.id).cloned() else {
            return Ok(None);
        };
        Ok(Some((r, model::list::<SecurityGroup>(c)?)))
    })
    .await?;
    let view = match stored {
        Some((r, all)) => {
            let names: HashMap<&str, &str> = all
                .iter()
                .map(|g| (g.id.as_str(), g.name.as_str()))
                .collect();
            views::security_rule_view(&r, &names)
        }
        None => views::security_rule_view(&rule, &HashMap::new()),
    };
    Ok((StatusCode::CREATED, Json(view)))
}

#[utoipa::path(delete, path = "/api/v1/security-groups/{group}/rules/{rule}", tag = "security-groups",
    params(("group" = String, Path, description = "security group name or id"),
        ("rule" = String, Path, description = "rule id, or a unique prefix of at least 4 characters")),
    responses((status = 204), (status = 400, body = ErrorBody, description = "the prefix matches several rules"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_security_rule(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((group, rule)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    tracing::info!(group = %group, rule = %rule, principal = ?who, "deleting security rule");
    write_network(
        &state,
        NetworkCommand::DeleteSecurityRule {
            group,
            rule_id: rule,
        },
    )
    .await
}

// ---- host networks ------------------------------------------------------------------------

#[utoipa::path(get, path = "/api/v1/hosts/{host}/networks", tag = "hosts",
    params(("host" = String, Path, description = "host name or id")),
    responses((status = 200, body = HostNetworksView,
            description = "the roles given, and the management and guest-underlay roles derived from the peer address when not given"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_host_networks(
    State(state): State<AppState>,
    Path(host): Path<String>,
) -> ApiResult<HostNetworksView> {
    let host_id = resolve_host(&state, &host)?;
    let (found, stored, nets) = read(&state, |c| {
        let Some(h) = model::host(c, host_id)? else {
            return Ok((None, None, None));
        };
        let stored = model::get::<HostNetworks>(c, &format!("{host_id:020}"))?;
        let nets = net::host_networks(c, &h);
        Ok((Some(h), stored, Some(nets)))
    })?;
    let (Some(h), Some(nets)) = (found, nets) else {
        return Err(CommandError::HostUnknown { host_id }.into());
    };
    let nets = nets?;
    Ok(Json(views::host_networks_view(&h, &nets, stored.as_ref())))
}

#[utoipa::path(put, path = "/api/v1/hosts/{host}/networks/{role}", tag = "hosts",
    params(("host" = String, Path, description = "host name or id"),
        ("role" = String, Path, description = "`management`, `storage`, `guest-underlay` or `public`")),
    request_body = HostNetworkSetRequest,
    responses((status = 200, body = HostNetworkView),
        (status = 400, body = ErrorBody, description = "unknown role, or the host has no such interface or address"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_host_network(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((host, role)): Path<(String, String)>,
    ApiJson(req): ApiJson<HostNetworkSetRequest>,
) -> ApiResult<HostNetworkView> {
    let role = parse_role(&role)?;
    let network = physical_network(req)?;
    let host_id = resolve_host(&state, &host)?;
    tracing::info!(host_id, role = role.as_str(), interface = %network.interface, principal = ?who, "setting host network");
    state
        .db
        .write(Command::Network {
            command: NetworkCommand::SetHostNetwork {
                host_id,
                role,
                network: Some(network.clone()),
            },
        })
        .await?;
    Ok(Json(HostNetworkView {
        role: views::net_role_name(role),
        interface: network.interface,
        address: network.address.to_string(),
        gateway: network.gateway.map(|g| g.to_string()),
        derived: false,
    }))
}

#[utoipa::path(delete, path = "/api/v1/hosts/{host}/networks/{role}", tag = "hosts",
    params(("host" = String, Path, description = "host name or id"),
        ("role" = String, Path, description = "`management`, `storage`, `guest-underlay` or `public`")),
    responses((status = 204, description = "the role is no longer given (management and guest-underlay fall back to the peer address's interface)"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn clear_host_network(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((host, role)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let role = parse_role(&role)?;
    let host_id = resolve_host(&state, &host)?;
    tracing::info!(host_id, role = role.as_str(), principal = ?who, "clearing host network");
    write_network(
        &state,
        NetworkCommand::SetHostNetwork {
            host_id,
            role,
            network: None,
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_cluster::model::network::{Direction, RuleProtocol as Proto};

    fn status(e: ApiError) -> (StatusCode, String) {
        (e.status, e.message)
    }

    #[test]
    fn a_network_request_becomes_its_command() {
        let req: NetworkCreateRequest = serde_json::from_value(serde_json::json!({
            "name": "blue", "cidr": "10.0.0.0/24",
        }))
        .expect("minimal");
        assert_eq!(
            create_network_command(req, "n-1".into(), 7).expect("command"),
            NetworkCommand::CreateNetwork {
                network_id: "n-1".into(),
                name: "blue".into(),
                cidr: "10.0.0.0/24".into(),
                gateway: None,
                dns_domain: None,
                mtu: None,
                external: false,
                now_ms: 7,
            }
        );
        let req: NetworkCreateRequest = serde_json::from_value(serde_json::json!({
            "name": "red", "cidr": "10.1.0.0/16", "gateway": "10.1.255.254",
            "dns_domain": "red.corp", "mtu": 1400, "external": true,
        }))
        .expect("full");
        let NetworkCommand::CreateNetwork {
            gateway,
            dns_domain,
            mtu,
            external,
            ..
        } = create_network_command(req, "n-2".into(), 7).expect("command")
        else {
            panic!("not a create");
        };
        assert_eq!(gateway, Some(Ipv4Addr::new(10, 1, 255, 254)));
        assert_eq!(dns_domain.as_deref(), Some("red.corp"));
        assert_eq!((mtu, external), (Some(1400), true));
        let req: NetworkCreateRequest = serde_json::from_value(serde_json::json!({
            "name": "x", "cidr": "10.0.0.0/24", "gateway": "10.0.0",
        }))
        .expect("parses as text");
        let (code, message) = status(create_network_command(req, "n".into(), 1).unwrap_err());
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(message.contains("invalid gateway"), "{message}");
        assert!(
            serde_json::from_value::<NetworkCreateRequest>(serde_json::json!({
                "name": "x", "cidr": "10.0.0.0/24", "vlan": 5,
            }))
            .is_err()
        );
    }

    fn rule_request(json: serde_json::Value) -> SecurityRuleCreateRequest {
        serde_json::from_value(json).expect("rule request")
    }

    #[test]
    fn rule_requests_take_one_remote_defaulting_to_anywhere() {
        let r = security_rule(
            rule_request(serde_json::json!({
                "direction": "ingress", "protocol": "tcp", "port_min": 22,
            })),
            "r-1".into(),
        )
        .expect("rule");
        assert_eq!(
            r,
            SecurityRule {
                id: "r-1".into(),
                direction: Direction::Ingress,
                protocol: Proto::Tcp,
                port_min: Some(22),
                port_max: None,
                remote: RuleRemote::Cidr {
                    cidr: Ipv4Cidr::parse("0.0.0.0/0", true).unwrap()
                },
            }
        );
        let r = security_rule(
            rule_request(serde_json::json!({
                "direction": "egress", "protocol": "udp", "port_min": 8000, "port_max": 8100,
                "remote_group": "web",
            })),
            "r-2".into(),
        )
        .expect("rule");
        assert_eq!((r.direction, r.protocol), (Direction::Egress, Proto::Udp));
        assert_eq!((r.port_min, r.port_max), (Some(8000), Some(8100)));
        assert_eq!(
            r.remote,
            RuleRemote::Group {
                group: "web".into()
            }
        );
        let r = security_rule(
            rule_request(serde_json::json!({
                "direction": "ingress", "protocol": "icmp", "remote_cidr": "192.0.2.0/24",
            })),
            "r-3".into(),
        )
        .expect("rule");
        assert_eq!(
            r.remote,
            RuleRemote::Cidr {
                cidr: Ipv4Cidr::parse("192.0.2.0/24", true).unwrap()
            }
        );
        let (code, message) = status(
            security_rule(
                rule_request(serde_json::json!({
                    "direction": "ingress", "protocol": "tcp",
                    "remote_cidr": "10.0.0.0/8", "remote_group": "web",
                })),
                "r".into(),
            )
            .unwrap_err(),
        );
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(message.contains("not both"), "{message}");
        let (_, message) = status(
            security_rule(
                rule_request(serde_json::json!({
                    "direction": "ingress", "protocol": "tcp", "remote_cidr": "10.0.0.5/8",
                })),
                "r".into(),
            )
            .unwrap_err(),
        );
        assert!(message.contains("did you mean 10.0.0.0/8"), "{message}");
        for bad in [
            serde_json::json!({"direction": "in", "protocol": "tcp"}),
            serde_json::json!({"direction": "ingress", "protocol": "sctp"}),
            serde_json::json!({"protocol": "tcp"}),
            serde_json::json!({"direction": "ingress", "protocol": "tcp", "port": 22}),
        ] {
            assert!(
                serde_json::from_value::<SecurityRuleCreateRequest>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn roles_and_host_networks_parse() {
        assert_eq!(
            parse_role("guest-underlay").expect("role"),
            NetRole::GuestUnderlay
        );
        assert_eq!(parse_role("public").expect("role"), NetRole::Public);
        let (code, message) = status(parse_role("dmz").unwrap_err());
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(message.contains("management, storage, guest-underlay or public"));
        let net = physical_network(HostNetworkSetRequest {
            interface: "eth1".into(),
            address: "192.0.2.10/24".into(),
            gateway: Some("192.0.2.1".into()),
        })
        .expect("network");
        assert_eq!(net.interface, "eth1");
        assert_eq!(net.address.to_string(), "192.0.2.10/24", "host bits kept");
        assert_eq!(net.gateway, Some(Ipv4Addr::new(192, 0, 2, 1)));
        let (code, message) = status(
            physical_network(HostNetworkSetRequest {
                interface: "eth1".into(),
                address: "192.0.2.10".into(),
                gateway: None,
            })
            .unwrap_err(),
        );
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(message.contains("like 192.0.2.10/24"), "{message}");
    }
}
