//! Template routes: upload (the request body is the image, streamed to disk), import of a
//! file already on this server, list, show and delete.
//!
//! A new template lands in this host's image store first, verified (checksum, real format,
//! no backing file), and only then is registered through raft with this host as its only
//! replica; other hosts fetch a copy when they need one.

use std::path::{Path as FsPath, PathBuf};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use futures::StreamExt;
use keel_cluster::db::now_ms;
use keel_cluster::model::compute::{self, ComputeCommand, ImageFormat, Template};
use keel_cluster::model::{self, validate_name, Command, CommandError};
use keel_cluster::ClusterError;
use tokio::io::AsyncWriteExt;

use super::extract::{ApiJson, ApiQuery};
use super::handlers::{read, ApiResult};
use super::views;
use super::{ApiError, AppState, Principal};
use crate::compute::images::{ImageError, Volumes};
use keel_api_types::*;

/// Removes a file when dropped unless disarmed: a failed or abandoned upload (the client
/// went away and the handler future was dropped) leaves nothing behind.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a partial upload");
                }
            }
        }
    }
}

/// What is checked before any byte of the image is read: membership, the name (valid and
/// free) and the checksum's form. A duplicate name must not upload gigabytes first.
fn precheck(state: &AppState, name: &str, sha256: Option<&str>) -> Result<u64, ApiError> {
    let node_id = state.db.node_id().ok_or(ClusterError::NotMember)?;
    validate_name("template name", name)?;
    if read(state, |c| compute::find_template(c, name))?.is_some() {
        return Err(CommandError::NameTaken {
            kind: "template".into(),
            name: name.into(),
        }
        .into());
    }
    if let Some(sum) = sha256 {
        if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CommandError::Invalid {
                field: "sha256".into(),
                reason: format!("{sum:?} must be 64 hex digits"),
            }
            .into());
        }
    }
    Ok(node_id)
}

/// Streams the request body into `path`, chunk by chunk.
async fn receive(body: Body, path: &FsPath) -> Result<u64, ApiError> {
    let io = |source: std::io::Error| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "upload_incomplete",
                format!("the upload broke off after {received} bytes: {e}"),
            )
        })?;
        file.write_all(&chunk).await.map_err(io)?;
        received += chunk.len() as u64;
    }
    file.sync_all().await.map_err(io)?;
    Ok(received)
}

/// Verifies `src` into the store as a new template and registers it; on any failure
/// nothing stays behind in the store.
async fn adopt_and_register(
    state: &AppState,
    node_id: u64,
    name: String,
    src: PathBuf,
    move_src: bool,
    format: TemplateFormat,
    sha256: Option<String>,
) -> Result<Template, ApiError> {
    let id = uuid::Uuid::new_v4().to_string();
    let images = state.images.clone();
    let template_id = id.clone();
    let stored = tokio::task::spawn_blocking(move || {
        images.adopt(
            &src,
            move_src,
            &template_id,
            views::image_format(format),
            sha256.as_deref(),
        )
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the image check stopped: {e}"),
        )
    })??;
    let template = Template {
        id,
        name,
        format: stored.format,
        size_bytes: stored.size_bytes,
        virtual_size_bytes: stored.virtual_size_bytes,
        sha256: stored.sha256.clone(),
        replicas: vec![node_id],
        created_at_ms: now_ms(),
    };
    let written = state
        .db
        .write(Command::Compute {
            command: ComputeCommand::RegisterTemplate {
                template: template.clone(),
            },
        })
        .await;
    match written {
        Ok(_) => {}
        Err(ClusterError::Rejected(e)) => {
            // Rejected (e.g. the name was taken meanwhile): no record will ever name the
            // file.
            if let Err(rm) = std::fs::remove_file(&stored.path) {
                tracing::warn!(path = %stored.path.display(), error = %rm, "cannot remove an unregistered template");
            }
            return Err(e.into());
        }
        // The outcome is unknown (e.g. no quorum): the entry may still commit, and then
        // this host's file is the template's only copy, so it stays. If the entry never
        // commits, the reconciler collects the file as one no template record names.
        Err(e) => return Err(e.into()),
    }
    Ok(template)
}

#[utoipa::path(post, path = "/api/v1/templates", tag = "templates",
    params(TemplateUploadQuery),
    request_body(content_type = "application/octet-stream",
        description = "the image file, streamed (`curl --data-binary @image.qcow2`)"),
    responses((status = 201, body = TemplateView),
        (status = 400, body = ErrorBody, description = "bad name or query, checksum or format mismatch, backing file, empty image"),
        (status = 409, body = ErrorBody, description = "name taken"),
        (status = 507, body = ErrorBody, description = "the image store is full")),
    security(("bearer" = [])))]
pub async fn upload_template(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiQuery(query): ApiQuery<TemplateUploadQuery>,
    body: Body,
) -> Result<(StatusCode, Json<TemplateView>), ApiError> {
    let node_id = precheck(&state, &query.name, query.sha256.as_deref())?;
    let partial = state.images.incoming_path()?;
    let mut guard = RemoveOnDrop(Some(partial.clone()));
    let bytes = receive(body, &partial).await?;
    tracing::info!(template = %query.name, bytes, principal = ?who, "template uploaded; verifying");
    let template = adopt_and_register(
        &state,
        node_id,
        query.name,
        partial,
        true,
        query.format,
        query.sha256,
    )
    .await?;
    // The file was moved into the store.
    guard.disarm();
    tracing::info!(template = %template.name, id = %template.id, "template registered");
    Ok((StatusCode::CREATED, Json(views::template_view(template))))
}

#[utoipa::path(post, path = "/api/v1/templates/import", tag = "templates",
    request_body = TemplateImportRequest,
    responses((status = 201, body = TemplateView),
        (status = 400, body = ErrorBody, description = "bad name, no such file, checksum or format mismatch, backing file"),
        (status = 403, body = ErrorBody, description = "only through the admin socket"),
        (status = 409, body = ErrorBody, description = "name taken")),
    security(("bearer" = [])))]
pub async fn import_template(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<TemplateImportRequest>,
) -> Result<(StatusCode, Json<TemplateView>), ApiError> {
    // Reading any file of the server into a template a VM can boot would hand files like
    // the CA key to whoever holds an API credential: only root on the server may import.
    if who != Principal::LocalRoot {
        return Err(ApiError::forbidden(
            "importing a file of the server is only allowed through its admin socket (`keel template import` as root there); upload the image instead",
        ));
    }
    let node_id = precheck(&state, &req.name, req.sha256.as_deref())?;
    let path = PathBuf::from(&req.path);
    if !path.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "path {:?} must be absolute",
            req.path
        )));
    }
    match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(ApiError::bad_request(format!(
                "{} is not a regular file",
                path.display()
            )))
        }
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    }
    tracing::info!(template = %req.name, path = %path.display(), "importing template");
    let template = adopt_and_register(
        &state, node_id, req.name, path, false, req.format, req.sha256,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(views::template_view(template))))
}

#[utoipa::path(get, path = "/api/v1/templates", tag = "templates",
    responses((status = 200, body = [TemplateView])),
    security(("bearer" = [])))]
pub async fn list_templates(State(state): State<AppState>) -> ApiResult<Vec<TemplateView>> {
    let mut templates = read(&state, model::list::<Template>)?;
    templates.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(
        templates.into_iter().map(views::template_view).collect(),
    ))
}

#[utoipa::path(get, path = "/api/v1/templates/{template}", tag = "templates",
    params(("template" = String, Path, description = "template name or id")),
    responses((status = 200, body = TemplateView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_template(
    State(state): State<AppState>,
    Path(template): Path<String>,
) -> ApiResult<TemplateView> {
    let t = read(&state, |c| compute::find_template(c, &template))?
        .ok_or(CommandError::TemplateUnknown { template })?;
    Ok(Json(views::template_view(t)))
}

#[utoipa::path(delete, path = "/api/v1/templates/{template}", tag = "templates",
    params(("template" = String, Path, description = "template name or id")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "VMs still use it")),
    security(("bearer" = [])))]
pub async fn delete_template(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(template): Path<String>,
) -> Result<StatusCode, ApiError> {
    let local = read(&state, |c| compute::find_template(c, &template))?;
    tracing::info!(template = %template, principal = ?who, "deleting template");
    state
        .db
        .write(Command::Compute {
            command: ComputeCommand::DeleteTemplate { template },
        })
        .await?;
    // Only this host's copy goes now; the other replicas' files are garbage-collected by
    // their own reconcilers, which remove store files no template record names.
    if let Some(t) = local {
        remove_local_copy(&state, &t.id, t.format);
    }
    Ok(StatusCode::NO_CONTENT)
}

fn remove_local_copy(state: &AppState, id: &str, format: ImageFormat) {
    let path = state.images.template_path(id, format);
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed the template's local copy"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the template's local copy");
        }
    }
}
