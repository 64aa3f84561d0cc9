//! The cap on the calls a tenant streams at once (`MAX_STREAMING_CALLS_PER_TENANT`): each
//! call is a paid AI request once it ends, so one tenant's runaway PBX (or a leaked `pbx` key)
//! must not be able to open calls without end.
//!
//! Only a call's first packet is checked: a call this process has let in is remembered, and
//! for any other the one query asks whether it exists and how many calls the tenant streams
//! (counted up to the cap, through `calls_tenant_state_newest`). The cap is soft by the
//! calls that start at the same instant on several replicas: each counts before the others
//! have committed. Refusing an existing call's packets would lose audio, so that is never done.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use common::{CallKey, store};
use sqlx::PgPool;

use crate::error::ApiError;

/// Calls remembered as admitted at most; past it the memory starts over (a call it forgets
/// costs one query on its next packet).
const MAX_REMEMBERED: usize = 200_000;

#[derive(Clone)]
pub struct StreamingCap {
    pool: PgPool,
    /// `None`: no cap.
    cap: Option<u32>,
    admitted: Arc<Mutex<HashSet<CallKey>>>,
}

impl StreamingCap {
    pub fn new(pool: PgPool, cap: u32) -> Self {
        Self {
            pool,
            cap: (cap > 0).then_some(cap),
            admitted: Arc::default(),
        }
    }

    /// `Ok` if a packet of `call` may be stored: the call exists, or its tenant streams fewer
    /// calls than the cap.
    pub async fn admit(&self, call: &CallKey) -> Result<(), ApiError> {
        let Some(cap) = self.cap else {
            return Ok(());
        };
        if self.admitted.lock().expect("not poisoned").contains(call) {
            return Ok(());
        }
        let (exists, streaming) = store::streaming_admission(&self.pool, call, i64::from(cap))
            .await
            .map_err(ApiError::database)?;
        if !exists && streaming >= i64::from(cap) {
            metrics::counter!("switchboard_ingest_streaming_cap_refused_total").increment(1);
            return Err(ApiError::TooManyStreamingCalls { cap });
        }
        let mut admitted = self.admitted.lock().expect("not poisoned");
        if admitted.len() >= MAX_REMEMBERED {
            admitted.clear();
        }
        admitted.insert(call.clone());
        Ok(())
    }
}
