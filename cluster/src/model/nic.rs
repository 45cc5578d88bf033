//! The seam compute and network share: a VM NIC on a guest network. Creating a VM or
//! attaching a NIC takes an address from the network's IPAM (a lease in raft, allocated
//! while the entry applies, so concurrent creates never collide); deleting the VM or
//! detaching the NIC gives it back. Compute calls in here; network's records are read
//! here; neither of them calls the other for it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use rusqlite::Connection;

use super::compute::{NicSpec, Vm};
use super::network::FloatingIp;
use super::network::{
    lease_key, network_leases, require_group, require_network, IpLease, Network, MAX_GROUPS_PER_NIC,
};
use super::{delete, invalid, list, put, store_err, CommandError};

/// Gives a VM NIC an address on its network: the one it asked for if free, else the
/// lowest free one.
fn allocate_ip(
    conn: &Connection,
    net: &Network,
    wanted: Option<Ipv4Addr>,
    vm_id: &str,
    mac: &str,
) -> Result<Ipv4Addr, CommandError> {
    let taken: BTreeSet<Ipv4Addr> = network_leases(conn, &net.id)
        .map_err(store_err)?
        .into_iter()
        .map(|l| l.ip)
        .collect();
    let ip = match wanted {
        Some(ip) => {
            if !net.cidr.contains(ip) || ip == net.cidr.addr || ip == net.cidr.broadcast() {
                return Err(invalid(
                    "ip",
                    format!(
                        "{ip} is not a host address of network {} ({})",
                        net.name, net.cidr
                    ),
                ));
            }
            if ip == net.gateway {
                return Err(invalid(
                    "ip",
                    format!("{ip} is the gateway of network {}", net.name),
                ));
            }
            if taken.contains(&ip) {
                return Err(CommandError::AddressInUse {
                    network: net.name.clone(),
                    ip: ip.to_string(),
                });
            }
            ip
        }
        None => net
            .cidr
            .hosts()
            .find(|ip| *ip != net.gateway && !taken.contains(ip))
            .ok_or_else(|| CommandError::NetworkFull {
                network: net.name.clone(),
                cidr: net.cidr.to_string(),
            })?,
    };
    put(
        conn,
        &IpLease {
            network_id: net.id.clone(),
            ip,
            vm_id: vm_id.to_string(),
            mac: mac.to_string(),
        },
    )?;
    Ok(ip)
}

/// Completes a NIC on a guest network for a new VM or a NIC attach: resolves the network,
/// names the bridge, checks the security groups and leases an address. `nic.mac` must
/// already be set.
pub(super) fn prepare_nic(
    conn: &Connection,
    nic: &mut NicSpec,
    vm_id: &str,
) -> Result<(), CommandError> {
    let mac = nic.mac.clone().unwrap_or_default();
    if nic.security_groups.len() > MAX_GROUPS_PER_NIC {
        return Err(invalid(
            "security groups",
            format!("at most {MAX_GROUPS_PER_NIC} per NIC"),
        ));
    }
    let mut groups = Vec::new();
    for g in &nic.security_groups {
        let group = require_group(conn, g)?;
        if !groups.contains(&group.id) {
            groups.push(group.id);
        }
    }
    nic.security_groups = groups;
    if nic.network.is_some() && !nic.bridge.is_empty() {
        return Err(invalid(
            "nic",
            "a NIC is on a guest network or on a host bridge, not both",
        ));
    }
    let Some(network) = nic.network.clone() else {
        if nic.bridge.starts_with(keel_base::names::BRIDGE_PREFIX) {
            return Err(invalid(
                "bridge",
                format!(
                    "{:?} is a guest network's bridge: attach the NIC to the network instead",
                    nic.bridge
                ),
            ));
        }
        if nic.ip.is_some() {
            return Err(invalid(
                "ip",
                "an address can only be given for a NIC on a guest network",
            ));
        }
        if !nic.security_groups.is_empty() {
            return Err(invalid(
                "security groups",
                "security groups apply to NICs on guest networks only",
            ));
        }
        return Ok(());
    };
    let net = require_network(conn, &network)?;
    if let Some(other) = list::<IpLease>(conn)
        .map_err(store_err)?
        .into_iter()
        .find(|l| l.mac.eq_ignore_ascii_case(&mac))
    {
        return Err(CommandError::NameTaken {
            kind: "MAC address".into(),
            name: format!("{mac} (used by VM {})", other.vm_id),
        });
    }
    let wanted = match &nic.ip {
        None => None,
        Some(text) => Some(
            text.parse::<Ipv4Addr>()
                .map_err(|_| invalid("ip", format!("{text:?} is not an IPv4 address")))?,
        ),
    };
    let ip = allocate_ip(conn, &net, wanted, vm_id, &mac)?;
    nic.network = Some(net.id.clone());
    nic.bridge = net.bridge();
    nic.ip = Some(ip.to_string());
    Ok(())
}

/// Frees every address a VM holds (it is deleted, or its creation was refused).
pub(super) fn release_vm(conn: &Connection, vm: &Vm) -> Result<(), CommandError> {
    for nic in &vm.spec.nics {
        release_nic(conn, nic)?;
    }
    Ok(())
}

pub(super) fn release_nic(conn: &Connection, nic: &NicSpec) -> Result<(), CommandError> {
    if let (Some(net), Some(ip)) = (&nic.network, &nic.ip) {
        if let Ok(ip) = ip.parse::<Ipv4Addr>() {
            delete::<IpLease>(conn, &lease_key(net, ip))?;
            // A floating IP pointing at the NIC is detached (kept allocated).
            for mut fip in list::<FloatingIp>(conn).map_err(store_err)? {
                if fip
                    .target
                    .as_ref()
                    .is_some_and(|t| t.network_id == *net && t.private_ip == ip)
                {
                    fip.target = None;
                    put(conn, &fip)?;
                }
            }
        }
    }
    Ok(())
}
