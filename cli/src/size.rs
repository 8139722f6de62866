//! Byte sizes as operators write them: `10G`, `512M`, `4096`, `1.5T`.

/// Parses a size with an optional binary suffix: K, M, G, T, P (also KiB,
/// KB, ... all meaning powers of 1024), or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?}; use a number with K, M, G or T (e.g. 10G)"
            ))
        }
    };
    if number.is_empty() {
        return Err(format!(
            "invalid size {text:?}: no number; use e.g. 10G or 4096"
        ));
    }
    let bytes = if number.contains('.') {
        let value: f64 = number
            .parse()
            .map_err(|_| format!("invalid size {text:?}: {number:?} is not a number"))?;
        let bytes = value * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("invalid size {text:?}: too large"));
        }
        if bytes.fract() != 0.0 {
            return Err(format!(
                "invalid size {text:?}: not a whole number of bytes"
            ));
        }
        bytes as u64
    } else {
        let value: u64 = number
            .parse()
            .map_err(|_| format!("invalid size {text:?}: {number:?} is not a number"))?;
        value
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("invalid size {text:?}: too large"))?
    };
    Ok(bytes)
}

/// Formats bytes for people: `10 GiB`, `1.5 MiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let cases = [
            ("4096", Ok(4096)),
            ("10G", Ok(10 << 30)),
            ("10g", Ok(10 << 30)),
            ("512M", Ok(512 << 20)),
            ("4KiB", Ok(4096)),
            ("1.5T", Ok(3 << 39)),
            ("2 G", Ok(2 << 30)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text), expected, "{text}");
        }
        for bad in ["", "G", "10X", "ten", "99999999999P", "1.0000001K"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(1536 << 10), "1.5 MiB");
        assert_eq!(format_size(100), "100 B");
    }
}
