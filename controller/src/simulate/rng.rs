//! A small seeded random source (xoshiro256**, seeded through SplitMix64) and the exact
//! samplers the simulator needs: binomial by Beta splitting, so a draw costs O(log n) whatever
//! n is, and multinomial by conditional binomials.

/// Reproducible pseudo-random numbers.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A stream determined by `keys` (e.g. seed, scenario, run).
    pub fn new(keys: &[u64]) -> Rng {
        let mut x = 0x5EED_u64;
        for &k in keys {
            let mut y = x ^ k.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            x = splitmix(&mut y);
        }
        let mut s = [0; 4];
        for v in &mut s {
            *v = splitmix(&mut x);
        }
        Rng { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Gamma(shape, 1) for shape ≥ 1 (Marsaglia & Tsang 2000).
    pub fn gamma(&mut self, shape: f64) -> f64 {
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = self.uniform();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Beta(a, b) for a, b ≥ 1.
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        x / (x + y)
    }

    /// Binomial(n, p), exact. Large n: the median order statistic of n uniforms is
    /// Beta-distributed; which side of p it falls on splits the problem in half.
    pub fn binomial(&mut self, n: u64, p: f64) -> u64 {
        if n == 0 || p <= 0.0 {
            return 0;
        }
        if p >= 1.0 {
            return n;
        }
        if p > 0.5 {
            return n - self.binomial(n, 1.0 - p);
        }
        if (n as f64) * p < 16.0 {
            return self.binomial_inversion(n, p);
        }
        let i = n.div_ceil(2);
        let y = self.beta(i as f64, (n + 1 - i) as f64);
        if y >= p {
            // Every uniform below p is among the i − 1 below y, uniform on (0, y).
            self.binomial(i - 1, p / y)
        } else {
            // The i smallest are below p; the other n − i are uniform on (y, 1).
            i + self.binomial(n - i, (p - y) / (1.0 - y))
        }
    }

    /// Inversion by the recurrence of binomial probabilities; for small n·p.
    fn binomial_inversion(&mut self, n: u64, p: f64) -> u64 {
        let q = 1.0 - p;
        let s = p / q;
        let a = (n as f64 + 1.0) * s;
        let mut r = q.powf(n as f64);
        let mut u = self.uniform();
        let mut x = 0u64;
        while u > r {
            u -= r;
            x += 1;
            if x > n {
                // Rounding left a sliver of mass unclaimed: start over.
                return self.binomial_inversion(n, p);
            }
            r *= a / x as f64 - s;
        }
        x
    }

    /// Poisson(mean), exact: Gamma splitting for large means (the m-th arrival time of a
    /// unit-rate process is Gamma(m); Knuth, TAOCP vol. 2, 3.4.1), inversion for small ones.
    pub fn poisson(&mut self, mean: f64) -> u64 {
        if mean.is_nan() || mean <= 0.0 {
            return 0;
        }
        if mean < 16.0 {
            let limit = (-mean).exp();
            let mut x = 0u64;
            let mut prod = self.uniform();
            while prod > limit {
                x += 1;
                prod *= self.uniform();
            }
            return x;
        }
        let m = (mean * 0.875).floor() as u64;
        let g = self.gamma(m as f64);
        if g < mean {
            m + self.poisson(mean - g)
        } else {
            // The first m − 1 arrivals are uniform on (0, g): those before `mean` count.
            self.binomial(m - 1, mean / g)
        }
    }

    /// Multinomial counts of `n` over `probs` (which sum to 1), into `out`.
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
                self.binomial(left, (p / mass).clamp(0.0, 1.0))
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
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..5).map(|_| Rng::new(&[7, 1]).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::new(&[7, 1]).next_u64(), Rng::new(&[7, 2]).next_u64());
    }

    #[test]
    fn multinomial_conserves_the_total() {
        let mut rng = Rng::new(&[3]);
        let mut out = Vec::new();
        rng.multinomial(12_345, &[0.2, 0.3, 0.1, 0.4], &mut out);
        assert_eq!(out.iter().sum::<u64>(), 12_345);
        assert_eq!(out.len(), 4);
    }
}
