//! Timeline history files (`TLI.history`): one line per ancestor timeline,
//! `parent_tli <tab> switch_lsn <tab> reason`, as written by PostgreSQL at promotion.

use super::Lsn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// An ancestor timeline.
    pub tli: u32,
    /// Where WAL of `tli` ends and its child begins.
    pub switch_lsn: Lsn,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timeline history line {line}: {why}")]
pub struct HistoryError {
    pub line: usize,
    pub why: String,
}

/// Parses a history file (comments `#` and blank lines ignored). Timelines must increase.
pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, HistoryError> {
    let mut entries: Vec<HistoryEntry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |why: String| HistoryError { line: i + 1, why };
        let mut fields = line.split_whitespace();
        let tli: u32 = fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| err(format!("expected a timeline number, found {line:?}")))?;
        let switch_lsn: Lsn = fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| err(format!("expected a switch LSN X/Y, found {line:?}")))?;
        if let Some(prev) = entries.last() {
            if tli <= prev.tli || switch_lsn < prev.switch_lsn {
                return Err(err(format!("timelines and switch points must increase, found {tli} at {switch_lsn} after {} at {}", prev.tli, prev.switch_lsn)));
            }
        }
        entries.push(HistoryEntry { tli, switch_lsn });
    }
    Ok(entries)
}

/// Where timeline `tli` ended according to `history`, if it is an ancestor there.
pub fn switch_point(history: &[HistoryEntry], tli: u32) -> Option<Lsn> {
    history.iter().find(|e| e.tli == tli).map(|e| e.switch_lsn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_what_postgresql_writes() {
        let text = "1\t0/3000158\tno recovery target specified\n\n2\t0/5000060\tat restore point \"x\"\n";
        let h = parse_history(text).unwrap();
        assert_eq!(h, vec![HistoryEntry { tli: 1, switch_lsn: Lsn(0x3000158) }, HistoryEntry { tli: 2, switch_lsn: Lsn(0x5000060) }]);
        assert_eq!(switch_point(&h, 2), Some(Lsn(0x5000060)));
        assert_eq!(switch_point(&h, 3), None);
        assert!(parse_history("2\t0/1\n1\t0/2\n").is_err());
        assert!(parse_history("x\t0/1\n").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,200}") {
            let _ = parse_history(&text);
        }
    }
}
