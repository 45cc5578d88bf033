//! keel-client: how programs talk to a Keel node. The CLI, the tests and the bench use it;
//! nothing outside this crate spells an API path.
//!
//! * [`local`] — [`LocalClient`], requests over the node's root-only admin socket, with
//!   one typed method per route.
//! * [`paths`] — every API path, spelled once (the tests and the bench use them too).
//! * [`console`] — attaches a terminal to a VM's serial console (WebSocket).
//! * [`join`] — the joining side of `keel cluster join`: reach a member named in the
//!   token over HTTPS, pinning the cluster CA, and send the join request.

mod api;
pub mod console;
pub mod join;
pub mod local;
pub mod paths;

pub use local::{ClientError, LocalClient};

/// The SHA-256 of a file, hex: what an upload announces so that the node can verify it.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
