//! Payload validation: each kind's JSON Schema (draft 2020-12), compiled once at start-up.
//! The gatekeeper validates every submitted payload; the worker validates it again before a
//! handler sees it (defence in depth: a gatekeeper of another release, a replayed message).

use std::collections::HashMap;

use jsonschema::Validator;
use serde_json::Value;

use crate::Catalog;

/// Where a payload breaks its schema, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer into the submit body (`/payload/...`).
    pub path: String,
    pub message: String,
}

/// Compiled validators by kind.
pub struct Schemas {
    by_kind: HashMap<String, Compiled>,
}

struct Compiled {
    /// The payload as a handler sees it (sealed fields opened).
    full: Validator,
    /// Where the kind's schema marks fields sealed ([`crate::fields`]), and the payload as it
    /// travels (each such field a sealed string): what the gatekeeper checks.
    sealed: Vec<String>,
    as_sent: Option<Validator>,
}

/// A schema file that is missing, not JSON, or not a valid schema.
#[derive(Debug, thiserror::Error)]
#[error("schema of kind {kind} ({path}): {reason}")]
pub struct SchemaError {
    kind: String,
    path: String,
    reason: String,
}

/// Most validation errors reported for one request.
const MAX_ERRORS: usize = 16;

impl Schemas {
    /// Reads and compiles the schema of every kind in the catalog.
    ///
    /// # Errors
    /// When a schema cannot be read, parsed or compiled.
    pub fn compile(catalog: &Catalog) -> Result<Self, SchemaError> {
        let mut by_kind = HashMap::new();
        for kind in catalog.kinds() {
            let err = |reason: String| SchemaError {
                kind: kind.name.clone(),
                path: kind.schema.display().to_string(),
                reason,
            };
            let text = std::fs::read_to_string(&kind.schema).map_err(|e| err(e.to_string()))?;
            let schema: Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
            let full = jsonschema::draft202012::new(&schema).map_err(|e| err(e.to_string()))?;
            let sealed = crate::fields::sealed_paths(&schema);
            let as_sent = if sealed.is_empty() {
                None
            } else {
                let view = crate::fields::as_sent(&schema, &sealed);
                Some(jsonschema::draft202012::new(&view).map_err(|e| err(e.to_string()))?)
            };
            by_kind.insert(kind.name.clone(), Compiled { full, sealed, as_sent });
        }
        Ok(Self { by_kind })
    }

    /// Validates `payload` against `kind`'s schema; errors point into the request body
    /// (`/payload/...`).
    pub fn validate(&self, kind: &str, payload: &Value) -> Result<(), Vec<Violation>> {
        let Some(compiled) = self.by_kind.get(kind) else {
            return Err(vec![Violation { path: "/kind".into(), message: "unknown kind".into() }]);
        };
        Self::check(&compiled.full, payload)
    }

    /// Validates `payload` as it travels: each sealed field a string (checked to be a sealed
    /// value apart, see [`crate::fields::well_formed`]), the rest against the kind's schema.
    pub fn validate_as_sent(&self, kind: &str, payload: &Value) -> Result<(), Vec<Violation>> {
        let Some(compiled) = self.by_kind.get(kind) else {
            return Err(vec![Violation { path: "/kind".into(), message: "unknown kind".into() }]);
        };
        Self::check(compiled.as_sent.as_ref().unwrap_or(&compiled.full), payload)
    }

    /// The JSON pointers of `kind`'s sealed fields (none for an unknown kind).
    pub fn sealed(&self, kind: &str) -> &[String] {
        self.by_kind.get(kind).map_or(&[], |c| &c.sealed)
    }

    fn check(validator: &Validator, payload: &Value) -> Result<(), Vec<Violation>> {
        let errors: Vec<Violation> = validator
            .iter_errors(payload)
            .take(MAX_ERRORS)
            .map(|e| Violation { path: format!("/payload{}", e.instance_path()), message: e.to_string() })
            .collect();
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;

    fn schemas() -> Schemas {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml");
        Schemas::compile(&Catalog::load(&path).unwrap()).unwrap()
    }

    #[test]
    fn shipped_schemas_compile_and_name_the_field() {
        let s = schemas();
        assert!(s.validate("ledger.apply", &json!({"account": "a-1", "amount": 5})).is_ok());
        let errs = s.validate("ledger.apply", &json!({"account": "a-1", "amount": "5"})).unwrap_err();
        assert_eq!(errs[0].path, "/payload/amount");
        let errs = s.validate("vault.put", &json!({"record": {}, "extra": 1})).unwrap_err();
        assert!(errs[0].message.contains("extra"), "{errs:?}");
    }
}
