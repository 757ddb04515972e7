//! Bad input through the public API: every error names the file and JSON
//! pointer at fault (or line and column for malformed JSON), and nothing is
//! produced.

mod common;

use std::collections::BTreeMap;

use common::{fixture_dir, read_tree};
use exchange_codegen::{Error, Sources, generate};

/// The `constructs` fixture with one file replaced.
fn with_file(
    path: &str,
    edit: impl FnOnce(&str) -> String,
) -> Result<BTreeMap<String, String>, Error> {
    let mut files = read_tree(&fixture_dir("constructs").join("references"));
    let original = files
        .get(path)
        .unwrap_or_else(|| panic!("fixture has {path}"));
    let edited = edit(original);
    assert_ne!(&edited, original, "the edit must change {path}");
    files.insert(path.to_owned(), edited);
    generate(&Sources::from_directory_files("references", files))
}

fn edit_json(path: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Error {
    with_file(path, |text| {
        let mut json: serde_json::Value = serde_json::from_str(text).unwrap();
        edit(&mut json);
        json.to_string()
    })
    .expect_err("the edited fixture must be rejected")
}

#[test]
fn malformed_json_names_file_line_and_column() {
    let error = with_file("demo-service/v1/status.json", |text| {
        text.replacen("\"title\"", "title", 1)
    })
    .expect_err("malformed JSON is rejected");
    let Error::MalformedJson { file, line, .. } = &error else {
        panic!("unexpected error {error:?}")
    };
    assert_eq!(file, "references/demo-service/v1/status.json");
    assert!(*line > 1);
    assert!(
        error
            .to_string()
            .starts_with("references/demo-service/v1/status.json:")
    );
}

#[test]
fn missing_ref_target_names_the_ref_and_the_target() {
    let error = edit_json("demo-service/v1/thing-message.json", |json| {
        json["properties"]["thingId"]["$ref"] = "common.json#/definitions/missing".into();
    });
    assert_eq!(
        error.to_string(),
        "references/demo-service/v1/thing-message.json#/properties/thingId/$ref: cannot resolve \
         \"common.json#/definitions/missing\": references/demo-service/v1/common.json \
         (/schemas/demo-service/v1/common.json) has nothing at pointer \"/definitions/missing\""
    );
}

#[test]
fn missing_message_schema_names_the_entry() {
    let error = edit_json("demo-service/v1/exchanges.json", |json| {
        json["entries"][2]["schema"] = "v1/gone.json#".into();
    });
    assert_eq!(
        error.to_string(),
        "references/demo-service/v1/exchanges.json#/entries/2/schema: cannot resolve \
         \"v1/gone.json#\": no schema has $id /schemas/demo-service/v1/gone.json"
    );
}

#[test]
fn unsupported_construct_names_file_and_pointer() {
    let error = edit_json("demo-service/v1/common.json", |json| {
        json["definitions"]["run"]["properties"]["runId"]["not"] = serde_json::json!({"const": 3});
    });
    assert_eq!(
        error.to_string(),
        "references/demo-service/v1/common.json#/definitions/run/properties/runId/not: \
         unsupported schema construct: keyword `not` is not supported"
    );
}

#[test]
fn invalid_reference_names_the_word() {
    let error = edit_json("demo-service/v1/exchanges.json", |json| {
        json["entries"][0]["routingKey"][1]
            .as_object_mut()
            .unwrap()
            .remove("name");
    });
    assert_eq!(
        error.to_string(),
        "references/demo-service/v1/exchanges.json#/entries/0/routingKey/1: missing \"name\""
    );
}

#[test]
fn colliding_routing_key_fields_are_rejected() {
    let error = edit_json("demo-service/v1/exchanges.json", |json| {
        json["entries"][0]["routingKey"][2]["name"] = "thing-id".into();
    });
    assert!(matches!(error, Error::NameCollision { .. }), "{error}");
    assert!(
        error
            .to_string()
            .starts_with("references/demo-service/v1/exchanges.json#/entries/0/routingKey/2/name:"),
        "{error}"
    );
}

/// A schema that contains itself with no object (named type) in between
/// would be an infinitely nested Rust type.
#[test]
fn self_containing_array_schema_is_an_error_not_a_stack_overflow() {
    let error = with_file("tiny/v1/text.json", |_| {
        r##"{"$id": "/schemas/tiny/v1/text.json#", "type": "array", "items": {"$ref": "#"}}"##
            .to_owned()
    })
    .expect_err("an array of itself is rejected");
    assert!(matches!(error, Error::Unsupported { .. }), "{error}");
    assert_eq!(
        error.to_string(),
        "references/tiny/v1/text.json#/items: unsupported schema construct: the schema \
         /schemas/tiny/v1/text.json# contains itself with no object in between \
         (an infinitely nested type)"
    );
}

#[test]
fn self_containing_map_and_nullable_schemas_are_errors() {
    for (schema, pointer) in [
        (
            r##"{"type": "object", "additionalProperties": {"$ref": "#"}}"##,
            "/additionalProperties",
        ),
        (
            r##"{"oneOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#/oneOf/1"}}]}"##,
            "/oneOf/1/items",
        ),
        (
            r##"{"type": "array", "items": {"$ref": "#/definitions/list"},
                "definitions": {"list": {"type": "array", "items": {"$ref": "#"}}}}"##,
            "/definitions/list/items",
        ),
    ] {
        let error = with_file("tiny/v1/text.json", |_| schema.to_owned())
            .expect_err("a schema containing itself is rejected");
        assert!(
            error
                .to_string()
                .starts_with(&format!("references/tiny/v1/text.json#{pointer}: ")),
            "{schema}: {error}"
        );
    }
}

/// A very long chain of schemas (each an object holding the next) is refused
/// with an error rather than overflowing the stack.
#[test]
fn overly_deep_nesting_is_an_error() {
    let mut files = read_tree(&fixture_dir("constructs").join("references"));
    let depth = 2000;
    for index in 0..depth {
        let next = if index + 1 == depth {
            r#"{"type": "string"}"#.to_owned()
        } else {
            format!(
                r#"{{"type": "object", "properties": {{"next": {{"$ref": "chain{}.json#"}}}}}}"#,
                index + 1
            )
        };
        files.insert(format!("tiny/v1/chain{index}.json"), next);
    }
    files.insert(
        "tiny/v1/text.json".to_owned(),
        r##"{"type": "array", "items": {"$ref": "chain0.json#"}}"##.to_owned(),
    );
    let error = generate(&Sources::from_directory_files("references", files))
        .expect_err("nesting deeper than the limit is rejected");
    assert!(matches!(error, Error::Unsupported { .. }), "{error}");
    assert!(
        error.to_string().starts_with("references/tiny/v1/chain"),
        "{error}"
    );
    assert!(error.to_string().contains("nested more than"), "{error}");
}

/// A service whose module would be the generated crate's `schemas` module.
#[test]
fn service_named_like_a_crate_module_is_an_error() {
    let mut files = read_tree(&fixture_dir("constructs").join("references"));
    for name in ["exchanges.json", "text.json"] {
        let text = files.remove(&format!("tiny/v1/{name}")).unwrap();
        let text = text
            .replace("\"serviceName\": \"tiny\"", "\"serviceName\": \"schemas\"")
            .replace("/schemas/tiny/", "/schemas/schemas/");
        files.insert(format!("schemas/v1/{name}"), text);
    }
    let error = generate(&Sources::from_directory_files("references", files))
        .expect_err("the service is rejected");
    assert!(
        error
            .to_string()
            .starts_with("references/schemas/v1/exchanges.json#/serviceName: "),
        "{error}"
    );
    assert!(error.to_string().contains("module `schemas`"), "{error}");
}
