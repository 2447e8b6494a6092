"""Float64 references, written from the formulas and independent of the IR.
The ops with specs keep theirs in the op file (OpSpec.reference); these
names point there so older tests read the same formulas."""
from kernelforge.kernels.rmsnorm import fused_reference as fused_add_rms_norm  # noqa: F401
from kernelforge.kernels.rmsnorm import reference as rms_norm  # noqa: F401
from kernelforge.kernels.rotary import reference as rotary  # noqa: F401
from kernelforge.kernels.attention_reference import attention  # noqa: F401
