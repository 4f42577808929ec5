//! Retention (issue #13): which WAL files may be deleted, from a receiver's directory
//! (`walship recv --keep-local`) and from the archive (`walship prune`). [`plan`] is a pure
//! function of the file list, the policy and the floors; the callers list, delete and log.
//!
//! A segment is deleted only when every rule agrees: it is archived (locally, when an archive is
//! configured; in the archive, by definition), it is beyond the policy (older than the age, past
//! the newest bytes kept, or wholly below `--before`), it is not its timeline's newest segment, and
//! it ends at or below every floor (`--keep-from LSN`, the start of the newest base backup). History
//! files (`.history`, `.backup`), `.partial` files and anything that is not WAL are never deleted.
use std::collections::BTreeMap;
use std::time::Duration;

use crate::wal::{Lsn, WalFileName};

/// What is kept regardless of floors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Keep the newest segments up to this many bytes in all (`--keep-local 20GiB`).
    KeepBytes(u64),
    /// Keep segments younger than this (`--keep-local 7d`, `prune --older-than 7d`).
    KeepAge(Duration),
    /// Keep segments that hold any byte at or after this LSN (`prune --before LSN`).
    Before(Lsn),
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::KeepBytes(b) => write!(f, "keep the newest {}", bytesize::ByteSize(*b).display().iec()),
            Policy::KeepAge(d) => write!(f, "keep what is younger than {}", humantime::format_duration(*d)),
            Policy::Before(l) => write!(f, "keep what holds WAL at or after {l}"),
        }
    }
}

/// Parse `--keep-local`: a duration (`7d`, `36h`) or a size (`20GiB`, `500MB`); a duration first.
pub fn parse_keep_local(s: &str) -> Result<Policy, String> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        return if d.is_zero() { Err("--keep-local must keep something: a duration above zero".into()) } else { Ok(Policy::KeepAge(d)) };
    }
    match s.parse::<bytesize::ByteSize>() {
        Ok(b) if b.as_u64() > 0 => Ok(Policy::KeepBytes(b.as_u64())),
        Ok(_) => Err("--keep-local must keep something: a size above zero".into()),
        Err(_) => Err(format!("--keep-local {s:?}: expected a duration (7d, 36h) or a size (20GiB, 500MB)")),
    }
}

/// A position below which WAL is not needed by whoever set it; nothing at or after it is deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Floor {
    pub lsn: Lsn,
    /// Who needs it, for the log: `--keep-from`, or the backup history file's name.
    pub source: String,
}

/// One file of the directory or the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub name: String,
    pub bytes: u64,
    /// Since its last modification (upload, for an object).
    pub age: Duration,
    /// In the archive (always true for an object of the archive).
    pub archived: bool,
}

/// Why a file stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepReason {
    /// Not a WAL file name (or not this segment size): not ours to delete.
    NotWal,
    /// A timeline or backup history file: never deleted.
    History,
    /// An unfinished segment: never deleted.
    Partial,
    /// Its timeline's newest segment: the receiver resumes after it.
    Newest,
    /// Within the policy.
    Policy,
    /// It holds WAL at or after a floor.
    Floor(Floor),
    /// Not in the archive yet.
    NotArchived,
    /// An older segment of its timeline stays: only the oldest go, so what stays has no gap.
    OlderStays,
}

impl std::fmt::Display for KeepReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepReason::NotWal => f.write_str("not a WAL file"),
            KeepReason::History => f.write_str("history file (never deleted)"),
            KeepReason::Partial => f.write_str(".partial (never deleted)"),
            KeepReason::Newest => f.write_str("newest segment of its timeline"),
            KeepReason::Policy => f.write_str("within the policy"),
            KeepReason::Floor(fl) => write!(f, "holds WAL at or after {} ({})", fl.lsn, fl.source),
            KeepReason::NotArchived => f.write_str("not archived yet"),
            KeepReason::OlderStays => f.write_str("an older segment of its timeline stays (no gap is left)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub name: String,
    pub bytes: u64,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub name: String,
    pub bytes: u64,
    pub why: KeepReason,
}

/// What to delete, oldest first, and why each other file stays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub delete: Vec<Delete>,
    pub keep: Vec<Kept>,
    /// The lowest floor (the one that binds), if any.
    pub floor: Option<Floor>,
}

impl Plan {
    /// Bytes of the WAL files (segments, `.partial`, history files) that stay; not other files.
    pub fn kept_bytes(&self) -> u64 {
        self.keep.iter().filter(|k| k.why != KeepReason::NotWal).map(|k| k.bytes).sum()
    }
    pub fn deleted_bytes(&self) -> u64 {
        self.delete.iter().map(|d| d.bytes).sum()
    }
}

/// The plan for `files` (segment size `seg_size`) under `policy` and `floors`.
pub fn plan(files: &[FileInfo], policy: Policy, floors: &[Floor], seg_size: u64) -> Plan {
    let floor = floors.iter().min_by_key(|f| f.lsn).cloned();
    let mut out = Plan { floor: floor.clone(), ..Plan::default() };
    // Segments newest first, by (segno, timeline).
    let mut segments: Vec<(u64, u32, &FileInfo)> = Vec::new();
    for f in files {
        let why = match WalFileName::parse(&f.name, seg_size) {
            Some(WalFileName::Segment { tli, segno }) => {
                segments.push((segno, tli, f));
                continue;
            }
            Some(WalFileName::History { .. } | WalFileName::Backup { .. }) => KeepReason::History,
            Some(WalFileName::Partial { .. }) => KeepReason::Partial,
            None => KeepReason::NotWal,
        };
        out.keep.push(Kept { name: f.name.clone(), bytes: f.bytes, why });
    }
    segments.sort_unstable_by_key(|s| std::cmp::Reverse((s.0, s.1)));
    let mut newest_of_tli: BTreeMap<u32, u64> = BTreeMap::new();
    for &(segno, tli, _) in &segments {
        newest_of_tli.entry(tli).or_insert(segno);
    }
    let mut newer_bytes: u64 = 0;
    let mut decided: Vec<(u64, u32, &FileInfo, Option<KeepReason>, Lsn)> = Vec::new();
    for (segno, tli, f) in segments {
        newer_bytes = newer_bytes.saturating_add(f.bytes);
        let end = Lsn((segno + 1).saturating_mul(seg_size));
        let within = match policy {
            Policy::KeepBytes(b) => newer_bytes <= b,
            Policy::KeepAge(d) => f.age < d,
            Policy::Before(l) => end > l,
        };
        let why = if newest_of_tli.get(&tli) == Some(&segno) {
            Some(KeepReason::Newest)
        } else if within {
            Some(KeepReason::Policy)
        } else if let Some(fl) = floor.as_ref().filter(|fl| end > fl.lsn) {
            Some(KeepReason::Floor(fl.clone()))
        } else if !f.archived {
            Some(KeepReason::NotArchived)
        } else {
            None
        };
        decided.push((segno, tli, f, why, end));
    }
    // Oldest first; per timeline, only a prefix goes: after the first segment that stays, all stay.
    decided.reverse();
    let mut kept_tli: std::collections::BTreeSet<u32> = std::collections::BTreeSet::new();
    for (_, tli, f, why, end) in decided {
        let why = match why {
            Some(w) => Some(w),
            None if kept_tli.contains(&tli) => Some(KeepReason::OlderStays),
            None => None,
        };
        match why {
            Some(why) => {
                kept_tli.insert(tli);
                out.keep.push(Kept { name: f.name.clone(), bytes: f.bytes, why });
            }
            None => out.delete.push(Delete { name: f.name.clone(), bytes: f.bytes, why: delete_why(policy, f, end, floor.as_ref()) }),
        }
    }
    out
}

fn delete_why(policy: Policy, f: &FileInfo, end: Lsn, floor: Option<&Floor>) -> String {
    let beyond = match policy {
        Policy::KeepBytes(b) => format!("beyond the newest {} kept", bytesize::ByteSize(b).display().iec()),
        Policy::KeepAge(d) => format!(
            "{} old, beyond {}",
            humantime::format_duration(Duration::from_secs(f.age.as_secs())),
            humantime::format_duration(d)
        ),
        Policy::Before(l) => format!("ends at {end}, at or below {l}"),
    };
    let floor = floor.map_or(String::new(), |fl| format!(", ends at or below the floor {} ({})", fl.lsn, fl.source));
    format!("{beyond}, archived{floor}")
}

/// The START WAL LOCATION of a backup history file's content (`START WAL LOCATION: 0/2000028
/// (file 000000010000000000000002)`, written by `pg_backup_stop()`).
pub fn backup_start(content: &str) -> Option<Lsn> {
    let line = content.lines().find_map(|l| l.strip_prefix("START WAL LOCATION:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// The floor of the newest base backup among `backups` (name, content if read): its START WAL
/// LOCATION from the content, else from the name (the two agree for files PostgreSQL wrote; the
/// lower wins if they do not). None without backup history files.
pub fn newest_backup_floor<'a>(backups: impl IntoIterator<Item = (&'a str, Option<&'a str>)>, seg_size: u64) -> Option<Floor> {
    let mut newest: Option<(Lsn, Floor)> = None;
    for (name, content) in backups {
        let Some(WalFileName::Backup { segno, offset, .. }) = WalFileName::parse(name, seg_size) else { continue };
        let by_name = Lsn(segno * seg_size + u64::from(offset));
        let start = content.and_then(backup_start).map_or(by_name, |c| c.min(by_name));
        if newest.as_ref().is_none_or(|(n, _)| by_name > *n) {
            newest = Some((by_name, Floor { lsn: start, source: format!("base backup {name}") }));
        }
    }
    newest.map(|(_, f)| f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::segment_file_name;
    use proptest::prelude::*;

    const SEG: u64 = 16 << 20;

    fn seg(tli: u32, segno: u64, age_s: u64, archived: bool) -> FileInfo {
        FileInfo { name: segment_file_name(tli, segno, SEG), bytes: SEG, age: Duration::from_secs(age_s), archived }
    }

    fn other(name: &str) -> FileInfo {
        FileInfo { name: name.into(), bytes: 100, age: Duration::from_secs(1 << 30), archived: true }
    }

    fn names(p: &Plan) -> Vec<String> {
        p.delete.iter().map(|d| d.name.clone()).collect()
    }

    #[test]
    fn parses_keep_local() {
        assert_eq!(parse_keep_local("7d"), Ok(Policy::KeepAge(Duration::from_secs(7 * 86400))));
        assert_eq!(parse_keep_local("20GiB"), Ok(Policy::KeepBytes(20 << 30)));
        assert_eq!(parse_keep_local("64MiB"), Ok(Policy::KeepBytes(64 << 20)));
        assert!(parse_keep_local("0s").is_err());
        assert!(parse_keep_local("0").is_err());
        assert!(parse_keep_local("lots").unwrap_err().contains("lots"));
    }

    #[test]
    fn by_age_deletes_old_archived_segments_oldest_first() {
        let files = [seg(1, 1, 100, true), seg(1, 2, 90, true), seg(1, 3, 10, true), seg(1, 4, 100, true)];
        let p = plan(&files, Policy::KeepAge(Duration::from_secs(50)), &[], SEG);
        assert_eq!(names(&p), vec![segment_file_name(1, 1, SEG), segment_file_name(1, 2, SEG)]);
        // segment 4 is old but the newest; 3 is young
        assert!(p.keep.iter().any(|k| k.name == segment_file_name(1, 4, SEG) && k.why == KeepReason::Newest));
        assert!(p.keep.iter().any(|k| k.name == segment_file_name(1, 3, SEG) && k.why == KeepReason::Policy));
        assert!(p.delete[0].why.contains("archived"), "{}", p.delete[0].why);
    }

    #[test]
    fn by_size_keeps_the_newest_bytes() {
        let files: Vec<FileInfo> = (1..=6).map(|n| seg(1, n, 0, true)).collect();
        let p = plan(&files, Policy::KeepBytes(2 * SEG), &[], SEG);
        assert_eq!(names(&p), (1..=4).map(|n| segment_file_name(1, n, SEG)).collect::<Vec<_>>());
        assert_eq!(p.kept_bytes(), 2 * SEG);
    }

    #[test]
    fn unarchived_floors_history_and_partial_stay() {
        let mut files: Vec<FileInfo> = (1..=8).map(|n| seg(1, n, 1000, n != 2)).collect();
        files.push(other("00000001000000000000000A.partial"));
        files.push(other("00000002.history"));
        files.push(other("000000010000000000000003.00000028.backup"));
        files.push(other("postgresql.conf"));
        let floors = [Floor { lsn: Lsn(5 * SEG + 10), source: "--keep-from".into() }];
        let p = plan(&files, Policy::KeepAge(Duration::from_secs(1)), &floors, SEG);
        assert_eq!(names(&p), vec![segment_file_name(1, 1, SEG)]);
        let why = |n: &str| p.keep.iter().find(|k| k.name == n).map(|k| k.why.clone()).unwrap();
        assert_eq!(why(&segment_file_name(1, 2, SEG)), KeepReason::NotArchived);
        assert_eq!(why(&segment_file_name(1, 3, SEG)), KeepReason::OlderStays);
        // with segment 2 archived, everything below the floor goes
        files[1].archived = true;
        let p = plan(&files, Policy::KeepAge(Duration::from_secs(1)), &floors, SEG);
        assert_eq!(names(&p), (1..=4).map(|n| segment_file_name(1, n, SEG)).collect::<Vec<_>>());
        assert!(matches!(why(&segment_file_name(1, 5, SEG)), KeepReason::Floor(_)));
        assert_eq!(why("00000002.history"), KeepReason::History);
        assert_eq!(why("000000010000000000000003.00000028.backup"), KeepReason::History);
        assert_eq!(why("00000001000000000000000A.partial"), KeepReason::Partial);
        assert_eq!(why("postgresql.conf"), KeepReason::NotWal);
    }

    #[test]
    fn no_gap_is_left_behind_an_unarchived_or_young_segment() {
        let files = [seg(1, 1, 100, true), seg(1, 2, 100, false), seg(1, 3, 100, true), seg(1, 4, 100, true)];
        let p = plan(&files, Policy::KeepAge(Duration::from_secs(1)), &[], SEG);
        assert_eq!(names(&p), vec![segment_file_name(1, 1, SEG)]);
        assert!(p.keep.iter().any(|k| k.name == segment_file_name(1, 3, SEG) && k.why == KeepReason::OlderStays));
        // a young segment among old ones (a file touched later) holds the newer ones too
        let files = [seg(1, 1, 100, true), seg(1, 2, 0, true), seg(1, 3, 100, true), seg(1, 4, 100, true)];
        let p = plan(&files, Policy::KeepAge(Duration::from_secs(1)), &[], SEG);
        assert_eq!(names(&p), vec![segment_file_name(1, 1, SEG)]);
    }

    #[test]
    fn before_deletes_segments_wholly_below() {
        let files: Vec<FileInfo> = (1..=5).map(|n| seg(1, n, 0, true)).collect();
        let p = plan(&files, Policy::Before(Lsn(3 * SEG + 1)), &[], SEG);
        assert_eq!(names(&p), vec![segment_file_name(1, 1, SEG), segment_file_name(1, 2, SEG)]);
        let p = plan(&files, Policy::Before(Lsn(3 * SEG)), &[], SEG);
        assert_eq!(names(&p), vec![segment_file_name(1, 1, SEG), segment_file_name(1, 2, SEG)]);
    }

    #[test]
    fn each_timeline_keeps_its_newest() {
        let files = [seg(1, 4, 99, true), seg(1, 5, 99, true), seg(2, 5, 99, true), seg(2, 6, 99, true)];
        let p = plan(&files, Policy::KeepAge(Duration::from_secs(1)), &[], SEG);
        assert_eq!(names(&p), vec![segment_file_name(1, 4, SEG), segment_file_name(2, 5, SEG)]);
    }

    #[test]
    fn backup_floor_from_content_and_name() {
        let content = "START WAL LOCATION: 0/B000028 (file 00000001000000000000000B)\nSTOP WAL LOCATION: 0/B000100 (file 00000001000000000000000B)\nCHECKPOINT LOCATION: 0/B000060\n";
        assert_eq!(backup_start(content), Some(Lsn(0xB000028)));
        assert_eq!(backup_start("LABEL: x\n"), None);
        let f = newest_backup_floor(
            [("00000001000000000000000B.00000028.backup", Some(content)), ("000000010000000000000003.00000028.backup", None), ("junk.backup", None)],
            SEG,
        )
        .unwrap();
        assert_eq!(f.lsn, Lsn(0xB000028));
        assert!(f.source.contains("00000001000000000000000B.00000028.backup"));
        let f = newest_backup_floor([("000000010000000000000003.00000028.backup", None)], SEG).unwrap();
        assert_eq!(f.lsn, Lsn(3 * SEG + 0x28));
        assert_eq!(newest_backup_floor([], SEG), None);
    }

    fn arb_files() -> impl Strategy<Value = Vec<FileInfo>> {
        let one = (1u32..4, 0u64..40, 0u64..200, any::<bool>(), 0u8..10).prop_map(|(tli, segno, age, archived, kind)| {
            let name = match kind {
                0 => format!("{}.partial", segment_file_name(tli, segno, SEG)),
                1 => format!("{tli:08X}.history"),
                2 => format!("{}.{:08X}.backup", segment_file_name(tli, segno, SEG), 40),
                _ => segment_file_name(tli, segno, SEG),
            };
            FileInfo { name, bytes: SEG, age: Duration::from_secs(age), archived }
        });
        proptest::collection::vec(one, 0..60).prop_map(|mut v| {
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v.dedup_by(|a, b| a.name == b.name);
            v
        })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        prop_oneof![
            (0u64..30).prop_map(|n| Policy::KeepBytes(n * SEG)),
            (0u64..200).prop_map(|s| Policy::KeepAge(Duration::from_secs(s))),
            (0u64..45).prop_map(|n| Policy::Before(Lsn(n * SEG))),
        ]
    }

    proptest! {
        #[test]
        fn never_deletes_what_must_stay(files in arb_files(), policy in arb_policy(), floor in proptest::option::of(0u64..(45 * SEG))) {
            let floors: Vec<Floor> = floor.map(|l| Floor { lsn: Lsn(l), source: "x".into() }).into_iter().collect();
            let p = plan(&files, policy, &floors, SEG);
            prop_assert_eq!(p.delete.len() + p.keep.len(), files.len());
            let newest_per_tli: BTreeMap<u32, u64> = files.iter().fold(BTreeMap::new(), |mut m, f| {
                if let Some(WalFileName::Segment { tli, segno }) = WalFileName::parse(&f.name, SEG) {
                    let e = m.entry(tli).or_insert(segno);
                    *e = (*e).max(segno);
                }
                m
            });
            // Per timeline, what goes is the oldest segments: nothing kept below a deleted one.
            for k in &p.keep {
                if let Some(WalFileName::Segment { tli, segno }) = WalFileName::parse(&k.name, SEG) {
                    let below = p.delete.iter().any(|d| matches!(WalFileName::parse(&d.name, SEG),
                        Some(WalFileName::Segment { tli: t, segno: s }) if t == tli && s > segno));
                    prop_assert!(!below, "{} stays below a deleted segment", k.name);
                }
            }
            for d in &p.delete {
                let f = files.iter().find(|f| f.name == d.name).unwrap();
                prop_assert!(f.archived, "deleted an unarchived {}", d.name);
                let Some(WalFileName::Segment { tli, segno }) = WalFileName::parse(&d.name, SEG) else {
                    return Err(TestCaseError::fail(format!("deleted a non-segment {}", d.name)));
                };
                prop_assert!(newest_per_tli[&tli] != segno, "deleted the newest {}", d.name);
                if let Some(l) = floor {
                    prop_assert!((segno + 1) * SEG <= l, "deleted {} at/after the floor", d.name);
                }
                match policy {
                    Policy::KeepAge(a) => prop_assert!(f.age >= a),
                    Policy::Before(l) => prop_assert!((segno + 1) * SEG <= l.0),
                    Policy::KeepBytes(b) => {
                        let newer: u64 = files.iter().filter(|g| matches!(WalFileName::parse(&g.name, SEG),
                            Some(WalFileName::Segment { tli: t, segno: s }) if (s, t) >= (segno, tli))).map(|g| g.bytes).sum();
                        prop_assert!(newer > b);
                    }
                }
            }
        }
    }
}
