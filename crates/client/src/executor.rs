//! sqlx's `Executor` for the client's transaction handles, so queries run
//! on `&mut tx` (and on `&mut *tx`, the connection) exactly as on a sqlx
//! transaction.

/// Implements `Executor` for `&mut $handle` (or `&$handle`), delegating
/// to the connection or pool that `$inner` borrows from the handle.
macro_rules! delegate_executor {
    ($handle:ty, |$h:ident| $inner:expr) => {
        impl<'c> sqlx::Executor<'c> for $handle {
            type Database = sqlx::Postgres;

            fn fetch_many<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> futures::stream::BoxStream<
                'e,
                Result<
                    sqlx::Either<sqlx::postgres::PgQueryResult, sqlx::postgres::PgRow>,
                    sqlx::Error,
                >,
            >
            where
                'c: 'e,
                E: 'q + sqlx::Execute<'q, sqlx::Postgres>,
            {
                let $h = self;
                $inner.fetch_many(query)
            }

            fn fetch_optional<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> futures::future::BoxFuture<'e, Result<Option<sqlx::postgres::PgRow>, sqlx::Error>>
            where
                'c: 'e,
                E: 'q + sqlx::Execute<'q, sqlx::Postgres>,
            {
                let $h = self;
                $inner.fetch_optional(query)
            }

            fn prepare_with<'e, 'q: 'e>(
                self,
                sql: &'q str,
                parameters: &'e [sqlx::postgres::PgTypeInfo],
            ) -> futures::future::BoxFuture<
                'e,
                Result<sqlx::postgres::PgStatement<'q>, sqlx::Error>,
            >
            where
                'c: 'e,
            {
                let $h = self;
                $inner.prepare_with(sql, parameters)
            }

            fn describe<'e, 'q: 'e>(
                self,
                sql: &'q str,
            ) -> futures::future::BoxFuture<
                'e,
                Result<sqlx::Describe<sqlx::Postgres>, sqlx::Error>,
            >
            where
                'c: 'e,
            {
                let $h = self;
                $inner.describe(sql)
            }
        }
    };
}

pub(crate) use delegate_executor;
