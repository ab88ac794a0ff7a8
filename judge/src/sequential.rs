//! Statistics the guardrails share: always-valid (anytime) tests from normal mixtures, Holm's
//! step-down correction, Wilson bounds, and a Dirichlet-multinomial test of the split.
//!
//! A guardrail estimates a contrast θ (a linear combination of the two variants' rates, whose
//! sign says "harm") with variance V. In information time I = 1/V the score S = θ̂·I behaves
//! like Brownian motion with drift θ, even when the split between variants changes between
//! stages (the covariance of two cumulative estimates is the variance of the later one). For
//! such a process `exp(λS − λ²I/2)` is a martingale under θ = 0; mixing λ over a half-normal
//! prior gives a closed-form e-process, valid at every look (Ville's inequality): rejecting
//! when it reaches 1/α keeps the error at α however often we look (Robbins 1970; Howard et
//! al. 2021; Johari et al. 2017/2022). With θ < 0 the same process is a supermartingale, so it
//! also tests the composite null θ ≤ 0.

use statrs::function::erf::{erfc, erfc_inv};
use statrs::function::gamma::ln_gamma;

/// Φ, the standard normal distribution function.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// Φ⁻¹.
pub fn normal_quantile(p: f64) -> f64 {
    -std::f64::consts::SQRT_2 * erfc_inv(2.0 * p)
}

/// The x* minimising the normal-mixture boundary at a given information, for level `alpha`:
/// the root of x = 2 ln(1/α) + ln(1 + x). The prior precision ρ = I*/x* makes the boundary
/// tightest at information I*.
fn best_ratio(alpha: f64) -> f64 {
    let c = 2.0 * (1.0 / alpha).ln();
    let mut x = c + 1.0;
    for _ in 0..50 {
        x = c + (1.0 + x).ln();
    }
    x
}

/// Prior precision of the mixture, tuned so the test is sharpest where an effect of size
/// `effect` (in contrast units) would be found with probability `power` by a fixed-horizon
/// test at level `alpha`.
pub fn tuned_precision(effect: f64, alpha: f64, power: f64) -> f64 {
    let z = normal_quantile(1.0 - alpha) + normal_quantile(power);
    let info = (z / effect.max(f64::MIN_POSITIVE)).powi(2);
    info / best_ratio(alpha)
}

/// ln of the one-sided normal-mixture e-value against θ ≤ 0, from an estimate `theta` with
/// variance `var`, mixture precision `rho`:
/// E = 2·√(ρ/(I+ρ))·exp(S²/(2(I+ρ)))·Φ(S/√(I+ρ)), S = θ̂·I, I = 1/V.
pub fn ln_e_value(theta: f64, var: f64, rho: f64) -> f64 {
    if !(var > 0.0 && var.is_finite() && theta.is_finite()) {
        return 0.0;
    }
    let info = 1.0 / var;
    let s = theta * info;
    let t = info + rho;
    let z = s / t.sqrt();
    let ln_phi = if z > -30.0 {
        normal_cdf(z).ln()
    } else {
        // Mills ratio: Φ(z) ≈ φ(z)/|z| for very negative z.
        -0.5 * z * z - (-z).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
    };
    std::f64::consts::LN_2 + 0.5 * (rho / t).ln() + s * s / (2.0 * t) + ln_phi
}

/// Always-valid p-value from an e-value: min(1, 1/E).
pub fn p_from_ln_e(ln_e: f64) -> f64 {
    (-ln_e).exp().min(1.0)
}

/// Half-width of the two-sided normal-mixture confidence sequence at level `alpha`: the
/// interval θ̂ ± w covers θ at every look simultaneously with probability 1 − α.
pub fn cs_half_width(var: f64, rho: f64, alpha: f64) -> f64 {
    if !(var > 0.0 && var.is_finite()) {
        return f64::INFINITY;
    }
    let info = 1.0 / var;
    let t = info + rho;
    (t * (2.0 * (1.0 / alpha).ln() + (t / rho).ln())).sqrt() / info
}

/// Holm (1979): which hypotheses to reject at family-wise level `alpha`, given p-values.
/// Running Holm on always-valid p-values at every look keeps the family-wise rate over all
/// looks: a true null is rejected only if one of them reaches α/m₀ at some time.
pub fn holm(p: &[f64], alpha: f64) -> Vec<bool> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut reject = vec![false; m];
    for (k, &i) in order.iter().enumerate() {
        if p[i] <= alpha / (m - k) as f64 {
            reject[i] = true;
        } else {
            break;
        }
    }
    reject
}

/// Holm-adjusted p-values (the smallest family-wise level at which each is rejected).
pub fn holm_adjusted(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut out = vec![1.0; m];
    let mut running: f64 = 0.0;
    for (k, &i) in order.iter().enumerate() {
        running = running.max(((m - k) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}

/// Wilson score interval for `x` successes in `n` at normal quantile `z`.
pub fn wilson(x: f64, n: f64, z: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let p = x / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    // At x = 0 (x = n) the bound is exactly 0 (1); the subtraction would leave rounding dust.
    let lo = if x <= 0.0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if x >= n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (lo, hi)
}

/// Dirichlet-multinomial mixture e-value of observed counts against the probabilities
/// `expected` (Lindon & Malek 2022): a likelihood ratio against a Dirichlet(c·π) prior, a
/// martingale under the null, so valid at every look. Returns ln E.
pub fn ln_srm_e_value(counts: &[u64], expected: &[f64], concentration: f64) -> f64 {
    let n: f64 = counts.iter().map(|&c| c as f64).sum();
    let mut ln_e = ln_gamma(concentration) - ln_gamma(concentration + n);
    for (&x, &p) in counts.iter().zip(expected) {
        let x = x as f64;
        if p <= 0.0 {
            if x > 0.0 {
                return f64::INFINITY;
            }
            continue;
        }
        let a = concentration * p;
        ln_e += ln_gamma(a + x) - ln_gamma(a) - x * p.ln();
    }
    ln_e
}

/// A variant's share of requests against its expected share `w`, when requests come in
/// clusters (every request of a user goes to the user's variant): the replicate-group test.
///
/// `own[r]` and `all[r]` are the variant's and every variant's requests in replicate group r,
/// a disjoint random set of users (an independent slice of the user-key hash). Under the
/// expected split the residuals D_r = own_r − w·all_r are independent with mean zero whatever
/// the users' activity, so their spread estimates the variance of D = Σ D_r (the random-groups
/// variance estimator, Wolter 2007, "Introduction to Variance Estimation", ch. 2). That
/// estimate has R − 1 degrees of freedom; the binomial variance w(1 − w)·n is a floor (a user
/// with k requests adds k² ≥ k to the variance). The studentised D is mapped to the normal
/// quantile with the same tail probability under Student's t with R − 1 degrees of freedom,
/// and a two-sided normal mixture on the share (precision `rho`) turns it into an e-value that
/// can be checked at every look, as the other guardrails do.
///
/// Returns ln E, the share's deviation D/n, and the design effect (estimated variance over
/// the binomial one).
pub fn ln_replicate_e_value(own: &[u64], all: &[u64], w: f64, rho: f64) -> (f64, f64, f64) {
    let n: f64 = all.iter().map(|&x| x as f64).sum();
    let groups = own.len().min(all.len());
    if n <= 0.0 || groups < 2 || !(w > 0.0 && w < 1.0) {
        return (0.0, 0.0, 1.0);
    }
    let d: f64 = own
        .iter()
        .zip(all)
        .map(|(&o, &a)| o as f64 - w * a as f64)
        .sum();
    // Residuals around the overall skew, so that a real skew does not inflate the variance.
    let k = groups as f64;
    let spread: f64 = own
        .iter()
        .zip(all)
        .map(|(&o, &a)| {
            let (o, a) = (o as f64, a as f64);
            (o - w * a - d * a / n).powi(2)
        })
        .sum::<f64>()
        * k
        / (k - 1.0);
    let binomial = w * (1.0 - w) * n;
    let var = spread.max(binomial);
    let effect = spread / binomial;
    // The groups' estimate has k − 1 degrees of freedom; taking the larger of it and the
    // binomial floor only makes the studentised D smaller, so Student's t with k − 1 degrees
    // of freedom bounds its tails whatever the users do.
    let t = d / var.sqrt();
    let z = {
        use statrs::distribution::{ContinuousCDF, StudentsT};
        match StudentsT::new(0.0, 1.0, k - 1.0) {
            // The upper tail of |t| mapped to the normal's.
            Ok(dist) => {
                let tail = dist.sf(t.abs());
                if tail > 0.0 {
                    t.signum() * -normal_quantile(tail)
                } else {
                    t
                }
            }
            Err(_) => t,
        }
    };
    // Share scale: θ̂ = D/n with information I = n²/var; S = z·√I.
    let info = n * n / var;
    let total = info + rho;
    let ln_e = 0.5 * (rho / total).ln() + z * z * info / (2.0 * total);
    (ln_e, d / n, effect)
}

/// The split test's mixture components: (multiple of the skew [`split_precision`] is tuned
/// for, weight). Most weight stays on the tuned mixture; a tenth each goes to mixtures for skews
/// 4 and 16 times larger.
///
/// One mixture tuned for a one-point skew found over 10⁵ requests puts so little prior weight
/// on large skews that a seven-point skew over 1,600 requests (z ≈ 5.7) stays below the bar:
/// its e-value grows with the information only once the information passes the prior's
/// precision. A weighted mean of e-values is an e-value (each is a supermartingale under the
/// expected split, and so is their mean), so together they keep the false-halt rate, and the
/// mixtures for large skews find those within seconds. The price at the tuned skew is the
/// tuned mixture's weight: its e-value counts for 0.8 (a third, with equal weights, cost 5 to 8
/// points of power at 51/49 in the simulator).
pub const SPLIT_MIXTURE: [(f64, f64); 3] = [(1.0, 0.8), (4.0, 0.1), (16.0, 0.1)];

/// [`ln_replicate_e_value`] averaged over the mixtures of [`SPLIT_MIXTURE`] around the tuned
/// precision `rho`: (ln e, skew estimate, variance ratio to independent requests).
pub fn ln_replicate_e_value_mixed(own: &[u64], all: &[u64], w: f64, rho: f64) -> (f64, f64, f64) {
    let parts: Vec<(f64, f64, f64, f64)> = SPLIT_MIXTURE
        .iter()
        .map(|&(k, weight)| {
            let (ln_e, skew, effect) = ln_replicate_e_value(own, all, w, rho / (k * k));
            (ln_e, weight, skew, effect)
        })
        .collect();
    let top = parts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let mean: f64 = parts.iter().map(|p| p.1 * (p.0 - top).exp()).sum();
    let (_, _, skew, effect) = parts.first().copied().unwrap_or((0.0, 1.0, 0.0, 1.0));
    (top + mean.ln(), skew, effect)
}

/// Prior precision of the split test's mixture: sharpest for a skew of 2·√(w(1 − w)) points
/// of share (one point at 50/50, 0.2 points at 1 %) found with 80 % power at two-sided
/// level `alpha`.
pub fn split_precision(w: f64, alpha: f64) -> f64 {
    let effect = 0.02 * (w * (1.0 - w)).sqrt();
    let z = normal_quantile(1.0 - alpha / 2.0) + normal_quantile(0.8);
    (z / effect).powi(2) / best_ratio(alpha)
}

/// Pearson's χ² of counts against expected probabilities, and its fixed-horizon p-value.
pub fn chi_square(counts: &[u64], expected: &[f64]) -> (f64, f64) {
    let n: f64 = counts.iter().map(|&c| c as f64).sum();
    let mut stat = 0.0;
    let mut df = 0usize;
    for (&x, &p) in counts.iter().zip(expected) {
        if p > 0.0 {
            let e = n * p;
            stat += (x as f64 - e).powi(2) / e;
            df += 1;
        }
    }
    let df = df.saturating_sub(1).max(1) as f64;
    let p = chi_square_sf(stat, df);
    (stat, p)
}

/// The `p`-quantile of χ² with `df` degrees of freedom.
pub fn chi_square_quantile(p: f64, df: f64) -> f64 {
    use statrs::distribution::{ChiSquared, ContinuousCDF};
    ChiSquared::new(df.max(1.0)).map_or(f64::INFINITY, |d| d.inverse_cdf(p))
}

/// Upper tail of χ² with `df` degrees of freedom.
pub fn chi_square_sf(x: f64, df: f64) -> f64 {
    use statrs::distribution::{ChiSquared, ContinuousCDF};
    ChiSquared::new(df).map_or(f64::NAN, |d| d.sf(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_functions_agree_with_tables() {
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-4);
        assert!((normal_quantile(0.99) - 2.3263).abs() < 1e-3);
    }

    #[test]
    fn holm_steps_down() {
        // m = 3 at 0.05: thresholds 0.0167, 0.025, 0.05.
        assert_eq!(holm(&[0.01, 0.02, 0.04], 0.05), vec![true, true, true]);
        assert_eq!(holm(&[0.01, 0.03, 0.04], 0.05), vec![true, false, false]);
        assert_eq!(holm(&[0.02, 0.01, 0.5], 0.05), vec![true, true, false]);
        assert_eq!(holm(&[0.02, 0.02, 0.02], 0.05), vec![false, false, false]);
        let adj = holm_adjusted(&[0.01, 0.03, 0.04]);
        assert!((adj[0] - 0.03).abs() < 1e-12);
        assert!((adj[1] - 0.06).abs() < 1e-12);
        assert!((adj[2] - 0.06).abs() < 1e-12);
    }

    #[test]
    fn the_mixture_needs_more_evidence_than_a_single_look() {
        let rho = tuned_precision(0.01, 0.01, 0.8);
        // z = 2.33 at one look would reject at 1 %; the mixture asks for more.
        let var: f64 = 1e-6;
        let theta = 2.33 * var.sqrt();
        assert!(ln_e_value(theta, var, rho) < (100.0f64).ln());
        let theta = 5.0 * var.sqrt();
        assert!(ln_e_value(theta, var, rho) > (100.0f64).ln());
        // Evidence the other way gives nothing.
        assert!(ln_e_value(-theta, var, rho) < 0.0);
        // The CS is wider than the fixed 99 % interval.
        assert!(cs_half_width(var, rho, 0.01) > 2.576 * var.sqrt());
    }

    #[test]
    fn wilson_bounds_bracket_the_estimate() {
        let (lo, hi) = wilson(10.0, 100.0, 1.96);
        assert!(lo < 0.1 && hi > 0.1 && lo > 0.04 && hi < 0.18);
        assert_eq!(wilson(0.0, 0.0, 1.96), (0.0, 1.0));
        // None (all) of n: the lower (upper) bound is exactly 0 (1), whatever n.
        for n in [1.0, 7.0, 50.0, 1e6] {
            let (lo, hi) = wilson(0.0, n, 1.96);
            assert_eq!(lo, 0.0, "n {n}");
            assert!(hi > 0.0 && hi < 1.0, "n {n}: {hi}");
            let (lo, hi) = wilson(n, n, 1.96);
            assert_eq!(hi, 1.0, "n {n}");
            assert!(lo > 0.0 && lo < 1.0, "n {n}: {lo}");
        }
    }

    #[test]
    fn srm_e_value_flags_a_skew_and_not_a_fair_split() {
        let fair = ln_srm_e_value(&[50_100, 49_900], &[0.5, 0.5], 1000.0);
        assert!(fair < 0.0);
        let skewed = ln_srm_e_value(&[51_000, 49_000], &[0.5, 0.5], 1000.0);
        assert!(skewed > (1000.0f64).ln());
        let (stat, p) = chi_square(&[51_000, 49_000], &[0.5, 0.5]);
        assert!((stat - 40.0).abs() < 1e-9 && p < 1e-8);
    }
}
