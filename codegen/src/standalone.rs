//! Self-contained message schemas (`Message::SCHEMA`): the message schema with
//! every `$ref` that leaves it copied into its `definitions` and rewritten to
//! point there, so a validator can compile it offline, without other files.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::error::{Error, pointer_push};
use crate::resolve::{KeywordValue, SchemaLoc, SchemaSet, keyword_value};

/// The draft Taskcluster's schemas are written in (their metaschema extends draft-06).
pub const DRAFT: &str = "http://json-schema.org/draft-06/schema#";

/// Builds the self-contained schema of the message schema at `message`.
pub fn self_contained(schemas: &SchemaSet, message: &SchemaLoc) -> Result<Value, Error> {
    let mut root = schemas
        .get(message)
        .cloned()
        .ok_or_else(|| Error::UnresolvedRef {
            at: schemas.location(message),
            reference: message.to_string(),
            reason: "no schema at this location".into(),
        })?;
    let existing: BTreeSet<String> = match root.get("definitions") {
        None => BTreeSet::new(),
        Some(Value::Object(definitions)) => definitions.keys().cloned().collect(),
        Some(_) => {
            return Err(Error::invalid(
                schemas.location(&message.child("definitions")),
                "`definitions` must be an object",
            ));
        }
    };
    let mut bundler = Bundler {
        schemas,
        message,
        keys: BTreeMap::new(),
        used_keys: existing,
        queue: VecDeque::new(),
    };
    bundler.rewrite(&mut root, message)?;
    let mut definitions = Map::new();
    while let Some((loc, key)) = bundler.queue.pop_front() {
        let mut copy = schemas.get(&loc).cloned().unwrap_or(Value::Null);
        if let Value::Object(map) = &mut copy {
            // Ids of other documents would change how the copy's refs resolve.
            map.remove("$id");
            map.remove("$schema");
        }
        bundler.rewrite(&mut copy, &loc)?;
        definitions.insert(key, copy);
    }
    if let Value::Object(map) = &mut root {
        map.remove("$id");
        map.insert("$schema".into(), Value::from(DRAFT));
        if !definitions.is_empty() {
            let target = map
                .entry("definitions")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(target) = target {
                target.extend(definitions);
            }
        }
    }
    Ok(root)
}

struct Bundler<'a> {
    schemas: &'a SchemaSet,
    message: &'a SchemaLoc,
    /// Definition key of every copied schema.
    keys: BTreeMap<SchemaLoc, String>,
    used_keys: BTreeSet<String>,
    queue: VecDeque<(SchemaLoc, String)>,
}

impl Bundler<'_> {
    /// Rewrites the `$ref`s of the schema `value`, which was copied from `from`.
    fn rewrite(&mut self, value: &mut Value, from: &SchemaLoc) -> Result<(), Error> {
        match value {
            Value::Object(map) => {
                if let Some(reference) = map.get("$ref") {
                    let at = self.schemas.location(&from.child("$ref"));
                    let Value::String(reference) = reference else {
                        return Err(Error::invalid(at, "$ref must be a string"));
                    };
                    let target = self.schemas.resolve(&from.uri, reference, &at)?;
                    map.insert("$ref".into(), Value::from(self.local_ref(target)));
                }
                for (key, child) in map.iter_mut() {
                    match keyword_value(key) {
                        // Rewritten above; data holds no references.
                        KeywordValue::Ref | KeywordValue::Data => {}
                        KeywordValue::SchemaMap => {
                            if let Value::Object(children) = child {
                                let container = from.child(key);
                                for (name, schema) in children.iter_mut() {
                                    self.rewrite(schema, &container.child(name))?;
                                }
                            }
                        }
                        KeywordValue::Schemas => self.rewrite(child, &from.child(key))?,
                    }
                }
            }
            Value::Array(items) => {
                for (index, item) in items.iter_mut().enumerate() {
                    self.rewrite(item, &from.child(&index.to_string()))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The `$ref` pointing at `target` inside the self-contained schema.
    fn local_ref(&mut self, target: SchemaLoc) -> String {
        // Inside the message schema itself: the same pointer, relative to it.
        if target.uri == self.message.uri
            && let Some(rest) = target.pointer.strip_prefix(&self.message.pointer)
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("#{rest}");
        }
        if let Some(key) = self.keys.get(&target) {
            return pointer_ref(key);
        }
        let base = definition_key(&target);
        let mut key = base.clone();
        let mut suffix = 2;
        while self.used_keys.contains(&key) {
            key = format!("{base}_{suffix}");
            suffix += 1;
        }
        self.used_keys.insert(key.clone());
        self.keys.insert(target.clone(), key.clone());
        self.queue.push_back((target, key.clone()));
        pointer_ref(&key)
    }
}

fn pointer_ref(key: &str) -> String {
    format!("#{}", pointer_push("/definitions", key))
}

/// A readable key using only characters that need no escaping in a pointer
/// or URI fragment: `/schemas/queue/v1/task.json#/properties/tags` →
/// `queue.v1.task.json.properties.tags`.
fn definition_key(loc: &SchemaLoc) -> String {
    let uri = loc.uri.strip_prefix("/schemas/").unwrap_or(&loc.uri);
    let text = format!("{uri}{}", loc.pointer);
    let key: String = text
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '.'
            }
        })
        .collect();
    if key.is_empty() { "schema".into() } else { key }
}

/// JSON with object keys sorted and two-space indentation, independent of
/// serde_json's map ordering features.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(value, 0, &mut out);
    out
}

fn write_value(value: &Value, indent: usize, out: &mut String) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push_str("{\n");
            for (index, key) in keys.iter().enumerate() {
                push_indent(indent + 1, out);
                out.push_str(&Value::from(key.as_str()).to_string());
                out.push_str(": ");
                write_value(&map[*key], indent + 1, out);
                if index + 1 < keys.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            push_indent(indent, out);
            out.push('}');
        }
        Value::Array(items) if !items.is_empty() => {
            out.push_str("[\n");
            for (index, item) in items.iter().enumerate() {
                push_indent(indent + 1, out);
                write_value(item, indent + 1, out);
                if index + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            push_indent(indent, out);
            out.push(']');
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

fn push_indent(level: usize, out: &mut String) {
    for _ in 0..level {
        out.push_str("  ");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(docs: &[(&str, Value)]) -> SchemaSet {
        crate::resolve::schema_set(docs, str::to_owned)
    }

    #[test]
    fn inlines_cross_file_refs_into_definitions() {
        let schemas = set(&[
            (
                "/schemas/q/v1/m.json",
                json!({
                    "$id": "/schemas/q/v1/m.json#",
                    "$schema": "/schemas/common/metaschema.json#",
                    "type": "object",
                    "properties": {
                        "status": {"$ref": "status.json#"},
                        "again": {"$ref": "status.json"},
                        "local": {"$ref": "#/definitions/x"},
                        "default": {"type": "string", "default": {"$ref": "not a ref"}}
                    },
                    "definitions": {"x": {"type": "string"}}
                }),
            ),
            (
                "/schemas/q/v1/status.json",
                json!({
                    "$id": "/schemas/q/v1/status.json#",
                    "type": "object",
                    "properties": {"p": {"$ref": "task.json#/properties/p"}, "self": {"$ref": "#"}}
                }),
            ),
            (
                "/schemas/q/v1/task.json",
                json!({"properties": {"p": {"type": "string"}}}),
            ),
        ]);
        let schema = self_contained(&schemas, &SchemaLoc::root("/schemas/q/v1/m.json")).unwrap();
        assert_eq!(schema["$schema"], DRAFT);
        assert!(schema.get("$id").is_none());
        let properties = &schema["properties"];
        assert_eq!(
            properties["status"]["$ref"],
            "#/definitions/q.v1.status.json"
        );
        assert_eq!(
            properties["again"]["$ref"],
            "#/definitions/q.v1.status.json"
        );
        assert_eq!(properties["local"]["$ref"], "#/definitions/x");
        assert_eq!(properties["default"]["default"]["$ref"], "not a ref");
        let status = &schema["definitions"]["q.v1.status.json"];
        assert!(status.get("$id").is_none());
        assert_eq!(
            status["properties"]["p"]["$ref"],
            "#/definitions/q.v1.task.json.properties.p"
        );
        // A recursive ref inside a copied document points at its copy.
        assert_eq!(
            status["properties"]["self"]["$ref"],
            "#/definitions/q.v1.status.json"
        );
        assert_eq!(
            schema["definitions"]["q.v1.task.json.properties.p"],
            json!({"type": "string"})
        );
        assert_eq!(schema["definitions"]["x"], json!({"type": "string"}));
    }

    #[test]
    fn keys_avoid_existing_definitions() {
        let schemas = set(&[
            (
                "/schemas/q/v1/m.json",
                json!({"properties": {"a": {"$ref": "b.json#"}}, "definitions": {"q.v1.b.json": {}}}),
            ),
            ("/schemas/q/v1/b.json", json!({"type": "integer"})),
        ]);
        let schema = self_contained(&schemas, &SchemaLoc::root("/schemas/q/v1/m.json")).unwrap();
        assert_eq!(
            schema["properties"]["a"]["$ref"],
            "#/definitions/q.v1.b.json_2"
        );
        assert_eq!(
            schema["definitions"]["q.v1.b.json_2"],
            json!({"type": "integer"})
        );
    }

    #[test]
    fn missing_target_is_an_error_naming_the_ref() {
        let schemas = set(&[(
            "/schemas/q/v1/m.json",
            json!({"properties": {"a": {"$ref": "gone.json#"}}}),
        )]);
        let err = self_contained(&schemas, &SchemaLoc::root("/schemas/q/v1/m.json")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/schemas/q/v1/m.json#/properties/a/$ref: cannot resolve")
        );
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let value = json!({"b": [1, {"d": null, "c": "x"}], "a": {}, "e": []});
        assert_eq!(
            canonical_json(&value),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    {\n      \"c\": \"x\",\n      \"d\": null\n    }\n  ],\n  \"e\": []\n}"
        );
    }
}
