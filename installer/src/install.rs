//! The installer's top level: validate against this machine, plan, run.

use std::path::PathBuf;

use crate::answer::{Answer, AnswerError, Partial, Problem};
use crate::disk::{select_disk, Disk};
use crate::net::{resolve_interface, Nic};
use crate::plan::{FsIds, Plan, PlanInput};

/// An answer checked against this machine.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub answer: Answer,
    pub disk: Disk,
    pub nic: Nic,
}

fn machine_problems(p: &Partial, disks: &[Disk], nics: &[Nic]) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(d) = &p.disk {
        if let Err(e) = select_disk(disks, d) {
            out.push(Problem::new("disk", e.to_string()));
        }
    }
    if let Some(n) = &p.network {
        if let Err(e) = resolve_interface(n.interface.as_deref(), nics) {
            out.push(Problem::new("network.interface", e));
        }
    }
    out
}

/// Parses an answer file and checks it against this machine's disks and network cards,
/// reporting every problem of both kinds together.
pub fn resolve_text(
    origin: &str,
    text: &str,
    disks: &[Disk],
    nics: &[Nic],
) -> Result<Resolved, AnswerError> {
    let answer = Answer::parse_with(origin, text, &|p| machine_problems(p, disks, nics))?;
    finish(origin, answer, disks, nics)
}

/// Checks an answer built by the dialog against this machine.
pub fn resolve_answer(
    answer: Answer,
    disks: &[Disk],
    nics: &[Nic],
) -> Result<Resolved, AnswerError> {
    let mut problems = answer.validate();
    problems.extend(machine_problems(
        &Partial {
            disk: Some(answer.disk.clone()),
            network: Some(answer.network.clone()),
            ..Partial::default()
        },
        disks,
        nics,
    ));
    if !problems.is_empty() {
        return Err(AnswerError::Invalid {
            origin: "the dialog".into(),
            problems,
        });
    }
    finish("the dialog", answer, disks, nics)
}

fn finish(
    origin: &str,
    answer: Answer,
    disks: &[Disk],
    nics: &[Nic],
) -> Result<Resolved, AnswerError> {
    let invalid = |p: Problem| AnswerError::Invalid {
        origin: origin.to_string(),
        problems: vec![p],
    };
    let disk = select_disk(disks, &answer.disk)
        .map_err(|e| invalid(Problem::new("disk", e.to_string())))?;
    let nic = resolve_interface(answer.network.interface.as_deref(), nics)
        .map_err(|e| invalid(Problem::new("network.interface", e)))?;
    Ok(Resolved { answer, disk, nic })
}

/// Where the live system keeps things.
#[derive(Debug, Clone)]
pub struct LiveLayout {
    pub squashfs: PathBuf,
    pub target: PathBuf,
    pub kernel_version: String,
}

impl Default for LiveLayout {
    fn default() -> Self {
        Self {
            squashfs: PathBuf::from("/run/live/medium/live/filesystem.squashfs"),
            target: PathBuf::from("/target"),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        }
    }
}

pub fn make_plan(r: &Resolved, live: &LiveLayout) -> Plan {
    Plan::build(
        &r.answer,
        &PlanInput {
            disk: r.disk.clone(),
            nic: r.nic.clone(),
            kernel_version: live.kernel_version.clone(),
            squashfs: live.squashfs.clone(),
            target: live.target.clone(),
            ids: FsIds::random(),
        },
    )
}

/// What the live system lacks to install from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot install from here: missing {}", .missing.join(", "))]
pub struct PreflightError {
    pub missing: Vec<String>,
}

/// Checks that the live system has what the plan copies.
pub fn preflight(live: &LiveLayout) -> Result<(), PreflightError> {
    let mut missing = Vec::new();
    if !live.squashfs.exists() {
        missing.push(format!(
            "{} (is this the Keel live system?)",
            live.squashfs.display()
        ));
    }
    if live.kernel_version.is_empty() {
        missing.push("the kernel version (/proc/sys/kernel/osrelease)".to_string());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError { missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Bus;

    fn nics() -> Vec<Nic> {
        vec![Nic {
            name: "ens3".into(),
            mac: "52:54:00:00:00:01".into(),
        }]
    }

    #[test]
    fn file_and_machine_problems_are_reported_together() {
        let disks = vec![
            crate::disk::test_disk("vda", 20, Bus::Virtio, "", "A"),
            crate::disk::test_disk("vdb", 20, Bus::Virtio, "", "B"),
        ];
        let text = "[disk]\nbus = \"virtio\"\n[system]\nhostname = \"BAD_NAME\"\nroot_password_hash = \"$6$a$b\"\n[network]\nmode = \"dhcp\"\ninterface = \"eth7\"\n[cluster]\nmode = \"init\"\nname = \"c\"\n";
        let e = resolve_text("a.toml", text, &disks, &nics()).unwrap_err();
        let AnswerError::Invalid { problems, .. } = &e else {
            panic!("{e}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["system.hostname", "disk", "network.interface"],
            "{e}"
        );
        let text = e.to_string();
        assert!(text.contains("2 disks match [disk] bus = virtio"), "{text}");
        assert!(text.contains("there is no network card 'eth7'"), "{text}");
    }

    #[test]
    fn a_good_file_resolves() {
        let disks = vec![crate::disk::test_disk("vda", 20, Bus::Virtio, "", "KEEL0")];
        let text = "[disk]\nserial = \"KEEL0\"\n[system]\nhostname = \"n1\"\nroot_password_hash = \"$6$a$b\"\n[network]\nmode = \"dhcp\"\n[cluster]\nmode = \"init\"\nname = \"c\"\n";
        let r = resolve_text("a.toml", text, &disks, &nics()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.disk.name, "vda");
        assert_eq!(r.nic.name, "ens3");
        let plan = make_plan(
            &r,
            &LiveLayout {
                squashfs: "/sq".into(),
                target: "/t".into(),
                kernel_version: "6.1".into(),
            },
        );
        assert!(plan.render().contains("Install plan for /dev/vda"));
    }

    #[test]
    fn preflight_explains_what_is_missing() {
        let e = preflight(&LiveLayout {
            squashfs: "/nonexistent/fs.squashfs".into(),
            target: "/t".into(),
            kernel_version: String::new(),
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/nonexistent/fs.squashfs") && e.contains("kernel version"),
            "{e}"
        );
    }
}
