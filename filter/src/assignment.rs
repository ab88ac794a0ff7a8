//! Variant assignment: salted FNV-1a hash of a key into one of [`BUCKETS`] buckets, and the
//! [`Layout`] that maps buckets to variants.
//!
//! # Monotone ramps
//! Each treatment owns a fixed, reserved slice of the bucket space (`[start, start + cap)`,
//! laid out in declaration order) and serves the first `weight` buckets of it; every other
//! bucket is the control's. Raising a treatment's weight therefore only takes buckets from the
//! control, lowering it only gives them back, and no bucket ever moves between treatments.
//!
//! Reservations are not an implementation shortcut. With three or more treatments that may
//! each take any weight, no assignment can be monotone: treatment A at weight `a` must be
//! disjoint from B at `1 - a` and from C at `1 - a`, which forces B's and C's sets to coincide.
//! A cap per treatment makes the promise keepable; one treatment defaults to a cap of 100 %.

use std::hash::Hasher;

/// Size of the bucket space: one bucket is 0.01 % of traffic.
pub const BUCKETS: u32 = 10_000;

/// Separates salt from key so that ("ab", "c") and ("a", "bc") hash differently; 0xff never
/// occurs in UTF-8 text.
const SEPARATOR: u8 = 0xff;

/// Salted FNV-1a (64 bit), followed by a 64-bit avalanche finalizer.
///
/// FNV-1a alone mixes its last input bytes poorly into the high bits, so keys that differ only
/// in their final characters (`user-1`, `user-2`, ...) would land in correlated buckets and
/// experiments with different salts would not be independent. The finalizer (the one from
/// MurmurHash3) spreads every input bit over the whole word; it is a bijection, so it adds no
/// collisions.
pub fn hash(salt: &str, key: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(salt.as_bytes());
    h.write(&[SEPARATOR]);
    h.write(key);
    finalize(h.finish())
}

fn finalize(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Maps a 64-bit hash onto `0..BUCKETS` by its high bits (multiply-shift: unbiased to 1e-15).
pub fn bucket_of(hash: u64) -> u32 {
    ((u128::from(hash) * u128::from(BUCKETS)) >> 64) as u32
}

/// The replicate group (`0..groups`) of a 64-bit hash, from its low bits: [`bucket_of`] uses
/// the high bits, and the finalizer makes the two independent, so a user's group says nothing
/// about their variant (what the controller's sample-ratio test relies on).
pub fn replicate_of(hash: u64, groups: usize) -> usize {
    (hash % groups.max(1) as u64) as usize
}

/// The bucket of `key` under `salt`.
pub fn bucket(salt: &str, key: &[u8]) -> u32 {
    bucket_of(hash(salt, key))
}

/// One treatment's reserved slice of the bucket space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub variant: usize,
    pub start: u32,
    pub cap: u32,
    pub weight: u32,
}

/// Buckets → variants for one experiment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    control: usize,
    slots: Vec<Slot>,
}

impl Layout {
    /// Lays treatments out in the given order. `treatments` holds `(variant, cap, weight)` in
    /// buckets; the caller guarantees `weight <= cap` and that caps add up to at most
    /// [`BUCKETS`] (config validation does).
    pub fn new(control: usize, treatments: &[(usize, u32, u32)]) -> Layout {
        let mut start = 0;
        let slots = treatments
            .iter()
            .map(|&(variant, cap, weight)| {
                let slot = Slot {
                    variant,
                    start,
                    cap,
                    weight: weight.min(cap),
                };
                start = start.saturating_add(cap);
                slot
            })
            .collect();
        Layout { control, slots }
    }

    /// The variant serving `bucket`.
    pub fn variant_for(&self, bucket: u32) -> usize {
        for s in &self.slots {
            if bucket >= s.start && bucket - s.start < s.weight {
                return s.variant;
            }
        }
        self.control
    }

    pub fn control(&self) -> usize {
        self.control
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Each variant's share in buckets, indexed by variant (`n` variants in all).
    pub fn weights(&self, n: usize) -> Vec<u32> {
        let mut w = vec![0; n];
        let mut treated = 0;
        for s in &self.slots {
            if let Some(x) = w.get_mut(s.variant) {
                *x = s.weight;
            }
            treated += s.weight;
        }
        if let Some(x) = w.get_mut(self.control) {
            *x = BUCKETS.saturating_sub(treated);
        }
        w
    }
}

/// A small, fast generator for per-request draws: a Weyl sequence through the same finalizer
/// (SplitMix-style). Not cryptographic: it only has to spread requests evenly over buckets.
/// Hand-written (a few lines over the finalizer above) rather than `rand`, to keep the wasm module small.
#[derive(Debug, Clone, Copy)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        finalize(self.0)
    }

    pub fn bucket(&mut self) -> u32 {
        bucket_of(self.next_u64())
    }
}

#[cfg(test)]
mod tests;
