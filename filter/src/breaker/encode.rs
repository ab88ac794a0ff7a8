//! The byte form of a [`State`] in proxy-wasm shared data.
//!
//! Little-endian, fixed layout, no dependencies (the filter keeps serde for its config only):
//!
//! ```text
//! magic "SLB1" | epoch.version u64 | epoch.digest u64 | name length u8 | name bytes
//! | bucket_ms u64 | variants u8 | BUCKETS × (bucket id u64 | variants × counts)
//! | variants × (0u8 | 1u8 reason u8 at_ms u64 treatment counts control counts ceiling f64 p f64)
//! counts = requests u32 | failures u32 × KINDS   (saturated at u32::MAX)
//! ```
//!
//! With 16 variants that is at most about 4.3 KiB per experiment. Decoding checks every length and
//! value and returns `None` on anything malformed, so corrupt or foreign bytes are ignored
//! rather than trusted.

use super::{Counts, Epoch, FailureKind, Slot, State, Trip, Window, BUCKETS};

const MAGIC: &[u8; 4] = b"SLB1";

/// Most variants a state may hold (the config allows 16).
const MAX_VARIANTS: usize = 64;

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_counts(out: &mut Vec<u8>, c: &Counts) {
    let narrow = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    out.extend_from_slice(&narrow(c.requests).to_le_bytes());
    for f in &c.failures {
        out.extend_from_slice(&narrow(*f).to_le_bytes());
    }
}

pub(super) fn encode(s: &State) -> Vec<u8> {
    let variants = s.window.variants.min(MAX_VARIANTS);
    let mut out = Vec::with_capacity(64 + BUCKETS * (8 + variants * 20) + variants * 70);
    out.extend_from_slice(MAGIC);
    put_u64(&mut out, s.epoch.version);
    put_u64(&mut out, s.epoch.digest);
    let name = s.experiment.as_bytes();
    let name = &name[..name.len().min(usize::from(u8::MAX))];
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    put_u64(&mut out, s.window.bucket_ms);
    out.push(variants as u8);
    for slot in &s.window.slots {
        put_u64(&mut out, slot.id);
        for c in slot.counts.iter().take(variants) {
            put_counts(&mut out, c);
        }
    }
    for v in 0..variants {
        match s.trips.get(v).copied().flatten() {
            None => out.push(0),
            Some(t) => {
                out.push(1);
                out.push(t.reason.index() as u8);
                put_u64(&mut out, t.at_ms);
                put_counts(&mut out, &t.treatment);
                put_counts(&mut out, &t.control);
                out.extend_from_slice(&t.ceiling.to_le_bytes());
                out.extend_from_slice(&t.p_value.to_le_bytes());
            }
        }
    }
    out
}

/// A cursor over untrusted bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn f64(&mut self) -> Option<f64> {
        Some(f64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn counts(&mut self) -> Option<Counts> {
        let mut c = Counts {
            requests: u64::from(self.u32()?),
            ..Counts::default()
        };
        for f in &mut c.failures {
            *f = u64::from(self.u32()?);
        }
        Some(c)
    }
}

pub(super) fn decode(bytes: &[u8]) -> Option<State> {
    let mut r = Reader { bytes };
    if r.take(4)? != MAGIC {
        return None;
    }
    let epoch = Epoch {
        version: r.u64()?,
        digest: r.u64()?,
    };
    let len = usize::from(r.u8()?);
    let experiment = std::str::from_utf8(r.take(len)?).ok()?.to_string();
    let bucket_ms = r.u64()?;
    if bucket_ms == 0 {
        return None;
    }
    let variants = usize::from(r.u8()?);
    if variants > MAX_VARIANTS {
        return None;
    }
    let mut slots = Vec::with_capacity(BUCKETS);
    for i in 0..BUCKETS as u64 {
        let id = r.u64()?;
        // The ring keeps bucket `id` at position `id % BUCKETS` (0: never used).
        if id != 0 && id % BUCKETS as u64 != i {
            return None;
        }
        let mut counts = Vec::with_capacity(variants);
        for _ in 0..variants {
            counts.push(r.counts()?);
        }
        slots.push(Slot { id, counts });
    }
    let mut trips = Vec::with_capacity(variants);
    for v in 0..variants {
        trips.push(match r.u8()? {
            0 => None,
            1 => {
                let reason = FailureKind::from_index(usize::from(r.u8()?))?;
                let at_ms = r.u64()?;
                let treatment = r.counts()?;
                let control = r.counts()?;
                let ceiling = r.f64()?;
                let p_value = r.f64()?;
                Some(Trip {
                    variant: v,
                    reason,
                    at_ms,
                    treatment,
                    control,
                    ceiling,
                    p_value,
                })
            }
            _ => return None,
        });
    }
    if !r.bytes.is_empty() {
        return None;
    }
    Some(State {
        experiment,
        epoch,
        window: Window {
            bucket_ms,
            variants,
            slots,
        },
        trips,
    })
}
