"""Builds kf_hostdev._C, the device's C++ extension, with the C++ compiler
of the machine it is installed on (torch.utils.cpp_extension; MAX_JOBS=N
limits the parallel compiles). Everything else is in pyproject.toml."""
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            "kf_hostdev._C",
            ["kf_hostdev/csrc/runtime.cpp", "kf_hostdev/csrc/ops.cpp"],
            extra_compile_args=["-O2"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
