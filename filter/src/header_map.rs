//! Header maps as proxy-wasm's host serialises them (`get_header_map_pairs`): a little-endian
//! u32 count, then each pair's name and value lengths as u32s, then each name and value
//! followed by a NUL. The shim reads a whole map in one host call and looks headers up here,
//! in place and without allocating; a malformed map reads as ending early, never out of bounds.

/// The first value of `name` in a serialised header map; `None` if absent or if the map is
/// malformed before it.
pub fn find_pair<'a>(map: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    Pairs::new(map).find(|(n, _)| *n == name).map(|(_, v)| v)
}

/// The pairs of a serialised header map, borrowed from it; stops at the first malformed pair.
pub struct Pairs<'a> {
    map: &'a [u8],
    /// Pairs left to read.
    left: usize,
    /// Offset of the next pair's lengths.
    sizes: usize,
    /// Offset of the next pair's name.
    data: usize,
}

impl<'a> Pairs<'a> {
    pub fn new(map: &'a [u8]) -> Pairs<'a> {
        let count = u32_at(map, 0).unwrap_or(0);
        let data = count
            .checked_mul(8)
            .and_then(|s| s.checked_add(4))
            .unwrap_or(usize::MAX);
        Pairs {
            map,
            left: if data <= map.len() { count } else { 0 },
            sizes: 4,
            data,
        }
    }
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let pair = (|| {
            let name_len = u32_at(self.map, self.sizes)?;
            let value_len = u32_at(self.map, self.sizes.checked_add(4)?)?;
            let name_end = self.data.checked_add(name_len)?;
            let value_start = name_end.checked_add(1)?;
            let value_end = value_start.checked_add(value_len)?;
            let name = self.map.get(self.data..name_end)?;
            let value = self.map.get(value_start..value_end)?;
            Some((name, value, value_end.checked_add(1)?))
        })();
        match pair {
            Some((name, value, next)) => {
                self.left -= 1;
                self.sizes += 8;
                self.data = next;
                Some((name, value))
            }
            None => {
                self.left = 0;
                None
            }
        }
    }
}

fn u32_at(map: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = map.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(bytes)).ok()
}

/// Serialises `pairs` as the host does (the inverse of [`Pairs`]), for tests.
#[cfg(test)]
pub fn serialise<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&len(pairs.len()));
    for (n, v) in pairs {
        out.extend_from_slice(&len(n.as_ref().len()));
        out.extend_from_slice(&len(v.as_ref().len()));
    }
    for (n, v) in pairs {
        out.extend_from_slice(n.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests;
