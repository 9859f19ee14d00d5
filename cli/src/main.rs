//! The `kiln` binary: everything happens in `kiln_cli::run`.

fn main() {
    let code = kiln_cli::run(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
