"""A faster, output-equivalent SAM2 mask decoder for box prompts without a mask input.

:class:`FastBoxDecoder` computes what ``model.sam_mask_decoder(...)`` computes (logits within
float32 rounding, the same masks chosen by the dynamic-multimask rule) when every prompt's
dense embedding is the prompt encoder's ``no_mask_embed``, i.e. no mask input. It reads the
weights from the SAM2 model's own modules (nothing is copied at construction); what depends
only on the image and the weights is computed once per image by :meth:`set_image_features`.

Shapes (SAM2.1: C = 256 channels, N = h*w = 64*64 image tokens, D = C/2 attention width,
H = 8 heads of d = D/H = 16, T = 6 output + 3 sparse = 9 tokens):

- ``set_image_features(image_embed (1, C, h, w), [feat_s0 (1, C/8, 4h, 4w), feat_s1 (1, C/4, 2h, 2w)])``
- ``__call__(sparse_embeddings (B, Ts, C), multimask)`` -> ``(logits (B, K, 4h, 4w) float32,
  iou (B, K) float32)``, K = 3 with ``multimask`` else 1; logits are not clamped.

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
- Any linear map W of keys1 is ``r1 (S + Q [A1; mu1]) + D`` with S = (W g1)(K0 + b_o) and
  D = W beta1 + b (+ W PE where PE is added) shared by all prompts (once per image) and a small
  per-prompt Q = [(W g1) P1^T, -(W g1) 1] (rows x 73): the second block's three projections
  cost one (384 x 73) @ (73 x N) product instead of (384 x C) @ (C x N).
- keys2 = LN(X2), X2 = keys1 + b_o2 + P2^T A2. The final token->image attention's k and v and
  the first ConvTranspose2d of the upscaling (kernel 2, stride 2: a per-token linear map
  C -> 4 * C/4) are linear maps of keys2: ``r1 r2 S' + Q' r2 [r1 A1; r1 mu1; A2; 1; mu2] + D'``,
  one (512 x 147) @ (147 x N) product per prompt.
- X1 and X2 are never formed; their LayerNorm statistics come from Gram matrices. With
  X1 - mu1 = K0c + P1c^T A1 (c: centred over the channels): mu1 = mean(K0 + b_o) + mean(P1) A1
  and |X1 - mu1|^2 = |K0c|^2 + 2 (K0c . P1) A1 + A1^T (P1c P1c^T) A1, where
  K0c . P1[h, t] = (W_o[:, head h]^T K0c) . v_h[t] is a per-head product with a shared matrix.
  Likewise X2 - mu2 = r1 u + L w with the shared u = centred(g1 K0c), a per-prompt
  L (C x 146) and w = [r1 A1; r1 mu1; A2; 1], so |X2 - mu2|^2 = r1^2 |u|^2 + 2 r1 (u^T L) w
  + w^T (L^T L) w.
- The upscaling's pixel shuffle is deferred: the ConvTranspose outputs stay in sub-pixel order
  (channel, i, j, y, x) (LayerNorm2d and GELU act per pixel, the second ConvTranspose too; the
  high-resolution features are rearranged to that order once per image); it runs on column
  tiles so that its intermediates stay in the CPU caches, and only the final masks are
  shuffled to (4h, 4w).
- Token-side work (self-attention, MLPs, LayerNorms of the tokens, hypernetworks, IoU head)
  calls the model's own modules. The single-mask output applies sam2's dynamic multimask
  fallback via the stability score (only the two candidate masks are computed).

Everything runs in float32 (autocast is disabled inside). The per-image precomputation is
redone automatically if the model's decoder or prompt-encoder parameters change (in place,
or moved to another device) after :meth:`FastBoxDecoder.set_image_features`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FastBoxDecoder", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The SAM2 model's decoder has a configuration :class:`FastBoxDecoder` does not handle."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedModelError(f"FastBoxDecoder does not support this model: {what}")


def _plain_attention(attn: nn.Module, dim: int) -> None:
    from sam2.modeling.sam.transformer import Attention

    _require(type(attn) is Attention, f"{type(attn).__name__} is not sam2's plain Attention")
    _require(attn.embedding_dim == dim and attn.kv_in_dim == dim, "attention widths")


def _center(x: Tensor, ones: Tensor) -> tuple[Tensor, Tensor]:
    """Subtract the channel mean from (B, K, M) ``x`` in place; return the (B, 1, M) mean and
    (biased) variance. ``ones`` is (1, K) filled with 1/K. (Faster than ``torch.var_mean``
    over a non-innermost dimension on the CPU.)"""
    mean = torch.matmul(ones, x)
    x.sub_(mean)
    return mean, torch.matmul(ones, x * x)


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer`` applied to channel-first ``x`` (in_features, N) -> (out_features, N)."""
    return torch.addmm(layer.bias[:, None], layer.weight, x)


class FastBoxDecoder:
    """SAM2 mask decoder for box prompts without mask input (see the module docstring).

    Args:
        model: A built SAM2 model (``SAM2Base``) with high-resolution features in the decoder.
        chunk: Prompts processed together inside one call (bounds memory; the output does not
            depend on it). Default: 2 on the CPU (fastest there), 64 elsewhere.
        tile: Sub-pixel columns (of 4N) per step of the upscaling, summed over the prompts of
            a chunk. Default: 4096 on the CPU, everything at once elsewhere.

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
                zero_c=torch.zeros(c, 1, device=device, dtype=f32),
                zero_n=torch.zeros(1, n, device=device, dtype=f32))

            # Second ConvTranspose2d: rows (o2, i2, j2); feat_s0 + bias in order
            # (o2, i2, j2, i, j, y, x) with pixel (4y + 2i + i2, 4x + 2j + j2).
            wd2 = dc2.weight.to(f32).permute(1, 2, 3, 0).reshape(4 * c8, c4)
            fs0 = (feat_s0[0].to(f32).reshape(c8, h, 2, 2, w, 2, 2).permute(0, 3, 6, 2, 5, 1, 4)
                   .reshape(4 * c8, 4 * n))
            f0 = fs0 + dc2.bias.to(f32).repeat_interleave(4)[:, None]

        self._features = (image_embed, list(high_res_feats))
        self._signature = self._weights_signature()
        self._cache = dict(
            c=c, h=h, w=w, n=n, heads=heads, d=d, device=device,
            t2i_k0=t2i_k0, t2i_v0=t2i_v0, i2t_q0=i2t_q0,
            g1=g1, w3g=w3g, w3g_sum=w3g.sum(1), s3=s3, d3=d3,
            w5g2=w5g2, w5g21=w5g21, s5=s5, d5=d5, q5_tail=q5_tail, dk=dk,
            ln_up=(ln_up.weight.to(f32), ln_up.bias.to(f32), ln_up.eps),
            wd2=wd2, f0=f0,
            **stats,
            ones_c4=torch.full((1, c4), 1.0 / c4, device=device, dtype=f32),
        )

    def reset(self) -> None:
        """Forget the image features."""
        self._cache = self._features = self._signature = None

    # ------------------------------------------------------------------ per prompt
    @torch.inference_mode()
    def __call__(self, sparse_embeddings: Tensor, multimask: bool = False) -> tuple[Tensor, Tensor]:
        """Decode a batch of prompts on the current image.

        Args:
            sparse_embeddings: (B, Ts, C) from the prompt encoder (box or points, no mask input).
            multimask: Return the three multimask outputs instead of one mask.

        Returns:
            (low_res_logits (B, K, 4h, 4w) float32, iou (B, K) float32), K = 3 or 1.
        """
        if self._cache is None or self._features is None:
            raise RuntimeError("set_image_features() before decoding")
        if self._weights_signature() != self._signature:  # weights changed or moved: redo
            self.set_image_features(*self._features)
        cache = self._cache
        sparse = sparse_embeddings
        if sparse.dim() != 3 or sparse.shape[2] != cache["c"]:
            raise ValueError(f"expected sparse embeddings (B, T, {cache['c']}), "
                             f"got {tuple(sparse.shape)}")
        if sparse.shape[0] == 0:
            k = self.model.sam_mask_decoder.num_mask_tokens - 1 if multimask else 1
            return (torch.zeros(0, k, 4 * cache["h"], 4 * cache["w"], device=cache["device"]),
                    torch.zeros(0, k, device=cache["device"]))
        with torch.autocast(device_type=cache["device"].type, enabled=False):
            sparse = sparse.to(cache["device"], torch.float32)
            chunk = self.chunk or (2 if cache["device"].type == "cpu" else 64)
            outs = [self._decode(sparse[i:i + chunk], multimask)
                    for i in range(0, sparse.shape[0], chunk)]
        if len(outs) == 1:
            return outs[0]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _decode(self, sparse: Tensor, multimask: bool) -> tuple[Tensor, Tensor]:
        z = self._cache
        dec = self.model.sam_mask_decoder
        tr = dec.transformer
        l0, l1 = tr.layers
        b = sparse.shape[0]
        c, n, heads, d = z["c"], z["n"], z["heads"], z["d"]
        f32 = torch.float32

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

        def attend(qt: Tensor, k: Tensor, v: Tensor) -> Tensor:
            """Token->image attention: (B, T, D) queries; k, v (B H, d, N) -> (B, T, D)."""
            qh = split(qt).reshape(b * heads, t, d).mul_(d ** -0.5)
            probs = torch.softmax(torch.bmm(qh, k), dim=-1)  # (B H, T, N)
            return merge(torch.bmm(probs, v.transpose(1, 2)).view(b, heads, t, d))

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
        scores = torch.matmul(kt, z["i2t_q0"]).mul_(d ** -0.5)  # (H, BT, N)
        scores = scores.reshape(heads, b, t, n).transpose(0, 1)  # (B, H, T, N)
        # acat rows: [r1 A1 (HT); r1 mu1; A2 (HT); 1; mu2], later all times r2
        acat = torch.empty(b, 2 * ht + 3, n, device=sparse.device, dtype=f32)
        ones = torch.ones(1, 1, 2 * ht + 2, device=sparse.device, dtype=f32)
        a1 = acat[:, :ht]
        a1.copy_(torch.softmax(scores, dim=-2).reshape(b, ht, n))
        v1 = a.v_proj(q)
        p1 = lowrank_p(v1, a.out_proj)  # (B, HT, C): X1 = k0b + P1^T A1
        # LayerNorm statistics of X1 without forming it (k0c = k0b - mean_c k0b):
        # mean = m0 + mean_c(P1) A1; |X1c|^2 = |k0c|^2 + 2 (k0c.P1) A1 + A1^T (P1c P1c^T) A1
        pbar1 = p1.mean(-1, keepdim=True)
        p1c = p1 - pbar1
        f1 = from_heads(torch.matmul(heads_first(v1), z["v1_rhs"]), 2 * n)  # [k0c.P1 | u1.P1]
        mu1 = torch.baddbmm(z["m0"], pbar1.transpose(1, 2), a1)  # (B, 1, N)
        t1 = torch.baddbmm(f1[..., :n], torch.bmm(p1c, p1c.transpose(1, 2)), a1, beta=2)
        sumsq1 = torch.baddbmm(z["e0"], ones[:, :, :ht].expand(b, -1, -1), t1.mul_(a1))
        r1 = torch.rsqrt(sumsq1.div_(c).add_(l0.norm4.eps))  # (B, 1, N)
        a1.mul_(r1)
        torch.mul(mu1, r1, out=acat[:, ht:ht + 1])

        # ---- block 1
        qs = q + tokens
        q = l1.norm1(q + l1.self_attn(q=qs, k=qs, v=q))
        q3 = torch.cat([torch.matmul(z["w3g"], p1.transpose(1, 2)),
                        (-z["w3g_sum"])[None, :, None].expand(b, -1, 1)], 2)  # (B, 3D, HT+1)
        y3 = torch.addcmul(z["d3"], z["s3"], r1).baddbmm_(q3, acat[:, :ht + 1])
        y3 = y3.view(b * heads, 3 * d, n)  # (B H, {k, v, q} d, N)
        a = l1.cross_attn_token_to_image
        q = l1.norm2(q + a.out_proj(attend(a.q_proj(q + tokens), y3[:, :d], y3[:, d:2 * d])))
        q = l1.norm3(q + l1.mlp(q))
        a = l1.cross_attn_image_to_token
        kt = split(a.k_proj(q + tokens)).reshape(b * heads, t, d).mul_(d ** -0.5)
        scores = torch.bmm(kt, y3[:, 2 * d:]).view(b, heads, t, n)
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
        f2 = torch.cat([f1[..., n:], z["zero_n"].expand(b, -1, -1),
                        from_heads(torch.matmul(heads_first(v2), z["u2t"]), n),
                        z["f2c"].expand(b, -1, -1)], 1)  # u . L
        t2 = torch.baddbmm(f2.mul_(2 * r1), torch.bmm(lmat.transpose(1, 2), lmat), w)
        sumsq2 = torch.baddbmm(z["e1"] * r1.square(), ones.expand(b, -1, -1), t2.mul_(w))
        r2 = torch.rsqrt(sumsq2.div_(c).add_(l1.norm4.eps))
        acat[:, 2 * ht + 2:] = mu2
        acat.mul_(r2)

        # ---- final attention k, v and first ConvTranspose2d, as maps of keys2
        q5 = torch.cat([torch.matmul(z["w5g21"], p1.transpose(1, 2)),
                        z["q5_tail"][None, :, :1].expand(b, -1, -1),
                        torch.matmul(z["w5g2"], p2.transpose(1, 2)),
                        z["q5_tail"][None, :, 1:].expand(b, -1, -1)], 2)
        # q5 columns match acat's rows: [r12 A1; r12 mu1; r2 A2; r2; r2 mu2]
        r12 = r1 * r2
        kv = 2 * z["dk"]
        y5 = torch.addcmul(z["d5"][:kv], z["s5"][:kv], r12).baddbmm_(q5[:, :kv], acat)
        y5 = y5.view(b * heads, 2 * d, n)  # (B H, {k, v} d, N)
        fin = tr.final_attn_token_to_image
        o = attend(fin.q_proj(q + tokens), y5[:, :d], y5[:, d:])
        hs = tr.norm_final_attn(q + fin.out_proj(o))
        # first ConvTranspose2d (+ feat_s1), rows (o, i, j)
        dc1 = torch.addcmul(z["d5"][kv:], z["s5"][kv:], r12).baddbmm_(q5[:, kv:], acat)

        # ---- heads
        iou = dec.iou_prediction_head(hs[:, s]).to(f32)
        mask_tokens = hs[:, s + 1:s + 1 + dec.num_mask_tokens]
        mlps = dec.output_hypernetworks_mlps
        dynamic = False
        if multimask:
            hyper = torch.stack([mlps[i](mask_tokens[:, i]) for i in range(1, len(mlps))], 1)
        else:
            dynamic = dec.dynamic_multimask_via_stability and not dec.training
            if dynamic:
                rows = torch.arange(b, device=sparse.device)
                best = torch.argmax(iou[:, 1:], dim=-1)  # (B,)
                multi = torch.stack([mlps[i](mask_tokens[:, i]) for i in range(1, len(mlps))], 1)
                hyper = torch.stack([mlps[0](mask_tokens[:, 0]), multi[rows, best]], 1)
            else:
                hyper = mlps[0](mask_tokens[:, 0])[:, None]

        # ---- upscaling and masks, in sub-pixel order
        masks = self._upscale(dc1, hyper.to(f32))  # (B, K, 16N)
        if multimask:
            iou_out = iou[:, 1:]
        elif not dynamic:
            iou_out = iou[:, :1]
        else:
            # sam2's _dynamic_multimask_via_stability (areas do not depend on the pixel order)
            single = masks[:, 0]
            delta = dec.dynamic_multimask_stability_delta
            area_i = torch.sum(single > delta, dim=-1).float()
            area_u = torch.sum(single > -delta, dim=-1).float()
            stability = torch.where(area_u > 0, area_i / area_u, 1.0)
            stable = stability >= dec.dynamic_multimask_stability_thresh  # (B,)
            masks = torch.where(stable[:, None, None], masks[:, :1], masks[:, 1:2])
            iou_out = torch.where(stable[:, None], iou[:, :1], iou[:, 1:][rows, best][:, None])
        k = masks.shape[1]
        h, w = z["h"], z["w"]
        masks = (masks.reshape(b, k, 2, 2, 2, 2, h, w).permute(0, 1, 6, 4, 2, 7, 5, 3)
                 .reshape(b, k, 4 * h, 4 * w))
        return masks, iou_out

    def _upscale(self, dc1: Tensor, hyper: Tensor) -> Tensor:
        """Masks from the first ConvTranspose2d's output (+ feat_s1) and the hypernetworks.

        Args:
            dc1: (B, 4 * C/4, N), rows (o, i, j) (overwritten).
            hyper: (B, K, C/8) hypernetwork outputs.

        Returns:
            (B, K, 16 N) mask logits in sub-pixel order (i2, j2, i, j, y, x).

        Works on column tiles so that the intermediates stay in the CPU caches.
        """
        z = self._cache
        b, k = hyper.shape[:2]
        c4, n = z["c"] // 4, z["n"]
        up = dc1.reshape(b, c4, 4 * n)
        lw, lb, leps = z["ln_up"]
        lw, lb = lw[:, None], lb[:, None]
        wd2 = z["wd2"].expand(b, -1, -1)
        _, _, act1, _, act2 = self.model.sam_mask_decoder.output_upscaling
        out = torch.empty(b, k, 4, 4 * n, device=dc1.device, dtype=torch.float32)
        tile = self.tile or (4096 if dc1.device.type == "cpu" else 4 * n * b)
        tile = max(256, tile // b)
        for start in range(0, 4 * n, tile):
            cols = slice(start, min(start + tile, 4 * n))
            x = up[:, :, cols]
            _, var = _center(x, z["ones_c4"])
            x.mul_(torch.rsqrt(var.add_(leps)))
            x = F.gelu(torch.addcmul(lb, x, lw), approximate=act1.approximate)
            # second ConvTranspose2d + feat_s0: (B, 4 * C/8, tile), rows (o2, i2, j2)
            x = F.gelu(torch.baddbmm(z["f0"][:, cols], wd2, x), approximate=act2.approximate)
            width = x.shape[-1]
            out[:, :, :, cols] = torch.bmm(hyper, x.view(b, -1, 4 * width)).view(b, k, 4, width)
        return out.view(b, k, 16 * n)
