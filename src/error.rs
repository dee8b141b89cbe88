//! The launcher's one error type. Each variant is a documented exit code, mapped in `main`:
//! 2 usage, 127 command not found, 126 command not executable, 1 everything else (a bind that
//! fails, an inherited socket that is not one, workers that never start, a broken setup).
//! Messages name the object and the cause: `failed to bind 127.0.0.1:8080: address already in
//! use (...)`.

use std::fmt;

#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// A flag's value is wrong: the flag, the value given, and what was expected.
    Usage { flag: &'static str, value: String, expected: String },
    /// The command cannot be run: exit code 127 (not found) or 126 (found, not executable).
    Command { command: String, cause: String, code: u8 },
    /// Anything else that stops the launcher (exit code 1).
    Failed(String),
}

impl Error {
    pub fn usage(flag: &'static str, value: &str, expected: impl Into<String>) -> Error {
        Error::Usage { flag, value: value.to_string(), expected: expected.into() }
    }

    /// The process exit code this error stands for.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage { .. } => 2,
            Error::Command { code, .. } => *code,
            Error::Failed(_) => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage { flag, value, expected } => write!(f, "invalid {flag} '{value}': {expected}"),
            Error::Command { command, cause, .. } => write!(f, "cannot run '{command}': {cause}"),
            Error::Failed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_exit_code_and_names_its_object() {
        let u = Error::usage("--workers", "0", "must be at least 1");
        assert_eq!((u.exit_code(), u.to_string().as_str()), (2, "invalid --workers '0': must be at least 1"));
        let c = Error::Command { command: "x".into(), cause: "command not found in PATH".into(), code: 127 };
        assert_eq!((c.exit_code(), c.to_string().as_str()), (127, "cannot run 'x': command not found in PATH"));
        assert_eq!(Error::Failed("boom".into()).exit_code(), 1);
    }
}
