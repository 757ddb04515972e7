//! The intermediate representation: services, exchanges, routing-key words
//! and the named Rust types (structs, enums, newtypes) with their fields and
//! variants, and the uses of types ([`TypeRef`]).

use super::*;

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

pub(super) fn wrap_option(inner: TypeRef) -> TypeRef {
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

pub(super) fn kind_types_mut(kind: &mut TypeKind) -> Vec<&mut TypeRef> {
    match kind {
        TypeKind::Struct { fields, .. } => fields.iter_mut().map(|f| &mut f.ty).collect(),
        TypeKind::Untagged { variants } => variants.iter_mut().map(|v| &mut v.ty).collect(),
        TypeKind::Newtype { inner } => vec![inner],
        TypeKind::StringEnum { .. } => Vec::new(),
    }
}
