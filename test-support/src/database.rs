//! A PostgreSQL database of a test's own, for tests whose processes (a
//! relay, a consumer) work on whatever the database holds.

use sqlx::PgPool;

use crate::env::{service_url, unique};

/// A database created on the server of `DATABASE_URL` under a unique name,
/// dropped by [`PgDatabase::finish`].
pub struct PgDatabase {
    admin: PgPool,
    /// Its name.
    pub name: String,
    /// Its URL: `DATABASE_URL` with the database replaced.
    pub url: String,
    /// A pool on it.
    pub pool: PgPool,
}

impl PgDatabase {
    /// A new database, or `None` (the reason printed) when `DATABASE_URL`
    /// is unset.
    ///
    /// # Panics
    /// When PostgreSQL does not answer or refuses to create it.
    pub async fn create(test: &str) -> Option<Self> {
        let admin_url = service_url("DATABASE_URL", test)?;
        let admin = PgPool::connect(&admin_url)
            .await
            .expect("PostgreSQL does not answer");
        let name = unique(test.split('_').next().unwrap_or("test"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("CREATE DATABASE");
        let (base, _) = admin_url
            .split('?')
            .next()
            .unwrap_or(&admin_url)
            .rsplit_once('/')
            .expect("a database in DATABASE_URL");
        let url = format!("{base}/{name}");
        let pool = PgPool::connect(&url).await.expect("the new database");
        Some(Self {
            admin,
            name,
            url,
            pool,
        })
    }

    /// The one `bigint` `sql` selects; 0 while its table does not exist yet
    /// (a process under test creates it).
    ///
    /// # Panics
    /// On any other error.
    pub async fn count(&self, sql: &str) -> i64 {
        match sqlx::query_scalar(sql).fetch_one(&self.pool).await {
            Ok(n) => n,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => 0,
            Err(e) => panic!("{sql}: {e}"),
        }
    }

    /// Drops the database (and any connection still on it).
    pub async fn finish(self) {
        self.pool.close().await;
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&self.admin)
        .await;
    }
}
