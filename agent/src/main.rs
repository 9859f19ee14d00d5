//! The `kiln-agent` binary: everything happens in `kiln_agent::cli::run`.

fn main() {
    let code = kiln_agent::cli::run(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
