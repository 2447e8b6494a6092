"""The public ops, ``kernelforge.ops.NAME(..., backend=None)``. Each is also
a torch.library custom op, ``torch.ops.kernelforge.NAME``."""
from .kernels import activation as _activation
from .kernels import attention as _attention
from .kernels import attention_split as _attention_split
from .kernels import kv_cache as _kv_cache
from .kernels import rmsnorm as _rmsnorm
from .kernels import rotary as _rotary
from .kernels import sampling as _sampling
from .kernels.activation import silu_and_mul  # noqa: F401
from .kernels.attention import attention, paged_attention  # noqa: F401
from .kernels.attention_plan import PagedAttentionPlan, paged_attention_plan  # noqa: F401
from .kernels.kv_cache import reshape_and_cache  # noqa: F401
from .kernels.rmsnorm import fused_add_rms_norm, rms_norm  # noqa: F401
from .kernels.rotary import rotary_embedding  # noqa: F401
from .kernels.sampling import apply_penalties, sample  # noqa: F401

#: op name -> the IR kernels it launches (for `kernelforge ops`, `show`, `aot-check`)
KERNELS = {
    "rms_norm": (_rmsnorm.rms_norm_fwd,),
    "fused_add_rms_norm": (_rmsnorm.fused_add_rms_norm_fwd,),
    "rotary_embedding": _rotary.all_kernels(),
    "silu_and_mul": (_activation.silu_and_mul_fwd,),
    "reshape_and_cache": (_kv_cache.reshape_and_cache_kernel,),
    "attention": _attention.packed_kernels(),
    "paged_attention": _attention.paged_kernels() + _attention_split.all_kernels(),
    "sample": (_sampling.sample_kernel(),),
}
