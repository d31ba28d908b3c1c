"""A faster, output-equivalent SAM2 mask decoder for prompts without a mask input.

:class:`FastBoxDecoder` computes what ``model.sam_mask_decoder(...)`` computes (logits within
float32 rounding, the same masks chosen by the dynamic-multimask rule) when every prompt's
dense embedding is the prompt encoder's ``no_mask_embed``, i.e. no mask input. It reads the
weights from the SAM2 model's own modules (nothing is copied at construction); what depends
only on the image and the weights is computed once per image by :meth:`set_image_features`.
It can decode each prompt only in a window of the logit grid (:meth:`decode_windows`).

Shapes (SAM2.1: C = 256 channels, N = h*w = 64*64 image tokens, D = C/2 attention width,
H = 8 heads of d = D/H = 16, T = 6 output + Ts sparse tokens, 9 for a box):

- ``set_image_features(image_embed (1, C, h, w), [feat_s0 (1, C/8, 4h, 4w), feat_s1 (1, C/4, 2h, 2w)])``
- ``__call__(sparse_embeddings (B, Ts, C), multimask)`` -> ``(logits (B, K, 4h, 4w) float32,
  iou (B, K) float32)``, K = 3 with ``multimask`` else 1; logits are not clamped.
- ``decode_windows(sparse_embeddings, windows (B, 4) cells, multimask, areas=...)`` ->
  :class:`WindowedLogits`: B tensors (K, rows, cols), one per prompt's window.

Derivation (image-token tensors are kept channel-first, (B, channels, N); g, beta are a
LayerNorm's weight and bias, mu and r = 1/std its per-token statistics):

- K0 = image_embed + no_mask_embed and the dense positional encoding PE are the same for every
  prompt, so in the first block (which skips the PE on the tokens' self-attention) the
  token->image keys/values W(K0 + PE), W K0 and the image->token queries W(K0 + PE) are
  computed once per image.
- The image->token attention update of the N image tokens is low rank: with A the softmax over
  the T tokens (H*T x N, all heads stacked) and v the token values, ``out_proj(concat_h A_h v_h)
  = P^T A + b_o`` where P (H*T x C) stacks the rows ``v_h[t] W_o[:, head h]^T``. So
  X1 = K0 + b_o + P1^T A1 and keys1 = LN(X1) = g1 (X1 - mu1) r1 + beta1.
- Any linear map W of keys1 is ``r1 S + Q acat1 + D`` with S = (W g1)(K0 + b_o) and
  D = W beta1 + b (+ W PE where PE is added) shared by all prompts (once per image), a small
  per-prompt Q = [(W g1) P1^T, -(W g1) 1] (rows x 73) and acat1 = r1 [A1; mu1].
- keys2 = LN(X2), X2 = keys1 + b_o2 + P2^T A2. The final token->image attention's k and v and
  the first ConvTranspose2d of the upscaling (kernel 2, stride 2: a per-token linear map
  C -> 4 * C/4) are linear maps of keys2: ``r1 r2 S' + Q' acat + D'`` with
  acat = r2 [r1 A1; r1 mu1; A2; 1; mu2] (147 rows).
- Those keys and values are never formed: the token queries are folded into the low-rank form
  (``_scores``, ``_values``): ``q . k_h(n) = rr(n) (q . S_h(n)) + q . D_h(n) + (q^T Q_h) acat(n)``
  and ``sum_n p(n) v_h(n) = S_h (p rr)^T + D_h p^T + Q_h (acat p^T)``, the shared parts as one
  product per head for all prompts. The final attention is computed only for the IoU and mask
  tokens (each token attends to the image alone there, and only those are used after it).
- X1 and X2 are never formed; their LayerNorm statistics come from Gram matrices. With
  X1 - mu1 = K0c + P1c^T A1 (c: centred over the channels): mu1 = mean(K0 + b_o) + mean(P1) A1
  and |X1 - mu1|^2 = |K0c|^2 + 2 (K0c . P1) A1 + A1^T (P1c P1c^T) A1, where
  K0c . P1[h, t] = (W_o[:, head h]^T K0c) . v_h[t] is a per-head product with a shared matrix.
  Likewise X2 - mu2 = r1 u + L w with the shared u = centred(g1 K0c), a per-prompt
  L (C x 146) and w = [r1 A1; r1 mu1; A2; 1], so |X2 - mu2|^2 = r1^2 |u|^2 + 2 r1 (u^T L) w
  + w^T (L^T L) w.
- Everything after the transformer acts per image token: the first ConvTranspose2d is a
  per-token map of keys2 (so of acat(n)), LayerNorm2d and GELU act per cell, the second
  ConvTranspose2d and the hypernetwork product too. Image token (y, x) makes the 4 x 4 cells
  (4y + 2i + i2, 4x + 2j + j2) of the (4h, 4w) grid, so a window of cells needs only the tokens
  it touches. This runs pixel-major (a row per cell: LayerNorm2d is a plain layer norm, each
  ConvTranspose2d one matrix product) in bands of token rows that stay in the CPU caches.
- Two results depend on the whole grid: sam2's dynamic-multimask rule (single-mask output: mask
  0 unless its stability, counted over all 4h x 4w cells, is below the threshold; then the
  multimask output with the best predicted IoU) and the masks' positive areas (best of three).
  Windowing would change them whenever a mask has cells above the thresholds outside the
  window, so they are counted over every cell (``statistics=None``), which costs the per-pixel
  work of the whole grid for those prompts, or, when asked, only in given cells.
- Token-side work (self-attention, MLPs, LayerNorms of the tokens, hypernetworks, IoU head)
  calls the model's own modules.

Everything runs in float32 (autocast is disabled inside). The per-image precomputation is
redone automatically if the model's decoder or prompt-encoder parameters change (in place,
or moved to another device) after :meth:`FastBoxDecoder.set_image_features`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FastBoxDecoder", "UnsupportedModelError", "WindowedLogits"]


class UnsupportedModelError(ValueError):
    """The SAM2 model's decoder has a configuration :class:`FastBoxDecoder` does not handle."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedModelError(f"FastBoxDecoder does not support this model: {what}")


def _plain_attention(attn: nn.Module, dim: int) -> None:
    from sam2.modeling.sam.transformer import Attention

    _require(type(attn) is Attention, f"{type(attn).__name__} is not sam2's plain Attention")
    _require(attn.embedding_dim == dim and attn.kv_in_dim == dim, "attention widths")


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer`` applied to channel-first ``x`` (in_features, N) -> (out_features, N)."""
    return torch.addmm(layer.bias[:, None], layer.weight, x)


class FastBoxDecoder:
    """SAM2 mask decoder for box prompts without mask input (see the module docstring).

    Args:
        model: A built SAM2 model (``SAM2Base``) with high-resolution features in the decoder.
        chunk: Prompts processed together inside one call (bounds memory; the output does not
            depend on it). Default: 4 on the CPU (fastest there), 64 elsewhere.
        tile: Half-resolution cells (4 per image token) per step of the pixel side, summed over
            the prompts of a chunk. Default: 8192 on the CPU, everything at once elsewhere.

    Raises:
        UnsupportedModelError: the decoder's configuration differs from SAM2/SAM2.1's
            (two-way transformer of depth 2, plain attention, high-resolution features,
            kernel-2 stride-2 upscaling, ...); callers fall back to sam2's decoder.
    """

    def __init__(self, model: nn.Module, chunk: int | None = None, tile: int | None = None,
                 ) -> None:
        self.model = model
        self.chunk = None if chunk is None else max(1, int(chunk))
        self.tile = None if tile is None else max(256, int(tile))
        self._check(model)
        self._cache: dict[str, Any] | None = None
        self._features: tuple[Tensor, list[Tensor]] | None = None
        self._signature: tuple | None = None

    def _weights_signature(self) -> tuple:
        """Identifies the current values of the parameters the per-image cache depends on."""
        penc = self.model.sam_prompt_encoder
        tensors = [*self.model.sam_mask_decoder.parameters(), penc.no_mask_embed.weight,
                   penc.pe_layer.positional_encoding_gaussian_matrix]
        signature = []
        for tensor in tensors:
            try:
                version = tensor._version
            except RuntimeError:  # inference tensors have no version counter
                version = None
            signature.append((tensor.data_ptr(), version, tensor.device, tensor.dtype))
        return tuple(signature)

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _check(model: nn.Module) -> None:
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer
        from sam2.modeling.sam2_utils import MLP, LayerNorm2d

        dec = getattr(model, "sam_mask_decoder", None)
        penc = getattr(model, "sam_prompt_encoder", None)
        _require(type(dec) is MaskDecoder, "no sam2 MaskDecoder")
        _require(type(penc) is PromptEncoder, "no sam2 PromptEncoder")
        _require(dec.use_high_res_features, "decoder without high-resolution features")
        tr = dec.transformer
        _require(type(tr) is TwoWayTransformer, "decoder transformer is not a TwoWayTransformer")
        _require(len(tr.layers) == 2, f"transformer depth {len(tr.layers)} (supported: 2)")
        _require(tr.layers[0].skip_first_layer_pe and not tr.layers[1].skip_first_layer_pe,
                 "positional-encoding layout of the blocks")
        dim = dec.transformer_dim
        _require(dim == tr.embedding_dim and dim % 8 == 0, "transformer width")
        for layer in tr.layers:
            for attn in (layer.self_attn, layer.cross_attn_token_to_image,
                         layer.cross_attn_image_to_token):
                _plain_attention(attn, dim)
            for norm in (layer.norm1, layer.norm2, layer.norm3, layer.norm4):
                _require(type(norm) is nn.LayerNorm and norm.elementwise_affine
                         and tuple(norm.normalized_shape) == (dim,), "LayerNorm")
            _require(layer.cross_attn_image_to_token.num_heads
                     == layer.cross_attn_token_to_image.num_heads, "head counts")
        _plain_attention(tr.final_attn_token_to_image, dim)
        _require(type(tr.norm_final_attn) is nn.LayerNorm, "final LayerNorm")
        ups = dec.output_upscaling
        _require(isinstance(ups, nn.Sequential) and len(ups) == 5, "output_upscaling layout")
        dc1, ln1, act1, dc2, act2 = ups
        for conv, cin, cout in ((dc1, dim, dim // 4), (dc2, dim // 4, dim // 8)):
            _require(type(conv) is nn.ConvTranspose2d and conv.in_channels == cin
                     and conv.out_channels == cout and conv.kernel_size == (2, 2)
                     and conv.stride == (2, 2) and conv.padding == (0, 0)
                     and conv.output_padding == (0, 0) and conv.dilation == (1, 1)
                     and conv.groups == 1 and conv.bias is not None, "upscaling ConvTranspose2d")
        _require(type(ln1) is LayerNorm2d, "upscaling LayerNorm2d")
        for act in (act1, act2):
            _require(type(act) is nn.GELU, "upscaling activation is not GELU")
        _require(len(dec.output_hypernetworks_mlps) == dec.num_mask_tokens
                 and dec.num_mask_tokens >= 2, "hypernetwork MLPs")
        _require(type(dec.iou_prediction_head) is MLP, "IoU head")
        _require(all(mlp.layers[-1].out_features == dim // 8
                     for mlp in dec.output_hypernetworks_mlps), "hypernetwork width")
        attns = [a for layer in tr.layers
                 for a in (layer.cross_attn_token_to_image, layer.cross_attn_image_to_token)]
        attns.append(tr.final_attn_token_to_image)
        _require(len({(a.internal_dim, a.num_heads) for a in attns}) == 1,
                 "cross-attention widths and head counts differ")

    # ------------------------------------------------------------------ per image
    @torch.inference_mode()
    def set_image_features(self, image_embed: Tensor, high_res_feats: list[Tensor]) -> None:
        """Precompute everything that depends only on the image (and the current weights).

        Args:
            image_embed: (1, C, h, w) image embedding (``_features["image_embed"]``).
            high_res_feats: [(1, C/8, 4h, 4w), (1, C/4, 2h, 2w)] (``_features["high_res_feats"]``).
        """
        model = self.model
        dec = model.sam_mask_decoder
        tr = dec.transformer
        l0, l1 = tr.layers
        _require(image_embed.dim() == 4 and image_embed.shape[0] == 1, "image_embed shape")
        _, c, h, w = image_embed.shape
        n = h * w
        feat_s0, feat_s1 = high_res_feats
        _require(tuple(feat_s1.shape) == (1, c // 4, 2 * h, 2 * w)
                 and tuple(feat_s0.shape) == (1, c // 8, 4 * h, 4 * w), "high_res_feats shapes")
        device = image_embed.device
        with torch.autocast(device_type=device.type, enabled=False):
            f32 = torch.float32
            emb = image_embed[0].to(f32).reshape(c, n)
            k0 = emb + model.sam_prompt_encoder.no_mask_embed.weight.reshape(c, 1).to(f32)
            pe = model.sam_prompt_encoder.get_dense_pe().to(device, f32)
            _require(tuple(pe.shape) == (1, c, h, w), "dense positional encoding shape")
            pe = pe.reshape(c, n)
            kp = k0 + pe

            # Block 0: token->image keys/values and image->token queries, shared.
            a = l0.cross_attn_token_to_image
            heads, d = a.num_heads, a.internal_dim // a.num_heads
            t2i_k0 = _linear(a.k_proj, kp).reshape(heads, d, n).transpose(1, 2).contiguous()
            t2i_v0 = _linear(a.v_proj, k0).reshape(heads, d, n).transpose(1, 2).contiguous()
            a = l0.cross_attn_image_to_token
            i2t_q0 = _linear(a.q_proj, kp).reshape(a.num_heads, -1, n)  # (H, d, N)

            bo1 = l0.cross_attn_image_to_token.out_proj.bias.to(f32)
            g1, beta1 = l0.norm4.weight.to(f32), l0.norm4.bias.to(f32)
            k0b = k0 + bo1[:, None]  # X1 = k0b + P1^T A1

            # Block 1: k (with PE), v, image->token q (with PE) as maps of keys1.
            t2i, i2t = l1.cross_attn_token_to_image, l1.cross_attn_image_to_token
            w3 = torch.cat([t2i.k_proj.weight, t2i.v_proj.weight, i2t.q_proj.weight]).to(f32)
            b3 = torch.cat([t2i.k_proj.bias, t2i.v_proj.bias, i2t.q_proj.bias]).to(f32)
            w3g = w3 * g1
            s3 = w3g @ k0b
            di = t2i.k_proj.out_features
            pe3 = torch.cat([t2i.k_proj.weight @ pe, torch.zeros(di, n, device=device, dtype=f32),
                             i2t.q_proj.weight @ pe])
            d3 = pe3 + (w3 @ beta1 + b3)[:, None]
            # rows in order (head, {k, v, q}, d) so that per-head slices are batched views
            perm3 = (torch.arange(3 * di, device=device).reshape(3, heads, d).transpose(0, 1)
                     .reshape(-1))
            w3g, s3, d3 = w3g[perm3], s3[perm3], d3[perm3]

            # Final attention k (with PE), v and the first ConvTranspose2d as maps of keys2.
            bo2 = i2t.out_proj.bias.to(f32)
            g2, beta2 = l1.norm4.weight.to(f32), l1.norm4.bias.to(f32)
            fin = tr.final_attn_token_to_image
            dc1, ln_up, _, dc2, _ = dec.output_upscaling
            c4, c8 = c // 4, c // 8
            wd1 = dc1.weight.to(f32).permute(1, 2, 3, 0).reshape(4 * c4, c)  # rows (o, i, j)
            bd1 = dc1.bias.to(f32).repeat_interleave(4)
            w5 = torch.cat([fin.k_proj.weight.to(f32), fin.v_proj.weight.to(f32), wd1])
            b5 = torch.cat([fin.k_proj.bias.to(f32), fin.v_proj.bias.to(f32), bd1])
            w5g2 = w5 * g2
            w5g21 = w5g2 * g1
            s5 = w5g21 @ k0b
            # feat_s1 (C/4, 2h, 2w) in sub-pixel order (o, i, j, y, x) to add to the dc1 rows.
            fs1 = (feat_s1[0].to(f32).reshape(c4, h, 2, w, 2).permute(0, 2, 4, 1, 3)
                   .reshape(4 * c4, n))
            dk = fin.k_proj.out_features
            pe5 = torch.cat([fin.k_proj.weight @ pe,
                             torch.zeros(fin.v_proj.out_features, n, device=device, dtype=f32),
                             fs1])
            d5 = pe5 + (w5 @ beta2 + b5)[:, None]
            q5_tail = torch.stack([-w5g21.sum(1), w5g2 @ (beta1 + bo2), -w5g2.sum(1)], 1)
            # k, v rows in order (head, {k, v}, d); the ConvTranspose rows (o, i, j) follow
            perm5 = torch.cat([torch.arange(2 * dk, device=device).reshape(2, heads, d)
                               .transpose(0, 1).reshape(-1),
                               torch.arange(2 * dk, 2 * dk + 4 * c4, device=device)])
            w5g2, w5g21, s5, d5, q5_tail = (w5g2[perm5], w5g21[perm5], s5[perm5], d5[perm5],
                                            q5_tail[perm5])

            # LayerNorm statistics of X1 and X2 (see _decode)
            m0 = k0b.mean(0, keepdim=True)
            k0c = k0b - m0
            u = g1[:, None] * k0c
            u = u - u.mean(0, keepdim=True)
            gu = g1[:, None] * u
            gu = gu - gu.mean(0, keepdim=True)
            wo1 = l0.cross_attn_image_to_token.out_proj.weight.to(f32)
            wo2 = i2t.out_proj.weight.to(f32)
            bb = beta1 + bo2
            bc = bb - bb.mean()
            stats = dict(
                m0=m0, e0=(k0c * k0c).sum(0, keepdim=True), e1=(u * u).sum(0, keepdim=True),
                mg0=(g1 @ k0c)[None] / c, mean_bb=bb.mean().reshape(1, 1),
                v1_rhs=torch.cat([wo1.t() @ k0c, wo1.t() @ gu], 1).reshape(heads, d, 2 * n),
                u2t=(wo2.t() @ u).reshape(heads, d, n), bc=bc[:, None], f2c=(bc @ u)[None],
                zero_c=torch.zeros(c, 1, device=device, dtype=f32))

            # The pixel side works pixel-major (a row per cell, the channels along it), so that
            # LayerNorm2d is a plain layer norm and each ConvTranspose2d one matrix product.
            # First ConvTranspose2d rows reordered (o, i, j) -> (i, j, o): a token's (M, 4 C/4)
            # row block is then its 4 half-resolution cells (i, j) x C/4 channels.
            kv = 2 * dk
            ijo = kv + torch.arange(4 * c4, device=device).view(c4, 4).t().reshape(-1)
            rows5 = torch.cat([torch.arange(kv, device=device), ijo])
            w5g2, w5g21, s5, d5, q5_tail = (w5g2[rows5], w5g21[rows5], s5[rows5], d5[rows5], q5_tail[rows5])
            # Second ConvTranspose2d: (C/4, 4 C/8), columns (i2, j2, o2); feat_s0 + bias as
            # (4N, 4 C/8): row (token, i, j), column (i2, j2, o2) = cell (4y + 2i + i2, 4x + 2j + j2).
            wd2 = dc2.weight.to(f32).permute(0, 2, 3, 1).reshape(c4, 4 * c8)
            f0 = (feat_s0[0].to(f32).reshape(c8, h, 2, 2, w, 2, 2).permute(1, 4, 2, 5, 3, 6, 0)
                  .reshape(4 * n, 4 * c8)) + dc2.bias.to(f32).repeat(4)

            # Folded attention (see _scores/_values): per head [S | D] (H, d, 2N) for the score
            # side and [S; D]^T (H, 2N, d) for the value side, S multiplied by r1 (block 1) or
            # r1 r2 (final attention) per prompt.
            s3h, d3h = s3.view(heads, 3, d, n), d3.view(heads, 3, d, n)
            s5h, d5h = s5[:kv].view(heads, 2, d, n), d5[:kv].view(heads, 2, d, n)
            folded = dict(
                sd3k=torch.cat([s3h[:, 0], d3h[:, 0]], -1),
                sd3v_t=torch.cat([s3h[:, 1], d3h[:, 1]], -1).transpose(1, 2).contiguous(),
                sd3q=torch.cat([s3h[:, 2], d3h[:, 2]], -1),
                sd5k=torch.cat([s5h[:, 0], d5h[:, 0]], -1),
                sd5v_t=torch.cat([s5h[:, 1], d5h[:, 1]], -1).transpose(1, 2).contiguous(),
                s5dc=s5[kv:].t().contiguous(), d5dc=d5[kv:].t().contiguous())  # (N, 4 C/4)

        self._features = (image_embed, list(high_res_feats))
        self._signature = self._weights_signature()
        self._cache = dict(
            c=c, h=h, w=w, n=n, heads=heads, d=d, device=device,
            t2i_k0=t2i_k0, t2i_v0=t2i_v0, i2t_q0=i2t_q0,
            g1=g1, w3g=w3g, w3g_sum=w3g.sum(1),
            w5g2=w5g2, w5g21=w5g21, q5_tail=q5_tail, dk=dk, **folded,
            ln_up=(ln_up.weight.to(f32), ln_up.bias.to(f32), ln_up.eps),
            wd2=wd2, f0=f0,
            **stats,
        )

    def reset(self) -> None:
        """Forget the image features."""
        self._cache = self._features = self._signature = None

    # ------------------------------------------------------------------ per prompt
    @torch.inference_mode()
    def __call__(self, sparse_embeddings: Tensor, multimask: bool = False) -> tuple[Tensor, Tensor]:
        """Decode a batch of prompts on the current image, over the whole grid.

        Args:
            sparse_embeddings: (B, Ts, C) from the prompt encoder (box or points, no mask input).
            multimask: Return the three multimask outputs instead of one mask.

        Returns:
            (low_res_logits (B, K, 4h, 4w) float32, iou (B, K) float32), K = 3 or 1.
        """
        z = self._ready(sparse_embeddings)
        whole = torch.tensor([[0, 0, 4 * z["h"], 4 * z["w"]]]).expand(len(sparse_embeddings), -1)
        out = self.decode_windows(sparse_embeddings, whole, multimask)
        k = out.iou.shape[1]
        if not out.logits:
            return torch.zeros(0, k, 4 * z["h"], 4 * z["w"], device=z["device"]), out.iou
        return torch.stack(out.logits), out.iou

    @torch.inference_mode()
    def decode_windows(self, sparse_embeddings: Tensor, windows: Any, multimask: bool = False, *,
                       areas: bool = False, statistics: Any = None) -> WindowedLogits:
        """Decode a batch of prompts on the current image, each only in its window of the grid.

        Inside its window a prompt's logits are those of :meth:`__call__` (float rounding
        aside); the rest of the grid is not computed where the output does not depend on it.
        Two outputs depend on the whole grid: the single-mask output's dynamic-multimask rule
        (sam2 counts mask 0's cells above +-delta, its stability, over the whole grid) and,
        with ``areas``, each mask's positive area. By default they are counted exactly over
        every cell, which costs the per-pixel work of the whole grid for those prompts.

        Args:
            sparse_embeddings: (B, Ts, C) from the prompt encoder (box or points, no mask input).
            windows: int (B, 4) ``(top, left, bottom, right)`` cells of the (4h, 4w) logit grid,
                half-open (row = y, column = x); clipped to the grid.
            multimask: Return the three multimask outputs instead of one mask.
            areas: Also count each returned mask's cells with logit > 0 (``WindowedLogits.areas``).
            statistics: None (count over the whole grid: sam2's rule exactly), or int (B, 4)
                cells: count only there. Then the rule (and the areas) differ from sam2's
                exactly when mask 0 has cells above -delta (a mask has cells above 0)
                outside them.

        Returns:
            :class:`WindowedLogits`.
        """
        z = self._ready(sparse_embeddings)
        sparse = sparse_embeddings
        boxes = self._cells(windows, len(sparse))
        stats = None if statistics is None else self._cells(statistics, len(sparse))
        k = self.model.sam_mask_decoder.num_mask_tokens - 1 if multimask else 1
        logits: list[Tensor] = []
        ious, counts = [], []
        with torch.autocast(device_type=z["device"].type, enabled=False):
            sparse = sparse.to(z["device"], torch.float32)
            chunk = self.chunk or (4 if z["device"].type == "cpu" else 64)
            for i in range(0, sparse.shape[0], chunk):
                tok = self._tokens(sparse[i:i + chunk])
                part = None if stats is None else stats[i:i + chunk].tolist()
                for masks, iou, area in self._masks(tok, boxes[i:i + chunk].tolist(), multimask, areas, part):
                    logits.append(masks)
                    ious.append(iou)
                    counts.append(area)
        iou_out = torch.stack(ious) if ious else torch.zeros(0, k, device=z["device"])
        area_out = None
        if areas:
            area_out = torch.stack(counts) if counts else torch.zeros(0, k, dtype=torch.int64)
        return WindowedLogits(logits, iou_out, boxes.numpy(), area_out)

    def _cells(self, windows: Any, count: int) -> Tensor:
        """int64 (count, 4) grid windows, clipped to the grid and at least one cell each."""
        gh, gw = 4 * self._cache["h"], 4 * self._cache["w"]
        boxes = torch.as_tensor(np.asarray(windows), dtype=torch.int64).reshape(-1, 4).cpu()
        if len(boxes) != count:
            raise ValueError(f"{count} prompts but {len(boxes)} windows")
        boxes = torch.stack([boxes[:, 0].clamp(0, gh - 1), boxes[:, 1].clamp(0, gw - 1),
                             boxes[:, 2].clamp(1, gh), boxes[:, 3].clamp(1, gw)], 1)
        boxes[:, 2] = torch.maximum(boxes[:, 2], boxes[:, 0] + 1)
        boxes[:, 3] = torch.maximum(boxes[:, 3], boxes[:, 1] + 1)
        return boxes

    def _ready(self, sparse: Tensor) -> dict[str, Any]:
        if self._cache is None or self._features is None:
            raise RuntimeError("set_image_features() before decoding")
        if self._weights_signature() != self._signature:  # weights changed or moved: redo
            self.set_image_features(*self._features)
        z = self._cache
        if sparse.dim() != 3 or sparse.shape[2] != z["c"]:
            raise ValueError(f"expected sparse embeddings (B, T, {z['c']}), got {tuple(sparse.shape)}")
        return z

    # ------------------------------------------------------------------ token side
    def _tokens(self, sparse: Tensor) -> _Tokens:
        """The two-way transformer for a chunk of prompts, and what the pixels need of it."""
        z = self._cache
        dec = self.model.sam_mask_decoder
        tr = dec.transformer
        l0, l1 = tr.layers
        b = sparse.shape[0]
        c, n, heads, d = z["c"], z["n"], z["heads"], z["d"]
        f32 = torch.float32
        scale = d ** -0.5

        if dec.pred_obj_scores:
            out_tok = torch.cat([dec.obj_score_token.weight, dec.iou_token.weight,
                                 dec.mask_tokens.weight])
            s = 1
        else:
            out_tok = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight])
            s = 0
        tokens = torch.cat([out_tok.to(f32).unsqueeze(0).expand(b, -1, -1), sparse], 1)
        t = tokens.shape[1]
        ht = heads * t

        def split(x: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, d)
            return x.reshape(b, t, heads, -1).transpose(1, 2)

        def merge(x: Tensor) -> Tensor:  # (B, H, T, d) -> (B, T, D)
            return x.transpose(1, 2).reshape(b, t, -1)

        def lowrank_p(v_tok: Tensor, out_proj: nn.Linear) -> Tensor:
            """P (B, H*T, C): head h's token values through out_proj's columns of head h."""
            wo = out_proj.weight.to(f32).t().reshape(heads, -1, c)  # (H, d, C)
            return torch.matmul(split(v_tok), wo).reshape(b, ht, c)

        def heads_first(x: Tensor) -> Tensor:  # (B, T, D) -> (H, B*T, d)
            return split(x).transpose(0, 1).reshape(heads, b * t, -1)

        def from_heads(x: Tensor, cols: int) -> Tensor:  # (H, B*T, M) -> (B, H*T, M)
            return x.reshape(heads, b, t, cols).transpose(0, 1).reshape(b, ht, cols)

        # ---- block 0 (no PE on the self-attention, no residual)
        q = l0.norm1(l0.self_attn(q=tokens, k=tokens, v=tokens))
        a = l0.cross_attn_token_to_image
        qq = split(a.q_proj(q + tokens)).transpose(0, 1).reshape(1, heads, b * t, -1)
        o = F.scaled_dot_product_attention(qq, z["t2i_k0"][None], z["t2i_v0"][None])
        o = o.reshape(heads, b, t, -1).transpose(0, 1)  # (B, H, T, d)
        q = l0.norm2(q + a.out_proj(merge(o)))
        q = l0.norm3(q + l0.mlp(q))
        a = l0.cross_attn_image_to_token
        kt = heads_first(a.k_proj(q + tokens))
        scores = torch.matmul(kt, z["i2t_q0"]).mul_(scale)  # (H, BT, N)
        # acat rows: [r1 A1 (HT); r1 mu1; A2 (HT); 1; mu2], later all times r2
        acat = torch.empty(b, 2 * ht + 3, n, device=sparse.device, dtype=f32)
        a1 = acat[:, :ht]
        # (the softmax over the tokens in this layout, then transposed: faster than on a view)
        a1.view(b, heads, t, n).copy_(torch.softmax(scores.view(heads, b, t, n), dim=2).transpose(0, 1))
        v1 = a.v_proj(q)
        p1 = lowrank_p(v1, a.out_proj)  # (B, HT, C): X1 = k0b + P1^T A1
        # LayerNorm statistics of X1 without forming it (k0c = k0b - mean_c k0b):
        # mean = m0 + mean_c(P1) A1; |X1c|^2 = |k0c|^2 + 2 (k0c.P1) A1 + A1^T (P1c P1c^T) A1
        pbar1 = p1.mean(-1, keepdim=True)
        p1c = p1 - pbar1
        f1 = from_heads(torch.matmul(heads_first(v1), z["v1_rhs"]), 2 * n)  # [k0c.P1 | u1.P1]
        mu1 = torch.baddbmm(z["m0"], pbar1.transpose(1, 2), a1)  # (B, 1, N)
        t1 = torch.bmm(torch.bmm(p1c, p1c.transpose(1, 2)), a1).add_(f1[..., :n], alpha=2).mul_(a1)
        sumsq1 = t1.sum(1, keepdim=True).add_(z["e0"])
        r1 = torch.rsqrt(sumsq1.div_(c).add_(l0.norm4.eps))  # (B, 1, N)
        a1.mul_(r1)
        torch.mul(mu1, r1, out=acat[:, ht:ht + 1])
        acat1 = acat[:, :ht + 1]

        # ---- block 1: every projection of keys1 is r1 S + Q acat1 + D (module docstring)
        qs = q + tokens
        q = l1.norm1(q + l1.self_attn(q=qs, k=qs, v=q))
        q3 = torch.cat([torch.matmul(z["w3g"], p1.transpose(1, 2)),
                        (-z["w3g_sum"])[None, :, None].expand(b, -1, 1)], 2)  # (B, 3D, HT+1)
        q3 = q3.view(b, heads, 3, d, ht + 1)  # rows (head, {k, v, q}, d)
        a = l1.cross_attn_token_to_image
        qh = split(a.q_proj(q + tokens)).mul_(scale)
        probs = torch.softmax(_scores(qh, q3[:, :, 0], z["sd3k"], r1, acat1), dim=-1)
        q = l1.norm2(q + a.out_proj(merge(_values(probs, q3[:, :, 1], z["sd3v_t"], r1, acat1))))
        q = l1.norm3(q + l1.mlp(q))
        a = l1.cross_attn_image_to_token
        kh = split(a.k_proj(q + tokens)).mul_(scale)
        scores = _scores(kh, q3[:, :, 2], z["sd3q"], r1, acat1)  # (B, H, T, N)
        a2 = acat[:, ht + 1:2 * ht + 1]
        a2.copy_(torch.softmax(scores, dim=-2).view(b, ht, n))
        acat[:, 2 * ht + 1] = 1.0
        v2 = a.v_proj(q)
        p2 = lowrank_p(v2, a.out_proj)  # X2 = keys1 + b_o2 + P2^T A2
        pbar2 = p2.mean(-1, keepdim=True)
        # mean_c X2 = r1 (mg0 + mean_c(g1 P1c) A1) + mean(beta1 + b_o2) + mean_c(P2) A2
        gbar = torch.matmul(p1c, z["g1"][:, None]).div_(c).transpose(1, 2)  # (B, 1, HT)
        mu2 = torch.baddbmm(torch.addcmul(z["mean_bb"], z["mg0"], r1), gbar, acat[:, :ht])
        mu2.baddbmm_(pbar2.transpose(1, 2), a2)
        # X2 - mu2 = r1 u + L w, w = acat[:, :2HT+2] = [r1 A1; r1 mu1; A2; 1],
        # L = [centred g1 P1c^T | 0 | P2c^T | centred (beta1 + b_o2)]
        u1 = (p1c * z["g1"]).transpose(1, 2)  # (B, C, HT)
        lmat = torch.cat([u1 - u1.mean(1, keepdim=True), z["zero_c"].expand(b, -1, -1),
                          (p2 - pbar2).transpose(1, 2), z["bc"].expand(b, -1, -1)], 2)
        w = acat[:, :2 * ht + 2]
        # |X2 - mu2|^2 = r1^2 |u|^2 + 2 r1 (u . L) w + w^T (L^T L) w, where
        # (u . L) w = (u . P1-part) r1 A1 + (u . P2c) A2 + u . bc
        u2 = from_heads(torch.matmul(heads_first(v2), z["u2t"]), n)  # (B, HT, N)
        uw = (f1[..., n:] * acat[:, :ht]).sum(1, keepdim=True)
        uw += u2.mul_(a2).sum(1, keepdim=True)
        uw += z["f2c"]
        t2 = torch.bmm(torch.bmm(lmat.transpose(1, 2), lmat), w).mul_(w)
        sumsq2 = t2.sum(1, keepdim=True).addcmul_(uw, r1, value=2).addcmul_(z["e1"], r1.square())
        r2 = torch.rsqrt(sumsq2.div_(c).add_(l1.norm4.eps))
        acat[:, 2 * ht + 2:] = mu2
        acat.mul_(r2)
        r12 = r1 * r2

        # ---- final attention: k, v (and the first ConvTranspose2d) are r12 S + Q acat + D
        def keys2_map(rows: slice) -> Tensor:  # Q (B, rows, 2HT+3), columns as acat's rows
            tail = z["q5_tail"][rows]
            return torch.cat([torch.matmul(z["w5g21"][rows], p1.transpose(1, 2)),
                              tail[None, :, :1].expand(b, -1, -1),
                              torch.matmul(z["w5g2"][rows], p2.transpose(1, 2)),
                              tail[None, :, 1:].expand(b, -1, -1)], 2)

        kv = 2 * z["dk"]
        q5 = keys2_map(slice(0, kv)).view(b, heads, 2, d, -1)  # rows (head, {k, v}, d)
        fin = tr.final_attn_token_to_image
        # Only the IoU and mask tokens are used after it, and in the final attention each token
        # attends to the image alone: the others are left out.
        used = slice(s, s + 1 + dec.num_mask_tokens)
        qu = q[:, used]
        tu = qu.shape[1]
        qh = fin.q_proj(qu + tokens[:, used]).reshape(b, tu, heads, d).transpose(1, 2).mul_(scale)
        probs = torch.softmax(_scores(qh, q5[:, :, 0], z["sd5k"], r12, acat), dim=-1)
        o = _values(probs, q5[:, :, 1], z["sd5v_t"], r12, acat)  # (B, H, T', d)
        hs = tr.norm_final_attn(qu + fin.out_proj(o.transpose(1, 2).reshape(b, tu, -1)))

        # ---- heads
        iou = dec.iou_prediction_head(hs[:, 0]).to(f32)
        mask_tokens = hs[:, 1:]
        mlps = dec.output_hypernetworks_mlps
        hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(mlps)], 1).to(f32)
        return _Tokens(acat=acat, r12=r12, qdc=keys2_map(slice(kv, None)), hyper=hyper, iou=iou)

    # ------------------------------------------------------------------ pixel side
    def _masks(self, tok: _Tokens, windows: list[list[int]], multimask: bool, areas: bool,
               statistics: list[list[int]] | None) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """A chunk's masks in their windows (cells ``(top, left, bottom, right)``); the rule's
        and the areas' counts over the whole grid, or over ``statistics`` cells.

        Returns:
            Per prompt: (logits (K, rows, cols), iou (K,), positive areas over the whole grid
            (K,) or None).
        """
        dec = self.model.sam_mask_decoder
        b = tok.iou.shape[0]
        rows = torch.arange(b, device=tok.iou.device)
        dynamic = not multimask and dec.dynamic_multimask_via_stability and not dec.training
        if multimask:
            hyper, iou = tok.hyper[:, 1:], tok.iou[:, 1:]
        elif dynamic:  # mask 0 and the best multimask output; sam2's rule picks one of them
            best = torch.argmax(tok.iou[:, 1:], dim=-1) + 1
            pick = torch.stack([torch.zeros_like(best), best], 1)
            hyper, iou = tok.hyper[rows[:, None], pick], tok.iou[rows[:, None], pick]
        else:
            hyper, iou = tok.hyper[:, :1], tok.iou[:, :1]
        delta = dec.dynamic_multimask_stability_delta
        # what is counted: mask 0's cells above +-delta (its stability), each mask's above 0
        count = _Count(torch.tensor([delta, -delta], device=hyper.device) if dynamic else None, areas)
        if count and statistics is None:
            masks, counts = self._whole_grid(tok, hyper, windows, count)
        else:
            both = [self._window(tok, j, windows[j], hyper[j], count, statistics and statistics[j])
                    for j in range(b)]
            masks, counts = [m for m, _ in both], [c for _, c in both]
        out = []
        for j in range(b):
            logits, iou_j, area = masks[j], iou[j], counts[j][:, 2] if areas else None
            if dynamic:
                # sam2's _dynamic_multimask_via_stability on mask 0, from its whole-grid counts
                area_i, area_u = counts[j][0, 0].float(), counts[j][0, 1].float()
                stability = torch.where(area_u > 0, area_i / area_u, 1.0)
                k = 0 if bool(stability >= dec.dynamic_multimask_stability_thresh) else 1
                logits, iou_j = logits[k:k + 1], iou_j[k:k + 1]
                area = None if area is None else area[k:k + 1]
            out.append((logits, iou_j, area))
        return out

    def _tile_tokens(self, device: torch.device) -> int:
        return max(64, (self.tile or (8192 if device.type == "cpu" else 4 * self._cache["n"])) // 4)

    def _window(self, tok: _Tokens, j: int, window: list[int], hyper: Tensor, count: _Count,
                statistics: list[int] | None) -> tuple[Tensor, Tensor]:
        """Prompt ``j``'s masks of ``hyper`` (K, C/8) in ``window`` (top, left, bottom, right
        cells), and their ``count`` in the ``statistics`` cells (if any).

        Only the image tokens these cells touch are computed (a token is a 4 x 4 block of
        cells), in bands of token rows.

        Returns:
            (K, rows, cols) logits, (K, 3) int64 counts (:class:`_Count`).
        """
        cells = window if statistics is None else [min(window[0], statistics[0]), min(window[1], statistics[1]),
                                                   max(window[2], statistics[2]), max(window[3], statistics[3])]
        ty0, tx0, ty1, tx1 = cells[0] // 4, cells[1] // 4, -(-cells[2] // 4), -(-cells[3] // 4)
        band = max(1, self._tile_tokens(hyper.device) // (tx1 - tx0))
        parts = []
        for y0 in range(ty0, ty1, band):
            y1 = min(y0 + band, ty1)
            logits = self._pixels(tok, slice(j, j + 1), (y0, y1, tx0, tx1), hyper[None])
            parts.append(_cells(logits.view(y1 - y0, tx1 - tx0, 2, 2, 2, 2, -1)))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)

        def crop(w: list[int]) -> Tensor:
            return out[:, w[0] - 4 * ty0:w[2] - 4 * ty0, w[1] - 4 * tx0:w[3] - 4 * tx0]

        counts = torch.zeros(hyper.shape[0], 3, dtype=torch.int64, device=hyper.device)
        if statistics is not None and count:
            count.add(counts[None], crop(statistics).reshape(hyper.shape[0], -1).t()[None])
        return crop(window).contiguous(), counts

    def _whole_grid(self, tok: _Tokens, hyper: Tensor, windows: list[list[int]], count: _Count,
                    ) -> tuple[list[Tensor], Tensor]:
        """Every prompt's masks of ``hyper`` (B, K, C/8) over the whole grid, in bands of token
        rows (all prompts of the chunk together): their ``count`` and the part in each
        prompt's window.

        Returns:
            (B tensors (K, rows, cols), (B, K, 3) int64 counts).
        """
        z = self._cache
        gh, gw = z["h"], z["w"]
        b, k = hyper.shape[:2]
        tokens = [(w[0] // 4, w[1] // 4, -(-w[2] // 4), -(-w[3] // 4)) for w in windows]
        outs = [torch.empty(k, 4 * (y1 - y0), 4 * (x1 - x0), device=hyper.device) for y0, x0, y1, x1 in tokens]
        counts = torch.zeros(b, k, 3, dtype=torch.int64, device=hyper.device)
        band = max(1, self._tile_tokens(hyper.device) // (gw * b))
        for y0 in range(0, gh, band):
            y1 = min(y0 + band, gh)
            logits = self._pixels(tok, slice(None), (y0, y1, 0, gw), hyper)  # (B, 16 M, K)
            count.add(counts, logits)
            logits = logits.view(b, y1 - y0, gw, 2, 2, 2, 2, k)
            for j, (ty0, tx0, ty1, tx1) in enumerate(tokens):
                r0, r1 = max(y0, ty0), min(y1, ty1)
                if r0 < r1:
                    outs[j][:, 4 * (r0 - ty0):4 * (r1 - ty0)] = _cells(logits[j, r0 - y0:r1 - y0, tx0:tx1])
        crops = [out[:, w[0] - 4 * t[0]:w[2] - 4 * t[0], w[1] - 4 * t[1]:w[3] - 4 * t[1]].contiguous()
                 for out, w, t in zip(outs, windows, tokens, strict=True)]
        return crops, counts

    def _pixels(self, tok: _Tokens, js: slice, block: tuple[int, int, int, int], hyper: Tensor) -> Tensor:
        """Everything after the transformer, for the prompts ``js`` of the chunk and the image
        tokens in ``block`` (token rows y0..y1-1, columns x0..x1-1; M = their number): the first
        ConvTranspose2d (+ feat_s1), LayerNorm2d, GELU, the second ConvTranspose2d (+ feat_s0),
        GELU and the hypernetwork product, pixel-major.

        Args:
            hyper: (B', K, C/8) hypernetwork outputs of the masks wanted, per prompt.

        Returns:
            (B', 16 M, K) logits, rows (token y, token x, i, j, i2, j2): cell
            (4y + 2i + i2, 4x + 2j + j2).
        """
        z = self._cache
        gw, c4 = z["w"], z["c"] // 4
        y0, y1, x0, x1 = block
        ny, nx = y1 - y0, x1 - x0
        m = ny * nx

        def rows(x: Tensor, dim: int) -> Tensor:  # the block's tokens along ``dim`` (row-major)
            x = x.narrow(dim, y0 * gw, ny * gw)
            if nx == gw:
                return x
            return x.unflatten(dim, (ny, gw)).narrow(dim + 1, x0, nx).flatten(dim, dim + 1)

        acat, r12, qdc = tok.acat[js], tok.r12[js], tok.qdc[js]
        b = acat.shape[0]
        # first ConvTranspose2d (+ feat_s1) as a map of keys2: (B', M, 4 C/4), columns (i, j, o)
        x = torch.addcmul(rows(z["d5dc"], 0), rows(z["s5dc"], 0), rows(r12, 2).transpose(1, 2))
        x = x.baddbmm_(rows(acat, 2).transpose(1, 2), qdc.transpose(1, 2))
        lw, lb, leps = z["ln_up"]
        _, _, act1, _, act2 = self.model.sam_mask_decoder.output_upscaling
        x = F.gelu(F.layer_norm(x.view(b * 4 * m, c4), (c4,), lw, lb, leps), approximate=act1.approximate)
        # second ConvTranspose2d + feat_s0: (B', 4M, 4 C/8), columns (i2, j2, o2)
        f0 = rows(z["f0"].view(-1, 4, z["f0"].shape[1]), 0).reshape(4 * m, -1)
        y = torch.matmul(x.view(b, 4 * m, c4), z["wd2"]).add_(f0)
        y = F.gelu(y, approximate=act2.approximate)
        return torch.bmm(y.view(b, 16 * m, -1), hyper.transpose(1, 2))


@dataclass
class _Tokens:
    """What the pixel side needs of a chunk's transformer pass (B prompts, R = 2HT + 3).

    Attributes:
        acat: (B, R, N) ``r2 [r1 A1; r1 mu1; A2; 1; mu2]``.
        r12: (B, 1, N) ``r1 r2``.
        qdc: (B, 4 * C/4, R) the first ConvTranspose2d's rows (o, i, j) as maps of ``acat``.
        hyper: (B, M, C/8) every mask token's hypernetwork output.
        iou: (B, M) IoU predictions of the M mask tokens.
    """

    acat: Tensor
    r12: Tensor
    qdc: Tensor
    hyper: Tensor
    iou: Tensor


@dataclass
class _Count:
    """What the rule and the areas need counted: mask 0's cells above each of ``rule`` (+delta,
    -delta), each mask's cells above 0 (``areas``); into int64 (B, K, 3): [..., :2] the rule's
    (mask 0 only), [..., 2] the areas."""

    rule: Tensor | None
    areas: bool

    def __bool__(self) -> bool:
        return self.rule is not None or self.areas

    def add(self, counts: Tensor, logits: Tensor) -> None:
        """Add the counts of ``logits`` (B, P, K): P cells of K masks."""
        if self.rule is not None:
            counts[:, 0, :2] += (logits[:, :, :1] > self.rule).sum(1)
        if self.areas:
            counts[:, :, 2] += (logits > 0).sum(1)


def _cells(logits: Tensor) -> Tensor:
    """(ny, nx, 2, 2, 2, 2, K) logits of a block of tokens (rows y, x, i, j, i2, j2) as
    (K, 4 ny, 4 nx) cells."""
    ny, nx, k = logits.shape[0], logits.shape[1], logits.shape[-1]
    return logits.view(ny, nx, 2, 2, 2, 2, k).permute(6, 0, 2, 4, 1, 3, 5).reshape(k, 4 * ny, 4 * nx)


@dataclass
class WindowedLogits:
    """:meth:`FastBoxDecoder.decode_windows`'s answer for B prompts, K masks each.

    Attributes:
        logits: B float32 tensors (K, rows, cols): prompt b's logits in ``windows[b]``.
        iou: (B, K) float32 IoU predictions.
        windows: int64 (B, 4) ``(top, left, bottom, right)`` grid cells each prompt's logits
            cover (the requested windows, clipped to the grid).
        areas: (B, K) int64 cells with logit > 0 over the whole grid, when asked for.
    """

    logits: list[Tensor]
    iou: Tensor
    windows: np.ndarray
    areas: Tensor | None = None


def _scores(qh: Tensor, coef: Tensor, sd: Tensor, rr: Tensor, acat: Tensor) -> Tensor:
    """Attention scores of token queries against image keys that are linear in ``acat``.

    The keys are ``k_h(n) = rr(n) S_h(n) + D_h(n) + Q_h acat(n)``: S and D shared by all
    prompts, Q per prompt; so ``q . k_h(n) = rr(n) (q . S_h(n)) + q . D_h(n) + (q^T Q_h) acat(n)``
    and the keys themselves are never formed.

    Args:
        qh: (B, H, T, d) queries (already scaled).
        coef: (B, H, d, R) Q per head.
        sd: (H, d, 2N) ``[S_h | D_h]``.
        rr: (B, 1, N) the per-prompt factor of S.
        acat: (B, R, N).

    Returns:
        (B, H, T, N) scores.
    """
    b, heads, t, d = qh.shape
    n = acat.shape[-1]
    shared = torch.matmul(qh.transpose(0, 1).reshape(heads, b * t, d), sd)  # (H, BT, 2N)
    shared = shared.view(heads, b, t, 2, n).permute(1, 0, 2, 3, 4)  # (B, H, T, 2, N)
    out = torch.empty(b, heads, t, n, device=qh.device, dtype=qh.dtype)
    torch.addcmul(shared[..., 1, :], shared[..., 0, :], rr.view(b, 1, 1, n), out=out)
    out.view(b, heads * t, n).baddbmm_(torch.matmul(qh, coef).view(b, heads * t, -1), acat)
    return out


def _values(probs: Tensor, coef: Tensor, sd_t: Tensor, rr: Tensor, acat: Tensor) -> Tensor:
    """Attention output over values that are linear in ``acat`` (as the keys of :func:`_scores`):
    ``sum_n p(n) v_h(n) = S_h (p rr)^T + D_h p^T + Q_h (acat p^T)``.

    Args:
        probs: (B, H, T, N) attention probabilities.
        coef: (B, H, d, R) Q per head.
        sd_t: (H, 2N, d) ``[S_h^T; D_h^T]``.
        rr: (B, 1, N).
        acat: (B, R, N).

    Returns:
        (B, H, T, d).
    """
    b, heads, t, n = probs.shape
    d = coef.shape[2]
    ph = probs.transpose(0, 1)  # (H, B, T, N)
    both = torch.empty(heads, b, t, 2, n, device=probs.device, dtype=probs.dtype)
    torch.mul(ph, rr.view(1, b, 1, n), out=both[:, :, :, 0])
    both[:, :, :, 1].copy_(ph)
    shared = torch.bmm(both.view(heads, b * t, 2 * n), sd_t).view(heads, b, t, d)
    zt = torch.bmm(acat, probs.reshape(b, heads * t, n).transpose(1, 2))  # (B, R, HT)
    own = torch.matmul(coef, zt.view(b, -1, heads, t).permute(0, 2, 1, 3))  # (B, H, d, T)
    return shared.transpose(0, 1) + own.transpose(2, 3)
