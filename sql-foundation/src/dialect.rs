//! One statement for PostgreSQL and SQLite: a [`Statement`] binds and runs
//! the same way on both, so the code around it is written once, generic
//! over a [`Dialect`].

use std::future::Future;
use std::pin::Pin;

/// A boxed `Send` future: what a statement's run returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

use sqlx::{Arguments, Database, Decode, Encode, Pool, Transaction, Type};

/// Encoding a value of type `T` into this database's arguments: every
/// type sqlx encodes for it. A supertrait of [`Dialect`] for the types
/// the workspace binds, so generic code can bind them with no bounds of
/// its own.
pub trait Binds<'q, T>: Database {
    /// Adds `value` to `arguments`.
    ///
    /// # Errors
    /// The encoder's error.
    fn add(arguments: &mut Self::Arguments<'q>, value: T) -> Result<(), sqlx::error::BoxDynError>;
}

impl<'q, DB: Database, T> Binds<'q, T> for DB
where
    T: Encode<'q, DB> + Type<DB> + Send + 'q,
{
    fn add(arguments: &mut Self::Arguments<'q>, value: T) -> Result<(), sqlx::error::BoxDynError> {
        arguments.add(value)
    }
}

/// Decoding a column of a row of this database as `T`: every type sqlx
/// decodes for it. A supertrait of [`Dialect`] for the types the
/// workspace reads.
pub trait Decodes<T>: Database {
    /// The column `name` of `row`.
    ///
    /// # Errors
    /// [`sqlx::Error::ColumnNotFound`] or a decoding error.
    fn decode_column(row: &Self::Row, name: &str) -> Result<T, sqlx::Error>;
}

impl<DB: Database, T> Decodes<T> for DB
where
    T: for<'r> Decode<'r, DB> + Type<DB>,
    for<'a> &'a str: sqlx::ColumnIndex<DB::Row>,
{
    fn decode_column(row: &Self::Row, name: &str) -> Result<T, sqlx::Error> {
        sqlx::Row::try_get(row, name)
    }
}

/// A database the workspace's SQL parts run on: PostgreSQL (feature
/// `postgres`) or SQLite (feature `sqlite`). Sealed.
///
/// Statements are written once where their SQL is the same on both (SQLite
/// reads `$1`, `$2`, ... as PostgreSQL does) and as one constant per
/// database where it is not; the Rust around them is written once,
/// generic over `DB: Dialect`.
pub trait Dialect:
    Database
    + sealed::Sealed
    + for<'q> Binds<'q, &'q str>
    + for<'q> Binds<'q, &'q [u8]>
    + for<'q> Binds<'q, Option<&'q str>>
    + for<'q> Binds<'q, String>
    + for<'q> Binds<'q, Option<String>>
    + for<'q> Binds<'q, Vec<u8>>
    + for<'q> Binds<'q, i64>
    + for<'q> Binds<'q, Option<i64>>
    + for<'q> Binds<'q, bool>
    + for<'q> Binds<'q, f64>
    + Decodes<String>
    + Decodes<Option<String>>
    + Decodes<Vec<u8>>
    + Decodes<Option<Vec<u8>>>
    + Decodes<i64>
    + Decodes<Option<i64>>
    + Decodes<bool>
    + Decodes<f64>
    + Decodes<Option<f64>>
{
    /// A short name for logs and errors: `"postgres"` or `"sqlite"`.
    const BACKEND: &'static str;

    /// Begins a transaction that is going to write. On SQLite it takes the
    /// write lock at once (`BEGIN IMMEDIATE`), so a concurrent writer waits
    /// for it (within the busy timeout) instead of failing when it upgrades
    /// from reading; on PostgreSQL it is a plain `BEGIN`.
    fn begin_write(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send + '_;

    /// Runs `statement` on `on` and says how many rows it changed.
    fn execute<'e, 'c: 'e, 'q: 'e>(
        on: On<'c, Self>,
        statement: Statement<'q, Self>,
    ) -> BoxFuture<'e, Result<u64, sqlx::Error>>;

    /// Runs `statement` on `on` and returns its first row, if any.
    fn fetch_optional<'e, 'c: 'e, 'q: 'e>(
        on: On<'c, Self>,
        statement: Statement<'q, Self>,
    ) -> BoxFuture<'e, Result<Option<Self::Row>, sqlx::Error>>;

    /// Runs `statement` on `on` and returns every row.
    fn fetch_all<'e, 'c: 'e, 'q: 'e>(
        on: On<'c, Self>,
        statement: Statement<'q, Self>,
    ) -> BoxFuture<'e, Result<Vec<Self::Row>, sqlx::Error>>;

    /// The column `name` of `row`, as `T`.
    ///
    /// # Errors
    /// [`sqlx::Error::ColumnNotFound`] or a decoding error.
    fn get<T>(row: &Self::Row, name: &str) -> Result<T, sqlx::Error>
    where
        Self: Decodes<T>,
    {
        Self::decode_column(row, name)
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Where a statement runs: a connection (most often a transaction's) or a
/// pool.
pub enum On<'c, DB: Database> {
    /// A connection, such as the one of an open transaction.
    Conn(&'c mut DB::Connection),
    /// A pool: the statement takes a connection for itself.
    Pool(&'c Pool<DB>),
}

impl<'c, DB: Database> From<&'c Pool<DB>> for On<'c, DB> {
    fn from(pool: &'c Pool<DB>) -> Self {
        On::Pool(pool)
    }
}

impl<'c, 't, DB: Database> From<&'c mut Transaction<'t, DB>> for On<'c, DB> {
    fn from(tx: &'c mut Transaction<'t, DB>) -> Self {
        On::Conn(&mut **tx)
    }
}

impl<'c, DB: Database> From<&'c mut sqlx::pool::PoolConnection<DB>> for On<'c, DB> {
    fn from(conn: &'c mut sqlx::pool::PoolConnection<DB>) -> Self {
        On::Conn(&mut **conn)
    }
}

/// One SQL statement and its arguments, for either database.
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), sqlx::Error> {
/// use sql_foundation::{Dialect, Statement};
///
/// async fn count<DB: Dialect>(pool: &sqlx::Pool<DB>, consumer: &str) -> Result<i64, sqlx::Error> {
///     let row = Statement::new("SELECT COUNT(*) AS n FROM t WHERE consumer = $1")
///         .bind(consumer)
///         .fetch_one(pool)
///         .await?;
///     DB::get(&row, "n")
/// }
/// let n = count(&pool, "ledger").await?;
/// # let _ = n;
/// # Ok(())
/// # }
/// ```
#[must_use = "a statement does nothing until it runs"]
pub struct Statement<'q, DB: Database> {
    pub(crate) sql: &'q str,
    pub(crate) arguments: DB::Arguments<'q>,
    /// The first value that failed to encode: the statement fails with it
    /// when it runs, as sqlx's own `bind` does.
    pub(crate) error: Option<sqlx::error::BoxDynError>,
}

impl<'q, DB: Dialect> Statement<'q, DB> {
    /// The statement `sql`, with no arguments yet.
    pub fn new(sql: &'q str) -> Self {
        Self {
            sql,
            arguments: Default::default(),
            error: None,
        }
    }

    /// Binds the next argument (`$1`, then `$2`, ...).
    pub fn bind<T>(mut self, value: T) -> Self
    where
        DB: Binds<'q, T>,
    {
        if self.error.is_none() {
            if let Err(e) = DB::add(&mut self.arguments, value) {
                self.error = Some(e);
            }
        }
        self
    }

    /// Runs it; how many rows it changed.
    ///
    /// # Errors
    /// The database's error.
    pub async fn execute<'c>(self, on: impl Into<On<'c, DB>>) -> Result<u64, sqlx::Error> {
        DB::execute(on.into(), self).await
    }

    /// Runs it; its first row, if any.
    ///
    /// # Errors
    /// The database's error.
    pub async fn fetch_optional<'c>(
        self,
        on: impl Into<On<'c, DB>>,
    ) -> Result<Option<DB::Row>, sqlx::Error> {
        DB::fetch_optional(on.into(), self).await
    }

    /// Runs it; its first row, or [`sqlx::Error::RowNotFound`].
    ///
    /// # Errors
    /// The database's error, or `RowNotFound`.
    pub async fn fetch_one<'c>(self, on: impl Into<On<'c, DB>>) -> Result<DB::Row, sqlx::Error> {
        DB::fetch_optional(on.into(), self)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }

    /// Runs it; every row.
    ///
    /// # Errors
    /// The database's error.
    pub async fn fetch_all<'c>(
        self,
        on: impl Into<On<'c, DB>>,
    ) -> Result<Vec<DB::Row>, sqlx::Error> {
        DB::fetch_all(on.into(), self).await
    }
}

impl<DB: Database> std::fmt::Debug for Statement<'_, DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statement").field("sql", &self.sql).finish()
    }
}

/// The [`Dialect`] of a database: its name, how a writing transaction
/// begins, and the statement runners (sqlx's executors, which generic code
/// cannot name without bounds of its own).
#[allow(unused_macros)] // with neither database's feature on
macro_rules! dialect {
    ($db:ty, $name:literal, $begin:literal) => {
        impl sealed::Sealed for $db {}

        impl Dialect for $db {
            const BACKEND: &'static str = $name;

            fn begin_write(
                pool: &Pool<Self>,
            ) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send + '_
            {
                pool.begin_with($begin)
            }

            fn execute<'e, 'c: 'e, 'q: 'e>(
                on: On<'c, Self>,
                statement: Statement<'q, Self>,
            ) -> BoxFuture<'e, Result<u64, sqlx::Error>> {
                Box::pin(async move {
                    let query = statement.into_query()?;
                    let done = match on {
                        On::Conn(conn) => query.execute(conn).await?,
                        On::Pool(pool) => query.execute(pool).await?,
                    };
                    Ok(done.rows_affected())
                })
            }

            fn fetch_optional<'e, 'c: 'e, 'q: 'e>(
                on: On<'c, Self>,
                statement: Statement<'q, Self>,
            ) -> BoxFuture<'e, Result<Option<Self::Row>, sqlx::Error>> {
                Box::pin(async move {
                    let query = statement.into_query()?;
                    match on {
                        On::Conn(conn) => query.fetch_optional(conn).await,
                        On::Pool(pool) => query.fetch_optional(pool).await,
                    }
                })
            }

            fn fetch_all<'e, 'c: 'e, 'q: 'e>(
                on: On<'c, Self>,
                statement: Statement<'q, Self>,
            ) -> BoxFuture<'e, Result<Vec<Self::Row>, sqlx::Error>> {
                Box::pin(async move {
                    let query = statement.into_query()?;
                    match on {
                        On::Conn(conn) => query.fetch_all(conn).await,
                        On::Pool(pool) => query.fetch_all(pool).await,
                    }
                })
            }
        }
    };
}

impl<'q, DB: Database> Statement<'q, DB> {
    /// The sqlx query, or the first encoding error.
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    fn into_query(self) -> Result<sqlx::query::Query<'q, DB, DB::Arguments<'q>>, sqlx::Error>
    where
        DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    {
        match self.error {
            Some(e) => Err(sqlx::Error::Encode(e)),
            None => Ok(sqlx::query_with(self.sql, self.arguments)),
        }
    }
}

#[cfg(feature = "postgres")]
dialect!(sqlx::Postgres, "postgres", "BEGIN");
#[cfg(feature = "sqlite")]
dialect!(sqlx::Sqlite, "sqlite", "BEGIN IMMEDIATE");
