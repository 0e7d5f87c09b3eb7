//! Structured inputs for the arithmetic targets (`pricing`, `aggregation`): decimals and counts
//! drawn towards the edges that break arithmetic (zero, the limits of `i64`, of rust_decimal and
//! of ClickHouse `Decimal(38, 12)`), and attribute values spelled the ways clients spell them.
//!
//! Everything reads from [`arbitrary::Unstructured`], so libFuzzer's mutations of the input
//! bytes move these values, and its comparison tracing finds the edges quickly.

use agentmeter_schemas::decimal::{from_scaled_i128, to_scaled_i128};
use arbitrary::{Arbitrary, Result, Unstructured};
use rust_decimal::Decimal;

/// The largest integer part a `Decimal(38, 12)` holds is 10^26 − 1.
const TEN_POW_26: i128 = 100_000_000_000_000_000_000_000_000;
/// `Decimal(38, 12)` stores integers strictly below 10^38 (value × 10^12).
const TEN_POW_38: i128 = 100_000_000_000_000_000_000_000_000_000_000_000_000;

/// An `i64` over its whole range, with its edges much more likely than by chance.
pub fn edgy_i64(u: &mut Unstructured) -> Result<i64> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => i64::MAX,
        1 => i64::MAX - u.int_in_range(0..=1_000)?,
        2 => i64::MIN,
        3 => -u.int_in_range(0..=1_000)?,
        4 => u.int_in_range(0..=10_000_000)?,
        5 => 1_000_000_000_000_000 * i64::from(u.int_in_range(0i8..=9)?),
        _ => i64::arbitrary(u)?,
    })
}

/// Any `rust_decimal::Decimal`: from tiny fractions to ±7.9 × 10^28, with the edges of
/// `Decimal(38, 12)` and of rust_decimal itself much more likely than by chance.
pub fn any_decimal(u: &mut Unstructured) -> Result<Decimal> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => Decimal::ZERO,
        1 => Decimal::MAX,
        2 => Decimal::MIN,
        // Just inside or just outside what ClickHouse stores.
        3 => {
            Decimal::from_i128_with_scale(TEN_POW_26 - 1 + i128::from(u.int_in_range(0u8..=2)?), 0)
        }
        // The largest mantissa rust_decimal holds, at or just beyond the storage scale.
        4 => Decimal::from_parts(
            u32::MAX,
            u32::MAX,
            u32::MAX,
            bool::arbitrary(u)?,
            u.int_in_range(11..=13)?,
        ),
        // An ordinary price or quantity.
        5 | 6 => Decimal::new(
            u.int_in_range(-1_000_000_000..=1_000_000_000)?,
            u.int_in_range(0..=12)?,
        ),
        // Anything rust_decimal can hold.
        _ => {
            let (lo, mid, hi) = (u32::arbitrary(u)?, u32::arbitrary(u)?, u32::arbitrary(u)?);
            Decimal::from_parts(lo, mid, hi, bool::arbitrary(u)?, u.int_in_range(0..=28)?)
        }
    })
}

/// A decimal a `Decimal(38, 12)` column and the Avro `decimal` fields hold, so one that can
/// arrive in a decoded record: [`any_decimal`] where it fits, else the largest of its sign.
pub fn storable_decimal(u: &mut Unstructured) -> Result<Decimal> {
    let value = any_decimal(u)?;
    if to_scaled_i128(value).is_ok() {
        return Ok(value);
    }
    // 10^38 − 1 at scale 12 does not fit rust_decimal's 96 bits; 10^26 − 10^-12 ≈ 10^38 − 1 does
    // at a lower scale, so take the largest mantissa that reads back.
    let mut mantissa = TEN_POW_38 - 1;
    loop {
        if let Ok(largest) = from_scaled_i128(mantissa) {
            return Ok(if value.is_sign_negative() {
                -largest
            } else {
                largest
            });
        }
        mantissa /= 10;
    }
}

/// An attribute value as a client may send it in JSON: a number (integer, huge, fractional,
/// floating) or the same as a string.
#[derive(Debug, Clone)]
pub enum AttributeValue {
    Integer(i64),
    Unsigned(u64),
    Float(f64),
    /// Up to 30 integer digits and 14 fractional ones, written as a bare JSON number.
    DigitsNumber(String),
    /// The same digits in a JSON string.
    DigitsString(String),
    Other(String),
}

impl AttributeValue {
    pub fn generate(u: &mut Unstructured) -> Result<AttributeValue> {
        Ok(match u.int_in_range(0u8..=6)? {
            0 => AttributeValue::Integer(edgy_i64(u)?),
            1 => AttributeValue::Unsigned(u64::arbitrary(u)?),
            2 => AttributeValue::Float(f64::arbitrary(u)?),
            3 | 4 => AttributeValue::DigitsNumber(digits(u)?),
            5 => AttributeValue::DigitsString(digits(u)?),
            _ => AttributeValue::Other(String::arbitrary(u)?),
        })
    }

    /// The JSON text of the value.
    pub fn to_json(&self) -> String {
        match self {
            AttributeValue::Integer(number) => number.to_string(),
            AttributeValue::Unsigned(number) => number.to_string(),
            AttributeValue::Float(number) => serde_json::Number::from_f64(*number)
                .map(|number| number.to_string())
                .unwrap_or_else(|| "null".into()),
            AttributeValue::DigitsNumber(text) => text.clone(),
            AttributeValue::DigitsString(text) | AttributeValue::Other(text) => {
                serde_json::Value::String(text.clone()).to_string()
            }
        }
    }
}

/// `[-]DDD[.FFF]`: 1 to 30 integer digits, 0 to 14 fractional ones.
fn digits(u: &mut Unstructured) -> Result<String> {
    let mut text = String::new();
    if u.ratio(1, 8)? {
        text.push('-');
    }
    let integer_digits = u.int_in_range(1..=30)?;
    for index in 0..integer_digits {
        // A leading zero makes an invalid JSON number; keep them rare.
        let digit = u.int_in_range(0u8..=9)?;
        let digit = if index == 0 && integer_digits > 1 && digit == 0 {
            9
        } else {
            digit
        };
        text.push(char::from(b'0' + digit));
    }
    let fraction_digits = u.int_in_range(0..=14)?;
    if fraction_digits > 0 {
        text.push('.');
        for _ in 0..fraction_digits {
            text.push(char::from(b'0' + u.int_in_range(0u8..=9)?));
        }
    }
    Ok(text)
}
