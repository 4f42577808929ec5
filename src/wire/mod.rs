//! Wire protocol: frames between sender and receiver.
