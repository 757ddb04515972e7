//! Schema → type mapping: which Rust type a schema location becomes — scalars,
//! arrays, maps and free objects inline; objects with properties as structs
//! (with the map of properties beyond the declared ones); named types defined
//! once per schema location.

use super::*;

/// Keywords the generator understands (mapped to types or documented).
pub(super) const SUPPORTED_KEYWORDS: &[&str] = &[
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

/// JSON types a schema admits (`type`, possibly an array).
pub(super) struct TypeSet {
    types: Vec<String>,
    nullable: bool,
}

impl<'a> ServiceBuilder<'a> {
    pub(super) fn location(&self, loc: &SchemaLoc) -> Location {
        self.schemas.location(loc)
    }

    pub(super) fn object_at(&self, loc: &SchemaLoc) -> Result<&'a Map<String, Value>, Error> {
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
    pub(super) fn check_keywords(
        &self,
        loc: &SchemaLoc,
        schema: &Map<String, Value>,
    ) -> Result<(), Error> {
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

    pub(super) fn type_set(
        &self,
        loc: &SchemaLoc,
        schema: &Map<String, Value>,
    ) -> Result<TypeSet, Error> {
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
    pub(super) fn type_of(&mut self, loc: &SchemaLoc) -> Result<TypeRef, Error> {
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
    pub(super) fn inline_type_of(&mut self, loc: &SchemaLoc) -> Result<TypeRef, Error> {
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

    pub(super) fn non_null_type(
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

    pub(super) fn object(
        &mut self,
        loc: &SchemaLoc,
        schema: &Map<String, Value>,
    ) -> Result<TypeRef, Error> {
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

    pub(super) fn struct_kind(
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

    pub(super) fn required(
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

    /// Registers a named type at `loc`; `build` computes its kind (the type is
    /// visible while building, so recursive references find it).
    pub(super) fn define(
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
    pub(super) fn define_root(
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
}

pub(super) fn empty_object() -> &'static Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Map::new)
}
