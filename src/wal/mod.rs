//! WAL domain: LSNs, segment names, page headers, record walk.
