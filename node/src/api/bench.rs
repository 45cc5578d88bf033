//! The raft benchmark's route, `/local/v1/bench/raft` on the admin socket: writes proposed
//! straight to raft inside the node service (no HTTP, no TLS), timed one by one. It is a
//! test-only path: compiled in only with the `bench` feature, which `scripts/bench`
//! builds with; the production binary (the ISO, the sandbox) has no such route.

use std::time::Instant;

use axum::extract::State;
use axum::Json;
use keel_api_types::{RaftBenchReply, RaftBenchRequest};
use keel_cluster::db::now_ms;
use keel_cluster::error_chain;
use keel_cluster::model::Command;

use super::{ApiError, AppState};

use super::handlers::ApiResult;

pub async fn local_raft_bench(
    State(state): State<AppState>,
    Json(req): Json<RaftBenchRequest>,
) -> ApiResult<RaftBenchReply> {
    if req.count == 0 || req.count > 100_000 || req.concurrency == 0 || req.concurrency > 256 {
        return Err(ApiError::bad_request(
            "count must be 1..=100000 and concurrency 1..=256",
        ));
    }
    let start = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..req.concurrency {
        let db = state.db.clone();
        let next = next.clone();
        let count = req.count;
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u32;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let t = Instant::now();
                let r = db
                    .write(Command::PutSetting {
                        key: format!("bench.raft.k{}", i % 64),
                        value: i.to_string(),
                        now_ms: now_ms(),
                    })
                    .await;
                match r {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                    Err(e) => {
                        errors += 1;
                        tracing::debug!(error = %error_chain(&e), "bench write failed");
                    }
                }
            }
            (lat, errors)
        });
    }
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        let (lat, err) = done.map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("a benchmark task failed: {e}"),
            )
        })?;
        latencies_us.extend(lat);
        errors += err;
    }
    Ok(Json(RaftBenchReply {
        latencies_us,
        elapsed_us: start.elapsed().as_micros() as u64,
        errors,
    }))
}
