fn main() {
    // sqlx::migrate! embeds the global migrations at compile time
    println!("cargo:rerun-if-changed=../../migrations/global");
}
