"""Op definitions written once in the kernel IR (installed as
``kernelforge.kernels``). One file per op family."""
