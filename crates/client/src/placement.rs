//! Tenant placements: each tenant's home region, kept in the global
//! database (`meridian.placements`) and pushed to every regional store
//! (`meridian.placement_epochs`), where routed writes are checked against it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use meridian_core::topology::Topology;

use sqlx::PgPool;

use crate::{Error, Options, Stores};

/// Migrations of the global database (`migrations/global`).
pub static GLOBAL_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/global");

/// A tenant's home region. `epoch` grows with every change of home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub tenant: String,
    pub home: String,
    pub epoch: i64,
}

/// The outcome of [`Placements::set`].
#[derive(Debug)]
pub struct PlacementChange {
    pub placement: Placement,
    /// The placement before, if the tenant had one.
    pub previous: Option<Placement>,
    /// Per region: whether its store now knows the placement. A region that
    /// failed keeps refusing (or, if it was the old home, accepting) routed
    /// writes by the older placement until `set` is run again.
    pub pushed: BTreeMap<String, Result<(), String>>,
}

impl PlacementChange {
    /// Whether every regional store knows the new placement.
    pub fn complete(&self) -> bool {
        self.pushed.values().all(Result::is_ok)
    }
}

/// Placement administration (`meridian placement set|get|list`).
#[derive(Clone)]
pub struct Placements {
    pub(crate) stores: Arc<Stores>,
}

impl Placements {
    /// For tools with no region of their own: reads the topology file like
    /// [`crate::Client::open`].
    pub fn open(topology: impl AsRef<Path>) -> Result<Placements, Error> {
        let topology =
            Topology::load(topology.as_ref()).map_err(|e| Error::Config(e.to_string()))?;
        Ok(Placements {
            stores: Arc::new(Stores::new(&topology, &Options::default())?),
        })
    }

    fn global(&self) -> Result<&PgPool, Error> {
        self.stores.global.as_ref().ok_or(Error::NoGlobalDatabase)
    }

    /// Creates or upgrades the global database's `meridian` schema (once
    /// per process; later calls return at once).
    pub async fn migrate(&self) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        if self.stores.global_migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        GLOBAL_MIGRATOR
            .run(self.global()?)
            .await
            .map_err(|e| Error::Config(format!("migrating the global database: {e}")))?;
        self.stores.global_migrated.store(true, Ordering::Release);
        Ok(())
    }

    /// The tenant's placement, from the global database.
    pub async fn get(&self, tenant: &str) -> Result<Option<Placement>, Error> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT home_region, epoch FROM meridian.placements WHERE tenant = $1")
                .bind(tenant)
                .fetch_optional(self.global()?)
                .await
                .map_err(missing_schema)?;
        Ok(row.map(|(home, epoch)| Placement {
            tenant: tenant.to_owned(),
            home,
            epoch,
        }))
    }

    /// Every placement, by tenant.
    pub async fn list(&self) -> Result<Vec<Placement>, Error> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT tenant, home_region, epoch FROM meridian.placements ORDER BY tenant",
        )
        .fetch_all(self.global()?)
        .await
        .map_err(missing_schema)?;
        Ok(rows
            .into_iter()
            .map(|(tenant, home, epoch)| Placement {
                tenant,
                home,
                epoch,
            })
            .collect())
    }

    /// Makes `home` the tenant's home region: in the global database (a new
    /// epoch if the home changes), then in every regional store, the old home
    /// first, so it refuses routed writes by the old placement from then on.
    /// Running it again with the same home bumps nothing and re-pushes, which
    /// repairs regions an earlier run could not reach.
    ///
    /// Moving a tenant does not move its existing rows.
    pub async fn set(&self, tenant: &str, home: &str) -> Result<PlacementChange, Error> {
        self.stores.region(home)?;
        if tenant.is_empty() || tenant.len() > 200 {
            return Err(Error::Config(format!(
                "tenant id {:?}: expected 1 to 200 characters",
                tenant.chars().take(40).collect::<String>()
            )));
        }
        self.migrate().await?;
        let mut tx = self.global()?.begin().await?;
        let previous: Option<(String, i64)> = sqlx::query_as(
            "SELECT home_region, epoch FROM meridian.placements WHERE tenant = $1 FOR UPDATE",
        )
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
        let epoch = match &previous {
            Some((old, epoch)) if old == home => *epoch,
            Some((_, epoch)) => epoch + 1,
            None => 1,
        };
        sqlx::query(
            "INSERT INTO meridian.placements (tenant, home_region, epoch) VALUES ($1, $2, $3)
             ON CONFLICT (tenant) DO UPDATE
                SET home_region = EXCLUDED.home_region, epoch = EXCLUDED.epoch, updated_at = now()",
        )
        .bind(tenant)
        .bind(home)
        .bind(epoch)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let placement = Placement {
            tenant: tenant.to_owned(),
            home: home.to_owned(),
            epoch,
        };
        let previous = previous.map(|(home, epoch)| Placement {
            tenant: tenant.to_owned(),
            home,
            epoch,
        });
        // the old home first: from then on it refuses writers with the old epoch
        let mut order: Vec<&String> = self.stores.regions.keys().collect();
        order.sort_by_key(|r| Some(r.as_str()) != previous.as_ref().map(|p| p.home.as_str()));
        let mut pushed = BTreeMap::new();
        for region in order {
            let outcome = push(&self.stores.regions[region], &placement)
                .await
                .map_err(|e| match sqlstate_of(&e).as_deref() {
                    Some("42P01") | Some("3F000") => format!(
                        "region {region}'s store has no meridian schema yet; start its agent, then rerun"
                    ),
                    _ => e.to_string(),
                });
            if let Err(e) = &outcome {
                tracing::warn!(tenant, region, error = %e, "placement not pushed");
            }
            pushed.insert(region.clone(), outcome);
        }
        self.stores.remember(placement.clone());
        Ok(PlacementChange {
            placement,
            previous,
            pushed,
        })
    }
}

async fn push(store: &PgPool, p: &Placement) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO meridian.placement_epochs (tenant, home_region, epoch) VALUES ($1, $2, $3)
         ON CONFLICT (tenant) DO UPDATE
            SET home_region = EXCLUDED.home_region, epoch = EXCLUDED.epoch, updated_at = now()
            WHERE meridian.placement_epochs.epoch < EXCLUDED.epoch",
    )
    .bind(&p.tenant)
    .bind(&p.home)
    .bind(p.epoch)
    .execute(store)
    .await?;
    Ok(())
}

fn sqlstate_of(e: &sqlx::Error) -> Option<String> {
    crate::error::sqlstate(e)
}

fn missing_schema(e: sqlx::Error) -> Error {
    match sqlstate_of(&e).as_deref() {
        Some("42P01") | Some("3F000") => Error::Config(
            "the global database has no meridian.placements yet; create it with \
             `meridian placement set --config FILE TENANT REGION` (or Placements::migrate)"
                .to_owned(),
        ),
        _ => Error::Database(e),
    }
}
