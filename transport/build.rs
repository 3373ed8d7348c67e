//! With feature `ucx`: finds the system's libucx with pkg-config, checks its
//! version, and generates bindings to `ucp.h` with bindgen. Without the
//! feature it does nothing.

fn main() {
    #[cfg(feature = "ucx")]
    ucx::build();
}

#[cfg(feature = "ucx")]
mod ucx {
    use std::path::PathBuf;

    /// The oldest UCX whose API the link uses (`ucp_tag_send_nbx`,
    /// `ucp_request_param_t`'s memory type, `ucp_worker_get_efd`).
    const MIN: (u32, u32) = (1, 13);

    pub fn build() {
        println!("cargo:rerun-if-env-changed=UCX_DIR");
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
        let lib = match pkg_config::Config::new()
            .atleast_version(&format!("{}.{}", MIN.0, MIN.1))
            .probe("ucx")
        {
            Ok(lib) => lib,
            Err(e) => panic!(
                "feature `ucx` needs UCX {}.{} or later with its headers \
                 (Debian/Ubuntu: apt-get install libucx-dev; or set PKG_CONFIG_PATH \
                 to a UCX installation's lib/pkgconfig): {e}",
                MIN.0, MIN.1
            ),
        };
        let mut b = bindgen::Builder::default()
            .header_contents(
                "oxccl_ucx.h",
                "#include <ucp/api/ucp.h>\n#include <uct/api/uct.h>\n",
            )
            .allowlist_function("ucp_.*")
            .allowlist_function("ucs_status_string")
            .allowlist_function("uct_query_components")
            .allowlist_function("uct_release_component_list")
            .allowlist_function("uct_component_query")
            .allowlist_type("ucp_.*")
            .allowlist_type("ucs_status_t")
            .allowlist_type("uct_component_attr.*")
            .allowlist_var("UC[PST]_.*")
            .default_enum_style(bindgen::EnumVariation::Consts)
            .prepend_enum_name(false)
            .derive_default(true)
            .layout_tests(false)
            .generate_comments(false);
        for p in &lib.include_paths {
            b = b.clang_arg(format!("-I{}", p.display()));
        }
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        b.generate()
            .unwrap_or_else(|e| {
                panic!("generating UCX bindings (bindgen needs libclang: apt-get install libclang-dev): {e}")
            })
            .write_to_file(out.join("ucx_sys.rs"))
            .expect("writing the UCX bindings");
        println!("cargo:rustc-env=OXCCL_UCX_VERSION={}", lib.version);
    }
}
