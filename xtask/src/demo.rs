//! `cargo xtask demo`: capstan-server (embedded store) and capstan-proxy watching it; kubectl
//! applies a dual-stack Service over two backends in network namespaces, which answers on
//! its ClusterIPs, and a Service without endpoints is refused at once.
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use capstan_tests::{Topology, require_root};

const MANIFEST: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: ["10.244.1.10"], conditions: {ready: true}, nodeName: node1}
- {addresses: ["10.244.1.11"], conditions: {ready: true}, nodeName: node1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: ["fd00:244::10"], conditions: {ready: true}, nodeName: node1}
- {addresses: ["fd00:244::11"], conditions: {ready: true}, nodeName: node1}
---
apiVersion: v1
kind: Service
metadata: {name: nobody-home, namespace: demo}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

pub fn run(root: &Path) -> Result<()> {
    require_root();
    crate::build_bins(root, false)?;
    let topo = Topology::new()?;
    let node = topo.node("node1")?;
    let a = topo.pod(
        &node,
        "backend-a",
        "10.244.1.10".parse()?,
        "fd00:244::10".parse()?,
    )?;
    let b = topo.pod(
        &node,
        "backend-b",
        "10.244.1.11".parse()?,
        "fd00:244::11".parse()?,
    )?;
    let client = topo.pod(
        &node,
        "client",
        "10.244.1.20".parse()?,
        "fd00:244::20".parse()?,
    )?;
    let tcp = ["0.0.0.0:8080".parse()?, "[::]:8080".parse()?];
    let udp = ["0.0.0.0:5353".parse()?, "[::]:5353".parse()?];
    let _ea = topo.spawn_echo(a.netns(), false, "backend-a", &tcp, &udp)?;
    let _eb = topo.spawn_echo(b.netns(), false, "backend-b", &tcp, &udp)?;

    // capstan-server, with its embedded store, in the node's namespace.
    let data = topo.scratch_dir().join("capstan-server");
    let kubeconfig = data.join("admin.kubeconfig");
    println!(
        "$ capstan-server --data-dir {} --bind-address 127.0.0.1",
        data.display()
    );
    let mut server_cmd = std::process::Command::new(capstan_tests::bin_path("capstan-server")?);
    server_cmd
        .arg("--data-dir")
        .arg(&data)
        .args(["--bind-address", "127.0.0.1", "--secure-port", "6443"])
        .args(["--service-cluster-ip-range", "10.96.0.0/16,fd00:96::/108"]);
    let server = topo.spawn(node.netns(), false, &mut server_cmd)?;
    crate::wait_for_log(&server, "capstan-server serving", Duration::from_secs(30))?;
    let kubectl = |args: &str| -> Result<String> {
        topo.sh(
            node.netns(),
            &format!("KUBECONFIG={} kubectl {args}", kubeconfig.display()),
        )
    };
    let file = topo.scratch_dir().join("demo.yaml");
    std::fs::write(&file, MANIFEST)?;
    println!("$ kubectl apply -f demo.yaml");
    print!("{}", kubectl(&format!("apply -f {}", file.display()))?);

    let mut cmd = crate::agent_command(&topo, crate::AgentSource::Kubeconfig(&kubeconfig))?;
    println!(
        "$ capstan-proxy --kubeconfig {} --bpffs-dir {} --cgroup-path {}",
        kubeconfig.display(),
        topo.bpffs_dir().display(),
        topo.cgroup_path().display()
    );
    let agent = topo.spawn(node.netns(), false, &mut cmd)?;
    crate::wait_for_log(&agent, "synced", Duration::from_secs(30))?;
    println!("$ kubectl get services,endpointslices -n demo");
    print!("{}", kubectl("get services,endpointslices -n demo")?);
    println!(
        "\ncapstan-proxy is running; Service demo/web has ClusterIPs 10.96.0.10 and fd00:96::10\n"
    );

    let probe = topo.probe(client.netns(), true)?;
    for target in ["10.96.0.10:80", "[fd00:96::10]:80"] {
        for _ in 0..4 {
            let r = probe.tcp(target.parse()?)?;
            ensure!(
                r.ok,
                "request to {target} failed: {}\n{}",
                r.raw,
                agent.log()
            );
            println!(
                "tcp {target:<18} -> answered by {:<10} (the backend saw the client as {}, the client sees its peer as {})",
                r.backend.as_deref().unwrap_or("?"),
                r.seen_ip.as_deref().unwrap_or("?"),
                r.peer.as_deref().unwrap_or("?")
            );
        }
    }
    let r = probe.udp("10.96.0.10:53".parse()?)?;
    ensure!(r.ok, "UDP request failed: {}", r.raw);
    println!(
        "udp 10.96.0.10:53     -> answered by {:<10} (reply came from {})",
        r.backend.as_deref().unwrap_or("?"),
        r.from.as_deref().unwrap_or("?")
    );
    let r = probe.tcp("10.96.0.20:80".parse()?)?;
    ensure!(
        !r.ok && r.errno.as_deref() == Some("ECONNREFUSED"),
        "expected ECONNREFUSED: {}",
        r.raw
    );
    println!(
        "tcp 10.96.0.20:80     -> {} after {} µs (Service without endpoints: refused at once)",
        r.errno.as_deref().unwrap_or("?"),
        r.micros
    );
    let loop_summary = probe.loop_tcp("10.96.0.10:80".parse()?, 1000)?;
    println!(
        "\n1000 connections to 10.96.0.10:80: {} failed, spread {:?}",
        loop_summary.fail, loop_summary.backends
    );
    let health = topo.sh(node.netns(), "curl -s http://127.0.0.1:10256/healthz")?;
    println!("healthz: {health}");
    println!(
        "\nkubectl reaches capstan-server from the node's namespace with:\n  KUBECONFIG={} nsenter --net=/run/netns/{} kubectl get svc -A",
        kubeconfig.display(),
        node.netns()
    );
    println!("\nDemo done; tearing the namespaces down.");
    drop(server);
    Ok(())
}
