//! How one matrix product `out[m,n] (+)= x[m,k]·w[n,k]ᵀ` is scheduled: which
//! gemm orientation, and how many threads.
//!
//! Two facts of the 2-core development machine drive the choice (table from
//! `cargo run --release --example dispatch_micro`, µs, best of many samples,
//! gemm 0.19 on an AMD EPYC (Zen 3, AVX2+FMA) KVM guest while other builds
//! kept the load average at ~13):
//!
//! ```text
//!   m x n x k      MACs      direct 1t  direct 2t  col-major 1t  row by row 1t  candle
//!   1x256x256      65,536        4.6       4.6         5.0            4.7        40
//!   1x768x256      196,608      13.7      13.7        14.1           13.7        51
//!   2x768x256      393,216      78.4      78.8        61.5           22.8       116
//!   4x768x256      786,432      79.6      94.6        61.2           45.6       115
//!   8x768x256      1.6M        102.3      69.7        60.9           90.7       174
//!   16x256x256     1.0M         42.1      57.6        24.1           60.6        92
//!   16x768x256     3.1M        127.3      98.9        74.3          184.9       176
//!   32x768x256     6.3M        197.4     218.2       149.7          388.2       251
//!   64x256x768     12.6M       316.9     348.5       280.7          844.9       389
//!   64x768x256     12.6M       316.6     208.0       293.6          725.7       375
//!   128x768x256    25.2M       578.2     596.7       648.5         1607.6       648
//!   256x768x256    50.3M      1083.4    1149.2      1335.8         3087.7      1195
//!   1024x256x256   67.1M      1383.0    1413.0      2382.3         5642.5      1499
//!   1024x768x256   201.3M     8501.7   10721.3     22735.6        33231.1      8734
//! ```
//!
//! - gemm wants its left operand contiguous along the output rows. Writing a
//!   row-major `out`, it transposes the problem and packs all of `w`
//!   (`n·k` values) on every call, which for a few rows costs far more than
//!   the product itself (2x768x256 takes as long as 8x768x256). Writing a
//!   column-major scratch instead packs only the rows of `x` and reads `w` in
//!   place; transposing the scratch into `out` costs `m·n` copies. Below
//!   5 rows one gemv per row (no packing at all) is cheaper still.
//! - a second thread did not pay anywhere in this table: the gains at
//!   12-50M MACs (0.66x-0.8x) did not repeat from run to run, and the
//!   largest products got slower (up to 2.2x, also with the rows split by
//!   hand over `rayon::join`). On a busy 2-core machine the second core is
//!   rarely free. Only products far beyond the decode and prefill sizes
//!   measured here fan out; `RAYON_NUM_THREADS=1` turns that off as well.

use gemm::Parallelism;

/// The plan for one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// gemm straight into the row-major output on this many threads
    /// (m = 1 takes gemm's gemv path).
    Direct { threads: usize },
    /// One gemv per row of x: never packs w.
    RowByRow,
    /// gemm into a column-major `[n, m]` scratch, transposed into the output.
    ColumnMajor,
}

/// Products with fewer multiply-adds per thread than this stay on one
/// thread: 2 threads from 2^28 (268M) MACs on, above every size measured.
pub const MIN_MACS_PER_THREAD: usize = 1 << 27;

/// Up to this many rows, one gemv per row beats packing anything
/// (4x768x256: 45.6 µs by row, 61.2 column-major; 8 rows: 90.7 vs 60.9).
pub const ROW_BY_ROW_MAX_ROWS: usize = 4;

/// Up to this many rows the column-major scratch beats packing `w`
/// (32x768x256: 150 µs vs 197 direct); at 64 rows it depends on the shape,
/// from 128 on direct wins.
pub const COLUMN_MAJOR_MAX_ROWS: usize = 32;

/// Both `n` and `k` at least this for the two schedules above: below it `w`
/// is small and packing it is cheap (the LoRA shrink has n = r, the expand
/// has k = r).
pub const WIDE_MIN_DIM: usize = 64;

pub fn schedule_for(m: usize, n: usize, k: usize) -> Schedule {
    let wide = n >= WIDE_MIN_DIM && k >= WIDE_MIN_DIM;
    if (2..=ROW_BY_ROW_MAX_ROWS).contains(&m) && wide {
        Schedule::RowByRow
    } else if (2..=COLUMN_MAJOR_MAX_ROWS).contains(&m) && wide {
        Schedule::ColumnMajor
    } else {
        Schedule::Direct {
            threads: threads_for(m, n, k),
        }
    }
}

/// One thread below [`MIN_MACS_PER_THREAD`] per thread, otherwise as many
/// rayon threads as get that much work each.
pub fn threads_for(m: usize, n: usize, k: usize) -> usize {
    let macs = m.saturating_mul(n).saturating_mul(k);
    (macs / MIN_MACS_PER_THREAD).clamp(1, rayon::current_num_threads().max(1))
}

/// Makes candle's thread counts constants of the process. Call once at the
/// start of `main`, before any other thread exists (it sets environment
/// variables, and only variables the user has not set).
///
/// - `RAYON_NUM_THREADS` = the count candle computes: candle 0.11 asks
///   `get_num_threads()` on every CPU matmul, and without the variable that
///   re-reads and parses `/proc/cpuinfo` each time (~10% of the engine
///   thread under load, mostly the VQ decoder's many small matmuls). rayon's
///   global pool reads the same variable (physical cores, where rayon alone
///   would count logical CPUs).
/// - with `elementwise_inline` (serving), `CANDLE_NUM_THREADS=1`: candle's
///   element-wise ops above 64K elements otherwise run on its own barrier
///   pool, whose calling thread spin-waits for a worker that a busy 2-core
///   machine has descheduled (24% of the engine thread in one profile). A
///   server's parallelism comes from its threads (engine, render, HTTP), so
///   these ops run on the thread that asks for them.
pub fn pin_candle_threads(elementwise_inline: bool) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if elementwise_inline && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// A one-thread rayon pool: work installed in it runs its rayon-parallel
/// parts (gemm, candle's convolutions) on that one thread, with no hand-off.
pub fn single_thread_pool(name: &str) -> Option<rayon::ThreadPool> {
    let name = name.to_string();
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(move |_| name.clone())
        .build()
        .ok()
}

/// The gemm setting for a thread count.
pub fn parallelism(threads: usize) -> Parallelism {
    if threads <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_products_stay_on_one_thread_and_avoid_packing_w() {
        assert_eq!(schedule_for(1, 768, 256), Schedule::Direct { threads: 1 });
        assert_eq!(schedule_for(3, 768, 256), Schedule::RowByRow);
        assert_eq!(schedule_for(16, 768, 256), Schedule::ColumnMajor);
        assert_eq!(schedule_for(16, 16, 256), Schedule::Direct { threads: 1 });
        assert_eq!(schedule_for(16, 256, 16), Schedule::Direct { threads: 1 });
        assert_eq!(
            schedule_for(1024, 768, 256),
            Schedule::Direct { threads: 1 }
        );
    }
}
