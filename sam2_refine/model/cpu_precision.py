"""Which precision SAM2's image encoder runs in on the CPU: a pure decision (no torch here).

bfloat16 autocast makes the encoder much faster on a CPU with native bfloat16 matrix units
(AMX on Intel Sapphire Rapids and later; AVX512-BF16 on Intel Cooper Lake and later and AMD Zen 4
and later) and much slower on one without them, where bfloat16 products are emulated (docs/cpu-encoder.md
has the figures). So it is chosen only where the CPU
reports those units and torch's oneDNN can run bfloat16; anywhere else the encoder stays in
float32. :data:`PRECISION_ENV` forces either.
Only the image encoder is concerned: the mask decoder always runs in float32 on the CPU.

:mod:`sam2_refine.model.sam2_model` gathers the facts from torch (``torch.cpu.get_capabilities()``
and ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) and calls :func:`encoder_precision`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Environment variable forcing the CPU image encoder's precision: ``auto`` (default), ``bf16``
#: (``bfloat16``) or ``fp32`` (``float32``), case-insensitive.
PRECISION_ENV = "SAM2_REFINE_CPU_PRECISION"

_SETTINGS = {"": "auto", "auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}

#: ``torch.cpu.get_capabilities()`` keys (x86_64) of native bfloat16 matrix units, with their
#: names for messages.
BFLOAT16_UNITS = (("amx_bf16", "AMX bfloat16 tiles"), ("avx512_bf16", "AVX512-BF16"))


@dataclass(frozen=True)
class EncoderPrecision:
    """The decision.

    Attributes:
        bfloat16: Run the image encoder under bfloat16 autocast.
        reason: Why, in words for the job's log (e.g. ``"the CPU has AVX512-BF16 units:
            avx512_bf16"``).
        warning: Something the operator should know (a malformed :data:`PRECISION_ENV`, bfloat16
            forced on a CPU without the units), else None.
    """

    bfloat16: bool
    reason: str
    warning: str | None = None


_X86_64 = ("x86_64", "AMD64", "x86-64")


def native_bfloat16_units(capabilities: Mapping[str, object]) -> list[str]:
    """The capability keys of :data:`BFLOAT16_UNITS` that ``capabilities`` reports (x86_64 only;
    empty elsewhere: bfloat16 on other processors has not been measured for this worker)."""
    if str(capabilities.get("architecture", "x86_64")) not in _X86_64:
        return []
    return [key for key, _ in BFLOAT16_UNITS if capabilities.get(key) is True]


def encoder_precision(setting: str | None, capabilities: Mapping[str, object], onednn_bfloat16: bool
                      ) -> EncoderPrecision:
    """The CPU image encoder's precision.

    Args:
        setting: The value of :data:`PRECISION_ENV` (None or empty: ``auto``).
        capabilities: What ``torch.cpu.get_capabilities()`` reports: booleans such as
            ``"avx512_bf16"`` and ``"amx_bf16"``, and ``"architecture"``.
        onednn_bfloat16: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: torch's oneDNN can
            run bfloat16 kernels on this CPU.

    Returns:
        bfloat16 under ``auto`` only where the CPU has native bfloat16 units (:data:`BFLOAT16_UNITS`)
        and oneDNN runs bfloat16; as forced otherwise. A malformed setting is treated as ``auto``,
        with a warning.
    """
    text = (setting or "").strip().lower()
    mode = _SETTINGS.get(text)
    warning = None
    if mode is None:
        warning = f"ignoring {PRECISION_ENV}={setting!r}: not auto, bf16 or fp32"
        mode = "auto"
    units = native_bfloat16_units(capabilities)
    named = " and ".join(dict(BFLOAT16_UNITS)[key] for key in units) + " units: " + ", ".join(units)
    if mode == "fp32":
        return EncoderPrecision(False, f"{PRECISION_ENV}={text}", warning)
    if mode == "bf16":
        if not units:
            warning = (f"{PRECISION_ENV}={text} on a CPU without bfloat16 units, no amx_bf16 nor avx512_bf16: "
                       "the image encoder will be several times slower than in float32")
        return EncoderPrecision(True, f"{PRECISION_ENV}={text}", warning)
    if not units:
        architecture = str(capabilities.get("architecture", "x86_64"))
        if architecture not in _X86_64:
            return EncoderPrecision(False, f"bfloat16 is chosen automatically on x86_64 CPUs only, this is "
                                           f"{architecture}", warning)
        return EncoderPrecision(False, "the CPU has no bfloat16 units: no amx_bf16, no avx512_bf16", warning)
    if not onednn_bfloat16:
        return EncoderPrecision(False, f"the CPU has {named}, but torch's oneDNN cannot run bfloat16 here", warning)
    return EncoderPrecision(True, f"the CPU has {named}", warning)
