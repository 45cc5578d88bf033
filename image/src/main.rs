//! `keel-image`: helpers that `scripts/iso-build` calls (see docs/installer.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keel-image",
    about = "Helpers of the Keel ISO build (scripts/iso-build)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the package names of a package list, one a line.
    Packages { list: PathBuf },
    /// Print the package manifest of a root filesystem (name, version, arch, .deb SHA-256).
    Manifest {
        #[arg(long)]
        root: PathBuf,
        /// The pinned .deb cache, to record each package's SHA-256.
        #[arg(long)]
        debs: Option<PathBuf>,
    },
    /// Print the manifest of an offline apt repository (name, version, arch, .deb SHA-256),
    /// after checking its Packages index against its files.
    RepoManifest { dir: PathBuf },
    /// Fail if a guest's packet capture shows an outbound connection (the air-gap check).
    PcapOutbound {
        /// UDP destination ports the guest may use (DHCP: 67).
        #[arg(long = "allow-udp-port")]
        allow_udp: Vec<u16>,
        /// TCP destinations (`IP:PORT`) the guest may connect to (a test's answer-file server).
        #[arg(long = "allow-tcp")]
        allow_tcp: Vec<String>,
        /// pcap files (qemu filter-dump).
        #[arg(required = true)]
        captures: Vec<PathBuf>,
    },
    /// Check that a root filesystem is ready to be squashed into the image.
    VerifyRootfs {
        root: PathBuf,
        /// The image is built without the keel node binary (developer builds).
        #[arg(long)]
        without_node: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-image: {}", keel_base::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), keel_image::ImageError> {
    match cli.command {
        Command::Packages { list } => {
            let text =
                std::fs::read_to_string(&list).map_err(|source| keel_image::ImageError::Io {
                    path: list.clone(),
                    source,
                })?;
            for p in keel_image::parse_package_list(&list.display().to_string(), &text)? {
                println!("{p}");
            }
        }
        Command::Manifest { root, debs } => {
            for entry in keel_image::manifest(&root, debs.as_deref())? {
                println!("{entry}");
            }
        }
        Command::RepoManifest { dir } => {
            for entry in keel_image::repo_manifest(&dir)? {
                println!("{entry}");
            }
        }
        Command::PcapOutbound {
            allow_udp,
            allow_tcp,
            captures,
        } => {
            let mut bad = Vec::new();
            for c in &captures {
                let bytes = std::fs::read(c).map_err(|source| keel_image::ImageError::Io {
                    path: c.clone(),
                    source,
                })?;
                match keel_image::outbound_attempts(
                    &bytes,
                    &[0x52, 0x54, 0x00],
                    &allow_udp,
                    &allow_tcp,
                ) {
                    Ok(scan) => {
                        eprintln!(
                            "keel-image: {}: {} packets, {} from the guest, {} outbound attempt(s)",
                            c.display(),
                            scan.packets,
                            scan.from_guest,
                            scan.outbound.len()
                        );
                        bad.extend(
                            scan.outbound
                                .into_iter()
                                .map(|o| format!("{}: {o}", c.display())),
                        );
                    }
                    Err(e) => bad.push(format!("{}: {e}", c.display())),
                }
            }
            if !bad.is_empty() {
                return Err(keel_image::ImageError::AirGap(bad));
            }
        }
        Command::VerifyRootfs { root, without_node } => {
            keel_image::verify_rootfs(&root, !without_node)?;
            eprintln!("keel-image: {} is ready", root.display());
        }
    }
    Ok(())
}
