use super::super::{
    apply as apply_cmd, test_init_command, Command, HypervisorReport, Inventory, SCHEMA,
};
use super::*;

fn db_with_hosts(n: u64) -> Connection {
    let conn = Connection::open_in_memory().expect("open");
    conn.execute_batch(SCHEMA).expect("schema");
    apply_cmd(&conn, &test_init_command()).expect("init");
    for id in 1..=n {
        let mut host = super::super::host(&conn, id)
            .expect("read")
            .unwrap_or_else(|| {
                let mut h = super::super::host(&conn, 1).expect("read").expect("host 1");
                h.id = id;
                h.name = format!("n{id}");
                h
            });
        host.inventory = Some(Inventory {
            cpus: 2,
            memory_bytes: 8 << 30,
            hypervisor: Some(HypervisorReport {
                domain_type: "qemu".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        put(&conn, &host).expect("put host");
    }
    template(&conn, "tiny");
    conn
}

fn template(conn: &Connection, name: &str) {
    run(
        conn,
        ComputeCommand::RegisterTemplate {
            template: Template {
                id: format!("t-{name}"),
                name: name.into(),
                format: ImageFormat::Qcow2,
                size_bytes: 10 << 20,
                virtual_size_bytes: 64 << 20,
                sha256: "a".repeat(64),
                replicas: vec![1],
                created_at_ms: 1,
            },
        },
    )
    .expect("template");
}

fn run(conn: &Connection, command: ComputeCommand) -> Result<Outcome, CommandError> {
    apply_cmd(conn, &Command::Compute { command })
}

fn spec(vcpus: u32, memory_mib: u64) -> VmSpec {
    VmSpec {
        vcpus,
        memory_mib,
        boot: BootSource::Template {
            template: "tiny".into(),
        },
        root_disk_gib: None,
        data_disks: vec![],
        nics: vec![],
        cloud_init: CloudInit::default(),
        affinity_group: None,
        ha: false,
    }
}

fn create(conn: &Connection, name: &str, spec: VmSpec) -> Result<Outcome, CommandError> {
    run(
        conn,
        ComputeCommand::CreateVm {
            vm_id: format!("id-{name}"),
            name: name.into(),
            spec,
            start: true,
            stop_timeout_s: 30,
            op_id: format!("op-create-{name}"),
            now_ms: 10,
        },
    )
}

/// Asks for VM `name` to be stopped, as operation `op_id`.
fn stop(conn: &Connection, name: &str, op_id: &str, now_ms: u64) {
    run(
        conn,
        ComputeCommand::SetVmPower {
            vm: name.into(),
            power: PowerIntent::Stopped,
            op_id: op_id.into(),
            now_ms,
        },
    )
    .expect("stop");
}

fn vm(conn: &Connection, name: &str) -> Vm {
    find_vm(conn, name).expect("read").expect("vm exists")
}

fn op(conn: &Connection, id: &str) -> Operation {
    read::<Operation>(conn, id)
        .expect("read")
        .expect("op exists")
}

fn place_all(conn: &Connection) {
    let vms: Vec<Vm> = list(conn).expect("list");
    for vm in vms.into_iter().filter(|v| v.host.is_none() && !v.deleting) {
        match candidate_hosts(conn, &vm).expect("candidates") {
            Placement::Hosts(hosts) => {
                run(
                    conn,
                    ComputeCommand::PlaceVm {
                        vm_id: vm.id.clone(),
                        host_id: hosts[0],
                        now_ms: 20,
                    },
                )
                .expect("place");
            }
            Placement::Nowhere { reason } => {
                run(
                    conn,
                    ComputeCommand::SetVmPending {
                        vm_id: vm.id.clone(),
                        reason,
                        now_ms: 20,
                    },
                )
                .expect("pending");
            }
        }
    }
}

fn report(conn: &Connection, name: &str, state: RunState, generation: u64, error: Option<&str>) {
    let v = vm(conn, name);
    run(
        conn,
        ComputeCommand::ReportVm {
            vm_id: v.id.clone(),
            host_id: v.host.expect("placed"),
            state,
            generation,
            reboot_seq: v.reboot_seq,
            error: error.map(String::from),
            now_ms: 30,
        },
    )
    .expect("report");
}

fn vm_count(conn: &Connection) -> usize {
    list::<Vm>(conn).expect("list").len()
}

#[test]
fn bad_specs_are_rejected_and_nothing_is_created() {
    let conn = db_with_hosts(3);
    let bad: Vec<(&str, VmSpec, &str)> = vec![
        ("zero", spec(0, 128), "vcpus"),
        ("huge", spec(1, 1 << 20), "more than any host"),
        (
            "notemplate",
            VmSpec {
                boot: BootSource::Template {
                    template: "nope".into(),
                },
                ..spec(1, 128)
            },
            "template \"nope\" does not exist",
        ),
        ("a'/><evil", spec(1, 128), "may only contain"),
        (
            "badkey",
            VmSpec {
                cloud_init: CloudInit {
                    user_data: None,
                    ssh_keys: vec!["not a key\nx".into()],
                },
                ..spec(1, 128)
            },
            "OpenSSH public key",
        ),
    ];
    for (name, s, want) in bad {
        let err = create(&conn, name, s).expect_err(name).to_string();
        assert!(err.contains(want), "{name}: {err}");
    }
    assert_eq!(vm_count(&conn), 0);
    assert!(list::<Operation>(&conn).expect("ops").is_empty());
    create(&conn, "web", spec(1, 128)).expect("first");
    let err = create(&conn, "web", spec(1, 128))
        .expect_err("dup")
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(vm_count(&conn), 1);
}

#[test]
fn a_create_succeeds_when_the_host_reports_it_running() {
    let conn = db_with_hosts(1);
    create(&conn, "web", spec(1, 128)).expect("create");
    assert_eq!(op(&conn, "op-create-web").state, OpState::Running);
    place_all(&conn);
    assert_eq!(vm(&conn, "web").host, Some(1));
    report(&conn, "web", RunState::Stopped, 1, None);
    assert_eq!(op(&conn, "op-create-web").state, OpState::Running);
    report(&conn, "web", RunState::Running, 1, None);
    assert_eq!(op(&conn, "op-create-web").state, OpState::Succeeded);
    assert!(vm(&conn, "web").active_ops.is_empty());
}

#[test]
fn a_reported_error_fails_the_operation_and_a_stop_cancels_a_start() {
    let conn = db_with_hosts(1);
    create(&conn, "a", spec(1, 128)).expect("create");
    place_all(&conn);
    report(&conn, "a", RunState::Absent, 0, Some("define failed: boom"));
    let o = op(&conn, "op-create-a");
    assert_eq!(o.state, OpState::Failed);
    assert!(o.detail.as_deref().unwrap_or("").contains("boom"));

    create(&conn, "b", spec(1, 128)).expect("create");
    stop(&conn, "b", "op-stop-b", 40);
    assert_eq!(op(&conn, "op-create-b").state, OpState::Cancelled);
    place_all(&conn);
    report(&conn, "b", RunState::Stopped, 1, None);
    assert_eq!(op(&conn, "op-stop-b").state, OpState::Succeeded);
}

#[test]
fn finished_operations_are_pruned_by_age_and_running_ones_stay() {
    let conn = db_with_hosts(1);
    create(&conn, "a", spec(1, 128)).expect("create");
    place_all(&conn);
    report(&conn, "a", RunState::Absent, 0, Some("define failed")); // failed at 30
    create(&conn, "b", spec(1, 128)).expect("create");
    stop(&conn, "b", "op-stop-b", 40); // op-create-b cancelled at 40
    place_all(&conn);
    report(&conn, "b", RunState::Stopped, 1, None); // op-stop-b succeeded at 30
    create(&conn, "c", spec(1, 128)).expect("create"); // running, created at 10
    let ids = |conn: &Connection| -> Vec<String> {
        let mut ids: Vec<String> = list::<Operation>(conn)
            .expect("ops")
            .into_iter()
            .map(|o| o.id)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        expired_operations(&conn, 35).expect("read"),
        vec!["op-create-a".to_string(), "op-stop-b".to_string()]
    );
    let prune = |before| {
        run(
            &conn,
            ComputeCommand::PruneOperations {
                finished_before_ms: before,
            },
        )
        .expect("prune")
    };
    assert_eq!(prune(35), Outcome::Done);
    assert_eq!(ids(&conn), vec!["op-create-b", "op-create-c"]);
    assert_eq!(prune(35), Outcome::Unchanged);
    assert_eq!(prune(u64::MAX), Outcome::Done);
    assert_eq!(ids(&conn), vec!["op-create-c"]);
    assert_eq!(op(&conn, "op-create-c").state, OpState::Running);
    assert_eq!(vm(&conn, "c").active_ops, vec!["op-create-c".to_string()]);
}

#[test]
fn operation_retention_is_a_validated_setting() {
    let key = settings::OPERATION_RETENTION_MINUTES;
    assert!(validate_setting_value(key, "1").is_ok());
    assert!(validate_setting_value(key, "1440").is_ok());
    for bad in ["0", "-5", "1.5", "forever", "527041"] {
        let err = validate_setting_value(key, bad).expect_err(bad).to_string();
        assert!(err.contains("whole number of minutes"), "{bad}: {err}");
    }
    let conn = db_with_hosts(1);
    assert_eq!(operation_retention_ms(&conn).expect("read"), 24 * 3_600_000);
}

#[test]
fn anti_affinity_spreads_and_what_does_not_fit_stays_pending_with_a_reason() {
    let conn = db_with_hosts(3);
    run(
        &conn,
        ComputeCommand::CreateAffinityGroup {
            name: "web".into(),
            policy: AffinityPolicy::AntiAffinity,
            now_ms: 1,
        },
    )
    .expect("group");
    for i in 0..4 {
        let s = VmSpec {
            affinity_group: Some("web".into()),
            ..spec(1, 128)
        };
        create(&conn, &format!("w{i}"), s).expect("create");
        place_all(&conn);
    }
    let hosts: BTreeSetOf = (0..3).map(|i| vm(&conn, &format!("w{i}")).host).collect();
    assert_eq!(hosts.len(), 3, "three members on three hosts: {hosts:?}");
    let last = vm(&conn, "w3");
    assert_eq!(last.host, None);
    let reason = last.pending_reason.expect("reason");
    assert!(reason.contains("anti-affinity group web"), "{reason}");
    assert!(op(&conn, "op-create-w3")
        .detail
        .expect("detail")
        .contains("waiting for placement"));
    let err = run(
        &conn,
        ComputeCommand::DeleteAffinityGroup { name: "web".into() },
    )
    .expect_err("in use")
    .to_string();
    assert!(err.contains("w0"), "{err}");
}

type BTreeSetOf = std::collections::BTreeSet<Option<NodeId>>;

#[test]
fn capacity_is_held_by_placed_vms_and_overcommit_is_a_setting() {
    let conn = db_with_hosts(1);
    // 2 CPUs × 4.0 overcommit = 8 vCPUs.
    create(&conn, "big", spec(8, 128)).expect("create");
    create(&conn, "one-more", spec(1, 128)).expect("create");
    place_all(&conn);
    assert_eq!(vm(&conn, "big").host, Some(1));
    let reason = vm(&conn, "one-more").pending_reason.expect("pending");
    assert!(reason.contains("0 vCPUs"), "{reason}");
    apply_cmd(
        &conn,
        &Command::PutSetting {
            key: settings::CPU_OVERCOMMIT.into(),
            value: "5".into(),
            now_ms: 1,
        },
    )
    .expect("setting");
    place_all(&conn);
    assert_eq!(vm(&conn, "one-more").host, Some(1));
    let err = apply_cmd(
        &conn,
        &Command::PutSetting {
            key: settings::CPU_OVERCOMMIT.into(),
            value: "lots".into(),
            now_ms: 1,
        },
    )
    .expect_err("bad value");
    assert!(err.to_string().contains("number"), "{err}");
}

#[test]
fn delete_removes_the_record_once_the_host_reports_the_domain_gone() {
    let conn = db_with_hosts(1);
    create(&conn, "gone", spec(1, 128)).expect("create");
    run(
        &conn,
        ComputeCommand::DeleteVm {
            vm: "gone".into(),
            op_id: "op-del-gone".into(),
            now_ms: 50,
        },
    )
    .expect("delete unplaced");
    assert_eq!(vm_count(&conn), 0, "never placed: removed at once");
    assert_eq!(op(&conn, "op-del-gone").state, OpState::Succeeded);
    assert_eq!(op(&conn, "op-create-gone").state, OpState::Cancelled);

    create(&conn, "web", spec(1, 128)).expect("create");
    place_all(&conn);
    report(&conn, "web", RunState::Running, 1, None);
    run(
        &conn,
        ComputeCommand::DeleteVm {
            vm: "web".into(),
            op_id: "op-del-web".into(),
            now_ms: 60,
        },
    )
    .expect("delete");
    assert!(vm(&conn, "web").deleting);
    let err = run(
        &conn,
        ComputeCommand::SetVmPower {
            vm: "web".into(),
            power: PowerIntent::Running,
            op_id: "op-x".into(),
            now_ms: 61,
        },
    )
    .expect_err("deleting");
    assert!(err.to_string().contains("being deleted"), "{err}");
    report(&conn, "web", RunState::Absent, 0, None);
    assert_eq!(vm_count(&conn), 0);
    assert_eq!(op(&conn, "op-del-web").state, OpState::Succeeded);
    // The name is free again.
    run(
        &conn,
        ComputeCommand::CreateVm {
            vm_id: "id-web-2".into(),
            name: "web".into(),
            spec: spec(1, 128),
            start: true,
            stop_timeout_s: 30,
            op_id: "op-create-web-2".into(),
            now_ms: 90,
        },
    )
    .expect("name reusable");
}

#[test]
fn resize_needs_a_stopped_vm_and_bumps_the_generation() {
    let conn = db_with_hosts(1);
    create(&conn, "r", spec(1, 128)).expect("create");
    place_all(&conn);
    report(&conn, "r", RunState::Running, 1, None);
    let resize = |op_id: &str| ComputeCommand::ResizeVm {
        vm: "r".into(),
        vcpus: Some(2),
        memory_mib: Some(256),
        op_id: op_id.into(),
        now_ms: 70,
    };
    let err = run(&conn, resize("op-r1"))
        .expect_err("running")
        .to_string();
    assert!(err.contains("stop it first"), "{err}");
    stop(&conn, "r", "op-stop", 71);
    report(&conn, "r", RunState::Stopped, 1, None);
    run(&conn, resize("op-r2")).expect("resize");
    let v = vm(&conn, "r");
    assert_eq!((v.spec.vcpus, v.spec.memory_mib, v.generation), (2, 256, 2));
    assert_eq!(op(&conn, "op-r2").state, OpState::Running);
    report(&conn, "r", RunState::Stopped, 2, None);
    assert_eq!(op(&conn, "op-r2").state, OpState::Succeeded);
}

#[test]
fn nics_attach_and_detach_on_a_running_vm_with_a_running_goal() {
    let conn = db_with_hosts(1);
    create(&conn, "n", spec(1, 128)).expect("create");
    place_all(&conn);
    report(&conn, "n", RunState::Running, 1, None);
    let nic = NicSpec {
        bridge: "br0".into(),
        mac: Some("52:54:00:aa:bb:01".into()),
        ..NicSpec::default()
    };
    run(
        &conn,
        ComputeCommand::AttachNic {
            vm: "n".into(),
            nic,
            op_id: "op-attach".into(),
            now_ms: 90,
        },
    )
    .expect("attach while running");
    let v = vm(&conn, "n");
    assert_eq!((v.generation, v.spec.nics.len()), (2, 1));
    assert_eq!(
        op(&conn, "op-attach").goal,
        OpGoal::Running { generation: 2 }
    );
    // Still running from the old definition: not done yet.
    report(&conn, "n", RunState::Running, 1, None);
    assert_eq!(op(&conn, "op-attach").state, OpState::Running);
    report(&conn, "n", RunState::Running, 2, None);
    assert_eq!(op(&conn, "op-attach").state, OpState::Succeeded);

    run(
        &conn,
        ComputeCommand::DetachNic {
            vm: "n".into(),
            mac: "52:54:00:AA:BB:01".into(),
            op_id: "op-detach".into(),
            now_ms: 91,
        },
    )
    .expect("detach while running");
    assert!(vm(&conn, "n").spec.nics.is_empty());
    assert_eq!(
        op(&conn, "op-detach").goal,
        OpGoal::Running { generation: 3 }
    );
    report(&conn, "n", RunState::Running, 3, None);
    assert_eq!(op(&conn, "op-detach").state, OpState::Succeeded);

    // A VM meant to be stopped gets a stopped goal, even while it is still shutting down.
    stop(&conn, "n", "op-stop", 92);
    run(
        &conn,
        ComputeCommand::AttachNic {
            vm: "n".into(),
            nic: NicSpec {
                bridge: "br0".into(),
                ..NicSpec::default()
            },
            op_id: "op-attach-2".into(),
            now_ms: 93,
        },
    )
    .expect("attach while stopping");
    assert_eq!(
        op(&conn, "op-attach-2").goal,
        OpGoal::Stopped { generation: 4 }
    );

    // Still refused while deleting.
    run(
        &conn,
        ComputeCommand::DeleteVm {
            vm: "n".into(),
            op_id: "op-del".into(),
            now_ms: 94,
        },
    )
    .expect("delete");
    let err = run(
        &conn,
        ComputeCommand::AttachNic {
            vm: "n".into(),
            nic: NicSpec {
                bridge: "br0".into(),
                ..NicSpec::default()
            },
            op_id: "op-attach-3".into(),
            now_ms: 95,
        },
    )
    .expect_err("deleting")
    .to_string();
    assert!(err.contains("being deleted"), "{err}");
}

#[test]
fn reports_from_a_host_the_vm_is_not_placed_on_are_ignored() {
    let conn = db_with_hosts(2);
    create(&conn, "v", spec(1, 128)).expect("create");
    place_all(&conn);
    let placed = vm(&conn, "v").host.expect("placed");
    let other = if placed == 1 { 2 } else { 1 };
    let out = run(
        &conn,
        ComputeCommand::ReportVm {
            vm_id: "id-v".into(),
            host_id: other,
            state: RunState::Running,
            generation: 1,
            reboot_seq: 0,
            error: None,
            now_ms: 80,
        },
    )
    .expect("report");
    assert_eq!(out, Outcome::Unchanged);
    assert!(vm(&conn, "v").observed.is_none());
}
