//! Validation of messages against their JSON Schema ([`Message::SCHEMA`])
//! before they are published.
//!
//! Schemas are compiled once per [`Message::SCHEMA_ID`] and cached for the
//! life of the process. Remote `$ref`s are never fetched: a schema must be
//! self-contained, as generated schemas are.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

use crate::binding::Message;

/// One way a message breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaViolation {
    /// JSON pointer to the offending value in the message (`""` is the whole message,
    /// `/status/runs/0/state` a nested one).
    pub pointer: String,
    /// What is wrong, as the validator words it.
    pub message: String,
}

impl fmt::Display for SchemaViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pointer = if self.pointer.is_empty() {
            "(root)"
        } else {
            &self.pointer
        };
        write!(f, "{pointer}: {}", self.message)
    }
}

/// A message that could not be validated, or that breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The `$id` of the schema ([`Message::SCHEMA_ID`]).
    pub schema_id: String,
    /// What went wrong.
    pub kind: ValidationErrorKind,
}

/// The specific fault behind a [`ValidationError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidationErrorKind {
    /// The message breaks its schema; every violation found, in the validator's order.
    Invalid(Vec<SchemaViolation>),
    /// The schema text is not JSON.
    SchemaNotJson(String),
    /// The schema is JSON but not a usable schema (e.g. an unresolvable `$ref`).
    SchemaInvalid(String),
    /// The message could not be turned into JSON.
    Serialize(String),
}

impl ValidationError {
    /// The violations, when the message breaks its schema; empty otherwise.
    pub fn violations(&self) -> &[SchemaViolation] {
        match &self.kind {
            ValidationErrorKind::Invalid(violations) => violations,
            _ => &[],
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = &self.schema_id;
        match &self.kind {
            ValidationErrorKind::Invalid(violations) => {
                write!(
                    f,
                    "message does not match schema `{id}` ({} violation{}):",
                    violations.len(),
                    if violations.len() == 1 { "" } else { "s" }
                )?;
                for violation in violations {
                    write!(f, "\n  - {violation}")?;
                }
                Ok(())
            }
            ValidationErrorKind::SchemaNotJson(reason) => {
                write!(f, "schema `{id}` is not valid JSON: {reason}")
            }
            ValidationErrorKind::SchemaInvalid(reason) => {
                write!(f, "schema `{id}` cannot be compiled: {reason}")
            }
            ValidationErrorKind::Serialize(reason) => {
                write!(
                    f,
                    "message for schema `{id}` cannot be serialized: {reason}"
                )
            }
        }
    }
}

impl std::error::Error for ValidationError {}

type Cache = Mutex<HashMap<&'static str, Arc<jsonschema::Validator>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The compiled validator for a schema, compiling and caching it on first use.
fn validator(
    schema_id: &'static str,
    schema: &'static str,
) -> Result<Arc<jsonschema::Validator>, ValidationError> {
    // A poisoned lock only means another thread panicked while inserting;
    // the map itself is still consistent.
    if let Some(found) = cache()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(schema_id)
    {
        return Ok(Arc::clone(found));
    }
    let error = |kind| ValidationError {
        schema_id: schema_id.to_owned(),
        kind,
    };
    // Compile outside the lock: compiling a large schema takes a while.
    let json: Value = serde_json::from_str(schema)
        .map_err(|e| error(ValidationErrorKind::SchemaNotJson(e.to_string())))?;
    let compiled = jsonschema::validator_for(&json)
        .map_err(|e| error(ValidationErrorKind::SchemaInvalid(e.to_string())))?;
    let compiled = Arc::new(compiled);
    let mut map = cache()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Ok(Arc::clone(map.entry(schema_id).or_insert(compiled)))
}

/// Checks a JSON value against a schema given as JSON text, identified by
/// `schema_id` (the cache key: one id, one schema).
pub fn validate_value(
    schema_id: &'static str,
    schema: &'static str,
    value: &Value,
) -> Result<(), ValidationError> {
    let validator = validator(schema_id, schema)?;
    let violations: Vec<SchemaViolation> = validator
        .iter_errors(value)
        .map(|error| SchemaViolation {
            pointer: error.instance_path().as_str().to_owned(),
            message: error.to_string(),
        })
        .collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(ValidationError {
            schema_id: schema_id.to_owned(),
            kind: ValidationErrorKind::Invalid(violations),
        })
    }
}

/// Serializes a message and checks it against [`Message::SCHEMA`]; returns
/// its JSON value, ready to send.
pub fn validate<M: Message>(message: &M) -> Result<Value, ValidationError> {
    let value = serde_json::to_value(message).map_err(|e| ValidationError {
        schema_id: M::SCHEMA_ID.to_owned(),
        kind: ValidationErrorKind::Serialize(e.to_string()),
    })?;
    validate_value(M::SCHEMA_ID, M::SCHEMA, &value)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SCHEMA_ID: &str = "/schemas/test/v1/validate-unit.json#";
    const SCHEMA: &str = r##"{
        "$schema": "http://json-schema.org/draft-06/schema#",
        "$id": "/schemas/test/v1/validate-unit.json#",
        "type": "object",
        "properties": {
            "version": {"enum": [1]},
            "status": {"$ref": "#/definitions/status"}
        },
        "required": ["version", "status"],
        "additionalProperties": false,
        "definitions": {
            "status": {
                "type": "object",
                "properties": {"taskId": {"type": "string", "pattern": "^[A-Za-z0-9_-]{22}$"}},
                "required": ["taskId"]
            }
        }
    }"##;

    #[test]
    fn valid_value_passes() {
        let value = json!({"version": 1, "status": {"taskId": "dSlITZ4yQgmvxxAi4A8fHQ"}});
        validate_value(SCHEMA_ID, SCHEMA, &value).unwrap();
    }

    #[test]
    fn every_violation_is_listed_with_its_pointer() {
        let value = json!({"version": 2, "status": {"taskId": "short"}, "extra": true});
        let err = validate_value(SCHEMA_ID, SCHEMA, &value).unwrap_err();
        let pointers: Vec<&str> = err
            .violations()
            .iter()
            .map(|v| v.pointer.as_str())
            .collect();
        assert!(pointers.contains(&"/version"), "{err}");
        assert!(pointers.contains(&"/status/taskId"), "{err}");
        assert!(
            pointers.contains(&""),
            "additionalProperties at the root: {err}"
        );
        let text = err.to_string();
        assert!(text.contains(SCHEMA_ID), "{text}");
        assert!(text.contains("/status/taskId"), "{text}");
    }

    #[test]
    fn broken_schema_is_reported_with_its_id() {
        const ID: &str = "/schemas/test/v1/broken.json#";
        let err = validate_value(ID, "{not json", &json!({})).unwrap_err();
        assert!(matches!(err.kind, ValidationErrorKind::SchemaNotJson(_)));
        assert!(err.to_string().contains(ID));

        const ID2: &str = "/schemas/test/v1/dangling-ref.json#";
        let err =
            validate_value(ID2, r##"{"$ref": "#/definitions/missing"}"##, &json!({})).unwrap_err();
        assert!(
            matches!(err.kind, ValidationErrorKind::SchemaInvalid(_)),
            "{err:?}"
        );
    }
}
