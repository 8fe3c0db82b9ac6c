//! The README's actix-web quick start, run by `tests/quickstarts.rs`: below this
//! comment, the file and the README's block must stay identical.

use actix_web::{web, App, HttpResponse, HttpServer};
use idempotency_actix::{Idempotency, IdempotencyConfig, IdempotencyMiddleware, MemoryStore};

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = IdempotencyConfig::builder()
        .scope_header("authorization")
        .build()?;
    let engine = Idempotency::new(MemoryStore::new(), config);
    // Build it once: every worker shares the engine and its store.
    let idempotency = IdempotencyMiddleware::new(engine);
    let port: u16 = std::env::var("PORT").map_or(Ok(3000), |p| p.parse())?;
    HttpServer::new(move || {
        App::new().wrap(idempotency.clone()).route(
            "/payments",
            web::post().to(|| async { HttpResponse::Created().body("paid") }),
        )
    })
    .bind(("127.0.0.1", port))?
    .run()
    .await?;
    Ok(())
}
