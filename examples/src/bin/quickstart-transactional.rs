//! The README's transactional-mode quick start, run by `tests/quickstarts.rs`: below this
//! comment, the file and the README's block must stay identical.

use axum::{http::StatusCode, routing::post, Router};
use idempotency_tower::stores::{PostgresStore, PostgresTransaction};
use idempotency_tower::{Idempotency, IdempotencyConfig, IdempotencyLayer, Transaction};

async fn pay(mut tx: Transaction<PostgresTransaction>) -> Result<StatusCode, StatusCode> {
    // The effect: it commits with the idempotency record, or not at all.
    sqlx::query("INSERT INTO quickstart_payments (amount) VALUES (100)")
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            // The client gets a bare 500 (nothing committed); the cause goes to the log.
            eprintln!("the payment's insert failed: {e}");
            StatusCode::INTERNAL_SERVER_ERROR
        })?;
    Ok(StatusCode::CREATED)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/test").await?;
    // The handler's own table, beside the records' schema `idempotency`.
    sqlx::query("CREATE TABLE IF NOT EXISTS quickstart_payments (id BIGSERIAL PRIMARY KEY, amount BIGINT NOT NULL)")
        .execute(store.pool())
        .await?;
    let engine = Idempotency::transactional(store, IdempotencyConfig::default());
    let app = Router::new()
        .route("/payments", post(pay))
        .layer(IdempotencyLayer::new(engine));
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_owned());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
