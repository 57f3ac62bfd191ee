//! seedctl entry point: parse, run, print.

use std::process::ExitCode;

use clap::Parser;
use seedctl::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.run() {
        Ok(report) => {
            if cli.json {
                println!("{}", report.json);
            } else if !report.human.is_empty() {
                println!("{}", report.human);
            }
            ExitCode::from(report.exit)
        }
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            }
            eprintln!("seedctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
