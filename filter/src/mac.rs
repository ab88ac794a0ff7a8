//! Keyed MACs over short messages: what lets the filter trust, later and possibly on another
//! proxy, a value it issued itself (an exposure token carried back by an event beacon, the
//! marker on a shadow copy).
//!
//! The MAC is SipHash-2-4 with its 128-bit output, keyed by a key derived from the
//! configuration's top-level `secret`. SipHash was designed as a PRF for short inputs, which is
//! exactly what is tagged here (a few names, a key hash, a timestamp): one tag costs a few
//! dozen rounds on 64-bit words, the `siphasher` crate adds a few kilobytes to the wasm module
//! and has no dependencies. HMAC-SHA-256 would cost several SHA-256 compressions per tag and a
//! larger module for no gain at these message sizes; a 128-bit tag is far beyond what an
//! online forger can guess (every guess is one request to a proxy).
//!
//! Keys are separated by purpose: the same secret keys exposure tokens and shadow markers,
//! and a tag made for one purpose never verifies for another.

use std::fmt;
use std::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher24};

/// Length of a tag in bytes.
pub const TAG_LEN: usize = 16;

/// Purpose of the key that tags exposure tokens (see `beacon`).
pub const PURPOSE_EXPOSURE: &str = "exposure";
/// Purpose of the key that tags the marker of shadow copies.
pub const PURPOSE_SHADOW: &str = "shadow";
/// Purpose of the key that hashes user keys into the per-user event limit's table (keyed, so
/// a client cannot choose keys that collide in it).
pub const PURPOSE_USER_TABLE: &str = "user-table";

/// Fixed public key that only compresses a secret of any length into a 128-bit master key;
/// the secrecy comes from the secret itself.
const DERIVE_K0: u64 = 0x736c_7569_6365_2f6b; // "sluice/k"
const DERIVE_K1: u64 = 0x6579_2f76_3100_0000; // "ey/v1"

/// A MAC key for one purpose. Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    k0: u64,
    k1: u64,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// The key for `purpose` derived from the configured secret.
    pub fn derive(secret: &[u8], purpose: &str) -> Key {
        let master = sip128(DERIVE_K0, DERIVE_K1, &[secret]);
        let (k0, k1) = split(&master);
        let sub = sip128(k0, k1, &[purpose.as_bytes()]);
        let (k0, k1) = split(&sub);
        Key { k0, k1 }
    }

    /// The tag of a message made of `parts`. Each part is length-prefixed, so the boundaries
    /// are part of what is authenticated (`["ab", "c"]` and `["a", "bc"]` differ).
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        sip128(self.k0, self.k1, parts)
    }

    /// Whether `tag` is the tag of `parts`, compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        constant_time_eq(&self.tag(parts), tag)
    }

    /// A keyed 64-bit hash (SipHash-2-4), for tables indexed by client-chosen values.
    pub fn hash64(&self, data: &[u8]) -> u64 {
        let (lo, _) = split(&self.tag(&[data]));
        lo
    }
}

fn sip128(k0: u64, k1: u64, parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut h = SipHasher24::new_with_keys(k0, k1);
    for p in parts {
        // Messages here are short; a part longer than 4 GiB cannot occur in a request.
        h.write(&u32::try_from(p.len()).unwrap_or(u32::MAX).to_le_bytes());
        h.write(p);
    }
    h.finish128().as_bytes()
}

fn split(b: &[u8; TAG_LEN]) -> (u64, u64) {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..]);
    (u64::from_le_bytes(lo), u64::from_le_bytes(hi))
}

/// Compares without an early exit, so response time does not leak how much of a guess matched.
/// (Hand-written, like the hex below, rather than a crate: a few lines, and the wasm module stays small.)
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lower-case hex of a tag.
pub fn to_hex(tag: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(tag.len() * 2);
    for b in tag {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// A tag from its lower- or upper-case hex; `None` unless exactly [`TAG_LEN`] bytes.
pub fn from_hex(hex: &[u8]) -> Option<[u8; TAG_LEN]> {
    if hex.len() != TAG_LEN * 2 {
        return None;
    }
    let mut out = [0u8; TAG_LEN];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The value of one hex digit, either case.
pub(crate) fn nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SECRET: &[u8] = b"0123456789abcdef-test-secret";

    #[test]
    fn tags_verify_and_depend_on_every_input() {
        let k = Key::derive(SECRET, PURPOSE_EXPOSURE);
        let t = k.tag(&[b"ranker", b"canary"]);
        assert!(k.verify(&[b"ranker", b"canary"], &t));
        assert!(!k.verify(&[b"ranker", b"stable"], &t));
        // Boundaries are authenticated.
        assert_ne!(t, k.tag(&[b"ranke", b"rcanary"]));
        // Another secret, another purpose: another key.
        let other = Key::derive(b"0123456789abcdef-test-secreT", PURPOSE_EXPOSURE);
        assert!(!other.verify(&[b"ranker", b"canary"], &t));
        let shadow = Key::derive(SECRET, PURPOSE_SHADOW);
        assert!(!shadow.verify(&[b"ranker", b"canary"], &t));
        // Any flipped bit of the tag fails.
        for i in 0..TAG_LEN * 8 {
            let mut bad = t;
            bad[i / 8] ^= 1 << (i % 8);
            assert!(!k.verify(&[b"ranker", b"canary"], &bad));
        }
        assert!(!k.verify(&[b"ranker", b"canary"], &t[..15]));
    }

    #[test]
    fn derivation_is_stable() {
        // Proxies of different builds must agree on tags made from the same secret: this
        // pins the derivation and the message encoding.
        let k = Key::derive(SECRET, PURPOSE_EXPOSURE);
        let again = Key::derive(SECRET, PURPOSE_EXPOSURE);
        assert_eq!(k, again);
        assert_eq!(format!("{k:?}"), "Key(..)");
        assert_eq!(to_hex(&k.tag(&[b"x"])), "40edb1084a4b73d5254920a08b05683c");
    }

    #[test]
    fn the_prf_is_siphash_2_4_128() {
        // First 128-bit vector of the SipHash reference implementation: key 00..0f, empty
        // message.
        let tag = sip128(0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908, &[]);
        assert_eq!(to_hex(&tag), "a3817f04ba25a8e66df67214c7550293");
    }

    #[test]
    fn hex_round_trips() {
        let k = Key::derive(SECRET, PURPOSE_EXPOSURE);
        let t = k.tag(&[b"a"]);
        let h = to_hex(&t);
        assert_eq!(h.len(), 32);
        assert_eq!(from_hex(h.as_bytes()), Some(t));
        assert_eq!(from_hex(h.to_uppercase().as_bytes()), Some(t));
        assert_eq!(from_hex(&h.as_bytes()[1..]), None);
        assert_eq!(from_hex(b"zz000000000000000000000000000000"), None);
    }
}
