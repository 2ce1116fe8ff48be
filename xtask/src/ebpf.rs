//! Building the eBPF object from a fresh machine, reproducibly.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, run};

/// Where the committed object lives (embedded by capstan-proxy).
pub const OBJECT: &str = "proxy/bpf/capstan-proxy.bpf.o";
/// The bpf-linker release this build is verified with.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn nightly_sysroot() -> Result<PathBuf> {
    Ok(PathBuf::from(output(
        Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]),
    )?))
}

fn home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
}

/// rust-src for the nightly, and bpf-linker linked against the nightly's own LLVM.
pub fn ensure_toolchain() -> Result<()> {
    let sysroot =
        nightly_sysroot().context("the nightly toolchain is needed for the eBPF build")?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("xtask: installing rust-src for the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false);
    if linker_ok {
        return Ok(());
    }
    // bpf-linker loads libLLVM.so from LLVM_PREFIX/lib at run time: point it at the
    // nightly's own library (the shared object, not the linker script next to it).
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .context("the nightly toolchain has no libLLVM.so.*")?;
    let name = lib
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let major = name
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let prefix = home().join(".local/share/capstan/llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} against LLVM {major} ({name})");
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))
}

/// Builds the object with build paths remapped, so that every clone produces the same
/// bytes; writes it to [`OBJECT`] or, with `check`, compares it with the committed one.
pub fn build(root: &Path, check: bool) -> Result<()> {
    let target_dir = root.join("target/ebpf");
    let sysroot = nightly_sysroot()?;
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| home().join(".cargo"));
    let flags = [
        format!("--remap-path-prefix={}=/capstan", root.display()),
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
        format!("--remap-path-prefix={}=/rust", sysroot.display()),
    ]
    .join("\x1f");
    run(Command::new("rustup")
        .current_dir(root)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "-p",
            "capstan-proxy-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO"))?;
    let built = target_dir.join("bpfel-unknown-none/release/capstan-proxy-ebpf");
    let fresh = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    for path in [root.display().to_string(), cargo_home.display().to_string()] {
        if fresh.windows(path.len()).any(|w| w == path.as_bytes()) {
            bail!("the eBPF object contains the build path {path}: it would not be reproducible");
        }
    }
    let committed = root.join(OBJECT);
    if check {
        let old = std::fs::read(&committed)
            .with_context(|| format!("reading {}", committed.display()))?;
        if old != fresh {
            bail!(
                "{OBJECT} is stale: it differs from a fresh build of proxy-ebpf/. Run `cargo xtask build-ebpf` and commit it."
            );
        }
        eprintln!("xtask: {OBJECT} matches the source ({} bytes)", fresh.len());
    } else {
        std::fs::write(&committed, &fresh)?;
        eprintln!("xtask: wrote {OBJECT} ({} bytes)", fresh.len());
    }
    Ok(())
}
