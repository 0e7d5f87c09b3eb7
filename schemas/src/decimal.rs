//! Exact mapping of money and quantities between `rust_decimal::Decimal`, the Avro `decimal`
//! logical type (bytes, precision 38, scale 12) and ClickHouse `Decimal(38, 12)` (a 128-bit
//! integer scaled by 10^12 in RowBinary).
//!
//! Every conversion is exact or fails with [`DecimalError`]: a value with more than 12 fractional
//! digits, or beyond 38 significant digits, or beyond what `Decimal` holds (about 7.9e28 as an
//! integer, 7.9e16 at scale 12), is an error — never rounded. `Decimal::rescale` silently lowers
//! the scale when a value does not fit, so it is not used here.

use rust_decimal::Decimal;

/// Fractional digits of every stored money or quantity value.
pub const STORAGE_SCALE: u32 = 12;
/// Total digits of every stored money or quantity value (Avro precision, ClickHouse `Decimal(38, _)`).
pub const STORAGE_PRECISION: u32 = 38;

const TEN_POW_38: i128 = 100_000_000_000_000_000_000_000_000_000_000_000_000;

/// Why a decimal could not be stored or read back exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("{value} has {scale} fractional digits; at most {max} are stored, and agentmeter never rounds")]
    TooManyFractionalDigits { value: String, scale: u32, max: u32 },
    #[error("{value} does not fit in Decimal({precision}, {scale})")]
    OutOfRange {
        value: String,
        precision: u32,
        scale: u32,
    },
    #[error("stored decimal {mantissa}e-{scale} does not fit in a rust_decimal::Decimal")]
    NotRepresentable { mantissa: i128, scale: u32 },
    #[error("Avro decimal has {0} bytes; at most 16 are accepted")]
    TooManyBytes(usize),
    /// Zero bytes: apache-avro refuses it too, so the fast decoder and the generic one agree.
    #[error("Avro decimal has no bytes; zero is written as one byte 0x00")]
    NoBytes,
}

/// Whether a scaled integer fits `Decimal(38, 12)`: fewer than 38 digits. (`unsigned_abs`,
/// because `i128::MIN.abs()` overflows.)
fn fits_storage(scaled: i128) -> bool {
    scaled.unsigned_abs() < TEN_POW_38 as u128
}

/// The integer `value × 10^12`, as ClickHouse `Decimal(38, 12)` stores it.
pub fn to_scaled_i128(value: Decimal) -> Result<i128, DecimalError> {
    let normalized = value.normalize();
    let scale = normalized.scale();
    if scale > STORAGE_SCALE {
        return Err(DecimalError::TooManyFractionalDigits {
            value: value.to_string(),
            scale,
            max: STORAGE_SCALE,
        });
    }
    let factor = 10i128.pow(STORAGE_SCALE - scale);
    let scaled = normalized
        .mantissa()
        .checked_mul(factor)
        .filter(|scaled| fits_storage(*scaled))
        .ok_or_else(|| DecimalError::OutOfRange {
            value: value.to_string(),
            precision: STORAGE_PRECISION,
            scale: STORAGE_SCALE,
        })?;
    Ok(scaled)
}

/// The decimal a ClickHouse `Decimal(38, 12)` integer stands for.
pub fn from_scaled_i128(mantissa: i128) -> Result<Decimal, DecimalError> {
    // The common case, on every record's hot path: the mantissa fits rust_decimal's 96 bits.
    const DECIMAL_MAX_MANTISSA: i128 = (1i128 << 96) - 1;
    if (-DECIMAL_MAX_MANTISSA..=DECIMAL_MAX_MANTISSA).contains(&mantissa) {
        return Ok(Decimal::from_i128_with_scale(mantissa, STORAGE_SCALE).normalize());
    }
    // Beyond 96 bits, drop trailing zeros first so that, say, 10^25 (38 digits at scale 12) is
    // still representable as an integer.
    let (mut reduced, mut scale) = (mantissa, STORAGE_SCALE);
    while scale > 0 && reduced % 10 == 0 {
        reduced /= 10;
        scale -= 1;
    }
    Decimal::try_from_i128_with_scale(reduced, scale)
        .map(|decimal| decimal.normalize())
        .map_err(|_| DecimalError::NotRepresentable {
            mantissa,
            scale: STORAGE_SCALE,
        })
}

/// `a + b` of two `Decimal(38, 12)` integers, if the sum is one too.
pub fn checked_add_scaled(a: i128, b: i128) -> Option<i128> {
    a.checked_add(b).filter(|sum| fits_storage(*sum))
}

/// `a × b` rounded half-even to 12 fractional digits, exactly: both factors are taken at scale
/// 12 as integers, multiplied in 128 bits (scale 24) and rounded once. (`Decimal`'s own `*`
/// would first cut the product to its 96-bit mantissa with a rounding of its own, and then a
/// second rounding to 12 digits could differ from the single one in the last digit.) `None`
/// when a factor is not storable or the product's magnitude reaches about 1.7·10^14 (where
/// `a·10^12 × b·10^12` leaves 128 bits) — far above any one action's cost (at most 10^9,
/// `crate::limits`).
pub fn mul_round_half_even(a: Decimal, b: Decimal) -> Option<Decimal> {
    const UNIT: i128 = 1_000_000_000_000; // 10^12
    let product = to_scaled_i128(a)
        .ok()?
        .checked_mul(to_scaled_i128(b).ok()?)?;
    let quotient = product.div_euclid(UNIT);
    let remainder = product.rem_euclid(UNIT); // 0 ≤ remainder < UNIT, also for negatives
    let rounded = match (remainder * 2).cmp(&UNIT) {
        std::cmp::Ordering::Less => quotient,
        std::cmp::Ordering::Greater => quotient + 1,
        std::cmp::Ordering::Equal => quotient + (quotient & 1),
    };
    if !fits_storage(rounded) {
        return None;
    }
    from_scaled_i128(rounded).ok()
}

/// Avro `decimal` bytes: the big-endian two's-complement unscaled integer, always 16 bytes.
///
/// Avro allows shorter (sign-trimmed) forms and [`from_avro_bytes`] reads them, but the
/// apache-avro crate refuses to resolve a `bytes` decimal shorter than its precision needs
/// (16 bytes for precision 38), so writers here always sign-extend to 16.
pub fn to_avro_bytes(value: Decimal) -> Result<Vec<u8>, DecimalError> {
    Ok(to_scaled_i128(value)?.to_be_bytes().to_vec())
}

/// Reads Avro `decimal` bytes written at scale 12.
pub fn from_avro_bytes(bytes: &[u8]) -> Result<Decimal, DecimalError> {
    if bytes.len() > 16 {
        return Err(DecimalError::TooManyBytes(bytes.len()));
    }
    if bytes.is_empty() {
        return Err(DecimalError::NoBytes);
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0x00 };
    let mut full = [fill; 16];
    full[16 - bytes.len()..].copy_from_slice(bytes);
    let mantissa = i128::from_be_bytes(full);
    if !fits_storage(mantissa) {
        return Err(DecimalError::OutOfRange {
            value: format!("{mantissa}e-{STORAGE_SCALE}"),
            precision: STORAGE_PRECISION,
            scale: STORAGE_SCALE,
        });
    }
    from_scaled_i128(mantissa)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    #[test]
    fn maps_known_values_to_clickhouse_integers() {
        assert_eq!(to_scaled_i128(dec("0.006")).unwrap(), 6_000_000_000);
        assert_eq!(to_scaled_i128(dec("-1")).unwrap(), -1_000_000_000_000);
        assert_eq!(to_scaled_i128(dec("0.000000000001")).unwrap(), 1);
        assert_eq!(to_scaled_i128(Decimal::ZERO).unwrap(), 0);
    }

    #[test]
    fn rejects_thirteen_fractional_digits_instead_of_rounding() {
        let error = to_scaled_i128(dec("0.0000000000001")).unwrap_err();
        assert!(matches!(
            error,
            DecimalError::TooManyFractionalDigits { scale: 13, .. }
        ));
    }

    #[test]
    fn trailing_zeros_beyond_scale_are_not_an_error() {
        assert_eq!(
            to_scaled_i128(dec("1.50000000000000")).unwrap(),
            1_500_000_000_000
        );
    }

    #[test]
    fn rejects_values_beyond_decimal_38_12() {
        // 7.9e28 fits rust_decimal but times 10^12 exceeds 38 digits.
        let error = to_scaled_i128(Decimal::MAX).unwrap_err();
        assert!(matches!(error, DecimalError::OutOfRange { .. }));
        assert!(to_scaled_i128(dec("99999999999999999999999999")).is_ok());
        assert!(to_scaled_i128(dec("100000000000000000000000000")).is_err());
    }

    #[test]
    fn reports_clickhouse_values_that_rust_decimal_cannot_hold() {
        assert_eq!(
            from_scaled_i128(10i128.pow(37)).unwrap(),
            dec("10000000000000000000000000")
        );
        let error = from_scaled_i128(TEN_POW_38 - 1).unwrap_err();
        assert!(matches!(error, DecimalError::NotRepresentable { .. }));
    }

    #[test]
    fn avro_bytes_are_sixteen_byte_twos_complement() {
        assert_eq!(to_avro_bytes(Decimal::ZERO).unwrap(), vec![0x00; 16]);
        assert_eq!(
            to_avro_bytes(dec("-0.000000000001")).unwrap(),
            vec![0xFF; 16]
        );
        let mut expected = vec![0x00; 16];
        expected[15] = 0x80;
        assert_eq!(to_avro_bytes(dec("0.000000000128")).unwrap(), expected);
    }

    #[test]
    fn the_most_negative_sixteen_bytes_are_out_of_range_not_an_overflow() {
        let mut bytes = [0u8; 16];
        bytes[0] = 0x80; // i128::MIN, found by the avro fuzz targets
        assert!(matches!(
            from_avro_bytes(&bytes),
            Err(DecimalError::OutOfRange { .. })
        ));
        assert_eq!(
            checked_add_scaled(-(TEN_POW_38 - 1), -(TEN_POW_38 - 1)),
            None
        );
        assert_eq!(checked_add_scaled(i128::MIN / 2, i128::MIN / 2), None);
    }

    #[test]
    fn reads_sign_trimmed_avro_bytes_from_other_writers() {
        assert_eq!(from_avro_bytes(&[0xFF]).unwrap(), dec("-0.000000000001"));
        assert_eq!(
            from_avro_bytes(&[0x00, 0x80]).unwrap(),
            dec("0.000000000128")
        );
        assert_eq!(from_avro_bytes(&[0x80]).unwrap(), dec("-0.000000000128"));
    }

    #[test]
    fn multiplication_rounds_once_half_to_even() {
        assert_eq!(
            mul_round_half_even(dec("3300"), dec("0.00004")),
            Some(dec("0.132"))
        );
        // 0.0000000000005 exactly half way: to the even neighbour, both ways.
        assert_eq!(
            mul_round_half_even(dec("0.5"), dec("0.000000000001")),
            Some(dec("0"))
        );
        assert_eq!(
            mul_round_half_even(dec("1.5"), dec("0.000000000001")),
            Some(dec("0.000000000002"))
        );
        assert_eq!(
            mul_round_half_even(dec("-1.5"), dec("0.000000000001")),
            Some(dec("-0.000000000002"))
        );
        // Just above half way rounds up even though Decimal's own product would cut it first.
        assert_eq!(
            mul_round_half_even(dec("0.500000000001"), dec("0.000000000001")),
            Some(dec("0.000000000001"))
        );
        assert_eq!(mul_round_half_even(Decimal::MAX, dec("2")), None);
        assert_eq!(
            mul_round_half_even(dec("99999999999999"), dec("99999999999999")),
            None
        );
    }

    fn storable_decimal() -> impl Strategy<Value = Decimal> {
        // Any mantissa of up to 96 bits with 0..=12 fractional digits is storable when
        // its integer part stays within Decimal(38, 12) — which 96 bits always do at scale >= 3.
        (any::<i64>(), any::<u32>(), 0u32..=12).prop_map(|(low, high, scale)| {
            let mantissa = (i128::from(high) << 64 | i128::from(low as u64)) * low.signum() as i128;
            Decimal::from_i128_with_scale(mantissa % 79_228_162_514_264_337_593_543_950_335, scale)
        })
    }

    proptest! {
        #[test]
        fn clickhouse_round_trip_is_exact(value in storable_decimal()) {
            match to_scaled_i128(value) {
                Ok(scaled) => prop_assert_eq!(from_scaled_i128(scaled).unwrap(), value),
                Err(DecimalError::OutOfRange { .. }) => {
                    // Only values whose integer part needs more than 26 digits may fail.
                    prop_assert!(value.abs() >= dec("99999999999999999999999999"));
                }
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
        }

        #[test]
        fn multiplication_agrees_with_an_exact_product_rounded_once(
            a in -10_000_000_000i64..10_000_000_000, a_scale in 0u32..=12,
            b in -10_000_000_000i64..10_000_000_000, b_scale in 0u32..=12,
        ) {
            let (a, b) = (Decimal::new(a, a_scale), Decimal::new(b, b_scale));
            // Below 20 + 20 digits at scale ≤ 24, Decimal's product is exact: a valid reference.
            let exact = a.checked_mul(b).unwrap();
            prop_assume!(exact.scale() == a_scale + b_scale);
            let expected = exact.round_dp_with_strategy(
                STORAGE_SCALE, rust_decimal::RoundingStrategy::MidpointNearestEven);
            match mul_round_half_even(a, b) {
                Some(product) => prop_assert_eq!(product, expected.normalize()),
                None => prop_assert!(exact.abs() >= Decimal::from(170_141_183_460_000i64), "{a} × {b}"),
            }
        }

        #[test]
        fn avro_round_trip_is_exact(value in storable_decimal()) {
            if let Ok(bytes) = to_avro_bytes(value) {
                prop_assert!(bytes.len() <= 16);
                prop_assert_eq!(from_avro_bytes(&bytes).unwrap(), value);
            }
        }

        #[test]
        fn every_readable_clickhouse_integer_reads_back_exactly(
            mantissa in -(TEN_POW_38 - 1)..TEN_POW_38, trailing_zeros in 0u32..=14,
        ) {
            // Both sides of the 96-bit shortcut, with and without trailing zeros to strip.
            let mantissa = mantissa.checked_mul(10i128.pow(trailing_zeros))
                .filter(|scaled| scaled.abs() < TEN_POW_38)
                .unwrap_or(mantissa);
            match from_scaled_i128(mantissa) {
                Ok(value) => prop_assert_eq!(to_scaled_i128(value).unwrap(), mantissa),
                Err(error) => prop_assert!(
                    matches!(error, DecimalError::NotRepresentable { .. }),
                    "{error}"
                ),
            }
        }

        #[test]
        fn too_many_fractional_digits_always_fail(mantissa in 1i64.., scale in 13u32..=28) {
            let value = Decimal::from_i128_with_scale(i128::from(mantissa) * 10 + 1, scale);
            prop_assert!(to_scaled_i128(value).is_err());
        }
    }
}
