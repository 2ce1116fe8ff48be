//! Watches: a stream of `{"type": ..., "object": ...}` lines, with kube-apiserver's
//! resourceVersion semantics, selectors, bookmarks, initial events and 410 after compaction.
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::resources::Resource;
use super::status::ApiError;
use super::{
    Api, BOOKMARK_EVERY, Params, decode, header_str, selectors, store_err, stream_body, table,
};
use crate::store::{EventKind, StoreError, mvcc};

fn line(kind: &str, object: Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

/// Recently encoded event lines, by revision, shared by every plain watcher.
static LINES: std::sync::Mutex<std::collections::VecDeque<(u64, Bytes)>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
const SHARED_LINES: usize = 4096;

/// The line a watcher without selectors sends for an event (encoded once).
fn shared_line(ev: &crate::store::Event) -> Option<Bytes> {
    {
        let cache = LINES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, b)) = cache.iter().rev().find(|(r, _)| *r == ev.revision) {
            return Some(b.clone());
        }
    }
    let b = match ev.kind {
        EventKind::Put => {
            let kind = if ev.prev.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            line(kind, decode(&ev.kv).ok()?)
        }
        EventKind::Delete => {
            let mut o = decode(ev.prev.as_ref().unwrap_or(&ev.kv)).ok()?;
            o["metadata"]["resourceVersion"] = json!(ev.revision.to_string());
            line("DELETED", o)
        }
    };
    let mut cache = LINES.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= SHARED_LINES {
        cache.pop_front();
    }
    cache.push_back((ev.revision, b.clone()));
    Some(b)
}

pub async fn serve(
    api: Arc<Api>,
    res: &'static Resource,
    ns: Option<String>,
    params: &Params,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(res, params)?;
    let plain = labels.0.is_empty()
        && fields.0.is_empty()
        && !table::wants_table(header_str(headers, header::ACCEPT));
    let matches = move |v: &Value| labels.matches(v) && fields.matches(v);
    let as_table = table::wants_table(header_str(headers, header::ACCEPT));
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let send_initial = params
        .get("sendInitialEvents")
        .is_some_and(|v| v == "true" || v == "1");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let rv = params.get("resourceVersion").cloned().unwrap_or_default();
    let prefix = res.ns_prefix(ns.as_deref());

    // Initial events: for an unset or "0" resourceVersion, or when asked for.
    let mut initial = Vec::new();
    let after = if rv.is_empty() || rv == "0" || send_initial {
        let range = api
            .store
            .range(&prefix, None, None, 0)
            .await
            .map_err(store_err)?;
        for kv in &range.kvs {
            let v = decode(kv)?;
            if matches(&v) {
                initial.push(v);
            }
        }
        range.revision
    } else {
        rv.parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let watch = match api.store.watch(&prefix, after).await {
        Ok(w) => Some(w),
        Err(StoreError::Mvcc(mvcc::Error::Compacted { .. })) => None,
        Err(e) => return Err(store_err(e)),
    };
    let wrap = move |v: Value| -> Value {
        if as_table {
            table::table(res, std::slice::from_ref(&v), 0, None)
        } else {
            v
        }
    };
    tokio::spawn(async move {
        let Some(mut watch) = watch else {
            let status = ApiError::gone(format!("too old resource version: {after}")).status_body();
            let _ = tx.send(line("ERROR", status)).await;
            return;
        };
        for v in initial {
            if tx.send(line("ADDED", wrap(v))).await.is_err() {
                return;
            }
        }
        let bookmark = |rev: u64, end: bool| {
            let mut m = json!({"resourceVersion": rev.to_string()});
            if end {
                m["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            line(
                "BOOKMARK",
                json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": m}),
            )
        };
        if send_initial && bookmarks && tx.send(bookmark(after, true)).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(BOOKMARK_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                ev = watch.next() => {
                    let ev = match ev {
                        Ok(Some(ev)) => ev,
                        Ok(None) => return,
                        Err(_) => {
                            let status = ApiError::gone("too old resource version: the watch fell behind").status_body();
                            let _ = tx.send(line("ERROR", status)).await;
                            return;
                        }
                    };
                    // Without selectors and Tables every watcher sends the same line:
                    // encode it once for all of them.
                    if plain {
                        let bytes = shared_line(&ev);
                        if let Some(b) = bytes
                            && tx.send(b).await.is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    let new = match ev.kind {
                        EventKind::Put => decode(&ev.kv).ok(),
                        EventKind::Delete => None,
                    };
                    let old = ev.prev.as_ref().and_then(|p| decode(p).ok());
                    let old_match = old.as_ref().is_some_and(&matches);
                    let out = match (new, old_match) {
                        (Some(n), was) if matches(&n) => Some((if was { "MODIFIED" } else { "ADDED" }, n)),
                        (Some(n), true) => Some(("DELETED", n)),
                        (None, true) => {
                            let mut o = old.unwrap_or_default();
                            o["metadata"]["resourceVersion"] = json!(ev.revision.to_string());
                            Some(("DELETED", o))
                        }
                        _ => None,
                    };
                    if let Some((kind, obj)) = out
                        && tx.send(line(kind, wrap(obj))).await.is_err()
                    {
                        return;
                    }
                }
                _ = tick.tick(), if bookmarks => {
                    if tx.send(bookmark(watch.revision(), false)).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
            }
        }
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        stream_body(rx),
    )
        .into_response())
}
