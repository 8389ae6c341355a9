fn main() -> std::process::ExitCode {
    keyhole::cli::main()
}
