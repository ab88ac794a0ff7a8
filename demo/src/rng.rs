//! Small deterministic randomness for the demo: a counter-based generator, so a draw is a pure
//! function of (seed, stream, index) and the same seed replays the same run no matter in which
//! order concurrent requests happen to be served.

/// SplitMix64's finalizer: a bijective mix with good avalanche, enough for simulation.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of some bytes, to turn names and request inputs into stream numbers.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A generator for one (seed, stream, index) triple; successive calls give independent draws.
#[derive(Debug, Clone)]
pub struct Draws {
    state: u64,
}

impl Draws {
    pub fn new(seed: u64, stream: u64, index: u64) -> Draws {
        Draws {
            state: mix(mix(seed ^ mix(stream)) ^ index),
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        // 53 high bits: exactly representable doubles.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Standard normal (Box–Muller; the second value is dropped to keep draws independent of
    /// call parity).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
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
        let n = 20_000;
        let mut d = Draws::new(7, 0, 0);
        let xs: Vec<f64> = (0..n).map(|_| d.normal()).collect();
        let mean = xs.iter().sum::<f64>() / f64::from(n);
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / f64::from(n);
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
