//! The one `gemm` call of the CPU kernels, on row-major matrices inside f32
//! slices, and the schedules that run it ([`super::threading`] picks one by
//! size): straight into the output, row by row, or column-major through a
//! scratch buffer.

use gemm::Parallelism;

use super::threading::{parallelism, schedule_for, Schedule};

/// `out[m, n] (+)= x[m, k] · w[n, k]ᵀ`, all row-major and contiguous.
///
/// With `accumulate` the product is added to `out`, otherwise it replaces it.
///
/// # Panics
/// If a slice is shorter than its shape says.
pub fn matmul_t(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    matmul_t_with(schedule_for(m, n, k), x, m, k, w, n, out, accumulate);
}

/// [`matmul_t`] with the schedule forced instead of chosen by size (for
/// benchmarks and tests).
///
/// # Panics
/// If a slice is shorter than its shape says.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t_with(
    schedule: Schedule,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    let (x, w) = (Rows::new(x, m, k, k), Rows::new(w, n, k, k));
    scheduled_gemm_nt(schedule, x, w, out, n, accumulate, &mut Vec::new());
}

/// A row-major `[rows, cols]` matrix inside a slice, rows `stride` apart.
#[derive(Clone, Copy)]
pub(super) struct Rows<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> Rows<'a> {
    /// # Panics
    /// If the slice cannot hold the matrix.
    pub(super) fn new(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(stride >= cols, "row stride {stride} below {cols} columns");
        let need = if rows == 0 {
            0
        } else {
            (rows - 1) * stride + cols
        };
        assert!(
            data.len() >= need,
            "slice of {} holds no [{rows}, {cols}] matrix with row stride {stride}",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            stride,
        }
    }
}

/// `out[i·out_stride + j] (+)= Σ_k x[i, k]·w[j, k]` for `x [m, k]`, `w [n, k]`,
/// scheduled by [`schedule_for`]; `scratch` backs the column-major schedule.
///
/// # Panics
/// If the inner dims differ or `out` cannot hold `[m, n]` rows `out_stride` apart.
pub(super) fn gemm_nt(
    x: Rows<'_>,
    w: Rows<'_>,
    out: &mut [f32],
    out_stride: usize,
    accumulate: bool,
    scratch: &mut Vec<f32>,
) {
    let schedule = schedule_for(x.rows, w.rows, x.cols);
    scheduled_gemm_nt(schedule, x, w, out, out_stride, accumulate, scratch);
}

/// [`gemm_nt`] with a given schedule.
fn scheduled_gemm_nt(
    schedule: Schedule,
    x: Rows<'_>,
    w: Rows<'_>,
    out: &mut [f32],
    out_stride: usize,
    accumulate: bool,
    scratch: &mut Vec<f32>,
) {
    let (m, n, k) = (x.rows, w.rows, x.cols);
    assert_eq!(
        w.cols, k,
        "inner dims differ: x has {k} columns, w has {}",
        w.cols
    );
    assert!(
        out_stride >= n,
        "output row stride {out_stride} below {n} columns"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        out.len() >= (m - 1) * out_stride + n,
        "output of {} holds no [{m}, {n}] matrix with row stride {out_stride}",
        out.len()
    );
    if k == 0 {
        if !accumulate {
            for row in out.chunks_mut(out_stride).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    match schedule {
        Schedule::Direct { threads } => {
            raw_gemm(x, w, out, out_stride, 1, accumulate, parallelism(threads));
        }
        Schedule::RowByRow => {
            for i in 0..m {
                let x_i = Rows::new(&x.data[i * x.stride..], 1, k, k);
                let out_i = &mut out[i * out_stride..][..n];
                raw_gemm(x_i, w, out_i, n, 1, accumulate, Parallelism::None);
            }
        }
        Schedule::ColumnMajor => {
            scratch.clear();
            scratch.resize(m * n, 0.0);
            raw_gemm(x, w, scratch, 1, m, false, Parallelism::None);
            for (i, row) in out.chunks_mut(out_stride).take(m).enumerate() {
                let column = scratch[i..].iter().step_by(m);
                if accumulate {
                    row[..n].iter_mut().zip(column).for_each(|(o, v)| *o += v);
                } else {
                    row[..n].iter_mut().zip(column).for_each(|(o, v)| *o = *v);
                }
            }
        }
    }
}

/// The one gemm call: `dst (+)= x·wᵀ` with `dst (i, j)` at `i·dst_rs + j·dst_cs`.
///
/// # Panics
/// If `dst` cannot hold every `(i, j)` for `i < x.rows`, `j < w.rows`.
fn raw_gemm(
    x: Rows<'_>,
    w: Rows<'_>,
    dst: &mut [f32],
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    parallelism: Parallelism,
) {
    let (m, n, k) = (x.rows, w.rows, x.cols);
    assert_eq!(w.cols, k, "inner dims differ");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let last = (m - 1) * dst_rs + (n - 1) * dst_cs;
    assert!(dst.len() > last, "destination of {} too short", dst.len());
    // SAFETY: `Rows::new` checked that x holds (i, kk) at i·x.stride + kk and
    // w holds (j, kk) at j·w.stride + kk for i < m, j < n, kk < k; the assert
    // above bounds every dst index. `dst` is a unique borrow, so it aliases
    // neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            x.data.as_ptr(),
            1,
            x.stride as isize,
            w.data.as_ptr(),
            w.stride as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}
