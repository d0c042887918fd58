//! The OpenAPI 3.1 document served at `GET /openapi.json`: the checked-in description of the
//! API (`api/openapi.json`) completed from the job catalog that is loaded, so that a client can
//! generate code for every kind, including ones added without touching this file: `kind` is one
//! of the catalog's names, and `SubmitRequest` is `oneOf` a variant per kind with that kind's
//! payload schema (and `sequence` required where the kind is sequenced).

use gatehouse_protocol::Catalog;
use serde_json::{Value, json};

/// The document as checked in.
pub const TEMPLATE: &str = include_str!("../api/openapi.json");

/// Builds the served document from [`TEMPLATE`] and `catalog`.
///
/// # Errors
/// When the template or a kind's schema file is not JSON (the catalog was checked at start-up,
/// so this means a file changed underneath).
pub fn build(catalog: &Catalog) -> Result<String, String> {
    let mut doc: Value = serde_json::from_str(TEMPLATE).map_err(|e| format!("api/openapi.json: {e}"))?;
    let mut names = Vec::new();
    let mut variants = Vec::new();
    for kind in catalog.kinds() {
        let text =
            std::fs::read_to_string(&kind.schema).map_err(|e| format!("{}: {e}", kind.schema.display()))?;
        let mut payload: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", kind.schema.display()))?;
        // The document is JSON Schema 2020-12 already (OpenAPI 3.1).
        if let Some(o) = payload.as_object_mut() {
            o.remove("$schema");
        }
        let mut required = vec!["kind", "payload"];
        // Fields the client seals travel as sealed strings (and bind the idempotency key).
        let sealed = gatehouse_protocol::fields::sealed_paths(&payload);
        let mut variant = json!({"title": kind.name});
        let payload = if sealed.is_empty() {
            payload
        } else {
            required.push("idempotency_key");
            variant["description"] = json!(format!(
                "Fields {} are sealed by the client to a certified worker key (GET /v1/keys)",
                sealed.join(", ")
            ));
            gatehouse_protocol::fields::as_sent(&payload, &sealed)
        };
        // The kind's schema, and the bounds the gatekeeper puts on every payload.
        let payload = json!({"allOf": [payload, {"$ref": "#/components/schemas/SanitizedValue"}]});
        let mut properties = json!({"kind": {"const": kind.name}, "payload": payload});
        // The longest delay the kind takes (a not_before time has the same bound, relative
        // to now, which JSON Schema cannot say).
        properties["delay_s"] = json!({"maximum": kind.max_delay_s});
        if kind.sequenced {
            required.push("sequence");
            if let Some(field) = &kind.sequence_key_field {
                variant["description"] = json!(format!(
                    "Jobs of {} apply in order per payload.{field}: sequence.key must equal payload.{field}",
                    kind.name
                ));
            }
        } else {
            // Refused for kinds that are not sequenced.
            properties["sequence"] = json!(false);
        }
        variant["properties"] = properties;
        variant["required"] = json!(required);
        variants.push(variant);
        names.push(kind.name.clone());
    }
    let submit = &mut doc["components"]["schemas"]["SubmitRequest"];
    submit["properties"]["kind"] =
        json!({"type": "string", "enum": names, "description": "A kind of the job catalog"});
    submit["oneOf"] = Value::Array(variants);
    // A workflow's step: a job body with its name, and `after` naming steps instead of jobs.
    let mut step = submit.clone();
    step["properties"]["name"] = json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"});
    step["properties"]["after"] = json!({
        "type": "array", "maxItems": 100, "uniqueItems": true,
        "items": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "description": "Names of the steps this one waits for (not for sequenced kinds)",
    });
    if let Some(required) = step["required"].as_array_mut() {
        required.push(json!("name"));
    }
    doc["components"]["schemas"]["WorkflowStep"] = step;
    // From an accepted or answered job to its status.
    let link = json!({
        "GetJob": {"operationId": "getJob", "parameters": {"id": "$response.body#/id"}},
        "CancelJob": {"operationId": "cancelJob", "parameters": {"id": "$response.body#/id"}},
    });
    for status in ["200", "202"] {
        doc["paths"]["/v1/jobs"]["post"]["responses"][status]["links"] = link.clone();
    }
    serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn every_catalog_kind_is_in_the_document_with_its_payload_schema() {
        let catalog =
            Catalog::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml")).unwrap();
        let doc: Value = serde_json::from_str(&build(&catalog).unwrap()).unwrap();
        let submit = &doc["components"]["schemas"]["SubmitRequest"];
        let names: Vec<&str> = submit["properties"]["kind"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(names.len(), catalog.kinds().count());
        assert!(names.contains(&"vault.put") && names.contains(&"ledger.apply"), "{names:?}");
        let ledger =
            submit["oneOf"].as_array().unwrap().iter().find(|v| v["title"] == "ledger.apply").unwrap();
        assert_eq!(
            ledger["properties"]["payload"]["allOf"][0]["properties"]["amount"]["type"], "integer",
            "{ledger}"
        );
        assert!(ledger["required"].as_array().unwrap().contains(&json!("sequence")));
        assert_eq!(
            doc["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"]["GetJob"]["operationId"],
            "getJob"
        );
        let step = &doc["components"]["schemas"]["WorkflowStep"];
        assert_eq!(step["oneOf"], submit["oneOf"], "a step is any job");
        assert!(step["required"].as_array().unwrap().contains(&json!("name")), "{step}");
    }
}
