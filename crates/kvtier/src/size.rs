//! Byte sizes on the command line: `4096`, `512K`, `64MiB`, `1.5GB`, `2TiB`.
//!
//! Units are binary (1024-based) whether or not they carry the `i`: `1GB` = `1GiB` =
//! 2^30 bytes, the unit of `--l1-size-gb`. Case-insensitive; a fraction is allowed before a
//! unit; a bare number is bytes.

/// A size string that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "bad size {input:?}: {why} (examples: 4096, 512MiB, 1.5GB, 2TiB; units are binary: 1GB = 2^30 bytes)"
)]
pub struct SizeError {
    input: String,
    why: &'static str,
}

/// Parses one size.
///
/// # Errors
/// [`SizeError`] quoting the input.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = |why| SizeError {
        input: s.to_owned(),
        why,
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(err("no number"));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(err(
                "unknown unit (B, K, M, G or T, optionally with B or iB)",
            ));
        }
    };
    let value: f64 = num.parse().map_err(|_| err("not a number"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < 2f64.powi(63)) {
        return Err(err("must be between 1 byte and 8 EiB"));
    }
    Ok(bytes as u64)
}

/// A comma-separated list of sizes (`1GB,2GB,4GB`).
///
/// # Errors
/// The first [`SizeError`].
pub fn parse_size_list(s: &str) -> Result<Vec<u64>, SizeError> {
    s.split(',').map(parse_size).collect()
}

/// A size for people: `1.50 GiB`, `512 MiB`, `4096 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("1GB").ok(), Some(1 << 30));
        assert_eq!(parse_size("1gib").ok(), Some(1 << 30));
        assert_eq!(parse_size("1.5G").ok(), Some(3 << 29));
        assert_eq!(parse_size(" 64 MiB ").ok(), Some(64 << 20));
        assert_eq!(
            parse_size_list("1GB,2GB").ok(),
            Some(vec![1 << 30, 2 << 30])
        );
        for bad in ["", "GB", "1XB", "-1GB", "0", "1..2G"] {
            let e = parse_size(bad).expect_err(bad).to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(format_size(3 << 29), "1.50 GiB");
        assert_eq!(format_size(512 << 20), "512 MiB");
    }
}
