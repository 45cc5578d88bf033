//! `keel-installer`: see docs/installer.md and the library's modules.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Parser, Subcommand};
use keel_base::error_chain;
use keel_installer::answer::AfterInstall;
use keel_installer::console::Console;
use keel_installer::disk::{DiskProbe, SysfsProbe};
use keel_installer::install::{
    make_plan, preflight, resolve_answer, resolve_text, LiveLayout, Resolved,
};
use keel_installer::net::{NicProbe, SysfsNics};
use keel_installer::node::{self, NodeConfig};
use keel_installer::runner::{execute, RealHost};
use keel_installer::source::{find_answer, LiveEnv};

#[derive(Parser)]
#[command(
    name = "keel-installer",
    version,
    about = "Installs Keel onto a server's disk (run from the Keel live ISO)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct MachineArgs {
    /// Read disks and network cards from this sysfs tree instead of /sys.
    #[arg(long, default_value = "/sys")]
    sysfs: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate an answer file against this machine (disks, network cards); changes nothing.
    Check {
        answer: PathBuf,
        #[command(flatten)]
        machine: MachineArgs,
        /// Only check the file itself, not this machine's disks and network cards.
        #[arg(long)]
        file_only: bool,
    },
    /// Print the installation plan for an answer file on this machine (a dry run).
    Plan {
        answer: PathBuf,
        #[command(flatten)]
        machine: MachineArgs,
        #[arg(long, default_value = "/run/live/medium/live/filesystem.squashfs")]
        squashfs: PathBuf,
        #[arg(long, default_value = "/target")]
        target: PathBuf,
    },
    /// Install from an answer file.
    Install {
        answer: PathBuf,
        /// Print the plan and stop.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation before erasing the disk.
        #[arg(long)]
        yes: bool,
    },
    /// Live system boot (keel-installer.service): install unattended if an answer file is found.
    Live,
    /// The interactive installer.
    Tui,
    /// Installed node: write the environment of keel.service (management address).
    NodeEnv {
        #[arg(long, default_value = node::NODE_CONFIG)]
        config: PathBuf,
        #[arg(long, default_value = node::NODE_ENV)]
        out: PathBuf,
        /// How long to wait for DHCP.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// Installed node, first boot: `keel cluster init` or `keel cluster join`.
    Firstboot {
        #[arg(long, default_value = node::NODE_CONFIG)]
        config: PathBuf,
        #[arg(long, default_value = node::FIRSTBOOT)]
        firstboot: PathBuf,
    },
    /// Installed node: write the console banner (address, console URL, cluster status).
    Banner {
        #[arg(long, default_value = node::NODE_CONFIG)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keel-installer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn machine(
    args: &MachineArgs,
) -> Result<
    (
        Vec<keel_installer::disk::Disk>,
        Vec<keel_installer::net::Nic>,
    ),
    String,
> {
    let mut probe = SysfsProbe::new();
    probe.sys = args.sysfs.clone();
    let disks = probe.disks().map_err(|e| error_chain(&e))?;
    let nics = SysfsNics {
        sys: args.sysfs.clone(),
    }
    .nics();
    Ok((disks, nics))
}

/// Reads the answer file at `answer` and resolves it against the machine in `args`.
fn resolve_on_machine(answer: &Path, args: &MachineArgs) -> Result<Resolved, String> {
    let (disks, nics) = machine(args)?;
    resolve_text(&answer.display().to_string(), &read(answer)?, &disks, &nics)
        .map_err(|e| error_chain(&e))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the answer file {}: {e}", path.display()))
}

fn run(cmd: Cmd) -> Result<ExitCode, String> {
    match cmd {
        Cmd::Check {
            answer,
            machine: m,
            file_only,
        } => {
            if file_only {
                keel_installer::Answer::from_file(&answer).map_err(|e| error_chain(&e))?;
                println!(
                    "{}: the file is valid (this machine was not checked)",
                    answer.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let r = resolve_on_machine(&answer, &m)?;
            println!(
                "{}: valid; it installs on {} with management interface {} ({})",
                answer.display(),
                r.disk,
                r.nic.name,
                r.nic.mac
            );
        }
        Cmd::Plan {
            answer,
            machine: m,
            squashfs,
            target,
        } => {
            let r = resolve_on_machine(&answer, &m)?;
            let live = LiveLayout {
                squashfs,
                target,
                ..LiveLayout::default()
            };
            print!("{}", make_plan(&r, &live).render());
            println!("(dry run: nothing was changed)");
        }
        Cmd::Install {
            answer,
            dry_run,
            yes,
        } => {
            let r = resolve_on_machine(
                &answer,
                &MachineArgs {
                    sysfs: "/sys".into(),
                },
            )?;
            let mut console = Console::stdout();
            if dry_run {
                print!("{}", make_plan(&r, &LiveLayout::default()).render());
                println!("(dry run: nothing was changed)");
                return Ok(ExitCode::SUCCESS);
            }
            if !yes && !confirm(&r)? {
                println!("nothing was changed");
                return Ok(ExitCode::FAILURE);
            }
            install(&r, &mut console)?;
        }
        Cmd::Live => return live(),
        Cmd::Tui => return tui(),
        Cmd::NodeEnv {
            config,
            out,
            wait_secs,
        } => {
            let cfg = NodeConfig::load(&config).map_err(|e| error_chain(&e))?;
            let addr = node::management_address(&cfg, Duration::from_secs(wait_secs))
                .map_err(|e| error_chain(&e))?;
            node::write_file(&out, &node::node_env_text(&cfg, addr), 0o644)
                .map_err(|e| error_chain(&e))?;
            println!(
                "keel-installer: management address {addr} written to {}",
                out.display()
            );
        }
        Cmd::Firstboot { config, firstboot } => {
            let cfg = NodeConfig::load(&config).map_err(|e| error_chain(&e))?;
            let r = node::firstboot(&cfg, &firstboot, Path::new(node::INIT_OUTPUT), &mut |l| {
                println!("{l}");
            });
            // a node that has just joined learns the cluster's name and members once the
            // leader's log reaches it: wait for that (bounded) before showing the banner
            banner(&cfg, FIRSTBOOT_BANNER_PATIENCE);
            r.map_err(|e| error_chain(&e))?;
        }
        Cmd::Banner { config } => {
            let cfg = NodeConfig::load(&config).map_err(|e| error_chain(&e))?;
            banner(&cfg, Duration::ZERO);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How long the banner after first boot waits for the cluster's name and members.
const FIRSTBOOT_BANNER_PATIENCE: Duration = Duration::from_secs(120);

fn banner(cfg: &NodeConfig, patience: Duration) {
    let text = node::current_banner_within(cfg, patience);
    if let Err(e) = node::write_file(
        Path::new(node::ISSUE_FILE),
        &node::issue_escape(&text),
        0o644,
    ) {
        eprintln!("keel-installer: {e}");
    }
    // Running agettys show the issue file only when they draw the login prompt: ask them to
    // draw it again, so a console already at the prompt shows the new banner (a line written
    // straight to a tty can also be lost to agetty's vhangup when it starts at that moment).
    if let Err(e) = Command::new("agetty").arg("--reload").status() {
        eprintln!("keel-installer: cannot ask agetty to reload: {e}");
    }
    let mut c = Console::live();
    for line in text.lines() {
        c.say(line);
    }
}

fn confirm(r: &Resolved) -> Result<bool, String> {
    use keel_installer::dialog::{StdTerminal, Terminal};
    let mut t = StdTerminal::default();
    let line = t
        .line(&format!(
            "This ERASES {} ({}). Type 'yes' to go on: ",
            r.disk.path(),
            r.disk.size
        ))
        .map_err(|e| error_chain(&e))?;
    Ok(line.as_deref() == Some("yes"))
}

fn install(r: &Resolved, console: &mut Console) -> Result<(), String> {
    let live = LiveLayout::default();
    preflight(&live).map_err(|e| e.to_string())?;
    let plan = make_plan(r, &live);
    console.say(&format!("Installing Keel on {}", r.disk));
    execute(&plan, &live.target, &mut RealHost, &mut |l| console.say(l))
        .map_err(|e| error_chain(&e))
}

fn after_install(after: AfterInstall, console: &mut Console) {
    let verb = match after {
        AfterInstall::Reboot => "reboot",
        AfterInstall::Poweroff => "poweroff",
        AfterInstall::None => {
            console.say("Staying in the live system (install.after = \"none\").");
            return;
        }
    };
    console.say(&format!(
        "Remove the installer medium if the firmware boots it first. {verb} in 5 s..."
    ));
    std::thread::sleep(Duration::from_secs(5));
    let _ = Command::new("systemctl").arg(verb).status();
}

/// keel-installer.service on the live system.
fn live() -> Result<ExitCode, String> {
    let mut console = Console::live();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline
        .split_whitespace()
        .any(|w| w == "keel.installer=off")
    {
        return Ok(ExitCode::SUCCESS);
    }
    let found = match find_answer(&cmdline, &LiveEnv) {
        Ok(f) => f,
        Err(e) => {
            console.say(&format!("KEEL-INSTALL-FAILED: {e}"));
            console.say("Starting the interactive installer instead.");
            return Ok(ExitCode::FAILURE);
        }
    };
    let Some((source, text)) = found else {
        console.say("Keel installer: no answer file found; the interactive installer starts on the consoles.");
        return Ok(ExitCode::SUCCESS);
    };
    console.say(&format!("Keel installer: unattended install from {source}"));
    let (disks, nics) = machine(&MachineArgs {
        sysfs: "/sys".into(),
    })?;
    let r = match resolve_text(&source.to_string(), &text, &disks, &nics) {
        Ok(r) => r,
        Err(e) => {
            for line in error_chain(&e).lines() {
                console.say(line);
            }
            console.say(
                "KEEL-INSTALL-FAILED: the answer file is not usable on this machine (see above)",
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    match install(&r, &mut console) {
        Ok(()) => {
            console.say("KEEL-INSTALL-OK");
            after_install(r.answer.install.after, &mut console);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            for line in e.lines() {
                console.say(line);
            }
            console.say("KEEL-INSTALL-FAILED");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The interactive installer. It may run on several consoles at once (VGA and serial); the
/// first to confirm takes the lock and installs.
fn tui() -> Result<ExitCode, String> {
    use keel_installer::dialog::{self, StdTerminal};
    let (disks, nics) = machine(&MachineArgs {
        sysfs: "/sys".into(),
    })?;
    let mut term = StdTerminal::default();
    let Some(answer) = dialog::run(&mut term, &disks, &nics, &dialog::openssl_hash)
        .map_err(|e| error_chain(&e))?
    else {
        println!(
            "Installer left; nothing was changed. Type 'keel-installer tui' to start it again."
        );
        return Ok(ExitCode::SUCCESS);
    };
    let r = resolve_answer(answer, &disks, &nics).map_err(|e| error_chain(&e))?;
    let lock = Path::new("/run/keel-installer.lock");
    if std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(lock)
        .is_err()
    {
        return Err(format!(
            "an installation is already running from another console; nothing was changed here (remove {} if it is not)",
            lock.display()
        ));
    }
    let mut console = Console::stdout();
    let result = install(&r, &mut console);
    let _ = std::fs::remove_file(lock);
    result?;
    console.say("KEEL-INSTALL-OK");
    after_install(r.answer.install.after, &mut console);
    Ok(ExitCode::SUCCESS)
}
