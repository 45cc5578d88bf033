//! The CLI's client for the admin socket: HTTP/1.1 over a Unix stream.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};

use crate::api::types::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the node service at {path}: {hint}")]
    Connect {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the node service at {path} broke off the request")]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("the node service sent an unreadable answer")]
    Decode(#[source] serde_json::Error),
}

pub struct LocalClient {
    socket: PathBuf,
}

impl LocalClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.raw(Method::DELETE, path, Vec::new()).await.map(|_| ())
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(ClientError::Decode)?,
            None => Vec::new(),
        };
        let data = self.raw(method, path, bytes).await?;
        serde_json::from_slice(&data).map_err(ClientError::Decode)
    }

    async fn raw(&self, method: Method, path: &str, body: Vec<u8>) -> Result<Bytes, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                hint: match source.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        "is `keel serve` running? (pass --socket if it uses another path)"
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        "the admin socket is root-only; run as root"
                    }
                    _ => "check the socket path",
                },
                source,
            })?;
        let http = |source| ClientError::Http {
            path: self.socket.clone(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "keel.local")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Api {
                status: StatusCode::BAD_REQUEST,
                code: "bad_request".into(),
                message: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let data = resp.into_body().collect().await.map_err(http)?.to_bytes();
        if status.is_success() {
            return Ok(data);
        }
        match serde_json::from_slice::<ErrorBody>(&data) {
            Ok(body) => Err(ClientError::Api {
                status,
                code: body.error.code,
                message: body.error.message,
            }),
            Err(_) => Err(ClientError::Api {
                status,
                code: "http".into(),
                message: format!("{status}: {}", String::from_utf8_lossy(&data).trim()),
            }),
        }
    }
}
