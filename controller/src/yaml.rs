//! Reading the YAML (or JSON) documents a user writes — rollout specs, guardrail files — into a
//! JSON value, once, before serde turns it into types.
//!
//! Two things are settled here, before `serde_yaml` sees the text:
//! - a UTF-8 byte-order mark (editors on some systems write one) is dropped, and a document
//!   with nothing in it is refused instead of read as "all defaults";
//! - nesting is bounded. libyaml's scanner walks its stack of possible keys, one entry per open
//!   flow collection, for every token, so deeply nested flow maps (`{a: {a: {a: ...`) cost time
//!   quadratic in the document (a 250 KB file took 11 s). `serde_yaml` would refuse the depth
//!   anyway, but only after the whole stream has been scanned. [`check_depth`] runs the same
//!   parser event by event and stops at the first collection past [`MAX_DEPTH`], so the scan
//!   never carries more than that many open collections and stays linear.

use std::mem::MaybeUninit;

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
}

/// The text without a leading byte-order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Reads one YAML (or JSON) document as a JSON value.
pub fn to_value(text: &str) -> Result<serde_json::Value, YamlError> {
    let text = strip_bom(text);
    check_depth(text)?;
    let value: serde_json::Value =
        serde_yaml::from_str(text).map_err(|e| YamlError::Syntax(e.to_string()))?;
    if value.is_null() && is_blank(text) {
        return Err(YamlError::Empty);
    }
    Ok(value)
}

/// Only whitespace and comments.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    })
}

/// Parses `text` event by event with libyaml and refuses it at the first collection nested
/// deeper than [`MAX_DEPTH`]. A syntax error is left for `serde_yaml` to report (same parser,
/// same message).
pub fn check_depth(text: &str) -> Result<(), YamlError> {
    // The parser keeps a pointer to itself once it has its input: it lives on the heap and
    // never moves.
    let mut storage: Box<MaybeUninit<unsafe_libyaml::yaml_parser_t>> =
        Box::new(MaybeUninit::uninit());
    let parser = storage.as_mut_ptr();
    // SAFETY: the calls follow libyaml's protocol, as serde_yaml's own loader does: initialize,
    // set the input (which outlives the parser: `text` is borrowed for this whole function),
    // parse events, delete each event after reading its type and mark, delete the parser.
    unsafe {
        if unsafe_libyaml::yaml_parser_initialize(parser).fail {
            return Err(YamlError::Syntax("out of memory".into()));
        }
        unsafe_libyaml::yaml_parser_set_encoding(parser, unsafe_libyaml::YAML_UTF8_ENCODING);
        unsafe_libyaml::yaml_parser_set_input_string(parser, text.as_ptr(), text.len() as u64);
        let mut depth = 0usize;
        let result = loop {
            let mut event = MaybeUninit::<unsafe_libyaml::yaml_event_t>::uninit();
            let event = event.as_mut_ptr();
            if unsafe_libyaml::yaml_parser_parse(parser, event).fail {
                break Ok(());
            }
            let kind = (*event).type_;
            let line = (*event).start_mark.line + 1;
            unsafe_libyaml::yaml_event_delete(event);
            match kind {
                unsafe_libyaml::YAML_SEQUENCE_START_EVENT
                | unsafe_libyaml::YAML_MAPPING_START_EVENT => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        break Err(YamlError::TooDeep { line });
                    }
                }
                unsafe_libyaml::YAML_SEQUENCE_END_EVENT
                | unsafe_libyaml::YAML_MAPPING_END_EVENT => {
                    depth = depth.saturating_sub(1);
                }
                unsafe_libyaml::YAML_STREAM_END_EVENT => break Ok(()),
                _ => {}
            }
        };
        unsafe_libyaml::yaml_parser_delete(parser);
        result
    }
}

#[cfg(test)]
mod tests;
