//! Presentation helpers shared by the binary's interfaces: text from peers made safe for a
//! terminal, sizes, progress bars, short ids and round-trip times.

/// Bytes in a human unit.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS.get(unit).unwrap_or(&"B"))
    }
}

/// A text progress bar: `[#####.....] 50%`.
pub fn bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 24;
    let filled = done
        .saturating_mul(WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH);
    let percent = done.saturating_mul(100).checked_div(total).unwrap_or(100);
    format!(
        "[{}{}] {percent:>3}%",
        "#".repeat(filled.min(WIDTH) as usize),
        ".".repeat(WIDTH.saturating_sub(filled) as usize)
    )
}

/// Text from a peer, made safe for a terminal: every control character (escape sequences,
/// carriage returns, newlines, bidirectional overrides, ...) is shown as an escape such as
/// `\n` or `\u{1b}` instead of acting on the screen.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The first eight characters of a message id, as shown in text.
pub fn short(msg_id: &str) -> &str {
    msg_id.get(..8).unwrap_or(msg_id)
}

/// A round-trip time in milliseconds, or `-` when unknown.
pub fn fmt_rtt(rtt_ms: Option<f64>) -> String {
    rtt_ms.map_or_else(|| "-".to_owned(), |r| format!("{r:.1} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            clean("oi\x1b[2J\r\n[carol@UnB] x"),
            "oi\\u{1b}[2J\\r\\n[carol@UnB] x"
        );
        assert_eq!(clean("\u{202e}abc\u{7}"), "\\u{202e}abc\\u{7}");
        assert_eq!(clean("Olá, → ok"), "Olá, → ok");
    }
}
