//! Byte-exact vectors taken from the LMCache reference observations.

use kvtier_proto::response::{encode_int, encode_prepare_store};
use kvtier_proto::{IpcKey, Path};
use kvtier_proto::{Op, ProtoError, Reader, Request, Slot, decode_op, decode_request, decode_uid};

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn get_chunk_size_op_frame() {
    let op = decode_op(&[0x15]).expect("op");
    assert_eq!(op, Op::GetChunkSize);
    assert_eq!(decode_request(op, &[]), Ok(Request::GetChunkSize));
}

#[test]
fn cb_reorder_plan_str_op_frame() {
    let frame = unhex("af63625f72656f726465725f706c616e");
    assert_eq!(decode_op(&frame), Ok(Op::CbReorderPlan));
    assert_eq!(Op::CbReorderPlan.legacy_id(), None);
}

#[test]
fn uid_and_int_256() {
    assert_eq!(decode_uid(&unhex("cd0100")), Ok(256));
    assert_eq!(encode_int(256), unhex("cd0100"));
}

/// The 0.4.1 key example (architecture §1.4), with `end` adapted to the 3-token sequence.
/// It lacks cache_salt / request_configs / num_kv_readers and carries an extra chunk_hash.
#[test]
fn v041_key_map_decodes_with_defaults() {
    let hex_with_end = |end: &str| {
        format!(
            "88 aa{} a16d aa{} 02 a9{} c0 a9{} 93010203 a5{} 00 a3{} {end} aa{} a4{} aa{} c0",
            hex("model_name"),
            hex("world_size"),
            hex("worker_id"),
            hex("token_ids"),
            hex("start"),
            hex("end"),
            hex("request_id"),
            hex("req1"),
            hex("chunk_hash"),
        )
    };
    let adapted = unhex(&hex_with_end("03"));
    let key = IpcKey::decode(&adapted).expect("decodes");
    assert_eq!(
        key,
        IpcKey {
            model_name: "m".into(),
            world_size: 2,
            worker_id: None,
            token_ids: vec![1, 2, 3].into(),
            start: 0,
            end: 3,
            request_id: "req1".into(),
            cache_salt: String::new(),
            num_kv_readers: 0,
        }
    );

    // Verbatim (end = 256 over 3 tokens): decoded as sent; lookups clamp `end` to the tokens
    // (as LMCache does) and transfers refuse it, both in the server.
    let verbatim = unhex(&hex_with_end("cd0100"));
    let key = IpcKey::decode(&verbatim).expect("end > len decodes");
    assert_eq!(key.end, 256);
    assert_eq!(key.range(), 0..3);
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn prepare_store_response_bytes_and_round_trip() {
    let slots = vec![
        Slot {
            offset: 0,
            length: 16384,
            shape: vec![2, 2, 16, 128],
            dtype: "float16".into(),
        },
        Slot {
            offset: 16384,
            length: 16384,
            shape: vec![2, 2, 16, 128],
            dtype: "float16".into(),
        },
    ];
    let bytes = encode_prepare_store(&slots, &[2, 3]);

    // Golden prefix: {"context": {"slots": [{"offset": 0, "length": 16384, ...
    let prefix = unhex(&format!(
        "81 a7{} 82 a5{} 92 84 a6{} 00 a6{} cd4000 a5{} 94 02 02 10 cc80 a5{} a7{}",
        hex("context"),
        hex("slots"),
        hex("offset"),
        hex("length"),
        hex("shape"),
        hex("dtype"),
        hex("float16"),
    ));
    assert!(bytes.starts_with(&prefix), "{bytes:02x?}");
    assert!(bytes.ends_with(&unhex(&format!("ad{} 92 02 03", hex("chunk_indices")))));

    // Round trip through a decoder written with the crate's Reader.
    let (got_slots, got_indices) = decode_prepare_store(&bytes).expect("decodes");
    assert_eq!(got_slots, slots);
    assert_eq!(got_indices, vec![2, 3]);
}

/// Client-side decoding of `{"context": {"slots": [...], "chunk_indices": [...]}}`.
fn decode_prepare_store(bytes: &[u8]) -> Result<(Vec<Slot>, Vec<u64>), ProtoError> {
    let root = Path::Root("response");
    let mut r = Reader::new(bytes);
    let mut slots = Vec::new();
    let mut indices = Vec::new();
    r.read_struct(&root, |r, k| {
        if k != "context" {
            return Ok(false);
        }
        let ctx = root.field("context");
        r.read_struct(&ctx, |r, k| match k {
            "slots" => {
                slots = r.read_array(&ctx.field("slots"), |r, p| {
                    let mut slot = Slot {
                        offset: 0,
                        length: 0,
                        shape: Vec::new(),
                        dtype: String::new(),
                    };
                    r.read_struct(p, |r, k| {
                        match k {
                            "offset" => slot.offset = r.read_u64(p)?,
                            "length" => slot.length = r.read_u64(p)?,
                            "shape" => slot.shape = r.read_u64_array(p)?,
                            "dtype" => slot.dtype = r.read_str(p)?.to_owned(),
                            _ => return Ok(false),
                        }
                        Ok(true)
                    })?;
                    Ok(slot)
                })?;
                Ok(true)
            }
            "chunk_indices" => {
                indices = r.read_u64_array(&ctx.field("chunk_indices"))?;
                Ok(true)
            }
            _ => Ok(false),
        })?;
        Ok(true)
    })?;
    r.finish(&root)?;
    Ok((slots, indices))
}
