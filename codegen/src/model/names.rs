//! Naming of the types once every type is known: message types, titles,
//! property paths and numeric suffixes, untagged variants (see the module
//! documentation of [`super`] for the order of precedence).

use super::*;

/// Name of a message type shared by several entries: its title, or its file name.
pub(super) fn shared_message_name(schemas: &SchemaSet, root: &SchemaLoc) -> Result<String, Error> {
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
pub(super) fn path_name(loc: &SchemaLoc, named: &BTreeMap<SchemaLoc, String>) -> String {
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

impl<'a> ServiceBuilder<'a> {
    /// Decides every name and boxes recursive fields.
    pub(super) fn finish(
        self,
        reserved: &BTreeSet<String>,
    ) -> Result<BTreeMap<SchemaLoc, TypeDef>, Error> {
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

/// Gives untagged variants holding named types the name of that type.
pub(super) fn name_untagged_variants(
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
pub(super) fn decide_names(
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
