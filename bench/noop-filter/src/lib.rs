//! Placeholder; the benchmark helper fills this in.
