//! Sluice controller library.
pub mod admin;
pub mod rollout;
pub mod sink;
pub mod source;
pub mod spec;
