//! Rating: usage in, credits out.
//!
//! A [`Catalog`] maps (meter, model | tier | any model) to a unit price,
//! and models to tiers. Rating a usage prices each item exactly
//! (`quantity × unit_price ÷ per_units`, in decimal, never rounded) and
//! rounds only the total, up, to the micro-credit: a charge is never less
//! than its line items and never more than one micro-credit above them.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::{Decimal, RoundingStrategy};

use super::Credits;

/// Which usage a price applies to, from most to least specific.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    /// One model id.
    Model(String),
    /// Every model of a tier ("fast", "standard", "advanced", "local").
    Tier(String),
    /// Every model, and usage with no model (activities).
    Any,
}

/// A unit price: `unit_price` credits per `per_units` units of the meter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Price {
    pub unit_price: Decimal,
    pub per_units: i64,
}

/// One priced entry of a catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceEntry {
    pub meter: String,
    pub selector: Selector,
    pub price: Price,
}

/// A complete, immutable price list (a default catalog with a tenant's
/// overrides laid over it), identified by its version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub version: String,
    prices: BTreeMap<(String, Selector), Price>,
    tiers: BTreeMap<String, String>,
    meters: BTreeSet<String>,
}

/// One item of a usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageItem {
    pub meter: String,
    pub model: String,
    pub quantity: Decimal,
}

/// One priced line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub meter: String,
    pub model: String,
    pub tier: Option<String>,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub per_units: i64,
    pub subtotal: Decimal,
}

/// A rated usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rating {
    pub lines: Vec<Line>,
    pub total: Credits,
    pub version: String,
}

/// Why a usage cannot be rated. `index` is the item's position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("usage has no items")]
    Empty,
    #[error("usage.items[{index}].meter {meter:?} is not a meter of the price catalog")]
    UnknownMeter { index: usize, meter: String },
    #[error("usage.items[{index}].model {model:?} has no price for meter {meter:?}")]
    NoPrice { index: usize, meter: String, model: String },
    #[error("the total is beyond the largest amount one call may charge")]
    TooLarge,
}

impl RateError {
    /// The request field the error is about.
    pub fn field(&self) -> String {
        match self {
            RateError::Empty | RateError::TooLarge => "usage".to_string(),
            RateError::UnknownMeter { index, .. } => format!("usage.items[{index}].meter"),
            RateError::NoPrice { index, .. } => format!("usage.items[{index}].model"),
        }
    }
}

impl Catalog {
    /// Lays `layers` over each other in order (later wins per (meter,
    /// selector) and per model).
    pub fn layered(version: String, layers: &[(&[PriceEntry], &BTreeMap<String, String>)]) -> Catalog {
        let mut catalog = Catalog { version, ..Default::default() };
        for (entries, tiers) in layers {
            for e in *entries {
                catalog.meters.insert(e.meter.clone());
                catalog.prices.insert((e.meter.clone(), e.selector.clone()), e.price.clone());
            }
            for (model, tier) in *tiers {
                catalog.tiers.insert(model.clone(), tier.clone());
            }
        }
        catalog
    }

    /// The entries, most specific first per meter.
    pub fn entries(&self) -> Vec<PriceEntry> {
        self.prices
            .iter()
            .map(|((meter, selector), price)| PriceEntry {
                meter: meter.clone(),
                selector: selector.clone(),
                price: price.clone(),
            })
            .collect()
    }

    pub fn tiers(&self) -> &BTreeMap<String, String> {
        &self.tiers
    }

    pub fn tier_of(&self, model: &str) -> Option<&str> {
        self.tiers.get(model).map(String::as_str)
    }

    /// The price of one unit of `meter` for `model`: the model's own price,
    /// else its tier's, else the meter's price for any model.
    pub fn price_of(&self, meter: &str, model: &str) -> Option<(&Price, Option<&str>)> {
        let tier = self.tier_of(model);
        if !model.is_empty()
            && let Some(p) = self.prices.get(&(meter.to_string(), Selector::Model(model.to_string())))
        {
            return Some((p, tier));
        }
        if let Some(t) = tier
            && let Some(p) = self.prices.get(&(meter.to_string(), Selector::Tier(t.to_string())))
        {
            return Some((p, tier));
        }
        self.prices.get(&(meter.to_string(), Selector::Any)).map(|p| (p, tier))
    }

    pub fn rate(&self, items: &[UsageItem]) -> Result<Rating, RateError> {
        if items.is_empty() {
            return Err(RateError::Empty);
        }
        let mut lines = Vec::with_capacity(items.len());
        let mut sum = Decimal::ZERO;
        for (index, item) in items.iter().enumerate() {
            if !self.meters.contains(&item.meter) {
                return Err(RateError::UnknownMeter { index, meter: item.meter.clone() });
            }
            let (price, tier) = self.price_of(&item.meter, &item.model).ok_or_else(|| RateError::NoPrice {
                index,
                meter: item.meter.clone(),
                model: item.model.clone(),
            })?;
            let subtotal = item
                .quantity
                .checked_mul(price.unit_price)
                .and_then(|x| x.checked_div(Decimal::from(price.per_units)))
                .ok_or(RateError::TooLarge)?;
            sum = sum.checked_add(subtotal).ok_or(RateError::TooLarge)?;
            lines.push(Line {
                meter: item.meter.clone(),
                model: item.model.clone(),
                tier: tier.map(str::to_string),
                quantity: item.quantity,
                unit_price: price.unit_price,
                per_units: price.per_units,
                subtotal: subtotal.normalize(),
            });
        }
        let total = round_up_to_micros(sum).ok_or(RateError::TooLarge)?;
        if total > super::money::MAX_AMOUNT {
            return Err(RateError::TooLarge);
        }
        Ok(Rating { lines, total, version: self.version.clone() })
    }
}

/// A price book as stored and as written in `catalog/default.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookContent {
    /// Model id → tier.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    #[serde(default)]
    pub prices: Vec<BookPrice>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookPrice {
    pub meter: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tier: String,
    pub unit_price: String,
    #[serde(default = "one")]
    pub per_units: i64,
}

fn one() -> i64 {
    1
}

/// Why a price book is refused; `field` locates the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {message}")]
pub struct BookError {
    pub field: String,
    pub message: String,
}

/// Meter and tier names: 1 to 64 characters of `[a-z0-9_.-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// Model ids: 1 to 128 characters of `[A-Za-z0-9._:/@-]`.
pub fn valid_model(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= 128
        && model.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:/@-".contains(&b))
}

/// The largest `per_units`: prices per billion units are the finest.
pub const MAX_PER_UNITS: i64 = 1_000_000_000;

impl BookContent {
    /// Checks every entry and returns them as catalog entries.
    pub fn entries(&self, prefix: &str) -> Result<Vec<PriceEntry>, BookError> {
        let err = |field: String, message: &str| BookError { field, message: message.to_string() };
        for (model, tier) in &self.models {
            if !valid_model(model) {
                return Err(err(format!("{prefix}models[{model:?}]"), "is not a model id ([A-Za-z0-9._:/@-], 1-128)"));
            }
            if !valid_name(tier) {
                return Err(err(format!("{prefix}models[{model:?}]"), "tier must be 1-64 characters of [a-z0-9_.-]"));
            }
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(self.prices.len());
        for (i, p) in self.prices.iter().enumerate() {
            let at = |f: &str| format!("{prefix}prices[{i}].{f}");
            if !valid_name(&p.meter) {
                return Err(err(at("meter"), "must be 1-64 characters of [a-z0-9_.-]"));
            }
            let selector = match (p.model.is_empty(), p.tier.is_empty()) {
                (true, true) => Selector::Any,
                (false, true) if valid_model(&p.model) => Selector::Model(p.model.clone()),
                (false, true) => return Err(err(at("model"), "is not a model id ([A-Za-z0-9._:/@-], 1-128)")),
                (true, false) if valid_name(&p.tier) => Selector::Tier(p.tier.clone()),
                (true, false) => return Err(err(at("tier"), "must be 1-64 characters of [a-z0-9_.-]")),
                (false, false) => return Err(err(at("tier"), "cannot be set together with model")),
            };
            let unit_price = parse_price(&p.unit_price).map_err(|m| err(at("unit_price"), m))?;
            if !(1..=MAX_PER_UNITS).contains(&p.per_units) {
                return Err(err(at("per_units"), "must be between 1 and 1000000000"));
            }
            if !seen.insert((p.meter.clone(), selector.clone())) {
                return Err(err(at("meter"), "is priced twice for the same model, tier or any"));
            }
            out.push(PriceEntry {
                meter: p.meter.clone(),
                selector,
                price: Price { unit_price, per_units: p.per_units },
            });
        }
        Ok(out)
    }
}

/// A unit price: a non-negative plain decimal with at most 12 fractional
/// digits, at most 1,000,000,000.
pub fn parse_price(text: &str) -> Result<Decimal, &'static str> {
    if crate::domain::money::plain_decimal(text, false).is_none() {
        return Err("must be a non-negative plain decimal like \"0.25\"");
    }
    let value: Decimal = text.parse().map_err(|_| "must be a non-negative plain decimal like \"0.25\"")?;
    if value.scale() > 12 {
        return Err("has more than 12 fractional digits");
    }
    if value > Decimal::from(1_000_000_000) {
        return Err("is above 1000000000");
    }
    Ok(value)
}

/// Rounds a non-negative amount up to whole micro-credits.
pub fn round_up_to_micros(value: Decimal) -> Option<Credits> {
    let rounded = value.round_dp_with_strategy(6, RoundingStrategy::AwayFromZero);
    Credits::try_from_decimal(rounded).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::MAX_AMOUNT;
    use proptest::prelude::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn entry(meter: &str, selector: Selector, price: &str, per: i64) -> PriceEntry {
        PriceEntry { meter: meter.into(), selector, price: Price { unit_price: d(price), per_units: per } }
    }

    fn catalog() -> Catalog {
        let defaults = vec![
            entry("input_tokens", Selector::Tier("fast".into()), "15", 1_000_000),
            entry("input_tokens", Selector::Tier("advanced".into()), "150", 1_000_000),
            entry("input_tokens", Selector::Model("special".into()), "1", 1_000_000),
            entry("tasks", Selector::Any, "0.25", 1),
            entry("web_searches", Selector::Any, "0", 1),
        ];
        let tiers: BTreeMap<String, String> =
            [("f1", "fast"), ("a1", "advanced"), ("special", "advanced")].map(|(m, t)| (m.into(), t.into())).into();
        let overrides = vec![entry("tasks", Selector::Any, "0.2", 1)];
        Catalog::layered("v1".into(), &[(&defaults, &tiers), (&overrides, &BTreeMap::new())])
    }

    fn item(meter: &str, model: &str, q: &str) -> UsageItem {
        UsageItem { meter: meter.into(), model: model.into(), quantity: d(q) }
    }

    #[test]
    fn prices_by_model_then_tier_then_any() {
        let c = catalog();
        let r = c.rate(&[item("input_tokens", "f1", "1000"), item("input_tokens", "special", "1000000")]).unwrap();
        assert_eq!(r.lines[0].subtotal, d("0.015"));
        assert_eq!(r.lines[0].tier.as_deref(), Some("fast"));
        assert_eq!(r.lines[1].subtotal, d("1"), "the model's own price beats its tier's");
        assert_eq!(r.total.to_string(), "1.015");
        let tasks = c.rate(&[item("tasks", "", "3"), item("web_searches", "", "9")]).unwrap();
        assert_eq!(tasks.total.to_string(), "0.6", "the override wins, free activities cost 0");
    }

    #[test]
    fn total_is_rounded_up_once() {
        let c = catalog();
        // Half a token at 1 credit per million is 0.0000005: the line keeps
        // it exactly, the total is rounded up to one micro-credit.
        let r = c.rate(&[item("input_tokens", "special", "0.5")]).unwrap();
        assert_eq!(r.lines[0].subtotal, d("0.0000005"));
        assert_eq!(r.total.to_string(), "0.000001");
        // An exact total is not rounded.
        let r = c.rate(&[item("input_tokens", "f1", "1")]).unwrap();
        assert_eq!(r.total.to_string(), "0.000015");
        // Three lines of 0.0000005 sum to 0.0000015: one rounding, to 0.000002.
        let half = [
            item("input_tokens", "special", "0.5"),
            item("input_tokens", "special", "0.5"),
            item("input_tokens", "special", "0.5"),
        ];
        let r = c.rate(&half).unwrap();
        assert_eq!(r.total.to_string(), "0.000002");
    }

    #[test]
    fn unknown_meters_and_models_are_errors_never_zero() {
        let c = catalog();
        assert_eq!(
            c.rate(&[item("tasks", "", "1"), item("bogus", "", "1")]),
            Err(RateError::UnknownMeter { index: 1, meter: "bogus".into() })
        );
        let e = c.rate(&[item("input_tokens", "nobody", "1")]).unwrap_err();
        assert_eq!(e, RateError::NoPrice { index: 0, meter: "input_tokens".into(), model: "nobody".into() });
        assert_eq!(e.field(), "usage.items[0].model");
        assert_eq!(c.rate(&[]), Err(RateError::Empty));
    }

    fn any_item() -> impl Strategy<Value = UsageItem> {
        let meter = prop_oneof![Just("input_tokens"), Just("tasks"), Just("web_searches"), Just("bogus")];
        let model = prop_oneof![Just(""), Just("f1"), Just("a1"), Just("special"), Just("nobody")];
        // Small to huge quantities with up to 6 decimals: some totals pass
        // the bound.
        let raw = prop_oneof![0i64..1_000_000, 0i64..1_000_000_000_000, 0i64..1_000_000_000_000_000_000];
        (meter, model, raw, 0u32..=6).prop_map(|(m, mo, raw, scale)| UsageItem {
            meter: m.into(),
            model: mo.into(),
            quantity: Decimal::new(raw, scale),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn rating_any_usage_is_exact_or_names_the_item(items in proptest::collection::vec(any_item(), 0..8)) {
            let c = catalog();
            // Oracle: the first item with no meter or no price, else the
            // exact sum rounded up once, refused above the bound.
            let first_bad = items.iter().enumerate().find_map(|(index, i)| {
                if !c.meters.contains(&i.meter) {
                    Some(RateError::UnknownMeter { index, meter: i.meter.clone() })
                } else if c.price_of(&i.meter, &i.model).is_none() {
                    Some(RateError::NoPrice { index, meter: i.meter.clone(), model: i.model.clone() })
                } else {
                    None
                }
            });
            match (c.rate(&items), first_bad) {
                (Err(RateError::Empty), _) => prop_assert!(items.is_empty()),
                (Err(e), Some(bad)) => prop_assert_eq!(e, bad),
                (Err(RateError::TooLarge), None) => {
                    let exact: Option<Decimal> = items.iter().try_fold(Decimal::ZERO, |sum, i| {
                        let (price, _) = c.price_of(&i.meter, &i.model)?;
                        sum.checked_add(i.quantity.checked_mul(price.unit_price)?.checked_div(Decimal::from(price.per_units))?)
                    });
                    prop_assert!(exact.is_none_or(|x| x > MAX_AMOUNT.to_decimal()), "refused a total within bounds");
                }
                (Ok(r), None) => {
                    prop_assert!(!items.is_empty());
                    let exact: Decimal = r.lines.iter().map(|l| l.subtotal).sum();
                    let total = r.total.to_decimal();
                    prop_assert!(total >= exact && total - exact < Decimal::new(1, 6));
                    prop_assert!(r.total >= Credits::ZERO && r.total <= MAX_AMOUNT);
                    prop_assert_eq!(r.lines.len(), items.len());
                }
                (got, bad) => prop_assert!(false, "got {got:?}, expected {bad:?}"),
            }
        }

        #[test]
        fn rating_is_additive_monotone_and_tightly_rounded(
            a in 0u64..10_000_000_000, b in 0u64..10_000_000_000, extra in 0u64..1_000_000
        ) {
            let c = catalog();
            let qa = Decimal::from(a) / Decimal::from(1000);
            let qb = Decimal::from(b) / Decimal::from(1000);
            let both = c.rate(&[
                UsageItem { meter: "input_tokens".into(), model: "a1".into(), quantity: qa },
                UsageItem { meter: "tasks".into(), model: String::new(), quantity: qb },
            ]).unwrap();
            let exact: Decimal = both.lines.iter().map(|l| l.subtotal).sum();
            // Rounded up, by less than one micro-credit.
            let total = both.total.to_decimal();
            prop_assert!(total >= exact);
            prop_assert!(total - exact < Decimal::new(1, 6));
            // Additive over line items (before rounding).
            let one = c.rate(&[UsageItem { meter: "input_tokens".into(), model: "a1".into(), quantity: qa }]).unwrap();
            let two = c.rate(&[UsageItem { meter: "tasks".into(), model: String::new(), quantity: qb }]).unwrap();
            prop_assert_eq!(one.lines[0].subtotal + two.lines[0].subtotal, exact);
            // Monotone in quantity.
            let more = c.rate(&[UsageItem {
                meter: "input_tokens".into(), model: "a1".into(), quantity: qa + Decimal::from(extra),
            }]).unwrap();
            prop_assert!(more.total >= one.total);
        }
    }
}
