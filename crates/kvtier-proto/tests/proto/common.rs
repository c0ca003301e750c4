//! Test-side msgpack builders (written with `rmp::encode`, independent of the crate's decoder).

use kvtier_proto::Op;

/// A tiny msgpack writer for building test inputs.
#[derive(Debug, Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn done(self) -> Vec<u8> {
        self.0
    }
    pub fn nil(&mut self) -> &mut Self {
        rmp::encode::write_nil(&mut self.0).expect("vec write");
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        rmp::encode::write_bool(&mut self.0, v).expect("vec write");
        self
    }
    pub fn int(&mut self, v: i64) -> &mut Self {
        rmp::encode::write_sint(&mut self.0, v).expect("vec write");
        self
    }
    pub fn uint(&mut self, v: u64) -> &mut Self {
        rmp::encode::write_uint(&mut self.0, v).expect("vec write");
        self
    }
    /// A u64 in its widest (non-minimal) form, which msgpack decoders must also accept.
    pub fn wide_u64(&mut self, v: u64) -> &mut Self {
        rmp::encode::write_u64(&mut self.0, v).expect("vec write");
        self
    }
    pub fn f64(&mut self, v: f64) -> &mut Self {
        rmp::encode::write_f64(&mut self.0, v).expect("vec write");
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        rmp::encode::write_str(&mut self.0, s).expect("vec write");
        self
    }
    pub fn bin(&mut self, b: &[u8]) -> &mut Self {
        rmp::encode::write_bin(&mut self.0, b).expect("vec write");
        self
    }
    pub fn arr(&mut self, n: u32) -> &mut Self {
        rmp::encode::write_array_len(&mut self.0, n).expect("vec write");
        self
    }
    pub fn map(&mut self, n: u32) -> &mut Self {
        rmp::encode::write_map_len(&mut self.0, n).expect("vec write");
        self
    }
    pub fn ext(&mut self, ty: i8, data: &[u8]) -> &mut Self {
        let len = u32::try_from(data.len()).expect("small ext");
        rmp::encode::write_ext_meta(&mut self.0, len, ty).expect("vec write");
        self.0.extend_from_slice(data);
        self
    }
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn uints(&mut self, vs: &[u64]) -> &mut Self {
        self.arr(u32::try_from(vs.len()).expect("small"));
        for &v in vs {
            self.uint(v);
        }
        self
    }
}

/// One map entry: key plus pre-encoded value.
pub type Entry = (String, Vec<u8>);

pub fn entry(key: &str, build: impl FnOnce(&mut Enc)) -> Entry {
    let mut e = Enc::new();
    build(&mut e);
    (key.to_owned(), e.done())
}

/// Encodes a map from pre-encoded entries, in the given order.
pub fn map_of(entries: &[Entry]) -> Vec<u8> {
    let mut e = Enc::new();
    e.map(u32::try_from(entries.len()).expect("small"));
    for (k, v) in entries {
        e.str(k).raw(v);
    }
    e.done()
}

/// Unknown-key values of every msgpack type.
pub fn junk_entries() -> Vec<Entry> {
    vec![
        entry("x_nested", |e| {
            e.map(2).str("a").arr(2).int(-5).map(1).int(1).nil();
            e.str("b").ext(7, &[1, 2, 3]);
        }),
        entry("x_ext", |e| {
            e.ext(1, b"\x81\xa1k\xa1v");
        }),
        entry("x_bin", |e| {
            e.bin(&[0xc1, 0xff, 0x00]);
        }),
        entry("x_float", |e| {
            e.f64(1.5);
        }),
        entry("x_f32", |e| {
            e.raw(&[0xca, 0x3f, 0x80, 0, 0]);
        }),
        entry("x_nil", |e| {
            e.nil();
        }),
        entry("x_bool", |e| {
            e.bool(true);
        }),
        entry("x_negint", |e| {
            e.int(i64::MIN);
        }),
        entry("x_bigint", |e| {
            e.uint(u64::MAX);
        }),
        entry("x_str", |e| {
            e.str("whatever");
        }),
        entry("x_arr", |e| {
            e.arr(3).str("a").bin(b"b").arr(0);
        }),
    ]
}

/// The fields of a key, encoded as the 0.5.6 client does (all 10 fields, declaration order).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyFields {
    pub model_name: String,
    pub world_size: u64,
    pub worker_id: Option<u64>,
    pub token_ids: Vec<u64>,
    pub start: u64,
    pub end: u64,
    pub request_id: String,
    pub cache_salt: String,
    pub num_kv_readers: u64,
}

impl KeyFields {
    pub fn simple(tokens: u64) -> Self {
        Self {
            model_name: "m".into(),
            world_size: 1,
            worker_id: Some(0),
            token_ids: (0..tokens).collect(),
            start: 0,
            end: tokens,
            request_id: "req1".into(),
            cache_salt: String::new(),
            num_kv_readers: 1,
        }
    }

    pub fn entries(&self) -> Vec<Entry> {
        vec![
            entry("model_name", |e| {
                e.str(&self.model_name);
            }),
            entry("world_size", |e| {
                e.uint(self.world_size);
            }),
            entry("worker_id", |e| match self.worker_id {
                Some(w) => {
                    e.uint(w);
                }
                None => {
                    e.nil();
                }
            }),
            entry("token_ids", |e| {
                e.uints(&self.token_ids);
            }),
            entry("start", |e| {
                e.uint(self.start);
            }),
            entry("end", |e| {
                e.uint(self.end);
            }),
            entry("request_id", |e| {
                e.str(&self.request_id);
            }),
            entry("cache_salt", |e| {
                e.str(&self.cache_salt);
            }),
            entry("request_configs", |e| {
                e.nil();
            }),
            entry("num_kv_readers", |e| {
                e.uint(self.num_kv_readers);
            }),
        ]
    }

    pub fn encode(&self) -> Vec<u8> {
        map_of(&self.entries())
    }
}

/// Removes entry `key` from a list of entries.
pub fn without(mut entries: Vec<Entry>, key: &str) -> Vec<Entry> {
    entries.retain(|(k, _)| k != key);
    entries
}

/// Replaces the value of entry `key`.
pub fn with(mut entries: Vec<Entry>, key: &str, build: impl FnOnce(&mut Enc)) -> Vec<Entry> {
    let new = entry(key, build);
    match entries.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => *slot = new,
        None => entries.push(new),
    }
    entries
}

pub fn enc(build: impl FnOnce(&mut Enc)) -> Vec<u8> {
    let mut e = Enc::new();
    build(&mut e);
    e.done()
}

/// A `cpu_shm` DeviceIPCWrapper map (the data of an ext-1 value).
pub fn cpu_shm_wrapper(shm_name: &str) -> Vec<u8> {
    map_of(&[
        entry("type", |e| {
            e.str("cpu_shm");
        }),
        entry("shm_name", |e| {
            e.str(shm_name);
        }),
        entry("nbytes", |e| {
            e.uint(524_288);
        }),
        entry("version", |e| {
            e.uint(1);
        }),
        entry("metadata", |e| {
            e.raw(&map_of(&[
                entry("dtype", |e| {
                    e.str("float16");
                }),
                entry("shape", |e| {
                    e.uints(&[2, 64, 16, 2, 64]);
                }),
                entry("stride", |e| {
                    e.uints(&[131_072, 2048, 128, 64, 1]);
                }),
                entry("storage_offset", |e| {
                    e.uint(0);
                }),
                entry("device_uuid", |e| {
                    e.str("cpu");
                }),
            ]));
        }),
    ])
}

pub fn engine_driven_payload() -> Vec<Entry> {
    vec![
        entry("instance_id", |e| {
            e.uint(4242);
        }),
        entry("model_name", |e| {
            e.str("m");
        }),
        entry("world_size", |e| {
            e.uint(1);
        }),
        entry("block_size", |e| {
            e.uint(16);
        }),
        entry("num_layers", |e| {
            e.uint(2);
        }),
        entry("hidden_dim_size", |e| {
            e.uint(128);
        }),
        entry("dtype_str", |e| {
            e.str("bfloat16");
        }),
        entry("use_mla", |e| {
            e.bool(false);
        }),
        entry("num_physical_slots", |e| {
            e.nil();
        }),
    ]
}

/// A valid set of payload frames for `op` (raw placeholder frames for undecoded ops).
pub fn valid_frames(op: Op) -> Vec<Vec<u8>> {
    let key = KeyFields::simple(8).encode();
    let iid = enc(|e| {
        e.uint(7);
    });
    let blocks = enc(|e| {
        e.arr(2).uints(&[1, 2]).uints(&[3]);
    });
    let handle = enc(|e| {
        e.bin(b"stub_ipc_handle");
    });
    let rid = enc(|e| {
        e.str("req1");
    });
    match op {
        Op::RegisterKvCache => vec![
            iid,
            enc(|e| {
                e.arr(1).ext(1, &cpu_shm_wrapper("/lmcache_kv_1_0"));
            }),
            enc(|e| {
                e.str("m");
            }),
            enc(|e| {
                e.uint(1);
            }),
            enc(|e| {
                e.str("vllm");
            }),
            enc(|e| {
                e.map(1).str("kv_layout").str("NHD");
            }),
            enc(|e| {
                e.arr(1).raw(&map_of(&[
                    entry("engine_group_id", |e| {
                        e.uint(0);
                    }),
                    entry("layer_indices", |e| {
                        e.uints(&[0, 1]);
                    }),
                ]));
            }),
        ],
        Op::UnregisterKvCache | Op::UnregisterKvCacheEngineDrivenContext => vec![iid],
        Op::Store => vec![key, iid, blocks, handle],
        Op::Retrieve => vec![
            key,
            iid,
            blocks,
            handle,
            enc(|e| {
                e.uint(0);
            }),
        ],
        Op::Lookup | Op::FreeLookupLocks => vec![
            key,
            enc(|e| {
                e.uint(1);
            }),
        ],
        Op::QueryPrefetchStatus | Op::EndSession => vec![rid],
        Op::WaitPrefetchStatus => vec![
            rid,
            enc(|e| {
                e.f64(1.0);
            }),
        ],
        Op::RegisterKvCacheEngineDrivenContext => vec![map_of(&engine_driven_payload())],
        Op::PrepareStore | Op::PrepareRetrieve | Op::CommitRetrieve => vec![key, iid],
        Op::CommitStore => vec![
            key,
            iid,
            enc(|e| {
                e.bin(b"");
            }),
        ],
        Op::Clear => vec![enc(|e| {
            e.bool(false);
        })],
        Op::Ping => vec![iid],
        Op::ReportBlockAllocation => vec![
            iid,
            enc(|e| {
                e.str("m");
            }),
            enc(|e| {
                e.arr(1).raw(&map_of(&[
                    entry("req_id", |e| {
                        e.str("r");
                    }),
                    entry("new_block_ids", |e| {
                        e.uints(&[4, 5]);
                    }),
                    entry("new_token_ids", |e| {
                        e.uints(&[1, 2, 3]);
                    }),
                ]));
            }),
        ],
        Op::SubscribeKvEvents => vec![
            iid,
            enc(|e| {
                e.str("m");
            }),
            enc(|e| {
                e.uint(0);
            }),
            enc(|e| {
                e.uint(16);
            }),
        ],
        other => (0..other.arity())
            .map(|i| {
                enc(|e| {
                    e.uint(u64::try_from(i).expect("small"));
                })
            })
            .collect(),
    }
}

pub fn refs(frames: &[Vec<u8>]) -> Vec<&[u8]> {
    frames.iter().map(Vec::as_slice).collect()
}
