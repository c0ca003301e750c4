//! LMCache 0.5.6 multiprocess wire protocol.
