//! Kubernetes resource quantities (`500m`, `1.5Gi`, `1e3`) as amounts, for comparing what
//! the API server stored with what the builders asked for, and requests with limits.

/// Whether two Kubernetes resource quantities denote the same amount (`"0.5"` and `"500m"`,
/// `"1.5Gi"` and `"1536Mi"`). Strings that do not parse are compared as written.
pub fn same_quantity(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (parse_quantity(a), parse_quantity(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * 16.0 * x.abs().max(y.abs()),
        _ => false,
    }
}

/// The amount a quantity string denotes: a signed decimal number, then an optional binary
/// suffix (`Ki` … `Ei`), decimal suffix (`n`, `u`, `m`, `k`, `M` … `E`) or exponent (`e3`).
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-')))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    if !number.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        exp => {
            let digits = exp.strip_prefix(['e', 'E'])?;
            10f64.powi(digits.parse::<i32>().ok()?)
        }
    };
    Some(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_every_suffix_form() {
        for (a, b) in [
            ("1", "1000m"),
            ("2k", "2000"),
            ("1Ki", "1024"),
            ("1E", "1e18"),
            ("100M", "1e8"),
            ("250u", "250000n"),
            ("+1", "1"),
        ] {
            assert!(same_quantity(a, b), "{a} = {b}");
        }
        for (a, b) in [("1Mi", "1M"), ("1", "x"), ("cpu", "gpu"), ("1m", "1M")] {
            assert!(!same_quantity(a, b), "{a} != {b}");
        }
    }
}
