//! Deterministic randomness for the demo: one generator per (seed, stream, index), so a draw is
//! a pure function of that triple and the same seed replays the same run no matter in which
//! order concurrent requests happen to be served. The generator is xoshiro256++
//! (`rand_xoshiro`), its seed the triple folded through SplitMix64; names and request inputs
//! become stream numbers by FNV-1a (`fnv`).

use std::hash::Hasher;

use rand::{Rng, RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rand_xoshiro::{SplitMix64, Xoshiro256PlusPlus};

/// FNV-1a of some bytes, to turn names and request inputs into stream numbers.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// A generator for one (seed, stream, index) triple; successive calls give independent draws.
#[derive(Debug, Clone)]
pub struct Draws(Xoshiro256PlusPlus);

impl Draws {
    pub fn new(seed: u64, stream: u64, index: u64) -> Draws {
        let key = [seed, stream, index].iter().fold(0, |acc: u64, &k| {
            SplitMix64::seed_from_u64(acc ^ k.rotate_left(32)).next_u64()
        });
        Draws(Xoshiro256PlusPlus::seed_from_u64(key))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.random()
    }

    /// True with probability `p` (clamped to [0, 1]; NaN is never).
    pub fn chance(&mut self, p: f64) -> bool {
        if p.is_nan() {
            return false;
        }
        self.0.random_bool(p.clamp(0.0, 1.0))
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.0)
    }

    /// Uniform integer in [0, n) (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.random_range(0..n.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_triple_same_draws_and_sane_moments() {
        let a: Vec<u64> = {
            let mut d = Draws::new(1, 2, 3);
            (0..5).map(|_| d.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut d = Draws::new(1, 2, 3);
            (0..5).map(|_| d.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a[0], Draws::new(1, 2, 4).next_u64());
        assert_ne!(a[0], Draws::new(1, 3, 3).next_u64());
        assert_ne!(a[0], Draws::new(2, 1, 3).next_u64());
        let n = 20_000;
        let mut d = Draws::new(7, 0, 0);
        let xs: Vec<f64> = (0..n).map(|_| d.normal()).collect();
        let mean = xs.iter().sum::<f64>() / f64::from(n);
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / f64::from(n);
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn hash_bytes_is_fnv_1a() {
        // Published FNV-1a 64-bit vectors.
        assert_eq!(hash_bytes(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash_bytes(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash_bytes(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn chance_and_below_stay_in_range() {
        let mut d = Draws::new(9, 9, 9);
        assert!(!d.chance(0.0));
        assert!(d.chance(1.0));
        assert!(d.chance(2.0));
        assert!(!d.chance(-1.0));
        assert!(!d.chance(f64::NAN));
        assert_eq!(d.below(0), 0);
        assert!((0..1000).all(|_| d.below(7) < 7));
    }
}
