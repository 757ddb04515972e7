//! Breaking recursive types: a named type that contains itself by value (not
//! behind a `Vec` or map) is boxed where the cycle closes.

use super::*;

/// Boxes every by-value use of a named type that leads back to the user,
/// so recursive types have a finite size.
pub(super) fn box_recursion(types: &mut BTreeMap<SchemaLoc, TypeDef>) {
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

/// Named types held by value (not behind `Vec`, map or `Box`).
pub(super) fn by_value_named(ty: &TypeRef, out: &mut BTreeSet<SchemaLoc>) {
    match ty {
        TypeRef::Named(loc) => {
            out.insert(loc.clone());
        }
        TypeRef::Option(inner) => by_value_named(inner, out),
        _ => {}
    }
}

pub(super) fn box_by_value(ty: &mut TypeRef, targets: &BTreeSet<SchemaLoc>) {
    match ty {
        TypeRef::Named(loc) if targets.contains(loc) => {
            *ty = TypeRef::Boxed(Box::new(TypeRef::Named(loc.clone())));
        }
        TypeRef::Option(inner) => box_by_value(inner, targets),
        _ => {}
    }
}
