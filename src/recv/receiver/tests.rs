//! Tests of the receiver state machine.
