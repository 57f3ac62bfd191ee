//! What a command hands back to `main`: text for a terminal and the same facts as JSON
//! for `--json`.

use serde_json::Value;

#[derive(Debug)]
pub struct Report {
    pub human: String,
    pub json: Value,
    /// Process exit status; non-zero for a result that is not an error but must not read
    /// as success to a script (`status` finding the guest out of sync).
    pub exit: u8,
}

impl Report {
    pub fn new(human: impl Into<String>, json: Value) -> Report {
        Report {
            human: human.into(),
            json,
            exit: 0,
        }
    }

    pub fn with_exit(mut self, exit: u8) -> Report {
        self.exit = exit;
        self
    }
}
