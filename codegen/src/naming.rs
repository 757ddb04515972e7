//! Deterministic Rust names for schema things: `UpperCamelCase` types and
//! variants, `snake_case` fields and modules (via `heck`), with Rust keywords
//! suffixed by `_` (never raw identifiers) and odd characters (`$schema`,
//! dashes, leading digits) handled the same way every time.

use heck::{ToSnakeCase, ToUpperCamelCase};

/// Words that cannot be identifiers in edition 2024 (strict and reserved
/// keywords); a name equal to one gets a `_` suffix.
const KEYWORDS: &[&str] = &[
    "Self", "abstract", "as", "async", "await", "become", "box", "break", "const", "continue",
    "crate", "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if",
    "impl", "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub",
    "ref", "return", "self", "static", "struct", "super", "trait", "true", "try", "type", "typeof",
    "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
];

/// Whether `word` is a Rust keyword.
pub fn is_keyword(word: &str) -> bool {
    KEYWORDS.contains(&word)
}

/// Replaces every character that cannot be part of an ASCII identifier with a
/// space, so `heck` treats it as a word boundary (`$schema` → ` schema`).
fn words_only(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { ' ' })
        .collect()
}

fn finish(name: String, digit_prefix: &str) -> String {
    let name = if name.starts_with(|c: char| c.is_ascii_digit()) {
        format!("{digit_prefix}{name}")
    } else {
        name
    };
    if is_keyword(&name) {
        format!("{name}_")
    } else {
        name
    }
}

/// `UpperCamelCase`, `digit_prefix`ed if it would start with a digit; `None`
/// if nothing usable remains.
fn upper_camel(text: &str, digit_prefix: &str) -> Option<String> {
    let name = words_only(text).to_upper_camel_case();
    (!name.is_empty()).then(|| finish(name, digit_prefix))
}

/// A type name: `UpperCamelCase`, `T`-prefixed if it would start with a
/// digit; `None` if nothing usable remains (`"$$"`).
pub fn type_name(text: &str) -> Option<String> {
    upper_camel(text, "T")
}

/// A struct field name: `snake_case`, `_`-prefixed if it would start with a
/// digit; `None` if nothing usable remains.
pub fn field_name(text: &str) -> Option<String> {
    let name = words_only(text).to_snake_case();
    (!name.is_empty()).then(|| finish(name, "_"))
}

/// An enum variant name for a string value: `UpperCamelCase`, `V`-prefixed if
/// it would start with a digit, `Empty` for a value without letters or digits.
pub fn variant_name(value: &str) -> String {
    upper_camel(value, "V").unwrap_or_else(|| "Empty".to_owned())
}

/// The module (and cargo feature) name of a service: `purge-cache` → `purge_cache`.
pub fn module_name(service: &str) -> Option<String> {
    field_name(service)
}

/// The name serde derives for a field under `rename_all = "camelCase"`
/// (the same rule as serde's `RenameRule::CamelCase`).
pub fn serde_camel_case(field: &str) -> String {
    let mut pascal = String::new();
    let mut capitalize = true;
    for ch in field.chars() {
        if ch == '_' {
            capitalize = true;
        } else if capitalize {
            pascal.push(ch.to_ascii_uppercase());
            capitalize = false;
        } else {
            pascal.push(ch);
        }
    }
    let mut chars = pascal.chars();
    match chars.next() {
        Some(first) => first.to_ascii_lowercase().to_string() + chars.as_str(),
        None => pascal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names() {
        assert_eq!(
            type_name("Task Status Structure").unwrap(),
            "TaskStatusStructure"
        );
        assert_eq!(
            type_name("WorkerType Pulse Message").unwrap(),
            "WorkerTypePulseMessage"
        );
        assert_eq!(
            type_name("Artifact Storage-Type").unwrap(),
            "ArtifactStorageType"
        );
        assert_eq!(type_name("task-status").unwrap(), "TaskStatus");
        assert_eq!(type_name("3d-thing").unwrap(), "T3dThing");
        assert_eq!(type_name("self").unwrap(), "Self_");
        assert_eq!(type_name("$$"), None);
    }

    #[test]
    fn field_names() {
        assert_eq!(field_name("taskGroupId").unwrap(), "task_group_id");
        assert_eq!(field_name("tasks_for").unwrap(), "tasks_for");
        assert_eq!(field_name("$schema").unwrap(), "schema");
        assert_eq!(field_name("content-type").unwrap(), "content_type");
        assert_eq!(field_name("type").unwrap(), "type_");
        assert_eq!(field_name("match").unwrap(), "match_");
        assert_eq!(field_name("3d").unwrap(), "_3d");
        assert_eq!(field_name("-"), None);
    }

    #[test]
    fn variant_names() {
        assert_eq!(variant_name("task-retry"), "TaskRetry");
        assert_eq!(variant_name("review_requested"), "ReviewRequested");
        assert_eq!(variant_name("1.0"), "V10");
        assert_eq!(variant_name(""), "Empty");
        assert_eq!(variant_name("self"), "Self_");
    }

    #[test]
    fn modules() {
        assert_eq!(module_name("purge-cache").unwrap(), "purge_cache");
        assert_eq!(module_name("worker-manager").unwrap(), "worker_manager");
        assert_eq!(module_name("queue").unwrap(), "queue");
    }

    #[test]
    fn serde_camel_case_matches_serde() {
        assert_eq!(serde_camel_case("task_group_id"), "taskGroupId");
        assert_eq!(serde_camel_case("tasks_for"), "tasksFor");
        assert_eq!(serde_camel_case("type_"), "type");
        assert_eq!(serde_camel_case("_3d"), "3d");
        assert_eq!(serde_camel_case("runs"), "runs");
    }
}
