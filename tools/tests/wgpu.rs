//! Collectives on wgpu buffers, for real (lavapipe in CI), through `oxrun`
//! with 2 and 4 processes: every slice goes device → host → wire → host →
//! device and is reduced by the WGSL kernels.
//!
//! Needs an adapter. CI sets `OXCCL_REQUIRE_WGPU=1`, which turns a missing
//! adapter into a failure; elsewhere the test says why it did not run.

#![cfg(feature = "wgpu")]
#![allow(clippy::unwrap_used)]

use std::process::Command;

const OXRUN: &str = env!("CARGO_BIN_EXE_oxrun");
const CHECK: &str = env!("CARGO_BIN_EXE_oxccl-check");

fn adapter_present() -> bool {
    let adapters = oxccl::kernels::wgpu::enumerate_adapters();
    if adapters.is_empty() {
        let required = std::env::var("OXCCL_REQUIRE_WGPU").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "OXCCL_REQUIRE_WGPU=1 but no wgpu adapter was found (install mesa-vulkan-drivers)"
        );
        eprintln!(
            "NOT RUN: no wgpu adapter on this machine (install mesa-vulkan-drivers for lavapipe)"
        );
        return false;
    }
    eprintln!("wgpu adapters: {adapters:?}");
    true
}

#[test]
fn collectives_on_wgpu_buffers_with_2_and_4_processes() {
    if !adapter_present() {
        return;
    }
    for n in [2, 4] {
        for args in [
            &["-c", "all", "-b", "300K", "-i", "2", "-w", "0"][..],
            &[
                "-c",
                "all",
                "-b",
                "5001",
                "-d",
                "bf16",
                "-o",
                "max",
                "-r",
                "1",
                "-i",
                "1",
                "-w",
                "0",
                "--in-place",
            ][..],
            &[
                "-c",
                "all_reduce",
                "-b",
                "4099",
                "-d",
                "u8",
                "-o",
                "sum",
                "-i",
                "1",
                "-w",
                "0",
            ][..],
        ] {
            let out = Command::new(OXRUN)
                .args([
                    "-n",
                    &n.to_string(),
                    "--timeout",
                    "300",
                    "--",
                    CHECK,
                    "--device",
                    "wgpu",
                ])
                .args(args)
                .env("OXCCL_SLICE_BYTES", "64K")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{n} processes {args:?}:\n{stdout}\n{stderr}"
            );
            let ok = stdout
                .lines()
                .filter(|l| l.starts_with("[0] ") && l.ends_with("result OK"))
                .count();
            let want = if args[1] == "all" { 6 } else { 1 };
            assert_eq!(ok, want, "{n} processes {args:?}:\n{stdout}");
        }
    }
}

/// Alltoall, gather, scatter and a ring of sends and receives between wgpu
/// buffers: blocks go device → host → wire → host → device.
#[test]
fn exchanges_on_wgpu_buffers_with_2_and_4_processes() {
    if !adapter_present() {
        return;
    }
    for n in [2, 4] {
        for c in ["all_to_all", "gather", "scatter", "send_recv"] {
            let out = Command::new(OXRUN)
                .args(["-n", &n.to_string(), "--timeout", "300", "--", CHECK])
                .args(["--device", "wgpu", "-c", c, "-b", "200K", "-d", "f16"])
                .args(["-r", "1", "-i", "2", "-w", "0"])
                .env("OXCCL_SLICE_BYTES", "16K")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{n} processes {c}:\n{stdout}\n{stderr}"
            );
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with(&format!("[0] {c}")) && l.ends_with("result OK")),
                "{n} processes {c}:\n{stdout}"
            );
        }
    }
}
