//! # Fixture for the capstan-proxy integration tests
//!
//! [`ProxyFixture`] builds one node with `n` backend pods (each running `capstan-echo` named
//! `b<i>` on TCP and UDP port [`ECHO_PORT`], IPv4 and IPv6), a client pod whose
//! [`Probe`] runs inside the topology cgroup (so its sockets are balanced), and a manifest
//! directory. It starts, stops and restarts the agent in the node's network namespace and
//! offers the waits and checks the tests share. The small builders in [`k8s`] produce the
//! Services, EndpointSlices and Nodes the agent reads from the manifest directory.
//!
//! Every helper that can fail adds the agent's log to its error, so a failing test shows
//! what the agent did.

use crate::{Node, Pod, Probe, Proc, Reply, Signal, Topology, bin_path, wait_until};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// Port every backend's echo server listens on (TCP and UDP, v4 and v6).
pub const ECHO_PORT: u16 = 8080;
/// Where the agent's /healthz and /livez answer (inside the node namespace).
pub const HEALTHZ: &str = "127.0.0.1:10256";
/// Where the agent's /metrics answers (inside the node namespace).
pub const METRICS: &str = "127.0.0.1:10249";
/// Default time to wait for the agent to apply a change.
pub const SETTLE: Duration = Duration::from_secs(20);
/// The line the agent logs once its data plane is up.
pub const READY_LINE: &str = "capstan-proxy running in ebpf mode";

/// A `SocketAddr` from anything that converts into an `IpAddr`.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Parses an address literal (panics on a typo in a test).
pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("bad IP literal {s:?} in test"))
}

/// IPv4 address of backend pod `i`: `10.244.0.<10+i>`.
pub fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 10 + i as u8)
}

/// IPv6 address of backend pod `i`: `fd00:244::<0x10+i>`.
pub fn backend_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x10 + i as u16)
}

/// The client pod's addresses.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 2);

/// Name of the echo server of backend `i`.
pub fn bname(i: usize) -> String {
    format!("b{i}")
}

use crate::tail;

/// Whether an errno means "the address was not translated and went nowhere" in a
/// topology without routes off the machine.
pub fn is_untranslated_errno(e: Option<&str>) -> bool {
    matches!(e, Some("ENETUNREACH" | "EHOSTUNREACH"))
}

// ---------------------------------------------------------------------------------------------
// Manifest builders
// ---------------------------------------------------------------------------------------------

/// Builders for the Kubernetes objects the agent reads (as `serde_json::Value`s; JSON is
/// YAML, so the files they make are read by the agent's YAML parser).
pub mod k8s {
    use serde_json::{Map, Value, json};

    /// Sets `path` (`a/b/0/c`) in `v`, creating objects on the way.
    pub fn set_path(v: &mut Value, path: &str, new: Value) {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        set_parts(v, &parts, new);
    }

    fn set_parts(cur: &mut Value, parts: &[&str], new: Value) {
        let Some((first, rest)) = parts.split_first() else {
            *cur = new;
            return;
        };
        if cur.is_array()
            && let Ok(idx) = first.parse::<usize>()
        {
            let arr = cur.as_array_mut().expect("array");
            return set_parts(&mut arr[idx], rest, new);
        }
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let obj = cur.as_object_mut().expect("object");
        let child = obj
            .entry((*first).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        set_parts(child, rest, new);
    }

    /// Removes `path` from `v` if present.
    pub fn remove_path(v: &mut Value, path: &str) {
        let (parent, key) = match path.rsplit_once('/') {
            Some((p, k)) => (p, k),
            None => ("", path),
        };
        let mut cur = v;
        for p in parent.split('/').filter(|p| !p.is_empty()) {
            cur = match cur.get_mut(p) {
                Some(c) => c,
                None => return,
            };
        }
        if let Some(o) = cur.as_object_mut() {
            o.remove(key);
        }
    }

    /// A Service (type ClusterIP unless changed).
    #[derive(Clone, Debug)]
    pub struct Service(pub Value);

    impl Service {
        /// A ClusterIP Service `default/<name>` with `clusterIP = ips[0]` and
        /// `clusterIPs = ips` (dual-stack when two are given). `ips = ["None"]` is headless.
        pub fn new(name: &str, ips: &[&str]) -> Service {
            let mut v = json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"type": "ClusterIP", "ports": []}
            });
            if let Some(first) = ips.first() {
                set_path(&mut v, "spec/clusterIP", json!(first));
                set_path(&mut v, "spec/clusterIPs", json!(ips));
                let fams: Vec<&str> = ips
                    .iter()
                    .filter(|i| **i != "None")
                    .map(|i| if i.contains(':') { "IPv6" } else { "IPv4" })
                    .collect();
                if !fams.is_empty() {
                    set_path(&mut v, "spec/ipFamilies", json!(fams));
                }
                if ips.len() > 1 {
                    set_path(&mut v, "spec/ipFamilyPolicy", json!("RequireDualStack"));
                }
            }
            Service(v)
        }

        fn push_port(mut self, p: Value) -> Self {
            self.0["spec"]["ports"]
                .as_array_mut()
                .expect("ports array")
                .push(p);
            self
        }

        /// A port `name` `port/proto` → `target` (a number).
        pub fn port(self, name: &str, port: u16, proto: &str, target: u16) -> Self {
            self.push_port(
                json!({"name": name, "port": port, "protocol": proto, "targetPort": target}),
            )
        }

        /// A port whose targetPort is a name (resolved per endpoint from the slices).
        pub fn port_named_target(self, name: &str, port: u16, proto: &str, target: &str) -> Self {
            self.push_port(
                json!({"name": name, "port": port, "protocol": proto, "targetPort": target}),
            )
        }

        /// A port with a nodePort; makes the Service a NodePort unless it is a LoadBalancer.
        pub fn node_port(
            mut self,
            name: &str,
            port: u16,
            proto: &str,
            target: u16,
            np: u16,
        ) -> Self {
            if self.0["spec"]["type"] != "LoadBalancer" {
                self = self.type_("NodePort");
            }
            self.push_port(json!({"name": name, "port": port, "protocol": proto, "targetPort": target, "nodePort": np}))
        }

        pub fn type_(mut self, t: &str) -> Self {
            set_path(&mut self.0, "spec/type", json!(t));
            self
        }

        /// type ExternalName pointing at `host` (the clusterIP fields are kept, to check the
        /// agent goes by the type).
        pub fn external_name(mut self, host: &str) -> Self {
            set_path(&mut self.0, "spec/type", json!("ExternalName"));
            set_path(&mut self.0, "spec/externalName", json!(host));
            self
        }

        pub fn external_ips(mut self, ips: &[&str]) -> Self {
            set_path(&mut self.0, "spec/externalIPs", json!(ips));
            self
        }

        /// type LoadBalancer with these `status.loadBalancer.ingress` IPs.
        pub fn lb_ingress(mut self, ips: &[&str]) -> Self {
            set_path(&mut self.0, "spec/type", json!("LoadBalancer"));
            let ing: Vec<Value> = ips.iter().map(|i| json!({"ip": i})).collect();
            set_path(&mut self.0, "status/loadBalancer/ingress", json!(ing));
            self
        }

        /// sessionAffinity ClientIP (with timeoutSeconds if given), or None.
        pub fn affinity(mut self, on: bool, timeout: Option<u32>) -> Self {
            if on {
                set_path(&mut self.0, "spec/sessionAffinity", json!("ClientIP"));
                if let Some(t) = timeout {
                    set_path(
                        &mut self.0,
                        "spec/sessionAffinityConfig/clientIP/timeoutSeconds",
                        json!(t),
                    );
                }
            } else {
                set_path(&mut self.0, "spec/sessionAffinity", json!("None"));
                remove_path(&mut self.0, "spec/sessionAffinityConfig");
            }
            self
        }

        pub fn annotate(mut self, k: &str, v: &str) -> Self {
            let path = format!("metadata/annotations/{}", k.replace('/', "\u{1}"));
            set_path(&mut self.0, &path, json!(v));
            fix_keys(&mut self.0);
            self
        }

        pub fn label(mut self, k: &str, v: &str) -> Self {
            let path = format!("metadata/labels/{}", k.replace('/', "\u{1}"));
            set_path(&mut self.0, &path, json!(v));
            fix_keys(&mut self.0);
            self
        }

        pub fn itp_local(mut self) -> Self {
            set_path(&mut self.0, "spec/internalTrafficPolicy", json!("Local"));
            self
        }

        pub fn traffic_distribution(mut self, d: &str) -> Self {
            set_path(&mut self.0, "spec/trafficDistribution", json!(d));
            self
        }

        pub fn publish_not_ready(mut self, on: bool) -> Self {
            set_path(&mut self.0, "spec/publishNotReadyAddresses", json!(on));
            self
        }

        pub fn json(&self) -> Value {
            self.0.clone()
        }
    }

    /// Label and annotation keys contain '/', which `set_path` would split: they are
    /// written with \u{1} in place of the slash and put back here.
    fn fix_keys(v: &mut Value) {
        match v {
            Value::Object(o) => {
                let keys: Vec<String> = o.keys().cloned().collect();
                for k in keys {
                    let mut val = o.remove(&k).expect("key");
                    fix_keys(&mut val);
                    o.insert(k.replace('\u{1}', "/"), val);
                }
            }
            Value::Array(a) => a.iter_mut().for_each(fix_keys),
            _ => {}
        }
    }

    /// One endpoint of an EndpointSlice.
    #[derive(Clone, Debug)]
    pub struct Ep(pub Value);

    impl Ep {
        /// A ready endpoint (conditions ready/serving true, terminating false).
        pub fn ready(ip: impl ToString) -> Ep {
            Ep(json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false}
            }))
        }

        /// Explicit conditions.
        pub fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Ep {
            self.0["conditions"] =
                json!({"ready": ready, "serving": serving, "terminating": terminating});
            self
        }

        /// Not ready and not serving (a starting pod).
        pub fn not_ready(self) -> Ep {
            self.conditions(false, false, false)
        }

        pub fn node(mut self, name: &str) -> Ep {
            self.0["nodeName"] = json!(name);
            self
        }

        pub fn zone_hint(mut self, zone: &str) -> Ep {
            set_path(&mut self.0, "hints/forZones", json!([{"name": zone}]));
            self
        }

        pub fn node_hint(mut self, node: &str) -> Ep {
            set_path(&mut self.0, "hints/forNodes", json!([{"name": node}]));
            self
        }
    }

    /// An EndpointSlice of Service `service`.
    #[derive(Clone, Debug)]
    pub struct Slice(pub Value);

    impl Slice {
        /// `family` is "IPv4" or "IPv6".
        pub fn new(name: &str, service: &str, family: &str) -> Slice {
            Slice(json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": service}
                },
                "addressType": family,
                "ports": [],
                "endpoints": []
            }))
        }

        pub fn port(mut self, name: &str, port: u16, proto: &str) -> Slice {
            self.0["ports"]
                .as_array_mut()
                .expect("ports")
                .push(json!({"name": name, "port": port, "protocol": proto}));
            self
        }

        pub fn endpoint(mut self, ep: Ep) -> Slice {
            self.0["endpoints"]
                .as_array_mut()
                .expect("endpoints")
                .push(ep.0);
            self
        }

        pub fn endpoints(mut self, eps: impl IntoIterator<Item = Ep>) -> Slice {
            for ep in eps {
                self = self.endpoint(ep);
            }
            self
        }

        pub fn label(mut self, k: &str, v: &str) -> Slice {
            self.0["metadata"]["labels"][k] = json!(v);
            self
        }

        pub fn json(&self) -> Value {
            self.0.clone()
        }
    }

    /// A Node object (for its zone label).
    pub fn node(name: &str, zone: Option<&str>) -> Value {
        let mut v = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
        if let Some(z) = zone {
            v["metadata"]["labels"] = json!({"topology.kubernetes.io/zone": z});
        }
        v
    }
}

pub use k8s::{Ep, Service, Slice};

// ---------------------------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------------------------

/// Options for [`ProxyFixture::with`].
#[derive(Clone, Debug)]
pub struct FixtureOptions {
    /// Backend pods `b0..b<n>`, each with an echo server.
    pub backends: usize,
    /// Start the agent right away (with [`FixtureOptions::agent_args`]).
    pub start_agent: bool,
    /// Extra agent arguments.
    pub agent_args: Vec<String>,
}

impl Default for FixtureOptions {
    fn default() -> Self {
        FixtureOptions {
            backends: 2,
            start_agent: true,
            agent_args: Vec::new(),
        }
    }
}

/// One node, `n` backends with echo servers, a client with a probe in the cgroup, a
/// manifest directory and the agent. See the module docs.
pub struct ProxyFixture {
    pub node: Node,
    pub backends: Vec<Pod>,
    pub client: Pod,
    /// The client pod's probe, inside the topology cgroup.
    pub probe: Probe,
    pub manifests: PathBuf,
    /// Echo servers (index = backend) and any extra ones.
    pub echoes: Vec<Proc>,
    agent: Option<Proc>,
    /// Earlier runs of the agent (kept for their logs).
    old_agents: Vec<Proc>,
    agent_args: Vec<String>,
    /// Last: dropped after every process above.
    pub topo: Topology,
}

impl ProxyFixture {
    /// Two backends, agent started.
    pub fn new() -> Result<ProxyFixture> {
        Self::with(FixtureOptions::default())
    }

    /// `n` backends, agent started.
    pub fn with_backends(n: usize) -> Result<ProxyFixture> {
        Self::with(FixtureOptions {
            backends: n,
            ..Default::default()
        })
    }

    pub fn with(opts: FixtureOptions) -> Result<ProxyFixture> {
        crate::require_root();
        let topo = Topology::new()?;
        let node = topo.node("n1")?;
        // An untranslated Service address must fail at once (ENETUNREACH from the node) every
        // time, not only for the first few ICMP errors the per-host rate limit lets through.
        topo.sysctl(
            node.netns(),
            &[
                ("net.ipv4.icmp_ratelimit", "0"),
                ("net.ipv6.icmp.ratelimit", "0"),
            ],
        )?;
        let mut backends = Vec::new();
        let mut echoes = Vec::new();
        for i in 0..opts.backends {
            let pod = topo.pod(&node, &bname(i), backend_v4(i), backend_v6(i))?;
            echoes.push(echo_on(&topo, pod.netns(), &bname(i), ECHO_PORT)?);
            backends.push(pod);
        }
        let client = topo.pod(&node, "client", CLIENT_V4, CLIENT_V6)?;
        let probe = topo.probe(client.netns(), true)?;
        let manifests = topo.scratch_dir().join("manifests");
        fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        let mut fx = ProxyFixture {
            node,
            backends,
            client,
            probe,
            manifests,
            echoes,
            agent: None,
            old_agents: Vec::new(),
            agent_args: opts.agent_args.clone(),
            topo,
        };
        if opts.start_agent {
            fx.start_agent()?;
        }
        Ok(fx)
    }

    /// The agent's node name (`--hostname-override`).
    pub fn node_name(&self) -> &str {
        self.node.name()
    }

    // ----- the agent -----

    /// The command line the agent runs with (plus `extra`).
    pub fn agent_command(&self, extra: &[String]) -> Result<Command> {
        let mut c = Command::new(bin_path("capstan-proxy")?);
        // The agent reads the manifest directory unless it is pointed at an API server.
        if !extra.iter().any(|a| a == "--kubeconfig" || a == "--master") {
            c.arg("--manifests").arg(&self.manifests);
        }
        c.arg("--bpffs-dir")
            .arg(self.topo.bpffs_dir())
            .arg("--cgroup-path")
            .arg(self.topo.cgroup_path())
            .arg("--hostname-override")
            .arg(self.node.name())
            .args(["--healthz-bind-address", HEALTHZ])
            .args(["--metrics-bind-address", METRICS])
            .args(["-v", "4"])
            .args(extra);
        Ok(c)
    }

    /// Starts the agent (with the fixture's extra arguments) and waits until its data plane
    /// is up.
    pub fn start_agent(&mut self) -> Result<()> {
        let args = self.agent_args.clone();
        self.start_agent_with(&args)
    }

    /// Starts the agent with these extra arguments (remembered for restarts).
    pub fn start_agent_with(&mut self, extra: &[String]) -> Result<()> {
        ensure!(self.agent.is_none(), "the agent is already running");
        self.agent_args = extra.to_vec();
        let mut c = self.agent_command(extra)?;
        let p = self.topo.spawn(self.node.netns(), false, &mut c)?;
        self.agent = Some(p);
        self.wait_agent_log(READY_LINE, Duration::from_secs(30))
            .context("the agent did not start")?;
        Ok(())
    }

    /// The running agent.
    pub fn agent(&self) -> &Proc {
        self.agent.as_ref().expect("the agent is not running")
    }

    /// Whether an agent was started and is still running.
    pub fn agent_running(&self) -> bool {
        self.agent.as_ref().is_some_and(|a| a.is_running())
    }

    /// SIGTERM, and wait (15 s) for the agent to exit. Returns its exit status.
    pub fn stop_agent(&mut self) -> Result<ExitStatus> {
        let a = self.agent.take().context("the agent is not running")?;
        let r = a
            .signal(Signal::SIGTERM)
            .and_then(|_| a.wait_timeout(Duration::from_secs(15)));
        self.old_agents.push(a);
        r
    }

    /// Stops the agent with SIGTERM and starts it again with the same bpffs dir and
    /// arguments.
    pub fn restart_agent(&mut self) -> Result<()> {
        let st = self.stop_agent()?;
        ensure!(
            st.success(),
            "agent exited with {st} on SIGTERM\n{}",
            self.agent_log()
        );
        self.start_agent()
    }

    /// stderr (the log) of the current agent run.
    pub fn agent_stderr(&self) -> String {
        self.agent.as_ref().map(|a| a.stderr()).unwrap_or_default()
    }

    /// The tail of every agent run's log, for failure messages.
    pub fn agent_log(&self) -> String {
        let mut out = String::new();
        let runs = self.old_agents.iter().chain(self.agent.iter());
        for (i, a) in runs.enumerate() {
            let status = match a.try_status() {
                Some(s) => format!("exited: {s}"),
                None => "running".into(),
            };
            let err = a.stderr();
            out.push_str(&format!(
                "\n----- agent run {i} (pid {}, {status}), log {} -----\n{}\n",
                a.pid(),
                a.stderr_path().display(),
                tail(err.trim_end(), 12 * 1024)
            ));
        }
        if out.is_empty() {
            out.push_str("(the agent was never started)");
        }
        out
    }

    /// Waits until the current agent's log has a line containing `needle`; returns it.
    pub fn wait_agent_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        let a = self.agent.as_ref().context("the agent is not running")?;
        let deadline = Instant::now() + timeout;
        loop {
            let exited = a.try_status();
            if let Some(l) = a.stderr().lines().find(|l| l.contains(needle)) {
                return Ok(l.to_string());
            }
            if let Some(s) = exited {
                bail!(
                    "the agent exited ({s}) before logging {needle:?}\n{}",
                    self.agent_log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent did not log {needle:?} within {timeout:?}\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails (with the log) unless the agent is still running.
    pub fn ensure_agent_alive(&self) -> Result<()> {
        let a = self.agent.as_ref().context("the agent is not running")?;
        ensure!(
            a.is_running(),
            "the agent died: {:?}\n{}",
            a.try_status(),
            self.agent_log()
        );
        Ok(())
    }

    // ----- manifests -----

    /// Writes `docs` (as a multi-document YAML file of JSON documents, each opened by `---`)
    /// to `file` in the
    /// manifest directory, atomically (a dotfile renamed into place).
    pub fn write(&self, file: &str, docs: &[Value]) -> Result<()> {
        let text: String = docs
            .iter()
            .map(|d| format!("---\n{}\n", serde_json::to_string_pretty(d).expect("json")))
            .collect();
        self.write_raw(file, &text)
    }

    /// Writes `text` to `file` atomically.
    pub fn write_raw(&self, file: &str, text: &str) -> Result<()> {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        let dst = self.manifests.join(file);
        fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))?;
        Ok(())
    }

    /// Removes `file` from the manifest directory.
    pub fn remove(&self, file: &str) -> Result<()> {
        let p = self.manifests.join(file);
        fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }

    /// IPv4 and IPv6 EndpointSlices `<svc>-v4`/`<svc>-v6` for Service `svc`, port `port_name`
    /// (TCP and UDP, [`ECHO_PORT`]), with the given backends ready.
    pub fn slices(&self, svc: &str, port_names: &[(&str, &str)], backends: &[usize]) -> Vec<Value> {
        let mut out = Vec::new();
        for (fam, suffix) in [("IPv4", "v4"), ("IPv6", "v6")] {
            let mut s = Slice::new(&format!("{svc}-{suffix}"), svc, fam);
            for (name, proto) in port_names {
                s = s.port(name, ECHO_PORT, proto);
            }
            for &i in backends {
                let a: IpAddr = if fam == "IPv4" {
                    backend_v4(i).into()
                } else {
                    backend_v6(i).into()
                };
                s = s.endpoint(Ep::ready(a).node(self.node_name()));
            }
            out.push(s.json());
        }
        out
    }

    /// A web Service `name` at `v4`/`v6` (dual-stack) with port `http` 80/TCP and
    /// `dns` 53/UDP → [`ECHO_PORT`], and v4+v6 slices with `backends`.
    pub fn web_service(&self, name: &str, v4: &str, v6: &str, backends: &[usize]) -> Vec<Value> {
        let svc = Service::new(name, &[v4, v6])
            .port("http", 80, "TCP", ECHO_PORT)
            .port("dns", 53, "UDP", ECHO_PORT);
        let mut docs = vec![svc.json()];
        docs.extend(self.slices(name, &[("http", "TCP"), ("dns", "UDP")], backends));
        docs
    }

    /// Starts one more echo server (TCP and UDP on `port`, v4 and v6) in backend `i`'s pod.
    pub fn extra_echo(&mut self, i: usize, name: &str, port: u16) -> Result<()> {
        let p = echo_on(&self.topo, self.backends[i].netns(), name, port)?;
        self.echoes.push(p);
        Ok(())
    }

    // ----- requests -----

    /// One request of `proto` ("tcp", "udp", "udpc") through probe `p`.
    pub fn request_with(&self, p: &Probe, proto: &str, addr: SocketAddr) -> Result<Reply> {
        let line = p
            .cmd(&format!("{proto} {addr}"))
            .with_context(|| self.agent_log())?;
        Reply::parse(&line)
    }

    /// One request through the client's probe.
    pub fn request(&self, proto: &str, addr: SocketAddr) -> Result<Reply> {
        self.request_with(&self.probe, proto, addr)
    }

    /// `loop proto addr n` through probe `p`.
    pub fn loop_with(
        &self,
        p: &Probe,
        proto: &str,
        addr: SocketAddr,
        n: u64,
    ) -> Result<crate::LoopSummary> {
        p.loop_proto(proto, addr, n)
            .with_context(|| self.agent_log())
    }

    /// `loop proto addr n` through the client's probe.
    pub fn run_loop(&self, proto: &str, addr: SocketAddr, n: u64) -> Result<crate::LoopSummary> {
        self.loop_with(&self.probe, proto, addr, n)
    }

    /// Waits until `n` requests of `proto` to `addr` from probe `p` all succeed and the set
    /// of backends that answered is exactly `want`. The way to wait for a change to apply.
    pub fn wait_backends_with(
        &self,
        p: &Probe,
        proto: &str,
        addr: SocketAddr,
        want: &[&str],
    ) -> Result<()> {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let n = (want.len() as u64 * 12).max(12);
        let mut last = String::new();
        let r = wait_until(SETTLE, || {
            let s = p.loop_proto(proto, addr, n)?;
            last = s.raw.clone();
            let got: BTreeSet<String> = s.backends.keys().cloned().collect();
            Ok(s.fail == 0 && got == want)
        });
        r.with_context(|| {
            format!(
                "waiting for {proto} {addr} to be served by exactly {want:?}; last loop: {last}\n{}",
                self.agent_log()
            )
        })
    }

    /// [`ProxyFixture::wait_backends_with`] through the client's probe.
    pub fn wait_backends(&self, proto: &str, addr: SocketAddr, want: &[&str]) -> Result<()> {
        self.wait_backends_with(&self.probe, proto, addr, want)
    }

    /// Waits until a request of `proto` to `addr` fails with an errno accepted by `pred`.
    pub fn wait_error_with(
        &self,
        p: &Probe,
        proto: &str,
        addr: SocketAddr,
        what: &str,
        pred: impl Fn(Option<&str>) -> bool,
    ) -> Result<Reply> {
        let mut last = None;
        let r = wait_until(SETTLE, || {
            let r = Reply::parse(&p.cmd(&format!("{proto} {addr}"))?)?;
            let done = !r.ok && pred(r.errno.as_deref());
            last = Some(r);
            Ok(done)
        });
        r.with_context(|| {
            format!(
                "waiting for {proto} {addr} to fail with {what}; last reply: {:?}\n{}",
                last.as_ref().map(|r| r.raw.as_str()),
                self.agent_log()
            )
        })?;
        Ok(last.expect("reply"))
    }

    /// Waits until `proto` requests to `addr` are refused at once (ECONNREFUSED).
    pub fn wait_refused(&self, proto: &str, addr: SocketAddr) -> Result<Reply> {
        self.wait_error_with(&self.probe, proto, addr, "ECONNREFUSED", |e| {
            e == Some("ECONNREFUSED")
        })
    }

    /// Waits until TCP to `addr` is no longer translated (ENETUNREACH/EHOSTUNREACH: the
    /// address is routed like any other and goes nowhere in the test topology).
    pub fn wait_untranslated(&self, addr: SocketAddr) -> Result<Reply> {
        self.wait_error_with(
            &self.probe,
            "tcp",
            addr,
            "ENETUNREACH/EHOSTUNREACH",
            is_untranslated_errno,
        )
    }

    /// Runs `n` requests and checks: none failed, only backends in `allowed` answered and,
    /// if `all`, every one of them did. Returns the summary.
    pub fn expect_spread(
        &self,
        proto: &str,
        addr: SocketAddr,
        n: u64,
        allowed: &[&str],
        all: bool,
    ) -> Result<crate::LoopSummary> {
        let s = self.run_loop(proto, addr, n)?;
        let allowed_set: BTreeSet<&str> = allowed.iter().copied().collect();
        let bad: Vec<&String> = s
            .backends
            .keys()
            .filter(|b| !allowed_set.contains(b.as_str()))
            .collect();
        ensure!(
            s.fail == 0 && bad.is_empty(),
            "{proto} {addr}: expected only {allowed:?} without failures, got {}\n{}",
            s.raw,
            self.agent_log()
        );
        if all {
            let missing: Vec<&&str> = allowed
                .iter()
                .filter(|b| !s.backends.contains_key(**b))
                .collect();
            ensure!(
                missing.is_empty(),
                "{proto} {addr}: backends {missing:?} never answered in {n} requests: {}\n{}",
                s.raw,
                self.agent_log()
            );
        }
        Ok(s)
    }

    /// Checks one successful reply: which backend answered, the client address it saw, and
    /// the address the client saw (getpeername for tcp/udpc, recvfrom for udp/udpc).
    pub fn check_reply(
        &self,
        r: &Reply,
        allowed: &[&str],
        seen: IpAddr,
        frontend: SocketAddr,
    ) -> Result<()> {
        ensure!(r.ok, "request failed: {}\n{}", r.raw, self.agent_log());
        ensure!(
            r.backend.as_deref().is_some_and(|b| allowed.contains(&b)),
            "answered by {:?}, expected one of {allowed:?}: {}",
            r.backend,
            r.raw
        );
        ensure!(
            r.seen_ip.as_deref() == Some(seen.to_string().as_str()),
            "the backend saw the client as {:?}, expected {seen} (source not preserved): {}",
            r.seen_ip,
            r.raw
        );
        if let Some(p) = &r.peer {
            ensure!(
                r.peer_addr() == Some(frontend),
                "getpeername() returned {p}, expected the frontend {frontend}: {}",
                r.raw
            );
        }
        if let Some(f) = &r.from {
            ensure!(
                r.from_addr() == Some(frontend),
                "the reply came from {f}, expected the frontend {frontend}: {}",
                r.raw
            );
        }
        Ok(())
    }

    // ----- healthz and metrics -----

    /// `curl` `url` inside the node namespace: (HTTP status, content type, body).
    pub fn http_get(&self, url: &str) -> Result<(u16, String, String)> {
        let out = self.topo.run(
            self.node.netns(),
            Command::new("curl")
                .args([
                    "-s",
                    "-m",
                    "5",
                    "-o",
                    "-",
                    "-w",
                    "\n%{http_code} %{content_type}",
                ])
                .arg(url),
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, meta) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let (code, ctype) = meta.split_once(' ').unwrap_or((meta, ""));
        let code: u16 = code.trim().parse().with_context(|| {
            format!(
                "curl {url}: no status ({}): {text}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.agent_log()
            )
        })?;
        Ok((code, ctype.trim().to_string(), body.to_string()))
    }

    /// The agent's /metrics text.
    pub fn metrics(&self) -> Result<String> {
        let (code, _, body) = self.http_get(&format!("http://{METRICS}/metrics"))?;
        ensure!(code == 200, "/metrics answered {code}: {body}");
        Ok(body)
    }

    /// Samples of the metric family `name` (exact name) as (labels, value).
    pub fn metric(&self, name: &str) -> Result<Vec<(String, f64)>> {
        Ok(parse_metric(&self.metrics()?, name))
    }

    /// The value of `name` with labels containing `labels` (e.g. `map="CS_MAGLEV_V1"`), or
    /// None if there is no such sample.
    pub fn metric_value(&self, name: &str, labels: &str) -> Result<Option<f64>> {
        Ok(self
            .metric(name)?
            .into_iter()
            .find(|(l, _)| l.contains(labels))
            .map(|(_, v)| v))
    }
}

/// Samples of metric `name` in Prometheus text: (label text, value).
pub fn parse_metric(text: &str, name: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once('}') {
                Some((l, v)) => (l.to_string(), v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            (String::new(), rest)
        } else {
            continue;
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            out.push((labels, v));
        }
    }
    out
}

/// An echo server named `name` on TCP and UDP `port`, v4 and v6 wildcard, not in the cgroup.
pub fn echo_on(topo: &Topology, netns: &str, name: &str, port: u16) -> Result<Proc> {
    let addrs = [
        sa(Ipv4Addr::UNSPECIFIED, port),
        sa(Ipv6Addr::UNSPECIFIED, port),
    ];
    topo.spawn_echo(netns, false, name, &addrs, &addrs)
}

/// Several loop summaries added up into one (its `raw` lists the parts).
pub fn merge_summaries(sums: &[crate::LoopSummary]) -> crate::LoopSummary {
    let mut total = crate::LoopSummary::default();
    for s in sums {
        total.n += s.n;
        total.fail += s.fail;
        total.micros += s.micros;
        for (k, v) in &s.backends {
            *total.backends.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &s.errors {
            *total.errors.entry(k.clone()).or_insert(0) += v;
        }
    }
    total.raw = format!(
        "{} loops: n={} fail={} backends={:?} errors={:?}",
        sums.len(),
        total.n,
        total.fail,
        total.backends,
        total.errors
    );
    total
}

/// Runs `loop proto addr 50` on `p` again and again until `stop` is set (for a client
/// that keeps going while the test changes things); returns every summary.
pub fn loop_until_stopped(
    p: &Probe,
    proto: &str,
    addr: SocketAddr,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Vec<crate::LoopSummary>> {
    let mut out = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        out.push(p.loop_proto(proto, addr, 50)?);
    }
    Ok(out)
}

/// `serde_json` for tests that build objects by hand.
pub use serde_json;
