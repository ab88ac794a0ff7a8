//! The simulator's seeded random source: xoshiro256++ from `rand_xoshiro`, one stream per
//! (seed, scenario, run), and the draws the simulator needs, exact samplers from `rand_distr`
//! (binomial by BTPE and Poisson by PTRS cost O(1) whatever the count, so a rollout of a
//! million requests costs what one of a hundred does). Multinomial counts are conditional
//! binomials, which `rand_distr` does not offer for integer counts.

use rand::{RngExt, SeedableRng};
use rand_distr::{Binomial, Distribution, Poisson, StandardNormal};
use rand_xoshiro::{SplitMix64, Xoshiro256PlusPlus};

/// Reproducible pseudo-random numbers.
#[derive(Debug, Clone)]
pub struct Rng(Xoshiro256PlusPlus);

impl Rng {
    /// A stream determined by `keys` (e.g. seed, scenario, run): the keys are folded through
    /// SplitMix64 into one 64-bit seed, which seeds the generator (through SplitMix64 again).
    pub fn new(keys: &[u64]) -> Rng {
        let seed = keys.iter().fold(0x5EED_u64, |acc, &k| {
            rand::Rng::next_u64(&mut SplitMix64::seed_from_u64(acc ^ k.rotate_left(32)))
        });
        Rng(Xoshiro256PlusPlus::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        rand::Rng::next_u64(&mut self.0)
    }

    /// Uniform integer in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.random_range(0..n.max(1))
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.0)
    }

    /// Binomial(n, p), exact; `p` outside [0, 1] is clamped, NaN gives 0.
    pub fn binomial(&mut self, n: u64, p: f64) -> u64 {
        if n == 0 || p.is_nan() {
            return 0;
        }
        Binomial::new(n, p.clamp(0.0, 1.0)).map_or(0, |d| d.sample(&mut self.0))
    }

    /// Poisson(mean), exact; a mean that is not a positive finite number gives 0.
    pub fn poisson(&mut self, mean: f64) -> u64 {
        if !mean.is_finite() || mean <= 0.0 {
            return 0;
        }
        // A Poisson draw is a whole number held in an f64; the cast saturates far above any
        // count the simulator asks for.
        Poisson::new(mean).map_or(0, |d| d.sample(&mut self.0) as u64)
    }

    /// Multinomial counts of `n` over `probs` (which sum to 1), into `out`: each category's
    /// count is binomial given what the categories before it took.
    pub fn multinomial(&mut self, n: u64, probs: &[f64], out: &mut Vec<u64>) {
        out.clear();
        let mut left = n;
        let mut mass = 1.0;
        for (i, &p) in probs.iter().enumerate() {
            if i + 1 == probs.len() {
                out.push(left);
                break;
            }
            let k = if left == 0 || mass <= 0.0 {
                0
            } else {
                self.binomial(left, p / mass)
            };
            out.push(k);
            left -= k;
            mass -= p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(draws: &[f64]) -> (f64, f64) {
        let n = draws.len() as f64;
        let mean = draws.iter().sum::<f64>() / n;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var)
    }

    #[test]
    fn binomial_has_the_right_mean_and_variance() {
        let mut rng = Rng::new(&[1]);
        for &(n, p) in &[(10u64, 0.3), (1000, 0.01), (100_000, 0.05), (5_000, 0.7)] {
            let draws: Vec<f64> = (0..20_000).map(|_| rng.binomial(n, p) as f64).collect();
            let (mean, var) = moments(&draws);
            let (m, v) = (n as f64 * p, n as f64 * p * (1.0 - p));
            assert!(
                (mean - m).abs() < 4.0 * (v / 20_000.0).sqrt() + 1e-9,
                "n {n} p {p}: mean {mean}"
            );
            assert!(
                (var / v - 1.0).abs() < 0.06,
                "n {n} p {p}: var {var} vs {v}"
            );
        }
    }

    #[test]
    fn poisson_has_the_right_mean_and_variance() {
        let mut rng = Rng::new(&[2]);
        for &m in &[0.3, 5.0, 40.0, 12_345.6] {
            let draws: Vec<f64> = (0..20_000).map(|_| rng.poisson(m) as f64).collect();
            let (mean, var) = moments(&draws);
            assert!(
                (mean - m).abs() < 4.0 * (m / 20_000.0).sqrt(),
                "mean {m}: {mean}"
            );
            assert!((var / m - 1.0).abs() < 0.06, "mean {m}: var {var}");
        }
    }

    #[test]
    fn degenerate_parameters_give_the_obvious_counts() {
        let mut rng = Rng::new(&[4]);
        assert_eq!(rng.binomial(0, 0.5), 0);
        assert_eq!(rng.binomial(50, 0.0), 0);
        assert_eq!(rng.binomial(50, 1.0), 50);
        assert_eq!(rng.binomial(50, 1.5), 50);
        assert_eq!(rng.binomial(50, f64::NAN), 0);
        assert_eq!(rng.poisson(0.0), 0);
        assert_eq!(rng.poisson(-1.0), 0);
        assert_eq!(rng.poisson(f64::NAN), 0);
        assert_eq!(rng.poisson(f64::INFINITY), 0);
        assert_eq!(rng.below(0), 0);
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..5).map(|_| Rng::new(&[7, 1]).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::new(&[7, 1]).next_u64(), Rng::new(&[7, 2]).next_u64());
        // The order of the keys matters: (seed 1, run 2) is not (seed 2, run 1).
        assert_ne!(Rng::new(&[1, 2]).next_u64(), Rng::new(&[2, 1]).next_u64());
    }

    #[test]
    fn multinomial_conserves_the_total_and_follows_the_probabilities() {
        let mut rng = Rng::new(&[3]);
        let mut out = Vec::new();
        rng.multinomial(12_345, &[0.2, 0.3, 0.1, 0.4], &mut out);
        assert_eq!(out.iter().sum::<u64>(), 12_345);
        assert_eq!(out.len(), 4);
        // Each category is Binomial(n, p) marginally: within 5 standard deviations.
        let n = 1_000_000u64;
        let probs = [0.2, 0.3, 0.1, 0.4];
        rng.multinomial(n, &probs, &mut out);
        for (k, p) in out.iter().zip(probs) {
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!((*k as f64 - n as f64 * p).abs() < 5.0 * sd, "{out:?}");
        }
    }
}
