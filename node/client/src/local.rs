//! The CLI's client for the admin socket: HTTP/1.1 over a Unix stream.

use std::path::{Path, PathBuf};

use futures::Stream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};

use keel_api_types::ErrorBody;

fn json_body(bytes: Vec<u8>) -> UnsyncBoxBody<Bytes, std::io::Error> {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed_unsync()
}

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

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub(crate) async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub(crate) async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// A POST without a body.
    pub(crate) async fn post_empty<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, None::<&()>).await
    }

    pub(crate) async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.raw(Method::DELETE, path, json_body(Vec::new()), None)
            .await
            .map(|_| ())
    }

    /// A DELETE whose answer has a body (e.g. `202` with the operation).
    pub(crate) async fn delete_json<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    /// POSTs `len` bytes of `chunks` as the request body (`application/octet-stream`),
    /// streamed: nothing is held in memory beyond the chunk in flight.
    pub(crate) async fn post_stream<S, T>(
        &self,
        path: &str,
        len: u64,
        chunks: S,
    ) -> Result<T, ClientError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
        T: DeserializeOwned,
    {
        use futures::TryStreamExt;
        let body = BodyExt::boxed_unsync(StreamBody::new(chunks.map_ok(Frame::data)));
        let data = self
            .raw(
                Method::POST,
                path,
                body,
                Some(("application/octet-stream", len)),
            )
            .await?;
        serde_json::from_slice(&data).map_err(ClientError::Decode)
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
        let data = self.raw(method, path, json_body(bytes), None).await?;
        serde_json::from_slice(&data).map_err(ClientError::Decode)
    }

    /// Sends one request. `raw_body` gives the content type and length of a non-JSON body.
    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: UnsyncBoxBody<Bytes, std::io::Error>,
        raw_body: Option<(&str, u64)>,
    ) -> Result<Bytes, ClientError> {
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
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "keel.local");
        req = match raw_body {
            None => req.header("content-type", "application/json"),
            Some((content_type, len)) => req
                .header("content-type", content_type)
                .header("content-length", len),
        };
        let req = req.body(body).map_err(|e| ClientError::Api {
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
