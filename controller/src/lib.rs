//! Sluice controller library.
