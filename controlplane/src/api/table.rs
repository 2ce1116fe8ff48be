//! meta.k8s.io/v1 Table responses: what `kubectl get` prints.
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::resources::Resource;

/// Whether the Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .any(|p| p.contains("as=Table") && p.contains("g=meta.k8s.io"))
}

/// kubectl's short human duration ("45s", "5m3s", "3h", "2d").
pub fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    let (m, h, days) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        format!("{m}m{}s", s % 60)
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        format!("{h}h{}m", m % 60)
    } else if h < 48 {
        format!("{h}h")
    } else if days < 8 {
        format!("{days}d{}h", h % 24)
    } else {
        format!("{days}d")
    }
}

fn age(obj: &Value) -> Value {
    let created = obj
        .pointer("/metadata/creationTimestamp")
        .and_then(|t| t.as_str())
        .and_then(|t| humantime::parse_rfc3339(t).ok());
    match created {
        Some(t) => json!(human_age(
            SystemTime::now().duration_since(t).unwrap_or_default()
        )),
        None => json!("<unknown>"),
    }
}

pub fn columns(res: &Resource) -> Vec<Value> {
    let mut cols = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    for c in res.columns {
        cols.push(json!({"name": c.name, "type": c.kind, "format": "", "description": c.description, "priority": c.priority}));
    }
    cols.push(json!({"name": "Age", "type": "string", "format": "", "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0}));
    cols
}

pub fn row(res: &Resource, obj: &Value) -> Value {
    let mut cells = vec![
        obj.pointer("/metadata/name")
            .cloned()
            .unwrap_or(Value::Null),
    ];
    for c in res.columns {
        cells.push((c.cell)(obj));
    }
    cells.push(age(obj));
    json!({
        "cells": cells,
        "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))},
    })
}

pub fn table(res: &Resource, items: &[Value], rev: u64, cont: Option<String>) -> Value {
    let mut meta = json!({"resourceVersion": rev.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": columns(res),
        "rows": items.iter().map(|o| row(res, o)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_age(Duration::from_secs(45)), "45s");
        assert_eq!(human_age(Duration::from_secs(303)), "5m3s");
        assert_eq!(human_age(Duration::from_secs(3600 * 3)), "3h0m");
        assert_eq!(human_age(Duration::from_secs(86400 * 2 + 3600)), "2d1h");
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }
}
