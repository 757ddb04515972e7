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
//!
//! One concern per submodule: `ir` (the types of the model, re-exported here), `types`
//! (schema → type mapping), `alternatives` (enums, `oneOf`/`anyOf`), `names`
//! (naming), `recursion` (boxing recursive types) and `docs` (doc comments
//! and constraint text); this file drives them per service.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::error::{Error, Location};
use crate::load::{ExchangeEntry, ExchangeReference, Loaded};
use crate::naming::{field_name, module_name, type_name, variant_name};
use crate::resolve::{SchemaLoc, SchemaSet};

mod alternatives;
mod docs;
mod ir;
mod names;
mod recursion;
#[cfg(test)]
mod tests;
mod types;

pub use docs::{clean_text, code_span};
pub use ir::*;

use alternatives::*;
use docs::*;
use names::*;
use recursion::*;

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
