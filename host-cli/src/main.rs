//! seedctl entry point: parse, run, print.

use std::process::ExitCode;

use clap::Parser;
use seedctl::cli::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout as usual; a usage error is JSON too under --json.
            if e.use_stderr() && std::env::args().skip(1).any(|a| a == "--json") {
                let text = e.render().to_string();
                let message = text.split("\n\nUsage").next().unwrap_or_default();
                let message = message.strip_prefix("error: ").unwrap_or(message);
                let message: Vec<&str> = message.split_whitespace().collect();
                println!("{}", serde_json::json!({ "error": message.join(" ") }));
            }
            e.exit()
        }
    };
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
