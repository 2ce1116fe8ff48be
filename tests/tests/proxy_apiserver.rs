//! capstan-proxy through capstan-server: kubectl applies Services and EndpointSlices to a
//! real API server, the agent watches it with kube-rs, and the ClusterIP answers; edits,
//! deletions and an API server crash (kill -9) and restart reach the data path.
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use capstan_tests::proxy::*;
use capstan_tests::{Proc, bin_path};
use serde_json::Value;

const PORT: u16 = 6443;

/// capstan-server inside the node's namespace, and kubectl pointed at it.
struct Server {
    data: PathBuf,
    proc: Option<Proc>,
}

impl Server {
    fn start(fx: &ProxyFixture, data: PathBuf) -> Result<Server> {
        let mut s = Server { data, proc: None };
        s.restart(fx)?;
        Ok(s)
    }

    fn restart(&mut self, fx: &ProxyFixture) -> Result<()> {
        let mut c = Command::new(bin_path("capstan-server")?);
        c.arg("--data-dir")
            .arg(&self.data)
            .args([
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                &PORT.to_string(),
            ])
            .args(["--service-cluster-ip-range", "10.96.0.0/16,fd00:96::/108"]);
        let p = fx.topo.spawn(fx.node.netns(), false, &mut c)?;
        capstan_tests::wait_until(Duration::from_secs(30), || {
            ensure!(p.is_running(), "capstan-server exited:\n{}", p.log());
            Ok(p.stderr().contains("capstan-server serving"))
        })
        .with_context(|| p.log())?;
        self.proc = Some(p);
        Ok(())
    }

    fn kill9(&mut self) -> Result<()> {
        if let Some(p) = self.proc.take() {
            p.signal(nix::sys::signal::Signal::SIGKILL)?;
            p.wait_timeout(Duration::from_secs(10))?;
        }
        Ok(())
    }

    fn kubeconfig(&self) -> PathBuf {
        self.data.join("admin.kubeconfig")
    }

    /// Runs kubectl (default flags) in the node's namespace; returns stdout.
    fn kubectl(&self, fx: &ProxyFixture, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut c = Command::new("kubectl");
        c.env("KUBECONFIG", self.kubeconfig()).args(args);
        let out = match stdin {
            Some(text) => {
                let file = fx.topo.scratch_dir().join("kubectl-input.yaml");
                std::fs::write(&file, text)?;
                c.arg("-f").arg(&file);
                fx.topo.run(fx.node.netns(), &mut c)?
            }
            None => fx.topo.run(fx.node.netns(), &mut c)?,
        };
        ensure!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.proc.as_ref().map(|p| p.log()).unwrap_or_default()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, fx: &ProxyFixture, docs: &[Value]) -> Result<String> {
        let text: String = docs
            .iter()
            .map(|d| format!("---\n{}\n", serde_json::to_string_pretty(d).expect("json")))
            .collect();
        self.kubectl(fx, &["apply"], Some(&text))
    }
}

fn fixture() -> Result<(ProxyFixture, Server)> {
    let mut fx = ProxyFixture::with(FixtureOptions {
        backends: 2,
        start_agent: false,
        ..Default::default()
    })?;
    let server = Server::start(&fx, fx.topo.scratch_dir().join("server"))?;
    // The agent runs with least privilege: the server's proxy identity
    // (system:kube-proxy, bound to system:node-proxier).
    let kubeconfig = server.data.join("proxy.kubeconfig").display().to_string();
    fx.start_agent_with(&["--kubeconfig".into(), kubeconfig])?;
    Ok((fx, server))
}

#[test]
fn kubectl_apply_edit_and_delete_reach_the_data_path() -> Result<()> {
    let (fx, server) = fixture()?;
    let vip = sa(ip("10.96.7.10"), 80);
    let vip6 = sa(ip("fd00:96::7:10"), 80);
    let out = server.apply(
        &fx,
        &fx.web_service("web", "10.96.7.10", "fd00:96::7:10", &[0]),
    )?;
    ensure!(out.contains("service/web created"), "{out}");
    fx.wait_backends("tcp", vip, &["b0"])?;
    fx.wait_backends("tcp", vip6, &["b0"])?;
    fx.wait_backends("udp", sa(ip("10.96.7.10"), 53), &["b0"])?;
    fx.agent_log()
        .contains("initial lists received")
        .then_some(())
        .context("the agent listed")?;

    // Edit the endpoints with kubectl apply: both backends, then only b1.
    server.apply(
        &fx,
        &fx.slices("web", &[("http", "TCP"), ("dns", "UDP")], &[0, 1]),
    )?;
    fx.expect_spread("tcp", vip, 40, &["b0", "b1"], true)?;
    server.apply(
        &fx,
        &fx.slices("web", &[("http", "TCP"), ("dns", "UDP")], &[1]),
    )?;
    fx.wait_backends("tcp", vip, &["b1"])?;

    // A kubectl patch of the Service's port reaches the data path.
    server.kubectl(
        &fx,
        &[
            "patch",
            "service",
            "web",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/ports/0/port","value":8081}]"#,
        ],
        None,
    )?;
    fx.wait_backends("tcp", sa(ip("10.96.7.10"), 8081), &["b1"])?;
    fx.wait_untranslated(vip)?;

    // The endpoints go: connections are refused at once; the Service goes: untranslated.
    server.kubectl(&fx, &["delete", "endpointslice", "web-v4", "web-v6"], None)?;
    fx.wait_refused("tcp", sa(ip("10.96.7.10"), 8081))?;
    server.kubectl(&fx, &["delete", "service", "web"], None)?;
    fx.wait_untranslated(sa(ip("10.96.7.10"), 8081))?;
    fx.ensure_agent_alive()
}

#[test]
fn the_agent_follows_an_api_server_that_crashes_and_restarts() -> Result<()> {
    let (fx, mut server) = fixture()?;
    let vip = sa(ip("10.96.7.20"), 80);
    server.apply(
        &fx,
        &fx.web_service("crash", "10.96.7.20", "fd00:96::7:20", &[0]),
    )?;
    fx.wait_backends("tcp", vip, &["b0"])?;
    // kill -9: the data path keeps its state while the server is gone.
    server.kill9()?;
    fx.expect_spread("tcp", vip, 20, &["b0"], true)?;
    server.restart(&fx)?;
    // Everything acknowledged before the crash is still there.
    let svc = server.kubectl(
        &fx,
        &[
            "get",
            "service",
            "crash",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    )?;
    ensure!(
        svc == "10.96.7.20",
        "after the restart the Service reads {svc:?}"
    );
    // The agent's watches resume (or relist) and see changes made after the restart.
    server.apply(
        &fx,
        &fx.slices("crash", &[("http", "TCP"), ("dns", "UDP")], &[1]),
    )?;
    fx.wait_backends("tcp", vip, &["b1"])?;
    fx.ensure_agent_alive()
}
