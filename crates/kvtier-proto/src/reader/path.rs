//! [`Path`]: where in a payload a value sits, for error messages (`key.token_ids[3]`).

use std::fmt;

/// A field path for error messages, built on the stack as decoding descends.
///
/// Renders as `root.field[3].other`; dynamic map keys render like fields.
#[derive(Debug, Clone, Copy)]
pub enum Path<'p> {
    /// A top-level frame, named after its payload parameter (e.g. `key`, `instance_id`).
    Root(&'static str),
    /// A named struct field below `parent`.
    Field(&'p Path<'p>, &'static str),
    /// A map key taken from the input below `parent`.
    Key(&'p Path<'p>, &'p str),
    /// An array element below `parent`.
    Index(&'p Path<'p>, usize),
}

impl<'p> Path<'p> {
    /// The path of struct field `name` below `self`.
    #[must_use]
    pub fn field(&'p self, name: &'static str) -> Path<'p> {
        Path::Field(self, name)
    }

    /// The path of the map entry keyed `key` below `self`.
    #[must_use]
    pub fn key(&'p self, key: &'p str) -> Path<'p> {
        Path::Key(self, key)
    }

    /// The path of array element `index` below `self`.
    #[must_use]
    pub fn index(&'p self, index: usize) -> Path<'p> {
        Path::Index(self, index)
    }
}

/// Longest dynamic key rendered in a path; longer keys are cut (keys come from clients).
const MAX_KEY_IN_PATH: usize = 48;

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root(name) => f.write_str(name),
            Path::Field(parent, name) => write!(f, "{parent}.{name}"),
            Path::Key(parent, key) => {
                write!(f, "{parent}.")?;
                for c in key.chars().take(MAX_KEY_IN_PATH) {
                    if c.is_control() {
                        write!(f, "{}", c.escape_default())?;
                    } else {
                        write!(f, "{c}")?;
                    }
                }
                Ok(())
            }
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}
