//! Typed decoding of hand-built msgpack payloads.

use kvtier_proto::{
    BlockAllocationRecord, DeviceIpcWrapper, EngineGroupInfo, IpcKey, Op, ProtoError,
    RegisterEngineDrivenContext, Request, decode_request,
};

use crate::common::{
    Enc, KeyFields, cpu_shm_wrapper, enc, engine_driven_payload, entry, junk_entries, map_of, refs,
    valid_frames, with, without,
};

fn decode_key(bytes: &[u8]) -> Result<IpcKey, ProtoError> {
    IpcKey::decode(bytes)
}

fn err_string(result: Result<impl std::fmt::Debug, ProtoError>) -> String {
    result.expect_err("must fail").to_string()
}

fn int(v: i64) -> Vec<u8> {
    enc(|e| {
        e.int(v);
    })
}

fn decode(op: Op, frames: &[Vec<u8>]) -> Result<Request, ProtoError> {
    decode_request(op, &refs(frames))
}

// ---------------------------------------------------------------------------------------------
// IpcKey

#[test]
fn key_full_decode() {
    let mut f = KeyFields::simple(4);
    f.world_size = 4;
    f.worker_id = Some(3);
    f.start = 1;
    f.end = 3;
    f.cache_salt = "tenant-ä".into();
    f.num_kv_readers = 2;
    let key = decode_key(&f.encode()).expect("decodes");
    assert_eq!(
        key,
        IpcKey {
            model_name: "m".into(),
            world_size: 4,
            worker_id: Some(3),
            token_ids: vec![0, 1, 2, 3].into(),
            start: 1,
            end: 3,
            request_id: "req1".into(),
            cache_salt: "tenant-ä".into(),
            num_kv_readers: 2,
        }
    );
    assert_eq!(key.range(), 1..3);
}

#[test]
fn key_unknown_keys_of_every_type_are_ignored_and_order_is_irrelevant() {
    let f = KeyFields::simple(3);
    let want = decode_key(&f.encode()).expect("baseline");
    let mut entries = f.entries();
    // Interleave junk between real fields, then reverse the whole thing.
    let junk = junk_entries();
    let mut mixed = Vec::new();
    for (i, e) in entries.drain(..).enumerate() {
        mixed.push(e);
        if let Some(j) = junk.get(i) {
            mixed.push(j.clone());
        }
    }
    mixed.extend(junk.iter().skip(10).cloned());
    assert_eq!(decode_key(&map_of(&mixed)), Ok(want.clone()));
    mixed.reverse();
    assert_eq!(decode_key(&map_of(&mixed)), Ok(want));
}

#[test]
fn key_missing_required_fields_are_named() {
    for field in [
        "model_name",
        "world_size",
        "worker_id",
        "token_ids",
        "start",
        "end",
        "request_id",
    ] {
        let bytes = map_of(&without(KeyFields::simple(2).entries(), field));
        assert_eq!(
            err_string(decode_key(&bytes)),
            format!("key.{field}: missing required field"),
        );
    }
    // The three defaulted fields may be missing.
    let mut entries = KeyFields::simple(2).entries();
    for field in ["cache_salt", "request_configs", "num_kv_readers"] {
        entries = without(entries, field);
    }
    let key = decode_key(&map_of(&entries)).expect("defaults");
    assert_eq!((key.cache_salt.as_str(), key.num_kv_readers), ("", 0));
}

#[test]
fn key_type_strictness() {
    let base = KeyFields::simple(2).entries();
    let bin_name = map_of(&with(base.clone(), "model_name", |e| {
        e.bin(b"m");
    }));
    assert_eq!(
        err_string(decode_key(&bin_name)),
        "key.model_name: expected str, found bin"
    );
    let bool_ws = map_of(&with(base.clone(), "world_size", |e| {
        e.bool(true);
    }));
    assert_eq!(
        err_string(decode_key(&bool_ws)),
        "key.world_size: expected int, found bool"
    );
    let float_start = map_of(&with(base.clone(), "start", |e| {
        e.f64(0.0);
    }));
    assert!(err_string(decode_key(&float_start)).starts_with("key.start: expected int"));
    let str_configs = map_of(&with(base.clone(), "request_configs", |e| {
        e.str("x");
    }));
    assert_eq!(
        err_string(decode_key(&str_configs)),
        "key.request_configs: expected map or nil, found str"
    );
    let map_configs = map_of(&with(base.clone(), "request_configs", |e| {
        e.map(2).str("a").arr(1).nil().str("b").ext(3, b"zz");
    }));
    assert!(decode_key(&map_configs).is_ok());
    // A struct is a map, never an array.
    let as_array = enc(|e| {
        e.arr(7)
            .str("m")
            .uint(1)
            .nil()
            .uints(&[1])
            .uint(0)
            .uint(1)
            .str("r");
    });
    assert_eq!(
        err_string(decode_key(&as_array)),
        "key: expected map, found array"
    );
    // Non-str map key.
    let int_key = enc(|e| {
        e.map(1).uint(1).uint(2);
    });
    assert_eq!(
        err_string(decode_key(&int_key)),
        "key: expected str map key, found int"
    );
}

#[test]
fn key_token_range_errors_name_index_and_value() {
    let base = KeyFields::simple(4).entries();
    let big = map_of(&with(base.clone(), "token_ids", |e| {
        e.arr(4).uint(1).uint(2).uint(3).uint(1 << 32);
    }));
    assert_eq!(
        err_string(decode_key(&big)),
        "key.token_ids[3]: value 4294967296 does not fit in u32"
    );
    let negative = map_of(&with(base.clone(), "token_ids", |e| {
        e.arr(4).uint(1).int(-1).uint(3).uint(4);
    }));
    assert_eq!(
        err_string(decode_key(&negative)),
        "key.token_ids[1]: value -1 does not fit in u32"
    );
    let max = map_of(&with(base, "token_ids", |e| {
        e.arr(4)
            .uint(0)
            .uint(1)
            .uint(2)
            .wide_u64(u64::from(u32::MAX));
    }));
    assert_eq!(
        decode_key(&max).expect("u32::MAX fits").token_ids[3],
        u32::MAX
    );
}

#[test]
fn key_semantic_range_checks() {
    let cases: Vec<(KeyFields, &str)> = vec![
        (
            KeyFields {
                world_size: 0,
                worker_id: None,
                ..KeyFields::simple(2)
            },
            "key.world_size: world_size must be in 1..=255, got 0",
        ),
        (
            KeyFields {
                world_size: 256,
                worker_id: None,
                ..KeyFields::simple(2)
            },
            "key.world_size: world_size must be in 1..=255, got 256",
        ),
        (
            KeyFields {
                world_size: 2,
                worker_id: Some(2),
                ..KeyFields::simple(2)
            },
            "key.worker_id: worker_id 2 must be < world_size 2",
        ),
        (
            KeyFields {
                start: 2,
                end: 1,
                ..KeyFields::simple(2)
            },
            "key.start: start 2 exceeds end 1",
        ),
        (
            KeyFields {
                cache_salt: "a@b".into(),
                ..KeyFields::simple(2)
            },
            "key.cache_salt: contains forbidden character '@'",
        ),
        (
            KeyFields {
                cache_salt: "a\0".into(),
                ..KeyFields::simple(2)
            },
            "key.cache_salt: contains forbidden character '\\0'",
        ),
        (
            KeyFields {
                cache_salt: "x".repeat(129),
                ..KeyFields::simple(2)
            },
            "key.cache_salt: longer than 128 characters",
        ),
    ];
    for (fields, want) in cases {
        assert_eq!(err_string(decode_key(&fields.encode())), want);
    }
    // 128 multi-byte characters are fine (chars, not bytes); start == end is fine.
    let ok = KeyFields {
        cache_salt: "é".repeat(128),
        start: 2,
        end: 2,
        ..KeyFields::simple(2)
    };
    assert!(decode_key(&ok.encode()).is_ok());
    let negative_readers = map_of(&with(
        KeyFields::simple(2).entries(),
        "num_kv_readers",
        |e| {
            e.int(-1);
        },
    ));
    assert_eq!(
        err_string(decode_key(&negative_readers)),
        "key.num_kv_readers: value -1 does not fit in u32"
    );
}

#[test]
fn key_duplicate_keys_last_wins() {
    let mut entries = KeyFields::simple(2).entries();
    entries.push(entry("model_name", |e| {
        e.str("second");
    }));
    assert_eq!(
        decode_key(&map_of(&entries)).expect("ok").model_name,
        "second"
    );
}

#[test]
fn key_trailing_bytes_and_truncation() {
    let mut bytes = KeyFields::simple(2).encode();
    bytes.push(0xc0);
    assert_eq!(
        decode_key(&bytes),
        Err(ProtoError::TrailingBytes { path: "key".into() })
    );
    bytes.pop();
    for cut in 0..bytes.len() {
        let err = decode_key(&bytes[..cut]).expect_err("truncated");
        assert_eq!(err.kind(), "decode", "cut at {cut}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

#[test]
fn every_op_decodes_its_valid_frames() {
    for op in Op::ALL {
        let frames = valid_frames(op);
        let req = decode(op, &frames).unwrap_or_else(|e| panic!("{op}: {e}"));
        assert_eq!(req.op(), op);
    }
}

#[test]
fn arity_mismatch_is_an_error() {
    for op in Op::ALL {
        let mut frames = valid_frames(op);
        frames.push(int(0));
        if op == Op::EndSession {
            // end_session(request_id, end_info) from newer clients: the extra frame is ignored.
            assert_eq!(
                decode(op, &frames),
                decode(op, &frames[..op.arity()]),
                "end_session ignores trailing frames"
            );
            assert!(decode(op, &frames).is_ok());
        } else {
            assert_eq!(
                decode(op, &frames),
                Err(ProtoError::Arity {
                    op,
                    expected: op.arity(),
                    got: op.arity() + 1
                })
            );
        }
        if op.arity() > 0 {
            frames.truncate(op.arity() - 1);
            let err = decode(op, &frames).expect_err("too few");
            assert_eq!(err.kind(), "arity");
        }
    }
}

#[test]
fn store_and_retrieve() {
    let req = decode(Op::Store, &valid_frames(Op::Store)).expect("store");
    let Request::Store {
        key,
        instance_id,
        block_ids,
        event_ipc_handle,
    } = req
    else {
        panic!("not a store: {req:?}");
    };
    assert_eq!(key.token_ids.len(), 8);
    assert_eq!(instance_id, 7);
    assert_eq!(block_ids, vec![vec![1, 2], vec![3]]);
    assert_eq!(event_ipc_handle, b"stub_ipc_handle");

    let mut frames = valid_frames(Op::Retrieve);
    frames[4] = int(256);
    let Ok(Request::Retrieve {
        skip_first_n_tokens,
        ..
    }) = decode(Op::Retrieve, &frames)
    else {
        panic!("retrieve");
    };
    assert_eq!(skip_first_n_tokens, 256);

    // str where bin expected.
    let mut frames = valid_frames(Op::Store);
    frames[3] = enc(|e| {
        e.str("stub_ipc_handle");
    });
    assert_eq!(
        err_string(decode(Op::Store, &frames)),
        "event_ipc_handle: expected bin, found str"
    );
    // Flat block ids are not list[list[int]].
    let mut frames = valid_frames(Op::Store);
    frames[2] = enc(|e| {
        e.uints(&[1, 2]);
    });
    assert_eq!(
        err_string(decode(Op::Store, &frames)),
        "block_ids[0]: expected array, found int"
    );
    // Trailing bytes in a scalar frame.
    let mut frames = valid_frames(Op::Store);
    frames[1] = vec![0x07, 0x00];
    assert_eq!(
        decode(Op::Store, &frames),
        Err(ProtoError::TrailingBytes {
            path: "instance_id".into()
        })
    );
    // Errors inside the key frame are rooted at `key`.
    let mut frames = valid_frames(Op::Store);
    frames[0] = map_of(&without(KeyFields::simple(2).entries(), "request_id"));
    assert_eq!(
        err_string(decode(Op::Store, &frames)),
        "key.request_id: missing required field"
    );
}

#[test]
fn lenient_top_level_int_and_bool() {
    // instance_id in any int form.
    for bytes in [
        vec![0x07],
        vec![0xcd, 0x00, 0x07],
        vec![0xd3, 0, 0, 0, 0, 0, 0, 0, 7],
    ] {
        assert_eq!(
            decode(Op::UnregisterKvCache, &[bytes]),
            Ok(Request::UnregisterKvCache { instance_id: 7 })
        );
    }
    assert_eq!(
        err_string(decode(
            Op::UnregisterKvCache,
            &[enc(|e| {
                e.str("7");
            })]
        )),
        "instance_id: expected int, found str"
    );
    // clear(force): bool or int.
    for (bytes, force) in [
        (vec![0xc2], false),
        (vec![0xc3], true),
        (vec![0x00], false),
        (vec![0x01], true),
        (vec![0xff], true),
    ] {
        assert_eq!(decode(Op::Clear, &[bytes]), Ok(Request::Clear { force }));
    }
    assert!(decode(Op::Clear, &[vec![0xc0]]).is_err());
    // ping(int | None).
    assert_eq!(
        decode(Op::Ping, &[vec![0xc0]]),
        Ok(Request::Ping { instance_id: None })
    );
    assert_eq!(
        decode(Op::Ping, &[int(-3)]),
        Ok(Request::Ping {
            instance_id: Some(-3)
        })
    );
    // skip_first_n_tokens must be non-negative.
    let mut frames = valid_frames(Op::Retrieve);
    frames[4] = int(-1);
    assert_eq!(
        err_string(decode(Op::Retrieve, &frames)),
        "skip_first_n_tokens: value -1 does not fit in u64"
    );
}

#[test]
fn prefetch_session_and_lookup_ops() {
    let key = KeyFields {
        worker_id: None,
        ..KeyFields::simple(4)
    }
    .encode();
    let Ok(Request::Lookup { key: k, tp_size }) = decode(Op::Lookup, &[key.clone(), int(2)]) else {
        panic!("lookup");
    };
    assert_eq!((k.worker_id, tp_size), (None, 2));
    assert!(matches!(
        decode(Op::FreeLookupLocks, &[key, int(1)]),
        Ok(Request::FreeLookupLocks { .. })
    ));
    let rid = enc(|e| {
        e.str("req-9");
    });
    assert_eq!(
        decode(Op::QueryPrefetchStatus, std::slice::from_ref(&rid)),
        Ok(Request::QueryPrefetchStatus {
            request_id: "req-9".into()
        })
    );
    assert_eq!(
        decode(Op::EndSession, std::slice::from_ref(&rid)),
        Ok(Request::EndSession {
            request_id: "req-9".into()
        })
    );
    // timeout: float64, float32 or int.
    for (bytes, want) in [
        (
            enc(|e| {
                e.f64(2.5);
            }),
            2.5,
        ),
        (vec![0xca, 0x3f, 0xc0, 0, 0], 1.5),
        (int(3), 3.0),
    ] {
        assert_eq!(
            decode(Op::WaitPrefetchStatus, &[rid.clone(), bytes]),
            Ok(Request::WaitPrefetchStatus {
                request_id: "req-9".into(),
                timeout: want
            })
        );
    }
    assert_eq!(
        err_string(decode(Op::WaitPrefetchStatus, &[rid.clone(), vec![0xc0]])),
        "timeout: expected float, found nil"
    );
    assert_eq!(
        err_string(decode(
            Op::QueryPrefetchStatus,
            &[enc(|e| {
                e.bin(b"req");
            })]
        )),
        "request_id: expected str, found bin"
    );
}

#[test]
fn engine_driven_ops() {
    let key = KeyFields::simple(4).encode();
    for op in [Op::PrepareStore, Op::PrepareRetrieve, Op::CommitRetrieve] {
        let req = decode(op, &[key.clone(), int(9)]).expect("decodes");
        assert_eq!(req.op(), op);
    }
    let Ok(Request::CommitStore { data, .. }) =
        decode(Op::CommitStore, &[key.clone(), int(9), vec![0xc4, 0x00]])
    else {
        panic!("commit_store");
    };
    assert!(data.is_empty());
}

#[test]
fn register_engine_driven_context() {
    let want = RegisterEngineDrivenContext {
        instance_id: 4242,
        model_name: "m".into(),
        world_size: 1,
        block_size: 16,
        num_layers: 2,
        hidden_dim_size: 128,
        dtype_str: "bfloat16".into(),
        use_mla: false,
        num_physical_slots: None,
    };
    let decode_payload = |entries: &[crate::common::Entry]| {
        decode(Op::RegisterKvCacheEngineDrivenContext, &[map_of(entries)])
    };
    let full = engine_driven_payload();
    assert_eq!(
        decode_payload(&full),
        Ok(Request::RegisterKvCacheEngineDrivenContext(want.clone()))
    );
    // Optional field missing, shuffled order, junk keys.
    let mut shuffled = without(full.clone(), "num_physical_slots");
    shuffled.reverse();
    shuffled.extend(junk_entries());
    assert_eq!(
        decode_payload(&shuffled),
        Ok(Request::RegisterKvCacheEngineDrivenContext(want.clone()))
    );
    let slots = with(full.clone(), "num_physical_slots", |e| {
        e.uint(64);
    });
    assert_eq!(
        decode_payload(&slots),
        Ok(Request::RegisterKvCacheEngineDrivenContext(
            RegisterEngineDrivenContext {
                num_physical_slots: Some(64),
                ..want
            }
        ))
    );
    // use_mla is a strict bool inside the struct.
    let int_mla = with(full.clone(), "use_mla", |e| {
        e.uint(1);
    });
    assert_eq!(
        err_string(decode_payload(&int_mla)),
        "payload.use_mla: expected bool, found int"
    );
    assert_eq!(
        err_string(decode_payload(&without(full.clone(), "dtype_str"))),
        "payload.dtype_str: missing required field"
    );
    let zero_ws = with(full, "world_size", |e| {
        e.uint(0);
    });
    assert!(err_string(decode_payload(&zero_ws)).starts_with("payload.world_size"));
}

#[test]
fn report_block_allocation() {
    let record = |ids: &dyn Fn(&mut Enc)| {
        map_of(&[
            entry("x_future", |e| {
                e.map(1).str("k").f64(0.5);
            }),
            entry("new_token_ids", |e| {
                e.uints(&[7, 8]);
            }),
            entry("new_block_ids", |e| ids(e)),
            entry("req_id", |e| {
                e.str("r1");
            }),
        ])
    };
    let frames = |records: Vec<Vec<u8>>| {
        let mut list = Enc::new();
        list.arr(u32::try_from(records.len()).expect("small"));
        for r in &records {
            list.raw(r);
        }
        vec![
            int(3),
            enc(|e| {
                e.str("m");
            }),
            list.done(),
        ]
    };
    let flat = record(&|e| {
        e.uints(&[4, 5]);
    });
    let grouped = record(&|e| {
        e.arr(2).uints(&[4]).uints(&[5, 6]);
    });
    let empty = record(&|e| {
        e.arr(0);
    });
    let Ok(Request::ReportBlockAllocation {
        instance_id,
        model_name,
        records,
    }) = decode(
        Op::ReportBlockAllocation,
        &frames(vec![flat, grouped, empty]),
    )
    else {
        panic!("report_block_allocation");
    };
    assert_eq!((instance_id, model_name.as_str()), (3, "m"));
    let rec = |ids: Vec<Vec<u64>>| BlockAllocationRecord {
        req_id: "r1".into(),
        new_block_ids: ids,
        new_token_ids: vec![7, 8],
    };
    assert_eq!(
        records,
        vec![
            rec(vec![vec![4, 5]]),
            rec(vec![vec![4], vec![5, 6]]),
            rec(vec![])
        ]
    );
    // Mixed shapes are rejected, naming the element.
    let mixed = record(&|e| {
        e.arr(2).uints(&[4]).uint(5);
    });
    assert_eq!(
        err_string(decode(Op::ReportBlockAllocation, &frames(vec![mixed]))),
        "records[0].new_block_ids[1]: expected array, found int"
    );
    let no_req = map_of(&[entry("new_token_ids", |e| {
        e.uints(&[1]);
    })]);
    assert_eq!(
        err_string(decode(Op::ReportBlockAllocation, &frames(vec![no_req]))),
        "records[0].req_id: missing required field"
    );
}

#[test]
fn register_kv_cache() {
    let mut frames = valid_frames(Op::RegisterKvCache);
    // Two wrappers: cpu_shm (tag last) and an opaque cuda one.
    let mut cuda_entries = vec![
        entry("type", |e| {
            e.str("cuda");
        }),
        entry("handle", |e| {
            e.arr(2).uint(1).bin(&[0u8; 64]);
        }),
    ];
    cuda_entries.extend(junk_entries());
    let cuda = map_of(&cuda_entries);
    let shm = cpu_shm_wrapper("/lmcache_kv_1_0");
    frames[1] = enc(|e| {
        e.arr(2).ext(1, &shm).ext(1, &cuda);
    });
    frames[5] = enc(|e| {
        e.map(3)
            .str("kv_layout")
            .str("NHD")
            .str("n")
            .uint(3)
            .str("z")
            .nil();
    });
    frames[6] = enc(|e| {
        e.arr(1).raw(&map_of(&[
            entry("layer_indices", |e| {
                e.uints(&[0, 2, 4]);
            }),
            entry("engine_group_id", |e| {
                e.uint(1);
            }),
            entry("sw_size_tokens", |e| {
                e.uint(4096);
            }),
            entry("x_other", |e| {
                e.str("ignored");
            }),
        ]));
    });
    let Ok(Request::RegisterKvCache(reg)) = decode(Op::RegisterKvCache, &frames) else {
        panic!("register_kv_cache");
    };
    assert_eq!(reg.instance_id, 7);
    assert_eq!(reg.model_name, "m");
    assert_eq!(reg.world_size, 1);
    assert_eq!(reg.engine_type, "vllm");
    assert_eq!(reg.layout_hints, vec![("kv_layout".into(), "NHD".into())]);
    assert_eq!(
        reg.engine_group_infos,
        vec![EngineGroupInfo {
            engine_group_id: 1,
            layer_indices: vec![0, 2, 4],
            tokens_per_block: 0,
            sw_size_tokens: 4096,
            extra_object_group_tag: 0,
        }]
    );
    let [
        DeviceIpcWrapper::CpuShm(cpu),
        DeviceIpcWrapper::Other { type_name, raw },
    ] = reg.kv_cache.as_slice()
    else {
        panic!("wrappers: {:?}", reg.kv_cache);
    };
    assert_eq!(cpu.shm_name, "/lmcache_kv_1_0");
    assert_eq!(cpu.nbytes, 524_288);
    assert_eq!(cpu.version, 1);
    assert_eq!(cpu.metadata.dtype, "float16");
    assert_eq!(cpu.metadata.shape, vec![2, 64, 16, 2, 64]);
    assert_eq!(cpu.metadata.stride, vec![131_072, 2048, 128, 64, 1]);
    assert_eq!(cpu.metadata.device_uuid, "cpu");
    assert_eq!(type_name, "cuda");
    assert_eq!(raw, &cuda);

    // Ext type other than 1.
    let mut bad = frames.clone();
    bad[1] = enc(|e| {
        e.arr(2).ext(1, &shm).ext(2, &shm);
    });
    assert_eq!(
        decode(Op::RegisterKvCache, &bad),
        Err(ProtoError::UnsupportedExt {
            path: "kv_cache[1]".into(),
            code: 2
        })
    );
    // A plain map instead of an ext value.
    bad[1] = enc(|e| {
        e.arr(1).raw(&shm);
    });
    assert_eq!(
        err_string(decode(Op::RegisterKvCache, &bad)),
        "kv_cache[0]: expected ext, found map"
    );
    // cpu_shm without nbytes; missing metadata field; missing tag.
    let no_nbytes = map_of(&[
        entry("type", |e| {
            e.str("cpu_shm");
        }),
        entry("shm_name", |e| {
            e.str("/x");
        }),
    ]);
    bad[1] = enc(|e| {
        e.arr(1).ext(1, &no_nbytes);
    });
    assert_eq!(
        err_string(decode(Op::RegisterKvCache, &bad)),
        "kv_cache[0].version: missing required field"
    );
    let untagged = map_of(&[entry("shm_name", |e| {
        e.str("/x");
    })]);
    bad[1] = enc(|e| {
        e.arr(1).ext(1, &untagged);
    });
    assert_eq!(
        err_string(decode(Op::RegisterKvCache, &bad)),
        "kv_cache[0].type: missing required field"
    );
    // Trailing bytes inside the ext payload.
    let mut padded = shm.clone();
    padded.push(0xc0);
    bad[1] = enc(|e| {
        e.arr(1).ext(1, &padded);
    });
    assert_eq!(
        decode(Op::RegisterKvCache, &bad),
        Err(ProtoError::TrailingBytes {
            path: "kv_cache[0]".into()
        })
    );
    // engine_group_infos entry without its required id.
    let mut bad = frames;
    bad[6] = enc(|e| {
        e.arr(1).raw(&map_of(&[entry("layer_indices", |e| {
            e.uints(&[0]);
        })]));
    });
    assert_eq!(
        err_string(decode(Op::RegisterKvCache, &bad)),
        "engine_group_infos[0].engine_group_id: missing required field"
    );
}

#[test]
fn unsupported_ops_keep_raw_frames() {
    let frames = vec![b"\xc1garbage".to_vec(), vec![], vec![0x01]];
    assert_eq!(
        decode(Op::CbReorderPlan, &frames),
        Ok(Request::Unsupported {
            op: Op::CbReorderPlan,
            payloads: frames.clone()
        })
    );
    assert_eq!(
        decode(Op::ServerModuleCall, &frames[..2]).map(|r| r.op()),
        Err(ProtoError::Arity {
            op: Op::ServerModuleCall,
            expected: Op::ServerModuleCall.arity(),
            got: 2
        })
    );
}

#[test]
fn error_kinds_are_stable() {
    assert_eq!(ProtoError::TooFewFrames { got: 1 }.kind(), "too_few_frames");
    assert_eq!(ProtoError::UnknownOp("x".into()).kind(), "unknown_op");
    assert_eq!(
        ProtoError::UnsupportedExt {
            path: String::new(),
            code: 3
        }
        .kind(),
        "unsupported_ext"
    );
    assert_eq!(
        ProtoError::TrailingBytes {
            path: String::new()
        }
        .kind(),
        "trailing_bytes"
    );
}
