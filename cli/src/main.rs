//! The `kiln` binary: everything happens in `kiln_cli::run`.

fn main() {
    // An ordinary user with subordinate ids: the rest in a user namespace where they apply.
    if let Ok(exe) = std::env::current_exe() {
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        if let Some(mut c) = kiln::userns::reexec(&exe, &args) {
            use std::os::unix::process::CommandExt;
            let e = c.exec();
            eprintln!(
                "kiln: could not enter a user namespace ({e}); going on without subordinate ids"
            );
        }
    }
    let code = kiln_cli::run(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
