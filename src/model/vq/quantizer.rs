//! taming's `VectorQuantizer2` (`quantize.embedding.weight`, [n_embed,
//! embed_dim]): every latent vector is replaced by its nearest codebook entry
//! in L2, and gradients pass straight through to the encoder.
//!
//! Code order is taming's: latents (B, C, h, w) are flattened as (b, y, x), so
//! the codes of one image are its grid read row by row.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};

/// What one quantization pass produces during training.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// Straight-through quantized latents, (B, embed_dim, h, w): the value of
    /// the codebook entries with the gradient of the encoder output.
    pub z_q: Tensor,
    /// Chosen codes, (B, h*w) u32.
    pub codes: Tensor,
    /// `mean((z_q - sg(z))^2)`: moves the codebook towards the encoder output.
    pub codebook_loss: Tensor,
    /// `mean((sg(z_q) - z)^2)`: keeps the encoder close to its codes.
    pub commitment_loss: Tensor,
}

#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    embedding: Embedding,
    num_embeddings: usize,
    embed_dim: usize,
}

impl VectorQuantizer {
    /// `vb` is the `quantize` prefix; the codebook is `embedding.weight`.
    pub fn new(num_embeddings: usize, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            embedding: embedding(num_embeddings, embed_dim, vb.pp("embedding"))?,
            num_embeddings,
            embed_dim,
        })
    }

    pub fn codebook(&self) -> &Tensor {
        self.embedding.embeddings()
    }

    pub fn num_embeddings(&self) -> usize {
        self.num_embeddings
    }

    /// Nearest codebook entry of every row of `z_flat` (N, embed_dim), using
    /// taming's expansion `|z|^2 + |e|^2 - 2 z.e`. Returns (N,) u32.
    pub fn nearest_codes(&self, z_flat: &Tensor) -> Result<Tensor> {
        let codebook = self.codebook().detach();
        let z = z_flat.detach();
        let z_sq = z.sqr()?.sum_keepdim(1)?; // (N, 1)
        let e_sq = codebook.sqr()?.sum(1)?.unsqueeze(0)?; // (1, n_embed)
        let cross = z.matmul(&codebook.t()?)?; // (N, n_embed)
        let dist = z_sq.broadcast_add(&e_sq)?.sub(&(cross * 2.0)?)?;
        dist.argmin(D::Minus1)?.to_dtype(DType::U32)
    }

    /// Codebook vectors of `codes` (any shape of u32) as a tensor of shape
    /// `codes.shape() + [embed_dim]`.
    pub fn lookup(&self, codes: &Tensor) -> Result<Tensor> {
        self.embedding.forward(codes)
    }

    /// Codes of latents (B, embed_dim, h, w) -> (B, h*w) u32.
    pub fn encode(&self, z: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = z.dims4()?;
        let flat = Self::flatten(z)?;
        self.nearest_codes(&flat)?.reshape((b, h * w))
    }

    /// Latents of codes (B, h*w) on an h x w grid -> (B, embed_dim, h, w).
    pub fn decode(&self, codes: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let b = codes.dim(0)?;
        self.lookup(codes)?
            .reshape((b, h, w, self.embed_dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// Training forward: quantize with the straight-through estimator and
    /// return both VQ loss terms separately (the trainer weighs them).
    pub fn quantize(&self, z: &Tensor) -> Result<Quantized> {
        let (b, c, h, w) = z.dims4()?;
        let flat = Self::flatten(z)?;
        let codes = self.nearest_codes(&flat)?;
        let chosen = self.lookup(&codes)?; // (N, C), gradient to the codebook
        let codebook_loss = (&chosen - flat.detach())?.sqr()?.mean_all()?;
        let commitment_loss = (chosen.detach() - &flat)?.sqr()?.mean_all()?;
        // z + sg(z_q - z): forward value z_q, gradient of z.
        let straight = (&flat + (&chosen - &flat)?.detach())?;
        let z_q = straight
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        Ok(Quantized {
            z_q,
            codes: codes.reshape((b, h * w))?,
            codebook_loss,
            commitment_loss,
        })
    }

    /// (B, C, h, w) -> (B*h*w, C), rows in (b, y, x) order.
    fn flatten(z: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z.dims4()?;
        z.permute((0, 2, 3, 1))?.reshape((b * h * w, c))
    }
}
