//! Compiles the OpAMP schema and Ampora's bus envelopes with protox (pure Rust), so no system
//! `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opamp = ["opamp/v1/opamp.proto", "opamp/v1/anyvalue.proto"];
    let bus = ["bus.proto"];
    for f in opamp.iter().chain(&bus) {
        println!("cargo:rerun-if-changed={f}");
    }
    prost_build::Config::new()
        // Deterministic encoding: config hashes and offers are computed over these maps.
        .btree_map(["."])
        .compile_fds(protox::compile(opamp, ["."])?)?;
    // A second pass because the OpAMP package lives at `crate::v1`, not at the module path its
    // package name implies: the bus envelopes (`ampora.bus.v1`) reach the OpAMP messages they
    // embed through this extern path, and prost skips generating extern packages.
    prost_build::Config::new()
        .btree_map(["."])
        .extern_path(".opamp.proto.v1", "crate::v1")
        .compile_fds(protox::compile(bus, ["."])?)?;
    Ok(())
}
