//! The etcd v3 backend, spoken through etcd's JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
//! `/v3/watch`, `/v3/kv/compaction`): keys and values base64, revisions as strings. The
//! endpoints are tried in turn, so a cluster that loses a member keeps serving.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::StoreError;
use super::mvcc::{self, Event, EventKind, Expect, KeyValue, Range, Revision, Write};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn num(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

fn kv_of(v: &Value) -> Result<KeyValue, StoreError> {
    let key = B64
        .decode(v.get("key").and_then(|k| k.as_str()).unwrap_or(""))
        .map_err(|e| StoreError::Failed(format!("etcd sent a bad key: {e}")))?;
    let value = B64
        .decode(v.get("value").and_then(|k| k.as_str()).unwrap_or(""))
        .map_err(|e| StoreError::Failed(format!("etcd sent a bad value: {e}")))?;
    Ok(KeyValue {
        key: String::from_utf8(key)
            .map_err(|_| StoreError::Failed("etcd sent a non-UTF-8 key".into()))?,
        value: Arc::from(value),
        create_revision: num(&v["create_revision"]),
        mod_revision: num(&v["mod_revision"]),
    })
}

fn gateway_error(status: u16, body: &Value) -> StoreError {
    let msg = body
        .get("error")
        .or(body.get("message"))
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_string();
    if msg.contains("compacted") {
        return mvcc::Error::Compacted {
            requested: 0,
            compacted: 0,
        }
        .into();
    }
    if msg.contains("future revision") {
        return mvcc::Error::FutureRevision {
            requested: 0,
            current: 0,
        }
        .into();
    }
    StoreError::Failed(format!("etcd answered {status}: {msg}"))
}

/// A client of an etcd cluster.
pub struct Etcd {
    client: Client<HttpConnector, Full<Bytes>>,
    endpoints: Vec<String>,
    /// The endpoint that answered last (tried first).
    current: AtomicUsize,
}

impl Etcd {
    /// Connects to the first endpoint that answers.
    pub async fn connect(endpoints: Vec<String>) -> Result<Etcd, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Failed("no etcd endpoints".into()));
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(http);
        let e = Etcd {
            client,
            endpoints: endpoints
                .into_iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect(),
            current: AtomicUsize::new(0),
        };
        e.revision().await?;
        Ok(e)
    }

    async fn send(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<hyper::Response<Incoming>, StoreError> {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let uri = format!("{}{path}", self.endpoints[idx]);
            let req = Request::post(&uri)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| StoreError::Failed(e.to_string()))?;
            match tokio::time::timeout(Duration::from_secs(10), self.client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_server_error() => {
                    last = format!("{uri}: {}", resp.status());
                }
                Ok(Ok(resp)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(resp);
                }
                Ok(Err(e)) => last = format!("{uri}: {e}"),
                Err(_) => last = format!("{uri}: timed out"),
            }
            debug!(endpoint = %self.endpoints[idx], error = %last, "etcd endpoint failed; trying the next");
        }
        Err(StoreError::Failed(format!(
            "no etcd endpoint answered (last: {last})"
        )))
    }

    async fn call(&self, path: &str, body: Value) -> Result<Value, StoreError> {
        let resp = self.send(path, &body).await?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| StoreError::Failed(format!("reading etcd's answer: {e}")))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Failed(format!("etcd's answer is not JSON: {e}")))?;
        if status >= 400 {
            return Err(gateway_error(status, &v));
        }
        Ok(v)
    }

    pub async fn revision(&self) -> Result<Revision, StoreError> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(b"/"), "count_only": true}),
            )
            .await?;
        Ok(num(&v["header"]["revision"]))
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let v = self
            .call("/v3/kv/range", json!({"key": b64(key.as_bytes())}))
            .await?;
        match v
            .get("kvs")
            .and_then(|k| k.as_array())
            .and_then(|k| k.first())
        {
            Some(kv) => Ok(Some(kv_of(kv)?)),
            None => Ok(None),
        }
    }

    pub async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        at: Option<Revision>,
        limit: usize,
    ) -> Result<Range, StoreError> {
        // etcd ranges include their start: the key right after an excluded one is key + NUL.
        let (from, excluded) = mvcc::range_start(prefix, start_after);
        let mut start = from.as_bytes().to_vec();
        if excluded {
            start.push(0);
        }
        let mut body = json!({"key": b64(&start), "range_end": b64(&prefix_end(prefix))});
        if let Some(r) = at {
            body["revision"] = json!(r.to_string());
        }
        if limit > 0 {
            body["limit"] = json!(limit.to_string());
        }
        let v = self.call("/v3/kv/range", body).await?;
        let kvs = v
            .get("kvs")
            .and_then(|k| k.as_array())
            .into_iter()
            .flatten()
            .map(kv_of)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Range {
            kvs,
            more: v.get("more").and_then(|m| m.as_bool()).unwrap_or(false),
            revision: at.unwrap_or_else(|| num(&v["header"]["revision"])),
        })
    }

    pub async fn count(&self, prefix: &str) -> Result<usize, StoreError> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix)), "count_only": true}),
            )
            .await?;
        Ok(num(&v["count"]) as usize)
    }

    /// A conditional write as one etcd transaction.
    pub async fn write(&self, write: Write, expect: Expect) -> Result<Arc<Event>, StoreError> {
        let (key, op) = match &write {
            Write::Put { key, value } => (
                key.clone(),
                json!({"request_put": {"key": b64(key.as_bytes()), "value": b64(value), "prev_kv": true}}),
            ),
            Write::Delete { key } => (
                key.clone(),
                json!({"request_delete_range": {"key": b64(key.as_bytes()), "prev_kv": true}}),
            ),
        };
        let k = b64(key.as_bytes());
        let mut compare = Vec::new();
        match expect {
            Expect::Any => {}
            Expect::Absent => compare.push(json!({"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"})),
            Expect::Present => compare.push(json!({"key": k, "target": "CREATE", "result": "GREATER", "create_revision": "0"})),
            Expect::ModRevision(r) => compare.push(json!({"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string()})),
        }
        if matches!(write, Write::Delete { .. }) && expect == Expect::Any {
            compare.push(
                json!({"key": k, "target": "CREATE", "result": "GREATER", "create_revision": "0"}),
            );
        }
        let body = json!({
            "compare": compare,
            "success": [op],
            "failure": [{"request_range": {"key": k}}],
        });
        let v = self.call("/v3/kv/txn", body).await?;
        let revision = num(&v["header"]["revision"]);
        if !v
            .get("succeeded")
            .and_then(|s| s.as_bool())
            .unwrap_or(false)
        {
            let current = v
                .pointer("/responses/0/response_range/kvs/0")
                .map(kv_of)
                .transpose()?;
            return Err(mvcc::Error::Conflict(current).into());
        }
        let event = match write {
            Write::Put { key, value } => {
                let prev = v
                    .pointer("/responses/0/response_put/prev_kv")
                    .map(kv_of)
                    .transpose()?;
                Event {
                    kind: EventKind::Put,
                    revision,
                    kv: KeyValue {
                        key,
                        value,
                        create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
                        mod_revision: revision,
                    },
                    prev,
                }
            }
            Write::Delete { .. } => {
                let prev = v
                    .pointer("/responses/0/response_delete_range/prev_kvs/0")
                    .map(kv_of)
                    .transpose()?;
                let Some(p) = prev.clone() else {
                    return Err(mvcc::Error::Conflict(None).into());
                };
                let mut kv = p;
                kv.mod_revision = revision;
                Event {
                    kind: EventKind::Delete,
                    revision,
                    kv,
                    prev,
                }
            }
        };
        Ok(Arc::new(event))
    }

    /// Watches keys under `prefix` for changes after `after`; events arrive on the channel
    /// until the stream ends (an `Err` says why).
    pub async fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<mpsc::Receiver<Result<Arc<Event>, StoreError>>, StoreError> {
        let body = json!({"create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix)),
            "start_revision": (after + 1).to_string(),
            "prev_kv": true,
        }});
        let resp = self.send("/v3/watch", &body).await?;
        if !resp.status().is_success() {
            return Err(StoreError::Failed(format!(
                "etcd refused the watch: {}",
                resp.status()
            )));
        }
        let (tx, rx) = mpsc::channel(1024);
        let mut body = resp.into_body();
        // Wait for the "created" (or "canceled") message before returning.
        let mut buf: Vec<u8> = Vec::new();
        let mut first = true;
        let (created_tx, created_rx) = tokio::sync::oneshot::channel::<Result<(), StoreError>>();
        let mut created_tx = Some(created_tx);
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = body.frame() => f,
                    _ = tx.closed() => return,
                };
                let data = match frame {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                    Some(Err(e)) => {
                        let _ = tx
                            .send(Err(StoreError::Failed(format!("etcd watch stream: {e}"))))
                            .await;
                        return;
                    }
                    None => {
                        let _ = tx
                            .send(Err(StoreError::Failed("etcd ended the watch".into())))
                            .await;
                        return;
                    }
                };
                buf.extend_from_slice(&data);
                let mut consumed = 0;
                let mut de = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                let mut messages = Vec::new();
                loop {
                    match de.next() {
                        Some(Ok(v)) => {
                            consumed = de.byte_offset();
                            messages.push(v);
                        }
                        Some(Err(e)) if e.is_eof() => break,
                        Some(Err(e)) => {
                            let _ = tx
                                .send(Err(StoreError::Failed(format!("etcd watch stream: {e}"))))
                                .await;
                            return;
                        }
                        None => break,
                    }
                }
                buf.drain(..consumed);
                for m in messages {
                    let r = m.get("result").cloned().unwrap_or(m);
                    if first {
                        first = false;
                        let canceled = r.get("canceled").and_then(|c| c.as_bool()).unwrap_or(false);
                        let compacted = num(r.get("compact_revision").unwrap_or(&Value::Null));
                        let res = if canceled || compacted > 0 {
                            Err(mvcc::Error::Compacted {
                                requested: after,
                                compacted,
                            }
                            .into())
                        } else {
                            Ok(())
                        };
                        let stop = res.is_err();
                        if let Some(t) = created_tx.take() {
                            let _ = t.send(res);
                        }
                        if stop {
                            return;
                        }
                        if r.get("events").is_none() {
                            continue;
                        }
                    }
                    if num(r.get("compact_revision").unwrap_or(&Value::Null)) > 0 {
                        let _ = tx
                            .send(Err(mvcc::Error::Compacted {
                                requested: after,
                                compacted: 0,
                            }
                            .into()))
                            .await;
                        return;
                    }
                    for e in r
                        .get("events")
                        .and_then(|e| e.as_array())
                        .into_iter()
                        .flatten()
                    {
                        let ev = (|| -> Result<Event, StoreError> {
                            let kv = kv_of(&e["kv"])?;
                            let prev = e.get("prev_kv").map(kv_of).transpose()?;
                            let delete = e.get("type").and_then(|t| t.as_str()) == Some("DELETE");
                            let revision = kv.mod_revision;
                            Ok(if delete {
                                let mut kv = prev.clone().unwrap_or(kv);
                                kv.mod_revision = revision;
                                Event {
                                    kind: EventKind::Delete,
                                    revision,
                                    kv,
                                    prev,
                                }
                            } else {
                                Event {
                                    kind: EventKind::Put,
                                    revision,
                                    kv,
                                    prev,
                                }
                            })
                        })();
                        if tx.send(ev.map(Arc::new)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), created_rx).await {
            Ok(Ok(Ok(()))) => Ok(rx),
            Ok(Ok(Err(e))) => Err(e),
            _ => {
                warn!("etcd did not confirm the watch");
                Err(StoreError::Failed("etcd did not confirm the watch".into()))
            }
        }
    }

    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.call(
            "/v3/kv/compaction",
            json!({"revision": revision.to_string()}),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("ab"), b"ac".to_vec());
        assert_eq!(num(&json!("42")), 42);
        assert_eq!(num(&json!(7)), 7);
    }
}
