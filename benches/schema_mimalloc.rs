//! `--bench schema` with the allocator the broker runs with (mimalloc, as `src/main.rs` sets it):
//! most of a small payload's parse is allocation, so the allocator moves the figures.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "schema.rs"]
mod schema;

fn main() {
    schema::main()
}
