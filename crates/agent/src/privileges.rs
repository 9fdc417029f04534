//! What the agent's store role must be allowed, checked at start so a
//! missing grant is named before anything fails half-way.
//!
//! The role needs no superuser: `LOGIN REPLICATION`; the rights of the
//! replicated tables' owner (publications and the routed-write triggers
//! need them: `GRANT <owner> TO <role>`); `CREATE` on the database (the
//! `meridian` schema) and on schema `public` (where migrations are
//! recorded); `SET` on `session_replication_role` (apply skips the
//! application's triggers and foreign keys); `EXECUTE` on
//! `pg_replication_origin_create(text)` and
//! `pg_replication_origin_session_setup(text)` (changes applied here are
//! marked so they are never shipped back).

use sqlx::PgPool;

/// What the role has, as read from the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub role: String,
    pub database: String,
    pub superuser: bool,
    pub replication: bool,
    pub create_schema: bool,
    pub create_in_public: bool,
    pub set_replication_role: bool,
    pub create_origin: bool,
    pub use_origin: bool,
    /// Replicated tables whose owner's rights the role lacks.
    pub not_owned: Vec<String>,
}

/// Each missing privilege, named, with the statement that grants it.
pub fn missing(h: &Held) -> Vec<String> {
    if h.superuser {
        return Vec::new();
    }
    let (role, db) = (quote(&h.role), quote(&h.database));
    let mut out = Vec::new();
    let mut need = |held: bool, what: &str, fix: String| {
        if !held {
            out.push(format!("{what}: {fix}"));
        }
    };
    need(
        h.replication,
        "the REPLICATION attribute (replication slots)",
        format!("ALTER ROLE {role} REPLICATION;"),
    );
    need(
        h.create_schema,
        "CREATE on the database (the meridian schema)",
        format!("GRANT CREATE ON DATABASE {db} TO {role};"),
    );
    need(
        h.create_in_public,
        "CREATE on schema public (where migrations are recorded)",
        format!("GRANT CREATE ON SCHEMA public TO {role};"),
    );
    need(
        h.set_replication_role,
        "SET on parameter session_replication_role (apply)",
        format!("GRANT SET ON PARAMETER session_replication_role TO {role};"),
    );
    need(
        h.create_origin,
        "EXECUTE on pg_replication_origin_create(text)",
        format!("GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text) TO {role};"),
    );
    need(
        h.use_origin,
        "EXECUTE on pg_replication_origin_session_setup(text)",
        format!("GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) TO {role};"),
    );
    for table in &h.not_owned {
        out.push(format!(
            "the owner's rights on {table} (publication and triggers): GRANT <owner of {table}> TO {role};"
        ));
    }
    out
}

fn quote(ident: &str) -> String {
    meridian_core::change::quote_ident(ident)
}

/// Reads what the pool's role holds; `tables` are the topology's
/// (`schema.table`) tables.
pub async fn held(pool: &PgPool, tables: &[String]) -> Result<Held, sqlx::Error> {
    let row: (String, String, bool, bool, bool, bool, bool, bool, bool) = sqlx::query_as(
        "SELECT current_user::text, current_database()::text, r.rolsuper, r.rolreplication,
                has_database_privilege(current_database(), 'CREATE')
                  OR EXISTS (SELECT 1 FROM pg_namespace
                             WHERE nspname = 'meridian' AND pg_has_role(nspowner, 'USAGE')),
                has_schema_privilege('public', 'CREATE'),
                has_parameter_privilege('session_replication_role', 'SET'),
                has_function_privilege('pg_replication_origin_create(text)', 'EXECUTE'),
                has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE')
           FROM pg_roles r WHERE r.rolname = current_user",
    )
    .fetch_one(pool)
    .await?;
    let not_owned: Vec<String> = sqlx::query_scalar(
        "SELECT t FROM unnest($1::text[]) t
          WHERE to_regclass(t) IS NOT NULL
            AND NOT pg_has_role((SELECT relowner FROM pg_class WHERE oid = to_regclass(t)), 'USAGE')",
    )
    .bind(tables)
    .fetch_all(pool)
    .await?;
    Ok(Held {
        role: row.0,
        database: row.1,
        superuser: row.2,
        replication: row.3,
        create_schema: row.4,
        create_in_public: row.5,
        set_replication_role: row.6,
        create_origin: row.7,
        use_origin: row.8,
        not_owned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_missing_privilege_is_named_with_its_grant() {
        let all = Held {
            role: "meridian_agent".into(),
            database: "app".into(),
            replication: true,
            create_schema: true,
            create_in_public: true,
            set_replication_role: true,
            create_origin: true,
            use_origin: true,
            ..Held::default()
        };
        assert!(missing(&all).is_empty());
        let without = Held {
            set_replication_role: false,
            not_owned: vec!["public.orders".into()],
            ..all.clone()
        };
        assert_eq!(
            missing(&without),
            vec![
                "SET on parameter session_replication_role (apply): GRANT SET ON PARAMETER session_replication_role TO \"meridian_agent\";".to_owned(),
                "the owner's rights on public.orders (publication and triggers): GRANT <owner of public.orders> TO \"meridian_agent\";".to_owned(),
            ]
        );
        let superuser = Held {
            superuser: true,
            ..Held::default()
        };
        assert!(missing(&superuser).is_empty());
    }
}
