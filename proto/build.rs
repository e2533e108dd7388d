//! Generates the Rust types and gRPC stubs from `proto/`, with a vendored protoc so no system protoc is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("govexchange_descriptor.bin"))
        .compile_protos(
            &[
                "proto/govexchange/v1/catalog.proto",
                "proto/govexchange/v1/directory.proto",
                "proto/govexchange/v1/records.proto",
                "proto/govexchange/v1/node.proto",
                "proto/govexchange/v1/bench.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
