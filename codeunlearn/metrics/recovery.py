"""What an attack brought back: a forget metric after the attack minus before (> 0 = knowledge revived).

Both attacks report it: re-quantization (``attacks.quantize``) and relearning (``attacks.relearn``).
"""

from __future__ import annotations


def recovery(forget_metric_quantized: float, forget_metric_full: float) -> float:
    """Knowledge revived by quantization: forget metric after quantization minus before (> 0 = revived)."""
    return float(forget_metric_quantized) - float(forget_metric_full)
