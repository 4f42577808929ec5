//! `walship prune s3://BUCKET/PREFIX`: deletes archived segments beyond `--older-than` or
//! `--before`, per cluster under the prefix, with the planner and the floors of local retention
//! ([`super::retention`]): never a history file (`.history`, `.backup`), never a timeline's newest
//! segment, never one that holds WAL at or after `--keep-from` or the newest base backup's start
//! (the `.backup` file in the archive with the highest start position).
use std::time::SystemTime;

use super::retention::{self, FileInfo, Floor, KeepReason, Plan, Policy};
use super::store::BlockingStore;
use super::{ArchiveError, ArchiveSettings};
use crate::wal::{has_segment_name_shape, Lsn, WalIdentity};

/// `walship prune` options.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// [`Policy::KeepAge`] (`--older-than`) or [`Policy::Before`] (`--before`).
    pub policy: Policy,
    pub keep_from: Option<Lsn>,
    pub dry_run: bool,
}

/// One cluster's plan and what was done.
#[derive(Debug, Clone)]
pub struct ClusterPrune {
    pub system_id: u64,
    /// The folder (`s3://BUCKET/PREFIX/SYSID/`).
    pub folder: String,
    pub plan: Plan,
    /// Objects deleted (0 in a dry run).
    pub deleted: usize,
}

/// Plan (and unless `dry_run`, carry out) the prune of every cluster under the settings' prefix.
/// `out` gets one line per deleted object and a summary of what stays and why.
pub fn prune_store(settings: &ArchiveSettings, opts: &PruneOptions, out: &mut dyn std::io::Write) -> Result<Vec<ClusterPrune>, ArchiveError> {
    let store = BlockingStore::new(settings)?;
    let prefix = &settings.url.prefix;
    let root = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
    let mut done = Vec::new();
    for sysid_folder in store.list_folders(&root)? {
        let Some(system_id) = sysid_folder.trim_end_matches('/').rsplit('/').next().and_then(|s| s.parse::<u64>().ok()) else { continue };
        let mut objects = Vec::new();
        for tli_folder in store.list_folders(&sysid_folder)? {
            objects.extend(store.list(&tli_folder)?);
        }
        let Some(seg_size) = segment_size(&store, &objects)? else { continue };
        let now = SystemTime::now();
        let files: Vec<FileInfo> = objects
            .iter()
            .map(|o| FileInfo {
                name: file_name(&o.key).to_string(),
                bytes: o.size,
                age: now.duration_since(o.last_modified).unwrap_or_default(),
                archived: true,
            })
            .collect();
        let mut floors: Vec<Floor> = opts.keep_from.map(|lsn| Floor { lsn, source: "--keep-from".into() }).into_iter().collect();
        // The name of a backup history file is its START WAL LOCATION (segment and offset).
        floors.extend(retention::newest_backup_floor(files.iter().map(|f| (f.name.as_str(), None)), seg_size));
        let plan = retention::plan(&files, opts.policy, &floors, seg_size);
        let folder = store.store().describe(&sysid_folder);
        let deleted = carry_out(&store, opts, &objects, &plan, out)?;
        summarize(out, &folder, opts, &plan, deleted);
        done.push(ClusterPrune { system_id, folder, plan, deleted });
    }
    Ok(done)
}

fn file_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// The segment size, from the long page header of the cluster's first segment object.
fn segment_size(store: &BlockingStore, objects: &[super::ObjectInfo]) -> Result<Option<u64>, ArchiveError> {
    let mut segs: Vec<&str> = objects.iter().map(|o| o.key.as_str()).filter(|k| has_segment_name_shape(file_name(k))).collect();
    segs.sort_by_key(|k| file_name(k));
    let Some(first) = segs.first() else { return Ok(None) };
    let Some(bytes) = store.get_verified(first)? else { return Err(ArchiveError::Vanished { object: store.store().describe(first) }) };
    let id = WalIdentity::from_first_page(&bytes).map_err(|e| ArchiveError::Option(format!("{}: not a WAL segment: {e}", store.store().describe(first))))?;
    Ok(Some(id.seg_size))
}

fn carry_out(store: &BlockingStore, opts: &PruneOptions, objects: &[super::ObjectInfo], plan: &Plan, out: &mut dyn std::io::Write) -> Result<usize, ArchiveError> {
    let mut deleted = 0;
    for d in &plan.delete {
        let Some(o) = objects.iter().find(|o| file_name(&o.key) == d.name) else { continue };
        let shown = store.store().describe(&o.key);
        if opts.dry_run {
            let _ = writeln!(out, "would delete {shown}: {}", d.why);
        } else {
            store.delete(&o.key)?;
            deleted += 1;
            let _ = writeln!(out, "deleted {shown}: {}", d.why);
        }
    }
    Ok(deleted)
}

/// What stays and why: one line per reason with a count and the first and last name.
fn summarize(out: &mut dyn std::io::Write, folder: &str, opts: &PruneOptions, plan: &Plan, deleted: usize) {
    let verb = if opts.dry_run { "would delete" } else { "deleted" };
    let n = if opts.dry_run { plan.delete.len() } else { deleted };
    let _ = writeln!(out, "{folder}: {verb} {n} segments ({} bytes); policy: {}", plan.deleted_bytes(), opts.policy);
    if let Some(f) = &plan.floor {
        let _ = writeln!(out, "  floor {} ({})", f.lsn, f.source);
    }
    type Pick = fn(&KeepReason) -> bool;
    let reasons: [(&str, Pick); 5] = [
        ("newest segment of its timeline", |w: &KeepReason| matches!(w, KeepReason::Newest)),
        ("within the policy", |w: &KeepReason| matches!(w, KeepReason::Policy)),
        ("at or after the floor", |w: &KeepReason| matches!(w, KeepReason::Floor(_))),
        ("history files (never deleted)", |w: &KeepReason| matches!(w, KeepReason::History)),
        (".partial / not WAL", |w: &KeepReason| matches!(w, KeepReason::Partial | KeepReason::NotWal)),
    ];
    for (label, pick) in reasons {
        let mut names: Vec<&str> = plan.keep.iter().filter(|k| pick(&k.why)).map(|k| k.name.as_str()).collect();
        names.sort_unstable();
        if let (Some(first), Some(last)) = (names.first(), names.last()) {
            let range = if first == last { first.to_string() } else { format!("{first} .. {last}") };
            let _ = writeln!(out, "  keeps {} {label}: {range}", names.len());
        }
    }
}
