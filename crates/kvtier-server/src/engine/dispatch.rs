//! The one dispatch from a decoded request to the component that owns its operation (see the
//! component list in the `engine` module docs); the clock is read once per request. The
//! components do the work; nothing here takes a lock.

use super::*;

impl Engine {
    /// Handles one decoded request.
    ///
    /// # Errors
    /// [`EngineError`] saying why it failed; the caller sends the op's failure value.
    pub fn handle(&self, request: Request) -> Result<Response, EngineError> {
        let cx = &self.cx;
        let now = cx.l1.clock().now();
        let nothing = |()| Response::Nothing;
        // store/retrieve echo the client's event handle (on failure too: see `crate::service`).
        let transfer_ok = |handle: Option<Vec<u8>>| Response::Transfer {
            handle: handle.unwrap_or_default(),
            ok: true,
        };
        let echo = request.reply_event_handle().map(<[u8]>::to_vec);
        match request {
            Request::GetChunkSize => Ok(Response::Uint(cx.chunk_size as u64)),
            Request::Noop => Ok(Response::Str("OK")),
            Request::GetExperimental => Ok(Response::StrList(if cx.events.enabled() {
                vec![kv_events::CAPABILITY.to_owned()]
            } else {
                Vec::new()
            })),
            Request::Ping { instance_id } => {
                if let Some(iid) = instance_id {
                    cx.instances.ping(iid, now);
                    cx.events.touch(iid, now);
                }
                Ok(Response::Bool(true))
            }
            Request::RegisterKvCacheEngineDrivenContext(p) => self
                .engine_driven
                .register(cx, p, now)
                .map(Response::EngineDrivenContext),
            Request::UnregisterKvCacheEngineDrivenContext { instance_id } => {
                if !self.unregister_context(instance_id) {
                    tracing::warn!(
                        instance_id,
                        "unregister of an unknown engine-driven context"
                    );
                }
                Ok(Response::Nothing)
            }
            Request::PrepareStore { key, instance_id } => {
                self.engine_driven.prepare_store(cx, &key, instance_id, now)
            }
            Request::CommitStore {
                key,
                instance_id,
                data,
            } => self
                .engine_driven
                .commit_store(cx, &key, instance_id, &data)
                .map(|()| Response::Bool(true)),
            Request::PrepareRetrieve { key, instance_id } => self
                .engine_driven
                .prepare_retrieve(cx, &key, instance_id, now)
                .map(Response::PrepareRetrieve),
            Request::CommitRetrieve { key, instance_id } => self
                .engine_driven
                .commit_retrieve(cx, &key, instance_id)
                .map(|()| Response::Bool(true)),
            Request::Lookup { key, .. } => lookup::lookup(cx, &key, now).map(nothing),
            Request::QueryPrefetchStatus { request_id } => {
                Ok(Response::PrefixHits(lookup::query(cx, &request_id)))
            }
            Request::WaitPrefetchStatus {
                request_id,
                timeout,
            } => Ok(Response::PrefixHits(lookup::wait(cx, &request_id, timeout))),
            Request::FreeLookupLocks { key, .. } => {
                lookup::free_lookup_locks(cx, &key, now).map(nothing)
            }
            Request::EndSession { request_id } => {
                self.end_session(&request_id);
                Ok(Response::Nothing)
            }
            Request::Clear { force } => {
                self.clear(force);
                Ok(Response::Nothing)
            }
            Request::ReportBlockAllocation { records, .. } => {
                cx.counters
                    .block_allocation_records_total
                    .add(records.len() as u64);
                Ok(Response::Nothing)
            }
            Request::RegisterKvCache(r) => {
                self.lmcache_driven.register(cx, r, now);
                Ok(Response::Nothing)
            }
            Request::UnregisterKvCache { instance_id } => {
                self.lmcache_driven.unregister(cx, instance_id);
                cx.events.close_instance(instance_id);
                Ok(Response::Nothing)
            }
            Request::Store {
                key,
                instance_id,
                block_ids,
                ..
            } => self
                .lmcache_driven
                .store(cx, &key, instance_id, &block_ids, now)
                .map(|()| transfer_ok(echo)),
            Request::Retrieve {
                key,
                instance_id,
                block_ids,
                skip_first_n_tokens,
                ..
            } => self
                .lmcache_driven
                .retrieve(cx, &key, instance_id, &block_ids, skip_first_n_tokens, now)
                .map(|()| transfer_ok(echo)),
            Request::SubscribeKvEvents { .. } => Err(EngineError::Failed(
                "subscribe_kv_events is a stream: open it with Engine::subscribe_kv_events".into(),
            )),
            Request::Unsupported { op, .. } => Err(EngineError::Unsupported(op.name())),
        }
    }
}
