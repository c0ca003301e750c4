//! Value parsers and range checks of `kvtier serve` flags: clap's parsers for `--rpc-allow`,
//! on/off switches and the auth token, and the checks `ServeArgs::into_config` applies to
//! seconds and fractions. Each error names the flag and the value it got.

use std::time::Duration;

use anyhow::{Context, bail};
use kvtier_server::http::AuthToken;

/// `--rpc-allow` for clap: one value, comma-separated networks.
pub(super) fn parse_allow(
    s: &str,
) -> Result<Vec<kvtier_server::transport::access::Cidr>, kvtier_server::transport::access::CidrError>
{
    kvtier_server::transport::access::parse_allow_list(s)
}

/// `on`/`off` for clap (also true/false, yes/no, 1/0).
pub(super) fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

/// Token validation for clap (its `Debug` is redacted, so `ServeArgs` is safe to print).
pub(super) fn parse_token(s: &str) -> Result<AuthToken, kvtier_server::http::HttpConfigError> {
    AuthToken::new(s)
}

pub(super) fn seconds(flag: &str, v: f64, allow_zero: bool) -> anyhow::Result<Duration> {
    if !v.is_finite() || v < 0.0 || (!allow_zero && v == 0.0) {
        bail!(
            "--{flag} must be a {} number of seconds, got {v}",
            if allow_zero {
                "non-negative"
            } else {
                "positive"
            }
        );
    }
    Duration::try_from_secs_f64(v).with_context(|| format!("--{flag}: {v} seconds is out of range"))
}

pub(super) fn fraction(flag: &str, v: f64) -> anyhow::Result<f64> {
    if !(v > 0.0 && v <= 1.0) {
        bail!("--{flag} must be in (0, 1], got {v}");
    }
    Ok(v)
}

pub(super) fn fraction_or_zero(flag: &str, v: f64) -> anyhow::Result<f64> {
    if !(0.0..=1.0).contains(&v) {
        bail!("--{flag} must be in [0, 1], got {v}");
    }
    Ok(v)
}
