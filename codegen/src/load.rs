//! Stage 1: read the sources (a references directory or a bundle file) into
//! memory, parse their JSON and validate the exchange references.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Location, pointer_push};
use crate::resolve::{SchemaDoc, SchemaSet, normalize_id};

/// The input of the generator, held in memory: either a references directory
/// (`<service>/v1/exchanges.json` plus message schemas in `<service>/v1/*.json`)
/// or a bundle (a JSON array of `{filename, content}` with references at
/// `references/<service>/v1/exchanges.json` and schemas at `schemas/<service>/v1/*.json`).
#[derive(Debug, Clone)]
pub struct Sources {
    layout: Layout,
    /// How files are named in errors: the directory (`references`) or bundle path.
    display_root: String,
    /// Files by their path relative to the directory, or by bundle filename.
    files: BTreeMap<String, Content>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Directory,
    Bundle,
}

#[derive(Debug, Clone)]
enum Content {
    Text(String),
    Json(Value),
}

impl Sources {
    /// Reads `path`: a references directory, or otherwise a bundle file.
    pub fn read(path: &Path) -> Result<Self, Error> {
        if path.is_dir() {
            Self::read_directory(path)
        } else {
            Self::read_bundle(path)
        }
    }

    /// Reads every `.json` file below a references directory.
    pub fn read_directory(path: &Path) -> Result<Self, Error> {
        let mut files = BTreeMap::new();
        read_tree(path, "", &mut files)?;
        Ok(Self::from_directory_files(
            path.display().to_string(),
            files,
        ))
    }

    /// A references directory held in memory: file contents by path relative
    /// to the directory (`queue/v1/exchanges.json`); `display_root` names the
    /// directory in errors (`references`).
    pub fn from_directory_files(
        display_root: impl Into<String>,
        files: BTreeMap<String, String>,
    ) -> Self {
        Sources {
            layout: Layout::Directory,
            display_root: display_root.into(),
            files: files
                .into_iter()
                .map(|(name, text)| (name, Content::Text(text)))
                .collect(),
        }
    }

    /// Reads a bundle file (JSON array of `{filename, content}`).
    pub fn read_bundle(path: &Path) -> Result<Self, Error> {
        let text = fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            reason: source.to_string(),
        })?;
        Self::from_bundle_text(path.display().to_string(), &text)
    }

    /// A bundle held in memory; `display_name` names it in errors. Each
    /// `content` may be the file's JSON itself or a string holding its text.
    pub fn from_bundle_text(display_name: impl Into<String>, text: &str) -> Result<Self, Error> {
        let display_name = display_name.into();
        let bundle: Value =
            serde_json::from_str(text).map_err(|e| Error::malformed_json(&display_name, &e))?;
        let Value::Array(items) = bundle else {
            return Err(Error::invalid(
                Location::new(&display_name, ""),
                "a bundle must be a JSON array of {filename, content}",
            ));
        };
        let mut files = BTreeMap::new();
        for (index, item) in items.into_iter().enumerate() {
            let at = Location::new(&display_name, format!("/{index}"));
            let Value::Object(mut item) = item else {
                return Err(Error::invalid(at, "bundle item is not an object"));
            };
            let filename = match item.remove("filename") {
                Some(Value::String(name)) => name,
                Some(_) => {
                    return Err(Error::invalid(
                        Location::new(&display_name, format!("/{index}/filename")),
                        "expected a string",
                    ));
                }
                None => {
                    return Err(Error::MissingField {
                        at,
                        field: "filename".into(),
                    });
                }
            };
            let content = match item.remove("content") {
                Some(Value::String(text)) => Content::Text(text),
                Some(json) => Content::Json(json),
                None => {
                    return Err(Error::MissingField {
                        at,
                        field: "content".into(),
                    });
                }
            };
            if files.insert(filename.clone(), content).is_some() {
                return Err(Error::invalid(
                    at,
                    format!("bundle holds {filename:?} more than once"),
                ));
            }
        }
        Ok(Sources {
            layout: Layout::Bundle,
            display_root: display_name,
            files,
        })
    }

    /// How a file is named in errors.
    fn display(&self, name: &str) -> String {
        match self.layout {
            Layout::Directory => format!("{}/{name}", self.display_root.trim_end_matches('/')),
            // Bundle filenames are already rooted (`references/…`, `schemas/…`).
            Layout::Bundle => name.to_owned(),
        }
    }
}

fn read_tree(dir: &Path, prefix: &str, files: &mut BTreeMap<String, String>) -> Result<(), Error> {
    let io_error = |path: &Path, source: std::io::Error| Error::Io {
        path: path.display().to_string(),
        reason: source.to_string(),
    };
    let entries = fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let relative = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let file_type = entry.file_type().map_err(|e| io_error(&path, e))?;
        if file_type.is_dir() {
            read_tree(&path, &relative, files)?;
        } else if name.ends_with(".json") {
            let text = fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
            files.insert(relative, text);
        }
    }
    Ok(())
}

/// A validated exchange reference (`exchanges.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeReference {
    /// The file, as named in errors.
    pub file: String,
    /// The file's logical name for generated headers (`references/queue/v1/exchanges.json`).
    pub logical_name: String,
    /// `serviceName` (`queue`).
    pub service_name: String,
    /// `apiVersion` (`v1`).
    pub api_version: String,
    /// `title`.
    pub title: String,
    /// `description` (markdown).
    pub description: String,
    /// `exchangePrefix` (`exchange/taskcluster-queue/v1/`).
    pub exchange_prefix: String,
    /// The entries, in reference order.
    pub entries: Vec<ExchangeEntry>,
}

/// One exchange of a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeEntry {
    /// JSON pointer of the entry in its file (`/entries/3`).
    pub pointer: String,
    /// Stable identifier (`taskCompleted`).
    pub name: String,
    /// Exchange name without prefix (`task-completed`).
    pub exchange: String,
    /// `title`.
    pub title: String,
    /// `description` (markdown).
    pub description: String,
    /// Message schema, relative to the service's schema location (`v1/task-completed-message.json#`).
    pub schema: String,
    /// Routing-key words, in order.
    pub routing_key: Vec<RoutingKeyEntry>,
}

/// One word of an entry's routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKeyEntry {
    /// JSON pointer of the word in its file (`/entries/3/routingKey/0`).
    pub pointer: String,
    /// Identifier (`taskId`).
    pub name: String,
    /// Short markdown description.
    pub summary: String,
    /// Fixed value, if any.
    pub constant: Option<String>,
    /// Whether the value may span several AMQP words.
    pub multiple_words: bool,
    /// Whether the word always has a value.
    pub required: bool,
}

/// Everything loaded: validated references (sorted by service name) and all schemas.
#[derive(Debug)]
pub struct Loaded {
    /// The exchange references, sorted by `serviceName`.
    pub references: Vec<ExchangeReference>,
    /// Every schema document, indexed by `$id`.
    pub schemas: SchemaSet,
}

/// What a file of the sources is.
enum Kind {
    Reference { directory_service: String },
    Schema { location_uri: String },
    Ignored,
}

fn classify(layout: Layout, name: &str) -> Kind {
    let parts: Vec<&str> = name.split('/').collect();
    match layout {
        Layout::Directory => match parts.as_slice() {
            [service, _version, "exchanges.json"] => Kind::Reference {
                directory_service: (*service).to_owned(),
            },
            // Other reference kinds share the directories; only exchanges matter.
            [_, _, "api.json" | "logs.json"] => Kind::Ignored,
            [_] => Kind::Ignored, // manifest.json and the like at the root
            _ => Kind::Schema {
                location_uri: format!("/schemas/{name}"),
            },
        },
        Layout::Bundle => match parts.as_slice() {
            ["references", service, _version, "exchanges.json"] => Kind::Reference {
                directory_service: (*service).to_owned(),
            },
            ["schemas", ..] => Kind::Schema {
                location_uri: format!("/{name}"),
            },
            _ => Kind::Ignored,
        },
    }
}

/// Parses every file and validates the references.
pub fn load(sources: &Sources) -> Result<Loaded, Error> {
    let mut references = Vec::new();
    let mut documents: BTreeMap<String, SchemaDoc> = BTreeMap::new();
    let mut aliases: Vec<(String, String)> = Vec::new();
    for (name, content) in &sources.files {
        let kind = classify(sources.layout, name);
        if matches!(kind, Kind::Ignored) {
            continue;
        }
        let file = sources.display(name);
        let value = match content {
            Content::Text(text) => {
                serde_json::from_str(text).map_err(|e| Error::malformed_json(&file, &e))?
            }
            Content::Json(value) => value.clone(),
        };
        match kind {
            Kind::Reference { directory_service } => {
                let logical_name = match sources.layout {
                    Layout::Directory => format!("references/{name}"),
                    Layout::Bundle => name.clone(),
                };
                let reference = parse_reference(&file, logical_name, &value)?;
                if reference.service_name != directory_service {
                    return Err(Error::invalid(
                        Location::new(&file, "/serviceName"),
                        format!(
                            "serviceName {:?} does not match its directory {directory_service:?}",
                            reference.service_name
                        ),
                    ));
                }
                references.push(reference);
            }
            Kind::Schema { location_uri } => {
                let uri = match value.get("$id") {
                    None => location_uri.clone(),
                    Some(Value::String(id)) => normalize_id(id)
                        .map_err(|reason| Error::invalid(Location::new(&file, "/$id"), reason))?,
                    Some(_) => {
                        return Err(Error::invalid(
                            Location::new(&file, "/$id"),
                            "expected a string",
                        ));
                    }
                };
                if let Some(existing) = documents.get(&uri) {
                    return Err(Error::invalid(
                        Location::new(&file, "/$id"),
                        format!("$id {uri} is also used by {}", existing.file),
                    ));
                }
                if uri != location_uri {
                    aliases.push((location_uri, uri.clone()));
                }
                documents.insert(uri, SchemaDoc { file, value });
            }
            Kind::Ignored => {}
        }
    }
    references.sort_by(|a, b| a.service_name.cmp(&b.service_name));
    for pair in references.windows(2) {
        if pair[0].service_name == pair[1].service_name {
            return Err(Error::invalid(
                Location::new(&pair[1].file, "/serviceName"),
                format!(
                    "service {:?} is also described by {}",
                    pair[1].service_name, pair[0].file
                ),
            ));
        }
    }
    Ok(Loaded {
        references,
        schemas: SchemaSet::new(documents, aliases),
    })
}

/// Reads a field of a JSON object with a precise error for absence or wrong type.
struct Fields<'a> {
    file: &'a str,
    pointer: String,
    object: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn of(file: &'a str, pointer: String, value: &'a Value) -> Result<Self, Error> {
        match value {
            Value::Object(object) => Ok(Fields {
                file,
                pointer,
                object,
            }),
            _ => Err(Error::invalid(
                Location::new(file, pointer),
                "expected an object",
            )),
        }
    }

    fn at(&self, field: &str) -> Location {
        Location::new(self.file, pointer_push(&self.pointer, field))
    }

    fn required(&self, field: &str) -> Result<&'a Value, Error> {
        self.object.get(field).ok_or_else(|| Error::MissingField {
            at: Location::new(self.file, self.pointer.clone()),
            field: field.to_owned(),
        })
    }

    fn string(&self, field: &str) -> Result<String, Error> {
        match self.required(field)? {
            Value::String(s) => Ok(s.clone()),
            _ => Err(Error::invalid(self.at(field), "expected a string")),
        }
    }

    fn optional_string(&self, field: &str) -> Result<Option<String>, Error> {
        match self.object.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Error::invalid(self.at(field), "expected a string")),
        }
    }

    fn boolean(&self, field: &str) -> Result<bool, Error> {
        match self.required(field)? {
            Value::Bool(b) => Ok(*b),
            _ => Err(Error::invalid(self.at(field), "expected a boolean")),
        }
    }

    fn array(&self, field: &str) -> Result<&'a Vec<Value>, Error> {
        match self.required(field)? {
            Value::Array(items) => Ok(items),
            _ => Err(Error::invalid(self.at(field), "expected an array")),
        }
    }
}

/// Validates an `exchanges.json` reference (format `exchanges-reference-v0.json`).
pub fn parse_reference(
    file: &str,
    logical_name: String,
    value: &Value,
) -> Result<ExchangeReference, Error> {
    let top = Fields::of(file, String::new(), value)?;
    top.string("$schema")?;
    let service_name = top.string("serviceName")?;
    let valid_service = service_name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase())
        && service_name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid_service {
        return Err(Error::invalid(
            top.at("serviceName"),
            format!("serviceName {service_name:?} does not match ^[a-z][a-z0-9_-]*$"),
        ));
    }
    let mut reference = ExchangeReference {
        file: file.to_owned(),
        logical_name,
        service_name,
        api_version: top.string("apiVersion")?,
        title: top.string("title")?,
        description: top.string("description")?,
        exchange_prefix: top.string("exchangePrefix")?,
        entries: Vec::new(),
    };
    let mut names = BTreeSet::new();
    let mut exchanges = BTreeSet::new();
    for (index, entry) in top.array("entries")?.iter().enumerate() {
        let entry = parse_entry(file, format!("/entries/{index}"), entry)?;
        if !names.insert(entry.name.clone()) {
            return Err(Error::invalid(
                Location::new(file, format!("{}/name", entry.pointer)),
                format!("entry name {:?} is used twice", entry.name),
            ));
        }
        if !exchanges.insert(entry.exchange.clone()) {
            return Err(Error::invalid(
                Location::new(file, format!("{}/exchange", entry.pointer)),
                format!("exchange {:?} is described twice", entry.exchange),
            ));
        }
        reference.entries.push(entry);
    }
    Ok(reference)
}

fn parse_entry(file: &str, pointer: String, value: &Value) -> Result<ExchangeEntry, Error> {
    let fields = Fields::of(file, pointer.clone(), value)?;
    let entry_type = fields.string("type")?;
    if entry_type != "topic-exchange" {
        return Err(Error::invalid(
            fields.at("type"),
            format!("entry type {entry_type:?} is not \"topic-exchange\""),
        ));
    }
    let mut entry = ExchangeEntry {
        name: fields.string("name")?,
        exchange: fields.string("exchange")?,
        title: fields.string("title")?,
        description: fields.string("description")?,
        schema: fields.string("schema")?,
        routing_key: Vec::new(),
        pointer,
    };
    if entry.name.is_empty() {
        return Err(Error::invalid(fields.at("name"), "entry name is empty"));
    }
    let mut words = BTreeSet::new();
    for (index, word) in fields.array("routingKey")?.iter().enumerate() {
        let word_pointer = format!("{}/routingKey/{index}", entry.pointer);
        let word_fields = Fields::of(file, word_pointer.clone(), word)?;
        let word = RoutingKeyEntry {
            name: word_fields.string("name")?,
            summary: word_fields.string("summary")?,
            constant: word_fields.optional_string("constant")?,
            multiple_words: word_fields.boolean("multipleWords")?,
            required: word_fields.boolean("required")?,
            pointer: word_pointer,
        };
        if !words.insert(word.name.clone()) {
            return Err(Error::invalid(
                word_fields.at("name"),
                format!("routing-key word {:?} is used twice", word.name),
            ));
        }
        entry.routing_key.push(word);
    }
    Ok(entry)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The `demo` service's `exchanges.json` with these entries.
    pub(crate) fn demo_reference(entries: Value) -> Value {
        serde_json::json!({
            "$schema": "/schemas/common/exchanges-reference-v0.json#",
            "apiVersion": "v1",
            "serviceName": "demo",
            "title": "Demo",
            "description": "Demo exchanges",
            "exchangePrefix": "exchange/demo/v1/",
            "entries": entries,
        })
    }

    fn reference_json() -> Value {
        demo_reference(serde_json::json!([{
            "type": "topic-exchange",
            "name": "thingDone",
            "exchange": "thing-done",
            "title": "Thing done",
            "description": "A thing was done",
            "schema": "v1/thing.json#",
            "routingKey": [
                {"name": "routingKeyKind", "summary": "kind", "constant": "primary",
                 "multipleWords": false, "required": true},
                {"name": "thingId", "summary": "id", "multipleWords": false, "required": true}
            ]
        }]))
    }

    fn load_dir(files: &[(&str, String)]) -> Result<Loaded, Error> {
        let files = files
            .iter()
            .map(|(name, text)| ((*name).to_owned(), text.clone()))
            .collect();
        load(&Sources::from_directory_files("references", files))
    }

    #[test]
    fn parses_a_valid_reference() {
        let loaded = load_dir(&[
            ("demo/v1/exchanges.json", reference_json().to_string()),
            (
                "demo/v1/thing.json",
                r#"{"$id": "/schemas/demo/v1/thing.json#"}"#.into(),
            ),
        ])
        .unwrap();
        let reference = &loaded.references[0];
        assert_eq!(reference.service_name, "demo");
        assert_eq!(reference.file, "references/demo/v1/exchanges.json");
        assert_eq!(
            reference.entries[0].routing_key[0].constant.as_deref(),
            Some("primary")
        );
        assert!(!reference.entries[0].routing_key[1].multiple_words);
        assert!(
            loaded
                .schemas
                .document("/schemas/demo/v1/thing.json")
                .is_some()
        );
    }

    #[test]
    fn missing_routing_key_name_names_file_and_pointer() {
        let mut json = reference_json();
        json["entries"][0]["routingKey"][1]
            .as_object_mut()
            .unwrap()
            .remove("name");
        let err = load_dir(&[("demo/v1/exchanges.json", json.to_string())]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "references/demo/v1/exchanges.json#/entries/0/routingKey/1: missing \"name\""
        );
    }

    #[test]
    fn wrong_field_type_names_pointer() {
        let mut json = reference_json();
        json["entries"][0]["routingKey"][0]["required"] = Value::from("yes");
        let err = load_dir(&[("demo/v1/exchanges.json", json.to_string())]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "references/demo/v1/exchanges.json#/entries/0/routingKey/0/required: expected a boolean"
        );
    }

    #[test]
    fn missing_entry_schema_is_reported() {
        let mut json = reference_json();
        json["entries"][0].as_object_mut().unwrap().remove("schema");
        let err = load_dir(&[("demo/v1/exchanges.json", json.to_string())]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "references/demo/v1/exchanges.json#/entries/0: missing \"schema\""
        );
    }

    #[test]
    fn duplicate_entry_names_are_rejected() {
        let mut json = reference_json();
        let entry = json["entries"][0].clone();
        let mut second = entry.clone();
        second["exchange"] = Value::from("other");
        json["entries"] = Value::Array(vec![entry, second]);
        let err = load_dir(&[("demo/v1/exchanges.json", json.to_string())]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("references/demo/v1/exchanges.json#/entries/1/name: entry name")
        );
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let err = load_dir(&[(
            "demo/v1/thing.json",
            "{\n  \"type\": \"object\",\n  oops\n}".into(),
        )])
        .unwrap_err();
        match &err {
            Error::MalformedJson {
                file, line, column, ..
            } => {
                assert_eq!(file, "references/demo/v1/thing.json");
                assert_eq!((*line, *column), (3, 3));
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("references/demo/v1/thing.json:3:3: malformed JSON")
        );
    }

    #[test]
    fn service_name_must_match_directory() {
        let err =
            load_dir(&[("other/v1/exchanges.json", reference_json().to_string())]).unwrap_err();
        assert!(
            err.to_string()
                .contains("/serviceName: serviceName \"demo\" does not match")
        );
    }

    #[test]
    fn duplicate_schema_ids_are_rejected() {
        let schema = r#"{"$id": "/schemas/demo/v1/thing.json#"}"#;
        let err = load_dir(&[
            ("demo/v1/thing.json", schema.into()),
            ("demo/v1/copy.json", schema.into()),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("is also used by"), "{err}");
    }

    #[test]
    fn bundle_layout_and_string_content() {
        let bundle = serde_json::json!([
            {"filename": "references/demo/v1/exchanges.json", "content": reference_json()},
            {"filename": "references/demo/v1/api.json", "content": {"ignored": true}},
            {"filename": "schemas/demo/v1/thing.json", "content": "{\"type\": \"object\"}"},
        ]);
        let sources = Sources::from_bundle_text("bundle.json", &bundle.to_string()).unwrap();
        let loaded = load(&sources).unwrap();
        assert_eq!(loaded.references.len(), 1);
        assert_eq!(
            loaded.references[0].logical_name,
            "references/demo/v1/exchanges.json"
        );
        let doc = loaded
            .schemas
            .document("/schemas/demo/v1/thing.json")
            .unwrap();
        assert_eq!(doc.file, "schemas/demo/v1/thing.json");
    }

    #[test]
    fn malformed_bundle_item_is_reported() {
        let err = Sources::from_bundle_text("bundle.json", r#"[{"content": {}}]"#).unwrap_err();
        assert_eq!(err.to_string(), "bundle.json#/0: missing \"filename\"");
    }
}
