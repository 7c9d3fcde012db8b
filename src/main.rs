//! The `fwagent` binary: parses arguments, sets up logging, and hands over to
//! the library. Exit codes (spec/INTERFACE.md): 0 success; 1 a rejected or
//! failed request; 2 usage error; 3 the store or the agent could not be reached.

use clap::Parser;
use fwagent::cli::{Cli, Commands};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    fwagent::logging::init(cli.verbose);
    match cli.command {
        Commands::Run(args) => fwagent::cli::run::main(args),
        Commands::Check(args) => fwagent::cli::check::main(args),
        Commands::Status(args) => fwagent::cli::inspect::status(args),
        Commands::History(args) => fwagent::cli::inspect::history(args),
        Commands::Show(args) => fwagent::cli::inspect::show(args),
        Commands::Watch(args) => fwagent::cli::inspect::watch(args),
        Commands::Submit(args) => fwagent::cli::inspect::submit(args),
        Commands::Cancel(args) => fwagent::cli::inspect::cancel(args),
        Commands::Sign(args) => fwagent::cli::sign::sign(args),
        Commands::Verify(args) => fwagent::cli::sign::verify(args),
        Commands::Completions(args) => fwagent::cli::completions(args),
    }
}
