//! `keel`: thin entry point over the keel-cli library.

fn main() -> std::process::ExitCode {
    keel_cli::main()
}
