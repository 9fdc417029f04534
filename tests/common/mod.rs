//! The counters workload, shared by the gRPC and Kafka end-to-end tests:
//! a table whose every applied row version is logged, a step of inserts,
//! version bumps and deletes, and the check that nothing applied twice.

use meridian_testkit::Deployment;
use sqlx::PgPool;

pub(crate) const COUNTERS_SCHEMA: &str = "
CREATE TABLE counters (id bigint PRIMARY KEY, home text NOT NULL, version integer NOT NULL, payload text);
-- every row version that lands in a store, from local writes or from apply
CREATE TABLE apply_log (id bigint, version integer, op text);
CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO apply_log VALUES (OLD.id, OLD.version, 'D');
  ELSE
    INSERT INTO apply_log VALUES (NEW.id, NEW.version, 'W');
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER counters_log AFTER INSERT OR UPDATE OR DELETE ON counters
  FOR EACH ROW EXECUTE FUNCTION log_apply();
-- fire in apply sessions too (session_replication_role = replica)
ALTER TABLE counters ENABLE ALWAYS TRIGGER counters_log;";

/// One transaction of the kill test's workload in `region`: inserts new rows,
/// bumps the version of some, deletes a few. Returns the changes made.
pub(crate) async fn workload_step(
    pool: &PgPool,
    region_index: i64,
    step: i64,
) -> anyhow::Result<u64> {
    let base = region_index * 1_000_000 + step * 40;
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO counters SELECT g, $2, 0, md5(g::text) FROM generate_series($1::bigint, $1::bigint + 39) g",
    )
    .bind(base)
    .bind(["na", "eu", "apac"][region_index as usize])
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let updated = sqlx::query(
        "UPDATE counters SET version = version + 1 WHERE id >= $1 AND id < $1 + 1000000 AND id % 7 = $2 % 7",
    )
    .bind(region_index * 1_000_000)
    .bind(step)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let deleted = sqlx::query("DELETE FROM counters WHERE id IN ($1, $1 + 13)")
        .bind(base - 40)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(inserted + updated + deleted)
}

/// In every region: no row version applied twice (no two equal rows in the
/// trigger-fed `apply_log`, whatever its columns), and nothing
/// dead-lettered.
pub(crate) async fn assert_applied_once_and_nothing_dead(
    d: &Deployment,
    regions: &[&str],
) -> anyhow::Result<()> {
    for region in regions {
        let pool = d.pool(region);
        let duplicates: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM apply_log l GROUP BY l HAVING count(*) > 1) d",
        )
        .fetch_one(pool)
        .await?;
        assert_eq!(duplicates, 0, "{region}: a row version was applied twice");
        let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM meridian.dead_letters")
            .fetch_one(pool)
            .await?;
        assert_eq!(dead, 0, "{region}: nothing dead-lettered");
    }
    Ok(())
}
