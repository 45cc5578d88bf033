//! The OpenAPI document, generated from the handlers' annotations. A copy is checked in at
//! `docs/openapi.json`; a test fails when the two differ (regenerate with
//! `KEEL_BLESS=1 cargo test -p keel-node openapi`).

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{console, floating_ips, handlers, networks, templates, vms};
use keel_api_types::*;

#[derive(OpenApi)]
#[openapi(
    info(title = "Keel API", description = "The Keel cluster API. Every route except /healthz and /api/v1/join needs `Authorization: Bearer <token>`."),
    paths(
        handlers::healthz,
        handlers::get_cluster,
        handlers::list_hosts,
        handlers::get_host,
        handlers::remove_host,
        handlers::create_token,
        handlers::join,
        handlers::list_settings,
        handlers::get_setting,
        handlers::put_setting,
        handlers::delete_setting,
        handlers::get_ca,
        get_openapi,
        handlers::get_metrics,
        vms::create_vm,
        vms::list_vms,
        vms::get_vm,
        vms::start_vm,
        vms::stop_vm,
        vms::reboot_vm,
        vms::resize_vm,
        vms::delete_vm,
        vms::migrate_vm,
        vms::attach_nic,
        vms::detach_nic,
        console::vm_console,
        vms::drain_host,
        vms::undrain_host,
        vms::list_operations,
        vms::get_operation,
        templates::upload_template,
        templates::import_template,
        templates::list_templates,
        templates::get_template,
        templates::delete_template,
        vms::create_affinity_group,
        vms::list_affinity_groups,
        vms::delete_affinity_group,
        networks::list_networks,
        networks::create_network,
        networks::get_network,
        networks::delete_network,
        networks::list_security_groups,
        networks::create_security_group,
        networks::get_security_group,
        networks::delete_security_group,
        networks::add_security_rule,
        networks::delete_security_rule,
        networks::get_host_networks,
        networks::set_host_network,
        networks::clear_host_network,
        floating_ips::list_floating_ips,
        floating_ips::allocate_floating_ip,
        floating_ips::get_floating_ip,
        floating_ips::release_floating_ip,
        floating_ips::attach_floating_ip,
        floating_ips::detach_floating_ip,
    ),
    components(schemas(
        ErrorBody, ErrorDetail, Health, ClusterView, MemberView, HostView, InventoryView,
        DiskView, NicView, CreateTokenRequest, TokenView, JoinApiRequest, JoinApiReply,
        SettingView, PutSettingRequest, VmBoot, VmNicRequest, VmCreateRequest, VmRebootRequest,
        VmResizeRequest, OperationView, OperationAccepted, VmNicView, VmObservedView, VmView,
        VmDetailView, TemplateFormat, TemplateImportRequest, TemplateView, GroupPolicy,
        AffinityGroupCreateRequest, AffinityGroupView, VmMigrateRequest, HypervisorView, HostMaintenanceView,
        NetworkCreateRequest, NetworkView, NetworkLeaseView, NetworkDetailView,
        SecurityGroupCreateRequest, RuleDirection, RuleProtocol, SecurityRuleCreateRequest,
        SecurityRuleView, SecurityGroupView, HostNetworkSetRequest, HostNetworkView,
        HostNetworksView, FloatingIpAllocateRequest, FloatingIpAttachRequest, PortForwardView,
        FloatingIpView, NetworkReportView, HostUnitView
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

// The document's own route lives here, not with the other handlers: the document lists
// them, so they must not need it. (A `///` comment here would become its summary.)
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "this document")), security(("bearer" = [])))]
pub async fn get_openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
}

pub fn document_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_document_matches_the_checked_in_copy() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let generated = document_json() + "\n";
        if std::env::var_os("KEEL_BLESS").is_some() {
            std::fs::write(path, &generated).expect("write docs/openapi.json");
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/openapi.json is out of date: run `KEEL_BLESS=1 cargo test -p keel-node openapi` and commit it"
        );
    }
}
