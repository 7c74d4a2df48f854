//! How many threads candle's CPU matmul may use while training.
//!
//! Candle reads `RAYON_NUM_THREADS` at every matmul to choose its
//! parallelism; the global rayon pool (the fused ops, the element-wise ops)
//! keeps the size it started with. Limits come from two places at once: a
//! VQ stage wants one-thread matmuls inside its own micro-batch threads, and
//! `train all` wants one per stage while two stages share the cores. So
//! limits are held by guards, possibly on several threads, and the smallest
//! live one applies; with none left the variable is as the user set it.
//!
//! Only speed depends on this: candle's gemm splits a product's output
//! tiles across threads, never its sums, so every trained weight is the
//! same for any limit (`train all --jobs 1` and `--jobs 2` write the same
//! bytes; `tests/train_smoke.rs` holds it).

use std::sync::Mutex;

const RAYON_THREADS: &str = "RAYON_NUM_THREADS";

struct Limits {
    /// Live guards: (id, threads).
    live: Vec<(u64, usize)>,
    next_id: u64,
    /// The variable as it was before the first guard (`None`: unset).
    user_value: Option<Option<String>>,
}

impl Limits {
    const fn new() -> Self {
        Self {
            live: Vec::new(),
            next_id: 0,
            user_value: None,
        }
    }

    fn add(&mut self, n: usize, user_value: impl FnOnce() -> Option<String>) -> u64 {
        if self.user_value.is_none() {
            self.user_value = Some(user_value());
        }
        let id = self.next_id;
        self.next_id += 1;
        self.live.push((id, n.max(1)));
        id
    }

    fn remove(&mut self, id: u64) {
        self.live.retain(|&(live, _)| live != id);
    }

    /// What the variable should hold now (`None`: unset).
    fn value(&self) -> Option<String> {
        match self.live.iter().map(|&(_, n)| n).min() {
            Some(n) => Some(n.to_string()),
            None => self.user_value.clone().flatten(),
        }
    }

    fn apply(&self) {
        match self.value() {
            Some(v) => std::env::set_var(RAYON_THREADS, v),
            None => std::env::remove_var(RAYON_THREADS),
        }
    }
}

static LIMITS: Mutex<Limits> = Mutex::new(Limits::new());

/// Caps candle's matmul threads at `n` until dropped.
#[must_use = "the limit lasts as long as the guard"]
pub struct MatmulThreads {
    id: u64,
}

impl MatmulThreads {
    pub fn limit(n: usize) -> Self {
        // Start the pool before the variable shrinks it.
        let _ = rayon::current_num_threads();
        let mut limits = LIMITS.lock().unwrap_or_else(|e| e.into_inner());
        let id = limits.add(n, || std::env::var(RAYON_THREADS).ok());
        limits.apply();
        Self { id }
    }
}

impl Drop for MatmulThreads {
    fn drop(&mut self) {
        let mut limits = LIMITS.lock().unwrap_or_else(|e| e.into_inner());
        limits.remove(self.id);
        limits.apply();
    }
}

/// This machine's cores (1 if unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::Limits;

    #[test]
    fn the_smallest_live_limit_applies_and_the_users_value_comes_back() {
        let mut limits = Limits::new();
        let wide = limits.add(3, || Some("8".into()));
        assert_eq!(limits.value().as_deref(), Some("3"));
        // The user's value is read once, before the first guard.
        let narrow = limits.add(1, || Some("not read".into()));
        assert_eq!(limits.value().as_deref(), Some("1"));
        // Guards may end in any order: the wide one first here.
        limits.remove(wide);
        assert_eq!(limits.value().as_deref(), Some("1"));
        limits.remove(narrow);
        assert_eq!(limits.value().as_deref(), Some("8"));

        let mut unset = Limits::new();
        let id = unset.add(0, || None);
        assert_eq!(unset.value().as_deref(), Some("1"), "0 threads means 1");
        unset.remove(id);
        assert_eq!(unset.value(), None);
    }
}
