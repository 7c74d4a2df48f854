//! 2-D convolution as im2col + one matmul, with a hand-written backward.
//!
//! Same numbers as `nn.Conv2d` / candle's `conv2d` (a test checks), but on
//! CPU candle's conv2d backward is a naive transposed convolution plus a
//! kernel-gradient convolution with an image-sized kernel; it made a
//! training step of the VQ-VAE several times slower than its forward. Here
//! the forward is one gather (im2col, a custom op) and a matmul, and the
//! backward is the matmul's backward and one scatter-add (col2im).
//!
//! Non-CPU devices use candle's `conv2d` (whose backward is fine there).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor, WithDType};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Sizes of one im2col / col2im: input (B, C, H, W), kernel k, stride s,
/// zero padding p, output positions (oh, ow).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(dims: (usize, usize, usize, usize), k: usize, s: usize, p: usize) -> Result<Self> {
        let (b, c, h, w) = dims;
        if h + 2 * p < k || w + 2 * p < k || s == 0 {
            bail!("conv: input {h}x{w} with padding {p} is smaller than the {k}x{k} kernel");
        }
        let oh = (h + 2 * p - k) / s + 1;
        let ow = (w + 2 * p - k) / s + 1;
        Ok(Self {
            b,
            c,
            h,
            w,
            k,
            s,
            p,
            oh,
            ow,
        })
    }

    /// Output positions along one axis whose input index `o * s + d - p`
    /// lies inside `0..size`, as a range.
    fn valid(&self, d: usize, size: usize, out: usize) -> std::ops::Range<usize> {
        let s = self.s;
        // o * s + d >= p  <=>  o >= ceil((p - d) / s)
        let lo = self.p.saturating_sub(d).div_ceil(s);
        // o * s + d - p < size  <=>  o * s < size + p - d
        let hi = (size + self.p).saturating_sub(d).div_ceil(s);
        lo.min(out)..hi.min(out)
    }

    /// Columns per image, oh * ow.
    fn positions(&self) -> usize {
        self.oh * self.ow
    }

    fn cols_shape(&self) -> Shape {
        Shape::from((self.c * self.k * self.k, self.b * self.positions()))
    }

    fn image_shape(&self) -> Shape {
        Shape::from((self.b, self.c, self.h, self.w))
    }

    /// Copies plane (b, c) of the image into its k*k rows of columns.
    /// `rows` holds the k*k rows of channel c, each of length B * oh * ow.
    fn gather<T: Copy + Default>(&self, plane: &[T], rows: &mut [T], b: usize) {
        let (k, s, ow, row_len) = (self.k, self.s, self.ow, self.b * self.positions());
        for dy in 0..k {
            let ys = self.valid(dy, self.h, self.oh);
            for dx in 0..k {
                let xs = self.valid(dx, self.w, self.ow);
                let start = (dy * k + dx) * row_len + b * self.positions();
                let dst = &mut rows[start..start + self.positions()];
                dst.fill(T::default());
                for oy in ys.clone() {
                    let iy = oy * s + dy - self.p;
                    let src_row = &plane[iy * self.w..(iy + 1) * self.w];
                    let dst_row = &mut dst[oy * ow..(oy + 1) * ow];
                    if s == 1 {
                        let ix0 = xs.start + dx - self.p;
                        dst_row[xs.clone()].copy_from_slice(&src_row[ix0..ix0 + xs.len()]);
                    } else {
                        for ox in xs.clone() {
                            dst_row[ox] = src_row[ox * s + dx - self.p];
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of `gather`: sums the k*k column rows of channel c,
    /// image b, back onto `plane` (H*W), which it overwrites.
    fn scatter_add<T: Copy + Default + std::ops::AddAssign>(
        &self,
        rows: &[T],
        plane: &mut [T],
        b: usize,
    ) {
        let (k, s, ow, row_len) = (self.k, self.s, self.ow, self.b * self.positions());
        plane.fill(T::default());
        for dy in 0..k {
            let ys = self.valid(dy, self.h, self.oh);
            for dx in 0..k {
                let xs = self.valid(dx, self.w, self.ow);
                let start = (dy * k + dx) * row_len + b * self.positions();
                let src = &rows[start..start + self.positions()];
                for oy in ys.clone() {
                    let iy = oy * s + dy - self.p;
                    let dst_row = &mut plane[iy * self.w..(iy + 1) * self.w];
                    let src_row = &src[oy * ow..(oy + 1) * ow];
                    for ox in xs.clone() {
                        dst_row[ox * s + dx - self.p] += src_row[ox];
                    }
                }
            }
        }
    }
}

/// Whether to spread im2col/col2im over rayon's pool: only when candle
/// itself runs multi-threaded. With one candle thread (data-parallel
/// training runs its own threads) a one-thread pool would serialize callers.
fn parallel() -> bool {
    candle_core::utils::get_num_threads() > 1
}

fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Image (B, C, H, W) -> columns (C*k*k, B*oh*ow): row c*k*k + dy*k + dx,
/// column b*oh*ow + oy*ow + ox holds input pixel (b, c, oy*s+dy-p,
/// ox*s+dx-p), or 0 in the padding.
struct Im2Col(Geometry);

/// The adjoint of [`Im2Col`]: columns -> image, summing overlaps.
struct Col2Im(Geometry);

impl Im2Col {
    fn run<T: WithDType + Default>(&self, src: &[T]) -> Vec<T> {
        let g = &self.0;
        let plane = g.h * g.w;
        let per_channel = g.k * g.k * g.b * g.positions();
        let mut dst = vec![T::default(); g.c * per_channel];
        let work = |(c, rows): (usize, &mut [T])| {
            for b in 0..g.b {
                let start = (b * g.c + c) * plane;
                g.gather(&src[start..start + plane], rows, b);
            }
        };
        if parallel() {
            dst.par_chunks_mut(per_channel).enumerate().for_each(work);
        } else {
            dst.chunks_mut(per_channel).enumerate().for_each(work);
        }
        dst
    }
}

impl Col2Im {
    fn run<T: WithDType + Default + std::ops::AddAssign>(&self, src: &[T]) -> Vec<T> {
        let g = &self.0;
        let plane = g.h * g.w;
        let per_channel = g.k * g.k * g.b * g.positions();
        let mut dst = vec![T::default(); g.b * g.c * plane];
        let work = |(i, out): (usize, &mut [T])| {
            let (b, c) = (i / g.c, i % g.c);
            g.scatter_add(&src[c * per_channel..(c + 1) * per_channel], out, b);
        };
        if parallel() {
            dst.par_chunks_mut(plane).enumerate().for_each(work);
        } else {
            dst.chunks_mut(plane).enumerate().for_each(work);
        }
        dst
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "vq-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(contiguous_slice(v, layout, "im2col")?)),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(contiguous_slice(v, layout, "im2col")?)),
            other => bail!("im2col: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, self.0.cols_shape()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "vq-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(contiguous_slice(v, layout, "col2im")?)),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(contiguous_slice(v, layout, "col2im")?)),
            other => bail!("col2im: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, self.0.image_shape()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// A square 2-D convolution with bias, `nn.Conv2d` semantics: weight
/// (out, in, k, k), bias (out), zero padding, stride.
///
/// On CPU the batch is folded into the matmul's columns, (out, K) x (K, B*L),
/// and the bias is added along the last axis: then every reduction in the
/// backward runs over a contiguous last axis (candle's fast path) instead
/// of over the batch axis, which candle reduces element by element.
#[derive(Debug, Clone)]
pub struct Conv {
    /// (out, in, k, k), as in the checkpoint.
    weight: Tensor,
    /// (out, in*k*k): the same weight, flattened for the matmul.
    weight_flat: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// Asks `vb` for `weight` and `bias` (candle_nn's conv2d, so names and
    /// initialisation hints are candle's).
    pub fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)?;
        let Some(bias) = conv.bias() else {
            bail!("conv2d built without a bias");
        };
        Ok(Self {
            weight: conv.weight().clone(),
            weight_flat: conv.weight().reshape((out_c, in_c * kernel * kernel))?,
            bias: bias.clone(),
            kernel,
            stride,
            padding,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let out_c = self.weight.dim(0)?;
        if !x.device().is_cpu() {
            let y = x.conv2d(&self.weight, p, s, 1, 1)?;
            return y.broadcast_add(&self.bias.reshape((1, out_c, 1, 1))?);
        }
        let g = Geometry::new(x.dims4()?, k, s, p)?;
        let cols = if k == 1 && s == 1 && p == 0 {
            // (B, C, H, W) -> (C, B*H*W)
            x.transpose(0, 1)?
                .contiguous()?
                .reshape((g.c, g.b * g.positions()))?
        } else {
            x.contiguous()?.apply_op1(Im2Col(g))?
        };
        // (out, C*k*k) x (C*k*k, B*L) -> (out, B*L) -> (B, out, oh, ow)
        self.weight_flat
            .matmul(&cols)?
            .broadcast_add(&self.bias.reshape((out_c, 1))?)?
            .reshape((out_c, g.b, g.oh, g.ow))?
            .transpose(0, 1)?
            .contiguous()
    }
}

/// 3x3 convolution, stride 1, padding 1 (keeps the spatial size).
pub fn conv3x3(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv> {
    Conv::new(in_c, out_c, 3, 1, 1, vb)
}

/// 1x1 convolution (a per-pixel linear map).
pub fn conv1x1(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv> {
    Conv::new(in_c, out_c, 1, 1, 0, vb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    const CASES: [(usize, usize, usize, usize, usize); 4] = [
        (3, 5, 3, 1, 1),
        (4, 6, 3, 2, 0),
        (5, 7, 1, 1, 0),
        (2, 3, 3, 2, 1),
    ];

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Forward and both gradients equal candle's conv2d's.
    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
        for (i, &(in_c, out_c, k, s, p)) in CASES.iter().enumerate() {
            let conv = Conv::new(in_c, out_c, k, s, p, vb.pp(i)).unwrap();
            for (h, w) in [(7, 7), (8, 8), (8, 6), (9, 10)] {
                let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, in_c, h, w), &dev).unwrap())
                    .unwrap();
                let ours = conv.forward(&x).unwrap();
                let reference = x
                    .conv2d(conv.weight(), p, s, 1, 1)
                    .unwrap()
                    .broadcast_add(&conv.bias().reshape((1, out_c, 1, 1)).unwrap())
                    .unwrap();
                assert_eq!(ours.dims(), reference.dims(), "case {i} {h}x{w}");
                assert!(max_diff(&ours, &reference) < 1e-10, "case {i} {h}x{w}");
                if h != w {
                    // candle's conv2d backward takes the output padding of
                    // both axes from the height and fails on these shapes.
                    continue;
                }
                let r = Tensor::randn(0f64, 1.0, ours.dims(), &dev).unwrap();
                let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let g_ref = (reference * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for t in [x.as_tensor(), conv.weight(), conv.bias()] {
                    let a = g_ours.get(t).unwrap();
                    let b = g_ref.get(t).unwrap();
                    assert!(max_diff(a, b) < 1e-9, "case {i} {h}x{w} gradient");
                }
            }
        }
    }
}
