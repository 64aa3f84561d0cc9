//! `sqlx::migrate!` embeds `migrations/` at compile time, and cargo does not know that:
//! without this, a new migration file is missing from binaries built before it was added.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
