//! Validation of messages against their JSON Schema ([`Message::SCHEMA`])
//! before they are published.
//!
//! A schema document and the documents its `$ref`s lead to
//! ([`Message::SCHEMA_DEPENDENCIES`]) go into a `jsonschema` registry, each
//! under its `$id`; `$ref`s resolve among them and are never fetched. Ids are
//! root-relative (`/schemas/queue/v1/task.json#`), so they are placed below a
//! fixed base URI ([`SCHEMA_BASE_URI`]). A document whose `$schema` is not a
//! known draft (Taskcluster's own metaschema) is read as draft-06, which that
//! metaschema extends. Validators are compiled once per
//! [`Message::SCHEMA_ID`] and cached for the life of the process.
//!
//! [`validated_body`] serializes a message once, straight into the bytes to
//! publish, and validates those bytes in place (an index of the values that
//! `serde_json` wrote, built as it writes them), without a
//! `serde_json::Value` in between.

mod tape;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use jsonschema::{Draft, Registry};
use serde_json::Value;

use crate::binding::{Message, SchemaDocument};

/// Where root-relative schema ids are placed for `$ref` resolution (never fetched).
pub const SCHEMA_BASE_URI: &str = "https://schemas.taskcluster.invalid";

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

/// A schema's validators: for `serde_json::Value`s and for serialized [`tape::Document`]s.
struct Compiled {
    value: jsonschema::Validator,
    tape: jsonschema::Validator<tape::Tape>,
}

type Cache = Mutex<HashMap<&'static str, Arc<Compiled>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The compiled validator for a schema, compiling and caching it on first use.
fn validator(
    schema_id: &'static str,
    schema: &'static str,
    dependencies: &[SchemaDocument],
) -> Result<Arc<Compiled>, ValidationError> {
    // A poisoned lock only means another thread panicked while inserting;
    // the map itself is still consistent.
    if let Some(found) = cache()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(schema_id)
    {
        return Ok(Arc::clone(found));
    }
    // Compile outside the lock: compiling a large schema takes a while.
    let compiled =
        Arc::new(
            compile(schema_id, schema, dependencies).map_err(|kind| ValidationError {
                schema_id: schema_id.to_owned(),
                kind,
            })?,
        );
    let mut map = cache()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Ok(Arc::clone(map.entry(schema_id).or_insert(compiled)))
}

/// The absolute URI of a schema id (fragment dropped): root-relative and
/// relative ids go below [`SCHEMA_BASE_URI`]; absolute ones stay.
fn absolute_uri(id: &str) -> String {
    let path = id.split('#').next().unwrap_or_default();
    if path.contains("://") {
        path.to_owned()
    } else if path.starts_with('/') {
        format!("{SCHEMA_BASE_URI}{path}")
    } else {
        format!("{SCHEMA_BASE_URI}/{path}")
    }
}

/// The draft a document declares, or draft-06 for an unknown `$schema`.
fn draft_of(document: &Value) -> Draft {
    match Draft::default().detect(document) {
        Draft::Unknown => Draft::Draft6,
        known => known,
    }
}

fn parse(id: &str, text: &str) -> Result<Value, ValidationErrorKind> {
    serde_json::from_str(text)
        .map_err(|e| ValidationErrorKind::SchemaNotJson(format!("document `{id}`: {e}")))
}

/// Compiles the schema `schema_id` (a document, or a JSON pointer into one)
/// with `$ref`s resolved among `schema` and `dependencies` only.
fn compile(
    schema_id: &str,
    schema: &str,
    dependencies: &[SchemaDocument],
) -> Result<Compiled, ValidationErrorKind> {
    let root = parse(schema_id, schema)?;
    let draft = draft_of(&root);
    let mut resources = vec![(absolute_uri(schema_id), draft.create_resource(root))];
    for dependency in dependencies {
        let document = parse(dependency.id, dependency.text)?;
        resources.push((
            absolute_uri(dependency.id),
            draft_of(&document).create_resource(document),
        ));
    }
    let invalid = |e: &dyn fmt::Display| ValidationErrorKind::SchemaInvalid(e.to_string());
    let registry = Registry::new()
        // Taskcluster's metaschema is not fetched; the drafts are known.
        .retrieve_known_draft_meta_schemas(false)
        .extend(resources)
        .and_then(|builder| builder.prepare())
        .map_err(|e| invalid(&e))?;
    let fragment = schema_id.split_once('#').map_or("", |(_, pointer)| pointer);
    let entry = serde_json::json!({ "$ref": format!("{}#{fragment}", absolute_uri(schema_id)) });
    let value = jsonschema::options()
        .with_draft(draft)
        .with_registry(&registry)
        .offline()
        .build(&entry)
        .map_err(|e| invalid(&e))?;
    let tape = jsonschema::options_for::<tape::Tape>()
        .with_draft(draft)
        .with_registry(&registry)
        .offline()
        .build(&entry)
        .map_err(|e| invalid(&e))?;
    Ok(Compiled { value, tape })
}

/// Checks a JSON value against a self-contained schema given as JSON text,
/// identified by `schema_id` (the cache key: one id, one schema).
pub fn validate_value(
    schema_id: &'static str,
    schema: &'static str,
    value: &Value,
) -> Result<(), ValidationError> {
    validate_document(schema_id, schema, &[], value)
}

/// Checks a JSON value against the schema `schema_id`, whose document is
/// `schema`, resolving `$ref`s among it and `dependencies` (offline).
/// `schema_id` is the cache key: one id, one schema.
pub fn validate_document(
    schema_id: &'static str,
    schema: &'static str,
    dependencies: &[SchemaDocument],
    value: &Value,
) -> Result<(), ValidationError> {
    let validator = &validator(schema_id, schema, dependencies)?.value;
    // The quick check first: collecting errors costs several times more, and valid is the common case.
    if validator.is_valid(value) {
        return Ok(());
    }
    violations(schema_id, validator.iter_errors(value))
}

/// `Ok` when there are no errors, else every violation, in the validator's order.
fn violations<'i>(
    schema_id: &str,
    errors: impl Iterator<Item = jsonschema::ValidationError<'i>>,
) -> Result<(), ValidationError> {
    let violations: Vec<SchemaViolation> = errors
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
    let value = serde_json::to_value(message).map_err(serialize_error::<M>)?;
    validate_document(M::SCHEMA_ID, M::SCHEMA, M::SCHEMA_DEPENDENCIES, &value)?;
    Ok(value)
}

fn serialize_error<M: Message>(error: serde_json::Error) -> ValidationError {
    ValidationError {
        schema_id: M::SCHEMA_ID.to_owned(),
        kind: ValidationErrorKind::Serialize(error.to_string()),
    }
}

/// Serializes a message once into its JSON bytes (in a buffer of at least
/// `capacity` bytes) and checks those bytes against [`Message::SCHEMA`];
/// returns them, ready to send. The same check as [`validate`], with the
/// same errors, without building a `serde_json::Value`: the bytes are
/// validated in place. (A message holding what that in-place index cannot
/// represent exactly — an `f32`, a number beyond 64 bits, a raw JSON
/// fragment, a key written twice — takes the [`validate`] path instead.)
pub fn validated_body<M: Message>(
    message: &M,
    capacity: usize,
) -> Result<Vec<u8>, ValidationError> {
    let Some(document) =
        tape::Document::serialize(message, capacity).map_err(serialize_error::<M>)?
    else {
        let value = validate(message)?;
        let mut body = Vec::with_capacity(capacity);
        serde_json::to_writer(&mut body, &value).map_err(serialize_error::<M>)?;
        return Ok(body);
    };
    let validator = &validator(M::SCHEMA_ID, M::SCHEMA, M::SCHEMA_DEPENDENCIES)?.tape;
    if !validator.is_valid(document.root()) {
        violations(M::SCHEMA_ID, validator.iter_errors(document.root()))?;
    }
    Ok(document.into_bytes())
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

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct UnitStatus {
        #[serde(rename = "taskId")]
        task_id: String,
    }

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct UnitMessage {
        version: i64,
        status: UnitStatus,
        #[serde(flatten)]
        extra: std::collections::BTreeMap<String, Value>,
    }

    impl Message for UnitMessage {
        const SCHEMA_ID: &'static str = SCHEMA_ID;
        const SCHEMA: &'static str = SCHEMA;
    }

    fn unit(version: i64, task_id: &str, extra: Value) -> UnitMessage {
        UnitMessage {
            version,
            status: UnitStatus {
                task_id: task_id.to_owned(),
            },
            extra: serde_json::from_value(extra).unwrap(),
        }
    }

    /// The in-place check of the bytes agrees with the `Value` check: the
    /// same bytes for a valid message, the same violations for an invalid
    /// one, on the index and on the `Value` fallback (a repeated key).
    #[test]
    fn validated_body_checks_the_bytes_as_validate_checks_the_value() {
        let good = unit(1, "dSlITZ4yQgmvxxAi4A8fHQ", json!({}));
        assert_eq!(
            validated_body(&good, 0).unwrap(),
            serde_json::to_vec(&good).unwrap()
        );
        let bad = [
            unit(2, "short", json!({"extra": true})),
            unit(1, "short\n\"quoted\"", json!({})),
            unit(
                1,
                "dSlITZ4yQgmvxxAi4A8fHQ",
                json!({"z": [1.5, {"a": null}]}),
            ),
            // `version` twice: the Value path decides, as before.
            unit(1, "dSlITZ4yQgmvxxAi4A8fHQ", json!({"version": 3})),
        ];
        for message in bad {
            let by_value = validate(&message).unwrap_err();
            let by_bytes = validated_body(&message, 16).unwrap_err();
            let sorted = |error: &ValidationError| {
                let mut violations = error.violations().to_vec();
                violations.sort_by(|a, b| (&a.pointer, &a.message).cmp(&(&b.pointer, &b.message)));
                violations
            };
            assert!(!by_bytes.violations().is_empty(), "{message:?}");
            assert_eq!(sorted(&by_bytes), sorted(&by_value), "{message:?}");
            assert_eq!(by_bytes.schema_id, SCHEMA_ID);
        }
    }

    /// Documents by `$id` with `$ref`s between them (relative and
    /// root-relative) and Taskcluster's own `$schema`, resolved offline.
    #[test]
    fn refs_resolve_among_the_dependencies() {
        const ID: &str = "/schemas/test/v1/outer.json#";
        const OUTER: &str = r##"{
            "$schema": "/schemas/common/metaschema.json#",
            "$id": "/schemas/test/v1/outer.json#",
            "type": "object",
            "properties": {"status": {"$ref": "status.json#"}},
            "required": ["status"]
        }"##;
        const DEPENDENCIES: &[SchemaDocument] = &[
            SchemaDocument {
                id: "/schemas/test/v1/status.json#",
                text: r##"{
                    "$schema": "/schemas/common/metaschema.json#",
                    "$id": "/schemas/test/v1/status.json#",
                    "type": "object",
                    "properties": {"run": {"$ref": "/schemas/test/v1/run.json#/definitions/state"}},
                    "required": ["run"]
                }"##,
            },
            SchemaDocument {
                id: "/schemas/test/v1/run.json#",
                text: r##"{
                    "$schema": "/schemas/common/metaschema.json#",
                    "$id": "/schemas/test/v1/run.json#",
                    "definitions": {"state": {"enum": ["running", "done"]}}
                }"##,
            },
        ];
        let good = json!({"status": {"run": "done"}});
        validate_document(ID, OUTER, DEPENDENCIES, &good).unwrap();
        let bad = json!({"status": {"run": "sleeping"}});
        let err = validate_document(ID, OUTER, DEPENDENCIES, &bad).unwrap_err();
        let pointers: Vec<&str> = err
            .violations()
            .iter()
            .map(|v| v.pointer.as_str())
            .collect();
        assert_eq!(pointers, ["/status/run"], "{err}");

        // A missing dependency is an error (never a fetch).
        const ID2: &str = "/schemas/test/v1/outer-alone.json#";
        let err = validate_document(ID2, OUTER, &DEPENDENCIES[..1], &good).unwrap_err();
        assert!(
            matches!(err.kind, ValidationErrorKind::SchemaInvalid(_)),
            "{err:?}"
        );
        // A dependency that is not JSON is named.
        const ID3: &str = "/schemas/test/v1/outer-broken.json#";
        let broken = [SchemaDocument {
            id: "/schemas/test/v1/status.json#",
            text: "{oops",
        }];
        let err = validate_document(ID3, OUTER, &broken, &good).unwrap_err();
        assert!(
            err.to_string().contains("/schemas/test/v1/status.json#"),
            "{err}"
        );
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
