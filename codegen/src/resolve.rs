//! Stage 2: `$ref` resolution across schema files, with JSON-pointer fragments.
//!
//! Every schema document is known by its `$id` (made a path, `/schemas/queue/v1/task.json`);
//! a `$ref` resolves relative to the `$id` of the document it appears in, by
//! plain path joining (the ids are root-relative URIs). A resolved reference is
//! a [`SchemaLoc`]: document id plus JSON pointer, the stable identity of a schema.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::Value;

use crate::error::{Error, Location};

/// The canonical location of a schema: its document's id and a JSON pointer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SchemaLoc {
    /// The document id, a root-relative path without fragment (`/schemas/queue/v1/task.json`).
    pub uri: String,
    /// JSON pointer into the document (`/properties/tags`), empty for the root.
    pub pointer: String,
}

impl SchemaLoc {
    /// The root of a document.
    pub fn root(uri: impl Into<String>) -> Self {
        SchemaLoc {
            uri: uri.into(),
            pointer: String::new(),
        }
    }

    /// A location below this one (`token` unescaped).
    pub fn child(&self, token: &str) -> Self {
        SchemaLoc {
            uri: self.uri.clone(),
            pointer: crate::error::pointer_push(&self.pointer, token),
        }
    }

    /// The unescaped tokens of the pointer.
    pub fn tokens(&self) -> Vec<String> {
        pointer_tokens(&self.pointer)
    }
}

impl fmt::Display for SchemaLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.uri, self.pointer)
    }
}

/// A parsed schema file.
#[derive(Debug, Clone)]
pub struct SchemaDoc {
    /// The file, as named in errors.
    pub file: String,
    /// Its JSON.
    pub value: Value,
}

/// All schema documents, by id.
#[derive(Debug, Default)]
pub struct SchemaSet {
    documents: BTreeMap<String, SchemaDoc>,
    /// Location-derived ids of files whose `$id` says otherwise.
    aliases: BTreeMap<String, String>,
}

impl SchemaSet {
    /// A set of documents by id; `aliases` maps a file's location-derived id to
    /// its declared `$id` (ignored where a document has that id itself).
    pub fn new(documents: BTreeMap<String, SchemaDoc>, aliases: Vec<(String, String)>) -> Self {
        let aliases = aliases
            .into_iter()
            .filter(|(alias, _)| !documents.contains_key(alias))
            .collect();
        SchemaSet { documents, aliases }
    }

    fn canonical<'a>(&'a self, uri: &'a str) -> &'a str {
        match self.aliases.get(uri) {
            Some(id) => id,
            None => uri,
        }
    }

    /// The document with this id (or location-derived id).
    pub fn document(&self, uri: &str) -> Option<&SchemaDoc> {
        self.documents.get(self.canonical(uri))
    }

    /// The schema at `loc`, if it exists.
    pub fn get(&self, loc: &SchemaLoc) -> Option<&Value> {
        let doc = self.document(&loc.uri)?;
        lookup_pointer(&doc.value, &loc.pointer)
    }

    /// The file and pointer of `loc`, for errors.
    pub fn location(&self, loc: &SchemaLoc) -> Location {
        let file = match self.document(&loc.uri) {
            Some(doc) => doc.file.clone(),
            None => loc.uri.clone(),
        };
        Location::new(file, loc.pointer.clone())
    }

    /// Resolves `reference` (as written in a `$ref` or an entry's `schema`)
    /// against the document `base_uri`; `at` is where the reference is written.
    /// The target must exist.
    pub fn resolve(
        &self,
        base_uri: &str,
        reference: &str,
        at: &Location,
    ) -> Result<SchemaLoc, Error> {
        let unresolved = |reason: String| Error::UnresolvedRef {
            at: at.clone(),
            reference: reference.to_owned(),
            reason,
        };
        let (path, fragment) = match reference.split_once('#') {
            Some((path, fragment)) => (path, fragment),
            None => (reference, ""),
        };
        let uri = if path.is_empty() {
            base_uri.to_owned()
        } else {
            join_uri(base_uri, path).map_err(unresolved)?
        };
        let pointer = if fragment.is_empty() || fragment.starts_with('/') {
            percent_decode(fragment).map_err(unresolved)?
        } else {
            return Err(Error::unsupported(
                at.clone(),
                format!(
                    "$ref {reference:?} uses a plain-name fragment; only JSON pointers are supported"
                ),
            ));
        };
        let uri = self.canonical(&uri).to_owned();
        let Some(doc) = self.documents.get(&uri) else {
            return Err(unresolved(format!("no schema has $id {uri}")));
        };
        if lookup_pointer(&doc.value, &pointer).is_none() {
            return Err(unresolved(format!(
                "{} ({uri}) has nothing at pointer {pointer:?}",
                doc.file
            )));
        }
        Ok(SchemaLoc { uri, pointer })
    }

    /// Follows `$ref`s from `loc` until a schema that is not a `$ref`; a
    /// `$ref` cycle is an error. Returns the final location.
    pub fn follow_refs(&self, loc: &SchemaLoc) -> Result<SchemaLoc, Error> {
        let mut current = loc.clone();
        let mut seen = BTreeSet::new();
        loop {
            let value = self.get(&current).ok_or_else(|| Error::UnresolvedRef {
                at: self.location(&current),
                reference: current.to_string(),
                reason: "no schema at this location".into(),
            })?;
            let Some(reference) = value.get("$ref") else {
                return Ok(current);
            };
            let at = self.location(&current.child("$ref"));
            let Value::String(reference) = reference else {
                return Err(Error::invalid(at, "$ref must be a string"));
            };
            if !seen.insert(current.clone()) {
                return Err(Error::unsupported(
                    at,
                    format!("$ref {reference:?} is part of a cycle of bare $refs"),
                ));
            }
            current = self.resolve(&current.uri, reference, &at)?;
        }
    }
}

/// Turns a schema `$id` into a document id: fragment (which must be empty)
/// removed, scheme and host of an absolute URL dropped.
pub fn normalize_id(id: &str) -> Result<String, String> {
    let (path, fragment) = id.split_once('#').unwrap_or((id, ""));
    if !fragment.is_empty() {
        return Err(format!("$id {id:?} has a non-empty fragment"));
    }
    let path = strip_scheme_and_host(path);
    if !path.starts_with('/') {
        return Err(format!(
            "$id {id:?} must be a root-relative path (/schemas/…) or an absolute URL"
        ));
    }
    normalize_path(path)
}

fn strip_scheme_and_host(uri: &str) -> &str {
    match uri.split_once("://") {
        Some((scheme, rest))
            if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            match rest.find('/') {
                Some(slash) => &rest[slash..],
                None => "/",
            }
        }
        _ => uri,
    }
}

/// Joins a relative reference path to a base document id.
pub fn join_uri(base: &str, reference: &str) -> Result<String, String> {
    let reference = strip_scheme_and_host(reference);
    let joined = if reference.starts_with('/') {
        reference.to_owned()
    } else {
        let directory = match base.rfind('/') {
            Some(slash) => &base[..=slash],
            None => "/",
        };
        format!("{directory}{reference}")
    };
    normalize_path(&joined)
}

/// Removes `.` and `..` segments from an absolute path.
fn normalize_path(path: &str) -> Result<String, String> {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    for (index, segment) in parts.iter().enumerate() {
        let last = index + 1 == parts.len();
        match *segment {
            "." => {
                if last {
                    segments.push("");
                }
            }
            ".." => {
                if segments.pop().is_none() {
                    return Err(format!("path {path:?} climbs above the root"));
                }
                if last {
                    segments.push("");
                }
            }
            other => segments.push(other),
        }
    }
    Ok(format!("/{}", segments.join("/")))
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text
                .get(index + 1..index + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in fragment {text:?}"))?;
            out.push(hex);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("fragment {text:?} is not UTF-8"))
}

/// What the value of a schema keyword holds, for walking schema positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeywordValue {
    /// The reference of `$ref`.
    Ref,
    /// Data (`default`, `enum`, `const`, `examples`): a `$ref` key in it is not a reference.
    Data,
    /// An object of schemas by name (`properties`, `definitions`, …).
    SchemaMap,
    /// A schema, an array of schemas, or something without schemas.
    Schemas,
}

/// What the value of the schema keyword `key` holds.
pub fn keyword_value(key: &str) -> KeywordValue {
    match key {
        "$ref" => KeywordValue::Ref,
        "default" | "enum" | "const" | "examples" => KeywordValue::Data,
        "properties" | "patternProperties" | "definitions" | "$defs" | "dependencies" => {
            KeywordValue::SchemaMap
        }
        _ => KeywordValue::Schemas,
    }
}

/// Every `$ref` in the schema positions of a schema document, as (JSON
/// pointer of the `$ref` keyword, its value); values of `default`, `enum`,
/// `const` and `examples` are data and not searched.
pub fn schema_refs(schema: &Value) -> Vec<(String, String)> {
    fn walk(value: &Value, pointer: &str, out: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    let here = crate::error::pointer_push(pointer, key);
                    match keyword_value(key) {
                        KeywordValue::Ref => {
                            if let Value::String(reference) = child {
                                out.push((here, reference.clone()));
                            }
                        }
                        KeywordValue::Data => {}
                        KeywordValue::SchemaMap => {
                            if let Value::Object(children) = child {
                                for (name, schema) in children {
                                    walk(schema, &crate::error::pointer_push(&here, name), out);
                                }
                            }
                        }
                        KeywordValue::Schemas => walk(child, &here, out),
                    }
                }
            }
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    walk(item, &format!("{pointer}/{index}"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(schema, "", &mut out);
    out
}

/// The unescaped tokens of a JSON pointer.
pub fn pointer_tokens(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer
        .split('/')
        .skip(1)
        .map(|token| token.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// The value at a JSON pointer.
pub fn lookup_pointer<'a>(value: &'a Value, pointer: &str) -> Option<&'a Value> {
    let mut current = value;
    for token in pointer_tokens(pointer) {
        current = match current {
            Value::Object(map) => map.get(&token)?,
            Value::Array(items) => items.get(token.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// A set of in-memory documents by id, each named `file_name(id)` in errors.
#[cfg(test)]
pub(crate) fn schema_set(docs: &[(&str, Value)], file_name: impl Fn(&str) -> String) -> SchemaSet {
    let documents = docs
        .iter()
        .map(|(uri, value)| {
            let doc = SchemaDoc {
                file: file_name(uri),
                value: value.clone(),
            };
            ((*uri).to_owned(), doc)
        })
        .collect();
    SchemaSet::new(documents, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(docs: &[(&str, Value)]) -> SchemaSet {
        schema_set(docs, |uri| {
            format!("references{}", uri.trim_start_matches("/schemas"))
        })
    }

    fn at() -> Location {
        Location::new("references/q/v1/a.json", "/properties/x/$ref")
    }

    #[test]
    fn joins_relative_absolute_and_dot_segments() {
        let base = "/schemas/queue/v1/task-status.json";
        assert_eq!(
            join_uri(base, "task.json").unwrap(),
            "/schemas/queue/v1/task.json"
        );
        assert_eq!(
            join_uri(base, "../../common/x.json").unwrap(),
            "/schemas/common/x.json"
        );
        assert_eq!(
            join_uri(base, "./y.json").unwrap(),
            "/schemas/queue/v1/y.json"
        );
        assert_eq!(
            join_uri(base, "/schemas/z.json").unwrap(),
            "/schemas/z.json"
        );
        assert_eq!(
            join_uri(base, "https://tc.example/schemas/a/v1/b.json").unwrap(),
            "/schemas/a/v1/b.json"
        );
        assert!(join_uri(base, "../../../../x.json").is_err());
    }

    #[test]
    fn normalizes_ids() {
        assert_eq!(
            normalize_id("/schemas/queue/v1/task.json#").unwrap(),
            "/schemas/queue/v1/task.json"
        );
        assert_eq!(
            normalize_id("https://tc.example/schemas/queue/v1/task.json#").unwrap(),
            "/schemas/queue/v1/task.json"
        );
        assert!(normalize_id("task.json#").is_err());
        assert!(normalize_id("/a.json#/x").is_err());
    }

    #[test]
    fn resolves_cross_file_with_pointer_fragment() {
        let schemas = set(&[
            (
                "/schemas/q/v1/a.json",
                json!({"$ref": "b.json#/definitions/thing~1x"}),
            ),
            (
                "/schemas/q/v1/b.json",
                json!({"definitions": {"thing/x": {"type": "string"}}}),
            ),
        ]);
        let loc = schemas
            .resolve(
                "/schemas/q/v1/a.json",
                "b.json#/definitions/thing~1x",
                &at(),
            )
            .unwrap();
        assert_eq!(loc.uri, "/schemas/q/v1/b.json");
        assert_eq!(loc.tokens(), vec!["definitions", "thing/x"]);
        assert_eq!(schemas.get(&loc).unwrap()["type"], "string");
        let followed = schemas
            .follow_refs(&SchemaLoc::root("/schemas/q/v1/a.json"))
            .unwrap();
        assert_eq!(followed, loc);
    }

    #[test]
    fn resolves_local_and_percent_encoded_refs() {
        let schemas = set(&[(
            "/schemas/q/v1/a.json",
            json!({"definitions": {"a b": {"type": "integer"}}}),
        )]);
        let loc = schemas
            .resolve("/schemas/q/v1/a.json", "#/definitions/a%20b", &at())
            .unwrap();
        assert_eq!(loc.pointer, "/definitions/a b");
        let root = schemas.resolve("/schemas/q/v1/a.json", "#", &at()).unwrap();
        assert_eq!(root, SchemaLoc::root("/schemas/q/v1/a.json"));
    }

    #[test]
    fn missing_document_names_ref_location_and_target() {
        let schemas = set(&[("/schemas/q/v1/a.json", json!({}))]);
        let err = schemas
            .resolve("/schemas/q/v1/a.json", "nope.json#", &at())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "references/q/v1/a.json#/properties/x/$ref: cannot resolve \"nope.json#\": no schema has $id /schemas/q/v1/nope.json"
        );
    }

    #[test]
    fn missing_pointer_target_is_reported() {
        let schemas = set(&[("/schemas/q/v1/a.json", json!({"properties": {}}))]);
        let err = schemas
            .resolve("/schemas/q/v1/a.json", "#/properties/gone", &at())
            .unwrap_err();
        assert!(
            err.to_string().ends_with(
                "references/q/v1/a.json (/schemas/q/v1/a.json) has nothing at pointer \"/properties/gone\""
            ),
            "{err}"
        );
    }

    #[test]
    fn recursive_ref_resolves_and_bare_ref_cycles_are_rejected() {
        let schemas = set(&[
            (
                "/schemas/q/v1/tree.json",
                json!({"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}),
            ),
            ("/schemas/q/v1/loop.json", json!({"$ref": "loop2.json#"})),
            ("/schemas/q/v1/loop2.json", json!({"$ref": "loop.json#"})),
        ]);
        let item = SchemaLoc::root("/schemas/q/v1/tree.json")
            .child("properties")
            .child("children")
            .child("items");
        assert_eq!(
            schemas.follow_refs(&item).unwrap(),
            SchemaLoc::root("/schemas/q/v1/tree.json")
        );
        let err = schemas
            .follow_refs(&SchemaLoc::root("/schemas/q/v1/loop.json"))
            .unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn finds_refs_in_schema_positions_only() {
        let schema = json!({
            "properties": {
                "$ref": {"$ref": "a.json#"},
                "x": {"items": [{"$ref": "#/definitions/b"}], "default": {"$ref": "data"}}
            },
            "enum": [{"$ref": "data"}],
            "definitions": {"b": {"oneOf": [{"$ref": "c.json#/p"}]}}
        });
        let mut refs = schema_refs(&schema);
        refs.sort();
        assert_eq!(
            refs,
            [
                (
                    "/definitions/b/oneOf/0/$ref".to_owned(),
                    "c.json#/p".to_owned()
                ),
                ("/properties/$ref/$ref".to_owned(), "a.json#".to_owned()),
                (
                    "/properties/x/items/0/$ref".to_owned(),
                    "#/definitions/b".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn anchors_are_unsupported() {
        let schemas = set(&[("/schemas/q/v1/a.json", json!({}))]);
        let err = schemas
            .resolve("/schemas/q/v1/a.json", "#anchor", &at())
            .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }));
    }
}
