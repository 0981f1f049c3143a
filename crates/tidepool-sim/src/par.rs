//! Work over independent items on every core, results in item order: the simulator's
//! accelerators are independent once each request's instance is fixed, so a pass over them, the
//! trials of a placement move and the per-model sizing all fan out here. Workers take the next
//! item from a shared counter; the output is in input order, so a result never depends on the
//! core count or on which worker ran what.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Workers for `items` pieces of work: the cores available, at least one, at most `items`.
pub(crate) fn workers(items: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, items.max(1))
}

/// `f` over `items` on every core; the results in `items`' order.
pub(crate) fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = workers(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(index) else {
                            break;
                        };
                        mine.push((index, f(item)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    done.sort_unstable_by_key(|(index, _)| *index);
    assert_eq!(done.len(), items.len(), "every item ran exactly once");
    done.into_iter().map(|(_, r)| r).collect()
}
