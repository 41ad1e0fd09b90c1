//! Lower-case hexadecimal, as keys, digests and UUIDs are written in files, manifests and
//! reports: the one encoder and decoder Molt has.

pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Exactly `N` bytes from `2 * N` hex digits (either case); surrounding whitespace is
/// ignored.
pub fn decode_array<const N: usize>(text: &str) -> Result<[u8; N], String> {
    let t = text.trim().as_bytes();
    if t.len() != 2 * N {
        return Err(format!("expected {} hex digits, found {}", 2 * N, t.len()));
    }
    let digit = |c: u8| -> Result<u8, String> {
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| format!("{:?} is not a hex digit", c as char))
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(t[2 * i])? << 4 | digit(t[2 * i + 1])?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(encode(&b), "0001abff");
        assert_eq!(decode_array::<4>(" 0001ABff\n").unwrap(), b);
        assert!(decode_array::<4>("0001abf").is_err());
        assert!(decode_array::<4>("0001abfg").is_err());
        assert!(decode_array::<4>("é001abf").is_err());
    }
}
