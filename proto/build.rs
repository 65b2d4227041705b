//! Compiles the OpAMP schema with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["opamp/v1/opamp.proto", "opamp/v1/anyvalue.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    prost_build::Config::new()
        // Deterministic encoding: config hashes and offers are computed over these maps.
        .btree_map(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
