//! Unit tests of the model stage.

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
