"""Which scaled-dot-product-attention kernels a run uses, by device and precision."""
from contextlib import AbstractContextManager, nullcontext

from torch.nn.attention import SDPBackend, sdpa_kernel


def attention_kernels(device_type: str, precision: str) -> AbstractContextManager:
    """bf16 attention on the CPU through torch's math kernel: its fused CPU kernel is ~3x slower in
    the bf16 backward, which made attention a third of a bf16 step (BENCHMARKS.md). Elsewhere
    torch's own choice."""
    if device_type == "cpu" and "bf16" in precision:
        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()
