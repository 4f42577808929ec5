//! Reads durable WAL for a standby from the receiver's directory: `NAME` or `NAME.partial` of a
//! timeline's segment (the receiver renames the one to the other when the segment completes; an
//! open file survives the rename), with pread, each page header checked against its position
//! before it is sent.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::proto::{sqlstate, PgError};
use crate::wal::{validate_page, Lsn, WalFileName, WalIdentity, LONG_PAGE_HEADER_LEN, SHORT_PAGE_HEADER_LEN};

/// The segment file a standby reads, kept open between messages.
#[derive(Debug)]
pub struct WalFiles {
    dir: PathBuf,
    open: Option<(u32, u64, File, PathBuf)>,
}

impl WalFiles {
    pub fn new(dir: &Path) -> WalFiles {
        WalFiles { dir: dir.to_path_buf(), open: None }
    }

    /// Opens segment `segno` of timeline `tli` (complete or `.partial`); None when neither exists.
    fn open_segment(&self, tli: u32, segno: u64, seg_size: u64) -> io::Result<Option<(File, PathBuf)>> {
        let full = self.dir.join(WalFileName::Segment { tli, segno }.file_name(seg_size));
        let partial = self.dir.join(WalFileName::Partial { tli, segno }.file_name(seg_size));
        // The complete name again last: the .partial may have been renamed between the two tries.
        for path in [&full, &partial, &full] {
            match File::open(path) {
                Ok(f) => return Ok(Some((f, path.clone()))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Whether segment `segno` of one of `tlis` is in the directory (the first that is, is used).
    pub fn check_present(&mut self, tlis: &[u32], segno: u64, id: &WalIdentity) -> Result<(), PgError> {
        self.file(tlis, segno, id).map(|_| ())
    }

    fn file(&mut self, tlis: &[u32], segno: u64, id: &WalIdentity) -> Result<(&File, &Path, u32), PgError> {
        let hit = matches!(&self.open, Some((t, s, _, _)) if *s == segno && tlis.contains(t));
        if !hit {
            self.open = None;
            for &tli in tlis {
                let opened = self.open_segment(tli, segno, id.seg_size).map_err(|e| {
                    PgError::error(sqlstate::IO_ERROR, format!("could not open WAL segment {} of timeline {tli}: {e}", WalFileName::Segment { tli, segno }.file_name(id.seg_size)))
                })?;
                if let Some((f, path)) = opened {
                    self.open = Some((tli, segno, f, path));
                    break;
                }
            }
        }
        match &self.open {
            Some((tli, _, f, path)) => Ok((f, path.as_path(), *tli)),
            None => {
                let name = WalFileName::Segment { tli: tlis[0], segno }.file_name(id.seg_size);
                Err(PgError::error(sqlstate::UNDEFINED_FILE, format!("requested WAL segment {name} has already been removed")))
            }
        }
    }

    /// Fills `buf` with the WAL at `lsn` (all within one segment), from the first of `tlis`
    /// whose file holds the segment, and checks every page header that starts in it.
    pub fn read(&mut self, tlis: &[u32], lsn: Lsn, buf: &mut [u8], id: &WalIdentity) -> Result<(), PgError> {
        let segno = lsn.segno(id.seg_size);
        let offset = lsn.segment_offset(id.seg_size);
        debug_assert!(offset + buf.len() as u64 <= id.seg_size, "a read stays in its segment");
        let (file, path, tli) = self.file(tlis, segno, id)?;
        file.read_exact_at(buf, offset).map_err(|e| {
            PgError::error(sqlstate::IO_ERROR, format!("could not read {} bytes at offset {offset} of {}: {e}", buf.len(), path.display()))
        })?;
        check_pages(buf, lsn, &WalIdentity { tli, ..*id }).map_err(|why| {
            PgError::error(sqlstate::INTERNAL_ERROR, format!("the WAL at {lsn} in {} is not valid for its position: {why}; nothing of it was sent", path.display()))
        })
    }
}

/// Every page header starting inside `bytes` (at `lsn`) must belong to its position. A header of
/// zeros is accepted: the padding after an `XLOG_SWITCH` may hold pages PostgreSQL never wrote,
/// and the receiver verified every page on the way in.
fn check_pages(bytes: &[u8], lsn: Lsn, id: &WalIdentity) -> Result<(), String> {
    let end = lsn + bytes.len() as u64;
    let mut page = Lsn(lsn.0.div_ceil(id.block_size) * id.block_size);
    while page < end {
        let header_len = if page.0 % id.seg_size == 0 { LONG_PAGE_HEADER_LEN } else { SHORT_PAGE_HEADER_LEN };
        let at = (page - lsn) as usize;
        let header = &bytes[at..(at + header_len).min(bytes.len())];
        if header.len() == header_len && header.iter().any(|&b| b != 0) {
            validate_page(&bytes[at..], page, id).map_err(|e| e.to_string())?;
        }
        page = page + id.block_size;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::gen::{generate, GenOptions};

    #[test]
    fn reads_complete_and_partial_segments_and_names_a_missing_one_as_a_primary_does() {
        let dir = tempfile::tempdir().unwrap();
        let opts = GenOptions { dir: dir.path().to_path_buf(), wal_bytes: 1 << 20, ..GenOptions::default() };
        generate(&opts).unwrap();
        let id = opts.identity();
        let first = opts.start_segno;
        let name = WalFileName::Segment { tli: id.tli, segno: first }.file_name(id.seg_size);
        let bytes = std::fs::read(dir.path().join(&name)).unwrap();
        let mut files = WalFiles::new(dir.path());
        let lsn = Lsn(first * id.seg_size + 8000);
        let mut buf = vec![0u8; 20_000];
        files.read(&[id.tli], lsn, &mut buf, &id).unwrap();
        assert_eq!(&buf[..], &bytes[8000..28_000]);
        // Renamed to .partial behind the open file: a fresh reader finds it under that name.
        std::fs::rename(dir.path().join(&name), dir.path().join(format!("{name}.partial"))).unwrap();
        let mut files = WalFiles::new(dir.path());
        files.read(&[id.tli], lsn, &mut buf, &id).unwrap();
        assert_eq!(&buf[..], &bytes[8000..28_000]);
        // A segment that is not there: PostgreSQL's error and SQLSTATE.
        let e = files.read(&[id.tli], Lsn((first + 1000) * id.seg_size), &mut buf, &id).unwrap_err();
        assert_eq!(e.code, sqlstate::UNDEFINED_FILE);
        assert!(e.message.starts_with("requested WAL segment 0000000") && e.message.ends_with("has already been removed"), "{}", e.message);
        // A page that does not belong where it is read (another position) is refused.
        let mut wrong = bytes.clone();
        wrong[8192 + 8] ^= 0xFF; // xlp_pageaddr of the second page
        std::fs::write(dir.path().join(format!("{name}.partial")), &wrong).unwrap();
        let mut files = WalFiles::new(dir.path());
        let e = files.read(&[id.tli], lsn, &mut buf, &id).unwrap_err();
        assert!(e.message.contains("not valid for its position"), "{}", e.message);
    }
}
