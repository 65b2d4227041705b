//! Fuzz target `config_loader`: the server configuration from a config file's TOML text
//! (`coordinator::config::from_toml_str`, which `load` runs on the file it reads), with no
//! environment and no `--set`.
//!
//! Asserts that loading never panics, and that an accepted config survives a round trip: its
//! TOML serialization loads back to the same config.
#![no_main]

use std::path::Path;

use coordinator::config::{from_toml_str, Config};
use libfuzzer_sys::fuzz_target;

fn load(text: &str) -> Result<Config, coordinator::config::ConfigErrors> {
    from_toml_str(Path::new("ampora.toml"), text, Vec::new(), &[])
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = load(text) else {
        return;
    };
    let again = toml_text(&config);
    assert_eq!(load(&again).as_ref(), Ok(&config), "round trip of\n{again}");
});

fn toml_text(config: &Config) -> String {
    // The same serde mapping the loader takes its defaults through.
    toml::to_string(config).expect("a config serializes")
}
