//! Property tests: no input panics the decoder, and keys round-trip through an independent
//! encoder.

use kvtier_proto::{IpcKey, Op, RequestFrames, decode_op, decode_request};
use proptest::prelude::*;

use crate::common::{Enc, Entry, junk_entries, map_of, refs, valid_frames};

fn any_op() -> impl Strategy<Value = Op> {
    prop::sample::select(Op::ALL.to_vec())
}

/// Runs the full server-side decode pipeline; only the absence of panics matters.
fn decode_all(op: Op, frames: &[Vec<u8>]) {
    let _ = decode_request(op, &refs(frames));
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { pos: usize, xor: u8 },
    Set { pos: usize, byte: u8 },
    Insert { pos: usize, byte: u8 },
    Delete { pos: usize },
    Truncate { pos: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(pos, xor)| Mutation::Flip { pos, xor }),
        (
            any::<usize>(),
            prop::sample::select(vec![
                0xc0u8, 0xc1, 0xc4, 0xc7, 0xc9, 0xcf, 0xd3, 0xd4, 0xdb, 0xdc, 0xdd, 0xde, 0xdf,
                0xff, 0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf,
            ])
        )
            .prop_map(|(pos, byte)| Mutation::Set { pos, byte }),
        (any::<usize>(), any::<u8>()).prop_map(|(pos, byte)| Mutation::Insert { pos, byte }),
        any::<usize>().prop_map(|pos| Mutation::Delete { pos }),
        any::<usize>().prop_map(|pos| Mutation::Truncate { pos }),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    let len = frame.len();
    match *m {
        Mutation::Flip { pos, xor } if len > 0 => frame[pos % len] ^= xor,
        Mutation::Set { pos, byte } if len > 0 => frame[pos % len] = byte,
        Mutation::Insert { pos, byte } => frame.insert(pos % (len + 1), byte),
        Mutation::Delete { pos } if len > 0 => {
            frame.remove(pos % len);
        }
        Mutation::Truncate { pos } => frame.truncate(pos % (len + 1)),
        _ => {}
    }
}

/// A valid key with arbitrary contents.
fn key_strategy() -> impl Strategy<Value = IpcKey> {
    (
        any::<String>(),
        1u32..=255,
        prop::option::of(any::<u32>()),
        prop::collection::vec(any::<u32>(), 0..300),
        (any::<usize>(), any::<usize>()),
        any::<String>(),
        "[^@/\\\\\u{0}]{0,128}",
        any::<u32>(),
    )
        .prop_map(
            |(model_name, world_size, worker, token_ids, (a, b), request_id, salt, readers)| {
                let len = token_ids.len() + 1;
                let (a, b) = (a % len, b % len);
                IpcKey {
                    model_name,
                    world_size,
                    worker_id: worker.map(|w| w % world_size),
                    start: a.min(b) as u64,
                    end: a.max(b) as u64,
                    token_ids: token_ids.into(),
                    request_id,
                    cache_salt: salt,
                    num_kv_readers: readers,
                }
            },
        )
}

/// Independent encoder of a key, as map entries; `wide` uses 8-byte int forms throughout.
fn key_entries(k: &IpcKey, wide: bool) -> Vec<Entry> {
    let int = |e: &mut Enc, v: u64| {
        if wide {
            e.wide_u64(v);
        } else {
            e.uint(v);
        }
    };
    let one = |key: &str, build: &dyn Fn(&mut Enc)| {
        let mut e = Enc::new();
        build(&mut e);
        (key.to_owned(), e.done())
    };
    vec![
        one("model_name", &|e| {
            e.str(&k.model_name);
        }),
        one("world_size", &|e| int(e, u64::from(k.world_size))),
        one("worker_id", &|e| match k.worker_id {
            Some(w) => int(e, u64::from(w)),
            None => {
                e.nil();
            }
        }),
        one("token_ids", &|e| {
            e.arr(u32::try_from(k.token_ids.len()).expect("small"));
            for &t in &k.token_ids {
                int(e, u64::from(t));
            }
        }),
        one("start", &|e| int(e, k.start)),
        one("end", &|e| int(e, k.end)),
        one("request_id", &|e| {
            e.str(&k.request_id);
        }),
        one("cache_salt", &|e| {
            e.str(&k.cache_salt);
        }),
        one("request_configs", &|e| {
            e.nil();
        }),
        one("num_kv_readers", &|e| int(e, u64::from(k.num_kv_readers))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn decode_op_never_panics(frame in prop::collection::vec(any::<u8>(), 0..48)) {
        let _ = decode_op(&frame);
    }

    #[test]
    fn random_frames_never_panic(
        op in any_op(),
        frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..9),
    ) {
        decode_all(op, &frames);
        // Also at the right arity, so the payload decoders see random bytes.
        let mut exact = frames;
        exact.resize(op.arity(), vec![0xc0]);
        decode_all(op, &exact);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        op in any_op(),
        which in any::<usize>(),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let mut frames = valid_frames(op);
        if !frames.is_empty() {
            let i = which % frames.len();
            for m in &mutations {
                apply(&mut frames[i], m);
            }
        }
        decode_all(op, &frames);
    }

    #[test]
    fn random_multipart_messages_never_panic(
        frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 0..8),
    ) {
        let refs = refs(&frames);
        if let Ok(msg) = RequestFrames::parse(&refs) {
            let _ = msg.stream_control();
            if let Ok(op) = decode_op(msg.op_frame) {
                let _ = decode_request(op, msg.payloads);
            }
        }
    }

    #[test]
    fn key_round_trips(
        key in key_strategy(),
        wide in any::<bool>(),
        junk in any::<bool>(),
        order in Just((0..10usize).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        let entries = key_entries(&key, wide);
        let mut shuffled: Vec<Entry> = order.iter().map(|&i| entries[i].clone()).collect();
        if junk {
            shuffled.splice(3..3, junk_entries());
        }
        let bytes = map_of(&shuffled);
        prop_assert_eq!(IpcKey::decode(&bytes), Ok(key));
    }

    #[test]
    fn mutated_keys_never_panic(
        key in key_strategy(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = map_of(&key_entries(&key, false));
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let _ = IpcKey::decode(&bytes);
    }
}
