//! Processes of the examples that start at the same moment on a fresh
//! database: each creates its tables, and none fails on the others' (real
//! PostgreSQL; skipped, saying so, without `DATABASE_URL`).

use test_support::PgDatabase;

/// Eight ledger consumers (as `inbox-rabbitmq` and `inbox-nats` open it)
/// on one fresh database at once, five times: every one starts. Two
/// concurrent `CREATE TABLE IF NOT EXISTS` of one table can fail on
/// PostgreSQL's catalog (`pg_type_typname_nsp_index`); the examples take
/// one advisory lock around their tables' creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_consumers_starting_together_on_a_fresh_database_all_start() {
    for round in 0..5 {
        let Some(db) = PgDatabase::create("ledger_consumers_starting_together").await else {
            return;
        };
        let opens = (0..8).map(|i| {
            let url = db.url.clone();
            tokio::spawn(async move {
                examples::ledger::open(&url, &format!("startup-{i}"))
                    .await
                    .map(drop)
                    .map_err(|e| examples::error_chain(&*e))
            })
        });
        for (i, open) in futures_util::future::join_all(opens)
            .await
            .into_iter()
            .enumerate()
        {
            if let Err(e) = open.expect("the open task") {
                panic!("round {round}: consumer {i} did not start: {e}");
            }
        }
        db.finish().await;
    }
}
