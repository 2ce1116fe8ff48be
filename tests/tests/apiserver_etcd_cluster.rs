//! capstan-server on a three-member etcd cluster (Debian's etcd-server) that loses a
//! member under write load: writes go on through the other members, and no write the
//! server acknowledged is lost.
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use capstan_tests::{Proc, Topology, bin_path, require_root, wait_until};

const MEMBERS: [(&str, u16, u16); 3] = [
    ("m0", 2379, 2380),
    ("m1", 12379, 12380),
    ("m2", 22379, 22380),
];

fn client_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

#[test]
fn writes_survive_losing_an_etcd_member() -> Result<()> {
    require_root();
    let topo = Topology::new()?;
    let node = topo.node("n1")?;
    let cluster: Vec<String> = MEMBERS
        .iter()
        .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
        .collect();
    let mut members: Vec<Option<Proc>> = Vec::new();
    for (name, client, peer) in MEMBERS {
        let mut c = Command::new("etcd");
        c.args(["--name", name])
            .arg("--data-dir")
            .arg(topo.scratch_dir().join(format!("etcd-{name}")))
            .args(["--listen-client-urls", &client_url(client)])
            .args(["--advertise-client-urls", &client_url(client)])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"]);
        members.push(Some(topo.spawn(node.netns(), false, &mut c)?));
    }
    for m in members.iter().flatten() {
        wait_until(Duration::from_secs(60), || {
            ensure!(m.is_running(), "etcd exited:\n{}", m.log());
            Ok(m.stderr().contains("ready to serve client requests"))
        })
        .with_context(|| m.log())?;
    }
    let data: PathBuf = topo.scratch_dir().join("server");
    let urls: Vec<String> = MEMBERS.iter().map(|(_, c, _)| client_url(*c)).collect();
    let mut c = Command::new(bin_path("capstan-server")?);
    c.arg("--data-dir")
        .arg(&data)
        .args(["--bind-address", "127.0.0.1", "--secure-port", "6443"])
        .args(["--etcd-servers", &urls.join(",")]);
    let server = topo.spawn(node.netns(), false, &mut c)?;
    wait_until(Duration::from_secs(30), || {
        ensure!(
            server.is_running(),
            "capstan-server exited:\n{}",
            server.log()
        );
        Ok(server.stderr().contains("capstan-server serving"))
    })
    .with_context(|| server.log())?;
    let kubeconfig = data.join("admin.kubeconfig");
    let kubectl = |args: &[&str]| -> Result<std::process::Output> {
        let mut c = Command::new("kubectl");
        c.env("KUBECONFIG", &kubeconfig).args(args);
        topo.run(node.netns(), &mut c)
    };

    // A writer creating ConfigMaps one after another, recording which were acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = std::thread::scope(|s| -> Result<(Vec<String>, usize)> {
        let writer = s.spawn(|| -> Result<(Vec<String>, usize)> {
            let (mut acked, mut failed) = (Vec::new(), 0);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) || i < 40 {
                let name = format!("cm-{i}");
                let file = topo.scratch_dir().join(format!("{name}.yaml"));
                std::fs::write(
                    &file,
                    format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata: {{i: \"{i}\"}}\n"),
                )?;
                let out = kubectl(&["create", "-f", &file.display().to_string(), "-o", "name"])?;
                if out.status.success() {
                    acked.push(name);
                } else {
                    failed += 1;
                }
                i += 1;
                if i > 200 {
                    break;
                }
            }
            Ok((acked, failed))
        });
        // Kill the member the server talks to first, in the middle of the writes.
        std::thread::sleep(Duration::from_secs(2));
        if let Some(m) = members[0].take() {
            m.signal(nix::sys::signal::Signal::SIGKILL)?;
            m.wait_timeout(Duration::from_secs(10))?;
        }
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))?
    })?;
    let (acked, failed) = acked;
    ensure!(
        acked.len() >= 30,
        "only {} writes succeeded ({failed} failed)\n{}",
        acked.len(),
        server.log()
    );
    // Every acknowledged write is there, read through the surviving members.
    let out = kubectl(&["get", "configmaps", "-o", "name"])?;
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    for name in &acked {
        ensure!(
            listed.lines().any(|l| l == format!("configmap/{name}")),
            "acknowledged {name} is missing after losing a member\n{listed}"
        );
    }
    // And writes still work.
    let file = topo.scratch_dir().join("after.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: after}\n",
    )?;
    let out = kubectl(&["create", "-f", &file.display().to_string()])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server);
    drop(members);
    Ok(())
}
