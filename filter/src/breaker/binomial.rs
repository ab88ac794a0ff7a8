//! The exact binomial upper tail, in log space.
//!
//! Hand-written rather than taken from a statistics crate: the filter is a wasm module loaded
//! into every proxy, and this needs only a log-gamma and a short sum. The tests check it
//! against `statrs` natively.

/// Lanczos approximation (g = 7, nine terms): about 15 significant digits for x > 0.
const LANCZOS_G: f64 = 7.0;
const LANCZOS: [f64; 9] = [
    0.999_999_999_999_809_9,
    676.520_368_121_885_1,
    -1_259.139_216_722_402_8,
    771.323_428_777_653_1,
    -176.615_029_162_140_6,
    12.507_343_278_686_905,
    -0.138_571_095_265_720_12,
    9.984_369_578_019_572e-6,
    1.505_632_735_149_311_6e-7,
];

/// ln Γ(x) for x ≥ 0.5 (the filter needs it at whole numbers ≥ 1 only).
pub fn ln_gamma(x: f64) -> f64 {
    let x = x - 1.0;
    let mut a = LANCZOS[0];
    let t = x + LANCZOS_G + 0.5;
    for (i, c) in LANCZOS.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// ln P(X = k) for X ~ Binomial(n, p), 0 < p < 1, k ≤ n.
fn ln_pmf(n: u64, k: u64, p: f64) -> f64 {
    let (nf, kf) = (n as f64, k as f64);
    ln_gamma(nf + 1.0) - ln_gamma(kf + 1.0) - ln_gamma(nf - kf + 1.0)
        + kf * p.ln()
        + (nf - kf) * (-p).ln_1p()
}

/// Relative size of a term below which the sum stops: far under f64's resolution.
const NEGLIGIBLE: f64 = 1e-17;

/// P(X ≥ k) for X ~ Binomial(n, p): the one-sided exact p-value of seeing `k` or more
/// failures in `n` requests when the true failure rate is `p`.
///
/// The terms are summed away from the distribution's mode, where they only shrink: above
/// the mean the tail itself, below it one minus the lower tail. Each sum starts from one
/// term computed in log space and follows the ratio of neighbouring terms, so neither large
/// `n` nor tiny probabilities overflow or underflow before the result does.
pub fn upper_tail(n: u64, k: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    if p.is_nan() || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let odds = p / (1.0 - p);
    let nf = n as f64;
    if k as f64 >= nf * p {
        // Σ_{i=k..n} pmf(i): pmf(i+1) / pmf(i) = (n-i)/(i+1) · odds ≤ 1 past the mean.
        let first = ln_pmf(n, k, p);
        let mut term = 1.0;
        let mut sum = 1.0;
        let mut i = k;
        while i < n {
            term *= (n - i) as f64 / (i + 1) as f64 * odds;
            sum += term;
            if term < sum * NEGLIGIBLE {
                break;
            }
            i += 1;
        }
        (first + sum.ln()).exp().min(1.0)
    } else {
        // 1 − Σ_{i=0..k-1} pmf(i), summed downwards from k − 1 (below the mean).
        let first = ln_pmf(n, k - 1, p);
        let mut term = 1.0;
        let mut sum = 1.0;
        let mut i = k - 1;
        while i > 0 {
            term *= i as f64 / (n - i + 1) as f64 / odds;
            sum += term;
            if term < sum * NEGLIGIBLE {
                break;
            }
            i -= 1;
        }
        (1.0 - (first + sum.ln()).exp()).clamp(0.0, 1.0)
    }
}
