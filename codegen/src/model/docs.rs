//! Doc comments and constraint text: titles and descriptions cleaned for
//! rustdoc, the schema location of each type, and the constraints a Rust type
//! cannot express (patterns, lengths, ranges, …) as bullet lists.

use super::*;

impl<'a> ServiceBuilder<'a> {
    pub(super) fn field_doc(
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
    pub(super) fn inline_constraints(
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
}

/// Description, or title when there is no description.
pub(super) fn doc_text(schema: &Map<String, Value>) -> Option<String> {
    let text = |key: &str| {
        schema
            .get(key)
            .and_then(Value::as_str)
            .map(clean_text)
            .filter(|t| !t.is_empty())
    };
    text("description").or_else(|| text("title"))
}

pub(super) fn schema_doc(schema: &Map<String, Value>) -> String {
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
pub(super) fn type_doc(schema: &Map<String, Value>, loc: &SchemaLoc) -> String {
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
pub(super) fn bullets(lines: &[String]) -> String {
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
pub(super) fn constraint_lines(schema: &Map<String, Value>) -> Vec<String> {
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
