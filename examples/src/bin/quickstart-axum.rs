//! The README's axum quick start, run by `tests/quickstarts.rs`: below this
//! comment, the file and the README's block must stay identical.

use axum::{routing::post, Router};
use idempotency_tower::{Idempotency, IdempotencyConfig, IdempotencyLayer, MemoryStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = IdempotencyConfig::builder()
        .scope_header("authorization") // or IdempotencyLayer::with_scope(|parts| ...)
        .build()?;
    let engine = Idempotency::new(MemoryStore::new(), config);
    let app = Router::new()
        .route("/payments", post(|| async { "paid" }))
        .layer(IdempotencyLayer::new(engine));
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_owned());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
