//! Gives liboxccl.so its soname on Linux, so that installed programs link
//! against `liboxccl.so.0` (the ABI version) rather than the bare name.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,liboxccl.so.0");
    }
}
