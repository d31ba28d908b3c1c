"""SAM2 behind the :class:`~sam2_refine.model.predictor.BoxPredictor` protocol.

With :mod:`~sam2_refine.model.fast_decoder` (and :mod:`~sam2_refine.model.loading`, which
imports them as visible steps), the only module that imports torch and sam2. It

- builds the model once per job with sam2's own ``build_sam2`` for the architecture the
  checkpoint's weights show (:mod:`sam2_refine.model.checkpoints`: SAM 2.0 or 2.1, any size, any file
  name), then loads the weights strictly (no missing or unexpected weight); never without a
  checkpoint: a missing, corrupt or unusable one raises :class:`CheckpointError`. Checkpoints
  are read with ``torch.load(..., weights_only=True, mmap=True)``;
- runs on CUDA when available (bfloat16 autocast and TF32 on compute capability >= 8, both
  entered only around inference and restored afterwards), else on the CPU: there the image
  encoder runs under bfloat16 autocast where the CPU has native bfloat16 units
  (:mod:`sam2_refine.model.cpu_precision` decides; ``SAM2_REFINE_CPU_PRECISION`` forces either), in
  float32 elsewhere, and everything after the encoder (its features are handed on in float32)
  in float32;
- embeds an image once (resized to the model's 1024x1024 input here, with area averaging, so
  a huge frame is never copied into a full-size tensor), and decodes batches of box prompts
  straight through the prompt encoder and mask decoder, returning the 256x256 low-resolution
  logits (or, asked for windows, only the cells each prompt's window needs). It does not
  upsample masks to the frame: the engine does that only around each object
  (:mod:`sam2_refine.model.logits`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from sam2_refine.model.architectures import UNTRAINED_MARKER
from sam2_refine.model.checkpoints import ModelEntry, ModelUnusable, inspect_model
from sam2_refine.model.cpu_precision import PRECISION_ENV, EncoderPrecision, encoder_precision
from sam2_refine.model.logits import cells_for_windows
from sam2_refine.model.predictor import Decoded, from_whole_grid

log = logging.getLogger(__name__)

__all__ = ["UNTRAINED_MARKER", "CheckpointError", "DeviceChoice", "Sam2BoxPredictor", "build_model",
           "choose_device", "cpu_encoder_precision", "image_features", "inference_mode", "inspect_checkpoint",
           "load_state_dict"]


class CheckpointError(RuntimeError):
    """The checkpoint cannot be loaded into the architecture its weights show."""


@dataclass(frozen=True)
class DeviceChoice:
    """Where and how the model runs.

    Attributes:
        device: ``"cuda"`` or ``"cpu"``.
        bfloat16: Run inference under bfloat16 autocast (CUDA, compute capability >= 8).
        tf32: Allow TF32 matrix maths during inference (CUDA, compute capability >= 8).
        encoder_bfloat16: Run the image encoder alone under bfloat16 autocast, its features
            handed on in float32 (the CPU with native bfloat16 units, :func:`choose_device`).
        channels_last: Give the image encoder its input in channels-last memory format.
        reason: Why the encoder runs in the precision it runs in (for the job's log).
    """

    device: str
    bfloat16: bool
    tf32: bool
    encoder_bfloat16: bool = False
    channels_last: bool = False
    reason: str = ""

    def describe(self) -> str:
        if self.device == "cpu":
            why = f" ({self.reason})" if self.reason else ""
            if self.encoder_bfloat16:
                return f"cpu, image encoder in bfloat16{why}, decoder in float32"
            return f"cpu, float32{why}"
        return f"cuda, {'bfloat16' if self.bfloat16 else 'float32'}{', TF32' if self.tf32 else ''}"


def cpu_encoder_precision(environ: Mapping[str, str] | None = None) -> EncoderPrecision:
    """:func:`sam2_refine.model.cpu_precision.encoder_precision` for this CPU and ``environ``
    (default ``os.environ``): the capabilities from ``torch.cpu.get_capabilities()`` (keys
    ``amx_bf16``, ``avx512_bf16``, ``architecture``), oneDNN's bfloat16 support from
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``; either missing counts as absent."""
    environ = os.environ if environ is None else environ
    try:
        capabilities: Mapping[str, object] = dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):  # an older torch: no capability query, no bfloat16
        capabilities = {}
    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    return encoder_precision(environ.get(PRECISION_ENV), capabilities, onednn)


#: Whether the bfloat16 encoder gets its input in channels-last memory format (docs/cpu-encoder.md
#: has the measurement that decided it).
BFLOAT16_CHANNELS_LAST = True


def choose_device(prefer: str | None = None, environ: Mapping[str, str] | None = None) -> DeviceChoice:
    """CUDA when available (and not ``prefer == "cpu"``), else the CPU, its image encoder in
    the precision :func:`cpu_encoder_precision` chooses (``environ``: default ``os.environ``)."""
    if prefer != "cpu" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(0)
        return DeviceChoice("cuda", bfloat16=major >= 8, tf32=major >= 8)
    precision = cpu_encoder_precision(environ)
    if precision.warning:
        log.warning("%s", precision.warning)
    log.info("image encoder on the CPU in %s: %s", "bfloat16" if precision.bfloat16 else "float32",
             precision.reason)
    return DeviceChoice("cpu", bfloat16=False, tf32=False, encoder_bfloat16=precision.bfloat16,
                        channels_last=precision.bfloat16 and BFLOAT16_CHANNELS_LAST, reason=precision.reason)


@contextlib.contextmanager
def inference_mode(choice: DeviceChoice) -> Iterator[None]:
    """No gradients; bfloat16 autocast and TF32 only inside, as ``choice`` says."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        if choice.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        with torch.inference_mode():
            if choice.bfloat16:
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                    yield
            else:
                yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def inspect_checkpoint(path: Path) -> ModelEntry:
    """Recognise a checkpoint from its weights' names and shapes (no torch, no weights read).

    Returns:
        The checkpoint's architecture, where its weights are, whether it carries the
        :data:`UNTRAINED_MARKER` (random weights), and its sidecar's label and defaults.

    Raises:
        CheckpointError: missing, unreadable, corrupt, not a SAM2 checkpoint, a bad sidecar.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint {path.name} is missing")
    try:
        return inspect_model(path)
    except ModelUnusable as exc:
        raise CheckpointError(f"checkpoint {path.name} cannot be used: {exc}") from None


def load_state_dict(path: Path, entry: ModelEntry) -> dict[str, torch.Tensor]:
    """The checkpoint's weights, memory-mapped, named as sam2's model names them.

    Raises:
        CheckpointError: torch refuses the file (``weights_only=True``) or it changed since
            it was recognised.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path.name} is missing") from None
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {path.name} is corrupt or not a PyTorch checkpoint "
                              f"({type(exc).__name__})") from None
    recognised = entry.recognised
    weights = state if recognised.state_dict_key is None else (
        state.get(recognised.state_dict_key) if isinstance(state, dict) else None)
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {path.name} changed while it was being loaded")
    prefix = recognised.prefix
    return {name[len(prefix):]: tensor for name, tensor in weights.items() if name.startswith(prefix)}


def build_model(checkpoint: Path, choice: DeviceChoice, entry: ModelEntry | None = None,
                on_step: Callable[[str], None] | None = None) -> torch.nn.Module:
    """sam2's ``build_sam2`` for the architecture the checkpoint's weights show, its weights
    loaded strictly.

    Args:
        checkpoint: The checkpoint file.
        choice: Device and precision.
        entry: What :func:`inspect_checkpoint` found (recognised again when not given).
        on_step: Told each step as it starts, in words (a progress bar's text).

    Raises:
        CheckpointError: not a usable SAM2 checkpoint, or its weights do not fit the architecture.
    """
    from sam2.build_sam import build_sam2  # heavy: Hydra, the model zoo

    step = on_step or (lambda text: None)
    entry = entry or inspect_checkpoint(checkpoint)
    config = entry.architecture.config
    step("reading the weights")
    weights = load_state_dict(checkpoint, entry)
    try:
        step("building the network")
        model = build_sam2(config, ckpt_path=None, device=choice.device, mode="eval", apply_postprocessing=True)
        step("loading the weights into it")
        model.load_state_dict(weights, strict=True)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint.name} does not fit the {config.rsplit('/', 1)[-1]} "
            f"architecture ({type(exc).__name__}: {str(exc)[:200] or 'missing or unexpected weights'})"
        ) from None
    log.info("loaded %s as %s (%s)", checkpoint.name, entry.architecture.label, config)
    return model


def _float32(value: object) -> object:
    """Tensors (also in lists) as float32 (their memory layout kept)."""
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, list):
        return [_float32(v) for v in value]
    return value


def image_features(model: torch.nn.Module, transforms: object, image: np.ndarray,
                   choice: DeviceChoice) -> dict[str, object]:
    """The features sam2's ``SAM2ImagePredictor.set_image`` computes for ``image``, with the
    image encoder (and nothing else) run as ``choice`` says: under bfloat16 autocast with
    ``encoder_bfloat16``, its input channels-last with ``channels_last``. Its outputs are
    handed on as float32 (in the memory layout the encoder gave them), so that everything after
    it (the decoder's high-resolution projections, the no-memory embedding, the mask decoder)
    runs in float32 as in a float32 job. With neither option it computes what ``set_image``
    computes, bit for bit. Call inside :func:`inference_mode`.

    Args:
        model: A built SAM2 model (``SAM2Base``).
        transforms: sam2's ``SAM2Transforms`` for the model (to tensor, resize, normalise).
        image: (S, S, 3) float32 RGB in [0, 1], S the model's input size (1024).
        choice: Device and precision.

    Returns:
        ``{"image_embed": (1, C, S/16, S/16), "high_res_feats": [(1, C/8, S/4, S/4),
        (1, C/4, S/8, S/8)]}``, float32 (C = 256 for SAM2/SAM2.1), as ``set_image`` keeps them.
    """
    input_image = transforms(image)[None, ...].to(choice.device)
    if choice.channels_last:
        input_image = input_image.contiguous(memory_format=torch.channels_last)
    with torch.autocast(choice.device, dtype=torch.bfloat16, enabled=choice.encoder_bfloat16):
        encoded = model.image_encoder(input_image)
    backbone_out = {key: _float32(value) for key, value in encoded.items()}
    # the rest of SAM2Base.forward_image and of SAM2ImagePredictor.set_image, in float32
    if model.use_high_res_features_in_sam:
        backbone_out["backbone_fpn"][0] = model.sam_mask_decoder.conv_s0(backbone_out["backbone_fpn"][0])
        backbone_out["backbone_fpn"][1] = model.sam_mask_decoder.conv_s1(backbone_out["backbone_fpn"][1])
    _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    feats = [feat.permute(1, 2, 0).view(1, -1, *size)
             for feat, size in zip(vision_feats[::-1], feat_sizes[::-1])][::-1]
    return {"image_embed": feats[-1], "high_res_feats": feats[:-1]}


def model_prompt_points(
    boxes: np.ndarray | None,
    points: np.ndarray | None,
    point_labels: np.ndarray | None,
    image_hw: tuple[int, int],
    input_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Box and point prompts as the prompt encoder's points, in the model's input space.

    Args:
        boxes: float (N, 4) (x0, y0, x1, y1) or None.
        points: float (N, P, 2) (x, y) or None; ``point_labels`` int (N, P) with them.
        image_hw: (H, W) of the embedded image (or region) the coordinates are in; pixel
            centres at integers.
        input_size: The model's square input side (1024).

    Returns:
        (coords float32 (N, T, 2), labels int32 (N, T)): each box as its two corners (labels
        2, 3), then the points; T = 2 * (boxes given) + P.

    Raises:
        ValueError: neither boxes nor points, shapes that do not agree.
    """
    height, width = image_hw
    scale = np.array([width, height], dtype=np.float32)
    parts, labels = [], []
    count = None
    if boxes is not None:
        corners = np.asarray(boxes, dtype=np.float32).reshape(-1, 2, 2)
        count = len(corners)
        parts.append(corners)
        labels.append(np.tile(np.array([[2, 3]], dtype=np.int32), (count, 1)))
    if points is not None:
        if point_labels is None:
            raise ValueError("points need point_labels")
        pts = np.asarray(points, dtype=np.float32)
        lab = np.asarray(point_labels, dtype=np.int32)
        if pts.ndim != 3 or pts.shape[2] != 2 or lab.shape != pts.shape[:2]:
            raise ValueError(f"expected points (N, P, 2) and labels (N, P), got {pts.shape} and {lab.shape}")
        if count is not None and len(pts) != count:
            raise ValueError(f"{count} boxes but {len(pts)} point prompts")
        count = len(pts)
        parts.append(pts)
        labels.append(lab)
    if count is None:
        raise ValueError("decode() needs boxes or points")
    coords = np.concatenate(parts, axis=1) if parts else np.zeros((0, 0, 2), np.float32)
    # pixel centres at integers -> the model's input space (the encoder adds its own half pixel)
    coords = (coords + np.float32(0.5)) / scale * np.float32(input_size)
    return coords.astype(np.float32), np.concatenate(labels, axis=1)


def neighbourhood_cells(boxes: np.ndarray, region_hw: tuple[int, int], grid_hw: tuple[int, int],
                        min_cells: int = 16) -> np.ndarray:
    """Each box's neighbourhood on the logit grid: the box plus its larger side (at least
    ``min_cells``) on every side.

    Args:
        boxes: float (N, 4) (x0, y0, x1, y1) region pixels (pixel centres at integers).
        region_hw: (H, W) of the region the grid covers.
        grid_hw: (h, w) of the grid.

    Returns:
        int64 (N, 4) ``(top, left, bottom, right)`` cells, half-open (not clipped).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sy, sx = grid_hw[0] / region_hw[0], grid_hw[1] / region_hw[1]
    x0, x1 = (boxes[:, 0] + 0.5) * sx, (boxes[:, 2] + 0.5) * sx
    y0, y1 = (boxes[:, 1] + 0.5) * sy, (boxes[:, 3] + 0.5) * sy
    pad = np.maximum(np.maximum(x1 - x0, y1 - y0), min_cells)
    return np.stack([np.floor(y0 - pad), np.floor(x0 - pad), np.ceil(y1 + pad), np.ceil(x1 + pad)],
                    1).astype(np.int64)


class Sam2BoxPredictor:
    """SAM2 image predictor for batches of box prompts (see the module docstring).

    Args:
        model: A built SAM2 model (``SAM2Base``).
        choice: Device and precision.
        name: For messages, e.g. ``"sam2.1_hiera_tiny.pt, SAM2.1 tiny"``.
        max_batch: Prompts per decoder call.
        fast_decoder: On the CPU, decode prompts without mask input with
            :class:`~sam2_refine.model.fast_decoder.FastBoxDecoder` (sam2's decoder's output, faster);
            sam2's decoder otherwise, and where the model's decoder is not supported.
        local_statistics: For windowed decoding with the fast decoder only: count the
            dynamic-multimask rule's stability and the masks' areas in each prompt's
            neighbourhood (:func:`neighbourhood_cells`) instead of over the whole grid. Faster,
            but not sam2's rule: it differs when a mask reaches beyond that neighbourhood. Off
            in jobs; for measuring what the whole-grid rule costs.
    """

    def __init__(self, model: torch.nn.Module, choice: DeviceChoice, name: str = "SAM2",
                 max_batch: int = 64, fast_decoder: bool = True, local_statistics: bool = False) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = model
        self.choice = choice
        self.max_batch = max_batch
        mask_size = 4 * int(model.sam_prompt_encoder.image_embedding_size[0])
        self.mask_input_size = (mask_size, mask_size)  # 256 x 256 for the 1024 px input
        self.logit_grid = self.mask_input_size  # decode's logits: the same grid
        self.description = f"{name} ({choice.describe()})"
        self.local_statistics = local_statistics
        self._predictor = SAM2ImagePredictor(model)
        self.input_size = int(model.image_size)
        self._image_hw: tuple[int, int] | None = None
        # --- fast decoder (sam2_refine.model.fast_decoder), CPU only: what it is built and verified for
        self._fast = None
        self._fast_ready = False
        if fast_decoder and choice.device == "cpu":
            from sam2_refine.model.fast_decoder import FastBoxDecoder, UnsupportedModelError

            try:
                self._fast = FastBoxDecoder(model)
            except UnsupportedModelError as exc:
                log.info("using sam2's mask decoder: %s", exc)
        # --- end fast decoder

    @property
    def device(self) -> str:
        """``"cuda"`` or ``"cpu"``."""
        return self.choice.device

    @property
    def decoder_name(self) -> str:
        """Which mask decoder runs box prompts without mask input."""
        if self._fast is None:
            return "sam2's MaskDecoder"
        rule = "rule near each box" if self.local_statistics else "sam2's rule over the whole grid"
        return f"FastBoxDecoder (sam2_refine.model.fast_decoder), windowed, {rule}"

    @classmethod
    def load(cls, checkpoint: Path, choice: DeviceChoice | None = None, max_batch: int = 64,
             fast_decoder: bool = True, local_statistics: bool = False,
             on_step: Callable[[str], None] | None = None) -> tuple[Sam2BoxPredictor, bool]:
        """Build from a checkpoint file (``on_step``: told each step as it starts, in words).

        Returns:
            (predictor, untrained): ``untrained`` is True for a checkpoint made by this
            project's tests or offline demo (random weights); callers must say so.

        Raises:
            CheckpointError: missing, corrupt or mismatched checkpoint.
        """
        if on_step is not None:
            on_step("choosing the device")
        choice = choice or choose_device()
        entry = inspect_checkpoint(checkpoint)
        model = build_model(checkpoint, choice, entry, on_step)
        name = f"{checkpoint.name}, {entry.architecture.label}"
        if on_step is not None:
            on_step("preparing the mask decoder")
        return cls(model, choice, name, max_batch, fast_decoder, local_statistics), entry.untrained

    def embed(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        """Embed an (H, W, 3) float32 RGB image in [0, 1] (kept until the next call).

        ``region_hw``: the size of the region ``image`` shows, when it was already shrunk to the
        model input (boxes are then given in the region's pixels).
        """
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
        height, width = region_hw or image.shape[:2]
        size = self.input_size
        shrinking = height > size or width > size
        resized = cv2.resize(np.ascontiguousarray(image, dtype=np.float32), (size, size),
                             interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        with inference_mode(self.choice):
            if self.choice.encoder_bfloat16 or self.choice.channels_last:
                predictor = self._predictor
                predictor.reset_predictor()
                predictor._features = image_features(self.model, predictor._transforms,
                                                     np.clip(resized, 0.0, 1.0), self.choice)
                predictor._orig_hw = [(size, size)]
                predictor._is_image_set = True
            else:  # float32: sam2's own set_image, as before bfloat16 encoders
                self._predictor.set_image(np.clip(resized, 0.0, 1.0))
            # --- fast decoder: per-image precomputation
            self._fast_ready = False
            if self._fast is not None:
                from sam2_refine.model.fast_decoder import UnsupportedModelError

                feats = self._predictor._features
                try:
                    self._fast.set_image_features(feats["image_embed"], list(feats["high_res_feats"]))
                    self._fast_ready = True
                except UnsupportedModelError as exc:
                    log.info("using sam2's mask decoder: %s", exc)
            # --- end fast decoder
        self._image_hw = (height, width)

    def decode(self, boxes: np.ndarray | None, mask_inputs: np.ndarray | None = None,
               multimask: bool = False, *, points: np.ndarray | None = None,
               point_labels: np.ndarray | None = None, windows: np.ndarray | None = None,
               areas: bool = False) -> Decoded:
        """Decode box and/or point prompts; see :meth:`sam2_refine.model.predictor.BoxPredictor.decode`.

        Boxes go to the prompt encoder as two corner points (labels 2 and 3), followed by the
        points, and the encoder appends one padding point (label -1), as sam2's predictor does.

        With ``windows``, each prompt's logits cover only the grid cells its window of pixels
        needs: computed only there by the fast decoder (which still computes exactly what
        depends on the whole grid: the dynamic-multimask rule and, with ``areas``, each mask's
        positive area), cut from the whole grid otherwise.

        Returns:
            logits (N, C, 256, 256), or N arrays (C, rows, cols) with ``windows``, clamped to
            [-32, 32] as sam2 does; scores (N, C); C = 3 with ``multimask``, else 1.
        """
        if self._image_hw is None:
            raise RuntimeError("embed() an image before decode()")
        coords_np, labels_np = model_prompt_points(boxes, points, point_labels, self._image_hw, self.input_size)
        count = len(coords_np)
        height, width = self._image_hw
        cells = None if windows is None else cells_for_windows(windows, self.logit_grid, (height, width))
        features = self._predictor._features
        device = self.choice.device
        with inference_mode(self.choice):
            coords = torch.as_tensor(coords_np, device=device)
            labels = torch.as_tensor(labels_np, dtype=torch.int, device=device)
            masks = None
            if mask_inputs is not None:
                masks = torch.as_tensor(np.asarray(mask_inputs, dtype=np.float32), device=device)
            sparse, dense = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=masks)
            if masks is None and self._fast_ready and cells is not None:  # --- fast decoder, windowed
                stats = None
                if self.local_statistics:  # near each box (point prompts: in their windows)
                    stats = (cells if boxes is None else
                             neighbourhood_cells(np.asarray(boxes).reshape(-1, 4), (height, width), self.logit_grid))
                out = self._fast.decode_windows(sparse, cells, multimask, areas=areas, statistics=stats)
                logits = tuple(torch.clamp(x, -32.0, 32.0).cpu().numpy() for x in out.logits)
                return Decoded(logits, out.iou.cpu().numpy(), out.windows, self.logit_grid,
                               None if out.areas is None else out.areas.cpu().numpy())
            if masks is None and self._fast_ready:  # --- fast decoder (same output as below)
                low_res, scores = self._fast(sparse, multimask)
            else:
                low_res, scores, _, _ = self.model.sam_mask_decoder(
                    image_embeddings=features["image_embed"],
                    image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                    repeat_image=count > 1,
                    high_res_features=list(features["high_res_feats"]),
                )
            low_res = torch.clamp(low_res.float(), -32.0, 32.0).cpu().numpy()
        return from_whole_grid(low_res, scores.float().cpu().numpy(), (height, width), windows=windows,
                               areas=areas)
