//! Parsers for the command line's sizes and durations. Sizes are binary: `512M` is 512 MiB,
//! `2G` 2 GiB, `1T` 1 TiB; a bare number is MiB.

use std::time::Duration;

const MIB_PER_GIB: u64 = 1024;

/// Parses a size into MiB: `512M`, `512MiB`, `2G`, `2GiB`, `1T`, or `1024` (MiB).
pub fn parse_mib(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{text:?} is not a size: use a number with an optional unit, e.g. 512M, 2G or 1024 (MiB)"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is too large"))?;
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "{text:?}: fractions are not supported; use a smaller unit (e.g. 1536M for 1.5G)"
        ));
    }
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => MIB_PER_GIB,
        "t" | "tb" | "tib" => MIB_PER_GIB * MIB_PER_GIB,
        "k" | "kb" | "kib" | "b" => {
            return Err(format!(
                "{text:?}: sizes here are whole MiB at least; use M, G or T"
            ))
        }
        other => {
            return Err(format!(
                "{text:?} has an unknown unit {other:?}: use M, G or T (e.g. 512M, 2G)"
            ))
        }
    };
    let mib = n
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if mib == 0 {
        return Err(format!("{text:?}: the size must be more than 0"));
    }
    Ok(mib)
}

/// Parses a disk size into GiB: the same syntax as [`parse_mib`], in whole GiB.
pub fn parse_gib(text: &str) -> Result<u64, String> {
    let mib = parse_mib(text)?;
    if !mib.is_multiple_of(MIB_PER_GIB) {
        return Err(format!(
            "{text:?}: disk sizes are whole GiB (e.g. 10G); {mib} MiB is not"
        ));
    }
    Ok(mib / MIB_PER_GIB)
}

/// Parses a stop timeout such as `60s` or `2m` into whole seconds.
pub fn parse_seconds(text: &str) -> Result<u32, String> {
    let d: Duration = humantime::parse_duration(text.trim())
        .or_else(|e| {
            // A bare number is seconds.
            text.trim()
                .parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|_| e)
        })
        .map_err(|e| format!("{text:?} is not a duration like 60s or 2m: {e}"))?;
    u32::try_from(d.as_secs()).map_err(|_| format!("{text:?} is too long"))
}

/// Formats MiB compactly: `512M`, `2G`, `1536M`.
pub fn format_mib(mib: u64) -> String {
    if mib >= MIB_PER_GIB && mib.is_multiple_of(MIB_PER_GIB) {
        format!("{}G", mib / MIB_PER_GIB)
    } else {
        format!("{mib}M")
    }
}

/// Formats bytes with one decimal in the largest binary unit that fits.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_to_mib() {
        assert_eq!(parse_mib("512M"), Ok(512));
        assert_eq!(parse_mib("512m"), Ok(512));
        assert_eq!(parse_mib("512MiB"), Ok(512));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert_eq!(parse_mib("2GB"), Ok(2048));
        assert_eq!(parse_mib("2gib"), Ok(2048));
        assert_eq!(parse_mib("1T"), Ok(1024 * 1024));
        assert_eq!(parse_mib("1024"), Ok(1024));
        assert_eq!(parse_mib(" 64 "), Ok(64));
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        let err = |t: &str| parse_mib(t).unwrap_err();
        assert!(err("").contains("not a size"));
        assert!(err("G").contains("not a size"));
        assert!(err("-1G").contains("not a size"));
        assert!(err("1.5G").contains("fractions"));
        assert!(err("2X").contains("unknown unit"));
        assert!(err("512K").contains("whole MiB"));
        assert!(err("0").contains("more than 0"));
        assert!(err("0G").contains("more than 0"));
        assert!(err("99999999999999999999").contains("too large"));
        assert!(err("18014398509481984T").contains("too large"));
    }

    #[test]
    fn disk_sizes_are_whole_gib() {
        assert_eq!(parse_gib("10G"), Ok(10));
        assert_eq!(parse_gib("2048"), Ok(2));
        assert_eq!(parse_gib("1T"), Ok(1024));
        assert!(parse_gib("1536M").unwrap_err().contains("whole GiB"));
        assert!(parse_gib("10").unwrap_err().contains("whole GiB"));
    }

    #[test]
    fn stop_timeouts_are_seconds() {
        assert_eq!(parse_seconds("60s"), Ok(60));
        assert_eq!(parse_seconds("2m"), Ok(120));
        assert_eq!(parse_seconds("90"), Ok(90));
        assert!(parse_seconds("soon").is_err());
    }

    #[test]
    fn sizes_format_compactly() {
        assert_eq!(format_mib(512), "512M");
        assert_eq!(format_mib(2048), "2G");
        assert_eq!(format_mib(1536), "1536M");
        assert_eq!(format_bytes(100), "100 B");
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
        assert_eq!(format_bytes(1536 << 10), "1.5 MiB");
    }
}
