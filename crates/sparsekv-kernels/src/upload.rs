//! The small read-only `u32` arrays the launchers hand their kernels (lengths, row offsets),
//! kept on the device by content: a decode step gives every layer the same lengths and
//! offsets, and back-to-back calls on an unchanged cache the same ones again, so only the first
//! of them pays an upload (a host-to-device copy and an allocation, several microseconds of
//! host time per launch); the others bind the kept copy. Entries are never written after
//! their upload (the kernels only read them), so sharing one is as good as a fresh copy.

use std::any::Any;
use std::sync::Mutex;

use cubecl::prelude::*;
use cubecl::server::Handle;

/// Arrays kept, most recently used last: a step's few distinct arrays (attention lengths, row
/// offsets, compression offsets) with room to spare.
const KEPT: usize = 32;
/// Arrays longer than this (a long prompt chunk's per-row lengths) are uploaded every time:
/// they rarely repeat, and comparing them would cost more than it saves.
const LONGEST: usize = 4096;

struct Kept {
    /// The client the copy lives on (a clone, so its device cannot go away and come back
    /// under the same identity while the entry exists).
    client: Box<dyn Any + Send + Sync>,
    data: Vec<u32>,
    handle: Handle,
}

static KEPT_ARRAYS: Mutex<Vec<Kept>> = Mutex::new(Vec::new());

/// A device copy of `data` on `client`'s device: a kept one when the same array was uploaded
/// there recently, else a new upload (kept for the next caller).
pub(crate) fn upload_u32<R: Runtime>(client: &ComputeClient<R>, data: &[u32]) -> Handle {
    let fresh = || client.create_from_slice(u32::as_bytes(data));
    if data.len() > LONGEST {
        return fresh();
    }
    // A poisoned lock (a panic elsewhere while holding it) only loses the reuse.
    let Ok(mut kept) = KEPT_ARRAYS.lock() else {
        return fresh();
    };
    let same_device = |entry: &Kept| {
        entry
            .client
            .downcast_ref::<ComputeClient<R>>()
            .is_some_and(|c| std::ptr::eq(c.info(), client.info()))
    };
    if let Some(i) = kept.iter().position(|e| e.data == data && same_device(e)) {
        let entry = kept.remove(i);
        let handle = entry.handle.clone();
        kept.push(entry);
        return handle;
    }
    let handle = fresh();
    if kept.len() >= KEPT {
        kept.remove(0);
    }
    kept.push(Kept {
        client: Box::new(client.clone()),
        data: data.to_vec(),
        handle: handle.clone(),
    });
    handle
}

/// A small buffer (32 bytes) for a kernel argument that the launch never touches (the second
/// target of a one-target launch, a segment the dense kernel does not read): a kept one per
/// device, so such launches allocate nothing. `which` tells apart placeholders that must be
/// distinct buffers in one launch.
pub(crate) fn placeholder<R: Runtime>(client: &ComputeClient<R>, which: u32) -> Handle {
    upload_u32(client, &[u32::MAX - which; 8])
}
