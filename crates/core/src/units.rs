//! Byte sizes as users write them: `1GiB`, `512M`, `4096`.

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

/// Parses `123`, `4k`, `4KiB`, `1.5G`-style sizes (binary multiples; `KB`/`MB` are read as
/// KiB/MiB too, as `scli` and Docker users expect). Returns an error message on anything else.
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit_bytes = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => TIB,
        other => return Err(format!("invalid size {text:?}: unknown unit {other:?}")),
    };
    if number.is_empty() {
        return Err(format!("invalid size {text:?}: no number"));
    }
    let value: f64 = number.parse().map_err(|_| format!("invalid size {text:?}"))?;
    let bytes = value * unit_bytes as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("invalid size {text:?}: out of range"));
    }
    if bytes.fract() != 0.0 {
        return Err(format!("invalid size {text:?}: not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// Human-readable binary size, e.g. `1.0 GiB`.
pub fn format_size(bytes: u64) -> String {
    let units = [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];
    for (name, size) in units {
        if bytes >= size {
            return format!("{:.1} {name}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size_bytes("1GiB").unwrap(), GIB);
        assert_eq!(parse_size_bytes("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_size_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_size_bytes("1.5g").unwrap(), GIB + GIB / 2);
        assert!(parse_size_bytes("").is_err());
        assert!(parse_size_bytes("1X").is_err());
        assert!(parse_size_bytes("-1").is_err());
        assert!(parse_size_bytes("0.3").is_err());
        assert!(parse_size_bytes("99999999999999T").is_err());
    }
}
