"""OpenMP CPU kernels (compiled from _kernels.pyx); no autograd, raw pointers only."""
