//! Price catalogs for rating, cached per replica.
//!
//! A catalog version is `d<default book>.t<tenant book>` (0: none). Books
//! are immutable, so a version's catalog is cached for good; which version
//! is in force for a tenant is re-read from PostgreSQL at most once per
//! `pricing.refresh` (and kept if PostgreSQL is unreachable). Rating on
//! the hot path therefore costs no I/O once warm.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};

use crate::{
    domain::pricing::{BookContent, Catalog, PriceEntry},
    error::{Error, Reason, Result},
    store::pg::{BookRow, PgStore},
};

#[derive(Clone)]
pub struct Pricing {
    pg: PgStore,
    refresh: Duration,
    catalogs: Arc<RwLock<HashMap<String, Arc<Catalog>>>>,
    in_force: Arc<RwLock<HashMap<String, (Instant, String)>>>,
}

/// One book's entries and model tiers.
type Layer = (Vec<PriceEntry>, std::collections::BTreeMap<String, String>);

impl Pricing {
    pub fn new(pg: PgStore, refresh: Duration) -> Self {
        Pricing {
            pg,
            refresh,
            catalogs: Arc::new(RwLock::new(HashMap::new())),
            in_force: Arc::new(RwLock::new(HashMap::new())),
        }
    }

    /// The tenant's catalog in force now.
    pub async fn current(&self, tenant: &str) -> Result<Arc<Catalog>> {
        let cached = self.in_force.read().expect("pricing lock").get(tenant).cloned();
        let version = match cached {
            Some((at, version)) if at.elapsed() < self.refresh => version,
            _ => match self.version_at(tenant, Utc::now()).await {
                Ok(version) => {
                    self.in_force
                        .write()
                        .expect("pricing lock")
                        .insert(tenant.to_string(), (Instant::now(), version.clone()));
                    version
                }
                Err(e) => match cached {
                    Some((_, version)) => {
                        tracing::warn!(error = %e, tenant, "price catalog not re-read: using the cached version");
                        version
                    }
                    None => return Err(e),
                },
            },
        };
        self.catalog(tenant, &version).await
    }

    /// The version in force for a tenant at an instant.
    pub async fn version_at(&self, tenant: &str, at: DateTime<Utc>) -> Result<String> {
        let default = self.pg.book_in_force(None, at).await?.map_or(0, |b| b.book_id);
        let own = self.pg.book_in_force(Some(tenant), at).await?.map_or(0, |b| b.book_id);
        Ok(format!("d{default}.t{own}"))
    }

    /// The catalog of a version (as pinned by a reservation).
    pub async fn catalog(&self, tenant: &str, version: &str) -> Result<Arc<Catalog>> {
        if let Some(c) = self.catalogs.read().expect("pricing lock").get(version) {
            return Ok(c.clone());
        }
        let (default_id, tenant_id) =
            parse_version(version).ok_or_else(|| Error::internal(format!("malformed price version {version:?}")))?;
        let mut layers: Vec<Layer> = Vec::new();
        for (id, owner) in [(default_id, None), (tenant_id, Some(tenant))] {
            if id == 0 {
                continue;
            }
            let book = self.pg.book(id).await?.ok_or_else(|| Error::internal(format!("price book {id} is missing")))?;
            if book.tenant_id.as_deref() != owner {
                return Err(Error::internal(format!("price book {id} does not belong to {version}")));
            }
            layers.push(layer(&book)?);
        }
        let refs: Vec<_> = layers.iter().map(|(e, m)| (e.as_slice(), m)).collect();
        let catalog = Arc::new(Catalog::layered(version.to_string(), &refs));
        self.catalogs.write().expect("pricing lock").insert(version.to_string(), catalog.clone());
        Ok(catalog)
    }

    /// Forgets which version is in force for a tenant (after a change).
    pub fn invalidate(&self, tenant: Option<&str>) {
        let mut in_force = self.in_force.write().expect("pricing lock");
        match tenant {
            Some(t) => {
                in_force.remove(t);
            }
            None => in_force.clear(),
        }
    }
}

/// A stored book's entries (they were validated when written).
pub fn layer(book: &BookRow) -> Result<Layer> {
    let content: BookContent = serde_json::from_value(book.content.clone())
        .map_err(|e| Error::internal(format!("price book {} is unreadable: {e}", book.book_id)))?;
    let entries =
        content.entries("").map_err(|e| Error::internal(format!("price book {} is invalid: {e}", book.book_id)))?;
    Ok((entries, content.models))
}

fn parse_version(version: &str) -> Option<(i64, i64)> {
    let (d, t) = version.split_once('.')?;
    Some((d.strip_prefix('d')?.parse().ok()?, t.strip_prefix('t')?.parse().ok()?))
}

/// A change to one scope's prices (SetPrices).
pub struct PriceChange {
    pub upsert: BookContent,
    /// (meter, model, tier) to remove.
    pub remove: Vec<(String, String, String)>,
    pub effective_at: Option<DateTime<Utc>>,
    pub idempotency_key: String,
}

impl crate::service::Engine {
    /// Writes a new book for a scope (`None`: the default catalog): the
    /// latest book with the change applied.
    pub async fn set_prices(&self, tenant: Option<&str>, change: PriceChange) -> Result<(BookRow, bool)> {
        // Validate the request's own entries first, so errors name its
        // fields ("" as a model's tier removes it, so it is not checked).
        let check = BookContent {
            prices: change.upsert.prices.clone(),
            models: change
                .upsert
                .models
                .iter()
                .filter(|(_, t)| !t.is_empty())
                .map(|(m, t)| (m.clone(), t.clone()))
                .collect(),
        };
        check.entries("").map_err(|e| Error::invalid(e.field, Reason::InvalidPrice, e.message))?;
        for model in change.upsert.models.keys() {
            if !crate::domain::pricing::valid_model(model) {
                return Err(Error::invalid(format!("models[{model:?}]"), Reason::InvalidPrice, "is not a model id"));
            }
        }
        let request_json = serde_json::to_string(&(&change.upsert, &change.remove, change.effective_at))
            .map_err(|e| Error::internal(e.to_string()))?;
        let payload = crate::service::payload_hash(&["prices", &request_json]);
        let effective_at = change.effective_at.unwrap_or_else(Utc::now);
        let mut invalid = None;
        let written = self
            .pg
            .write_book(tenant, Some((&change.idempotency_key, &payload)), effective_at, |latest| {
                let mut content: BookContent =
                    latest.and_then(|b| serde_json::from_value(b.content.clone()).ok()).unwrap_or_default();
                merge(&mut content, &change);
                if let Err(e) = content.entries("") {
                    invalid = Some(e);
                    return None;
                }
                let value = serde_json::to_value(&content).ok()?;
                let hash = crate::service::payload_hash(&[&value.to_string()]);
                Some((value, hash))
            })
            .await?;
        if let Some(e) = invalid {
            return Err(Error::invalid("prices", Reason::InvalidPrice, e));
        }
        let written = written.ok_or_else(|| Error::internal("price book not written"))?;
        self.pricing.invalidate(tenant);
        if written.1 {
            tracing::info!(tenant = ?tenant, book = written.0.book_id, "prices changed");
        }
        Ok(written)
    }

    /// Loads a default catalog (e.g. `catalog/default.toml`) as a new
    /// default book, unless the latest default book has the same content.
    pub async fn load_default_catalog(&self, content: &BookContent) -> Result<Option<i64>> {
        content.entries("").map_err(|e| Error::internal(format!("default catalog: {e}")))?;
        let value = serde_json::to_value(content).map_err(|e| Error::internal(e.to_string()))?;
        let hash = crate::service::payload_hash(&[&value.to_string()]);
        let written = self
            .pg
            .write_book(None, None, Utc::now(), |latest| match latest {
                Some(b) if b.content_hash == hash => None,
                _ => Some((value, hash.clone())),
            })
            .await?;
        self.pricing.invalidate(None);
        Ok(written.map(|(b, _)| b.book_id))
    }
}

/// Applies a change to a book's content.
fn merge(content: &mut BookContent, change: &PriceChange) {
    let same = |p: &crate::domain::pricing::BookPrice, meter: &str, model: &str, tier: &str| {
        p.meter == meter && p.model == model && p.tier == tier
    };
    for (meter, model, tier) in &change.remove {
        content.prices.retain(|p| !same(p, meter, model, tier));
    }
    for new in &change.upsert.prices {
        content.prices.retain(|p| !same(p, &new.meter, &new.model, &new.tier));
        content.prices.push(new.clone());
    }
    content.prices.sort_by(|a, b| (&a.meter, &a.tier, &a.model).cmp(&(&b.meter, &b.tier, &b.model)));
    for (model, tier) in &change.upsert.models {
        if tier.is_empty() {
            content.models.remove(model);
        } else {
            content.models.insert(model.clone(), tier.clone());
        }
    }
}
