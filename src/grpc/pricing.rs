//! `creditd.v1.PricingService`.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};

use super::{
    caller::{Need, authenticated, tenant},
    convert,
};
use crate::{
    auth::Role,
    domain::pricing::{BookContent, BookPrice},
    error::{Error, Reason},
    pb::{self, pricing_service_server::PricingService},
    service::{Engine, pricing::PriceChange},
    store::pg::BookRow,
};

pub struct PricingApi {
    pub engine: Engine,
    pub max_quantity: rust_decimal::Decimal,
}

fn book_price(p: &pb::Price) -> BookPrice {
    BookPrice {
        meter: p.meter.clone(),
        model: p.model.clone(),
        tier: p.tier.clone(),
        unit_price: p.unit_price.clone(),
        per_units: if p.per_units == 0 { 1 } else { p.per_units },
    }
}

fn pb_price(p: &BookPrice) -> pb::Price {
    pb::Price {
        meter: p.meter.clone(),
        model: p.model.clone(),
        tier: p.tier.clone(),
        unit_price: p.unit_price.clone(),
        per_units: p.per_units,
    }
}

fn pb_book(b: &BookRow, replayed: bool) -> Result<pb::PriceBook, Error> {
    let content: BookContent =
        serde_json::from_value(b.content.clone()).map_err(|e| Error::internal(format!("price book: {e}")))?;
    Ok(pb::PriceBook {
        book_id: b.book_id,
        tenant_id: b.tenant_id.clone().unwrap_or_default(),
        effective_at: Some(convert::timestamp(b.effective_at)),
        prices: content.prices.iter().map(pb_price).collect(),
        models: content.models.into_iter().collect(),
        created_at: Some(convert::timestamp(b.created_at)),
        replayed,
    })
}

#[tonic::async_trait]
impl PricingService for PricingApi {
    async fn quote(&self, request: Request<pb::QuoteRequest>) -> Result<Response<pb::QuoteResponse>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Runtime).await?;
        let r = request.into_inner();
        let usage = r.usage.ok_or_else(|| Error::invalid("usage", Reason::InvalidUsage, "is required"))?;
        let items = convert::usage(&usage, self.max_quantity)?;
        let at = convert::from_timestamp("at", r.at)?;
        let rating = self.engine.quote(&tenant, &items, at).await?;
        Ok(Response::new(pb::QuoteResponse { rating: Some(convert::rating(&rating)) }))
    }

    async fn set_prices(&self, request: Request<pb::SetPricesRequest>) -> Result<Response<pb::PriceBook>, Status> {
        let caller = authenticated(&self.engine, &request).await?;
        let scope = match caller.role {
            Role::Admin => caller.tenant.clone(),
            Role::Operator => None,
            Role::Runtime => {
                return Err(Error::PermissionDenied(
                    Reason::WrongRole,
                    "SetPrices needs an admin or operator key".into(),
                )
                .into());
            }
        };
        if let Some(t) = &scope {
            self.engine.require_tenant(t).await?;
        }
        let r = request.into_inner();
        if r.prices.is_empty() && r.remove.is_empty() && r.models.is_empty() {
            return Err(Error::invalid("prices", Reason::InvalidPrice, "nothing to change").into());
        }
        let change = PriceChange {
            upsert: BookContent {
                prices: r.prices.iter().map(book_price).collect(),
                models: r.models.into_iter().collect::<BTreeMap<_, _>>(),
            },
            remove: r.remove.iter().map(|p| (p.meter.clone(), p.model.clone(), p.tier.clone())).collect(),
            effective_at: convert::from_timestamp("effective_at", r.effective_at)?,
            idempotency_key: convert::idempotency_key(&r.idempotency_key)?,
        };
        let (book, created) = self.engine.set_prices(scope.as_deref(), change).await?;
        Ok(Response::new(pb_book(&book, !created)?))
    }

    async fn get_catalog(&self, request: Request<pb::GetCatalogRequest>) -> Result<Response<pb::Catalog>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Runtime).await?;
        let at = convert::from_timestamp("at", request.into_inner().at)?;
        let catalog = match at {
            Some(at) => {
                let version = self.engine.pricing.version_at(&tenant, at).await?;
                self.engine.pricing.catalog(&tenant, &version).await?
            }
            None => self.engine.pricing.current(&tenant).await?,
        };
        let prices = catalog
            .entries()
            .iter()
            .map(|e| {
                let (model, tier) = match &e.selector {
                    crate::domain::pricing::Selector::Model(m) => (m.clone(), String::new()),
                    crate::domain::pricing::Selector::Tier(t) => (String::new(), t.clone()),
                    crate::domain::pricing::Selector::Any => (String::new(), String::new()),
                };
                pb::Price {
                    meter: e.meter.clone(),
                    model,
                    tier,
                    unit_price: e.price.unit_price.normalize().to_string(),
                    per_units: e.price.per_units,
                }
            })
            .collect();
        Ok(Response::new(pb::Catalog {
            price_version: catalog.version.clone(),
            prices,
            models: catalog.tiers().clone().into_iter().collect(),
        }))
    }
}
