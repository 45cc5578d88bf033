//! Every path of the node's API, spelled once. The typed methods of [`crate::LocalClient`]
//! use them, and so do the tests and the bench when they talk HTTPS to a node (they check
//! status codes and raw bodies the typed methods hide). Names and ids are percent-encoded
//! here, so no caller builds a path by hand.

/// Percent-encodes a path segment or a query value (RFC 3986 unreserved characters stay).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub const HEALTHZ: &str = "/healthz";
pub const METRICS: &str = "/metrics";
pub const CLUSTER: &str = "/api/v1/cluster";
pub const CA_PEM: &str = "/api/v1/ca.pem";
pub const OPENAPI: &str = "/api/v1/openapi.json";
pub const JOIN: &str = "/api/v1/join";
pub const TOKENS: &str = "/api/v1/tokens";
pub const HOSTS: &str = "/api/v1/hosts";
pub const SETTINGS: &str = "/api/v1/settings";
pub const VMS: &str = "/api/v1/vms";
pub const OPERATIONS: &str = "/api/v1/operations";
pub const TEMPLATES: &str = "/api/v1/templates";
pub const TEMPLATE_IMPORT: &str = "/api/v1/templates/import";
pub const AFFINITY_GROUPS: &str = "/api/v1/affinity-groups";
pub const NETWORKS: &str = "/api/v1/networks";
pub const SECURITY_GROUPS: &str = "/api/v1/security-groups";
pub const FLOATING_IPS: &str = "/api/v1/floating-ips";

/// Routes of the admin socket only.
pub const LOCAL_INIT: &str = "/local/v1/init";
pub const LOCAL_JOIN: &str = "/local/v1/join";
pub const LOCAL_BENCH_RAFT: &str = "/local/v1/bench/raft";

/// A host by id or name.
pub fn host(host: &str) -> String {
    format!("{HOSTS}/{}", escape(host))
}
pub fn host_drain(host: &str) -> String {
    format!("{}/drain", self::host(host))
}
pub fn host_undrain(host: &str) -> String {
    format!("{}/undrain", self::host(host))
}
pub fn host_networks(host: &str) -> String {
    format!("{}/networks", self::host(host))
}
/// One network role (`management`, `storage`, `guest-underlay`, `public`) of a host.
pub fn host_network(host: &str, role: &str) -> String {
    format!("{}/{}", host_networks(host), escape(role))
}
pub fn setting(key: &str) -> String {
    format!("{SETTINGS}/{}", escape(key))
}
pub fn vm(vm: &str) -> String {
    format!("{VMS}/{}", escape(vm))
}
/// A VM action: `start`, `stop`, `reboot`, `resize`, `migrate`, `nics`.
pub fn vm_action(vm: &str, action: &str) -> String {
    format!("{}/{action}", self::vm(vm))
}
pub fn vm_nic(vm: &str, mac: &str) -> String {
    format!("{}/nics/{}", self::vm(vm), escape(mac))
}
/// A VM's console WebSocket; `kind` is `serial` or `vnc`.
pub fn vm_console(vm: &str, kind: &str) -> String {
    format!("{}/console?kind={}", self::vm(vm), escape(kind))
}
pub fn operation(id: &str) -> String {
    format!("{OPERATIONS}/{}", escape(id))
}
pub fn template(template: &str) -> String {
    format!("{TEMPLATES}/{}", escape(template))
}
/// A template upload: the body is the image.
pub fn template_upload(name: &str, format: &str, sha256: &str) -> String {
    format!(
        "{TEMPLATES}?name={}&format={}&sha256={}",
        escape(name),
        escape(format),
        escape(sha256)
    )
}
pub fn affinity_group(name: &str) -> String {
    format!("{AFFINITY_GROUPS}/{}", escape(name))
}
pub fn network(network: &str) -> String {
    format!("{NETWORKS}/{}", escape(network))
}
pub fn security_group(group: &str) -> String {
    format!("{SECURITY_GROUPS}/{}", escape(group))
}
pub fn security_group_rules(group: &str) -> String {
    format!("{}/rules", security_group(group))
}
pub fn security_group_rule(group: &str, rule: &str) -> String {
    format!("{}/{}", security_group_rules(group), escape(rule))
}
pub fn floating_ip(ip: &str) -> String {
    format!("{FLOATING_IPS}/{}", escape(ip))
}
pub fn floating_ip_target(ip: &str) -> String {
    format!("{}/target", floating_ip(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_and_paths_are_the_routes() {
        assert_eq!(vm("web 1/x"), "/api/v1/vms/web%201%2Fx");
        assert_eq!(
            vm_nic("a", "52:54:00:00:00:01"),
            "/api/v1/vms/a/nics/52%3A54%3A00%3A00%3A00%3A01"
        );
        assert_eq!(
            host_network("n1", "guest-underlay"),
            "/api/v1/hosts/n1/networks/guest-underlay"
        );
        assert_eq!(
            template_upload("t", "qcow2", "ab"),
            "/api/v1/templates?name=t&format=qcow2&sha256=ab"
        );
        assert_eq!(
            vm_console("v", "serial"),
            "/api/v1/vms/v/console?kind=serial"
        );
        assert_eq!(
            security_group_rule("web", "r1"),
            "/api/v1/security-groups/web/rules/r1"
        );
    }
}
