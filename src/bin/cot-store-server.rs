//! `cot-store-server STORE-DIR`: keeps one trace store open for every cot of a project (see
//! `cot::server`). Started on demand by `cot`, from the directory of its own executable; a
//! binary of its own so that `cot` itself does not load RocksDB at every start.

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: cot-store-server STORE-DIR (started by cot on demand)");
        return std::process::ExitCode::from(2);
    };
    match cot::server::serve(std::path::Path::new(&dir)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cot-store-server: {}", cot::cli::one_line(&error));
            std::process::ExitCode::from(125)
        }
    }
}
