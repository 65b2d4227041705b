//! Names the commit the binary was built from (`AMPORA_COMMIT`, shown in the console's footer)
//! when the build runs in a git checkout; otherwise the version stands alone.

fn main() {
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    println!("cargo:rerun-if-env-changed=AMPORA_COMMIT");
    let commit = std::env::var("AMPORA_COMMIT").ok().or_else(|| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    if let Some(c) = commit {
        println!("cargo:rustc-env=AMPORA_COMMIT={c}");
    }
}
