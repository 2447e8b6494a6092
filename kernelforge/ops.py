"""The public ops, ``kernelforge.ops.NAME(..., backend=None)``. Each is also
a torch.library custom op, ``torch.ops.kernelforge.NAME``, and each is
declared once by an ``OpSpec`` in its file under kernels/ (``SPECS``)."""
from .kernels import activation as _activation
from .kernels import attention as _attention
from .kernels import attention_split as _attention_split
from .kernels import kv_cache as _kv_cache
from .kernels import layernorm as _layernorm
from .kernels import moe as _moe
from .kernels import rmsnorm as _rmsnorm
from .kernels import rotary as _rotary
from .kernels import sampling as _sampling
from .kernels.activation import gelu_tanh_and_mul, silu_and_mul  # noqa: F401
from .kernels.attention import attention, paged_attention  # noqa: F401
from .kernels.attention_plan import PagedAttentionPlan, paged_attention_plan  # noqa: F401
from .kernels.kv_cache import reshape_and_cache  # noqa: F401
from .kernels.layernorm import layer_norm  # noqa: F401
from .kernels.moe import topk_softmax  # noqa: F401
from .kernels.rmsnorm import fused_add_rms_norm, rms_norm  # noqa: F401
from .kernels.rotary import rotary_embedding  # noqa: F401
from .kernels.sampling import apply_penalties, sample  # noqa: F401

#: op name -> its spec (kernelforge/spec.py): the tests, `kernelforge conformance`
#: and the benchmarks are derived from these
SPECS = {s.name: s for m in (_rmsnorm, _layernorm, _activation, _moe, _rotary) for s in m.SPECS}

#: op name -> the IR kernels it launches (for `kernelforge ops`, `show`, `aot-check`)
KERNELS = {
    **{name: tuple(s.kernels()) for name, s in SPECS.items()},
    "reshape_and_cache": (_kv_cache.reshape_and_cache_kernel,),
    "attention": _attention.packed_kernels(),
    "paged_attention": _attention.paged_kernels() + _attention_split.all_kernels(),
    "sample": (_sampling.sample_kernel(),),
}
