//! Names between the core (any Linux name) and Windows.
//!
//! **Escaping.** Characters Windows forbids in a name (`<>:"\|?*` and
//! controls U+0001..U+001F), a trailing dot or space, and the last letter
//! of a reserved device stem (CON, PRN, AUX, NUL, COM1-9, LPT1-9, with or
//! without extension) are shown as U+F000 plus the character, the private
//! use mapping Cygwin, WSL and Samba also use. So that the mapping is
//! reversible for every name, a name character already in U+F000..U+F0FF
//! is shown as U+F0FF followed by itself. A Windows name decodes only if
//! it is the encoding of its decoding (one spelling per core name).
//!
//! **Case.** Windows users expect case-insensitive, case-preserving names.
//! The core is case-sensitive; the adapter resolves a name by exact match
//! first, then by NTFS-style simple upcase. When two core names fold alike
//! (made on Linux), each still opens by its exact spelling and any other
//! spelling is refused as ambiguous. A new name that folds like an existing
//! one is refused (a collision), as NTFS would.

/// The private-use block escaped characters are shown in.
const BASE: u32 = 0xF000;
/// Marks a name character that is itself in the escape block.
const LITERAL: char = '\u{F0FF}';
const FORBIDDEN: &[char] = &['<', '>', ':', '"', '\\', '|', '?', '*'];
const DEVICES: &[&str] = &["CON", "PRN", "AUX", "NUL"];

/// WinFsp's MaxComponentLength, in UTF-16 units.
pub const MAX_COMPONENT_UTF16: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("not a valid cairn name as Windows spells it")]
    Invalid,
    #[error("name longer than {MAX_COMPONENT_UTF16} UTF-16 units")]
    TooLong,
}

fn shifted(c: char) -> char {
    char::from_u32(BASE + c as u32).expect("private use area")
}

fn is_device_stem(stem: &str) -> bool {
    let upper = stem.to_ascii_uppercase();
    DEVICES.contains(&upper.as_str())
        || (upper.len() == 4
            && (upper.starts_with("COM") || upper.starts_with("LPT"))
            && matches!(upper.as_bytes()[3], b'1'..=b'9'))
}

/// A core name as Windows shows it.
pub fn to_windows(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let stem_len = chars.iter().position(|&c| c == '.').unwrap_or(chars.len());
    let stem: String = chars[..stem_len].iter().collect();
    let device_escape = is_device_stem(&stem).then(|| stem_len - 1);
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        let last = i + 1 == chars.len();
        if (BASE..=BASE + 0xFF).contains(&(c as u32)) {
            out.push(LITERAL);
            out.push(c);
        } else if (c as u32) < 0x20
            || FORBIDDEN.contains(&c)
            || (last && (c == '.' || c == ' '))
            || device_escape == Some(i)
        {
            out.push(shifted(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// A Windows name back to the core name it shows.
pub fn from_windows(shown: &str) -> Result<String, NameError> {
    if shown.encode_utf16().count() > MAX_COMPONENT_UTF16 {
        return Err(NameError::TooLong);
    }
    let mut out = String::with_capacity(shown.len());
    let mut chars = shown.chars();
    while let Some(c) = chars.next() {
        let code = c as u32;
        if c == LITERAL {
            match chars.next() {
                Some(l) if (BASE..=BASE + 0xFF).contains(&(l as u32)) => out.push(l),
                _ => return Err(NameError::Invalid),
            }
        } else if (BASE..BASE + 0x80).contains(&code) {
            out.push(char::from_u32(code - BASE).expect("ASCII"));
        } else if (BASE + 0x80..=BASE + 0xFF).contains(&code) {
            return Err(NameError::Invalid);
        } else {
            out.push(c);
        }
    }
    if out.is_empty() || out.contains(['/', '\0']) || out == "." || out == ".." || to_windows(&out) != shown {
        return Err(NameError::Invalid);
    }
    Ok(out)
}

/// Whether a core name can be shown at all (within the UTF-16 limit once
/// escaped). Longer ones are left out of listings.
pub fn fits(name: &str) -> bool {
    to_windows(name).encode_utf16().count() <= MAX_COMPONENT_UTF16
}

/// NTFS-style simple upcase: each character to its single-character
/// uppercase, where it has one (ß stays ß, as on NTFS).
pub fn fold(name: &str) -> String {
    name.chars()
        .map(|c| {
            let mut up = c.to_uppercase();
            match (up.next(), up.next()) {
                (Some(u), None) => u,
                _ => c,
            }
        })
        .collect()
}

/// How a Windows spelling matches a directory's names.
#[derive(Debug, PartialEq, Eq)]
pub enum Match<'a> {
    /// The one name that folds alike (or the exact spelling).
    Found(&'a str),
    /// Several names fold alike and none is spelt exactly so.
    Ambiguous,
    Missing,
}

/// Picks the core name a Windows spelling means among a directory's core
/// names: an exact spelling wins, else the single case-insensitive match.
pub fn pick<'a>(shown: &str, names: impl IntoIterator<Item = &'a str>) -> Match<'a> {
    let wanted = fold(shown);
    let mut found = Match::Missing;
    for name in names {
        let as_shown = to_windows(name);
        if as_shown == shown {
            return Match::Found(name);
        }
        if fold(&as_shown) == wanted {
            found = match found {
                Match::Missing => Match::Found(name),
                _ => Match::Ambiguous,
            };
        }
    }
    found
}

/// The components of a WinFsp path (`\dir\file`); the root has none.
pub fn components(path: &str) -> impl Iterator<Item = &str> {
    path.split('\\').filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_are_unchanged() {
        for n in [
            "notes.txt",
            "Photo 2026.JPG",
            "ünïcödé",
            "日本語.md",
            ".bashrc",
            "a.b.c",
            "CONFIG",
            "com10",
        ] {
            assert_eq!(to_windows(n), n);
            assert_eq!(from_windows(n).unwrap(), n);
        }
    }

    #[test]
    fn forbidden_characters_are_escaped_reversibly() {
        let cases = [
            ("a:b", "a\u{F03A}b"),
            ("what?.txt", "what\u{F03F}.txt"),
            ("x<y>z|w*\"q\\", "x\u{F03C}y\u{F03E}z\u{F07C}w\u{F02A}\u{F022}q\u{F05C}"),
            ("tab\there", "tab\u{F009}here"),
            ("ends.", "ends\u{F02E}"),
            ("ends ", "ends\u{F020}"),
            ("..", ".\u{F02E}"),
            ("CON", "CO\u{F04E}"),
            ("con.txt", "co\u{F06E}.txt"),
            ("LPT1", "LPT\u{F031}"),
            ("com9.tar.gz", "com\u{F039}.tar.gz"),
        ];
        for (core, shown) in cases {
            assert_eq!(to_windows(core), shown, "{core:?}");
            if core != ".." {
                assert_eq!(from_windows(shown).unwrap(), core, "{shown:?}");
            }
        }
    }

    #[test]
    fn names_already_in_the_escape_block_survive() {
        for core in ["\u{F03A}", "a\u{F0FF}b", "x\u{F02E}", "\u{F0FF}\u{F0FF}"] {
            let shown = to_windows(core);
            assert_eq!(from_windows(&shown).unwrap(), core);
            assert_ne!(from_windows(&shown).unwrap(), ":");
        }
    }

    #[test]
    fn only_the_canonical_spelling_decodes() {
        // "a.b" is never shown as "a\u{F02E}b", so that spelling is refused:
        // each core name has exactly one Windows spelling.
        assert_eq!(from_windows("a\u{F02E}b"), Err(NameError::Invalid));
        assert_eq!(from_windows("\u{F02F}"), Err(NameError::Invalid));
        assert_eq!(from_windows("\u{F090}"), Err(NameError::Invalid));
        assert_eq!(from_windows("a\u{F0FF}"), Err(NameError::Invalid));
    }

    #[test]
    fn every_byte_pattern_round_trips() {
        // Exhaustive over short names from a hostile alphabet.
        let alphabet = ['a', '.', ' ', ':', '\u{1}', '\u{F03A}', '\u{F0FF}', 'N', 'C', 'O'];
        let mut names = vec![String::new()];
        for _ in 0..4 {
            names = names
                .iter()
                .flat_map(|n| alphabet.iter().map(move |c| format!("{n}{c}")))
                .collect();
            for n in names.iter().filter(|n| *n != "." && *n != "..") {
                assert_eq!(from_windows(&to_windows(n)).as_deref(), Ok(n.as_str()), "{n:?}");
            }
        }
    }

    #[test]
    fn utf16_length_is_what_counts() {
        let bmp = "é".repeat(255); // 510 UTF-8 bytes, 255 UTF-16 units
        assert!(fits(&bmp));
        let astral = "😀".repeat(128); // 256 UTF-16 units
        assert!(!fits(&astral));
        assert_eq!(from_windows(&astral), Err(NameError::TooLong));
    }

    #[test]
    fn folding_is_simple_upcase() {
        assert_eq!(fold("Straße.txt"), "STRAßE.TXT");
        assert_eq!(fold("ÉCOLE"), fold("école"));
        assert_eq!(fold("Ωmega"), "ΩMEGA");
    }

    #[test]
    fn exact_spelling_wins_then_a_unique_fold() {
        let names = ["Report.docx", "notes.txt", "Notes.TXT"];
        assert_eq!(pick("report.DOCX", names), Match::Found("Report.docx"));
        assert_eq!(pick("notes.txt", names), Match::Found("notes.txt"));
        assert_eq!(pick("Notes.TXT", names), Match::Found("Notes.TXT"));
        assert_eq!(pick("NOTES.txt", names), Match::Ambiguous);
        assert_eq!(pick("missing", names), Match::Missing);
        // Escaped names match by their Windows spelling.
        assert_eq!(pick("A\u{F03A}B", ["a:b"]), Match::Found("a:b"));
    }

    #[test]
    fn path_components() {
        assert_eq!(components("\\").count(), 0);
        assert_eq!(
            components("\\dir\\sub\\f.txt").collect::<Vec<_>>(),
            ["dir", "sub", "f.txt"]
        );
    }
}
