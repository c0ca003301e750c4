//! The LMCache 0.5.6 operation table and op-frame decoding.
//!
//! Invariants:
//! - [`Op::ALL`] lists every operation of the 0.5.6 table exactly once (35 entries): the 32
//!   operations with a frozen legacy id (1–10, 12–33; id 11 is retired and decodes as unknown)
//!   and the three string-only operations `cb_reorder_plan`, `subscribe_kv_events` and
//!   `server_module_call`.
//! - `from_legacy_id(legacy_id())` and `from_name(name())` are the identity for every op.
//! - The op frame is one msgpack document: an int (legacy id) or a str (operation name). The
//!   server accepts either form for every op, so `"store"` and `6` both decode to [`Op::Store`].
//!   Any other msgpack type, a truncated value or trailing bytes are decode errors; a well-formed
//!   id or name that matches nothing is [`ProtoError::UnknownOp`].
//! - [`Op::arity`] is the exact number of payload frames the client sends (it always fills in
//!   defaults), and [`Op::scheduling`] mirrors the reference server's handler registration.

use std::fmt;

use rmp::Marker;

use crate::error::ProtoError;
use crate::reader::{Path, Reader};

/// Where the reference server runs an operation's handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheduling {
    /// Inline on the socket poll thread (`HandlerType.SYNC`); must be fast.
    Sync,
    /// On the general worker pool (`BLOCKING`, `--max-cpu-workers`).
    Normal,
    /// On the affinity pool keyed by the client identity (`BLOCKING` with client affinity,
    /// `--max-gpu-workers`): requests from one client run in order on one worker.
    Affinity,
}

macro_rules! ops {
    ($( $variant:ident = $name:literal, $id:expr, $arity:literal, $sched:ident; )*) => {
        /// One operation of the LMCache 0.5.6 multiprocess RPC table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Op {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant,
            )*
        }

        impl Op {
            /// Every operation, in table order.
            pub const ALL: [Op; 35] = [$(Op::$variant,)*];

            /// The operation name, as sent in a str op frame.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self { $(Op::$variant => $name,)* }
            }

            /// The frozen legacy wire id, or `None` for string-only operations.
            #[must_use]
            pub const fn legacy_id(self) -> Option<u8> {
                match self { $(Op::$variant => $id,)* }
            }

            /// Number of payload frames after the op frame.
            #[must_use]
            pub const fn arity(self) -> usize {
                match self { $(Op::$variant => $arity,)* }
            }

            /// Where the reference server schedules the handler.
            #[must_use]
            pub const fn scheduling(self) -> Scheduling {
                match self { $(Op::$variant => Scheduling::$sched,)* }
            }

            /// The operation with this exact name.
            #[must_use]
            pub fn from_name(name: &str) -> Option<Op> {
                match name {
                    $($name => Some(Op::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

ops! {
    RegisterKvCache = "register_kv_cache", Some(1), 7, Sync;
    UnregisterKvCache = "unregister_kv_cache", Some(2), 1, Sync;
    RegisterQCache = "register_q_cache", Some(3), 7, Sync;
    UnregisterQCache = "unregister_q_cache", Some(4), 1, Sync;
    StoreQ = "store_q", Some(5), 4, Affinity;
    Store = "store", Some(6), 4, Affinity;
    Retrieve = "retrieve", Some(7), 5, Affinity;
    Lookup = "lookup", Some(8), 2, Normal;
    QueryPrefetchStatus = "query_prefetch_status", Some(9), 1, Normal;
    WaitPrefetchStatus = "wait_prefetch_status", Some(10), 2, Normal;
    FreeLookupLocks = "free_lookup_locks", Some(12), 2, Normal;
    EndSession = "end_session", Some(13), 1, Normal;
    RegisterKvCacheEngineDrivenContext = "register_kv_cache_engine_driven_context", Some(14), 1, Sync;
    UnregisterKvCacheEngineDrivenContext = "unregister_kv_cache_engine_driven_context", Some(15), 1, Sync;
    PrepareStore = "prepare_store", Some(16), 2, Affinity;
    CommitStore = "commit_store", Some(17), 3, Affinity;
    PrepareRetrieve = "prepare_retrieve", Some(18), 2, Affinity;
    CommitRetrieve = "commit_retrieve", Some(19), 2, Affinity;
    Clear = "clear", Some(20), 1, Normal;
    GetChunkSize = "get_chunk_size", Some(21), 0, Sync;
    Ping = "ping", Some(22), 1, Normal;
    ReportBlockAllocation = "report_block_allocation", Some(23), 3, Normal;
    Noop = "noop", Some(24), 0, Sync;
    CbRegisterRope = "cb_register_rope", Some(25), 8, Sync;
    CbUnregisterRope = "cb_unregister_rope", Some(26), 1, Sync;
    CbRetrievePreComputed = "cb_retrieve_pre_computed", Some(27), 5, Affinity;
    CbUnifiedLookup = "cb_unified_lookup", Some(28), 2, Normal;
    P2pLookupAndLock = "p2p_lookup_and_lock", Some(29), 2, Normal;
    P2pQueryLookupResults = "p2p_query_lookup_results", Some(30), 1, Normal;
    P2pUnlockObjects = "p2p_unlock_objects", Some(31), 1, Normal;
    GetExperimental = "get_experimental", Some(32), 0, Sync;
    CbProtocolHandshake = "cb_protocol_handshake", Some(33), 1, Sync;
    CbReorderPlan = "cb_reorder_plan", None, 3, Normal;
    SubscribeKvEvents = "subscribe_kv_events", None, 4, Sync;
    ServerModuleCall = "server_module_call", None, 1, Normal;
}

/// Legacy id 11 (`query_prefetch_lookup_hits`) was retired before 0.5.6.
const RETIRED_LEGACY_ID: u64 = 11;

impl Op {
    /// Whether the reply is a stream of messages ended by a bare reply (only
    /// `subscribe_kv_events`), driven by `ack`/`cancel` control frames (see [`crate::frame`]).
    #[must_use]
    pub const fn is_stream(self) -> bool {
        matches!(self, Op::SubscribeKvEvents)
    }

    /// The operation with this legacy wire id; `None` for 0, 11 (retired) and anything > 33.
    #[must_use]
    pub fn from_legacy_id(id: u64) -> Option<Op> {
        Op::ALL
            .iter()
            .copied()
            .find(|op| op.legacy_id().map(u64::from) == Some(id))
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Longest op name echoed back in an [`ProtoError::UnknownOp`] description.
const MAX_ECHOED_NAME: usize = 64;

/// Decodes an op frame: one msgpack int (legacy id) or str (operation name), nothing after it.
///
/// # Errors
/// [`ProtoError::UnknownOp`] for a well-formed id or name that matches no operation;
/// [`ProtoError::Decode`] for any other msgpack type or a truncated frame;
/// [`ProtoError::TrailingBytes`] when the frame holds more than one document.
pub fn decode_op(frame: &[u8]) -> Result<Op, ProtoError> {
    let path = Path::Root("op");
    let mut r = Reader::new(frame);
    let op = match r.peek_marker(&path)? {
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
            let name = r.read_str(&path)?;
            r.finish(&path)?;
            Op::from_name(name).ok_or_else(|| {
                let shown: String = name.chars().take(MAX_ECHOED_NAME).collect();
                ProtoError::UnknownOp(format!("name {shown:?}"))
            })?
        }
        _ => {
            let id = r.read_int(&path)?;
            r.finish(&path)?;
            u64::try_from(id)
                .ok()
                .and_then(Op::from_legacy_id)
                .ok_or_else(|| {
                    if id == i128::from(RETIRED_LEGACY_ID) {
                        ProtoError::UnknownOp(format!(
                            "legacy id {id} (retired query_prefetch_lookup_hits)"
                        ))
                    } else {
                        ProtoError::UnknownOp(format!("legacy id {id}"))
                    }
                })?
        }
    };
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        let mut ids = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for op in Op::ALL {
            assert!(names.insert(op.name()), "duplicate name {op}");
            assert_eq!(Op::from_name(op.name()), Some(op));
            if let Some(id) = op.legacy_id() {
                assert!(ids.insert(id), "duplicate id {id}");
                assert_eq!(Op::from_legacy_id(u64::from(id)), Some(op));
            }
        }
        assert_eq!(ids.len(), 32);
        assert_eq!(Op::from_legacy_id(11), None);
        assert_eq!(Op::from_legacy_id(0), None);
        assert_eq!(Op::from_legacy_id(34), None);
    }

    #[test]
    fn scheduling_matches_table() {
        use Scheduling::*;
        let sync = [
            Op::RegisterKvCache,
            Op::UnregisterKvCache,
            Op::RegisterQCache,
            Op::UnregisterQCache,
            Op::RegisterKvCacheEngineDrivenContext,
            Op::UnregisterKvCacheEngineDrivenContext,
            Op::GetChunkSize,
            Op::Noop,
            Op::GetExperimental,
            Op::CbRegisterRope,
            Op::CbUnregisterRope,
            Op::CbProtocolHandshake,
            Op::SubscribeKvEvents,
        ];
        let affinity = [
            Op::StoreQ,
            Op::Store,
            Op::Retrieve,
            Op::PrepareStore,
            Op::CommitStore,
            Op::PrepareRetrieve,
            Op::CommitRetrieve,
            Op::CbRetrievePreComputed,
        ];
        for op in Op::ALL {
            let want = if sync.contains(&op) {
                Sync
            } else if affinity.contains(&op) {
                Affinity
            } else {
                Normal
            };
            assert_eq!(op.scheduling(), want, "{op}");
        }
    }

    #[test]
    fn decode_op_forms() {
        assert_eq!(decode_op(&[0x15]), Ok(Op::GetChunkSize));
        assert_eq!(decode_op(&[0x10]), Ok(Op::PrepareStore));
        // "store" as a str also works.
        assert_eq!(decode_op(b"\xa5store"), Ok(Op::Store));
        // uint16 form of a small id is still an int.
        assert_eq!(decode_op(&[0xcd, 0x00, 0x06]), Ok(Op::Store));
        assert!(
            matches!(decode_op(&[0x0b]), Err(ProtoError::UnknownOp(d)) if d.contains("retired"))
        );
        assert!(matches!(decode_op(&[0x63]), Err(ProtoError::UnknownOp(_))));
        assert!(matches!(decode_op(&[0xff]), Err(ProtoError::UnknownOp(_))));
        assert!(
            matches!(decode_op(b"\xaano_such_op"), Err(ProtoError::UnknownOp(d)) if d.contains("no_such_op"))
        );
        assert!(matches!(
            decode_op(&[0x15, 0x00]),
            Err(ProtoError::TrailingBytes { .. })
        ));
        assert!(matches!(decode_op(&[]), Err(ProtoError::Decode { .. })));
        assert!(matches!(decode_op(&[0xc3]), Err(ProtoError::Decode { .. })));
        // bin is not str.
        assert!(matches!(
            decode_op(b"\xc4\x05store"),
            Err(ProtoError::Decode { .. })
        ));
    }
}
