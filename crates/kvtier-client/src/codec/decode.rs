//! Decoders of each reply type from an optional body (`None` = the bare `[uid, op]` reply), the
//! way msgspec's typed decoder reads them: unknown map keys ignored, key order free, required
//! keys present, optional ones defaulted; and the reply types they produce.

/// Reply of `register_kv_cache_engine_driven_context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Segment name to map (`/dev/shm/<shm_name>`); empty in pickle mode.
    pub shm_name: String,
    /// Pool size in bytes; 0 in pickle mode.
    pub pool_size: u64,
}

/// One engine-driven slot: a chunk stored contiguously at `offset` in the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Byte offset in the pool.
    pub offset: u64,
    /// Bytes in the slot.
    pub length: u64,
    /// Tensor shape of the chunk.
    pub shape: Vec<u64>,
    /// torch dtype name.
    pub dtype: String,
}

/// Reply of `prepare_store`: where to write the chunks the server does not have yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrepareStore {
    /// One slot per chunk to write.
    pub slots: Vec<Slot>,
    /// For each slot, the chunk index relative to the key's `start` chunk.
    pub chunk_indices: Vec<u64>,
}

/// Reply of `prepare_retrieve`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrepareRetrieve {
    /// Whether every chunk of the range is locked and readable.
    pub success: bool,
    /// Inline data (pickle mode only; empty with a pool).
    pub data: Vec<u8>,
    /// One slot per chunk, in order.
    pub slots: Vec<Slot>,
}

use super::Value;

fn value(body: Option<&[u8]>) -> Result<Option<Value>, String> {
    body.map(Value::decode).transpose()
}

fn required(body: Option<&[u8]>, what: &str) -> Result<Value, String> {
    match value(body)? {
        None | Some(Value::Nil) => Err(format!("{what}: got None")),
        Some(v) => Ok(v),
    }
}

/// `None`: a bare reply or an explicit nil.
///
/// # Errors
/// Any other value.
pub fn unit(body: Option<&[u8]>) -> Result<(), String> {
    match value(body)? {
        None | Some(Value::Nil) => Ok(()),
        Some(v) => Err(format!("expected None, got {v}")),
    }
}

/// `bool`.
///
/// # Errors
/// Any other value.
pub fn boolean(body: Option<&[u8]>) -> Result<bool, String> {
    required(body, "bool")?.as_bool("bool")
}

/// `str`.
///
/// # Errors
/// Any other value.
pub fn string(body: Option<&[u8]>) -> Result<String, String> {
    Ok(required(body, "str")?.as_str("str")?.to_owned())
}

/// A non-negative `int`.
///
/// # Errors
/// Any other value.
pub fn uint(body: Option<&[u8]>) -> Result<u64, String> {
    required(body, "int")?.as_u64("int")
}

/// `int | None` with a non-negative int.
///
/// # Errors
/// Any other value.
pub fn opt_uint(body: Option<&[u8]>) -> Result<Option<u64>, String> {
    match value(body)? {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => v.as_u64("int | None").map(Some),
    }
}

/// `list[str]`.
///
/// # Errors
/// Any other value.
pub fn str_list(body: Option<&[u8]>) -> Result<Vec<String>, String> {
    let v = required(body, "list[str]")?;
    v.as_array("list[str]")?
        .iter()
        .map(|s| s.as_str("list[str] item").map(str::to_owned))
        .collect()
}

/// `RegisterEngineDrivenContextResponse`: `{shm_name = "", pool_size = 0}`.
///
/// # Errors
/// A non-map or a field of the wrong type.
pub fn registration(body: Option<&[u8]>) -> Result<Registration, String> {
    let v = required(body, "RegisterEngineDrivenContextResponse")?;
    if !matches!(v, Value::Map(_)) {
        return Err(format!(
            "RegisterEngineDrivenContextResponse: expected a map, got {v}"
        ));
    }
    Ok(Registration {
        shm_name: match v.get("shm_name") {
            Some(s) => s.as_str("shm_name")?.to_owned(),
            None => String::new(),
        },
        pool_size: match v.get("pool_size") {
            Some(p) => p.as_u64("pool_size")?,
            None => 0,
        },
    })
}

fn slot(v: &Value) -> Result<Slot, String> {
    Ok(Slot {
        offset: v.require("offset", "slot")?.as_u64("slot.offset")?,
        length: v.require("length", "slot")?.as_u64("slot.length")?,
        shape: v
            .require("shape", "slot")?
            .as_array("slot.shape")?
            .iter()
            .map(|d| d.as_u64("slot.shape item"))
            .collect::<Result<_, _>>()?,
        dtype: v.require("dtype", "slot")?.as_str("slot.dtype")?.to_owned(),
    })
}

fn slots(context: &Value) -> Result<Vec<Slot>, String> {
    match context.get("slots") {
        None => Ok(Vec::new()),
        Some(s) => s.as_array("context.slots")?.iter().map(slot).collect(),
    }
}

fn context(v: &Value, what: &str) -> Result<Value, String> {
    match v {
        Value::Map(_) => {}
        other => return Err(format!("{what}: expected a map, got {other}")),
    }
    match v.get("context") {
        None => Ok(Value::Map(Vec::new())),
        Some(c @ Value::Map(_)) => Ok(c.clone()),
        Some(other) => Err(format!("{what}.context: expected a map, got {other}")),
    }
}

/// `PrepareStoreResponse`: `{context: {slots, chunk_indices}}`.
///
/// # Errors
/// A non-map, a malformed slot, or slot and index lists of different lengths.
pub fn prepare_store(body: Option<&[u8]>) -> Result<PrepareStore, String> {
    let v = required(body, "PrepareStoreResponse")?;
    let ctx = context(&v, "PrepareStoreResponse")?;
    let slots = slots(&ctx)?;
    let chunk_indices: Vec<u64> = match ctx.get("chunk_indices") {
        None => Vec::new(),
        Some(ix) => ix
            .as_array("context.chunk_indices")?
            .iter()
            .map(|i| i.as_u64("context.chunk_indices item"))
            .collect::<Result<_, _>>()?,
    };
    if chunk_indices.len() != slots.len() {
        return Err(format!(
            "PrepareStoreResponse: {} slots but {} chunk indices",
            slots.len(),
            chunk_indices.len()
        ));
    }
    Ok(PrepareStore {
        slots,
        chunk_indices,
    })
}

/// `PrepareRetrieveResponse`: `{success, data = b"", context = {}}`.
///
/// # Errors
/// A non-map, a missing `success`, or a malformed field.
pub fn prepare_retrieve(body: Option<&[u8]>) -> Result<PrepareRetrieve, String> {
    let v = required(body, "PrepareRetrieveResponse")?;
    let ctx = context(&v, "PrepareRetrieveResponse")?;
    let success = v
        .require("success", "PrepareRetrieveResponse")?
        .as_bool("success")?;
    let data = match v.get("data") {
        None => Vec::new(),
        Some(Value::Bin(b)) => b.clone(),
        Some(other) => return Err(format!("data: expected bin, got {other}")),
    };
    Ok(PrepareRetrieve {
        success,
        data,
        slots: slots(&ctx)?,
    })
}
