//! Stage 3: the intermediate representation (IR) — services, exchanges and
//! the Rust types their message schemas map to, with every name decided.
//!
//! Types are keyed by the canonical [`SchemaLoc`] of their schema, so a schema
//! referenced from many places (`task-status.json`) becomes one type per
//! service. Only schemas that need a declaration get a named type (objects
//! with properties, string enums, `oneOf`/`anyOf`, message roots); strings,
//! numbers, arrays and maps are used inline.
//!
//! Naming, in order of precedence (all deterministic):
//!
//! 1. binding structs: the entry name (`taskCompleted` → `TaskCompleted`);
//! 2. message types: `<Binding>Message`, or — when several entries of a service
//!    share one schema (worker-manager's created/updated) — the schema's title
//!    (`WorkerType Pulse Message` → `WorkerTypePulseMessage`), else its file name;
//!    a collision among these is an error;
//! 3. the service's message enum: `<Service>Message`, or `Any<Service>Message`
//!    when a message type already has that name (purge-cache's `PurgeCacheMessage`);
//! 4. other types: their title when it is unique and free, else the name of
//!    the nearest enclosing named type plus the property path (`Part` +
//!    `size` → `PartSize`), with a numeric suffix if that still collides.
//!
//! Constructs the generator cannot express faithfully (`allOf`, `not`,
//! `patternProperties`, tuple `items`, values of several types, alternatives
//! serde could confuse, …) are errors naming the file and JSON pointer.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::error::{Error, Location};
use crate::load::{ExchangeEntry, ExchangeReference, Loaded};
use crate::naming::{field_name, module_name, type_name, variant_name};
use crate::resolve::{SchemaLoc, SchemaSet};

/// The whole model: one entry per service, sorted by module name.
#[derive(Debug, Clone)]
pub struct Model {
    /// The services, sorted by module name.
    pub services: Vec<ServiceModel>,
}

/// One service: its exchanges and every type its messages need.
#[derive(Debug, Clone)]
pub struct ServiceModel {
    /// Module and cargo feature name (`purge_cache`).
    pub module: String,
    /// `serviceName` (`purge-cache`).
    pub service_name: String,
    /// The reference's logical name (`references/queue/v1/exchanges.json`).
    pub reference_file: String,
    /// The reference's title.
    pub title: String,
    /// The reference's description (markdown).
    pub description: String,
    /// The exchanges, in reference order.
    pub exchanges: Vec<ExchangeModel>,
    /// Name of the enum of all the service's messages (`QueueMessage`).
    pub message_enum: String,
    /// Every named type, by schema location.
    pub types: BTreeMap<SchemaLoc, TypeDef>,
}

/// One exchange: its binding struct and message type.
#[derive(Debug, Clone)]
pub struct ExchangeModel {
    /// The entry's stable name (`taskCompleted`).
    pub entry: String,
    /// The binding struct's (and message-enum variant's) name (`TaskCompleted`).
    pub binding: String,
    /// Full exchange name (`exchange/taskcluster-queue/v1/task-completed`).
    pub exchange: String,
    /// Entry title.
    pub title: String,
    /// Entry description (markdown).
    pub description: String,
    /// The routing-key words, in order.
    pub words: Vec<WordModel>,
    /// The message type (a key of [`ServiceModel::types`]).
    pub message: SchemaLoc,
}

/// One routing-key word.
#[derive(Debug, Clone)]
pub struct WordModel {
    /// Name in the reference (`taskId`).
    pub name: String,
    /// Markdown summary.
    pub summary: String,
    /// Fixed value, if any.
    pub constant: Option<String>,
    /// Whether the value may span several AMQP words.
    pub multiple_words: bool,
    /// Whether the word always has a value.
    pub required: bool,
    /// The binding struct's field (`task_id`); `None` for constants.
    pub field: Option<String>,
}

/// A named Rust type generated from a schema.
#[derive(Debug, Clone)]
pub struct TypeDef {
    /// The Rust name.
    pub name: String,
    /// Doc comment (markdown).
    pub doc: String,
    /// What the type is.
    pub kind: TypeKind,
    /// Set when the type is a message published on an exchange.
    pub message: Option<MessageInfo>,
}

/// `Message` trait data of a message type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageInfo {
    /// `SCHEMA_ID` (`/schemas/queue/v1/task-completed-message.json#`).
    pub schema_id: String,
    /// The entry-level schema location (`SCHEMA_ID` names it; its document is `SCHEMA`).
    pub schema: SchemaLoc,
    /// Entries (binding names) publishing it, in reference order.
    pub exchanges: Vec<String>,
}

/// The shape of a named type.
#[derive(Debug, Clone)]
pub enum TypeKind {
    /// An object with declared properties.
    Struct {
        /// Fields sorted by JSON name.
        fields: Vec<FieldDef>,
        /// The properties beyond the declared ones, kept in a flattened map
        /// (field name, value type): `Value` when the schema allows any
        /// (`additionalProperties` absent, `true` or `{}`), the mapped type when
        /// it gives a schema, `None` when it forbids them (`false`).
        additional: Option<(String, TypeRef)>,
    },
    /// A string enum with a catch-all variant for values unknown at generation time.
    StringEnum {
        /// Known values.
        variants: Vec<VariantDef>,
        /// Name of the catch-all variant (`Unknown`).
        catch_all: String,
    },
    /// `oneOf`/`anyOf`: an untagged enum.
    Untagged {
        /// Alternatives, in schema order (serde tries them in order).
        variants: Vec<UntaggedVariant>,
    },
    /// A message root that is not an object, wrapped transparently.
    Newtype {
        /// The wrapped type.
        inner: TypeRef,
    },
}

/// A struct field.
#[derive(Debug, Clone)]
pub struct FieldDef {
    /// Rust name (`task_id`).
    pub name: String,
    /// JSON name (`taskId`).
    pub json_name: String,
    /// The field's type, without the `Option` of non-required fields.
    pub ty: TypeRef,
    /// Whether the schema lists it in `required`.
    pub required: bool,
    /// Doc comment (markdown).
    pub doc: String,
}

/// A known value of a string enum.
#[derive(Debug, Clone)]
pub struct VariantDef {
    /// Rust name (`TaskRetry`).
    pub name: String,
    /// JSON value (`task-retry`).
    pub value: String,
}

/// An alternative of an untagged enum.
#[derive(Debug, Clone)]
pub struct UntaggedVariant {
    /// Rust name.
    pub name: String,
    /// Its type.
    pub ty: TypeRef,
    /// Doc comment (markdown).
    pub doc: String,
}

/// A use of a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeRef {
    /// `String`.
    String,
    /// `i64`.
    Integer,
    /// `f64`.
    Number,
    /// `bool`.
    Boolean,
    /// `chrono::DateTime<Utc>` (`format: date-time`).
    DateTime,
    /// Any JSON value.
    Value,
    /// A free-form object (`serde_json::Map`).
    FreeObject,
    /// `Vec<T>`.
    Array(Box<TypeRef>),
    /// `BTreeMap<String, T>`.
    Map(Box<TypeRef>),
    /// `Option<T>`, for nullable schemas.
    Option(Box<TypeRef>),
    /// `Box<T>`, breaking a recursive type.
    Boxed(Box<TypeRef>),
    /// A named type of the same service.
    Named(SchemaLoc),
}

/// The field of a struct that keeps the properties beyond the declared ones.
pub const ADDITIONAL_FIELD: &str = "additional_properties";

/// Keywords the generator understands (mapped to types or documented).
const SUPPORTED_KEYWORDS: &[&str] = &[
    "$id",
    "$schema",
    "$ref",
    "$comment",
    "$defs",
    "definitions",
    "title",
    "description",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "oneOf",
    "anyOf",
    "format",
    "default",
    "examples",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "uniqueItems",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "readOnly",
    "writeOnly",
    "deprecated",
];

/// Names of the generated crate's own items and features beside the service
/// modules (`schemas`, the re-exported runtime, the `schemars` feature).
pub const RESERVED_MODULES: &[&str] = &["exchange_runtime", "schemars", "schemas"];

/// Builds the model of every reference.
pub fn build(loaded: &Loaded) -> Result<Model, Error> {
    let mut services = Vec::new();
    let mut modules: BTreeMap<String, String> = BTreeMap::new();
    for reference in &loaded.references {
        let service = build_service(&loaded.schemas, reference)?;
        if RESERVED_MODULES.contains(&service.module.as_str()) {
            return Err(Error::NameCollision {
                at: Location::new(&reference.file, "/serviceName"),
                reason: format!(
                    "module `{}` is a module of the generated crate itself",
                    service.module
                ),
            });
        }
        if let Some(other) = modules.insert(service.module.clone(), reference.file.clone()) {
            return Err(Error::NameCollision {
                at: Location::new(&reference.file, "/serviceName"),
                reason: format!("module `{}` is also the module of {other}", service.module),
            });
        }
        services.push(service);
    }
    services.sort_by(|a, b| a.module.cmp(&b.module));
    Ok(Model { services })
}

/// A named type while the model is being built: its name is decided last.
struct Draft {
    title: Option<String>,
    /// A name fixed by the API (message types).
    fixed_name: Option<String>,
    doc: String,
    kind: Option<TypeKind>,
    message: Option<MessageInfo>,
}

struct ServiceBuilder<'a> {
    schemas: &'a SchemaSet,
    drafts: BTreeMap<SchemaLoc, Draft>,
    /// Untagged enums whose alternatives are checked once every type is known.
    untagged_checks: Vec<SchemaLoc>,
    /// Unnamed (inline) types being typed since the innermost named type: one
    /// met again is a schema containing itself with no object in between.
    inline_path: Vec<SchemaLoc>,
    /// How many `type_of` calls are under way, bounded to keep the stack finite.
    nesting: usize,
}

/// The deepest schema nesting (counting `$ref`s followed) the generator accepts.
pub const MAX_NESTING: usize = 128;

fn build_service(
    schemas: &SchemaSet,
    reference: &ExchangeReference,
) -> Result<ServiceModel, Error> {
    let module = module_name(&reference.service_name).ok_or_else(|| {
        Error::invalid(
            Location::new(&reference.file, "/serviceName"),
            "serviceName gives no usable module name",
        )
    })?;
    let service_type = type_name(&reference.service_name).unwrap_or_else(|| module.clone());
    let mut builder = ServiceBuilder {
        schemas,
        drafts: BTreeMap::new(),
        untagged_checks: Vec::new(),
        inline_path: Vec::new(),
        nesting: 0,
    };
    // Names the API fixes: binding structs, and message types used by one entry.
    let mut fixed: BTreeMap<String, Location> = BTreeMap::new();
    let mut claim = |name: &str, at: Location| -> Result<(), Error> {
        if let Some(previous) = fixed.get(name) {
            return Err(Error::NameCollision {
                at,
                reason: format!("Rust name `{name}` is already taken by {previous}"),
            });
        }
        fixed.insert(name.to_owned(), at);
        Ok(())
    };

    let base = format!("/schemas/{}/", reference.service_name);
    let mut exchanges = Vec::new();
    let mut roots: Vec<(SchemaLoc, SchemaLoc)> = Vec::new();
    for entry in &reference.entries {
        let entry_at = Location::new(&reference.file, entry.pointer.clone());
        let binding = type_name(&entry.name).ok_or_else(|| {
            Error::invalid(
                Location::new(&reference.file, format!("{}/name", entry.pointer)),
                format!("entry name {:?} gives no usable type name", entry.name),
            )
        })?;
        claim(&binding, entry_at.clone())?;
        let schema_at = Location::new(&reference.file, format!("{}/schema", entry.pointer));
        let schema = schemas.resolve(&base, &entry.schema, &schema_at)?;
        let root = schemas.follow_refs(&schema)?;
        if let Some((other_schema, _)) = roots.iter().find(|(s, r)| *r == root && *s != schema) {
            return Err(Error::unsupported(
                schema_at,
                format!(
                    "schemas {schema} and {other_schema} are different documents resolving to one message type"
                ),
            ));
        }
        roots.push((schema, root.clone()));
        exchanges.push(ExchangeModel {
            entry: entry.name.clone(),
            binding,
            exchange: format!("{}{}", reference.exchange_prefix, entry.exchange),
            title: entry.title.clone(),
            description: entry.description.clone(),
            words: build_words(reference, entry)?,
            message: root,
        });
    }

    // Message types: `<Entry>Message` when one entry uses the schema, else
    // named after the schema (title, or file name).
    for (index, exchange) in exchanges.iter().enumerate() {
        let (schema, root) = &roots[index];
        let users: Vec<&ExchangeModel> = exchanges
            .iter()
            .filter(|other| other.message == *root)
            .collect();
        if users[0].entry != exchange.entry {
            continue; // handled with its first user
        }
        let entry_at = Location::new(&reference.file, reference.entries[index].pointer.clone());
        let name = if users.len() == 1 {
            format!("{}Message", exchange.binding)
        } else {
            shared_message_name(schemas, root)?
        };
        claim(&name, entry_at)?;
        let message = MessageInfo {
            schema_id: schema.to_string(),
            schema: schema.clone(),
            exchanges: users.iter().map(|user| user.binding.clone()).collect(),
        };
        builder.define_root(root, name, message)?;
    }
    builder.check_untagged()?;

    // The service enum yields to the API-fixed names.
    let message_enum = [
        format!("{service_type}Message"),
        format!("Any{service_type}Message"),
    ]
    .into_iter()
    .find(|name| !fixed.contains_key(name))
    .ok_or_else(|| Error::NameCollision {
        at: Location::new(&reference.file, "/serviceName"),
        reason: format!(
            "both `{service_type}Message` and `Any{service_type}Message` are taken by message or binding types"
        ),
    })?;
    let mut reserved: BTreeSet<String> = fixed.into_keys().collect();
    reserved.insert(message_enum.clone());

    let types = builder.finish(&reserved)?;
    Ok(ServiceModel {
        module,
        service_name: reference.service_name.clone(),
        reference_file: reference.logical_name.clone(),
        title: reference.title.clone(),
        description: reference.description.clone(),
        exchanges,
        message_enum,
        types,
    })
}

fn build_words(
    reference: &ExchangeReference,
    entry: &ExchangeEntry,
) -> Result<Vec<WordModel>, Error> {
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut words = Vec::new();
    for word in &entry.routing_key {
        let field = match &word.constant {
            Some(_) => None,
            None => {
                let at = Location::new(&reference.file, format!("{}/name", word.pointer));
                let field = field_name(&word.name).ok_or_else(|| {
                    Error::invalid(
                        at.clone(),
                        format!(
                            "routing-key word {:?} gives no usable field name",
                            word.name
                        ),
                    )
                })?;
                if let Some(other) = fields.insert(field.clone(), word.name.clone()) {
                    return Err(Error::NameCollision {
                        at,
                        reason: format!(
                            "routing-key words {other:?} and {:?} both map to field `{field}`",
                            word.name
                        ),
                    });
                }
                Some(field)
            }
        };
        words.push(WordModel {
            name: word.name.clone(),
            summary: word.summary.clone(),
            constant: word.constant.clone(),
            multiple_words: word.multiple_words,
            required: word.required,
            field,
        });
    }
    Ok(words)
}

/// Name of a message type shared by several entries: its title, or its file name.
fn shared_message_name(schemas: &SchemaSet, root: &SchemaLoc) -> Result<String, Error> {
    let title = schemas
        .get(root)
        .and_then(|schema| schema.get("title"))
        .and_then(Value::as_str)
        .and_then(type_name);
    title
        .or_else(|| type_name(&path_name(root, &BTreeMap::new())))
        .ok_or_else(|| Error::invalid(schemas.location(root), "schema gives no usable type name"))
}

/// A name from a schema's location: the name of the nearest enclosing named
/// type of the same document (else the file's stem), then the pointer's
/// property names (`task-pending-message.json#/properties/task` →
/// `TaskPendingMessageTask`; `…/items/properties/size` under `Part` → `PartSize`).
fn path_name(loc: &SchemaLoc, named: &BTreeMap<SchemaLoc, String>) -> String {
    let tokens = loc.tokens();
    let ancestor = (0..tokens.len()).rev().find_map(|depth| {
        let pointer: String = tokens[..depth]
            .iter()
            .map(|token| crate::error::pointer_push("", token))
            .collect();
        let ancestor = SchemaLoc {
            uri: loc.uri.clone(),
            pointer,
        };
        named.get(&ancestor).map(|name| (depth, name.clone()))
    });
    let (start, mut name) = match ancestor {
        Some((depth, name)) => (depth, name),
        None => {
            let file = loc.uri.rsplit('/').next().unwrap_or(&loc.uri);
            let stem = file.strip_suffix(".json").unwrap_or(file);
            (0, type_name(stem).unwrap_or_default())
        }
    };
    let mut index = start;
    while index < tokens.len() {
        let token = tokens[index].as_str();
        let part = match token {
            "properties" | "definitions" | "$defs" if index + 1 < tokens.len() => {
                index += 1;
                type_name(&tokens[index]).unwrap_or_default()
            }
            "oneOf" | "anyOf" if index + 1 < tokens.len() => {
                index += 1;
                format!("Variant{}", tokens[index])
            }
            "items" => "Item".to_owned(),
            "additionalProperties" => "Value".to_owned(),
            other => type_name(other).unwrap_or_default(),
        };
        name.push_str(&part);
        index += 1;
    }
    if name.is_empty() {
        "Type".to_owned()
    } else {
        name
    }
}

/// JSON types a schema admits (`type`, possibly an array).
struct TypeSet {
    types: Vec<String>,
    nullable: bool,
}

impl<'a> ServiceBuilder<'a> {
    fn location(&self, loc: &SchemaLoc) -> Location {
        self.schemas.location(loc)
    }

    fn object_at(&self, loc: &SchemaLoc) -> Result<&'a Map<String, Value>, Error> {
        match self.schemas.get(loc) {
            Some(Value::Object(object)) => Ok(object),
            Some(Value::Bool(true)) => Ok(empty_object()),
            Some(_) => Err(Error::unsupported(
                self.location(loc),
                "schema is not an object (boolean `false` schemas and others cannot be typed)",
            )),
            None => Err(Error::UnresolvedRef {
                at: self.location(loc),
                reference: loc.to_string(),
                reason: "no schema at this location".into(),
            }),
        }
    }

    /// Checks the keywords of the schema at `loc` (already `$ref`-free).
    fn check_keywords(&self, loc: &SchemaLoc, schema: &Map<String, Value>) -> Result<(), Error> {
        for key in schema.keys() {
            if !SUPPORTED_KEYWORDS.contains(&key.as_str()) {
                return Err(Error::unsupported(
                    self.location(&loc.child(key)),
                    format!("keyword `{key}` is not supported"),
                ));
            }
        }
        if schema.get("enum").is_some_and(|e| !e.is_array()) {
            return Err(Error::invalid(
                self.location(&loc.child("enum")),
                "`enum` must be an array",
            ));
        }
        if !loc.pointer.is_empty() && schema.contains_key("$id") {
            return Err(Error::unsupported(
                self.location(&loc.child("$id")),
                "`$id` below a document's root (it would change how refs resolve)",
            ));
        }
        Ok(())
    }

    fn type_set(&self, loc: &SchemaLoc, schema: &Map<String, Value>) -> Result<TypeSet, Error> {
        let at = || self.location(&loc.child("type"));
        let mut types = match schema.get("type") {
            None => Vec::new(),
            Some(Value::String(t)) => vec![t.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| Error::invalid(at(), "`type` entries must be strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(Error::invalid(at(), "`type` must be a string or an array")),
        };
        for t in &types {
            if ![
                "object", "array", "string", "integer", "number", "boolean", "null",
            ]
            .contains(&t.as_str())
            {
                return Err(Error::invalid(at(), format!("unknown type {t:?}")));
            }
        }
        let nullable = types.iter().any(|t| t == "null");
        types.retain(|t| t != "null");
        if types.len() > 1 {
            return Err(Error::unsupported(
                at(),
                format!(
                    "a value of several types ({}) cannot be typed; use oneOf",
                    types.join(", ")
                ),
            ));
        }
        if nullable && types.is_empty() && schema.get("type").is_some() {
            return Err(Error::unsupported(at(), "a schema that only admits `null`"));
        }
        Ok(TypeSet { types, nullable })
    }

    /// The Rust type of the schema at `loc`, defining named types as needed.
    fn type_of(&mut self, loc: &SchemaLoc) -> Result<TypeRef, Error> {
        let target = self.schemas.follow_refs(loc)?;
        if self.drafts.contains_key(&target) {
            return Ok(TypeRef::Named(target));
        }
        if self.inline_path.contains(&target) {
            return Err(Error::unsupported(
                self.location(loc),
                format!(
                    "the schema {target} contains itself with no object in between \
                     (an infinitely nested type)"
                ),
            ));
        }
        if self.nesting >= MAX_NESTING {
            return Err(Error::unsupported(
                self.location(loc),
                format!("schemas nested more than {MAX_NESTING} deep"),
            ));
        }
        self.inline_path.push(target.clone());
        self.nesting += 1;
        let ty = self.inline_type_of(&target);
        self.nesting -= 1;
        self.inline_path.pop();
        ty
    }

    /// [`Self::type_of`] of a `$ref`-free schema that is not a named type yet.
    fn inline_type_of(&mut self, loc: &SchemaLoc) -> Result<TypeRef, Error> {
        let schema = self.object_at(loc)?;
        self.check_keywords(loc, schema)?;
        let type_set = self.type_set(loc, schema)?;
        let inner = self.non_null_type(loc, schema, &type_set)?;
        Ok(if type_set.nullable {
            wrap_option(inner)
        } else {
            inner
        })
    }

    fn non_null_type(
        &mut self,
        loc: &SchemaLoc,
        schema: &Map<String, Value>,
        type_set: &TypeSet,
    ) -> Result<TypeRef, Error> {
        let ty = type_set.types.first().map(String::as_str);
        if schema.contains_key("oneOf") || schema.contains_key("anyOf") {
            return self.alternatives(loc, schema);
        }
        if let Some(values) = enum_values(schema) {
            return self.enumeration(loc, schema, ty, &values);
        }
        let inferred = ty.or_else(|| {
            if schema.contains_key("properties") {
                Some("object")
            } else if schema.contains_key("items") {
                Some("array")
            } else {
                None
            }
        });
        match inferred {
            None => Ok(TypeRef::Value),
            Some("object") => self.object(loc, schema),
            Some("array") => match schema.get("items") {
                None => Ok(TypeRef::Array(Box::new(TypeRef::Value))),
                Some(Value::Array(_)) => Err(Error::unsupported(
                    self.location(&loc.child("items")),
                    "tuple `items` (an array of schemas)",
                )),
                Some(_) => Ok(TypeRef::Array(Box::new(self.type_of(&loc.child("items"))?))),
            },
            Some("string") => Ok(match schema.get("format").and_then(Value::as_str) {
                Some("date-time") => TypeRef::DateTime,
                _ => TypeRef::String,
            }),
            Some("integer") => Ok(TypeRef::Integer),
            Some("number") => Ok(TypeRef::Number),
            Some("boolean") => Ok(TypeRef::Boolean),
            Some(other) => Err(Error::unsupported(
                self.location(loc),
                format!("type {other:?}"),
            )),
        }
    }

    fn object(&mut self, loc: &SchemaLoc, schema: &Map<String, Value>) -> Result<TypeRef, Error> {
        let additional = schema.get("additionalProperties");
        let has_properties = schema
            .get("properties")
            .is_some_and(|p| p.as_object().is_none_or(|p| !p.is_empty()));
        if !has_properties {
            match additional {
                None | Some(Value::Bool(true)) => return Ok(TypeRef::FreeObject),
                Some(Value::Object(o)) if o.is_empty() => return Ok(TypeRef::FreeObject),
                Some(Value::Object(_)) => {
                    let value = self.type_of(&loc.child("additionalProperties"))?;
                    return Ok(TypeRef::Map(Box::new(value)));
                }
                // `additionalProperties: false` and no properties: an empty struct.
                Some(_) => {}
            }
        }
        self.define(loc, |builder| builder.struct_kind(loc, schema))?;
        Ok(TypeRef::Named(loc.clone()))
    }

    fn struct_kind(
        &mut self,
        loc: &SchemaLoc,
        schema: &Map<String, Value>,
    ) -> Result<TypeKind, Error> {
        let properties = match schema.get("properties") {
            None => empty_object(),
            Some(Value::Object(properties)) => properties,
            Some(_) => {
                return Err(Error::invalid(
                    self.location(&loc.child("properties")),
                    "`properties` must be an object",
                ));
            }
        };
        let required = self.required(loc, schema)?;
        for name in &required {
            if !properties.contains_key(name) {
                return Err(Error::unsupported(
                    self.location(&loc.child("required")),
                    format!("required property {name:?} is not declared in `properties`"),
                ));
            }
        }
        let mut json_names: Vec<&String> = properties.keys().collect();
        json_names.sort();
        let mut fields = Vec::new();
        let mut rust_names: BTreeMap<String, String> = BTreeMap::new();
        for json_name in json_names {
            let property_loc = loc.child("properties").child(json_name);
            let name = field_name(json_name).ok_or_else(|| Error::NameCollision {
                at: self.location(&property_loc),
                reason: format!("property {json_name:?} gives no usable field name"),
            })?;
            if let Some(other) = rust_names.insert(name.clone(), json_name.clone()) {
                return Err(Error::NameCollision {
                    at: self.location(&property_loc),
                    reason: format!(
                        "properties {other:?} and {json_name:?} both map to field `{name}`"
                    ),
                });
            }
            let ty = self.type_of(&property_loc)?;
            let required = required.contains(json_name);
            let doc = self.field_doc(&property_loc, &ty, required)?;
            fields.push(FieldDef {
                name,
                json_name: json_name.clone(),
                ty,
                required,
                doc,
            });
        }
        // Properties beyond the declared ones are kept in a flattened map unless
        // the schema forbids them: `additionalProperties` absent (JSON Schema's
        // default), `true` or `{}` allow any value; a schema types them.
        let additional = match schema.get("additionalProperties") {
            Some(Value::Bool(false)) => None,
            None | Some(Value::Bool(true)) => Some(TypeRef::Value),
            Some(Value::Object(o)) if o.is_empty() => Some(TypeRef::Value),
            Some(_) => Some(self.type_of(&loc.child("additionalProperties"))?),
        };
        let additional = match additional {
            None => None,
            Some(ty) => {
                let name = ADDITIONAL_FIELD.to_owned();
                if let Some(json_name) = rust_names.get(&name) {
                    return Err(Error::NameCollision {
                        at: self.location(&loc.child("properties").child(json_name)),
                        reason: format!(
                            "property {json_name:?} maps to field `{name}`, which keeps the properties beyond the declared ones"
                        ),
                    });
                }
                Some((name, ty))
            }
        };
        Ok(TypeKind::Struct { fields, additional })
    }

    fn required(
        &self,
        loc: &SchemaLoc,
        schema: &Map<String, Value>,
    ) -> Result<BTreeSet<String>, Error> {
        match schema.get("required") {
            None => Ok(BTreeSet::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str().map(str::to_owned).ok_or_else(|| {
                        Error::invalid(
                            self.location(&loc.child("required")),
                            "`required` entries must be strings",
                        )
                    })
                })
                .collect(),
            Some(_) => Err(Error::invalid(
                self.location(&loc.child("required")),
                "`required` must be an array",
            )),
        }
    }

    fn enumeration(
        &mut self,
        loc: &SchemaLoc,
        schema: &Map<String, Value>,
        ty: Option<&str>,
        values: &[Value],
    ) -> Result<TypeRef, Error> {
        let at = self.location(&loc.child(if schema.contains_key("enum") {
            "enum"
        } else {
            "const"
        }));
        let nullable = values.iter().any(Value::is_null);
        let values: Vec<&Value> = values.iter().filter(|v| !v.is_null()).collect();
        if values.is_empty() {
            return Err(Error::unsupported(at, "an enum without non-null values"));
        }
        let kind = if values.iter().all(|v| v.is_string()) {
            "string"
        } else if values.iter().all(|v| v.is_i64() || v.is_u64()) {
            "integer"
        } else if values.iter().all(|v| v.is_number()) {
            "number"
        } else if values.iter().all(|v| v.is_boolean()) {
            "boolean"
        } else {
            return Err(Error::unsupported(at, "an enum mixing value types"));
        };
        let compatible = match ty {
            None => true,
            Some("number") => kind == "integer" || kind == "number",
            Some(t) => t == kind,
        };
        if !compatible {
            return Err(Error::invalid(
                at,
                format!(
                    "enum values are {kind}s but `type` is {:?}",
                    ty.unwrap_or_default()
                ),
            ));
        }
        let ty = match kind {
            "string" => {
                let values: Vec<String> = values
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                self.define(loc, |_| string_enum(&at, &values))?;
                TypeRef::Named(loc.clone())
            }
            // Non-string enums stay plain values; the allowed values are documented
            // and enforced by `Message::SCHEMA` validation.
            "integer" if ty != Some("number") => TypeRef::Integer,
            "integer" | "number" => TypeRef::Number,
            _ => TypeRef::Boolean,
        };
        Ok(if nullable { wrap_option(ty) } else { ty })
    }

    fn alternatives(
        &mut self,
        loc: &SchemaLoc,
        schema: &Map<String, Value>,
    ) -> Result<TypeRef, Error> {
        let keyword = if schema.contains_key("oneOf") {
            "oneOf"
        } else {
            "anyOf"
        };
        if schema.contains_key("oneOf") && schema.contains_key("anyOf") {
            return Err(Error::unsupported(
                self.location(loc),
                "both oneOf and anyOf on one schema",
            ));
        }
        for sibling in [
            "properties",
            "required",
            "items",
            "enum",
            "const",
            "additionalProperties",
        ] {
            if schema.contains_key(sibling) {
                return Err(Error::unsupported(
                    self.location(&loc.child(sibling)),
                    format!("`{sibling}` beside `{keyword}`"),
                ));
            }
        }
        let Some(Value::Array(options)) = schema.get(keyword) else {
            return Err(Error::invalid(
                self.location(&loc.child(keyword)),
                format!("`{keyword}` must be an array"),
            ));
        };
        let mut non_null = Vec::new();
        let mut nullable = false;
        for index in 0..options.len() {
            let option_loc = loc.child(keyword).child(&index.to_string());
            let target = self.schemas.follow_refs(&option_loc)?;
            let is_null = self
                .schemas
                .get(&target)
                .and_then(|s| s.get("type"))
                .is_some_and(|t| t == "null");
            if is_null {
                nullable = true;
            } else {
                non_null.push(option_loc);
            }
        }
        let inner = match non_null.as_slice() {
            [] => {
                return Err(Error::unsupported(
                    self.location(loc),
                    format!("`{keyword}` of only null"),
                ));
            }
            [single] => self.type_of(single)?,
            _ => {
                self.define(loc, |builder| {
                    let mut variants = Vec::new();
                    for option_loc in &non_null {
                        let ty = builder.type_of(option_loc)?;
                        let target = builder.schemas.follow_refs(option_loc)?;
                        let target_schema = builder.object_at(&target)?;
                        let name = match &ty {
                            TypeRef::Named(_) => None, // named after its type, once names exist
                            other => Some(type_ref_label(other)),
                        };
                        let name = name.unwrap_or_default();
                        variants.push(UntaggedVariant {
                            name,
                            doc: schema_doc(target_schema),
                            ty,
                        });
                    }
                    Ok(TypeKind::Untagged { variants })
                })?;
                self.untagged_checks.push(loc.clone());
                TypeRef::Named(loc.clone())
            }
        };
        Ok(if nullable { wrap_option(inner) } else { inner })
    }

    /// Registers a named type at `loc`; `build` computes its kind (the type is
    /// visible while building, so recursive references find it).
    fn define(
        &mut self,
        loc: &SchemaLoc,
        build: impl FnOnce(&mut Self) -> Result<TypeKind, Error>,
    ) -> Result<(), Error> {
        if self.drafts.contains_key(loc) {
            return Ok(()); // already defined, or being defined higher up a recursion
        }
        let schema = self.object_at(loc)?;
        let title = schema
            .get("title")
            .and_then(Value::as_str)
            .map(str::to_owned);
        self.drafts.insert(
            loc.clone(),
            Draft {
                title,
                fixed_name: None,
                doc: type_doc(schema, loc),
                kind: None,
                message: None,
            },
        );
        // Inside a named type, a schema met again is a (boxed) reference to it.
        let outer_inline_path = std::mem::take(&mut self.inline_path);
        let kind = build(self);
        self.inline_path = outer_inline_path;
        let kind = kind?;
        if let Some(draft) = self.drafts.get_mut(loc) {
            draft.kind = Some(kind);
        }
        Ok(())
    }

    /// Defines a message root: always a named type.
    fn define_root(
        &mut self,
        root: &SchemaLoc,
        name: String,
        message: MessageInfo,
    ) -> Result<(), Error> {
        if !self.drafts.contains_key(root) {
            let ty = self.type_of(root)?;
            if matches!(ty, TypeRef::Option(_)) {
                return Err(Error::unsupported(
                    self.location(root),
                    "a message schema that admits `null`",
                ));
            }
            // Strings, maps and the like get a transparent wrapper to carry the name.
            self.define(root, |_| Ok(TypeKind::Newtype { inner: ty }))?;
        }
        match self.drafts.get_mut(root) {
            Some(draft) => {
                draft.fixed_name = Some(name);
                draft.message = Some(message);
                Ok(())
            }
            None => Err(Error::Internal {
                file: root.to_string(),
                reason: "message type was not defined".into(),
            }),
        }
    }

    /// Checks that serde can tell the alternatives of each untagged enum apart.
    fn check_untagged(&self) -> Result<(), Error> {
        for loc in &self.untagged_checks {
            let Some(Draft {
                kind: Some(TypeKind::Untagged { variants }),
                ..
            }) = self.drafts.get(loc)
            else {
                continue;
            };
            let shapes: Vec<Shape> = variants.iter().map(|v| self.shape(&v.ty)).collect();
            for (i, earlier) in shapes.iter().enumerate() {
                for later in &shapes[i + 1..] {
                    if let Err(reason) = distinguishable(earlier, later) {
                        return Err(Error::unsupported(
                            self.location(loc),
                            format!(
                                "alternatives {} and later ones cannot be told apart when decoding: {reason}",
                                i
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn shape(&self, ty: &TypeRef) -> Shape {
        match ty {
            TypeRef::String | TypeRef::DateTime => Shape::String,
            TypeRef::Integer => Shape::Integer,
            TypeRef::Number => Shape::Number,
            TypeRef::Boolean => Shape::Boolean,
            TypeRef::Value | TypeRef::Option(_) => Shape::Any,
            TypeRef::FreeObject | TypeRef::Map(_) => Shape::AnyObject,
            TypeRef::Array(_) => Shape::Array,
            TypeRef::Boxed(inner) => self.shape(inner),
            TypeRef::Named(loc) => match self.drafts.get(loc).and_then(|d| d.kind.as_ref()) {
                Some(TypeKind::StringEnum { .. }) => Shape::String,
                Some(TypeKind::Struct { fields, additional }) => Shape::Object {
                    required: fields
                        .iter()
                        .filter(|f| f.required)
                        .map(|f| f.json_name.clone())
                        .collect(),
                    declared: fields.iter().map(|f| f.json_name.clone()).collect(),
                    closed: additional.is_none()
                        && self
                            .schemas
                            .get(loc)
                            .and_then(|s| s.get("additionalProperties"))
                            .is_some_and(|a| a == &Value::Bool(false)),
                },
                Some(TypeKind::Newtype { inner }) => self.shape(inner),
                Some(TypeKind::Untagged { .. }) | None => Shape::Any,
            },
        }
    }

    fn field_doc(
        &self,
        property_loc: &SchemaLoc,
        ty: &TypeRef,
        required: bool,
    ) -> Result<String, Error> {
        let own = self.object_at(property_loc)?;
        let target_loc = self.schemas.follow_refs(property_loc)?;
        let target = self.object_at(&target_loc)?;
        let text = doc_text(own).or_else(|| doc_text(target));
        let mut doc = text.unwrap_or_else(|| {
            let name = property_loc.tokens().last().cloned().unwrap_or_default();
            format!("The `{name}` property.")
        });
        let mut constraints = Vec::new();
        // A `$ref` sibling `default` documents this use of the shared schema.
        if let Some(default) = own.get("default").or_else(|| target.get("default")) {
            constraints.push(format!("Default: {}", code_span(&default.to_string())));
        }
        if !matches!(strip_option(ty), TypeRef::Named(_)) {
            constraints.extend(self.inline_constraints(&target_loc, target, 0)?);
        }
        if !required && matches!(ty, TypeRef::Option(_)) {
            constraints.push("`null` and an absent value both read as `None`.".to_owned());
        }
        if !constraints.is_empty() {
            doc.push_str("\n\n");
            doc.push_str(&bullets(&constraints));
        }
        Ok(doc)
    }

    /// Constraint lines of an inline (unnamed) type, with array items and map
    /// values nested.
    fn inline_constraints(
        &self,
        loc: &SchemaLoc,
        schema: &Map<String, Value>,
        depth: usize,
    ) -> Result<Vec<String>, Error> {
        let mut lines = constraint_lines(schema);
        if depth > 4 {
            return Ok(lines);
        }
        for (keyword, label) in [("items", "Items"), ("additionalProperties", "Values")] {
            if let Some(Value::Object(_)) = schema.get(keyword) {
                let child_loc = self.schemas.follow_refs(&loc.child(keyword))?;
                if self.drafts.contains_key(&child_loc) {
                    continue;
                }
                let child = self.object_at(&child_loc)?;
                let nested = self.inline_constraints(&child_loc, child, depth + 1)?;
                if !nested.is_empty() {
                    lines.push(format!("{label}:"));
                    lines.extend(nested.into_iter().map(|line| format!("  - {line}")));
                }
            }
        }
        Ok(lines)
    }

    /// Decides every name and boxes recursive fields.
    fn finish(self, reserved: &BTreeSet<String>) -> Result<BTreeMap<SchemaLoc, TypeDef>, Error> {
        let names = decide_names(&self.drafts, reserved);
        let mut types = BTreeMap::new();
        for (loc, draft) in &self.drafts {
            let Some(kind) = draft.kind.clone() else {
                return Err(Error::Internal {
                    file: self.location(loc).to_string(),
                    reason: "type left undefined".into(),
                });
            };
            types.insert(
                loc.clone(),
                TypeDef {
                    name: names[loc].clone(),
                    doc: draft.doc.clone(),
                    kind,
                    message: draft.message.clone(),
                },
            );
        }
        name_untagged_variants(&mut types, &self)?;
        box_recursion(&mut types);
        Ok(types)
    }
}

fn empty_object() -> &'static Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Map::new)
}

fn wrap_option(inner: TypeRef) -> TypeRef {
    match inner {
        TypeRef::Option(_) => inner,
        other => TypeRef::Option(Box::new(other)),
    }
}

/// The type inside a (nullable) `Option`.
pub fn strip_option(ty: &TypeRef) -> &TypeRef {
    match ty {
        TypeRef::Option(inner) => inner,
        other => other,
    }
}

fn enum_values(schema: &Map<String, Value>) -> Option<Vec<Value>> {
    match (schema.get("enum"), schema.get("const")) {
        (Some(Value::Array(values)), _) => Some(values.clone()),
        // A non-array `enum` is reported by `check_keywords`.
        (Some(_), _) => None,
        (None, Some(value)) => Some(vec![value.clone()]),
        (None, None) => None,
    }
}

fn string_enum(at: &Location, values: &[String]) -> Result<TypeKind, Error> {
    let mut variants: Vec<VariantDef> = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for value in values {
        if variants.iter().any(|v| &v.value == value) {
            continue; // a repeated value is still one variant
        }
        let name = variant_name(value);
        if let Some(other) = seen.insert(name.clone(), value.clone()) {
            return Err(Error::NameCollision {
                at: at.clone(),
                reason: format!("enum values {other:?} and {value:?} both map to variant `{name}`"),
            });
        }
        variants.push(VariantDef {
            name,
            value: value.clone(),
        });
    }
    let catch_all = ["Unknown", "UnknownValue", "Unrecognized"]
        .into_iter()
        .find(|name| !seen.contains_key(*name))
        .ok_or_else(|| Error::NameCollision {
            at: at.clone(),
            reason: "no name is left for the catch-all variant of unknown values".into(),
        })?
        .to_owned();
    Ok(TypeKind::StringEnum {
        variants,
        catch_all,
    })
}

/// How serde sees a value when trying untagged alternatives.
enum Shape {
    Any,
    AnyObject,
    Object {
        required: BTreeSet<String>,
        declared: BTreeSet<String>,
        closed: bool,
    },
    Array,
    String,
    Integer,
    Number,
    Boolean,
}

/// Whether serde, trying `earlier` first, never takes a value meant for `later`.
fn distinguishable(earlier: &Shape, later: &Shape) -> Result<(), String> {
    use Shape::*;
    match (earlier, later) {
        (Any, _) => Err("an alternative accepting any value comes first".into()),
        (AnyObject, AnyObject | Object { .. }) => {
            Err("a free-form object alternative comes before another object".into())
        }
        (
            Object { required, .. },
            Object {
                declared, closed, ..
            },
        ) => {
            if *closed && required.iter().any(|p| !declared.contains(p)) {
                Ok(())
            } else {
                Err("the earlier object has no required property the later one forbids".into())
            }
        }
        (Array, Array) => Err("two array alternatives".into()),
        (String, String) => Err("two string alternatives".into()),
        (Integer, Integer) | (Number, Number) | (Number, Integer) => {
            Err("numeric alternatives overlap".into())
        }
        (Boolean, Boolean) => Err("two boolean alternatives".into()),
        _ => Ok(()),
    }
}

fn type_ref_label(ty: &TypeRef) -> String {
    match ty {
        TypeRef::String => "String".into(),
        TypeRef::Integer => "Integer".into(),
        TypeRef::Number => "Number".into(),
        TypeRef::Boolean => "Boolean".into(),
        TypeRef::DateTime => "DateTime".into(),
        TypeRef::Value => "Value".into(),
        TypeRef::FreeObject | TypeRef::Map(_) => "Object".into(),
        TypeRef::Array(_) => "Array".into(),
        TypeRef::Option(inner) | TypeRef::Boxed(inner) => type_ref_label(inner),
        TypeRef::Named(_) => String::new(),
    }
}

/// Gives untagged variants holding named types the name of that type.
fn name_untagged_variants(
    types: &mut BTreeMap<SchemaLoc, TypeDef>,
    builder: &ServiceBuilder<'_>,
) -> Result<(), Error> {
    let names: BTreeMap<SchemaLoc, String> = types
        .iter()
        .map(|(loc, def)| (loc.clone(), def.name.clone()))
        .collect();
    for (loc, def) in types.iter_mut() {
        if let TypeKind::Untagged { variants } = &mut def.kind {
            let mut seen = BTreeSet::new();
            for variant in variants.iter_mut() {
                if let TypeRef::Named(target) = strip_option(&variant.ty) {
                    variant.name = names[target].clone();
                }
                if !seen.insert(variant.name.clone()) {
                    return Err(Error::NameCollision {
                        at: builder.location(loc),
                        reason: format!("two alternatives map to variant `{}`", variant.name),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Names: fixed names first; then titles that are unique and free; then, in
/// order of depth, names derived from the location: the name of the nearest
/// enclosing named type plus the property path (`Part` + `size` → `PartSize`);
/// a numeric suffix settles what still collides.
fn decide_names(
    drafts: &BTreeMap<SchemaLoc, Draft>,
    reserved: &BTreeSet<String>,
) -> BTreeMap<SchemaLoc, String> {
    let mut names: BTreeMap<SchemaLoc, String> = BTreeMap::new();
    let mut taken: BTreeSet<String> = reserved.clone();
    for (loc, draft) in drafts {
        if let Some(fixed) = &draft.fixed_name {
            names.insert(loc.clone(), fixed.clone());
            taken.insert(fixed.clone());
        }
    }
    let titles: BTreeMap<&SchemaLoc, String> = drafts
        .iter()
        .filter(|(_, draft)| draft.fixed_name.is_none())
        .filter_map(|(loc, draft)| Some((loc, draft.title.as_deref().and_then(type_name)?)))
        .collect();
    for (loc, title) in &titles {
        let unique = titles.values().filter(|other| *other == title).count() == 1;
        if unique && !taken.contains(title) {
            names.insert((*loc).clone(), title.clone());
            taken.insert(title.clone());
        }
    }
    let mut rest: Vec<&SchemaLoc> = drafts
        .keys()
        .filter(|loc| !names.contains_key(*loc))
        .collect();
    rest.sort_by_key(|loc| (loc.tokens().len(), (*loc).clone()));
    for loc in rest {
        let base = path_name(loc, &names);
        let mut name = base.clone();
        let mut suffix = 2;
        while taken.contains(&name) {
            name = format!("{base}{suffix}");
            suffix += 1;
        }
        taken.insert(name.clone());
        names.insert(loc.clone(), name);
    }
    names
}

/// Boxes every by-value use of a named type that leads back to the user,
/// so recursive types have a finite size.
fn box_recursion(types: &mut BTreeMap<SchemaLoc, TypeDef>) {
    let edges: BTreeMap<SchemaLoc, BTreeSet<SchemaLoc>> = types
        .iter()
        .map(|(loc, def)| {
            let mut out = BTreeSet::new();
            for ty in kind_types(&def.kind) {
                by_value_named(ty, &mut out);
            }
            (loc.clone(), out)
        })
        .collect();
    let reaches = |from: &SchemaLoc, to: &SchemaLoc| {
        let mut stack = vec![from.clone()];
        let mut seen = BTreeSet::new();
        while let Some(loc) = stack.pop() {
            if &loc == to {
                return true;
            }
            if seen.insert(loc.clone())
                && let Some(next) = edges.get(&loc)
            {
                stack.extend(next.iter().cloned());
            }
        }
        false
    };
    let mut to_box: BTreeMap<SchemaLoc, BTreeSet<SchemaLoc>> = BTreeMap::new();
    for (loc, targets) in &edges {
        for target in targets {
            if reaches(target, loc) {
                to_box
                    .entry(loc.clone())
                    .or_default()
                    .insert(target.clone());
            }
        }
    }
    for (loc, targets) in to_box {
        if let Some(def) = types.get_mut(&loc) {
            for ty in kind_types_mut(&mut def.kind) {
                box_by_value(ty, &targets);
            }
        }
    }
}

/// The types a type's fields, map values, alternatives or wrapped value use.
pub fn kind_types(kind: &TypeKind) -> Vec<&TypeRef> {
    match kind {
        TypeKind::Struct { fields, additional } => fields
            .iter()
            .map(|f| &f.ty)
            .chain(additional.iter().map(|(_, ty)| ty))
            .collect(),
        TypeKind::Untagged { variants } => variants.iter().map(|v| &v.ty).collect(),
        TypeKind::Newtype { inner } => vec![inner],
        TypeKind::StringEnum { .. } => Vec::new(),
    }
}

fn kind_types_mut(kind: &mut TypeKind) -> Vec<&mut TypeRef> {
    match kind {
        TypeKind::Struct { fields, .. } => fields.iter_mut().map(|f| &mut f.ty).collect(),
        TypeKind::Untagged { variants } => variants.iter_mut().map(|v| &mut v.ty).collect(),
        TypeKind::Newtype { inner } => vec![inner],
        TypeKind::StringEnum { .. } => Vec::new(),
    }
}

/// Named types held by value (not behind `Vec`, map or `Box`).
fn by_value_named(ty: &TypeRef, out: &mut BTreeSet<SchemaLoc>) {
    match ty {
        TypeRef::Named(loc) => {
            out.insert(loc.clone());
        }
        TypeRef::Option(inner) => by_value_named(inner, out),
        _ => {}
    }
}

fn box_by_value(ty: &mut TypeRef, targets: &BTreeSet<SchemaLoc>) {
    match ty {
        TypeRef::Named(loc) if targets.contains(loc) => {
            *ty = TypeRef::Boxed(Box::new(TypeRef::Named(loc.clone())));
        }
        TypeRef::Option(inner) => box_by_value(inner, targets),
        _ => {}
    }
}

/// Description, or title when there is no description.
fn doc_text(schema: &Map<String, Value>) -> Option<String> {
    let text = |key: &str| {
        schema
            .get(key)
            .and_then(Value::as_str)
            .map(clean_text)
            .filter(|t| !t.is_empty())
    };
    text("description").or_else(|| text("title"))
}

fn schema_doc(schema: &Map<String, Value>) -> String {
    let title = schema.get("title").and_then(Value::as_str).map(clean_text);
    let description = schema
        .get("description")
        .and_then(Value::as_str)
        .map(clean_text);
    [title, description]
        .into_iter()
        .flatten()
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Doc of a named type: title, description, constraints and schema location.
fn type_doc(schema: &Map<String, Value>, loc: &SchemaLoc) -> String {
    let mut parts = Vec::new();
    let text = schema_doc(schema);
    if !text.is_empty() {
        parts.push(text);
    }
    let constraints: Vec<String> = constraint_lines(schema)
        .into_iter()
        .filter(|line| !line.starts_with("Possible values"))
        .collect();
    if !constraints.is_empty() {
        parts.push(bullets(&constraints));
    }
    parts.push(format!("Schema: {}", code_span(&loc.to_string())));
    parts.join("\n\n")
}

/// A markdown list of constraint lines; lines starting with spaces are
/// already-formatted nested items.
fn bullets(lines: &[String]) -> String {
    lines
        .iter()
        .map(|line| {
            if line.starts_with(' ') {
                line.clone()
            } else {
                format!("- {line}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Trims trailing whitespace of every line and blank lines around the text.
pub fn clean_text(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    let start = lines
        .iter()
        .position(|l| !l.is_empty())
        .unwrap_or(lines.len());
    let end = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(start, |e| e + 1);
    lines[start..end].join("\n")
}

/// Markdown code span holding `text` verbatim (backtick fence longer than any run inside).
pub fn code_span(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    let fence = "`".repeat(longest + 1);
    if longest > 0 || text.starts_with(' ') || text.ends_with(' ') {
        format!("{fence} {text} {fence}")
    } else {
        format!("{fence}{text}{fence}")
    }
}

/// Human-readable constraints of a schema, like the Go client's comments.
fn constraint_lines(schema: &Map<String, Value>) -> Vec<String> {
    let mut lines = Vec::new();
    let is_string_enum =
        enum_values(schema).is_some_and(|v| v.iter().all(|x| x.is_string() || x.is_null()));
    if let Some(values) = enum_values(schema)
        && !is_string_enum
    {
        let listed: Vec<String> = values.iter().map(|v| code_span(&v.to_string())).collect();
        lines.push(format!("Possible values: {}", listed.join(", ")));
    }
    if let Some(Value::String(pattern)) = schema.get("pattern") {
        lines.push(format!("Syntax: {}", code_span(pattern)));
    }
    let numeric = [
        ("minLength", "Min length"),
        ("maxLength", "Max length"),
        ("minimum", "Minimum"),
        ("maximum", "Maximum"),
        ("exclusiveMinimum", "Exclusive minimum"),
        ("exclusiveMaximum", "Exclusive maximum"),
        ("multipleOf", "Multiple of"),
        ("minItems", "Min items"),
        ("maxItems", "Max items"),
        ("minProperties", "Min properties"),
        ("maxProperties", "Max properties"),
    ];
    let ty = schema.get("type").and_then(Value::as_str);
    for (keyword, label) in numeric {
        // Keywords of another type (maxLength on an integer) do not apply.
        let applies = match keyword {
            "minLength" | "maxLength" => ty.is_none_or(|t| t == "string"),
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" | "multipleOf" => {
                ty.is_none_or(|t| t == "integer" || t == "number")
            }
            "minItems" | "maxItems" => ty.is_none_or(|t| t == "array"),
            _ => ty.is_none_or(|t| t == "object"),
        };
        if let Some(value) = schema.get(keyword).filter(|_| applies) {
            lines.push(format!("{label}: {value}"));
        }
    }
    if schema.get("uniqueItems") == Some(&Value::Bool(true)) {
        lines.push("Unique items".to_owned());
    }
    match schema.get("format").and_then(Value::as_str) {
        None | Some("date-time") => {}
        Some(format) => lines.push(format!("Format: {}", code_span(format))),
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{Sources, load};
    use serde_json::json;

    fn reference(entries: Value) -> Value {
        crate::load::tests::demo_reference(entries)
    }

    fn entry(name: &str, schema: &str) -> Value {
        json!({
            "type": "topic-exchange",
            "name": name,
            "exchange": name,
            "title": name,
            "description": "d",
            "schema": schema,
            "routingKey": [
                {"name": "routingKeyKind", "summary": "kind", "constant": "primary",
                 "multipleWords": false, "required": true},
                {"name": "thingId", "summary": "id", "multipleWords": false, "required": true},
                {"name": "reserved", "summary": "r", "multipleWords": true, "required": false}
            ]
        })
    }

    /// Builds the model of one `demo` service with one entry per schema file
    /// (`thing.json` gives entry `thing`).
    fn model_of(schemas: &[(&str, Value)]) -> Result<ServiceModel, Error> {
        let entries: Vec<Value> = schemas
            .iter()
            .filter(|(name, _)| !name.starts_with('_'))
            .map(|(name, _)| entry(name.trim_end_matches(".json"), &format!("v1/{name}#")))
            .collect();
        let mut files: BTreeMap<String, String> = schemas
            .iter()
            .map(|(name, schema)| {
                let mut schema = schema.clone();
                schema["$id"] = Value::from(format!("/schemas/demo/v1/{name}#"));
                (format!("demo/v1/{name}"), schema.to_string())
            })
            .collect();
        files.insert(
            "demo/v1/exchanges.json".into(),
            reference(Value::Array(entries)).to_string(),
        );
        let loaded = load(&Sources::from_directory_files("references", files))?;
        let mut model = build(&loaded)?;
        Ok(model.services.remove(0))
    }

    fn find<'m>(model: &'m ServiceModel, name: &str) -> &'m TypeDef {
        model
            .types
            .values()
            .find(|t| t.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no type {name}: {:?}",
                    model.types.values().map(|t| &t.name).collect::<Vec<_>>()
                )
            })
    }

    fn fields(def: &TypeDef) -> &[FieldDef] {
        match &def.kind {
            TypeKind::Struct { fields, .. } => fields,
            other => panic!("not a struct: {other:?}"),
        }
    }

    fn field<'d>(def: &'d TypeDef, json: &str) -> &'d FieldDef {
        fields(def).iter().find(|f| f.json_name == json).unwrap()
    }

    #[test]
    fn scalars_formats_and_requiredness() {
        let model = model_of(&[(
            "thing.json",
            json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["id", "when"],
                "properties": {
                    "id": {"type": "string", "pattern": "^[a-z]+$", "minLength": 1, "maxLength": 38},
                    "when": {"type": "string", "format": "date-time"},
                    "count": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "ratio": {"type": "number"},
                    "flag": {"type": "boolean", "default": false},
                    "anything": {"description": "whatever"},
                    "free": {"type": "object"},
                    "tags": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 4096}},
                    "list": {"type": "array", "items": {"type": "string"}, "uniqueItems": true},
                    "version": {"enum": [1]},
                    "maybe": {"type": ["string", "null"]}
                }
            }),
        )])
        .unwrap();
        let message = find(&model, "ThingMessage");
        assert_eq!(field(message, "id").ty, TypeRef::String);
        assert!(field(message, "id").required);
        assert!(field(message, "id").doc.contains("- Syntax: `^[a-z]+$`"));
        assert!(
            field(message, "id")
                .doc
                .contains("- Min length: 1\n- Max length: 38")
        );
        assert_eq!(field(message, "when").ty, TypeRef::DateTime);
        assert_eq!(field(message, "count").ty, TypeRef::Integer);
        assert!(!field(message, "count").required);
        assert!(
            field(message, "count")
                .doc
                .contains("- Minimum: 0\n- Maximum: 1000")
        );
        assert_eq!(field(message, "ratio").ty, TypeRef::Number);
        assert_eq!(field(message, "flag").ty, TypeRef::Boolean);
        assert!(field(message, "flag").doc.contains("- Default: `false`"));
        assert_eq!(field(message, "anything").ty, TypeRef::Value);
        assert_eq!(field(message, "free").ty, TypeRef::FreeObject);
        assert_eq!(
            field(message, "tags").ty,
            TypeRef::Map(Box::new(TypeRef::String))
        );
        assert!(
            field(message, "tags")
                .doc
                .contains("- Values:\n  - Max length: 4096")
        );
        assert_eq!(
            field(message, "list").ty,
            TypeRef::Array(Box::new(TypeRef::String))
        );
        assert!(field(message, "list").doc.contains("- Unique items"));
        assert_eq!(field(message, "version").ty, TypeRef::Integer);
        assert!(
            field(message, "version")
                .doc
                .contains("- Possible values: `1`")
        );
        assert_eq!(
            field(message, "maybe").ty,
            TypeRef::Option(Box::new(TypeRef::String))
        );
        // Fields come sorted by JSON name.
        let names: Vec<&str> = fields(message)
            .iter()
            .map(|f| f.json_name.as_str())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn string_enums_const_and_catch_all() {
        let model = model_of(&[(
            "thing.json",
            json!({
                "type": "object",
                "properties": {
                    "state": {"title": "Run State", "type": "string", "enum": ["pending", "task-retry", "unknown"]},
                    "kind": {"const": "topic-exchange"},
                    "action": {"enum": ["opened", "review_requested"]}
                }
            }),
        )])
        .unwrap();
        let state = find(&model, "RunState");
        let TypeKind::StringEnum {
            variants,
            catch_all,
        } = &state.kind
        else {
            panic!("{state:?}")
        };
        let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["Pending", "TaskRetry", "Unknown"]);
        assert_eq!(catch_all, "UnknownValue");
        // Untitled enums are named from their location.
        assert!(matches!(
            find(&model, "ThingMessageKind").kind,
            TypeKind::StringEnum { .. }
        ));
        assert!(matches!(
            find(&model, "ThingMessageAction").kind,
            TypeKind::StringEnum { .. }
        ));
    }

    #[test]
    fn enum_type_mismatch_and_mixed_values_are_errors() {
        let err = model_of(&[(
            "thing.json",
            json!({"type": "object", "properties": {"v": {"type": "string", "enum": [1]}}}),
        )])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "references/demo/v1/thing.json#/properties/v/enum: enum values are integers but `type` is \"string\""
        );
        let err = model_of(&[(
            "thing.json",
            json!({"type": "object", "properties": {"v": {"enum": [1, "a"]}}}),
        )])
        .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }

    #[test]
    fn shared_and_referenced_schemas() {
        let files: BTreeMap<String, String> = [
            ("demo/v1/exchanges.json", reference(json!([entry("created", "v1/pool.json#"), entry("updated", "v1/pool.json#"), entry("statusChanged", "v1/status-message.json#")]))),
            ("demo/v1/pool.json", json!({
                "$id": "/schemas/demo/v1/pool.json#",
                "title": "WorkerType Pulse Message",
                "type": "object",
                "properties": {"providerId": {"$ref": "full.json#/properties/providerId"}},
                "required": ["providerId"]
            })),
            ("demo/v1/full.json", json!({
                "$id": "/schemas/demo/v1/full.json#",
                "type": "object",
                "properties": {"providerId": {"type": "string", "description": "The provider", "maxLength": 38}}
            })),
            ("demo/v1/status-message.json", json!({
                "$id": "/schemas/demo/v1/status-message.json#",
                "type": "object",
                "properties": {"a": {"$ref": "status.json#"}, "b": {"$ref": "status.json#"}, "c": {"$ref": "#/definitions/local"}},
                "definitions": {"local": {"type": "object", "properties": {"x": {"type": "integer"}}}}
            })),
            ("demo/v1/status.json", json!({
                "$id": "/schemas/demo/v1/status.json#",
                "title": "Task Status Structure",
                "type": "object",
                "properties": {"state": {"type": "string"}}
            })),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_string()))
        .collect();
        let loaded = load(&Sources::from_directory_files("references", files)).unwrap();
        let model = build(&loaded).unwrap().services.remove(0);
        let pool = find(&model, "WorkerTypePulseMessage");
        let info = pool.message.as_ref().unwrap();
        assert_eq!(info.exchanges, ["Created", "Updated"]);
        assert_eq!(info.schema_id, "/schemas/demo/v1/pool.json#");
        assert!(field(pool, "providerId").doc.starts_with("The provider"));
        assert!(field(pool, "providerId").doc.contains("- Max length: 38"));
        assert_eq!(model.exchanges[0].message, model.exchanges[1].message);
        let status_message = find(&model, "StatusChangedMessage");
        assert_eq!(field(status_message, "a").ty, field(status_message, "b").ty);
        let TypeRef::Named(loc) = &field(status_message, "a").ty else {
            panic!()
        };
        assert_eq!(model.types[loc].name, "TaskStatusStructure");
        assert!(
            find(&model, "StatusChangedMessageLocal")
                .doc
                .contains("status-message.json#/definitions/local")
        );
        assert_eq!(model.message_enum, "DemoMessage");
    }

    #[test]
    fn recursion_is_boxed() {
        let model = model_of(&[(
            "tree.json",
            json!({
                "type": "object",
                "properties": {
                    "children": {"type": "array", "items": {"$ref": "#"}},
                    "parent": {"$ref": "#"},
                    "node": {"$ref": "#/definitions/node"}
                },
                "definitions": {"node": {"type": "object", "properties": {"next": {"$ref": "#/definitions/node"}, "up": {"$ref": "#"}}}}
            }),
        )])
        .unwrap();
        let tree = find(&model, "TreeMessage");
        let TypeRef::Array(item) = &field(tree, "children").ty else {
            panic!()
        };
        assert!(matches!(**item, TypeRef::Named(_)), "Vec needs no box");
        assert!(matches!(field(tree, "parent").ty, TypeRef::Boxed(_)));
        assert!(matches!(field(tree, "node").ty, TypeRef::Boxed(_)));
        let node = find(&model, "TreeMessageNode");
        assert!(matches!(field(node, "next").ty, TypeRef::Boxed(_)));
        assert!(matches!(field(node, "up").ty, TypeRef::Boxed(_)));
    }

    #[test]
    fn one_of_becomes_untagged_enum_or_option() {
        let model = model_of(&[(
            "irc.json",
            json!({
                "definitions": {"message": {"type": "string", "maxLength": 510}},
                "oneOf": [
                    {"title": "Channel Message", "type": "object", "additionalProperties": false,
                     "properties": {"channel": {"type": "string"}, "message": {"$ref": "#/definitions/message"}},
                     "required": ["channel", "message"]},
                    {"title": "Private Message", "type": "object", "additionalProperties": false,
                     "properties": {"user": {"type": "string"}, "message": {"$ref": "#/definitions/message"}},
                     "required": ["user", "message"]}
                ]
            }),
        )])
        .unwrap();
        let irc = find(&model, "IrcMessage");
        let TypeKind::Untagged { variants } = &irc.kind else {
            panic!("{irc:?}")
        };
        let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["ChannelMessage", "PrivateMessage"]);
        assert!(
            field(find(&model, "ChannelMessage"), "message")
                .doc
                .contains("Max length: 510")
        );

        let model = model_of(&[(
            "n.json",
            json!({"type": "object", "properties": {"v": {"oneOf": [{"type": "null"}, {"type": "integer"}]}, "w": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}),
        )])
        .unwrap();
        let message = find(&model, "NMessage");
        assert_eq!(
            field(message, "v").ty,
            TypeRef::Option(Box::new(TypeRef::Integer))
        );
        let w = find(&model, "NMessageW");
        let TypeKind::Untagged { variants } = &w.kind else {
            panic!()
        };
        assert_eq!(variants[0].name, "String");
        assert_eq!(variants[1].name, "Integer");
    }

    #[test]
    fn ambiguous_one_of_is_an_error() {
        let err = model_of(&[(
            "x.json",
            json!({"oneOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}},
                {"type": "object", "properties": {"b": {"type": "string"}}}
            ]}),
        )])
        .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "references/demo/v1/x.json#: unsupported schema construct: alternatives 0"
            ),
            "{err}"
        );
        let err = model_of(&[(
            "y.json",
            json!({"type": "object", "properties": {"p": {"oneOf": [{"type": "string"}, {"type": "string", "format": "date-time"}]}}}),
        )])
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("references/demo/v1/y.json#/properties/p: unsupported"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_keywords_name_file_and_pointer() {
        let err = model_of(&[(
            "x.json",
            json!({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}]}}}),
        )])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "references/demo/v1/x.json#/properties/a/allOf: unsupported schema construct: keyword `allOf` is not supported"
        );
        let err = model_of(&[(
            "x.json",
            json!({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}}),
        )])
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("references/demo/v1/x.json#/properties/a/type: unsupported")
        );
        let err = model_of(&[(
            "x.json",
            json!({"type": "object", "properties": {"a": {"type": "array", "items": [{"type": "string"}]}}}),
        )])
        .unwrap_err();
        assert!(err.to_string().contains("tuple"));
    }

    #[test]
    fn missing_ref_target_names_the_ref() {
        let err = model_of(&[(
            "x.json",
            json!({"type": "object", "properties": {"a": {"$ref": "other.json#/definitions/a"}}}),
        )])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "references/demo/v1/x.json#/properties/a/$ref: cannot resolve \"other.json#/definitions/a\": no schema has $id /schemas/demo/v1/other.json"
        );
    }

    #[test]
    fn keyword_and_odd_field_names() {
        let model = model_of(&[(
            "x.json",
            json!({"type": "object", "properties": {
                "type": {"type": "string"}, "$schema": {"type": "string"},
                "content-type": {"type": "string"}, "3d": {"type": "string"}, "self": {"type": "string"}
            }}),
        )])
        .unwrap();
        let names: BTreeMap<&str, &str> = fields(find(&model, "XMessage"))
            .iter()
            .map(|f| (f.json_name.as_str(), f.name.as_str()))
            .collect();
        assert_eq!(names["type"], "type_");
        assert_eq!(names["$schema"], "schema");
        assert_eq!(names["content-type"], "content_type");
        assert_eq!(names["3d"], "_3d");
        assert_eq!(names["self"], "self_");
    }

    #[test]
    fn properties_beyond_the_declared_ones_are_kept_unless_forbidden() {
        fn additional(schema: Value) -> Option<TypeRef> {
            let mut schema = schema;
            schema["type"] = json!("object");
            schema["title"] = json!("Thing");
            schema["properties"] = json!({"id": {"type": "string"}});
            let model = model_of(&[("thing.json", schema)]).unwrap();
            match &find(&model, "ThingMessage").kind {
                TypeKind::Struct { additional, .. } => additional.as_ref().map(|(name, ty)| {
                    assert_eq!(name, ADDITIONAL_FIELD);
                    ty.clone()
                }),
                other => panic!("not a struct: {other:?}"),
            }
        }
        // Absent means any value is allowed (JSON Schema's default).
        assert_eq!(additional(json!({})), Some(TypeRef::Value));
        assert_eq!(
            additional(json!({"additionalProperties": true})),
            Some(TypeRef::Value)
        );
        assert_eq!(
            additional(json!({"additionalProperties": {}})),
            Some(TypeRef::Value)
        );
        assert_eq!(
            additional(json!({"additionalProperties": {"type": "integer"}})),
            Some(TypeRef::Integer)
        );
        assert_eq!(additional(json!({"additionalProperties": false})), None);

        // A property that would take the map's field is an error naming it.
        let err = model_of(&[(
            "x.json",
            json!({"type": "object", "properties": {"additionalProperties": {"type": "string"}}}),
        )])
        .unwrap_err();
        assert!(matches!(err, Error::NameCollision { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("#/properties/additionalProperties"),
            "{err}"
        );
    }

    #[test]
    fn field_collisions_are_errors() {
        let err = model_of(&[(
            "x.json",
            json!({"type": "object", "properties": {"fooBar": {"type": "string"}, "foo-bar": {"type": "string"}}}),
        )])
        .unwrap_err();
        assert!(matches!(err, Error::NameCollision { .. }), "{err}");
        assert!(
            err.to_string().contains("both map to field `foo_bar`"),
            "{err}"
        );
    }

    #[test]
    fn type_name_collisions_fall_back_then_get_suffixes() {
        let model = model_of(&[(
            "x.json",
            json!({"type": "object", "properties": {
                "a": {"title": "Thing", "type": "object", "properties": {"v": {"type": "string"}}},
                "b": {"title": "Thing", "type": "object", "properties": {"w": {"type": "string"}}},
                "c": {"title": "X", "type": "object", "properties": {"w": {"type": "string"}}},
                "d": {"title": "Demo Message", "type": "object", "properties": {"w": {"type": "string"}}}
            }}),
        )])
        .unwrap();
        let names: BTreeSet<&str> = model.types.values().map(|t| t.name.as_str()).collect();
        // Two "Thing"s fall back to location names; a title equal to a binding
        // (`X`) or the service enum (`DemoMessage`) does too.
        assert!(
            names.contains("XMessageA") && names.contains("XMessageB"),
            "{names:?}"
        );
        assert!(
            names.contains("XMessageC") && names.contains("XMessageD"),
            "{names:?}"
        );
        assert!(!names.contains("Thing"));
    }

    #[test]
    fn service_enum_yields_to_message_type() {
        let files: BTreeMap<String, String> = [
            (
                "demo/v1/exchanges.json",
                reference(json!([entry("demo", "v1/x.json#")])),
            ),
            (
                "demo/v1/x.json",
                json!({"$id": "/schemas/demo/v1/x.json#", "type": "object", "properties": {}}),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_string()))
        .collect();
        let loaded = load(&Sources::from_directory_files("references", files)).unwrap();
        let model = build(&loaded).unwrap().services.remove(0);
        assert_eq!(model.message_enum, "AnyDemoMessage");
        assert!(model.types.values().any(|t| t.name == "DemoMessage"));
    }

    #[test]
    fn non_object_message_root_is_a_newtype() {
        let model = model_of(&[(
            "s.json",
            json!({"type": "string", "description": "just text"}),
        )])
        .unwrap();
        let root = find(&model, "SMessage");
        assert!(matches!(
            &root.kind,
            TypeKind::Newtype {
                inner: TypeRef::String
            }
        ));
    }

    #[test]
    fn routing_key_fields() {
        let model = model_of(&[("x.json", json!({"type": "object", "properties": {}}))]).unwrap();
        let fields: Vec<Option<&str>> = model.exchanges[0]
            .words
            .iter()
            .map(|w| w.field.as_deref())
            .collect();
        assert_eq!(fields, [None, Some("thing_id"), Some("reserved")]);
        assert_eq!(model.exchanges[0].exchange, "exchange/demo/v1/x");
    }
}
