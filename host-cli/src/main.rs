//! seedctl entry point: parse, run, print.

use std::io::Write;
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
                out(&serde_json::json!({ "error": message.join(" ") }).to_string());
            }
            e.exit()
        }
    };
    match cli.run() {
        Ok(report) => {
            if cli.json {
                out(&report.json.to_string());
            } else if !report.human.is_empty() {
                out(&report.human);
            }
            ExitCode::from(report.exit)
        }
        Err(e) => {
            if cli.json {
                out(&serde_json::json!({ "error": format!("{e:#}") }).to_string());
            }
            eprintln!("seedctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints one report. A reader that went away (`seedctl status web1 | head -1`) is not
/// an error: the command has done its work, and its exit status still tells.
fn out(text: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}
