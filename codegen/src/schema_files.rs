//! The message schemas as data: one JSON file per source schema document
//! under the generated crate's `schemas/` (upstream content, `$ref`s kept,
//! written as [`canonical_json`]), and for each message the documents its
//! `$ref`s lead to, so a validator resolves them offline through a registry.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use heck::ToShoutySnakeCase;
use serde_json::Value;

use crate::error::{Error, Location};
use crate::model::Model;
use crate::resolve::{SchemaLoc, SchemaSet, schema_refs};

/// One schema document written to `schemas/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaFile {
    /// The document id (`/schemas/queue/v1/task-status.json`).
    pub id: String,
    /// Path relative to the generated crate (`schemas/queue/v1/task-status.json`).
    pub path: String,
    /// Name of its constant in the generated `schemas` module (`QUEUE_V1_TASK_STATUS`).
    pub constant: String,
    /// The modules (services) whose messages need it, sorted.
    pub modules: BTreeSet<String>,
    /// The file's contents.
    pub contents: String,
}

/// Every schema document the messages need, and what each message needs.
#[derive(Debug, Clone, Default)]
pub struct SchemaFiles {
    /// By document id.
    pub files: BTreeMap<String, SchemaFile>,
    /// For each message schema location: the ids of the other documents its
    /// `$ref`s lead to (transitively), sorted.
    pub dependencies: BTreeMap<SchemaLoc, Vec<String>>,
}

impl SchemaFiles {
    /// The file of the document holding `loc`.
    pub fn file_of(&self, loc: &SchemaLoc) -> Option<&SchemaFile> {
        self.files.get(&loc.uri)
    }
}

/// Collects the schema documents of every message of `model`.
pub fn collect(model: &Model, schemas: &SchemaSet) -> Result<SchemaFiles, Error> {
    let mut out = SchemaFiles::default();
    let mut modules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for service in &model.services {
        for def in service.types.values() {
            let Some(info) = &def.message else { continue };
            let documents = documents_reached(schemas, &info.schema.uri)?;
            for id in &documents {
                modules
                    .entry(id.clone())
                    .or_default()
                    .insert(service.module.clone());
            }
            let dependencies = documents
                .into_iter()
                .filter(|id| *id != info.schema.uri)
                .collect();
            out.dependencies.insert(info.schema.clone(), dependencies);
        }
    }
    let mut by_path: BTreeMap<String, String> = BTreeMap::new();
    let mut by_constant: BTreeMap<String, String> = BTreeMap::new();
    for (id, modules) in modules {
        let document = schemas.document(&id).ok_or_else(|| Error::UnresolvedRef {
            at: Location::new(&id, ""),
            reference: id.clone(),
            reason: "no schema has this $id".into(),
        })?;
        let path = file_path(&id);
        let constant = constant_name(&path);
        for (taken, key, what) in [
            (&mut by_path, &path, "file"),
            (&mut by_constant, &constant, "constant"),
        ] {
            if let Some(other) = taken.insert(key.clone(), id.clone()) {
                return Err(Error::NameCollision {
                    at: Location::new(&document.file, ""),
                    reason: format!("schemas {other} and {id} both map to the {what} {key}"),
                });
            }
        }
        let contents = format!("{}\n", canonical_json(&document.value));
        out.files.insert(
            id.clone(),
            SchemaFile {
                id,
                path,
                constant,
                modules,
                contents,
            },
        );
    }
    Ok(out)
}

/// The document `start` and every document a `$ref` in it leads to,
/// transitively, sorted by id.
fn documents_reached(schemas: &SchemaSet, start: &str) -> Result<BTreeSet<String>, Error> {
    let mut seen = BTreeSet::new();
    let mut pending = vec![start.to_owned()];
    while let Some(id) = pending.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(document) = schemas.document(&id) else {
            continue;
        };
        for (pointer, reference) in schema_refs(&document.value) {
            if reference.starts_with('#') {
                continue;
            }
            let at = Location::new(&document.file, pointer);
            let target = schemas.resolve(&id, &reference, &at)?;
            pending.push(target.uri);
        }
    }
    Ok(seen)
}

/// `schemas/<id without a leading /schemas/>`, ending in `.json`.
pub fn file_path(id: &str) -> String {
    let trimmed = id.trim_start_matches('/');
    let relative = trimmed.strip_prefix("schemas/").unwrap_or(trimmed);
    if relative.ends_with(".json") {
        format!("schemas/{relative}")
    } else {
        format!("schemas/{relative}.json")
    }
}

/// `QUEUE_V1_TASK_STATUS` for `schemas/queue/v1/task-status.json`.
pub fn constant_name(path: &str) -> String {
    let relative = path.strip_prefix("schemas/").unwrap_or(path);
    let relative = relative.strip_suffix(".json").unwrap_or(relative);
    let name = relative
        .split('/')
        .map(|segment| segment.to_shouty_snake_case())
        .filter(|segment| !segment.is_empty())
        .collect::<Vec<_>>()
        .join("_");
    if name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name
    } else {
        format!("SCHEMA_{name}")
    }
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

    #[test]
    fn canonical_json_sorts_keys() {
        let value = json!({"b": [1, {"d": null, "c": true}], "a": {}, "e": []});
        assert_eq!(
            canonical_json(&value),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    {\n      \"c\": true,\n      \"d\": null\n    }\n  ],\n  \"e\": []\n}"
        );
    }

    #[test]
    fn paths_and_constants() {
        assert_eq!(
            file_path("/schemas/queue/v1/task-status.json"),
            "schemas/queue/v1/task-status.json"
        );
        assert_eq!(file_path("/other/thing"), "schemas/other/thing.json");
        assert_eq!(
            constant_name("schemas/queue/v1/task-status.json"),
            "QUEUE_V1_TASK_STATUS"
        );
        assert_eq!(
            constant_name("schemas/worker-manager/v1/pulse-worker-pool-message.json"),
            "WORKER_MANAGER_V1_PULSE_WORKER_POOL_MESSAGE"
        );
        assert_eq!(constant_name("schemas/2fa/v1/x.json"), "SCHEMA_2FA_V1_X");
    }
}
