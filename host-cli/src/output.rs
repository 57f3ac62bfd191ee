//! What a command hands back to `main`: text for a terminal and the same facts as JSON
//! for `--json`.

use serde_json::Value;

#[derive(Debug)]
pub struct Report {
    pub human: String,
    pub json: Value,
}

impl Report {
    pub fn new(human: impl Into<String>, json: Value) -> Report {
        Report {
            human: human.into(),
            json,
        }
    }
}
