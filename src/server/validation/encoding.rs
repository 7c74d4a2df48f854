//! Checked prompt pieces -> token ids: text through the tokenizer (reserved
//! tokens refused), images decoded from PNG under size limits and encoded by
//! the VQ model into `<boi> codes <eoi>`. Blocking work: the handlers call it
//! through `web::block`.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, RgbImage};

use super::{PromptPiece, Validator};
use crate::server::error::ApiError;

/// Largest side of an input picture we agree to decode (it is resized to
/// the VQ resolution anyway); stops decompression bombs.
const MAX_INPUT_IMAGE_SIDE: u32 = 4096;
const MAX_INPUT_IMAGE_BYTES: u64 = 128 * 1024 * 1024;

impl Validator {
    /// Pieces -> token ids (blocking: decodes PNGs, runs the VQ encoder).
    pub fn encode(&self, pieces: &[PromptPiece]) -> Result<Vec<u32>, ApiError> {
        let mut ids: Vec<u32> = self.vocab.bos.into_iter().collect();
        for piece in pieces {
            match piece {
                PromptPiece::Text { field, text } => ids.extend(self.tokenize(field, text)?),
                PromptPiece::Image { field, png } => ids.extend(self.encode_image(field, png)?),
                PromptPiece::ImageStart { field } => ids.push(self.vocab.boi.ok_or_else(|| {
                    ApiError::ImagesUnsupported(format!(
                        "`{field}`: this model has no begin-of-image token"
                    ))
                })?),
            }
            if ids.len() > self.prompt_limit() {
                return Err(self.too_long(ids.len()));
            }
        }
        Ok(ids)
    }

    fn tokenize(&self, field: &str, text: &str) -> Result<Vec<u32>, ApiError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ApiError::InvalidRequest(format!("`{field}` cannot be tokenized: {e}")))?;
        let ids = enc.get_ids().to_vec();
        let v = &self.vocab;
        let reserved = [v.bos, v.eos, v.pad, v.boi, v.eoi];
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| reserved.contains(&Some(id)) || v.modality_of(id) != 0)
        {
            let name = self.tokenizer.id_to_token(bad).unwrap_or_default();
            return Err(ApiError::InvalidRequest(format!(
                "`{field}` contains the reserved token {name:?}; send images as image parts"
            )));
        }
        Ok(ids)
    }

    fn encode_image(&self, field: &str, png: &[u8]) -> Result<Vec<u32>, ApiError> {
        let (Some(vq), Some(boi), Some(eoi)) = (&self.vq, self.vocab.boi, self.vocab.eoi) else {
            return Err(ApiError::ImagesUnsupported(
                "this model cannot read images".into(),
            ));
        };
        let rgb = decode_png(field, png)?;
        let codes = vq
            .encode_rgb(&rgb)
            .map_err(|e| ApiError::Internal(format!("VQ encoding of `{field}` failed: {e:#}")))?;
        if codes.len() != self.vocab.tokens_per_image {
            return Err(ApiError::Internal(format!(
                "the VQ model gives {} codes per image but the decoder expects {}",
                codes.len(),
                self.vocab.tokens_per_image
            )));
        }
        let mut ids = Vec::with_capacity(codes.len() + 2);
        ids.push(boi);
        ids.extend(codes.into_iter().map(|c| self.vocab.image_token(c)));
        ids.push(eoi);
        Ok(ids)
    }
}

fn decode_png(field: &str, png: &[u8]) -> Result<RgbImage, ApiError> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_INPUT_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_INPUT_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_INPUT_IMAGE_BYTES);
    let mut reader = ImageReader::with_format(Cursor::new(png), ImageFormat::Png);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| {
        ApiError::InvalidImage(format!(
            "`{field}` is not a PNG image of at most {MAX_INPUT_IMAGE_SIDE}x{MAX_INPUT_IMAGE_SIDE} pixels: {e}"
        ))
    })?;
    Ok(img.to_rgb8())
}
