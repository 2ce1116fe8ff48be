//! `--manifests DIR`: Services, EndpointSlices and Nodes from YAML or JSON files, re-read
//! when the directory changes. A file that does not parse or holds an invalid object is
//! rejected whole with a log line and its last good content keeps serving.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tracing::{debug, error, info, warn};

use super::{Sender, Update, trigger_time};
use crate::model::{self, Kind, ObjectKey, Shared, Snapshot};

/// One object from a manifest file.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Shared<Service>),
    EndpointSlice(Shared<EndpointSlice>),
    Node(Shared<Node>),
}

/// What identifies an object across files: kind and key.
type Id = (&'static str, ObjectKey);

impl Object {
    fn id(&self) -> Id {
        match self {
            Object::Service(s) => ("Service", s.key()),
            Object::EndpointSlice(s) => ("EndpointSlice", s.key()),
            Object::Node(n) => ("Node", n.key()),
        }
    }

    fn put_into(&self, snap: &mut Snapshot) {
        match self {
            Object::Service(s) => snap.put(s.clone()),
            Object::EndpointSlice(s) => snap.put(s.clone()),
            Object::Node(n) => snap.put(n.clone()),
        }
    }

    /// Whether two objects are equal in content (not only in identity).
    fn same_content(&self, other: &Object) -> bool {
        match (self, other) {
            (Object::Service(a), Object::Service(b)) => **a == **b,
            (Object::EndpointSlice(a), Object::EndpointSlice(b)) => **a == **b,
            (Object::Node(a), Object::Node(b)) => **a == **b,
            _ => false,
        }
    }
}

fn remove_from(snap: &mut Snapshot, id: &Id) {
    match id.0 {
        "Service" => drop(snap.remove::<Service>(&id.1)),
        "EndpointSlice" => drop(snap.remove::<EndpointSlice>(&id.1)),
        _ => drop(snap.remove::<Node>(&id.1)),
    }
}

/// Parses and validates one file's text. Unknown kinds are skipped; anything malformed
/// fails the whole file.
pub fn parse(text: &str) -> Result<Vec<Object>, String> {
    let mut out = Vec::new();
    // JSON (one or more values) takes the fast parser; anything else is YAML. Text that
    // only looks like JSON (`{...}` documents separated by `---`, a YAML flow mapping such
    // as `{kind: Service, ...}`) is valid YAML, so it falls through to the YAML parser.
    if text.trim_start().starts_with('{') {
        // JSON documents, held as raw text: a List's items become values one at a time,
        // so a 100,000-Service file never exists as one big value tree.
        let docs: Result<Vec<&serde_json::value::RawValue>, _> =
            serde_json::Deserializer::from_str(text)
                .into_iter::<&serde_json::value::RawValue>()
                .collect();
        if let Ok(docs) = docs {
            for (i, doc) in docs.into_iter().enumerate() {
                collect_raw(doc, &mut out).map_err(|e| format!("document {}: {e}", i + 1))?;
            }
            return Ok(out);
        }
    }
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_json::Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        collect(value, &mut out).map_err(|e| format!("document {}: {e}", i + 1))?;
    }
    Ok(out)
}

/// The envelope of a JSON document: its kind, and a List's items still as raw text.
#[derive(Deserialize)]
struct Envelope<'a> {
    kind: Option<String>,
    #[serde(borrow, default)]
    items: Option<Vec<&'a serde_json::value::RawValue>>,
}

fn collect_raw(doc: &serde_json::value::RawValue, out: &mut Vec<Object>) -> Result<(), String> {
    let env: Envelope = serde_json::from_str(doc.get()).map_err(|e| e.to_string())?;
    match (env.kind.as_deref(), env.items) {
        (Some("List" | "ServiceList" | "EndpointSliceList" | "NodeList"), Some(items)) => {
            for item in items {
                collect_raw(item, out)?;
            }
            Ok(())
        }
        _ => collect(
            serde_json::from_str(doc.get()).map_err(|e| e.to_string())?,
            out,
        ),
    }
}

fn collect(value: serde_json::Value, out: &mut Vec<Object>) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or("no kind")?
        .to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_string();
    let obj = match kind.as_str() {
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList" => {
            let items = match value {
                serde_json::Value::Object(mut m) => match m.remove("items") {
                    Some(serde_json::Value::Array(items)) => items,
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            for item in items {
                collect(item, out)?;
            }
            return Ok(());
        }
        "Service" => {
            let mut s: Service =
                serde_json::from_value(value).map_err(|e| format!("Service {name}: {e}"))?;
            s.metadata.namespace.get_or_insert_with(|| "default".into());
            model::validate_service(&s).map_err(|e| format!("Service {name}: {e}"))?;
            Object::Service(Shared::new(s))
        }
        "EndpointSlice" => {
            let mut s: EndpointSlice =
                serde_json::from_value(value).map_err(|e| format!("EndpointSlice {name}: {e}"))?;
            s.metadata.namespace.get_or_insert_with(|| "default".into());
            model::validate_endpoint_slice(&s).map_err(|e| format!("EndpointSlice {name}: {e}"))?;
            Object::EndpointSlice(Shared::new(s))
        }
        "Node" => Object::Node(Shared::new(
            serde_json::from_value(value).map_err(|e| format!("Node {name}: {e}"))?,
        )),
        other => {
            debug!(
                kind = other,
                name, "ignoring object of a kind capstan-proxy does not use"
            );
            return Ok(());
        }
    };
    if name.is_empty() {
        return Err(format!("{kind} without metadata.name"));
    }
    out.push(obj);
    Ok(())
}

/// What identifies one version of a file: modification time and size alone are not enough
/// (`cp -p`, `rsync -t` or `tar x` put a new version in place with the old mtime, and a
/// same-size rewrite within one timestamp tick keeps both), so the inode (a file renamed
/// into place is a new one) and the change time (which no tool can set back) count too.
type Stamp = (SystemTime, u64, u64, i64, i64);

fn stamp_of(meta: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    (
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        meta.len(),
        meta.ino(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// The objects of one file by id; the first of two with the same id wins.
fn by_id(path: &Path, objects: Vec<Object>) -> HashMap<Id, Object> {
    let mut out = HashMap::with_capacity(objects.len());
    for obj in objects {
        let id = obj.id();
        if out.contains_key(&id) {
            warn!(file = %path.display(), kind = id.0, namespace = %id.1.0, name = %id.1.1, "duplicate object ignored (it appears twice in the file; the first one is used)");
            continue;
        }
        out.insert(id, obj);
    }
    out
}

/// Objects that did not change keep their previous (shared) instance: the model then
/// knows at a glance, by identity, that there is nothing to re-evaluate for them.
fn keep_unchanged(old: &HashMap<Id, Object>, new: &mut HashMap<Id, Object>) {
    for (id, obj) in new.iter_mut() {
        if let Some(prev) = old.get(id)
            && prev.same_content(obj)
        {
            *obj = prev.clone();
        }
    }
}

struct FileState {
    stamp: Stamp,
    objects: HashMap<Id, Object>,
}

/// A manifest directory, the last good content of each file in it, and their union.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The files holding each object: when several do, the first in name order wins.
    holders: HashMap<Id, BTreeSet<PathBuf>>,
    /// The union of the files, kept up to date one changed file at a time.
    merged: Snapshot,
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    ) && !p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir {
            dir: dir.into(),
            files: BTreeMap::new(),
            holders: HashMap::new(),
            merged: Snapshot::default(),
        }
    }

    /// Re-reads files that changed. Returns whether anything changed.
    pub fn refresh(&mut self) -> std::io::Result<bool> {
        let mut present = BTreeSet::new();
        let mut changed = false;
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if !is_manifest(&path) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            present.insert(path.clone());
            let stamp = stamp_of(&meta);
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    error!(file = %path.display(), error = %e, "cannot read manifest; keeping its last good content");
                    continue;
                }
            };
            match parse(&text) {
                Ok(objects) => {
                    debug!(file = %path.display(), objects = objects.len(), "manifest loaded");
                    let mut objects = by_id(&path, objects);
                    if let Some(old) = self.files.get(&path) {
                        keep_unchanged(&old.objects, &mut objects);
                    }
                    self.replace_file(path, Some(FileState { stamp, objects }));
                    changed = true;
                }
                Err(e) => {
                    error!(file = %path.display(), error = %e, "invalid manifest; keeping its last good content");
                    // Remember the stamp so the same broken file is not reported again.
                    match self.files.get_mut(&path) {
                        Some(f) => f.stamp = stamp,
                        None => {
                            self.files.insert(
                                path,
                                FileState {
                                    stamp,
                                    objects: HashMap::new(),
                                },
                            );
                        }
                    }
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(*p))
            .cloned()
            .collect();
        for p in gone {
            self.replace_file(p, None);
            changed = true;
        }
        Ok(changed)
    }

    /// Puts a file's new content (or its removal) in place and brings the union up to
    /// date for the objects it held or holds.
    fn replace_file(&mut self, path: PathBuf, new: Option<FileState>) {
        let old = match new {
            Some(state) => self.files.insert(path.clone(), state),
            None => self.files.remove(&path),
        };
        let mut touched: Vec<Id> = Vec::new();
        if let Some(old) = &old {
            for id in old.objects.keys() {
                if let Some(h) = self.holders.get_mut(id) {
                    h.remove(&path);
                }
                touched.push(id.clone());
            }
        }
        if let Some(state) = self.files.get(&path) {
            for id in state.objects.keys() {
                self.holders
                    .entry(id.clone())
                    .or_default()
                    .insert(path.clone());
                if !old.as_ref().is_some_and(|o| o.objects.contains_key(id)) {
                    touched.push(id.clone());
                }
            }
        }
        for id in touched {
            let winner = self
                .holders
                .get(&id)
                .and_then(|h| h.first())
                .and_then(|p| self.files.get(p)?.objects.get(&id));
            match winner {
                Some(obj) => obj.put_into(&mut self.merged),
                None => {
                    self.holders.remove(&id);
                    remove_from(&mut self.merged, &id);
                }
            }
            if let Some(h) = self.holders.get(&id).filter(|h| h.len() > 1) {
                let mut files = h.iter().map(|p| p.display().to_string());
                let used = files.next().unwrap_or_default();
                let ignored: Vec<String> = files.collect();
                warn!(kind = id.0, namespace = %id.1.0, name = %id.1.1, used = %used, ignored = %ignored.join(", "), "duplicate object ignored (the first file by name wins)");
            }
        }
    }

    /// Everything the directory holds (O(1): the union is kept up to date).
    pub fn snapshot(&self) -> Snapshot {
        self.merged.clone()
    }
}

/// Watches `dir` and publishes a snapshot whenever its content changes (inotify, with a
/// periodic re-scan as a safety net).
pub async fn run(dir: PathBuf, tx: Sender) -> anyhow::Result<()> {
    let mut md = ManifestDir::new(&dir);
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Only changes count: reading the directory raises access events (open, close
        // without writing) of its own, and reacting to those would re-read forever.
        if let Ok(ev) = res
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            let _ = ev_tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    info!(dir = %dir.display(), "watching manifests");
    let mut first = true;
    let started = SystemTime::now();
    let mut previous: Option<Arc<Snapshot>> = None;
    let mut rescan = tokio::time::interval(Duration::from_secs(2));
    loop {
        let t0 = Instant::now();
        match md.refresh() {
            Ok(changed) if changed || first => {
                first = false;
                let read_us = t0.elapsed().as_micros() as u64;
                let snapshot = Arc::new(md.snapshot());
                debug!(
                    read_us,
                    snapshot_us = t0.elapsed().as_micros() as u64 - read_us,
                    "manifests re-read"
                );
                let update = Update {
                    trigger_time: trigger_time(previous.as_deref(), &snapshot, started),
                    snapshot: snapshot.clone(),
                    observed_at: Instant::now(),
                };
                previous = Some(snapshot);
                if tx.send(Some(update)).is_err() {
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e) => {
                error!(dir = %dir.display(), error = %e, "cannot read the manifest directory; keeping the last state")
            }
        }
        tokio::select! {
            Some(()) = ev_rx.recv() => {
                // Coalesce what is already queued (one change can raise several events).
                while ev_rx.try_recv().is_ok() {}
            }
            _ = rescan.tick() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: ["10.0.0.1"]
"#;

    #[test]
    fn parses_multi_document_yaml_and_json() {
        let objs = parse(SVC).unwrap();
        assert_eq!(objs.len(), 2);
        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"10.96.0.11","ports":[{"port":53,"protocol":"UDP"}]}}]}"#;
        assert_eq!(parse(json).unwrap().len(), 1);
    }

    #[test]
    fn parses_json_documents_separated_by_document_markers() {
        // JSON is YAML: `kubectl get -o json` output joined with `---` is a valid stream.
        let a = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"10.96.0.11","ports":[{"port":53,"protocol":"UDP"}]}}"#;
        let b = a
            .replace("\"a\"", "\"b\"")
            .replace("10.96.0.11", "10.96.0.12");
        let pretty = |s: &str| {
            serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(s).unwrap())
                .unwrap()
        };
        let flow = "{apiVersion: v1, kind: Service, metadata: {name: c}, spec: {clusterIP: 10.96.0.13, ports: [{port: 80}]}}";
        assert_eq!(parse(flow).unwrap().len(), 1);
        assert_eq!(parse(&format!("{flow}\n---\n{a}\n")).unwrap().len(), 2);
        for text in [
            format!("{a}\n---\n{b}\n"),
            format!("{}\n---\n{}\n", pretty(a), pretty(&b)),
            format!("---\n{}\n---\n{}\n", pretty(a), pretty(&b)),
        ] {
            let objs = parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
            assert_eq!(objs.len(), 2, "{text}");
        }
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for (bad, why) in [
            (
                "kind: Service\napiVersion: v1\nmetadata: {name: x}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}",
                "invalid clusterIP",
            ),
            (
                "kind: Service\napiVersion: v1\nmetadata: {name: x}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 70000}]}",
                "out of range",
            ),
            (
                "kind: Service\napiVersion: v1\nmetadata: {name: x}\nspec: {ports: [{port: [1]}]}",
                "Service x",
            ),
            ("{{{", "document 1"),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: [\"fd00::1\"]}]",
                "not an IPv4",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_new_version_with_the_same_size_and_mtime_is_reloaded() {
        let dir = std::env::temp_dir().join(format!("capstan-stamp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.yaml");
        std::fs::write(&path, SVC).unwrap();
        let mut md = ManifestDir::new(&dir);
        assert!(md.refresh().unwrap());
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        // `cp -p` style: same length, old mtime, renamed into place.
        let tmp = dir.join(".a.yaml.tmp");
        std::fs::write(&tmp, SVC.replace("10.96.0.10", "10.96.0.20")).unwrap();
        let f = std::fs::File::options().write(true).open(&tmp).unwrap();
        f.set_modified(mtime).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(md.refresh().unwrap());
        let ip = md
            .snapshot()
            .services
            .values()
            .next()
            .unwrap()
            .spec
            .as_ref()
            .unwrap()
            .cluster_ip
            .clone();
        assert_eq!(ip.as_deref(), Some("10.96.0.20"));
        assert!(!md.refresh().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_file_keeps_last_good_content_and_duplicates_resolve() {
        let dir = std::env::temp_dir().join(format!("capstan-manifests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), SVC).unwrap();
        std::fs::write(dir.join("b.yaml"), SVC).unwrap();
        let mut md = ManifestDir::new(&dir);
        assert!(md.refresh().unwrap());
        let s = md.snapshot();
        assert_eq!((s.services.len(), s.endpoint_slices.len()), (1, 1));
        std::fs::write(dir.join("a.yaml"), "kind: Service\nnot: [valid").unwrap();
        md.refresh().unwrap();
        assert_eq!(md.snapshot().services.len(), 1);
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        assert!(md.refresh().unwrap());
        assert!(md.snapshot().services.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
