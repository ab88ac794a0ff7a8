//! Whole numbers of the wire format that may arrive written as floats.
//!
//! Istio hands a WasmPlugin's `pluginConfig` to the filter through `google.protobuf.Struct`,
//! whose only number is a double, so `"timeout_ms": 500` may come back as `500.0` or `5e2`.
//! Every whole-number field therefore takes an integral float as well; a fraction, a negative,
//! a non-finite or out-of-range value is still an error that names the field.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};

/// An unsigned integer type of the wire format.
pub trait Unsigned: TryFrom<u64> + Copy {
    const MAX: u64;
}

impl Unsigned for u32 {
    const MAX: u64 = u32::MAX as u64;
}

impl Unsigned for u64 {
    const MAX: u64 = u64::MAX;
}

impl Unsigned for usize {
    const MAX: u64 = usize::MAX as u64;
}

/// 2^64: the first float above every `u64`.
const TWO_TO_64: f64 = 18_446_744_073_709_551_616.0;

struct Whole<T>(T);

struct WholeVisitor<T>(PhantomData<T>);

impl<T: Unsigned> WholeVisitor<T> {
    fn convert<E: de::Error>(&self, v: u64, found: Unexpected<'_>) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::invalid_value(found, self))
    }
}

impl<T: Unsigned> Visitor<'_> for WholeVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if T::MAX == u64::MAX {
            f.write_str("a whole number, at least 0")
        } else {
            write!(f, "a whole number from 0 to {}", T::MAX)
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.convert(v, Unexpected::Unsigned(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        match u64::try_from(v) {
            Ok(u) => self.convert(u, Unexpected::Signed(v)),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        // `as` saturates rather than fails, so the range is checked first; NaN and the
        // infinities have no zero fraction.
        if v.fract() == 0.0 && (0.0..TWO_TO_64).contains(&v) {
            self.convert(v as u64, Unexpected::Float(v))
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }
}

impl<'de, T: Unsigned> Deserialize<'de> for Whole<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WholeVisitor(PhantomData)).map(Whole)
    }
}

/// `deserialize_with` for a whole-number field.
pub fn whole<'de, D: Deserializer<'de>, T: Unsigned>(d: D) -> Result<T, D::Error> {
    Whole::deserialize(d).map(|w| w.0)
}

/// `deserialize_with` for an optional whole-number field (with `#[serde(default)]`).
pub fn optional_whole<'de, D: Deserializer<'de>, T: Unsigned>(d: D) -> Result<Option<T>, D::Error> {
    Option::<Whole<T>>::deserialize(d).map(|o| o.map(|w| w.0))
}
