//! keel-base: what the cluster model and the node's host adapters share, and nothing
//! else: the names of the kernel objects Keel creates and the rule for resource names
//! ([`names`]), the limits the CLI checks before a long upload, and the one-line
//! error-chain formatter every crate logs with.

pub mod names;

/// The most cloud-init user data a VM may carry, in bytes: the model refuses more, and the
/// CLI says so before it reads a larger file.
pub const MAX_USER_DATA: usize = 64 * 1024;

/// Formats an error with its whole `source()` chain, for logs and one-line CLI errors.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
