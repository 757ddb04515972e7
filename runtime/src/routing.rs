//! Routing keys of Taskcluster-style topic exchanges.
//!
//! An exchange reference describes its routing key as an ordered list of
//! words ([`RoutingKeyWord`]). From the values a binding struct holds, this
//! module builds the *pattern* a consumer binds with, the *concrete key* a
//! publisher sends with, and parses a concrete key from a delivery back into
//! values. Generated binding structs only supply their values; every rule
//! lives here.

use std::fmt;

/// The longest routing key AMQP 0-9-1 allows (a `shortstr`), in bytes.
pub const MAX_ROUTING_KEY_LEN: usize = 255;

/// The word a publisher sends for an optional routing-key entry that has no
/// value, as the Taskcluster services do.
pub const ABSENT_WORD: &str = "_";

/// One entry of an exchange's routing key, as described in its reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoutingKeyWord {
    /// Identifier of the entry in the reference (`taskId`).
    pub name: &'static str,
    /// Fixed value of the entry (`primary`), if it is a constant.
    pub constant: Option<&'static str>,
    /// Whether the value may contain dots, i.e. span several AMQP words
    /// (bound with `#` rather than `*`).
    pub multiple_words: bool,
    /// Whether the entry always has a value; optional entries are sent as `_`.
    pub required: bool,
}

/// Why a routing key or pattern could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKeyError {
    /// Full name of the exchange the key belongs to.
    pub exchange: String,
    /// What is wrong.
    pub kind: RoutingKeyErrorKind,
}

/// The specific fault behind a [`RoutingKeyError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutingKeyErrorKind {
    /// A single-word entry was given a value containing `.`.
    DotInSingleWord {
        /// Entry name.
        word: &'static str,
        /// The offending value.
        value: String,
    },
    /// An entry was given the empty string, which would be an ambiguous empty word.
    EmptyValue {
        /// Entry name.
        word: &'static str,
    },
    /// A required entry has no value when building a concrete key.
    MissingRequired {
        /// Entry name.
        word: &'static str,
    },
    /// A concrete key may not contain the wildcards `*` or `#` as words.
    WildcardInKey {
        /// Entry name.
        word: &'static str,
        /// The offending value.
        value: String,
    },
    /// The concrete key is longer than AMQP allows.
    TooLong {
        /// Length of the key in bytes.
        len: usize,
    },
    /// A parsed key has a different number of words than the reference describes.
    WordCount {
        /// The key being parsed.
        key: String,
        /// Words in the key.
        found: usize,
        /// Words the reference describes (a minimum when a multi-word entry exists).
        expected: usize,
    },
    /// A parsed key has another value where the reference fixes a constant.
    ConstantMismatch {
        /// Entry name.
        word: &'static str,
        /// The constant the reference fixes.
        expected: &'static str,
        /// The word found in the key.
        found: String,
    },
    /// The reference has more than one multi-word entry, so a key cannot be split unambiguously.
    AmbiguousReference,
    /// A binding was given a different number of values than its reference has entries.
    ValueCount {
        /// Values given.
        found: usize,
        /// Entries in the reference.
        expected: usize,
    },
}

impl fmt::Display for RoutingKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exchange = &self.exchange;
        match &self.kind {
            RoutingKeyErrorKind::DotInSingleWord { word, value } => write!(
                f,
                "exchange `{exchange}`: routing-key entry `{word}` is a single word but its value `{value}` contains `.`"
            ),
            RoutingKeyErrorKind::EmptyValue { word } => write!(
                f,
                "exchange `{exchange}`: routing-key entry `{word}` was given an empty value (use `None` to leave it unset)"
            ),
            RoutingKeyErrorKind::MissingRequired { word } => write!(
                f,
                "exchange `{exchange}`: routing-key entry `{word}` is required to publish but has no value"
            ),
            RoutingKeyErrorKind::WildcardInKey { word, value } => write!(
                f,
                "exchange `{exchange}`: routing-key entry `{word}` has the wildcard value `{value}`, which a concrete key cannot carry"
            ),
            RoutingKeyErrorKind::TooLong { len } => write!(
                f,
                "exchange `{exchange}`: routing key is {len} bytes, more than the {MAX_ROUTING_KEY_LEN} AMQP allows"
            ),
            RoutingKeyErrorKind::WordCount {
                key,
                found,
                expected,
            } => write!(
                f,
                "exchange `{exchange}`: routing key `{key}` has {found} words, the reference describes {expected}"
            ),
            RoutingKeyErrorKind::ConstantMismatch {
                word,
                expected,
                found,
            } => write!(
                f,
                "exchange `{exchange}`: routing-key entry `{word}` must be `{expected}`, found `{found}`"
            ),
            RoutingKeyErrorKind::AmbiguousReference => write!(
                f,
                "exchange `{exchange}`: the routing-key reference has more than one multi-word entry, keys cannot be parsed"
            ),
            RoutingKeyErrorKind::ValueCount { found, expected } => write!(
                f,
                "exchange `{exchange}`: {found} routing-key values given, the reference has {expected} entries"
            ),
        }
    }
}

impl std::error::Error for RoutingKeyError {}

fn error(exchange: &str, kind: RoutingKeyErrorKind) -> RoutingKeyError {
    RoutingKeyError {
        exchange: exchange.to_owned(),
        kind,
    }
}

fn check_len(
    exchange: &str,
    words: &[RoutingKeyWord],
    values: &[Option<&str>],
) -> Result<(), RoutingKeyError> {
    if words.len() == values.len() {
        Ok(())
    } else {
        Err(error(
            exchange,
            RoutingKeyErrorKind::ValueCount {
                found: values.len(),
                expected: words.len(),
            },
        ))
    }
}

fn check_value(exchange: &str, word: &RoutingKeyWord, value: &str) -> Result<(), RoutingKeyError> {
    if value.is_empty() {
        return Err(error(
            exchange,
            RoutingKeyErrorKind::EmptyValue { word: word.name },
        ));
    }
    if !word.multiple_words && value.contains('.') {
        return Err(error(
            exchange,
            RoutingKeyErrorKind::DotInSingleWord {
                word: word.name,
                value: value.to_owned(),
            },
        ));
    }
    Ok(())
}

/// Builds the pattern to bind a queue with: constants filled in, given values
/// as they are, unset single-word entries as `*`, unset multi-word entries as `#`.
pub fn binding_pattern(
    exchange: &str,
    words: &[RoutingKeyWord],
    values: &[Option<&str>],
) -> Result<String, RoutingKeyError> {
    check_len(exchange, words, values)?;
    let mut pattern = String::new();
    for (word, value) in words.iter().zip(values) {
        if !pattern.is_empty() {
            pattern.push('.');
        }
        match (word.constant, value) {
            (Some(constant), _) => pattern.push_str(constant),
            (None, Some(value)) => {
                check_value(exchange, word, value)?;
                pattern.push_str(value);
            }
            (None, None) if word.multiple_words => pattern.push('#'),
            (None, None) => pattern.push('*'),
        }
    }
    Ok(pattern)
}

/// Builds the concrete routing key a message is published with: constants
/// filled in, optional entries without a value as `_`; a required entry
/// without a value, a wildcard, or a key over 255 bytes is an error.
pub fn concrete_key(
    exchange: &str,
    words: &[RoutingKeyWord],
    values: &[Option<&str>],
) -> Result<String, RoutingKeyError> {
    check_len(exchange, words, values)?;
    // One allocation: every value (or `_`, or a constant) and the dots between them.
    let room = words
        .iter()
        .zip(values)
        .map(|(word, value)| word.constant.or(*value).map_or(1, str::len) + 1)
        .sum();
    let mut key = String::with_capacity(room);
    for (word, value) in words.iter().zip(values) {
        if !key.is_empty() {
            key.push('.');
        }
        match (word.constant, value) {
            (Some(constant), _) => key.push_str(constant),
            (None, Some(value)) => {
                check_value(exchange, word, value)?;
                if value.split('.').any(|w| w == "*" || w == "#") {
                    return Err(error(
                        exchange,
                        RoutingKeyErrorKind::WildcardInKey {
                            word: word.name,
                            value: (*value).to_owned(),
                        },
                    ));
                }
                key.push_str(value);
            }
            (None, None) if word.required => {
                return Err(error(
                    exchange,
                    RoutingKeyErrorKind::MissingRequired { word: word.name },
                ));
            }
            (None, None) => key.push_str(ABSENT_WORD),
        }
    }
    if key.len() > MAX_ROUTING_KEY_LEN {
        return Err(error(
            exchange,
            RoutingKeyErrorKind::TooLong { len: key.len() },
        ));
    }
    Ok(key)
}

/// Parses a concrete routing key into one value per entry (constants and
/// absent optional entries, `_`, give `None`). A multi-word entry takes every
/// word the other entries leave, possibly none.
pub fn parse_key(
    exchange: &str,
    words: &[RoutingKeyWord],
    key: &str,
) -> Result<Vec<Option<String>>, RoutingKeyError> {
    let parts: Vec<&str> = key.split('.').collect();
    let multi = words.iter().filter(|w| w.multiple_words).count();
    if multi > 1 {
        return Err(error(exchange, RoutingKeyErrorKind::AmbiguousReference));
    }
    let fixed = words.len() - multi;
    let count_ok = if multi == 0 {
        parts.len() == fixed
    } else {
        parts.len() >= fixed
    };
    if !count_ok {
        return Err(error(
            exchange,
            RoutingKeyErrorKind::WordCount {
                key: key.to_owned(),
                found: parts.len(),
                expected: fixed,
            },
        ));
    }
    let spare = parts.len() - fixed;
    let mut values = Vec::with_capacity(words.len());
    // Each entry's value is a run of the key's words: a slice of the key, copied only when kept.
    let mut rest = parts.as_slice();
    let mut start = 0;
    for word in words {
        let take = if word.multiple_words { spare } else { 1 };
        let (mine, tail) = rest.split_at(take);
        rest = tail;
        let len = mine.iter().map(|part| part.len()).sum::<usize>() + take.saturating_sub(1);
        let value = key.get(start..start + len).unwrap_or_default();
        start += len + usize::from(take > 0);
        if let Some(constant) = word.constant {
            if value != constant {
                return Err(error(
                    exchange,
                    RoutingKeyErrorKind::ConstantMismatch {
                        word: word.name,
                        expected: constant,
                        found: value.to_owned(),
                    },
                ));
            }
            values.push(None);
        } else if value.is_empty() || (value == ABSENT_WORD && !word.required) {
            values.push(None);
        } else {
            values.push(Some(value.to_owned()));
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EX: &str = "exchange/taskcluster-queue/v1/task-completed";

    fn word(name: &'static str, required: bool) -> RoutingKeyWord {
        RoutingKeyWord {
            name,
            constant: None,
            multiple_words: false,
            required,
        }
    }

    fn queue_words() -> Vec<RoutingKeyWord> {
        let mut words = vec![RoutingKeyWord {
            name: "routingKeyKind",
            constant: Some("primary"),
            multiple_words: false,
            required: true,
        }];
        words.push(word("taskId", true));
        for name in ["runId", "workerGroup", "workerId"] {
            words.push(word(name, false));
        }
        for name in ["provisionerId", "workerType", "schedulerId", "taskGroupId"] {
            words.push(word(name, true));
        }
        words.push(RoutingKeyWord {
            name: "reserved",
            constant: None,
            multiple_words: true,
            required: false,
        });
        words
    }

    #[test]
    fn pattern_fills_constants_and_wildcards() {
        let words = queue_words();
        let mut values = vec![None; words.len()];
        values[8] = Some("abc");
        assert_eq!(
            binding_pattern(EX, &words, &values).unwrap(),
            "primary.*.*.*.*.*.*.*.abc.#"
        );
    }

    #[test]
    fn pattern_rejects_dot_in_single_word() {
        let words = queue_words();
        let mut values = vec![None; words.len()];
        values[1] = Some("a.b");
        let err = binding_pattern(EX, &words, &values).unwrap_err();
        assert!(matches!(
            err.kind,
            RoutingKeyErrorKind::DotInSingleWord { word: "taskId", .. }
        ));
        assert!(err.to_string().contains(EX));
    }

    #[test]
    fn concrete_key_uses_underscore_and_requires_required() {
        let words = queue_words();
        let mut values = vec![None; words.len()];
        for (i, v) in [(1, "t"), (5, "p"), (6, "w"), (7, "s"), (8, "g")] {
            values[i] = Some(v);
        }
        assert_eq!(
            concrete_key(EX, &words, &values).unwrap(),
            "primary.t._._._.p.w.s.g._"
        );
        values[6] = None;
        let err = concrete_key(EX, &words, &values).unwrap_err();
        assert_eq!(
            err.kind,
            RoutingKeyErrorKind::MissingRequired { word: "workerType" }
        );
    }

    #[test]
    fn concrete_key_limits_length_and_wildcards() {
        let words = queue_words();
        let long = "x".repeat(250);
        let mut values = vec![Some("a"); words.len()];
        values[1] = Some(&long);
        assert!(matches!(
            concrete_key(EX, &words, &values).unwrap_err().kind,
            RoutingKeyErrorKind::TooLong { .. }
        ));
        values[1] = Some("*");
        assert!(matches!(
            concrete_key(EX, &words, &values).unwrap_err().kind,
            RoutingKeyErrorKind::WildcardInKey { .. }
        ));
    }

    #[test]
    fn parse_round_trips_and_checks() {
        let words = queue_words();
        let parsed = parse_key(EX, &words, "primary.t._._._.p.w.s.g.x.y").unwrap();
        assert_eq!(parsed[0], None);
        assert_eq!(parsed[1].as_deref(), Some("t"));
        assert_eq!(parsed[2], None);
        assert_eq!(parsed[9].as_deref(), Some("x.y"));
        let zero_reserved = parse_key(EX, &words, "primary.t._._._.p.w.s.g").unwrap();
        assert_eq!(zero_reserved[9], None);
        assert!(matches!(
            parse_key(EX, &words, "route.t._._._.p.w.s.g._")
                .unwrap_err()
                .kind,
            RoutingKeyErrorKind::ConstantMismatch { .. }
        ));
        assert!(matches!(
            parse_key(EX, &words, "primary.t").unwrap_err().kind,
            RoutingKeyErrorKind::WordCount { .. }
        ));
    }
}
