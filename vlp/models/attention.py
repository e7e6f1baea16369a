"""Which scaled-dot-product-attention kernels a run uses, by device and precision."""
from contextlib import AbstractContextManager, nullcontext

from torch.nn.attention import SDPBackend, sdpa_kernel


def attention_kernels(device_type: str, precision: str, float32_matmul_precision: str = "highest"
                      ) -> AbstractContextManager:
    """Attention on the CPU through torch's math kernel when matrix products run on bf16 units
    (bf16 training, or float32 at `medium` matmul precision): torch's fused CPU kernel is then
    ~3-6x slower in its backward, which made attention a third of a step or more (BENCHMARKS.md),
    while the math kernel's products take the fast path. Elsewhere torch's own choice."""
    if device_type == "cpu" and ("bf16" in precision or float32_matmul_precision == "medium"):
        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()
