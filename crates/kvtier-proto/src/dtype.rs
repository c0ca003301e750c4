//! torch dtype names as they travel on the wire (`dtype_str`, tensor metadata `dtype`).
//!
//! This is the one dtype table of the workspace: the engine-driven slot sizes, the
//! lmcache_driven layout checks and `kvtier bench` all size elements through it.

/// Element size in bytes of a torch dtype name (`"float16"`, `"torch.bfloat16"`, `"half"`,
/// ...); `None` for a name kvtier does not know.
#[must_use]
pub fn dtype_itemsize(dtype: &str) -> Option<usize> {
    let d = dtype.strip_prefix("torch.").unwrap_or(dtype);
    Some(match d {
        "float16" | "half" | "bfloat16" | "int16" | "uint16" | "short" => 2,
        "float32" | "float" | "int32" | "uint32" | "int" => 4,
        "float64" | "double" | "int64" | "uint64" | "long" => 8,
        "int8" | "uint8" | "bool" | "float8_e4m3fn" | "float8_e5m2" | "float8_e4m3fnuz"
        | "float8_e5m2fnuz" => 1,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::dtype_itemsize;

    #[test]
    fn sizes_with_and_without_the_torch_prefix() {
        assert_eq!(dtype_itemsize("bfloat16"), Some(2));
        assert_eq!(dtype_itemsize("torch.float32"), Some(4));
        assert_eq!(dtype_itemsize("torch.float8_e4m3fn"), Some(1));
        assert_eq!(dtype_itemsize("complex64"), None);
    }
}
