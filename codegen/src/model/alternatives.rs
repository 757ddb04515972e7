//! Enumerations and alternatives: string enums with their catch-all variant,
//! `oneOf`/`anyOf` as untagged enums (or an `Option` for a `null` alternative),
//! and the check that serde can tell the alternatives apart.

use super::*;

impl<'a> ServiceBuilder<'a> {
    pub(super) fn enumeration(
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

    pub(super) fn alternatives(
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

    /// Checks that serde can tell the alternatives of each untagged enum apart.
    pub(super) fn check_untagged(&self) -> Result<(), Error> {
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

    pub(super) fn shape(&self, ty: &TypeRef) -> Shape {
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
}

pub(super) fn enum_values(schema: &Map<String, Value>) -> Option<Vec<Value>> {
    match (schema.get("enum"), schema.get("const")) {
        (Some(Value::Array(values)), _) => Some(values.clone()),
        // A non-array `enum` is reported by `check_keywords`.
        (Some(_), _) => None,
        (None, Some(value)) => Some(vec![value.clone()]),
        (None, None) => None,
    }
}

pub(super) fn string_enum(at: &Location, values: &[String]) -> Result<TypeKind, Error> {
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
pub(super) enum Shape {
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
pub(super) fn distinguishable(earlier: &Shape, later: &Shape) -> Result<(), String> {
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

pub(super) fn type_ref_label(ty: &TypeRef) -> String {
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
