"""Fast LIF kernels (fused numba / torch-op and Triton) and the compact spike-fed layers."""
