/// Every heap block is zeroed as it is freed: values pass through buffers
/// of h2, tonic and prost that the broker does not own (see
/// [`keyhole::sys::ZeroOnFree`]).
#[global_allocator]
static ALLOC: keyhole::sys::ZeroOnFree = keyhole::sys::ZeroOnFree;

fn main() -> std::process::ExitCode {
    keyhole::cli::main()
}
