//! `global/pg_control`: the few fields of PostgreSQL's `ControlFileData` walship reads — the
//! cluster state (did it shut down cleanly?), the latest checkpoint location and the system
//! identifier. The leading fields have the same layout in PostgreSQL 12 through 18.

use super::Lsn;

/// `DBState` in pg_control.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    Startup,
    ShutDown,
    ShutDownInRecovery,
    ShuttingDown,
    InCrashRecovery,
    InArchiveRecovery,
    InProduction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlData {
    pub system_id: u64,
    pub control_version: u32,
    pub state: ClusterState,
    /// Start of the latest checkpoint record.
    pub checkpoint: Lsn,
    /// Its redo pointer.
    pub redo: Lsn,
    pub timeline: u32,
}

impl ControlData {
    /// The cluster was stopped cleanly: its WAL ends with the shutdown checkpoint.
    pub fn is_shut_down(&self) -> bool {
        matches!(self.state, ClusterState::ShutDown | ClusterState::ShutDownInRecovery)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("pg_control is {found} bytes, expected at least {expected}")]
    Truncated { found: usize, expected: usize },
    #[error("pg_control version {found} is not one walship knows (expected 1100..=1899)")]
    UnknownVersion { found: u32 },
    #[error("pg_control state {found} is not a known DBState (0..=6)")]
    UnknownState { found: u32 },
}

const SYSID_OFF: usize = 0;
const VERSION_OFF: usize = 8;
const STATE_OFF: usize = 16;
const CHECKPOINT_OFF: usize = 32;
const REDO_OFF: usize = 40;
const TLI_OFF: usize = 48;
const LEN_MIN: usize = 52;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl ControlData {
    pub fn parse(bytes: &[u8]) -> Result<ControlData, ControlError> {
        if bytes.len() < LEN_MIN {
            return Err(ControlError::Truncated { found: bytes.len(), expected: LEN_MIN });
        }
        let control_version = u32_at(bytes, VERSION_OFF);
        if !(1100..=1899).contains(&control_version) {
            return Err(ControlError::UnknownVersion { found: control_version });
        }
        let state = match u32_at(bytes, STATE_OFF) {
            0 => ClusterState::Startup,
            1 => ClusterState::ShutDown,
            2 => ClusterState::ShutDownInRecovery,
            3 => ClusterState::ShuttingDown,
            4 => ClusterState::InCrashRecovery,
            5 => ClusterState::InArchiveRecovery,
            6 => ClusterState::InProduction,
            found => return Err(ControlError::UnknownState { found }),
        };
        Ok(ControlData {
            system_id: u64_at(bytes, SYSID_OFF),
            control_version,
            state,
            checkpoint: Lsn(u64_at(bytes, CHECKPOINT_OFF)),
            redo: Lsn(u64_at(bytes, REDO_OFF)),
            timeline: u32_at(bytes, TLI_OFF),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(state: u32) -> Vec<u8> {
        let mut b = vec![0u8; 296];
        b[0..8].copy_from_slice(&7_000_000_000_000_000_001u64.to_le_bytes());
        b[8..12].copy_from_slice(&1300u32.to_le_bytes());
        b[16..20].copy_from_slice(&state.to_le_bytes());
        b[32..40].copy_from_slice(&0x0DC7_7C18u64.to_le_bytes());
        b[40..48].copy_from_slice(&0x0DC7_7C18u64.to_le_bytes());
        b[48..52].copy_from_slice(&1u32.to_le_bytes());
        b
    }

    #[test]
    fn parses_the_leading_fields() {
        let c = ControlData::parse(&sample(1)).unwrap();
        assert!(c.is_shut_down());
        assert_eq!(c.checkpoint, Lsn(0x0DC7_7C18));
        assert_eq!(c.timeline, 1);
        assert!(!ControlData::parse(&sample(6)).unwrap().is_shut_down());
        assert!(matches!(ControlData::parse(&sample(9)), Err(ControlError::UnknownState { found: 9 })));
        assert!(matches!(ControlData::parse(&[0u8; 10]), Err(ControlError::Truncated { .. })));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = ControlData::parse(&bytes);
        }
    }
}
