//! Prices and the rounding rule.
//!
//! A request's cost is computed once, over all its token kinds together:
//!
//! ```text
//! cost_nanos = ceil( (uncached_prompt × input + cached_prompt × cached_input + completion × output)
//!                    / 1_000_000 )
//! ```
//!
//! with prices in nano-units per million tokens and the product summed in `u128`. One rounding
//! per request means a request is never billed below its exact price and never more than one
//! nano-unit above it, and the cost is monotonic in every token count. That monotonicity is what
//! lets a reservation's hold (the cost of the largest usage it admits) bound its settlement.
//!
//! Batch lines are billed at a discount given in parts per million of the online price
//! (`[billing] batch_discount_ppm`, default 500,000 = half price). The discount applies to the
//! price snapshot the reservation takes, each per-million price rounded **up** to a whole
//! nano-unit ([`PriceVersion::discounted`]); the request's cost then follows the rule above. So
//! a batch line never costs less than the discount's exact share, and for prices that are
//! multiples of `1_000_000 / gcd(ppm, 1_000_000)` nano-units (every whole cent per million at
//! 50 %) it is exactly that share, up to the per-request rounding.

use tidepool_core::{Currency, ModelId, Nanos, TokenCount};

use crate::LedgerError;

/// Tokens per price unit: prices are per million tokens.
const TOKENS_PER_PRICE_UNIT: u128 = 1_000_000;

/// One version of one model's prices, in force from `effective_from_ms` until the next version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceVersion {
    pub model: ModelId,
    pub effective_from_ms: i64,
    pub currency: Currency,
    pub input_per_mtok: Nanos,
    pub output_per_mtok: Nanos,
    pub cached_input_per_mtok: Nanos,
}

impl PriceVersion {
    pub(crate) fn validate(&self) -> Result<(), LedgerError> {
        for (price, field) in [
            (self.input_per_mtok, "input price"),
            (self.output_per_mtok, "output price"),
            (self.cached_input_per_mtok, "cached input price"),
        ] {
            if price < Nanos::ZERO {
                return Err(LedgerError::OutOfRange { field });
            }
        }
        Ok(())
    }

    /// Same prices, ignoring when they took effect.
    pub(crate) fn same_prices(&self, other: &Self) -> bool {
        self.currency == other.currency
            && self.input_per_mtok == other.input_per_mtok
            && self.output_per_mtok == other.output_per_mtok
            && self.cached_input_per_mtok == other.cached_input_per_mtok
    }
}

/// A discount of nothing: the online price, in parts per million.
pub const DISCOUNT_PPM_FULL: u32 = 1_000_000;

impl PriceVersion {
    /// These prices at `ppm` parts per million (at most [`DISCOUNT_PPM_FULL`]), each rounded up
    /// to a whole nano-unit per million tokens.
    pub fn discounted(&self, ppm: u32) -> Result<Self, LedgerError> {
        if ppm > DISCOUNT_PPM_FULL {
            return Err(LedgerError::OutOfRange {
                field: "batch discount",
            });
        }
        let scale = |price: Nanos, field: &'static str| -> Result<Nanos, LedgerError> {
            let scaled = price_u128(price, field)?
                .checked_mul(u128::from(ppm))
                .map(|p| p.div_ceil(u128::from(DISCOUNT_PPM_FULL)))
                .ok_or(LedgerError::OutOfRange { field })?;
            i64::try_from(scaled)
                .map(Nanos)
                .map_err(|_| LedgerError::OutOfRange { field })
        };
        Ok(Self {
            input_per_mtok: scale(self.input_per_mtok, "input price")?,
            output_per_mtok: scale(self.output_per_mtok, "output price")?,
            cached_input_per_mtok: scale(self.cached_input_per_mtok, "cached input price")?,
            ..self.clone()
        })
    }
}

/// Token counts of one request, split the way they are priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BilledTokens {
    /// All prompt tokens, cached ones included.
    pub prompt_tokens: TokenCount,
    /// The part of `prompt_tokens` served from a cached prefix.
    pub cached_prompt_tokens: TokenCount,
    pub completion_tokens: TokenCount,
}

fn price_u128(price: Nanos, field: &'static str) -> Result<u128, LedgerError> {
    u64::try_from(price.0)
        .map(u128::from)
        .map_err(|_| LedgerError::OutOfRange { field })
}

/// What `cached_tokens` cost at `cached_input_per_mtok` (rounded up): the cached tokens' share
/// of a statement line or a usage report.
pub fn cached_input_cost(
    cached_tokens: u64,
    cached_input_per_mtok: Nanos,
) -> Result<Nanos, LedgerError> {
    let overflow = || LedgerError::Core(tidepool_core::CoreError::MoneyOverflow { what: "cost" });
    let scaled = u128::from(cached_tokens)
        .checked_mul(price_u128(cached_input_per_mtok, "cached input price")?)
        .ok_or_else(overflow)?;
    i64::try_from(scaled.div_ceil(TOKENS_PER_PRICE_UNIT))
        .map(Nanos)
        .map_err(|_| overflow())
}

/// The cost of `tokens` at `price`, by the rounding rule in the module docs.
pub fn cost_of(tokens: BilledTokens, price: &PriceVersion) -> Result<Nanos, LedgerError> {
    let overflow = || LedgerError::Core(tidepool_core::CoreError::MoneyOverflow { what: "cost" });
    let uncached = tokens
        .prompt_tokens
        .checked_sub(tokens.cached_prompt_tokens)
        .ok_or(LedgerError::OutOfRange {
            field: "cached prompt tokens",
        })?;
    let input = u128::from(uncached)
        .checked_mul(price_u128(price.input_per_mtok, "input price")?)
        .ok_or_else(overflow)?;
    let cached = u128::from(tokens.cached_prompt_tokens)
        .checked_mul(price_u128(
            price.cached_input_per_mtok,
            "cached input price",
        )?)
        .ok_or_else(overflow)?;
    let output = u128::from(tokens.completion_tokens)
        .checked_mul(price_u128(price.output_per_mtok, "output price")?)
        .ok_or_else(overflow)?;
    let scaled = input
        .checked_add(cached)
        .and_then(|sum| sum.checked_add(output))
        .ok_or_else(overflow)?;
    let nanos = i64::try_from(scaled.div_ceil(TOKENS_PER_PRICE_UNIT)).map_err(|_| overflow())?;
    assert!(nanos >= 0, "a cost is never negative");
    Ok(Nanos(nanos))
}

/// The hold for a request that may use up to `prompt_tokens_max` prompt tokens (none of them
/// assumed cached, billed at the dearer of the two input prices) and `completion_tokens_max`
/// completion tokens: an upper bound of [`cost_of`] over every usage within those maxima.
pub fn hold_for(
    prompt_tokens_max: TokenCount,
    completion_tokens_max: TokenCount,
    price: &PriceVersion,
) -> Result<Nanos, LedgerError> {
    let dearest_input = price.input_per_mtok.max(price.cached_input_per_mtok);
    let worst = PriceVersion {
        input_per_mtok: dearest_input,
        ..price.clone()
    };
    cost_of(
        BilledTokens {
            prompt_tokens: prompt_tokens_max,
            cached_prompt_tokens: 0,
            completion_tokens: completion_tokens_max,
        },
        &worst,
    )
}

#[cfg(test)]
#[expect(
    clippy::arithmetic_side_effects,
    reason = "the test oracle multiplies bounded u128s"
)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn price(input: i64, output: i64, cached: i64) -> PriceVersion {
        PriceVersion {
            model: ModelId::new("m").unwrap(),
            effective_from_ms: 0,
            currency: Currency::USD,
            input_per_mtok: Nanos(input),
            output_per_mtok: Nanos(output),
            cached_input_per_mtok: Nanos(cached),
        }
    }

    #[test]
    fn rounds_once_per_request() {
        // 1 nano per Mtok each: 3 tokens cost 3e-6 nanos, billed as one nano (not three).
        let p = price(1, 1, 1);
        let t = BilledTokens {
            prompt_tokens: 2,
            cached_prompt_tokens: 1,
            completion_tokens: 1,
        };
        assert_eq!(cost_of(t, &p).unwrap(), Nanos(1));
        // 0.05 / 0.20 USD per Mtok: 1000 prompt + 500 completion = 50_000 + 100_000 nanos.
        let p = price(50_000_000, 200_000_000, 25_000_000);
        let t = BilledTokens {
            prompt_tokens: 1000,
            cached_prompt_tokens: 0,
            completion_tokens: 500,
        };
        assert_eq!(cost_of(t, &p).unwrap(), Nanos(150_000));
        let t = BilledTokens {
            prompt_tokens: 1000,
            cached_prompt_tokens: 400,
            completion_tokens: 0,
        };
        assert_eq!(cost_of(t, &p).unwrap(), Nanos(30_000 + 10_000));
        assert_eq!(cost_of(BilledTokens::default(), &p).unwrap(), Nanos::ZERO);
        let bad = BilledTokens {
            prompt_tokens: 1,
            cached_prompt_tokens: 2,
            completion_tokens: 0,
        };
        assert!(cost_of(bad, &p).is_err());
        assert!(cost_of(t, &price(-1, 0, 0)).is_err());
    }

    #[test]
    fn discount_rounds_each_price_up() {
        let p = price(50_000_000, 200_000_000, 25_000_001);
        let half = p.discounted(500_000).unwrap();
        assert_eq!(half.input_per_mtok, Nanos(25_000_000));
        assert_eq!(half.output_per_mtok, Nanos(100_000_000));
        assert_eq!(half.cached_input_per_mtok, Nanos(12_500_001));
        assert_eq!(p.discounted(DISCOUNT_PPM_FULL).unwrap(), p);
        assert_eq!(p.discounted(0).unwrap().output_per_mtok, Nanos::ZERO);
        assert!(p.discounted(DISCOUNT_PPM_FULL + 1).is_err());
        // 1 nano per Mtok at a third: rounds up to 1, never to 0.
        assert_eq!(
            price(1, 1, 1).discounted(333_333).unwrap().input_per_mtok,
            Nanos(1)
        );
        // A batch line at 50 % of even prices costs exactly half the online cost.
        let t = BilledTokens {
            prompt_tokens: 37,
            cached_prompt_tokens: 0,
            completion_tokens: 8,
        };
        assert_eq!(cost_of(t, &half).unwrap().0 * 2, cost_of(t, &p).unwrap().0);
    }

    proptest! {
        #[test]
        fn discounted_cost_bounds_the_exact_share(
            prompt in 0u32..1_000_000, completion in 0u32..1_000_000, ppm in 0u32..=1_000_000,
            input in 0i64..1_000_000_000_000, output in 0i64..1_000_000_000_000,
        ) {
            let p = price(input, output, 0);
            let t = BilledTokens { prompt_tokens: prompt, cached_prompt_tokens: 0, completion_tokens: completion };
            let online = u128::try_from(cost_of(t, &p).unwrap().0).unwrap();
            let batch = u128::try_from(cost_of(t, &p.discounted(ppm).unwrap()).unwrap().0).unwrap();
            let exact = u128::from(prompt) * u128::try_from(input).unwrap()
                + u128::from(completion) * u128::try_from(output).unwrap();
            // Never below the discount's exact share of the exact price, never above online.
            prop_assert!(batch * 1_000_000 * 1_000_000 >= exact * u128::from(ppm));
            prop_assert!(batch <= online);
        }

        #[test]
        fn cost_is_exact_ceiling(
            prompt in 0u32.., cached_share in 0u32..=100, completion in 0u32..,
            input in 0i64..1_000_000_000_000, output in 0i64..1_000_000_000_000,
            cached_price in 0i64..1_000_000_000_000,
        ) {
            let cached = u32::try_from(u64::from(prompt) * u64::from(cached_share) / 100).unwrap();
            let p = price(input, output, cached_price);
            let t = BilledTokens { prompt_tokens: prompt, cached_prompt_tokens: cached, completion_tokens: completion };
            let exact = u128::from(prompt - cached) * u128::try_from(input).unwrap()
                + u128::from(cached) * u128::try_from(cached_price).unwrap()
                + u128::from(completion) * u128::try_from(output).unwrap();
            let cost = u128::try_from(cost_of(t, &p).unwrap().0).unwrap();
            prop_assert!(cost * 1_000_000 >= exact);
            prop_assert!(cost == 0 || (cost - 1) * 1_000_000 < exact);
        }

        #[test]
        fn hold_bounds_every_admitted_usage(
            prompt_max in 0u32..200_000, completion_max in 0u32..200_000,
            prompt_frac in 0u32..=100, cached_frac in 0u32..=100, completion_frac in 0u32..=100,
            input in 0i64..10_000_000_000, output in 0i64..10_000_000_000, cached_price in 0i64..10_000_000_000,
        ) {
            let p = price(input, output, cached_price);
            let hold = hold_for(prompt_max, completion_max, &p).unwrap();
            let prompt = prompt_max * prompt_frac / 100;
            let t = BilledTokens {
                prompt_tokens: prompt,
                cached_prompt_tokens: prompt * cached_frac / 100,
                completion_tokens: completion_max * completion_frac / 100,
            };
            prop_assert!(cost_of(t, &p).unwrap() <= hold);
        }
    }
}
