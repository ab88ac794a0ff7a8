//! Sluice controller library.
pub mod source;
pub mod admin;
pub mod sink;
