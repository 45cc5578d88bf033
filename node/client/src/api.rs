//! The typed API: one method per route, taking and returning the wire types of
//! `keel-api-types`. Errors are [`ClientError`]; an API refusal keeps the node's code and
//! message (`ClientError::Api`), which the CLI prints as they are.

use futures::Stream;
use hyper::body::Bytes;
use keel_api_types::*;

use crate::local::{ClientError, LocalClient};
use crate::paths;

type Result<T> = std::result::Result<T, ClientError>;

/// The cluster and membership.
impl LocalClient {
    /// Creates the cluster on this node (admin socket only).
    pub async fn init(&self, req: &InitRequest) -> Result<InitReply> {
        self.post(paths::LOCAL_INIT, req).await
    }
    /// Joins this node to a cluster with a token (admin socket only).
    pub async fn join(&self, req: &LocalJoinRequest) -> Result<LocalJoinReply> {
        self.post(paths::LOCAL_JOIN, req).await
    }
    pub async fn cluster(&self) -> Result<ClusterView> {
        self.get(paths::CLUSTER).await
    }
    pub async fn create_token(&self, req: &CreateTokenRequest) -> Result<TokenView> {
        self.post(paths::TOKENS, req).await
    }
    pub async fn hosts(&self) -> Result<Vec<HostView>> {
        self.get(paths::HOSTS).await
    }
    /// Removes a member by id.
    pub async fn remove_host(&self, id: u64) -> Result<()> {
        self.delete(&paths::host(&id.to_string())).await
    }
    pub async fn drain_host(&self, host: &str) -> Result<HostMaintenanceView> {
        self.post_empty(&paths::host_drain(host)).await
    }
    pub async fn undrain_host(&self, host: &str) -> Result<HostMaintenanceView> {
        self.post_empty(&paths::host_undrain(host)).await
    }
    pub async fn host_networks(&self, host: &str) -> Result<HostNetworksView> {
        self.get(&paths::host_networks(host)).await
    }
    pub async fn set_host_network(
        &self,
        host: &str,
        role: &str,
        req: &HostNetworkSetRequest,
    ) -> Result<HostNetworkView> {
        self.put(&paths::host_network(host, role), req).await
    }
    pub async fn clear_host_network(&self, host: &str, role: &str) -> Result<()> {
        self.delete(&paths::host_network(host, role)).await
    }
}

/// VMs and their operations.
impl LocalClient {
    pub async fn create_vm(&self, req: &VmCreateRequest) -> Result<OperationAccepted> {
        self.post(paths::VMS, req).await
    }
    pub async fn vms(&self) -> Result<Vec<VmView>> {
        self.get(paths::VMS).await
    }
    pub async fn vm(&self, vm: &str) -> Result<VmDetailView> {
        self.get(&paths::vm(vm)).await
    }
    pub async fn start_vm(&self, vm: &str) -> Result<OperationAccepted> {
        self.post_empty(&paths::vm_action(vm, "start")).await
    }
    pub async fn stop_vm(&self, vm: &str) -> Result<OperationAccepted> {
        self.post_empty(&paths::vm_action(vm, "stop")).await
    }
    pub async fn reboot_vm(&self, vm: &str, req: &VmRebootRequest) -> Result<OperationAccepted> {
        self.post(&paths::vm_action(vm, "reboot"), req).await
    }
    pub async fn resize_vm(&self, vm: &str, req: &VmResizeRequest) -> Result<OperationAccepted> {
        self.post(&paths::vm_action(vm, "resize"), req).await
    }
    pub async fn migrate_vm(&self, vm: &str, req: &VmMigrateRequest) -> Result<OperationAccepted> {
        self.post(&paths::vm_action(vm, "migrate"), req).await
    }
    pub async fn delete_vm(&self, vm: &str) -> Result<OperationAccepted> {
        self.delete_json(&paths::vm(vm)).await
    }
    pub async fn attach_nic(&self, vm: &str, nic: &VmNicRequest) -> Result<OperationAccepted> {
        self.post(&paths::vm_action(vm, "nics"), nic).await
    }
    pub async fn detach_nic(&self, vm: &str, mac: &str) -> Result<OperationAccepted> {
        self.delete_json(&paths::vm_nic(vm, mac)).await
    }
    pub async fn operations(&self) -> Result<Vec<OperationView>> {
        self.get(paths::OPERATIONS).await
    }
    pub async fn operation(&self, id: &str) -> Result<OperationView> {
        self.get(&paths::operation(id)).await
    }
    pub async fn affinity_groups(&self) -> Result<Vec<AffinityGroupView>> {
        self.get(paths::AFFINITY_GROUPS).await
    }
    pub async fn create_affinity_group(
        &self,
        req: &AffinityGroupCreateRequest,
    ) -> Result<AffinityGroupView> {
        self.post(paths::AFFINITY_GROUPS, req).await
    }
    pub async fn delete_affinity_group(&self, name: &str) -> Result<()> {
        self.delete(&paths::affinity_group(name)).await
    }
}

/// Templates.
impl LocalClient {
    pub async fn templates(&self) -> Result<Vec<TemplateView>> {
        self.get(paths::TEMPLATES).await
    }
    pub async fn template(&self, template: &str) -> Result<TemplateView> {
        self.get(&paths::template(template)).await
    }
    pub async fn delete_template(&self, template: &str) -> Result<()> {
        self.delete(&paths::template(template)).await
    }
    /// Registers an image file that is already on the node's host.
    pub async fn import_template(&self, req: &TemplateImportRequest) -> Result<TemplateView> {
        self.post(paths::TEMPLATE_IMPORT, req).await
    }
    /// Uploads `len` bytes of image, streamed from `chunks`.
    pub async fn upload_template<S>(
        &self,
        name: &str,
        format: TemplateFormat,
        sha256: &str,
        len: u64,
        chunks: S,
    ) -> Result<TemplateView>
    where
        S: Stream<Item = std::result::Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let path = paths::template_upload(name, format.as_str(), sha256);
        self.post_stream(&path, len, chunks).await
    }
}

/// Guest networks, security groups and floating IPs.
impl LocalClient {
    pub async fn networks(&self) -> Result<Vec<NetworkView>> {
        self.get(paths::NETWORKS).await
    }
    pub async fn network(&self, network: &str) -> Result<NetworkDetailView> {
        self.get(&paths::network(network)).await
    }
    pub async fn create_network(&self, req: &NetworkCreateRequest) -> Result<NetworkView> {
        self.post(paths::NETWORKS, req).await
    }
    pub async fn delete_network(&self, network: &str) -> Result<()> {
        self.delete(&paths::network(network)).await
    }
    pub async fn security_groups(&self) -> Result<Vec<SecurityGroupView>> {
        self.get(paths::SECURITY_GROUPS).await
    }
    pub async fn security_group(&self, group: &str) -> Result<SecurityGroupView> {
        self.get(&paths::security_group(group)).await
    }
    pub async fn create_security_group(
        &self,
        req: &SecurityGroupCreateRequest,
    ) -> Result<SecurityGroupView> {
        self.post(paths::SECURITY_GROUPS, req).await
    }
    pub async fn delete_security_group(&self, group: &str) -> Result<()> {
        self.delete(&paths::security_group(group)).await
    }
    pub async fn add_security_rule(
        &self,
        group: &str,
        req: &SecurityRuleCreateRequest,
    ) -> Result<SecurityRuleView> {
        self.post(&paths::security_group_rules(group), req).await
    }
    pub async fn delete_security_rule(&self, group: &str, rule: &str) -> Result<()> {
        self.delete(&paths::security_group_rule(group, rule)).await
    }
    pub async fn floating_ips(&self) -> Result<Vec<FloatingIpView>> {
        self.get(paths::FLOATING_IPS).await
    }
    pub async fn floating_ip(&self, ip: &str) -> Result<FloatingIpView> {
        self.get(&paths::floating_ip(ip)).await
    }
    pub async fn allocate_floating_ip(
        &self,
        req: &FloatingIpAllocateRequest,
    ) -> Result<FloatingIpView> {
        self.post(paths::FLOATING_IPS, req).await
    }
    pub async fn attach_floating_ip(
        &self,
        ip: &str,
        req: &FloatingIpAttachRequest,
    ) -> Result<FloatingIpView> {
        self.put(&paths::floating_ip_target(ip), req).await
    }
    pub async fn detach_floating_ip(&self, ip: &str) -> Result<()> {
        self.delete(&paths::floating_ip_target(ip)).await
    }
    pub async fn release_floating_ip(&self, ip: &str) -> Result<()> {
        self.delete(&paths::floating_ip(ip)).await
    }
}

/// Diagnostics.
impl LocalClient {
    /// Drives `count` raft writes from inside the node (admin socket only; the bench).
    pub async fn bench_raft(&self, req: &RaftBenchRequest) -> Result<RaftBenchReply> {
        self.post(paths::LOCAL_BENCH_RAFT, req).await
    }
}
