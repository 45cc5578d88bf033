//! `keel fip …`: floating IPs — public addresses from `network.floating-ip-range`, pointed
//! at a VM on an external network (1:1 NAT, or only some forwarded ports).

use clap::Subcommand;
use serde_json::json;

use crate::output::{print, table, Output};
use keel_api_types::*;
use keel_client::LocalClient;

#[derive(Debug, Subcommand)]
pub enum FipCmd {
    /// Take an address from the floating-IP range (set `network.floating-ip-range` first).
    Allocate {
        /// A specific address of the range (default: the lowest free one).
        #[arg(long)]
        ip: Option<String>,
    },
    /// List the allocated floating IPs and where they point.
    List,
    /// Show one floating IP.
    Show { ip: String },
    /// Point a floating IP at a VM's NIC on an external network: 1:1 NAT, or only the
    /// given ports. Attaching again replaces the ports.
    Attach {
        ip: String,
        /// The VM (name or id).
        vm: String,
        /// The VM's external network, when it has NICs on several.
        #[arg(long)]
        network: Option<String>,
        /// Forward only this port (repeatable): tcp:PUBLIC:VM-PORT, or udp:PORT.
        #[arg(long = "port")]
        ports: Vec<String>,
    },
    /// Stop pointing the floating IP anywhere (it stays allocated).
    Detach { ip: String },
    /// Give the address back to the range.
    Release { ip: String },
}

fn target_text(f: &FloatingIpView) -> String {
    match (&f.vm_name, &f.private_ip) {
        (Some(vm), Some(ip)) => {
            let ports = if f.ports.is_empty() {
                "1:1".to_string()
            } else {
                f.ports
                    .iter()
                    .map(|p| p.forward.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            format!("{vm} ({ip}, {ports})")
        }
        _ => "-".into(),
    }
}

fn rows(fips: &[FloatingIpView]) -> String {
    table(
        &["IP", "TARGET", "NETWORK", "HOST"],
        fips.iter()
            .map(|f| {
                vec![
                    f.ip.clone(),
                    target_text(f),
                    f.network.clone().unwrap_or_else(|| "-".into()),
                    f.host_name.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    )
}

pub async fn run(client: &LocalClient, output: Output, cmd: FipCmd) -> anyhow::Result<()> {
    match cmd {
        FipCmd::Allocate { ip } => {
            let f = client
                .allocate_floating_ip(&FloatingIpAllocateRequest { ip })
                .await?;
            print(output, &f, |f| {
                format!(
                    "Floating IP {} allocated; point it at a VM with `keel fip attach {} VM`.\n",
                    f.ip, f.ip
                )
            })
        }
        FipCmd::List => {
            let fips = client.floating_ips().await?;
            print(output, &fips, |f| rows(f))
        }
        FipCmd::Show { ip } => {
            let f = client.floating_ip(&ip).await?;
            print(output, &f, |f| rows(std::slice::from_ref(f)))
        }
        FipCmd::Attach {
            ip,
            vm,
            network,
            ports,
        } => {
            let f = client
                .attach_floating_ip(&ip, &FloatingIpAttachRequest { vm, network, ports })
                .await?;
            print(output, &f, |f| {
                format!("Floating IP {} → {}.\n", f.ip, target_text(f))
            })
        }
        FipCmd::Detach { ip } => {
            client.detach_floating_ip(&ip).await?;
            print(output, &json!({ "detached": ip }), |_| {
                format!("Floating IP {ip} detached.\n")
            })
        }
        FipCmd::Release { ip } => {
            client.release_floating_ip(&ip).await?;
            print(output, &json!({ "released": ip }), |_| {
                format!("Floating IP {ip} released.\n")
            })
        }
    }
}
