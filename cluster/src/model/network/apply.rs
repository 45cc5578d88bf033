//! Applying network commands: one function per command.

use super::*;

pub(in crate::model) fn apply(
    conn: &Connection,
    command: &NetworkCommand,
) -> Result<Outcome, CommandError> {
    require_init(conn)?;
    match command {
        NetworkCommand::SetHostNetwork {
            host_id,
            role,
            network,
        } => set_host_network(conn, *host_id, role, network),
        NetworkCommand::CreateNetwork {
            network_id,
            name,
            cidr,
            gateway,
            dns_domain,
            mtu,
            external,
            now_ms,
        } => create_network(
            conn, network_id, name, cidr, gateway, dns_domain, mtu, *external, *now_ms,
        ),
        NetworkCommand::DeleteNetwork { network } => delete_network(conn, network),
        NetworkCommand::CreateSecurityGroup {
            group_id,
            name,
            now_ms,
        } => create_security_group(conn, group_id, name, *now_ms),
        NetworkCommand::DeleteSecurityGroup { group } => delete_security_group(conn, group),
        NetworkCommand::AddSecurityRule { group, rule } => add_security_rule(conn, group, rule),
        NetworkCommand::AllocateFloatingIp { ip, now_ms } => {
            allocate_floating_ip(conn, ip, *now_ms)
        }
        NetworkCommand::AttachFloatingIp {
            ip,
            vm,
            network,
            ports,
        } => attach_floating_ip(conn, *ip, vm, network, ports),
        NetworkCommand::DetachFloatingIp { ip } => detach_floating_ip(conn, *ip),
        NetworkCommand::ReleaseFloatingIp { ip } => release_floating_ip(conn, *ip),
        NetworkCommand::DeleteSecurityRule { group, rule_id } => {
            delete_security_rule(conn, group, rule_id)
        }
    }
}

fn set_host_network(
    conn: &Connection,
    host_id: NodeId,
    role: &NetRole,
    network: &Option<PhysicalNetwork>,
) -> Result<Outcome, CommandError> {
    let host = require_host(conn, host_id)?;
    let mut nets = read::<HostNetworks>(conn, &format!("{host_id:020}"))?.unwrap_or(HostNetworks {
        host_id,
        roles: BTreeMap::new(),
    });
    match network {
        None => {
            if nets.roles.remove(role).is_none() {
                return Ok(Outcome::Unchanged);
            }
        }
        Some(net) => {
            validate_physical(&host, *role, net)?;
            if nets.roles.get(role) == Some(net) {
                return Ok(Outcome::Unchanged);
            }
            nets.roles.insert(*role, net.clone());
        }
    }
    put(conn, &nets)?;
    Ok(Outcome::Done)
}

// One parameter per field of the command, as the dispatch destructures it.
#[allow(clippy::too_many_arguments)]
fn create_network(
    conn: &Connection,
    network_id: &str,
    name: &str,
    cidr: &str,
    gateway: &Option<Ipv4Addr>,
    dns_domain: &Option<String>,
    mtu: &Option<u32>,
    external: bool,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    crate::model::require_new_named::<Network>(conn, "network", network_id, name)?;
    let cidr = Ipv4Cidr::parse(cidr, true).map_err(|r| invalid("cidr", r))?;
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&cidr.prefix_len) {
        return Err(invalid(
            "cidr",
            format!("the prefix length must be /{MIN_PREFIX} to /{MAX_PREFIX}"),
        ));
    }
    let gateway = match gateway {
        Some(gw) => {
            if !cidr.contains(*gw) || *gw == cidr.addr || *gw == cidr.broadcast() {
                return Err(invalid(
                    "gateway",
                    format!("{gw} is not a host address of {cidr}"),
                ));
            }
            *gw
        }
        None => Ipv4Addr::from(u32::from(cidr.addr) + 1),
    };
    let dns_domain = match dns_domain {
        Some(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            validate_domain(&d)?;
            d
        }
        None => format!("{name}.internal"),
    };
    let max_mtu = max_guest_mtu(conn)?;
    let mtu = match mtu {
        Some(m) if *m > max_mtu => {
            return Err(invalid(
                "mtu",
                format!(
                    "{m} is larger than {max_mtu}, the guest underlay's MTU minus the {VXLAN_OVERHEAD} bytes of VXLAN"
                ),
            ))
        }
        Some(m) if *m < MIN_MTU => {
            return Err(invalid("mtu", format!("{m} is smaller than {MIN_MTU}")))
        }
        Some(m) => *m,
        None => max_mtu,
    };
    let vni = allocate_vni(conn, network_id)?;
    crate::model::put_named(
        conn,
        &Network {
            id: network_id.to_owned(),
            name: name.to_owned(),
            cidr,
            gateway,
            dns_domain,
            vni,
            mtu,
            external,
            created_at_ms: now_ms,
        },
    )?;
    Ok(Outcome::Created {
        id: network_id.to_owned(),
    })
}

fn delete_network(conn: &Connection, network: &str) -> Result<Outcome, CommandError> {
    let net = require_network(conn, network)?;
    let users = network_users(conn, &net.id)?;
    if !users.is_empty() {
        return Err(CommandError::InUse {
            what: format!("network {}", net.name),
            users,
        });
    }
    for lease in network_leases(conn, &net.id).map_err(store_err)? {
        delete::<IpLease>(conn, &lease.key())?;
    }
    delete::<VniUse>(conn, &format!("{:08}", net.vni))?;
    crate::model::delete_named(conn, &net)?;
    Ok(Outcome::Done)
}

fn create_security_group(
    conn: &Connection,
    group_id: &str,
    name: &str,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    crate::model::require_new_named::<SecurityGroup>(conn, "security group", group_id, name)?;
    crate::model::put_named(
        conn,
        &SecurityGroup {
            id: group_id.to_owned(),
            name: name.to_owned(),
            rules: Vec::new(),
            created_at_ms: now_ms,
            revision: 1,
        },
    )?;
    Ok(Outcome::Created {
        id: group_id.to_owned(),
    })
}

fn delete_security_group(conn: &Connection, group: &str) -> Result<Outcome, CommandError> {
    let g = require_group(conn, group)?;
    let mut users = BTreeSet::new();
    for vm in list::<Vm>(conn).map_err(store_err)? {
        if vm
            .spec
            .nics
            .iter()
            .any(|n| n.security_groups.contains(&g.id))
        {
            users.insert(format!("VM {}", vm.name));
        }
    }
    for other in list::<SecurityGroup>(conn).map_err(store_err)? {
        if other.id != g.id
            && other
                .rules
                .iter()
                .any(|r| matches!(&r.remote, RuleRemote::Group { group } if *group == g.id))
        {
            users.insert(format!("rules of security group {}", other.name));
        }
    }
    if !users.is_empty() {
        return Err(CommandError::InUse {
            what: format!("security group {}", g.name),
            users: users.into_iter().collect(),
        });
    }
    crate::model::delete_named(conn, &g)?;
    Ok(Outcome::Done)
}

fn add_security_rule(
    conn: &Connection,
    group: &str,
    rule: &SecurityRule,
) -> Result<Outcome, CommandError> {
    let mut g = require_group(conn, group)?;
    if g.rules.len() >= MAX_RULES {
        return Err(invalid(
            "rule",
            format!("security group {} already has {MAX_RULES} rules", g.name),
        ));
    }
    if g.rules.iter().any(|r| r.id == rule.id) {
        return Err(CommandError::NameTaken {
            kind: "rule id".into(),
            name: rule.id.clone(),
        });
    }
    let mut rule = rule.clone();
    validate_rule(conn, &mut rule)?;
    let same = |r: &SecurityRule| {
        (r.direction, r.protocol, r.port_min, r.port_max, &r.remote)
            == (
                rule.direction,
                rule.protocol,
                rule.port_min,
                rule.port_max,
                &rule.remote,
            )
    };
    if let Some(existing) = g.rules.iter().find(|r| same(r)) {
        return Err(invalid(
            "rule",
            format!(
                "security group {} already has this rule (rule {})",
                g.name, existing.id
            ),
        ));
    }
    g.rules.push(rule.clone());
    g.revision += 1;
    put(conn, &g)?;
    Ok(Outcome::Created { id: rule.id })
}

fn allocate_floating_ip(
    conn: &Connection,
    ip: &Option<Ipv4Addr>,
    now_ms: u64,
) -> Result<Outcome, CommandError> {
    let range = read::<crate::model::Setting>(conn, FLOATING_IP_RANGE)?.ok_or_else(|| {
        invalid(
            "floating IP",
            format!(
                "no floating-IP range is configured: set {FLOATING_IP_RANGE} to FIRST-LAST first"
            ),
        )
    })?;
    let (first, last) = parse_range(&range.value).map_err(|r| invalid("floating IP range", r))?;
    let taken: BTreeSet<Ipv4Addr> = list::<FloatingIp>(conn)
        .map_err(store_err)?
        .into_iter()
        .map(|f| f.ip)
        .collect();
    let ip = match ip {
        Some(ip) => {
            if !(u32::from(first)..=u32::from(last)).contains(&u32::from(*ip)) {
                return Err(invalid(
                    "floating IP",
                    format!("{ip} is outside the floating-IP range {}", range.value),
                ));
            }
            if taken.contains(ip) {
                return Err(CommandError::NameTaken {
                    kind: "floating IP".into(),
                    name: ip.to_string(),
                });
            }
            *ip
        }
        None => (u32::from(first)..=u32::from(last))
            .map(Ipv4Addr::from)
            .find(|ip| !taken.contains(ip))
            .ok_or_else(|| {
                invalid(
                    "floating IP",
                    format!(
                        "every address of {} is allocated: release one or widen the range",
                        range.value
                    ),
                )
            })?,
    };
    put(
        conn,
        &FloatingIp {
            ip,
            target: None,
            allocated_at_ms: now_ms,
        },
    )?;
    Ok(Outcome::Created { id: ip.to_string() })
}

fn attach_floating_ip(
    conn: &Connection,
    ip: Ipv4Addr,
    vm: &str,
    network: &Option<String>,
    ports: &[PortForward],
) -> Result<Outcome, CommandError> {
    let mut fip = require_fip(conn, ip)?;
    let vm = crate::model::compute::find_vm(conn, vm)
        .map_err(store_err)?
        .ok_or_else(|| CommandError::VmUnknown { vm: vm.to_owned() })?;
    if let Some(t) = &fip.target {
        if t.vm_id != vm.id {
            return Err(CommandError::InUse {
                what: format!("floating IP {ip}"),
                users: vec![format!("VM {}", t.vm_id)],
            });
        }
    }
    let wanted = match network {
        Some(n) => Some(require_network(conn, n)?.id),
        None => None,
    };
    let mut candidates = Vec::new();
    for nic in &vm.spec.nics {
        let (Some(net_id), Some(ip)) = (&nic.network, &nic.ip) else {
            continue;
        };
        if wanted.as_ref().is_some_and(|w| w != net_id) {
            continue;
        }
        let Some(net) = read::<Network>(conn, net_id)? else {
            continue;
        };
        if net.external {
            candidates.push((
                net,
                ip.parse::<Ipv4Addr>()
                    .map_err(|_| invalid("ip", format!("VM {} has a bad address {ip}", vm.name)))?,
            ));
        }
    }
    let (net, private_ip) =
        match candidates.len() {
            1 => candidates.remove(0),
            0 => {
                return Err(invalid(
                    "floating IP",
                    format!(
                    "VM {} has no NIC on an external network{}: create the network with --external",
                    vm.name,
                    network.as_ref().map(|n| format!(" {n}")).unwrap_or_default()
                ),
                ))
            }
            _ => {
                return Err(invalid(
                    "floating IP",
                    format!(
                        "VM {} has NICs on several external networks: name one with --network",
                        vm.name
                    ),
                ))
            }
        };
    let mut ports = ports.to_vec();
    ports.sort();
    for pair in ports.windows(2) {
        if (pair[0].protocol, pair[0].public_port) == (pair[1].protocol, pair[1].public_port) {
            return Err(invalid(
                "ports",
                format!("public port {} is forwarded twice", pair[0].public_port),
            ));
        }
    }
    if ports
        .iter()
        .any(|p| p.public_port == 0 || p.private_port == 0)
    {
        return Err(invalid("ports", "ports are 1-65535"));
    }
    fip.target = Some(FipTarget {
        vm_id: vm.id.clone(),
        network_id: net.id.clone(),
        private_ip,
        ports,
    });
    put(conn, &fip)?;
    Ok(Outcome::Done)
}

fn detach_floating_ip(conn: &Connection, ip: Ipv4Addr) -> Result<Outcome, CommandError> {
    let mut fip = require_fip(conn, ip)?;
    if fip.target.take().is_none() {
        return Ok(Outcome::Unchanged);
    }
    put(conn, &fip)?;
    Ok(Outcome::Done)
}

fn release_floating_ip(conn: &Connection, ip: Ipv4Addr) -> Result<Outcome, CommandError> {
    let fip = require_fip(conn, ip)?;
    if let Some(t) = &fip.target {
        return Err(CommandError::InUse {
            what: format!("floating IP {ip}"),
            users: vec![format!("VM {} (detach it first)", t.vm_id)],
        });
    }
    delete::<FloatingIp>(conn, &fip.key())?;
    Ok(Outcome::Done)
}

fn delete_security_rule(
    conn: &Connection,
    group: &str,
    rule_id: &str,
) -> Result<Outcome, CommandError> {
    let mut g = require_group(conn, group)?;
    // The whole id, or a prefix of at least 4 characters that names one rule.
    let exact = g.rules.iter().any(|r| r.id == *rule_id);
    let matching: Vec<String> = g
        .rules
        .iter()
        .filter(|r| r.id == *rule_id || (!exact && rule_id.len() >= 4 && r.id.starts_with(rule_id)))
        .map(|r| r.id.clone())
        .collect();
    match matching.as_slice() {
        [] => {
            return Err(CommandError::RuleUnknown {
                group: g.name.clone(),
                rule: rule_id.to_owned(),
            })
        }
        [one] => g.rules.retain(|r| r.id != *one),
        _ => {
            return Err(invalid(
                "rule",
                format!(
                    "{rule_id:?} matches {} rules of {}: give more of the id",
                    matching.len(),
                    g.name
                ),
            ))
        }
    }
    g.revision += 1;
    put(conn, &g)?;
    Ok(Outcome::Done)
}

fn validate_physical(
    host: &Host,
    role: NetRole,
    net: &PhysicalNetwork,
) -> Result<(), CommandError> {
    let field = format!("{} network", role.as_str());
    let Some(inv) = &host.inventory else {
        return Err(invalid(
            &field,
            format!(
                "host {} has not reported its interfaces yet: try again in a few seconds",
                host.name
            ),
        ));
    };
    let Some(nic) = inv.nics.iter().find(|n| n.name == net.interface) else {
        let names: Vec<&str> = inv.nics.iter().map(|n| n.name.as_str()).collect();
        return Err(invalid(
            &field,
            format!(
                "host {} has no interface {:?} (it has: {})",
                host.name,
                net.interface,
                names.join(", ")
            ),
        ));
    };
    let want = net.address.to_string();
    let on_nic = nic.addresses.iter().any(|a| {
        Ipv4Cidr::parse(a, false).is_ok_and(|c| c.prefix_len == net.address.prefix_len)
            && a.split('/').next() == Some(net.address.addr.to_string().as_str())
    });
    if !on_nic {
        return Err(invalid(
            &field,
            format!(
                "address {want} is not configured on {} of host {} (it has: {}): configure it on the host first",
                net.interface,
                host.name,
                if nic.addresses.is_empty() {
                    "no address".to_string()
                } else {
                    nic.addresses.join(", ")
                }
            ),
        ));
    }
    if let Some(gw) = net.gateway {
        let subnet = Ipv4Cidr::parse(&want, false).map_err(|r| invalid(&field, r))?;
        if role != NetRole::Public {
            return Err(invalid(&field, "only the public network has a gateway"));
        }
        if !subnet.contains(gw) {
            return Err(invalid(&field, format!("gateway {gw} is not on {subnet}")));
        }
    }
    Ok(())
}

fn allocate_vni(conn: &Connection, network_id: &str) -> Result<u32, CommandError> {
    let span = u64::from(VNI_LAST - VNI_FIRST + 1);
    for _ in 0..span {
        // A rotating counter rather than the lowest free VNI: a VNI freed by a delete is
        // not handed out again until every other one was, so a host still tearing down
        // the old segment never meets the new one.
        let n = next_counter(conn, "vni", 0)?;
        let vni = VNI_FIRST + (n % span) as u32;
        if read::<VniUse>(conn, &format!("{vni:08}"))?.is_none() {
            put(
                conn,
                &VniUse {
                    vni,
                    network_id: network_id.to_string(),
                },
            )?;
            return Ok(vni);
        }
    }
    Err(invalid(
        "network",
        format!("every VNI ({VNI_FIRST}-{VNI_LAST}) is in use: delete unused networks first"),
    ))
}
