//! `keel`: thin entry point over the keel-node library.

fn main() -> std::process::ExitCode {
    keel_node::main()
}
