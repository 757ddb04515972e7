//! The generator's error: what went wrong and where (file and JSON pointer).

use std::fmt;

/// Where in the input an error was found: a file and a JSON pointer into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, as named in the sources (`references/queue/v1/exchanges.json`).
    pub file: String,
    /// JSON pointer into the file (`/entries/3/routingKey/0`); empty for the whole file.
    pub pointer: String,
}

impl Location {
    /// A location in `file` at `pointer`.
    pub fn new(file: impl Into<String>, pointer: impl Into<String>) -> Self {
        Location {
            file: file.into(),
            pointer: pointer.into(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.file, self.pointer)
    }
}

/// A generation failure. Its `Display` starts with the file and JSON pointer at
/// fault, e.g. `references/queue/v1/exchanges.json#/entries/3/routingKey/0: missing "name"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("{path}: cannot read: {reason}")]
    Io {
        /// The path that could not be read.
        path: String,
        /// The operating system's reason.
        reason: String,
    },
    /// A file is not well-formed JSON.
    #[error("{file}:{line}:{column}: malformed JSON: {reason}")]
    MalformedJson {
        /// The file.
        file: String,
        /// 1-based line of the fault.
        line: usize,
        /// 1-based column of the fault.
        column: usize,
        /// The parser's message.
        reason: String,
    },
    /// A reference or bundle lacks a required field.
    #[error("{at}: missing {field:?}")]
    MissingField {
        /// The object lacking the field.
        at: Location,
        /// The field's name.
        field: String,
    },
    /// A value has the wrong JSON type or an invalid value.
    #[error("{at}: {reason}")]
    Invalid {
        /// The offending value.
        at: Location,
        /// What is wrong with it.
        reason: String,
    },
    /// A `$ref` (or an entry's `schema`) names a schema or pointer that does not exist.
    #[error("{at}: cannot resolve {reference:?}: {reason}")]
    UnresolvedRef {
        /// The `$ref` (or `schema`) value's location.
        at: Location,
        /// The reference as written.
        reference: String,
        /// The missing target, e.g. `no schema with $id /schemas/queue/v1/nope.json`.
        reason: String,
    },
    /// A schema uses a construct the generator cannot express as Rust types.
    #[error("{at}: unsupported schema construct: {reason}")]
    Unsupported {
        /// The schema (or keyword) at fault.
        at: Location,
        /// What is not supported.
        reason: String,
    },
    /// Two things would get the same Rust name and cannot be told apart.
    #[error("{at}: name collision: {reason}")]
    NameCollision {
        /// One of the colliding items.
        at: Location,
        /// What collides with what.
        reason: String,
    },
    /// The generated Rust code failed to parse; a bug in the generator.
    #[error("internal error: generated code for {file} does not parse: {reason}")]
    Internal {
        /// The output file being generated.
        file: String,
        /// The parser's message.
        reason: String,
    },
}

impl Error {
    /// The input location the error points at, when it has one.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Error::MissingField { at, .. }
            | Error::Invalid { at, .. }
            | Error::UnresolvedRef { at, .. }
            | Error::Unsupported { at, .. }
            | Error::NameCollision { at, .. } => Some(at),
            Error::Io { .. } | Error::MalformedJson { .. } | Error::Internal { .. } => None,
        }
    }

    pub(crate) fn invalid(at: Location, reason: impl Into<String>) -> Self {
        Error::Invalid {
            at,
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(at: Location, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            at,
            reason: reason.into(),
        }
    }

    /// A [`Error::MalformedJson`] for `file` from serde_json's parse error.
    pub fn malformed_json(file: &str, source: &serde_json::Error) -> Self {
        Error::MalformedJson {
            file: file.to_owned(),
            line: source.line(),
            column: source.column(),
            // serde_json appends " at line L column C", which the variant carries already.
            reason: match source.to_string().rsplit_once(" at line ") {
                Some((reason, _)) => reason.to_owned(),
                None => source.to_string(),
            },
        }
    }
}

/// Escapes one JSON-pointer reference token (`~` → `~0`, `/` → `~1`).
pub(crate) fn escape_pointer_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Appends a token to a JSON pointer.
pub(crate) fn pointer_push(pointer: &str, token: &str) -> String {
    format!("{pointer}/{}", escape_pointer_token(token))
}
