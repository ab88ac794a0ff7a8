//! Reading the YAML (or JSON) documents a user writes — rollout specs, guardrail files — into a
//! JSON value, once, before serde turns it into types.
//!
//! The parser is `serde-saphyr` (pure Rust, maintained; the Kubernetes client already brings
//! it in), set to read YAML 1.2 as the project always has: `yes`/`on` stay text, `0755` and
//! `1_000` stay text, a key given twice is an error. Settled here besides:
//! - a UTF-8 byte-order mark (editors on some systems write one) is dropped, and a document
//!   with nothing in it is refused instead of read as "all defaults";
//! - nesting is bounded ([`MAX_DEPTH`]), block and flow alike, by the parser's budget, which
//!   stops at the first collection past the bound: deeply nested flow maps (`{a: {a: ...`)
//!   are refused while the scan is still shallow, so their cost stays linear in the text;
//! - the parser's other budgets (events, nodes) are raised far above the default so that the
//!   largest specs the limits allow are read whole (the spec's own limits bound them).

/// The deepest nesting of collections (maps and lists, block or flow) a document may have:
/// serde's own limit, far above any spec (which nests about eight levels).
pub const MAX_DEPTH: usize = 128;

/// Why a document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YamlError {
    #[error("the document is empty")]
    Empty,
    #[error("nested deeper than {MAX_DEPTH} levels (line {line})")]
    TooDeep { line: u64 },
    #[error("not valid YAML: {0}")]
    Syntax(String),
    #[error("could not start a thread to read the document: {0}")]
    Thread(String),
}

/// The text without a leading byte-order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// The parser's options: YAML 1.2 scalars, duplicate keys refused, nesting at most
/// [`MAX_DEPTH`]. Also for the tests' reading of the shipped manifests.
pub fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    // The scanner's own bound on open flow collections, just above the depth bound: the
    // depth bound is met first and reported with its line.
    budget.flow_nesting_limit = MAX_DEPTH + 1;
    budget.max_events = 50_000_000;
    budget.max_nodes = 25_000_000;
    serde_saphyr::options! {
        budget: Some(budget),
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
    }
}

/// Reads one YAML (or JSON) document as a JSON value.
pub fn to_value(text: &str) -> Result<serde_json::Value, YamlError> {
    let text = strip_bom(text);
    if is_blank(text) {
        return Err(YamlError::Empty);
    }
    // The reader recurses once per level, some 20 KiB a level in a debug build: at the depth
    // bound that is more than the 2 MiB stack of a test or runtime thread, so it reads on a
    // thread of its own with room to spare (only the pages used are committed).
    let read = || {
        serde_saphyr::from_str_with_options::<serde_json::Value>(text, options()).map_err(|e| {
            match too_deep(&e) {
                Some(line) => YamlError::TooDeep { line },
                None => YamlError::Syntax(e.to_string()),
            }
        })
    };
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("yaml".into())
            .stack_size(READER_STACK)
            .spawn_scoped(scope, read)
            .map_err(|e| YamlError::Thread(e.to_string()))?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The stack of the thread that reads a document.
const READER_STACK: usize = 16 << 20;

/// The line where `e` says the nesting bound was passed: the depth budget, or the scanner's
/// bound on open flow collections when it runs ahead of the parser.
fn too_deep(e: &serde_saphyr::Error) -> Option<u64> {
    use serde_saphyr::granit_parser::ErrorKind;
    use serde_saphyr::{budget::BudgetBreach, Error, ExternalMessageSource};
    match e.without_snippet() {
        Error::Budget {
            breach: BudgetBreach::Depth { .. },
            location,
        } => Some(location.line()),
        Error::ExternalMessage {
            source, location, ..
        } => match source.as_ref() {
            ExternalMessageSource::Parser(scan)
                if matches!(scan.kind(), ErrorKind::RecursionLimitExceeded) =>
            {
                Some(location.line())
            }
            _ => None,
        },
        _ => None,
    }
}

/// Only whitespace and comments.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    })
}

#[cfg(test)]
mod tests;
