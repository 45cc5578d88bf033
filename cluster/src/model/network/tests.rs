use super::super::compute::{BootSource, ComputeCommand, ImageFormat, NicSpec, Template, VmSpec};
use super::super::nic::release_vm;
use super::super::{
    apply as apply_cmd, test_init_command, Command, HypervisorReport, Inventory, Nic, SCHEMA,
};
use super::*;

fn db() -> Connection {
    let conn = Connection::open_in_memory().expect("open");
    conn.execute_batch(SCHEMA).expect("schema");
    apply_cmd(&conn, &test_init_command()).expect("init");
    let mut host = super::super::host(&conn, 1).expect("read").expect("host 1");
    let ip = host.peer_addr.split(':').next().unwrap().to_string();
    host.inventory = Some(Inventory {
        cpus: 4,
        memory_bytes: 16 << 30,
        nics: vec![Nic {
            name: "eth0".into(),
            mtu: 1500,
            addresses: vec![format!("{ip}/24")],
            up: true,
            ..Default::default()
        }],
        hypervisor: Some(HypervisorReport {
            domain_type: "qemu".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    put(&conn, &host).expect("put host");
    apply_cmd(
        &conn,
        &Command::Compute {
            command: ComputeCommand::RegisterTemplate {
                template: Template {
                    id: "t-tiny".into(),
                    name: "tiny".into(),
                    format: ImageFormat::Qcow2,
                    size_bytes: 10 << 20,
                    virtual_size_bytes: 64 << 20,
                    sha256: "a".repeat(64),
                    replicas: vec![1],
                    created_at_ms: 1,
                },
            },
        },
    )
    .expect("template");
    conn
}

fn net_cmd(conn: &Connection, command: NetworkCommand) -> Result<Outcome, CommandError> {
    apply_cmd(conn, &Command::Network { command })
}

fn create_net(conn: &Connection, name: &str, cidr: &str) -> Result<Outcome, CommandError> {
    net_cmd(
        conn,
        NetworkCommand::CreateNetwork {
            network_id: format!("id-{name}"),
            name: name.into(),
            cidr: cidr.into(),
            gateway: None,
            dns_domain: None,
            mtu: None,
            external: false,
            now_ms: 1,
        },
    )
}

fn create_vm(conn: &Connection, name: &str, nics: Vec<NicSpec>) -> Result<Outcome, CommandError> {
    apply_cmd(
        conn,
        &Command::Compute {
            command: ComputeCommand::CreateVm {
                vm_id: format!("vm-{name}"),
                name: name.into(),
                spec: VmSpec {
                    vcpus: 1,
                    memory_mib: 128,
                    boot: BootSource::Template {
                        template: "tiny".into(),
                    },
                    root_disk_gib: None,
                    data_disks: vec![],
                    nics,
                    cloud_init: Default::default(),
                    affinity_group: None,
                    ha: false,
                },
                start: true,
                stop_timeout_s: 30,
                op_id: format!("op-{name}"),
                now_ms: 1,
            },
        },
    )
}

fn on(net: &str) -> NicSpec {
    NicSpec {
        network: Some(net.into()),
        ..Default::default()
    }
}

#[test]
fn networks_get_unique_vnis_defaults_and_mtu_checks() {
    let conn = db();
    create_net(&conn, "blue", "10.0.0.0/24").unwrap();
    // Two tenants may use the same CIDR.
    create_net(&conn, "green", "10.0.0.0/24").unwrap();
    let blue = find_network(&conn, "blue").unwrap().unwrap();
    let green = find_network(&conn, "green").unwrap().unwrap();
    assert_ne!(blue.vni, green.vni);
    assert!((VNI_FIRST..=VNI_LAST).contains(&blue.vni));
    assert_eq!(blue.gateway.to_string(), "10.0.0.1");
    assert_eq!(blue.mtu, 1450, "underlay 1500 minus 50");
    assert_eq!(blue.dns_domain, "blue.internal");
    assert_eq!(blue.bridge(), format!("kbr{}", blue.vni));
    let e = create_net(&conn, "blue", "10.9.0.0/24").unwrap_err();
    assert!(matches!(e, CommandError::NameTaken { .. }), "{e}");
    let e = create_net(&conn, "bad", "10.0.0.5/24").unwrap_err();
    assert!(e.to_string().contains("host bits"), "{e}");
    let e = create_net(&conn, "bad", "10.0.0.0/30").unwrap_err();
    assert!(e.to_string().contains("prefix length"), "{e}");
    let e = net_cmd(
        &conn,
        NetworkCommand::CreateNetwork {
            network_id: "id-big".into(),
            name: "big".into(),
            cidr: "10.1.0.0/24".into(),
            gateway: Some("10.1.0.254".parse().unwrap()),
            dns_domain: Some("Corp.Example.".into()),
            mtu: Some(1500),
            external: false,
            now_ms: 1,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("mtu"), "{e}");
    let e = net_cmd(
        &conn,
        NetworkCommand::CreateNetwork {
            network_id: "id-big".into(),
            name: "big".into(),
            cidr: "10.1.0.0/24".into(),
            gateway: Some("10.2.0.1".parse().unwrap()),
            dns_domain: None,
            mtu: None,
            external: false,
            now_ms: 1,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a host address"), "{e}");
    // Deleting frees the VNI record but the counter moves on.
    net_cmd(
        &conn,
        NetworkCommand::DeleteNetwork {
            network: "blue".into(),
        },
    )
    .unwrap();
    create_net(&conn, "blue2", "10.0.0.0/24").unwrap();
    let blue2 = find_network(&conn, "blue2").unwrap().unwrap();
    assert_ne!(blue2.vni, blue.vni);
    assert_ne!(blue2.vni, green.vni);
}

#[test]
fn ipam_leases_unique_addresses_and_frees_them() {
    let conn = db();
    create_net(&conn, "blue", "10.0.0.0/29").unwrap();
    create_vm(&conn, "a", vec![on("blue")]).unwrap();
    create_vm(&conn, "b", vec![on("blue")]).unwrap();
    let leases = network_leases(&conn, "id-blue").unwrap();
    let ips: Vec<String> = leases.iter().map(|l| l.ip.to_string()).collect();
    assert_eq!(ips, ["10.0.0.2", "10.0.0.3"], "gateway .1 skipped");
    let a = super::super::compute::find_vm(&conn, "a").unwrap().unwrap();
    assert_eq!(a.spec.nics[0].network.as_deref(), Some("id-blue"));
    assert_eq!(a.spec.nics[0].ip.as_deref(), Some("10.0.0.2"));
    assert!(a.spec.nics[0].bridge.starts_with("kbr"));
    // A fixed address: taken → clear error; outside → clear error; free → granted.
    let mut fixed = on("blue");
    fixed.ip = Some("10.0.0.3".into());
    let e = create_vm(&conn, "c", vec![fixed.clone()]).unwrap_err();
    assert!(matches!(e, CommandError::AddressInUse { .. }), "{e}");
    fixed.ip = Some("10.0.1.3".into());
    let e = create_vm(&conn, "c", vec![fixed.clone()]).unwrap_err();
    assert!(e.to_string().contains("not a host address"), "{e}");
    fixed.ip = Some("10.0.0.1".into());
    let e = create_vm(&conn, "c", vec![fixed.clone()]).unwrap_err();
    assert!(e.to_string().contains("gateway"), "{e}");
    fixed.ip = Some("10.0.0.6".into());
    create_vm(&conn, "c", vec![fixed]).unwrap();
    // A refused create leases nothing (the rejection rolls back).
    create_vm(&conn, "d", vec![on("blue")]).unwrap(); // .4
    create_vm(&conn, "e", vec![on("blue")]).unwrap(); // .5
    let e = create_vm(&conn, "f", vec![on("blue")]).unwrap_err();
    assert!(matches!(e, CommandError::NetworkFull { .. }), "{e}");
    let e = create_vm(&conn, "f", vec![on("nope")]).unwrap_err();
    assert!(matches!(e, CommandError::NetworkUnknown { .. }), "{e}");
    // The network cannot go while VMs use it.
    let e = net_cmd(
        &conn,
        NetworkCommand::DeleteNetwork {
            network: "blue".into(),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("VM a"), "{e}");
    // Views: every port, unplaced for now.
    let views = network_views(&conn).unwrap();
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].ports.len(), 5);
    assert!(views[0].hosts().is_empty());
}

#[test]
fn bridges_of_guest_networks_need_the_network() {
    let conn = db();
    create_net(&conn, "blue", "10.0.0.0/24").unwrap();
    let vni = find_network(&conn, "blue").unwrap().unwrap().vni;
    let e = create_vm(
        &conn,
        "sneaky",
        vec![NicSpec {
            bridge: format!("kbr{vni}"),
            ..Default::default()
        }],
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("attach the NIC to the network"),
        "{e}"
    );
    let e = create_vm(
        &conn,
        "x",
        vec![NicSpec {
            bridge: "br0".into(),
            ip: Some("10.0.0.5".into()),
            ..Default::default()
        }],
    )
    .unwrap_err();
    assert!(e.to_string().contains("guest network"), "{e}");
    // Same MAC twice on guest networks: refused.
    let mut nic = on("blue");
    nic.mac = Some("52:54:00:aa:00:01".into());
    create_vm(&conn, "m1", vec![nic.clone()]).unwrap();
    let e = create_vm(&conn, "m2", vec![nic]).unwrap_err();
    assert!(e.to_string().contains("MAC"), "{e}");
}

#[test]
fn security_groups_and_rules() {
    let conn = db();
    create_net(&conn, "blue", "10.0.0.0/24").unwrap();
    for (id, name) in [("g-web", "web"), ("g-db", "db")] {
        net_cmd(
            &conn,
            NetworkCommand::CreateSecurityGroup {
                group_id: id.into(),
                name: name.into(),
                now_ms: 1,
            },
        )
        .unwrap();
    }
    let rule = |id: &str, proto, lo, hi, remote| SecurityRule {
        id: id.into(),
        direction: Direction::Ingress,
        protocol: proto,
        port_min: lo,
        port_max: hi,
        remote,
    };
    let any = RuleRemote::Cidr {
        cidr: Ipv4Cidr::parse("0.0.0.0/0", true).unwrap(),
    };
    let add = |r: SecurityRule| {
        net_cmd(
            &conn,
            NetworkCommand::AddSecurityRule {
                group: "db".into(),
                rule: r,
            },
        )
    };
    add(rule(
        "r1aaaa",
        RuleProtocol::Tcp,
        Some(5432),
        None,
        RuleRemote::Group {
            group: "web".into(),
        },
    ))
    .unwrap();
    let g = find_group(&conn, "db").unwrap().unwrap();
    assert_eq!(g.rules[0].port_max, Some(5432));
    assert_eq!(
        g.rules[0].remote,
        RuleRemote::Group {
            group: "g-web".into()
        }
    );
    assert_eq!(g.revision, 2);
    let e = add(rule("r2", RuleProtocol::Icmp, Some(1), None, any.clone())).unwrap_err();
    assert!(e.to_string().contains("tcp and udp"), "{e}");
    let e = add(rule(
        "r2",
        RuleProtocol::Tcp,
        Some(90),
        Some(80),
        any.clone(),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("low to high"), "{e}");
    let e = add(rule(
        "r2",
        RuleProtocol::Tcp,
        None,
        None,
        RuleRemote::Group {
            group: "nope".into(),
        },
    ))
    .unwrap_err();
    assert!(
        matches!(e, CommandError::SecurityGroupUnknown { .. }),
        "{e}"
    );
    let e = add(rule(
        "r3",
        RuleProtocol::Tcp,
        Some(5432),
        Some(5432),
        RuleRemote::Group {
            group: "g-web".into(),
        },
    ))
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("already has this rule (rule r1aaaa)"),
        "{e}"
    );
    // A NIC in "web"; "web" cannot go while used by a NIC and by db's rule.
    let mut nic = on("blue");
    nic.security_groups = vec!["web".into()];
    create_vm(&conn, "a", vec![nic]).unwrap();
    let a = super::super::compute::find_vm(&conn, "a").unwrap().unwrap();
    assert_eq!(a.spec.nics[0].security_groups, ["g-web"]);
    let e = net_cmd(
        &conn,
        NetworkCommand::DeleteSecurityGroup {
            group: "web".into(),
        },
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("VM a") && text.contains("rules of security group db"),
        "{text}"
    );
    // Rules are deleted by id or a unique prefix of at least 4 characters.
    let e = net_cmd(
        &conn,
        NetworkCommand::DeleteSecurityRule {
            group: "db".into(),
            rule_id: "zzzz".into(),
        },
    )
    .unwrap_err();
    assert!(matches!(e, CommandError::RuleUnknown { .. }), "{e}");
    net_cmd(
        &conn,
        NetworkCommand::DeleteSecurityRule {
            group: "db".into(),
            rule_id: "r1aa".into(),
        },
    )
    .unwrap();
    assert!(find_group(&conn, "db").unwrap().unwrap().rules.is_empty());
    let mut nic = on("blue");
    nic.security_groups = vec!["missing".into()];
    let e = create_vm(&conn, "b", vec![nic]).unwrap_err();
    assert!(
        matches!(e, CommandError::SecurityGroupUnknown { .. }),
        "{e}"
    );
}

#[test]
fn floating_ips_come_from_the_range_and_attach_to_external_nics() {
    let conn = db();
    let alloc = |ip: Option<&str>| {
        net_cmd(
            &conn,
            NetworkCommand::AllocateFloatingIp {
                ip: ip.map(|i| i.parse().unwrap()),
                now_ms: 1,
            },
        )
    };
    let e = alloc(None).unwrap_err();
    assert!(e.to_string().contains(FLOATING_IP_RANGE), "{e}");
    apply_cmd(
        &conn,
        &Command::PutSetting {
            key: FLOATING_IP_RANGE.into(),
            value: "192.0.2.10-192.0.2.11".into(),
            now_ms: 1,
        },
    )
    .unwrap();
    let e = apply_cmd(
        &conn,
        &Command::PutSetting {
            key: FLOATING_IP_RANGE.into(),
            value: "192.0.2.11-192.0.2.10".into(),
            now_ms: 1,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("low to high"), "{e}");
    assert_eq!(
        alloc(None).unwrap(),
        Outcome::Created {
            id: "192.0.2.10".into()
        }
    );
    assert!(alloc(Some("192.0.2.10")).is_err(), "taken");
    assert!(alloc(Some("192.0.2.99"))
        .unwrap_err()
        .to_string()
        .contains("outside"));
    alloc(Some("192.0.2.11")).unwrap();
    assert!(alloc(None)
        .unwrap_err()
        .to_string()
        .contains("every address"));

    create_net(&conn, "inner", "10.0.0.0/24").unwrap();
    net_cmd(
        &conn,
        NetworkCommand::CreateNetwork {
            network_id: "id-outer".into(),
            name: "outer".into(),
            cidr: "10.1.0.0/24".into(),
            gateway: None,
            dns_domain: None,
            mtu: None,
            external: true,
            now_ms: 1,
        },
    )
    .unwrap();
    create_vm(&conn, "a", vec![on("inner")]).unwrap();
    create_vm(&conn, "b", vec![on("inner"), on("outer")]).unwrap();
    let attach = |vm: &str, ports: Vec<PortForward>| {
        net_cmd(
            &conn,
            NetworkCommand::AttachFloatingIp {
                ip: "192.0.2.10".parse().unwrap(),
                vm: vm.into(),
                network: None,
                ports,
            },
        )
    };
    let e = attach("a", vec![]).unwrap_err();
    assert!(e.to_string().contains("external network"), "{e}");
    let fwd = |p, q| PortForward {
        protocol: ForwardProtocol::Tcp,
        public_port: p,
        private_port: q,
    };
    let e = attach("b", vec![fwd(80, 8080), fwd(80, 8081)]).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    attach("b", vec![fwd(80, 8080)]).unwrap();
    let fip = require_fip(&conn, "192.0.2.10".parse().unwrap()).unwrap();
    let t = fip.target.unwrap();
    assert_eq!(t.network_id, "id-outer");
    assert_eq!(t.private_ip.to_string(), "10.1.0.2");
    let e = net_cmd(
        &conn,
        NetworkCommand::ReleaseFloatingIp {
            ip: "192.0.2.10".parse().unwrap(),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("detach it first"), "{e}");
    // Deleting the VM's NIC detaches the floating IP; then it can be released.
    let b = super::super::compute::find_vm(&conn, "b").unwrap().unwrap();
    release_vm(&conn, &b).unwrap();
    assert!(require_fip(&conn, "192.0.2.10".parse().unwrap())
        .unwrap()
        .target
        .is_none());
    net_cmd(
        &conn,
        NetworkCommand::ReleaseFloatingIp {
            ip: "192.0.2.10".parse().unwrap(),
        },
    )
    .unwrap();
}

#[test]
fn host_networks_default_and_validation() {
    let conn = db();
    let host = super::super::host(&conn, 1).unwrap().unwrap();
    let nets = host_networks(&conn, &host).unwrap();
    let underlay = &nets.roles[&NetRole::GuestUnderlay];
    assert_eq!(underlay.interface, "eth0");
    assert_eq!(underlay.address.prefix_len, 24);
    let ip = host.peer_addr.split(':').next().unwrap();
    let set = |iface: &str, addr: &str, gw: Option<&str>| {
        net_cmd(
            &conn,
            NetworkCommand::SetHostNetwork {
                host_id: 1,
                role: NetRole::Public,
                network: Some(PhysicalNetwork {
                    interface: iface.into(),
                    address: Ipv4Cidr::parse(addr, false).unwrap(),
                    gateway: gw.map(|g| g.parse().unwrap()),
                }),
            },
        )
    };
    let e = set("eth9", &format!("{ip}/24"), None).unwrap_err();
    assert!(
        e.to_string()
            .contains("has no interface \"eth9\" (it has: eth0)"),
        "{e}"
    );
    let e = set("eth0", "192.0.2.7/24", None).unwrap_err();
    assert!(e.to_string().contains("is not configured on eth0"), "{e}");
    let e = set("eth0", &format!("{ip}/24"), Some("192.0.2.1")).unwrap_err();
    assert!(e.to_string().contains("not on"), "{e}");
    set("eth0", &format!("{ip}/24"), None).unwrap();
    assert_eq!(
        set("eth0", &format!("{ip}/24"), None).unwrap(),
        Outcome::Unchanged
    );
    let nets = host_networks(&conn, &host).unwrap();
    assert_eq!(nets.roles[&NetRole::Public].interface, "eth0");
}

#[test]
fn cidr_parsing() {
    let c = Ipv4Cidr::parse("10.1.2.0/24", true).unwrap();
    assert_eq!(c.to_string(), "10.1.2.0/24");
    assert!(c.contains("10.1.2.200".parse().unwrap()));
    assert!(!c.contains("10.1.3.1".parse().unwrap()));
    assert_eq!(c.broadcast().to_string(), "10.1.2.255");
    assert_eq!(c.hosts().count(), 254);
    assert_eq!(c.netmask().to_string(), "255.255.255.0");
    let e = Ipv4Cidr::parse("10.1.2.5/24", true).unwrap_err();
    assert!(e.to_string().contains("did you mean 10.1.2.0/24"), "{e}");
    assert!(Ipv4Cidr::parse("10.1.2.0", true).is_err());
    assert!(Ipv4Cidr::parse("10.1.2.0/33", true).is_err());
    assert!(Ipv4Cidr::parse("x/24", true).is_err());
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(json, "\"10.1.2.0/24\"");
    assert_eq!(serde_json::from_str::<Ipv4Cidr>(&json).unwrap(), c);
}

#[test]
fn roles_parse() {
    assert_eq!(
        NetRole::parse("guest-underlay"),
        Some(NetRole::GuestUnderlay)
    );
    assert_eq!(NetRole::parse("public"), Some(NetRole::Public));
    assert_eq!(NetRole::parse("nope"), None);
}
