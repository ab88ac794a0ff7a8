//! Sluice controller library.
pub mod admin;
pub mod api;
pub mod cli;
pub mod daemon;
pub mod durable;
pub mod notify;
pub mod rollout;
pub mod sink;
pub mod source;
pub mod spec;
pub mod store;
